//! Registry unit tests and merge properties.

use super::*;
use proptest::prelude::*;

fn reg(name: &str) -> Registry {
    Registry::new(name, RegistryLimits::default())
}

fn drain(r: &mut Registry) -> Vec<RegistryEvent> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

#[test]
fn register_spreads_and_unregister_leaves_a_tombstone() {
    let now = Instant::now();
    let mut a = reg("a");
    let mut b = reg("b");
    let claim = a.register("svc", EndpointKind::Exclusive, now).unwrap();
    assert!(b.merge(claim.clone(), now));
    assert!(!b.merge(claim, now), "merging twice changes nothing");
    assert_eq!(b.owners("svc"), vec!["a"]);
    assert_eq!(
        drain(&mut b),
        vec![RegistryEvent::NameAdded { name: "svc".into() }]
    );
    let tomb = a.unregister("svc", now).unwrap();
    assert!(!tomb.claimed);
    assert!(b.merge(tomb, now));
    assert!(b.owners("svc").is_empty());
    assert_eq!(
        drain(&mut b),
        vec![RegistryEvent::NameRemoved { name: "svc".into() }]
    );
    assert_eq!(b.len(), 1, "the tombstone stays for a while");
    b.handle_timeout(now + RegistryLimits::default().tombstone_ttl);
    assert!(b.is_empty(), "then it is collected");
}

#[test]
fn names_are_validated() {
    let now = Instant::now();
    let mut a = reg("a");
    for bad in ["", "a/b", "sp ace", "é", &"x".repeat(129)] {
        assert!(matches!(
            a.register(bad, EndpointKind::Exclusive, now),
            Err(RegistryError::InvalidName { .. })
        ));
    }
    assert!(
        a.register(&"x".repeat(128), EndpointKind::Exclusive, now)
            .is_ok()
    );
}

#[test]
fn taken_names_and_kind_mismatches_are_refused() {
    let now = Instant::now();
    let mut a = reg("a");
    let mut b = reg("b");
    b.merge(
        a.register("svc", EndpointKind::Exclusive, now).unwrap(),
        now,
    );
    assert_eq!(
        b.register("svc", EndpointKind::Exclusive, now),
        Err(RegistryError::NameTaken {
            name: "svc".into(),
            owner: "a".into()
        })
    );
    assert!(matches!(
        b.register("svc", EndpointKind::Group, now),
        Err(RegistryError::KindMismatch { .. })
    ));
    assert_eq!(
        a.register("svc", EndpointKind::Exclusive, now),
        Err(RegistryError::AlreadyRegistered { name: "svc".into() })
    );
    assert_eq!(
        a.unregister("nope", now),
        Err(RegistryError::NotRegistered {
            name: "nope".into()
        })
    );
}

#[test]
fn concurrent_exclusive_claims_resolve_to_the_lowest_version_and_the_loser_is_told() {
    let now = Instant::now();
    let mut a = reg("a");
    let mut b = reg("b");
    // b has a higher Lamport clock, so its claim is newer.
    b.register("warmup", EndpointKind::Group, now).unwrap();
    let ca = a.register("svc", EndpointKind::Exclusive, now).unwrap();
    let cb = b.register("svc", EndpointKind::Exclusive, now).unwrap();
    assert!(ca.version < cb.version);
    drain(&mut a);
    drain(&mut b);
    b.merge(ca.clone(), now);
    a.merge(cb.clone(), now);
    assert_eq!(a.resolve("svc"), vec!["a"]);
    assert_eq!(b.resolve("svc"), vec!["a"]);
    assert!(!b.is_local("svc"), "the loser withdrew its claim");
    assert!(b.lost_conflict("svc") && !a.lost_conflict("svc"));
    assert_eq!(
        drain(&mut b),
        vec![RegistryEvent::NameConflict {
            name: "svc".into(),
            winner: "a".into()
        }]
    );
    assert!(drain(&mut a).is_empty(), "the winner is not disturbed");
    // The loser's tombstone spreads; the winner ends with a single owner too.
    let tomb = b.poll_outgoing().expect("tombstone to gossip");
    a.merge(tomb, now);
    assert_eq!(a.owners("svc"), vec!["a"]);
}

#[test]
fn group_names_have_many_owners() {
    let now = Instant::now();
    let mut a = reg("a");
    let mut b = reg("b");
    let mut c = reg("c");
    let ra = a.register("workers", EndpointKind::Group, now).unwrap();
    let rb = b.register("workers", EndpointKind::Group, now).unwrap();
    c.merge(ra, now);
    c.merge(rb, now);
    assert_eq!(c.resolve("workers"), vec!["a", "b"]);
    c.drop_owner("a", 1, now);
    assert_eq!(c.resolve("workers"), vec!["b"]);
}

#[test]
fn records_of_a_gone_owner_are_dropped_and_refused_until_it_returns() {
    let now = Instant::now();
    let mut a = reg("a");
    let mut c = reg("c");
    let r = a.register("svc", EndpointKind::Exclusive, now).unwrap();
    c.merge(r.clone(), now);
    c.drop_owner("a", 1, now);
    assert!(c.owners("svc").is_empty());
    assert!(!c.merge(r, now), "a stale copy does not bring it back");
    // a refutes (incarnation 2) and re-issues its records.
    a.set_local_incarnation(2, now);
    c.owner_alive("a", 2);
    let reissued = a.poll_outgoing().unwrap();
    assert_eq!(reissued.owner_incarnation, 2);
    assert!(c.merge(reissued, now));
    assert_eq!(c.owners("svc"), vec!["a"]);
}

#[test]
fn stale_records_about_ourselves_are_out_written() {
    let now = Instant::now();
    let mut a = reg("a");
    // A previous life of `a` claimed "old" at version 7.
    let stale = Record {
        name: "old".into(),
        owner: "a".into(),
        owner_incarnation: 1,
        version: 7,
        claimed: true,
        kind: EndpointKind::Exclusive,
        value: bytes::Bytes::new(),
        durable: false,
    };
    assert!(!a.merge(stale, now));
    let fix = a.poll_outgoing().expect("a correction");
    assert!(!fix.claimed && fix.version > 7, "{fix:?}");
    assert!(!a.is_local("old"));
}

#[test]
fn limits_are_enforced() {
    let now = Instant::now();
    let mut a = Registry::new(
        "a",
        RegistryLimits {
            max_records: 3,
            max_local_endpoints: 2,
            ..RegistryLimits::default()
        },
    );
    a.register("e1", EndpointKind::Exclusive, now).unwrap();
    a.register("e2", EndpointKind::Exclusive, now).unwrap();
    assert_eq!(
        a.register("e3", EndpointKind::Exclusive, now),
        Err(RegistryError::LimitReached {
            what: "max_local_endpoints",
            limit: 2
        })
    );
    let foreign = |n: &str| Record {
        name: n.into(),
        owner: "z".into(),
        owner_incarnation: 1,
        version: 1,
        claimed: true,
        kind: EndpointKind::Group,
        value: bytes::Bytes::new(),
        durable: false,
    };
    assert!(a.merge(foreign("f1"), now));
    assert!(!a.merge(foreign("f2"), now), "table full");
    assert_eq!(a.len(), 3);
}

#[test]
fn prefix_listing() {
    let now = Instant::now();
    let mut a = reg("a");
    for n in ["app.one", "app.two", "apple", "db"] {
        a.register(n, EndpointKind::Exclusive, now).unwrap();
    }
    assert_eq!(a.names("app."), vec!["app.one", "app.two"]);
    assert_eq!(a.names("app").len(), 3);
    assert_eq!(a.names("").len(), 4);
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        0u8..4,
        0u8..4,
        1u64..3,
        1u64..6,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(n, o, inc, version, claimed, group)| Record {
            name: format!("n{n}"),
            owner: format!("o{o}"),
            owner_incarnation: inc,
            version,
            claimed,
            kind: if group {
                EndpointKind::Group
            } else {
                EndpointKind::Exclusive
            },
            value: bytes::Bytes::new(),
            durable: false,
        })
}

fn table(r: &Registry) -> Vec<Record> {
    r.records().cloned().collect()
}

fn merged(records: &[Record]) -> Registry {
    let now = Instant::now();
    let mut r = reg("observer");
    for rec in records {
        r.merge(rec.clone(), now);
    }
    r
}

proptest! {
    /// Order does not matter (commutativity), repeating does not matter (idempotence).
    #[test]
    fn merge_is_commutative_and_idempotent(
        records in proptest::collection::vec(arb_record(), 0..24),
        seed in any::<u64>(),
    ) {
        let mut shuffled = records.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut doubled = shuffled.clone();
        doubled.extend(records.iter().cloned());
        prop_assert_eq!(table(&merged(&records)), table(&merged(&shuffled)));
        prop_assert_eq!(table(&merged(&records)), table(&merged(&doubled)));
    }

    /// Merging states in any grouping gives the same state (associativity).
    #[test]
    fn merge_is_associative(
        a in proptest::collection::vec(arb_record(), 0..12),
        b in proptest::collection::vec(arb_record(), 0..12),
        c in proptest::collection::vec(arb_record(), 0..12),
    ) {
        let now = Instant::now();
        let state = |r: &Registry| table(r);
        // (a + b) + c
        let mut ab = merged(&a);
        for rec in state(&merged(&b)) { ab.merge(rec, now); }
        for rec in state(&merged(&c)) { ab.merge(rec, now); }
        // a + (b + c)
        let mut bc = merged(&b);
        for rec in state(&merged(&c)) { bc.merge(rec, now); }
        let mut a_bc = merged(&a);
        for rec in state(&bc) { a_bc.merge(rec, now); }
        prop_assert_eq!(state(&ab), state(&a_bc));
    }
}

#[test]
fn versions_and_incarnations_beyond_the_bounds_are_refused_without_panic() {
    let now = Instant::now();
    let mut owner = reg("a");
    owner.register("svc", EndpointKind::Exclusive, now).unwrap();
    let forged = |version, owner_incarnation| Record {
        name: "svc".into(),
        owner: "a".into(),
        owner_incarnation,
        version,
        claimed: true,
        kind: EndpointKind::Exclusive,
        value: bytes::Bytes::new(),
        durable: false,
    };
    // A relayed record "from" the owner itself with an absurd version: refused, no panic.
    for version in [MAX_RECORD_VERSION + 1, u64::MAX] {
        assert!(!owner.merge(forged(version, 1), now));
        assert!(!owner.merge(forged(1, crate::membership::MAX_INCARNATION + 1), now));
        let wire = forged(version, 1).to_wire();
        assert!(Record::from_wire(&wire).is_none(), "refused on decode");
    }
    // At the bound itself the owner out-writes it and keeps working; its clock moved by at
    // most MAX_VERSION_STEP, so it keeps room for new writes.
    assert!(!owner.merge(forged(MAX_RECORD_VERSION, 1), now));
    let correction = owner.poll_outgoing().expect("a correction");
    assert!(
        correction.version <= MAX_VERSION_STEP + 2,
        "{}",
        correction.version
    );
    let tomb = owner.unregister("svc", now).unwrap();
    assert!(tomb.version > correction.version, "the clock did not wrap");
    let again = owner.register("svc", EndpointKind::Exclusive, now).unwrap();
    assert!(again.supersedes(&tomb));
    // Another node refuses what is beyond the bound, whatever it held before.
    let mut other = reg("b");
    assert!(other.merge(forged(MAX_RECORD_VERSION, 1), now));
    assert!(!other.merge(forged(u64::MAX, 1), now));
    assert_eq!(other.owners("svc"), vec!["a"]);
}

#[test]
fn a_later_life_of_an_owner_wins_and_departed_owners_are_bounded() {
    let now = Instant::now();
    let mut c = reg("c");
    // The last life wrote many versions; the next life's clock starts again.
    let old = Record {
        name: "svc".into(),
        owner: "a".into(),
        owner_incarnation: 5,
        version: 1_000,
        claimed: true,
        kind: EndpointKind::Exclusive,
        value: bytes::Bytes::new(),
        durable: false,
    };
    let new = Record {
        owner_incarnation: 9,
        version: 1,
        ..old.clone()
    };
    assert!(c.merge(new.clone(), now));
    assert!(
        !c.merge(old.clone(), now),
        "a late record of the old life loses"
    );
    assert_eq!(c.records().next(), Some(&new));

    // Ten thousand departures within the bound of 100: the oldest are forgotten first.
    let limits = RegistryLimits {
        max_departed_owners: 100,
        departed_owner_ttl: Duration::from_secs(60),
        ..RegistryLimits::default()
    };
    let mut d = Registry::new("d", limits);
    for i in 0..10_000u64 {
        d.drop_owner(&format!("n{i}"), 3, now + Duration::from_millis(i));
        assert!(d.departed_owners() <= 100);
    }
    let late = Record {
        owner: "n9999".into(),
        owner_incarnation: 3,
        ..old.clone()
    };
    assert!(
        !d.merge(late.clone(), now),
        "a remembered departure refuses its life"
    );
    assert!(
        d.merge(
            Record {
                owner: "n0".into(),
                ..late.clone()
            },
            now
        ),
        "the oldest were forgotten"
    );
    // And all expire after the TTL.
    let deadline = d.poll_timeout().expect("expiry scheduled");
    assert_eq!(
        deadline,
        now + Duration::from_millis(9_900) + Duration::from_secs(60),
        "the oldest remembered departure"
    );
    d.handle_timeout(now + Duration::from_secs(71));
    assert_eq!(d.departed_owners(), 0);
    assert_eq!(d.poll_timeout(), None);
}

#[test]
fn a_claim_reissued_under_a_new_incarnation_keeps_its_precedence() {
    let now = Instant::now();
    let mut a = reg("a");
    let mut b = reg("b");
    let first = a.register("leader", EndpointKind::Exclusive, now).unwrap();
    // a refutes a suspicion: its claim is re-issued under the new incarnation, same version.
    a.set_local_incarnation(2, now);
    let reissued = a.poll_outgoing().unwrap();
    assert_eq!(reissued.version, first.version);
    assert_eq!(reissued.owner_incarnation, 2);
    assert!(reissued.supersedes(&first));
    // b claimed the name concurrently at the same version: the tie goes to the lower name on
    // both sides, whichever of a's records b saw.
    let theirs = b.register("leader", EndpointKind::Exclusive, now).unwrap();
    assert_eq!(theirs.version, first.version);
    b.merge(first, now);
    b.merge(reissued, now);
    a.merge(theirs, now);
    assert_eq!(a.resolve("leader"), vec!["a"]);
    assert_eq!(b.resolve("leader"), vec!["a"]);
}

// ----- the key/value table ----------------------------------------------------------------------

/// Delivers every record each node wrote (its writes and the withdrawals it made) to every
/// other node, until nothing new is produced.
fn sync_all(nodes: &mut [Registry], written: &mut [Vec<Record>], now: Instant) {
    loop {
        let mut moved = false;
        for (i, node) in nodes.iter_mut().enumerate() {
            while let Some(r) = node.poll_outgoing() {
                written[i].push(r);
            }
        }
        for (from, records) in written.iter().enumerate() {
            for (to, node) in nodes.iter_mut().enumerate() {
                if from != to {
                    for r in records {
                        moved |= node.merge(r.clone(), now);
                    }
                }
            }
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            while let Some(r) = node.poll_outgoing() {
                written[i].push(r);
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn the_last_write_of_a_key_wins_and_a_delete_is_a_write() {
    let now = Instant::now();
    let mut nodes = [reg("a"), reg("b")];
    let mut written = vec![Vec::new(), Vec::new()];
    written[0].push(nodes[0].put("k", "1".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    assert_eq!(&nodes[1].get("k").unwrap().value[..], b"1");
    // b overwrites: a withdraws its entry, without outranking b's.
    written[1].push(nodes[1].put("k", "2".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    for n in &nodes {
        let e = n.get("k").unwrap();
        assert_eq!((&e.value[..], e.owner.as_str()), (&b"2"[..], "b"));
    }
    // b fails: the key vanishes (a's old value does not come back).
    nodes[0].drop_owner("b", 1, now);
    assert!(nodes[0].get("k").is_none());
    // a deletes a key b wrote.
    let mut nodes = [reg("a"), reg("b")];
    let mut written = vec![Vec::new(), Vec::new()];
    written[1].push(nodes[1].put("x", "v".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    let tombstone = nodes[0].delete("x", now).unwrap().expect("x held an entry");
    written[0].push(tombstone);
    assert!(nodes[0].delete("x", now).unwrap().is_none(), "nothing left");
    sync_all(&mut nodes, &mut written, now);
    assert!(nodes.iter().all(|n| n.get("x").is_none()));
    // Written again after the delete: it is back.
    written[1].push(nodes[1].put("x", "w".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    assert!(nodes.iter().all(|n| n.get("x").is_some()));
    assert_eq!(nodes[0].entries("").len(), 1);
    assert!(
        nodes[0].resolve("x").is_empty(),
        "an entry is not an endpoint"
    );
}

#[test]
fn keys_values_and_table_sizes_are_bounded() {
    let now = Instant::now();
    let mut a = Registry::new(
        "a",
        RegistryLimits {
            max_local_endpoints: 300,
            max_records: 500,
            ..RegistryLimits::key_value()
        },
    );
    assert!(a.put(&"k".repeat(MAX_KEY_LEN), Bytes::new(), now).is_ok());
    assert!(matches!(
        a.put(&"k".repeat(MAX_KEY_LEN + 1), Bytes::new(), now),
        Err(RegistryError::InvalidName { .. })
    ));
    assert!(a.put("a b", Bytes::new(), now).is_err());
    assert!(a.put("", Bytes::new(), now).is_err());
    assert!(a.put("v", vec![0u8; MAX_VALUE_LEN].into(), now).is_ok());
    assert_eq!(
        a.put("v", vec![0u8; MAX_VALUE_LEN + 1].into(), now),
        Err(RegistryError::ValueTooLarge {
            len: MAX_VALUE_LEN + 1,
            limit: MAX_VALUE_LEN
        })
    );
    // 10,000 writes of distinct keys: 300 taken, the rest refused; rewriting a key is free.
    let taken = (0..10_000)
        .filter(|i| a.put(&format!("key/{i}"), "x".into(), now).is_ok())
        .count();
    assert_eq!(taken, 298, "two keys were written above");
    assert!(a.put("key/0", "again".into(), now).is_ok());
    // Deleting frees a slot.
    assert!(a.delete("key/1", now).unwrap().is_some());
    assert!(a.put("key/new", "x".into(), now).is_ok());
    // Another node's 10,000 entries: the table stops at max_records.
    let mut b = Registry::new("b", RegistryLimits::key_value());
    let mut merged = 0;
    for i in 0..10_000 {
        let r = b.put(&format!("b/{i}"), "y".into(), now).unwrap();
        merged += usize::from(a.merge(r, now));
    }
    assert_eq!(a.len(), 500);
    assert!(merged < 500);
    assert_eq!(a.records_refused(), 10_000 - merged as u64);
    // Malformed entries from the wire are refused.
    let mut bad = b.put("ok", "v".into(), now).unwrap().to_wire();
    bad.value = vec![0u8; MAX_VALUE_LEN + 1].into();
    assert!(Record::from_wire(&bad).is_none());
    let mut bad = b.delete("ok", now).unwrap().unwrap().to_wire();
    bad.value = "x".into();
    assert!(
        Record::from_wire(&bad).is_none(),
        "a tombstone carries no value"
    );
    let mut bad = b.put("ok", "v".into(), now).unwrap().to_wire();
    bad.kind = wire::EndpointKind::Exclusive as i32;
    assert!(
        Record::from_wire(&bad).is_none(),
        "an endpoint carries no value"
    );
    assert!(b.register("svc", EndpointKind::Value, now).is_err());
}

#[test]
fn durable_entries_are_listed_for_takeover_only_while_they_are_the_last_write() {
    let now = Instant::now();
    let mut nodes = [reg("a"), reg("b")];
    let mut written = vec![Vec::new(), Vec::new()];
    written[1].push(nodes[1].put_durable("d", "1".into(), now).unwrap());
    written[1].push(nodes[1].put("plain", "2".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    let listed = nodes[0].durable_entries_of("b");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].durable && listed[0].name == "d");
    // Taken over by a: a's write wins, b's entry is no longer b's to hand on.
    written[0].push(
        nodes[0]
            .put_durable("d", listed[0].value.clone(), now)
            .unwrap(),
    );
    sync_all(&mut nodes, &mut written, now);
    assert!(nodes[0].durable_entries_of("b").is_empty());
    assert_eq!(nodes[1].get("d").unwrap().owner, "a");
    assert!(nodes[1].get("d").unwrap().durable);
    // An endpoint record marked durable is malformed.
    let mut bad = nodes[0]
        .register("svc", EndpointKind::Group, now)
        .unwrap()
        .to_wire();
    bad.durable = true;
    assert!(Record::from_wire(&bad).is_none());
}

proptest! {
    /// Three writers put and delete two keys, syncing at random moments: once everything is
    /// delivered, every node holds the same entry for each key, and it is the write with the
    /// highest (version, writer), unless that write was a delete.
    #[test]
    fn key_value_writes_converge_on_the_last(
        ops in proptest::collection::vec((0usize..3, 0usize..2, any::<bool>(), any::<bool>()), 1..40),
    ) {
        let now = Instant::now();
        let mut nodes = [reg("a"), reg("b"), reg("c")];
        let mut written = vec![Vec::new(), Vec::new(), Vec::new()];
        let keys = ["k0", "k1"];
        for (i, (writer, key, delete, sync)) in ops.into_iter().enumerate() {
            let record = if delete {
                nodes[writer].delete(keys[key], now).unwrap()
            } else {
                Some(nodes[writer].put(keys[key], format!("{i}").into(), now).unwrap())
            };
            written[writer].extend(record);
            if sync {
                sync_all(&mut nodes, &mut written, now);
            }
        }
        sync_all(&mut nodes, &mut written, now);
        for key in keys {
            let last = written
                .iter()
                .flatten()
                .filter(|r| r.name == key)
                .max_by(|x, y| (x.version, &x.owner, !x.claimed).cmp(&(y.version, &y.owner, !y.claimed)))
                .cloned();
            let expected = last.filter(|r| r.claimed).map(|r| r.value);
            for n in &nodes {
                prop_assert_eq!(n.get(key).map(|r| r.value.clone()), expected.clone());
            }
        }
    }
}

#[test]
fn a_previous_life_never_outranks_later_writes() {
    let now = Instant::now();
    let mut nodes = [reg("a"), reg("b")];
    let mut written = vec![Vec::new(), Vec::new()];
    written[0].push(nodes[0].put("k", "a".into(), now).unwrap());
    written[0].push(nodes[0].put_durable("d", "kept".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    written[1].push(nodes[1].put("k", "b".into(), now).unwrap());
    sync_all(&mut nodes, &mut written, now);
    // a's own withdrawal comes back to it after it collected it: nothing to correct.
    let withdrawal = written[0]
        .iter()
        .find(|r| r.name == "k" && !r.claimed)
        .cloned()
        .expect("a withdrew k");
    let mut collected = Registry::new("a", RegistryLimits::key_value());
    assert!(!collected.merge(withdrawal, now));
    assert!(collected.poll_outgoing().is_none(), "no correction written");
    // a restarts (incarnation 2, empty table) and hears of its previous life's entries: the
    // plain one is withdrawn at its own version, the durable one taken back as this life's.
    let mut reborn = Registry::new("a", RegistryLimits::key_value());
    reborn.set_local_incarnation(2, now);
    for r in written[0].clone() {
        reborn.merge(r, now);
    }
    let corrections: Vec<Record> = std::iter::from_fn(|| reborn.poll_outgoing()).collect();
    let durable = corrections
        .iter()
        .find(|r| r.name == "d")
        .expect("durable entry taken back");
    assert!(durable.claimed && durable.durable && durable.owner_incarnation == 2);
    let b_value = nodes[1].get("k").unwrap().clone();
    for r in corrections {
        assert!(
            r.name != "k" || r.version < b_value.version,
            "a correction never outranks b's later write: {r:?}"
        );
        nodes[1].merge(r, now);
    }
    assert_eq!(nodes[1].get("k"), Some(&b_value));
    assert_eq!(&nodes[1].get("d").unwrap().value[..], b"kept");
}

#[test]
fn versions_bytes_and_reserved_names_are_bounded() {
    let now = Instant::now();
    // A key written at the top of the version range can no longer be outranked: a clear error.
    let mut a = Registry::new("a", RegistryLimits::key_value());
    let top = Record {
        name: "k".into(),
        owner: "x".into(),
        owner_incarnation: 1,
        version: MAX_RECORD_VERSION,
        claimed: true,
        kind: EndpointKind::Value,
        value: "v".into(),
        durable: false,
    };
    assert!(a.merge(top, now));
    assert!(matches!(
        a.put("k", "mine".into(), now),
        Err(RegistryError::LimitReached {
            what: "record version",
            ..
        })
    ));
    assert!(a.delete("k", now).is_err());
    assert!(a.put("other", "fine".into(), now).is_ok());
    assert!(a.records().all(|r| r.version <= MAX_RECORD_VERSION));
    // A clock raised to the start time (in ms) puts this life's writes after the last's.
    let mut b = Registry::new("b", RegistryLimits::key_value());
    b.raise_clock(1_700_000_000_000);
    assert!(b.put("k2", "v".into(), now).unwrap().version > 1_700_000_000_000);
    b.raise_clock(u64::MAX);
    assert!(b.put("k3", "v".into(), now).unwrap().version <= MAX_RECORD_VERSION);

    // Bytes: 10,000 writes of 400-byte values stop at max_bytes, locally and from a peer.
    let limits = RegistryLimits {
        max_bytes: 1 << 20,
        ..RegistryLimits::key_value()
    };
    let mut c = Registry::new("c", limits.clone());
    let mut d = Registry::new("d", RegistryLimits::key_value());
    let (mut taken, mut merged) = (0, 0);
    for i in 0..10_000 {
        let value = Bytes::from(vec![b'x'; 400]);
        if c.put(&format!("c/{i}"), value.clone(), now).is_ok() {
            taken += 1;
        }
        if let Ok(r) = d.put(&format!("d/{i}"), value, now) {
            merged += usize::from(c.merge(r, now));
        }
    }
    assert!(c.bytes() <= 1 << 20, "{}", c.bytes());
    assert!(taken > 0 && taken + merged < 10_000 && merged < 10_000);
    assert!(c.records_refused() > 0);
    assert!(matches!(
        c.put("one-more", Bytes::from(vec![b'x'; 400]), now),
        Err(RegistryError::LimitReached {
            what: "max_bytes",
            ..
        })
    ));

    // Reserved names: the fabric's own, never exclusive.
    let mut e = reg("e");
    assert!(matches!(
        e.register("grinta.query.t", EndpointKind::Exclusive, now),
        Err(RegistryError::InvalidName { .. })
    ));
    let group = e
        .register("grinta.query.t", EndpointKind::Group, now)
        .unwrap();
    let mut hijack = group.to_wire();
    hijack.kind = wire::EndpointKind::Exclusive as i32;
    assert!(Record::from_wire(&hijack).is_none());
    assert!(Record::from_wire(&group.to_wire()).is_some());
}

#[test]
fn a_tombstone_applies_where_it_withdraws_something() {
    let now = Instant::now();
    // Endpoints: a tombstone withdraws its owner's record of the name, nothing else.
    let mut a = reg("a");
    let mut b = reg("b");
    let claim = a.register("svc", EndpointKind::Exclusive, now).unwrap();
    let tomb = a.unregister("svc", now).unwrap();
    assert!(!b.tombstone_applies(&tomb), "nothing held");
    assert!(b.merge(claim, now));
    assert!(b.tombstone_applies(&tomb), "the claim it withdraws");
    // Key/value: a delete, whoever makes it, hides every older write of the key.
    let mut w = reg("w");
    let mut d = reg("d");
    let mut x = reg("x");
    let write = w.put("k", "v".into(), now).unwrap();
    assert!(d.merge(write.clone(), now));
    let delete = d.delete("k", now).unwrap().unwrap();
    assert!(!delete.claimed);
    assert!(!x.tombstone_applies(&delete), "nothing held");
    assert!(x.merge(write, now));
    assert!(x.tombstone_applies(&delete), "the write it hides");
    assert!(x.merge(delete, now));
    assert!(x.get("k").is_none());
}
