//! `conformance run [--family ipv4|ipv6|dual] [--probe-to service|pod]
//! [--topology routed|bridge] [--nodes 1|2] FILE...`: the upstream NetworkPolicy cases on
//! real traffic through the real agent. Ends with `N passed, M failed`; exits non-zero if
//! any case failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use conformance::case::Case;
use conformance::cluster::Families;
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

#[derive(Subcommand)]
enum Command {
    /// Run case files.
    Run {
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
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let Command::Run { family, probe_to, deadline, topology, nodes, files } = Cli::parse().command;
    let families = match family {
        FamilyArg::Ipv4 => Families::Ipv4,
        FamilyArg::Ipv6 => Families::Ipv6,
        FamilyArg::Dual => Families::Dual,
    };
    let opts = RunOptions { families, probe_to, deadline: Duration::from_secs(deadline), topology, nodes: usize::from(nodes) };
    let (mut passed, mut failed) = (0, 0);
    for f in &files {
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
