//! The driver thread of a node ends when the node's last handle is dropped: no thread is left
//! behind. (Alone in its test binary, so that no other node's thread is counted.)

use std::time::{Duration, Instant};

use grinta_async_std::DevCa;
use grinta_async_std::{Fabric, Profile};

/// Threads of this process named after the adapter's driver thread.
fn driver_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "grinta-driver")
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn dropping_the_last_handle_ends_the_driver_thread() {
    let ca = DevCa::new().expect("dev CA");
    let fabric = Fabric::builder("node-a")
        .bind("127.0.0.1:0".parse().expect("address"))
        .dev_certificates(&ca)
        .profile(Profile::Local)
        .start()
        .expect("node starts");
    let endpoint = fabric.endpoint("svc").expect("endpoint");
    // The thread names itself as it starts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while driver_threads() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(driver_threads(), 1);
    let addr = fabric.local_addr();
    drop(fabric);
    // An endpoint is a handle too: the node still runs.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(driver_threads(), 1, "the endpoint keeps the node running");
    drop(endpoint);
    let deadline = Instant::now() + Duration::from_secs(5);
    while driver_threads() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(driver_threads(), 0, "the driver thread ended");
    assert!(
        std::net::UdpSocket::bind(addr).is_ok(),
        "the socket is closed"
    );
}
