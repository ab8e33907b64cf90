//! `policy-agent run`: the node agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use policy_model::Prefix;

use super::CliError;
use crate::agent::{AgentConfig, NodeDevices, SourceConfig, run};
use crate::datapath::{FlowConfig, MapSizes, PIN_ROOT};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `--enforcement`: what the node does with its policies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeEnforcement {
    /// Enforce every policy, except those annotated `policy-agent.io/enforcement: audit`
    /// (or in a Namespace so annotated).
    #[default]
    Enforce,
    /// Enforce nothing: every NetworkPolicy and ClusterNetworkPolicy is audited (flows they
    /// would deny pass, and are reported with verdict `audit`).
    Audit,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Enforce from this directory of Kubernetes YAML (re-read when it changes) instead of
    /// the Kubernetes API. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub manifests: Vec<PathBuf>,
    /// The Kubernetes API through this kubeconfig (default: in-cluster configuration, or
    /// $KUBECONFIG / ~/.kube/config).
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// The node whose pods (spec.nodeName) this agent enforces.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where programs, links and maps are pinned (on bpffs).
    #[arg(long, default_value = PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// Where the agent publishes what it enforces, for `dump`.
    #[arg(long, default_value = crate::agent::state::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:9090).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Service ClusterIP ranges (repeatable): egress toward them is judged after DNAT,
    /// against the backend.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<Prefix>,
    /// Node devices (uplinks, tunnels) that get the post-DNAT egress check of Service
    /// traffic leaving the node (repeatable). Default: detected, and followed as devices
    /// come and go (every Ethernet device that is up, except loopback, bridges and their
    /// ports, and pods' veths). `none`: no device.
    #[arg(long = "node-device", value_name = "IFNAME")]
    pub node_devices: Vec<String>,
    /// How often sources are polled and changes applied, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub poll_interval_ms: u64,
    /// Capacity of the peer table (all local pods together).
    #[arg(long, default_value_t = policy_ebpf::DEFAULT_MAX_PEER_ENTRIES)]
    pub max_peer_entries: u32,
    /// Capacity of connection tracking.
    #[arg(long, default_value_t = policy_ebpf::DEFAULT_MAX_CONNTRACK)]
    pub max_connections: u32,
    /// The longest a new veth that may belong to a pod the agent does not know yet (during
    /// an API outage, before the first full list, or while a selected pod awaits its
    /// interface) is held fail-closed, in seconds. After that it is released, with a
    /// warning, and its traffic passes unjudged until its pod is known.
    #[arg(long, default_value_t = crate::agent::holds::DEFAULT_MAX_HOLD.as_secs())]
    pub max_hold_seconds: u64,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Which new flows the kernel reports: `denied` (default), `sampled:N` (denied ones and
    /// one allowed flow in N), `all`, or `none`.
    #[arg(long, default_value = "denied", value_parser = FlowConfig::parse)]
    pub flow_events: FlowConfig,
    /// The most flow events per second on this node (a per-CPU share each); what is over
    /// is counted (`policy_agent_flow_events_suppressed_total`), never delays a packet.
    #[arg(long, default_value_t = crate::datapath::DEFAULT_FLOW_RATE)]
    pub flow_event_rate: u32,
    /// Write every named flow as a JSON line to `stdout` or to this file (rotated to
    /// FILE.1 at --flow-log-max-bytes).
    #[arg(long, value_name = "stdout|FILE")]
    pub flow_log: Option<crate::flows::log::LogTarget>,
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    pub flow_log_max_bytes: u64,
    /// Serve the last flows and new ones to `policy-agent observe` on this unix socket
    /// (`none`: no socket).
    #[arg(long, default_value = crate::flows::DEFAULT_OBSERVE_SOCKET)]
    pub observe_socket: PathBuf,
    /// Flows kept in memory for `observe`.
    #[arg(long, default_value_t = crate::flows::DEFAULT_RING)]
    pub flow_ring: usize,
    /// `audit`: this node enforces no policy (NetworkPolicies and ClusterNetworkPolicies);
    /// flows they would deny pass and are reported with verdict `audit`. `enforce`
    /// (default): policies annotated `policy-agent.io/enforcement: audit`, or in a
    /// Namespace so annotated, are audited; the rest are enforced.
    #[arg(long, value_enum, default_value_t)]
    pub enforcement: NodeEnforcement,
}

/// One malloc arena for the whole process. glibc gives each thread that allocates its own
/// arena; the watchers decode on the runtime's workers and the model keeps what they
/// decoded on another thread, so freed pages end up scattered over several arenas that
/// each keep their own. Measured with `bench_agent --source api` at 10,000 pods (debug
/// build): VmRSS 82.7 -> 74.3 MiB. The agent's threads seldom allocate at the same time.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers; called before any other thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

pub fn run_agent(args: Args) -> Result<ExitCode, CliError> {
    limit_malloc_arenas();
    // kube's HTTP layer logs every failed request at ERROR (`kube_client::client::builder`:
    // "failed with error ..."), its client every cut watch at WARN ("eof in poll"), and its
    // watcher every 403 at WARN: during an API outage that is a line per retry. The agent
    // reports outages itself (kube_source), once each.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_client=error,kube_client::client::builder=off,kube_runtime::watcher=error")
    });
    match args.log_format {
        // Colour only on a terminal: a log file or a pod's log must hold no ANSI codes.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| CliError::Usage(e.to_string()))?;
    let source = if args.manifests.is_empty() {
        let client = rt.block_on(kube_client(args.kubeconfig.as_deref())).map_err(CliError::Usage)?;
        SourceConfig::Kubernetes(client)
    } else {
        SourceConfig::Manifests(args.manifests)
    };
    let cfg = AgentConfig {
        node: args.node_name,
        source,
        pin_dir: args.pin_dir,
        state_file: args.state_file,
        metrics_addr: args.metrics_addr,
        service_cidrs: args.service_cidrs,
        node_devices: match args.node_devices.as_slice() {
            [] => NodeDevices::Detect,
            [none] if none == "none" => NodeDevices::Fixed(Vec::new()),
            list => NodeDevices::Fixed(list.to_vec()),
        },
        sizes: MapSizes { peer_entries: args.max_peer_entries, conntrack: args.max_connections, ..MapSizes::default() },
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
        max_hold: Duration::from_secs(args.max_hold_seconds),
        flows: crate::flows::FlowOptions {
            events: FlowConfig { rate_per_node: args.flow_event_rate, ..args.flow_events },
            log: args.flow_log,
            log_max_bytes: args.flow_log_max_bytes,
            socket: (args.observe_socket.as_os_str() != "none").then_some(args.observe_socket),
            ring: args.flow_ring,
        },
        audit_all: args.enforcement == NodeEnforcement::Audit,
    };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| CliError::Usage(e.to_string()))?;
    let result = rt.block_on(run(cfg, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            Ok(ExitCode::from(super::EXIT_CANNOT_RUN))
        }
    }
}

/// A client from a kubeconfig file, or inferred (in-cluster, then $KUBECONFIG/~/.kube/config).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}; use --manifests DIR to run without a cluster")
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}
