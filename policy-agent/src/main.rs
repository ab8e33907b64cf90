use std::process::ExitCode;

use clap::Parser;
use policy_agent::cli::{Cli, run};

fn main() -> ExitCode {
    run(Cli::parse())
}
