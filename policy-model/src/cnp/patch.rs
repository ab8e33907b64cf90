//! Tiered tables patched in place when only peer pods changed.
//!
//! A Baseline (or Admin) peer that covers every pod, such as a cluster-wide default deny,
//! gives each subject's table one entry per pod of the cluster. A pod that appears, goes
//! or moves then changes each subject's table at that pod's addresses only, yet a rebuild
//! walks all of them: about 100 ms for 100 subjects and 10,000 pods, per pod change.
//!
//! When a pod's addresses are its own (no other pod holds them, no node does), the entries
//! at those addresses depend only on which rules match that pod: the grants covering an
//! address are those of its prefix's ancestors in the table's tree, which the rest of
//! the table's entries already decide, plus that pod's own. So the entry there is
//! evaluated exactly as `build` evaluates it, and put in or taken out, and the rest of
//! the table stays. Anything this cannot prove leaves the table untouched and asks for a
//! rebuild.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::build::evaluate;
use super::compile::{TierLayers, resolve, rule_ports, tier_layers};
use super::eval::{applies, pod_peer_matches};
use super::model::{ClusterPeer, ClusterRule, FailClosed};
use crate::compile::exempt_grants;
use crate::ip::Prefix;
use crate::labels::Selector;
use crate::objects::{ObjectKey, Pod};
use crate::policy::Direction;
use crate::ports::PortSet;
use crate::state::ClusterState;
use crate::table::{Origin, PeerEntry, PeerTable};
use crate::verdict::RuleRef;

/// A peer pod whose entries to revisit: its key, and every address it held before the
/// batch or holds now.
pub(crate) struct PeerPod<'a> {
    pub(crate) key: &'a ObjectKey,
    pub(crate) addresses: &'a [IpAddr],
}

/// One entry to write: the table's entry at `prefix` becomes `entry` (`None`: no entry).
struct Edit {
    prefix: Prefix,
    entry: Option<(PortSet, Vec<RuleRef>, Arc<[Origin]>)>,
}

/// Patches `subject`'s tiered table of `direction` at the addresses of `peers`, whose
/// changes are the only ones since the table was compiled that can change it (see
/// `NodeCompiler`'s peer marks). Returns whether the datapath's view of the table changed,
/// or `None`, leaving `table` untouched, when a patch cannot be shown equal to a rebuild:
/// the table is not tiered or NetworkPolicies isolate the subject in this direction (then
/// their grants are the endpoint's own and the Baseline rules are not walked), or an
/// address is not a single pod's (another pod, a node, the subject itself claims it), or
/// the entry there stands for something besides that pod.
pub(crate) fn patch_peer_pods(
    state: &ClusterState,
    subject: &Pod,
    direction: Direction,
    table: &mut PeerTable,
    peers: &[PeerPod],
) -> Option<bool> {
    if !table.isolated || !applies(state, subject, direction) {
        return None;
    }
    let tiers = tier_layers(state, subject, direction);
    if !tiers.np_policies.is_empty() || tiers.isolated_by != table.isolated_by {
        return None;
    }
    let exempt = exempt_grants(state, subject);
    // First every check and evaluation, then the writes: a refusal leaves the table whole.
    let mut edits: Vec<Edit> = Vec::new();
    for peer in peers {
        for &addr in peer.addresses {
            if edits.iter().any(|e| e.prefix == Prefix::host(addr)) || exempt.iter().any(|g| g.cidr.contains_addr(addr)) {
                return None;
            }
            edits.push(edit_at(state, subject, direction, &tiers, table, peer.key, addr)?);
        }
    }
    let mut changed = false;
    for edit in edits {
        changed |= apply(table, edit);
    }
    drop_unused_port_sets(table);
    Some(changed)
}

/// Keeps only the port sets some entry uses (an entry taken out may have used the last
/// reference), in their order: the table lists what its entries use, as a compile's does.
fn drop_unused_port_sets(table: &mut PeerTable) {
    let mut used = vec![false; table.port_sets.len()];
    for e in &table.entries {
        used[e.port_set as usize] = true;
    }
    if used.iter().all(|u| *u) {
        return;
    }
    let mut new_id = vec![0; used.len()];
    let mut next = 0;
    for (i, u) in used.iter().enumerate() {
        new_id[i] = next;
        next += u32::from(*u);
    }
    let mut i = 0;
    table.port_sets.retain(|_| {
        i += 1;
        used[i - 1]
    });
    for e in &mut table.entries {
        e.port_set = new_id[e.port_set as usize];
    }
}

/// The edit at `addr`, an address `peer` held before the batch or holds now, or `None`
/// when the entry there may depend on more than `peer` (see [`patch_peer_pods`]).
fn edit_at(
    state: &ClusterState,
    subject: &Pod,
    direction: Direction,
    tiers: &TierLayers,
    table: &PeerTable,
    peer: &ObjectKey,
    addr: IpAddr,
) -> Option<Edit> {
    let prefix = Prefix::host(addr);
    if state.node_holds(addr) || state.pod_holders(addr).any(|h| h.key != *peer) || network_at(tiers, direction, &prefix) {
        return None;
    }
    if let Ok(i) = table.entries.binary_search_by(|e| e.prefix.cmp(&prefix))
        && (table.entries[i].own_node || *table.entries[i].stands_for != [Origin::Pod { pod: peer.clone() }])
    {
        return None;
    }
    let Some(pod) = state.pod(peer).filter(|p| !p.host_network && p.ips.contains(&addr)) else {
        // Gone from the address: no entry.
        return Some(Edit { prefix, entry: None });
    };
    let at = grants_at(state, subject, direction, tiers, pod, addr);
    // No grant starts at the address: it is not in the tree, no entry.
    let entry = (!at.is_empty()).then(|| {
        let at = with_ancestors(subject, direction, tiers, addr, at);
        let (value, rules) = evaluate(&tiers.layers, &at, &[], &[]);
        (value, rules, Origin::shared(&[Origin::Pod { pod: pod.key.clone() }]))
    });
    Some(Edit { prefix, entry })
}

/// Writes one edit; whether the datapath's view changed.
fn apply(table: &mut PeerTable, edit: Edit) -> bool {
    let old = match table.entries.binary_search_by(|e| e.prefix.cmp(&edit.prefix)) {
        Ok(i) => {
            let e = table.entries.remove(i);
            Some(table.port_set(&e).clone())
        }
        Err(_) => None,
    };
    let addr = edit.prefix.addr();
    // What the address gets without an entry of its own: its longest covering entry's.
    let parent = covering(table, &edit.prefix).map(|e| table.port_set(e).clone()).unwrap_or_else(PortSet::empty);
    let new = match edit.entry {
        // `build` gives an entry only where the value differs from the parent's.
        Some((value, rules, stands_for)) if value != parent => {
            let i = table.entries.binary_search_by(|e| e.prefix.cmp(&edit.prefix)).unwrap_err();
            // Share the rule list with a neighbour's when equal (most entries have one).
            let rules: Arc<[RuleRef]> = [i.checked_sub(1), Some(i)]
                .into_iter()
                .flatten()
                .filter_map(|j| table.entries.get(j))
                .find(|e| *e.rules == *rules)
                .map(|e| e.rules.clone())
                .unwrap_or_else(|| rules.into());
            let port_set = table.port_set_id(&value);
            table.entries.insert(i, PeerEntry { prefix: edit.prefix, port_set, stands_for, rules, own_node: false });
            Some(value)
        }
        _ => None,
    };
    debug_assert!(table.entries.is_sorted_by_key(|e| e.prefix), "{addr}: entries out of order");
    // The datapath looks the address up: same port set, or none on both sides.
    old.unwrap_or_else(|| parent.clone()) != new.unwrap_or(parent)
}

/// Whether a networks peer names exactly `host`: its grant starts there too, and the entry
/// would stand for it as well.
fn network_at(tiers: &TierLayers, direction: Direction, host: &Prefix) -> bool {
    tiers.rules.iter().any(|&(_, policy, i)| {
        policy.rules(direction)[i].peers.iter().any(|p| matches!(p, ClusterPeer::Networks(cidrs) if cidrs.contains(host)))
    })
}

/// The longest entry that strictly contains host prefix `host`.
fn covering<'t>(table: &'t PeerTable, host: &Prefix) -> Option<&'t PeerEntry> {
    (0..host.len()).rev().find_map(|len| {
        let p = Prefix::new(host.addr(), len).ok()?;
        table.entries.binary_search_by(|e| e.prefix.cmp(&p)).ok().map(|i| &table.entries[i])
    })
}

/// Per rule layer, the ports of the grants that `pod` (the peer at `addr`) gets at its
/// own host prefix, as `rule_grants` gives them: a pod or namespace peer matching it.
fn grants_at(
    state: &ClusterState,
    subject: &Pod,
    direction: Direction,
    tiers: &TierLayers,
    pod: &Pod,
    addr: IpAddr,
) -> BTreeMap<usize, PortSet> {
    debug_assert!(pod.ips.contains(&addr));
    let everything = Selector::everything();
    let mut at: BTreeMap<usize, PortSet> = BTreeMap::new();
    for &(layer, policy, i) in &tiers.rules {
        let rule = &policy.rules(direction)[i];
        if rule.fail_closed.is_some() {
            continue;
        }
        let matched = rule.peers.iter().any(|peer| match peer {
            ClusterPeer::Namespaces(ns) => pod_peer_matches(state, ns, &everything, pod),
            ClusterPeer::Pods { namespaces, pods } => pod_peer_matches(state, namespaces, pods, pod),
            _ => false,
        });
        if !matched {
            continue;
        }
        let (mut ports, named) = rule_ports(subject, direction, rule);
        if !named.is_empty() {
            ports.union_with(&resolve(pod, &named));
        }
        if !ports.is_empty() {
            at.entry(layer).or_default().union_with(&ports);
        }
    }
    at
}

/// `at` (the grants starting at `addr`'s host prefix) with those of its ancestors in the
/// tree: what `build`'s region at that prefix holds. The endpoint's own grants there are
/// only its exemptions (checked not to cover `addr`): NetworkPolicies do not isolate it.
fn with_ancestors(
    subject: &Pod,
    direction: Direction,
    tiers: &TierLayers,
    addr: IpAddr,
    mut at: BTreeMap<usize, PortSet>,
) -> BTreeMap<usize, PortSet> {
    for &(layer, policy, i) in &tiers.rules {
        let rule: &ClusterRule = &policy.rules(direction)[i];
        let ports = match rule.fail_closed {
            Some(FailClosed::MatchesNothing) => continue,
            // Every address of both families (`rule_grants`).
            Some(FailClosed::DenyAll) => PortSet::all(),
            None => {
                if !rule.peers.iter().any(|p| matches!(p, ClusterPeer::Networks(cidrs) if cidrs.iter().any(|c| c.contains_addr(addr)))) {
                    continue;
                }
                // Networks peers take the rule's ports that mean the same for every peer.
                rule_ports(subject, direction, rule).0
            }
        };
        if !ports.is_empty() {
            at.entry(layer).or_default().union_with(&ports);
        }
    }
    // Nodes peers cover node addresses only, which `addr` is not (`node_holds`).
    at
}
