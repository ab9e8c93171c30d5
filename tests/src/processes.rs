//! Nodes as separate processes on 127.0.0.1, written once for any [`Runtime`]: one is killed with
//! SIGKILL, the others declare it Dead and their flows to it fail, without hanging.
//!
//! [`a_killed_process_is_declared_dead`] runs in the test process: it starts three child
//! processes, which are the test binary itself re-run with `GRINTA_NODE_ROLE` set so that its
//! ignored `node_process` test calls [`node_process`] under the runtime named by
//! `GRINTA_RUNTIME`. Each child reports what it sees on stdout.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use grinta_proto::fabric::{Fabric, Profile, Runtime};
use grinta_proto::membership;
use grinta_proto::tls::TlsConfig;
use grinta_proto::tls::dev::DevCa;

use crate::real_sockets::{sleep, spawn, within};

const NODES: usize = 3;

/// The environment of a child process: its role, the runtime it runs on, everyone's addresses and
/// the directory of the certificates.
#[derive(Debug, Clone)]
pub struct NodeRole {
    /// Which node (0..3); node 2 serves `echo` and is killed.
    pub role: usize,
    /// The runtime, as given to [`a_killed_process_is_declared_dead`].
    pub runtime: String,
    addrs: Vec<SocketAddr>,
    certs: std::path::PathBuf,
}

impl NodeRole {
    /// The role this process was started with, if it is a child.
    pub fn from_env() -> Option<Self> {
        let role = std::env::var("GRINTA_NODE_ROLE").ok()?.parse().ok()?;
        Some(Self {
            role,
            runtime: std::env::var("GRINTA_RUNTIME").ok()?,
            addrs: std::env::var("GRINTA_ADDRS")
                .ok()?
                .split(',')
                .map(|a| a.parse().expect("address"))
                .collect(),
            certs: std::env::var("GRINTA_CERTS").ok()?.into(),
        })
    }
}

fn spawn_node(
    role: usize,
    runtime: &str,
    addrs: &str,
    certs: &str,
    tx: mpsc::Sender<(usize, String)>,
) -> Child {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "node_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GRINTA_NODE_ROLE", role.to_string())
        .env("GRINTA_RUNTIME", runtime)
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

/// Starts three node processes on `runtime`, waits until both clients have an open flow to node
/// 2's `echo`, SIGKILLs node 2, then checks that both clients declare it Dead, that their flows
/// fail, and that they exit cleanly.
pub fn a_killed_process_is_declared_dead(runtime: &str) {
    let dir =
        std::env::temp_dir().join(format!("grinta-processes-{runtime}-{}", std::process::id()));
    let names: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    DevCa::new()
        .expect("dev CA")
        .write_to_dir(&dir, &refs)
        .expect("certificates written");
    let addrs: Vec<String> = (0..NODES)
        .map(|_| {
            UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("free port")
                .to_string()
        })
        .collect();
    let addrs = addrs.join(",");
    let certs = dir.to_str().expect("UTF-8 temporary directory");
    let (tx, rx) = mpsc::channel();
    let mut children = Children(
        (0..NODES)
            .map(|i| spawn_node(i, runtime, &addrs, certs, tx.clone()))
            .collect(),
    );
    let children = &mut children.0;
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

/// The body of one node process, on runtime `R`: node 2 serves `echo`; nodes 0 and 1 open a flow
/// to it, print `FLOW_OPEN`, then print `DEAD node-2` and `FLOW_FAILED` as they see them.
pub async fn node_process<R: Runtime>(me: NodeRole) {
    let name = format!("node-{}", me.role);
    let tls = TlsConfig::from_pem_files(
        me.certs.join("ca.pem"),
        me.certs.join(format!("{name}.pem")),
        me.certs.join(format!("{name}.key")),
    )
    .expect("PEM files");
    let own = me.addrs[me.role];
    let fabric = Fabric::<R>::builder(&name)
        .bind(own)
        .tls(tls)
        .profile(Profile::Local)
        .seeds(me.addrs.iter().copied().filter(|a| *a != own))
        .start()
        .expect("node starts");
    if me.role == 2 {
        let echo = fabric.endpoint("echo").expect("endpoint");
        while let Ok(mut flow) = echo.accept().await {
            drop(spawn::<R, _>(async move {
                while let Ok(Some(m)) = flow.recv().await {
                    let _ = flow.send(m).await;
                }
            }));
        }
        return;
    }
    let named = within::<R, _>(Duration::from_secs(50), async {
        while fabric.endpoints("echo").is_empty() {
            sleep::<R>(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(named.is_some(), "the name echo never arrived");
    let mut flow = fabric.dial("echo").await.expect("dial");
    flow.send(b"ping".to_vec()).await.expect("send");
    assert_eq!(
        flow.recv().await.expect("recv").as_deref(),
        Some(&b"ping"[..])
    );
    println!("FLOW_OPEN");
    let watcher = fabric.clone();
    let dead = spawn::<R, _>(async move {
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
    match within::<R, _>(Duration::from_secs(45), flow.recv()).await {
        Some(Err(e)) => println!("FLOW_FAILED {e}"),
        other => panic!("the flow did not fail: {other:?}"),
    }
    within::<R, _>(Duration::from_secs(45), dead)
        .await
        .expect("dead in time")
        .expect("watcher task");
}
