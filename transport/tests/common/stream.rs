//! What the two-process channel tests share: the checksummed entry payloads the primary sends,
//! the primary's sending and ending of a stream, and the backup's check of it (every entry in
//! order, once, intact).
// Each test binary (one per medium) uses its own subset.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use logfmt::{ControlOp, Entry, Event, Position};
use rand::rngs::SmallRng;
use rand::Rng;
use transport::{ChannelError, PrimaryLink};

/// Device id the test entries carry.
pub const DEVICE: u16 = 3;

/// Entry payload: u64 sequence number, random bytes, u32 CRC32C of both.
pub fn payload(seq: u64, rng: &mut SmallRng, buf: &mut Vec<u8>) {
    let len = rng.gen_range(12..=300);
    buf.clear();
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.resize(len - 4, 0);
    rng.fill(&mut buf[8..]);
    let crc = crc32c::crc32c(buf);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// The backup's side: checks every entry until a Shutdown entry, then keeps acknowledging
/// until the primary hangs up. Returns the number of entries verified.
pub fn verify_stream<L: transport::BackupLink>(mut b: transport::Backup<L>) -> Result<u64, String> {
    let mut next = 1u64;
    let mut done = false;
    let mut failure = None;
    while !done {
        let polled = b.poll_timeout(Duration::from_secs(1), |frame| {
            for (seq, entry) in frame.entries_with_seq() {
                if failure.is_some() {
                    return;
                }
                if seq != next {
                    failure = Some(format!("expected entry {next}, got {seq}"));
                    return;
                }
                next += 1;
                match entry.event {
                    Event::DeviceInput { device, data } => {
                        let ok = device == DEVICE
                            && data.len() >= 12
                            && data[..8] == seq.to_le_bytes()
                            && data[data.len() - 4..]
                                == crc32c::crc32c(&data[..data.len() - 4]).to_le_bytes();
                        if !ok {
                            failure = Some(format!("entry {seq}: bad payload"));
                        }
                    }
                    Event::OutputMarker { .. } => {}
                    Event::Control(ControlOp::Shutdown) => done = true,
                    other => failure = Some(format!("entry {seq}: unexpected {other:?}")),
                }
            }
        });
        if let Some(f) = failure.take() {
            return Err(f);
        }
        match polled {
            Ok(_) => {}
            // The Shutdown entry came with the hang-up: the primary saw its ACK and left before
            // this poll returned (frames acknowledged before a failure are still handed over).
            Err(ChannelError::PeerClosed) if done => return Ok(next - 1),
            Err(e) => return Err(format!("backup after {next} entries: {e}")),
        }
    }
    // Keep acknowledging until the primary has seen the final ACK and hangs up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match b.poll(|_| {}) {
            Err(ChannelError::PeerClosed) => break,
            Err(e) => return Err(format!("after shutdown: {e}")),
            Ok(_) => std::thread::yield_now(),
        }
    }
    Ok(next - 1)
}

/// How the backup was taken away from the primary.
#[derive(Debug, Clone, Copy)]
pub enum Loss {
    /// SIGKILL: the primary may see the hang-up or the silence.
    Killed,
    /// SIGSTOP: alive and connected but silent; only the heartbeat timeout can tell.
    Frozen,
}

/// Checks the error a primary got after losing its backup: the right kind, and no later than
/// the heartbeat timeout (plus scheduling slack).
pub fn check_backup_loss(
    loss: Loss,
    err: &ChannelError,
    took: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let right_kind = match loss {
        Loss::Killed => matches!(
            err,
            ChannelError::PeerClosed | ChannelError::HeartbeatTimeout { .. }
        ),
        Loss::Frozen => matches!(err, ChannelError::HeartbeatTimeout { .. }),
    };
    if !right_kind {
        return Err(format!("backup {loss:?}: unexpected error kind {err:?}"));
    }
    if took > timeout + Duration::from_millis(200) {
        return Err(format!(
            "error took {took:?}, heartbeat timeout is {timeout:?}"
        ));
    }
    Ok(())
}

/// Input entry `seq` carrying `data` (a [`payload`]).
pub fn input(seq: u64, data: &[u8]) -> Entry<'_> {
    Entry::new(
        Position::at_exit(seq),
        Event::DeviceInput {
            device: DEVICE,
            data,
        },
    )
}

/// An output marker at position `seq`.
pub fn marker(seq: u64) -> Entry<'static> {
    Entry::new(
        Position::at_exit(seq),
        Event::OutputMarker {
            device: DEVICE,
            len: 0,
            digest: logfmt::digest(b""),
        },
    )
}

/// What the stream helpers need of a primary: the channel's own [`transport::Primary`], or a
/// test's wrapper over several media.
pub trait StreamPrimary {
    fn append(&mut self, e: &Entry<'_>) -> Result<u64, ChannelError>;
    fn acked(&self) -> u64;
    fn pump(&mut self) -> Result<bool, ChannelError>;
    fn wait_acked(&mut self, seq: u64) -> Result<(), ChannelError>;
}

impl<L: PrimaryLink> StreamPrimary for transport::Primary<L> {
    fn append(&mut self, e: &Entry<'_>) -> Result<u64, ChannelError> {
        transport::Primary::append(self, e)
    }
    fn acked(&self) -> u64 {
        transport::Primary::acked(self)
    }
    fn pump(&mut self) -> Result<bool, ChannelError> {
        transport::Primary::pump(self)
    }
    fn wait_acked(&mut self, seq: u64) -> Result<(), ChannelError> {
        transport::Primary::wait_acked(self, seq)
    }
}

/// Appends entries `1..=count` with [`payload`]s (seeded with `seed`) as a vCPU would: checks
/// each sequence number and that the ACK never goes backwards, and pumps every 64 entries.
/// `why` adds context to an append's error. Returns the newest ACK seen.
pub fn send_stream<P: StreamPrimary>(
    p: &mut P,
    count: u64,
    seed: u64,
    why: impl Fn(&P) -> String,
) -> Result<u64, String> {
    use rand::SeedableRng;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = Vec::new();
    let mut last_acked = 0;
    for seq in 1..=count {
        payload(seq, &mut rng, &mut buf);
        let got = p
            .append(&input(seq, &buf))
            .map_err(|e| format!("append {seq}: {e}{}", why(p)))?;
        if got != seq {
            return Err(format!("append returned seq {got}, expected {seq}"));
        }
        last_acked = check_acked(p, last_acked)?;
        if seq % 64 == 0 {
            p.pump().map_err(|e| e.to_string())?;
        }
    }
    Ok(last_acked)
}

/// The newest ACK, checked not to be older than `last`.
pub fn check_acked<P: StreamPrimary>(p: &P, last: u64) -> Result<u64, String> {
    let acked = p.acked();
    if acked < last {
        return Err(format!("ACK went backwards: {last} then {acked}"));
    }
    Ok(acked)
}

/// Appends an output marker at `seq` and waits for its ACK (the output rule's wait).
pub fn commit<P: StreamPrimary>(p: &mut P, seq: u64) -> Result<u64, String> {
    let s = p.append(&marker(seq)).map_err(|e| e.to_string())?;
    p.wait_acked(s).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Ends a stream: a Shutdown entry at position `seq`, acknowledged. Returns its sequence number,
/// the last one the backup must report.
pub fn end_stream<P: StreamPrimary>(p: &mut P, seq: u64) -> Result<u64, String> {
    let end = Entry::new(Position::at_exit(seq), Event::Control(ControlOp::Shutdown));
    let end_seq = p.append(&end).map_err(|e| e.to_string())?;
    p.wait_acked(end_seq).map_err(|e| e.to_string())?;
    Ok(end_seq)
}

/// The backup process's verdict on a stream that ended at `end_seq`: it must have exited
/// cleanly after printing `VERIFIED <end_seq>`.
pub fn check_verdict(
    verdict: Option<String>,
    status: std::process::ExitStatus,
    end_seq: u64,
) -> Result<(), String> {
    let verdict = verdict.ok_or("backup printed no verdict")?;
    if !status.success() || verdict != format!("VERIFIED {end_seq}") {
        return Err(format!("backup: {status}, said {verdict:?}"));
    }
    Ok(())
}

/// Takes the backup away (`take_away`: kill or freeze its process; the clock starts when it
/// returns), then commits markers from position `from` on until the primary reports an error.
/// Fails if none comes within four heartbeat timeouts; returns the error and how long it took,
/// for [`check_backup_loss`].
pub fn commit_until_error<P: StreamPrimary>(
    p: &mut P,
    from: u64,
    timeout: Duration,
    take_away: impl FnOnce() -> Result<(), String>,
) -> Result<(ChannelError, Duration), String> {
    take_away()?;
    let lost = Instant::now();
    let mut seq = from;
    loop {
        let r = p.append(&marker(seq)).and_then(|s| p.wait_acked(s));
        if let Err(e) = r {
            return Ok((e, lost.elapsed()));
        }
        if lost.elapsed() > timeout * 4 {
            return Err(format!(
                "no error {:?} after the backup was taken away",
                lost.elapsed()
            ));
        }
        seq += 1;
    }
}

/// Sends `signal` to process `pid` (a test's own backup child).
pub fn signal(pid: u32, signal: i32) -> Result<(), String> {
    let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
    // SAFETY: plain kill(2) on a child process of this test.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(format!(
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The backup-loss scenario every medium runs: 10,000 entries and a commit, then the backup's
/// process (`child`) is SIGKILLed or SIGSTOPped and the primary commits on until it reports an
/// error ([`commit_until_error`]); the child is reaped either way. Returns the error and how
/// long after the loss it came, for [`check_backup_loss`].
pub fn lose_backup<P: StreamPrimary>(
    p: &mut P,
    child: &mut std::process::Child,
    loss: Loss,
    timeout: Duration,
) -> Result<(ChannelError, Duration), String> {
    send_stream(p, 10_000, 7, |_| " (before the loss)".into())?;
    commit(p, 10_001)?;
    let pid = child.id();
    let lost = commit_until_error(p, 10_002, timeout, || match loss {
        Loss::Killed => signal(pid, libc::SIGKILL),
        Loss::Frozen => signal(pid, libc::SIGSTOP),
    });
    let _ = child.kill();
    let _ = child.wait();
    lost
}

/// A backup child process: this test binary run again with `args`, speaking a line protocol on
/// its stdout (first `LISTENING <address>`, last its verdict). Killed and reaped when dropped.
pub struct BackupProcess {
    pub child: std::process::Child,
    pub lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Drop for BackupProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this test binary as a backup with `args` and returns it with the address it
/// announced.
pub fn spawn_backup(args: &[&str]) -> Result<(BackupProcess, String), String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning backup: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines
        .next()
        .ok_or("backup exited before listening")?
        .map_err(|e| e.to_string())?;
    let addr = first
        .strip_prefix("LISTENING ")
        .ok_or_else(|| format!("backup said {first:?}"))?
        .to_string();
    Ok((BackupProcess { child, lines }, addr))
}
