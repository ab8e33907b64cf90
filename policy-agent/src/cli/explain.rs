//! `policy-agent explain`: why one flow is allowed or blocked.

use std::path::PathBuf;
use std::process::ExitCode;

use policy_model::IpProtocol;

use super::{CliError, OutputFormat, exit_for, load_with_objects};
use crate::explain::{Party, explain, explain_node_port};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of Kubernetes YAML or JSON (Namespaces, Pods with status.podIPs, Nodes,
    /// NetworkPolicies, ClusterNetworkPolicies, Services, EndpointSlices), read
    /// recursively; repeat to combine directories.
    #[arg(long, required = true, value_name = "DIR")]
    pub manifests: Vec<PathBuf>,
    /// The client: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub from: Party,
    /// The server: NAMESPACE/POD or an IP address.
    #[arg(long, required_unless_present = "node_port", conflicts_with = "node_port")]
    pub to: Option<Party>,
    /// Destination port.
    #[arg(long, default_value_t = 0, conflicts_with = "node_port")]
    pub port: u16,
    /// Instead of --to/--port: the client connects to this NodePort (of the Service
    /// that has it for --protocol, from the manifests' Services). Each backend is judged
    /// on its target port, by the client's own address, as the datapath does whatever
    /// kube-proxy's masquerade does.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub node_port: Option<u16>,
    /// With --node-port: the node the client connects to. Backends on other nodes are
    /// then reached as kube-proxy sends them: not at all with externalTrafficPolicy
    /// Local, masqueraded to that node's address with Cluster (and judged as it). Without
    /// it, each backend is reached through its own node.
    #[arg(long, value_name = "NODE", requires = "node_port")]
    pub via_node: Option<String>,
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
    if args.via_node.is_some() && args.node_port.is_none() {
        // clap's `requires` does not hold against `--to`'s conflict: said here.
        return Err(CliError::Usage("--via-node goes with --node-port".into()));
    }
    let (objects, mut state, errors) = load_with_objects(&args.manifests)?;
    state.set_audit_all(args.enforcement == super::run::NodeEnforcement::Audit);
    let Some(to) = &args.to else {
        let node_port = args.node_port.expect("clap: --to or --node-port");
        if !args.protocol.has_ports() {
            return Err(CliError::Usage(format!("--node-port needs TCP, UDP or SCTP, not {}", args.protocol)));
        }
        let np = crate::node_port::resolve(&objects, &state, node_port, args.protocol).map_err(|e| CliError::Usage(e.to_string()))?;
        let e = explain_node_port(&state, &args.from, np, args.protocol, args.via_node.as_deref())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        match args.output {
            OutputFormat::Text => super::emit(&e.render_text())?,
            OutputFormat::Json => super::emit_json(&e)?,
        }
        return Ok(exit_for(&errors));
    };
    if args.protocol.has_ports() && args.port == 0 {
        return Err(CliError::Usage(format!("--port is required for {}", args.protocol)));
    }
    let e = explain(&state, &args.from, to, args.protocol, args.port).map_err(|e| CliError::Usage(e.to_string()))?;
    match args.output {
        OutputFormat::Text => super::emit(&e.render_text())?,
        OutputFormat::Json => super::emit_json(&e)?,
    }
    Ok(exit_for(&errors))
}
