//! The Kubernetes API as a source: a watcher per kind (list, then watch; on errors,
//! relist with backoff), each event turned at once into model changes. No API object is
//! kept (managedFields and everything else the model does not use are dropped on arrival),
//! which keeps the agent's memory small. While the API is unreachable the last state stays
//! enforced.

use std::collections::BTreeSet;
use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use policy_model::{Change, InvalidObject, Namespace, Node, ObjectKey, Pod, Policy};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::warn;

/// The kinds the agent watches; each must be readable under `permissions::API_ACCESS`.
pub const WATCHED_KINDS: [&str; 4] = ["namespaces", "pods", "networkpolicies", "nodes"];

pub enum SourceMessage {
    Changes(Vec<Change>),
    /// A kind's first full list is in.
    Synced(&'static str),
    /// An object that cannot be enforced, with a reference for a Kubernetes Event.
    Invalid(Box<(ObjectReference, InvalidObject)>),
}

/// How each watched kind becomes model changes.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: &'static str;
    fn key(&self) -> ObjectKey {
        ObjectKey::new(self.namespace().unwrap_or_default(), self.name_any())
    }
    fn upsert(&self) -> Result<Change, InvalidObject>;
    fn delete(key: ObjectKey) -> Change;
    /// What still goes to the compiler when the object is invalid.
    fn when_invalid(&self) -> Option<Change> {
        None
    }
}

impl Watched for core::Namespace {
    const KIND: &'static str = "namespaces";
    fn upsert(&self) -> Result<Change, InvalidObject> {
        Namespace::from_k8s(self).map(Change::UpsertNamespace)
    }
    fn delete(key: ObjectKey) -> Change {
        Change::DeleteNamespace(key.name)
    }
}

impl Watched for core::Pod {
    const KIND: &'static str = "pods";
    fn upsert(&self) -> Result<Change, InvalidObject> {
        Pod::from_k8s(self).map(Change::UpsertPod)
    }
    fn delete(key: ObjectKey) -> Change {
        Change::DeletePod(key)
    }
}

impl Watched for NetworkPolicy {
    const KIND: &'static str = "networkpolicies";
    fn upsert(&self) -> Result<Change, InvalidObject> {
        // Validated here to report it; the compiler validates again and keeps the last
        // valid version of a policy whose update is invalid.
        Policy::from_k8s(self)?;
        Ok(Change::UpsertPolicy(Box::new(self.clone())))
    }
    fn delete(key: ObjectKey) -> Change {
        Change::DeletePolicy(key)
    }
    /// The compiler keeps the last valid version of a policy whose update is invalid, and
    /// reports it as rejected.
    fn when_invalid(&self) -> Option<Change> {
        Some(Change::UpsertPolicy(Box::new(self.clone())))
    }
}

impl Watched for core::Node {
    const KIND: &'static str = "nodes";
    fn upsert(&self) -> Result<Change, InvalidObject> {
        Node::from_k8s(self).map(Change::UpsertNode)
    }
    fn delete(key: ObjectKey) -> Change {
        Change::DeleteNode(key.name)
    }
}

async fn watch<K: Watched>(api: Api<K>, config: watcher::Config, tx: mpsc::UnboundedSender<SourceMessage>) {
    let mut stream = watcher(api, config).default_backoff().boxed();
    // What the API holds now, and what a relist has shown so far.
    let mut known: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut relist: Option<BTreeSet<ObjectKey>> = None;
    let upsert = |obj: &K, tx: &mpsc::UnboundedSender<SourceMessage>| match obj.upsert() {
        Ok(change) => {
            let _ = tx.send(SourceMessage::Changes(vec![change]));
        }
        Err(error) => {
            if let Some(change) = obj.when_invalid() {
                let _ = tx.send(SourceMessage::Changes(vec![change]));
            }
            let _ = tx.send(SourceMessage::Invalid(Box::new((obj.object_ref(&()), error))));
        }
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => relist = Some(BTreeSet::new()),
            Ok(Event::InitApply(obj)) => {
                relist.get_or_insert_with(BTreeSet::new).insert(obj.key());
                upsert(&obj, &tx);
            }
            Ok(Event::InitDone) => {
                let seen = relist.take().unwrap_or_default();
                let gone: Vec<Change> = known.difference(&seen).cloned().map(K::delete).collect();
                if !gone.is_empty() {
                    let _ = tx.send(SourceMessage::Changes(gone));
                }
                known = seen;
                let _ = tx.send(SourceMessage::Synced(K::KIND));
            }
            Ok(Event::Apply(obj)) => {
                known.insert(obj.key());
                upsert(&obj, &tx);
            }
            Ok(Event::Delete(obj)) => {
                known.remove(&obj.key());
                let _ = tx.send(SourceMessage::Changes(vec![K::delete(obj.key())]));
            }
            Err(e) => warn!(kind = K::KIND, error = %e, "watch failed; retrying (the last known state stays enforced)"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// The watchers' output, drained by the agent loop.
pub struct KubeSource {
    rx: mpsc::UnboundedReceiver<SourceMessage>,
    /// Received by `wait`, not yet drained.
    pending: Vec<SourceMessage>,
    synced: BTreeSet<&'static str>,
}

/// One drain.
#[derive(Default)]
pub struct Drained {
    pub changes: Vec<Change>,
    pub invalid: Vec<(ObjectReference, InvalidObject)>,
}

impl KubeSource {
    /// Starts watching namespaces, pods (all namespaces: peers live anywhere),
    /// NetworkPolicies, and this node's Node object.
    pub fn start(client: Client, node: &str) -> KubeSource {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = watcher::Config::default;
        tokio::spawn(watch::<core::Namespace>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<core::Pod>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<NetworkPolicy>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<core::Node>(Api::all(client), cfg().fields(&format!("metadata.name={node}")), tx));
        KubeSource { rx, pending: Vec::new(), synced: BTreeSet::new() }
    }

    /// Everything the watchers reported since the last call.
    pub fn drain(&mut self) -> Drained {
        let mut d = Drained::default();
        let mut messages = std::mem::take(&mut self.pending);
        while let Ok(m) = self.rx.try_recv() {
            messages.push(m);
        }
        for m in messages {
            match m {
                SourceMessage::Changes(c) => d.changes.extend(c),
                SourceMessage::Synced(kind) => {
                    self.synced.insert(kind);
                }
                SourceMessage::Invalid(invalid) => d.invalid.push(*invalid),
            }
        }
        d
    }

    /// Waits until the watchers report something (kept for the next `drain`).
    pub async fn wait(&mut self) {
        if let Some(m) = self.rx.recv().await {
            self.pending.push(m);
        }
    }

    /// Whether every kind's first full list is in: before that the agent does not touch
    /// the datapath (a partial view could open what a policy not yet seen closes).
    pub fn synced(&self) -> bool {
        WATCHED_KINDS.iter().all(|k| self.synced.contains(k))
    }
}
