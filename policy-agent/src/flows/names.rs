//! Names for kernel flow events: who held each address, and which policies and rules a
//! local pod's table stood for, at the time of the event.
//!
//! Pod addresses are reused, and events are read a little after they happen, so both are
//! kept with a short history: per address, its owners with the monotonic time (the
//! kernel's `bpf_ktime_get_ns` clock) the agent learnt of each; per endpoint id, the
//! tables of its last revisions (`FlowEvent::revision` picks the one the kernel used).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use policy_ebpf::{
    DIRECTION_INGRESS, FLOW_DECIDED_FAIL_CLOSED, FLOW_DECIDED_NO_PEER, FLOW_DECIDED_NOT_ISOLATED, FLOW_DECIDED_PEER_ALL,
    FLOW_DECIDED_PORT_DENIED, FLOW_DECIDED_PORTS, FLOW_VERDICT_ALLOWED, FLOW_VERDICT_AUDIT, FlowEvent,
};
use policy_model::{AddressOwner, ClusterState, Direction, EndpointTables, IpProtocol, ObjectKey, RuleRef};

use super::record::{End, Flow, Icmp, Interface, PolicyRef, rfc3339};
use crate::datapath::decode_addr;

/// Who held an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Pod(ObjectKey),
    Node(Arc<str>),
}

/// Owners kept per address (the current one and the ones before).
const ADDRESS_HISTORY: usize = 4;
/// Revisions of tables kept per endpoint.
const TABLE_HISTORY: usize = 4;

/// The history the agent keeps to name events (see the module docs).
#[derive(Default)]
pub struct Names {
    node: String,
    /// Per address: (monotonic ns from which it holds, owner or none), oldest first.
    addresses: HashMap<IpAddr, VecDeque<(u64, Option<Owner>)>>,
    /// The owners as of the last update, to find what changed.
    current: HashMap<IpAddr, Owner>,
    /// Per endpoint id: (revision, tables), oldest first.
    tables: HashMap<u32, VecDeque<(u32, Arc<EndpointTables>)>>,
    /// Interface names by index.
    interfaces: HashMap<u32, String>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in nanoseconds since the Unix epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime writes only into it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Names {
    pub fn new(node: &str) -> Names {
        Names { node: node.to_string(), ..Names::default() }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records the addresses' owners in `state`, as of monotonic time `now`.
    pub fn update_addresses(&mut self, state: &ClusterState, now: u64) {
        let mut owners: HashMap<IpAddr, Owner> = HashMap::with_capacity(self.current.len());
        for pod in state.pods() {
            for ip in &pod.ips {
                let owner = match state.owner(*ip) {
                    AddressOwner::Pod(p) => Owner::Pod(p.key.clone()),
                    AddressOwner::Node(n) => Owner::Node(Arc::from(n)),
                    AddressOwner::External => continue,
                };
                owners.insert(*ip, owner);
            }
        }
        // Nodes' own addresses (their hostNetwork pods' are in the loop above).
        for node in state.nodes() {
            let name: Arc<str> = Arc::from(node.name.as_str());
            for ip in &node.addresses {
                owners.entry(*ip).or_insert_with(|| Owner::Node(name.clone()));
            }
        }
        for (ip, owner) in &owners {
            if self.current.get(ip) != Some(owner) {
                self.push(*ip, now, Some(owner.clone()));
            }
        }
        let gone: Vec<IpAddr> = self.current.keys().filter(|ip| !owners.contains_key(ip)).copied().collect();
        for ip in gone {
            self.push(ip, now, None);
        }
        self.current = owners;
        // Addresses free for long enough are forgotten.
        self.addresses.retain(|_, h| h.back().is_some_and(|(t, o)| o.is_some() || now.saturating_sub(*t) < 600_000_000_000));
    }

    fn push(&mut self, ip: IpAddr, now: u64, owner: Option<Owner>) {
        let h = self.addresses.entry(ip).or_default();
        h.push_back((now, owner));
        while h.len() > ADDRESS_HISTORY {
            h.pop_front();
        }
    }

    /// Who held `ip` at monotonic time `t`. An address that was free then but taken
    /// later names its next owner: the kernel saw a packet from it, so a pod had it before
    /// the agent heard of that pod.
    pub fn owner_at(&self, ip: IpAddr, t: u64) -> Option<&Owner> {
        let h = self.addresses.get(&ip)?;
        let i = h.iter().rposition(|(from, _)| *from <= t);
        match i {
            Some(i) => match &h[i].1 {
                Some(o) => Some(o),
                None => h.iter().skip(i + 1).find_map(|(_, o)| o.as_ref()),
            },
            // Before the first record: the first owner known.
            None => h.iter().find_map(|(_, o)| o.as_ref()),
        }
    }

    /// Records endpoint `id`'s tables at `revision`, if that is new.
    pub fn update_endpoint(&mut self, id: u32, revision: u32, tables: &EndpointTables) {
        let h = self.tables.entry(id).or_default();
        if let Some((r, t)) = h.back() {
            // A revision changes with every change of the tables in the maps.
            if *r == revision && t.pod == tables.pod {
                return;
            }
            if *r == revision {
                h.pop_back();
            }
        }
        h.push_back((revision, Arc::new(tables.clone())));
        while h.len() > TABLE_HISTORY {
            h.pop_front();
        }
    }

    /// Forgets endpoints that are not in `ids`.
    pub fn retain_endpoints(&mut self, ids: &std::collections::HashSet<u32>) {
        self.tables.retain(|id, _| ids.contains(id));
    }

    pub fn set_interfaces(&mut self, interfaces: impl IntoIterator<Item = (u32, String)>) {
        self.interfaces = interfaces.into_iter().collect();
    }

    /// The tables endpoint `id` had at `revision` (exact), else its latest.
    fn tables_at(&self, id: u32, revision: u32) -> Option<(&EndpointTables, bool)> {
        let h = self.tables.get(&id)?;
        if let Some((_, t)) = h.iter().rev().find(|(r, _)| *r == revision) {
            return Some((&**t, true));
        }
        h.back().map(|(_, t)| (&**t, false))
    }

    fn end(&self, ip: IpAddr, port: Option<u16>, t: u64) -> End {
        let mut e = End { kind: "world".into(), namespace: None, pod: None, node: None, ip: ip.to_string(), port };
        match self.owner_at(ip, t) {
            Some(Owner::Pod(k)) => {
                e.kind = "pod".into();
                e.namespace = Some(k.namespace.to_string());
                e.pod = Some(k.name.to_string());
            }
            Some(Owner::Node(n)) => {
                e.kind = "node".into();
                e.node = Some(n.to_string());
            }
            None => {}
        }
        e
    }

    /// The flow of a kernel event; `boot_offset_ns`: CLOCK_REALTIME - CLOCK_MONOTONIC.
    pub fn name(&self, ev: &FlowEvent, boot_offset_ns: u64) -> Flow {
        let unix_ns = ev.time_ns.wrapping_add(boot_offset_ns);
        let src = decode_addr(&ev.src);
        let dst = decode_addr(&ev.dst);
        let protocol = IpProtocol(ev.protocol);
        let (sport, dport, icmp) = if protocol.has_ports() {
            (Some(ev.sport), Some(ev.dport), None)
        } else if ev.protocol == 1 || ev.protocol == 58 {
            (None, None, Some(Icmp { kind: (ev.sport >> 8) as u8, code: ev.sport as u8 }))
        } else {
            (None, None, None)
        };
        let ingress = ev.direction as u32 == DIRECTION_INGRESS;
        let direction = if ingress { "ingress" } else { "egress" };
        let allowed = ev.verdict == FLOW_VERDICT_ALLOWED;
        // Audit: the flow passed; the audit table (audited policies enforcing) denied it,
        // and `decided`/`port_set` are that table's.
        let audit = ev.verdict == FLOW_VERDICT_AUDIT;
        let dir = if ingress { Direction::Ingress } else { Direction::Egress };
        let remote = if ingress { src } else { dst };
        let found = self.tables_at(ev.endpoint, ev.revision);
        let subject = match found {
            Some((t, _)) => t.pod.to_string(),
            None => {
                let local = if ingress { dst } else { src };
                match self.owner_at(local, ev.time_ns) {
                    Some(Owner::Pod(k)) => k.to_string(),
                    _ => format!("endpoint {}", ev.endpoint),
                }
            }
        };
        let audit_table = found.and_then(|(t, _)| t.audit.get(dir));
        let table = if audit { audit_table.map(|a| &a.table) } else { found.map(|(t, _)| t.table(dir)) };
        let isolators = |out: &mut Vec<PolicyRef>| {
            if let Some(t) = table {
                out.extend(t.isolated_by.iter().map(|k| policy_ref(k, "isolates")));
            }
        };
        let entry_rules = |out: &mut Vec<PolicyRef>| {
            if let Some(e) = table.and_then(|t| t.lookup(remote)) {
                out.extend(e.rules.iter().map(rule_ref));
            }
        };
        let mut policies = Vec::new();
        let (decided_by, reason) = match ev.decided {
            FLOW_DECIDED_NOT_ISOLATED => ("not_isolated", format!("not isolated: no policy selects {subject} for {direction}")),
            FLOW_DECIDED_PEER_ALL | FLOW_DECIDED_PORTS => {
                entry_rules(&mut policies);
                let named: Vec<String> = policies.iter().map(PolicyRef::label).collect();
                ("rule", format!("allowed by {}", if named.is_empty() { "a rule".to_string() } else { named.join(", ") }))
            }
            FLOW_DECIDED_NO_PEER => {
                isolators(&mut policies);
                let named: Vec<String> = policies.iter().map(PolicyRef::label).collect();
                ("no_rule", format!("isolated by {}; no rule allows this peer", or_unknown(&named)))
            }
            FLOW_DECIDED_PORT_DENIED => {
                isolators(&mut policies);
                let isolating: Vec<String> = policies.iter().map(PolicyRef::label).collect();
                let before = policies.len();
                entry_rules(&mut policies);
                let rules: Vec<String> = policies[before..].iter().map(PolicyRef::label).collect();
                let deny = policies[before..].iter().any(|p| p.role == "deny");
                let text = if deny {
                    format!("denied by {}", rules.join(", "))
                } else if rules.is_empty() {
                    format!("isolated by {}; no rule allows this port", or_unknown(&isolating))
                } else {
                    format!("isolated by {}; the rules for this peer ({}) do not allow this port", or_unknown(&isolating), rules.join(", "))
                };
                ("port_not_allowed", text)
            }
            FLOW_DECIDED_FAIL_CLOSED => ("fail_closed", "the pod is fail-closed (its tables could not be written)".to_string()),
            _ => ("unknown", format!("decision code {}", ev.decided)),
        };
        let reason = if audit {
            // The audited policies first: what an operator looks for in audit mode.
            let audited: Vec<PolicyRef> =
                audit_table.map(|a| a.audited.iter().map(|k| policy_ref(k, "audited")).collect()).unwrap_or_default();
            let named: Vec<String> = audited.iter().map(PolicyRef::label).collect();
            policies.splice(0..0, audited);
            format!("allowed; audited {} would deny it: {reason}", or_unknown(&named))
        } else {
            reason
        };
        Flow {
            time: rfc3339(unix_ns),
            time_unix_ns: unix_ns,
            node: self.node.clone(),
            verdict: if audit {
                "audit"
            } else if allowed {
                "allowed"
            } else {
                "denied"
            }
            .into(),
            direction: direction.into(),
            subject,
            source: self.end(src, sport, ev.time_ns),
            destination: self.end(dst, dport, ev.time_ns),
            protocol: protocol.to_string(),
            icmp,
            interface: Interface { index: ev.ifindex, name: self.interfaces.get(&ev.ifindex).cloned() },
            decided_by: decided_by.into(),
            reason,
            policies,
            revision: ev.revision,
            tables_exact: found.is_some_and(|(_, exact)| exact),
        }
    }
}

fn or_unknown(names: &[String]) -> String {
    if names.is_empty() { "its policies".to_string() } else { names.join(", ") }
}

/// A policy by its key (a ClusterNetworkPolicy's has no namespace), in a role.
fn policy_ref(k: &ObjectKey, role: &str) -> PolicyRef {
    let cluster = k.namespace.is_empty();
    PolicyRef {
        kind: if cluster { "ClusterNetworkPolicy" } else { "NetworkPolicy" }.into(),
        namespace: (!cluster).then(|| k.namespace.to_string()),
        name: k.name.to_string(),
        role: role.into(),
        rule: None,
        tier: None,
        priority: None,
        rule_name: None,
    }
}

fn rule_ref(r: &RuleRef) -> PolicyRef {
    match &r.cluster {
        Some(c) => PolicyRef {
            kind: "ClusterNetworkPolicy".into(),
            namespace: None,
            name: c.policy.clone(),
            role: c.action.to_string().to_lowercase(),
            rule: Some(c.rule),
            tier: Some(c.tier.to_string()),
            priority: Some(c.priority),
            rule_name: (!c.name.is_empty()).then(|| c.name.clone()),
        },
        None => PolicyRef {
            kind: "NetworkPolicy".into(),
            namespace: Some(r.policy.namespace.to_string()),
            name: r.policy.name.to_string(),
            role: "allows".into(),
            rule: Some(r.rule),
            tier: None,
            priority: None,
            rule_name: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Option<Owner> {
        Some(Owner::Pod(ObjectKey::new(ns, name)))
    }

    #[test]
    fn a_reused_address_names_the_owner_of_the_time() {
        let mut n = Names::new("n");
        let ip: IpAddr = "10.244.0.5".parse().unwrap();
        n.push(ip, 100, pod("x", "old"));
        n.push(ip, 200, None);
        n.push(ip, 300, pod("x", "new"));
        assert_eq!(n.owner_at(ip, 150), pod("x", "old").as_ref());
        // Free when the packet was seen: the next owner had it already.
        assert_eq!(n.owner_at(ip, 250), pod("x", "new").as_ref());
        assert_eq!(n.owner_at(ip, 350), pod("x", "new").as_ref());
        // Before anything was known: the first owner.
        assert_eq!(n.owner_at(ip, 50), pod("x", "old").as_ref());
        assert_eq!(n.owner_at("10.9.9.9".parse().unwrap(), 150), None);
    }

    /// An audit event (the enforced table allowed, the audit table denied) is named with
    /// the audit table: verdict `audit`, the audited policy first, and why it would deny.
    #[test]
    fn an_audit_event_names_the_audited_policy() {
        let mut m = crate::manifests::Manifests::default();
        m.add_yaml(
            "t",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: n1, containers: []}
status: {podIPs: [{ip: 10.244.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: n1, containers: []}
status: {podIPs: [{ip: 10.244.0.11}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x, annotations: {policy-agent.io/enforcement: audit}}
spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress]}
"#,
        );
        let (mut state, errors) = m.state();
        assert!(errors.is_empty(), "{errors:?}");
        let b = state.pod(&ObjectKey::new("x", "b")).unwrap().clone();
        let tables = policy_model::audit::compile_pod_with_audit(&mut state, &b);
        let mut n = Names::new("n1");
        n.update_addresses(&state, 0);
        n.update_endpoint(7, 3, &tables);
        let ev = FlowEvent {
            time_ns: 10,
            src: crate::datapath::encode_addr("10.244.0.10".parse().unwrap()),
            dst: crate::datapath::encode_addr("10.244.0.11".parse().unwrap()),
            endpoint: 7,
            revision: 3,
            sport: 40000,
            dport: 80,
            protocol: 6,
            direction: DIRECTION_INGRESS as u8,
            verdict: FLOW_VERDICT_AUDIT,
            decided: FLOW_DECIDED_NO_PEER,
            ..FlowEvent::default()
        };
        let f = n.name(&ev, 0);
        assert_eq!((f.verdict.as_str(), f.subject.as_str(), f.decided_by.as_str()), ("audit", "x/b", "no_rule"));
        assert_eq!(f.policies[0].label(), "x/deny");
        assert_eq!(f.policies[0].role, "audited");
        assert_eq!(f.reason, "allowed; audited x/deny would deny it: isolated by x/deny; no rule allows this peer");
        assert!(f.text().contains("AUDIT  (ingress of x/b: allowed; audited x/deny would deny it"), "{}", f.text());
    }

    #[test]
    fn history_is_bounded() {
        let mut n = Names::new("n");
        let ip: IpAddr = "10.244.0.5".parse().unwrap();
        for i in 0..100u64 {
            n.push(ip, i, pod("x", &format!("p{i}")));
        }
        assert_eq!(n.addresses[&ip].len(), ADDRESS_HISTORY);
        assert_eq!(n.owner_at(ip, 99), pod("x", "p99").as_ref());
    }
}
