//! Result files next to the printed table: CSV for spreadsheets, and an SVG bar chart of
//! commit latency against the raw medium, so a run can be looked at without other tools; and
//! `bench report DIR`, one self-contained HTML page of every result found in a directory
//! ([`inputs`] reads them, [`page`] draws them).

pub mod inputs;
pub mod page;

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
    std::fs::write(path, bars_svg(title, groups))
        .with_context(|| format!("writing {}", path.display()))
}

/// [`write_svg`]'s chart as SVG text.
pub fn bars_svg(title: &str, groups: &[Bars]) -> String {
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
    let mut svg = svg_start(w, h, title);
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
            esc(&g.label)
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
    svg
}

/// One line of [`write_lines_svg`]: points (x, y) joined in x order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

impl Series {
    pub fn new(name: &str, color: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color: color.into(),
            points,
            dashed: false,
        }
    }

    /// Drawn dashed, without point marks (a target, say).
    pub fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
}

/// Writes a line chart with both axes logarithmic (x: base 2, y in ms: base 10): one line per
/// series, its values printed at the points. Non-finite or non-positive points are left out.
pub fn write_lines_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    create_parent(path)?;
    std::fs::write(path, lines_svg(title, x_label, series))
        .with_context(|| format!("writing {}", path.display()))
}

/// [`write_lines_svg`]'s chart as SVG text.
pub fn lines_svg(title: &str, x_label: &str, series: &[Series]) -> String {
    let (w, h, left, right, bottom, top) = (760.0, 460.0, 80.0, 170.0, 60.0, 50.0);
    let ok = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0;
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter().filter(|p| ok(p)))
    };
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x_lo = x_lo.min(x.log2());
        x_hi = x_hi.max(x.log2());
        y_lo = y_lo.min(y.log10());
        y_hi = y_hi.max(y.log10());
    }
    if x_lo > x_hi {
        (x_lo, x_hi, y_lo, y_hi) = (0.0, 1.0, 0.0, 1.0);
    }
    let (x_lo, x_hi) = (x_lo.floor() - 0.5, x_hi.ceil() + 0.5);
    let (y_lo, y_hi) = (y_lo.floor(), y_hi.ceil().max(y_lo.floor() + 1.0));
    let (plot_w, plot_h) = (w - left - right, h - top - bottom);
    let px = |x: f64| left + plot_w * (x.log2() - x_lo) / (x_hi - x_lo);
    let py = |y: f64| top + plot_h * (1.0 - (y.log10() - y_lo) / (y_hi - y_lo));
    let mut svg = svg_start(w, h, title);
    let mut d = y_lo;
    while d <= y_hi {
        let v = 10f64.powf(d);
        let y = py(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v} ms</text>"##,
            w - right,
            left - 6.0,
            y + 4.0
        );
        d += 1.0;
    }
    let mut xs: Vec<f64> = pts().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{1}" stroke="#eee"/><text x="{0:.1}" y="{2}" text-anchor="middle">{x}</text>"##,
            px(x),
            h - bottom,
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        h - bottom + 40.0,
        esc(x_label)
    );
    for (i, s) in series.iter().enumerate() {
        let mut points: Vec<(f64, f64)> = s.points.iter().copied().filter(ok).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let line: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            line.join(" "),
            s.color
        );
        if !s.dashed {
            for &(x, y) in &points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                    px(x),
                    py(y),
                    s.color,
                    px(x) + 6.0,
                    py(y) - 6.0,
                    if y < 100.0 {
                        format!("{y:.1}")
                    } else {
                        format!("{y:.0}")
                    }
                );
            }
        }
        let ly = top + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{2}" stroke-width="2"{dash}/><text x="{3}" y="{4}">{5}</text>"#,
            w - right + 15.0,
            w - right + 40.0,
            s.color,
            w - right + 46.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// An SVG document's opening: size, white background, the title centred on top.
/// `text` with the characters HTML and SVG give meaning to escaped.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn svg_start(w: f64, h: f64, title: &str) -> String {
    let title = esc(title);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{title}</text>
"#,
        w / 2.0
    );
    svg
}

/// `bench report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The directory the results are in (`--json` files of `bench commit`, `throughput`,
    /// `metrics-cost`, `bench join`'s `join.json`, campaign reports); one level of
    /// subdirectories is read too.
    pub dir: std::path::PathBuf,
    /// Where to write the page (default DIR/report.html).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// A paragraph for the page's header (how the results were made, the machine); repeat
    /// for more.
    #[arg(long)]
    pub note: Vec<String>,
}

/// `seconds` since the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_stamp(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Writes the report page; returns its path.
pub fn run(args: &ReportArgs) -> anyhow::Result<std::path::PathBuf> {
    let scan = inputs::scan(&args.dir)?;
    anyhow::ensure!(
        !scan.inputs.is_empty(),
        "no results in {} (left out: {})",
        args.dir.display(),
        scan.skipped
            .iter()
            .map(|(p, why)| format!("{} ({why})", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let html = page::render(&args.dir, &scan, &utc_stamp(now), &args.note);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.dir.join("report.html"));
    create_parent(&out)?;
    std::fs::write(&out, html).with_context(|| format!("writing {}", out.display()))?;
    for i in &scan.inputs {
        println!("  {}: {}", i.content.kind(), i.path.display());
    }
    for (p, why) in &scan.skipped {
        println!("  left out {} ({why})", p.display());
    }
    println!("wrote {}", out.display());
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_stamps_are_civil_dates() {
        assert_eq!(super::utc_stamp(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc_stamp(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(super::utc_stamp(1_796_444_619), "2026-12-05 04:23 UTC");
    }

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            super::esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
