//! Real UDP sockets on 127.0.0.1 under async-std's executor.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use grinta_proto::membership::{self, Config};
use grinta_proto::node::{DEFAULT_MAX_PACKET_SIZE, NodeConfig};
use grinta_proto::tls::dev::DevCa;

fn free_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[async_std::test]
async fn three_nodes_on_async_std_exchange_messages_and_detect_a_crash() {
    let ca = DevCa::new().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut fabrics = Vec::new();
    for i in 0..3 {
        let name = format!("node-{i}");
        let mut config = NodeConfig::new(&name, addrs[i], ca.issue(&name).unwrap());
        config.membership = Config::local();
        config.membership.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
        if i > 0 {
            config.seeds = vec![addrs[0]];
        }
        fabrics.push(grinta_async_std::start(config).unwrap());
    }
    let start = Instant::now();
    while !fabrics.iter().all(|f| f.alive_members().len() == 2) {
        assert!(start.elapsed() < Duration::from_secs(20), "cluster formed");
        async_std::task::sleep(Duration::from_millis(20)).await;
    }
    let echo = fabrics[2].endpoint("echo").unwrap();
    async_std::task::spawn(async move {
        while let Ok(mut flow) = echo.accept().await {
            while let Ok(Some(m)) = flow.recv().await {
                if flow.send(m).await.is_err() {
                    break;
                }
            }
        }
    });
    while fabrics[0].endpoints("echo").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "name spread");
        async_std::task::sleep(Duration::from_millis(20)).await;
    }
    let mut flow = fabrics[0].dial("echo").await.unwrap();
    for i in 0..50u32 {
        let message = i.to_be_bytes().to_vec();
        flow.send(message.clone()).await.unwrap();
        assert_eq!(flow.recv().await.unwrap().as_deref(), Some(&message[..]));
    }
    fabrics[2].abort();
    let dead = async_std::future::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(membership::Event::MemberDead { name, .. }) =
                fabrics[0].next_member_event().await
            {
                if name == "node-2" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(dead.is_ok(), "node-0 declared the crashed node dead");
    let failed = async_std::future::timeout(Duration::from_secs(10), flow.recv())
        .await
        .expect("no hang");
    assert!(failed.is_err(), "{failed:?}");
}
