//! Datagrams and pub/sub fan-out between fabrics over loopback, against raw quinn doing the same
//! by hand: QUIC DATAGRAM frames on one connection, and one stream per subscriber node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use grinta_proto::tls::dev::DevCa;
use grinta_tokio::{Fabric, Profile};

use crate::remote::raw;
use crate::{Measurement, middle};

const SMALL: usize = 64;
/// How long each run sends datagrams, as fast as the sender's loop goes.
const SENDING: Duration = Duration::from_secs(1);
/// Messages published per run.
const PUBLISHED: usize = 100_000;
/// Subscriber nodes in the fan-out.
const SUBSCRIBERS: usize = 3;
/// A receiver that saw nothing new for this long has seen everything that will arrive.
const QUIET: Duration = Duration::from_millis(200);

/// Counts what a receiver got and when it last got something.
#[derive(Default)]
struct Counter {
    received: AtomicU64,
    /// Nanoseconds since `epoch` of the last receipt.
    last: AtomicU64,
}

impl Counter {
    fn hit(&self, epoch: Instant) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last
            .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Waits until nothing arrived for [`QUIET`]: (received since `before`, delivered per second
    /// from `start` to the last receipt).
    async fn settle(&self, epoch: Instant, start: Instant, before: u64) -> (u64, f64) {
        let mut seen = self.received.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(QUIET).await;
            let now = self.received.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
        let got = seen - before;
        let last = epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed));
        let span = last.saturating_duration_since(start).as_secs_f64();
        (got, if span > 0.0 { got as f64 / span } else { 0.0 })
    }
}

fn fabric(name: &str, ca: &DevCa, seed: Option<std::net::SocketAddr>) -> Fabric {
    let mut builder = Fabric::builder(name)
        .dev_certificates(ca)
        .profile(Profile::Lan);
    if let Some(seed) = seed {
        builder = builder.seed(seed);
    }
    builder.start().expect("fabric starts")
}

/// Datagrams delivered per second while a loop sends 64-byte datagrams from `a` to an endpoint
/// on `b` for [`SENDING`]: the capacity of the path, whatever the loop offers beyond it is
/// dropped (never waited for), by grinta as by quinn. Both send one static payload: the clones
/// share no reference count, which the sending loop and the driver's thread would otherwise
/// contend on with every datagram.
async fn grinta_datagrams(a: &Fabric, counter: &Counter, epoch: Instant) -> f64 {
    let message = Bytes::from_static(&[4u8; SMALL]);
    let send = || {
        a.send_datagram("dgram", message.clone()).expect("send");
    };
    offer(send, counter, epoch, "grinta").await
}

async fn quinn_datagrams(conn: &quinn::Connection, counter: &Counter, epoch: Instant) -> f64 {
    let message = Bytes::from_static(&[4u8; SMALL]);
    let send = || {
        conn.send_datagram(message.clone()).expect("send");
    };
    offer(send, counter, epoch, "quinn").await
}

/// Calls `send` in a loop for [`SENDING`], then waits for the receiver to settle: datagrams
/// delivered per second.
async fn offer(mut send: impl FnMut(), counter: &Counter, epoch: Instant, who: &str) -> f64 {
    let before = counter.received.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < SENDING {
        for _ in 0..256 {
            send();
        }
        sent += 256;
        // The loop never blocks: let the driver and the receiver run, as an application's other
        // tasks would.
        tokio::task::yield_now().await;
    }
    let (got, rate) = counter.settle(epoch, start, before).await;
    eprintln!("    {who}: {got} of {sent} datagrams delivered");
    rate
}

/// Messages per second published by one node and received by every subscriber node (reliable
/// subscriptions, so nothing is dropped).
async fn grinta_fanout(publisher: &Fabric, counters: &[Arc<Counter>], epoch: Instant) -> f64 {
    let before: Vec<u64> = counters
        .iter()
        .map(|c| c.received.load(Ordering::Relaxed))
        .collect();
    let message = Bytes::from(vec![6u8; SMALL]);
    let start = Instant::now();
    for _ in 0..PUBLISHED {
        publisher
            .publish("bench", message.clone())
            .await
            .expect("publish");
    }
    let mut rate = f64::INFINITY;
    for (c, before) in counters.iter().zip(before) {
        let (got, r) = c.settle(epoch, start, before).await;
        assert_eq!(got, PUBLISHED as u64, "a reliable subscriber lost messages");
        rate = rate.min(r);
    }
    rate
}

/// The same with quinn: each message written to one stream per subscriber node.
async fn quinn_fanout(conns: &[quinn::Connection]) -> f64 {
    let mut frame = Vec::new();
    prost::encoding::encode_varint(SMALL as u64, &mut frame);
    frame.extend(std::iter::repeat_n(6u8, SMALL));
    let mut streams = Vec::new();
    for conn in conns {
        let (mut send, recv) = conn.open_bi().await.expect("open");
        send.write_all(&[0]).await.expect("mode");
        streams.push((send, recv));
    }
    let start = Instant::now();
    for _ in 0..PUBLISHED {
        for (send, _) in &mut streams {
            send.write_all(&frame).await.expect("write");
        }
    }
    for (send, _) in &mut streams {
        send.finish().expect("finish");
    }
    for (_, recv) in &mut streams {
        let mut n = [0u8; 8];
        recv.read_exact(&mut n).await.expect("count");
        assert_eq!(u64::from_be_bytes(n), PUBLISHED as u64);
    }
    PUBLISHED as f64 / start.elapsed().as_secs_f64()
}

async fn until(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "benchmark setup timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two fabrics with an endpoint `dgram` on the second that counts datagrams, the same for raw
/// quinn, both connected.
struct DatagramPairs {
    a: Fabric,
    b: Fabric,
    grinta_counter: Arc<Counter>,
    quinn: raw::QuinnPair,
    quinn_counter: Arc<Counter>,
}

async fn datagram_pairs(ca: &DevCa, epoch: Instant) -> DatagramPairs {
    let a = fabric("bench-pub", ca, None);
    let b = fabric("bench-sub-0", ca, Some(a.local_addr()));
    let grinta_counter = Arc::new(Counter::default());
    let endpoint = b.endpoint("dgram").expect("endpoint");
    let counter = grinta_counter.clone();
    tokio::spawn(async move {
        while endpoint.recv_datagram().await.is_ok() {
            counter.hit(epoch);
        }
    });
    until(|| a.endpoints("dgram").len() == 1).await;
    // The first datagram makes the connection.
    a.wait_for("dgram", Duration::from_secs(10))
        .await
        .expect("dgram known");
    let quinn = raw::pair(ca).await;
    let quinn_counter = Arc::new(Counter::default());
    let (server_conn, counter) = (quinn.server_conn.clone(), quinn_counter.clone());
    tokio::spawn(async move {
        while server_conn.read_datagram().await.is_ok() {
            counter.hit(epoch);
        }
    });
    DatagramPairs {
        a,
        b,
        grinta_counter,
        quinn,
        quinn_counter,
    }
}

/// Runs grinta's (or with `baseline` raw quinn's) datagram measurement for about ten seconds:
/// a target for `perf record`.
pub(crate) async fn profile(baseline: bool) {
    let ca = DevCa::new().expect("dev CA");
    let epoch = Instant::now();
    let pairs = datagram_pairs(&ca, epoch).await;
    let start = Instant::now();
    let mut rates = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        rates.push(if baseline {
            quinn_datagrams(&pairs.quinn.conn, &pairs.quinn_counter, epoch).await
        } else {
            grinta_datagrams(&pairs.a, &pairs.grinta_counter, epoch).await
        });
    }
    eprintln!("datagrams delivered per second per run: {rates:.0?}");
    if !baseline {
        let (sa, sb) = (pairs.a.stats(), pairs.b.stats());
        eprintln!("sender: {:?} {:?}", sa.node.datagrams, sa.socket);
        eprintln!("receiver: {:?} {:?}", sb.node.datagrams, sb.socket);
    }
}

pub(crate) async fn run() -> Vec<Measurement> {
    let ca = DevCa::new().expect("dev CA");
    let epoch = Instant::now();
    let mut out = Vec::new();

    // Datagrams: grinta a -> b, quinn client -> server.
    let DatagramPairs {
        a,
        b,
        grinta_counter,
        quinn,
        quinn_counter,
    } = datagram_pairs(&ca, epoch).await;
    let mut g = Vec::new();
    let mut q = Vec::new();
    for _ in 0..5 {
        g.push(grinta_datagrams(&a, &grinta_counter, epoch).await);
        q.push(quinn_datagrams(&quinn.conn, &quinn_counter, epoch).await);
    }
    out.push(Measurement::higher(
        "datagram_64b",
        middle(g),
        "msg/s",
        "raw quinn datagrams on one connection (delivered per second, a loop sending for 1 s)",
        middle(q),
    ));

    // Fan-out: a publishes, three nodes subscribe; quinn writes each message to three servers.
    let mut subscribers = vec![b];
    for i in 1..SUBSCRIBERS {
        subscribers.push(fabric(&format!("bench-sub-{i}"), &ca, Some(a.local_addr())));
    }
    let mut counters = Vec::new();
    for s in &subscribers {
        let mut subscription = s.subscribe_reliable("bench").expect("subscribe");
        let counter = Arc::new(Counter::default());
        counters.push(counter.clone());
        tokio::spawn(async move {
            while let Some(Ok(_)) = subscription.next().await {
                counter.hit(epoch);
            }
        });
    }
    until(|| a.subscribers("bench").len() == SUBSCRIBERS).await;
    let mut servers = vec![quinn];
    for _ in 1..SUBSCRIBERS {
        servers.push(raw::pair(&ca).await);
    }
    let conns: Vec<_> = servers.iter().map(|p| p.conn.clone()).collect();
    let mut g = Vec::new();
    let mut q = Vec::new();
    for _ in 0..5 {
        g.push(grinta_fanout(&a, &counters, epoch).await);
        q.push(quinn_fanout(&conns).await);
    }
    out.push(Measurement::higher(
        "pubsub_fanout_64b",
        middle(g),
        "msg/s",
        "raw quinn: each message written to one stream per subscriber node (3)",
        middle(q),
    ));
    a.abort();
    for s in subscribers {
        s.abort();
    }
    out
}
