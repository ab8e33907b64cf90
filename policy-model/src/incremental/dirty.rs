//! Which local endpoints a batch must recompile, and in which directions.
//!
//! A policy only ever changes the directions it has rules for: a NetworkPolicy those in
//! its `policyTypes`, a ClusterNetworkPolicy those with rules (upstream: "a CNP with no
//! rules for a direction does not affect that direction"). Keeping the other direction's
//! table saves half of the work of such a change, and often much more: an egress-only
//! Admin policy (the metadata-address deny) changed on every subject left the ingress
//! tables, with one entry per peer pod of the cluster, recompiled for nothing.

use std::collections::BTreeMap;

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

    fn union(self, other: Dirs) -> Dirs {
        Dirs { ingress: self.ingress || other.ingress, egress: self.egress || other.egress }
    }

    fn is_empty(self) -> bool {
        !self.ingress && !self.egress
    }
}

/// Endpoints to recompile, each with the directions that may have changed.
#[derive(Debug, Default)]
pub(crate) struct Dirty(BTreeMap<ObjectKey, Dirs>);

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
        let e = self.0.entry(key).or_default();
        *e = e.union(dirs);
    }

    /// Both directions of each key.
    pub(crate) fn extend(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        for key in keys {
            self.insert(key);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl IntoIterator for Dirty {
    type Item = (ObjectKey, Dirs);
    type IntoIter = std::collections::btree_map::IntoIter<ObjectKey, Dirs>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
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
        let got: Vec<_> = d.into_iter().collect();
        assert_eq!(got, vec![(a, Dirs::BOTH)]);
    }
}
