//! `policy-agent run`: keep this node's datapath equal to the cluster's policies.
//!
//! A loop that wakes on the poll interval (or at once when the source says it has news)
//! and runs one [`Reconciler`] step: the source's changes compiled incrementally, the
//! pods' interfaces found, unknown veths held, the maps synced, then the observers (state
//! file, metrics) told. Sources ([`source::Source`]) and observers
//! ([`observers::SyncObserver`]) plug in without the loop growing.

pub mod holds;
pub mod interfaces;
pub mod kube_source;
pub mod manifest_source;
pub mod metrics;
pub mod observers;
pub mod permissions;
pub mod reconciler;
pub mod services;
pub mod source;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use policy_model::Prefix;
use tracing::{error, info};

use crate::datapath::{Enforcer, MapSizes};
use interfaces::InterfaceResolver;
use manifest_source::ManifestSource;
use metrics::Shared;
use observers::{FlowNames, StateFile, SyncMetrics, SyncObserver};
use reconciler::Reconciler;
use source::Source;

/// Where the cluster's objects come from.
pub enum SourceConfig {
    /// Directories of YAML, re-read when they change.
    Manifests(Vec<PathBuf>),
    /// The Kubernetes API.
    Kubernetes(kube::Client),
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
    /// The longest a veth that may be an unknown pod's is held fail-closed ([`holds`]).
    pub max_hold: Duration,
    /// Flow events, the flow log and the observe socket.
    pub flows: crate::flows::FlowOptions,
    /// `--enforcement audit`: every policy of the node (NetworkPolicies and
    /// ClusterNetworkPolicies) is audited: evaluated and reported, never enforced.
    pub audit_all: bool,
}

/// Runs until `shutdown` resolves. The pins stay: enforcement goes on without the agent,
/// and the next agent picks it up.
/// Records one pass of the loop; a pass over a second is worth a line in the log, since
/// every other change waited that long.
fn observe_step(shared: &Shared, took: std::time::Duration) {
    let secs = took.as_secs_f64();
    if let Ok(m) = shared.metrics.lock() {
        m.loop_step_seconds.observe(secs);
        if secs > m.loop_step_max_seconds.get() {
            m.loop_step_max_seconds.set(secs);
        }
    }
    if secs > 1.0 {
        tracing::warn!(seconds = secs, "the control loop was busy for over a second (other changes waited)");
    }
}

/// The flow events' reader (named flows to the log, the metrics and the in-memory ring)
/// and the observe socket.
fn start_flows(opts: &crate::flows::FlowOptions, flows: &crate::flows::Flows, enforcer: &Enforcer, shared: &Shared) -> anyhow::Result<()> {
    use crate::flows::{log::FlowLog, reader, socket};
    let pin = enforcer.datapath.flows_pin();
    let ring = reader::open(&pin)?;
    let log = match &opts.log {
        Some(target) => {
            Some(FlowLog::open(target.clone(), opts.log_max_bytes).with_context(|| format!("opening the flow log {target:?}"))?)
        }
        None => None,
    };
    let (f, s) = (flows.clone(), shared.clone());
    tokio::spawn(async move {
        if let Err(e) = reader::run(ring, f, log, move |batch| s.count_flows(batch)).await {
            error!(error = %e, "flow events reader stopped");
        }
    });
    if let Some(path) = opts.socket.clone() {
        let hub = flows.hub.clone();
        tokio::spawn(async move {
            if let Err(e) = socket::serve(&path, hub).await {
                error!(path = %path.display(), error = %e, "observe socket failed");
            }
        });
    }
    info!(events = ?opts.events, log = ?opts.log, socket = ?opts.socket, "flow events");
    Ok(())
}

pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let shared = Shared::new();
    if let Some(addr) = cfg.metrics_addr {
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, s).await {
                error!(%addr, error = %e, "metrics server failed");
            }
        });
    }
    let mut enforcer = Enforcer::with_flows(&cfg.pin_dir, cfg.sizes, cfg.flows.events)
        .with_context(|| format!("loading the datapath (pins in {})", cfg.pin_dir.display()))?;
    let flows = crate::flows::Flows::new(&cfg.node, cfg.flows.ring);
    start_flows(&cfg.flows, &flows, &enforcer, &shared)?;
    enforcer.set_services(&cfg.service_cidrs).map_err(anyhow::Error::msg).context("writing the Service prefixes")?;
    if let NodeDevices::Fixed(names) = &cfg.node_devices {
        // Exactly these: links an earlier agent pinned on other devices are detached too.
        if let Some(e) = enforcer.set_node_devices(&names.iter().cloned().collect()).into_iter().next() {
            return Err(anyhow::Error::new(e).context("attaching to the node's devices"));
        }
    }
    let resolver = InterfaceResolver::new().context("opening rtnetlink")?;
    let initial_veths = resolver.pod_candidate_veths().await.into_keys().collect();
    let mut source: Box<dyn Source> = match cfg.source {
        SourceConfig::Manifests(dirs) => Box::new(source::Manifests::new(ManifestSource::new(dirs))),
        SourceConfig::Kubernetes(client) => Box::new(source::Kubernetes::start(client, &cfg.node)),
    };
    let observers: Vec<Box<dyn SyncObserver>> = vec![
        Box::new(StateFile { path: cfg.state_file.clone() }),
        Box::new(SyncMetrics { shared: shared.clone() }),
        Box::new(FlowNames { flows: flows.clone(), shared: shared.clone() }),
    ];
    let parts = reconciler::Parts {
        node: cfg.node.clone(),
        service_cidrs: cfg.service_cidrs.clone(),
        node_devices: cfg.node_devices.clone(),
        enforcer,
        resolver,
        max_hold: cfg.max_hold,
        shared,
        observers,
        flows: Some(flows),
        audit_all: cfg.audit_all,
    };
    let step_metrics = parts.shared.clone();
    let mut reconciler = Reconciler::new(parts, initial_veths);
    info!(node = %cfg.node, pin_dir = %cfg.pin_dir.display(), enforcement = if cfg.audit_all { "audit" } else { "enforce" }, "agent started");

    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A source that reports its changes at once (a manifest directory) is applied without
    // waiting for the tick.
    let wake = source.wake();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async {
                match &wake {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = &mut shutdown => break,
        }
        let started = std::time::Instant::now();
        reconciler.step(source.as_mut()).await;
        observe_step(&step_metrics, started.elapsed());
    }
    info!("stopping; the datapath stays pinned and enforcing");
    Ok(())
}
