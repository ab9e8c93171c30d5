//! The dissemination queue: broadcasts waiting to piggyback on membership packets.
//!
//! Order: fewest transmissions first, then largest (to pack packets), then newest. A newer broadcast with
//! the same key replaces the queued one. Each item is sent at most `limit` times (the caller passes the
//! current `retransmit_mult x ceil(log10(n + 1))`), then dropped.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hash};

use hashbrown::{DefaultHashBuilder, HashTable};
use smallvec::SmallVec;

/// Replace-by-key identity of a broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum BroadcastKey {
    /// What a member says of itself (alive, leave): the newest replaces the older.
    Member(MemberName),
    /// An accusation of a member (suspect, dead), queued apart from its own word: an accusation
    /// at a newer incarnation must not displace the alive that makes that incarnation known.
    Accusation(MemberName),
    /// An application item, keyed by the application.
    App(Box<[u8]>),
}

impl BroadcastKey {
    /// The member a member item is about.
    fn member(&self) -> Option<&[u8]> {
        match self {
            Self::Member(name) | Self::Accusation(name) => Some(&name.0),
            Self::App(_) => None,
        }
    }
}

/// A member's name in a key, inline up to 16 bytes (as most are): a node of a large cluster
/// queues thousands of keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MemberName(SmallVec<[u8; 16]>);

impl From<&str> for MemberName {
    fn from(name: &str) -> Self {
        Self(SmallVec::from_slice(name.as_bytes()))
    }
}

/// Position in the queue: fewest transmits, then largest, then newest, and the item's slot,
/// packed into one integer that is the ordered set's whole element (16 bytes, where a
/// `(rank, slot)` pair took 32 with its padding): transmits (up to 255; more rank as 255) in the
/// top 8 bits, then the length (up to 65,535) and the push number, each inverted so that larger
/// comes first, then the slot in the low 32 bits.
type Rank = u128;

/// The slot a [`Rank`] names.
fn slot_of(rank: Rank) -> u32 {
    rank as u32
}

/// Slots a drained queue keeps; past this, a queue that empties frees them.
const KEPT_SLOTS: usize = 64;

/// Encoded bytes kept in the item itself: an unsigned member's alive fits, so a queue of member
/// news in an unsigned cluster allocates nothing per item.
const INLINE_ENCODED: usize = 40;

/// A queued broadcast. A node of a large cluster holds thousands, so an item keeps its rank as
/// the transmissions and the push number, and small payloads inline.
#[derive(Debug)]
struct Item {
    key: BroadcastKey,
    encoded: SmallVec<[u8; INLINE_ENCODED]>,
    /// Which push this was (newer pushes rank first among equals).
    id: u64,
    transmits: u32,
    /// Never sent to the member the key names either (a member's own word).
    about_key_member: bool,
    /// Never sent to another node either, the queue's `abouts` says which (it knows it already):
    /// rare (an application item names its origin), so kept apart from the item.
    about_other: bool,
    /// Never dropped to make room (the node's own leave, which the node waits for).
    pinned: bool,
}

impl Item {
    /// Whether the item is about `node` through its key (see also `BroadcastQueue::is_about`).
    fn is_about_key_member(&self, node: &str) -> bool {
        self.about_key_member && self.key.member() == Some(node.as_bytes())
    }

    fn rank(&self, slot: u32) -> Rank {
        let transmits = u8::try_from(self.transmits).unwrap_or(u8::MAX);
        let len = u16::try_from(self.encoded.len()).unwrap_or(u16::MAX);
        (u128::from(transmits) << 112)
            | (u128::from(u16::MAX - len) << 96)
            | (u128::from(u64::MAX - self.id) << 32)
            | u128::from(slot)
    }
}

/// One queue of broadcasts (the membership keeps one for member news, one for application items).
///
/// Items live in slots; the order is a set of ranks (which name their slots) and the key index
/// holds slots, so
/// counting a transmission moves an item in the order without hashing its key.
#[derive(Debug)]
pub(crate) struct BroadcastQueue {
    slots: Vec<Option<Item>>,
    free: Vec<u32>,
    order: BTreeSet<Rank>,
    by_key: HashTable<u32>,
    /// The node each item with `about_other` is never sent to, by slot.
    abouts: hashbrown::HashMap<u32, Box<str>>,
    hasher: DefaultHashBuilder,
    next_id: u64,
    capacity: usize,
    dropped: u64,
    /// Sum of the framed sizes of the queued items.
    framed_bytes: usize,
}

/// Bytes a broadcast of `len` encoded bytes takes inside a `Packet` (`repeated Broadcast broadcasts = 6`).
pub(crate) fn framed_broadcast_len(len: usize) -> usize {
    crate::wire::delimited_len(6, len)
}

/// Appends `broadcast` (an encoded `grinta.v1.Broadcast`) to `out` as a `Packet`'s field 6
/// (`broadcasts`, length-delimited).
pub(crate) fn put_framed_broadcast(broadcast: &[u8], out: &mut Vec<u8>) {
    crate::wire::put_delimited(6, broadcast, out);
}

impl BroadcastQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            order: BTreeSet::new(),
            by_key: HashTable::new(),
            abouts: hashbrown::HashMap::new(),
            hasher: DefaultHashBuilder::default(),
            next_id: 0,
            capacity: capacity.max(1),
            dropped: 0,
            framed_bytes: 0,
        }
    }

    /// Queues `encoded` (an encoded `grinta.v1.Broadcast`), replacing any item with the same key.
    pub(crate) fn push(&mut self, key: BroadcastKey, encoded: &[u8]) {
        self.push_about(key, encoded, None);
    }

    /// Queues an item about node `about` (or from it): never sent to that node.
    pub(crate) fn push_about(&mut self, key: BroadcastKey, encoded: &[u8], about: Option<&str>) {
        self.push_item(key, encoded, about, false);
    }

    /// Queues an item that is never dropped to make room: it leaves the queue only once sent
    /// `limit` times (or replaced, or removed). For the node's own leave, which it waits to send.
    pub(crate) fn push_pinned(&mut self, key: BroadcastKey, encoded: &[u8]) {
        self.push_item(key, encoded, None, true);
    }

    fn push_item(&mut self, key: BroadcastKey, encoded: &[u8], about: Option<&str>, pinned: bool) {
        self.remove(&key);
        self.framed_bytes += framed_broadcast_len(encoded.len());
        let about_key_member = about.is_some() && key.member() == about.map(str::as_bytes);
        let about_other = about.filter(|_| !about_key_member);
        let item = Item {
            about_key_member,
            about_other: about_other.is_some(),
            encoded: SmallVec::from_slice(encoded),
            key,
            id: self.next_id,
            transmits: 0,
            pinned,
        };
        self.next_id += 1;
        let hash = self.hasher.hash_one(&item.key);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(item);
                slot
            }
            None => {
                // A full queue holds `capacity` items and one more while it drops one: grow to
                // that and no further, rather than doubling past it.
                if self.slots.len() == self.slots.capacity() {
                    let room = (self.capacity + 1).saturating_sub(self.slots.len());
                    self.slots
                        .reserve_exact(self.slots.len().max(8).min(room.max(1)));
                }
                self.slots.push(Some(item));
                (self.slots.len() - 1) as u32
            }
        };
        if let Some(about) = about_other {
            self.abouts.insert(slot, about.into());
        }
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_key.insert_unique(hash, slot, |&s| {
            slots[s as usize]
                .as_ref()
                .map_or(0, |item| hasher.hash_one(&item.key))
        });
        if let Some(item) = &self.slots[slot as usize] {
            self.order.insert(item.rank(slot));
        }
        while self.order.len() > self.capacity {
            // The last item is the most sent, smallest and oldest: the least valuable, unless
            // pinned (a queue holds at most one pinned item, so the walk stops at the next).
            let slots = &self.slots;
            let victim = self.order.iter().rev().copied().find(|&rank| {
                !slots[slot_of(rank) as usize]
                    .as_ref()
                    .is_some_and(|item| item.pinned)
            });
            let Some(victim) = victim else { break };
            self.order.remove(&victim);
            self.release(slot_of(victim));
            self.dropped += 1;
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
        if item.about_other {
            self.abouts.remove(&slot);
        }
        self.framed_bytes -= framed_broadcast_len(item.encoded.len());
        self.free.push(slot);
        // A drained queue gives back the room a burst of news took (slots are 96 bytes, a
        // thousand of them after a mass join); a small one keeps it.
        if self.order.is_empty() && self.by_key.is_empty() && self.slots.capacity() > KEPT_SLOTS {
            self.slots = Vec::new();
            self.free = Vec::new();
            self.by_key = HashTable::new();
            self.abouts = hashbrown::HashMap::new();
        }
    }

    /// Whether `item` (in `slot`) is about `node`, which knows it already.
    fn is_about(&self, item: &Item, slot: u32, node: &str) -> bool {
        item.is_about_key_member(node)
            || (item.about_other && self.abouts.get(&slot).is_some_and(|a| **a == *node))
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
                self.order.remove(&item.rank(slot));
            }
            self.release(slot);
        }
    }

    /// Bytes all queued items would take in a packet.
    pub(crate) fn framed_bytes(&self) -> usize {
        self.framed_bytes
    }

    /// Takes items in queue order that fit in `budget` bytes (as framed inside a packet), counts one
    /// transmission for each, and appends them to `out` framed as a `Packet`'s `broadcasts`. Items
    /// about `dst` are left for packets to other nodes. Items that reached `limit` transmissions
    /// leave the queue. Returns the bytes used.
    pub(crate) fn fill(
        &mut self,
        budget: usize,
        limit: u32,
        dst: Option<&str>,
        out: &mut Vec<u8>,
    ) -> usize {
        let mut used = 0;
        // A packet of 1,200 bytes holds about 33 unsigned member items: room for them all on the
        // stack (16 spilled to the heap once per full packet).
        let mut taken: smallvec::SmallVec<[Rank; 64]> = smallvec::SmallVec::new();
        let mut misses = 0;
        for &rank in &self.order {
            let slot = slot_of(rank);
            let Some(item) = &self.slots[slot as usize] else {
                continue;
            };
            if dst.is_some_and(|dst| self.is_about(item, slot, dst)) {
                continue;
            }
            let need = framed_broadcast_len(item.encoded.len());
            if used + need <= budget {
                used += need;
                taken.push(rank);
                put_framed_broadcast(&item.encoded, out);
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
            self.order.remove(&rank);
            let slot = slot_of(rank);
            let Some(item) = self.slots[slot as usize].as_mut() else {
                continue;
            };
            item.transmits += 1;
            if item.transmits >= limit {
                self.release(slot);
            } else {
                self.order.insert(item.rank(slot));
            }
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(key: &str) -> BroadcastKey {
        BroadcastKey::App(key.as_bytes().into())
    }

    /// Fills a packet's worth from `q` and returns the broadcasts it framed, checking that the
    /// bytes used are the bytes framed.
    fn fill(q: &mut BroadcastQueue, budget: usize, limit: u32, dst: Option<&str>) -> Vec<Vec<u8>> {
        let mut framed = Vec::new();
        let used = q.fill(budget, limit, dst, &mut framed);
        assert_eq!(used, framed.len());
        assert!(used <= budget);
        let mut buf = &framed[..];
        let mut out = Vec::new();
        while !buf.is_empty() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut buf).expect("key");
            assert_eq!(
                (tag, wire_type),
                (6, prost::encoding::WireType::LengthDelimited)
            );
            let len = prost::encoding::decode_varint(&mut buf).expect("length") as usize;
            out.push(buf[..len].to_vec());
            buf = &buf[len..];
        }
        out
    }

    #[test]
    fn replace_by_key_keeps_one_item() {
        let mut q = BroadcastQueue::new(16);
        q.push(app("a"), b"old");
        q.push(app("a"), b"new!");
        assert_eq!(q.len(), 1);
        assert_eq!(fill(&mut q, 100, 5, None), vec![b"new!".to_vec()]);
    }

    #[test]
    fn fewest_sent_then_largest_then_newest() {
        let mut q = BroadcastQueue::new(16);
        q.push(app("small-old"), b"s1");
        q.push(app("small-new"), b"s2");
        q.push(app("large"), b"large");
        // Room for exactly one framed item of 5 bytes: the largest goes first.
        assert_eq!(
            fill(&mut q, framed_broadcast_len(5), 10, None),
            vec![b"large".to_vec()]
        );
        // Now "large" was sent once; the two unsent small ones come first, newest first.
        assert_eq!(
            fill(&mut q, framed_broadcast_len(2), 10, None),
            vec![b"s2".to_vec()]
        );
    }

    #[test]
    fn an_item_is_never_sent_to_the_node_it_is_about() {
        let mut q = BroadcastQueue::new(16);
        q.push_about(app("r/x/b"), b"b's", Some("b"));
        assert!(
            fill(&mut q, 100, 1, Some("b")).is_empty(),
            "not to its own node, and not counted"
        );
        assert_eq!(fill(&mut q, 100, 1, Some("c")), vec![b"b's".to_vec()]);
        assert!(q.is_empty());
    }

    #[test]
    fn items_leave_after_the_limit() {
        let mut q = BroadcastQueue::new(16);
        q.push(app("a"), b"x");
        for _ in 0..3 {
            assert_eq!(fill(&mut q, 100, 3, None).len(), 1);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn capacity_drops_the_least_valuable() {
        let mut q = BroadcastQueue::new(2);
        q.push(app("a"), b"a");
        q.push(app("b"), b"b");
        q.push(app("c"), b"c");
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 1);
        assert!(!q.contains(&app("a")), "oldest of equal items is dropped");
    }

    #[test]
    fn a_pinned_item_is_never_dropped_to_make_room() {
        let mut q = BroadcastQueue::new(4);
        // The smallest, oldest item: the first to go, were it not pinned.
        q.push_pinned(BroadcastKey::Member("me".into()), b"l");
        for i in 0..10_000u32 {
            q.push(app(&format!("k{i}")), b"larger item");
            assert!(q.len() <= 4);
        }
        assert!(q.contains(&BroadcastKey::Member("me".into())));
        assert_eq!(q.dropped(), 10_000 - 3);
        // It leaves once sent `limit` times.
        for _ in 0..3 {
            fill(&mut q, 1000, 3, None);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn ten_thousand_items_through_a_small_queue_leave_nothing_behind() {
        let mut q = BroadcastQueue::new(1000);
        for i in 0..10_000u32 {
            let key = if i % 2 == 0 {
                BroadcastKey::Member(format!("n{}", i % 3000).as_str().into())
            } else {
                BroadcastKey::Accusation(format!("n{}", i % 3000).as_str().into())
            };
            // Inline and on the heap.
            let encoded = vec![0u8; 10 + 2 * (i % 30) as usize];
            q.push_about(key, &encoded, Some("n7"));
            assert!(q.len() <= 1000);
        }
        // Among unsent items the largest stay: the last one pushed at the largest size does.
        assert!(q.contains(&BroadcastKey::Accusation("n989".into())));
        assert!(
            fill(&mut q, 1100, 3, Some("n7")).is_empty(),
            "every item is about n7 and none goes there"
        );
        let mut out = Vec::new();
        let mut rounds = 0;
        while !q.is_empty() {
            out.extend(fill(&mut q, 1100, 3, Some("n8")));
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
        assert!(q.abouts.is_empty());
        assert_eq!(q.free.len(), q.slots.len(), "every slot is free again");
        assert!(
            q.slots.capacity() <= 1001,
            "slots grow to the capacity and one more, not past it: {}",
            q.slots.capacity()
        );
    }

    #[test]
    fn a_drained_queue_gives_back_its_room() {
        let mut q = BroadcastQueue::new(1024);
        for round in 0..3 {
            for i in 0..1000u32 {
                q.push(app(&format!("k{i}")), b"item");
            }
            assert_eq!(q.len(), 1000);
            assert!(q.slots.capacity() >= 1000);
            // Sent twice each, then gone: the queue's room goes with the last of them.
            let mut sent = 0;
            while !q.is_empty() {
                sent += fill(&mut q, 1100, 2, None).len();
            }
            assert_eq!(sent, 2000, "round {round}");
            assert_eq!(q.slots.capacity(), 0, "round {round}");
            assert_eq!(q.free.capacity(), 0);
            assert_eq!(q.framed_bytes(), 0);
        }
        // A small queue keeps its few slots as items come and go.
        q.push(app("a"), b"x");
        fill(&mut q, 100, 1, None);
        assert!(q.is_empty());
        assert!(q.slots.capacity() > 0 && q.slots.capacity() <= KEPT_SLOTS);
        // Removing the last item frees the room too.
        for i in 0..100u32 {
            q.push(app(&format!("k{i}")), b"item");
        }
        for i in 0..100u32 {
            q.remove(&app(&format!("k{i}")));
        }
        assert!(q.is_empty());
        assert_eq!(q.slots.capacity(), 0);
    }

    #[test]
    fn an_item_fits_in_96_bytes() {
        // A node of a 10,000-member cluster holds a thousand during a mass join.
        assert!(std::mem::size_of::<Option<Item>>() <= 96);
    }

    #[test]
    fn ranks_keep_the_order_at_the_edges_of_their_fields() {
        let item = |len: usize, transmits: u32, id: u64| Item {
            key: app("k"),
            encoded: SmallVec::from_vec(vec![0; len]),
            id,
            transmits,
            about_key_member: false,
            about_other: false,
            pinned: false,
        };
        // Fewer transmits first, whatever the rest; past 255 they rank as 255.
        assert!(item(1, 0, 0).rank(u32::MAX) < item(70_000, 1, u64::MAX).rank(0));
        assert!(item(1, 254, 0).rank(0) < item(1, 255, 0).rank(0));
        assert_eq!(item(1, 255, 0).rank(7), item(1, u32::MAX, 0).rank(7));
        // Then larger first (past 65,535 bytes as 65,535), then newer first, then the slot.
        assert!(item(2, 3, 0).rank(9) < item(1, 3, u64::MAX).rank(0));
        assert_eq!(item(65_535, 3, 5).rank(1), item(1 << 20, 3, 5).rank(1));
        assert!(item(8, 3, 6).rank(u32::MAX) < item(8, 3, 5).rank(0));
        assert!(item(8, 3, 6).rank(1) < item(8, 3, 6).rank(2));
        for slot in [0, 1, 12345, u32::MAX] {
            assert_eq!(slot_of(item(40, 17, u64::MAX).rank(slot)), slot);
            assert_eq!(slot_of(item(1 << 20, u32::MAX, 0).rank(slot)), slot);
        }
    }
}
