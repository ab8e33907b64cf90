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
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use policy_model::{Change, InvalidObject, Namespace, Node, ObjectKey, Pod, Policy};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::warn;

use crate::agent::services::ServiceChange;

/// The kinds the agent watches; each must be readable under `permissions::API_ACCESS`.
pub const WATCHED_KINDS: [&str; 6] = ["namespaces", "pods", "networkpolicies", "nodes", "services", "endpointslices"];

/// What one object event means.
pub enum Update {
    Model(Change),
    Service(ServiceChange),
}

pub enum SourceMessage {
    Changes(Vec<Update>),
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
    fn upsert(&self) -> Result<Update, InvalidObject>;
    fn delete(key: ObjectKey) -> Update;
    /// What still goes to the compiler when the object is invalid.
    fn when_invalid(&self) -> Option<Update> {
        None
    }
}

impl Watched for core::Namespace {
    const KIND: &'static str = "namespaces";
    fn upsert(&self) -> Result<Update, InvalidObject> {
        Namespace::from_k8s(self).map(|n| Update::Model(Change::UpsertNamespace(n)))
    }
    fn delete(key: ObjectKey) -> Update {
        Update::Model(Change::DeleteNamespace(key.name.to_string()))
    }
}

impl Watched for core::Pod {
    const KIND: &'static str = "pods";
    fn upsert(&self) -> Result<Update, InvalidObject> {
        Pod::from_k8s(self).map(|p| Update::Model(Change::UpsertPod(p)))
    }
    fn delete(key: ObjectKey) -> Update {
        Update::Model(Change::DeletePod(key))
    }
}

impl Watched for NetworkPolicy {
    const KIND: &'static str = "networkpolicies";
    fn upsert(&self) -> Result<Update, InvalidObject> {
        // Validated here to report it; the compiler validates again and keeps the last
        // valid version of a policy whose update is invalid.
        Policy::from_k8s(self)?;
        Ok(Update::Model(Change::UpsertPolicy(Box::new(self.clone()))))
    }
    fn delete(key: ObjectKey) -> Update {
        Update::Model(Change::DeletePolicy(key))
    }
    /// The compiler keeps the last valid version of a policy whose update is invalid, and
    /// reports it as rejected.
    fn when_invalid(&self) -> Option<Update> {
        Some(Update::Model(Change::UpsertPolicy(Box::new(self.clone()))))
    }
}

impl Watched for core::Node {
    const KIND: &'static str = "nodes";
    fn upsert(&self) -> Result<Update, InvalidObject> {
        Node::from_k8s(self).map(|n| Update::Model(Change::UpsertNode(n)))
    }
    fn delete(key: ObjectKey) -> Update {
        Update::Model(Change::DeleteNode(key.name.to_string()))
    }
}

impl Watched for core::Service {
    const KIND: &'static str = "services";
    fn upsert(&self) -> Result<Update, InvalidObject> {
        Ok(Update::Service(ServiceChange::from_service(self)))
    }
    fn delete(key: ObjectKey) -> Update {
        Update::Service(ServiceChange::DeleteService(key))
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "endpointslices";
    fn upsert(&self) -> Result<Update, InvalidObject> {
        // A slice that names no Service stands behind none.
        Ok(Update::Service(ServiceChange::from_slice(self).unwrap_or_else(|| ServiceChange::DeleteSlice(self.key()))))
    }
    fn delete(key: ObjectKey) -> Update {
        Update::Service(ServiceChange::DeleteSlice(key))
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
                let gone: Vec<Update> = known.difference(&seen).cloned().map(K::delete).collect();
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
    pub services: Vec<ServiceChange>,
    pub invalid: Vec<(ObjectReference, InvalidObject)>,
}

impl KubeSource {
    /// Starts watching namespaces, pods (all namespaces: peers live anywhere),
    /// NetworkPolicies, this node's Node object, Services and EndpointSlices.
    pub fn start(client: Client, node: &str) -> KubeSource {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = watcher::Config::default;
        tokio::spawn(watch::<core::Namespace>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<core::Pod>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<NetworkPolicy>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<core::Node>(Api::all(client.clone()), cfg().fields(&format!("metadata.name={node}")), tx.clone()));
        tokio::spawn(watch::<core::Service>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<EndpointSlice>(Api::all(client), cfg(), tx));
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
                SourceMessage::Changes(c) => {
                    for u in c {
                        match u {
                            Update::Model(m) => d.changes.push(m),
                            Update::Service(s) => d.services.push(s),
                        }
                    }
                }
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

    /// Whether the view may be missing objects now (first lists not in, or a watcher
    /// failing).
    pub fn blind(&self) -> bool {
        !self.synced()
    }
}
