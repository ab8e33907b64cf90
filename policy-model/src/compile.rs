//! The compiler: one local pod's policies become an LPM-exact table per direction.
//!
//! Every rule contributes *grants*: an address set (a prefix, possibly with except
//! holes) and the ports it allows. The compiler puts every prefix that bounds a grant
//! (cidrs, excepts, pod and node addresses) in one sorted list and walks it as a tree; the
//! value of a prefix is the union of the ports of every grant that covers all addresses
//! for which it is the longest match. One LPM lookup then answers for any address, and
//! entries equal to their parent are dropped, so the table is minimal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use crate::cnp::TierCache;
use crate::ip::{Family, Prefix};
use crate::objects::Pod;
use crate::policy::{Direction, Peer, PortSpec};
use crate::ports::{PortRange, PortSet};
use crate::state::ClusterState;
use crate::table::{EndpointTables, Origin, PeerEntry, PeerTable, PortSetId};
use crate::verdict::RuleRef;

/// What a rule's peer list covers.
#[derive(Clone, Copy)]
enum Target<'a> {
    Everything,
    Peer(&'a Peer),
}

/// An address set and what it may do.
pub(crate) struct Grant {
    pub(crate) cidr: Prefix,
    /// Holes in `cidr` (ipBlock except); empty for plain prefixes.
    pub(crate) except: Vec<Prefix>,
    /// Shared by the grants of one rule that allow the same ports (one per peer address).
    pub(crate) ports: Arc<PortSet>,
    pub(crate) origin: Origin,
    /// Index into the rule list; `None` for the implicit grants (own address, node).
    pub(crate) rule: Option<u32>,
}

/// Compiles both tables of `pod` (which should be a non-hostNetwork pod of this node).
/// `node_addresses` are the addresses of the pod's node, from which ingress always passes.
pub fn compile_endpoint(state: &ClusterState, pod: &Pod, node_addresses: &BTreeSet<IpAddr>) -> EndpointTables {
    compile_endpoint_with(state, pod, node_addresses, &mut TierCache::default())
}

/// [`compile_endpoint`] for one of many endpoints compiled from the same `state`: `cache`
/// keeps what the ClusterNetworkPolicy rules match, for the next endpoint.
pub fn compile_endpoint_with(state: &ClusterState, pod: &Pod, node_addresses: &BTreeSet<IpAddr>, cache: &mut TierCache) -> EndpointTables {
    EndpointTables {
        pod: pod.key.clone(),
        addresses: state.owned_ips(pod).collect(),
        ingress: compile_direction(state, pod, Direction::Ingress, node_addresses, cache),
        egress: compile_direction(state, pod, Direction::Egress, node_addresses, cache),
        audit: Default::default(),
    }
}

/// [`compile_endpoint`] with the addresses of the pod's own node looked up (for one-off
/// compiles; [`crate::NodeCompiler`] computes them once per batch).
pub fn compile_pod(state: &ClusterState, pod: &Pod) -> EndpointTables {
    let node_addresses = pod.node.as_deref().map(|n| state.node_addresses(n)).unwrap_or_default();
    compile_endpoint(state, pod, &node_addresses)
}

pub(crate) fn compile_direction(
    state: &ClusterState,
    pod: &Pod,
    direction: Direction,
    node_addresses: &BTreeSet<IpAddr>,
    cache: &mut TierCache,
) -> PeerTable {
    // A pod a ClusterNetworkPolicy applies to gets tiered tables (crate::cnp::compile);
    // without one, NetworkPolicy alone decides, exactly as before.
    let mut table = match crate::cnp::compile::tiered_direction(state, pod, direction, cache) {
        Some(table) => table,
        None => {
            let policies: Vec<_> = state.isolating_policies(pod, direction).collect();
            if policies.is_empty() {
                return PeerTable::not_isolated();
            }
            let mut rules: Vec<RuleRef> = Vec::new();
            let mut grants = exempt_grants(state, pod);
            grants.extend(policy_grants(state, pod, direction, &policies, &mut rules));
            let (entries, port_sets) = build_lpm(&grants, &rules);
            PeerTable { isolated: true, isolated_by: policies.iter().map(|p| p.key.clone()).collect(), entries, port_sets }
        }
    };
    if direction == Direction::Ingress {
        mark_own_node(&mut table, pod.node.as_deref().unwrap_or_default(), node_addresses);
    }
    table
}

/// What no policy can block: the pod's own addresses.
pub(crate) fn exempt_grants(state: &ClusterState, pod: &Pod) -> Vec<Grant> {
    let all = Arc::new(PortSet::all());
    state
        .owned_ips(pod)
        .map(|ip| Grant { cidr: Prefix::host(ip), except: vec![], ports: all.clone(), origin: Origin::OwnAddress, rule: None })
        .collect()
}

/// Ingress from the pod's own node always passes (the API's rule, for kubelet probes), but
/// only for what the node itself sends. A packet the node forwards can carry a node
/// address too: kube-proxy masquerades NodePort clients to it. Such a packet must get what
/// the policies give that address, or any outside client would walk through a
/// default-deny over a NodePort. So each node address gets an exact entry holding the
/// policies' answer (what its longest match gave before), flagged
/// [`PeerEntry::own_node`]: the datapath adds the exemption only for packets the node's
/// own stack sent, and the evaluator only for flows that are not
/// [forwarded](crate::verdict_forwarded).
pub(crate) fn mark_own_node(table: &mut PeerTable, node: &str, node_addresses: &BTreeSet<IpAddr>) {
    if !table.isolated {
        return;
    }
    for ip in node_addresses {
        let host = Prefix::host(*ip);
        let origin = Origin::Node { name: node.to_string() };
        let with_node =
            |others: &[Origin]| Origin::shared(&std::iter::once(origin.clone()).chain(others.iter().cloned()).collect::<Vec<_>>());
        match table.entries.binary_search_by(|e| e.prefix.cmp(&host)) {
            Ok(i) => {
                let e = &mut table.entries[i];
                e.own_node = true;
                e.stands_for = with_node(&e.stands_for);
            }
            Err(i) => {
                let entry = match table.lookup(*ip) {
                    Some(e) => PeerEntry {
                        prefix: host,
                        port_set: e.port_set,
                        stands_for: with_node(&e.stands_for),
                        rules: e.rules.clone(),
                        own_node: true,
                    },
                    None => PeerEntry {
                        prefix: host,
                        port_set: table.port_set_id(&PortSet::empty()),
                        stands_for: with_node(&[]),
                        rules: Vec::new().into(),
                        own_node: true,
                    },
                };
                table.entries.insert(i, entry);
            }
        }
    }
}

/// The allowances of the NetworkPolicies isolating `pod` in `direction`; `rules` receives
/// the rule each grant's `rule` index points to.
pub(crate) fn policy_grants(
    state: &ClusterState,
    pod: &Pod,
    direction: Direction,
    policies: &[&crate::policy::Policy],
    rules: &mut Vec<RuleRef>,
) -> Vec<Grant> {
    let mut grants: Vec<Grant> = Vec::new();
    for policy in policies {
        for (i, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            let rule_index = rules.len() as u32;
            rules.push(RuleRef::policy_rule(policy.key.clone(), direction, i));

            // Ports that mean the same number for every peer, and named ports, which
            // resolve on the destination pod: the target itself for ingress, each peer
            // pod for egress.
            let mut uniform = PortSet::empty();
            let mut named: Vec<&PortSpec> = Vec::new();
            match &rule.ports {
                None => uniform = PortSet::all(),
                Some(specs) => {
                    for spec in specs {
                        match spec {
                            PortSpec::AnyPort(p) => uniform.insert(*p, PortRange::ALL),
                            PortSpec::Range(p, r) => uniform.insert(*p, *r),
                            PortSpec::Named(p, name) => match direction {
                                Direction::Ingress => {
                                    if let Some(n) = pod.resolve_named_port(name, *p) {
                                        uniform.insert(*p, PortRange::single(n));
                                    }
                                }
                                Direction::Egress => named.push(spec),
                            },
                        }
                    }
                }
            }

            // A rule without peers covers every address, in the cluster or not.
            let targets: Vec<Target> = match &rule.peers {
                None => vec![Target::Everything],
                Some(peers) => peers.iter().map(Target::Peer).collect(),
            };
            let uniform = Arc::new(uniform);
            for target in targets {
                if !uniform.is_empty() {
                    match target {
                        Target::Everything => {
                            for f in [Family::Ipv4, Family::Ipv6] {
                                grants.push(Grant {
                                    cidr: Prefix::everything(f),
                                    except: vec![],
                                    ports: uniform.clone(),
                                    origin: Origin::Everything,
                                    rule: Some(rule_index),
                                });
                            }
                        }
                        Target::Peer(Peer::Block(b)) => grants.push(Grant {
                            cidr: b.cidr,
                            except: b.except.clone(),
                            ports: uniform.clone(),
                            origin: Origin::Block { cidr: b.cidr },
                            rule: Some(rule_index),
                        }),
                        Target::Peer(peer @ Peer::Pods { .. }) => {
                            for peer_pod in state.peer_pods(&policy.key.namespace, peer) {
                                for ip in state.peer_ips(peer_pod) {
                                    grants.push(Grant {
                                        cidr: Prefix::host(ip),
                                        except: vec![],
                                        ports: uniform.clone(),
                                        origin: Origin::Pod { pod: peer_pod.key.clone() },
                                        rule: Some(rule_index),
                                    });
                                }
                            }
                        }
                    }
                }
                if !named.is_empty() {
                    // Egress named ports: one host grant per destination pod address that
                    // the target covers, with the numbers that pod gives the names.
                    let candidates: Vec<&Pod> = match target {
                        Target::Peer(peer @ Peer::Pods { .. }) => state.peer_pods(&policy.key.namespace, peer),
                        Target::Everything | Target::Peer(Peer::Block(_)) => state.pods().filter(|p| !p.host_network).collect(),
                    };
                    for dst in candidates {
                        let mut resolved = PortSet::empty();
                        for spec in &named {
                            if let PortSpec::Named(p, name) = spec {
                                if let Some(n) = dst.resolve_named_port(name, *p) {
                                    resolved.insert(*p, PortRange::single(n));
                                }
                            }
                        }
                        if resolved.is_empty() {
                            continue;
                        }
                        let resolved = Arc::new(resolved);
                        for ip in state.peer_ips(dst) {
                            if let Target::Peer(Peer::Block(b)) = target {
                                if !b.contains(ip) {
                                    continue;
                                }
                            }
                            grants.push(Grant {
                                cidr: Prefix::host(ip),
                                except: vec![],
                                ports: resolved.clone(),
                                origin: Origin::Pod { pod: dst.key.clone() },
                                rule: Some(rule_index),
                            });
                        }
                    }
                }
            }
        }
    }

    grants
}

#[derive(Default)]
struct PrefixGrants {
    starts: Vec<usize>,
    excepts: Vec<usize>,
}

struct Frame {
    prefix: Prefix,
    /// Union of the plain grants on the path from the root.
    plain: PortSet,
    plain_rules: Vec<u32>,
    /// Grants with holes that cover this prefix.
    blocks: Vec<usize>,
    value: PortSet,
}

fn build_lpm(grants: &[Grant], rules: &[RuleRef]) -> (Vec<PeerEntry>, Vec<PortSet>) {
    let mut tree: BTreeMap<Prefix, PrefixGrants> = BTreeMap::new();
    for (i, g) in grants.iter().enumerate() {
        tree.entry(g.cidr).or_default().starts.push(i);
        for e in &g.except {
            tree.entry(*e).or_default().excepts.push(i);
        }
    }

    let mut entries = Vec::new();
    let mut port_sets: Vec<PortSet> = Vec::new();
    let mut port_set_ids: HashMap<PortSet, PortSetId> = HashMap::new();
    let mut rule_lists: HashMap<Vec<u32>, Arc<[RuleRef]>> = HashMap::new();
    let empty = PortSet::empty();
    let mut stack: Vec<Frame> = Vec::new();

    // BTreeMap order is a pre-order walk of the prefix tree (see ip.rs).
    for (prefix, here) in &tree {
        while stack.last().is_some_and(|f| !f.prefix.contains(prefix)) {
            stack.pop();
        }
        let parent = stack.last();
        let mut plain = parent.map(|f| f.plain.clone()).unwrap_or_default();
        let mut plain_rules = parent.map(|f| f.plain_rules.clone()).unwrap_or_default();
        let mut blocks = parent.map(|f| f.blocks.clone()).unwrap_or_default();
        let mut stands_for = BTreeSet::new();
        for &gi in &here.starts {
            let g = &grants[gi];
            stands_for.insert(g.origin.clone());
            if g.except.is_empty() {
                plain.union_with(&g.ports);
                plain_rules.extend(g.rule);
            } else {
                blocks.push(gi);
            }
        }
        for &gi in &here.excepts {
            stands_for.insert(Origin::Except { cidr: grants[gi].cidr, except: *prefix });
            blocks.retain(|b| *b != gi);
        }
        let mut value = plain.clone();
        for &b in &blocks {
            value.union_with(&grants[b].ports);
        }
        let parent_value = parent.map(|f| &f.value).unwrap_or(&empty);
        if value != *parent_value {
            let id = *port_set_ids.entry(value.clone()).or_insert_with(|| {
                port_sets.push(value.clone());
                (port_sets.len() - 1) as PortSetId
            });
            let mut rule_ids: Vec<u32> = plain_rules.clone();
            rule_ids.extend(blocks.iter().filter_map(|b| grants[*b].rule));
            rule_ids.sort_unstable();
            rule_ids.dedup();
            let rules =
                rule_lists.entry(rule_ids).or_insert_with_key(|ids| ids.iter().map(|r| rules[*r as usize].clone()).collect()).clone();
            entries.push(PeerEntry {
                prefix: *prefix,
                port_set: id,
                stands_for: Origin::shared(&stands_for.into_iter().collect::<Vec<_>>()),
                rules,
                own_node: false,
            });
        }
        plain_rules.sort_unstable();
        plain_rules.dedup();
        stack.push(Frame { prefix: *prefix, plain, plain_rules, blocks, value });
    }
    // Tables live as long as their pod: keep no spare capacity (up to half of a grown Vec).
    entries.shrink_to_fit();
    port_sets.shrink_to_fit();
    (entries, port_sets)
}
