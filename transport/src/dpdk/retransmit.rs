//! The primary's retransmission state machine: the DATA packets sent (or queued) and not yet
//! acknowledged, the cumulative packet ACK that frees them, the resend of the oldest one on a
//! NACK or a timeout, the window that is the channel's backpressure, and the round-trip
//! estimate the timeout follows.
//!
//! No I/O and no DPDK: the primary's link hands it whole packets as bytes, ACK numbers and the
//! time (as closures, so the clock is read only where the logic needs it), asks it which packet
//! to hand to the port next and tells it when one went. So it is tested on its own, with plain
//! values.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Polls between two checks of the retransmission timer while not blocked on the window (a
/// poll takes tens of nanoseconds, so the timer is late by a few microseconds at most).
pub(super) const TIMER_POLLS: u32 = 64;
/// One DATA packet in this many (by sequence number) is timed for the RTT estimate.
pub(super) const RTT_SAMPLE_EVERY: u64 = 8;

/// A DATA packet kept until acknowledged.
#[derive(Debug)]
struct Outstanding {
    seq: u64,
    /// The whole packet, as handed to the port.
    bytes: Vec<u8>,
    /// Whether it was handed to the port.
    sent: bool,
    /// When it was first handed to the port, for packets that give an RTT sample (one in
    /// [`RTT_SAMPLE_EVERY`]: the clock is read only for those).
    sent_at: Option<Instant>,
    /// Whether it was sent more than once (no RTT sample then: Karn's rule).
    resent: bool,
}

/// What a cumulative packet ACK did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acked {
    /// It acknowledges a packet not queued yet: ignored (the caller counts it as garbage).
    Beyond,
    /// Nothing new: a duplicate, or older than what was acknowledged already.
    Nothing,
    /// This many packets left the window.
    Freed(usize),
}

/// What handing the packet of [`Retransmit::pending`] to the port was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Went {
    /// The oldest unacknowledged packet, sent again (after a NACK or a timeout).
    Resend,
    /// The next packet in sequence-number order.
    InOrder,
}

/// The primary's retransmission state.
#[derive(Debug)]
pub(super) struct Retransmit {
    /// Most packets queued and not yet acknowledged.
    window: usize,
    rto_min: Duration,
    rto_max: Duration,
    /// Sent (or to be sent) and not yet acknowledged, oldest first.
    unacked: VecDeque<Outstanding>,
    /// Index in `unacked` of the next packet to send in order (at most `unacked.len()`).
    next_send: usize,
    /// Sequence number of the next new DATA packet (from 1).
    next_seq: u64,
    /// Spare packet buffers (those of acknowledged packets).
    free: Vec<Vec<u8>>,
    /// Current retransmission timeout, and the estimate it falls back to on progress.
    rto: Duration,
    rto_base: Duration,
    /// Smoothed round-trip time and its mean deviation, in nanoseconds (0: no sample yet).
    srtt_ns: u64,
    rttvar_ns: u64,
    /// When the retransmission timer was last started (progress, or a resend).
    timer: Instant,
    /// Progress (an ACK, or a new packet after an idle spell) since the timer was last
    /// checked: the timer restarts at the next check instead of reading the clock now.
    progress: bool,
    /// The cumulative ACK of the last NACK acted on (a repeat for the same gap is ignored).
    last_nack: u64,
    /// The oldest unacknowledged packet is to be sent again before anything new.
    resend_front: bool,
    /// Polls since the retransmission timer was last checked.
    polls: u32,
    /// A frame was refused for lack of window since the last progress.
    blocked: bool,
}

impl Retransmit {
    /// Nothing sent yet; at most `window` packets unacknowledged; the timeout starts at
    /// `rto_min` and stays within `rto_min..=rto_max`. `now` starts the timer.
    pub(super) fn new(window: usize, rto_min: Duration, rto_max: Duration, now: Instant) -> Self {
        Retransmit {
            window,
            rto_min,
            rto_max,
            unacked: VecDeque::new(),
            next_send: 0,
            next_seq: 1,
            free: Vec::new(),
            rto: rto_min,
            rto_base: rto_min,
            srtt_ns: 0,
            rttvar_ns: 0,
            timer: now,
            progress: false,
            last_nack: u64::MAX,
            resend_front: false,
            polls: 0,
            blocked: false,
        }
    }

    /// Whether a frame of `pieces` packets fits in the window now. If not, the link is blocked
    /// on the window: from then on until progress the timer is checked on every
    /// [`Retransmit::tick`] (a caller that waits between polls may take long for
    /// [`TIMER_POLLS`] of them).
    pub(super) fn admit(&mut self, pieces: usize) -> bool {
        if self.unacked.len() + pieces > self.window {
            self.blocked = true;
            return false;
        }
        true
    }

    /// A new frame's packets are about to be queued. Returns whether nothing is queued ahead of
    /// them (no resend, everything queued already sent): they may then go straight to the port.
    pub(super) fn start_frame(&mut self) -> bool {
        if self.unacked.is_empty() {
            self.progress = true;
        }
        !self.has_pending()
    }

    /// Sequence number the next [`Retransmit::push`] gets; an ACK at or beyond it acknowledges
    /// something never queued.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// A buffer for the next packet (a spare one if any; its contents are stale).
    pub(super) fn buffer(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }

    /// Queues the packet `bytes` with sequence number [`Retransmit::next_seq`], which it
    /// returns. `sent`: the caller already handed it to the port (`now` is then read if the
    /// packet is timed for the RTT estimate); otherwise [`Retransmit::pending`] gives it out.
    /// Packets pushed as sent must come before any pushed as not sent.
    pub(super) fn push(
        &mut self,
        bytes: Vec<u8>,
        sent: bool,
        now: impl FnOnce() -> Instant,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sent_at = (sent && seq.is_multiple_of(RTT_SAMPLE_EVERY)).then(now);
        self.unacked.push_back(Outstanding {
            seq,
            bytes,
            sent,
            sent_at,
            resent: false,
        });
        if sent {
            self.next_send += 1;
        }
        seq
    }

    /// Whether a packet waits to be handed to the port (a resend, or one queued and not sent).
    pub(super) fn has_pending(&self) -> bool {
        self.resend_front || self.next_send < self.unacked.len()
    }

    /// The packet to hand to the port next, if any: the oldest unacknowledged one if it is to
    /// be resent, else the next one queued and not sent. Call [`Retransmit::sent`] once it went;
    /// if the port had no room, ask again later.
    pub(super) fn pending(&mut self) -> Option<&[u8]> {
        if self.resend_front {
            match self.unacked.front() {
                Some(p) if p.sent => return Some(&p.bytes),
                // Nothing to resend: the oldest was acknowledged, or never went (it goes in
                // order then).
                _ => self.resend_front = false,
            }
        }
        self.unacked.get(self.next_send).map(|p| &p.bytes[..])
    }

    /// The packet [`Retransmit::pending`] gave out was handed to the port (`now` is read if it
    /// went for the first time and is timed for the RTT estimate). `None` if none was pending.
    pub(super) fn sent(&mut self, now: impl FnOnce() -> Instant) -> Option<Went> {
        if self.resend_front {
            if let Some(p) = self.unacked.front_mut().filter(|p| p.sent) {
                p.resent = true;
                self.resend_front = false;
                return Some(Went::Resend);
            }
            self.resend_front = false;
        }
        let p = self.unacked.get_mut(self.next_send)?;
        self.next_send += 1;
        if p.sent {
            p.resent = true;
        } else {
            p.sent = true;
            if p.seq.is_multiple_of(RTT_SAMPLE_EVERY) {
                p.sent_at = Some(now());
            }
        }
        Some(Went::InOrder)
    }

    /// A cumulative packet ACK: every packet up to `ack` arrived. They leave the window (their
    /// buffers become spares); on progress the timeout falls back to the estimate, fed with an
    /// RTT sample if a timed packet sent once was among them (`now` is read only then).
    pub(super) fn acknowledge(&mut self, ack: u64, now: impl FnOnce() -> Instant) -> Acked {
        if ack >= self.next_seq {
            return Acked::Beyond;
        }
        let mut freed = 0;
        let mut sample_from = None;
        while self.unacked.front().is_some_and(|p| p.seq <= ack) {
            if let Some(p) = self.unacked.pop_front() {
                if !p.resent {
                    sample_from = p.sent_at.or(sample_from);
                }
                self.free.push(p.bytes);
            }
            self.next_send = self.next_send.saturating_sub(1);
            freed += 1;
        }
        if freed == 0 {
            return Acked::Nothing;
        }
        if let Some(sent) = sample_from {
            self.rtt_sample(now().duration_since(sent));
        }
        self.rto = self.rto_base;
        self.progress = true;
        self.blocked = false;
        Acked::Freed(freed)
    }

    /// A NACK with cumulative ACK `ack` (already passed to [`Retransmit::acknowledge`]): the
    /// backup holds later packets but misses `ack + 1`. If that is the oldest unacknowledged
    /// packet and this gap was not NACKed before, it is to be resent at once and the timer
    /// restarts (`now`, read only then). Returns whether the NACK was acted on.
    pub(super) fn nack(&mut self, ack: u64, now: impl FnOnce() -> Instant) -> bool {
        if self
            .unacked
            .front()
            .is_some_and(|p| p.seq == ack.wrapping_add(1))
            && self.last_nack != ack
        {
            self.last_nack = ack;
            self.resend_oldest(now());
            return true;
        }
        false
    }

    /// One poll of the link. Every [`TIMER_POLLS`] of them (every one while blocked on the
    /// window) the timer is checked at `now`: progress since the last check restarts it; if
    /// sent packets are unacknowledged for the timeout, the oldest is to be resent, the timeout
    /// doubles (up to its cap) and a NACK for the same gap is allowed again (the timeout may be
    /// a lost NACK). Returns whether the timeout fired.
    pub(super) fn tick(&mut self, now: impl FnOnce() -> Instant) -> bool {
        self.polls = self.polls.wrapping_add(1);
        if !self.blocked && !self.polls.is_multiple_of(TIMER_POLLS) {
            return false;
        }
        let now = now();
        if std::mem::take(&mut self.progress) || self.unacked.is_empty() {
            self.timer = now;
        } else if self.next_send > 0 && now.duration_since(self.timer) >= self.rto {
            self.resend_oldest(now);
            self.rto = (self.rto * 2).min(self.rto_max);
            self.last_nack = u64::MAX;
            return true;
        }
        false
    }

    /// The oldest unacknowledged packet (the one the backup is missing) goes again before
    /// anything new.
    fn resend_oldest(&mut self, now: Instant) {
        self.resend_front = true;
        self.timer = now;
    }

    /// Updates the RTT estimate (Jacobson/Karels) and the base timeout derived from it.
    fn rtt_sample(&mut self, rtt: Duration) {
        let r = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX / 8);
        if self.srtt_ns == 0 {
            self.srtt_ns = r.max(1);
            self.rttvar_ns = r / 2;
        } else {
            self.rttvar_ns = (3 * self.rttvar_ns + self.srtt_ns.abs_diff(r)) / 4;
            self.srtt_ns = (7 * self.srtt_ns + r) / 8;
        }
        let rto = Duration::from_nanos(self.srtt_ns.saturating_add(4 * self.rttvar_ns));
        self.rto_base = rto.clamp(self.rto_min, self.rto_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTO_MIN: Duration = Duration::from_micros(200);
    const RTO_MAX: Duration = Duration::from_millis(5);

    fn machine(window: usize) -> (Retransmit, Instant) {
        let t0 = Instant::now();
        (Retransmit::new(window, RTO_MIN, RTO_MAX, t0), t0)
    }

    /// The bytes of packet `seq` (a stand-in for a whole Ethernet frame).
    fn packet(seq: u64) -> Vec<u8> {
        vec![seq as u8; 4 + seq as usize % 3]
    }

    /// Queues `n` packets as the link does when the port takes them at once; returns their
    /// sequence numbers.
    fn push_sent(r: &mut Retransmit, n: u64, at: Instant) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let seq = r.next_seq();
                assert_eq!(r.push(packet(seq), true, || at), seq);
                seq
            })
            .collect()
    }

    /// Drains everything pending as a port with room does; returns what went, in order.
    fn drain(r: &mut Retransmit, at: Instant) -> Vec<(Vec<u8>, Went)> {
        let mut out = Vec::new();
        while let Some(bytes) = r.pending() {
            let bytes = bytes.to_vec();
            let went = r.sent(|| at).expect("a packet was pending");
            out.push((bytes, went));
        }
        assert!(!r.has_pending());
        out
    }

    /// Polls until the timer is checked (once every TIMER_POLLS polls); returns whether it
    /// fired then.
    fn check_timer(r: &mut Retransmit, at: Instant) -> bool {
        for _ in 1..TIMER_POLLS {
            let mut read = false;
            assert!(!r.tick(|| {
                read = true;
                at
            }));
            assert!(!read, "the clock is read only every TIMER_POLLS polls");
        }
        r.tick(|| at)
    }

    #[test]
    fn sequence_numbers_start_at_one_and_in_order_acks_free_the_oldest() {
        let (mut r, t0) = machine(8);
        assert_eq!(r.next_seq(), 1);
        assert_eq!(push_sent(&mut r, 5, t0), vec![1, 2, 3, 4, 5]);
        assert!(!r.has_pending(), "all five went straight to the port");
        assert_eq!(r.acknowledge(2, || t0), Acked::Freed(2));
        assert_eq!(r.acknowledge(3, || t0), Acked::Freed(1));
        assert_eq!(r.unacked.front().map(|p| p.seq), Some(4));
        // The freed packets' buffers come back as spares.
        let spare = r.buffer();
        assert!(spare.capacity() >= 4, "a freed packet's buffer is reused");
        assert_eq!(r.acknowledge(5, || t0), Acked::Freed(2));
        assert!(r.unacked.is_empty());
        assert_eq!(r.next_seq(), 6);
    }

    #[test]
    fn duplicate_and_old_acks_change_nothing() {
        let (mut r, t0) = machine(8);
        push_sent(&mut r, 4, t0);
        assert_eq!(r.acknowledge(2, || t0), Acked::Freed(2));
        // The timer fires: the timeout doubles.
        assert!(!check_timer(&mut r, t0), "progress restarts the timer");
        assert!(check_timer(&mut r, t0 + RTO_MIN));
        assert_eq!(r.rto, RTO_MIN * 2);
        drain(&mut r, t0);
        for old in [2, 1, 0] {
            assert_eq!(
                r.acknowledge(old, || panic!("no clock for an old ACK")),
                Acked::Nothing
            );
        }
        assert_eq!(r.unacked.len(), 2);
        assert_eq!(r.rto, RTO_MIN * 2, "an old ACK is no progress");
        assert!(!r.progress);
        // A new one is: the timeout falls back to the estimate.
        assert_eq!(r.acknowledge(3, || t0), Acked::Freed(1));
        assert_eq!(r.rto, RTO_MIN);
    }

    #[test]
    fn an_ack_beyond_what_was_queued_is_refused() {
        let (mut r, t0) = machine(8);
        assert_eq!(r.acknowledge(1, || t0), Acked::Beyond, "nothing queued yet");
        push_sent(&mut r, 3, t0);
        // Packet 4 was never queued.
        assert_eq!(r.acknowledge(4, || t0), Acked::Beyond);
        assert_eq!(r.acknowledge(u64::MAX, || t0), Acked::Beyond);
        assert_eq!(r.unacked.len(), 3, "nothing freed");
        assert_eq!(r.acknowledge(3, || t0), Acked::Freed(3));
    }

    #[test]
    fn a_nack_resends_the_missing_packet_once_per_gap() {
        let (mut r, t0) = machine(8);
        push_sent(&mut r, 5, t0);
        // The backup has 1 and 2 and later ones, but misses 3.
        assert_eq!(r.acknowledge(2, || t0), Acked::Freed(2));
        // A NACK for another gap than the oldest unacknowledged packet is ignored.
        assert!(!r.nack(1, || panic!("not acted on: no clock")));
        assert!(!r.nack(3, || panic!("not acted on: no clock")));
        assert!(!r.has_pending());
        let at = t0 + Duration::from_micros(50);
        assert!(r.nack(2, || at));
        assert_eq!(r.timer, at, "the resend restarts the timer");
        assert!(r.has_pending());
        // Exactly packet 3 goes again, nothing after it.
        assert_eq!(drain(&mut r, at), vec![(packet(3), Went::Resend)]);
        // The same gap NACKed again (the NACK was repeated, or crossed the resend): ignored.
        assert!(!r.nack(2, || at));
        assert!(!r.has_pending());
        // Once 3 arrived, a NACK for the next gap is acted on.
        assert_eq!(r.acknowledge(3, || at), Acked::Freed(1));
        assert!(r.nack(3, || at));
        assert_eq!(drain(&mut r, at), vec![(packet(4), Went::Resend)]);
    }

    #[test]
    fn a_resend_goes_to_whichever_packet_is_oldest_when_it_goes() {
        let (mut r, t0) = machine(8);
        push_sent(&mut r, 3, t0);
        assert!(r.nack(0, || t0));
        // Packet 1, NACKed, is acknowledged before the port had room for its resend.
        assert_eq!(r.acknowledge(1, || t0), Acked::Freed(1));
        assert!(r.has_pending());
        // The resend goes to the oldest unacknowledged packet now, 2 (sent before).
        assert_eq!(drain(&mut r, t0), vec![(packet(2), Went::Resend)]);
    }

    #[test]
    fn the_timer_resends_the_oldest_doubling_up_to_the_cap() {
        let (mut r, t0) = machine(8);
        // Nothing queued: the timer never fires.
        assert!(!check_timer(&mut r, t0 + RTO_MAX * 10));
        assert!(r.start_frame());
        push_sent(&mut r, 3, t0);
        // The first check after progress (the first packet after an idle spell) restarts it.
        assert!(!check_timer(&mut r, t0));
        assert!(!check_timer(&mut r, t0 + RTO_MIN / 2));
        assert!(check_timer(&mut r, t0 + RTO_MIN));
        assert_eq!(drain(&mut r, t0), vec![(packet(1), Went::Resend)]);
        // Doubling from the time of the resend, up to RTO_MAX.
        let mut at = t0 + RTO_MIN;
        let mut rto = RTO_MIN * 2;
        for _ in 0..10 {
            assert_eq!(r.rto, rto);
            assert!(!check_timer(&mut r, at + rto - Duration::from_nanos(1)));
            at += rto;
            assert!(check_timer(&mut r, at));
            assert_eq!(drain(&mut r, at), vec![(packet(1), Went::Resend)]);
            rto = (rto * 2).min(RTO_MAX);
        }
        assert_eq!(r.rto, RTO_MAX);
        // Progress: back to the estimate, and the timer restarts at the next check.
        assert_eq!(r.acknowledge(1, || at), Acked::Freed(1));
        assert_eq!(r.rto, RTO_MIN);
        assert!(!check_timer(&mut r, at + RTO_MAX));
        assert!(check_timer(&mut r, at + RTO_MAX + RTO_MIN));
        assert_eq!(drain(&mut r, at), vec![(packet(2), Went::Resend)]);
    }

    #[test]
    fn a_timeout_allows_a_new_nack_for_the_same_gap() {
        let (mut r, t0) = machine(8);
        push_sent(&mut r, 3, t0);
        assert!(r.nack(0, || t0));
        drain(&mut r, t0);
        assert!(!r.nack(0, || t0), "the same gap");
        assert!(!check_timer(&mut r, t0), "the NACK restarted the timer");
        assert!(check_timer(&mut r, t0 + RTO_MIN));
        drain(&mut r, t0);
        assert!(
            r.nack(0, || t0),
            "the resent NACK may have been lost: act again"
        );
    }

    #[test]
    fn no_timeout_while_nothing_went_yet() {
        let (mut r, t0) = machine(8);
        assert!(r.start_frame());
        // The port had no room: queued, not sent.
        r.push(packet(1), false, || panic!("not sent: not timed"));
        assert!(!check_timer(&mut r, t0));
        assert!(!check_timer(&mut r, t0 + RTO_MAX * 10));
        assert!(r.has_pending());
    }

    #[test]
    fn the_window_refuses_a_frame_that_does_not_fit_and_checks_the_timer_every_poll() {
        let (mut r, t0) = machine(4);
        assert!(!r.admit(5), "a frame larger than the window never fits");
        r.blocked = false;
        assert!(r.admit(4));
        push_sent(&mut r, 3, t0);
        assert!(r.admit(1));
        assert!(!r.admit(2));
        assert!(r.blocked);
        // Blocked: every poll checks the timer.
        assert!(!r.tick(|| t0), "not yet the timeout");
        assert!(!r.tick(|| t0 + RTO_MIN / 2));
        assert!(r.tick(|| t0 + RTO_MIN));
        drain(&mut r, t0);
        // An ACK makes room and ends the blocked spell.
        assert_eq!(r.acknowledge(1, || t0), Acked::Freed(1));
        assert!(!r.blocked);
        assert!(r.admit(2));
        let mut read = false;
        assert!(!r.tick(|| {
            read = true;
            t0
        }));
        assert!(!read, "not blocked: the clock waits for TIMER_POLLS polls");
    }

    #[test]
    fn packets_the_port_had_no_room_for_go_in_order_after_the_sent_ones() {
        let (mut r, t0) = machine(8);
        assert!(r.start_frame(), "nothing queued: straight to the port");
        r.push(packet(1), true, || t0);
        r.push(packet(2), false, || panic!("not sent"));
        r.push(packet(3), false, || panic!("not sent"));
        assert!(r.has_pending());
        assert!(!r.start_frame(), "the next frame queues behind them");
        // The port is full again after one.
        assert_eq!(r.pending(), Some(&packet(2)[..]));
        assert_eq!(r.sent(|| t0), Some(Went::InOrder));
        assert_eq!(r.pending(), Some(&packet(3)[..]));
        assert_eq!(drain(&mut r, t0), vec![(packet(3), Went::InOrder)]);
        assert_eq!(r.sent(|| t0), None, "nothing pending");
        assert!(r.start_frame());
        // A resend also goes before new packets.
        r.push(packet(4), false, || t0);
        assert!(r.nack(0, || t0));
        assert_eq!(
            drain(&mut r, t0),
            vec![(packet(1), Went::Resend), (packet(4), Went::InOrder)]
        );
    }

    #[test]
    fn a_resend_of_a_packet_that_never_went_goes_in_order() {
        let (mut r, t0) = machine(8);
        r.push(packet(1), false, || t0);
        r.push(packet(2), false, || t0);
        // A NACK for packet 1, which has not gone yet: it goes, in order, once.
        assert!(r.nack(0, || t0));
        assert_eq!(
            drain(&mut r, t0),
            vec![(packet(1), Went::InOrder), (packet(2), Went::InOrder)]
        );
    }

    #[test]
    fn the_timeout_follows_the_measured_round_trip_time_and_karns_rule() {
        let (mut r, t0) = machine(64);
        // Packets 1..=8; only 8 is timed (one in RTT_SAMPLE_EVERY).
        let mut reads = 0;
        for _ in 0..RTT_SAMPLE_EVERY {
            let seq = r.next_seq();
            r.push(packet(seq), true, || {
                reads += 1;
                t0
            });
        }
        assert_eq!(reads, 1, "the clock is read for the timed packet only");
        let rtt = Duration::from_micros(600);
        assert_eq!(
            r.acknowledge(7, || panic!("no timed packet")),
            Acked::Freed(7)
        );
        assert_eq!(r.acknowledge(8, || t0 + rtt), Acked::Freed(1));
        // First sample: srtt = 600 us, rttvar = 300 us → 600 + 4 × 300 = 1.8 ms.
        assert_eq!(r.rto_base, Duration::from_micros(1800));
        assert_eq!(r.rto, Duration::from_micros(1800));
        // Second sample of 600 us: rttvar (3 × 300 + 0) / 4 = 225 → 600 + 900 = 1.5 ms.
        push_sent(&mut r, RTT_SAMPLE_EVERY, t0);
        assert_eq!(r.acknowledge(16, || t0 + rtt), Acked::Freed(8));
        assert_eq!(r.rto_base, Duration::from_micros(1500));
        // A very long round trip is capped.
        push_sent(&mut r, RTT_SAMPLE_EVERY, t0);
        assert_eq!(r.acknowledge(24, || t0 + RTO_MAX * 100), Acked::Freed(8));
        assert_eq!(r.rto_base, RTO_MAX);
        // Karn: a timed packet that was sent twice gives no sample.
        push_sent(&mut r, RTT_SAMPLE_EVERY, t0);
        assert_eq!(r.acknowledge(31, || t0), Acked::Freed(7));
        assert!(r.nack(31, || t0));
        assert_eq!(drain(&mut r, t0), vec![(packet(32), Went::Resend)]);
        assert_eq!(
            r.acknowledge(32, || panic!("a resent packet is not timed")),
            Acked::Freed(1)
        );
        assert_eq!(r.rto_base, RTO_MAX);
    }
}
