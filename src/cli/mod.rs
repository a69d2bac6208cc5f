//! The command line: argument parsing and dispatch to one module per
//! subcommand. Owns exit codes and how errors are printed; it must not hold
//! any logic of its own beyond that. Only [`main`] and [`run`] are public:
//! [`run`] is the whole command for a given argv, so the `vcid` binary and
//! the Python package's `vcid` command (which calls it through the
//! extension module) behave the same; the subcommands are not a library.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::auth::BearerToken;

mod client;
mod compute;
mod demo;
mod finish;
mod plot;
mod serve;
mod stop;

/// Why a subcommand stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The command line itself is wrong, or help or the version was asked
    /// for: clap prints it and picks the exit status (2, or 0 for help).
    #[error(transparent)]
    Usage(#[from] clap::Error),
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
            CliError::Usage(_) | CliError::Input(_) => 2,
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
    /// Mark a run finished: it keeps its history and series, takes no more
    /// pushes, and the stall alert ignores it.
    Finish(finish::FinishArgs),
    /// Draw one metric of a run over epochs into an SVG or PNG file.
    Plot(plot::PlotArgs),
    /// Stop the daemon that serves a data directory (by default the one a
    /// Python `vcid.Monitor` starts by itself): SIGTERM, then wait for its
    /// graceful shutdown.
    Stop(stop::StopArgs),
}

/// Parses a command line (program name first). `vcid serve --config FILE`
/// is parsed twice: the second time with the file's settings as the
/// arguments' defaults, so flags and environment variables still win over
/// the file, and every value, wherever it came from, goes through the same
/// clap parser.
fn parse(args: &[OsString]) -> Result<Cli, CliError> {
    let cli = Cli::try_parse_from(args)?;
    let Command::Serve(serve::ServeArgs {
        config: Some(path), ..
    }) = &cli.command
    else {
        return Ok(cli);
    };
    let command = Cli::command();
    let defaults = match command.find_subcommand("serve") {
        Some(serve) => serve::file_defaults(serve, path)?,
        None => return Ok(cli),
    };
    let command = command.mut_subcommand("serve", |serve| serve::with_defaults(serve, &defaults));
    Ok(Cli::from_arg_matches(&command.try_get_matches_from(args)?)?)
}

/// Reads `--auth-token-file`: the daemon's and the clients' alike.
fn read_token(path: &Path) -> Result<BearerToken, CliError> {
    BearerToken::read_file(path)
        .map_err(|err| CliError::Input(format!("--auth-token-file {}: {err}", path.display())))
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
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let outcome = parse(&args).and_then(|cli| match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Compute(args) => compute::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Runs(args) => client::runs(args),
        Command::History(args) => client::history(args),
        Command::Delete(args) => client::delete(args),
        Command::Finish(args) => finish::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Stop(args) => stop::run(args),
    });
    match outcome {
        Ok(()) => 0,
        Err(CliError::Usage(err)) => {
            // Help and version go to stdout, usage errors to stderr.
            let _ = err.print();
            u8::try_from(err.exit_code()).unwrap_or(2)
        }
        Err(err) => {
            eprintln!("vcid: error: {err}");
            err.exit_code()
        }
    }
}
