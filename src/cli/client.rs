//! `vcid runs`, `vcid history` and `vcid delete`: the command-line client of
//! a running daemon, plus the connection helper (address, bearer token, error
//! wording) that `vcid demo` shares.
//!
//! Owns: turning a gRPC outcome into a table, JSON or a one-line error that
//! names the address or the run. It must not compute any metric itself: every
//! number shown comes from the server's `EpochResult`s as received. It never
//! prompts: `vcid delete` deletes at once, so scripts can call it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::{read_token, CliError};
use crate::auth::AttachToken;
use crate::metrics::registry::{Source, METRICS};
use crate::proto::vci_monitor_client::VciMonitorClient;
use crate::proto::{
    DeleteRunRequest, EpochResult, GetHistoryRequest, GetRunRequest, ListRunsRequest, Run,
};
use crate::server::config::DEFAULT_GRPC_ADDR;
use crate::server::web::format::{self, history_csv, run_json};

/// How long to wait for the TCP/HTTP2 handshake before saying the server is
/// unreachable; a local daemon answers in milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A generated client whose every request carries the bearer token (if any).
pub type Client = VciMonitorClient<InterceptedService<Channel, AttachToken>>;

/// Accepts `host:port` as well as `http://host:port` and
/// `https://host:port`.
pub fn normalize_addr(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// How the client side of TLS is set up; shared by the client subcommands.
/// An `https://` address turns TLS on (so does any of these options with a
/// bare `host:port`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM CA certificate(s) to trust for the daemon's certificate instead
    /// of the system's CAs.
    #[arg(long, env = "VCID_TLS_CA", value_name = "FILE.pem")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a daemon that requires mutual TLS.
    #[arg(
        long,
        env = "VCID_TLS_CLIENT_CERT",
        value_name = "FILE.pem",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `--tls-client-cert`.
    #[arg(
        long,
        env = "VCID_TLS_CLIENT_KEY",
        value_name = "FILE.pem",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The address with its scheme: `https://` when TLS options are given
    /// for a bare `host:port`.
    fn url(&self, addr: &str) -> Result<String, CliError> {
        let any = self.tls_ca.is_some() || self.tls_client_cert.is_some();
        let addr = addr.trim();
        if any && addr.starts_with("http://") {
            return Err(CliError::Input(format!(
                "--addr: expected an https:// address with --tls-ca/--tls-client-cert, received {addr:?}"
            )));
        }
        Ok(if any && !addr.contains("://") {
            format!("https://{addr}")
        } else {
            normalize_addr(addr)
        })
    }

    /// The channel's TLS settings.
    fn config(&self) -> Result<ClientTlsConfig, CliError> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|err| CliError::Input(format!("{flag} {}: {err}", path.display())))
        };
        let mut config = match &self.tls_ca {
            Some(path) => ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("--tls-ca", path)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            config = config.identity(Identity::from_pem(
                read("--tls-client-cert", cert)?,
                read("--tls-client-key", key)?,
            ));
        }
        Ok(config)
    }
}

/// Connects to the daemon at `addr` (TLS for `https://`); an unreachable
/// server is an error that names the address.
pub async fn connect(addr: &str, auth: AttachToken, tls: &TlsArgs) -> Result<Client, CliError> {
    let addr = tls.url(addr)?;
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .map_err(|err| CliError::Input(format!("--addr: {addr:?} is not a valid URI: {err}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if addr.starts_with("https://") {
        endpoint = endpoint.tls_config(tls.config()?).map_err(|err| {
            CliError::Input(format!("TLS settings for {addr}: {}", error_chain(&err)))
        })?;
    }
    let channel = endpoint.connect().await.map_err(|err| {
        CliError::Failed(format!(
            "cannot reach the vcid server at {addr}: {} (is `vcid serve` running there? set --addr or VCID_ADDR)",
            error_chain(&err)
        ))
    })?;
    Ok(VciMonitorClient::with_interceptor(channel, auth)
        // Histories of long runs can exceed tonic's 4 MiB default.
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// `err` and its sources, joined, so "transport error" shows its real cause.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Maps a gRPC status to a CLI error in the words a user needs: which run
/// does not exist, which address refused the token.
pub fn status_error(status: &Status, addr: &str, run: Option<&str>) -> CliError {
    let addr = normalize_addr(addr);
    match (status.code(), run) {
        (Code::NotFound, Some(run)) => CliError::Failed(format!(
            "no run named {run:?} on the vcid server at {addr} ({})",
            status.message()
        )),
        (Code::Unauthenticated, _) => CliError::Failed(format!(
            "the vcid server at {addr} requires a valid bearer token: {} (pass --auth-token-file or set VCID_AUTH_TOKEN_FILE)",
            status.message()
        )),
        (Code::Unavailable, _) => CliError::Failed(format!(
            "cannot reach the vcid server at {addr}: {}",
            status.message()
        )),
        (code, _) => CliError::Failed(format!(
            "the vcid server at {addr} answered {code:?}: {}",
            status.message()
        )),
    }
}

/// Output format of the client subcommands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

/// Output format of `vcid history`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HistoryFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts.
    Json,
    /// CSV with a header row, one row per epoch result (as the HTTP API's
    /// `history?format=csv`).
    Csv,
}

/// Where the daemon is and how to authenticate; shared by the client
/// subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// gRPC address of the daemon (`http://host:port`, `https://host:port`
    /// or `host:port`).
    #[arg(long, env = "VCID_ADDR", default_value_t = format!("http://{DEFAULT_GRPC_ADDR}"))]
    pub addr: String,
    /// File holding the bearer token, for a daemon started with auth on.
    #[arg(long, env = "VCID_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl ConnectArgs {
    /// The interceptor these arguments ask for.
    pub fn auth(&self) -> Result<AttachToken, CliError> {
        let token = self
            .auth_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        Ok(AttachToken::new(token))
    }
}

/// Arguments of `vcid runs`.
#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Arguments of `vcid history`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The run whose epoch results to show.
    pub run: String,
    /// Only this split (e.g. train, val); default: every split.
    #[arg(long)]
    pub split: Option<String>,
    /// Only this layer (e.g. penultimate); default: every layer.
    #[arg(long)]
    pub layer: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = HistoryFormat::Table)]
    pub format: HistoryFormat,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Arguments of `vcid delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// The run to delete, with its open epochs, history and exported
    /// series. There is no confirmation prompt and no undo.
    pub run: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// A single-threaded runtime for one client command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| CliError::Failed(format!("cannot start the async runtime: {err}")))
}

/// Runs `vcid runs`.
pub fn runs(args: RunsArgs) -> Result<(), CliError> {
    let auth = args.connect.auth()?;
    let addr = args.connect.addr.clone();
    let runs = runtime()?.block_on(async {
        let mut client = connect(&addr, auth, &args.connect.tls).await?;
        client
            .list_runs(ListRunsRequest {})
            .await
            .map(|reply| reply.into_inner().runs)
            .map_err(|status| status_error(&status, &addr, None))
    })?;
    let text = match args.format {
        Format::Table => render_runs(&runs),
        Format::Json => runs_json(&runs),
    };
    super::emit(&text)
}

/// The epoch results of `run` (`GetHistory`), optionally of one split
/// and layer.
pub fn fetch_history(
    connect_args: &ConnectArgs,
    run: &str,
    split: Option<&str>,
    layer: Option<&str>,
) -> Result<Vec<EpochResult>, CliError> {
    let auth = connect_args.auth()?;
    let addr = connect_args.addr.clone();
    let request = GetHistoryRequest {
        run_id: run.to_owned(),
        split: split.unwrap_or_default().to_owned(),
        layer: layer.unwrap_or_default().to_owned(),
    };
    runtime()?.block_on(async {
        let mut client = connect(&addr, auth, &connect_args.tls).await?;
        client
            .get_history(request)
            .await
            .map(|reply| reply.into_inner().results)
            .map_err(|status| status_error(&status, &addr, Some(run)))
    })
}

/// Runs `vcid history RUN`.
pub fn history(args: HistoryArgs) -> Result<(), CliError> {
    let results = fetch_history(
        &args.connect,
        &args.run,
        args.split.as_deref(),
        args.layer.as_deref(),
    )?;
    let text = match args.format {
        HistoryFormat::Table if results.is_empty() => format!(
            "run {:?} has no closed epochs{}\n",
            args.run,
            filter_text(&args.split, &args.layer)
        ),
        HistoryFormat::Table => render_history(&results),
        HistoryFormat::Json => history_json_text(&args.run, &results),
        HistoryFormat::Csv => history_csv(&results),
    };
    super::emit(&text)
}

/// Runs `vcid delete RUN`: reads the run (to say what is deleted), then
/// deletes it. No prompt, so it can be scripted.
pub fn delete(args: DeleteArgs) -> Result<(), CliError> {
    let auth = args.connect.auth()?;
    let addr = args.connect.addr.clone();
    let run_id = args.run.clone();
    let run = runtime()?.block_on(async {
        let mut client = connect(&addr, auth, &args.connect.tls).await?;
        let not_ok = |status: Status| status_error(&status, &addr, Some(&run_id));
        let run = client
            .get_run(GetRunRequest {
                run_id: run_id.clone(),
            })
            .await
            .map_err(not_ok)?
            .into_inner();
        // A concurrent delete between the two calls ends as NOT_FOUND here,
        // reported like an unknown run.
        client
            .delete_run(DeleteRunRequest {
                run_id: run_id.clone(),
            })
            .await
            .map_err(not_ok)?;
        Ok::<_, CliError>(run)
    })?;
    super::emit(&render_deleted(&run))
}

/// The line `vcid delete` prints: what the deleted run held.
pub fn render_deleted(run: &Run) -> String {
    format!(
        "deleted run {:?} (K={}, d={}, rows ingested {}, closed epochs {}, open epochs {})\n",
        run.run_id,
        run.num_classes,
        run.feature_dim,
        run.rows_ingested,
        run.closed_epochs,
        run.open_epochs.len()
    )
}

fn filter_text(split: &Option<String>, layer: &Option<String>) -> String {
    match (split, layer) {
        (None, None) => String::new(),
        (Some(s), None) => format!(" in split {s:?}"),
        (None, Some(l)) => format!(" in layer {l:?}"),
        (Some(s), Some(l)) => format!(" in split {s:?}, layer {l:?}"),
    }
}

/// A plain text table: left-aligned text columns, right-aligned numbers.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns given as (header, right-aligned?).
    pub fn new(columns: &[(&str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|(h, _)| h.to_string()).collect(),
            right: columns.iter().map(|(_, r)| *r).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends one row; it must have one cell per column.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row);
    }

    /// The table with a header line, columns separated by two spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if self.right[i] {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.headers);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// A metric value for a table: "-" when undefined; 4 decimals in the usual
/// range, scientific notation when very large or very small so that no
/// digits that matter are hidden.
pub fn fmt_metric(value: Option<f64>) -> String {
    match value {
        None => "-".to_string(),
        Some(v) if !v.is_finite() => v.to_string(),
        Some(0.0) => "0".to_string(),
        Some(v) if v.abs() >= 1e4 || v.abs() < 1e-3 => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
    }
}

/// A signed change (vci_delta): always shows its sign.
pub fn fmt_delta(value: Option<f64>) -> String {
    match value {
        None => "-".to_string(),
        Some(v) if v != 0.0 && v.abs() < 1e-3 => format!("{v:+.2e}"),
        Some(v) => format!("{v:+.4}"),
    }
}

fn fmt_metadata(run: &Run) -> String {
    if run.metadata.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<_> = run.metadata.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `vcid runs` table.
pub fn render_runs(runs: &[Run]) -> String {
    if runs.is_empty() {
        return "no runs\n".into();
    }
    let mut table = Table::new(&[
        ("RUN", false),
        ("K", true),
        ("D", true),
        ("ROWS", true),
        ("OPEN", true),
        ("CLOSED", true),
        ("STATE", false),
        ("METADATA", false),
    ]);
    let mut runs: Vec<&Run> = runs.iter().collect();
    runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    for run in runs {
        table.push(vec![
            run.run_id.clone(),
            run.num_classes.to_string(),
            run.feature_dim.to_string(),
            run.rows_ingested.to_string(),
            run.open_epochs.len().to_string(),
            run.closed_epochs.to_string(),
            if run.finished { "finished" } else { "running" }.into(),
            fmt_metadata(run),
        ]);
    }
    table.render()
}

fn runs_json(runs: &[Run]) -> String {
    let runs: Vec<serde_json::Value> = runs.iter().map(|run| run_json(run, None)).collect();
    let mut text = serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))
        .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"));
    text.push('\n');
    text
}

/// The `vcid history` table: one row per (split, layer, epoch), in the
/// server's order (split, layer, epoch), with a column per metric of the
/// registry.
pub fn render_history(results: &[EpochResult]) -> String {
    let mut columns = vec![
        ("SPLIT", false),
        ("LAYER", false),
        ("EPOCH", true),
        ("N", true),
    ];
    columns.extend(METRICS.iter().map(|m| (m.column, true)));
    columns.extend([("RANK_T", true), ("RANK_B", true), ("FLAGS", false)]);
    let mut table = Table::new(&columns);
    for r in results {
        let mut row = vec![
            r.split.clone(),
            r.layer.clone(),
            r.epoch.to_string(),
            r.samples.to_string(),
        ];
        row.extend(METRICS.iter().map(|m| match m.source {
            Source::Epoch(_) => fmt_metric((m.get)(r)),
            Source::Change => fmt_delta((m.get)(r)),
        }));
        row.extend([
            r.rank_total.to_string(),
            r.rank_between.to_string(),
            if r.small_sample {
                "small_sample".into()
            } else {
                "-".into()
            },
        ]);
        table.push(row);
    }
    let mut text = table.render();
    // Say why a metric is missing, once per distinct reason, so "-" is
    // never a mystery.
    let mut reasons: Vec<(String, String)> = results
        .iter()
        .flat_map(|r| r.notes.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect();
    reasons.sort();
    reasons.dedup();
    if !reasons.is_empty() {
        text.push_str("\nundefined metrics:\n");
        for (metric, why) in reasons {
            let _ = writeln!(text, "  {metric}: {why}");
        }
    }
    text
}

fn history_json_text(run: &str, results: &[EpochResult]) -> String {
    let mut text = serde_json::to_string_pretty(&format::HistoryJson::new(run, results))
        .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_formatting_marks_undefined_and_keeps_small_values() {
        assert_eq!(fmt_metric(None), "-");
        assert_eq!(fmt_metric(Some(0.5)), "0.5000");
        assert_eq!(fmt_metric(Some(0.0)), "0");
        assert_eq!(fmt_metric(Some(2.5e-5)), "2.500e-5");
        assert_eq!(fmt_metric(Some(123456.0)), "1.235e5");
        assert_eq!(fmt_delta(Some(-0.25)), "-0.2500");
        assert_eq!(fmt_delta(Some(0.1)), "+0.1000");
        assert_eq!(fmt_delta(None), "-");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&[("A", false), ("NUM", true)]);
        t.push(vec!["long-name".into(), "1".into()]);
        t.push(vec!["x".into(), "12345".into()]);
        assert_eq!(
            t.render(),
            "A            NUM\nlong-name      1\nx          12345\n"
        );
    }

    #[test]
    fn addresses_without_scheme_get_http() {
        assert_eq!(normalize_addr("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize_addr("http://h:2"), "http://h:2");
    }

    #[test]
    fn deleted_line_says_what_the_run_held() {
        let run = Run {
            run_id: "exp-1".into(),
            num_classes: 10,
            feature_dim: 512,
            rows_ingested: 1234,
            closed_epochs: 7,
            open_epochs: vec![Default::default(); 2],
            ..Default::default()
        };
        assert_eq!(
            render_deleted(&run),
            "deleted run \"exp-1\" (K=10, d=512, rows ingested 1234, closed epochs 7, open epochs 2)\n"
        );
    }
}
