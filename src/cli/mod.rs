//! The command line: argument parsing and dispatch to one module per
//! subcommand. Owns exit codes and how errors are printed; it must not hold
//! any logic of its own beyond that. [`run`] is the whole command for a
//! given argv, so the `vcid` binary and the Python package's `vcid` command
//! (which calls it through the extension module) behave the same.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod client;
pub mod compute;
pub mod demo;
pub mod serve;
pub mod stop;
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
    /// Stop the daemon that serves a data directory (by default the one a
    /// Python `vcid.Monitor` starts by itself): SIGTERM, then wait for its
    /// graceful shutdown.
    Stop(stop::StopArgs),
}

/// The `vcid` binary: [`run`] with the process's arguments.
pub fn main() -> ExitCode {
    ExitCode::from(run(std::env::args_os()))
}

/// Parses `args` (the program name first), runs the subcommand and returns
/// its exit status: 0 on success, 2 for bad input or a usage error, 1 for
/// anything else. Help and version requests print and return 0.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout; usage errors to stderr.
            let _ = err.print();
            return u8::try_from(err.exit_code()).unwrap_or(2);
        }
    };
    let outcome = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Compute(args) => compute::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Runs(args) => client::runs(args),
        Command::History(args) => client::history(args),
        Command::Delete(args) => client::delete(args),
        Command::Stop(args) => stop::run(args),
    };
    match outcome {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("vcid: error: {err}");
            err.exit_code()
        }
    }
}
