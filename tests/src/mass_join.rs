//! A mass join on the membership simulator: the scale runs of the benchmark suite (`--scale N`)
//! and of `tests/tests/scale.rs`, one scenario for both.
//!
//! `n` members join over 30 simulated seconds; the run reports the wall time and the heap of
//! the first 60 simulated seconds, when every view became exact, how far three broadcasts spread
//! at 10% loss, and how fast a crash is detected.

use std::time::{Duration, Instant};

use grinta_proto::membership::{Config, MemberState};
use serde::{Deserialize, Serialize};

use crate::engine::NetConfig;
use crate::membership_sim::{Cluster, MemberNode, node_addr, node_name, quantile};
use crate::{alloc, lan};

/// The measured window: joins over its first half.
pub const WINDOW: Duration = Duration::from_secs(60);

/// What a mass-join run measured (see [`run`]); serialised as one JSON line by the benchmark
/// suite's child process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Members in the run.
    pub nodes: usize,
    /// Wall seconds to the end of the window (or to the budget that stopped the run).
    pub wall_s: f64,
    /// The process's peak resident set, in MiB, when the report was made.
    pub peak_rss_mib: f64,
    /// Messages (datagrams and push-pulls) sent per node per simulated second over the window.
    pub messages_per_node_per_s: f64,
    /// Whether every view was exact at the end of the window.
    pub converged: bool,
    /// Live heap at the end of the window, from before the cluster was made.
    pub live_heap_bytes: usize,
    /// The largest live heap the run's budget checks saw.
    #[serde(default)]
    pub peak_heap_bytes: usize,
    /// Entries of every node's member table at the end of the window (N x (N - 1) when exact).
    pub view_entries: usize,
    /// Simulated seconds reached: less than 60 when the run stopped at the memory budget.
    pub simulated_s: f64,
    /// Push-pull messages sent by all nodes (requests and replies), and their bytes.
    pub push_pulls: u64,
    /// Bytes of those push-pull messages.
    pub push_pull_bytes: u64,
    /// Membership datagrams sent by all nodes.
    pub packets: u64,
    /// Suspicions raised and deaths declared by all nodes (a lossless run should have none).
    pub suspicions: u64,
    /// Deaths declared by all nodes.
    pub deaths: u64,
    /// Threads the nodes' work ran on.
    #[serde(default)]
    pub threads: usize,
    /// When every view was exact, in simulated seconds from the start (checked at the end of
    /// the window, then every 5 s for up to the run's `converge_wait`).
    #[serde(default)]
    pub converged_s: Option<f64>,
    /// What a formed cluster does next (absent when the run did not form in its budget).
    #[serde(default)]
    pub after: Option<AfterFormation>,
}

/// After formation (the window and the wait for exact views): broadcasts spreading at 10% loss,
/// then a crash detected on a lossless network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AfterFormation {
    /// Every node's delay to first see each of the broadcasts, in seconds: the 99th percentile.
    pub dissemination_p99_s: f64,
    /// The 99.99th percentile of those delays.
    pub dissemination_p9999_s: f64,
    /// The largest of those delays.
    pub dissemination_max_s: f64,
    /// Node-broadcast pairs still missing 5 s after the broadcast.
    pub dissemination_missing: usize,
    /// Every survivor's time to declare the crashed node Dead, in seconds: the median.
    pub detection_median_s: f64,
    /// The 99th percentile of those times.
    pub detection_p99_s: f64,
    /// Survivors that held it alive at the crash and had not declared it Dead 60 s after.
    pub detection_missing: usize,
    /// How many survivors held it alive at the crash.
    pub detection_watchers: usize,
    /// Simulated seconds this phase took.
    pub simulated_s: f64,
    /// Wall seconds this phase took.
    pub wall_s: f64,
}

/// How long past the window a run waits for every view to be exact.
pub const CONVERGE_WAIT: Duration = Duration::from_secs(600);

/// Broadcasts this many items, one after the other, after formation.
pub const BROADCASTS: usize = 3;

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
    run_while(c, Duration::from_secs(60), &|c| {
        watchers
            .iter()
            .any(|&i| c.detection_time(i, victim, t0).is_none())
    });
    let times: Vec<Option<Duration>> = watchers
        .iter()
        .map(|&i| c.detection_time(i, victim, t0))
        .collect();
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

/// A run stops when the heap passes this, the target for 10,000 members...
pub const HEAP_BUDGET: usize = 8 << 30;

/// ... or when it has taken this much wall time, the target for the same run.
pub const WALL_BUDGET: Duration = Duration::from_secs(300);

/// `n` members (the membership state machines alone, unsigned claims, lossless 1 ms LAN, seed 7)
/// join over the first 30 simulated seconds, each through a node that joined before it, on
/// `threads` threads ([`Sim::run_until_parallel`](crate::engine::Sim::run_until_parallel): the
/// outcome is the same for any number). The run measures 60 simulated seconds, stopping early
/// past `heap_budget` bytes of live heap (counted by [`alloc::Counting`], which must be the
/// global allocator for the budget to hold) or `wall_budget`. A run that got through the 60 s
/// goes on until every view is exact (for up to `converge_wait`), then measures
/// [`AfterFormation`]. Progress goes to stderr every 5 simulated seconds.
pub fn run(
    n: usize,
    threads: usize,
    heap_budget: usize,
    wall_budget: Duration,
    converge_wait: Duration,
) -> Report {
    let heap_before = alloc::live_bytes();
    let wall = Instant::now();
    let mut c = Cluster::new(7, n, Config::lan(), lan());
    let start = c.sim.now();
    let spread = Duration::from_secs(30);
    // The largest live heap seen where the budget is checked (every 64 joins, then every
    // 250 simulated ms).
    let peak_heap = std::cell::Cell::new(0usize);
    let over_budget = || {
        let live = alloc::live_bytes().wrapping_sub(heap_before);
        peak_heap.set(peak_heap.get().max(live));
        live > heap_budget || wall.elapsed() > wall_budget
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
    let report = Report {
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
    // 300 s), for up to `converge_wait`; then the after-formation phase.
    let formed = simulated_s + 0.01 >= WINDOW.as_secs_f64();
    let mut converged_s = converged.then_some(simulated_s);
    if formed {
        while converged_s.is_none() && c.sim.now() < start + WINDOW + converge_wait {
            c.sim
                .run_until_parallel(c.sim.now() + Duration::from_secs(5), threads);
            if c.converged() {
                converged_s = Some((c.sim.now() - start).as_secs_f64());
            }
        }
    }
    Report {
        converged_s,
        after: formed.then(|| after_formation(&mut c, threads)),
        ..report
    }
}
