//! Two nodes on 127.0.0.1 under async-std: one serves "greeter", the other dials it.
//!
//! Run: `cargo run -p grinta-async-std --example hello`

use std::net::UdpSocket;
use std::time::Duration;

use grinta_proto::membership::Config;
use grinta_proto::node::{DEFAULT_MAX_PACKET_SIZE, NodeConfig};
use grinta_proto::tls::dev::DevCa;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    let a_addr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let b_addr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let config = |name: &str, addr, seeds| -> Result<NodeConfig, Box<dyn std::error::Error>> {
        let mut c = NodeConfig::new(name, addr, ca.issue(name)?);
        c.membership = Config::local();
        c.membership.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
        c.seeds = seeds;
        Ok(c)
    };
    let server = grinta_async_std::start(config("server", a_addr, vec![])?)?;
    let client = grinta_async_std::start(config("client", b_addr, vec![a_addr])?)?;
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
    while client.endpoints("greeter").is_empty() {
        async_std::task::sleep(Duration::from_millis(20)).await;
    }
    let mut flow = client.dial("greeter").await?;
    flow.send(b"async-std".to_vec()).await?;
    let reply = flow.recv().await?.ok_or("no reply")?;
    println!("{}", String::from_utf8_lossy(&reply));
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
