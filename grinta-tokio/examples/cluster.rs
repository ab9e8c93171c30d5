//! A 3-node cluster on 127.0.0.1 with development certificates: the nodes find each other, one
//! serves an endpoint, the others dial it and exchange messages, then that node is killed (no
//! goodbye) and the others detect it and see their flows fail. Exits 0 when everything happened as
//! expected.
//!
//! Run: `cargo run -p grinta-tokio --example cluster`

use std::time::{Duration, Instant};

use grinta_tokio::{DevCa, Fabric, MemberEvent, Profile};

async fn until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("timed out waiting for {what}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    let names = ["node-a", "node-b", "node-c"];
    let mut fabrics: Vec<Fabric> = Vec::new();
    for name in names {
        // 127.0.0.1 on a free port (the builder's default). The loopback profile probes fast, so
        // the demo shows failure detection in seconds. node-b and node-c join through node-a.
        let mut builder = Fabric::builder(name)
            .dev_certificates(&ca)
            .profile(Profile::Local);
        if let Some(first) = fabrics.first() {
            builder = builder.seed(first.local_addr());
        }
        let fabric = builder.start()?;
        println!("started {name} on {}", fabric.local_addr());
        fabrics.push(fabric);
    }

    let formed = until("the cluster to form", Duration::from_secs(20), || {
        fabrics.iter().all(|f| f.alive_members().len() == 2)
    })
    .await?;
    println!("cluster formed in {formed:?}: every node sees the other two");

    // node-c serves "greeter": it echoes every message in upper case.
    let greeter = fabrics[2].endpoint("greeter")?;
    tokio::spawn(async move {
        while let Ok(mut flow) = greeter.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(message)) = flow.recv().await {
                    let reply = String::from_utf8_lossy(&message).to_uppercase();
                    if flow.send(reply.into_bytes()).await.is_err() {
                        break;
                    }
                }
                let _ = flow.finish().await;
            });
        }
    });
    for f in &fabrics[..2] {
        f.wait_for("greeter", Duration::from_secs(10)).await?;
    }
    println!("node-a and node-b resolve \"greeter\"");

    let mut from_a = fabrics[0].dial("greeter").await?;
    from_a.send(b"hello from node-a".to_vec()).await?;
    let reply = from_a.recv().await?.ok_or("flow ended early")?;
    println!("node-a got: {}", String::from_utf8_lossy(&reply));
    let mut from_b = fabrics[1].dial("greeter").await?;
    from_b.send(b"hello from node-b".to_vec()).await?;
    let reply = from_b.recv().await?.ok_or("flow ended early")?;
    println!("node-b got: {}", String::from_utf8_lossy(&reply));

    println!("killing node-c (no goodbye)");
    let killed = Instant::now();
    fabrics[2].abort();
    let mut dead = 0;
    for f in &fabrics[..2] {
        loop {
            let event =
                tokio::time::timeout(Duration::from_secs(30), f.next_member_event()).await??;
            if let MemberEvent::MemberDead { name, .. } = event {
                if name == "node-c" {
                    println!(
                        "{} declared node-c dead after {:?}",
                        f.name(),
                        killed.elapsed()
                    );
                    dead += 1;
                    break;
                }
            }
        }
    }
    let failed = tokio::time::timeout(Duration::from_secs(10), from_b.recv()).await?;
    match failed {
        Err(e) => println!("node-b's flow to node-c failed: {e}"),
        Ok(m) => return Err(format!("flow to a dead node did not fail: {m:?}").into()),
    }
    if from_a.send(b"anyone?".to_vec()).await.is_ok() {
        return Err("sending to a dead node's flow succeeded".into());
    }
    println!("node-a's flow to node-c failed too");
    assert_eq!(dead, 2);
    fabrics[0].shutdown().await;
    fabrics[1].shutdown().await;
    println!("done");
    Ok(())
}
