//! The primary's side of a state transfer: pre-copy rounds over KVM's dirty-page log while the
//! guest runs, then the switch-over with the guest stopped.

use std::io::Write;
use std::time::Instant;

use super::state::VcpuState;
use super::stream::{ChunkWriter, Header, MAX_PAGES_PER_CHUNK};
use super::MigrateError;
use crate::vm::{DirtyLog, PAGE_SIZE};

/// When the pre-copy rounds stop and the switch-over begins.
#[derive(Debug, Clone)]
pub struct PrecopyConfig {
    /// Stop once no more than this many pages were dirtied during a round: they go with the
    /// guest stopped.
    pub small_enough: usize,
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
    page: Box<[u8; PAGE_SIZE]>,
    run: Vec<u8>,
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
            zero_hash: xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_SIZE]),
            rounds: Vec::new(),
            pending: Vec::new(),
            page: Box::new([0; PAGE_SIZE]),
            run: Vec::with_capacity(MAX_PAGES_PER_CHUNK as usize * PAGE_SIZE),
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
        loop {
            let round = self.rounds.len() as u32;
            let started = Instant::now();
            let before = w.bytes();
            // Round 0 sends all of memory, later rounds what the guest dirtied meanwhile.
            let (pages, zeros) = if round == 0 {
                self.send(w, Set::All)?
            } else {
                let bits = std::mem::take(&mut self.pending);
                self.send(w, Set::Bits(&bits))?
            };
            w.round_end(round, pages)?;
            w.flush()?;
            // What the guest wrote meanwhile: the next round's pages.
            self.pending = self.log.take_dirty()?;
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
            if dirty as usize <= self.config.small_enough
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
        let (pages, _) = self.send(w, Set::Bits(&bits))?;
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
    /// zero pages as ZEROS. Returns (pages, zero pages).
    fn send<W: Write>(
        &mut self,
        w: &mut ChunkWriter<W>,
        set: Set<'_>,
    ) -> Result<(u64, u64), MigrateError> {
        let total = self.hashes.len();
        let mut sent = 0u64;
        let mut zeros = 0u64;
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
            self.log.read_page(page, &mut self.page)?;
            let zero = self.page.iter().all(|&b| b == 0);
            self.hashes[page] = if zero {
                self.zero_hash
            } else {
                xxhash_rust::xxh3::xxh3_64(&self.page[..])
            };
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
            if !zero {
                self.run.extend_from_slice(&self.page[..]);
            }
            sent += 1;
            zeros += u64::from(zero);
            page += 1;
        }
        self.flush_run(w, &mut run)?;
        Ok((sent, zeros))
    }

    fn flush_run<W: Write>(
        &mut self,
        w: &mut ChunkWriter<W>,
        run: &mut Option<(u64, u32, bool)>,
    ) -> Result<(), MigrateError> {
        match run.take() {
            Some((first, n, true)) => w.zeros(first, n),
            Some((first, _, false)) => {
                let r = w.pages(first, &self.run);
                self.run.clear();
                r
            }
            None => Ok(()),
        }
    }
}
