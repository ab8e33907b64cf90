//! `policy-agent crd`: the ClusterNetworkPolicy CustomResourceDefinition (YAML, or JSON
//! with `-o json`), ready for `kubectl apply -f -`.

use std::process::ExitCode;

use super::{CliError, OutputFormat};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let crd = crate::crd::crd();
    match args.output {
        OutputFormat::Text => {
            let yaml = serde_yaml_ng::to_string(&crd).map_err(|e| CliError::Usage(format!("serializing the CRD: {e}")))?;
            super::emit(&yaml)?
        }
        OutputFormat::Json => super::emit_json(&crd)?,
    }
    Ok(ExitCode::SUCCESS)
}
