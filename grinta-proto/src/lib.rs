//! The sans-IO protocol core of grinta.
//!
//! grinta is a network fabric for async Rust: a task holds a named endpoint, any task in the cluster
//! dials that name and gets a flow, an ordered, back-pressured, bidirectional message channel. This crate
//! holds the protocol state machines. They never read the clock, never touch a socket, never spawn and
//! take all randomness from a seed: time and packets go in as explicit inputs, packets, deadlines and
//! events come out. Runtime adapters (`grinta-tokio`, `grinta-async-std`) and the deterministic simulator
//! drive them.
//!
//! Modules follow the protocol boundaries:
//! - [`wire`]: the `grinta.v1` wire types generated from `proto/grinta/v1/*.proto`, and the varint
//!   length-prefixed framing used on streams.
//! - [`claims`]: signed claims, so that a node speaks only for itself even through relays.
//! - [`membership`]: SWIM with Lifeguard over abstract members and opaque datagrams.
//! - [`codec`]: codecs for typed flows (bytes, prost, serde JSON behind the `json` feature).
//! - [`fabric`]: the user API (`Fabric`, `Endpoint`, `Flow`), runtime-independent; the adapters
//!   plug in a socket, a timer and a spawner.
//! - [`datagram`]: application datagrams (unreliable, in QUIC DATAGRAM frames) and their queues.
//! - [`flow`]: flows over QUIC streams (open/accept/reject, messages, finish, reset, back-pressure).
//! - [`registry`]: the endpoint-name directory (owner-versioned records, conflict resolution).
//! - [`tags`]: key/value labels a node gives itself, spread in its membership metadata.
//! - [`transport`]: QUIC connections between nodes (quinn-proto), connected on demand.
//! - [`node`]: the [`node::Node`] that composes membership and transport for adapters.
//! - [`tls`]: mutual TLS material and configuration (rustls with ring; dev certificates behind the
//!   `dev-certs` feature).
#![forbid(unsafe_code)]

/// What a user of a runtime adapter names or matches on, re-exported at the root of each adapter
/// (`grinta_tokio::FlowError`, `grinta_async_std::DevCa`, ...), so that an application depends
/// on its adapter alone.
pub mod api {
    #[cfg(feature = "json")]
    pub use crate::codec::JsonCodec;
    pub use crate::codec::{BytesCodec, Codec, CodecAction, CodecError, ProstCodec};
    pub use crate::fabric::{
        DownReason, EndpointStats, KvEntry, KvEvent, MAX_KEY_LEN, MAX_NAMES_COUNTED,
        MAX_REQUESTS_READING, MAX_TOPIC_LEN, MAX_VALUE_LEN, MEMBER_EVENT_CAPACITY, Messages,
        MessagesIntoIter, NameEvent, OTHER_NAMES, PUBLISH_BUFFER, QueryOptions, QueryStats,
        SUBSCRIPTION_QUEUE, TopicStats,
    };
    pub use crate::flow::{FlowError, FlowLimits, FlowStats, RejectReason, ResetCode};
    pub use crate::membership::{
        Config as MembershipConfig, ConfigError as MembershipConfigError, Event as MemberEvent,
        Member, MemberState, NameError,
    };
    pub use crate::node::{NodeConfig, NodeConfigError, NodeError};
    pub use crate::registry::{EndpointKind, RegistryError, RegistryLimits};
    pub use crate::tags::{TagError, TagFilter, Tags};
    #[cfg(feature = "dev-certs")]
    pub use crate::tls::dev::{DevCa, DevCertError};
    pub use crate::tls::{TlsConfig, TlsError};
    pub use crate::transport::{
        DEFAULT_MAX_UDP_PAYLOAD, JUMBO_MAX_UDP_PAYLOAD, TransportError, TransportLimits,
    };
}

#[cfg(feature = "adapter")]
pub mod adapter;
pub mod claims;
pub mod codec;
pub mod datagram;
mod deadlines;
pub mod fabric;
pub mod flow;
pub mod membership;
pub mod node;
pub mod registry;
pub mod tags;
pub mod tls;
pub mod transport;
pub mod wire;
