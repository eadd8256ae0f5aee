//! `bench report` end to end: the page built from the fixture results (shapes as `bench
//! commit`, `throughput`, `join`, `metrics-cost` and a fault campaign write them; the numbers
//! are test data) is opened in headless Chromium, which must render it: a screenshot is taken
//! and the page's text, as Chromium sees it after parsing, is checked.
//! Needs `chromium` (scripts/install-deps.sh installs it); without it the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn chromium() -> &'static str {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("which")
            .arg(c)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c;
        }
    }
    panic!("no chromium on PATH: scripts/install-deps.sh installs it (apt-get install chromium)");
}

/// Runs headless Chromium on `page` with `args` (a fresh profile in `dir`).
fn headless(dir: &Path, page: &Path, args: &[String]) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium")
}

#[test]
fn the_report_renders_in_chromium_with_every_section() {
    let dir = tempfile::tempdir().expect("temp dir");
    let page = dir.path().join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("report")
        .arg(fixtures())
        .arg("--out")
        .arg(&page)
        .output()
        .expect("run bench report");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("left out"),
        "the unrelated file is named: {said}"
    );
    let html = std::fs::read_to_string(&page).expect("the page");
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(!html.contains("<script"), "self-contained, no scripts");
    assert!(
        !html.contains("http://") || !html.contains("src=\"http"),
        "nothing fetched"
    );

    // What Chromium parsed: the DOM after loading.
    let dom = headless(dir.path(), &page, &["--dump-dom".into()]);
    let text = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.status.success() && text.contains("</html>"),
        "chromium --dump-dom: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for expected in [
        "ftvm results",
        "Output-commit latency per medium",
        "Commit p50 / raw p50, per round",
        "tcp-spin",
        "Log throughput with batching",
        "A backup joining a running primary",
        "Join pause and time to protected by guest memory",
        "Fault campaign",
        "Failover time (fault to the new epoch serving)",
        "Re-protect time (fault to protected again)",
        "What metrics cost the commit path",
        "kill-primary",
        "0.93",  // shm commit p50, µs
        "2.710", // shm median ratio
        "721",   // 1 GiB join total p50, ms
        "18.50", // M entries/s
        "21345", // campaign requests
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not on the rendered page"
        );
    }
    // Every chart is an inline SVG element the parser kept.
    assert!(
        text.matches("<svg").count() >= 6,
        "charts: {}",
        text.matches("<svg").count()
    );

    // And a screenshot of it: a PNG of real size.
    let shot = dir.path().join("report.png");
    let s = headless(
        dir.path(),
        &page,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,4000".into(),
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&s.stderr)
        )
    });
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(
        png.len() > 50_000,
        "a page with charts, not a blank one: {} bytes",
        png.len()
    );
}

#[test]
fn an_empty_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("x.json"), "{}").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("report")
        .arg(dir.path())
        .output()
        .expect("run bench report");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no results in") && err.contains("x.json"),
        "{err}"
    );
}
