//! The replica's status as one JSON document (`GET /status` on the metrics endpoint), and the
//! client `ftvm status` uses to fetch it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::log::LogReading;
use crate::state::StateView;
use crate::Process;

/// What `ftvm status` shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub process: Process,
    /// The process's name (a replica's name at the arbiter).
    pub name: String,
    pub version: String,
    /// The replica's state, role, epoch, peer (replicas only).
    pub replica: Option<StateView>,
    /// When the process started, ms since the Unix epoch; and now.
    pub started_unix_ms: u64,
    pub now_unix_ms: u64,
    /// The span the rates and percentiles below cover (up to the last minute), s.
    pub window_s: f64,
    /// Outputs committed in the window and their commit latency, µs.
    pub commits: u64,
    pub commit_p50_us: Option<f64>,
    pub commit_p99_us: Option<f64>,
    /// Log rate over the window.
    pub log_entries_per_s: f64,
    pub log_bytes_per_s: f64,
    /// The log channel's totals and lags now.
    pub log: LogReading,
    /// Whether a log channel is up now.
    pub channel_up: bool,
    pub failovers: u64,
    pub joins: u64,
    pub heartbeats_missed: u64,
    pub frames_rejected: u64,
}

/// Why a status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no metrics endpoint at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("reading the status from {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} answered {status_line:?}, not a status (is it an ftvm --metrics address?)")]
    Http { addr: String, status_line: String },
    #[error("{addr} sent a status ftvm cannot read: {source}")]
    Decode {
        addr: String,
        source: serde_json::Error,
    },
}

/// Largest status document accepted.
const MAX_BODY: u64 = 1 << 20;

/// `GET path` from the metrics endpoint at `addr` (`host:port`): the body of a 200 answer.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<String, FetchError> {
    let connect = |e| FetchError::Connect {
        addr: addr.to_owned(),
        source: e,
    };
    let io = |e| FetchError::Io {
        addr: addr.to_owned(),
        source: e,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(std::io::Error::other("the address resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(connect)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(io)?;
    let mut raw = Vec::new();
    s.take(MAX_BODY).read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(FetchError::Http {
            addr: addr.to_owned(),
            status_line,
        });
    }
    Ok(body.to_owned())
}

/// Fetches the status from the metrics endpoint at `addr` (`host:port`).
pub fn fetch_status(addr: &str, timeout: Duration) -> Result<Status, FetchError> {
    let body = get(addr, "/status", timeout)?;
    serde_json::from_str(&body).map_err(|e| FetchError::Decode {
        addr: addr.to_owned(),
        source: e,
    })
}
