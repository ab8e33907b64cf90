//! One test per NetworkPolicy semantic rule (reference §5), each checked on the reference
//! evaluator and the compiled tables at once (`World::allowed`).

use serde_json::json;

use super::*;
use crate::{Decision, IpProtocol};

fn xyz_abc() -> World {
    let mut w = World::xyz();
    let mut n = 1;
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            let v4 = format!("10.244.0.{n}");
            let v6 = format!("fd10:244::{n}");
            w.pod(mk_pod(ns, pod, &[("pod", pod)], &[&v4, &v6]));
            n += 1;
        }
    }
    w
}

#[test]
fn no_policy_allows_everything() {
    let w = xyz_abc();
    assert!(w.tcp("x/a", "y/b", 80));
    assert!(w.allowed("x/a", "8.8.8.8", IpProtocol::UDP, 53));
}

// §5.1: policyTypes defaulting.
#[test]
fn policy_types_default_to_ingress_plus_egress_only_with_rules() {
    let mut w = xyz_abc();
    // egress: [] with no policyTypes isolates ingress only.
    w.policy("x", "p", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": []}));
    assert!(!w.tcp("y/a", "x/a", 80), "ingress isolated by default");
    assert!(w.tcp("x/a", "y/a", 80), "egress: [] without policyTypes does not isolate egress");

    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {}, "egress": [{"ports": [{"port": 80}]}]}));
    assert!(!w.tcp("x/a", "y/a", 81), "non-empty egress defaults policyTypes to include Egress");
    assert!(w.tcp("x/a", "y/a", 80));
    assert!(!w.tcp("y/a", "x/a", 80), "and Ingress, with no ingress rules: deny");

    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [], "egress": [{}]}));
    assert!(w.tcp("y/a", "x/a", 80), "explicit [Egress] does not isolate ingress");
}

// §5.2: only a missing protocol means TCP (tests 38-40).
#[test]
fn protocol_defaults_to_tcp_and_nothing_else_means_tcp() {
    let mut w = xyz_abc();
    w.policy("x", "sctp", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"protocol": "SCTP", "port": 81}]}]}));
    assert!(!w.tcp("y/a", "x/a", 81), "SCTP rule must not open TCP");
    assert!(w.allowed("y/a", "x/a", IpProtocol::SCTP, 81));
    assert!(!w.allowed("y/a", "x/a", IpProtocol::UDP, 81));

    let mut w = xyz_abc();
    w.policy("x", "tcp", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 81}]}]}));
    assert!(w.tcp("y/a", "x/a", 81));
    assert!(!w.allowed("y/a", "x/a", IpProtocol::UDP, 81), "missing protocol is TCP only");
    assert!(!w.allowed("y/a", "x/a", IpProtocol::ICMP, 0), "a rule with ports never matches ICMP");
}

// §5.3: empty vs missing vs empty element.
#[test]
fn empty_missing_and_empty_element_rules() {
    let mut w = xyz_abc();
    w.policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}));
    assert!(!w.tcp("y/a", "x/a", 80));
    assert!(!w.allowed("y/a", "x/a", IpProtocol::ICMP, 0));

    let mut w = xyz_abc();
    w.policy("x", "deny-missing", json!({"podSelector": {}, "policyTypes": ["Ingress"]}));
    assert!(!w.tcp("y/a", "x/a", 80), "missing ingress with Ingress type denies");

    let mut w = xyz_abc();
    w.policy("x", "allow", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}));
    assert!(w.tcp("y/a", "x/a", 80));
    assert!(w.allowed("8.8.8.8", "x/a", IpProtocol::ICMP, 0), "[{{}}] allows every source and protocol");

    let mut w = xyz_abc();
    w.policy("x", "empty-lists", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [], "ports": []}]}));
    assert!(w.allowed("8.8.8.8", "x/a", IpProtocol::UDP, 9), "empty from and ports mean all");
}

// §5.4: selectors inside a peer.
#[test]
fn pod_selector_alone_means_policy_namespace() {
    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}));
    assert!(w.tcp("x/b", "x/a", 80));
    assert!(!w.tcp("y/b", "x/a", 80), "test 23: other namespaces are denied");
}

#[test]
fn namespace_selector_empty_means_all_namespaces() {
    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}}]}]}));
    assert!(w.tcp("x/b", "x/a", 80) && w.tcp("z/c", "x/a", 80), "test 5");
    assert!(!w.tcp("10.250.0.9", "x/a", 80), "but not addresses outside the cluster");
}

#[test]
fn selectors_in_one_peer_are_anded_separate_peers_ored() {
    let mut w = xyz_abc();
    w.policy(
        "x",
        "and",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [
        {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
         "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    assert!(w.tcp("y/b", "x/a", 80) && w.tcp("z/b", "x/a", 80));
    assert!(!w.tcp("x/b", "x/a", 80) && !w.tcp("y/a", "x/a", 80), "test 10: AND");

    let mut w = xyz_abc();
    w.policy(
        "x",
        "or",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [
        {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]}},
        {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    assert!(w.tcp("x/b", "x/a", 80) && w.tcp("y/a", "x/a", 80));
    assert!(!w.tcp("x/c", "x/a", 80), "test 9: OR");
}

// §5.5: policies add up; egress AND ingress.
#[test]
fn policies_union_and_both_sides_must_allow() {
    let mut w = xyz_abc();
    w.policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}));
    w.policy("x", "allow-a", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {}}]}]}));
    assert!(w.tcp("y/c", "x/a", 80), "test 4: union");
    assert!(!w.tcp("y/c", "x/b", 80));

    // Test 28: the client's egress can deny what the server's ingress allows.
    let mut w = xyz_abc();
    w.policy("x", "egress", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}));
    w.policy("y", "ingress-b", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}));
    assert!(w.tcp("x/a", "y/a", 80));
    assert!(!w.tcp("x/a", "y/b", 80));
    let v = verdict(&w.state, &Flow { src: w.ip("x/a"), dst: w.ip("y/b"), protocol: IpProtocol::TCP, port: 80 });
    assert!(matches!(v.egress, Decision::Denied { .. }) && matches!(v.ingress, Decision::Allowed { .. }));
}

// §5.7: ipBlock applies to pod addresses; except carves; union with other peers.
#[test]
fn ip_block_matches_pods_and_except_carves_out() {
    let mut w = xyz_abc();
    let xb = w.ip("x/b");
    w.policy(
        "x",
        "cidr",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/4", "except": [format!("{xb}/32")]}}]}]}),
    );
    assert!(!w.tcp("x/a", "x/b", 80), "test 35");
    assert!(w.tcp("x/a", "x/c", 80));
    assert!(w.tcp("x/a", "10.1.2.3", 80), "external addresses in the block");
    assert!(!w.tcp("x/a", "fd10:244::3", 80), "the IPv4 block says nothing of IPv6");

    w.policy(
        "x",
        "host",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": format!("{xb}/32")}}]}]}),
    );
    assert!(w.tcp("x/a", "x/b", 80), "an excepted address allowed by another policy is allowed (legacy 27)");
}

#[test]
fn ip_block_with_host_bits_is_masked() {
    let mut w = xyz_abc();
    let xa = w.ip("x/a");
    // NP-3x3 test 35 writes `<x/a IP>/4` unmasked; the API server accepts it.
    w.policy("x", "p", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": format!("{xa}/4")}}]}]}));
    assert!(w.tcp("x/a", "y/c", 80));
    assert!(!w.tcp("x/a", "200.0.0.1", 80));
}

// §5.8: named ports resolve on the destination pod.
#[test]
fn named_ports_resolve_per_destination_pod() {
    let mut w = World::xyz();
    let mut a = mk_pod("x", "a", &[("pod", "a")], &["10.244.0.1"]);
    let mut b = mk_pod("y", "b", &[("pod", "b")], &["10.244.0.2"]);
    let mut c = mk_pod("y", "c", &[("pod", "c")], &["10.244.0.3"]);
    a.named_ports = vec![NamedPort { name: "http".into(), port: 1000, protocol: Protocol::Tcp }];
    b.named_ports = vec![NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }];
    c.named_ports = vec![NamedPort { name: "http".into(), port: 9090, protocol: Protocol::Udp }];
    w.pod(a).pod(b).pod(c);
    w.policy("x", "egress-http", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "http"}]}]}));
    assert!(w.tcp("x/a", "y/b", 8080), "resolved on the destination, not the source (aws#149)");
    assert!(!w.tcp("x/a", "y/b", 1000), "the source's own number does not apply");
    assert!(!w.allowed("x/a", "y/c", IpProtocol::UDP, 9090), "TCP rule naming a UDP port opens nothing");
    assert!(!w.tcp("x/a", "y/c", 9090));
    assert!(!w.tcp("x/a", "8.8.8.8", 8080), "no pod behind an external address: the name resolves to nothing");

    w.policy(
        "y",
        "ingress-http",
        json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": "http", "protocol": "UDP"}]}]}),
    );
    assert!(!w.allowed("x/a", "y/c", IpProtocol::UDP, 9090), "x/a's egress still blocks UDP");
    assert!(w.allowed("10.0.0.9", "y/c", IpProtocol::UDP, 9090), "ingress resolves on the target");
    assert!(!w.allowed("10.0.0.9", "y/b", IpProtocol::UDP, 8080), "y/b has no UDP port named http");
}

#[test]
fn egress_named_port_with_ip_block_resolves_on_pods_inside() {
    let mut w = xyz_abc();
    w.policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/29"}}], "ports": [{"port": "serve-81-tcp"}]}]}),
    );
    assert!(w.tcp("x/a", "x/b", 81));
    assert!(!w.tcp("x/a", "x/b", 80));
    assert!(!w.tcp("x/a", "z/c", 81), "z/c (10.244.0.9) is outside the /29");
}

// endPort.
#[test]
fn end_port_ranges_are_inclusive() {
    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 80, "endPort": 90}]}]}));
    assert!(w.tcp("y/a", "x/a", 80) && w.tcp("y/a", "x/a", 85) && w.tcp("y/a", "x/a", 90));
    assert!(!w.tcp("y/a", "x/a", 79) && !w.tcp("y/a", "x/a", 91));
}

// §5.10: the node may always reach its pods.
#[test]
fn own_node_reaches_isolated_pods_other_nodes_do_not() {
    let mut w = xyz_abc();
    w.policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}));
    assert!(w.tcp("10.250.0.1", "x/a", 80), "own node");
    assert!(w.tcp("fd10:250::1", "x/a", 80), "own node over IPv6");
    assert!(!w.tcp("10.250.0.2", "x/a", 80), "another node's address is just an address");
    assert!(!w.tcp("x/a", "10.250.0.1", 80), "egress to the node is subject to policy");
}

#[test]
fn host_network_pods_are_node_traffic_not_peers() {
    let mut w = xyz_abc();
    let mut h = mk_pod("x", "host", &[("pod", "b")], &["10.250.0.1"]);
    h.host_network = true;
    w.pod(h);
    w.policy("x", "from-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}));
    w.policy("x", "isolate-b", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"], "egress": []}));
    // The hostNetwork pod is not a target of isolate-b: it can talk to other pods.
    assert!(w.tcp("10.250.0.1", "y/a", 80));
    // And its address is the node's: ingress from it always passes.
    assert!(w.tcp("10.250.0.1", "x/a", 80));

    // A hostNetwork pod on another node is neither a pod peer nor the local node.
    let mut h2 = mk_pod("x", "host2", &[("pod", "b")], &["10.250.0.2"]);
    h2.host_network = true;
    h2.node = Some("n2".into());
    w.pod(h2);
    assert!(!w.tcp("10.250.0.2", "x/a", 80));
}

// §5.12: a pod can always reach itself.
#[test]
fn a_pod_reaches_itself() {
    let mut w = xyz_abc();
    w.policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}));
    assert!(w.tcp("x/a", "x/a", 80));
}

// §5.17: the default namespace label exists even without a Namespace object.
#[test]
fn namespace_name_label_is_implicit() {
    let mut w = World::default();
    w.pod(mk_pod("x", "a", &[("pod", "a")], &["10.244.0.1"]));
    w.pod(mk_pod("y", "a", &[("pod", "a")], &["10.244.0.2"]));
    w.policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}));
    assert!(w.tcp("y/a", "x/a", 80));
}

// §5.18: all four operators.
#[test]
fn label_selector_operators() {
    let mut w = xyz_abc();
    w.pod(mk_pod("y", "bare", &[], &["10.244.0.50"]));
    w.policy(
        "x",
        "p",
        json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [
        {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}},
        {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["c"]}]}}]}]}),
    );
    assert!(w.tcp("y/bare", "x/a", 80), "legacy 18: no labels matches DoesNotExist");
    assert!(w.tcp("z/c", "x/a", 80));
    assert!(!w.tcp("z/b", "x/a", 80));
}

// §5.14: a deny-all denies other protocols too.
#[test]
fn icmp_follows_rules_without_ports() {
    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}));
    assert!(w.allowed("x/b", "x/a", IpProtocol::ICMP, 0));
    assert!(!w.allowed("y/b", "x/a", IpProtocol::ICMP, 0));
}

#[test]
fn terminated_and_unknown_addresses_are_external() {
    let mut w = xyz_abc();
    w.policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}}]}]}));
    assert!(!w.tcp("10.244.0.200", "x/a", 80), "an address no pod holds is not a pod peer");
}

#[test]
fn provenance_names_policies_and_rules() {
    let mut w = xyz_abc();
    w.policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}));
    w.policy(
        "x",
        "allow-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [
        {"from": [{"podSelector": {}}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}], "ports": [{"port": 80}]}]}),
    );
    let v = verdict(&w.state, &Flow { src: w.ip("y/a"), dst: w.ip("x/a"), protocol: IpProtocol::TCP, port: 80 });
    assert!(v.allowed);
    assert_eq!(v.egress, Decision::NotIsolated);
    match v.ingress {
        Decision::Allowed { isolated_by, allowed_by } => {
            assert_eq!(isolated_by, vec![ObjectKey::new("x", "allow-y"), ObjectKey::new("x", "deny")]);
            assert_eq!(allowed_by.len(), 1);
            assert_eq!(allowed_by[0].policy, ObjectKey::new("x", "allow-y"));
            assert_eq!(allowed_by[0].rule, 1);
        }
        other => panic!("{other:?}"),
    }
}
