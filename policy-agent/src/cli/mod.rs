//! The command line: one module per subcommand.
//!
//! Exit codes: 0 success; 1 the output is complete but some objects were invalid and left
//! out (each named on stderr); 2 the command could not run (bad arguments, unreadable
//! directory); 3 internal inconsistency (compiled tables disagree with the reference
//! evaluator — a bug to report).

pub mod compile;
pub mod crd;
pub mod dump;
pub mod explain;
pub mod matrix;
pub mod observe;
pub mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use policy_model::ClusterState;

use crate::manifests::{ManifestError, Manifests};

#[derive(Debug, Parser)]
#[command(name = "policy-agent", version, about = "Kubernetes NetworkPolicy enforcement agent and its operator tools")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Reachability between every pair of pods in a manifest directory.
    Matrix(matrix::Args),
    /// Why one flow is allowed or blocked.
    Explain(explain::Args),
    /// The tables the agent would load for one node's pods.
    Compile(compile::Args),
    /// Run the node agent: enforce the cluster's policies on this node's pods.
    Run(run::Args),
    /// What the running agent enforces, read from the pinned maps.
    Dump(dump::Args),
    /// The flows the running agent's policies judged, with pod and policy names.
    Observe(observe::Args),
    /// A CustomResourceDefinition for ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2),
    /// for clusters without the upstream one.
    Crd(crd::Args),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

pub const EXIT_INVALID_OBJECTS: u8 = 1;
pub const EXIT_CANNOT_RUN: u8 = 2;
pub const EXIT_INCONSISTENT: u8 = 3;

/// A command's failure to run at all.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read manifests from {dir}: {source}")]
    Manifests { dir: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Usage(String),
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Matrix(a) => matrix::run(a),
        Command::Explain(a) => explain::run(a),
        Command::Compile(a) => compile::run(a),
        Command::Run(a) => run::run_agent(a),
        Command::Dump(a) => dump::run(a),
        Command::Observe(a) => observe::run(a),
        Command::Crd(a) => crd::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            note(&format!("error: {e}"));
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}

/// Writes one line to stderr. A reader of stderr that went away is not this command's
/// failure: unlike `eprintln!`, this never panics.
pub fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Reports the manifests' unusable objects, then warnings about usable ones (objects
/// defined twice, ClusterNetworkPolicy peers that fail closed, addresses two pods of
/// `state`, the cluster they make, claim), on stderr.
pub fn report(m: &Manifests, state: &ClusterState, errors: &[ManifestError]) {
    for e in errors {
        note(&format!("error: {e}"));
    }
    for w in m.warnings() {
        note(&format!("warning: {w}"));
    }
    for w in crate::manifests::contested_addresses(state) {
        note(&format!("warning: {w}"));
    }
}

/// Loads a manifest directory, reporting every unusable object on stderr.
pub fn load(dirs: &[PathBuf]) -> Result<(ClusterState, Vec<ManifestError>), CliError> {
    load_with_objects(dirs).map(|(_, state, errors)| (state, errors))
}

/// [`load`], keeping the objects as read too (Services, which the cluster state does not
/// hold).
pub fn load_with_objects(dirs: &[PathBuf]) -> Result<(Manifests, ClusterState, Vec<ManifestError>), CliError> {
    let m = Manifests::read_dirs(dirs).map_err(|(dir, source)| CliError::Manifests { dir, source })?;
    let (state, errors) = m.state();
    report(&m, &state, &errors);
    Ok((m, state, errors))
}

/// Writes a command's output to stdout. A reader that went away (`| head`) ends the
/// output quietly: that is not an error, and it must never be a panic.
pub fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Usage(format!("writing the output: {e}"))),
    }
}

/// `value` as pretty JSON, with a final newline, through [`emit`].
pub fn emit_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| CliError::Usage(format!("serializing the output: {e}")))?;
    s.push('\n');
    emit(&s)
}

pub fn exit_for(errors: &[ManifestError]) -> ExitCode {
    if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_INVALID_OBJECTS) }
}
