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
    dropped_dials_leave_nothing_behind,
    a_burst_of_a_thousand_dials_is_accepted,
    dropping_every_handle_stops_the_node,
    shutdown_lets_open_flows_finish,
    every_handle_sees_every_member_event,
    an_endpoint_is_a_stream_of_flows_until_closed,
    wait_for_returns_when_a_name_spreads,
    tags_are_seen_everywhere_and_restrict_dials,
    watches_and_monitors_follow_the_cluster,
    queries_reach_every_matching_handler,
    the_key_value_table_is_shared_and_watched,
    requests_get_one_reply_each,
    datagrams_arrive_and_never_block,
    topics_reach_every_subscriber,
    send_many_delivers_batches_in_order,
    jumbo_packets_carry_a_bulk_flow_over_loopback,
);
