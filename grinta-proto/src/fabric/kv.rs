//! The replicated key/value table: every node writes, every node reads everything.
//!
//! Each write is a record of the node that makes it, versioned by its Lamport clock and signed
//! like its endpoint records; it spreads by gossip at once and by push-pull as anti-entropy, so
//! a joiner has the whole table when it has joined. The last write of a key wins (the highest
//! `(version, writer)`); a delete is a write too (a tombstone, collected after
//! `tombstone_ttl`). An entry belongs to the node that wrote it last: when that node fails or
//! leaves, its entries vanish everywhere, except those written with [`Kv::put_durable`], which
//! the live member with the lowest name takes over.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::watch::ViewWatch;
use super::{Error, Fabric, Runtime};
use crate::registry::Record;

pub use crate::registry::{MAX_KEY_LEN, MAX_VALUE_LEN};

/// One entry of the key/value table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvEntry {
    /// The value.
    pub value: Bytes,
    /// The node that wrote it (its entries vanish with it).
    pub writer: String,
    /// The writer's Lamport clock when it wrote it: a later write of the key has a higher one.
    pub version: u64,
    /// Written with [`Kv::put_durable`]: it outlives its writer.
    pub durable: bool,
}

impl KvEntry {
    fn from_record(record: &Record) -> Self {
        Self {
            value: record.value.clone(),
            writer: record.owner.clone(),
            version: record.version,
            durable: record.durable,
        }
    }
}

/// A change of the keys under a watched prefix (see [`Kv::watch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvEvent {
    /// The key holds a new entry (it was written, or had none).
    Set {
        /// The key.
        key: String,
        /// Its entry now.
        entry: KvEntry,
    },
    /// The key holds no entry any more: it was deleted, or its writer failed or left.
    Deleted {
        /// The key.
        key: String,
    },
}

fn diff(
    old: &BTreeMap<String, KvEntry>,
    new: &BTreeMap<String, KvEntry>,
    events: &mut VecDeque<KvEvent>,
) {
    let mut old_keys = old.keys().peekable();
    for (key, entry) in new {
        while let Some(gone) = old_keys.next_if(|k| *k < key) {
            events.push_back(KvEvent::Deleted { key: gone.clone() });
        }
        old_keys.next_if(|k| *k == key);
        if old.get(key) != Some(entry) {
            events.push_back(KvEvent::Set {
                key: key.clone(),
                entry: entry.clone(),
            });
        }
    }
    for gone in old_keys {
        events.push_back(KvEvent::Deleted { key: gone.clone() });
    }
}

/// The cluster's replicated key/value table, as this node sees it: made by [`Fabric::kv`].
///
/// Limits: a key is 1..=[`MAX_KEY_LEN`] (128) bytes of `[A-Za-z0-9._/:-]`; a value at most
/// [`MAX_VALUE_LEN`] (512) bytes; a node holds at most 16,384 keys it wrote and 65,536
/// records in all (entries and tombstones, `NodeConfig::kv`). Beyond them writes fail with
/// [`Error::Registry`].
///
/// ```no_run
/// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
/// let kv = fabric.kv();
/// kv.put("config/limit", "100")?;
/// assert_eq!(&kv.get("config/limit").unwrap().value[..], b"100");
/// for (key, entry) in kv.entries("config/") {
///     println!("{key} = {:?} (written by {})", entry.value, entry.writer);
/// }
/// kv.delete("config/limit")?;
/// # Ok(())
/// # }
/// ```
pub struct Kv<R: Runtime> {
    fabric: Fabric<R>,
}

impl<R: Runtime> std::fmt::Debug for Kv<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv").finish_non_exhaustive()
    }
}

impl<R: Runtime> Clone for Kv<R> {
    fn clone(&self) -> Self {
        Self {
            fabric: self.fabric.clone(),
        }
    }
}

impl<R: Runtime> Kv<R> {
    /// Writes `key` = `value`, as this node: every node sees it within a gossip round or two,
    /// and it wins over every write of the key this node has seen. It vanishes if this node
    /// fails or leaves (or another node writes or deletes the key).
    ///
    /// Errors: [`Error::Registry`] (`InvalidName` for a bad key, `ValueTooLarge`,
    /// `LimitReached`), [`Error::Shutdown`].
    pub fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<(), Error> {
        let value = value.into();
        self.fabric.with(|inner, now| {
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            Ok(inner.node.kv_put(now, key, value)?)
        })
    }

    /// Like [`put`](Self::put), for an entry that outlives this node: when it fails or leaves,
    /// the live member with the lowest node name writes the entry again as its own, so it
    /// stays in the table (its `writer` changes; a watch sees a `Set`, perhaps after a
    /// `Deleted` on nodes that learnt of the failure before the takeover).
    ///
    /// ```no_run
    /// # fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// fabric.kv().put_durable("cluster/leader-epoch", "42")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn put_durable(&self, key: &str, value: impl Into<Bytes>) -> Result<(), Error> {
        let value = value.into();
        self.fabric.with(|inner, now| {
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            Ok(inner.node.kv_put_durable(now, key, value)?)
        })
    }

    /// The entry of `key`, if it holds one.
    pub fn get(&self, key: &str) -> Option<KvEntry> {
        self.fabric
            .shared
            .lock()
            .node
            .kv()
            .get(key)
            .map(KvEntry::from_record)
    }

    /// Deletes `key`, whoever wrote it; returns whether it held an entry.
    ///
    /// Errors: [`Error::Registry`] for a bad key, [`Error::Shutdown`].
    pub fn delete(&self, key: &str) -> Result<bool, Error> {
        self.fabric.with(|inner, now| {
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            Ok(inner.node.kv_delete(now, key)?)
        })
    }

    /// The entries whose key starts with `prefix` (`""` for all), sorted by key.
    pub fn entries(&self, prefix: &str) -> Vec<(String, KvEntry)> {
        entries(&self.fabric.shared.lock().node, prefix)
            .into_iter()
            .collect()
    }

    /// How many keys hold an entry.
    pub fn len(&self) -> usize {
        self.fabric.shared.lock().node.kv().entries("").len()
    }

    /// Whether no key holds an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Watches the keys that start with `prefix`: a stream of [`KvEvent`]s that starts with
    /// the current entries (a `Set` each, in key order) and goes on with every change this node
    /// sees. Changes made and undone between two reads may not show; the stream ends when the
    /// fabric shuts down. Each change of the table costs a watch a rebuild of its view of the
    /// keys under its prefix.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// use futures::StreamExt;
    /// use grinta_proto::fabric::KvEvent;
    ///
    /// let mut config = fabric.kv().watch("config/");
    /// while let Some(event) = config.next().await {
    ///     match event {
    ///         KvEvent::Set { key, entry } => println!("{key} = {:?}", entry.value),
    ///         KvEvent::Deleted { key } => println!("{key} deleted"),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub fn watch(&self, prefix: &str) -> KvWatch<R> {
        KvWatch {
            fabric: self.fabric.clone(),
            view: ViewWatch::new(prefix),
        }
    }
}

fn entries(node: &crate::node::Node, prefix: &str) -> BTreeMap<String, KvEntry> {
    node.kv()
        .entries(prefix)
        .into_iter()
        .map(|r| (r.name.clone(), KvEntry::from_record(r)))
        .collect()
}

/// The entries under a prefix, as a stream of changes: made by [`Kv::watch`].
pub struct KvWatch<R: Runtime> {
    fabric: Fabric<R>,
    view: ViewWatch<KvEntry, KvEvent>,
}

impl<R: Runtime> std::fmt::Debug for KvWatch<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWatch")
            .field("prefix", &self.view.prefix())
            .field("entries", &self.view.view().len())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> KvWatch<R> {
    /// The entries under the prefix, as of the last event returned.
    pub fn entries(&self) -> &BTreeMap<String, KvEntry> {
        self.view.view()
    }
}

impl<R: Runtime> futures_core::Stream for KvWatch<R> {
    type Item = KvEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<KvEvent>> {
        let this = self.get_mut();
        this.view.poll_next(&this.fabric, cx, entries, diff)
    }
}

impl<R: Runtime> Fabric<R> {
    /// The cluster's replicated key/value table (see [`Kv`]).
    pub fn kv(&self) -> Kv<R> {
        Kv {
            fabric: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: &str, version: u64) -> KvEntry {
        KvEntry {
            value: Bytes::copy_from_slice(v.as_bytes()),
            writer: "n".into(),
            version,
            durable: false,
        }
    }

    #[test]
    fn diff_reports_sets_and_deletes_in_key_order() {
        let old: BTreeMap<String, KvEntry> = [("a", 1), ("b", 2), ("d", 4)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), entry(k, v)))
            .collect();
        let mut new = old.clone();
        new.remove("a");
        new.insert("b".into(), entry("b2", 5));
        new.insert("c".into(), entry("c", 6));
        new.remove("d");
        let mut events = VecDeque::new();
        diff(&old, &new, &mut events);
        let events: Vec<KvEvent> = events.into();
        assert_eq!(
            events,
            vec![
                KvEvent::Deleted { key: "a".into() },
                KvEvent::Set {
                    key: "b".into(),
                    entry: entry("b2", 5)
                },
                KvEvent::Set {
                    key: "c".into(),
                    entry: entry("c", 6)
                },
                KvEvent::Deleted { key: "d".into() },
            ]
        );
        let mut none = VecDeque::new();
        diff(&new, &new, &mut none);
        assert!(none.is_empty());
    }
}
