//! Property tests of the wire framing: arbitrary messages round-trip, arbitrary splits of a stream decode
//! identically, and arbitrary bytes never panic the decoder.

use grinta_proto::claims::ClaimKind;
use grinta_proto::wire::{self, framing};
use proptest::prelude::*;
use prost::Message;

fn addr() -> impl Strategy<Value = Option<wire::SocketAddress>> {
    proptest::option::of(
        (
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 4),
                proptest::collection::vec(any::<u8>(), 16)
            ],
            any::<u16>(),
        )
            .prop_map(|(ip, port)| wire::SocketAddress {
                ip: ip.into(),
                port: port.into(),
            }),
    )
}

/// A claim in its envelope; the signature's bytes do not matter to framing.
fn envelope(_kind: ClaimKind, claim: &impl Message) -> wire::Signed {
    wire::Signed {
        body: claim.encode_to_vec().into(),
        scheme: 0x0807,
        signature: vec![7; 64].into(),
        certificates: vec![vec![3; 40].into()],
    }
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{0,24}"
}

fn broadcast() -> impl Strategy<Value = wire::Broadcast> {
    use wire::broadcast::Kind;
    let kind = prop_oneof![
        (
            name(),
            any::<u64>(),
            addr(),
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(node, incarnation, addr, meta)| Kind::Alive(envelope(
                ClaimKind::Alive,
                &wire::Alive {
                    node,
                    incarnation,
                    addr,
                    meta: meta.into(),
                }
            ))),
        (name(), any::<u64>(), name()).prop_map(|(node, incarnation, from)| Kind::Suspect(
            envelope(
                ClaimKind::Suspect,
                &wire::Suspect {
                    node,
                    incarnation,
                    from
                }
            )
        )),
        (name(), any::<u64>(), name()).prop_map(|(node, incarnation, from)| Kind::Dead(envelope(
            ClaimKind::Dead,
            &wire::Dead {
                node,
                incarnation,
                from
            }
        ))),
        (
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(key, payload)| Kind::App(wire::AppBroadcast {
                key: key.into(),
                payload: payload.into(),
            })),
    ];
    proptest::option::of(kind).prop_map(|kind| wire::Broadcast { kind })
}

fn packet() -> impl Strategy<Value = wire::Packet> {
    use wire::packet::Message as M;
    let message = proptest::option::of(prop_oneof![
        (any::<u32>(), name(), addr()).prop_map(|(seq_no, target, source_addr)| M::Ping(
            wire::Ping {
                seq_no,
                target,
                source_addr,
            }
        )),
        (
            any::<u32>(),
            name(),
            addr(),
            any::<u64>(),
            any::<bool>(),
            addr()
        )
            .prop_map(
                |(seq_no, target, target_addr, budget_micros, want_nack, source_addr)| {
                    M::IndirectPing(wire::IndirectPing {
                        seq_no,
                        target,
                        target_addr,
                        budget_micros,
                        want_nack,
                        source_addr,
                    })
                }
            ),
        any::<u32>().prop_map(|seq_no| M::Ack(wire::Ack { seq_no })),
        any::<u32>().prop_map(|seq_no| M::Nack(wire::Nack { seq_no })),
    ]);
    (
        name(),
        message,
        proptest::collection::vec(broadcast(), 0..8),
    )
        .prop_map(|(sender, message, broadcasts)| wire::Packet {
            sender,
            message,
            broadcasts,
        })
}

fn push_pull() -> impl Strategy<Value = wire::PushPull> {
    let entry = (
        name(),
        addr(),
        any::<u64>(),
        0i32..6,
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(node, addr, incarnation, state, meta)| wire::MemberEntry {
            node,
            addr,
            incarnation,
            state,
            meta: meta.into(),
            alive: Some(envelope(
                ClaimKind::Alive,
                &wire::Alive {
                    node: "n".into(),
                    incarnation,
                    addr: None,
                    meta: Default::default(),
                },
            )),
            leave: None,
        });
    let digest = (name(), any::<u64>(), 0i32..6, any::<u32>()).prop_map(
        |(node, incarnation, state, fingerprint)| wire::MemberDigest {
            node,
            incarnation,
            state,
            fingerprint,
        },
    );
    let exchange = (
        proptest::collection::vec(digest, 0..12),
        proptest::collection::vec(name(), 0..6),
        any::<bool>(),
        any::<u64>(),
        any::<bool>(),
        any::<u64>(),
    );
    (
        any::<u32>(),
        name(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(entry, 0..12),
        proptest::collection::vec(any::<u8>(), 0..64),
        exchange,
    )
        .prop_map(
            |(
                protocol_version,
                sender,
                join,
                reply,
                members,
                app_state,
                (digest, want, want_app_state, app_state_digest, push, members_sum),
            )| wire::PushPull {
                protocol_version,
                sender,
                join,
                reply,
                members,
                app_state: app_state.into(),
                digest,
                want,
                want_app_state,
                app_state_digest,
                push,
                members_sum,
            },
        )
}

fn registry_state() -> impl Strategy<Value = wire::RegistryState> {
    let record = (
        name(),
        name(),
        any::<u64>(),
        any::<u64>(),
        0i32..3,
        0i32..4,
        proptest::collection::vec(any::<u8>(), 0..600),
        any::<bool>(),
    )
        .prop_map(
            |(name, owner, owner_incarnation, version, state, kind, value, durable)| {
                wire::EndpointRecord {
                    name,
                    owner,
                    owner_incarnation,
                    version,
                    state,
                    kind,
                    value: value.into(),
                    durable,
                }
            },
        );
    proptest::collection::vec(record, 0..12).prop_map(|records| wire::RegistryState {
        records: records
            .iter()
            .map(|r| envelope(ClaimKind::Record, r))
            .collect(),
    })
}

fn flow_messages() -> impl Strategy<Value = (wire::FlowOpen, wire::FlowResponse)> {
    use wire::flow_response::Result as R;
    let open = (any::<u32>(), name(), name(), any::<u64>()).prop_map(
        |(protocol_version, endpoint, source_node, max_message_size)| wire::FlowOpen {
            protocol_version,
            endpoint,
            source_node,
            max_message_size,
        },
    );
    let response = proptest::option::of(prop_oneof![
        any::<u64>().prop_map(|max_message_size| R::Accept(wire::FlowAccept { max_message_size })),
        (0i32..8, ".{0,32}")
            .prop_map(|(reason, detail)| R::Reject(wire::FlowReject { reason, detail })),
    ])
    .prop_map(|result| wire::FlowResponse { result });
    (open, response)
}

/// Splits `bytes` at the given cut points (taken modulo the length) and feeds the pieces to a decoder,
/// collecting every frame.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize], max: usize) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    let mut decoder = framing::FrameDecoder::new(max);
    let mut frames = Vec::new();
    for window in points.windows(2) {
        decoder.extend(&bytes[window[0]..window[1]]);
        while let Some(frame) = decoder.next_frame().expect("valid stream") {
            frames.push(frame.to_vec());
        }
    }
    assert_eq!(decoder.buffered(), 0, "all bytes consumed");
    frames
}

proptest! {
    #[test]
    fn packets_round_trip(packets in proptest::collection::vec(packet(), 1..6)) {
        let mut stream = Vec::new();
        for p in &packets {
            framing::encode_message(p, &mut stream);
        }
        let mut decoder = framing::FrameDecoder::new(1 << 20);
        decoder.extend(&stream);
        for p in &packets {
            let got: wire::Packet = decoder.next_message().unwrap().unwrap();
            prop_assert_eq!(&got, p);
        }
        prop_assert_eq!(decoder.next_frame().unwrap(), None);
    }

    #[test]
    fn state_and_flow_messages_round_trip(
        pp in push_pull(),
        registry in registry_state(),
        (open, response) in flow_messages(),
    ) {
        let mut stream = Vec::new();
        framing::encode_message(&pp, &mut stream);
        framing::encode_message(&registry, &mut stream);
        framing::encode_message(&open, &mut stream);
        framing::encode_message(&response, &mut stream);
        let mut decoder = framing::FrameDecoder::new(1 << 20);
        decoder.extend(&stream);
        prop_assert_eq!(decoder.next_message::<wire::PushPull>().unwrap().unwrap(), pp);
        prop_assert_eq!(decoder.next_message::<wire::RegistryState>().unwrap().unwrap(), registry);
        prop_assert_eq!(decoder.next_message::<wire::FlowOpen>().unwrap().unwrap(), open);
        prop_assert_eq!(decoder.next_message::<wire::FlowResponse>().unwrap().unwrap(), response);
    }

    #[test]
    fn arbitrary_splits_decode_identically(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..10),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut stream = Vec::new();
        for p in &payloads {
            framing::encode_frame(p, &mut stream);
        }
        let whole = decode_in_pieces(&stream, &[], 300);
        let pieces = decode_in_pieces(&stream, &cuts, 300);
        prop_assert_eq!(&whole, &payloads);
        prop_assert_eq!(&pieces, &payloads);
    }

    #[test]
    fn one_byte_at_a_time_decodes_identically(packets in proptest::collection::vec(packet(), 1..4)) {
        let mut stream = Vec::new();
        for p in &packets {
            framing::encode_message(p, &mut stream);
        }
        let mut decoder = framing::FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        for byte in &stream {
            decoder.extend(std::slice::from_ref(byte));
            while let Some(frame) = decoder.next_frame().unwrap() {
                got.push(wire::Packet::decode(frame).unwrap());
            }
        }
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 0usize..1024) {
        let mut decoder = framing::FrameDecoder::new(max);
        decoder.extend(&bytes);
        // Drain until need-more or an error; each frame must respect the limit.
        for _ in 0..=bytes.len() {
            match decoder.next_message::<wire::Packet>() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(framing::FrameError::InvalidMessage { .. }) => {}
                Err(framing::FrameError::TooLarge { size, limit }) => {
                    prop_assert!(size > limit as u64);
                    break;
                }
                Err(framing::FrameError::MalformedLength) => break,
                Err(e) => prop_assert!(false, "unexpected framing error {e}"),
            }
        }
        // Every message type's decoder must also survive raw garbage.
        let _ = wire::Packet::decode(bytes.as_slice());
        let _ = wire::PushPull::decode(bytes.as_slice());
        let _ = wire::RegistryState::decode(bytes.as_slice());
        let _ = wire::FlowOpen::decode(bytes.as_slice());
        let _ = wire::FlowResponse::decode(bytes.as_slice());
    }
}
