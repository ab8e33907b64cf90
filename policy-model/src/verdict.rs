//! The reference evaluator: one flow, judged straight from the NetworkPolicy API text.
//!
//! It is deliberately naive (no tables, no indices beyond address ownership) so that it
//! can serve as the oracle the compiled tables are tested against, and it records why:
//! which policies isolate each side and which rules allow the flow.

use std::net::IpAddr;

use serde::Serialize;

use crate::cnp::{self, ClusterRuleRef, TierVerdict};
use crate::objects::{ObjectKey, Pod};
use crate::policy::{Direction, Peer, Policy, PortSpec};
use crate::ports::IpProtocol;
use crate::state::{AddressOwner, ClusterState};

/// A connection attempt: the first packet's addresses, protocol and destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: IpProtocol,
    /// Destination port (ignored for protocols without ports).
    pub port: u16,
}

/// A rule that allowed a flow: policy, direction and the rule's index in its list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RuleRef {
    /// For a ClusterNetworkPolicy rule, the policy's name with an empty namespace.
    pub policy: ObjectKey,
    pub direction: Direction,
    pub rule: usize,
    /// Set for a ClusterNetworkPolicy rule (which may also deny): tier, priority, name and
    /// action. `None` for a NetworkPolicy rule (which only allows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Box<ClusterRuleRef>>,
}

impl RuleRef {
    /// The reference to a NetworkPolicy rule.
    pub fn policy_rule(policy: ObjectKey, direction: Direction, rule: usize) -> RuleRef {
        RuleRef { policy, direction, rule, cluster: None }
    }

    /// The reference to a ClusterNetworkPolicy rule.
    pub fn cluster_rule(r: ClusterRuleRef) -> RuleRef {
        RuleRef { policy: ObjectKey::new("", &r.policy), direction: r.direction, rule: r.rule, cluster: Some(Box::new(r)) }
    }
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cluster {
            Some(c) => write!(f, "{c}"),
            None => write!(f, "{} {} rule #{}", self.policy, self.direction, self.rule),
        }
    }
}

/// What one side of the flow decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Decision {
    /// That side is not a pod of the cluster (external address or node): no policy applies.
    NotAPod,
    /// A pod talking to itself: a pod cannot block its own traffic.
    SelfTraffic,
    /// Ingress from the node the pod runs on is always allowed.
    FromOwnNode { node: String },
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Isolated, and these rules allow the flow.
    Allowed { isolated_by: Vec<ObjectKey>, allowed_by: Vec<RuleRef> },
    /// Isolated, and no rule of these policies allows the flow.
    Denied { isolated_by: Vec<ObjectKey> },
}

impl Decision {
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }

    pub fn is_isolated(&self) -> bool {
        matches!(self, Decision::Allowed { .. } | Decision::Denied { .. })
    }
}

/// The verdict on a flow: egress of the source AND ingress of the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The final verdict, all tiers considered: `egress_tiers.allowed && ingress_tiers.allowed`.
    pub allowed: bool,
    /// The source pod's egress side, as the NetworkPolicy tier sees it (what it would
    /// decide, even when an Admin ClusterNetworkPolicy rule decided first).
    pub egress: Decision,
    /// The destination pod's ingress side, as the NetworkPolicy tier sees it.
    pub ingress: Decision,
    /// The source's egress through every tier (Admin, NetworkPolicy, Baseline, default).
    pub egress_tiers: TierVerdict,
    /// The destination's ingress through every tier.
    pub ingress_tiers: TierVerdict,
}

/// Judges `flow` against the cluster state, in its view ([`crate::audit::View`]: by
/// default the enforced one, in which audited policies do not exist). A flow from an
/// address of the destination's node is one the node's own stack sent (kubelet probes,
/// host processes, host-network pods): it always passes ingress.
pub fn verdict(state: &ClusterState, flow: &Flow) -> Verdict {
    verdict_at(state, flow, false)
}

/// [`verdict`] for a flow the node forwarded: its source address is the one it arrived
/// with (a masqueraded client's is the node's address). Such a flow gets no node
/// exemption: the API exempts what the node sends ("traffic from the node where the pod
/// runs is always allowed", for kubelet probes), and an outside client that only looks
/// like the node after kube-proxy's masquerade is judged by the policies like any address.
pub fn verdict_forwarded(state: &ClusterState, flow: &Flow) -> Verdict {
    verdict_at(state, flow, true)
}

fn verdict_at(state: &ClusterState, flow: &Flow, forwarded: bool) -> Verdict {
    let src = state.owner(flow.src);
    let dst = state.owner(flow.dst);
    let dst_pod = match dst {
        AddressOwner::Pod(p) => Some(p),
        _ => None,
    };

    if let (AddressOwner::Pod(s), Some(d)) = (src, dst_pod) {
        if s.key == d.key {
            // Upstream: "A Pod connecting to its own Pod IP is not subject to CNP" either.
            return Verdict {
                allowed: true,
                egress: Decision::SelfTraffic,
                ingress: Decision::SelfTraffic,
                egress_tiers: TierVerdict::exempt(),
                ingress_tiers: TierVerdict::exempt(),
            };
        }
    }

    let egress = match src {
        AddressOwner::Pod(pod) => decide(state, pod, Direction::Egress, flow),
        _ => Decision::NotAPod,
    };
    let ingress = match dst_pod {
        Some(pod) => match src {
            AddressOwner::Node(n) if pod.node.as_deref() == Some(n) && !forwarded => Decision::FromOwnNode { node: n.to_string() },
            _ => decide(state, pod, Direction::Ingress, flow),
        },
        None => Decision::NotAPod,
    };
    // The tiers around the NetworkPolicy tier. Ingress from the pod's own node stays
    // exempt (kubelet probes), as it is for NetworkPolicy.
    let egress_tiers = match src {
        AddressOwner::Pod(pod) => cnp::decide(state, pod, Direction::Egress, flow, &egress),
        _ => TierVerdict::exempt(),
    };
    let ingress_tiers = match (dst_pod, &ingress) {
        (Some(_), Decision::FromOwnNode { .. }) | (None, _) => TierVerdict::exempt(),
        (Some(pod), np) => cnp::decide(state, pod, Direction::Ingress, flow, np),
    };
    Verdict { allowed: egress_tiers.allowed && ingress_tiers.allowed, egress, ingress, egress_tiers, ingress_tiers }
}

/// The decision of `subject`'s policies for `direction` (the subject is the source for
/// egress, the destination for ingress).
fn decide(state: &ClusterState, subject: &Pod, direction: Direction, flow: &Flow) -> Decision {
    let isolated_by: Vec<ObjectKey> = state.isolating_policies(subject, direction).map(|p| p.key.clone()).collect();
    if isolated_by.is_empty() {
        return Decision::NotIsolated;
    }
    let allowed_by: Vec<RuleRef> =
        rule_matches_for(state, subject, direction, flow).into_iter().filter(|(_, m)| m.peer && m.port).map(|(r, _)| r).collect();
    if allowed_by.is_empty() { Decision::Denied { isolated_by } } else { Decision::Allowed { isolated_by, allowed_by } }
}

/// How one rule of `subject`'s policies relates to a flow, for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RuleMatch {
    /// The remote side is one of the rule's peers.
    pub peer: bool,
    /// The protocol and destination port are among the rule's ports.
    pub port: bool,
}

/// Matches every rule of every policy isolating `subject` in `direction` against `flow`
/// (the subject is the source for egress, the destination for ingress).
pub fn rule_matches_for(state: &ClusterState, subject: &Pod, direction: Direction, flow: &Flow) -> Vec<(RuleRef, RuleMatch)> {
    let remote = match direction {
        Direction::Egress => flow.dst,
        Direction::Ingress => flow.src,
    };
    let dst_pod = state.pod_at(flow.dst);
    let mut out = Vec::new();
    for policy in state.isolating_policies(subject, direction) {
        for (i, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            let peer = rule.peers.as_ref().is_none_or(|peers| peers.iter().any(|p| peer_matches(state, policy, p, remote)));
            let port = rule.ports.as_ref().is_none_or(|ports| ports.iter().any(|p| port_matches(p, dst_pod, flow)));
            out.push((RuleRef::policy_rule(policy.key.clone(), direction, i), RuleMatch { peer, port }));
        }
    }
    out
}

fn peer_matches(state: &ClusterState, policy: &Policy, peer: &Peer, remote: IpAddr) -> bool {
    match peer {
        Peer::Block(block) => block.contains(remote),
        Peer::Pods { namespaces, pods } => match state.pod_at(remote) {
            Some(pod) => state.pod_peer_matches(&policy.key.namespace, namespaces, pods, pod),
            None => false,
        },
    }
}

fn port_matches(spec: &PortSpec, dst_pod: Option<&Pod>, flow: &Flow) -> bool {
    if flow.protocol.policy_protocol() != Some(spec.protocol()) {
        return false;
    }
    match spec {
        PortSpec::AnyPort(_) => true,
        PortSpec::Range(_, r) => r.contains(flow.port),
        PortSpec::Named(proto, name) => dst_pod.and_then(|p| p.resolve_named_port(name, *proto)) == Some(flow.port),
    }
}
