//! `vcid serve`: the daemon's command line. One settings struct,
//! [`ServeArgs`], is filled by clap from flags, `VCID_*` environment
//! variables and the optional TOML `--config` file, in that order of
//! precedence, then the defaults of `server::config` (which `--help`
//! shows). The file does not get a parser of its own: its values become the
//! arguments' defaults ([`file_defaults`], [`with_defaults`]) and go through
//! the flags' parsers. [`ServeArgs::validate`] then turns the settings into
//! the daemon's [`ServeConfig`] and the log set-up (reading the token file),
//! and [`run`] serves on a multi-threaded tokio runtime until SIGTERM or
//! SIGINT.
//!
//! Owns the flags, the config-file format and signal handling; everything
//! the daemon does is in `crate::server`.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::server::config::{
    DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_DATA_DIR, DEFAULT_GRPC_ADDR, DEFAULT_HTTP_ADDR,
    DEFAULT_MAX_ACCUMULATOR_BYTES, DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_METADATA_ENTRIES, DEFAULT_MAX_SEQUENCE_GAPS_PER_WRITER,
    DEFAULT_MAX_SHARDS_PER_EPOCH, DEFAULT_MESSAGE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
};
use crate::server::{self, Limits, ServeConfig, TlsFiles};

use super::{read_token, CliError};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The settings of `vcid serve`. Each can come from its flag, the
/// environment variable shown, or the `--config` file under the flag's name
/// (with `_` or `-`, e.g. `grpc_addr = "0.0.0.0:50051"`).
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// TOML file whose keys are these flags' names (flags and environment
    /// override it; unknown keys are an error).
    #[arg(long, env = "VCID_CONFIG", value_name = "FILE.toml")]
    pub(super) config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "VCID_GRPC_ADDR", value_name = "ADDR", default_value_t = DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    /// HTTP listen address for /metrics, /healthz, /readyz.
    #[arg(long, env = "VCID_HTTP_ADDR", value_name = "ADDR", default_value_t = DEFAULT_HTTP_ADDR)]
    http_addr: SocketAddr,
    /// Directory of the database (created if missing).
    #[arg(long, env = "VCID_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Largest accepted gRPC message in bytes.
    #[arg(
        long,
        env = "VCID_MAX_MESSAGE_BYTES",
        value_name = "BYTES",
        default_value_t = DEFAULT_MAX_MESSAGE_BYTES,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..)
    )]
    max_message_bytes: usize,
    /// Largest number of rows in one feature batch.
    #[arg(
        long,
        env = "VCID_MAX_BATCH_ROWS",
        value_name = "ROWS",
        default_value_t = DEFAULT_MAX_BATCH_ROWS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_batch_rows: u32,
    /// Memory budget of all open accumulators together, in bytes.
    #[arg(
        long,
        env = "VCID_MAX_ACCUMULATOR_BYTES",
        value_name = "BYTES",
        default_value_t = DEFAULT_MAX_ACCUMULATOR_BYTES
    )]
    max_accumulator_bytes: u64,
    /// Memory budget of all request messages in flight together (received,
    /// decoded, being applied), in bytes; beyond it the daemon stops
    /// reading until bytes are freed.
    #[arg(
        long,
        env = "VCID_MAX_INFLIGHT_BYTES",
        value_name = "BYTES",
        default_value_t = DEFAULT_MAX_INFLIGHT_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_inflight_bytes: u64,
    /// Most gaps between the sequence numbers one writer_id has sent to a
    /// run; a batch that would open another is rejected.
    #[arg(
        long,
        env = "VCID_MAX_SEQUENCE_GAPS_PER_WRITER",
        value_name = "GAPS",
        default_value_t = DEFAULT_MAX_SEQUENCE_GAPS_PER_WRITER
    )]
    max_sequence_gaps_per_writer: u64,
    /// Most accumulator shards of one open epoch: concurrent streams of an
    /// epoch fold in parallel into separate shards, merged at close. Each
    /// shard counts as one accumulator in --max-accumulator-bytes; at most
    /// the number of cores are used.
    #[arg(
        long,
        env = "VCID_MAX_SHARDS_PER_EPOCH",
        value_name = "N",
        default_value_t = DEFAULT_MAX_SHARDS_PER_EPOCH,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_shards_per_epoch: u32,
    /// Most open connections per listener (gRPC and HTTP each); more are
    /// closed at once. Keep it below the open-file limit (`ulimit -n`).
    #[arg(
        long,
        env = "VCID_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = DEFAULT_MAX_CONNECTIONS,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 20)
    )]
    max_connections: usize,
    /// Most concurrent RPCs (HTTP/2 streams) per gRPC connection; clients
    /// queue the rest.
    #[arg(
        long,
        env = "VCID_MAX_CONCURRENT_STREAMS",
        value_name = "N",
        default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_concurrent_streams: u32,
    /// Longest time one gRPC message may take to arrive once its first
    /// byte is in (DEADLINE_EXCEEDED; the partial message is freed).
    #[arg(
        long,
        env = "VCID_MESSAGE_TIMEOUT_SECONDS",
        value_name = "SECONDS",
        default_value_t = DEFAULT_MESSAGE_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    message_timeout_seconds: u64,
    /// Most metadata entries of one run (CreateRun).
    #[arg(
        long,
        env = "VCID_MAX_METADATA_ENTRIES",
        value_name = "N",
        default_value_t = DEFAULT_MAX_METADATA_ENTRIES
    )]
    max_metadata_entries: usize,
    /// Most bytes of one run's metadata, keys plus values (CreateRun).
    #[arg(
        long,
        env = "VCID_MAX_METADATA_BYTES",
        value_name = "BYTES",
        default_value_t = DEFAULT_MAX_METADATA_BYTES
    )]
    max_metadata_bytes: usize,
    /// PEM certificate chain (leaf first): serve both listeners over TLS.
    /// Reloaded when the file changes or on SIGHUP.
    #[arg(
        long,
        env = "VCID_TLS_CERT",
        value_name = "FILE.pem",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(
        long,
        env = "VCID_TLS_KEY",
        value_name = "FILE.pem",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate they signed
    /// (mutual TLS, both listeners). Needs `--tls-cert`.
    #[arg(
        long,
        env = "VCID_TLS_CLIENT_CA",
        value_name = "FILE.pem",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// File holding a bearer token that `GET /metrics` requires (Prometheus'
    /// `authorization` setting); without it, /metrics is open.
    #[arg(long, env = "VCID_METRICS_TOKEN_FILE", value_name = "FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Export run metadata as labels of `vcid_run_info` (`false` keeps it
    /// out of /metrics).
    #[arg(
        long,
        env = "VCID_METRICS_METADATA",
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    metrics_metadata: bool,
    /// File holding a bearer token; when set, every gRPC call must send
    /// `authorization: Bearer <token>` (without it, no authentication).
    #[arg(long, env = "VCID_AUTH_TOKEN_FILE", value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// Longest wait for in-flight RPCs on SIGTERM/SIGINT before
    /// checkpointing.
    #[arg(
        long,
        env = "VCID_SHUTDOWN_GRACE_SECONDS",
        value_name = "SECONDS",
        default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs()
    )]
    shutdown_grace_seconds: u64,
    /// Seconds between checkpoints of the open epochs that changed (with
    /// their writers' duplicate filters, one durable transaction each);
    /// what a kill -9 can cost clients that must resend. 0 turns periodic
    /// checkpoints off (client requests and the shutdown checkpoint still
    /// write).
    #[arg(
        long,
        env = "VCID_CHECKPOINT_INTERVAL",
        value_name = "SECONDS",
        default_value_t = DEFAULT_CHECKPOINT_INTERVAL.as_secs_f64(),
        value_parser = parse_interval
    )]
    checkpoint_interval: f64,
    /// Log format.
    #[arg(long, env = "VCID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or
    /// `vcid=debug`.
    #[arg(
        long,
        env = "VCID_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info"
    )]
    log_level: String,
}

/// `--checkpoint-interval`: a finite number of seconds in [0, 86400].
fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (0.0..=86_400.0).contains(&x) => Ok(x),
        _ => Err(format!(
            "expected seconds between 0 and 86400 (0: off), received {text:?}"
        )),
    }
}

/// What [`ServeArgs::validate`] makes of the settings.
#[derive(Debug)]
struct Settings {
    config: ServeConfig,
    log_format: LogFormat,
    log_filter: EnvFilter,
}

impl ServeArgs {
    /// The daemon's configuration and the log set-up; reads the token file
    /// and checks the log filter (clap has checked everything else).
    fn validate(self) -> Result<Settings, CliError> {
        let auth_token = match &self.auth_token_file {
            Some(path) => Some(read_token(path)?.as_str().to_owned()),
            None => None,
        };
        let metrics_token = match &self.metrics_token_file {
            Some(path) => Some(
                crate::auth::BearerToken::read_file(path)
                    .map_err(|err| {
                        CliError::Input(format!("--metrics-token-file {}: {err}", path.display()))
                    })?
                    .as_str()
                    .to_owned(),
            ),
            None => None,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            // clap's `requires` pairs them.
            _ => None,
        };
        let log_filter = EnvFilter::try_new(&self.log_level)
            .map_err(|e| CliError::Input(format!("--log-level {:?}: {e}", self.log_level)))?;
        Ok(Settings {
            config: ServeConfig {
                grpc_addr: self.grpc_addr,
                http_addr: self.http_addr,
                data_dir: self.data_dir,
                limits: Limits {
                    max_message_bytes: self.max_message_bytes,
                    max_batch_rows: self.max_batch_rows,
                    max_accumulator_bytes: self.max_accumulator_bytes,
                    max_inflight_bytes: self.max_inflight_bytes,
                    max_sequence_gaps_per_writer: self.max_sequence_gaps_per_writer,
                    max_shards_per_epoch: self.max_shards_per_epoch,
                    max_connections: self.max_connections,
                    max_concurrent_streams: self.max_concurrent_streams,
                    message_timeout: Duration::from_secs(self.message_timeout_seconds),
                    max_metadata_entries: self.max_metadata_entries,
                    max_metadata_bytes: self.max_metadata_bytes,
                },
                auth_token,
                shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
                checkpoint_interval: Duration::from_secs_f64(self.checkpoint_interval),
                tls,
                metrics_token,
                metrics_metadata: self.metrics_metadata,
            },
            log_format: self.log_format,
            log_filter,
        })
    }
}

/// The `--config` file's settings as `(argument id, value)` pairs. Keys are
/// the flags' names with `_` or `-`; an unknown key, a key given twice or a
/// value the flag's own parser refuses is an error naming the file.
pub(super) fn file_defaults(
    serve: &clap::Command,
    path: &Path,
) -> Result<Vec<(clap::Id, String)>, CliError> {
    let fail = |what: String| CliError::Input(format!("--config {}: {what}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e| fail(format!("{e}")))?;
    let settable: Vec<&clap::Arg> = serve
        .get_arguments()
        .filter(|arg| arg.get_long().is_some() && arg.get_id() != "config")
        .collect();
    let mut defaults: Vec<(clap::Id, String)> = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let Some(arg) = settable.iter().find(|arg| arg.get_id() == id.as_str()) else {
            let known: Vec<&str> = settable.iter().map(|arg| arg.get_id().as_str()).collect();
            return Err(fail(format!(
                "unknown key {key:?}; expected one of {}",
                known.join(", ")
            )));
        };
        if defaults.iter().any(|(seen, _)| seen == arg.get_id()) {
            return Err(fail(format!("{id} is set twice (as {id} and with '-')")));
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(fail(format!(
                    "{key}: expected a string, a number or a boolean, received a {}",
                    other.type_str()
                )))
            }
        };
        // The flag's own parser decides, as it would for `--flag value`.
        let long = arg.get_long().unwrap_or_default();
        clap::Command::new("vcid serve")
            .no_binary_name(true)
            .arg((*arg).clone())
            .try_get_matches_from([format!("--{long}"), text.clone()])
            .map_err(|e| {
                // clap's message without its "error: " and its usage hint.
                let message = e.to_string();
                let lines: Vec<&str> = message
                    .lines()
                    .map(|line| line.trim().trim_start_matches("error: "))
                    .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
                    .collect();
                fail(format!("{key} = {value}: {}", lines.join(" ")))
            })?;
        defaults.push((arg.get_id().clone(), text));
    }
    Ok(defaults)
}

/// `serve` with `defaults` (from [`file_defaults`]) as its arguments'
/// defaults: a flag or environment variable still overrides each.
pub(super) fn with_defaults(
    serve: clap::Command,
    defaults: &[(clap::Id, String)],
) -> clap::Command {
    defaults.iter().fold(serve, |serve, (id, value)| {
        serve.mut_arg(id, |arg| arg.default_value(value.clone()))
    })
}

/// Installs the global `tracing` subscriber (stderr).
fn init_logging(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // Already installed (e.g. by an embedding program): keep that one.
    drop(installed);
}

/// A future that resolves on SIGTERM or SIGINT; the handlers are installed
/// at once, so a signal arriving while the daemon starts is not lost.
#[cfg(unix)]
fn termination() -> Result<impl Future<Output = ()>, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| CliError::Failed(format!("installing the {name} handler: {e}")))
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("termination signal received");
    })
}

/// A future that resolves on Ctrl-C.
#[cfg(not(unix))]
fn termination() -> Result<impl Future<Output = ()>, CliError> {
    Ok(async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("termination signal received"),
            Err(err) => tracing::error!(%err, "cannot wait for Ctrl-C; stopping"),
        }
    })
}

/// Allocations of at least this size are mapped on their own and returned
/// to the system when freed (glibc's `M_MMAP_THRESHOLD`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 4 << 20;

/// Large buffers straight from and back to the system. glibc's default
/// raises its mmap threshold up to 32 MiB after the first large free, so
/// the daemon's workspaces of a few MiB (fold scratch, a close's d × K
/// matrices, checkpoint encodings) would then stay in per-thread arenas
/// after use: BENCHMARKS.md "Daemon memory" measures the difference. The
/// `MALLOC_MMAP_THRESHOLD_` environment variable, when set, wins.
fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes malloc's tuning; it is called once,
        // before the runtime starts its threads.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        }
    }
}

/// Runs `vcid serve`.
pub(crate) fn run(args: ServeArgs) -> Result<(), CliError> {
    let settings = args.validate()?;
    init_logging(settings.log_format, settings.log_filter);
    map_large_allocations();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vcid")
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    runtime.block_on(async {
        let signal = termination()?;
        server::run(settings.config, signal)
            .await
            .map_err(|e| CliError::Failed(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::CommandFactory;

    use super::super::{parse, Cli, Command};
    use super::*;

    /// `vcid serve ARGS` through the real parse path, validated.
    fn serve(args: &[&str]) -> Result<Settings, CliError> {
        let argv: Vec<OsString> = ["vcid", "serve"]
            .iter()
            .chain(args)
            .map(OsString::from)
            .collect();
        match parse(&argv)?.command {
            Command::Serve(args) => args.validate(),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// The variables `vcid serve` reads would override what these tests
    /// set up; they must not be set in the test's environment.
    fn assert_clean_environment() {
        let cli = Cli::command();
        let set: Vec<_> = cli
            .find_subcommand("serve")
            .unwrap()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .filter(|name| std::env::var_os(name).is_some())
            .collect();
        assert!(set.is_empty(), "unset {set:?} to run these tests");
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        assert_clean_environment();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  abc123\n").unwrap();
        let file = dir.path().join("vcid.toml");
        std::fs::write(
            &file,
            format!(
                "grpc_addr = \"0.0.0.0:6000\"\nmax-batch-rows = 7\nlog_format = \"json\"\n\
                 max_sequence_gaps_per_writer = 9\nauth_token_file = {:?}\n\
                 metrics_metadata = false\nmessage-timeout-seconds = 5\n",
                token.display().to_string()
            ),
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let settings = serve(&["--config", file, "--grpc-addr", "127.0.0.1:7000"]).unwrap();
        let config = settings.config;
        assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:7000");
        assert_eq!(config.http_addr, ServeConfig::default().http_addr);
        assert_eq!(config.limits.max_batch_rows, 7);
        assert_eq!(config.limits.max_sequence_gaps_per_writer, 9);
        assert_eq!(config.limits.message_timeout, Duration::from_secs(5));
        assert!(!config.metrics_metadata);
        assert_eq!(config.tls, None);
        assert_eq!(config.limits.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(config.auth_token.as_deref(), Some("abc123"));
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(settings.log_format, LogFormat::Json);
        // Without a file: the defaults of `server::config`.
        let plain = serve(&[]).unwrap();
        assert_eq!(plain.config.grpc_addr, DEFAULT_GRPC_ADDR);
        assert_eq!(plain.config.limits, Limits::default());
        assert!(plain.config.metrics_metadata);
        assert_eq!(plain.log_format, LogFormat::Text);
    }

    #[test]
    fn bad_files_and_values_are_errors_that_name_them() {
        assert_clean_environment();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vcid.toml");
        let path = file.to_str().unwrap();
        let error = |content: &str| {
            std::fs::write(&file, content).unwrap();
            serve(&["--config", path]).unwrap_err().to_string()
        };
        let text = error("grpc_adr = \"0.0.0.0:1\"\n");
        assert!(
            text.starts_with(&format!("--config {path}: unknown key \"grpc_adr\""))
                && text.contains("grpc_addr, http_addr"),
            "{text}"
        );
        let text = error("config = \"other.toml\"\n");
        assert!(text.contains("unknown key \"config\""), "{text}");
        let text = error("max_batch_rows = 0\n");
        assert!(
            text.contains("max_batch_rows = 0") && text.contains("--max-batch-rows"),
            "{text}"
        );
        let text = error("grpc_addr = \"nowhere\"\n");
        assert!(text.contains("'nowhere'"), "{text}");
        let text = error("log_format = \"xml\"\n");
        assert!(text.contains("'xml'") && text.contains("json"), "{text}");
        let text = error("max_batch_rows = 1\nmax-batch-rows = 2\n");
        assert!(text.contains("set twice"), "{text}");
        let text = error("max_batch_rows = [1]\n");
        assert!(
            text.contains("expected a string, a number or a boolean"),
            "{text}"
        );
        let text = error("max_batch_rows = \n");
        assert!(text.starts_with(&format!("--config {path}: ")), "{text}");
        // The same parsers refuse the same values on the command line.
        assert!(matches!(
            serve(&["--max-message-bytes", "0"]),
            Err(CliError::Usage(_))
        ));
        let empty = dir.path().join("empty-token");
        std::fs::write(&empty, "\n").unwrap();
        let text = serve(&["--auth-token-file", empty.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("--auth-token-file ") && text.contains("expected a token"),
            "{text}"
        );
        let text = serve(&["--log-level", "vcid=loud"])
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("--log-level \"vcid=loud\""), "{text}");
    }

    /// The README's `vcid serve` section lists every flag with its
    /// environment variable and default, and its sample file every key.
    #[test]
    fn the_readme_documents_every_setting() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme
            .split("### `vcid serve`")
            .nth(1)
            .and_then(|rest| rest.split("\n### ").next())
            .expect("README has a `vcid serve` section");
        let rows: Vec<&str> = section
            .lines()
            .filter(|line| line.starts_with("| `--"))
            .collect();
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let args: Vec<&clap::Arg> = serve
            .get_arguments()
            .filter(|arg| arg.get_long().is_some())
            .collect();
        assert_eq!(rows.len(), args.len(), "one README row per flag: {rows:#?}");
        for arg in args {
            let long = arg.get_long().unwrap();
            let row = rows
                .iter()
                .find(|row| row.starts_with(&format!("| `--{long} ")))
                .unwrap_or_else(|| panic!("README lacks a row for --{long}"));
            let env = arg.get_env().unwrap().to_str().unwrap();
            assert!(row.contains(&format!("| `{env}` |")), "{row}: {env}");
            match arg.get_default_values() {
                [] => assert!(row.contains("| none"), "{row}: no default"),
                [default] => {
                    let default = default.to_str().unwrap();
                    assert!(row.contains(&format!("| `{default}`")), "{row}: {default}");
                }
                many => panic!("--{long} has several defaults: {many:?}"),
            }
            if long != "config" {
                let key = arg.get_id().as_str();
                assert!(
                    section.contains(&format!("\n{key} = ")),
                    "the sample config file lacks {key}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz::config())]

        /// Random and mutated `--config` files: an error or settings, never
        /// a panic (issue 11, item 6; see `crate::fuzz`).
        #[test]
        fn fuzz_config_files(
            text in proptest::prop_oneof![
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
                crate::fuzz::mutated(
                    b"grpc_addr = \"0.0.0.0:6000\"\nmax-batch-rows = 7\nlog_format = \"json\"\n\
                      metrics_metadata = false\nmax_message_bytes = 1024\n[table]\nx = 1\n"
                        .to_vec()
                ),
            ]
        ) {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("vcid.toml");
            std::fs::write(&file, &text).unwrap();
            let cli = Cli::command();
            let serve = cli.find_subcommand("serve").unwrap();
            if let Ok(defaults) = file_defaults(serve, &file) {
                // Whatever the file set parses again through the flags.
                let _ = with_defaults(serve.clone(), &defaults)
                    .no_binary_name(true)
                    .try_get_matches_from(Vec::<String>::new());
            }
        }
    }
}
