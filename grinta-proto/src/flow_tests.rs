//! The flow state machines alone, over in-memory streams ([`FlowStreams`]): no QUIC, no TLS.

use std::collections::HashMap;
use std::time::Duration;

use quinn_proto::{Dir, Side};

use super::*;
use crate::registry::{EndpointKind, RegistryLimits};
use crate::wire::framing::{self, FrameDecoder};

const CONN: ConnectionHandle = ConnectionHandle(7);
const PEER: &str = "peer";

fn stream(i: u64) -> StreamId {
    StreamId::new(Side::Client, Dir::Bi, i)
}

fn addr() -> std::net::SocketAddr {
    "127.0.0.1:7000".parse().expect("address")
}

/// In-memory streams: records what the flow layer does, and feeds it what a peer sent.
#[derive(Default)]
struct Streams {
    opened: Vec<(String, u64)>,
    written: HashMap<StreamId, Vec<u8>>,
    inbound: HashMap<StreamId, FlowRead>,
    finished: Vec<StreamId>,
    released: Vec<StreamId>,
    replies: Vec<(StreamId, Bytes)>,
    aborted: Vec<(StreamId, u64)>,
    holds: i64,
}

impl FlowStreams for Streams {
    fn open_flow_stream(&mut self, _: Instant, peer: &str, _: std::net::SocketAddr, token: u64) {
        self.opened.push((peer.to_owned(), token));
    }

    fn authenticate(&mut self, _: ConnectionHandle, name: &str) -> bool {
        name == PEER
    }

    fn flow_write_chunks(
        &mut self,
        _: ConnectionHandle,
        stream: StreamId,
        chunks: &mut [Bytes],
    ) -> Option<usize> {
        let out = self.written.entry(stream).or_default();
        let mut n = 0;
        for chunk in chunks.iter_mut() {
            out.extend_from_slice(chunk);
            n += chunk.len();
            *chunk = Bytes::new();
        }
        Some(n)
    }

    fn flow_read(&mut self, _: ConnectionHandle, stream: StreamId, max: usize) -> FlowRead {
        let Some(pending) = self.inbound.get_mut(&stream) else {
            return FlowRead::default();
        };
        let mut out = FlowRead::default();
        let mut room = max;
        while room > 0 && !pending.data.is_empty() {
            let mut chunk = pending.data.remove(0);
            if chunk.len() > room {
                pending.data.insert(0, chunk.split_off(room));
            }
            room -= chunk.len();
            out.data.push(chunk);
        }
        if pending.data.is_empty() {
            out.finished = std::mem::take(&mut pending.finished);
            out.reset = pending.reset.take();
        }
        out
    }

    fn flow_finish(&mut self, _: ConnectionHandle, stream: StreamId) {
        self.finished.push(stream);
    }

    fn flow_release(&mut self, _: ConnectionHandle, stream: StreamId) {
        self.released.push(stream);
    }

    fn flow_reply_and_release(&mut self, _: ConnectionHandle, stream: StreamId, data: Bytes) {
        self.replies.push((stream, data));
    }

    fn abort_stream(&mut self, _: ConnectionHandle, stream: StreamId, code: u64) {
        self.aborted.push((stream, code));
    }

    fn hold_conn(&mut self, _: Instant, _: ConnectionHandle) {
        self.holds += 1;
    }

    fn release_conn(&mut self, _: ConnectionHandle) {
        self.holds -= 1;
    }
}

impl Streams {
    /// The peer sends one control message.
    fn deliver_message(&mut self, stream: StreamId, message: &impl prost::Message) {
        let mut buf = Vec::new();
        framing::encode_message(message, &mut buf);
        self.inbound
            .entry(stream)
            .or_default()
            .data
            .push(buf.into());
    }

    /// The peer sends one application message.
    fn deliver(&mut self, stream: StreamId, payload: &[u8]) {
        let mut buf = Vec::new();
        framing::encode_frame(payload, &mut buf);
        self.inbound
            .entry(stream)
            .or_default()
            .data
            .push(buf.into());
    }

    fn peer_finishes(&mut self, stream: StreamId) {
        self.inbound.entry(stream).or_default().finished = true;
    }

    fn peer_resets(&mut self, stream: StreamId, code: ResetCode) {
        self.inbound.entry(stream).or_default().reset = Some(code.to_quic());
    }

    /// Every frame written on `stream`, in order.
    fn frames(&self, stream: StreamId) -> Vec<Bytes> {
        let mut decoder = FrameDecoder::new(1 << 20);
        decoder.extend(self.written.get(&stream).map_or(&[][..], Vec::as_slice));
        std::iter::from_fn(|| decoder.next_frame().expect("valid frames")).collect()
    }
}

fn open_request(endpoint: &str, source: &str) -> wire::FlowOpen {
    wire::FlowOpen {
        protocol_version: wire::PROTOCOL_VERSION,
        endpoint: endpoint.to_owned(),
        source_node: source.to_owned(),
        max_message_size: 1000,
    }
}

fn accept(max_message_size: u64) -> wire::FlowResponse {
    wire::FlowResponse {
        result: Some(wire::flow_response::Result::Accept(wire::FlowAccept {
            max_message_size,
        })),
    }
}

fn events(flows: &mut Flows) -> Vec<FlowEvent> {
    std::iter::from_fn(|| flows.poll_event()).collect()
}

fn reject_reason(reply: &Bytes) -> RejectReason {
    let mut decoder = FrameDecoder::new(MAX_CONTROL_MESSAGE);
    decoder.extend(reply);
    let response: wire::FlowResponse = decoder
        .next_message()
        .expect("a frame")
        .expect("a response");
    match response.result {
        Some(wire::flow_response::Result::Reject(r)) => RejectReason::from_wire(r.reason),
        other => panic!("not a refusal: {other:?}"),
    }
}

/// A dial opened, answered, used both ways and finished by both sides: every step's effect on
/// the stream, and nothing held at the end.
#[test]
fn a_dialled_flow_opens_carries_messages_and_ends() {
    let now = Instant::now();
    let mut t = Streams::default();
    let registry = Registry::new("me", RegistryLimits::default());
    let mut flows = Flows::new("me", FlowLimits::default());
    let id = flows.dial(now, &mut t, "echo", PEER, addr()).expect("dial");
    assert_eq!(t.opened, [(PEER.to_owned(), id.0)]);

    flows.on_stream_opened(now, &mut t, id.0, CONN, stream(0));
    assert_eq!(t.holds, 1);
    let open: wire::FlowOpen =
        prost::Message::decode(t.frames(stream(0))[0].clone()).expect("FlowOpen first");
    assert_eq!(
        (open.endpoint.as_str(), open.source_node.as_str()),
        ("echo", "me")
    );
    assert_eq!(
        flows.send(id, Bytes::from_static(b"early"), true),
        Err(FlowError::NotOpen)
    );

    t.deliver_message(stream(0), &accept(16));
    flows.on_readable(now, &mut t, &registry, CONN, stream(0));
    assert!(matches!(
        events(&mut flows).as_slice(),
        [FlowEvent::Opened { flow, endpoint, peer }] if *flow == id && endpoint == "echo" && peer == PEER
    ));

    // The peer's size limit is enforced here, before anything is sent.
    assert!(matches!(
        flows.send(id, Bytes::from(vec![0; 17]), true),
        Err(FlowError::MessageTooLarge {
            size: 17,
            limit: 16
        })
    ));
    flows
        .send(id, Bytes::from_static(b"hello"), true)
        .expect("send");
    flows.flush_sends(&mut t);
    assert_eq!(t.frames(stream(0))[1], Bytes::from_static(b"hello"));
    flows.finish(&mut t, id).expect("finish");
    assert_eq!(t.finished, [stream(0)]);

    t.deliver(stream(0), b"world");
    t.peer_finishes(stream(0));
    flows.on_readable(now, &mut t, &registry, CONN, stream(0));
    let mut more = RecvQueue::default();
    assert_eq!(
        flows.recv(now, &mut t, &registry, id, &mut more, 0),
        Ok(Recv::Message(Bytes::from_static(b"world")))
    );
    assert_eq!(
        flows.recv(now, &mut t, &registry, id, &mut more, 0),
        Ok(Recv::Finished)
    );
    assert_eq!(flows.len(), 0, "both sides finished: the flow is done");
    assert_eq!(t.released, [stream(0)]);
    assert_eq!(t.holds, 0);
    assert!(t.aborted.is_empty());
    assert_eq!(flows.send(id, Bytes::new(), true), Err(FlowError::Finished));
}

#[test]
fn an_incoming_flow_for_an_unknown_endpoint_is_refused_and_leaves_nothing() {
    let now = Instant::now();
    let mut t = Streams::default();
    let registry = Registry::new("me", RegistryLimits::default());
    let mut flows = Flows::new("me", FlowLimits::default());
    flows.on_incoming(now, &mut t, CONN, stream(1));
    t.deliver_message(stream(1), &open_request("nobody", PEER));
    flows.on_readable(now, &mut t, &registry, CONN, stream(1));
    assert_eq!(t.replies.len(), 1);
    assert_eq!(reject_reason(&t.replies[0].1), RejectReason::NoSuchEndpoint);
    assert!(
        events(&mut flows).is_empty(),
        "the application never sees it"
    );
    assert_eq!(flows.len(), 0);
    assert_eq!(t.holds, 0);
}

#[test]
fn a_full_backlog_refuses_and_an_accepted_flow_reads_only_once_accepted() {
    let now = Instant::now();
    let mut t = Streams::default();
    let mut registry = Registry::new("me", RegistryLimits::default());
    registry
        .register("svc", EndpointKind::Exclusive, now)
        .expect("register");
    let limits = FlowLimits {
        accept_backlog: 1,
        ..FlowLimits::default()
    };
    let mut flows = Flows::new("me", limits);
    for i in [1, 5] {
        flows.on_incoming(now, &mut t, CONN, stream(i));
        t.deliver_message(stream(i), &open_request("svc", PEER));
        flows.on_readable(now, &mut t, &registry, CONN, stream(i));
    }
    let incoming = events(&mut flows);
    assert!(
        matches!(incoming.as_slice(), [FlowEvent::Incoming { endpoint, peer, .. }] if endpoint == "svc" && peer == PEER),
        "{incoming:?}"
    );
    assert_eq!(t.replies.len(), 1, "the second waits for no backlog room");
    assert_eq!(reject_reason(&t.replies[0].1), RejectReason::BacklogFull);
    // The queued flow reads nothing more until accepted: its message stays in QUIC.
    t.deliver(stream(1), b"payload");
    flows.on_readable(now, &mut t, &registry, CONN, stream(1));
    assert!(!t.inbound[&stream(1)].data.is_empty());
    assert!(events(&mut flows).is_empty());
    let id = flows
        .accept(now, &mut t, &registry, "svc")
        .expect("the queued flow");
    let mut more = RecvQueue::default();
    assert_eq!(
        flows.recv(now, &mut t, &registry, id, &mut more, 0),
        Ok(Recv::Message(Bytes::from_static(b"payload")))
    );
    // The acceptance went out on the stream.
    let response: wire::FlowResponse =
        prost::Message::decode(t.frames(stream(1))[0].clone()).expect("a response");
    assert!(matches!(
        response.result,
        Some(wire::flow_response::Result::Accept(_))
    ));
}

#[test]
fn an_open_from_a_node_the_connection_does_not_prove_is_a_violation() {
    let now = Instant::now();
    let mut t = Streams::default();
    let mut registry = Registry::new("me", RegistryLimits::default());
    registry
        .register("svc", EndpointKind::Exclusive, now)
        .expect("register");
    let mut flows = Flows::new("me", FlowLimits::default());
    flows.on_incoming(now, &mut t, CONN, stream(1));
    t.deliver_message(stream(1), &open_request("svc", "mallory"));
    flows.on_readable(now, &mut t, &registry, CONN, stream(1));
    assert_eq!(
        t.aborted,
        [(stream(1), ResetCode::ProtocolViolation.to_quic())]
    );
    assert_eq!(flows.len(), 0);
    assert!(events(&mut flows).is_empty());
}

#[test]
fn an_unanswered_dial_times_out_and_gives_its_stream_back() {
    let now = Instant::now();
    let mut t = Streams::default();
    let limits = FlowLimits {
        dial_timeout: Duration::from_secs(2),
        ..FlowLimits::default()
    };
    let mut flows = Flows::new("me", limits);
    let id = flows.dial(now, &mut t, "echo", PEER, addr()).expect("dial");
    flows.on_stream_opened(now, &mut t, id.0, CONN, stream(0));
    assert_eq!(flows.poll_timeout(), Some(now + Duration::from_secs(2)));
    flows.handle_timeout(now + Duration::from_secs(1), &mut t);
    assert!(events(&mut flows).is_empty(), "not yet");
    flows.handle_timeout(now + Duration::from_secs(2), &mut t);
    assert!(matches!(
        events(&mut flows).as_slice(),
        [FlowEvent::DialFailed { flow, error: FlowError::DialTimeout { .. }, .. }] if *flow == id
    ));
    assert_eq!(t.aborted.len(), 1, "the stream is reset and stopped");
    assert_eq!(t.holds, 0);
    assert_eq!(flows.len(), 0);
}

#[test]
fn a_reset_from_the_peer_ends_the_flow_and_resets_our_half_too() {
    let now = Instant::now();
    let mut t = Streams::default();
    let registry = Registry::new("me", RegistryLimits::default());
    let mut flows = Flows::new("me", FlowLimits::default());
    let id = flows.dial(now, &mut t, "echo", PEER, addr()).expect("dial");
    flows.on_stream_opened(now, &mut t, id.0, CONN, stream(0));
    t.deliver_message(stream(0), &accept(1000));
    flows.on_readable(now, &mut t, &registry, CONN, stream(0));
    events(&mut flows);
    t.peer_resets(stream(0), ResetCode::Application(5));
    flows.on_readable(now, &mut t, &registry, CONN, stream(0));
    let error = FlowError::Reset {
        code: ResetCode::Application(5),
    };
    assert_eq!(
        events(&mut flows),
        [FlowEvent::Closed {
            flow: id,
            error: error.clone()
        }]
    );
    assert_eq!(t.aborted.len(), 1, "our sending half is reset as well");
    assert_eq!(t.holds, 0);
    let mut more = RecvQueue::default();
    assert_eq!(
        flows.recv(now, &mut t, &registry, id, &mut more, 0),
        Err(error)
    );
}

/// The counts behind the limits (pending dials, flows per peer) follow every way in and out.
#[test]
fn pending_dial_and_per_peer_counts_follow_flows_in_and_out() {
    let now = Instant::now();
    let mut t = Streams::default();
    let registry = Registry::new("me", RegistryLimits::default());
    let limits = FlowLimits {
        max_pending_dials: 2,
        max_flows_per_peer: 3,
        dial_timeout: Duration::from_secs(1),
        ..FlowLimits::default()
    };
    let mut flows = Flows::new("me", limits);
    for round in 0..100u64 {
        let now = now + Duration::from_secs(2 * round);
        let a = flows
            .dial(now, &mut t, "echo", PEER, addr())
            .expect("first");
        let b = flows
            .dial(now, &mut t, "echo", PEER, addr())
            .expect("second");
        assert!(matches!(
            flows.dial(now, &mut t, "echo", PEER, addr()),
            Err(FlowError::LimitReached {
                what: "max_pending_dials",
                ..
            })
        ));
        // One is answered: room for a dial again, but now the peer holds three flows.
        let s = stream(4 * round);
        flows.on_stream_opened(now, &mut t, a.0, CONN, s);
        t.deliver_message(s, &accept(1000));
        flows.on_readable(now, &mut t, &registry, CONN, s);
        let c = flows
            .dial(now, &mut t, "echo", PEER, addr())
            .expect("third");
        assert!(matches!(
            flows.dial(now, &mut t, "other", PEER, addr()),
            Err(FlowError::LimitReached {
                what: "max_pending_dials",
                ..
            })
        ));
        assert_eq!(flows.flows_with(PEER), 3);
        // The unanswered ones time out, the open one is reset: nothing is left counted.
        flows.handle_timeout(now + Duration::from_secs(1), &mut t);
        flows
            .reset(&mut t, a, ResetCode::Application(1))
            .expect("reset");
        assert_eq!(flows.len(), 0, "round {round}: {b:?} {c:?}");
        assert_eq!((flows.dialing, flows.flows_with(PEER)), (0, 0));
        assert_eq!(flows.poll_timeout(), None);
    }
}

/// A staging queue gives back the messages it framed, owned or copied, in order, whatever
/// their sizes: the sender's way back when the flow closed before the batch was handed over.
#[test]
fn a_staging_queue_gives_back_its_messages() {
    let sizes = [
        0usize, 1, 64, 4095, 4096, 4097, 70_000, 3, 0, 16_384, 127, 128,
    ];
    let messages: Vec<Bytes> = sizes
        .iter()
        .cycle()
        .take(200)
        .enumerate()
        .map(|(i, &n)| Bytes::from(vec![(i % 251) as u8; n]))
        .collect();
    let mut staged = SendQueue::for_staging();
    for m in &messages {
        staged.push_message(m.clone());
    }
    let framed: usize = messages.iter().map(|m| framing::framed_len(m.len())).sum();
    assert_eq!(staged.len(), framed);
    assert_eq!(Vec::from(staged.into_messages()), messages);
    // Copied from borrowed messages, the same bytes.
    let mut copied = SendQueue::for_staging();
    for m in &messages {
        copied.push_copy(m);
    }
    assert_eq!(copied.len(), framed);
    assert_eq!(Vec::from(copied.into_messages()), messages);
    assert!(SendQueue::for_staging().into_messages().is_empty());
}

/// A receive queue hands out the messages of whole messages and runs in order, counts messages
/// and payload bytes exactly, and moves exactly as many messages as asked, cutting a run where
/// the count falls inside it.
#[test]
fn a_receive_queue_keeps_order_counts_and_batch_sizes() {
    // Runs of 0 to 40 frames of 0 to 200 bytes, with whole messages between them.
    let mut next = 0u32;
    let mut expected = Vec::new();
    let mut queue = RecvQueue::default();
    for round in 0..50usize {
        let count = (round * 7) % 41;
        let mut wire = Vec::new();
        let mut body = 0;
        for k in 0..count {
            let len = (round * 31 + k * 17) % 201;
            let mut m = next.to_be_bytes().to_vec();
            m.resize(len.max(4), (next % 251) as u8);
            next += 1;
            framing::encode_frame(&m, &mut wire);
            body += m.len();
            expected.push(m);
        }
        if count > 0 {
            queue.push_run(FrameRun::Frames {
                frames: wire.into(),
                count,
                body,
            });
        }
        let lone = next.to_be_bytes().to_vec();
        next += 1;
        queue.push_back(lone.clone().into());
        expected.push(lone);
    }
    let total_bytes: usize = expected.iter().map(Vec::len).sum();
    assert_eq!(queue.len(), expected.len());
    assert_eq!(queue.bytes(), total_bytes);
    // Read in place, every message in order.
    assert!(queue.iter().eq(expected.iter().map(Vec::as_slice)));
    // Take in batches of every size from 1 to 64, through `move_to`, as a reader does.
    let mut got = Vec::new();
    let mut batch = 1;
    while !queue.is_empty() {
        let before = (queue.len(), queue.bytes());
        let mut into = RecvQueue::default();
        let (messages, bytes) = queue.move_to(&mut into, batch);
        assert_eq!(messages, batch.min(before.0), "exactly the batch asked for");
        assert_eq!(into.len(), messages);
        assert_eq!(into.bytes(), bytes);
        assert_eq!(
            (queue.len(), queue.bytes()),
            (before.0 - messages, before.1 - bytes)
        );
        while let Some(m) = into.pop_front() {
            got.push(m.to_vec());
        }
        assert_eq!((into.len(), into.bytes()), (0, 0));
        batch = batch % 64 + 1;
    }
    assert_eq!(queue.bytes(), 0);
    assert_eq!(got, expected);
}
