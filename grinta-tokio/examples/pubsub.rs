//! Topics: three nodes subscribe to "prices" (one of them reliably), one publishes; each node
//! receives every price once, whatever the number of its subscriptions.
//!
//! `cargo run -p grinta-tokio --example pubsub`

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use grinta_tokio::{DevCa, Error, Fabric, Profile};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut nodes: Vec<Fabric> = Vec::new();
    for name in ["publisher", "desk-a", "desk-b"] {
        let mut builder = Fabric::builder(name)
            .bind(any)
            .tls(ca.issue(name)?)
            .profile(Profile::Local);
        if let Some(first) = nodes.first() {
            builder = builder.seeds([first.local_addr()]);
        }
        nodes.push(builder.start()?);
    }
    let publisher = nodes[0].clone();

    // desk-a: two lossy subscriptions (the node receives each price once and hands it to both);
    // desk-b: a reliable one, which holds the publisher back rather than miss a price.
    let mut readers = Vec::new();
    for (node, reliable) in [(&nodes[1], false), (&nodes[1], false), (&nodes[2], true)] {
        let mut prices = if reliable {
            node.subscribe_reliable("prices")?
        } else {
            node.subscribe("prices")?
        };
        let name = node.name().to_owned();
        readers.push(tokio::spawn(async move {
            let mut received = 0;
            while let Some(price) = prices.next().await {
                match price {
                    Ok(_) => received += 1,
                    Err(Error::Lagged { missed }) => println!("{name}: missed {missed}"),
                    Err(e) => return Err(e),
                }
                if received == 100 {
                    break;
                }
            }
            Ok::<_, Error>((name, received))
        }));
    }

    // Subscriptions spread by gossip: publish once the publisher knows both desks.
    while publisher.subscribers("prices").len() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..100 {
        publisher
            .publish("prices", format!("EURUSD 1.{:04}", 800 + i))
            .await?;
    }
    for reader in readers {
        let (name, received) = reader.await??;
        println!("{name}: {received} prices");
    }
    let stats = publisher.stats().topics["prices"].clone();
    println!(
        "published {}, sent {} copies (one per subscribing node)",
        stats.published, stats.sent
    );
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
