//! Hello world: a server endpoint and a client that dials it.
//!
//! - `cargo run -p grinta-tokio --example hello-world` runs both roles in one process (two nodes).
//! - As two processes over loopback, like the original demo (both use certificates from `certs/`,
//!   made on first use):
//!   `cargo run -p grinta-tokio --example hello-world -- server 127.0.0.1:7700`
//!   `cargo run -p grinta-tokio --example hello-world -- client 127.0.0.1:7701 127.0.0.1:7700`

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use grinta_proto::membership::Config;
use grinta_proto::node::{DEFAULT_MAX_PACKET_SIZE, NodeConfig};
use grinta_proto::tls::TlsConfig;
use grinta_proto::tls::dev::DevCa;
use grinta_tokio::Fabric;

fn config(name: &str, bind: SocketAddr, tls: TlsConfig, seeds: Vec<SocketAddr>) -> NodeConfig {
    let mut c = NodeConfig::new(name, bind, tls);
    c.membership = Config::local();
    c.membership.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
    c.seeds = seeds;
    c
}

/// Certificates shared by the two processes: made once into `certs/`.
fn shared_tls(name: &str) -> Result<TlsConfig, Box<dyn std::error::Error>> {
    let dir = Path::new("certs");
    if !dir.join("ca.pem").exists() {
        DevCa::new()?.write_to_dir(dir, &["server", "client"])?;
    }
    Ok(TlsConfig::from_pem_files(
        dir.join("ca.pem"),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )?)
}

async fn serve(fabric: &Fabric) -> Result<(), Box<dyn std::error::Error>> {
    let hello = fabric.endpoint("hello")?;
    println!("{} serves \"hello\"", fabric.name());
    let mut flow = hello.accept().await?;
    while let Some(name) = flow.recv().await? {
        let greeting = format!("Hello, {}!", String::from_utf8_lossy(&name));
        flow.send(greeting.into_bytes()).await?;
    }
    flow.finish().await?;
    Ok(())
}

async fn greet(fabric: &Fabric) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..500 {
        if !fabric.endpoints("hello").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut flow = fabric.dial("hello").await?;
    flow.send(b"world".to_vec()).await?;
    let reply = flow.recv().await?.ok_or("no reply")?;
    println!("{}", String::from_utf8_lossy(&reply));
    flow.finish().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") => {
            let bind: SocketAddr = args.get(1).ok_or("server BIND")?.parse()?;
            let fabric =
                grinta_tokio::start(config("server", bind, shared_tls("server")?, vec![]))?;
            serve(&fabric).await?;
            fabric.shutdown().await;
        }
        Some("client") => {
            let bind: SocketAddr = args.get(1).ok_or("client BIND SEED")?.parse()?;
            let seed: SocketAddr = args.get(2).ok_or("client BIND SEED")?.parse()?;
            let fabric =
                grinta_tokio::start(config("client", bind, shared_tls("client")?, vec![seed]))?;
            greet(&fabric).await?;
            fabric.shutdown().await;
        }
        _ => {
            let ca = DevCa::new()?;
            let a = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
            let b = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
            let server = grinta_tokio::start(config("server", a, ca.issue("server")?, vec![]))?;
            let client = grinta_tokio::start(config("client", b, ca.issue("client")?, vec![a]))?;
            let s = server.clone();
            let serving = tokio::spawn(async move { serve(&s).await.map_err(|e| e.to_string()) });
            greet(&client).await?;
            serving.await??;
            client.shutdown().await;
            server.shutdown().await;
        }
    }
    Ok(())
}
