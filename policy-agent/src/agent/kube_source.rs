//! The Kubernetes API as a source: a kube-rs watcher per kind (list, then watch), each
//! event turned at once into model changes. No API object is kept, and objects are
//! decoded only as far as the model needs ([`slim`]: managedFields, annotations, status
//! conditions, container specs... are skipped while parsing). While the API is
//! unreachable the last state stays enforced.
//!
//! Errors and retries (what a real API server does, `DESIGN.md`):
//! - A watch that gets `410 Expired` (its resourceVersion is older than the server's
//!   window: after any API server restart) relists at once: that is no failure.
//! - Any other error (connection refused or cut, 5xx, 403 while RBAC warms up) retries
//!   after a short delay that doubles from [`RETRY_MIN`] up to [`RETRY_MAX`] (1 s), with
//!   jitter, and is reset by the first answer. The cap is what bounds the blind time after
//!   an outage: whatever its length, the API is retried within 1 s of its return, so a
//!   change made right after is enforced within about 1 s plus a relist. kube-rs'
//!   default (client-go's: up to 30 s, reset only after 2 min without errors) let an
//!   agent sit out up to 30 s after the API was back, and the `410` that follows any API
//!   server restart waited out that delay once more before the relist. The cost of the
//!   short cap: during an outage each agent tries each kind about once a second, a
//!   connection attempt to an address that refuses it; jitter keeps a fleet of agents
//!   from retrying in step.
//! - After a failure the watcher relists (rather than resuming the watch from its
//!   version): only a completed list proves the view is current again, and after a
//!   restart the server demands it anyway. Lists are paged ([`PAGE_SIZE`]) and served
//!   from the API server's watch cache (`resourceVersion=0`).
//!
//! [`KubeSource::blind`] says whether the view may be out of date: before every kind's
//! first list, and while any watcher is failing or relisting. An outage is logged once
//! (WARN "API unreachable; enforcing the last known state") and its end once (INFO "API
//! reachable again"); each retry is logged at DEBUG only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use policy_model::cnp::ClusterPolicy;
use policy_model::{Change, InvalidObject, Labels, Namespace, Node, ObjectKey, Pod, Policy};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::agent::services::ServiceChange;

pub use slim::{SlimClusterNetworkPolicy, SlimEndpointSlice, SlimNamespace, SlimNetworkPolicy, SlimNode, SlimPod, SlimService};

/// The kinds the agent watches; each must be readable under `permissions::API_ACCESS`.
pub const WATCHED_KINDS: [&str; 7] =
    ["namespaces", "pods", "networkpolicies", "clusternetworkpolicies", "nodes", "services", "endpointslices"];

/// While a kind's CRD is not installed (404 on its list), it is looked for again after
/// this long, doubling up to [`ABSENT_RETRY_MAX`]: a missing CRD is a cluster's normal
/// state, not an outage, so there is no hurry, but a CRD installed later must be picked up.
pub const ABSENT_RETRY_MIN: Duration = Duration::from_secs(1);
pub const ABSENT_RETRY_MAX: Duration = Duration::from_secs(30);

/// The first retry delay after an error.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest retry delay (before jitter, which takes up to half of it off).
pub const RETRY_MAX: Duration = Duration::from_secs(1);
/// Objects per list page. A page is decoded whole (kube-rs' `ObjectList` buffers it),
/// so the page size bounds the transient memory of a relist: 100 real pods are under
/// 1 MiB of JSON.
pub const PAGE_SIZE: u32 = 100;

/// What one object event means.
pub enum Update {
    Model(Change),
    Service(ServiceChange),
}

/// The state of one kind's watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStatus {
    /// Listing (first list, or a relist): the view of this kind is not complete.
    Listing,
    /// Listed and watching.
    Current,
    /// The last request failed (with this error); retrying.
    Failing(String),
}

pub enum SourceMessage {
    Changes(Vec<Update>),
    /// A kind's full list is in (the first one or a relist).
    Synced(&'static str),
    /// A kind's watcher changed state.
    Status(&'static str, WatchStatus),
    /// An object that cannot be enforced, with a reference for a Kubernetes Event.
    Invalid(Box<(ObjectReference, InvalidObject)>),
}

/// How each watched kind becomes model changes.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: &'static str;
    fn key(&self) -> ObjectKey {
        ObjectKey::new(self.namespace().unwrap_or_default(), self.name_any())
    }
    /// A kind from a CRD that may not be installed: a 404 on its list means "no objects"
    /// (the view is current without them), not an outage.
    const OPTIONAL: bool = false;
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject>;
    fn delete(key: ObjectKey) -> Vec<Update>;
    /// What still goes to the compiler when the object is invalid.
    fn when_invalid(&self) -> Option<Update> {
        None
    }
}

impl Watched for SlimNamespace {
    const KIND: &'static str = "namespaces";
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        Namespace::from_k8s(&self.to_k8s()).map(|n| vec![Update::Model(Change::UpsertNamespace(n))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![Update::Model(Change::DeleteNamespace(key.name.to_string()))]
    }
}

impl Watched for SlimPod {
    const KIND: &'static str = "pods";
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        Pod::from_k8s(&self.to_k8s()).map(|p| vec![Update::Model(Change::UpsertPod(p))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![Update::Model(Change::DeletePod(key))]
    }
}

impl Watched for SlimNetworkPolicy {
    const KIND: &'static str = "networkpolicies";
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        // Validated here to report it; the compiler validates again and keeps the last
        // valid version of a policy whose update is invalid.
        let np = self.to_k8s();
        Policy::from_k8s(&np)?;
        Ok(vec![Update::Model(Change::UpsertPolicy(Box::new(np)))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![Update::Model(Change::DeletePolicy(key))]
    }
    /// The compiler keeps the last valid version of a policy whose update is invalid, and
    /// reports it as rejected.
    fn when_invalid(&self) -> Option<Update> {
        Some(Update::Model(Change::UpsertPolicy(Box::new(self.to_k8s()))))
    }
}

impl Watched for SlimClusterNetworkPolicy {
    const KIND: &'static str = "clusternetworkpolicies";
    const OPTIONAL: bool = true;
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        // Validated here to report it with a reference (an Event on the object).
        let cnp = self.to_model();
        ClusterPolicy::from_manifest(&cnp)?;
        Ok(vec![Update::Model(Change::UpsertClusterPolicy(Box::new(cnp)))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![Update::Model(Change::DeleteClusterPolicy(key.name.to_string()))]
    }
    /// As for NetworkPolicies: the compiler keeps the last valid version in force.
    fn when_invalid(&self) -> Option<Update> {
        Some(Update::Model(Change::UpsertClusterPolicy(Box::new(self.to_model()))))
    }
}

impl Watched for SlimNode {
    const KIND: &'static str = "nodes";
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        let node = self.to_k8s();
        let n = Node::from_k8s(&node)?;
        // Labels travel apart from the Node: ClusterNetworkPolicy `nodes` peers read them.
        let labels = policy_model::cnp::node_labels_from_k8s(&node);
        Ok(vec![Update::Model(Change::UpsertNodeLabels { node: n.name.clone(), labels }), Update::Model(Change::UpsertNode(n))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![
            Update::Model(Change::UpsertNodeLabels { node: key.name.to_string(), labels: Labels::default() }),
            Update::Model(Change::DeleteNode(key.name.to_string())),
        ]
    }
}

impl Watched for SlimService {
    const KIND: &'static str = "services";
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        Ok(vec![Update::Service(ServiceChange::from_service(&self.to_k8s()))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![Update::Service(ServiceChange::DeleteService(key))]
    }
}

impl Watched for SlimEndpointSlice {
    const KIND: &'static str = "endpointslices";
    fn upsert(&self) -> Result<Vec<Update>, InvalidObject> {
        // A slice that names no Service stands behind none.
        Ok(vec![Update::Service(ServiceChange::from_slice(&self.to_k8s()).unwrap_or_else(|| ServiceChange::DeleteSlice(self.key())))])
    }
    fn delete(key: ObjectKey) -> Vec<Update> {
        vec![Update::Service(ServiceChange::DeleteSlice(key))]
    }
}

/// Exponential retry delay with jitter: `RETRY_MIN` doubling up to `RETRY_MAX`, each
/// delay drawn uniformly from its upper half.
struct RetryDelay {
    next: Duration,
    rng: u64,
}

impl RetryDelay {
    fn new() -> RetryDelay {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new().build_hasher().finish() | 1;
        RetryDelay { next: RETRY_MIN, rng: seed }
    }

    fn reset(&mut self) {
        self.next = RETRY_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let d = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        d / 2 + d.mul_f64((self.rng % 1000) as f64 / 2000.0)
    }
}

/// Whether a watcher error is the server saying the watch's version is gone (410).
fn is_expired(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// Whether a watcher error says the resource does not exist on the server (404: its CRD
/// is not installed).
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 404,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

async fn watch<K: Watched>(api: Api<K>, config: watcher::Config, tx: mpsc::UnboundedSender<SourceMessage>) {
    let mut stream = watcher(api.clone(), config.clone()).boxed();
    let mut delay = RetryDelay::new();
    let mut status = WatchStatus::Listing;
    let set_status = |status: &mut WatchStatus, new: WatchStatus| {
        if *status != new {
            *status = new.clone();
            let _ = tx.send(SourceMessage::Status(K::KIND, new));
        }
    };
    // What the API holds now, and what a relist has shown so far.
    let mut known: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut relist: Option<BTreeSet<ObjectKey>> = None;
    // For an optional kind: whether its CRD is missing, and when to look again.
    let mut absent = false;
    let mut absent_delay = ABSENT_RETRY_MIN;
    let upsert = |obj: &K, tx: &mpsc::UnboundedSender<SourceMessage>| match obj.upsert() {
        Ok(changes) => {
            let _ = tx.send(SourceMessage::Changes(changes));
        }
        Err(error) => {
            // The report first: a drain that hands the compiler this change (which it
            // rejects) has the report too, never one without the other.
            let _ = tx.send(SourceMessage::Invalid(Box::new((obj.object_ref(&()), error))));
            if let Some(change) = obj.when_invalid() {
                let _ = tx.send(SourceMessage::Changes(vec![change]));
            }
        }
    };
    while let Some(ev) = stream.next().await {
        match ev {
            // Emitted before the list request: no proof that the API answers.
            Ok(Event::Init) => relist = Some(BTreeSet::new()),
            Ok(Event::InitApply(obj)) => {
                delay.reset();
                if matches!(status, WatchStatus::Failing(_)) {
                    set_status(&mut status, WatchStatus::Listing);
                }
                relist.get_or_insert_with(BTreeSet::new).insert(obj.key());
                upsert(&obj, &tx);
            }
            Ok(Event::InitDone) => {
                delay.reset();
                if absent {
                    info!(kind = K::KIND, "the resource is served now (its CRD was installed); enforcing it");
                    absent = false;
                    absent_delay = ABSENT_RETRY_MIN;
                }
                let seen = relist.take().unwrap_or_default();
                let gone: Vec<Update> = known.difference(&seen).cloned().flat_map(K::delete).collect();
                if !gone.is_empty() {
                    let _ = tx.send(SourceMessage::Changes(gone));
                }
                known = seen;
                let _ = tx.send(SourceMessage::Synced(K::KIND));
                set_status(&mut status, WatchStatus::Current);
            }
            Ok(Event::Apply(obj)) => {
                delay.reset();
                known.insert(obj.key());
                upsert(&obj, &tx);
            }
            Ok(Event::Delete(obj)) => {
                delay.reset();
                known.remove(&obj.key());
                let _ = tx.send(SourceMessage::Changes(K::delete(obj.key())));
            }
            Err(e) if is_expired(&e) => {
                // The API answered: its window no longer holds our version (after any
                // restart of it). The watcher relists on its next poll: at once.
                debug!(kind = K::KIND, error = %e, "watch expired; relisting");
                delay.reset();
                set_status(&mut status, WatchStatus::Listing);
                relist = None;
                stream = watcher(api.clone(), config.clone()).boxed();
            }
            Err(e) if K::OPTIONAL && is_not_found(&e) => {
                // The CRD is not installed (or was removed): there are no such objects,
                // which is a complete view, not an outage. Said once per absence.
                if !absent {
                    warn!(
                        kind = K::KIND,
                        "the resource is not served (CRD not installed); enforcing without it, and looking for it again with backoff"
                    );
                    absent = true;
                }
                delay.reset();
                relist = None;
                let gone: Vec<Update> = std::mem::take(&mut known).into_iter().flat_map(K::delete).collect();
                if !gone.is_empty() {
                    let _ = tx.send(SourceMessage::Changes(gone));
                }
                let _ = tx.send(SourceMessage::Synced(K::KIND));
                set_status(&mut status, WatchStatus::Current);
                let wait = absent_delay;
                absent_delay = (absent_delay * 2).min(ABSENT_RETRY_MAX);
                debug!(kind = K::KIND, retry_in = ?wait, "looking for the resource again later");
                stream = watcher(api.clone(), config.clone()).boxed();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tx.closed() => return,
                }
            }
            Err(e) => {
                let wait = delay.next_delay();
                debug!(kind = K::KIND, error = %e, retry_in = ?wait, "watch failed; retrying (the last known state stays enforced)");
                set_status(&mut status, WatchStatus::Failing(e.to_string()));
                relist = None;
                // Relist after the failure: only a full list proves the view is current.
                stream = watcher(api.clone(), config.clone()).boxed();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tx.closed() => return,
                }
            }
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
    status: BTreeMap<&'static str, WatchStatus>,
    /// Since when some watcher has been failing (an outage), if one is.
    outage: Option<Instant>,
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
    /// NetworkPolicies, ClusterNetworkPolicies (if their CRD is installed), every Node
    /// (ClusterNetworkPolicy `nodes` peers select Nodes by label), Services and
    /// EndpointSlices.
    pub fn start(client: Client) -> KubeSource {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = || watcher::Config::default().page_size(PAGE_SIZE);
        tokio::spawn(watch::<SlimNamespace>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<SlimPod>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<SlimNetworkPolicy>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<SlimClusterNetworkPolicy>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<SlimNode>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<SlimService>(Api::all(client.clone()), cfg(), tx.clone()));
        tokio::spawn(watch::<SlimEndpointSlice>(Api::all(client), cfg(), tx));
        KubeSource {
            rx,
            pending: Vec::new(),
            synced: BTreeSet::new(),
            status: WATCHED_KINDS.iter().map(|k| (*k, WatchStatus::Listing)).collect(),
            outage: None,
        }
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
                SourceMessage::Status(kind, status) => self.set_status(kind, status),
                SourceMessage::Invalid(invalid) => d.invalid.push(*invalid),
            }
        }
        d
    }

    /// One log line when an outage starts, one when it ends.
    fn set_status(&mut self, kind: &'static str, status: WatchStatus) {
        if let WatchStatus::Failing(error) = &status
            && self.outage.is_none()
        {
            warn!(kind, error = %error, "API unreachable; enforcing the last known state");
            self.outage = Some(Instant::now());
        }
        self.status.insert(kind, status);
        if let Some(since) = self.outage
            && !self.status.values().any(|s| matches!(s, WatchStatus::Failing(_)))
        {
            info!(outage_seconds = format!("{:.1}", since.elapsed().as_secs_f64()), "API reachable again");
            self.outage = None;
        }
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

    /// Whether the view may be incomplete or out of date (as of the last `drain`): some
    /// kind's first list is not in, or some watcher is failing or relisting (an API
    /// outage, or the relist after it). New pods may exist that the agent cannot know.
    pub fn blind(&self) -> bool {
        !self.synced() || self.status.values().any(|s| *s != WatchStatus::Current)
    }

    /// Each kind's watcher state (as of the last `drain`).
    pub fn status(&self) -> &BTreeMap<&'static str, WatchStatus> {
        &self.status
    }
}

/// API objects decoded down to what the model uses. Unknown fields (managedFields,
/// annotations, ownerReferences, status conditions, container specs...) are skipped by
/// the parser without being allocated. Each converts to the k8s-openapi type the model
/// reads, holding only those fields.
pub mod slim {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::discovery::v1 as discovery;
    use k8s_openapi::api::networking::v1 as net;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use policy_model::cnp::ClusterNetworkPolicy;
    use policy_model::cnp::types::ClusterNetworkPolicySpec;
    use serde::{Deserialize, Deserializer};

    /// The ClusterNetworkPolicy API the agent watches (network-policy-api v0.2.0).
    pub const CLUSTER_POLICY_GROUP: &str = "policy.networking.k8s.io";
    pub const CLUSTER_POLICY_VERSION: &str = "v1alpha2";

    /// `metadata` with name, namespace, uid, resourceVersion, labels and, of the
    /// annotations, only `policy-agent.io/enforcement` (audit mode).
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct Meta(pub ObjectMeta);

    /// Annotations, of which only [`policy_model::ENFORCEMENT_ANNOTATION`] is kept: the
    /// others (kubectl's last-applied-configuration doubles a policy) are skipped unread.
    struct EnforcementOnly(Option<BTreeMap<String, String>>);

    impl<'de> Deserialize<'de> for EnforcementOnly {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EnforcementOnly, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = EnforcementOnly;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a map of annotations")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<EnforcementOnly, A::Error> {
                    let mut out = None;
                    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                        if key == policy_model::ENFORCEMENT_ANNOTATION {
                            let value: String = map.next_value()?;
                            out = Some(BTreeMap::from([(key.into_owned(), value)]));
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(EnforcementOnly(out))
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for Meta {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Meta, D::Error> {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Fields {
                name: Option<String>,
                namespace: Option<String>,
                uid: Option<String>,
                resource_version: Option<String>,
                labels: Option<BTreeMap<String, String>>,
                annotations: Option<EnforcementOnly>,
            }
            let f = Fields::deserialize(d)?;
            Ok(Meta(ObjectMeta {
                name: f.name,
                namespace: f.namespace,
                uid: f.uid,
                resource_version: f.resource_version,
                labels: f.labels,
                annotations: f.annotations.and_then(|a| a.0),
                ..ObjectMeta::default()
            }))
        }
    }

    macro_rules! resource {
        ($ty:ident, $full:ty) => {
            impl kube::Resource for $ty {
                type DynamicType = ();
                type Scope = <$full as k8s_openapi::Resource>::Scope;
                fn kind(_: &()) -> Cow<'_, str> {
                    <$full as k8s_openapi::Resource>::KIND.into()
                }
                fn group(_: &()) -> Cow<'_, str> {
                    <$full as k8s_openapi::Resource>::GROUP.into()
                }
                fn version(_: &()) -> Cow<'_, str> {
                    <$full as k8s_openapi::Resource>::VERSION.into()
                }
                fn plural(_: &()) -> Cow<'_, str> {
                    <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
                }
                fn meta(&self) -> &ObjectMeta {
                    &self.metadata.0
                }
                fn meta_mut(&mut self) -> &mut ObjectMeta {
                    &mut self.metadata.0
                }
            }
        };
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimNamespace {
        #[serde(default)]
        pub metadata: Meta,
    }
    resource!(SlimNamespace, core::Namespace);

    impl SlimNamespace {
        pub fn to_k8s(&self) -> core::Namespace {
            core::Namespace { metadata: self.metadata.0.clone(), ..Default::default() }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimPod {
        #[serde(default)]
        pub metadata: Meta,
        pub spec: Option<PodSpec>,
        pub status: Option<PodStatus>,
    }
    resource!(SlimPod, core::Pod);

    #[derive(Debug, Clone, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodSpec {
        pub node_name: Option<String>,
        pub host_network: Option<bool>,
        pub containers: Option<Vec<Container>>,
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct Container {
        pub ports: Option<Vec<core::ContainerPort>>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodStatus {
        pub phase: Option<String>,
        #[serde(rename = "podIP")]
        pub pod_ip: Option<String>,
        #[serde(rename = "podIPs")]
        pub pod_ips: Option<Vec<core::PodIP>>,
    }

    impl SlimPod {
        pub fn to_k8s(&self) -> core::Pod {
            core::Pod {
                metadata: self.metadata.0.clone(),
                spec: self.spec.as_ref().map(|s| core::PodSpec {
                    node_name: s.node_name.clone(),
                    host_network: s.host_network,
                    containers: s
                        .containers
                        .iter()
                        .flatten()
                        .map(|c| core::Container { ports: c.ports.clone(), ..Default::default() })
                        .collect(),
                    ..Default::default()
                }),
                status: self.status.as_ref().map(|s| core::PodStatus {
                    phase: s.phase.clone(),
                    pod_ip: s.pod_ip.clone(),
                    pod_ips: s.pod_ips.clone(),
                    ..Default::default()
                }),
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimNetworkPolicy {
        #[serde(default)]
        pub metadata: Meta,
        pub spec: Option<net::NetworkPolicySpec>,
    }
    resource!(SlimNetworkPolicy, net::NetworkPolicy);

    impl SlimNetworkPolicy {
        /// Name, namespace, the enforcement annotation (audit mode), and the spec.
        pub fn to_k8s(&self) -> net::NetworkPolicy {
            net::NetworkPolicy {
                metadata: ObjectMeta {
                    name: self.metadata.0.name.clone(),
                    namespace: self.metadata.0.namespace.clone(),
                    annotations: self.metadata.0.annotations.clone(),
                    ..Default::default()
                },
                spec: self.spec.clone(),
            }
        }
    }

    /// A ClusterNetworkPolicy: name (and uid, for Events) and spec; status is skipped.
    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimClusterNetworkPolicy {
        #[serde(default)]
        pub metadata: Meta,
        #[serde(default)]
        pub spec: ClusterNetworkPolicySpec,
    }

    impl kube::Resource for SlimClusterNetworkPolicy {
        type DynamicType = ();
        type Scope = k8s_openapi::ClusterResourceScope;
        fn kind(_: &()) -> Cow<'_, str> {
            "ClusterNetworkPolicy".into()
        }
        fn group(_: &()) -> Cow<'_, str> {
            CLUSTER_POLICY_GROUP.into()
        }
        fn version(_: &()) -> Cow<'_, str> {
            CLUSTER_POLICY_VERSION.into()
        }
        fn plural(_: &()) -> Cow<'_, str> {
            "clusternetworkpolicies".into()
        }
        fn meta(&self) -> &ObjectMeta {
            &self.metadata.0
        }
        fn meta_mut(&mut self) -> &mut ObjectMeta {
            &mut self.metadata.0
        }
    }

    impl SlimClusterNetworkPolicy {
        /// Name and spec, as the model reads them.
        pub fn to_model(&self) -> ClusterNetworkPolicy {
            ClusterNetworkPolicy {
                api_version: Some(format!("{CLUSTER_POLICY_GROUP}/{CLUSTER_POLICY_VERSION}")),
                kind: Some("ClusterNetworkPolicy".into()),
                metadata: ObjectMeta { name: self.metadata.0.name.clone(), ..Default::default() },
                spec: self.spec.clone(),
                status: None,
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimNode {
        #[serde(default)]
        pub metadata: Meta,
        pub status: Option<NodeStatus>,
    }
    resource!(SlimNode, core::Node);

    #[derive(Debug, Clone, Deserialize)]
    pub struct NodeStatus {
        pub addresses: Option<Vec<core::NodeAddress>>,
    }

    impl SlimNode {
        pub fn to_k8s(&self) -> core::Node {
            core::Node {
                metadata: self.metadata.0.clone(),
                status: self.status.as_ref().map(|s| core::NodeStatus { addresses: s.addresses.clone(), ..Default::default() }),
                ..Default::default()
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimService {
        #[serde(default)]
        pub metadata: Meta,
        pub spec: Option<ServiceSpec>,
    }
    resource!(SlimService, core::Service);

    #[derive(Debug, Clone, Deserialize)]
    pub struct ServiceSpec {
        #[serde(rename = "clusterIP")]
        pub cluster_ip: Option<String>,
        #[serde(rename = "clusterIPs")]
        pub cluster_ips: Option<Vec<String>>,
    }

    impl SlimService {
        pub fn to_k8s(&self) -> core::Service {
            core::Service {
                metadata: self.metadata.0.clone(),
                spec: self.spec.as_ref().map(|s| core::ServiceSpec {
                    cluster_ip: s.cluster_ip.clone(),
                    cluster_ips: s.cluster_ips.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct SlimEndpointSlice {
        #[serde(default)]
        pub metadata: Meta,
        pub endpoints: Option<Vec<Endpoint>>,
    }
    resource!(SlimEndpointSlice, discovery::EndpointSlice);

    #[derive(Debug, Clone, Deserialize)]
    pub struct Endpoint {
        #[serde(default)]
        pub addresses: Vec<String>,
    }

    impl SlimEndpointSlice {
        pub fn to_k8s(&self) -> discovery::EndpointSlice {
            discovery::EndpointSlice {
                metadata: self.metadata.0.clone(),
                endpoints: self
                    .endpoints
                    .iter()
                    .flatten()
                    .map(|e| discovery::Endpoint { addresses: e.addresses.clone(), ..Default::default() })
                    .collect(),
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::slim::{SlimNamespace, SlimNetworkPolicy};

    /// Of the annotations, only the enforcement one is decoded (audit mode).
    #[test]
    fn only_the_enforcement_annotation_is_kept() {
        let ns: SlimNamespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "x", "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}", "policy-agent.io/enforcement": "audit"}}}))
        .unwrap();
        let want = BTreeMap::from([("policy-agent.io/enforcement".to_string(), "audit".to_string())]);
        assert_eq!(ns.metadata.0.annotations.as_ref(), Some(&want));
        assert!(policy_model::Namespace::from_k8s(&ns.to_k8s()).unwrap().enforcement.is_audit());
        let np: SlimNetworkPolicy = serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "x",
            "annotations": {"other": "1"}}, "spec": {"podSelector": {}}}))
        .unwrap();
        assert_eq!(np.metadata.0.annotations, None);
        // The annotation reaches the model (audit mode from the API).
        let np: SlimNetworkPolicy = serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "x",
            "annotations": {"other": "1", "policy-agent.io/enforcement": "audit"}}, "spec": {"podSelector": {}}}))
        .unwrap();
        assert!(policy_model::Policy::from_k8s(&np.to_k8s()).unwrap().enforcement.is_audit());
    }
}
