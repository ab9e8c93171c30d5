//! Application datagrams: unreliable, unordered messages to an endpoint, in QUIC DATAGRAM frames.
//!
//! A datagram travels on the connection between two nodes, which membership packets share, as
//! the byte [`APP_DATAGRAM_TAG`] followed by a `grinta.v1.AppDatagram`. Membership keeps
//! priority: an application datagram is sent only while the connection's datagram buffer has
//! room to spare ([`APP_DATAGRAM_HEADROOM`]), and is dropped (and counted) otherwise, so a
//! sender is never blocked and never crowds out probes. A receiving node queues at most
//! [`DATAGRAM_QUEUE`] datagrams ([`DATAGRAM_QUEUE_BYTES`] of payload) per endpoint for its
//! application; beyond that it drops them.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use hashbrown::HashMap;

use crate::registry::validate_endpoint_name;

/// The first byte of an application datagram; a membership packet never starts with it.
pub const APP_DATAGRAM_TAG: u8 = 0xFF;

/// The largest payload of an application datagram, in bytes, whatever the endpoint's name: the
/// datagram, its endpoint name and framing fit the 1,100-byte membership packet budget, which
/// every path between nodes carries.
pub const MAX_DATAGRAM_SIZE: usize = 960;

/// The most bytes an application datagram takes framed ([`encode`]): the largest payload, the
/// longest endpoint name and their framing fit the membership packet budget.
pub const MAX_ENCODED_LEN: usize = crate::node::MEMBERSHIP_PACKET_BUDGET;

/// Datagrams queued per local endpoint for the application; beyond it they are dropped. One
/// round of the node's driver may bring several thousand (GRO batches of a busy sender), and a
/// reader sharing its threads with the driver may run only every few milliseconds, so the queue
/// holds about ten milliseconds of 64-byte datagrams at three million a second. The queue also
/// holds at most [`DATAGRAM_QUEUE_BYTES`] of payload.
pub const DATAGRAM_QUEUE: usize = 32768;

/// Bytes of payload queued per local endpoint for the application; beyond it datagrams are
/// dropped (2,184 of the largest datagrams; 32,768 of 64 bytes). With each datagram's sender
/// name and bookkeeping (about 90 bytes), a full queue holds at most about 5 MiB, and the
/// endpoint's reader at most 4,096 more datagrams it took from it.
pub const DATAGRAM_QUEUE_BYTES: usize = 2 << 20;

/// Bytes of a connection's datagram send buffer kept for membership: an application datagram
/// is dropped rather than use them.
pub const APP_DATAGRAM_HEADROOM: usize = 64 * 1024;

/// `FlowError::MessageTooLarge` for a payload of `len` bytes beyond [`MAX_DATAGRAM_SIZE`].
pub fn check_size(len: usize) -> Result<(), crate::flow::FlowError> {
    if len > MAX_DATAGRAM_SIZE {
        return Err(crate::flow::FlowError::MessageTooLarge {
            size: len as u64,
            limit: MAX_DATAGRAM_SIZE as u64,
        });
    }
    Ok(())
}

/// Frames a datagram for `endpoint`: the tag, then the `AppDatagram` fields written in place
/// (the bytes prost writes, without first copying the name into a message).
pub fn encode(endpoint: &str, payload: Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(encoded_len(endpoint, payload.len()));
    out.put_u8(APP_DATAGRAM_TAG);
    for (tag, bytes) in [(1, endpoint.as_bytes()), (2, &payload[..])] {
        // proto3: empty fields are not written.
        if !bytes.is_empty() {
            crate::wire::put_delimited(tag, bytes, &mut out);
        }
    }
    out.freeze()
}

/// The length of what [`encode`] makes of `endpoint` and a payload of `payload_len` bytes.
pub fn encoded_len(endpoint: &str, payload_len: usize) -> usize {
    let field = |tag, len: usize| {
        if len == 0 {
            0
        } else {
            crate::wire::delimited_len(tag, len)
        }
    };
    1 + field(1, endpoint.len()) + field(2, payload_len)
}

/// Reads a datagram framed by [`encode`]: its endpoint name (read in place) and payload (a
/// slice of `data`); `None` if it is not one, or not valid.
pub fn decode(data: &Bytes) -> Option<(&str, Bytes)> {
    use crate::wire::FieldInPlace;
    let body = data.strip_prefix(&[APP_DATAGRAM_TAG])?;
    let (mut endpoint, mut payload): (&str, &[u8]) = ("", &[]);
    // What fails a full decode fails here: a field of another wire type under either tag, a
    // name (any occurrence of it) that is not UTF-8.
    let mut valid = true;
    crate::wire::fields_in_place(body, |tag, field| match (tag, field) {
        (1, FieldInPlace::Bytes(bytes)) => match std::str::from_utf8(bytes) {
            Ok(name) => endpoint = name,
            Err(_) => valid = false,
        },
        (2, FieldInPlace::Bytes(bytes)) => payload = bytes,
        (1 | 2, _) => valid = false,
        _ => {}
    })?;
    if !valid {
        return None;
    }
    validate_endpoint_name(endpoint).ok()?;
    if payload.len() > MAX_DATAGRAM_SIZE {
        return None;
    }
    Some((endpoint, data.slice_ref(payload)))
}

/// Whether `data` is an application datagram (rather than a membership packet).
pub fn is_app_datagram(data: &[u8]) -> bool {
    data.first() == Some(&APP_DATAGRAM_TAG)
}

/// Counters of application datagrams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatagramStats {
    /// Datagrams handed to a connection (or delivered in-process).
    pub sent: u64,
    /// Datagrams not sent: no connection, or its buffer had no room to spare for them.
    pub dropped_sending: u64,
    /// Datagrams queued for a local endpoint.
    pub received: u64,
    /// Datagrams that arrived and were dropped: no such endpoint here, its queue full, or not
    /// valid.
    pub dropped_receiving: u64,
}

/// The datagrams waiting for this node's endpoints.
#[derive(Debug, Default)]
pub struct Datagrams {
    queues: HashMap<String, Queue>,
    stats: DatagramStats,
}

/// The datagrams waiting for one endpoint.
#[derive(Debug, Default)]
struct Queue {
    datagrams: VecDeque<(String, Bytes)>,
    /// Bytes of payload in `datagrams`.
    bytes: usize,
}

impl Queue {
    fn pop(&mut self) -> Option<(String, Bytes)> {
        let datagram = self.datagrams.pop_front()?;
        self.bytes -= datagram.1.len();
        Some(datagram)
    }
}

/// What [`Datagrams::deliver`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued behind others: whoever reads the endpoint already knows there is something.
    Queued,
    /// Queued in an empty queue: a reader waiting for the endpoint must be told.
    First,
    /// Dropped (counted): the endpoint's queue is full.
    Dropped,
}

impl Delivery {
    /// Whether the datagram was queued.
    pub fn is_queued(self) -> bool {
        self != Self::Dropped
    }
}

impl Datagrams {
    /// Queues a datagram from node `from` for local endpoint `endpoint`; dropped (counted) if
    /// its queue is full.
    pub fn deliver(&mut self, endpoint: &str, from: &str, payload: Bytes) -> Delivery {
        // An endpoint's queue stays until it closes, so a steady stream allocates no key.
        let queue = match self.queues.get_mut(endpoint) {
            Some(queue) => queue,
            None => self.queues.entry_ref(endpoint).or_default(),
        };
        if queue.datagrams.len() >= DATAGRAM_QUEUE
            || queue.bytes + payload.len() > DATAGRAM_QUEUE_BYTES
        {
            self.stats.dropped_receiving += 1;
            return Delivery::Dropped;
        }
        let first = queue.datagrams.is_empty();
        queue.bytes += payload.len();
        // A received payload shares the buffer of its whole receive (up to 64 KiB of coalesced
        // packets): copied, a queued datagram holds its own bytes only, and the byte bound is
        // the memory held.
        let payload = Bytes::copy_from_slice(&payload);
        queue.datagrams.push_back((from.to_owned(), payload));
        self.stats.received += 1;
        if first {
            Delivery::First
        } else {
            Delivery::Queued
        }
    }

    /// The next datagram for `endpoint`: the sending node's name and the payload.
    pub fn recv(&mut self, endpoint: &str) -> Option<(String, Bytes)> {
        self.queues.get_mut(endpoint)?.pop()
    }

    /// Moves up to `max` datagrams waiting for `endpoint` to the end of `into`; returns how
    /// many.
    pub fn recv_batch(
        &mut self,
        endpoint: &str,
        into: &mut VecDeque<(String, Bytes)>,
        max: usize,
    ) -> usize {
        let Some(queue) = self.queues.get_mut(endpoint) else {
            return 0;
        };
        let n = queue.datagrams.len().min(max);
        if n == queue.datagrams.len() {
            queue.bytes = 0;
            into.append(&mut queue.datagrams);
        } else {
            for _ in 0..n {
                into.extend(queue.pop());
            }
        }
        n
    }

    /// Drops what waits for `endpoint` (it was closed).
    pub fn close(&mut self, endpoint: &str) {
        self.queues.remove(endpoint);
    }

    /// Counts a datagram sent, or dropped before it was.
    pub fn count_sent(&mut self, sent: bool) {
        if sent {
            self.stats.sent += 1;
        } else {
            self.stats.dropped_sending += 1;
        }
    }

    /// Counts `sent` datagrams sent of `offered`, the others dropped before they were.
    pub fn count_sent_batch(&mut self, sent: usize, offered: usize) {
        self.stats.sent += sent as u64;
        self.stats.dropped_sending += offered.saturating_sub(sent) as u64;
    }

    /// Counts `n` datagrams dropped before they were sent.
    pub fn count_dropped_sending(&mut self, n: u64) {
        self.stats.dropped_sending += n;
    }

    /// Counts a datagram dropped on arrival.
    pub fn count_dropped(&mut self) {
        self.stats.dropped_receiving += 1;
    }

    /// The counters.
    pub fn stats(&self) -> DatagramStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::wire;

    #[test]
    fn datagrams_round_trip_and_other_bytes_are_refused() {
        let framed = encode("svc", Bytes::from_static(b"hi"));
        assert!(is_app_datagram(&framed));
        assert_eq!(decode(&framed), Some(("svc", Bytes::from_static(b"hi"))));
        // A membership packet is never taken for one.
        let packet = wire::Packet {
            sender: "node-a".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(!is_app_datagram(&packet));
        assert_eq!(decode(&Bytes::from(packet)), None);
        assert_eq!(
            decode(&Bytes::from_static(&[APP_DATAGRAM_TAG, 0xff, 0xff])),
            None
        );
        assert_eq!(decode(&encode("bad name", Bytes::new())), None);
        assert_eq!(
            decode(&encode(
                "svc",
                Bytes::from(vec![0u8; MAX_DATAGRAM_SIZE + 1])
            )),
            None
        );
        assert_eq!(decode(&Bytes::new()), None);
    }

    /// What a full decode with prost makes of `data`: the reference `decode` must agree with.
    fn decode_with_prost(data: &Bytes) -> Option<(String, Bytes)> {
        let body = data.strip_prefix(&[APP_DATAGRAM_TAG])?;
        let message = wire::AppDatagram::decode(body).ok()?;
        validate_endpoint_name(&message.endpoint).ok()?;
        (message.payload.len() <= MAX_DATAGRAM_SIZE).then_some((message.endpoint, message.payload))
    }

    proptest::proptest! {
        /// Any bytes at all: the in-place read accepts exactly what prost accepts, and reads the
        /// same name and payload.
        #[test]
        fn decode_agrees_with_prost_on_any_bytes(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut data = vec![APP_DATAGRAM_TAG];
            data.extend_from_slice(&body);
            let data = Bytes::from(data);
            let ours = decode(&data).map(|(e, p)| (e.to_owned(), p));
            proptest::prop_assert_eq!(ours, decode_with_prost(&data));
        }

        /// Datagrams with fields repeated, reordered, of the wrong type, not UTF-8, and unknown
        /// ones mixed in (as a newer peer may send).
        #[test]
        fn decode_agrees_with_prost_on_unusual_encodings(
            fields in proptest::collection::vec(
                (0u32..7, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8)),
                0..6,
            ),
        ) {
            use prost::encoding::{WireType, encode_key, encode_varint};
            let mut data = vec![APP_DATAGRAM_TAG];
            for (tag, bytes) in &fields {
                match tag {
                    0 => {
                        encode_key(9, WireType::Varint, &mut data);
                        encode_varint(bytes.len() as u64, &mut data);
                    }
                    // A fixed-width field under the name's or the payload's tag.
                    5 | 6 => {
                        encode_key(tag - 4, WireType::SixtyFourBit, &mut data);
                        data.extend_from_slice(&[0; 8]);
                    }
                    tag => {
                        encode_key(*tag, WireType::LengthDelimited, &mut data);
                        encode_varint(bytes.len() as u64, &mut data);
                        data.extend_from_slice(bytes);
                    }
                }
            }
            let data = Bytes::from(data);
            let ours = decode(&data).map(|(e, p)| (e.to_owned(), p));
            proptest::prop_assert_eq!(ours, decode_with_prost(&data));
        }
    }

    #[test]
    fn encode_writes_what_prost_writes() {
        for (endpoint, payload) in [
            ("svc", vec![1u8; 64]),
            ("a", Vec::new()),
            ("telemetry.cpu", vec![7u8; MAX_DATAGRAM_SIZE]),
        ] {
            let message = wire::AppDatagram {
                endpoint: endpoint.to_owned(),
                payload: Bytes::from(payload.clone()),
            };
            let mut expected = vec![APP_DATAGRAM_TAG];
            expected.extend_from_slice(&message.encode_to_vec());
            assert_eq!(encoded_len(endpoint, payload.len()), expected.len());
            assert_eq!(&encode(endpoint, Bytes::from(payload))[..], &expected[..]);
        }
    }

    #[test]
    fn queues_are_bounded_per_endpoint() {
        let mut d = Datagrams::default();
        // Ten times the bound: every one past it is dropped and counted.
        let offered = 10 * DATAGRAM_QUEUE as u32;
        for i in 0..offered {
            d.deliver("a", "n", Bytes::from(i.to_be_bytes().to_vec()));
        }
        assert_eq!(d.stats().received, DATAGRAM_QUEUE as u64);
        assert_eq!(
            d.stats().dropped_receiving,
            u64::from(offered) - DATAGRAM_QUEUE as u64
        );
        assert_eq!(
            d.deliver("b", "n", Bytes::new()),
            Delivery::First,
            "another endpoint has its own queue"
        );
        assert_eq!(d.deliver("b", "n", Bytes::new()), Delivery::Queued);
        let mut batch = VecDeque::new();
        assert_eq!(d.recv_batch("b", &mut batch, 1), 1);
        assert_eq!(d.recv_batch("b", &mut batch, 64), 1);
        assert_eq!(d.recv_batch("b", &mut batch, 64), 0);
        assert_eq!(d.deliver("b", "n", Bytes::new()), Delivery::First);
        assert_eq!(
            d.recv("a").map(|(_, p)| p),
            Some(Bytes::from(0u32.to_be_bytes().to_vec()))
        );
        d.close("a");
        assert_eq!(d.recv("a"), None);
    }

    #[test]
    fn queues_are_bounded_in_bytes_too() {
        let mut d = Datagrams::default();
        let large = Bytes::from(vec![0u8; MAX_DATAGRAM_SIZE]);
        for _ in 0..10_000 {
            d.deliver("a", "n", large.clone());
        }
        let fit = DATAGRAM_QUEUE_BYTES / MAX_DATAGRAM_SIZE;
        assert_eq!(d.stats().received, fit as u64);
        // Reading frees room, in bytes as in datagrams.
        let mut batch = VecDeque::new();
        assert_eq!(d.recv_batch("a", &mut batch, 10), 10);
        for _ in 0..20 {
            d.deliver("a", "n", large.clone());
        }
        assert_eq!(d.stats().received, fit as u64 + 10);
        assert_eq!(d.recv_batch("a", &mut batch, usize::MAX), fit);
        assert!(d.recv("a").is_none());
        assert_eq!(d.deliver("a", "n", large), Delivery::First);
    }
}
