//! Tiered tables: the final decision per (peer prefix, protocol, port) is computed here, so
//! the datapath keeps its two lookups (LPM over peers, then the port set) whatever the
//! number of ClusterNetworkPolicies.
//!
//! Every rule of every tier becomes a *layer* of grants (address set × ports), in
//! evaluation order: the exemptions (own address, own node), the Admin rules, the
//! NetworkPolicy tier, the Baseline rules. All prefixes bounding a grant go in one sorted
//! list, walked as a tree as in `crate::compile`; the grants covering a tree node cover
//! every address for which it is the longest match, so evaluating the layers there, port
//! range by port range, gives that region's exact decision. `0.0.0.0/0` and `::/0` are
//! always in the tree, so the tiers' defaults (default allow) become entries too: a pod a
//! ClusterNetworkPolicy applies to is always isolated in the datapath's sense.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::eval::{applies, tier_policies};
use super::model::*;
use crate::compile::{exempt_grants, policy_grants};
use crate::ip::{Family, Prefix};
use crate::objects::Pod;
use crate::policy::{Direction, NamespaceScope, Peer};
use crate::ports::{PortRange, PortSet, Protocol};
use crate::state::ClusterState;
use crate::table::{Origin, PeerEntry, PeerTable, PortSetId};
use crate::verdict::RuleRef;

enum Layer {
    /// Always accepted (the pod's own addresses; ingress from its node).
    Exempt,
    /// One ClusterNetworkPolicy rule.
    Rule { action: Action, rule: RuleRef },
    /// The NetworkPolicy tier: decides everything left when `isolated`.
    NetworkPolicy { isolated: bool },
}

struct TGrant {
    cidr: Prefix,
    except: Vec<Prefix>,
    ports: PortSet,
    origin: Origin,
    layer: usize,
    /// NetworkPolicy grants: index into the NetworkPolicy rule list.
    np_rule: Option<u32>,
}

/// The tiered table of `pod` for `direction`, or `None` when no ClusterNetworkPolicy
/// applies (NetworkPolicy alone decides then).
pub(crate) fn tiered_direction(state: &ClusterState, pod: &Pod, direction: Direction, node_addresses: &BTreeSet<IpAddr>) -> Option<PeerTable> {
    if !applies(state, pod, direction) {
        return None;
    }
    let mut layers: Vec<Layer> = vec![Layer::Exempt];
    let mut grants: Vec<TGrant> = exempt_grants(state, pod, direction, node_addresses)
        .into_iter()
        .map(|g| TGrant { cidr: g.cidr, except: g.except, ports: g.ports, origin: g.origin, layer: 0, np_rule: None })
        .collect();
    let mut isolated_by = Vec::new();

    let add_tier = |tier: Tier, layers: &mut Vec<Layer>, grants: &mut Vec<TGrant>, isolated_by: &mut Vec<_>| {
        for policy in tier_policies(state, pod, direction, tier) {
            isolated_by.push(policy.key());
            for (i, rule) in policy.rules(direction).iter().enumerate() {
                let layer = layers.len();
                layers.push(Layer::Rule { action: rule.effective_action(), rule: RuleRef::cluster_rule(ClusterRuleRef::new(policy, direction, i)) });
                for (cidr, ports, origin) in rule_grants(state, pod, direction, rule) {
                    grants.push(TGrant { cidr, except: vec![], ports, origin, layer, np_rule: None });
                }
            }
        }
    };
    add_tier(Tier::Admin, &mut layers, &mut grants, &mut isolated_by);

    let np_policies: Vec<_> = state.isolating_policies(pod, direction).collect();
    let np_layer = layers.len();
    layers.push(Layer::NetworkPolicy { isolated: !np_policies.is_empty() });
    let mut np_rules = Vec::new();
    for g in policy_grants(state, pod, direction, &np_policies, &mut np_rules) {
        grants.push(TGrant { cidr: g.cidr, except: g.except, ports: g.ports, origin: g.origin, layer: np_layer, np_rule: g.rule });
    }
    isolated_by.extend(np_policies.iter().map(|p| p.key.clone()));

    add_tier(Tier::Baseline, &mut layers, &mut grants, &mut isolated_by);

    let (entries, port_sets) = build(&grants, &layers, &np_rules);
    Some(PeerTable { isolated: true, isolated_by, entries, port_sets })
}

/// What one rule matches, as (prefix, ports, origin) grants.
fn rule_grants(state: &ClusterState, pod: &Pod, direction: Direction, rule: &ClusterRule) -> Vec<(Prefix, PortSet, Origin)> {
    let mut out = Vec::new();
    match rule.fail_closed {
        Some(FailClosed::MatchesNothing) => return out,
        Some(FailClosed::DenyAll) => {
            for f in [Family::Ipv4, Family::Ipv6] {
                out.push((Prefix::everything(f), PortSet::all(), Origin::Everything));
            }
            return out;
        }
        None => {}
    }
    // Numbered ports mean the same for every peer; named ones resolve on the destination
    // pod: `pod` itself for ingress, each peer pod for egress.
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
    for peer in &rule.peers {
        let (namespaces, pods) = match peer {
            ClusterPeer::Namespaces(ns) => (ns.clone(), crate::labels::Selector::everything()),
            ClusterPeer::Pods { namespaces, pods } => (namespaces.clone(), pods.clone()),
            ClusterPeer::Networks(cidrs) => {
                if !uniform.is_empty() {
                    out.extend(cidrs.iter().map(|c| (*c, uniform.clone(), Origin::Network { cidr: *c })));
                }
                continue;
            }
            ClusterPeer::Nodes(sel) => {
                if !uniform.is_empty() {
                    for name in state.node_names() {
                        if sel.matches(&state.node_labels(name)) {
                            for ip in state.node_addresses(name) {
                                out.push((Prefix::host(ip), uniform.clone(), Origin::SelectedNode { name: name.to_string() }));
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
            let mut ports = uniform.clone();
            if !named.is_empty() {
                ports.union_with(&resolve(peer_pod, &named));
            }
            if ports.is_empty() {
                continue;
            }
            for ip in state.owned_ips(peer_pod) {
                out.push((Prefix::host(ip), ports.clone(), Origin::Pod { pod: peer_pod.key.clone() }));
            }
        }
    }
    out
}

/// The ports `names` resolve to on `pod`, each with the protocol of its container port.
fn resolve(pod: &Pod, names: &[&str]) -> PortSet {
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

#[derive(Default)]
struct PrefixGrants {
    starts: Vec<usize>,
    excepts: Vec<usize>,
}

struct Frame {
    prefix: Prefix,
    /// Per layer, the union of the plain grants on the path from the root.
    plain: BTreeMap<usize, PortSet>,
    np_rules: Vec<u32>,
    /// Grants with holes (NetworkPolicy ipBlock except) covering this prefix.
    blocks: Vec<usize>,
    value: PortSet,
}

/// The decision of the layers at one region: the allowed traffic and the rules that
/// decided some of it.
fn evaluate(layers: &[Layer], at: &BTreeMap<usize, PortSet>, np_rules: &[u32], all_np_rules: &[RuleRef]) -> (PortSet, Vec<RuleRef>) {
    let empty = PortSet::empty();
    let mut remaining = PortSet::all();
    let mut allowed = PortSet::empty();
    let mut passed = PortSet::empty();
    let mut rules = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        match layer {
            Layer::NetworkPolicy { isolated } => {
                // Passed traffic re-enters at the NetworkPolicy tier.
                remaining.union_with(&passed);
                passed = PortSet::empty();
                if *isolated {
                    let hit = remaining.intersect(at.get(&i).unwrap_or(&empty));
                    if !hit.is_empty() {
                        allowed.union_with(&hit);
                        rules.extend(np_rules.iter().map(|r| all_np_rules[*r as usize].clone()));
                    }
                    // A NetworkPolicy that isolates the pod decides everything left.
                    remaining = PortSet::empty();
                }
            }
            Layer::Exempt | Layer::Rule { .. } => {
                let Some(m) = at.get(&i) else { continue };
                let hit = remaining.intersect(m);
                if hit.is_empty() {
                    continue;
                }
                remaining = remaining.subtract(m);
                match layer {
                    Layer::Exempt => allowed.union_with(&hit),
                    Layer::Rule { action, rule } => {
                        match action {
                            Action::Accept => allowed.union_with(&hit),
                            Action::Deny => {}
                            Action::Pass => passed.union_with(&hit),
                        }
                        rules.push(rule.clone());
                    }
                    Layer::NetworkPolicy { .. } => unreachable!(),
                }
            }
        }
    }
    // A Baseline Pass, and anything no tier decided: default allow.
    remaining.union_with(&passed);
    allowed.union_with(&remaining);
    rules.sort();
    rules.dedup();
    (allowed, rules)
}

fn build(grants: &[TGrant], layers: &[Layer], all_np_rules: &[RuleRef]) -> (Vec<PeerEntry>, Vec<PortSet>) {
    let mut tree: BTreeMap<Prefix, PrefixGrants> = BTreeMap::new();
    for f in [Family::Ipv4, Family::Ipv6] {
        tree.entry(Prefix::everything(f)).or_default();
    }
    for (i, g) in grants.iter().enumerate() {
        tree.entry(g.cidr).or_default().starts.push(i);
        for e in &g.except {
            tree.entry(*e).or_default().excepts.push(i);
        }
    }
    let mut entries = Vec::new();
    let mut port_sets: Vec<PortSet> = Vec::new();
    let mut ids: HashMap<PortSet, PortSetId> = HashMap::new();
    let mut rule_lists: HashMap<Vec<RuleRef>, std::sync::Arc<[RuleRef]>> = HashMap::new();
    let empty = PortSet::empty();
    let mut stack: Vec<Frame> = Vec::new();
    // BTreeMap order is a pre-order walk of the prefix tree (see ip.rs).
    for (prefix, here) in &tree {
        while stack.last().is_some_and(|f| !f.prefix.contains(prefix)) {
            stack.pop();
        }
        let parent = stack.last();
        let mut plain = parent.map(|f| f.plain.clone()).unwrap_or_default();
        let mut np_rules = parent.map(|f| f.np_rules.clone()).unwrap_or_default();
        let mut blocks = parent.map(|f| f.blocks.clone()).unwrap_or_default();
        let mut stands_for = BTreeSet::new();
        if prefix.len() == 0 {
            stands_for.insert(Origin::Remainder);
        }
        for &gi in &here.starts {
            let g = &grants[gi];
            stands_for.insert(g.origin.clone());
            if g.except.is_empty() {
                plain.entry(g.layer).or_default().union_with(&g.ports);
                np_rules.extend(g.np_rule);
            } else {
                blocks.push(gi);
            }
        }
        for &gi in &here.excepts {
            stands_for.insert(Origin::Except { cidr: grants[gi].cidr, except: *prefix });
            blocks.retain(|b| *b != gi);
        }
        np_rules.sort_unstable();
        np_rules.dedup();
        let mut at = plain.clone();
        let mut at_np_rules = np_rules.clone();
        for &b in &blocks {
            at.entry(grants[b].layer).or_default().union_with(&grants[b].ports);
            at_np_rules.extend(grants[b].np_rule);
        }
        let (value, rules) = evaluate(layers, &at, &at_np_rules, all_np_rules);
        let parent_value = parent.map(|f| &f.value).unwrap_or(&empty);
        if value != *parent_value {
            let id = *ids.entry(value.clone()).or_insert_with(|| {
                port_sets.push(value.clone());
                (port_sets.len() - 1) as PortSetId
            });
            // Entries with the same deciding rules share one list (see `PeerEntry::rules`).
            let rules = rule_lists.entry(rules).or_insert_with_key(|r| r.as_slice().into()).clone();
            entries.push(PeerEntry { prefix: *prefix, port_set: id, stands_for: Origin::shared(&stands_for.into_iter().collect::<Vec<_>>()), rules });
        }
        stack.push(Frame { prefix: *prefix, plain, np_rules, blocks, value });
    }
    entries.shrink_to_fit();
    port_sets.shrink_to_fit();
    (entries, port_sets)
}
