//! Helpers of the web view, HTTP API, run lifecycle and `vcid plot` tests:
//! raw HTTP/1.1 over loopback sockets (with headers, bodies and a
//! server-sent-events reader), a run fed over real gRPC, and the checks of
//! API JSON and CSV against `GetHistory`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{
    CloseEpochRequest, CreateRunRequest, EpochResult, FeatureBatch, GetHistoryRequest,
};

pub type Client = VciMonitorClient<tonic::transport::Channel>;

/// One HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

/// `method path` with extra headers and a body; the connection closes
/// after the response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("http connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("http read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let (status, headers) = parse_head(head);
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], "")
}

/// A server-sent-events subscription read event by event.
pub struct Events {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
}

/// One event: its name and its data parsed as JSON.
#[derive(Debug)]
pub struct Event {
    pub name: String,
    pub data: serde_json::Value,
}

impl Events {
    /// Opens `GET path` and reads the response head.
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Events {
        let mut stream = TcpStream::connect(addr).expect("sse connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut head =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("sse head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let (status, headers) = parse_head(head.trim_end());
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        Events {
            reader,
            status,
            headers,
            chunked,
        }
    }

    /// The next line of the body, without chunk framing; `None` at the end
    /// of the stream.
    fn line(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("sse read");
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            // Chunk-size lines are bare hex; event lines always have a colon
            // or are empty separators. A "0" chunk ends the body.
            if self.chunked && !line.is_empty() && line.chars().all(|c| c.is_ascii_hexdigit()) {
                if line == "0" {
                    return None;
                }
                continue;
            }
            return Some(line);
        }
    }

    /// The next event (keep-alive comments skipped); `None` when the
    /// stream ended.
    pub fn next(&mut self) -> Option<Event> {
        let mut name = String::from("message");
        let mut data = String::new();
        loop {
            let line = self.line()?;
            if line.is_empty() {
                if !data.is_empty() {
                    let data = serde_json::from_str(&data).expect("event data is JSON");
                    return Some(Event { name, data });
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("event:") {
                name = value.trim().to_owned();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            }
        }
    }
}

/// 12 rows of K = 3 classes in d = 2 whose within-class spread is
/// `shrink` times a fixed pattern (smaller: more collapsed).
pub fn three_classes(shrink: f32) -> (Vec<f32>, Vec<u32>) {
    let centres = [(0.0f32, 0.0f32), (4.0, 0.0), (0.0, 4.0)];
    let offsets = [(1.0f32, 0.5f32), (-1.0, 0.3), (0.4, -1.0), (-0.4, 0.2)];
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (k, (cx, cy)) in centres.iter().enumerate() {
        for (ox, oy) in offsets {
            features.extend([cx + shrink * ox, cy + shrink * oy]);
            labels.push(k as u32);
        }
    }
    (features, labels)
}

pub fn batch(run: &str, split: &str, epoch: u64, features: &[f32], labels: &[u32]) -> FeatureBatch {
    FeatureBatch {
        run_id: run.into(),
        split: split.into(),
        epoch,
        rows: labels.len() as u32,
        features: features
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        labels: labels.to_vec(),
        ..Default::default()
    }
}

pub async fn create(client: &mut Client, run: &str, metadata: &[(&str, &str)]) {
    client
        .create_run(CreateRunRequest {
            run_id: run.into(),
            num_classes: 3,
            feature_dim: 2,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        })
        .await
        .expect("create run");
}

/// Pushes one (split, epoch) of [`three_classes`] data and closes it;
/// with `one_class`, only class 0 is sent (VCI is then undefined).
pub async fn push_and_close(
    client: &mut Client,
    run: &str,
    split: &str,
    epoch: u64,
    shrink: f32,
    one_class: bool,
) -> EpochResult {
    let (mut x, mut y) = three_classes(shrink);
    if one_class {
        x.truncate(8);
        y.truncate(4);
    }
    client
        .push(futures::stream::iter(vec![batch(
            run, split, epoch, &x, &y,
        )]))
        .await
        .expect("push");
    client
        .close_epoch(CloseEpochRequest {
            run_id: run.into(),
            split: split.into(),
            layer: String::new(),
            epoch,
        })
        .await
        .expect("close")
        .into_inner()
}

/// Run `run` (K=3, d=2): train epochs 0..4 collapsing, val epochs 0..4 with
/// epoch 2 holding one class only (VCI undefined there). Returns the
/// results in `GetHistory` order (split, layer, epoch).
pub async fn populate(client: &mut Client, run: &str) -> Vec<EpochResult> {
    create(client, run, &[("model", "mlp"), ("dataset", "toy, \"v2\"")]).await;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for epoch in 0..4u64 {
        let shrink = 1.0 / (1.0 + epoch as f32);
        train.push(push_and_close(client, run, "train", epoch, shrink, false).await);
        val.push(push_and_close(client, run, "val", epoch, 1.5 * shrink, epoch == 2).await);
    }
    train.extend(val);
    train
}

/// The nine optional metrics of a result by field name.
fn metrics(r: &EpochResult) -> [(&'static str, Option<f64>); 9] {
    [
        ("vci", r.vci),
        ("linear_probe_mse", r.linear_probe_mse),
        ("nc1", r.nc1),
        ("cdnv", r.cdnv),
        ("class_separation", r.class_separation),
        ("equinorm", r.equinorm),
        ("equiangularity", r.equiangularity),
        ("effective_rank", r.effective_rank),
        ("vci_delta", r.vci_delta),
    ]
}

/// `GetHistory` of a run (empty filters: all).
pub async fn history(client: &mut Client, run: &str, split: &str, layer: &str) -> Vec<EpochResult> {
    client
        .get_history(GetHistoryRequest {
            run_id: run.into(),
            split: split.into(),
            layer: layer.into(),
        })
        .await
        .expect("get history")
        .into_inner()
        .results
}

/// A JSON number or null as an `Option<f64>`.
fn opt(value: &serde_json::Value, name: &str) -> Option<f64> {
    match &value[name] {
        serde_json::Value::Null => None,
        v => Some(v.as_f64().unwrap_or_else(|| panic!("{name}: {v:?}"))),
    }
}

/// Asserts every field of an API JSON result equals the gRPC result
/// (numbers bit for bit).
pub fn assert_result_json(json: &serde_json::Value, r: &EpochResult) {
    assert_eq!(json["run_id"], r.run_id.as_str());
    assert_eq!(json["split"], r.split.as_str());
    assert_eq!(json["layer"], r.layer.as_str());
    assert_eq!(json["epoch"], r.epoch);
    assert_eq!(json["samples"], r.samples);
    assert_eq!(json["classes_observed"], r.classes_observed);
    assert_eq!(json["feature_dim"], r.feature_dim);
    for (name, value) in metrics(r) {
        assert_eq!(
            opt(json, name).map(f64::to_bits),
            value.map(f64::to_bits),
            "{name} of {}/{} epoch {}",
            r.split,
            r.layer,
            r.epoch
        );
    }
    assert_eq!(json["rank_total"], r.rank_total);
    assert_eq!(json["rank_between"], r.rank_between);
    assert_eq!(json["small_sample"], r.small_sample);
    let notes: HashMap<String, String> =
        serde_json::from_value(json["notes"].clone()).expect("notes object");
    assert_eq!(notes, r.notes);
    assert_eq!(
        json["close_seconds"].as_f64().map(f64::to_bits),
        Some(r.close_seconds.to_bits())
    );
    assert_eq!(json["closed_unix_ms"], r.closed_unix_ms);
    assert_eq!(
        json.as_object().map(|o| o.len()),
        Some(22),
        "no extra fields"
    );
}

/// Splits CSV text (RFC 4180: quoted cells, doubled quotes) into rows.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(cell.is_empty() && row.is_empty(), "CSV ends with a newline");
    rows
}

/// Asserts CSV rows (header first) hold exactly the gRPC results.
pub fn assert_csv(text: &str, results: &[EpochResult]) {
    let rows = parse_csv(text);
    let header = &rows[0];
    assert_eq!(rows.len(), results.len() + 1);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("CSV column {name}"))
    };
    let num = |cell: &str| -> Option<u64> {
        (!cell.is_empty()).then(|| cell.parse::<f64>().expect("float cell").to_bits())
    };
    for (row, r) in rows[1..].iter().zip(results) {
        assert_eq!(row.len(), header.len());
        assert_eq!(row[col("run_id")], r.run_id);
        assert_eq!(row[col("split")], r.split);
        assert_eq!(row[col("layer")], r.layer);
        assert_eq!(row[col("epoch")], r.epoch.to_string());
        assert_eq!(row[col("samples")], r.samples.to_string());
        assert_eq!(row[col("classes_observed")], r.classes_observed.to_string());
        assert_eq!(row[col("feature_dim")], r.feature_dim.to_string());
        for (name, value) in metrics(r) {
            assert_eq!(num(&row[col(name)]), value.map(f64::to_bits), "{name}");
        }
        assert_eq!(row[col("rank_total")], r.rank_total.to_string());
        assert_eq!(row[col("rank_between")], r.rank_between.to_string());
        assert_eq!(row[col("small_sample")], r.small_sample.to_string());
        assert_eq!(
            num(&row[col("close_seconds")]),
            Some(r.close_seconds.to_bits())
        );
        assert_eq!(row[col("closed_unix_ms")], r.closed_unix_ms.to_string());
        let mut notes: Vec<String> = r.notes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        notes.sort();
        assert_eq!(row[col("notes")], notes.join("; "));
    }
}
