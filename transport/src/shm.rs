//! The shared-memory medium: the primary writes frames straight into a ring in a mapping it
//! shares with the backup process, and reads the backup's ACK from a word in the same mapping.
//! No system call on the data path: this is the kernel-bypass reference and the physical-limit
//! baseline for the other media (a cache-line round trip between two cores).
//!
//! Set-up runs over a Unix stream socket the backup listens on: the handshake first, and only
//! then does the backup tell the authenticated primary the path of the mapping
//! (`/dev/shm/ftvm-…`, mode 0600, under a random name), which it creates then or made ahead
//! ([`PreparedRing`]). Once the primary has mapped it, the backup unlinks the file,
//! so no third process can attach later. The socket stays open: its end-of-file is how each side
//! learns at once that the other process died; heartbeats cover a hung peer.
//!
//! Mapping layout: the ring region (`ring::region_len(capacity)` bytes, see [`crate::ring`]),
//! padded to 4 KiB, then a 4 KiB control page: offset 0 the backup's cumulative ACK (u64),
//! offset 8 the backup's heartbeat counter (u64), offset 16 the backup's replay position (u64),
//! offset 24 the id of the backup thread the primary may kick (u64, 0 for none; see
//! [`crate::kick`]); offsets 32, 40 and 48 the backup's ACK helper: its wake counter (a futex
//! on the low 32 bits), the primary's core plus one, and whether the helper runs (see
//! [`Backup::start_ack_helper`](crate::channel::Backup::start_ack_helper)).
//! With `--channel-crypto auth`, offset 64 holds the sealed ACK under a sequence lock: version
//! (u64, odd while the backup writes), epoch, received, replayed (u64 each) and the 24-byte seal
//! ([`crate::auth`]); the primary takes ACKs only from there, and only once the seal verifies
//! (a bad seal ends the channel).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{AckOpener, AckSealer, ACK_SEAL_LEN};
use crate::channel::{Ack, Backup, BackupLink, BackupNews, ChannelConfig, Primary, PrimaryLink};
use crate::control;
use crate::error::ChannelError;
use crate::handshake::{self, MediumKind};
use crate::region::{RingMemory, SharedRegion};
use crate::ring::{self, Consumer, Producer, RingError};

const PAGE: usize = 4096;

fn control_offset(capacity: usize) -> usize {
    ring::region_len(capacity).div_ceil(PAGE) * PAGE
}

/// The control words, viewed in a mapped region.
#[derive(Debug)]
struct Control {
    region: Arc<SharedRegion>,
    offset: usize,
}

impl Control {
    fn new(region: Arc<SharedRegion>, offset: usize) -> Result<Self, ChannelError> {
        if region.len() < offset + PAGE {
            return Err(ChannelError::BadHandshake(format!(
                "shared region of {} bytes has no control page at {offset}",
                region.len()
            )));
        }
        Ok(Control { region, offset })
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        self.region.word(self.offset + 8 * index)
    }

    fn acked(&self) -> &AtomicU64 {
        self.word(0)
    }

    fn beats(&self) -> &AtomicU64 {
        self.word(1)
    }

    fn replayed(&self) -> &AtomicU64 {
        self.word(2)
    }

    /// The thread id the primary may kick ([`crate::kick`]); 0: none.
    fn kick_tid(&self) -> &AtomicU64 {
        self.word(3)
    }

    /// The ACK helper's wake counter (a futex on its low 32 bits; [`Backup::start_ack_helper`]).
    fn helper_wakes(&self) -> &AtomicU64 {
        self.word(4)
    }

    /// The core the primary's thread waits on, plus one (0: not said).
    fn helper_core(&self) -> &AtomicU64 {
        self.word(5)
    }

    /// Whether the backup's ACK helper is running.
    fn helper_ready(&self) -> &AtomicU64 {
        self.word(6)
    }

    /// Counts one wake-up of the ACK helper and wakes it.
    fn wake_helper(&self) {
        self.helper_wakes().fetch_add(1, Ordering::AcqRel);
        futex_wake(self.helper_wakes());
    }

    /// The sealed ACK's words: version, epoch, received, replayed, then the seal's three.
    fn sealed(&self, index: usize) -> &AtomicU64 {
        self.word(SEALED_ACK + index)
    }

    /// Publishes a sealed ACK (the backup: the only writer).
    fn write_sealed(&self, ack: &Ack, seal: &[u8; ACK_SEAL_LEN]) {
        // Even before a write, odd during it (a writer that died mid-write left it odd).
        let v = self.sealed(0).load(Ordering::Relaxed);
        let v = v.wrapping_add(v & 1);
        self.sealed(0).store(v.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.sealed(1).store(ack.epoch, Ordering::Relaxed);
        self.sealed(2).store(ack.received, Ordering::Relaxed);
        self.sealed(3).store(ack.replayed, Ordering::Relaxed);
        for (i, chunk) in seal.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.sealed(4 + i)
                .store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.sealed(0).store(v.wrapping_add(2), Ordering::Release);
    }

    /// Reads the sealed ACK if it is not being written: (version, epoch, received, replayed,
    /// seal).
    fn read_sealed(&self) -> Option<(u64, Ack, [u8; ACK_SEAL_LEN])> {
        let v = self.sealed(0).load(Ordering::Acquire);
        if v % 2 == 1 {
            return None;
        }
        let ack = Ack {
            epoch: self.sealed(1).load(Ordering::Relaxed),
            received: self.sealed(2).load(Ordering::Relaxed),
            replayed: self.sealed(3).load(Ordering::Relaxed),
        };
        let mut seal = [0u8; ACK_SEAL_LEN];
        for (i, chunk) in seal.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&self.sealed(4 + i).load(Ordering::Relaxed).to_le_bytes());
        }
        fence(Ordering::Acquire);
        (self.sealed(0).load(Ordering::Relaxed) == v).then_some((v, ack, seal))
    }
}

/// Word index of the sealed ACK on the control page.
const SEALED_ACK: usize = 8;

/// Listens for a primary on a Unix socket at `path` (a stale socket file there is replaced).
pub fn listen(path: impl AsRef<Path>) -> Result<UnixListener, ChannelError> {
    let path = path.as_ref();
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| ChannelError::io("removing a stale socket", e))?;
    }
    UnixListener::bind(path).map_err(|e| ChannelError::io("binding the control socket", e))
}

/// Accepts one primary, authenticates it, creates the shared ring for it and returns the
/// backup's channel end.
pub fn accept(
    listener: &UnixListener,
    config: ChannelConfig,
) -> Result<Backup<ShmBackupLink>, ChannelError> {
    config.validate()?;
    let stream = control::accept(listener)?;
    backup_on(stream, config)
}

/// A backup's shared ring made ahead of a primary's connection: creating and faulting in the
/// mapping (a 4 MiB ring: 3-7 ms on our hosts, most of a channel's set-up) is then off the
/// path between the primary's dial and the first frame (a join's pause). The file is mode
/// 0600 under a random name, told only to an authenticated primary, and unlinked once that
/// primary has mapped it (or when this value is dropped unused).
#[derive(Debug)]
pub struct PreparedRing {
    path: PathBuf,
    capacity: usize,
    control: Control,
    consumer: Consumer<Arc<SharedRegion>>,
}

impl PreparedRing {
    /// Creates, formats and maps a ring of `config.ring_capacity`.
    pub fn create(config: &ChannelConfig) -> Result<Self, ChannelError> {
        config.validate()?;
        let capacity = config.ring_capacity;
        let ctrl = control_offset(capacity);
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix).map_err(|e| {
            ChannelError::io("naming the ring", std::io::Error::other(e.to_string()))
        })?;
        let path = PathBuf::from("/dev/shm").join(format!(
            "ftvm-{:x}-{}-{:016x}",
            config.session_id,
            std::process::id(),
            u64::from_le_bytes(suffix)
        ));
        let region = SharedRegion::create(&path, ctrl + PAGE).map_err(|e| ChannelError::Io {
            context: "creating the shared ring",
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ChannelError::io("restricting the shared ring", e))?;
        ring::format(&region, capacity)?;
        let region = Arc::new(region);
        let control = Control::new(region.clone(), ctrl)?;
        let consumer = Consumer::attach(region)?;
        Ok(PreparedRing {
            path,
            capacity,
            control,
            consumer,
        })
    }
}

/// The backup's channel end over a connected control socket, whichever side dialed:
/// authenticates the primary, creates the shared ring for it.
pub fn backup_on(
    stream: UnixStream,
    config: ChannelConfig,
) -> Result<Backup<ShmBackupLink>, ChannelError> {
    backup_on_prepared(stream, config, None)
}

/// [`backup_on`] with a ring made ahead ([`PreparedRing`]); one of another capacity than
/// `config`'s is dropped and a new one made.
pub fn backup_on_prepared(
    mut stream: UnixStream,
    config: ChannelConfig,
    prepared: Option<PreparedRing>,
) -> Result<Backup<ShmBackupLink>, ChannelError> {
    config.validate()?;
    control::prepare(&stream, config.handshake_timeout)?;
    let hello =
        handshake::backup_authenticate(&mut stream, &config.session_params(MediumKind::Shm))?;

    // The primary is authenticated: if the shared ring cannot be made, it is told why.
    let ring = match prepared.filter(|r| r.capacity == config.ring_capacity) {
        Some(ring) => Ok(ring),
        None => PreparedRing::create(&config),
    };
    let PreparedRing {
        path,
        control,
        consumer,
        ..
    } = match ring {
        Ok(parts) => parts,
        Err(e) => {
            let _ = handshake::backup_refuse_medium(&mut stream, &e.to_string());
            return Err(e);
        }
    };

    let path_bytes = path.as_os_str().as_encoded_bytes().to_vec();
    handshake::backup_welcome(&mut stream, config.resume_seq.max(1), &path_bytes)?;
    let mut attached = [0u8; 1];
    control::read_exact(&mut stream, &mut attached, "the primary to map the ring")?;
    if attached != *b"A" {
        return Err(ChannelError::BadHandshake(
            "primary did not confirm the mapping".into(),
        ));
    }
    // Nobody else may attach from now on.
    let _ = std::fs::remove_file(&path);
    control::go_nonblocking(&stream)?;
    let link = ShmBackupLink {
        consumer,
        control,
        stream,
        sealer: None,
    };
    let resume = config.resume_seq;
    Backup::new(link, config, resume, hello.epoch, &hello.keys)
}

/// Connects to a backup's control socket, authenticates, maps the backup's ring and returns the
/// primary's channel end.
pub fn connect(
    path: impl AsRef<Path>,
    config: ChannelConfig,
) -> Result<Primary<ShmPrimaryLink>, ChannelError> {
    config.validate()?;
    let stream = UnixStream::connect(path.as_ref())
        .map_err(|e| ChannelError::io("connecting to the backup's control socket", e))?;
    primary_on(stream, config)
}

/// The primary's channel end over a connected control socket, whichever side dialed:
/// authenticates, maps the backup's ring.
pub fn primary_on(
    mut stream: UnixStream,
    config: ChannelConfig,
) -> Result<Primary<ShmPrimaryLink>, ChannelError> {
    config.validate()?;
    control::prepare(&stream, config.handshake_timeout)?;
    let accepted =
        handshake::primary_handshake(&mut stream, &config.session_params(MediumKind::Shm))?;
    let ring_path = PathBuf::from(
        String::from_utf8(accepted.medium_info)
            .map_err(|_| ChannelError::BadHandshake("ring path is not UTF-8".into()))?,
    );
    if !ring_path.starts_with("/dev/shm") {
        return Err(ChannelError::BadHandshake(format!(
            "ring path {} is outside /dev/shm",
            ring_path.display()
        )));
    }
    let region = Arc::new(
        SharedRegion::open(&ring_path).map_err(|e| ChannelError::Io {
            context: "mapping the backup's ring",
            source: std::io::Error::other(e.to_string()),
        })?,
    );
    let producer = Producer::attach(region.clone())?;
    let control = Control::new(region, control_offset(producer.capacity()))?;
    control::write_all(&mut stream, b"A", "confirming the mapping")?;
    control::go_nonblocking(&stream)?;
    let backup_pid = crate::kick::peer_pid(&stream);
    let link = ShmPrimaryLink {
        producer,
        control,
        stream,
        backup_pid,
        last_beats: 0,
        acks: None,
        sealed: (0, 0, 0),
        sealed_at_beats: 0,
        sealed_retry: true,
    };
    Primary::new(link, config, accepted.resume_seq, &accepted.keys)
}

/// The primary's shared-memory link.
#[derive(Debug)]
pub struct ShmPrimaryLink {
    producer: Producer<Arc<SharedRegion>>,
    control: Control,
    stream: UnixStream,
    last_beats: u64,
    /// Checks the sealed ACK (crypto `auth`), with the last version checked and what it said.
    acks: Option<AckOpener>,
    sealed: (u64, u64, u64),
    /// The beat counter when the sealed block was last read, and whether it was being written
    /// then (read it again).
    sealed_at_beats: u64,
    sealed_retry: bool,
    /// The backup process, as the kernel knows the set-up socket's peer: kicks go only to
    /// its threads.
    backup_pid: Option<i32>,
}

impl PrimaryLink for ShmPrimaryLink {
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError> {
        match self.producer.try_push(frame) {
            Ok(()) => Ok(true),
            Err(RingError::Full { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn flush(&mut self) -> Result<bool, ChannelError> {
        Ok(true)
    }

    fn poll(&mut self) -> Result<BackupNews, ChannelError> {
        let (acked, replayed) = match &mut self.acks {
            None => (
                self.control.acked().load(Ordering::Acquire),
                self.control.replayed().load(Ordering::Acquire),
            ),
            Some(opener) => {
                // The backup bumps the beat counter after each sealed ACK it wrote, so the
                // sealed block (a cache line of its own) is only read when something new may
                // be there: spinning on it would pull the line away from the backup while it
                // writes the next ACK, word after word.
                let beats = self.control.beats().load(Ordering::Acquire);
                if beats != self.sealed_at_beats || self.sealed_retry {
                    self.sealed_at_beats = beats;
                    match self.control.read_sealed() {
                        Some((v, ack, seal)) => {
                            self.sealed_retry = false;
                            if v != self.sealed.0 {
                                opener.open(ack.epoch, ack.received, ack.replayed, &seal)?;
                                self.sealed = (v, ack.received, ack.replayed);
                            }
                        }
                        // Being written right now: the last checked one; read again next poll.
                        None => self.sealed_retry = true,
                    }
                }
                (self.sealed.1, self.sealed.2)
            }
        };
        let beats = self.control.beats().load(Ordering::Relaxed);
        let heard = beats != self.last_beats;
        self.last_beats = beats;
        // Always report the ACK word: reading it and the counter is not one atomic step, so an
        // ACK may land between the two loads and must not wait for the next heartbeat.
        Ok(BackupNews {
            acked: Some(acked),
            replayed: Some(replayed),
            heard,
        })
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        control::check_peer(&mut self.stream, "shared-memory")
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        // Nothing to sleep on for memory; sleep briefly so blocking mode stays cheap.
        Ok(crate::poll::PollPolicy::nap(timeout))
    }

    fn seal_acks(&mut self, opener: AckOpener) {
        // ACKs count from what the plain words say now (the resume point); a sealed ACK left
        // on the page by an earlier session (another key) is not looked at.
        self.sealed = (
            self.control.sealed(0).load(Ordering::Acquire),
            self.control.acked().load(Ordering::Acquire),
            self.control.replayed().load(Ordering::Acquire),
        );
        self.acks = Some(opener);
    }

    fn wake_ack_helper(&mut self) -> bool {
        if self.control.helper_ready().load(Ordering::Acquire) == 0 {
            return false;
        }
        // SAFETY: sched_getcpu has no arguments.
        let core = unsafe { libc::sched_getcpu() };
        if let Ok(core) = u64::try_from(core) {
            self.control
                .helper_core()
                .store(core + 1, Ordering::Relaxed);
        }
        self.control.wake_helper();
        true
    }

    fn kick(&mut self) -> bool {
        let tid = self.control.kick_tid().load(Ordering::Relaxed);
        match (self.backup_pid, i32::try_from(tid)) {
            (Some(pid), Ok(tid)) if tid > 0 => crate::kick::kick(pid, tid),
            _ => false,
        }
    }
}

/// The ACK helper's side of the control page.
#[derive(Debug)]
struct ShmHelperWake(Control);

/// FUTEX_WAIT (not private: the word is in a mapping two processes share) on the low half of
/// `word` while it holds `seen`, for at most `timeout`.
fn futex_wait(word: &AtomicU64, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(60) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: the address is an aligned, mapped 8-byte atomic whose low half (little-endian)
    // is the 32-bit futex word; the kernel only reads it and `ts`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        )
    };
}

/// FUTEX_WAKE of one waiter on `word`'s low half.
fn futex_wake(word: &AtomicU64) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE reads nothing but the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        )
    };
}

impl crate::channel::HelperWake for ShmHelperWake {
    fn current(&self) -> u32 {
        self.0.helper_wakes().load(Ordering::Acquire) as u32
    }

    fn wait(&self, seen: u32, timeout: Duration) {
        futex_wait(self.0.helper_wakes(), seen, timeout);
    }

    fn wake(&self) {
        self.0.wake_helper();
    }

    fn core(&self) -> Option<usize> {
        let c = self.0.helper_core().load(Ordering::Relaxed);
        usize::try_from(c).ok()?.checked_sub(1)
    }

    fn set_ready(&self, ready: bool) {
        self.0
            .helper_ready()
            .store(u64::from(ready), Ordering::Release);
    }
}

/// The backup's shared-memory link.
#[derive(Debug)]
pub struct ShmBackupLink {
    consumer: Consumer<Arc<SharedRegion>>,
    control: Control,
    stream: UnixStream,
    /// Seals every ACK (crypto `auth`).
    sealer: Option<AckSealer>,
}

impl BackupLink for ShmBackupLink {
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        Ok(self.consumer.peek()?)
    }

    fn consume(&mut self) -> Result<(), ChannelError> {
        self.consumer.advance_peeked();
        self.consumer.release();
        Ok(())
    }

    fn ack(&mut self, ack: Ack) -> Result<(), ChannelError> {
        // Sealed block first: the primary reads it once it sees the beat counter move, and the
        // plain words and the counter share the other line it spins on, written last together.
        if let Some(sealer) = &mut self.sealer {
            let seal = sealer.seal(ack.epoch, ack.received, ack.replayed);
            self.control.write_sealed(&ack, &seal);
        }
        self.control
            .replayed()
            .store(ack.replayed, Ordering::Release);
        self.control.acked().store(ack.received, Ordering::Release);
        self.control.beats().fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn seal_acks(&mut self, sealer: AckSealer) {
        self.sealer = Some(sealer);
    }

    fn ack_helper(&mut self) -> Option<Arc<dyn crate::channel::HelperWake>> {
        Some(Arc::new(ShmHelperWake(Control {
            region: self.control.region.clone(),
            offset: self.control.offset,
        })))
    }

    fn fence(&mut self) {
        // The channel is over: no more kicks (a primary that has not noticed yet could
        // otherwise interrupt this thread's system calls during a takeover).
        self.control.kick_tid().store(0, Ordering::Release);
    }

    fn enable_kicks(&mut self) -> bool {
        if !crate::kick::install_handler() {
            return false;
        }
        let tid = crate::kick::current_tid();
        self.control
            .kick_tid()
            .store(u64::try_from(tid).unwrap_or(0), Ordering::Release);
        true
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        control::check_peer(&mut self.stream, "shared-memory")
    }
}
