//! The results chart: server CPU per delivery, paced latency and memory per idle
//! connection, one bar per server, drawn with `plotters` into a bitmap (text in a
//! TrueType font read at run time, DejaVu Sans from Debian's fonts-dejavu-core) and
//! encoded as PNG.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Medians, medians};
use crate::servers::Kind;
use crate::suite::Results;

const WIDTH: u32 = 1500;
const HEIGHT: u32 = 540;

/// Reads one value from a server's medians.
type Reader = fn(&Medians) -> f64;

/// One panel: a title, a unit, and per server one or two bars.
struct Panel {
    title: String,
    unit: &'static str,
    /// How to read each bar of a server from its medians.
    series: Vec<Reader>,
    decimals: usize,
    /// A dashed reference line: value and label.
    target: Option<(f64, &'static str)>,
}

fn short(kind: Kind) -> &'static str {
    match kind {
        Kind::Roomcast => "Roomcast",
        Kind::Tungstenite => "tokio-tung.",
        Kind::Fastwebsockets => "fastwebs.",
        Kind::Uws => "uWS.js",
        Kind::Ws => "Node ws",
        Kind::Floor => "floor",
    }
}

/// Draw the chart of `results` into `path`.
pub fn draw(results: &Results, path: &Path, font: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("reading font {}", font.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable font", font.display()))?;

    let sizes = results.sizes.as_ref().context("no sizes")?;
    let panels = [
        Panel {
            title: format!("Server CPU per delivery, saturated fan-out to {}", sizes.fanout.clients),
            unit: "µs",
            series: vec![|m| m.cpu_us_per_delivery],
            decimals: 3,
            target: None,
        },
        Panel {
            title: format!(
                "Latency p50 | p99, paced {}k deliveries/s to {}",
                sizes.base_paced().pace.rate() / 1000.0,
                sizes.base_paced().clients
            ),
            unit: "µs",
            series: vec![|m| m.paced_p50_us, |m| m.paced_p99_us],
            decimals: 0,
            target: None,
        },
        Panel {
            title: format!(
                "Server RSS per idle connection, {} open",
                sizes.largest_idle().map_or(0, |p| p.connections)
            ),
            unit: "KiB",
            series: vec![|m| m.idle_kib_per_conn],
            decimals: 2,
            target: Some((4.0, "target 4 KiB")),
        },
    ];
    let servers = &results.servers;
    let medians: Vec<Medians> = servers.iter().map(|&k| medians(results, k)).collect();

    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (top, body) = root.split_vertically(40);
        let heading = format!(
            "Roomcast and peers, {} ({}; medians of {} runs; lower is better)",
            results.machine.date,
            if results.quick { "quick run" } else { "full run" },
            sizes.runs
        );
        top.draw(&Text::new(
            heading,
            (WIDTH as i32 / 2, 12),
            ("sans-serif", 20).into_font().into_text_style(&top).pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(draw_error)?;
        for (area, panel) in body.split_evenly((1, panels.len())).iter().zip(&panels) {
            draw_panel(area, panel, servers, &medians)?;
        }
        root.present().map_err(draw_error)?;
    }
    write_png(path, &buffer)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    servers: &[Kind],
    medians: &[Medians],
) -> anyhow::Result<()> {
    let n = servers.len();
    let values: Vec<Vec<f64>> = medians.iter().map(|m| panel.series.iter().map(|f| f(m)).collect()).collect();
    // One far-off bar (a disturbed peer) would flatten the others: bars above four
    // times the median are cut at that height and marked with their value and "↑".
    let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
    let highest = finite.iter().copied().fold(0.0, f64::max);
    let clip = highest.min(4.0 * crate::stats::median(finite.iter().copied())).max(1e-9);
    let clip = clip.max(panel.target.map_or(0.0, |(t, _)| t));
    let top = clip * 1.18;
    let names: Vec<&str> = servers.iter().map(|&k| short(k)).collect();
    let formatter = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < n {
            names[i as usize].to_owned()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&formatter)
        .y_desc(panel.unit)
        // Rounded, so that a tick such as 0.6000000000000001 reads 0.6.
        .y_label_formatter(&|v| format!("{}", (v * 1e6).round() / 1e6))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 13))
        .draw()
        .map_err(draw_error)?;
    let colors = [RGBColor(214, 80, 40), RGBColor(70, 110, 180)];
    let roomcast = RGBColor(200, 40, 30);
    let peer = RGBColor(90, 120, 170);
    let groups = panel.series.len() as f64;
    let width = 0.7 / groups;
    let label_style =
        ("sans-serif", 12).into_font().into_text_style(area).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, (kind, vals)) in servers.iter().zip(&values).enumerate() {
        for (s, &v) in vals.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x0 = i as f64 - 0.35 + s as f64 * width;
            let color = if groups > 1.0 {
                colors[s % colors.len()]
            } else if *kind == Kind::Roomcast {
                roomcast
            } else {
                peer
            };
            let shown = v.min(clip * 1.06);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0 + 0.02, 0.0), (x0 + width - 0.02, shown)],
                    color.filled(),
                )))
                .map_err(draw_error)?;
            let text = if shown < v {
                format!("{v:.*} ↑", panel.decimals)
            } else {
                format!("{v:.*}", panel.decimals)
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (x0 + width / 2.0, shown + top * 0.01),
                    label_style.clone(),
                )))
                .map_err(draw_error)?;
        }
    }
    if let Some((value, label)) = panel.target {
        let style = ShapeStyle::from(&BLACK).stroke_width(1);
        let dashes = (0..n * 10).map(|i| {
            let x = -0.5 + i as f64 * 0.1;
            PathElement::new(vec![(x, value), (x + 0.05, value)], style)
        });
        chart.draw_series(dashes).map_err(draw_error)?;
        let left =
            ("sans-serif", 12).into_font().into_text_style(area).pos(Pos::new(HPos::Left, VPos::Bottom));
        chart
            .draw_series(std::iter::once(Text::new(label, (-0.45, value + top * 0.01), left)))
            .map_err(draw_error)?;
    }
    Ok(())
}

fn draw_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow!("drawing the chart: {error:?}")
}

fn write_png(path: &Path, rgb: &[u8]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(())
}
