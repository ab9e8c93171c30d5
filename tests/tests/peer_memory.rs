//! What one authenticated peer can make a node hold is bounded: a member with a valid certificate
//! that opens every flow it may to an endpoint that never accepts them, and keeps sending on all
//! of them, grows the process's heap by no more than the documented per-peer bound (SECURITY.md),
//! while another member keeps exchanging messages with the same node and nobody is suspected.
//! Whole nodes in the simulator, with a counting allocator; `SEED=<n>` replays.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grinta_proto::flow::{FlowError, FlowEvent, FlowId, FlowLimits, Recv};
use grinta_proto::node::Node;
use grinta_proto::registry::EndpointKind;
use grinta_proto::tls::dev::DevCa;
use grinta_proto::transport::TransportLimits;
use grinta_tests::alloc::{Counting, live_bytes};
use grinta_tests::membership_sim::Cluster;
use grinta_tests::node_sim::{FlowApp, certificates, node_membership_config};
use grinta_tests::{lan, seed};

#[global_allocator]
static ALLOC: Counting = Counting::system();

const ATTACKER: usize = 0;
const TARGET: usize = 1;
const BYSTANDER: usize = 2;
/// The attacker's messages, and how much it keeps queued per flow.
const CHUNK: usize = 16 * 1024;

/// Keeps every open flow's send buffer full, once told to flood: the worst case is every flow
/// open, then all of them sending (a peer that floods while it still opens flows fills the
/// connection's window before its last opens get through, and holds fewer flows).
#[derive(Default)]
struct Flooder {
    open: HashSet<FlowId>,
    flooding: bool,
}

impl Flooder {
    fn fill(node: &mut Node, flow: FlowId) {
        while node.send(flow, Bytes::from(vec![0x5a; CHUNK])).is_ok() {}
    }
}

struct FlooderApp(Rc<RefCell<Flooder>>);

impl FlowApp for FlooderApp {
    fn on_event(&mut self, node: &mut Node, _now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Opened { flow, .. } => {
                self.0.borrow_mut().open.insert(*flow);
                if self.0.borrow().flooding {
                    Flooder::fill(node, *flow);
                }
            }
            FlowEvent::Writable { flow } if self.0.borrow().flooding => Flooder::fill(node, *flow),
            FlowEvent::Closed { flow, .. } | FlowEvent::DialFailed { flow, .. } => {
                self.0.borrow_mut().open.remove(flow);
            }
            _ => {}
        }
    }
}

/// Serves `echo` (for the bystander) and never accepts `sink` (for the attacker).
struct Target;

impl FlowApp for Target {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Incoming { endpoint, .. } if endpoint == "echo" => {
                while node.accept(now, "echo").is_some() {}
            }
            FlowEvent::Readable { flow } => {
                while let Ok(Recv::Message(m)) = node.recv(now, *flow) {
                    let _ = node.send(*flow, m);
                }
            }
            _ => {}
        }
    }
}

/// Sends one message on its flow and counts the echoes.
#[derive(Default)]
struct Pinger {
    flow: Option<FlowId>,
    echoes: usize,
}

struct PingerApp(Rc<RefCell<Pinger>>);

impl FlowApp for PingerApp {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Opened { flow, .. } => {
                self.0.borrow_mut().flow = Some(*flow);
                let _ = node.send(*flow, Bytes::from_static(b"ping"));
            }
            FlowEvent::Readable { flow } => {
                while let Ok(Recv::Message(_)) = node.recv(now, *flow) {
                    self.0.borrow_mut().echoes += 1;
                }
            }
            _ => {}
        }
    }
}

#[test]
fn a_peer_flooding_every_flow_it_may_stays_within_the_per_peer_bound() {
    let (seed, _g) = seed(31);
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c = Cluster::nodes_with(
        seed,
        lan(),
        node_membership_config(),
        certificates(&ca, 3),
        |config| {
            // The attacker's own buffers stay small, so the heap measures what it makes others
            // hold.
            config.flows.send_buffer = CHUNK;
        },
    );
    c.form(Duration::from_millis(150));
    c.run_for(Duration::from_secs(2));
    for name in ["sink", "echo"] {
        c.sim
            .with_node(TARGET, |n, now| {
                n.node.register_endpoint(now, name, EndpointKind::Exclusive)
            })
            .expect("register");
    }
    c.sim.node_mut(TARGET).app = Some(Box::new(Target));
    let flooder = Rc::new(RefCell::new(Flooder::default()));
    c.sim.node_mut(ATTACKER).app = Some(Box::new(FlooderApp(flooder.clone())));
    let pinger = Rc::new(RefCell::new(Pinger::default()));
    c.sim.node_mut(BYSTANDER).app = Some(Box::new(PingerApp(pinger.clone())));
    c.run_for(Duration::from_secs(2));

    let heap_before = live_bytes();
    // Every flow the target lets one peer hold.
    let per_peer = FlowLimits::default().max_flows_per_peer;
    let mut dialled = 0;
    for _ in 0..per_peer {
        match c.sim.with_node(ATTACKER, |n, now| n.node.dial(now, "sink")) {
            Ok(_) => dialled += 1,
            Err(FlowError::LimitReached { .. }) => break,
            Err(e) => panic!("dial: {e}"),
        }
    }
    let bystander_flow = c
        .sim
        .with_node(BYSTANDER, |n, now| n.node.dial(now, "echo"))
        .expect("bystander dial");
    // Every flow opens (the target's stream allowance grows as they come), then the flood.
    c.run_until(Duration::from_secs(5), |_| {
        flooder.borrow().open.len() >= dialled
    });
    flooder.borrow_mut().flooding = true;
    let open: Vec<FlowId> = flooder.borrow().open.iter().copied().collect();
    c.sim.with_node(ATTACKER, |n, _| {
        for flow in open {
            Flooder::fill(&mut n.node, flow);
        }
    });
    let mut peak = 0usize;
    let mut echoes_seen = 0;
    for second in 0..20 {
        c.run_for(Duration::from_millis(500));
        // The simulator's own log of flow events is not the node's memory.
        for i in 0..3 {
            c.sim.node_mut(i).flow_events = Vec::new();
        }
        peak = peak.max(live_bytes().saturating_sub(heap_before));
        // The bystander keeps a conversation going through the flood.
        c.sim.with_node(BYSTANDER, |n, _| {
            let _ = n.node.send(bystander_flow, Bytes::from_static(b"ping"));
        });
        c.run_for(Duration::from_millis(500));
        let echoes = pinger.borrow().echoes;
        assert!(
            echoes > echoes_seen,
            "second {second}: the bystander got no answer (seed {seed})"
        );
        echoes_seen = echoes;
    }
    let open = flooder.borrow().open.len();
    assert!(
        open >= dialled * 9 / 10,
        "the attacker held its flows open: {open} of {dialled}"
    );
    // The documented bound for one peer (SECURITY.md): what QUIC buffers for it (its connection
    // window, with the reassembly's over-allocation: at most half again, plus 32 KiB a stream),
    // two push-pull messages, and about 2 KiB of state per stream.
    let limits = TransportLimits::default();
    let streams = limits.max_concurrent_streams as usize;
    let bound = limits.receive_window as usize * 5 / 2
        + streams * (32 + 2) * 1024
        + limits.max_inbound_exchanges * limits.max_stream_message_size;
    // The attacker's own side is in this process too: its queues (one CHUNK per flow) and
    // QUIC's send buffers.
    let attacker_side = per_peer * 2 * CHUNK + (16 << 20);
    println!(
        "{dialled} flooding flows: heap grew by at most {} KiB (bound {} KiB for the target, {} KiB for the attacker's own side); {echoes_seen} bystander echoes",
        peak / 1024,
        bound / 1024,
        attacker_side / 1024
    );
    assert!(
        peak <= bound + attacker_side,
        "heap grew by {peak} bytes (seed {seed})"
    );
    for i in [TARGET, BYSTANDER] {
        let seen = &c.sim.node(i).seen;
        assert!(seen.suspects.is_empty(), "node {i}: {:?}", seen.suspects);
    }
}
