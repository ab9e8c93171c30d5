//! What the sans-IO core costs per unit of work.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use grinta_proto::membership::Config;
use grinta_proto::tls::dev::DevCa;
use grinta_proto::wire::framing::{FrameDecoder, encode_frame};
use grinta_tests::lan;
use grinta_tests::membership_sim::Cluster;
use grinta_tests::node_sim::{certificates, node_membership_config};

use crate::{Measurement, median};

const FRAMES: usize = 1_000_000;

/// ns per 64-byte message: encode into one buffer, then decode every frame.
fn grinta_framing() -> f64 {
    let payload = [5u8; 64];
    let start = Instant::now();
    let mut buf = BytesMut::with_capacity(FRAMES * 65);
    for _ in 0..FRAMES {
        encode_frame(&payload, &mut buf);
    }
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut n = 0;
    // Fed in 64 KiB chunks, as a QUIC stream would deliver them.
    for chunk in buf.chunks(64 * 1024) {
        decoder.extend(chunk);
        while let Ok(Some(frame)) = decoder.next_frame() {
            n += frame.len();
        }
    }
    assert_eq!(n, FRAMES * 64);
    start.elapsed().as_nanos() as f64 / FRAMES as f64
}

/// The same with prost's varint functions and a `Bytes` buffer split in place.
fn prost_framing() -> f64 {
    let payload = [5u8; 64];
    let start = Instant::now();
    let mut buf = BytesMut::with_capacity(FRAMES * 65);
    for _ in 0..FRAMES {
        prost::encoding::encode_varint(payload.len() as u64, &mut buf);
        buf.extend_from_slice(&payload);
    }
    let mut data: Bytes = buf.freeze();
    let mut n = 0;
    while data.has_remaining() {
        let len = prost::encoding::decode_varint(&mut data).expect("varint") as usize;
        let frame = data.split_to(len);
        n += frame.len();
    }
    assert_eq!(n, FRAMES * 64);
    start.elapsed().as_nanos() as f64 / FRAMES as f64
}

/// Wall ns per datagram delivered over 60 simulated seconds of a formed 10-node cluster: whole
/// `Node`s (QUIC, TLS, membership) or the membership state machine alone.
fn per_datagram(whole_node: bool) -> f64 {
    let n = 10;
    let window = Duration::from_secs(60);
    if whole_node {
        let ca = DevCa::new().expect("dev CA");
        let mut c = Cluster::nodes(1, lan(), node_membership_config(), certificates(&ca, n));
        c.form(Duration::from_millis(500));
        let before = c.sim.stats().datagrams_delivered;
        let start = Instant::now();
        c.run_for(window);
        let took = start.elapsed();
        took.as_nanos() as f64 / (c.sim.stats().datagrams_delivered - before) as f64
    } else {
        let mut c = Cluster::formed(1, n, Config::lan(), lan(), Duration::from_millis(500));
        let before = c.sim.stats().datagrams_delivered;
        let start = Instant::now();
        c.run_for(window);
        let took = start.elapsed();
        took.as_nanos() as f64 / (c.sim.stats().datagrams_delivered - before) as f64
    }
}

pub(crate) fn run() -> Vec<Measurement> {
    let g = median(5, grinta_framing);
    let b = median(5, prost_framing);
    let node = median(3, || per_datagram(true));
    let membership = median(3, || per_datagram(false));
    vec![
        Measurement::lower(
            "framing_encode_decode_64b",
            g,
            "ns/msg",
            "prost varints over a Bytes buffer split in place",
            b,
        ),
        Measurement::lower(
            "node_membership_datagram",
            node,
            "ns/datagram",
            "the membership state machine alone (no QUIC, no TLS), same simulator",
            membership,
        ),
    ]
}
