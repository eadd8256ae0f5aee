//! What the two-process channel tests share: the checksummed entry payloads the primary sends,
//! and the backup's check of the stream (every entry in order, once, intact).

use std::time::{Duration, Instant};

use logfmt::{ControlOp, Event};
use rand::rngs::SmallRng;
use rand::Rng;
use transport::ChannelError;

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
