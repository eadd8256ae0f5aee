//! Raw medium baselines: ping-pong round-trip latency over the bare medium, with none of the
//! log channel's protocol on top, so that `bench` can report the protocol's overhead as a ratio.
//!
//! Two threads of this process play the two sides: the client (the timing side, "primary")
//! sends `payload` bytes and waits for them to come back; the server ("backup") echoes them.
//! One sample is one measured round trip, timed with [`Instant`] around send + receive
//! (including the copies into and out of the medium), recorded in nanoseconds.
//!
//! Every echoed payload is compared in full with what was sent (its first and last 8 bytes
//! carry the round-trip index, the rest a fixed pattern), and the server checks the index too,
//! so a broken medium fails the run instead of producing a flattering number.
//!
//! Busy-waiting sides wait under the one polling policy, [`transport::PollPolicy`] ([`RAW_POLL`]):
//! one [`std::hint::spin_loop`] per empty poll for the first [`RAW_POLL`]`.spins` polls, then
//! [`thread::yield_now`] on every further one, so two spinners that share a core (unpinned, or
//! on a 2-core machine with something else running) still make progress. A side that waits
//! for more than [`STALL_TIMEOUT`], or whose peer thread failed, gives up with an error instead
//! of hanging.
//!
//! This module is the driver: it checks the plan, runs the two pinned threads, times and
//! verifies every round trip and records the histogram. Each medium is a module of its own that
//! builds the two [`Endpoint`]s and hands them to the driver: [`tcp`], [`shm`], [`dpdk`] (over
//! the port pairs of [`memif`], this process's one EAL) and `rdma`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;
use transport::{PollPolicy, Poller};

pub mod bulk;
#[cfg(feature = "dpdk")]
mod dpdk;
pub mod memif;
#[cfg(feature = "rdma")]
mod rdma;
mod shm;
mod tcp;

/// Which raw medium to ping-pong over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMedium {
    /// Loopback TCP, blocking `write_all`/`read_exact`, `TCP_NODELAY` on both sides.
    TcpBlocking,
    /// Loopback TCP, non-blocking sockets busy-polled, `TCP_NODELAY` on both sides.
    TcpSpin,
    /// Two cache-line-aligned shared-memory mailboxes, each a sequence number plus payload.
    Shm,
    /// Raw Ethernet frames (ethertype 0x88B5) over two DPDK `net_memif` ports joined to each
    /// other in this process (see [`memif`]); the echo side copies the payload into a new frame.
    DpdkMemif,
    /// RDMA WRITE into the peer's registered buffer, which the peer polls in memory for the
    /// message's last 8 bytes (as perftest's `ib_write_lat` does): the channel's default
    /// (sealed-head) data path without the ring and the protocol. Devices from
    /// [`RawConfig::rdma`] (client on side A, echo on side B); needs the `rdma` feature.
    Rdma,
    /// The same over `net_af_packet` on the two ends of a veth pair.
    DpdkAfPacket,
    /// The same over `net_af_xdp` on the two ends of a veth pair.
    DpdkAfXdp,
}

impl RawMedium {
    fn dpdk_kind(self) -> Option<memif::Kind> {
        match self {
            RawMedium::DpdkMemif => Some(memif::Kind::Memif),
            RawMedium::DpdkAfPacket => Some(memif::Kind::AfPacket),
            RawMedium::DpdkAfXdp => Some(memif::Kind::AfXdp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RawConfig {
    /// Bytes sent by the timing side per round trip (8 ..= 64 KiB).
    pub payload: usize,
    /// Bytes the echo side sends back (8 ..= 64 KiB); `None`: `payload` (a symmetric
    /// ping-pong). The commit benchmark sets both to what one commit puts on the medium each
    /// way, so raw and commit move the same bytes.
    pub reply: Option<usize>,
    /// Measured round trips.
    pub count: u64,
    /// Round trips before measuring, excluded from the histogram.
    pub warmup: u64,
    /// Pin the timing side (the "primary") here.
    pub client_core: Option<usize>,
    /// Pin the echo side (the "backup") here.
    pub server_core: Option<usize>,
    /// RDMA devices (client, echo); `None`: from the `FTVM_RDMA_*` environment.
    #[cfg(feature = "rdma")]
    pub rdma: Option<(transport::rdma::RdmaConfig, transport::rdma::RdmaConfig)>,
}

/// Why a DPDK medium cannot run in this build, and how to get one that can.
#[cfg(not(feature = "dpdk"))]
pub const NO_DPDK: &str = "this bench was built without the `dpdk` feature: rebuild it with \
    `cargo build --release -p bench --features dpdk` (or run `cargo run --release -p bench \
    --features dpdk -- ...`; needs DPDK 22.11 and libclang: scripts/install-deps.sh)";

/// Smallest payload: the round-trip index travels in the first 8 bytes.
const MIN_PAYLOAD: usize = 8;
/// Largest payload accepted, for every medium alike.
const MAX_PAYLOAD: usize = 64 * 1024;
/// How every busy wait of the raw media waits: 1000 empty polls with one `spin_loop` hint
/// (PAUSE) each and nothing else (no clock read, no syscall: the hot loop of a ping-pong,
/// whose waits are far shorter), then a `yield_now` per poll. It never sleeps: the yields
/// (`u32::MAX` of them) outlast [`STALL_TIMEOUT`]. (Until the channel's policy was used here,
/// the raw loop yielded once every 1000 polls and spun in between; waits shorter than that,
/// which are the measured ones, run the same instructions.)
pub(crate) const RAW_POLL: PollPolicy = PollPolicy {
    spins: 1000,
    yields: u32::MAX,
    ..PollPolicy::BUSY
};
/// A side that sees no progress for this long fails instead of waiting forever.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Histogram range: 1 ns to 60 s, 3 significant digits.
const HIST_LOW: u64 = 1;
const HIST_HIGH: u64 = 60_000_000_000;
const HIST_SIGFIG: u8 = 3;

/// Round-trip times in nanoseconds, one sample per measured round trip.
pub fn ping_pong(medium: RawMedium, cfg: &RawConfig) -> anyhow::Result<Histogram<u64>> {
    let reply = cfg.reply.unwrap_or(cfg.payload);
    for (what, len) in [("payload", cfg.payload), ("reply", reply)] {
        ensure!(
            (MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len),
            "raw ping-pong {what} must be {MIN_PAYLOAD}..={MAX_PAYLOAD} bytes, got {len}"
        );
    }
    let total = cfg
        .warmup
        .checked_add(cfg.count)
        .context("raw ping-pong: warmup + count overflows u64")?;
    let hist = Histogram::<u64>::new_with_bounds(HIST_LOW, HIST_HIGH, HIST_SIGFIG)
        .context("creating the round-trip histogram")?;
    let pins = Pins::resolve(cfg);
    let peer_failed = FailFlag::default();
    let plan = Plan {
        payload: cfg.payload,
        reply,
        warmup: cfg.warmup,
        total,
        pins,
    };
    let run = || -> anyhow::Result<Histogram<u64>> {
        match medium {
            RawMedium::TcpBlocking => tcp::blocking(hist, &plan, &peer_failed),
            RawMedium::TcpSpin => tcp::spin(hist, &plan, &peer_failed),
            RawMedium::Shm => shm::run(hist, &plan, &peer_failed),
            RawMedium::DpdkMemif | RawMedium::DpdkAfPacket | RawMedium::DpdkAfXdp => {
                let kind = medium.dpdk_kind().context("a DPDK medium")?;
                #[cfg(feature = "dpdk")]
                {
                    dpdk::run(kind, hist, &plan, &peer_failed)
                }
                #[cfg(not(feature = "dpdk"))]
                bail!("--transport {}: {NO_DPDK}", kind.row())
            }
            RawMedium::Rdma => {
                #[cfg(feature = "rdma")]
                {
                    rdma::run(false, cfg.rdma.clone(), hist, &plan, &peer_failed)
                }
                #[cfg(not(feature = "rdma"))]
                bail!("the bench was built without the `rdma` feature")
            }
        }
    };
    run().with_context(|| {
        format!(
            "raw {medium:?} ping-pong ({} B payload, {} round trips + {} warm-up)",
            cfg.payload, cfg.count, cfg.warmup
        )
    })
}

/// What both threads need to know about one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    payload: usize,
    reply: usize,
    warmup: u64,
    total: u64,
    pins: Pins,
}

/// One side of a medium: moves exactly `buf.len()` bytes per call.
trait Endpoint {
    fn send(&mut self, buf: &[u8]) -> anyhow::Result<()>;
    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<()>;
}

/// Runs the echo server and the timing client on two pinned threads and joins both.
fn drive<C, S>(
    client: C,
    server: S,
    hist: Histogram<u64>,
    plan: &Plan,
    peer_failed: &FailFlag,
) -> anyhow::Result<Histogram<u64>>
where
    C: Endpoint + Send,
    S: Endpoint + Send,
{
    let plan = *plan;
    thread::scope(|scope| {
        let server_thread = thread::Builder::new()
            .name("raw-echo".into())
            .spawn_scoped(scope, move || {
                // The endpoint outlives `guarded`, so the flag is raised before a failing
                // side's socket closes and the peer sees EOF: the first failure is known.
                let mut server = server;
                guarded(peer_failed, Side::Echo, || {
                    pin_current(plan.pins.server, "echo (server)");
                    crate::pin::as_dpdk_lcore(|| echo_loop(&mut server, &plan))
                })
            })
            .context("spawning the echo thread")?;
        let client_thread = match thread::Builder::new()
            .name("raw-client".into())
            .spawn_scoped(scope, move || {
                let mut client = client;
                guarded(peer_failed, Side::Client, || {
                    pin_current(plan.pins.client, "client");
                    crate::pin::as_dpdk_lcore(|| client_loop(&mut client, hist, &plan))
                })
            }) {
            Ok(handle) => handle,
            Err(e) => {
                // The client endpoint is already dropped (closing a socket); the flag stops
                // a spinning server.
                peer_failed.raise(Side::Client);
                let server = join(server_thread, "echo");
                return Err(anyhow::Error::new(e).context(match server {
                    Ok(()) => "spawning the client thread".to_owned(),
                    Err(s) => format!("spawning the client thread (echo thread: {s:#})"),
                }));
            }
        };
        let client = join(client_thread, "client");
        let server = join(server_thread, "echo");
        match (client, server) {
            (Ok(hist), Ok(())) => Ok(hist),
            (Err(c), Ok(())) => Err(c.context("client thread")),
            (Ok(_), Err(s)) => Err(s.context("echo thread")),
            (Err(c), Err(s)) if peer_failed.first() == Some(Side::Echo) => {
                Err(s.context(format!("echo thread (then the client thread: {c:#})")))
            }
            (Err(c), Err(s)) => {
                Err(c.context(format!("client thread (then the echo thread: {s:#})")))
            }
        }
    })
}

/// The timing side: send, wait for the echo, record, verify.
fn client_loop<E: Endpoint>(
    ep: &mut E,
    mut hist: Histogram<u64>,
    plan: &Plan,
) -> anyhow::Result<Histogram<u64>> {
    let mut out = pattern(plan.payload);
    let mut back = vec![0u8; plan.reply];
    let mut expect = pattern(plan.reply);
    for i in 0..plan.total {
        stamp(&mut out, i);
        stamp(&mut expect, i);
        let start = Instant::now();
        ep.send(&out)
            .with_context(|| format!("round trip {i}: sending"))?;
        ep.recv(&mut back)
            .with_context(|| format!("round trip {i}: waiting for the echo"))?;
        let rtt = start.elapsed();
        if back != expect {
            let differ = expect.iter().zip(&back).filter(|(a, b)| a != b).count();
            bail!(
                "round trip {i}: echoed payload differs from the expected one in {differ} of \
                 {} bytes (it carries index {}, expected {i})",
                plan.reply,
                index_of(&back)
            );
        }
        if i >= plan.warmup {
            hist.saturating_record(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(hist)
}

/// The echo side: receive, check the index, send the reply back (the same bytes, or for an
/// asymmetric plan the reply pattern stamped with the same index, after comparing the request
/// in full).
fn echo_loop<E: Endpoint>(ep: &mut E, plan: &Plan) -> anyhow::Result<()> {
    let mut buf = vec![0u8; plan.payload];
    let mut expect = pattern(plan.payload);
    let mut reply = pattern(plan.reply);
    for i in 0..plan.total {
        ep.recv(&mut buf)
            .with_context(|| format!("round trip {i}: waiting for the request"))?;
        let first = index_of(&buf);
        // Below 16 bytes the two stamps overlap and only the first survives intact.
        let last = if buf.len() >= 16 {
            last_index_of(&buf)
        } else {
            first
        };
        ensure!(
            first == i && last == i,
            "round trip {i}: request carries indices {first} and {last}, expected {i}"
        );
        if plan.reply == plan.payload {
            ep.send(&buf)
                .with_context(|| format!("round trip {i}: sending the echo"))?;
        } else {
            stamp(&mut reply, i);
            ep.send(&reply)
                .with_context(|| format!("round trip {i}: sending the reply"))?;
            // The whole request is checked after the reply left (off the timed path; the
            // client checks the whole reply).
            stamp(&mut expect, i);
            ensure!(
                buf == expect,
                "round trip {i}: request differs from the one sent"
            );
        }
    }
    Ok(())
}

/// A fixed, non-zero byte pattern so a medium that drops or zeroes bytes is caught.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u8).wrapping_mul(167).wrapping_add(13))
        .collect()
}

/// Writes the round-trip index into the first and the last 8 bytes (they overlap below 16 B).
fn stamp(buf: &mut [u8], index: u64) {
    let bytes = index.to_le_bytes();
    let len = buf.len();
    buf[len - 8..].copy_from_slice(&bytes);
    buf[..8].copy_from_slice(&bytes);
}

fn index_of(buf: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[..8]);
    u64::from_le_bytes(bytes)
}

fn last_index_of(buf: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[buf.len() - 8..]);
    u64::from_le_bytes(bytes)
}

// ---------------------------------------------------------------------------------------------
// Threads: pinning, failure propagation, joining.

/// Resolved cores for the two threads (`None`: run unpinned).
#[derive(Debug, Clone, Copy)]
struct Pins {
    client: Option<usize>,
    server: Option<usize>,
}

impl Pins {
    fn resolve(cfg: &RawConfig) -> Pins {
        Pins {
            client: cfg.client_core,
            server: cfg.server_core,
        }
    }
}

fn pin_current(core: Option<usize>, role: &str) {
    if let Some(core) = core {
        crate::pin::pin_current(core, &format!("raw ping-pong {role} thread"));
    }
}

/// Shared by the two threads of a run: raised by whichever fails (error or panic) first, so
/// that the other, possibly spinning on a mailbox that will never change, gives up, and so
/// that the report leads with the cause rather than its consequence.
#[derive(Debug, Default)]
struct FailFlag(AtomicU8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client = 1,
    Echo = 2,
}

impl FailFlag {
    fn raise(&self, side: Side) {
        // Losing the race means the other side failed first; its mark stays.
        let _ = self
            .0
            .compare_exchange(0, side as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    fn raised(&self) -> bool {
        self.0.load(Ordering::Acquire) != 0
    }

    fn first(&self) -> Option<Side> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(Side::Client),
            2 => Some(Side::Echo),
            _ => None,
        }
    }
}

/// Runs `body`; if it returns an error or panics, raises `flag` for `side`.
fn guarded<T>(
    flag: &FailFlag,
    side: Side,
    body: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    struct RaiseUnlessOk<'a> {
        flag: &'a FailFlag,
        side: Side,
        ok: bool,
    }
    impl Drop for RaiseUnlessOk<'_> {
        fn drop(&mut self) {
            if !self.ok {
                self.flag.raise(self.side);
            }
        }
    }
    let mut guard = RaiseUnlessOk {
        flag,
        side,
        ok: false,
    };
    let result = body();
    guard.ok = result.is_ok();
    result
}

fn join<T>(
    handle: thread::ScopedJoinHandle<'_, anyhow::Result<T>>,
    role: &str,
) -> anyhow::Result<T> {
    match handle.join() {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            bail!("{role} thread panicked: {message}")
        }
    }
}

/// One busy wait under [`RAW_POLL`], that also gives up: once past the pure spinning stage
/// (and every 1024 spins before that) it checks whether the peer failed or the wait has
/// stalled past [`STALL_TIMEOUT`].
#[derive(Debug)]
struct Backoff<'a> {
    poller: Poller,
    since: Option<Instant>,
    peer_failed: &'a FailFlag,
}

impl<'a> Backoff<'a> {
    fn new(peer_failed: &'a FailFlag) -> Self {
        Backoff {
            poller: RAW_POLL.poller(),
            since: None,
            peer_failed,
        }
    }

    #[inline]
    fn snooze(&mut self, waiting_for: &'static str) -> anyhow::Result<()> {
        self.poller.wait();
        if self.poller.is_past_spinning() {
            self.check(waiting_for)
        } else {
            Ok(())
        }
    }

    /// Off the spinning path, so that it stays a PAUSE and a counter.
    #[cold]
    #[inline(never)]
    fn check(&mut self, waiting_for: &'static str) -> anyhow::Result<()> {
        if self.peer_failed.raised() {
            bail!("the peer thread failed while this one was waiting for {waiting_for}");
        }
        let now = Instant::now();
        match self.since {
            None => self.since = Some(now),
            Some(since) if now.duration_since(since) > STALL_TIMEOUT => {
                bail!("no progress for {STALL_TIMEOUT:?} while waiting for {waiting_for}")
            }
            Some(_) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::shm::{Mailbox, ShmEnd};
    use super::tcp::{tcp_pair, SpinTcp};
    use super::*;

    pub(super) fn cfg(payload: usize) -> RawConfig {
        RawConfig {
            payload,
            reply: None,
            count: 2_000,
            warmup: 100,
            // Unpinned: tests run in parallel, and pinning them all to the same two cores
            // would only make them queue.
            client_core: None,
            server_core: None,
            #[cfg(feature = "rdma")]
            rdma: None,
        }
    }

    pub(super) fn check(medium: RawMedium, payload: usize) -> anyhow::Result<()> {
        let cfg = cfg(payload);
        let hist = ping_pong(medium, &cfg)?;
        assert_eq!(hist.len(), cfg.count, "{medium:?} {payload} B");
        assert!(hist.min() > 0, "{medium:?} {payload} B: min {}", hist.min());
        Ok(())
    }

    #[test]
    fn asymmetric_reply_is_checked_both_ways() -> anyhow::Result<()> {
        for medium in [RawMedium::Shm, RawMedium::TcpSpin] {
            for (payload, reply) in [(182, 32), (8, 1500), (64, 64)] {
                let cfg = RawConfig {
                    reply: Some(reply),
                    ..cfg(payload)
                };
                let h = ping_pong(medium, &cfg)?;
                assert_eq!(h.len(), cfg.count, "{medium:?} {payload}/{reply}");
            }
        }
        let bad = RawConfig {
            reply: Some(4),
            ..cfg(64)
        };
        assert!(ping_pong(RawMedium::Shm, &bad).is_err());
        Ok(())
    }

    /// Without the `dpdk` feature a DPDK medium is refused, before anything runs, with the
    /// command that builds a bench that has it.
    #[cfg(not(feature = "dpdk"))]
    #[test]
    fn dpdk_media_without_the_feature_say_how_to_rebuild() {
        use super::memif::Kind;
        for (medium, kind) in [
            (RawMedium::DpdkMemif, Kind::Memif),
            (RawMedium::DpdkAfPacket, Kind::AfPacket),
            (RawMedium::DpdkAfXdp, Kind::AfXdp),
        ] {
            let err = format!(
                "{:#}",
                ping_pong(medium, &cfg(64)).expect_err("no DPDK here")
            );
            assert!(err.contains("--features dpdk"), "{err}");
            let err = format!("{:#}", memif::want(&[kind]).expect_err("no DPDK here"));
            assert!(
                err.contains(kind.row()) && err.contains("--features dpdk"),
                "{err}"
            );
        }
        assert!(memif::want(&[]).is_ok());
    }

    #[test]
    fn zero_count_gives_an_empty_histogram() -> anyhow::Result<()> {
        let cfg = RawConfig {
            count: 0,
            warmup: 10,
            ..cfg(64)
        };
        assert_eq!(ping_pong(RawMedium::Shm, &cfg)?.len(), 0);
        Ok(())
    }

    #[test]
    fn rejects_bad_payload_sizes() {
        for payload in [0, 7, MAX_PAYLOAD + 1] {
            assert!(
                ping_pong(RawMedium::Shm, &cfg(payload)).is_err(),
                "{payload}"
            );
        }
    }

    #[test]
    fn unavailable_core_runs_unpinned() -> anyhow::Result<()> {
        let cfg = RawConfig {
            count: 100,
            client_core: Some(usize::MAX),
            server_core: Some(usize::MAX - 1),
            ..cfg(64)
        };
        assert_eq!(ping_pong(RawMedium::Shm, &cfg)?.len(), 100);
        Ok(())
    }

    /// Flips a byte of the echo on one round trip: a stand-in for a broken medium.
    struct Corrupting<E> {
        inner: E,
        sends: u64,
        corrupt_at: u64,
    }

    impl<E: Endpoint> Endpoint for Corrupting<E> {
        fn send(&mut self, buf: &[u8]) -> anyhow::Result<()> {
            let mut copy = buf.to_vec();
            if self.sends == self.corrupt_at {
                let mid = copy.len() / 2;
                copy[mid] ^= 0x40;
            }
            self.sends += 1;
            self.inner.send(&copy)
        }

        fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
            self.inner.recv(buf)
        }
    }

    fn plan(payload: usize) -> Plan {
        Plan {
            payload,
            reply: payload,
            warmup: 0,
            total: 100,
            pins: Pins {
                client: None,
                server: None,
            },
        }
    }

    fn hist() -> anyhow::Result<Histogram<u64>> {
        Ok(Histogram::<u64>::new_with_bounds(
            HIST_LOW,
            HIST_HIGH,
            HIST_SIGFIG,
        )?)
    }

    #[test]
    fn broken_shm_echo_is_an_error_not_a_hang() -> anyhow::Result<()> {
        let flag = FailFlag::default();
        let (ping, pong) = (Mailbox::new(64), Mailbox::new(64));
        let server = Corrupting {
            inner: ShmEnd::new(&pong, &ping, &flag),
            sends: 0,
            corrupt_at: 37,
        };
        let err = drive(
            ShmEnd::new(&ping, &pong, &flag),
            server,
            hist()?,
            &plan(64),
            &flag,
        )
        .expect_err("a corrupted echo must fail the run");
        let text = format!("{err:#}");
        assert!(text.contains("round trip 37"), "{text}");
        Ok(())
    }

    #[test]
    fn broken_tcp_echo_is_an_error_not_a_hang() -> anyhow::Result<()> {
        let flag = FailFlag::default();
        let (client, server) = tcp_pair()?;
        client.set_nonblocking(true)?;
        server.set_nonblocking(true)?;
        let server = Corrupting {
            inner: SpinTcp::new(server, &flag),
            sends: 0,
            corrupt_at: 5,
        };
        let err = drive(
            SpinTcp::new(client, &flag),
            server,
            hist()?,
            &plan(1500),
            &flag,
        )
        .expect_err("a corrupted echo must fail the run");
        assert!(format!("{err:#}").contains("round trip 5"), "{err:#}");
        Ok(())
    }

    #[test]
    fn panicking_echo_is_an_error() {
        struct Panics;
        impl Endpoint for Panics {
            fn send(&mut self, _: &[u8]) -> anyhow::Result<()> {
                panic!("echo exploded")
            }
            fn recv(&mut self, _: &mut [u8]) -> anyhow::Result<()> {
                panic!("echo exploded")
            }
        }
        let flag = FailFlag::default();
        let (ping, pong) = (Mailbox::new(64), Mailbox::new(64));
        let hist = Histogram::<u64>::new_with_bounds(HIST_LOW, HIST_HIGH, HIST_SIGFIG)
            .expect("histogram bounds are valid");
        let err = drive(
            ShmEnd::new(&ping, &pong, &flag),
            Panics,
            hist,
            &plan(64),
            &flag,
        )
        .expect_err("a panicking echo must fail the run");
        let text = format!("{err:#}");
        assert!(
            text.contains("panicked") && text.contains("echo exploded"),
            "{text}"
        );
        assert!(text.contains("peer thread failed"), "{text}");
        // The cause leads, its consequence (the client giving up) follows.
        assert!(text.starts_with("echo thread"), "{text}");
    }
}
