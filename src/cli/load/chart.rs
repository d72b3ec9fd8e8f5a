//! `--chart-from`: draws SVG charts from the JSON lines `clastor load --json`
//! (and the peer drivers of `scripts/perf.sh`) printed. Hand-written SVG: two
//! kinds of line chart do not need a plotting crate.
//!
//! Per scenario (the `scenario` field): throughput against connections, when
//! it was measured at more than one connection count, and the latency
//! percentiles at the smallest connection count measured. One line per
//! `series` (Clastor, a floor, a peer).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;

/// One result line, as far as the charts care.
struct Point {
    series: String,
    connections: u64,
    ops_per_s: f64,
    percentiles: [Option<f64>; 4],
}

const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "p50_us"),
    ("p90", "p90_us"),
    ("p99", "p99_us"),
    ("p99.9", "p999_us"),
];

/// Reads `input` and writes the charts into `dir`; returns the files written.
pub(super) fn draw(input: &Path, dir: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(input).with_context(|| format!("read {}", input.display()))?;
    let mut scenarios: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("bad JSON line: {line}"))?;
        let (Some(scenario), Some(series), Some(ops)) =
            (v["scenario"].as_str(), v["series"].as_str(), v["ops_per_s"].as_f64())
        else {
            continue;
        };
        let percentiles = PERCENTILES.map(|(_, field)| v[field].as_f64());
        scenarios.entry(scenario.to_owned()).or_default().push(Point {
            series: series.to_owned(),
            connections: v["connections"].as_u64().unwrap_or(1),
            ops_per_s: ops,
            percentiles,
        });
    }
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (scenario, points) in &scenarios {
        let slug = scenario
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join("-");
        let mut conns: Vec<u64> = points.iter().map(|p| p.connections).collect();
        conns.sort_unstable();
        conns.dedup();
        let series = series_names(points);
        if conns.len() > 1 {
            let lines = series
                .iter()
                .map(|s| {
                    let ys = conns
                        .iter()
                        .map(|&c| {
                            points
                                .iter()
                                .find(|p| &p.series == s && p.connections == c)
                                .map(|p| p.ops_per_s)
                        })
                        .collect();
                    (s.clone(), ys)
                })
                .collect::<Vec<_>>();
            let xs: Vec<String> = conns.iter().map(u64::to_string).collect();
            let svg = line_chart(
                &format!("{scenario}: throughput"),
                "connections",
                "ops/s (log)",
                &xs,
                &lines,
                true,
            );
            let name = format!("throughput-{slug}.svg");
            std::fs::write(dir.join(&name), svg)?;
            written.push(name);
        }
        let c0 = conns[0];
        let lines = series
            .iter()
            .filter_map(|s| {
                let p = points.iter().find(|p| &p.series == s && p.connections == c0)?;
                Some((s.clone(), p.percentiles.to_vec()))
            })
            .collect::<Vec<_>>();
        let xs: Vec<String> = PERCENTILES.iter().map(|(n, _)| (*n).to_owned()).collect();
        let title = format!("{scenario}: latency, {c0} connection(s)");
        let svg = line_chart(&title, "percentile", "µs (log)", &xs, &lines, true);
        let name = format!("latency-{slug}.svg");
        std::fs::write(dir.join(&name), svg)?;
        written.push(name);
    }
    Ok(written)
}

/// Series names in order of first appearance.
fn series_names(points: &[Point]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in points {
        if !out.contains(&p.series) {
            out.push(p.series.clone());
        }
    }
    out
}

const W: f64 = 720.0;
const H: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// A line chart over categorical x values; linear y from 0, or log y.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[String],
    lines: &[(String, Vec<Option<f64>>)],
    log_y: bool,
) -> String {
    let values = lines.iter().flat_map(|(_, ys)| ys.iter().flatten().copied());
    let max = values.clone().fold(0.0_f64, f64::max).max(1.0);
    let min = values.fold(f64::INFINITY, f64::min).max(1.0);
    let (lo, hi) = if log_y {
        (min.log10().floor(), max.log10().ceil().max(min.log10().floor() + 1.0))
    } else {
        (0.0, nice_ceiling(max))
    };
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x_at = |i: usize| LEFT + plot_w * (i as f64 + 0.5) / xs.len().max(1) as f64;
    let y_at = |v: f64| {
        let f = if log_y {
            (v.max(1.0).log10() - lo) / (hi - lo)
        } else {
            v / hi
        };
        TOP + plot_h * (1.0 - f)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    // Grid and y ticks.
    let ticks: Vec<f64> = if log_y {
        (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5).map(|k| hi * f64::from(k) / 5.0).collect()
    };
    for t in ticks {
        let y = y_at(t);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            human(t)
        );
    }
    for (i, x) in xs.iter().enumerate() {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x_at(i),
            TOP + plot_h + 18.0,
            esc(x)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        H - 10.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        esc(y_label)
    );
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>"##
    );
    for (k, (name, ys)) in lines.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let pts: Vec<String> = ys
            .iter()
            .enumerate()
            .filter_map(|(i, y)| y.map(|y| format!("{:.1},{:.1}", x_at(i), y_at(y))))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
        }
        let ly = TOP + 10.0 + 18.0 * k as f64;
        let lx = W - RIGHT + 12.0;
        let _ = write!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
