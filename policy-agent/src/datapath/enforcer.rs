//! One node's enforcement: the compiler's endpoints, written to the maps and attached to
//! their interfaces. Used by the daemon's reconcile loop and by the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use policy_model::{NodeCompiler, ObjectKey, Prefix};

use super::loader::{AttachPoint, Datapath, DatapathError, MapSizes};
use super::sync::{Budget, MapSync, SyncError, SyncErrorKind, SyncReport};

/// A pod's host-side interface in the node's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub ifindex: u32,
}

pub struct Enforcer {
    pub datapath: Datapath,
    pub sync: MapSync,
    /// Pod → the interface its programs are attached to.
    attached: BTreeMap<ObjectKey, PodInterface>,
    node_devices: BTreeSet<String>,
    /// Veths held fail-closed until their pod is known.
    held: BTreeMap<u32, String>,
    first_sync_done: bool,
}

impl Enforcer {
    /// Loads (or reuses, after a restart) the datapath pinned in `pin_dir`.
    pub fn new(pin_dir: &Path, sizes: MapSizes) -> Result<Enforcer, DatapathError> {
        let datapath = Datapath::load(pin_dir, sizes)?;
        let mut sync = MapSync::new();
        sync.adopt(&datapath);
        Ok(Enforcer {
            datapath,
            sync,
            attached: BTreeMap::new(),
            node_devices: BTreeSet::new(),
            held: BTreeMap::new(),
            first_sync_done: false,
        })
    }

    /// Brings the datapath to the compiler's state, however long it takes.
    /// `interface_of` gives each local pod's host-side interface (pods without one yet are
    /// left for a later pass). Maps are written before programs are attached, so no packet
    /// meets a half-known pod. The daemon uses [`Enforcer::reconcile_within`].
    pub fn reconcile(&mut self, compiler: &NodeCompiler, interface_of: &dyn Fn(&ObjectKey) -> Option<PodInterface>) -> SyncReport {
        self.reconcile_within(compiler, interface_of, None)
    }

    /// [`Enforcer::reconcile`] that stops writing maps once `budget` has passed (checked
    /// between single map writes, so it overruns by one write at most) and says so in
    /// [`SyncReport::more_work`]. Every state it stops in is safe: each address of each
    /// pod gets its old or its new answer, and a pod whose update has not started keeps
    /// its old tables. Call it again on the next tick (with the compiler as it is then:
    /// newer changes are planned from the maps' current state) until `more_work` is
    /// false; [`Enforcer::has_work`] says the same between calls.
    ///
    /// Order of work: pods that left, an update under way, updates that free map space,
    /// then updates that need it, then unused port sets. Programs of a new pod are
    /// attached once its endpoint entry is written.
    pub fn reconcile_within(
        &mut self,
        compiler: &NodeCompiler,
        interface_of: &dyn Fn(&ObjectKey) -> Option<PodInterface>,
        budget: Option<Duration>,
    ) -> SyncReport {
        self.reconcile_with(compiler, interface_of, Budget::until(budget.map(|b| Instant::now() + b)))
    }

    /// [`Enforcer::reconcile_within`] with a [`Budget`] (tests stop after a number of
    /// writes, to look at every step).
    pub fn reconcile_with(
        &mut self,
        compiler: &NodeCompiler,
        interface_of: &dyn Fn(&ObjectKey) -> Option<PodInterface>,
        mut budget: Budget,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut live = BTreeMap::new();
        for ep in compiler.endpoints() {
            let pod = &ep.tables.pod;
            let Some(iface) = interface_of(pod) else {
                continue;
            };
            if let Err(e) = self.sync.set_target(pod, &ep.tables, iface.ifindex, &self.datapath.sizes) {
                report.errors.push(e);
                continue;
            }
            live.insert(pod.clone(), iface);
        }
        let gone: Vec<ObjectKey> = self.attached.keys().filter(|k| !live.contains_key(*k)).cloned().collect();
        for pod in gone {
            if let Some(iface) = self.attached.remove(&pod) {
                for point in [AttachPoint::PodIngress, AttachPoint::PodEgress] {
                    let _ = self.datapath.detach(&iface.name, point);
                }
            }
        }
        for pod in self.sync.pods().filter(|p| !live.contains_key(*p)).cloned().collect::<Vec<_>>() {
            self.sync.remove_endpoint(&pod);
        }
        self.sync.run_with(&mut self.datapath, &mut budget, &mut report);
        for (pod, iface) in live {
            if self.attached.get(&pod) == Some(&iface) || !self.sync.is_listed(&pod) {
                continue;
            }
            let mut ok = true;
            for point in [AttachPoint::PodIngress, AttachPoint::PodEgress] {
                if let Err(e) = self.datapath.attach(&iface.name, point) {
                    report.errors.push(SyncError { pod: pod.clone(), kind: SyncErrorKind::Attach { message: e.to_string() } });
                    ok = false;
                }
            }
            if ok {
                self.held.remove(&iface.ifindex);
                self.attached.insert(pod, iface);
            }
        }
        if !self.first_sync_done && !report.more_work {
            self.sync.collect_garbage(&mut self.datapath, &mut report);
            self.first_sync_done = true;
        }
        report
    }

    /// Whether map writes are left for a next [`Enforcer::reconcile_within`].
    pub fn has_work(&self) -> bool {
        self.sync.has_work()
    }

    /// Holds a veth fail-closed (all its traffic denied) until the pod behind it is known:
    /// for a new pod that a policy selects, no packet passes before its tables are in.
    pub fn hold(&mut self, interface: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.held.contains_key(&ifindex) {
            return Ok(());
        }
        self.sync.hold_interface(&mut self.datapath, ifindex);
        for point in [AttachPoint::PodIngress, AttachPoint::PodEgress] {
            self.datapath.attach(interface, point)?;
        }
        self.held.insert(ifindex, interface.to_string());
        Ok(())
    }

    /// Releases held veths that are not in `keep` (and not a known pod's by now).
    pub fn release_held(&mut self, keep: &BTreeSet<u32>) {
        let pods: BTreeSet<u32> = self.attached.values().map(|i| i.ifindex).collect();
        let release: Vec<(u32, String)> = self.held.iter().filter(|(i, _)| !keep.contains(i)).map(|(i, n)| (*i, n.clone())).collect();
        for (ifindex, name) in release {
            self.held.remove(&ifindex);
            if pods.contains(&ifindex) {
                continue; // now a known pod's: its sync owns the slot and the links
            }
            for point in [AttachPoint::PodIngress, AttachPoint::PodEgress] {
                let _ = self.datapath.detach(&name, point);
            }
            self.sync.release_interface(&mut self.datapath, ifindex);
        }
    }

    pub fn held(&self) -> impl Iterator<Item = (&u32, &String)> {
        self.held.iter()
    }

    /// Makes the node devices (uplinks, tunnels: the post-translation egress check) exactly
    /// `names`: attaches the new ones, detaches those gone.
    /// Returns one error per device that could not be changed (the others still are).
    pub fn set_node_devices(&mut self, names: &BTreeSet<String>) -> Vec<DatapathError> {
        let mut errors = Vec::new();
        // Also what an earlier agent left pinned on devices no longer wanted.
        let pinned = self.datapath.attached().into_iter().filter(|(_, p)| *p == AttachPoint::NodeEgress).map(|(n, _)| n);
        let current: BTreeSet<String> = self.node_devices.iter().cloned().chain(pinned).collect();
        for gone in current.difference(names).cloned().collect::<Vec<_>>() {
            match self.datapath.detach(&gone, AttachPoint::NodeEgress) {
                Ok(()) => {
                    self.node_devices.remove(&gone);
                }
                Err(e) => errors.push(e),
            }
        }
        for new in names.difference(&self.node_devices).cloned().collect::<Vec<_>>() {
            match self.datapath.attach(&new, AttachPoint::NodeEgress) {
                Ok(()) => {
                    self.node_devices.insert(new);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    pub fn node_devices(&self) -> &BTreeSet<String> {
        &self.node_devices
    }

    pub fn set_services(&mut self, prefixes: &[Prefix]) -> Result<(), String> {
        self.sync.set_services(&mut self.datapath, prefixes)
    }
}
