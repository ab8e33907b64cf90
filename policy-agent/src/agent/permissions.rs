//! What the agent reads and writes in the Kubernetes API: the one list the RBAC rules in
//! `deploy/clusterrole.yaml` are derived from (a test keeps them equal).

/// (API group, resource, verbs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("", "namespaces", &["get", "list", "watch"]),
    ("", "pods", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    ("networking.k8s.io", "networkpolicies", &["get", "list", "watch"]),
    // ClusterNetworkPolicy (network-policy-api v1alpha2); the CRD may be missing, which the
    // agent tolerates (NetworkPolicies are enforced alone until it appears).
    ("policy.networking.k8s.io", "clusternetworkpolicies", &["get", "list", "watch"]),
    // Which addresses are Service VIPs, and whether pods stand behind them.
    ("", "services", &["get", "list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["get", "list", "watch"]),
    // Kubernetes Events on objects the agent refuses.
    ("events.k8s.io", "events", &["create", "patch"]),
];
