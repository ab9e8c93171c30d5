//! One set of test bodies, run over an in-process flow (both ends on one node) and over a remote
//! flow (two nodes on 127.0.0.1, QUIC + mTLS): the two must behave the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use grinta_tokio::{
    Codec, CodecError, DevCa, Error, Fabric, Flow, FlowError, FlowLimits, Profile, ResetCode,
};

const MAX_MESSAGE: usize = 64 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn limits() -> FlowLimits {
    FlowLimits {
        max_message_size: MAX_MESSAGE,
        send_buffer: 256 * 1024,
        recv_buffer: 256 * 1024,
        local_capacity: 64,
        ..FlowLimits::default()
    }
}

fn builder(ca: &DevCa, name: &str) -> grinta_tokio::FabricBuilder {
    Fabric::builder(name)
        .dev_certificates(ca)
        .profile(Profile::Local)
        .flow_limits(limits())
}

/// Both ends of a flow, and the fabrics that must outlive them.
struct Pair {
    dialler: Flow,
    acceptor: Flow,
    _fabrics: Vec<Fabric>,
    _endpoint: grinta_tokio::Endpoint,
}

async fn local_pair() -> Pair {
    let ca = DevCa::new().unwrap();
    let fabric = builder(&ca, "solo").start().unwrap();
    let endpoint = fabric.endpoint("svc").unwrap();
    let dialler = fabric.dial("svc").await.unwrap();
    assert!(dialler.is_local());
    let acceptor = endpoint.accept().await.unwrap();
    assert!(acceptor.is_local());
    Pair {
        dialler,
        acceptor,
        _fabrics: vec![fabric],
        _endpoint: endpoint,
    }
}

async fn remote_pair() -> Pair {
    let ca = DevCa::new().unwrap();
    let a = builder(&ca, "node-a").start().unwrap();
    let b = builder(&ca, "node-b").seed(a.local_addr()).start().unwrap();
    let endpoint = b.endpoint("svc").unwrap();
    tokio::time::timeout(WAIT, async {
        while a.endpoints("svc").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the name spreads");
    let dialler = a.dial("svc").await.unwrap();
    assert!(!dialler.is_local());
    let acceptor = endpoint.accept().await.unwrap();
    Pair {
        dialler,
        acceptor,
        _fabrics: vec![a, b],
        _endpoint: endpoint,
    }
}

macro_rules! local_and_remote {
    ($($body:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $body() {
                    let pair = super::local_pair().await;
                    tokio::time::timeout(super::WAIT, super::$body(pair)).await.expect("no hang");
                }
            )*
        }
        mod remote {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $body() {
                    let pair = super::remote_pair().await;
                    tokio::time::timeout(super::WAIT, super::$body(pair)).await.expect("no hang");
                }
            )*
        }
    };
}

local_and_remote!(
    order_finish_and_half_close,
    reset_reaches_both_sides,
    dropping_an_unfinished_flow_resets_it,
    dropping_a_finished_flow_delivers_what_it_sent,
    message_too_large_is_refused_and_the_flow_survives,
    a_reader_that_stops_reading_blocks_the_writer,
    sink_and_stream,
    split_halves_work_from_two_tasks,
    typed_values_and_type_mismatch,
    typed_halves_are_sink_and_stream,
    prost_values_and_foreign_bytes,
    stats_count_messages_and_bytes,
    unread_messages_count_as_queued,
    a_slow_reader_gets_every_small_message_in_order,
);

fn message(i: usize) -> Bytes {
    // Sizes 0..=4095, content depends on the index.
    let len = (i * 37) % 4096;
    Bytes::from((0..len).map(|j| (i + j) as u8).collect::<Vec<u8>>())
}

async fn order_finish_and_half_close(mut p: Pair) {
    let writer = tokio::spawn(async move {
        for i in 0..500 {
            p.dialler.send(message(i)).await.unwrap();
        }
        p.dialler.finish().await.unwrap();
        let err = p.dialler.send("late").await.unwrap_err();
        assert!(matches!(err, Error::Flow(FlowError::Finished)), "{err}");
        // Half-closed: the other direction still works.
        assert_eq!(p.dialler.recv().await.unwrap(), Some(Bytes::from("reply")));
        assert_eq!(p.dialler.recv().await.unwrap(), None);
        p.dialler
    });
    for i in 0..500 {
        assert_eq!(
            p.acceptor.recv().await.unwrap(),
            Some(message(i)),
            "message {i}"
        );
    }
    assert_eq!(p.acceptor.recv().await.unwrap(), None);
    p.acceptor.send("reply").await.unwrap();
    p.acceptor.finish().await.unwrap();
    writer.await.unwrap();
}

async fn reset_reaches_both_sides(mut p: Pair) {
    p.dialler.send("before").await.unwrap();
    assert_eq!(
        p.acceptor.recv().await.unwrap(),
        Some(Bytes::from("before"))
    );
    p.dialler.reset(7).unwrap();
    let err = p.acceptor.recv().await.unwrap_err();
    assert_eq!(err.reset_code(), Some(ResetCode::Application(7)), "{err}");
    assert!(err.to_string().contains("reset"), "{err}");
    let err = p.acceptor.send("after").await.unwrap_err();
    assert_eq!(err.reset_code(), Some(ResetCode::Application(7)), "{err}");
    let err = p.dialler.send("after").await.unwrap_err();
    assert_eq!(err.reset_code(), Some(ResetCode::Application(7)), "{err}");
}

async fn dropping_an_unfinished_flow_resets_it(mut p: Pair) {
    p.acceptor.send("x").await.unwrap();
    drop(p.dialler);
    let err = p.acceptor.recv().await.unwrap_err();
    assert_eq!(err.reset_code(), Some(ResetCode::Dropped), "{err}");
}

async fn dropping_a_finished_flow_delivers_what_it_sent(mut p: Pair) {
    for i in 0..20 {
        p.dialler.send(message(i)).await.unwrap();
    }
    p.dialler.finish().await.unwrap();
    drop(p.dialler);
    for i in 0..20 {
        assert_eq!(p.acceptor.recv().await.unwrap(), Some(message(i)));
    }
    assert_eq!(p.acceptor.recv().await.unwrap(), None);
    // Nobody reads this side any more: sends are accepted and discarded, never stuck.
    for i in 0..200 {
        p.acceptor.send(message(i)).await.unwrap();
    }
    p.acceptor.finish().await.unwrap();
}

async fn message_too_large_is_refused_and_the_flow_survives(mut p: Pair) {
    let err = p
        .dialler
        .send(vec![0u8; MAX_MESSAGE + 1])
        .await
        .unwrap_err();
    match &err {
        Error::Flow(FlowError::MessageTooLarge { size, limit }) => {
            assert_eq!(*size, MAX_MESSAGE as u64 + 1);
            assert_eq!(*limit, MAX_MESSAGE as u64);
        }
        other => panic!("expected MessageTooLarge, got {other}"),
    }
    assert!(err.to_string().contains("exceeds the maximum message size"));
    p.dialler.send(vec![1u8; MAX_MESSAGE]).await.unwrap();
    assert_eq!(
        p.acceptor.recv().await.unwrap().map(|m| m.len()),
        Some(MAX_MESSAGE)
    );
}

async fn a_reader_that_stops_reading_blocks_the_writer(mut p: Pair) {
    // The writer sends until a send stays blocked for 300 ms (the reader is not reading).
    let mut sent = 0usize;
    let blocked = loop {
        assert!(sent < 10_000, "the writer was never blocked");
        let send = p.dialler.send(message(sent));
        match tokio::time::timeout(Duration::from_millis(300), send).await {
            Ok(r) => {
                r.unwrap();
                sent += 1;
            }
            Err(_) => break sent,
        }
    };
    assert!(blocked > 0);
    // The message whose send was cancelled was not queued (a cancelled send sends nothing)...
    // ...so the reader sees exactly the `blocked` messages, then the ones sent after it resumes.
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while let Some(m) = p.acceptor.recv().await.unwrap() {
            assert_eq!(m, message(got), "message {got}");
            got += 1;
        }
        got
    });
    for i in blocked..blocked + 50 {
        p.dialler.send(message(i)).await.unwrap();
    }
    p.dialler.finish().await.unwrap();
    assert_eq!(reader.await.unwrap(), blocked + 50);
}

async fn sink_and_stream(p: Pair) {
    let Pair {
        mut dialler,
        acceptor,
        ..
    } = p;
    let writer = tokio::spawn(async move {
        let mut items = futures::stream::iter((0..300).map(|i| Ok(message(i))));
        dialler.send_all(&mut items).await.unwrap();
        dialler.close().await.unwrap();
        dialler
    });
    let got: Vec<Bytes> = acceptor.map(|r| r.unwrap()).collect::<Vec<Bytes>>().await;
    assert_eq!(got, (0..300).map(message).collect::<Vec<_>>());
    let _ = writer.await.unwrap();
}

async fn split_halves_work_from_two_tasks(p: Pair) {
    let (mut tx, mut rx) = p.dialler.split();
    let mut echo = p.acceptor;
    let echo = tokio::spawn(async move {
        while let Some(m) = echo.recv().await.unwrap() {
            echo.send(m).await.unwrap();
        }
        echo.finish().await.unwrap();
        echo
    });
    let sender = tokio::spawn(async move {
        for i in 0..300 {
            tx.send(message(i)).await.unwrap();
        }
        tx.finish().await.unwrap();
        tx
    });
    for i in 0..300 {
        assert_eq!(rx.recv().await.unwrap(), Some(message(i)));
    }
    assert_eq!(rx.recv().await.unwrap(), None);
    let _tx = sender.await.unwrap();
    let _echo = echo.await.unwrap();
}

async fn typed_halves_are_sink_and_stream(p: Pair) {
    let local = p.dialler.is_local();
    let (mut tx, rx) = p.dialler.typed(U64Codec::default()).split();
    assert_eq!(tx.is_local(), local);
    assert_eq!(rx.is_local(), local);
    // The acceptor echoes every value, typed as well, through its own Sink and Stream.
    let echo = p.acceptor.typed(U64Codec::default());
    assert_eq!(echo.is_local(), local);
    let echo = tokio::spawn(async move {
        let (mut out, mut values) = echo.split();
        while let Some(v) = values.next().await {
            out.send(v.unwrap() * 2).await.unwrap();
        }
        out.close().await.unwrap();
    });
    let sender = tokio::spawn(async move {
        let mut items = futures::stream::iter((0..300u64).map(Ok));
        tx.send_all(&mut items).await.unwrap();
        tx.close().await.unwrap();
    });
    let got: Vec<u64> = rx.map(|r| r.unwrap()).collect().await;
    assert_eq!(got, (0..300u64).map(|v| v * 2).collect::<Vec<_>>());
    sender.await.unwrap();
    echo.await.unwrap();
}

/// Big-endian u64, counting its encodes.
#[derive(Clone, Default)]
struct U64Codec(Arc<AtomicUsize>);

impl Codec<u64> for U64Codec {
    fn encode(&self, value: &u64) -> Result<Bytes, CodecError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Bytes::copy_from_slice(&value.to_be_bytes()))
    }

    fn decode(&self, message: Bytes) -> Result<u64, CodecError> {
        let bytes: [u8; 8] = message[..].try_into().map_err(|_| {
            CodecError::decode::<u64>(format!("{} bytes, expected 8", message.len()))
        })?;
        Ok(u64::from_be_bytes(bytes))
    }
}

/// UTF-8 text.
struct TextCodec;

impl Codec<String> for TextCodec {
    fn encode(&self, value: &String) -> Result<Bytes, CodecError> {
        Ok(Bytes::from(value.clone()))
    }

    fn decode(&self, message: Bytes) -> Result<String, CodecError> {
        String::from_utf8(message.to_vec()).map_err(CodecError::decode::<String>)
    }
}

async fn typed_values_and_type_mismatch(p: Pair) {
    let local = p.dialler.is_local();
    let encodes = Arc::new(AtomicUsize::new(0));
    let mut tx = p.dialler.typed(U64Codec(encodes.clone()));
    let mut rx = p.acceptor.typed(U64Codec::default());
    for v in [0, 1, u64::MAX / 3] {
        tx.send(v).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), Some(v));
    }
    // In-process values are moved, never encoded; remote ones are encoded once each.
    assert_eq!(encodes.load(Ordering::Relaxed), if local { 0 } else { 3 });

    // A receiver of another type gets a typed error naming its type, and the flow survives.
    let mut text = rx.into_inner().typed(TextCodec);
    tx.send(u64::MAX).await.unwrap();
    let err = text.recv().await.unwrap_err();
    assert!(matches!(err, Error::Codec(_)), "{err}");
    assert!(
        err.to_string()
            .contains("cannot decode a message as alloc::string::String"),
        "{err}"
    );
    tx.send(u64::from_be_bytes(*b"grinta!!")).await.unwrap();
    assert_eq!(text.recv().await.unwrap().as_deref(), Some("grinta!!"));
    tx.finish().await.unwrap();
    assert_eq!(text.recv().await.unwrap(), None);
}

async fn stats_count_messages_and_bytes(mut p: Pair) {
    for i in 0..10 {
        p.dialler.send(message(i)).await.unwrap();
    }
    let bytes: usize = (0..10).map(|i| message(i).len()).sum();
    for _ in 0..10 {
        p.acceptor.recv().await.unwrap().unwrap();
    }
    let sent = p.dialler.stats().expect("open flow has stats");
    assert_eq!(sent.messages_sent, 10);
    assert_eq!(sent.bytes_sent, bytes as u64);
    let received = p.acceptor.stats().expect("open flow has stats");
    assert_eq!(received.messages_received, 10);
    assert_eq!(received.bytes_received, bytes as u64);
    assert_eq!(received.recv_queued_messages, 0);
}

/// An application's own protobuf message, as a user of `ProstCodec` defines it.
#[derive(Clone, PartialEq, prost::Message)]
struct Ack {
    #[prost(uint32, tag = "1")]
    seq_no: u32,
}

async fn prost_values_and_foreign_bytes(p: Pair) {
    use grinta_tokio::ProstCodec;
    let mut client = p.dialler.typed(ProstCodec::<Ack>::new());
    let mut server = p.acceptor.typed(ProstCodec::<Ack>::new());
    for i in 0..10 {
        client.send(Ack { seq_no: i }).await.unwrap();
        let ack = server.recv().await.unwrap().unwrap();
        server
            .send(Ack {
                seq_no: ack.seq_no + 1,
            })
            .await
            .unwrap();
        assert_eq!(client.recv().await.unwrap(), Some(Ack { seq_no: i + 1 }));
    }
    // Bytes that are not an Ack: the typed receiver reports a codec error naming the type.
    let mut raw = client.into_inner();
    raw.send(vec![0xffu8, 0xff, 0xff]).await.unwrap();
    let err = server.recv().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot decode a ") && text.contains("Ack"),
        "{text}"
    );
    // The server drops its end without finishing: this side sees the flow end, not a hang.
    drop(server);
    let end = raw.recv().await.unwrap_err();
    assert!(
        matches!(
            end,
            Error::Flow(FlowError::Reset {
                code: ResetCode::Dropped
            })
        ),
        "{end:?}"
    );
}

async fn unread_messages_count_as_queued(mut p: Pair) {
    for i in 0..10 {
        p.dialler.send(message(i)).await.unwrap();
    }
    let bytes: usize = (0..10).map(|i| message(i).len()).sum();
    // Delivered to the receiving side but not read: queued, not received.
    loop {
        let stats = p.acceptor.stats().expect("open flow has stats");
        if stats.recv_queued_messages == 10 {
            assert_eq!(stats.messages_received, 0);
            assert!(stats.recv_queued_bytes >= bytes, "{stats:?}");
            break;
        }
        assert!(stats.recv_queued_messages < 10, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..10 {
        assert_eq!(p.acceptor.recv().await.unwrap(), Some(message(i)));
    }
    let stats = p.acceptor.stats().expect("open flow has stats");
    assert_eq!(stats.recv_queued_messages, 0);
    assert_eq!(stats.messages_received, 10);
    assert_eq!(stats.bytes_received, bytes as u64);
}

/// Four times the receive buffer in small messages, read in bursts with pauses, so the receiving
/// side fills up and resumes many times.
async fn a_slow_reader_gets_every_small_message_in_order(p: Pair) {
    const COUNT: usize = 40_000;
    fn small(i: usize) -> Bytes {
        Bytes::from(vec![i as u8; 1 + i % 48])
    }
    let Pair {
        mut dialler,
        mut acceptor,
        ..
    } = p;
    let writer = tokio::spawn(async move {
        for i in 0..COUNT {
            dialler.send(small(i)).await.unwrap();
        }
        dialler.finish().await.unwrap();
        dialler
    });
    let mut got = 0;
    while let Some(m) = acceptor.recv().await.unwrap() {
        assert_eq!(m, small(got), "message {got}");
        got += 1;
        if got % 5_000 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(got, COUNT);
    let _dialler = writer.await.unwrap();
}
