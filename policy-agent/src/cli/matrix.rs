//! `policy-agent matrix`: the verdict for every ordered pair of pods.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{CliError, EXIT_INCONSISTENT, OutputFormat, exit_for, load};
use crate::matrix::{Probe, compute, default_probes};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of Kubernetes YAML or JSON (Namespaces, Pods with status.podIPs, Nodes,
    /// NetworkPolicies, ClusterNetworkPolicies, Services, EndpointSlices), read
    /// recursively; repeat to combine directories.
    #[arg(long, required = true, value_name = "DIR")]
    pub manifests: Vec<PathBuf>,
    /// PORT/PROTOCOL to judge, repeatable (default: 80 and 81 over TCP, UDP and SCTP).
    #[arg(long = "port", value_name = "PORT/PROTO")]
    pub ports: Vec<Probe>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// As `run --enforcement`: `audit` gives the verdicts of a node that audits every
    /// policy (what it enforces: everything is allowed).
    #[arg(long, value_enum, default_value_t)]
    pub enforcement: super::run::NodeEnforcement,
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let (mut state, errors) = load(&args.manifests)?;
    state.set_audit_all(args.enforcement == super::run::NodeEnforcement::Audit);
    let mut probes = if args.ports.is_empty() { default_probes() } else { args.ports };
    // A port given twice is one table (and one set of results), in the order first given.
    let mut seen = std::collections::HashSet::new();
    probes.retain(|p| seen.insert(*p));
    let m = compute(&state, &probes, None);
    match args.output {
        OutputFormat::Text => super::emit(&m.render_text())?,
        OutputFormat::Json => super::emit_json(&m)?,
    }
    if !m.disagreements.is_empty() {
        for d in &m.disagreements {
            super::note(&format!("internal error: {d}"));
        }
        return Ok(ExitCode::from(EXIT_INCONSISTENT));
    }
    Ok(exit_for(&errors))
}
