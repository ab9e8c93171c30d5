//! Deterministic simulation of grinta clusters.
//!
//! Everything here runs on a virtual clock from a single seed, so any failure replays exactly: set
//! `SEED=<n>` to replay, `NODES=<n>` to change a scenario's size where it allows it.
//!
//! - [`engine`]: the discrete-event network simulator shared by every simulator.
//! - [`membership_sim`]: [`grinta_proto::membership::Membership`] state machines on that engine.
//! - [`node_sim`]: whole [`grinta_proto::node::Node`]s (QUIC, mutual TLS) on that engine.
//! - [`fuzz`]: the bodies of the fuzz targets, shared with the corpus replay test.
//! - [`det_crypto`]: the seeded crypto provider that makes whole-node runs replay byte for byte.

pub mod det_crypto;
pub mod engine;
pub mod fuzz;
pub mod membership_sim;
pub mod node_sim;
