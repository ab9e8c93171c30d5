//! In-process flows against `tokio::sync::mpsc` of the same capacity.

use std::time::{Duration, Instant};

use bytes::Bytes;
use grinta_proto::flow::FlowLimits;
use grinta_proto::tls::dev::DevCa;
use grinta_tokio::Fabric;
use tokio::sync::mpsc;

use crate::{Measurement, middle, percentile_us, round_trips};

const MESSAGES: usize = 2_000_000;
const ROUND_TRIPS: usize = 20_000;

fn fabric(name: &str) -> Fabric {
    let ca = DevCa::new().expect("dev CA");
    Fabric::builder(name)
        .dev_certificates(&ca)
        .start()
        .expect("fabric starts")
}

/// Messages per second through one local flow, writer and reader on two tasks.
async fn grinta_throughput(fabric: &Fabric, n: usize) -> f64 {
    let endpoint = fabric.endpoint("sink").expect("endpoint");
    let mut tx = fabric.dial("sink").await.expect("dial");
    let mut rx = endpoint.accept().await.expect("accept");
    let message = Bytes::from(vec![7u8; 64]);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut k = 0usize;
        while rx.recv().await.expect("recv").is_some() {
            k += 1;
        }
        k
    });
    for _ in 0..n {
        tx.send(message.clone()).await.expect("send");
    }
    tx.finish().await.expect("finish");
    assert_eq!(reader.await.expect("reader"), n);
    n as f64 / start.elapsed().as_secs_f64()
}

async fn mpsc_throughput(capacity: usize, n: usize) -> f64 {
    let (tx, mut rx) = mpsc::channel::<Bytes>(capacity);
    let message = Bytes::from(vec![7u8; 64]);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut k = 0usize;
        while rx.recv().await.is_some() {
            k += 1;
        }
        k
    });
    for _ in 0..n {
        tx.send(message.clone()).await.expect("send");
    }
    drop(tx);
    assert_eq!(reader.await.expect("reader"), n);
    n as f64 / start.elapsed().as_secs_f64()
}

/// Round trips (64-byte request, echoed) over one local flow: sorted latencies.
async fn grinta_rtt(fabric: &Fabric) -> Vec<Duration> {
    let endpoint = fabric.endpoint("echo").expect("endpoint");
    let mut flow = fabric.dial("echo").await.expect("dial");
    let mut echo = endpoint.accept().await.expect("accept");
    tokio::spawn(async move {
        while let Ok(Some(m)) = echo.recv().await {
            if echo.send(m).await.is_err() {
                break;
            }
        }
    });
    let message = Bytes::from(vec![1u8; 64]);
    let mut v = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 1000 {
        let t = Instant::now();
        flow.send(message.clone()).await.expect("send");
        flow.recv().await.expect("recv").expect("reply");
        if i >= 1000 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    v
}

async fn mpsc_rtt(capacity: usize) -> Vec<Duration> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(capacity);
    let (back_tx, mut back) = mpsc::channel::<Bytes>(capacity);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if back_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let message = Bytes::from(vec![1u8; 64]);
    let mut v = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 1000 {
        let t = Instant::now();
        tx.send(message.clone()).await.expect("send");
        back.recv().await.expect("reply");
        if i >= 1000 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    v
}

/// Dial of a local endpoint through accept, vs handing a fresh pair of mpsc channels to an
/// accepting task over an mpsc "backlog".
async fn dial_latency(fabric: &Fabric, capacity: usize) -> (f64, f64) {
    let endpoint = fabric.endpoint("dial-target").expect("endpoint");
    let mut grinta = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let flow = fabric.dial("dial-target").await.expect("dial");
        let accepted = endpoint.accept().await.expect("accept");
        grinta.push(t.elapsed());
        drop((flow, accepted));
    }
    type Pair = (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>);
    let (backlog_tx, mut backlog) = mpsc::channel::<Pair>(64);
    let mut base = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let (a_tx, b_rx) = mpsc::channel::<Bytes>(capacity);
        let (b_tx, a_rx) = mpsc::channel::<Bytes>(capacity);
        backlog_tx.send((b_tx, b_rx)).await.expect("backlog");
        let accepted = backlog.recv().await.expect("accept");
        base.push(t.elapsed());
        drop((a_tx, a_rx, accepted));
    }
    grinta.sort();
    base.sort();
    (percentile_us(&grinta, 0.5), percentile_us(&base, 0.5))
}

pub(crate) async fn run() -> Vec<Measurement> {
    let capacity = FlowLimits::default().local_capacity;
    let fabric = fabric("bench-local");
    let mut g = Vec::new();
    let mut b = Vec::new();
    // Interleaved, five runs each, medians.
    for _ in 0..5 {
        g.push(grinta_throughput(&fabric, MESSAGES).await);
        b.push(mpsc_throughput(capacity, MESSAGES).await);
    }
    let baseline = format!("tokio::sync::mpsc, capacity {capacity}");
    let mut out = vec![Measurement::higher(
        "local_flow_64b",
        middle(g),
        "msg/s",
        &baseline,
        middle(b),
    )];
    let grtt = grinta_rtt(&fabric).await;
    let brtt = mpsc_rtt(capacity).await;
    out.extend(round_trips(
        "local_rtt",
        &grtt,
        "a pair of tokio::sync::mpsc channels",
        &brtt,
    ));
    let (dial, base) = dial_latency(&fabric, capacity).await;
    out.push(Measurement::lower(
        "local_dial_p50",
        dial,
        "us",
        "two mpsc channels handed over an mpsc backlog",
        base,
    ));
    fabric.abort();
    out
}
