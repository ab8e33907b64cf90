//! A validated ClusterNetworkPolicy, in the form the evaluator and the compiler share.

use std::fmt;

use serde::Serialize;

use crate::error::FieldError;
use crate::ip::Prefix;
use crate::labels::Selector;
use crate::objects::ObjectKey;
use crate::policy::Direction;
use crate::ports::{PortRange, Protocol};

/// The two tiers a ClusterNetworkPolicy can use. The NetworkPolicy tier sits between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Action {
    Accept,
    Deny,
    /// Skip the rest of the current tier.
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// Which pods a policy applies to (never hostNetwork ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Subject {
    /// Every pod of the namespaces the selector picks.
    Namespaces(Selector),
    /// Pods picked by `pods` in namespaces picked by `namespaces`.
    Pods { namespaces: Selector, pods: Selector },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ClusterPeer {
    /// Every (non-hostNetwork) pod of the selected namespaces.
    Namespaces(Selector),
    /// Selected (non-hostNetwork) pods of the selected namespaces.
    Pods { namespaces: Selector, pods: Selector },
    /// The addresses of the selected Nodes (egress only).
    Nodes(Selector),
    /// CIDRs; they match any address, pods' included (egress only).
    Networks(Vec<Prefix>),
    /// Domain names: this model has no DNS, so it cannot honour them (see [`FailClosed`]).
    DomainNames(Vec<String>),
    /// A peer with no field this version knows: written for a newer API.
    Unknown,
}

/// One entry of a rule's `protocols`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ClusterPort {
    /// `tcp|udp|sctp.destinationPort` (`number` is a one-port range).
    Range(Protocol, PortRange),
    /// `destinationNamedPort`: resolved on the destination pod, any protocol the container
    /// port has.
    Named(String),
}

/// How a rule with a peer this model cannot honour behaves: the upstream API asks for
/// "fail closed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FailClosed {
    /// An Accept rule with an unknown peer matches no traffic.
    MatchesNothing,
    /// A Deny or Pass rule with an unknown peer denies all traffic (a domain-name peer is
    /// refused there, as the API server's CEL rule refuses it).
    DenyAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterRule {
    /// `name`, possibly empty.
    pub name: String,
    pub action: Action,
    pub peers: Vec<ClusterPeer>,
    /// `None`: every protocol (ICMP too) and port.
    pub protocols: Option<Vec<ClusterPort>>,
    /// Set when a peer cannot be honoured and the whole rule is replaced.
    pub fail_closed: Option<FailClosed>,
}

impl ClusterRule {
    /// The action the rule takes when it matches (a fail-closed Pass denies).
    pub fn effective_action(&self) -> Action {
        match self.fail_closed {
            Some(FailClosed::DenyAll) => Action::Deny,
            _ => self.action,
        }
    }
}

/// A validated ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0–1000.
    pub priority: u16,
    pub subject: Subject,
    /// Rules in precedence order; an empty list leaves that direction alone.
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
    /// Peers this model cannot honour, and what it does instead: for logs and Events.
    pub warnings: Vec<FieldError>,
}

impl ClusterPolicy {
    pub fn rules(&self, direction: Direction) -> &[ClusterRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The key this cluster-scoped object has where a namespaced key is expected (table
    /// provenance, `isolated_by`): an empty namespace, as Kubernetes gives cluster-scoped
    /// objects.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new("", &self.name)
    }

    /// The order policies of one tier are tried in: priority, then name. Upstream leaves
    /// equal priorities to the implementation; the name makes ours deterministic, and the
    /// evaluator reports the tie (see [`crate::cnp::TierVerdict::ambiguous_with`]).
    pub fn precedence(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }
}

/// A rule of a ClusterNetworkPolicy, with what operators need to recognise it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ClusterRuleRef {
    pub tier: Tier,
    pub priority: u16,
    pub policy: String,
    pub direction: Direction,
    /// Index in the direction's rule list.
    pub rule: usize,
    /// The rule's `name` (may be empty).
    pub name: String,
    /// The action taken (a fail-closed Pass shows as Deny).
    pub action: Action,
}

impl fmt::Display for ClusterRuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterNetworkPolicy {} ({} tier, priority {}) {} rule #{}", self.policy, self.tier, self.priority, self.direction, self.rule)?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        write!(f, ": {}", self.action)
    }
}

impl ClusterRuleRef {
    pub fn new(policy: &ClusterPolicy, direction: Direction, rule: usize) -> ClusterRuleRef {
        let r = &policy.rules(direction)[rule];
        ClusterRuleRef {
            tier: policy.tier,
            priority: policy.priority,
            policy: policy.name.clone(),
            direction,
            rule,
            name: r.name.clone(),
            action: r.effective_action(),
        }
    }
}
