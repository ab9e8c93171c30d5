//! The replicated key/value table over whole nodes in the simulator. `SEED=<n>` replays.
//!
//! The N=100 figures: `cargo test --release -p grinta-tests --test kv -- --ignored --nocapture`.

use std::time::Duration;

use bytes::Bytes;
use grinta_proto::tls::dev::DevCa;
use grinta_tests::membership_sim::{Cluster, quantile};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};
use rand::Rng;

fn formed(seed: u64, n: usize) -> Cluster<SimulatedNode> {
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n));
    c.form(Duration::from_millis(50 * n as u64));
    c.run_until(Duration::from_secs(120), |c| c.converged())
        .expect("formed");
    c
}

fn put(c: &mut Cluster<SimulatedNode>, i: usize, key: &str, value: &str) {
    let value = Bytes::copy_from_slice(value.as_bytes());
    c.sim
        .with_node(i, |n, now| n.node.kv_put(now, key, value))
        .expect("put");
}

fn value(c: &Cluster<SimulatedNode>, i: usize, key: &str) -> Option<Bytes> {
    c.sim.node(i).node.kv().get(key).map(|r| r.value.clone())
}

/// Writes by random nodes (new keys, overwrites, deletes), each timed until every up node
/// holds the result.
fn visibility(c: &mut Cluster<SimulatedNode>, writes: usize) -> Vec<Duration> {
    let n = c.sim.len();
    let up: Vec<usize> = (0..n).filter(|&i| c.sim.is_up(i)).collect();
    let mut delays = Vec::new();
    for k in 0..writes {
        let writer = up[c.sim.rng().random_range(0..up.len())];
        let key = format!("key/{}", k % (writes / 2).max(1));
        let delete = k % 7 == 6;
        let expected = if delete {
            c.sim
                .with_node(writer, |n, now| n.node.kv_delete(now, &key))
                .expect("delete");
            None
        } else {
            let v = format!("{k}");
            put(c, writer, &key, &v);
            Some(Bytes::from(v))
        };
        let seen = c
            .run_until(Duration::from_secs(30), |c| {
                up.iter().all(|&i| value(c, i, &key) == expected)
            })
            .unwrap_or_else(|| panic!("write {k} ({key}) everywhere within 30 s"));
        delays.push(seen);
        c.run_for(Duration::from_millis(200));
    }
    delays
}

#[test]
fn a_write_is_visible_on_20_nodes_within_a_second_and_vanishes_with_its_writer() {
    let (seed, _g) = seed(11);
    let n = 20;
    let mut c = formed(seed, n);
    let delays = visibility(&mut c, 60);
    let p99 = quantile(&delays, 0.99).expect("writes");
    println!(
        "N={n}: write visible everywhere: median {:?}, p99 {p99:?}",
        quantile(&delays, 0.5).expect("writes")
    );
    assert!(p99 <= Duration::from_secs(1), "p99 {p99:?} (seed {seed})");

    // Node 3's entries vanish everywhere when it fails, except its durable one, which node-0
    // (the live member with the lowest name) takes over; node 4's stay.
    put(&mut c, 3, "owned/3", "a");
    put(&mut c, 4, "owned/4", "b");
    c.sim
        .with_node(3, |n, now| {
            n.node
                .kv_put_durable(now, "durable/3", Bytes::from_static(b"d"))
        })
        .expect("put");
    c.run_until(Duration::from_secs(10), |c| {
        (0..n).all(|i| {
            value(c, i, "owned/3").is_some()
                && value(c, i, "owned/4").is_some()
                && value(c, i, "durable/3").is_some()
        })
    })
    .expect("all spread");
    c.kill(3);
    let gone = c
        .run_until(Duration::from_secs(30), |c| {
            (0..n)
                .filter(|&i| i != 3)
                .all(|i| value(c, i, "owned/3").is_none())
        })
        .expect("the failed writer's entry vanishes");
    println!("failed writer's entries gone everywhere after {gone:?}");
    assert!(
        (0..n)
            .filter(|&i| i != 3)
            .all(|i| value(&c, i, "owned/4").is_some())
    );
    let adopted = c
        .run_until(Duration::from_secs(10), |c| {
            (0..n).filter(|&i| i != 3).all(|i| {
                c.sim
                    .node(i)
                    .node
                    .kv()
                    .get("durable/3")
                    .is_some_and(|r| r.owner == "node-0" && r.value == "d" && r.durable)
            })
        })
        .expect("the durable entry survives its writer, taken over by node-0");
    println!("durable entry held by node-0 everywhere {adopted:?} after that");
}

/// A 10,000-entry table written by four nodes: a node that joins has all of it when its join
/// completes (the push-pull answer carries the whole table).
fn joiner_has_the_table(seed: u64, n: usize, entries: usize) {
    let mut c = formed(seed, n);
    let joiner = n - 1;
    c.kill(joiner);
    let writers = 4;
    for k in 0..entries {
        put(
            &mut c,
            k % writers,
            &format!("table/{k:05}"),
            "0123456789abcdef",
        );
        if k % 500 == 499 {
            c.run_for(Duration::from_millis(100));
        }
    }
    // The burst is larger than the gossip queue (`max_app_broadcasts`, 4,096): push-pull
    // carries the rest. The joiner's seed, node 0, must hold all of it.
    let held = |c: &Cluster<SimulatedNode>, i: usize| c.sim.node(i).node.kv().entries("").len();
    let t0 = c.sim.now();
    let mut seconds = 0;
    while held(&c, 0) < entries {
        assert!(seconds < 300, "node 0 holds {} of {entries}", held(&c, 0));
        c.run_for(Duration::from_secs(1));
        seconds += 1;
    }
    println!(
        "N={n}: all {entries} entries on the seed after {:?}; {} of {} nodes hold them all",
        c.sim.now() - t0,
        (0..joiner).filter(|&i| held(&c, i) == entries).count(),
        joiner
    );
    c.restart(joiner, 1, None, 0);
    let joined = c
        .run_until(Duration::from_secs(30), |c| {
            c.sim.node(joiner).entries_at_join.is_some()
        })
        .expect("the joiner joins");
    let at_join = c.sim.node(joiner).entries_at_join;
    println!("joined after {joined:?} with {at_join:?} entries");
    assert_eq!(at_join, Some(entries), "seed {seed}");
}

#[test]
fn a_joiner_has_a_10000_entry_table_at_join() {
    let (seed, _g) = seed(12);
    joiner_has_the_table(seed, 6, 10_000);
}

#[test]
#[ignore = "minutes in release; run with --release --ignored --nocapture"]
fn key_value_figures_at_n100() {
    let (seed, _g) = seed(13);
    let n = 100;
    let mut c = formed(seed, n);
    let delays = visibility(&mut c, 100);
    println!(
        "N={n}: write visible everywhere: median {:?}, p99 {:?} (bound 1 s)",
        quantile(&delays, 0.5).expect("writes"),
        quantile(&delays, 0.99).expect("writes")
    );
    drop(c);
    joiner_has_the_table(seed, n, 10_000);
}
