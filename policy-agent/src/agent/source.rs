//! Where the cluster's objects come from, behind one interface: a directory of manifests
//! or the Kubernetes API. Each feeds the reconciler the same change stream, says how
//! complete its view is, and reports objects that cannot be enforced.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use policy_model::Change;
use tracing::warn;

use super::kube_source::KubeSource;
use super::manifest_source::ManifestSource;
use super::services::ServiceChange;

/// How far the agent can trust what its source has shown it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Every kind's first full list is in, and the source is reachable.
    Current,
    /// The first full lists are not all in yet: the datapath keeps what it has (after a
    /// restart, the previous agent's tables), since a partial view could open too much.
    NotSynced,
    /// Synced before, but the source cannot be read now (an API outage, an unreadable
    /// directory): the last state stays enforced, and a pod created meanwhile is unknown.
    Stale,
}

impl View {
    /// Whether a veth may belong to a pod the agent cannot know about yet.
    pub fn blind(self) -> bool {
        self != View::Current
    }
}

/// An object that cannot be enforced, with what a Kubernetes Event needs to name it.
pub struct Invalid {
    pub message: String,
    pub reference: Option<ObjectReference>,
}

/// What a source reported since its last poll.
#[derive(Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    pub services: Vec<ServiceChange>,
    pub invalid: Vec<Invalid>,
}

/// One source of objects.
pub trait Source: Send {
    /// Everything new since the last call.
    fn poll(&mut self) -> Batch;
    /// How complete and current the view is, as of the last poll.
    fn view(&self) -> View;
    /// Notified when the source has something new at once (a manifest directory changed);
    /// `None`: the reconciler's tick polls it.
    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// Tells the object's owners (a Kubernetes Event) why it is not enforced as written.
    /// The reconciler logs every report itself; a source without Events does nothing more.
    fn report(&self, _reference: &ObjectReference, _reason: &'static str, _note: &str) {}
}

/// A directory of manifests (`--manifests`).
pub struct Manifests {
    source: ManifestSource,
    unreadable: bool,
}

impl Manifests {
    pub fn new(source: ManifestSource) -> Manifests {
        Manifests { source, unreadable: false }
    }
}

impl Source for Manifests {
    fn poll(&mut self) -> Batch {
        match self.source.poll() {
            Ok(p) => {
                self.unreadable = false;
                // Errors come only when the set of invalid objects changed: each is said once.
                let invalid =
                    p.errors.unwrap_or_default().into_iter().map(|e| Invalid { message: e.to_string(), reference: None }).collect();
                Batch { changes: p.changes, services: p.services, invalid }
            }
            Err((dir, e)) => {
                if !self.unreadable {
                    warn!(dir = %dir.display(), error = %e, "cannot read manifests; the last state stays enforced");
                }
                self.unreadable = true;
                Batch::default()
            }
        }
    }

    fn view(&self) -> View {
        if self.unreadable { View::Stale } else { View::Current }
    }

    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.source.changed())
    }
}

/// The Kubernetes API (watchers per kind), with Events for what cannot be enforced.
pub struct Kubernetes {
    source: KubeSource,
    recorder: kube::runtime::events::Recorder,
}

impl Kubernetes {
    pub fn start(client: kube::Client, node: &str) -> Kubernetes {
        let reporter = kube::runtime::events::Reporter { controller: "policy-agent".into(), instance: Some(node.to_string()) };
        let source = KubeSource::start(client.clone());
        Kubernetes { source, recorder: kube::runtime::events::Recorder::new(client, reporter) }
    }
}

impl Source for Kubernetes {
    fn poll(&mut self) -> Batch {
        let d = self.source.drain();
        let invalid = d
            .invalid
            .into_iter()
            .map(|(reference, error)| Invalid { message: format!("{} {}: {error}", error.kind, error.key), reference: Some(reference) })
            .collect();
        Batch { changes: d.changes, services: d.services, invalid }
    }

    fn view(&self) -> View {
        if !self.source.synced() {
            View::NotSynced
        } else if self.source.blind() {
            View::Stale
        } else {
            View::Current
        }
    }

    fn report(&self, reference: &ObjectReference, reason: &'static str, note: &str) {
        let recorder = self.recorder.clone();
        let reference = reference.clone();
        let ev = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: reason.into(),
            // The API caps an Event's note at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Enforce".into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                warn!(error = %e, "cannot publish a Kubernetes Event");
            }
        });
    }
}
