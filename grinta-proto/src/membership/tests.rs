//! Unit tests on exact messages and timers.

use super::*;
use crate::claims::TrustAll;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn node(name: &str, port: u16, t0: Instant) -> Membership {
    Membership::new(
        Config::lan(),
        name,
        addr(port),
        u64::from(port),
        t0,
        Box::new(TrustAll),
    )
    .expect("valid config")
}

/// A claim "signed" for [`TrustAll`]: these tests are about the protocol, not signatures.
fn unsigned(kind: ClaimKind, claim: &impl Message) -> wire::Signed {
    claims::sign(&TrustAll, kind, claim.encode_to_vec(), false).unwrap()
}

fn drain(m: &mut Membership) -> Vec<Outgoing> {
    std::iter::from_fn(|| m.poll_outgoing()).collect()
}

fn events(m: &mut Membership) -> Vec<Event> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

fn decode_packet(t: &Outgoing) -> wire::Packet {
    assert_eq!(t.channel, Channel::Datagram);
    wire::Packet::decode(&t.payload[..]).expect("valid packet")
}

/// Joins `b` to `a` by delivering the push-pull exchange by hand.
fn join_pair(a: &mut Membership, b: &mut Membership, now: Instant) {
    b.join(now, &[a.local_addr()]);
    let req = drain(b);
    assert_eq!(req.len(), 1);
    a.handle_stream(now, b.local_addr(), &req[0].payload);
    let reply = drain(a);
    assert_eq!(reply.len(), 1);
    b.handle_stream(now, a.local_addr(), &reply[0].payload);
}

/// An alive of "a" at `incarnation`, relayed by "b".
fn alive_of_a_from_b(incarnation: u64) -> wire::Packet {
    wire::Packet {
        sender: "b".into(),
        message: None,
        broadcasts: vec![wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Alive(unsigned(
                ClaimKind::Alive,
                &wire::Alive {
                    node: "a".into(),
                    incarnation,
                    addr: Some(encode_addr(addr(1))),
                    meta: Bytes::new(),
                },
            ))),
        }],
    }
}

fn suspect_broadcast(node: &str, incarnation: u64, from: &str) -> Vec<u8> {
    let suspect = wire::Suspect {
        node: node.into(),
        incarnation,
        from: from.into(),
    };
    packet_with(
        from,
        wire::broadcast::Kind::Suspect(unsigned(ClaimKind::Suspect, &suspect)),
    )
}

/// A packet from `sender` carrying `kind` as its one broadcast.
fn packet_with(sender: &str, kind: wire::broadcast::Kind) -> Vec<u8> {
    wire::Packet {
        sender: sender.into(),
        message: None,
        broadcasts: vec![wire::Broadcast { kind: Some(kind) }],
    }
    .encode_to_vec()
}

/// `from`'s claim that `node` is dead at `incarnation` (a leave when `from == node`).
fn dead_claim(node: &str, incarnation: u64, from: &str) -> wire::broadcast::Kind {
    let dead = wire::Dead {
        node: node.into(),
        incarnation,
        from: from.into(),
    };
    wire::broadcast::Kind::Dead(unsigned(ClaimKind::Dead, &dead))
}

#[test]
fn join_exchanges_full_state_both_ways() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    assert_eq!(a.member("b").map(|m| m.state), Some(MemberState::Alive));
    assert_eq!(b.member("a").map(|m| m.state), Some(MemberState::Alive));
    assert!(b.is_joined());
    assert!(events(&mut b).contains(&Event::Joined));
    assert!(a.member("a").is_none(), "a node never lists itself");
}

#[test]
fn join_retries_with_backoff_until_a_seed_answers() {
    let t0 = Instant::now();
    let mut b = node("b", 2, t0);
    b.join(t0, &[addr(1)]);
    assert_eq!(drain(&mut b).len(), 1);
    let mut attempts = vec![];
    let mut now;
    loop {
        now = b.poll_timeout().expect("a deadline");
        if now >= t0 + Duration::from_secs(10) {
            break;
        }
        b.handle_timeout(now);
        for t in drain(&mut b) {
            if t.channel == Channel::Stream && t.dst == addr(1) {
                attempts.push(now - t0);
            }
        }
    }
    // 0.5 s, then 1 s, 2 s, 4 s between attempts (the reconnect timer may add seed attempts too).
    for expected in [500u64, 1500, 3500, 7500] {
        assert!(
            attempts.contains(&Duration::from_millis(expected)),
            "attempt at {expected} ms missing from {attempts:?}"
        );
    }
}

#[test]
fn probe_ping_ack_keeps_health_at_zero() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    let mut pings = 0;
    for _ in 0..200 {
        let now = a.poll_timeout().unwrap().min(b.poll_timeout().unwrap());
        a.handle_timeout(now);
        b.handle_timeout(now);
        // Deliver everything instantly, both ways, until quiet.
        loop {
            let ta = drain(&mut a);
            let tb = drain(&mut b);
            if ta.is_empty() && tb.is_empty() {
                break;
            }
            for t in ta {
                if t.channel == Channel::Datagram {
                    if matches!(
                        decode_packet(&t).message,
                        Some(wire::packet::Message::Ping(_))
                    ) {
                        pings += 1;
                    }
                    b.handle_datagram(now, a.local_addr(), &t.payload);
                } else {
                    b.handle_stream(now, a.local_addr(), &t.payload);
                }
            }
            for t in tb {
                if t.channel == Channel::Datagram {
                    a.handle_datagram(now, b.local_addr(), &t.payload);
                } else {
                    a.handle_stream(now, b.local_addr(), &t.payload);
                }
            }
        }
    }
    assert!(pings > 5, "a probed b {pings} times");
    assert_eq!(a.local_health(), 0);
    assert_eq!(a.stats().probes_failed, 0);
    assert_eq!(a.member("b").unwrap().state, MemberState::Alive);
}

#[test]
fn suspicion_of_self_is_refuted_with_a_higher_incarnation() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    drain(&mut a);
    events(&mut a);
    // Above its own incarnation, an accusation is a forgery: nobody knows a newer life of a
    // node than itself.
    a.handle_datagram(t0, addr(2), &suspect_broadcast("a", 5, "b"));
    assert_eq!(a.incarnation(), 1);
    a.handle_datagram(t0, addr(2), &suspect_broadcast("a", 1, "b"));
    assert_eq!(a.incarnation(), 2, "own + 1");
    assert_eq!(events(&mut a), vec![Event::Refuted { incarnation: 2 }]);
    assert_eq!(a.local_health(), 1, "a refutation costs one health point");
    // The refutation rides on the next packet.
    a.handle_timeout(a.next_gossip);
    let packets = drain(&mut a);
    let alive = packets
        .iter()
        .flat_map(|t| decode_packet(t).broadcasts)
        .find_map(|b| match b.kind {
            Some(wire::broadcast::Kind::Alive(claim)) => wire::Alive::decode(&claim.body[..])
                .ok()
                .filter(|a| a.node == "a")
                .map(|a| a.incarnation),
            _ => None,
        });
    assert_eq!(alive, Some(2));
}

#[test]
fn stale_suspicion_is_ignored_and_equal_incarnation_overrides_alive() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    let mut c = node("c", 3, t0);
    join_pair(&mut a, &mut b, t0);
    join_pair(&mut a, &mut c, t0);
    events(&mut a);
    // c is known at incarnation 1; a suspicion at 0 is ignored.
    a.handle_datagram(t0, addr(2), &suspect_broadcast("c", 0, "b"));
    assert_eq!(a.member("c").unwrap().state, MemberState::Alive);
    a.handle_datagram(t0, addr(2), &suspect_broadcast("c", 1, "b"));
    assert_eq!(a.member("c").unwrap().state, MemberState::Suspect);
    assert_eq!(
        events(&mut a),
        vec![Event::MemberSuspect {
            name: "c".into(),
            incarnation: 1
        }]
    );
    // Unknown members are ignored.
    a.handle_datagram(t0, addr(2), &suspect_broadcast("zed", 1, "b"));
    assert!(a.member("zed").is_none());
}

#[test]
fn suspicion_times_out_into_dead_at_the_formula_deadline() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    let mut c = node("c", 3, t0);
    join_pair(&mut a, &mut b, t0);
    join_pair(&mut a, &mut c, t0);
    events(&mut a);
    // An accusation from a node that is not a member counts for nothing.
    a.handle_datagram(t0, addr(3), &suspect_broadcast("b", 1, "x"));
    assert_eq!(a.member("b").unwrap().state, MemberState::Alive);
    // n = 3: min = 4 s, k = 0 (n - 2 < 2), so the timer is 4 s.
    a.handle_datagram(t0, addr(3), &suspect_broadcast("b", 1, "c"));
    let deadline = t0 + Duration::from_secs(4);
    a.handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(a.member("b").unwrap().state, MemberState::Suspect);
    a.handle_timeout(deadline);
    assert_eq!(a.member("b").unwrap().state, MemberState::Dead);
    assert!(events(&mut a).contains(&Event::MemberDead {
        name: "b".into(),
        incarnation: 1
    }));
}

#[test]
fn helper_nacks_at_eight_tenths_of_the_budget() {
    let t0 = Instant::now();
    let mut h = node("h", 1, t0);
    let req = wire::Packet {
        sender: "p".into(),
        message: Some(wire::packet::Message::IndirectPing(wire::IndirectPing {
            seq_no: 42,
            target: "t".into(),
            target_addr: Some(encode_addr(addr(9))),
            budget_micros: 500_000,
            want_nack: true,
            source_addr: Some(encode_addr(addr(2))),
        })),
        broadcasts: vec![],
    };
    h.handle_datagram(t0, addr(2), &req.encode_to_vec());
    let out = drain(&mut h);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst, addr(9));
    assert!(matches!(
        decode_packet(&out[0]).message,
        Some(wire::packet::Message::Ping(_))
    ));
    assert!(h.poll_timeout() <= Some(t0 + Duration::from_millis(400)));
    h.handle_timeout(t0 + Duration::from_millis(399));
    assert!(drain(&mut h).iter().all(|t| !matches!(
        decode_packet(t).message,
        Some(wire::packet::Message::Nack(_))
    )));
    h.handle_timeout(t0 + Duration::from_millis(400));
    let nack = drain(&mut h)
        .into_iter()
        .find_map(|t| match decode_packet(&t).message {
            Some(wire::packet::Message::Nack(n)) => Some((t.dst, n.seq_no)),
            _ => None,
        });
    assert_eq!(nack, Some((addr(2), 42)));
}

#[test]
fn helper_forwards_the_targets_ack_to_the_prober() {
    let t0 = Instant::now();
    let mut h = node("h", 1, t0);
    let mut t = node("t", 9, t0);
    let req = wire::Packet {
        sender: "p".into(),
        message: Some(wire::packet::Message::IndirectPing(wire::IndirectPing {
            seq_no: 7,
            target: "t".into(),
            target_addr: Some(encode_addr(addr(9))),
            budget_micros: 500_000,
            want_nack: true,
            source_addr: Some(encode_addr(addr(2))),
        })),
        broadcasts: vec![],
    };
    h.handle_datagram(t0, addr(2), &req.encode_to_vec());
    let ping = drain(&mut h).remove(0);
    t.handle_datagram(t0, addr(1), &ping.payload);
    let ack = drain(&mut t).remove(0);
    h.handle_datagram(t0, addr(9), &ack.payload);
    let fwd = drain(&mut h).remove(0);
    assert_eq!(fwd.dst, addr(2));
    assert_eq!(
        decode_packet(&fwd).message,
        Some(wire::packet::Message::Ack(wire::Ack { seq_no: 7 }))
    );
}

#[test]
fn graceful_leave_is_recorded_as_left() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    events(&mut a);
    b.leave(t0);
    for t in drain(&mut b) {
        a.handle_datagram(t0, addr(2), &t.payload);
    }
    assert_eq!(a.member("b").unwrap().state, MemberState::Left);
    assert!(events(&mut a).contains(&Event::MemberLeft {
        name: "b".into(),
        incarnation: 1
    }));
    // b finishes leaving once its announcement was sent enough times (or on timeout).
    let mut now = t0;
    while !b.has_left() {
        now = b.poll_timeout().unwrap();
        b.handle_timeout(now);
        drain(&mut b);
    }
    assert!(now <= t0 + b.config().leave_timeout);
    assert!(events(&mut b).contains(&Event::LeaveComplete));
}

#[test]
fn a_leave_goes_out_even_when_the_gossip_queue_is_full() {
    let t0 = Instant::now();
    let mut b = node("b", 2, t0);
    // 3,000 members, each with news larger than the leave: the queue (1,024 items) is full of
    // unsent items, and a leave not pinned would be the first dropped.
    for i in 0..3000u16 {
        learn(&mut b, &format!("member-{i}"), 10_000 + i, 1, t0);
    }
    drain(&mut b);
    b.leave(t0);
    let mut leaves_sent = 0;
    while !b.has_left() {
        for t in drain(&mut b) {
            if t.channel != Channel::Datagram {
                continue;
            }
            leaves_sent += decode_packet(&t)
                .broadcasts
                .iter()
                .filter(|x| {
                    matches!(&x.kind, Some(wire::broadcast::Kind::Dead(claim))
                        if wire::Dead::decode(&claim.body[..]).is_ok_and(|d| d.node == "b"))
                })
                .count();
        }
        let now = b.poll_timeout().unwrap();
        assert!(now <= t0 + b.config().leave_timeout);
        b.handle_timeout(now);
    }
    assert!(leaves_sent > 0, "the leave was sent before the node left");
    assert!(events(&mut b).contains(&Event::LeaveComplete));
}

#[test]
fn garbage_never_panics_nor_changes_state() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    events(&mut a);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for len in 0..2000usize {
        let bytes: Vec<u8> = (0..len % 300).map(|_| rng.random()).collect();
        a.handle_datagram(t0, addr(2), &bytes);
        a.handle_stream(t0, addr(2), &bytes);
    }
    assert!(a.stats().packets_invalid > 0);
    assert_eq!(a.members().count(), 1);
    assert_eq!(a.member("b").unwrap().state, MemberState::Alive);
    assert_eq!(a.incarnation(), 1);
}

#[test]
fn bad_addresses_and_names_are_dropped() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let alive = |node: &str, ip: Vec<u8>, port: u32| wire::Packet {
        sender: "x".into(),
        message: None,
        broadcasts: vec![wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Alive(unsigned(
                ClaimKind::Alive,
                &wire::Alive {
                    node: node.into(),
                    incarnation: 1,
                    addr: Some(wire::SocketAddress {
                        ip: ip.into(),
                        port,
                    }),
                    meta: Bytes::new(),
                },
            ))),
        }],
    };
    a.handle_datagram(
        t0,
        addr(2),
        &alive("ok", vec![127, 0, 0, 2], 70_000).encode_to_vec(),
    );
    a.handle_datagram(
        t0,
        addr(2),
        &alive("ok", vec![127, 0, 0], 7000).encode_to_vec(),
    );
    a.handle_datagram(
        t0,
        addr(2),
        &alive("bad name", vec![127, 0, 0, 2], 7000).encode_to_vec(),
    );
    assert_eq!(a.members().count(), 0);
    a.handle_datagram(t0, addr(2), &alive("v6", vec![0; 16], 7000).encode_to_vec());
    assert_eq!(
        a.member("v6").map(|m| m.addr),
        Some("[::]:7000".parse().unwrap())
    );
}

#[test]
fn member_table_is_bounded() {
    let t0 = Instant::now();
    let config = Config {
        max_members: 3,
        ..Config::lan()
    };
    let mut a = Membership::new(config, "a", addr(1), 1, t0, Box::new(TrustAll)).unwrap();
    for i in 0..10u16 {
        let p = wire::Packet {
            sender: "x".into(),
            message: None,
            broadcasts: vec![wire::Broadcast {
                kind: Some(wire::broadcast::Kind::Alive(unsigned(
                    ClaimKind::Alive,
                    &wire::Alive {
                        node: format!("n{i}"),
                        incarnation: 1,
                        addr: Some(encode_addr(addr(100 + i))),
                        meta: Bytes::new(),
                    },
                ))),
            }],
        };
        a.handle_datagram(t0, addr(2), &p.encode_to_vec());
    }
    assert_eq!(a.members().count(), 3);
    assert_eq!(a.stats().dropped_for_limits, 7);
}

#[test]
fn invalid_settings_are_refused_with_clear_errors() {
    let t0 = Instant::now();
    let bad = Config {
        probe_timeout: Duration::from_secs(2),
        ..Config::lan()
    };
    let err = Membership::new(bad, "a", addr(1), 1, t0, Box::new(TrustAll)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "probe_timeout (2s) must be shorter than probe_interval (1s)"
    );
    let bad = Config {
        max_packet_size: 100,
        ..Config::lan()
    };
    assert!(matches!(
        bad.validate(),
        Err(ConfigError::PacketTooSmall {
            max_packet_size: 100,
            ..
        })
    ));
    assert!(matches!(
        Membership::new(Config::lan(), "", addr(1), 1, t0, Box::new(TrustAll)),
        Err(InitError::Name(NameError::Length { len: 0 }))
    ));
    for profile in [Config::lan(), Config::wan(), Config::local()] {
        profile.validate().expect("profiles are valid");
    }
}

#[test]
fn app_broadcasts_get_their_share_of_a_full_packet() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    drain(&mut a);
    // Flood the member queue with news about many members.
    for i in 0..200u16 {
        let p = wire::Packet {
            sender: "b".into(),
            message: None,
            broadcasts: vec![wire::Broadcast {
                kind: Some(wire::broadcast::Kind::Alive(unsigned(
                    ClaimKind::Alive,
                    &wire::Alive {
                        node: format!("member-{i}"),
                        incarnation: 1,
                        addr: Some(encode_addr(addr(1000 + i))),
                        meta: Bytes::new(),
                    },
                ))),
            }],
        };
        a.handle_datagram(t0, addr(2), &p.encode_to_vec());
    }
    a.broadcast_app(
        Bytes::from_static(b"endpoint/x"),
        Bytes::from_static(b"record"),
    )
    .unwrap();
    a.handle_timeout(a.next_gossip);
    let packets = drain(&mut a);
    assert!(!packets.is_empty());
    for t in &packets {
        assert!(t.payload.len() <= a.config().max_packet_size);
        let p = decode_packet(t);
        assert!(
            p.broadcasts
                .iter()
                .any(|b| matches!(b.kind, Some(wire::broadcast::Kind::App(_)))),
            "every gossip packet carries the application item"
        );
    }
}

#[test]
fn incarnations_beyond_the_bound_are_refused_and_a_node_can_always_refute() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    let mut c = node("c", 3, t0);
    join_pair(&mut a, &mut b, t0);
    join_pair(&mut a, &mut c, t0);
    drain(&mut a);
    events(&mut a);
    // Accusations at or beyond the bound change nothing, about us or about others.
    for inc in [MAX_INCARNATION, MAX_INCARNATION + 1, u64::MAX] {
        a.handle_datagram(t0, addr(2), &suspect_broadcast("a", inc, "b"));
        a.handle_datagram(t0, addr(2), &suspect_broadcast("c", inc, "b"));
    }
    assert_eq!(a.incarnation(), 1);
    assert_eq!(a.member("c").unwrap().state, MemberState::Alive);
    assert!(events(&mut a).is_empty());
    // The highest alive of ours accepted (a previous life's, say) is still refuted.
    let previous_life = alive_of_a_from_b(MAX_INCARNATION - 1);
    a.handle_datagram(t0, addr(2), &previous_life.encode_to_vec());
    assert_eq!(a.incarnation(), MAX_INCARNATION);
    a.handle_timeout(a.next_gossip);
    for t in drain(&mut a) {
        if t.channel == Channel::Datagram {
            b.handle_datagram(t0, addr(1), &t.payload);
        }
    }
    // b refuses the leap: more than MAX_INCARNATION_STEP above what it knows, even signed by
    // a itself.
    let seen = b.member("a").unwrap();
    assert_eq!((seen.state, seen.incarnation), (MemberState::Alive, 1));
    assert!(b.stats().claims_refused >= 1);
    // An alive claim about us at the bound is refused like an accusation: we stay at the bound,
    // and changing metadata there is a clear error, never a wrap or an unrefutable incarnation.
    let forged_alive = alive_of_a_from_b(MAX_INCARNATION);
    a.handle_datagram(t0, addr(2), &forged_alive.encode_to_vec());
    assert_eq!(a.incarnation(), MAX_INCARNATION);
    assert!(matches!(
        a.update_meta(Bytes::from_static(b"m")),
        Err(Error::IncarnationExhausted)
    ));
    assert_eq!(a.incarnation(), MAX_INCARNATION);
}

#[test]
fn acks_and_nacks_count_only_from_the_node_probed_or_its_helpers() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    drain(&mut a);
    // Run a's timers until it pings b; b never answers, a third party answers instead.
    let mut now = t0;
    let mut forged = 0;
    for _ in 0..50 {
        now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
        for t in drain(&mut a) {
            if t.channel != Channel::Datagram {
                continue;
            }
            if let Some(wire::packet::Message::Ping(ping)) = decode_packet(&t).message {
                for message in [
                    wire::packet::Message::Ack(wire::Ack {
                        seq_no: ping.seq_no,
                    }),
                    wire::packet::Message::Nack(wire::Nack {
                        seq_no: ping.seq_no,
                    }),
                ] {
                    let packet = wire::Packet {
                        sender: "mallory".into(),
                        message: Some(message),
                        broadcasts: Vec::new(),
                    };
                    a.handle_datagram(now, addr(9), &packet.encode_to_vec());
                    forged += 1;
                }
            }
        }
        if a.member("b").unwrap().state != MemberState::Alive {
            break;
        }
    }
    assert!(forged > 0, "a probed b");
    assert!(a.stats().probes_failed > 0, "forged acks did not count");
    assert_eq!(a.member("b").unwrap().state, MemberState::Suspect);
    let _ = now;
}

#[test]
fn a_packet_from_a_sender_this_node_missed_asks_it_for_its_state_once() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    join_pair(&mut a, &mut b, t0);
    drain(&mut a);
    // "z" is not a member here (its alive never reached a): a asks it for its state.
    let ping = wire::Packet {
        sender: "z".into(),
        message: Some(wire::packet::Message::Ping(wire::Ping {
            seq_no: 1,
            target: "a".into(),
            source_addr: Some(encode_addr(addr(9))),
        })),
        broadcasts: Vec::new(),
    }
    .encode_to_vec();
    a.handle_datagram(t0, addr(9), &ping);
    let out = drain(&mut a);
    let asks: Vec<_> = out
        .iter()
        .filter(|t| t.channel == Channel::Stream)
        .collect();
    assert_eq!(asks.len(), 1);
    assert_eq!(asks[0].dst, addr(9));
    assert_eq!(asks[0].dst_name.as_deref(), Some("z"));
    // Once per push-pull interval, whatever it sends meanwhile.
    a.handle_datagram(t0 + Duration::from_secs(1), addr(9), &ping);
    assert!(drain(&mut a).iter().all(|t| t.channel != Channel::Stream));
    // A member at its known address is not asked.
    let from_b = wire::Packet {
        sender: "b".into(),
        message: None,
        broadcasts: Vec::new(),
    }
    .encode_to_vec();
    a.handle_datagram(t0, addr(2), &from_b);
    assert!(drain(&mut a).is_empty());
    // A member whose packets come from another address than it announces (behind a NAT) is
    // asked once for that address, never again.
    for k in 0..3u64 {
        a.handle_datagram(t0 + Duration::from_secs(100 * k), addr(77), &from_b);
        let asks = drain(&mut a)
            .into_iter()
            .filter(|t| t.channel == Channel::Stream)
            .count();
        assert_eq!(asks, usize::from(k == 0), "round {k}");
    }
}

/// Makes `m` learn member `name` at `port` and `incarnation` from its own alive.
fn learn(m: &mut Membership, name: &str, port: u16, incarnation: u64, now: Instant) {
    let alive = wire::Alive {
        node: name.into(),
        incarnation,
        addr: Some(encode_addr(addr(port))),
        meta: Bytes::new(),
    };
    m.handle_alive(now, unsigned(ClaimKind::Alive, &alive));
}

fn decode_push_pull(t: &Outgoing) -> wire::PushPull {
    wire::PushPull::decode(&t.payload[..]).expect("valid push-pull")
}

fn names(entries: &[wire::MemberEntry]) -> Vec<&str> {
    let mut names: Vec<&str> = entries.iter().map(|e| e.node.as_str()).collect();
    names.sort_unstable();
    names
}

/// The messages of one push-pull exchange that `x` starts with `y`.
struct Exchanged {
    request: wire::PushPull,
    reply: wire::PushPull,
    push: Option<wire::PushPull>,
}

/// Runs a digest exchange from `x` to `y` by hand, as a node's transport would.
fn digest_exchange(x: &mut Membership, y: &mut Membership, now: Instant) -> Exchanged {
    drain(x);
    drain(y);
    x.send_push_pull(
        now,
        y.local_addr(),
        Some(y.name.clone()),
        push_pull::Exchange::Digest,
    );
    let request = drain(x);
    assert_eq!(request.len(), 1);
    assert_eq!(request[0].channel, Channel::Stream);
    y.handle_stream(now, x.local_addr(), &request[0].payload);
    let reply: Vec<_> = drain(y)
        .into_iter()
        .filter(|t| t.channel == Channel::StreamReply)
        .collect();
    assert_eq!(reply.len(), 1, "one reply");
    x.handle_stream(now, y.local_addr(), &reply[0].payload);
    let push: Vec<_> = drain(x)
        .into_iter()
        .filter(|t| t.channel == Channel::Stream)
        .collect();
    assert!(push.len() <= 1);
    let push = push.first().map(|t| {
        y.handle_stream(now, x.local_addr(), &t.payload);
        let ack: Vec<_> = drain(y)
            .into_iter()
            .filter(|t| t.channel == Channel::StreamReply)
            .collect();
        assert_eq!(ack.len(), 1, "a push is acknowledged");
        let ack_message = decode_push_pull(&ack[0]);
        assert!(ack_message.members.is_empty() && ack_message.app_state.is_empty());
        x.handle_stream(now, y.local_addr(), &ack[0].payload);
        assert!(
            drain(x).iter().all(|t| t.channel != Channel::Stream),
            "an acknowledgement ends the exchange"
        );
        decode_push_pull(t)
    });
    Exchanged {
        request: decode_push_pull(&request[0]),
        reply: decode_push_pull(&reply[0]),
        push,
    }
}

#[test]
fn a_digest_exchange_between_nodes_that_agree_moves_no_member_in_full() {
    let t0 = Instant::now();
    let mut a = node("a", 1, t0);
    let mut b = node("b", 2, t0);
    let mut c = node("c", 3, t0);
    join_pair(&mut a, &mut b, t0);
    join_pair(&mut a, &mut c, t0);
    learn(&mut b, "c", 3, c.incarnation(), t0);
    let x = digest_exchange(&mut b, &mut c, t0);
    assert!(x.request.members.is_empty());
    assert_eq!(x.request.digest.len(), 3, "b, a and c");
    assert!(x.reply.members.is_empty(), "{:?}", names(&x.reply.members));
    assert!(x.reply.want.is_empty());
    assert!(x.reply.app_state.is_empty() && !x.reply.want_app_state);
    assert!(x.push.is_none());
    assert_eq!(b.stats().push_pull_members_sent, 1, "b's join only");
}

#[test]
fn a_digest_exchange_gives_each_side_what_it_lacks_or_holds_older() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    learn(&mut x, "m1", 11, 1, t0);
    learn(&mut x, "m2", 12, 0, t0);
    learn(&mut x, "m3", 13, 0, t0);
    learn(&mut y, "m1", 11, 0, t0);
    learn(&mut y, "m2", 12, 2, t0);
    learn(&mut y, "m4", 14, 0, t0);
    // x suspects m1 at the incarnation y does not know yet.
    let from_m3 = suspect_broadcast("m1", 1, "m3");
    x.handle_datagram(t0, addr(13), &from_m3);
    assert_eq!(x.member("m1").map(|m| m.state), Some(MemberState::Suspect));

    let ex = digest_exchange(&mut x, &mut y, t0);
    assert_eq!(names(&ex.reply.members), ["m2", "m4", "y"]);
    let mut want = ex.reply.want.clone();
    want.sort_unstable();
    assert_eq!(want, ["m1", "m3", "x"]);
    let push = ex.push.expect("x sends what y wants");
    assert_eq!(push.members[0].node, "x", "the sender first");
    assert_eq!(names(&push.members), ["m1", "m3", "x"]);

    // Both end where a full exchange would have left them.
    for (name, incarnation) in [("m1", 1), ("m2", 2), ("m3", 0), ("m4", 0)] {
        for m in [&x, &y] {
            assert_eq!(
                m.member(name).map(|m| m.incarnation),
                Some(incarnation),
                "{name} at {}",
                m.name
            );
        }
    }
    assert!(x.member("y").is_some() && y.member("x").is_some());
    assert_eq!(
        y.member("m1").map(|m| m.state),
        Some(MemberState::Suspect),
        "x's accusation holds at y"
    );

    // Now they agree: the next exchange, either way, moves nothing in full.
    for ex in [
        digest_exchange(&mut x, &mut y, t0),
        digest_exchange(&mut y, &mut x, t0),
    ] {
        assert!(ex.reply.members.is_empty() && ex.reply.want.is_empty());
        assert!(ex.push.is_none());
    }
}

#[test]
fn a_suspicion_both_sides_hold_is_confirmed_by_the_digest() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    for m in [&mut x, &mut y] {
        learn(m, "m1", 11, 0, t0);
        learn(m, "m2", 12, 0, t0);
        learn(m, "m3", 13, 0, t0);
    }
    x.handle_datagram(t0, addr(12), &suspect_broadcast("m1", 0, "m2"));
    y.handle_datagram(t0, addr(13), &suspect_broadcast("m1", 0, "m3"));
    let ex = digest_exchange(&mut x, &mut y, t0);
    assert!(ex.reply.members.is_empty());
    assert_eq!(ex.reply.digest.len(), 1, "y's accusation of m1");
    // Each side counts the other as one more accuser of m1: its suspicion timer shortened.
    for m in [&x, &y] {
        let timer = m.suspicions.get("m1").expect("still suspected");
        assert_eq!(timer.confirmations(), 1, "at {}", m.name);
    }
}

#[test]
fn a_previous_life_at_the_same_incarnation_elsewhere_is_exchanged_and_refuted() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    // x holds "y" from a previous life at port 5; y is back at port 6, at the same incarnation.
    let mut y = node("y", 6, t0);
    let life = y.incarnation();
    learn(&mut x, "y", 5, life, t0);
    learn(&mut y, "x", 1, x.incarnation(), t0);
    let ex = digest_exchange(&mut y, &mut x, t0);
    assert_eq!(
        names(&ex.reply.members),
        ["y"],
        "x's entry of y, different at {life}"
    );
    assert_eq!(ex.reply.want, ["y"]);
    assert!(y.incarnation() > life, "y out-announced its previous life");
}

#[test]
fn application_states_travel_only_when_they_differ() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    x.set_app_state(Bytes::from_static(b"same"));
    y.set_app_state(Bytes::from_static(b"same"));
    events(&mut x);
    events(&mut y);
    let ex = digest_exchange(&mut x, &mut y, t0);
    assert!(ex.reply.app_state.is_empty() && !ex.reply.want_app_state);
    assert!(ex.push.is_none());

    y.set_app_state(Bytes::from_static(b"y's"));
    let ex = digest_exchange(&mut x, &mut y, t0);
    assert_eq!(&ex.reply.app_state[..], b"y's");
    assert_eq!(&ex.push.expect("x's state").app_state[..], b"same");
    let at_x = events(&mut x);
    let at_y = events(&mut y);
    assert!(at_x.contains(&Event::AppState {
        from: "y".into(),
        state: Bytes::from_static(b"y's")
    }));
    assert!(at_y.contains(&Event::AppState {
        from: "x".into(),
        state: Bytes::from_static(b"same")
    }));
}

#[test]
fn hostile_digests_and_want_lists_cost_each_member_once() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    for k in 0..50u16 {
        learn(&mut x, &format!("m{k}"), 100 + k, 0, t0);
    }
    // A request that lists every member 200 times and 10,000 names nobody has: the reply
    // wants each unknown name, never more than the member limit, and sends each member once.
    let mut digest = Vec::new();
    for _ in 0..200 {
        for k in 0..50u16 {
            digest.push(wire::MemberDigest {
                node: format!("m{k}"),
                incarnation: 0,
                state: wire::MemberState::Alive as i32,
                fingerprint: 0,
            });
        }
    }
    digest.extend((0..10_000).map(|k| wire::MemberDigest {
        node: format!("ghost{k}"),
        incarnation: u64::MAX,
        state: wire::MemberState::Alive as i32,
        fingerprint: 0,
    }));
    // Members the requester holds gone are not asked for: their entries would not be taken.
    digest.extend((0..10).map(|k| wire::MemberDigest {
        node: format!("gone{k}"),
        incarnation: 1,
        state: wire::MemberState::Dead as i32,
        fingerprint: 0,
    }));
    let request = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: "y".into(),
        digest,
        ..Default::default()
    };
    drain(&mut x);
    x.handle_stream(t0, addr(2), &request.encode_to_vec());
    let reply: Vec<_> = drain(&mut x)
        .into_iter()
        .filter(|t| t.channel == Channel::StreamReply)
        .collect();
    let reply = decode_push_pull(&reply[0]);
    // Fingerprint 0 differs from every real one: each member once, in full and wanted.
    assert_eq!(reply.members.len(), 50 + 2, "m0..m49, x and y");
    assert_eq!(reply.want.len(), 50 + 10_000);
    assert!(!reply.want.iter().any(|w| w.starts_with("gone")));
    assert!(x.member("ghost0").is_none());

    // A reply that wants every member 1,000 times: the push sends each once.
    let want: Vec<String> = (0..1000)
        .flat_map(|_| (0..50).map(|k| format!("m{k}")).chain(["x".to_owned()]))
        .collect();
    let reply = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: "y".into(),
        reply: true,
        want,
        app_state_digest: 1,
        ..Default::default()
    };
    let pushes = |x: &mut Membership| {
        x.handle_stream(t0, addr(2), &reply.encode_to_vec());
        drain(x)
            .into_iter()
            .filter(|t| t.channel == Channel::Stream)
            .collect::<Vec<_>>()
    };
    assert!(
        pushes(&mut x).is_empty(),
        "no digest request of x's to answer"
    );
    x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Digest);
    drain(&mut x);
    let push = pushes(&mut x);
    assert_eq!(push.len(), 1);
    let push = decode_push_pull(&push[0]);
    assert_eq!(push.members.len(), 51);
    assert_eq!(push.members[0].node, "x");
    // Once per request: the same answer again (to the push, say) asks for nothing.
    assert!(pushes(&mut x).is_empty());
}

#[test]
fn accusations_of_a_requester_this_node_does_not_hold_come_again_after_its_entry() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    for m in [&mut x, &mut y] {
        learn(m, "m1", 11, 1, t0);
        learn(m, "m2", 12, 1, t0);
    }
    // x suspects m1; y does not know x (it missed x's alive).
    x.handle_datagram(t0, addr(12), &suspect_broadcast("m1", 1, "m2"));
    learn(&mut x, "y", 2, y.incarnation(), t0);
    let ex = digest_exchange(&mut x, &mut y, t0);
    let mut want = ex.reply.want.clone();
    want.sort_unstable();
    assert_eq!(want, ["m1", "x"]);
    let push = ex.push.expect("x sends itself and its accusation");
    assert_eq!(push.members[0].node, "x");
    assert_eq!(y.member("m1").map(|m| m.state), Some(MemberState::Suspect));
}

#[test]
fn a_peer_that_does_not_read_digests_gets_the_whole_state() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    for k in 0..5u16 {
        learn(&mut x, &format!("m{k}"), 100 + k, 1, t0);
    }
    x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Digest);
    drain(&mut x);
    // Its answer: its whole state, without any field it does not know.
    let old_reply = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: "y".into(),
        reply: true,
        members: vec![wire::MemberEntry {
            node: "y".into(),
            addr: Some(encode_addr(addr(2))),
            incarnation: 1,
            state: wire::MemberState::Alive as i32,
            meta: Bytes::new(),
            alive: Some(unsigned(
                ClaimKind::Alive,
                &wire::Alive {
                    node: "y".into(),
                    incarnation: 1,
                    addr: Some(encode_addr(addr(2))),
                    meta: Bytes::new(),
                },
            )),
            leave: None,
        }],
        ..Default::default()
    };
    x.handle_stream(t0, addr(2), &old_reply.encode_to_vec());
    assert!(x.member("y").is_some());
    let push: Vec<_> = drain(&mut x)
        .into_iter()
        .filter(|t| t.channel == Channel::Stream)
        .collect();
    assert_eq!(push.len(), 1);
    let push = decode_push_pull(&push[0]);
    assert_eq!(push.members.len(), 7, "x, y and m0..m4");
    assert!(
        !push.reply,
        "an older peer reads it as a request with the whole state"
    );
}

/// A member entry as a peer sends it in a push-pull: its own alive, and a leave if it left.
fn entry(name: &str, port: u16, incarnation: u64, state: wire::MemberState) -> wire::MemberEntry {
    let alive = wire::Alive {
        node: name.into(),
        incarnation,
        addr: Some(encode_addr(addr(port))),
        meta: Bytes::new(),
    };
    let leave = wire::Dead {
        node: name.into(),
        incarnation,
        from: name.into(),
    };
    wire::MemberEntry {
        node: name.into(),
        addr: Some(encode_addr(addr(port))),
        incarnation,
        state: state as i32,
        meta: Bytes::new(),
        alive: Some(unsigned(ClaimKind::Alive, &alive)),
        leave: (state == wire::MemberState::Left).then(|| unsigned(ClaimKind::Dead, &leave)),
    }
}

#[test]
fn a_push_pull_never_brings_back_a_dead_or_left_member_this_node_does_not_hold() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    // Known here at incarnation 1; the peer holds it Dead at 2.
    learn(&mut x, "known", 10, 1, t0);
    events(&mut x);
    x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Digest);
    drain(&mut x);
    let reply = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: "y".into(),
        reply: true,
        members: vec![
            entry("y", 2, 1, wire::MemberState::Alive),
            // Forgotten here (or never known): reaped Dead and Left entries elsewhere.
            entry("dead", 11, 1, wire::MemberState::Dead),
            entry("left", 12, 1, wire::MemberState::Left),
            // A suspect is probably alive: learnt, and suspected here too.
            entry("suspect", 13, 1, wire::MemberState::Suspect),
            entry("known", 10, 2, wire::MemberState::Dead),
        ],
        ..Default::default()
    };
    x.handle_stream(t0, addr(2), &reply.encode_to_vec());
    assert!(
        x.member("dead").is_none(),
        "a forgotten Dead member came back"
    );
    assert!(
        x.member("left").is_none(),
        "a forgotten Left member came back"
    );
    let joined: Vec<String> = events(&mut x)
        .into_iter()
        .filter_map(|e| match e {
            Event::MemberJoined(m) => Some(m.name),
            _ => None,
        })
        .collect();
    assert_eq!(joined, ["y", "suspect"]);
    assert_eq!(x.member("y").map(|m| m.state), Some(MemberState::Alive));
    assert_eq!(
        x.member("suspect").map(|m| m.state),
        Some(MemberState::Suspect)
    );
    // A member this node holds takes the newer alive, then the peer's accusation.
    let known = x.member("known").expect("still held");
    assert_eq!((known.state, known.incarnation), (MemberState::Suspect, 2));
}

#[test]
fn an_alive_whose_chain_does_not_fit_a_packet_is_gossiped_without_it_and_kept_whole() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    // A chain of 2,000 bytes (a leaf and an intermediate with RSA keys are about as large).
    let chain = vec![Bytes::from(vec![7u8; 1200]), Bytes::from(vec![8u8; 800])];
    let alive_of_m = |incarnation: u64, certificates: Vec<Bytes>| wire::Signed {
        certificates,
        ..unsigned(
            ClaimKind::Alive,
            &wire::Alive {
                node: "m".into(),
                incarnation,
                addr: Some(encode_addr(addr(9))),
                meta: Bytes::new(),
            },
        )
    };
    let gossiped_alives_of_m = |x: &mut Membership| -> Vec<wire::Signed> {
        drain(x);
        let now = x.next_gossip;
        x.handle_timeout(now);
        drain(x)
            .iter()
            .filter(|t| t.channel == Channel::Datagram)
            .flat_map(|t| decode_packet(t).broadcasts)
            .filter_map(|b| match b.kind {
                Some(wire::broadcast::Kind::Alive(claim))
                    if wire::Alive::decode(&claim.body[..]).is_ok_and(|a| a.node == "m") =>
                {
                    Some(claim)
                }
                _ => None,
            })
            .collect()
    };
    let pushed_chain_of_m = |x: &mut Membership| -> Vec<Bytes> {
        drain(x);
        x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Join);
        let request = drain(x);
        decode_push_pull(&request[0])
            .members
            .into_iter()
            .find(|e| e.node == "m")
            .and_then(|e| e.alive)
            .map(|a| a.certificates)
            .unwrap_or_default()
    };

    x.handle_alive(t0, alive_of_m(1, chain.clone()));
    assert!(x.member("m").is_some());
    let gossiped = gossiped_alives_of_m(&mut x);
    assert!(!gossiped.is_empty(), "the alive is gossiped");
    assert!(
        gossiped.iter().all(|c| c.certificates.is_empty()),
        "without the chain, which does not fit"
    );
    assert_eq!(
        pushed_chain_of_m(&mut x),
        chain,
        "a push-pull carries it whole"
    );

    // A newer alive that came without its chain keeps the one learnt.
    x.handle_alive(t0, alive_of_m(2, Vec::new()));
    assert_eq!(x.member("m").map(|m| m.incarnation), Some(2));
    assert_eq!(pushed_chain_of_m(&mut x), chain);

    // A chain that fits travels with the alive.
    let small = vec![Bytes::from(vec![9u8; 300])];
    x.handle_alive(t0, alive_of_m(3, small.clone()));
    let gossiped = gossiped_alives_of_m(&mut x);
    assert!(!gossiped.is_empty());
    assert!(gossiped.iter().all(|c| c.certificates == small));
    assert_eq!(pushed_chain_of_m(&mut x), small);
}

/// Keys whose claims carry a (one-byte) certificate chain, and which check a claim only with
/// its chain: a chainless claim is from a signer this node never learnt.
#[derive(Debug)]
struct ChainKeys(Vec<Bytes>);

impl ClaimKeys for ChainKeys {
    fn sign(
        &self,
        _message: &[u8],
    ) -> Result<(rustls::SignatureScheme, Vec<u8>), claims::ClaimError> {
        Ok((rustls::SignatureScheme::ED25519, vec![1]))
    }

    fn certificates(&self) -> &[Bytes] {
        &self.0
    }

    fn verify(
        &mut self,
        signer: &str,
        _message: &[u8],
        _scheme: rustls::SignatureScheme,
        _signature: &[u8],
        carried: &[Bytes],
    ) -> Result<(), claims::ClaimError> {
        if carried.is_empty() {
            Err(claims::ClaimError::UnknownSigner {
                signer: signer.to_owned(),
            })
        } else {
            Ok(())
        }
    }
}

#[test]
fn a_relay_of_ten_thousand_made_up_chainless_alives_gets_one_bounded_request_per_packet() {
    let t0 = Instant::now();
    let keys = ChainKeys(vec![Bytes::from_static(b"c")]);
    let mut x = Membership::new(Config::lan(), "x", addr(1), 1, t0, Box::new(keys)).unwrap();
    let chainless = |name: &str| wire::Broadcast {
        kind: Some(wire::broadcast::Kind::Alive(wire::Signed {
            body: wire::Alive {
                node: name.into(),
                incarnation: 1,
                addr: Some(encode_addr(addr(9))),
                meta: Bytes::new(),
            }
            .encode_to_vec()
            .into(),
            scheme: u32::from(u16::from(rustls::SignatureScheme::ED25519)),
            signature: Bytes::from_static(&[1]),
            certificates: Vec::new(),
        })),
    };
    let requests = |x: &mut Membership| -> Vec<wire::PushPull> {
        drain(x)
            .iter()
            .filter(|t| t.channel == Channel::Stream)
            .map(decode_push_pull)
            .filter(|pp| pp.push)
            .collect()
    };
    // 10,000 made-up members, 50 per packet, 200 packets: at most one request per packet,
    // naming at most 8 (the memory of members asked, 1,024, fills and starts afresh).
    let mut asked = 0u64;
    for p in 0..200 {
        let packet = wire::Packet {
            sender: "r".into(),
            message: None,
            broadcasts: (0..50).map(|k| chainless(&format!("m{p}-{k}"))).collect(),
        };
        x.handle_datagram(t0, addr(2), &packet.encode_to_vec());
        let sent = requests(&mut x);
        assert!(sent.len() <= 1, "packet {p}: {} requests", sent.len());
        for pp in &sent {
            assert!(pp.want.len() <= MAX_FETCHES_PER_PACKET);
            asked += pp.want.len() as u64;
        }
    }
    assert_eq!(asked, x.stats().members_fetched);
    assert_eq!(asked, 200 * MAX_FETCHES_PER_PACKET as u64);
    assert_eq!(x.members().count(), 0, "none taken unchecked");
    // The same members again within FETCH_AGAIN_AFTER: still at most 8 per packet.
    let packet = wire::Packet {
        sender: "r".into(),
        message: None,
        broadcasts: (0..50).map(|k| chainless(&format!("m199-{k}"))).collect(),
    };
    x.handle_datagram(t0, addr(2), &packet.encode_to_vec());
    assert!(
        requests(&mut x)
            .iter()
            .all(|pp| pp.want.len() <= MAX_FETCHES_PER_PACKET)
    );
    // One member, again and again within FETCH_AGAIN_AFTER: asked once.
    let mut y = Membership::new(
        Config::lan(),
        "y",
        addr(3),
        3,
        t0,
        Box::new(ChainKeys(vec![Bytes::from_static(b"c")])),
    )
    .unwrap();
    let mut once = 0;
    for k in 0..1000u64 {
        let packet = wire::Packet {
            sender: "r".into(),
            message: None,
            broadcasts: vec![chainless("joiner")],
        };
        let now = t0 + Duration::from_millis(k);
        y.handle_datagram(now, addr(2), &packet.encode_to_vec());
        once += requests(&mut y).len();
    }
    assert_eq!(once, 1, "within 5 s a member is asked for once");
    let later = t0 + FETCH_AGAIN_AFTER;
    let packet = wire::Packet {
        sender: "r".into(),
        message: None,
        broadcasts: vec![chainless("joiner")],
    };
    y.handle_datagram(later, addr(2), &packet.encode_to_vec());
    assert_eq!(
        requests(&mut y).len(),
        1,
        "and again after FETCH_AGAIN_AFTER"
    );
}

/// Runs a periodic (sum) exchange from `x` to `y` by hand: the messages, in order.
fn sum_exchange(x: &mut Membership, y: &mut Membership, now: Instant) -> Vec<wire::PushPull> {
    drain(x);
    drain(y);
    x.send_push_pull(
        now,
        y.local_addr(),
        Some(y.name.clone()),
        push_pull::Exchange::Sum,
    );
    let mut messages = Vec::new();
    let (mut from, mut to) = (x, y);
    let mut expect = Channel::Stream;
    for _ in 0..6 {
        let out: Vec<_> = drain(from)
            .into_iter()
            .filter(|t| t.channel.is_reliable())
            .collect();
        let Some(t) = out.first() else {
            break;
        };
        assert_eq!(out.len(), 1);
        assert_eq!(t.channel, expect, "request, reply, request, reply");
        expect = if expect == Channel::Stream {
            Channel::StreamReply
        } else {
            Channel::Stream
        };
        messages.push(decode_push_pull(t));
        to.handle_stream(now, from.local_addr(), &t.payload);
        std::mem::swap(&mut from, &mut to);
    }
    messages
}

#[test]
fn a_periodic_exchange_between_nodes_that_agree_is_two_small_messages() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    for m in [&mut x, &mut y] {
        for k in 0..100u16 {
            learn(m, &format!("m{k}"), 100 + k, 1, t0);
        }
    }
    let messages = sum_exchange(&mut x, &mut y, t0);
    assert_eq!(messages.len(), 2);
    for m in &messages {
        assert!(m.members.is_empty() && m.digest.is_empty() && m.want.is_empty());
        assert!(m.encoded_len() < 40, "{} bytes", m.encoded_len());
    }
}

#[test]
fn a_periodic_exchange_between_nodes_that_differ_ends_like_a_full_one() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    learn(&mut x, "m1", 11, 1, t0);
    learn(&mut x, "m2", 12, 1, t0);
    learn(&mut x, "m3", 13, 1, t0);
    learn(&mut y, "m1", 11, 2, t0);
    learn(&mut y, "m2", 12, 1, t0);
    learn(&mut y, "m4", 14, 1, t0);
    x.handle_datagram(t0, addr(13), &suspect_broadcast("m2", 1, "m3"));
    x.set_app_state(Bytes::from_static(b"x's"));
    let messages = sum_exchange(&mut x, &mut y, t0);
    assert_eq!(messages.len(), 4, "sum, digest, push, answer");
    assert!(messages[0].digest.is_empty() && messages[0].members_sum != 0);
    assert_eq!(messages[1].digest.len(), 5, "y, x, m1, m2, m4");
    assert_eq!(names(&messages[2].members), ["m3"], "what y lacks");
    let mut want = messages[2].want.clone();
    want.sort_unstable();
    assert_eq!(want, ["m1", "m4"]);
    assert_eq!(messages[2].digest.len(), 1, "x's accusation of m2");
    assert_eq!(&messages[2].app_state[..], b"x's");
    assert_eq!(names(&messages[3].members), ["m1", "m4"]);
    for (name, incarnation) in [("m1", 2), ("m2", 1), ("m3", 1), ("m4", 1)] {
        for m in [&x, &y] {
            assert_eq!(
                m.member(name).map(|m| m.incarnation),
                Some(incarnation),
                "{name} at {}",
                m.name
            );
        }
    }
    assert_eq!(y.member("m2").map(|m| m.state), Some(MemberState::Suspect));
    assert!(events(&mut y).contains(&Event::AppState {
        from: "x".into(),
        state: Bytes::from_static(b"x's")
    }));
    // They agree now (once y's application took x's state as its own).
    y.set_app_state(Bytes::from_static(b"x's"));
    assert_eq!(sum_exchange(&mut y, &mut x, t0).len(), 2);
}

#[test]
fn answers_are_matched_to_the_request_they_answer() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    for k in 0..3u16 {
        learn(&mut x, &format!("m{k}"), 100 + k, 1, t0);
    }
    x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Sum);
    x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Digest);
    drain(&mut x);
    let answer = |x: &mut Membership, reply: wire::PushPull| {
        let reply = wire::PushPull {
            protocol_version: wire::PROTOCOL_VERSION,
            sender: "y".into(),
            reply: true,
            app_state_digest: 1,
            ..reply
        };
        x.handle_stream(t0, addr(2), &reply.encode_to_vec());
        drain(x)
            .into_iter()
            .filter(|t| t.channel == Channel::Stream)
            .map(|t| decode_push_pull(&t))
            .collect::<Vec<_>>()
    };
    // The answer to a push ends an exchange: it answers neither request.
    let pushed = answer(
        &mut x,
        wire::PushPull {
            push: true,
            want: vec!["m0".into()],
            ..Default::default()
        },
    );
    assert!(pushed.is_empty());
    // A digest answer wanting m0 goes to the digest request, whatever was sent first.
    let pushed = answer(
        &mut x,
        wire::PushPull {
            want: vec!["m0".into()],
            ..Default::default()
        },
    );
    assert_eq!(pushed.len(), 1);
    assert_eq!(names(&pushed[0].members), ["m0"]);
    // A sum answer with a digest that lacks everything: x answers with what y lacks.
    let pushed = answer(
        &mut x,
        wire::PushPull {
            members_sum: 7,
            digest: vec![wire::MemberDigest {
                node: "y".into(),
                incarnation: 1,
                state: wire::MemberState::Alive as i32,
                fingerprint: 0,
            }],
            ..Default::default()
        },
    );
    assert_eq!(pushed.len(), 1);
    assert_eq!(names(&pushed[0].members), ["m0", "m1", "m2", "x"]);
    assert_eq!(pushed[0].want, ["y"]);
    // Both requests are answered: the same answers again send nothing.
    let again = answer(
        &mut x,
        wire::PushPull {
            want: vec!["m0".into()],
            ..Default::default()
        },
    );
    assert!(again.is_empty());
    // A peer that reads no sums answers one with its whole state: it gets the whole state.
    x.send_push_pull(t0, addr(2), Some("y".into()), push_pull::Exchange::Sum);
    drain(&mut x);
    let pushed = answer(&mut x, wire::PushPull::default());
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].members.len(), 4, "x and m0..m2");
}

/// What one node holds of member `k` (of five) in the exchange property below: unknown, or
/// known at an incarnation, suspected (by member `(k + 1) % 5`) or not.
type Held = Option<(u64, bool)>;

/// Two nodes built from `xs` and `ys` (one `Held` per member), joined to each other.
fn divergent_pair(xs: &[Held], ys: &[Held], t0: Instant) -> (Membership, Membership) {
    let mut x = node("x", 1, t0);
    let mut y = node("y", 2, t0);
    join_pair(&mut x, &mut y, t0);
    for (m, held) in [(&mut x, xs), (&mut y, ys)] {
        // Every accuser is known at incarnation 1 at least, so that its accusations count.
        for (k, h) in held.iter().enumerate() {
            let incarnation = h.map_or(1, |(i, _)| i);
            if h.is_some() || held.iter().any(|h| h.is_some_and(|(_, s)| s)) {
                learn(m, &format!("m{k}"), 100 + k as u16, incarnation, t0);
            }
        }
        for (k, h) in held.iter().enumerate() {
            if let Some((i, true)) = h {
                let accuser = format!("m{}", (k + 1) % held.len());
                let packet = suspect_broadcast(&format!("m{k}"), *i, &accuser);
                m.handle_datagram(t0, addr(100 + ((k + 1) % held.len()) as u16), &packet);
            }
        }
        drain(m);
    }
    (x, y)
}

fn view(m: &Membership) -> Vec<(String, u64, MemberState)> {
    let mut v: Vec<_> = m
        .members()
        .filter(|e| e.name.starts_with('m'))
        .map(|e| (e.name, e.incarnation, e.state))
        .collect();
    v.sort();
    v
}

proptest::proptest! {
    /// Whatever two nodes hold, a periodic (sum) exchange leaves both where a full exchange
    /// (a join's) leaves them.
    #[test]
    fn a_sum_exchange_ends_where_a_full_exchange_does(
        xs in proptest::collection::vec(proptest::option::of((1u64..4, proptest::bool::ANY)), 5),
        ys in proptest::collection::vec(proptest::option::of((1u64..4, proptest::bool::ANY)), 5),
    ) {
        let t0 = Instant::now();
        let (mut x, mut y) = divergent_pair(&xs, &ys, t0);
        sum_exchange(&mut x, &mut y, t0);
        let (mut fx, mut fy) = divergent_pair(&xs, &ys, t0);
        fx.send_push_pull(t0, fy.local_addr(), Some("y".into()), push_pull::Exchange::Join);
        let request = drain(&mut fx);
        fy.handle_stream(t0, fx.local_addr(), &request[0].payload);
        let reply: Vec<_> = drain(&mut fy)
            .into_iter()
            .filter(|t| t.channel == Channel::StreamReply)
            .collect();
        fx.handle_stream(t0, fy.local_addr(), &reply[0].payload);
        proptest::prop_assert_eq!(view(&x), view(&fx));
        proptest::prop_assert_eq!(view(&y), view(&fy));
        // And the two agree on every incarnation.
        let incarnations = |v: Vec<(String, u64, MemberState)>| {
            v.into_iter().map(|(n, i, _)| (n, i)).collect::<Vec<_>>()
        };
        proptest::prop_assert_eq!(incarnations(view(&x)), incarnations(view(&y)));
    }
}

#[test]
fn scratch_buffers_past_64_kib_are_not_kept() {
    let mut slot = Vec::new();
    super::keep_scratch(&mut slot, Vec::with_capacity(1024));
    assert!(slot.capacity() >= 1024);
    let mut slot = Vec::new();
    super::keep_scratch(&mut slot, Vec::with_capacity(8 << 20));
    assert_eq!(slot.capacity(), 0, "a padded claim's size is not kept");
}

fn alive_claim(node: &str, port: u16, incarnation: u64) -> wire::broadcast::Kind {
    wire::broadcast::Kind::Alive(unsigned(
        ClaimKind::Alive,
        &wire::Alive {
            node: node.into(),
            incarnation,
            addr: Some(encode_addr(addr(port))),
            meta: Bytes::new(),
        },
    ))
}

/// Node "x" that knew "v" (port 20) at incarnation 5, declared it Dead on "w"'s word and has
/// reaped its entry since; "w" (port 21) is a member.
fn x_that_forgot_v(t0: Instant) -> (Membership, Instant) {
    let mut x = node("x", 1, t0);
    learn(&mut x, "v", 20, 5, t0);
    learn(&mut x, "w", 21, 1, t0);
    let dead = dead_claim("v", 5, "w");
    // A remote death is a suspicion here, Dead once it times out.
    x.handle_datagram(t0, addr(21), &packet_with("w", dead));
    let mut now = t0;
    while x.member("v").is_some_and(|m| m.state != MemberState::Dead) {
        now = x.poll_timeout().expect("timers run");
        assert!(now < t0 + Duration::from_secs(60), "v never died");
        x.handle_timeout(now);
        drain(&mut x);
    }
    let later = now + x.config().gossip_to_the_dead_time + Duration::from_secs(1);
    x.reshuffle_probe_order(later);
    assert!(x.member("v").is_none(), "reaped at the walk's wrap-around");
    drain(&mut x);
    events(&mut x);
    (x, later)
}

#[test]
fn a_forgotten_dead_member_is_not_brought_back_by_its_old_alive() {
    let t0 = Instant::now();
    let (mut x, now) = x_that_forgot_v(t0);
    // Relayed in a packet, at the incarnation it died at and below.
    for incarnation in [5, 4, 0] {
        x.handle_datagram(
            now,
            addr(21),
            &packet_with("w", alive_claim("v", 20, incarnation)),
        );
    }
    assert!(x.member("v").is_none(), "an old alive brought v back");
    assert_eq!(x.stats().forgotten_alives_dropped, 3);
    // In a push-pull from a peer that still holds it Suspect.
    let pp = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: "w".into(),
        reply: false,
        members: vec![
            entry("w", 21, 1, wire::MemberState::Alive),
            entry("v", 20, 5, wire::MemberState::Suspect),
        ],
        ..Default::default()
    };
    x.handle_stream(now, addr(21), &pp.encode_to_vec());
    assert!(x.member("v").is_none(), "a push-pull brought v back");
    // Nor asked for in a digest exchange with such a peer.
    let mut w = node("w", 21, t0);
    learn(&mut w, "x", 1, x.incarnation(), t0);
    learn(&mut w, "v", 20, 5, t0);
    w.handle_datagram(t0, addr(1), &suspect_broadcast("v", 5, "x"));
    assert_eq!(w.member("v").map(|m| m.state), Some(MemberState::Suspect));
    let ex = digest_exchange(&mut w, &mut x, now);
    assert!(!ex.reply.want.contains(&"v".to_owned()), "v was asked for");
    assert!(x.member("v").is_none(), "a digest exchange brought v back");
    assert!(
        !events(&mut x)
            .iter()
            .any(|e| matches!(e, Event::MemberJoined(m) if m.name == "v")),
        "v joined again"
    );
}

#[test]
fn a_forgotten_member_comes_back_newer_elsewhere_or_by_speaking_for_itself() {
    let t0 = Instant::now();
    // A newer life, relayed.
    let (mut x, now) = x_that_forgot_v(t0);
    x.handle_datagram(now, addr(21), &packet_with("w", alive_claim("v", 20, 6)));
    let v = x.member("v").expect("a newer incarnation comes back");
    assert_eq!((v.state, v.incarnation), (MemberState::Alive, 6));
    // The same incarnation at a new address (a restart elsewhere), relayed.
    let (mut x, now) = x_that_forgot_v(t0);
    x.handle_datagram(now, addr(21), &packet_with("w", alive_claim("v", 30, 5)));
    assert_eq!(x.member("v").map(|m| m.addr), Some(addr(30)));
    // The old life itself, speaking for itself (a partition healed, or a restart at the same
    // incarnation): taken, and told it died so that its refutation reaches every node.
    let (mut x, now) = x_that_forgot_v(t0);
    x.handle_datagram(now, addr(20), &packet_with("v", alive_claim("v", 20, 5)));
    assert_eq!(x.member("v").map(|m| m.state), Some(MemberState::Alive));
    let corrections: Vec<wire::Packet> = drain(&mut x)
        .iter()
        .filter(|t| t.dst == addr(20))
        .map(decode_packet)
        .collect();
    let told = corrections.iter().flat_map(|p| &p.broadcasts).any(|b| {
        matches!(&b.kind, Some(wire::broadcast::Kind::Dead(c))
            if wire::Dead::decode(&c.body[..]).is_ok_and(|d| d.node == "v" && d.incarnation == 5))
    });
    assert!(told, "v was not told it died: {corrections:?}");
    // The same over a push-pull from v itself.
    let (mut x, now) = x_that_forgot_v(t0);
    let pp = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: "v".into(),
        reply: false,
        members: vec![entry("v", 20, 5, wire::MemberState::Alive)],
        ..Default::default()
    };
    x.handle_stream(now, addr(20), &pp.encode_to_vec());
    assert_eq!(x.member("v").map(|m| m.state), Some(MemberState::Alive));
    assert!(
        drain(&mut x)
            .iter()
            .any(|t| t.dst == addr(20) && t.channel == Channel::Datagram),
        "v was not told it died after its push-pull"
    );
}

/// The push-pull requests of `sent` to ports in `ports`.
fn requests_to(sent: &[Outgoing], ports: std::ops::Range<u16>) -> usize {
    sent.iter()
        .filter(|t| t.channel == Channel::Stream && ports.contains(&t.dst.port()))
        .count()
}

#[test]
fn failed_members_are_retried_about_once_each_per_interval_across_the_cluster() {
    let t0 = Instant::now();
    let mut x = node("x", 1, t0);
    let interval = x.config().reconnect_interval;
    for k in 0..99 {
        learn(&mut x, &format!("m{k}"), 100 + k, 1, t0);
    }
    for k in 0..10 {
        x.remember_failed(format!("f{k}"), addr(300 + k), 1);
    }
    drain(&mut x);
    // 10 failed and 100 live: a try per interval with probability 1/10, so that the cluster's
    // 100 nodes try each failed member about once per interval between them.
    let (rounds, mut attempts) = (2000, 0);
    let mut now = t0;
    for _ in 0..rounds {
        x.reconnect(now);
        attempts += requests_to(&drain(&mut x), 300..310);
        assert_eq!(x.next_reconnect, now + interval);
        now = x.next_reconnect;
    }
    assert!(
        (150..=250).contains(&attempts),
        "{attempts} tries in {rounds} intervals, 200 expected"
    );
    // Across a partition (as many failed as live members): one try every interval.
    for k in 10..100 {
        x.remember_failed(format!("f{k}"), addr(300 + k), 1);
    }
    for _ in 0..100 {
        x.reconnect(now);
        assert_eq!(requests_to(&drain(&mut x), 300..400), 1);
        now = x.next_reconnect;
    }
    // A seed that never answered is retried by this node once per interval, besides.
    x.join(now, &[addr(500)]);
    drain(&mut x);
    let (mut seed_tries, mut failed_tries) = (0, 0);
    let start = now;
    while now < start + interval * 10 {
        x.reconnect(now);
        let sent = drain(&mut x);
        seed_tries += requests_to(&sent, 500..501);
        failed_tries += requests_to(&sent, 300..400);
        now = x.next_reconnect;
    }
    assert_eq!((seed_tries, failed_tries), (10, 10));
}

/// Gossip targets of `rounds` gossip rounds of `m`: how many of them are members `m0`..`m49`.
fn gossip_to_first_half(m: &mut Membership, rounds: usize, now: Instant) -> (usize, usize) {
    let (mut first_half, mut all) = (0, 0);
    for round in 0..rounds {
        // Something to gossip every round.
        m.broadcast_app(
            Bytes::from(format!("key-{round}")),
            Bytes::from_static(b"v"),
        )
        .expect("a small broadcast");
        m.gossip(now);
        for t in drain(m) {
            all += 1;
            let name = t.dst_name.unwrap_or_default();
            let k: usize = name[1..].parse().unwrap_or(usize::MAX);
            first_half += usize::from(k < 50);
        }
    }
    (first_half, all)
}

#[test]
fn gossip_leans_towards_connected_members_when_the_node_reports_them() {
    let t0 = Instant::now();
    let members = |m: &mut Membership| {
        for k in 0..100u16 {
            learn(m, &format!("m{k}"), 100 + k, 1, t0);
        }
        drain(m);
    };
    // Without hints: uniform targets, half of them in the first half.
    let mut plain = node("x", 1, t0);
    members(&mut plain);
    let (first, all) = gossip_to_first_half(&mut plain, 30, t0);
    assert_eq!(all, 90);
    assert!((30..=60).contains(&first), "{first} of {all}");
    // Connected to the first half only: most targets are there, the rest still reach others.
    let mut hinted = node("x", 1, t0);
    members(&mut hinted);
    for k in 0..50 {
        hinted.set_connected(&format!("m{k}"), true);
    }
    hinted.set_connected("not-a-member", true);
    let (first, all) = gossip_to_first_half(&mut hinted, 30, t0);
    assert_eq!(all, 90);
    assert!((78..90).contains(&first), "{first} of {all}");
    // A member gone (here: left) is no longer preferred: the node closes its connections.
    let leave = dead_claim("m0", 1, "m0");
    hinted.handle_datagram(t0, addr(100), &packet_with("m0", leave));
    let m0 = hinted.members.find("m0").expect("held Left");
    assert_eq!(hinted.members[m0].state, MemberState::Left);
    assert!(!hinted.members[m0].connected);
    // A connection lost: that member is no longer preferred.
    for k in 0..50 {
        hinted.set_connected(&format!("m{k}"), false);
    }
    let (first, _) = gossip_to_first_half(&mut hinted, 30, t0);
    assert!((30..=60).contains(&first), "{first} of 90");
}
