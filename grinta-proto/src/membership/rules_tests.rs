//! The state rules alone: claims applied straight to a member table, without packets, probes or
//! timers (the rules of `spec/membership.md`, "Member states and incarnation"), and the signed
//! claims rules: a node speaks only for itself.

use super::*;
use crate::claims::{ClaimError, TrustAll};
use rustls::SignatureScheme;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Test keys: a "signature" is the signer's name followed by a digest of the message, so a
/// claim passes only for the signer whose name it carries. Nothing cryptographic: it checks
/// which claims the rules verify, and against whom.
#[derive(Debug)]
struct NamedKeys(String);

fn digest(message: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, message)
        .as_ref()
        .to_vec()
}

impl ClaimKeys for NamedKeys {
    fn sign(&self, message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), ClaimError> {
        let mut signature = self.0.clone().into_bytes();
        signature.push(0);
        signature.extend(digest(message));
        Ok((SignatureScheme::ED25519, signature))
    }

    fn certificates(&self) -> &[Bytes] {
        &[]
    }

    fn verify(
        &mut self,
        signer: &str,
        message: &[u8],
        _scheme: SignatureScheme,
        signature: &[u8],
        _carried: &[Bytes],
    ) -> Result<(), ClaimError> {
        let mut expected = signer.as_bytes().to_vec();
        expected.push(0);
        expected.extend(digest(message));
        if signature == expected {
            Ok(())
        } else {
            Err(ClaimError::BadSignature {
                signer: signer.to_owned(),
            })
        }
    }
}

/// Node `me` that knows `b` (port 7002) alive at incarnation 5.
fn table() -> (Membership, Instant) {
    let now = Instant::now();
    let keys = Box::new(NamedKeys("me".into()));
    let mut m = Membership::new(Config::lan(), "me", addr(7001), 1, now, keys).expect("valid");
    m.handle_alive(now, alive("b", 5, 7002));
    let _ = events(&mut m);
    (m, now)
}

fn signed(signer: &str, kind: ClaimKind, claim: &impl Message) -> wire::Signed {
    claims::sign(
        &NamedKeys(signer.into()),
        kind,
        claim.encode_to_vec(),
        false,
    )
    .unwrap()
}

fn alive_by(signer: &str, node: &str, incarnation: u64, port: u16) -> wire::Signed {
    let alive = wire::Alive {
        node: node.into(),
        incarnation,
        addr: Some(encode_addr(addr(port))),
        meta: Bytes::new(),
    };
    signed(signer, ClaimKind::Alive, &alive)
}

fn alive(node: &str, incarnation: u64, port: u16) -> wire::Signed {
    alive_by(node, node, incarnation, port)
}

fn suspect(node: &str, incarnation: u64, from: &str) -> wire::broadcast::Kind {
    let s = wire::Suspect {
        node: node.into(),
        incarnation,
        from: from.into(),
    };
    wire::broadcast::Kind::Suspect(signed(from, ClaimKind::Suspect, &s))
}

fn dead_by(signer: &str, node: &str, incarnation: u64, from: &str) -> wire::broadcast::Kind {
    let d = wire::Dead {
        node: node.into(),
        incarnation,
        from: from.into(),
    };
    wire::broadcast::Kind::Dead(signed(signer, ClaimKind::Dead, &d))
}

fn dead(node: &str, incarnation: u64, from: &str) -> wire::broadcast::Kind {
    dead_by(from, node, incarnation, from)
}

fn events(m: &mut Membership) -> Vec<Event> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

fn state(m: &Membership, name: &str) -> (MemberState, u64, SocketAddr) {
    let member = m.member(name).expect("known");
    (member.state, member.incarnation, member.addr)
}

#[test]
fn alive_is_accepted_only_above_the_known_incarnation() {
    let (mut m, now) = table();
    assert_eq!(state(&m, "b"), (MemberState::Alive, 5, addr(7002)));
    // Lower and equal incarnations change nothing, even with another address.
    for inc in [1, 4, 5] {
        m.handle_alive(now, alive("b", inc, 7009));
        assert_eq!(
            state(&m, "b"),
            (MemberState::Alive, 5, addr(7002)),
            "inc {inc}"
        );
    }
    assert!(events(&mut m).is_empty());
    m.handle_alive(now, alive("b", 6, 7009));
    assert_eq!(state(&m, "b"), (MemberState::Alive, 6, addr(7009)));
    assert!(matches!(events(&mut m).as_slice(), [Event::MemberUpdated(u)] if u.name == "b"));
    // Beyond the bound a claim could never be refuted: refused and counted.
    let invalid = m.stats().packets_invalid;
    m.handle_alive(now, alive("b", MAX_INCARNATION + 1, 7009));
    assert_eq!(state(&m, "b").1, 6);
    assert_eq!(m.stats().packets_invalid, invalid + 1);
    // Even the member itself may not leap further than the documented step in one claim.
    let refused = m.stats().claims_refused;
    m.handle_alive(now, alive("b", 6 + MAX_INCARNATION_STEP + 1, 7002));
    assert_eq!(state(&m, "b").1, 6);
    assert_eq!(m.stats().claims_refused, refused + 1);
    m.handle_alive(now, alive("b", 6 + MAX_INCARNATION_STEP, 7002));
    assert_eq!(state(&m, "b").1, 6 + MAX_INCARNATION_STEP);
}

#[test]
fn suspect_needs_the_known_incarnation_and_alive_above_it_clears_it() {
    let (mut m, now) = table();
    m.handle_alive(now, alive("c", 1, 7003));
    let _ = events(&mut m);
    m.handle_broadcast(now, suspect("b", 4, "c"), None);
    assert_eq!(state(&m, "b").0, MemberState::Alive, "stale accusation");
    m.handle_broadcast(now, suspect("unknown", 9, "c"), None);
    assert!(m.member("unknown").is_none());
    // An accusation never raises an incarnation: only the member's own alive does.
    m.handle_broadcast(now, suspect("b", 6, "c"), None);
    assert_eq!(state(&m, "b"), (MemberState::Alive, 5, addr(7002)));
    m.handle_broadcast(now, suspect("b", 5, "c"), None);
    assert_eq!(
        state(&m, "b").0,
        MemberState::Suspect,
        "equal overrides Alive"
    );
    assert!(matches!(
        events(&mut m).as_slice(),
        [Event::MemberSuspect { name, incarnation: 5 }] if name == "b"
    ));
    assert!(
        m.poll_timeout().is_some_and(|t| t > now),
        "a suspicion timer runs"
    );
    // An alive at the same incarnation does not clear it; one above does.
    m.handle_alive(now, alive("b", 5, 7002));
    assert_eq!(state(&m, "b").0, MemberState::Suspect);
    m.handle_alive(now, alive("b", 6, 7002));
    assert_eq!(state(&m, "b"), (MemberState::Alive, 6, addr(7002)));
    assert!(matches!(events(&mut m).as_slice(), [Event::MemberAlive(a)] if a.name == "b"));
    assert!(m.suspicions.is_empty());
}

#[test]
fn dead_from_another_is_a_suspicion_and_only_a_leave_from_its_subject_is_final() {
    let (mut m, now) = table();
    for (name, port) in [("c", 7003), ("d", 7004), ("e", 7005)] {
        m.handle_alive(now, alive(name, 1, port));
    }
    let _ = events(&mut m);
    m.handle_broadcast(now, dead("b", 4, "c"), None);
    assert_eq!(state(&m, "b").0, MemberState::Alive, "stale accusation");
    // Another node's declaration of death is its suspicion: b can still refute.
    m.handle_broadcast(now, dead("b", 5, "c"), None);
    assert_eq!(state(&m, "b").0, MemberState::Suspect);
    assert!(matches!(
        events(&mut m).as_slice(),
        [Event::MemberSuspect { name, incarnation: 5 }] if name == "b"
    ));
    // This node declares it dead when its own timer runs out.
    let deadline = m.suspicions["b"].deadline;
    m.handle_timeout(deadline);
    assert_eq!(state(&m, "b").0, MemberState::Dead);
    assert!(
        events(&mut m)
            .iter()
            .any(|e| matches!(e, Event::MemberDead { name, incarnation: 5 } if name == "b"))
    );
    // Already dead: a second accusation changes nothing.
    m.handle_broadcast(now, dead("b", 5, "d"), None);
    assert_eq!(state(&m, "b").0, MemberState::Dead);
    assert!(events(&mut m).is_empty());
    // But the member's own leave is its word that it went on purpose: it becomes Left, is no
    // longer retried as a failed member, and may come back with a newer life.
    m.handle_broadcast(now, dead("b", 5, "b"), None);
    assert_eq!(state(&m, "b").0, MemberState::Left);
    assert!(matches!(events(&mut m).as_slice(), [Event::MemberLeft { name, .. }] if name == "b"));
    assert!(m.failed.iter().all(|f| f.name != "b"));
    // Left is final: no accusation, no replayed alive of the same life brings it back.
    m.handle_broadcast(now, dead("b", 5, "d"), None);
    m.handle_alive(now, alive("b", 5, 7009));
    assert_eq!(state(&m, "b"), (MemberState::Left, 5, addr(7002)));
    m.handle_alive(now, alive("b", 6, 7002));
    assert_eq!(state(&m, "b"), (MemberState::Alive, 6, addr(7002)));

    m.handle_broadcast(now, dead("c", 1, "c"), None);
    assert_eq!(state(&m, "c").0, MemberState::Left);
}

#[test]
fn a_node_refutes_accusations_at_its_incarnation_and_refuses_those_above() {
    let (mut m, now) = table();
    assert_eq!(m.incarnation(), 1);
    m.handle_broadcast(now, suspect("me", 1, "b"), None);
    assert_eq!(m.incarnation(), 2, "own + 1");
    // Within one packet, a chain of accusations (at 2, then 3, ...) advances it once.
    m.handle_broadcast(now, dead("me", 2, "b"), None);
    assert_eq!(m.incarnation(), 2, "one refutation per input");
    m.refuted_in_input = false; // the next packet
    m.handle_broadcast(now, dead("me", 2, "b"), None);
    assert_eq!(m.incarnation(), 3);
    assert!(matches!(
        events(&mut m).as_slice(),
        [
            Event::Refuted { incarnation: 2 },
            Event::Refuted { incarnation: 3 }
        ]
    ));
    // Nobody knows a newer life of this node than itself: an accusation above its incarnation
    // (which would push it towards the maximum) is refused.
    let refused = m.stats().claims_refused;
    m.handle_broadcast(now, dead("me", 9, "b"), None);
    m.handle_broadcast(now, suspect("me", MAX_INCARNATION - 1, "b"), None);
    assert_eq!(m.incarnation(), 3);
    assert_eq!(m.stats().claims_refused, refused + 2);
    // A stale accusation needs no refutation.
    m.handle_broadcast(now, suspect("me", 2, "b"), None);
    assert_eq!(m.incarnation(), 3);
    // An accusation at the bound leaves no room to refute: refused.
    m.handle_broadcast(now, suspect("me", MAX_INCARNATION, "b"), None);
    assert_eq!(m.incarnation(), 3);
    assert!(m.member("me").is_none(), "a node is not its own member");
}

#[test]
fn a_member_cannot_speak_for_another() {
    let (mut m, now) = table();
    m.handle_alive(now, alive("liar", 1, 7066));
    let _ = events(&mut m);
    let rejected = m.stats().claims_rejected;
    // A leave, an alive (a new address, a huge incarnation) and a death in b's name, signed by
    // the liar: all dropped and counted.
    m.handle_broadcast(now, dead_by("liar", "b", 5, "b"), None);
    m.handle_alive(now, alive_by("liar", "b", 6, 7066));
    m.handle_alive(now, alive_by("liar", "b", MAX_INCARNATION - 1, 7002));
    m.handle_broadcast(now, dead_by("liar", "b", 5, "c"), None);
    assert_eq!(state(&m, "b"), (MemberState::Alive, 5, addr(7002)));
    assert_eq!(m.stats().claims_rejected, rejected + 2);
    // The leap to the maximum is refused before its signature, and so is the death claimed in
    // c's name: c is no current member.
    assert_eq!(m.stats().claims_refused, 2);
    // The liar's own accusation counts as a suspicion, which b refutes.
    m.handle_broadcast(now, dead("b", 5, "liar"), None);
    assert_eq!(state(&m, "b").0, MemberState::Suspect);
    // Forged news about this node itself changes nothing either.
    m.handle_alive(now, alive_by("liar", "me", 1_000, 7001));
    m.handle_broadcast(now, dead_by("liar", "me", 1, "me"), None);
    assert_eq!(m.incarnation(), 1);
    assert!(
        events(&mut m)
            .iter()
            .all(|e| !matches!(e, Event::Refuted { .. }))
    );
    // A new member is only ever taken from its own claim.
    m.handle_alive(now, alive_by("liar", "ghost", 1, 7099));
    assert!(m.member("ghost").is_none());
}

#[test]
fn claims_that_change_nothing_cost_no_verification() {
    let (mut m, now) = table();
    let verified = m.stats().claims_verified;
    for _ in 0..100 {
        m.handle_alive(now, alive("b", 5, 7002));
        m.handle_alive(now, alive("b", 3, 7002));
    }
    assert_eq!(m.stats().claims_verified, verified);
}

#[test]
fn a_new_member_is_inserted_into_the_probe_walk_once() {
    let (mut m, now) = table();
    for name in ["c", "d", "e"] {
        m.handle_alive(now, alive(name, 1, 7010));
        m.handle_alive(now, alive(name, 1, 7010));
    }
    let mut order: Vec<&str> = m
        .probe_order
        .iter()
        .map(|&i| m.members[i as usize].name())
        .collect();
    order.sort();
    assert_eq!(order, ["b", "c", "d", "e"]);
    assert_eq!(
        events(&mut m)
            .iter()
            .filter(|e| matches!(e, Event::MemberJoined(_)))
            .count(),
        3
    );
}

#[test]
fn trust_all_takes_unsigned_claims() {
    let now = Instant::now();
    let mut m =
        Membership::new(Config::lan(), "me", addr(7001), 1, now, Box::new(TrustAll)).unwrap();
    let claim = claims::sign(
        &TrustAll,
        ClaimKind::Alive,
        wire::Alive {
            node: "b".into(),
            incarnation: 1,
            addr: Some(encode_addr(addr(7002))),
            meta: Bytes::new(),
        }
        .encode_to_vec(),
        true,
    )
    .unwrap();
    m.handle_alive(now, claim);
    assert_eq!(state(&m, "b").0, MemberState::Alive);
}

#[test]
fn peeking_an_alive_reads_what_decoding_reads() {
    let body = |node: &str, incarnation: u64, meta: &'static [u8]| {
        wire::Alive {
            node: node.into(),
            incarnation,
            addr: Some(encode_addr(addr(7002))),
            meta: Bytes::from_static(meta),
        }
        .encode_to_vec()
    };
    for (node, incarnation, meta) in [
        ("b", 1, &b""[..]),
        ("node-9999", u64::MAX, &b"tags"[..]),
        ("x", 0, &[0u8; 300][..]),
    ] {
        let mut encoded = body(node, incarnation, meta);
        assert_eq!(super::peek_alive(&encoded), Some((node, incarnation)));
        // An unknown field is skipped, as decoding skips it.
        encoded.extend_from_slice(&[0x78, 0x05]);
        assert_eq!(super::peek_alive(&encoded), Some((node, incarnation)));
        // Every cut either peeks what the full decode reads, or gives up.
        for cut in 0..encoded.len() {
            let part = &encoded[..cut];
            if let Some(peeked) = super::peek_alive(part) {
                let decoded = wire::Alive::decode(part).expect("decodes where peeking did");
                assert_eq!(peeked, (decoded.node.as_str(), decoded.incarnation));
            }
        }
    }
    assert_eq!(super::peek_alive(&[0xff, 0xff]), None);
}

#[test]
fn old_news_is_dropped_before_decoding_but_a_dead_member_back_elsewhere_is_not() {
    let (mut m, now) = table();
    m.handle_alive(now, alive("c", 5, 7010));
    let verified = m.stats().claims_verified;
    // The same and older incarnations change nothing and check no signature.
    m.handle_alive(now, alive("c", 5, 7010));
    m.handle_alive(now, alive("c", 4, 7010));
    assert_eq!(m.stats().claims_verified, verified);
    assert_eq!(state(&m, "c").0, MemberState::Alive);
}
