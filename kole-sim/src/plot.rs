//! `kole-sim bench --sweep N,N,… --plot DIR`: the in-process bench at several fleet sizes, drawn as
//! SVG charts in the shape of the KOLE paper's figures: time against nodes for registration,
//! heartbeat processing, distribution and restore, and memory per node. Axes are logarithmic, as
//! the sizes span orders of magnitude. The paper's published figures (at 1M nodes, the only size it
//! gives as numbers) are drawn beside kole's line, as separate points.
//!
//! Drawing goes through `plotters` (SVG backend only), so the charts are plain files a browser or
//! a Markdown page shows.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::report::Figures;

/// One chart: which figure, against nodes, and the paper's point (nodes, value) if it gives one.
#[derive(Clone, Copy, Debug)]
pub struct Chart {
    /// File name without extension.
    pub file: &'static str,
    /// Title.
    pub title: &'static str,
    /// The figure key (see [`crate::bench`]).
    pub key: &'static str,
    /// Unit of the y axis.
    pub unit: &'static str,
    /// The KOLE paper's value at 1M nodes, if it publishes one.
    pub paper_at_1m: Option<f64>,
}

/// The charts of the paper's figures (its numbers at 1M: registration ~260 s, heartbeats 9.2 s,
/// distribution ~73 s, restore ~20 s).
pub const CHARTS: [Chart; 5] = [
    Chart { file: "registration", title: "Registration", key: "register_s", unit: "s", paper_at_1m: Some(260.0) },
    Chart {
        file: "heartbeat",
        title: "One heartbeat from every node",
        key: "heartbeat_s",
        unit: "s",
        paper_at_1m: Some(9.2),
    },
    Chart {
        file: "distribution",
        title: "One workload to every node",
        key: "distribute_s",
        unit: "s",
        paper_at_1m: Some(73.0),
    },
    Chart {
        file: "restore",
        title: "Controller restart: restore",
        key: "restore_s",
        unit: "s",
        paper_at_1m: Some(20.0),
    },
    Chart {
        file: "memory",
        title: "Node state in memory",
        key: "cache_bytes_per_node",
        unit: "bytes per node",
        paper_at_1m: None,
    },
];

/// Errors of [`write_charts`].
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A sweep point lacks a figure a chart needs (a `--cache-only` run has no engine figures).
    #[error("the run at {nodes} nodes has no `{key}` figure (run the sweep without --cache-only)")]
    Missing {
        /// The fleet size of that run.
        nodes: u64,
        /// The figure.
        key: &'static str,
    },
    /// Fewer than two sizes: no line to draw.
    #[error("a sweep needs at least two fleet sizes, got {0}")]
    TooFew(usize),
    /// Creating the directory or drawing failed.
    #[error("writing {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// (nodes, value) of `key` in each run, in increasing node order.
pub fn series(runs: &[Figures], key: &'static str) -> Result<Vec<(f64, f64)>, PlotError> {
    let mut points = Vec::with_capacity(runs.len());
    for r in runs {
        let nodes = r.num("nodes").unwrap_or(0.0);
        let v = r.num(key).ok_or(PlotError::Missing { nodes: nodes as u64, key })?;
        points.push((nodes, v));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(points)
}

/// Writes one SVG per [`CHARTS`] entry into `dir` (created if missing); returns their paths.
pub fn write_charts(dir: &Path, runs: &[Figures]) -> Result<Vec<PathBuf>, PlotError> {
    if runs.len() < 2 {
        return Err(PlotError::TooFew(runs.len()));
    }
    std::fs::create_dir_all(dir).map_err(|e| PlotError::Write { path: dir.to_owned(), message: e.to_string() })?;
    let mut written = Vec::new();
    for chart in CHARTS {
        let points = series(runs, chart.key)?;
        let path = dir.join(format!("{}.svg", chart.file));
        draw(&path, &chart, &points).map_err(|e| PlotError::Write { path: path.clone(), message: e.to_string() })?;
        written.push(path);
    }
    Ok(written)
}

fn draw(path: &Path, chart: &Chart, kole: &[(f64, f64)]) -> Result<(), Box<dyn std::error::Error>> {
    let paper: Vec<(f64, f64)> = chart.paper_at_1m.map(|v| (1e6, v)).into_iter().collect();
    let all = || kole.iter().chain(&paper);
    let (x_lo, x_hi) = bounds(all().map(|p| p.0));
    let (y_lo, y_hi) = bounds(all().map(|p| p.1));
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?;
    c.configure_mesh()
        .x_desc("nodes")
        .y_desc(chart.unit)
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| short(*y))
        .draw()?;
    c.draw_series(LineSeries::new(kole.iter().copied(), BLUE.stroke_width(2)))?
        .label("kole (2 cores, measured)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    c.draw_series(kole.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    if !paper.is_empty() {
        c.draw_series(paper.iter().map(|&p| TriangleMarker::new(p, 7, RED.filled())))?
            .label("KOLE paper (published, 1M)")
            .legend(|(x, y)| TriangleMarker::new((x + 9, y), 6, RED.filled()));
    }
    c.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).draw()?;
    root.present()?;
    Ok(())
}

/// A log axis range around the values: a factor of 2 of room on each side.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| *v > 0.0).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi { (0.1, 10.0) } else { (lo / 2.0, hi * 2.0) }
}

/// 1k, 10M, 0.5, 2.3: short tick labels.
fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v if v >= 1.0 => format!("{v:.0}"),
        v => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(nodes: u64, scale: f64) -> Figures {
        let mut f = Figures::default();
        f.int("nodes", nodes);
        for c in CHARTS {
            f.float(c.key, scale * nodes as f64 / 1e6);
        }
        f
    }

    #[test]
    fn writes_one_svg_per_chart_with_both_series() {
        let dir = std::env::temp_dir().join(format!("kole-plot-{}", std::process::id()));
        let files = write_charts(&dir, &[run(100_000, 1.0), run(10_000, 1.0), run(1_000_000, 1.0)]).unwrap();
        assert_eq!(files.len(), CHARTS.len());
        let reg = std::fs::read_to_string(dir.join("registration.svg")).unwrap();
        assert!(reg.starts_with("<svg") && reg.contains("Registration"), "{}", &reg[..200.min(reg.len())]);
        assert!(reg.contains("KOLE paper") && reg.contains("kole (2 cores"), "both legends");
        let mem = std::fs::read_to_string(dir.join("memory.svg")).unwrap();
        assert!(!mem.contains("KOLE paper"), "no paper point where it gives no number");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_figures_and_single_runs_are_refused() {
        let mut cache_only = Figures::default();
        cache_only.int("nodes", 5);
        let e = write_charts(Path::new("/nonexistent"), &[cache_only.clone(), cache_only]).unwrap_err();
        assert!(e.to_string().contains("without --cache-only"), "{e}");
        assert!(matches!(write_charts(Path::new("/tmp"), &[run(1, 1.0)]), Err(PlotError::TooFew(1))));
    }

    #[test]
    fn series_are_sorted_by_nodes() {
        let s = series(&[run(1_000, 1.0), run(10, 1.0)], "register_s").unwrap();
        assert_eq!(s.iter().map(|p| p.0).collect::<Vec<_>>(), [10.0, 1_000.0]);
    }
}
