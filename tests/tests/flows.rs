//! Endpoint directory and flows over real nodes in the whole-node simulator. `SEED=<n>` replays.

use std::time::Duration;

use grinta_proto::registry::{EndpointKind, RegistryEvent};
use grinta_proto::tls::dev::DevCa;
use grinta_tests::engine::{NetConfig, SeedGuard, env_u64};
use grinta_tests::membership_sim::{Cluster, node_addr, node_name, quantile};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use rand::Rng;

fn lan() -> NetConfig {
    NetConfig {
        latency: Duration::from_micros(500),
        jitter: Duration::from_millis(1),
        ..NetConfig::default()
    }
}

fn seed(default: u64) -> (u64, SeedGuard) {
    let seed = env_u64("SEED", default);
    (seed, SeedGuard(seed))
}

fn formed(seed: u64, n: usize) -> Cluster<SimulatedNode> {
    let ca = DevCa::new().expect("dev CA");
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n));
    c.form(Duration::from_millis(50 * n as u64));
    c
}

fn register(c: &mut Cluster<SimulatedNode>, i: usize, name: &str, kind: EndpointKind) {
    c.sim
        .with_node(i, |n, now| n.node.register_endpoint(now, name, kind))
        .expect("registration");
}

fn owners(c: &Cluster<SimulatedNode>, i: usize, name: &str) -> Vec<String> {
    c.sim
        .node(i)
        .node
        .registry()
        .resolve(name)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_name_registered_on_one_node_of_20_resolves_everywhere_within_3s() {
    let (seed, _g) = seed(1);
    let n = 20;
    let mut delays = Vec::new();
    for s in seed..seed + 5 {
        let mut c = formed(s, n);
        c.run_for(Duration::from_secs(2));
        let owner = c.sim.rng().random_range(0..n);
        let t0 = c.sim.now();
        register(&mut c, owner, "billing", EndpointKind::Exclusive);
        let mut seen = vec![None; n];
        c.run_until(Duration::from_secs(30), |c| {
            (0..n).all(|i| !owners(c, i, "billing").is_empty())
        });
        // Replay the arrival times from the directory events.
        for (i, slot) in seen.iter_mut().enumerate() {
            *slot = c
                .sim
                .node(i)
                .registry_events
                .iter()
                .find(|(_, e)| {
                    *e == RegistryEvent::NameAdded {
                        name: "billing".into(),
                    }
                })
                .map(|(t, _)| *t - t0);
        }
        assert!(seen.iter().all(Option::is_some), "seed {s}: {seen:?}");
        delays.extend(seen.into_iter().flatten());
        for i in 0..n {
            assert_eq!(owners(&c, i, "billing"), vec![node_name(owner)], "seed {s}");
        }
    }
    let p99 = quantile(&delays, 0.99).unwrap();
    println!(
        "name visible on all 20 nodes: p99 {p99:?}, max {:?} ({} samples)",
        delays.iter().max().unwrap(),
        delays.len()
    );
    assert!(p99 <= Duration::from_secs(3), "p99 {p99:?} (seed {seed})");
}

#[test]
fn a_joiner_has_the_full_directory_when_its_join_completes() {
    let (seed, _g) = seed(2);
    let n = 8;
    let ca = DevCa::new().unwrap();
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n));
    // Nodes 0..7 form; node 7 stays out until the directory is populated.
    for i in 1..n - 1 {
        c.sim
            .with_node(i, |node, now| node.node.join(now, &[node_addr(0)]));
    }
    c.run_for(Duration::from_secs(5));
    let mut expected = Vec::new();
    for i in 0..n - 1 {
        let name = format!("svc-{i}");
        register(&mut c, i, &name, EndpointKind::Exclusive);
        expected.push(name);
    }
    register(&mut c, 3, "workers", EndpointKind::Group);
    register(&mut c, 5, "workers", EndpointKind::Group);
    expected.push("workers".into());
    expected.sort();
    c.run_for(Duration::from_secs(3));
    let joiner = n - 1;
    c.sim
        .with_node(joiner, |node, now| node.node.join(now, &[node_addr(2)]));
    c.run_until(Duration::from_secs(10), |c| {
        c.sim.node(joiner).names_at_join.is_some()
    });
    let at_join = c
        .sim
        .node(joiner)
        .names_at_join
        .clone()
        .expect("join completed");
    assert_eq!(at_join, expected, "seed {seed}");
    assert_eq!(
        owners(&c, joiner, "workers"),
        vec![node_name(3), node_name(5)]
    );
}

#[test]
fn an_owner_crash_removes_its_names_within_the_detection_bound() {
    let (seed, _g) = seed(3);
    let n = 10;
    let mut c = formed(seed, n);
    register(&mut c, 4, "solo", EndpointKind::Exclusive);
    register(&mut c, 4, "workers", EndpointKind::Group);
    register(&mut c, 7, "workers", EndpointKind::Group);
    c.run_for(Duration::from_secs(3));
    for i in 0..n {
        assert_eq!(owners(&c, i, "workers"), vec![node_name(4), node_name(7)]);
    }
    c.kill(4);
    let t0 = c.sim.now();
    let gone = c.run_until(Duration::from_secs(30), |c| {
        (0..n)
            .filter(|&i| i != 4)
            .all(|i| owners(c, i, "solo").is_empty())
    });
    println!("crashed owner's names gone everywhere after {gone:?}");
    let gone = gone.expect("names removed");
    assert!(gone <= Duration::from_secs(11), "{gone:?} (seed {seed})");
    for i in (0..n).filter(|&i| i != 4) {
        assert_eq!(
            owners(&c, i, "workers"),
            vec![node_name(7)],
            "the group keeps its live owner"
        );
        let removed = c.sim.node(i).registry_events.iter().any(|(t, e)| {
            *t >= t0
                && *e
                    == RegistryEvent::NameRemoved {
                        name: "solo".into(),
                    }
        });
        assert!(removed, "node {i} reported the name removed");
    }
}

#[test]
fn exclusive_claims_on_both_sides_of_a_partition_resolve_to_one_owner() {
    let (seed, _g) = seed(4);
    let n = 10;
    let mut c = formed(seed, n);
    c.run_for(Duration::from_secs(2));
    c.sim.partition(&[(0..5).collect(), (5..10).collect()]);
    c.run_for(Duration::from_secs(40));
    // Each side claims the name while it cannot see the other.
    register(&mut c, 1, "leader", EndpointKind::Exclusive);
    c.run_for(Duration::from_secs(1));
    register(&mut c, 8, "leader", EndpointKind::Exclusive);
    c.run_for(Duration::from_secs(5));
    assert_eq!(owners(&c, 0, "leader"), vec![node_name(1)]);
    assert_eq!(owners(&c, 9, "leader"), vec![node_name(8)]);
    c.sim.heal();
    let merged = c.run_until(Duration::from_secs(120), |c| {
        c.converged() && {
            let first = owners(c, 0, "leader");
            first.len() == 1 && (0..n).all(|i| owners(c, i, "leader") == first)
        }
    });
    println!("conflict resolved everywhere after {merged:?}");
    assert!(merged.is_some(), "seed {seed}");
    let winner = owners(&c, 0, "leader")[0].clone();
    let loser = if winner == node_name(1) { 8 } else { 1 };
    let told = c.sim.node(loser).registry_events.iter().any(|(_, e)| {
        *e == RegistryEvent::NameConflict {
            name: "leader".into(),
            winner: winner.clone(),
        }
    });
    assert!(told, "the loser was told (seed {seed})");
    assert!(!c.sim.node(loser).node.registry().is_local("leader"));
}
