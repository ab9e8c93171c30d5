//! Real-socket scenarios written once for any [`Runtime`]: `tests/real_sockets.rs` runs each of
//! them under tokio and under async-std. Nodes bind 127.0.0.1 only, and every wait is bounded.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{Either, select};
use grinta_proto::fabric::{Error, Fabric, Profile, Runtime};
use grinta_proto::membership::{self, MemberState};
use grinta_proto::tls::dev::DevCa;

/// `f`, or `None` if it takes longer than `limit`.
pub async fn within<R: Runtime, F: Future>(limit: Duration, f: F) -> Option<F::Output> {
    let sleep = pin!(R::sleep_until(R::now() + limit));
    match select(pin!(f), sleep).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}

/// Sleeps for `d` on the runtime's timer.
pub async fn sleep<R: Runtime>(d: Duration) {
    R::sleep_until(R::now() + d).await;
}

/// Runs `f` in the background; the receiver yields its output.
pub fn spawn<R: Runtime, T: Send + 'static>(
    f: impl Future<Output = T> + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    R::spawn(Box::pin(async move {
        let _ = tx.send(f.await);
    }))
    .expect("the runtime runs the task");
    rx
}

/// Polls `ok` every 10 ms until it holds; panics after `limit` naming `what`.
pub async fn until<R: Runtime>(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let waited = within::<R, _>(limit, async {
        while !ok() {
            sleep::<R>(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_some(), "{what} within {limit:?}");
}

/// The next membership event of `fabric` that `want` accepts, within 30 s.
pub async fn member_event<R: Runtime>(
    fabric: &Fabric<R>,
    mut want: impl FnMut(&membership::Event) -> bool,
) -> membership::Event {
    within::<R, _>(Duration::from_secs(30), async {
        loop {
            let e = fabric.next_member_event().await.expect("fabric running");
            if want(&e) {
                return e;
            }
        }
    })
    .await
    .expect("membership event within 30 s")
}

/// `n` nodes `node-0..` on 127.0.0.1 (free ports, the Local profile) joined through `node-0`.
pub async fn cluster<R: Runtime>(ca: &DevCa, n: usize) -> Vec<Fabric<R>> {
    let mut fabrics: Vec<Fabric<R>> = Vec::new();
    for i in 0..n {
        let mut b = Fabric::<R>::builder(&format!("node-{i}"))
            .dev_certificates(ca)
            .profile(Profile::Local);
        if let Some(first) = fabrics.first() {
            b = b.seed(first.local_addr());
        }
        fabrics.push(b.start().expect("node starts"));
    }
    until::<R>(Duration::from_secs(20), "cluster formed", || {
        fabrics.iter().all(|f| f.alive_members().len() == n - 1)
    })
    .await;
    fabrics
}

/// Serves an echo endpoint: every flow gets its messages back, then the end.
fn serve_echo<R: Runtime>(endpoint: grinta_proto::fabric::Endpoint<R>) {
    drop(spawn::<R, _>(async move {
        while let Ok(mut flow) = endpoint.accept().await {
            drop(spawn::<R, _>(async move {
                while let Ok(Some(m)) = flow.recv().await {
                    if flow.send(m).await.is_err() {
                        return;
                    }
                }
                let _ = flow.finish().await;
            }));
        }
    }));
}

/// Three nodes: 200 echoed messages of up to 64 KiB in order; then one node crashes, the others
/// declare it dead, an open flow to it fails (no hang) and its name is gone.
pub async fn three_nodes_exchange_messages_and_detect_a_crash<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    serve_echo(fabrics[2].endpoint("echo").expect("endpoint"));
    until::<R>(Duration::from_secs(10), "name spread", || {
        fabrics[..2].iter().all(|f| !f.endpoints("echo").is_empty())
    })
    .await;

    let mut flow = fabrics[0].dial("echo").await.expect("dial");
    for i in 0..200u32 {
        let message = vec![(i % 251) as u8; (i as usize * 331) % 65_536];
        flow.send(message.clone()).await.expect("send");
        assert_eq!(
            flow.recv().await.expect("recv").as_deref(),
            Some(&message[..])
        );
    }
    flow.finish().await.expect("finish");
    assert_eq!(flow.recv().await.expect("end"), None);

    let mut idle = fabrics[1].dial("echo").await.expect("dial");
    fabrics[2].abort();
    for f in &fabrics[..2] {
        member_event(
            f,
            |e| matches!(e, membership::Event::MemberDead { name, .. } if name == "node-2"),
        )
        .await;
    }
    let failed = within::<R, _>(Duration::from_secs(10), idle.recv())
        .await
        .expect("no hang");
    assert!(matches!(failed, Err(Error::Flow(_))), "{failed:?}");
    assert!(
        fabrics[0].dial("echo").await.is_err(),
        "the name left with its owner"
    );
}

/// A node that shuts down is seen as Left (not Dead) by the others, and flows to it end.
pub async fn graceful_shutdown_shows_as_left_and_ends_flows<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    let endpoint = fabrics[1].endpoint("svc").expect("endpoint");
    let accepted = spawn::<R, _>(async move {
        let flow = endpoint.accept().await;
        (flow, endpoint)
    });
    until::<R>(Duration::from_secs(10), "name spread", || {
        !fabrics[0].endpoints("svc").is_empty()
    })
    .await;
    let mut flow = fabrics[0].dial("svc").await.expect("dial");
    let _server_side = accepted.await.expect("accept task");
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
                .all(|m| m.name != "node-1" || m.state == MemberState::Left)
        );
    }
    let r = within::<R, _>(Duration::from_secs(10), flow.recv())
        .await
        .expect("no hang");
    assert!(r.is_err(), "the flow to the node that left ended: {r:?}");
    assert!(matches!(fabrics[1].dial("svc").await, Err(Error::Shutdown)));
}

/// A node that crashed and restarts at the same address (as a new process would) refutes its
/// death, and flows reach it again.
pub async fn a_restarted_peer_is_reached_again<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let (stable, first) = (&fabrics[0], &fabrics[1]);
    let addr = first.local_addr();
    let _endpoint = first.endpoint("svc").expect("endpoint");
    until::<R>(Duration::from_secs(20), "name spread", || {
        !stable.endpoints("svc").is_empty()
    })
    .await;
    first.abort();
    member_event(
        stable,
        |e| matches!(e, membership::Event::MemberDead { name, .. } if name == "node-1"),
    )
    .await;
    sleep::<R>(Duration::from_millis(200)).await;
    let second = Fabric::<R>::builder("node-1")
        .bind(addr)
        .seed(stable.local_addr())
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .start()
        .expect("restart at the same address");
    serve_echo(second.endpoint("svc").expect("endpoint"));
    until::<R>(
        Duration::from_secs(30),
        "the restarted node alive again with its endpoint",
        || {
            stable
                .alive_members()
                .iter()
                .map(|m| m.name.as_str())
                .eq(["node-1"])
                && stable.endpoints("svc") == ["svc"]
        },
    )
    .await;
    let mut flow = stable.dial("svc").await.expect("dial");
    flow.send(&b"again"[..]).await.expect("send");
    assert_eq!(
        flow.recv().await.expect("recv").as_deref(),
        Some(&b"again"[..])
    );
}

/// Accepts every flow of `endpoint` and reports, for each, how it ended (`Ok(())` at its end,
/// `Err` on a reset or failure); the task ends with the endpoint.
fn record_endings<R: Runtime>(
    endpoint: grinta_proto::fabric::Endpoint<R>,
) -> futures::channel::mpsc::UnboundedReceiver<Result<(), Error>> {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    drop(spawn::<R, _>(async move {
        while let Ok(mut flow) = endpoint.accept().await {
            let tx = tx.clone();
            drop(spawn::<R, _>(async move {
                let end = loop {
                    match flow.recv().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                let _ = tx.unbounded_send(end);
            }));
        }
    }));
    rx
}

/// 99 dials polled once and dropped (a `dial` inside a timeout or `select!` that lost) leave
/// nothing: every flow the acceptor saw ends, neither node keeps a flow or a dial entry.
pub async fn dropped_dials_leave_nothing_behind<R: Runtime>() {
    use futures::{FutureExt, StreamExt};
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let mut endings = record_endings(fabrics[1].endpoint("svc").expect("endpoint"));
    until::<R>(Duration::from_secs(10), "name spread", || {
        !fabrics[0].endpoints("svc").is_empty()
    })
    .await;
    for _ in 0..99 {
        // One poll, then dropped: the dial is under way when its future goes (or failed at
        // once, if the owner is suspected at that moment on a loaded machine).
        drop(fabrics[0].dial("svc").now_or_never());
    }
    // Some got far enough to be accepted: each of those ends.
    sleep::<R>(Duration::from_millis(300)).await;
    let mut ended = 0;
    while let Ok(end) = endings.try_recv() {
        assert!(end.is_err(), "a cancelled dial is reset, not finished");
        ended += 1;
    }
    until::<R>(
        Duration::from_secs(10),
        "no flow left on either node",
        || {
            fabrics
                .iter()
                .all(|f| f.stats().open_flows == 0 && f.stats().pending_dials == 0)
        },
    )
    .await;
    // Accepted flows that ended after the first look.
    while let Some(Some(end)) = endings.next().now_or_never() {
        assert!(end.is_err());
        ended += 1;
    }
    assert!(ended <= 99);
    // And the endpoint still serves.
    let mut flow = fabrics[0]
        .dial("svc")
        .await
        .expect("dial after the cancelled ones");
    flow.finish().await.expect("finish");
    let end = within::<R, _>(Duration::from_secs(5), endings.next())
        .await
        .expect("the new flow ends");
    assert!(matches!(end, Some(Ok(()))), "{end:?}");
}

/// 1,000 concurrent dials from another node to one endpoint whose task accepts in a loop all
/// succeed with the default limits.
pub async fn a_burst_of_a_thousand_dials_is_accepted<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let endings = record_endings(fabrics[1].endpoint("svc").expect("endpoint"));
    until::<R>(Duration::from_secs(10), "name spread", || {
        !fabrics[0].endpoints("svc").is_empty()
    })
    .await;
    let dials = (0..1_000).map(|_| fabrics[0].dial("svc"));
    let flows = within::<R, _>(Duration::from_secs(30), futures::future::join_all(dials))
        .await
        .expect("every dial answered");
    let failed: Vec<_> = flows.iter().filter_map(|f| f.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 1000 failed: {:?}",
        failed.len(),
        failed.first()
    );
    drop(flows);
    drop(endings);
}

/// Dropping every handle of a node without `shutdown` stops it: its port can be bound again and
/// the cluster declares it dead.
pub async fn dropping_every_handle_stops_the_node<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let mut fabrics = cluster::<R>(&ca, 2).await;
    let gone = fabrics.pop().expect("two nodes");
    let addr = gone.local_addr();
    let endpoint = gone.endpoint("svc").expect("endpoint");
    drop(gone);
    drop(endpoint);
    until::<R>(Duration::from_secs(5), "the port is free again", || {
        std::net::UdpSocket::bind(addr).is_ok()
    })
    .await;
    member_event(
        &fabrics[0],
        |e| matches!(e, membership::Event::MemberDead { name, .. } if name == "node-1"),
    )
    .await;
}

/// A server that shuts down while writing a 200-message reply delivers all of it: shutdown
/// refuses new flows and withdraws the name at once, but lets open flows finish.
pub async fn shutdown_lets_open_flows_finish<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let server = fabrics[1].clone();
    let endpoint = server.endpoint("svc").expect("endpoint");
    let served = spawn::<R, _>(async move {
        let mut flow = endpoint.accept().await.expect("accept");
        let request = flow.recv().await.expect("request");
        assert_eq!(request.as_deref(), Some(&b"go"[..]));
        let writer = spawn::<R, _>(async move {
            for i in 0..200u32 {
                flow.send(i.to_be_bytes().to_vec()).await.expect("send");
            }
            flow.finish().await.expect("finish");
        });
        // Shut down while the reply is being written.
        server.shutdown().await;
        writer.await.expect("writer");
    });
    until::<R>(Duration::from_secs(10), "name spread", || {
        !fabrics[0].endpoints("svc").is_empty()
    })
    .await;
    let mut flow = fabrics[0].dial("svc").await.expect("dial");
    flow.send(&b"go"[..]).await.expect("send");
    for i in 0..200u32 {
        let m = within::<R, _>(Duration::from_secs(10), flow.recv())
            .await
            .expect("no hang")
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(m.as_deref(), Some(&i.to_be_bytes()[..]));
    }
    assert_eq!(flow.recv().await.expect("the end"), None);
    drop(flow);
    within::<R, _>(Duration::from_secs(20), served)
        .await
        .expect("shutdown completes")
        .expect("server task");
    assert!(matches!(fabrics[1].dial("svc").await, Err(Error::Shutdown)));
    member_event(
        &fabrics[0],
        |e| matches!(e, membership::Event::MemberLeft { name, .. } if name == "node-1"),
    )
    .await;
}

/// Two handles of one node both see every member event: one reading takes nothing from the
/// other.
pub async fn every_handle_sees_every_member_event<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    let other = fabrics[0].clone();
    let joined = |e: &membership::Event| matches!(e, membership::Event::MemberJoined(_));
    let mut seen = Vec::new();
    for f in [&fabrics[0], &other] {
        let mut names = Vec::new();
        for _ in 0..2 {
            if let membership::Event::MemberJoined(m) = member_event(f, joined).await {
                names.push(m.name);
            }
        }
        names.sort();
        seen.push(names);
    }
    assert_eq!(seen[0], ["node-1", "node-2"]);
    assert_eq!(seen[0], seen[1]);
}

/// An endpoint is a `Stream` of incoming flows, from this node and from others; `close`
/// withdraws its name everywhere and ends what waits in its backlog; after a shutdown the
/// stream ends.
pub async fn an_endpoint_is_a_stream_of_flows_until_closed<R: Runtime>() {
    use futures::StreamExt;
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let mut endpoint = fabrics[1].endpoint("svc").expect("endpoint");
    until::<R>(Duration::from_secs(10), "name spread", || {
        !fabrics[0].endpoints("svc").is_empty()
    })
    .await;
    let mut remote = fabrics[0].dial("svc").await.expect("remote dial");
    let mut local = fabrics[1].dial("svc").await.expect("local dial");
    for _ in 0..2 {
        let mut flow = within::<R, _>(Duration::from_secs(10), endpoint.next())
            .await
            .expect("a flow comes")
            .expect("the stream goes on")
            .expect("accepted");
        drop(spawn::<R, _>(async move {
            while let Ok(Some(m)) = flow.recv().await {
                let _ = flow.send(m).await;
            }
            let _ = flow.finish().await;
        }));
    }
    for flow in [&mut remote, &mut local] {
        flow.send("ping").await.expect("send");
        let echo = flow.recv().await.expect("recv");
        assert_eq!(echo.as_deref(), Some(&b"ping"[..]));
    }
    // A dial left waiting in the backlog, then `close`: it is reset, and the name is withdrawn.
    let mut waiting = fabrics[0].dial("svc").await.expect("queued dial");
    endpoint.close();
    let err = within::<R, _>(Duration::from_secs(10), waiting.recv())
        .await
        .expect("the waiting flow ends")
        .expect_err("reset");
    assert_eq!(
        err.reset_code(),
        Some(grinta_proto::flow::ResetCode::EndpointClosed),
        "{err}"
    );
    until::<R>(Duration::from_secs(10), "name withdrawn", || {
        fabrics[0].endpoints("svc").is_empty()
    })
    .await;
    // After a shutdown, an endpoint's stream ends without an error.
    let mut again = fabrics[1].endpoint("again").expect("endpoint");
    fabrics[1].shutdown().await;
    let end = within::<R, _>(Duration::from_secs(10), again.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "{end:?}");
}

/// `wait_for` returns once a name registered elsewhere has spread (no polling), at once for a
/// name already resolvable (a local one included), and with `NoSuchEndpoint` when nobody serves
/// the name within the timeout; after a shutdown it ends with `Shutdown`.
pub async fn wait_for_returns_when_a_name_spreads<R: Runtime>() {
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let (client, server) = (fabrics[0].clone(), fabrics[1].clone());
    let waiting = spawn::<R, _>({
        let client = client.clone();
        async move {
            let started = std::time::Instant::now();
            let result = client.wait_for("late", Duration::from_secs(20)).await;
            (result, started.elapsed())
        }
    });
    sleep::<R>(Duration::from_millis(300)).await;
    let endpoint = server.endpoint("late").expect("endpoint");
    serve_echo(endpoint);
    let (result, waited) = within::<R, _>(Duration::from_secs(20), waiting)
        .await
        .expect("no hang")
        .expect("the waiting task ran");
    result.expect("the name spread");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    // Resolvable now: a dial works, and waiting again returns at once.
    let mut flow = client.dial("late").await.expect("dial after wait_for");
    flow.send(b"hi".to_vec()).await.expect("send");
    assert_eq!(
        flow.recv().await.expect("echo").as_deref(),
        Some(&b"hi"[..])
    );
    within::<R, _>(
        Duration::from_millis(100),
        client.wait_for("late", Duration::ZERO),
    )
    .await
    .expect("at once")
    .expect("resolvable");
    let _local = client.endpoint("mine").expect("endpoint");
    within::<R, _>(
        Duration::from_millis(100),
        client.wait_for("mine", Duration::from_secs(5)),
    )
    .await
    .expect("at once")
    .expect("a local endpoint is resolvable");
    // Nobody serves it: the timeout ends the wait with a typed error.
    let err = client
        .wait_for("nobody", Duration::from_millis(300))
        .await
        .expect_err("no owner");
    assert!(err.is_no_such_endpoint(), "{err:?}");
    assert!(client.wait_for("bad name", Duration::ZERO).await.is_err());
    client.shutdown().await;
    let err = client
        .wait_for("late", Duration::from_secs(1))
        .await
        .expect_err("down");
    assert!(err.is_shutdown(), "{err:?}");
}

/// Tags given at start and changed later are seen on every member, restrict group dials, and
/// refuse keys and values beyond the limits with a typed error.
pub async fn tags_are_seen_everywhere_and_restrict_dials<R: Runtime>() {
    use grinta_proto::tags::TagFilter;
    let ca = DevCa::new().expect("dev CA");
    let first = Fabric::<R>::builder("node-0")
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .tag("zone", "eu")
        .start()
        .expect("starts");
    let second = Fabric::<R>::builder("node-1")
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .seed(first.local_addr())
        .tag("zone", "us")
        .start()
        .expect("starts");
    assert_eq!(first.tags().get("zone"), Some("eu"));
    let zone_of = |f: &Fabric<R>, name: &str| {
        f.members()
            .into_iter()
            .find(|m| m.name == name)
            .and_then(|m| m.tags().get("zone").map(str::to_owned))
    };
    until::<R>(Duration::from_secs(20), "tags seen", || {
        zone_of(&first, "node-1").as_deref() == Some("us")
            && zone_of(&second, "node-0").as_deref() == Some("eu")
    })
    .await;
    // Both serve one group; a dial restricted to a zone reaches that zone's owner.
    serve_echo(first.group_endpoint("workers").expect("endpoint"));
    serve_echo(second.group_endpoint("workers").expect("endpoint"));
    let us = TagFilter::new().eq("zone", "us");
    let eu = TagFilter::new().eq("zone", "eu");
    // Each node serves the group itself; the other's claim arrives by gossip.
    let started = std::time::Instant::now();
    loop {
        match (
            first.dial_where("workers", &us).await,
            second.dial_where("workers", &eu).await,
        ) {
            (Ok(_), Ok(_)) => break,
            (a, b) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the group's owners did not spread: {:?} {:?}",
                    a.err(),
                    b.err()
                );
                sleep::<R>(Duration::from_millis(20)).await;
            }
        }
    }
    for _ in 0..5 {
        // node-0 is in the eu zone itself: an unrestricted dial would pick it (local first).
        let flow = first.dial_where("workers", &us).await.expect("dial us");
        assert!(!flow.is_local(), "reached node-1 over QUIC");
        let flow = first.dial_where("workers", &eu).await.expect("dial eu");
        assert!(flow.is_local(), "node-0 itself");
        let flow = second.dial_where("workers", &eu).await.expect("dial eu");
        assert!(!flow.is_local(), "reached node-0 over QUIC");
    }
    let err = first
        .dial_where("workers", &TagFilter::new().eq("zone", "ap"))
        .await
        .expect_err("no owner in that zone");
    assert!(err.is_no_such_endpoint(), "{err:?}");
    // A change spreads; a removal too.
    second.set_tag("zone", "ap").expect("set");
    second.set_tag("role", "worker").expect("set");
    until::<R>(Duration::from_secs(20), "change seen", || {
        zone_of(&first, "node-1").as_deref() == Some("ap")
    })
    .await;
    second.remove_tag("role").expect("remove");
    assert_eq!(second.tags().get("role"), None);
    // Limits are typed errors.
    assert!(matches!(
        second.set_tag("bad key", "x"),
        Err(Error::Tag(grinta_proto::tags::TagError::InvalidKey { .. }))
    ));
    assert!(matches!(
        second.set_tag("k", &"v".repeat(300)),
        Err(Error::Tag(
            grinta_proto::tags::TagError::ValueTooLong { .. }
        ))
    ));
    let mut too_many = Ok(());
    for i in 0..40 {
        too_many = too_many.and(second.set_tag(&format!("key-{i:02}"), "vvvvvvvvvvvvvvvvvvvv"));
    }
    assert!(matches!(too_many, Err(Error::Tag(_))), "{too_many:?}");
    assert!(matches!(
        Fabric::<R>::builder("node-2")
            .dev_certificates(&ca)
            .tag("", "x")
            .start(),
        Err(Error::Tag(_))
    ));
    first.shutdown().await;
    second.shutdown().await;
}

/// The next item of `stream` within 30 s.
async fn next_within<R: Runtime, S: futures::Stream + Unpin>(stream: &mut S) -> S::Item {
    use futures::StreamExt;
    within::<R, _>(Duration::from_secs(30), stream.next())
        .await
        .expect("an item within 30 s")
        .expect("the stream goes on")
}

/// Name watches start with the current state and report owners added and removed; member
/// watches each see every event; monitors complete with why a node or an endpoint went away
/// (withdrawn, failed, left, never known) and at shutdown; every wait is bounded.
pub async fn watches_and_monitors_follow_the_cluster<R: Runtime>() {
    use grinta_proto::fabric::{DownReason, NameEvent};
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    let watcher = fabrics[0].clone();
    let mut names = watcher.watch("svc.");
    let mut members = watcher.watch_members();
    let mut members_too = watcher.watch_members();

    let exclusive = fabrics[1].endpoint("svc.a").expect("endpoint");
    let _group_1 = fabrics[1].group_endpoint("svc.g").expect("endpoint");
    let _group_2 = fabrics[2].group_endpoint("svc.g").expect("endpoint");
    let _other = fabrics[1].endpoint("other").expect("endpoint");
    // Five events: each name added, then its owners; "other" is outside the prefix.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.push(next_within::<R, _>(&mut names).await);
    }
    for owner in ["node-1", "node-2"] {
        assert!(
            seen.contains(&NameEvent::OwnerAdded {
                name: "svc.g".into(),
                owner: owner.into()
            }),
            "{seen:?}"
        );
    }
    let added_at = |e: NameEvent| seen.iter().position(|s| *s == e).expect("reported");
    assert!(
        added_at(NameEvent::NameAdded {
            name: "svc.a".into()
        }) < added_at(NameEvent::OwnerAdded {
            name: "svc.a".into(),
            owner: "node-1".into()
        })
    );
    assert_eq!(names.names().len(), 2, "{:?}", names.names());

    // A new watch starts with the current state, in order.
    let mut late = watcher.watch("svc.");
    let mut current = Vec::new();
    for _ in 0..5 {
        current.push(next_within::<R, _>(&mut late).await);
    }
    assert_eq!(
        current,
        vec![
            NameEvent::NameAdded {
                name: "svc.a".into()
            },
            NameEvent::OwnerAdded {
                name: "svc.a".into(),
                owner: "node-1".into()
            },
            NameEvent::NameAdded {
                name: "svc.g".into()
            },
            NameEvent::OwnerAdded {
                name: "svc.g".into(),
                owner: "node-1".into()
            },
            NameEvent::OwnerAdded {
                name: "svc.g".into(),
                owner: "node-2".into()
            },
        ]
    );

    // Nothing to monitor: completes at once.
    let at_once = Duration::from_millis(100);
    for reason in [
        within::<R, _>(at_once, watcher.monitor_endpoint("svc.none")).await,
        within::<R, _>(at_once, watcher.monitor_node("ghost")).await,
    ] {
        assert_eq!(reason, Some(DownReason::NotFound));
    }
    let endpoint_a = spawn::<R, _>(watcher.monitor_endpoint("svc.a"));
    let endpoint_g = spawn::<R, _>(watcher.monitor_endpoint("svc.g"));
    let node_1 = spawn::<R, _>(watcher.monitor_node("node-1"));
    let node_2 = spawn::<R, _>(watcher.monitor_node("node-2"));
    let own = spawn::<R, _>(watcher.monitor_node("node-0"));
    let from_node_1 = spawn::<R, _>(fabrics[1].monitor_endpoint("svc.g"));

    // Withdrawn.
    exclusive.close();
    assert_eq!(
        within::<R, _>(Duration::from_secs(30), endpoint_a).await,
        Some(Ok(DownReason::Withdrawn))
    );
    let mut gone = Vec::new();
    while gone.len() < 2 {
        gone.push(next_within::<R, _>(&mut names).await);
    }
    assert_eq!(
        gone,
        vec![
            NameEvent::OwnerRemoved {
                name: "svc.a".into(),
                owner: "node-1".into()
            },
            NameEvent::NameGone {
                name: "svc.a".into()
            },
        ]
    );

    // Failed: the group keeps its other owner.
    fabrics[2].abort();
    assert_eq!(
        within::<R, _>(Duration::from_secs(30), node_2).await,
        Some(Ok(DownReason::Failed))
    );
    assert_eq!(
        next_within::<R, _>(&mut names).await,
        NameEvent::OwnerRemoved {
            name: "svc.g".into(),
            owner: "node-2".into()
        }
    );
    // The member watches saw it, each of them.
    for watch in [&mut members, &mut members_too] {
        loop {
            let event = next_within::<R, _>(watch).await.expect("not lagged");
            if matches!(&event, membership::Event::MemberDead { name, .. } if name == "node-2") {
                break;
            }
        }
    }

    // Left: the group's last owner goes with its node.
    fabrics[1].shutdown().await;
    assert_eq!(
        within::<R, _>(Duration::from_secs(30), node_1).await,
        Some(Ok(DownReason::Left))
    );
    // The endpoint goes with it: a shutting-down node withdraws its names as it drains, then
    // leaves, and the two travel in different gossip items, so the watcher sees whichever
    // reaches it first (the node monitor above says Left either way).
    let endpoint_gone = within::<R, _>(Duration::from_secs(30), endpoint_g).await;
    assert!(
        matches!(
            endpoint_gone,
            Some(Ok(DownReason::Left | DownReason::Withdrawn))
        ),
        "{endpoint_gone:?}"
    );
    // On the node that shut down, its own claim was withdrawn as it drained (with node-2's
    // failure seen in the same look, or not yet), or it was down before it looked: it completes.
    let own_view = within::<R, _>(Duration::from_secs(30), from_node_1).await;
    assert!(
        matches!(
            own_view,
            Some(Ok(DownReason::Withdrawn
                | DownReason::Shutdown
                | DownReason::Failed))
        ),
        "{own_view:?}"
    );
    assert_eq!(
        next_within::<R, _>(&mut names).await,
        NameEvent::OwnerRemoved {
            name: "svc.g".into(),
            owner: "node-1".into()
        }
    );
    assert_eq!(
        next_within::<R, _>(&mut names).await,
        NameEvent::NameGone {
            name: "svc.g".into()
        }
    );
    // Already gone: at once.
    assert_eq!(
        within::<R, _>(at_once, watcher.monitor_node("node-1")).await,
        Some(DownReason::Left)
    );

    // This node shuts down: watches end, monitors say so.
    watcher.shutdown().await;
    assert_eq!(
        within::<R, _>(Duration::from_secs(5), own).await,
        Some(Ok(DownReason::Shutdown))
    );
    use futures::StreamExt;
    assert_eq!(
        within::<R, _>(Duration::from_secs(5), names.next()).await,
        Some(None)
    );
    assert!(
        within::<R, _>(Duration::from_secs(5), async {
            while let Some(event) = members.next().await {
                event.expect("not lagged");
            }
        })
        .await
        .is_some(),
        "the member watch ends"
    );
}

/// Answers every question on `topic` with `"<node>:<payload>"`, in a task of its own.
fn answer_queries<R: Runtime>(fabric: &Fabric<R>, topic: &str) {
    use futures::StreamExt;
    let mut questions = fabric.handle_queries(topic).expect("handler");
    let name = fabric.name().to_owned();
    drop(spawn::<R, _>(async move {
        while let Some(query) = questions.next().await {
            let reply = format!("{name}:{}", String::from_utf8_lossy(query.payload()));
            let _ = query.respond(reply).await;
        }
    }));
}

/// Queries reach every live handler of a topic that matches the options (node names, tags),
/// end as soon as the last has answered, report who did not answer, stop at their timeout, and
/// hold under a burst; topics and reserved names are checked.
pub async fn queries_reach_every_matching_handler<R: Runtime>() {
    use futures::StreamExt;
    use grinta_proto::fabric::QueryOptions;
    use grinta_proto::tags::TagFilter;
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    fabrics[1].set_tag("zone", "a").expect("tag");
    for f in &fabrics {
        answer_queries(f, "load");
    }
    let origin = fabrics[0].clone();
    let asked_by = |from: &Fabric<R>, topic: &str| {
        from.query(topic, bytes::Bytes::new(), QueryOptions::new())
            .expect("query")
            .asked()
    };
    let asked = |topic: &str| asked_by(&origin, topic);
    until::<R>(Duration::from_secs(20), "handlers and tags known", || {
        fabrics.iter().all(|f| asked_by(f, "load") == 3)
            && origin
                .members()
                .iter()
                .any(|m| m.tags().get("zone") == Some("a"))
    })
    .await;

    async fn collect<R: Runtime>(
        mut replies: grinta_proto::fabric::QueryResponses<R>,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let mut got = Vec::new();
        while let Some((node, reply)) = replies.next().await {
            got.push((node, String::from_utf8_lossy(&reply).into_owned()));
        }
        got.sort();
        (got, replies.unanswered().to_vec())
    }
    let long = QueryOptions::new().timeout(Duration::from_secs(60));
    // Every handler, this node included; the stream ends with the last answer, long before
    // the timeout.
    let (got, unanswered) = within::<R, _>(
        Duration::from_secs(20),
        collect(
            origin
                .query("load", "cpu".into(), long.clone())
                .expect("query"),
        ),
    )
    .await
    .expect("ends when all answered");
    assert_eq!(
        got,
        (0..3)
            .map(|i| (format!("node-{i}"), format!("node-{i}:cpu")))
            .collect::<Vec<_>>()
    );
    assert!(unanswered.is_empty(), "{unanswered:?}");
    // By node name, by tag.
    let (got, _) = collect(
        origin
            .query("load", "x".into(), long.clone().node("node-2"))
            .expect("query"),
    )
    .await;
    assert_eq!(got, vec![("node-2".to_owned(), "node-2:x".to_owned())]);
    let (got, _) = collect(
        origin
            .query(
                "load",
                "y".into(),
                long.clone().filter(TagFilter::new().eq("zone", "a")),
            )
            .expect("query"),
    )
    .await;
    assert_eq!(got, vec![("node-1".to_owned(), "node-1:y".to_owned())]);
    // Fan-out bound: a clear error, nothing asked.
    let err = origin
        .query("load", "z".into(), long.clone().max_nodes(2))
        .expect_err("3 match");
    assert!(
        matches!(
            err.flow_error(),
            Some(grinta_proto::flow::FlowError::LimitReached { .. })
        ),
        "{err:?}"
    );
    // A burst: 100 queries at once, 300 answers, from a node connected to every handler.
    let burst: Vec<_> = (0..100)
        .map(|i| {
            let origin = fabrics[2].clone();
            let long = long.clone();
            spawn::<R, _>(async move {
                collect(
                    origin
                        .query("load", format!("q{i}").into(), long)
                        .expect("query"),
                )
                .await
            })
        })
        .collect();
    for (i, done) in burst.into_iter().enumerate() {
        let (got, unanswered) = within::<R, _>(Duration::from_secs(30), done)
            .await
            .expect("burst ends")
            .expect("task ran");
        assert_eq!(got.len(), 3, "query {i}: {got:?} {unanswered:?}");
        assert!(got.iter().all(|(n, r)| *r == format!("{n}:q{i}")));
    }

    // A handler that drops its questions is reported as unanswered, at once.
    let mut silent = fabrics[2].handle_queries("silent").expect("handler");
    drop(spawn::<R, _>(async move {
        while let Some(query) = silent.next().await {
            drop(query);
        }
    }));
    answer_queries(&fabrics[1], "silent");
    // One that keeps its questions unanswered: the timeout ends the query.
    let mut slow = fabrics[1].handle_queries("slow").expect("handler");
    drop(spawn::<R, _>(async move {
        let mut kept = Vec::new();
        while let Some(query) = slow.next().await {
            kept.push(query);
        }
    }));
    until::<R>(Duration::from_secs(20), "handlers known", || {
        asked("silent") == 2 && asked("slow") == 1
    })
    .await;
    let (got, unanswered) = within::<R, _>(
        Duration::from_secs(20),
        collect(
            origin
                .query("silent", "s".into(), long.clone())
                .expect("query"),
        ),
    )
    .await
    .expect("ends without waiting for the timeout");
    assert_eq!(got, vec![("node-1".to_owned(), "node-1:s".to_owned())]);
    assert_eq!(unanswered, vec!["node-2".to_owned()]);
    let started = std::time::Instant::now();
    let (got, unanswered) = within::<R, _>(
        Duration::from_secs(20),
        collect(
            origin
                .query(
                    "slow",
                    "t".into(),
                    QueryOptions::new().timeout(Duration::from_millis(500)),
                )
                .expect("query"),
        ),
    )
    .await
    .expect("the timeout ends it");
    assert!(got.is_empty());
    assert_eq!(unanswered, vec!["node-1".to_owned()]);
    assert!(started.elapsed() >= Duration::from_millis(500));

    // Nobody handles it: ends at once, nothing asked.
    let none = origin
        .query("nobody", "n".into(), QueryOptions::new())
        .expect("query");
    assert_eq!(none.asked(), 0);
    let (got, _) = within::<R, _>(Duration::from_millis(100), collect(none))
        .await
        .expect("at once");
    assert!(got.is_empty());
    // Topics and reserved names are checked; handlers are not listed as endpoints.
    assert!(
        origin
            .query("a/b", "n".into(), QueryOptions::new())
            .is_err()
    );
    assert!(origin.handle_queries("").is_err());
    assert!(
        origin.handle_queries("load").is_err(),
        "already handled here"
    );
    assert!(origin.endpoint("grinta.query.load").is_err());
    assert!(origin.group_endpoint("grinta.other").is_err());
    assert!(
        origin.endpoints("").is_empty(),
        "{:?}",
        origin.endpoints("")
    );
    // This node shuts down: a query is refused.
    origin.shutdown().await;
    assert!(
        origin
            .query("load", "n".into(), QueryOptions::new())
            .expect_err("down")
            .is_shutdown()
    );
}

/// The replicated key/value table: a write is read on every node, watched from the current
/// state, overwritten and deleted by others, gone with its writer, and bounded by clear errors.
pub async fn the_key_value_table_is_shared_and_watched<R: Runtime>() {
    use futures::StreamExt;
    use grinta_proto::fabric::{KvEvent, MAX_KEY_LEN, MAX_VALUE_LEN};
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    let (reader, writer, other) = (fabrics[0].kv(), fabrics[1].kv(), fabrics[2].kv());
    writer.put("config/limit", "100").expect("put");
    writer.put("config/zone", "eu").expect("put");
    writer.put("elsewhere", "x").expect("put");
    until::<R>(Duration::from_secs(20), "writes spread", || {
        fabrics
            .iter()
            .all(|f| f.kv().entries("config/").len() == 2 && f.kv().get("elsewhere").is_some())
    })
    .await;
    let entry = reader.get("config/limit").expect("entry");
    assert_eq!(
        (&entry.value[..], entry.writer.as_str()),
        (&b"100"[..], "node-1")
    );
    assert_eq!(reader.len(), 3);

    // A watch starts with the current entries under its prefix, in key order.
    let mut watch = reader.watch("config/");
    let first = next_within::<R, _>(&mut watch).await;
    let second = next_within::<R, _>(&mut watch).await;
    assert!(
        matches!((&first, &second), (KvEvent::Set { key: a, .. }, KvEvent::Set { key: b, .. })
            if a == "config/limit" && b == "config/zone"),
        "{first:?} {second:?}"
    );
    // Another node overwrites: the later write wins everywhere, written by it.
    other.put("config/limit", "200").expect("put");
    match next_within::<R, _>(&mut watch).await {
        KvEvent::Set { key, entry } => {
            assert_eq!(key, "config/limit");
            assert_eq!(
                (&entry.value[..], entry.writer.as_str()),
                (&b"200"[..], "node-2")
            );
        }
        e => panic!("{e:?}"),
    }
    until::<R>(Duration::from_secs(20), "the overwrite spread", || {
        fabrics
            .iter()
            .all(|f| f.kv().get("config/limit").is_some_and(|e| e.value == "200"))
    })
    .await;
    // Any node deletes, whoever wrote.
    assert!(reader.delete("config/zone").expect("delete"));
    assert!(
        !reader.delete("config/zone").expect("delete"),
        "already gone"
    );
    assert_eq!(
        next_within::<R, _>(&mut watch).await,
        KvEvent::Deleted {
            key: "config/zone".into()
        }
    );
    until::<R>(Duration::from_secs(20), "the delete spread", || {
        fabrics.iter().all(|f| f.kv().get("config/zone").is_none())
    })
    .await;

    // Limits: clear errors.
    let too_long = "k".repeat(MAX_KEY_LEN + 1);
    for err in [
        writer.put(&too_long, "v").expect_err("key too long"),
        writer.put("bad key", "v").expect_err("bad key"),
        writer.put("", "v").expect_err("empty key"),
        writer
            .put("big", vec![0u8; MAX_VALUE_LEN + 1])
            .expect_err("value too large"),
    ] {
        assert!(err.registry_error().is_some(), "{err:?}");
    }
    writer
        .put(&"k".repeat(MAX_KEY_LEN), vec![7u8; MAX_VALUE_LEN])
        .expect("the largest key and value");
    until::<R>(Duration::from_secs(20), "the largest entry spread", || {
        reader
            .get(&"k".repeat(MAX_KEY_LEN))
            .is_some_and(|e| e.value.len() == MAX_VALUE_LEN)
    })
    .await;
    // A signed entry must fit one gossip item with the writer's name: a node with a long name
    // is told how large a value still fits with that key.
    // (DNS labels are at most 63 bytes: the certificate names it in two.)
    let long_name = Fabric::<R>::builder(&format!("{}.{}", "n".repeat(60), "n".repeat(59)))
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .start()
        .expect("starts");
    let long_key = "k".repeat(MAX_KEY_LEN);
    let err = long_name
        .kv()
        .put(&long_key, vec![0u8; MAX_VALUE_LEN])
        .expect_err("too large to gossip");
    let Some(grinta_proto::registry::RegistryError::ValueTooLarge { limit, .. }) =
        err.registry_error()
    else {
        panic!("{err:?}");
    };
    assert!(*limit < MAX_VALUE_LEN, "{limit}");
    long_name
        .kv()
        .put(&long_key, vec![0u8; *limit])
        .expect("the largest value that fits");
    long_name.shutdown().await;

    // The writer of config/limit leaves: its entry vanishes everywhere, but its durable entry
    // is taken over by node-0, the live member with the lowest name.
    other.put_durable("durable", "d").expect("put");
    until::<R>(Duration::from_secs(20), "the durable entry spread", || {
        reader.get("durable").is_some_and(|e| e.durable)
    })
    .await;
    fabrics[2].shutdown().await;
    assert_eq!(
        next_within::<R, _>(&mut watch).await,
        KvEvent::Deleted {
            key: "config/limit".into()
        }
    );
    assert!(reader.get("config/limit").is_none());
    assert!(reader.get("elsewhere").is_some(), "node-1's entries stay");
    until::<R>(
        Duration::from_secs(20),
        "the durable entry taken over",
        || {
            [&reader, &writer].iter().all(|kv| {
                kv.get("durable")
                    .is_some_and(|e| e.writer == "node-0" && e.value == "d" && e.durable)
            })
        },
    )
    .await;
    assert!(other.put("late", "x").expect_err("down").is_shutdown());
    fabrics[0].shutdown().await;
    assert_eq!(
        within::<R, _>(Duration::from_secs(5), watch.next()).await,
        Some(None),
        "the watch ends"
    );
}

/// Answers every request on `endpoint` with its upper-case copy, in a task of its own.
fn serve_upper<R: Runtime>(endpoint: grinta_proto::fabric::Endpoint<R>) {
    use futures::StreamExt;
    let mut requests = endpoint.into_requests();
    drop(spawn::<R, _>(async move {
        while let Some(Ok(request)) = requests.next().await {
            let reply = request.payload().to_ascii_uppercase();
            let _ = request.respond(reply).await;
        }
    }));
}

/// Requests get their reply, remote and in-process, typed or not, a burst of 1,000 at once, with
/// a slow requester (a flow whose message comes late) and a silent one (ended without a message)
/// among them; and every way one can fail gives a typed error: no such endpoint, no reply,
/// dropped, too large, too slow.
pub async fn requests_get_one_reply_each<R: Runtime>() {
    use futures::StreamExt;
    use grinta_proto::codec::ProstCodec;
    use grinta_proto::flow::FlowError;
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let (client, server) = (fabrics[0].clone(), fabrics[1].clone());
    serve_upper(server.endpoint("upper").expect("endpoint"));
    serve_upper(client.endpoint("local-upper").expect("endpoint"));
    client
        .wait_for("upper", Duration::from_secs(20))
        .await
        .expect("name spread");

    assert_eq!(
        &client.request("upper", "hello").await.expect("reply")[..],
        b"HELLO"
    );
    assert_eq!(
        &client
            .request("local-upper", "in process")
            .await
            .expect("reply")[..],
        b"IN PROCESS"
    );
    let codec = ProstCodec::<String>::new();
    let typed: String = client
        .request_with("upper", &"typed".to_owned(), &codec, &codec)
        .await
        .expect("typed reply");
    // The server upper-cases the encoded bytes: the length prefix survives, the text does not.
    assert_eq!(typed, "TYPED");

    // A burst: 1,000 requests at once, each with its own reply.
    let burst: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            spawn::<R, _>(async move { (i, client.request("upper", format!("r{i}")).await) })
        })
        .collect();
    for done in burst {
        let (i, reply) = within::<R, _>(Duration::from_secs(60), done)
            .await
            .expect("burst ends")
            .expect("task ran");
        assert_eq!(reply.expect("reply"), format!("R{i}").into_bytes());
    }

    // A flow dialled to the endpoint that sends nothing yet waits for its message without
    // holding up the requests behind it, and is answered once its message comes; one that ends
    // without a message is skipped.
    let mut slow = client.dial("upper").await.expect("dial");
    let mut silent = client.dial("upper").await.expect("dial");
    for i in 0..20 {
        let reply = within::<R, _>(
            Duration::from_secs(20),
            client.request("upper", format!("q{i}")),
        )
        .await
        .expect("not held up by a slow requester")
        .expect("reply");
        assert_eq!(reply, format!("Q{i}").into_bytes());
    }
    silent.finish().await.expect("finish");
    slow.send("late").await.expect("send");
    slow.finish().await.expect("finish");
    assert_eq!(
        within::<R, _>(Duration::from_secs(20), slow.recv())
            .await
            .expect("the slow request is answered")
            .expect("recv")
            .as_deref(),
        Some(&b"LATE"[..])
    );
    assert_eq!(
        &client.request("upper", "after").await.expect("reply")[..],
        b"AFTER"
    );

    // Failures, each typed.
    let err = client.request("nobody", "x").await.expect_err("no owner");
    assert!(err.is_no_such_endpoint(), "{err:?}");
    let no_reply = server.endpoint("no-reply").expect("endpoint");
    drop(spawn::<R, _>(async move {
        while let Ok(mut flow) = no_reply.accept().await {
            let _ = flow.recv().await;
            let _ = flow.finish().await;
        }
    }));
    let mut dropping = server
        .endpoint("dropping")
        .expect("endpoint")
        .into_requests();
    drop(spawn::<R, _>(async move {
        while let Some(Ok(request)) = dropping.next().await {
            drop(request);
        }
    }));
    let mut keeping = server
        .endpoint("keeping")
        .expect("endpoint")
        .into_requests();
    drop(spawn::<R, _>(async move {
        let mut kept = Vec::new();
        while let Some(Ok(request)) = keeping.next().await {
            kept.push(request);
        }
    }));
    for name in ["no-reply", "dropping", "keeping"] {
        client
            .wait_for(name, Duration::from_secs(20))
            .await
            .expect("name spread");
    }
    let err = client.request("no-reply", "x").await.expect_err("no reply");
    assert!(
        matches!(err.flow_error(), Some(FlowError::NoReply { .. })),
        "{err:?}"
    );
    let err = client.request("dropping", "x").await.expect_err("dropped");
    assert!(err.reset_code().is_some(), "{err:?}");
    let started = std::time::Instant::now();
    let err = client
        .request_with_timeout("keeping", "x", Duration::from_millis(300))
        .await
        .expect_err("too slow");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let err = client
        .request("upper", vec![b'a'; 5 << 20])
        .await
        .expect_err("beyond max_message_size");
    assert!(err.flow_error().is_some(), "{err:?}");
    // The server still answers afterwards.
    assert_eq!(
        &client.request("upper", "still").await.expect("reply")[..],
        b"STILL"
    );
    client.shutdown().await;
    assert!(
        client
            .request("upper", "x")
            .await
            .expect_err("down")
            .is_shutdown()
    );
}

/// Datagrams reach an endpoint with their sender's name, remote and in-process; a burst of
/// 100,000 never blocks the sender and costs membership nothing; every misuse is a typed error.
pub async fn datagrams_arrive_and_never_block<R: Runtime>() {
    use grinta_proto::flow::FlowError;
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    let (client, server) = (fabrics[0].clone(), fabrics[1].clone());
    let inbox = server.endpoint("inbox").expect("endpoint");
    client
        .wait_for("inbox", Duration::from_secs(20))
        .await
        .expect("name spread");

    // Paced: each arrives, with the sender's name.
    for i in 0..100u32 {
        client
            .send_datagram("inbox", format!("d{i}"))
            .expect("sent");
        let (from, payload) = within::<R, _>(Duration::from_secs(5), inbox.recv_datagram())
            .await
            .expect("arrives on loopback")
            .expect("datagram");
        assert_eq!(from, "node-0");
        assert_eq!(payload, format!("d{i}").into_bytes());
    }
    // In-process, from this node to its own endpoint.
    server.send_datagram("inbox", "local").expect("sent");
    assert_eq!(
        inbox.recv_datagram().await.expect("datagram"),
        ("node-1".to_owned(), bytes::Bytes::from_static(b"local"))
    );
    // The largest, and one byte more.
    let max = client.max_datagram_size();
    client
        .send_datagram("inbox", vec![7u8; max])
        .expect("the largest datagram");
    let (_, largest) = within::<R, _>(Duration::from_secs(5), inbox.recv_datagram())
        .await
        .expect("arrives")
        .expect("datagram");
    assert_eq!(largest.len(), max);
    let err = client
        .send_datagram("inbox", vec![7u8; max + 1])
        .expect_err("too large");
    assert!(
        matches!(err.flow_error(), Some(FlowError::MessageTooLarge { .. })),
        "{err:?}"
    );
    assert!(
        client
            .send_datagram("nobody", "x")
            .expect_err("no owner")
            .is_no_such_endpoint()
    );
    assert!(client.send_datagram("bad name", "x").is_err());

    // A burst of 100,000 returns at once (what has no room is dropped and counted), and
    // membership does not notice.
    let started = std::time::Instant::now();
    for i in 0..100_000u32 {
        client
            .send_datagram("inbox", i.to_be_bytes().to_vec())
            .expect("never an error");
    }
    let burst_took = started.elapsed();
    let stats = client.stats().node.datagrams;
    assert_eq!(
        stats.sent + stats.dropped_sending,
        100 + 1 + 100_000,
        "{stats:?} after {burst_took:?}"
    );
    let mut received = 0;
    while let Some(Ok(_)) = within::<R, _>(Duration::from_millis(500), inbox.recv_datagram()).await
    {
        received += 1;
    }
    // Read while the rest of the burst still arrives: at most what left the sender.
    assert!(
        received > 0 && received <= stats.sent,
        "{received} of {stats:?}"
    );
    let server_stats = server.stats().node.datagrams;
    assert!(
        server_stats.dropped_receiving > 0 || stats.dropped_sending > 0,
        "a burst beyond the queue is dropped somewhere: {server_stats:?} {stats:?}"
    );
    sleep::<R>(Duration::from_millis(500)).await;
    for f in &fabrics {
        assert_eq!(f.alive_members().len(), 1, "membership kept its priority");
        assert_eq!(f.stats().node.membership.suspicions_raised, 0);
    }
    // A burst of the largest datagrams fills the room the sender has in the server's connection
    // (and is mostly dropped at once); once it left, every datagram has room again, however
    // slowly they are sent.
    for _ in 0..20_000 {
        client
            .send_datagram("inbox", vec![9u8; max])
            .expect("never an error");
    }
    while let Some(Ok(_)) = within::<R, _>(Duration::from_millis(200), inbox.recv_datagram()).await
    {
    }
    let before = client.stats().node.datagrams;
    for i in 0..20u32 {
        client
            .send_datagram("inbox", format!("after {i}"))
            .expect("sent");
        let (_, payload) = within::<R, _>(Duration::from_secs(5), inbox.recv_datagram())
            .await
            .expect("in time")
            .expect("datagram");
        assert_eq!(payload, format!("after {i}").as_bytes());
        sleep::<R>(Duration::from_millis(if i % 5 == 0 { 300 } else { 5 })).await;
    }
    let after = client.stats().node.datagrams;
    assert_eq!(after.sent - before.sent, 20, "{before:?} {after:?}");
    assert_eq!(after.dropped_sending, before.dropped_sending);
    // Closing the endpoint: datagrams for it are dropped. The sender had queued them outside its
    // node's lock, the name being known to lead to the server; once the withdrawal reaches it,
    // sending answers `NoSuchEndpoint` again. Shutting down ends the wait.
    inbox.close();
    until::<R>(
        Duration::from_secs(20),
        "the withdrawal reaches the sender",
        || {
            client
                .send_datagram("inbox", "x")
                .is_err_and(|e| e.is_no_such_endpoint())
        },
    )
    .await;
    client.shutdown().await;
    assert!(
        client
            .send_datagram("inbox", "x")
            .expect_err("down")
            .is_shutdown()
    );
    let late = server.endpoint("late").expect("endpoint");
    server.shutdown().await;
    assert!(late.recv_datagram().await.expect_err("down").is_shutdown());
}

/// Topics: every subscription anywhere gets every message published after it was known, in
/// publish order, one copy per subscribing node; a slow lossy subscription learns what it
/// missed, a slow reliable one holds the publisher back; subscriptions go with their node.
pub async fn topics_reach_every_subscriber<R: Runtime>() {
    use futures::StreamExt;
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 3).await;
    let publisher = fabrics[0].clone();
    let mut first = fabrics[1].subscribe("news").expect("subscribe");
    let mut second = fabrics[1].subscribe("news").expect("subscribe");
    let mut reliable = fabrics[2].subscribe_reliable("news").expect("subscribe");
    let mut own = publisher.subscribe("news").expect("subscribe");
    // Known to the publisher once the subscribers' endpoints spread.
    until::<R>(Duration::from_secs(20), "subscriptions known", || {
        publisher.subscribers("news").len() == 3
    })
    .await;
    for i in 0..1000u32 {
        publisher
            .publish("news", format!("m{i}"))
            .await
            .expect("publish");
    }
    for (name, sub) in [
        ("first", &mut first),
        ("second", &mut second),
        ("reliable", &mut reliable),
        ("own", &mut own),
    ] {
        for i in 0..1000u32 {
            let message = within::<R, _>(Duration::from_secs(10), sub.next())
                .await
                .unwrap_or_else(|| panic!("{name}: message {i} within 10 s"))
                .expect("stream goes on")
                .expect("not lagged");
            assert_eq!(message, format!("m{i}").into_bytes(), "{name} in order");
        }
    }
    // One copy per subscribing node: two remote nodes, whatever their subscriptions.
    let stats = publisher.stats().topics["news"].clone();
    assert_eq!((stats.published, stats.sent), (1000, 2000), "{stats:?}");
    assert_eq!(fabrics[1].stats().topics["news"].received, 1000);

    // A lossy subscription that does not read: the oldest are dropped, and it is told how many.
    let mut slow = fabrics[1].subscribe("burst").expect("subscribe");
    let _keep = fabrics[2].subscribe("burst").expect("subscribe");
    until::<R>(Duration::from_secs(20), "burst subscribers known", || {
        publisher.subscribers("burst").len() == 2
    })
    .await;
    let burst = 5000u32;
    within::<R, _>(Duration::from_secs(30), async {
        for i in 0..burst {
            publisher
                .publish("burst", i.to_be_bytes().to_vec())
                .await
                .expect("publish");
        }
    })
    .await
    .expect("lossy subscribers never hold the publisher back");
    until::<R>(Duration::from_secs(20), "the burst arrived", || {
        fabrics[1]
            .stats()
            .topics
            .get("burst")
            .is_some_and(|t| t.received == u64::from(burst))
    })
    .await;
    let lagged = slow.next().await.expect("stream goes on");
    let Err(Error::Lagged { missed }) = lagged else {
        panic!("{lagged:?}");
    };
    assert_eq!(
        missed,
        u64::from(burst) - grinta_proto::fabric::SUBSCRIPTION_QUEUE as u64
    );
    let oldest_kept = slow.next().await.expect("goes on").expect("message");
    assert_eq!(oldest_kept, (burst - 1024).to_be_bytes().to_vec());

    // A reliable subscription that does not read holds the publisher back; reading frees it.
    let mut held = fabrics[2].subscribe_reliable("held").expect("subscribe");
    until::<R>(Duration::from_secs(20), "held subscriber known", || {
        publisher.subscribers("held").len() == 1
    })
    .await;
    let big = vec![0u8; 64 * 1024];
    let mut published = 0;
    let blocked = within::<R, _>(Duration::from_secs(5), async {
        for _ in 0..200 {
            publisher
                .publish("held", big.clone())
                .await
                .expect("publish");
            published += 1;
        }
    })
    .await;
    assert!(
        blocked.is_none(),
        "200 x 64 KiB unread: the publisher waits"
    );
    // The queue (4 MiB), the node's receive buffer and QUIC's windows, the publisher's flow and
    // its own buffer: about 8 MiB of 64 KiB messages.
    assert!((64..200).contains(&published), "{published}");
    let publishing = spawn::<R, _>({
        let publisher = publisher.clone();
        let big = big.clone();
        async move {
            for _ in 0..50 {
                publisher
                    .publish("held", big.clone())
                    .await
                    .expect("publish");
            }
        }
    });
    let mut read = 0;
    while read < published + 50 {
        match within::<R, _>(Duration::from_secs(10), held.next()).await {
            Some(Some(Ok(_))) => read += 1,
            other => panic!("after {read}: {other:?}"),
        }
    }
    within::<R, _>(Duration::from_secs(20), publishing)
        .await
        .expect("reading freed the publisher")
        .expect("task ran");

    // Subscriptions go with their node.
    drop(first);
    drop(second);
    drop(slow);
    until::<R>(Duration::from_secs(20), "node-1 withdrew", || {
        publisher.subscribers("news").len() == 2
    })
    .await;
    fabrics[2].abort();
    until::<R>(
        Duration::from_secs(30),
        "node-2's subscriptions gone",
        || publisher.subscribers("news").len() == 1,
    )
    .await;
    publisher.publish("news", "still").await.expect("publish");
    assert_eq!(
        own.next().await.expect("goes on").expect("message"),
        "still".as_bytes()
    );
    assert!(publisher.publish("bad topic", "x").await.is_err());
    // The fabric's own endpoints are not for dials, requests or datagrams.
    assert!(publisher.dial("grinta.topic.news").await.is_err());
    assert!(publisher.request("grinta.topic.news", "x").await.is_err());
    assert!(publisher.send_datagram("grinta.topic.news", "x").is_err());
    // Topic flows never hold a graceful shutdown for its grace period (5 s).
    let started = std::time::Instant::now();
    publisher.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        publisher
            .publish("news", "x")
            .await
            .expect_err("down")
            .is_shutdown()
    );
    assert!(own.next().await.is_none(), "the stream ends at shutdown");
}

/// Serves `name`: every flow's messages are checked to be `index (u32) + filler` in order from
/// 0; at the end the count goes back as one message, then the end. With `batches`, the flow
/// is read with `recv` and `recv_many` in turn (the batches read in place, and every other one
/// by value).
fn serve_sequence_checker<R: Runtime>(endpoint: grinta_proto::fabric::Endpoint<R>, batches: bool) {
    fn check(m: &[u8], next: &mut u32) {
        let index = u32::from_be_bytes(m[..4].try_into().expect("index"));
        assert_eq!(index, *next, "messages arrive once each and in order");
        assert!(
            m[4..].iter().all(|&b| b == (index % 251) as u8),
            "message {index} arrives intact"
        );
        *next += 1;
    }
    drop(spawn::<R, _>(async move {
        while let Ok(mut flow) = endpoint.accept().await {
            drop(spawn::<R, _>(async move {
                let mut next = 0u32;
                for turn in 0u64.. {
                    if !batches || turn % 2 == 0 {
                        match flow.recv().await {
                            Ok(Some(m)) => check(&m, &mut next),
                            _ => break,
                        }
                        continue;
                    }
                    let Ok(Some(batch)) = flow.recv_many().await else {
                        break;
                    };
                    assert!(!batch.is_empty());
                    let (len, bytes) = (batch.len(), batch.bytes());
                    let before = next;
                    if turn % 4 == 1 {
                        assert_eq!(batch.iter().map(<[u8]>::len).sum::<usize>(), bytes);
                        batch.iter().for_each(|m| check(m, &mut next));
                    } else {
                        batch.into_iter().for_each(|m| check(&m, &mut next));
                    }
                    assert_eq!((next - before) as usize, len);
                }
                let _ = flow.send(next.to_be_bytes().to_vec()).await;
                let _ = flow.finish().await;
            }));
        }
    }));
}

/// A small message `i` of a sequence: its index, then up to 63 bytes of filler.
fn small_sequence_message(i: u32) -> bytes::Bytes {
    let mut m = i.to_be_bytes().to_vec();
    m.resize(4 + (i as usize * 31) % 64, (i % 251) as u8);
    m.into()
}

/// Message `i` of a sequence: its index, then up to 4 KiB of filler.
fn sequence_message(i: u32) -> bytes::Bytes {
    let mut m = i.to_be_bytes().to_vec();
    m.resize(4 + (i as usize * 7919) % 4096, (i % 251) as u8);
    m.into()
}

/// `send_many` over QUIC and in-process: 20,000 messages (about 40 MiB, forty times the send
/// buffer) in batches of every size from 1 to 9,000, then 300,000 small ones in batches of up
/// to 100,000, arrive once each, intact and in order, read with `recv` or with `recv` and
/// `recv_many` in turn; a message
/// over the receiver's limit in a batch fails with `MessageTooLarge` after the ones before it
/// were sent, none after it, and the flow stays usable.
pub async fn send_many_delivers_batches_in_order<R: Runtime>() {
    use bytes::Bytes;
    use grinta_proto::flow::FlowError;
    let ca = DevCa::new().expect("dev CA");
    let fabrics = cluster::<R>(&ca, 2).await;
    serve_sequence_checker(fabrics[1].endpoint("checker").expect("endpoint"), false);
    serve_sequence_checker(
        fabrics[0].endpoint("local-checker").expect("endpoint"),
        false,
    );
    serve_sequence_checker(
        fabrics[1].endpoint("batch-checker").expect("endpoint"),
        true,
    );
    serve_sequence_checker(
        fabrics[0]
            .endpoint("local-batch-checker")
            .expect("endpoint"),
        true,
    );
    for name in ["checker", "batch-checker"] {
        fabrics[0]
            .wait_for(name, Duration::from_secs(10))
            .await
            .expect("name spread");
    }
    for (name, local) in [
        ("checker", false),
        ("local-checker", true),
        ("batch-checker", false),
        ("local-batch-checker", true),
    ] {
        let mut flow = fabrics[0].dial(name).await.expect("dial");
        assert_eq!(flow.is_local(), local);
        let mut i = 0u32;
        for batch in [1u32, 2, 1000, 5000, 13, 7, 3977, 9000] {
            let messages: Vec<Bytes> = (i..i + batch).map(sequence_message).collect();
            within::<R, _>(Duration::from_secs(30), flow.send_many(messages))
                .await
                .expect("no hang")
                .expect("send_many");
            i += batch;
        }
        // An iterator of another item type, lazily made.
        flow.send_many((i..i + 1000).map(|k| sequence_message(k).to_vec()))
            .await
            .expect("send_many of Vec<u8>");
        i += 1000;
        // Borrowed messages, copied: from a slice of owned ones (up to 4 KiB, some over the
        // size copied into the flow's buffer), and from one reused buffer.
        for batch in [1u32, 5000, 77] {
            let owned: Vec<Bytes> = (i..i + batch).map(sequence_message).collect();
            within::<R, _>(Duration::from_secs(30), flow.send_many_copied(&owned))
                .await
                .expect("no hang")
                .expect("send_many_copied");
            i += batch;
        }
        let mut buffer = Vec::new();
        for k in i..i + 2000 {
            buffer.clear();
            buffer.extend_from_slice(&small_sequence_message(k));
            flow.send_many_copied([&buffer]).await.expect("one copied");
        }
        i += 2000;
        // Small messages, as a busy sender has them: 300,000 of 4 to 67 bytes (about 11 MiB,
        // ten times the send buffer) in batches of 1 to 100,000, and sent one by one between.
        for batch in [100_000u32, 1, 64, 257, 50_000, 99_678, 50_000] {
            let messages: Vec<Bytes> = (i..i + batch).map(small_sequence_message).collect();
            if batch % 2 == 0 {
                within::<R, _>(Duration::from_secs(30), flow.send_many(messages))
                    .await
                    .expect("no hang")
                    .expect("send_many of small messages");
            } else {
                within::<R, _>(Duration::from_secs(30), flow.send_many_copied(&messages))
                    .await
                    .expect("no hang")
                    .expect("send_many_copied of small messages");
            }
            i += batch;
            for _ in 0..3 {
                flow.send(small_sequence_message(i)).await.expect("send");
                i += 1;
            }
        }
        // The 4th message is over the 4 MiB limit: 3 sent, the error, none after; the same
        // copied.
        let mut batch: Vec<Bytes> = (i..i + 3).map(sequence_message).collect();
        batch.push(Bytes::from(vec![0u8; (4 << 20) + 1]));
        batch.push(sequence_message(999_999));
        let refused = flow.send_many(batch).await;
        assert!(
            matches!(refused, Err(Error::Flow(FlowError::MessageTooLarge { .. }))),
            "{refused:?}"
        );
        i += 3;
        let mut batch: Vec<Bytes> = (i..i + 3).map(sequence_message).collect();
        batch.push(Bytes::from(vec![0u8; (4 << 20) + 1]));
        batch.push(sequence_message(999_999));
        let refused = flow.send_many_copied(&batch).await;
        assert!(
            matches!(refused, Err(Error::Flow(FlowError::MessageTooLarge { .. }))),
            "{refused:?}"
        );
        i += 3;
        flow.send_many([sequence_message(i)])
            .await
            .expect("the flow stays usable");
        i += 1;
        flow.finish().await.expect("finish");
        let count = within::<R, _>(Duration::from_secs(30), flow.recv())
            .await
            .expect("no hang")
            .expect("recv")
            .expect("the count");
        assert_eq!(
            u32::from_be_bytes(count[..].try_into().expect("u32")),
            i,
            "{name}: every message arrived once"
        );
        assert_eq!(flow.recv().await.expect("end"), None);
    }
}

/// Two nodes on 127.0.0.1 with path MTU discovery bounded by `max_udp_payload`: 16 MiB echoed
/// in 256 KiB messages, byte-exact; returns the datagrams each node received meanwhile.
async fn echo_16_mib<R: Runtime>(ca: &DevCa, max_udp_payload: u16) -> [u64; 2] {
    use grinta_proto::transport::TransportLimits;
    let limits = TransportLimits {
        max_udp_payload,
        ..TransportLimits::default()
    };
    let a = Fabric::<R>::builder("node-0")
        .dev_certificates(ca)
        .profile(Profile::Local)
        .transport_limits(limits.clone())
        .start()
        .expect("node starts");
    let b = Fabric::<R>::builder("node-1")
        .dev_certificates(ca)
        .profile(Profile::Local)
        .transport_limits(limits)
        .seed(a.local_addr())
        .start()
        .expect("node starts");
    serve_echo(b.endpoint("echo").expect("endpoint"));
    a.wait_for("echo", Duration::from_secs(10))
        .await
        .expect("name spread");
    // Discovery runs once the connection is up; on loopback it ends within a few round trips.
    sleep::<R>(Duration::from_millis(500)).await;
    let before = [&a, &b].map(|f| f.stats().socket.datagrams_received);
    let mut flow = a.dial("echo").await.expect("dial");
    for k in 0..64u8 {
        let message = bytes::Bytes::from(vec![k; 256 << 10]);
        flow.send(message.clone()).await.expect("send");
        let echoed = within::<R, _>(Duration::from_secs(30), flow.recv())
            .await
            .expect("no hang")
            .expect("recv")
            .expect("the echo");
        assert!(echoed == message, "message {k} echoed byte-exact");
    }
    flow.finish().await.expect("finish");
    let received = [&a, &b].map(|f| f.stats().socket.datagrams_received);
    let counts = [received[0] - before[0], received[1] - before[1]];
    a.shutdown().await;
    b.shutdown().await;
    counts
}

/// With the jumbo bound, a bulk flow over loopback (which carries 64 KiB datagrams) travels in
/// packets of up to 8952 bytes, sent in batches the kernel accepts: 16 MiB each way in under
/// 4,200 datagrams, where the default bound needs over 11,500.
pub async fn jumbo_packets_carry_a_bulk_flow_over_loopback<R: Runtime>() {
    use grinta_proto::transport::{DEFAULT_MAX_UDP_PAYLOAD, JUMBO_MAX_UDP_PAYLOAD};
    let ca = DevCa::new().expect("dev CA");
    let default = echo_16_mib::<R>(&ca, DEFAULT_MAX_UDP_PAYLOAD).await;
    let jumbo = echo_16_mib::<R>(&ca, JUMBO_MAX_UDP_PAYLOAD).await;
    println!(
        "16 MiB echoed: {default:?} datagrams received by node-0 and node-1 at the default bound, {jumbo:?} with the jumbo bound"
    );
    let sixteen_mib = 16u64 << 20;
    for node in 0..2 {
        assert!(
            default[node] > sixteen_mib / 1452,
            "node-{node}: {} datagrams at the default bound",
            default[node]
        );
        assert!(
            jumbo[node] < sixteen_mib / 4000,
            "node-{node}: {} datagrams with the jumbo bound ({} at the default)",
            jumbo[node],
            default[node]
        );
    }
}
