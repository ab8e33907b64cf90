//! `policy-agent crd`: a CustomResourceDefinition for ClusterNetworkPolicy
//! (policy.networking.k8s.io/v1alpha2), written beside the Rust types it must agree with
//! (`policy_model::cnp::types`). Tests hold the two together both ways: every field of
//! the types is in the schema, and every field of the schema reaches the types.
//!
//! The schema carries the bounds the API server checks without CEL (enums, ranges,
//! list sizes, exactly-one-of as min/maxProperties); the rules only CEL can say
//! (`start < end`, Accept-only `domainNames`, no named ports toward networks/nodes) are
//! kept as `x-kubernetes-validations` as upstream writes them, and the model checks
//! them again (`ClusterPolicy::from_manifest`). Prefer the upstream CRD in a cluster
//! (deploy/README.md); this one is for clusters without it and for tests.

use serde_json::{Value, json};

use policy_model::cnp::validate::{MAX_ITEMS, MAX_PRIORITY, MAX_RULE_NAME};

fn port_number() -> Value {
    json!({"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535})
}

fn protocol_match() -> Value {
    json!({"type": "object", "minProperties": 1, "properties": {
        "destinationPort": {"type": "object", "minProperties": 1, "maxProperties": 1, "properties": {
            "number": port_number(),
            "range": {"type": "object", "required": ["start", "end"], "properties": {"start": port_number(), "end": port_number()},
                "x-kubernetes-validations": [{"rule": "self.start < self.end", "message": "Start port must be less than End port"}]}
        }}
    }})
}

fn protocols() -> Value {
    json!({"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": {
        "type": "object", "minProperties": 1, "maxProperties": 1, "properties": {
            "tcp": protocol_match(), "udp": protocol_match(), "sctp": protocol_match(),
            "destinationNamedPort": {"type": "string"}
        }
    }})
}

/// A LabelSelector, as Kubernetes' own schemas spell it.
fn label_selector() -> Value {
    json!({"type": "object", "x-kubernetes-map-type": "atomic", "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "x-kubernetes-list-type": "atomic", "items": {"type": "object", "required": ["key", "operator"], "properties": {
            "key": {"type": "string"}, "operator": {"type": "string"},
            "values": {"type": "array", "x-kubernetes-list-type": "atomic", "items": {"type": "string"}}
        }}}
    }})
}

fn namespaced_pod() -> Value {
    json!({"type": "object", "required": ["podSelector"], "properties": {
        "namespaceSelector": label_selector(), "podSelector": label_selector()
    }})
}

fn peers(extra: Value) -> Value {
    let mut props = json!({"namespaces": label_selector(), "pods": namespaced_pod()});
    if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    json!({"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": {
        "type": "object", "minProperties": 1, "maxProperties": 1, "properties": props
    }})
}

fn rule(peer_field: &str, peers: Value, egress: bool) -> Value {
    let mut r = json!({"type": "object", "required": ["action", peer_field], "properties": {
        "name": {"type": "string", "maxLength": MAX_RULE_NAME},
        "action": {"type": "string", "enum": ["Accept", "Deny", "Pass"]},
        peer_field: peers,
        "protocols": protocols()
    }});
    if egress {
        r["x-kubernetes-validations"] = json!([
            {"rule": "!(self.to.exists(peer, has(peer.domainNames)) && self.action != 'Accept')", "message": "domainNames peer can only be used with Accept action"},
            {"rule": "!(self.to.exists(peer, has(peer.networks) || has(peer.nodes) || has(peer.domainNames)) && has(self.protocols) && self.protocols.exists(p, has(p.destinationNamedPort)))",
             "message": "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames"}
        ]);
    }
    r
}

/// The `openAPIV3Schema` of the v1alpha2 version.
pub fn schema() -> Value {
    let egress_peers = peers(json!({
        "nodes": label_selector(),
        "networks": {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "x-kubernetes-list-type": "set",
            "items": {"type": "string", "maxLength": 43, "x-kubernetes-validations": [{"rule": "isCIDR(self)", "message": "Invalid CIDR format provided"}]}},
        "domainNames": {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "x-kubernetes-list-type": "set",
            "items": {"type": "string", "pattern": "^(\\*\\.)?([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?\\.)+[a-zA-Z]{2,}$"}}
    }));
    json!({
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["tier", "priority", "subject"], "properties": {
                "tier": {"type": "string", "enum": ["Admin", "Baseline"]},
                "priority": {"type": "integer", "format": "int32", "minimum": 0, "maximum": MAX_PRIORITY},
                "subject": {"type": "object", "minProperties": 1, "maxProperties": 1, "properties": {
                    "namespaces": label_selector(), "pods": namespaced_pod()
                }},
                "ingress": {"type": "array", "maxItems": MAX_ITEMS, "items": rule("from", peers(json!({})), false)},
                "egress": {"type": "array", "maxItems": MAX_ITEMS, "items": rule("to", egress_peers, true)}
            }},
            "status": {"type": "object", "properties": {
                "conditions": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }}
        }
    })
}

/// The whole CustomResourceDefinition.
pub fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "clusternetworkpolicies.policy.networking.k8s.io",
            // The group is a *.k8s.io one: the API server refuses its CRDs without this.
            "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/network-policy-api/pull/347"}
        },
        "spec": {
            "group": "policy.networking.k8s.io",
            "scope": "Cluster",
            "names": {"kind": "ClusterNetworkPolicy", "listKind": "ClusterNetworkPolicyList", "plural": "clusternetworkpolicies",
                "singular": "clusternetworkpolicy", "shortNames": ["cnp"]},
            "versions": [{
                "name": "v1alpha2", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"},
                    {"name": "Priority", "type": "string", "jsonPath": ".spec.priority"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ],
                "schema": {"openAPIV3Schema": schema()}
            }]
        }
    })
}

/// Why `value` does not fit `schema` (the structural subset this schema uses: types,
/// closed `properties`, `additionalProperties`, `required`, `enum`, bounds, sizes,
/// min/maxProperties), with the field path; `None` if it fits. CEL rules are left to the
/// model's validation.
pub fn check(schema: &Value, value: &Value, path: &str) -> Option<String> {
    let fail = |m: String| Some(format!("{path}: {m}"));
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    match (ty, value) {
        ("object", Value::Object(o)) => {
            let n = o.len() as u64;
            if schema.get("minProperties").and_then(Value::as_u64).is_some_and(|m| n < m) {
                return fail("too few fields (exactly one must be set)".into());
            }
            if schema.get("maxProperties").and_then(Value::as_u64).is_some_and(|m| n > m) {
                return fail("too many fields (exactly one must be set)".into());
            }
            for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(r) = r.as_str()
                    && !o.contains_key(r)
                {
                    return fail(format!("{r}: Required value"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            for (k, v) in o {
                let sub = match (props.and_then(|p| p.get(k)), extra) {
                    (Some(s), _) | (None, Some(s)) => s,
                    // A free-form object (metadata) or one that keeps unknown fields.
                    (None, None) if props.is_none() => continue,
                    (None, None) => return fail(format!("{k}: field not declared in the schema")),
                };
                if let Some(e) = check(sub, v, &format!("{path}.{k}")) {
                    return Some(e);
                }
            }
            None
        }
        ("array", Value::Array(a)) => {
            let n = a.len() as u64;
            if schema.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m) {
                return fail(format!("must have at least {} items", schema["minItems"]));
            }
            if schema.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m) {
                return fail(format!("must have at most {} items", schema["maxItems"]));
            }
            a.iter().enumerate().find_map(|(i, v)| schema.get("items").and_then(|s| check(s, v, &format!("{path}[{i}]"))))
        }
        ("string", Value::String(s)) => {
            if let Some(e) = schema.get("enum").and_then(Value::as_array)
                && !e.iter().any(|x| x.as_str() == Some(s))
            {
                return fail(format!("Unsupported value: {s:?}"));
            }
            if schema.get("maxLength").and_then(Value::as_u64).is_some_and(|m| s.chars().count() as u64 > m) {
                return fail("Too long".into());
            }
            None
        }
        ("integer", Value::Number(x)) => {
            let Some(x) = x.as_i64() else { return fail("not an integer".into()) };
            if schema.get("minimum").and_then(Value::as_i64).is_some_and(|m| x < m) || schema.get("maximum").and_then(Value::as_i64).is_some_and(|m| x > m) {
                return fail(format!("{x} out of range"));
            }
            None
        }
        ("", _) => None,
        (t, v) => fail(format!("expected {t}, found {v}")),
    }
}

#[cfg(test)]
mod tests;
