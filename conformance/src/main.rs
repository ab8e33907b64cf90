//! `conformance run [--family ipv4|ipv6|dual] [--probe-to service|pod] FILE...`: the
//! upstream NetworkPolicy cases on real traffic through the real agent.
//! `conformance fuzz --seed S --cases N [--family ..] [--out DIR]`: random cases with the
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
        #[arg(long, value_enum, default_value = "ipv4")]
        family: FamilyArg,
        #[arg(long, value_enum, default_value = "service")]
        probe_to: ProbeTo,
        #[arg(long, default_value_t = 10)]
        deadline: u64,
        /// Where failing cases are written.
        #[arg(long, default_value = "target/fuzz-failures")]
        out: PathBuf,
        /// Write every generated case to --out and run none (no root needed).
        #[arg(long)]
        emit: bool,
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
        Command::Run { family, probe_to, deadline, files } => {
            run(RunOptions { families: families(family), probe_to, deadline: Duration::from_secs(deadline) }, &files)
        }
        Command::Fuzz { seed, cases, start, family, probe_to, deadline, out, emit } => {
            let opts = RunOptions { families: families(family), probe_to, deadline: Duration::from_secs(deadline) };
            let run = FuzzRun { seed, indices: start..start + cases, out, emit };
            let (passed, failed) = run_fuzz(&run, opts, run_case);
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
