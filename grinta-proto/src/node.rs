//! A grinta node: membership carried over QUIC with mutual TLS, as one sans-IO state machine.
//!
//! # Driving a node
//!
//! [`Node`] follows the contract of quinn-proto: inputs only record state, and
//! [`poll_transmit`](Node::poll_transmit)`(now)` does the work. There is one way to drive it,
//! used alike by the runtime adapters, the simulator and the fuzz targets:
//!
//! 1. Feed inputs: UDP datagrams ([`handle_datagram`](Node::handle_datagram)), due timers
//!    ([`handle_timeout`](Node::handle_timeout)) and commands ([`join`](Node::join),
//!    [`dial`](Node::dial), [`send`](Node::send), [`recv`](Node::recv), ...). Any number of inputs
//!    may be fed before the next step: a batch of datagrams then costs one round of work.
//! 2. Drain [`poll_transmit`](Node::poll_transmit)`(now)` until it returns `None`, sending each
//!    [`Transmit`].
//! 3. Drain [`poll_event`](Node::poll_event), then read [`poll_timeout`](Node::poll_timeout): the
//!    one absolute deadline at which to call `handle_timeout`. Reacting to an event with a command
//!    is an input: go back to step 2.
//!
//! The node never reads the clock (every time comes from its caller), never touches a socket and
//! never spawns. Protocol randomness comes from the seed given to [`Node::new`]; cryptographic
//! randomness (TLS key shares, QUIC connection IDs and reset keys) comes from the configured
//! crypto provider's secure random source, so a simulator that plugs in a seeded provider replays
//! byte for byte.
//!
//! ```no_run
//! # #[cfg(feature = "dev-certs")] {
//! use grinta_proto::node::{Node, NodeConfig};
//! use grinta_proto::tls::dev::DevCa;
//! use std::time::Instant;
//!
//! let ca = DevCa::new()?;
//! let config = NodeConfig::new("node-a", "127.0.0.1:7001".parse()?, ca.issue("node-a")?);
//! let now = Instant::now(); // the adapter's clock, not the node's
//! let mut node = Node::new(config, 42, now)?;
//! node.join(now, &["127.0.0.1:7002".parse()?]);
//! while let Some(t) = node.poll_transmit(now) {
//!     for datagram in t.segments() {
//!         // socket.send_to(datagram, t.destination)
//!         # let _ = datagram;
//!     }
//! }
//! while let Some(event) = node.poll_event() {
//!     // react to membership, directory and flow events
//!     # let _ = event;
//! }
//! let _wake_at = node.poll_timeout(); // then call node.handle_timeout(that time)
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustls::crypto::CryptoProvider;
use rustls::time_provider::TimeProvider;
use smallvec::SmallVec;
use tracing::{debug, trace};

use crate::claims::{self, CertificateKeys, ClaimKind};
use crate::flow::{
    FlowError, FlowEvent, FlowId, FlowLimits, FlowStats, Flows, Recv, RecvQueue, ResetCode,
    SendQueue,
};
use crate::membership::{self, Channel, MemberState, Membership};
use crate::registry::{
    EndpointKind, Record, Registry, RegistryError, RegistryEvent, RegistryLimits,
};
use crate::tags::{TagError, TagFilter, Tags};
use crate::tls::{self, TlsConfig};
use crate::transport::{
    STREAMS_FOR_EXCHANGES, Transport, TransportError, TransportEvent, TransportLimits,
};
use crate::wire;

pub use crate::transport::{StreamStats, Transmit, TransportStats};

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name: the DNS SAN of its certificate, 1..=128 bytes of `[A-Za-z0-9._-]`.
    pub name: String,
    /// The local address the adapter binds its UDP socket to.
    pub bind: SocketAddr,
    /// The address other nodes reach this one at; defaults to `bind`. Must be a concrete address.
    pub advertise: Option<SocketAddr>,
    /// Seed addresses to join through (see [`Node::join`]).
    pub seeds: Vec<SocketAddr>,
    /// The node's TLS material.
    pub tls: TlsConfig,
    /// Membership profile and limits.
    pub membership: membership::Config,
    /// Transport limits.
    pub transport: TransportLimits,
    /// Endpoint-directory limits.
    pub registry: RegistryLimits,
    /// Limits of the replicated key/value table ([`RegistryLimits::key_value`]):
    /// `max_local_endpoints` counts the keys this node holds.
    pub kv: RegistryLimits,
    /// Flow limits (message size, buffers, backlog, dial timeout).
    pub flows: FlowLimits,
    /// The crypto provider (rustls with ring, see [`tls::crypto_provider`]). Simulations replace it
    /// with one whose randomness is seeded.
    pub crypto_provider: Arc<CryptoProvider>,
    /// The wall clock rustls checks certificate validity against ([`tls::system_time`] by default).
    /// Simulations replace it with a fixed clock.
    pub time_provider: Arc<dyn TimeProvider>,
    /// The node's tags, announced from its first alive (see [`crate::tags`]).
    pub tags: Tags,
}

impl NodeConfig {
    /// A configuration with LAN membership defaults, default limits and no seeds.
    pub fn new(name: &str, bind: SocketAddr, tls: TlsConfig) -> Self {
        Self {
            name: name.to_owned(),
            bind,
            advertise: None,
            seeds: Vec::new(),
            tls,
            membership: membership::Config::lan(),
            transport: TransportLimits::default(),
            registry: RegistryLimits::default(),
            kv: RegistryLimits::key_value(),
            flows: FlowLimits::default(),
            tags: Tags::new(),
            crypto_provider: tls::crypto_provider(),
            time_provider: tls::system_time(),
        }
    }

    /// The address other nodes reach this one at.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.bind)
    }

    /// The membership settings the node runs with: [`membership`](Self::membership) with its
    /// packet budget fitted to what one QUIC DATAGRAM frame carries
    /// ([`MEMBERSHIP_PACKET_BUDGET`]). Every membership profile is valid for a node as given.
    ///
    /// ```
    /// # use grinta_proto::{membership, node::{NodeConfig, MEMBERSHIP_PACKET_BUDGET}, tls::TlsConfig};
    /// # fn demo(tls: TlsConfig) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut config = NodeConfig::new("node-a", "127.0.0.1:7000".parse()?, tls);
    /// config.membership = membership::Config::local();
    /// assert!(config.validate().is_ok());
    /// assert_eq!(config.membership_config().max_packet_size, MEMBERSHIP_PACKET_BUDGET);
    /// # Ok(()) }
    /// ```
    pub fn membership_config(&self) -> membership::Config {
        let mut config = self.membership.clone();
        config.max_packet_size = config.max_packet_size.min(MEMBERSHIP_PACKET_BUDGET);
        config
    }

    /// Checks the configuration; [`Node::new`] calls it too.
    pub fn validate(&self) -> Result<(), NodeConfigError> {
        membership::validate_node_name(&self.name)?;
        self.membership_config().validate()?;
        for (field, value) in [
            ("flows.dial_timeout", self.flows.dial_timeout),
            ("flows.shutdown_grace", self.flows.shutdown_grace),
            ("flows.request_timeout", self.flows.request_timeout),
            ("transport.idle_timeout", self.transport.idle_timeout),
            (
                "transport.handshake_timeout",
                self.transport.handshake_timeout,
            ),
            (
                "transport.exchange_timeout",
                self.transport.exchange_timeout,
            ),
            ("registry.tombstone_ttl", self.registry.tombstone_ttl),
            (
                "registry.departed_owner_ttl",
                self.registry.departed_owner_ttl,
            ),
        ] {
            if value > membership::MAX_SETTING_DURATION {
                return Err(NodeConfigError::DurationTooLong { field, value });
            }
        }
        let encoded = self.tags.encode().len();
        let limit = self.membership.max_meta_size;
        if encoded > limit {
            return Err(TagError::TooLarge {
                size: encoded,
                limit,
            }
            .into());
        }
        let advertise = self.advertise_addr();
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            return Err(NodeConfigError::Advertise { addr: advertise });
        }
        if let Some(seed) = self
            .seeds
            .iter()
            .find(|s| s.ip().is_unspecified() || s.port() == 0)
        {
            return Err(NodeConfigError::Seed { addr: *seed });
        }
        if !crate::transport::UDP_PAYLOAD_RANGE.contains(&self.transport.max_udp_payload) {
            return Err(NodeConfigError::UdpPayload {
                value: self.transport.max_udp_payload,
            });
        }
        let needed = u64::try_from(self.flows.max_flows_per_peer)
            .unwrap_or(u64::MAX)
            .saturating_add(u64::from(STREAMS_FOR_EXCHANGES));
        if u64::from(self.transport.max_concurrent_streams) < needed {
            return Err(NodeConfigError::StreamLimit {
                max_concurrent_streams: self.transport.max_concurrent_streams,
                needed,
            });
        }
        Ok(())
    }
}

/// How a peer's signed record reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// Gossip (or a record held until its owner's alive came): news as it spreads.
    Gossip,
    /// A push-pull: the peer's whole table, tombstones included.
    PushPull,
}

/// The largest membership packet a node sends: what a QUIC DATAGRAM frame holds on a 1200-byte
/// path (the QUIC minimum) with room for the packet header and frame overhead. A larger
/// `membership::Config::max_packet_size` is fitted down to it (see
/// [`NodeConfig::membership_config`]); a smaller one is kept.
pub const MEMBERSHIP_PACKET_BUDGET: usize = 1100;

/// A node configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeConfigError {
    /// A duration is longer than [`membership::MAX_SETTING_DURATION`] (ten years).
    #[error("setting `{field}` of {value:?} is longer than the ten years any setting may be")]
    DurationTooLong {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: std::time::Duration,
    },
    /// The node name is invalid.
    #[error(transparent)]
    Name(#[from] membership::NameError),
    /// The membership settings are invalid.
    #[error(transparent)]
    Membership(#[from] membership::ConfigError),
    /// The advertised address cannot be reached by others.
    #[error(
        "advertise address {addr} is not reachable by other nodes: set `advertise` to a concrete IP and port when binding a wildcard address or port 0"
    )]
    Advertise {
        /// The refused address.
        addr: SocketAddr,
    },
    /// A seed address is a wildcard or has port 0.
    #[error("seed address {addr} must be a concrete IP and port")]
    Seed {
        /// The refused address.
        addr: SocketAddr,
    },
    /// The tags do not fit in the membership metadata.
    #[error(transparent)]
    Tags(#[from] TagError),
    /// The stream limit leaves no room for push-pull once a peer has its most flows open.
    #[error(
        "transport max_concurrent_streams {max_concurrent_streams} must be at least {needed} (flows.max_flows_per_peer + {STREAMS_FOR_EXCHANGES} for push-pull): raise it or lower max_flows_per_peer"
    )]
    StreamLimit {
        /// The configured stream limit.
        max_concurrent_streams: u32,
        /// The least that works with the flow limit.
        needed: u64,
    },
    /// The largest UDP payload is outside what QUIC allows.
    #[error(
        "transport max_udp_payload {value} must be from 1200 (QUIC's minimum) to 65527 bytes (the largest UDP payload)"
    )]
    UdpPayload {
        /// The configured size.
        value: u16,
    },
}

impl From<membership::InitError> for NodeConfigError {
    fn from(e: membership::InitError) -> Self {
        match e {
            membership::InitError::Config(e) => Self::Membership(e),
            membership::InitError::Name(e) => Self::Name(e),
        }
    }
}

/// Why a node could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] NodeConfigError),
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The QUIC setup failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Something that happened, for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A membership event.
    Membership(membership::Event),
    /// A change of the endpoint directory.
    Registry(RegistryEvent),
    /// Something happened to a flow.
    Flow(FlowEvent),
    /// Application datagrams wait for local endpoint `endpoint` ([`Node::recv_datagrams`]), whose
    /// queue was empty: told once until the queue is emptied again.
    Datagram {
        /// The endpoint.
        endpoint: String,
    },
    /// A QUIC connection to a peer ended (idle, closed or failed).
    ConnectionLost {
        /// The peer's name, if the connection was bound to one.
        name: Option<String>,
        /// The peer's address.
        addr: SocketAddr,
        /// Whether it ended before the handshake completed (for example a certificate from another
        /// CA, or a name that did not match).
        handshake_failed: bool,
    },
}

/// Node counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Membership counters.
    pub membership: membership::Stats,
    /// Transport counters.
    pub transport: TransportStats,
    /// Membership messages dropped because they did not decode.
    pub undecodable: u64,
    /// Endpoint records that arrived before their owner's alive and were held until it came
    /// (see [`RECORDS_AWAITING_OWNER`]).
    pub records_held: u64,
    /// Held records dropped: the buffer was full, or the owner did not show up in time.
    pub records_held_dropped: u64,
    /// Application datagrams sent, received and dropped.
    pub datagrams: crate::datagram::DatagramStats,
}

/// Most endpoint records held while their owner's alive has not arrived (gossip relays them in
/// any order, so a node may hear of a record before its owner); the oldest is dropped first. A
/// held record is kept [`RECORD_HOLD_TIME`] at most.
pub const RECORDS_AWAITING_OWNER: usize = 1024;

/// How long a record waits for its owner's alive.
pub const RECORD_HOLD_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// The push-pull state (the directory and the key/value table, encoded) is rebuilt at most this
/// often while they change, and always before this node answers or starts a push-pull exchange
/// of its own making (a join), so that a burst of changes costs one encoding, not one each.
/// A periodic push-pull may carry a state this old: gossip has carried the changes already.
pub const APP_STATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// One grinta node.
#[derive(Debug)]
pub struct Node {
    membership: Membership,
    registry: Registry,
    flows: Flows,
    rng: ChaCha8Rng,
    /// The replicated key/value table: records of kind `Value`, spread like the directory's.
    kv: Registry,
    /// Application datagrams waiting for this node's endpoints.
    datagrams: crate::datagram::Datagrams,
    /// The endpoint the last datagram arrived for, and whether this node serves it.
    last_datagram_endpoint: LastDatagramEndpoint,
    /// The directory or the key/value table changed since the push-pull state was last encoded.
    registry_dirty: bool,
    /// When the push-pull state was last encoded (see [`APP_STATE_INTERVAL`]).
    app_state_encoded_at: Instant,
    /// Signed records whose owner is not a member yet: (owner, when held, record).
    awaiting_owner: VecDeque<(String, Instant, wire::Signed)>,
    records_held: u64,
    records_held_dropped: u64,
    transport: Transport,
    seeds: Vec<SocketAddr>,
    events: VecDeque<Event>,
    undecodable: u64,
    /// An input recorded state that [`poll_transmit`](Node::poll_transmit) has not processed yet.
    work_pending: bool,
    /// `node{name}`: every event the node logs is inside it.
    span: tracing::Span,
}

impl Node {
    /// Creates a node; it knows nobody until it [`join`](Self::join)s or is contacted.
    pub fn new(config: NodeConfig, seed: u64, now: Instant) -> Result<Self, NodeError> {
        config.validate()?;
        let span = tracing::info_span!("node", name = %config.name);
        let _entered = span.clone().entered();
        let node_tls = tls::build(
            &config.tls,
            &config.name,
            config.crypto_provider.clone(),
            config.time_provider.clone(),
        )?;
        let transport = Transport::new(
            &config.name,
            &config.tls,
            node_tls,
            config.crypto_provider.clone(),
            config.transport.clone(),
        )?;
        let membership_config = config.membership_config();
        // Every member's certificate is remembered, and as many again for members that
        // restart under new keys.
        let keys = CertificateKeys::new(
            &config.tls,
            &config.name,
            config.crypto_provider.clone(),
            config.time_provider.clone(),
            membership_config
                .max_members
                .saturating_mul(2)
                .saturating_add(1),
        )?;
        let mut membership = Membership::new(
            membership_config,
            &config.name,
            config.advertise_addr(),
            seed,
            now,
            Box::new(keys),
        )
        .map_err(|e| NodeError::Config(e.into()))?;
        if !config.tags.is_empty() {
            // Checked against max_meta_size in `validate`; a fresh node is running.
            let _ = membership.update_meta(config.tags.encode());
        }
        // The directory's records carry the incarnation membership starts at.
        let mut registry = Registry::new(&config.name, config.registry.clone());
        registry.set_local_incarnation(membership.incarnation(), now);
        let mut kv = Registry::new(&config.name, config.kv.clone());
        kv.set_local_incarnation(membership.incarnation(), now);
        // The fabric starts incarnations at the wall clock in ms: versions of this life's writes
        // then follow those of a previous life under the same name.
        kv.raise_clock(membership.incarnation());
        Ok(Self {
            membership,
            registry,
            kv,
            datagrams: crate::datagram::Datagrams::default(),
            last_datagram_endpoint: LastDatagramEndpoint::default(),
            app_state_encoded_at: now,
            flows: Flows::new(&config.name, config.flows.clone()),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x666c_6f77),
            registry_dirty: false,
            transport,
            seeds: config.seeds,
            events: VecDeque::new(),
            undecodable: 0,
            awaiting_owner: VecDeque::new(),
            records_held: 0,
            records_held_dropped: 0,
            work_pending: false,
            span,
        })
    }

    /// The node's span, `node{name}`: the node enters it whenever it does work, so every event
    /// it logs carries its name; a driver can run its own code inside it too.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        self.membership.local_name()
    }

    /// The address other nodes reach this node at.
    pub fn local_addr(&self) -> SocketAddr {
        self.membership.local_addr()
    }

    /// The membership view.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The endpoint directory.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The replicated key/value table (records of kind [`EndpointKind::Value`]): read it with
    /// [`Registry::get`] and [`Registry::entries`].
    pub fn kv(&self) -> &Registry {
        &self.kv
    }

    /// The table that holds records of `kind`.
    fn table(&self, kind: EndpointKind) -> &Registry {
        if kind == EndpointKind::Value {
            &self.kv
        } else {
            &self.registry
        }
    }

    fn table_mut(&mut self, kind: EndpointKind) -> &mut Registry {
        if kind == EndpointKind::Value {
            &mut self.kv
        } else {
            &mut self.registry
        }
    }

    /// Writes `key` = `value` in the key/value table and announces it (see [`Registry::put`]).
    pub fn kv_put(&mut self, now: Instant, key: &str, value: Bytes) -> Result<(), RegistryError> {
        self.kv_write(now, key, value, false)
    }

    /// Writes an entry that outlives this node (see [`Registry::put_durable`]) and announces it.
    pub fn kv_put_durable(
        &mut self,
        now: Instant,
        key: &str,
        value: Bytes,
    ) -> Result<(), RegistryError> {
        self.kv_write(now, key, value, true)
    }

    /// Member `gone` failed or left: if this node is the live member with the lowest name, it
    /// writes `gone`'s durable entries again as its own (others may think they are too, for a
    /// while: the last write wins, and the others withdraw theirs).
    fn adopt_durable_entries(&mut self, now: Instant, gone: &str) {
        let entries = self.kv.durable_entries_of(gone);
        if entries.is_empty() {
            return;
        }
        let local = self.membership.local_name();
        let lowest = self
            .membership
            .members()
            .filter(|m| m.state == MemberState::Alive && m.name != gone)
            .all(|m| m.name.as_str() > local);
        if !lowest {
            return;
        }
        debug!(
            writer = gone,
            entries = entries.len(),
            "taking over durable entries"
        );
        for entry in entries {
            match self.kv.adopt(&entry, now) {
                Ok(record) => self.announce(&record),
                Err(e) => debug!(key = %entry.name, error = %e, "durable entry not taken over"),
            }
        }
    }

    /// Deletes `key` from the key/value table and announces it (see [`Registry::delete`]).
    /// Returns whether the key held an entry.
    pub fn kv_delete(&mut self, now: Instant, key: &str) -> Result<bool, RegistryError> {
        let _span = self.span.clone().entered();
        let Some(tombstone) = self.kv.delete(key, now)? else {
            return Ok(false);
        };
        self.announce(&tombstone);
        self.work_pending = true;
        Ok(true)
    }

    /// Sends an application datagram to `endpoint` (on the owner [`resolve`](Self::resolve)
    /// picks; this node's own endpoints get it at once): unreliable, unordered, never waiting.
    /// Returns whether it left (a datagram dropped for want of room is not an error, only
    /// counted in [`NodeStats::datagrams`]).
    ///
    /// Errors: `FlowError::MessageTooLarge` beyond [`MAX_DATAGRAM_SIZE`](crate::datagram::MAX_DATAGRAM_SIZE),
    /// `FlowError::NoSuchEndpoint`, `FlowError::ShuttingDown`.
    pub fn send_datagram(
        &mut self,
        now: Instant,
        endpoint: &str,
        payload: Bytes,
    ) -> Result<bool, FlowError> {
        crate::datagram::check_size(payload.len())?;
        if self.flows.is_shutting_down() {
            return Err(FlowError::ShuttingDown);
        }
        let node = match self.resolve(endpoint)? {
            Target::Local => {
                let delivery =
                    self.datagrams
                        .deliver(endpoint, self.membership.local_name(), payload);
                self.datagrams.count_sent(delivery.is_queued());
                if delivery == crate::datagram::Delivery::First {
                    self.events.push_back(Event::Datagram {
                        endpoint: endpoint.to_owned(),
                    });
                }
                return Ok(delivery.is_queued());
            }
            Target::Remote { node } => node,
        };
        let Some(addr) = self.membership.member_addr(&node) else {
            return Err(FlowError::NoSuchEndpoint {
                name: endpoint.to_owned(),
            });
        };
        let (sent, _) =
            self.transport
                .send_app_datagrams(now, &node, addr, endpoint, std::iter::once(payload));
        let sent = sent == 1;
        self.datagrams.count_sent(sent);
        self.work_pending = true;
        Ok(sent)
    }

    /// Sends a batch of application datagrams to `endpoint`, each as
    /// [`send_datagram`](Self::send_datagram) would (an owner picked per datagram), looking its
    /// owners up once; a datagram that cannot be sent (the endpoint has no owner any more, the
    /// node is shutting down, it is too large) is dropped and counted in
    /// [`NodeStats::datagrams`]. This is how a runtime hands over what its senders queued
    /// outside the node.
    pub fn send_datagrams(
        &mut self,
        now: Instant,
        endpoint: &str,
        payloads: impl IntoIterator<Item = Bytes>,
    ) {
        let route = if self.flows.is_shutting_down() {
            DatagramRoute::Nowhere
        } else {
            match owners_to_use(
                &self.registry,
                &self.membership,
                endpoint,
                &TagFilter::new(),
            ) {
                Err(_) => DatagramRoute::Nowhere,
                Ok(Owners::Local) => DatagramRoute::Local,
                Ok(Owners::Remote(owners)) => DatagramRoute::Remote(
                    owners
                        .into_iter()
                        .filter_map(|o| Some((o.to_owned(), self.membership.member_addr(o)?)))
                        .collect(),
                ),
            }
        };
        let too_large = std::cell::Cell::new(0u64);
        let mut payloads = payloads.into_iter().filter(|payload| {
            let fits = crate::datagram::check_size(payload.len()).is_ok();
            if !fits {
                too_large.set(too_large.get() + 1);
            }
            fits
        });
        match &route {
            // One owner: the whole batch to one connection.
            DatagramRoute::Remote(owners) if owners.len() == 1 => {
                let (node, addr) = &owners[0];
                let (sent, offered) = self.transport.send_app_datagrams(
                    now,
                    node,
                    *addr,
                    endpoint,
                    payloads.by_ref(),
                );
                self.datagrams.count_sent_batch(sent, offered);
                self.work_pending = true;
            }
            DatagramRoute::Remote(owners) if !owners.is_empty() => {
                for payload in payloads.by_ref() {
                    let (node, addr) = &owners[self.rng.random_range(0..owners.len())];
                    let (sent, _) = self.transport.send_app_datagrams(
                        now,
                        node,
                        *addr,
                        endpoint,
                        std::iter::once(payload),
                    );
                    self.datagrams.count_sent(sent == 1);
                    self.work_pending = true;
                }
            }
            DatagramRoute::Local => {
                for payload in payloads.by_ref() {
                    if self.send_datagram(now, endpoint, payload).is_err() {
                        self.datagrams.count_dropped_sending(1);
                    }
                }
            }
            DatagramRoute::Remote(_) | DatagramRoute::Nowhere => {}
        }
        // What was not offered to a connection (no owner, or no connection to be had) is
        // dropped, and counted like the rest.
        let rest = payloads.count();
        self.datagrams.count_dropped_sending(rest as u64);
        self.datagrams.count_dropped_sending(too_large.get());
    }

    /// Bytes of framed application datagrams ([`encoded_len`](crate::datagram::encoded_len))
    /// the connections to `endpoint`'s owners take now, rather than drop for want of room (the
    /// sum over its owners when there are several): how much a runtime may queue for
    /// [`send_datagrams`](Self::send_datagrams) without queuing datagrams bound to be dropped.
    /// 0 for a name with no owner; `usize::MAX` for one of this node's endpoints.
    pub fn datagram_room(&mut self, endpoint: &str) -> usize {
        match owners_to_use(
            &self.registry,
            &self.membership,
            endpoint,
            &TagFilter::new(),
        ) {
            Err(_) => 0,
            Ok(Owners::Local) => usize::MAX,
            Ok(Owners::Remote(owners)) => owners
                .iter()
                .filter_map(|o| Some((*o, self.membership.member_addr(o)?)))
                .map(|(o, addr)| self.transport.app_datagram_room(o, addr))
                .fold(0, usize::saturating_add),
        }
    }

    /// Counts `n` application datagrams the runtime dropped before handing them to the node
    /// (its queue for [`send_datagrams`](Self::send_datagrams) was full), in
    /// [`NodeStats::datagrams`].
    pub fn count_datagrams_dropped(&mut self, n: u64) {
        self.datagrams.count_dropped_sending(n);
    }

    /// The next application datagram for local endpoint `endpoint`: the sending node's name and
    /// the payload.
    pub fn recv_datagram(&mut self, endpoint: &str) -> Option<(String, Bytes)> {
        self.datagrams.recv(endpoint)
    }

    /// Moves up to `max` datagrams waiting for local endpoint `endpoint` to the end of `into`;
    /// returns how many. [`Event::Datagram`] comes again only once they were all taken.
    pub fn recv_datagrams(
        &mut self,
        endpoint: &str,
        into: &mut VecDeque<(String, Bytes)>,
        max: usize,
    ) -> usize {
        self.datagrams.recv_batch(endpoint, into, max)
    }

    /// A datagram arrived on connection `conn`: queued for its endpoint if this node serves it.
    fn deliver_datagram(&mut self, conn: quinn_proto::ConnectionHandle, data: Bytes) {
        let Some((endpoint, payload)) = crate::datagram::decode(&data) else {
            self.datagrams.count_dropped();
            return;
        };
        let Some((from, _)) = self.transport.peer_of(conn) else {
            self.datagrams.count_dropped();
            return;
        };
        // A stream of datagrams to one endpoint looks it up in the directory once per change of
        // the directory, not once per datagram.
        let generation = self.registry.generation();
        let cache = &mut self.last_datagram_endpoint;
        let served = if cache.generation == Some(generation) && cache.name == endpoint {
            cache.served
        } else {
            let served =
                self.registry.is_local(endpoint) && !crate::registry::is_reserved_name(endpoint);
            cache.generation = Some(generation);
            cache.name.clear();
            cache.name.push_str(endpoint);
            cache.served = served;
            served
        };
        if !served {
            self.datagrams.count_dropped();
            return;
        }
        // The reader is told when its queue fills from empty; it drains it before waiting again.
        if self.datagrams.deliver(endpoint, from, payload) == crate::datagram::Delivery::First {
            self.events.push_back(Event::Datagram {
                endpoint: endpoint.to_owned(),
            });
        }
    }

    /// A number that moves whenever the directory or the key/value table changes.
    pub fn directory_generation(&self) -> u64 {
        self.registry
            .generation()
            .wrapping_add(self.kv.generation())
    }

    /// Registers endpoint `name` on this node and announces it to the cluster.
    pub fn register_endpoint(
        &mut self,
        now: Instant,
        name: &str,
        kind: EndpointKind,
    ) -> Result<(), RegistryError> {
        let _span = self.span.clone().entered();
        let record = self.registry.register(name, kind, now)?;
        self.announce(&record);
        self.work_pending = true;
        Ok(())
    }

    /// Unregisters endpoint `name` and announces it (the record becomes a tombstone). Flows
    /// waiting in its accept backlog are reset; accepted flows carry on.
    pub fn unregister_endpoint(&mut self, now: Instant, name: &str) -> Result<(), RegistryError> {
        let _span = self.span.clone().entered();
        // What waits for the endpoint goes even if the name was no longer this node's.
        self.datagrams.close(name);
        let record = self.registry.unregister(name, now)?;
        self.flows
            .on_endpoint_closed(&mut self.transport, name, ResetCode::EndpointClosed);
        self.announce(&record);
        self.work_pending = true;
        Ok(())
    }

    /// Whether a dial of `endpoint` has somewhere to go: this node serves it, or an owner that
    /// membership does not hold gone.
    pub fn is_resolvable(&self, endpoint: &str) -> bool {
        self.registry
            .resolve(endpoint)
            .iter()
            .any(|o| self.is_live_owner(o))
    }

    /// The owners a dial of `endpoint` may reach, sorted: those [`Registry::resolve`] gives
    /// that membership does not hold gone (this node included if it serves it).
    pub fn live_owners(&self, endpoint: &str) -> Vec<&str> {
        self.registry
            .resolve(endpoint)
            .into_iter()
            .filter(|o| self.is_live_owner(o))
            .collect()
    }

    /// The endpoint names that start with `prefix` and have a live owner (see
    /// [`live_owners`](Self::live_owners)), each with those owners.
    pub fn directory_view(&self, prefix: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        self.registry
            .names(prefix)
            .into_iter()
            .filter(|name| !crate::registry::is_reserved_name(name))
            .filter_map(|name| {
                let owners: Vec<String> = self
                    .live_owners(name)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                (!owners.is_empty()).then(|| (name.to_owned(), owners))
            })
            .collect()
    }

    /// Whether the tags of `node` (this node or a member) match `filter`.
    pub fn tags_match(&self, node: &str, filter: &TagFilter) -> bool {
        tags_match(&self.membership, node, filter)
    }

    fn is_live_owner(&self, owner: &str) -> bool {
        owner == self.membership.local_name()
            || self
                .membership
                .member_state(owner)
                .is_some_and(|state| !matches!(state, MemberState::Dead | MemberState::Left))
    }

    /// Why member `name` is not (or no longer) in the cluster: `None` while it is alive or
    /// suspected (or is this node).
    pub fn member_down_reason(&self, name: &str) -> Option<DownReason> {
        if name == self.membership.local_name() {
            return None;
        }
        match self.membership.member_state(name) {
            Some(MemberState::Alive | MemberState::Suspect) => None,
            Some(MemberState::Dead) => Some(DownReason::Failed),
            Some(MemberState::Left) => Some(DownReason::Left),
            None => Some(DownReason::NotFound),
        }
    }

    /// Why `owner` no longer serves `endpoint` (as [`live_owners`](Self::live_owners) sees
    /// it): `None` if it still does. Its node failed or left; it lost the name to another
    /// owner's claim; or it withdrew its claim.
    pub fn owner_down_reason(&self, endpoint: &str, owner: &str) -> Option<DownReason> {
        if self.live_owners(endpoint).contains(&owner) {
            return None;
        }
        if let Some(reason) = self.member_down_reason(owner) {
            // A member forgotten since it failed: its records went with it.
            return Some(if reason == DownReason::NotFound {
                DownReason::Failed
            } else {
                reason
            });
        }
        let winner = self
            .registry
            .resolve(endpoint)
            .first()
            .map(|w| w.to_string());
        let lost_here =
            owner == self.membership.local_name() && self.registry.lost_conflict(endpoint);
        let outranked = self.registry.owners(endpoint).contains(&owner);
        match winner {
            Some(winner)
                if (lost_here || outranked)
                    && self.registry.kind(endpoint) == Some(EndpointKind::Exclusive) =>
            {
                Some(DownReason::Conflict { winner })
            }
            _ => Some(DownReason::Withdrawn),
        }
    }

    /// This node's tags.
    pub fn tags(&self) -> Tags {
        Tags::decode(self.membership.local_meta())
    }

    /// Replaces this node's tags: its next incarnation announces them.
    pub fn set_tags(&mut self, tags: &Tags) -> Result<(), membership::Error> {
        self.membership.update_meta(tags.encode())?;
        self.work_pending = true;
        Ok(())
    }

    /// Where a dial of `endpoint` would go: this node if it serves the endpoint (local first),
    /// otherwise a random live owner, skipping owners membership does not see alive.
    pub fn resolve(&mut self, endpoint: &str) -> Result<Target, FlowError> {
        self.resolve_where(endpoint, &TagFilter::new())
    }

    /// Like [`resolve`](Self::resolve), among the owners whose tags match `filter` only.
    pub fn resolve_where(
        &mut self,
        endpoint: &str,
        filter: &TagFilter,
    ) -> Result<Target, FlowError> {
        let owners = match owners_to_use(&self.registry, &self.membership, endpoint, filter)? {
            Owners::Local => return Ok(Target::Local),
            Owners::Remote(owners) => owners,
        };
        let k = self.rng.random_range(0..owners.len());
        Ok(Target::Remote {
            node: owners[k].to_owned(),
        })
    }

    /// Dials `endpoint` on a remote owner (see [`resolve`](Self::resolve)); the flow is usable after
    /// [`FlowEvent::Opened`], or fails with [`FlowEvent::DialFailed`]. An endpoint served by this
    /// node is connected in-process by the adapters: here it is [`FlowError::LocalEndpoint`].
    pub fn dial(&mut self, now: Instant, endpoint: &str) -> Result<FlowId, FlowError> {
        self.dial_where(now, endpoint, &TagFilter::new())
    }

    /// Like [`dial`](Self::dial), to an owner whose tags match `filter`; `NoSuchEndpoint` if
    /// no live owner does.
    pub fn dial_where(
        &mut self,
        now: Instant,
        endpoint: &str,
        filter: &TagFilter,
    ) -> Result<FlowId, FlowError> {
        let _span = self.span.clone().entered();
        let node = match self.resolve_where(endpoint, filter)? {
            Target::Local => {
                return Err(FlowError::LocalEndpoint {
                    name: endpoint.to_owned(),
                });
            }
            Target::Remote { node } => node,
        };
        self.dial_node(now, endpoint, &node)
    }

    /// Dials `endpoint` on owner `node` (one of its [`live_owners`](Self::live_owners)), as
    /// [`dial`](Self::dial) does on the owner it picks. `FlowError::NoSuchEndpoint` if `node`
    /// does not serve it; `FlowError::LocalEndpoint` if `node` is this node.
    pub fn dial_node(
        &mut self,
        now: Instant,
        endpoint: &str,
        node: &str,
    ) -> Result<FlowId, FlowError> {
        self.dial_node_with(now, endpoint, node, None)
    }

    /// Sends a request to `endpoint` (on the owner [`resolve`](Self::resolve) picks): a dial
    /// that carries `message` and the end of the sending side with its open, so that on an
    /// open connection the request costs one round trip. The flow opens like a dial's
    /// ([`FlowEvent::Opened`] or [`FlowEvent::DialFailed`]); the reply is its first message.
    pub fn dial_request(
        &mut self,
        now: Instant,
        endpoint: &str,
        message: Bytes,
    ) -> Result<FlowId, FlowError> {
        let node = match self.resolve(endpoint)? {
            Target::Local => {
                return Err(FlowError::LocalEndpoint {
                    name: endpoint.to_owned(),
                });
            }
            Target::Remote { node } => node,
        };
        self.dial_node_with(now, endpoint, &node, Some(message))
    }

    /// Like [`dial_request`](Self::dial_request), to owner `node`.
    pub fn dial_node_request(
        &mut self,
        now: Instant,
        endpoint: &str,
        node: &str,
        message: Bytes,
    ) -> Result<FlowId, FlowError> {
        self.dial_node_with(now, endpoint, node, Some(message))
    }

    fn dial_node_with(
        &mut self,
        now: Instant,
        endpoint: &str,
        node: &str,
        request: Option<Bytes>,
    ) -> Result<FlowId, FlowError> {
        let _span = self.span.clone().entered();
        if !self.live_owners(endpoint).contains(&node) {
            return Err(FlowError::NoSuchEndpoint {
                name: endpoint.to_owned(),
            });
        }
        if node == self.membership.local_name() {
            return Err(FlowError::LocalEndpoint {
                name: endpoint.to_owned(),
            });
        }
        let addr = self
            .membership
            .member_addr(node)
            .ok_or_else(|| FlowError::NoSuchEndpoint {
                name: endpoint.to_owned(),
            })?;
        let flow = match request {
            Some(message) => self.flows.dial_request(
                now,
                &mut self.transport,
                (endpoint, node, addr),
                message,
            )?,
            None => self
                .flows
                .dial(now, &mut self.transport, endpoint, node, addr)?,
        };
        self.work_pending = true;
        Ok(flow)
    }

    /// Takes the next flow waiting in the accept backlog of local endpoint `endpoint`.
    pub fn accept(&mut self, now: Instant, endpoint: &str) -> Option<FlowId> {
        let _span = self.span.clone().entered();
        self.work_pending = true;
        self.flows
            .accept(now, &mut self.transport, &self.registry, endpoint)
    }

    /// Queues one message on an open flow; it is written to the stream, and packets are built,
    /// when [`poll_transmit`](Self::poll_transmit) is next drained, so messages sent in a burst
    /// share one stream write and their packets. [`FlowError::WouldBlock`] means the send buffer
    /// is full: retry after [`FlowEvent::Writable`].
    pub fn send(&mut self, flow: FlowId, message: Bytes) -> Result<(), FlowError> {
        let r = self.flows.send(flow, message, true);
        self.work_pending = true;
        r
    }

    /// Queues messages the fabric framed in a flow handle's own queue (see
    /// [`Flows::send_staged`](crate::flow::Flows::send_staged)); written at the next flush.
    pub(crate) fn send_staged(
        &mut self,
        flow: FlowId,
        staged: &mut SendQueue,
        messages: u64,
        bytes: u64,
    ) -> Result<(), FlowError> {
        self.work_pending = true;
        self.flows.send_staged(flow, staged, messages, bytes)
    }

    /// Bytes of a flow waiting to be written to its stream; `None` once it ended.
    pub(crate) fn flow_send_queued(&self, flow: FlowId) -> Option<usize> {
        self.flows.send_queued(flow)
    }

    /// The largest message the other side of an open flow accepts.
    pub(crate) fn flow_peer_max_message(&self, flow: FlowId) -> Option<u64> {
        self.flows.peer_max_message(flow)
    }

    /// Moves a flow's received messages to `into` (see
    /// [`Flows::take_received`](crate::flow::Flows::take_received)).
    pub(crate) fn take_received(&mut self, flow: FlowId, into: &mut RecvQueue) {
        self.flows.take_received(flow, into);
    }

    /// See [`Flows::let_reader_cut`](crate::flow::Flows::let_reader_cut).
    pub(crate) fn flow_let_reader_cut(&mut self, flow: FlowId) {
        self.flows.let_reader_cut(flow);
    }

    /// Whether a flow's receive buffer is full (it reads on after a release).
    pub(crate) fn flow_recv_full(&self, flow: FlowId) -> bool {
        self.flows.recv_full(flow)
    }

    /// Gives back `bytes` of a flow's receive buffer taken with
    /// [`take_received`](Self::take_received); what it causes is done by the next
    /// [`poll_transmit`](Self::poll_transmit).
    pub(crate) fn release_received(&mut self, now: Instant, flow: FlowId, bytes: usize) {
        self.flows
            .release_received(now, &mut self.transport, &self.registry, flow, bytes);
        self.work_pending = true;
    }

    /// Sends a message without checking the peer's announced maximum size, so tests can check that
    /// the receiver enforces it. Applications use [`send`](Self::send).
    #[doc(hidden)]
    pub fn send_unchecked(&mut self, flow: FlowId, message: Bytes) -> Result<(), FlowError> {
        let r = self.flows.send(flow, message, false);
        self.work_pending = true;
        r
    }

    /// Takes the next message of a flow.
    pub fn recv(&mut self, now: Instant, flow: FlowId) -> Result<Recv, FlowError> {
        self.recv_batch(now, flow, &mut VecDeque::new(), 0)
    }

    /// Like [`recv`](Self::recv), but also moves up to `max_more` further queued messages, in
    /// order, into `more`: a reader taking many queued messages then causes one round of packets
    /// (flow credit for the peer), not one per message.
    pub fn recv_batch(
        &mut self,
        now: Instant,
        flow: FlowId,
        more: &mut VecDeque<Bytes>,
        max_more: usize,
    ) -> Result<Recv, FlowError> {
        let mut queued = RecvQueue::default();
        let r = self.recv_queued(now, flow, &mut queued, max_more);
        more.extend(std::iter::from_fn(|| queued.pop_front()));
        r
    }

    /// Like [`recv_batch`](Self::recv_batch), but moves further messages as they are queued
    /// (runs of frames, cut into messages by whoever takes them): the fabric's readers.
    pub(crate) fn recv_queued(
        &mut self,
        now: Instant,
        flow: FlowId,
        more: &mut RecvQueue,
        max_more: usize,
    ) -> Result<Recv, FlowError> {
        let r = self.flows.recv(
            now,
            &mut self.transport,
            &self.registry,
            flow,
            more,
            max_more,
        );
        if self.flows.needs_flush() || self.transport.needs_flush() {
            self.work_pending = true;
        }
        r
    }

    /// Whether an input left work that only [`poll_transmit`](Self::poll_transmit) does. A
    /// runtime that drives the node from several tasks (one reads a flow, another owns the
    /// socket) uses it to wake the task that polls; a single loop simply drains `poll_transmit`
    /// after every input.
    pub fn has_pending_work(&self) -> bool {
        self.work_pending || self.transport.needs_flush() || self.flows.needs_flush()
    }

    /// Finishes the sending side: everything sent is delivered, then the other side sees the end.
    pub fn finish(&mut self, flow: FlowId) -> Result<(), FlowError> {
        let _span = self.span.clone().entered();
        let r = self.flows.finish(&mut self.transport, flow);
        self.work_pending = true;
        r
    }

    /// Aborts a flow both ways; the other side sees `ResetCode::Application(code)`.
    pub fn reset(&mut self, flow: FlowId, code: u32) -> Result<(), FlowError> {
        let _span = self.span.clone().entered();
        let r = self
            .flows
            .reset(&mut self.transport, flow, ResetCode::Application(code));
        self.work_pending = true;
        r
    }

    /// Aborts a flow the application dropped without finishing it: the other side sees
    /// `ResetCode::Dropped`.
    pub fn drop_flow(&mut self, flow: FlowId) {
        let _span = self.span.clone().entered();
        let _ = self
            .flows
            .reset(&mut self.transport, flow, ResetCode::Dropped);
        self.work_pending = true;
    }

    /// Releases a flow the application dropped after finishing it: what it sent is still
    /// delivered, what still arrives is read and discarded, and the flow ends when the peer
    /// finishes.
    pub fn release_flow(&mut self, now: Instant, flow: FlowId) {
        let _span = self.span.clone().entered();
        self.flows
            .release(now, &mut self.transport, &self.registry, flow);
        self.work_pending = true;
    }

    /// The flow limits this node runs with.
    pub fn flow_limits(&self) -> &FlowLimits {
        self.flows.limits()
    }

    /// Flows open on this node.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The node at the other end of `flow` (`None` once it ended).
    pub fn flow_peer(&self, flow: FlowId) -> Option<&str> {
        self.flows.peer(flow)
    }

    /// Buffer levels of one flow (`None` once it ended).
    pub fn flow_stats(&self, flow: FlowId) -> Option<FlowStats> {
        self.flows.stats(flow)
    }

    /// Signs a record of this node and queues it for gossip, keyed so that a newer record
    /// replaces it.
    fn announce(&mut self, record: &Record) {
        let signed = self.membership.sign(ClaimKind::Record, &record.to_wire());
        self.announce_signed(record, signed);
    }

    /// Queues `record`, signed as `signed`, for gossip and the next push-pull.
    fn announce_signed(&mut self, record: &Record, signed: Option<wire::Signed>) {
        self.registry_dirty = true;
        let Some(signed) = signed else {
            return;
        };
        self.table_mut(record.kind)
            .set_signature(record, signed.clone());
        let delta = wire::RegistryDelta {
            records: vec![signed],
        };
        // An endpoint record is at most two 128-byte names and a few integers: far below the
        // broadcast limit. A key/value entry was checked to fit before it was written.
        if let Err(e) = self.membership.broadcast_app(
            Bytes::from(record.gossip_key()),
            Bytes::from(delta.encode_to_vec()),
        ) {
            debug!(error = %e, "record not gossiped; push-pull carries it");
        }
    }

    /// Writes a key/value entry: checked against the table's limits, signed, and refused with
    /// [`RegistryError::ValueTooLarge`] if the signed entry would not fit one gossip item
    /// (`max_app_broadcast_size`), then announced.
    fn kv_write(
        &mut self,
        now: Instant,
        key: &str,
        value: Bytes,
        durable: bool,
    ) -> Result<(), RegistryError> {
        let _span = self.span.clone().entered();
        let value_len = value.len();
        let record = self.kv.prepare_write(key, value, durable)?;
        let signed = self.membership.sign(ClaimKind::Record, &record.to_wire());
        if let Some(signed) = &signed {
            let delta = wire::RegistryDelta {
                records: vec![signed.clone()],
            };
            let size = record.gossip_key().len() + delta.encoded_len();
            let limit = self.membership.config().max_app_broadcast_size;
            if size > limit {
                return Err(RegistryError::ValueTooLarge {
                    len: value_len,
                    limit: value_len.saturating_sub(size - limit),
                });
            }
        }
        self.kv.commit_write(record.clone(), now);
        self.announce_signed(&record, signed);
        self.work_pending = true;
        Ok(())
    }

    /// Merges a signed record from a peer: taken only from its owner, a current member, and
    /// checked for news before its signature. Returns the record and its envelope (copied out of
    /// the received buffer) when it changed the directory, for the caller to pass on.
    fn merge_signed_record(
        &mut self,
        now: Instant,
        signed: &wire::Signed,
        via: Merge,
    ) -> Option<(Record, wire::Signed)> {
        let Some(record) = wire::EndpointRecord::decode(&signed.body[..])
            .ok()
            .as_ref()
            .and_then(Record::from_wire)
        else {
            self.undecodable += 1;
            return None;
        };
        // From a push-pull, a tombstone that withdraws nothing held here is left out (see
        // `Registry::tombstone_applies`). Fresh withdrawals reach every node by gossip; a stale
        // claim that arrives later is withdrawn again by a node that still holds the tombstone,
        // or by its owner.
        if via == Merge::PushPull
            && !record.claimed
            && !self.table(record.kind).tombstone_applies(&record)
        {
            return None;
        }
        if record.owner == self.name() {
            // A record of ours we did not write (a previous life's, signed with the same key):
            // the directory out-writes it with the current state. Only our own signature counts,
            // or any member could make this node rewrite its records at will.
            let name = self.name().to_owned();
            if self.membership.verify(&name, ClaimKind::Record, signed) {
                // Corrections go to the outbox, announced like any write of ours.
                self.table_mut(record.kind).merge(record, now);
            }
            return None;
        }
        if !self.membership.is_current_member(&record.owner) {
            // Records of nodes that are not (or no longer) members are not taken, but one may
            // have overtaken its owner's alive (a new member, or one back from the dead): held
            // until that alive comes, and dropped if it does not.
            self.hold_for_owner(now, record.owner, signed);
            return None;
        }
        if !self.table(record.kind).is_news(&record)
            || !self
                .membership
                .verify(&record.owner, ClaimKind::Record, signed)
        {
            return None;
        }
        let signed = claims::compact(signed);
        let merged = self
            .table_mut(record.kind)
            .merge_signed(record.clone(), signed.clone(), now);
        self.registry_dirty |= merged;
        merged.then_some((record, signed))
    }

    /// Holds a record until its owner's alive arrives (bounded, oldest dropped first).
    fn hold_for_owner(&mut self, now: Instant, owner: String, signed: &wire::Signed) {
        while self
            .awaiting_owner
            .front()
            .is_some_and(|(_, at, _)| now.saturating_duration_since(*at) >= RECORD_HOLD_TIME)
        {
            self.awaiting_owner.pop_front();
            self.records_held_dropped += 1;
        }
        if self.awaiting_owner.len() >= RECORDS_AWAITING_OWNER {
            self.awaiting_owner.pop_front();
            self.records_held_dropped += 1;
        }
        self.records_held += 1;
        self.awaiting_owner
            .push_back((owner, now, claims::compact(signed)));
    }

    /// `owner` became a member: merge the records held for it, and pass on what was news.
    fn release_held_records(&mut self, now: Instant, owner: &str) {
        if !self.awaiting_owner.iter().any(|(o, _, _)| o == owner) {
            return;
        }
        let (mine, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.awaiting_owner)
            .into_iter()
            .partition(|(o, _, _)| o == owner);
        self.awaiting_owner = rest;
        for (_, at, signed) in mine {
            if now.saturating_duration_since(at) >= RECORD_HOLD_TIME {
                self.records_held_dropped += 1;
                continue;
            }
            if let Some((record, signed)) = self.merge_signed_record(now, &signed, Merge::Gossip) {
                self.gossip_record(&record, signed);
            }
        }
    }

    fn handle_registry_gossip(&mut self, now: Instant, key: Bytes, payload: Bytes) {
        if !key.starts_with(b"r/") && !key.starts_with(b"k/") {
            return;
        }
        let Ok(delta) = wire::RegistryDelta::decode(payload.clone()) else {
            self.undecodable += 1;
            return;
        };
        for signed in &delta.records {
            // Epidemic spread: pass on what was news here, rebuilt from the checked record
            // (never the sender's key or the rest of its payload), to nodes other than its owner.
            if let Some((record, signed)) = self.merge_signed_record(now, signed, Merge::Gossip) {
                self.gossip_record(&record, signed);
            }
        }
    }

    /// Merges a peer's full directory from a push-pull. What was news and is the peer's own
    /// (first-hand: a joiner's endpoints, say) is passed on by gossip too, so that it does not
    /// wait for other push-pulls to spread; news of third parties is not, or a joiner's first
    /// exchange would flood the cluster with the whole table.
    fn handle_registry_state(&mut self, now: Instant, from: &str, state: Bytes) {
        let Ok(state) = wire::RegistryState::decode(state) else {
            self.undecodable += 1;
            return;
        };
        for signed in &state.records {
            if let Some((record, signed)) = self.merge_signed_record(now, signed, Merge::PushPull) {
                if record.owner == from {
                    self.gossip_record(&record, signed);
                }
            }
        }
    }

    /// Queues a peer's signed record for gossip, as received.
    fn gossip_record(&mut self, record: &Record, signed: wire::Signed) {
        let delta = wire::RegistryDelta {
            records: vec![signed],
        };
        let _ = self.membership.broadcast_app_about(
            Bytes::from(record.gossip_key()),
            Bytes::from(delta.encode_to_vec()),
            Some(&record.owner),
        );
    }

    /// Reacts to membership news in the directory, then passes the event on.
    fn handle_membership_event(&mut self, now: Instant, event: membership::Event) {
        use membership::Event as M;
        log_membership_event(&event);
        match &event {
            M::LeaveComplete => self.transport.close_all(now),
            M::MemberDead { name, incarnation } | M::MemberLeft { name, incarnation } => {
                self.registry.drop_owner(name, *incarnation, now);
                self.adopt_durable_entries(now, name);
                self.kv.drop_owner(name, *incarnation, now);
                self.registry_dirty = true;
                self.flows.on_peer_gone(&mut self.transport, name);
                self.transport.close_peer(now, name);
            }
            M::MemberJoined(m) | M::MemberAlive(m) | M::MemberUpdated(m) => {
                if matches!(event, M::MemberJoined(_)) {
                    self.registry.owner_returned(&m.name, m.incarnation);
                    self.kv.owner_returned(&m.name, m.incarnation);
                    self.release_held_records(now, &m.name);
                } else {
                    self.registry.owner_alive(&m.name, m.incarnation);
                    self.kv.owner_alive(&m.name, m.incarnation);
                }
                // A member that moved (it restarted elsewhere): its old address is gone.
                self.transport.close_peer_elsewhere(now, &m.name, m.addr);
            }
            M::Refuted { incarnation } => {
                self.registry.set_local_incarnation(*incarnation, now);
                self.kv.set_local_incarnation(*incarnation, now);
            }
            M::AppBroadcast { key, payload } => {
                return self.handle_registry_gossip(now, key.clone(), payload.clone());
            }
            M::AppState { from, state } => {
                return self.handle_registry_state(now, from, state.clone());
            }
            _ => {}
        }
        self.events.push_back(Event::Membership(event));
    }

    /// Counters.
    pub fn stats(&self) -> NodeStats {
        NodeStats {
            membership: self.membership.stats(),
            transport: self.transport.stats.clone(),
            undecodable: self.undecodable,
            records_held: self.records_held,
            records_held_dropped: self.records_held_dropped,
            datagrams: self.datagrams.stats(),
        }
    }

    /// Streams held on this node's connections, for leak checks and monitoring (it walks every
    /// connection: not for a hot path).
    pub fn stream_stats(&mut self) -> StreamStats {
        self.transport.stream_stats()
    }

    /// QUIC connections this node holds, in any state: in their handshake, established, or
    /// closed and draining for a few round trips.
    pub fn connection_count(&self) -> usize {
        self.transport.connection_count()
    }

    /// QUIC connections closed and draining: freed within a few round trips, and not counted
    /// against `TransportLimits::max_connections`. It walks every connection: not for a hot
    /// path.
    pub fn closing_connection_count(&self) -> usize {
        self.transport.closing_connection_count()
    }

    /// Joins the cluster through the configured seeds plus `extra_seeds`.
    pub fn join(&mut self, now: Instant, extra_seeds: &[SocketAddr]) {
        let _span = self.span.clone().entered();
        let mut seeds = self.seeds.clone();
        seeds.extend_from_slice(extra_seeds);
        if self.registry_dirty {
            self.encode_app_state(now);
        }
        self.membership.join(now, &seeds);
        self.work_pending = true;
    }

    /// Starts a graceful shutdown: new flows are refused (dials here fail, dials from peers are
    /// rejected with `RejectReason::ShuttingDown`), every local endpoint is withdrawn (its
    /// tombstone spreads at once) and its accept backlog reset; open flows carry on. Then
    /// [`leave`](Self::leave) once they ended or a grace period passed.
    pub fn stop_accepting(&mut self, now: Instant) {
        let _span = self.span.clone().entered();
        self.flows.stop_accepting();
        let local: Vec<String> = self
            .registry
            .names("")
            .into_iter()
            .filter(|n| self.registry.is_local(n))
            .map(str::to_owned)
            .collect();
        for name in local {
            let _ = self.unregister_endpoint(now, &name);
        }
        self.work_pending = true;
    }

    /// Leaves the cluster gracefully; connections close once the announcement has spread
    /// ([`membership::Event::LeaveComplete`]).
    pub fn leave(&mut self, now: Instant) {
        let _span = self.span.clone().entered();
        self.flows.shut_down(&mut self.transport);
        self.membership.leave(now);
        self.work_pending = true;
    }

    /// Keeps the QUIC connection to node `name` open while held, even when membership has nothing to
    /// say to it (flows hold the connection they run on). Each call with `hold = true` must be
    /// matched by one with `false`. Returns false if there is no connection to `name` yet.
    pub fn hold_connection(&mut self, now: Instant, name: &str, hold: bool) -> bool {
        let held = self.transport.hold(now, name, hold);
        self.work_pending = true;
        held
    }

    /// Sends `payload` as a raw membership datagram to node `name` at `addr`, bypassing the
    /// membership state machine. It exists so tests and tools can check what peers do with crafted
    /// or hostile packets; an application never needs it.
    #[doc(hidden)]
    pub fn send_raw_membership_datagram(
        &mut self,
        now: Instant,
        name: &str,
        addr: SocketAddr,
        payload: Bytes,
    ) {
        self.transport.send_datagram(now, Some(name), addr, payload);
        self.work_pending = true;
    }

    /// Signs `claim`, a claim of `kind`, with this node's key, as the node signs its own. It
    /// exists so tests and tools can craft the claims a hostile member could send (signed by
    /// itself, about anyone); an application never needs it.
    #[doc(hidden)]
    pub fn sign_claim(&mut self, kind: ClaimKind, claim: &impl Message) -> Option<wire::Signed> {
        self.membership.sign(kind, claim)
    }

    /// Records one UDP datagram received from `from`; the connection it belongs to is driven at
    /// the next [`poll_transmit`](Self::poll_transmit), so a batch of datagrams read in one system
    /// call (GRO, `recvmmsg`) costs one round of acknowledgements and events instead of one per
    /// datagram. Nothing a peer sends can make this panic.
    ///
    /// The datagram is taken as it is, without a copy: datagrams split from one receive buffer
    /// (`BytesMut::split_to`) share its allocation, and what they carry reaches the application
    /// as slices of it.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: BytesMut) {
        self.transport.handle_udp(now, from, data);
        self.work_pending = true;
    }

    /// Lets one [`Transmit`] carry up to `segments` datagrams to the same destination, for a
    /// socket with segmentation offload (GSO). The default, 1, suits a plain `send_to`. A
    /// transmit also stays within 65,000 bytes, which the kernel requires of one segmented send
    /// (7 packets once discovery reached 8952 bytes).
    pub fn set_max_transmit_segments(&mut self, segments: usize) {
        self.transport.set_max_transmit_segments(segments);
    }

    /// Runs every timer due at `now`; spurious calls are harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        let _span = self.span.clone().entered();
        self.transport.handle_timeout(now);
        self.flows.handle_timeout(now, &mut self.transport);
        for table in [&mut self.registry, &mut self.kv] {
            if table.poll_timeout().is_some_and(|t| t <= now) {
                let before = table.generation();
                table.handle_timeout(now);
                self.registry_dirty |= table.generation() != before;
            }
        }
        // Due here, not only when packets are built: a driver whose send queue is full does
        // not build any, and the deadline must not stay in the past.
        if self.app_state_due().is_some_and(|at| at <= now) {
            self.encode_app_state(now);
        }
        if self.membership.poll_timeout().is_some_and(|t| t <= now) {
            self.membership.handle_timeout(now);
        }
        self.work_pending = true;
    }

    /// Does the work the inputs since the last call recorded, at `now`, and returns the next UDP
    /// datagrams to send. Call it until it returns `None` after every input (or batch of
    /// inputs); then [`poll_event`](Self::poll_event) and [`poll_timeout`](Self::poll_timeout)
    /// are up to date. Packets are built in batches as this is drained, so the work of one call
    /// stays bounded however much a flow has queued.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.transport.poll_transmit() {
            return Some(t);
        }
        if !self.has_pending_work() {
            return None;
        }
        self.work_pending = false;
        let _span = self.span.clone().entered();
        self.pump(now);
        self.transport.poll_transmit()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called. Read it after draining
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        [
            self.membership.poll_timeout(),
            self.transport.poll_timeout(),
            self.registry.poll_timeout(),
            self.kv.poll_timeout(),
            self.flows.poll_timeout(),
            self.app_state_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event. Events are raised while [`poll_transmit`](Self::poll_transmit) does the
    /// work of the inputs: drain that first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Moves messages between the transport and membership until both are quiet.
    fn pump(&mut self, now: Instant) {
        // Messages queued by `send_deferred` go to their streams, one write per flow.
        self.flows.flush_sends(&mut self.transport);
        // Events raised since the last pump (a dial's stream opened) are handled before any
        // packet is built: a request's open, message and end then leave in one packet with the
        // stream's first byte, not after a packet carrying that byte alone.
        self.handle_transport_events(now);
        loop {
            // Connections first: deferred datagrams and sends become events and packets here.
            self.transport.flush(now);
            let mut progressed = self.handle_transport_events(now);
            while let Some(t) = self.membership.poll_outgoing() {
                progressed = true;
                self.route(now, t);
            }
            while let Some(event) = self.membership.poll_event() {
                progressed = true;
                self.handle_membership_event(now, event);
            }
            while let Some(record) = self
                .registry
                .poll_outgoing()
                .or_else(|| self.kv.poll_outgoing())
            {
                progressed = true;
                self.announce(&record);
            }
            while let Some(event) = self.registry.poll_event() {
                progressed = true;
                if let RegistryEvent::NameConflict { name, .. } = &event {
                    debug!(endpoint = %name, "endpoint lost to a name conflict");
                    self.flows.on_endpoint_closed(
                        &mut self.transport,
                        name,
                        ResetCode::NameConflict,
                    );
                }
                self.events.push_back(Event::Registry(event));
            }
            while let Some(event) = self.flows.poll_event() {
                progressed = true;
                self.events.push_back(Event::Flow(event));
            }
            if self.app_state_due().is_some_and(|at| at <= now) {
                self.encode_app_state(now);
            }
            if !progressed {
                break;
            }
        }
    }

    /// Handles the transport's events; returns whether there were any.
    fn handle_transport_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(event) = self.transport.poll_event() {
            any = true;
            self.handle_transport_event(now, event);
        }
        any
    }

    fn route(&mut self, now: Instant, t: membership::Outgoing) {
        match t.channel {
            Channel::Datagram => self.transport.send_datagram(
                now,
                t.dst_name.as_deref(),
                t.dst,
                Bytes::from(t.payload),
            ),
            Channel::Stream => {
                self.transport
                    .send_request(now, t.dst_name.as_deref(), t.dst, &t.payload)
            }
            // Replies are routed in `handle_transport_event`, right after the request.
            Channel::StreamReply => trace!("dropping a push-pull reply with no request stream"),
        }
    }

    /// Decodes a push-pull message from `conn`, checks that its sender is the connection's
    /// authenticated peer and that it is what its stream says (a request, or the `reply` to
    /// one), and hands it to membership. Returns whether it was delivered.
    fn deliver_push_pull(
        &mut self,
        now: Instant,
        conn: quinn_proto::ConnectionHandle,
        data: Bytes,
        reply: bool,
    ) -> bool {
        let Ok(pp) = wire::PushPull::decode(data) else {
            self.undecodable += 1;
            return false;
        };
        if pp.reply != reply {
            self.undecodable += 1;
            return false;
        }
        if !self.transport.authenticate(conn, &pp.sender) {
            return false;
        }
        let Some((_, addr)) = self.transport.peer_of(conn) else {
            return false;
        };
        // An answer (a joiner's, say) carries the state as it is now.
        if self.registry_dirty {
            self.encode_app_state(now);
        }
        self.membership.handle_push_pull(now, addr, pp);
        true
    }

    /// When the push-pull state must be encoded again, if it changed.
    fn app_state_due(&self) -> Option<Instant> {
        self.registry_dirty
            .then(|| self.app_state_encoded_at + APP_STATE_INTERVAL)
    }

    /// Encodes the directory and the key/value table for push-pull.
    fn encode_app_state(&mut self, now: Instant) {
        self.registry_dirty = false;
        self.app_state_encoded_at = now;
        let mut state = self.registry.to_wire();
        state.records.extend(self.kv.to_wire().records);
        self.membership
            .set_app_state(Bytes::from(state.encode_to_vec()));
    }

    fn handle_transport_event(&mut self, now: Instant, event: TransportEvent) {
        match event {
            TransportEvent::Datagram { conn, data } => {
                if crate::datagram::is_app_datagram(&data) {
                    return self.deliver_datagram(conn, data);
                }
                let Ok(packet) = self.membership.decode_packet(data) else {
                    self.undecodable += 1;
                    return;
                };
                // First-hand rule: a peer speaks only for itself.
                if !self.transport.authenticate(conn, &packet.sender) {
                    debug!(claimed = %packet.sender, "dropping a packet whose sender is not the authenticated peer");
                    return;
                }
                let Some((_, addr)) = self.transport.peer_of(conn) else {
                    return;
                };
                // Gossip leans towards members with an open connection.
                self.membership.set_connected(&packet.sender, true);
                self.membership.handle_packet(now, addr, packet);
            }
            TransportEvent::StreamRequest { conn, stream, data } => {
                let mut replied = false;
                if self.deliver_push_pull(now, conn, data, false) {
                    // The reply is produced during that call; send it back on the request's
                    // stream.
                    let mut others = Vec::new();
                    while let Some(t) = self.membership.poll_outgoing() {
                        if t.channel == Channel::StreamReply && !replied {
                            self.transport.send_reply(conn, stream, &t.payload);
                            replied = true;
                        } else if t.channel != Channel::StreamReply {
                            others.push(t);
                        }
                    }
                    for t in others {
                        self.route(now, t);
                    }
                }
                if !replied {
                    // Refused or unanswerable: release the stream, or the requester's stream
                    // credit leaks.
                    self.transport.abort_stream(
                        conn,
                        stream,
                        wire::StreamErrorCode::ProtocolViolation as u64,
                    );
                }
            }
            TransportEvent::StreamReply { conn, data } => {
                self.deliver_push_pull(now, conn, data, true);
            }
            TransportEvent::FlowStreamOpened {
                token,
                conn,
                stream,
            } => self
                .flows
                .on_stream_opened(now, &mut self.transport, token, conn, stream),
            TransportEvent::FlowStreamOpenFailed { token } => self.flows.on_open_failed(token),
            TransportEvent::FlowIncoming { conn, stream } => {
                self.flows
                    .on_incoming(now, &mut self.transport, conn, stream);
                self.flows
                    .on_readable(now, &mut self.transport, &self.registry, conn, stream);
            }
            TransportEvent::FlowReadable { conn, stream } => {
                self.flows
                    .on_readable(now, &mut self.transport, &self.registry, conn, stream)
            }
            TransportEvent::FlowWritable { conn, stream } => {
                self.flows.on_writable(&mut self.transport, conn, stream)
            }
            TransportEvent::FlowStopped { conn, stream, code } => {
                self.flows
                    .on_stopped(&mut self.transport, conn, stream, code)
            }
            TransportEvent::Lost {
                conn,
                name,
                addr,
                handshake_failed,
            } => {
                self.flows.on_connection_lost(&mut self.transport, conn);
                if let Some(name) = name.as_deref() {
                    if !self.transport.is_connected_to(name) {
                        self.membership.set_connected(name, false);
                    }
                }
                self.events.push_back(Event::ConnectionLost {
                    name,
                    addr,
                    handshake_failed,
                });
            }
        }
    }
}

/// One debug event per member state change (application payloads only at trace level).
fn log_membership_event(event: &membership::Event) {
    use membership::Event as M;
    match event {
        M::Joined => debug!("joined the cluster"),
        M::MemberJoined(m) => {
            debug!(member = %m.name, addr = %m.addr, incarnation = m.incarnation, "member joined")
        }
        M::MemberAlive(m) => {
            debug!(member = %m.name, incarnation = m.incarnation, "member alive again")
        }
        M::MemberUpdated(m) => {
            debug!(member = %m.name, addr = %m.addr, incarnation = m.incarnation, "member updated")
        }
        M::MemberSuspect { name, incarnation } => {
            debug!(member = %name, incarnation, "member suspected")
        }
        M::MemberDead { name, incarnation } => {
            debug!(member = %name, incarnation, "member declared dead")
        }
        M::MemberLeft { name, incarnation } => debug!(member = %name, incarnation, "member left"),
        M::Refuted { incarnation } => debug!(incarnation, "refuted a suspicion of this node"),
        M::LeaveComplete => debug!("leave announced: closing connections"),
        M::AppBroadcast { key, .. } => trace!(?key, "directory gossip"),
        M::AppState { .. } => trace!("directory state from a push-pull"),
    }
}

/// Why a node or an endpoint is gone, as a monitor reports it (see
/// [`Node::member_down_reason`] and [`Node::owner_down_reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownReason {
    /// The node left the cluster on purpose (for an endpoint: its owner did).
    Left,
    /// The node was declared failed (for an endpoint: its owner was).
    Failed,
    /// The owner withdrew the endpoint (closed or unregistered it).
    Withdrawn,
    /// The owner's claim on the exclusive name lost to another node's.
    Conflict {
        /// The node that keeps the name.
        winner: String,
    },
    /// Nothing of that name was known when the monitor was made.
    NotFound,
    /// This node is shutting down: it can no longer tell.
    Shutdown,
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Left => f.write_str("left the cluster"),
            Self::Failed => f.write_str("declared failed"),
            Self::Withdrawn => f.write_str("withdrawn by its owner"),
            Self::Conflict { winner } => write!(f, "lost to the claim of node {winner:?}"),
            Self::NotFound => f.write_str("not known"),
            Self::Shutdown => f.write_str("this node shut down"),
        }
    }
}

/// The owners of `endpoint` whose tags match `filter` that a dial may go to: this node if it
/// is one; otherwise the live ones, or if there are none the suspected ones (a last resort:
/// they may still answer). `NoSuchEndpoint` if there are none of either.
///
/// A function of the node's fields it reads, so that the node's random generator can pick among
/// the owners while they are borrowed.
fn owners_to_use<'a>(
    registry: &'a Registry,
    membership: &Membership,
    endpoint: &str,
    filter: &TagFilter,
) -> Result<Owners<'a>, FlowError> {
    let mut owners = registry.resolve(endpoint);
    if !filter.is_empty() {
        owners.retain(|o| tags_match(membership, o, filter));
    }
    if owners.contains(&membership.local_name()) {
        return Ok(Owners::Local);
    }
    let states: SmallVec<[Option<MemberState>; 4]> =
        owners.iter().map(|o| membership.member_state(o)).collect();
    let alive = |s: &Option<MemberState>| *s == Some(MemberState::Alive);
    let not_gone = |s: &Option<MemberState>| {
        s.is_some_and(|s| !matches!(s, MemberState::Dead | MemberState::Left))
    };
    let usable: &dyn Fn(&Option<MemberState>) -> bool = if states.iter().any(alive) {
        &alive
    } else {
        &not_gone
    };
    let mut usable_states = states.iter();
    owners.retain(|_| usable_states.next().is_some_and(usable));
    if owners.is_empty() {
        return Err(FlowError::NoSuchEndpoint {
            name: endpoint.to_owned(),
        });
    }
    Ok(Owners::Remote(owners))
}

/// See [`Node::tags_match`].
fn tags_match(membership: &Membership, node: &str, filter: &TagFilter) -> bool {
    filter.is_empty()
        || if node == membership.local_name() {
            filter.matches(&Tags::decode(membership.local_meta()))
        } else {
            membership
                .member_meta(node)
                .is_some_and(|meta| filter.matches(&Tags::decode(&meta)))
        }
}

/// Where the datagrams of one name go, in [`Node::send_datagrams`].
enum DatagramRoute {
    /// No owner to send to: dropped.
    Nowhere,
    /// This node serves it.
    Local,
    /// Its owners and their addresses; one is picked per datagram.
    Remote(Vec<(String, SocketAddr)>),
}

/// Whether this node serves the endpoint the last datagram arrived for, as of a generation of
/// the directory ([`Registry::generation`]).
#[derive(Debug, Default)]
struct LastDatagramEndpoint {
    /// `None`: nothing known yet.
    generation: Option<u64>,
    name: String,
    served: bool,
}

/// The owners a dial may go to (see [`owners_to_use`]).
enum Owners<'a> {
    Local,
    /// At least one.
    Remote(Vec<&'a str>),
}

/// Where a dial goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This node serves the endpoint: connect in-process.
    Local,
    /// A remote owner.
    Remote {
        /// The owner's node name.
        node: String,
    },
}

#[cfg(all(test, feature = "dev-certs"))]
mod tests {
    use super::*;
    use crate::tls::dev::DevCa;
    use std::time::Duration;

    fn config(name: &str, bind: &str) -> NodeConfig {
        let ca = DevCa::new().unwrap();
        NodeConfig::new(name, bind.parse().unwrap(), ca.issue(name).unwrap())
    }

    #[test]
    fn invalid_configurations_are_typed_errors() {
        let now = Instant::now();
        let c = config("node-a", "0.0.0.0:7000");
        let err = Node::new(c, 1, now).unwrap_err();
        assert!(
            matches!(err, NodeError::Config(NodeConfigError::Advertise { .. })),
            "{err}"
        );

        let mut c = config("node-a", "0.0.0.0:7000");
        c.advertise = Some("10.1.2.3:7000".parse().unwrap());
        assert!(
            c.validate().is_ok(),
            "a wildcard bind with a concrete advertise address"
        );

        let c = config("node-a", "127.0.0.1:0");
        assert!(matches!(
            c.validate(),
            Err(NodeConfigError::Advertise { .. })
        ));

        let mut c = config("node-a", "127.0.0.1:7000");
        c.seeds = vec!["0.0.0.0:7001".parse().unwrap()];
        assert!(matches!(c.validate(), Err(NodeConfigError::Seed { .. })));

        // Every profile is valid as given: the packet budget is fitted to a QUIC datagram.
        for profile in [
            membership::Config::lan(),
            membership::Config::wan(),
            membership::Config::local(),
        ] {
            let mut c = config("node-a", "127.0.0.1:7000");
            c.membership = profile;
            c.validate().unwrap();
            assert_eq!(
                c.membership_config().max_packet_size,
                MEMBERSHIP_PACKET_BUDGET
            );
        }
        let mut c = config("node-a", "127.0.0.1:7000");
        c.membership.max_packet_size = 600;
        assert_eq!(c.membership_config().max_packet_size, 600);

        // Durations that would overflow a deadline are refused, not panicked on later.
        let mut c = config("node-a", "127.0.0.1:7000");
        c.flows.shutdown_grace = std::time::Duration::MAX;
        assert!(matches!(
            c.validate(),
            Err(NodeConfigError::DurationTooLong {
                field: "flows.shutdown_grace",
                ..
            })
        ));
        let mut c = config("node-a", "127.0.0.1:7000");
        c.membership.leave_timeout = std::time::Duration::MAX;
        assert!(matches!(
            c.validate(),
            Err(NodeConfigError::Membership(
                membership::ConfigError::DurationTooLong {
                    field: "leave_timeout",
                    ..
                }
            ))
        ));
        let mut c = config("node-a", "127.0.0.1:7000");
        c.transport.exchange_timeout = membership::MAX_SETTING_DURATION;
        c.validate().unwrap();

        // The largest UDP payload: QUIC's 1200 bytes up to what IPv6 carries, over the whole
        // range of a u16.
        let base = config("node-a", "127.0.0.1:7000");
        for value in 0..=u16::MAX {
            let mut c = base.clone();
            c.transport.max_udp_payload = value;
            let valid = (1200..=65527).contains(&value);
            match c.validate() {
                Ok(()) => assert!(valid, "{value} accepted"),
                Err(NodeConfigError::UdpPayload { value: v }) => {
                    assert!(!valid && v == value, "{value} refused")
                }
                Err(e) => panic!("{value}: {e}"),
            }
        }
        for value in [1200, 8952, 65527] {
            let mut c = base.clone();
            c.transport.max_udp_payload = value;
            Node::new(c, 1, now).expect("a node with any valid payload bound");
        }

        let mut c = config("node-a", "[::1]:7000");
        c.name = "node-b".into();
        let err = Node::new(c, 1, now).unwrap_err();
        assert!(
            matches!(err, NodeError::Tls(tls::TlsError::NameMismatch { .. })),
            "{err}"
        );

        let c = config("bad name", "127.0.0.1:7000");
        assert!(matches!(c.validate(), Err(NodeConfigError::Name(_))));
    }

    #[test]
    fn ipv6_nodes_work() {
        let now = Instant::now();
        let c = config("node-a", "[::1]:7000");
        let mut node = Node::new(c, 1, now).unwrap();
        assert_eq!(node.local_addr(), "[::1]:7000".parse().unwrap());
        node.join(now, &["[::1]:7001".parse().unwrap()]);
        let t = node
            .poll_transmit(now)
            .expect("a QUIC Initial towards the seed");
        assert_eq!(t.destination, "[::1]:7001".parse().unwrap());
        assert!(
            t.contents.len() >= 1200,
            "QUIC Initials are padded to 1200 bytes"
        );
    }

    /// Delivers every packet between two nodes instantly until `until`, following their timers.
    fn run_pair(a: &mut Node, b: &mut Node, mut now: Instant, until: Instant) -> Instant {
        loop {
            let mut moved = false;
            while let Some(t) = a.poll_transmit(now) {
                moved = true;
                if t.destination == b.local_addr() {
                    b.handle_datagram(now, a.local_addr(), t.contents.as_slice().into());
                }
            }
            while let Some(t) = b.poll_transmit(now) {
                moved = true;
                if t.destination == a.local_addr() {
                    a.handle_datagram(now, b.local_addr(), t.contents.as_slice().into());
                }
            }
            if moved {
                continue;
            }
            let next = [a.poll_timeout(), b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= until => {
                    now = t.max(now);
                    a.handle_timeout(now);
                    b.handle_timeout(now);
                }
                _ => return until,
            }
        }
    }

    #[test]
    fn idle_connections_close_and_held_ones_stay_open() {
        let ca = DevCa::new().unwrap();
        let t0 = Instant::now();
        let make = |name: &str, port: u16| {
            let c = NodeConfig::new(
                name,
                SocketAddr::from(([127, 0, 0, 1], port)),
                ca.issue(name).unwrap(),
            );
            Node::new(c, u64::from(port), t0).unwrap()
        };
        let idle = TransportLimits::default().idle_timeout;
        for hold in [false, true] {
            let (mut a, mut b) = (make("node-a", 7001), make("node-b", 7002));
            // A connection with no membership traffic on it: raw bytes B's membership ignores.
            a.send_raw_membership_datagram(t0, "node-b", b.local_addr(), Bytes::from_static(b"?"));
            let now = run_pair(&mut a, &mut b, t0, t0 + Duration::from_secs(1));
            assert_eq!((a.connection_count(), b.connection_count()), (1, 1));
            if hold {
                assert!(a.hold_connection(now, "node-b", true));
            }
            run_pair(&mut a, &mut b, now, now + idle * 3);
            let expected = usize::from(hold);
            assert_eq!(a.connection_count(), expected, "hold = {hold}");
            assert_eq!(b.connection_count(), expected, "hold = {hold}");
        }
    }

    #[test]
    fn datagrams_queue_while_handshaking_and_drop_with_a_counter() {
        let now = Instant::now();
        let mut node = Node::new(config("node-a", "127.0.0.1:7000"), 1, now).unwrap();
        let peer: SocketAddr = "127.0.0.1:7999".parse().unwrap();
        let limit = TransportLimits::default().max_queued_datagrams;
        for _ in 0..limit + 10 {
            node.send_raw_membership_datagram(now, "node-b", peer, Bytes::from_static(b"x"));
        }
        assert_eq!(
            node.connection_count(),
            1,
            "one connection dialled, not one per datagram"
        );
        assert_eq!(
            node.stats().transport.datagrams_dropped,
            10,
            "beyond the queue bound"
        );
        // Nobody answers: the handshake times out and the queued datagrams are dropped and counted.
        let mut t = now;
        while node.connection_count() > 0 && t < now + Duration::from_secs(600) {
            t = node
                .poll_timeout()
                .unwrap_or(t + Duration::from_secs(1))
                .max(t);
            node.handle_timeout(t);
            while node.poll_transmit(t).is_some() {}
        }
        assert_eq!(node.connection_count(), 0);
        let stats = node.stats().transport;
        assert_eq!(stats.datagrams_dropped, limit as u64 + 10);
        assert_eq!(stats.handshakes_failed, 1);
        assert!(std::iter::from_fn(|| node.poll_event()).any(|e| matches!(
            e,
            Event::ConnectionLost {
                handshake_failed: true,
                ..
            }
        )));
    }
}
