//! Logs with `tracing`: two nodes, one flow, then shutdown, with every event the nodes log
//! printed by `tracing-subscriber`. Each line carries the node it comes from (`node{name=..}`)
//! and, for a flow's events, the flow (`flow{id=.. endpoint=.. peer=..}`).
//!
//! Run: `cargo run -p grinta-tokio --example tracing` (debug level for grinta), or choose with
//! `RUST_LOG`, e.g. `RUST_LOG=grinta_proto=trace,quinn_proto=debug`.

use grinta_tokio::{DevCa, Fabric, Profile};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("grinta_proto=debug"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let ca = DevCa::new()?;
    let server = Fabric::builder("server")
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .start()?;
    let client = Fabric::builder("client")
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .seed(server.local_addr())
        .start()?;

    let echo = server.endpoint("echo")?;
    tokio::spawn(async move {
        while let Ok(mut flow) = echo.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(message)) = flow.recv().await {
                    if flow.send(message).await.is_err() {
                        return;
                    }
                }
                let _ = flow.finish().await;
            });
        }
    });
    client
        .wait_for("echo", std::time::Duration::from_secs(10))
        .await?;
    let mut flow = client.dial("echo").await?;
    flow.send(b"logged".to_vec()).await?;
    flow.finish().await?;
    while flow.recv().await?.is_some() {}
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
