//! `policy-agent run`: the node agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use policy_model::Prefix;

use super::CliError;
use crate::agent::{AgentConfig, run};
use crate::datapath::{MapSizes, PIN_ROOT};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Enforce from this directory of Kubernetes YAML (re-read when it changes) instead of
    /// the Kubernetes API. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub manifests: Vec<PathBuf>,
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
    /// Node devices (uplinks, tunnels, bridges) that get the post-DNAT egress check.
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
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

pub fn run_agent(args: Args) -> Result<ExitCode, CliError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
    if args.manifests.is_empty() {
        return Err(CliError::Usage(
            "--manifests DIR is required: this build enforces from manifest directories (the Kubernetes API source is not in it yet)"
                .into(),
        ));
    }
    let cfg = AgentConfig {
        node: args.node_name,
        manifests: args.manifests,
        pin_dir: args.pin_dir,
        state_file: args.state_file,
        metrics_addr: args.metrics_addr,
        service_cidrs: args.service_cidrs,
        node_devices: args.node_devices,
        sizes: MapSizes { peer_entries: args.max_peer_entries, conntrack: args.max_connections, ..MapSizes::default() },
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
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
