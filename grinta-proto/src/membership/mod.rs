//! SWIM membership with Lifeguard, as a pure state machine.
//!
//! [`Membership`] tracks which nodes of the cluster are alive. It knows nothing of QUIC or sockets: it
//! takes received datagrams and reliable stream messages, timeouts and commands, and produces
//! [`Outgoing`] messages, one deadline ([`Membership::poll_timeout`]) and [`Event`]s. Time is an explicit
//! `Instant` input; randomness comes from the seed given to [`Membership::new`], so the same inputs
//! always give byte-identical outputs.
//!
//! The rules are those of `shared/spec/membership.md`: states and incarnations with refutation,
//! round-robin probing with indirect probes and Lifeguard nacks (sent at 0.8 x the prober's remaining
//! budget), local health scaling both the probe interval and the probe timeout, the dynamic suspicion
//! timeout with independent confirmations, a dissemination queue with replace-by-key and a guaranteed
//! share for application payloads, size-scaled push-pull anti-entropy, join with retry and backoff,
//! graceful leave, and periodic reconnection attempts towards failed members and seeds so partitions
//! heal.
//!
//! # Driving it
//!
//! After every input, drain `poll_transmit` until `None`, then read `poll_timeout`, then drain
//! `poll_event`. Call `handle_timeout` when the deadline passes (spurious calls are harmless).
//!
//! ```
//! use grinta_proto::claims::TrustAll;
//! use grinta_proto::membership::{Channel, Config, Membership};
//! use std::time::{Duration, Instant};
//!
//! let t0 = Instant::now(); // adapters read the clock; the state machine never does
//! let config = Config::lan();
//! // Every member is honest here; a node signs its claims with its TLS key instead.
//! let mut a = Membership::new(config.clone(), "a", "127.0.0.1:7001".parse()?, 1, t0, Box::new(TrustAll))?;
//! let mut b = Membership::new(config, "b", "127.0.0.1:7002".parse()?, 2, t0, Box::new(TrustAll))?;
//!
//! // b joins through a: push-pull over a reliable stream.
//! b.join(t0, &["127.0.0.1:7001".parse()?]);
//! let request = b.poll_outgoing().expect("join request");
//! assert_eq!(request.channel, Channel::Stream);
//! a.handle_stream(t0, b.local_addr(), &request.payload);
//! let reply = a.poll_outgoing().expect("push-pull reply");
//! b.handle_stream(t0, a.local_addr(), &reply.payload);
//!
//! assert_eq!(a.members().count(), 1);
//! assert_eq!(b.members().next().map(|m| m.name), Some("a".to_owned()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod broadcast;
mod config;
mod suspicion;
mod table;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tracing::{debug, trace, warn};

use crate::claims::{self, ClaimKeys, ClaimKind};
use crate::wire;
use broadcast::{BroadcastKey, BroadcastQueue, framed_broadcast_len, put_framed_broadcast};
pub use config::{Config, ConfigError, MAX_SETTING_DURATION, MIN_PACKET_SIZE};
use suspicion::Suspicion;
use table::{Entry, MemberTable};

/// Longest node name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The largest incarnation accepted from a peer (2^62). A node's incarnation grows by one per
/// refutation or metadata change, so an honest one never comes near it. An Alive beyond it is
/// refused as malformed, and an accusation (Suspect or Dead of another node) must be below it,
/// so its subject can always refute with `accused + 1`.
pub const MAX_INCARNATION: u64 = 1 << 62;

/// The furthest a member's own claim (an alive, a leave) may move its incarnation ahead of the
/// one this node knows (2^40). Incarnations start at the wall clock in milliseconds and grow by
/// one per refutation, so a restart after 34 years of downtime still fits; a claim further
/// ahead is refused and counted (`Stats::claims_refused`), so that no signed claim, even a
/// member's own, can push its incarnation near [`MAX_INCARNATION`] in one step.
pub const MAX_INCARNATION_STEP: u64 = 1 << 40;

/// Checks a node name: 1..=128 bytes of `[A-Za-z0-9._-]`.
///
/// ```
/// use grinta_proto::membership::validate_node_name;
/// assert!(validate_node_name("node-1.eu").is_ok());
/// assert!(validate_node_name("").is_err());
/// assert!(validate_node_name("bad name").is_err());
/// ```
pub fn validate_node_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(NameError::Length { len: name.len() });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::Character { character: c });
    }
    Ok(())
}

/// A node name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty or longer than [`MAX_NAME_LEN`].
    #[error("node name must be 1..=128 bytes long, got {len}")]
    Length {
        /// Length of the refused name.
        len: usize,
    },
    /// The name holds a character outside `[A-Za-z0-9._-]`.
    #[error("node name may only hold A-Z, a-z, 0-9, '.', '_' and '-'; found {character:?}")]
    Character {
        /// The first refused character.
        character: char,
    },
}

/// Why a [`Membership`] could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The local node name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
}

/// Why a membership command ([`Membership::update_meta`], [`Membership::broadcast_app`]) was
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The metadata is larger than `max_meta_size`.
    #[error("metadata of {size} bytes exceeds max_meta_size of {limit} bytes")]
    MetaTooLarge {
        /// Size of the refused metadata.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The application broadcast is larger than `max_app_broadcast_size`.
    #[error(
        "application broadcast of {size} bytes exceeds max_app_broadcast_size of {limit} bytes"
    )]
    AppBroadcastTooLarge {
        /// Size of the refused key plus payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The node has left the cluster; it takes no more commands.
    #[error("this node has left the cluster")]
    Left,
    /// The node's incarnation reached [`MAX_INCARNATION`]: it cannot take a newer one (only
    /// possible after a member pushed it there with forged claims).
    #[error("this node's incarnation reached the maximum of 2^62; restart it to start a new life")]
    IncarnationExhausted,
}

/// What a member is, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; it has until its suspicion timeout to refute.
    Suspect,
    /// Declared failed.
    Dead,
    /// Left the cluster on purpose.
    Left,
}

impl MemberState {
    fn to_wire(self) -> wire::MemberState {
        match self {
            Self::Alive => wire::MemberState::Alive,
            Self::Suspect => wire::MemberState::Suspect,
            Self::Dead => wire::MemberState::Dead,
            Self::Left => wire::MemberState::Left,
        }
    }

    fn is_gone(self) -> bool {
        matches!(self, Self::Dead | Self::Left)
    }
}

/// A member of the cluster as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Node name (the DNS SAN of its certificate on a QUIC transport).
    pub name: String,
    /// Where it can be reached.
    pub addr: SocketAddr,
    /// Its latest known incarnation.
    pub incarnation: u64,
    /// Its state.
    pub state: MemberState,
    /// Its application metadata.
    pub meta: Bytes,
}

/// Which way an [`Outgoing`] message must travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Unreliable datagram (a QUIC DATAGRAM frame); at most `max_packet_size` bytes.
    Datagram,
    /// Reliable, ordered message that opens an exchange (a push-pull request on a new QUIC stream);
    /// at most `max_push_pull_size` bytes.
    Stream,
    /// Reliable answer to the [`Stream`](Channel::Stream) message just handed to
    /// [`Membership::handle_stream`] from `dst`: a transport sends it back on the same stream.
    /// It is produced only during that call.
    StreamReply,
}

impl Channel {
    /// Whether the message needs a reliable stream.
    pub fn is_reliable(self) -> bool {
        !matches!(self, Self::Datagram)
    }
}

/// A message the membership wants sent (encoded), and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination address.
    pub dst: SocketAddr,
    /// Destination node name when known (not for seeds known only by address).
    pub dst_name: Option<String>,
    /// Datagram or stream.
    pub channel: Channel,
    /// The encoded `grinta.v1.Packet` (datagram) or `grinta.v1.PushPull` (stream).
    pub payload: Vec<u8>,
}

/// Something that happened to the cluster, as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A member was learnt of, or came back after being Dead or Left.
    MemberJoined(Member),
    /// An alive member changed its metadata or address.
    MemberUpdated(Member),
    /// A member is suspected of having failed.
    MemberSuspect {
        /// Node name.
        name: String,
        /// Incarnation suspected.
        incarnation: u64,
    },
    /// A suspected member refuted the suspicion.
    MemberAlive(Member),
    /// A member was declared failed.
    MemberDead {
        /// Node name.
        name: String,
        /// Incarnation declared dead.
        incarnation: u64,
    },
    /// A member left the cluster on purpose.
    MemberLeft {
        /// Node name.
        name: String,
        /// Incarnation at which it left.
        incarnation: u64,
    },
    /// This node refuted a suspicion or death claim about itself.
    Refuted {
        /// The new incarnation.
        incarnation: u64,
    },
    /// The first push-pull answer of a join arrived: this node has the cluster's state.
    Joined,
    /// A graceful leave finished spreading (or timed out); the node can close.
    LeaveComplete,
    /// An application broadcast arrived. The application merges it and, if it learnt something new,
    /// queues it again with [`Membership::broadcast_app`] (epidemic spread).
    AppBroadcast {
        /// The item's key.
        key: Bytes,
        /// The item's payload.
        payload: Bytes,
    },
    /// A peer's full application state arrived in a push-pull.
    AppState {
        /// Node name of the peer.
        from: String,
        /// The peer's application state.
        state: Bytes,
    },
}

/// Counters a user can read; they only ever grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams sent.
    pub packets_sent: u64,
    /// Datagram bytes sent.
    pub packet_bytes_sent: u64,
    /// Datagrams received (valid or not).
    pub packets_received: u64,
    /// Datagrams dropped because they did not decode or were invalid.
    pub packets_invalid: u64,
    /// Pings sent (direct probes, and pings on behalf of indirect probes).
    pub pings_sent: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Indirect probe requests sent.
    pub indirect_pings_sent: u64,
    /// Nacks sent.
    pub nacks_sent: u64,
    /// Gossip-only packets sent.
    pub gossip_packets_sent: u64,
    /// Push-pull messages sent (requests and replies).
    pub push_pulls_sent: u64,
    /// Push-pull bytes sent.
    pub push_pull_bytes_sent: u64,
    /// Members sent in full in push-pulls (a join's exchange carries every member; other
    /// exchanges carry a digest and then only the members the other side lacks).
    pub push_pull_members_sent: u64,
    /// Push-pull messages received.
    pub push_pulls_received: u64,
    /// Probes that ended without an ack.
    pub probes_failed: u64,
    /// Suspicions this node started after its own failed probe.
    pub suspicions_raised: u64,
    /// Members this node declared dead after their suspicion timed out.
    pub deaths_declared: u64,
    /// Refutations of suspicions about this node.
    pub refutations: u64,
    /// Broadcasts or entries dropped because a table or queue was full.
    pub dropped_for_limits: u64,
    /// Reconnection attempts towards failed members and seeds.
    pub reconnect_attempts: u64,
    /// Packets sent to a peer that gossiped stale accusations, carrying the newer alive news.
    pub corrections_sent: u64,
    /// Signed claims whose signature was checked and held.
    pub claims_verified: u64,
    /// Claims dropped because their signature did not hold: forged, altered, signed with a
    /// certificate the cluster CA does not vouch for, or from a signer whose certificate is not
    /// known yet.
    pub claims_rejected: u64,
    /// Claims dropped whatever their signature: an accusation from a node that is not a current
    /// member or above the incarnation known, or a claim jumping more than
    /// [`MAX_INCARNATION_STEP`] ahead.
    pub claims_refused: u64,
    /// Claims of this node that could not be signed (a broken key), and so were not sent.
    pub claims_unsigned: u64,
    /// Members asked in full of the node that relayed their alive, because it came without the
    /// certificate chain (too large for a packet) and this node had not learnt their
    /// certificate yet.
    pub members_fetched: u64,
    /// Alives of a member this node declared Dead and has since forgotten, at or below the
    /// incarnation it died at, relayed by another node: dropped. Such a member comes back with a
    /// newer incarnation, or by speaking for itself.
    pub forgotten_alives_dropped: u64,
}

#[derive(Debug)]
struct Probe {
    target: String,
    addr: SocketAddr,
    seq: u32,
    timeout_at: Instant,
    end_at: Instant,
    indirect_sent: bool,
    expected_nacks: u32,
    nacks: u32,
    acked: bool,
    /// The members asked to probe the target indirectly: with the target, the only nodes whose
    /// answers count.
    helpers: Vec<String>,
}

#[derive(Debug)]
struct IndirectProbe {
    /// The node probed on the origin's behalf: only its ack is forwarded.
    target: String,
    origin: SocketAddr,
    origin_name: String,
    origin_seq: u32,
    nack_at: Instant,
    expire_at: Instant,
    want_nack: bool,
    nack_sent: bool,
}

/// A member declared Dead, kept after its entry is reaped: retried for partitions to heal, and
/// remembered with the incarnation it died at so that its old alive, still relayed by nodes that
/// hold it Suspect, does not bring it back.
#[derive(Debug, Clone)]
struct FailedMember {
    name: String,
    addr: SocketAddr,
    incarnation: u64,
}

#[derive(Debug)]
enum Lifecycle {
    Running,
    Leaving { deadline: Instant },
    Left,
}

/// The SWIM + Lifeguard state machine of one node.
#[derive(Debug)]
pub struct Membership {
    config: Config,
    name: String,
    addr: SocketAddr,
    incarnation: u64,
    meta: Bytes,
    rng: ChaCha8Rng,
    /// Signs this node's claims and checks others'.
    keys: Box<dyn ClaimKeys>,
    /// This node's alive at its current incarnation, signed (`None` only if signing failed).
    own_alive: Option<wire::Signed>,
    /// The incarnation `own_alive` was signed at.
    own_alive_incarnation: u64,
    /// A refutation happened while processing the current packet or push-pull.
    refuted_in_input: bool,

    members: MemberTable,
    /// The probe walk: positions in `members`, valid until the next reshuffle (members are only
    /// removed when it reshuffles).
    probe_order: Vec<u32>,
    probe_cursor: usize,
    probe: Option<Probe>,
    next_probe: Instant,
    seq_no: u32,
    health: u32,

    suspicions: BTreeMap<String, Suspicion>,
    indirect: BTreeMap<u32, IndirectProbe>,

    member_queue: BroadcastQueue,
    app_queue: BroadcastQueue,
    app_state: Bytes,
    /// `push_pull::app_state_digest(&app_state)`.
    app_state_digest: u64,

    next_gossip: Instant,
    next_push_pull: Instant,
    next_reconnect: Instant,
    seeds: Vec<SocketAddr>,
    failed: VecDeque<FailedMember>,
    reconnect_cursor: usize,
    join_retry: Option<(Instant, Duration)>,
    joined: bool,
    /// Whether the node driving this state machine reports its connections
    /// ([`set_connected`](Self::set_connected)): gossip then prefers connected members.
    connection_hints: bool,
    lifecycle: Lifecycle,

    transmits: VecDeque<Outgoing>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Corrections for the sender of the packet being processed (see `correct_stale_sender`).
    corrections: Vec<Bytes>,
    /// The authenticated sender of the packet or push-pull being handled (empty between
    /// inputs): a forgotten member's alive at its old incarnation is taken only from itself.
    input_sender: String,
    /// Unknown members whose alive in the packet being handled came without its certificate
    /// chain and could not be checked: asked of the packet's sender once it is handled.
    to_fetch: Vec<String>,
    /// When each member was last asked for that way (bounded by [`MAX_FETCHES_REMEMBERED`]).
    fetched: hashbrown::HashMap<String, Instant>,
    /// Receive buffers reused from packet to packet (see [`decode_packet`](Self::decode_packet)).
    packet_buf: BytesMut,
    broadcasts_buf: Vec<wire::Broadcast>,
    /// The packet being built by `send_packet`, kept between packets.
    packet_out: Vec<u8>,
    /// A broadcast being encoded for the dissemination queue (which copies it).
    broadcast_out: Vec<u8>,
    /// What a claim's signature covers, built for each claim checked.
    signed_buf: Vec<u8>,
    /// A received alive, decoded (see `handle_alive`).
    alive_buf: wire::Alive,
    /// Senders this node did not know, asked for their state, and when (see
    /// `ask_unknown_sender`); at most [`MAX_ASKED`].
    asked: VecDeque<(String, Instant)>,
    /// Members asked for their state because their packets came from another address than
    /// they announce, and that address; at most [`MAX_ASKED_AT_ADDRESS`], oldest forgotten.
    asked_at_address: VecDeque<(String, SocketAddr)>,
    /// The application state sent with the last join request.
    join_app_state: Bytes,
    /// Where this node sent sum and digest requests not answered yet, and which, oldest first;
    /// at most [`MAX_EXCHANGES_AWAITING_REPLY`]. Only the answer to one of them may ask for
    /// members.
    exchanges_sent: VecDeque<(SocketAddr, push_pull::Exchange, Instant)>,
}

/// Most push-pull requests awaiting their answer (a node starts about one per push-pull
/// interval, plus reconnections and asks of unknown senders).
const MAX_EXCHANGES_AWAITING_REPLY: usize = 64;

/// How long a push-pull request waits for its answer at most (a node's transport gives up on
/// an exchange after 10 s).
const EXCHANGE_REPLY_WAIT: Duration = Duration::from_secs(60);

/// Most unknown senders remembered as asked for their state.
const MAX_ASKED: usize = 64;

/// Cluster size up to which [`MAX_ASKED`] asks per push-pull interval are allowed; past it, the
/// allowance shrinks in proportion (one ask costs a digest of every member, and during a mass
/// join, when most senders are unknown, much of the state itself): 20
/// at 100 members, 2 at 1,000, 1 from 2,048 on.
const ASK_FULL_ALLOWANCE_UP_TO: usize = 32;

/// Most (member, address) pairs remembered as asked for their state.
const MAX_ASKED_AT_ADDRESS: usize = 1024;

/// Most members asked of one relay per packet (see [`Membership::fetch_unchecked_members`]).
const MAX_FETCHES_PER_PACKET: usize = 8;

/// Most members remembered as fetched; past it, no member is fetched until older ones expire.
const MAX_FETCHES_REMEMBERED: usize = 1024;

/// How long before a member fetched of a relay may be fetched again.
const FETCH_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// The membership's timers, in the order [`Membership::handle_timeout`] runs those due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// The probe walk: a direct probe's timeout, its end, or the next probe.
    Probe,
    /// Indirect probes run for others: a nack due, or the entry's expiry.
    Indirect,
    /// Suspicions reaching their timeout (the member is declared dead).
    Suspicion,
    /// The next gossip round.
    Gossip,
    /// The next periodic push-pull.
    PushPull,
    /// The next attempt towards a failed member or an unanswered seed.
    Reconnect,
    /// The next join attempt, while not joined.
    JoinRetry,
}

impl Timer {
    const ALL: [Timer; 7] = [
        Timer::Probe,
        Timer::Indirect,
        Timer::Suspicion,
        Timer::Gossip,
        Timer::PushPull,
        Timer::Reconnect,
        Timer::JoinRetry,
    ];
}

/// Gives back the room of an output queue once drained, if a burst grew it (a join's push-pull
/// yields an event per member, and a queue never shrinks by itself): 10,000 nodes that each
/// learnt 10,000 members at once would otherwise keep a megabyte each.
fn release_drained<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 256 {
        queue.shrink_to(16);
    }
}

/// Most stale-news corrections gathered from one packet.
const MAX_CORRECTIONS: usize = 8;

/// Largest datagram accepted from the network, whatever the local budget.
const MAX_RECEIVED_PACKET: usize = 64 * 1024;

/// A list of decoded broadcasts longer than this is not kept for the next packet (a packet within
/// the datagram budget holds fewer).
const MAX_REUSED_BROADCASTS: usize = 64;

impl Membership {
    /// Creates the state machine of node `name`, reachable at `addr`, with all randomness drawn from
    /// `seed`, signing its claims and checking others' with `keys` (a node uses
    /// [`claims::CertificateKeys`]; [`claims::TrustAll`] only suits a run where every member is
    /// honest). The node knows nobody until it [`join`](Self::join)s or is joined.
    pub fn new(
        config: Config,
        name: &str,
        addr: SocketAddr,
        seed: u64,
        now: Instant,
        keys: Box<dyn ClaimKeys>,
    ) -> Result<Self, InitError> {
        config.validate()?;
        validate_node_name(name)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Stagger the periodic timers so nodes started together do not act in lockstep.
        let jitter = |rng: &mut ChaCha8Rng, d: Duration| d.mul_f64(rng.random::<f64>());
        let next_probe = now + jitter(&mut rng, config.probe_interval);
        let next_gossip = now + jitter(&mut rng, config.gossip_interval);
        let next_push_pull =
            now + config.push_pull_interval / 2 + jitter(&mut rng, config.push_pull_interval / 2);
        let next_reconnect = now + jitter(&mut rng, config.reconnect_interval);
        let initial_incarnation = config.initial_incarnation;
        let mut membership = Self {
            member_queue: BroadcastQueue::new(config.max_member_broadcasts),
            app_queue: BroadcastQueue::new(config.max_app_broadcasts),
            config,
            name: name.to_owned(),
            addr,
            incarnation: initial_incarnation,
            meta: Bytes::new(),
            rng,
            keys,
            own_alive: None,
            own_alive_incarnation: 0,
            refuted_in_input: false,
            members: MemberTable::new(now),
            probe_order: Vec::new(),
            probe_cursor: 0,
            probe: None,
            next_probe,
            seq_no: 0,
            health: 0,
            suspicions: BTreeMap::new(),
            indirect: BTreeMap::new(),
            app_state: Bytes::new(),
            app_state_digest: push_pull::app_state_digest(&[]),
            next_gossip,
            next_push_pull,
            next_reconnect,
            seeds: Vec::new(),
            failed: VecDeque::new(),
            reconnect_cursor: 0,
            join_retry: None,
            joined: false,
            connection_hints: false,
            lifecycle: Lifecycle::Running,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            corrections: Vec::new(),
            input_sender: String::new(),
            to_fetch: Vec::new(),
            fetched: hashbrown::HashMap::new(),
            packet_buf: BytesMut::new(),
            broadcasts_buf: Vec::new(),
            packet_out: Vec::new(),
            broadcast_out: Vec::new(),
            signed_buf: Vec::new(),
            alive_buf: wire::Alive::default(),
            asked: VecDeque::new(),
            asked_at_address: VecDeque::new(),
            exchanges_sent: VecDeque::new(),
            join_app_state: Bytes::new(),
        };
        membership.sign_own_alive();
        Ok(membership)
    }

    // ----- accessors -------------------------------------------------------------------------------

    /// This node's name.
    pub fn local_name(&self) -> &str {
        &self.name
    }

    /// This node's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node's metadata, as its alive announces it.
    pub fn local_meta(&self) -> &Bytes {
        &self.meta
    }

    /// This node's current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Tells membership whether the node holds an open connection to member `name` (unknown
    /// names are ignored). Optional: a node that reports its connections has its gossip
    /// targets, still drawn at random, lean towards connected members (three draws per target,
    /// the first connected one taken), so that a node whose connection budget is smaller than
    /// the cluster does not open a connection for half of its gossip packets.
    ///
    /// ```
    /// # use grinta_proto::membership::{Config, Membership};
    /// # use grinta_proto::claims::TrustAll;
    /// # let now = std::time::Instant::now();
    /// let mut m = Membership::new(Config::lan(), "a", "127.0.0.1:7000".parse().unwrap(), 1, now, Box::new(TrustAll)).unwrap();
    /// m.set_connected("b", true); // not a member yet: ignored
    /// ```
    pub fn set_connected(&mut self, name: &str, connected: bool) {
        self.connection_hints = true;
        if let Some(i) = self.members.find(name) {
            self.members.set_connected(i, connected);
        }
    }

    /// Lifeguard local health score, `0..awareness_max_multiplier` (0 is healthy).
    pub fn local_health(&self) -> u32 {
        self.health
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every member this node knows, itself excluded, in no particular order.
    ///
    /// Each [`Member`] is built on the way out (the table keeps members compact); to ask about
    /// one member, [`member_state`](Self::member_state) and [`member_addr`](Self::member_addr)
    /// build nothing.
    pub fn members(&self) -> impl Iterator<Item = Member> + '_ {
        self.members.iter().map(|e| e.member())
    }

    /// One member by name.
    pub fn member(&self, name: &str) -> Option<Member> {
        self.members.find(name).map(|i| self.members[i].member())
    }

    /// The state of member `name`, if known.
    pub fn member_state(&self, name: &str) -> Option<MemberState> {
        self.members.find(name).map(|i| self.members[i].state)
    }

    /// The metadata of member `name`, if known.
    pub fn member_meta(&self, name: &str) -> Option<Bytes> {
        self.members.find(name).map(|i| self.members[i].meta())
    }

    /// Every member's name and state, built from the table as it is (no allocation).
    pub fn member_states(&self) -> impl Iterator<Item = (&str, MemberState)> + '_ {
        self.members.iter().map(|e| (e.name(), e.state))
    }

    /// The address of member `name`, if known.
    pub fn member_addr(&self, name: &str) -> Option<SocketAddr> {
        self.members.find(name).map(|i| self.members[i].addr())
    }

    /// The latest alive of member `name`, as it signed it: what this node relays and puts in
    /// push-pulls (for tools that inspect or replay claims).
    pub fn signed_alive(&self, name: &str) -> Option<wire::Signed> {
        self.members.find(name).map(|i| self.members[i].alive())
    }

    /// Number of members known as Alive or Suspect, self excluded.
    pub fn live_members(&self) -> usize {
        self.members.iter().filter(|e| !e.state.is_gone()).count()
    }

    /// Whether `name` is this node or a member not declared gone: the nodes whose accusations
    /// count, and whose endpoint records a directory takes.
    pub fn is_current_member(&self, name: &str) -> bool {
        self.is_current(name)
    }

    /// Signs a claim of this node (an endpoint record it owns, say) with its keys.
    pub fn sign(&mut self, kind: ClaimKind, claim: &impl Message) -> Option<wire::Signed> {
        self.sign_claim(kind, claim)
    }

    /// Checks that node `signer` signed `claim`, a claim of `kind`; a failure is counted in
    /// [`Stats::claims_rejected`].
    pub fn verify(&mut self, signer: &str, kind: ClaimKind, claim: &wire::Signed) -> bool {
        self.verified(signer, kind, claim)
    }

    /// Counts a claim dropped whatever its signature (see [`Stats::claims_refused`]).
    pub fn count_refused_claim(&mut self) {
        self.stats.claims_refused += 1;
    }

    /// Whether a join completed (or the node was contacted by the cluster).
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Whether the node has finished leaving.
    pub fn has_left(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Left)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.dropped_for_limits += self.app_queue.dropped() + self.member_queue.dropped();
        stats
    }

    /// Broadcasts waiting to be disseminated (member news, application items).
    pub fn queued_broadcasts(&self) -> (usize, usize) {
        (self.member_queue.len(), self.app_queue.len())
    }

    /// Members known, self included: the `n` of the protocol's formulas.
    fn cluster_size(&self) -> usize {
        self.members.len() + 1
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.cluster_size() as f64;
        self.config.retransmit_mult * ((n + 1.0).log10().ceil() as u32).max(1)
    }

    fn scaled(&self, d: Duration) -> Duration {
        if self.config.lifeguard {
            d * (self.health + 1)
        } else {
            d
        }
    }

    fn adjust_health(&mut self, delta: i64) {
        if !self.config.lifeguard {
            return;
        }
        let max = i64::from(self.config.awareness_max_multiplier) - 1;
        self.health = (i64::from(self.health) + delta).clamp(0, max) as u32;
    }

    fn push_pull_interval(&self) -> Duration {
        let n = self.cluster_size() as f64;
        if n > 32.0 {
            let mult = ((n.log2() - 5.0).ceil() + 1.0).max(1.0);
            self.config.push_pull_interval.mul_f64(mult)
        } else {
            self.config.push_pull_interval
        }
    }

    // ----- commands --------------------------------------------------------------------------------

    /// Joins the cluster through `seeds`: a push-pull with each, retried with exponential backoff until
    /// one answers ([`Event::Joined`]). Seeds are also retried later if the node loses the cluster.
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) {
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        for seed in seeds {
            if *seed != self.addr && !self.seeds.contains(seed) {
                self.seeds.push(*seed);
            }
        }
        if self.seeds.is_empty() {
            return;
        }
        self.send_join_attempt(now);
        self.join_retry = Some((
            now + self.config.join_retry_initial,
            self.config.join_retry_initial,
        ));
    }

    /// Changes this node's metadata: takes the next incarnation and broadcasts it.
    pub fn update_meta(&mut self, meta: Bytes) -> Result<(), Error> {
        if meta.len() > self.config.max_meta_size {
            return Err(Error::MetaTooLarge {
                size: meta.len(),
                limit: self.config.max_meta_size,
            });
        }
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return Err(Error::Left);
        }
        if self.incarnation >= MAX_INCARNATION {
            return Err(Error::IncarnationExhausted);
        }
        self.meta = meta;
        self.incarnation += 1;
        self.broadcast_self_alive();
        Ok(())
    }

    /// Leaves the cluster gracefully: announces it and waits for the announcement to spread, then emits
    /// [`Event::LeaveComplete`]. After that the state machine ignores every input.
    pub fn leave(&mut self, now: Instant) {
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        let msg = wire::Dead {
            node: self.name.clone(),
            incarnation: self.incarnation,
            from: self.name.clone(),
        };
        if let Some(claim) = self.sign_claim(ClaimKind::Dead, &msg) {
            // Pinned: a full queue must not drop the leave this node waits to send.
            let encoded = wire::Broadcast {
                kind: Some(wire::broadcast::Kind::Dead(claim)),
            }
            .encode_to_vec();
            self.member_queue
                .push_pinned(BroadcastKey::Member(self.name.as_str().into()), &encoded);
        }
        self.probe = None;
        if self.live_members() == 0 {
            self.finish_leave();
        } else {
            self.lifecycle = Lifecycle::Leaving {
                deadline: now + self.config.leave_timeout,
            };
            // Spread it now rather than at the next gossip tick.
            self.gossip(now);
        }
    }

    /// Queues an application item for dissemination. An item with the same key replaces the queued one.
    pub fn broadcast_app(&mut self, key: Bytes, payload: Bytes) -> Result<(), Error> {
        self.broadcast_app_about(key, payload, None)
    }

    /// Queues an application item that node `about` originated (a record it owns, say): like
    /// [`broadcast_app`](Self::broadcast_app), but never sent to that node, which has it, so the
    /// item's transmissions all go to nodes that may not.
    pub fn broadcast_app_about(
        &mut self,
        key: Bytes,
        payload: Bytes,
        about: Option<&str>,
    ) -> Result<(), Error> {
        let size = key.len() + payload.len();
        if size > self.config.max_app_broadcast_size {
            return Err(Error::AppBroadcastTooLarge {
                size,
                limit: self.config.max_app_broadcast_size,
            });
        }
        let encoded = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::App(wire::AppBroadcast {
                key: key.clone(),
                payload,
            })),
        }
        .encode_to_vec();
        self.app_queue
            .push_about(BroadcastKey::App(key[..].into()), &encoded, about);
        Ok(())
    }

    /// Sets the application state carried in every push-pull (for example the endpoint table).
    pub fn set_app_state(&mut self, state: Bytes) {
        self.app_state_digest = push_pull::app_state_digest(&state);
        self.app_state = state;
    }

    // ----- outputs ---------------------------------------------------------------------------------

    /// Next bytes to send, if any.
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        let next = self.transmits.pop_front();
        release_drained(&mut self.transmits);
        next
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let next = self.events.pop_front();
        release_drained(&mut self.events);
        next
    }

    /// The next instant at which [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.lifecycle {
            Lifecycle::Left => return None,
            Lifecycle::Leaving { deadline } => {
                return Some(deadline.min(self.next_gossip));
            }
            Lifecycle::Running => {}
        }
        Timer::ALL.iter().filter_map(|&t| self.due(t)).min()
    }

    /// When `timer` is next due (`None`: not armed). With [`Timer::ALL`], the one table both
    /// [`poll_timeout`](Self::poll_timeout) and [`handle_timeout`](Self::handle_timeout) read.
    fn due(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::Probe => Some(match &self.probe {
                Some(p) if !p.acked && !p.indirect_sent => p.timeout_at,
                Some(p) => p.end_at,
                None => self.next_probe,
            }),
            Timer::Indirect => self
                .indirect
                .values()
                .map(|f| {
                    if f.want_nack && !f.nack_sent {
                        f.nack_at
                    } else {
                        f.expire_at
                    }
                })
                .min(),
            Timer::Suspicion => self.suspicions.values().map(|s| s.deadline).min(),
            Timer::Gossip => Some(self.next_gossip),
            Timer::PushPull => Some(self.next_push_pull),
            Timer::Reconnect => Some(self.next_reconnect),
            Timer::JoinRetry => self.join_retry.map(|(at, _)| at),
        }
    }

    /// Runs `timer`, due at `now`.
    fn run(&mut self, timer: Timer, now: Instant) {
        match timer {
            Timer::Probe => self.run_probe_timers(now),
            Timer::Indirect => self.run_indirect_timers(now),
            Timer::Suspicion => self.run_suspicion_timers(now),
            Timer::Gossip => {
                self.gossip(now);
                self.next_gossip = now + self.config.gossip_interval;
            }
            Timer::PushPull => {
                self.periodic_push_pull(now);
                self.next_push_pull = now + self.push_pull_interval();
            }
            Timer::Reconnect => self.reconnect(now),
            Timer::JoinRetry => {
                if let Some((_, backoff)) = self.join_retry {
                    self.send_join_attempt(now);
                    let backoff = (backoff * 2).min(self.config.join_retry_max);
                    self.join_retry = Some((now + backoff, backoff));
                }
            }
        }
    }

    // ----- inputs ----------------------------------------------------------------------------------

    /// Processes every timer due at `now`. Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.lifecycle {
            Lifecycle::Left => return,
            Lifecycle::Leaving { deadline } => {
                if now >= self.next_gossip {
                    self.gossip(now);
                    self.next_gossip = now + self.config.gossip_interval;
                }
                let key = BroadcastKey::Member(self.name.as_str().into());
                if now >= deadline || !self.member_queue.contains(&key) {
                    self.finish_leave();
                }
                return;
            }
            Lifecycle::Running => {}
        }

        // In the table's order; each timer's deadline is read just before it runs, so what one
        // timer arms for `now` runs in the same call.
        for timer in Timer::ALL {
            if self.due(timer).is_some_and(|at| at <= now) {
                self.run(timer, now);
            }
        }
    }

    /// Processes a datagram (an encoded `grinta.v1.Packet`) received from `from`.
    ///
    /// Anything that does not decode or is invalid is dropped and counted; nothing panics.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if data.len() > MAX_RECEIVED_PACKET {
            self.stats.packets_received += 1;
            self.stats.packets_invalid += 1;
            return;
        }
        // Copied once into a buffer of this node's: the decoded fields are slices of it, not one
        // allocation each.
        self.packet_buf.clear();
        self.packet_buf.extend_from_slice(data);
        let data = self.packet_buf.split().freeze();
        match self.decode_packet(data) {
            Ok(packet) => self.handle_packet(now, from, packet),
            Err(_) => {
                self.stats.packets_received += 1;
                self.stats.packets_invalid += 1;
                trace!(%from, "dropping undecodable membership packet");
            }
        }
    }

    /// Decodes a membership packet, its broadcasts into a list reused from the previous packet
    /// handled (a packet holds up to about 30: decoded afresh, the list would grow five times).
    /// Bytes fields are slices of `data`.
    pub fn decode_packet(&mut self, data: Bytes) -> Result<wire::Packet, prost::DecodeError> {
        let mut packet = wire::Packet {
            broadcasts: std::mem::take(&mut self.broadcasts_buf),
            ..Default::default()
        };
        packet.merge(data)?;
        Ok(packet)
    }

    /// Processes an already decoded membership packet from `from` (a transport that had to read the
    /// sender name to authenticate it uses this to avoid decoding twice).
    pub fn handle_packet(&mut self, now: Instant, from: SocketAddr, mut packet: wire::Packet) {
        self.stats.packets_received += 1;
        if matches!(self.lifecycle, Lifecycle::Left) {
            return;
        }
        self.refuted_in_input = false;
        self.to_fetch.clear();
        if validate_node_name(&packet.sender).is_err() {
            self.stats.packets_invalid += 1;
            return;
        }
        self.input_sender.clear();
        self.input_sender.push_str(&packet.sender);
        // Broadcasts first: a refutation they trigger then rides on the ack to this very packet's
        // ping, which is how a suspected member answers the buddy system at once.
        let mut broadcasts = std::mem::take(&mut packet.broadcasts);
        for b in broadcasts.drain(..) {
            if let Some(kind) = b.kind {
                self.handle_broadcast(now, kind, Some(from));
            }
        }
        if broadcasts.capacity() <= MAX_REUSED_BROADCASTS {
            self.broadcasts_buf = broadcasts;
        }
        self.input_sender.clear();
        self.correct_dead_sender(&packet.sender);
        self.fetch_unchecked_members(now, from, &packet.sender);
        self.ask_unknown_sender(now, from, &packet.sender);
        self.send_corrections(from, &packet.sender);
        if let Some(message) = packet.message {
            self.handle_message(now, from, &packet.sender, message);
        }
    }

    /// Processes a reliable stream message (an encoded `grinta.v1.PushPull`) received from `from`.
    pub fn handle_stream(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if data.len() > self.config.max_push_pull_size {
            self.stats.packets_invalid += 1;
            return;
        }
        // Copied once and decoded from the copy: bytes fields (claims, addresses, the
        // application state) are slices of it, not an allocation each. What outlives the
        // exchange is copied out where it is kept (claims, metadata). Not into the buffer kept
        // for datagrams: a join's state can be a megabyte, which that buffer would keep.
        let data = Bytes::copy_from_slice(data);
        match wire::PushPull::decode(data) {
            Ok(mut pp) => {
                // Handed to the application (`Event::AppState`), which may keep it: in a buffer
                // of its own, not a slice that keeps the whole message alive.
                if !pp.app_state.is_empty() {
                    pp.app_state = Bytes::copy_from_slice(&pp.app_state);
                }
                self.handle_push_pull(now, from, pp)
            }
            Err(_) => self.stats.packets_invalid += 1,
        }
    }

    /// Processes an already decoded push-pull message from `from`. A request produces its reply as a
    /// [`Channel::StreamReply`] transmit during this call.
    pub fn handle_push_pull(&mut self, now: Instant, from: SocketAddr, pp: wire::PushPull) {
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        if pp.protocol_version != wire::PROTOCOL_VERSION || validate_node_name(&pp.sender).is_err()
        {
            self.stats.packets_invalid += 1;
            return;
        }
        self.stats.push_pulls_received += 1;
        self.refuted_in_input = false;
        self.input_sender.clear();
        self.input_sender.push_str(&pp.sender);
        self.merge_remote_state(now, &pp);
        self.input_sender.clear();
        // A forgotten member that spoke for itself is told it died, in a packet of its own.
        self.send_corrections(from, &pp.sender);
        // A push-pull carries whole claims: what it could not check, a fetch would not either.
        self.to_fetch.clear();
        if !pp.app_state.is_empty() {
            self.events.push_back(Event::AppState {
                from: pp.sender.clone(),
                state: pp.app_state.clone(),
            });
        }
        // An answer to our join, or being contacted by the cluster: either way this node is in.
        if !self.joined {
            self.joined = true;
            self.join_retry = None;
            self.events.push_back(Event::Joined);
            // The join was a full exchange: the next one is due a (size-scaled) interval later,
            // at a random point of it so that nodes joining together do not exchange together.
            let interval = self.push_pull_interval();
            self.next_push_pull =
                now + interval / 2 + interval.mul_f64(self.rng.random::<f64>() / 2.0);
            if pp.reply && self.app_state != self.join_app_state {
                // The application changed its state (registered endpoints, say) while the join
                // was under way: the seed has not seen it yet.
                self.send_push_pull(now, from, Some(pp.sender.clone()), push_pull::Exchange::Sum);
            }
        }
        if pp.reply {
            self.push_wanted(now, from, &pp);
        } else {
            self.answer_push_pull(from, &pp);
        }
    }
}

/// Scratch buffers kept from use to use hold at most this much: one large input (a claim padded
/// to megabytes) must not leave its size behind for good.
const MAX_KEPT_SCRATCH: usize = 64 * 1024;

/// Gives `buffer` back to `slot` for the next use, unless it grew past [`MAX_KEPT_SCRATCH`].
fn keep_scratch(slot: &mut Vec<u8>, buffer: Vec<u8>) {
    if buffer.capacity() <= MAX_KEPT_SCRATCH {
        *slot = buffer;
    }
}

/// Appends the encoding of a `grinta.v1.Alive` with these fields to `out`, byte for byte as
/// prost encodes one, without building it (its name and address would each be an allocation).
pub(crate) fn encode_alive_fields(
    node: &str,
    incarnation: u64,
    addr: SocketAddr,
    meta: &[u8],
    out: &mut impl bytes::BufMut,
) {
    if !node.is_empty() {
        wire::put_delimited(1, node.as_bytes(), out);
    }
    if incarnation != 0 {
        prost::encoding::uint64::encode(2, &incarnation, out);
    }
    put_socket_address(3, addr, out);
    if !meta.is_empty() {
        wire::put_delimited(4, meta, out);
    }
}

/// Appends `addr` as field `tag`, a `grinta.v1.SocketAddress` of `ip` (1) and `port` (2, left
/// out at zero), as prost encodes `Some(encode_addr(addr))`.
pub(crate) fn put_socket_address(tag: u32, addr: SocketAddr, out: &mut impl bytes::BufMut) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let (octets, len) = ip_octets(addr);
    let ip = &octets[..len];
    let port = addr.port();
    let port_len = if port != 0 {
        prost::encoding::uint32::encoded_len(2, &u32::from(port))
    } else {
        0
    };
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint((wire::delimited_len(1, ip.len()) + port_len) as u64, out);
    wire::put_delimited(1, ip, out);
    if port != 0 {
        prost::encoding::uint32::encode(2, &u32::from(port), out);
    }
}

/// The IP address's bytes in network order, in an array of 16 of which the first 4 (IPv4) or
/// all 16 (IPv6) count.
pub(crate) fn ip_octets(addr: SocketAddr) -> ([u8; 16], usize) {
    let mut octets = [0; 16];
    match addr.ip() {
        IpAddr::V4(ip) => {
            octets[..4].copy_from_slice(&ip.octets());
            (octets, 4)
        }
        IpAddr::V6(ip) => (ip.octets(), 16),
    }
}

/// Encodes a socket address for the wire.
pub(crate) fn encode_addr(addr: SocketAddr) -> wire::SocketAddress {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    };
    wire::SocketAddress {
        ip,
        port: u32::from(addr.port()),
    }
}

/// Decodes a wire socket address; `None` for a wrong IP length or an out-of-range port.
pub(crate) fn decode_addr(addr: &wire::SocketAddress) -> Option<SocketAddr> {
    let port = u16::try_from(addr.port).ok().filter(|p| *p != 0)?;
    let ip = match addr.ip.len() {
        4 => {
            let o: [u8; 4] = addr.ip[..].try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(o))
        }
        16 => {
            let o: [u8; 16] = addr.ip[..].try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

mod gossip;
mod probe;
mod push_pull;
mod rules;
#[cfg(test)]
mod tests;
