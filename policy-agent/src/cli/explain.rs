//! `policy-agent explain`: why one flow is allowed or blocked.

use std::path::PathBuf;
use std::process::ExitCode;

use policy_model::IpProtocol;

use super::{CliError, OutputFormat, exit_for, load};
use crate::explain::{Party, explain};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of Kubernetes YAML (Namespaces, Pods with status.podIPs, Nodes,
    /// NetworkPolicies), read recursively; repeat to combine directories.
    #[arg(long, required = true, value_name = "DIR")]
    pub manifests: Vec<PathBuf>,
    /// The client: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub from: Party,
    /// The server: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub to: Party,
    /// Destination port.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or an IP protocol number.
    #[arg(long, default_value = "TCP")]
    pub protocol: IpProtocol,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// As `run --enforcement`: `audit` explains for a node that audits every policy.
    #[arg(long, value_enum, default_value_t)]
    pub enforcement: super::run::NodeEnforcement,
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let (mut state, errors) = load(&args.manifests)?;
    state.set_audit_all(args.enforcement == super::run::NodeEnforcement::Audit);
    if args.protocol.has_ports() && args.port == 0 {
        return Err(CliError::Usage(format!("--port is required for {}", args.protocol)));
    }
    let e = explain(&state, &args.from, &args.to, args.protocol, args.port).map_err(|e| CliError::Usage(e.to_string()))?;
    match args.output {
        OutputFormat::Text => super::emit(&e.render_text())?,
        OutputFormat::Json => super::emit_json(&e)?,
    }
    Ok(exit_for(&errors))
}
