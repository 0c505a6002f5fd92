//! `accuracy.svg`: test accuracy per round for the federation, the single
//! agent and the centralized bound. plotters' SVG backend without its
//! `ttf` feature writes labels as SVG `<text>` (the viewer picks the
//! font); only text measurement is approximate, so labels get room.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

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

pub fn accuracy_svg(path: &Path, title: &str, series: &[Series<'_>]) -> Result<()> {
    let rounds = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5f64..rounds as f64 + 0.5, 0f64..1.0f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("test accuracy")
        .x_labels(rounds.min(20))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(11)
        .y_label_formatter(&|y| format!("{y:.1}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    for s in series {
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| ((i + 1) as f64, v))
            .collect();
        let color = s.color;
        let style = color.stroke_width(2);
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))
                .map_err(|e| err(&e))?
        } else {
            chart
                .draw_series(LineSeries::new(points.clone(), style))
                .map_err(|e| err(&e))?
        };
        anno.label(s.label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
