//! The load generator: sends key-value requests to the service address, one at a time, and
//! checks every response against its own model of the store.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmm::kv::{self, KvModel};

/// Workload settings.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Requests to send.
    pub requests: u64,
    /// Seed of the request mix.
    pub seed: u64,
    /// Distinct keys.
    pub keys: u32,
    /// Percent of GETs; the rest split between PUT and INCR.
    pub get_percent: u8,
    /// Give up on a response after this long.
    pub timeout: Duration,
}

/// What the client saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClientReport {
    /// Requests sent.
    pub requests: u64,
    /// Responses that matched the model.
    pub responses_ok: u64,
    /// Wrong or malformed responses (first one described in `first_error`).
    pub responses_bad: u64,
    /// The first wrong (or missing) response, described.
    pub first_error: Option<String>,
    /// The run stopped early because a response never came.
    pub aborted: bool,
    /// Seconds from first request to last response.
    pub seconds: f64,
    /// Requests per second.
    pub throughput: f64,
    /// Largest guest timer tick count seen.
    pub ticks_seen: u32,
}

/// Runs the workload against `service`; `progress` is called with the number of requests done.
/// A response that never comes ends the run early (`aborted`), with what was seen so far.
pub fn run(
    service: SocketAddr,
    w: &Workload,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<ClientReport> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("binding the client socket")?;
    socket
        .set_read_timeout(Some(w.timeout))
        .context("client socket timeout")?;
    let mut rng = SmallRng::seed_from_u64(w.seed);
    let mut model = KvModel::default();
    let mut report = ClientReport::default();
    let mut buf = vec![0u8; 65536];
    let mut last_ts = 0u64;
    let start = Instant::now();
    for i in 0..w.requests {
        let id = (i as u32).wrapping_add(1);
        let key = format!("key-{}", rng.gen_range(0..w.keys.max(1)));
        let roll = rng.gen_range(0..100u8);
        let (op, value) = if roll < w.get_percent {
            (kv::OP_GET, Vec::new())
        } else if roll % 2 == 0 {
            let len = rng.gen_range(1..=kv::MAX_VALUE);
            (kv::OP_PUT, (0..len).map(|_| rng.gen::<u8>()).collect())
        } else {
            (kv::OP_INCR, Vec::new())
        };
        let request = kv::encode_request(id, op, key.as_bytes(), &value);
        socket
            .send_to(&request, service)
            .context("sending a request")?;
        report.requests += 1;
        let expected = model.apply(op, key.as_bytes(), &value);
        let n = loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from == service => break Some(n),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    report.first_error.get_or_insert(format!(
                        "no response to request {id} within {:?}; stopped after {} of {} answered",
                        w.timeout, report.responses_ok, w.requests
                    ));
                    report.aborted = true;
                    break None;
                }
                Err(e) => return Err(e).context("receiving a response"),
            }
        };
        let Some(n) = n else { break };
        let verdict = match kv::decode_response(&buf[..n]) {
            None => Err(format!("request {id}: malformed response of {n} bytes")),
            Some(r) if r.id != id => Err(format!("request {id}: response for {}", r.id)),
            Some(r) if (r.status, r.value.clone()) != expected => Err(format!(
                "request {id} (op {op}, {key}): got status {} value {:02x?}, expected {:?}",
                r.status, r.value, expected
            )),
            Some(r) if r.timestamp_ns < last_ts => Err(format!(
                "request {id}: guest clock went backwards ({} < {last_ts})",
                r.timestamp_ns
            )),
            Some(r) => {
                last_ts = r.timestamp_ns;
                report.ticks_seen = report.ticks_seen.max(r.ticks);
                Ok(())
            }
        };
        match verdict {
            Ok(()) => report.responses_ok += 1,
            Err(e) => {
                report.responses_bad += 1;
                report.first_error.get_or_insert(e);
            }
        }
        progress(i + 1);
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.throughput = report.requests as f64 / report.seconds.max(f64::MIN_POSITIVE);
    Ok(report)
}
