//! Property tests of the membership rules: whatever the order in which alive, suspect and dead news
//! about a member arrive, its incarnation is the highest it claimed itself, accusations alone never
//! make it Dead, and no input makes a node list itself.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use grinta_proto::claims::{self, ClaimKind, TrustAll};
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

fn unsigned(kind: ClaimKind, claim: &impl Message) -> wire::Signed {
    claims::sign(&TrustAll, kind, claim.encode_to_vec(), false).unwrap()
}

fn accuser_alive(accuser: u8) -> Vec<u8> {
    use wire::broadcast::Kind;
    let alive = wire::Alive {
        node: format!("accuser-{accuser}"),
        incarnation: 1,
        addr: Some(wire::SocketAddress {
            ip: Bytes::from_static(&[127, 0, 0, 10]),
            port: 7000 + u32::from(accuser),
        }),
        meta: Bytes::new(),
    };
    wire::Packet {
        sender: "gossiper".into(),
        message: None,
        broadcasts: vec![wire::Broadcast {
            kind: Some(Kind::Alive(unsigned(ClaimKind::Alive, &alive))),
        }],
    }
    .encode_to_vec()
}

fn packet(news: &News) -> Vec<u8> {
    use wire::broadcast::Kind;
    let kind = match news {
        News::Alive(inc) => Kind::Alive(unsigned(
            ClaimKind::Alive,
            &wire::Alive {
                node: "m".into(),
                incarnation: *inc,
                addr: Some(wire::SocketAddress {
                    ip: Bytes::from_static(&[127, 0, 0, 9]),
                    port: 7000,
                }),
                meta: Bytes::new(),
            },
        )),
        News::Suspect(inc, from) => Kind::Suspect(unsigned(
            ClaimKind::Suspect,
            &wire::Suspect {
                node: "m".into(),
                incarnation: *inc,
                from: format!("accuser-{from}"),
            },
        )),
        News::Dead(inc, from) => Kind::Dead(unsigned(
            ClaimKind::Dead,
            &wire::Dead {
                node: "m".into(),
                incarnation: *inc,
                from: format!("accuser-{from}"),
            },
        )),
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
        Box::new(TrustAll),
    )
    .unwrap();
    // The accusers are members: accusations count only from current members.
    for accuser in 0..4u8 {
        node.handle_datagram(t0, from, &accuser_alive(accuser));
    }
    node.handle_datagram(t0, from, &packet(&News::Alive(first_alive)));
    for item in items {
        node.handle_datagram(t0, from, &packet(item));
    }
    node.member("m").map(|m| (m.state, m.incarnation))
}

/// The view the rules imply: the incarnation is the highest the member itself claimed (an
/// accusation never raises it); the member is Suspect if an accusation at that incarnation
/// arrived after the alive that brought it, Alive otherwise. On the word of others it is never
/// Dead: only this node's own suspicion timer declares that.
fn expected(first_alive: u64, items: &[News]) -> (MemberState, u64) {
    let mut view = (MemberState::Alive, first_alive);
    for item in items {
        match item {
            News::Alive(i) if *i > view.1 => view = (MemberState::Alive, *i),
            News::Suspect(i, _) | News::Dead(i, _) if *i == view.1 => view.0 = MemberState::Suspect,
            _ => {}
        }
    }
    view
}

proptest! {
    #[test]
    fn accusations_never_raise_an_incarnation_nor_kill_on_their_own(
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
        // The incarnation does not depend on the order: it is the highest alive.
        let highest = items
            .iter()
            .filter_map(|n| match n { News::Alive(i) => Some(*i), _ => None })
            .fold(first, u64::max);
        prop_assert_eq!(a.map(|v| v.1), Some(highest));
        prop_assert_eq!(b.map(|v| v.1), Some(highest));
        prop_assert_eq!(a, Some(expected(first, &items)));
        prop_assert_eq!(b, Some(expected(first, &shuffled)));
    }

    #[test]
    fn no_input_makes_a_node_list_itself(
        items in proptest::collection::vec(any::<Vec<u8>>(), 0..20),
    ) {
        let t0 = Instant::now();
        let from: SocketAddr = "127.0.0.1:7999".parse().unwrap();
        let mut node = Membership::new(Config::lan(), "m", "127.0.0.1:7001".parse().unwrap(), 1, t0, Box::new(TrustAll)).unwrap();
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
