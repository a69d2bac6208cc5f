//! Rows of issue 11's table ("trust under abuse") as tests against a real
//! daemon on loopback: poisoned statistics are refused at the door with
//! nothing applied (a u64-wrapping count, huge means into an epoch with
//! honest rows, a scatter that is not positive semi-definite) and the
//! honest rows survive a graceful restart; transport and message limits
//! (concurrent streams per connection, connections, a message that stops
//! arriving, metadata size, long names in errors, an empty run_id, accept
//! errors at the open-file limit).

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
        .uri("/vcid.v1.VciMonitor/Push")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(StreamBody::new(chunks)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), channel.oneshot(request))
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
