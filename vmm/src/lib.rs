//! The ftvm VMM: a KVM guest whose every non-deterministic input is recorded on the primary and
//! replayed on the backup, with the output gate enforcing the output rule.
//!
//! This crate is empty until the VMM issue lands; the workspace lays out its place now so that
//! the other crates' boundaries (logfmt below it, transport beside it) are fixed from the start.
