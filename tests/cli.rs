//! The `ftvm` binary's command line.

use std::process::Command;

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

#[test]
fn formats_prints_the_versions_this_build_speaks() {
    let out = ftvm().arg("formats").output().expect("run ftvm");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!(
        "log frame format version {}",
        logfmt::FORMAT_VERSION
    )));
    assert!(text.contains(&format!(
        "ring layout version {}",
        transport::ring::RING_LAYOUT_VERSION
    )));
}

#[test]
fn unknown_subcommands_fail_with_usage() {
    let out = ftvm().arg("no-such-command").output().expect("run ftvm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
