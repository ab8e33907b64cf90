//! The reconciler: keeps this node's datapath equal to what the source shows, one step at
//! a time. Each step is a named method:
//!
//! 1. [`take_changes`](Reconciler::take_changes): the source's batch: invalid objects
//!    reported, Services noted, objects compiled (incrementally);
//! 2. [`resolve_interfaces`](Reconciler::resolve_interfaces): each local pod's host-side
//!    veth, and the node's devices;
//! 3. [`hold_unknown_veths`](Reconciler::hold_unknown_veths): veths that may be a pod the
//!    agent cannot judge yet are held fail-closed ([`super::holds`]);
//! 4. [`update_service_addresses`](Reconciler::update_service_addresses): which addresses
//!    are judged after DNAT;
//! 5. [`sync_datapath`](Reconciler::sync_datapath): the maps and programs, then the
//!    observers (state file, metrics).
//!
//! Until the source's first full lists are in, only steps 1 and 3 run: the datapath keeps
//! what it has.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use policy_model::{ChangeReport, NodeCompiler, ObjectKey, Prefix};
use tracing::{error, info, warn};

use super::NodeDevices;
use super::holds::{Holds, Observed};
use super::interfaces::InterfaceResolver;
use super::metrics::Shared;
use super::observers::{SyncObserver, Synced, TrafficCounters};
use super::services::{Deferred, Services};
use super::source::{Source, View};
use crate::datapath::{AttachPoint, EndpointStatus, Enforcer, PodInterface};
use k8s_openapi::api::core::v1::ObjectReference;

/// A ClusterNetworkPolicy, as an Event names it (cluster-scoped: no namespace; without a
/// uid the Event still lists under the object by kind and name).
fn cluster_policy_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("policy.networking.k8s.io/v1alpha2".into()),
        kind: Some("ClusterNetworkPolicy".into()),
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// The object an annotation error is about, for an Event: a NetworkPolicy or a Namespace.
fn annotated_reference(e: &policy_model::InvalidObject) -> ObjectReference {
    if e.kind == "Namespace" {
        return ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
            name: Some(e.key.name.to_string()),
            ..Default::default()
        };
    }
    ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some(e.kind.to_string()),
        namespace: Some(e.key.namespace.to_string()),
        name: Some(e.key.name.to_string()),
        ..Default::default()
    }
}

/// For this long after a new veth is held, the pods awaiting an interface are looked up
/// every tick (after that, once a second: a veth that belongs to no pod costs little).
const FAST_RESOLVE_AFTER_HOLD: Duration = Duration::from_secs(5);

/// After a batch this large (and the first sync), the memory its parsing and compiling
/// freed is handed back to the kernel.
const BIG_BATCH: usize = 256;

/// The longest one step writes maps: a sync with more to write (a huge policy, a first
/// sync of many pods) goes on at the next tick, so other changes keep flowing. Every state
/// a sync stops in is safe (each address gets its old or its new answer).
const SYNC_BUDGET: Duration = Duration::from_millis(200);

pub struct Reconciler {
    node: String,
    service_cidrs: Vec<Prefix>,
    node_devices: NodeDevices,
    compiler: NodeCompiler,
    enforcer: Enforcer,
    resolver: InterfaceResolver,
    interfaces: BTreeMap<ObjectKey, PodInterface>,
    services: Services,
    /// Service addresses in the datapath.
    deferred: Deferred,
    holds: Holds,
    last_resolve: Instant,
    last_traffic: Instant,
    /// The last warning logged per ClusterNetworkPolicy (peers that fail closed).
    cluster_policy_warnings: BTreeMap<String, String>,
    synced_once: bool,
    /// The last sync stopped at its budget with writes left.
    sync_pending: bool,
    shared: Shared,
    observers: Vec<Box<dyn SyncObserver>>,
    traffic: TrafficCounters,
    /// Pods whose fail-closed state was reported (an Event once per episode, not per sync).
    reported_fail_closed: BTreeSet<ObjectKey>,
    flows: Option<crate::flows::Flows>,
}

/// What one step did, for the loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stepped {
    pub changes: usize,
    pub synced: bool,
}

pub struct Parts {
    pub node: String,
    pub service_cidrs: Vec<Prefix>,
    pub node_devices: NodeDevices,
    pub enforcer: Enforcer,
    pub resolver: InterfaceResolver,
    pub max_hold: Duration,
    pub shared: Shared,
    pub observers: Vec<Box<dyn SyncObserver>>,
    /// Flow naming: told of every batch of changes (address owners).
    pub flows: Option<crate::flows::Flows>,
    /// `--enforcement audit`: every policy of the node is audited (`policy_model::audit`).
    pub audit_all: bool,
}

impl Reconciler {
    /// `initial_veths`: the pod-candidate veths at start (exempt from holds when no
    /// earlier agent left links: see [`super::holds`]).
    pub fn new(p: Parts, initial_veths: BTreeSet<u32>) -> Reconciler {
        let fresh_node = p.enforcer.datapath.attached().iter().all(|(_, point)| point.is_node());
        let exempt = if fresh_node { initial_veths } else { BTreeSet::new() };
        let mut compiler = NodeCompiler::new(p.node.clone());
        // Nothing compiled yet: this only sets the switch.
        compiler.set_audit_all(p.audit_all);
        Reconciler {
            compiler,
            deferred: Deferred { all: p.service_cidrs.iter().copied().collect(), tcp_only: BTreeSet::new(), before: BTreeSet::new() },
            node: p.node,
            service_cidrs: p.service_cidrs,
            node_devices: p.node_devices,
            enforcer: p.enforcer,
            resolver: p.resolver,
            interfaces: BTreeMap::new(),
            services: Services::default(),
            holds: Holds::new(p.max_hold, exempt),
            last_resolve: Instant::now() - Duration::from_secs(60),
            last_traffic: Instant::now() - Duration::from_secs(60),
            cluster_policy_warnings: BTreeMap::new(),
            synced_once: false,
            sync_pending: false,
            shared: p.shared,
            observers: p.observers,
            traffic: TrafficCounters::default(),
            reported_fail_closed: BTreeSet::new(),
            flows: p.flows,
        }
    }

    /// One pass: the source's news, through to the datapath.
    pub async fn step(&mut self, source: &mut dyn Source) -> Stepped {
        let started = Instant::now();
        let (report, change_count) = self.take_changes(source);
        if change_count > 0 {
            if let Some(f) = &self.flows {
                // Who holds each address from now on, for naming flow events.
                let now = crate::flows::names::monotonic_ns();
                f.names.lock().unwrap_or_else(|p| p.into_inner()).update_addresses(self.compiler.state(), now);
            }
        }
        let view = source.view();
        if view == View::NotSynced {
            self.hold_unknown_veths(view).await;
            return Stepped { changes: change_count, synced: false };
        }
        let interfaces_changed = self.resolve_interfaces(&report).await;
        self.hold_unknown_veths(view).await;
        self.update_service_addresses();
        let mut synced = false;
        if !self.synced_once || change_count > 0 || interfaces_changed || self.sync_pending || self.enforcer.migration_due() {
            self.sync_datapath(&report, started);
            self.report_fail_closed(&*source);
            if !self.synced_once || change_count >= BIG_BATCH {
                release_free_memory();
            }
            // Ready once the first full sync is complete (it may take several budgeted
            // steps), and not while the previous agent's datapath still enforces (a
            // migration of the pinned maps pending or failed).
            let first_complete = self.synced_once || !self.sync_pending;
            self.shared.ready.store(first_complete && !self.enforcer.migrating(), std::sync::atomic::Ordering::Relaxed);
            if !self.synced_once && first_complete {
                info!(endpoints = self.compiler.endpoints().count(), "ready: first full sync done");
                self.synced_once = true;
            }
            synced = true;
        }
        if self.last_traffic.elapsed() >= Duration::from_secs(1) {
            self.traffic.update(&self.shared, &self.enforcer, &self.compiler);
            self.last_traffic = Instant::now();
        }
        Stepped { changes: change_count, synced }
    }

    /// Step 1: the source's batch. Invalid objects are logged and reported to their owners;
    /// the rest is compiled.
    fn take_changes(&mut self, source: &mut dyn Source) -> (ChangeReport, usize) {
        let batch = source.poll();
        for invalid in &batch.invalid {
            warn!(error = %invalid.message, "invalid object skipped");
            if let Some(reference) = &invalid.reference {
                source.report(reference, "Invalid", &invalid.message);
            }
        }
        self.services.apply(batch.services);
        let count = batch.changes.len();
        for c in &batch.changes {
            if let policy_model::Change::DeleteClusterPolicy(name) = c {
                // Warned again if it comes back.
                self.cluster_policy_warnings.remove(name);
            }
        }
        let report = self.compiler.apply(batch.changes);
        for r in &report.rejected {
            warn!(object = %format!("{} {}", r.kind, r.key), error = %r, "invalid object skipped");
        }
        for e in &report.annotation_errors {
            // Reported with each version that still has it: a relist of an unchanged
            // object sends nothing to the compiler.
            warn!(object = %format!("{} {}", e.kind, e.key), error = %e, "invalid enforcement annotation: its policies are enforced");
            source.report(&annotated_reference(e), "InvalidAnnotation", &e.to_string());
        }
        for w in &report.cluster_policy_warnings {
            let text = w.to_string();
            // Once per distinct warning of a policy: a relist or a status-only update
            // sends the same version again.
            if self.cluster_policy_warnings.get(&w.name) == Some(&text) {
                continue;
            }
            warn!(object = %format!("ClusterNetworkPolicy {}", w.name), warning = %text, "peers that cannot be honoured fail closed");
            source.report(&cluster_policy_reference(&w.name), "FailClosed", &text);
            self.cluster_policy_warnings.insert(w.name.clone(), text);
        }
        (report, count)
    }

    fn pods_and_addresses(&self, only_missing: bool) -> Vec<(ObjectKey, Vec<IpAddr>)> {
        self.compiler
            .endpoints()
            .filter(|e| !only_missing || !self.interfaces.contains_key(&e.tables.pod))
            .map(|e| (e.tables.pod.clone(), e.tables.addresses.clone()))
            .collect()
    }

    /// Step 2: interfaces, when the endpoint set changed, every second while some pod has
    /// none (its veth may appear later), and every 5 s to follow moves; every tick for the
    /// waiting pods while a new veth is held (the CNI adds the pod's route right after the
    /// veth). Returns whether any pod's interface changed.
    async fn resolve_interfaces(&mut self, report: &ChangeReport) -> bool {
        let missing = self.compiler.endpoints().any(|e| !self.interfaces.contains_key(&e.tables.pod));
        let since = self.last_resolve.elapsed();
        let endpoints_changed = !report.added.is_empty() || !report.removed.is_empty() || !report.changed.is_empty();
        if endpoints_changed || (missing && since >= Duration::from_secs(1)) || since >= Duration::from_secs(5) {
            let pods = self.pods_and_addresses(false);
            let found = self.resolver.resolve(&pods).await;
            let changed = found != self.interfaces;
            self.interfaces = found;
            self.last_resolve = Instant::now();
            self.resolver.forget_others(&pods);
            self.follow_node_devices().await;
            return changed;
        }
        if missing && self.holds.any_younger_than(Instant::now(), FAST_RESOLVE_AFTER_HOLD) {
            let pods = self.pods_and_addresses(true);
            let found = self.resolver.resolve(&pods).await;
            let changed = !found.is_empty();
            self.interfaces.extend(found);
            return changed;
        }
        false
    }

    /// The node's devices (uplinks, tunnels) for the post-DNAT egress check, when detected.
    async fn follow_node_devices(&mut self) {
        if self.node_devices != NodeDevices::Detect {
            return;
        }
        let devices = self.resolver.node_devices().await;
        if &devices != self.enforcer.node_devices() {
            for e in self.enforcer.set_node_devices(&devices) {
                error!(error = %e, "node device");
            }
            info!(devices = ?self.enforcer.node_devices(), "node devices");
        }
    }

    /// Step 3: holds (see [`super::holds`]).
    async fn hold_unknown_veths(&mut self, view: View) {
        let selected_pod_waiting = self
            .compiler
            .endpoints()
            .any(|e| !self.interfaces.contains_key(&e.tables.pod) && (e.tables.ingress.isolated || e.tables.egress.isolated));
        let held: BTreeSet<u32> = self.enforcer.held().map(|(i, _)| *i).collect();
        if !view.blind() && !selected_pod_waiting && held.is_empty() {
            return; // the common case costs no netlink dump
        }
        let mut candidates = self.resolver.pod_candidate_veths().await;
        candidates.retain(|_, name| !self.enforcer.node_devices().contains(name));
        let found: BTreeSet<u32> = self.interfaces.values().map(|i| i.ifindex).collect();
        // Veths an earlier agent attached links to (for a pod it knew), and not held by us.
        let linked: BTreeSet<String> = if view.blind() {
            self.enforcer.datapath.attached().into_iter().filter(|(_, p)| *p == AttachPoint::PodIngress).map(|(n, _)| n).collect()
        } else {
            BTreeSet::new()
        };
        let known: BTreeSet<u32> = candidates
            .iter()
            .filter(|(i, name)| found.contains(i) || (linked.contains(*name) && !held.contains(i)))
            .map(|(i, _)| *i)
            .collect();
        let observed = Observed {
            now: Instant::now(),
            blind: view.blind(),
            selected_pod_waiting,
            candidates: &candidates,
            known: &known,
            found: &found,
        };
        let plan = self.holds.plan(&observed, &held);
        for (ifindex, name) in &plan.hold {
            match self.enforcer.hold(name, *ifindex) {
                Ok(()) => info!(interface = %name, blind = view.blind(), "holding a new interface fail-closed until its pod is known"),
                Err(e) => warn!(interface = %name, error = %e, "cannot hold a new interface"),
            }
        }
        if !plan.release.is_empty() {
            let keep: BTreeSet<u32> = held.iter().copied().filter(|i| !plan.release.contains(i)).collect();
            self.enforcer.release_held(&keep);
        }
        for (_, name) in &plan.expired {
            warn!(interface = %name, after = ?self.holds.max(), "released a held interface whose pod is still unknown: its traffic is not judged until the pod is known");
        }
    }

    /// Step 4: Service addresses whose egress waits for DNAT: the configured ranges, and
    /// every Service whose endpoints are pods (they follow pods: recomputed every pass).
    /// A Service inside a range with another endpoint is marked for judgment before
    /// translation: the range's entry would otherwise defer it, and a masquerade on the
    /// way out hides its flows from the hook that would judge them after DNAT.
    fn update_service_addresses(&mut self) {
        let mut deferred = self.services.deferred(self.compiler.state());
        deferred.all.extend(self.service_cidrs.iter().copied());
        deferred.before.retain(|p| self.service_cidrs.iter().any(|range| range.contains(p)));
        if deferred != self.deferred {
            let all: Vec<Prefix> = deferred.all.iter().copied().collect();
            let tcp_only: Vec<Prefix> = deferred.tcp_only.iter().copied().collect();
            let before: Vec<Prefix> = deferred.before.iter().copied().collect();
            match self.enforcer.set_service_deferrals(&all, &tcp_only, &before) {
                Ok(()) => self.deferred = deferred,
                Err(e) => error!(error = %e, "cannot write the Service addresses"),
            }
        }
    }

    /// Step 5: the maps and programs, then the observers.
    fn sync_datapath(&mut self, report: &ChangeReport, started: Instant) {
        let interfaces = &self.interfaces;
        let sync = self.enforcer.reconcile_within(&self.compiler, &|k| interfaces.get(k).cloned(), Some(SYNC_BUDGET));
        self.sync_pending = sync.more_work;
        for e in &sync.errors {
            error!(error = %e, "datapath sync");
        }
        for e in &sync.datapath_errors {
            error!(error = %e, "datapath");
        }
        if sync.endpoints_updated > 0 || sync.written_entries > 0 || sync.deleted_entries > 0 || !sync.errors.is_empty() {
            info!(
                changed = report.changed.len() + report.added.len(),
                removed = report.removed.len(),
                written = sync.written_entries,
                deleted = sync.deleted_entries,
                more = sync.more_work,
                "synced"
            );
        }
        let s = Synced {
            node: &self.node,
            compiler: &self.compiler,
            enforcer: &self.enforcer,
            interfaces: &self.interfaces,
            report: &sync,
            took: started.elapsed(),
        };
        for o in &mut self.observers {
            o.synced(&s);
        }
    }
}

impl Reconciler {
    /// Tells each pod's owners once why the pod is fail-closed (its tables could not be
    /// written: too big for the maps, or a map write failed), with a Kubernetes Event on the
    /// Pod; the log line and the metric come from the sync.
    fn report_fail_closed(&mut self, source: &dyn Source) {
        let mut now = BTreeSet::new();
        for ep in self.compiler.endpoints() {
            let pod = &ep.tables.pod;
            if let Some(EndpointStatus::FailClosed { error }) = self.enforcer.sync.status(pod) {
                now.insert(pod.clone());
                if !self.reported_fail_closed.contains(pod) {
                    let reference = ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        namespace: Some(pod.namespace.to_string()),
                        name: Some(pod.name.to_string()),
                        ..ObjectReference::default()
                    };
                    source.report(&reference, "FailClosed", &format!("all traffic of pod {pod} is denied: {error}"));
                }
            }
        }
        self.reported_fail_closed = now;
    }
}

/// glibc keeps freed heap pages mapped (and counted in the agent's RSS) until told
/// otherwise; a first load of ten thousand objects frees tens of MiB of parse buffers
/// scattered among what stays.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own free lists, locking
    // each arena; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
