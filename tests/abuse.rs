//! Rows of issue 11's table ("trust under abuse") as tests against a real
//! daemon on loopback: poisoned statistics are refused at the door with
//! nothing applied (a u64-wrapping count, huge means into an epoch with
//! honest rows, a scatter that is not positive semi-definite) and the
//! honest rows survive a graceful restart; transport and message limits
//! (concurrent streams per connection, connections, a message that stops
//! arriving, metadata size, long names in errors, an empty run_id, accept
//! errors at the open-file limit); and the memory of the real daemon
//! process (peak RSS from /proc) stays within its accumulator and
//! in-flight budgets whatever many streams send.

mod server_support;

use std::io::Write as _;
use std::time::{Duration, Instant};

use server_support::*;
use tonic::Code;
use tonic_types::StatusExt;
use vcid::proto::{CreateRunRequest, FeatureBatch, GetRunRequest, StatsBlock, WatchRequest};
use vcid::server::{Limits, ServeConfig};
use vcid::stats::{Accumulator, Par};

/// The field of an INVALID_ARGUMENT status's one violation.
fn violated_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    assert_eq!(violations.len(), 1);
    violations[0].field.clone()
}

/// Honest statistics of `rows` rows (K = 3, d = 4) as a StatsBlock.
fn honest_block(run: &str, seed: u64, rows: usize) -> StatsBlock {
    let (k, d) = (3u32, 4u32);
    let (x, y) = dataset(seed, rows, k, d, 1.0);
    let view = ndarray::ArrayView2::from_shape((rows, d as usize), &x[..]).unwrap();
    let acc = Accumulator::from_batch(view, &y, k as usize, Par::Seq).unwrap();
    StatsBlock {
        run_id: run.into(),
        ..StatsBlock::from(acc.to_parts())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_statistics_are_refused_and_honest_rows_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    create_run(&mut client, "poison", 3, 4).await;
    // 100 honest rows in epoch 0 (the FeatureBatch path).
    let (x, y) = dataset(1, 100, 3, 4, 1.0);
    client
        .push(tokio_stream::iter(batches(
            "poison", "train", 0, 4, &x, &y, 50,
        )))
        .await
        .unwrap();

    // class_counts whose total wraps a u64 (2^64 − 1 + 10 + 10 = 19).
    let mut wrap = honest_block("poison", 2, 30);
    wrap.class_counts = vec![u64::MAX, 10, 10];
    let status = client.push_stats(wrap).await.unwrap_err();
    assert_eq!(violated_field(&status), "class_counts", "{status:?}");
    assert!(status.message().contains("2^53"), "{}", status.message());

    // Finite but huge values: the means × 1e200 (and the scatter with them).
    let mut huge = honest_block("poison", 3, 30);
    for v in huge.class_means.iter_mut() {
        *v *= 1e200;
    }
    let status = client.push_stats(huge).await.unwrap_err();
    assert_eq!(violated_field(&status), "class_means", "{status:?}");
    // Means within bounds but a scatter no features within ±f32::MAX can
    // have.
    let mut spread = honest_block("poison", 4, 30);
    spread.scatter[0] = 1e100;
    let status = client.push_stats(spread).await.unwrap_err();
    assert_eq!(violated_field(&status), "scatter", "{status:?}");

    // A symmetric scatter with a negative eigenvalue: S − 2·λ_min·vvᵀ of
    // an honest S flips its smallest eigenvalue; simpler and as bad: make
    // an off-diagonal entry larger than the geometric mean of its diagonal.
    let mut indefinite = honest_block("poison", 5, 30);
    let d = 4;
    let (s00, s11) = (indefinite.scatter[0], indefinite.scatter[d + 1]);
    let off = 2.0 * (s00 * s11).sqrt();
    indefinite.scatter[1] = off;
    indefinite.scatter[d] = off;
    let status = client.push_stats(indefinite).await.unwrap_err();
    assert_eq!(violated_field(&status), "scatter", "{status:?}");
    assert!(
        status.message().contains("positive semi-definite"),
        "{}",
        status.message()
    );

    // Nothing of them was applied.
    let run = get_run(&mut client, "poison").await;
    assert_eq!(open_samples(&run, "train", 0), 100);
    assert_eq!(run.rows_ingested, 100);

    // A graceful restart keeps the honest rows' checkpoint; the epoch
    // closes with exactly them.
    server.stop().await.unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let result = client
        .close_epoch(close_req("poison", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.samples, 100);
    assert_matches(&result, &reference(&x, &y, 3, 4), 1e-9);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_names_and_run_ids_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let create = |metadata: std::collections::HashMap<String, String>| CreateRunRequest {
        run_id: "meta".into(),
        num_classes: 3,
        feature_dim: 4,
        metadata,
    };
    // 50,000 entries (the 50 MB is the same refusal, just slower).
    let many = (0..50_000).map(|i| (format!("k{i}"), "v".into())).collect();
    let status = client.create_run(create(many)).await.unwrap_err();
    assert_eq!(violated_field(&status), "metadata");
    assert!(
        status.message().contains("--max-metadata-entries"),
        "{}",
        status.message()
    );
    // 40 entries of 1000 bytes: few enough, but 40 kB.
    let big = (0..40)
        .map(|i| (format!("k{i}"), "x".repeat(1000)))
        .collect();
    let status = client.create_run(create(big)).await.unwrap_err();
    assert_eq!(violated_field(&status), "metadata");
    assert!(
        status.message().contains("--max-metadata-bytes"),
        "{}",
        status.message()
    );
    // Nothing was created.
    let status = client
        .get_run(GetRunRequest {
            run_id: "meta".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // A 10,000-character name: the error is short and says how long it was.
    let long = "x".repeat(10_000);
    for status in [
        client
            .get_run(GetRunRequest {
                run_id: long.clone(),
            })
            .await
            .unwrap_err(),
        client
            .create_run(CreateRunRequest {
                run_id: long.clone(),
                ..create(Default::default())
            })
            .await
            .unwrap_err(),
        client
            .create_run(create([(long.clone(), "v".to_string())].into()))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().len() < 400,
            "{} bytes",
            status.message().len()
        );
        assert!(
            status.message().contains("(10000 bytes)"),
            "{}",
            status.message()
        );
    }
    // Empty run_id in Push: INVALID_ARGUMENT naming run_id (not NOT_FOUND).
    let (x, y) = dataset(1, 4, 3, 4, 1.0);
    let mut batch = batches("", "train", 0, 4, &x, &y, 4);
    batch[0].run_id = String::new();
    let status = client.push(tokio_stream::iter(batch)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("run_id"), "{}", status.message());
    server.stop().await.unwrap();
}

/// More Watch streams on one connection than `--max-concurrent-streams`:
/// the first N are served, the next waits (HTTP/2 flow: the client queues
/// it) until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_limited() {
    const STREAMS: u32 = 50;
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig {
        limits: Limits {
            max_concurrent_streams: STREAMS,
            ..Limits::default()
        },
        ..ServeConfig::ephemeral(dir.path())
    })
    .await;
    let mut client = connect(&server.grpc_url()).await;
    create_run(&mut client, "watched", 3, 4).await;
    let watch = || WatchRequest {
        run_id: "watched".into(),
        ..Default::default()
    };
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        let mut c = client.clone();
        let stream = tokio::time::timeout(Duration::from_secs(10), c.watch(watch()))
            .await
            .expect("a stream within the limit is served")
            .unwrap();
        open.push(stream);
    }
    let mut extra = client.clone();
    let waiting = tokio::spawn(async move { extra.watch(watch()).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "stream {} was served beyond the limit",
        STREAMS + 1
    );
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a stream ended")
        .unwrap()
        .unwrap();
    server.stop().await.unwrap();
}

/// A message declared as 1 MiB of which 64 KiB arrive, then nothing: the
/// stream fails with DEADLINE_EXCEEDED after `--message-timeout-seconds`,
/// while a stream idle between messages is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_stops_arriving_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig {
        limits: Limits {
            message_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
        ..ServeConfig::ephemeral(dir.path())
    })
    .await;
    let mut client = connect(&server.grpc_url()).await;
    create_run(&mut client, "slow", 3, 4).await;

    // Idle between messages for longer than the timeout: fine.
    let (x, y) = dataset(1, 8, 3, 4, 1.0);
    let mut two = batches("slow", "train", 0, 4, &x, &y, 4).into_iter();
    let (first, second) = (two.next().unwrap(), two.next().unwrap());
    let idle = async_stream_of(vec![(first, 0), (second, 1500)]);
    let summary = client.push(idle).await.unwrap().into_inner();
    assert_eq!(summary.rows_applied, 8);

    // A partial message: raw HTTP/2 through hyper is not at hand, so the
    // body is written by hand: a gRPC frame prefix declaring 1 MiB, 64 KiB
    // of it, then silence.
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let status = raw_partial_push(channel, 1 << 20, 64 << 10).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("--message-timeout-seconds"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("of its 1048576 bytes"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    server.stop().await.unwrap();
}

/// A stream yielding each item after its delay (ms).
fn async_stream_of(
    items: Vec<(FeatureBatch, u64)>,
) -> impl futures::Stream<Item = FeatureBatch> + Send + 'static {
    futures::stream::unfold(items.into_iter(), |mut items| async move {
        let (item, delay) = items.next()?;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        Some((item, items))
    })
}

/// Sends on `Push` a gRPC frame that declares `declared` payload bytes and
/// carries `sent` of them, then keeps the stream open without sending
/// more; returns the status the daemon answers.
async fn raw_partial_push(
    channel: tonic::transport::Channel,
    declared: u32,
    sent: usize,
) -> tonic::Status {
    raw_partial_message(channel, "Push", declared, sent).await
}

/// [`raw_partial_push`] to any method of the service.
async fn raw_partial_message(
    channel: tonic::transport::Channel,
    method: &str,
    declared: u32,
    sent: usize,
) -> tonic::Status {
    use http_body_util::StreamBody;
    use tonic::codegen::http;
    use tower::ServiceExt;

    let mut payload = vec![0u8];
    payload.extend_from_slice(&declared.to_be_bytes());
    payload.extend(std::iter::repeat_n(0u8, sent));
    let chunks = futures::stream::once(async move {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(payload)))
    })
    .chain(futures::stream::pending());
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("/vcid.v1.VciMonitor/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(StreamBody::new(chunks)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), channel.oneshot(request))
        .await
        .expect("answered")
        .expect("response");
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        if status.code() != Code::Ok {
            return status;
        }
    }
    let mut body = response.into_body();
    loop {
        let frame = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await
        .expect("trailers")
        .expect("a frame")
        .expect("body");
        if let Ok(trailers) = frame.into_trailers() {
            return tonic::Status::from_header_map(&trailers).expect("grpc-status");
        }
    }
}

use futures::StreamExt as _;

/// Beyond `--max-connections`, new connections are closed at once while
/// the ones inside the limit keep being served.
#[test]
fn connections_beyond_the_limit_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &["--max-connections", "8"]);
    let held: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(daemon.http).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // The 9th is accepted by the kernel and closed by the daemon: a read
    // sees EOF (or a reset) at once instead of waiting.
    let mut extra = std::net::TcpStream::connect(daemon.http).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    let read = std::io::Read::read(&mut extra, &mut buf);
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(!matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    // One of the held connections is served.
    let mut first = &held[0];
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut first, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    drop(held);
    // Slots are returned when connections close.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http_get(daemon.http, "/healthz").0, 200);
    let log = daemon.log.lock().unwrap().join("");
    assert!(log.contains("connection limit reached"), "{log}");
}

/// At the open-file limit, accepting fails with EMFILE: the daemon logs it,
/// backs off instead of spinning, and serves again once descriptors free.
#[test]
fn accept_errors_back_off_and_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    // A low open-file limit for the daemon only (`prlimit` on its pid).
    let daemon = Daemon::spawn(dir.path(), &[]);
    let pid = daemon.child.id().to_string();
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .expect("prlimit");
    assert!(limited.success());
    let held: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(daemon.http).ok())
        .collect();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime + stime, in clock ticks (fields 14 and 15 of stat(5)).
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu() - before;
    // Backing off (at most one attempt per second at the cap) costs almost
    // nothing; the old busy loop burned a whole core (≥ 250 ticks in 3 s).
    assert!(ticks < 60, "{ticks} clock ticks in 3 s at the file limit");
    let log = daemon.log.lock().unwrap().join("");
    assert!(log.contains("accepting a connection failed"), "{log}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::panic::catch_unwind(|| http_get(daemon.http, "/healthz").0 == 200).ok() != Some(true)
    {
        assert!(
            Instant::now() < deadline,
            "not serving after the connections closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the memory tests allow beyond the configured budgets (the
/// accumulators', which include the fold buffers shards keep, and the
/// in-flight bytes): the daemon's
/// peak RSS right after start-up (binary, runtime, database) plus this
/// much for thread stacks, allocator slack and HTTP/2 receive windows
/// (streams waiting for in-flight room keep up to 1 MiB per connection
/// unread).
const RSS_SLACK: u64 = 96 << 20;

/// `VmHWM` (peak) and `VmRSS` of process `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib << 10
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A real daemon with an in-flight budget of `inflight` bytes and `extra`
/// flags, without periodic checkpoints (a checkpoint round copies the open
/// accumulators, which neither budget counts), with the run `(id, K, d)`
/// created; and its peak RSS so far, the baseline of the memory bounds.
async fn budgeted_daemon(
    dir: &std::path::Path,
    inflight: u64,
    extra: &[&str],
    (run, k, d): (&str, u32, u32),
) -> (Daemon, u64) {
    let inflight = inflight.to_string();
    let mut args = vec![
        "--max-inflight-bytes",
        &inflight,
        "--checkpoint-interval",
        "0",
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn(dir, &args);
    create_run(&mut connect(&daemon.url()).await, run, k, d).await;
    let (baseline, _) = memory(daemon.child.id());
    (daemon, baseline)
}

/// A float16 batch of `rows` rows of dimension `d` (values in [-1, 1) and
/// labels below `k` from `seed`).
fn f16_batch(run: &str, rows: usize, d: usize, k: u32, seed: u64) -> FeatureBatch {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let features = (0..rows * d)
        .flat_map(|_| half::f16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
        .collect();
    FeatureBatch {
        run_id: run.into(),
        split: "train".into(),
        epoch: 0,
        rows: rows as u32,
        features,
        encoding: vcid::proto::Encoding::Float16 as i32,
        labels: (0..rows).map(|_| rng.random_range(0..k)).collect(),
        ..FeatureBatch::default()
    }
}

/// `streams` concurrent `Push` streams, each on its own connection (like
/// data-parallel ranks), each sending `per_stream` batches made by `make`;
/// returns the rows applied. Meanwhile one `GetRun` on another connection
/// must be answered.
async fn push_concurrently(
    url: &str,
    run: &str,
    streams: u64,
    per_stream: u64,
    make: impl Fn(u64) -> FeatureBatch + Clone + Send + Sync + 'static,
) -> u64 {
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = connect(url).await;
        let make = make.clone();
        let batches = futures::stream::iter(0..per_stream).map(move |i| make(s * per_stream + i));
        tasks.push(tokio::spawn(async move {
            client
                .push(batches)
                .await
                .unwrap()
                .into_inner()
                .rows_applied
        }));
    }
    let mut other = connect(url).await;
    let answered = tokio::time::timeout(Duration::from_secs(30), get_run(&mut other, run)).await;
    assert!(answered.is_ok(), "GetRun answered during the pushes");
    let mut rows = 0;
    for task in tasks {
        rows += task.await.unwrap();
    }
    rows
}

/// Issue 11's first row: K = 10, d = 4096, an accumulator budget of one
/// accumulator, 1-row float16 batches from 4, 8 and 16 concurrent Push
/// streams: the daemon's peak RSS stays within the budgets (it reached 26×
/// the accumulator budget when each batch's statistics allocated a d × d
/// scatter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_batches_from_many_streams_stay_within_the_budgets() {
    one_row_batches_within_budgets(4096, &[4, 8, 16], 6).await;
}

/// The same at d = 8192 (a 538 MiB accumulator) with 4 streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_batches_at_d_8192_stay_within_the_budgets() {
    one_row_batches_within_budgets(8192, &[4], 4).await;
}

async fn one_row_batches_within_budgets(d: u32, phases: &[u64], per_stream: u64) {
    const K: u32 = 10;
    const INFLIGHT: u64 = 64 << 20;
    let accumulator = Accumulator::estimated_bytes(K.into(), d.into()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let budget = accumulator.to_string();
    let extra = ["--max-accumulator-bytes", &budget];
    let (daemon, baseline) = budgeted_daemon(dir.path(), INFLIGHT, &extra, ("wide", K, d)).await;
    let (pid, url) = (daemon.child.id(), daemon.url());
    // The fold buffers shards keep are inside the accumulator budget.
    let bound = baseline + accumulator + INFLIGHT + RSS_SLACK;
    let mut expected = 0;
    for &streams in phases {
        let make = move |i: u64| f16_batch("wide", 1, d as usize, K, i);
        let rows = push_concurrently(&url, "wide", streams, per_stream, make).await;
        expected += streams * per_stream;
        assert_eq!(rows, streams * per_stream);
        let (peak, _) = memory(pid);
        eprintln!(
            "d = {d}, {streams} streams: peak RSS {} MiB (bound {} MiB)",
            peak >> 20,
            bound >> 20
        );
        assert!(
            peak <= bound,
            "{streams} streams at d = {d}: peak RSS {} MiB above the budgets' {} MiB \
             (start-up {} MiB + accumulators {} MiB + in flight {} MiB + {} MiB)",
            peak >> 20,
            bound >> 20,
            baseline >> 20,
            accumulator >> 20,
            INFLIGHT >> 20,
            RSS_SLACK >> 20
        );
    }
    let run = get_run(&mut connect(&url).await, "wide").await;
    assert_eq!(open_samples(&run, "train", 0), expected);
    assert_eq!(daemon_gauge(&daemon, "vcid_accumulator_bytes"), accumulator);
    assert_eq!(daemon_gauge(&daemon, "vcid_inflight_bytes"), 0);
}

/// Large batches (65,536 rows × d = 128 in float16, 16 MiB each, 64 MiB
/// decoded) from 6 concurrent streams: without the in-flight budget each
/// stream held two decoded batches and a received one at once (over 1 GiB);
/// now they wait for in-flight room, the peak RSS stays within the budget
/// and `vcid_inflight_bytes` shows the bytes held, never above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_wait_for_in_flight_room() {
    const INFLIGHT: u64 = 256 << 20;
    const ROWS: usize = 65_536;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, baseline) = budgeted_daemon(dir.path(), INFLIGHT, &[], ("large", 10, 128)).await;
    let (pid, url) = (daemon.child.id(), daemon.url());
    // Two shards at most (two cores), each 8·(d² + 2Kd + 4K) bytes.
    let accumulators = 2 * Accumulator::estimated_bytes(10, 128).unwrap();
    let template = std::sync::Arc::new(f16_batch("large", ROWS, 128, 10, 1));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (http, sampling) = (daemon.http, std::sync::Arc::clone(&sampling));
        tokio::task::spawn_blocking(move || {
            let mut peak = 0u64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let (_, body) = http_get(http, "/metrics");
                let held = body
                    .lines()
                    .find_map(|l| l.strip_prefix("vcid_inflight_bytes "))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0) as u64;
                peak = peak.max(held);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let make = move |_| (*template).clone();
    let rows = push_concurrently(&url, "large", 6, 2, make).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let held_peak = sampler.await.unwrap();
    assert_eq!(rows, 6 * 2 * ROWS as u64);
    let (peak, _) = memory(pid);
    let bound = baseline + accumulators + INFLIGHT + RSS_SLACK;
    eprintln!(
        "large batches: peak RSS {} MiB (bound {} MiB), vcid_inflight_bytes peak {} MiB",
        peak >> 20,
        bound >> 20,
        held_peak >> 20
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB above the budgets' {} MiB",
        peak >> 20,
        bound >> 20
    );
    // One batch is charged ten times its 16 MiB.
    assert!(
        (160 << 20..=INFLIGHT).contains(&held_peak),
        "vcid_inflight_bytes peaked at {held_peak}"
    );
    assert_eq!(daemon_gauge(&daemon, "vcid_inflight_bytes"), 0);
}

/// Issue 11's partial-message row, scaled down: 24 streams (each on its own
/// connection) each send 24 MiB of a message declared as 25 MiB, then go
/// silent. Only as many as the in-flight budget holds are read at a time
/// (the rest are held back by HTTP/2 flow control, each connection buffering
/// at most its 4 MiB window), so the daemon's peak RSS stays within the
/// budget + those windows where it used to hold all 576 MiB; other clients
/// are served meanwhile; the message timeout ends each stream and frees its
/// bytes; a message charged more than the whole budget is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_messages_are_held_to_the_in_flight_budget() {
    const INFLIGHT: u64 = 128 << 20;
    const STREAMS: usize = 24;
    const DECLARED: u32 = 25 << 20;
    const SENT: usize = 24 << 20;
    /// The daemon's HTTP/2 connection window (`server::HTTP2_WINDOWS`).
    const WINDOW: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--message-timeout-seconds", "1"];
    let (daemon, baseline) =
        budgeted_daemon(dir.path(), INFLIGHT, &extra, ("bystander", 3, 4)).await;
    let (pid, url) = (daemon.child.id(), daemon.url());
    let mut client = connect(&url).await;

    let mut attackers = Vec::new();
    for _ in 0..STREAMS {
        // CreateRun: charged twice its size, the cheapest message to hold.
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        attackers.push(tokio::spawn(raw_partial_message(
            channel,
            "CreateRun",
            DECLARED,
            SENT,
        )));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Other clients are served meanwhile: a query and a small push.
    let run = tokio::time::timeout(Duration::from_secs(5), get_run(&mut client, "bystander"))
        .await
        .expect("GetRun answered during the attack");
    assert_eq!(run.run_id, "bystander");
    let (x, y) = dataset(1, 8, 3, 4, 1.0);
    let pushed = tokio::time::timeout(
        Duration::from_secs(5),
        client.push(tokio_stream::iter(batches(
            "bystander",
            "train",
            0,
            4,
            &x,
            &y,
            8,
        ))),
    )
    .await
    .expect("a small push served during the attack")
    .unwrap();
    assert_eq!(pushed.into_inner().rows_applied, 8);
    let still_running = attackers.iter().filter(|a| !a.is_finished()).count();
    assert!(still_running > 0, "the attack was over before the checks");

    for attacker in attackers {
        let status = attacker.await.unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    let (peak, _) = memory(pid);
    let bound = baseline + INFLIGHT + STREAMS as u64 * WINDOW + RSS_SLACK;
    eprintln!(
        "partial messages: peak RSS {} MiB (bound {} MiB)",
        peak >> 20,
        bound >> 20
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB above the in-flight budget's {} MiB (all sent: {} MiB)",
        peak >> 20,
        bound >> 20,
        (STREAMS * SENT) >> 20
    );
    assert_eq!(daemon_gauge(&daemon, "vcid_inflight_bytes"), 0);

    // A Push message charged more than the whole budget: refused up front.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = raw_partial_push(channel, 16 << 20, 1024).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-inflight-bytes"),
        "{}",
        status.message()
    );
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].quota_id, "max_inflight_bytes");
}
