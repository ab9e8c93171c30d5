//! Deterministic simulation of grinta clusters.
//!
//! Everything here runs on a virtual clock from a single seed, so any failure replays exactly.
