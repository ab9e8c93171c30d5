//! Real UDP sockets on 127.0.0.1, three nodes in one process, with bounded waits.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use grinta_proto::membership::{self, Config};
use grinta_proto::node::{DEFAULT_MAX_PACKET_SIZE, NodeConfig};
use grinta_proto::tls::dev::DevCa;
use grinta_tokio::{Error, Fabric};

fn free_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn cluster(n: usize) -> Vec<Fabric> {
    let ca = DevCa::new().unwrap();
    let addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
    let mut fabrics = Vec::new();
    for i in 0..n {
        let name = format!("node-{i}");
        let mut config = NodeConfig::new(&name, addrs[i], ca.issue(&name).unwrap());
        config.membership = Config::local();
        config.membership.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
        if i > 0 {
            config.seeds = vec![addrs[0]];
        }
        fabrics.push(grinta_tokio::start(config).unwrap());
    }
    let formed = tokio::time::timeout(Duration::from_secs(20), async {
        while !fabrics.iter().all(|f| f.alive_members().len() == n - 1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(formed.is_ok(), "cluster of {n} formed");
    fabrics
}

async fn member_event(
    f: &Fabric,
    mut want: impl FnMut(&membership::Event) -> bool,
) -> membership::Event {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = f.next_member_event().await.expect("fabric running");
            if want(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event within 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exchange_messages_and_detect_a_crash() {
    let fabrics = cluster(3).await;
    let echo = fabrics[2].endpoint("echo").unwrap();
    tokio::spawn(async move {
        while let Ok(mut flow) = echo.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(m)) = flow.recv().await {
                    if flow.send(m).await.is_err() {
                        break;
                    }
                }
                let _ = flow.finish().await;
            });
        }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while fabrics[0].endpoints("echo").is_empty() || fabrics[1].endpoints("echo").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("name spread");

    // 200 messages of up to 64 KiB each way, in order.
    let mut flow = fabrics[0].dial("echo").await.unwrap();
    for i in 0..200u32 {
        let message = vec![(i % 251) as u8; (i as usize * 331) % 65_536];
        flow.send(message.clone()).await.unwrap();
        assert_eq!(flow.recv().await.unwrap().as_deref(), Some(&message[..]));
    }
    flow.finish().await.unwrap();
    assert_eq!(
        flow.recv().await.unwrap(),
        None,
        "the echo side finished after us"
    );

    let mut idle = fabrics[1].dial("echo").await.unwrap();
    fabrics[2].abort();
    for f in &fabrics[..2] {
        member_event(
            f,
            |e| matches!(e, membership::Event::MemberDead { name, .. } if name == "node-2"),
        )
        .await;
    }
    let failed = tokio::time::timeout(Duration::from_secs(10), idle.recv())
        .await
        .expect("no hang");
    assert!(matches!(failed, Err(Error::Flow(_))), "{failed:?}");
    let again = fabrics[0].dial("echo").await;
    assert!(again.is_err(), "the name left with its owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_shows_as_left_and_ends_flows() {
    let fabrics = cluster(3).await;
    let ep = fabrics[1].endpoint("svc").unwrap();
    let server = tokio::spawn(async move { ep.accept().await.map(|_| ()) });
    tokio::time::timeout(Duration::from_secs(10), async {
        while fabrics[0].endpoints("svc").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut flow = fabrics[0].dial("svc").await.unwrap();
    let _ = server.await;
    fabrics[1].shutdown().await;
    for f in [&fabrics[0], &fabrics[2]] {
        member_event(
            f,
            |e| matches!(e, membership::Event::MemberLeft { name, .. } if name == "node-1"),
        )
        .await;
        assert!(
            f.members()
                .iter()
                .all(|m| m.name != "node-1" || m.state == membership::MemberState::Left)
        );
    }
    let r = tokio::time::timeout(Duration::from_secs(10), flow.recv())
        .await
        .expect("no hang");
    assert!(r.is_err(), "the flow to the node that left ended: {r:?}");
    assert!(matches!(fabrics[1].dial("svc").await, Err(Error::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reached_again() {
    let ca = DevCa::new().unwrap();
    let addrs: Vec<SocketAddr> = (0..2).map(|_| free_addr()).collect();
    let make = |i: usize| {
        let name = format!("node-{i}");
        let mut config = NodeConfig::new(&name, addrs[i], ca.issue(&name).unwrap());
        config.membership = Config::local();
        config.membership.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
        config.seeds = vec![addrs[1 - i]];
        config
    };
    let stable = grinta_tokio::start(make(0)).unwrap();
    let first = grinta_tokio::start(make(1)).unwrap();
    let _ep = first.endpoint("svc").unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while stable.endpoints("svc").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("name spread");
    first.abort();
    member_event(
        &stable,
        |e| matches!(e, membership::Event::MemberDead { name, .. } if name == "node-1"),
    )
    .await;
    // The same node comes back at the same address, as a new process would.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = grinta_tokio::start(make(1)).unwrap();
    let ep = second.endpoint("svc").unwrap();
    tokio::spawn(async move {
        while let Ok(mut flow) = ep.accept().await {
            while let Ok(Some(m)) = flow.recv().await {
                let _ = flow.send(m).await;
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while !(stable.alive_members() == ["node-1"] && stable.endpoints("svc") == ["svc"]) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the restarted node is alive again with its endpoint");
    let mut flow = stable.dial("svc").await.unwrap();
    flow.send(b"again".to_vec()).await.unwrap();
    assert_eq!(flow.recv().await.unwrap().as_deref(), Some(&b"again"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_flows_carry_values_and_report_type_mismatches() {
    use grinta_proto::codec::ProstCodec;
    use grinta_proto::wire::Ack;
    let fabrics = cluster(2).await;
    let ep = fabrics[1].endpoint("acks").unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut seen_tx = Some(seen_tx);
        while let Ok(flow) = ep.accept().await {
            let mut acks = flow.typed(ProstCodec::<Ack>::default());
            loop {
                match acks.recv().await {
                    Ok(Some(ack)) => acks
                        .send(Ack {
                            seq_no: ack.seq_no + 1,
                        })
                        .await
                        .unwrap(),
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(tx) = seen_tx.take() {
                            let _ = tx.send(e.to_string());
                        }
                        break;
                    }
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while fabrics[0].endpoints("acks").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut acks = fabrics[0]
        .dial("acks")
        .await
        .unwrap()
        .typed(ProstCodec::<Ack>::default());
    for i in 0..10 {
        acks.send(Ack { seq_no: i }).await.unwrap();
        assert_eq!(acks.recv().await.unwrap(), Some(Ack { seq_no: i + 1 }));
    }
    // Bytes that are not an Ack: the receiving typed flow reports a codec error naming the type.
    let mut raw = acks.into_inner();
    raw.send(vec![0xffu8, 0xff, 0xff]).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), seen_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(
        seen.starts_with("cannot decode a ") && seen.contains("Ack"),
        "{seen}"
    );
    // The server dropped its end without finishing: this side sees the flow end, not a hang.
    let end = tokio::time::timeout(Duration::from_secs(10), raw.recv())
        .await
        .expect("no hang");
    assert!(end.is_err(), "{end:?}");
}
