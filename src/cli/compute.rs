//! `vcid compute`: offline metrics of saved features (being written by the math helper).

use super::CliError;

/// Arguments of `vcid compute`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {}

/// Runs `vcid compute`.
pub fn run(_args: ComputeArgs) -> Result<(), CliError> {
    Err(CliError::Failed("vcid compute is being written".into()))
}
