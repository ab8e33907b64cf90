//! One node's enforcement: the compiler's endpoints, written to the maps and attached to
//! their interfaces. Used by the daemon's reconcile loop and by the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use policy_model::{NodeCompiler, ObjectKey, Prefix};
use tracing::{info, warn};

use super::loader::{AttachPoint, Datapath, DatapathError, FlowConfig, MapSizes};
use super::migrate::{self, Generation, Plan};
use super::sync::{Budget, MapSync, SyncError, SyncErrorKind, SyncReport};

/// Test hook: with this set to a number of seconds, a migrating agent logs
/// "migration: pausing before the swap" and sleeps that long between filling the new maps
/// (step 2) and swapping the programs (step 3), so a test can kill it there.
pub const PAUSE_BEFORE_SWAP_ENV: &str = "POLICY_AGENT_TEST_PAUSE_BEFORE_SWAP";
/// Test hook: milliseconds to wait after each link's program swap in a migration, so that
/// a test sees flows cross hooks of both builds (the window a shared or read-through
/// connection tracking must cover).
pub const PAUSE_BETWEEN_SWAPS_ENV: &str = "POLICY_AGENT_TEST_PAUSE_BETWEEN_SWAPS_MS";
/// For datapaths made with [`Enforcer::new`] (tests, benchmarks): which flow events, in
/// the form of `policy-agent run --flow-events` (`none`, `denied`, `sampled:N`, `all`).
pub const FLOW_EVENTS_ENV: &str = "POLICY_AGENT_FLOW_EVENTS";

/// How the datapath stands with respect to the maps a previous agent left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatapathStatus {
    /// Our maps, adopted or migrated to: the programs in every link use them.
    InForce,
    /// New maps are being filled; the previous programs and maps go on enforcing until the
    /// first full sync ends and the programs are swapped.
    Migrating { from: Vec<String> },
    /// The migration could not finish (why, and what still enforces); it is tried again
    /// at every reconcile. Not ready.
    MigrationFailed { error: String },
}

/// A migration under way: what it replaces, and the links whose program swap waits for
/// the first full sync.
struct Migration {
    old: Vec<Generation>,
    swaps: BTreeSet<(String, AttachPoint)>,
    /// The new maps use the previous generation's connection tracking: nothing to copy.
    shared_conntrack: bool,
    /// The new programs also read and write the previous connection tracking map
    /// (`PA_PREV_CT`): reloaded without it once every link is swapped.
    prev_conntrack: bool,
    last_attempt: Option<Instant>,
}

/// How often a failed migration is tried again without other reasons to reconcile.
pub const MIGRATION_RETRY: Duration = Duration::from_secs(10);

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
    migration: Option<Migration>,
    status: DatapathStatus,
    /// Migration attempts that failed since start (for metrics).
    pub migration_failures: u64,
}

impl Enforcer {
    /// Loads the datapath pinned in `pin_dir`: adopts our maps if they are alone there
    /// (a restart), else makes a new generation and migrates to it during the first full
    /// sync (see `migrate`). Until the migration is done, the previous programs and maps
    /// go on enforcing.
    ///
    /// Flow events as `POLICY_AGENT_FLOW_EVENTS` says ([`FLOW_EVENTS_ENV`]; default: denied
    /// flows only); the agent sets them with [`Enforcer::with_flows`].
    pub fn new(pin_dir: &Path, sizes: MapSizes) -> Result<Enforcer, DatapathError> {
        let flows = match std::env::var(FLOW_EVENTS_ENV) {
            Ok(v) => match FlowConfig::parse(&v) {
                Ok(f) => f,
                Err(e) => {
                    warn!(value = %v, error = %e, "{FLOW_EVENTS_ENV}: ignored");
                    FlowConfig::default()
                }
            },
            Err(_) => FlowConfig::default(),
        };
        Enforcer::with_flows(pin_dir, sizes, flows)
    }

    /// [`Enforcer::new`] with the flow events of `flows`.
    pub fn with_flows(pin_dir: &Path, sizes: MapSizes, flows: FlowConfig) -> Result<Enforcer, DatapathError> {
        let plan = migrate::plan(pin_dir, &sizes).map_err(|source| DatapathError::PinDir { path: pin_dir.to_path_buf(), source })?;
        let mut sync = MapSync::new();
        let (datapath, migration, status) = match plan {
            Plan::Adopt(dir) => {
                let datapath = Datapath::load_with(pin_dir, &dir, sizes, flows, &[], None)?;
                sync.adopt(&datapath);
                info!(maps = %dir.display(), "adopting the pinned maps");
                pin_bridges(&datapath);
                (datapath, None, DatapathStatus::InForce)
            }
            Plan::Migrate { new, old } => {
                // Connection tracking shared with the previous programs where it can be,
                // else read and written through by the new programs while the links are
                // swapped (same layout, other size): either way no flow is unknown to
                // either side while the links are swapped one by one. New revisions start
                // above the previous ones, so that every shared flow is judged again,
                // once, against the new tables.
                let share = migrate::shareable(&old, &sizes);
                if let Some(g) = old.first() {
                    sync.set_revision_floor(migrate::revision_floor(g));
                }
                let shared_conntrack = share.iter().any(|(n, _)| *n == policy_ebpf::map_names::CONNTRACK);
                let prev = migrate::previous_conntrack(&old, &share);
                let datapath = match Datapath::load_with(pin_dir, &new, sizes, flows, &share, prev.as_deref()) {
                    Ok(d) => d,
                    Err(e) => {
                        // The old generation stays in force; leave nothing half-made.
                        let _ = std::fs::remove_dir_all(&new);
                        return Err(e);
                    }
                };
                let from: Vec<String> = old.iter().map(Generation::describe).collect();
                if from.is_empty() {
                    info!(maps = %new.display(), "no maps pinned yet: new maps");
                } else {
                    info!(maps = %new.display(), from = ?from, "migrating: new maps, filled by the first full sync while the previous ones enforce");
                }
                (
                    datapath,
                    Some(Migration { old, swaps: BTreeSet::new(), shared_conntrack, prev_conntrack: prev.is_some(), last_attempt: None }),
                    DatapathStatus::Migrating { from },
                )
            }
        };
        Ok(Enforcer {
            datapath,
            sync,
            attached: BTreeMap::new(),
            node_devices: BTreeSet::new(),
            held: BTreeMap::new(),
            first_sync_done: false,
            migration,
            status,
            migration_failures: 0,
        })
    }

    /// Where the datapath stands (for `/readyz` and the logs).
    pub fn status(&self) -> &DatapathStatus {
        &self.status
    }

    /// True while a previous datapath still enforces (a migration is pending or failed):
    /// not ready, and every reconcile tries to finish it.
    pub fn migrating(&self) -> bool {
        self.migration.is_some()
    }

    /// True when the run loop should reconcile even without changes: a migration that
    /// has not been tried yet, or failed more than `MIGRATION_RETRY` ago.
    pub fn migration_due(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| m.last_attempt.is_none_or(|t| t.elapsed() >= MIGRATION_RETRY))
    }

    /// Attaches now, or, during a migration, once the new maps hold the first full sync.
    fn attach(&mut self, interface: &str, point: AttachPoint) -> Result<(), DatapathError> {
        match &mut self.migration {
            Some(m) => {
                m.swaps.insert((interface.to_string(), point));
                Ok(())
            }
            None => self.datapath.attach(interface, point),
        }
    }

    fn detach(&mut self, interface: &str, point: AttachPoint) -> Result<(), DatapathError> {
        if let Some(m) = &mut self.migration {
            m.swaps.remove(&(interface.to_string(), point));
        }
        self.datapath.detach(interface, point)
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
                    let _ = self.detach(&iface.name, point);
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
                if let Err(e) = self.attach(&iface.name, point) {
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
        // A migration swaps the programs only once the new maps hold a full sync.
        if self.migration.is_some() && !report.more_work {
            self.finish_migration(&mut report);
        }
        report
    }

    /// Steps 2 (connections) to 4 of a migration, after a full sync into the new maps:
    /// carry the tracked connections, swap the programs in every pinned link, remove the
    /// other generations. If the new maps could not take every pod's tables, or a swap
    /// failed, the previous generation stays pinned (and, where not swapped, enforcing),
    /// and the next reconcile tries again.
    fn finish_migration(&mut self, report: &mut SyncReport) {
        let Some(m) = self.migration.as_mut() else { return };
        m.last_attempt = Some(Instant::now());
        let has_old = !m.old.is_empty();
        if has_old && !report.errors.is_empty() {
            let error = format!(
                "migration failed: the new maps ({}) could not take every pod's tables ({} errors, first: {}); the previous datapath ({}) stays in force, unchanged",
                self.datapath.maps_dir().display(),
                report.errors.len(),
                report.errors[0],
                m.old.iter().map(Generation::describe).collect::<Vec<_>>().join(", ")
            );
            self.fail_migration(error, report);
            return;
        }
        // Step 2: established connections (no new program runs yet: nothing to keep).
        let ct_from: Vec<Generation> = if m.shared_conntrack {
            Vec::new()
        } else {
            m.old.iter().rev().filter(|g| migrate::conntrack_compatible(g.layout)).cloned().collect()
        };
        for g in m.old.iter().filter(|g| !migrate::conntrack_compatible(g.layout)) {
            warn!(maps = %g.describe(), "tracked connections of another layout are not carried: their next packets are judged as new flows");
        }
        let mut carried = 0;
        for g in &ct_from {
            match migrate::carry_conntrack(g, &mut self.datapath.conntrack, false) {
                Ok(n) => carried += n,
                Err(e) => warn!(maps = %g.describe(), error = %e, "cannot carry tracked connections"),
            }
        }
        if has_old {
            if let Some(secs) = std::env::var(PAUSE_BEFORE_SWAP_ENV).ok().and_then(|v| v.parse::<u64>().ok()) {
                info!(seconds = secs, "migration: pausing before the swap (test hook)");
                std::thread::sleep(Duration::from_secs(secs));
            }
        }
        // Step 3: every pinned link, and the new ones, get this build's programs.
        let mut all = std::mem::take(&mut m.swaps);
        let known = all.clone();
        all.extend(self.datapath.attached());
        let mut failed = BTreeSet::new();
        let mut errors = Vec::new();
        let pause =
            std::env::var(PAUSE_BETWEEN_SWAPS_ENV).ok().and_then(|v| v.parse::<u64>().ok()).filter(|_| has_old).map(Duration::from_millis);
        for (interface, point) in all {
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
            if !known.contains(&(interface.clone(), point)) {
                // A link this agent did not ask for: the interface is gone (a defunct link:
                // unpin it), or a previous agent held it or knew a pod there that this one
                // does not (yet): hold it fail-closed, as for a new veth; releasing holds
                // is the run loop's business.
                let Some(ifindex) = ifindex(&interface) else {
                    let _ = self.datapath.detach(&interface, point);
                    continue;
                };
                if !point.is_node() && !self.attached.values().any(|i| i.ifindex == ifindex) {
                    self.sync.hold_interface(&mut self.datapath, ifindex);
                    self.held.insert(ifindex, interface.clone());
                }
            }
            if let Err(e) = self.datapath.attach(&interface, point) {
                errors.push(format!("swapping the program on {interface}: {e}"));
                failed.insert((interface, point));
            }
        }
        // Flows the previous programs started while the swap went on.
        for g in &ct_from {
            let _ = migrate::carry_conntrack(g, &mut self.datapath.conntrack, true);
        }
        let m = self.migration.as_mut().expect("migrating");
        if !errors.is_empty() {
            m.swaps = failed;
            let error = format!(
                "migration failed: {} (the other links use the new maps; the previous maps stay pinned until every link is swapped)",
                errors.join("; ")
            );
            self.fail_migration(error, report);
            return;
        }
        // Every link runs the new programs: those that also use the previous connection
        // tracking give way to the same programs without it (every map shared: no gap).
        let prev = m.prev_conntrack;
        if prev {
            self.drop_previous_conntrack();
        }
        let m = self.migration.as_mut().expect("migrating");
        // Step 4: the previous generations go.
        let old = std::mem::take(&mut m.old);
        let shared = m.shared_conntrack;
        let from: Vec<String> = old.iter().map(Generation::describe).collect();
        for g in &old {
            if let Err(e) = migrate::remove(g) {
                warn!(maps = %g.describe(), error = %e, "cannot remove the previous maps (the next start migrates again)");
            }
        }
        self.migration = None;
        self.status = DatapathStatus::InForce;
        pin_bridges(&self.datapath);
        if !from.is_empty() {
            info!(maps = %self.datapath.maps_dir().display(), from = ?from, connections_copied = carried, connection_tracking_shared = shared, connection_tracking_read_through = prev, "migrated: the programs in every link use the new maps");
        }
    }

    /// Reloads this build's programs on the same maps, without the previous connection
    /// tracking, and swaps them into every link. On failure the programs in force keep
    /// enforcing as they are (correct, only a little slower on new flows).
    fn drop_previous_conntrack(&mut self) {
        let d = &self.datapath;
        let fresh = match Datapath::load_with(d.pin_dir(), d.maps_dir(), d.sizes, d.flows, &[], None) {
            Ok(fresh) => fresh,
            Err(e) => {
                warn!(error = %e, "cannot reload the programs without the previous connection tracking; they keep using it");
                return;
            }
        };
        self.datapath = fresh;
        for (interface, point) in self.datapath.attached() {
            if let Err(e) = self.datapath.attach(&interface, point) {
                warn!(interface = %interface, error = %e, "cannot swap in the programs without the previous connection tracking");
            }
        }
    }

    fn fail_migration(&mut self, error: String, report: &mut SyncReport) {
        if self.status != (DatapathStatus::MigrationFailed { error: error.clone() }) {
            warn!(error = %error, "migration");
        }
        self.migration_failures += 1;
        report.datapath_errors.push(error.clone());
        self.status = DatapathStatus::MigrationFailed { error };
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
            self.attach(interface, point)?;
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
                let _ = self.detach(&name, point);
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
        let pinned = self.datapath.attached().into_iter().filter(|(_, p)| p.is_node()).map(|(n, _)| n);
        let current: BTreeSet<String> = self.node_devices.iter().cloned().chain(pinned).collect();
        for gone in current.difference(names).cloned().collect::<Vec<_>>() {
            let results = [AttachPoint::NodeEgress, AttachPoint::NodeIngress].map(|point| self.detach(&gone, point));
            let ok = results.iter().all(Result::is_ok);
            errors.extend(results.into_iter().filter_map(Result::err));
            if ok {
                self.node_devices.remove(&gone);
            }
        }
        for new in names.difference(&self.node_devices).cloned().collect::<Vec<_>>() {
            // Both or neither: `node_ingress` notes arrivals for the judgments that
            // `pod_ingress` makes, and `node_egress` judges what leaves.
            let results = [AttachPoint::NodeEgress, AttachPoint::NodeIngress].map(|point| self.attach(&new, point));
            let ok = results.iter().all(Result::is_ok);
            errors.extend(results.into_iter().filter_map(Result::err));
            if ok {
                self.node_devices.insert(new);
            }
        }
        errors
    }

    pub fn node_devices(&self) -> &BTreeSet<String> {
        &self.node_devices
    }

    /// Service addresses whose flows of every protocol wait for DNAT to be judged.
    pub fn set_services(&mut self, prefixes: &[Prefix]) -> Result<(), String> {
        self.sync.set_services(&mut self.datapath, prefixes, &[], &[])
    }

    /// Where flows to Service addresses are judged: after DNAT, `all` for every protocol,
    /// `tcp_only` for TCP (see `policy_ebpf::SERVICE_DEFER_TCP`); `before` translation,
    /// addresses inside a prefix of `all` (see `policy_ebpf::SERVICE_BEFORE_DNAT`).
    pub fn set_service_deferrals(&mut self, all: &[Prefix], tcp_only: &[Prefix], before: &[Prefix]) -> Result<(), String> {
        self.sync.set_services(&mut self.datapath, all, tcp_only, before)
    }
}

/// The index of an interface of this network namespace.
/// Keeps this datapath's connection tracking (and pending judgments) pinned where a legacy
/// agent looks for them too (see `migrate::BRIDGED`), so that a rollback shares them.
fn pin_bridges(datapath: &Datapath) {
    for (name, path) in migrate::bridges(datapath.pin_dir()) {
        if let Err(e) = datapath.pin_map_at(name, &path) {
            warn!(map = name, error = %e, "cannot pin the map where a previous release looks for it (a rollback would not share it)");
        }
    }
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; the function
    // only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
