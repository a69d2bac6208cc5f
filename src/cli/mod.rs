//! The command line: argument parsing and dispatch to one module per
//! subcommand. Owns exit codes and how errors are printed; it must not hold
//! any logic of its own beyond that.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod client;
pub mod compute;
pub mod demo;
pub mod serve;
pub mod synthetic;

/// Why a subcommand stopped.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input (a file, an argument): exit status 2.
    #[error("{0}")]
    Input(String),
    /// Anything else that stopped the command: exit status 1.
    #[error("{0}")]
    Failed(String),
}

/// Writes a command's output to stdout. A reader that went away
/// (`vcid history RUN | head`) is not an error: it has what it wanted, so
/// the command ends quietly with status 0, as ripgrep does.
pub(crate) fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Failed(format!(
            "cannot write the output to stdout: {err}"
        ))),
        _ => Ok(()),
    }
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "vcid",
    version,
    about = "Watch neural collapse while a model trains"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: gRPC ingest, Prometheus /metrics, durable history.
    Serve(serve::ServeArgs),
    /// Compute VCI and companion metrics of saved features (.npy) offline.
    ///
    /// Every metric, its range, direction and the cases where it is
    /// undefined are described in docs/metrics.md of the vcid repository.
    Compute(compute::ComputeArgs),
    /// A live demonstration: an in-process daemon and a synthetic run whose
    /// features collapse epoch by epoch.
    Demo(demo::DemoArgs),
    /// List the runs of a running daemon.
    Runs(client::RunsArgs),
    /// Show the epoch results (metrics) of one run.
    ///
    /// The metrics and their columns are described in docs/metrics.md of
    /// the vcid repository.
    History(client::HistoryArgs),
    /// Delete a run of a running daemon: its open epochs, history and
    /// exported series (no prompt, no undo).
    Delete(client::DeleteArgs),
}

/// Parses the command line, runs the subcommand and maps its outcome to an
/// exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Compute(args) => compute::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Runs(args) => client::runs(args),
        Command::History(args) => client::history(args),
        Command::Delete(args) => client::delete(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vcid: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
