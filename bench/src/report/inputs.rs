//! The result files `bench report` reads: each kind recognised by its shape, read into typed
//! records (fields a file lacks take their defaults; a recognised file that does not read is
//! an error naming the file, never a panic).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// `bench commit --json`: one row per medium.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CommitRow {
    pub transport: String,
    pub payload_bytes: u64,
    pub count: u64,
    pub commit_p50_us: f64,
    pub commit_p90_us: f64,
    pub commit_p99_us: f64,
    pub commit_p999_us: f64,
    pub commit_max_us: f64,
    pub raw_p50_us: f64,
    pub raw_p99_us: f64,
    pub ratio_median: f64,
    pub overhead_ns_median: f64,
    pub rounds: Vec<CommitRound>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct CommitRound {
    pub raw_p50_us: f64,
    pub commit_p50_us: f64,
    pub ratio: f64,
    pub overhead_ns: f64,
}

/// `bench throughput --json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ThroughputRow {
    pub transport: String,
    pub entry_bytes: u64,
    pub count: u64,
    pub seconds: f64,
    pub entries_per_sec: f64,
    pub mbytes_per_sec: f64,
}

/// `bench join` (`join.json`): one row per guest memory size.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct JoinRow {
    pub mem_mib: u64,
    pub joins: u64,
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    pub total_p50_ms: f64,
    pub total_p99_ms: f64,
    pub total_max_ms: f64,
    pub mib_per_join: f64,
    pub bw_ratio_median: f64,
    pub client_max_response_ms: f64,
    pub client_errors: u64,
}

/// One fault of a campaign (`target/campaign/<arbiter>.json`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Fault {
    pub index: u64,
    pub kind: String,
    pub victim: String,
    pub winner: String,
    pub epoch: u64,
    pub failover_ms: f64,
    pub takeover_ms: Option<f64>,
    pub reprotect_ms: f64,
}

/// A fault campaign's summary.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Campaign {
    pub arbiter: String,
    pub faults_requested: u64,
    pub faults_done: u64,
    pub requests: u64,
    pub acknowledged_lost: u64,
    pub split_brain: u64,
    pub divergences: u64,
    pub epoch_anomalies: u64,
    pub protected_after_every_fault: bool,
    pub final_hashes_equal: bool,
    pub journal_replay_matches: Option<bool>,
    pub failover_ms_p50: Option<f64>,
    pub failover_ms_p99: Option<f64>,
    pub reprotect_ms_p50: Option<f64>,
    pub reprotect_ms_p99: Option<f64>,
    pub seconds: f64,
    pub faults: Vec<Fault>,
}

/// `bench metrics-cost --json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MetricsCost {
    pub payload: u64,
    pub count: u64,
    pub block: u64,
    pub median_ratio: f64,
    pub median_overhead_ns: f64,
    pub median_trimmed_overhead_ns: Option<f64>,
    pub overhead_percent: f64,
    pub met: bool,
    pub rounds: Vec<MetricsCostRound>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct MetricsCostRound {
    pub round: u32,
    pub off_p50_ns: f64,
    pub on_p50_ns: f64,
    pub ratio: f64,
}

/// What one file holds.
#[derive(Debug, Clone)]
pub enum Content {
    Commit(Vec<CommitRow>),
    Throughput(Vec<ThroughputRow>),
    Join(Vec<JoinRow>),
    Campaign(Box<Campaign>),
    MetricsCost(MetricsCost),
}

impl Content {
    /// The kind's name, as the page's sections are titled.
    pub fn kind(&self) -> &'static str {
        match self {
            Content::Commit(_) => "bench commit",
            Content::Throughput(_) => "bench throughput",
            Content::Join(_) => "bench join",
            Content::Campaign(_) => "fault campaign",
            Content::MetricsCost(_) => "bench metrics-cost",
        }
    }
}

/// A result file read.
#[derive(Debug, Clone)]
pub struct Input {
    pub path: PathBuf,
    pub content: Content,
}

fn rows_with<T: for<'de> Deserialize<'de>>(
    v: &serde_json::Value,
    key: &str,
) -> Option<Result<Vec<T>, serde_json::Error>> {
    let rows = v.get(key)?.as_array()?;
    Some(
        rows.iter()
            .map(|r| T::deserialize(r))
            .collect::<Result<Vec<T>, _>>(),
    )
}

/// Which kind `v` is by its shape, read; `None` for JSON that is none of ours.
pub fn recognise(v: &serde_json::Value) -> Option<Result<Content, serde_json::Error>> {
    let first_row_has = |key: &str| {
        v.get("rows")
            .and_then(|r| r.as_array())
            .and_then(|r| r.first())
            .is_some_and(|r| r.get(key).is_some())
    };
    if first_row_has("commit_p50_us") {
        return rows_with(v, "rows").map(|r| r.map(Content::Commit));
    }
    if first_row_has("pause_p50_ms") {
        return rows_with(v, "rows").map(|r| r.map(Content::Join));
    }
    if v.get("throughput").is_some_and(|t| t.is_array()) {
        return rows_with(v, "throughput").map(|r| r.map(Content::Throughput));
    }
    if v.get("faults").is_some_and(|f| f.is_array()) && v.get("faults_requested").is_some() {
        return Some(Campaign::deserialize(v).map(|c| Content::Campaign(Box::new(c))));
    }
    if v.get("median_overhead_ns").is_some() && v.get("rounds").is_some() {
        return Some(MetricsCost::deserialize(v).map(Content::MetricsCost));
    }
    None
}

/// Reads one file: `Err(why)` inside `Ok` if it is not one of ours (not JSON, or another
/// shape); an outer error if it is ours and does not read.
pub fn read(path: &Path) -> anyhow::Result<Result<Input, &'static str>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(Err("not JSON"));
    };
    match recognise(&value) {
        None => Ok(Err("not a result ftvm knows")),
        Some(Err(e)) => Err(anyhow::anyhow!(
            "{}: looks like a result but does not read: {e}",
            path.display()
        )),
        Some(Ok(content)) => Ok(Ok(Input {
            path: path.to_owned(),
            content,
        })),
    }
}

/// What a directory holds.
#[derive(Debug, Default)]
pub struct Scan {
    pub inputs: Vec<Input>,
    /// JSON files left out, and why.
    pub skipped: Vec<(PathBuf, &'static str)>,
}

/// Every result file in `dir` and its subdirectories (one level down), in path order.
pub fn scan(dir: &Path) -> anyhow::Result<Scan> {
    let mut paths = Vec::new();
    let list = |d: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).with_context(|| format!("reading {}", d.display()))? {
            out.push(e?.path());
        }
        Ok(out)
    };
    for p in list(dir)? {
        if p.is_dir() {
            paths.extend(list(&p)?.into_iter().filter(|q| q.is_file()));
        } else {
            paths.push(p);
        }
    }
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    let mut out = Scan::default();
    for p in paths {
        match read(&p)? {
            Ok(i) => out.inputs.push(i),
            Err(why) => out.skipped.push((p, why)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_kind_is_recognised_by_its_shape() {
        let cases = [
            (
                json!({"rows": [{"transport": "shm", "commit_p50_us": 1.0}]}),
                "bench commit",
            ),
            (
                json!({"rows": [{"mem_mib": 16, "pause_p50_ms": 3.0}]}),
                "bench join",
            ),
            (
                json!({"throughput": [{"transport": "shm", "entries_per_sec": 1e7}]}),
                "bench throughput",
            ),
            (
                json!({"faults_requested": 3, "faults": [{"kind": "kill-primary"}]}),
                "fault campaign",
            ),
            (
                json!({"median_overhead_ns": 1.0, "rounds": []}),
                "bench metrics-cost",
            ),
        ];
        for (v, kind) in cases {
            let c = recognise(&v)
                .unwrap_or_else(|| panic!("{v} not recognised"))
                .unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(c.kind(), kind);
        }
        assert!(recognise(&json!({"something": "else"})).is_none());
        assert!(recognise(&json!([1, 2])).is_none());
    }

    #[test]
    fn a_recognised_file_that_does_not_read_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bad = dir.path().join("commit.json");
        std::fs::write(&bad, r#"{"rows": [{"commit_p50_us": "fast"}]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("notes.json"), "not json").unwrap_or_else(|e| panic!("{e}"));
        let err = scan(dir.path()).map(|v| v.inputs.len());
        let msg = format!(
            "{:#}",
            err.err().unwrap_or_else(|| anyhow::anyhow!("no error"))
        );
        assert!(
            msg.contains("commit.json") && msg.contains("does not read"),
            "{msg}"
        );
        std::fs::remove_file(&bad).unwrap_or_else(|e| panic!("{e}"));
        let s = scan(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(s.inputs.len(), 0);
        assert_eq!(s.skipped.len(), 1, "notes.json is left out, said so");
    }
}
