//! Words for policy pieces, as an operator reads them (kubectl's selector syntax).

use policy_model::labels::{Operator, Selector};
use policy_model::policy::{NamespaceScope, Peer, PortSpec, Rule};
use policy_model::{Direction, Policy};

/// `pod=b,app in (web,db),!legacy`; `{}` selects everything: "all".
pub fn selector(sel: &Selector) -> String {
    if sel.is_everything() {
        return "all".into();
    }
    let parts: Vec<String> = sel
        .requirements
        .iter()
        .map(|r| {
            let values: Vec<&str> = r.values.iter().map(String::as_str).collect();
            match r.operator {
                Operator::In if values.len() == 1 => format!("{}={}", r.key, values[0]),
                Operator::In => format!("{} in ({})", r.key, values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            }
        })
        .collect();
    parts.join(",")
}

pub fn peer(policy_ns: &str, p: &Peer) -> String {
    match p {
        Peer::Block(b) if b.except.is_empty() => format!("addresses in {}", b.cidr),
        Peer::Block(b) => {
            let ex: Vec<String> = b.except.iter().map(|e| e.to_string()).collect();
            format!("addresses in {} except {}", b.cidr, ex.join(", "))
        }
        Peer::Pods { namespaces, pods } => {
            let who = if pods.is_everything() { "all pods".to_string() } else { format!("pods [{}]", selector(pods)) };
            let whence = match namespaces {
                NamespaceScope::PolicyNamespace => format!("in namespace {policy_ns}"),
                NamespaceScope::Matching(s) if s.is_everything() => "in all namespaces".to_string(),
                NamespaceScope::Matching(s) => format!("in namespaces [{}]", selector(s)),
            };
            format!("{who} {whence}")
        }
    }
}

pub fn port(p: &PortSpec) -> String {
    match p {
        PortSpec::AnyPort(proto) => format!("{proto} (any port)"),
        PortSpec::Range(proto, r) if r.start == r.end => format!("{proto} {}", r.start),
        PortSpec::Range(proto, r) => format!("{proto} {}-{}", r.start, r.end),
        PortSpec::Named(proto, name) => format!("{proto} port named {name}"),
    }
}

/// One rule in one line: "from pods [pod=b] in namespace x, on TCP 80".
pub fn rule(policy: &Policy, direction: Direction, r: &Rule) -> String {
    let word = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let peers = match &r.peers {
        None => "any address".to_string(),
        Some(ps) => ps.iter().map(|p| peer(&policy.key.namespace, p)).collect::<Vec<_>>().join(" or "),
    };
    let ports = match &r.ports {
        None => "any protocol and port".to_string(),
        Some(ps) => ps.iter().map(port).collect::<Vec<_>>().join(", "),
    };
    format!("{word} {peers}, on {ports}")
}
