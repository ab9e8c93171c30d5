//! Requests, one round trip each: a node serves "upper", another asks it, then asks every
//! node that handles the "load" query topic.
//!
//! `cargo run -p grinta-tokio --example request-response`

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use grinta_tokio::{DevCa, Fabric, Profile, ProstCodec, QueryOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let server = Fabric::builder("server")
        .bind(any)
        .tls(ca.issue("server")?)
        .profile(Profile::Local)
        .start()?;
    let client = Fabric::builder("client")
        .bind(any)
        .tls(ca.issue("client")?)
        .profile(Profile::Local)
        .seeds([server.local_addr()])
        .start()?;

    // The server answers each request with its upper-case copy.
    let mut requests = server.endpoint("upper")?.into_requests();
    tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let reply = request.payload().to_ascii_uppercase();
            let _ = request.respond(reply).await;
        }
    });
    // Both nodes answer the "load" query with their name.
    for node in [&server, &client] {
        let mut questions = node.handle_queries("load")?;
        let name = node.name().to_owned();
        tokio::spawn(async move {
            while let Some(question) = questions.next().await {
                let _ = question.respond(format!("{name} is fine")).await;
            }
        });
    }

    client.wait_for("upper", Duration::from_secs(10)).await?;
    let reply = client.request("upper", "hello, grinta").await?;
    println!("request: {}", String::from_utf8_lossy(&reply));

    // Typed: the message and the reply through a codec.
    let codec = ProstCodec::<String>::new();
    let typed: String = client
        .request_with("upper", &"typed".to_owned(), &codec, &codec)
        .await?;
    println!("typed request: {typed}");

    // A query: every node that handles the topic answers (once the handlers are known).
    let mut answers = Vec::new();
    for _ in 0..50 {
        let mut replies = client.query("load", "how are you?".into(), QueryOptions::new())?;
        answers.clear();
        while let Some((node, reply)) = replies.next().await {
            answers.push(format!("{node}: {}", String::from_utf8_lossy(&reply)));
        }
        if answers.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answers.sort();
    for answer in &answers {
        println!("query answer from {answer}");
    }

    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
