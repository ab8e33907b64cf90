//! One test per ClusterNetworkPolicy semantic rule, from the upstream API text
//! (`clusternetworkpolicy_types.go`, `site-src/api-overview.md`, the conformance
//! manifests). Each verdict is checked on the reference evaluator and the compiled tables
//! at once (`World::allowed`).

use serde_json::json;

use super::*;
use crate::cnp::{Action, DecidedBy, Tier};
use crate::tests::{World, labels, mk_pod};
use crate::{Flow, IpProtocol, ObjectKey, verdict};

/// Namespaces x, y, z with pods a, b, c each (label `pod`), on node n1.
fn world() -> World {
    let mut w = World::xyz();
    let mut n = 1;
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            w.pod(mk_pod(ns, pod, &[("pod", pod)], &[&format!("10.244.0.{n}"), &format!("fd10:244::{n}")]));
            n += 1;
        }
    }
    w
}

fn cnp(w: &mut World, name: &str, spec: serde_json::Value) {
    w.state.upsert_cluster_policy(valid_cnp(name, spec));
}

fn ns(name: &str) -> serde_json::Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": name}})
}

fn ingress(tier: &str, priority: u16, subject_ns: &str, rules: serde_json::Value) -> serde_json::Value {
    json!({"tier": tier, "priority": priority, "subject": {"namespaces": ns(subject_ns)}, "ingress": rules})
}

fn egress(tier: &str, priority: u16, subject_ns: &str, rules: serde_json::Value) -> serde_json::Value {
    json!({"tier": tier, "priority": priority, "subject": {"namespaces": ns(subject_ns)}, "egress": rules})
}

fn tcp(port: u16) -> serde_json::Value {
    json!([{"tcp": {"destinationPort": {"number": port}}}])
}

fn v(w: &World, from: &str, to: &str, port: u16) -> crate::Verdict {
    verdict(&w.state, &Flow { src: w.ip(from), dst: w.ip(to), protocol: IpProtocol::TCP, port })
}

// "Deny: Drops the selected traffic. No further ClusterNetworkPolicy or NetworkPolicy
// rules will be processed." (api_integration: Admin Deny wins over an NP allow)
#[test]
fn admin_deny_overrides_a_networkpolicy_allow() {
    let mut w = world();
    w.policy("x", "allow-all", json!({"podSelector": {}, "ingress": [{}]}));
    cnp(&mut w, "deny-y", ingress("Admin", 10, "x", json!([{"action": "Deny", "from": [{"namespaces": ns("y")}]}])));
    assert!(!w.tcp("y/a", "x/a", 80));
    assert!(w.tcp("z/a", "x/a", 80), "the NetworkPolicy still allows what the Admin tier left alone");
}

// "Pass: Skips all further ClusterNetworkPolicy rules in the current tier ... and passes
// evaluation to the next tier"; "v1.NetworkPolicy always makes a final decision for
// selected pods".
#[test]
fn admin_pass_hands_over_to_the_networkpolicy_tier() {
    let mut w = world();
    cnp(&mut w, "pass-y", ingress("Admin", 10, "x", json!([{"action": "Pass", "from": [{"namespaces": ns("y")}]}, {"action": "Deny", "from": [{"namespaces": ns("y")}]}])));
    cnp(&mut w, "baseline-accept", ingress("Baseline", 10, "x", json!([{"action": "Accept", "from": [{"namespaces": ns("y")}]}])));
    w.policy("x", "only-yb", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}));
    assert!(w.tcp("y/b", "x/a", 80), "the later Deny of the same tier is skipped; the NetworkPolicy allows y/b");
    assert!(!w.tcp("y/a", "x/a", 80), "the NetworkPolicy isolates x/a and decides: the Baseline Accept is never reached");
    let verdict = v(&w, "y/b", "x/a", 80);
    assert_eq!(verdict.ingress_tiers.decided_by, DecidedBy::NetworkPolicy);
    assert_eq!(verdict.ingress_tiers.passed_by[0].policy, "pass-y");
}

// api_integration: Pass with no NetworkPolicy → the Baseline tier decides.
#[test]
fn admin_pass_without_networkpolicy_reaches_baseline() {
    let mut w = world();
    cnp(&mut w, "pass-y", ingress("Admin", 10, "x", json!([{"action": "Pass", "from": [{"namespaces": ns("y")}]}])));
    cnp(&mut w, "baseline-deny", ingress("Baseline", 10, "x", json!([{"action": "Deny", "from": [{"namespaces": {}}]}])));
    assert!(!w.tcp("y/a", "x/a", 80));
    assert!(!w.tcp("z/a", "x/a", 80));
}

// The action enum is not tied to a tier: a Baseline Pass skips the rest of the Baseline
// tier, and "If a given connection wasn't allowed or denied by any of the tiers, the
// default kubernetes policy is applied" (allow).
#[test]
fn baseline_pass_falls_through_to_default_allow() {
    let mut w = world();
    cnp(&mut w, "a-pass", ingress("Baseline", 1, "x", json!([{"action": "Pass", "from": [{"namespaces": ns("y")}]}])));
    cnp(&mut w, "b-deny", ingress("Baseline", 2, "x", json!([{"action": "Deny", "from": [{"namespaces": {}}]}])));
    assert!(w.tcp("y/a", "x/a", 80));
    assert!(!w.tcp("z/a", "x/a", 80));
    assert_eq!(v(&w, "y/a", "x/a", 80).ingress_tiers.decided_by, DecidedBy::DefaultAllow);
}

// "Baseline tier is a cluster-wide policy that can be overridden by the v1.NetworkPolicy."
#[test]
fn networkpolicy_overrides_baseline_only_for_pods_it_selects() {
    let mut w = world();
    cnp(&mut w, "deny-all", ingress("Baseline", 0, "x", json!([{"action": "Deny", "from": [{"namespaces": {}}]}])));
    w.policy("x", "a-from-y", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": ns("y")}]}]}));
    assert!(w.tcp("y/a", "x/a", 80), "the NetworkPolicy allows it");
    assert!(!w.tcp("z/a", "x/a", 80), "the NetworkPolicy isolates x/a: denied without the Baseline");
    assert!(!w.tcp("y/a", "x/b", 80), "x/b has no NetworkPolicy: the Baseline Deny applies");
}

// "Policies with lower priority values have higher precedence" (conformance
// standard-priority-field: priority 50 Deny beats priority 60 Pass; the Pass moved to
// priority 40 falls through to the Baseline Accept).
#[test]
fn lower_priority_value_takes_precedence() {
    let mut w = world();
    cnp(&mut w, "deny", ingress("Admin", 50, "x", json!([{"action": "Deny", "from": [{"namespaces": ns("y")}]}])));
    cnp(&mut w, "pass", ingress("Admin", 60, "x", json!([{"action": "Pass", "from": [{"namespaces": ns("y")}]}])));
    cnp(&mut w, "baseline", ingress("Baseline", 0, "x", json!([{"action": "Accept", "from": [{"namespaces": ns("y")}]}])));
    assert!(!w.tcp("y/a", "x/a", 80));
    cnp(&mut w, "pass", ingress("Admin", 40, "x", json!([{"action": "Pass", "from": [{"namespaces": ns("y")}]}])));
    assert!(w.tcp("y/a", "x/a", 80));
}

// "a rule that appears at the top of the ingress rules would take the highest precedence"
// (conformance: rules swapped by patch).
#[test]
fn first_matching_rule_of_a_policy_wins() {
    let mut w = world();
    let accept = json!({"action": "Accept", "from": [{"namespaces": ns("y")}]});
    let deny = json!({"action": "Deny", "from": [{"namespaces": ns("y")}]});
    cnp(&mut w, "p", ingress("Admin", 3, "x", json!([accept, deny])));
    assert!(w.tcp("y/a", "x/a", 80));
    cnp(&mut w, "p", ingress("Admin", 3, "x", json!([deny, accept])));
    assert!(!w.tcp("y/a", "x/a", 80));
    // A port-specific rule only decides its port.
    cnp(&mut w, "p", ingress("Admin", 3, "x", json!([{"action": "Deny", "from": [{"namespaces": ns("z")}], "protocols": tcp(80)}, {"action": "Accept", "from": [{"namespaces": ns("z")}]}])));
    assert!(!w.tcp("z/a", "x/a", 80));
    assert!(w.tcp("z/a", "x/a", 8080));
    assert!(w.allowed("z/a", "x/a", IpProtocol::UDP, 80));
}

// Egress "Accept: ... No further egress ClusterNetworkPolicy or NetworkPolicy rules will
// be processed but any ingress rules at the destination do apply."
#[test]
fn egress_accept_still_needs_the_destination_ingress() {
    let mut w = world();
    w.policy("x", "deny-egress", json!({"podSelector": {}, "policyTypes": ["Egress"]}));
    cnp(&mut w, "accept", egress("Admin", 1, "x", json!([{"action": "Accept", "to": [{"namespaces": ns("y")}]}])));
    assert!(w.tcp("x/a", "y/a", 80), "the Admin Accept overrides the source's NetworkPolicy");
    assert!(!w.tcp("x/a", "z/a", 80));
    w.policy("y", "deny-ingress", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}));
    assert!(!w.tcp("x/a", "y/b", 80), "the destination's ingress still applies");
}

// networks: "cluster-internal traffic will be checked against the rule as well. So if you
// Accept or Deny traffic to "0.0.0.0/0", that will allow or deny all IPv4 pod-to-pod
// traffic as well" (conformance inline-cidr: a pods Accept ranked earlier wins).
#[test]
fn networks_match_pod_addresses() {
    let mut w = world();
    cnp(&mut w, "cidr", egress("Admin", 1, "x", json!([
        {"action": "Accept", "to": [{"pods": {"namespaceSelector": ns("y"), "podSelector": {"matchLabels": {"pod": "a"}}}}]},
        {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
    ])));
    assert!(w.tcp("x/a", "y/a", 80));
    assert!(!w.tcp("x/a", "y/b", 80), "an IPv4 pod address is in 0.0.0.0/0");
    assert!(!w.tcp("x/a", "8.8.8.8", 443));
    assert!(w.tcp("x/a", "fd10:244::5", 80), "IPv6 is not in 0.0.0.0/0");
}

// "Note that host-networked pods are not included in subject selection" nor in pods /
// namespaces peers: their traffic is node traffic.
#[test]
fn host_network_pods_are_neither_subjects_nor_pod_peers() {
    let mut w = world();
    let mut host = mk_pod("x", "host", &[("pod", "a")], &["10.250.0.1", "fd10:250::1"]);
    host.host_network = true;
    w.pod(host);
    cnp(&mut w, "deny-in", ingress("Admin", 1, "x", json!([{"action": "Deny", "from": [{"namespaces": {}}]}])));
    cnp(&mut w, "deny-out", egress("Admin", 1, "x", json!([{"action": "Deny", "to": [{"namespaces": {}}]}])));
    assert!(!w.tcp("y/a", "x/a", 80));
    assert!(w.tcp("y/a", "10.250.0.1", 80), "the hostNetwork pod is not a subject");
    assert!(w.tcp("10.250.0.1", "y/a", 80), "nor a subject for egress");
    assert!(!w.tcp("x/a", "y/a", 80));
    assert!(w.tcp("x/a", "10.250.0.1", 80), "nor a pod peer");
    // Directly, not only through address ownership (which already makes its traffic
    // node traffic): the subject selector never picks it.
    let host = w.state.pod(&ObjectKey::new("x", "host")).unwrap();
    assert!(!crate::cnp::eval::selects(&w.state, w.state.cluster_policy("deny-in").unwrap(), host));
    assert!(!crate::cnp::eval::applies(&w.state, host, crate::Direction::Ingress));
}

// "A Pod connecting to its own Pod IP is not subject to CNP." (api-overview, hairpin)
#[test]
fn own_traffic_is_not_subject() {
    let mut w = world();
    cnp(&mut w, "deny", json!({"tier": "Admin", "priority": 0, "subject": {"namespaces": {}},
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        "egress": [{"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]}]}));
    assert!(w.tcp("x/a", "x/a", 80));
    assert!(!w.tcp("x/a", "x/b", 80));
}

// "If two (or more) policies in the same tier with the same priority could match a
// connection, then the implementation can apply any of the matching policies": ours is
// by name, and the verdict names the other policy.
#[test]
fn equal_priority_is_ordered_by_name_and_reported() {
    let mut w = world();
    cnp(&mut w, "b-deny", ingress("Admin", 5, "x", json!([{"action": "Deny", "from": [{"namespaces": ns("y")}]}])));
    cnp(&mut w, "a-accept", ingress("Admin", 5, "x", json!([{"action": "Accept", "from": [{"namespaces": ns("y")}]}])));
    assert!(w.tcp("y/a", "x/a", 80), "a-accept sorts first");
    let verdict = v(&w, "y/a", "x/a", 80);
    assert_eq!(verdict.ingress_tiers.ambiguous_with, vec!["b-deny".to_string()]);
    let ties = crate::cnp::priority_ties(&w.state);
    assert_eq!(ties, vec![(Tier::Admin, 5, vec!["a-accept".to_string(), "b-deny".to_string()])]);
    // Same action: nothing to warn about.
    cnp(&mut w, "b-deny", ingress("Admin", 5, "x", json!([{"action": "Accept", "from": [{"namespaces": ns("y")}]}])));
    assert!(v(&w, "y/a", "x/a", 80).ingress_tiers.ambiguous_with.is_empty());
}

// Peers the agent cannot honour fail closed: "For "Accept" rules, "fail closed" means:
// "treat the rule as matching no traffic". For "Deny" and "Pass" rules ... "Deny all"".
#[test]
fn unhonourable_peers_fail_closed_and_are_reported() {
    let mut w = world();
    let p = valid_cnp("dns", egress("Admin", 1, "x", json!([
        {"action": "Accept", "to": [{"domainNames": ["example.com"]}]},
        {"action": "Deny", "to": [{"networks": ["8.8.8.0/24"]}]},
    ])));
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(p.warnings[0].field, "spec.egress[0].to");
    w.state.upsert_cluster_policy(p);
    assert!(!w.tcp("x/a", "8.8.8.8", 443), "the domainNames Accept matches nothing: the Deny decides");
    assert!(w.tcp("x/a", "y/a", 80));

    // A peer with no known field (a newer API's): the Accept rule matches nothing even
    // for its other peers; a Deny or Pass rule denies everything.
    let mut w = world();
    cnp(&mut w, "newer", ingress("Admin", 1, "x", json!([
        {"action": "Accept", "from": [{}, {"namespaces": ns("y")}]},
        {"action": "Deny", "from": [{"namespaces": ns("y")}]},
    ])));
    assert!(!w.tcp("y/a", "x/a", 80));
    let mut w = world();
    let p = valid_cnp("newer", ingress("Admin", 1, "x", json!([{"action": "Pass", "from": [{}]}])));
    assert_eq!(p.ingress[0].effective_action(), Action::Deny);
    assert_eq!(p.warnings.len(), 1);
    w.state.upsert_cluster_policy(p);
    assert!(!w.tcp("z/c", "x/a", 80));
    assert!(!w.allowed("z/c", "x/a", IpProtocol::ICMP, 0));
}

// nodes: "It selects the nodeIPs as the peer type by matching on the IPs present in the
// node.Status.Addresses field of the node" (and hostNetwork pods use their node's IPs).
#[test]
fn nodes_peers_match_selected_node_addresses() {
    let mut w = world();
    w.state.upsert_node(crate::Node { name: "n2".into(), addresses: vec!["10.250.0.2".parse().unwrap()] });
    w.state.set_node_labels("n1", labels(&[("kubernetes.io/os", "linux")]));
    let mut host = mk_pod("z", "centaur", &[], &["10.250.0.7"]);
    host.host_network = true;
    w.pod(host);
    cnp(&mut w, "nodes", egress("Admin", 1, "x", json!([{"action": "Deny", "to": [{"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}}]}])));
    assert!(!w.tcp("x/a", "10.250.0.1", 10250));
    assert!(!w.tcp("x/a", "10.250.0.7", 80), "a hostNetwork pod on n1 has n1's identity");
    assert!(w.tcp("x/a", "10.250.0.2", 10250), "n2 is not selected");
    assert!(w.tcp("x/a", "y/a", 80));
    w.state.set_node_labels("n2", labels(&[("kubernetes.io/os", "linux")]));
    assert!(!w.tcp("x/a", "10.250.0.2", 10250), "relabelled");
}

// destinationNamedPort "selects a destination port on a pod based on the ContainerPort
// name" (ingress: the subject's; egress: the destination pod's).
#[test]
fn named_ports_resolve_on_the_destination_pod() {
    let mut w = world();
    cnp(&mut w, "named", ingress("Admin", 1, "x", json!([
        {"action": "Accept", "from": [{"namespaces": ns("y")}], "protocols": [{"destinationNamedPort": "serve-80-tcp"}]},
        {"action": "Deny", "from": [{"namespaces": ns("y")}]},
    ])));
    assert!(w.tcp("y/a", "x/a", 80));
    assert!(!w.tcp("y/a", "x/a", 81));
    assert!(!w.allowed("y/a", "x/a", IpProtocol::UDP, 80), "the name is the TCP port's");
    let mut w = world();
    cnp(&mut w, "named", egress("Admin", 1, "x", json!([
        {"action": "Accept", "to": [{"namespaces": ns("y")}], "protocols": [{"destinationNamedPort": "serve-81-udp"}]},
        {"action": "Deny", "to": [{"namespaces": {}}]},
    ])));
    assert!(w.allowed("x/a", "y/b", IpProtocol::UDP, 81));
    assert!(!w.allowed("x/a", "y/b", IpProtocol::UDP, 80));
}

// protocols: "If unspecified, protocol-specific attributes will not be used to match
// traffic": a port-specific Deny leaves other protocols, ICMP included, to the next
// decision (here default allow).
#[test]
fn port_specific_deny_leaves_other_protocols_allowed() {
    let mut w = world();
    cnp(&mut w, "deny-80", ingress("Admin", 1, "x", json!([{"action": "Deny", "from": [{"namespaces": {}}], "protocols": tcp(80)}])));
    assert!(!w.tcp("y/a", "x/a", 80));
    assert!(w.tcp("y/a", "x/a", 81));
    assert!(w.allowed("y/a", "x/a", IpProtocol::ICMP, 0), "ICMP is not TCP 80");
    let table = crate::compile_pod(&w.state, w.state.pod(&ObjectKey::new("x", "a")).unwrap()).ingress;
    assert!(table.isolated, "a pod selected only by a ClusterNetworkPolicy gets tables");
    // A rule without protocols matches ICMP too.
    cnp(&mut w, "deny-80", ingress("Admin", 1, "x", json!([{"action": "Deny", "from": [{"namespaces": ns("y")}]}])));
    assert!(!w.allowed("y/a", "x/a", IpProtocol::ICMP, 0));
}

// "CNPs with no ingress rules do not affect ingress traffic."
#[test]
fn a_direction_without_rules_is_untouched() {
    let mut w = world();
    cnp(&mut w, "egress-only", egress("Baseline", 1, "x", json!([{"action": "Deny", "to": [{"namespaces": {}}]}])));
    assert!(w.tcp("y/a", "x/a", 80));
    assert!(!w.tcp("x/a", "y/a", 80));
    let t = crate::compile_pod(&w.state, w.state.pod(&ObjectKey::new("x", "a")).unwrap());
    assert!(!t.ingress.isolated);
    // Provenance: the deciding rule is on the entry.
    let e = t.egress.lookup(w.ip("y/a")).unwrap();
    assert!(e.rules.iter().any(|r| r.cluster.as_ref().is_some_and(|c| c.policy == "egress-only" && c.action == Action::Deny)), "{e:?}");
}

// The subject: `pods` ANDs the namespace and pod selectors.
#[test]
fn pods_subject_needs_both_selectors() {
    let mut w = world();
    cnp(&mut w, "p", json!({"tier": "Admin", "priority": 1,
        "subject": {"pods": {"namespaceSelector": ns("x"), "podSelector": {"matchLabels": {"pod": "a"}}}},
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}));
    assert!(!w.tcp("y/a", "x/a", 80));
    assert!(w.tcp("y/a", "x/b", 80));
    assert!(w.tcp("x/a", "y/a", 80), "y/a is not a subject");
}
