//! The adapter under smol: two nodes on 127.0.0.1 find each other, serve and dial an endpoint
//! (remote and in-process), exchange typed values and shut down, all on smol's executor.

use std::time::Duration;

use futures::StreamExt;
use grinta_async_std::{DevCa, Fabric, JsonCodec, Profile};

#[test]
fn a_cluster_of_two_runs_on_smol() {
    smol::block_on(async {
        let ca = DevCa::new().expect("dev CA");
        let server = Fabric::builder("server")
            .dev_certificates(&ca)
            .profile(Profile::Local)
            .start()
            .expect("server starts");
        let client = Fabric::builder("client")
            .dev_certificates(&ca)
            .profile(Profile::Local)
            .seed(server.local_addr())
            .start()
            .expect("client starts");
        let mut squares = server.endpoint("square").expect("endpoint");
        let serving = smol::spawn(async move {
            while let Some(flow) = squares.next().await {
                let mut flow = flow.expect("accepted").typed(JsonCodec::<u64>::new());
                smol::spawn(async move {
                    while let Ok(Some(v)) = flow.recv().await {
                        flow.send(v * v).await.expect("reply");
                    }
                    let _ = flow.finish().await;
                })
                .detach();
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while client.endpoints("square").is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the name never spread"
            );
            smol::Timer::after(Duration::from_millis(20)).await;
        }
        for (who, fabric) in [("remote", &client), ("local", &server)] {
            let mut flow = fabric
                .dial("square")
                .await
                .expect("dial")
                .typed(JsonCodec::<u64>::new());
            assert_eq!(flow.is_local(), who == "local");
            for v in 0..100u64 {
                flow.send(v).await.expect("send");
                assert_eq!(flow.recv().await.expect("recv"), Some(v * v), "{who}");
            }
            flow.finish().await.expect("finish");
            assert_eq!(flow.recv().await.expect("end"), None, "{who}");
        }
        client.shutdown().await;
        server.shutdown().await;
        // The endpoint's stream ends with the shutdown, and so does the serving task.
        smol::future::or(serving, async {
            smol::Timer::after(Duration::from_secs(10)).await;
            panic!("the endpoint stream did not end at shutdown");
        })
        .await;
    });
}
