//! Two nodes on 127.0.0.1 under async-std: one serves "greeter", the other dials it.
//!
//! Run: `cargo run -p grinta-async-std --example hello`

use std::time::Duration;

use grinta_async_std::{DevCa, Fabric, Profile};

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    // Both bind 127.0.0.1 on a free port (the builder's default); the client joins through the
    // server's address.
    let server = Fabric::builder("server")
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .start()?;
    let client = Fabric::builder("client")
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .seed(server.local_addr())
        .start()?;
    let greeter = server.endpoint("greeter")?;
    async_std::task::spawn(async move {
        while let Ok(mut flow) = greeter.accept().await {
            if let Ok(Some(name)) = flow.recv().await {
                let _ = flow
                    .send(format!("hello, {}!", String::from_utf8_lossy(&name)))
                    .await;
                let _ = flow.finish().await;
            }
        }
    });
    client.wait_for("greeter", Duration::from_secs(10)).await?;
    let mut flow = client.dial("greeter").await?;
    flow.send(b"async-std".to_vec()).await?;
    let reply = flow.recv().await?.ok_or("no reply")?;
    println!("{}", String::from_utf8_lossy(&reply));
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
