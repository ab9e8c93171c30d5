//! The dissemination queue: broadcasts waiting to piggyback on membership packets.
//!
//! Order: fewest transmissions first, then largest (to pack packets), then newest. A newer broadcast with
//! the same key replaces the queued one. Each item is sent at most `limit` times (the caller passes the
//! current `retransmit_mult x ceil(log10(n + 1))`), then dropped.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use bytes::Bytes;
use hashbrown::HashMap;

/// Replace-by-key identity of a broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum BroadcastKey {
    /// What a member says of itself (alive, leave): the newest replaces the older.
    Member(String),
    /// An accusation of a member (suspect, dead), queued apart from its own word: an accusation
    /// at a newer incarnation must not displace the alive that makes that incarnation known.
    Accusation(String),
    /// An application item, keyed by the application.
    App(Bytes),
}

/// Position in the queue: fewest transmits, then largest, then newest.
type Rank = (u32, Reverse<usize>, Reverse<u64>);

#[derive(Debug)]
struct Item {
    key: BroadcastKey,
    encoded: Bytes,
    /// The node the news is about or comes from: it knows it already, so it is never sent there.
    about: Option<Box<str>>,
}

/// One queue of broadcasts (the membership keeps one for member news, one for application items).
#[derive(Debug)]
pub(crate) struct BroadcastQueue {
    order: BTreeMap<Rank, Item>,
    by_key: HashMap<BroadcastKey, Rank>,
    next_id: u64,
    capacity: usize,
    dropped: u64,
    /// Sum of the framed sizes of the queued items.
    framed_bytes: usize,
}

/// Bytes a broadcast of `len` encoded bytes takes inside a `Packet` (`repeated Broadcast broadcasts = 6`).
pub(crate) fn framed_broadcast_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

impl BroadcastQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            order: BTreeMap::new(),
            by_key: HashMap::new(),
            next_id: 0,
            capacity: capacity.max(1),
            dropped: 0,
            framed_bytes: 0,
        }
    }

    /// Queues `encoded` (an encoded `grinta.v1.Broadcast`), replacing any item with the same key.
    pub(crate) fn push(&mut self, key: BroadcastKey, encoded: Bytes) {
        self.push_about(key, encoded, None);
    }

    /// Queues an item about node `about` (or from it): never sent to that node.
    pub(crate) fn push_about(&mut self, key: BroadcastKey, encoded: Bytes, about: Option<&str>) {
        self.remove(&key);
        self.framed_bytes += framed_broadcast_len(encoded.len());
        let rank = (0, Reverse(encoded.len()), Reverse(self.next_id));
        self.next_id += 1;
        self.by_key.insert(key.clone(), rank);
        self.order.insert(
            rank,
            Item {
                key,
                encoded,
                about: about.map(Box::from),
            },
        );
        while self.order.len() > self.capacity {
            // The last item is the most sent, smallest and oldest: the least valuable.
            if let Some((_, item)) = self.order.pop_last() {
                self.by_key.remove(&item.key);
                self.framed_bytes -= framed_broadcast_len(item.encoded.len());
                self.dropped += 1;
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub(crate) fn contains(&self, key: &BroadcastKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Items dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Removes the item with this key, if queued.
    pub(crate) fn remove(&mut self, key: &BroadcastKey) {
        if let Some(rank) = self.by_key.remove(key) {
            if let Some(item) = self.order.remove(&rank) {
                self.framed_bytes -= framed_broadcast_len(item.encoded.len());
            }
        }
    }

    /// Bytes all queued items would take in a packet.
    pub(crate) fn framed_bytes(&self) -> usize {
        self.framed_bytes
    }

    /// Takes items in queue order that fit in `budget` bytes (as framed inside a packet), counts one
    /// transmission for each, and appends them to `out`. Items about `dst` are left for packets to
    /// other nodes. Items that reached `limit` transmissions leave the queue. Returns the bytes
    /// used.
    pub(crate) fn fill(
        &mut self,
        budget: usize,
        limit: u32,
        dst: Option<&str>,
        out: &mut Vec<Bytes>,
    ) -> usize {
        let mut used = 0;
        let mut taken: smallvec::SmallVec<[Rank; 16]> = smallvec::SmallVec::new();
        let mut misses = 0;
        for (rank, item) in &self.order {
            if dst.is_some() && item.about.as_deref() == dst {
                continue;
            }
            let need = framed_broadcast_len(item.encoded.len());
            if used + need <= budget {
                used += need;
                taken.push(*rank);
                out.push(item.encoded.clone());
            } else {
                misses += 1;
                // Smaller items follow within a transmit count, but scanning a long queue for a gap is
                // not worth it: stop after a few misses or when nothing can fit.
                if misses >= 8 || budget - used < 3 {
                    break;
                }
            }
        }
        for rank in taken {
            let Some(item) = self.order.remove(&rank) else {
                continue;
            };
            let transmits = rank.0 + 1;
            if transmits >= limit {
                self.by_key.remove(&item.key);
                self.framed_bytes -= framed_broadcast_len(item.encoded.len());
            } else {
                let new_rank = (transmits, rank.1, rank.2);
                if let Some(r) = self.by_key.get_mut(&item.key) {
                    *r = new_rank;
                }
                self.order.insert(new_rank, item);
            }
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(key: &str) -> BroadcastKey {
        BroadcastKey::App(Bytes::copy_from_slice(key.as_bytes()))
    }

    #[test]
    fn replace_by_key_keeps_one_item() {
        let mut q = BroadcastQueue::new(16);
        q.push(app("a"), Bytes::from_static(b"old"));
        q.push(app("a"), Bytes::from_static(b"new!"));
        assert_eq!(q.len(), 1);
        let mut out = Vec::new();
        q.fill(100, 5, None, &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"new!")]);
    }

    #[test]
    fn fewest_sent_then_largest_then_newest() {
        let mut q = BroadcastQueue::new(16);
        q.push(app("small-old"), Bytes::from_static(b"s1"));
        q.push(app("small-new"), Bytes::from_static(b"s2"));
        q.push(app("large"), Bytes::from_static(b"large"));
        let mut out = Vec::new();
        // Room for exactly one framed item of 5 bytes: the largest goes first.
        q.fill(framed_broadcast_len(5), 10, None, &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"large")]);
        out.clear();
        // Now "large" was sent once; the two unsent small ones come first, newest first.
        q.fill(framed_broadcast_len(2), 10, None, &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"s2")]);
    }

    #[test]
    fn an_item_is_never_sent_to_the_node_it_is_about() {
        let mut q = BroadcastQueue::new(16);
        q.push_about(app("r/x/b"), Bytes::from_static(b"b's"), Some("b"));
        let mut out = Vec::new();
        q.fill(100, 1, Some("b"), &mut out);
        assert!(out.is_empty(), "not to its own node, and not counted");
        q.fill(100, 1, Some("c"), &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"b's")]);
        assert!(q.is_empty());
    }

    #[test]
    fn items_leave_after_the_limit() {
        let mut q = BroadcastQueue::new(16);
        q.push(app("a"), Bytes::from_static(b"x"));
        for _ in 0..3 {
            let mut out = Vec::new();
            q.fill(100, 3, None, &mut out);
            assert_eq!(out.len(), 1);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn capacity_drops_the_least_valuable() {
        let mut q = BroadcastQueue::new(2);
        q.push(app("a"), Bytes::from_static(b"a"));
        q.push(app("b"), Bytes::from_static(b"b"));
        q.push(app("c"), Bytes::from_static(b"c"));
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 1);
        assert!(!q.contains(&app("a")), "oldest of equal items is dropped");
    }
}
