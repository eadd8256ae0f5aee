//! Result files next to the printed table: CSV for spreadsheets, and an SVG bar chart of
//! commit latency against the raw medium, so a run can be looked at without other tools.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

/// One bar group of the chart: a medium's commit and raw round-trip percentiles (µs).
#[derive(Debug, Clone)]
pub struct Bars {
    pub label: String,
    pub commit_p50: f64,
    pub commit_p99: f64,
    pub raw_p50: f64,
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Writes `rows` (serialisable structs with the same fields) as CSV with a header line; fields
/// that are lists or records (e.g. per-round details) stay in the JSON only.
pub fn write_csv<T: serde::Serialize>(path: &Path, rows: &[T]) -> anyhow::Result<()> {
    create_parent(path)?;
    let mut out = String::new();
    let scalar = |v: &serde_json::Value| !(v.is_array() || v.is_object());
    for (i, row) in rows.iter().enumerate() {
        let value = serde_json::to_value(row)?;
        let fields = value.as_object().context("CSV rows must be structs")?;
        if i == 0 {
            let names: Vec<_> = fields
                .iter()
                .filter(|(_, v)| scalar(v))
                .map(|(k, _)| k.clone())
                .collect();
            out.push_str(&names.join(","));
            out.push('\n');
        }
        let cells: Vec<String> = fields
            .values()
            .filter(|v| scalar(v))
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Writes a grouped bar chart (log-scale µs): commit p50, commit p99 and raw p50 per medium.
pub fn write_svg(path: &Path, title: &str, groups: &[Bars]) -> anyhow::Result<()> {
    create_parent(path)?;
    let (w, h, left, bottom, top) = (
        160.0 * groups.len().max(1) as f64 + 120.0,
        420.0,
        70.0,
        60.0,
        50.0,
    );
    let plot_h = h - bottom - top;
    let max = groups
        .iter()
        .flat_map(|g| [g.commit_p50, g.commit_p99, g.raw_p50])
        .fold(1.0f64, f64::max);
    let (lo, hi) = (0.1f64.log10(), (max * 2.0).log10().ceil());
    let y = |v: f64| top + plot_h * (1.0 - (v.max(0.1).log10() - lo) / (hi - lo));
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{title}</text>
"#,
        w / 2.0
    );
    let mut decade = lo;
    while decade <= hi {
        let v = 10f64.powf(decade);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v} µs</text>"##,
            w - 20.0,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
        decade += 1.0;
    }
    let colors = [
        ("commit p50", "#1f77b4"),
        ("commit p99", "#aec7e8"),
        ("raw p50", "#ff7f0e"),
    ];
    for (i, g) in groups.iter().enumerate() {
        let x0 = left + 20.0 + 160.0 * i as f64;
        for (j, (v, (_, color))) in [g.commit_p50, g.commit_p99, g.raw_p50]
            .iter()
            .zip(colors.iter())
            .enumerate()
        {
            let x = x0 + 40.0 * j as f64;
            let top_y = y(*v);
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{top_y:.1}" width="34" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                (h - bottom - top_y).max(0.0),
                x + 17.0,
                top_y - 4.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + 57.0,
            h - bottom + 18.0,
            g.label
        );
    }
    for (j, (name, color)) in colors.iter().enumerate() {
        let x = left + 130.0 * j as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            h - 24.0,
            x + 16.0,
            h - 14.0
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}
