//! The report's charts: line charts over rounds, as SVG files (plotters'
//! SVG backend, labels as `<text>`). Labels that come from clients (metric
//! names) are reduced to a safe alphabet before they reach a chart.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::collect::per_client;
use super::{JobReport, Participation};

/// One line of a chart.
pub struct Series {
    pub label: String,
    /// (round, value)
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dashed: bool,
}

/// Where the legend goes: away from where the lines are expected.
#[derive(Debug, Clone, Copy)]
pub enum Legend {
    UpperRight,
    LowerRight,
}

/// A chart written to `path`.
pub struct Chart {
    pub title: String,
    pub path: PathBuf,
}

/// Lines beyond this many get no legend entry (hundreds of sites would
/// bury the plot); their lines are still drawn.
const MAX_LEGEND: usize = 12;

/// At most this many client-reported metric names get a chart each.
const MAX_REPORTED_CHARTS: usize = 6;

/// The tab10 palette, cycled.
pub fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    P[i % P.len()]
}

/// Letters, digits, space and `_.:-()/+,` kept, anything else `?`, at
/// most 40 chars (no `<`, `&` or quote reaches the SVG).
pub fn safe_label(s: &str) -> String {
    s.chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.:- ()/+,".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A chart's x axis: rounds 1..=n, or simulated seconds 0..=max.
#[derive(Debug, Clone, Copy)]
pub enum XAxis {
    Rounds(u32),
    Seconds(f64),
}

/// A line chart of `series` over `x`. `y_range`: fixed, or (None) the
/// data's range with a margin.
pub fn line_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    x: XAxis,
    y_range: Option<(f64, f64)>,
    legend: Legend,
    series: &[Series],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let (lo, hi) = y_range.unwrap_or_else(|| data_range(series));
    let (x_range, x_desc, x_labels) = match x {
        XAxis::Rounds(n) => {
            let n = f64::from(n.max(1));
            (0.5f64..n + 0.5, "round", (n as usize).min(20))
        }
        XAxis::Seconds(max) => (0.0f64..max.max(1.0) * 1.02, "simulated seconds", 10),
    };
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(x_labels)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(8)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = s.color;
        let style = color.stroke_width(2);
        let drawn = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(s.points.clone(), 8, 5, style))
                .map_err(|e| err(&e))?
        } else {
            chart
                .draw_series(LineSeries::new(s.points.clone(), style))
                .map_err(|e| err(&e))?
        };
        if i < MAX_LEGEND {
            drawn.label(safe_label(&s.label)).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(match legend {
                Legend::UpperRight => SeriesLabelPosition::UpperRight,
                Legend::LowerRight => SeriesLabelPosition::LowerRight,
            })
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// min..max of every point, widened by 5% (by 1 when flat; 0..1 when empty).
fn data_range(series: &[Series]) -> (f64, f64) {
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 1.0, hi + 1.0);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// Every chart of the report, in page order.
pub fn draw_all(report: &JobReport, out: &Path) -> Result<Vec<Chart>> {
    let rounds = report.rounds.iter().map(|r| r.round).max().unwrap_or(1);
    let mut charts = Vec::new();
    let by_round = XAxis::Rounds(rounds);
    let mut chart = |x: XAxis, file: &str, title: String, y: &str, range, series: Vec<Series>| {
        let path = out.join(file);
        // Accuracy curves rise: their legend goes where they are not.
        let legend = if matches!(file, "baselines.svg" | "async.svg") {
            Legend::LowerRight
        } else {
            Legend::UpperRight
        };
        line_chart(&path, &title, y, x, range, legend, &series)?;
        charts.push(Chart { title, path });
        anyhow::Ok(())
    };

    // The aggregated metrics (medians of the clients' reports), without
    // the counts (next chart) and the `:mean` twins.
    let mut names: Vec<&String> = report
        .rounds
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter(|k| !k.starts_with("clients_") && !k.ends_with(":mean"))
        .collect();
    names.sort();
    names.dedup();
    let aggregated = names
        .iter()
        .enumerate()
        .map(|(i, name)| Series {
            label: (*name).clone(),
            points: report
                .rounds
                .iter()
                .filter_map(|r| Some((f64::from(r.round), *r.metrics.get(*name)?)))
                .filter(|p| p.1.is_finite())
                .collect(),
            color: color(i),
            dashed: false,
        })
        .collect();
    chart(
        by_round,
        "aggregate.svg",
        "Aggregated metrics (median of the accepted clients' reports)".into(),
        "value",
        None,
        aggregated,
    )?;

    if !report.baselines.is_empty() {
        let series = report
            .baselines
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                label: c.label.clone(),
                points: c
                    .values
                    .iter()
                    .enumerate()
                    .map(|(r, v)| ((r + 1) as f64, *v))
                    .filter(|p| p.1.is_finite())
                    .collect(),
                color: color(i),
                dashed: i > 0,
            })
            .collect();
        chart(
            by_round,
            "baselines.svg",
            "Test accuracy: federated and baselines".into(),
            "test accuracy",
            Some((0.0, 1.0)),
            series,
        )?;
    }

    if let Some(t) = &report.against_time {
        let series = t
            .curves
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                label: c.label.clone(),
                points: c.points.clone(),
                color: color(i),
                dashed: false,
            })
            .collect();
        chart(
            XAxis::Seconds(t.seconds),
            "async.svg",
            t.title.clone(),
            "test accuracy",
            Some((0.0, 1.0)),
            series,
        )?;
    }

    let states = [
        (Participation::Accepted, "accepted"),
        (Participation::Rejected, "rejected"),
        (Participation::Late, "late"),
        (Participation::Silent, "silent"),
    ];
    let participation = states
        .iter()
        .enumerate()
        .map(|(i, (state, label))| Series {
            label: (*label).into(),
            points: report
                .rounds
                .iter()
                .map(|r| {
                    let n = r
                        .clients
                        .iter()
                        .filter(|c| c.participation == *state)
                        .count();
                    (f64::from(r.round), n as f64)
                })
                .collect(),
            color: color(i),
            dashed: false,
        })
        .collect();
    let most = report.clients.len().max(1) as f64;
    chart(
        by_round,
        "participation.svg",
        "Participation: clients per round".into(),
        "clients",
        Some((0.0, most + 0.5)),
        participation,
    )?;

    let weights = per_client(report, |c| c.weight);
    chart(
        by_round,
        "weights.svg",
        "Each client's aggregation weight".into(),
        "weight",
        Some((0.0, 1.0)),
        client_series(report, weights),
    )?;

    // Each client's own reports, one chart per metric name (the most
    // reported first).
    let mut counts: std::collections::BTreeMap<&String, usize> = Default::default();
    for r in &report.rounds {
        for c in &r.clients {
            for k in c.reported.keys() {
                *counts.entry(k).or_default() += 1;
            }
        }
    }
    let mut reported: Vec<(&String, usize)> = counts.into_iter().collect();
    reported.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    for (i, (name, _)) in reported.into_iter().take(MAX_REPORTED_CHARTS).enumerate() {
        let per = per_client(report, |c| c.reported.get(name).copied());
        chart(
            by_round,
            &format!("client-metric-{}.svg", i + 1),
            format!("Reported by each client: {}", safe_label(name)),
            &safe_label(name),
            None,
            client_series(report, per),
        )?;
    }

    let aggregation_seconds = report
        .rounds
        .iter()
        .filter_map(|r| Some((f64::from(r.round), r.timings.aggregation_seconds?)))
        .collect();
    chart(
        by_round,
        "aggregation-seconds.svg",
        "Aggregation time per round".into(),
        "seconds",
        None,
        vec![Series {
            label: "aggregation".into(),
            points: aggregation_seconds,
            color: color(0),
            dashed: false,
        }],
    )?;
    Ok(charts)
}

/// One series per client, in the job's client order (stable colors).
fn client_series(
    report: &JobReport,
    mut points: std::collections::BTreeMap<String, Vec<(f64, f64)>>,
) -> Vec<Series> {
    report
        .clients
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            Some(Series {
                label: c.clone(),
                points: points.remove(c)?,
                color: color(i),
                dashed: false,
            })
        })
        .collect()
}
