//! grinta's benchmark suite: every figure next to the baseline a user would otherwise reach for,
//! measured in the same run on the same machine (see BENCHMARKS.md).
//!
//! `cargo run --release -p grinta-bench` runs everything, prints a table and writes
//! `target/bench/results.json`. `-- <filter>` runs only the measurements whose name contains
//! the filter. `-- --profile bulk|small|quinn-bulk|quinn-small|requests|request-rtt|quinn-request-rtt|datagrams|quinn-datagrams`
//! runs one side of a remote throughput measurement for about ten seconds and prints its rates
//! (`datagrams` also both nodes' datagram and socket counters: where datagrams were dropped),
//! for `perf record`. `GRINTA_BENCH_QUINN_MAX_UDP_PAYLOAD=8952` gives the raw quinn baseline the
//! jumbo bound of grinta's `_jumbo` rows (quinn's default is 1452). The
//! membership-simulator scale measurements run in child processes (the same binary, `--scale N`)
//! so each reports its own peak memory; `-- whole` runs the whole-node cost per node alone
//! (`GRINTA_BENCH_WHOLE_NODES=100,500` for other sizes, `GRINTA_BENCH_MAX_CONNECTIONS=512` for a
//! connection budget: N=1,000 fits this machine only with one; `GRINTA_BENCH_WHOLE_WINDOW_S=600`
//! for a longer window than 60 simulated seconds).

mod core_cost;
mod local;
mod patterns;
mod remote;
mod scale;
mod tcp_tls;

use std::path::PathBuf;

use serde::Serialize;

/// mimalloc, counted: the membership simulator's scale runs allocate from two threads at once and
/// hold billions of bytes in small blocks, where the system allocator spends a third of the run
/// in its arenas and leaves a quarter more resident than is live. Every measurement of the
/// suite, grinta's and its baseline's alike, runs on it.
#[global_allocator]
static ALLOC: grinta_tests::alloc::Counting<mimalloc::MiMalloc> =
    grinta_tests::alloc::Counting(mimalloc::MiMalloc);

/// One line of the results: grinta's figure, the baseline's, and their ratio (higher = better
/// for grinta, whichever way the unit goes).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Measurement {
    /// What was measured.
    pub(crate) name: String,
    /// grinta's figure.
    pub(crate) value: f64,
    /// Its unit.
    pub(crate) unit: String,
    /// What grinta is compared with.
    pub(crate) baseline: String,
    /// The baseline's figure in the same unit (`null` when there is no baseline).
    pub(crate) baseline_value: Option<f64>,
    /// grinta / baseline for higher-is-better units, baseline / grinta for lower-is-better ones.
    pub(crate) ratio: Option<f64>,
}

impl Measurement {
    /// A higher-is-better figure (throughput).
    pub(crate) fn higher(name: &str, value: f64, unit: &str, baseline: &str, base: f64) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: baseline.into(),
            baseline_value: Some(base),
            ratio: Some(value / base),
        }
    }

    /// A lower-is-better figure (latency, cost).
    pub(crate) fn lower(name: &str, value: f64, unit: &str, baseline: &str, base: f64) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: baseline.into(),
            baseline_value: Some(base),
            ratio: Some(base / value),
        }
    }

    /// A figure with nothing to compare with.
    pub(crate) fn alone(name: &str, value: f64, unit: &str, note: &str) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: note.into(),
            baseline_value: None,
            ratio: None,
        }
    }
}

/// The `q` quantile of sorted latencies, in microseconds.
pub(crate) fn percentile_us(sorted: &[std::time::Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
}

/// The median of figures from interleaved runs.
pub(crate) fn middle(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// `{prefix}_p50` and `{prefix}_p99` of sorted round trips, against the baseline's.
pub(crate) fn round_trips(
    prefix: &str,
    grinta: &[std::time::Duration],
    baseline: &str,
    base: &[std::time::Duration],
) -> Vec<Measurement> {
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .map(|(label, q)| {
            Measurement::lower(
                &format!("{prefix}_{label}"),
                percentile_us(grinta, q),
                "us",
                baseline,
                percentile_us(base, q),
            )
        })
        .collect()
}

/// The median of `runs` runs of `f`.
pub(crate) fn median(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    middle((0..runs).map(|_| f()).collect())
}

fn results_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--scale") {
        let n = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
        scale::child(n);
        return;
    }
    // Throughput is measured without the allocator's shared counter (see
    // `grinta_tests::alloc::set_counting`); the memory measurements turn it on around themselves.
    grinta_tests::alloc::set_counting(false);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.first().map(String::as_str) == Some("--profile") {
        // Only grinta's side of one remote measurement, in a loop: a target for `perf record`.
        let kind = args.get(1).map(String::as_str).unwrap_or("bulk");
        if kind.contains("datagrams") {
            runtime.block_on(patterns::profile(kind.contains("quinn")));
            return;
        }
        if kind == "requests" {
            runtime.block_on(remote::profile_requests());
            return;
        }
        if kind.contains("request-rtt") {
            runtime.block_on(remote::profile_request_rtt(kind.contains("quinn")));
            return;
        }
        runtime.block_on(remote::profile(
            kind.contains("small"),
            kind.contains("quinn"),
        ));
        return;
    }
    let filter = args.first().cloned().unwrap_or_default();
    let wanted =
        |group: &str| filter.is_empty() || group.contains(&filter) || filter.contains(group);

    let mut results: Vec<Measurement> = Vec::new();
    let mut push = |ms: Vec<Measurement>| {
        for m in &ms {
            eprintln!(
                "  {}: {:.3} {} (baseline {:?}, ratio {:?})",
                m.name, m.value, m.unit, m.baseline_value, m.ratio
            );
        }
        results.extend(ms);
    };
    if wanted("local") {
        eprintln!("local flows...");
        push(runtime.block_on(local::run()));
    }
    if wanted("remote") {
        eprintln!("remote flows...");
        push(runtime.block_on(remote::run()));
    }
    if wanted("patterns") {
        eprintln!("datagrams and pub/sub...");
        push(runtime.block_on(patterns::run()));
    }
    if wanted("core") {
        eprintln!("core cost...");
        push(core_cost::run());
    }
    if wanted("scale") {
        eprintln!("scale...");
        push(scale::run());
    } else if filter == "state" {
        eprintln!("state per member and per connection...");
        push(scale::state());
    } else if filter == "whole" {
        eprintln!("whole nodes in the simulator...");
        push(scale::whole_nodes());
    }

    println!(
        "{:<34} {:>14} {:<10} {:>14} {:>7}  baseline",
        "name", "grinta", "unit", "baseline", "ratio"
    );
    for m in &results {
        println!(
            "{:<34} {:>14.3} {:<10} {:>14} {:>7}  {}",
            m.name,
            m.value,
            m.unit,
            m.baseline_value.map_or("-".into(), |v| format!("{v:.3}")),
            m.ratio.map_or("-".into(), |r| format!("{r:.2}")),
            m.baseline
        );
    }
    let dir = results_path();
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("results.json");
    let json = serde_json::to_string_pretty(&results).expect("serialize results");
    std::fs::write(&path, json + "\n").expect("write results.json");
    println!("wrote {}", path.display());
}
