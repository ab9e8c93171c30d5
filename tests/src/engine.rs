//! Deterministic discrete-event network simulator.
//!
//! Nodes are sans-IO state machines ([`SimNode`]) driven by a virtual clock.
//! Every behaviour is a pure function of the seed: one ChaCha8 stream drives
//! all network randomness, events are ordered by `(time, insertion seq)`, and
//! hash maps are only ever used for lookups, never iterated.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::iter::{IntoParallelRefMutIterator, ParallelIterator};

/// One simulated node: a sans-IO state machine.
pub trait SimNode {
    /// Handles an unreliable packet from `from`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]);
    /// Handles a reliable, per-peer ordered message from `from`.
    fn handle_stream(&mut self, now: Instant, from: SocketAddr, data: &[u8]);
    /// Handles expiry of the deadline last returned by [`SimNode::poll_timeout`].
    fn handle_timeout(&mut self, now: Instant);
    /// Returns the next message to send, if any.
    fn poll_transmit(&mut self, now: Instant) -> Option<SimTransmit>;
    /// Returns the node's next deadline, if any.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// Called after every input once transmits are drained; the node drains its own events here.
    fn drain_events(&mut self, _now: Instant) {}
    /// Whether reacting to events left work that only draining transmits does.
    fn has_pending_work(&self) -> bool {
        false
    }
}

/// A message a node wants to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTransmit {
    /// Destination address.
    pub dst: SocketAddr,
    /// `true` for a reliable ordered message, `false` for a datagram.
    pub reliable: bool,
    /// Message bytes.
    pub payload: Vec<u8>,
}

/// Network model parameters, used as the default and for per-link overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetConfig {
    /// Base one-way latency.
    pub latency: Duration,
    /// Extra latency drawn uniformly from `0..=jitter` per message.
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is lost.
    pub loss: f64,
    /// Probability in `[0, 1]` that a datagram is delivered twice.
    pub duplicate: f64,
    /// The largest datagram (UDP payload) the network carries: a larger one is dropped and
    /// counted, as a link refuses a packet beyond its MTU. 1472 bytes by default: Ethernet's
    /// 1500-byte frame less the IPv4 and UDP headers.
    pub max_datagram: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(1),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            max_datagram: ETHERNET_MAX_DATAGRAM,
        }
    }
}

/// The default [`NetConfig::max_datagram`]: a 1500-byte Ethernet frame less the IPv4 and UDP
/// headers.
pub const ETHERNET_MAX_DATAGRAM: usize = 1472;

/// Per-link (directional) override of the network model.
pub type LinkConfig = NetConfig;

/// Network-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to the network.
    pub datagrams_sent: u64,
    /// Datagrams handed to a destination node (duplicates count twice).
    pub datagrams_delivered: u64,
    /// Datagrams dropped by random loss.
    pub datagrams_lost: u64,
    /// Datagrams that were duplicated.
    pub datagrams_duplicated: u64,
    /// Datagrams dropped by a partition, at send or delivery time.
    pub datagrams_dropped_partition: u64,
    /// Datagrams dropped because the destination was down on arrival.
    pub datagrams_dropped_down: u64,
    /// Datagrams addressed to an address owned by no node.
    pub datagrams_dropped_unknown: u64,
    /// Datagrams larger than the link's [`NetConfig::max_datagram`] (path MTU probes beyond it).
    pub datagrams_dropped_too_large: u64,
    /// Datagrams dropped because the destination was starved (see `starve_dropping_datagrams`).
    pub datagrams_dropped_starved: u64,
    /// Reliable messages handed to the network.
    pub reliable_sent: u64,
    /// Reliable messages handed to a destination node.
    pub reliable_delivered: u64,
    /// Reliable messages dropped (partition, unknown address, or destination down or restarted).
    pub reliable_dropped: u64,
    /// Payload bytes handed to the network (both kinds).
    pub bytes_sent: u64,
}

/// Per-node counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Datagrams this node sent.
    pub datagrams_sent: u64,
    /// Reliable messages this node sent.
    pub reliable_sent: u64,
    /// Payload bytes this node sent (both kinds).
    pub bytes_sent: u64,
    /// Datagrams delivered to this node.
    pub datagrams_received: u64,
    /// Reliable messages delivered to this node.
    pub reliable_received: u64,
}

/// One entry of the transmit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransmitRecord {
    /// Virtual time of the send, relative to the simulation start.
    pub at: Duration,
    /// Index of the sending node.
    pub src: usize,
    /// Destination address.
    pub dst: SocketAddr,
    /// Whether the message was reliable.
    pub reliable: bool,
    /// FNV-1a hash of the payload.
    pub hash: u64,
}

/// 64-bit FNV-1a hash.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Reads a `u64` from environment variable `name` (decimal or `0x` hex), or returns `default`.
///
/// # Panics
/// Panics if the variable is set but is not a valid `u64`, so a mistyped replay seed is never
/// silently replaced by the default.
pub fn env_u64(name: &str, default: u64) -> u64 {
    let Ok(raw) = std::env::var(name) else {
        return default;
    };
    let s = raw.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(v) => v,
        Err(e) => panic!("environment variable {name}={raw:?} is not a u64: {e}"),
    }
}

/// Prints `replay with SEED={seed}` to stderr when dropped during a panic.
#[derive(Debug)]
pub struct SeedGuard(pub u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("replay with SEED={}", self.0);
        }
    }
}

/// A message in flight.
struct Delivery {
    src: usize,
    dst: usize,
    /// Destination generation at send time (reliable messages die with the incarnation).
    dst_gen: u64,
    from: SocketAddr,
    to: SocketAddr,
    reliable: bool,
    payload: Vec<u8>,
}

enum Event {
    Timer { node: usize, generation: u64 },
    Deliver(Delivery),
    StarveEnd { node: usize, until: Instant },
}

/// Heap entry, ordered by `(at, seq)` only.
struct Entry {
    at: Instant,
    seq: u64,
    ev: Event,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Clone, Copy)]
enum DropReason {
    Partition,
    Down,
    Unknown,
}

impl<N: SimNode> Slot<N> {
    /// Hands delivery `d` to the node.
    fn receive(&mut self, now: Instant, d: &Delivery) {
        if d.reliable {
            self.stats.reliable_received += 1;
            self.node.handle_stream(now, d.from, &d.payload);
        } else {
            self.stats.datagrams_received += 1;
            self.node.handle_datagram(now, d.from, &d.payload);
        }
    }

    /// Drains what an input left: the node's transmits into `out` and its events, again until it
    /// is quiet (reacting to events is more input).
    fn react(&mut self, now: Instant, out: &mut Vec<SimTransmit>) {
        self.flush(now, out);
        self.node.drain_events(now);
        while self.flush(now, out) > 0 || self.node.has_pending_work() {
            self.node.drain_events(now);
        }
    }

    fn flush(&mut self, now: Instant, out: &mut Vec<SimTransmit>) -> usize {
        let before = out.len();
        while let Some(t) = self.node.poll_transmit(now) {
            out.push(t);
        }
        out.len() - before
    }
}

struct Slot<N> {
    node: N,
    addr: SocketAddr,
    up: bool,
    generation: u64,
    /// Current deadline and the seq of the one live timer event for it.
    timer: Option<(Instant, u64)>,
    group: u32,
    starved_until: Option<Instant>,
    /// While starved, drop datagrams (receive buffer overflow) instead of deferring them.
    starve_drops_datagrams: bool,
    /// While starved, defer the node's timer too (a stalled process) rather than only its receive path.
    starve_defers_timer: bool,
    deferred: VecDeque<Delivery>,
    stats: NodeStats,
}

/// The simulator: nodes, network model, virtual clock and event queue.
pub struct Sim<N: SimNode> {
    seed: u64,
    base: Instant,
    now: Instant,
    seq: u64,
    heap: BinaryHeap<Reverse<Entry>>,
    nodes: Vec<Slot<N>>,
    by_addr: HashMap<SocketAddr, usize>,
    net: NetConfig,
    links: HashMap<(usize, usize), LinkConfig>,
    /// Last reliable arrival time per (src, dst) pair, for FIFO order.
    fifo: HashMap<(usize, usize), Instant>,
    net_rng: ChaCha8Rng,
    scenario_rng: ChaCha8Rng,
    stats: NetStats,
    log: Option<Vec<TransmitRecord>>,
    /// Transmits drained from a node, kept between inputs for its room.
    transmits: Vec<SimTransmit>,
    /// The threads of [`Sim::run_until_parallel`], and how many.
    pool: Option<(usize, rayon::ThreadPool)>,
}

impl<N: SimNode> Sim<N> {
    /// Creates an empty simulation; the virtual clock starts at `Instant::now()`.
    pub fn new(seed: u64, net: NetConfig) -> Self {
        let base = Instant::now();
        Self {
            seed,
            base,
            now: base,
            seq: 0,
            heap: BinaryHeap::new(),
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            net,
            links: HashMap::new(),
            fifo: HashMap::new(),
            net_rng: ChaCha8Rng::seed_from_u64(seed),
            scenario_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
            stats: NetStats::default(),
            log: None,
            transmits: Vec::new(),
            pool: None,
        }
    }

    /// The seed this simulation was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Scenario-level RNG, independent of the network RNG.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.scenario_rng
    }

    /// Current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time at construction.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Virtual time elapsed since construction.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// Number of nodes (up or down).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was added.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of pending events (including stale timers).
    pub fn pending_events(&self) -> usize {
        self.heap.len()
    }

    /// Adds a node at `addr`, drains its initial output, and returns its index.
    ///
    /// # Panics
    /// Panics if `addr` already belongs to a node.
    pub fn add_node(&mut self, addr: SocketAddr, node: N) -> usize {
        let i = self.nodes.len();
        let prev = self.by_addr.insert(addr, i);
        assert!(prev.is_none(), "address {addr} already in use");
        self.nodes.push(Slot {
            node,
            addr,
            up: true,
            generation: 0,
            timer: None,
            group: 0,
            starved_until: None,
            starve_drops_datagrams: false,
            starve_defers_timer: true,
            deferred: VecDeque::new(),
            stats: NodeStats::default(),
        });
        self.after_input(i);
        i
    }

    /// The node at index `i` (also available while it is down).
    pub fn node(&self, i: usize) -> &N {
        &self.nodes[i].node
    }

    /// Mutable access without draining; use [`Sim::with_node`] if the change may produce output.
    pub fn node_mut(&mut self, i: usize) -> &mut N {
        &mut self.nodes[i].node
    }

    /// Runs `f` on node `i`, then (if it is up) drains its transmits and events and
    /// reschedules its timer.
    pub fn with_node<R>(&mut self, i: usize, f: impl FnOnce(&mut N, Instant) -> R) -> R {
        let r = f(&mut self.nodes[i].node, self.now);
        if self.nodes[i].up {
            self.after_input(i);
        }
        r
    }

    /// Whether node `i` is running.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].up
    }

    /// Current address of node `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    /// Index of the node owning `addr`, if any.
    pub fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.by_addr.get(&addr).copied()
    }

    /// Counters for the whole network.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Counters for node `i`.
    pub fn node_stats(&self, i: usize) -> &NodeStats {
        &self.nodes[i].stats
    }

    /// Starts recording every send in the transmit log.
    pub fn enable_transmit_log(&mut self) {
        self.log.get_or_insert_with(Vec::new);
    }

    /// The transmit log (empty unless enabled).
    pub fn transmit_log(&self) -> &[TransmitRecord] {
        self.log.as_deref().unwrap_or(&[])
    }

    /// Stops node `i`: in-flight messages to it are dropped on arrival and its timer is ignored.
    pub fn crash(&mut self, i: usize) {
        let slot = &mut self.nodes[i];
        if !slot.up {
            return;
        }
        slot.up = false;
        slot.generation += 1;
        slot.timer = None;
        slot.starved_until = None;
        let deferred = std::mem::take(&mut slot.deferred);
        for d in deferred {
            self.count_drop(d.reliable, DropReason::Down);
        }
    }

    /// Replaces node `i` with a fresh `node` at `addr` (or its current address), crashing the old
    /// one first if it is up, then drains the new node's initial output.
    ///
    /// # Panics
    /// Panics if `addr` belongs to another node.
    pub fn restart(&mut self, i: usize, node: N, addr: Option<SocketAddr>) {
        self.crash(i);
        let old = self.nodes[i].addr;
        let new = addr.unwrap_or(old);
        if new != old {
            let owner = self.by_addr.get(&new).copied();
            assert!(owner.is_none(), "address {new} already in use");
            self.by_addr.remove(&old);
            self.by_addr.insert(new, i);
        }
        let slot = &mut self.nodes[i];
        slot.addr = new;
        slot.node = node;
        slot.up = true;
        slot.generation += 1;
        self.after_input(i);
    }

    /// The default network model.
    pub fn net(&self) -> &NetConfig {
        &self.net
    }

    /// Replaces the default network model (links without an override use it from now on).
    pub fn set_net(&mut self, net: NetConfig) {
        self.net = net;
    }

    /// Overrides the model for messages from node `a` to node `b` (one direction only).
    pub fn set_link(&mut self, a: usize, b: usize, cfg: LinkConfig) {
        self.links.insert((a, b), cfg);
    }

    /// Removes the override for `a -> b`.
    pub fn clear_link(&mut self, a: usize, b: usize) {
        self.links.remove(&(a, b));
    }

    /// Splits the network: nodes in different groups cannot exchange messages; unlisted
    /// nodes form one more group together. A node listed twice belongs to the last group.
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        self.heal();
        for (g, members) in (1u32..).zip(groups) {
            for &i in members {
                self.nodes[i].group = g;
            }
        }
    }

    /// Removes any partition.
    pub fn heal(&mut self) {
        for slot in &mut self.nodes {
            slot.group = 0;
        }
    }

    /// Defers everything addressed to node `i` (deliveries and its timer) until `until`; then
    /// the node gets `handle_timeout` if its deadline passed, then the deferred deliveries in
    /// arrival order. Overlapping calls extend the window.
    pub fn starve(&mut self, i: usize, until: Instant) {
        self.starve_with(i, until, false, true);
    }

    /// Like [`starve`](Self::starve), but datagrams that arrive while the node is starved are dropped,
    /// as a kernel drops UDP packets once a stalled process's receive buffer is full. Reliable
    /// messages are still deferred (their transport retransmits them).
    pub fn starve_dropping_datagrams(&mut self, i: usize, until: Instant) {
        self.starve_with(i, until, true, true);
    }

    /// Stalls only node `i`'s receive path until `until`: datagrams arriving meanwhile are dropped,
    /// reliable messages deferred, while its timers keep firing and it keeps sending (a process whose
    /// receive loop is starved).
    pub fn starve_receive(&mut self, i: usize, until: Instant) {
        self.starve_with(i, until, true, false);
    }

    fn starve_with(&mut self, i: usize, until: Instant, drop_datagrams: bool, defer_timer: bool) {
        let slot = &mut self.nodes[i];
        if !slot.up || until <= self.now || slot.starved_until.is_some_and(|u| u >= until) {
            return;
        }
        slot.starve_drops_datagrams = drop_datagrams;
        slot.starve_defers_timer = defer_timer;
        slot.starved_until = Some(until);
        self.push(until, Event::StarveEnd { node: i, until });
    }

    /// Processes one event; returns `false` when no event is pending.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(Entry { at, seq, ev })) = self.heap.pop() else {
            return false;
        };
        self.now = self.now.max(at);
        match ev {
            Event::Timer { node, generation } => self.fire_timer(node, generation, seq),
            Event::Deliver(d) => self.deliver(d),
            Event::StarveEnd { node, until } => self.end_starve(node, until),
        }
        true
    }

    /// Processes all events up to and including `t`, then sets the clock to `t`.
    pub fn run_until(&mut self, t: Instant) {
        while let Some(Reverse(e)) = self.heap.peek()
            && e.at <= t
        {
            self.step();
        }
        self.now = self.now.max(t);
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Runs for `d`, calling `check` after every `every` of virtual time and at the end.
    ///
    /// # Panics
    /// Panics if `every` is zero.
    pub fn run_for_checked(&mut self, d: Duration, every: Duration, mut check: impl FnMut(&Self)) {
        assert!(!every.is_zero(), "check interval must be positive");
        let end = self.now + d;
        let mut t = self.now;
        while t < end {
            t = (t + every).min(end);
            self.run_until(t);
            check(self);
        }
    }

    fn push(&mut self, at: Instant, ev: Event) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        self.heap.push(Reverse(Entry { at, seq, ev }));
        seq
    }

    fn is_starved(&self, i: usize) -> bool {
        self.nodes[i].starved_until.is_some_and(|u| self.now < u)
    }

    fn count_drop(&mut self, reliable: bool, why: DropReason) {
        let s = &mut self.stats;
        let counter = match (reliable, why) {
            (true, _) => &mut s.reliable_dropped,
            (false, DropReason::Partition) => &mut s.datagrams_dropped_partition,
            (false, DropReason::Down) => &mut s.datagrams_dropped_down,
            (false, DropReason::Unknown) => &mut s.datagrams_dropped_unknown,
        };
        *counter += 1;
    }

    /// Drains transmits and events after an input, then reschedules the timer.
    fn after_input(&mut self, i: usize) {
        let mut out = std::mem::take(&mut self.transmits);
        self.nodes[i].react(self.now, &mut out);
        // The node never sees its sends, so sending them after it has gone quiet is the same
        // as sending each as it comes.
        for t in out.drain(..) {
            self.send(i, t);
        }
        self.transmits = out;
        self.reschedule(i);
    }

    fn reschedule(&mut self, i: usize) {
        let next = self.nodes[i].node.poll_timeout();
        if next == self.nodes[i].timer.map(|(d, _)| d) {
            return;
        }
        self.nodes[i].timer = match next {
            None => None,
            Some(deadline) => {
                let generation = self.nodes[i].generation;
                let ev = Event::Timer {
                    node: i,
                    generation,
                };
                Some((deadline, self.push(deadline.max(self.now), ev)))
            }
        };
    }

    fn sample_latency(&mut self, cfg: &NetConfig) -> Duration {
        if cfg.jitter.is_zero() {
            return cfg.latency;
        }
        let max = u64::try_from(cfg.jitter.as_nanos()).unwrap_or(u64::MAX);
        cfg.latency + Duration::from_nanos(self.net_rng.random_range(0..=max))
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.net_rng.random_bool(p.min(1.0))
    }

    fn send(&mut self, src: usize, t: SimTransmit) {
        let len = t.payload.len() as u64;
        let slot = &mut self.nodes[src];
        let from = slot.addr;
        slot.stats.bytes_sent += len;
        self.stats.bytes_sent += len;
        if t.reliable {
            slot.stats.reliable_sent += 1;
            self.stats.reliable_sent += 1;
        } else {
            slot.stats.datagrams_sent += 1;
            self.stats.datagrams_sent += 1;
        }
        if let Some(log) = &mut self.log {
            log.push(TransmitRecord {
                at: self.now - self.base,
                src,
                dst: t.dst,
                reliable: t.reliable,
                hash: fnv1a(&t.payload),
            });
        }
        let Some(dst) = self.index_of(t.dst) else {
            return self.count_drop(t.reliable, DropReason::Unknown);
        };
        if self.nodes[src].group != self.nodes[dst].group {
            return self.count_drop(t.reliable, DropReason::Partition);
        }
        let cfg = match self.links.is_empty() {
            true => self.net,
            false => self.links.get(&(src, dst)).copied().unwrap_or(self.net),
        };
        if !t.reliable && t.payload.len() > cfg.max_datagram {
            self.stats.datagrams_dropped_too_large += 1;
            return;
        }
        let d = Delivery {
            src,
            dst,
            dst_gen: self.nodes[dst].generation,
            from,
            to: t.dst,
            reliable: t.reliable,
            payload: t.payload,
        };
        let mut at = self.now + self.sample_latency(&cfg);
        if t.reliable {
            let last = self.fifo.entry((src, dst)).or_insert(at);
            at = at.max(*last);
            *last = at;
        } else {
            if self.chance(cfg.loss) {
                self.stats.datagrams_lost += 1;
                return;
            }
            if self.chance(cfg.duplicate) {
                self.stats.datagrams_duplicated += 1;
                let dup_at = self.now + self.sample_latency(&cfg);
                let dup = Delivery {
                    payload: d.payload.clone(),
                    ..d
                };
                self.push(dup_at, Event::Deliver(dup));
            }
        }
        self.push(at, Event::Deliver(d));
    }

    /// Where delivery `d` goes now: `None` when it is dropped (counted) or deferred for a
    /// starved node.
    fn admit(&mut self, mut d: Delivery) -> Option<Delivery> {
        let target = if d.reliable {
            Some(d.dst).filter(|&j| self.nodes[j].generation == d.dst_gen)
        } else {
            self.index_of(d.to)
        };
        let Some(dst) = target else {
            let why = if d.reliable {
                DropReason::Down
            } else {
                DropReason::Unknown
            };
            self.count_drop(d.reliable, why);
            return None;
        };
        d.dst = dst;
        if self.is_starved(dst) {
            if !d.reliable && self.nodes[dst].starve_drops_datagrams {
                self.stats.datagrams_dropped_starved += 1;
                return None;
            }
            self.nodes[dst].deferred.push_back(d);
            return None;
        }
        if !self.nodes[dst].up {
            self.count_drop(d.reliable, DropReason::Down);
            return None;
        }
        if self.nodes[d.src].group != self.nodes[dst].group {
            self.count_drop(d.reliable, DropReason::Partition);
            return None;
        }
        if d.reliable {
            self.stats.reliable_delivered += 1;
        } else {
            self.stats.datagrams_delivered += 1;
        }
        Some(d)
    }

    fn deliver(&mut self, d: Delivery) {
        let Some(d) = self.admit(d) else {
            return;
        };
        self.nodes[d.dst].receive(self.now, &d);
        self.after_input(d.dst);
    }

    fn fire_timer(&mut self, i: usize, generation: u64, seq: u64) {
        let starved = self.is_starved(i) && self.nodes[i].starve_defers_timer;
        let slot = &mut self.nodes[i];
        let live = slot.timer.is_some_and(|(_, s)| s == seq);
        // A starved node keeps its deadline; `end_starve` fires it.
        if !slot.up || slot.generation != generation || !live || starved {
            return;
        }
        slot.timer = None;
        slot.node.handle_timeout(self.now);
        self.after_input(i);
    }

    fn end_starve(&mut self, i: usize, until: Instant) {
        let now = self.now;
        let slot = &mut self.nodes[i];
        if slot.starved_until != Some(until) {
            return;
        }
        slot.starved_until = None;
        if slot.up && slot.timer.is_some_and(|(d, _)| d <= now) {
            slot.timer = None;
            slot.node.handle_timeout(now);
            self.after_input(i);
        }
        let mut queue = std::mem::take(&mut self.nodes[i].deferred);
        while let Some(d) = queue.pop_front() {
            self.deliver(d);
        }
        // Keep the queue's allocation for the next starvation.
        self.nodes[i].deferred = queue;
    }
}

/// One node's share of a window in [`Sim::run_until_parallel`]: its deliveries, in arrival order,
/// and what it sent.
struct WindowJob<'a, N> {
    index: usize,
    slot: &'a mut Slot<N>,
    deliveries: Vec<(Instant, Delivery)>,
    /// Everything the node sent in the window, with the virtual time it sent it.
    sent: Vec<(Instant, SimTransmit)>,
    /// The node's deadline after the window, and whether its timer must be queued again.
    deadline: Option<Instant>,
    timer_changed: bool,
    /// The time of the node's last input in the window.
    last: Instant,
}

impl<N: SimNode> WindowJob<'_, N> {
    /// Runs the node's inputs up to and including `limit`: its deliveries and its timer (also one
    /// set within the window), earliest first, the timer first on a tie.
    fn run(&mut self, limit: Instant, scratch: &mut Vec<SimTransmit>) {
        let old = self.slot.timer.map(|(d, _)| d);
        let mut deadline = old;
        let mut fired = false;
        let mut deliveries = std::mem::take(&mut self.deliveries).into_iter().peekable();
        loop {
            let next_delivery = deliveries.peek().map(|(at, _)| *at);
            let timer_due = deadline.filter(|&d| d <= limit);
            let timer_first = match (timer_due, next_delivery) {
                (Some(d), Some(at)) => d <= at,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let now = if let (true, Some(d)) = (timer_first, timer_due) {
                fired = true;
                let now = self.last.max(d);
                self.slot.node.handle_timeout(now);
                now
            } else {
                let Some((at, d)) = deliveries.next() else {
                    break;
                };
                let now = self.last.max(at);
                self.slot.receive(now, &d);
                now
            };
            self.last = now;
            self.slot.react(now, scratch);
            self.sent.extend(scratch.drain(..).map(|t| (now, t)));
            deadline = self.slot.node.poll_timeout();
        }
        self.deadline = deadline;
        self.timer_changed = fired || deadline != old;
    }
}

impl<N: SimNode + Send> Sim<N> {
    /// Like [`run_until`](Self::run_until), with the nodes' work spread over `threads` threads.
    ///
    /// Time advances in windows as long as the network's least latency: nothing a node sends in
    /// a window arrives before the next, so within a window every node runs its own inputs
    /// (deliveries and timer, earliest first) apart from the others, and what they sent enters
    /// the network after, node by node in index order. The outcome is a function of the seed
    /// alone, the same whatever `threads` is, though not the same as `run_until`'s, which
    /// interleaves nodes event by event.
    ///
    /// Runs as `run_until` does when a window cannot be used: a zero latency, per-link
    /// overrides (a link may be faster than the network), or a starved node.
    pub fn run_until_parallel(&mut self, t: Instant, threads: usize) {
        let lookahead = self.net.latency;
        if lookahead.is_zero()
            || !self.links.is_empty()
            || self.nodes.iter().any(|s| s.starved_until.is_some())
        {
            return self.run_until(t);
        }
        let threads = threads.max(1);
        let mut batch: Vec<(usize, Instant, u64, Option<Delivery>)> = Vec::new();
        while let Some(Reverse(first)) = self.heap.peek()
            && first.at <= t
        {
            // Inputs at or before `limit` form the window.
            let limit = (first.at + lookahead - Duration::from_nanos(1)).min(t);
            while let Some(Reverse(e)) = self.heap.peek()
                && e.at <= limit
            {
                let Some(Reverse(Entry { at, seq, ev })) = self.heap.pop() else {
                    break;
                };
                match ev {
                    Event::Timer { node, generation } => {
                        let slot = &self.nodes[node];
                        let live = slot.timer.is_some_and(|(_, s)| s == seq);
                        if slot.up && slot.generation == generation && live {
                            batch.push((node, at, seq, None));
                        }
                    }
                    Event::Deliver(d) => {
                        if let Some(d) = self.admit(d) {
                            batch.push((d.dst, at, seq, Some(d)));
                        }
                    }
                    // No node is starved, so the event is stale.
                    Event::StarveEnd { .. } => {}
                }
            }
            batch.sort_unstable_by_key(|&(node, at, seq, _)| (node, at, seq));
            let window_start = self.now.max(first_at(&batch).unwrap_or(limit));
            let before = self.now;
            let done = self.run_window(&mut batch, limit, window_start, threads);
            // Sending set the clock to each send's time; the window ends at its last input.
            self.now = before.max(done);
        }
        self.now = self.now.max(t);
    }

    /// Runs one window's inputs (`batch`, sorted by node, time and sequence) and sends what
    /// the nodes sent. Returns the time of the window's last input.
    fn run_window(
        &mut self,
        batch: &mut Vec<(usize, Instant, u64, Option<Delivery>)>,
        limit: Instant,
        start: Instant,
        threads: usize,
    ) -> Instant {
        let mut jobs: Vec<WindowJob<'_, N>> = Vec::new();
        let mut inputs = batch.drain(..).peekable();
        for (index, slot) in self.nodes.iter_mut().enumerate() {
            let Some(&(next, ..)) = inputs.peek() else {
                break;
            };
            if next != index {
                continue;
            }
            let mut deliveries = Vec::new();
            while let Some((_, at, _, d)) = inputs.next_if(|&(node, ..)| node == index) {
                if let Some(d) = d {
                    deliveries.push((at, d));
                }
            }
            jobs.push(WindowJob {
                index,
                slot,
                deliveries,
                sent: Vec::new(),
                deadline: None,
                timer_changed: false,
                last: start,
            });
        }
        drop(inputs);
        // A small window runs here; a larger one on the pool, whose threads stay up between
        // windows (a window is often under 100 us of work).
        if threads == 1 || jobs.len() < 4 {
            let mut scratch = Vec::new();
            for job in &mut jobs {
                job.run(limit, &mut scratch);
            }
        } else {
            let pool = match &self.pool {
                Some((n, pool)) if *n == threads => pool,
                _ => {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(|i| format!("sim-{i}"))
                        .build()
                        .expect("the simulator's thread pool starts");
                    &self.pool.insert((threads, pool)).1
                }
            };
            pool.install(|| {
                jobs.par_iter_mut()
                    .for_each_init(Vec::new, |scratch, job| job.run(limit, scratch));
            });
        }
        let results: Vec<_> = jobs
            .into_iter()
            .map(|j| (j.index, j.sent, j.deadline, j.timer_changed, j.last))
            .collect();
        let mut done = start;
        for (index, sent, deadline, timer_changed, last) in results {
            for (at, t) in sent {
                self.now = at;
                self.send(index, t);
            }
            done = done.max(last);
            if timer_changed {
                self.now = last;
                self.nodes[index].timer = None;
                if let Some(deadline) = deadline {
                    let generation = self.nodes[index].generation;
                    let seq = self.push(
                        deadline.max(last),
                        Event::Timer {
                            node: index,
                            generation,
                        },
                    );
                    self.nodes[index].timer = Some((deadline, seq));
                }
            }
        }
        done
    }
}

/// The earliest input time of a window's batch.
fn first_at(batch: &[(usize, Instant, u64, Option<Delivery>)]) -> Option<Instant> {
    batch.iter().map(|&(_, at, ..)| at).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echo node: logs every input, answers `ping*` with `pong*`, and on a periodic timer
    /// pings its peers.
    #[derive(Default)]
    struct Echo {
        out: VecDeque<SimTransmit>,
        timer: Option<Instant>,
        log: Vec<(Instant, char, Vec<u8>)>,
        peers: Vec<SocketAddr>,
        period: Option<Duration>,
        counter: u32,
    }

    impl SimNode for Echo {
        fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
            self.log.push((now, 'D', data.to_vec()));
            if let Some(rest) = data.strip_prefix(b"ping") {
                let payload = [b"pong", rest].concat();
                self.out.push_back(tx(from, false, payload));
            }
        }
        fn handle_stream(&mut self, now: Instant, _from: SocketAddr, data: &[u8]) {
            self.log.push((now, 'S', data.to_vec()));
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.log.push((now, 'T', Vec::new()));
            self.timer = None;
            if let Some(p) = self.period {
                for &dst in &self.peers {
                    self.counter += 1;
                    let payload = [&b"ping"[..], &self.counter.to_le_bytes()].concat();
                    self.out.push_back(tx(dst, false, payload));
                }
                self.timer = Some(now + p);
            }
        }
        fn poll_transmit(&mut self, _now: Instant) -> Option<SimTransmit> {
            self.out.pop_front()
        }
        fn poll_timeout(&mut self) -> Option<Instant> {
            self.timer
        }
    }

    fn addr(i: usize) -> SocketAddr {
        let port = u16::try_from(1000 + i).expect("test port fits");
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn tx(dst: SocketAddr, reliable: bool, payload: Vec<u8>) -> SimTransmit {
        SimTransmit {
            dst,
            reliable,
            payload,
        }
    }

    fn net(latency: u64, jitter: u64, loss: f64, duplicate: f64) -> NetConfig {
        let (latency, jitter) = (ms(latency), ms(jitter));
        NetConfig {
            latency,
            jitter,
            loss,
            duplicate,
            ..NetConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sim(seed: u64, net: NetConfig, n: usize) -> Sim<Echo> {
        let mut s = Sim::new(seed, net);
        for i in 0..n {
            s.add_node(addr(i), Echo::default());
        }
        s
    }

    fn send(s: &mut Sim<Echo>, from: usize, dst: SocketAddr, reliable: bool, payload: &[u8]) {
        s.with_node(from, |n, _| {
            n.out.push_back(tx(dst, reliable, payload.to_vec()))
        });
    }

    fn times(s: &Sim<Echo>, i: usize) -> Vec<(Duration, char)> {
        let base = s.base();
        s.node(i)
            .log
            .iter()
            .map(|(t, k, _)| (*t - base, *k))
            .collect()
    }

    /// `n` nodes each pinging the next 3 every 10 ms, staggered.
    fn mesh(seed: u64, net: NetConfig, n: usize, period: Duration) -> Sim<Echo> {
        let mut s = Sim::new(seed, net);
        s.enable_transmit_log();
        for i in 0..n {
            let base = s.base();
            let node = Echo {
                peers: (1..=3).map(|k| addr((i + k) % n)).collect(),
                period: Some(period),
                timer: Some(base + Duration::from_micros(i as u64 * 137)),
                ..Echo::default()
            };
            s.add_node(addr(i), node);
        }
        s
    }

    #[test]
    fn parallel_windows_give_the_same_run_on_any_number_of_threads() {
        let _guard = SeedGuard(env_u64("SEED", 7));
        let run = |seed, threads| {
            let mut s = mesh(seed, net(2, 3, 0.1, 0.05), 40, ms(10));
            // In steps, as a scenario runs, with one more node's send between them.
            for step in 1..=10 {
                send(&mut s, 0, addr(1), true, b"step");
                s.run_until_parallel(s.base() + ms(100 * step), threads);
                assert_eq!(s.now(), s.base() + ms(100 * step));
            }
            let logs: Vec<_> = (0..40).map(|i| times(&s, i)).collect();
            (s.transmit_log().to_vec(), s.stats().clone(), logs)
        };
        let (one, stats, logs) = run(1, 1);
        assert!(one.len() > 10_000, "{} sends", one.len());
        assert!(stats.datagrams_lost > 0 && stats.datagrams_duplicated > 0);
        for threads in [2, 3, 8] {
            let (log, st, node_logs) = run(1, threads);
            assert_eq!(log, one, "{threads} threads");
            assert_eq!(st, stats);
            assert_eq!(node_logs, logs);
        }
        assert_ne!(run(2, 2).0, one);
        // The windowed run does the same work as the event-by-event one: every node timed
        // out every 10 ms and answered every ping that reached it.
        let mut serial = mesh(1, net(2, 3, 0.1, 0.05), 40, ms(10));
        for step in 1..=10 {
            send(&mut serial, 0, addr(1), true, b"step");
            serial.run_until(serial.base() + ms(100 * step));
        }
        for (i, log) in logs.iter().enumerate() {
            let timers = |l: &[(Duration, char)]| l.iter().filter(|(_, k)| *k == 'T').count();
            assert_eq!(timers(log), timers(&times(&serial, i)), "node {i}");
            // Timers fire at their deadlines, in order, as in the serial run.
            assert!(
                log.windows(2).all(|w| w[0].0 <= w[1].0),
                "node {i} went back in time"
            );
        }
        let sent = |s: &NetStats| s.datagrams_sent + s.reliable_sent;
        let ratio = sent(&stats) as f64 / sent(serial.stats()) as f64;
        assert!(
            (0.95..1.05).contains(&ratio),
            "sends: windowed/serial = {ratio}"
        );
    }

    #[test]
    fn parallel_windows_fall_back_to_serial_where_a_window_cannot_hold() {
        // A link override may be faster than the network: the run is the serial one.
        let run = |parallel: bool| {
            let mut s = mesh(3, net(2, 0, 0.0, 0.0), 10, ms(10));
            s.set_link(0, 1, net(0, 0, 0.0, 0.0));
            let end = s.base() + ms(500);
            match parallel {
                true => s.run_until_parallel(end, 2),
                false => s.run_until(end),
            }
            s.transmit_log().to_vec()
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn determinism() {
        let _guard = SeedGuard(env_u64("SEED", 7));
        let run = |seed| {
            let mut s = mesh(seed, net(2, 3, 0.1, 0.05), 20, ms(10));
            s.run_for(Duration::from_secs(1));
            (s.transmit_log().to_vec(), s.stats().clone())
        };
        let (a, sa) = run(1);
        let (b, sb) = run(1);
        let (c, _) = run(2);
        assert!(a.len() > 5000);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert_ne!(a, c);
        assert!(sa.datagrams_lost > 0 && sa.datagrams_duplicated > 0);
    }

    #[test]
    fn latency_applied() {
        let mut s = sim(1, net(5, 0, 0.0, 0.0), 2);
        s.run_for(ms(3));
        send(&mut s, 0, addr(1), false, b"ping1");
        s.run_for(ms(100));
        assert_eq!(times(&s, 1), vec![(ms(8), 'D')]);
        assert_eq!(times(&s, 0), vec![(ms(13), 'D')]);
        assert_eq!(s.node(0).log[0].2, b"pong1");
        assert_eq!(s.elapsed(), ms(103));
        assert_eq!(s.node_stats(0).datagrams_sent, 1);
        assert_eq!(s.node_stats(0).bytes_sent, 5);
        assert_eq!(s.stats().datagrams_delivered, 2);
    }

    #[test]
    fn loss_and_duplication_rates() {
        let mut s = sim(3, net(1, 0, 0.3, 0.0), 2);
        for _ in 0..10_000 {
            send(&mut s, 0, addr(1), false, b"x");
        }
        s.run_for(ms(10));
        let got = s.node(1).log.len();
        assert!((6700..7300).contains(&got), "delivered {got}");
        assert_eq!(s.stats().datagrams_lost as usize, 10_000 - got);

        // A per-link override: duplication on 0 -> 1 only.
        s.set_net(NetConfig::default());
        s.set_link(0, 1, net(1, 0, 0.0, 0.2));
        for _ in 0..10_000 {
            send(&mut s, 0, addr(1), false, b"x");
            send(&mut s, 1, addr(0), false, b"x");
        }
        s.run_for(ms(10));
        let dup = s.node(1).log.len() - got;
        assert!((11_700..12_300).contains(&dup), "delivered {dup}");
        assert_eq!(s.node(0).log.len(), 10_000);
    }

    #[test]
    fn reliable_fifo_with_jitter() {
        let mut s = sim(5, net(1, 50, 0.0, 0.0), 2);
        for k in 0u32..1000 {
            send(&mut s, 0, addr(1), true, &k.to_le_bytes());
            send(&mut s, 0, addr(1), false, &k.to_le_bytes());
            s.run_for(Duration::from_micros(300));
        }
        s.run_for(ms(100));
        let (mut rel, mut dgram) = (Vec::new(), Vec::new());
        for (_, kind, data) in &s.node(1).log {
            let k = u32::from_le_bytes(data[..4].try_into().expect("4-byte payload"));
            (if *kind == 'S' { &mut rel } else { &mut dgram }).push(k);
        }
        assert_eq!(rel, (0..1000).collect::<Vec<_>>());
        assert_eq!(dgram.len(), 1000);
        assert!(dgram.windows(2).any(|w| w[0] > w[1]), "datagrams reorder");
        assert_eq!(s.stats().reliable_delivered, 1000);
    }

    #[test]
    fn partitions_block_and_heal() {
        let mut s = sim(1, NetConfig::default(), 3);
        s.partition(&[vec![0], vec![1]]);
        send(&mut s, 0, addr(1), false, b"a");
        send(&mut s, 0, addr(2), true, b"b");
        s.run_for(ms(5));
        assert!(s.node(1).log.is_empty() && s.node(2).log.is_empty());
        assert_eq!(s.stats().datagrams_dropped_partition, 1);
        assert_eq!(s.stats().reliable_dropped, 1);
        // Partition while in flight: dropped at delivery.
        s.heal();
        send(&mut s, 0, addr(1), false, b"c");
        s.partition(&[vec![0, 2]]);
        s.run_for(ms(5));
        assert!(s.node(1).log.is_empty());
        send(&mut s, 0, addr(2), false, b"d");
        s.run_for(ms(5));
        assert_eq!(s.node(2).log.len(), 1);
        s.heal();
        send(&mut s, 0, addr(1), false, b"e");
        s.run_for(ms(5));
        assert_eq!(s.node(1).log.len(), 1);
        assert_eq!(s.stats().datagrams_dropped_partition, 2);
    }

    #[test]
    fn crash_drops_deliveries_and_timers() {
        let mut s = sim(1, NetConfig::default(), 2);
        s.with_node(1, |n, now| n.timer = Some(now + ms(3)));
        send(&mut s, 0, addr(1), false, b"a");
        send(&mut s, 0, addr(1), true, b"b");
        s.crash(1);
        assert!(!s.is_up(1));
        s.run_for(ms(10));
        assert!(s.node(1).log.is_empty());
        assert_eq!(s.stats().datagrams_dropped_down, 1);
        assert_eq!(s.stats().reliable_dropped, 1);
        send(&mut s, 0, addr(1), false, b"c");
        s.run_for(ms(10));
        assert_eq!(s.stats().datagrams_dropped_down, 2);
    }

    #[test]
    fn restart_at_new_address() {
        let mut s = sim(1, NetConfig::default(), 2);
        send(&mut s, 0, addr(1), true, b"old");
        s.restart(1, Echo::default(), Some(addr(9)));
        assert!(s.is_up(1));
        assert_eq!(s.addr(1), addr(9));
        assert_eq!(s.index_of(addr(1)), None);
        send(&mut s, 0, addr(1), false, b"lost");
        send(&mut s, 0, addr(9), false, b"new");
        s.run_for(ms(5));
        assert_eq!(s.node(1).log.len(), 1);
        assert_eq!(s.node(1).log[0].2, b"new");
        assert_eq!(s.stats().reliable_dropped, 1);
        assert_eq!(s.stats().datagrams_dropped_unknown, 1);
        // Restart at the same address keeps it routable.
        s.restart(0, Echo::default(), None);
        send(&mut s, 1, addr(0), false, b"hi");
        s.run_for(ms(5));
        assert_eq!(s.node(0).log.len(), 1);
    }

    #[test]
    fn starvation_defers_then_delivers_in_order() {
        let mut s = sim(1, NetConfig::default(), 2);
        s.with_node(1, |n, now| n.timer = Some(now + ms(5)));
        let until = s.now() + ms(20);
        s.starve(1, until);
        for (k, p) in [b"1", b"2", b"3"].iter().enumerate() {
            send(&mut s, 0, addr(1), k == 1, *p);
            s.run_for(ms(1));
        }
        s.run_for(ms(15));
        assert!(s.node(1).log.is_empty(), "nothing processed while starved");
        s.run_for(ms(5));
        let expect = vec![(ms(20), 'T'), (ms(20), 'D'), (ms(20), 'S'), (ms(20), 'D')];
        assert_eq!(times(&s, 1), expect);
        let data: Vec<&[u8]> = s.node(1).log.iter().map(|e| &e.2[..]).collect();
        assert_eq!(data, [&b""[..], b"1", b"2", b"3"]);
        // After starvation, delivery is immediate again.
        send(&mut s, 0, addr(1), false, b"4");
        s.run_for(ms(2));
        assert_eq!(times(&s, 1).last(), Some(&(ms(24), 'D')));
    }

    #[test]
    fn timers_fire_exactly_and_stale_are_ignored() {
        let mut s = sim(1, NetConfig::default(), 1);
        s.with_node(0, |n, now| n.timer = Some(now + ms(7)));
        s.run_for(ms(10));
        assert_eq!(times(&s, 0), vec![(ms(7), 'T')]);
        s.with_node(0, |n, now| n.timer = Some(now + ms(3)));
        s.with_node(0, |n, now| n.timer = Some(now + ms(9)));
        s.with_node(0, |n, now| n.timer = Some(now + ms(3)));
        s.with_node(0, |n, now| n.timer = Some(now + ms(9)));
        s.run_for(ms(20));
        assert_eq!(times(&s, 0), vec![(ms(7), 'T'), (ms(19), 'T')]);
        // A deadline in the past fires at the current instant.
        s.with_node(0, |n, now| n.timer = Some(now - ms(1)));
        assert!(s.step());
        assert_eq!(times(&s, 0).last(), Some(&(ms(30), 'T')));
        while s.step() {}
        assert_eq!(s.node(0).log.len(), 3);
    }

    #[test]
    fn checked_run_calls_check_periodically() {
        let mut s = mesh(1, NetConfig::default(), 5, ms(10));
        let mut seen = Vec::new();
        s.run_for_checked(ms(100), ms(30), |s| seen.push(s.elapsed()));
        assert_eq!(seen, vec![ms(30), ms(60), ms(90), ms(100)]);
    }

    #[test]
    #[ignore = "throughput check; run with --release -- --ignored"]
    fn thousand_nodes_sixty_seconds() {
        let start = Instant::now();
        let mut s = mesh(1, net(1, 2, 0.0, 0.0), 1000, ms(1000));
        s.run_for(Duration::from_secs(60));
        let st = s.stats();
        eprintln!("{st:?} in {:?}", start.elapsed());
        assert!(st.datagrams_delivered > 300_000);
    }
}
