//! The reference evaluator for the tiers: one flow, one side, judged straight from the
//! API text. Deliberately naive (the oracle the compiled tables are tested against).
//!
//! Order for a pod and a direction (upstream `tier` field doc):
//! Admin tier → NetworkPolicy tier → Baseline tier → default allow.
//! - Within a CNP tier, policies in ascending priority, ties by name (ours; upstream leaves
//!   ties to the implementation, so a tie that matters is reported).
//! - Within a policy, the first matching rule of the direction decides.
//! - Accept and Deny end evaluation; Pass skips the rest of the tier.
//! - The NetworkPolicy tier decides only when a NetworkPolicy isolates the pod for that
//!   direction (its own allow-list semantics); otherwise evaluation moves on.
//! - A CNP with no rules for a direction does not affect that direction.

use std::net::IpAddr;

use serde::Serialize;

use super::model::*;
use crate::objects::Pod;
use crate::policy::{Direction, NamespaceScope};
use crate::state::{AddressOwner, ClusterState};
use crate::verdict::{Decision, Flow};

/// What decided one side of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum DecidedBy {
    /// Not subject to any tier: not a pod, a pod's traffic to itself, ingress from its own
    /// node.
    Exempt,
    /// A ClusterNetworkPolicy rule (Accept or Deny; a Pass never decides).
    ClusterRule { rule: ClusterRuleRef },
    /// The NetworkPolicies isolating the pod (see the side's [`Decision`]).
    NetworkPolicy,
    /// Nothing decided: Kubernetes' default, allow.
    DefaultAllow,
}

/// The tiers' decision on one side of a flow, with provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierVerdict {
    pub allowed: bool,
    pub decided_by: DecidedBy,
    /// Pass rules that sent the flow on to the next tier, in order.
    pub passed_by: Vec<ClusterRuleRef>,
    /// Policies of the same tier and priority as the deciding (or passing) policy whose
    /// first matching rule takes another action: upstream lets an implementation apply
    /// either, so `explain` should warn.
    pub ambiguous_with: Vec<String>,
}

impl TierVerdict {
    pub fn exempt() -> TierVerdict {
        TierVerdict { allowed: true, decided_by: DecidedBy::Exempt, passed_by: Vec::new(), ambiguous_with: Vec::new() }
    }
}

/// Whether `policy` applies to `pod` (hostNetwork pods never are subjects).
pub fn selects(state: &ClusterState, policy: &ClusterPolicy, pod: &Pod) -> bool {
    if pod.host_network {
        return false;
    }
    match &policy.subject {
        Subject::Namespaces(ns) => ns.matches(&state.namespace_labels(&pod.key.namespace)),
        Subject::Pods { namespaces, pods } => {
            namespaces.matches(&state.namespace_labels(&pod.key.namespace)) && pods.matches(&pod.labels)
        }
    }
}

/// The policies of `tier` that apply to `pod` in `direction`, in precedence order (as the
/// state's view sees them: see [`ClusterState::judging_cluster_policies`]).
pub fn tier_policies<'a>(state: &'a ClusterState, pod: &Pod, direction: Direction, tier: Tier) -> Vec<&'a ClusterPolicy> {
    let mut v: Vec<&ClusterPolicy> = state
        .judging_cluster_policies()
        .filter(|p| p.tier == tier && !p.rules(direction).is_empty() && selects(state, p, pod))
        .collect();
    v.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
    v
}

/// Whether any ClusterNetworkPolicy applies to `pod` in `direction`.
pub fn applies(state: &ClusterState, pod: &Pod, direction: Direction) -> bool {
    state.judging_cluster_policies().any(|p| !p.rules(direction).is_empty() && selects(state, p, pod))
}

/// Whether a pod peer (namespaces / pods) matches `pod`.
pub fn pod_peer_matches(state: &ClusterState, namespaces: &crate::labels::Selector, pods: &crate::labels::Selector, pod: &Pod) -> bool {
    // hostNetwork pods are excluded by `pod_peer_matches` itself.
    state.pod_peer_matches("", &NamespaceScope::Matching(namespaces.clone()), pods, pod)
}

fn peer_matches(state: &ClusterState, peer: &ClusterPeer, remote: IpAddr) -> bool {
    match peer {
        ClusterPeer::Namespaces(ns) => {
            state.pod_at(remote).is_some_and(|p| pod_peer_matches(state, ns, &crate::labels::Selector::everything(), p))
        }
        ClusterPeer::Pods { namespaces, pods } => state.pod_at(remote).is_some_and(|p| pod_peer_matches(state, namespaces, pods, p)),
        ClusterPeer::Nodes(sel) => match state.owner(remote) {
            AddressOwner::Node(n) => sel.matches(&state.node_labels(n)),
            _ => false,
        },
        ClusterPeer::Networks(cidrs) => cidrs.iter().any(|c| c.contains_addr(remote)),
        // Cannot be honoured: matches nothing (the rule-level fail-closed is applied by
        // `rule_matches`).
        ClusterPeer::DomainNames(_) | ClusterPeer::Unknown => false,
    }
}

fn port_matches(port: &ClusterPort, dst_pod: Option<&Pod>, flow: &Flow) -> bool {
    let Some(proto) = flow.protocol.policy_protocol() else {
        return false;
    };
    match port {
        ClusterPort::Range(p, r) => *p == proto && r.contains(flow.port),
        ClusterPort::Named(name) => dst_pod.and_then(|d| d.resolve_named_port(name, proto)) == Some(flow.port),
    }
}

/// Whether `rule` matches the flow, the remote side being `remote`.
pub fn rule_matches(state: &ClusterState, rule: &ClusterRule, remote: IpAddr, flow: &Flow) -> bool {
    match rule.fail_closed {
        Some(FailClosed::MatchesNothing) => false,
        Some(FailClosed::DenyAll) => true,
        None => {
            let dst_pod = state.pod_at(flow.dst);
            rule.peers.iter().any(|p| peer_matches(state, p, remote))
                && rule.protocols.as_ref().is_none_or(|ps| ps.iter().any(|p| port_matches(p, dst_pod, flow)))
        }
    }
}

/// The first rule of `policy` that matches, with its index.
fn first_match<'a>(state: &ClusterState, policy: &'a ClusterPolicy, direction: Direction, remote: IpAddr, flow: &Flow) -> Option<(usize, &'a ClusterRule)> {
    policy.rules(direction).iter().enumerate().find(|(_, r)| rule_matches(state, r, remote, flow))
}

enum TierResult {
    Decided(ClusterRuleRef, Action),
    /// Passed (by this rule) or nothing matched (`None`).
    Next(Option<ClusterRuleRef>),
}

fn run_tier(state: &ClusterState, pod: &Pod, direction: Direction, tier: Tier, remote: IpAddr, flow: &Flow, ambiguous: &mut Vec<String>) -> TierResult {
    let policies = tier_policies(state, pod, direction, tier);
    for (i, policy) in policies.iter().enumerate() {
        let Some((index, rule)) = first_match(state, policy, direction, remote, flow) else {
            continue;
        };
        let action = rule.effective_action();
        // Same tier and priority: the choice is the implementation's; report the ones
        // that would act differently.
        for other in policies[i + 1..].iter().take_while(|o| o.priority == policy.priority) {
            if let Some((_, r)) = first_match(state, other, direction, remote, flow) {
                if r.effective_action() != action {
                    ambiguous.push(other.name.clone());
                }
            }
        }
        let r = ClusterRuleRef::new(policy, direction, index);
        return match action {
            Action::Pass => TierResult::Next(Some(r)),
            a => TierResult::Decided(r, a),
        };
    }
    TierResult::Next(None)
}

/// The tiers' decision for `pod`'s side of `flow` (`pod` is the source for egress, the
/// destination for ingress), given the NetworkPolicy tier's decision `np`.
pub fn decide(state: &ClusterState, pod: &Pod, direction: Direction, flow: &Flow, np: &Decision) -> TierVerdict {
    let remote = match direction {
        Direction::Egress => flow.dst,
        Direction::Ingress => flow.src,
    };
    let mut out = TierVerdict { allowed: true, decided_by: DecidedBy::DefaultAllow, passed_by: Vec::new(), ambiguous_with: Vec::new() };
    let decided = |out: &mut TierVerdict, r: ClusterRuleRef, a: Action| {
        out.allowed = a == Action::Accept;
        out.decided_by = DecidedBy::ClusterRule { rule: r };
    };
    match run_tier(state, pod, direction, Tier::Admin, remote, flow, &mut out.ambiguous_with) {
        TierResult::Decided(r, a) => {
            decided(&mut out, r, a);
            return out;
        }
        TierResult::Next(pass) => out.passed_by.extend(pass),
    }
    if np.is_isolated() {
        out.allowed = np.allows();
        out.decided_by = DecidedBy::NetworkPolicy;
        return out;
    }
    match run_tier(state, pod, direction, Tier::Baseline, remote, flow, &mut out.ambiguous_with) {
        TierResult::Decided(r, a) => decided(&mut out, r, a),
        TierResult::Next(pass) => out.passed_by.extend(pass),
    }
    out
}
