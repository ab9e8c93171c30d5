//! Flexible topology: 15 endpoints spread over 3 nodes; every endpoint sends messages to random
//! other endpoints by name, wherever they live, and counts what it receives.
//!
//! Run: `cargo run -p grinta-tokio --example flexible-topology`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use grinta_tokio::{DevCa, Fabric, Profile};

const ENDPOINTS: usize = 15;
const MESSAGES_EACH: usize = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    let mut fabrics: Vec<Fabric> = Vec::new();
    for i in 0..3 {
        // 127.0.0.1 on a free port (the builder's default); nodes 1 and 2 join through node 0.
        let mut builder = Fabric::builder(&format!("node-{i}"))
            .dev_certificates(&ca)
            .profile(Profile::Local);
        if let Some(first) = fabrics.first() {
            builder = builder.seed(first.local_addr());
        }
        fabrics.push(builder.start()?);
    }
    let received = Arc::new(AtomicUsize::new(0));
    for e in 0..ENDPOINTS {
        let fabric = fabrics[e % 3].clone();
        let endpoint = fabric.endpoint(&format!("ep-{e}"))?;
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(mut flow) = endpoint.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    while let Ok(Some(_)) = flow.recv().await {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
    }
    for f in &fabrics {
        for e in 0..ENDPOINTS {
            // Gossip spreads a name in well under a second; a node it missed gets it at its next
            // push-pull (every 15 s in the Local profile).
            f.wait_for(&format!("ep-{e}"), Duration::from_secs(30))
                .await?;
        }
    }
    println!("{ENDPOINTS} endpoints on 3 nodes, visible everywhere");
    let mut tasks = Vec::new();
    for e in 0..ENDPOINTS {
        let fabric = fabrics[e % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            for m in 0..MESSAGES_EACH {
                // A cheap, deterministic spread over the other endpoints.
                let target = (e + 1 + (m * 7 + e * 3) % (ENDPOINTS - 1)) % ENDPOINTS;
                let target_node = target % 3;
                if target_node == e % 3 {
                    continue; // same node: in-process flows are not in this version yet
                }
                let mut flow = fabric.dial(&format!("ep-{target}")).await?;
                flow.send(format!("ep-{e} says hi #{m}").into_bytes())
                    .await?;
                flow.finish().await?;
                sent += 1;
            }
            Ok::<usize, grinta_tokio::Error>(sent)
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    for _ in 0..500 {
        if received.load(Ordering::Relaxed) == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "sent {sent} messages between endpoints, received {}",
        received.load(Ordering::Relaxed)
    );
    assert_eq!(received.load(Ordering::Relaxed), sent);
    for f in &fabrics {
        f.shutdown().await;
    }
    Ok(())
}
