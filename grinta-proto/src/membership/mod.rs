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
//! use grinta_proto::membership::{Channel, Config, Membership};
//! use std::time::{Duration, Instant};
//!
//! let t0 = Instant::now(); // adapters read the clock; the state machine never does
//! let config = Config::lan();
//! let mut a = Membership::new(config.clone(), "a", "127.0.0.1:7001".parse()?, 1, t0)?;
//! let mut b = Membership::new(config, "b", "127.0.0.1:7002".parse()?, 2, t0)?;
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
//! assert_eq!(b.members().next().map(|m| m.name.as_str()), Some("a"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod broadcast;
mod config;
mod suspicion;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tracing::{debug, trace};

use crate::wire;
use broadcast::{BroadcastKey, BroadcastQueue, framed_broadcast_len};
pub use config::{Config, ConfigError, MAX_SETTING_DURATION, MIN_PACKET_SIZE};
use suspicion::Suspicion;

/// Longest node name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The largest incarnation accepted from a peer (2^62). A node's incarnation grows by one per
/// refutation or metadata change, so an honest one never comes near it. An Alive beyond it is
/// refused as malformed, and an accusation (Suspect or Dead of another node) must be below it,
/// so its subject can always refute with `accused + 1`.
pub const MAX_INCARNATION: u64 = 1 << 62;

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

#[derive(Debug)]
struct Entry {
    member: Member,
    state_change: Instant,
}

#[derive(Debug, Clone)]
struct FailedMember {
    name: String,
    addr: SocketAddr,
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

    members: Vec<Entry>,
    index: HashMap<String, usize>,
    probe_order: Vec<String>,
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

    next_gossip: Instant,
    next_push_pull: Instant,
    next_reconnect: Instant,
    seeds: Vec<SocketAddr>,
    failed: VecDeque<FailedMember>,
    reconnect_cursor: usize,
    join_retry: Option<(Instant, Duration)>,
    joined: bool,
    lifecycle: Lifecycle,

    transmits: VecDeque<Outgoing>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Corrections for the sender of the packet being processed (see `correct_stale_sender`).
    corrections: Vec<Bytes>,
}

/// Most stale-news corrections gathered from one packet.
const MAX_CORRECTIONS: usize = 8;

/// Largest datagram accepted from the network, whatever the local budget.
const MAX_RECEIVED_PACKET: usize = 64 * 1024;

impl Membership {
    /// Creates the state machine of node `name`, reachable at `addr`, with all randomness drawn from
    /// `seed`. The node knows nobody until it [`join`](Self::join)s or is joined.
    pub fn new(
        config: Config,
        name: &str,
        addr: SocketAddr,
        seed: u64,
        now: Instant,
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
        Ok(Self {
            member_queue: BroadcastQueue::new(config.max_members + 1),
            app_queue: BroadcastQueue::new(config.max_app_broadcasts),
            config,
            name: name.to_owned(),
            addr,
            incarnation: initial_incarnation,
            meta: Bytes::new(),
            rng,
            members: Vec::new(),
            index: HashMap::new(),
            probe_order: Vec::new(),
            probe_cursor: 0,
            probe: None,
            next_probe,
            seq_no: 0,
            health: 0,
            suspicions: BTreeMap::new(),
            indirect: BTreeMap::new(),
            app_state: Bytes::new(),
            next_gossip,
            next_push_pull,
            next_reconnect,
            seeds: Vec::new(),
            failed: VecDeque::new(),
            reconnect_cursor: 0,
            join_retry: None,
            joined: false,
            lifecycle: Lifecycle::Running,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            corrections: Vec::new(),
        })
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

    /// This node's current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
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
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().map(|e| &e.member)
    }

    /// One member by name.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.index.get(name).map(|&i| &self.members[i].member)
    }

    /// Number of members known as Alive or Suspect, self excluded.
    pub fn live_members(&self) -> usize {
        self.members
            .iter()
            .filter(|e| !e.member.state.is_gone())
            .count()
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
        self.queue_member_broadcast(self.name.clone(), wire::broadcast::Kind::Dead(msg));
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
        self.app_queue.push(BroadcastKey::App(key), encoded.into());
        Ok(())
    }

    /// Sets the application state carried in every push-pull (for example the endpoint table).
    pub fn set_app_state(&mut self, state: Bytes) {
        self.app_state = state;
    }

    // ----- outputs ---------------------------------------------------------------------------------

    /// Next bytes to send, if any.
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.transmits.pop_front()
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
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
        let mut t = self
            .next_gossip
            .min(self.next_push_pull)
            .min(self.next_reconnect);
        match &self.probe {
            Some(p) if !p.acked && !p.indirect_sent => t = t.min(p.timeout_at),
            Some(p) => t = t.min(p.end_at),
            None => t = t.min(self.next_probe),
        }
        if let Some((retry, _)) = self.join_retry {
            t = t.min(retry);
        }
        for s in self.suspicions.values() {
            t = t.min(s.deadline);
        }
        for f in self.indirect.values() {
            t = t.min(if f.want_nack && !f.nack_sent {
                f.nack_at
            } else {
                f.expire_at
            });
        }
        Some(t)
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
                let key = BroadcastKey::Member(self.name.clone());
                if now >= deadline || !self.member_queue.contains(&key) {
                    self.finish_leave();
                }
                return;
            }
            Lifecycle::Running => {}
        }

        self.run_probe_timers(now);
        self.run_indirect_timers(now);
        self.run_suspicion_timers(now);

        if now >= self.next_gossip {
            self.gossip(now);
            self.next_gossip = now + self.config.gossip_interval;
        }
        if now >= self.next_push_pull {
            self.periodic_push_pull(now);
            self.next_push_pull = now + self.push_pull_interval();
        }
        if now >= self.next_reconnect {
            self.reconnect(now);
        }
        if let Some((retry, backoff)) = self.join_retry {
            if now >= retry {
                self.send_join_attempt(now);
                let backoff = (backoff * 2).min(self.config.join_retry_max);
                self.join_retry = Some((now + backoff, backoff));
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
        match wire::Packet::decode(data) {
            Ok(packet) => self.handle_packet(now, from, packet),
            Err(_) => {
                self.stats.packets_received += 1;
                self.stats.packets_invalid += 1;
                trace!(%from, "dropping undecodable membership packet");
            }
        }
    }

    /// Processes an already decoded membership packet from `from` (a transport that had to read the
    /// sender name to authenticate it uses this to avoid decoding twice).
    pub fn handle_packet(&mut self, now: Instant, from: SocketAddr, packet: wire::Packet) {
        self.stats.packets_received += 1;
        if matches!(self.lifecycle, Lifecycle::Left) {
            return;
        }
        if validate_node_name(&packet.sender).is_err() {
            self.stats.packets_invalid += 1;
            return;
        }
        // Broadcasts first: a refutation they trigger then rides on the ack to this very packet's
        // ping, which is how a suspected member answers the buddy system at once.
        for b in packet.broadcasts {
            if let Some(kind) = b.kind {
                self.handle_broadcast(now, kind, Some(from));
            }
        }
        self.correct_dead_sender(&packet.sender);
        if !self.corrections.is_empty() {
            let corrections = std::mem::take(&mut self.corrections);
            self.stats.corrections_sent += 1;
            self.send_packet(from, Some(packet.sender.clone()), None, &corrections);
        }
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
        match wire::PushPull::decode(data) {
            Ok(pp) => self.handle_push_pull(now, from, pp),
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
        self.merge_remote_state(now, &pp);
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
        }
        if !pp.reply {
            self.send_push_pull(from, Some(pp.sender.clone()), false, true);
        }
    }

    // ----- probing ---------------------------------------------------------------------------------

    fn next_seq(&mut self) -> u32 {
        self.seq_no = self.seq_no.wrapping_add(1);
        self.seq_no
    }

    fn run_probe_timers(&mut self, now: Instant) {
        if let Some(p) = &self.probe {
            if !p.acked && !p.indirect_sent && now >= p.timeout_at {
                self.send_indirect_probes(now);
            }
        }
        if self.probe.as_ref().is_some_and(|p| now >= p.end_at) {
            self.finish_probe(now);
        }
        if self.probe.is_none() && now >= self.next_probe {
            self.start_probe(now);
        }
    }

    /// Picks the next target of the round-robin walk, reshuffling at each wrap-around.
    fn next_probe_target(&mut self, now: Instant) -> Option<usize> {
        for _ in 0..2 {
            while self.probe_cursor < self.probe_order.len() {
                let name = &self.probe_order[self.probe_cursor];
                self.probe_cursor += 1;
                if let Some(&i) = self.index.get(name) {
                    if !self.members[i].member.state.is_gone() {
                        return Some(i);
                    }
                }
            }
            self.reshuffle_probe_order(now);
        }
        None
    }

    fn reshuffle_probe_order(&mut self, now: Instant) {
        // Forget Dead and Left members once they have been gossiped about long enough.
        let reap: Vec<String> = self
            .members
            .iter()
            .filter(|e| {
                e.member.state.is_gone()
                    && now.saturating_duration_since(e.state_change)
                        >= self.config.gossip_to_the_dead_time
            })
            .map(|e| e.member.name.clone())
            .collect();
        for name in reap {
            self.remove_member(&name);
        }
        let last = self.probe_order.last().cloned();
        self.probe_order = self.members.iter().map(|e| e.member.name.clone()).collect();
        // Fisher-Yates with our seeded generator.
        for i in (1..self.probe_order.len()).rev() {
            let j = self.rng.random_range(0..=i);
            self.probe_order.swap(i, j);
        }
        // Never probe the same member twice in a row across the wrap-around.
        if self.probe_order.len() > 1 && self.probe_order.first() == last.as_ref() {
            let j = self.rng.random_range(1..self.probe_order.len());
            self.probe_order.swap(0, j);
        }
        self.probe_cursor = 0;
    }

    fn remove_member(&mut self, name: &str) {
        let Some(i) = self.index.remove(name) else {
            return;
        };
        self.members.swap_remove(i);
        if i < self.members.len() {
            let moved = self.members[i].member.name.clone();
            self.index.insert(moved, i);
        }
        self.suspicions.remove(name);
        self.member_queue
            .remove(&BroadcastKey::Member(name.to_owned()));
    }

    fn start_probe(&mut self, now: Instant) {
        let interval = self.scaled(self.config.probe_interval);
        let Some(i) = self.next_probe_target(now) else {
            self.next_probe = now + interval;
            return;
        };
        let seq = self.next_seq();
        let target = self.members[i].member.clone();
        let buddy: Option<Bytes> = if target.state == MemberState::Suspect && self.config.lifeguard
        {
            // Buddy system: tell the target it is suspected so it can refute at once.
            Some(
                wire::Broadcast {
                    kind: Some(wire::broadcast::Kind::Suspect(wire::Suspect {
                        node: target.name.clone(),
                        incarnation: target.incarnation,
                        from: self.name.clone(),
                    })),
                }
                .encode_to_vec()
                .into(),
            )
        } else {
            None
        };
        let ping = wire::packet::Message::Ping(wire::Ping {
            seq_no: seq,
            target: target.name.clone(),
            source_addr: Some(encode_addr(self.addr)),
        });
        self.stats.pings_sent += 1;
        self.send_packet(
            target.addr,
            Some(target.name.clone()),
            Some(ping),
            buddy.as_slice(),
        );
        self.probe = Some(Probe {
            target: target.name,
            addr: target.addr,
            seq,
            timeout_at: now + self.scaled(self.config.probe_timeout),
            end_at: now + interval,
            indirect_sent: false,
            expected_nacks: 0,
            nacks: 0,
            acked: false,
            helpers: Vec::new(),
        });
        self.next_probe = now + interval;
    }

    fn send_indirect_probes(&mut self, now: Instant) {
        let Some(p) = self.probe.as_mut() else {
            return;
        };
        p.indirect_sent = true;
        let (target, addr, seq, end_at) = (p.target.clone(), p.addr, p.seq, p.end_at);
        let helpers = self.random_members(self.config.indirect_checks, |m| {
            m.state == MemberState::Alive && m.name != target
        });
        let budget = end_at.saturating_duration_since(now);
        let want_nack = self.config.lifeguard;
        for h in &helpers {
            let (helper_addr, helper_name) = {
                let m = &self.members[*h].member;
                (m.addr, m.name.clone())
            };
            let msg = wire::packet::Message::IndirectPing(wire::IndirectPing {
                seq_no: seq,
                target: target.clone(),
                target_addr: Some(encode_addr(addr)),
                budget_micros: budget.as_micros() as u64,
                want_nack,
                source_addr: Some(encode_addr(self.addr)),
            });
            self.stats.indirect_pings_sent += 1;
            self.send_packet(helper_addr, Some(helper_name), Some(msg), &[]);
        }
        let helper_names: Vec<String> = helpers
            .iter()
            .map(|&h| self.members[h].member.name.clone())
            .collect();
        if let Some(p) = self.probe.as_mut() {
            p.expected_nacks = if want_nack { helpers.len() as u32 } else { 0 };
            p.helpers = helper_names;
        }
    }

    fn finish_probe(&mut self, now: Instant) {
        let Some(p) = self.probe.take() else {
            return;
        };
        if p.acked {
            return;
        }
        self.stats.probes_failed += 1;
        let delta = if p.expected_nacks == 0 {
            1
        } else {
            i64::from(p.expected_nacks.saturating_sub(p.nacks))
        };
        self.adjust_health(delta);
        let Some(&i) = self.index.get(&p.target) else {
            return;
        };
        let m = &self.members[i].member;
        if m.state.is_gone() {
            return;
        }
        let msg = wire::Suspect {
            node: m.name.clone(),
            incarnation: m.incarnation,
            from: self.name.clone(),
        };
        debug!(target = %p.target, "probe failed, suspecting");
        if m.state == MemberState::Alive {
            self.stats.suspicions_raised += 1;
        }
        self.apply_suspect(now, msg, None);
    }

    fn handle_message(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: &str,
        message: wire::packet::Message,
    ) {
        use wire::packet::Message as M;
        match message {
            M::Ping(ping) => {
                if !ping.target.is_empty() && ping.target != self.name {
                    return; // meant for a previous owner of this address
                }
                self.stats.acks_sent += 1;
                let ack = M::Ack(wire::Ack {
                    seq_no: ping.seq_no,
                });
                self.send_packet(from, Some(sender.to_owned()), Some(ack), &[]);
            }
            M::IndirectPing(req) => {
                let Some(target_addr) = req.target_addr.as_ref().and_then(decode_addr) else {
                    self.stats.packets_invalid += 1;
                    return;
                };
                if validate_node_name(&req.target).is_err() {
                    self.stats.packets_invalid += 1;
                    return;
                }
                if self.indirect.len() >= self.config.max_pending_indirect {
                    self.stats.dropped_for_limits += 1;
                    return;
                }
                let seq = self.next_seq();
                // Bound the budget: a peer cannot make us hold state for long.
                let budget = Duration::from_micros(req.budget_micros)
                    .min(self.config.probe_interval * self.config.awareness_max_multiplier);
                self.indirect.insert(
                    seq,
                    IndirectProbe {
                        target: req.target.clone(),
                        origin: from,
                        origin_name: sender.to_owned(),
                        origin_seq: req.seq_no,
                        nack_at: now + budget.mul_f64(0.8),
                        expire_at: now + budget,
                        want_nack: req.want_nack,
                        nack_sent: false,
                    },
                );
                let ping = M::Ping(wire::Ping {
                    seq_no: seq,
                    target: req.target.clone(),
                    source_addr: Some(encode_addr(self.addr)),
                });
                self.stats.pings_sent += 1;
                self.send_packet(target_addr, Some(req.target), Some(ping), &[]);
            }
            M::Ack(ack) => {
                // Only the node probed, or a helper asked to probe it, answers a probe: a
                // sequence number guessed by anyone else proves nothing.
                if let Some(p) = self.probe.as_mut() {
                    let entitled = p.target == sender || p.helpers.iter().any(|h| h == sender);
                    if p.seq == ack.seq_no && !p.acked && entitled {
                        p.acked = true;
                        self.adjust_health(-1);
                        return;
                    }
                }
                if self
                    .indirect
                    .get(&ack.seq_no)
                    .is_some_and(|fwd| fwd.target == sender)
                {
                    let Some(fwd) = self.indirect.remove(&ack.seq_no) else {
                        return;
                    };
                    self.stats.acks_sent += 1;
                    let msg = M::Ack(wire::Ack {
                        seq_no: fwd.origin_seq,
                    });
                    self.send_packet(fwd.origin, Some(fwd.origin_name), Some(msg), &[]);
                }
            }
            M::Nack(nack) => {
                if let Some(p) = self.probe.as_mut() {
                    if p.seq == nack.seq_no
                        && p.indirect_sent
                        && p.helpers.iter().any(|h| h == sender)
                    {
                        p.nacks = (p.nacks + 1).min(p.expected_nacks);
                    }
                }
            }
        }
    }

    fn run_indirect_timers(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .indirect
            .iter()
            .filter(|(_, f)| {
                now >= f.expire_at || (f.want_nack && !f.nack_sent && now >= f.nack_at)
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in due {
            let Some(f) = self.indirect.get_mut(&seq) else {
                continue;
            };
            if f.want_nack && !f.nack_sent && now >= f.nack_at {
                f.nack_sent = true;
                let (origin, name, origin_seq) = (f.origin, f.origin_name.clone(), f.origin_seq);
                self.stats.nacks_sent += 1;
                let msg = wire::packet::Message::Nack(wire::Nack { seq_no: origin_seq });
                self.send_packet(origin, Some(name), Some(msg), &[]);
            }
            if self.indirect.get(&seq).is_some_and(|f| now >= f.expire_at) {
                self.indirect.remove(&seq);
            }
        }
    }

    // ----- suspicion, refutation, state rules --------------------------------------------------------

    fn run_suspicion_timers(&mut self, now: Instant) {
        let due: Vec<(String, u64)> = self
            .suspicions
            .iter()
            .filter(|(_, s)| now >= s.deadline)
            .map(|(name, s)| (name.clone(), s.incarnation))
            .collect();
        for (name, incarnation) in due {
            self.suspicions.remove(&name);
            let Some(&i) = self.index.get(&name) else {
                continue;
            };
            if self.members[i].member.state != MemberState::Suspect {
                continue;
            }
            self.stats.deaths_declared += 1;
            let msg = wire::Dead {
                node: name,
                incarnation,
                from: self.name.clone(),
            };
            self.apply_dead(now, msg, None);
        }
    }

    /// A packet from `from` accused member `i` at an incarnation older than the one we know alive:
    /// its sender missed a refutation, and gossip about the stale incarnation dies out without
    /// reaching the member. Tell the sender directly (collected per packet, one answer per packet).
    fn correct_stale_sender(&mut self, i: usize, from: Option<SocketAddr>) {
        let m = &self.members[i].member;
        if from.is_none()
            || m.state != MemberState::Alive
            || self.corrections.len() >= MAX_CORRECTIONS
        {
            return;
        }
        let alive = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Alive(wire::Alive {
                node: m.name.clone(),
                incarnation: m.incarnation,
                addr: Some(encode_addr(m.addr)),
                meta: m.meta.clone(),
            })),
        };
        self.corrections.push(alive.encode_to_vec().into());
    }

    /// A packet from a member we hold Dead: it is running but missed its own death (a
    /// partition, or gossip that died out before reaching it). Tell it, so that it refutes;
    /// otherwise it would go on probing a cluster that ignores it.
    fn correct_dead_sender(&mut self, sender: &str) {
        let Some(&i) = self.index.get(sender) else {
            return;
        };
        let m = &self.members[i].member;
        if m.state != MemberState::Dead
            || m.incarnation >= MAX_INCARNATION
            || self.corrections.len() >= MAX_CORRECTIONS
        {
            return;
        }
        let dead = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Dead(wire::Dead {
                node: m.name.clone(),
                incarnation: m.incarnation,
                from: self.name.clone(),
            })),
        };
        self.corrections.push(dead.encode_to_vec().into());
    }

    fn handle_broadcast(
        &mut self,
        now: Instant,
        kind: wire::broadcast::Kind,
        from: Option<SocketAddr>,
    ) {
        use wire::broadcast::Kind;
        match kind {
            Kind::Alive(a) => self.apply_alive(now, a),
            Kind::Suspect(s) => self.apply_suspect(now, s, from),
            Kind::Dead(d) => self.apply_dead(now, d, from),
            Kind::App(app) => {
                if app.key.len() + app.payload.len() > self.config.max_app_broadcast_size {
                    self.stats.packets_invalid += 1;
                    return;
                }
                self.events.push_back(Event::AppBroadcast {
                    key: app.key,
                    payload: app.payload,
                });
            }
        }
    }

    /// Someone suspects this node or declares it dead at `accused`. At or above the current
    /// incarnation, refute. Below it, the accuser holds stale news and missed an earlier refutation:
    /// re-announce the current incarnation (no increment) so it catches up.
    fn answer_accusation(&mut self, accused: u64) {
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        if accused >= self.incarnation {
            self.refute(accused);
        } else {
            self.broadcast_self_alive();
        }
    }

    fn refute(&mut self, accused: u64) {
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        self.incarnation = self.incarnation.max(accused).saturating_add(1);
        self.stats.refutations += 1;
        self.adjust_health(1);
        self.events.push_back(Event::Refuted {
            incarnation: self.incarnation,
        });
        self.broadcast_self_alive();
    }

    fn broadcast_self_alive(&mut self) {
        let msg = wire::Alive {
            node: self.name.clone(),
            incarnation: self.incarnation,
            addr: Some(encode_addr(self.addr)),
            meta: self.meta.clone(),
        };
        self.queue_member_broadcast(self.name.clone(), wire::broadcast::Kind::Alive(msg));
    }

    fn queue_member_broadcast(&mut self, name: String, kind: wire::broadcast::Kind) {
        let encoded = wire::Broadcast { kind: Some(kind) }.encode_to_vec();
        self.member_queue
            .push(BroadcastKey::Member(name.to_owned()), encoded.into());
    }

    fn apply_alive(&mut self, now: Instant, a: wire::Alive) {
        if validate_node_name(&a.node).is_err()
            || a.meta.len() > self.config.max_meta_size
            || a.incarnation > MAX_INCARNATION
        {
            self.stats.packets_invalid += 1;
            return;
        }
        let Some(addr) = a.addr.as_ref().and_then(decode_addr) else {
            self.stats.packets_invalid += 1;
            return;
        };
        if a.node == self.name {
            // Someone announces us with an incarnation we never had (stale state from a previous life)
            // or with another address: out-announce it. Like an accusation, it must leave room to
            // refute (`+ 1`).
            if a.incarnation >= MAX_INCARNATION {
                self.stats.packets_invalid += 1;
                return;
            }
            if a.incarnation > self.incarnation
                || (a.incarnation == self.incarnation && (addr != self.addr || a.meta != self.meta))
            {
                self.refute(a.incarnation);
            }
            return;
        }
        let Some(&i) = self.index.get(&a.node) else {
            if self.members.len() >= self.config.max_members {
                self.stats.dropped_for_limits += 1;
                return;
            }
            let member = Member {
                name: a.node.clone(),
                addr,
                incarnation: a.incarnation,
                state: MemberState::Alive,
                meta: a.meta.clone(),
            };
            self.index.insert(a.node.clone(), self.members.len());
            self.members.push(Entry {
                member: member.clone(),
                state_change: now,
            });
            // A new member is probed at a random point of the current round.
            let pos = self.rng.random_range(0..=self.probe_order.len());
            self.probe_order.insert(pos, a.node.clone());
            if pos < self.probe_cursor {
                self.probe_cursor += 1;
            }
            self.failed.retain(|f| f.name != a.node);
            self.events.push_back(Event::MemberJoined(member));
            self.queue_member_broadcast(a.node.clone(), wire::broadcast::Kind::Alive(a));
            return;
        };
        let entry = &self.members[i];
        let old = entry.member.state;
        if addr != entry.member.addr {
            // Same name, new address: a later life of the member (a higher incarnation: it
            // restarted and moved), or once the old one is surely gone. Names are bound to
            // certificates, so two live processes under one name are one operator's mistake,
            // and the older refutes the newer.
            let reclaimable = a.incarnation > entry.member.incarnation
                || old == MemberState::Left
                || (old == MemberState::Dead
                    && now.saturating_duration_since(entry.state_change)
                        >= self.config.dead_node_reclaim_time);
            if !reclaimable {
                return;
            }
        } else if a.incarnation <= entry.member.incarnation {
            return;
        }
        let entry = &mut self.members[i];
        let meta_changed = entry.member.meta != a.meta || entry.member.addr != addr;
        entry.member.incarnation = a.incarnation;
        entry.member.addr = addr;
        entry.member.meta = a.meta.clone();
        entry.member.state = MemberState::Alive;
        if old != MemberState::Alive {
            entry.state_change = now;
        }
        let member = entry.member.clone();
        self.suspicions.remove(&a.node);
        self.failed.retain(|f| f.name != a.node);
        self.events.push_back(match old {
            MemberState::Alive if meta_changed => Event::MemberUpdated(member),
            MemberState::Alive => {
                self.queue_member_broadcast(a.node.clone(), wire::broadcast::Kind::Alive(a));
                return;
            }
            MemberState::Suspect => Event::MemberAlive(member),
            MemberState::Dead | MemberState::Left => Event::MemberJoined(member),
        });
        self.queue_member_broadcast(a.node.clone(), wire::broadcast::Kind::Alive(a));
    }

    fn apply_suspect(&mut self, now: Instant, s: wire::Suspect, from: Option<SocketAddr>) {
        // An accusation must leave its subject room to refute (accused + 1).
        if validate_node_name(&s.from).is_err() || s.incarnation >= MAX_INCARNATION {
            self.stats.packets_invalid += 1;
            return;
        }
        if s.node == self.name {
            self.answer_accusation(s.incarnation);
            return;
        }
        let n = self.cluster_size();
        let Some(&i) = self.index.get(&s.node) else {
            return;
        };
        let entry = &mut self.members[i];
        if s.incarnation < entry.member.incarnation {
            self.correct_stale_sender(i, from);
            return;
        }
        // Left is final until the member itself announces a newer incarnation. A Dead member is
        // suspected again only at a newer incarnation: someone saw it refute after it was declared.
        let same = s.incarnation == entry.member.incarnation;
        match entry.member.state {
            MemberState::Left => return,
            MemberState::Dead if same => return,
            _ => {}
        }
        if entry.member.state == MemberState::Suspect && same {
            if let Some(timer) = self.suspicions.get_mut(&s.node) {
                if timer.confirm(&s.from) {
                    let node = s.node.clone();
                    self.queue_member_broadcast(node.clone(), wire::broadcast::Kind::Suspect(s));
                    if let Some(t) = self.suspicions.get(&node) {
                        if now >= t.deadline {
                            self.run_suspicion_timers(now);
                        }
                    }
                }
            }
            return;
        }
        entry.member.incarnation = s.incarnation;
        entry.member.state = MemberState::Suspect;
        entry.state_change = now;
        let timer = Suspicion::new(&self.config, n, s.incarnation, &s.from, now);
        self.suspicions.insert(s.node.clone(), timer);
        self.events.push_back(Event::MemberSuspect {
            name: s.node.clone(),
            incarnation: s.incarnation,
        });
        let node = s.node.clone();
        self.queue_member_broadcast(node.clone(), wire::broadcast::Kind::Suspect(s));
    }

    fn apply_dead(&mut self, now: Instant, d: wire::Dead, from: Option<SocketAddr>) {
        // A leave (from its own subject) may carry MAX_INCARNATION itself; an accusation not.
        let limit = if d.from == d.node {
            MAX_INCARNATION
        } else {
            MAX_INCARNATION - 1
        };
        if validate_node_name(&d.from).is_err() || d.incarnation > limit {
            self.stats.packets_invalid += 1;
            return;
        }
        if d.node == self.name {
            self.answer_accusation(d.incarnation);
            return;
        }
        let Some(&i) = self.index.get(&d.node) else {
            return;
        };
        let entry = &mut self.members[i];
        if d.incarnation < entry.member.incarnation {
            self.correct_stale_sender(i, from);
            return;
        }
        let left = d.node == d.from;
        match entry.member.state {
            MemberState::Left => return,
            MemberState::Dead if !left => {
                // Already dead: only remember a newer incarnation, so views converge whatever the
                // order in which the news arrived.
                if d.incarnation > entry.member.incarnation {
                    entry.member.incarnation = d.incarnation;
                    let name = d.node.clone();
                    self.queue_member_broadcast(name, wire::broadcast::Kind::Dead(d));
                }
                return;
            }
            _ => {}
        }
        entry.member.incarnation = d.incarnation;
        entry.member.state = if left {
            MemberState::Left
        } else {
            MemberState::Dead
        };
        entry.state_change = now;
        let (name, addr) = (entry.member.name.clone(), entry.member.addr);
        self.suspicions.remove(&d.node);
        if self.probe.as_ref().is_some_and(|p| p.target == d.node) {
            // Stop probing a member that is gone; the walk moves on at the interval's end.
            if let Some(p) = self.probe.as_mut() {
                p.acked = true;
            }
        }
        if left {
            self.failed.retain(|f| f.name != name);
            self.events.push_back(Event::MemberLeft {
                name: name.clone(),
                incarnation: d.incarnation,
            });
        } else {
            self.events.push_back(Event::MemberDead {
                name: name.clone(),
                incarnation: d.incarnation,
            });
            self.remember_failed(name.clone(), addr);
        }
        self.queue_member_broadcast(name.clone(), wire::broadcast::Kind::Dead(d));
    }

    fn remember_failed(&mut self, name: String, addr: SocketAddr) {
        self.failed.retain(|f| f.name != name);
        if self.failed.len() >= self.config.max_failed_members {
            self.failed.pop_front();
            self.stats.dropped_for_limits += 1;
        }
        self.failed.push_back(FailedMember { name, addr });
    }

    // ----- push-pull, join, reconnect ------------------------------------------------------------------

    fn merge_remote_state(&mut self, now: Instant, pp: &wire::PushPull) {
        for e in &pp.members {
            let Some(addr) = e.addr.as_ref().and_then(decode_addr) else {
                continue;
            };
            let state =
                wire::MemberState::try_from(e.state).unwrap_or(wire::MemberState::Unspecified);
            match state {
                wire::MemberState::Alive => self.apply_alive(
                    now,
                    wire::Alive {
                        node: e.node.clone(),
                        incarnation: e.incarnation,
                        addr: Some(encode_addr(addr)),
                        meta: e.meta.clone(),
                    },
                ),
                wire::MemberState::Left => self.apply_dead(
                    now,
                    wire::Dead {
                        node: e.node.clone(),
                        incarnation: e.incarnation,
                        from: e.node.clone(),
                    },
                    None,
                ),
                // Never trust a remote "dead": it becomes a local suspicion that the member can refute.
                wire::MemberState::Dead | wire::MemberState::Suspect => self.apply_suspect(
                    now,
                    wire::Suspect {
                        node: e.node.clone(),
                        incarnation: e.incarnation,
                        from: pp.sender.clone(),
                    },
                    None,
                ),
                wire::MemberState::Unspecified => {}
            }
        }
    }

    fn local_state(&self, join: bool, reply: bool) -> wire::PushPull {
        let mut members = Vec::with_capacity(self.members.len() + 1);
        members.push(wire::MemberEntry {
            node: self.name.clone(),
            addr: Some(encode_addr(self.addr)),
            incarnation: self.incarnation,
            state: wire::MemberState::Alive as i32,
            meta: self.meta.clone(),
        });
        for e in &self.members {
            members.push(wire::MemberEntry {
                node: e.member.name.clone(),
                addr: Some(encode_addr(e.member.addr)),
                incarnation: e.member.incarnation,
                state: e.member.state.to_wire() as i32,
                meta: e.member.meta.clone(),
            });
        }
        wire::PushPull {
            protocol_version: wire::PROTOCOL_VERSION,
            sender: self.name.clone(),
            join,
            reply,
            members,
            app_state: self.app_state.clone(),
        }
    }

    fn send_push_pull(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        join: bool,
        reply: bool,
    ) {
        let mut state = self.local_state(join, reply);
        let mut payload = state.encode_to_vec();
        if payload.len() > self.config.max_push_pull_size {
            // Too large for one exchange: send the members without the application state rather than
            // nothing; the application state is repaired by gossip.
            state.app_state = Bytes::new();
            payload = state.encode_to_vec();
            self.stats.dropped_for_limits += 1;
            if payload.len() > self.config.max_push_pull_size {
                return;
            }
        }
        self.stats.push_pulls_sent += 1;
        self.stats.push_pull_bytes_sent += payload.len() as u64;
        self.transmits.push_back(Outgoing {
            dst,
            dst_name,
            channel: if reply {
                Channel::StreamReply
            } else {
                Channel::Stream
            },
            payload,
        });
    }

    fn send_join_attempt(&mut self, _now: Instant) {
        for seed in self.seeds.clone() {
            self.send_push_pull(seed, None, true, false);
        }
    }

    fn periodic_push_pull(&mut self, _now: Instant) {
        let picked = self.random_members(1, |m| m.state == MemberState::Alive);
        if let Some(&i) = picked.first() {
            let (addr, name) = (
                self.members[i].member.addr,
                self.members[i].member.name.clone(),
            );
            self.send_push_pull(addr, Some(name), false, false);
        }
    }

    /// One attempt towards the next failed member or unanswered seed, so partitions heal.
    fn reconnect(&mut self, now: Instant) {
        let seeds: Vec<SocketAddr> = self
            .seeds
            .iter()
            .copied()
            .filter(|s| {
                !self
                    .members
                    .iter()
                    .any(|e| e.member.addr == *s && !e.member.state.is_gone())
            })
            .collect();
        let total = self.failed.len() + seeds.len();
        if total == 0 {
            self.next_reconnect = now + self.config.reconnect_interval;
            return;
        }
        let slot = self.reconnect_cursor % total;
        self.reconnect_cursor = self.reconnect_cursor.wrapping_add(1);
        let (addr, name) = if slot < self.failed.len() {
            let f = &self.failed[slot];
            (f.addr, Some(f.name.clone()))
        } else {
            (seeds[slot - self.failed.len()], None)
        };
        self.stats.reconnect_attempts += 1;
        self.send_push_pull(addr, name, false, false);
        let spacing =
            (self.config.reconnect_interval / total as u32).max(self.config.gossip_interval);
        self.next_reconnect = now + spacing;
    }

    fn finish_leave(&mut self) {
        self.lifecycle = Lifecycle::Left;
        self.probe = None;
        self.suspicions.clear();
        self.indirect.clear();
        self.events.push_back(Event::LeaveComplete);
    }

    // ----- gossip and packets ---------------------------------------------------------------------------

    fn gossip(&mut self, now: Instant) {
        if self.member_queue.is_empty() && self.app_queue.is_empty() {
            return;
        }
        let dead_time = self.config.gossip_to_the_dead_time;
        let targets = self.random_members_with(self.config.gossip_nodes, |e| {
            !e.member.state.is_gone() || now.saturating_duration_since(e.state_change) < dead_time
        });
        for i in targets {
            let (addr, name) = (
                self.members[i].member.addr,
                self.members[i].member.name.clone(),
            );
            if self.send_packet(addr, Some(name), None, &[]) {
                self.stats.gossip_packets_sent += 1;
            }
        }
    }

    /// Builds and queues one packet to `dst`: the optional probe message, the optional `first`
    /// broadcast, then as many queued broadcasts as fit. A packet with neither a message nor a
    /// broadcast is not sent. Returns whether a packet was queued.
    fn send_packet(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        message: Option<wire::packet::Message>,
        first: &[Bytes],
    ) -> bool {
        let has_message = message.is_some();
        let header = wire::Packet {
            sender: self.name.clone(),
            message,
            broadcasts: Vec::new(),
        };
        let mut payload = header.encode_to_vec();
        let mut budget = self.config.max_packet_size.saturating_sub(payload.len());
        let mut broadcasts: Vec<Bytes> = Vec::new();
        for item in first {
            let need = framed_broadcast_len(item.len());
            if need <= budget {
                budget -= need;
                broadcasts.push(item.clone());
            }
        }
        let limit = self.retransmit_limit();
        // Application items get a guaranteed share: member news may use everything but that share
        // (or less, if fewer application bytes are waiting); application items then take whatever
        // member news left.
        let app_share = budget * usize::from(self.config.app_broadcast_share_percent) / 100;
        let reserved = app_share.min(self.app_queue.framed_bytes());
        let used = self
            .member_queue
            .fill(budget - reserved, limit, &mut broadcasts);
        self.app_queue.fill(budget - used, limit, &mut broadcasts);
        if !has_message && broadcasts.is_empty() {
            return false;
        }
        for b in &broadcasts {
            // Field 6 (`broadcasts`), wire type 2 (length-delimited).
            prost::encoding::encode_key(
                6,
                prost::encoding::WireType::LengthDelimited,
                &mut payload,
            );
            prost::encoding::encode_varint(b.len() as u64, &mut payload);
            payload.extend_from_slice(b);
        }
        debug_assert!(payload.len() <= self.config.max_packet_size.max(header.encoded_len()));
        self.stats.packets_sent += 1;
        self.stats.packet_bytes_sent += payload.len() as u64;
        self.transmits.push_back(Outgoing {
            dst,
            dst_name,
            channel: Channel::Datagram,
            payload,
        });
        true
    }

    /// Up to `k` distinct random members matching `filter`.
    fn random_members(&mut self, k: usize, filter: impl Fn(&Member) -> bool) -> Vec<usize> {
        self.random_members_with(k, |e| filter(&e.member))
    }

    fn random_members_with(&mut self, k: usize, filter: impl Fn(&Entry) -> bool) -> Vec<usize> {
        let n = self.members.len();
        let mut picked: Vec<usize> = Vec::with_capacity(k);
        if k == 0 || n == 0 {
            return picked;
        }
        if n <= 4 * k + 16 {
            let mut candidates: Vec<usize> = (0..n).filter(|&i| filter(&self.members[i])).collect();
            for _ in 0..k.min(candidates.len()) {
                let j = self.rng.random_range(0..candidates.len());
                picked.push(candidates.swap_remove(j));
            }
            return picked;
        }
        // Large tables: rejection sampling, then a scan if the matching members are rare.
        for _ in 0..8 * k {
            let i = self.rng.random_range(0..n);
            if !picked.contains(&i) && filter(&self.members[i]) {
                picked.push(i);
                if picked.len() == k {
                    return picked;
                }
            }
        }
        let mut candidates: Vec<usize> = (0..n)
            .filter(|i| !picked.contains(i) && filter(&self.members[*i]))
            .collect();
        while picked.len() < k && !candidates.is_empty() {
            let j = self.rng.random_range(0..candidates.len());
            picked.push(candidates.swap_remove(j));
        }
        picked
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

#[cfg(test)]
mod tests;
