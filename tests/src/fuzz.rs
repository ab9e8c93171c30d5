//! The bodies of the fuzz targets in `fuzz/`, shared with `tests/tests/fuzz_corpus.rs` so that the
//! checked-in corpora replay under a plain `cargo test` on stable.
//!
//! Each function takes the raw fuzzer input, must never panic on any input, and panics only when a
//! property of the code under test is broken.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use grinta_proto::claims::{self, CertificateKeys, ClaimKind};
use grinta_proto::flow::{FlowFrame, FlowId, FlowStreamParser};
use grinta_proto::node::{Event, Node, NodeConfig};
use grinta_proto::registry::{EndpointKind, Record, Registry, RegistryLimits};
use grinta_proto::tls::TlsConfig;
use grinta_proto::tls::dev::DevCa;
use grinta_proto::wire::{self, framing};
use prost::Message;

use crate::det_crypto::{FixedClock, deterministic_provider};

/// Every wire message decoder: the first byte picks the message type. Whatever decodes must
/// re-encode to something that decodes to the same value.
pub fn wire_messages(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
        if let Ok(m) = M::decode(bytes) {
            let again =
                M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
            assert_eq!(again, m, "decode(encode(m)) == m");
        }
    }
    match kind % 8 {
        0 => round_trip::<wire::Packet>(bytes),
        1 => round_trip::<wire::PushPull>(bytes),
        2 => round_trip::<wire::RegistryState>(bytes),
        3 => round_trip::<wire::RegistryDelta>(bytes),
        4 => round_trip::<wire::FlowOpen>(bytes),
        5 => round_trip::<wire::FlowResponse>(bytes),
        6 => round_trip::<wire::EndpointRecord>(bytes),
        _ => round_trip::<wire::Broadcast>(bytes),
    }
    // Every input is also an application datagram as a peer might send it: it decodes (and
    // re-encodes) or is refused, never a panic.
    let datagram = bytes::Bytes::copy_from_slice(data);
    if let Some((endpoint, payload)) = grinta_proto::datagram::decode(&datagram) {
        let again = grinta_proto::datagram::encode(endpoint, payload.clone());
        assert_eq!(
            grinta_proto::datagram::decode(&again),
            Some((endpoint, payload)),
            "decode(encode(d)) == d"
        );
    }
}

/// The stream framing decoder, fed in pieces whose size the first byte picks; taken frame by
/// frame, and in runs (`next_run`, as a flow read with `recv_many` takes them), which must give
/// the same frames and the same error.
pub fn wire_framing(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 4096;
    let mut decoder = framing::FrameDecoder::new(max);
    let mut whole = framing::FrameDecoder::new(max);
    whole.extend(rest);
    let mut by_frame = Vec::new();
    for piece in rest.chunks(usize::from(split).max(1)) {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= max);
                    // Splitting the input never changes what decodes.
                    assert_eq!(whole.next_frame(), Ok(Some(frame.clone())));
                    by_frame.push(Ok(frame));
                }
                Ok(None) => break,
                Err(e) => {
                    by_frame.push(Err(e));
                    break;
                }
            }
        }
        if by_frame.last().is_some_and(Result::is_err) {
            break;
        }
    }
    let mut runs = framing::FrameDecoder::new(max);
    let mut by_run = Vec::new();
    'pieces: for piece in rest.chunks(usize::from(split).max(1)) {
        runs.push(Bytes::copy_from_slice(piece));
        loop {
            match runs.next_run() {
                Ok(Some(framing::FrameRun::One(frame))) => by_run.push(Ok(frame)),
                Ok(Some(framing::FrameRun::Frames {
                    mut frames,
                    count,
                    body,
                })) => {
                    let (mut got, mut bytes) = (0, 0);
                    while let Some(frame) = framing::FrameRun::split_next(&mut frames) {
                        assert!(frame.len() <= max);
                        got += 1;
                        bytes += frame.len();
                        by_run.push(Ok(frame));
                    }
                    assert!(frames.is_empty(), "a run holds whole frames only");
                    assert_eq!((got, bytes), (count, body), "a run counts what it holds");
                }
                Ok(None) => break,
                Err(e) => {
                    by_run.push(Err(e));
                    break 'pieces;
                }
            }
        }
    }
    assert_eq!(by_run, by_frame, "runs give the frames next_frame gives");
}

/// The flow stream parser, fed in pieces: never panics, never yields a message above its limit,
/// yields the control message first.
pub fn flow_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let max = 1024;
    let mut parser = if mode & 1 == 0 {
        FlowStreamParser::for_acceptor(max)
    } else {
        FlowStreamParser::for_dialler(max)
    };
    let mut first = true;
    for piece in rest.chunks(usize::from(mode >> 1).max(1)) {
        parser.push(bytes::Bytes::copy_from_slice(piece));
        loop {
            match parser.next_frame() {
                Ok(Some(frame)) => {
                    match &frame {
                        FlowFrame::Message(m) => {
                            assert!(!first, "a message before the control frame");
                            assert!(m.len() <= max);
                        }
                        FlowFrame::Open(_) => assert!(first && mode & 1 == 0),
                        FlowFrame::Response(_) => assert!(first && mode & 1 == 1),
                    }
                    first = false;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// A number a peer chose, over its whole range: small values (where records collide), the edges
/// of every documented bound, or anything.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum ArbNum {
    /// 0..16.
    Small(u8),
    /// Around the bounds: 0, 1, 2^32, 2^62 - 1, 2^62, 2^62 + 1, 2^63, u64::MAX - 1, u64::MAX.
    Edge(u8),
    /// Any value.
    Any(u64),
}

impl ArbNum {
    /// The value.
    pub fn get(self) -> u64 {
        const EDGES: [u64; 9] = [
            0,
            1,
            1 << 32,
            (1 << 62) - 1,
            1 << 62,
            (1 << 62) + 1,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        match self {
            Self::Small(v) => u64::from(v % 16),
            Self::Edge(v) => EDGES[usize::from(v) % EDGES.len()],
            Self::Any(v) => v,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct ArbRecord {
    name: u8,
    owner: u8,
    owner_incarnation: ArbNum,
    version: ArbNum,
    claimed: bool,
    group: bool,
    /// A key/value entry (durable if `group`) rather than an endpoint record.
    value: bool,
}

impl ArbRecord {
    fn record(&self) -> Record {
        if self.value {
            return Record {
                name: format!("k{}", self.name % 8),
                owner: format!("o{}", self.owner % 6),
                owner_incarnation: self.owner_incarnation.get(),
                version: self.version.get(),
                claimed: self.claimed,
                kind: EndpointKind::Value,
                value: if self.claimed {
                    bytes::Bytes::from(format!("{}", self.version.get()))
                } else {
                    bytes::Bytes::new()
                },
                durable: self.claimed && self.group,
            };
        }
        Record {
            name: format!("n{}", self.name % 8),
            owner: format!("o{}", self.owner % 6),
            owner_incarnation: self.owner_incarnation.get(),
            version: self.version.get(),
            claimed: self.claimed,
            kind: if self.group {
                EndpointKind::Group
            } else {
                EndpointKind::Exclusive
            },
            value: bytes::Bytes::new(),
            durable: false,
        }
    }
}

/// Registry merge: arbitrary records, merged forwards and backwards, give the same table; a
/// registry of its own records and foreign ones never breaks its limits or panics.
pub fn registry_merge(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(all) = Vec::<ArbRecord>::arbitrary(&mut u) else {
        return;
    };
    // A node keeps endpoint records and key/value entries in two tables, never mixed.
    let (values, records): (Vec<ArbRecord>, Vec<ArbRecord>) =
        all.into_iter().partition(|r| r.value);
    key_value_merge(&values);
    let now = Instant::now();
    let limits = RegistryLimits {
        max_records: 32,
        ..RegistryLimits::default()
    };
    let mut forward = Registry::new("observer", limits.clone());
    let mut backward = Registry::new("observer", limits.clone());
    for r in &records {
        forward.merge(r.record(), now);
    }
    for r in records.iter().rev() {
        backward.merge(r.record(), now);
    }
    if records.len() <= 32 {
        let a: Vec<_> = forward.records().cloned().collect();
        let b: Vec<_> = backward.records().cloned().collect();
        assert_eq!(a, b, "merge order changed the table");
    }
    assert!(forward.len() <= 32);
    // A node that owns some of the names sees conflicts resolved, never twice the same claim.
    // Its own writes, incarnation changes and departures interleave with hostile numbers.
    let mut owner = Registry::new("o1", limits);
    for (i, r) in records.iter().enumerate() {
        let name = format!("n{}", r.name % 8);
        match i % 6 {
            0 => {
                let _ = owner.register(&name, EndpointKind::Exclusive, now);
            }
            1 => {
                let _ = owner.unregister(&name, now);
            }
            2 => owner.set_local_incarnation(r.owner_incarnation.get(), now),
            3 => owner.drop_owner(&format!("o{}", r.owner % 6), r.owner_incarnation.get(), now),
            4 => owner.owner_alive(&format!("o{}", r.owner % 6), r.owner_incarnation.get()),
            _ => {}
        }
        owner.merge(r.record(), now);
        for name in owner.names("") {
            let owners = owner.resolve(name);
            assert!(!owners.is_empty());
        }
        assert!(
            owner
                .records()
                .all(|r| r.version <= grinta_proto::registry::MAX_RECORD_VERSION + (1 << 20)),
            "versions stay within the bound (plus the node's own writes)"
        );
    }
}

/// The key/value table: arbitrary entries merged in either order give the same entries; a
/// writer's puts, deletes, takeovers and departures interleaved with hostile entries never
/// break its limits, and every key it reads is the last write it holds.
fn key_value_merge(records: &[ArbRecord]) {
    let now = Instant::now();
    let limits = RegistryLimits {
        max_records: 32,
        max_local_endpoints: 8,
        ..RegistryLimits::key_value()
    };
    let mut forward = Registry::new("observer", limits.clone());
    let mut backward = Registry::new("observer", limits.clone());
    for r in records {
        forward.merge(r.record(), now);
    }
    for r in records.iter().rev() {
        backward.merge(r.record(), now);
    }
    if records.len() <= 32 {
        let a: Vec<_> = forward.entries("").into_iter().cloned().collect();
        let b: Vec<_> = backward.entries("").into_iter().cloned().collect();
        assert_eq!(a, b, "merge order changed the entries");
    }
    let mut writer = Registry::new("o1", limits);
    for (i, r) in records.iter().enumerate() {
        let key = format!("k{}", r.name % 8);
        match i % 6 {
            0 => {
                let _ = writer.put(&key, "mine".into(), now);
            }
            1 => {
                let _ = writer.delete(&key, now);
            }
            2 => {
                let _ = writer.put_durable(&key, "durable".into(), now);
            }
            3 => writer.drop_owner(&format!("o{}", r.owner % 6), r.owner_incarnation.get(), now),
            4 => writer.set_local_incarnation(r.owner_incarnation.get(), now),
            _ => {
                for entry in writer.durable_entries_of(&format!("o{}", r.owner % 6)) {
                    let _ = writer.put_durable(&entry.name, entry.value, now);
                }
            }
        }
        writer.merge(r.record(), now);
        while writer.poll_outgoing().is_some() {}
        assert!(writer.len() <= 32);
        for entry in writer.entries("") {
            assert!(entry.claimed && entry.kind == EndpointKind::Value);
            assert_eq!(writer.get(&entry.name), Some(entry));
        }
        assert!(writer.resolve(&key).is_empty(), "entries are not endpoints");
    }
}

/// TLS material for the fuzzed node and its peer, made once per process.
fn certificates() -> &'static (TlsConfig, TlsConfig) {
    static CERTS: OnceLock<(TlsConfig, TlsConfig)> = OnceLock::new();
    CERTS.get_or_init(|| {
        let ca = DevCa::from_seed(0x6772_696e_7461).expect("development CA");
        (
            ca.issue("target").expect("certificate"),
            ca.issue("peer").expect("certificate"),
        )
    })
}

/// One seeded crypto provider per fuzzed node, made once per process: the provider's `&'static`
/// parts are leaked by design, and one leak per run would drown LeakSanitizer's real findings.
fn provider(port: u16) -> Arc<rustls::crypto::CryptoProvider> {
    static TARGET: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    static PEER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    let cell = if port == 7001 { &TARGET } else { &PEER };
    cell.get_or_init(|| deterministic_provider(u64::from(port)))
        .clone()
}

fn fuzz_node(name: &str, port: u16, tls: &TlsConfig, now: Instant) -> Node {
    let mut config = NodeConfig::new(name, SocketAddr::from(([127, 0, 0, 1], port)), tls.clone());
    config.crypto_provider = provider(port);
    config.time_provider = Arc::new(FixedClock::default());
    config.membership = grinta_proto::membership::Config::local();
    Node::new(config, u64::from(port), now).expect("valid fuzz configuration")
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Arbitrary bytes from an arbitrary loopback address.
    Garbage {
        from: u8,
        bytes: Vec<u8>,
    },
    /// Deliver pending traffic between the node and its real peer; `flip` mutates the next packet
    /// from the peer (position, xor) and `truncate` cuts it.
    Exchange {
        flip: Option<(u16, u8)>,
        truncate: Option<u16>,
    },
    /// Let virtual time pass.
    Advance {
        millis: u16,
    },
    /// Register or unregister an endpoint on the node or on the peer.
    Register {
        on_peer: bool,
        name: u8,
        group: bool,
    },
    Unregister {
        on_peer: bool,
        name: u8,
    },
    /// Join the peer (or be joined by it).
    Join {
        from_peer: bool,
    },
    /// Dial an endpoint, send on, read, finish or reset a flow.
    Dial {
        from_peer: bool,
        name: u8,
    },
    Send {
        from_peer: bool,
        flow: u8,
        len: u16,
    },
    Recv {
        from_peer: bool,
        flow: u8,
    },
    Finish {
        from_peer: bool,
        flow: u8,
    },
    Reset {
        from_peer: bool,
        flow: u8,
        code: u8,
    },
    Accept {
        on_peer: bool,
        name: u8,
    },
    /// Leave the cluster.
    Leave {
        peer: bool,
    },
    /// The peer (a member with a valid certificate) sends a crafted membership packet with
    /// numbers of its choosing: about the target, about itself, or an endpoint record of any
    /// owner.
    Inject {
        about_target: bool,
        kind: u8,
        incarnation: ArbNum,
        version: ArbNum,
        name: u8,
    },
}

/// What `signed_claims` does to a genuine claim before checking it.
#[derive(Debug, Arbitrary)]
enum ClaimMutation {
    /// Flip bits of one byte of the body.
    Body { at: u16, xor: u8 },
    /// Flip bits of one byte of the signature.
    Signature { at: u16, xor: u8 },
    /// Another signature scheme code.
    Scheme(u32),
    /// Flip bits of one byte of the carried certificate.
    Certificate { at: u16, xor: u8 },
    /// Carry no certificate.
    NoCertificate,
    /// Truncate the signature.
    TruncateSignature(u8),
    /// Check it as another kind of claim.
    Kind(u8),
    /// Check it as signed by another node.
    Signer(bool),
}

fn claim_kind(k: u8) -> ClaimKind {
    match k % 4 {
        0 => ClaimKind::Alive,
        1 => ClaimKind::Suspect,
        2 => ClaimKind::Dead,
        _ => ClaimKind::Record,
    }
}

/// The signed-claim decoder and verifier, with the keys every node uses. Arbitrary bytes decode
/// (or not) as an envelope and never verify; a genuine claim of `target` verifies, and any change
/// to its body, signature or scheme, its kind or its signer makes it fail. Nothing panics.
pub fn signed_claims(data: &[u8]) {
    let (target_tls, peer_tls) = certificates();
    let keys = |tls: &TlsConfig, name: &str| {
        CertificateKeys::new(
            tls,
            name,
            provider(7001),
            Arc::new(FixedClock::default()),
            8,
        )
        .expect("fuzz keys")
    };
    let mut checker = keys(peer_tls, "peer");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        // Arbitrary bytes: whatever decodes is checked against every signer and kind.
        if let Ok(signed) = wire::Signed::decode(rest) {
            for k in 0..4 {
                for signer in ["target", "peer", "stranger"] {
                    assert!(
                        claims::verify(&mut checker, signer, claim_kind(k), &signed).is_err(),
                        "arbitrary bytes passed as a claim of {signer}"
                    );
                }
            }
        }
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok(mutations) = Vec::<ClaimMutation>::arbitrary(&mut u) else {
        return;
    };
    let target = keys(target_tls, "target");
    let body = u.bytes(u.len().min(256)).unwrap_or_default().to_vec();
    let genuine = claims::sign(&target, ClaimKind::Alive, body, true).expect("signs");
    let (mut claim, mut kind, mut signer) = (genuine.clone(), ClaimKind::Alive, "target");
    let flip = |bytes: &Bytes, at: u16, xor: u8| {
        let mut v = bytes.to_vec();
        if !v.is_empty() {
            let i = usize::from(at) % v.len();
            v[i] ^= xor;
        }
        Bytes::from(v)
    };
    for m in mutations.into_iter().take(8) {
        match m {
            ClaimMutation::Body { at, xor } => claim.body = flip(&claim.body, at, xor),
            ClaimMutation::Signature { at, xor } => {
                claim.signature = flip(&claim.signature, at, xor)
            }
            ClaimMutation::Scheme(scheme) => claim.scheme = scheme,
            ClaimMutation::Certificate { at, xor } => {
                if let Some(c) = claim.certificates.first_mut() {
                    *c = flip(c, at, xor);
                }
            }
            ClaimMutation::NoCertificate => claim.certificates.clear(),
            ClaimMutation::TruncateSignature(len) => claim.signature.truncate(usize::from(len)),
            ClaimMutation::Kind(k) => kind = claim_kind(k),
            ClaimMutation::Signer(peer) => signer = if peer { "peer" } else { "stranger" },
        }
    }
    let result = claims::verify(&mut checker, signer, kind, &claim);
    let intact = claim.body == genuine.body
        && claim.signature == genuine.signature
        && claim.scheme == genuine.scheme
        && kind == ClaimKind::Alive
        && signer == "target";
    if !intact {
        assert!(result.is_err(), "an altered claim passed: {claim:?}");
    } else if claim.certificates == genuine.certificates {
        result.expect("a genuine claim passes");
    }
    // Once the genuine claim has been seen, the same claim without its certificate passes, and
    // altered ones still fail.
    claims::verify(&mut checker, "target", ClaimKind::Alive, &genuine).expect("genuine");
    let mut stripped = genuine.clone();
    stripped.certificates.clear();
    claims::verify(&mut checker, "target", ClaimKind::Alive, &stripped).expect("known signer");
    if !intact {
        let mut altered = claim;
        altered.certificates.clear();
        assert!(claims::verify(&mut checker, signer, kind, &altered).is_err());
    }
}

/// `claim` signed by `peer`, whoever it is about: what a hostile member can send.
fn signed_by(peer: &mut Node, kind: ClaimKind, claim: &impl Message) -> wire::Signed {
    peer.sign_claim(kind, claim).expect("the peer's key signs")
}

/// A membership packet from `peer` with one broadcast chosen by `kind`, signed by `peer`.
fn crafted_packet(
    peer: &mut Node,
    about: &str,
    addr: SocketAddr,
    kind: u8,
    incarnation: u64,
    version: u64,
    endpoint: &str,
) -> Bytes {
    use wire::broadcast::Kind;
    let node = about.to_owned();
    let kind = match kind % 5 {
        0 => Kind::Alive(signed_by(
            peer,
            ClaimKind::Alive,
            &wire::Alive {
                node,
                incarnation,
                addr: Some(wire::SocketAddress {
                    ip: match addr.ip() {
                        std::net::IpAddr::V4(ip) => ip.octets().to_vec().into(),
                        std::net::IpAddr::V6(ip) => ip.octets().to_vec().into(),
                    },
                    port: u32::from(addr.port()),
                }),
                meta: Vec::new().into(),
            },
        )),
        1 => Kind::Suspect(signed_by(
            peer,
            ClaimKind::Suspect,
            &wire::Suspect {
                node,
                incarnation,
                from: peer.name().to_owned(),
            },
        )),
        2 => Kind::Dead(signed_by(
            peer,
            ClaimKind::Dead,
            &wire::Dead {
                node,
                incarnation,
                from: peer.name().to_owned(),
            },
        )),
        3 => Kind::Dead(signed_by(
            peer,
            ClaimKind::Dead,
            &wire::Dead {
                node: node.clone(),
                incarnation,
                from: node,
            },
        )),
        _ => {
            let record = Record {
                name: endpoint.to_owned(),
                owner: node,
                owner_incarnation: incarnation,
                version,
                claimed: true,
                kind: EndpointKind::Exclusive,
                value: bytes::Bytes::new(),
                durable: false,
            };
            let delta = wire::RegistryDelta {
                records: peer
                    .sign_claim(ClaimKind::Record, &record.to_wire())
                    .into_iter()
                    .collect(),
            };
            Kind::App(wire::AppBroadcast {
                key: record.gossip_key().into(),
                payload: delta.encode_to_vec().into(),
            })
        }
    };
    wire::Packet {
        sender: peer.name().to_owned(),
        message: None,
        broadcasts: vec![wire::Broadcast { kind: Some(kind) }],
    }
    .encode_to_vec()
    .into()
}

/// A node fed an arbitrary sequence of datagrams (garbage, or real traffic from a real peer,
/// possibly mangled), time advances and API commands. Nothing panics; the node never lists itself;
/// its tables stay within their limits.
pub fn node(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(ops) = Vec::<Op>::arbitrary(&mut u) else {
        return;
    };
    let (target_tls, peer_tls) = certificates();
    let t0 = Instant::now();
    let mut now = t0;
    let mut target = fuzz_node("target", 7001, target_tls, now);
    let mut peer = fuzz_node("peer", 7002, peer_tls, now);
    let mut flows: [Vec<FlowId>; 2] = [Vec::new(), Vec::new()];
    let name = |n: u8| format!("ep{}", n % 4);
    for op in ops.into_iter().take(256) {
        match op {
            Op::Garbage { from, bytes } => {
                let addr = SocketAddr::from(([127, 0, 0, from.max(1)], 9000));
                target.handle_datagram(now, addr, bytes::BytesMut::from(&bytes[..]));
            }
            Op::Exchange { flip, truncate } => {
                let mut mangle = (flip, truncate);
                for _ in 0..64 {
                    let mut moved = false;
                    while let Some(t) = target.poll_transmit(now) {
                        moved = true;
                        if t.destination == peer.local_addr() {
                            peer.handle_datagram(
                                now,
                                target.local_addr(),
                                bytes::BytesMut::from(&t.contents[..]),
                            );
                        }
                    }
                    while let Some(t) = peer.poll_transmit(now) {
                        moved = true;
                        let mut bytes = t.contents;
                        if let Some((pos, xor)) = mangle.0.take() {
                            if !bytes.is_empty() {
                                let i = usize::from(pos) % bytes.len();
                                bytes[i] ^= xor;
                            }
                        }
                        if let Some(len) = mangle.1.take() {
                            bytes.truncate(usize::from(len));
                        }
                        target.handle_datagram(
                            now,
                            peer.local_addr(),
                            bytes::BytesMut::from(&bytes[..]),
                        );
                    }
                    if !moved {
                        break;
                    }
                }
            }
            Op::Advance { millis } => {
                let until = now + Duration::from_millis(u64::from(millis));
                while let Some(t) = [target.poll_timeout(), peer.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min()
                    .filter(|t| *t <= until)
                {
                    now = now.max(t);
                    target.handle_timeout(now);
                    peer.handle_timeout(now);
                    while target.poll_transmit(now).is_some() {}
                    while peer.poll_transmit(now).is_some() {}
                }
                now = until;
            }
            Op::Register {
                on_peer,
                name: n,
                group,
            } => {
                let kind = if group {
                    EndpointKind::Group
                } else {
                    EndpointKind::Exclusive
                };
                let node = if on_peer { &mut peer } else { &mut target };
                let _ = node.register_endpoint(now, &name(n), kind);
            }
            Op::Unregister { on_peer, name: n } => {
                let node = if on_peer { &mut peer } else { &mut target };
                let _ = node.unregister_endpoint(now, &name(n));
            }
            Op::Join { from_peer } => {
                if from_peer {
                    let addr = target.local_addr();
                    peer.join(now, &[addr]);
                } else {
                    let addr = peer.local_addr();
                    target.join(now, &[addr]);
                }
            }
            Op::Dial { from_peer, name: n } => {
                let (node, list) = if from_peer {
                    (&mut peer, &mut flows[1])
                } else {
                    (&mut target, &mut flows[0])
                };
                if let Ok(f) = node.dial(now, &name(n)) {
                    list.push(f);
                }
            }
            Op::Accept { on_peer, name: n } => {
                let (node, list) = if on_peer {
                    (&mut peer, &mut flows[1])
                } else {
                    (&mut target, &mut flows[0])
                };
                if let Some(f) = node.accept(now, &name(n)) {
                    list.push(f);
                }
            }
            Op::Send {
                from_peer,
                flow,
                len,
            } => {
                let i = usize::from(from_peer);
                if let Some(&f) = pick(&flows[i], flow) {
                    let node = if from_peer { &mut peer } else { &mut target };
                    let _ = node.send(f, Bytes::from(vec![7u8; usize::from(len)]));
                }
            }
            Op::Recv { from_peer, flow } => {
                let i = usize::from(from_peer);
                if let Some(&f) = pick(&flows[i], flow) {
                    let node = if from_peer { &mut peer } else { &mut target };
                    let _ = node.recv(now, f);
                }
            }
            Op::Finish { from_peer, flow } => {
                let i = usize::from(from_peer);
                if let Some(&f) = pick(&flows[i], flow) {
                    let node = if from_peer { &mut peer } else { &mut target };
                    let _ = node.finish(f);
                }
            }
            Op::Reset {
                from_peer,
                flow,
                code,
            } => {
                let i = usize::from(from_peer);
                if let Some(&f) = pick(&flows[i], flow) {
                    let node = if from_peer { &mut peer } else { &mut target };
                    let _ = node.reset(f, u32::from(code));
                }
            }
            Op::Leave { peer: on_peer } => {
                if on_peer {
                    peer.leave(now);
                } else {
                    target.leave(now);
                }
            }
            Op::Inject {
                about_target,
                kind,
                incarnation,
                version,
                name: n,
            } => {
                let (about, addr) = if about_target {
                    (target.name().to_owned(), target.local_addr())
                } else {
                    (peer.name().to_owned(), peer.local_addr())
                };
                let packet = crafted_packet(
                    &mut peer,
                    &about,
                    addr,
                    kind,
                    incarnation.get(),
                    version.get(),
                    &name(n),
                );
                let to = target.local_addr();
                peer.send_raw_membership_datagram(now, "target", to, packet);
            }
        }
        while let Some(e) = target.poll_event() {
            if let Event::Flow(grinta_proto::flow::FlowEvent::Incoming { flow, .. }) = e {
                flows[0].push(flow);
            }
        }
        while let Some(e) = peer.poll_event() {
            if let Event::Flow(grinta_proto::flow::FlowEvent::Incoming { flow, .. }) = e {
                flows[1].push(flow);
            }
        }
        for node in [&target, &peer] {
            assert!(
                node.membership().member(node.name()).is_none(),
                "a node lists itself"
            );
            assert!(
                node.membership().members().count() <= 1,
                "only one other node exists"
            );
            assert!(node.connection_count() <= 64, "connections stay bounded");
            assert!(
                node.membership().incarnation() <= grinta_proto::membership::MAX_INCARNATION,
                "a node's incarnation stays within the bound it can refute from"
            );
        }
    }
}

fn pick(list: &[FlowId], i: u8) -> Option<&FlowId> {
    if list.is_empty() {
        None
    } else {
        list.get(usize::from(i) % list.len())
    }
}

/// The body of one fuzz target.
pub type Target = fn(&[u8]);

/// Every fuzz target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("signed_claims", signed_claims),
    ("wire_messages", wire_messages),
    ("wire_framing", wire_framing),
    ("flow_stream", flow_stream),
    ("registry_merge", registry_merge),
    ("node", node),
    ("push_pull", push_pull),
];

/// Names a hostile push-pull may use: the target itself, the members it knows, strangers, a
/// name too long to keep inline, and an invalid (empty) name, so that inputs collide with the
/// target's own state.
const PUSH_PULL_NAMES: [&str; 8] = [
    "target",
    "m1",
    "m2",
    "m3",
    "stranger",
    "a-member-name-longer-than-fifteen-bytes",
    "",
    "m4",
];

fn push_pull_name(i: u8) -> &'static str {
    PUSH_PULL_NAMES[usize::from(i) % PUSH_PULL_NAMES.len()]
}

fn push_pull_addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 1, 10 + i % PUSH_PULL_NAMES.len() as u8], 7000))
}

/// A member as a hostile push-pull describes it: every number over its whole range.
#[derive(Arbitrary, Debug)]
struct FuzzMember {
    name: u8,
    incarnation: u64,
    state: i32,
    fingerprint: u32,
    /// 0: none, 1: IPv4, 2: IPv6, else a malformed address.
    addr_kind: u8,
    port: u32,
    meta: Vec<u8>,
    /// The incarnation the member's signed alive says, when it differs from the entry's.
    alive_incarnation: Option<u64>,
}

impl FuzzMember {
    fn addr(&self) -> Option<wire::SocketAddress> {
        let ip: &[u8] = match self.addr_kind % 4 {
            0 => return None,
            1 => &[127, 0, 1, 20],
            2 => &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            _ => &[1, 2, 3],
        };
        Some(wire::SocketAddress {
            ip: Bytes::copy_from_slice(ip),
            port: self.port,
        })
    }

    fn entry(&self) -> wire::MemberEntry {
        let node = push_pull_name(self.name).to_owned();
        let alive = wire::Alive {
            node: node.clone(),
            incarnation: self.alive_incarnation.unwrap_or(self.incarnation),
            addr: self.addr(),
            meta: Bytes::copy_from_slice(&self.meta),
        };
        wire::MemberEntry {
            node,
            addr: self.addr(),
            incarnation: self.incarnation,
            state: self.state,
            meta: Bytes::copy_from_slice(&self.meta),
            alive: Some(
                claims::sign(
                    &claims::TrustAll,
                    ClaimKind::Alive,
                    alive.encode_to_vec(),
                    false,
                )
                .expect("TrustAll signs"),
            ),
            ..Default::default()
        }
    }

    fn digest(&self) -> wire::MemberDigest {
        wire::MemberDigest {
            node: push_pull_name(self.name).to_owned(),
            incarnation: self.incarnation,
            state: self.state,
            fingerprint: self.fingerprint,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum PushPullOp {
    /// A push-pull from the address of name `from`, built field by field.
    Receive {
        from: u8,
        sender: u8,
        wrong_version: bool,
        join: bool,
        reply: bool,
        push: bool,
        members: Vec<FuzzMember>,
        digest: Vec<FuzzMember>,
        want: Vec<u8>,
        want_app_state: bool,
        app_state: Vec<u8>,
        app_state_digest: u64,
        members_sum: u64,
    },
    /// Bytes as they come, from the address of name `from`.
    Raw { from: u8, bytes: Vec<u8> },
    /// Time passes: periodic exchanges and probes go out (and the next receives may answer them).
    Wait { ms: u16 },
}

/// Drains what the target sends and checks it: stream messages decode and stay within the
/// push-pull size limit, an answer is marked as one, datagrams decode and stay within the packet
/// size. Returns how many answers it sent.
fn drain_push_pull_target(
    target: &mut grinta_proto::membership::Membership,
    config: &grinta_proto::membership::Config,
) -> usize {
    use grinta_proto::membership::Channel;
    let mut answers = 0;
    while let Some(out) = target.poll_outgoing() {
        match out.channel {
            Channel::Datagram => {
                let packet = wire::Packet::decode(&out.payload[..]).expect("a sent packet decodes");
                let header = wire::Packet {
                    broadcasts: Vec::new(),
                    ..packet
                };
                assert!(
                    out.payload.len() <= config.max_packet_size.max(header.encoded_len()),
                    "a packet of {} bytes",
                    out.payload.len()
                );
            }
            Channel::Stream | Channel::StreamReply => {
                assert!(
                    out.payload.len() <= config.max_push_pull_size,
                    "push-pull of {} bytes over the {}-byte limit",
                    out.payload.len(),
                    config.max_push_pull_size
                );
                let pp =
                    wire::PushPull::decode(&out.payload[..]).expect("a sent push-pull decodes");
                assert_eq!(pp.reply, out.channel == Channel::StreamReply, "{pp:?}");
                assert_eq!(pp.sender, "target");
                answers += usize::from(pp.reply);
            }
        }
    }
    while target.poll_event().is_some() {}
    answers
}

/// Push-pull messages as a hostile peer might send them, fed to `Membership::handle_stream` (what
/// a node calls with every push-pull stream it receives) of a node that knows three members:
/// members in full and digests with any incarnation, state value, fingerprint and address, want
/// lists, sums, application states and flags in any combination, interleaved with the passing of
/// time so that the node's own exchanges go out and hostile answers meet them. The node must never
/// panic, never send a push-pull over its size limit, never hold more members than its limit,
/// never let its own incarnation go back, never take a peer's word for an entry of its own, and
/// still answer an honest joiner at the end.
pub fn push_pull(data: &[u8]) {
    use grinta_proto::membership::{Config, Membership};
    let mut u = Unstructured::new(data);
    let Ok(ops) = Vec::<PushPullOp>::arbitrary(&mut u) else {
        return;
    };
    let config = Config {
        max_members: 6,
        max_push_pull_size: 16 << 10,
        ..Config::lan()
    };
    let t0 = Instant::now();
    let mut now = t0;
    let new_node = |name: u8, now: Instant| {
        Membership::new(
            config.clone(),
            push_pull_name(name),
            push_pull_addr(name),
            u64::from(name),
            now,
            Box::new(claims::TrustAll),
        )
        .expect("valid node")
    };
    let mut target = new_node(0, now);
    // The target learns m1, m2 and m3 as they join it.
    let join = |target: &mut Membership, joiner: &mut Membership, now: Instant| {
        joiner.join(now, &[target.local_addr()]);
        while let Some(out) = joiner.poll_outgoing() {
            target.handle_stream(now, joiner.local_addr(), &out.payload);
            while let Some(reply) = target.poll_outgoing() {
                joiner.handle_stream(now, target.local_addr(), &reply.payload);
            }
        }
    };
    for name in 1..=3 {
        let mut member = new_node(name, now);
        join(&mut target, &mut member, now);
    }
    drain_push_pull_target(&mut target, &config);
    let mut incarnation = target.incarnation();
    // Whether the last input was a request the target must answer, once.
    let mut must_answer;
    for op in ops.into_iter().take(64) {
        match op {
            PushPullOp::Receive {
                from,
                sender,
                wrong_version,
                join,
                reply,
                push,
                members,
                digest,
                want,
                want_app_state,
                app_state,
                app_state_digest,
                members_sum,
            } => {
                let sender_name = push_pull_name(sender);
                must_answer = !wrong_version && !reply && !sender_name.is_empty();
                let pp = wire::PushPull {
                    protocol_version: if wrong_version {
                        wire::PROTOCOL_VERSION + 1
                    } else {
                        wire::PROTOCOL_VERSION
                    },
                    sender: sender_name.to_owned(),
                    join,
                    reply,
                    members: members.iter().take(64).map(FuzzMember::entry).collect(),
                    app_state: app_state.into(),
                    digest: digest.iter().take(64).map(FuzzMember::digest).collect(),
                    want: want
                        .iter()
                        .take(64)
                        .map(|&n| push_pull_name(n).to_owned())
                        .collect(),
                    want_app_state,
                    app_state_digest,
                    push,
                    members_sum,
                };
                target.handle_stream(now, push_pull_addr(from), &pp.encode_to_vec());
            }
            PushPullOp::Raw { from, bytes } => {
                must_answer = false;
                target.handle_stream(now, push_pull_addr(from), &bytes);
            }
            PushPullOp::Wait { ms } => {
                must_answer = false;
                now += Duration::from_millis(u64::from(ms) * 4);
                target.handle_timeout(now);
            }
        }
        let answers = drain_push_pull_target(&mut target, &config);
        assert!(answers <= 1, "one answer per request at most");
        if must_answer {
            assert_eq!(answers, 1, "a well-formed request is answered");
        }
        for m in target.members() {
            assert!(!m.name.is_empty());
            assert_eq!(target.member_addr(&m.name), Some(m.addr), "{m:?}");
            assert!(!m.addr.ip().is_unspecified(), "{m:?}");
        }
        assert!(
            target.members().count() <= config.max_members,
            "the member limit holds"
        );
        assert!(
            target.incarnation() >= incarnation,
            "own incarnation never goes back"
        );
        incarnation = target.incarnation();
        assert!(
            target.member_states().all(|(name, _)| name != "target"),
            "no peer's word puts the node in its own table"
        );
        assert_eq!(target.member_state("target"), None);
    }
    // An honest node still joins through the target and learns it.
    let mut joiner = new_node(7, now);
    join(&mut target, &mut joiner, now);
    assert!(
        joiner.members().any(|m| m.name == "target"),
        "an honest joiner learns the target"
    );
}
