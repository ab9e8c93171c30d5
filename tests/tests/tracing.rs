//! What a node logs: every event inside `node{name}`, a flow's events inside
//! `flow{id, endpoint, peer}` within it, member changes and connections at debug level, and
//! nothing per message above trace level.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grinta_proto::flow::{FlowEvent, FlowId, Recv};
use grinta_proto::node::Node;
use grinta_proto::registry::EndpointKind;
use grinta_proto::tls::dev::DevCa;
use grinta_tests::membership_sim::Cluster;
use grinta_tests::node_sim::{FlowApp, SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};
use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;

/// Everything the subscriber writes, shared with the test.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const MESSAGES: usize = 1_000;

/// Accepts flows on `echo`, reads them to their end, then finishes its side.
struct Sink;

impl FlowApp for Sink {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Incoming { .. } => {
                let _ = node.accept(now, "echo");
            }
            FlowEvent::Readable { flow } => loop {
                match node.recv(now, *flow) {
                    Ok(Recv::Message(_)) => {}
                    Ok(Recv::Finished) => {
                        let _ = node.finish(*flow);
                        break;
                    }
                    _ => break,
                }
            },
            _ => {}
        }
    }
}

/// Sends [`MESSAGES`] on the flow it dialled, then finishes and reads to the end.
struct Sender {
    sent: usize,
}

impl Sender {
    fn send_more(&mut self, node: &mut Node, flow: FlowId) {
        while self.sent < MESSAGES {
            if node.send(flow, Bytes::from_static(b"message")).is_err() {
                return;
            }
            self.sent += 1;
        }
        let _ = node.finish(flow);
    }
}

impl FlowApp for Sender {
    fn on_event(&mut self, node: &mut Node, now: Instant, event: &FlowEvent) {
        match event {
            FlowEvent::Opened { flow, .. } | FlowEvent::Writable { flow } => {
                self.send_more(node, *flow)
            }
            FlowEvent::Readable { flow } => {
                while let Ok(Recv::Message(_)) = node.recv(now, *flow) {}
            }
            _ => {}
        }
    }
}

#[test]
fn every_event_carries_its_node_and_flow() {
    let (seed, _g) = seed(91);
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(Level::DEBUG)
        .with_writer(capture.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let ca = DevCa::from_seed(seed).expect("dev CA");
        let mut c: Cluster<SimulatedNode> =
            Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, 2));
        c.form(Duration::from_millis(100));
        c.run_for(Duration::from_secs(2));
        c.sim
            .with_node(1, |n, now| {
                n.node
                    .register_endpoint(now, "echo", EndpointKind::Exclusive)
            })
            .expect("registered");
        c.sim.node_mut(1).app = Some(Box::new(Sink));
        c.sim.node_mut(0).app = Some(Box::new(Sender { sent: 0 }));
        c.run_for(Duration::from_secs(2));
        let flow = c
            .sim
            .with_node(0, |n, now| n.node.dial(now, "echo"))
            .expect("dial");
        assert_eq!(flow, FlowId(1));
        c.run_for(Duration::from_secs(3));
        assert_eq!(c.sim.node(0).node.flow_count(), 0, "the flow ended");
        assert_eq!(c.sim.node(1).node.flow_count(), 0, "the flow ended");
    });
    let text = capture.text();
    let lines: Vec<&str> = text.lines().collect();
    let find = |what: &str, scope: &str| {
        lines
            .iter()
            .find(|l| l.contains(&format!(": {what}")) && l.contains(scope))
            .unwrap_or_else(|| panic!("no `{what}` in `{scope}` among:\n{text}"))
    };
    // Member changes and connections, in the node's span.
    find("member joined", "node{name=node-0}");
    find("member joined", "node{name=node-1}");
    find("connection established", "node{name=node-0}");
    // The flow's events, in the flow's span within the node's, on both sides.
    let dialler = "node{name=node-0}:flow{id=1 endpoint=echo peer=node-1}";
    find("dialling", dialler);
    find("flow open", dialler);
    find("flow finished both ways", dialler);
    let acceptor = "node{name=node-1}:flow{id=";
    let incoming = find("incoming flow queued for accept", acceptor);
    assert!(
        incoming.contains("endpoint=echo peer=node-0}"),
        "{incoming}"
    );
    find("flow finished both ways", acceptor);
    // Nothing per message: 1,000 messages made a handful of flow lines.
    let flow_lines = lines.iter().filter(|l| l.contains(":flow{")).count();
    assert!(
        flow_lines <= 10,
        "{flow_lines} flow lines for {MESSAGES} messages:\n{text}"
    );
    println!("{text}");
}
