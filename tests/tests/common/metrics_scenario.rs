//! What a fabric counts (`Fabric::stats`) and publishes through the `metrics` facade: the
//! driver publishes to the global recorder by itself, with the node, endpoint and topic labels.
//! Shared by `tests/metrics.rs` (tokio) and `tests/metrics_async_std.rs`: one test per binary,
//! since the global recorder is the process's.

use std::time::Duration;

use futures::StreamExt;
use grinta_proto::fabric::Runtime;
use grinta_proto::fabric::{MAX_NAMES_COUNTED, OTHER_NAMES, QueryOptions};
use grinta_proto::tls::dev::DevCa;
use grinta_tests::real_sockets::{cluster, sleep, spawn, until};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// What the recorder holds now (a snapshot takes the values: the next shows what was
/// published since).
fn snapshot(snapshotter: &Snapshotter) -> Vec<(CompositeKey, DebugValue)> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key, value))
        .collect()
}

/// The value of metric `name` whose labels include every one of `labels`.
fn value(
    snapshot: &[(CompositeKey, DebugValue)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    snapshot
        .iter()
        .find(|(key, _)| {
            let key = key.key();
            key.name() == name
                && labels
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(_, value)| match value {
            DebugValue::Counter(c) => *c as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        })
}

/// The scenario, on runtime `R`.
pub(crate) async fn fabrics_count_and_publish_what_they_do<R: Runtime>() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this process");

    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let (client, server) = (fabrics[0].clone(), fabrics[1].clone());
    let endpoint = server.endpoint("echo").expect("endpoint");
    let mut questions = server.handle_queries("load").expect("handler");
    drop(spawn::<R, _>(async move {
        while let Some(query) = questions.next().await {
            let _ = query.respond("ok").await;
        }
    }));
    until::<R>(Duration::from_secs(20), "names spread", || {
        !client.endpoints("echo").is_empty()
            && client
                .query("load", bytes::Bytes::new(), QueryOptions::new())
                .expect("query")
                .asked()
                == 1
    })
    .await;
    // The probe queries above were dropped unanswered: count from here.
    let before = client
        .stats()
        .queries
        .get("load")
        .cloned()
        .unwrap_or_default();

    let mut flows = Vec::new();
    for _ in 0..3 {
        flows.push(client.dial("echo").await.expect("dial"));
        flows.push(endpoint.accept().await.expect("accept"));
    }
    assert!(client.dial("nobody").await.is_err());
    for _ in 0..2 {
        let mut replies = client
            .query("load", "q".into(), QueryOptions::new())
            .expect("query");
        assert_eq!(
            replies.next().await.map(|(n, _)| n).as_deref(),
            Some("node-1")
        );
        assert!(replies.next().await.is_none());
    }

    // What `stats` counts.
    let stats = client.stats();
    assert_eq!(stats.endpoints["echo"].dials_opened, 3);
    assert_eq!(stats.endpoints["nobody"].dials_failed, 1);
    let load = &stats.queries["load"];
    assert_eq!(load.queries - before.queries, 2);
    assert_eq!(load.nodes_asked - before.nodes_asked, 2);
    assert_eq!(load.replies - before.replies, 2);
    assert!(
        !stats.endpoints.keys().any(|k| k.starts_with("grinta.")),
        "query flows are counted as queries: {:?}",
        stats.endpoints.keys()
    );
    let served = server.stats();
    assert_eq!(served.endpoints["echo"].flows_accepted, 3);
    assert!(served.queries["load"].questions_handled >= 2);

    // The driver publishes by itself (at most once a second), labelled.
    let node_0 = [("node", "node-0")];
    let published_all = |published: &[(CompositeKey, DebugValue)]| {
        value(
            published,
            "grinta_endpoint_dials_opened_total",
            &[("node", "node-0"), ("endpoint", "echo")],
        ) == Some(3.0)
            && value(
                published,
                "grinta_query_replies_total",
                &[("node", "node-0"), ("topic", "load")],
            )
            .is_some_and(|v| v >= 2.0)
            && value(
                published,
                "grinta_endpoint_flows_accepted_total",
                &[("node", "node-1"), ("endpoint", "echo")],
            ) == Some(3.0)
    };
    let mut published = Vec::new();
    for _ in 0..10 {
        // Both drivers publish within a second: a snapshot then holds every node's values.
        sleep::<R>(Duration::from_millis(1100)).await;
        published = snapshot(&snapshotter);
        if published_all(&published) {
            break;
        }
    }
    assert!(published_all(&published), "{published:?}");
    assert_eq!(
        value(
            &published,
            "grinta_members",
            &[("node", "node-0"), ("state", "alive")]
        ),
        Some(1.0)
    );
    assert!(value(&published, "grinta_flows_open", &node_0).is_some_and(|v| v >= 3.0));
    assert!(value(&published, "grinta_connections", &node_0).is_some_and(|v| v >= 1.0));
    assert!(value(&published, "grinta_directory_names", &node_0).is_some_and(|v| v >= 1.0));
    assert!(
        value(&published, "grinta_membership_packets_sent_total", &node_0).is_some_and(|v| v > 0.0)
    );

    // Names beyond the bound are counted together: 5,000 dials of distinct names.
    for i in 0..5_000 {
        assert!(client.dial(&format!("nobody-{i}")).await.is_err());
    }
    client.record_metrics();
    let stats = client.stats();
    assert_eq!(stats.endpoints.len(), MAX_NAMES_COUNTED + 1);
    let counted: u64 = stats.endpoints.values().map(|e| e.dials_failed).sum();
    assert_eq!(counted, 5_001);
    assert!(stats.endpoints[OTHER_NAMES].dials_failed >= 5_000 - MAX_NAMES_COUNTED as u64);
    let labelled = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == "grinta_endpoint_dials_failed_total"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "node" && l.value() == "node-0")
        })
        .count();
    assert!(labelled <= MAX_NAMES_COUNTED + 1, "{labelled} label sets");
    drop(flows);
}
