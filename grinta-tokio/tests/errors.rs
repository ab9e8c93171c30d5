//! Every error a user can meet has its own type and a message that says what to do. (Message too
//! large and codec mismatch are in `flow_semantics.rs`, over both kinds of flow.)

use std::time::Duration;

use grinta_tokio::{
    DevCa, Error, Fabric, FlowError, FlowLimits, Profile, RegistryError, RejectReason, ResetCode,
    TlsConfig, TlsError,
};

const WAIT: Duration = Duration::from_secs(20);

fn builder(ca: &DevCa, name: &str) -> grinta_tokio::FabricBuilder {
    Fabric::builder(name)
        .dev_certificates(ca)
        .profile(Profile::Local)
}

async fn until(mut ok: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition within 20 s");
}

async fn pair(ca: &DevCa, limits: FlowLimits) -> (Fabric, Fabric) {
    let a = builder(ca, "node-a")
        .flow_limits(limits.clone())
        .start()
        .unwrap();
    let b = builder(ca, "node-b")
        .flow_limits(limits)
        .seed(a.local_addr())
        .start()
        .unwrap();
    until(|| a.alive_members().len() == 1 && b.alive_members().len() == 1).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_name() {
    let ca = DevCa::new().unwrap();
    let fabric = builder(&ca, "solo").start().unwrap();
    let err = fabric.dial("nobody-serves-this").await.unwrap_err();
    assert!(err.is_no_such_endpoint(), "{err:?}");
    assert!(
        matches!(err.flow_error(), Some(FlowError::NoSuchEndpoint { name }) if name == "nobody-serves-this"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "no node serves endpoint \"nobody-serves-this\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_name() {
    let ca = DevCa::new().unwrap();
    let fabric = builder(&ca, "solo").start().unwrap();
    for bad in ["", "has space", "slash/name", &"x".repeat(129)] {
        let err = fabric.endpoint(bad).unwrap_err();
        assert!(
            matches!(
                err.registry_error(),
                Some(RegistryError::InvalidName { .. })
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("invalid endpoint name"),
            "{err}"
        );
        let err = fabric.dial(bad).await.unwrap_err();
        assert!(
            matches!(err, Error::Registry(RegistryError::InvalidName { .. })),
            "{err:?}"
        );
    }
    let err = fabric.endpoint("has space").unwrap_err();
    assert!(err.to_string().contains("may only hold"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_timeout() {
    let ca = DevCa::new().unwrap();
    let limits = FlowLimits {
        dial_timeout: Duration::from_millis(500),
        ..FlowLimits::default()
    };
    let (a, b) = pair(&ca, limits).await;
    let _svc = b.endpoint("svc").unwrap();
    until(|| !a.endpoints("svc").is_empty()).await;
    // The owner stops answering (a crash not yet detected): the dial times out.
    b.abort();
    let err = a.dial("svc").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        matches!(
            err.flow_error(),
            Some(FlowError::DialTimeout { endpoint, after })
                if endpoint == "svc" && *after == Duration::from_millis(500)
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("timed out after 500ms"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_dial_local_and_remote() {
    let ca = DevCa::new().unwrap();
    let limits = FlowLimits {
        accept_backlog: 1,
        ..FlowLimits::default()
    };
    let (a, b) = pair(&ca, limits).await;
    let _svc = b.endpoint("svc").unwrap();
    until(|| !a.endpoints("svc").is_empty()).await;
    // Nobody accepts: the first dial waits in the backlog, the second is refused.
    for dialler in [&a, &b] {
        let _first = dialler.dial("svc").await.unwrap();
        let err = dialler.dial("svc").await.unwrap_err();
        assert_eq!(err.reject_reason(), Some(RejectReason::BacklogFull));
        assert!(
            matches!(err.flow_error(), Some(FlowError::Rejected { endpoint, .. }) if endpoint == "svc"),
            "{} dial: {err:?}",
            if dialler.name() == "node-a" {
                "remote"
            } else {
                "local"
            }
        );
        assert!(err.to_string().contains("refused the flow"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_closed_local_and_remote() {
    let ca = DevCa::new().unwrap();
    let (a, b) = pair(&ca, FlowLimits::default()).await;
    let svc = b.endpoint("svc").unwrap();
    until(|| !a.endpoints("svc").is_empty()).await;
    let mut remote = a.dial("svc").await.unwrap();
    let mut local = b.dial("svc").await.unwrap();
    // The endpoint closes with both flows still waiting for `accept`.
    drop(svc);
    for (what, flow) in [("remote", &mut remote), ("local", &mut local)] {
        let err = flow.recv().await.unwrap_err();
        assert_eq!(
            err.reset_code(),
            Some(ResetCode::EndpointClosed),
            "{what}: {err:?}"
        );
    }
    // And the name is gone: dialling it again is an unknown name.
    until(|| a.endpoints("svc").is_empty()).await;
    for dialler in [&a, &b] {
        let err = dialler.dial("svc").await.unwrap_err();
        assert!(err.is_no_such_endpoint(), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabric_shut_down() {
    let ca = DevCa::new().unwrap();
    // Flows left open through the shutdown are reset after this grace period.
    let limits = FlowLimits {
        shutdown_grace: std::time::Duration::from_millis(300),
        ..FlowLimits::default()
    };
    let (a, b) = pair(&ca, limits).await;
    let svc = a.endpoint("svc").unwrap();
    let remote_svc = b.endpoint("remote-svc").unwrap();
    until(|| !a.endpoints("remote-svc").is_empty()).await;
    let mut local = a.dial("svc").await.unwrap();
    let mut remote = a.dial("remote-svc").await.unwrap();
    let mut remote_end = remote_svc.accept().await.unwrap();
    let _busy = svc.accept().await.unwrap();
    let waiting_accept = tokio::spawn(async move { svc.accept().await });
    let waiting_event = {
        let a = a.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = a.next_member_event().await {
                    return e;
                }
            }
        })
    };
    a.shutdown().await;

    let shut = Error::is_shutdown;
    assert!(shut(&waiting_accept.await.unwrap().unwrap_err()));
    assert!(shut(&waiting_event.await.unwrap()));
    assert!(shut(&a.dial("remote-svc").await.unwrap_err()));
    assert!(shut(&a.endpoint("new").unwrap_err()));
    assert!(shut(&local.recv().await.unwrap_err()));
    assert!(shut(&local.send("x").await.unwrap_err()));
    assert!(shut(&remote.recv().await.unwrap_err()));
    assert!(shut(&remote.send("x").await.unwrap_err()));
    assert_eq!(Error::Shutdown.to_string(), "the fabric is shut down");
    // The other node sees the flow closed with the shutdown code.
    let err = remote_end.recv().await.unwrap_err();
    assert_eq!(err.reset_code(), Some(ResetCode::ShuttingDown), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material() {
    let dir = std::env::temp_dir().join(format!("grinta-bad-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // No TLS at all.
    let err = Fabric::builder("node-a").start().unwrap_err();
    assert!(
        matches!(err.tls_error(), Some(TlsError::NotConfigured)),
        "{err:?}"
    );
    assert!(err.to_string().contains("tls_pem_files"), "{err}");

    // Files that do not exist.
    let err = Fabric::builder("node-a")
        .tls_pem_files(dir.join("ca.pem"), dir.join("a.pem"), dir.join("a.key"))
        .start()
        .unwrap_err();
    assert!(
        matches!(err.tls_error(), Some(TlsError::Read { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca.pem"), "{err}");

    // Files that hold no PEM material.
    for f in ["ca.pem", "a.pem", "a.key"] {
        std::fs::write(dir.join(f), "not a certificate\n").unwrap();
    }
    let err = Fabric::builder("node-a")
        .tls_pem_files(dir.join("ca.pem"), dir.join("a.pem"), dir.join("a.key"))
        .start()
        .unwrap_err();
    assert!(err.tls_error().is_some(), "{err:?}");

    // A certificate issued for another node name.
    let ca = DevCa::new().unwrap();
    let other: TlsConfig = ca.issue("node-b").unwrap();
    let err = Fabric::builder("node-a").tls(other).start().unwrap_err();
    assert!(
        matches!(err.tls_error(), Some(TlsError::NameMismatch { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("DNS SAN must be the node name"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Started outside a tokio runtime, a fabric fails with an error that says so; nothing panics.
#[test]
fn started_outside_a_tokio_runtime() {
    let ca = DevCa::new().unwrap();
    let err = Fabric::builder("node-a")
        .dev_certificates(&ca)
        .start()
        .unwrap_err();
    assert!(matches!(err, Error::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains("no tokio runtime"), "{err}");
}

/// At the flow limit, dropping a flow makes room for the very next dial: the drop is handed to the
/// node by the driver, and a dial hands over what was dropped before it counts the flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_flow_frees_its_room_for_the_next_dial() {
    let ca = DevCa::new().unwrap();
    // Only the dialling node is limited; the owner holds every flow it accepts.
    let a = builder(&ca, "node-a")
        .flow_limits(FlowLimits {
            max_flows: 4,
            ..FlowLimits::default()
        })
        .start()
        .unwrap();
    let b = builder(&ca, "node-b").seed(a.local_addr()).start().unwrap();
    let endpoint = b.endpoint("echo").unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok(flow) = endpoint.accept().await {
            held.push(flow);
        }
    });
    until(|| a.endpoints("echo").len() == 1).await;
    let mut flows = Vec::new();
    for _ in 0..4 {
        flows.push(a.dial("echo").await.expect("dial under the limit"));
    }
    let err = a
        .dial("echo")
        .await
        .expect_err("a fifth flow is over the limit");
    assert!(
        matches!(err.flow_error(), Some(FlowError::LimitReached { .. })),
        "{err:?}"
    );
    for _ in 0..100 {
        drop(flows.pop());
        flows.push(a.dial("echo").await.expect("the dropped flow's room"));
    }
}
