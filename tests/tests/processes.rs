//! The multi-process scenario of `grinta_tests::processes` under tokio and async-std: three node
//! processes on 127.0.0.1, one killed with SIGKILL.

use grinta_async_std::AsyncIo;
use grinta_tests::processes::{self, NodeRole};
use grinta_tokio::Tokio;

#[test]
fn tokio_a_killed_process_is_declared_dead_and_its_flows_fail() {
    if NodeRole::from_env().is_none() {
        processes::a_killed_process_is_declared_dead("tokio");
    }
}

#[test]
fn async_std_a_killed_process_is_declared_dead_and_its_flows_fail() {
    if NodeRole::from_env().is_none() {
        processes::a_killed_process_is_declared_dead("async-std");
    }
}

/// One node process: only does something when started by one of the tests above.
#[test]
#[ignore = "a child process of the tests above"]
fn node_process() {
    let Some(me) = NodeRole::from_env() else {
        return;
    };
    match me.runtime.as_str() {
        "tokio" => tokio::runtime::Runtime::new()
            .expect("tokio runtime")
            .block_on(processes::node_process::<Tokio>(me)),
        "async-std" => async_std::task::block_on(processes::node_process::<AsyncIo>(me)),
        other => panic!("unknown runtime {other}"),
    }
    std::process::exit(0);
}
