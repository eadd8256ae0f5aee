//! ftvm's failover arbiter: an atomic test-and-set, with fencing epochs, that decides which side
//! of a split pair may go live.
//!
//! This crate is empty until the failover issue lands; the workspace lays out its place now.
