//! Whole-node scenarios: real `Node`s (quinn-proto, rustls, mutual TLS) in the deterministic
//! simulator. `SEED=<n>` replays a run; a failure prints its seed.

use std::time::Duration;

use grinta_proto::membership::MemberState;
use grinta_proto::tls::dev::DevCa;
use grinta_tests::engine::{NetConfig, SeedGuard, env_u64};
use grinta_tests::membership_sim::{Cluster, node_addr, node_name, quantile};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};

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

fn cluster(seed: u64, n: usize) -> Cluster<SimulatedNode> {
    let ca = DevCa::new().expect("dev CA");
    Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n))
}

#[test]
fn ten_nodes_form_a_cluster_from_one_seed() {
    let (seed, _g) = seed(1);
    let mut c = cluster(seed, 10);
    c.form(Duration::from_millis(500));
    c.run_for(Duration::from_secs(10));
    assert!(c.converged(), "seed {seed}");
    for i in 0..10 {
        let stats = c.sim.node(i).node.stats();
        assert_eq!(stats.transport.identity_rejections, 0, "node {i}");
        assert_eq!(stats.transport.handshakes_failed, 0, "node {i}");
    }
    println!("node 0: {:?}, connections {}", c.sim.node(0).node.stats(), c.sim.node(0).node.connection_count());
    let _ = (node_addr(0), node_name(0), quantile(&[], 0.5), MemberState::Alive);
}
