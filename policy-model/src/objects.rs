//! The cluster objects the model reads: namespaces, pods and nodes, reduced to what
//! policy evaluation uses (this also keeps the agent's memory small).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use serde::Serialize;

use crate::error::{FieldError, InvalidObject};
use crate::labels::Labels;
use crate::ports::Protocol;

/// The label the control plane sets on every namespace (reference §5 item 17).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `namespace/name` of a namespaced object. The strings are shared: a key is cloned into
/// every table entry it is the provenance of (tens of thousands on a busy node), and a
/// clone is a reference count, not two allocations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> ObjectKey {
        // Namespaces repeat across thousands of keys, and a pod's name across the versions
        // of the pod that updates bring: one shared copy each, so that keys of one object
        // compare by pointer (interned provenance lists are looked up by them).
        ObjectKey { namespace: crate::intern::intern(namespace.as_ref()), name: crate::intern::intern(name.as_ref()) }
    }

    /// Parses `namespace/name`.
    pub fn parse(s: &str) -> Option<ObjectKey> {
        let (ns, name) = s.split_once('/')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| ObjectKey::new(ns, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Cluster-scoped objects (ClusterNetworkPolicy) have no namespace: just the name.
        if self.namespace.is_empty() {
            return f.write_str(&self.name);
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    /// Its `policy-agent.io/enforcement` annotation: `audit` audits every NetworkPolicy of
    /// the namespace ([`crate::audit`]).
    pub enforcement: crate::audit::Enforcement,
}

impl Namespace {
    /// A namespace with the given labels plus the immutable `kubernetes.io/metadata.name`,
    /// which the API server always sets (so a harness without one must too).
    pub fn new(name: impl Into<String>, mut labels: Labels) -> Namespace {
        let name = name.into();
        labels.insert(NAMESPACE_NAME_LABEL, name.clone());
        Namespace { name, labels, enforcement: crate::audit::Enforcement::Enforce }
    }

    pub fn from_k8s(ns: &core::Namespace) -> Result<Namespace, InvalidObject> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(InvalidObject {
                kind: "Namespace",
                key: ObjectKey::new("", "<unnamed>"),
                errors: vec![FieldError::new("metadata.name", "Required value")],
            });
        }
        let mut out = Namespace::new(name, ns.metadata.labels.as_ref().map(Labels::from).unwrap_or_default());
        out.enforcement = crate::audit::Enforcement::from_annotations(ns.metadata.annotations.as_ref());
        Ok(out)
    }
}

/// A named container port (`spec.containers[*].ports[*]` with a name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub key: ObjectKey,
    pub labels: Labels,
    /// `status.podIPs`; empty until the pod has an address, and after it terminated.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// hostNetwork pods are neither targets nor peers: their traffic is node traffic.
    pub host_network: bool,
    pub named_ports: Vec<NamedPort>,
}

impl Pod {
    /// The number a named port resolves to on this pod, for one protocol.
    pub fn resolve_named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports.iter().find(|p| p.name == name && p.protocol == protocol).map(|p| p.port)
    }

    pub fn from_k8s(pod: &core::Pod) -> Result<Pod, InvalidObject> {
        let key = ObjectKey::new(
            pod.metadata.namespace.clone().unwrap_or_else(|| "default".to_string()),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let mut errors = Vec::new();
        if key.name.is_empty() {
            errors.push(FieldError::new("metadata.name", "Required value"));
        }
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        // A pod that has terminated has released its address, which may already belong to
        // another pod: it must not be matched by address any more.
        let terminated = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let mut ips: Vec<IpAddr> = Vec::new();
        if !terminated {
            let listed = status.and_then(|s| s.pod_ips.as_ref());
            let strings: Vec<&str> = match listed {
                Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
                _ => status.and_then(|s| s.pod_ip.as_deref()).into_iter().collect(),
            };
            for (i, s) in strings.iter().enumerate() {
                match s.parse::<IpAddr>() {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(_) => {
                        errors.push(FieldError::new(format!("status.podIPs[{i}].ip"), format!("Invalid value: {s:?}: not an IP address")))
                    }
                }
            }
        }
        let mut named_ports = Vec::new();
        for (ci, c) in spec.map(|s| s.containers.as_slice()).unwrap_or_default().iter().enumerate() {
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let Some(name) = &p.name else { continue };
                let field = format!("spec.containers[{ci}].ports[{pi}]");
                let protocol = match p.protocol.as_deref().unwrap_or("TCP").parse::<Protocol>() {
                    Ok(proto) => proto,
                    Err(e) => {
                        errors.push(FieldError::new(format!("{field}.protocol"), e));
                        continue;
                    }
                };
                match u16::try_from(p.container_port) {
                    Ok(port) if port > 0 => named_ports.push(NamedPort { name: name.clone(), port, protocol }),
                    _ => errors.push(FieldError::new(
                        format!("{field}.containerPort"),
                        format!("Invalid value: {}: must be between 1 and 65535", p.container_port),
                    )),
                }
            }
        }
        named_ports.sort();
        // Kept for the pod's life: no spare capacity (a first push reserves four).
        named_ports.shrink_to_fit();
        ips.shrink_to_fit();
        if !errors.is_empty() {
            return Err(InvalidObject { kind: "Pod", key, errors });
        }
        Ok(Pod {
            key,
            labels: pod.metadata.labels.as_ref().map(Labels::from).unwrap_or_default(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            named_ports,
        })
    }
}

/// A node and the addresses its own traffic comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

impl Node {
    /// InternalIP and ExternalIP addresses from `status.addresses`.
    pub fn from_k8s(node: &core::Node) -> Result<Node, InvalidObject> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut addresses = Vec::new();
        for a in node.status.as_ref().and_then(|s| s.addresses.as_ref()).into_iter().flatten() {
            if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
            }
        }
        if name.is_empty() {
            return Err(InvalidObject {
                kind: "Node",
                key: ObjectKey::new("", "<unnamed>"),
                errors: vec![FieldError::new("metadata.name", "Required value")],
            });
        }
        Ok(Node { name, addresses })
    }
}
