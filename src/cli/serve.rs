//! `vcid serve`: the daemon's command line. Merges flags, `VCID_*`
//! environment variables and an optional TOML file (flags and environment
//! win over the file, the file over the defaults), sets up logging and runs
//! `server::serve` on a multi-threaded tokio runtime until SIGTERM/SIGINT.
//!
//! Owns argument parsing and the config-file format only; everything the
//! daemon does is in `crate::server`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::server::{self, config, Limits, ServeConfig};

use super::CliError;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Arguments of `vcid serve`. Every flag can also come from the environment
/// variable shown, or from the `--config` file under the same name with
/// underscores (e.g. `grpc_addr = "0.0.0.0:50051"`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file whose keys mirror these flags (flags and env override it).
    #[arg(long, env = "VCID_CONFIG", value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "VCID_GRPC_ADDR", value_name = "ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP listen address for /metrics, /healthz, /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "VCID_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Directory of the database [default: ./vcid-data].
    #[arg(long, env = "VCID_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Largest accepted gRPC message in bytes [default: 67108864 = 64 MiB].
    #[arg(long, env = "VCID_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest number of rows in one feature batch [default: 65536].
    #[arg(long, env = "VCID_MAX_BATCH_ROWS", value_name = "ROWS")]
    pub max_batch_rows: Option<u32>,
    /// Memory budget of all open accumulators in bytes [default: 2147483648 = 2 GiB].
    #[arg(long, env = "VCID_MAX_ACCUMULATOR_BYTES", value_name = "BYTES")]
    pub max_accumulator_bytes: Option<u64>,
    /// Most gaps between the sequence numbers one writer_id has sent to a
    /// run; a batch that would open another is rejected [default: 1024].
    #[arg(long, env = "VCID_MAX_SEQUENCE_GAPS_PER_WRITER", value_name = "GAPS")]
    pub max_sequence_gaps_per_writer: Option<u64>,
    /// File holding a bearer token; when set, every gRPC call must send
    /// `authorization: Bearer <token>` [default: no authentication].
    #[arg(long, env = "VCID_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Longest wait for in-flight RPCs on SIGTERM before checkpointing [default: 10].
    #[arg(long, env = "VCID_SHUTDOWN_GRACE_SECONDS", value_name = "SECONDS")]
    pub shutdown_grace_seconds: Option<u64>,
    /// Log format [default: text].
    #[arg(long, env = "VCID_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or
    /// `vcid=debug` [default: info].
    #[arg(long, env = "VCID_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// The `--config` file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(alias = "grpc-addr")]
    pub grpc_addr: Option<SocketAddr>,
    #[serde(alias = "http-addr")]
    pub http_addr: Option<SocketAddr>,
    #[serde(alias = "data-dir")]
    pub data_dir: Option<PathBuf>,
    #[serde(alias = "max-message-bytes")]
    pub max_message_bytes: Option<usize>,
    #[serde(alias = "max-batch-rows")]
    pub max_batch_rows: Option<u32>,
    #[serde(alias = "max-accumulator-bytes")]
    pub max_accumulator_bytes: Option<u64>,
    #[serde(alias = "max-sequence-gaps-per-writer")]
    pub max_sequence_gaps_per_writer: Option<u64>,
    #[serde(alias = "auth-token-file")]
    pub auth_token_file: Option<PathBuf>,
    #[serde(alias = "shutdown-grace-seconds")]
    pub shutdown_grace_seconds: Option<u64>,
    #[serde(alias = "log-format")]
    pub log_format: Option<LogFormat>,
    #[serde(alias = "log-level")]
    pub log_level: Option<String>,
}

/// Reads a `--config` file.
pub fn read_config_file(path: &Path) -> Result<FileConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("--config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| CliError::Input(format!("--config {}: {e}", path.display())))
}

/// Reads a bearer token: the file's content without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("--auth-token-file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::Input(format!(
            "--auth-token-file {}: expected a token, received an empty file",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// The daemon configuration and log settings from flags, env and file.
pub fn resolve(args: ServeArgs) -> Result<(ServeConfig, LogFormat, String), CliError> {
    let file = match &args.config {
        Some(path) => read_config_file(path)?,
        None => FileConfig::default(),
    };
    let defaults = ServeConfig::default();
    let limits = Limits {
        max_message_bytes: args
            .max_message_bytes
            .or(file.max_message_bytes)
            .unwrap_or(config::DEFAULT_MAX_MESSAGE_BYTES),
        max_batch_rows: args
            .max_batch_rows
            .or(file.max_batch_rows)
            .unwrap_or(config::DEFAULT_MAX_BATCH_ROWS),
        max_accumulator_bytes: args
            .max_accumulator_bytes
            .or(file.max_accumulator_bytes)
            .unwrap_or(config::DEFAULT_MAX_ACCUMULATOR_BYTES),
        max_sequence_gaps_per_writer: args
            .max_sequence_gaps_per_writer
            .or(file.max_sequence_gaps_per_writer)
            .unwrap_or(config::DEFAULT_MAX_SEQUENCE_GAPS_PER_WRITER),
    };
    if limits.max_batch_rows == 0 || limits.max_message_bytes == 0 {
        return Err(CliError::Input(
            "--max-batch-rows and --max-message-bytes: expected at least 1, received 0".into(),
        ));
    }
    let auth_token = match args.auth_token_file.or(file.auth_token_file) {
        Some(path) => Some(read_token(&path)?),
        None => None,
    };
    let config = ServeConfig {
        grpc_addr: args
            .grpc_addr
            .or(file.grpc_addr)
            .unwrap_or(defaults.grpc_addr),
        http_addr: args
            .http_addr
            .or(file.http_addr)
            .unwrap_or(defaults.http_addr),
        data_dir: args.data_dir.or(file.data_dir).unwrap_or(defaults.data_dir),
        limits,
        auth_token,
        shutdown_grace: args
            .shutdown_grace_seconds
            .or(file.shutdown_grace_seconds)
            .map_or(defaults.shutdown_grace, Duration::from_secs),
    };
    let log_format = args.log_format.or(file.log_format).unwrap_or_default();
    let log_level = args
        .log_level
        .or(file.log_level)
        .unwrap_or_else(|| "info".to_owned());
    Ok((config, log_format, log_level))
}

/// Installs the global `tracing` subscriber (stderr).
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| CliError::Input(format!("--log-level {filter:?}: {e}")))?;
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
    Ok(())
}

/// Runs `vcid serve`.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    let (config, log_format, log_level) = resolve(args)?;
    init_logging(log_format, &log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vcid")
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    runtime
        .block_on(server::serve(config))
        .map_err(|e| CliError::Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  abc123\n").unwrap();
        let file = dir.path().join("vcid.toml");
        std::fs::write(
            &file,
            format!(
                "grpc_addr = \"0.0.0.0:6000\"\nmax-batch-rows = 7\nlog_format = \"json\"\n\
                 max_sequence_gaps_per_writer = 9\nauth_token_file = {:?}\n",
                token.display().to_string()
            ),
        )
        .unwrap();
        let cli = Wrapper::try_parse_from([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:7000",
        ])
        .unwrap();
        let (config, format, level) = resolve(cli.args).unwrap();
        assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:7000");
        assert_eq!(config.http_addr, ServeConfig::default().http_addr);
        assert_eq!(config.limits.max_batch_rows, 7);
        assert_eq!(config.limits.max_sequence_gaps_per_writer, 9);
        assert_eq!(
            config.limits.max_message_bytes,
            config::DEFAULT_MAX_MESSAGE_BYTES
        );
        assert_eq!(config.auth_token.as_deref(), Some("abc123"));
        assert_eq!(config.data_dir, PathBuf::from(config::DEFAULT_DATA_DIR));
        assert_eq!((format, level.as_str()), (LogFormat::Json, "info"));
    }
}
