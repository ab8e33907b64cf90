//! `--manifests`: a directory re-read when it changes, turned into the same changes a
//! watch of the API would give.

use std::collections::BTreeMap;
use std::path::PathBuf;

use policy_model::{Change, Namespace, Node, ObjectKey, Pod};

use crate::agent::services::ServiceChange;
use crate::manifests::{ManifestError, Manifests};

/// An object as read, for change detection.
#[derive(Clone, PartialEq)]
enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    Policy(serde_json::Value),
    Service(ServiceChange),
}

/// The objects of one read, keyed by kind and name.
type Snapshot = BTreeMap<(u8, ObjectKey), Object>;

pub struct ManifestSource {
    dirs: Vec<PathBuf>,
    last: Snapshot,
    last_errors: Vec<String>,
    /// (path, modified, length) of every file at the last read: when it is unchanged the
    /// files are not parsed again.
    fingerprint: Vec<(PathBuf, std::time::SystemTime, u64)>,
}

fn fingerprint(dirs: &[PathBuf]) -> std::io::Result<Vec<(PathBuf, std::time::SystemTime, u64)>> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(PathBuf, std::time::SystemTime, u64)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), out)?;
            } else {
                out.push((entry.path(), meta.modified()?, meta.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(d, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// One poll's result.
pub struct Poll {
    pub changes: Vec<Change>,
    pub services: Vec<ServiceChange>,
    /// Set when the set of invalid objects changed (so they are logged once, not every poll).
    pub errors: Option<Vec<ManifestError>>,
}

impl ManifestSource {
    pub fn new(dirs: Vec<PathBuf>) -> ManifestSource {
        ManifestSource { dirs, last: Snapshot::new(), last_errors: Vec::new(), fingerprint: Vec::new() }
    }

    /// Reads the directories and returns what changed since the last call.
    pub fn poll(&mut self) -> Result<Poll, (PathBuf, std::io::Error)> {
        let fp = fingerprint(&self.dirs).map_err(|e| (self.dirs.first().cloned().unwrap_or_default(), e))?;
        if fp == self.fingerprint && !self.fingerprint.is_empty() {
            return Ok(Poll { changes: Vec::new(), services: Vec::new(), errors: None });
        }
        self.fingerprint = fp;
        let m = Manifests::read_dirs(&self.dirs)?;
        let mut errors = m.errors.clone();
        let mut now = Snapshot::new();
        for (src, ns) in &m.namespaces {
            match Namespace::from_k8s(ns) {
                Ok(n) => {
                    now.insert((0, ObjectKey::new("", n.name.clone())), Object::Namespace(n));
                }
                Err(e) => errors.push(crate::manifests::ManifestError {
                    source: src.clone(),
                    object: Some(format!("Namespace {}", e.key)),
                    message: e.to_string(),
                }),
            }
        }
        for (src, node) in &m.nodes {
            match Node::from_k8s(node) {
                Ok(n) => {
                    now.insert((1, ObjectKey::new("", n.name.clone())), Object::Node(n));
                }
                Err(e) => {
                    errors.push(ManifestError { source: src.clone(), object: Some(format!("Node {}", e.key)), message: e.to_string() })
                }
            }
        }
        for (src, pod) in &m.pods {
            match Pod::from_k8s(pod) {
                Ok(p) => {
                    now.insert((2, p.key.clone()), Object::Pod(p));
                }
                Err(e) => {
                    errors.push(ManifestError { source: src.clone(), object: Some(format!("Pod {}", e.key)), message: e.to_string() })
                }
            }
        }
        for (_, np) in &m.policies {
            let key = ObjectKey::new(np.metadata.namespace.clone().unwrap_or_default(), np.metadata.name.clone().unwrap_or_default());
            now.insert((3, key), Object::Policy(serde_json::to_value(np).expect("policies serialize")));
        }

        for (_, svc) in &m.services {
            if let ServiceChange::UpsertService(key, ips) = ServiceChange::from_service(svc) {
                now.insert((4, key.clone()), Object::Service(ServiceChange::UpsertService(key, ips)));
            }
        }
        for (_, slice) in &m.endpoint_slices {
            if let Some(c @ ServiceChange::UpsertSlice { .. }) = ServiceChange::from_slice(slice) {
                let ServiceChange::UpsertSlice { slice: key, .. } = &c else { unreachable!() };
                now.insert((5, key.clone()), Object::Service(c));
            }
        }

        let mut changes = Vec::new();
        let mut services = Vec::new();
        for ((kind, key), obj) in &self.last {
            if !now.contains_key(&(*kind, key.clone())) {
                match obj {
                    Object::Namespace(n) => changes.push(Change::DeleteNamespace(n.name.clone())),
                    Object::Node(n) => changes.push(Change::DeleteNode(n.name.clone())),
                    Object::Pod(p) => changes.push(Change::DeletePod(p.key.clone())),
                    Object::Policy(_) => changes.push(Change::DeletePolicy(key.clone())),
                    Object::Service(ServiceChange::UpsertService(..)) => services.push(ServiceChange::DeleteService(key.clone())),
                    Object::Service(_) => services.push(ServiceChange::DeleteSlice(key.clone())),
                }
            }
        }
        for (id, obj) in &now {
            if self.last.get(id) == Some(obj) {
                continue;
            }
            match obj {
                Object::Namespace(n) => changes.push(Change::UpsertNamespace(n.clone())),
                Object::Node(n) => changes.push(Change::UpsertNode(n.clone())),
                Object::Pod(p) => changes.push(Change::UpsertPod(p.clone())),
                Object::Policy(v) => changes.push(Change::UpsertPolicy(Box::new(serde_json::from_value(v.clone()).expect("round trip")))),
                Object::Service(c) => services.push(c.clone()),
            }
        }
        self.last = now;
        let rendered: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let errors = if rendered != self.last_errors {
            self.last_errors = rendered;
            Some(errors)
        } else {
            None
        };
        Ok(Poll { changes, services, errors })
    }
}
