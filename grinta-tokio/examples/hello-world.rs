//! Hello world: a server endpoint and a client that dials it.
//!
//! - `cargo run -p grinta-tokio --example hello-world` runs both roles in one process (two nodes).
//! - As two processes over loopback, like the original demo (both use certificates from `certs/`,
//!   made on first use):
//!   `cargo run -p grinta-tokio --example hello-world -- server 127.0.0.1:7700`
//!   `cargo run -p grinta-tokio --example hello-world -- client 127.0.0.1:7701 127.0.0.1:7700`

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use grinta_tokio::{DevCa, Fabric, FabricBuilder, Profile, TlsConfig};

/// A node named `name` on `bind`, joining through `seeds`, with the loopback profile.
fn node(name: &str, bind: SocketAddr, tls: TlsConfig, seeds: &[SocketAddr]) -> FabricBuilder {
    Fabric::builder(name)
        .bind(bind)
        .tls(tls)
        .profile(Profile::Local)
        .seeds(seeds.iter().copied())
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
    // The name spreads by gossip: wait until this node can resolve it.
    fabric.wait_for("hello", Duration::from_secs(10)).await?;
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
            let fabric = node("server", bind, shared_tls("server")?, &[]).start()?;
            serve(&fabric).await?;
            fabric.shutdown().await;
        }
        Some("client") => {
            let bind: SocketAddr = args.get(1).ok_or("client BIND SEED")?.parse()?;
            let seed: SocketAddr = args.get(2).ok_or("client BIND SEED")?.parse()?;
            let fabric = node("client", bind, shared_tls("client")?, &[seed]).start()?;
            greet(&fabric).await?;
            fabric.shutdown().await;
        }
        _ => {
            let ca = DevCa::new()?;
            // Port 0: each node binds a free port; the client joins through the server's.
            let any: SocketAddr = "127.0.0.1:0".parse()?;
            let server = node("server", any, ca.issue("server")?, &[]).start()?;
            let client =
                node("client", any, ca.issue("client")?, &[server.local_addr()]).start()?;
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
