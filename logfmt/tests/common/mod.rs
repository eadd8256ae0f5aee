//! Owned mirrors of `logfmt` entries, so test generators can produce entries whose data
//! outlives the generator, and then borrow them as `logfmt::Entry` values.

#![allow(dead_code)] // Each test crate uses a different subset.

use logfmt::{ControlOp, Entry, Event, Position};

/// An owned [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedEvent {
    DeviceInput(u16, Vec<u8>),
    Clock(u64),
    Random(Vec<u8>),
    Interrupt(u8),
    OutputMarker(u16, u32, u64),
    Heartbeat(u64),
    Control(ControlOp),
}

/// An owned [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEntry {
    pub position: Position,
    pub event: OwnedEvent,
}

impl OwnedEntry {
    /// The borrowed entry the codec works on.
    pub fn borrow(&self) -> Entry<'_> {
        let event = match &self.event {
            OwnedEvent::DeviceInput(device, data) => Event::DeviceInput {
                device: *device,
                data,
            },
            OwnedEvent::Clock(ns) => Event::Clock { ns: *ns },
            OwnedEvent::Random(data) => Event::Random { data },
            OwnedEvent::Interrupt(vector) => Event::Interrupt { vector: *vector },
            OwnedEvent::OutputMarker(device, len, digest) => Event::OutputMarker {
                device: *device,
                len: *len,
                digest: *digest,
            },
            OwnedEvent::Heartbeat(sender_ns) => Event::Heartbeat {
                sender_ns: *sender_ns,
            },
            OwnedEvent::Control(op) => Event::Control(*op),
        };
        Entry::new(self.position, event)
    }
}

/// Borrows a slice of owned entries.
pub fn borrow_all(entries: &[OwnedEntry]) -> Vec<Entry<'_>> {
    entries.iter().map(OwnedEntry::borrow).collect()
}
