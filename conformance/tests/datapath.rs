//! The datapath on real veths in network namespaces, with real sockets. Needs root and
//! BPF; fails (never skips) without them.

use conformance::rig::Rig;
use policy_model::{Change, NamedPort, ObjectKey, Pod, Protocol};
use serde_json::json;

fn pod(key: &str, labels: &[(&str, &str)], v4: &str, v6: &str) -> Pod {
    let mut named_ports = Vec::new();
    for port in [80u16, 81] {
        for p in Protocol::ALL {
            named_ports.push(NamedPort { name: format!("serve-{port}-{}", p.as_str().to_lowercase()), port, protocol: p });
        }
    }
    Pod {
        key: ObjectKey::parse(key).unwrap(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ips: vec![v4.parse().unwrap(), v6.parse().unwrap()],
        node: Some(conformance::rig::NODE.into()),
        host_network: false,
        named_ports,
    }
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Change {
    Change::UpsertPolicy(Box::new(
        serde_json::from_value(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})).unwrap(),
    ))
}

fn three_pods() -> Rig {
    Rig::new(vec![
        pod("x/a", &[("pod", "a")], "10.244.0.10", "fd10:244::a"),
        pod("x/b", &[("pod", "b")], "10.244.0.11", "fd10:244::b"),
        pod("y/a", &[("pod", "a")], "10.244.0.12", "fd10:244::c"),
    ])
    .expect("rig (needs root, BPF and iproute2: run scripts/setup.sh)")
}

#[test]
fn default_deny_ingress() {
    let mut rig = three_pods();
    assert!(rig.probe("x/a", "x/b", Protocol::Tcp, 80, false), "no policy: allowed");
    rig.apply(vec![policy("x", "deny", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}))]).unwrap();
    assert!(!rig.probe("x/a", "x/b", Protocol::Tcp, 80, false), "x/b isolated");
    assert!(!rig.probe("y/a", "x/b", Protocol::Tcp, 80, true), "x/b isolated over IPv6");
    assert!(rig.probe("x/b", "x/a", Protocol::Tcp, 80, false), "x/b's egress is not isolated");
    assert!(rig.probe("y/a", "x/a", Protocol::Tcp, 80, false), "x/a is not isolated");
}

fn ns_rig() -> Rig {
    Rig::new(vec![
        pod("x/a", &[("pod", "a")], "10.244.0.10", "fd10:244::a"),
        pod("x/b", &[("pod", "b")], "10.244.0.11", "fd10:244::b"),
        pod("x/c", &[("pod", "c")], "10.244.0.12", "fd10:244::c"),
        pod("y/a", &[("pod", "a")], "10.244.1.10", "fd10:244:0:1::a"),
        pod("y/b", &[("pod", "b")], "10.244.1.11", "fd10:244:0:1::b"),
    ])
    .expect("rig")
}

/// Probes every listed (from, to) pair in both families and checks the verdicts.
fn expect(rig: &Rig, proto: Protocol, port: u16, cases: &[(&str, &str, bool)]) {
    for v6 in [false, true] {
        for (from, to, want) in cases {
            let got = rig.probe(from, to, proto, port, v6);
            assert_eq!(
                got,
                *want,
                "{from} -> {to} {proto}/{port} over {}: expected {}",
                if v6 { "IPv6" } else { "IPv4" },
                if *want { "allowed" } else { "blocked" }
            );
        }
    }
}

#[test]
fn allow_by_pod_and_by_namespace() {
    let mut rig = ns_rig();
    rig.apply(vec![
        policy("x", "a-from-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})),
        policy("x", "c-from-y", json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]})),
    ])
    .unwrap();
    expect(
        &rig,
        Protocol::Tcp,
        80,
        &[
            ("x/b", "x/a", true),
            ("x/c", "x/a", false),
            ("y/b", "x/a", false),
            ("y/a", "x/c", true),
            ("y/b", "x/c", true),
            ("x/a", "x/c", false),
        ],
    );
}

#[test]
fn ip_block_with_except() {
    let mut rig = ns_rig();
    rig.apply(vec![policy(
        "x",
        "a-egress",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [
        {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24", "10.244.0.12/32"]}},
        {"ipBlock": {"cidr": "fd10:244::/48", "except": ["fd10:244:0:1::/64", "fd10:244::c/128"]}}]}]}),
    )])
    .unwrap();
    expect(
        &rig,
        Protocol::Tcp,
        80,
        &[("x/a", "x/b", true), ("x/a", "x/c", false), ("x/a", "y/a", false), ("x/a", "y/b", false), ("x/b", "x/c", true)],
    );
}

#[test]
fn named_port_and_end_port_range() {
    let mut rig = ns_rig();
    rig.apply(vec![
        policy("x", "a-named", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]})),
        policy("x", "b-range", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]})),
    ])
    .unwrap();
    expect(&rig, Protocol::Tcp, 81, &[("y/a", "x/a", true), ("y/a", "x/b", true)]);
    expect(&rig, Protocol::Tcp, 80, &[("y/a", "x/a", false), ("y/a", "x/b", false)]);
    expect(&rig, Protocol::Udp, 81, &[("y/a", "x/a", false), ("y/a", "x/b", false)]);
}

#[test]
fn udp_and_sctp_requests_get_their_replies() {
    let mut rig = ns_rig();
    expect(&rig, Protocol::Udp, 80, &[("x/a", "x/b", true)]);
    expect(&rig, Protocol::Sctp, 80, &[("x/a", "x/b", true)]);
    rig.apply(vec![
        // x/b admits UDP 80 and SCTP 81 from anyone, and its egress allows nothing: the
        // replies must still get out (connection tracking).
        policy(
            "x",
            "b",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "UDP", "port": 80}, {"protocol": "SCTP", "port": 81}]}], "egress": []}),
        ),
    ])
    .unwrap();
    expect(&rig, Protocol::Udp, 80, &[("x/a", "x/b", true), ("y/a", "x/b", true)]);
    expect(&rig, Protocol::Udp, 81, &[("x/a", "x/b", false)]);
    expect(&rig, Protocol::Sctp, 81, &[("x/a", "x/b", true)]);
    expect(&rig, Protocol::Sctp, 80, &[("x/a", "x/b", false)]);
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", false), ("x/b", "x/a", false)]);
}

/// Upstream test 27: x/a egress allows only port 80, yet x/b reaches x/a:81 — x/a's
/// replies are replies, not new egress.
#[test]
fn replies_pass_upstream_27() {
    let mut rig = ns_rig();
    rig.apply(vec![policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress", "Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}], "egress": [{"ports": [{"protocol": "TCP", "port": 80}]}]}),
    )])
    .unwrap();
    expect(&rig, Protocol::Tcp, 81, &[("x/b", "x/a", true), ("x/c", "x/a", false), ("x/a", "x/b", false)]);
    expect(&rig, Protocol::Tcp, 80, &[("x/b", "x/a", true), ("x/a", "x/b", true), ("x/a", "y/a", true)]);
}

/// Upstream test 37: x/a denies all ingress but its own connections' replies come back.
#[test]
fn replies_pass_upstream_37() {
    let mut rig = ns_rig();
    rig.apply(vec![policy(
        "x",
        "a-egress-all",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{}]}),
    )])
    .unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("x/b", "x/a", true)]);
    rig.apply(vec![policy(
        "x",
        "a-deny-ingress",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": []}),
    )])
    .unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("x/a", "y/b", true), ("x/b", "x/a", false)]);
    expect(&rig, Protocol::Udp, 80, &[("x/a", "x/b", true), ("x/b", "x/a", false)]);
}

#[test]
fn node_reaches_isolated_pods() {
    let mut rig = ns_rig();
    rig.apply(vec![policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))]).unwrap();
    assert!(rig.probe_from_node(rig.ip("x/a", true), 80), "node to pod over IPv4");
    assert!(rig.probe_from_node(rig.ip("x/a", false), 80), "node to pod over IPv6");
    expect(&rig, Protocol::Tcp, 80, &[("y/a", "x/a", false), ("x/a", "y/a", false)]);
}

#[test]
fn anti_spoofing() {
    let mut rig = ns_rig();
    // Only x/b may reach y/a; x/a claims x/b's address.
    rig.apply(vec![policy(
        "y",
        "a-from-xb",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )])
    .unwrap();
    assert!(rig.probe("x/b", "y/a", Protocol::Tcp, 80, false));
    for v4 in [true, false] {
        let spoofed = rig.ip("x/b", v4);
        assert!(!rig.probe_spoofed("x/a", spoofed, rig.ip("y/a", v4), 80), "x/a forging x/b's address is dropped");
        assert!(!rig.probe_spoofed("x/a", spoofed, rig.ip("y/b", v4), 80), "forged sources are dropped even toward unisolated pods");
    }
    assert!(rig.probe("x/a", "y/b", Protocol::Tcp, 80, false), "x/a's own address still works");
}

#[test]
fn counters_count_allowed_and_denied() {
    let mut rig = ns_rig();
    rig.apply(vec![policy(
        "x",
        "a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 80}]}]}),
    )])
    .unwrap();
    assert!(rig.probe("x/b", "x/a", Protocol::Tcp, 80, false));
    assert!(!rig.probe("x/b", "x/a", Protocol::Tcp, 81, false));
    let [ingress, egress] = rig.counters("x/a").unwrap();
    assert!(ingress.allowed_packets >= 3 && ingress.allowed_bytes > 0, "{ingress:?}");
    assert!(ingress.denied_packets >= 1, "{ingress:?}");
    assert!(egress.allowed_packets >= 2, "replies counted on egress: {egress:?}");
}
