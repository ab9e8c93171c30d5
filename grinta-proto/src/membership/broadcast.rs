//! The dissemination queue: broadcasts waiting to piggyback on membership packets.
//!
//! Order: fewest transmissions first, then largest (to pack packets), then newest. A newer broadcast with
//! the same key replaces the queued one. Each item is sent at most `limit` times (the caller passes the
//! current `retransmit_mult x ceil(log10(n + 1))`), then dropped.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hash};

use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashTable};

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

impl BroadcastKey {
    /// The member a member item is about.
    fn member(&self) -> Option<&str> {
        match self {
            Self::Member(name) | Self::Accusation(name) => Some(name),
            Self::App(_) => None,
        }
    }
}

/// Position in the queue: fewest transmits, then largest, then newest.
type Rank = (u32, Reverse<usize>, Reverse<u64>);

/// The node an item is never sent to, as it knows it already.
#[derive(Debug)]
enum About {
    Nobody,
    /// The member the key names (a member's own word, or an accusation of it).
    KeyMember,
    Node(Box<str>),
}

#[derive(Debug)]
struct Item {
    key: BroadcastKey,
    encoded: Bytes,
    about: About,
    rank: Rank,
}

impl Item {
    fn is_about(&self, node: &str) -> bool {
        match &self.about {
            About::Nobody => false,
            About::KeyMember => self.key.member() == Some(node),
            About::Node(n) => &**n == node,
        }
    }
}

/// One queue of broadcasts (the membership keeps one for member news, one for application items).
///
/// Items live in slots; the order is a set of (rank, slot) and the key index holds slots, so
/// counting a transmission moves an item in the order without hashing its key.
#[derive(Debug)]
pub(crate) struct BroadcastQueue {
    slots: Vec<Option<Item>>,
    free: Vec<u32>,
    order: BTreeSet<(Rank, u32)>,
    by_key: HashTable<u32>,
    hasher: DefaultHashBuilder,
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
            slots: Vec::new(),
            free: Vec::new(),
            order: BTreeSet::new(),
            by_key: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
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
        let about = match about {
            None => About::Nobody,
            Some(node) if key.member() == Some(node) => About::KeyMember,
            Some(node) => About::Node(node.into()),
        };
        let hash = self.hasher.hash_one(&key);
        let item = Item {
            key,
            encoded,
            about,
            rank,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(item);
                slot
            }
            None => {
                self.slots.push(Some(item));
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_key.insert_unique(hash, slot, |&s| {
            slots[s as usize]
                .as_ref()
                .map_or(0, |item| hasher.hash_one(&item.key))
        });
        self.order.insert((rank, slot));
        while self.order.len() > self.capacity {
            // The last item is the most sent, smallest and oldest: the least valuable.
            if let Some((_, slot)) = self.order.pop_last() {
                self.release(slot);
                self.dropped += 1;
            }
        }
    }

    /// Frees `slot` (already out of the order): out of the key index too.
    fn release(&mut self, slot: u32) {
        let Some(item) = self.slots[slot as usize].take() else {
            return;
        };
        let hash = self.hasher.hash_one(&item.key);
        if let Ok(entry) = self.by_key.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
        self.framed_bytes -= framed_broadcast_len(item.encoded.len());
        self.free.push(slot);
    }

    fn find(&self, key: &BroadcastKey) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.by_key
            .find(hash, |&s| {
                self.slots[s as usize]
                    .as_ref()
                    .is_some_and(|item| item.key == *key)
            })
            .copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub(crate) fn contains(&self, key: &BroadcastKey) -> bool {
        self.find(key).is_some()
    }

    /// Items dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Removes the item with this key, if queued.
    pub(crate) fn remove(&mut self, key: &BroadcastKey) {
        if let Some(slot) = self.find(key) {
            if let Some(item) = &self.slots[slot as usize] {
                self.order.remove(&(item.rank, slot));
            }
            self.release(slot);
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
        let mut taken: smallvec::SmallVec<[(Rank, u32); 16]> = smallvec::SmallVec::new();
        let mut misses = 0;
        for &(rank, slot) in &self.order {
            let Some(item) = &self.slots[slot as usize] else {
                continue;
            };
            if dst.is_some_and(|dst| item.is_about(dst)) {
                continue;
            }
            let need = framed_broadcast_len(item.encoded.len());
            if used + need <= budget {
                used += need;
                taken.push((rank, slot));
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
        for (rank, slot) in taken {
            self.order.remove(&(rank, slot));
            let transmits = rank.0 + 1;
            if transmits >= limit {
                self.release(slot);
            } else {
                let new_rank = (transmits, rank.1, rank.2);
                if let Some(item) = self.slots[slot as usize].as_mut() {
                    item.rank = new_rank;
                }
                self.order.insert((new_rank, slot));
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

    #[test]
    fn ten_thousand_items_through_a_small_queue_leave_nothing_behind() {
        let mut q = BroadcastQueue::new(1000);
        for i in 0..10_000u32 {
            let key = if i % 2 == 0 {
                BroadcastKey::Member(format!("n{}", i % 3000))
            } else {
                BroadcastKey::Accusation(format!("n{}", i % 3000))
            };
            q.push_about(
                key,
                Bytes::from(vec![0u8; 10 + (i % 30) as usize]),
                Some("n7"),
            );
            assert!(q.len() <= 1000);
        }
        // Among unsent items the largest stay: the last one pushed at the largest size does.
        assert!(q.contains(&BroadcastKey::Accusation("n989".into())));
        let mut out = Vec::new();
        q.fill(1100, 3, Some("n7"), &mut out);
        assert!(out.is_empty(), "every item is about n7 and none goes there");
        let mut rounds = 0;
        while !q.is_empty() {
            q.fill(1100, 3, Some("n8"), &mut out);
            rounds += 1;
            assert!(rounds < 1000, "the queue drains");
        }
        assert_eq!(
            out.len(),
            3000,
            "each of the 1000 items kept is sent 3 times"
        );
        assert_eq!(q.framed_bytes(), 0);
        assert_eq!(q.by_key.len(), 0);
        assert_eq!(q.free.len(), q.slots.len(), "every slot is free again");
    }
}
