//! A replica's journal: every log frame it replayed and, after a takeover, every entry it
//! recorded live, in one file of back-to-back `logfmt` frames with continuous sequence numbers
//! (the epoch steps up where the replica went live).
//!
//! Replaying a journal on a fresh VM ([`JournalSource`] under an ordinary [`crate::replay::Replayer`])
//! must end in the same memory as the replica that wrote it: the check that a takeover continued
//! exactly the guest the old primary's log described, with nothing lost or invented at the seam.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use std::time::Duration;

use logfmt::{Entry, FrameBuf, FrameView};
use transport::channel::LoggedEntry;
use transport::ChannelError;

use crate::engine::EngineError;
use crate::record::LogSink;
use crate::replay::EntrySource;

pub mod fuzz;

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

    /// The sequence number the next entry gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether entries also go to a journal.
    pub fn has_journal(&self) -> bool {
        self.journal.is_some()
    }

    /// The same log (journal, sequence numbers) going on in `epoch`.
    pub fn in_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
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

/// A journal file as a replica's entry source: its frames in order, each checked as a live
/// channel checks it (CRC, continuous sequence numbers, epochs that never go back) before any
/// of its entries is replayed, read in place; the end of the file ends the log.
#[derive(Debug)]
pub struct JournalSource {
    bytes: Vec<u8>,
    /// Offset of the frame being replayed.
    at: usize,
    /// That frame passed the checks (its length, first sequence number and entry count).
    checked: Option<(usize, u64, u32)>,
    /// Body offset and index of the next entry, and where the one after it starts.
    offset: usize,
    index: u32,
    next: usize,
    current: bool,
    expected: u64,
    epoch: u64,
    received: u64,
}

impl JournalSource {
    /// Reads the whole journal at `path`.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(io("reading the journal"))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A journal already in memory (the bytes of a journal file).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        JournalSource {
            bytes,
            at: 0,
            checked: None,
            offset: 0,
            index: 0,
            next: 0,
            current: false,
            expected: 1,
            epoch: 0,
            received: 0,
        }
    }

    /// Offset in the journal of the frame being replayed, or of the next frame to check: after
    /// the log ended, the length of the journal (a clean end) or where the frame that was
    /// refused starts (every byte before it was checked and its entries handed out).
    pub fn position(&self) -> usize {
        self.at
    }

    /// A journal whose first entry is `seq` (a backup that joined a running primary journals
    /// from the first entry after the state it joined with).
    pub fn starting_at(mut self, seq: u64) -> Self {
        self.expected = seq.max(1);
        self
    }

    /// Checks the frame at `at`.
    fn check(&mut self) -> Result<(), ChannelError> {
        let rest = &self.bytes[self.at..];
        if rest.is_empty() {
            return Err(ChannelError::PeerClosed);
        }
        let len = logfmt::peek_frame_len(rest)?;
        let bytes = rest.get(..len).ok_or_else(|| {
            ChannelError::CorruptMessage(format!(
                "journal ends inside a {len}-byte frame at offset {}",
                self.at
            ))
        })?;
        let (frame, _) = FrameView::parse(bytes)?;
        transport::channel::follows(&frame, self.expected, self.epoch)?;
        let count = frame.entry_count();
        // A frame that uses sequence number u64::MAX leaves no number for the next entry.
        let next = self.expected.checked_add(u64::from(count)).ok_or_else(|| {
            ChannelError::CorruptMessage(format!(
                "journal frame at offset {} runs out of sequence numbers",
                self.at
            ))
        })?;
        self.epoch = frame.epoch();
        self.expected = next;
        self.received += u64::from(count);
        if count == 0 {
            self.at += len;
        } else {
            self.checked = Some((len, frame.first_seq(), count));
        }
        Ok(())
    }
}

impl EntrySource for JournalSource {
    fn next_entry(&mut self) -> Result<Option<LoggedEntry<'_>>, ChannelError> {
        let Some((len, first_seq, _)) = self.checked else {
            return Ok(None);
        };
        let frame = FrameView::parse_landed(&self.bytes[self.at..self.at + len])?;
        let (entry, next) = frame.entry_at(self.offset, self.index)?;
        self.next = next;
        self.current = true;
        Ok(Some(LoggedEntry {
            seq: first_seq + u64::from(self.index),
            entry,
            frame: (self.index == 0).then(|| frame.as_bytes()),
        }))
    }

    fn advance(&mut self) {
        let Some((len, _, count)) = self.checked else {
            return;
        };
        if !std::mem::take(&mut self.current) {
            return;
        }
        self.index += 1;
        self.offset = self.next;
        if self.index >= count {
            self.at += len;
            self.checked = None;
            self.index = 0;
            self.offset = 0;
        }
    }

    fn pump(&mut self) -> Result<bool, ChannelError> {
        if self.checked.is_some() {
            return Ok(false);
        }
        self.check()?;
        Ok(true)
    }

    fn wait(&mut self, _timeout: Duration) -> Result<bool, ChannelError> {
        while self.checked.is_none() {
            self.check()?;
        }
        Ok(true)
    }

    fn received(&self) -> u64 {
        self.received
    }
}
