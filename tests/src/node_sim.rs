//! The whole-node simulator: real [`Node`]s (quinn-proto, rustls, mutual TLS) on the deterministic
//! engine, sharing the cluster helpers of the membership simulator.
//!
//! Every node gets the seeded crypto provider of [`det_crypto`](crate::det_crypto) and a fixed wall
//! clock, so two runs of one seed (with the same certificates) produce byte-identical packets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use grinta_proto::flow::FlowEvent;
use grinta_proto::membership::{Config, Membership};
use grinta_proto::node::{Event, Node, NodeConfig};
use grinta_proto::registry::RegistryEvent;
use grinta_proto::tls::TlsConfig;
use grinta_proto::tls::dev::DevCa;

use crate::det_crypto::{FixedClock, deterministic_provider};
use crate::engine::{NetConfig, SimNode, SimTransmit};
use crate::membership_sim::{
    Cluster, ClusterNode, NodeFactory, Observations, node_name, node_seed,
};

/// Application logic that reacts to a node's flow events inside the simulation (an echo server, a
/// sink, a sender...). It may call any `Node` method.
pub trait FlowApp {
    /// Called for every flow event, in order, at virtual time `now`.
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent);
}

/// One simulated node: a real [`Node`] plus what it observed.
pub struct SimulatedNode {
    /// The node under test.
    pub node: Node,
    /// Membership events it saw.
    pub seen: Observations,
    /// Connections that ended: (time, peer name, handshake failed).
    pub connections_lost: Vec<(Instant, Option<String>, bool)>,
    /// Directory events: (time, event).
    pub registry_events: Vec<(Instant, RegistryEvent)>,
    /// Names the directory held when the join completed.
    pub names_at_join: Option<Vec<String>>,
    /// Entries the key/value table held when the join completed.
    pub entries_at_join: Option<usize>,
    /// Flow events: (time, event).
    pub flow_events: Vec<(Instant, FlowEvent)>,
    /// The application driving this node's flows, if any.
    pub app: Option<Box<dyn FlowApp>>,
    violation: Option<String>,
}

impl SimulatedNode {
    /// Wraps a node.
    pub fn new(node: Node) -> Self {
        Self {
            node,
            seen: Observations::default(),
            connections_lost: Vec::new(),
            registry_events: Vec::new(),
            names_at_join: None,
            entries_at_join: None,
            flow_events: Vec::new(),
            app: None,
            violation: None,
        }
    }
}

impl std::fmt::Debug for SimulatedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedNode")
            .field("node", &self.node)
            .field("app", &self.app.is_some())
            .finish_non_exhaustive()
    }
}

impl SimNode for SimulatedNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.node
            .handle_datagram(now, from, bytes::BytesMut::from(data));
    }

    fn handle_stream(&mut self, _now: Instant, _from: SocketAddr, _data: &[u8]) {
        // Nodes speak only UDP; QUIC provides the reliable streams.
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.node.handle_timeout(now);
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<SimTransmit> {
        self.node.poll_transmit(now).map(|t| SimTransmit {
            dst: t.destination,
            reliable: false,
            payload: t.contents,
        })
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.node.poll_timeout()
    }

    fn has_pending_work(&self) -> bool {
        self.node.has_pending_work()
    }

    fn drain_events(&mut self, now: Instant) {
        while let Some(event) = self.node.poll_event() {
            match event {
                Event::Membership(e) => {
                    if e == grinta_proto::membership::Event::Joined && self.names_at_join.is_none()
                    {
                        let names = self.node.registry().names("");
                        self.names_at_join = Some(names.into_iter().map(str::to_owned).collect());
                        self.entries_at_join = Some(self.node.kv().entries("").len());
                    }
                    if let Err(v) = self.seen.record(now, &e) {
                        self.violation
                            .get_or_insert(format!("{}: {v}", self.node.name()));
                    }
                }
                Event::ConnectionLost {
                    name,
                    handshake_failed,
                    ..
                } => self.connections_lost.push((now, name, handshake_failed)),
                Event::Registry(e) => self.registry_events.push((now, e)),
                Event::Flow(e) => {
                    if let Some(app) = self.app.as_mut() {
                        app.on_event(&mut self.node, now, &e);
                    }
                    self.flow_events.push((now, e));
                }
                _ => {}
            }
        }
    }
}

impl ClusterNode for SimulatedNode {
    fn membership(&self) -> &Membership {
        self.node.membership()
    }

    fn observations(&self) -> &Observations {
        &self.seen
    }

    fn violation(&self) -> Option<&str> {
        self.violation.as_deref()
    }

    fn join(&mut self, now: Instant, seeds: &[SocketAddr]) {
        self.node.join(now, seeds);
    }
}

/// TLS material for `n` nodes named [`node_name`]`(i)`, from one development CA. Make it once and
/// share it between runs that must replay byte for byte (certificate keys are random).
pub fn certificates(ca: &DevCa, n: usize) -> Arc<Vec<TlsConfig>> {
    Arc::new(
        (0..n)
            .map(|i| ca.issue(&node_name(i)).expect("development certificates"))
            .collect(),
    )
}

/// The configuration of simulated node `i` at `addr`, with the seeded provider and fixed clock.
pub fn sim_node_config(
    seed: u64,
    i: usize,
    generation: u64,
    addr: SocketAddr,
    tls: TlsConfig,
    membership: Config,
) -> NodeConfig {
    let mut config = NodeConfig::new(&node_name(i), addr, tls);
    config.membership = membership;
    config.crypto_provider = deterministic_provider(node_seed(seed, i, generation) ^ 0xC0FFEE);
    config.time_provider = Arc::new(FixedClock::default());
    config
}

impl Cluster<SimulatedNode> {
    /// `n` real nodes with certificates `certs[i]`, not yet joined.
    pub fn nodes(
        seed: u64,
        net: NetConfig,
        membership: Config,
        certs: Arc<Vec<TlsConfig>>,
    ) -> Self {
        Self::nodes_with(seed, net, membership, certs, |_| {})
    }

    /// `n` real nodes on `net`, with the whole-node membership settings and certificates from
    /// a development CA made from `seed`, not yet joined.
    pub fn dev_nodes(seed: u64, net: NetConfig, n: usize) -> Self {
        Self::dev_nodes_with(seed, net, n, |_| {})
    }

    /// Like [`dev_nodes`](Self::dev_nodes), with `tweak` applied to every node's configuration.
    pub fn dev_nodes_with(
        seed: u64,
        net: NetConfig,
        n: usize,
        tweak: impl Fn(&mut NodeConfig) + 'static,
    ) -> Self {
        let ca = DevCa::from_seed(seed).expect("dev CA");
        Self::nodes_with(
            seed,
            net,
            node_membership_config(),
            certificates(&ca, n),
            tweak,
        )
    }

    /// Like [`nodes`](Self::nodes), with `tweak` applied to every node's configuration.
    pub fn nodes_with(
        seed: u64,
        net: NetConfig,
        membership: Config,
        certs: Arc<Vec<TlsConfig>>,
        tweak: impl Fn(&mut NodeConfig) + 'static,
    ) -> Self {
        let n = certs.len();
        let m = membership.clone();
        // Like the fabric, a node starts at the (virtual) wall clock in milliseconds, so a
        // restarted node starts above its previous life.
        let epoch = std::cell::Cell::new(None::<Instant>);
        let factory: NodeFactory<SimulatedNode> = Box::new(move |i, generation, addr, now| {
            let mut config =
                sim_node_config(seed, i, generation, addr, certs[i].clone(), m.clone());
            let base = epoch.get().unwrap_or(now);
            epoch.set(Some(base));
            let since = now.saturating_duration_since(base);
            config.membership.initial_incarnation =
                1 + u64::try_from(since.as_millis()).unwrap_or(0);
            tweak(&mut config);
            let node = Node::new(config, node_seed(seed, i, generation), now)
                .expect("simulated node configuration is valid");
            SimulatedNode::new(node)
        });
        Self::with_factory(seed, n, membership, net, factory)
    }
}

/// The membership settings whole-node simulations use: the LAN profile, as a node runs it.
pub fn node_membership_config() -> Config {
    Config::lan()
}

/// What a formed cluster of whole nodes cost per node over a steady-state window
/// ([`steady_state_cost`]).
#[derive(Debug, Clone)]
pub struct SteadyCost {
    /// Cluster size.
    pub n: usize,
    /// Wall-clock CPU of the whole simulation over the window, per node and simulated second.
    pub cpu_us_per_node_s: f64,
    /// Handshakes per node per minute (each counted once for each of its two nodes).
    pub handshakes_per_node_min: f64,
    /// Of those handshakes, the share that resumed a TLS session (no signatures).
    pub resumed: f64,
    /// Open connections per node at the end.
    pub connections_per_node: f64,
    /// Growth of the live heap from before the cluster was made, divided by N (nodes and the
    /// simulator's own records; counted by [`crate::alloc::Counting`], which must be the
    /// global allocator).
    pub heap_per_node: f64,
    /// Probes that failed over the window, all nodes together.
    pub probes_failed: u64,
    /// Whether every view was exact at the end.
    pub converged: bool,
}

/// Forms a cluster of `n` whole nodes on a lossless 1 ms LAN (joins spread over 50 ms per
/// node), runs 30 s plus two rounds of the probe walk (so that every pair has had the chance to
/// keep a TLS session ticket each way), then measures `window` of simulated time. `idle`
/// overrides the transport's idle timeout.
///
/// `max_connections` sets every node's connection budget. Below `n - 1` connections never
/// settle (every probe reconnects), so the warm-up is 30 s instead: two probe rounds would buy
/// nothing and take an hour of wall time at N=1,000. Formation may then take up to 480 s after
/// the last join.
///
/// The process id is printed when the window starts, for a profiler to attach to the window
/// alone (`perf record -p`).
pub fn steady_state_cost(
    seed: u64,
    n: usize,
    window: std::time::Duration,
    idle: Option<std::time::Duration>,
    max_connections: Option<usize>,
) -> SteadyCost {
    use std::time::Duration;

    let heap_before = crate::alloc::live_bytes();
    let mut c: Cluster<SimulatedNode> =
        Cluster::dev_nodes_with(seed, NetConfig::default(), n, move |config| {
            if let Some(idle) = idle {
                config.transport.idle_timeout = idle;
            }
            if let Some(budget) = max_connections {
                config.transport.max_connections = budget;
            }
        });
    let budgeted = max_connections.is_some_and(|budget| budget + 1 < n);
    let spread = Duration::from_millis(50 * n as u64);
    if budgeted {
        c.form_within(spread, Duration::from_secs(480));
        c.run_for(Duration::from_secs(30));
    } else {
        c.form(spread);
        c.run_for(Duration::from_secs(30) + 2 * n as u32 * node_membership_config().probe_interval);
    }
    let totals = |c: &Cluster<SimulatedNode>| {
        (0..n).fold((0u64, 0u64), |(h, f), i| {
            let s = c.sim.node(i).node.stats();
            (
                h + s.transport.connections_dialled,
                f + s.membership.probes_failed,
            )
        })
    };
    let (h0, f0) = totals(&c);
    let s0 = crate::det_crypto::signatures();
    eprintln!(
        "N={n}: formed; measuring {} simulated s (process {})",
        window.as_secs(),
        std::process::id()
    );
    let wall = std::time::Instant::now();
    c.run_for(window);
    let took = wall.elapsed();
    let (h1, f1) = totals(&c);
    // A full handshake makes two signatures (one per certificate); a resumed one none.
    let full = (crate::det_crypto::signatures() - s0) as f64 / 2.0;
    let connections: usize = (0..n).map(|i| c.sim.node(i).node.connection_count()).sum();
    let heap = crate::alloc::live_bytes().wrapping_sub(heap_before);
    SteadyCost {
        n,
        cpu_us_per_node_s: took.as_secs_f64() * 1e6 / n as f64 / window.as_secs_f64(),
        handshakes_per_node_min: 2.0 * (h1 - h0) as f64 / n as f64 / (window.as_secs_f64() / 60.0),
        resumed: if h1 > h0 {
            (1.0 - full / (h1 - h0) as f64).clamp(0.0, 1.0)
        } else {
            0.0
        },
        connections_per_node: connections as f64 / n as f64,
        heap_per_node: heap as f64 / n as f64,
        probes_failed: f1 - f0,
        converged: c.converged(),
    }
}
