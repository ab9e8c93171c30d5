//! The fabric's counters and gauges, published through the [`metrics`] facade (feature
//! `metrics`): any exporter (Prometheus, StatsD, OpenTelemetry...) installed as the global
//! recorder receives them.
//!
//! The driver publishes them at most once per [`METRICS_INTERVAL`], when it wakes (which it
//! does at least once per probe interval); [`Fabric::record_metrics`] publishes them at once.
//! Every metric carries the label `node` (this node's name); per-endpoint metrics add
//! `endpoint`, per-topic ones `topic`, member counts `state`. Counters are cumulative since the
//! node started (published as absolute values); gauges are the value now. The names are listed
//! in `docs/cluster.md`.

use std::time::Duration;

use metrics::{counter, gauge};

use super::{Fabric, Inner, Runtime};
use crate::membership::MemberState;

/// How often the driver publishes the metrics, at most.
pub const METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes every counter and gauge of the fabric to the current recorder.
pub(crate) fn record(inner: &Inner) {
    let node = inner.node.name().to_owned();
    let count = |name: &'static str, value: u64| {
        counter!(name, "node" => node.clone()).absolute(value);
    };
    let level = |name: &'static str, value: usize| {
        gauge!(name, "node" => node.clone()).set(value as f64);
    };

    // Membership.
    let membership = inner.node.membership();
    let mut by_state = [0usize; 4];
    let states = [
        (MemberState::Alive, "alive"),
        (MemberState::Suspect, "suspect"),
        (MemberState::Dead, "dead"),
        (MemberState::Left, "left"),
    ];
    for (_, state) in membership.member_states() {
        if let Some(k) = states.iter().position(|&(s, _)| s == state) {
            by_state[k] += 1;
        }
    }
    for (k, (_, label)) in states.iter().enumerate() {
        gauge!("grinta_members", "node" => node.clone(), "state" => *label).set(by_state[k] as f64);
    }
    let stats = inner.node.stats();
    let m = &stats.membership;
    count("grinta_membership_packets_sent_total", m.packets_sent);
    count("grinta_membership_bytes_sent_total", m.packet_bytes_sent);
    count(
        "grinta_membership_packets_received_total",
        m.packets_received,
    );
    count("grinta_membership_packets_invalid_total", m.packets_invalid);
    count("grinta_membership_probes_failed_total", m.probes_failed);
    count("grinta_membership_suspicions_total", m.suspicions_raised);
    count("grinta_membership_deaths_declared_total", m.deaths_declared);
    count("grinta_membership_refutations_total", m.refutations);
    count("grinta_membership_push_pulls_total", m.push_pulls_sent);
    count("grinta_claims_verified_total", m.claims_verified);
    count("grinta_claims_rejected_total", m.claims_rejected);
    count("grinta_claims_refused_total", m.claims_refused);

    // Transport and socket.
    let t = &stats.transport;
    level("grinta_connections", inner.node.connection_count());
    count("grinta_connections_dialled_total", t.connections_dialled);
    count("grinta_connections_accepted_total", t.connections_accepted);
    count("grinta_connections_refused_total", t.connections_refused);
    count("grinta_handshakes_failed_total", t.handshakes_failed);
    count("grinta_datagrams_dropped_total", t.datagrams_dropped);
    let s = &inner.socket_stats;
    count("grinta_udp_datagrams_sent_total", s.datagrams_sent);
    count("grinta_udp_datagrams_received_total", s.datagrams_received);
    count("grinta_udp_send_errors_total", s.send_errors);
    count("grinta_udp_recv_errors_total", s.recv_errors);

    // Flows and the directory.
    level("grinta_flows_open", inner.node.flow_count());
    level("grinta_dials_pending", inner.dials.len());
    let registry = inner.node.registry();
    level(
        "grinta_directory_names",
        registry
            .names("")
            .iter()
            .filter(|n| !crate::registry::is_reserved_name(n))
            .count(),
    );
    level("grinta_directory_records", registry.len());
    let kv = inner.node.kv();
    level("grinta_kv_entries", kv.entries("").len());
    level("grinta_kv_records", kv.len());
    count("grinta_kv_records_refused_total", kv.records_refused());
    count(
        "grinta_directory_records_refused_total",
        registry.records_refused(),
    );
    for (endpoint, e) in &inner.endpoint_stats {
        let labels = [("node", node.clone()), ("endpoint", endpoint.clone())];
        counter!("grinta_endpoint_flows_accepted_total", &labels).absolute(e.flows_accepted);
        counter!("grinta_endpoint_dials_opened_total", &labels).absolute(e.dials_opened);
        counter!("grinta_endpoint_dials_failed_total", &labels).absolute(e.dials_failed);
    }

    // Topics.
    for (topic, t) in &inner.topics.stats() {
        let labels = [("node", node.clone()), ("topic", topic.clone())];
        counter!("grinta_topic_published_total", &labels).absolute(t.published);
        counter!("grinta_topic_sent_total", &labels).absolute(t.sent);
        counter!("grinta_topic_received_total", &labels).absolute(t.received);
        counter!("grinta_topic_dropped_total", &labels).absolute(t.dropped);
    }

    // Queries.
    for (topic, q) in &inner.query_stats {
        let labels = [("node", node.clone()), ("topic", topic.clone())];
        counter!("grinta_queries_total", &labels).absolute(q.queries);
        counter!("grinta_query_nodes_asked_total", &labels).absolute(q.nodes_asked);
        counter!("grinta_query_replies_total", &labels).absolute(q.replies);
        counter!("grinta_query_unanswered_total", &labels).absolute(q.unanswered);
        counter!("grinta_query_questions_handled_total", &labels).absolute(q.questions_handled);
    }
}

impl<R: Runtime> Fabric<R> {
    /// Publishes the fabric's counters and gauges to the `metrics` recorder now (the driver
    /// also does, at most once per [`METRICS_INTERVAL`]). Feature `metrics`.
    ///
    /// ```no_run
    /// # fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// // With an exporter installed as the global recorder (metrics-exporter-prometheus,
    /// // for example), every node publishes `grinta_members{node, state}`,
    /// // `grinta_flows_open{node}`, `grinta_endpoint_flows_accepted_total{node, endpoint}`...
    /// fabric.record_metrics();
    /// # }
    /// ```
    pub fn record_metrics(&self) {
        record(&self.shared.lock());
    }
}
