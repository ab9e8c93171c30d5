//! grinta on tokio.
//!
//! This crate will hold the tokio adapter: a real UDP socket, tokio timers and the one driver task per
//! node that feeds the [`grinta_proto`] core. It does not exist yet: today grinta is its protocol core
//! (wire schema, framing and membership), driven by the deterministic simulator in the workspace's
//! `tests/` package. See the README for the status of each part.

pub use grinta_proto as proto;
