//! Deterministic simulation of grinta clusters.
//!
//! Everything here runs on a virtual clock from a single seed, so any failure replays exactly: set
//! `SEED=<n>` to replay, `NODES=<n>` to change a scenario's size where it allows it.
//!
//! - [`engine`]: the discrete-event network simulator shared by every simulator.
//! - [`membership_sim`]: [`grinta_proto::membership::Membership`] state machines on that engine.

pub mod engine;
pub mod membership_sim;
