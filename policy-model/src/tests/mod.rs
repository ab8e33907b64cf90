//! Tests of the model: builders shared by the unit and property tests.

mod audit;
mod incremental;
pub(crate) mod props;
mod semantics;
mod validation;

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::{ClusterState, Flow, IpProtocol, NamedPort, Namespace, Node, ObjectKey, Pod, Policy, Protocol, compile_pod, verdict};

pub fn labels(kv: &[(&str, &str)]) -> crate::Labels {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn mk_ns(name: &str, kv: &[(&str, &str)]) -> Namespace {
    Namespace::new(name, labels(kv))
}

/// A pod on node `n1` with the given labels and addresses, serving TCP/UDP/SCTP on 80 and
/// 81 under the upstream names `serve-<port>-<proto>`.
pub fn mk_pod(ns: &str, name: &str, kv: &[(&str, &str)], ips: &[&str]) -> Pod {
    let mut named_ports = Vec::new();
    for port in [80u16, 81] {
        for proto in Protocol::ALL {
            named_ports.push(NamedPort { name: format!("serve-{port}-{}", proto.as_str().to_lowercase()), port, protocol: proto });
        }
    }
    Pod {
        key: ObjectKey::new(ns, name),
        labels: labels(kv),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        node: Some("n1".into()),
        host_network: false,
        named_ports,
    }
}

/// A NetworkPolicy from its spec written as JSON (the API's own shape).
pub fn mk_policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("test policy must deserialize")
}

pub fn valid(np: &NetworkPolicy) -> Policy {
    Policy::from_k8s(np).unwrap_or_else(|e| panic!("{e}"))
}

/// A small cluster under construction.
#[derive(Default)]
pub struct World {
    pub state: ClusterState,
}

impl World {
    /// Namespaces x, y, z (name label only) and node n1 at 10.250.0.1 / fd10:250::1.
    pub fn xyz() -> World {
        let mut w = World::default();
        for ns in ["x", "y", "z"] {
            w.state.upsert_namespace(mk_ns(ns, &[]));
        }
        w.state.upsert_node(Node { name: "n1".into(), addresses: vec!["10.250.0.1".parse().unwrap(), "fd10:250::1".parse().unwrap()] });
        w
    }

    pub fn pod(&mut self, pod: Pod) -> &mut World {
        self.state.upsert_pod(pod);
        self
    }

    pub fn policy(&mut self, ns: &str, name: &str, spec: serde_json::Value) -> &mut World {
        self.state.upsert_policy(valid(&mk_policy(ns, name, spec)));
        self
    }

    pub fn ip(&self, pod: &str) -> IpAddr {
        self.state.pod(&ObjectKey::parse(pod).unwrap()).unwrap().ips[0]
    }

    /// The verdict on `from → to` (pod keys or addresses), checked two ways: the
    /// reference evaluator and the compiled tables must agree.
    pub fn allowed(&self, from: &str, to: &str, proto: IpProtocol, port: u16) -> bool {
        let addr = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|_| self.ip(s));
        let flow = Flow { src: addr(from), dst: addr(to), protocol: proto, port };
        let reference = verdict(&self.state, &flow).allowed;
        let compiled = compiled_verdict(&self.state, &flow);
        assert_eq!(reference, compiled, "reference and compiled tables disagree on {from} -> {to} {proto}/{port}");
        reference
    }

    pub fn tcp(&self, from: &str, to: &str, port: u16) -> bool {
        self.allowed(from, to, IpProtocol::TCP, port)
    }
}

/// What the datapath would decide from the compiled tables alone: the source endpoint's
/// egress table (if the source is a pod) and the destination's ingress table.
pub fn compiled_verdict(state: &ClusterState, flow: &Flow) -> bool {
    compiled_verdict_from(state, flow, true)
}

/// [`compiled_verdict`]; `node_stack` false: a forwarded flow (`crate::verdict_forwarded`).
pub fn compiled_verdict_from(state: &ClusterState, flow: &Flow, node_stack: bool) -> bool {
    let tables_of = |addr: IpAddr| state.pod_at(addr).map(|pod| compile_pod(state, pod));
    let egress_ok = tables_of(flow.src).is_none_or(|t| t.egress.allows(flow.dst, flow.protocol, flow.port));
    let ingress_ok = tables_of(flow.dst).is_none_or(|t| t.ingress.allows_from(flow.src, flow.protocol, flow.port, node_stack));
    egress_ok && ingress_ok
}
