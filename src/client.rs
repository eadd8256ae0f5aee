//! The load generator: sends requests to the service address, one at a time or a window of
//! them at once (never two that touch the same state), and checks every response against its
//! own model of the service. It speaks the key-value service ([`Protocol::Kvstore`]) or the
//! ledger ([`Protocol::Ledger`], module [`ledger`]); each is a [`Service`]: the request mix, which
//! requests may not be in flight together, the check of a response, the read-back at the end.
//!
//! **Retries and at-most-once.** A request without a response is sent again, byte for byte
//! (same request id), every [`Workload::retry`] until [`Workload::timeout`]. The guest answers a
//! request id it has already executed from its reply cache instead of executing it again, so a
//! retried request is applied at most once, even across a failover: the survivor either has the
//! request in the log it replayed (and answers from the cache) or never saw it (and executes it
//! once). Request ids start at a random base per client run, so two runs never share ids. (VMware
//! FT leaves the same duplicate problem to TCP's sequence numbers; this service runs on UDP.)

pub mod ledger;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmm::kv::{self, KvModel};

/// The service a workload speaks (`ftvm client --workload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// The key-value service (`guests/kvstore`): GET, PUT, INCR, FILL.
    #[default]
    #[value(alias = "kv")]
    Kvstore,
    /// The ledger (`guests/ledger`): DEPOSIT, TRANSFER, BALANCE, AUDIT.
    Ledger,
}

impl Protocol {
    /// The protocol of a built-in guest program.
    pub fn of(guest: crate::replica::Guest) -> Protocol {
        match guest {
            crate::replica::Guest::Ledger => Protocol::Ledger,
            crate::replica::Guest::Kvstore
            | crate::replica::Guest::Nondet
            | crate::replica::Guest::KvstorePolling => Protocol::Kvstore,
        }
    }
}

/// Workload settings.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The service spoken.
    pub protocol: Protocol,
    /// Requests to send.
    pub requests: u64,
    /// Seed of the request mix.
    pub seed: u64,
    /// Distinct keys (the ledger: accounts used, at most its 256).
    pub keys: u32,
    /// Keys are named `PREFIX-N`: clients that share a service each keep to their own keys
    /// (the read-back checks a key against one client's model). The ledger has no names: one
    /// ledger client per ledger (its AUDIT checks the whole ledger against its model).
    pub key_prefix: String,
    /// Percent of GETs; the rest split between PUT and INCR (the ledger: percent of BALANCE
    /// reads; the rest are deposits, transfers and a few audits).
    pub get_percent: u8,
    /// Give up on a response after this long.
    pub timeout: Duration,
    /// Send a request again when no response came for this long.
    pub retry: Duration,
    /// After the workload, read back every key and compare with the model (counts
    /// `acknowledged_lost`).
    pub verify: bool,
    /// Requests in flight at once (1: one at a time).
    pub window: usize,
    /// Percent of requests that are FILLs of `fill_pages` pages at a random place in guest
    /// memory of `mem_size` bytes (they make the guest dirty memory: load for a join). Key-value
    /// service only.
    pub fill_percent: u8,
    pub fill_pages: u32,
    pub mem_size: u64,
    /// Set to end the run early: no new requests, the ones in flight are answered, then the
    /// read-back (with `verify`).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Workload {
    /// A workload with default timing (retry every 50 ms, give up after 5 s) and no read-back.
    pub fn new(requests: u64, seed: u64, keys: u32, get_percent: u8) -> Self {
        Workload {
            protocol: Protocol::Kvstore,
            requests,
            seed,
            keys,
            key_prefix: "key".into(),
            get_percent,
            timeout: Duration::from_secs(5),
            retry: Duration::from_millis(50),
            verify: false,
            window: 1,
            fill_percent: 0,
            fill_pages: 256,
            mem_size: 16 << 20,
            stop: None,
        }
    }
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
    /// Requests sent again (no response within the retry interval).
    pub retries: u64,
    /// Read-back: keys whose stored value differs from what the acknowledged requests imply —
    /// acknowledged updates that were lost. Zero unless `verify`.
    pub acknowledged_lost: u64,
    /// Keys read back.
    pub keys_verified: u64,
    /// The longest wait for one response (retries included), ms.
    pub max_response_ms: f64,
}

/// One request/response exchange with retries; `Ok(None)` if no response came in time.
fn exchange(
    socket: &UdpSocket,
    service: SocketAddr,
    request: &[u8],
    id: u32,
    w: &Workload,
    buf: &mut [u8],
    report: &mut ClientReport,
) -> anyhow::Result<Option<usize>> {
    let started = Instant::now();
    let give_up = started + w.timeout;
    socket
        .send_to(request, service)
        .context("sending a request")?;
    let mut resend = Instant::now() + w.retry;
    loop {
        let now = Instant::now();
        if now >= give_up {
            return Ok(None);
        }
        if now >= resend {
            socket
                .send_to(request, service)
                .context("sending a request")?;
            report.retries += 1;
            resend = now + w.retry;
        }
        // Responses to earlier ids (duplicates of retried requests) are skipped.
        if let Some(n) = receive(socket, service, buf)? {
            if buf[..4] == id.to_le_bytes() {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                report.max_response_ms = report.max_response_ms.max(ms);
                return Ok(Some(n));
            }
        }
    }
}

/// Waits for one datagram from `service` of at least 4 bytes (a response id); `None` when the
/// socket's read timeout passes first or something else arrived. The read timeout is the retry
/// interval (set once in [`run`]): a wait ends at most one interval late, without a system call
/// per wait to adjust it.
fn receive(
    socket: &UdpSocket,
    service: SocketAddr,
    buf: &mut [u8],
) -> anyhow::Result<Option<usize>> {
    match socket.recv_from(buf) {
        Ok((n, from)) if from == service && n >= 4 => Ok(Some(n)),
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).context("receiving a response"),
    }
}

/// A service's side of a workload: the requests it sends and how it checks the answers.
pub(crate) trait Service {
    /// A request as the model needs it.
    type Op;
    /// The next request of the mix, with id `id`, and its bytes (the same sequence for a seed,
    /// whatever the window).
    fn generate(&mut self, rng: &mut SmallRng, w: &Workload, id: u32) -> (Self::Op, Vec<u8>);
    /// Whether `a` and `b` may not be in flight together: the service could apply them in either
    /// order, and the model would not know which.
    fn conflict(a: &Self::Op, b: &Self::Op) -> bool;
    /// Checks the response to request `id` (`op`) against the model, which applies `op`: an
    /// answered request was applied, exactly once.
    fn check(&mut self, id: u32, op: Self::Op, response: &[u8]) -> Result<Seen, String>;
    /// After the run: requests whose answers show whether every acknowledged update is there.
    fn read_back(&self) -> Vec<Self::Op>;
    /// The bytes of a read-back request.
    fn encode(&self, id: u32, op: &Self::Op) -> Vec<u8>;
    /// Checks the answer to a read-back request; `Err`: acknowledged state was lost.
    fn verify(&mut self, op: &Self::Op, response: &[u8]) -> Result<(), String>;
}

/// What a correct response showed besides its result.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// The guest's clock when it executed the request (responses that carry one): it never runs
    /// backwards from what earlier responses showed.
    pub clock_ns: Option<u64>,
    /// Timer ticks the guest had seen.
    pub ticks: Option<u32>,
}

/// A request sent and not yet answered.
struct InFlight<Op> {
    id: u32,
    op: Op,
    bytes: Vec<u8>,
    /// First sent.
    started: Instant,
    /// When to send it again.
    resend: Instant,
    /// The newest guest timestamp among the responses received before it was sent: the guest
    /// executed it later, so its response cannot carry an older one.
    ts_floor: u64,
}

/// Runs the workload against `service`; `progress` is called with the number of requests done.
/// A response that never comes ends the run early (`aborted`), with what was seen so far.
///
/// Up to [`Workload::window`] requests are in flight at once, never two in conflict (the same
/// key, accounts in common): the guest then applies each key's requests in the order the client
/// sent them, whatever order the responses come back in, so one model checks every response.
pub fn run(
    service: SocketAddr,
    w: &Workload,
    progress: impl FnMut(u64),
) -> anyhow::Result<ClientReport> {
    match w.protocol {
        Protocol::Kvstore => run_with(service, w, KvService::default(), progress),
        Protocol::Ledger => run_with(service, w, ledger::LedgerService::default(), progress),
    }
}

fn run_with<S: Service>(
    service: SocketAddr,
    w: &Workload,
    mut svc: S,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<ClientReport> {
    let bind = if service.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let socket = UdpSocket::bind(bind).context("binding the client socket")?;
    socket
        .set_read_timeout(Some(w.retry.min(w.timeout).max(Duration::from_millis(1))))
        .context("client socket timeout")?;
    let mut rng = SmallRng::seed_from_u64(w.seed);
    let mut report = ClientReport::default();
    let mut buf = vec![0u8; 65536];
    let mut last_ts = 0u64;
    let mut base = [0u8; 4];
    getrandom::getrandom(&mut base).map_err(|e| anyhow::anyhow!("random id base: {e}"))?;
    let mut next_id = u32::from_le_bytes(base);
    let mut new_id = || {
        next_id = next_id.wrapping_add(1).max(1);
        next_id
    };
    let window = w.window.max(1);
    let mut inflight: Vec<InFlight<S::Op>> = Vec::with_capacity(window);
    // A request drawn that conflicts with one in flight: it waits, and the window with it.
    let mut held: Option<(u32, S::Op, Vec<u8>)> = None;
    let mut done = 0u64;
    let start = Instant::now();
    let more = |sent: u64| {
        sent < w.requests && !w.stop.as_ref().is_some_and(|s| s.load(Ordering::Acquire))
    };
    'run: while more(report.requests) || !inflight.is_empty() {
        while inflight.len() < window && more(report.requests) {
            let (id, op, bytes) = match held.take() {
                Some(r) => r,
                None => {
                    let id = new_id();
                    let (op, bytes) = svc.generate(&mut rng, w, id);
                    (id, op, bytes)
                }
            };
            if inflight.iter().any(|f| S::conflict(&f.op, &op)) {
                held = Some((id, op, bytes));
                break;
            }
            socket
                .send_to(&bytes, service)
                .context("sending a request")?;
            report.requests += 1;
            let now = Instant::now();
            inflight.push(InFlight {
                id,
                op,
                bytes,
                started: now,
                resend: now + w.retry,
                ts_floor: last_ts,
            });
        }
        let now = Instant::now();
        for f in &mut inflight {
            if now >= f.started + w.timeout {
                report.first_error.get_or_insert(format!(
                    "no response to request {} within {:?}; stopped after {} of {} answered",
                    f.id, w.timeout, report.responses_ok, w.requests
                ));
                report.aborted = true;
                break 'run;
            }
            if now >= f.resend {
                socket
                    .send_to(&f.bytes, service)
                    .context("sending a request")?;
                report.retries += 1;
                f.resend = now + w.retry;
            }
        }
        let Some(n) = receive(&socket, service, &mut buf)? else {
            continue;
        };
        let id = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        // Responses to ids no longer in flight (duplicates of retried requests) are skipped.
        let Some(at) = inflight.iter().position(|f| f.id == id) else {
            continue;
        };
        let f = inflight.swap_remove(at);
        let ms = f.started.elapsed().as_secs_f64() * 1e3;
        report.max_response_ms = report.max_response_ms.max(ms);
        let verdict = match svc.check(id, f.op, &buf[..n]) {
            Ok(Seen {
                clock_ns: Some(ts), ..
            }) if ts < f.ts_floor => Err(format!(
                "request {id}: guest clock went backwards ({ts} < {})",
                f.ts_floor
            )),
            Ok(seen) => {
                last_ts = last_ts.max(seen.clock_ns.unwrap_or(0));
                report.ticks_seen = report.ticks_seen.max(seen.ticks.unwrap_or(0));
                Ok(())
            }
            Err(e) => Err(e),
        };
        match verdict {
            Ok(()) => report.responses_ok += 1,
            Err(e) => {
                report.responses_bad += 1;
                report.first_error.get_or_insert(e);
            }
        }
        done += 1;
        progress(done);
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.throughput = report.requests as f64 / report.seconds.max(f64::MIN_POSITIVE);
    if w.verify && !report.aborted {
        for op in svc.read_back() {
            let id = new_id();
            let request = svc.encode(id, &op);
            let Some(n) = exchange(&socket, service, &request, id, w, &mut buf, &mut report)?
            else {
                report
                    .first_error
                    .get_or_insert(format!("no response to read-back request {id}"));
                report.aborted = true;
                break;
            };
            report.keys_verified += 1;
            if let Err(e) = svc.verify(&op, &buf[..n]) {
                report.acknowledged_lost += 1;
                report.first_error.get_or_insert(e);
            }
        }
    }
    Ok(report)
}

/// The key-value service: a PUT/INCR/GET mix (and FILLs) over `PREFIX-N` keys.
#[derive(Debug, Default)]
struct KvService {
    model: KvModel,
    /// Keys written or read: read back at the end.
    touched: std::collections::BTreeSet<String>,
}

/// A key-value request.
#[derive(Debug)]
struct KvOp {
    op: u8,
    key: String,
    value: Vec<u8>,
}

impl Service for KvService {
    type Op = KvOp;

    fn generate(&mut self, rng: &mut SmallRng, w: &Workload, id: u32) -> (KvOp, Vec<u8>) {
        if w.fill_percent > 0 && rng.gen_range(0..100u8) < w.fill_percent {
            let first = kv::KV_FILL_FIRST_PAGE as u32;
            let pages = (w.mem_size / 4096) as u32;
            let count = w.fill_pages.min(pages.saturating_sub(first)).max(1);
            let start = rng.gen_range(first..=pages.saturating_sub(count).max(first));
            let mut value = Vec::with_capacity(16);
            value.extend_from_slice(&start.to_le_bytes());
            value.extend_from_slice(&count.to_le_bytes());
            value.extend_from_slice(&rng.gen::<u64>().to_le_bytes());
            let bytes = kv::encode_request(id, kv::OP_FILL, &[], &value);
            let op = KvOp {
                op: kv::OP_FILL,
                key: String::new(),
                value,
            };
            return (op, bytes);
        }
        let key = format!("{}-{}", w.key_prefix, rng.gen_range(0..w.keys.max(1)));
        let roll = rng.gen_range(0..100u8);
        let (op, value) = if roll < w.get_percent {
            (kv::OP_GET, Vec::new())
        } else if roll % 2 == 0 {
            let len = rng.gen_range(1..=kv::MAX_VALUE);
            (kv::OP_PUT, (0..len).map(|_| rng.gen::<u8>()).collect())
        } else {
            (kv::OP_INCR, Vec::new())
        };
        let bytes = kv::encode_request(id, op, key.as_bytes(), &value);
        (KvOp { op, key, value }, bytes)
    }

    /// The same key (FILLs, with no key, one at a time too).
    fn conflict(a: &KvOp, b: &KvOp) -> bool {
        a.key == b.key
    }

    fn check(&mut self, id: u32, op: KvOp, response: &[u8]) -> Result<Seen, String> {
        let KvOp { op, key, value } = op;
        let expected = self.model.apply(op, key.as_bytes(), &value);
        let verdict = match kv::decode_response(response) {
            None => Err(format!(
                "request {id}: malformed response of {} bytes",
                response.len()
            )),
            Some(r) if r.id != id => Err(format!("request {id}: response for {}", r.id)),
            Some(r) if (r.status, r.value.clone()) != expected => Err(format!(
                "request {id} (op {op}, {key}): got status {} value {:02x?}, expected {:?}",
                r.status, r.value, expected
            )),
            Some(r) => Ok(Seen {
                clock_ns: Some(r.timestamp_ns),
                ticks: Some(r.ticks),
            }),
        };
        if !key.is_empty() {
            self.touched.insert(key);
        }
        verdict
    }

    fn read_back(&self) -> Vec<KvOp> {
        self.touched
            .iter()
            .map(|key| KvOp {
                op: kv::OP_GET,
                key: key.clone(),
                value: Vec::new(),
            })
            .collect()
    }

    fn encode(&self, id: u32, op: &KvOp) -> Vec<u8> {
        kv::encode_request(id, op.op, op.key.as_bytes(), &op.value)
    }

    fn verify(&mut self, op: &KvOp, response: &[u8]) -> Result<(), String> {
        let key = &op.key;
        let expected = self.model.apply(kv::OP_GET, key.as_bytes(), &[]);
        let got = kv::decode_response(response).map(|r| (r.status, r.value));
        if got.as_ref() == Some(&expected) {
            return Ok(());
        }
        Err(format!(
            "read-back of {key}: got {got:02x?}, acknowledged requests imply {expected:?}"
        ))
    }
}
