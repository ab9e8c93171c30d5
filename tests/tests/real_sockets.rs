//! The real-socket scenarios of `grinta_tests::real_sockets`, each under tokio and async-std.

use grinta_async_std::AsyncIo;
use grinta_tests::real_sockets as scenario;
use grinta_tokio::Tokio;

macro_rules! on_both_runtimes {
    ($($name:ident),* $(,)?) => {
        mod tokio_runtime {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::scenario::$name::<super::Tokio>().await;
                }
            )*
        }
        mod async_std_runtime {
            $(
                #[async_std::test]
                async fn $name() {
                    super::scenario::$name::<super::AsyncIo>().await;
                }
            )*
        }
    };
}

on_both_runtimes!(
    three_nodes_exchange_messages_and_detect_a_crash,
    graceful_shutdown_shows_as_left_and_ends_flows,
    a_restarted_peer_is_reached_again,
);
