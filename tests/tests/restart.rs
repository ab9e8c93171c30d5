//! A node that restarts under the same name, after any downtime and at the same or a new address,
//! has its endpoints resolvable everywhere within 2 s of its join completing. Whole nodes in the
//! simulator; `SEED=<n>` replays.

use std::time::{Duration, Instant};

use grinta_proto::membership::MemberState;
use grinta_proto::registry::EndpointKind;
use grinta_proto::tls::dev::DevCa;
use grinta_tests::membership_sim::{Cluster, node_addr, node_name};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};

const N: usize = 8;
const VICTIM: usize = 3;

fn register(c: &mut Cluster<SimulatedNode>, i: usize, name: &str) {
    c.sim
        .with_node(i, |n, now| {
            n.node.register_endpoint(now, name, EndpointKind::Exclusive)
        })
        .expect("registration");
}

/// Whether every other live node resolves `name` to the victim and sees the victim alive at
/// `addr`.
fn visible_everywhere(c: &Cluster<SimulatedNode>, name: &str, addr: std::net::SocketAddr) -> bool {
    (0..N).filter(|&i| i != VICTIM).all(|i| {
        let node = &c.sim.node(i).node;
        node.registry().resolve(name) == vec![node_name(VICTIM).as_str()]
            && node
                .membership()
                .member(&node_name(VICTIM))
                .is_some_and(|m| m.state == MemberState::Alive && m.addr == addr)
    })
}

/// When the restarted victim's join completed, if it did.
fn joined_at(c: &Cluster<SimulatedNode>) -> Option<Instant> {
    c.sim.node(VICTIM).seen.joined_at
}

/// Kills the victim, waits `downtime`, restarts it (at `new_addr` if given) and returns how long
/// after its join completed its endpoint was resolvable everywhere.
fn restart_after(seed: u64, downtime: Duration, move_to: Option<u16>) -> Duration {
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c = Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, N));
    c.form(Duration::from_millis(50 * N as u64));
    c.run_for(Duration::from_secs(3));
    register(&mut c, VICTIM, "svc");
    // Gossip alone spreads it in about a second; a push-pull repairs a node it missed.
    c.run_until(Duration::from_secs(60), |c| {
        visible_everywhere(c, "svc", node_addr(VICTIM))
    })
    .expect("the endpoint is visible everywhere before the restart");

    c.kill(VICTIM);
    c.run_for(downtime);
    let addr = move_to.map_or(node_addr(VICTIM), |port| {
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    });
    let restarted = c.sim.now();
    c.restart(VICTIM, 1, move_to.map(|_| addr), 0);
    // An application registers its endpoints as it starts, before the join completes.
    register(&mut c, VICTIM, "svc");
    let visible = c
        .run_until(Duration::from_secs(60), |c| {
            joined_at(c).is_some() && visible_everywhere(c, "svc", addr)
        })
        .unwrap_or_else(|| {
            panic!(
                "seed {seed}: after {downtime:?} down{}, the endpoint was not visible everywhere \
                 within 60 s",
                if move_to.is_some() { " and a move" } else { "" }
            )
        });
    let joined = joined_at(&c).expect("joined");
    (restarted + visible).saturating_duration_since(joined)
}

#[test]
fn a_restarted_node_is_resolvable_everywhere_within_2s_of_its_join() {
    let (seed, _g) = seed(90);
    let mut report = Vec::new();
    for (downtime, move_to) in [
        (Duration::from_secs(1), None),
        (Duration::from_secs(1), Some(9103)),
        (Duration::from_secs(40), None),
        (Duration::from_secs(40), Some(9103)),
        (Duration::from_secs(600), None),
        (Duration::from_secs(600), Some(9103)),
    ] {
        let after = restart_after(seed, downtime, move_to);
        report.push((downtime, move_to.is_some(), after));
        assert!(
            after <= Duration::from_secs(2),
            "seed {seed}: down {downtime:?}, moved {}: visible {after:?} after the join",
            move_to.is_some()
        );
    }
    println!("restart -> visible everywhere after join: {report:?}");
}
