//! The membership simulator at 1000 and 10000 nodes, whole nodes' CPU per node as the cluster
//! grows, and the bytes of state per member and per connection. Each membership-simulator size
//! runs in a child process (this binary with `--scale N`) so that its peak memory is its own.

use std::process::Command;
use std::time::Duration;

use grinta_proto::membership::Config;
use grinta_proto::tls::dev::DevCa;
use grinta_tests::mass_join::{self, BROADCASTS, CONVERGE_WAIT, Report, WINDOW};
use grinta_tests::membership_sim::Cluster;
use grinta_tests::node_sim::{certificates, node_membership_config, steady_state_cost};
use grinta_tests::{alloc, lan};

use crate::Measurement;

/// Child process: the mass join of [`mass_join::run`] at `n` members, printed as one JSON line.
/// `GRINTA_SCALE_WALL_S` overrides the 5-minute wall budget; the nodes run on every core
/// (`GRINTA_SCALE_THREADS` overrides; the outcome is the same for any number).
pub(crate) fn child(n: usize) {
    let wall_budget = std::env::var("GRINTA_SCALE_WALL_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(mass_join::WALL_BUDGET, Duration::from_secs);
    let threads = std::env::var("GRINTA_SCALE_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let report = mass_join::run(
        n,
        threads,
        mass_join::HEAP_BUDGET,
        wall_budget,
        mass_join::CONVERGE_WAIT,
    );
    println!("{}", serde_json::to_string(&report).expect("report"));
}

fn spawn_child(n: usize) -> Option<Report> {
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

/// Every node's connection budget in the whole-node runs: `GRINTA_BENCH_MAX_CONNECTIONS=512`
/// (with `GRINTA_BENCH_WHOLE_NODES=100,1000`) runs N=1,000 in about 15 GiB and 25 minutes, where
/// the default budget needs about 23 GiB. `None`: the transport's default.
fn whole_node_budget() -> Option<usize> {
    std::env::var("GRINTA_BENCH_MAX_CONNECTIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

/// The steady-state window of the whole-node runs: 60 simulated seconds, or
/// `GRINTA_BENCH_WHOLE_WINDOW_S` (a longer one gives `perf record -p <process>` something to
/// sample: the run prints its process id when the window starts).
fn whole_node_window() -> Duration {
    std::env::var("GRINTA_BENCH_WHOLE_WINDOW_S")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// CPU per node per simulated second of whole nodes (QUIC, mutual TLS) over a steady-state
/// window (60 s, see [`whole_node_window`]), the sizes one after another in this process;
/// every size past the first is compared with the first (the scale issue's target: within
/// 1.5x).
pub(crate) fn whole_nodes() -> Vec<Measurement> {
    let mut out = Vec::new();
    let window = whole_node_window();
    let mut reference: Option<(usize, f64)> = None;
    let budget = whole_node_budget();
    for n in whole_node_sizes() {
        alloc::set_counting(true);
        let cost = steady_state_cost(31, n, window, None, budget);
        alloc::set_counting(false);
        eprintln!("  whole nodes {n}: {cost:?}");
        let warm_up = match budget {
            Some(budget) if budget + 1 < n => {
                format!("a budget of {budget} connections per node, 30 s after formation")
            }
            _ => "after formation and two probe rounds".to_owned(),
        };
        let note = format!(
            "whole nodes (QUIC, mutual TLS) in the simulator, lossless 1 ms LAN, {} s window, {warm_up}: {:.1} handshakes per node per min, {:.0} connections and {:.1} MiB of heap per node, {} failed probes",
            window.as_secs(),
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
