//! Limits: exceeding each one yields a clear error or rejection while the node keeps serving
//! everyone else. (Other limits are tested where they live: accept backlog and message size in
//! flows.rs, datagram queue while handshaking in grinta-proto's node tests, members, endpoints per
//! node and name length in the membership and registry unit tests.)

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use grinta_proto::flow::{FlowError, FlowEvent, FlowId, RejectReason};
use grinta_proto::node::Node;
use grinta_proto::registry::{EndpointKind, RegistryError};
use grinta_proto::tls::dev::DevCa;
use grinta_tests::engine::NetConfig;
use grinta_tests::membership_sim::{Cluster, node_addr};
use grinta_tests::node_sim::{FlowApp, SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};

/// Accepts everything on every endpoint and records opened/failed dials.
#[derive(Default)]
struct Log {
    accepted: Vec<FlowId>,
    opened: Vec<FlowId>,
    failed: Vec<FlowError>,
}

struct AcceptAll(Rc<RefCell<Log>>);

impl FlowApp for AcceptAll {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        let mut log = self.0.borrow_mut();
        match event {
            FlowEvent::Incoming { endpoint, .. } => {
                while let Some(f) = node.accept(now, endpoint) {
                    log.accepted.push(f);
                }
            }
            FlowEvent::Opened { flow, .. } => log.opened.push(*flow),
            FlowEvent::DialFailed { error, .. } => log.failed.push(error.clone()),
            _ => {}
        }
    }
}

fn app(c: &mut Cluster<SimulatedNode>, i: usize) -> Rc<RefCell<Log>> {
    let log = Rc::new(RefCell::new(Log::default()));
    c.sim.node_mut(i).app = Some(Box::new(AcceptAll(log.clone())));
    log
}

#[test]
fn connections_beyond_the_limit_are_refused_when_none_is_idle_and_the_others_still_served() {
    let (seed, _g) = seed(1);
    let ca = DevCa::from_seed(seed).unwrap();
    let mut c = Cluster::nodes_with(
        seed,
        lan(),
        node_membership_config(),
        certificates(&ca, 3),
        |cfg| {
            if cfg.name == "node-0" {
                cfg.transport.max_connections = 1;
            }
        },
    );
    let served = app(&mut c, 0);
    let client = app(&mut c, 1);
    c.sim
        .with_node(1, |n, now| n.node.join(now, &[node_addr(0)]));
    c.run_for(Duration::from_secs(2));
    // Node 1 holds a flow to node 0: its connection is not idle, so nothing can be evicted.
    c.sim
        .with_node(0, |n, now| {
            n.node
                .register_endpoint(now, "svc", EndpointKind::Exclusive)
        })
        .unwrap();
    c.run_for(Duration::from_secs(2));
    c.sim
        .with_node(1, |n, now| n.node.dial(now, "svc"))
        .unwrap();
    c.run_for(Duration::from_secs(2));
    assert_eq!(client.borrow().opened.len(), 1);
    c.sim
        .with_node(2, |n, now| n.node.join(now, &[node_addr(0)]));
    c.run_for(Duration::from_secs(5));
    let stats = c.sim.node(0).node.stats().transport;
    assert!(
        stats.connections_refused > 0 && stats.connections_evicted == 0,
        "the third node was refused: {stats:?}"
    );
    assert_eq!(c.sim.node(0).node.connection_count(), 1);
    assert!(
        c.sim.node(2).node.membership().member("node-0").is_none(),
        "node 2 never got in"
    );
    // Node 0 keeps serving node 1.
    c.sim
        .with_node(1, |n, now| n.node.dial(now, "svc"))
        .unwrap();
    c.run_for(Duration::from_secs(2));
    assert_eq!(client.borrow().opened.len(), 2);
    assert_eq!(served.borrow().accepted.len(), 2);
}

#[test]
fn flows_per_peer_beyond_the_limit_are_rejected_and_other_peers_still_served() {
    let (seed, _g) = seed(2);
    let ca = DevCa::from_seed(seed).unwrap();
    let mut c = Cluster::nodes_with(
        seed,
        lan(),
        node_membership_config(),
        certificates(&ca, 3),
        |cfg| {
            if cfg.name == "node-0" {
                cfg.flows.max_flows_per_peer = 3;
            }
        },
    );
    c.form(Duration::from_millis(200));
    let served = app(&mut c, 0);
    let greedy = app(&mut c, 1);
    let polite = app(&mut c, 2);
    c.sim
        .with_node(0, |n, now| {
            n.node
                .register_endpoint(now, "svc", EndpointKind::Exclusive)
        })
        .unwrap();
    c.run_for(Duration::from_secs(2));
    for _ in 0..5 {
        c.sim
            .with_node(1, |n, now| n.node.dial(now, "svc"))
            .unwrap();
    }
    c.run_for(Duration::from_secs(2));
    assert_eq!(greedy.borrow().opened.len(), 3);
    assert_eq!(greedy.borrow().failed.len(), 2);
    assert!(greedy.borrow().failed.iter().all(|e| matches!(
        e,
        FlowError::Rejected {
            reason: RejectReason::LimitExceeded,
            ..
        }
    )));
    c.sim
        .with_node(2, |n, now| n.node.dial(now, "svc"))
        .unwrap();
    c.run_for(Duration::from_secs(2));
    assert_eq!(
        polite.borrow().opened.len(),
        1,
        "another peer is still served"
    );
    assert_eq!(served.borrow().accepted.len(), 4);
}

#[test]
fn pending_dials_beyond_the_limit_fail_at_once() {
    let (seed, _g) = seed(3);
    let ca = DevCa::from_seed(seed).unwrap();
    let mut c = Cluster::nodes_with(
        seed,
        lan(),
        node_membership_config(),
        certificates(&ca, 2),
        |cfg| {
            cfg.flows.max_pending_dials = 2;
        },
    );
    c.form(Duration::from_millis(100));
    let _served = app(&mut c, 1);
    let dialer = app(&mut c, 0);
    c.sim
        .with_node(1, |n, now| {
            n.node
                .register_endpoint(now, "svc", EndpointKind::Exclusive)
        })
        .unwrap();
    c.run_for(Duration::from_secs(2));
    let results: Vec<_> = (0..3)
        .map(|_| c.sim.with_node(0, |n, now| n.node.dial(now, "svc")))
        .collect();
    assert!(results[0].is_ok() && results[1].is_ok());
    assert_eq!(
        results[2],
        Err(FlowError::LimitReached {
            what: "max_pending_dials",
            limit: 2
        })
    );
    c.run_for(Duration::from_secs(1));
    assert_eq!(dialer.borrow().opened.len(), 2);
    // Once answered, dials are possible again.
    assert!(c.sim.with_node(0, |n, now| n.node.dial(now, "svc")).is_ok());
}

#[test]
fn endpoints_per_node_and_name_length_are_typed_errors() {
    let (seed, _g) = seed(4);
    let ca = DevCa::from_seed(seed).unwrap();
    let mut c = Cluster::nodes_with(
        seed,
        lan(),
        node_membership_config(),
        certificates(&ca, 2),
        |cfg| {
            cfg.registry.max_local_endpoints = 2;
        },
    );
    c.form(Duration::from_millis(100));
    let served = app(&mut c, 0);
    let client = app(&mut c, 1);
    let reg = |c: &mut Cluster<SimulatedNode>, name: &str| {
        c.sim.with_node(0, |n, now| {
            n.node.register_endpoint(now, name, EndpointKind::Exclusive)
        })
    };
    reg(&mut c, "a").unwrap();
    reg(&mut c, "b").unwrap();
    assert_eq!(
        reg(&mut c, "c"),
        Err(RegistryError::LimitReached {
            what: "max_local_endpoints",
            limit: 2
        })
    );
    let long = "x".repeat(129);
    assert!(matches!(
        reg(&mut c, &long),
        Err(RegistryError::InvalidName { .. })
    ));
    c.run_for(Duration::from_secs(2));
    c.sim.with_node(1, |n, now| n.node.dial(now, "b")).unwrap();
    c.run_for(Duration::from_secs(1));
    assert_eq!(
        client.borrow().opened.len(),
        1,
        "existing endpoints keep serving"
    );
    assert_eq!(served.borrow().accepted.len(), 1);
}

/// With fewer connections allowed than members, a node closes its least recently used idle
/// connection to make room: open connections stay within the budget (those closed drain apart
/// from it), membership stays whole, no probe fails and nobody is declared dead. (Passes for
/// seeds 1-30: certificates come from the seed, so a seed replays exactly.) (Here rather than beside the scale tests,
/// which count TLS signatures process-wide.)
#[test]
fn a_connection_budget_below_the_cluster_size_evicts_idle_connections() {
    let (seed, _g) = seed(34);
    let n = 12;
    let budget = 4;
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c: Cluster<SimulatedNode> = Cluster::nodes_with(
        seed,
        NetConfig::default(),
        node_membership_config(),
        certificates(&ca, n),
        move |config| config.transport.max_connections = budget,
    );
    c.form(Duration::from_millis(50 * n as u64));
    let (mut most, mut most_closing, mut total_closing) = (0, 0, 0);
    for _ in 0..1200 {
        c.run_for(Duration::from_millis(100));
        for i in 0..n {
            let node = &c.sim.node(i).node;
            let closing = node.closing_connection_count();
            most = most.max(node.connection_count() - closing);
            most_closing = most_closing.max(closing);
            total_closing += closing;
        }
    }
    let evicted: u64 = (0..n)
        .map(|i| c.sim.node(i).node.stats().transport.connections_evicted)
        .sum();
    let failed: u64 = (0..n)
        .map(|i| c.sim.node(i).node.stats().membership.probes_failed)
        .sum();
    let mean_closing = total_closing as f64 / (1200.0 * n as f64);
    println!(
        "{evicted} evictions, at most {most} open and {most_closing} closing connections on a \
         node, {mean_closing:.2} closing on average, {failed} failed probes"
    );
    assert!(c.converged(), "seed {seed}");
    assert!(
        evicted > 100,
        "seed {seed}: the budget was used ({evicted})"
    );
    assert!(most <= budget, "seed {seed}: {most} open connections");
    // Closed connections drain within a few round trips: about one eviction per node per second
    // leaves a fraction of a closing connection on average, a handful in a burst.
    assert!(
        mean_closing < 1.0 && most_closing <= 4 * budget,
        "seed {seed}: {most_closing} closing connections, {mean_closing:.2} on average"
    );
    // Eviction churns connections, never membership: no probe is lost on a lossless network.
    assert_eq!(failed, 0, "seed {seed}: failed probes");
    for i in 0..n {
        let dead = &c.sim.node(i).seen.dead_events;
        assert!(dead.is_empty(), "seed {seed}: node {i} saw {dead:?}");
    }
}
