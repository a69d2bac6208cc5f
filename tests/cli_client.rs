//! The command-line client (`vcid runs`, `vcid history`, `vcid delete`) and
//! `vcid demo`, run as the built binary against a real daemon on ephemeral
//! loopback ports. The daemon is started in-process (`vcid::server::spawn`) so the
//! test knows its bound address; data goes in over the generated tonic
//! client, and what the binary prints is checked against what the server
//! returns over gRPC.

mod web_support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;
use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{
    CloseEpochRequest, CreateRunRequest, EpochResult, FeatureBatch, GetHistoryRequest,
    GetRunRequest,
};
use vcid::server::{spawn, ServeConfig, ServerHandle};
use web_support::three_classes;

type Client = VciMonitorClient<tonic::transport::Channel>;

async fn start(auth_token: Option<&str>) -> (ServerHandle, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        auth_token: auth_token.map(str::to_owned),
        ..ServeConfig::ephemeral(dir.path())
    };
    (spawn(config).await.unwrap(), dir)
}

/// Runs the built binary off the async runtime (it talks to the server that
/// runs on it), with the VCID_* variables of the caller's shell removed.
async fn vcid(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vcid"));
        cmd.args(&args)
            .env_remove("VCID_ADDR")
            .env_remove("VCID_AUTH_TOKEN_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn batch(run: &str, split: &str, epoch: u64, features: &[f32], labels: &[u32]) -> FeatureBatch {
    FeatureBatch {
        run_id: run.into(),
        split: split.into(),
        epoch,
        rows: labels.len() as u32,
        features: f32_bytes(features).into(),
        labels: labels.to_vec(),
        ..Default::default()
    }
}

async fn push(client: &mut Client, batches: Vec<FeatureBatch>) {
    client.push(futures::stream::iter(batches)).await.unwrap();
}

async fn close(client: &mut Client, run: &str, split: &str, epoch: u64) -> EpochResult {
    client
        .close_epoch(CloseEpochRequest {
            run_id: run.into(),
            split: split.into(),
            layer: String::new(),
            epoch,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Run "alpha" (K=3, d=2): train epochs 0 and 1 closed, val epoch 0 closed
/// with one class only (VCI undefined), train epoch 2 left open.
/// Run "beta" (K=2, d=5): created, nothing pushed.
async fn populate(client: &mut Client) -> Vec<EpochResult> {
    client
        .create_run(CreateRunRequest {
            run_id: "alpha".into(),
            num_classes: 3,
            feature_dim: 2,
            metadata: HashMap::from([
                ("model".to_string(), "mlp".to_string()),
                ("dataset".to_string(), "toy".to_string()),
            ]),
        })
        .await
        .unwrap();
    client
        .create_run(CreateRunRequest {
            run_id: "beta".into(),
            num_classes: 2,
            feature_dim: 5,
            metadata: HashMap::new(),
        })
        .await
        .unwrap();
    let (f0, l0) = three_classes(1.0);
    let (f1, l1) = three_classes(0.25);
    push(client, vec![batch("alpha", "train", 0, &f0, &l0)]).await;
    push(client, vec![batch("alpha", "train", 1, &f1, &l1)]).await;
    // val: only class 0 observed, so VCI is undefined for it.
    push(
        client,
        vec![batch(
            "alpha",
            "val",
            0,
            &[1.0, 2.0, 1.5, 2.5, 0.5, 1.0],
            &[0, 0, 0],
        )],
    )
    .await;
    push(client, vec![batch("alpha", "train", 2, &f1, &l1)]).await;
    vec![
        close(client, "alpha", "train", 0).await,
        close(client, "alpha", "train", 1).await,
        close(client, "alpha", "val", 0).await,
    ]
}

/// The cells of the table line whose first cells are `prefix`.
fn row<'a>(table: &'a str, prefix: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.len() >= prefix.len() && cells[..prefix.len()] == *prefix)
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{table}"))
}

/// Index of a column by its header.
fn column(table: &str, name: &str) -> usize {
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    header
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lists_every_run_with_its_counts() {
    let (server, _dir) = start(None).await;
    let mut client = Client::connect(server.grpc_url()).await.unwrap();
    populate(&mut client).await;
    let addr = server.grpc_url();

    let out = vcid(&["runs", "--addr", &addr], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    // alpha: K 3, d 2, 12+12+3+12 rows, 1 open epoch, 3 closed.
    assert_eq!(
        row(&table, &["alpha"]),
        [
            "alpha",
            "3",
            "2",
            "39",
            "1",
            "3",
            "running",
            "dataset=toy,model=mlp"
        ]
    );
    assert_eq!(
        row(&table, &["beta"]),
        ["beta", "2", "5", "0", "0", "0", "running", "-"]
    );

    // The address without scheme works as well, and JSON matches GetRun.
    let plain = addr.trim_start_matches("http://");
    let out = vcid(&["runs", "--addr", plain, "--format", "json"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let alpha = client
        .get_run(GetRunRequest {
            run_id: "alpha".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let json_alpha = runs.iter().find(|r| r["run_id"] == "alpha").unwrap();
    assert_eq!(json_alpha["rows_ingested"], alpha.rows_ingested);
    assert_eq!(json_alpha["closed_epochs"], 3);
    assert_eq!(json_alpha["metadata"]["model"], "mlp");
    assert_eq!(json_alpha["open_epochs"][0]["epoch"], 2);
    assert_eq!(json_alpha["open_epochs"][0]["samples"], 12);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_prints_the_servers_epoch_results() {
    let (server, _dir) = start(None).await;
    let mut client = Client::connect(server.grpc_url()).await.unwrap();
    let closed = populate(&mut client).await;
    let addr = server.grpc_url();
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "alpha".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(history, closed);
    let train1 = &history[1];
    assert!(
        train1.vci.unwrap() < history[0].vci.unwrap(),
        "toy data collapses"
    );

    let out = vcid(&["history", "alpha", "--addr", &addr], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let vci = column(&table, "VCI");
    let nc1 = column(&table, "NC1");
    let delta = column(&table, "VCI_DELTA");
    let n = column(&table, "N");
    for result in &history[..2] {
        let cells = row(&table, &["train", "penultimate", &result.epoch.to_string()]);
        let shown: f64 = cells[vci].parse().unwrap();
        assert!(
            (shown - result.vci.unwrap()).abs() <= 5e-5,
            "{shown} vs {:?}",
            result.vci
        );
        let shown: f64 = cells[nc1].parse().unwrap();
        let want = result.nc1.unwrap();
        assert!(
            (shown - want).abs() <= 5e-4 * want.abs().max(1.0),
            "{shown} vs {want}"
        );
        assert_eq!(cells[n], "12");
    }
    // The first epoch has no delta; the second shows its sign.
    assert_eq!(row(&table, &["train", "penultimate", "0"])[delta], "-");
    assert!(row(&table, &["train", "penultimate", "1"])[delta].starts_with('-'));
    // One class observed: VCI is "-", and the reason is printed.
    let val = row(&table, &["val", "penultimate", "0"]);
    assert_eq!(val[vci], "-");
    assert!(table.contains("undefined metrics:"), "{table}");
    assert!(history[2].notes.contains_key("vci"));
    assert!(table.contains(&history[2].notes["vci"]), "{table}");
    // The open epoch 2 is not history.
    assert!(!table
        .lines()
        .any(|l| l.starts_with("train") && l.split_whitespace().nth(2) == Some("2")));

    // --split filters; JSON carries the exact values and null for undefined.
    let out = vcid(
        &[
            "history", "alpha", "--addr", &addr, "--split", "val", "--format", "json",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["split"], "val");
    assert!(results[0]["vci"].is_null());
    let out = vcid(
        &[
            "history", "alpha", "--addr", &addr, "--split", "train", "--format", "json",
        ],
        &[],
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    // The binary prints the shortest exact representation; serde_json's
    // default parser may be off by one ulp, hence the 1e-15 tolerance.
    let same = |json: &serde_json::Value, want: Option<f64>| {
        let (got, want) = (json.as_f64().unwrap(), want.unwrap());
        (got - want).abs() <= 1e-15 * want.abs()
    };
    assert!(same(&doc["results"][1]["vci"], train1.vci));
    assert!(same(
        &doc["results"][1]["effective_rank"],
        train1.effective_rank
    ));
    assert!(same(&doc["results"][0]["nc1"], history[0].nc1));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_run_or_the_address() {
    let (server, _dir) = start(None).await;
    let addr = server.grpc_url();

    let out = vcid(&["history", "nope", "--addr", &addr], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no run named \"nope\""),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());

    let out = vcid(&["history", "bad name!", "--addr", &addr], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("run_id"), "{}", stderr(&out));

    // A port nothing listens on: bind one, note it, free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    let out = vcid(&["runs", "--addr", &dead], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("cannot reach the vcid server at {dead}")),
        "{}",
        stderr(&out)
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_run_and_says_what_it_held() {
    let (server, _dir) = start(None).await;
    let mut client = Client::connect(server.grpc_url()).await.unwrap();
    populate(&mut client).await;
    let addr = server.grpc_url();

    let out = vcid(&["delete", "alpha", "--addr", &addr], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // What GetRun said before: 39 rows, 3 closed epochs, 1 open (train 2).
    assert_eq!(
        stdout(&out),
        "deleted run \"alpha\" (K=3, d=2, rows ingested 39, closed epochs 3, open epochs 1)\n"
    );
    // Gone from `vcid runs`, from GetRun and from `vcid history`; beta stays.
    let out = vcid(&["runs", "--addr", &addr], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(!table.lines().any(|l| l.starts_with("alpha")), "{table}");
    assert_eq!(
        row(&table, &["beta"]),
        ["beta", "2", "5", "0", "0", "0", "running", "-"]
    );
    let status = client
        .get_run(GetRunRequest {
            run_id: "alpha".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let out = vcid(&["history", "alpha", "--addr", &addr], &[]).await;
    assert_eq!(out.status.code(), Some(1));

    // Deleting it again (or any unknown run): exit 1, the run named,
    // nothing on stdout, nothing else deleted.
    for name in ["alpha", "nope"] {
        let out = vcid(&["delete", name, "--addr", &addr], &[]).await;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let want = format!("vcid: error: no run named \"{name}\"");
        assert!(stderr(&out).starts_with(&want), "{}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }
    // The address from the environment; the last run goes, nothing is left.
    let out = vcid(&["delete", "beta"], &[("VCID_ADDR", &addr)]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("deleted run \"beta\" (K=2, d=5,"));
    let out = vcid(&["runs", "--addr", &addr], &[]).await;
    assert_eq!(stdout(&out), "no runs\n");

    // An unreachable daemon is named as such.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    let out = vcid(&["delete", "beta", "--addr", &dead], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("cannot reach the vcid server at {dead}")),
        "{}",
        stderr(&out)
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_from_flag_or_environment() {
    let (server, dir) = start(Some("s3cret-token")).await;
    let addr = server.grpc_url();
    let good = dir.path().join("good.token");
    let bad = dir.path().join("bad.token");
    std::fs::write(&good, "s3cret-token\n").unwrap();
    std::fs::write(&bad, "wrong").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();

    let out = vcid(&["runs", "--addr", &addr], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("requires a valid bearer token"),
        "{}",
        stderr(&out)
    );

    let out = vcid(
        &["runs", "--addr", &addr, "--auth-token-file", &path(&bad)],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bearer token"), "{}", stderr(&out));

    let out = vcid(
        &["runs", "--addr", &addr, "--auth-token-file", &path(&good)],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "no runs\n");

    // `vcid delete` needs the token too, and with it reaches the server.
    let out = vcid(&["delete", "ghost", "--addr", &addr], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("requires a valid bearer token"),
        "{}",
        stderr(&out)
    );
    let out = vcid(
        &[
            "delete",
            "ghost",
            "--addr",
            &addr,
            "--auth-token-file",
            &path(&good),
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no run named \"ghost\""),
        "{}",
        stderr(&out)
    );

    // Both settings from the environment.
    let out = vcid(
        &["runs"],
        &[("VCID_ADDR", &addr), ("VCID_AUTH_TOKEN_FILE", &path(&good))],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "no runs\n");
    server.stop().await.unwrap();
}

/// The README's main command, shortened: it must finish by itself, exit 0
/// and print a train VCI that falls every epoch, with val collapsing less.
#[test]
fn demo_prints_a_collapsing_train_vci() {
    let out = Command::new(env!("CARGO_BIN_EXE_vcid"))
        .args(["demo", "--epochs", "3", "--epoch-ms", "0"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{}\n{}", text, stderr(&out));
    let header: Vec<&str> = text
        .lines()
        .find(|l| l.trim_start().starts_with("EPOCH"))
        .unwrap()
        .split_whitespace()
        .collect();
    let train = header.iter().position(|h| *h == "VCI_TRAIN").unwrap();
    let val = header.iter().position(|h| *h == "VCI_VAL").unwrap();
    let rows: Vec<(u64, f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            let epoch = cells.first()?.parse().ok()?;
            Some((epoch, cells[train].parse().ok()?, cells[val].parse().ok()?))
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "{text}"
    );
    for pair in rows.windows(2) {
        assert!(pair[1].1 < pair[0].1, "train VCI must fall: {rows:?}");
    }
    assert!(rows[0].1 > 0.5 && rows[2].1 < 0.05, "{rows:?}");
    assert!(
        rows[2].2 > rows[2].1,
        "val collapses less than train: {rows:?}"
    );
}

/// Runs the built binary with a stdout pipe whose reader is already gone
/// (`vcid history RUN | head` after head exited), so every write fails.
async fn vcid_into_closed_pipe(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        Command::new(env!("CARGO_BIN_EXE_vcid"))
            .args(&args)
            .env_remove("VCID_ADDR")
            .env_remove("VCID_AUTH_TOKEN_FILE")
            .stdout(writer)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_pipe_ends_quietly_with_status_0() {
    let (server, _dir) = start(None).await;
    let mut client = Client::connect(server.grpc_url()).await.unwrap();
    populate(&mut client).await;
    let addr = server.grpc_url();
    for args in [
        vec!["runs", "--addr", &addr],
        vec!["runs", "--addr", &addr, "--format", "json"],
        vec!["history", "alpha", "--addr", &addr],
        vec!["history", "alpha", "--addr", &addr, "--format", "json"],
    ] {
        let out = vcid_into_closed_pipe(&args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }
    // Errors still go to stderr with their status.
    let out = vcid_into_closed_pipe(&["history", "nope", "--addr", &addr]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no run named \"nope\""),
        "{}",
        stderr(&out)
    );
    server.stop().await.unwrap();
}
