//! `bench report DIR`: one self-contained HTML page (inline CSS and SVG, no scripts, nothing
//! fetched) of every result [`super::inputs::scan`] finds.

use std::fmt::Write as _;
use std::path::Path;

use super::inputs::{Campaign, CommitRow, Content, JoinRow, MetricsCost, Scan, ThroughputRow};
use super::{bars_svg, esc, lines_svg, Bars, Series};

const PALETTE: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

const STYLE: &str = "body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}\
h1{font-size:24px}h2{font-size:19px;margin-top:36px;border-bottom:1px solid #ccc}\
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0 16px}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
.ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}\
.src{color:#666;font-size:12px}figure{margin:8px 0}";

fn f(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |v| f(v, digits))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        r#"<span class="ok">yes</span>"#
    } else {
        r#"<span class="bad">NO</span>"#
    }
}

/// A table: header cells, then rows of already-escaped cells.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = String::from("<table><tr>");
    for h in head {
        let _ = write!(t, "<th>{}</th>", esc(h));
    }
    t.push_str("</tr>\n");
    for r in rows {
        t.push_str("<tr>");
        for c in r {
            let _ = write!(t, "<td>{c}</td>");
        }
        t.push_str("</tr>\n");
    }
    t.push_str("</table>\n");
    t
}

/// Values per round, one line per series (x: round 1..n, y linear), with a reference line at
/// `reference` if given.
fn rounds_svg(
    title: &str,
    y_label: &str,
    series: &[(String, Vec<f64>)],
    reference: Option<f64>,
) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 360.0, 70.0, 170.0, 46.0, 50.0);
    let vals = || {
        series
            .iter()
            .flat_map(|(_, v)| v.iter().copied().filter(|x| x.is_finite()))
    };
    let n = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let mut lo = vals().fold(f64::MAX, f64::min);
    let mut hi = vals().fold(f64::MIN, f64::max);
    if let Some(r) = reference {
        lo = lo.min(r);
        hi = hi.max(r);
    }
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.01).max(1e-9);
    let (lo, hi) = (lo - pad, hi + pad);
    let px = |i: usize| left + (w - left - right) * i as f64 / (n - 1) as f64;
    let py = |v: f64| top + (h - top - bottom) * (1.0 - (v - lo) / (hi - lo));
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            py(v) + 4.0,
            f(v, if hi - lo < 0.5 { 3 } else { 1 }),
            y = py(v)
        );
    }
    for i in 0..n {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(i),
            h - bottom + 16.0,
            i + 1
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">round</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"#,
        left + (w - left - right) / 2.0,
        h - 12.0,
        top + (h - top - bottom) / 2.0,
        top + (h - top - bottom) / 2.0,
        esc(y_label)
    );
    if let Some(r) = reference {
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#999" stroke-dasharray="5 4"/>"##,
            w - right,
            y = py(r)
        );
    }
    for (k, (name, v)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .filter(|(_, y)| y.is_finite())
            .map(|(i, y)| format!("{:.1},{:.1}", px(i), py(*y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for (i, y) in v.iter().enumerate().filter(|(_, y)| y.is_finite()) {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                px(i),
                py(*y)
            );
        }
        let ly = top + 18.0 * k as f64;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            w - right + 14.0,
            ly - 10.0,
            w - right + 30.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A histogram of `values` (ms) in logarithmic bins, five per decade.
fn histogram_svg(title: &str, values: &[f64], color: &str) -> String {
    let vals: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let (w, h, left, right, top, bottom) = (760.0, 320.0, 60.0, 20.0, 46.0, 56.0);
    let per_decade = 5.0;
    let (lo, hi) = if vals.is_empty() {
        (0.0, 1.0)
    } else {
        let lo = vals.iter().fold(f64::MAX, |a, &b| a.min(b)).log10();
        let hi = vals.iter().fold(f64::MIN, |a, &b| a.max(b)).log10();
        (
            (lo * per_decade).floor() / per_decade,
            ((hi * per_decade).floor() + 1.0) / per_decade,
        )
    };
    let bins = (((hi - lo) * per_decade).round() as usize).max(1);
    let mut counts = vec![0u64; bins];
    for v in &vals {
        let i = ((v.log10() - lo) * per_decade).floor().max(0.0) as usize;
        counts[i.min(bins - 1)] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let bw = (w - left - right) / bins as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for (i, &c) in counts.iter().enumerate() {
        let bh = (h - top - bottom) * c as f64 / max;
        let x = left + bw * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"/>"#,
            x + 1.0,
            h - bottom - bh,
            (bw - 2.0).max(1.0)
        );
        if c > 0 {
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{c}</text>"#,
                x + bw / 2.0,
                h - bottom - bh - 3.0
            );
        }
        let edge = 10f64.powf(lo + i as f64 / per_decade);
        let _ = write!(
            s,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            h - bottom + 14.0,
            if edge < 10.0 { f(edge, 1) } else { f(edge, 0) }
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">ms (logarithmic bins, {} values)</text></svg>"#,
        left + (w - left - right) / 2.0,
        h - 14.0,
        vals.len()
    );
    s
}

fn commit_section(rows: &[CommitRow]) -> String {
    let mut o = String::new();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                esc(&r.transport),
                r.payload_bytes.to_string(),
                r.count.to_string(),
                f(r.commit_p50_us, 2),
                f(r.commit_p99_us, 2),
                f(r.commit_p999_us, 2),
                f(r.commit_max_us, 1),
                f(r.raw_p50_us, 2),
                f(r.ratio_median, 3),
                f(r.overhead_ns_median, 0),
            ]
        })
        .collect();
    o += &table(
        &[
            "medium",
            "payload B",
            "commits",
            "commit p50 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "raw p50 µs",
            "ratio (median of rounds)",
            "overhead ns (median)",
        ],
        &body,
    );
    let groups: Vec<Bars> = rows
        .iter()
        .map(|r| Bars {
            label: r.transport.clone(),
            commit_p50: r.commit_p50_us,
            commit_p99: r.commit_p99_us,
            raw_p50: r.raw_p50_us,
        })
        .collect();
    o += "<figure>";
    o += &bars_svg(
        "Output commit next to the raw medium (µs, log scale)",
        &groups,
    );
    o += "</figure>";
    let series: Vec<(String, Vec<f64>)> = rows
        .iter()
        .filter(|r| !r.rounds.is_empty())
        .map(|r| {
            (
                r.transport.clone(),
                r.rounds.iter().map(|x| x.ratio).collect(),
            )
        })
        .collect();
    if !series.is_empty() {
        o += "<figure>";
        o += &rounds_svg(
            "Commit p50 / raw p50, per round (same round, same machine state)",
            "ratio",
            &series,
            Some(1.0),
        );
        o += "</figure>";
    }
    o
}

fn throughput_section(rows: &[ThroughputRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                esc(&r.transport),
                r.entry_bytes.to_string(),
                r.count.to_string(),
                f(r.entries_per_sec / 1e6, 2),
                f(r.mbytes_per_sec, 0),
                f(r.seconds, 2),
            ]
        })
        .collect();
    table(
        &["medium", "entry B", "entries", "M entries/s", "MB/s", "s"],
        &body,
    )
}

fn join_section(rows: &[JoinRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.mem_mib.to_string(),
                r.joins.to_string(),
                f(r.pause_p50_ms, 1),
                f(r.pause_p99_ms, 1),
                f(r.pause_max_ms, 1),
                f(r.total_p50_ms, 0),
                f(r.total_max_ms, 0),
                f(r.mib_per_join, 0),
                f(r.bw_ratio_median, 2),
                f(r.client_max_response_ms, 1),
                r.client_errors.to_string(),
            ]
        })
        .collect();
    let mut o = table(
        &[
            "guest MiB",
            "joins",
            "pause p50 ms",
            "pause p99 ms",
            "pause max ms",
            "total p50 ms",
            "total max ms",
            "MiB per join",
            "bandwidth / raw",
            "client max ms",
            "client errors",
        ],
        &body,
    );
    let point = |g: fn(&JoinRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.mem_mib as f64, g(r))).collect()
    };
    let series = [
        Series::new("pause p50", "#1f77b4", point(|r| r.pause_p50_ms)),
        Series::new("pause p99", "#aec7e8", point(|r| r.pause_p99_ms)),
        Series::new("total p50", "#ff7f0e", point(|r| r.total_p50_ms)),
        Series::new("total max", "#ffbb78", point(|r| r.total_max_ms)),
    ];
    o += "<figure>";
    o += &lines_svg(
        "Join pause and time to protected by guest memory",
        "guest memory (MiB)",
        &series,
    );
    o += "</figure>";
    o
}

fn campaign_section(c: &Campaign) -> String {
    let mut o = table(
        &["", "value"],
        &[
            vec!["arbiter".into(), esc(&c.arbiter)],
            vec![
                "faults done / asked".into(),
                format!("{} / {}", c.faults_done, c.faults_requested),
            ],
            vec!["requests".into(), c.requests.to_string()],
            vec![
                "acknowledged updates lost".into(),
                format!(
                    "{} {}",
                    c.acknowledged_lost,
                    verdict(c.acknowledged_lost == 0)
                ),
            ],
            vec![
                "split brain".into(),
                format!("{} {}", c.split_brain, verdict(c.split_brain == 0)),
            ],
            vec![
                "divergences".into(),
                format!("{} {}", c.divergences, verdict(c.divergences == 0)),
            ],
            vec!["epoch anomalies".into(), c.epoch_anomalies.to_string()],
            vec![
                "protected again after every fault".into(),
                verdict(c.protected_after_every_fault).into(),
            ],
            vec![
                "final hashes equal".into(),
                verdict(c.final_hashes_equal).into(),
            ],
            vec![
                "survivor equals its journal's replay".into(),
                c.journal_replay_matches
                    .map_or("n/a".into(), |m| verdict(m).to_string()),
            ],
            vec![
                "failover p50 / p99 ms".into(),
                format!(
                    "{} / {}",
                    opt(c.failover_ms_p50, 1),
                    opt(c.failover_ms_p99, 1)
                ),
            ],
            vec![
                "re-protected p50 / p99 ms".into(),
                format!(
                    "{} / {}",
                    opt(c.reprotect_ms_p50, 0),
                    opt(c.reprotect_ms_p99, 0)
                ),
            ],
            vec!["run time s".into(), f(c.seconds, 0)],
        ],
    );
    // Per kind: count and failover p50.
    let mut kinds: Vec<&str> = c.faults.iter().map(|x| x.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let pct = |mut v: Vec<f64>, q: f64| -> f64 {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    let rows: Vec<Vec<String>> = kinds
        .iter()
        .map(|k| {
            let fs: Vec<_> = c.faults.iter().filter(|x| x.kind == *k).collect();
            let fo: Vec<f64> = fs.iter().map(|x| x.failover_ms).collect();
            let re: Vec<f64> = fs.iter().map(|x| x.reprotect_ms).collect();
            vec![
                esc(k),
                fs.len().to_string(),
                f(pct(fo.clone(), 0.5), 1),
                f(pct(fo, 0.99), 1),
                f(pct(re, 0.5), 0),
            ]
        })
        .collect();
    o += &table(
        &[
            "fault",
            "count",
            "failover p50 ms",
            "failover p99 ms",
            "re-protected p50 ms",
        ],
        &rows,
    );
    let fo: Vec<f64> = c.faults.iter().map(|x| x.failover_ms).collect();
    let re: Vec<f64> = c.faults.iter().map(|x| x.reprotect_ms).collect();
    o += "<figure>";
    o += &histogram_svg(
        "Failover time (fault to the new epoch serving)",
        &fo,
        "#1f77b4",
    );
    o += "</figure><figure>";
    o += &histogram_svg("Re-protect time (fault to protected again)", &re, "#ff7f0e");
    o += "</figure>";
    o
}

fn metrics_cost_section(m: &MetricsCost) -> String {
    let rows: Vec<Vec<String>> = m
        .rounds
        .iter()
        .map(|r| {
            vec![
                r.round.to_string(),
                f(r.off_p50_ns, 0),
                f(r.on_p50_ns, 0),
                f(r.ratio, 4),
            ]
        })
        .collect();
    let mut o = format!(
        "<p>{} commits of {} B per round, blocks of {} alternating without/with metrics: \
         median p50 difference {:+.1} ns, of means up to p90 {} ns; cost {:+.2} % of the commit \
         p50; target ≤ 1 %: {}</p>",
        m.count,
        m.payload,
        m.block,
        m.median_overhead_ns,
        opt(m.median_trimmed_overhead_ns, 1),
        m.overhead_percent,
        verdict(m.met)
    );
    o += &table(&["round", "without p50 ns", "with p50 ns", "ratio"], &rows);
    o += "<figure>";
    o += &rounds_svg(
        "Commit p50 with / without metrics, per round",
        "ratio",
        &[(
            "with / without".to_string(),
            m.rounds.iter().map(|r| r.ratio).collect(),
        )],
        Some(1.0),
    );
    o += "</figure>";
    o
}

/// The page for `scan` of `dir`, generated at `when` (a UTC time stamp), with `notes` as
/// paragraphs in its header.
pub fn render(dir: &Path, scan: &Scan, when: &str, notes: &[String]) -> String {
    let mut o = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ftvm results</title>\
         <style>{STYLE}</style></head><body>\n<h1>ftvm results</h1>\n<p>From <code>{}</code>, \
         generated {}. {} result files.</p>\n",
        esc(&dir.display().to_string()),
        esc(when),
        scan.inputs.len()
    );
    for n in notes {
        let _ = writeln!(o, "<p>{}</p>", esc(n));
    }
    o += "<ul>";
    for i in &scan.inputs {
        let _ = write!(
            o,
            "<li>{}: <code>{}</code></li>",
            i.content.kind(),
            esc(&i.path.display().to_string())
        );
    }
    for (p, why) in &scan.skipped {
        let _ = write!(
            o,
            "<li class=\"src\">left out: <code>{}</code> ({})</li>",
            esc(&p.display().to_string()),
            esc(why)
        );
    }
    o += "</ul>\n";
    for i in &scan.inputs {
        let _ = write!(
            o,
            "<h2>{}</h2>\n<p class=\"src\">{}</p>\n",
            esc(match &i.content {
                Content::Commit(_) => "Output-commit latency per medium",
                Content::Throughput(_) => "Log throughput with batching",
                Content::Join(_) => "A backup joining a running primary",
                Content::Campaign(_) => "Fault campaign",
                Content::MetricsCost(_) => "What metrics cost the commit path",
            }),
            esc(&i.path.display().to_string())
        );
        o += &match &i.content {
            Content::Commit(rows) => commit_section(rows),
            Content::Throughput(rows) => throughput_section(rows),
            Content::Join(rows) => join_section(rows),
            Content::Campaign(c) => campaign_section(c),
            Content::MetricsCost(m) => metrics_cost_section(m),
        };
    }
    o += "</body></html>\n";
    o
}
