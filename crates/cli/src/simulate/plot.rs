//! `accuracy.svg`: test accuracy per round for the federation, the single
//! agent and the centralized bound (and, with --secure-aggregation, the
//! SecAgg+ run), drawn by the report's line chart. (With --mode async,
//! `async.svg`, accuracy against simulated time, is one of the report
//! page's charts: `job_report::charts`.)

use std::path::Path;

use anyhow::Result;
use plotters::style::RGBColor;

use crate::job_report::{line_chart, Legend, Series as Line, XAxis};

pub struct Series<'a> {
    pub label: &'a str,
    /// Accuracy after rounds 1, 2, ….
    pub values: &'a [f64],
    pub color: RGBColor,
    pub dashed: bool,
}

pub const FEDERATED: RGBColor = RGBColor(31, 119, 180);
pub const SINGLE: RGBColor = RGBColor(214, 39, 40);
pub const CENTRAL: RGBColor = RGBColor(44, 160, 44);
pub const SECURE: RGBColor = RGBColor(148, 103, 189);

pub fn accuracy_svg(path: &Path, title: &str, series: &[Series<'_>]) -> Result<()> {
    let rounds = series.iter().map(|s| s.values.len()).max().unwrap_or(1);
    let lines: Vec<Line> = series
        .iter()
        .map(|s| Line {
            label: s.label.to_string(),
            points: s
                .values
                .iter()
                .enumerate()
                .map(|(i, &v)| ((i + 1) as f64, v))
                .collect(),
            color: s.color,
            dashed: s.dashed,
        })
        .collect();
    line_chart(
        path,
        title,
        "test accuracy",
        XAxis::Rounds(u32::try_from(rounds).unwrap_or(u32::MAX)),
        Some((0.0, 1.0)),
        Legend::LowerRight,
        &lines,
    )
}
