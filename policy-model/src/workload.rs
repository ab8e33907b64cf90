//! A synthetic cluster for benchmarks: namespaces of pods with app/tier/version labels and
//! 20 policies of realistic shapes per namespace (isolation, same-namespace allow,
//! app-to-app on named ports, cross-namespace by team, monitoring on a named port, egress
//! with ipBlock excepts and DNS, NodePort-style endPort ranges). Pod 0 of every namespace
//! runs on [`Workload::node`]; the others spread over 50 other nodes.
//!
//! The compiler bench (`benches/compile.rs`) and the agent bench (`conformance`'s
//! `bench_agent`) use the same cluster, so their figures compare.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use crate::incremental::Change;
use crate::objects::{NamedPort, Namespace, ObjectKey, Pod};
use crate::ports::Protocol;

const TIERS: [&str; 3] = ["web", "api", "db"];

/// The shape of the synthetic cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespaces: usize,
    pub pods_per_namespace: usize,
    /// The node whose pods are local (one per namespace).
    pub node: String,
}

impl Default for Workload {
    /// 100 namespaces × 100 pods (10,000), 2,000 policies, 100 pods on `node-0`.
    fn default() -> Workload {
        Workload { namespaces: 100, pods_per_namespace: 100, node: "node-0".to_string() }
    }
}

/// Policies per namespace.
pub const POLICIES_PER_NAMESPACE: usize = 20;

impl Workload {
    pub fn pod_count(&self) -> usize {
        self.namespaces * self.pods_per_namespace
    }

    pub fn policy_count(&self) -> usize {
        self.namespaces * POLICIES_PER_NAMESPACE
    }

    pub fn namespace_name(i: usize) -> String {
        format!("ns-{i:03}")
    }

    /// Namespace `i`, labelled with a team (10) and an env (3).
    pub fn namespace(&self, i: usize) -> Namespace {
        let labels =
            [("team".to_string(), format!("t{}", i % 10)), ("env".to_string(), ["prod", "staging", "dev"][i % 3].to_string())].into();
        Namespace::new(Workload::namespace_name(i), labels)
    }

    /// Pod `j` of namespace `ns` (app label `app_override` instead of its own, if given).
    /// Addresses: 10.(244 + n / 65536).(n / 256 % 256).(n % 256) and fd10:244::n for the
    /// n-th pod of the cluster.
    pub fn pod(&self, ns: usize, j: usize, app_override: Option<&str>) -> Pod {
        let n = ns * self.pods_per_namespace + j;
        let tier = TIERS[j % 3];
        let app = app_override.map(str::to_string).unwrap_or_else(|| format!("app-{}", j % 10));
        Pod {
            key: ObjectKey::new(Workload::namespace_name(ns), format!("pod-{j:03}")),
            labels: [("app".to_string(), app), ("tier".to_string(), tier.to_string()), ("version".to_string(), format!("v{}", j % 2))]
                .into(),
            ips: vec![
                format!("10.{}.{}.{}", 244 + n / 65536, (n / 256) % 256, n % 256).parse().expect("valid IPv4"),
                format!("fd10:244::{n:x}").parse().expect("valid IPv6"),
            ],
            node: Some(if j == 0 { self.node.clone() } else { format!("node-{}", 1 + n % 50) }),
            host_network: false,
            named_ports: vec![
                NamedPort { name: "http".into(), port: 8000 + (j % 5) as u16, protocol: Protocol::Tcp },
                NamedPort { name: "metrics".into(), port: if tier == "db" { 9187 } else { 9090 }, protocol: Protocol::Tcp },
            ],
        }
    }

    /// The 20 policies of namespace `i`; `http_port` is the port of policy `app-0`'s rule
    /// (`"http"` normally; a number to change it).
    pub fn policies(&self, i: usize, http_port: serde_json::Value) -> Vec<NetworkPolicy> {
        let ns = Workload::namespace_name(i);
        let mut v = vec![
            np(&ns, "default-deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
            np(
                &ns,
                "allow-same-namespace",
                json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}),
            ),
            np(
                &ns,
                "allow-monitoring",
                json!({"podSelector": {}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}}}], "ports": [{"port": "metrics"}]}]}),
            ),
        ];
        for k in 0..10 {
            let port = if k == 0 { http_port.clone() } else { json!("http") };
            v.push(np(&ns, &format!("app-{k}"), json!({"podSelector": {"matchLabels": {"app": format!("app-{k}")}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (k + 1) % 10)}}}], "ports": [{"port": port}]}]})));
        }
        for k in 0..3 {
            v.push(np(&ns, &format!("cross-team-{k}"), json!({"podSelector": {"matchLabels": {"tier": "api"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (i + k) % 10)}}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                             "ports": [{"protocol": "TCP", "port": 8080}]}]})));
        }
        v.push(np(&ns, "web-egress", json!({"podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}, {"ipBlock": {"cidr": "::/0", "except": ["fc00::/7"]}}], "ports": [{"protocol": "TCP", "port": 443}]},
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-001"}}, "podSelector": {"matchLabels": {"app": "app-0"}}}], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            {"to": [{"podSelector": {}}]}]})));
        v.push(np(&ns, "api-egress", json!({"podSelector": {"matchLabels": {"tier": "api"}}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": 5432}]}]})));
        v.push(np(&ns, "nodeports", json!({"podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.13.0/24"]}}], "ports": [{"port": 30000, "endPort": 32767}]}]})));
        v.push(np(&ns, "db-from-api", json!({"podSelector": {"matchLabels": {"tier": "db"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "api"}}}], "ports": [{"port": 5432, "endPort": 5433}]}]})));
        debug_assert_eq!(v.len(), POLICIES_PER_NAMESPACE);
        v
    }

    /// The whole cluster as changes: namespaces, then pods, then policies.
    pub fn changes(&self) -> Vec<Change> {
        let mut changes = Vec::new();
        for i in 0..self.namespaces {
            changes.push(Change::UpsertNamespace(self.namespace(i)));
        }
        for i in 0..self.namespaces {
            for j in 0..self.pods_per_namespace {
                changes.push(Change::UpsertPod(self.pod(i, j, None)));
            }
        }
        for i in 0..self.namespaces {
            changes.extend(self.policies(i, json!("http")).into_iter().map(|p| Change::UpsertPolicy(Box::new(p))));
        }
        changes
    }
}

/// ClusterNetworkPolicies in the bench cluster ([`Workload::cluster_policies`]).
pub const CLUSTER_POLICIES: usize = 100;

impl Workload {
    /// 100 ClusterNetworkPolicies of the shapes a cluster admin writes, half in each tier,
    /// with distinct priorities; `variant` changes policy 0's port (for a change bench):
    /// - Admin: deny the metadata address and a blocked range to every pod (`networks`);
    ///   let monitoring (ns-000) scrape every namespace of a team (namespace subject,
    ///   pod peers, named port); pass a team's api pods' traffic to the namespace owners
    ///   (pod subject, Pass);
    /// - Baseline: default-deny ingress from other teams (namespace subject), allow DNS
    ///   egress to ns-001 (range of ports), deny egress to the private ranges.
    pub fn cluster_policies(&self, variant: u16) -> Vec<crate::cnp::ClusterNetworkPolicy> {
        (0..CLUSTER_POLICIES).map(|k| self.cluster_policy(k, variant)).collect()
    }

    fn cluster_policy(&self, k: usize, variant: u16) -> crate::cnp::ClusterNetworkPolicy {
        let team = format!("t{}", k % 10);
        let team_ns = json!({"matchLabels": {"team": team}});
        let (tier, spec) = match k % 6 {
            0 => ("Admin", json!({"subject": {"namespaces": {}}, "egress": [
                {"name": "no-metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32", "fd00:ec2::254/128"]}]},
                {"name": "no-blocked", "action": "Deny", "to": [{"networks": [format!("203.0.{}.0/24", k % 256)]}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 443 + if k == 0 { variant } else { 0 }}}}]}]})),
            1 => ("Admin", json!({"subject": {"namespaces": team_ns}, "ingress": [
                {"name": "monitoring", "action": "Accept", "from": [{"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}}, "podSelector": {"matchLabels": {"tier": "web"}}}}],
                 "protocols": [{"destinationNamedPort": "metrics"}]}]})),
            2 => ("Admin", json!({"subject": {"pods": {"namespaceSelector": team_ns, "podSelector": {"matchLabels": {"tier": "api"}}}}, "ingress": [
                {"name": "to-owners", "action": "Pass", "from": [{"namespaces": {"matchLabels": {"team": team}}}]},
                {"name": "no-dev", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}]})),
            3 => ("Baseline", json!({"subject": {"namespaces": team_ns}, "ingress": [
                {"name": "same-team", "action": "Accept", "from": [{"namespaces": {"matchLabels": {"team": team}}}]},
                {"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}]})),
            4 => ("Baseline", json!({"subject": {"namespaces": team_ns}, "egress": [
                {"name": "dns", "action": "Accept", "to": [{"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-001"}}, "podSelector": {}}}],
                 "protocols": [{"udp": {"destinationPort": {"range": {"start": 53, "end": 54}}}}, {"tcp": {"destinationPort": {"number": 53}}}]}]})),
            _ => ("Baseline", json!({"subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "db"}}}}, "egress": [
                {"name": "no-private", "action": "Deny", "to": [{"networks": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]}]}]})),
        };
        let mut spec = spec;
        spec["tier"] = json!(tier);
        // `variant` also moves policy 3 (a Baseline team policy, 10 namespaces) within its
        // slot: a change that recompiles a tenth of the node.
        spec["priority"] = json!(k * 10 + if k == 3 { usize::from(variant) } else { 0 });
        serde_json::from_value(json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": format!("cnp-{k:03}")}, "spec": spec}))
        .expect("a well-formed ClusterNetworkPolicy")
    }
}

fn np(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .expect("a well-formed NetworkPolicy")
}
