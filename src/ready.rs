//! The readiness line: the one line an `ftvm` process that others connect to (primary, backup,
//! front, arbiter server) prints on stdout once it can be used, and the one parser for it.
//!
//! `FTVM-READY {"role":"primary","addr":"127.0.0.1:7400","detail":"replicating to … epoch 1"}`
//!
//! `addr` is what a peer uses: the primary's service address (its front's, behind one), the
//! backup's listening address (a socket path for shm), the front's or the arbiter's address.
//! `detail` is for people. The demo and the integration tests (`tests/common`) read it with
//! [`parse`] / [`find`]; other lines (a DPDK EAL's, say) may come before it.

use std::io::{BufRead, Write};

/// What every readiness line starts with.
pub const PREFIX: &str = "FTVM-READY ";

/// A process's readiness, as printed after [`PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// `primary`, `backup`, `front` or `arbiter`.
    pub role: String,
    /// The address peers use.
    pub addr: String,
    /// A human-readable note (medium, epoch, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The process's metrics endpoint (`--metrics`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// The process's metrics endpoint, once started: every readiness line names it.
pub static METRICS_AT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl Ready {
    pub fn new(role: &str, addr: impl ToString, detail: impl Into<String>) -> Ready {
        Ready {
            role: role.into(),
            addr: addr.to_string(),
            detail: detail.into(),
            metrics: METRICS_AT.get().cloned(),
        }
    }

    /// The line, without its newline.
    pub fn line(&self) -> String {
        // A struct of strings always serialises.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{PREFIX}{json}")
    }

    /// Prints the line on stdout and flushes it (stdout may be a pipe).
    pub fn announce(&self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", self.line())?;
        out.flush()
    }
}

/// The readiness in `line`, if it is a readiness line.
pub fn parse(line: &str) -> Option<Ready> {
    serde_json::from_str(line.trim().strip_prefix(PREFIX.trim_end())?.trim()).ok()
}

/// Reads lines from `reader` up to and including the readiness line. `Ok(None)`: the stream
/// ended first (the process exited before it was ready).
pub fn find(reader: &mut impl BufRead) -> std::io::Result<Option<Ready>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if let Some(r) = parse(&line) {
            return Ok(Some(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_parses_back_and_other_lines_do_not() {
        let r = Ready::new("backup", "/tmp/x y.sock", "shm");
        assert_eq!(parse(&r.line()), Some(r.clone()));
        assert_eq!(parse(&format!("{}\n", r.line())), Some(r.clone()));
        let bare = Ready::new("front", "127.0.0.1:9", "");
        assert_eq!(
            bare.line(),
            r#"FTVM-READY {"role":"front","addr":"127.0.0.1:9"}"#
        );
        assert_eq!(parse(&bare.line()), Some(bare));
        for other in [
            "",
            "SERVING 127.0.0.1:1",
            "FTVM-READY",
            "FTVM-READY {",
            "EAL: x",
        ] {
            assert_eq!(parse(other), None, "{other:?}");
        }
        let mut text = format!("EAL: Detected lcores\n{}\nlater\n", r.line()).into_bytes();
        let mut reader = std::io::Cursor::new(&mut text);
        assert_eq!(find(&mut reader).ok().flatten(), Some(r));
        assert_eq!(
            find(&mut std::io::Cursor::new(b"no\n")).ok().flatten(),
            None
        );
    }
}
