//! Validation as the API server does it: each bad field is rejected, named by policy and
//! field path; good policies convert.

use serde_json::json;

use super::*;

fn errors_of(spec: serde_json::Value) -> Vec<(String, String)> {
    match Policy::from_k8s(&mk_policy("x", "bad", spec)) {
        Ok(p) => panic!("expected rejection, got {p:?}"),
        Err(e) => {
            assert_eq!(e.key, ObjectKey::new("x", "bad"));
            assert!(e.to_string().starts_with("NetworkPolicy x/bad is invalid: "), "{e}");
            e.errors.into_iter().map(|f| (f.field, f.message)).collect()
        }
    }
}

fn field_of(spec: serde_json::Value) -> String {
    let errs = errors_of(spec);
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs[0].0.clone()
}

#[test]
fn bad_cidr() {
    let f = field_of(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0/8"}}]}]}));
    assert_eq!(f, "spec.ingress[0].from[0].ipBlock.cidr");
    let f = field_of(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]}));
    assert_eq!(f, "spec.ingress[0].from[0].ipBlock.cidr", "an address without a length is not a CIDR");
    let f = field_of(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": ""}}]}]}));
    assert_eq!(f, "spec.ingress[0].from[0].ipBlock.cidr");
}

#[test]
fn except_outside_or_equal_to_cidr() {
    let f = field_of(json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}));
    assert_eq!(f, "spec.egress[0].to[0].ipBlock.except[0]");
    let f = field_of(
        json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/24", "10.0.0.0/16"]}}]}]}),
    );
    assert_eq!(f, "spec.egress[0].to[0].ipBlock.except[1]", "except must be a strict subset");
    let f = field_of(json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}]}]}));
    assert_eq!(f, "spec.egress[0].to[0].ipBlock.except[0]", "other family");
}

#[test]
fn end_port_rules() {
    assert_eq!(
        field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]})),
        "spec.ingress[0].ports[0].endPort",
        "endPort without port"
    );
    assert_eq!(
        field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]})),
        "spec.ingress[0].ports[0].endPort",
        "endPort with a named port"
    );
    assert_eq!(
        field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 91, "endPort": 90}]}]})),
        "spec.ingress[0].ports[0].endPort",
        "endPort below port"
    );
    // The API test's accepted forms.
    valid(&mk_policy("x", "eq", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 90}]}]})));
    valid(&mk_policy("x", "gt", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 90}]}]})));
}

#[test]
fn bad_ports_and_protocols() {
    assert_eq!(field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]})), "spec.ingress[0].ports[0].protocol");
    assert_eq!(
        field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "tcp", "port": 80}]}]})),
        "spec.ingress[0].ports[0].protocol",
        "protocols are case-sensitive"
    );
    assert_eq!(field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})), "spec.ingress[0].ports[0].port");
    assert_eq!(field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]})), "spec.ingress[0].ports[0].port");
    assert_eq!(field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "Not_A_Name"}]}]})), "spec.ingress[0].ports[0].port");
    assert_eq!(
        field_of(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "80"}]}]})),
        "spec.ingress[0].ports[0].port",
        "a name needs a letter"
    );
}

#[test]
fn bad_selector_operator() {
    let f = field_of(json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Equals", "values": ["a"]}]}}));
    assert_eq!(f, "spec.podSelector.matchExpressions[0].operator");
    let f = field_of(
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}]}),
    );
    assert_eq!(f, "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values");
}

#[test]
fn bad_peers_and_types() {
    assert_eq!(field_of(json!({"podSelector": {}, "ingress": [{"from": [{}]}]})), "spec.ingress[0].from[0]", "a peer must say something");
    assert_eq!(
        field_of(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]})),
        "spec.ingress[0].from[0]",
        "ipBlock with a selector"
    );
    assert_eq!(field_of(json!({"podSelector": {}, "policyTypes": ["Ingres"]})), "spec.policyTypes[0]");
}

#[test]
fn all_errors_are_reported_at_once() {
    let errs =
        errors_of(json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "nope/8"}}], "ports": [{"protocol": "XTP"}]}]}));
    assert_eq!(errs.len(), 2, "{errs:?}");
}

#[test]
fn a_bad_policy_does_not_stop_the_others() {
    let mut c = crate::NodeCompiler::new("n1");
    let r = c.apply([
        crate::Change::UpsertNamespace(mk_ns("x", &[])),
        crate::Change::UpsertPod(mk_pod("x", "a", &[("pod", "a")], &["10.244.0.1"])),
        crate::Change::UpsertPolicy(Box::new(mk_policy("x", "bad", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})))),
        crate::Change::UpsertPolicy(Box::new(mk_policy("x", "good", json!({"podSelector": {}, "policyTypes": ["Ingress"]})))),
    ]);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].key, ObjectKey::new("x", "bad"));
    let ep = c.endpoint(&ObjectKey::new("x", "a")).unwrap();
    assert_eq!(ep.tables.ingress.isolated_by, vec![ObjectKey::new("x", "good")]);
}
