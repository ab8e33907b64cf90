//! Reading a directory of Kubernetes YAML: Namespaces, Pods, Nodes, NetworkPolicies,
//! ClusterNetworkPolicies (policy.networking.k8s.io), Services and EndpointSlices.
//!
//! Every document is read on its own: a malformed one is reported (file, document number
//! and, where it can be read, the object) and skipped; the others still load.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use policy_model::cnp::{ClusterNetworkPolicy, ClusterPolicy};
use policy_model::{Change, ClusterState, InvalidObject, Namespace, Node, Pod, Policy};
use serde::Deserialize;

/// One object that could not be used, named as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestError {
    /// `file.yaml#3` (third document), or the file alone.
    pub source: String,
    /// `Pod x/a`, when the document got that far.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {o}: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl ManifestError {
    fn invalid(source: &str, e: &InvalidObject) -> ManifestError {
        let detail: Vec<String> = e.errors.iter().map(|f| f.to_string()).collect();
        ManifestError {
            source: source.to_string(),
            object: Some(format!("{} {}", e.kind, e.key)),
            message: format!("invalid: {}", detail.join("; ")),
        }
    }
}

/// The objects of a manifest directory, as read (not yet validated).
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    pub namespaces: Vec<(String, core::Namespace)>,
    pub pods: Vec<(String, core::Pod)>,
    pub nodes: Vec<(String, core::Node)>,
    pub policies: Vec<(String, NetworkPolicy)>,
    pub cluster_policies: Vec<(String, ClusterNetworkPolicy)>,
    pub services: Vec<(String, core::Service)>,
    pub endpoint_slices: Vec<(String, k8s_openapi::api::discovery::v1::EndpointSlice)>,
    /// Documents that could not be read at all.
    pub errors: Vec<ManifestError>,
}

/// Kinds we read; everything else (Deployments, ...) is skipped silently.
const KINDS: [&str; 7] = ["Namespace", "Pod", "Node", "NetworkPolicy", "ClusterNetworkPolicy", "Service", "EndpointSlice"];

/// The API groups whose `ClusterNetworkPolicy` we read: v1alpha2 (network-policy-api
/// v0.2.0) and v1beta1, which has the same schema. A kind of that name in another group
/// is no object of ours and is skipped like any unknown kind.
pub const CLUSTER_POLICY_API_VERSIONS: [&str; 2] = ["policy.networking.k8s.io/v1alpha2", "policy.networking.k8s.io/v1beta1"];

impl Manifests {
    /// Reads several directories into one set, in the order given.
    pub fn read_dirs(dirs: &[PathBuf]) -> Result<Manifests, (PathBuf, std::io::Error)> {
        let mut all = Manifests::default();
        for dir in dirs {
            let m = Manifests::read_dir(dir).map_err(|e| (dir.clone(), e))?;
            all.namespaces.extend(m.namespaces);
            all.pods.extend(m.pods);
            all.nodes.extend(m.nodes);
            all.policies.extend(m.policies);
            all.cluster_policies.extend(m.cluster_policies);
            all.services.extend(m.services);
            all.endpoint_slices.extend(m.endpoint_slices);
            all.errors.extend(m.errors);
        }
        Ok(all)
    }

    /// Reads every `*.yaml`, `*.yml` and `*.json` file under `dir` (recursively, in path
    /// order, so the result is deterministic).
    pub fn read_dir(dir: &Path) -> std::io::Result<Manifests> {
        let mut files = Vec::new();
        collect_files(dir, &mut files)?;
        files.sort();
        let mut m = Manifests::default();
        for file in files {
            let name = file.display().to_string();
            if std::fs::metadata(&file).is_ok_and(|md| !md.is_file()) {
                // A FIFO or a device would block the read, or never end.
                m.errors.push(ManifestError { source: name, object: None, message: "not a regular file: skipped".into() });
                continue;
            }
            match std::fs::read_to_string(&file) {
                Ok(text) => m.add_yaml(&name, &text),
                Err(e) => m.errors.push(ManifestError { source: name, object: None, message: format!("cannot read: {e}") }),
            }
        }
        Ok(m)
    }

    /// Adds every document of one (multi-document) YAML text.
    pub fn add_yaml(&mut self, source: &str, text: &str) {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let src = format!("{source}#{}", i + 1);
            match serde_yaml_ng::Value::deserialize(doc) {
                Ok(serde_yaml_ng::Value::Null) => {}
                Ok(value) => self.add_value(&src, value),
                Err(e) => {
                    self.errors.push(ManifestError { source: src, object: None, message: format!("not YAML: {e}") });
                    // The parser cannot resynchronise after a syntax error.
                    break;
                }
            }
        }
    }

    /// Adds one object (or the items of a `List`).
    pub fn add_value(&mut self, src: &str, value: serde_yaml_ng::Value) {
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        if kind == "List" || kind.ends_with("List") {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for (j, item) in items.iter().enumerate() {
                    self.add_value(&format!("{src}.items[{j}]"), item.clone());
                }
            }
            return;
        }
        if !KINDS.contains(&kind.as_str()) {
            if kind.is_empty() {
                self.errors.push(ManifestError {
                    source: src.to_string(),
                    object: None,
                    message: "no `kind`: not a Kubernetes object".into(),
                });
            }
            return;
        }
        if kind == "ClusterNetworkPolicy" {
            let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
            if !CLUSTER_POLICY_API_VERSIONS.contains(&api_version) {
                return;
            }
        }
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>");
        let object = match meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()) {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        };
        let err = |e: serde_yaml_ng::Error| ManifestError {
            source: src.to_string(),
            object: Some(object.clone()),
            message: format!("malformed: {e}"),
        };
        let src = src.to_string();
        match kind.as_str() {
            "Namespace" => match serde_yaml_ng::from_value(value) {
                Ok(o) => self.namespaces.push((src, o)),
                Err(e) => self.errors.push(err(e)),
            },
            "Pod" => match serde_yaml_ng::from_value(value) {
                Ok(o) => self.pods.push((src, o)),
                Err(e) => self.errors.push(err(e)),
            },
            "Node" => match serde_yaml_ng::from_value(value) {
                Ok(o) => self.nodes.push((src, o)),
                Err(e) => self.errors.push(err(e)),
            },
            "Service" => match serde_yaml_ng::from_value(value) {
                Ok(o) => self.services.push((src, o)),
                Err(e) => self.errors.push(err(e)),
            },
            "EndpointSlice" => match serde_yaml_ng::from_value(value) {
                Ok(o) => self.endpoint_slices.push((src, o)),
                Err(e) => self.errors.push(err(e)),
            },
            "ClusterNetworkPolicy" => match serde_yaml_ng::from_value(value) {
                Ok(o) => self.cluster_policies.push((src, o)),
                Err(e) => self.errors.push(err(e)),
            },
            _ => match serde_yaml_ng::from_value::<NetworkPolicy>(value) {
                Ok(mut o) => {
                    // As `kubectl apply` does for a manifest without a namespace.
                    o.metadata.namespace.get_or_insert_with(|| "default".to_string());
                    self.policies.push((src, o))
                }
                Err(e) => self.errors.push(err(e)),
            },
        }
    }

    /// The model's changes for every object that converts, plus an error for each object
    /// that does not (a pod with a bad address, a policy the API server would refuse).
    pub fn changes(&self) -> (Vec<Change>, Vec<ManifestError>) {
        let mut changes = Vec::new();
        let mut errors = self.errors.clone();
        for (src, ns) in &self.namespaces {
            match Namespace::from_k8s(ns) {
                Ok(n) => changes.push(Change::UpsertNamespace(n)),
                Err(e) => errors.push(ManifestError::invalid(src, &e)),
            }
        }
        for (src, node) in &self.nodes {
            match Node::from_k8s(node) {
                Ok(n) => {
                    // Labels travel apart from the Node (ClusterNetworkPolicy `nodes` peers).
                    let labels = policy_model::cnp::node_labels_from_k8s(node);
                    changes.push(Change::UpsertNodeLabels { node: n.name.clone(), labels });
                    changes.push(Change::UpsertNode(n));
                }
                Err(e) => errors.push(ManifestError::invalid(src, &e)),
            }
        }
        for (src, pod) in &self.pods {
            match Pod::from_k8s(pod) {
                Ok(p) => changes.push(Change::UpsertPod(p)),
                Err(e) => errors.push(ManifestError::invalid(src, &e)),
            }
        }
        for (src, np) in &self.policies {
            // Validate here too, so the error names the file.
            match Policy::from_k8s(np) {
                Ok(_) => changes.push(Change::UpsertPolicy(Box::new(np.clone()))),
                Err(e) => errors.push(ManifestError::invalid(src, &e)),
            }
        }
        for (src, cnp) in &self.cluster_policies {
            match ClusterPolicy::from_manifest(cnp) {
                Ok(_) => changes.push(Change::UpsertClusterPolicy(Box::new(cnp.clone()))),
                Err(e) => errors.push(ManifestError::invalid(src, &e)),
            }
        }
        (changes, errors)
    }

    /// What is used, but maybe not as meant: an object defined again (the last definition
    /// is used, as an API server keeps the last write); what the valid
    /// ClusterNetworkPolicies cannot honour as written: a peer that sets no field this
    /// version knows (a newer API's, or a misspelt one) fails closed, and a `domainNames`
    /// peer matches nothing (see `ClusterPolicy::warnings`).
    pub fn warnings(&self) -> Vec<ManifestError> {
        let mut out = Vec::new();
        redefined(&mut out, "Namespace", self.namespaces.iter().map(|(s, o)| (s, &o.metadata)));
        redefined(&mut out, "Pod", self.pods.iter().map(|(s, o)| (s, &o.metadata)));
        redefined(&mut out, "Node", self.nodes.iter().map(|(s, o)| (s, &o.metadata)));
        redefined(&mut out, "NetworkPolicy", self.policies.iter().map(|(s, o)| (s, &o.metadata)));
        redefined(&mut out, "ClusterNetworkPolicy", self.cluster_policies.iter().map(|(s, o)| (s, &o.metadata)));
        redefined(&mut out, "Service", self.services.iter().map(|(s, o)| (s, &o.metadata)));
        redefined(&mut out, "EndpointSlice", self.endpoint_slices.iter().map(|(s, o)| (s, &o.metadata)));
        for (src, cnp) in &self.cluster_policies {
            if let Ok(p) = ClusterPolicy::from_manifest(cnp) {
                out.extend(p.warnings.iter().map(|w| ManifestError {
                    source: src.clone(),
                    object: Some(format!("ClusterNetworkPolicy {}", p.name)),
                    message: w.to_string(),
                }));
            }
        }
        out
    }

    /// The cluster state these manifests describe, and what could not be used.
    pub fn state(&self) -> (ClusterState, Vec<ManifestError>) {
        let (changes, errors) = self.changes();
        let mut state = ClusterState::new();
        for change in changes {
            match change {
                Change::UpsertNamespace(n) => {
                    state.upsert_namespace(n);
                }
                Change::UpsertNode(n) => {
                    state.upsert_node(n);
                }
                Change::UpsertPod(p) => {
                    state.upsert_pod(p);
                }
                Change::UpsertPolicy(np) => {
                    if let Ok(p) = Policy::from_k8s(&np) {
                        state.upsert_policy(p);
                    }
                }
                Change::UpsertClusterPolicy(cnp) => {
                    if let Ok(p) = ClusterPolicy::from_manifest(&cnp) {
                        state.upsert_cluster_policy(p);
                    }
                }
                Change::UpsertNodeLabels { node, labels } => {
                    state.set_node_labels(&node, labels);
                }
                _ => {}
            }
        }
        (state, errors)
    }
}

/// A warning for each object of `kind` defined again, naming where it was first.
fn redefined<'a>(out: &mut Vec<ManifestError>, kind: &str, objects: impl Iterator<Item = (&'a String, &'a ObjectMeta)>) {
    let mut first: std::collections::HashMap<(String, String), &String> = std::collections::HashMap::new();
    for (src, meta) in objects {
        let key = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
        if key.1.is_empty() {
            continue; // refused as invalid, by name
        }
        match first.get(&key) {
            Some(was) => out.push(ManifestError {
                source: src.clone(),
                object: Some(format!("{kind} {}", if key.0.is_empty() { key.1.clone() } else { format!("{}/{}", key.0, key.1) })),
                message: format!("defined again (first in {was}): this definition is used"),
            }),
            None => {
                first.insert(key, src);
            }
        }
    }
}

/// A warning for each address that two pods claim: the first holder owns it (as the
/// model resolves it), the other pod is not reachable at it.
pub fn contested_addresses(state: &ClusterState) -> Vec<String> {
    let mut out = Vec::new();
    for pod in state.pods().filter(|p| !p.host_network) {
        for ip in &pod.ips {
            if let Some(owner) = state.pod_at(*ip).filter(|o| o.key != pod.key) {
                out.push(format!(
                    "Pod {}: address {ip} is also pod {}'s, which holds it: {} is not reachable at it",
                    pod.key, owner.key, pod.key
                ));
            }
        }
    }
    out
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
    Ok(())
}
