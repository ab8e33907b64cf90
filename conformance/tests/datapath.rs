//! The datapath on real veths in network namespaces, with real sockets. Needs root and
//! BPF; fails (never skips) without them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conformance::rig::Rig;
use policy_agent::datapath::{MapSizes, SyncErrorKind};
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

fn service_rig() -> Rig {
    let rig = ns_rig();
    for (proto, vip4, vip6) in [("tcp", "10.96.0.10", "fd10:96::10"), ("udp", "10.96.0.10", "fd10:96::10")] {
        rig.node.dnat(vip4.parse().unwrap(), 8080, rig.ip("x/b", true), 80, proto).expect("DNAT rule");
        rig.node.dnat(vip6.parse().unwrap(), 8080, rig.ip("x/b", false), 80, proto).expect("DNAT rule");
    }
    rig.set_services(vec!["10.96.0.0/16".parse().unwrap(), "fd10:96::/112".parse().unwrap()]).unwrap();
    rig
}

fn vip(v6: bool) -> std::net::IpAddr {
    if v6 { "fd10:96::10".parse().unwrap() } else { "10.96.0.10".parse().unwrap() }
}

#[test]
fn service_traffic_is_judged_on_the_backend_and_target_port() {
    let mut rig = service_rig();
    for v6 in [false, true] {
        assert!(rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "the Service works without policy");
    }
    // Ingress of the backend: pod peer and the target port (80), not the Service port.
    rig.apply(vec![policy(
        "x",
        "b-from-a-80",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 80}]}]}),
    )])
    .unwrap();
    for v6 in [false, true] {
        assert!(rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "allowed: from x/a to backend port 80");
        assert!(!rig.probe_addr("x/a", vip(v6), Protocol::Udp, 8080), "UDP is not allowed");
        assert!(!rig.probe_addr("x/c", vip(v6), Protocol::Tcp, 8080), "x/c is not a peer");
    }
    rig.apply(vec![policy(
        "x",
        "b-from-a-80",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 8080}]}]}),
    )])
    .unwrap();
    for v6 in [false, true] {
        assert!(!rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "the Service port opens nothing on the backend");
    }
}

#[test]
fn service_egress_is_judged_after_translation() {
    let mut rig = service_rig();
    // Egress of the client: to the backend pod on its target port.
    rig.apply(vec![policy("x", "a-to-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 80}]}]}))])
    .unwrap();
    for v6 in [false, true] {
        assert!(rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "to: pod b, port 80, through the ClusterIP");
        assert!(rig.probe_addr("x/a", vip(v6), Protocol::Udp, 8080), "UDP request and reply through the ClusterIP");
    }
    // An allow-list of the ClusterIP and its port does not open the backend.
    rig.apply(vec![policy("x", "a-to-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.96.0.10/32"}}, {"ipBlock": {"cidr": "fd10:96::10/128"}}], "ports": [{"protocol": "TCP", "port": 8080}]}]}))])
    .unwrap();
    for v6 in [false, true] {
        assert!(!rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "a ClusterIP allow-list is not the backend");
    }
}

/// An external network behind the node's masquerade: `198.51.100.10` and `2001:db8:100::10`
/// (documentation ranges, inside the test's namespaces only).
struct External {
    /// Held so the namespace lives as long as the test.
    _ns: conformance::netns::Netns,
    _servers: conformance::traffic::Servers,
}

fn external(rig: &Rig) -> External {
    external_with(rig, true)
}

/// [`external`]; `attach`: the agent's programs go on `up0` (a node device it knows).
fn external_with(rig: &Rig, attach: bool) -> External {
    let ns = conformance::netns::Netns::create(&conformance::netns::unique("pax")).unwrap();
    rig.node.ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ns.name()]).unwrap();
    rig.node.ns.ip(&["-4", "addr", "add", "198.51.100.1/24", "dev", "up0"]).unwrap();
    rig.node.ns.ip(&["-6", "addr", "add", "2001:db8:100::1/64", "dev", "up0", "nodad"]).unwrap();
    rig.node.ns.ip(&["link", "set", "up0", "up"]).unwrap();
    ns.ip(&["-4", "addr", "add", "198.51.100.10/24", "dev", "eth0"]).unwrap();
    ns.ip(&["-6", "addr", "add", "2001:db8:100::10/64", "dev", "eth0", "nodad"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    for tool in ["iptables", "ip6tables"] {
        rig.node.ns.exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-o", "up0", "-j", "MASQUERADE"]).unwrap();
    }
    if attach {
        rig.attach_node_devices(&["up0"]).unwrap();
    }
    let servers = conformance::traffic::serve(&ns, &[80, 81]).unwrap();
    External { _ns: ns, _servers: servers }
}

/// A Service inside the configured Service range (whose entry defers every protocol to
/// DNAT) with an endpoint off the cluster, behind the node's masquerade: its flows are
/// judged before translation, against the Service address. Judged after DNAT instead, the
/// masquerade would hide them from `node_egress`, and a datagram the policy denies would
/// reach the endpoint before its reply was judged and dropped.
#[test]
fn a_service_with_an_endpoint_off_the_cluster_is_judged_before_translation() {
    let mut rig = ns_rig();
    let ext = external(&rig);
    let vip: std::net::IpAddr = "10.96.0.20".parse().unwrap();
    let backend: std::net::IpAddr = "198.51.100.10".parse().unwrap();
    for proto in ["tcp", "udp"] {
        rig.node.dnat(vip, 8080, backend, 80, proto).expect("DNAT rule");
    }
    rig.node.dnat(vip, 9090, backend, 90, "udp").expect("DNAT rule");
    rig.set_service_placement(vec!["10.96.0.0/16".parse().unwrap()], vec![], vec!["10.96.0.20/32".parse().unwrap()]).unwrap();
    // Where a datagram for 198.51.100.10:90 would land.
    let sink = ext._ns.run(|| std::net::UdpSocket::bind("198.51.100.10:90")).unwrap().expect("bind the sink");
    sink.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    // Allowed by the Service address and port, the flow works through the translation.
    rig.apply(vec![policy("x", "a-out", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.96.0.20/32"}}], "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "UDP", "port": 8080}]}]}))])
    .unwrap();
    assert!(rig.probe_addr("x/a", vip, Protocol::Tcp, 8080), "allowed by the Service address and port");
    assert!(rig.probe_addr("x/a", vip, Protocol::Udp, 8080), "UDP too");
    // Allowed by the endpoint only: nothing leaves, not even the first datagram.
    rig.apply(vec![policy(
        "x",
        "a-out",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.10/32"}}]}]}),
    )])
    .unwrap();
    assert!(!rig.probe_addr("x/a", vip, Protocol::Tcp, 8080), "the endpoint's address does not open the Service");
    assert!(!rig.probe_addr("x/a", vip, Protocol::Udp, 9090), "no reply");
    let mut buf = [0u8; 64];
    let leaked = sink.recv_from(&mut buf);
    assert!(leaked.is_err(), "a datagram the policy denies reached the endpoint: {leaked:?}");
    // Nothing isolates x/b: its datagram goes through (the sink works).
    assert!(!rig.probe_addr("x/b", vip, Protocol::Udp, 9090), "the sink does not answer");
    assert!(sink.recv_from(&mut buf).is_ok(), "x/b's datagram reaches the endpoint");
}

/// A host off the node (198.51.100.10 behind the node's `up0`, 198.51.100.1) that routes
/// to the pods itself: unlike [`external`], nothing masquerades, so the pods see its own
/// address (IPv4 only).
fn routed_peer(rig: &Rig) -> conformance::netns::Netns {
    let ext = conformance::netns::Netns::create(&conformance::netns::unique("pax")).unwrap();
    rig.node.ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ext.name()]).unwrap();
    rig.node.ns.ip(&["-4", "addr", "add", "198.51.100.1/24", "dev", "up0"]).unwrap();
    rig.node.ns.ip(&["link", "set", "up0", "up"]).unwrap();
    ext.ip(&["-4", "addr", "add", "198.51.100.10/24", "dev", "eth0"]).unwrap();
    ext.ip(&["link", "set", "eth0", "up"]).unwrap();
    ext.ip(&["-4", "route", "add", "10.244.0.0/16", "via", "198.51.100.1"]).unwrap();
    ext
}

#[test]
fn masqueraded_traffic_is_judged_by_egress_rules() {
    let mut rig = ns_rig();
    let _ext = external(&rig);
    let ext4: std::net::IpAddr = "198.51.100.10".parse().unwrap();
    let ext6: std::net::IpAddr = "2001:db8:100::10".parse().unwrap();
    for ext in [ext4, ext6] {
        assert!(rig.probe_addr("x/a", ext, Protocol::Tcp, 81), "no policy: the outside is reachable (masqueraded)");
    }
    rig.apply(vec![policy("x", "a-out", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}, {"ipBlock": {"cidr": "2001:db8:100::/64"}}], "ports": [{"protocol": "TCP", "port": 80}]}]}))])
    .unwrap();
    for ext in [ext4, ext6] {
        assert!(rig.probe_addr("x/a", ext, Protocol::Tcp, 80), "{ext}:80 is allowed");
        assert!(!rig.probe_addr("x/a", ext, Protocol::Tcp, 81), "{ext}:81 is not");
        assert!(rig.probe_addr("x/b", ext, Protocol::Tcp, 81), "x/b is not isolated");
    }
    rig.apply(vec![policy("x", "a-out", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.10/32"]}}, {"ipBlock": {"cidr": "2001:db8:100::/64", "except": ["2001:db8:100::10/128"]}}]}]}))])
    .unwrap();
    for ext in [ext4, ext6] {
        assert!(!rig.probe_addr("x/a", ext, Protocol::Tcp, 80), "{ext} is excepted");
    }
}

/// `n` distinct /32 ipBlock peers, half in 9.<base>.0.0/16 and half in 11.<base>.0.0/16:
/// filler that makes a table large, so a change takes a while to write. The pods'
/// 10.244/16 entries sort in the middle, so an update in the wrong order (an entry
/// removed before the one that takes over its addresses is written) would leave them
/// missing for as long as part of the filler takes.
fn filler(base: u8, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| json!({"ipBlock": {"cidr": format!("{}.{base}.{}.{}/32", if i % 2 == 0 { 9 } else { 11 }, i / 500, 1 + (i / 2) % 250)}}))
        .collect()
}

/// Table size for the flip test: large enough that writing a change takes milliseconds,
/// so probes land inside the window an update in the wrong order would open.
const FLIP_FILLER: usize = 8000;

#[test]
fn revision_flip_under_traffic_is_atomic() {
    let mut rig = ns_rig();
    // Both policies admit x/c on 80, through different entries (its /32 as a pod, then a
    // /30 ipBlock around it), so each change adds one and removes the other; the old one
    // also admits x/a on 80; neither ever admits 81. Every change also replaces all the
    // filler.
    let old = |rig: &mut Rig| {
        let mut peers = filler(98, FLIP_FILLER);
        peers.push(json!({"podSelector": {"matchLabels": {"pod": "c"}}}));
        peers.push(json!({"podSelector": {"matchLabels": {"pod": "a"}}}));
        rig.apply(vec![policy("x", "b", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": peers, "ports": [{"port": 80}]}]}))]).unwrap();
    };
    let new = |rig: &mut Rig| {
        let mut peers = filler(99, FLIP_FILLER);
        peers.push(json!({"ipBlock": {"cidr": "10.244.0.12/30"}}));
        rig.apply(vec![policy("x", "b", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": peers, "ports": [{"port": 80}]}]}))]).unwrap();
    };
    old(&mut rig);
    let done = Arc::new(AtomicBool::new(false));
    let b4 = rig.ip("x/b", true);
    // A timeout below TCP's initial retransmission (1 s): a dropped SYN is a failed probe,
    // not one rescued by its retransmission.
    let timeout = std::time::Duration::from_millis(500);
    let mut watchers = Vec::new();
    // Probers hold namespace handles, not the rig: they run while policies are written.
    for (from, port, want) in [("x/c", 80u16, true), ("x/c", 80, true), ("x/a", 81, false)] {
        let ns = rig.pod(from).net.ns.handle();
        let done = done.clone();
        watchers.push(std::thread::spawn(move || {
            let mut probes = 0u32;
            while !done.load(Ordering::Relaxed) {
                let ok = conformance::traffic::probe_in(&ns, Protocol::Tcp, std::net::SocketAddr::new(b4, port), timeout).unwrap();
                assert_eq!(ok, want, "{from} -> x/b:{port} must always be {}", if want { "allowed" } else { "blocked" });
                probes += 1;
            }
            probes
        }));
    }
    // Flip back and forth while they probe; each flip rewrites thousands of entries.
    for i in 0..24 {
        if i % 2 == 0 {
            new(&mut rig)
        } else {
            old(&mut rig)
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    done.store(true, Ordering::Relaxed);
    let probes: Vec<u32> = watchers.into_iter().map(|h| h.join().expect("an invariant was broken")).collect();
    assert!(probes.iter().all(|n| *n > 0), "every prober ran: {probes:?}");
    // The last flip (old) is in force.
    assert!(rig.probe("x/a", "x/b", Protocol::Tcp, 80, false), "the old policy, applied last, admits x/a");
    new(&mut rig);
    assert!(!rig.probe("x/a", "x/b", Protocol::Tcp, 80, false), "the new one does not");
}

#[test]
fn enforcement_survives_the_agent_and_a_new_agent_reuses_the_maps() {
    let mut rig = ns_rig();
    rig.apply(vec![policy("x", "b-from-a", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}))]).unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("x/c", "x/b", false)]);
    let before = rig.counters("x/b").unwrap()[0];
    rig.stop_agent();
    // No agent: the pinned programs and maps go on enforcing.
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("x/c", "x/b", false)]);
    rig.start_agent().unwrap();
    let after = rig.counters("x/b").unwrap()[0];
    assert!(
        after.allowed_packets > before.allowed_packets && after.denied_packets > before.denied_packets,
        "the counters map was reused, and counted while no agent ran: {before:?} -> {after:?}"
    );
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("x/c", "x/b", false)]);
    rig.apply(vec![policy("x", "b-from-a", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}))]).unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", false), ("x/c", "x/b", true)]);
}

#[test]
fn a_full_map_leaves_that_pod_fail_closed_and_others_enforced() {
    let sizes = policy_agent::datapath::MapSizes { peer_entries: 64, ..conformance::rig::test_sizes() };
    let mut rig = Rig::with_sizes(
        vec![
            pod("x/a", &[("pod", "a")], "10.244.0.10", "fd10:244::a"),
            pod("x/b", &[("pod", "b")], "10.244.0.11", "fd10:244::b"),
            pod("y/a", &[("pod", "a")], "10.244.1.10", "fd10:244:0:1::a"),
        ],
        sizes,
    )
    .unwrap();
    rig.apply(vec![policy("y", "a-from-x", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}))]).unwrap();
    let mut peers = filler(97, 100);
    peers.push(json!({"podSelector": {"matchLabels": {"pod": "a"}}}));
    let report = rig
        .apply_report(vec![policy(
            "x",
            "b-big",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": peers}]}),
        )])
        .unwrap();
    let big = ObjectKey::parse("x/b-big").unwrap();
    assert!(
        report.errors.iter().any(|e| e.pod.to_string() == "x/b"
            && matches!(&e.kind, SyncErrorKind::TooBig { map: "PEERS", policies, .. } if *policies == [big.clone()])
            && e.to_string().contains("fail-closed")),
        "{:?}",
        report.errors
    );
    // x/b's policy would admit x/a, but its tables could not be written: deny everything.
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", false), ("y/a", "x/b", false), ("x/b", "x/a", false)]);
    // Others are unaffected.
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "y/a", true), ("y/a", "x/a", true)]);
    // A smaller policy recovers it.
    rig.apply(vec![policy("x", "b-big", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}))]).unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("y/a", "x/b", false)]);
}

#[test]
fn icmp_follows_the_rules_without_ports() {
    use conformance::traffic::ping;
    let mut rig = ns_rig();
    let t = std::time::Duration::from_millis(400);
    for v4 in [true, false] {
        assert!(ping(&rig.pod("x/a").net.ns.handle(), rig.ip("x/b", v4), t).unwrap(), "no policy: echo works");
    }
    // x/b admits TCP 80 from anyone, and anything from x/a.
    rig.apply(vec![policy(
        "x",
        "b",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"ports": [{"port": 80}]}, {"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
    )])
    .unwrap();
    for v4 in [true, false] {
        assert!(ping(&rig.pod("x/a").net.ns.handle(), rig.ip("x/b", v4), t).unwrap(), "a rule without ports allows ICMP");
        assert!(!ping(&rig.pod("x/c").net.ns.handle(), rig.ip("x/b", v4), t).unwrap(), "a rule with ports does not");
    }
}

#[test]
fn icmp_errors_of_tracked_flows_pass() {
    use conformance::traffic::{UdpOutcome, udp_outcome};
    let mut rig = ns_rig();
    // x/a accepts nothing, x/b may send nothing: only the error about x/a's own flow may
    // travel from x/b to x/a.
    rig.apply(vec![
        policy("x", "a", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]})),
        policy("x", "b", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress", "Egress"], "ingress": [{"ports": [{"protocol": "UDP", "port": 82}]}]})),
    ])
    .unwrap();
    for v4 in [true, false] {
        let dst = std::net::SocketAddr::new(rig.ip("x/b", v4), 82);
        let got = udp_outcome(&rig.pod("x/a").net.ns.handle(), dst, std::time::Duration::from_millis(500)).unwrap();
        assert_eq!(got, UdpOutcome::Refused, "the port-unreachable error reaches the client");
    }
}

#[test]
fn fin_and_rst_end_tracked_connections() {
    let rig = ns_rig();
    let (a, b) = (rig.ip("x/a", true), rig.ip("x/b", true));
    let find = |port: u16| {
        rig.conntrack().into_iter().find(|(k, _)| {
            let ends = [
                (policy_agent::datapath::decode_addr(&k.lo_addr), k.lo_port),
                (policy_agent::datapath::decode_addr(&k.hi_addr), k.hi_port),
            ];
            ends.contains(&(a, port)) && ends.contains(&(b, 80))
        })
    };
    let port = conformance::traffic::tcp_exchange_then_reset(
        &rig.pod("x/a").net.ns.handle(),
        std::net::SocketAddr::new(b, 80),
        std::time::Duration::from_secs(1),
    )
    .unwrap()
    .expect("connection");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (_, v) = find(port).expect("entry of a reset connection");
    assert_ne!(v.flags & policy_ebpf::CT_TCP_RESET, 0, "RST seen: the entry expires within a second");

    // A normal close: the entry is marked closing (it expires in seconds, not hours).
    let ns = rig.pod("x/a").net.ns.handle();
    let port = ns
        .run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect((b, 80)).unwrap();
            let port = s.local_addr().unwrap().port();
            s.write_all(b"h").unwrap();
            let mut x = [0u8; 1];
            s.read_exact(&mut x).unwrap();
            drop(s);
            port
        })
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (_, v) = find(port).expect("entry of a closed connection");
    assert_ne!(v.flags & policy_ebpf::CT_TCP_CLOSING, 0, "FIN seen: closing");
}

/// Probes `from` -> `to`:`port` (TCP, IPv4) until `done`, asserting every probe gets `want`;
/// returns the number of probes.
fn keep_probing(rig: &Rig, from: &str, to: &str, port: u16, want: bool, done: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let ns = rig.pod(from).net.ns.handle();
    let dst = std::net::SocketAddr::new(rig.ip(to, true), port);
    let (from, to) = (from.to_string(), to.to_string());
    std::thread::spawn(move || {
        let mut n = 0;
        while !done.load(Ordering::Relaxed) {
            let ok = conformance::traffic::probe_in(&ns, Protocol::Tcp, dst, Duration::from_millis(500)).unwrap();
            assert_eq!(ok, want, "{from} -> {to}:{port} must always be {}", if want { "allowed" } else { "blocked" });
            n += 1;
        }
        n
    })
}

fn ingress_from(selected: &str, peers: Vec<serde_json::Value>) -> serde_json::Value {
    json!({"podSelector": {"matchLabels": {"pod": selected}}, "policyTypes": ["Ingress"], "ingress": [{"from": peers}]})
}

/// A pod whose tables do not fit is fail-closed alone, and named with the policies that
/// make it big; the others keep their tables, also through later updates that need room
/// (the map keeps a margin), and through the deletion that lets it recover: after every
/// single sync step, no other pod is fail-closed (agent status and kernel entry) and
/// their allowed traffic passes.
#[test]
fn a_pod_too_big_for_the_map_is_closed_alone_and_recovers_without_closing_others() {
    let sizes = MapSizes { peer_entries: 1024, ..conformance::rig::test_sizes() };
    let mut rig = Rig::with_sizes(
        vec![
            pod("x/a", &[("pod", "a")], "10.244.0.10", "fd10:244::a"),
            pod("x/b", &[("pod", "b")], "10.244.0.11", "fd10:244::b"),
            pod("y/a", &[("pod", "a")], "10.244.1.10", "fd10:244:0:1::a"),
        ],
        sizes,
    )
    .unwrap();
    rig.apply(vec![policy("y", "a-from-a", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}))]).unwrap();
    // x/a: about half the map.
    rig.apply(vec![policy("x", "a-big", ingress_from("a", filler(97, 480)))]).unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "y/a", true), ("x/b", "x/a", false)]);
    // x/b: would fit in what is left, but not with the margin the others' updates need.
    let mut peers = filler(98, 480);
    peers.push(json!({"podSelector": {"matchLabels": {"pod": "a"}}}));
    let b_big = policy("x", "b-big", ingress_from("b", peers));
    let no_other_closed = |steps: &[(policy_agent::datapath::SyncReport, Vec<conformance::rig::PodStep>)], what: &str| {
        for (i, (_, pods)) in steps.iter().enumerate() {
            for p in pods.iter().filter(|p| p.pod.to_string() != "x/b") {
                assert!(!p.fail_closed && !p.kernel_fail_closed, "{what}, step {i}: {} is fail-closed", p.pod);
            }
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let prober = keep_probing(&rig, "x/a", "y/a", 80, true, done.clone());
    let steps = rig.apply_stepwise(vec![b_big], 40, Duration::from_millis(2)).unwrap();
    no_other_closed(&steps, "adding x/b-big");
    let errors: Vec<_> = steps.iter().flat_map(|(r, _)| r.errors.iter()).collect();
    let b_big = ObjectKey::parse("x/b-big").unwrap();
    assert!(
        errors.iter().any(|e| e.pod.to_string() == "x/b"
            && matches!(&e.kind, SyncErrorKind::TooBig { map: "PEERS", needed_entries, policies, .. } if *needed_entries > 480 && *policies == [b_big.clone()])),
        "{errors:?}"
    );
    assert!(steps.last().unwrap().1.iter().any(|p| p.pod.to_string() == "x/b" && p.fail_closed && p.kernel_fail_closed));
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", false), ("x/b", "x/a", false), ("x/a", "y/a", true)]);
    // x/a's table is replaced (as many entries added as removed): it fits beside the old.
    let steps = rig.apply_stepwise(vec![policy("x", "a-big", ingress_from("a", filler(96, 480)))], 40, Duration::from_millis(2)).unwrap();
    no_other_closed(&steps, "replacing x/a's table");
    assert!(steps.len() > 10, "replacing x/a's table took several steps: {}", steps.len());
    // Deleting the big policy: x/b recovers, nobody else is closed on the way.
    let steps = rig.apply_stepwise(vec![Change::DeletePolicy(b_big)], 40, Duration::from_millis(2)).unwrap();
    no_other_closed(&steps, "deleting x/b-big");
    assert!(steps.iter().all(|(r, _)| r.errors.is_empty()), "{steps:?}");
    assert!(steps.last().unwrap().1.iter().all(|p| !p.fail_closed && !p.kernel_fail_closed));
    done.store(true, Ordering::Relaxed);
    assert!(prober.join().expect("x/a -> y/a was always allowed") > 0);
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true), ("x/a", "y/a", true)]);
}

/// Three policies for every pod, each allowing the 32,768 odd ports of one protocol: one
/// port set per protocol, shared by all pods, 1,024 entries each, in the default maps.
#[test]
fn every_odd_port_on_three_protocols_fits_in_the_default_maps() {
    let mut rig = Rig::with_sizes(
        vec![
            pod("x/a", &[("pod", "a")], "10.244.0.10", "fd10:244::a"),
            pod("x/b", &[("pod", "b")], "10.244.0.11", "fd10:244::b"),
            pod("x/c", &[("pod", "c")], "10.244.0.12", "fd10:244::c"),
        ],
        MapSizes::default(),
    )
    .unwrap();
    let mut changes = Vec::new();
    for proto in ["TCP", "UDP", "SCTP"] {
        let ports: Vec<serde_json::Value> = (1..=65535u32).step_by(2).map(|p| json!({"protocol": proto, "port": p})).collect();
        changes.push(policy(
            "x",
            &format!("odd-{}", proto.to_lowercase()),
            json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": ports}]}),
        ));
    }
    let report = rig.apply_report(changes).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(rig.entry_counts().1, 3 * 1024, "one set per protocol, shared by every pod");
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        expect(&rig, proto, 81, &[("x/a", "x/b", true), ("x/c", "x/a", true)]);
        expect(&rig, proto, 80, &[("x/a", "x/b", false), ("x/c", "x/a", false)]);
    }
    // And they go as they came.
    let deletes = ["odd-tcp", "odd-udp", "odd-sctp"].iter().map(|n| Change::DeletePolicy(ObjectKey::new("x", *n))).collect();
    let report = rig.apply_report(deletes).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(rig.entry_counts().1, 0);
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", true)]);
}

fn cluster_policy(name: &str, spec: serde_json::Value) -> Change {
    Change::UpsertClusterPolicy(Box::new(
        serde_json::from_value(json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec}))
            .unwrap(),
    ))
}

/// A ClusterNetworkPolicy that denies one port leaves ICMP to the default allow: the
/// compiled port set allows protocols without ports, which the kernel must honour (the
/// `PORT_PROTOCOL_OTHER` slot), while a NetworkPolicy's port rule still blocks ICMP.
#[test]
fn icmp_left_to_the_default_allow_by_a_cluster_policy_passes() {
    use conformance::traffic::ping;
    let mut rig = ns_rig();
    let t = std::time::Duration::from_millis(400);
    rig.apply(vec![cluster_policy(
        "deny-80",
        json!({"tier": "Admin", "priority": 5,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
            "egress": [{"name": "no-80", "action": "Deny",
                "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}}],
                "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}),
    )])
    .unwrap();
    expect(&rig, Protocol::Tcp, 80, &[("x/a", "x/b", false), ("x/a", "x/c", true), ("x/c", "x/b", true)]);
    expect(&rig, Protocol::Tcp, 81, &[("x/a", "x/b", true)]);
    for v4 in [true, false] {
        assert!(ping(&rig.pod("x/a").net.ns.handle(), rig.ip("x/b", v4), t).unwrap(), "ICMP is not TCP 80: the default allow takes it");
    }
    // A NetworkPolicy tier that decides for x/a's egress (only UDP 81): no ICMP.
    rig.apply(vec![policy("x", "a-udp", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}))])
        .unwrap();
    for v4 in [true, false] {
        assert!(!ping(&rig.pod("x/a").net.ns.handle(), rig.ip("x/b", v4), t).unwrap(), "the NetworkPolicy tier decides: no ICMP");
    }
}

/// An echo server on TCP `port` in `ns`, for connections that stay open: each connection
/// gets its bytes back, one at a time, until it closes. `received` counts the bytes that
/// reached it.
fn echo_server(
    ns: &conformance::netns::Netns,
    port: u16,
    stop: Arc<AtomicBool>,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns
        .spawn(move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let received = received.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let mut b = [0u8; 1];
                            while matches!(c.read(&mut b), Ok(1)) {
                                received.fetch_add(1, Ordering::Relaxed);
                                if c.write_all(&b).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
        .unwrap();
    rx.recv().unwrap();
    h
}

/// One byte out and back on an open connection, within 600 ms (lost packets are
/// retransmitted in 200 ms or more: one loss is tolerated, a flow that is cut is not).
fn exchange(c: &mut std::net::TcpStream) -> bool {
    use std::io::{Read, Write};
    let _ = c.set_read_timeout(Some(Duration::from_millis(600)));
    let mut b = [0u8; 1];
    c.write_all(b"x").is_ok() && matches!(c.read(&mut b), Ok(1))
}

/// Open connections between two pods of the node, across policy changes: one that a new
/// policy denies stops at its next packet (the receiver judges it again under its new
/// revision, even though the sender's hook, which still approves it, ran just before on
/// the same CPU): not even its data reaches the server. One that the new policy still
/// allows keeps working.
#[test]
fn an_open_connection_stops_when_a_policy_denies_it_and_keeps_working_while_allowed() {
    let mut rig = three_pods();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = echo_server(&rig.pod("x/b").net.ns, 9000, stop.clone(), received.clone());
    let dst = std::net::SocketAddr::new(rig.ip("x/b", true), 9000);
    let connect = |rig: &Rig, from: &str| {
        rig.pod(from).net.ns.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)).expect("connect")).unwrap()
    };
    let (mut from_xa, mut from_ya) = (connect(&rig, "x/a"), connect(&rig, "y/a"));
    for _ in 0..20 {
        assert!(exchange(&mut from_xa) && exchange(&mut from_ya), "no policy: both connections work");
    }
    // x/b now admits x/a only (its ingress gets a new revision).
    rig.apply(vec![policy(
        "x",
        "b-from-xa",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"protocol": "TCP", "port": 9000}]}]}),
    )])
    .unwrap();
    for i in 0..20 {
        assert!(exchange(&mut from_xa), "x/a -> x/b is still allowed: its open connection keeps working (exchange {i})");
    }
    let before = received.load(Ordering::Relaxed);
    assert!(!exchange(&mut from_ya), "y/a -> x/b is now denied: its open connection stops");
    assert_eq!(received.load(Ordering::Relaxed), before, "y/a's byte (and its retransmissions) never reached x/b");
    // Another revision that still admits x/a (and now y/a on another port only).
    rig.apply(vec![policy("x", "b-from-xa", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"protocol": "TCP", "port": 9000}]},
                    {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"protocol": "TCP", "port": 81}]}]}))])
    .unwrap();
    for i in 0..20 {
        assert!(exchange(&mut from_xa), "x/a -> x/b is allowed under the next revision too (exchange {i})");
    }
    stop.store(true, Ordering::Relaxed);
    drop((from_xa, from_ya));
    let _ = server.join();
}

/// kube-proxy's NodePort for x/b:80 on the node's `up0` address: DNAT in PREROUTING, and
/// the masquerade of `externalTrafficPolicy: Cluster`. `snat_to_node` makes the masquerade
/// address the node's own (10.250.0.1, fd10:250::1), as MASQUERADE picks it when the host
/// veth holds no address (proxy-ARP CNIs); otherwise MASQUERADE picks the veth's
/// link-local gateway, as in the harness's layout.
fn node_port(rig: &Rig, snat_to_node: bool) {
    for (tool, node_up, backend, node) in [
        ("iptables", "198.51.100.1", format!("{}:80", rig.ip("x/b", true)), "10.250.0.1"),
        ("ip6tables", "2001:db8:100::1", format!("[{}]:80", rig.ip("x/b", false)), "fd10:250::1"),
    ] {
        let dnat =
            ["-t", "nat", "-A", "PREROUTING", "-d", node_up, "-p", "tcp", "--dport", "30080", "-j", "DNAT", "--to-destination", &backend];
        rig.node.ns.exec(tool, &dnat).unwrap();
        let client_net = if tool == "iptables" { "198.51.100.0/24" } else { "2001:db8:100::/64" };
        let mut masq = vec!["-t", "nat", "-I", "POSTROUTING", "-s", client_net, "!", "-o", "up0"];
        if snat_to_node {
            masq.extend(["-j", "SNAT", "--to-source", node]);
        } else {
            masq.extend(["-j", "MASQUERADE"]);
        }
        rig.node.ns.exec(tool, &masq).unwrap();
    }
}

/// A TCP probe from the external namespace, from `src`, to the NodePort (IPv4 unless `v6`).
fn probe_node_port(ext: &External, src: &str, v6: bool) -> bool {
    let node = if v6 { "[2001:db8:100::1]:30080" } else { "198.51.100.1:30080" };
    conformance::traffic::probe_tcp_from(&ext._ns, src.parse().unwrap(), node.parse().unwrap(), Duration::from_millis(400)).expect("probe")
}

/// Issue 12's bypass: a NodePort client masqueraded to the node's own address must not get
/// the node's exemption ("ingress from the node always passes"), and whatever address the
/// masquerade picks, the client is judged by its own address. `traced: false`: the client
/// arrives by a device without the agent's programs, so it cannot be traced back; it is
/// then judged by the masquerade address, which is no exemption either.
#[test]
fn a_node_port_client_is_judged_by_its_own_address_not_the_masquerade() {
    for (snat_to_node, traced) in [(true, true), (false, true), (true, false)] {
        let mut rig = ns_rig();
        let ext = external_with(&rig, traced);
        ext._ns.ip(&["-4", "addr", "add", "198.51.100.11/24", "dev", "eth0"]).unwrap();
        ext._ns.ip(&["-6", "addr", "add", "2001:db8:100::11/64", "dev", "eth0", "nodad"]).unwrap();
        node_port(&rig, snat_to_node);
        let clients = [("198.51.100.10", false), ("198.51.100.11", false), ("2001:db8:100::10", true), ("2001:db8:100::11", true)];
        for (c, v6) in clients {
            assert!(probe_node_port(&ext, c, v6), "no policy: {c} reaches the NodePort (snat to node: {snat_to_node})");
        }
        rig.apply(vec![policy("x", "deny", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}))]).unwrap();
        for (c, v6) in clients {
            assert!(
                !probe_node_port(&ext, c, v6),
                "default-deny: {c} is blocked over the NodePort (snat to node: {snat_to_node}, traced: {traced})"
            );
        }
        for v4 in [true, false] {
            assert!(rig.probe_from_node(rig.ip("x/b", v4), 80), "the node itself still reaches x/b");
        }
        // An allow-list of one client: that client passes, the other does not.
        rig.apply(vec![policy(
            "x",
            "deny",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.11/32"]}},
                                  {"ipBlock": {"cidr": "2001:db8:100::/64", "except": ["2001:db8:100::11/128"]}}]}]}),
        )])
        .unwrap();
        for (c, v6) in clients {
            let allowed = c.ends_with("10") && traced;
            assert_eq!(probe_node_port(&ext, c, v6), allowed, "{c} over the NodePort (snat to node: {snat_to_node}, traced: {traced})");
        }
        // An allow-list of the node's addresses opens nothing to outside clients that can
        // be traced (an untraced one has only the masquerade address to be judged by).
        rig.apply(vec![policy("x", "deny", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.250.0.0/24"}}, {"ipBlock": {"cidr": "fd10:250::/64"}}, {"ipBlock": {"cidr": "169.254.0.0/16"}}]}]}))])
        .unwrap();
        for (c, v6) in clients {
            let allowed = !traced && snat_to_node;
            assert_eq!(probe_node_port(&ext, c, v6), allowed, "{c} is not the node (snat to node: {snat_to_node}, traced: {traced})");
        }
    }
}

/// kube-proxy masquerades Service traffic in some setups: a pod reaching itself through
/// its own Service (hairpin: KUBE-SEP's `-s <endpoint>` mark), and every Service flow with
/// `masqueradeAll`. Both ends must still judge the pod that sent it: the backend's ingress
/// by the client pod (not the masquerade address), and the client's egress against the
/// backend, after DNAT (not skipped because the source changed).
#[test]
fn masqueraded_service_traffic_is_judged_by_the_pod_that_sent_it() {
    let mut rig = service_rig();
    for tool in ["iptables", "ip6tables"] {
        rig.node.ns.exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-m", "conntrack", "--ctstate", "DNAT", "-j", "MASQUERADE"]).unwrap();
    }
    rig.apply(vec![policy(
        "x",
        "b",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
    )])
    .unwrap();
    for v6 in [false, true] {
        assert!(rig.probe_addr("x/b", vip(v6), Protocol::Tcp, 8080), "x/b reaches itself through its Service (hairpin, masqueraded)");
        assert!(rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "x/a is admitted by x/b, masqueraded or not");
        assert!(!rig.probe_addr("x/c", vip(v6), Protocol::Tcp, 8080), "x/c is not, whatever the masquerade address");
    }
    rig.apply(vec![policy("x", "a-out", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": []}))])
        .unwrap();
    for v6 in [false, true] {
        assert!(!rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "x/a's egress denies everything, masqueraded or not");
    }
    rig.apply(vec![policy(
        "x",
        "a-out",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
    )])
    .unwrap();
    for v6 in [false, true] {
        assert!(rig.probe_addr("x/a", vip(v6), Protocol::Tcp, 8080), "x/a's egress admits x/b:80, the Service's backend");
    }
}

/// A connection from x/a to x/b:`port`, held by the test: (the server's end, the client's
/// end, which reads with a 600 ms timeout).
fn held_connection(rig: &Rig, port: u16) -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = rig.pod("x/b").net.ns.run(move || std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind")).unwrap();
    let dst = std::net::SocketAddr::new(rig.ip("x/b", true), port);
    let client =
        rig.pod("x/a").net.ns.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)).expect("connect")).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_read_timeout(Some(Duration::from_millis(600))).unwrap();
    (server, client)
}

/// One byte from the server's end that reaches the client's (the client's stack only
/// acknowledges: the server speaks first).
fn pushed(server: &mut std::net::TcpStream, client: &mut std::net::TcpStream) -> bool {
    use std::io::{Read, Write};
    let mut b = [0u8; 1];
    server.write_all(b"y").is_ok() && matches!(client.read(&mut b), Ok(1))
}

/// A policy of namespace x that isolates pod `pod` in `direction` and allows nothing.
fn isolated(name: &str, pod: &str, direction: &str) -> Change {
    policy("x", name, json!({"podSelector": {"matchLabels": {"pod": pod}}, "policyTypes": [direction]}))
}

/// A connection opened while nothing isolated either end, whose server speaks first once
/// that changes: replies are judged by the policies of the direction the connection was
/// opened in, so the server's new egress policy and the client's new ingress policy do
/// not stop them, and the server's ingress policy does. The datapath skips connection
/// tracking for most packets of pods that nothing isolates, and relies on the entry that
/// the connection's first packet (SYN) wrote to tell the server's data, sent before
/// anything from the client, from a new flow of the server's.
#[test]
fn replies_sent_first_after_their_ends_become_isolated_pass_until_the_opening_direction_is_denied() {
    let mut rig = three_pods();
    let (mut server, mut client) = held_connection(&rig, 9001);
    for i in 0..5 {
        assert!(pushed(&mut server, &mut client), "no policy: the server's data reaches the client ({i})");
    }
    rig.apply(vec![isolated("b-egress-none", "b", "Egress")]).unwrap();
    for i in 0..5 {
        assert!(pushed(&mut server, &mut client), "x/b's egress policy does not judge its replies to x/a's connection ({i})");
    }
    rig.apply(vec![isolated("a-ingress-none", "a", "Ingress")]).unwrap();
    for i in 0..5 {
        assert!(pushed(&mut server, &mut client), "x/a's ingress policy does not judge the replies to its own connection ({i})");
    }
    rig.apply(vec![isolated("b-ingress-none", "b", "Ingress")]).unwrap();
    assert!(!pushed(&mut server, &mut client), "x/b's ingress policy denies x/a: the connection stops, replies too");
}

/// A half-closed connection (the client shut its side with a FIN; the server still sends)
/// between pods that nothing isolates, kept open longer than the closing timeout: its
/// entry must outlive one FIN, so that when the server's egress or the client's ingress
/// becomes isolated, the server's data is still a reply of the client's connection, not
/// a new flow of the server's. (Packets of pods that nothing isolates do not refresh the
/// entry; the closing timeout starts at the second FIN.)
#[test]
fn a_half_closed_connection_outlives_the_closing_timeout_and_stays_a_reply() {
    let mut rig = three_pods();
    let (mut server, mut client) = held_connection(&rig, 9002);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    // Past the closing timeout (10 s), the server sending all along.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_nanos(policy_ebpf::CT_TIMEOUT_TCP_CLOSING_NS) + Duration::from_secs(1) {
        assert!(pushed(&mut server, &mut client), "no policy: the half-closed connection's data reaches the client");
        std::thread::sleep(Duration::from_millis(500));
    }
    rig.apply(vec![isolated("b-egress-none", "b", "Egress")]).unwrap();
    assert!(pushed(&mut server, &mut client), "x/b's egress policy does not judge its replies on x/a's half-closed connection");
    rig.apply(vec![isolated("a-ingress-none", "a", "Ingress")]).unwrap();
    assert!(pushed(&mut server, &mut client), "x/a's ingress policy does not judge the replies on its own half-closed connection");
}

/// A Service connection from x/a to a backend off the node (no masquerade), closed by the
/// server, then opened again from the same source port after the closing timeout. Such a
/// flow has two entries: the Service address's (`pod_egress`, and the translated replies
/// at `pod_ingress`) and the backend's (`node_egress`, which never sees a reply). The
/// backend's entry must close at the first FIN, and a SYN that finds a closing entry is a
/// new connection: else the second connection passes `node_egress` on the old entry
/// unjudged, and its reply is judged against the Service address, which x/a's egress
/// (the backend's network only) does not allow. (Found by review.)
#[test]
fn a_service_connection_to_a_backend_off_the_node_can_reuse_its_source_port() {
    use std::io::{Read, Write};
    let mut rig = ns_rig();
    let ext = routed_peer(&rig);
    rig.attach_node_devices(&["up0"]).unwrap();
    rig.node.dnat("10.96.0.20".parse().unwrap(), 8080, "198.51.100.10".parse().unwrap(), 80, "tcp").unwrap();
    rig.set_services(vec!["10.96.0.0/16".parse().unwrap()]).unwrap();
    // One byte back, then the server closes first (the client keeps no TIME_WAIT).
    let listener = ext.run(|| std::net::TcpListener::bind(("0.0.0.0", 80)).unwrap()).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
    rig.apply(vec![policy(
        "x",
        "a-to-backend",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"protocol": "TCP", "port": 80}]}]}),
    )])
    .unwrap();
    let ns = rig.pod("x/a").net.ns.handle();
    let connect = move |port: u16| -> Result<(), String> {
        ns.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into()).map_err(|e| format!("bind: {e}"))?;
            let vip = std::net::SocketAddr::from(([10, 96, 0, 20], 8080));
            s.connect_timeout(&vip.into(), Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
            let mut s: std::net::TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 1];
            s.write_all(b"x").map_err(|e| format!("write: {e}"))?;
            s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
            if s.read(&mut b).map_err(|e| format!("eof: {e}"))? != 0 {
                return Err("no EOF".into());
            }
            Ok(())
        })
        .unwrap()
    };
    assert_eq!(connect(40123), Ok(()), "the first connection through the Service");
    std::thread::sleep(Duration::from_millis(100));
    let backend = rig.conntrack().into_iter().find(|(k, _)| {
        let ends = [(policy_agent::datapath::decode_addr(&k.lo_addr), k.lo_port), (policy_agent::datapath::decode_addr(&k.hi_addr), k.hi_port)];
        ends.contains(&(rig.ip("x/a", true), 40123)) && ends.contains(&("198.51.100.10".parse().unwrap(), 80))
    });
    let (_, v) = backend.expect("node_egress's entry of the translated flow");
    assert_ne!(v.flags & policy_ebpf::CT_TCP_CLOSING, 0, "the entry no reply reaches closes at the client's FIN (flags {:#x})", v.flags);
    std::thread::sleep(Duration::from_nanos(policy_ebpf::CT_TIMEOUT_TCP_CLOSING_NS) + Duration::from_secs(1));
    assert_eq!(connect(40123), Ok(()), "a second connection from the same port through the same Service");
}

/// A FIN that opens an entry (its flow's entry was lost: evicted, or not carried over by
/// a migration) records itself, so that the other end's FIN closes the entry. Here the
/// first FIN comes from a peer off the node, which only the pod's own hook sees.
#[test]
fn a_fin_that_opens_an_entry_counts_toward_closing_it() {
    let rig = ns_rig();
    let ext = routed_peer(&rig);
    let listener = rig.pod("x/a").net.ns.run(|| std::net::TcpListener::bind(("0.0.0.0", 9004)).expect("bind")).unwrap();
    let dst = std::net::SocketAddr::new(rig.ip("x/a", true), 9004);
    let remote = ext.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)).expect("connect")).unwrap();
    let (local, peer) = listener.accept().unwrap();
    let a = rig.ip("x/a", true);
    let matches = |k: &policy_ebpf::CtKey| {
        let ends = [(policy_agent::datapath::decode_addr(&k.lo_addr), k.lo_port), (policy_agent::datapath::decode_addr(&k.hi_addr), k.hi_port)];
        ends.contains(&(a, 9004)) && ends.contains(&(peer.ip(), peer.port()))
    };
    let find = || rig.conntrack().into_iter().find(|(k, _)| matches(k)).map(|(_, v)| v);
    assert!(find().is_some(), "the connection is tracked");
    // The entry is lost.
    let dir = policy_agent::datapath::migrate::maps_dir_in_force(&rig.pin_dir).unwrap();
    let data = aya::maps::MapData::from_pin(dir.join(policy_ebpf::map_names::CONNTRACK)).unwrap();
    let mut ct: aya::maps::HashMap<_, policy_ebpf::CtKey, policy_ebpf::CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
    let lost: Vec<policy_ebpf::CtKey> = ct.keys().filter_map(Result::ok).filter(|k| matches(k)).collect();
    for k in &lost {
        ct.remove(k).unwrap();
    }
    assert!(find().is_none(), "the entry is gone");
    remote.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let v = find().expect("the remote's FIN opened an entry");
    assert_eq!(v.flags & policy_ebpf::CT_TCP_CLOSING, 0, "one FIN: not closing yet (flags {:#x})", v.flags);
    local.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let v = find().expect("the entry");
    assert_ne!(v.flags & policy_ebpf::CT_TCP_CLOSING, 0, "both FINs seen: closing (flags {:#x})", v.flags);
}

/// x/b's ingress admits the pods labelled `pod: a` of namespace `ns` on TCP 9000.
fn b_admits_a_of(ns: &str) -> Change {
    policy("x", "b-from-a", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                               "podSelector": {"matchLabels": {"pod": "a"}}}],
                     "ports": [{"protocol": "TCP", "port": 9000}]}]}))
}

/// Runs `f` in the node's namespace on a thread pinned to CPU 0, with x/b's `pod_ingress`
/// (the program attached to its host veth's tc egress) and that veth's ifindex: packets
/// run through it one after another on one CPU (`BPF_PROG_TEST_RUN`), as a flow's
/// packets cross a hook, so the CPU's flow records (`FlowSlot` in the kernel programs) are
/// in play. The programs are found by interface, so other tests' agents may run beside.
fn at_b_ingress<T: Send + 'static>(
    rig: &Rig,
    f: impl FnOnce(conformance::programs::TestProgram, u32) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let veth = rig.pod("x/b").net.host_veth.clone();
    rig.node
        .ns
        .spawn(move || {
            let mut one = nix::sched::CpuSet::new();
            one.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
            let prog = conformance::programs::TestProgram::attached(&veth, aya::programs::TcAttachType::Egress).unwrap();
            let ifindex = nix::net::if_::if_nametoindex(veth.as_str()).unwrap();
            f(prog, ifindex)
        })
        .unwrap()
}

/// x/a → x/b:9000 from port 41000: its SYN, then an ACK, through x/b's ingress (x/a's
/// egress is not isolated: its hook keeps no record). The SYN must pass.
fn open_a_to_b(prog: &conformance::programs::TestProgram, ifindex: u32) -> Vec<u8> {
    use conformance::programs::{PASS, TCP_ACK, TCP_SYN, tcp_frame};
    let (a, b) = ([10, 244, 0, 10], [10, 244, 0, 11]);
    assert_eq!(prog.run(&tcp_frame(a, b, 41000, 9000, TCP_SYN), ifindex, 1).unwrap().0, PASS, "x/a's SYN reaches x/b");
    tcp_frame(a, b, 41000, 9000, TCP_ACK)
}

/// A CPU's record of a flow lets the flow's next packets in the same clock tick pass
/// without the connection-tracking lookup, and must still never pass a packet under a
/// revision that has not approved the flow: x/b's ingress runs x/a's ACKs back to back
/// while the agent replaces the policy that admitted x/a, and no ACK may pass once x/b's
/// new revision is in the maps (read before each run). Revisions are per endpoint, so
/// the flow's two sides can hold the same number: x/a's side is made to hold the
/// revision x/b's change will bring (its endpoint's revision is planted before the flow
/// opens), so that a record read from the wrong side would pass the ACKs.
#[test]
fn a_flow_record_never_passes_a_packet_under_a_revision_that_did_not_approve_it() {
    let (mut rig, maps) = x_b_admitting_x_a();
    let stop = Arc::new(AtomicBool::new(false));
    let running = stop.clone();
    let ingress = at_b_ingress(&rig, move |prog, ifindex| {
        use conformance::programs::PASS;
        let data = aya::maps::MapData::from_pin(maps.join(policy_ebpf::map_names::IFACES)).unwrap();
        let slots: aya::maps::Array<_, policy_ebpf::IfaceValue> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        let revision = || slots.get(&ifindex, 0).unwrap().revision;
        // x/a's side of the flow: the revision x/b gets next (see `next_revision`).
        let data = aya::maps::MapData::from_pin(maps.join(policy_ebpf::map_names::ENDPOINTS)).unwrap();
        let mut endpoints: aya::maps::HashMap<_, policy_ebpf::EndpointKey, policy_ebpf::EndpointValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        let a = policy_ebpf::EndpointKey { addr: policy_agent::datapath::encode_addr(std::net::IpAddr::from([10, 244, 0, 10])) };
        let mut xa = endpoints.get(&a, 0).unwrap();
        let planted = revision() + 1;
        xa.revision = planted;
        endpoints.insert(a, xa, 0).unwrap();
        let ack = open_a_to_b(&prog, ifindex);
        let first = revision();
        let (mut before, mut after, mut passed_after) = (0u64, 0u64, 0u64);
        while !running.load(Ordering::Relaxed) {
            let r = revision();
            let verdict = prog.run(&ack, ifindex, 1).unwrap().0;
            if r != first {
                after += 1;
                passed_after += u64::from(verdict == PASS);
            } else if revision() == first {
                // (A run that the new revision may have met halfway counts for neither.)
                assert_eq!(verdict, PASS, "the ACK passes while x/b's first revision admits x/a");
                before += 1;
            }
        }
        (before, after, passed_after, planted, revision())
    });
    std::thread::sleep(Duration::from_millis(300));
    // x/b now admits y/a only: a new revision of its ingress.
    rig.apply(vec![b_admits_a_of("y")]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (before, after, passed_after, planted, last) = ingress.join().unwrap();
    assert!(before > 100 && after > 100, "ACKs ran under both revisions ({before} before, {after} after)");
    assert_eq!(last, planted, "x/b's new revision is the one x/a's side holds");
    assert_eq!(passed_after, 0, "{passed_after} of {after} ACKs passed under the revision that no longer admits x/a");
}

/// Three pods, x/b admitting x/a (`b_admits_a_of("x")`): the rig, and the directory of
/// the maps in force.
fn x_b_admitting_x_a() -> (Rig, std::path::PathBuf) {
    let mut rig = three_pods();
    rig.apply(vec![b_admits_a_of("x")]).unwrap();
    let maps = policy_agent::datapath::migrate::maps_dir_in_force(&rig.pin_dir).unwrap();
    (rig, maps)
}

/// The connection-tracking entry of x/a's flow from port 41000 (in the maps pinned at
/// `maps`).
fn entry_from_41000(maps: &std::path::Path) -> policy_ebpf::CtValue {
    let data = aya::maps::MapData::from_pin(maps.join(policy_ebpf::map_names::CONNTRACK)).unwrap();
    let ct: aya::maps::HashMap<_, policy_ebpf::CtKey, policy_ebpf::CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
    let a = std::net::IpAddr::from([10, 244, 0, 10]);
    ct.iter()
        .filter_map(Result::ok)
        .find(|(k, _)| {
            let decode = policy_agent::datapath::decode_addr;
            k.protocol == 6 && [(decode(&k.lo_addr), k.lo_port), (decode(&k.hi_addr), k.hi_port)].contains(&(a, 41000))
        })
        .map(|(_, v)| v)
        .expect("x/a → x/b is tracked")
}

/// A flow whose packets keep coming keeps its connection-tracking entry fresh although
/// the CPU's record of it answers for most of them: the record lasts one clock tick, and
/// the first packet of each tick looks the entry up (and refreshes it, once a second).
#[test]
fn a_busy_flow_keeps_refreshing_its_entry_while_its_record_answers() {
    let (rig, maps) = x_b_admitting_x_a();
    let ingress = at_b_ingress(&rig, move |prog, ifindex| {
        let ack = open_a_to_b(&prog, ifindex);
        let first = entry_from_41000(&maps).last_seen_ns;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            assert_eq!(prog.run(&ack, ifindex, 1).unwrap().0, conformance::programs::PASS, "the ACK passes");
        }
        (first, entry_from_41000(&maps).last_seen_ns)
    });
    let (first, last) = ingress.join().unwrap();
    assert!(last >= first + 1_500_000_000, "the entry was refreshed while the flow ran: last seen at {first}, then {last} ns");
}

/// A FIN or RST that finds the CPU's record of its flow (the flow's previous packet, in
/// the same tick) still reaches the connection-tracking entry: the record answers for it
/// only once the entry holds it.
#[test]
fn a_fin_and_a_reset_reach_the_entry_past_the_flow_record() {
    use conformance::programs::{PASS, TCP_ACK, TCP_FIN, TCP_RST, tcp_frame};
    let (rig, maps) = x_b_admitting_x_a();
    let ingress = at_b_ingress(&rig, move |prog, ifindex| {
        let (a, b) = ([10, 244, 0, 10], [10, 244, 0, 11]);
        let ack = open_a_to_b(&prog, ifindex);
        let mut flags = Vec::new();
        for extra in [TCP_FIN, TCP_RST] {
            // The ACK leaves the record; the next packet finds it.
            assert_eq!(prog.run(&ack, ifindex, 1).unwrap().0, PASS, "the ACK passes");
            assert_eq!(prog.run(&tcp_frame(a, b, 41000, 9000, TCP_ACK | extra), ifindex, 1).unwrap().0, PASS, "x/a's {extra:#x} passes");
            flags.push(entry_from_41000(&maps).flags);
        }
        flags
    });
    let flags = ingress.join().unwrap();
    assert_ne!(flags[0] & policy_ebpf::CT_TCP_FIN_ORIG, 0, "x/a's FIN is in the entry (flags {:#x})", flags[0]);
    assert_ne!(flags[1] & policy_ebpf::CT_TCP_RESET, 0, "x/a's RST is in the entry (flags {:#x})", flags[1]);
}

/// A new connection on the ports of a closed one is judged afresh and tracked over the
/// old entry: x/a resets its flow to x/b and opens another from the same port. The new
/// flow passes and its entry is the new connection's (no reset left in it, seen now);
/// after a second reset, once x/b no longer admits x/a, the next SYN from the port is
/// dropped, whatever the old entry approved.
#[test]
fn a_connection_on_the_ports_of_a_closed_one_is_judged_afresh_and_tracked_anew() {
    use conformance::programs::{DROP, PASS, TCP_ACK, TCP_RST, TCP_SYN, tcp_frame};
    let (mut rig, maps) = x_b_admitting_x_a();
    let (a, b) = ([10, 244, 0, 10], [10, 244, 0, 11]);
    let reset = tcp_frame(a, b, 41000, 9000, TCP_RST | TCP_ACK);
    let syn = tcp_frame(a, b, 41000, 9000, TCP_SYN);
    let m = maps.clone();
    let (closed, reopened) = at_b_ingress(&rig, move |prog, ifindex| {
        let ack = open_a_to_b(&prog, ifindex);
        assert_eq!(prog.run(&ack, ifindex, 1).unwrap().0, PASS, "the ACK passes");
        assert_eq!(prog.run(&reset, ifindex, 1).unwrap().0, PASS, "x/a's RST passes");
        let closed = entry_from_41000(&m);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(prog.run(&syn, ifindex, 1).unwrap().0, PASS, "x/a's new SYN from the same port passes");
        (closed, entry_from_41000(&m))
    })
    .join()
    .unwrap();
    assert_ne!(closed.flags & policy_ebpf::CT_TCP_RESET, 0, "the reset is in the entry (flags {:#x})", closed.flags);
    assert_eq!(reopened.flags & policy_ebpf::CT_TCP_RESET, 0, "the new connection's entry holds no reset (flags {:#x})", reopened.flags);
    assert!(reopened.last_seen_ns > closed.last_seen_ns, "the new connection's entry is seen at its SYN");

    let (reset, syn) = (tcp_frame(a, b, 41000, 9000, TCP_RST | TCP_ACK), tcp_frame(a, b, 41000, 9000, TCP_SYN));
    at_b_ingress(&rig, move |prog, ifindex| {
        assert_eq!(prog.run(&reset, ifindex, 1).unwrap().0, PASS, "x/a's second RST passes");
    })
    .join()
    .unwrap();
    rig.apply(vec![b_admits_a_of("y")]).unwrap();
    at_b_ingress(&rig, move |prog, ifindex| {
        assert_eq!(prog.run(&syn, ifindex, 1).unwrap().0, DROP, "x/a's SYN is judged by the policy now in force");
    })
    .join()
    .unwrap();
}

/// A CPU keeps the judgments its programs made in the current clock tick, and a new flow
/// of the same endpoint, remote and port takes one instead of the table lookups; it must
/// never take one made under another revision. x/b's ingress admits x/a's first SYN
/// (judged, kept); then, as an update of x/b's table would, every entry of that table
/// stops allowing anything and x/b's revision is bumped (written straight into the maps,
/// microseconds later: the same tick); x/a's SYN from another port must be dropped.
#[test]
fn a_kept_judgment_never_answers_under_another_revision() {
    use conformance::programs::{DROP, TCP_SYN, tcp_frame};
    use policy_ebpf::{DIRECTION_INGRESS, EndpointKey, EndpointValue, IfaceValue, NO_PORT_SET, PeerKey, PeerValue, map_names};
    let (rig, maps) = x_b_admitting_x_a();
    let ingress = at_b_ingress(&rig, move |prog, ifindex| {
        let map = |name: &str| aya::maps::MapData::from_pin(maps.join(name)).unwrap();
        let mut ifaces: aya::maps::Array<_, IfaceValue> = aya::maps::Array::try_from(aya::maps::Map::Array(map(map_names::IFACES))).unwrap();
        let mut endpoints: aya::maps::HashMap<_, EndpointKey, EndpointValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map(map_names::ENDPOINTS))).unwrap();
        let mut peers: aya::maps::LpmTrie<_, PeerKey, PeerValue> =
            aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(map(map_names::PEERS))).unwrap();
        let b_key = EndpointKey { addr: policy_agent::datapath::encode_addr(std::net::IpAddr::from([10, 244, 0, 11])) };
        let mut b = endpoints.get(&b_key, 0).unwrap();
        let tables: Vec<_> = peers
            .keys()
            .map(Result::unwrap)
            .filter(|k| k.data().endpoint == b.id && k.data().direction == DIRECTION_INGRESS)
            .collect();
        assert!(!tables.is_empty(), "x/b has an ingress table");
        open_a_to_b(&prog, ifindex);
        for k in &tables {
            let mut v = peers.get(k, 0).unwrap();
            v.port_set = NO_PORT_SET;
            v.flags = 0;
            peers.insert(k, v, 0).unwrap();
        }
        b.revision += 1;
        endpoints.insert(b_key, b, 0).unwrap();
        let mut slot = ifaces.get(&ifindex, 0).unwrap();
        slot.revision = b.revision;
        ifaces.set(ifindex, slot, 0).unwrap();
        prog.run(&tcp_frame([10, 244, 0, 10], [10, 244, 0, 11], 41001, 9000, TCP_SYN), ifindex, 1).unwrap().0
    });
    assert_eq!(ingress.join().unwrap(), DROP, "x/a's SYN from another port is judged under x/b's new revision: dropped");
}

/// The programs read a common packet (IPv4 without options, not a fragment) on a short
/// path of their own (`fast` in the kernel programs), and every other shape on the full
/// path, from the start. A packet of another shape must be read as what it is, never as
/// the common shape at the common offsets: here x/a's flow to x/b:9000 from port 41000 is
/// open and recorded (its ACK passes on the CPU's record), and two packets from x/a carry
/// that flow's ports and an ACK where a common packet has them, but are not of it:
/// - one with four bytes of IPv4 options, whose real TCP header (after the options) is
///   for port 9001, which x/b does not admit;
/// - a non-first fragment, which has no ports at all.
///
/// Both must be dropped, as new flows that x/b's ingress does not admit.
#[test]
fn a_packet_of_another_shape_is_never_read_as_a_common_one() {
    use conformance::programs::{DROP, PASS, TCP_ACK, tcp_frame};
    let (rig, _maps) = x_b_admitting_x_a();
    let ingress = at_b_ingress(&rig, move |prog, ifindex| {
        let (a, b) = ([10, 244, 0, 10], [10, 244, 0, 11]);
        let ack = open_a_to_b(&prog, ifindex);
        // With options: the common offsets of the ports hold the options (41000, 9000),
        // the real header follows them.
        let real = tcp_frame(a, b, 41000, 9001, TCP_ACK);
        let mut options = real[..34].to_vec();
        options[14] = 0x46;
        options[16..18].copy_from_slice(&44u16.to_be_bytes());
        options.extend_from_slice(&41000u16.to_be_bytes());
        options.extend_from_slice(&9000u16.to_be_bytes());
        options.extend_from_slice(&real[34..]);
        // A fragment at offset 8 × 8 bytes: what would be the TCP header is data.
        let mut fragment = ack.clone();
        fragment[20..22].copy_from_slice(&8u16.to_be_bytes());
        let mut verdicts = Vec::new();
        for (what, frame) in [("with IPv4 options", &options), ("a non-first fragment", &fragment)] {
            assert_eq!(prog.run(&ack, ifindex, 1).unwrap().0, PASS, "the flow's ACK passes (and leaves the CPU's record)");
            verdicts.push((what, prog.run(frame, ifindex, 1).unwrap().0));
        }
        assert_eq!(prog.run(&ack, ifindex, 1).unwrap().0, PASS, "the flow's ACK still passes");
        verdicts
    });
    for (what, verdict) in ingress.join().unwrap() {
        assert_eq!(verdict, DROP, "x/a's packet {what}, not of the open flow, is dropped");
    }
}
