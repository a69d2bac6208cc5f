//! `vcid plot RUN -o FILE.svg|FILE.png`: a chart file of one metric over
//! epochs, one line per (split, layer) stream, with a legend and axis
//! labels, for papers and reports.
//!
//! Reads the run's history over gRPC (`GetHistory`) and draws it with
//! `plotters`: SVG through its SVG backend, PNG through its bitmap backend.
//! Text is laid out with DejaVu Sans, embedded in the binary
//! (`fonts/DejaVuSans.ttf`, through plotters' pure-Rust `ab_glyph`
//! feature), so neither format needs fontconfig, FreeType or any other
//! system library. Owns the chart's look; every value drawn is the daemon's
//! as received, and an undefined value is a gap in its line, never a guess.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::client::{self, ConnectArgs};
use super::CliError;
use crate::metrics::registry::{self, Metric};
use crate::proto::EpochResult;

/// The font family name the embedded font is registered under.
const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

/// Line colours, in stream order (the web view's palette, darkened where
/// needed to read on white).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x60, 0xc4),
    RGBColor(0x37, 0x87, 0x2d),
    RGBColor(0xe0, 0x6c, 0x00),
    RGBColor(0x8f, 0x3b, 0xb8),
    RGBColor(0xc4, 0x16, 0x2a),
    RGBColor(0x9a, 0x7b, 0x00),
    RGBColor(0x00, 0x8b, 0x8b),
    RGBColor(0x6e, 0x6e, 0x6e),
];

/// Y axis scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scale {
    /// Logarithmic for NC1 and CDNV, linear for the rest.
    Auto,
    Linear,
    Log,
}

/// Arguments of `vcid plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The run to plot.
    pub run: String,
    /// The metric on the y axis (one of vci, linear_probe_mse, nc1, cdnv,
    /// class_separation, equinorm, equiangularity, effective_rank,
    /// vci_delta).
    #[arg(long, default_value = "vci")]
    pub metric: String,
    /// Only this split (e.g. train); default: every split.
    #[arg(long)]
    pub split: Option<String>,
    /// Only this layer (e.g. penultimate); default: every layer.
    #[arg(long)]
    pub layer: Option<String>,
    /// The file to write; its extension, .svg or .png, picks the format.
    #[arg(short, long, value_name = "FILE.svg|FILE.png")]
    pub output: PathBuf,
    /// Y axis scale.
    #[arg(long, value_enum, default_value_t = Scale::Auto)]
    pub scale: Scale,
    /// Width in pixels.
    #[arg(long, default_value_t = 960, value_parser = clap::value_parser!(u32).range(200..=8000))]
    pub width: u32,
    /// Height in pixels.
    #[arg(long, default_value_t = 540, value_parser = clap::value_parser!(u32).range(150..=8000))]
    pub height: u32,
    /// Title above the chart [default: "<run>: <metric>"].
    #[arg(long)]
    pub title: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// The file formats `vcid plot` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Svg,
    Png,
}

impl FileFormat {
    /// The format an output path asks for, by its extension.
    pub fn of(path: &Path) -> Result<FileFormat, CliError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("svg") => Ok(FileFormat::Svg),
            Some("png") => Ok(FileFormat::Png),
            _ => Err(CliError::Input(format!(
                "--output: expected a file name ending in .svg or .png, received {}",
                path.display()
            ))),
        }
    }
}

/// One line of the chart: a stream's defined points, in epoch order, split
/// where the metric is undefined.
#[derive(Debug, PartialEq)]
pub struct Line {
    /// `split/layer`.
    pub name: String,
    /// Runs of consecutive defined points `(epoch, value)`.
    pub segments: Vec<Vec<(i64, f64)>>,
}

/// The lines of `metric` over `results` (in `GetHistory` order: split,
/// layer, epoch). On a log axis, values ≤ 0 cannot be drawn and count as
/// undefined; how many were left out is returned too.
pub fn lines(results: &[EpochResult], metric: &Metric, log: bool) -> (Vec<Line>, usize) {
    let mut out: Vec<Line> = Vec::new();
    let mut hidden = 0;
    let mut last_stream: Option<(&str, &str)> = None;
    for r in results {
        let stream = (r.split.as_str(), r.layer.as_str());
        if last_stream != Some(stream) {
            out.push(Line {
                name: format!("{}/{}", r.split, r.layer),
                segments: vec![Vec::new()],
            });
            last_stream = Some(stream);
        }
        let Some(line) = out.last_mut() else { continue };
        let value = (metric.get)(r).filter(|v| v.is_finite());
        let drawable = value.filter(|&v| !log || v > 0.0);
        if value.is_some() && drawable.is_none() {
            hidden += 1;
        }
        match drawable {
            Some(v) => {
                let epoch = i64::try_from(r.epoch).unwrap_or(i64::MAX);
                if let Some(segment) = line.segments.last_mut() {
                    segment.push((epoch, v));
                }
            }
            None => {
                if line.segments.last().is_some_and(|s| !s.is_empty()) {
                    line.segments.push(Vec::new());
                }
            }
        }
    }
    for line in &mut out {
        line.segments.retain(|s| !s.is_empty());
    }
    (out, hidden)
}

/// Registers the embedded font with plotters (once per process).
fn register_font() -> Result<(), CliError> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(CliError::Failed(
            "the embedded chart font does not load".into(),
        ))
    }
}

/// What to draw, besides the lines.
#[derive(Debug)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub log: bool,
    pub width: u32,
    pub height: u32,
}

/// Writes `lines` to `path` as SVG or PNG.
pub fn write_chart(
    path: &Path,
    format: FileFormat,
    chart: &Chart<'_>,
    lines: &[Line],
) -> Result<(), CliError> {
    register_font()?;
    let size = (chart.width, chart.height);
    let failed = |e: String| CliError::Failed(format!("writing {}: {e}", path.display()));
    match format {
        FileFormat::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, chart, lines).map_err(failed)?;
            root.present().map_err(|e| failed(e.to_string()))
        }
        FileFormat::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, chart, lines).map_err(failed)?;
            root.present().map_err(|e| failed(e.to_string()))
        }
    }
}

/// The x and y ranges of the defined points (padded so no point sits on
/// the frame).
fn extent(lines: &[Line], log: bool) -> Option<(std::ops::Range<i64>, std::ops::Range<f64>)> {
    let points = lines.iter().flat_map(|l| l.segments.iter().flatten());
    let (mut x0, mut x1, mut y0, mut y1) = (i64::MAX, i64::MIN, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return None;
    }
    let xs = if x0 == x1 { x0 - 1..x1 + 1 } else { x0..x1 };
    let ys = if log {
        let (lo, hi) = if y0 == y1 {
            (y0 / 2.0, y1 * 2.0)
        } else {
            (y0, y1)
        };
        let pad = (hi / lo).powf(0.05);
        lo / pad..hi * pad
    } else {
        let span = if y1 > y0 {
            y1 - y0
        } else {
            y0.abs().max(1e-12)
        };
        y0 - 0.06 * span..y1 + 0.06 * span
    };
    Some((xs, ys))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart<'_>,
    lines: &[Line],
) -> Result<(), String> {
    let (xs, ys) = extent(lines, chart.log).ok_or("no defined value to draw")?;
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    if chart.log {
        draw_in(root, chart, lines, xs, ys.log_scale())
    } else {
        draw_in(root, chart, lines, xs, ys)
    }
}

fn draw_in<DB, Y>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart<'_>,
    lines: &[Line],
    xs: std::ops::Range<i64>,
    ys: Y,
) -> Result<(), String>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let text = |size: f64| (FONT, size).into_font().color(&RGBColor(0x33, 0x33, 0x33));
    let mut ctx = ChartBuilder::on(root)
        .caption(chart.title, (FONT, 22.0).into_font())
        .margin(16)
        .x_label_area_size(46)
        .y_label_area_size(72)
        .build_cartesian_2d(xs, ys)
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc("epoch")
        .y_desc(chart.y_label)
        .axis_desc_style(text(15.0))
        .label_style(text(13.0))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .axis_style(RGBColor(0x99, 0x99, 0x99))
        .x_labels(12)
        .y_labels(8)
        .draw()
        .map_err(err)?;
    let total_points: usize = lines
        .iter()
        .map(|l| l.segments.iter().map(Vec::len).sum::<usize>())
        .sum();
    let markers = total_points <= 80 * lines.len().max(1);
    for (i, line) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = color.stroke_width(2);
        for (j, segment) in line.segments.iter().enumerate() {
            let series = ctx
                .draw_series(LineSeries::new(segment.iter().copied(), style))
                .map_err(err)?;
            if j == 0 {
                series.label(line.name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                });
            }
            if markers {
                ctx.draw_series(segment.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
        }
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(0xcc, 0xcc, 0xcc))
        .label_font(text(14.0))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Runs `vcid plot`.
pub fn run(args: PlotArgs) -> Result<(), CliError> {
    let metric = registry::metric(&args.metric).ok_or_else(|| {
        CliError::Input(format!(
            "--metric: expected one of {}, received {:?}",
            registry::metric_names(),
            args.metric
        ))
    })?;
    let file_format = FileFormat::of(&args.output)?;
    let log = match args.scale {
        Scale::Auto => metric.log_scale,
        Scale::Linear => false,
        Scale::Log => true,
    };
    let results = client::fetch_history(
        &args.connect,
        &args.run,
        args.split.as_deref(),
        args.layer.as_deref(),
    )?;
    let (lines, hidden) = lines(&results, metric, log);
    if lines.iter().all(|l| l.segments.is_empty()) {
        return Err(CliError::Failed(format!(
            "run {:?} has no closed epoch with a defined {}{} to plot ({} results read)",
            args.run,
            metric.name,
            if log { " above 0 (log scale)" } else { "" },
            results.len()
        )));
    }
    if hidden > 0 {
        eprintln!(
            "vcid: note: {hidden} values of {} are <= 0 and are not drawn on the log axis",
            metric.name
        );
    }
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| format!("{}: {}", args.run, metric.label));
    let chart = Chart {
        title: &title,
        y_label: metric.label,
        log,
        width: args.width,
        height: args.height,
    };
    write_chart(&args.output, file_format, &chart, &lines)?;
    let points: usize = lines
        .iter()
        .map(|l| l.segments.iter().map(Vec::len).sum::<usize>())
        .sum();
    println!(
        "wrote {} ({} streams, {points} points of {})",
        args.output.display(),
        lines.len(),
        metric.name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(split: &str, epoch: u64, vci: Option<f64>) -> EpochResult {
        EpochResult {
            split: split.into(),
            layer: "penultimate".into(),
            epoch,
            vci,
            ..Default::default()
        }
    }

    #[test]
    fn undefined_values_split_a_line_and_streams_stay_apart() {
        let vci = registry::metric("vci").unwrap();
        let results = [
            result("train", 0, Some(0.9)),
            result("train", 1, None),
            result("train", 2, Some(0.5)),
            result("train", 3, Some(0.4)),
            result("val", 0, Some(-1.0)),
            result("val", 1, Some(0.8)),
        ];
        let (lines, hidden) = lines(&results, vci, false);
        assert_eq!(hidden, 0);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].name, "train/penultimate");
        assert_eq!(
            lines[0].segments,
            vec![vec![(0, 0.9)], vec![(2, 0.5), (3, 0.4)]]
        );
        assert_eq!(lines[1].segments, vec![vec![(0, -1.0), (1, 0.8)]]);
        // On a log axis the negative value is left out, and counted.
        let (log_lines, hidden) = super::lines(&results, vci, true);
        assert_eq!(hidden, 1);
        assert_eq!(log_lines[1].segments, vec![vec![(1, 0.8)]]);
    }

    #[test]
    fn output_extension_picks_the_format() {
        assert_eq!(FileFormat::of(Path::new("a.SVG")).unwrap(), FileFormat::Svg);
        assert_eq!(
            FileFormat::of(Path::new("x/b.png")).unwrap(),
            FileFormat::Png
        );
        assert!(FileFormat::of(Path::new("c.pdf")).is_err());
        assert!(FileFormat::of(Path::new("noext")).is_err());
    }
}
