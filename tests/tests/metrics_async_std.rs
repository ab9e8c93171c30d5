//! What a fabric counts and publishes through the `metrics` facade, under async-std (see
//! `common/metrics_scenario.rs`).

#[path = "common/metrics_scenario.rs"]
mod scenario;

#[async_std::test]
async fn fabrics_count_and_publish_what_they_do() {
    scenario::fabrics_count_and_publish_what_they_do::<grinta_async_std::AsyncIo>().await;
}
