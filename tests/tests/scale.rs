//! Cost of whole nodes (QUIC, mutual TLS) as the cluster grows, on a lossless 1 ms LAN: CPU per
//! node per simulated second, handshakes per node per minute, open connections per node and
//! failed probes, measured over a steady-state window that starts two probe rounds after
//! formation, for several sizes in one run (so the ratios compare like with like).
//!
//! `NODES=100,300 WINDOW=120 cargo test --release -p grinta-tests --test scale -- --ignored --nocapture`
//! (`IDLE_S=<seconds>` overrides the idle timeout).
//!
//! One test runs in CI: the push-pull of a 1,000-node, 10,000-name state, signed throughout.

use std::time::{Duration, Instant};

use grinta_proto::tls::dev::DevCa;
use grinta_tests::alloc::{Counting, live_bytes};
use grinta_tests::engine::{NetConfig, env_u64};
use grinta_tests::membership_sim::Cluster;
use grinta_tests::node_sim::{
    SimulatedNode, SteadyCost, certificates, node_membership_config, steady_state_cost,
};
use grinta_tests::seed;

#[global_allocator]
static ALLOCATOR: Counting = Counting::system();

#[test]
#[ignore = "minutes in release; run with --release --ignored --nocapture (NODES, WINDOW in seconds)"]
fn cost_per_node_as_the_cluster_grows() {
    let (seed, _g) = seed(31);
    let window = Duration::from_secs(env_u64("WINDOW", 120));
    let sizes: Vec<usize> = std::env::var("NODES")
        .unwrap_or_else(|_| "100,300".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // `IDLE_S` overrides the transport's idle timeout, to see what holding connections longer
    // costs and saves.
    let idle = std::env::var("IDLE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let costs: Vec<SteadyCost> = sizes
        .iter()
        .map(|&n| steady_state_cost(seed, n, window, idle, None))
        .collect();
    println!(
        "| N | CPU per node per simulated s | handshakes per node per min | resumed | connections per node | heap per node | failed probes |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in &costs {
        println!(
            "| {} | {:.0} us | {:.1} | {:.0}% | {:.0} | {:.1} MiB | {} |",
            c.n,
            c.cpu_us_per_node_s,
            c.handshakes_per_node_min,
            c.resumed * 100.0,
            c.connections_per_node,
            c.heap_per_node / (1024.0 * 1024.0),
            c.probes_failed
        );
    }
    // For docs/plots/scale_plot.py.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scale");
    let mut csv = String::from(
        "n,cpu_us_per_node_s,handshakes_per_node_min,resumed,connections_per_node,heap_mib_per_node,probes_failed\n",
    );
    for c in &costs {
        csv.push_str(&format!(
            "{},{:.1},{:.2},{:.3},{:.1},{:.2},{}\n",
            c.n,
            c.cpu_us_per_node_s,
            c.handshakes_per_node_min,
            c.resumed,
            c.connections_per_node,
            c.heap_per_node / (1024.0 * 1024.0),
            c.probes_failed
        ));
    }
    if std::fs::create_dir_all(&dir).is_ok() {
        let path = dir.join("cost.csv");
        match std::fs::write(&path, csv) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => println!("cannot write {}: {e}", path.display()),
        }
    }
    if let (Some(first), Some(last)) = (costs.first(), costs.last()) {
        println!(
            "CPU per node at N={} is {:.2}x N={}",
            last.n,
            last.cpu_us_per_node_s / first.cpu_us_per_node_s,
            first.n
        );
    }
    for c in &costs {
        assert!(c.converged, "N={} did not stay converged", c.n);
    }
}

/// On a network that loses nothing, no probe fails: membership datagrams are never lost to
/// idle closes, handshakes or connection replacement, at a size where every probe needs a
/// fresh connection (200 probe periods exceed the idle timeout).
#[test]
#[ignore = "about two minutes in release; run with --release --ignored"]
fn no_probe_fails_in_ten_minutes_at_n200_on_a_lossless_network() {
    let (seed, _g) = seed(32);
    let cost = steady_state_cost(seed, 200, Duration::from_secs(600), None, None);
    println!("{cost:?}");
    assert!(cost.converged, "seed {seed}");
    assert_eq!(cost.probes_failed, 0, "seed {seed}: {cost:?}");
}

/// Issue 16, item 4: a cluster of whole nodes forms from joins spread over 60 s, then runs for
/// ten simulated minutes in which members crash and names are registered. Asserts: formation
/// converges; every crash is detected by every live node, median within 3 s of the minimum
/// suspicion timeout (12 s up to N=100) and p99 <= 20 s; no
/// live member is ever declared Dead, and no crashed one twice; every name is visible on every
/// live node with p99 <= 3 s. Prints the cost per node over the window (`DEBUG_CRASHES=1` also
/// prints every observer whose view of a crash is not one Dead event).
///
/// `NODES` (default 1,000) and `MINUTES` (default 10) size the run. A node holds a QUIC
/// connection to every other member (docs/scale.md: about 23 KiB each with its TLS state), so
/// N nodes in one process need about N x N x 23 KiB of heap: N=500 holds 5.5 GiB and takes
/// about 4 minutes of wall time (2.5 of them forming); the default N=1,000 needs about 23 GiB.
/// `MAX_CONNECTIONS` gives every node a smaller connection budget (memory for handshakes: a
/// probe to a member whose connection was evicted reconnects), and `FORM_LIMIT_S` (default
/// 120) how long formation may take after the last join.
///
/// `NODES=500 cargo test --release -p grinta-tests --test scale -- --ignored --nocapture whole_nodes`
///
/// N=1,000 within about 14 GiB (docs/scale.md):
/// `NODES=1000 MAX_CONNECTIONS=512 FORM_LIMIT_S=480 cargo test --release -p grinta-tests --test scale -- --ignored --nocapture whole_nodes`
#[test]
#[ignore = "N=1,000 needs about 23 GiB; run with --release --ignored --nocapture (NODES, MINUTES)"]
fn whole_nodes_form_detect_crashes_and_spread_names() {
    use grinta_proto::registry::{EndpointKind, RegistryEvent};
    use grinta_tests::membership_sim::{node_name, quantile};
    use rand::Rng;

    let (seed, _g) = seed(34);
    let n = env_u64("NODES", 1000) as usize;
    let minutes = env_u64("MINUTES", 10);
    assert!(n >= 8, "NODES must be at least 8");
    // `MAX_CONNECTIONS` sets every node's connection budget (default 4,096: a connection per
    // member up to 4,096 members).
    let budget = env_u64("MAX_CONNECTIONS", 0) as usize;
    let mut c = Cluster::dev_nodes_with(seed, NetConfig::default(), n, move |config| {
        if budget > 0 {
            config.transport.max_connections = budget;
        }
    });
    let wall = Instant::now();
    let spread = Duration::from_secs(60);
    let start = c.sim.now();
    // Joins spread over 60 s; panics unless every view is exact within `FORM_LIMIT_S` (120)
    // after the last.
    c.form_within(spread, Duration::from_secs(env_u64("FORM_LIMIT_S", 120)));
    let formed = c.sim.now() - start;
    let sum = |f: &dyn Fn(&grinta_proto::node::NodeStats) -> u64| -> u64 {
        (0..n).map(|i| f(&c.sim.node(i).node.stats())).sum()
    };
    println!(
        "formation: {} membership packets, {} push-pulls; transport: {} handshakes, {} failed, \
         {} timed out, {} refused, {} retries; {} datagrams and {} stream messages dropped",
        sum(&|s| s.membership.packets_sent),
        sum(&|s| s.membership.push_pulls_sent),
        sum(&|s| s.transport.connections_accepted),
        sum(&|s| s.transport.handshakes_failed),
        sum(&|s| s.transport.handshakes_timed_out),
        sum(&|s| s.transport.connections_refused),
        sum(&|s| s.transport.retries_sent),
        sum(&|s| s.transport.datagrams_dropped),
        sum(&|s| s.transport.stream_messages_dropped),
    );
    println!(
        "N={n}: formed {:.1} simulated s after the first join ({:.1} s after the last), {:.0} s of wall time",
        formed.as_secs_f64(),
        (formed.saturating_sub(spread)).as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );

    // Over every node, crashed ones included (their counters stop), so the sums only grow.
    // [handshakes accepted, probes failed, pings, indirect pings, gossip packets, push-pulls].
    let totals = |c: &Cluster<SimulatedNode>| {
        (0..n).fold([0u64; 6], |t, i| {
            let s = c.sim.node(i).node.stats();
            let m = &s.membership;
            [
                t[0] + s.transport.connections_accepted,
                t[1] + m.probes_failed,
                t[2] + m.pings_sent,
                t[3] + m.indirect_pings_sent,
                t[4] + m.gossip_packets_sent,
                t[5] + m.push_pulls_sent,
            ]
        })
    };
    // Handshakes are counted where they are accepted: dials to a crashed member (retried once
    // per `reconnect_interval`) reach nobody. The window starts at formation, so it also holds
    // the first contacts of pairs that had not spoken yet (a probe round is N seconds).
    let t0 = totals(&c);
    let [h0, f0, ..] = t0;
    let window_start = c.sim.now();
    let wall = Instant::now();
    // One crash a minute, 30 s into it (victims from the upper half), and one name every 20 s,
    // 10 s into each third of a minute (owners from the lower half, never crashed).
    let mut crashes: Vec<(usize, Instant)> = Vec::new();
    let mut names: Vec<(String, Instant)> = Vec::new();
    for second in 0..minutes * 60 {
        if second % 60 == 30 {
            let victim = loop {
                let v = c.sim.rng().random_range(n / 2..n);
                if c.sim.is_up(v) {
                    break v;
                }
            };
            c.kill(victim);
            crashes.push((victim, c.sim.now()));
        }
        if second % 20 == 10 {
            let owner = c.sim.rng().random_range(1..n / 2);
            let name = format!("svc-{}", names.len());
            c.sim
                .with_node(owner, |node, now| {
                    node.node
                        .register_endpoint(now, &name, EndpointKind::Exclusive)
                })
                .expect("register");
            names.push((name, c.sim.now()));
        }
        c.run_for(Duration::from_secs(1));
    }
    let took = wall.elapsed();
    let window = c.sim.now() - window_start;
    let t1 = totals(&c);
    let [h1, f1, ..] = t1;
    let up: Vec<usize> = (0..n).filter(|&i| c.sim.is_up(i)).collect();
    let connections: usize = up
        .iter()
        .map(|&i| c.sim.node(i).node.connection_count())
        .sum();
    let per_node = |x: f64| x / up.len() as f64;
    println!(
        "window: {:.0} simulated s in {:.0} s of wall time; CPU per node per simulated s {:.0} us, \
         handshakes per node per min {:.2}, connections per node {:.0}, heap per node {:.1} MiB",
        window.as_secs_f64(),
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / n as f64 / window.as_secs_f64(),
        2.0 * per_node((h1 - h0) as f64) / (window.as_secs_f64() / 60.0),
        per_node(connections as f64),
        per_node(live_bytes() as f64) / (1024.0 * 1024.0),
    );

    let rate = |i: usize| per_node((t1[i] - t0[i]) as f64) / window.as_secs_f64();
    println!(
        "per node per simulated s: {:.2} pings, {:.2} indirect pings, {:.2} gossip packets, \
         {:.3} push-pulls",
        rate(2),
        rate(3),
        rate(4),
        rate(5)
    );

    // Crash detection, over every (crash, live observer) pair.
    let mut detections = Vec::new();
    let mut undetected = 0usize;
    for &(victim, at) in &crashes {
        for t in c.detection_times(victim, at) {
            match t {
                Some(t) => detections.push(t),
                None => undetected += 1,
            }
        }
    }
    // A Dead event about a member that was up at the time is a false Dead.
    let crashed_at = |name: &str| {
        crashes
            .iter()
            .find(|&&(v, _)| node_name(v) == name)
            .map(|&(_, t)| t)
    };
    let mut false_dead = 0usize;
    for i in 0..n {
        for (t, member) in &c.sim.node(i).seen.dead_events {
            if crashed_at(member).is_none_or(|crash| *t < crash) {
                false_dead += 1;
            }
        }
    }
    // Name visibility: when each live node first saw each name, and when all of them had.
    let mut everywhere = Vec::new();
    let mut per_observer = Vec::new();
    let mut unseen = 0usize;
    for (name, at) in &names {
        let mut last = Duration::ZERO;
        for &i in &up {
            let seen = c.sim.node(i).registry_events.iter().find_map(|(t, e)| {
                matches!(e, RegistryEvent::NameAdded { name: added } if added == name && t >= at)
                    .then(|| *t - *at)
            });
            match seen {
                Some(d) => {
                    per_observer.push(d);
                    last = last.max(d);
                }
                None => unseen += 1,
            }
        }
        everywhere.push(last);
    }
    let mut repeated_dead = 0usize;
    for &(victim, _) in &crashes {
        let vname = node_name(victim);
        for &i in &up {
            let o = &c.sim.node(i).seen;
            repeated_dead += o
                .dead_events
                .iter()
                .filter(|(_, m)| *m == vname)
                .count()
                .saturating_sub(1);
        }
    }
    if std::env::var("DEBUG_CRASHES").is_ok() {
        for &(victim, at) in &crashes {
            let vname = node_name(victim);
            for &i in &up {
                let o = &c.sim.node(i).seen;
                let deads: Vec<f64> = o
                    .dead_events
                    .iter()
                    .filter(|(_, m)| *m == vname)
                    .map(|(t, _)| (*t - at).as_secs_f64())
                    .collect();
                let state = c
                    .sim
                    .node(i)
                    .node
                    .membership()
                    .member(&vname)
                    .map(|m| (m.state, m.incarnation));
                if deads.len() != 1 || !o.dead.contains_key(&vname) {
                    println!(
                        "victim {victim} observer {i}: dead events at {deads:?}, now {state:?}, in dead map {}",
                        o.dead.contains_key(&vname)
                    );
                }
            }
        }
    }
    let q = |v: &[Duration], p: f64| quantile(v, p).unwrap_or_default().as_secs_f64();
    println!(
        "crashes: {} ({} observations): detection median {:.2} s, p99 {:.2} s, max {:.2} s; \
         undetected {undetected}; false Dead {false_dead}; declared Dead again {repeated_dead}; \
         old alives of forgotten members dropped {}",
        crashes.len(),
        detections.len(),
        q(&detections, 0.5),
        q(&detections, 0.99),
        q(&detections, 1.0),
        up.iter()
            .map(|&i| c
                .sim
                .node(i)
                .node
                .stats()
                .membership
                .forgotten_alives_dropped)
            .sum::<u64>(),
    );
    println!(
        "names: {}: visible everywhere median {:.2} s, p99 {:.2} s; per observer p99 {:.2} s; \
         never seen {unseen}",
        names.len(),
        q(&everywhere, 0.5),
        q(&everywhere, 0.99),
        q(&per_observer, 0.99),
    );
    // Probes of crashed members fail, as they should: `no_probe_fails_in_ten_minutes_at_n200_on_a_lossless_network`
    // is the test of lossless probing.
    println!(
        "failed probes in the window (crashed members included): {}",
        f1 - f0
    );
    assert_eq!(
        undetected, 0,
        "seed {seed}: crashes not detected everywhere"
    );
    assert_eq!(false_dead, 0, "seed {seed}: live members declared Dead");
    assert_eq!(repeated_dead, 0, "seed {seed}: crashed members came back");
    // The LAN profile's suspicion timeout is at least `suspicion_mult x log10(N) x
    // probe_interval` (12 s at N=1,000), after the probe and indirect probes that raise the
    // suspicion, before the Dead spreads: the median is bounded by that minimum plus 3 s (12 s
    // up to N=100, where the spec bounds it; about 13 s at N=500).
    let config = node_membership_config();
    let min_suspicion = config.probe_interval.as_secs_f64()
        * f64::from(config.suspicion_mult)
        * (n as f64).log10().max(1.0);
    let median_bound = (min_suspicion + 3.0).max(12.0);
    assert!(
        q(&detections, 0.5) <= median_bound,
        "seed {seed}: median detection above {median_bound:.1} s"
    );
    assert!(q(&detections, 0.99) <= 20.0, "seed {seed}: p99 detection");
    assert_eq!(unseen, 0, "seed {seed}: names not visible everywhere");
    assert!(
        q(&everywhere, 0.99) <= 3.0,
        "seed {seed}: p99 name visibility"
    );
}

/// Formation of N members joining over 60 s with signed claims (each alive carries its node
/// certificate, about 400 bytes, as between whole nodes), on the membership simulator: the
/// dissemination of a whole-node formation at sizes whose QUIC connections would not fit in
/// memory. Prints when every view became exact; fails if not within 120 s of the last join.
///
/// `NODES=1000 cargo test --release -p grinta-tests --test scale -- --ignored --nocapture signed_formation`
#[test]
#[ignore = "minutes in release; run with --release --ignored --nocapture (NODES)"]
fn signed_formation_converges() {
    use grinta_proto::claims::CertificateKeys;
    use grinta_proto::membership::Config;
    use grinta_tests::membership_sim::{MemberNode, NodeFactory, node_name, node_seed};

    let (seed, _g) = seed(35);
    let n = env_u64("NODES", 1000) as usize;
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let certs = certificates(&ca, n);
    let config = Config::lan();
    let c2 = config.clone();
    let factory: NodeFactory<MemberNode> = Box::new(move |i, generation, addr, now| {
        let keys = CertificateKeys::new(
            &certs[i],
            &node_name(i),
            grinta_proto::tls::crypto_provider(),
            grinta_proto::tls::system_time(),
            n + 1,
        )
        .expect("keys");
        MemberNode::with_keys(
            c2.clone(),
            &node_name(i),
            addr,
            node_seed(seed, i, generation),
            now,
            Box::new(keys),
        )
    });
    let mut c = Cluster::with_factory(seed, n, config, NetConfig::default(), factory);
    let wall = Instant::now();
    let start = c.sim.now();
    let spread = Duration::from_secs(60);
    c.form(spread);
    let formed = c.sim.now() - start;
    let (packets, bytes, push_pulls) = (0..n).fold((0u64, 0u64, 0u64), |(p, b, q), i| {
        let s = c.sim.node(i).membership.stats();
        (
            p + s.packets_sent,
            b + s.packet_bytes_sent,
            q + s.push_pulls_sent,
        )
    });
    println!(
        "N={n}, signed claims: formed {:.1} simulated s after the last join ({:.0} s of wall time); \
         {packets} packets, {:.0} bytes each on average, {push_pulls} push-pulls",
        formed.saturating_sub(spread).as_secs_f64(),
        wall.elapsed().as_secs_f64(),
        bytes as f64 / packets.max(1) as f64,
    );
}

/// What [`churn`] saw: the live heap every 10 minutes from minute 30, and the oldest
/// tombstone of an endpoint any node held, as time since its withdrawal.
struct Churned {
    samples: Vec<(u64, usize)>,
    oldest_tombstone: Duration,
}

/// `n` whole nodes for `minutes` simulated minutes of churn: every minute a node crashes and
/// the one that crashed before it comes back as a new process; every 20 s a node registers a
/// new name, and the oldest of the 16 names held is withdrawn; every 10 s a key of a set of 64
/// is written and another deleted.
fn churn(seed: u64, n: usize, minutes: u64) -> Churned {
    use grinta_proto::registry::EndpointKind;
    use rand::Rng;

    let mut c = Cluster::dev_nodes(seed, NetConfig::default(), n);
    c.form(Duration::from_secs(2));
    let mut down: Option<usize> = None;
    let mut generation = 0u64;
    let mut names: std::collections::VecDeque<(String, usize)> = Default::default();
    // When each endpoint name was withdrawn.
    let mut withdrawn: std::collections::HashMap<String, Instant> = Default::default();
    let mut out = Churned {
        samples: Vec::new(),
        oldest_tombstone: Duration::ZERO,
    };
    for second in 0..minutes * 60 {
        if second % 60 == 30 {
            if let Some(back) = down.take() {
                generation += 1;
                c.restart(back, generation, None, 0);
            }
            let victim = c.sim.rng().random_range(1..n);
            c.kill(victim);
            down = Some(victim);
        }
        if second % 20 == 10 {
            let owner = loop {
                let o = c.sim.rng().random_range(0..n);
                if c.sim.is_up(o) {
                    break o;
                }
            };
            let name = format!("svc-{second}");
            c.sim
                .with_node(owner, |node, now| {
                    node.node
                        .register_endpoint(now, &name, EndpointKind::Exclusive)
                })
                .expect("register");
            names.push_back((name, owner));
            if names.len() > 16 {
                if let Some((old, owner)) = names.pop_front() {
                    if c.sim.is_up(owner) {
                        // Its owner may have restarted since, and hold it no more.
                        let _ = c
                            .sim
                            .with_node(owner, |node, now| node.node.unregister_endpoint(now, &old));
                    }
                    withdrawn.insert(old, c.sim.now());
                }
            }
        }
        if second % 10 == 5 {
            let k = c.sim.rng().random_range(0..64u32);
            let value = bytes::Bytes::from(second.to_be_bytes().to_vec());
            c.sim
                .with_node(0, |node, now| {
                    node.node.kv_put(now, &format!("key-{k}"), value)
                })
                .expect("kv put");
            let gone = (k + 32) % 64;
            let _ = c.sim.with_node(0, |node, now| {
                node.node.kv_delete(now, &format!("key-{gone}"))
            });
        }
        c.run_for(Duration::from_secs(1));
        // The simulator's own logs of events grow with the run: cleared, so that the heap
        // measures the nodes.
        for i in 0..n {
            c.sim.with_node(i, |node, _| {
                node.registry_events.clear();
                node.connections_lost.clear();
                node.flow_events.clear();
                node.seen.suspects.clear();
                node.seen.alive_again.clear();
                node.seen.dead_events.clear();
                node.seen.refutations.clear();
            });
        }
        if (second + 1) % 60 == 0 {
            let now = c.sim.now();
            for i in (0..n).filter(|&i| c.sim.is_up(i)) {
                for r in c.sim.node(i).node.registry().records() {
                    if let Some(at) = withdrawn.get(&r.name).filter(|_| !r.claimed) {
                        out.oldest_tombstone = out.oldest_tombstone.max(now - *at);
                    }
                }
            }
        }
        let minute = (second + 1) / 60;
        if (second + 1) % 600 == 0 && minute >= 30 {
            out.samples.push((minute, live_bytes()));
            println!(
                "minute {minute}: live heap {:.2} MiB ({:.1} KiB per node), oldest tombstone {:?}",
                live_bytes() as f64 / (1024.0 * 1024.0),
                live_bytes() as f64 / 1024.0 / n as f64,
                out.oldest_tombstone
            );
        }
    }
    out
}

/// Withdrawn names die out under churn: no node holds the tombstone of an endpoint longer than
/// `tombstone_ttl` (10 minutes) and a margin after its withdrawal. 8 whole nodes, 45 simulated
/// minutes, a node crashing and one coming back every minute. (Tombstones used to live for
/// ever: each push-pull carried them back to the nodes that had collected them, and an owner
/// that had collected its own answered the old one with a new one.)
#[test]
fn withdrawn_names_die_out_under_churn() {
    let (seed, _g) = seed(37);
    let churned = churn(seed, 8, 45);
    let ttl = grinta_proto::registry::RegistryLimits::default().tombstone_ttl;
    assert!(
        churned.oldest_tombstone <= ttl + Duration::from_secs(60),
        "seed {seed}: a tombstone lived {:?}",
        churned.oldest_tombstone
    );
}

/// Hours of churn leave no state behind: [`churn`] with 24 nodes for `MINUTES` (default 360)
/// simulated minutes. No tombstone outlives `tombstone_ttl` and a margin, and the live heap does
/// not grow: the mean of the later half of its samples (every 10 minutes from minute 30) is
/// within 5% of the mean of the earlier half. (The open connections, about 23 KiB each, vary by
/// a few dozen between samples as crashed processes' connections idle out.)
///
/// `cargo test --release -p grinta-tests --test scale -- --ignored --nocapture hours_of_churn`
#[test]
#[ignore = "about a minute in release; run with --release --ignored --nocapture (MINUTES)"]
fn hours_of_churn_leave_no_state_behind() {
    let (seed, _g) = seed(36);
    let churned = churn(seed, 24, env_u64("MINUTES", 360));
    let ttl = grinta_proto::registry::RegistryLimits::default().tombstone_ttl;
    assert!(
        churned.oldest_tombstone <= ttl + Duration::from_secs(60),
        "seed {seed}: a tombstone lived {:?}",
        churned.oldest_tombstone
    );
    let samples = &churned.samples;
    let half = samples.len() / 2;
    if half > 0 {
        let mean =
            |s: &[(u64, usize)]| s.iter().map(|&(_, b)| b as f64).sum::<f64>() / s.len() as f64;
        let (early, late) = (mean(&samples[..half]), mean(&samples[half..]));
        println!("live heap: {early:.0} bytes on average early, {late:.0} late");
        assert!(
            late <= early * 1.05,
            "seed {seed}: the heap grew from {early:.0} to {late:.0} bytes: {samples:?}"
        );
    }
}

/// A member reconnecting after its connection idled out resumes its TLS session: no
/// certificate signatures.
#[test]
fn reconnections_resume_their_tls_session() {
    let (seed, _g) = seed(33);
    let ca = DevCa::from_seed(seed).expect("dev CA");
    let mut c: Cluster<SimulatedNode> = Cluster::nodes_with(
        seed,
        NetConfig::default(),
        node_membership_config(),
        certificates(&ca, 4),
        |config| config.transport.idle_timeout = Duration::from_millis(1500),
    );
    c.form(Duration::from_millis(200));
    c.run_for(Duration::from_secs(10));
    let dialled = |c: &Cluster<SimulatedNode>| -> u64 {
        (0..4)
            .map(|i| c.sim.node(i).node.stats().transport.connections_dialled)
            .sum()
    };
    let (h0, s0) = (dialled(&c), grinta_tests::det_crypto::signatures());
    c.run_for(Duration::from_secs(30));
    let handshakes = dialled(&c) - h0;
    let signatures = grinta_tests::det_crypto::signatures() - s0;
    println!("{handshakes} handshakes, {signatures} signatures");
    assert!(handshakes >= 20, "connections idle out between probes");
    assert!(c.converged());
    assert!(
        signatures < handshakes / 2,
        "{signatures} signatures for {handshakes} handshakes: sessions are not resumed"
    );
}

/// Issue 16, item 6: a push-pull of the whole state of a 1,000-node cluster with 10,000 names,
/// every claim signed with real certificates, stays within a node's push-pull limit with its
/// directory aboard, and a joiner that receives it holds every member and every name at once.
#[test]
fn a_push_pull_of_1000_members_and_10000_names_fits_and_completes_a_joiner() {
    use bytes::Bytes;
    use grinta_proto::claims::{self, CertificateKeys, ClaimKind};
    use grinta_proto::membership::{Event, MemberState, Membership};
    use grinta_proto::node::NodeConfig;
    use grinta_proto::registry::{EndpointKind, Record};
    use grinta_proto::{tls, wire};
    use grinta_tests::membership_sim::{node_addr, node_name};
    use prost::Message;

    let (n, names) = (1000usize, 10_000usize);
    let ca = DevCa::from_seed(1000).expect("dev CA");
    // Node n is the joiner.
    let certs = certificates(&ca, n + 1);
    let keys = |i: usize, capacity: usize| {
        CertificateKeys::new(
            &certs[i],
            &node_name(i),
            tls::crypto_provider(),
            tls::system_time(),
            capacity,
        )
        .expect("keys")
    };
    let signers: Vec<CertificateKeys> = (0..n).map(|i| keys(i, 16)).collect();
    let addr = |i: usize| {
        let a = node_addr(i);
        let ip = match a.ip() {
            std::net::IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
        };
        wire::SocketAddress {
            ip,
            port: u32::from(a.port()),
        }
    };
    let alives: Vec<wire::Signed> = (0..n)
        .map(|i| {
            let body = wire::Alive {
                node: node_name(i),
                incarnation: 1,
                addr: Some(addr(i)),
                meta: Bytes::new(),
            };
            claims::sign(&signers[i], ClaimKind::Alive, body.encode_to_vec(), true).expect("sign")
        })
        .collect();
    let records: Vec<wire::Signed> = (0..names)
        .map(|j| {
            let owner = j % n;
            let record = Record {
                name: format!("service-{j}"),
                owner: node_name(owner),
                owner_incarnation: 1,
                version: j as u64 + 1,
                claimed: true,
                kind: EndpointKind::Group,
                value: Bytes::new(),
                durable: false,
            };
            let body = record.to_wire().encode_to_vec();
            claims::sign(&signers[owner], ClaimKind::Record, body, false).expect("sign")
        })
        .collect();
    let app_state = Bytes::from(wire::RegistryState { records }.encode_to_vec());

    // Node 0 learns the cluster from node 1's push-pull, then answers a joiner with all of it.
    let config = NodeConfig::new(&node_name(0), node_addr(0), certs[0].clone()).membership_config();
    let now = Instant::now();
    let mut node0 = Membership::new(
        config.clone(),
        &node_name(0),
        node_addr(0),
        1,
        now,
        Box::new(keys(0, 2 * n)),
    )
    .expect("node 0");
    node0.set_app_state(app_state.clone());
    let members = (1..n)
        .map(|i| wire::MemberEntry {
            node: node_name(i),
            addr: Some(addr(i)),
            incarnation: 1,
            state: wire::MemberState::Alive as i32,
            meta: Bytes::new(),
            alive: Some(alives[i].clone()),
            leave: None,
        })
        .collect();
    let from_node1 = wire::PushPull {
        protocol_version: wire::PROTOCOL_VERSION,
        sender: node_name(1),
        join: false,
        reply: true,
        members,
        ..Default::default()
    };
    node0.handle_stream(now, node_addr(1), &from_node1.encode_to_vec());
    assert_eq!(
        node0.member_states().count(),
        n - 1,
        "node 0 took every member"
    );
    while node0.poll_outgoing().is_some() {}

    let mut joiner = Membership::new(
        config.clone(),
        &node_name(n),
        node_addr(n),
        2,
        now,
        Box::new(keys(n, 2 * n)),
    )
    .expect("joiner");
    joiner.join(now, &[node_addr(0)]);
    let request = joiner.poll_outgoing().expect("join request");
    let dropped = node0.stats().dropped_for_limits;
    node0.handle_stream(now, node_addr(n), &request.payload);
    let reply = std::iter::from_fn(|| node0.poll_outgoing())
        .find(|t| t.dst == node_addr(n))
        .expect("push-pull reply");
    assert_eq!(
        node0.stats().dropped_for_limits,
        dropped,
        "the directory was not left out"
    );
    println!(
        "push-pull of {n} signed members and {names} signed names: {} bytes (limit {}); directory {} bytes",
        reply.payload.len(),
        config.max_push_pull_size,
        app_state.len()
    );
    assert!(reply.payload.len() <= config.max_push_pull_size);

    joiner.handle_stream(now, node_addr(0), &reply.payload);
    let alive = joiner
        .member_states()
        .filter(|&(_, state)| state == MemberState::Alive)
        .count();
    assert_eq!(alive, n, "the joiner holds every member at join");
    let state = std::iter::from_fn(|| joiner.poll_event())
        .find_map(|e| match e {
            Event::AppState { state, .. } => Some(state),
            _ => None,
        })
        .expect("the directory came with the push-pull");
    let received = wire::RegistryState::decode(state).expect("directory");
    assert_eq!(received.records.len(), names);
    // Every name checks against its owner's certificate, learnt from the owner's alive.
    let mut verifier = keys(n, 2 * n);
    for (i, alive) in alives.iter().enumerate() {
        claims::verify(&mut verifier, &node_name(i), ClaimKind::Alive, alive).expect("alive");
    }
    let mut seen = std::collections::HashSet::new();
    for signed in &received.records {
        let record = wire::EndpointRecord::decode(&signed.body[..]).expect("record");
        claims::verify(&mut verifier, &record.owner, ClaimKind::Record, signed)
            .expect("record signature");
        seen.insert(record.name);
    }
    assert_eq!(
        seen.len(),
        names,
        "every name is in the joiner's directory at join"
    );

    // Later exchanges between the two, which now agree, carry the sums of their tables and
    // nothing in full.
    joiner.set_app_state(app_state.clone());
    while joiner.poll_outgoing().is_some() {}
    while node0.poll_outgoing().is_some() {}
    joiner.handle_timeout(now + config.push_pull_interval * 20);
    let request = std::iter::from_fn(|| joiner.poll_outgoing())
        .find(|t| t.channel == grinta_proto::membership::Channel::Stream)
        .expect("a periodic push-pull (to a random member: node 0 answers it here)");
    node0.handle_stream(now, node_addr(n), &request.payload);
    let reply = std::iter::from_fn(|| node0.poll_outgoing())
        .find(|t| t.dst == node_addr(n))
        .expect("push-pull reply");
    println!(
        "periodic exchange of the same state: request {} bytes, reply {} bytes",
        request.payload.len(),
        reply.payload.len()
    );
    assert!(request.payload.len() < 100);
    assert!(reply.payload.len() < 100, "nothing to send back");
    let members_sent = joiner.stats().push_pull_members_sent;
    joiner.handle_stream(now, node_addr(0), &reply.payload);
    assert!(
        std::iter::from_fn(|| joiner.poll_outgoing()).all(
            |t| t.dst != node_addr(0) || t.channel != grinta_proto::membership::Channel::Stream
        ),
        "nothing wanted"
    );
    assert_eq!(joiner.stats().push_pull_members_sent, members_sent);
}

/// Checks a mass join's report against the scale issue's bounds: the window ran whole without a
/// suspicion or a death (lossless), every view became exact, every broadcast reached every node
/// (99.99% within 2.5 s at 10% loss) and every survivor detected the crash (median within the
/// least suspicion timeout plus 3 s, p99 within it plus 5 s or 20 s).
fn assert_mass_join_bounds(n: usize, r: &grinta_tests::mass_join::Report) {
    assert!(r.simulated_s >= 60.0, "stopped at a budget: {r:?}");
    assert_eq!((r.suspicions, r.deaths), (0, 0), "{r:?}");
    assert!(r.converged_s.is_some(), "views never all exact: {r:?}");
    let a = r.after.as_ref().expect("measured after formation");
    assert_eq!(a.dissemination_missing, 0, "{a:?}");
    assert!(a.dissemination_p9999_s <= 2.5, "{a:?}");
    assert_eq!(a.detection_watchers, n - 1, "{a:?}");
    assert_eq!(a.detection_missing, 0, "{a:?}");
    let least_suspicion = 4.0 * (n as f64).log10();
    assert!(a.detection_median_s <= least_suspicion + 3.0, "{a:?}");
    assert!(
        a.detection_p99_s <= (least_suspicion + 5.0).max(20.0),
        "{a:?}"
    );
}

/// The benchmark suite's mass join, on two threads: 600 members join over 30 s (past 512, gossip
/// queues fill and push-pull repairs what they drop), and the run goes through formation, exact
/// views, three broadcasts at 10% loss and a crash.
#[test]
fn a_mass_join_on_two_threads_forms_spreads_and_detects() {
    let n = 600;
    let r = grinta_tests::mass_join::run(
        n,
        2,
        usize::MAX,
        Duration::MAX,
        grinta_tests::mass_join::CONVERGE_WAIT,
    );
    println!("{r:?}");
    assert_mass_join_bounds(n, &r);
    assert_eq!(r.view_entries, n * (n - 1));
}

/// 10,000 members (`NODES` for another size): the scale issue's membership-only run, on every
/// core. About 10 minutes in release on two cores and 8 GiB of heap; it asserts the bounds of
/// [`assert_mass_join_bounds`] and the 8 GiB heap, never the wall time (the benchmark suite
/// reports that: `cargo run --release -p grinta-bench -- --scale 10000`).
#[test]
#[ignore = "10 minutes and 8 GiB in release: --release --ignored --nocapture (NODES)"]
fn ten_thousand_members_form_spread_and_detect() {
    let n = usize::try_from(env_u64("NODES", 10_000)).expect("NODES fits");
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let r = grinta_tests::mass_join::run(
        n,
        threads,
        grinta_tests::mass_join::HEAP_BUDGET,
        Duration::MAX,
        grinta_tests::mass_join::CONVERGE_WAIT,
    );
    println!("{r:?}");
    assert_mass_join_bounds(n, &r);
    assert!(r.peak_heap_bytes <= grinta_tests::mass_join::HEAP_BUDGET);
}
