//! The endpoint-name directory: which nodes serve which names.
//!
//! Every node owns the records of its own endpoints: `(name, owner, owner incarnation, version,
//! claimed | withdrawn, exclusive | group)`, versioned by the owner's Lamport clock. For one
//! `(name, owner)` key the record with the highest version wins, so [`Registry::merge`] is
//! commutative, associative and idempotent and every node converges on the same table whatever the
//! order in which gossip (deltas) and push-pull (the full table) arrive. Unregistering leaves a
//! tombstone (a withdrawn record) that is collected after `tombstone_ttl`.
//!
//! **Exclusive** names (the default) have at most one owner. Concurrent claims are resolved from the
//! records alone, with no vote: the claim with the lowest `(version, owner)` wins; an owner whose
//! claim loses withdraws it and its endpoint ends with a name conflict. **Group** names are shared
//! by any number of owners; a dial picks one.
//!
//! When membership declares a node Dead or Left, [`Registry::drop_owner`] removes every record it
//! owns; records of that owner's past incarnations are refused afterwards.
//!
//! The same table, holding records of kind [`EndpointKind::Value`], is the replicated key/value
//! table ([`Registry::put`], [`Registry::get`], [`Registry::delete`]): a node keeps one of each,
//! never mixed. There the last write of a key wins, the highest `(version, owner)` of all its
//! records, tombstones included; an owner whose entry is overwritten withdraws it at its own
//! version, so it never comes back.
//!
//! ```
//! use grinta_proto::registry::{EndpointKind, Registry, RegistryLimits};
//! use std::time::Instant;
//!
//! let now = Instant::now();
//! let mut a = Registry::new("node-a", RegistryLimits::default());
//! let mut b = Registry::new("node-b", RegistryLimits::default());
//! let delta = a.register("billing", EndpointKind::Exclusive, now)?;
//! assert!(b.merge(delta, now));
//! assert_eq!(b.owners("billing"), vec!["node-a"]);
//! # Ok::<(), grinta_proto::registry::RegistryError>(())
//! ```

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;

use crate::wire;

/// Longest endpoint name, in bytes.
pub const MAX_ENDPOINT_NAME_LEN: usize = 128;

/// The largest record version accepted from a peer (2^62). An owner's clock grows by one per
/// write, so an honest version never comes near it (a million writes a second for 146,000
/// years); a record beyond it is refused as malformed. The room above it keeps every
/// `clock + 1` of the owner exact.
pub const MAX_RECORD_VERSION: u64 = 1 << 62;

/// The most one merged record moves this node's Lamport clock (2^32). An owner's clock follows
/// the cluster's, so an honest record is never that far ahead of what this node has seen; a
/// record further ahead is still taken (a node that just joined knows no clock yet), but without
/// the bound a member's own records could drag every clock towards [`MAX_RECORD_VERSION`] and
/// leave no room for new writes. Exhausting the room now takes 2^30 accepted records.
pub const MAX_VERSION_STEP: u64 = 1 << 32;

/// Whether a name has one owner or many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointKind {
    /// At most one owner cluster-wide (the default).
    Exclusive,
    /// Shared by many owners; a dial picks one.
    Group,
    /// Not an endpoint: an entry of the replicated key/value table (see [`Registry::put`]).
    /// The last write of a key wins: of all its records, the highest `(version, owner)`.
    Value,
}

impl EndpointKind {
    fn to_wire(self) -> wire::EndpointKind {
        match self {
            Self::Exclusive => wire::EndpointKind::Exclusive,
            Self::Group => wire::EndpointKind::Group,
            Self::Value => wire::EndpointKind::Value,
        }
    }
}

/// Longest key of the key/value table, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// Largest value of the key/value table, in bytes: a signed entry with the longest key and
/// value still rides in one membership datagram.
pub const MAX_VALUE_LEN: usize = 512;

/// Checks a key of the key/value table: 1..=128 bytes of `[A-Za-z0-9._/:-]`.
///
/// ```
/// use grinta_proto::registry::validate_key;
/// assert!(validate_key("config/eu-west:limit").is_ok());
/// assert!(validate_key("no spaces").is_err());
/// ```
pub fn validate_key(key: &str) -> Result<(), RegistryError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(RegistryError::InvalidName {
            name: key.chars().take(MAX_KEY_LEN + 8).collect(),
            reason: "a key is 1..=128 bytes long",
        });
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'))
    {
        return Err(RegistryError::InvalidName {
            name: key.to_owned(),
            reason: "a key may only hold A-Z, a-z, 0-9, '.', '_', '-', '/' and ':'",
        });
    }
    Ok(())
}

/// One `(name, owner)` record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// Endpoint name.
    pub name: String,
    /// Owner node name.
    pub owner: String,
    /// Owner's membership incarnation when it wrote the record.
    pub owner_incarnation: u64,
    /// Owner's Lamport clock when it wrote the record.
    pub version: u64,
    /// Claimed (true) or withdrawn (a tombstone).
    pub claimed: bool,
    /// Exclusive or group; or [`EndpointKind::Value`] for a key/value entry.
    pub kind: EndpointKind,
    /// The value of a key/value entry; empty for an endpoint and a tombstone.
    pub value: Bytes,
    /// A key/value entry that outlives its writer (see [`Registry::put_durable`]).
    pub durable: bool,
}

impl Record {
    /// The wire form.
    pub fn to_wire(&self) -> wire::EndpointRecord {
        wire::EndpointRecord {
            name: self.name.clone(),
            owner: self.owner.clone(),
            owner_incarnation: self.owner_incarnation,
            version: self.version,
            state: if self.claimed {
                wire::RecordState::Claimed as i32
            } else {
                wire::RecordState::Withdrawn as i32
            },
            kind: self.kind.to_wire() as i32,
            value: self.value.clone(),
            durable: self.durable,
        }
    }

    /// Reads a wire record; `None` if a field is invalid (bad name or key, unknown state or
    /// kind, a value beyond [`MAX_VALUE_LEN`] or on an endpoint or a tombstone).
    pub fn from_wire(r: &wire::EndpointRecord) -> Option<Self> {
        crate::membership::validate_node_name(&r.owner).ok()?;
        let claimed = match wire::RecordState::try_from(r.state).ok()? {
            wire::RecordState::Claimed => true,
            wire::RecordState::Withdrawn => false,
            wire::RecordState::Unspecified => return None,
        };
        let kind = match wire::EndpointKind::try_from(r.kind).ok()? {
            wire::EndpointKind::Exclusive => EndpointKind::Exclusive,
            wire::EndpointKind::Group => EndpointKind::Group,
            wire::EndpointKind::Value => EndpointKind::Value,
            wire::EndpointKind::Unspecified => return None,
        };
        if kind == EndpointKind::Value {
            validate_key(&r.name).ok()?;
            if r.value.len() > MAX_VALUE_LEN || (!claimed && !r.value.is_empty()) {
                return None;
            }
        } else {
            validate_endpoint_name(&r.name).ok()?;
            if !r.value.is_empty()
                || r.durable
                || (kind == EndpointKind::Exclusive && is_reserved_name(&r.name))
            {
                return None;
            }
        }
        // Numbers a peer chose: refused beyond the documented bounds, so arithmetic on them
        // cannot overflow.
        if r.version > MAX_RECORD_VERSION
            || r.owner_incarnation > crate::membership::MAX_INCARNATION
        {
            return None;
        }
        Some(Self {
            name: r.name.clone(),
            owner: r.owner.clone(),
            owner_incarnation: r.owner_incarnation,
            version: r.version,
            claimed,
            kind,
            value: r.value.clone(),
            durable: r.durable,
        })
    }

    /// The gossip key of this record: replace-by-key in the dissemination queue.
    pub fn gossip_key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.name.len() + self.owner.len() + 3);
        key.extend_from_slice(if self.kind == EndpointKind::Value {
            b"k/"
        } else {
            b"r/"
        });
        key.extend_from_slice(self.name.as_bytes());
        key.push(b'/');
        key.extend_from_slice(self.owner.as_bytes());
        key
    }

    /// Which of two records for the same key wins: the later life of the owner (higher owner
    /// incarnation: a restarted owner's clock starts again, so versions compare only within one
    /// life), then the higher version, then (so that the order is total and merges commute even
    /// on inconsistent input, such as two different records an owner signed at one version)
    /// withdrawn over claimed, group over exclusive, durable over not, the greater value.
    pub fn supersedes(&self, other: &Record) -> bool {
        (
            self.owner_incarnation,
            self.version,
            !self.claimed,
            self.kind,
            self.durable,
            &self.value,
        ) > (
            other.owner_incarnation,
            other.version,
            !other.claimed,
            other.kind,
            other.durable,
            &other.value,
        )
    }
}

/// Checks an endpoint name: 1..=128 bytes of `[A-Za-z0-9._-]`.
///
/// ```
/// use grinta_proto::registry::validate_endpoint_name;
/// assert!(validate_endpoint_name("billing.v2").is_ok());
/// assert!(validate_endpoint_name("bad/name").is_err());
/// ```
pub fn validate_endpoint_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > MAX_ENDPOINT_NAME_LEN {
        return Err(RegistryError::InvalidName {
            name: name.chars().take(MAX_ENDPOINT_NAME_LEN + 8).collect(),
            reason: "an endpoint name is 1..=128 bytes long",
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(RegistryError::InvalidName {
            name: name.to_owned(),
            reason: "an endpoint name may only hold A-Z, a-z, 0-9, '.', '_' and '-'",
        });
    }
    Ok(())
}

/// Endpoint names that start with this are the fabric's own (the handlers of a query topic,
/// `grinta.query.<topic>`): an application cannot register them, and listings and watches of
/// names leave them out.
pub const RESERVED_PREFIX: &str = "grinta.";

/// Whether `name` is one of the fabric's own endpoint names (see [`RESERVED_PREFIX`]).
pub fn is_reserved_name(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// Registry limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Most records (claims and tombstones, all owners) kept; records beyond it are refused.
    pub max_records: usize,
    /// Most endpoints this node may register.
    pub max_local_endpoints: usize,
    /// How long a withdrawn record is kept before it is collected.
    pub tombstone_ttl: Duration,
    /// Most departed owners remembered (the incarnation each was declared gone at, so that late
    /// records of that life are refused); the oldest is forgotten first.
    pub max_departed_owners: usize,
    /// How long a departed owner is remembered: longer than a record of its last life can
    /// still circulate (gossip retransmits, push-pull periods).
    pub departed_owner_ttl: Duration,
    /// Most bytes of records held, as they travel in a push-pull (see [`record_cost`]): the
    /// directory and the key/value table ride together in each push-pull, within the
    /// membership's `max_push_pull_size` (8 MiB), so each keeps to a share of it.
    pub max_bytes: usize,
}

/// What a record costs in a push-pull, in bytes, as [`RegistryLimits::max_bytes`] counts it: its
/// name, owner and value, and 112 bytes for its numbers, signature and framing.
pub fn record_cost(record: &Record) -> usize {
    record.name.len() + record.owner.len() + record.value.len() + 112
}

impl RegistryLimits {
    /// The limits of a node's replicated key/value table: 16,384 keys written by the node
    /// (`max_local_endpoints`), 65,536 records in all (entries and tombstones of every owner)
    /// and 3 MiB of them (`max_bytes`), tombstones and departed owners kept 10 minutes.
    pub fn key_value() -> Self {
        Self {
            max_local_endpoints: 16_384,
            max_bytes: 3 << 20,
            ..Self::default()
        }
    }
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            max_records: 65_536,
            max_local_endpoints: 1024,
            tombstone_ttl: Duration::from_secs(600),
            max_departed_owners: 16_384,
            departed_owner_ttl: Duration::from_secs(600),
            max_bytes: 4 << 20,
        }
    }
}

/// A registry operation that cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The name is not a valid endpoint name.
    #[error("invalid endpoint name {name:?}: {reason}")]
    InvalidName {
        /// The refused name (truncated if very long).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// This node already serves that name.
    #[error("endpoint {name:?} is already registered on this node")]
    AlreadyRegistered {
        /// The name.
        name: String,
    },
    /// Another node already owns that exclusive name.
    #[error("endpoint {name:?} is already owned by node {owner:?}")]
    NameTaken {
        /// The name.
        name: String,
        /// Its current owner.
        owner: String,
    },
    /// The name exists with the other kind (exclusive vs group).
    #[error(
        "endpoint {name:?} exists as a {existing:?} endpoint; it cannot be registered as {requested:?}"
    )]
    KindMismatch {
        /// The name.
        name: String,
        /// The kind it has.
        existing: EndpointKind,
        /// The kind asked for.
        requested: EndpointKind,
    },
    /// This node serves no endpoint of that name.
    #[error("endpoint {name:?} is not registered on this node")]
    NotRegistered {
        /// The name.
        name: String,
    },
    /// A value of the key/value table is larger than [`MAX_VALUE_LEN`].
    #[error("a value of {len} bytes is larger than the limit of {limit} bytes")]
    ValueTooLarge {
        /// The value's size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A table limit was reached.
    #[error("{what} limit of {limit} reached")]
    LimitReached {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
}

/// A change of the directory, as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// A name gained its first live owner.
    NameAdded {
        /// The name.
        name: String,
    },
    /// A name lost its last live owner.
    NameRemoved {
        /// The name.
        name: String,
    },
    /// This node's claim on an exclusive name lost to another owner's; the claim was withdrawn.
    NameConflict {
        /// The name.
        name: String,
        /// The owner that keeps it.
        winner: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    record: Record,
    /// When a tombstone was first seen here (for collection).
    withdrawn_at: Option<Instant>,
    /// The record as its owner signed it, passed on in push-pull.
    signed: Option<wire::Signed>,
}

/// A `(name, owner)` key of the directory's records, owned (as stored) or borrowed (to look one
/// up without copying the strings): both order as the pair of strings does.
trait RecordKey {
    fn parts(&self) -> (&str, &str);
}

impl RecordKey for (String, String) {
    fn parts(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl RecordKey for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn RecordKey + 'a> for (String, String) {
    fn borrow(&self) -> &(dyn RecordKey + 'a) {
        self
    }
}

impl PartialEq for dyn RecordKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn RecordKey + '_ {}

impl PartialOrd for dyn RecordKey + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn RecordKey + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

/// The directory as known by one node.
#[derive(Debug)]
pub struct Registry {
    local: String,
    local_incarnation: u64,
    clock: u64,
    limits: RegistryLimits,
    /// `(name, owner)` -> record.
    records: BTreeMap<(String, String), Entry>,
    /// Owners declared gone: the incarnation they were gone at and when (bounded by
    /// `max_departed_owners` and `departed_owner_ttl`).
    gone: HashMap<String, (u64, Instant)>,
    /// `gone` by age, oldest first.
    gone_by_age: BTreeSet<(Instant, String)>,
    events: VecDeque<RegistryEvent>,
    /// Local records that changed and must be gossiped.
    outbox: VecDeque<Record>,
    /// Names whose local claim lost a conflict (until registered again).
    lost: BTreeSet<String>,
    /// Records from peers dropped because the directory held `max_records`.
    records_refused: u64,
    /// Tombstones by the time they were written, oldest first, so expiry never walks the table.
    /// An entry whose record changed since is skipped when it comes up.
    tombstones: BTreeSet<(Instant, (String, String))>,
    /// Bumped on every change of a record (see [`Registry::generation`]).
    generation: u64,
    /// Live claims (endpoints or entries) of this node.
    local_claims: usize,
    /// What the records held cost ([`record_cost`]).
    bytes: usize,
}

impl Registry {
    /// Records from peers dropped because the directory already held `max_records`.
    pub fn records_refused(&self) -> u64 {
        self.records_refused
    }

    /// An empty directory for node `local`.
    pub fn new(local: &str, limits: RegistryLimits) -> Self {
        Self {
            local: local.to_owned(),
            local_incarnation: 1,
            clock: 0,
            limits,
            records: BTreeMap::new(),
            gone: HashMap::new(),
            gone_by_age: BTreeSet::new(),
            records_refused: 0,
            tombstones: BTreeSet::new(),
            generation: 0,
            local_claims: 0,
            bytes: 0,
            events: VecDeque::new(),
            outbox: VecDeque::new(),
            lost: BTreeSet::new(),
        }
    }

    /// The live owners of `name`, sorted.
    pub fn owners(&self, name: &str) -> Vec<&str> {
        self.claims(name).map(|r| r.owner.as_str()).collect()
    }

    /// The kind of `name`, if it has a live owner.
    pub fn kind(&self, name: &str) -> Option<EndpointKind> {
        self.claims(name).next().map(|r| r.kind)
    }

    /// Names with at least one live owner that start with `prefix`, sorted.
    pub fn names(&self, prefix: &str) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .records
            .range((prefix.to_owned(), String::new())..)
            .take_while(|((n, _), _)| n.starts_with(prefix))
            .filter(|(_, e)| e.record.claimed)
            .map(|((n, _), _)| n.as_str())
            .collect();
        out.dedup();
        out
    }

    /// Whether this node holds a live claim on `name`.
    pub fn is_local(&self, name: &str) -> bool {
        self.record_of(name, &self.local)
            .is_some_and(|e| e.record.claimed)
    }

    /// Whether this node's claim on `name` lost a conflict (and it has not registered it again).
    pub fn lost_conflict(&self, name: &str) -> bool {
        self.lost.contains(name)
    }

    /// Every record (claims and tombstones), sorted by (name, owner).
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values().map(|e| &e.record)
    }

    /// The record of `name` owned by `owner` as its owner signed it, if held with a signature.
    pub fn signed_record(&self, name: &str, owner: &str) -> Option<&wire::Signed> {
        self.records
            .get(&(name.to_owned(), owner.to_owned()))
            .and_then(|e| e.signed.as_ref())
    }

    /// A number that changes whenever a record is written, replaced or removed: a reader that
    /// keeps a view of the table (a watch) rebuilds it only when this moved.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<RegistryEvent> {
        self.events.pop_front()
    }

    /// The next local record to gossip, if any.
    pub fn poll_outgoing(&mut self) -> Option<Record> {
        self.outbox.pop_front()
    }

    /// Live claims on `name`, sorted by owner.
    fn claims<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a Record> + use<'a, 'n> {
        self.records_of(name).filter(|r| r.claimed)
    }

    /// The record of `(name, owner)`.
    fn record_of(&self, name: &str, owner: &str) -> Option<&Entry> {
        self.records.get(&(name, owner) as &dyn RecordKey)
    }

    /// The claim that keeps an exclusive name: the lowest (version, owner). For a group name, every
    /// claim of the winner's kind stays; claims of the other kind lose.
    fn winner(&self, name: &str) -> Option<&Record> {
        self.claims(name)
            .min_by(|a, b| (a.version, &a.owner).cmp(&(b.version, &b.owner)))
    }

    /// Claims `name` for this node. Returns the record to disseminate.
    pub fn register(
        &mut self,
        name: &str,
        kind: EndpointKind,
        now: Instant,
    ) -> Result<Record, RegistryError> {
        validate_endpoint_name(name)?;
        if kind == EndpointKind::Value {
            return Err(RegistryError::InvalidName {
                name: name.to_owned(),
                reason: "a key/value entry is written with put, not registered",
            });
        }
        if is_reserved_name(name) && kind == EndpointKind::Exclusive {
            return Err(RegistryError::InvalidName {
                name: name.to_owned(),
                reason: "names that start with \"grinta.\" are the fabric's own group endpoints",
            });
        }
        if self.is_local(name) {
            return Err(RegistryError::AlreadyRegistered {
                name: name.to_owned(),
            });
        }
        if let Some(existing) = self.winner(name) {
            if existing.kind != kind {
                return Err(RegistryError::KindMismatch {
                    name: name.to_owned(),
                    existing: existing.kind,
                    requested: kind,
                });
            }
            if kind == EndpointKind::Exclusive {
                return Err(RegistryError::NameTaken {
                    name: name.to_owned(),
                    owner: existing.owner.clone(),
                });
            }
        }
        if self.local_claims >= self.limits.max_local_endpoints {
            tracing::debug!(
                endpoint = name,
                "endpoint refused: max_local_endpoints reached"
            );
            return Err(RegistryError::LimitReached {
                what: "max_local_endpoints",
                limit: self.limits.max_local_endpoints,
            });
        }
        let key = (name.to_owned(), self.local.clone());
        if !self.records.contains_key(&key) && self.records.len() >= self.limits.max_records {
            tracing::debug!(endpoint = name, "endpoint refused: max_records reached");
            return Err(RegistryError::LimitReached {
                what: "max_records",
                limit: self.limits.max_records,
            });
        }
        let version = self.clock.saturating_add(1);
        let record = Record {
            name: name.to_owned(),
            owner: self.local.clone(),
            owner_incarnation: self.local_incarnation,
            version,
            claimed: true,
            kind,
            value: Bytes::new(),
            durable: false,
        };
        if !self.fits(&record) {
            return Err(RegistryError::LimitReached {
                what: "max_bytes",
                limit: self.limits.max_bytes,
            });
        }
        self.lost.remove(name);
        self.clock = version;
        self.apply(record.clone(), now);
        Ok(record)
    }

    /// Withdraws this node's claim on `name`. Returns the tombstone to disseminate.
    pub fn unregister(&mut self, name: &str, now: Instant) -> Result<Record, RegistryError> {
        let Some(claim) = self
            .record_of(name, &self.local)
            .filter(|e| e.record.claimed)
            .map(|e| e.record.clone())
        else {
            return Err(RegistryError::NotRegistered {
                name: name.to_owned(),
            });
        };
        let version = tick(&mut self.clock);
        let record = Record {
            claimed: false,
            version,
            owner_incarnation: self.local_incarnation,
            ..claim
        };
        self.apply(record.clone(), now);
        Ok(record)
    }

    /// The membership incarnation of this node changed: re-issue its claims under it, so records of
    /// the previous life cannot be confused with them. The re-issued records go to the outbox.
    /// They keep their versions: a claim's precedence in a name conflict (the lowest version
    /// wins) is when it was made, not when it was last re-issued; the newer incarnation alone
    /// makes the re-issued record supersede the old one.
    pub fn set_local_incarnation(&mut self, incarnation: u64, now: Instant) {
        if incarnation <= self.local_incarnation {
            return;
        }
        self.local_incarnation = incarnation;
        let mine: Vec<Record> = self
            .records
            .values()
            .filter(|e| e.record.owner == self.local)
            .map(|e| e.record.clone())
            .collect();
        for r in mine {
            let record = Record {
                owner_incarnation: incarnation,
                ..r
            };
            self.apply(record.clone(), now);
            self.outbox.push_back(record);
        }
    }

    /// Whether merging `record` could change the table: checked before its signature, so that
    /// repeated news costs no verification.
    pub fn is_news(&self, record: &Record) -> bool {
        if record.version > MAX_RECORD_VERSION
            || self
                .gone
                .get(&record.owner)
                .is_some_and(|&(inc, _)| record.owner_incarnation <= inc)
        {
            return false;
        }
        self.records
            .get(&(record.name.clone(), record.owner.clone()))
            .is_none_or(|e| record.supersedes(&e.record))
    }

    /// Whether `tombstone` withdraws anything this table holds: a record of its own key (an
    /// endpoint's tombstone withdraws its owner's claim alone), or, for a key/value entry, a
    /// write of its key that it outranks (a delete hides every older write of the key, whoever
    /// wrote it). A node takes a tombstone from a peer's whole table only then: taken
    /// regardless, a tombstone came back to the nodes that had collected it, from any peer that
    /// had not yet, and went round for ever.
    pub fn tombstone_applies(&self, tombstone: &Record) -> bool {
        if self.record_of(&tombstone.name, &tombstone.owner).is_some() {
            return true;
        }
        tombstone.kind == EndpointKind::Value
            && self
                .claims(&tombstone.name)
                .any(|c| (c.version, &c.owner) < (tombstone.version, &tombstone.owner))
    }

    /// Merges a record from a peer with its owner's signature (checked by the caller), kept to
    /// pass the record on in push-pull. Returns whether the table changed.
    pub fn merge_signed(&mut self, record: Record, signed: wire::Signed, now: Instant) -> bool {
        let key = (record.name.clone(), record.owner.clone());
        let changed = self.merge(record, now);
        if changed {
            if let Some(entry) = self.records.get_mut(&key) {
                entry.signed = Some(signed);
            }
        }
        changed
    }

    /// Attaches this node's signature to its own `record`, once signed, for push-pull.
    pub fn set_signature(&mut self, record: &Record, signed: wire::Signed) {
        if let Some(entry) = self
            .records
            .get_mut(&(record.name.clone(), record.owner.clone()))
            .filter(|e| e.record == *record)
        {
            entry.signed = Some(signed);
        }
    }

    /// Merges a record learnt from a peer. Returns whether the table changed (and so whether the
    /// record is worth passing on). A record merged this way carries no signature and is not
    /// passed on in push-pull: a node merges with [`merge_signed`](Self::merge_signed).
    pub fn merge(&mut self, record: Record, now: Instant) -> bool {
        if record.version > MAX_RECORD_VERSION
            || record.owner_incarnation > crate::membership::MAX_INCARNATION
        {
            return false;
        }
        if self
            .gone
            .get(&record.owner)
            .is_some_and(|&(inc, _)| record.owner_incarnation <= inc)
        {
            return false;
        }
        self.clock = self.clock.max(
            record
                .version
                .min(self.clock.saturating_add(MAX_VERSION_STEP)),
        );
        if record.owner == self.local {
            // News about our own records that we did not write: a previous life of this node.
            // Out-write it with the current state.
            let key: &dyn RecordKey = &(record.name.as_str(), self.local.as_str());
            let current = self.records.get(key);
            if record.kind == EndpointKind::Value && current.is_none_or(|c| !c.record.claimed) {
                // An entry of a previous life, where this life holds none: never a fresh write
                // (that would outrank every later write of the key). A durable entry is taken
                // back as this life's; any other is withdrawn at its own version; a tombstone
                // needs nothing.
                if current.is_none_or(|c| record.supersedes(&c.record)) && record.claimed {
                    let corrected = if record.durable && current.is_none() {
                        Record {
                            owner_incarnation: self.local_incarnation,
                            ..record
                        }
                    } else {
                        Record {
                            owner_incarnation: self.local_incarnation,
                            claimed: false,
                            value: Bytes::new(),
                            durable: false,
                            ..record
                        }
                    };
                    self.apply(corrected.clone(), now);
                    self.outbox.push_back(corrected);
                }
                return false;
            }
            // A withdrawal of a name this life does not claim says what is already so: nothing
            // to out-write. (Out-writing it with a fresh tombstone made a withdrawal immortal:
            // each time the old tombstone came back after this node had collected its own, a new
            // one went round, and every node kept it another `tombstone_ttl`.)
            if !record.claimed && current.is_none_or(|c| !c.record.claimed) {
                return false;
            }
            if current.is_none_or(|c| record.supersedes(&c.record)) {
                let version = tick(&mut self.clock);
                let corrected = Record {
                    claimed: current.is_some_and(|c| c.record.claimed),
                    version,
                    owner_incarnation: self.local_incarnation,
                    kind: current.map_or(record.kind, |c| c.record.kind),
                    value: current
                        .filter(|c| c.record.claimed)
                        .map_or_else(Bytes::new, |c| c.record.value.clone()),
                    durable: current.is_some_and(|c| c.record.claimed && c.record.durable),
                    ..record
                };
                self.apply(corrected.clone(), now);
                self.outbox.push_back(corrected);
            }
            return false;
        }
        let key = (record.name.clone(), record.owner.clone());
        let full = !self.fits(&record)
            || (!self.records.contains_key(&key) && self.records.len() >= self.limits.max_records);
        match self.records.get(&key) {
            Some(existing) if !record.supersedes(&existing.record) => false,
            _ if full => {
                self.records_refused += 1;
                // Logged at 1, 2, 4, 8, ... refusals: a flood cannot flood the log.
                if self.records_refused.is_power_of_two() {
                    tracing::debug!(
                        refused = self.records_refused,
                        max_records = self.limits.max_records,
                        max_bytes = self.limits.max_bytes,
                        "record from a peer dropped: max_records or max_bytes reached"
                    );
                }
                false
            }
            _ => {
                self.apply(record, now);
                true
            }
        }
    }

    /// Removes every record of `owner` written in the life declared Dead or Left at
    /// `incarnation` (or an older one) and refuses such records from now on. Records of a newer
    /// life, which may arrive before the news of it (a restarted owner registers before the
    /// cluster has heard its new alive), stay.
    pub fn drop_owner(&mut self, owner: &str, incarnation: u64, now: Instant) {
        if owner == self.local {
            return;
        }
        let names: Vec<String> = self
            .records
            .iter()
            .filter(|((_, o), e)| o == owner && e.record.owner_incarnation <= incarnation)
            .map(|((n, _), _)| n.clone())
            .collect();
        let incarnation = match self.gone.remove(owner) {
            Some((known, at)) => {
                self.gone_by_age.remove(&(at, owner.to_owned()));
                known.max(incarnation)
            }
            None => incarnation,
        };
        self.gone.insert(owner.to_owned(), (incarnation, now));
        self.gone_by_age.insert((now, owner.to_owned()));
        while self.gone.len() > self.limits.max_departed_owners {
            let Some((at, oldest)) = self.gone_by_age.pop_first() else {
                break;
            };
            self.gone.remove(&oldest);
            debug_assert!(at <= now, "ages are inserted in time order");
        }
        for name in names {
            let before = self.claims(&name).next().is_some();
            self.remove(&(name.clone(), owner.to_owned()));
            self.after_change(&name, before, now);
        }
    }

    /// `owner` is alive again at `incarnation` (it refuted or rejoined): accept its newer records.
    pub fn owner_alive(&mut self, owner: &str, incarnation: u64) {
        self.owner_back(owner, incarnation, false);
    }

    /// `owner` is a member again at `incarnation`, after membership had forgotten it (a
    /// partition that outlasted the memory of the dead heals, and the member returns in the life
    /// it was declared gone in): accept its records of that life again.
    pub fn owner_returned(&mut self, owner: &str, incarnation: u64) {
        self.owner_back(owner, incarnation, true);
    }

    fn owner_back(&mut self, owner: &str, incarnation: u64, same_life: bool) {
        if let Some(&(gone, at)) = self.gone.get(owner) {
            if incarnation > gone || (same_life && incarnation == gone) {
                self.gone.remove(owner);
                self.gone_by_age.remove(&(at, owner.to_owned()));
            }
        }
    }

    /// Collects tombstones older than `tombstone_ttl` and forgets departed owners older than
    /// `departed_owner_ttl`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ttl = self.limits.tombstone_ttl;
        while let Some((at, _)) = self.tombstones.first() {
            if now.saturating_duration_since(*at) < ttl {
                break;
            }
            let Some((at, key)) = self.tombstones.pop_first() else {
                break;
            };
            if self
                .records
                .get(&key)
                .is_some_and(|e| e.withdrawn_at == Some(at))
            {
                self.remove(&key);
                self.generation = self.generation.wrapping_add(1);
            }
        }
        let departed_ttl = self.limits.departed_owner_ttl;
        while let Some((at, owner)) = self.gone_by_age.first().cloned() {
            if now.saturating_duration_since(at) < departed_ttl {
                break;
            }
            self.gone_by_age.pop_first();
            self.gone.remove(&owner);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The oldest tombstone (perhaps rewritten since: then this is an early, harmless call).
        let tombstone = self
            .tombstones
            .first()
            .map(|(at, _)| *at + self.limits.tombstone_ttl);
        let departed = self
            .gone_by_age
            .first()
            .map(|(at, _)| *at + self.limits.departed_owner_ttl);
        tombstone.into_iter().chain(departed).min()
    }

    /// Departed owners remembered (see [`RegistryLimits::max_departed_owners`]).
    pub fn departed_owners(&self) -> usize {
        self.gone.len()
    }

    /// The full table in wire form, for push-pull: every record with its owner's signature.
    pub fn to_wire(&self) -> wire::RegistryState {
        wire::RegistryState {
            records: self
                .records
                .values()
                .filter_map(|e| e.signed.clone())
                .collect(),
        }
    }

    fn apply(&mut self, record: Record, now: Instant) {
        let name = record.name.clone();
        let before = self.claims(&name).next().is_some();
        self.insert(record, now);
        self.after_change(&name, before, now);
    }

    /// Stores `record` (unsigned until [`set_signature`](Self::set_signature)), keeping the
    /// tombstone index and the count of local claims.
    fn insert(&mut self, record: Record, now: Instant) {
        let withdrawn_at = (!record.claimed).then_some(now);
        if let Some(at) = withdrawn_at {
            self.tombstones
                .insert((at, (record.name.clone(), record.owner.clone())));
        }
        let local = record.owner == self.local;
        let claimed = record.claimed;
        self.bytes += record_cost(&record);
        let old = self.records.insert(
            (record.name.clone(), record.owner.clone()),
            Entry {
                record,
                withdrawn_at,
                signed: None,
            },
        );
        if let Some(old) = &old {
            self.bytes -= record_cost(&old.record);
        }
        if local {
            if old.is_some_and(|e| e.record.claimed) {
                self.local_claims -= 1;
            }
            if claimed {
                self.local_claims += 1;
            }
        }
    }

    /// Removes the record of `key`, keeping the byte count.
    fn remove(&mut self, key: &(String, String)) -> Option<Entry> {
        let old = self.records.remove(key);
        if let Some(old) = &old {
            self.bytes -= record_cost(&old.record);
        }
        old
    }

    /// Whether holding `record` (in place of what its key holds) stays within `max_bytes`.
    fn fits(&self, record: &Record) -> bool {
        let old = self
            .records
            .get(&(record.name.clone(), record.owner.clone()))
            .map_or(0, |e| record_cost(&e.record));
        self.bytes - old + record_cost(record) <= self.limits.max_bytes
    }

    /// What the records held cost ([`record_cost`]), against [`RegistryLimits::max_bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Emits name events and resolves conflicts on `name` after its records changed.
    fn after_change(&mut self, name: &str, had_owner: bool, now: Instant) {
        self.generation = self.generation.wrapping_add(1);
        let is_value = self
            .records_of(name)
            .next()
            .is_some_and(|r| r.kind == EndpointKind::Value);
        if is_value {
            // A local entry overwritten by a later write of another owner is withdrawn, at its
            // own version: the tombstone replaces it but never outranks the later write.
            let overwritten = self
                .last_write(name)
                .is_some_and(|last| last.owner != self.local);
            let mine = self
                .records
                .get(&(name.to_owned(), self.local.clone()))
                .filter(|e| e.record.claimed)
                .map(|e| e.record.clone());
            if let (true, Some(mine)) = (overwritten, mine) {
                let tombstone = Record {
                    claimed: false,
                    value: Bytes::new(),
                    durable: false,
                    ..mine
                };
                self.insert(tombstone.clone(), now);
                self.outbox.push_back(tombstone);
            }
            return;
        }
        // A local claim that loses to another owner's is withdrawn.
        if let Some(winner) = self.winner(name).cloned() {
            let mine = self
                .records
                .get(&(name.to_owned(), self.local.clone()))
                .filter(|e| e.record.claimed)
                .map(|e| e.record.clone());
            if let Some(mine) = mine {
                let loses = winner.owner != self.local
                    && (winner.kind != mine.kind || mine.kind == EndpointKind::Exclusive);
                if loses {
                    let version = tick(&mut self.clock);
                    let tombstone = Record {
                        claimed: false,
                        version,
                        ..mine
                    };
                    self.insert(tombstone.clone(), now);
                    self.outbox.push_back(tombstone);
                    self.lost.insert(name.to_owned());
                    self.events.push_back(RegistryEvent::NameConflict {
                        name: name.to_owned(),
                        winner: winner.owner.clone(),
                    });
                }
            }
        }
        let has_owner = self.claims(name).next().is_some();
        match (had_owner, has_owner) {
            (false, true) => self.events.push_back(RegistryEvent::NameAdded {
                name: name.to_owned(),
            }),
            (true, false) => self.events.push_back(RegistryEvent::NameRemoved {
                name: name.to_owned(),
            }),
            _ => {}
        }
    }

    /// Every record of `name` (claims and tombstones, every owner), sorted by owner.
    fn records_of<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a Record> + use<'a, 'n> {
        let from: &dyn RecordKey = &(name, "");
        self.records
            .range::<dyn RecordKey, _>((Bound::Included(from), Bound::Unbounded))
            .take_while(move |((n, _), _)| n == name)
            .map(|(_, e)| &e.record)
    }

    /// The last write of key/value `key`: of all its records, the highest `(version, owner)`.
    fn last_write(&self, key: &str) -> Option<&Record> {
        self.records_of(key)
            .max_by(|a, b| (a.version, &a.owner).cmp(&(b.version, &b.owner)))
    }

    /// The entry that holds key `key` of a key/value table (its last write, unless that
    /// deleted it).
    ///
    /// ```
    /// use grinta_proto::registry::{Registry, RegistryLimits};
    /// use std::time::Instant;
    ///
    /// let now = Instant::now();
    /// let mut a = Registry::new("node-a", RegistryLimits::default());
    /// let mut b = Registry::new("node-b", RegistryLimits::default());
    /// b.merge(a.put("limit", "10".into(), now)?, now);
    /// b.put("limit", "20".into(), now)?; // later: wins
    /// assert_eq!(&b.get("limit").unwrap().value[..], b"20");
    /// assert_eq!(b.get("limit").unwrap().owner, "node-b");
    /// # Ok::<(), grinta_proto::registry::RegistryError>(())
    /// ```
    pub fn get(&self, key: &str) -> Option<&Record> {
        self.last_write(key).filter(|r| r.claimed)
    }

    /// The entries of a key/value table whose key starts with `prefix`, sorted by key.
    pub fn entries(&self, prefix: &str) -> Vec<&Record> {
        let mut out: Vec<&Record> = Vec::new();
        let mut last: Option<&Record> = None;
        for ((name, _), entry) in self
            .records
            .range((prefix.to_owned(), String::new())..)
            .take_while(|((n, _), _)| n.starts_with(prefix))
        {
            let r = &entry.record;
            match last {
                Some(l) if l.name == *name => {
                    if (r.version, &r.owner) > (l.version, &l.owner) {
                        last = Some(r);
                    }
                }
                _ => {
                    out.extend(last.filter(|l| l.claimed));
                    last = Some(r);
                }
            }
        }
        out.extend(last.filter(|l| l.claimed));
        out
    }

    /// Writes key `key` = `value` in a key/value table, as this node: the write wins over every
    /// earlier one of the key. Returns the record to disseminate.
    ///
    /// Errors: [`RegistryError::InvalidName`] for a key that is not 1..=128 bytes of
    /// `[A-Za-z0-9._/:-]`, [`RegistryError::ValueTooLarge`] beyond [`MAX_VALUE_LEN`],
    /// [`RegistryError::LimitReached`] beyond `max_local_endpoints` keys of this node or
    /// `max_records` in all.
    pub fn put(&mut self, key: &str, value: Bytes, now: Instant) -> Result<Record, RegistryError> {
        let record = self.prepare_write(key, value, false)?;
        self.commit_write(record.clone(), now);
        Ok(record)
    }

    /// Like [`put`](Self::put), for an entry that outlives this node: when it fails or leaves,
    /// the live member with the lowest node name writes the entry again as its own (see
    /// [`durable_entries_of`](Self::durable_entries_of)).
    pub fn put_durable(
        &mut self,
        key: &str,
        value: Bytes,
        now: Instant,
    ) -> Result<Record, RegistryError> {
        let record = self.prepare_write(key, value, true)?;
        self.commit_write(record.clone(), now);
        Ok(record)
    }

    /// Writes `record`, made by [`prepare_write`](Self::prepare_write) (a node checks that its
    /// signed form fits a gossip item in between).
    pub fn commit_write(&mut self, record: Record, now: Instant) {
        self.clock = self.clock.max(record.version);
        self.apply(record, now);
    }

    /// Takes over `entry`, a durable entry of a node that is gone: written as this node's,
    /// whatever this node's own key limit (the cluster keeps the entry).
    pub fn adopt(&mut self, entry: &Record, now: Instant) -> Result<Record, RegistryError> {
        let mut record = self.prepare(&entry.name, entry.value.clone(), true, false)?;
        record.durable = true;
        self.commit_write(record.clone(), now);
        Ok(record)
    }

    /// The durable entries `owner` holds (the last writes of their keys), to take over when it
    /// is gone.
    pub fn durable_entries_of(&self, owner: &str) -> Vec<Record> {
        self.records
            .values()
            .map(|e| &e.record)
            .filter(|r| r.owner == owner && r.claimed && r.durable)
            .filter(|r| self.last_write(&r.name) == Some(*r))
            .cloned()
            .collect()
    }

    /// The record a write of `key` = `value` would make, checked against every limit, without
    /// writing it (see [`commit_write`](Self::commit_write)).
    pub fn prepare_write(
        &mut self,
        key: &str,
        value: Bytes,
        durable: bool,
    ) -> Result<Record, RegistryError> {
        self.prepare(key, value, durable, true)
    }

    fn prepare(
        &mut self,
        key: &str,
        value: Bytes,
        durable: bool,
        local_limit: bool,
    ) -> Result<Record, RegistryError> {
        validate_key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(RegistryError::ValueTooLarge {
                len: value.len(),
                limit: MAX_VALUE_LEN,
            });
        }
        let mine = self
            .records
            .get(&(key.to_owned(), self.local.clone()))
            .map(|e| e.record.claimed);
        if local_limit && mine != Some(true) && self.local_claims >= self.limits.max_local_endpoints
        {
            return Err(RegistryError::LimitReached {
                what: "max_local_entries",
                limit: self.limits.max_local_endpoints,
            });
        }
        if mine.is_none() && self.records.len() >= self.limits.max_records {
            return Err(RegistryError::LimitReached {
                what: "max_records",
                limit: self.limits.max_records,
            });
        }
        let version = self.write_version(key)?;
        let record = Record {
            name: key.to_owned(),
            owner: self.local.clone(),
            owner_incarnation: self.local_incarnation,
            version,
            claimed: true,
            kind: EndpointKind::Value,
            value,
            durable,
        };
        if !self.fits(&record) {
            return Err(RegistryError::LimitReached {
                what: "max_bytes",
                limit: self.limits.max_bytes,
            });
        }
        Ok(record)
    }

    /// Deletes key `key` of a key/value table, whoever wrote it: a tombstone of this node that
    /// wins over every earlier write. Returns the tombstone to disseminate, or `None` if the
    /// key holds no entry.
    pub fn delete(&mut self, key: &str, now: Instant) -> Result<Option<Record>, RegistryError> {
        validate_key(key)?;
        if self.get(key).is_none() {
            return Ok(None);
        }
        let version = self.write_version(key)?;
        self.clock = version;
        let tombstone = Record {
            name: key.to_owned(),
            owner: self.local.clone(),
            owner_incarnation: self.local_incarnation,
            version,
            claimed: false,
            kind: EndpointKind::Value,
            value: Bytes::new(),
            durable: false,
        };
        self.apply(tombstone.clone(), now);
        Ok(Some(tombstone))
    }

    /// The version of a new write of `key`: the next of this node's clock, and above every
    /// write of the key seen (a merged write far ahead moved the clock by
    /// [`MAX_VERSION_STEP`] only). The clock moves when the write is committed.
    /// [`RegistryError::LimitReached`] if that would pass [`MAX_RECORD_VERSION`]: a key written
    /// at the very top of the range can no longer be outranked.
    fn write_version(&self, key: &str) -> Result<u64, RegistryError> {
        let seen = self.last_write(key).map_or(0, |r| r.version);
        let version = self.clock.max(seen).saturating_add(1);
        if version > MAX_RECORD_VERSION {
            return Err(RegistryError::LimitReached {
                what: "record version",
                limit: usize::try_from(MAX_RECORD_VERSION).unwrap_or(usize::MAX),
            });
        }
        Ok(version)
    }

    /// Moves this node's clock to at least `floor` (at most half the version range): the
    /// key/value table starts its clock at the node's start time, so that the writes of a node
    /// restarted under the same name follow those of its previous life.
    pub fn raise_clock(&mut self, floor: u64) {
        self.clock = self.clock.max(floor.min(MAX_RECORD_VERSION / 2));
    }

    /// Live owners of `name` that win it: the single winner of an exclusive name, every claim of
    /// the winning kind for a group name.
    pub fn resolve(&self, name: &str) -> Vec<&str> {
        let Some(winner) = self.winner(name) else {
            return Vec::new();
        };
        match winner.kind {
            // Entries of the key/value table are not endpoints.
            EndpointKind::Value => Vec::new(),
            EndpointKind::Exclusive => vec![winner.owner.as_str()],
            EndpointKind::Group => {
                let kind = winner.kind;
                let set: BTreeSet<&str> = self
                    .claims(name)
                    .filter(|r| r.kind == kind)
                    .map(|r| r.owner.as_str())
                    .collect();
                set.into_iter().collect()
            }
        }
    }
}

/// Advances a node's Lamport clock for a write of its own. Merged versions are at most
/// [`MAX_RECORD_VERSION`] (larger ones are refused), so the clock stays exact; the saturation
/// only guards the impossible.
fn tick(clock: &mut u64) -> u64 {
    *clock = clock.saturating_add(1);
    *clock
}

#[cfg(test)]
mod tests;
