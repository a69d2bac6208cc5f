//! `vcid plot`, `vcid history --format csv` and `vcid finish`, run as the
//! built binary against a real daemon on loopback ephemeral ports fed over
//! gRPC. The SVG is parsed (one polyline per stream and defined stretch,
//! its points placed by the values `GetHistory` returns), the PNG decoded
//! (its size and each stream's colour), the CSV compared field by field.

mod web_support;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use vcid::proto::{EpochResult, GetRunRequest};
use vcid::server::{spawn, ServeConfig};
use web_support::*;

async fn vcid(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_vcid"))
            .args(&args)
            .env_remove("VCID_ADDR")
            .env_remove("VCID_AUTH_TOKEN_FILE")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The coloured polylines of an SVG by stroke colour (grey ones are the
/// axes, ticks and grid): each a list of (x, y) pixel points. A stream's
/// legend sample is a two-point line of its colour.
fn polylines(svg: &str) -> BTreeMap<String, Vec<Vec<(f64, f64)>>> {
    let doc = roxmltree::Document::parse(svg).expect("valid XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let mut out: BTreeMap<String, Vec<Vec<(f64, f64)>>> = BTreeMap::new();
    for node in doc.descendants().filter(|n| n.has_tag_name("polyline")) {
        let stroke = node
            .attribute("stroke")
            .unwrap_or_default()
            .to_ascii_uppercase();
        let grey =
            stroke.len() == 7 && stroke[1..3] == stroke[3..5] && stroke[3..5] == stroke[5..7];
        if grey {
            continue;
        }
        let points = node
            .attribute("points")
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').expect("x,y");
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        out.entry(stroke).or_default().push(points);
    }
    out
}

fn svg_texts(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_owned()))
        .collect()
}

/// The pixel y of each value is one affine function of the value: the
/// points are drawn where the numbers say.
fn assert_affine(values: &[f64], ys: &[f64]) {
    assert_eq!(values.len(), ys.len());
    let (v0, y0) = (values[0], ys[0]);
    let (v1, y1) = (values[values.len() - 1], ys[ys.len() - 1]);
    let slope = (y1 - y0) / (v1 - v0);
    assert!(slope < 0.0, "larger values are drawn higher up");
    for (v, y) in values.iter().zip(ys) {
        let expected = y0 + slope * (v - v0);
        assert!(
            (expected - y).abs() <= 1.5,
            "value {v} at y {y}, expected {expected}"
        );
    }
}

fn stream<'a>(results: &'a [EpochResult], split: &str) -> Vec<&'a EpochResult> {
    results.iter().filter(|r| r.split == split).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plot_writes_one_line_per_stream_as_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn(ServeConfig::ephemeral(dir.path().join("data")))
        .await
        .unwrap();
    let mut client = Client::connect(server.grpc_url()).await.unwrap();
    let results = populate(&mut client, "plotted").await;
    let addr = server.grpc_url();

    // One stream, SVG: one polyline of one point per epoch, where the
    // values put it.
    let svg_path = dir.path().join("train.svg");
    let out = vcid(args(&[
        "plot",
        "plotted",
        "--split",
        "train",
        "-o",
        svg_path.to_str().unwrap(),
        "--addr",
        &addr,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 streams, 4 points of vci"));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let lines = polylines(&svg);
    let data: Vec<(&String, &Vec<(f64, f64)>)> = lines
        .iter()
        .flat_map(|(c, ls)| ls.iter().filter(|l| l.len() > 2).map(move |l| (c, l)))
        .collect();
    assert_eq!(data.len(), 1, "one data line: {lines:?}");
    let train = stream(&results, "train");
    let (color, points) = data[0];
    assert_eq!(points.len(), train.len());
    assert!(
        points.windows(2).all(|w| w[0].0 < w[1].0),
        "epochs left to right"
    );
    let values: Vec<f64> = train.iter().map(|r| r.vci.unwrap()).collect();
    assert_affine(&values, &points.iter().map(|p| p.1).collect::<Vec<_>>());
    // Its legend sample has the same colour; labels and title are there.
    assert!(lines[color].iter().any(|l| l.len() == 2), "legend sample");
    let texts = svg_texts(&svg);
    for needle in ["train/penultimate", "epoch", "VCI", "plotted: VCI"] {
        assert!(texts.iter().any(|t| t == needle), "{needle} in {texts:?}");
    }

    // Both streams: train one line; val's undefined epoch 2 breaks its line
    // into two stretches (epochs 0-1 and 3). Distinct colours.
    let both = dir.path().join("both.svg");
    let out = vcid(args(&[
        "plot",
        "plotted",
        "-o",
        both.to_str().unwrap(),
        "--addr",
        &addr,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = polylines(&std::fs::read_to_string(&both).unwrap());
    let mut by_length: Vec<Vec<usize>> = lines
        .values()
        .map(|ls| {
            let mut n: Vec<usize> = ls.iter().map(Vec::len).collect();
            n.sort_unstable();
            n
        })
        .collect();
    by_length.sort();
    // Each colour: its data stretches plus one 2-point legend sample.
    assert_eq!(by_length, vec![vec![1, 2, 2], vec![2, 4]]);
    assert!(stream(&results, "val")[2].vci.is_none());

    // PNG of the same, at a chosen size: decodes, has that size, and shows
    // both streams' colours (taken from the SVG) and no third.
    let png_path = dir.path().join("both.png");
    let out = vcid(args(&[
        "plot",
        "plotted",
        "-o",
        png_path.to_str().unwrap(),
        "--width",
        "800",
        "--height",
        "500",
        "--addr",
        &addr,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let png = image::open(&png_path).expect("a PNG file").to_rgb8();
    assert_eq!(png.dimensions(), (800, 500));
    let count = |hex: &str| {
        let rgb = [
            u8::from_str_radix(&hex[1..3], 16).unwrap(),
            u8::from_str_radix(&hex[3..5], 16).unwrap(),
            u8::from_str_radix(&hex[5..7], 16).unwrap(),
        ];
        png.pixels().filter(|p| p.0 == rgb).count()
    };
    for color in lines.keys() {
        assert!(count(color) > 100, "{color}: {} pixels", count(color));
    }
    assert_eq!(count("#E06C00"), 0, "the third palette colour is unused");

    // NC1 defaults to a log axis; the output names its metric.
    let nc1 = dir.path().join("nc1.svg");
    let out = vcid(args(&[
        "plot",
        "plotted",
        "--metric",
        "nc1",
        "-o",
        nc1.to_str().unwrap(),
        "--addr",
        &addr,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(svg_texts(&std::fs::read_to_string(&nc1).unwrap())
        .iter()
        .any(|t| t == "NC1"));

    // Bad input: exit 2 naming the argument; an unknown run: exit 1.
    let out = vcid(args(&[
        "plot", "plotted", "--metric", "vcj", "-o", "x.svg", "--addr", &addr,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--metric: expected one of vci, linear_probe_mse"));
    let out = vcid(args(&["plot", "plotted", "-o", "x.pdf", "--addr", &addr])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--output: expected a file name ending in .svg or .png"));
    let out = vcid(args(&["plot", "ghost", "-o", "x.svg", "--addr", &addr])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no run named \"ghost\""));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_csv_is_the_api_csv_and_finish_marks_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn(ServeConfig::ephemeral(dir.path())).await.unwrap();
    let mut client = Client::connect(server.grpc_url()).await.unwrap();
    populate(&mut client, "csv").await;
    let addr = server.grpc_url();
    let history = history(&mut client, "csv", "val", "").await;

    let out = vcid(args(&[
        "history", "csv", "--split", "val", "--format", "csv", "--addr", &addr,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let csv = text(&out.stdout);
    assert_csv(&csv, &history);
    let http_addr = server.http_addr();
    let api = tokio::task::spawn_blocking(move || {
        get(http_addr, "/api/v1/runs/csv/history?split=val&format=csv")
    })
    .await
    .unwrap();
    assert_eq!(api.body, csv, "one CSV, whichever way it is asked for");

    let out = vcid(args(&["finish", "csv", "--addr", &addr])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("run \"csv\" is finished (since 20"),
        "{}",
        text(&out.stdout)
    );
    let run = client
        .get_run(GetRunRequest {
            run_id: "csv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(run.finished);
    let out = vcid(args(&["runs", "--addr", &addr])).await;
    let table = text(&out.stdout);
    let row = table.lines().find(|l| l.starts_with("csv ")).unwrap();
    assert!(row.contains(" finished "), "{table}");
    let out = vcid(args(&["finish", "ghost", "--addr", &addr])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no run named \"ghost\""));
    server.stop().await.unwrap();
}
