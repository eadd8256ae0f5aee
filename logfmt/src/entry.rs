//! Log entries: one non-deterministic event and the guest position at which it takes effect.
//!
//! The primary records every event whose outcome the backup could not compute by itself
//! (device input, clock reads, random numbers, interrupts) together with the position in the
//! guest's execution where it happened; the backup replays each event at the same position.
//! The types here are borrowed views: a decoded [`Entry`] points into the frame's bytes and
//! owns nothing.

use crate::error::{DecodeError, InvalidKind};
use crate::wire::{Reader, Writer};
use crate::{ENTRY_HEADER_LEN, INSN_COUNT_LEN};

/// Entry flag: an 8-byte instruction count follows the entry header.
pub const HAS_INSN_COUNT: u8 = 0x01;

/// Where in the guest's execution an event takes effect.
///
/// `exit` is the VM-exit sequence number, which every host can count. `insn` optionally
/// refines it with a retired-instruction count, for hosts with a PMU that can stop the guest
/// at an exact instruction; hosts without one leave it `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The VM-exit sequence number at which the event takes effect.
    pub exit: u64,
    /// The guest instruction count, when the recording host could measure it.
    pub insn: Option<u64>,
}

impl Position {
    /// The position at VM exit `exit`, without an instruction count.
    #[inline]
    pub const fn at_exit(exit: u64) -> Self {
        Self { exit, insn: None }
    }

    /// The position at VM exit `exit`, refined to instruction count `insn`.
    #[inline]
    pub const fn at_insn(exit: u64, insn: u64) -> Self {
        Self {
            exit,
            insn: Some(insn),
        }
    }
}

/// The kind byte of an entry, which selects the payload layout.
///
/// Version 1 defines exactly these values; any other byte is a decode error, because a backup
/// that skipped an event it does not understand would silently diverge from the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Input from an emulated device; see [`Event::DeviceInput`].
    DeviceInput = 1,
    /// A clock read; see [`Event::Clock`].
    Clock = 2,
    /// Random bytes handed to the guest; see [`Event::Random`].
    Random = 3,
    /// An interrupt injection; see [`Event::Interrupt`].
    Interrupt = 4,
    /// An output about to leave the primary; see [`Event::OutputMarker`].
    OutputMarker = 5,
    /// Primary liveness; see [`Event::Heartbeat`].
    Heartbeat = 6,
    /// A control command; see [`Event::Control`].
    Control = 7,
}

impl Kind {
    /// Every kind, in numeric order.
    pub const ALL: [Kind; 7] = [
        Kind::DeviceInput,
        Kind::Clock,
        Kind::Random,
        Kind::Interrupt,
        Kind::OutputMarker,
        Kind::Heartbeat,
        Kind::Control,
    ];

    /// Whether `len` is a valid payload length for this kind.
    #[inline]
    const fn accepts_payload_len(self, len: u32) -> bool {
        match self {
            Kind::DeviceInput => len >= 2,
            Kind::Clock | Kind::Heartbeat => len == 8,
            Kind::Random => true,
            Kind::Interrupt => len == 1,
            Kind::OutputMarker | Kind::Control => len == 16,
        }
    }

    /// This kind's payload length rule, as reported in [`DecodeError::BadPayloadLength`].
    #[inline]
    const fn payload_len_rule(self) -> &'static str {
        match self {
            Kind::DeviceInput => "at least 2",
            Kind::Clock | Kind::Heartbeat => "8",
            Kind::Random => "any",
            Kind::Interrupt => "1",
            Kind::OutputMarker | Kind::Control => "16",
        }
    }
}

impl TryFrom<u8> for Kind {
    type Error = InvalidKind;

    #[inline]
    fn try_from(byte: u8) -> Result<Self, InvalidKind> {
        Ok(match byte {
            1 => Kind::DeviceInput,
            2 => Kind::Clock,
            3 => Kind::Random,
            4 => Kind::Interrupt,
            5 => Kind::OutputMarker,
            6 => Kind::Heartbeat,
            7 => Kind::Control,
            other => return Err(InvalidKind(other)),
        })
    }
}

impl From<Kind> for u8 {
    #[inline]
    fn from(kind: Kind) -> u8 {
        kind as u8
    }
}

/// A command from the primary that changes the replication state rather than the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlOp {
    /// The backup should stop replaying and take over as primary.
    GoLive,
    /// The primary is shutting down replication cleanly.
    Shutdown,
    /// The fencing epoch changes to `new_epoch`; later frames carry it.
    EpochChange {
        /// The new fencing epoch.
        new_epoch: u64,
    },
}

impl ControlOp {
    /// Wire code of [`ControlOp::GoLive`].
    pub const GO_LIVE: u32 = 1;
    /// Wire code of [`ControlOp::Shutdown`].
    pub const SHUTDOWN: u32 = 2;
    /// Wire code of [`ControlOp::EpochChange`].
    pub const EPOCH_CHANGE: u32 = 3;

    /// The op's wire code.
    #[inline]
    pub const fn code(&self) -> u32 {
        match self {
            ControlOp::GoLive => Self::GO_LIVE,
            ControlOp::Shutdown => Self::SHUTDOWN,
            ControlOp::EpochChange { .. } => Self::EPOCH_CHANGE,
        }
    }

    /// The op's wire argument: the new epoch for [`ControlOp::EpochChange`], 0 otherwise.
    #[inline]
    pub const fn argument(&self) -> u64 {
        match self {
            ControlOp::GoLive | ControlOp::Shutdown => 0,
            ControlOp::EpochChange { new_epoch } => *new_epoch,
        }
    }
}

/// A non-deterministic event, borrowing any variable-length data from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event<'a> {
    /// Input from an emulated device (a received packet, a completed disk read, ...).
    DeviceInput {
        /// The device that produced the input.
        device: u16,
        /// The input bytes.
        data: &'a [u8],
    },
    /// The value a guest clock read returned.
    Clock {
        /// The time, in nanoseconds.
        ns: u64,
    },
    /// Random bytes handed to the guest (e.g. by `RDRAND` emulation or a virtio-rng device).
    Random {
        /// The random bytes; may be empty.
        data: &'a [u8],
    },
    /// An interrupt injected into the guest.
    Interrupt {
        /// The interrupt vector.
        vector: u8,
    },
    /// An output the primary is about to release. The primary holds the output until the
    /// backup acknowledges this entry (the output rule); the backup checks its own output
    /// against `len` and `digest` to detect divergence.
    OutputMarker {
        /// The device producing the output.
        device: u16,
        /// The output's length in bytes.
        len: u32,
        /// [`digest`](crate::digest) of the output bytes.
        digest: u64,
    },
    /// Proof that the primary is alive when it has nothing else to send.
    Heartbeat {
        /// The sender's monotonic clock, in nanoseconds.
        sender_ns: u64,
    },
    /// A replication control command.
    Control(ControlOp),
}

impl Event<'_> {
    /// The event's kind.
    #[inline]
    pub const fn kind(&self) -> Kind {
        match self {
            Event::DeviceInput { .. } => Kind::DeviceInput,
            Event::Clock { .. } => Kind::Clock,
            Event::Random { .. } => Kind::Random,
            Event::Interrupt { .. } => Kind::Interrupt,
            Event::OutputMarker { .. } => Kind::OutputMarker,
            Event::Heartbeat { .. } => Kind::Heartbeat,
            Event::Control(_) => Kind::Control,
        }
    }

    /// The length of the event's encoded payload, in bytes.
    #[inline]
    pub const fn payload_len(&self) -> usize {
        match self {
            // A slice is at most `isize::MAX` bytes, so adding 2 cannot overflow.
            Event::DeviceInput { data, .. } => 2 + data.len(),
            Event::Random { data } => data.len(),
            Event::Clock { .. } | Event::Heartbeat { .. } => 8,
            Event::Interrupt { .. } => 1,
            Event::OutputMarker { .. } | Event::Control(_) => 16,
        }
    }
}

/// One log entry: an event and the position at which it takes effect.
///
/// An entry's sequence number is not stored in it; it follows from its place in the frame
/// (see [`FrameView::entries_with_seq`](crate::FrameView::entries_with_seq)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry<'a> {
    /// Where the event takes effect.
    pub position: Position,
    /// What happened.
    pub event: Event<'a>,
}

impl<'a> Entry<'a> {
    /// An entry for `event` at `position`.
    #[inline]
    pub const fn new(position: Position, event: Event<'a>) -> Self {
        Self { position, event }
    }

    /// The entry's encoded length in bytes: the 16-byte header, the optional 8-byte
    /// instruction count, and the payload.
    #[inline]
    pub const fn encoded_len(&self) -> usize {
        let insn = if self.position.insn.is_some() {
            INSN_COUNT_LEN
        } else {
            0
        };
        // A payload is at most `isize::MAX + 2` bytes, so this cannot overflow a `usize`.
        ENTRY_HEADER_LEN + insn + self.event.payload_len()
    }

    /// Writes the entry into `out`, which must be exactly [`encoded_len`](Self::encoded_len)
    /// bytes long, and whose payload length the caller has checked fits in a `u32`. Returns
    /// `None` if `out` is too short.
    pub(crate) fn write(&self, out: &mut [u8], payload_len: u32) -> Option<()> {
        let mut w = Writer::new(out);
        let flags = if self.position.insn.is_some() {
            HAS_INSN_COUNT
        } else {
            0
        };
        w.u64(self.position.exit)?;
        w.u8(self.event.kind().into())?;
        w.u8(flags)?;
        w.u16(0)?;
        w.u32(payload_len)?;
        if let Some(insn) = self.position.insn {
            w.u64(insn)?;
        }
        match self.event {
            Event::DeviceInput { device, data } => {
                w.u16(device)?;
                w.bytes(data)
            }
            Event::Clock { ns } => w.u64(ns),
            Event::Random { data } => w.bytes(data),
            Event::Interrupt { vector } => w.u8(vector),
            Event::OutputMarker {
                device,
                len,
                digest,
            } => {
                w.u16(device)?;
                w.u16(0)?;
                w.u32(len)?;
                w.u64(digest)
            }
            Event::Heartbeat { sender_ns } => w.u64(sender_ns),
            Event::Control(op) => {
                w.u32(op.code())?;
                w.u32(0)?;
                w.u64(op.argument())
            }
        }
    }

    /// Decodes and fully validates the entry at `body[start..]`, returning it and the body
    /// offset just past it.
    ///
    /// `index` is the entry's index in the frame; it and the entry's frame offset are
    /// reported in errors. Checks run in the order documented in `FORMAT.md`, and the first
    /// failing one is reported.
    pub(crate) fn parse(
        body: &'a [u8],
        start: usize,
        index: u32,
    ) -> Result<(Entry<'a>, usize), DecodeError> {
        let rest = body.get(start..).unwrap_or_default();
        let offset = crate::FRAME_HEADER_LEN.saturating_add(start);
        let truncated = |what, needed| DecodeError::EntryTruncated {
            index,
            offset,
            what,
            needed,
            available: rest.len(),
        };

        let mut r = Reader::new(rest);
        // Borrowed, not copied: the fields are read straight from the frame bytes.
        let header = r
            .chunk::<ENTRY_HEADER_LEN>()
            .ok_or_else(|| truncated("entry header", ENTRY_HEADER_LEN))?;
        let mut h = Reader::new(header);
        let (Some(exit), Some(kind), Some(flags), Some(reserved), Some(payload_len)) =
            (h.u64(), h.u8(), h.u8(), h.u16(), h.u32())
        else {
            // Unreachable: the header array is exactly the 16 bytes these fields occupy.
            return Err(truncated("entry header", ENTRY_HEADER_LEN));
        };

        let kind = Kind::try_from(kind).map_err(|InvalidKind(kind)| DecodeError::UnknownKind {
            index,
            offset,
            kind,
        })?;
        if flags & !HAS_INSN_COUNT != 0 {
            return Err(DecodeError::UnknownEntryFlags {
                index,
                offset,
                flags,
            });
        }
        let reserved_not_zero = |what| DecodeError::EntryReservedNotZero {
            index,
            offset,
            what,
        };
        if reserved != 0 {
            return Err(reserved_not_zero("entry reserved"));
        }
        let bad_len = || DecodeError::BadPayloadLength {
            index,
            offset,
            kind,
            len: payload_len,
            expected: kind.payload_len_rule(),
        };
        if !kind.accepts_payload_len(payload_len) {
            return Err(bad_len());
        }

        let has_insn = flags & HAS_INSN_COUNT != 0;
        let insn_len = if has_insn { INSN_COUNT_LEN } else { 0 };
        let insn =
            if has_insn {
                Some(r.u64().ok_or_else(|| {
                    truncated("instruction count", ENTRY_HEADER_LEN + INSN_COUNT_LEN)
                })?)
            } else {
                None
            };
        // `u32` always fits in `usize` on the 32- and 64-bit targets this crate supports; on a
        // narrower one `try_from` fails and the payload is reported truncated.
        let payload_usize = usize::try_from(payload_len).unwrap_or(usize::MAX);
        let payload = r.bytes(payload_usize).ok_or_else(|| {
            truncated(
                "payload",
                (ENTRY_HEADER_LEN + insn_len).saturating_add(payload_usize),
            )
        })?;

        // The payload's length was checked against the kind above, so these reads cannot
        // run short; if one did, it would be reported as a bad length, never panic.
        let short = bad_len;
        let mut p = Reader::new(payload);
        let event = match kind {
            Kind::DeviceInput => Event::DeviceInput {
                device: p.u16().ok_or_else(short)?,
                data: payload.get(2..).ok_or_else(short)?,
            },
            Kind::Clock => Event::Clock {
                ns: p.u64().ok_or_else(short)?,
            },
            Kind::Random => Event::Random { data: payload },
            Kind::Interrupt => Event::Interrupt {
                vector: p.u8().ok_or_else(short)?,
            },
            Kind::OutputMarker => {
                let device = p.u16().ok_or_else(short)?;
                if p.u16().ok_or_else(short)? != 0 {
                    return Err(reserved_not_zero("output marker reserved"));
                }
                let len = p.u32().ok_or_else(short)?;
                let digest = p.u64().ok_or_else(short)?;
                Event::OutputMarker {
                    device,
                    len,
                    digest,
                }
            }
            Kind::Heartbeat => Event::Heartbeat {
                sender_ns: p.u64().ok_or_else(short)?,
            },
            Kind::Control => {
                let op = p.u32().ok_or_else(short)?;
                let reserved = p.u32().ok_or_else(short)?;
                let argument = p.u64().ok_or_else(short)?;
                let op = match op {
                    ControlOp::GO_LIVE => ControlOp::GoLive,
                    ControlOp::SHUTDOWN => ControlOp::Shutdown,
                    ControlOp::EPOCH_CHANGE => ControlOp::EpochChange {
                        new_epoch: argument,
                    },
                    op => return Err(DecodeError::UnknownControlOp { index, offset, op }),
                };
                if reserved != 0 {
                    return Err(reserved_not_zero("control reserved"));
                }
                if op.argument() != argument {
                    return Err(DecodeError::InvalidControlArgument {
                        index,
                        offset,
                        op: op.code(),
                        argument,
                    });
                }
                Event::Control(op)
            }
        };

        let end = body.len().saturating_sub(r.remaining());
        Ok((
            Entry {
                position: Position { exit, insn },
                event,
            },
            end,
        ))
    }
}
