//! The node compiler: ids, revisions, and what each kind of change recompiles.

use serde_json::json;

use super::*;
use crate::{Change, NodeCompiler};

fn k(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap()
}

/// Namespaces x and y, pods a and b in each (x's on n1, y's on n2).
fn cluster() -> Vec<Change> {
    let mut changes = vec![Change::UpsertNamespace(mk_ns("x", &[])), Change::UpsertNamespace(mk_ns("y", &[]))];
    let mut n = 1;
    for ns in ["x", "y"] {
        for pod in ["a", "b"] {
            let mut p = mk_pod(ns, pod, &[("pod", pod)], &[&format!("10.244.0.{n}")]);
            if ns == "y" {
                p.node = Some("n2".into());
            }
            changes.push(Change::UpsertPod(p));
            n += 1;
        }
    }
    changes
}

fn setup() -> NodeCompiler {
    let mut c = NodeCompiler::new("n1");
    let r = c.apply(cluster());
    assert_eq!(r.added, vec![k("x/a"), k("x/b")], "only n1's pods are endpoints");
    c
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Change {
    Change::UpsertPolicy(Box::new(mk_policy(ns, name, spec)))
}

#[test]
fn ids_are_stable_and_reused() {
    let mut c = setup();
    let a = c.endpoint(&k("x/a")).unwrap().id;
    let b = c.endpoint(&k("x/b")).unwrap().id;
    assert_ne!(a, b);
    assert!(a > 0 && b > 0);
    let r = c.apply([Change::DeletePod(k("x/a"))]);
    assert_eq!(r.removed, vec![(k("x/a"), a)]);
    let r = c.apply([Change::UpsertPod(mk_pod("x", "c", &[], &["10.244.0.9"]))]);
    assert_eq!(r.added, vec![k("x/c")]);
    assert_eq!(c.endpoint(&k("x/c")).unwrap().id, a, "a freed id is reused");
    assert_eq!(c.endpoint(&k("x/b")).unwrap().id, b);
}

#[test]
fn policy_change_recompiles_only_its_targets() {
    let mut c = setup();
    let r = c.apply([policy("x", "deny-a", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}))]);
    assert_eq!(r.changed, vec![k("x/a")]);
    assert_eq!(r.recompiled, 1);
    assert_eq!(c.endpoint(&k("x/a")).unwrap().revision, 2);
    assert_eq!(c.endpoint(&k("x/b")).unwrap().revision, 1);

    // Same policy again: recompiled, but nothing changed for the datapath.
    let r = c.apply([policy("x", "deny-a", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}))]);
    assert!(r.changed.is_empty());
    assert_eq!(c.endpoint(&k("x/a")).unwrap().revision, 2);

    // Retargeting moves the isolation.
    let r = c.apply([policy("x", "deny-a", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}))]);
    assert_eq!(r.changed, vec![k("x/a"), k("x/b")]);
    let r = c.apply([Change::DeletePolicy(k("x/deny-a"))]);
    assert_eq!(r.changed, vec![k("x/b")]);
}

#[test]
fn pod_label_change_reaches_endpoints_that_peer_with_it() {
    let mut c = setup();
    c.apply([policy(
        "x",
        "from-db",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "db"}}}]}]}),
    )]);
    let before = c.endpoint(&k("x/a")).unwrap().tables.ingress.entries.len();
    let mut db = mk_pod("y", "b", &[("pod", "b"), ("role", "db")], &["10.244.0.4"]);
    db.node = Some("n2".into());
    let r = c.apply([Change::UpsertPod(db)]);
    assert_eq!(r.changed, vec![k("x/a")], "a remote pod now matches a peer");
    assert!(c.endpoint(&k("x/a")).unwrap().tables.ingress.entries.len() > before);
    let mut unrelated = mk_pod("y", "a", &[("pod", "a"), ("other", "1")], &["10.244.0.3"]);
    unrelated.node = Some("n2".into());
    let r = c.apply([Change::UpsertPod(unrelated)]);
    assert!(r.changed.is_empty() && r.recompiled == 0, "an unrelated pod recompiles nothing: {r:?}");
}

#[test]
fn namespace_label_change_reaches_namespace_selector_peers() {
    let mut c = setup();
    c.apply([policy(
        "x",
        "from-updated",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]}),
    )]);
    let r = c.apply([Change::UpsertNamespace(mk_ns("y", &[("ns2", "updated")]))]);
    assert_eq!(r.changed, vec![k("x/a")]);
    let r = c.apply([Change::UpsertNamespace(mk_ns("y", &[("ns2", "updated"), ("unrelated", "1")]))]);
    assert_eq!(r.recompiled, 0);
}

#[test]
fn rejected_update_keeps_last_valid_version() {
    let mut c = setup();
    c.apply([policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))]);
    let r = c.apply([policy("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}))]);
    assert_eq!(r.rejected.len(), 1);
    assert!(r.changed.is_empty());
    assert!(c.endpoint(&k("x/a")).unwrap().tables.ingress.isolated, "still enforced");
    assert_eq!(c.rejected().count(), 1);
    c.apply([Change::DeletePolicy(k("x/p"))]);
    assert_eq!(c.rejected().count(), 0);
}

#[test]
fn own_node_addresses_follow_node_changes() {
    let mut c = setup();
    c.apply([policy("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))]);
    let r = c.apply([Change::UpsertNode(Node { name: "n1".into(), addresses: vec!["10.250.0.1".parse().unwrap()] })]);
    assert_eq!(r.changed, vec![k("x/a"), k("x/b")]);
    let t = &c.endpoint(&k("x/a")).unwrap().tables.ingress;
    assert!(t.allows("10.250.0.1".parse().unwrap(), crate::IpProtocol::TCP, 1));
    let r = c.apply([Change::UpsertNode(Node { name: "n2".into(), addresses: vec!["10.250.0.2".parse().unwrap()] })]);
    assert_eq!(r.recompiled, 0, "another node's addresses change nothing here");
}

/// A relist after an API outage upserts every object again, unchanged: that must
/// recompile nothing (with 10,000 pods and 2,000 policies it stalled the loop for 10 s).
#[test]
fn relist_of_unchanged_objects_recompiles_nothing() {
    let mut c = setup();
    c.apply([policy(
        "x",
        "from-y",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}],
        "egress": [{"ports": [{"port": "http"}]}]}),
    )]);
    let mut relist = cluster();
    relist.push(Change::UpsertNode(Node { name: "n1".into(), addresses: vec![] }));
    c.apply([relist.last().unwrap().clone()]);
    relist.push(policy(
        "x",
        "from-y",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}],
        "egress": [{"ports": [{"port": "http"}]}]}),
    ));
    let r = c.apply(relist);
    assert_eq!(r.recompiled, 0, "{r:?}");
    assert!(r.changed.is_empty());
}

/// An update refused by validation, then the last valid version again: the policy is no
/// longer reported as refused, though the state holds that version all along.
#[test]
fn valid_version_again_clears_the_refusal() {
    let mut c = setup();
    let valid = json!({"podSelector": {}, "policyTypes": ["Ingress"]});
    c.apply([policy("x", "p", valid.clone())]);
    c.apply([policy("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}))]);
    assert_eq!(c.rejected().count(), 1);
    c.apply([policy("x", "p", valid)]);
    assert_eq!(c.rejected().count(), 0);
}
