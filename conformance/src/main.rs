//! `conformance run [--family ipv4|ipv6|dual] [--probe-to service|pod]
//! [--topology routed|bridge] [--nodes 1|2] FILE...`: the upstream NetworkPolicy cases on
//! real traffic through the real agent.
//! `conformance fuzz --seed S --cases N [same options] [--out DIR]`: random cases with the
//! reference evaluator's expectations; each disagreement is written as a case file.
//! Both end with `N passed, M failed` and exit non-zero if any case failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use conformance::case::Case;
use conformance::cluster::Families;
use conformance::fuzz::{FuzzRun, run_fuzz};
use conformance::runner::{ProbeTo, RunOptions, run_case};
use conformance::topology::Topology;

#[derive(Parser)]
#[command(name = "conformance", about = "Upstream NetworkPolicy conformance cases on real traffic")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    Ipv4,
    Ipv6,
    Dual,
}

/// The emulated cluster and how probes run.
#[derive(clap::Args)]
struct ClusterArgs {
    #[arg(long, value_enum, default_value = "ipv4")]
    family: FamilyArg,
    #[arg(long, value_enum, default_value = "service")]
    probe_to: ProbeTo,
    /// Seconds a probe may take to match (upstream polls for 10).
    #[arg(long, default_value_t = 10)]
    deadline: u64,
    /// routed: a route per pod to its veth; bridge: the veths are ports of a bridge.
    #[arg(long, value_enum, default_value = "routed")]
    topology: Topology,
    /// Nodes the pods are spread over, one agent each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    nodes: u8,
}

impl ClusterArgs {
    fn options(&self) -> RunOptions {
        RunOptions {
            families: families(self.family),
            probe_to: self.probe_to,
            deadline: Duration::from_secs(self.deadline),
            topology: self.topology,
            nodes: usize::from(self.nodes),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run case files.
    Run {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Generate random cases (seeded), run them, write each failing one as a case file.
    Fuzz {
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 20)]
        cases: u64,
        /// Index of the first case (case i of a seed is the same whatever runs before it).
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Where failing cases are written.
        #[arg(long, default_value = "target/fuzz-failures")]
        out: PathBuf,
        /// Write every generated case to --out and run none (no root needed).
        #[arg(long)]
        emit: bool,
        /// Mix ClusterNetworkPolicies into the cases (`fuzz-cnp-*`: other cases than
        /// without it, for the same seed).
        #[arg(long)]
        cluster_policies: bool,
    },
}

fn families(family: FamilyArg) -> Families {
    match family {
        FamilyArg::Ipv4 => Families::Ipv4,
        FamilyArg::Ipv6 => Families::Ipv6,
        FamilyArg::Dual => Families::Dual,
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { cluster, files } => run(cluster.options(), &files),
        Command::Fuzz { seed, cases, start, cluster, out, emit, cluster_policies } => {
            let run = FuzzRun { seed, indices: start..start + cases, out, emit, cluster_policies };
            let (passed, failed) = run_fuzz(&run, cluster.options(), run_case);
            println!("{passed} passed, {failed} failed");
            if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}

fn run(opts: RunOptions, files: &[PathBuf]) -> ExitCode {
    let (mut passed, mut failed) = (0, 0);
    for f in files {
        let case = match Case::load(f) {
            Ok(c) => c,
            Err(e) => {
                println!("FAIL {}: {e}", f.display());
                failed += 1;
                continue;
            }
        };
        match run_case(&case, opts) {
            Ok(o) if o.passed() => {
                println!("PASS {}", case.name);
                passed += 1;
            }
            Ok(o) => {
                println!("FAIL {} ({})\n{}", case.name, f.display(), o.report());
                failed += 1;
            }
            Err(e) => {
                println!("FAIL {} ({}): setup: {e}", case.name, f.display());
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
