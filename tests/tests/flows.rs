//! Endpoint directory and flows over real nodes in the whole-node simulator. `SEED=<n>` replays.

use std::time::Duration;

use grinta_proto::registry::{EndpointKind, RegistryEvent};
use grinta_proto::tls::dev::DevCa;
use grinta_proto::transport::{DEFAULT_MAX_UDP_PAYLOAD, JUMBO_MAX_UDP_PAYLOAD};
use grinta_tests::engine::NetConfig;
use grinta_tests::membership_sim::{Cluster, node_addr, node_name, quantile};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};
use rand::Rng;

fn formed(seed: u64, n: usize) -> Cluster<SimulatedNode> {
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n));
    c.form(Duration::from_millis(50 * n as u64));
    c
}

fn register(c: &mut Cluster<SimulatedNode>, i: usize, name: &str, kind: EndpointKind) {
    c.sim
        .with_node(i, |n, now| n.node.register_endpoint(now, name, kind))
        .expect("registration");
}

fn owners(c: &Cluster<SimulatedNode>, i: usize, name: &str) -> Vec<String> {
    c.sim
        .node(i)
        .node
        .registry()
        .resolve(name)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_name_registered_on_one_node_of_20_resolves_everywhere_within_3s() {
    let (seed, _g) = seed(1);
    let n = 20;
    let mut delays = Vec::new();
    for s in seed..seed + 5 {
        let mut c = formed(s, n);
        c.run_for(Duration::from_secs(2));
        let owner = c.sim.rng().random_range(0..n);
        let t0 = c.sim.now();
        register(&mut c, owner, "billing", EndpointKind::Exclusive);
        let mut seen = vec![None; n];
        c.run_until(Duration::from_secs(30), |c| {
            (0..n).all(|i| !owners(c, i, "billing").is_empty())
        });
        // Replay the arrival times from the directory events.
        for (i, slot) in seen.iter_mut().enumerate() {
            *slot = c
                .sim
                .node(i)
                .registry_events
                .iter()
                .find(|(_, e)| {
                    *e == RegistryEvent::NameAdded {
                        name: "billing".into(),
                    }
                })
                .map(|(t, _)| *t - t0);
        }
        assert!(seen.iter().all(Option::is_some), "seed {s}: {seen:?}");
        delays.extend(seen.into_iter().flatten());
        for i in 0..n {
            assert_eq!(owners(&c, i, "billing"), vec![node_name(owner)], "seed {s}");
        }
    }
    let p99 = quantile(&delays, 0.99).unwrap();
    println!(
        "name visible on all 20 nodes: p99 {p99:?}, max {:?} ({} samples)",
        delays.iter().max().unwrap(),
        delays.len()
    );
    assert!(p99 <= Duration::from_secs(3), "p99 {p99:?} (seed {seed})");
}

#[test]
fn a_joiner_has_the_full_directory_when_its_join_completes() {
    let (seed, _g) = seed(2);
    let n = 8;
    let ca = DevCa::from_seed(seed).unwrap();
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n));
    // Nodes 0..7 form; node 7 stays out until the directory is populated.
    for i in 1..n - 1 {
        c.sim
            .with_node(i, |node, now| node.node.join(now, &[node_addr(0)]));
    }
    c.run_for(Duration::from_secs(5));
    let mut expected = Vec::new();
    for i in 0..n - 1 {
        let name = format!("svc-{i}");
        register(&mut c, i, &name, EndpointKind::Exclusive);
        expected.push(name);
    }
    register(&mut c, 3, "workers", EndpointKind::Group);
    register(&mut c, 5, "workers", EndpointKind::Group);
    expected.push("workers".into());
    expected.sort();
    c.run_for(Duration::from_secs(3));
    let joiner = n - 1;
    c.sim
        .with_node(joiner, |node, now| node.node.join(now, &[node_addr(2)]));
    c.run_until(Duration::from_secs(10), |c| {
        c.sim.node(joiner).names_at_join.is_some()
    });
    let at_join = c
        .sim
        .node(joiner)
        .names_at_join
        .clone()
        .expect("join completed");
    assert_eq!(at_join, expected, "seed {seed}");
    assert_eq!(
        owners(&c, joiner, "workers"),
        vec![node_name(3), node_name(5)]
    );
}

#[test]
fn an_owner_crash_removes_its_names_within_the_detection_bound() {
    let (seed, _g) = seed(3);
    let n = 10;
    let mut c = formed(seed, n);
    register(&mut c, 4, "solo", EndpointKind::Exclusive);
    register(&mut c, 4, "workers", EndpointKind::Group);
    register(&mut c, 7, "workers", EndpointKind::Group);
    c.run_for(Duration::from_secs(3));
    for i in 0..n {
        assert_eq!(owners(&c, i, "workers"), vec![node_name(4), node_name(7)]);
    }
    c.kill(4);
    let t0 = c.sim.now();
    let gone = c.run_until(Duration::from_secs(30), |c| {
        (0..n)
            .filter(|&i| i != 4)
            .all(|i| owners(c, i, "solo").is_empty())
    });
    println!("crashed owner's names gone everywhere after {gone:?}");
    let gone = gone.expect("names removed");
    assert!(gone <= Duration::from_secs(11), "{gone:?} (seed {seed})");
    for i in (0..n).filter(|&i| i != 4) {
        assert_eq!(
            owners(&c, i, "workers"),
            vec![node_name(7)],
            "the group keeps its live owner"
        );
        let removed = c.sim.node(i).registry_events.iter().any(|(t, e)| {
            *t >= t0
                && *e
                    == RegistryEvent::NameRemoved {
                        name: "solo".into(),
                    }
        });
        assert!(removed, "node {i} reported the name removed");
    }
}

#[test]
fn exclusive_claims_on_both_sides_of_a_partition_resolve_to_one_owner() {
    let (seed, _g) = seed(4);
    let n = 10;
    let mut c = formed(seed, n);
    c.run_for(Duration::from_secs(2));
    c.sim.partition(&[(0..5).collect(), (5..10).collect()]);
    c.run_for(Duration::from_secs(40));
    // Each side claims the name while it cannot see the other.
    register(&mut c, 1, "leader", EndpointKind::Exclusive);
    c.run_for(Duration::from_secs(1));
    register(&mut c, 8, "leader", EndpointKind::Exclusive);
    c.run_for(Duration::from_secs(5));
    assert_eq!(owners(&c, 0, "leader"), vec![node_name(1)]);
    assert_eq!(owners(&c, 9, "leader"), vec![node_name(8)]);
    c.sim.heal();
    let merged = c.run_until(Duration::from_secs(120), |c| {
        c.converged() && {
            let first = owners(c, 0, "leader");
            first.len() == 1 && (0..n).all(|i| owners(c, i, "leader") == first)
        }
    });
    println!("conflict resolved everywhere after {merged:?}");
    assert!(merged.is_some(), "seed {seed}");
    let winner = owners(&c, 0, "leader")[0].clone();
    let loser = if winner == node_name(1) { 8 } else { 1 };
    let told = c.sim.node(loser).registry_events.iter().any(|(_, e)| {
        *e == RegistryEvent::NameConflict {
            name: "leader".into(),
            winner: winner.clone(),
        }
    });
    assert!(told, "the loser was told (seed {seed})");
    assert!(!c.sim.node(loser).node.registry().is_local("leader"));
    // What an endpoint monitor reports for the losing claim, there.
    assert_eq!(
        c.sim
            .node(loser)
            .node
            .owner_down_reason("leader", &node_name(loser)),
        Some(grinta_proto::node::DownReason::Conflict { winner }),
    );
}

// ----- flows -----------------------------------------------------------------------------------

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use grinta_proto::flow::{FlowError, FlowEvent, FlowId, Recv, ResetCode};
use grinta_proto::node::Node;
use grinta_tests::node_sim::FlowApp;

/// What a sink received.
#[derive(Default, Debug)]
struct SinkLog {
    messages: HashMap<FlowId, Vec<Bytes>>,
    peers: HashMap<FlowId, String>,
    finished: Vec<FlowId>,
    closed: Vec<(FlowId, FlowError)>,
}

/// Accepts every flow of its endpoints and reads everything.
struct Sink {
    log: Rc<RefCell<SinkLog>>,
    /// Accept flows (false: let the backlog fill).
    accept: bool,
}

impl Sink {
    fn drain(&self, node: &mut Node, now: Instant, flow: FlowId) {
        loop {
            match node.recv(now, flow) {
                Ok(Recv::Message(m)) => self
                    .log
                    .borrow_mut()
                    .messages
                    .entry(flow)
                    .or_default()
                    .push(m),
                Ok(Recv::Finished) => {
                    let mut log = self.log.borrow_mut();
                    if !log.finished.contains(&flow) {
                        log.finished.push(flow);
                        drop(log);
                        // Half-close done on the other side: close ours too.
                        let _ = node.finish(flow);
                    }
                    return;
                }
                Ok(Recv::Pending) => return,
                Err(e) => {
                    self.log.borrow_mut().closed.push((flow, e));
                    return;
                }
            }
        }
    }
}

impl FlowApp for Sink {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Incoming { endpoint, .. } if self.accept => {
                while let Some(flow) = node.accept(now, endpoint) {
                    self.log.borrow_mut().messages.entry(flow).or_default();
                    self.drain(node, now, flow);
                }
            }
            FlowEvent::Incoming { flow, peer, .. } => {
                self.log.borrow_mut().peers.insert(*flow, peer.clone());
            }
            FlowEvent::Readable { flow } if self.log.borrow().messages.contains_key(flow) => {
                self.drain(node, now, *flow)
            }
            FlowEvent::Closed { flow, error } => {
                self.log.borrow_mut().closed.push((*flow, error.clone()))
            }
            _ => {}
        }
    }
}

/// What a sender saw.
#[derive(Default, Debug)]
struct SenderLog {
    /// Messages still to send, per flow (filled by the test right after dialling).
    pending: HashMap<FlowId, VecDeque<Bytes>>,
    /// Finish each flow once its messages are queued.
    finish: bool,
    opened: Vec<FlowId>,
    dial_failed: Vec<(FlowId, FlowError)>,
    closed: Vec<(Instant, FlowId, FlowError)>,
    finished: Vec<FlowId>,
    would_block: u64,
}

struct Sender {
    log: Rc<RefCell<SenderLog>>,
}

impl Sender {
    fn pump(&self, node: &mut Node, now: Instant, flow: FlowId) {
        loop {
            let next = self
                .log
                .borrow_mut()
                .pending
                .get_mut(&flow)
                .and_then(|q| q.front().cloned());
            let Some(message) = next else {
                let mut log = self.log.borrow_mut();
                if log.finish && !log.finished.contains(&flow) && log.opened.contains(&flow) {
                    log.finished.push(flow);
                    drop(log);
                    let _ = node.finish(flow);
                }
                return;
            };
            match node.send(flow, message) {
                Ok(()) => {
                    self.log
                        .borrow_mut()
                        .pending
                        .get_mut(&flow)
                        .map(|q| q.pop_front());
                }
                Err(FlowError::WouldBlock) => {
                    self.log.borrow_mut().would_block += 1;
                    return;
                }
                Err(e) => {
                    self.log.borrow_mut().closed.push((now, flow, e));
                    return;
                }
            }
        }
    }
}

impl FlowApp for Sender {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Opened { flow, .. } => {
                self.log.borrow_mut().opened.push(*flow);
                self.pump(node, now, *flow);
            }
            FlowEvent::Writable { flow } => self.pump(node, now, *flow),
            FlowEvent::DialFailed { flow, error, .. } => self
                .log
                .borrow_mut()
                .dial_failed
                .push((*flow, error.clone())),
            FlowEvent::Closed { flow, error } => {
                self.log
                    .borrow_mut()
                    .closed
                    .push((now, *flow, error.clone()))
            }
            _ => {}
        }
    }
}

/// Makes node `i` a sink of endpoint `name` and returns its log.
fn sink(
    c: &mut Cluster<SimulatedNode>,
    i: usize,
    name: &str,
    accept: bool,
) -> Rc<RefCell<SinkLog>> {
    register(c, i, name, EndpointKind::Exclusive);
    let log = Rc::new(RefCell::new(SinkLog::default()));
    c.sim.node_mut(i).app = Some(Box::new(Sink {
        log: log.clone(),
        accept,
    }));
    log
}

/// Makes node `i` a sender and returns its log.
fn sender(c: &mut Cluster<SimulatedNode>, i: usize, finish: bool) -> Rc<RefCell<SenderLog>> {
    let log = Rc::new(RefCell::new(SenderLog {
        finish,
        ..SenderLog::default()
    }));
    c.sim.node_mut(i).app = Some(Box::new(Sender { log: log.clone() }));
    log
}

/// Dials `endpoint` from node `i` and queues `messages` on the new flow.
fn dial_with(
    c: &mut Cluster<SimulatedNode>,
    i: usize,
    log: &Rc<RefCell<SenderLog>>,
    endpoint: &str,
    messages: Vec<Bytes>,
) -> FlowId {
    let flow = c
        .sim
        .with_node(i, |n, now| n.node.dial(now, endpoint))
        .expect("dial starts");
    log.borrow_mut().pending.insert(flow, messages.into());
    flow
}

fn random_messages(c: &mut Cluster<SimulatedNode>, total: usize, max: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut sum = 0;
    while sum < total {
        let len = c.sim.rng().random_range(1..=max);
        let bytes: Vec<u8> = (0..len).map(|_| c.sim.rng().random()).collect();
        sum += len;
        out.push(Bytes::from(bytes));
    }
    out
}

#[test]
fn ten_megabytes_arrive_exact_and_in_order_over_a_lossy_reordering_link() {
    let (seed, _g) = seed(10);
    let mut c = formed(seed, 3);
    let received = sink(&mut c, 2, "store", true);
    let sent = sender(&mut c, 0, true);
    c.run_for(Duration::from_secs(2));
    // 5% loss and up to 4 ms of jitter (reordering) on the path between sender and receiver.
    let lossy = NetConfig {
        latency: Duration::from_micros(500),
        jitter: Duration::from_millis(4),
        loss: 0.05,
        duplicate: 0.0,
        ..NetConfig::default()
    };
    c.sim.set_link(0, 2, lossy);
    c.sim.set_link(2, 0, lossy);
    let messages = random_messages(&mut c, 10 << 20, 1 << 20);
    let total: usize = messages.iter().map(Bytes::len).sum();
    let flow = dial_with(&mut c, 0, &sent, "store", messages.clone());
    let took = c.run_until(Duration::from_secs(300), |_| {
        received.borrow().finished.len() == 1
    });
    println!(
        "{} messages, {total} bytes over 5% loss: delivered in {took:?} of virtual time (flow {flow})",
        messages.len()
    );
    assert!(took.is_some(), "the flow finished (seed {seed})");
    let log = received.borrow();
    let got = log.messages.values().next().expect("one flow");
    assert_eq!(got.len(), messages.len(), "seed {seed}");
    assert!(got == &messages, "byte-exact and in order (seed {seed})");
    assert!(log.closed.is_empty(), "{:?}", log.closed);
}

/// Sends 4 MiB from node 0 to node 1 on a network that carries datagrams up to `max_datagram`
/// bytes, with nodes whose path MTU discovery looks for up to `max_udp_payload`; returns
/// (datagrams node 0 sent for it, datagrams the network refused as too large since the
/// simulation started).
fn bulk_over(seed: u64, max_datagram: usize, max_udp_payload: u16) -> (u64, u64) {
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let net = NetConfig {
        max_datagram,
        ..lan()
    };
    let mut c = Cluster::nodes_with(
        seed,
        net,
        node_membership_config(),
        certificates(&ca, 2),
        move |config| config.transport.max_udp_payload = max_udp_payload,
    );
    c.form(Duration::from_millis(100));
    let received = sink(&mut c, 1, "store", true);
    let sent = sender(&mut c, 0, true);
    // Path MTU discovery runs once the connection is up.
    c.run_for(Duration::from_secs(5));
    let messages: Vec<Bytes> = (0..64u8).map(|i| Bytes::from(vec![i; 64 << 10])).collect();
    let before = c.sim.node_stats(0).datagrams_sent;
    dial_with(&mut c, 0, &sent, "store", messages.clone());
    c.run_until(Duration::from_secs(60), |_| {
        received.borrow().finished.len() == 1
    })
    .expect("the flow finished");
    let log = received.borrow();
    assert!(
        log.messages.values().next() == Some(&messages),
        "byte-exact and in order (seed {seed}, max datagram {max_datagram})"
    );
    (
        c.sim.node_stats(0).datagrams_sent - before,
        c.sim.stats().datagrams_dropped_too_large,
    )
}

#[test]
fn flows_fill_the_largest_packets_the_path_carries() {
    let (seed, _g) = seed(23);
    // The default bound on Ethernet: discovery never looks beyond the path.
    let (default, refused_default) = bulk_over(seed, 1472, DEFAULT_MAX_UDP_PAYLOAD);
    // The jumbo bound on Ethernet: probes beyond 1472 bytes are refused, and the transfer goes
    // on in packets that fit. On jumbo frames the same bytes take far fewer packets.
    let (ethernet, refused) = bulk_over(seed, 1472, JUMBO_MAX_UDP_PAYLOAD);
    let (jumbo, refused_jumbo) = bulk_over(seed, 9000, JUMBO_MAX_UDP_PAYLOAD);
    println!(
        "4 MiB: {default} datagrams at the default bound, {ethernet} with the jumbo bound on Ethernet ({refused} probes refused), {jumbo} on jumbo frames ({refused_jumbo} refused)"
    );
    assert_eq!(refused_default, 0, "the default bound fits Ethernet");
    assert!(refused > 0, "discovery looked beyond 1472 bytes");
    assert!(
        ethernet <= default + default / 50,
        "lost probes cost the flow no packets: {ethernet} against {default}"
    );
    assert_eq!(refused_jumbo, 0, "8952 bytes fit a 9000-byte path");
    assert!(
        jumbo * 4 < ethernet,
        "jumbo frames carry the flow in under a quarter of the packets: {jumbo} against {ethernet}"
    );
}

#[test]
fn finish_delivers_everything_before_the_end() {
    let (seed, _g) = seed(11);
    let mut c = formed(seed, 3);
    let received = sink(&mut c, 1, "log", true);
    let sent = sender(&mut c, 0, true);
    c.run_for(Duration::from_secs(2));
    let messages: Vec<Bytes> = (0..2000u32)
        .map(|i| Bytes::from(i.to_be_bytes().to_vec()))
        .collect();
    dial_with(&mut c, 0, &sent, "log", messages.clone());
    c.run_until(Duration::from_secs(30), |_| {
        received.borrow().finished.len() == 1
    })
    .expect("finished");
    let log = received.borrow();
    assert_eq!(
        log.messages.values().next().unwrap(),
        &messages,
        "all 2000, in order, before the end"
    );
    assert!(sent.borrow().closed.is_empty());
}

#[test]
fn reset_is_seen_on_both_sides() {
    let (seed, _g) = seed(12);
    let mut c = formed(seed, 3);
    let received = sink(&mut c, 1, "svc", true);
    let sent = sender(&mut c, 0, false);
    c.run_for(Duration::from_secs(2));
    let flow = dial_with(&mut c, 0, &sent, "svc", vec![Bytes::from_static(b"hello")]);
    c.run_until(Duration::from_secs(5), |_| {
        received.borrow().messages.values().any(|m| !m.is_empty())
    })
    .expect("first message arrived");
    c.sim.with_node(0, |n, _| n.node.reset(flow, 42)).unwrap();
    c.run_until(Duration::from_secs(5), |_| {
        !received.borrow().closed.is_empty()
    })
    .expect("the receiver saw the reset");
    assert_eq!(
        received.borrow().closed[0].1,
        FlowError::Reset {
            code: ResetCode::Application(42)
        }
    );
    let after = c
        .sim
        .with_node(0, |n, _| n.node.send(flow, Bytes::from_static(b"late")));
    assert!(matches!(after, Err(FlowError::Reset { .. })), "{after:?}");

    // And the other way: the acceptor resets, the dialler sees it.
    let flow2 = dial_with(&mut c, 0, &sent, "svc", vec![Bytes::from_static(b"x")]);
    c.run_until(Duration::from_secs(5), |_| {
        received.borrow().messages.len() >= 2
    })
    .expect("second flow accepted");
    let accepted = *received.borrow().messages.keys().max().unwrap();
    c.sim
        .with_node(1, |n, _| n.node.reset(accepted, 7))
        .unwrap();
    c.run_until(Duration::from_secs(5), |_| {
        sent.borrow().closed.iter().any(|(_, f, _)| *f == flow2)
    })
    .expect("the dialler saw the reset");
    let err = sent
        .borrow()
        .closed
        .iter()
        .find(|(_, f, _)| *f == flow2)
        .unwrap()
        .2
        .clone();
    assert_eq!(
        err,
        FlowError::Reset {
            code: ResetCode::Application(7)
        }
    );
}

#[test]
fn an_oversized_message_resets_only_its_flow() {
    let (seed, _g) = seed(13);
    let mut c = formed(seed, 3);
    let received = sink(&mut c, 1, "svc", true);
    let sent = sender(&mut c, 0, false);
    c.run_for(Duration::from_secs(2));
    let limit = grinta_proto::flow::FlowLimits::default().max_message_size;
    let good = dial_with(&mut c, 0, &sent, "svc", vec![Bytes::from_static(b"before")]);
    let bad = dial_with(&mut c, 0, &sent, "svc", vec![]);
    c.run_until(Duration::from_secs(5), |_| sent.borrow().opened.len() == 2)
        .expect("both open");
    // The API refuses it with a typed error...
    let refused = c.sim.with_node(0, |n, _| {
        n.node.send(bad, Bytes::from(vec![0u8; limit + 1]))
    });
    assert_eq!(
        refused,
        Err(FlowError::MessageTooLarge {
            size: limit as u64 + 1,
            limit: limit as u64
        })
    );
    // ...and a peer that ignores the limit gets its flow reset by the receiver.
    c.sim
        .with_node(0, |n, _| {
            n.node
                .send_unchecked(bad, Bytes::from(vec![0u8; limit + 1]))
        })
        .unwrap();
    c.run_until(Duration::from_secs(10), |_| {
        sent.borrow().closed.iter().any(|(_, f, _)| *f == bad)
            && !received.borrow().closed.is_empty()
    })
    .expect("both sides saw the reset");
    let sender_err = sent
        .borrow()
        .closed
        .iter()
        .find(|(_, f, _)| *f == bad)
        .unwrap()
        .2
        .clone();
    assert!(
        matches!(sender_err, FlowError::MessageTooLarge { .. }),
        "{sender_err}"
    );
    let receiver_err = received.borrow().closed[0].1.clone();
    assert!(
        matches!(receiver_err, FlowError::MessageTooLarge { .. }),
        "{receiver_err}"
    );
    // The other flow on the same connection is untouched.
    sent.borrow_mut()
        .pending
        .insert(good, vec![Bytes::from_static(b"after")].into());
    c.sim
        .with_node(0, |n, _| {
            let _ = n.node.send(good, Bytes::from_static(b"after"));
            n.node.finish(good)
        })
        .unwrap();
    c.run_until(Duration::from_secs(5), |_| {
        !received.borrow().finished.is_empty()
    })
    .expect("good flow finished");
    let log = received.borrow();
    let msgs = log.messages.get(&log.finished[0]).unwrap();
    assert_eq!(
        msgs,
        &vec![Bytes::from_static(b"before"), Bytes::from_static(b"after")]
    );
    assert!(!sent.borrow().closed.iter().any(|(_, f, _)| *f == good));
}

#[test]
fn a_flow_whose_peer_is_killed_fails_within_the_detection_bound() {
    let (seed, _g) = seed(14);
    let mut c = formed(seed, 5);
    let _received = sink(&mut c, 3, "svc", true);
    let sent = sender(&mut c, 0, false);
    c.run_for(Duration::from_secs(2));
    let flow = dial_with(&mut c, 0, &sent, "svc", vec![Bytes::from_static(b"hi")]);
    c.run_until(Duration::from_secs(5), |_| {
        sent.borrow().opened.contains(&flow)
    })
    .expect("open");
    c.kill(3);
    let t0 = c.sim.now();
    let failed = c.run_until(Duration::from_secs(60), |_| {
        !sent.borrow().closed.is_empty()
    });
    println!("flow to a killed peer failed after {failed:?}");
    let failed = failed.expect("the flow failed");
    assert!(
        failed <= Duration::from_secs(11),
        "{failed:?} (seed {seed})"
    );
    let (at, f, err) = sent.borrow().closed[0].clone();
    assert_eq!(f, flow);
    assert!(at >= t0);
    assert!(
        matches!(
            err,
            FlowError::PeerGone { .. } | FlowError::ConnectionLost { .. }
        ),
        "{err}"
    );
    // A new dial fails cleanly: the name is gone with its owner (the group test below covers
    // dials that pick another owner).
    let again = c.sim.with_node(0, |n, now| n.node.dial(now, "svc"));
    assert_eq!(again, Err(FlowError::NoSuchEndpoint { name: "svc".into() }));
}

#[test]
fn dial_errors_are_clear() {
    let (seed, _g) = seed(15);
    let ca = DevCa::from_seed(seed).unwrap();
    let mut c = Cluster::nodes_with(
        seed,
        lan(),
        node_membership_config(),
        certificates(&ca, 4),
        |cfg| {
            cfg.flows.dial_timeout = Duration::from_secs(2);
            cfg.flows.accept_backlog = 64;
        },
    );
    c.form(Duration::from_millis(200));
    let never = sink(&mut c, 1, "busy", false);
    let sent = sender(&mut c, 0, false);
    c.run_for(Duration::from_secs(2));
    // Unknown name.
    let unknown = c.sim.with_node(0, |n, now| n.node.dial(now, "nobody"));
    assert_eq!(
        unknown,
        Err(FlowError::NoSuchEndpoint {
            name: "nobody".into()
        })
    );
    // A full backlog: the sink never accepts.
    let backlog = 64;
    for _ in 0..backlog + 5 {
        dial_with(&mut c, 0, &sent, "busy", vec![]);
    }
    c.run_until(Duration::from_secs(5), |_| {
        sent.borrow().dial_failed.len() >= 5
    })
    .expect("rejections");
    assert_eq!(sent.borrow().opened.len(), backlog);
    assert!(sent.borrow().dial_failed.iter().all(|(_, e)| matches!(
        e,
        FlowError::Rejected {
            reason: grinta_proto::flow::RejectReason::BacklogFull,
            ..
        }
    )));
    assert_eq!(never.borrow().peers.len(), backlog);
    assert!(
        never.borrow().peers.values().all(|p| *p == node_name(0)),
        "the acceptor learns the dialler's name"
    );
    // The owner unregistered the name but the dialler does not know yet.
    register(&mut c, 2, "moving", EndpointKind::Exclusive);
    c.run_for(Duration::from_secs(2));
    c.sim
        .with_node(2, |n, now| n.node.unregister_endpoint(now, "moving"))
        .unwrap();
    dial_with(&mut c, 0, &sent, "moving", vec![]);
    c.run_until(Duration::from_secs(5), |_| {
        sent.borrow().dial_failed.len() >= 6
    })
    .expect("rejected");
    assert!(matches!(
        sent.borrow().dial_failed.last().unwrap().1,
        FlowError::Rejected {
            reason: grinta_proto::flow::RejectReason::NoSuchEndpoint,
            ..
        }
    ));
    // An owner that never answers: the dial times out.
    register(&mut c, 3, "silent", EndpointKind::Exclusive);
    c.run_for(Duration::from_secs(2));
    c.sim.partition(&[vec![3]]);
    dial_with(&mut c, 0, &sent, "silent", vec![]);
    let t0 = c.sim.now();
    c.run_until(Duration::from_secs(15), |_| {
        sent.borrow().dial_failed.len() >= 7
    })
    .expect("timed out");
    assert!(matches!(
        sent.borrow().dial_failed.last().unwrap().1,
        FlowError::DialTimeout { .. }
    ));
    assert!(c.sim.now() - t0 <= Duration::from_millis(2100));
}

#[test]
fn a_thousand_concurrent_flows_across_five_nodes_all_complete() {
    let (seed, _g) = seed(16);
    let n = 5;
    let mut c = formed(seed, n);
    // Every node is both a sink (endpoint "sink-i") and a sender.
    type Logs = (Rc<RefCell<SinkLog>>, Rc<RefCell<SenderLog>>);
    let logs: Vec<Logs> = (0..n)
        .map(|i| {
            register(&mut c, i, &format!("sink-{i}"), EndpointKind::Exclusive);
            let sink = Rc::new(RefCell::new(SinkLog::default()));
            let send = Rc::new(RefCell::new(SenderLog {
                finish: true,
                ..SenderLog::default()
            }));
            c.sim.node_mut(i).app = Some(Box::new(Both {
                sink: Sink {
                    log: sink.clone(),
                    accept: true,
                },
                sender: Sender { log: send.clone() },
            }));
            (sink, send)
        })
        .collect();
    // Names registered during formation spread by gossip, or by the next push-pull for a node
    // gossip missed.
    c.run_until(Duration::from_secs(60), |c| {
        (0..n).all(|i| c.sim.node(i).node.registry().names("sink-").len() == n)
    })
    .expect("every name visible everywhere");
    let mut expected = 0usize;
    for k in 0..1000usize {
        let from = k % n;
        let to = (from + 1 + c.sim.rng().random_range(0..n - 1)) % n;
        let messages = vec![
            Bytes::from(format!("{k}-a")),
            Bytes::from(format!("{k}-b")),
            Bytes::from(format!("{k}-c")),
        ];
        dial_with(&mut c, from, &logs[from].1, &format!("sink-{to}"), messages);
        expected += 1;
    }
    let done = c.run_until(Duration::from_secs(120), |_| {
        logs.iter()
            .map(|(s, _)| s.borrow().finished.len())
            .sum::<usize>()
            == expected
    });
    println!("1000 concurrent flows completed after {done:?}");
    assert!(done.is_some(), "seed {seed}");
    for (sink, send) in &logs {
        let s = sink.borrow();
        assert!(s.closed.is_empty(), "{:?}", s.closed.first());
        assert!(s.finished.iter().all(|f| s.messages[f].len() == 3));
        assert!(send.borrow().dial_failed.is_empty());
    }
    for i in 0..n {
        assert_eq!(
            c.sim.node(i).node.flow_count(),
            0,
            "every flow cleaned up on node {i}"
        );
    }
}

/// Sink and sender on one node.
struct Both {
    sink: Sink,
    sender: Sender,
}

impl FlowApp for Both {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        self.sink.on_event(node, now, event);
        self.sender.on_event(node, now, event);
    }
}

#[test]
fn a_group_dial_skips_a_crashed_owner() {
    let (seed, _g) = seed(17);
    let mut c = formed(seed, 5);
    for owner in [2, 3] {
        register(&mut c, owner, "workers", EndpointKind::Group);
        let log = Rc::new(RefCell::new(SinkLog::default()));
        c.sim.node_mut(owner).app = Some(Box::new(Sink { log, accept: true }));
    }
    let sent = sender(&mut c, 0, true);
    c.run_for(Duration::from_secs(2));
    c.kill(2);
    // Right after the crash the dead owner may still be picked; once membership has declared it
    // dead, every dial goes to the survivor.
    let t0 = c.sim.now();
    c.run_until(Duration::from_secs(30), |c| {
        c.detection_times(2, t0).iter().all(Option::is_some)
    })
    .expect("owner declared dead");
    for _ in 0..10 {
        dial_with(
            &mut c,
            0,
            &sent,
            "workers",
            vec![Bytes::from_static(b"job")],
        );
    }
    c.run_until(Duration::from_secs(5), |_| sent.borrow().opened.len() == 10)
        .expect("all opened");
    assert!(sent.borrow().dial_failed.is_empty());
    for (_, e) in c.sim.node(0).flow_events.iter() {
        if let FlowEvent::Opened { peer, .. } = e {
            assert_eq!(peer, &node_name(3));
        }
    }
}

/// Dials of a group with two live owners spread over both, also right after a burst of heavy
/// traffic to one of them; an owner spends time in no dial's choice only while some node
/// suspects it.
#[test]
fn group_dials_spread_over_live_owners_after_heavy_traffic() {
    let (seed, _g) = seed(19);
    let mut c = formed(seed, 3);
    for owner in [1, 2] {
        register(&mut c, owner, "workers", EndpointKind::Group);
        let log = Rc::new(RefCell::new(SinkLog::default()));
        c.sim.node_mut(owner).app = Some(Box::new(Sink { log, accept: true }));
    }
    register(&mut c, 1, "bulk", EndpointKind::Exclusive);
    let sent = sender(&mut c, 0, true);
    c.run_for(Duration::from_secs(2));
    // Heavy traffic to owner 1 first: 8 MB over 20 flows.
    for _ in 0..20 {
        let messages = random_messages(&mut c, 400_000, 60_000);
        dial_with(&mut c, 0, &sent, "bulk", messages);
    }
    c.run_for(Duration::from_secs(5));
    let before = sent.borrow().opened.len();
    for _ in 0..200 {
        dial_with(
            &mut c,
            0,
            &sent,
            "workers",
            vec![Bytes::from_static(b"job")],
        );
        c.run_for(Duration::from_millis(5));
    }
    c.run_until(Duration::from_secs(10), |_| {
        sent.borrow().opened.len() == before + 200
    })
    .expect("all opened");
    let mut per_owner = [0usize; 3];
    let opened: Vec<FlowId> = sent.borrow().opened[before..].to_vec();
    for (_, e) in c.sim.node(0).flow_events.iter() {
        if let FlowEvent::Opened { flow, peer, .. } = e {
            if opened.contains(flow) {
                per_owner[if peer == &node_name(1) { 1 } else { 2 }] += 1;
            }
        }
    }
    let suspicions: usize = (0..3).map(|i| c.sim.node(i).seen.suspects.len()).sum();
    println!("200 group dials: {per_owner:?}, {suspicions} suspicions");
    assert_eq!(suspicions, 0, "seed {seed}");
    // Binomial(200, 1/2): fewer than 60 on one side has probability below 1e-8.
    assert!(
        per_owner[1] >= 60 && per_owner[2] >= 60,
        "{per_owner:?} (seed {seed})"
    );
}

#[test]
fn a_slow_reader_slows_its_writer() {
    let (seed, _g) = seed(18);
    let mut c = formed(seed, 3);
    // The reader accepts but never reads.
    register(&mut c, 1, "slow", EndpointKind::Exclusive);
    let sent = sender(&mut c, 0, true);
    c.run_for(Duration::from_secs(2));
    let messages = random_messages(&mut c, 32 << 20, 64 << 10);
    let flow = dial_with(&mut c, 0, &sent, "slow", messages);
    c.run_until(Duration::from_secs(5), |c| {
        c.sim
            .node(1)
            .flow_events
            .iter()
            .any(|(_, e)| matches!(e, FlowEvent::Incoming { .. }))
    })
    .expect("incoming");
    let accepted = c
        .sim
        .with_node(1, |n, now| n.node.accept(now, "slow"))
        .expect("accepted");
    c.run_for(Duration::from_secs(30));
    let limits = grinta_proto::flow::FlowLimits::default();
    let reader = c.sim.node(1).node.flow_stats(accepted).expect("open");
    let writer = c.sim.node(0).node.flow_stats(flow).expect("open");
    let pending: usize = sent.borrow().pending[&flow].iter().map(Bytes::len).sum();
    println!(
        "slow reader: {} B buffered at the reader, {} B queued at the writer, {pending} B not yet sent, {} WouldBlock",
        reader.recv_queued_bytes,
        writer.send_queued_bytes,
        sent.borrow().would_block
    );
    assert!(
        reader.recv_queued_bytes <= limits.recv_buffer + (64 << 10),
        "the reader's buffer is bounded"
    );
    assert!(
        writer.send_queued_bytes <= limits.send_buffer + (64 << 10),
        "the writer's buffer is bounded"
    );
    assert!(
        pending > 16 << 20,
        "most of the 32 MiB is still with the application"
    );
    assert!(sent.borrow().would_block > 0, "the writer was told to wait");
}

// ----- requests --------------------------------------------------------------------------------

/// Answers each request (every message) with its upper-case copy and the end of the flow.
struct Upper;

impl Upper {
    fn answer(node: &mut Node, now: Instant, flow: FlowId) {
        while let Ok(Recv::Message(m)) = node.recv(now, flow) {
            let _ = node.send(flow, Bytes::from(m.to_ascii_uppercase()));
            let _ = node.finish(flow);
        }
    }
}

impl FlowApp for Upper {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Incoming { endpoint, .. } => {
                while let Some(flow) = node.accept(now, endpoint) {
                    Self::answer(node, now, flow);
                }
            }
            FlowEvent::Readable { flow } => Self::answer(node, now, *flow),
            _ => {}
        }
    }
}

/// When node `i` first saw `event` about `flow` after `since`.
fn flow_event_at(
    c: &Cluster<SimulatedNode>,
    i: usize,
    since: Instant,
    want: impl Fn(&FlowEvent) -> bool,
) -> Option<Instant> {
    c.sim
        .node(i)
        .flow_events
        .iter()
        .find(|(t, e)| *t >= since && want(e))
        .map(|(t, _)| *t)
}

#[test]
fn a_request_costs_one_round_trip_on_an_open_connection() {
    let (seed, _g) = seed(9);
    // 5 ms each way, no jitter: a round trip is 10 ms.
    let net = NetConfig {
        latency: Duration::from_millis(5),
        jitter: Duration::ZERO,
        ..NetConfig::default()
    };
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c = Cluster::nodes(seed, net, node_membership_config(), certificates(&ca, 2));
    c.form(Duration::from_millis(100));
    c.run_until(Duration::from_secs(30), |c| c.converged())
        .expect("formed");
    c.sim.node_mut(1).app = Some(Box::new(Upper));
    register(&mut c, 1, "upper", EndpointKind::Exclusive);
    c.run_until(Duration::from_secs(10), |c| {
        !owners(c, 0, "upper").is_empty()
    })
    .expect("name spread");
    let (mut requests, mut exchanges) = (Vec::new(), Vec::new());
    c.sim.enable_transmit_log();
    for k in 0..10 {
        // A request: open, message and end together.
        let t0 = c.sim.now();
        let membership_before = c.sim.node(0).node.stats().membership.packets_sent;
        let message = Bytes::from(format!("hello {k}"));
        let flow = c
            .sim
            .with_node(0, |n, now| n.node.dial_request(now, "upper", message))
            .expect("request");
        c.run_until(Duration::from_secs(5), |c| {
            flow_event_at(c, 0, t0, |e| *e == FlowEvent::Readable { flow }).is_some()
        })
        .expect("reply");
        let replied =
            flow_event_at(&c, 0, t0, |e| *e == FlowEvent::Readable { flow }).expect("reply");
        let reply = c.sim.with_node(0, |n, now| n.node.recv(now, flow));
        assert_eq!(reply, Ok(Recv::Message(Bytes::from(format!("HELLO {k}")))));
        requests.push(replied - t0);
        // Until the reply, the requester sent one packet: the request (besides membership's).
        let (from, to) = (t0 - c.sim.base(), replied - c.sim.base());
        let sent = c
            .sim
            .transmit_log()
            .iter()
            .filter(|r| r.src == 0 && r.at >= from && r.at < to)
            .count() as u64;
        let membership = c.sim.node(0).node.stats().membership.packets_sent - membership_before;
        assert!(
            sent <= 1 + membership,
            "request {k}: {sent} packets sent before the reply, {membership} of them membership's"
        );
        c.sim.with_node(0, |n, _| n.node.drop_flow(flow));
        c.run_for(Duration::from_millis(50));

        // The same exchange as a dial, then the message once the flow is open.
        let t0 = c.sim.now();
        let flow = c
            .sim
            .with_node(0, |n, now| n.node.dial(now, "upper"))
            .expect("dial");
        c.run_until(Duration::from_secs(5), |c| {
            flow_event_at(
                c,
                0,
                t0,
                |e| matches!(e, FlowEvent::Opened { flow: f, .. } if *f == flow),
            )
            .is_some()
        })
        .expect("open");
        c.sim.with_node(0, |n, _| {
            n.node.send(flow, Bytes::from_static(b"x")).expect("send");
            n.node.finish(flow).expect("finish");
        });
        c.run_until(Duration::from_secs(5), |c| {
            flow_event_at(c, 0, t0, |e| *e == FlowEvent::Readable { flow }).is_some()
        })
        .expect("reply");
        let replied =
            flow_event_at(&c, 0, t0, |e| *e == FlowEvent::Readable { flow }).expect("reply");
        exchanges.push(replied - t0);
        c.sim.with_node(0, |n, _| n.node.drop_flow(flow));
        c.run_for(Duration::from_millis(50));
    }
    let worst = |v: &[Duration]| v.iter().max().copied().expect("runs");
    println!(
        "round trip 10 ms: request {:?} at worst, dial then exchange {:?}",
        worst(&requests),
        worst(&exchanges)
    );
    assert!(worst(&requests) < Duration::from_millis(15), "{requests:?}");
    assert!(
        exchanges.iter().all(|d| *d >= Duration::from_millis(20)),
        "{exchanges:?}"
    );
}

// ----- datagrams ---------------------------------------------------------------------------------

/// A receiving node remembers whether it serves the endpoint the last datagram came for until
/// its directory changes: a datagram for an endpoint closed a moment ago is dropped (its sender
/// had not heard yet), and one for the endpoint registered again is delivered.
#[test]
fn datagrams_follow_an_endpoint_closed_and_registered_again() {
    let (seed, _g) = seed(12);
    let mut c = formed(seed, 2);
    register(&mut c, 1, "inbox", EndpointKind::Exclusive);
    c.run_until(Duration::from_secs(10), |c| {
        owners(c, 0, "inbox").len() == 1
    })
    .expect("the name spread");
    let send = |c: &mut Cluster<SimulatedNode>, payload: &'static str| {
        c.sim.with_node(0, |n, now| {
            n.node
                .send_datagram(now, "inbox", Bytes::from_static(payload.as_bytes()))
                .expect("sent")
        })
    };
    let recv = |c: &mut Cluster<SimulatedNode>| {
        c.sim
            .with_node(1, |n, _| n.node.recv_datagram("inbox"))
            .map(|(_, payload)| payload)
    };
    assert!(send(&mut c, "before"));
    c.run_for(Duration::from_millis(100));
    assert_eq!(recv(&mut c), Some(Bytes::from_static(b"before")));
    // Closed on node 1; node 0 has not heard and sends once more.
    c.sim
        .with_node(1, |n, now| n.node.unregister_endpoint(now, "inbox"))
        .expect("unregistered");
    let dropped = c.sim.node(1).node.stats().datagrams.dropped_receiving;
    assert!(send(&mut c, "closed"));
    c.run_for(Duration::from_millis(100));
    assert_eq!(recv(&mut c), None, "no endpoint serves it any more");
    assert_eq!(
        c.sim.node(1).node.stats().datagrams.dropped_receiving,
        dropped + 1
    );
    c.run_until(Duration::from_secs(10), |c| {
        owners(c, 0, "inbox").is_empty()
    })
    .expect("the withdrawal spread");
    register(&mut c, 1, "inbox", EndpointKind::Exclusive);
    c.run_until(Duration::from_secs(10), |c| {
        owners(c, 0, "inbox").len() == 1
    })
    .expect("the name spread again");
    assert!(send(&mut c, "again"));
    c.run_for(Duration::from_millis(100));
    assert_eq!(recv(&mut c), Some(Bytes::from_static(b"again")));
}

#[test]
fn a_batch_of_datagrams_to_a_group_spreads_over_its_owners() {
    let (seed, _g) = seed(11);
    let n = 4;
    let mut c = formed(seed, n);
    c.run_for(Duration::from_secs(2));
    for owner in [1, 2, 3] {
        register(&mut c, owner, "workers", EndpointKind::Group);
    }
    c.run_until(Duration::from_secs(10), |c| {
        owners(c, 0, "workers").len() == 3
    })
    .expect("the group spread");
    // 300 small datagrams in one batch, as a runtime hands over what its senders queued: each
    // goes to an owner picked for it, and together they fit the connections' buffers.
    c.sim.with_node(0, |n, now| {
        let payloads = (0..300u32).map(|i| Bytes::from(i.to_be_bytes().to_vec()));
        n.node.send_datagrams(now, "workers", payloads);
    });
    c.run_for(Duration::from_secs(2));
    let sender = c.sim.node(0).node.stats().datagrams;
    assert_eq!(sender.sent + sender.dropped_sending, 300, "{sender:?}");
    assert_eq!(sender.sent, 300, "nothing dropped: {sender:?}");
    let mut seen = Vec::new();
    for owner in [1, 2, 3] {
        let mut got = 0;
        while let Some((from, payload)) = c
            .sim
            .with_node(owner, |n, _| n.node.recv_datagram("workers"))
        {
            assert_eq!(from, node_name(0));
            seen.push(u32::from_be_bytes(payload[..].try_into().expect("4 bytes")));
            got += 1;
        }
        // Uniform over three owners: 100 each on average; far from 0 or 300 for any seed.
        assert!(
            (40..=160).contains(&got),
            "owner {owner} got {got} (seed {seed})"
        );
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..300).collect::<Vec<u32>>(),
        "each exactly once (seed {seed})"
    );
}

#[test]
fn bursts_of_datagrams_never_starve_membership() {
    let (seed, _g) = seed(10);
    let n = 5;
    let mut c = formed(seed, n);
    c.run_for(Duration::from_secs(2));
    register(&mut c, 1, "inbox", EndpointKind::Exclusive);
    c.run_until(Duration::from_secs(10), |c| {
        !owners(c, 0, "inbox").is_empty()
    })
    .expect("name spread");
    let suspicions = |c: &Cluster<SimulatedNode>| -> u64 {
        (0..n)
            .map(|i| c.sim.node(i).node.stats().membership.suspicions_raised)
            .sum()
    };
    let before = suspicions(&c);
    let mut received = 0;
    for burst in 0..10u32 {
        // 10,000 datagrams of 900 bytes in one input: far more than a connection carries at once.
        // Half the bursts one by one, half as the batches runtimes hand over.
        c.sim.with_node(0, |n, now| {
            let payloads = (0..10_000u32).map(|i| {
                let mut payload = vec![0u8; 900];
                payload[..4].copy_from_slice(&(burst * 10_000 + i).to_be_bytes());
                Bytes::from(payload)
            });
            if burst % 2 == 0 {
                for payload in payloads {
                    n.node
                        .send_datagram(now, "inbox", payload)
                        .expect("never an error");
                }
            } else {
                n.node.send_datagrams(now, "inbox", payloads);
            }
        });
        c.run_for(Duration::from_secs(1));
        while c
            .sim
            .with_node(1, |n, _| n.node.recv_datagram("inbox"))
            .is_some_and(|(from, _)| from == node_name(0))
        {
            received += 1;
        }
    }
    c.run_for(Duration::from_secs(10));
    let sender = c.sim.node(0).node.stats().datagrams;
    let receiver = c.sim.node(1).node.stats().datagrams;
    println!("100,000 datagrams: {sender:?}; receiver {receiver:?}; read {received}");
    assert_eq!(sender.sent + sender.dropped_sending, 100_000);
    assert!(received > 1000, "{received}");
    // A batch to a name nobody serves, or with datagrams too large, is dropped and counted.
    c.sim.with_node(0, |n, now| {
        n.node
            .send_datagrams(now, "nobody", (0..1000).map(|_| Bytes::from_static(b"x")));
        n.node.send_datagrams(
            now,
            "inbox",
            [Bytes::from(vec![
                0u8;
                grinta_proto::datagram::MAX_DATAGRAM_SIZE
                    + 1
            ])],
        );
        n.node.count_datagrams_dropped(5);
    });
    let after = c.sim.node(0).node.stats().datagrams;
    assert_eq!(after.sent, sender.sent);
    assert_eq!(after.dropped_sending, sender.dropped_sending + 1000 + 1 + 5);
    assert_eq!(
        suspicions(&c),
        before,
        "no probe lost to the bursts (seed {seed})"
    );
    assert!(c.converged());
}
