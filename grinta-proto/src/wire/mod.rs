//! The `grinta.v1` wire schema and stream framing.
//!
//! Every message exchanged between nodes is defined once, in `proto/grinta/v1/*.proto`; the Rust types
//! below are generated from those files at build time by prost (with protox as the compiler, so no
//! system `protoc` is needed). Readers ignore unknown fields, so newer peers may add fields.
//!
//! Messages that travel on QUIC streams (push-pull state, flow open/accept/reject, flow payloads) are
//! framed by [`framing`]: a varint length prefix followed by the bytes, with a maximum size enforced by
//! the reader.
//!
//! ```
//! use grinta_proto::wire::{self, framing::FrameDecoder};
//! use prost::Message;
//!
//! let open = wire::FlowOpen {
//!     protocol_version: wire::PROTOCOL_VERSION,
//!     endpoint: "billing".into(),
//!     source_node: "node-a".into(),
//!     max_message_size: 1 << 20,
//! };
//! let mut bytes = Vec::new();
//! wire::framing::encode_message(&open, &mut bytes);
//!
//! let mut decoder = FrameDecoder::new(64 * 1024);
//! decoder.extend(&bytes);
//! let decoded: wire::FlowOpen = decoder.next_message().unwrap().unwrap();
//! assert_eq!(decoded, open);
//! ```

pub mod framing;

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    rustdoc::broken_intra_doc_links
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/grinta.v1.rs"));
}

pub use generated::*;

/// The wire protocol version this build speaks, carried in `PushPull` and `FlowOpen`.
///
/// It matches the ALPN `grinta/1`; a peer announcing another version is refused cleanly.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN protocol identifier negotiated on every QUIC connection between grinta nodes.
pub const ALPN: &[u8] = b"grinta/1";
