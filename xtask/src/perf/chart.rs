//! Charts of a pipe case as PNG (plotters, bitmap backend). Text is drawn by ab_glyph from
//! DejaVu Sans (Debian's fonts-dejavu-core, installed by `cargo xtask setup`), so no
//! fontconfig or freetype is involved.
//!
//! - `<case>-throughput.png`: lines/s by system;
//! - `<case>-cpu.png`: CPU-seconds per million lines by system;
//! - `<case>-latency.png`: the shipper's read→ack quantiles (cases with a fixed rate);
//! - `<case>-scaling.png`: lines/s and lines per CPU-second by worker count (scaling cases);
//! - `journal-read-cpu.png`: entries per CPU-second by reader (drawn by the journal case);
//! - `<case>-cpu.png` or `<case>-throughput.png`, and `<case>-trials.png`: a UDP case's judged
//!   figure by variant and per trial (drawn by the UDP case).

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::pipe::{Load, PipeCase, System};
use super::report::SystemResult;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (900, 480);

pub(super) fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (cargo xtask setup)"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
            .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws the case's charts; returns their paths (relative to the workspace root).
pub fn draw(
    name: &str,
    quick: bool,
    case: &PipeCase,
    load: &Load,
    results: &[SystemResult],
) -> anyhow::Result<Vec<String>> {
    register_font()?;
    let root = crate::root();
    let dir = if quick { root.join("perf/results") } else { root.join("docs/perf") };
    std::fs::create_dir_all(&dir)?;
    let path =
        |kind: &str| dir.join(format!("{name}-{kind}{}.png", if quick { "-quick" } else { "" }));
    let mut out: Vec<PathBuf> = Vec::new();
    let labels: Vec<String> = results.iter().map(|r| r.label.clone()).collect();
    let tput: Vec<f64> = results.iter().map(|r| r.median.lines_per_s).collect();
    let title = format!("{name}: lines/s ({} lines, median run)", load.lines);
    bars(&path("throughput"), &title, "lines per second", &labels, &tput)?;
    out.push(path("throughput"));
    let cpu: Vec<f64> = results.iter().map(|r| r.median.cpu_s_per_million_lines).collect();
    let title = format!("{name}: CPU-seconds per million lines (lower is better)");
    bars(&path("cpu"), &title, "CPU-seconds per million lines", &labels, &cpu)?;
    out.push(path("cpu"));
    if case.workload.rate > 0 {
        latency(&path("latency"), name, results)?;
        out.push(path("latency"));
    }
    if case.shipper.worker_counts.is_some() {
        scaling(&path("scaling"), name, results)?;
        out.push(path("scaling"));
    }
    for p in &out {
        println!("   chart: {}", p.display());
    }
    Ok(out.iter().map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).collect())
}

pub(super) const BLUE: RGBColor = RGBColor(31, 119, 180);
pub(super) const ORANGE: RGBColor = RGBColor(255, 127, 14);

fn color(label: &str) -> RGBColor {
    match label {
        l if l.starts_with("shipper") => BLUE,
        "raw" => RGBColor(127, 127, 127),
        "syslog-ng" => ORANGE,
        "rsyslog" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// A bar per label, coloured by system.
pub(super) fn bars(
    path: &PathBuf,
    title: &str,
    y: &str,
    labels: &[String],
    v: &[f64],
) -> anyhow::Result<()> {
    let colors: Vec<RGBColor> = labels.iter().map(|l| color(l)).collect();
    bars_with(path, title, y, labels, v, &colors)
}

/// A bar per label, bar `i` in `colors[i % colors.len()]`.
pub(super) fn bars_with(
    path: &PathBuf,
    title: &str,
    y: &str,
    labels: &[String],
    v: &[f64],
    colors: &[RGBColor],
) -> anyhow::Result<()> {
    let area = BitMapBackend::new(path, SIZE).into_drawing_area();
    area.fill(&WHITE)?;
    let max = v.iter().cloned().fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d((0..labels.len() as i32).into_segmented(), 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y)
        .y_label_formatter(&|v| short(*v))
        .x_label_formatter(&|s| match s {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i as usize).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, &val) in v.iter().enumerate().take(labels.len()) {
        let c = colors[i % colors.len().max(1)];
        let i = i as i32;
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), val)],
            c.filled(),
        );
        bar.set_margin(0, 0, 18, 18);
        chart.draw_series(std::iter::once(bar))?;
        let style = TextStyle::from(("sans-serif", 14).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        let at = (SegmentValue::CenterOf(i), val + max * 0.01);
        chart.draw_series(std::iter::once(Text::new(short(val), at, style)))?;
    }
    area.present().with_context(|| format!("{}", path.display()))?;
    Ok(())
}

fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 10.0 => format!("{v:.0}"),
        v => format!("{v:.2}"),
    }
}

/// The shipper's read→ack quantiles (ms), one line per shipper system.
fn latency(path: &PathBuf, name: &str, results: &[SystemResult]) -> anyhow::Result<()> {
    let area = BitMapBackend::new(path, SIZE).into_drawing_area();
    area.fill(&WHITE)?;
    let qs = ["p50", "p90", "p99", "p99.9", "max"];
    let series: Vec<(&str, Vec<f64>)> = results
        .iter()
        .filter(|r| !r.median.latency_ms.is_empty())
        .map(|r| (r.label.as_str(), r.median.latency_ms.iter().map(|(_, v)| *v).collect()))
        .collect();
    let max = series.iter().flat_map(|(_, v)| v.iter().cloned()).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&area)
        .caption(format!("{name}: read→ack latency (shipper histograms)"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((0..qs.len() as i32).into_segmented(), 0.0..max.max(1.0))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("milliseconds")
        .x_label_formatter(&|s| match s {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                qs.get(*i as usize).map(|s| s.to_string()).unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .label_style(("sans-serif", 14))
        .draw()?;
    for (label, v) in &series {
        let c = color(label);
        let points: Vec<_> =
            v.iter().enumerate().map(|(i, &y)| (SegmentValue::CenterOf(i as i32), y)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(3)))?
            .label(label.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(points.iter().map(|(x, y)| {
            Text::new(
                format!("{y:.1}"),
                (x.clone(), y + max * 0.02),
                ("sans-serif", 14).into_font(),
            )
        }))?;
    }
    chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw()?;
    area.present().with_context(|| format!("{}", path.display()))?;
    Ok(())
}

/// Lines/s and lines per CPU-second by shipper worker count.
fn scaling(path: &PathBuf, name: &str, results: &[SystemResult]) -> anyhow::Result<()> {
    let area = BitMapBackend::new(path, SIZE).into_drawing_area();
    area.fill(&WHITE)?;
    let pts: Vec<(i32, f64, f64)> = results
        .iter()
        .filter_map(|r| match r.system {
            System::Shipper { workers, rev: None } => {
                Some((workers as i32, r.median.lines_per_s, r.median.lines_per_cpu_s))
            }
            System::Shipper { rev: Some(_), .. } | System::Peer(_) => None,
        })
        .collect();
    let xmax = pts.iter().map(|p| p.0).max().unwrap_or(1) + 1;
    let ymax = pts.iter().map(|p| p.1.max(p.2)).fold(0.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&area)
        .caption(format!("{name}: shipper by worker count"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0..xmax, 0.0..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("workers")
        .y_desc("lines per second")
        .x_labels(xmax as usize + 1)
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 14))
        .draw()?;
    type Series = (&'static str, RGBColor, fn(&(i32, f64, f64)) -> f64);
    let lines: [Series; 2] = [
        ("lines/s (wall)", RGBColor(31, 119, 180), |p| p.1),
        ("lines per CPU-second", RGBColor(214, 39, 40), |p| p.2),
    ];
    for (label, c, f) in lines {
        let series: Vec<(i32, f64)> = pts.iter().map(|p| (p.0, f(p))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), c.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(series.iter().map(|&(x, y)| Circle::new((x, y), 5, c.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw()?;
    area.present().with_context(|| format!("{}", path.display()))?;
    Ok(())
}
