//! The primary's side of a state transfer: pre-copy rounds over KVM's dirty-page log while the
//! guest runs, then the switch-over with the guest stopped.

use std::io::Write;
use std::time::Instant;

use super::state::VcpuState;
use super::stream::{page_hash, ChunkWriter, Header, MAX_PAGES_PER_CHUNK};
use super::MigrateError;
use crate::vm::{DirtyLog, PAGE_SIZE};

/// When the pre-copy rounds stop and the switch-over begins.
#[derive(Debug, Clone)]
pub struct PrecopyConfig {
    /// Stop once no more than this many pages were dirtied during a round: they go with the
    /// guest stopped.
    pub small_enough: usize,
    /// Stop once the pages dirtied during a round would take no longer than this to send, ms,
    /// at the bandwidth the rounds have reached (the last round of at least 1 MiB): another
    /// round would cost more than it takes off the pause.
    pub final_send_ms: f64,
    /// Stop after this many rounds without the dirty set shrinking by [`Self::min_progress`].
    pub stalled_rounds: u32,
    /// The fraction a round's dirty set must shrink by to count as progress.
    pub min_progress: f64,
    /// Stop after this many rounds in any case (round 0, all of memory, included).
    pub max_rounds: u32,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            small_enough: 256,
            final_send_ms: 3.0,
            stalled_rounds: 2,
            min_progress: 0.1,
            max_rounds: 30,
        }
    }
}

/// One round of copying.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RoundStats {
    /// Round number (0: all of memory).
    pub round: u32,
    /// Pages sent (zero pages included, as ZEROS runs).
    pub pages: u64,
    /// Of those, all-zero pages (sent as a few bytes).
    pub zero_pages: u64,
    /// Stream bytes of the round.
    pub bytes: u64,
    /// How long it took, ms.
    pub ms: f64,
    /// Pages the guest dirtied while it ran (what the next round sends).
    pub dirtied: u64,
}

/// What the switch-over sent, with the guest stopped.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FinishStats {
    /// Pages sent in the final round.
    pub pages: u64,
    /// Stream bytes of the final round, vCPU and device state included.
    pub bytes: u64,
    /// Time to send it, ms.
    pub ms: f64,
    /// Of which reading the last dirty bitmap (KVM_GET_DIRTY_LOG), and sending the pages.
    pub dirty_log_ms: f64,
    pub pages_ms: f64,
    /// The pages digest sent (the primary's memory at the switch-over).
    pub pages_digest: u64,
}

/// Pages to send, as a bitmap (64 per word).
enum Set<'a> {
    All,
    Bits(&'a [u64]),
}

/// Pages a round sends between two looks at the dirty log (32 MiB): each look costs a
/// `KVM_GET_DIRTY_LOG` (the bitmap, 32 KiB per GiB, and write-protecting what it reports).
const REFRESH_PAGES: usize = 8192;

/// What one pass over a set of pages did.
struct Sent {
    pages: u64,
    zeros: u64,
    /// The pages the next round must send.
    next: Vec<u64>,
}

/// Adds the pages of `dirty` (just taken from the log) to `next`, except those the current
/// pass over `set` has yet to read (from page `position` on): it reads their new bytes.
fn merge_dirty(next: &mut Vec<u64>, dirty: &[u64], set: &Set<'_>, position: usize) {
    if next.len() < dirty.len() {
        next.resize(dirty.len(), 0);
    }
    for (i, (n, d)) in next.iter_mut().zip(dirty).enumerate() {
        if *d == 0 {
            continue;
        }
        let base = i * 64;
        // Bits of pages already read in this pass.
        let read = if base + 64 <= position {
            u64::MAX
        } else if base >= position {
            0
        } else {
            (1u64 << (position - base)) - 1
        };
        let ahead = match set {
            Set::All => u64::MAX,
            Set::Bits(bits) => bits.get(i).copied().unwrap_or(0),
        } & !read;
        *n |= d & !ahead;
    }
}

/// The pre-copy sender. Keeps the hash of every page as last sent, so that the pages digest at
/// the switch-over costs one pass over 8 bytes per page, not over all of memory.
pub struct Precopy {
    log: DirtyLog,
    config: PrecopyConfig,
    hashes: Vec<u64>,
    zero_hash: u64,
    rounds: Vec<RoundStats>,
    /// Dirty pages taken from KVM but not yet sent (the last round's set, sent at finish).
    pending: Vec<u64>,
    /// The run of non-zero pages being built (read straight out of guest memory into it),
    /// with room for one page more: `run_len` bytes of it are the run.
    run: Box<[u8]>,
    run_len: usize,
}

impl std::fmt::Debug for Precopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precopy")
            .field("pages", &self.hashes.len())
            .field("rounds", &self.rounds.len())
            .finish_non_exhaustive()
    }
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl Precopy {
    /// Copies the memory behind `log` (dirty logging is on from its creation).
    pub fn new(log: DirtyLog, config: PrecopyConfig) -> Self {
        let pages = log.pages();
        Precopy {
            log,
            config,
            hashes: vec![0; pages],
            zero_hash: page_hash(&[0u8; PAGE_SIZE]),
            rounds: Vec::new(),
            pending: Vec::new(),
            run: vec![0u8; (MAX_PAGES_PER_CHUNK as usize + 1) * PAGE_SIZE].into_boxed_slice(),
            run_len: 0,
        }
    }

    /// The rounds so far.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    /// Sends the header, then rounds while the guest runs, until the dirty set is small
    /// enough or stops shrinking. `keep_going` is asked between rounds (e.g. the joiner's
    /// connection still alive); `false` ends the rounds early.
    pub fn run<W: Write>(
        &mut self,
        w: &mut ChunkWriter<W>,
        header: &Header,
        mut keep_going: impl FnMut() -> bool,
    ) -> Result<(), MigrateError> {
        w.header(header)?;
        let mut stalled = 0u32;
        let mut last_dirty = u64::MAX;
        // Stream bytes per ms the rounds reached.
        let mut bytes_per_ms = 0.0f64;
        loop {
            let round = self.rounds.len() as u32;
            let started = Instant::now();
            let before = w.bytes();
            // Round 0 sends all of memory, later rounds what the guest dirtied meanwhile.
            let bits = std::mem::take(&mut self.pending);
            let set = if round == 0 {
                Set::All
            } else {
                Set::Bits(&bits)
            };
            let sent = self.send(w, set, true)?;
            w.round_end(round, sent.pages)?;
            w.flush()?;
            // What the guest wrote meanwhile and this round did not read after: the next
            // round's pages.
            self.pending = sent.next;
            let (pages, zeros) = (sent.pages, sent.zeros);
            let dirty = count(&self.pending);
            self.rounds.push(RoundStats {
                round,
                pages,
                zero_pages: zeros,
                bytes: w.bytes() - before,
                ms: started.elapsed().as_secs_f64() * 1e3,
                dirtied: dirty,
            });
            tracing::debug!(round, pages, dirty, "pre-copy round");
            let stats = &self.rounds[self.rounds.len() - 1];
            if stats.bytes >= 1 << 20 && stats.ms > 0.0 {
                bytes_per_ms = stats.bytes as f64 / stats.ms;
            }
            let send_ms = (dirty as f64 * PAGE_SIZE as f64) / bytes_per_ms.max(f64::MIN_POSITIVE);
            if dirty as usize <= self.config.small_enough
                || send_ms <= self.config.final_send_ms
                || self.rounds.len() as u32 >= self.config.max_rounds
                || !keep_going()
            {
                return Ok(());
            }
            if last_dirty != u64::MAX
                && (dirty as f64) > (1.0 - self.config.min_progress) * last_dirty as f64
            {
                stalled += 1;
                if stalled >= self.config.stalled_rounds {
                    return Ok(());
                }
            } else {
                stalled = 0;
            }
            last_dirty = dirty;
        }
    }

    /// The switch-over, with the vCPU stopped at an exit boundary: the last dirty pages, the
    /// vCPU state, the VMM's `device` state, the digests, the end.
    pub fn finish<W: Write>(
        &mut self,
        w: &mut ChunkWriter<W>,
        vcpu: &VcpuState,
        device: &[u8],
        registers_digest: u64,
    ) -> Result<FinishStats, MigrateError> {
        let started = Instant::now();
        let before = w.bytes();
        let mut bits = std::mem::take(&mut self.pending);
        let now = self.log.take_dirty()?;
        let dirty_log_ms = started.elapsed().as_secs_f64() * 1e3;
        if bits.len() < now.len() {
            bits.resize(now.len(), 0);
        }
        for (b, n) in bits.iter_mut().zip(&now) {
            *b |= n;
        }
        // The guest is stopped: nothing is dirtied while these go.
        let pages = self.send(w, Set::Bits(&bits), false)?.pages;
        w.flush()?;
        let pages_ms = started.elapsed().as_secs_f64() * 1e3 - dirty_log_ms;
        w.vcpu(&vcpu.encode())?;
        w.device(device)?;
        let pages_digest = self.digest();
        w.hashes(pages_digest, registers_digest)?;
        w.end()?;
        w.flush()?;
        Ok(FinishStats {
            pages,
            bytes: w.bytes() - before,
            ms: started.elapsed().as_secs_f64() * 1e3,
            dirty_log_ms,
            pages_ms,
            pages_digest,
        })
    }

    /// The pages digest of memory as sent ([`crate::vm::Vm::pages_digest`]'s definition).
    fn digest(&self) -> u64 {
        crate::vm::pages_digest(&self.hashes)
    }

    /// Sends the pages of `set`: runs of consecutive non-zero pages as PAGES chunks, runs of
    /// zero pages as ZEROS. With `refresh` (the guest running), it looks at the dirty log
    /// every [`REFRESH_PAGES`] pages: a page dirtied that this round reads later anyway is
    /// dropped from the next round (the read takes the new bytes), all others go to it.
    fn send<W: Write>(
        &mut self,
        w: &mut ChunkWriter<W>,
        set: Set<'_>,
        refresh: bool,
    ) -> Result<Sent, MigrateError> {
        let total = self.hashes.len();
        let mut next = vec![0u64; total.div_ceil(64)];
        let mut sent = 0u64;
        let mut zeros = 0u64;
        let mut since_refresh = 0usize;
        // The run being built: (first page, pages, zero?).
        let mut run: Option<(u64, u32, bool)> = None;
        let mut page = 0usize;
        while page < total {
            if let Set::Bits(bits) = set {
                let word = bits.get(page / 64).copied().unwrap_or(0) >> (page % 64);
                if word == 0 {
                    // Nothing in the rest of this word.
                    self.flush_run(w, &mut run)?;
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                if word & 1 == 0 {
                    self.flush_run(w, &mut run)?;
                    page += word.trailing_zeros() as usize;
                    continue;
                }
            }
            // A full run of pages goes before this page is read behind it.
            if matches!(run, Some((_, n, false)) if n >= MAX_PAGES_PER_CHUNK) {
                self.flush_run(w, &mut run)?;
            }
            // The page is read straight behind the run's pages (one copy out of guest memory).
            let at = self.run_len;
            let bytes: &mut [u8; PAGE_SIZE] = (&mut self.run[at..at + PAGE_SIZE])
                .try_into()
                .map_err(|_| MigrateError::Truncated("a page buffer"))?;
            self.log.read_page(page, bytes)?;
            let zero = bytes.iter().all(|&b| b == 0);
            self.hashes[page] = if zero {
                self.zero_hash
            } else {
                self.run_len += PAGE_SIZE;
                page_hash(&bytes[..])
            };
            // Gaps and full runs were flushed above: a page extends the run unless it
            // switches between zero and non-zero. A zero run keeps nothing in the buffer, and a
            // zero page was taken out of it again, so the flush writes the run alone.
            let extends = matches!(run, Some((first, n, z))
                if z == zero && first + u64::from(n) == page as u64
                    && (zero || n < MAX_PAGES_PER_CHUNK));
            if !extends {
                self.flush_run(w, &mut run)?;
                run = Some((page as u64, 0, zero));
            }
            if let Some((_, n, _)) = &mut run {
                *n += 1;
            }
            sent += 1;
            zeros += u64::from(zero);
            page += 1;
            since_refresh += 1;
            if refresh && since_refresh >= REFRESH_PAGES {
                since_refresh = 0;
                let dirty = self.log.take_dirty()?;
                merge_dirty(&mut next, &dirty, &set, page);
            }
        }
        self.flush_run(w, &mut run)?;
        if refresh {
            let dirty = self.log.take_dirty()?;
            merge_dirty(&mut next, &dirty, &set, total);
        }
        Ok(Sent {
            pages: sent,
            zeros,
            next,
        })
    }

    fn flush_run<W: Write>(
        &mut self,
        w: &mut ChunkWriter<W>,
        run: &mut Option<(u64, u32, bool)>,
    ) -> Result<(), MigrateError> {
        match run.take() {
            Some((first, n, true)) => w.zeros(first, n),
            Some((first, n, false)) => {
                let at = first as usize..first as usize + n as usize;
                let r = w.pages(first, &self.run[..self.run_len], &self.hashes[at]);
                self.run_len = 0;
                r
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_dirtied_before_this_pass_reads_it_is_not_sent_again() {
        // Round 0 (all pages), at page 70: pages 3 and 69 were read before they were dirtied
        // (next round), 70 and 100 are still to be read (not again).
        let mut next = Vec::new();
        let dirty = [
            1u64 << 3,
            (1 << (69 - 64)) | (1 << (70 - 64)) | (1 << (100 - 64)),
        ];
        merge_dirty(&mut next, &dirty, &Set::All, 70);
        assert_eq!(next, vec![1 << 3, 1 << (69 - 64)]);
    }

    #[test]
    fn a_dirtied_page_outside_this_round_goes_to_the_next_one() {
        // A later round sends pages 10 and 80; at page 40 pages 10, 20, 80 and 90 are dirty:
        // 10 was read, 20 is not in this round, 80 is still to be read, 90 is not in it.
        let set_bits = [1u64 << 10, 1 << (80 - 64)];
        let set = Set::Bits(&set_bits);
        let mut next = vec![0, 0];
        let dirty = [
            (1u64 << 10) | (1 << 20),
            (1 << (80 - 64)) | (1 << (90 - 64)),
        ];
        merge_dirty(&mut next, &dirty, &set, 40);
        assert_eq!(next, vec![(1 << 10) | (1 << 20), 1 << (90 - 64)]);
        // At the end of the pass every dirtied page goes to the next round.
        let mut next = vec![0, 0];
        merge_dirty(&mut next, &dirty, &set, 128);
        assert_eq!(next, dirty.to_vec());
    }
}
