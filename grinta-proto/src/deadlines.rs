//! An index of deadlines by key, earliest first: setting a key's deadline costs a heap push
//! (constant on average) instead of a remove and an insert in an ordered tree.
//!
//! Replaced deadlines stay in the heap until they come to its top, where they are recognised
//! as stale and skipped; when stale entries outnumber live ones the heap is rebuilt, so it holds
//! at most about twice as many entries as keys.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::Hash;
use std::time::Instant;

use hashbrown::HashMap;

/// Entries beyond twice the live keys before the heap is rebuilt.
const SLACK: usize = 64;

#[derive(Debug)]
pub(crate) struct Deadlines<K> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
    current: HashMap<K, Instant>,
    /// The heap's top is known to be live (it is asked for far more often than it changes).
    top_live: bool,
}

impl<K> Default for Deadlines<K> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            current: HashMap::new(),
            top_live: false,
        }
    }
}

impl<K: Copy + Eq + Hash + Ord> Deadlines<K> {
    /// Sets `key`'s deadline, or takes it out of the index (`None`).
    pub(crate) fn set(&mut self, key: K, at: Option<Instant>) {
        self.top_live = false;
        let Some(at) = at else {
            self.current.remove(&key);
            return;
        };
        if self.current.insert(key, at) == Some(at) {
            return;
        }
        self.heap.push(Reverse((at, key)));
        if self.heap.len() > 2 * self.current.len() + SLACK {
            self.heap = self
                .current
                .iter()
                .map(|(&key, &at)| Reverse((at, key)))
                .collect();
        }
    }

    /// The earliest deadline.
    pub(crate) fn first(&mut self) -> Option<Instant> {
        self.skip_stale();
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes out the key whose deadline is earliest, if that deadline is at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<K> {
        self.skip_stale();
        let &Reverse((at, key)) = self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        self.current.remove(&key);
        self.top_live = false;
        Some(key)
    }

    fn skip_stale(&mut self) {
        if self.top_live {
            return;
        }
        while let Some(&Reverse((at, key))) = self.heap.peek() {
            if self.current.get(&key) == Some(&at) {
                self.top_live = true;
                return;
            }
            self.heap.pop();
        }
    }

    #[cfg(test)]
    fn heap_len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keys_come_out_in_deadline_order_with_their_latest_deadline() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut d = Deadlines::default();
        d.set(1u32, Some(at(50)));
        d.set(2, Some(at(10)));
        d.set(3, Some(at(30)));
        d.set(2, Some(at(40))); // replaced: 10 is stale
        d.set(3, None); // taken out
        d.set(1, Some(at(20)));
        d.set(1, Some(at(50)));
        d.set(1, Some(at(20))); // back to 20: its old entry counts again, once
        assert_eq!(d.first(), Some(at(20)));
        assert_eq!(d.pop_due(at(5)), None);
        assert_eq!(d.pop_due(at(100)), Some(1));
        assert_eq!(d.pop_due(at(100)), Some(2));
        assert_eq!(d.pop_due(at(100)), None);
        assert_eq!(d.first(), None);
    }

    #[test]
    fn a_hundred_thousand_replacements_keep_the_heap_near_the_key_count() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for i in 0..100_000u64 {
            // 500 keys, each pushed further again and again, like a connection's idle timer.
            d.set(i % 500, Some(t0 + Duration::from_millis(1_000_000 + i)));
            assert!(d.heap_len() <= 2 * 500 + SLACK + 1);
        }
        let mut last = None;
        let mut n = 0;
        while let Some(k) = d.pop_due(t0 + Duration::from_secs(10_000)) {
            assert!(Some(k) != last);
            last = Some(k);
            n += 1;
        }
        assert_eq!(n, 500, "each key once, at its latest deadline");
    }
}
