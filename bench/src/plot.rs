//! The `--plot` picture of a `--sweep`, one line per system, drawn with plotters into a PNG:
//! for calls, throughput and p99 latency against concurrency; for the stream workloads,
//! messages per second and megabytes per second.
//!
//! Text is drawn with plotters' `ab_glyph` font backend from a font embedded in the binary, so
//! nothing depends on the fonts (or fontconfig) of the machine the bench runs on. The font is
//! DejaVu Sans from the `dejavu` crate (crate licensed MIT/Apache-2.0), which embeds the
//! upstream TTF files with `include_bytes!`; the DejaVu fonts themselves are under the
//! Bitstream Vera / DejaVu font license, a permissive free license that allows embedding and
//! redistribution.

use std::error::Error;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

/// Size of the picture in pixels: the two panels side by side.
pub const WIDTH: u32 = 1600;
pub const HEIGHT: u32 = 640;

/// The family every text of the picture uses; the embedded font is registered under it.
const FONT: &str = "sans-serif";

/// What the sweep measured, which decides the two panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measured {
    /// Calls: qps on the left, p99 latency on the right.
    Calls,
    /// Stream messages: messages per second on the left, megabytes per second on the right.
    Streams,
}

/// One measured point of a system's line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub concurrency: usize,
    /// Calls or messages per second: the left panel.
    pub throughput: f64,
    /// The right panel: p99 latency in µs for calls, MB/s for streams.
    pub second: f64,
}

/// One system's line.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// Line colours, one per system in order (the matplotlib "tab10" colours).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Registers the embedded DejaVu Sans (regular and bold) as the `sans-serif` family, once.
fn register_embedded_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font does not parse".to_string())?;
            register_font(FONT, FontStyle::Bold, dejavu::sans::bold())
                .map_err(|_| "the embedded DejaVu Sans Bold font does not parse".to_string())
        })
        .clone()
}

/// Draws `series` into a `WIDTH` x `HEIGHT` PNG at `path`, headed by `title`.
pub fn render(
    path: &Path,
    title: &str,
    measured: Measured,
    series: &[Series],
) -> Result<(), String> {
    if series.iter().all(|s| s.points.is_empty()) {
        return Err("nothing to plot".into());
    }
    register_embedded_font()?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root, title, measured, series).map_err(|e| format!("drawing {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn draw(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    measured: Measured,
    series: &[Series],
) -> Result<(), Box<dyn Error>> {
    root.fill(&WHITE)?;
    // The ab_glyph backend draws glyphs a little above the box it lays text out in: leave
    // room over the title.
    let body = root
        .margin(12, 0, 0, 0)
        .titled(title, (FONT, 26, FontStyle::Bold))?;
    let (_, body_height) = body.dim_in_pixel();
    let (panels, legend) = body.split_vertically(body_height.saturating_sub(56));
    let panels = panels.split_evenly((1, 2));

    // Both panels share the x axis: concurrency on a log2 scale, a tick at each value swept.
    let mut concurrencies: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.concurrency as f64))
        .collect();
    concurrencies.sort_by(f64::total_cmp);
    concurrencies.dedup();
    let x_lo = concurrencies[0].max(1.0) / 1.5;
    let x_hi = concurrencies[concurrencies.len() - 1].max(1.0) * 1.5;
    let x_axis = || {
        (x_lo..x_hi)
            .log_scale()
            .base(2.0)
            .with_key_points(concurrencies.clone())
    };
    let x_desc = "concurrency (callers in flight, log2 scale)";

    // Left: throughput, linear from zero.
    let (caption, y_desc) = match measured {
        Measured::Calls => ("Throughput (higher is better)", "qps (calls per second)"),
        Measured::Streams => ("Messages (higher is better)", "messages per second"),
    };
    let qps_max = max_of(series, |p| Some(p.throughput))
        .unwrap_or(0.0)
        .max(1.0);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(caption, (FONT, 22))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(x_axis(), 0.0..qps_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|c| format!("{c:.0}"))
        .y_label_formatter(&|v| compact(*v))
        .y_max_light_lines(1)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()?;
    draw_lines(&mut chart, series, |p| {
        p.throughput.is_finite().then_some(p.throughput)
    })?;

    match measured {
        Measured::Calls => draw_latency(&panels[1], x_axis(), x_desc, series)?,
        Measured::Streams => draw_bandwidth(&panels[1], x_axis(), x_desc, series)?,
    }
    draw_legend(&legend, series)?;
    Ok(())
}

/// The x axis both panels share.
type XAxis =
    plotters::coord::combinators::WithKeyPoints<plotters::coord::combinators::LogCoord<f64>>;

/// The right panel for calls: p99 latency on a log scale.
fn draw_latency(
    panel: &DrawingArea<BitMapBackend<'_>, Shift>,
    x_axis: XAxis,
    x_desc: &str,
    series: &[Series],
) -> Result<(), Box<dyn Error>> {
    // Right: p99 latency on a log scale (points without a latency, from failed runs, are left
    // out: zero has no place on it).
    let positive = |v: f64| (v.is_finite() && v > 0.0).then_some(v);
    let p99_lo = min_of(series, |p| positive(p.second)).unwrap_or(1.0) / 2.0;
    let p99_hi = max_of(series, |p| positive(p.second)).unwrap_or(1.0) * 2.0;
    let mut chart = ChartBuilder::on(panel)
        .caption("p99 latency (lower is better)", (FONT, 22))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(
            x_axis,
            (p99_lo..p99_hi)
                .log_scale()
                .with_key_points(log_ticks(p99_lo, p99_hi))
                .with_light_points(decade_steps(
                    p99_lo,
                    p99_hi,
                    &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                )),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("p99 latency (µs, log scale)")
        .x_label_formatter(&|c| format!("{c:.0}"))
        .y_label_formatter(&|v| compact(*v))
        .y_max_light_lines(1)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()?;
    draw_lines(&mut chart, series, |p| positive(p.second))?;

    Ok(())
}

/// The right panel for streams: megabytes per second, linear from zero.
fn draw_bandwidth(
    panel: &DrawingArea<BitMapBackend<'_>, Shift>,
    x_axis: XAxis,
    x_desc: &str,
    series: &[Series],
) -> Result<(), Box<dyn Error>> {
    let mb_max = max_of(series, |p| Some(p.second)).unwrap_or(0.0).max(1.0);
    let mut chart = ChartBuilder::on(panel)
        .caption("Bandwidth (higher is better)", (FONT, 22))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(x_axis, 0.0..mb_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("MB/s (payload bytes)")
        .x_label_formatter(&|c| format!("{c:.0}"))
        .y_label_formatter(&|v| compact(*v))
        .y_max_light_lines(1)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()?;
    draw_lines(&mut chart, series, |p| {
        p.second.is_finite().then_some(p.second)
    })?;
    Ok(())
}

/// Each series as a line with a marker at every point, leaving out the points `value`
/// rejects.
fn draw_lines<'a, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<XAxis, Y>>,
    series: &[Series],
    value: impl Fn(&Point) -> Option<f64>,
) -> Result<(), Box<dyn Error>>
where
    Y: Ranged<ValueType = f64>,
{
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = line_of(s, &value);
        chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|&xy| Circle::new(xy, 5, color.filled())))?;
    }
    Ok(())
}

/// One legend for both panels, in a row under them: a line with a marker, then the name.
fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    series: &[Series],
) -> Result<(), Box<dyn Error>> {
    const SWATCH: i32 = 36;
    const GAP: i32 = 10;
    const SPACING: i32 = 36;
    const PAD: i32 = 12;
    let label = (FONT, 18)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let mut widths = Vec::with_capacity(series.len());
    for s in series {
        let (w, _) = area.estimate_text_size(&s.name, &label)?;
        widths.push(SWATCH + GAP + w as i32);
    }
    let total = widths.iter().sum::<i32>() + SPACING * (widths.len() as i32 - 1).max(0);
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let cy = h / 2;
    let mut x = ((w - total) / 2).max(PAD);
    area.draw(&Rectangle::new(
        [(x - PAD, cy - 16), (x + total + PAD, cy + 16)],
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    for (i, (s, width)) in series.iter().zip(&widths).enumerate() {
        let color = COLORS[i % COLORS.len()];
        area.draw(&PathElement::new(
            vec![(x, cy), (x + SWATCH, cy)],
            color.stroke_width(2),
        ))?;
        area.draw(&Circle::new((x + SWATCH / 2, cy), 5, color.filled()))?;
        area.draw(&Text::new(s.name.as_str(), (x + SWATCH + GAP, cy), &label))?;
        x += width + SPACING;
    }
    Ok(())
}

/// `s`'s points as (concurrency, value) in concurrency order, leaving out those `value`
/// rejects.
fn line_of(s: &Series, value: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = s
        .points
        .iter()
        .filter_map(|p| value(p).map(|v| (p.concurrency as f64, v)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

fn max_of(series: &[Series], value: impl Fn(&Point) -> Option<f64>) -> Option<f64> {
    all_values(series, value).max_by(f64::total_cmp)
}

fn min_of(series: &[Series], value: impl Fn(&Point) -> Option<f64>) -> Option<f64> {
    all_values(series, value).min_by(f64::total_cmp)
}

fn all_values<'a>(
    series: &'a [Series],
    value: impl Fn(&Point) -> Option<f64> + 'a,
) -> impl Iterator<Item = f64> + 'a {
    series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter_map(move |p| value(p).filter(|v| v.is_finite()))
}

/// Every multiple in `multipliers` of every power of ten, inside `lo..=hi`.
fn decade_steps(lo: f64, hi: f64, multipliers: &[f64]) -> Vec<f64> {
    let mut steps = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        steps.extend(
            multipliers
                .iter()
                .map(|m| decade * m)
                .filter(|v| (lo..=hi).contains(v)),
        );
        decade *= 10.0;
    }
    steps
}

/// Ticks for a log axis over `lo..hi` (both positive): 1, 2, 5 times the powers of ten, or
/// just the powers of ten when that range spans many decades; every 1..9 times them when
/// fewer than three 1-2-5 ticks fall inside.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if (hi / lo).log10() > 4.0 {
        return decade_steps(lo, hi, &[1.0]);
    }
    let ticks = decade_steps(lo, hi, &[1.0, 2.0, 5.0]);
    if ticks.len() >= 3 {
        ticks
    } else {
        decade_steps(lo, hi, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    }
}

/// A short axis label: 950, 1.5k, 20k, 1.2M.
fn compact(v: f64) -> String {
    let trim = |x: f64| {
        let s = format!("{x:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    };
    match v.abs() {
        a if a >= 1e6 => format!("{}M", trim(v / 1e6)),
        a if a >= 1e3 => format!("{}k", trim(v / 1e3)),
        _ => trim(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// The width and height in a PNG's header (the IHDR chunk comes first).
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(
            bytes.len() > 24,
            "too short for a PNG: {} bytes",
            bytes.len()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (be(16), be(20))
    }

    fn made_up() -> Vec<Series> {
        let line = |name: &str, scale: f64| Series {
            name: name.to_string(),
            points: [1, 4, 16, 64, 256]
                .iter()
                .map(|&c| Point {
                    concurrency: c,
                    throughput: scale * 10_000.0 * (c as f64).sqrt(),
                    second: 40.0 * c as f64 / scale,
                })
                .collect(),
        };
        vec![
            line("gorpc-tokio", 2.0),
            line("tonic", 1.0),
            line("raw", 3.0),
        ]
    }

    fn render_to_temp(measured: Measured, series: &[Series]) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("sweep.png");
        render(
            &path,
            "made-up sweep, payload 1024 B, 1 connection",
            measured,
            series,
        )
        .expect("the plot renders");
        std::fs::read(&path).expect("the plot was written")
    }

    #[test]
    fn renders_a_png_of_the_expected_size() {
        for measured in [Measured::Calls, Measured::Streams] {
            let bytes = render_to_temp(measured, &made_up());
            assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG");
            assert_eq!(png_size(&bytes), (WIDTH, HEIGHT));
        }
    }

    #[test]
    fn renders_degenerate_data() {
        // One concurrency, a failed run (all zeros) and a system without points.
        let series = vec![
            Series {
                name: "one".into(),
                points: vec![Point {
                    concurrency: 8,
                    throughput: 1234.0,
                    second: 99.0,
                }],
            },
            Series {
                name: "failed".into(),
                points: vec![Point {
                    concurrency: 8,
                    throughput: 0.0,
                    second: 0.0,
                }],
            },
            Series {
                name: "empty".into(),
                points: vec![],
            },
        ];
        for measured in [Measured::Calls, Measured::Streams] {
            let bytes = render_to_temp(measured, &series);
            assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG");
            assert_eq!(png_size(&bytes), (WIDTH, HEIGHT));
        }
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("empty.png");
        assert!(render(&path, "empty", Measured::Calls, &[]).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn log_ticks_fall_inside_the_range() {
        assert_eq!(
            log_ticks(15.0, 1200.0),
            [20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
        assert_eq!(log_ticks(1.0, 1e6), [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]);
        // Too narrow for three 1-2-5 ticks.
        assert_eq!(log_ticks(21.0, 49.0), [30.0, 40.0]);
        for (lo, hi) in [(0.3, 0.9), (2.1, 4.7), (49.5, 198.0), (7.0, 7e5)] {
            let ticks = log_ticks(lo, hi);
            assert!(!ticks.is_empty(), "{lo}..{hi}");
            assert!(ticks.iter().all(|&t| t >= lo && t <= hi), "{lo}..{hi}");
        }
    }

    #[test]
    fn compact_labels() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(950.0), "950");
        assert_eq!(compact(2.5), "2.5");
        assert_eq!(compact(1500.0), "1.5k");
        assert_eq!(compact(20_000.0), "20k");
        assert_eq!(compact(1_250_000.0), "1.25M");
    }
}
