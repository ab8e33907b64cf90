//! NetworkPolicies, defaulted and validated as the API server would, in a form the
//! evaluator and the compiler share.

use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::error::{FieldError, InvalidObject};
use crate::ip::Prefix;
use crate::labels::Selector;
use crate::objects::ObjectKey;
use crate::ports::{PortRange, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub key: ObjectKey,
    pub pod_selector: Selector,
    /// `Some` when the policy isolates ingress (policyTypes holds Ingress); the rules, each
    /// an allowance. `Some(vec![])` isolates and allows nothing.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// Its `policy-agent.io/enforcement` annotation ([`crate::audit`]).
    pub enforcement: crate::audit::Enforcement,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// One rule: traffic is allowed when a peer and a port both match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// `None`: the rule names no peer, so it matches every address (inside the cluster or not).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Peer {
    /// Pods (never hostNetwork ones) selected by labels in the scoped namespaces.
    Pods { namespaces: NamespaceScope, pods: Selector },
    /// Addresses in `cidr` and in none of `except`, pod addresses included.
    Block(IpBlock),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NamespaceScope {
    /// No namespaceSelector: the policy's own namespace.
    PolicyNamespace,
    /// A namespaceSelector (`{}` = every namespace).
    Matching(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpBlock {
    pub cidr: Prefix,
    pub except: Vec<Prefix>,
}

impl IpBlock {
    pub fn contains(&self, addr: std::net::IpAddr) -> bool {
        self.cidr.contains_addr(addr) && !self.except.iter().any(|e| e.contains_addr(addr))
    }
}

/// One entry of a rule's `ports`, with the protocol defaulted to TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PortSpec {
    /// A protocol with no port: every port of it.
    AnyPort(Protocol),
    /// `port` (and `endPort`): a numeric range.
    Range(Protocol, PortRange),
    /// A named container port, resolved on the destination pod, with the same protocol.
    Named(Protocol, String),
}

impl PortSpec {
    pub fn protocol(&self) -> Protocol {
        match self {
            PortSpec::AnyPort(p) | PortSpec::Range(p, _) | PortSpec::Named(p, _) => *p,
        }
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortSpec::AnyPort(p) => write!(f, "{p} any port"),
            PortSpec::Range(p, r) => write!(f, "{p} {r}"),
            PortSpec::Named(p, n) => write!(f, "{p} port named {n:?}"),
        }
    }
}

impl Policy {
    /// Defaults and validates a NetworkPolicy as the API server does; every invalid field is
    /// reported, naming the policy.
    pub fn from_k8s(np: &net::NetworkPolicy) -> Result<Policy, InvalidObject> {
        let key = ObjectKey::new(
            np.metadata.namespace.clone().unwrap_or_else(|| "default".to_string()),
            np.metadata.name.clone().unwrap_or_default(),
        );
        let mut errors = Vec::new();
        if key.name.is_empty() {
            errors.push(FieldError::new("metadata.name", "Required value"));
        }
        let default_spec = net::NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default_spec);
        let pod_selector = match &spec.pod_selector {
            Some(sel) => Selector::from_k8s(sel, "spec.podSelector", &mut errors),
            None => Selector::everything(),
        };

        let ingress_rules: Vec<Rule> = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| convert_rule(r.from.as_deref(), r.ports.as_deref(), &format!("spec.ingress[{i}]"), "from", &mut errors))
            .collect();
        let egress_rules: Vec<Rule> = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| convert_rule(r.to.as_deref(), r.ports.as_deref(), &format!("spec.egress[{i}]"), "to", &mut errors))
            .collect();

        // policyTypes defaulting (SetDefaults_NetworkPolicy): Ingress always, Egress only
        // when egress rules exist.
        let (mut isolates_ingress, mut isolates_egress) = (false, false);
        match spec.policy_types.as_deref() {
            None | Some([]) => {
                isolates_ingress = true;
                isolates_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
            Some(types) => {
                if types.len() > 2 {
                    errors.push(FieldError::new("spec.policyTypes", "Invalid value: may not specify more than two policyTypes"));
                }
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => isolates_ingress = true,
                        "Egress" => isolates_egress = true,
                        other => errors.push(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("Unsupported value: {other:?}: supported values: \"Ingress\", \"Egress\""),
                        )),
                    }
                }
            }
        }

        if !errors.is_empty() {
            return Err(InvalidObject { kind: "NetworkPolicy", key, errors });
        }
        Ok(Policy {
            key,
            pod_selector,
            ingress: isolates_ingress.then_some(ingress_rules),
            egress: isolates_egress.then_some(egress_rules),
            // An invalid value is not a validation error: the policy is enforced (fail
            // closed) and the value reported (`Enforcement::error`).
            enforcement: crate::audit::Enforcement::from_annotations(np.metadata.annotations.as_ref()),
        })
    }
}

fn convert_rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    field: &str,
    peers_name: &str,
    errors: &mut Vec<FieldError>,
) -> Rule {
    // Empty and missing lists mean the same: no restriction.
    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
        peers.iter().enumerate().filter_map(|(i, p)| convert_peer(p, &format!("{field}.{peers_name}[{i}]"), errors)).collect()
    });
    let ports = ports
        .filter(|p| !p.is_empty())
        .map(|ports| ports.iter().enumerate().filter_map(|(i, p)| convert_port(p, &format!("{field}.ports[{i}]"), errors)).collect());
    Rule { peers, ports }
}

fn convert_peer(peer: &net::NetworkPolicyPeer, field: &str, errors: &mut Vec<FieldError>) -> Option<Peer> {
    let set = [peer.pod_selector.is_some(), peer.namespace_selector.is_some(), peer.ip_block.is_some()];
    match set {
        [false, false, false] => {
            errors.push(FieldError::new(field, "Required value: must specify a peer"));
            None
        }
        [_, _, true] if set.iter().filter(|b| **b).count() > 1 => {
            errors.push(FieldError::new(field, "Forbidden: may not specify both ipBlock and another peer"));
            None
        }
        [false, false, true] => {
            let block = peer.ip_block.as_ref()?;
            convert_ip_block(block, &format!("{field}.ipBlock"), errors).map(Peer::Block)
        }
        _ => {
            let pods = match &peer.pod_selector {
                Some(s) => Selector::from_k8s(s, &format!("{field}.podSelector"), errors),
                None => Selector::everything(),
            };
            let namespaces = match &peer.namespace_selector {
                Some(s) => NamespaceScope::Matching(Selector::from_k8s(s, &format!("{field}.namespaceSelector"), errors)),
                None => NamespaceScope::PolicyNamespace,
            };
            Some(Peer::Pods { namespaces, pods })
        }
    }
}

fn convert_ip_block(block: &net::IPBlock, field: &str, errors: &mut Vec<FieldError>) -> Option<IpBlock> {
    if block.cidr.is_empty() {
        errors.push(FieldError::new(format!("{field}.cidr"), "Required value"));
        return None;
    }
    let cidr = match block.cidr.parse::<Prefix>() {
        Ok(c) => c,
        Err(e) => {
            errors.push(FieldError::new(format!("{field}.cidr"), format!("Invalid value: {:?}: {e}", block.cidr)));
            return None;
        }
    };
    let mut except = Vec::new();
    for (i, s) in block.except.iter().flatten().enumerate() {
        let f = format!("{field}.except[{i}]");
        match s.parse::<Prefix>() {
            Err(e) => errors.push(FieldError::new(f, format!("Invalid value: {s:?}: {e}"))),
            // The API server requires a strict subset: inside cidr and longer.
            Ok(e) if !(cidr.contains(&e) && e.len() > cidr.len()) => {
                errors.push(FieldError::new(f, format!("Invalid value: {s:?}: must be a strict subset of `cidr` {}", block.cidr)))
            }
            Ok(e) => except.push(e),
        }
    }
    except.sort();
    except.dedup();
    Some(IpBlock { cidr, except })
}

/// IANA_SVC_NAME, as `validation.IsValidPortName`.
fn is_valid_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

fn convert_port(port: &net::NetworkPolicyPort, field: &str, errors: &mut Vec<FieldError>) -> Option<PortSpec> {
    let before = errors.len();
    let protocol = match port.protocol.as_deref() {
        // SetDefaults_NetworkPolicyPort: only a missing protocol means TCP.
        None => Protocol::Tcp,
        Some(s) => match s.parse::<Protocol>() {
            Ok(p) => p,
            Err(_) => {
                errors.push(FieldError::new(
                    format!("{field}.protocol"),
                    format!("Unsupported value: {s:?}: supported values: \"TCP\", \"UDP\", \"SCTP\""),
                ));
                Protocol::Tcp
            }
        },
    };
    let valid_port = |n: i32| (1..=65535).contains(&n);
    let spec = match (&port.port, port.end_port) {
        (None, None) => Some(PortSpec::AnyPort(protocol)),
        (None, Some(_)) => {
            errors.push(FieldError::new(format!("{field}.endPort"), "Invalid value: may not be specified when `port` is not specified"));
            None
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                errors.push(FieldError::new(format!("{field}.endPort"), "Invalid value: may not be specified when `port` is non-numeric"));
            }
            if !is_valid_port_name(name) {
                errors.push(FieldError::new(
                    format!("{field}.port"),
                    format!("Invalid value: {name:?}: must be a port number or an IANA_SVC_NAME (at most 15 lowercase letters, digits and single hyphens, with a letter)"),
                ));
            }
            Some(PortSpec::Named(protocol, name.clone()))
        }
        (Some(IntOrString::Int(n)), end) => {
            if !valid_port(*n) {
                errors
                    .push(FieldError::new(format!("{field}.port"), format!("Invalid value: {n}: must be between 1 and 65535, inclusive")));
            }
            if let Some(end) = end {
                if end < *n {
                    errors.push(FieldError::new(
                        format!("{field}.endPort"),
                        format!("Invalid value: {end}: must be greater than or equal to `port` ({n})"),
                    ));
                } else if !valid_port(end) {
                    errors.push(FieldError::new(
                        format!("{field}.endPort"),
                        format!("Invalid value: {end}: must be between 1 and 65535, inclusive"),
                    ));
                }
            }
            let end = end.unwrap_or(*n);
            Some(PortSpec::Range(protocol, PortRange { start: (*n).clamp(0, 65535) as u16, end: end.clamp(0, 65535) as u16 }))
        }
    };
    if errors.len() > before { None } else { spec }
}
