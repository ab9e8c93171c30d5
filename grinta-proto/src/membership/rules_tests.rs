//! The state rules alone: claims applied straight to a member table, without packets, probes or
//! timers (the rules of `spec/membership.md`, "Member states and incarnation").

use super::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Node `me` that knows `b` (port 7002) alive at incarnation 5.
fn table() -> (Membership, Instant) {
    let now = Instant::now();
    let mut m = Membership::new(Config::lan(), "me", addr(7001), 1, now).expect("valid");
    m.apply_alive(now, alive("b", 5, 7002));
    let _ = events(&mut m);
    (m, now)
}

fn alive(node: &str, incarnation: u64, port: u16) -> wire::Alive {
    wire::Alive {
        node: node.into(),
        incarnation,
        addr: Some(encode_addr(addr(port))),
        meta: Bytes::new(),
    }
}

fn suspect(node: &str, incarnation: u64, from: &str) -> wire::Suspect {
    wire::Suspect {
        node: node.into(),
        incarnation,
        from: from.into(),
    }
}

fn dead(node: &str, incarnation: u64, from: &str) -> wire::Dead {
    wire::Dead {
        node: node.into(),
        incarnation,
        from: from.into(),
    }
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
        m.apply_alive(now, alive("b", inc, 7009));
        assert_eq!(
            state(&m, "b"),
            (MemberState::Alive, 5, addr(7002)),
            "inc {inc}"
        );
    }
    assert!(events(&mut m).is_empty());
    m.apply_alive(now, alive("b", 6, 7009));
    assert_eq!(state(&m, "b"), (MemberState::Alive, 6, addr(7009)));
    assert!(matches!(events(&mut m).as_slice(), [Event::MemberUpdated(u)] if u.name == "b"));
    // Beyond the bound a claim could never be refuted: refused and counted.
    let invalid = m.stats().packets_invalid;
    m.apply_alive(now, alive("b", MAX_INCARNATION + 1, 7009));
    assert_eq!(state(&m, "b").1, 6);
    assert_eq!(m.stats().packets_invalid, invalid + 1);
}

#[test]
fn suspect_needs_at_least_the_known_incarnation_and_alive_above_it_clears_it() {
    let (mut m, now) = table();
    m.apply_suspect(now, suspect("b", 4, "c"), None);
    assert_eq!(state(&m, "b").0, MemberState::Alive, "stale accusation");
    m.apply_suspect(now, suspect("unknown", 9, "c"), None);
    assert!(m.member("unknown").is_none());
    m.apply_suspect(now, suspect("b", 5, "c"), None);
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
    m.apply_alive(now, alive("b", 5, 7002));
    assert_eq!(state(&m, "b").0, MemberState::Suspect);
    m.apply_alive(now, alive("b", 6, 7002));
    assert_eq!(state(&m, "b"), (MemberState::Alive, 6, addr(7002)));
    assert!(matches!(events(&mut m).as_slice(), [Event::MemberAlive(a)] if a.name == "b"));
    assert!(m.suspicions.is_empty());
}

#[test]
fn dead_from_another_is_dead_from_its_subject_is_left_and_both_are_final() {
    let (mut m, now) = table();
    m.apply_dead(now, dead("b", 4, "c"), None);
    assert_eq!(state(&m, "b").0, MemberState::Alive, "stale accusation");
    m.apply_dead(now, dead("b", 5, "c"), None);
    assert_eq!(state(&m, "b").0, MemberState::Dead);
    assert!(matches!(
        events(&mut m).as_slice(),
        [Event::MemberDead { name, incarnation: 5 }] if name == "b"
    ));
    // Already dead: a second accusation changes nothing.
    m.apply_dead(now, dead("b", 5, "d"), None);
    assert_eq!(state(&m, "b").0, MemberState::Dead);
    assert!(events(&mut m).is_empty());
    // But the member's own leave is its word that it went on purpose (a refinement of the
    // spec, which ignores any dead claim about a Dead member): it becomes Left, is no longer
    // retried as a failed member, and may come back at once.
    m.apply_dead(now, dead("b", 5, "b"), None);
    assert_eq!(state(&m, "b").0, MemberState::Left);
    assert!(matches!(events(&mut m).as_slice(), [Event::MemberLeft { name, .. }] if name == "b"));
    assert!(m.failed.iter().all(|f| f.name != "b"));
    // Left is final.
    m.apply_dead(now, dead("b", 6, "d"), None);
    assert_eq!(state(&m, "b").0, MemberState::Left);

    m.apply_alive(now, alive("c", 2, 7003));
    let _ = events(&mut m);
    m.apply_dead(now, dead("c", 2, "c"), None);
    assert_eq!(state(&m, "c").0, MemberState::Left);
    assert!(matches!(
        events(&mut m).as_slice(),
        [Event::MemberLeft { name, incarnation: 2 }] if name == "c"
    ));
}

#[test]
fn a_node_refutes_accusations_about_itself_above_the_accused_incarnation() {
    let (mut m, now) = table();
    assert_eq!(m.incarnation(), 1);
    m.apply_suspect(now, suspect("me", 1, "b"), None);
    assert_eq!(m.incarnation(), 2, "max(own + 1, accused + 1)");
    m.apply_dead(now, dead("me", 9, "b"), None);
    assert_eq!(m.incarnation(), 10);
    assert!(matches!(
        events(&mut m).as_slice(),
        [
            Event::Refuted { incarnation: 2 },
            Event::Refuted { incarnation: 10 }
        ]
    ));
    // A stale accusation needs no refutation.
    m.apply_suspect(now, suspect("me", 3, "b"), None);
    assert_eq!(m.incarnation(), 10);
    // An accusation at the bound leaves no room to refute: refused.
    m.apply_suspect(now, suspect("me", MAX_INCARNATION, "b"), None);
    assert_eq!(m.incarnation(), 10);
    assert!(m.member("me").is_none(), "a node is not its own member");
}

#[test]
fn a_new_member_is_inserted_into_the_probe_walk_once() {
    let (mut m, now) = table();
    for name in ["c", "d", "e"] {
        m.apply_alive(now, alive(name, 1, 7010));
        m.apply_alive(now, alive(name, 1, 7010));
    }
    let mut order = m.probe_order.clone();
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
