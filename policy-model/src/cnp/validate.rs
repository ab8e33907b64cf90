//! Validation as the v0.2.0 CRD schema and its CEL rules do it: bounds, list sizes,
//! "exactly one of", CIDR syntax. Every invalid field is reported, naming the policy.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::model::*;
use super::types::*;
use crate::error::{FieldError, InvalidObject};
use crate::ip::Prefix;
use crate::labels::Selector;
use crate::objects::ObjectKey;
use crate::ports::{PortRange, Protocol};

/// `MaxItems` of rules, peers, CIDRs, domain names and protocols.
pub const MAX_ITEMS: usize = 25;
pub const MAX_PRIORITY: i64 = 1000;
pub const MAX_RULE_NAME: usize = 100;
/// `MaxLength` of a CIDR string.
pub const MAX_CIDR_LEN: usize = 43;

impl ClusterPolicy {
    /// Validates a ClusterNetworkPolicy as the API server would with the v0.2.0 CRD.
    pub fn from_manifest(cnp: &ClusterNetworkPolicy) -> Result<ClusterPolicy, InvalidObject> {
        let name = cnp.metadata.name.clone().unwrap_or_default();
        let mut v = Validator { errors: Vec::new(), warnings: Vec::new() };
        if name.is_empty() {
            v.err("metadata.name", "Required value");
        }
        let spec = &cnp.spec;
        let tier = match spec.tier.as_deref() {
            None => {
                v.err("spec.tier", "Required value");
                None
            }
            Some("Admin") => Some(Tier::Admin),
            Some("Baseline") => Some(Tier::Baseline),
            Some(other) => {
                v.err("spec.tier", format!("Unsupported value: {other:?}: supported values: \"Admin\", \"Baseline\""));
                None
            }
        };
        let priority = match spec.priority {
            None => {
                v.err("spec.priority", "Required value");
                None
            }
            Some(p) if !(0..=MAX_PRIORITY).contains(&p) => {
                v.err("spec.priority", format!("Invalid value: {p}: must be between 0 and {MAX_PRIORITY}, inclusive"));
                None
            }
            Some(p) => Some(p as u16),
        };
        let subject = v.subject(spec.subject.as_ref());
        let ingress: Vec<ClusterRule> = v.list(spec.ingress.as_deref(), "spec.ingress", false, |v, r, f| {
            let peers = v.required_list(r.from.as_deref(), &format!("{f}.from"), |v, p, pf| v.ingress_peer(p, pf));
            v.rule(r.name.as_deref(), r.action.as_deref(), peers, r.protocols.as_deref(), f)
        });
        let egress: Vec<ClusterRule> = v.list(spec.egress.as_deref(), "spec.egress", false, |v, r, f| {
            let peers = v.required_list(r.to.as_deref(), &format!("{f}.to"), |v, p, pf| v.egress_peer(p, pf));
            // CEL on the egress rule: named ports exist only on pods.
            let podless = peers.iter().any(|p| matches!(p, ClusterPeer::Networks(_) | ClusterPeer::Nodes(_) | ClusterPeer::DomainNames(_)));
            let named = r.protocols.iter().flatten().any(|p| p.destination_named_port.is_some());
            if podless && named {
                v.err(
                    f,
                    "Invalid value: \"object\": networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames",
                );
            }
            v.rule(r.name.as_deref(), r.action.as_deref(), peers, r.protocols.as_deref(), f)
        });

        let key = ObjectKey::new("", if name.is_empty() { "<unnamed>" } else { &name });
        match (tier, priority, subject) {
            (Some(tier), Some(priority), Some(subject)) if v.errors.is_empty() => {
                Ok(ClusterPolicy { name, tier, priority, subject, ingress, egress, warnings: v.warnings })
            }
            _ => Err(InvalidObject { kind: KIND, key, errors: v.errors }),
        }
    }
}

struct Validator {
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

impl Validator {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// An optional list (`MaxItems=25`; `min_one`: `MinItems=1` when present).
    fn list<T, U>(
        &mut self,
        items: Option<&[T]>,
        field: &str,
        min_one: bool,
        mut each: impl FnMut(&mut Validator, &T, &str) -> Option<U>,
    ) -> Vec<U> {
        let Some(items) = items else { return Vec::new() };
        if min_one && items.is_empty() {
            self.err(field, "Invalid value: 0: must have at least 1 items");
        }
        if items.len() > MAX_ITEMS {
            self.err(field, format!("Too many: {}: must have at most {MAX_ITEMS} items", items.len()));
        }
        items.iter().enumerate().filter_map(|(i, item)| each(self, item, &format!("{field}[{i}]"))).collect()
    }

    fn required_list<T, U>(
        &mut self,
        items: Option<&[T]>,
        field: &str,
        each: impl FnMut(&mut Validator, &T, &str) -> Option<U>,
    ) -> Vec<U> {
        if items.is_none() {
            self.err(field, "Required value");
        }
        self.list(items, field, true, each)
    }

    fn selector(&mut self, sel: &LabelSelector, field: &str) -> Selector {
        Selector::from_k8s(sel, field, &mut self.errors)
    }

    fn namespaced_pod(&mut self, p: &NamespacedPod, field: &str) -> (Selector, Selector) {
        let namespaces = match &p.namespace_selector {
            Some(s) => self.selector(s, &format!("{field}.namespaceSelector")),
            None => Selector::everything(),
        };
        let pods = match &p.pod_selector {
            Some(s) => self.selector(s, &format!("{field}.podSelector")),
            None => {
                self.err(format!("{field}.podSelector"), "Required value");
                Selector::everything()
            }
        };
        (namespaces, pods)
    }

    fn subject(&mut self, subject: Option<&ClusterNetworkPolicySubject>) -> Option<Subject> {
        let Some(s) = subject else {
            self.err("spec.subject", "Required value");
            return None;
        };
        match (&s.namespaces, &s.pods) {
            (Some(ns), None) => Some(Subject::Namespaces(self.selector(ns, "spec.subject.namespaces"))),
            (None, Some(p)) => {
                let (namespaces, pods) = self.namespaced_pod(p, "spec.subject.pods");
                Some(Subject::Pods { namespaces, pods })
            }
            (Some(_), Some(_)) => {
                self.err("spec.subject", "Too many: 2: must have at most 1 items (exactly one of `namespaces` or `pods`)");
                None
            }
            // A subject written for a newer API: refuse rather than guess whom it selects.
            (None, None) => {
                self.err("spec.subject", "Required value: exactly one of `namespaces` or `pods` must be set");
                None
            }
        }
    }

    /// Counts set fields of a peer: more than one is invalid; none is a peer of a newer API,
    /// which fails closed (upstream: "treat the rule as matching no traffic" for Accept,
    /// "as a 'Deny all' rule" for Deny and Pass).
    fn peer_fields(&mut self, set: usize, field: &str) -> bool {
        if set > 1 {
            self.err(field, format!("Too many: {set}: must have at most 1 items (exactly one peer field may be set)"));
            return false;
        }
        true
    }

    fn ingress_peer(&mut self, p: &ClusterNetworkPolicyIngressPeer, field: &str) -> Option<ClusterPeer> {
        let set = [p.namespaces.is_some(), p.pods.is_some()].iter().filter(|b| **b).count();
        if !self.peer_fields(set, field) {
            return None;
        }
        if let Some(ns) = &p.namespaces {
            return Some(ClusterPeer::Namespaces(self.selector(ns, &format!("{field}.namespaces"))));
        }
        if let Some(pods) = &p.pods {
            let (namespaces, pods) = self.namespaced_pod(pods, &format!("{field}.pods"));
            return Some(ClusterPeer::Pods { namespaces, pods });
        }
        Some(ClusterPeer::Unknown)
    }

    fn egress_peer(&mut self, p: &ClusterNetworkPolicyEgressPeer, field: &str) -> Option<ClusterPeer> {
        let set = [p.namespaces.is_some(), p.pods.is_some(), p.nodes.is_some(), p.networks.is_some(), p.domain_names.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if !self.peer_fields(set, field) {
            return None;
        }
        if let Some(ns) = &p.namespaces {
            return Some(ClusterPeer::Namespaces(self.selector(ns, &format!("{field}.namespaces"))));
        }
        if let Some(pods) = &p.pods {
            let (namespaces, pods) = self.namespaced_pod(pods, &format!("{field}.pods"));
            return Some(ClusterPeer::Pods { namespaces, pods });
        }
        if let Some(nodes) = &p.nodes {
            return Some(ClusterPeer::Nodes(self.selector(nodes, &format!("{field}.nodes"))));
        }
        if let Some(networks) = &p.networks {
            let f = format!("{field}.networks");
            let mut seen = BTreeSet::new();
            let cidrs = self.list(Some(networks.as_slice()), &f, true, |v, s: &String, cf| {
                if !seen.insert(s.clone()) {
                    v.err(cf, format!("Duplicate value: {s:?}"));
                }
                if s.len() > MAX_CIDR_LEN {
                    v.err(cf, format!("Too long: may not be more than {MAX_CIDR_LEN} bytes"));
                    return None;
                }
                match s.parse::<Prefix>() {
                    Ok(p) => Some(p),
                    Err(e) => {
                        v.err(cf, format!("Invalid value: {s:?}: Invalid CIDR format provided ({e})"));
                        None
                    }
                }
            });
            return Some(ClusterPeer::Networks(cidrs));
        }
        if let Some(names) = &p.domain_names {
            let f = format!("{field}.domainNames");
            let mut seen = BTreeSet::new();
            let names = self.list(Some(names.as_slice()), &f, true, |v, s: &String, nf| {
                if !seen.insert(s.clone()) {
                    v.err(nf, format!("Duplicate value: {s:?}"));
                }
                if !is_domain_name(s) {
                    v.err(nf, format!("Invalid value: {s:?}: must be a domain name, optionally prefixed by `*.`"));
                }
                Some(s.clone())
            });
            return Some(ClusterPeer::DomainNames(names));
        }
        Some(ClusterPeer::Unknown)
    }

    fn rule(
        &mut self,
        name: Option<&str>,
        action: Option<&str>,
        peers: Vec<ClusterPeer>,
        protocols: Option<&[ClusterNetworkPolicyProtocol]>,
        field: &str,
    ) -> Option<ClusterRule> {
        let name = name.unwrap_or_default().to_string();
        if name.chars().count() > MAX_RULE_NAME {
            self.err(format!("{field}.name"), format!("Too long: may not be more than {MAX_RULE_NAME} bytes"));
        }
        let action = match action {
            None => {
                self.err(format!("{field}.action"), "Required value");
                None
            }
            Some("Accept") => Some(Action::Accept),
            Some("Deny") => Some(Action::Deny),
            Some("Pass") => Some(Action::Pass),
            Some(other) => {
                self.err(format!("{field}.action"), format!("Unsupported value: {other:?}: supported values: \"Accept\", \"Deny\", \"Pass\""));
                None
            }
        };
        let protocols = protocols.map(|ps| self.list(Some(ps), &format!("{field}.protocols"), true, |v, p, pf| v.protocol(p, pf)));
        let action = action?;
        let unknown = peers.iter().any(|p| matches!(p, ClusterPeer::Unknown));
        let domains = peers.iter().any(|p| matches!(p, ClusterPeer::DomainNames(_)));
        if domains && action != Action::Accept {
            // CEL on the egress rule, as the API server refuses it.
            self.err(field, "Invalid value: \"object\": domainNames peer can only be used with Accept action");
            return None;
        }
        // Unknown peers: the rule as a whole fails closed (upstream wording). Domain names
        // in an Accept rule only make that peer match nothing: the other peers are
        // understood, and accepting less than asked is the closed side.
        let fail_closed = match action {
            Action::Accept if unknown => Some(FailClosed::MatchesNothing),
            Action::Deny | Action::Pass if unknown => Some(FailClosed::DenyAll),
            _ => None,
        };
        let to_from = if field.starts_with("spec.egress") { "to" } else { "from" };
        match fail_closed {
            Some(FailClosed::MatchesNothing) => self.warnings.push(FieldError::new(
                format!("{field}.{to_from}"),
                "a peer sets no field this version knows: the Accept rule fails closed and matches no traffic",
            )),
            Some(FailClosed::DenyAll) => self.warnings.push(FieldError::new(
                format!("{field}.{to_from}"),
                format!("a peer sets no field this version knows: the {action} rule fails closed and denies all traffic"),
            )),
            None if domains => self.warnings.push(FieldError::new(
                format!("{field}.{to_from}"),
                "domainNames peers are not supported: they match no traffic (the rule's other peers still do)",
            )),
            None => {}
        }
        Some(ClusterRule { name, action, peers, protocols, fail_closed })
    }

    fn protocol(&mut self, p: &ClusterNetworkPolicyProtocol, field: &str) -> Option<ClusterPort> {
        let forms = [(Protocol::Tcp, &p.tcp, "tcp"), (Protocol::Udp, &p.udp, "udp"), (Protocol::Sctp, &p.sctp, "sctp")];
        let set = forms.iter().filter(|(_, m, _)| m.is_some()).count() + p.destination_named_port.is_some() as usize;
        if set != 1 {
            self.err(
                field,
                format!("Invalid value: {set} fields set: exactly one of `tcp`, `udp`, `sctp` or `destinationNamedPort` must be set"),
            );
            return None;
        }
        if let Some(name) = &p.destination_named_port {
            if name.is_empty() {
                self.err(format!("{field}.destinationNamedPort"), "Required value");
                return None;
            }
            return Some(ClusterPort::Named(name.clone()));
        }
        let (protocol, m, key) = forms.into_iter().find(|(_, m, _)| m.is_some())?;
        let f = format!("{field}.{key}.destinationPort");
        let Some(port) = m.as_ref().and_then(|m| m.destination_port.as_ref()) else {
            self.err(f, "Required value");
            return None;
        };
        let valid = |n: i64| (1..=65535).contains(&n);
        match (port.number, &port.range) {
            (Some(n), None) => {
                if !valid(n) {
                    self.err(format!("{f}.number"), format!("Invalid value: {n}: must be between 1 and 65535, inclusive"));
                    return None;
                }
                Some(ClusterPort::Range(protocol, PortRange::single(n as u16)))
            }
            (None, Some(r)) => {
                let before = self.errors.len();
                for (bound, v) in [("start", r.start), ("end", r.end)] {
                    match v {
                        None => self.err(format!("{f}.range.{bound}"), "Required value"),
                        Some(n) if !valid(n) => {
                            self.err(format!("{f}.range.{bound}"), format!("Invalid value: {n}: must be between 1 and 65535, inclusive"))
                        }
                        _ => {}
                    }
                }
                if self.errors.len() > before {
                    return None;
                }
                let (start, end) = (r.start? as u16, r.end? as u16);
                if start >= end {
                    self.err(format!("{f}.range"), "Invalid value: \"object\": Start port must be less than End port");
                    return None;
                }
                Some(ClusterPort::Range(protocol, PortRange { start, end }))
            }
            _ => {
                self.err(f, "Invalid value: exactly one of `number` or `range` must be set");
                None
            }
        }
    }
}

/// The CRD's DomainName pattern: `(*.)?` then dot-separated labels of
/// `[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?`, at least two, optionally a trailing dot.
fn is_domain_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    let s = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        })
}
