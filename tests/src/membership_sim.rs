//! The membership simulator: [`Membership`] state machines on the deterministic [`engine`](crate::engine).
//!
//! Each node is a [`MemberNode`]: the state machine plus a compact log of what it observed (first
//! time it saw each member Dead, Left, Suspect, ...), a toy versioned key-value application riding on
//! the application-payload interface, and continuous invariant checks (no node lists itself,
//! incarnations never go backwards while a member is known).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grinta_proto::claims::TrustAll;
use grinta_proto::membership::{Config, Event, MemberState, Membership};
use grinta_proto::wire::framing;
use hashbrown::HashMap;

use crate::engine::{NetConfig, Sim, SimNode, SimTransmit};

/// The simulated address of node number `i`: distinct loopback addresses, one port.
pub fn node_addr(i: usize) -> SocketAddr {
    let i = i as u32 + 2;
    SocketAddr::from((
        Ipv4Addr::new(127, (i >> 16) as u8, (i >> 8) as u8, i as u8),
        7946,
    ))
}

/// The name of node number `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// What a node observed, with the virtual time it happened.
#[derive(Debug, Default)]
pub struct Observations {
    /// First time each member was seen Dead (reset when it comes back).
    pub dead: HashMap<String, Instant>,
    /// First time each member was seen Left.
    pub left: HashMap<String, Instant>,
    /// Every suspicion event: (time, member).
    pub suspects: Vec<(Instant, String)>,
    /// Every "alive again" after a suspicion: (time, member, incarnation).
    pub alive_again: Vec<(Instant, String, u64)>,
    /// Every Dead event: (time, member).
    pub dead_events: Vec<(Instant, String)>,
    /// Refutations of suspicions about this node.
    pub refutations: Vec<(Instant, u64)>,
    /// When the join completed.
    pub joined_at: Option<Instant>,
    /// When the leave completed.
    pub leave_complete_at: Option<Instant>,
    /// Highest incarnation seen per member while it is known, by node number (`node-<i>`): a
    /// 10,000-node run holds a hundred million of them, so no name is stored, and incarnations
    /// from `u16::MAX` up are kept in `other_incarnations` ([`Self::IN_MAP`] here): in the
    /// membership simulator members start at 1, so that takes 65,535 refutations or restarts;
    /// whole nodes restarted past 65 simulated seconds start there (their first incarnation
    /// is the milliseconds since the cluster's start).
    incarnations: Vec<u16>,
    /// The same for members named otherwise, and for large incarnations.
    other_incarnations: HashMap<String, u64>,
}

impl Observations {
    /// Records one membership event seen at `now`. Returns an error if it breaks an invariant
    /// (an incarnation going backwards while the member is known).
    pub fn record(&mut self, now: Instant, event: &Event) -> Result<(), String> {
        match event {
            Event::MemberJoined(m) => {
                self.dead.remove(&m.name);
                self.set_incarnation(&m.name, m.incarnation);
                Ok(())
            }
            Event::MemberUpdated(m) => self.check_incarnation(&m.name, m.incarnation),
            Event::MemberAlive(m) => {
                self.alive_again.push((now, m.name.clone(), m.incarnation));
                self.check_incarnation(&m.name, m.incarnation)
            }
            Event::MemberSuspect { name, incarnation } => {
                self.suspects.push((now, name.clone()));
                self.check_incarnation(name, *incarnation)
            }
            Event::MemberDead { name, incarnation } => {
                self.dead.entry(name.clone()).or_insert(now);
                self.dead_events.push((now, name.clone()));
                self.check_incarnation(name, *incarnation)
            }
            Event::MemberLeft { name, incarnation } => {
                self.left.entry(name.clone()).or_insert(now);
                self.check_incarnation(name, *incarnation)
            }
            Event::Refuted { incarnation } => {
                self.refutations.push((now, *incarnation));
                Ok(())
            }
            Event::Joined => {
                self.joined_at.get_or_insert(now);
                Ok(())
            }
            Event::LeaveComplete => {
                self.leave_complete_at = Some(now);
                Ok(())
            }
            // Application payloads, and what later versions add.
            _ => Ok(()),
        }
    }

    /// In `incarnations`: the member's incarnation is in `other_incarnations`.
    const IN_MAP: u16 = u16::MAX;

    /// The compact slot of member `name`, if it has one.
    fn compact_slot(&mut self, name: &str) -> Option<&mut u16> {
        // Only names exactly as `node_name` writes them, below a bound, take the compact slots.
        let i = canonical_name_index(name).filter(|&i| i < 1 << 20)?;
        if self.incarnations.len() <= i {
            // Grow by an eighth, not by doubling: a 10,000-node run holds 10,000 of these.
            let len = (i + 1).max(self.incarnations.len() + self.incarnations.len() / 8);
            self.incarnations
                .reserve_exact(len - self.incarnations.len());
            self.incarnations.resize(i + 1, 0);
        }
        Some(&mut self.incarnations[i])
    }

    fn last_incarnation(&mut self, name: &str) -> u64 {
        match self.compact_slot(name) {
            Some(&mut slot) if slot != Self::IN_MAP => u64::from(slot),
            _ => self.other_incarnations.get(name).copied().unwrap_or(0),
        }
    }

    fn set_incarnation(&mut self, name: &str, incarnation: u64) {
        let compact = u16::try_from(incarnation)
            .ok()
            .filter(|&i| i != Self::IN_MAP);
        match (self.compact_slot(name), compact) {
            (Some(slot), Some(incarnation)) => {
                let was_in_map = *slot == Self::IN_MAP;
                *slot = incarnation;
                if was_in_map {
                    self.other_incarnations.remove(name);
                }
            }
            (slot, _) => {
                if let Some(slot) = slot {
                    *slot = Self::IN_MAP;
                }
                self.other_incarnations.insert(name.to_owned(), incarnation);
            }
        }
    }

    fn check_incarnation(&mut self, name: &str, incarnation: u64) -> Result<(), String> {
        let last = self.last_incarnation(name);
        if incarnation < last {
            return Err(format!(
                "incarnation of {name} went back from {last} to {incarnation}"
            ));
        }
        self.set_incarnation(name, incarnation);
        Ok(())
    }
}

/// A toy application on the membership's application-payload interface: a versioned key-value map.
/// An entry with a higher version replaces a lower one; new knowledge is re-broadcast (epidemic).
#[derive(Debug, Default)]
pub struct VersionedKv {
    /// key -> (version, first time seen here).
    pub entries: HashMap<Bytes, (u64, Instant)>,
}

impl VersionedKv {
    fn merge(&mut self, key: Bytes, version: u64, now: Instant) -> bool {
        match self.entries.get(&key) {
            Some((v, _)) if *v >= version => false,
            _ => {
                self.entries.insert(key, (version, now));
                true
            }
        }
    }

    fn encode(&self) -> Bytes {
        let mut keys: Vec<_> = self.entries.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = Vec::new();
        for (key, (version, _)) in keys {
            framing::encode_frame(key, &mut out);
            framing::encode_frame(&version.to_be_bytes(), &mut out);
        }
        out.into()
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct MemberNode {
    /// The state machine under test.
    pub membership: Membership,
    /// What it observed.
    pub seen: Observations,
    /// The toy application.
    pub kv: VersionedKv,
    /// Set when an invariant broke; checked by [`Cluster::check_invariants`].
    pub violation: Option<String>,
}

impl MemberNode {
    /// A node named `name` at `addr`. Every member of the membership simulation is honest, so
    /// claims go unsigned ([`TrustAll`]); signatures are exercised by the whole-node simulation.
    pub fn new(config: Config, name: &str, addr: SocketAddr, seed: u64, now: Instant) -> Self {
        Self::with_keys(config, name, addr, seed, now, Box::new(TrustAll))
    }

    /// A node like [`MemberNode::new`] whose claims are signed and checked with `keys` (for
    /// example [`grinta_proto::claims::CertificateKeys`]): each alive then carries its
    /// certificate, as between whole nodes.
    pub fn with_keys(
        config: Config,
        name: &str,
        addr: SocketAddr,
        seed: u64,
        now: Instant,
        keys: Box<dyn grinta_proto::claims::ClaimKeys>,
    ) -> Self {
        Self {
            membership: Membership::new(config, name, addr, seed, now, keys)
                .expect("simulation configs are valid"),
            seen: Observations::default(),
            kv: VersionedKv::default(),
            violation: None,
        }
    }

    /// Publishes `key` at `version` through the application interface.
    pub fn publish(&mut self, key: &[u8], version: u64, now: Instant) {
        let key = Bytes::copy_from_slice(key);
        if self.kv.merge(key.clone(), version, now) {
            self.rebroadcast(key, version);
        }
    }

    fn rebroadcast(&mut self, key: Bytes, version: u64) {
        self.membership
            .broadcast_app(key, Bytes::copy_from_slice(&version.to_be_bytes()))
            .expect("toy items are small");
        self.membership.set_app_state(self.kv.encode());
    }
}

impl SimNode for MemberNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.membership.handle_datagram(now, from, data);
    }

    fn handle_stream(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.membership.handle_stream(now, from, data);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.membership.handle_timeout(now);
    }

    fn poll_transmit(&mut self, _now: Instant) -> Option<SimTransmit> {
        self.membership.poll_outgoing().map(|t| SimTransmit {
            dst: t.dst,
            reliable: t.channel.is_reliable(),
            payload: t.payload,
        })
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.membership.poll_timeout()
    }

    fn drain_events(&mut self, now: Instant) {
        while let Some(event) = self.membership.poll_event() {
            match event {
                Event::AppBroadcast { key, payload } => {
                    let Ok(bytes) = <[u8; 8]>::try_from(&payload[..]) else {
                        continue;
                    };
                    let version = u64::from_be_bytes(bytes);
                    if self.kv.merge(key.clone(), version, now) {
                        self.rebroadcast(key, version);
                    }
                }
                Event::AppState { state, .. } => {
                    let mut decoder = framing::FrameDecoder::new(1 << 16);
                    decoder.extend(&state);
                    let mut changed = false;
                    while let (Ok(Some(key)), Ok(Some(version))) =
                        (decoder.next_frame(), decoder.next_frame())
                    {
                        let Ok(bytes) = <[u8; 8]>::try_from(&version[..]) else {
                            break;
                        };
                        changed |= self.kv.merge(key, u64::from_be_bytes(bytes), now);
                    }
                    if changed {
                        self.membership.set_app_state(self.kv.encode());
                    }
                }
                other => {
                    if let Err(v) = self.seen.record(now, &other) {
                        self.violation
                            .get_or_insert(format!("{}: {v}", self.membership.local_name()));
                    }
                }
            }
        }
    }
}

/// What the cluster helpers need from a simulated node, whatever carries its membership.
pub trait ClusterNode: SimNode {
    /// The node's membership state machine.
    fn membership(&self) -> &Membership;
    /// What it observed.
    fn observations(&self) -> &Observations;
    /// The first invariant it broke, if any.
    fn violation(&self) -> Option<&str>;
    /// Starts joining through `seeds`.
    fn join(&mut self, now: Instant, seeds: &[SocketAddr]);
}

impl ClusterNode for MemberNode {
    fn membership(&self) -> &Membership {
        &self.membership
    }

    fn observations(&self) -> &Observations {
        &self.seen
    }

    fn violation(&self) -> Option<&str> {
        self.violation.as_deref()
    }

    fn join(&mut self, now: Instant, seeds: &[SocketAddr]) {
        self.membership.join(now, seeds);
    }
}

/// Makes node `i` (restart `generation`, 0 for the first start) at `addr`.
pub type NodeFactory<N> = Box<dyn Fn(usize, u64, SocketAddr, Instant) -> N>;

/// A simulated cluster.
pub struct Cluster<N: ClusterNode> {
    /// The engine.
    pub sim: Sim<N>,
    /// The membership configuration every node was created with.
    pub config: Config,
    seed: u64,
    factory: NodeFactory<N>,
}

impl Cluster<MemberNode> {
    /// `n` membership-only nodes with `config`, not yet joined, on a network with `net`.
    pub fn new(seed: u64, n: usize, config: Config, net: NetConfig) -> Self {
        let c = config.clone();
        let factory: NodeFactory<MemberNode> = Box::new(move |i, generation, addr, now| {
            MemberNode::new(
                c.clone(),
                &node_name(i),
                addr,
                node_seed(seed, i, generation),
                now,
            )
        });
        Self::with_factory(seed, n, config, net, factory)
    }

    /// `n` membership-only nodes joined through node 0 (see [`Cluster::form`]).
    pub fn formed(seed: u64, n: usize, config: Config, net: NetConfig, spread: Duration) -> Self {
        let mut cluster = Self::new(seed, n, config, net);
        cluster.form(spread);
        cluster
    }
}

impl<N: ClusterNode> Cluster<N> {
    /// `n` nodes made by `factory` at [`node_addr`]`(i)`, not yet joined.
    pub fn with_factory(
        seed: u64,
        n: usize,
        config: Config,
        net: NetConfig,
        factory: NodeFactory<N>,
    ) -> Self {
        let mut sim = Sim::new(seed, net);
        let now = sim.now();
        for i in 0..n {
            sim.add_node(node_addr(i), factory(i, 0, node_addr(i), now));
        }
        Self {
            sim,
            config,
            seed,
            factory,
        }
    }

    /// The seed of this run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Joins every node through node 0, spread over `spread`, then runs until every view holds every
    /// node (at most 120 s); panics otherwise.
    pub fn form(&mut self, spread: Duration) {
        self.form_within(spread, Duration::from_secs(120));
    }

    /// Like [`form`](Self::form), waiting at most `limit` after the last join; the panic says
    /// how far from exact the views were.
    pub fn form_within(&mut self, spread: Duration, limit: Duration) {
        let n = self.sim.len();
        let start = self.sim.now();
        for i in 1..n {
            let at = start + spread.mul_f64(i as f64 / n as f64);
            self.sim.run_until(at);
            self.sim
                .with_node(i, |node, now| node.join(now, &[node_addr(0)]));
        }
        let formed_at = self.run_until(limit, |c| c.converged());
        if formed_at.is_none() {
            let up: Vec<bool> = (0..n).map(|i| self.sim.is_up(i)).collect();
            let count = up.iter().filter(|&&u| u).count();
            let inexact = (0..n)
                .filter(|&i| up[i] && !self.view_is_exact(i, &up, count))
                .count();
            let alive: usize = (0..n)
                .filter(|&i| up[i])
                .map(|i| {
                    self.sim
                        .node(i)
                        .membership()
                        .member_states()
                        .filter(|&(_, s)| s == MemberState::Alive)
                        .count()
                })
                .sum();
            panic!(
                "cluster of {n} did not converge within {limit:?} (seed {}): {inexact} views \
                 not exact, {alive} of {} Alive entries",
                self.seed,
                count * (count - 1)
            );
        }
    }

    /// Runs until `done` holds (checked every 50 ms of virtual time) or `limit` passes; checks the
    /// invariants as it goes. Returns the virtual time it took, `None` if `limit` passed.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let start = self.sim.now();
        let step = Duration::from_millis(50);
        while self.sim.now() < start + limit {
            if done(self) {
                return Some(self.sim.now() - start);
            }
            self.sim.run_for(step);
            self.check_invariants();
        }
        done(self).then(|| self.sim.now() - start)
    }

    /// Runs for `d` of virtual time, checking invariants every second.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.sim.now() + d;
        while self.sim.now() < end {
            let step = (end - self.sim.now()).min(Duration::from_secs(1));
            self.sim.run_for(step);
            self.check_invariants();
        }
    }

    /// Panics if any node broke an invariant: listing itself, or an incarnation going backwards.
    pub fn check_invariants(&self) {
        for i in 0..self.sim.len() {
            if !self.sim.is_up(i) {
                continue;
            }
            let node = self.sim.node(i);
            if let Some(v) = node.violation() {
                panic!("invariant broken (seed {}): {v}", self.seed);
            }
            let me = node.membership().local_name();
            assert!(
                node.membership().member(me).is_none(),
                "{me} lists itself (seed {})",
                self.seed
            );
        }
    }

    /// Whether every up node sees exactly the other up nodes as Alive, and every down node as gone
    /// (Dead, Left, or forgotten).
    pub fn converged(&self) -> bool {
        let up: Vec<bool> = (0..self.sim.len()).map(|i| self.sim.is_up(i)).collect();
        let count = up.iter().filter(|&&u| u).count();
        (0..self.sim.len()).all(|i| !up[i] || self.view_is_exact(i, &up, count))
    }

    /// Whether node `i` sees exactly the `count` nodes marked in `up` (minus itself) as Alive.
    fn view_is_exact(&self, i: usize, up: &[bool], count: usize) -> bool {
        let m = self.sim.node(i).membership();
        let alive = m
            .member_states()
            .filter(|&(_, state)| state == MemberState::Alive)
            .count();
        alive == count - 1
            && m.member_states().all(|(name, state)| {
                let up_peer = name_index(name).is_some_and(|j| up.get(j) == Some(&true));
                (state == MemberState::Alive) == up_peer
            })
    }

    /// Crashes node `i` (no goodbye).
    pub fn kill(&mut self, i: usize) {
        self.sim.crash(i);
    }

    /// Restarts node `i` as a fresh process (`generation` > 0 gives it new randomness), at its old
    /// address or at `addr`, and joins it through `seed_node`.
    pub fn restart(
        &mut self,
        i: usize,
        generation: u64,
        addr: Option<SocketAddr>,
        seed_node: usize,
    ) {
        let now = self.sim.now();
        // Its old address is the one it last ran at (it may have moved before).
        let at = addr.unwrap_or(self.sim.addr(i));
        let node = (self.factory)(i, generation, at, now);
        self.sim.restart(i, node, addr);
        let seed_addr = self.sim.addr(seed_node);
        self.sim.with_node(i, |n, now| n.join(now, &[seed_addr]));
    }

    /// For each up node other than `victim`, how long after `since` it first saw `victim` Dead
    /// (`None` if it has not).
    pub fn detection_times(&self, victim: usize, since: Instant) -> Vec<Option<Duration>> {
        let name = node_name(victim);
        (0..self.sim.len())
            .filter(|&i| i != victim && self.sim.is_up(i))
            .map(|i| self.seen_dead_after(i, &name, since))
            .collect()
    }

    /// How long after `since` node `observer` first saw `victim` Dead (`None` if it has not).
    pub fn detection_time(
        &self,
        observer: usize,
        victim: usize,
        since: Instant,
    ) -> Option<Duration> {
        self.seen_dead_after(observer, &node_name(victim), since)
    }

    fn seen_dead_after(&self, observer: usize, name: &str, since: Instant) -> Option<Duration> {
        self.sim
            .node(observer)
            .observations()
            .dead
            .get(name)
            .map(|t| t.saturating_duration_since(since))
    }

    /// The incarnation node `observer` holds for node `member`, if it knows it.
    pub fn incarnation_seen(&self, observer: usize, member: usize) -> Option<u64> {
        self.sim
            .node(observer)
            .membership()
            .member(&node_name(member))
            .map(|m| m.incarnation)
    }
}

/// The node index in a name made by [`node_name`].
pub fn name_index(name: &str) -> Option<usize> {
    name.strip_prefix("node-")?.parse().ok()
}

/// The number `i` of a name exactly as [`node_name`] writes it (`node-<i>`, decimal digits, no
/// leading zero, no sign), without building the name to compare: the observations look it up
/// for every event of every node.
fn canonical_name_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("node-")?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits.len() == 1 || !digits.starts_with('0'));
    canonical.then(|| digits.parse().ok()).flatten()
}

/// The seed of node `i` in its `generation`-th start, derived from the run's seed.
pub fn node_seed(seed: u64, i: usize, generation: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64) << 20)
        .wrapping_add(generation)
}

/// Quantile `q` (0..=1) of durations, by nearest rank; `None` for an empty list.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod name_tests {
    use super::*;
    use grinta_proto::membership::Member;

    #[test]
    fn incarnations_past_a_compact_slot_are_checked_as_well() {
        let now = Instant::now();
        let member = |name: &str, incarnation: u64| Member {
            name: name.to_owned(),
            addr: node_addr(0),
            incarnation,
            state: MemberState::Alive,
            meta: Bytes::new(),
        };
        let mut seen = Observations::default();
        for name in [node_name(3), "someone-else".to_owned()] {
            seen.record(now, &Event::MemberJoined(member(&name, 7)))
                .unwrap();
            for incarnation in [65_534, 65_535, 70_000, u64::from(u32::MAX) + 1, u64::MAX] {
                seen.record(now, &Event::MemberUpdated(member(&name, incarnation)))
                    .unwrap();
                assert_eq!(seen.last_incarnation(&name), incarnation);
                let back = Event::MemberUpdated(member(&name, incarnation - 1));
                assert!(seen.record(now, &back).is_err(), "{name} {incarnation}");
            }
            // Back in a compact slot after a rejoin at a small incarnation.
            seen.record(now, &Event::MemberJoined(member(&name, 2)))
                .unwrap();
            assert_eq!(seen.last_incarnation(&name), 2);
            let back = Event::MemberUpdated(member(&name, 1));
            assert!(seen.record(now, &back).is_err());
        }
        // Only the name without a compact slot stays in the map.
        let in_map: Vec<&String> = seen.other_incarnations.keys().collect();
        assert_eq!(in_map, ["someone-else"]);
    }

    #[test]
    fn only_names_as_node_name_writes_them_have_a_compact_index() {
        for i in [0, 7, 10, 999, 10_000, (1 << 20) - 1] {
            assert_eq!(canonical_name_index(&node_name(i)), Some(i));
        }
        for other in [
            "node-", "node-01", "node-+1", "node--1", "node-1a", "node- 1", "nod-1", "node-00",
        ] {
            assert_eq!(canonical_name_index(other), None, "{other}");
        }
        assert_eq!(
            canonical_name_index("node-99999999999999999999999"),
            None,
            "beyond usize"
        );
    }
}
