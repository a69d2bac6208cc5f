//! The vcid daemon: gRPC ingest and queries, Prometheus export, redb
//! persistence.
//!
//! The public API is small, in the manner of mini-redis: a configuration
//! ([`ServeConfig`] with its [`Limits`]), [`run`] (serve until a shutdown
//! future resolves) and [`spawn`] (start in the background and get a
//! [`ServerHandle`] with the bound addresses), and the one error type
//! [`ServerError`]. Everything else is internal to the crate; this module
//! wires the parts together and owns the process lifecycle:
//!
//! | module | owns |
//! |---|---|
//! | `config` | `ServeConfig`, limits and their defaults |
//! | `error` | the one `ServerError` and its mapping to gRPC status |
//! | `decode` | wire message → validated batch (names, shape, encodings) |
//! | `state` | runs, streams, open accumulators, dedup, memory budget, locking |
//! | `store` | the redb layout; durable writes |
//! | `clock` | wall-clock time and its RFC 3339 rendering |
//! | `daemon` | request logic over state + store + math core |
//! | `export` | Prometheus names and the scrape-time collector |
//! | `http` | `/metrics`, `/healthz`, `/readyz` |
//! | `listen` | accepting connections: connection limit, accept back-off, TLS handshakes |
//! | `tls` | certificate files, rustls configurations, reload on change or SIGHUP |
//! | `deadline` | a gRPC request message on its way in: its in-flight bytes and its deadline |
//! | `web` | the web view at `/` and the HTTP API under `/api/v1` |
//! | `service` | the tonic `VciMonitor` implementation |
//! | [`discovery`] | `<data-dir>/daemon.json` and the per-user data directory (public: `vcid stop` and the Python client read it) |
//!
//! The bearer-token check is [`crate::auth`]'s (shared with the client).
//!
//! Start-up ([`spawn`]): open the database and restore runs, histories and
//! the shutdown checkpoint; bind both listeners (port 0 picks a free port;
//! [`ServerHandle`] reports the bound addresses); serve. Shutdown
//! ([`ServerHandle::stop`], or the `shutdown` future of [`run`]): mark not
//! ready, stop accepting connections, let every `Push` finish the batch in
//! hand and end, wait for in-flight RPCs (at most `shutdown_grace`), then
//! freeze every open accumulator, wait for the epoch closes in flight (each
//! stores its result or gives its epoch back) and checkpoint the open
//! epochs with the duplicate filter in one durable transaction.

pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod deadline;
pub(crate) mod decode;
pub mod discovery;
pub(crate) mod error;
pub(crate) mod export;
pub(crate) mod http;
pub(crate) mod listen;
pub(crate) mod service;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod tls;
pub(crate) mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codegen::http::Response;
use tonic::service::InterceptorLayer;
use tower::util::{MapRequestLayer, MapResponseLayer};

use crate::proto::vci_monitor_server::VciMonitorServer;

pub use config::{Limits, ServeConfig, TlsFiles};
pub use error::{Reason, ServerError};
pub use store::StoreError;

use crate::auth::RequireToken;
use daemon::Daemon;
use service::VciService;

/// A running daemon started with [`spawn`].
#[derive(Debug)]
pub struct ServerHandle {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    /// `https` with TLS, else `http`.
    scheme: &'static str,
    daemon: Arc<Daemon>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl ServerHandle {
    /// The bound gRPC address (the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address of `/metrics`, `/healthz`, `/readyz` and the
    /// web view.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://<grpc_addr>` (`https://` with TLS), ready for
    /// `VciMonitorClient::connect`.
    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme, self.grpc_addr)
    }

    /// `http://<http_addr>/metrics` (`https://` with TLS).
    pub fn metrics_url(&self) -> String {
        format!("{}://{}/metrics", self.scheme, self.http_addr)
    }

    /// `http://<http_addr>/`, the web view (`https://` with TLS).
    pub fn web_url(&self) -> String {
        format!("{}://{}/", self.scheme, self.http_addr)
    }

    /// Begins a graceful shutdown without waiting for it.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the daemon stopped (after [`ServerHandle::shutdown`] or
    /// a fatal error) and its open accumulators are checkpointed.
    pub async fn wait(self) -> Result<(), ServerError> {
        let ServerHandle { daemon, task, .. } = self;
        // Release our reference first so the database closes with the task.
        drop(daemon);
        task.await
            .map_err(|e| ServerError::Internal(format!("server task failed: {e}")))?
    }

    /// Graceful shutdown: [`ServerHandle::shutdown`] then
    /// [`ServerHandle::wait`].
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown();
        self.wait().await
    }
}

/// Resolves when shutdown begins (or the sender is gone).
pub(crate) async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopping| *stopping).await;
}

/// HTTP/2 flow-control windows of gRPC connections (bytes a client may send
/// before the daemon reads them): per stream, then per connection.
/// hyper's default of 1 MiB is smaller than one 256 × 2048 float32 batch
/// (2 MiB): a `Push` stream then could not receive its next batch while
/// the current one was folded. 4 MiB lets it receive one more batch of
/// that size during a fold. The connection window is not larger: it bounds
/// what a connection can make the daemon buffer while its streams wait for
/// in-flight room (`deadline`), outside `--max-inflight-bytes`, so the
/// worst case is 4 MiB per open connection (`--max-connections`).
const HTTP2_WINDOWS: (u32, u32) = (4 << 20, 4 << 20);
/// Largest HTTP/2 frame a client may send (hyper's default is 16 KiB: 128
/// frames per 2 MiB batch).
const HTTP2_MAX_FRAME: u32 = 256 << 10;

/// HTTP/2 keep-alive of gRPC connections: a ping after this much silence,
/// and the connection is closed when its answer takes longer than the
/// second value (a peer that vanished without closing).
const HTTP2_KEEPALIVE: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_secs(60),
    std::time::Duration::from_secs(20),
);

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Io { what, source }
}

/// tonic refuses an oversized unary message with OUT_OF_RANGE before any
/// handler runs; the API answers RESOURCE_EXHAUSTED (README "Errors"). This
/// rewrites that one status (a trailers-only response, so the status is in
/// the headers), reading and writing the headers with tonic's own status
/// encoding.
fn remap_oversized<B>(mut response: Response<B>, max: usize, daemon: &Daemon) -> Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get(tonic::Status::GRPC_STATUS)
        .is_some_and(|code| tonic::Code::from_bytes(code.as_bytes()) == tonic::Code::OutOfRange);
    let Some(err) = out_of_range
        .then(|| tonic::Status::from_header_map(headers))
        .flatten()
        .and_then(|status| ServerError::from_oversized(&status, max))
    else {
        return response;
    };
    daemon.telemetry().reject(&err);
    if let Err(status) = tonic::Status::from(err).add_header(headers) {
        tracing::warn!(%status, "could not rewrite an oversized-message status");
    }
    response
}

/// Starts a daemon on the current tokio runtime: restores state, binds
/// both listeners and serves until [`ServerHandle::stop`]. Use
/// [`ServeConfig::ephemeral`] for tests and in-process demos.
pub async fn spawn(config: ServeConfig) -> Result<ServerHandle, ServerError> {
    let data_dir = config.data_dir.clone();
    let limits = config.limits.clone();
    let daemon = tokio::task::spawn_blocking(move || Daemon::open(&data_dir, limits))
        .await
        .map_err(|e| ServerError::Internal(format!("start-up task failed: {e}")))??;
    let daemon = Arc::new(daemon);
    daemon
        .telemetry()
        .set_metadata_labels(config.metrics_metadata);
    let tls = match config.tls.clone() {
        Some(files) => Some(Arc::new(
            tokio::task::spawn_blocking(move || tls::Tls::load(files))
                .await
                .map_err(|e| ServerError::Internal(format!("TLS task failed: {e}")))??,
        )),
        None => None,
    };

    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(io_error(format!(
            "binding the gRPC listener to {}",
            config.grpc_addr
        )))?;
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(io_error(format!(
            "binding the HTTP listener to {}",
            config.http_addr
        )))?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(io_error("reading the gRPC listener's address".into()))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(io_error("reading the HTTP listener's address".into()))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<VciMonitorServer<VciService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Internal(format!("reflection service: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Internal(format!("reflection service: {e}")))?;
    let limits = &config.limits;
    let max_message = limits.max_message_bytes;
    let gate = deadline::Gate {
        inflight: daemon.inflight(),
        timeout: limits.message_timeout,
        max_message_bytes: max_message,
    };
    let vci = VciMonitorServer::new(VciService::new(Arc::clone(&daemon), shutdown_rx.clone()))
        .max_decoding_message_size(max_message);
    let auth = RequireToken::new(config.auth_token.as_deref());
    let remap_daemon = Arc::clone(&daemon);
    let grpc = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE.0))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE.1))
        .initial_stream_window_size(HTTP2_WINDOWS.0)
        .initial_connection_window_size(HTTP2_WINDOWS.1)
        .max_frame_size(HTTP2_MAX_FRAME)
        .layer(MapRequestLayer::new(
            move |request: tonic::codegen::http::Request<tonic::body::Body>| {
                deadline::DeadlineBody::wrap(request, &gate)
            },
        ))
        .layer(MapResponseLayer::new(move |r| {
            remap_oversized(r, max_message, &remap_daemon)
        }))
        .layer(InterceptorLayer::new(auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(vci);
    let grpc_signal = {
        let mut rx = shutdown_rx.clone();
        async move { shutting_down(&mut rx).await }
    };
    // `listen` sets TCP_NODELAY: small replies (PushSummary, EpochResult)
    // must not wait for Nagle's algorithm (a one-batch Push round trip
    // would stall ~40 ms on delayed ACKs).
    let grpc_incoming = listen::incoming(
        grpc_listener,
        grpc_addr,
        limits.max_connections,
        tls.as_ref().map(|tls| Arc::clone(&tls.grpc)),
        "grpc",
    );
    let http_incoming = listen::incoming(
        http_listener,
        http_addr,
        limits.max_connections,
        tls.as_ref().map(|tls| Arc::clone(&tls.http)),
        "http",
    );
    if let Some(tls) = &tls {
        tokio::spawn(Arc::clone(tls).watch(shutdown_rx.clone()));
    }
    let grpc_task = tokio::spawn(grpc.serve_with_incoming_shutdown(grpc_incoming, grpc_signal));

    let router = http::router(http::HttpState {
        daemon: Arc::clone(&daemon),
        ready: Arc::clone(&ready),
        auth: auth.clone(),
        metrics_auth: RequireToken::new(config.metrics_token.as_deref()),
        shutdown: shutdown_rx.clone(),
    });
    let http_signal = {
        let mut rx = shutdown_rx.clone();
        async move { shutting_down(&mut rx).await }
    };
    let http_task = tokio::spawn(async move {
        axum::serve(http_incoming, router)
            .with_graceful_shutdown(http_signal)
            .await
    });

    if !config.checkpoint_interval.is_zero() {
        tokio::spawn(checkpoint_periodically(
            Arc::clone(&daemon),
            config.checkpoint_interval,
            shutdown_rx.clone(),
        ));
    }

    tracing::info!(
        grpc = %grpc_addr, http = %http_addr, auth = auth.enabled(), tls = tls.is_some(),
        data = %config.data_dir.display(), "vcid serving"
    );

    let supervisor = Supervisor {
        daemon: Arc::clone(&daemon),
        shutdown_tx: shutdown_tx.clone(),
        shutdown_rx,
        ready,
        health_reporter,
        grace: config.shutdown_grace,
    };
    let task = tokio::spawn(supervisor.run(grpc_task, http_task));
    Ok(ServerHandle {
        grpc_addr,
        http_addr,
        scheme: if tls.is_some() { "https" } else { "http" },
        daemon,
        shutdown: shutdown_tx,
        task,
    })
}

/// Runs a checkpoint round every `interval` (on the blocking pool) until
/// shutdown begins; the shutdown checkpoint follows separately.
async fn checkpoint_periodically(
    daemon: Arc<Daemon>,
    interval: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            () = tokio::time::sleep(interval) => {}
        }
        let round = Arc::clone(&daemon);
        match tokio::task::spawn_blocking(move || round.checkpoint_round()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::error!(%err, "checkpoint round failed; retried next interval"),
            Err(err) => tracing::error!(%err, "checkpoint task failed"),
        }
    }
}

type GrpcTask = JoinHandle<Result<(), tonic::transport::Error>>;
type HttpTask = JoinHandle<Result<(), std::io::Error>>;

struct Supervisor {
    daemon: Arc<Daemon>,
    shutdown_tx: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
    health_reporter: tonic_health::server::HealthReporter,
    grace: std::time::Duration,
}

impl Supervisor {
    /// Waits for shutdown (or a listener failing), drains, checkpoints.
    async fn run(
        mut self,
        mut grpc_task: GrpcTask,
        mut http_task: HttpTask,
    ) -> Result<(), ServerError> {
        let mut failure: Option<ServerError> = None;
        let mut grpc_done = false;
        let mut http_done = false;
        tokio::select! {
            biased;
            _ = shutting_down(&mut self.shutdown_rx) => {}
            res = &mut grpc_task => {
                grpc_done = true;
                // Finishing is only a failure when nobody asked to stop.
                if !*self.shutdown_rx.borrow() || res.as_ref().map_or(true, |r| r.is_err()) {
                    failure = Some(task_failure("gRPC server", res.map(|r| r.map_err(|e| e.to_string()))));
                }
            }
            res = &mut http_task => {
                http_done = true;
                if !*self.shutdown_rx.borrow() || res.as_ref().map_or(true, |r| r.is_err()) {
                    failure = Some(task_failure("HTTP server", res.map(|r| r.map_err(|e| e.to_string()))));
                }
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        self.ready.store(false, Ordering::Release);
        self.health_reporter
            .set_not_serving::<VciMonitorServer<VciService>>()
            .await;
        let _ = self.shutdown_tx.send(true);
        if !grpc_done {
            match tokio::time::timeout(self.grace, &mut grpc_task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(res) => {
                    let err =
                        task_failure("gRPC server", res.map(|r| r.map_err(|e| e.to_string())));
                    tracing::error!(%err, "gRPC server failed while draining");
                }
                Err(_) => {
                    tracing::warn!(grace = ?self.grace, "in-flight RPCs still running after the grace period; checkpointing anyway");
                    grpc_task.abort();
                }
            }
        }
        if !http_done
            && tokio::time::timeout(self.grace, &mut http_task)
                .await
                .is_err()
        {
            http_task.abort();
        }
        let epochs = self.daemon.checkpoint_for_shutdown().await?;
        tracing::info!(
            open_epochs = epochs,
            "open accumulators checkpointed; stopped"
        );
        match failure {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

fn task_failure(
    what: &str,
    res: Result<Result<(), String>, tokio::task::JoinError>,
) -> ServerError {
    match res {
        Ok(Ok(())) => ServerError::Internal(format!("{what} stopped unexpectedly")),
        Ok(Err(e)) => ServerError::Internal(format!("{what} failed: {e}")),
        Err(e) => ServerError::Internal(format!("{what} task failed: {e}")),
    }
}

/// Runs a daemon until `shutdown` resolves (e.g. on a termination signal)
/// or a listener fails, then shuts it down gracefully. Use [`spawn`] to
/// learn the bound addresses or to stop it from elsewhere. While it serves,
/// `<data-dir>/daemon.json` names its process and addresses (`vcid stop`
/// and the Python client read it).
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let data_dir = config.data_dir.clone();
    let handle = spawn(config).await?;
    let file = discovery::DaemonFile::current(handle.grpc_addr(), handle.http_addr());
    if let Err(err) = file.write(&data_dir) {
        tracing::warn!(%err, "could not write {}; `vcid stop` will not find this daemon", discovery::FILE_NAME);
    }
    let mut stopping = handle.shutdown.subscribe();
    tokio::select! {
        () = shutdown => {}
        // A listener failed: the supervisor is already stopping.
        () = shutting_down(&mut stopping) => {}
    }
    let outcome = handle.stop().await;
    if let Err(err) = discovery::DaemonFile::remove(&data_dir, file.pid) {
        tracing::warn!(%err, "could not remove {}", discovery::FILE_NAME);
    }
    outcome
}
