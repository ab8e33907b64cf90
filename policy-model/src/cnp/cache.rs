//! What ClusterNetworkPolicy rules match, kept across compiles: see [`TierCache`].

use std::collections::BTreeSet;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use super::model::*;
use crate::ip::Prefix;
use crate::objects::Pod;
use crate::policy::Direction;
use crate::ports::PortSet;
use crate::state::ClusterState;
use crate::table::Origin;

/// One address range a rule matches, with the ports. Ports are shared (`Arc`) by the grants
/// of a rule that allow the same ports, which lets a merge recognise equal ones by pointer;
/// the origin is the shared provenance list of an entry that the grant alone stands for.
pub(super) struct RuleGrant {
    pub(super) prefix: Prefix,
    pub(super) ports: Arc<PortSet>,
    pub(super) origin: Arc<[Origin]>,
}

impl RuleGrant {
    pub(super) fn new(prefix: Prefix, ports: Arc<PortSet>, origin: Origin) -> RuleGrant {
        RuleGrant { prefix, ports, origin: Origin::shared(&[origin]) }
    }
}

/// A rule of a ClusterNetworkPolicy: policy name, direction, index in that direction.
pub(super) type RuleKey = (String, Direction, usize);

/// What each ClusterNetworkPolicy rule matches, and the merged lists of the rule sets that
/// endpoints use, computed once and shared by every endpoint and compile. A rule's pod
/// peers can cover every pod of the cluster (a Baseline default-deny): finding their
/// 10,000 addresses again, and sorting them with the other rules' for each endpoint, was
/// most of the cost of a tiered compile.
///
/// Valid for the [`ClusterState`] it was filled from: a fresh cache per compile is always
/// right; [`crate::NodeCompiler`] keeps one and calls the `forget_*` methods before each
/// change to the state.
#[derive(Default, Clone)]
pub struct TierCache {
    rules: HashMap<RuleKey, CachedRule>,
    /// By the rules merged, in layer order.
    merged: HashMap<Vec<RuleKey>, Arc<Merged>>,
}

#[derive(Clone)]
struct CachedRule {
    grants: Arc<[RuleGrant]>,
    /// The rule has pod or namespace peers: pods and namespaces change its grants.
    pod_peers: bool,
    /// The rule has nodes peers: nodes, their labels and hostNetwork pods change them.
    node_peers: bool,
}

/// The grants of several rules, by prefix: one item per distinct prefix, sorted (a
/// pre-order of the prefix tree).
pub(super) struct Merged {
    pub(super) items: Vec<MergedItem>,
    /// Per class, the grants starting at an item of that class: (position of the rule in
    /// the merged list, ports). Most pods of a namespace share one class.
    pub(super) classes: Vec<Vec<(usize, Arc<PortSet>)>>,
}

pub(super) struct MergedItem {
    pub(super) prefix: Prefix,
    pub(super) class: u32,
    /// What the grants at this prefix stand for (usually one pod).
    pub(super) origins: Arc<[Origin]>,
}

impl std::fmt::Debug for TierCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TierCache({} rules, {} merged)", self.rules.len(), self.merged.len())
    }
}

impl TierCache {
    pub(super) fn rule(&self, key: &RuleKey) -> Option<Arc<[RuleGrant]>> {
        self.rules.get(key).map(|r| r.grants.clone())
    }

    pub(super) fn insert_rule(&mut self, key: RuleKey, rule: &ClusterRule, grants: Arc<[RuleGrant]>) {
        let pod_peers = rule.peers.iter().any(|p| matches!(p, ClusterPeer::Namespaces(_) | ClusterPeer::Pods { .. }));
        let node_peers = rule.peers.iter().any(|p| matches!(p, ClusterPeer::Nodes(_)));
        self.rules.insert(key, CachedRule { grants, pod_peers, node_peers });
    }

    /// The merged list of `keys` (cached rules, in layer order; `lists` are their grants).
    pub(super) fn merged(&mut self, keys: Vec<RuleKey>, lists: &[Arc<[RuleGrant]>]) -> Arc<Merged> {
        if let Some(m) = self.merged.get(&keys) {
            return m.clone();
        }
        let m = Arc::new(merge(lists));
        self.merged.insert(keys, m.clone());
        m
    }

    /// Before a ClusterNetworkPolicy named `name` changes or goes.
    pub fn forget_policy(&mut self, name: &str) {
        self.forget(|(n, _, _), _| n == name);
    }

    /// Before a namespace's labels change from `old` to `new`: the rules whose pod or
    /// namespace peers match it differently.
    pub fn forget_namespace_peers(&mut self, state: &ClusterState, old: &crate::labels::Labels, new: &crate::labels::Labels) {
        if old == new {
            return;
        }
        self.forget(|(name, direction, index), cached| {
            cached.pod_peers
                && state
                    .cluster_policy(name)
                    .and_then(|p| p.rules(*direction).get(*index))
                    .is_none_or(|rule| crate::incremental::namespace_peer_changes(rule, old, new))
        });
    }

    /// Before a Node, its addresses or its labels change.
    pub fn forget_node_peers(&mut self) {
        self.forget(|_, r| r.node_peers);
    }

    /// Before pod `old` becomes `new` (an upsert; `None` for a new or deleted pod), with
    /// `state` still as it was: forget the rules whose grants this can change.
    pub fn forget_pod(&mut self, state: &ClusterState, old: Option<&Pod>, new: Option<&Pod>) {
        if self.rules.is_empty() {
            return;
        }
        let ips = |p: Option<&Pod>| p.map(|p| p.ips.clone()).unwrap_or_default();
        let (old_ips, new_ips) = (ips(old), ips(new));
        // Addresses a node holds, and hostNetwork pods, make up the nodes peers' addresses.
        let touches_nodes = old.is_some_and(|p| p.host_network)
            || new.is_some_and(|p| p.host_network)
            || old_ips.iter().chain(&new_ips).any(|ip| state.node_holds(*ip));
        // Other pods at these addresses: ownership may move to or from them.
        // (A pod turning hostNetwork keeps its addresses but stops holding them as a pod.)
        let others: Vec<&Pod> = if old_ips != new_ips || old.map(|p| p.host_network) != new.map(|p| p.host_network) {
            old_ips.iter().chain(&new_ips).flat_map(|ip| state.pod_holders(*ip)).filter(|h| old.is_none_or(|o| h.key != o.key)).collect()
        } else {
            Vec::new()
        };
        self.forget(|(name, direction, index), cached| {
            if cached.node_peers && touches_nodes {
                return true;
            }
            if !cached.pod_peers {
                return false;
            }
            let Some(rule) = state.cluster_policy(name).and_then(|p| p.rules(*direction).get(*index)) else {
                return true;
            };
            let bits = |p: Option<&Pod>| p.map(|p| pod_peer_bits(state, rule, p)).unwrap_or_default();
            let (old_bits, new_bits) = (bits(old), bits(new));
            let matched = old_bits.iter().chain(&new_bits).any(|b| *b);
            let same_pod = old_bits == new_bits && old_ips == new_ips && old.map(|p| &p.named_ports) == new.map(|p| &p.named_ports);
            let moved = others.iter().any(|h| pod_peer_bits(state, rule, h).iter().any(|b| *b));
            (matched && !same_pod) || moved
        });
    }

    /// Drops the rules `stale` picks, and the merged lists that hold any of them.
    fn forget(&mut self, mut stale: impl FnMut(&RuleKey, &CachedRule) -> bool) {
        let before = self.rules.len();
        self.rules.retain(|k, r| !stale(k, r));
        if self.rules.len() != before {
            let rules = &self.rules;
            self.merged.retain(|keys, _| keys.iter().all(|k| rules.contains_key(k)));
        }
    }
}

/// For each pod or namespace peer of `rule`, whether it matches `pod`.
pub(crate) fn pod_peer_bits(state: &ClusterState, rule: &ClusterRule, pod: &Pod) -> Vec<bool> {
    let everything = crate::labels::Selector::everything();
    rule.peers
        .iter()
        .filter_map(|peer| match peer {
            ClusterPeer::Namespaces(ns) => Some(super::eval::pod_peer_matches(state, ns, &everything, pod)),
            ClusterPeer::Pods { namespaces, pods } => Some(super::eval::pod_peer_matches(state, namespaces, pods, pod)),
            _ => None,
        })
        .collect()
}

/// Merges rule grant lists (each sorted by prefix) into one item per prefix.
fn merge(lists: &[Arc<[RuleGrant]>]) -> Merged {
    let mut all: Vec<(Prefix, usize, usize)> =
        lists.iter().enumerate().flat_map(|(pos, l)| l.iter().enumerate().map(move |(i, g)| (g.prefix, pos, i))).collect();
    // The lists are sorted runs: a stable sort merges them.
    all.sort();
    let mut items = Vec::new();
    let mut classes: Vec<Vec<(usize, Arc<PortSet>)>> = Vec::new();
    let mut class_of: HashMap<Vec<(usize, usize)>, u32> = HashMap::new();
    for group in all.chunk_by(|a, b| a.0 == b.0) {
        let grant = |(_, pos, i): &(Prefix, usize, usize)| &lists[*pos][*i];
        let signature: Vec<(usize, usize)> = group.iter().map(|g| (g.1, Arc::as_ptr(&grant(g).ports) as usize)).collect();
        let class = *class_of.entry(signature).or_insert_with(|| {
            classes.push(group.iter().map(|g| (g.1, grant(g).ports.clone())).collect());
            (classes.len() - 1) as u32
        });
        let first = grant(&group[0]);
        let origins = if group.iter().all(|g| grant(g).origin == first.origin) {
            first.origin.clone()
        } else {
            let set: BTreeSet<&Origin> = group.iter().flat_map(|g| grant(g).origin.iter()).collect();
            Origin::shared(&set.into_iter().cloned().collect::<Vec<_>>())
        };
        items.push(MergedItem { prefix: group[0].0, class, origins });
    }
    items.shrink_to_fit();
    Merged { items, classes }
}
