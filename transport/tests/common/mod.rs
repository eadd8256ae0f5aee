//! Shared test support.

pub mod stream;
