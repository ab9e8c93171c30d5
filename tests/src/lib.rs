//! Deterministic simulation of grinta clusters.
//!
//! Everything here runs on a virtual clock from a single seed, so any failure replays exactly: set
//! `SEED=<n>` to replay, `NODES=<n>` to change a scenario's size where it allows it.
//!
//! - [`engine`]: the discrete-event network simulator shared by every simulator.
//! - [`membership_sim`]: [`grinta_proto::membership::Membership`] state machines on that engine.
//! - [`node_sim`]: whole [`grinta_proto::node::Node`]s (QUIC, mutual TLS) on that engine.
//! - [`fuzz`]: the bodies of the fuzz targets, shared with the corpus replay test.
//! - [`real_sockets`]: real-socket scenarios written once for any runtime.
//! - [`processes`]: the multi-process scenario (nodes as processes, one killed), for any runtime.
//! - [`det_crypto`]: the seeded crypto provider that makes whole-node runs replay byte for byte.
//! - [`alloc`]: a global allocator that counts live heap bytes, for memory bounds and figures.

pub mod alloc;
pub mod det_crypto;
pub mod engine;
pub mod fuzz;
pub mod mass_join;
pub mod membership_sim;
pub mod node_sim;
pub mod processes;
pub mod real_sockets;

use std::time::Duration;

/// The network most scenarios use: a LAN with 0.5 ms one way plus up to 1 ms of jitter (which also
/// reorders packets), no loss.
pub fn lan() -> engine::NetConfig {
    engine::NetConfig {
        latency: Duration::from_micros(500),
        jitter: Duration::from_millis(1),
        ..engine::NetConfig::default()
    }
}

/// The seed of a scenario: `SEED` from the environment, else `default`; the guard prints it if the
/// scenario fails.
pub fn seed(default: u64) -> (u64, engine::SeedGuard) {
    let seed = engine::env_u64("SEED", default);
    (seed, engine::SeedGuard(seed))
}
