//! The emulated cluster's objects: namespaces x, y, z and pods that serve TCP, UDP and
//! SCTP on 80 and 81, as the upstream e2e model builds them, written as the Kubernetes
//! manifests the agent reads.

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_model::{Family, Prefix};
use serde_json::{Value, json};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const SERVED_PORTS: [u16; 2] = [80, 81];
pub const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// Which address families the cluster's pods have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    Ipv4,
    Ipv6,
    Dual,
}

impl Families {
    pub fn has(self, f: Family) -> bool {
        matches!((self, f), (Families::Dual, _) | (Families::Ipv4, Family::Ipv4) | (Families::Ipv6, Family::Ipv6))
    }

    /// The family probes use: upstream probes a Service ClusterIP, and a Service is
    /// single-stack in the cluster's primary family (IPv4 in dual-stack runs) by default.
    pub fn probe_family(self) -> Family {
        self.primary()
    }

    /// The family `${ip:..}` placeholders expand to: IPv4 in dual-stack runs.
    pub fn primary(self) -> Family {
        match self {
            Families::Ipv6 => Family::Ipv6,
            _ => Family::Ipv4,
        }
    }
}

/// A pod of the emulated cluster.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

impl PodSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| Family::of(*ip) == family)
    }

    /// The Pod manifest, with `status.podIPs` and the upstream container port names.
    pub fn manifest(&self) -> Value {
        self.manifest_in_phase("Running")
    }

    /// [`PodSpec::manifest`] with `status.phase` `phase` (Running, Succeeded, Failed).
    pub fn manifest_in_phase(&self, phase: &str) -> Value {
        self.manifest_with(phase, &[])
    }

    /// The Pod manifest in `phase` with container ports `extra` beyond the served ones. A
    /// Pending pod has no address yet.
    pub fn manifest_with(&self, phase: &str, extra: &[crate::case::ContainerPort]) -> Value {
        let ports: Vec<Value> = crate::service::container_ports(extra)
            .iter()
            .map(|c| json!({"name": c.name, "containerPort": c.port, "protocol": c.protocol.as_str()}))
            .collect();
        let ips: Vec<Value> =
            if phase == "Pending" { Vec::new() } else { self.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect() };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {"nodeName": self.node, "containers": [{"name": "agnhost", "image": "agnhost", "ports": ports}]},
            "status": {"phase": phase, "podIPs": ips},
        })
    }
}

/// The name of node `index` (0-based), as `make_pods` assigns pods to it.
pub fn node_name(index: usize) -> String {
    format!("node-{}", index + 1)
}

/// The addresses of node `index`: 10.250.0.<index+1> and fd10:250::<index+1>.
pub fn node_addresses(index: usize) -> [IpAddr; 2] {
    [format!("10.250.0.{}", index + 1).parse().unwrap(), format!("fd10:250::{:x}", index + 1).parse().unwrap()]
}

/// A Node manifest with its InternalIP addresses and the labels the kubelet sets that
/// upstream's `nodes` peers select on (`kubernetes.io/os`, `kubernetes.io/hostname`).
pub fn node_manifest(name: &str, addresses: &[IpAddr]) -> Value {
    let addresses: Vec<Value> = addresses.iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name}},
           "status": {"addresses": addresses}})
}

/// The host-network pod upstream's CNP suite runs on node `index` (centaur-1, centaur-2 in
/// namespace network-policy-conformance-forbidden-forest), holding the node's addresses.
/// The harness serves its ports in the node's own namespace (`to: nodes` probes); the
/// manifest lets the agent see the pod too, as it would in a cluster: hostNetwork pods
/// are neither subjects nor pod peers, and their addresses are their node's.
pub fn host_network_pod_manifest(index: usize, addresses: &[IpAddr]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("centaur-{}", index + 1), "namespace": HOST_NETWORK_NAMESPACE, "labels": {"app": "centaur"}},
        "spec": {"nodeName": node_name(index), "hostNetwork": true, "containers": [{"name": "agnhost", "image": "agnhost"}]},
        "status": {"phase": "Running", "podIPs": addresses.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
    })
}

/// The namespace of the host-network pods (upstream's).
pub const HOST_NETWORK_NAMESPACE: &str = "network-policy-conformance-forbidden-forest";

pub fn namespace_manifest(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// Address of the `index`-th pod (in x/a, x/b, ... order) on node `node` (0-based):
/// 10.244.<node>.<10+index> and fd10:244:0:<node>::<10+index>. All sit in 0.0.0.0/4 and
/// f000::/4, as upstream test 35 assumes.
pub fn pod_address(family: Family, node: usize, index: usize) -> IpAddr {
    match family {
        Family::Ipv4 => format!("10.244.{node}.{}", 10 + index).parse().unwrap(),
        Family::Ipv6 => format!("fd10:244:0:{node}::{:x}", 10 + index).parse().unwrap(),
    }
}

/// The pods of a case, with labels `pod=<name>`, spread over `nodes` nodes round-robin.
pub fn make_pods(names: &[String], families: Families, nodes: usize) -> Vec<PodSpec> {
    names
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let (ns, name) = key.split_once('/').expect("validated ns/pod");
            let node = i % nodes.max(1);
            let ips = [Family::Ipv4, Family::Ipv6].into_iter().filter(|f| families.has(*f)).map(|f| pod_address(f, node, i)).collect();
            PodSpec {
                namespace: ns.to_string(),
                name: name.to_string(),
                labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
                node: format!("node-{}", node + 1),
                ips,
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("placeholder {placeholder}: {message}")]
pub struct PlaceholderError {
    pub placeholder: String,
    pub message: String,
}

/// Expands `${ip:ns/pod}`, `${host:ns/pod}` and `${net:ns/pod:N}` in every string of `v`.
pub fn expand_placeholders(v: &mut Value, pods: &[PodSpec], family: Family) -> Result<(), PlaceholderError> {
    match v {
        Value::String(s) => {
            while let Some(start) = s.find("${") {
                let end = s[start..]
                    .find('}')
                    .map(|e| start + e)
                    .ok_or_else(|| PlaceholderError { placeholder: s.clone(), message: "unterminated".into() })?;
                let inner = &s[start + 2..end];
                let replacement = expand_one(inner, pods, family)
                    .map_err(|message| PlaceholderError { placeholder: format!("${{{inner}}}"), message })?;
                s.replace_range(start..=end, &replacement);
            }
            Ok(())
        }
        Value::Array(a) => a.iter_mut().try_for_each(|x| expand_placeholders(x, pods, family)),
        Value::Object(o) => o.values_mut().try_for_each(|x| expand_placeholders(x, pods, family)),
        _ => Ok(()),
    }
}

fn expand_one(inner: &str, pods: &[PodSpec], family: Family) -> Result<String, String> {
    let (kind, rest) = inner.split_once(':').ok_or("expected KIND:ns/pod")?;
    let (pod_key, len) = match kind {
        "net" => {
            let (p, n) = rest.rsplit_once(':').ok_or("expected net:ns/pod:N")?;
            (p, Some(n.parse::<u8>().map_err(|_| format!("bad prefix length {n:?}"))?))
        }
        "ip" | "host" => (rest, None),
        other => return Err(format!("unknown placeholder kind {other:?}")),
    };
    // The outside clients (`from: outside` probes) and the nodes (`node-0`, `node-1`) have
    // addresses too.
    let node = pod_key.strip_prefix("node-").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < 2);
    let ip = if let Some(ip) = crate::case::outside_address(pod_key, family) {
        ip
    } else if let Some(i) = node {
        node_addresses(i).into_iter().find(|a| Family::of(*a) == family).expect("nodes have both families")
    } else {
        let pod = pods.iter().find(|p| p.key() == pod_key).ok_or_else(|| format!("no pod {pod_key} in this case"))?;
        pod.ip(family).ok_or_else(|| format!("{pod_key} has no {family} address"))?
    };
    Ok(match (kind, len) {
        ("ip", _) => ip.to_string(),
        ("host", _) => Prefix::host(ip).to_string(),
        (_, Some(n)) => Prefix::new(ip, n).map_err(|e| e.to_string())?.to_string(),
        _ => unreachable!("kinds checked above"),
    })
}
