//! What must hold for any bytes read as a journal file — the check the cargo-fuzz target
//! (`fuzz/fuzz_targets/journal.rs`, nightly) and the corpus test below (stable: genuine
//! journals and thousands of mutants) both run.
//!
//! [`JournalSource`] promises that every frame is checked as a live channel checks it (CRC,
//! continuous sequence numbers, epochs that never go back) before any of its entries is handed
//! out, and that the end of the file ends the log. So, for any bytes:
//! - reading never panics and stops after a bounded number of steps, with
//!   [`ChannelError::PeerClosed`] exactly when every byte of the file was accepted, and with
//!   another error with a reason otherwise ([`JournalSource::position`] then points at the
//!   frame refused);
//! - what is handed out is a prefix of the file, frame by frame: each frame's entries all or
//!   none, with sequence numbers continuing from the first expected one and epochs that never
//!   go back; the bytes skipped between two frames with entries are frames without entries
//!   that follow in the same way;
//! - every frame handed out is canonical: encoded again from its entries it gives back
//!   exactly its bytes, and the entries handed out are the frame's;
//! - a genuine journal ([`genuine`]) damaged anywhere (truncated, a byte changed, bytes
//!   appended) still yields every frame that lies wholly before the damage, and a journal cut
//!   at a frame boundary reads to a clean end.
//!
//! Each input is read twice: from sequence number 1, and (when the input starts with a frame
//! header) from its first frame's sequence number, as a joined backup's journal is read from
//! the entry after the state it joined with — a number that also comes from a file.

use std::ops::Range;
use std::time::Duration;

use logfmt::{Entry, Event, FrameView, Position, FRAME_HEADER_LEN};
use transport::ChannelError;

use super::JournalSource;
use crate::replay::EntrySource;

/// The frames of a genuine journal: replayed frames of epoch 2 (one of them without entries,
/// as a heartbeat frame is), then one-entry frames of epoch 3 (recorded live after a
/// takeover), with continuous sequence numbers from 1.
pub fn genuine() -> Vec<Vec<u8>> {
    let e = |exit: u64, ev: Event<'static>| Entry::new(Position::at_exit(exit), ev);
    let frame = |epoch: u64, seq: u64, entries: &[Entry<'_>]| {
        logfmt::encode_frame(epoch, seq, entries).unwrap_or_default()
    };
    vec![
        frame(2, 1, &[e(1, Event::Clock { ns: 1_000 })]),
        frame(
            2,
            2,
            &[
                e(
                    2,
                    Event::DeviceInput {
                        device: 1,
                        data: b"PUT k v",
                    },
                ),
                e(3, Event::Interrupt { vector: 33 }),
                e(3, Event::Random { data: b"\x5e\xed" }),
            ],
        ),
        frame(2, 5, &[]),
        frame(
            2,
            5,
            &[e(
                4,
                Event::OutputMarker {
                    device: 1,
                    len: 2,
                    digest: logfmt::digest(b"ok"),
                },
            )],
        ),
        frame(3, 6, &[e(5, Event::Clock { ns: 9_000 })]),
        frame(
            3,
            7,
            &[e(
                6,
                Event::DeviceInput {
                    device: 1,
                    data: b"GET k",
                },
            )],
        ),
    ]
}

/// The genuine journal: [`genuine`]'s frames back to back.
pub fn seed() -> Vec<u8> {
    genuine().concat()
}

/// Seeds: the genuine journal, the same cut inside its third frame, a journal that starts at a
/// later sequence number (a joined backup's), and an empty file.
pub fn seeds() -> Vec<Vec<u8>> {
    let g = genuine();
    let whole = seed();
    let cut = g[0].len() + g[1].len() + 7;
    vec![
        whole.clone(),
        whole[..cut].to_vec(),
        g[3..].concat(),
        Vec::new(),
    ]
}

/// What reading a journal gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Byte ranges of the frames with entries that were handed out, in order.
    pub frames: Vec<Range<usize>>,
    /// Entries handed out.
    pub entries: u64,
    /// Where reading stopped ([`JournalSource::position`]).
    pub stop: usize,
    /// Whether the log ended cleanly (the whole file accepted).
    pub clean: bool,
}

/// Reads `data` as a journal (from sequence number 1, and from its first frame's sequence
/// number) and checks the module's properties; the outcome of the read from 1.
pub fn check(data: &[u8]) -> Result<Outcome, String> {
    let outcome = read(data, None)?;
    // Bytes shared with the genuine journal are read as the genuine journal is: every genuine
    // frame wholly inside the common prefix was handed out.
    let genuine = genuine();
    let whole = seed();
    let common = data.iter().zip(&whole).take_while(|(a, b)| a == b).count();
    let mut end = 0;
    let mut boundaries = vec![0];
    for f in &genuine {
        end += f.len();
        boundaries.push(end);
    }
    let intact = boundaries
        .iter()
        .copied()
        .filter(|&b| b <= common)
        .max()
        .unwrap_or(0);
    if outcome.stop < intact {
        return Err(format!(
            "stopped at byte {} although the genuine frames up to byte {intact} are intact",
            outcome.stop
        ));
    }
    // A genuine journal cut short: it reads exactly to its last whole frame, cleanly if the
    // cut is at a frame boundary.
    if data.len() <= whole.len() && common == data.len() {
        let at_boundary = boundaries.contains(&data.len());
        if outcome.stop != intact || outcome.clean != at_boundary {
            return Err(format!(
                "the genuine journal cut at byte {} read to byte {} (clean: {}), expected {intact} (clean: {at_boundary})",
                data.len(),
                outcome.stop,
                outcome.clean
            ));
        }
    }
    if let Some(first) = first_seq(data) {
        read(data, Some(first))?;
    }
    Ok(outcome)
}

/// The sequence number in the header at the start of `data`, if there is a header.
fn first_seq(data: &[u8]) -> Option<u64> {
    let mut b = [0u8; 8];
    b.copy_from_slice(data.get(16..24)?);
    (data.len() >= FRAME_HEADER_LEN).then(|| u64::from_le_bytes(b))
}

/// One read of `data`, from `start` (sequence number 1 if `None`).
fn read(data: &[u8], start: Option<u64>) -> Result<Outcome, String> {
    let mut src = JournalSource::from_bytes(data.to_vec());
    if let Some(s) = start {
        src = src.starting_at(s);
    }
    let mut expected = start.unwrap_or(1).max(1);
    let mut epoch = 0u64;
    let mut pos = 0usize;
    let mut out = Outcome {
        frames: Vec::new(),
        entries: 0,
        stop: 0,
        clean: false,
    };
    // Every step accepts at least one frame of at least a header's length.
    for _ in 0..data.len() / FRAME_HEADER_LEN + 2 {
        if let Err(e) = src.wait(Duration::ZERO) {
            let stop = src.position();
            if stop < pos || stop > data.len() {
                return Err(format!(
                    "stopped at byte {stop}, outside [{pos}, {}]",
                    data.len()
                ));
            }
            skip_empty(data, pos..stop, &mut expected, &mut epoch)?;
            out.stop = stop;
            out.clean = matches!(e, ChannelError::PeerClosed);
            if out.clean != (stop == data.len()) {
                return Err(format!(
                    "ended with \"{e}\" at byte {stop} of {}",
                    data.len()
                ));
            }
            if e.to_string().is_empty() {
                return Err("an error without a reason".into());
            }
            if src.received() != out.entries {
                return Err(format!(
                    "received() says {} entries, {} were handed out",
                    src.received(),
                    out.entries
                ));
            }
            return Ok(out);
        }
        let at = src.position();
        if at < pos || at >= data.len() {
            return Err(format!(
                "a frame at byte {at}, outside [{pos}, {})",
                data.len()
            ));
        }
        skip_empty(data, pos..at, &mut expected, &mut epoch)?;
        // The frame as the file holds it, parsed on its own.
        let (frame, len) = FrameView::parse(&data[at..])
            .map_err(|e| format!("handed out the frame at byte {at}, which does not parse: {e}"))?;
        if frame.entry_count() == 0 {
            return Err(format!("a frame without entries at byte {at} is ready"));
        }
        let want: Vec<Entry<'_>> = frame.entries().collect();
        let mut got = 0usize;
        while let Some(le) = src
            .next_entry()
            .map_err(|e| format!("entry {got} of the checked frame at byte {at} failed: {e}"))?
        {
            if got == 0 && le.frame != Some(&data[at..at + len]) {
                return Err(format!(
                    "the first entry of the frame at byte {at} carries other frame bytes"
                ));
            }
            if got > 0 && le.frame.is_some() {
                return Err(format!(
                    "entry {got} of the frame at byte {at} carries the frame"
                ));
            }
            if want.get(got) != Some(&le.entry) {
                return Err(format!(
                    "entry {got} of the frame at byte {at} is {:?}, the frame holds {:?}",
                    le.entry,
                    want.get(got)
                ));
            }
            if le.seq != expected + got as u64 {
                return Err(format!(
                    "entry {got} of the frame at byte {at} has sequence number {}, expected {}",
                    le.seq,
                    expected + got as u64
                ));
            }
            src.advance();
            got += 1;
            if got > want.len() {
                return Err(format!("more entries than the frame at byte {at} holds"));
            }
        }
        if got != want.len() {
            return Err(format!(
                "{got} of the {} entries of the frame at byte {at} handed out",
                want.len()
            ));
        }
        follows(&frame, expected, epoch, at)?;
        canonical(&frame, &data[at..at + len], at)?;
        expected += got as u64;
        epoch = frame.epoch();
        out.entries += got as u64;
        out.frames.push(at..at + len);
        pos = at + len;
    }
    Err("the journal reader did not stop".into())
}

/// The bytes in `range` must be frames without entries, each following the one before.
fn skip_empty(
    data: &[u8],
    range: Range<usize>,
    expected: &mut u64,
    epoch: &mut u64,
) -> Result<(), String> {
    let mut at = range.start;
    while at < range.end {
        let (frame, len) = FrameView::parse(&data[at..range.end])
            .map_err(|e| format!("skipped bytes at {at} that are not a frame: {e}"))?;
        if frame.entry_count() != 0 {
            return Err(format!("skipped the frame at byte {at}, which has entries"));
        }
        follows(&frame, *expected, *epoch, at)?;
        canonical(&frame, &data[at..at + len], at)?;
        *epoch = frame.epoch();
        at += len;
    }
    Ok(())
}

fn follows(frame: &FrameView<'_>, expected: u64, epoch: u64, at: usize) -> Result<(), String> {
    if frame.first_seq() != expected || frame.epoch() < epoch {
        return Err(format!(
            "accepted the frame at byte {at} (epoch {}, sequence {}) after epoch {epoch}, expecting sequence {expected}",
            frame.epoch(),
            frame.first_seq()
        ));
    }
    Ok(())
}

/// An accepted frame, encoded again from its entries, gives back its bytes.
fn canonical(frame: &FrameView<'_>, bytes: &[u8], at: usize) -> Result<(), String> {
    let entries: Vec<Entry<'_>> = frame.entries().collect();
    let again = logfmt::encode_frame(frame.epoch(), frame.first_seq(), &entries)
        .map_err(|e| format!("the frame at byte {at} does not encode again: {e}"))?;
    if again != bytes {
        return Err(format!(
            "the frame at byte {at} is not canonical: read {bytes:02x?}, written again {again:02x?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::fuzz::{mutate, xorshift};

    #[test]
    fn the_genuine_journal_reads_whole() {
        let g = genuine();
        let out = check(&seed()).expect("the seed");
        assert!(out.clean);
        assert_eq!(out.stop, seed().len());
        assert_eq!(out.frames.len(), 5, "the five frames with entries");
        assert_eq!(out.entries, 7);
        // A changed byte in the fourth frame: the three frames before it, then a refusal.
        let mut bad = seed();
        let at = g[..3].iter().map(Vec::len).sum::<usize>() + FRAME_HEADER_LEN + 3;
        bad[at] ^= 0x10;
        let out = check(&bad).expect("a damaged journal");
        assert!(!out.clean);
        assert_eq!(out.frames.len(), 2);
        assert_eq!(out.entries, 4);
        assert_eq!(out.stop, at - FRAME_HEADER_LEN - 3);
        // A joined backup's journal, read from its first sequence number.
        let later = g[3..].concat();
        let mut src = JournalSource::from_bytes(later.clone()).starting_at(5);
        let mut n = 0;
        while src.wait(Duration::ZERO).is_ok() {
            while src.next_entry().expect("entry").is_some() {
                src.advance();
                n += 1;
            }
        }
        assert_eq!((n, src.position()), (3, later.len()));
    }

    #[test]
    fn the_last_sequence_number_is_refused_not_overflowed() {
        // A frame whose last entry has sequence number u64::MAX, in a journal read from there
        // (the starting number comes from the joined state's file): the next expected number
        // does not exist. It used to overflow (a panic in a debug build; in release the count
        // wrapped to 0, and a frame numbered 0 would have followed).
        let e = Entry::new(Position::at_exit(1), Event::Clock { ns: 1 });
        let last = logfmt::encode_frame(1, u64::MAX, &[e]).expect("frame");
        let out = check(&last).expect("check");
        assert!(!out.clean && out.frames.is_empty());
        let mut src = JournalSource::from_bytes(last).starting_at(u64::MAX);
        let err = src.wait(Duration::ZERO).expect_err("refused");
        assert!(err.to_string().contains("sequence"), "{err}");
        assert_eq!(src.position(), 0);
    }

    #[test]
    fn no_bytes_make_the_journal_reader_hand_out_anything_unchecked() {
        let started = std::time::Instant::now();
        let mut state = 0x6A09_E667_F3BC_C908u64;
        let mut runs = 0;
        for seed in seeds() {
            check(&seed).unwrap_or_else(|v| panic!("seed: {v}"));
            let mut current = seed.clone();
            for _ in 0..1500 {
                if let Err(v) = check(&current) {
                    panic!("{v}: input {current:02x?}");
                }
                runs += 1;
                let r = xorshift(&mut state);
                current = mutate(if r.is_multiple_of(3) { &current } else { &seed }, r);
            }
        }
        assert_eq!(runs, seeds().len() * 1500);
        tracing::info!("{runs} journal inputs in {:?}", started.elapsed());
    }

    /// The seed files `scripts/fuzz.sh` starts the `journal` target from.
    #[test]
    fn the_checked_in_journal_seeds_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/journal");
        let write = std::env::var_os("FTVM_WRITE_FUZZ_SEEDS").is_some();
        for (i, bytes) in seeds().into_iter().enumerate() {
            let path = root.join(format!("seed-{i}.bin"));
            if write {
                std::fs::create_dir_all(&root).expect("seed directory");
                std::fs::write(&path, &bytes).expect("write seed");
            }
            let have = std::fs::read(&path).unwrap_or_default();
            assert!(
                have == bytes,
                "fuzz/seeds/journal/seed-{i}.bin is stale: FTVM_WRITE_FUZZ_SEEDS=1 cargo test -p vmm --lib journal::fuzz"
            );
        }
    }
}
