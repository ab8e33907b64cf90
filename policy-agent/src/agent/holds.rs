//! Which veths to hold fail-closed (all their traffic denied) because they may belong to
//! a pod whose policy the agent cannot apply yet. Pure: the reconciler feeds it what the
//! kernel shows and carries out its plan.
//!
//! A veth is held when it belongs to no known pod and either
//! - the agent is blind (its view of the cluster is not complete and current: before the
//!   first full list, or during an API outage), so a pod created meanwhile is unknown and
//!   its first packets would pass unjudged; or
//! - a local pod that a policy selects awaits its interface: the CNI made the veth before
//!   the pod's address reached the agent.
//!
//! The hold is bounded (`max`): a veth still unexplained after that long is released with
//! a warning, so that an outage that outlasts it degrades to "new pods unenforced" rather
//! than "new pods cut off". Veths present when the agent first starts on a node with no
//! earlier agent's pins are never held: they carried traffic before any enforcement, and
//! installing the agent must not cut them while it lists the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Default bound of a hold: long enough for an API server restart, short enough that an
/// outage does not keep new pods cut off.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(120);

pub struct Holds {
    max: Duration,
    /// Held veths (ifindex) and since when.
    since: BTreeMap<u32, Instant>,
    /// Released when their hold ran out: not held again while they exist.
    expired: BTreeSet<u32>,
    /// Present before enforcement on a fresh node: never held.
    exempt: BTreeSet<u32>,
}

/// What the kernel and the model show now.
pub struct Observed<'a> {
    pub now: Instant,
    /// The source's view is not complete and current.
    pub blind: bool,
    /// A local pod that a policy selects awaits its interface.
    pub selected_pod_waiting: bool,
    /// Veths that may be a pod's (ifindex → name): no node address, not a node device.
    pub candidates: &'a BTreeMap<u32, String>,
    /// Veths that belong to a known pod, or carry links an earlier agent attached for one.
    pub known: &'a BTreeSet<u32>,
    /// Veths whose pod was just found: they stay held until the sync that writes the pod's
    /// tables takes them over (releasing them first would let packets through unjudged).
    pub found: &'a BTreeSet<u32>,
}

/// What to do about it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub hold: Vec<(u32, String)>,
    pub release: Vec<u32>,
    /// Released because the hold ran out (also in `release`).
    pub expired: Vec<(u32, String)>,
}

impl Holds {
    /// `initial`: the candidate veths at start, when no earlier agent left pins (they are
    /// exempt); empty otherwise.
    pub fn new(max: Duration, initial: BTreeSet<u32>) -> Holds {
        Holds { max, since: BTreeMap::new(), expired: BTreeSet::new(), exempt: initial }
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// Whether some veth was held less than `age` ago.
    pub fn any_younger_than(&self, now: Instant, age: Duration) -> bool {
        self.since.values().any(|t| now.duration_since(*t) < age)
    }

    /// Decides, given what is held now (`held`, as the enforcer reports it).
    pub fn plan(&mut self, o: &Observed<'_>, held: &BTreeSet<u32>) -> Plan {
        // Forget veths that are gone (an ifindex may be reused by a new one), and holds the
        // enforcer no longer has (its sync took the veth over).
        self.expired.retain(|i| o.candidates.contains_key(i));
        self.exempt.retain(|i| o.candidates.contains_key(i));
        self.since.retain(|i, _| held.contains(i));
        for i in held {
            self.since.entry(*i).or_insert(o.now);
        }
        let mut plan = Plan::default();
        for (i, t) in &self.since {
            if o.now.duration_since(*t) >= self.max && !o.found.contains(i) {
                let name = o.candidates.get(i).cloned().unwrap_or_default();
                plan.expired.push((*i, name));
                plan.release.push(*i);
            }
        }
        for (i, _) in &plan.expired {
            self.expired.insert(*i);
            self.since.remove(i);
        }
        if o.blind || o.selected_pod_waiting {
            for (i, name) in o.candidates {
                let unknown = !o.known.contains(i) && !o.found.contains(i);
                if unknown && !held.contains(i) && !self.expired.contains(i) && !self.exempt.contains(i) {
                    plan.hold.push((*i, name.clone()));
                    self.since.insert(*i, o.now);
                }
            }
        } else {
            for i in held {
                if !o.found.contains(i) && !plan.release.contains(i) {
                    plan.release.push(*i);
                    self.since.remove(i);
                }
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veths(list: &[u32]) -> BTreeMap<u32, String> {
        list.iter().map(|i| (*i, format!("veth{i}"))).collect()
    }

    fn set(list: &[u32]) -> BTreeSet<u32> {
        list.iter().copied().collect()
    }

    struct World {
        holds: Holds,
        held: BTreeSet<u32>,
        start: Instant,
    }

    impl World {
        fn new(initial: &[u32]) -> World {
            World { holds: Holds::new(Duration::from_secs(10), set(initial)), held: BTreeSet::new(), start: Instant::now() }
        }

        /// One tick at `secs` seconds: plans, and applies the plan as the enforcer would.
        fn tick(&mut self, secs: u64, blind: bool, waiting: bool, candidates: &[u32], known: &[u32], found: &[u32]) -> Plan {
            let c = veths(candidates);
            let (k, f) = (set(known), set(found));
            let o = Observed {
                now: self.start + Duration::from_secs(secs),
                blind,
                selected_pod_waiting: waiting,
                candidates: &c,
                known: &k,
                found: &f,
            };
            let plan = self.holds.plan(&o, &self.held);
            for (i, _) in &plan.hold {
                self.held.insert(*i);
            }
            for i in &plan.release {
                self.held.remove(i);
            }
            plan
        }
    }

    #[test]
    fn while_blind_an_unknown_veth_is_held_and_a_known_one_is_not() {
        let mut w = World::new(&[]);
        let p = w.tick(0, true, false, &[1, 2], &[1], &[]);
        assert_eq!(p.hold, vec![(2, "veth2".into())]);
        assert!(p.release.is_empty());
    }

    #[test]
    fn once_current_a_veth_of_no_pod_is_released_and_a_found_one_stays_held_for_the_sync() {
        let mut w = World::new(&[]);
        w.tick(0, true, false, &[2, 3], &[], &[]);
        assert_eq!(w.held, set(&[2, 3]));
        let p = w.tick(1, false, false, &[2, 3], &[], &[3]);
        assert_eq!(p.release, vec![2]);
        assert_eq!(w.held, set(&[3]));
    }

    #[test]
    fn a_hold_is_bounded_and_an_expired_veth_is_not_held_again() {
        let mut w = World::new(&[]);
        w.tick(0, true, false, &[2], &[], &[]);
        assert!(w.tick(9, true, false, &[2], &[], &[]).release.is_empty());
        let p = w.tick(10, true, false, &[2], &[], &[]);
        assert_eq!(p.expired, vec![(2, "veth2".into())]);
        assert!(w.held.is_empty());
        assert!(w.tick(11, true, false, &[2], &[], &[]).hold.is_empty());
        // The veth went away; a new one with the same ifindex is held again.
        w.tick(12, true, false, &[], &[], &[]);
        assert_eq!(w.tick(13, true, false, &[2], &[], &[]).hold.len(), 1);
    }

    #[test]
    fn veths_present_on_a_fresh_node_are_never_held() {
        let mut w = World::new(&[1]);
        let p = w.tick(0, true, false, &[1, 2], &[], &[]);
        assert_eq!(p.hold, vec![(2, "veth2".into())]);
    }

    #[test]
    fn when_current_unknown_veths_are_held_only_while_a_selected_pod_waits() {
        let mut w = World::new(&[]);
        assert!(w.tick(0, false, false, &[2], &[], &[]).hold.is_empty());
        assert_eq!(w.tick(1, false, true, &[2], &[], &[]).hold.len(), 1);
        assert_eq!(w.tick(2, false, false, &[2], &[], &[]).release, vec![2]);
    }
}
