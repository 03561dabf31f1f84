//! The demo's chart: overlay size over time (allocated and apparent), with the steps marked.

use std::path::Path;

use plotters::prelude::*;

use crate::Sample;

/// Draws the chart as SVG.
pub fn draw(path: &Path, samples: &[Sample], marks: &[(u64, String)]) -> Result<(), String> {
    let err = |e: String| format!("chart {}: {e}", path.display());
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let t_max = samples.iter().map(|s| s.t_ms).max().unwrap_or(1).max(1) as f64 / 1000.0;
    let y_max = samples
        .iter()
        .map(|s| s.allocated.max(s.apparent))
        .max()
        .map(mib)
        .unwrap_or(1.0)
        .max(1.0)
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "thinvm: qcow2 overlay size while the guest fills, deletes, zero-wipes and trims",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("overlay size (MiB)")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let series = |f: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .map(|s| (s.t_ms as f64 / 1000.0, mib(f(s))))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(
            series(|s| s.allocated),
            RED.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("allocated (du)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(
            series(|s| s.apparent),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("apparent (ls -l)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    for (t, label) in marks {
        let x = *t as f64 / 1000.0;
        chart
            .draw_series(LineSeries::new(
                vec![(x, 0.0), (x, y_max)],
                BLACK.mix(0.3).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{label} done"),
                (x, y_max * 0.95),
                ("sans-serif", 12).into_font().color(&BLACK),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
