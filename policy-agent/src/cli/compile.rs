//! `policy-agent compile`: the tables one node's pods get.

use std::path::PathBuf;
use std::process::ExitCode;

use policy_model::NodeCompiler;

use super::{CliError, OutputFormat, exit_for};
use crate::manifests::Manifests;
use crate::tables_view::{NodeView, endpoint_view};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of Kubernetes YAML or JSON (Namespaces, Pods with status.podIPs, Nodes,
    /// NetworkPolicies, ClusterNetworkPolicies, Services, EndpointSlices), read
    /// recursively; repeat to combine directories.
    #[arg(long, required = true, value_name = "DIR")]
    pub manifests: Vec<PathBuf>,
    /// The node whose pods (spec.nodeName) to compile.
    #[arg(long)]
    pub node: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// As `run --enforcement`: `audit` compiles for a node that audits every policy (the
    /// enforced tables allow everything; the audit tables hold the policies).
    #[arg(long, value_enum, default_value_t)]
    pub enforcement: super::run::NodeEnforcement,
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let m = Manifests::read_dirs(&args.manifests).map_err(|(dir, source)| CliError::Manifests { dir, source })?;
    let (changes, errors) = m.changes();
    let mut compiler = NodeCompiler::new(args.node.clone());
    compiler.set_audit_all(args.enforcement == super::run::NodeEnforcement::Audit);
    compiler.apply(changes);
    super::report(&m, compiler.state(), &errors);
    let view = NodeView { node: args.node, endpoints: compiler.endpoints().map(endpoint_view).collect() };
    match args.output {
        OutputFormat::Text => super::emit(&view.render_text())?,
        OutputFormat::Json => super::emit_json(&view)?,
    }
    Ok(exit_for(&errors))
}
