//! Helpers shared by the `ftvm` binary's integration tests (each test crate uses a part).
#![allow(dead_code)]

/// The readiness line `ftvm` processes print, and its parser (the binary's own module).
#[path = "../../src/ready.rs"]
pub mod ready;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes a pre-shared key file `dir/name` readable by its owner only (0600): `ftvm` refuses a
/// key file that group or others can read.
pub fn write_key(dir: &Path, name: &str, key: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .unwrap_or_else(|e| panic!("writing key file {}: {e}", path.display()));
    path
}

/// A private scratch directory (0700), removed when dropped.
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("scratch directory {prefix}: {e}"))
}
