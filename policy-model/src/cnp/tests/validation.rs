//! Validation as the v0.2.0 CRD schema and CEL rules do it: manifests written as upstream
//! writes them are read as they are, and each bad field is rejected, named by policy and
//! field path.

use serde_json::json;

use super::*;
use crate::cnp::{Action, ClusterPeer, ClusterPort, Subject, Tier};
use crate::ports::{PortRange, Protocol};

fn from_yaml(yaml: &str) -> Result<ClusterPolicy, InvalidObject> {
    let cnp: ClusterNetworkPolicy = serde_yaml_ng::from_str(yaml).expect("manifest deserializes");
    ClusterPolicy::from_manifest(&cnp)
}

/// The fields of every error, checking the error names the object.
fn fields(spec: serde_json::Value) -> Vec<String> {
    match validate("bad", spec) {
        Ok(p) => panic!("expected rejection, got {p:?}"),
        Err(e) => {
            assert_eq!(e.kind, "ClusterNetworkPolicy");
            assert!(e.to_string().starts_with("ClusterNetworkPolicy bad is invalid: "), "{e}");
            e.errors.into_iter().map(|f| f.field).collect()
        }
    }
}

fn field(spec: serde_json::Value) -> String {
    let f = fields(spec);
    assert_eq!(f.len(), 1, "{f:?}");
    f[0].clone()
}

/// A valid spec with one ingress rule, to break one field at a time.
fn base_ingress(rule: serde_json::Value) -> serde_json::Value {
    json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "ingress": [rule]})
}

fn base_egress(rule: serde_json::Value) -> serde_json::Value {
    json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "egress": [rule]})
}

#[test]
fn upstream_manifest_shape_is_read_as_is() {
    let p = from_yaml(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: gress-rules
spec:
  tier: Admin
  priority: 15
  subject:
    namespaces:
      matchLabels:
          kubernetes.io/metadata.name: network-policy-conformance-gryffindor
  egress:
  - name: "deny-to-slytherin-at-ports-80-53-9003"
    action: "Deny"
    to:
    - namespaces:
        matchLabels:
          kubernetes.io/metadata.name: network-policy-conformance-slytherin
    protocols:
      - tcp:
          destinationPort:
            number: 80
      - udp:
          destinationPort:
            range:
              start: 53
              end: 54
      - destinationNamedPort: web
  - name: "to-nodes-and-internet"
    action: "Pass"
    to:
    - pods:
        namespaceSelector:
          matchLabels:
            conformance-house: slytherin
        podSelector:
          matchLabels:
            conformance-house: slytherin
    - nodes:
        matchLabels:
          kubernetes.io/os: linux
    - networks:
        - 0.0.0.0/0
        - ::/0
  ingress:
  - action: "Accept"
    from:
    - pods:
        podSelector: {}
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((p.name.as_str(), p.tier, p.priority), ("gress-rules", Tier::Admin, 15));
    assert!(matches!(p.subject, Subject::Namespaces(_)));
    assert_eq!(p.egress.len(), 2);
    assert_eq!(p.egress[0].name, "deny-to-slytherin-at-ports-80-53-9003");
    assert_eq!(p.egress[0].action, Action::Deny);
    assert_eq!(
        p.egress[0].protocols.as_deref().unwrap(),
        [
            ClusterPort::Range(Protocol::Tcp, PortRange::single(80)),
            ClusterPort::Range(Protocol::Udp, PortRange { start: 53, end: 54 }),
            ClusterPort::Named("web".into())
        ]
    );
    assert!(matches!(p.egress[1].peers[..], [ClusterPeer::Pods { .. }, ClusterPeer::Nodes(_), ClusterPeer::Networks(ref n)] if n.len() == 2));
    assert!(p.warnings.is_empty());
    // pods.namespaceSelector is optional: every namespace.
    assert!(matches!(&p.ingress[0].peers[0], ClusterPeer::Pods { namespaces, .. } if namespaces.is_everything()));

    // v1beta1 has the same schema.
    let p = from_yaml("apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: b}\nspec: {tier: Baseline, priority: 0, subject: {pods: {podSelector: {}}}}\n").unwrap();
    assert_eq!(p.tier, Tier::Baseline);
}

#[test]
fn tier_priority_and_subject() {
    assert_eq!(field(json!({"tier": "Developer", "priority": 1, "subject": {"namespaces": {}}})), "spec.tier");
    assert_eq!(field(json!({"priority": 1, "subject": {"namespaces": {}}})), "spec.tier");
    assert_eq!(field(json!({"tier": "Admin", "priority": 1001, "subject": {"namespaces": {}}})), "spec.priority");
    assert_eq!(field(json!({"tier": "Admin", "priority": -1, "subject": {"namespaces": {}}})), "spec.priority");
    assert!(validate("ok", json!({"tier": "Admin", "priority": 1000, "subject": {"namespaces": {}}})).is_ok());
    assert!(validate("ok", json!({"tier": "Admin", "priority": 0, "subject": {"namespaces": {}}})).is_ok());
    assert_eq!(field(json!({"tier": "Admin", "subject": {"namespaces": {}}})), "spec.priority");
    assert_eq!(field(json!({"tier": "Admin", "priority": 1})), "spec.subject");
    assert_eq!(field(json!({"tier": "Admin", "priority": 1, "subject": {}})), "spec.subject", "exactly one: none");
    assert_eq!(
        field(json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}, "pods": {"podSelector": {}}}})),
        "spec.subject",
        "exactly one: both"
    );
    assert_eq!(field(json!({"tier": "Admin", "priority": 1, "subject": {"pods": {"namespaceSelector": {}}}})), "spec.subject.pods.podSelector");
    assert_eq!(
        field(json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchExpressions": [{"key": "a", "operator": "In"}]}}})),
        "spec.subject.namespaces.matchExpressions[0].values"
    );
    let e = validate("", json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}})).unwrap_err();
    assert_eq!(e.errors[0].field, "metadata.name");
}

#[test]
fn rules_and_actions() {
    let ok = json!({"action": "Accept", "from": [{"namespaces": {}}]});
    let too_many: Vec<_> = (0..26).map(|_| ok.clone()).collect();
    assert_eq!(field(json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "ingress": too_many})), "spec.ingress");
    let max: Vec<_> = (0..25).map(|_| ok.clone()).collect();
    assert!(validate("ok", json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "egress": max.iter().map(|_| json!({"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}]})).collect::<Vec<_>>(), "ingress": max})).is_ok());
    assert_eq!(field(base_ingress(json!({"action": "Allow", "from": [{"namespaces": {}}]}))), "spec.ingress[0].action", "v1alpha1's Allow is now Accept");
    assert_eq!(field(base_ingress(json!({"from": [{"namespaces": {}}]}))), "spec.ingress[0].action");
    assert_eq!(field(base_ingress(json!({"action": "Deny"}))), "spec.ingress[0].from");
    assert_eq!(field(base_ingress(json!({"action": "Deny", "from": []}))), "spec.ingress[0].from");
    assert_eq!(field(base_egress(json!({"action": "Deny", "to": []}))), "spec.egress[0].to");
    let peers: Vec<_> = (0..26).map(|_| json!({"namespaces": {}})).collect();
    assert_eq!(field(base_ingress(json!({"action": "Deny", "from": peers}))), "spec.ingress[0].from");
    assert_eq!(field(base_ingress(json!({"name": "n".repeat(101), "action": "Deny", "from": [{"namespaces": {}}]}))), "spec.ingress[0].name");
    assert!(validate("ok", base_ingress(json!({"name": "n".repeat(100), "action": "Pass", "from": [{"namespaces": {}}]}))).is_ok());
}

#[test]
fn peers() {
    assert_eq!(
        field(base_egress(json!({"action": "Deny", "to": [{"namespaces": {}, "networks": ["10.0.0.0/8"]}]}))),
        "spec.egress[0].to[0]",
        "exactly one peer field"
    );
    assert_eq!(field(base_egress(json!({"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "10.0.0/8"]}]}))), "spec.egress[0].to[0].networks[1]");
    assert_eq!(field(base_egress(json!({"action": "Deny", "to": [{"networks": ["10.0.0.1"]}]}))), "spec.egress[0].to[0].networks[0]");
    assert_eq!(field(base_egress(json!({"action": "Deny", "to": [{"networks": []}]}))), "spec.egress[0].to[0].networks");
    let many: Vec<String> = (0..26).map(|i| format!("10.{i}.0.0/16")).collect();
    assert_eq!(field(base_egress(json!({"action": "Deny", "to": [{"networks": many}]}))), "spec.egress[0].to[0].networks");
    assert_eq!(
        field(base_egress(json!({"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}]}))),
        "spec.egress[0].to[0].networks[1]",
        "a set: no duplicates"
    );
    assert_eq!(field(base_egress(json!({"action": "Accept", "to": [{"domainNames": ["-bad.example"]}]}))), "spec.egress[0].to[0].domainNames[0]");
    assert!(validate("ok", base_egress(json!({"action": "Accept", "to": [{"domainNames": ["*.example.com", "kubernetes.io."]}]}))).is_ok());
    assert_eq!(field(base_egress(json!({"action": "Deny", "to": [{"pods": {"namespaceSelector": {}}}]}))), "spec.egress[0].to[0].pods.podSelector");
    assert!(validate("ok", base_egress(json!({"action": "Deny", "to": [{"networks": ["fd00::/8", "10.1.2.3/8"]}]}))).is_ok());
}

#[test]
fn protocols() {
    let rule = |protocols: serde_json::Value| base_ingress(json!({"action": "Deny", "from": [{"namespaces": {}}], "protocols": protocols}));
    assert_eq!(field(rule(json!([]))), "spec.ingress[0].protocols");
    assert_eq!(field(rule(json!([{}]))), "spec.ingress[0].protocols[0]");
    assert_eq!(
        field(rule(json!([{"tcp": {"destinationPort": {"number": 80}}, "udp": {"destinationPort": {"number": 53}}}]))),
        "spec.ingress[0].protocols[0]",
        "exactly one protocol form"
    );
    assert_eq!(field(rule(json!([{"tcp": {}}]))), "spec.ingress[0].protocols[0].tcp.destinationPort");
    assert_eq!(field(rule(json!([{"udp": {"destinationPort": {}}}]))), "spec.ingress[0].protocols[0].udp.destinationPort");
    assert_eq!(
        field(rule(json!([{"udp": {"destinationPort": {"number": 53, "range": {"start": 1, "end": 2}}}}]))),
        "spec.ingress[0].protocols[0].udp.destinationPort"
    );
    assert_eq!(field(rule(json!([{"sctp": {"destinationPort": {"number": 0}}}]))), "spec.ingress[0].protocols[0].sctp.destinationPort.number");
    assert_eq!(field(rule(json!([{"sctp": {"destinationPort": {"number": 65536}}}]))), "spec.ingress[0].protocols[0].sctp.destinationPort.number");
    assert_eq!(
        field(rule(json!([{"tcp": {"destinationPort": {"range": {"start": 90, "end": 90}}}}]))),
        "spec.ingress[0].protocols[0].tcp.destinationPort.range",
        "start < end"
    );
    assert_eq!(field(rule(json!([{"tcp": {"destinationPort": {"range": {"start": 90}}}}]))), "spec.ingress[0].protocols[0].tcp.destinationPort.range.end");
    assert_eq!(field(rule(json!([{"tcp": {"destinationPort": {"range": {"start": 0, "end": 9}}}}]))), "spec.ingress[0].protocols[0].tcp.destinationPort.range.start");
    let many: Vec<_> = (1..=26).map(|p| json!({"tcp": {"destinationPort": {"number": p}}})).collect();
    assert_eq!(field(rule(json!(many))), "spec.ingress[0].protocols");
    assert!(validate("ok", rule(json!([{"tcp": {"destinationPort": {"range": {"start": 1, "end": 65535}}}}]))).is_ok());
}

// CEL on the egress rule: "domainNames peer can only be used with Accept action".
#[test]
fn domain_names_only_in_accept_rules() {
    for action in ["Deny", "Pass"] {
        let spec = base_egress(json!({"action": action, "to": [{"namespaces": {}}, {"domainNames": ["a.example"]}]}));
        assert_eq!(field(spec), "spec.egress[0]", "{action}");
    }
    assert!(validate("ok", base_egress(json!({"action": "Accept", "to": [{"domainNames": ["a.example"]}]}))).is_ok());
}

// CEL on the egress rule: "networks/nodes/domainNames peer cannot be set with namedPorts".
#[test]
fn named_ports_only_with_pod_peers() {
    for peer in [json!({"networks": ["10.0.0.0/8"]}), json!({"nodes": {}}), json!({"domainNames": ["a.example"]})] {
        let spec = base_egress(json!({"action": "Accept", "to": [{"namespaces": {}}, peer], "protocols": [{"destinationNamedPort": "web"}]}));
        assert_eq!(field(spec), "spec.egress[0]");
    }
    assert!(validate("ok", base_egress(json!({"action": "Accept", "to": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "web"}]}))).is_ok());
}

#[test]
fn every_error_is_reported() {
    let f = fields(json!({"tier": "Both", "priority": 2000, "subject": {"namespaces": {}},
        "ingress": [{"action": "Maybe", "from": [{"namespaces": {}}]}]}));
    assert_eq!(f, ["spec.tier", "spec.priority", "spec.ingress[0].action"]);
}
