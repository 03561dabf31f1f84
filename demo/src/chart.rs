//! The demo's chart: overlay size over time (allocated and apparent) for thinvm and, with
//! `--compare-qemu`, QEMU, with the end of each step marked by its number and the step
//! names in a key under the plot (names written along the time axis overlapped each other
//! and ran off the right edge).

use std::path::Path;

use plotters::prelude::*;

use crate::error::DemoError;
use crate::sample::Sample;

/// One VMM's run: its size samples and when each step ended (ms since its own start).
pub struct Series<'a> {
    pub name: &'a str,
    pub samples: &'a [Sample],
    pub step_ends_ms: &'a [u64],
}

const WIDTH: u32 = 1100;
const PLOT_HEIGHT: u32 = 560;
const KEY_LINE: u32 = 22;
const LABEL_FONT: u32 = 14;
const KEY_FONT: u32 = 15;

/// (allocated colour, apparent colour) of series `i`.
fn colours(i: usize) -> (RGBColor, RGBColor) {
    match i {
        0 => (RGBColor(200, 30, 30), RGBColor(30, 60, 200)),
        _ => (RGBColor(240, 150, 20), RGBColor(120, 40, 160)),
    }
}

/// A label to place: its text, where its anchor is (pixels) and its width.
#[derive(Clone, Debug)]
pub struct Label {
    pub text: String,
    pub x: i32,
    pub width: i32,
}

/// Places labels in a row starting at `top`: each centred on its anchor, moved inside
/// `[left, right]`, and pushed one line down (up to `max_lines`, then right) when it would
/// overlap a label already placed. Returns the top-left corner of each.
pub fn place_labels(
    labels: &[Label],
    left: i32,
    right: i32,
    top: i32,
    line_height: i32,
    max_lines: usize,
) -> Vec<(i32, i32)> {
    const GAP: i32 = 4;
    // Per line: the right edge of its last label.
    let mut ends: Vec<i32> = vec![i32::MIN; max_lines.max(1)];
    let mut out = Vec::with_capacity(labels.len());
    for l in labels {
        let x = (l.x - l.width / 2).clamp(left, (right - l.width).max(left));
        let line = ends.iter().position(|&e| e + GAP <= x);
        let (line, x) = match line {
            Some(i) => (i, x),
            // Every line is taken there: the line that frees first, further right.
            None => {
                let (i, e) = ends
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| **e)
                    .map(|(i, e)| (i, *e))
                    .unwrap_or((0, x));
                (i, (e + GAP).max(x))
            }
        };
        ends[line] = x + l.width;
        let row = i32::try_from(line).unwrap_or(i32::MAX);
        out.push((x, top.saturating_add(row.saturating_mul(line_height))));
    }
    out
}

/// Rough width of `text` in pixels for a sans-serif font of `size` pixels.
fn text_width(text: &str, size: u32) -> i32 {
    // `as` saturates: a width beyond i32::MAX pixels (never, for text) becomes i32::MAX.
    #[allow(clippy::cast_possible_truncation)]
    let width = (text.chars().count() as f64 * f64::from(size) * 0.6).ceil() as i32;
    width
}

/// Splits the step key into lines that fit `width` pixels.
fn key_lines(steps: &[String], width: i32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::from("Steps:");
    for (i, s) in steps.iter().enumerate() {
        let item = format!("  {} = {s}", i + 1);
        if text_width(&(line.clone() + &item), KEY_FONT) > width && line != "Steps:" {
            lines.push(std::mem::take(&mut line));
            line = String::from("      ");
        }
        line.push_str(&item);
    }
    lines.push(line);
    lines
}

/// Draws the chart as SVG.
pub fn draw(path: &Path, series: &[Series], steps: &[String]) -> Result<(), DemoError> {
    let err = |source| DemoError::Chart {
        path: path.to_path_buf(),
        source,
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let t_max = series
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.t_ms))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1000.0;
    let y_top = series
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.allocated.max(x.apparent)))
        .max()
        .map(mib)
        .unwrap_or(1.0)
        .max(1.0);
    // Headroom above the highest line for the step numbers (one row per series).
    let y_max = y_top * (1.12 + 0.08 * series.len() as f64);
    let key = key_lines(steps, WIDTH as i32 - 40);
    // The key's lines and the series line below them, each KEY_LINE high.
    let too_many = || DemoError::ChartKeyTooLong {
        path: path.to_path_buf(),
    };
    let height = u32::try_from(key.len() + 1)
        .ok()
        .and_then(|rows| KEY_LINE.checked_mul(rows))
        .and_then(|h| PLOT_HEIGHT.checked_add(h))
        .ok_or_else(too_many)?;
    // The top of key line `i` (at most key.len(), which fits the height above).
    let key_y = |i: usize| {
        i32::try_from(i)
            .ok()
            .and_then(|i| i.checked_mul(KEY_LINE as i32))
            .and_then(|y| y.checked_add(4))
            .ok_or_else(too_many)
    };
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (plot, key_area) = root.split_vertically(PLOT_HEIGHT);
    let title = if series.len() > 1 {
        "qcow2 overlay size while the guest fills, deletes, zero-wipes and trims: thinvm vs QEMU"
    } else {
        "thinvm: qcow2 overlay size while the guest fills, deletes, zero-wipes and trims"
    };
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the VMM's first step started (s)")
        .y_desc("overlay size (MiB)")
        .draw()
        .map_err(err)?;

    let points = |s: &Series, f: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
        s.samples
            .iter()
            .map(|x| (x.t_ms as f64 / 1000.0, mib(f(x))))
            .collect()
    };
    for (i, s) in series.iter().enumerate() {
        let (alloc_c, app_c) = colours(i);
        let width = if i == 0 { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(
                points(s, |x| x.allocated),
                alloc_c.stroke_width(width),
            ))
            .map_err(err)?
            .label(format!("{}: allocated (du)", s.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], alloc_c));
        chart
            .draw_series(DashedLineSeries::new(
                points(s, |x| x.apparent),
                8,
                5,
                app_c.stroke_width(width),
            ))
            .map_err(err)?
            .label(format!("{}: apparent (ls -l)", s.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], app_c));
        for &t in s.step_ends_ms {
            let x = t as f64 / 1000.0;
            chart
                .draw_series(LineSeries::new(
                    vec![(x, 0.0), (x, y_top * 1.05)],
                    alloc_c.mix(0.35).stroke_width(1),
                ))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        // Middle right: the step numbers take the top rows.
        .position(SeriesLabelPosition::MiddleRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;

    // Step numbers above each series' step lines, kept apart and inside the plot.
    let (x_range, _) = chart.plotting_area().get_pixel_range();
    for (i, s) in series.iter().enumerate() {
        let (alloc_c, _) = colours(i);
        let labels: Vec<Label> = s
            .step_ends_ms
            .iter()
            .enumerate()
            .map(|(n, &t)| {
                let (px, _) = chart.backend_coord(&(t as f64 / 1000.0, 0.0));
                let text = if series.len() > 1 {
                    format!("{}{}", &s.name[..1], n + 1)
                } else {
                    format!("{}", n + 1)
                };
                Label {
                    width: text_width(&text, LABEL_FONT),
                    text,
                    x: px,
                }
            })
            .collect();
        let (_, row_top) = chart.backend_coord(&(0.0, y_max * (0.985 - 0.07 * i as f64)));
        let placed = place_labels(
            &labels,
            x_range.start,
            x_range.end,
            row_top,
            LABEL_FONT as i32 + 2,
            2,
        );
        for (l, (x, y)) in labels.iter().zip(placed) {
            root.draw(&Text::new(
                l.text.clone(),
                (x, y),
                ("sans-serif", LABEL_FONT).into_font().color(&alloc_c),
            ))
            .map_err(err)?;
        }
    }

    for (i, line) in key.iter().enumerate() {
        key_area
            .draw(&Text::new(
                line.clone(),
                (20, key_y(i)?),
                ("sans-serif", KEY_FONT).into_font().color(&BLACK),
            ))
            .map_err(err)?;
    }
    if series.len() > 1 {
        let names: Vec<String> = series
            .iter()
            .map(|s| format!("{}{{n}} = end of step n under {}", &s.name[..1], s.name))
            .collect();
        key_area
            .draw(&Text::new(
                names.join(";  "),
                (20, key_y(key.len())?),
                ("sans-serif", KEY_FONT).into_font().color(&BLACK),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn label(x: i32, text: &str) -> Label {
        Label {
            text: text.into(),
            x,
            width: text_width(text, LABEL_FONT),
        }
    }

    #[test]
    fn labels_of_close_steps_do_not_overlap_and_stay_inside() {
        // Two steps ending almost together, and one at the very right edge.
        let labels = vec![
            label(100, "t1"),
            label(103, "t2"),
            label(106, "t3"),
            label(1000, "t4"),
        ];
        let placed = place_labels(&labels, 80, 1000, 50, 16, 2);
        for (i, (a, pa)) in labels.iter().zip(&placed).enumerate() {
            assert!(
                pa.0 >= 80 && pa.0 + a.width <= 1000,
                "label {i} outside: {pa:?}"
            );
            for (b, pb) in labels.iter().zip(&placed).skip(i + 1) {
                let same_line = pa.1 == pb.1;
                let apart = pa.0 + a.width <= pb.0 || pb.0 + b.width <= pa.0;
                assert!(!same_line || apart, "{a:?}@{pa:?} overlaps {b:?}@{pb:?}");
            }
        }
    }

    /// Every horizontal `<text>` element of the SVG: (left edge, y, font size, content), the
    /// left edge from its x and text-anchor.
    fn texts(svg: &str) -> Vec<(f64, f64, f64, String)> {
        let attr = |tag: &str, name: &str| -> Option<String> {
            let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            tag[start..].split('"').next().map(str::to_string)
        };
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let (tag, rest) = t.split_once('>')?;
                // (Rotated text -- the y axis title -- runs vertically.)
                if tag.contains("transform=") {
                    return None;
                }
                let content = rest.split("</text>").next()?.trim().to_string();
                let size: f64 = attr(tag, "font-size")?.parse().ok()?;
                let x: f64 = attr(tag, "x")?.parse().ok()?;
                let y: f64 = attr(tag, "y")?.parse().ok()?;
                let w = content.chars().count() as f64 * size * 0.6;
                let left = match attr(tag, "text-anchor").as_deref() {
                    Some("middle") => x - w / 2.0,
                    Some("end") => x - w,
                    _ => x,
                };
                Some((left, y, size, content))
            })
            .collect()
    }

    #[test]
    fn every_step_is_named_and_no_text_runs_off_the_chart() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("c.svg");
        let sample = |t: u64, a: u64, p: u64| Sample {
            t_ms: t,
            allocated: a << 20,
            apparent: p << 20,
        };
        let thinvm = [
            sample(0, 0, 0),
            sample(30_000, 130, 130),
            sample(60_000, 1, 1),
        ];
        let qemu = [
            sample(0, 0, 0),
            sample(40_000, 131, 131),
            sample(90_000, 3, 131),
        ];
        let steps: Vec<String> = [
            "write 128 MiB of data",
            "delete the file",
            "wipe free space with zeros",
            "fstrim",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        draw(
            &svg,
            &[
                Series {
                    name: "thinvm",
                    samples: &thinvm,
                    step_ends_ms: &[30_000, 31_000, 58_000, 60_000],
                },
                Series {
                    name: "QEMU",
                    samples: &qemu,
                    step_ends_ms: &[40_000, 41_000, 85_000, 90_000],
                },
            ],
            &steps,
        )
        .unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        let all = texts(&text);
        let key: String = all
            .iter()
            .map(|t| t.3.clone())
            .collect::<Vec<_>>()
            .join(" ");
        for (i, s) in steps.iter().enumerate() {
            assert!(key.contains(&format!("{} = {s}", i + 1)), "{key}");
        }
        for n in 1..=4 {
            assert!(all.iter().any(|t| t.3 == format!("t{n}")), "{key}");
            assert!(all.iter().any(|t| t.3 == format!("Q{n}")), "{key}");
        }
        for (left, _, size, content) in &all {
            let w = content.chars().count() as f64 * size * 0.6;
            assert!(
                *left >= 0.0 && left + w <= f64::from(WIDTH),
                "text {content:?} from x={left} ({w} px wide) runs off the {WIDTH} px chart"
            );
        }
        // The step numbers of one series never overlap each other.
        for series in ["t", "Q"] {
            let mut labels: Vec<&(f64, f64, f64, String)> = all
                .iter()
                .filter(|t| t.3.len() == 2 && t.3.starts_with(series))
                .collect();
            labels.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in labels.windows(2) {
                let width = w[0].3.len() as f64 * w[0].2 * 0.6;
                assert!(
                    w[0].1 != w[1].1 || w[0].0 + width <= w[1].0,
                    "{:?} overlaps {:?}",
                    w[0],
                    w[1]
                );
            }
        }
    }
}
