//! Property tests: random clusters and policies; the compiled tables must give the
//! reference evaluator's verdict for every flow, and incremental compilation must equal
//! compiling from scratch.

use std::collections::BTreeSet;
use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::{Change, NodeCompiler, Prefix, compile_endpoint};

pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub(crate) const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub(crate) const NODES: [(&str, &str, &str); 2] = [("n1", "10.250.0.1", "fd10:250::1"), ("n2", "10.250.0.2", "fd10:250::2")];
pub(crate) const PORT_NAMES: [&str; 4] = ["http", "dns", "metrics", "nope"];
pub(crate) const PORTS: [u16; 5] = [53, 80, 81, 8080, 9];
pub(crate) const CIDRS: [&str; 26] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.244.0.0/16",
    "10.244.0.0/24",
    "10.244.1.0/24",
    "10.244.0.0/28",
    "10.244.0.16/28",
    "10.244.0.8/29",
    "10.244.0.6/31",
    "10.244.0.6/32",
    "10.244.1.11/32",
    "10.250.0.0/24",
    "8.8.8.0/24",
    "::/0",
    "fd10::/16",
    "fd10:244::/48",
    "fd10:244::/64",
    "fd10:244:0:1::/64",
    "fd10:244::/124",
    "fd10:244::10/124",
    "fd10:244::8/125",
    "fd10:244::6/127",
    "fd10:244::6/128",
    "fd10:244:0:1::b/128",
    "fd10:250::/64",
    "2001:db8::/32",
];
const EXTERNAL: [&str; 5] = ["8.8.8.8", "10.244.0.200", "2001:db8::1", "fd10:244::c8", "10.250.0.9"];

#[derive(Debug, Clone)]
pub(crate) struct PodSpec {
    ns: usize,
    labels: Vec<(&'static str, &'static str)>,
    family: u8, // 0 v4, 1 v6, 2 dual
    node: usize,
    host_network: bool,
    named: Vec<(usize, u16, Protocol)>,
}

fn label_pairs() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    (prop::option::of(prop::sample::select(vec!["a", "b", "c"])), prop::option::of(prop::sample::select(vec!["web", "db"]))).prop_map(
        |(p, a)| {
            let mut v = vec![];
            if let Some(p) = p {
                v.push(("pod", p));
            }
            if let Some(a) = a {
                v.push(("app", a));
            }
            v
        },
    )
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

pub(crate) fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0..3usize,
        label_pairs(),
        0..3u8,
        0..2usize,
        prop::bool::weighted(0.1),
        prop::collection::vec((0..3usize, prop::sample::select(PORTS.to_vec()), protocol()), 0..3),
    )
        .prop_map(|(ns, labels, family, node, host_network, named)| PodSpec { ns, labels, family, node, host_network, named })
}

pub(crate) fn selector() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec!["pod", "app", "env", "team", "kubernetes.io/metadata.name"]);
    let values = prop::collection::btree_set(prop::sample::select(vec!["a", "b", "c", "web", "db", "x", "y", "z", "t1", "p"]), 1..3);
    let expr = (key, 0..4usize, values).prop_map(|(k, op, vals)| {
        let op = ["In", "NotIn", "Exists", "DoesNotExist"][op];
        if op == "In" || op == "NotIn" {
            json!({"key": k, "operator": op, "values": vals.into_iter().collect::<Vec<_>>()})
        } else {
            json!({"key": k, "operator": op})
        }
    });
    let match_labels =
        prop::option::of((prop::sample::select(vec!["pod", "app", "env"]), prop::sample::select(vec!["a", "b", "web", "p"])));
    (match_labels, prop::collection::vec(expr, 0..3)).prop_map(|(ml, exprs)| {
        let mut s = json!({});
        if let Some((k, v)) = ml {
            s["matchLabels"] = json!({k: v});
        }
        if !exprs.is_empty() {
            s["matchExpressions"] = Value::Array(exprs);
        }
        s
    })
}

fn ip_block() -> impl Strategy<Value = Value> {
    (0..CIDRS.len(), prop::collection::vec(0..CIDRS.len(), 0..3)).prop_map(|(c, ex)| {
        let cidr: Prefix = CIDRS[c].parse().unwrap();
        let except: Vec<&str> = ex
            .into_iter()
            .map(|i| CIDRS[i])
            .filter(|e| {
                let e: Prefix = e.parse().unwrap();
                cidr.contains(&e) && e.len() > cidr.len()
            })
            .collect();
        json!({"ipBlock": {"cidr": CIDRS[c], "except": except}})
    })
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        selector().prop_map(|s| json!({"namespaceSelector": s})),
        (selector(), selector()).prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        ip_block(),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    let proto = prop::option::of(protocol());
    let number = (prop::sample::select(PORTS.to_vec()), prop::option::of(prop::sample::select(vec![0u16, 1, 100, 8000])));
    let port = prop_oneof![
        Just(None),
        number.prop_map(|(p, e)| Some((json!(p), e.map(|d| p + d)))),
        prop::sample::select(PORT_NAMES.to_vec()).prop_map(|n| Some((json!(n), None)))
    ];
    (proto, port).prop_map(|(proto, port)| {
        let mut v = json!({});
        if let Some(p) = proto {
            v["protocol"] = json!(p.as_str());
        }
        if let Some((p, end)) = port {
            v["port"] = p;
            if let Some(e) = end {
                v["endPort"] = json!(e);
            }
        }
        v
    })
}

fn rules(peers_field: &'static str) -> impl Strategy<Value = Option<Value>> {
    let list = |s: BoxedStrategy<Value>| {
        prop_oneof![Just(None), Just(Some(json!([]))), prop::collection::vec(s, 1..3).prop_map(|v| Some(Value::Array(v)))]
    };
    let rule = (list(peer().boxed()), list(port().boxed())).prop_map(move |(peers, ports)| {
        let mut r = json!({});
        if let Some(p) = peers {
            r[peers_field] = p;
        }
        if let Some(p) = ports {
            r["ports"] = p;
        }
        r
    });
    prop_oneof![Just(None), Just(Some(json!([]))), prop::collection::vec(rule, 1..3).prop_map(|v| Some(Value::Array(v)))]
}

pub(crate) fn policy_spec() -> impl Strategy<Value = (usize, Value)> {
    let types = prop_oneof![Just(None), Just(Some(vec!["Ingress"])), Just(Some(vec!["Egress"])), Just(Some(vec!["Ingress", "Egress"]))];
    (0..3usize, selector(), types, rules("from"), rules("to")).prop_map(|(ns, sel, types, ingress, egress)| {
        let mut spec = json!({"podSelector": sel});
        if let Some(t) = types {
            spec["policyTypes"] = json!(t);
        }
        if let Some(i) = ingress {
            spec["ingress"] = i;
        }
        if let Some(e) = egress {
            spec["egress"] = e;
        }
        (ns, spec)
    })
}

pub(crate) fn ns_labels() -> impl Strategy<Value = Vec<Vec<(&'static str, &'static str)>>> {
    prop::collection::vec(
        (prop::option::of(prop::sample::select(vec!["a", "b"])), prop::option::of(prop::sample::select(vec!["t1", "t2"]))).prop_map(
            |(e, t)| {
                let mut v = vec![];
                if let Some(e) = e {
                    v.push(("env", e));
                }
                if let Some(t) = t {
                    v.push(("team", t));
                }
                v
            },
        ),
        3,
    )
}

pub(crate) fn pod_from(i: usize, s: &PodSpec) -> Pod {
    let ns = NAMESPACES[s.ns];
    let mut ips: Vec<String> = vec![];
    if s.host_network {
        let (_, v4, v6) = NODES[s.node];
        ips.push(v4.into());
        ips.push(v6.into());
    } else {
        if s.family != 1 {
            ips.push(format!("10.244.{}.{}", i % 2, 1 + i * 5));
        }
        if s.family != 0 {
            ips.push(format!("fd10:244:0:{}::{:x}", i % 2, 1 + i * 5));
        }
    }
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let mut pod = mk_pod(ns, &format!("p{i}"), &s.labels, &refs);
    pod.node = Some(NODES[s.node].0.to_string());
    pod.host_network = s.host_network;
    pod.named_ports = s
        .named
        .iter()
        .map(|(n, port, protocol)| NamedPort { name: PORT_NAMES[*n].to_string(), port: *port, protocol: *protocol })
        .collect();
    pod.named_ports.sort();
    pod.named_ports.dedup_by(|a, b| a.name == b.name);
    pod
}

pub(crate) fn world(ns: &[Vec<(&'static str, &'static str)>], pods: &[PodSpec], policies: &[(usize, Value)]) -> ClusterState {
    let mut state = ClusterState::new();
    for (i, labels) in ns.iter().enumerate() {
        state.upsert_namespace(mk_ns(NAMESPACES[i], labels));
    }
    for (name, v4, v6) in NODES {
        state.upsert_node(Node { name: name.into(), addresses: vec![v4.parse().unwrap(), v6.parse().unwrap()] });
    }
    for (i, s) in pods.iter().enumerate() {
        state.upsert_pod(pod_from(i, s));
    }
    for (i, (ns, spec)) in policies.iter().enumerate() {
        let p = Policy::from_k8s(&mk_policy(NAMESPACES[*ns], &format!("np{i}"), spec.clone())).expect("generated policies are valid");
        state.upsert_policy(p);
    }
    state
}

fn addresses(state: &ClusterState) -> Vec<IpAddr> {
    let mut set: BTreeSet<IpAddr> = state.pods().flat_map(|p| p.ips.iter().copied()).collect();
    set.extend(NODES.iter().flat_map(|(_, a, b)| [a.parse::<IpAddr>().unwrap(), b.parse().unwrap()]));
    set.extend(EXTERNAL.iter().map(|a| a.parse::<IpAddr>().unwrap()));
    set.into_iter().collect()
}

pub(crate) type FlowPick = (usize, usize, usize, usize);

pub(crate) fn flow_picks() -> impl Strategy<Value = Vec<FlowPick>> {
    prop::collection::vec((0..64usize, 0..64usize, 0..4usize, 0..PORTS.len()), 48)
}

pub(crate) fn check_flows(state: &ClusterState, picks: &[FlowPick]) -> Result<(), TestCaseError> {
    let addrs = addresses(state);
    let protos = [IpProtocol::TCP, IpProtocol::UDP, IpProtocol::SCTP, IpProtocol::ICMP];
    // Pod-to-pod pairs always, then the random picks.
    let pod_addrs: Vec<IpAddr> = state.pods().filter(|p| !p.host_network).flat_map(|p| p.ips.clone()).collect();
    let mut flows = Vec::new();
    for (i, s) in pod_addrs.iter().enumerate() {
        for d in &pod_addrs {
            let (_, _, pi, po) = picks[i % picks.len()];
            flows.push(Flow { src: *s, dst: *d, protocol: protos[pi], port: PORTS[po] });
        }
    }
    for &(s, d, p, port) in picks {
        flows.push(Flow { src: addrs[s % addrs.len()], dst: addrs[d % addrs.len()], protocol: protos[p], port: PORTS[port] });
    }
    for flow in flows {
        if IpAddr::is_ipv4(&flow.src) != IpAddr::is_ipv4(&flow.dst) {
            continue;
        }
        let reference = verdict(state, &flow);
        let compiled = compiled_verdict(state, &flow);
        prop_assert_eq!(reference.allowed, compiled, "flow {:?}: reference {:?}", flow, reference);
        // The same addresses on a packet the node forwarded (a client masqueraded to a
        // node address): no node exemption.
        let reference = crate::verdict_forwarded(state, &flow);
        let compiled = crate::tests::compiled_verdict_from(state, &flow, false);
        prop_assert_eq!(reference.allowed, compiled, "forwarded flow {:?}: reference {:?}", flow, reference);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(10_000), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// The compiled tables agree with the reference evaluator.
    #[test]
    fn compiled_tables_match_reference(
        ns in ns_labels(),
        pods in prop::collection::vec(pod_spec(), 1..7),
        policies in prop::collection::vec(policy_spec(), 0..5),
        picks in flow_picks(),
    ) {
        let state = world(&ns, &pods, &policies);
        check_flows(&state, &picks)?;
    }
}

#[derive(Debug, Clone)]
enum Step {
    Pod(usize, PodSpec),
    DeletePod(usize, usize),
    Policy(usize, (usize, Value)),
    DeletePolicy(usize, usize),
    Namespace(usize, Vec<(&'static str, &'static str)>),
    Node(usize, bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..7usize, pod_spec()).prop_map(|(i, s)| Step::Pod(i, s)),
        (0..3usize, 0..7usize).prop_map(|(n, i)| Step::DeletePod(n, i)),
        (0..5usize, policy_spec()).prop_map(|(i, p)| Step::Policy(i, p)),
        (0..3usize, 0..5usize).prop_map(|(n, i)| Step::DeletePolicy(n, i)),
        (0..3usize, ns_labels()).prop_map(|(i, l)| Step::Namespace(i, l[0].clone())),
        (0..2usize, any::<bool>()).prop_map(|(i, b)| Step::Node(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2_000), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// After every batch, the incremental compiler's tables equal a fresh compile, and
    /// every endpoint whose tables changed was reported.
    #[test]
    fn incremental_equals_full_compile(
        ns in ns_labels(),
        pods in prop::collection::vec(pod_spec(), 1..7),
        policies in prop::collection::vec(policy_spec(), 0..4),
        batches in prop::collection::vec(prop::collection::vec(step(), 1..4), 1..6),
    ) {
        let mut c = NodeCompiler::new("n1");
        let mut initial = vec![];
        for (i, l) in ns.iter().enumerate() {
            initial.push(Change::UpsertNamespace(mk_ns(NAMESPACES[i], l)));
        }
        for (name, v4, v6) in NODES {
            initial.push(Change::UpsertNode(Node { name: name.into(), addresses: vec![v4.parse().unwrap(), v6.parse().unwrap()] }));
        }
        for (i, s) in pods.iter().enumerate() {
            initial.push(Change::UpsertPod(pod_from(i, s)));
        }
        for (i, (n, spec)) in policies.iter().enumerate() {
            initial.push(Change::UpsertPolicy(Box::new(mk_policy(NAMESPACES[*n], &format!("np{i}"), spec.clone()))));
        }
        c.apply(initial);
        check_against_full(&c, None)?;

        for batch in batches {
            let before = c.clone();
            let changes: Vec<Change> = batch.into_iter().map(|s| match s {
                Step::Pod(i, spec) => Change::UpsertPod(pod_from(i, &spec)),
                Step::DeletePod(n, i) => Change::DeletePod(ObjectKey::new(NAMESPACES[n], format!("p{i}"))),
                Step::Policy(i, (n, spec)) => Change::UpsertPolicy(Box::new(mk_policy(NAMESPACES[n], &format!("np{i}"), spec))),
                Step::DeletePolicy(n, i) => Change::DeletePolicy(ObjectKey::new(NAMESPACES[n], format!("np{i}"))),
                Step::Namespace(i, l) => Change::UpsertNamespace(mk_ns(NAMESPACES[i], &l)),
                Step::Node(i, present) => {
                    let (name, v4, v6) = NODES[i];
                    if present {
                        Change::UpsertNode(Node { name: name.into(), addresses: vec![v4.parse().unwrap(), v6.parse().unwrap()] })
                    } else {
                        Change::DeleteNode(name.into())
                    }
                }
            }).collect();
            let report = c.apply(changes);
            check_against_full(&c, Some((&before, &report)))?;
        }
    }
}

pub(crate) fn check_against_full(c: &NodeCompiler, prev: Option<(&NodeCompiler, &crate::ChangeReport)>) -> Result<(), TestCaseError> {
    let state = c.state();
    let node_addrs = state.node_addresses("n1");
    let local: BTreeSet<ObjectKey> =
        state.pods().filter(|p| !p.host_network && p.node.as_deref() == Some("n1")).map(|p| p.key.clone()).collect();
    let have: BTreeSet<ObjectKey> = c.endpoints().map(|e| e.tables.pod.clone()).collect();
    prop_assert_eq!(&local, &have, "endpoint set");
    let ids: BTreeSet<u32> = c.endpoints().map(|e| e.id).collect();
    prop_assert_eq!(ids.len(), have.len(), "ids are unique");
    for key in &local {
        let pod = state.pod(key).unwrap();
        let fresh = compile_endpoint(state, pod, &node_addrs);
        let ep = c.endpoint(key).unwrap();
        prop_assert!(
            ep.tables.same_datapath(&fresh),
            "{} differs from a fresh compile:\nincremental {:?}\nfresh {:?}",
            key,
            ep.tables,
            fresh
        );
        if let Some((before, report)) = prev {
            if let Some(old) = before.endpoint(key) {
                if !old.tables.same_datapath(&fresh) {
                    prop_assert!(report.changed.contains(key) || report.added.contains(key), "{} changed but was not reported", key);
                    prop_assert_ne!(old.revision, ep.revision);
                } else {
                    prop_assert_eq!(old.revision, ep.revision);
                }
            }
        }
    }
    Ok(())
}
