//! Property tests of the membership rules: the final view of a member does not depend on the order in
//! which alive, suspect and dead news about it arrive, and no input makes a node list itself.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use grinta_proto::membership::{Config, MemberState, Membership};
use grinta_proto::wire;
use proptest::prelude::*;
use prost::Message;

#[derive(Debug, Clone)]
enum News {
    Alive(u64),
    Suspect(u64, u8),
    Dead(u64, u8),
}

fn news() -> impl Strategy<Value = News> {
    prop_oneof![
        (1u64..6).prop_map(News::Alive),
        (1u64..6, 0u8..4).prop_map(|(i, f)| News::Suspect(i, f)),
        (1u64..6, 0u8..4).prop_map(|(i, f)| News::Dead(i, f)),
    ]
}

fn packet(news: &News) -> Vec<u8> {
    use wire::broadcast::Kind;
    let kind = match news {
        News::Alive(inc) => Kind::Alive(wire::Alive {
            node: "m".into(),
            incarnation: *inc,
            addr: Some(wire::SocketAddress {
                ip: Bytes::from_static(&[127, 0, 0, 9]),
                port: 7000,
            }),
            meta: Bytes::new(),
        }),
        News::Suspect(inc, from) => Kind::Suspect(wire::Suspect {
            node: "m".into(),
            incarnation: *inc,
            from: format!("accuser-{from}"),
        }),
        News::Dead(inc, from) => Kind::Dead(wire::Dead {
            node: "m".into(),
            incarnation: *inc,
            from: format!("accuser-{from}"),
        }),
    };
    wire::Packet {
        sender: "gossiper".into(),
        message: None,
        broadcasts: vec![wire::Broadcast { kind: Some(kind) }],
    }
    .encode_to_vec()
}

fn final_view(first_alive: u64, items: &[News]) -> Option<(MemberState, u64)> {
    let t0 = Instant::now();
    let from: SocketAddr = "127.0.0.1:7999".parse().unwrap();
    let mut node = Membership::new(
        Config::lan(),
        "observer",
        "127.0.0.1:7001".parse().unwrap(),
        1,
        t0,
    )
    .unwrap();
    node.handle_datagram(t0, from, &packet(&News::Alive(first_alive)));
    for item in items {
        node.handle_datagram(t0, from, &packet(item));
    }
    node.member("m").map(|m| (m.state, m.incarnation))
}

/// The view the rules imply: the highest incarnation wins; at equal incarnation Dead beats Suspect
/// beats Alive; once Dead, only a strictly newer Alive brings it back.
fn expected(first_alive: u64, items: &[News]) -> (MemberState, u64) {
    let rank = |s: MemberState| match s {
        MemberState::Alive => 0,
        MemberState::Suspect => 1,
        _ => 2,
    };
    let mut best = (MemberState::Alive, first_alive);
    for item in items {
        let candidate = match item {
            News::Alive(i) => (MemberState::Alive, *i),
            News::Suspect(i, _) => (MemberState::Suspect, *i),
            News::Dead(i, _) => (MemberState::Dead, *i),
        };
        if (candidate.1, rank(candidate.0)) > (best.1, rank(best.0)) {
            best = candidate;
        }
    }
    best
}

proptest! {
    #[test]
    fn member_view_is_independent_of_arrival_order(
        first in 1u64..3,
        items in proptest::collection::vec(news(), 0..12),
        shuffle_seed in any::<u64>(),
    ) {
        let mut shuffled = items.clone();
        // Deterministic shuffle from the seed.
        let mut x = shuffle_seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let a = final_view(first, &items);
        let b = final_view(first, &shuffled);
        prop_assert_eq!(a, b);
        prop_assert_eq!(a, Some(expected(first, &items)));
    }

    #[test]
    fn no_input_makes_a_node_list_itself(
        items in proptest::collection::vec(any::<Vec<u8>>(), 0..20),
    ) {
        let t0 = Instant::now();
        let from: SocketAddr = "127.0.0.1:7999".parse().unwrap();
        let mut node = Membership::new(Config::lan(), "m", "127.0.0.1:7001".parse().unwrap(), 1, t0).unwrap();
        for bytes in &items {
            node.handle_datagram(t0, from, bytes);
            node.handle_stream(t0, from, bytes);
        }
        // News about itself in every form.
        for news in [News::Alive(9), News::Suspect(9, 1), News::Dead(9, 1)] {
            node.handle_datagram(t0, from, &packet(&news));
        }
        prop_assert!(node.member("m").is_none());
        prop_assert!(node.incarnation() >= 10, "refuted with a higher incarnation");
    }
}
