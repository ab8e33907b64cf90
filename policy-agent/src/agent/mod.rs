//! `policy-agent run`: keep this node's datapath equal to the cluster's policies.
//!
//! One loop: take the source's changes (batched by the poll interval), compile
//! incrementally, find the pods' interfaces, sync the maps, publish state and metrics.

pub mod interfaces;
pub mod kube_source;
pub mod manifest_source;
pub mod metrics;
pub mod permissions;
pub mod services;
pub mod state;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use policy_model::{NodeCompiler, ObjectKey, Prefix};
use tracing::{error, info, warn};

use crate::datapath::{Enforcer, MapSizes, PodInterface};
use crate::tables_view::endpoint_view;
use interfaces::InterfaceResolver;
use manifest_source::ManifestSource;
use metrics::{MapLabels, Metrics, Shared, TrafficLabels};
use state::EndpointState;

/// Where the cluster's objects come from.
pub enum SourceConfig {
    /// Directories of YAML, re-read when they change.
    Manifests(Vec<PathBuf>),
    /// The Kubernetes API.
    Kubernetes(kube::Client),
}

enum Source {
    Manifests(ManifestSource),
    Kubernetes(Box<(kube_source::KubeSource, kube::runtime::events::Recorder)>),
}

/// Which devices get the post-DNAT egress check of Service traffic leaving the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeDevices {
    /// Detected, and followed as devices come and go.
    Detect,
    Fixed(Vec<String>),
}

pub struct AgentConfig {
    pub node: String,
    pub source: SourceConfig,
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    /// Service addresses whose egress judgment waits for DNAT.
    pub service_cidrs: Vec<Prefix>,
    /// Devices of the node (uplinks, tunnels) that get the post-DNAT egress check.
    pub node_devices: NodeDevices,
    pub sizes: MapSizes,
    pub poll_interval: Duration,
}

/// For this long after a new veth is held, the pods awaiting an interface are looked up
/// every tick (after that, once a second: a veth that belongs to no pod costs little).
const FAST_RESOLVE_AFTER_HOLD: Duration = Duration::from_secs(5);

/// After a batch this large (and the first sync), the memory its parsing and compiling
/// freed is handed back to the kernel.
const BIG_BATCH: usize = 256;

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

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Runs until `shutdown` resolves. The pins stay: enforcement goes on without the agent,
/// and the next agent picks it up.
pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let shared = Shared { metrics: Arc::new(Mutex::new(Metrics::new())), ready: Arc::new(std::sync::atomic::AtomicBool::new(false)) };
    if let Some(addr) = cfg.metrics_addr {
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, s).await {
                error!(%addr, error = %e, "metrics server failed");
            }
        });
    }
    let mut enforcer =
        Enforcer::new(&cfg.pin_dir, cfg.sizes).with_context(|| format!("loading the datapath (pins in {})", cfg.pin_dir.display()))?;
    enforcer.set_services(&cfg.service_cidrs).map_err(anyhow::Error::msg).context("writing the Service prefixes")?;
    if let NodeDevices::Fixed(names) = &cfg.node_devices {
        // Exactly these: links an earlier agent pinned on other devices are detached too.
        if let Some(e) = enforcer.set_node_devices(&names.iter().cloned().collect()).into_iter().next() {
            return Err(anyhow::Error::new(e).context("attaching to the node's devices"));
        }
    }
    let mut compiler = NodeCompiler::new(cfg.node.clone());
    let mut source = match cfg.source {
        SourceConfig::Manifests(dirs) => Source::Manifests(ManifestSource::new(dirs)),
        SourceConfig::Kubernetes(client) => {
            let reporter = kube::runtime::events::Reporter { controller: "policy-agent".into(), instance: Some(cfg.node.clone()) };
            let source = kube_source::KubeSource::start(client.clone(), &cfg.node);
            Source::Kubernetes(Box::new((source, kube::runtime::events::Recorder::new(client, reporter))))
        }
    };
    let mut resolver = InterfaceResolver::new().context("opening rtnetlink")?;
    let mut interfaces: BTreeMap<ObjectKey, PodInterface> = BTreeMap::new();
    let mut last_counters: BTreeMap<(String, &'static str, &'static str), (u64, u64)> = BTreeMap::new();
    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_resolve = Instant::now() - Duration::from_secs(60);
    // When each held veth was first held.
    let mut held_since: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut last_metrics = Instant::now() - Duration::from_secs(60);
    let mut first = true;
    let mut services = services::Services::default();
    let mut last_deferred: std::collections::BTreeSet<Prefix> = cfg.service_cidrs.iter().copied().collect();
    info!(node = %cfg.node, pin_dir = %cfg.pin_dir.display(), "agent started");
    tokio::pin!(shutdown);
    // A manifest directory reports its changes at once: apply them without waiting for the tick.
    let source_changed = match &source {
        Source::Manifests(m) => Some(m.changed()),
        Source::Kubernetes(_) => None,
    };

    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async {
                match &source_changed {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = &mut shutdown => break,
        }
        let started = Instant::now();
        let (changes, service_changes, synced) = match &mut source {
            Source::Manifests(m) => match m.poll() {
                Ok(p) => {
                    if let Some(errors) = &p.errors {
                        for e in errors {
                            warn!(error = %e, "invalid object skipped");
                        }
                    }
                    (p.changes, p.services, true)
                }
                Err((dir, e)) => {
                    // Keep enforcing what we have; try again next tick.
                    warn!(dir = %dir.display(), error = %e, "cannot read manifests");
                    continue;
                }
            },
            Source::Kubernetes(k) => {
                let (source, recorder) = &mut **k;
                let d = source.drain();
                for (reference, error) in d.invalid {
                    warn!(object = %format!("{} {}", error.kind, error.key), error = %error, "invalid object skipped");
                    let recorder = recorder.clone();
                    tokio::spawn(async move {
                        let ev = kube::runtime::events::Event {
                            type_: kube::runtime::events::EventType::Warning,
                            reason: "Invalid".into(),
                            note: Some(error.to_string().chars().take(1000).collect()),
                            action: "Enforce".into(),
                            secondary: None,
                        };
                        if let Err(e) = recorder.publish(&ev, &reference).await {
                            warn!(error = %e, "cannot publish a Kubernetes Event");
                        }
                    });
                }
                (d.changes, d.services, source.synced())
            }
        };
        // Until every kind's first full list is in, the datapath keeps what it has (after a
        // restart: the previous agent's tables); a partial view could open too much.
        services.apply(service_changes);
        if !synced {
            compiler.apply(changes);
            continue;
        }
        let poll = manifest_source::Poll { changes, services: Vec::new(), errors: None };
        let had_changes = !poll.changes.is_empty();
        let change_count = poll.changes.len();
        let report = compiler.apply(poll.changes);
        for r in &report.rejected {
            warn!(object = %format!("{} {}", r.kind, r.key), error = %r, "invalid object skipped");
        }

        // Interfaces: when the endpoint set changed, and every second while some pod has
        // none (its veth may appear later), and every 5 s to follow moves.
        let missing = compiler.endpoints().any(|e| !interfaces.contains_key(&e.tables.pod));
        let since = last_resolve.elapsed();
        let mut iface_changed = false;
        if !report.added.is_empty()
            || !report.removed.is_empty()
            || !report.changed.is_empty()
            || (missing && since >= Duration::from_secs(1))
            || since >= Duration::from_secs(5)
        {
            let pods: Vec<(ObjectKey, Vec<IpAddr>)> =
                compiler.endpoints().map(|e| (e.tables.pod.clone(), e.tables.addresses.clone())).collect();
            let found = resolver.resolve(&pods).await;
            iface_changed = found != interfaces;
            interfaces = found;
            last_resolve = Instant::now();
            resolver.forget_others(&pods);
            if cfg.node_devices == NodeDevices::Detect {
                let devices = resolver.node_devices().await;
                if &devices != enforcer.node_devices() {
                    for e in enforcer.set_node_devices(&devices) {
                        error!(error = %e, "node device");
                    }
                    info!(devices = ?enforcer.node_devices(), "node devices");
                }
            }
        } else if missing && held_since.values().any(|t| t.elapsed() < FAST_RESOLVE_AFTER_HOLD) {
            // A new veth is held for a pod that awaits its interface: the CNI adds the
            // pod's route right after the veth, so look for the waiting pods' interfaces
            // every tick (only theirs: cheap), not once a second.
            let pods: Vec<(ObjectKey, Vec<IpAddr>)> = compiler
                .endpoints()
                .filter(|e| !interfaces.contains_key(&e.tables.pod))
                .map(|e| (e.tables.pod.clone(), e.tables.addresses.clone()))
                .collect();
            let found = resolver.resolve(&pods).await;
            iface_changed = !found.is_empty();
            interfaces.extend(found);
        }

        // New pods that a policy selects: until we know which veth is theirs, hold every
        // veth that belongs to no known pod fail-closed, so their first packet meets their
        // policy. Pods no policy selects are not delayed: then nothing is held.
        let waiting_selected = compiler
            .endpoints()
            .any(|e| !interfaces.contains_key(&e.tables.pod) && (e.tables.ingress.isolated || e.tables.egress.isolated));
        if waiting_selected {
            let known: std::collections::BTreeSet<u32> = interfaces.values().map(|i| i.ifindex).collect();
            for (ifindex, name) in resolver.pod_candidate_veths().await {
                if enforcer.node_devices().contains(&name) {
                    continue;
                }
                if !known.contains(&ifindex) && enforcer.held().all(|(i, _)| *i != ifindex) {
                    match enforcer.hold(&name, ifindex) {
                        Ok(()) => {
                            held_since.insert(ifindex, Instant::now());
                            info!(interface = %name, "holding a new interface fail-closed until its pod is known");
                        }
                        Err(e) => warn!(interface = %name, error = %e, "cannot hold a new interface"),
                    }
                }
            }
        } else if enforcer.held().next().is_some() {
            // Veths whose pod was just found stay held until the sync below has written
            // the pod's tables and attached its programs (which takes them over): releasing
            // them first would let packets through unjudged in between.
            let found: std::collections::BTreeSet<u32> = interfaces.values().map(|i| i.ifindex).collect();
            enforcer.release_held(&found);
        }
        held_since.retain(|i, _| enforcer.held().any(|(h, _)| h == i));

        // Service addresses whose egress waits for DNAT: the configured ranges, and every
        // Service whose endpoints are pods (they follow pods, so recompute on any change).
        let mut deferred = services.deferred(compiler.state());
        deferred.extend(cfg.service_cidrs.iter().copied());
        if deferred != last_deferred {
            let list: Vec<Prefix> = deferred.iter().copied().collect();
            match enforcer.set_services(&list) {
                Ok(()) => last_deferred = deferred,
                Err(e) => error!(error = %e, "cannot write the Service addresses"),
            }
        }

        if first || had_changes || iface_changed {
            let sync = enforcer.reconcile(&compiler, &|k| interfaces.get(k).cloned());
            for e in &sync.errors {
                error!(error = %e, "datapath sync");
            }
            if sync.endpoints_updated > 0 || !sync.errors.is_empty() {
                info!(
                    changed = report.changed.len() + report.added.len(),
                    removed = report.removed.len(),
                    written = sync.written_entries,
                    deleted = sync.deleted_entries,
                    "synced"
                );
            }
            let state = StateWriter { node: &cfg.node, compiler: &compiler, enforcer: &enforcer, interfaces: &interfaces };
            if let Err(e) = state.write(&cfg.state_file) {
                warn!(path = %cfg.state_file.display(), error = %e, "cannot write the state file");
            }
            let endpoint_count = compiler.endpoints().count();
            let fail_closed = compiler
                .endpoints()
                .filter(|e| matches!(enforcer.sync.status(&e.tables.pod), Some(crate::datapath::EndpointStatus::FailClosed { .. })))
                .count();
            let m = shared.metrics.lock().expect("metrics lock");
            m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            m.rejected_objects.set(compiler.rejected().count() as i64);
            m.endpoints.set(endpoint_count as i64);
            m.fail_closed_endpoints.set(fail_closed as i64);
            m.too_big_endpoints.set(enforcer.sync.too_big_count() as i64);
            m.map_write_errors.inner().store(enforcer.sync.write_errors, Ordering::Relaxed);
            let (peers, ports) = enforcer.sync.entry_counts();
            m.map_entries.get_or_create(&MapLabels { map: "peers".into() }).set(peers as i64);
            m.map_entries.get_or_create(&MapLabels { map: "ports".into() }).set(ports as i64);
            drop(m);
            if first || change_count >= BIG_BATCH {
                release_free_memory();
            }
            if first {
                shared.ready.store(true, Ordering::Relaxed);
                info!(endpoints = endpoint_count, "ready: first full sync done");
                first = false;
            }
        }

        if last_metrics.elapsed() >= Duration::from_secs(1) {
            update_traffic_metrics(&shared, &enforcer, &compiler, &mut last_counters);
            last_metrics = Instant::now();
        }
    }
    info!("stopping; the datapath stays pinned and enforcing");
    Ok(())
}

/// The state file's content ([`state::AgentState`]), serialized one endpoint at a time straight
/// to the file: with a hundred pods and their provenance it is megabytes of text, which
/// need not all be in memory at once.
struct StateWriter<'a> {
    node: &'a str,
    compiler: &'a NodeCompiler,
    enforcer: &'a Enforcer,
    interfaces: &'a BTreeMap<ObjectKey, PodInterface>,
}

impl StateWriter<'_> {
    fn endpoint(&self, ep: &policy_model::Endpoint) -> EndpointState {
        let mut s = EndpointState::from_view(&endpoint_view(ep));
        let pod = &ep.tables.pod;
        s.interface = self.interfaces.get(pod).map(|i| i.name.clone());
        if let Some((id, rev)) = self.enforcer.sync.id_and_revision(pod) {
            s.datapath_id = Some(id);
            s.datapath_revision = Some(rev);
        }
        if let Some(crate::datapath::EndpointStatus::FailClosed { error }) = self.enforcer.sync.status(pod) {
            s.fail_closed = Some(error.clone());
        }
        s
    }

    fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer(&mut out, self).map_err(std::io::Error::other)?;
        out.flush()?;
        drop(out);
        std::fs::rename(tmp, path)
    }
}

/// The same fields, in the same order, as [`state::AgentState`], which reads it back.
impl serde::Serialize for StateWriter<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Endpoints<'a, 'b>(&'a StateWriter<'b>);
        impl serde::Serialize for Endpoints<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.compiler.endpoints().map(|ep| self.0.endpoint(ep)))
            }
        }
        let mut st = serializer.serialize_struct("AgentState", 4)?;
        st.serialize_field("node", self.node)?;
        st.serialize_field("synced_at", &now_secs())?;
        st.serialize_field("endpoints", &Endpoints(self))?;
        st.serialize_field("rejected", &self.compiler.rejected().map(|r| r.to_string()).collect::<Vec<_>>())?;
        st.end()
    }
}

fn update_traffic_metrics(
    shared: &Shared,
    enforcer: &Enforcer,
    compiler: &NodeCompiler,
    last: &mut BTreeMap<(String, &'static str, &'static str), (u64, u64)>,
) {
    let m = shared.metrics.lock().expect("metrics lock");
    for ep in compiler.endpoints() {
        let pod = ep.tables.pod.to_string();
        let Some((id, _)) = enforcer.sync.id_and_revision(&ep.tables.pod) else { continue };
        let c = enforcer.datapath.counters(id);
        for (dir, counters) in [("ingress", c[0]), ("egress", c[1])] {
            for (verdict, packets, bytes) in
                [("allowed", counters.allowed_packets, counters.allowed_bytes), ("denied", counters.denied_packets, counters.denied_bytes)]
            {
                let key = (pod.clone(), dir, verdict);
                let (lp, lb) = last.get(&key).copied().unwrap_or((0, 0));
                let labels = TrafficLabels { pod: pod.clone(), direction: dir.into(), verdict: verdict.into() };
                // Counters only go up; a reset map (new endpoint id) starts again from 0.
                m.packets.get_or_create(&labels).inc_by(packets.saturating_sub(lp));
                m.bytes.get_or_create(&labels).inc_by(bytes.saturating_sub(lb));
                last.insert(key, (packets, bytes));
            }
        }
    }
}
