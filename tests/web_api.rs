//! The HTTP API and web view routes against a real daemon on loopback
//! ephemeral ports, fed over gRPC: history JSON and CSV field by field
//! against `GetHistory`, runs against `GetRun`, errors with the gRPC codes
//! and messages, the server-sent event stream, and the token on `/` and
//! `/api` (with `/metrics` and the probes left open).

mod web_support;

use tonic::Code;
use vcid::proto::{
    CloseEpochRequest, DeleteRunRequest, FinishRunRequest, GetHistoryRequest, GetRunRequest,
};
use vcid::server::{spawn, ServeConfig, ServerHandle};
use web_support::*;

async fn start(token: Option<&str>) -> (ServerHandle, tempfile::TempDir, Client) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        auth_token: token.map(str::to_owned),
        ..ServeConfig::ephemeral(dir.path())
    };
    let server = spawn(config).await.expect("daemon starts");
    let client = Client::connect(server.grpc_url()).await.unwrap();
    (server, dir, client)
}

/// Blocking HTTP off the async runtime (the server runs on it).
async fn http<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_json_and_csv_match_get_history_field_by_field() {
    let (server, _dir, mut client) = start(None).await;
    let closed = populate(&mut client, "web").await;
    let addr = server.http_addr();

    for (query, split, layer) in [
        ("", "", ""),
        ("?split=val", "val", ""),
        ("?split=train&layer=penultimate", "train", "penultimate"),
        ("?layer=penultimate&format=json", "", "penultimate"),
    ] {
        let expected = history(&mut client, "web", split, layer).await;
        let path = format!("/api/v1/runs/web/history{query}");
        let reply = http(move || get(addr, &path)).await;
        assert_eq!(reply.status, 200, "{query}: {}", reply.body);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let doc = reply.json();
        assert_eq!(doc["run_id"], "web");
        let results = doc["results"].as_array().unwrap();
        assert_eq!(results.len(), expected.len(), "{query}");
        for (json, r) in results.iter().zip(&expected) {
            assert_result_json(json, r);
        }
    }
    // The whole history is what the closes returned, including the val
    // epoch whose VCI is undefined (null, with its reason).
    let all = history(&mut client, "web", "", "").await;
    assert_eq!(all, closed);
    let undefined = all
        .iter()
        .find(|r| r.split == "val" && r.epoch == 2)
        .unwrap();
    assert!(undefined.vci.is_none() && undefined.notes.contains_key("vci"));

    for (query, split) in [("?format=csv", ""), ("?split=val&format=csv", "val")] {
        let expected = history(&mut client, "web", split, "").await;
        let path = format!("/api/v1/runs/web/history{query}");
        let reply = http(move || get(addr, &path)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/csv; charset=utf-8")
        );
        assert_csv(&reply.body, &expected);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_match_get_run_with_their_latest_results() {
    let (server, _dir, mut client) = start(None).await;
    let closed = populate(&mut client, "web").await;
    create(&mut client, "empty", &[]).await;
    // An open epoch shows up in open_epochs.
    let (x, y) = three_classes(1.0);
    client
        .push(futures::stream::iter(vec![batch(
            "web", "train", 9, &x, &y,
        )]))
        .await
        .unwrap();
    let addr = server.http_addr();
    let list = http(move || get(addr, "/api/v1/runs")).await;
    assert_eq!(list.status, 200);
    let list = list.json();
    let runs = list["runs"].as_array().unwrap();
    let ids: Vec<&str> = runs.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["empty", "web"], "ordered by id, as ListRuns");

    for id in ["web", "empty"] {
        let run = client
            .get_run(GetRunRequest { run_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        let path = format!("/api/v1/runs/{id}");
        let one = http(move || get(addr, &path)).await;
        assert_eq!(one.status, 200);
        let one = one.json();
        let listed = runs.iter().find(|r| r["run_id"] == id).unwrap();
        for json in [&one, listed] {
            assert_eq!(json["num_classes"], run.num_classes);
            assert_eq!(json["feature_dim"], run.feature_dim);
            assert_eq!(json["created_unix_ms"], run.created_unix_ms);
            assert_eq!(json["rows_ingested"], run.rows_ingested);
            assert_eq!(json["closed_epochs"], run.closed_epochs);
            assert_eq!(json["finished"], run.finished);
            assert_eq!(json["finished_unix_ms"], run.finished_unix_ms);
            let metadata: std::collections::HashMap<String, String> =
                serde_json::from_value(json["metadata"].clone()).unwrap();
            assert_eq!(metadata, run.metadata);
            let open = json["open_epochs"].as_array().unwrap();
            assert_eq!(open.len(), run.open_epochs.len());
            for (o, p) in open.iter().zip(&run.open_epochs) {
                assert_eq!(
                    (
                        o["split"].as_str(),
                        o["layer"].as_str(),
                        o["epoch"].as_u64(),
                        o["samples"].as_u64()
                    ),
                    (
                        Some(p.split.as_str()),
                        Some(p.layer.as_str()),
                        Some(p.epoch),
                        Some(p.samples)
                    )
                );
            }
        }
    }
    // `latest` is the highest closed epoch of each stream, with its VCI.
    let web = runs.iter().find(|r| r["run_id"] == "web").unwrap();
    let latest = web["latest"].as_array().unwrap();
    assert_eq!(latest.len(), 2);
    for entry in latest {
        let split = entry["split"].as_str().unwrap();
        let last = closed
            .iter()
            .filter(|r| r.split == split)
            .max_by_key(|r| r.epoch)
            .unwrap();
        assert_eq!(entry["epoch"], last.epoch);
        assert_eq!(
            entry["vci"].as_f64().map(f64::to_bits),
            last.vci.map(f64::to_bits)
        );
    }
    let empty = runs.iter().find(|r| r["run_id"] == "empty").unwrap();
    assert_eq!(empty["latest"].as_array().map(Vec::len), Some(0));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_the_grpc_code_and_message() {
    let (server, _dir, mut client) = start(None).await;
    populate(&mut client, "web").await;
    let addr = server.http_addr();

    // Unknown run: 404 with GetHistory's / GetRun's NOT_FOUND message.
    let grpc = client
        .get_history(GetHistoryRequest {
            run_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(grpc.code(), Code::NotFound);
    for path in [
        "/api/v1/runs/ghost/history",
        "/api/v1/runs/ghost",
        "/api/v1/events?run=ghost",
    ] {
        let reply = http(move || get(addr, path)).await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json();
        assert_eq!(body["code"], "NOT_FOUND");
        assert_eq!(body["message"], grpc.message(), "{path}");
    }

    // A bad split name: 400 with GetHistory's INVALID_ARGUMENT message.
    let grpc = client
        .get_history(GetHistoryRequest {
            run_id: "web".into(),
            split: "no good".into(),
            layer: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(grpc.code(), Code::InvalidArgument);
    let reply = http(move || get(addr, "/api/v1/runs/web/history?split=no%20good")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["code"], "INVALID_ARGUMENT");
    assert_eq!(reply.json()["message"], grpc.message());

    // Query strings are checked: unknown and repeated parameters, formats.
    for (path, needles) in [
        (
            "/api/v1/runs/web/history?splt=val",
            &["query string", "split, layer, format", "\"splt\""][..],
        ),
        (
            "/api/v1/runs/web/history?split=a&split=b",
            &["split: expected at most one value"][..],
        ),
        (
            "/api/v1/runs/web/history?format=xml",
            &["format: expected json or csv", "\"xml\""][..],
        ),
        ("/api/v1/events?runs=web", &["query string", "\"runs\""][..]),
    ] {
        let reply = http(move || get(addr, path)).await;
        assert_eq!(reply.status, 400, "{path}");
        let body = reply.json();
        assert_eq!(body["code"], "INVALID_ARGUMENT");
        let message = body["message"].as_str().unwrap();
        for needle in needles {
            assert!(message.contains(needle), "{path}: {message}");
        }
    }
    let reply = http(move || get(addr, "/api/v1/nothing")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["code"], "NOT_FOUND");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_assets_are_served_from_the_binary() {
    let (server, _dir, _client) = start(None).await;
    let addr = server.http_addr();
    let page = http(move || get(addr, "/")).await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'self'"));
    // The page's configuration lists every chartable metric.
    let config = page
        .body
        .split("<script id=\"vcid-config\" type=\"application/json\">")
        .nth(1)
        .and_then(|rest| rest.split("</script>").next())
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(config).unwrap();
    let names: Vec<&str> = config["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = vcid::metrics::registry::METRICS
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, expected);
    assert_eq!(config["auth"], false);
    // Every asset the page references is served, none from elsewhere.
    for asset in [
        "/assets/app.js",
        "/assets/app.css",
        "/assets/uPlot.iife.min.js",
        "/assets/uPlot.min.css",
    ] {
        assert!(page.body.contains(asset), "{asset}");
        let reply = http(move || get(addr, asset)).await;
        assert_eq!(reply.status, 200, "{asset}");
        assert!(reply.body.len() > 1000, "{asset}");
    }
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_results_and_run_changes_as_they_happen() {
    let (server, _dir, mut client) = start(None).await;
    let addr = server.http_addr();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || {
        let mut events = Events::open(addr, "/api/v1/events", &[]);
        assert_eq!(events.status, 200);
        assert_eq!(
            events
                .headers
                .iter()
                .find(|(n, _)| n == "content-type")
                .map(|(_, v)| v.as_str()),
            Some("text/event-stream")
        );
        while let Some(event) = events.next() {
            if tx.send(event).is_err() {
                break;
            }
        }
        // The stream ended (the daemon stopped).
    });
    let hello = rx.recv().await.unwrap();
    assert_eq!(hello.name, "hello");

    create(&mut client, "live", &[("model", "m")]).await;
    let created = rx.recv().await.unwrap();
    assert_eq!(created.name, "run");
    assert_eq!(created.data["run_id"], "live");
    assert_eq!(created.data["finished"], false);

    let result = push_and_close(&mut client, "live", "train", 0, 1.0, false).await;
    let event = rx.recv().await.unwrap();
    assert_eq!(event.name, "result");
    assert_result_json(&event.data, &result);

    client
        .finish_run(FinishRunRequest {
            run_id: "live".into(),
        })
        .await
        .unwrap();
    let finished = rx.recv().await.unwrap();
    assert_eq!(finished.name, "run");
    assert_eq!(finished.data["finished"], true);

    client
        .delete_run(DeleteRunRequest {
            run_id: "live".into(),
        })
        .await
        .unwrap();
    let deleted = rx.recv().await.unwrap();
    assert_eq!(deleted.name, "run_deleted");
    assert_eq!(deleted.data["run_id"], "live");

    // A filtered stream sees only its run, and ends when it is deleted.
    populate(&mut client, "other").await;
    create(&mut client, "mine", &[]).await;
    let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
    let filtered = std::thread::spawn(move || {
        let mut events = Events::open(addr, "/api/v1/events?run=mine", &[]);
        while let Some(event) = events.next() {
            let _ = tx2.send(event);
        }
    });
    assert_eq!(rx2.recv().await.unwrap().name, "hello");
    push_and_close(&mut client, "other", "train", 7, 1.0, false).await;
    let mine = push_and_close(&mut client, "mine", "train", 0, 1.0, false).await;
    let event = rx2.recv().await.unwrap();
    assert_eq!(event.name, "result");
    assert_result_json(&event.data, &mine);
    client
        .delete_run(DeleteRunRequest {
            run_id: "mine".into(),
        })
        .await
        .unwrap();
    assert_eq!(rx2.recv().await.unwrap().name, "run_deleted");
    assert!(rx2.recv().await.is_none(), "the filtered stream ended");
    filtered.join().unwrap();

    // Shutdown ends the open stream instead of holding the daemon up.
    server.stop().await.unwrap();
    reader.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_the_page_and_api_but_not_metrics_or_probes() {
    let (server, _dir, _client) = start(Some("s3cret")).await;
    let addr = server.http_addr();
    let grpc = vcid::proto::vci_monitor_client::VciMonitorClient::connect(server.grpc_url())
        .await
        .unwrap()
        .list_runs(vcid::proto::ListRunsRequest {})
        .await
        .unwrap_err();
    assert_eq!(grpc.code(), Code::Unauthenticated);

    // Without a token: the page is the login form, the API says
    // UNAUTHENTICATED with gRPC's message.
    let page = http(move || get(addr, "/")).await;
    assert_eq!(page.status, 401);
    assert!(page.body.contains("name=\"token\"") && !page.body.contains("vcid-config"));
    for path in ["/api/v1/runs", "/api/v1/runs/x/history", "/api/v1/events"] {
        let reply = http(move || get(addr, path)).await;
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.json()["code"], "UNAUTHENTICATED");
        assert_eq!(reply.json()["message"], grpc.message());
    }
    let wrong = http(move || {
        request(
            addr,
            "GET",
            "/api/v1/runs",
            &[("Authorization", "Bearer nope")],
            "",
        )
    })
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.json()["message"]
        .as_str()
        .unwrap()
        .contains("a wrong token"));
    let right = http(move || {
        request(
            addr,
            "GET",
            "/api/v1/runs",
            &[("Authorization", "Bearer s3cret")],
            "",
        )
    })
    .await;
    assert_eq!(right.status, 200);
    assert_eq!(right.json()["runs"], serde_json::json!([]));

    // /metrics, the probes and the static assets stay open.
    for path in ["/metrics", "/healthz", "/readyz", "/assets/app.js"] {
        assert_eq!(http(move || get(addr, path)).await.status, 200, "{path}");
    }

    // The login form: a wrong token is refused, the right one sets an
    // HttpOnly cookie that opens the page, the API and the event stream.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let refused = http(move || request(addr, "POST", "/login", &form, "token=nope")).await;
    assert_eq!(refused.status, 401);
    assert!(refused.header("set-cookie").is_none());
    let login = http(move || request(addr, "POST", "/login", &form, "token=s3cret")).await;
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/"));
    let cookie = login.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let with_cookie = {
        let pair = pair.clone();
        http(move || request(addr, "GET", "/", &[("Cookie", &pair)], "")).await
    };
    assert_eq!(with_cookie.status, 200);
    assert!(with_cookie.body.contains("\"auth\":true"));
    let events = {
        let pair = pair.clone();
        http(move || {
            let mut events = Events::open(addr, "/api/v1/events", &[("Cookie", &pair)]);
            (events.status, events.next().map(|e| e.name))
        })
        .await
    };
    assert_eq!(events, (200, Some("hello".to_owned())));
    // A forged cookie is refused like a wrong header.
    let forged = http(move || {
        request(
            addr,
            "GET",
            "/api/v1/runs",
            &[("Cookie", "vcid_token=6e6f7065")],
            "",
        )
    })
    .await;
    assert_eq!(forged.status, 401);
    let logout = http(move || request(addr, "POST", "/logout", &[], "")).await;
    assert_eq!(logout.status, 303);
    assert!(logout.header("set-cookie").unwrap().contains("Max-Age=0"));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_epoch_shows_in_the_api_right_after_close_epoch_returns() {
    // Read-your-writes: the HTTP view is the daemon's state, not a cache.
    let (server, _dir, mut client) = start(None).await;
    create(&mut client, "rw", &[]).await;
    let addr = server.http_addr();
    for epoch in 0..3u64 {
        let result = push_and_close(&mut client, "rw", "train", epoch, 1.0, false).await;
        let reply = http(move || get(addr, "/api/v1/runs/rw/history")).await;
        let doc = reply.json();
        let results = doc["results"].as_array().unwrap();
        assert_eq!(results.len() as u64, epoch + 1);
        assert_result_json(results.last().unwrap(), &result);
    }
    let err = client
        .close_epoch(CloseEpochRequest {
            run_id: "rw".into(),
            split: "train".into(),
            layer: String::new(),
            epoch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await.unwrap();
}
