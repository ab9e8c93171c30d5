//! The member table: one compact entry per known member, found by name.
//!
//! A node of a 10,000-member cluster holds 10,000 entries, and a simulation of that cluster holds
//! a hundred million, so an entry keeps only what every member has, in 48 bytes:
//!
//! - a name of up to 15 bytes, an IPv4 address and port, the incarnation, the state, when the
//!   state last changed (in tenths of a second) and the push-pull fingerprint;
//! - the rest in a box that most entries of an unsigned run never need ([`Extra`]): a longer
//!   name, an IPv6 address, the metadata when there is some, the alive's signature and
//!   certificates, the alive's body when it does not re-encode from the entry, and the signed
//!   leave of a member that left.
//!
//! The name lives in the entry alone: the index stores positions, hashed by the name they point
//! at, and the probe walk stores positions too.

use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashTable};

use super::{Member, MemberState};
use crate::wire;

/// Longest name kept in the entry itself; longer ones live in its box.
const INLINE_NAME: usize = 15;

/// The length byte of a name kept in the box.
const NAME_IN_BOX: u8 = u8::MAX;

/// Unit of [`Entry::since`]: state times are kept to a tenth of a second, which a `u32` counts
/// for 13.6 years of the table's life. Past that, every change reads as made at that point, so
/// times in state are overstated; no node is expected to run that long without a restart.
const SINCE_UNIT_MS: u64 = 100;

/// One known member.
#[derive(Debug)]
pub(super) struct Entry {
    /// `[length, bytes..]` of a name of up to [`INLINE_NAME`] bytes; `[NAME_IN_BOX, 0..]` for a
    /// longer name, kept in `extra`.
    name: [u8; 1 + INLINE_NAME],
    /// The latest incarnation known, from its own alive or from an accusation or leave.
    pub(super) incarnation: u64,
    extra: Option<Box<Extra>>,
    /// When the state last changed, in tenths of a second after the table's epoch, rounded up
    /// (so a time in state is never overstated within [`SINCE_UNIT_MS`]'s 13.6 years).
    since: u32,
    /// [`fingerprint`](super::push_pull::fingerprint) of the address and metadata, for
    /// push-pull digests.
    fingerprint: u32,
    /// The IPv4 address, or zeros when the address is IPv6 (kept in `extra`).
    ip4: [u8; 4],
    port: u16,
    /// Changed only through the table, which keeps its sum.
    pub(super) state: MemberState,
    /// A hint from the node driving this state machine: it holds an open connection to the
    /// member (see [`Membership::set_connected`](super::Membership::set_connected)).
    pub(super) connected: bool,
}

/// What only some entries need.
#[derive(Debug, Default)]
struct Extra {
    /// A name longer than [`INLINE_NAME`] bytes.
    long_name: Option<Box<str>>,
    /// An IPv6 address (with its flow information and scope).
    addr6: Option<SocketAddr>,
    meta: Bytes,
    /// The latest alive as signed; its `body` is empty when it re-encodes from the entry (name,
    /// address, `alive_incarnation`, metadata).
    alive: wire::Signed,
    /// The incarnation of that alive when the entry's moved past it (an accusation or leave).
    alive_incarnation: Option<u64>,
    /// The member's signed leave, while it is Left.
    leave: Option<wire::Signed>,
}

impl Entry {
    fn new(name: &str) -> Self {
        let mut entry = Self {
            name: [0; 1 + INLINE_NAME],
            incarnation: 0,
            extra: None,
            since: 0,
            fingerprint: 0,
            ip4: [0; 4],
            port: 0,
            state: MemberState::Alive,
            connected: false,
        };
        if name.len() <= INLINE_NAME {
            entry.name[0] = name.len() as u8;
            entry.name[1..=name.len()].copy_from_slice(name.as_bytes());
        } else {
            entry.name[0] = NAME_IN_BOX;
            entry.extra_mut().long_name = Some(name.into());
        }
        entry
    }

    fn name_bytes(&self) -> &[u8] {
        match self.name[0] {
            NAME_IN_BOX => self
                .extra
                .as_ref()
                .and_then(|x| x.long_name.as_deref())
                .map_or(&[][..], str::as_bytes),
            len => &self.name[1..=usize::from(len).min(INLINE_NAME)],
        }
    }

    pub(super) fn name(&self) -> &str {
        // Copied from a `&str` whole: always UTF-8.
        std::str::from_utf8(self.name_bytes()).unwrap_or_default()
    }

    /// The member's address.
    pub(super) fn addr(&self) -> SocketAddr {
        // An IPv6 address is kept in `extra` (and only then).
        match self.extra.as_ref().and_then(|x| x.addr6) {
            Some(addr) => addr,
            None => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(self.ip4), self.port)),
        }
    }

    fn set_addr(&mut self, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(v4) => {
                self.ip4 = v4.ip().octets();
                self.port = v4.port();
                if let Some(x) = self.extra.as_mut() {
                    x.addr6 = None;
                }
            }
            SocketAddr::V6(_) => {
                self.ip4 = [0; 4];
                self.port = addr.port();
                self.extra_mut().addr6 = Some(addr);
            }
        }
    }

    pub(super) fn meta(&self) -> Bytes {
        self.extra
            .as_ref()
            .map(|x| x.meta.clone())
            .unwrap_or_default()
    }

    /// The push-pull fingerprint of the member's address and metadata.
    pub(super) fn fingerprint(&self) -> u32 {
        self.fingerprint
    }

    pub(super) fn meta_bytes(&self) -> &[u8] {
        self.extra.as_ref().map_or(&[][..], |x| &x.meta[..])
    }

    pub(super) fn meta_eq(&self, meta: &[u8]) -> bool {
        self.meta_bytes() == meta
    }

    /// The member as the public API shows it.
    pub(super) fn member(&self) -> Member {
        Member {
            name: self.name().to_owned(),
            addr: self.addr(),
            incarnation: self.incarnation,
            state: self.state,
            meta: self.meta(),
        }
    }

    fn alive_incarnation(&self) -> u64 {
        self.extra
            .as_ref()
            .and_then(|x| x.alive_incarnation)
            .unwrap_or(self.incarnation)
    }

    fn encode_alive_body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        self.encode_alive_body_into(&mut body);
        body
    }

    /// Whether the entry encodes its alive as exactly `body`: on the stack when it fits (an
    /// unsigned member's alive is about 34 bytes), without an allocation.
    fn alive_body_is(&self, body: &[u8]) -> bool {
        const STACK: usize = 160;
        // Beyond the name and the metadata, an alive takes at most 59 bytes (keys, lengths, a
        // 10-byte incarnation, an IPv6 address and port).
        if self.name().len() + self.meta_bytes().len() + 64 <= STACK {
            let mut stack = [0u8; STACK];
            let mut rest = &mut stack[..];
            self.encode_alive_body_into(&mut rest);
            let len = STACK - rest.len();
            stack[..len] == *body
        } else {
            self.encode_alive_body()[..] == *body
        }
    }

    fn encode_alive_body_into(&self, out: &mut impl bytes::BufMut) {
        super::encode_alive_fields(
            self.name(),
            self.alive_incarnation(),
            self.addr(),
            self.meta_bytes(),
            out,
        );
    }

    /// The entry as a push-pull carries it in full.
    pub(super) fn to_wire(&self) -> wire::MemberEntry {
        wire::MemberEntry {
            node: self.name().to_owned(),
            addr: Some(super::encode_addr(self.addr())),
            incarnation: self.incarnation,
            state: self.state.to_wire() as i32,
            meta: self.meta(),
            alive: Some(self.alive()),
            leave: self.leave().cloned(),
        }
    }

    /// Appends [`to_wire`](Self::to_wire) encoded, byte for byte as prost encodes it, without
    /// building it (in a whole state of 10,000 members that was seven allocations per member).
    /// `body` is a buffer the caller keeps, for the alive's body.
    pub(super) fn put_wire(&self, out: &mut Vec<u8>, body: &mut Vec<u8>) {
        use crate::wire::{delimited_len, put_delimited};
        use prost::encoding::{WireType, encode_key, encode_varint, uint32};
        let name = self.name();
        if !name.is_empty() {
            put_delimited(1, name.as_bytes(), out);
        }
        super::put_socket_address(2, self.addr(), out);
        if self.incarnation != 0 {
            prost::encoding::uint64::encode(3, &self.incarnation, out);
        }
        let state = self.state.to_wire() as i32;
        if state != 0 {
            prost::encoding::int32::encode(4, &state, out);
        }
        let meta = self.meta_bytes();
        if !meta.is_empty() {
            put_delimited(5, meta, out);
        }
        match &self.extra {
            Some(x) if !x.alive.body.is_empty() => {
                prost::encoding::message::encode(6, &x.alive, out);
            }
            extra => {
                // The alive's body comes back from the entry; the rest of the envelope (if
                // signed) is kept. `Signed`: body (1), scheme (2), signature (3),
                // certificates (4), each left out when empty.
                body.clear();
                self.encode_alive_body_into(body);
                let envelope = extra.as_ref().map(|x| &x.alive);
                let scheme = envelope.map_or(0, |a| a.scheme);
                let signature = envelope.map_or(&[][..], |a| &a.signature[..]);
                let certificates = envelope.map_or(&[][..], |a| &a.certificates[..]);
                let optional = |tag, bytes: &[u8]| {
                    if bytes.is_empty() {
                        0
                    } else {
                        delimited_len(tag, bytes.len())
                    }
                };
                let mut len = optional(1, body) + optional(3, signature);
                if scheme != 0 {
                    len += uint32::encoded_len(2, &scheme);
                }
                len += certificates
                    .iter()
                    .map(|c| delimited_len(4, c.len()))
                    .sum::<usize>();
                encode_key(6, WireType::LengthDelimited, out);
                encode_varint(len as u64, out);
                if !body.is_empty() {
                    put_delimited(1, body, out);
                }
                if scheme != 0 {
                    uint32::encode(2, &scheme, out);
                }
                if !signature.is_empty() {
                    put_delimited(3, signature, out);
                }
                for certificate in certificates {
                    put_delimited(4, certificate, out);
                }
            }
        }
        if let Some(leave) = self.leave() {
            prost::encoding::message::encode(7, leave, out);
        }
    }

    /// The member's latest alive, as it signed it.
    pub(super) fn alive(&self) -> wire::Signed {
        match &self.extra {
            Some(x) if !x.alive.body.is_empty() => x.alive.clone(),
            Some(x) => wire::Signed {
                body: self.encode_alive_body().into(),
                ..x.alive.clone()
            },
            None => wire::Signed {
                body: self.encode_alive_body().into(),
                ..Default::default()
            },
        }
    }

    pub(super) fn leave(&self) -> Option<&wire::Signed> {
        self.extra.as_ref().and_then(|x| x.leave.as_ref())
    }

    /// Takes a new alive of the member (`claim`, whose body says `incarnation`, `addr` and
    /// `meta`): the member is Alive again, at that incarnation and address.
    fn set_alive(&mut self, incarnation: u64, addr: SocketAddr, meta: Bytes, claim: &wire::Signed) {
        self.incarnation = incarnation;
        self.state = MemberState::Alive;
        self.fingerprint = super::push_pull::fingerprint(addr, &meta);
        let long_name = self.extra.as_mut().and_then(|x| x.long_name.take());
        // An alive that came by gossip without its certificate chain (too large for a packet)
        // was checked against the certificate learnt before: the chain kept from the member's
        // previous alive stays, so that a push-pull still hands the member's claim over whole.
        let kept_chain = if claim.certificates.is_empty() {
            self.extra
                .as_mut()
                .map(|x| std::mem::take(&mut x.alive.certificates))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let signed = claim.scheme != 0
            || !claim.signature.is_empty()
            || !claim.certificates.is_empty()
            || !kept_chain.is_empty();
        self.extra = (long_name.is_some() || !meta.is_empty() || signed).then(|| {
            // Copied out of the received packet, without the body (kept below only if needed).
            let mut alive = crate::claims::compact(&wire::Signed {
                body: Bytes::new(),
                ..claim.clone()
            });
            if alive.certificates.is_empty() {
                alive.certificates = kept_chain;
            }
            Box::new(Extra {
                long_name,
                addr6: None,
                meta,
                alive,
                alive_incarnation: None,
                leave: None,
            })
        });
        self.set_addr(addr);
        // Keep the body only when it does not come back from the entry byte for byte (a signer
        // may encode fields we do not know, or in another order).
        if !self.alive_body_is(&claim.body) {
            self.extra_mut().alive.body = Bytes::copy_from_slice(&claim.body);
        }
    }

    /// The member is gone at `incarnation`: Left with its signed `leave`, or Dead.
    fn set_gone(&mut self, incarnation: u64, leave: Option<wire::Signed>) {
        if incarnation != self.alive_incarnation() {
            let alive_incarnation = self.alive_incarnation();
            self.extra_mut().alive_incarnation = Some(alive_incarnation);
        }
        self.incarnation = incarnation;
        self.state = if leave.is_some() {
            MemberState::Left
        } else {
            MemberState::Dead
        };
        if leave.is_some() || self.extra.is_some() {
            self.extra_mut().leave = leave;
        }
    }

    /// How long the member has been in its state at `now`, given the table's epoch (to within
    /// a tenth of a second, never more than it has been).
    pub(super) fn in_state_for(&self, epoch: Instant, now: Instant) -> Duration {
        let at = epoch
            .checked_add(Duration::from_millis(u64::from(self.since) * SINCE_UNIT_MS))
            .unwrap_or(epoch);
        now.saturating_duration_since(at)
    }

    /// This entry's share of the table's [`sum`](MemberTable::sum).
    fn version_hash(&self) -> u64 {
        super::push_pull::version_hash(self.name(), self.incarnation, self.state, self.fingerprint)
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }
}

/// Makes room in `v` for one more element. Past a thousand, it grows by an eighth rather than
/// doubling: a vector held per known member (the member table, the probe walk) wastes at most
/// an eighth of its room, and growth stays geometric.
pub(super) fn make_room_for_one<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() && v.len() >= 1024 {
        v.reserve_exact(v.len() / 8);
    }
}

/// Every member this node knows, found by name in constant time.
#[derive(Debug)]
pub(super) struct MemberTable {
    entries: Vec<Entry>,
    /// Positions in `entries`, hashed by the name of the entry they point at.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    epoch: Instant,
    /// The XOR of every entry's version hash (name, incarnation, state, fingerprint): two
    /// tables that hold the same versions have the same sum, kept up to date by every change.
    sum: u64,
}

impl MemberTable {
    pub(super) fn new(epoch: Instant) -> Self {
        Self {
            entries: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            epoch,
            sum: 0,
        }
    }

    /// The XOR of every entry's version hash.
    pub(super) fn sum(&self) -> u64 {
        self.sum
    }

    /// Changes entry `i` with `change`, keeping the sum.
    fn change(&mut self, i: usize, change: impl FnOnce(&mut Entry)) {
        let e = &mut self.entries[i];
        self.sum ^= e.version_hash();
        change(e);
        self.sum ^= e.version_hash();
    }

    /// Takes a new alive of member `i` (`claim`, whose body says `incarnation`, `addr` and
    /// `meta`): it is Alive again, at that incarnation and address.
    pub(super) fn set_alive(
        &mut self,
        i: usize,
        incarnation: u64,
        addr: SocketAddr,
        meta: Bytes,
        claim: &wire::Signed,
    ) {
        self.change(i, |e| e.set_alive(incarnation, addr, meta, claim));
    }

    /// Member `i` is gone at `incarnation`: Left with its signed `leave`, or Dead.
    pub(super) fn set_gone(&mut self, i: usize, incarnation: u64, leave: Option<wire::Signed>) {
        self.change(i, |e| e.set_gone(incarnation, leave));
    }

    /// Member `i` is suspected (at its incarnation).
    pub(super) fn set_suspect(&mut self, i: usize) {
        self.change(i, |e| e.state = MemberState::Suspect);
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// Where member `name` is.
    pub(super) fn find(&self, name: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(name);
        self.index
            .find(hash, |&i| {
                self.entries[i as usize].name_bytes() == name.as_bytes()
            })
            .map(|&i| i as usize)
    }

    /// Adds a new member, Alive since `now`, and returns its position. The caller checked that
    /// it is not known yet.
    pub(super) fn insert(
        &mut self,
        now: Instant,
        name: &str,
        incarnation: u64,
        addr: SocketAddr,
        meta: Bytes,
        claim: &wire::Signed,
    ) -> usize {
        let i = self.entries.len();
        let mut entry = Entry::new(name);
        entry.set_alive(incarnation, addr, meta, claim);
        entry.since = self.since(now);
        make_room_for_one(&mut self.entries);
        self.sum ^= entry.version_hash();
        self.entries.push(entry);
        let hash = self.hasher.hash_one(name);
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(hash, i as u32, |&j| {
            hasher.hash_one(entries[j as usize].name())
        });
        i
    }

    /// Forgets member `name`; the last entry takes its position.
    pub(super) fn remove(&mut self, name: &str) -> bool {
        let Some(i) = self.find(name) else {
            return false;
        };
        let hash = self.hasher.hash_one(name);
        if let Ok(slot) = self.index.find_entry(hash, |&j| j as usize == i) {
            slot.remove();
        }
        self.sum ^= self.entries.swap_remove(i).version_hash();
        if let Some(moved) = self.entries.get(i) {
            let last = self.entries.len();
            let hash = self.hasher.hash_one(moved.name());
            if let Some(slot) = self.index.find_mut(hash, |&j| j as usize == last) {
                *slot = i as u32;
            }
        }
        true
    }

    /// `now` in [`Entry::since`]'s unit: tenths of a second after the epoch, rounded up.
    fn since(&self, now: Instant) -> u32 {
        let ms = now.saturating_duration_since(self.epoch).as_millis();
        u32::try_from(ms.div_ceil(u128::from(SINCE_UNIT_MS))).unwrap_or(u32::MAX)
    }

    /// How long entry `e` has been in its state at `now`.
    pub(super) fn in_state_for(&self, e: &Entry, now: Instant) -> Duration {
        e.in_state_for(self.epoch, now)
    }

    /// The instant state times count from (for [`Entry::in_state_for`]).
    pub(super) fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Records whether the node holds an open connection to member `i` (a hint for picking
    /// gossip targets; not part of the table's sum).
    pub(super) fn set_connected(&mut self, i: usize, connected: bool) {
        self.entries[i].connected = connected;
    }

    /// Records that entry `i`'s state changed at `now`.
    pub(super) fn touch(&mut self, i: usize, now: Instant) {
        self.entries[i].since = self.since(now);
    }
}

impl std::ops::Index<usize> for MemberTable {
    type Output = Entry;

    fn index(&self, i: usize) -> &Entry {
        &self.entries[i]
    }
}

impl<'a> IntoIterator for &'a MemberTable {
    type Item = &'a Entry;
    type IntoIter = std::slice::Iter<'a, Entry>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::encode_addr;
    use prost::Message;

    fn claim() -> wire::Signed {
        wire::Signed::default()
    }

    #[test]
    fn the_sum_follows_every_change_of_10000_entries() {
        let now = Instant::now();
        let mut t = MemberTable::new(now);
        let from_scratch = |t: &MemberTable| t.iter().fold(0u64, |sum, e| sum ^ e.version_hash());
        for k in 0..10_000u32 {
            let addr = SocketAddr::from(([127, 0, 0, 1], (k % 60_000) as u16 + 1));
            t.insert(now, &format!("member-{k}"), 1, addr, Bytes::new(), &claim());
        }
        assert_eq!(t.sum(), from_scratch(&t));
        for k in (0..10_000u32).step_by(3) {
            t.remove(&format!("member-{k}"));
        }
        for k in (1..10_000u32).step_by(3) {
            let i = t.find(&format!("member-{k}")).expect("kept");
            match k % 4 {
                0 => t.set_suspect(i),
                1 => t.set_gone(i, 2, None),
                2 => t.set_gone(i, 2, Some(claim())),
                _ => {
                    let addr = SocketAddr::from(([127, 0, 0, 2], 9));
                    t.set_alive(i, 3, addr, Bytes::from_static(b"meta"), &claim());
                }
            }
        }
        assert_eq!(t.sum(), from_scratch(&t));
        // Two tables that hold the same versions, built in another order, agree.
        let mut u = MemberTable::new(now);
        for e in t.iter().rev() {
            let i = u.insert(now, e.name(), e.incarnation, e.addr(), e.meta(), &claim());
            match e.state {
                MemberState::Alive => {}
                MemberState::Suspect => u.set_suspect(i),
                MemberState::Dead => u.set_gone(i, e.incarnation, None),
                MemberState::Left => u.set_gone(i, e.incarnation, Some(claim())),
            }
        }
        assert_eq!(u.sum(), t.sum());
        u.set_suspect(0);
        assert_ne!(u.sum(), t.sum());
    }

    #[test]
    fn an_entry_takes_48_bytes() {
        assert!(
            std::mem::size_of::<Entry>() <= 48,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn short_and_long_names_are_found() {
        let now = Instant::now();
        let mut t = MemberTable::new(now);
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let long = "a-name-longer-than-fifteen-bytes.example.com";
        let v6: SocketAddr = "[fe80::1%3]:7000".parse().unwrap();
        for name in ["", "x", "fifteen-bytes!!", "sixteen-bytes!!!", long] {
            t.insert(now, name, 1, addr, Bytes::new(), &claim());
            let i = t.find(name).expect("found");
            assert_eq!(t[i].name[0] == NAME_IN_BOX, name.len() > 15, "{name}");
        }
        for name in ["", "x", "fifteen-bytes!!", "sixteen-bytes!!!", long] {
            let i = t.find(name).expect("found");
            assert_eq!(t[i].name(), name);
            assert_eq!(t[i].addr(), addr);
            // Moved to an IPv6 address (scope kept) and back, with the name kept.
            t.set_alive(i, 2, v6, Bytes::new(), &claim());
            assert_eq!((t[i].name(), t[i].addr()), (name, v6));
            t.set_alive(i, 3, addr, Bytes::from_static(b"m"), &claim());
            assert_eq!((t[i].name(), t[i].addr()), (name, addr));
            assert_eq!(&t[i].meta()[..], b"m");
            t.set_gone(i, 4, None);
            assert_eq!((t[i].name(), t[i].addr()), (name, addr));
        }
        assert_eq!(t.find("fifteen-bytes!"), None);
        assert_eq!(t.find("sixteen-bytes!!"), None);
    }

    #[test]
    fn entries_are_found_by_name_after_removals() {
        let now = Instant::now();
        let mut t = MemberTable::new(now);
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        for i in 0..10_000u64 {
            t.insert(now, &format!("n{i}"), i, addr, Bytes::new(), &claim());
        }
        for i in (0..10_000u64).step_by(3) {
            assert!(t.remove(&format!("n{i}")));
        }
        assert!(!t.remove("n0"));
        for i in 0..10_000u64 {
            let found = t.find(&format!("n{i}"));
            if i % 3 == 0 {
                assert_eq!(found, None);
            } else {
                let e = &t[found.expect("kept")];
                assert_eq!((e.name(), e.incarnation), (&*format!("n{i}"), i));
            }
        }
        assert_eq!(t.len(), 10_000 - 3334);
    }

    #[test]
    fn an_unsigned_canonical_alive_needs_no_box_and_comes_back_whole() {
        let now = Instant::now();
        let mut t = MemberTable::new(now);
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let body = wire::Alive {
            node: "b".into(),
            incarnation: 3,
            addr: Some(encode_addr(addr)),
            meta: Bytes::new(),
        }
        .encode_to_vec();
        let signed = wire::Signed {
            body: body.clone().into(),
            ..Default::default()
        };
        let i = t.insert(now, "b", 3, addr, Bytes::new(), &signed);
        assert!(t[i].extra.is_none());
        assert_eq!(t[i].alive(), signed);
        // Declared dead at a later incarnation: the alive still says 3.
        t.set_gone(i, 5, None);
        assert_eq!(t[i].incarnation, 5);
        assert_eq!(t[i].alive(), signed);
        // A body with an unknown field is kept as it came.
        let mut odd = body.clone();
        odd.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
        let odd = wire::Signed {
            body: odd.into(),
            signature: Bytes::from_static(b"sig"),
            scheme: 0x0807,
            ..Default::default()
        };
        t.set_alive(i, 3, addr, Bytes::new(), &odd);
        assert_eq!(t[i].alive(), odd);
        assert_eq!(t[i].state, MemberState::Alive);
    }

    #[test]
    fn state_times_are_never_overstated_and_kept_to_a_tenth_of_a_second() {
        let now = Instant::now();
        let mut t = MemberTable::new(now);
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let i = t.insert(now, "b", 1, addr, Bytes::new(), &claim());
        let later = now + Duration::from_millis(1530);
        t.touch(i, later);
        assert_eq!(t.in_state_for(&t[i], later), Duration::ZERO);
        assert_eq!(
            t.in_state_for(&t[i], later + Duration::from_secs(2)),
            Duration::from_millis(1930)
        );
        // Ten years on, times are still counted.
        let decade = now + Duration::from_secs(10 * 365 * 86_400);
        t.touch(i, decade);
        assert_eq!(
            t.in_state_for(&t[i], decade + Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn alive_fields_encode_byte_for_byte_as_prost_does() {
        let addrs: [SocketAddr; 5] = [
            "127.0.0.1:7946".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
            "10.1.2.3:65535".parse().unwrap(),
            "[::1]:1".parse().unwrap(),
            "[fe80::1:2:3:4]:300".parse().unwrap(),
        ];
        let long_name = "n".repeat(300);
        let long_meta = [7u8; 200];
        for node in ["", "a", "node-9999", long_name.as_str()] {
            for incarnation in [0, 1, 127, 128, u64::MAX] {
                for addr in addrs {
                    for meta in [&[][..], &b"m"[..], &long_meta[..]] {
                        let expected = wire::Alive {
                            node: node.to_owned(),
                            incarnation,
                            addr: Some(encode_addr(addr)),
                            meta: Bytes::copy_from_slice(meta),
                        }
                        .encode_to_vec();
                        let mut got = Vec::new();
                        crate::membership::encode_alive_fields(
                            node,
                            incarnation,
                            addr,
                            meta,
                            &mut got,
                        );
                        assert_eq!(got, expected, "{node:?} {incarnation} {addr} {meta:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_entry_encodes_for_push_pull_byte_for_byte_as_prost_does() {
        let now = Instant::now();
        let mut table = MemberTable::new(now);
        let alive_body = |name: &str, incarnation: u64, addr: SocketAddr, meta: &[u8]| {
            let mut body = Vec::new();
            crate::membership::encode_alive_fields(name, incarnation, addr, meta, &mut body);
            Bytes::from(body)
        };
        let signed = |body: Bytes| wire::Signed {
            body,
            scheme: 0x0807,
            signature: Bytes::from_static(&[9; 64]),
            certificates: vec![Bytes::from_static(&[1; 300]), Bytes::new()],
        };
        let v4: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        let v6: SocketAddr = "[fe80::1]:0".parse().unwrap();
        let long = "a-member-name-longer-than-fifteen-bytes";
        let cases: Vec<(&str, u64, SocketAddr, &[u8], wire::Signed)> = vec![
            ("a", 1, v4, b"", claim()),
            ("b", 0, v6, b"meta", claim()),
            (long, u64::MAX, v4, b"", claim()),
            ("c", 7, v4, b"m", signed(alive_body("c", 7, v4, b"m"))),
            // A body the entry does not encode the same (an unknown field): kept as it came.
            (
                "d",
                3,
                v6,
                b"",
                signed({
                    let mut b = alive_body("d", 3, v6, b"").to_vec();
                    b.extend_from_slice(&[0x28, 0x01]);
                    Bytes::from(b)
                }),
            ),
        ];
        for (name, incarnation, addr, meta, claim) in &cases {
            let meta = Bytes::copy_from_slice(meta);
            table.insert(now, name, *incarnation, *addr, meta, claim);
        }
        let leave = signed(Bytes::from_static(b"leave"));
        table.set_suspect(1);
        table.set_gone(2, u64::MAX, None);
        table.set_gone(3, 8, Some(leave));
        let (mut out, mut body) = (Vec::new(), Vec::new());
        for i in 0..table.len() {
            out.clear();
            table[i].put_wire(&mut out, &mut body);
            assert_eq!(out, table[i].to_wire().encode_to_vec(), "entry {i}");
        }
    }
}
