//! A liar among the members: 20 whole nodes in the simulator, one of them (with a valid
//! certificate of its own) under the test's control. It sends every forgery a member could try
//! in another node's name, replays old genuine claims and floods accusations; the honest nodes
//! must not lose a member, a name, an address or a flow to it. `SEED=<n>` replays a run.

use std::time::{Duration, Instant};

use bytes::Bytes;
use grinta_proto::claims::ClaimKind;
use grinta_proto::flow::{FlowEvent, FlowId, Recv};
use grinta_proto::membership::{MAX_INCARNATION, MemberState};
use grinta_proto::registry::{EndpointKind, Record, RegistryEvent};
use grinta_proto::tls::dev::DevCa;
use grinta_proto::wire;
use grinta_tests::membership_sim::{Cluster, node_addr, node_name};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};
use prost::Message;

const N: usize = 20;
const LIAR: usize = N - 1;
/// Rounds of the attack, half a second apart.
const ROUNDS: usize = 20;
/// Names the liar claims for owners that do not exist.
const GHOST_NAMES: usize = 2000;

fn honest() -> std::ops::Range<usize> {
    0..LIAR
}

fn svc(i: usize) -> String {
    format!("svc-{i}")
}

fn register(c: &mut Cluster<SimulatedNode>, i: usize, name: &str) {
    c.sim
        .with_node(i, |n, now| {
            n.node.register_endpoint(now, name, EndpointKind::Exclusive)
        })
        .expect("registration");
}

/// Whether every honest node resolves every honest service to its owner.
fn names_intact(c: &Cluster<SimulatedNode>) -> bool {
    honest().all(|i| {
        let registry = c.sim.node(i).node.registry();
        honest().all(|x| registry.resolve(&svc(x)) == vec![node_name(x).as_str()])
    })
}

/// What honest node `observer` holds of honest node `x`: (state, incarnation, address).
fn view(
    c: &Cluster<SimulatedNode>,
    observer: usize,
    x: usize,
) -> (MemberState, u64, std::net::SocketAddr) {
    let m = c
        .sim
        .node(observer)
        .node
        .membership()
        .member(&node_name(x))
        .unwrap_or_else(|| panic!("node {observer} forgot node {x}"));
    (m.state, m.incarnation, m.addr)
}

/// The liar signs `claim` with its own key (all a member can sign with).
fn liar_signs(
    c: &mut Cluster<SimulatedNode>,
    kind: ClaimKind,
    claim: &impl Message,
) -> wire::Signed {
    c.sim
        .with_node(LIAR, |n, _| n.node.sign_claim(kind, claim))
        .expect("the liar's key signs")
}

fn member_packet(kind: wire::broadcast::Kind) -> Bytes {
    wire::Packet {
        sender: node_name(LIAR),
        message: None,
        broadcasts: vec![wire::Broadcast { kind: Some(kind) }],
    }
    .encode_to_vec()
    .into()
}

fn record_packet(records: Vec<wire::Signed>, key: &str) -> Bytes {
    member_packet(wire::broadcast::Kind::App(wire::AppBroadcast {
        key: Bytes::copy_from_slice(key.as_bytes()),
        payload: wire::RegistryDelta { records }.encode_to_vec().into(),
    }))
}

fn record(name: &str, owner: &str, owner_incarnation: u64, version: u64) -> wire::EndpointRecord {
    Record {
        name: name.into(),
        owner: owner.into(),
        owner_incarnation,
        version,
        claimed: true,
        kind: EndpointKind::Exclusive,
        value: bytes::Bytes::new(),
        durable: false,
    }
    .to_wire()
}

/// The liar sends `packets` to every honest node.
fn send_to_all(c: &mut Cluster<SimulatedNode>, packets: &[Bytes]) {
    c.sim.with_node(LIAR, |n, now| {
        for target in honest() {
            for p in packets {
                n.node.send_raw_membership_datagram(
                    now,
                    &node_name(target),
                    node_addr(target),
                    p.clone(),
                );
            }
        }
    });
}

/// Every forgery in `x`'s name the liar can make, plus an accusation of its own.
fn forgeries(c: &mut Cluster<SimulatedNode>, x: usize, round: usize) -> Vec<Bytes> {
    use wire::broadcast::Kind;
    let inc = c
        .sim
        .node(LIAR)
        .node
        .membership()
        .member(&node_name(x))
        .map_or(1, |m| m.incarnation);
    let liar_addr = node_addr(LIAR);
    let addr = |a: std::net::SocketAddr| {
        let v4 = match a.ip() {
            std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
            std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        wire::SocketAddress {
            ip: v4.into(),
            port: u32::from(a.port()),
        }
    };
    let mut out = Vec::new();
    // 1. A leave in x's name: x would be Left everywhere, its names dropped, its flows reset.
    let leave = wire::Dead {
        node: node_name(x),
        incarnation: inc,
        from: node_name(x),
    };
    out.push(member_packet(Kind::Dead(liar_signs(
        c,
        ClaimKind::Dead,
        &leave,
    ))));
    // 2. x alive at the liar's address, one incarnation up (the liar's certificate rides along).
    let moved = wire::Alive {
        node: node_name(x),
        incarnation: inc + 1,
        addr: Some(addr(liar_addr)),
        meta: Bytes::new(),
    };
    out.push(member_packet(Kind::Alive(liar_signs(
        c,
        ClaimKind::Alive,
        &moved,
    ))));
    // 3. x pushed near the incarnation bound, so it could never out-announce a suspicion.
    let pushed = wire::Alive {
        node: node_name(x),
        incarnation: MAX_INCARNATION - 1,
        addr: Some(addr(node_addr(x))),
        meta: Bytes::new(),
    };
    out.push(member_packet(Kind::Alive(liar_signs(
        c,
        ClaimKind::Alive,
        &pushed,
    ))));
    // 4. Accusations in another member's name.
    let framed = wire::Dead {
        node: node_name(x),
        incarnation: inc,
        from: node_name((x + 1) % LIAR),
    };
    out.push(member_packet(Kind::Dead(liar_signs(
        c,
        ClaimKind::Dead,
        &framed,
    ))));
    // 5. x's name taken back in x's own name at a lower version, and a name x never claimed.
    let hijack = record(&svc(x), &node_name(x), inc, 0);
    let steal = record(&format!("steal-{x}"), &node_name(x), inc, 1);
    for (r, key) in [(hijack, svc(x)), (steal, format!("steal-{x}"))] {
        let signed = liar_signs(c, ClaimKind::Record, &r);
        out.push(record_packet(
            vec![signed],
            &format!("r/{key}/{}", node_name(x)),
        ));
    }
    // 6. Its own accusations, in its own name: a suspicion and a declared death of x. They
    //    count, once each, as suspicions; x refutes them.
    let suspect = wire::Suspect {
        node: node_name(x),
        incarnation: inc,
        from: node_name(LIAR),
    };
    out.push(member_packet(Kind::Suspect(liar_signs(
        c,
        ClaimKind::Suspect,
        &suspect,
    ))));
    let dead = wire::Dead {
        node: node_name(x),
        incarnation: inc,
        from: node_name(LIAR),
    };
    out.push(member_packet(Kind::Dead(liar_signs(
        c,
        ClaimKind::Dead,
        &dead,
    ))));
    // 7. A chain of its own accusations in one packet, at x's incarnation and the next ones,
    //    to make x refute (and sign) once per accusation.
    let chain: Vec<wire::Broadcast> = (0..6)
        .map(|k| {
            let s = wire::Suspect {
                node: node_name(x),
                incarnation: inc + k,
                from: node_name(LIAR),
            };
            wire::Broadcast {
                kind: Some(Kind::Suspect(liar_signs(c, ClaimKind::Suspect, &s))),
            }
        })
        .collect();
    out.push(
        wire::Packet {
            sender: node_name(LIAR),
            message: None,
            broadcasts: chain,
        }
        .encode_to_vec()
        .into(),
    );
    // 8. Names claimed for owners that do not exist, to block them or fill the directory.
    let per_round = 50;
    for k in 0..per_round {
        let g = (round * per_round + k) % GHOST_NAMES;
        let ghost = record(&format!("free-{g}"), &format!("ghost-{g}"), 1, 1);
        let signed = liar_signs(c, ClaimKind::Record, &ghost);
        out.push(record_packet(
            vec![signed],
            &format!("r/free-{g}/ghost-{g}"),
        ));
    }
    out
}

#[test]
fn a_liar_member_cannot_speak_for_anyone_else() {
    let (seed, _g) = seed(150);
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, N));
    c.form(Duration::from_millis(50 * N as u64));
    for i in honest() {
        register(&mut c, i, &svc(i));
    }
    c.run_until(Duration::from_secs(60), names_intact)
        .expect("names visible everywhere before the attack");

    // Long-lived flows between honest nodes: i dials its neighbour's service.
    let mut flows: Vec<(usize, FlowId, usize)> = Vec::new();
    for i in honest() {
        let to = (i + 1) % LIAR;
        let flow = c
            .sim
            .with_node(i, |n, now| n.node.dial(now, &svc(to)))
            .expect("dial");
        flows.push((i, flow, to));
    }
    c.run_for(Duration::from_secs(1));
    let mut accepted: Vec<Vec<FlowId>> = vec![Vec::new(); N];
    for to in honest() {
        while let Some(f) = c.sim.with_node(to, |n, now| n.node.accept(now, &svc(to))) {
            accepted[to].push(f);
        }
    }
    assert_eq!(
        accepted.iter().map(Vec::len).sum::<usize>(),
        LIAR,
        "every flow accepted"
    );

    // Genuine claims to replay later: each honest node's alive as it is now, and a record of a
    // name that node 0 then withdraws.
    let old_alives: Vec<wire::Signed> = honest()
        .map(|x| {
            c.sim
                .node(LIAR)
                .node
                .membership()
                .signed_alive(&node_name(x))
                .expect("the liar knows every member")
                .clone()
        })
        .collect();
    register(&mut c, 0, "temp");
    c.run_for(Duration::from_secs(3));
    let old_record = c
        .sim
        .node(LIAR)
        .node
        .registry()
        .signed_record("temp", &node_name(0))
        .expect("the liar holds node 0's record")
        .clone();
    c.sim
        .with_node(0, |n, now| n.node.unregister_endpoint(now, "temp"))
        .expect("unregister");
    c.run_for(Duration::from_secs(3));

    // The attack: 20 rounds, half a second apart, each against every honest node in turn.
    let t_attack = c.sim.now();
    let mut round = 0;
    let check = |c: &Cluster<SimulatedNode>| {
        for observer in honest() {
            for x in honest().filter(|&x| x != observer) {
                let (state, incarnation, addr) = view(c, observer, x);
                assert!(
                    matches!(state, MemberState::Alive | MemberState::Suspect),
                    "seed {seed}: node {observer} holds node {x} {state:?}"
                );
                assert_eq!(
                    addr,
                    node_addr(x),
                    "seed {seed}: node {x}'s address changed at {observer}"
                );
                assert!(
                    incarnation < 1 << 40,
                    "seed {seed}: node {x} pushed to incarnation {incarnation} at {observer}"
                );
            }
        }
    };
    for _ in 0..ROUNDS {
        for x in honest() {
            let packets = forgeries(&mut c, x, round);
            round += 1;
            send_to_all(&mut c, &packets);
        }
        // Replays of old genuine claims.
        let mut replays: Vec<Bytes> = old_alives
            .iter()
            .map(|a| member_packet(wire::broadcast::Kind::Alive(a.clone())))
            .collect();
        replays.push(record_packet(vec![old_record.clone()], "r/temp/node-0"));
        send_to_all(&mut c, &replays);
        for _ in 0..5 {
            c.run_for(Duration::from_millis(100));
            check(&c);
        }
    }
    c.run_for(Duration::from_secs(10));
    check(&c);

    // No honest node was ever Dead or Left anywhere, and every suspicion the liar raised was
    // refuted.
    for observer in honest() {
        let seen = &c.sim.node(observer).seen;
        for x in honest() {
            let name = node_name(x);
            assert!(
                !seen.dead_events.iter().any(|(_, n)| *n == name),
                "seed {seed}: node {observer} saw node {x} Dead"
            );
            assert!(
                !seen.left.contains_key(&name),
                "seed {seed}: node {observer} saw node {x} Left"
            );
        }
    }
    for observer in honest() {
        for x in honest().filter(|&x| x != observer) {
            assert_eq!(view(&c, observer, x).0, MemberState::Alive, "seed {seed}");
        }
    }

    // No honest name lost, hijacked or blocked; no replayed claim came back; no ghost was
    // taken in.
    assert!(names_intact(&c), "seed {seed}: a name was lost or hijacked");
    for i in honest() {
        let node = &c.sim.node(i).node;
        assert!(
            node.registry().resolve("temp").is_empty(),
            "seed {seed}: replayed record"
        );
        // Not even as a tombstone: a node out-writes a record in its own name only if it
        // signed it itself.
        assert!(
            node.registry()
                .records()
                .all(|r| !r.name.starts_with("steal-")),
            "seed {seed}: node {i} holds a record forged in a member's name"
        );
        assert!(
            node.registry()
                .records()
                .all(|r| !r.owner.starts_with("ghost-")),
            "seed {seed}: node {i} took a record of a node that does not exist"
        );
        let lost = c.sim.node(i).registry_events.iter().any(|(t, e)| {
            *t >= t_attack
                && matches!(e, RegistryEvent::NameRemoved { name } | RegistryEvent::NameConflict { name, .. } if name.starts_with("svc-"))
        });
        assert!(!lost, "seed {seed}: node {i} lost a name during the attack");
        let st = node.membership().stats();
        assert!(st.claims_rejected > 0, "node {i} rejected forged claims");
        // Three packets a round carry accusations of each node (suspect, dead, the chain):
        // at most one refutation each.
        assert!(
            st.refutations <= 3 * ROUNDS as u64 + 1,
            "seed {seed}: node {i} refuted {} times",
            st.refutations
        );
    }
    let totals = honest().fold((0, 0, 0, 0, 0), |t, i| {
        let stats = c.sim.node(i).node.stats();
        (
            t.0 + stats.membership.claims_rejected,
            t.1 + stats.membership.claims_refused,
            t.2 + stats.membership.claims_verified,
            t.3 + stats.records_held,
            t.4 + stats.membership.refutations,
        )
    });
    println!(
        "honest nodes: {} claims rejected, {} refused, {} verified, {} records held for an \
         owner, {} refutations",
        totals.0, totals.1, totals.2, totals.3, totals.4
    );
    for g in [0, GHOST_NAMES / 2, GHOST_NAMES - 1] {
        register(&mut c, g % LIAR, &format!("free-{g}"));
    }

    // Honest flows ran on, untouched: no flow ended, and a message still crosses each.
    for (i, events) in (0..N).map(|i| (i, &c.sim.node(i).flow_events)) {
        for (_, e) in events {
            assert!(
                !matches!(e, FlowEvent::Closed { .. } | FlowEvent::DialFailed { .. }),
                "seed {seed}: node {i}: {e:?}"
            );
        }
    }
    for &(from, flow, _) in &flows {
        c.sim
            .with_node(from, |n, _| {
                n.node.send(flow, Bytes::from_static(b"still here"))
            })
            .expect("send on a flow opened before the attack");
    }
    c.run_for(Duration::from_secs(1));
    for to in honest() {
        for &flow in &accepted[to] {
            let got = c.sim.with_node(to, |n, now| n.node.recv(now, flow));
            assert_eq!(
                got,
                Ok(Recv::Message(Bytes::from_static(b"still here"))),
                "seed {seed}: flow into node {to}"
            );
        }
    }

    // The liar's own suspicion of a member is refuted everywhere within the spec's 2 s.
    let x = 3;
    let inc = view(&c, 0, x).1;
    let suspect = wire::Suspect {
        node: node_name(x),
        incarnation: inc,
        from: node_name(LIAR),
    };
    let claim = liar_signs(&mut c, ClaimKind::Suspect, &suspect);
    send_to_all(
        &mut c,
        &[member_packet(wire::broadcast::Kind::Suspect(claim))],
    );
    let t0: Instant = c.sim.now();
    let refuted = c
        .run_until(Duration::from_secs(30), |c| {
            honest()
                .filter(|&o| o != x)
                .all(|o| matches!(view(c, o, x), (MemberState::Alive, i, _) if i > inc))
        })
        .expect("refuted");
    println!(
        "liar's suspicion refuted everywhere after {refuted:?} (sent at {:?})",
        t0.saturating_duration_since(t_attack)
    );
    assert!(
        refuted <= Duration::from_secs(2),
        "seed {seed}: {refuted:?}"
    );
}
