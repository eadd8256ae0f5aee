//! A replica's journal: every log frame it replayed and, after a takeover, every entry it
//! recorded live, in one file of back-to-back `logfmt` frames with continuous sequence numbers
//! (the epoch steps up where the replica went live).
//!
//! Replaying a journal on a fresh VM ([`JournalLink`] under an ordinary [`crate::replay::Replayer`])
//! must end in the same memory as the replica that wrote it: the check that a takeover continued
//! exactly the guest the old primary's log described, with nothing lost or invented at the seam.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use logfmt::{Entry, FrameBuf};
use transport::{BackupLink, ChannelError};

use crate::engine::EngineError;
use crate::record::LogSink;

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io { context, source }
}

/// Largest frame an [`AloneLog`] writes (one entry each; a network input is at most 4 KiB).
const JOURNAL_FRAME_BYTES: usize = 64 * 1024;

/// Appends frames to a journal file.
#[derive(Debug)]
pub struct Journal {
    out: BufWriter<File>,
    bytes: u64,
}

impl Journal {
    /// Creates (truncates) the journal at `path`.
    pub fn create(path: &Path) -> Result<Self, EngineError> {
        let file = File::create(path).map_err(io("creating the journal"))?;
        Ok(Journal {
            out: BufWriter::with_capacity(1 << 20, file),
            bytes: 0,
        })
    }

    /// Appends one encoded frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> Result<(), EngineError> {
        self.out
            .write_all(frame)
            .map_err(io("writing the journal"))?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// Writes buffered frames to the file.
    pub fn flush(&mut self) -> Result<(), EngineError> {
        self.out.flush().map_err(io("writing the journal"))
    }

    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The log of a replica that runs alone (after a takeover, or a primary that won after losing
/// its backup): every entry counts as acknowledged at once; with a journal, each is also
/// appended to it as a one-entry frame.
#[derive(Debug)]
pub struct AloneLog {
    next_seq: u64,
    epoch: u64,
    journal: Option<Journal>,
    frame: FrameBuf,
}

impl AloneLog {
    /// Alone in `epoch`; the next entry gets sequence number `next_seq`.
    pub fn new(epoch: u64, next_seq: u64, journal: Option<Journal>) -> Self {
        AloneLog {
            next_seq: next_seq.max(1),
            epoch,
            journal,
            frame: FrameBuf::new(JOURNAL_FRAME_BYTES),
        }
    }
}

impl LogSink for AloneLog {
    fn append(&mut self, entry: &Entry<'_>) -> Result<u64, EngineError> {
        let seq = self.next_seq;
        if let Some(j) = &mut self.journal {
            self.frame.reset(self.epoch, seq);
            let encode = |e: logfmt::EncodeError| EngineError::Io {
                context: "encoding a journal entry",
                source: std::io::Error::other(e.to_string()),
            };
            self.frame.push(entry).map_err(encode)?;
            j.write_frame(self.frame.finish().map_err(encode)?)?;
        }
        self.next_seq += 1;
        Ok(seq)
    }
    fn pump(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
    fn acked(&self) -> u64 {
        u64::MAX
    }
    fn wait_acked(&mut self, _seq: u64) -> Result<(), EngineError> {
        // The last entry of a run (shutdown) waits here: make the journal complete on disk.
        match &mut self.journal {
            Some(j) => j.flush(),
            None => Ok(()),
        }
    }
    fn log_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, Journal::bytes)
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// A journal file as the backup end of a channel: its frames, in order, then a closed peer.
/// Drives [`crate::replay::Replayer`] through [`transport::Backup`], with every check a live
/// channel makes (CRC, continuous sequence numbers, epochs that never go back).
#[derive(Debug)]
pub struct JournalLink {
    bytes: Vec<u8>,
    at: usize,
    peeked: usize,
}

impl JournalLink {
    /// Reads the whole journal at `path`.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(io("reading the journal"))?;
        Ok(JournalLink {
            bytes,
            at: 0,
            peeked: 0,
        })
    }
}

impl BackupLink for JournalLink {
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        let rest = &self.bytes[self.at..];
        if rest.is_empty() {
            return Ok(None);
        }
        let len = logfmt::peek_frame_len(rest).map_err(ChannelError::from)?;
        let frame = rest.get(..len).ok_or_else(|| {
            ChannelError::CorruptMessage(format!(
                "journal ends inside a {len}-byte frame at offset {}",
                self.at
            ))
        })?;
        self.peeked = len;
        Ok(Some(frame))
    }
    fn consume(&mut self) -> Result<(), ChannelError> {
        self.at += std::mem::take(&mut self.peeked);
        Ok(())
    }
    fn ack(&mut self, _acked: u64, _epoch: u64) -> Result<(), ChannelError> {
        Ok(())
    }
    fn check_peer(&mut self) -> Result<(), ChannelError> {
        if self.at >= self.bytes.len() {
            return Err(ChannelError::PeerClosed);
        }
        Ok(())
    }
}
