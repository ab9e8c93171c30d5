//! Nodes as separate processes on 127.0.0.1: one is killed with SIGKILL, the others declare it
//! Dead and their flows to it fail, without hanging.
//!
//! The child processes are this test binary itself, re-run with `GRINTA_NODE_ROLE` set, in which
//! case the ignored `node_process` test acts as one node and reports what it sees on stdout.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use grinta_proto::membership::{self, Config};
use grinta_proto::node::{DEFAULT_MAX_PACKET_SIZE, NodeConfig};
use grinta_proto::tls::TlsConfig;
use grinta_proto::tls::dev::DevCa;

const NODES: usize = 3;

fn spawn_node(role: usize, addrs: &str, certs: &str, tx: mpsc::Sender<(usize, String)>) -> Child {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "node_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GRINTA_NODE_ROLE", role.to_string())
        .env("GRINTA_ADDRS", addrs)
        .env("GRINTA_CERTS", certs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn node process");
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((role, line)).is_err() {
                break;
            }
        }
    });
    child
}

/// Kills every child process when dropped, so a failing test leaves none behind.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded) until `pred` has seen every line it needs.
fn wait_lines(
    rx: &mpsc::Receiver<(usize, String)>,
    limit: Duration,
    mut pred: impl FnMut(usize, &str) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((role, line)) => {
                if pred(role, &line) {
                    return;
                }
            }
            Err(_) => panic!("timed out after {limit:?} waiting for node processes"),
        }
    }
}

#[test]
fn a_killed_process_is_declared_dead_and_its_flows_fail() {
    if std::env::var("GRINTA_NODE_ROLE").is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("grinta-processes-{}", std::process::id()));
    let names: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    DevCa::new().unwrap().write_to_dir(&dir, &refs).unwrap();
    let addrs: Vec<String> = (0..NODES)
        .map(|_| {
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        })
        .collect();
    let addrs = addrs.join(",");
    let (tx, rx) = mpsc::channel();
    let mut children = Children(
        (0..NODES)
            .map(|i| spawn_node(i, &addrs, dir.to_str().unwrap(), tx.clone()))
            .collect(),
    );
    let children = &mut children.0;
    // Both clients have an open flow to node-2's endpoint.
    let mut open = [false; NODES];
    wait_lines(&rx, Duration::from_secs(60), |role, line| {
        // The test harness may print its progress on the same line.
        if line.contains("FLOW_OPEN") {
            open[role] = true;
        }
        open[0] && open[1]
    });
    children[2].kill().expect("SIGKILL node-2");
    let _ = children[2].wait();
    let mut dead = [false; 2];
    let mut failed = [false; 2];
    wait_lines(&rx, Duration::from_secs(60), |role, line| {
        if role < 2 {
            dead[role] |= line.contains("DEAD node-2");
            failed[role] |= line.contains("FLOW_FAILED");
        }
        dead == [true, true] && failed == [true, true]
    });
    for child in &mut children[..2] {
        let status = child.wait().expect("child exits");
        assert!(status.success(), "{status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One node process (only when run by the test above).
#[test]
#[ignore = "a child process of a_killed_process_is_declared_dead_and_its_flows_fail"]
fn node_process() {
    let Ok(role) = std::env::var("GRINTA_NODE_ROLE") else {
        return;
    };
    let role: usize = role.parse().expect("role");
    let addrs: Vec<SocketAddr> = std::env::var("GRINTA_ADDRS")
        .expect("addresses")
        .split(',')
        .map(|a| a.parse().expect("address"))
        .collect();
    let certs = std::path::PathBuf::from(std::env::var("GRINTA_CERTS").expect("certificates"));
    let name = format!("node-{role}");
    let tls = TlsConfig::from_pem_files(
        certs.join("ca.pem"),
        certs.join(format!("{name}.pem")),
        certs.join(format!("{name}.key")),
    )
    .expect("PEM files");
    let mut config = NodeConfig::new(&name, addrs[role], tls);
    config.membership = Config::local();
    config.membership.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
    config.seeds = addrs
        .iter()
        .copied()
        .filter(|a| *a != addrs[role])
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        let fabric = grinta_tokio::start(config).expect("node starts");
        if role == 2 {
            let echo = fabric.endpoint("echo").expect("endpoint");
            while let Ok(mut flow) = echo.accept().await {
                tokio::spawn(async move {
                    while let Ok(Some(m)) = flow.recv().await {
                        let _ = flow.send(m).await;
                    }
                });
            }
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(50);
        while fabric.endpoints("echo").is_empty() {
            assert!(Instant::now() < deadline, "name never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut flow = fabric.dial("echo").await.expect("dial");
        flow.send(b"ping".to_vec()).await.expect("send");
        assert_eq!(
            flow.recv().await.expect("recv").as_deref(),
            Some(&b"ping"[..])
        );
        println!("FLOW_OPEN");
        let watcher = fabric.clone();
        let dead = tokio::spawn(async move {
            loop {
                if let Ok(membership::Event::MemberDead { name, .. }) =
                    watcher.next_member_event().await
                {
                    if name == "node-2" {
                        println!("DEAD node-2");
                        return;
                    }
                }
            }
        });
        let failed = tokio::time::timeout(Duration::from_secs(45), flow.recv()).await;
        match failed {
            Ok(Err(e)) => println!("FLOW_FAILED {e}"),
            other => panic!("the flow did not fail: {other:?}"),
        }
        tokio::time::timeout(Duration::from_secs(45), dead)
            .await
            .expect("dead in time")
            .expect("task");
    });
    std::process::exit(0);
}
