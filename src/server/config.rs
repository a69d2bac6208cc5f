//! Configuration of one daemon: listen addresses, data directory, limits,
//! the optional bearer tokens, TLS files and what `/metrics` shows.
//!
//! Owns the defaults, each written once here: [`ServeConfig::default`],
//! [`Limits::default`] and `vcid serve`'s flags (whose help shows them) all
//! read these constants. It must not parse command lines or files (that is
//! `cli::serve`) nor open anything.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

pub use super::tls::TlsFiles;

/// Default gRPC listen address (loopback: exposing the daemon is a choice).
pub const DEFAULT_GRPC_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50051));
/// Default HTTP listen address for `/metrics`, `/healthz`, `/readyz`
/// (9464 is the port OpenTelemetry's Prometheus exporter uses by convention).
pub const DEFAULT_HTTP_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./vcid-data";
/// Default largest accepted gRPC message: 64 MiB. A 256 x 512 float32 batch
/// is 0.5 MiB; a `PushStats` block of dimension d needs about 8·d² bytes, so
/// d above ~2800 needs a larger limit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Default largest number of rows in one `FeatureBatch`.
pub const DEFAULT_MAX_BATCH_ROWS: u32 = 65_536;
/// Default budget for all open accumulators together: 2 GiB.
pub const DEFAULT_MAX_ACCUMULATOR_BYTES: u64 = 2 << 30;
/// Default budget for request messages in flight (received, decoded and
/// being applied) together: 1 GiB, room for one largest `Push` message
/// (`--max-message-bytes`, charged 11× its size with its stream's
/// buffers) with plenty to spare.
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 1 << 30;
/// Default most gaps one writer's applied sequence numbers may have (see
/// `state::dedup`): a writer numbering its batches 0, 1, 2, … has none, so
/// this only bounds writers that skip or reorder sequences. About 16 bytes
/// per gap.
pub const DEFAULT_MAX_SEQUENCE_GAPS_PER_WRITER: u64 = 1024;
/// Default most accumulator shards of one open epoch (used only while
/// batches of the epoch arrive concurrently; never more than the cores).
pub const DEFAULT_MAX_SHARDS_PER_EPOCH: u32 = 4;
/// Default most open connections per listener (gRPC and HTTP each); keep
/// it below the process's open-file limit (`ulimit -n`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default most concurrent HTTP/2 streams (RPCs) per gRPC connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default longest time one gRPC message may take to arrive once its
/// first byte is in.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default most metadata entries of one run.
pub const DEFAULT_MAX_METADATA_ENTRIES: usize = 64;
/// Default most bytes of one run's metadata (keys plus values).
pub const DEFAULT_MAX_METADATA_BYTES: usize = 16 << 10;
/// How long a graceful shutdown waits for in-flight RPCs before it
/// checkpoints anyway.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default time between two checkpoint rounds of changed open epochs
/// (BENCHMARKS.md, "Checkpoints", has the measurements behind it).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Resource limits enforced on every request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest decoded gRPC message in bytes (RESOURCE_EXHAUSTED above it).
    pub max_message_bytes: usize,
    /// Largest `rows` of one `FeatureBatch` (RESOURCE_EXHAUSTED above it).
    pub max_batch_rows: u32,
    /// Budget for the estimated bytes of all open accumulators together.
    pub max_accumulator_bytes: u64,
    /// Budget for the bytes of all request messages in flight together,
    /// from their first byte until their handler is done with them (see
    /// `state::budget`, "In-flight budget"): beyond it the daemon stops
    /// reading (HTTP/2 back-pressure); one message charged more than all of
    /// it is refused with RESOURCE_EXHAUSTED.
    pub max_inflight_bytes: u64,
    /// Most gaps between the applied sequence numbers of one `writer_id`
    /// of a run; a batch that would open another one is rejected
    /// (FAILED_PRECONDITION) rather than remembered inexactly.
    pub max_sequence_gaps_per_writer: u64,
    /// Most accumulator shards one open epoch folds concurrent batches into
    /// (each reserves a whole accumulator from `max_accumulator_bytes`);
    /// the daemon uses at most as many as it has cores.
    pub max_shards_per_epoch: u32,
    /// Most open connections per listener; more are closed at once.
    pub max_connections: usize,
    /// Most concurrent RPCs per gRPC connection (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; clients queue the rest).
    pub max_concurrent_streams: u32,
    /// Longest time a gRPC message may take to arrive once its first byte
    /// is in (DEADLINE_EXCEEDED, partial message freed).
    pub message_timeout: Duration,
    /// Most entries of a run's metadata (INVALID_ARGUMENT above it).
    pub max_metadata_entries: usize,
    /// Most bytes of a run's metadata, keys plus values (INVALID_ARGUMENT
    /// above it).
    pub max_metadata_bytes: usize,
}

impl Limits {
    /// The shard limit in effect: `max_shards_per_epoch`, at most the
    /// number of cores, at least 1.
    pub fn shards_per_epoch(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (self.max_shards_per_epoch as usize).clamp(1, cores)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            max_accumulator_bytes: DEFAULT_MAX_ACCUMULATOR_BYTES,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            max_sequence_gaps_per_writer: DEFAULT_MAX_SEQUENCE_GAPS_PER_WRITER,
            max_shards_per_epoch: DEFAULT_MAX_SHARDS_PER_EPOCH,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            max_metadata_entries: DEFAULT_MAX_METADATA_ENTRIES,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
        }
    }
}

/// Everything [`crate::server::spawn`] and [`crate::server::run`] need to
/// start a daemon.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// gRPC listen address; port 0 picks a free port (see `ServerHandle`).
    pub grpc_addr: SocketAddr,
    /// HTTP listen address for metrics and probes; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Directory of the redb database (`vcid.redb`); created if missing.
    pub data_dir: PathBuf,
    /// Request limits.
    pub limits: Limits,
    /// When set, every gRPC call must carry `authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// Longest wait for in-flight RPCs during a graceful shutdown.
    pub shutdown_grace: Duration,
    /// Time between checkpoint rounds of changed open epochs; zero turns
    /// periodic checkpoints off (clients' `Checkpoint` calls and the
    /// shutdown checkpoint still write).
    pub checkpoint_interval: Duration,
    /// TLS on both listeners (and mutual TLS with a client CA) when set.
    pub tls: Option<TlsFiles>,
    /// When set, `GET /metrics` requires `authorization: Bearer <token>`
    /// with this token (Prometheus' `authorization` setting).
    pub metrics_token: Option<String>,
    /// Whether run metadata becomes labels of `vcid_run_info`.
    pub metrics_metadata: bool,
}

impl Default for ServeConfig {
    /// The `DEFAULT_*` constants of this module; no auth, no TLS, metadata
    /// exported.
    fn default() -> Self {
        ServeConfig {
            grpc_addr: DEFAULT_GRPC_ADDR,
            http_addr: DEFAULT_HTTP_ADDR,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            limits: Limits::default(),
            auth_token: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            tls: None,
            metrics_token: None,
            metrics_metadata: true,
        }
    }
}

impl ServeConfig {
    /// A configuration for tests and the in-process demo: both listeners on
    /// 127.0.0.1 with ephemeral ports, data in `data_dir`, default limits.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        ServeConfig {
            grpc_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            data_dir: data_dir.into(),
            ..ServeConfig::default()
        }
    }
}
