//! Incremental compilation for one node: apply cluster changes, recompile only the local
//! endpoints whose tables can change, and report which did.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::cnp::TierCache;
use crate::cnp::{ClusterNetworkPolicy, ClusterPeer, ClusterPolicy, Tier};
use crate::compile::compile_direction;
use crate::error::InvalidObject;
use crate::labels::Labels;
use crate::objects::{Namespace, Node, ObjectKey, Pod};
use crate::policy::{Direction, NamespaceScope, Peer, Policy, PortSpec};
use crate::state::ClusterState;
use crate::table::{EndpointId, EndpointTables, same_audit_datapath};

mod dirty;
use dirty::{Dirs, Dirty, Work};

use crate::cnp::patch::{PeerPod, patch_peer_pods};

/// One change to the cluster, as a watch reports it.
#[derive(Debug, Clone)]
pub enum Change {
    UpsertNamespace(Namespace),
    DeleteNamespace(String),
    UpsertPod(Pod),
    DeletePod(ObjectKey),
    /// The raw object: the compiler validates it.
    UpsertPolicy(Box<NetworkPolicy>),
    DeletePolicy(ObjectKey),
    UpsertNode(Node),
    DeleteNode(String),
    /// A ClusterNetworkPolicy, raw: the compiler validates it.
    UpsertClusterPolicy(Box<ClusterNetworkPolicy>),
    /// A ClusterNetworkPolicy's name.
    DeleteClusterPolicy(String),
    /// A node's labels (`cnp::node_labels_from_k8s`), which ClusterNetworkPolicy `nodes`
    /// peers read; sent beside `UpsertNode` because [`Node`] has no labels.
    UpsertNodeLabels {
        node: String,
        labels: Labels,
    },
}

/// A ClusterNetworkPolicy accepted with peers this model cannot honour: they fail closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicyWarning {
    pub name: String,
    pub warnings: Vec<crate::error::FieldError>,
}

impl std::fmt::Display for ClusterPolicyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterNetworkPolicy {}: ", self.name)?;
        for (i, w) in self.warnings.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{w}")?;
        }
        Ok(())
    }
}

/// A local endpoint's compiled state.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub id: EndpointId,
    /// Bumped each time the tables change for the datapath; starts at 1.
    pub revision: u32,
    pub tables: EndpointTables,
    /// Policies that select this pod (either direction): changes to them, or to the pods
    /// and namespaces their peers select, may change the tables.
    policies: Vec<ObjectKey>,
}

/// What a batch of changes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeReport {
    /// Endpoints that appeared on this node.
    pub added: Vec<ObjectKey>,
    /// Endpoints whose tables changed for the datapath (revision bumped).
    pub changed: Vec<ObjectKey>,
    /// Endpoints that left this node, with the id they had.
    pub removed: Vec<(ObjectKey, EndpointId)>,
    /// Policies refused by validation in this batch. A refused update keeps the last valid
    /// version of the policy in force.
    pub rejected: Vec<InvalidObject>,
    /// Endpoints recompiled (for metrics: the work done).
    pub recompiled: usize,
    /// ClusterNetworkPolicies accepted in this batch with peers that fail closed (for logs
    /// and Events).
    pub cluster_policy_warnings: Vec<ClusterPolicyWarning>,
    /// NetworkPolicies and Namespaces upserted in this batch whose
    /// `policy-agent.io/enforcement` annotation is neither `audit` nor `enforce`: their
    /// policies are enforced (fail closed).
    pub annotation_errors: Vec<InvalidObject>,
}

impl ChangeReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty() && self.rejected.is_empty()
    }
}

/// The compiled state of every local endpoint of one node.
#[derive(Debug, Clone)]
pub struct NodeCompiler {
    node: String,
    state: ClusterState,
    endpoints: BTreeMap<ObjectKey, Endpoint>,
    /// Policy → local endpoints it selects.
    policy_users: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    free_ids: BTreeSet<EndpointId>,
    next_id: EndpointId,
    /// Policies currently refused, by key (ClusterNetworkPolicies with an empty namespace).
    rejected: BTreeMap<ObjectKey, InvalidObject>,
    /// What each ClusterNetworkPolicy rule matches, kept across batches (see [`TierCache`]).
    tier_cache: TierCache,
}

impl NodeCompiler {
    pub fn new(node: impl Into<String>) -> NodeCompiler {
        NodeCompiler {
            node: node.into(),
            state: ClusterState::new(),
            endpoints: BTreeMap::new(),
            policy_users: HashMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 1,
            rejected: BTreeMap::new(),
            tier_cache: TierCache::default(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    pub fn endpoint(&self, pod: &ObjectKey) -> Option<&Endpoint> {
        self.endpoints.get(pod)
    }

    /// Policies refused by validation and not since fixed or deleted.
    pub fn rejected(&self) -> impl Iterator<Item = &InvalidObject> {
        self.rejected.values()
    }

    fn is_local(&self, pod: &Pod) -> bool {
        !pod.host_network && pod.node.as_deref() == Some(self.node.as_str())
    }

    /// Applies a batch of changes and recompiles what they may affect.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> ChangeReport {
        let mut report = ChangeReport::default();
        let mut dirty = Dirty::default();
        for change in changes {
            self.apply_one(change, &mut dirty, &mut report);
        }
        self.recompile(dirty, &mut report);
        report
    }

    fn apply_one(&mut self, change: Change, dirty: &mut Dirty, report: &mut ChangeReport) {
        if self.unchanged(&change) {
            return;
        }
        // ClusterNetworkPolicy dependencies. A ClusterNetworkPolicy change recompiles the
        // local pods its old and new versions select, in the directions they have rules
        // for (below). A pod change reaches every local subject when a cluster policy's
        // peers can see it (coarse: any peer). A namespace's labels reach its own local
        // pods (subjects select by namespace labels) and the subjects of the policies
        // whose peers match it differently; a node's addresses or labels the subjects of
        // the policies with `nodes` peers. NetworkPolicy changes only touch their own
        // targets (below).
        match &change {
            Change::UpsertPod(Pod { key, .. }) | Change::DeletePod(key) => {
                dirty.note_pod(key, self.state.pod(key).map(|p| p.ips.as_slice()).unwrap_or(&[]));
            }
            _ => {}
        }
        if self.state.cluster_policies().next().is_some() {
            match &change {
                Change::UpsertPolicy(_) | Change::DeletePolicy(_) | Change::UpsertClusterPolicy(_) | Change::DeleteClusterPolicy(_) => {}
                // Pods come and go all the time: only one whose change a cluster policy's
                // peers can see reaches their subjects (every local subject recompiled for
                // every pod change cost seconds with 100 policies and 10,000 pods).
                Change::UpsertPod(pod) => self.mark_pod_peer_of_cluster_policies(&pod.key, Some(pod), dirty),
                Change::DeletePod(key) => self.mark_pod_peer_of_cluster_policies(key, None, dirty),
                Change::UpsertNamespace(Namespace { name, labels, .. }) => {
                    let old = self.state.namespace_labels(name).into_owned();
                    self.mark_namespace_for_cluster_policies(name, &old, labels, dirty);
                }
                Change::DeleteNamespace(name) => {
                    let old = self.state.namespace_labels(name).into_owned();
                    let default = ClusterState::new().namespace_labels(name).into_owned();
                    self.mark_namespace_for_cluster_policies(name, &old, &default, dirty);
                }
                Change::UpsertNode(_) | Change::DeleteNode(_) | Change::UpsertNodeLabels { .. } => {
                    self.mark_cluster_policies_where(|rule| rule.peers.iter().any(|p| matches!(p, ClusterPeer::Nodes(_))), dirty);
                }
            }
        }
        self.forget_cached_rules(&change);
        match change {
            Change::UpsertClusterPolicy(cnp) => match ClusterPolicy::from_manifest(&cnp) {
                // Unchanged (a relist), and not rejected meanwhile: nothing to mark.
                Ok(policy) if self.state.cluster_policy(&policy.name) == Some(&policy) && !self.rejected.contains_key(&policy.key()) => {}
                Ok(policy) => {
                    let key = policy.key();
                    self.rejected.remove(&key);
                    if !policy.warnings.is_empty() {
                        report
                            .cluster_policy_warnings
                            .push(ClusterPolicyWarning { name: policy.name.clone(), warnings: policy.warnings.clone() });
                    }
                    if let Some(old) = self.state.cluster_policy(&policy.name) {
                        self.mark_cluster_policy_subjects(old, dirty);
                    }
                    self.mark_cluster_policy_subjects(&policy, dirty);
                    self.state.upsert_cluster_policy(policy);
                }
                Err(invalid) => {
                    self.rejected.insert(invalid.key.clone(), invalid.clone());
                    report.rejected.push(invalid);
                }
            },
            Change::DeleteClusterPolicy(name) => {
                self.rejected.remove(&ObjectKey::new("", &name));
                if let Some(old) = self.state.remove_cluster_policy(&name) {
                    self.mark_cluster_policy_subjects(&old, dirty);
                }
            }
            Change::UpsertNodeLabels { node, labels } => {
                self.state.set_node_labels(&node, labels);
            }
            Change::UpsertNamespace(ns) => {
                let old = self.state.namespace_labels(&ns.name).into_owned();
                self.mark_namespace_peers(&ns.name, &old, &ns.labels, dirty);
                report.annotation_errors.extend(ns.enforcement.error("Namespace", &ObjectKey::new("", &ns.name)));
                self.mark_namespace_audit(&ns.name, ns.enforcement.is_audit(), dirty);
                self.state.upsert_namespace(ns);
            }
            Change::DeleteNamespace(name) => {
                self.mark_namespace_audit(&name, false, dirty);
                let old = self.state.namespace_labels(&name).into_owned();
                // Pods of a deleted namespace are deleted on their own; until then they keep
                // the labels every namespace has.
                let default = ClusterState::new().namespace_labels(&name).into_owned();
                self.mark_namespace_peers(&name, &old, &default, dirty);
                self.state.remove_namespace(&name);
            }
            Change::UpsertPod(pod) => {
                let old = self.state.pod(&pod.key).cloned();
                // Each version's own users once (a pod and the holder of its addresses
                // are usually the same pod: walking every policy in use twice for it was
                // most of the cost of an upsert).
                let versions: Vec<&Pod> = old.iter().chain([&pod]).collect();
                if let Some(old) = &old {
                    self.mark_pod_except(old, &versions, dirty);
                }
                self.mark_pod_except(&pod, &versions, dirty);
                let ips: Vec<IpAddr> = pod.ips.iter().chain(old.iter().flat_map(|o| o.ips.iter())).copied().collect();
                let key = pod.key.clone();
                self.state.upsert_pod(pod);
                // Ownership of shared addresses may have moved, to or from this pod.
                let now = self.state.pod(&key).cloned();
                let versions: Vec<&Pod> = old.iter().chain(now.iter()).collect();
                self.mark_address_holders_except(&ips, &versions, dirty);
            }
            Change::DeletePod(key) => {
                if let Some(old) = self.state.pod(&key).cloned() {
                    self.mark_pod(Some(&old), dirty);
                    self.state.remove_pod(&key);
                    self.mark_address_holders(&old.ips, dirty);
                }
            }
            Change::UpsertPolicy(np) => match Policy::from_k8s(&np) {
                // Unchanged (a relist), and not rejected meanwhile: nothing to mark.
                Ok(policy) if self.state.policy(&policy.key) == Some(&policy) && !self.rejected.contains_key(&policy.key) => {}
                Ok(policy) => {
                    self.rejected.remove(&policy.key);
                    report.annotation_errors.extend(policy.enforcement.error("NetworkPolicy", &policy.key));
                    if let Some(old) = self.state.policy(&policy.key).cloned() {
                        self.mark_policy_targets(&old, dirty);
                    }
                    self.mark_policy_targets(&policy, dirty);
                    self.state.upsert_policy(policy);
                }
                Err(invalid) => {
                    self.rejected.insert(invalid.key.clone(), invalid.clone());
                    report.rejected.push(invalid);
                }
            },
            Change::DeletePolicy(key) => {
                self.rejected.remove(&key);
                if let Some(old) = self.state.remove_policy(&key) {
                    self.mark_policy_targets(&old, dirty);
                }
            }
            Change::UpsertNode(node) => {
                if node.name == self.node {
                    dirty.extend(self.endpoints.keys().cloned());
                }
                let old_addresses = self.state.node(&node.name).map(|n| n.addresses.clone()).unwrap_or_default();
                self.state.upsert_node(node.clone());
                self.mark_address_holders(&old_addresses, dirty);
                self.mark_address_holders(&node.addresses, dirty);
            }
            Change::DeleteNode(name) => {
                if name == self.node {
                    dirty.extend(self.endpoints.keys().cloned());
                }
                if let Some(old) = self.state.remove_node(&name) {
                    self.mark_address_holders(&old.addresses, dirty);
                }
            }
        }
    }

    /// Before `change` reaches the state: drop the cached rule grants it can change.
    fn forget_cached_rules(&mut self, change: &Change) {
        let cache = &mut self.tier_cache;
        match change {
            Change::UpsertPolicy(_) | Change::DeletePolicy(_) => {}
            Change::UpsertClusterPolicy(cnp) => cache.forget_policy(cnp.metadata.name.as_deref().unwrap_or_default()),
            Change::DeleteClusterPolicy(name) => cache.forget_policy(name),
            Change::UpsertNamespace(ns) => {
                cache.forget_namespace_peers(&self.state, &self.state.namespace_labels(&ns.name), &ns.labels);
            }
            Change::DeleteNamespace(name) => {
                let default = ClusterState::new().namespace_labels(name).into_owned();
                cache.forget_namespace_peers(&self.state, &self.state.namespace_labels(name), &default);
            }
            Change::UpsertNode(_) | Change::DeleteNode(_) | Change::UpsertNodeLabels { .. } => cache.forget_node_peers(),
            Change::UpsertPod(pod) => cache.forget_pod(&self.state, self.state.pod(&pod.key), Some(pod)),
            Change::DeletePod(key) => cache.forget_pod(&self.state, self.state.pod(key), None),
        }
    }

    /// A pod's change (`old` → `new`, as the state holds them before it) reaches the
    /// subjects of a ClusterNetworkPolicy, in a rule's direction, when it can change what
    /// that rule's pod or namespace peers cover: which of them match it, the addresses of
    /// a pod they match (or of another pod at those addresses, whose ownership may move),
    /// or the named ports of a matched pod; or, near a node's addresses, what its `nodes`
    /// peers cover. A local subject's own change recompiles it anyway (`mark_pod`);
    /// `networks` peers are addresses, whoever holds them.
    fn mark_pod_change_for_cluster_policies(&self, old: Option<&Pod>, new: Option<&Pod>, dirty: &mut Dirty) {
        // A hostNetwork pod's addresses are its node's, and a pod at a node's address
        // takes it from the node: both change what a nodes peer covers.
        let versions = || old.into_iter().chain(new);
        let near_nodes = versions().any(|p| p.host_network || p.ips.iter().any(|ip| self.state.node_holds(*ip)));
        let old_ips = old.map(|p| p.ips.as_slice()).unwrap_or(&[]);
        let new_ips = new.map(|p| p.ips.as_slice()).unwrap_or(&[]);
        // Every holder, not only the owner: one behind the owner takes over when the
        // owner goes.
        // A pod turning hostNetwork keeps its addresses but stops holding them as a pod.
        let holders_change = old_ips != new_ips || old.map(|p| p.host_network) != new.map(|p| p.host_network);
        let other_holders: Vec<&Pod> = if holders_change {
            old_ips
                .iter()
                .chain(new_ips)
                .flat_map(|ip| self.state.pod_holders(*ip))
                .filter(|h| old.is_none_or(|o| o.key != h.key))
                .collect()
        } else {
            Vec::new()
        };
        let named_ports_changed = old.map(|p| &p.named_ports) != new.map(|p| &p.named_ports);
        let sees = |rule: &crate::cnp::ClusterRule| {
            if near_nodes && rule.peers.iter().any(|p| matches!(p, ClusterPeer::Nodes(_))) {
                return true;
            }
            let bits = |p: Option<&Pod>| p.map(|p| crate::cnp::pod_peer_bits(&self.state, rule, p)).unwrap_or_default();
            let (old_bits, new_bits) = (bits(old), bits(new));
            let old_any = old_bits.iter().any(|b| *b);
            let new_any = new_bits.iter().any(|b| *b);
            if old_any != new_any || (new_any && old_bits != new_bits) {
                return true;
            }
            if holders_change {
                return old_any
                    || new_any
                    || other_holders.iter().any(|h| crate::cnp::pod_peer_bits(&self.state, rule, h).iter().any(|b| *b));
            }
            new_any && named_ports_changed
        };
        self.mark_cluster_policies_where(sees, dirty);
    }

    /// A pod's change (`new`; `None`: deleted) as a peer of the cluster policies. When its
    /// addresses are its own, before and after (no other pod, no node holds them), what
    /// it reaches changes at those addresses only, and is marked to be patched there
    /// (`crate::cnp::patch`): a pod coming or going under a Baseline peer that covers
    /// every pod would otherwise rebuild every subject's table, one entry per pod.
    fn mark_pod_peer_of_cluster_policies(&self, key: &ObjectKey, new: Option<&Pod>, dirty: &mut Dirty) {
        let old = self.state.pod(key);
        let versions = || old.into_iter().chain(new);
        let own_addresses = versions().all(|p| !p.host_network)
            && versions().flat_map(|p| &p.ips).all(|ip| !self.state.node_holds(*ip) && self.state.pod_holders(*ip).all(|h| h.key == *key));
        if !own_addresses {
            self.mark_pod_change_for_cluster_policies(old, new, dirty);
            return;
        }
        let mut marks = Dirty::default();
        self.mark_pod_change_for_cluster_policies(old, new, &mut marks);
        dirty.mark_peer(key, marks);
    }

    /// A namespace's labels change from `old` to `new` (see `apply_one`).
    fn mark_namespace_for_cluster_policies(&self, namespace: &str, old: &Labels, new: &Labels, dirty: &mut Dirty) {
        if old == new {
            return;
        }
        dirty.extend(self.state.pods_in(namespace).filter(|p| self.is_local(p)).map(|p| p.key.clone()));
        // Pod and namespace peers cover pods: a namespace without any changes none.
        if self.state.pods_in(namespace).next().is_some() {
            self.mark_cluster_policies_where(|rule| namespace_peer_changes(rule, old, new), dirty);
        }
    }

    /// The local subjects of every ClusterNetworkPolicy with a rule that `reads`, in the
    /// directions of those rules: what its peers cover changed. Subjects are looked for
    /// among the local endpoints: a local pod without one yet is dirty already (its own
    /// upsert). A Baseline policy's rules decide nothing for a direction in which
    /// NetworkPolicies isolate the subject (they are not even walked then), so its peers
    /// do not reach that direction: a change to that isolation marks the pod itself.
    fn mark_cluster_policies_where(&self, reads: impl Fn(&crate::cnp::ClusterRule) -> bool, dirty: &mut Dirty) {
        for policy in self.state.cluster_policies() {
            let dirs = Dirs::of(|d| policy.rules(d).iter().any(&reads));
            if dirs == Dirs::default() {
                continue;
            }
            for key in self.endpoints.keys() {
                let Some(pod) = self.state.pod(key) else { continue };
                if !crate::cnp::eval::selects(&self.state, policy, pod) {
                    continue;
                }
                // Enforced view (that of `apply`): a pod isolated there is isolated in the
                // audit view too.
                let reached =
                    Dirs::of(|d| dirs.has(d) && !(policy.tier == Tier::Baseline && self.state.isolating_policies(pod, d).next().is_some()));
                dirty.mark(key.clone(), reached);
            }
        }
    }

    /// Whether `change` upserts an object exactly as the state holds it already. A relist
    /// (after every API outage) upserts every object of the cluster again, unchanged: each
    /// must cost a comparison, not a walk over every policy in use (10,000 pods and 2,000
    /// policies stalled the loop for 10 s). Policies are compared after validation, in
    /// [`Self::apply_one`].
    fn unchanged(&self, change: &Change) -> bool {
        match change {
            Change::UpsertPod(pod) => self.state.pod(&pod.key) == Some(pod),
            Change::UpsertNode(node) => self.state.node(&node.name) == Some(node),
            Change::UpsertNamespace(ns) => self.state.namespace(&ns.name) == Some(ns),
            Change::UpsertNodeLabels { node, labels } => *self.state.node_labels(node) == *labels,
            _ => false,
        }
    }

    /// A namespace's audit annotation changes to `audit`: its local pods' tables (and
    /// audit tables) may change, since its policies only select its own pods.
    fn mark_namespace_audit(&self, namespace: &str, audit: bool, dirty: &mut Dirty) {
        let was = self.state.namespace(namespace).is_some_and(|ns| ns.enforcement.is_audit());
        if was != audit {
            dirty.extend(self.state.pods_in(namespace).filter(|p| self.is_local(p)).map(|p| p.key.clone()));
        }
    }

    /// Sets whether the node audits every policy (NetworkPolicies and
    /// ClusterNetworkPolicies; [`crate::audit`]) and recompiles what that changes.
    pub fn set_audit_all(&mut self, on: bool) -> ChangeReport {
        let mut report = ChangeReport::default();
        if self.state.audit_all() == on {
            return report;
        }
        self.state.set_audit_all(on);
        let mut dirty = Dirty::default();
        dirty.extend(self.endpoints.keys().cloned());
        self.recompile(dirty, &mut report);
        report
    }

    /// Local pods a ClusterNetworkPolicy selects, in the directions it has rules for.
    /// Only the endpoints are walked, not the cluster's pods: a local pod that is not an
    /// endpoint yet came in this batch, and its own change marked it in both directions.
    fn mark_cluster_policy_subjects(&self, policy: &ClusterPolicy, dirty: &mut Dirty) {
        let dirs = Dirs::of(|d| !policy.rules(d).is_empty());
        for key in self.endpoints.keys() {
            if let Some(pod) = self.state.pod(key).filter(|p| self.is_local(p))
                && crate::cnp::eval::selects(&self.state, policy, pod)
            {
                dirty.mark(key.clone(), dirs);
            }
        }
    }

    /// Local pods a policy selects, and those it selected, in its directions.
    fn mark_policy_targets(&self, policy: &Policy, dirty: &mut Dirty) {
        let dirs = Dirs::of(|d| policy.rules(d).is_some());
        for pod in self.state.pods_in(&policy.key.namespace) {
            if self.is_local(pod) && self.state.selects(policy, pod) {
                dirty.mark(pod.key.clone(), dirs);
            }
        }
        for user in self.policy_users.get(&policy.key).into_iter().flatten() {
            dirty.mark(user.clone(), dirs);
        }
    }

    /// Endpoints whose tables may depend on `pod` (as it is now in the state, or `pod`).
    fn mark_pod(&self, pod: Option<&Pod>, dirty: &mut Dirty) {
        if let Some(pod) = pod {
            self.mark_pod_except(pod, &[pod], dirty);
        }
    }

    /// As [`Self::mark_pod`]; holders of its addresses equal to one of `marked` are not
    /// walked again (`marked` includes `pod`, or the caller walks it).
    fn mark_pod_except(&self, pod: &Pod, marked: &[&Pod], dirty: &mut Dirty) {
        // A pod wins an address over a node: a pod at this node's address takes it from
        // (or gives it back to) every local endpoint's own-node entries.
        if !pod.host_network && pod.ips.iter().any(|ip| self.state.node_claims(*ip, &self.node)) {
            dirty.extend(self.endpoints.keys().cloned());
        }
        if pod.node.as_deref() == Some(self.node.as_str()) {
            dirty.insert(pod.key.clone());
            if pod.host_network {
                // Its addresses are this node's: every local endpoint admits them.
                dirty.extend(self.endpoints.keys().cloned());
            }
        }
        if !pod.host_network {
            self.mark_peer_users(pod, dirty);
        }
        self.mark_address_holders_except(&pod.ips, marked, dirty);
    }

    /// Endpoints using a policy whose peers may cover `pod`. This walks every policy in
    /// use on the node: the one cost every pod upsert pays, so callers avoid repeats.
    fn mark_peer_users(&self, pod: &Pod, dirty: &mut Dirty) {
        for (policy_key, users) in &self.policy_users {
            if let Some(policy) = self.state.policy(policy_key) {
                if policy_depends_on_pod(&self.state, policy, pod) {
                    dirty.extend(users.iter().cloned());
                }
            }
        }
    }

    /// Other pods claiming the same addresses: ownership may move between them.
    fn mark_address_holders(&self, ips: &[IpAddr], dirty: &mut Dirty) {
        self.mark_address_holders_except(ips, &[], dirty)
    }

    /// As [`Self::mark_address_holders`], skipping the peers' walk for a holder equal to
    /// one of `marked` (their users are marked already).
    fn mark_address_holders_except(&self, ips: &[IpAddr], marked: &[&Pod], dirty: &mut Dirty) {
        let mut walked: Vec<&ObjectKey> = Vec::new();
        for ip in ips {
            if let Some(holder) = self.state.pod_at(*ip) {
                if holder.node.as_deref() == Some(self.node.as_str()) {
                    dirty.insert(holder.key.clone());
                }
                // A dual-stack pod holds both its addresses: walk once.
                if marked.contains(&holder) || walked.contains(&&holder.key) {
                    continue;
                }
                walked.push(&holder.key);
                self.mark_peer_users(holder, dirty);
            }
        }
    }

    fn mark_namespace_peers(&self, namespace: &str, old: &crate::labels::Labels, new: &crate::labels::Labels, dirty: &mut Dirty) {
        if old == new {
            return;
        }
        for (policy_key, users) in &self.policy_users {
            let Some(policy) = self.state.policy(policy_key) else {
                continue;
            };
            let depends = all_peers(policy).any(|peer| match peer {
                Peer::Pods { namespaces: NamespaceScope::Matching(sel), .. } => sel.matches(old) != sel.matches(new),
                _ => false,
            });
            if depends && self.state.pods_in(namespace).next().is_some() {
                dirty.extend(users.iter().cloned());
            }
        }
    }

    fn recompile(&mut self, mut dirty: Dirty, report: &mut ChangeReport) {
        if dirty.is_empty() {
            return;
        }
        let node_addresses = self.state.node_addresses(&self.node);
        for (key, work) in dirty.work() {
            let pod = self.state.pod(&key).filter(|p| self.is_local(p)).cloned();
            let Some(pod) = pod else {
                if let Some(old) = self.endpoints.remove(&key) {
                    self.forget_users(&key, &old.policies);
                    self.free_ids.insert(old.id);
                    report.removed.push((key, old.id));
                }
                continue;
            };
            report.recompiled += 1;
            let policies: Vec<ObjectKey> =
                self.state.policies_in(&pod.key.namespace).filter(|p| self.state.selects(p, &pod)).map(|p| p.key.clone()).collect();
            let old_policies = self.endpoints.get(&key).map(|e| e.policies.clone()).unwrap_or_default();
            self.forget_users(&key, &old_policies);
            for p in &policies {
                self.policy_users.entry(p.clone()).or_default().insert(key.clone());
            }
            match self.endpoints.get_mut(&key) {
                Some(ep) => {
                    let (patched, rebuild) = patch_tables(&self.state, &pod, &work, &dirty, &mut ep.tables);
                    if update_tables(&mut self.state, &mut self.tier_cache, &pod, &node_addresses, rebuild, &mut ep.tables) || patched {
                        ep.revision = ep.revision.wrapping_add(1).max(1);
                        report.changed.push(key.clone());
                    }
                    ep.policies = policies;
                }
                None => {
                    let mut tables = EndpointTables::empty(pod.key.clone());
                    update_tables(&mut self.state, &mut self.tier_cache, &pod, &node_addresses, Dirs::BOTH, &mut tables);
                    let id = self.free_ids.pop_first().unwrap_or_else(|| {
                        self.next_id += 1;
                        self.next_id - 1
                    });
                    self.endpoints.insert(key.clone(), Endpoint { id, revision: 1, tables, policies });
                    report.added.push(key);
                }
            }
        }
    }

    fn forget_users(&mut self, endpoint: &ObjectKey, policies: &[ObjectKey]) {
        for p in policies {
            if let Some(users) = self.policy_users.get_mut(p) {
                users.remove(endpoint);
                if users.is_empty() {
                    self.policy_users.remove(p);
                }
            }
        }
    }
}

/// Patches the `work.patch` tables of `pod` at the addresses of `work.pods`, where no
/// audited policy applies (its audit table would need a rebuild too). Returns whether the
/// datapath's view changed, and the directions to rebuild: `work.rebuild` and those that
/// could not be patched.
fn patch_tables(state: &ClusterState, pod: &Pod, work: &Work, dirty: &Dirty, tables: &mut EndpointTables) -> (bool, Dirs) {
    let mut rebuild = work.rebuild;
    let mut changed = false;
    if work.patch.is_empty() {
        return (false, rebuild);
    }
    let addresses: Vec<Vec<IpAddr>> = work
        .pods
        .iter()
        .map(|p| {
            let mut a = dirty.before(p).to_vec();
            a.extend(state.pod(p).into_iter().flat_map(|p| p.ips.iter().copied()));
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect();
    let peers: Vec<PeerPod> = work.pods.iter().zip(&addresses).map(|(key, a)| PeerPod { key, addresses: a }).collect();
    for direction in work.patch.iter() {
        let patched = if tables.audit.get(direction).is_none() && crate::audit::audited_for(state, pod, direction).is_empty() {
            patch_peer_pods(state, pod, direction, tables.table_mut(direction), &peers)
        } else {
            None
        };
        match patched {
            Some(c) => changed |= c,
            None => rebuild = rebuild.union(Dirs::of(|d| d == direction)),
        }
    }
    (changed, rebuild)
}

/// Recompiles the `dirs` tables of `pod` (enforced and audit) into `tables`, keeping the
/// others; whether anything the datapath sees changed.
fn update_tables(
    state: &mut ClusterState,
    cache: &mut TierCache,
    pod: &Pod,
    node_addresses: &BTreeSet<IpAddr>,
    dirs: Dirs,
    tables: &mut EndpointTables,
) -> bool {
    let addresses: Vec<IpAddr> = state.owned_ips(pod).collect();
    let mut changed = addresses != tables.addresses;
    tables.addresses = addresses;
    for direction in dirs.iter() {
        let table = compile_direction(state, pod, direction, node_addresses, cache);
        // The cache holds what rules match, whatever the view.
        let audit = crate::audit::compile_audit_direction(state, pod, direction, node_addresses, &table, cache);
        changed |= !table.same_datapath(tables.table(direction)) || !same_audit_datapath(audit.as_ref(), tables.audit.get(direction));
        *tables.table_mut(direction) = table;
        *tables.audit.get_mut(direction) = audit;
    }
    changed
}

/// Whether a pod or namespace peer of `rule` matches a namespace labelled `old` and one
/// labelled `new` differently.
pub(crate) fn namespace_peer_changes(rule: &crate::cnp::ClusterRule, old: &Labels, new: &Labels) -> bool {
    rule.peers.iter().any(|p| match p {
        ClusterPeer::Namespaces(sel) | ClusterPeer::Pods { namespaces: sel, .. } => sel.matches(old) != sel.matches(new),
        _ => false,
    })
}

fn all_peers(policy: &Policy) -> impl Iterator<Item = &Peer> {
    Direction::BOTH.into_iter().filter_map(|d| policy.rules(d)).flatten().filter_map(|r| r.peers.as_ref()).flatten()
}

/// Whether `policy`'s tables can change when `pod` (a non-hostNetwork pod) appears, goes
/// or changes: it is a pod peer of a rule, or a destination that an egress rule's named
/// ports resolve on.
fn policy_depends_on_pod(state: &ClusterState, policy: &Policy, pod: &Pod) -> bool {
    let ns = &policy.key.namespace;
    let pod_peer = all_peers(policy).any(|peer| match peer {
        Peer::Pods { namespaces, pods } => state.pod_peer_matches(ns, namespaces, pods, pod),
        Peer::Block(_) => false,
    });
    if pod_peer {
        return true;
    }
    policy.egress.iter().flatten().any(|rule| {
        let named = rule.ports.iter().flatten().any(|p| matches!(p, PortSpec::Named(..)));
        named
            && match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|peer| matches!(peer, Peer::Block(b) if pod.ips.iter().any(|ip| b.contains(*ip)))),
            }
    })
}
