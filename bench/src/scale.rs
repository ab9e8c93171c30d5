//! The membership simulator at 1000 and 10000 nodes, whole nodes' CPU per node as the cluster
//! grows, and the bytes of state per member and per connection. Each membership-simulator size
//! runs in a child process (this binary with `--scale N`) so that its peak memory is its own.

use std::process::Command;
use std::time::{Duration, Instant};

use grinta_proto::membership::Config;
use grinta_proto::membership::MemberState;
use grinta_proto::tls::dev::DevCa;
use grinta_tests::engine::NetConfig;
use grinta_tests::membership_sim::{Cluster, MemberNode, node_addr, node_name, quantile};
use grinta_tests::node_sim::{certificates, node_membership_config, steady_state_cost};
use grinta_tests::{alloc, lan};
use serde::{Deserialize, Serialize};

use crate::Measurement;

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct ScaleReport {
    nodes: usize,
    wall_s: f64,
    peak_rss_mib: f64,
    messages_per_node_per_s: f64,
    converged: bool,
    live_heap_bytes: usize,
    /// The largest live heap the run's budget checks saw.
    #[serde(default)]
    peak_heap_bytes: usize,
    view_entries: usize,
    /// Simulated seconds reached: less than 60 when the run stopped at the memory budget.
    simulated_s: f64,
    /// Push-pull messages sent by all nodes (requests and replies), and their bytes.
    push_pulls: u64,
    push_pull_bytes: u64,
    /// Membership datagrams sent by all nodes.
    packets: u64,
    /// Suspicions raised and deaths declared by all nodes (a lossless run should have none).
    suspicions: u64,
    deaths: u64,
    /// Threads the nodes' work ran on.
    #[serde(default)]
    threads: usize,
    /// When every view was exact, in simulated seconds from the start (checked at the end of
    /// the window, then every 5 s for up to `CONVERGE_WAIT`).
    #[serde(default)]
    converged_s: Option<f64>,
    /// What a formed cluster does next (absent when the run did not form in its budget).
    #[serde(default)]
    after: Option<AfterFormation>,
}

/// After formation (the window and the wait for exact views): broadcasts spreading at 10% loss,
/// then a crash detected on a lossless network.
#[derive(Debug, Serialize, Deserialize)]
struct AfterFormation {
    /// Every node's delay to first see each of the broadcasts, in seconds: 99th and 99.99th
    /// percentiles and the largest.
    dissemination_p99_s: f64,
    dissemination_p9999_s: f64,
    dissemination_max_s: f64,
    /// Node-broadcast pairs still missing 5 s after the broadcast.
    dissemination_missing: usize,
    /// Every survivor's time to declare the crashed node Dead: median and 99th percentile.
    detection_median_s: f64,
    detection_p99_s: f64,
    /// Survivors that held it alive at the crash and had not declared it Dead 60 s after.
    detection_missing: usize,
    /// How many survivors held it alive at the crash.
    detection_watchers: usize,
    /// Simulated and wall seconds this phase took.
    simulated_s: f64,
    wall_s: f64,
}

/// How long past the window a run waits for every view to be exact.
const CONVERGE_WAIT: Duration = Duration::from_secs(600);

/// Broadcasts this many items, one after the other, after formation.
const BROADCASTS: usize = 3;

/// Runs the after-formation phase on a formed cluster (see [`AfterFormation`]).
fn after_formation(c: &mut Cluster<MemberNode>, threads: usize) -> AfterFormation {
    let wall = Instant::now();
    let start = c.sim.now();
    let n = c.sim.len();
    // Runs in steps of 100 ms while `pending` holds, for at most `limit`.
    let run_while = |c: &mut Cluster<MemberNode>,
                     limit: Duration,
                     pending: &dyn Fn(&Cluster<MemberNode>) -> bool| {
        let end = c.sim.now() + limit;
        while c.sim.now() < end && pending(c) {
            let step = (end - c.sim.now()).min(Duration::from_millis(100));
            c.sim.run_until_parallel(c.sim.now() + step, threads);
        }
    };
    let lan = *c.sim.net();
    c.sim.set_net(NetConfig { loss: 0.10, ..lan });
    let (mut delays, mut dissemination_missing) = (Vec::new(), 0);
    for item in 0..BROADCASTS {
        // Origins spread over the cluster, the same in every run.
        let origin = (item * 7919 + 13) % n;
        let key = format!("item-{item}");
        let t0 = c.sim.now();
        c.sim
            .with_node(origin, |node, now| node.publish(key.as_bytes(), 1, now));
        run_while(c, Duration::from_secs(5), &|c| {
            (0..n).any(|i| !c.sim.node(i).kv.entries.contains_key(key.as_bytes()))
        });
        for i in 0..n {
            match c.sim.node(i).kv.entries.get(key.as_bytes()) {
                Some((_, seen)) => delays.push(seen.saturating_duration_since(t0)),
                None => dissemination_missing += 1,
            }
        }
    }
    c.sim.set_net(lan);
    let victim = n / 3 + 1;
    // Detected by the survivors that held it alive (all of them once the views are exact).
    let name = node_name(victim);
    let watchers: Vec<usize> = (0..n)
        .filter(|&i| {
            i != victim && c.sim.node(i).membership.member_state(&name) == Some(MemberState::Alive)
        })
        .collect();
    c.kill(victim);
    let t0 = c.sim.now();
    let detected_by = |c: &Cluster<MemberNode>, i: usize| {
        c.sim
            .node(i)
            .seen
            .dead
            .get(&name)
            .map(|t| t.saturating_duration_since(t0))
    };
    run_while(c, Duration::from_secs(60), &|c| {
        watchers.iter().any(|&i| detected_by(c, i).is_none())
    });
    let times: Vec<Option<Duration>> = watchers.iter().map(|&i| detected_by(c, i)).collect();
    let detection_missing = times.iter().filter(|t| t.is_none()).count();
    let detected: Vec<Duration> = times.into_iter().flatten().collect();
    let q = |v: &[Duration], p: f64| quantile(v, p).map_or(f64::NAN, |d| d.as_secs_f64());
    AfterFormation {
        dissemination_p99_s: q(&delays, 0.99),
        dissemination_p9999_s: q(&delays, 0.9999),
        dissemination_max_s: delays.iter().max().map_or(f64::NAN, Duration::as_secs_f64),
        dissemination_missing,
        detection_median_s: q(&detected, 0.5),
        detection_p99_s: q(&detected, 0.99),
        detection_missing,
        detection_watchers: watchers.len(),
        simulated_s: (c.sim.now() - start).as_secs_f64(),
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// The scale runs stop when the heap passes this, the target for 10,000 members...
const MEMORY_BUDGET: usize = 8 << 30;

/// ... or when a run has taken this much wall time, the target for the same run
/// (`GRINTA_SCALE_WALL_S` overrides it).
const WALL_BUDGET: Duration = Duration::from_secs(300);

/// Child process: `n` nodes join over the first 30 simulated seconds (each through a node that
/// joined before it), and the whole run lasts 60 simulated seconds.
pub(crate) fn child(n: usize) {
    let heap_before = alloc::live_bytes();
    let wall = Instant::now();
    let mut c = Cluster::new(7, n, Config::lan(), lan());
    let start = c.sim.now();
    let spread = Duration::from_secs(30);
    let wall_budget = std::env::var("GRINTA_SCALE_WALL_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(WALL_BUDGET, Duration::from_secs);
    // The nodes' work runs on every core (`GRINTA_SCALE_THREADS` overrides): the run is the
    // same whatever the number of threads.
    let threads = std::env::var("GRINTA_SCALE_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // The largest live heap seen where the budget is checked (every 64 joins, then every
    // 250 simulated ms).
    let peak_heap = std::cell::Cell::new(0usize);
    let over_budget = || {
        let live = alloc::live_bytes().wrapping_sub(heap_before);
        peak_heap.set(peak_heap.get().max(live));
        live > MEMORY_BUDGET || wall.elapsed() > wall_budget
    };
    // Progress on stderr, once per simulated 5 s: where the time and the memory go.
    let mut next_report = start;
    let mut report = |c: &Cluster<MemberNode>| {
        let now = c.sim.now();
        if now >= next_report {
            next_report = now + Duration::from_secs(5);
            eprintln!(
                "  {n} nodes: {:.0} simulated s, {:.0} s wall, {} MiB live heap, peak RSS {} MiB",
                (now - start).as_secs_f64(),
                wall.elapsed().as_secs_f64(),
                (alloc::live_bytes().wrapping_sub(heap_before)) >> 20,
                alloc::peak_rss_bytes() >> 20,
            );
        }
    };
    for i in 1..n {
        if i % 64 == 0 && over_budget() {
            break;
        }
        report(&c);
        let at = start + spread.mul_f64(i as f64 / n as f64);
        c.sim.run_until_parallel(at, threads);
        let seed = node_addr((i - 1) / 2);
        c.sim
            .with_node(i, |node, now| node.membership.join(now, &[seed]));
    }
    while c.sim.now() < start + WINDOW && !over_budget() {
        let step = (start + WINDOW - c.sim.now()).min(Duration::from_millis(250));
        c.sim.run_until_parallel(c.sim.now() + step, threads);
        report(&c);
    }
    let simulated_s = (c.sim.now() - start).as_secs_f64();
    let wall_s = wall.elapsed().as_secs_f64();
    let converged = c.converged();
    let stats = c.sim.stats();
    let messages = (stats.datagrams_sent + stats.reliable_sent) as f64;
    let view_entries = (0..n)
        .map(|i| c.sim.node(i).membership.member_states().count())
        .sum();
    let total = |f: fn(&grinta_proto::membership::Stats) -> u64| -> u64 {
        (0..n).map(|i| f(&c.sim.node(i).membership.stats())).sum()
    };
    let report = ScaleReport {
        push_pulls: total(|s| s.push_pulls_sent),
        push_pull_bytes: total(|s| s.push_pull_bytes_sent),
        packets: total(|s| s.packets_sent),
        suspicions: total(|s| s.suspicions_raised),
        deaths: total(|s| s.deaths_declared),
        nodes: n,
        threads,
        wall_s,
        peak_rss_mib: alloc::peak_rss_bytes() as f64 / (1 << 20) as f64,
        messages_per_node_per_s: messages / n as f64 / simulated_s.max(1e-9),
        converged,
        live_heap_bytes: alloc::live_bytes().wrapping_sub(heap_before),
        peak_heap_bytes: peak_heap.get(),
        view_entries,
        simulated_s,
        converged_s: None,
        after: None,
    };
    // Measured after the figures above: the formation's wall time and heap are the targets.
    // Past the window, the run goes on until every view is exact (periodic push-pulls repair
    // what gossip dropped in the mass join; at 10,000 members each node starts one every
    // 300 s), for up to `CONVERGE_WAIT`; then the after-formation phase.
    let formed = simulated_s + 0.01 >= WINDOW.as_secs_f64();
    let mut converged_s = converged.then_some(simulated_s);
    if formed {
        while converged_s.is_none() && c.sim.now() < start + WINDOW + CONVERGE_WAIT {
            c.sim
                .run_until_parallel(c.sim.now() + Duration::from_secs(5), threads);
            if c.converged() {
                converged_s = Some((c.sim.now() - start).as_secs_f64());
            }
        }
    }
    let report = ScaleReport {
        converged_s,
        after: formed.then(|| after_formation(&mut c, threads)),
        ..report
    };
    println!("{}", serde_json::to_string(&report).expect("report"));
}

fn spawn_child(n: usize) -> Option<ScaleReport> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe)
        .args(["--scale", &n.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "scale run at {n} nodes failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last()?).ok()
}

/// Heap bytes, view entries and connections of a formed whole-node cluster of `n`.
fn node_cluster_heap(n: usize) -> (f64, f64, f64) {
    let ca = DevCa::from_seed(3).expect("dev CA");
    let certs = certificates(&ca, n);
    alloc::set_counting(true);
    let before = alloc::live_bytes();
    let mut c = Cluster::nodes(3, lan(), node_membership_config(), certs);
    c.form(Duration::from_millis(50 * n as u64));
    c.run_for(Duration::from_secs(10));
    let connections: usize = (0..n).map(|i| c.sim.node(i).node.connection_count()).sum();
    let members: usize = (0..n)
        .map(|i| c.sim.node(i).node.membership().members().count())
        .sum();
    let heap = alloc::live_bytes().wrapping_sub(before);
    alloc::set_counting(false);
    (heap as f64, members as f64, connections as f64)
}

/// Heap bytes of a formed membership-only cluster of `n`.
fn member_cluster_heap(n: usize) -> usize {
    alloc::set_counting(true);
    let before = alloc::live_bytes();
    let mut c = Cluster::formed(
        3,
        n,
        Config::lan(),
        lan(),
        Duration::from_millis(50 * n as u64),
    );
    c.run_for(Duration::from_secs(10));
    let heap = alloc::live_bytes().wrapping_sub(before);
    alloc::set_counting(false);
    heap
}

pub(crate) fn run() -> Vec<Measurement> {
    let mut out = Vec::new();
    for n in [1000usize, 10_000] {
        let Some(r) = spawn_child(n) else { continue };
        eprintln!("  scale {n}: {r:?}");
        let note = if r.simulated_s + 0.01 < WINDOW.as_secs_f64() {
            format!(
                "membership simulator, {n} nodes: stopped at the 8 GiB heap or 5 min wall budget after {:.1} simulated s ({} view entries)",
                r.simulated_s, r.view_entries
            )
        } else {
            format!("membership simulator, {n} nodes joining over 30 s, 60 simulated s")
        };
        out.push(Measurement::alone(
            &format!("sim_{n}_wall"),
            r.wall_s,
            "s",
            &note,
        ));
        out.push(Measurement::alone(
            &format!("sim_{n}_peak_rss"),
            r.peak_rss_mib,
            "MiB",
            &note,
        ));
        out.push(Measurement::alone(
            &format!("sim_{n}_messages_per_node_s"),
            r.messages_per_node_per_s,
            "msg/s",
            &note,
        ));
        if let Some(a) = &r.after {
            let note = format!(
                "membership simulator, {n} nodes after formation ({}): {BROADCASTS} broadcasts at 10% loss ({} node-broadcast pairs missing after 5 s), then one crash on a lossless network (detected by {} of the {} survivors that held it alive within 60 s); {:.0} simulated s in {:.0} s of wall time",
                r.converged_s.map_or_else(
                    || format!(
                        "views not all exact {:.0} s after the start",
                        WINDOW.as_secs_f64() + CONVERGE_WAIT.as_secs_f64()
                    ),
                    |t| format!("every view exact {t:.1} s after the start"),
                ),
                a.dissemination_missing,
                a.detection_watchers - a.detection_missing,
                a.detection_watchers,
                a.simulated_s,
                a.wall_s
            );
            for (name, value) in [
                ("dissemination_p9999", a.dissemination_p9999_s),
                ("detection_median", a.detection_median_s),
                ("detection_p99", a.detection_p99_s),
            ] {
                out.push(Measurement::alone(
                    &format!("sim_{n}_{name}"),
                    value,
                    "s",
                    &note,
                ));
            }
        }
    }
    out.extend(whole_nodes());
    out.extend(state());
    out
}

/// Whole-node cluster sizes the suite measures, the first one the reference:
/// `GRINTA_BENCH_WHOLE_NODES=100,500` overrides the default `100,300`. Each size holds a QUIC
/// connection per pair of nodes (about 23 KiB with its TLS state): N=500 needs about 6 GiB and
/// 4 minutes, N=1,000 about 23 GiB.
fn whole_node_sizes() -> Vec<usize> {
    std::env::var("GRINTA_BENCH_WHOLE_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![100, 300])
}

/// CPU per node per simulated second of whole nodes (QUIC, mutual TLS) over a 60 s steady-state
/// window, the sizes one after another in this process; every size past the first is compared
/// with the first (the scale issue's target: within 1.5x).
pub(crate) fn whole_nodes() -> Vec<Measurement> {
    let mut out = Vec::new();
    let mut reference: Option<(usize, f64)> = None;
    for n in whole_node_sizes() {
        alloc::set_counting(true);
        let cost = steady_state_cost(31, n, Duration::from_secs(60), None);
        alloc::set_counting(false);
        eprintln!("  whole nodes {n}: {cost:?}");
        let note = format!(
            "whole nodes (QUIC, mutual TLS) in the simulator, lossless 1 ms LAN, 60 s window after formation and two probe rounds: {:.1} handshakes per node per min, {:.0} connections and {:.1} MiB of heap per node, {} failed probes",
            cost.handshakes_per_node_min,
            cost.connections_per_node,
            cost.heap_per_node / (1024.0 * 1024.0),
            cost.probes_failed
        );
        let name = format!("sim_whole_node_{n}_cpu_per_node_s");
        out.push(match reference {
            Some((base_n, base)) => Measurement::lower(
                &name,
                cost.cpu_us_per_node_s,
                "us",
                &format!("N={base_n} in the same run ({note})"),
                base,
            ),
            None => {
                reference = Some((n, cost.cpu_us_per_node_s));
                Measurement::alone(&name, cost.cpu_us_per_node_s, "us", &note)
            }
        });
    }
    out
}

/// Heap per member entry and per connection.
pub(crate) fn state() -> Vec<Measurement> {
    let mut out = Vec::new();
    // State per known member: the slope of heap over view entries between two cluster sizes.
    let (a, b) = (20usize, 60usize);
    let per_member = (member_cluster_heap(b) as f64 - member_cluster_heap(a) as f64)
        / ((b * (b - 1)) as f64 - (a * (a - 1)) as f64);
    out.push(Measurement::alone(
        "state_per_member",
        per_member,
        "bytes",
        "membership view entry (heap slope between 20 and 60 formed nodes)",
    ));
    // State per open connection: whole nodes at two sizes; what the heap grew by beyond the
    // member entries, per connection added.
    let (h1, m1, c1) = node_cluster_heap(6);
    let (h2, m2, c2) = node_cluster_heap(16);
    out.push(Measurement::alone(
        "state_per_connection",
        ((h2 - h1) - (m2 - m1) * per_member) / (c2 - c1),
        "bytes",
        "QUIC connection with TLS state (whole-node heap growth per connection, member entries removed)",
    ));
    out
}
