//! The metrics endpoint of a process (`--metrics ADDR`): `GET /metrics` (Prometheus),
//! `GET /status` (JSON for `ftvm status`). One thread serves requests and, once a second,
//! keeps a sample of the commit histogram and the log counters, so the status can give
//! percentiles and rates over the last minute.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::histogram::HistogramSnapshot;
use crate::log::LogReading;
use crate::status::Status;
use crate::{Metrics, Process};

/// Why the endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the metrics endpoint {addr}: {why}")]
    Bind { addr: String, why: String },
    #[error("starting the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// How far back the status looks.
const WINDOW: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    commit: HistogramSnapshot,
    log: LogReading,
}

/// Samples over the last minute.
#[derive(Debug)]
struct Window {
    samples: VecDeque<Sample>,
}

impl Window {
    fn take(&mut self, m: &Metrics, now: Instant) -> Sample {
        let s = Sample {
            at: now,
            commit: m.commit.snapshot(),
            log: m.log.read(),
        };
        while self
            .samples
            .front()
            .is_some_and(|f| now.duration_since(f.at) > WINDOW)
        {
            self.samples.pop_front();
        }
        if self
            .samples
            .back()
            .is_none_or(|b| now.duration_since(b.at) >= SAMPLE_EVERY)
        {
            self.samples.push_back(s);
        }
        s
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The status of `m` now, against the oldest sample of the window.
fn status(m: &Metrics, window: &Mutex<Window>, started: SystemTime) -> Status {
    let now = Instant::now();
    let (now_sample, oldest) = {
        let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
        let s = w.take(m, now);
        (s, w.samples.front().copied())
    };
    let oldest = oldest.unwrap_or(now_sample);
    let span = now.duration_since(oldest.at).as_secs_f64();
    let commits = now_sample.commit.since(&oldest.commit);
    let per_s = |a: u64, b: u64| {
        if span > 0.0 {
            a.saturating_sub(b) as f64 / span
        } else {
            0.0
        }
    };
    let (process, name) = m.process();
    Status {
        process,
        name,
        version: env!("CARGO_PKG_VERSION").into(),
        replica: (process == Process::Replica).then(|| m.state.view()),
        started_unix_ms: unix_ms(started),
        now_unix_ms: unix_ms(SystemTime::now()),
        window_s: span,
        commits: commits.count(),
        commit_p50_us: commits.quantile_ns(0.5).map(|ns| ns / 1e3),
        commit_p99_us: commits.quantile_ns(0.99).map(|ns| ns / 1e3),
        log_entries_per_s: per_s(now_sample.log.entries, oldest.log.entries),
        log_bytes_per_s: per_s(now_sample.log.bytes, oldest.log.bytes),
        log: now_sample.log,
        channel_up: m.log.attached(),
        failovers: m.failovers.get(),
        joins: m.joins_completed.get(),
        heartbeats_missed: m.heartbeats_missed.get(),
        frames_rejected: m.frames_rejected.iter().map(|c| c.get()).sum(),
    }
}

/// A running endpoint; dropping it stops it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    local: String,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Serves `m` at `addr` (`host:port`; port 0 picks one: see [`MetricsServer::local_addr`]).
    pub fn start(addr: &str, m: &'static Metrics) -> Result<MetricsServer, ServeError> {
        let server = tiny_http::Server::http(addr).map_err(|e| ServeError::Bind {
            addr: addr.to_owned(),
            why: e.to_string(),
        })?;
        let local = server
            .server_addr()
            .to_ip()
            .map_or_else(|| addr.to_owned(), |a| a.to_string());
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        let (srv, flag) = (server.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ftvm-metrics".into())
            .spawn(move || serve(&srv, m, &flag))
            .map_err(ServeError::Thread)?;
        tracing::info!("metrics at http://{local}/metrics, status at http://{local}/status");
        Ok(MetricsServer {
            server,
            stop,
            thread: Some(thread),
            local,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> &str {
        &self.local
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Response = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn reply(code: u16, content_type: &str, body: String) -> Response {
    let r = tiny_http::Response::from_string(body).with_status_code(code);
    match tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()) {
        Ok(h) => r.with_header(h),
        Err(()) => r,
    }
}

fn serve(server: &tiny_http::Server, m: &'static Metrics, stop: &AtomicBool) {
    let started = SystemTime::now();
    let window = Mutex::new(Window {
        samples: VecDeque::new(),
    });
    while !stop.load(Ordering::Acquire) {
        let request = match server.recv_timeout(SAMPLE_EVERY) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                w.take(m, Instant::now());
                continue;
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: {e}; it stops");
                return;
            }
        };
        let path = request
            .url()
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        let get = *request.method() == tiny_http::Method::Get;
        const TEXT: &str = "text/plain; charset=utf-8";
        let response = match (get, path.as_str()) {
            (true, "/metrics") => match crate::expose::encode(m) {
                Ok(text) => reply(200, crate::expose::CONTENT_TYPE, text),
                Err(e) => reply(500, TEXT, format!("encoding failed: {e}\n")),
            },
            (true, "/status") => match serde_json::to_string_pretty(&status(m, &window, started)) {
                Ok(json) => reply(200, "application/json", json),
                Err(e) => reply(500, TEXT, format!("{e}\n")),
            },
            (true, "/") => reply(
                200,
                TEXT,
                "ftvm metrics endpoint: /metrics (Prometheus), /status (JSON)\n".into(),
            ),
            (true, _) => reply(404, TEXT, "not found\n".into()),
            (false, _) => reply(405, TEXT, "only GET\n".into()),
        };
        if let Err(e) = request.respond(response) {
            tracing::debug!("metrics endpoint: answering a request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ReplicaState, Role};

    #[test]
    fn serves_the_exposition_and_a_status_with_window_percentiles() {
        static M: Metrics = Metrics::new();
        M.set_process(Process::Replica, "t");
        M.state.set(
            ReplicaState::Unprotected,
            Role::Primary,
            4,
            "test double: no backup",
        );
        for _ in 0..100 {
            M.commit.observe_ns(4_000);
        }
        let srv = match MetricsServer::start("127.0.0.1:0", &M) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let s = match crate::fetch_status(srv.local_addr(), Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let r = s
            .replica
            .clone()
            .unwrap_or_else(|| panic!("no replica in {s:?}"));
        assert_eq!(
            (r.state, r.role, r.epoch),
            (ReplicaState::Unprotected, Role::Primary, 4)
        );
        // The first status has only one sample: nothing in its window yet.
        assert_eq!(s.commits, 0);
        // A refused path and a non-status endpoint give clear errors.
        let err = crate::fetch_status("127.0.0.1:1", Duration::from_secs(1));
        assert!(
            matches!(err, Err(crate::status::FetchError::Connect { .. })),
            "{err:?}"
        );
        drop(srv);
    }
}
