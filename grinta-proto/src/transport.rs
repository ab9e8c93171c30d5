//! QUIC between nodes: one `quinn_proto::Endpoint` per node, one `quinn_proto::Connection` per peer.
//!
//! Connections are opened on demand, the first time something is sent to a peer; datagrams and stream
//! messages wait (bounded) while the handshake runs and are dropped with a counter if it fails.
//! Membership packets travel as QUIC DATAGRAM frames; push-pull exchanges travel on a bidirectional
//! stream (request, then the reply on the same stream). Connections that carry nothing for
//! `idle_timeout` are closed by QUIC's idle timer.
//!
//! Identity: a connection is bound to the node name its certificate proves. A dialler that knows the
//! name it means to reach has TLS verify it (SAN check); a connection accepted from a peer, or dialled
//! to a seed known only by address, is bound on its first message, to the sender name that message
//! claims, only if the peer's certificate is valid for that name. From then on every message must
//! claim that same name.
//!
//! Two nodes that dial each other at once end up with two connections. Both stay usable; each side
//! sends on the connection dialled by the node with the lower name once it is established, and the
//! other one idles out.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use hashbrown::HashMap;
use quinn_proto::{
    ClientConfig, ConnectionHandle, ConnectionId, ConnectionIdGenerator, DatagramEvent, Dir,
    Endpoint, EndpointConfig, ServerConfig, StreamEvent, StreamId, TimeSource, TransportConfig,
    VarInt,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use tracing::debug;

use crate::deadlines::Deadlines;
use crate::tls::{self, NodeTls};
use crate::wire::framing::{self, FrameDecoder};
use crate::wire::{ConnectionCloseCode, StreamErrorCode};

/// Streams a connection keeps beyond the flow limit for push-pull exchanges, so that a peer
/// at its flow limit still exchanges membership state.
pub const STREAMS_FOR_EXCHANGES: u32 = 64;

/// Concurrent bidirectional streams a peer may open on a new connection. QUIC keeps state for
/// every stream it allows at once (about 100 bytes each), so a connection starts small and its
/// allowance doubles, up to `TransportLimits::max_concurrent_streams`, whenever the peer holds
/// half of it open: a connection that only carries membership costs a few KiB, a busy one
/// grows to what its peer uses within a few round trips.
pub const INITIAL_STREAM_ALLOWANCE: u32 = 16;

/// Records that connection `ch` is bound to peer `name` (see `Transport::by_peer`).
fn index_peer(
    by_peer: &mut HashMap<String, smallvec::SmallVec<[ConnectionHandle; 2]>>,
    ch: ConnectionHandle,
    name: &str,
) {
    let chs = match by_peer.get_mut(name) {
        Some(chs) => chs,
        None => by_peer.entry_ref(name).or_default(),
    };
    if !chs.contains(&ch) {
        chs.push(ch);
    }
}

/// Records that connection `ch` is no longer bound to peer `name`.
fn unindex_peer(
    by_peer: &mut HashMap<String, smallvec::SmallVec<[ConnectionHandle; 2]>>,
    ch: ConnectionHandle,
    name: &str,
) {
    if let Some(chs) = by_peer.get_mut(name) {
        chs.retain(|c| *c != ch);
        if chs.is_empty() {
            by_peer.remove(name);
        }
    }
}

/// Transport limits and timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// Most QUIC connections open at once (in their handshake or established). At the limit, a
    /// new connection (dialled or accepted) closes the least recently used idle one (no flows,
    /// exchanges or holds); with none idle, dials fail and incoming connections are refused.
    /// A closed connection drains for a few round trips (it answers what the peer still sends
    /// with its close) and does not count against the limit; while as many as the limit (or
    /// `max_handshaking`, if more) are draining, new connections wait as at the limit.
    pub max_connections: usize,
    /// Datagrams queued per connection while its handshake runs; beyond it they are dropped.
    pub max_queued_datagrams: usize,
    /// Stream messages (push-pull) queued per connection while its handshake runs.
    pub max_queued_stream_messages: usize,
    /// Largest stream message (push-pull) accepted, in bytes.
    pub max_stream_message_size: usize,
    /// A connection that carries nothing this long is closed (30 min). A node probes each member
    /// once per round of N probe periods, so this keeps the connections a probe round uses
    /// open up to about 1,800 members: probes need no new handshakes, and the cost per node stays
    /// flat as the cluster grows. Each open connection costs about 17 KiB; `max_connections`
    /// bounds them. A connection never tied to a member (its peer crashed before saying who it
    /// was) lives this long too.
    pub idle_timeout: Duration,
    /// Most concurrent bidirectional streams a peer may open on one connection: its flows to
    /// this node plus its push-pull exchanges, so at least `FlowLimits::max_flows_per_peer` +
    /// [`STREAMS_FOR_EXCHANGES`] (checked by `NodeConfig::validate`). Default 1088.
    pub max_concurrent_streams: u32,
    /// Path MTU discovery: probes for packets larger than 1200 bytes (up to `max_udp_payload`)
    /// once a connection is up, so flows need fewer packets. Only correct when the socket forbids
    /// IP fragmentation, which the fabric's adapters check; the fabric turns it off otherwise.
    pub mtu_discovery: bool,
    /// The largest UDP payload path MTU discovery looks for, and the largest this node accepts
    /// (announced to peers), from 1200 to 65527 bytes (65507 is the most IPv4 carries). The
    /// default, [`DEFAULT_MAX_UDP_PAYLOAD`] (1452), fits a 1500-byte Ethernet frame under IPv6
    /// and IPv4. A connection's discovery looks no further than the smaller of its two nodes'
    /// values, so raise it on every node; it does nothing while `mtu_discovery` is off.
    ///
    /// Where every node's path carries jumbo frames (cloud networks such as an AWS VPC, many
    /// data-centre LANs) or the nodes share a host (loopback), [`JUMBO_MAX_UDP_PAYLOAD`]
    /// (8952) lets flows use packets six times larger: fewer packets, less CPU per message
    /// (see BENCHMARKS.md). Do not raise it where paths are Ethernet: discovery probes beyond
    /// the path are lost (or refused by the local interface), three times per size tried, so a
    /// search up to 8952 on a 1500-byte path loses about 21 probes on each side of every
    /// connection, again every ten minutes, which for a node holding a connection per member
    /// is more packets than membership itself sends.
    ///
    /// ```
    /// use grinta_proto::transport::{JUMBO_MAX_UDP_PAYLOAD, TransportLimits};
    ///
    /// let limits = TransportLimits {
    ///     max_udp_payload: JUMBO_MAX_UDP_PAYLOAD,
    ///     ..TransportLimits::default()
    /// };
    /// # assert_eq!(limits.max_udp_payload, 8952);
    /// ```
    pub max_udp_payload: u16,
    /// Most connections in their handshake at once (dialled and accepted), counted apart from
    /// established ones: a flood of handshakes cannot take the room of the members' connections.
    /// Further incoming handshakes are refused.
    pub max_handshaking: usize,
    /// Beyond this many connections in their handshake, an incoming one must first prove its
    /// address with a QUIC Retry (one more round trip): spoofed sources get no state at all.
    pub retry_above_handshaking: usize,
    /// A connection whose handshake has not completed after this long is closed.
    pub handshake_timeout: Duration,
    /// Bytes a peer may send on one connection beyond what this node has read (QUIC's
    /// connection window): with `stream_receive_window`, it bounds what a peer makes this node
    /// hold (see SECURITY.md).
    pub receive_window: u32,
    /// Bytes a peer may send on one stream beyond what this node has read.
    pub stream_receive_window: u32,
    /// Push-pull exchanges a peer may have in progress on one connection (membership starts at
    /// most one at a time); further ones are refused.
    pub max_inbound_exchanges: usize,
    /// A push-pull message must arrive whole within this time, or its stream is aborted.
    pub exchange_timeout: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_queued_datagrams: 64,
            max_queued_stream_messages: 8,
            max_stream_message_size: 8 << 20,
            idle_timeout: Duration::from_secs(30 * 60),
            max_concurrent_streams: 1024 + STREAMS_FOR_EXCHANGES,
            mtu_discovery: true,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            max_handshaking: 1024,
            retry_above_handshaking: 64,
            handshake_timeout: Duration::from_secs(5),
            receive_window: 16 << 20,
            stream_receive_window: 1 << 20,
            max_inbound_exchanges: 2,
            exchange_timeout: Duration::from_secs(10),
        }
    }
}

/// The default [`TransportLimits::max_udp_payload`]: a 1500-byte Ethernet frame less the IPv6
/// and UDP headers (quinn's default too).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1452;

/// [`TransportLimits::max_udp_payload`] for paths that carry 9000-byte jumbo frames: such a
/// frame less the IPv6 and UDP headers.
pub const JUMBO_MAX_UDP_PAYLOAD: u16 = 8952;

/// The range [`TransportLimits::max_udp_payload`] may take: QUIC's minimum and the largest UDP
/// payload IPv6 carries.
pub const UDP_PAYLOAD_RANGE: std::ops::RangeInclusive<u16> = 1200..=65527;

/// The most bytes one segmented send (GSO) carries: the kernel refuses a batch beyond 64 KiB,
/// so large packets leave fewer of them per send.
const MAX_SEGMENTED_SEND: usize = 65_000;

/// Transport counters; they only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Connections this node dialled.
    pub connections_dialled: u64,
    /// Connections this node accepted.
    pub connections_accepted: u64,
    /// Incoming connections refused (limit reached or handshake refused).
    pub connections_refused: u64,
    /// Connections whose handshake failed (bad certificate, wrong name, timeout).
    pub handshakes_failed: u64,
    /// Incoming handshakes asked to prove their address first (QUIC Retry), under load.
    pub retries_sent: u64,
    /// Handshakes closed because they did not complete within `handshake_timeout`.
    pub handshakes_timed_out: u64,
    /// Datagrams dropped: queue full while handshaking, handshake failure, or too large.
    pub datagrams_dropped: u64,
    /// Stream messages dropped (queue full, handshake failure, stream error, too large).
    pub stream_messages_dropped: u64,
    /// Messages dropped because the sender name was not the one the certificate proves.
    pub identity_rejections: u64,
    /// UDP datagrams received.
    pub udp_received: u64,
    /// UDP datagrams sent.
    pub udp_sent: u64,
    /// Idle connections closed to make room for a new one at `max_connections` (the least
    /// recently used first).
    pub connections_evicted: u64,
}

/// Streams held on a node's connections, summed over them (see
/// [`Node::stream_stats`](crate::node::Node::stream_stats)). After every flow and exchange has
/// ended, every count comes back to zero: a stream that stays counted is a leak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams peers opened that are not yet freed here; each counts against the peer's limit of
    /// concurrent streams (`TransportLimits::max_concurrent_streams`).
    pub peer_opened: u64,
    /// Streams whose sending half may still hold data the peer has not acknowledged.
    pub sending: usize,
    /// Streams carrying flows.
    pub flows: usize,
    /// Streams whose receiving half is read and discarded until the peer ends it.
    pub draining: usize,
    /// Push-pull exchanges in progress: requests being read, replies awaited, answers being
    /// written.
    pub exchanges: usize,
}

/// What the transport delivers to the node.
#[derive(Debug)]
pub(crate) enum TransportEvent {
    /// A DATAGRAM frame from an established connection.
    Datagram { conn: ConnectionHandle, data: Bytes },
    /// A complete stream message that opens an exchange (the peer waits for a reply).
    StreamRequest {
        conn: ConnectionHandle,
        stream: StreamId,
        data: Bytes,
    },
    /// A complete reply on a stream this node opened.
    StreamReply { conn: ConnectionHandle, data: Bytes },
    /// A flow stream this node asked for (token from `open_flow_stream`) is open.
    FlowStreamOpened {
        token: u64,
        conn: ConnectionHandle,
        stream: StreamId,
    },
    /// A flow stream could not be opened (connection failed or limit reached).
    FlowStreamOpenFailed { token: u64 },
    /// A peer opened a flow stream; its bytes follow the kind byte.
    FlowIncoming {
        conn: ConnectionHandle,
        stream: StreamId,
    },
    /// A flow stream has data (or its end, or a reset) to read.
    FlowReadable {
        conn: ConnectionHandle,
        stream: StreamId,
    },
    /// A flow stream accepts more data.
    FlowWritable {
        conn: ConnectionHandle,
        stream: StreamId,
    },
    /// The peer asked us to stop sending on a flow stream.
    FlowStopped {
        conn: ConnectionHandle,
        stream: StreamId,
        code: u64,
    },
    /// A connection lost (closed, idle, failed); `name` if it was bound.
    Lost {
        conn: ConnectionHandle,
        name: Option<String>,
        addr: SocketAddr,
        handshake_failed: bool,
    },
}

/// Packets are built only while fewer datagrams than this wait in the outgoing queue; the rest
/// are built as the queue drains ([`Node::poll_transmit`](crate::node::Node::poll_transmit) asks
/// for more). Whoever drives the node thus holds it for a bounded time per batch of packets.
const QUEUED_DATAGRAMS: usize = 64;

/// Transmits up to this size are copied out of the packet buffer; larger ones take it over.
const SMALL_TRANSMIT: usize = 2048;

/// UDP datagrams to send to one destination: one datagram, or with segmentation offload (GSO)
/// several of `segment_size` bytes each, the last possibly shorter. A [`Node`](crate::node::Node)
/// batches only after [`set_max_transmit_segments`](crate::node::Node::set_max_transmit_segments)
/// allowed it; [`segments`](Self::segments) splits a batch for a socket without GSO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination address.
    pub destination: SocketAddr,
    /// The UDP payload, or the payloads of several datagrams back to back.
    pub contents: Vec<u8>,
    /// The size of each datagram when `contents` holds several; `None` for a single datagram.
    pub segment_size: Option<usize>,
}

impl Transmit {
    /// The datagrams this transmit holds, in order.
    ///
    /// ```
    /// use grinta_proto::node::Transmit;
    ///
    /// let t = Transmit {
    ///     destination: "127.0.0.1:7001".parse().unwrap(),
    ///     contents: vec![0; 2500],
    ///     segment_size: Some(1200),
    /// };
    /// let sizes: Vec<usize> = t.segments().map(<[u8]>::len).collect();
    /// assert_eq!(sizes, [1200, 1200, 100]);
    /// ```
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> {
        let size = match self.segment_size {
            Some(size) if size > 0 => size,
            _ => self.contents.len().max(1),
        };
        self.contents.chunks(size)
    }

    /// How many datagrams this transmit holds.
    pub fn segment_count(&self) -> usize {
        match self.segment_size {
            Some(size) if size > 0 => self.contents.len().div_ceil(size),
            _ => 1,
        }
    }
}

#[derive(Debug)]
struct OutStream {
    data: Bytes,
    written: usize,
}

struct Conn {
    conn: quinn_proto::Connection,
    addr: SocketAddr,
    /// The node name this connection is bound to.
    peer: Option<String>,
    /// Whether this node dialled it.
    dialled: bool,
    established: bool,
    /// Whether DATAGRAM frames may be sent: the peer has completed its handshake too. A server
    /// drops 1-RTT packets that reach it before the client's last handshake packet (they can,
    /// when the two travel in separate UDP datagrams and the network reorders them), and a
    /// datagram is never retransmitted; so a dialler waits for the server's HANDSHAKE_DONE
    /// (one round trip) and queues its datagrams until then.
    datagrams_ready: bool,
    /// Closed if still handshaking then.
    handshake_deadline: Instant,
    queued_datagrams: VecDeque<Bytes>,
    /// Stream messages waiting for the handshake: (framed bytes, is a reply to this stream).
    queued_requests: VecDeque<Bytes>,
    /// Incoming stream data being reassembled.
    inbound: HashMap<StreamId, Inbound>,
    /// Streams this node opened (a message on them is a reply).
    opened: hashbrown::HashSet<StreamId>,
    /// Outgoing stream data not yet accepted by flow control.
    outbound: BTreeMap<StreamId, OutStream>,
    /// Streams that carry flows (their bytes belong to the flow layer).
    flow_streams: hashbrown::HashSet<StreamId>,
    /// Streams whose receiving half nobody needs any more: what still arrives is read and
    /// discarded until the peer's end or reset, so that QUIC frees the stream and returns its
    /// credit to the peer.
    draining: hashbrown::HashSet<StreamId>,
    /// Flow streams asked for while the handshake runs (tokens).
    pending_flow_opens: VecDeque<u64>,
    /// Bidirectional streams the peer opened that were accepted: only those may be written,
    /// finished, reset or stopped (quinn lets any permitted id be touched, and counts wrongly
    /// if an unaccepted one is).
    accepted_bi: u64,
    /// When a packet last arrived on it or a message was last sent through it: the least
    /// recently used idle connection makes room at `max_connections`.
    last_used: Instant,
    /// While positive, the connection is kept open with PINGs even when nothing else flows.
    holds: u32,
    /// When the last keep-alive PING was sent (or the hold began).
    last_keep_alive: Instant,
}

/// A push-pull message being read: requests from the peer and replies to ours.
#[derive(Debug)]
struct Inbound {
    decoder: FrameDecoder,
    /// The whole message must have arrived by then, or the stream is aborted: a peer cannot
    /// hold memory here by sending slowly.
    deadline: Instant,
}

impl Conn {
    /// Bytes of framed application datagrams this ready connection's datagram buffer takes
    /// before it would eat into the headroom kept for membership
    /// ([`APP_DATAGRAM_HEADROOM`](crate::datagram::APP_DATAGRAM_HEADROOM)).
    fn app_datagram_room(&mut self) -> usize {
        self.conn
            .datagrams()
            .send_buffer_space()
            .saturating_sub(crate::datagram::APP_DATAGRAM_HEADROOM)
    }

    /// Aborts stream `id` both ways with `code` (reset our sending half, stop the peer's) and
    /// forgets everything this connection held for it.
    fn abort(&mut self, id: StreamId, code: u64) {
        let code = VarInt::from_u64(code).unwrap_or(VarInt::MAX);
        let _ = self.conn.send_stream(id).reset(code);
        let _ = self.conn.recv_stream(id).stop(code);
        self.inbound.remove(&id);
        self.outbound.remove(&id);
        self.opened.remove(&id);
        self.flow_streams.remove(&id);
        self.draining.remove(&id);
    }

    /// Whether stream `id` is one this node may act on: its own, or one of the peer's it
    /// accepted (a handle kept past its stream's end must not reach a stream it never saw).
    fn owns(&self, id: StreamId) -> bool {
        id.dir() == Dir::Bi && (id.initiator() == self.conn.side() || id.index() < self.accepted_bi)
    }

    fn new(
        conn: quinn_proto::Connection,
        addr: SocketAddr,
        peer: Option<String>,
        dialled: bool,
        now: Instant,
        handshake_timeout: Duration,
    ) -> Box<Self> {
        Box::new(Self {
            conn,
            addr,
            peer,
            dialled,
            established: false,
            datagrams_ready: false,
            handshake_deadline: now + handshake_timeout,
            queued_datagrams: VecDeque::new(),
            queued_requests: VecDeque::new(),
            inbound: HashMap::new(),
            opened: Default::default(),
            outbound: BTreeMap::new(),
            flow_streams: Default::default(),
            accepted_bi: 0,
            draining: hashbrown::HashSet::new(),
            pending_flow_opens: VecDeque::new(),
            holds: 0,
            last_used: now,
            last_keep_alive: now,
        })
    }
}

/// Values by connection handle. quinn hands out dense handles (the indices of its own table of
/// connections, reused once free), so a vector indexed by them finds a connection without a
/// tree walk, and iterates in handle order like an ordered map.
struct ByHandle<T> {
    slots: Vec<Option<(ConnectionHandle, T)>>,
    len: usize,
}

/// The transport's connections (boxed: a connection's state is several KiB, and a free slot
/// holds nothing).
type Conns = ByHandle<Box<Conn>>;

impl<T> Default for ByHandle<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            len: 0,
        }
    }
}

impl<T> ByHandle<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, ch: &ConnectionHandle) -> Option<&T> {
        match self.slots.get(ch.0) {
            Some(Some((_, v))) => Some(v),
            _ => None,
        }
    }

    fn get_mut(&mut self, ch: &ConnectionHandle) -> Option<&mut T> {
        match self.slots.get_mut(ch.0) {
            Some(Some((_, v))) => Some(v),
            _ => None,
        }
    }

    fn contains_key(&self, ch: &ConnectionHandle) -> bool {
        self.get(ch).is_some()
    }

    fn insert(&mut self, ch: ConnectionHandle, value: T) {
        if self.slots.len() <= ch.0 {
            self.slots.resize_with(ch.0 + 1, || None);
        }
        if self.slots[ch.0].replace((ch, value)).is_none() {
            self.len += 1;
        }
    }

    /// Takes `ch`'s value out; the vector shrinks past the last handle in use.
    fn remove(&mut self, ch: &ConnectionHandle) -> Option<T> {
        let (_, value) = self.slots.get_mut(ch.0)?.take()?;
        self.len -= 1;
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        Some(value)
    }

    fn iter(&self) -> impl Iterator<Item = (&ConnectionHandle, &T)> {
        self.slots
            .iter()
            .filter_map(|slot| slot.as_ref().map(|(ch, v)| (ch, v)))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&ConnectionHandle, &mut T)> {
        self.slots
            .iter_mut()
            .filter_map(|slot| slot.as_mut().map(|(ch, v)| (&*ch, v)))
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, v)| v)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.iter_mut().map(|(_, v)| v)
    }
}

/// One node's QUIC endpoint and connections.
pub(crate) struct Transport {
    endpoint: Endpoint,
    client: ClientConfig,
    /// Client configuration for dialling seeds known only by address (name checked on first message).
    client_any_name: ClientConfig,
    /// Boxed: a connection's state is several KiB, and a slot of a free handle holds nothing.
    conns: Conns,
    /// Each connection's next deadline (QUIC timers, handshake timeout, exchange timeouts,
    /// keep-alive), ordered: `poll_timeout` reads the first, `handle_timeout` takes those due,
    /// so no input costs a walk over every connection. Updated whenever a connection is driven.
    deadlines: Deadlines<ConnectionHandle>,
    by_name: HashMap<String, ConnectionHandle>,
    /// Every connection bound to each peer name (`Conn::peer`), so that what concerns one peer
    /// (it left, failed or moved) visits its connections only, not every connection.
    by_peer: HashMap<String, smallvec::SmallVec<[ConnectionHandle; 2]>>,
    local_name: String,
    limits: TransportLimits,
    outgoing: VecDeque<Transmit>,
    /// Datagrams in `outgoing`; connections stop building packets at [`QUEUED_DATAGRAMS`].
    outgoing_datagrams: usize,
    events: VecDeque<TransportEvent>,
    dirty: std::collections::BTreeSet<ConnectionHandle>,
    buf: Vec<u8>,
    /// How many datagrams one [`Transmit`] may hold (1 = no segmentation offload).
    max_transmit_segments: usize,
    /// False once the node has left: incoming connections are refused.
    accepting: bool,
    /// Connections in `conns` still in their handshake.
    handshaking: usize,
    /// Connections a newer one to the same peer replaced, to close at the next drive.
    replaced: Vec<ConnectionHandle>,
    /// Drained connections whose handles quinn frees at the next drive (see `drive_one`).
    drained: Vec<(ConnectionHandle, quinn_proto::EndpointEvent)>,
    pub(crate) stats: TransportStats,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_name", &self.local_name)
            .field("connections", &self.conns.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Connection IDs drawn from a generator seeded with cryptographic randomness.
struct SeededCidGenerator(ChaCha8Rng);

impl ConnectionIdGenerator for SeededCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        self.0.fill_bytes(&mut bytes);
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

const CID_LEN: usize = 8;

/// First byte of a stream that carries a push-pull exchange.
pub(crate) const STREAM_KIND_PUSH_PULL: u8 = 1;
/// First byte of a stream that carries a flow.
pub(crate) const STREAM_KIND_FLOW: u8 = 2;

impl crate::flow::FlowStreams for Transport {
    fn open_flow_stream(&mut self, now: Instant, peer: &str, addr: SocketAddr, token: u64) {
        Transport::open_flow_stream(self, now, peer, addr, token);
    }

    fn authenticate(&mut self, conn: ConnectionHandle, name: &str) -> bool {
        Transport::authenticate(self, conn, name)
    }

    fn flow_write_chunks(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        chunks: &mut [Bytes],
    ) -> Option<usize> {
        Transport::flow_write_chunks(self, conn, stream, chunks)
    }

    fn flow_read(&mut self, conn: ConnectionHandle, stream: StreamId, max: usize) -> FlowRead {
        Transport::flow_read(self, conn, stream, max)
    }

    fn flow_finish(&mut self, conn: ConnectionHandle, stream: StreamId) {
        Transport::flow_finish(self, conn, stream);
    }

    fn flow_release(&mut self, conn: ConnectionHandle, stream: StreamId) {
        Transport::flow_release(self, conn, stream);
    }

    fn flow_reply_and_release(&mut self, conn: ConnectionHandle, stream: StreamId, data: Bytes) {
        Transport::flow_reply_and_release(self, conn, stream, data);
    }

    fn abort_stream(&mut self, conn: ConnectionHandle, stream: StreamId, code: u64) {
        Transport::abort_stream(self, conn, stream, code);
    }

    fn hold_conn(&mut self, now: Instant, conn: ConnectionHandle) {
        Transport::hold_conn(self, now, conn);
    }

    fn release_conn(&mut self, conn: ConnectionHandle) {
        Transport::release_conn(self, conn);
    }
}

/// What reading a flow stream gave.
#[derive(Debug, Default)]
pub(crate) struct FlowRead {
    /// Bytes read, in order.
    pub(crate) data: Vec<Bytes>,
    /// The peer finished its side and everything was read.
    pub(crate) finished: bool,
    /// The peer reset its side with this code.
    pub(crate) reset: Option<u64>,
}

/// grinta never issues address-validation tokens, so quinn never needs the wall clock; this source
/// keeps it from reading it anyway.
struct NoWallClock;

impl TimeSource for NoWallClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
    }
}

fn random_bytes<const N: usize>(provider: &CryptoProvider) -> Result<[u8; N], rustls::Error> {
    let mut out = [0u8; N];
    provider
        .secure_random
        .fill(&mut out)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    Ok(out)
}

/// Why the transport could not be set up (the TLS material itself is checked before, see
/// [`TlsError`](crate::tls::TlsError)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The crypto provider lacks the TLS 1.3 cipher suite QUIC's initial packets need.
    #[error("the crypto provider cannot protect QUIC packets: {0}")]
    CipherSuite(#[from] quinn_proto::crypto::rustls::NoInitialCipherSuite),
    /// The crypto provider gave no random bytes.
    #[error("the crypto provider failed: {0}")]
    Random(#[source] rustls::Error),
    /// The stateless-reset key could not be derived from the node's private key.
    #[error("cannot derive the stateless reset key from the node's private key")]
    ResetKey,
    /// [`TransportLimits::max_udp_payload`] is outside [`UDP_PAYLOAD_RANGE`].
    #[error("transport max_udp_payload {0} must be from 1200 to 65527 bytes")]
    UdpPayload(u16),
}

impl Transport {
    /// The transport of node `local_name`, with the TLS configurations built from `tls` (see
    /// [`tls::build`]).
    pub(crate) fn new(
        local_name: &str,
        tls: &tls::TlsConfig,
        node_tls: NodeTls,
        provider: Arc<CryptoProvider>,
        limits: TransportLimits,
    ) -> Result<Self, TransportError> {
        let NodeTls {
            server,
            client,
            client_any_name: any,
        } = node_tls;
        let random = |_| TransportError::Random(rustls::Error::FailedToGetRandomBytes);
        // `NodeConfig::validate` bounds every duration far below what a varint holds.
        let idle_millis = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut transport = TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                VarInt::from_u64(idle_millis).unwrap_or(VarInt::MAX).into(),
            ))
            .max_concurrent_bidi_streams(VarInt::from_u32(
                INITIAL_STREAM_ALLOWANCE.min(limits.max_concurrent_streams),
            ))
            .receive_window(VarInt::from_u32(limits.receive_window))
            .stream_receive_window(VarInt::from_u32(limits.stream_receive_window))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(Some(256 * 1024))
            .datagram_send_buffer_size(256 * 1024);
        let mut mtu = quinn_proto::MtuDiscoveryConfig::default();
        mtu.upper_bound(limits.max_udp_payload);
        transport.mtu_discovery_config(Some(mtu));
        // With MTU discovery, flows fill larger packets. Membership datagrams keep their fixed
        // budget, which fits the 1200-byte minimum every QUIC path guarantees.
        let transport = Arc::new(transport);

        let quic_server = quinn_proto::crypto::rustls::QuicServerConfig::try_from(server)?;
        let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[])
            .extract(&random_bytes::<32>(&provider).map_err(random)?);
        let mut server_config = ServerConfig::new(Arc::new(quic_server), Arc::new(token_key));
        server_config.transport_config(transport.clone());
        server_config.time_source(Arc::new(NoWallClock));
        let mut tokens = quinn_proto::ValidationTokenConfig::default();
        tokens.sent(0).log(Arc::new(quinn_proto::NoneTokenLog));
        server_config.validation_token_config(tokens);
        server_config.migration(false);

        let quic_client = quinn_proto::crypto::rustls::QuicClientConfig::try_from(client)?;
        // Initial destination connection IDs from the provider's secure randomness (quinn's default
        // reads the thread's RNG), and no address-validation tokens.
        let dcid_rng = Arc::new(Mutex::new(ChaCha8Rng::from_seed(
            random_bytes::<32>(&provider).map_err(random)?,
        )));
        let initial_dcid = move || {
            let mut bytes = [0u8; 20];
            if let Ok(mut rng) = dcid_rng.lock() {
                rng.fill_bytes(&mut bytes);
            }
            ConnectionId::new(&bytes)
        };
        let initial_dcid: Arc<dyn Fn() -> ConnectionId + Send + Sync> = Arc::new(initial_dcid);
        let mut client_config = ClientConfig::new(Arc::new(quic_client));
        client_config
            .transport_config(transport.clone())
            .initial_dst_cid_provider(initial_dcid.clone())
            .token_store(Arc::new(quinn_proto::NoneTokenStore));

        // The same client, but accepting any name the CA vouches for (seeds known by address).
        let quic_any = quinn_proto::crypto::rustls::QuicClientConfig::try_from(any)?;
        let mut client_any_name = ClientConfig::new(Arc::new(quic_any));
        client_any_name
            .transport_config(transport)
            .initial_dst_cid_provider(initial_dcid)
            .token_store(Arc::new(quinn_proto::NoneTokenStore));

        // The stateless-reset key is derived from the node's private key, so it survives a
        // restart: a peer still talking to the previous process at this address gets a reset it
        // recognises and drops that connection at once, instead of after the idle timeout.
        let reset_secret =
            ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"grinta/1 stateless reset")
                .extract(tls.key.secret_der());
        let mut reset_bytes = [0u8; 32];
        reset_secret
            .expand(&[b"reset key"], ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut reset_bytes))
            .map_err(|_| TransportError::ResetKey)?;
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_bytes);
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        // `NodeConfig::validate` keeps the bound within what quinn accepts.
        endpoint_config
            .max_udp_payload_size(limits.max_udp_payload)
            .map_err(|_| TransportError::UdpPayload(limits.max_udp_payload))?;
        let cid_seed = random_bytes::<32>(&provider).map_err(random)?;
        let cid_rng = Mutex::new(ChaCha8Rng::from_seed(cid_seed));
        endpoint_config.cid_generator(move || {
            // Each generator gets its own stream, derived from the shared seeded generator.
            let seed = cid_rng
                .lock()
                .map(|mut rng| {
                    let mut s = [0u8; 32];
                    rng.fill_bytes(&mut s);
                    s
                })
                .unwrap_or([7u8; 32]);
            Box::new(SeededCidGenerator(ChaCha8Rng::from_seed(seed)))
        });
        endpoint_config.rng_seed(Some(random_bytes::<32>(&provider).map_err(random)?));
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            Some(Arc::new(server_config)),
            limits.mtu_discovery,
            None,
        );
        Ok(Self {
            endpoint,
            client: client_config,
            client_any_name,
            conns: Conns::default(),
            deadlines: Deadlines::default(),
            by_name: HashMap::new(),
            by_peer: HashMap::new(),
            local_name: local_name.to_owned(),
            limits,
            outgoing: VecDeque::new(),
            outgoing_datagrams: 0,
            events: VecDeque::new(),
            dirty: Default::default(),
            buf: Vec::with_capacity(1500),
            max_transmit_segments: 1,
            accepting: true,
            handshaking: 0,
            replaced: Vec::new(),
            drained: Vec::new(),
            stats: TransportStats::default(),
        })
    }

    /// Whether a connection bound to peer `name` is open (its connection for new messages).
    pub(crate) fn is_connected_to(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub(crate) fn peer_of(&self, conn: ConnectionHandle) -> Option<(&str, SocketAddr)> {
        let c = self.conns.get(&conn)?;
        Some((c.peer.as_deref()?, c.addr))
    }

    /// Binds `conn` to `name` if the peer's certificate proves it, or checks the existing binding.
    /// Returns whether messages claiming `name` may be accepted from this connection.
    pub(crate) fn authenticate(&mut self, conn: ConnectionHandle, name: &str) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let ok = match &c.peer {
            Some(bound) => bound == name,
            None => {
                let proven = c
                    .conn
                    .crypto_session()
                    .peer_identity()
                    .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .and_then(|chain| chain.first().cloned())
                    .is_some_and(|leaf| {
                        tls::certificate_is_valid_for(&leaf, name).unwrap_or(false)
                    });
                if proven && name != self.local_name {
                    c.peer = Some(name.to_owned());
                    index_peer(&mut self.by_peer, conn, name);
                    self.bind_name(conn, name);
                }
                proven && name != self.local_name
            }
        };
        if !ok {
            self.stats.identity_rejections += 1;
        }
        ok
    }

    /// Makes `conn` the connection used for `name`, unless a preferred one already exists.
    fn bind_name(&mut self, conn: ConnectionHandle, name: &str) {
        match self.by_name.get(name) {
            Some(&existing) if existing != conn => {
                let same_dialler = match (self.conns.get(&existing), self.conns.get(&conn)) {
                    (Some(a), Some(b)) => {
                        a.dialled == b.dialled && a.addr == b.addr && b.established
                    }
                    _ => false,
                };
                if same_dialler {
                    // The side that dialled the old connection dialled again: it no longer has
                    // the old one (a restarted process at the same address). The new one
                    // replaces it, on both sides.
                    debug!(peer = name, "a newer connection replaces the previous one");
                    self.by_name.insert(name.to_owned(), conn);
                    if let Some(old) = self.conns.get_mut(&existing) {
                        old.peer = None;
                        unindex_peer(&mut self.by_peer, existing, name);
                        self.replaced.push(existing);
                    }
                    return;
                }
                if self.preferred(existing, conn, name) == conn {
                    self.by_name.insert(name.to_owned(), conn);
                }
            }
            Some(_) => {}
            None => {
                self.by_name.insert(name.to_owned(), conn);
            }
        }
    }

    /// Of two connections to `name`, the one both sides agree on: established first, then the one
    /// dialled by the node with the lower name.
    fn preferred(&self, a: ConnectionHandle, b: ConnectionHandle, name: &str) -> ConnectionHandle {
        let (Some(ca), Some(cb)) = (self.conns.get(&a), self.conns.get(&b)) else {
            return if self.conns.contains_key(&a) { a } else { b };
        };
        if ca.established != cb.established {
            return if ca.established { a } else { b };
        }
        let lower_dials = self.local_name.as_str() < name;
        // The canonical connection is the one dialled by the lower name.
        if ca.dialled == lower_dials { a } else { b }
    }

    /// The connection to use for `name` at `addr`, dialling one if needed.
    fn connection_for(
        &mut self,
        now: Instant,
        name: Option<&str>,
        addr: SocketAddr,
    ) -> Option<ConnectionHandle> {
        if let Some(name) = name {
            if let Some(&ch) = self.by_name.get(name) {
                if let Some(c) = self.conns.get_mut(&ch).filter(|c| c.addr == addr) {
                    c.last_used = now;
                    return Some(ch);
                }
            }
        }
        // Any live connection to that address that is (or may become) the named peer: one still
        // handshaking, or the peer moved and a connection to its new address is already open
        // (the peer's own connections only, not every connection: the lowest handle first).
        if let Some(n) = name {
            let live = self
                .by_peer
                .get(n)
                .into_iter()
                .flatten()
                .copied()
                .filter(|ch| {
                    self.conns
                        .get(ch)
                        .is_some_and(|c| c.addr == addr && !c.conn.is_closed())
                })
                .min();
            if live.is_some() {
                return live;
            }
        } else {
            // By address alone (a seed, when joining), the connection the peer's name is bound
            // to comes first: an unbound one may lead to a previous process at that address.
            let mut fallback = None;
            for (&ch, c) in self
                .conns
                .iter()
                .filter(|(_, c)| c.addr == addr && !c.conn.is_closed())
            {
                let bound = c
                    .peer
                    .as_deref()
                    .is_some_and(|p| self.by_name.get(p) == Some(&ch));
                if bound {
                    return Some(ch);
                }
                fallback.get_or_insert(ch);
            }
            if fallback.is_some() {
                return fallback;
            }
        }
        if !self.accepting || !self.room_for_connection(now) {
            return None;
        }
        let (config, server_name) = match name {
            Some(n) => (self.client.clone(), n.to_owned()),
            None => (
                self.client_any_name.clone(),
                "seed.grinta.invalid".to_owned(),
            ),
        };
        match self.endpoint.connect(now, config, addr, &server_name) {
            Ok((ch, conn)) => {
                self.stats.connections_dialled += 1;
                debug!(peer = ?name, %addr, "dialling");
                self.handshaking += 1;
                self.conns.insert(
                    ch,
                    Conn::new(
                        conn,
                        addr,
                        name.map(str::to_owned),
                        true,
                        now,
                        self.limits.handshake_timeout,
                    ),
                );
                if let Some(n) = name {
                    index_peer(&mut self.by_peer, ch, n);
                    self.bind_name(ch, n);
                }
                self.dirty.insert(ch);
                Some(ch)
            }
            Err(e) => {
                debug!(%addr, error = %e, "cannot dial");
                None
            }
        }
    }

    /// Sends a membership packet as a DATAGRAM frame, connecting first if needed.
    pub(crate) fn send_datagram(
        &mut self,
        now: Instant,
        name: Option<&str>,
        addr: SocketAddr,
        data: Bytes,
    ) {
        let Some(ch) = self.connection_for(now, name, addr) else {
            self.stats.datagrams_dropped += 1;
            return;
        };
        let limit = self.limits.max_queued_datagrams;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        if c.datagrams_ready {
            if c.conn.datagrams().send(data, true).is_err() {
                self.stats.datagrams_dropped += 1;
            }
        } else if c.queued_datagrams.len() < limit {
            c.queued_datagrams.push_back(data);
        } else {
            self.stats.datagrams_dropped += 1;
        }
        self.dirty.insert(ch);
    }

    /// Sends application datagrams for `endpoint` (each framed by [`crate::datagram::encode`])
    /// to the peer, connecting first if needed. Takes every datagram of `payloads` and returns
    /// how many were sent and how many there were; the others were dropped: membership keeps
    /// priority, so a datagram goes only while the connection's datagram buffer has
    /// [`APP_DATAGRAM_HEADROOM`](crate::datagram::APP_DATAGRAM_HEADROOM) to spare (or, while the
    /// connection is being made, while half its queue is free). A dropped datagram is not
    /// framed: a sender far faster than the connection costs little more than the count.
    pub(crate) fn send_app_datagrams(
        &mut self,
        now: Instant,
        name: &str,
        addr: SocketAddr,
        endpoint: &str,
        payloads: impl IntoIterator<Item = Bytes>,
    ) -> (usize, usize) {
        use crate::datagram::{encode, encoded_len};
        let payloads = payloads.into_iter();
        let Some(ch) = self.connection_for(now, Some(name), addr) else {
            return (0, payloads.count());
        };
        let limit = self.app_datagrams_waiting();
        let Some(c) = self.conns.get_mut(&ch) else {
            return (0, payloads.count());
        };
        let (mut sent, mut offered) = (0, 0);
        for payload in payloads {
            offered += 1;
            let queued = if c.datagrams_ready {
                c.app_datagram_room() >= encoded_len(endpoint, payload.len())
                    && c.conn
                        .datagrams()
                        .send(encode(endpoint, payload), false)
                        .is_ok()
            } else if c.queued_datagrams.len() < limit {
                c.queued_datagrams.push_back(encode(endpoint, payload));
                true
            } else {
                false
            };
            sent += usize::from(queued);
        }
        self.dirty.insert(ch);
        (sent, offered)
    }

    /// Bytes of framed application datagrams ([`encoded_len`](crate::datagram::encoded_len))
    /// that [`send_app_datagrams`](Self::send_app_datagrams) to peer `name` at `addr` would take
    /// now rather than drop for want of room. A connection not yet ready for datagrams (or not
    /// yet opened) holds a few of any size until it is.
    pub(crate) fn app_datagram_room(&mut self, name: &str, addr: SocketAddr) -> usize {
        use crate::datagram::MAX_ENCODED_LEN;
        let waiting = self.app_datagrams_waiting();
        let connection = self
            .by_name
            .get(name)
            .and_then(|ch| self.conns.get_mut(ch))
            .filter(|c| c.addr == addr);
        match connection {
            Some(c) if c.datagrams_ready => c.app_datagram_room(),
            Some(c) => waiting.saturating_sub(c.queued_datagrams.len()) * MAX_ENCODED_LEN,
            None => waiting * MAX_ENCODED_LEN,
        }
    }

    /// Application datagrams a connection not yet ready for them holds until it is (half of
    /// `max_queued_datagrams`; membership has the rest).
    fn app_datagrams_waiting(&self) -> usize {
        self.limits.max_queued_datagrams / 2
    }

    /// Opens a stream to the peer and sends `data` as one framed message on it.
    pub(crate) fn send_request(
        &mut self,
        now: Instant,
        name: Option<&str>,
        addr: SocketAddr,
        data: &[u8],
    ) {
        let Some(ch) = self.connection_for(now, name, addr) else {
            self.stats.stream_messages_dropped += 1;
            return;
        };
        let mut framed = Vec::with_capacity(1 + framing::framed_len(data.len()));
        framed.push(STREAM_KIND_PUSH_PULL);
        framing::encode_frame(data, &mut framed);
        let limit = self.limits.max_queued_stream_messages;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        if c.established {
            let reply = (
                now + self.limits.exchange_timeout,
                self.limits.max_stream_message_size,
            );
            Self::open_and_write(c, framed.into(), &mut self.stats, reply);
        } else if c.queued_requests.len() < limit {
            c.queued_requests.push_back(framed.into());
        } else {
            self.stats.stream_messages_dropped += 1;
        }
        self.dirty.insert(ch);
    }

    /// Asks for a new flow stream to node `name` at `addr`; the answer comes as
    /// [`TransportEvent::FlowStreamOpened`] or [`TransportEvent::FlowStreamOpenFailed`] with `token`.
    pub(crate) fn open_flow_stream(
        &mut self,
        now: Instant,
        name: &str,
        addr: SocketAddr,
        token: u64,
    ) {
        let Some(ch) = self.connection_for(now, Some(name), addr) else {
            self.events
                .push_back(TransportEvent::FlowStreamOpenFailed { token });
            return;
        };
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        c.pending_flow_opens.push_back(token);
        if c.established {
            Self::open_pending_flows(c, ch, &mut self.events);
        }
        self.dirty.insert(ch);
    }

    /// Opens waiting flow streams while the peer's stream limit allows; the rest wait for
    /// `StreamEvent::Available`.
    fn open_pending_flows(
        c: &mut Conn,
        ch: ConnectionHandle,
        events: &mut VecDeque<TransportEvent>,
    ) {
        while let Some(&token) = c.pending_flow_opens.front() {
            match Self::open_flow_on(c, ch, token) {
                Some(event) => {
                    c.pending_flow_opens.pop_front();
                    events.push_back(event);
                }
                None => break,
            }
        }
    }

    fn open_flow_on(c: &mut Conn, ch: ConnectionHandle, token: u64) -> Option<TransportEvent> {
        let id = c.conn.streams().open(Dir::Bi)?;
        c.flow_streams.insert(id);
        // One byte always fits a fresh stream's window.
        let _ = c.conn.send_stream(id).write(&[STREAM_KIND_FLOW]);
        Some(TransportEvent::FlowStreamOpened {
            token,
            conn: ch,
            stream: id,
        })
    }

    /// Writes as much of `chunks` as flow control allows, taking the bytes without a copy (each
    /// chunk written is emptied, a chunk written in part is advanced); returns the bytes taken, or
    /// `None` if the stream is gone (stopped, reset or its connection closed).
    pub(crate) fn flow_write_chunks(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        chunks: &mut [Bytes],
    ) -> Option<usize> {
        let c = self.conns.get_mut(&conn).filter(|c| c.owns(stream))?;
        self.dirty.insert(conn);
        match c.conn.send_stream(stream).write_chunks(chunks) {
            Ok(written) => Some(written.bytes),
            Err(quinn_proto::WriteError::Blocked) => Some(0),
            Err(_) => None,
        }
    }

    /// Finishes the sending side of a flow stream (after everything written).
    pub(crate) fn flow_finish(&mut self, conn: ConnectionHandle, stream: StreamId) {
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.owns(stream)) {
            let _ = c.conn.send_stream(stream).finish();
            self.dirty.insert(conn);
        }
    }

    /// Gives back a flow stream whose sending half is finished (or reset): its receiving half is
    /// read to the peer's end or reset and discarded, so the stream is freed on both sides
    /// whatever the peer still sends.
    pub(crate) fn flow_release(&mut self, conn: ConnectionHandle, stream: StreamId) {
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.owns(stream)) {
            c.flow_streams.remove(&stream);
            Self::drain(c, stream);
            self.dirty.insert(conn);
        }
    }

    /// Answers a flow stream with one last message (a refusal), finishes it, and releases its
    /// receiving half as [`flow_release`](Self::flow_release) does. A write that flow control
    /// blocks completes when the stream becomes writable.
    pub(crate) fn flow_reply_and_release(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        data: Bytes,
    ) {
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.owns(stream)) {
            c.flow_streams.remove(&stream);
            c.outbound.insert(stream, OutStream { data, written: 0 });
            Self::flush_stream(c, stream, &mut self.stats);
            Self::drain(c, stream);
            self.dirty.insert(conn);
        }
    }

    /// Aborts a stream (a flow's or an exchange's) both ways, `code` for the peer, and forgets
    /// everything about it.
    pub(crate) fn abort_stream(&mut self, conn: ConnectionHandle, stream: StreamId, code: u64) {
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.owns(stream)) {
            c.abort(stream, code);
            self.dirty.insert(conn);
        }
    }

    /// Doubles the streams the peer may hold open at once (up to `max`) when it holds half of
    /// them: see [`INITIAL_STREAM_ALLOWANCE`]. The new allowance reaches the peer in the next
    /// packet (the caller's connection is driven after every event).
    fn grow_stream_allowance(c: &mut Conn, max: u32) {
        let allowance = c.conn.max_concurrent_streams(Dir::Bi);
        let open = c.conn.streams().remote_open_streams(Dir::Bi);
        if allowance < u64::from(max) && open.saturating_mul(2) >= allowance {
            let grown = allowance.saturating_mul(2).min(u64::from(max));
            c.conn.set_max_concurrent_streams(
                Dir::Bi,
                VarInt::from_u64(grown).unwrap_or(VarInt::MAX),
            );
        }
    }

    /// Reads and discards what `id` holds; true once its receiving half is gone (the peer's end
    /// or reset was read, or it was gone already).
    fn discard(c: &mut Conn, id: StreamId) -> bool {
        match c.conn.recv_stream(id).read(true) {
            Ok(mut chunks) => {
                let ended = loop {
                    match chunks.next(usize::MAX) {
                        Ok(Some(_)) => {}
                        Ok(None) | Err(quinn_proto::ReadError::Reset(_)) => break true,
                        Err(quinn_proto::ReadError::Blocked) => break false,
                    }
                };
                let _ = chunks.finalize();
                ended
            }
            Err(_) => true,
        }
    }

    /// Discards what `id` receives from now on, until its end (see [`Conn::draining`]).
    fn drain(c: &mut Conn, id: StreamId) {
        c.inbound.remove(&id);
        if Self::discard(c, id) {
            c.draining.remove(&id);
        } else {
            c.draining.insert(id);
        }
    }

    /// Reads up to `max` bytes from a flow stream.
    pub(crate) fn flow_read(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        max: usize,
    ) -> FlowRead {
        let mut out = FlowRead::default();
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.owns(stream)) else {
            out.reset = Some(StreamErrorCode::ShuttingDown as u64);
            return out;
        };
        self.dirty.insert(conn);
        let mut budget = max;
        match c.conn.recv_stream(stream).read(true) {
            Ok(mut chunks) => {
                while budget > 0 {
                    match chunks.next(budget) {
                        Ok(Some(chunk)) => {
                            budget -= chunk.bytes.len();
                            out.data.push(chunk.bytes);
                        }
                        Ok(None) => {
                            out.finished = true;
                            break;
                        }
                        Err(quinn_proto::ReadError::Blocked) => break,
                        Err(quinn_proto::ReadError::Reset(code)) => {
                            out.reset = Some(code.into_inner());
                            break;
                        }
                    }
                }
                let _ = chunks.finalize();
            }
            Err(_) => out.finished = true,
        }
        out
    }

    /// Holds the connection a flow runs on (keep-alive while held).
    pub(crate) fn hold_conn(&mut self, now: Instant, conn: ConnectionHandle) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.holds == 0 {
                c.last_keep_alive = now;
            }
            c.holds += 1;
            // Its keep-alive deadline changed.
            self.dirty.insert(conn);
        }
    }

    /// Releases one hold on a connection.
    pub(crate) fn release_conn(&mut self, conn: ConnectionHandle) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.holds = c.holds.saturating_sub(1);
            self.dirty.insert(conn);
        }
    }

    /// Sends `data` as the reply on `stream`, then finishes it.
    pub(crate) fn send_reply(&mut self, conn: ConnectionHandle, stream: StreamId, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.owns(stream)) else {
            self.stats.stream_messages_dropped += 1;
            return;
        };
        let mut framed = Vec::with_capacity(framing::framed_len(data.len()));
        framing::encode_frame(data, &mut framed);
        c.outbound.insert(
            stream,
            OutStream {
                data: framed.into(),
                written: 0,
            },
        );
        Self::flush_stream(c, stream, &mut self.stats);
        self.dirty.insert(conn);
    }

    /// Opens a push-pull request stream; its reply must arrive by `deadline`, or the stream is
    /// aborted (a peer that went away does not hold the exchange).
    fn open_and_write(
        c: &mut Conn,
        framed: Bytes,
        stats: &mut TransportStats,
        (deadline, max_reply): (Instant, usize),
    ) {
        let Some(id) = c.conn.streams().open(Dir::Bi) else {
            // The peer's stream limit is reached: drop; membership retries later.
            stats.stream_messages_dropped += 1;
            return;
        };
        c.opened.insert(id);
        c.inbound.insert(
            id,
            Inbound {
                decoder: FrameDecoder::new(max_reply),
                deadline,
            },
        );
        c.outbound.insert(
            id,
            OutStream {
                data: framed,
                written: 0,
            },
        );
        Self::flush_stream(c, id, stats);
    }

    fn flush_stream(c: &mut Conn, id: StreamId, stats: &mut TransportStats) {
        let Some(out) = c.outbound.get_mut(&id) else {
            return;
        };
        let mut send = c.conn.send_stream(id);
        while out.written < out.data.len() {
            match send.write(&out.data[out.written..]) {
                Ok(n) => out.written += n,
                Err(quinn_proto::WriteError::Blocked) => return,
                Err(e) => {
                    // Stopped by the peer (or gone): reset, so the sending half is released.
                    stats.stream_messages_dropped += 1;
                    let code = match e {
                        quinn_proto::WriteError::Stopped(code) => code,
                        _ => VarInt::from_u32(StreamErrorCode::ProtocolViolation as u32),
                    };
                    let _ = send.reset(code);
                    c.outbound.remove(&id);
                    return;
                }
            }
        }
        let _ = send.finish();
        c.outbound.remove(&id);
    }

    /// Processes one UDP datagram from the socket.
    pub(crate) fn handle_udp(&mut self, now: Instant, from: SocketAddr, data: BytesMut) {
        self.stats.udp_received += 1;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let event = self.endpoint.handle(now, from, None, None, data, &mut buf);
        match event {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.conn.handle_event(event);
                    c.last_used = now;
                    self.dirty.insert(ch);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if !self.accepting || self.handshaking >= self.limits.max_handshaking {
                    self.refuse_incoming(incoming, from, &mut buf);
                } else if self.handshaking >= self.limits.retry_above_handshaking
                    && !incoming.remote_address_validated()
                    && incoming.may_retry()
                {
                    // Under load: the source proves it receives at its address before it gets
                    // any state here (a spoofed one never comes back). This also bounds what
                    // spoofed handshakes can evict at the connection limit: at most
                    // `retry_above_handshaking` per handshake timeout.
                    match self.endpoint.retry(incoming, &mut buf) {
                        Ok(t) => {
                            self.stats.retries_sent += 1;
                            if self.stats.retries_sent.is_power_of_two() {
                                debug!(
                                    retries = self.stats.retries_sent,
                                    handshaking = self.handshaking,
                                    "under handshake load: asking new sources to prove their address (QUIC Retry)"
                                );
                            }
                            self.queue_quinn_transmit(&t, &buf);
                        }
                        Err(e) => self.refuse_incoming(e.into_incoming(), from, &mut buf),
                    }
                } else if !self.room_for_connection(now) {
                    self.refuse_incoming(incoming, from, &mut buf);
                } else {
                    match self.endpoint.accept(incoming, now, &mut buf, None) {
                        Ok((ch, conn)) => {
                            self.stats.connections_accepted += 1;
                            self.handshaking += 1;
                            let timeout = self.limits.handshake_timeout;
                            self.conns
                                .insert(ch, Conn::new(conn, from, None, false, now, timeout));
                            self.dirty.insert(ch);
                        }
                        Err(e) => {
                            self.stats.connections_refused += 1;
                            if let Some(t) = e.response {
                                self.queue_quinn_transmit(&t, &buf);
                            }
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => self.queue_quinn_transmit(&t, &buf),
            None => {}
        }
        // The connection is driven by the caller's next flush, once per batch of datagrams.
        self.buf = buf;
    }

    fn queue_quinn_transmit(&mut self, t: &quinn_proto::Transmit, buf: &[u8]) {
        let size = t.size.min(buf.len());
        let transmit = Transmit {
            destination: t.destination,
            contents: buf[..size].to_vec(),
            segment_size: t.segment_size,
        };
        self.queue_transmit(transmit);
    }

    fn queue_transmit(&mut self, transmit: Transmit) {
        let datagrams = transmit.segment_count();
        self.stats.udp_sent += datagrams as u64;
        self.outgoing_datagrams += datagrams;
        self.outgoing.push_back(transmit);
    }

    /// Lets one [`Transmit`] carry up to `segments` datagrams (at least 1).
    pub(crate) fn set_max_transmit_segments(&mut self, segments: usize) {
        self.max_transmit_segments = segments.max(1);
    }

    /// Keeps the connection to `name` open while held (`hold = true` adds a hold, `false` releases
    /// one): held connections send a PING every third of the idle timeout. Returns false if there is
    /// no connection to `name`.
    pub(crate) fn hold(&mut self, now: Instant, name: &str, hold: bool) -> bool {
        let Some(&ch) = self.by_name.get(name) else {
            return false;
        };
        if hold {
            self.hold_conn(now, ch);
        } else {
            self.release_conn(ch);
        }
        true
    }

    fn keep_alive_interval(&self) -> Duration {
        self.limits.idle_timeout / 3
    }

    /// Runs connection timers due at `now`: only the connections whose deadline passed.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let interval = self.keep_alive_interval();
        while let Some(ch) = self.deadlines.pop_due(now) {
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            self.dirty.insert(ch);
            if !c.established && !c.conn.is_closed() && now >= c.handshake_deadline {
                self.stats.handshakes_timed_out += 1;
                debug!(peer = ?c.peer, addr = %c.addr, "handshake timed out");
                self.close_here(now, ch, b"handshake timed out");
                continue;
            }
            let overdue: Vec<StreamId> = c
                .inbound
                .iter()
                .filter(|(_, i)| now >= i.deadline)
                .map(|(id, _)| *id)
                .collect();
            for id in overdue {
                self.stats.stream_messages_dropped += 1;
                c.abort(id, StreamErrorCode::ProtocolViolation as u64);
            }
            if c.holds > 0 && c.established && now >= c.last_keep_alive + interval {
                c.conn.ping();
                c.last_keep_alive = now;
            }
            if c.conn.poll_timeout().is_some_and(|t| t <= now) {
                c.conn.handle_timeout(now);
            }
        }
        self.drive(now);
    }

    /// The earliest connection deadline (QUIC timers and keep-alives of held connections).
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        self.deadlines.first()
    }

    /// Puts connection `ch`'s next deadline in the index (or takes it out if it has none or is
    /// gone).
    fn reschedule(&mut self, ch: ConnectionHandle) {
        let interval = self.keep_alive_interval();
        let Some(c) = self.conns.get_mut(&ch) else {
            self.deadlines.set(ch, None);
            return;
        };
        let keep_alive = (c.holds > 0 && c.established).then(|| c.last_keep_alive + interval);
        let handshake = (!c.established && !c.conn.is_closed()).then_some(c.handshake_deadline);
        let exchange = c.inbound.values().map(|i| i.deadline).min();
        let next = [c.conn.poll_timeout(), keep_alive, handshake, exchange]
            .into_iter()
            .flatten()
            .min();
        self.deadlines.set(ch, next);
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        let transmit = self.outgoing.pop_front()?;
        self.outgoing_datagrams -= transmit.segment_count();
        Some(transmit)
    }

    pub(crate) fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.pop_front()
    }

    /// Closes every connection to node `name` (membership declared it Dead or Left). If it comes
    /// back, perhaps restarted at the same address, a fresh connection is dialled instead of
    /// sending into one the restarted process cannot know.
    pub(crate) fn close_peer(&mut self, now: Instant, name: &str) {
        self.by_name.remove(name);
        for ch in self.by_peer.remove(name).unwrap_or_default() {
            if let Some(c) = self.conns.get_mut(&ch) {
                c.conn.close(
                    now,
                    VarInt::from_u32(ConnectionCloseCode::Idle as u32),
                    Bytes::from_static(b"peer declared gone"),
                );
                c.peer = None;
                self.dirty.insert(ch);
            }
        }
        self.drive(now);
    }

    /// Closes the connections to node `name` at any address but `addr` (it moved).
    pub(crate) fn close_peer_elsewhere(&mut self, now: Instant, name: &str, addr: SocketAddr) {
        let stale: Vec<ConnectionHandle> = self
            .by_peer
            .get(name)
            .into_iter()
            .flatten()
            .filter(|ch| {
                self.conns
                    .get(ch)
                    .is_some_and(|c| c.addr != addr && !c.conn.is_closed())
            })
            .copied()
            .collect();
        for &ch in &stale {
            self.close_here(now, ch, b"peer moved");
        }
        if !stale.is_empty() {
            if self
                .by_name
                .get(name)
                .and_then(|ch| self.conns.get(ch))
                .is_some_and(|c| c.addr != addr)
            {
                self.by_name.remove(name);
            }
            self.drive(now);
        }
    }

    /// Closes every connection and refuses new ones (the node has left).
    pub(crate) fn close_all(&mut self, now: Instant) {
        self.accepting = false;
        for (ch, c) in self.conns.iter_mut() {
            c.conn.close(
                now,
                VarInt::from_u32(ConnectionCloseCode::ShuttingDown as u32),
                Bytes::from_static(b"node shutting down"),
            );
            self.dirty.insert(*ch);
        }
        self.drive(now);
    }

    /// Streams held on every connection.
    pub(crate) fn stream_stats(&mut self) -> StreamStats {
        let mut stats = StreamStats::default();
        for c in self.conns.values_mut() {
            stats.peer_opened += c.conn.streams().remote_open_streams(Dir::Bi);
            stats.sending += c.conn.streams().send_streams();
            stats.flows += c.flow_streams.len();
            stats.draining += c.draining.len();
            stats.exchanges += c.inbound.len() + c.opened.len() + c.outbound.len();
        }
        stats
    }

    /// Number of connections held (in any state, closing ones included).
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of connections closed and draining: held for a few round trips, outside
    /// `max_connections`. Walks every connection.
    pub(crate) fn closing_connection_count(&self) -> usize {
        self.conns.values().filter(|c| c.conn.is_closed()).count()
    }

    /// Whether some connection was touched since the last [`flush`](Self::flush).
    pub(crate) fn needs_flush(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Processes every connection touched since the last call: endpoint events, connection events,
    /// then its packets.
    pub(crate) fn flush(&mut self, now: Instant) {
        self.drive(now);
    }

    /// Drives touched connections until none is left or the outgoing queue is full.
    fn drive(&mut self, now: Instant) {
        for (ch, ev) in std::mem::take(&mut self.drained) {
            // The connection is gone from `conns`: nothing to hand an answer back to.
            let _ = self.endpoint.handle_event(ch, ev);
        }
        for ch in std::mem::take(&mut self.replaced) {
            self.close_here(now, ch, b"replaced by a newer connection");
        }
        while self.outgoing_datagrams < QUEUED_DATAGRAMS {
            let Some(ch) = self.dirty.pop_first() else {
                break;
            };
            self.drive_one(now, ch);
        }
    }

    fn drive_one(&mut self, now: Instant, ch: ConnectionHandle) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(c) = self.conns.get_mut(&ch) {
            let mut progressed = false;
            while let Some(ev) = c.conn.poll_endpoint_events() {
                progressed = true;
                if ev.is_drained() {
                    // quinn reuses a drained connection's handle at once; the node may still
                    // hold events naming it. Freed at the next drive, once they were handled.
                    self.drained.push((ch, ev));
                    continue;
                }
                if let Some(back) = self.endpoint.handle_event(ch, ev) {
                    c.conn.handle_event(back);
                }
            }
            while let Some(ev) = self.conns.get_mut(&ch).and_then(|c| c.conn.poll()) {
                progressed = true;
                self.handle_conn_event(now, ch, ev);
            }
            let Some(c) = self.conns.get_mut(&ch) else {
                break;
            };
            if c.established && !c.datagrams_ready && c.conn.stats().frame_rx.handshake_done > 0 {
                Self::release_datagrams(c, &mut self.stats);
            }
            buf.clear();
            let mut queue_full = false;
            loop {
                if self.outgoing_datagrams >= QUEUED_DATAGRAMS {
                    queue_full = true;
                    break;
                }
                let segments = self
                    .max_transmit_segments
                    .min(MAX_SEGMENTED_SEND / usize::from(c.conn.current_mtu().max(1200)))
                    .max(1);
                let Some(t) = c.conn.poll_transmit(now, segments, &mut buf) else {
                    break;
                };
                progressed = true;
                buf.truncate(t.size);
                // A batch of packets becomes the transmit without a copy; a lone small packet
                // (an ACK) is copied so that the large buffer is reused.
                let contents = if t.size > SMALL_TRANSMIT {
                    let capacity = buf.capacity();
                    std::mem::replace(&mut buf, Vec::with_capacity(capacity))
                } else {
                    let small = buf.clone();
                    buf.clear();
                    small
                };
                let transmit = Transmit {
                    destination: t.destination,
                    contents,
                    segment_size: t.segment_size,
                };
                let datagrams = transmit.segment_count();
                self.stats.udp_sent += datagrams as u64;
                self.outgoing_datagrams += datagrams;
                self.outgoing.push_back(transmit);
            }
            if c.conn.is_drained() {
                self.remove_conn(ch);
                break;
            }
            if queue_full {
                // Revisited once the queue drains.
                self.dirty.insert(ch);
                break;
            }
            if !progressed {
                break;
            }
        }
        self.buf = buf;
        self.reschedule(ch);
    }

    /// Both sides completed the handshake: datagrams go out from now on, queued ones first.
    fn release_datagrams(c: &mut Conn, stats: &mut TransportStats) {
        c.datagrams_ready = true;
        while let Some(d) = c.queued_datagrams.pop_front() {
            if c.conn.datagrams().send(d, true).is_err() {
                stats.datagrams_dropped += 1;
            }
        }
    }

    /// Refuses an incoming connection (limits reached), counted.
    fn refuse_incoming(
        &mut self,
        incoming: quinn_proto::Incoming,
        from: SocketAddr,
        buf: &mut Vec<u8>,
    ) {
        self.stats.connections_refused += 1;
        // Logged at 1, 2, 4, 8, ... refusals: a flood cannot flood the log.
        if self.stats.connections_refused.is_power_of_two() {
            debug!(
                %from,
                refused = self.stats.connections_refused,
                connections = self.conns.len(),
                handshaking = self.handshaking,
                "incoming connection refused: connection or handshake limit reached"
            );
        }
        let t = self.endpoint.refuse(incoming, buf);
        self.queue_quinn_transmit(&t, buf);
    }

    /// Whether a new connection fits under `max_connections`, closing the least recently used
    /// idle one (established, no flows, exchanges, holds or unacknowledged stream data) if that
    /// is what it takes. The walk over the
    /// connections happens only at the limit, once per new connection.
    fn room_for_connection(&mut self, now: Instant) -> bool {
        if self.conns.len() < self.limits.max_connections {
            return true;
        }
        // One walk: the closed connections, and the least recently used idle one. Closed
        // connections drain for a few round trips outside the budget (counting them would refuse
        // handshakes while a churning budget frees itself), up to as many again as the budget or
        // as `max_handshaking`, whichever is more (a small budget churns in bursts).
        let (mut closing, mut idle) = (0usize, None::<(Instant, ConnectionHandle)>);
        for (&ch, c) in self.conns.iter() {
            if c.conn.is_closed() {
                closing += 1;
            } else if c.established
                && c.holds == 0
                && c.flow_streams.is_empty()
                && c.inbound.is_empty()
                && c.outbound.is_empty()
                && c.draining.is_empty()
                && c.pending_flow_opens.is_empty()
                && idle.is_none_or(|(used, _)| c.last_used < used)
            {
                idle = Some((c.last_used, ch));
            }
        }
        if closing >= self.limits.max_connections.max(self.limits.max_handshaking) {
            return false;
        }
        if self.conns.len() - closing < self.limits.max_connections {
            return true;
        }
        let idle = idle.map(|(_, ch)| ch);
        let Some(ch) = idle else {
            return false;
        };
        self.stats.connections_evicted += 1;
        debug!(
            peer = ?self.conns.get(&ch).and_then(|c| c.peer.clone()),
            "connection budget: closing the least recently used idle connection"
        );
        // It stays in the map for the few round trips QUIC takes to drain it: the open
        // connections stay at the limit.
        self.close_here(now, ch, b"connection budget");
        true
    }

    /// Closes connection `ch` from this side with `reason`. A connection closed here raises no
    /// event of its own, so what ran on it fails now ([`connection_lost`](Self::connection_lost)).
    fn close_here(&mut self, now: Instant, ch: ConnectionHandle, reason: &'static [u8]) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        c.conn.close(
            now,
            VarInt::from_u32(ConnectionCloseCode::Idle as u32),
            Bytes::from_static(reason),
        );
        self.dirty.insert(ch);
        self.connection_lost(ch);
    }

    /// A connection ended (closed by the peer, failed, or closed here before it was
    /// established): what waited on it is dropped and counted, the node hears of it.
    fn connection_lost(&mut self, ch: ConnectionHandle) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        let handshake_failed = !c.established;
        if handshake_failed {
            self.stats.handshakes_failed += 1;
        }
        self.stats.datagrams_dropped += c.queued_datagrams.len() as u64;
        self.stats.stream_messages_dropped += c.queued_requests.len() as u64;
        c.queued_datagrams.clear();
        c.queued_requests.clear();
        for token in c.pending_flow_opens.drain(..) {
            self.events
                .push_back(TransportEvent::FlowStreamOpenFailed { token });
        }
        self.events.push_back(TransportEvent::Lost {
            conn: ch,
            name: c.peer.clone(),
            addr: c.addr,
            handshake_failed,
        });
        if let Some(name) = c.peer.clone() {
            if self.by_name.get(&name) == Some(&ch) {
                self.by_name.remove(&name);
            }
        }
    }

    fn remove_conn(&mut self, ch: ConnectionHandle) {
        self.deadlines.set(ch, None);
        let Some(c) = self.conns.remove(&ch) else {
            return;
        };
        if !c.established {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        if let Some(name) = &c.peer {
            unindex_peer(&mut self.by_peer, ch, name);
            if self.by_name.get(name) == Some(&ch) {
                self.by_name.remove(name);
                // Fall back to another connection to the same peer, if any.
                if let Some(&other) = self.by_peer.get(name).and_then(|chs| chs.first()) {
                    self.by_name.insert(name.clone(), other);
                }
            }
        }
    }

    fn handle_conn_event(&mut self, now: Instant, ch: ConnectionHandle, ev: quinn_proto::Event) {
        use quinn_proto::Event;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        match ev {
            Event::HandshakeDataReady => {}
            Event::Connected => {
                if !c.established {
                    self.handshaking = self.handshaking.saturating_sub(1);
                }
                c.established = true;
                debug!(peer = ?c.peer, addr = %c.addr, dialled = c.dialled, "connection established");
                // The acceptor's handshake is complete when it sees the dialler's last packet;
                // the dialler's, when the acceptor says so (see `datagrams_ready`).
                if !c.dialled {
                    Self::release_datagrams(c, &mut self.stats);
                }
                let reply = (
                    now + self.limits.exchange_timeout,
                    self.limits.max_stream_message_size,
                );
                while let Some(m) = c.queued_requests.pop_front() {
                    Self::open_and_write(c, m, &mut self.stats, reply);
                }
                Self::open_pending_flows(c, ch, &mut self.events);
                if let Some(name) = c.peer.clone() {
                    self.bind_name(ch, &name);
                }
            }
            Event::ConnectionLost { reason } => {
                debug!(peer = ?c.peer, addr = %c.addr, %reason, "connection lost");
                self.connection_lost(ch);
            }
            Event::DatagramReceived => {
                while let Some(data) = c.conn.datagrams().recv() {
                    self.events
                        .push_back(TransportEvent::Datagram { conn: ch, data });
                }
            }
            Event::DatagramsUnblocked => {}
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                let mut accepted = Vec::new();
                while let Some(id) = c.conn.streams().accept(Dir::Bi) {
                    c.accepted_bi = c.accepted_bi.max(id.index() + 1);
                    accepted.push(id);
                }
                Self::grow_stream_allowance(c, self.limits.max_concurrent_streams);
                for id in accepted {
                    self.read_stream(now, ch, id);
                }
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                // grinta uses no unidirectional streams (and allows the peer none).
            }
            Event::Stream(StreamEvent::Readable { id }) if c.draining.contains(&id) => {
                if Self::discard(c, id) {
                    c.draining.remove(&id);
                }
            }
            Event::Stream(StreamEvent::Readable { id }) if c.flow_streams.contains(&id) => {
                self.events.push_back(TransportEvent::FlowReadable {
                    conn: ch,
                    stream: id,
                });
            }
            Event::Stream(StreamEvent::Writable { id }) if c.flow_streams.contains(&id) => {
                self.events.push_back(TransportEvent::FlowWritable {
                    conn: ch,
                    stream: id,
                });
            }
            Event::Stream(StreamEvent::Stopped { id, error_code })
                if c.flow_streams.contains(&id) =>
            {
                self.events.push_back(TransportEvent::FlowStopped {
                    conn: ch,
                    stream: id,
                    code: error_code.into_inner(),
                });
            }
            Event::Stream(StreamEvent::Readable { id }) => self.read_stream(now, ch, id),
            Event::Stream(StreamEvent::Writable { id }) => {
                Self::flush_stream(c, id, &mut self.stats);
            }
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                Self::open_pending_flows(c, ch, &mut self.events);
            }
            Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                // The peer wants nothing more on a stream that is not a live flow: QUIC never
                // resets on its own, and an unreset sending half is never freed.
                c.outbound.remove(&id);
                let _ = c.conn.send_stream(id).reset(error_code);
            }
            Event::Stream(StreamEvent::Finished { .. })
            | Event::Stream(StreamEvent::Available { .. }) => {}
        }
    }

    fn read_stream(&mut self, now: Instant, ch: ConnectionHandle, id: StreamId) {
        let max = self.limits.max_stream_message_size;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        let is_reply = c.opened.contains(&id);
        if !is_reply && !c.inbound.contains_key(&id) && id.initiator() == c.conn.side() {
            // A stream this node opened and no longer follows: never a new request.
            Self::drain(c, id);
            return;
        }
        if !is_reply && !c.inbound.contains_key(&id) {
            // First bytes of a stream the peer opened: its kind.
            let kind = match c.conn.recv_stream(id).read(true) {
                Ok(mut chunks) => {
                    let kind = match chunks.next(1) {
                        Ok(Some(chunk)) => Ok(chunk.bytes.first().copied()),
                        Err(quinn_proto::ReadError::Blocked) => Ok(None),
                        // Ended or reset before saying what it is.
                        Ok(None) | Err(quinn_proto::ReadError::Reset(_)) => Err(()),
                    };
                    let _ = chunks.finalize();
                    kind
                }
                // Its receiving half is gone: this node read it to its end or stopped it, so
                // it was classified long ago (a flow released in the round that read its end,
                // say) and this is a stale readable event, not a new stream. Resetting it would
                // throw away what the flow still sends (a reply and its end).
                Err(_) => return,
            };
            let kind = match kind {
                Ok(kind) => kind,
                Err(()) => {
                    let code = VarInt::from_u32(StreamErrorCode::ProtocolViolation as u32);
                    let _ = c.conn.send_stream(id).reset(code);
                    return;
                }
            };
            match kind {
                None => return, // nothing yet
                Some(STREAM_KIND_FLOW) => {
                    c.flow_streams.insert(id);
                    self.events.push_back(TransportEvent::FlowIncoming {
                        conn: ch,
                        stream: id,
                    });
                    return;
                }
                Some(STREAM_KIND_PUSH_PULL) => {
                    let side = c.conn.side();
                    let requests = c.inbound.keys().filter(|s| s.initiator() != side).count();
                    if requests >= self.limits.max_inbound_exchanges {
                        // More exchanges at once than membership ever starts: refused.
                        self.stats.stream_messages_dropped += 1;
                        c.abort(id, StreamErrorCode::LimitExceeded as u64);
                        return;
                    }
                    c.inbound.insert(
                        id,
                        Inbound {
                            decoder: FrameDecoder::new(max),
                            deadline: now + self.limits.exchange_timeout,
                        },
                    );
                }
                Some(_) => {
                    self.stats.stream_messages_dropped += 1;
                    c.abort(id, StreamErrorCode::ProtocolViolation as u64);
                    return;
                }
            }
        }
        let exchange_timeout = self.limits.exchange_timeout;
        let decoder = &mut c
            .inbound
            .entry(id)
            .or_insert_with(|| Inbound {
                decoder: FrameDecoder::new(max),
                deadline: now + exchange_timeout,
            })
            .decoder;
        let mut failed = false;
        let mut finished = false;
        match c.conn.recv_stream(id).read(true) {
            Ok(mut chunks) => {
                loop {
                    match chunks.next(usize::MAX) {
                        Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
                        Ok(None) => {
                            finished = true;
                            break;
                        }
                        Err(quinn_proto::ReadError::Blocked) => break,
                        Err(quinn_proto::ReadError::Reset(_)) => {
                            failed = true;
                            break;
                        }
                    }
                }
                let _ = chunks.finalize();
            }
            Err(_) => failed = true,
        }
        let message = match decoder.next_frame() {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "bad stream message");
                failed = true;
                None
            }
        };
        if let Some(data) = message {
            c.inbound.remove(&id);
            if !finished && !failed {
                // One message per stream: anything after it is discarded until the end.
                Self::drain(c, id);
            }
            self.events.push_back(if is_reply {
                TransportEvent::StreamReply { conn: ch, data }
            } else {
                TransportEvent::StreamRequest {
                    conn: ch,
                    stream: id,
                    data,
                }
            });
            if is_reply {
                c.opened.remove(&id);
            }
            return;
        }
        if failed || finished {
            self.stats.stream_messages_dropped += 1;
            c.inbound.remove(&id);
            c.opened.remove(&id);
            let code = VarInt::from_u32(StreamErrorCode::ProtocolViolation as u32);
            let _ = c.conn.recv_stream(id).stop(code);
            if !is_reply {
                let _ = c.conn.send_stream(id).reset(code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_by_handle_keep_handle_order_and_shrink_when_freed() {
        let mut by = ByHandle::default();
        // Handles as quinn reuses them: taken, freed, taken again, 10,000 of them.
        for i in (0..10_000).rev() {
            by.insert(ConnectionHandle(i), i);
        }
        assert_eq!(by.len(), 10_000);
        by.insert(ConnectionHandle(9), 90);
        assert_eq!(by.len(), 10_000, "a replaced value is not counted twice");
        assert_eq!(by.get(&ConnectionHandle(9)), Some(&90));
        for i in (0..10_000).filter(|i| i % 3 != 0) {
            assert_eq!(by.remove(&ConnectionHandle(i)), Some(i));
        }
        assert_eq!(by.remove(&ConnectionHandle(1)), None);
        assert_eq!(by.remove(&ConnectionHandle(usize::MAX)), None);
        assert!(!by.contains_key(&ConnectionHandle(usize::MAX)));
        let kept: Vec<usize> = by.iter().map(|(ch, _)| ch.0).collect();
        assert_eq!(kept, (0..10_000).filter(|i| i % 3 == 0).collect::<Vec<_>>());
        assert_eq!(by.len(), kept.len());
        for v in by.values_mut() {
            *v += 1;
        }
        assert_eq!(by.values().next(), Some(&1));
        // Freeing the highest handles gives the vector's tail back.
        for i in (5_000..10_000).filter(|i| i % 3 == 0) {
            by.remove(&ConnectionHandle(i));
        }
        assert!(by.slots.len() <= 5_000);
        assert_eq!(by.iter().last().map(|(ch, _)| ch.0), Some(4_998));
    }
}
