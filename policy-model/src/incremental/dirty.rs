//! Which local endpoints a batch must recompile, and in which directions.
//!
//! A policy only ever changes the directions it has rules for: a NetworkPolicy those in
//! its `policyTypes`, a ClusterNetworkPolicy those with rules (upstream: "a CNP with no
//! rules for a direction does not affect that direction"). Keeping the other direction's
//! table saves half of the work of such a change, and often much more: an egress-only
//! Admin policy (the metadata-address deny) changed on every subject left the ingress
//! tables, with one entry per peer pod of the cluster, recompiled for nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::objects::ObjectKey;
use crate::policy::Direction;

/// A set of directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Dirs {
    ingress: bool,
    egress: bool,
}

impl Dirs {
    pub(crate) const BOTH: Dirs = Dirs { ingress: true, egress: true };

    /// The directions for which `has` holds.
    pub(crate) fn of(has: impl Fn(Direction) -> bool) -> Dirs {
        Dirs { ingress: has(Direction::Ingress), egress: has(Direction::Egress) }
    }

    pub(crate) fn has(self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = Direction> {
        Direction::BOTH.into_iter().filter(move |d| self.has(*d))
    }

    /// The directions of `self` not in `other`.
    pub(crate) fn minus(self, other: Dirs) -> Dirs {
        Dirs { ingress: self.ingress && !other.ingress, egress: self.egress && !other.egress }
    }

    pub(crate) fn union(self, other: Dirs) -> Dirs {
        Dirs { ingress: self.ingress || other.ingress, egress: self.egress || other.egress }
    }

    pub(crate) fn is_empty(self) -> bool {
        !self.ingress && !self.egress
    }
}

/// Endpoints to recompile, each with the directions that may have changed; and endpoints
/// whose tables only peer pods' changes can have changed, which may be patched at those
/// pods' addresses instead (`crate::cnp::patch`).
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    full: BTreeMap<ObjectKey, Dirs>,
    peers: BTreeMap<ObjectKey, PeerMarks>,
    /// Every pod changed in the batch, with the addresses it held before its first change.
    before: BTreeMap<ObjectKey, Vec<IpAddr>>,
}

/// The directions of an endpoint that peer pods' changes reach, and those pods.
#[derive(Debug, Default)]
pub(crate) struct PeerMarks {
    pub(crate) dirs: Dirs,
    pub(crate) pods: BTreeSet<ObjectKey>,
}

/// What to do with one endpoint: rebuild `rebuild`; patch `patch` at the addresses of
/// `pods` (none of which is rebuilt).
#[derive(Debug)]
pub(crate) struct Work {
    pub(crate) rebuild: Dirs,
    pub(crate) patch: Dirs,
    pub(crate) pods: Vec<ObjectKey>,
}

impl Dirty {
    /// Both directions of `key`.
    pub(crate) fn insert(&mut self, key: ObjectKey) {
        self.mark(key, Dirs::BOTH);
    }

    /// `dirs` of `key` (nothing for no direction).
    pub(crate) fn mark(&mut self, key: ObjectKey, dirs: Dirs) {
        if dirs.is_empty() {
            return;
        }
        let e = self.full.entry(key).or_default();
        *e = e.union(dirs);
    }

    /// Notes a pod's addresses before the batch changed it (its first change only).
    pub(crate) fn note_pod(&mut self, pod: &ObjectKey, addresses: &[IpAddr]) {
        self.before.entry(pod.clone()).or_insert_with(|| addresses.to_vec());
    }

    /// The addresses `pod` held before the batch (it was noted), if any.
    pub(crate) fn before(&self, pod: &ObjectKey) -> &[IpAddr] {
        self.before.get(pod).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Takes `marks` (what `pod`'s change reaches) as peer marks: patchable at `pod`'s
    /// addresses.
    pub(crate) fn mark_peer(&mut self, pod: &ObjectKey, marks: Dirty) {
        debug_assert!(marks.peers.is_empty());
        for (key, dirs) in marks.full {
            let e = self.peers.entry(key).or_default();
            e.dirs = e.dirs.union(dirs);
            e.pods.insert(pod.clone());
        }
    }

    /// Each endpoint's work: what full marks reach is rebuilt, the rest of what peer marks
    /// reach may be patched.
    pub(crate) fn work(&mut self) -> Vec<(ObjectKey, Work)> {
        let mut out: BTreeMap<ObjectKey, Work> = std::mem::take(&mut self.full)
            .into_iter()
            .map(|(k, d)| (k, Work { rebuild: d, patch: Dirs::default(), pods: Vec::new() }))
            .collect();
        for (key, marks) in std::mem::take(&mut self.peers) {
            let w = out.entry(key).or_insert(Work { rebuild: Dirs::default(), patch: Dirs::default(), pods: Vec::new() });
            w.patch = marks.dirs.minus(w.rebuild);
            if !w.patch.is_empty() {
                w.pods = marks.pods.into_iter().collect();
            }
        }
        out.into_iter().filter(|(_, w)| !w.rebuild.is_empty() || !w.patch.is_empty()).collect()
    }

    /// Both directions of each key.
    pub(crate) fn extend(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        for key in keys {
            self.insert(key);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.full.is_empty() && self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_accumulate_per_endpoint() {
        let (a, b) = (ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b"));
        let mut d = Dirty::default();
        d.mark(a.clone(), Dirs::of(|d| d == Direction::Egress));
        d.mark(b.clone(), Dirs::default());
        d.mark(a.clone(), Dirs::of(|d| d == Direction::Ingress));
        let got: Vec<_> = d.work().into_iter().map(|(k, w)| (k, w.rebuild, w.patch)).collect();
        assert_eq!(got, vec![(a, Dirs::BOTH, Dirs::default())]);
    }

    #[test]
    fn full_marks_take_the_directions_they_reach_from_peer_marks() {
        let (a, b, p) = (ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b"), ObjectKey::new("ns", "p"));
        let ingress = Dirs::of(|d| d == Direction::Ingress);
        let egress = Dirs::of(|d| d == Direction::Egress);
        let mut d = Dirty::default();
        let mut marks = Dirty::default();
        marks.mark(a.clone(), Dirs::BOTH);
        marks.mark(b.clone(), ingress);
        d.mark_peer(&p, marks);
        d.mark(a.clone(), ingress);
        d.mark(b.clone(), ingress);
        let got: Vec<_> = d.work().into_iter().map(|(k, w)| (k, w.rebuild, w.patch, w.pods)).collect();
        assert_eq!(got, vec![(a, ingress, egress, vec![p]), (b, ingress, Dirs::default(), vec![])]);
    }
}
