//! Tiered tables: the final decision per (peer prefix, protocol, port) is computed here, so
//! the datapath keeps its two lookups (LPM over peers, then the port set) whatever the
//! number of ClusterNetworkPolicies. A pod a ClusterNetworkPolicy applies to is always
//! isolated in the datapath's sense: the tiers' defaults become entries too.
//!
//! This module gathers an endpoint's layers and grants; `build` walks them.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use super::build::{Inputs, Layer, LocalGrant, build};
use super::cache::{RuleGrant, RuleKey, TierCache};
use super::eval::{applies, tier_policies};
use super::model::*;
use crate::compile::{exempt_grants, policy_grants};
use crate::ip::{Family, Prefix};
use crate::objects::{ObjectKey, Pod};
use crate::policy::{Direction, NamespaceScope, Peer, Policy};
use crate::ports::{PortRange, PortSet, Protocol};
use crate::state::ClusterState;
use crate::table::{Origin, PeerTable};
use crate::verdict::RuleRef;

/// The tiered table of `pod` for `direction`, or `None` when no ClusterNetworkPolicy
/// applies (NetworkPolicy alone decides then).
pub(crate) fn tiered_direction(state: &ClusterState, pod: &Pod, direction: Direction, cache: &mut TierCache) -> Option<PeerTable> {
    if !applies(state, pod, direction) {
        return None;
    }
    let tiers = tier_layers(state, pod, direction);
    let TierLayers { layers, rules, isolated_by, np_layer, np_policies } = tiers;
    // Each rule's grants, cached (merged below) or the endpoint's own.
    let mut cached: Vec<(RuleKey, usize, Arc<[RuleGrant]>)> = Vec::new();
    let mut own: Vec<(usize, Vec<RuleGrant>)> = Vec::new();
    for (layer, policy, i) in rules {
        match rule_grants_of(cache, state, pod, direction, policy, i) {
            Grants::Cached(key, grants) => cached.push((key, layer, grants)),
            Grants::Own(grants) => own.push((layer, grants)),
        }
    }
    let mut np_rules = Vec::new();
    let np_grants = policy_grants(state, pod, direction, &np_policies, &mut np_rules);
    let exempt = exempt_grants(state, pod);
    let mut local: Vec<LocalGrant> = Vec::with_capacity(exempt.len() + np_grants.len());
    // One reference per distinct port set: `build` recognises the grants that decide alike
    // by it (a NetworkPolicy rule gives each of its peer pods a copy of its ports).
    let mut canonical: HashMap<&PortSet, &PortSet> = HashMap::new();
    for (g, layer) in exempt.iter().map(|g| (g, 0)).chain(np_grants.iter().map(|g| (g, np_layer))) {
        let ports = *canonical.entry(&g.ports).or_insert(&g.ports);
        local.push(LocalGrant { cidr: g.cidr, except: &g.except, ports, origin: &g.origin, layer, np_rule: g.rule });
    }
    for (layer, grants) in &own {
        for g in grants {
            local.push(LocalGrant { cidr: g.prefix, except: &[], ports: &g.ports, origin: &g.origin[0], layer: *layer, np_rule: None });
        }
    }
    let merged_layers: Vec<usize> = cached.iter().map(|(_, layer, _)| *layer).collect();
    let lists: Vec<Arc<[RuleGrant]>> = cached.iter().map(|(_, _, g)| g.clone()).collect();
    let merged = cache.merged(cached.into_iter().map(|(key, _, _)| key).collect(), &lists);
    let inputs = Inputs { layers: &layers, local: &local, merged: &merged, merged_layers: &merged_layers, np_rules: &np_rules };
    let (entries, port_sets) = build(&inputs);
    Some(PeerTable { isolated: true, isolated_by, entries, port_sets })
}

/// An endpoint's layers in evaluation order (see `build`), with what each rule layer is.
pub(super) struct TierLayers<'a> {
    pub(super) layers: Vec<Layer>,
    /// The rule layers that decide: (layer, policy, rule index in the direction).
    pub(super) rules: Vec<(usize, &'a ClusterPolicy, usize)>,
    /// The CNPs (both tiers, deciding or not) and NetworkPolicies that apply.
    pub(super) isolated_by: Vec<ObjectKey>,
    pub(super) np_layer: usize,
    /// The NetworkPolicies isolating the pod in this direction.
    pub(super) np_policies: Vec<&'a Policy>,
}

/// The layers of `pod`'s tiered table in `direction`: the exemption, the Admin rules, the
/// NetworkPolicy tier, and the Baseline rules unless NetworkPolicies isolate the pod.
pub(super) fn tier_layers<'a>(state: &'a ClusterState, pod: &'a Pod, direction: Direction) -> TierLayers<'a> {
    let mut t =
        TierLayers { layers: vec![Layer::Exempt], rules: Vec::new(), isolated_by: Vec::new(), np_layer: 0, np_policies: Vec::new() };
    let add_tier = |tier: Tier, decides: bool, t: &mut TierLayers<'a>| {
        for policy in tier_policies(state, pod, direction, tier) {
            t.isolated_by.push(policy.key());
            if !decides {
                continue;
            }
            for (i, rule) in policy.rules(direction).iter().enumerate() {
                t.rules.push((t.layers.len(), policy, i));
                t.layers.push(Layer::Rule {
                    action: rule.effective_action(),
                    rule: RuleRef::cluster_rule(ClusterRuleRef::new(policy, direction, i)),
                });
            }
        }
    };
    add_tier(Tier::Admin, true, &mut t);
    t.np_policies = state.isolating_policies(pod, direction).collect();
    t.np_layer = t.layers.len();
    t.layers.push(Layer::NetworkPolicy { isolated: !t.np_policies.is_empty() });
    t.isolated_by.extend(t.np_policies.iter().map(|p| p.key.clone()));
    // NetworkPolicies that isolate the pod decide everything the Admin tier leaves: the
    // Baseline rules then decide nothing, and their grants (often every pod of the
    // cluster) need no walk.
    let decides = t.np_policies.is_empty();
    add_tier(Tier::Baseline, decides, &mut t);
    t
}

enum Grants {
    /// Shared by every endpoint the rule applies to.
    Cached(RuleKey, Arc<[RuleGrant]>),
    /// This endpoint's: ingress named ports resolve on the subject pod.
    Own(Vec<RuleGrant>),
}

/// The grants of rule `index` of `policy` in `direction`, from the cache when they do not
/// depend on the subject pod.
fn rule_grants_of(
    cache: &mut TierCache,
    state: &ClusterState,
    pod: &Pod,
    direction: Direction,
    policy: &ClusterPolicy,
    index: usize,
) -> Grants {
    let rule = &policy.rules(direction)[index];
    let per_subject = direction == Direction::Ingress && rule.protocols.iter().flatten().any(|p| matches!(p, ClusterPort::Named(_)));
    if per_subject {
        return Grants::Own(rule_grants(state, pod, direction, rule));
    }
    let key = (policy.name.clone(), direction, index);
    if let Some(grants) = cache.rule(&key) {
        return Grants::Cached(key, grants);
    }
    let mut grants = rule_grants(state, pod, direction, rule);
    // Sorted, the lists of an endpoint's rules merge in one pass.
    grants.sort_by_key(|g| g.prefix);
    let grants: Arc<[RuleGrant]> = grants.into();
    cache.insert_rule(key.clone(), rule, grants.clone());
    Grants::Cached(key, grants)
}

/// What one rule matches, as grants. `pod` matters only for
/// ingress named ports.
fn rule_grants(state: &ClusterState, pod: &Pod, direction: Direction, rule: &ClusterRule) -> Vec<RuleGrant> {
    let mut out = Vec::new();
    match rule.fail_closed {
        Some(FailClosed::MatchesNothing) => return out,
        Some(FailClosed::DenyAll) => {
            let all = Arc::new(PortSet::all());
            for f in [Family::Ipv4, Family::Ipv6] {
                out.push(RuleGrant::new(Prefix::everything(f), all.clone(), Origin::Everything));
            }
            return out;
        }
        None => {}
    }
    let (uniform, named) = rule_ports(pod, direction, rule);
    let uniform_shared = Arc::new(uniform.clone());
    // Per-peer port sets (egress named ports), one copy per distinct value.
    let mut shared: HashMap<PortSet, Arc<PortSet>> = HashMap::new();
    for peer in &rule.peers {
        let (namespaces, pods) = match peer {
            ClusterPeer::Namespaces(ns) => (ns.clone(), crate::labels::Selector::everything()),
            ClusterPeer::Pods { namespaces, pods } => (namespaces.clone(), pods.clone()),
            ClusterPeer::Networks(cidrs) => {
                if !uniform.is_empty() {
                    out.extend(cidrs.iter().map(|c| RuleGrant::new(*c, uniform_shared.clone(), Origin::Network { cidr: *c })));
                }
                continue;
            }
            ClusterPeer::Nodes(sel) => {
                if !uniform.is_empty() {
                    for name in state.node_names() {
                        if sel.matches(&state.node_labels(name)) {
                            for ip in state.node_addresses(name) {
                                out.push(RuleGrant::new(
                                    Prefix::host(ip),
                                    uniform_shared.clone(),
                                    Origin::SelectedNode { name: name.to_string() },
                                ));
                            }
                        }
                    }
                }
                continue;
            }
            ClusterPeer::DomainNames(_) | ClusterPeer::Unknown => continue,
        };
        let peer = Peer::Pods { namespaces: NamespaceScope::Matching(namespaces), pods };
        for peer_pod in state.peer_pods("", &peer) {
            let ports = if named.is_empty() {
                uniform_shared.clone()
            } else {
                let mut ports = uniform.clone();
                ports.union_with(&resolve(peer_pod, &named));
                shared.entry(ports).or_insert_with_key(|p| Arc::new(p.clone())).clone()
            };
            if ports.is_empty() {
                continue;
            }
            for ip in state.peer_ips(peer_pod) {
                out.push(RuleGrant::new(Prefix::host(ip), ports.clone(), Origin::Pod { pod: peer_pod.key.clone() }));
            }
        }
    }
    out
}

/// A rule's ports: those that mean the same for every peer, and the names that resolve on
/// each peer pod. Numbered ports mean the same for every peer; named ones resolve on the
/// destination pod: `pod` itself for ingress (so they join the first set), each peer pod
/// for egress.
pub(super) fn rule_ports<'r>(pod: &Pod, direction: Direction, rule: &'r ClusterRule) -> (PortSet, Vec<&'r str>) {
    let mut uniform = PortSet::empty();
    let mut named: Vec<&str> = Vec::new();
    match &rule.protocols {
        None => uniform = PortSet::all(),
        Some(ports) => {
            for p in ports {
                match p {
                    ClusterPort::Range(proto, r) => uniform.insert(*proto, *r),
                    ClusterPort::Named(name) => match direction {
                        Direction::Ingress => uniform.union_with(&resolve(pod, &[name])),
                        Direction::Egress => named.push(name),
                    },
                }
            }
        }
    }
    (uniform, named)
}

/// The ports `names` resolve to on `pod`, each with the protocol of its container port.
pub(super) fn resolve(pod: &Pod, names: &[&str]) -> PortSet {
    let mut set = PortSet::empty();
    for name in names {
        for proto in Protocol::ALL {
            if let Some(n) = pod.resolve_named_port(name, proto) {
                set.insert(proto, PortRange::single(n));
            }
        }
    }
    set
}
