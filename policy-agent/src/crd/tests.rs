use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use policy_model::cnp::ClusterPolicy;
use policy_model::cnp::types::*;
use serde_json::{Value, json};

use super::*;

fn selector() -> LabelSelector {
    LabelSelector {
        match_labels: Some([("a".to_string(), "b".to_string())].into()),
        match_expressions: Some(vec![LabelSelectorRequirement { key: "k".into(), operator: "In".into(), values: Some(vec!["v".into()]) }]),
    }
}

fn pods() -> NamespacedPod {
    NamespacedPod { namespace_selector: Some(selector()), pod_selector: Some(selector()) }
}

fn protocol() -> ClusterNetworkPolicyProtocol {
    let m = ProtocolMatch { destination_port: Some(Port { number: Some(80), range: Some(PortRangeSpec { start: Some(1), end: Some(2) }) }) };
    ClusterNetworkPolicyProtocol { tcp: Some(m.clone()), udp: Some(m.clone()), sctp: Some(m), destination_named_port: Some("web".into()) }
}

/// Every field of the types set. Struct literals without `..Default::default()`: a field
/// added to the types fails to compile here until the schema is looked at too.
fn everything() -> ClusterNetworkPolicy {
    ClusterNetworkPolicy {
        api_version: Some("policy.networking.k8s.io/v1alpha2".into()),
        kind: Some("ClusterNetworkPolicy".into()),
        metadata: ObjectMeta { name: Some("n".into()), ..Default::default() },
        spec: ClusterNetworkPolicySpec {
            tier: Some("Admin".into()),
            priority: Some(3),
            subject: Some(ClusterNetworkPolicySubject { namespaces: Some(selector()), pods: Some(pods()) }),
            ingress: Some(vec![ClusterNetworkPolicyIngressRule {
                name: Some("r".into()),
                action: Some("Accept".into()),
                from: Some(vec![ClusterNetworkPolicyIngressPeer { namespaces: Some(selector()), pods: Some(pods()) }]),
                protocols: Some(vec![protocol()]),
            }]),
            egress: Some(vec![ClusterNetworkPolicyEgressRule {
                name: Some("r".into()),
                action: Some("Accept".into()),
                to: Some(vec![ClusterNetworkPolicyEgressPeer {
                    namespaces: Some(selector()),
                    pods: Some(pods()),
                    nodes: Some(selector()),
                    networks: Some(vec!["10.0.0.0/8".into()]),
                    domain_names: Some(vec!["example.com".into()]),
                }]),
                protocols: Some(vec![protocol()]),
            }]),
        },
        status: None,
    }
}

/// Every field path of a JSON value (array items as `[]`).
fn paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = format!("{prefix}.{k}");
                out.push(p.clone());
                paths(x, &p, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| paths(x, &format!("{prefix}[]"), out)),
        _ => {}
    }
}

/// Whether the schema declares the path (`.spec.egress[].to[].networks`).
fn declared(schema: &Value, path: &str) -> bool {
    let mut s = schema;
    for part in path.trim_start_matches('.').split('.') {
        let (name, arrays) = (part.trim_end_matches("[]"), part.matches("[]").count());
        let Some(next) = s.get("properties").and_then(|p| p.get(name)).or_else(|| s.get("additionalProperties")) else {
            return s.get("properties").is_none() && s.get("type") == Some(&json!("object"));
        };
        s = next;
        for _ in 0..arrays {
            s = &s["items"];
        }
    }
    true
}

#[test]
fn every_field_of_the_types_is_in_the_schema() {
    let v = serde_json::to_value(everything()).unwrap();
    let mut all = Vec::new();
    paths(&v, "", &mut all);
    let schema = schema();
    let missing: Vec<&String> = all.iter().filter(|p| !declared(&schema, p)).collect();
    assert!(missing.is_empty(), "fields of the Rust types the CRD schema does not declare: {missing:?}");
}

/// A value for every property the schema declares (one-of limits aside).
fn sample(s: &Value) -> Value {
    match s.get("type").and_then(Value::as_str) {
        Some("object") => match (s.get("properties").and_then(Value::as_object), s.get("additionalProperties")) {
            (Some(p), _) => Value::Object(p.iter().filter(|(k, _)| !["metadata", "status"].contains(&k.as_str())).map(|(k, v)| (k.clone(), sample(v))).collect()),
            (None, Some(a)) => json!({"k": sample(a)}),
            (None, None) => json!({}),
        },
        Some("array") => json!([sample(&s["items"])]),
        Some("integer") => json!(s.get("minimum").and_then(Value::as_i64).unwrap_or(1).max(1)),
        Some("string") => s.get("enum").and_then(|e| e.get(0)).cloned().unwrap_or(json!("x")),
        _ => Value::Null,
    }
}

#[test]
fn every_field_of_the_schema_reaches_the_types() {
    let want = sample(&schema());
    let typed: ClusterNetworkPolicy = serde_json::from_value(want.clone()).unwrap();
    let mut got = serde_json::to_value(&typed).unwrap();
    // Left out of the sample (free-form in the schema).
    got.as_object_mut().unwrap().remove("metadata");
    // The types drop what they do not know (serde ignores unknown fields): a difference
    // names a schema field the Rust types lack.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    paths(&want, "", &mut a);
    paths(&got, "", &mut b);
    let lost: Vec<&String> = a.iter().filter(|p| !b.contains(p)).collect();
    assert!(lost.is_empty(), "schema fields the Rust types lose: {lost:?}");
    assert_eq!(got, want);
}

fn cnp(spec: Value) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": "t"}, "spec": spec})
}

/// The shapes the upstream conformance manifests use (network-policy-api v0.2.0,
/// `conformance/tests/{admin,baseline}_tier/*.yaml`, `api_integration/*.yaml`): subjects by
/// namespace label and by pod, ordered Accept/Deny/Pass rules over namespaces and pods
/// peers, TCP/UDP/SCTP ports by number and range, named ports, `networks` with IPv4 and
/// IPv6 CIDRs and pod /32s, `nodes` with matchExpressions, and domainNames.
fn upstream_shapes() -> Vec<Value> {
    let house = |h: &str| json!({"matchLabels": {"conformance-house": h}});
    vec![
        cnp(json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": house("gryffindor")}, "ingress": [
            {"name": "accept-all-ingress-from-ravenclaw", "action": "Accept", "from": [{"namespaces": house("ravenclaw")}]},
            {"name": "deny-all-ingress-from-ravenclaw", "action": "Deny", "from": [{"namespaces": house("ravenclaw")}]},
            {"name": "pass-all-ingress-from-ravenclaw", "action": "Pass", "from": [{"namespaces": house("ravenclaw")}]},
            {"name": "deny-ingress-from-slytherin-at-port-80", "action": "Deny", "from": [{"namespaces": house("slytherin")}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
            {"name": "accept-ingress-from-hufflepuff-at-port-80", "action": "Accept", "from": [{"namespaces": house("hufflepuff")}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
            {"name": "deny-all-from-hufflepuff", "action": "Deny", "from": [{"namespaces": house("hufflepuff")}]}]})),
        cnp(json!({"tier": "Baseline", "priority": 0, "subject": {"pods": {"namespaceSelector": house("gryffindor"), "podSelector": {"matchLabels": {"app": "harry-potter"}}}}, "egress": [
            {"name": "udp", "action": "Deny", "to": [{"pods": {"namespaceSelector": house("slytherin"), "podSelector": {}}}], "protocols": [{"udp": {"destinationPort": {"number": 5353}}}]},
            {"name": "sctp-range", "action": "Accept", "to": [{"namespaces": house("hufflepuff")}], "protocols": [{"sctp": {"destinationPort": {"range": {"start": 9003, "end": 9005}}}}]},
            {"name": "named", "action": "Accept", "to": [{"namespaces": house("ravenclaw")}], "protocols": [{"destinationNamedPort": "web"}]}]})),
        cnp(json!({"tier": "Admin", "priority": 75, "subject": {"namespaces": {}}, "egress": [
            {"name": "pods-first", "action": "Accept", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "luna-lovegood"}}}}]},
            {"name": "pod-ips", "action": "Accept", "to": [{"networks": ["10.244.1.4/32", "fd00:10:244:1::8/128"]}]},
            {"name": "deny-everything", "action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]}]})),
        cnp(json!({"tier": "Admin", "priority": 16, "subject": {"namespaces": {"matchExpressions": [{"key": "conformance-house", "operator": "In", "values": ["gryffindor", "slytherin"]}]}}, "egress": [
            {"name": "to-nodes", "action": "Pass", "to": [{"nodes": {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "Exists"}]}}], "protocols": [{"tcp": {"destinationPort": {"range": {"start": 34345, "end": 34346}}}}]},
            {"name": "dns", "action": "Accept", "to": [{"domainNames": ["*.kubernetes.io", "kubernetes.io"]}]}]})),
    ]
}

#[test]
fn upstream_manifest_shapes_are_accepted_by_the_crd_and_the_model() {
    let schema = schema();
    for m in upstream_shapes() {
        assert_eq!(check(&schema, &m, ""), None, "{m}");
        let typed: ClusterNetworkPolicy = serde_json::from_value(m.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), m, "the types keep every field");
        ClusterPolicy::from_manifest(&typed).unwrap_or_else(|e| panic!("{e}: {m}"));
    }
}

#[test]
fn the_schema_refuses_what_the_api_refuses() {
    let schema = schema();
    let ok = json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": {}}});
    assert_eq!(check(&schema, &cnp(ok.clone()), ""), None);
    let mut bad = Vec::new();
    for (field, value) in [("tier", json!("Developer")), ("priority", json!(1001)), ("priority", json!(-1)), ("subject", json!({})), ("subject", json!({"namespaces": {}, "pods": {"podSelector": {}}}))] {
        let mut spec = ok.clone();
        spec[field] = value;
        bad.push(spec);
    }
    let rule = json!({"action": "Deny", "from": [{"namespaces": {}}]});
    bad.push(json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": {}}, "ingress": vec![rule.clone(); 26]}));
    bad.push(json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": {}}, "ingress": [{"action": "Drop", "from": [{"namespaces": {}}]}]}));
    bad.push(json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": []}]}));
    bad.push(json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 0}}}]}]}));
    bad.push(json!({"priority": 3, "subject": {"namespaces": {}}}));
    for spec in bad {
        assert!(check(&schema, &cnp(spec.clone()), "").is_some(), "accepted: {spec}");
    }
}

#[test]
fn the_crd_names_the_upstream_resource() {
    let c = crd();
    assert_eq!(c["metadata"]["name"], "clusternetworkpolicies.policy.networking.k8s.io");
    assert_eq!(c["spec"]["versions"][0]["name"], "v1alpha2");
    assert_eq!(c["spec"]["scope"], "Cluster");
}
