//! What a fabric counts and publishes through the `metrics` facade, under tokio (see
//! `common/metrics_scenario.rs`).

#[path = "common/metrics_scenario.rs"]
mod scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabrics_count_and_publish_what_they_do() {
    scenario::fabrics_count_and_publish_what_they_do::<grinta_tokio::Tokio>().await;
}
