//! The command line: argument parsing and dispatch to one module per
//! subcommand. Owns exit codes and how errors are printed; it must not hold
//! any logic of its own beyond that.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod client;
pub mod compute;
pub mod demo;
pub mod finish;
pub mod plot;
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
    Compute(compute::ComputeArgs),
    /// A live demonstration: an in-process daemon and a synthetic run whose
    /// features collapse epoch by epoch.
    Demo(demo::DemoArgs),
    /// List the runs of a running daemon.
    Runs(client::RunsArgs),
    /// Show the epoch results (metrics) of one run.
    History(client::HistoryArgs),
    /// Delete a run of a running daemon: its open epochs, history and
    /// exported series (no prompt, no undo).
    Delete(client::DeleteArgs),
    /// Mark a run finished: it keeps its history and series, takes no more
    /// pushes, and the stall alert ignores it.
    Finish(finish::FinishArgs),
    /// Draw one metric of a run over epochs into an SVG or PNG file.
    Plot(plot::PlotArgs),
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
        Command::Finish(args) => finish::run(args),
        Command::Plot(args) => plot::run(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vcid: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
