//! Where a commit's time goes: time stamps at fixed points of the output-commit path, on both
//! sides, one row per log frame (feature `trace`; without it every call here compiles to
//! nothing).
//!
//! The primary stamps when it starts a commit, when the frame is sealed, when the medium has
//! it, and when its ACK is seen; the backup when the frame is there (as early as its medium can
//! tell), validated, landed in the backup's ring, and acknowledged. Rows are indexed by frame:
//! the n-th frame with entries the primary hands over is the n-th the backup accepts, so the
//! two sides need no shared state while the run goes on. Each side writes only its own array.
//!
//! Stamps are the CPU's time-stamp counter, so both sides must read the same clock: on x86
//! with an invariant TSC (`constant_tsc`, one socket) they do. [`start`] arms a run of at most
//! `rows` frames; [`segments`] gives, for each step of the path, its time per frame.
//!
//! Used by `bench commit --trace`; the instrumented points cost a few nanoseconds each when
//! armed, none when the feature is off.

#[cfg(feature = "trace")]
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Points on the primary's side, in path order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryPoint {
    /// The caller starts a commit (appends its first entry).
    Start = 0,
    /// The frame is sealed (header and CRC written).
    Sealed = 1,
    /// The medium starts sending it: the call that queues the DATA packet (DPDK) or posts the
    /// write (RDMA); for other media, the channel's offer to the link.
    Sent = 2,
    /// The ACK covering the frame is seen.
    Acked = 3,
    /// The caller's wait for the ACK returns.
    Done = 4,
}

/// Points on the backup's side, in path order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupPoint {
    /// The frame's bytes are known to be here (DPDK: its packet received; RDMA: its seal
    /// matched); for other media the same as `Validating`.
    Arrived = 0,
    /// The channel starts validating it.
    Validating = 1,
    /// Validated (CRC, sequence, epoch, every entry).
    Valid = 2,
    /// Copied into the backup's own ring and released by the medium.
    Landed = 3,
    /// The channel hands its ACK to the medium.
    Acking = 4,
}

const COLUMNS: usize = 8;

#[cfg(feature = "trace")]
struct Run {
    rows: usize,
    primary: Box<[AtomicU64]>,
    backup: Box<[AtomicU64]>,
    primary_row: AtomicUsize,
    backup_row: AtomicUsize,
    /// A backup stamp taken before the frame's row is known (its arrival).
    pending_arrival: AtomicU64,
}

/// The armed run. Each [`start`] leaks a new one (a measuring process arms a handful), so a
/// reference taken from here stays valid for the rest of the process.
#[cfg(feature = "trace")]
static RUN: AtomicPtr<Run> = AtomicPtr::new(std::ptr::null_mut());

#[cfg(feature = "trace")]
#[inline(always)]
fn run() -> Option<&'static Run> {
    let p = RUN.load(Ordering::Acquire);
    // SAFETY: a non-null pointer here came from `Box::leak` in `start` and is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

#[cfg(feature = "trace")]
#[inline(always)]
fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions; it only reads the time-stamp counter.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Arms a new run for up to `rows` frames, from frame 0 on both sides; call it before the
/// channel's first frame (a run armed mid-stream misnumbers the backup's frames). Returns
/// whether tracing is compiled in.
pub fn start(rows: usize) -> bool {
    #[cfg(feature = "trace")]
    {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        let run = Box::leak(Box::new(Run {
            rows,
            primary: zeros(rows * COLUMNS),
            backup: zeros(rows * COLUMNS),
            primary_row: AtomicUsize::new(0),
            backup_row: AtomicUsize::new(usize::MAX),
            pending_arrival: AtomicU64::new(0),
        }));
        RUN.store(run, Ordering::Release);
        true
    }
    #[cfg(not(feature = "trace"))]
    {
        let _ = (rows, COLUMNS);
        false
    }
}

/// Stamps `point` of the primary's current frame.
#[inline(always)]
pub fn primary(point: PrimaryPoint) {
    #[cfg(feature = "trace")]
    if let Some(run) = run() {
        let row = run.primary_row.load(Ordering::Relaxed);
        if row < run.rows {
            run.primary[row * COLUMNS + point as usize].store(now(), Ordering::Relaxed);
        }
    }
    #[cfg(not(feature = "trace"))]
    let _ = point;
}

/// The primary's commit is complete: the next stamps belong to the next frame.
#[inline(always)]
pub fn primary_next() {
    #[cfg(feature = "trace")]
    if let Some(run) = run() {
        run.primary_row.fetch_add(1, Ordering::Relaxed);
    }
}

/// The backup's medium sees a frame arrive; the stamp is kept until the channel knows which
/// frame it is ([`backup_frame`]).
#[inline(always)]
pub fn backup_arrived() {
    #[cfg(feature = "trace")]
    if let Some(run) = run() {
        run.pending_arrival.store(now(), Ordering::Relaxed);
    }
}

/// A time stamp to pass to [`backup_frame`] later (0 when tracing is off or not armed).
#[inline(always)]
pub fn stamp() -> u64 {
    #[cfg(feature = "trace")]
    if run().is_some() {
        return now();
    }
    0
}

/// The backup's channel validated its next frame with entries, having started at `since` (a
/// [`stamp`]): that frame's row takes the stamps from here on, with its arrival (if the medium
/// stamped one, else `since`).
#[inline(always)]
pub fn backup_frame(since: u64) {
    #[cfg(feature = "trace")]
    if let Some(run) = run() {
        let row = run.backup_row.load(Ordering::Relaxed).wrapping_add(1);
        run.backup_row.store(row, Ordering::Relaxed);
        if row < run.rows {
            let arrived = run.pending_arrival.swap(0, Ordering::Relaxed);
            let cells = &run.backup[row * COLUMNS..];
            cells[BackupPoint::Arrived as usize].store(
                if arrived != 0 { arrived } else { since },
                Ordering::Relaxed,
            );
            cells[BackupPoint::Validating as usize].store(since, Ordering::Relaxed);
            cells[BackupPoint::Valid as usize].store(now(), Ordering::Relaxed);
        }
    }
    #[cfg(not(feature = "trace"))]
    let _ = since;
}

/// Stamps `point` of the backup's current frame.
#[inline(always)]
pub fn backup(point: BackupPoint) {
    #[cfg(feature = "trace")]
    if let Some(run) = run() {
        let row = run.backup_row.load(Ordering::Relaxed);
        if row < run.rows {
            run.backup[row * COLUMNS + point as usize].store(now(), Ordering::Relaxed);
        }
    }
    #[cfg(not(feature = "trace"))]
    let _ = point;
}

/// One step of the commit path and its time per frame, in TSC ticks.
#[derive(Debug, Clone)]
pub struct Segment {
    /// What happens in it, e.g. "backup: validate".
    pub name: &'static str,
    /// Ticks, one per frame with every stamp present, in frame order.
    pub ticks: Vec<i64>,
}

/// The steps of the commit path, in order, for frames `from..to` (each frame's segments sum to
/// its commit time, from [`PrimaryPoint::Start`] to [`PrimaryPoint::Done`]). Empty without the
/// feature or before [`start`].
pub fn segments(from: usize, to: usize) -> Vec<Segment> {
    #[cfg(feature = "trace")]
    {
        use BackupPoint as B;
        use PrimaryPoint as P;
        enum Side {
            P(P),
            B(B),
        }
        let path: [(&'static str, Side); 10] = [
            ("start", Side::P(P::Start)),
            ("primary: encode and seal", Side::P(P::Sealed)),
            ("primary: to the medium's send", Side::P(P::Sent)),
            ("medium: send, carry, be found", Side::B(B::Arrived)),
            ("backup: to validation", Side::B(B::Validating)),
            ("backup: validate", Side::B(B::Valid)),
            ("backup: land in its ring", Side::B(B::Landed)),
            ("backup: to the ACK", Side::B(B::Acking)),
            ("medium: ACK back, be found", Side::P(P::Acked)),
            ("primary: return to the caller", Side::P(P::Done)),
        ];
        let Some(run) = run() else {
            return Vec::new();
        };
        let mut out: Vec<Segment> = path[1..]
            .iter()
            .map(|(name, _)| Segment {
                name,
                ticks: Vec::new(),
            })
            .collect();
        for row in from..to.min(run.rows) {
            let at = |side: &Side| -> u64 {
                match side {
                    Side::P(p) => run.primary[row * COLUMNS + *p as usize].load(Ordering::Relaxed),
                    Side::B(b) => run.backup[row * COLUMNS + *b as usize].load(Ordering::Relaxed),
                }
            };
            let stamps: Vec<u64> = path.iter().map(|(_, s)| at(s)).collect();
            if stamps.contains(&0) {
                continue;
            }
            for (k, segment) in out.iter_mut().enumerate() {
                segment
                    .ticks
                    .push(stamps[k + 1].wrapping_sub(stamps[k]) as i64);
            }
        }
        out
    }
    #[cfg(not(feature = "trace"))]
    {
        let _ = (from, to);
        Vec::new()
    }
}

#[cfg(all(test, feature = "trace"))]
mod tests {
    use super::*;

    /// Frames stamped in path order give one row of steps each, none negative; a frame without
    /// a complete set of stamps is left out.
    #[test]
    fn steps_add_up_per_frame_and_rows_stay_aligned() {
        assert!(start(8));
        for frame in 0..3 {
            primary(PrimaryPoint::Start);
            primary(PrimaryPoint::Sealed);
            primary(PrimaryPoint::Sent);
            backup_arrived();
            let since = stamp();
            backup_frame(since);
            backup(BackupPoint::Landed);
            if frame != 1 {
                backup(BackupPoint::Acking);
            }
            primary(PrimaryPoint::Acked);
            primary(PrimaryPoint::Done);
            primary_next();
        }
        let steps = segments(0, 3);
        assert_eq!(steps.len(), 9);
        // Frame 1 never acknowledged: left out.
        assert!(steps.iter().all(|s| s.ticks.len() == 2), "{steps:?}");
        for s in &steps {
            assert!(s.ticks.iter().all(|&t| t >= 0), "{}: {:?}", s.name, s.ticks);
        }
        assert_eq!(steps[0].name, "primary: encode and seal");
        assert_eq!(steps[8].name, "primary: return to the caller");
    }
}
