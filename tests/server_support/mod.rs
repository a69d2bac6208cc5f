//! Helpers shared by the server integration tests: start a real daemon on
//! loopback ephemeral ports, build batches, compute reference metrics
//! in-process, and speak plain HTTP/1.1 to `/metrics`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use tonic::transport::Channel;
use vcid::metrics::{self, EpochMetrics};
use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{
    CloseEpochRequest, CreateRunRequest, EpochResult, FeatureBatch, GetRunRequest, Run,
};
use vcid::server::{Limits, ServeConfig, ServerHandle};
use vcid::stats::{Accumulator, Par};

pub type Client = VciMonitorClient<Channel>;

/// Starts an in-process daemon with `config`.
pub async fn start(config: ServeConfig) -> ServerHandle {
    vcid::server::spawn(config).await.expect("daemon starts")
}

/// `CloseEpoch` of `run`/`split`/penultimate (`""`: train) at `epoch`.
pub fn close_req(run: &str, split: &str, epoch: u64) -> CloseEpochRequest {
    CloseEpochRequest {
        run_id: run.into(),
        split: split.into(),
        layer: String::new(),
        epoch,
    }
}

/// A daemon configuration with small limits, for the tests of refusals:
/// 4 KiB messages, 100 rows per batch and a 1500-byte accumulator budget
/// (one K = 4, d = 8 accumulator, 8·(64 + 64 + 16) = 1152 bytes, fits; a
/// second does not).
pub fn tight_limits(data_dir: &std::path::Path) -> ServeConfig {
    ServeConfig {
        limits: Limits {
            max_message_bytes: 4096,
            max_batch_rows: 100,
            max_accumulator_bytes: 1500,
            ..Limits::default()
        },
        ..ServeConfig::ephemeral(data_dir)
    }
}

pub async fn connect(url: &str) -> Client {
    VciMonitorClient::connect(url.to_owned())
        .await
        .expect("client connects")
}

pub async fn create_run(client: &mut Client, run_id: &str, k: u32, d: u32) -> Run {
    client
        .create_run(CreateRunRequest {
            run_id: run_id.into(),
            num_classes: k,
            feature_dim: d,
            metadata: Default::default(),
        })
        .await
        .expect("create run")
        .into_inner()
}

pub async fn get_run(client: &mut Client, run_id: &str) -> Run {
    client
        .get_run(GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .expect("get run")
        .into_inner()
}

/// Samples of the open epoch `(split, epoch)` of a run (0 when not open).
pub fn open_samples(run: &Run, split: &str, epoch: u64) -> u64 {
    run.open_epochs
        .iter()
        .find(|o| o.split == split && o.epoch == epoch)
        .map_or(0, |o| o.samples)
}

/// Labelled Gaussian clusters with a large common offset (exercises the
/// numerics), rounded through f32 exactly as they travel on the wire.
/// `spread` scales the within-class noise.
pub fn dataset(seed: u64, rows: usize, k: u32, d: u32, spread: f64) -> (Vec<f64>, Vec<u32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let noise = Normal::new(0.0, spread).expect("normal");
    let means: Vec<Vec<f64>> = (0..k)
        .map(|c| {
            (0..d)
                .map(|j| 50.0 + if j % k == c { 4.0 } else { 0.0 } + 0.1 * j as f64)
                .collect()
        })
        .collect();
    let mut features = Vec::with_capacity(rows * d as usize);
    let mut labels = Vec::with_capacity(rows);
    for _ in 0..rows {
        let c = rng.random_range(0..k);
        labels.push(c);
        for mean in &means[c as usize] {
            let v = mean + noise.sample(&mut rng);
            features.push(f64::from(v as f32));
        }
    }
    (features, labels)
}

/// A float32 batch of rows `[start, end)` of a dataset.
#[allow(clippy::too_many_arguments)]
pub fn batch(
    run_id: &str,
    split: &str,
    epoch: u64,
    d: u32,
    features: &[f64],
    labels: &[u32],
    start: usize,
    end: usize,
) -> FeatureBatch {
    let d = d as usize;
    let mut bytes = Vec::with_capacity((end - start) * d * 4);
    for v in &features[start * d..end * d] {
        bytes.extend_from_slice(&(*v as f32).to_le_bytes());
    }
    FeatureBatch {
        run_id: run_id.into(),
        split: split.into(),
        layer: String::new(),
        epoch,
        rows: (end - start) as u32,
        features: bytes.into(),
        encoding: 0,
        labels: labels[start..end].to_vec(),
        writer_id: String::new(),
        sequence: 0,
    }
}

/// Batches of `size` rows covering a dataset.
pub fn batches(
    run_id: &str,
    split: &str,
    epoch: u64,
    d: u32,
    features: &[f64],
    labels: &[u32],
    size: usize,
) -> Vec<FeatureBatch> {
    (0..labels.len())
        .step_by(size)
        .map(|s| {
            batch(
                run_id,
                split,
                epoch,
                d,
                features,
                labels,
                s,
                (s + size).min(labels.len()),
            )
        })
        .collect()
}

/// The metrics the math core computes in-process from the same data in one
/// batch.
pub fn reference(features: &[f64], labels: &[u32], k: u32, d: u32) -> EpochMetrics {
    let view = ndarray::ArrayView2::from_shape((labels.len(), d as usize), features).unwrap();
    let acc = Accumulator::from_batch(view, labels, k as usize, Par::Seq).unwrap();
    metrics::compute(&acc, Par::Seq).unwrap()
}

fn close(a: Option<f64>, b: Option<f64>, name: &str, tol: f64) {
    match (a, b) {
        (None, None) => {}
        (Some(x), Some(y)) => assert!(
            (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())),
            "{name}: server {x} vs reference {y}"
        ),
        _ => panic!("{name}: server {a:?} vs reference {b:?}"),
    }
}

/// Asserts an epoch result matches in-process metrics (relative `tol`).
pub fn assert_matches(result: &EpochResult, m: &EpochMetrics, tol: f64) {
    assert_eq!(result.samples, m.samples);
    assert_eq!(result.classes_observed as usize, m.classes_observed);
    assert_eq!(result.feature_dim as usize, m.feature_dim);
    assert_eq!(result.rank_total as usize, m.rank_total);
    assert_eq!(result.rank_between as usize, m.rank_between);
    assert_eq!(result.small_sample, m.small_sample);
    close(result.vci, m.vci, "vci", tol);
    close(
        result.linear_probe_mse,
        m.linear_probe_mse,
        "linear_probe_mse",
        tol,
    );
    close(result.nc1, m.nc1, "nc1", tol);
    close(result.cdnv, m.cdnv, "cdnv", tol);
    close(
        result.class_separation,
        m.class_separation,
        "class_separation",
        tol,
    );
    close(result.equinorm, m.equinorm, "equinorm", tol);
    close(
        result.equiangularity,
        m.equiangularity,
        "equiangularity",
        tol,
    );
    close(
        result.effective_rank,
        m.effective_rank,
        "effective_rank",
        tol,
    );
}

/// Every metric of two results agrees within `tol` (relative).
pub fn assert_same_metrics(a: &EpochResult, b: &EpochResult, tol: f64) {
    assert_eq!(a.samples, b.samples);
    assert_eq!(a.rank_total, b.rank_total);
    assert_eq!(a.rank_between, b.rank_between);
    close(a.vci, b.vci, "vci", tol);
    close(
        a.linear_probe_mse,
        b.linear_probe_mse,
        "linear_probe_mse",
        tol,
    );
    close(a.nc1, b.nc1, "nc1", tol);
    close(a.cdnv, b.cdnv, "cdnv", tol);
    close(
        a.class_separation,
        b.class_separation,
        "class_separation",
        tol,
    );
    close(a.equinorm, b.equinorm, "equinorm", tol);
    close(a.equiangularity, b.equiangularity, "equiangularity", tol);
    close(a.effective_rank, b.effective_rank, "effective_rank", tol);
}

/// The value of the unlabelled metric `name` on `daemon`'s `/metrics`.
pub fn daemon_gauge(daemon: &Daemon, name: &str) -> u64 {
    let (status, body) = http_get(daemon.http, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} on /metrics"))
        .parse::<f64>()
        .unwrap() as u64
}

/// `GET path` over HTTP/1.1; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, path, &[])
}

/// `GET path` over HTTP/1.1 with extra headers; returns (status, body).
pub fn http_request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("http connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("http read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    // axum answers `Connection: close` requests without chunking.
    (status, body.to_owned())
}

/// The daemon binary, running with JSON logs; stderr is drained by a
/// thread after the listen addresses were read from it.
pub struct Daemon {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Every log line, as written (those of the start-up included).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// Spawns `vcid serve` on ephemeral loopback ports over `data_dir`.
    pub fn spawn(data_dir: &std::path::Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vcid"))
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-format", "json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vcid");
        let stderr = child.stderr.take().expect("stderr");
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        let mut early = Vec::new();
        let (grpc, http) = loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read daemon log");
            assert!(n > 0, "daemon exited before serving");
            early.push(line.clone());
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let fields = &value["fields"];
            if fields["message"] == "vcid serving" {
                let grpc = fields["grpc"].as_str().unwrap().parse().unwrap();
                let http = fields["http"].as_str().unwrap().parse().unwrap();
                break (grpc, http);
            }
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(early));
        let lines = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                lines.lock().unwrap().push(std::mem::take(&mut line));
            }
        });
        Daemon {
            child,
            grpc,
            http,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// SIGKILL, no chance to checkpoint.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM; returns the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "daemon did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
