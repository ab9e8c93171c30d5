//! Push-pull (state exchange: whole on a join, by digest otherwise), join, reconnecting to failed members and seeds, and
//! leaving.

use super::*;

/// Whose entry of one member is newer, as a push-pull digest compares them.
struct Version {
    incarnation: u64,
    state: wire::MemberState,
    fingerprint: u32,
}

impl Version {
    /// Whether `self` holds something `other` lacks: a newer incarnation, another address or
    /// metadata at the same one (a restart without a newer incarnation, or a previous life's
    /// claim), or a signed leave. A Suspect or Dead state needs no full entry: the digest itself
    /// carries it as an accusation.
    fn has_news_for(&self, other: &Version) -> bool {
        self.incarnation > other.incarnation
            || (self.incarnation == other.incarnation
                && (self.fingerprint != other.fingerprint
                    || (self.state == wire::MemberState::Left
                        && other.state != wire::MemberState::Left)))
    }
}

/// The fingerprint of a member's address and metadata in a push-pull digest: the first four
/// bytes of the SHA-256 of the IP address's bytes, the port (big-endian) and the metadata.
pub(super) fn fingerprint(addr: SocketAddr, meta: &[u8]) -> u32 {
    let (octets, len) = ip_octets(addr);
    let ip = &octets[..len];
    u32::from_be_bytes(sha256_prefix(&[ip, &addr.port().to_be_bytes(), meta]))
}

/// The first `N` bytes of the SHA-256 of `parts` one after the other: what push-pull's
/// fingerprints, version hashes and application-state digests keep.
fn sha256_prefix<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut prefix = [0u8; N];
    prefix.copy_from_slice(&ctx.finish().as_ref()[..N]);
    prefix
}

/// A member's version as a push-pull sum counts it: the first eight bytes of the SHA-256 of
/// its name, a zero byte, its incarnation (big-endian), its state (the wire enum's value, one
/// byte) and its fingerprint (big-endian).
/// Appends a `MemberDigest` of `node` at `v` as `PushPull.digest` (field 7): node (1),
/// incarnation (2), state (3), fingerprint (4, fixed32), each left out at zero, as prost does.
fn put_digest(node: &str, v: Version, out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let state = v.state as i32;
    let mut len = 0;
    if !node.is_empty() {
        len += wire::delimited_len(1, node.len());
    }
    if v.incarnation != 0 {
        len += prost::encoding::uint64::encoded_len(2, &v.incarnation);
    }
    if state != 0 {
        len += prost::encoding::int32::encoded_len(3, &state);
    }
    if v.fingerprint != 0 {
        len += prost::encoding::fixed32::encoded_len(4, &v.fingerprint);
    }
    encode_key(7, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    if !node.is_empty() {
        wire::put_delimited(1, node.as_bytes(), out);
    }
    if v.incarnation != 0 {
        prost::encoding::uint64::encode(2, &v.incarnation, out);
    }
    if state != 0 {
        prost::encoding::int32::encode(3, &state, out);
    }
    if v.fingerprint != 0 {
        prost::encoding::fixed32::encode(4, &v.fingerprint, out);
    }
}

pub(super) fn version_hash(
    name: &str,
    incarnation: u64,
    state: MemberState,
    fingerprint: u32,
) -> u64 {
    u64::from_be_bytes(sha256_prefix(&[
        name.as_bytes(),
        &[0],
        &incarnation.to_be_bytes(),
        &[state.to_wire() as u8],
        &fingerprint.to_be_bytes(),
    ]))
}

/// The digest of the application state carried in push-pulls: the first eight bytes of its
/// SHA-256.
pub(super) fn app_state_digest(state: &[u8]) -> u64 {
    u64::from_be_bytes(sha256_prefix(&[state]))
}

/// What a node sends in a push-pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange {
    /// A join: the whole state, answered with the whole state.
    Join,
    /// A periodic exchange: the members' sum, answered with nothing if the receiver's is the
    /// same, with the receiver's digest otherwise.
    Sum,
    /// A reconnection or a question to a sender this node missed (whose states surely differ):
    /// the digest, answered with what differs.
    Digest,
}

impl Membership {
    /// Merges a peer's state: each member's own signed alive and leave, then the peer's
    /// accusations (its Suspect and Dead entries, in full or in its digest), which count as its
    /// suspicions: the stream authenticates the peer, so they need no signature of their own.
    ///
    /// A Dead or Left entry never brings in a member this node does not hold: its alive goes
    /// through the alive rule only for a member already in the table. Otherwise a member this
    /// node has forgotten (its Dead or Left entry reaped after `gossip_to_the_dead_time`) would
    /// come back Alive from any peer that has not reaped it yet, be suspected, and be declared
    /// Dead a second time a suspicion timeout later.
    pub(super) fn merge_remote_state(&mut self, now: Instant, pp: &wire::PushPull) {
        for e in &pp.members {
            let state =
                wire::MemberState::try_from(e.state).unwrap_or(wire::MemberState::Unspecified);
            if let Some(alive) = &e.alive {
                let gone = matches!(state, wire::MemberState::Dead | wire::MemberState::Left);
                // The member the alive itself names, whatever the entry says.
                let held = || {
                    rules::peek_alive(&alive.body).is_some_and(|(node, _)| {
                        node == self.name || self.members.find(node).is_some()
                    })
                };
                if !gone || held() {
                    self.handle_alive(now, alive.clone());
                }
            }
            match state {
                wire::MemberState::Left => {
                    if let Some(leave) = &e.leave {
                        self.handle_broadcast(
                            now,
                            wire::broadcast::Kind::Dead(leave.clone()),
                            None,
                        );
                    }
                }
                // Never trust a remote "dead": it becomes a local suspicion that the member can refute.
                wire::MemberState::Dead | wire::MemberState::Suspect => {
                    self.take_remote_accusation(now, &e.node, e.incarnation, &pp.sender);
                }
                wire::MemberState::Alive | wire::MemberState::Unspecified => {}
            }
        }
        for d in &pp.digest {
            let state =
                wire::MemberState::try_from(d.state).unwrap_or(wire::MemberState::Unspecified);
            if !matches!(state, wire::MemberState::Dead | wire::MemberState::Suspect) {
                continue;
            }
            // An accusation above the incarnation this node holds waits for the member's
            // newer alive, which the exchange brings in full (`want`).
            let held = if d.node == self.name {
                Some(self.incarnation)
            } else {
                self.members
                    .find(&d.node)
                    .map(|i| self.members[i].incarnation)
            };
            if held.is_some_and(|held| d.incarnation <= held) {
                self.take_remote_accusation(now, &d.node, d.incarnation, &pp.sender);
            }
        }
    }

    fn take_remote_accusation(&mut self, now: Instant, node: &str, incarnation: u64, by: &str) {
        if validate_node_name(node).is_err() || incarnation >= MAX_INCARNATION {
            self.stats.packets_invalid += 1;
            return;
        }
        let accusation = rules::Accusation {
            node,
            incarnation,
            accuser: by,
        };
        self.accuse(now, accusation, None, None);
    }

    fn own_entry(&self) -> wire::MemberEntry {
        wire::MemberEntry {
            node: self.name.clone(),
            addr: Some(encode_addr(self.addr)),
            incarnation: self.incarnation,
            state: wire::MemberState::Alive as i32,
            meta: self.meta.clone(),
            alive: self.own_alive.clone(),
            leave: None,
        }
    }

    fn member_entry(&self, i: usize) -> wire::MemberEntry {
        self.members[i].to_wire()
    }

    fn own_version(&self) -> Version {
        Version {
            incarnation: self.incarnation,
            state: wire::MemberState::Alive,
            fingerprint: fingerprint(self.addr, &self.meta),
        }
    }

    fn member_version(&self, i: usize) -> Version {
        let e = &self.members[i];
        Version {
            incarnation: e.incarnation,
            state: e.state.to_wire(),
            fingerprint: e.fingerprint(),
        }
    }

    /// The XOR of the version hashes of every member, this node included.
    fn members_sum(&self) -> u64 {
        self.members.sum()
            ^ version_hash(
                &self.name,
                self.incarnation,
                MemberState::Alive,
                fingerprint(self.addr, &self.meta),
            )
    }

    fn digest_of(node: &str, v: Version) -> wire::MemberDigest {
        wire::MemberDigest {
            node: node.to_owned(),
            incarnation: v.incarnation,
            state: v.state as i32,
            fingerprint: v.fingerprint,
        }
    }

    fn message(&self, reply: bool) -> wire::PushPull {
        wire::PushPull {
            protocol_version: wire::PROTOCOL_VERSION,
            sender: self.name.clone(),
            reply,
            app_state_digest: self.app_state_digest,
            ..Default::default()
        }
    }

    /// Sends the whole state (every member in full, and the application state): a join, the
    /// answer to one, or a push. Encoded straight from the member table, byte for byte as
    /// prost encodes the `PushPull` (fields in order: the header, the members, the rest).
    fn send_local_state(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        channel: Channel,
        (join, reply, push): (bool, bool, bool),
    ) {
        let base = self.message(reply);
        let head = wire::PushPull {
            protocol_version: base.protocol_version,
            sender: base.sender,
            join,
            reply,
            ..Default::default()
        };
        let mut tail = wire::PushPull {
            app_state: self.app_state.clone(),
            app_state_digest: base.app_state_digest,
            push,
            ..Default::default()
        };
        let mut payload = Vec::new();
        head.encode_raw(&mut payload);
        prost::encoding::message::encode(5, &self.own_entry(), &mut payload);
        let (mut entry, mut body) = (Vec::new(), Vec::new());
        for i in 0..self.members.len() {
            entry.clear();
            self.members[i].put_wire(&mut entry, &mut body);
            wire::put_delimited(5, &entry, &mut payload);
        }
        let members_end = payload.len();
        tail.encode_raw(&mut payload);
        if payload.len() > self.config.max_push_pull_size {
            // As `send_message` does: the members without the application state.
            payload.truncate(members_end);
            tail.app_state = Bytes::new();
            tail.encode_raw(&mut payload);
            self.stats.dropped_for_limits += 1;
            if payload.len() > self.config.max_push_pull_size {
                return;
            }
        }
        self.queue_push_pull(dst, dst_name, channel, payload, self.members.len() + 1);
    }

    /// Every member by name, incarnation, state and fingerprint, this node first.
    #[cfg(test)]
    fn full_digest(&self) -> Vec<wire::MemberDigest> {
        let mut digest = Vec::with_capacity(self.members.len() + 1);
        digest.push(Self::digest_of(&self.name, self.own_version()));
        digest.extend(
            (0..self.members.len())
                .map(|i| Self::digest_of(self.members[i].name(), self.member_version(i))),
        );
        digest
    }

    /// Appends `full_digest()` as `PushPull.digest` entries (field 7), byte for byte as prost
    /// encodes them, without building them (a name copied per member).
    fn put_full_digest(&self, out: &mut Vec<u8>) {
        put_digest(&self.name, self.own_version(), out);
        for i in 0..self.members.len() {
            put_digest(self.members[i].name(), self.member_version(i), out);
        }
    }

    /// `message` encoded with this node's full digest after its own digest entries, in
    /// prost's field order (the fields before the digest, the digest, the fields after).
    fn encode_with_full_digest(&self, message: &mut wire::PushPull) -> Vec<u8> {
        let tail = wire::PushPull {
            want: std::mem::take(&mut message.want),
            want_app_state: message.want_app_state,
            app_state_digest: message.app_state_digest,
            push: message.push,
            members_sum: message.members_sum,
            ..Default::default()
        };
        let head = wire::PushPull {
            want_app_state: false,
            app_state_digest: 0,
            push: false,
            members_sum: 0,
            ..std::mem::take(message)
        };
        let mut out = Vec::with_capacity(head.encoded_len() + tail.encoded_len());
        head.encode_raw(&mut out);
        self.put_full_digest(&mut out);
        tail.encode_raw(&mut out);
        *message = wire::PushPull {
            want: tail.want,
            want_app_state: tail.want_app_state,
            app_state_digest: tail.app_state_digest,
            push: tail.push,
            members_sum: tail.members_sum,
            ..head
        };
        out
    }

    /// The answer to a sum request: nothing if the sums agree, this node's digest otherwise;
    /// and the application state if the two differ.
    /// Also says whether the reply carries this node's full digest (added as it is encoded).
    fn sum_reply(&self, request: &wire::PushPull) -> (wire::PushPull, bool) {
        let mut reply = self.message(true);
        reply.members_sum = self.members_sum();
        let with_digest = request.members_sum != reply.members_sum;
        if request.app_state_digest != self.app_state_digest {
            reply.app_state = self.app_state.clone();
            reply.want_app_state = true;
        }
        (reply, with_digest)
    }

    /// The answer to a digest request: the members the requester lacks or holds older, this
    /// node's other accusations, and the members this node wants in full.
    fn digest_reply(&self, request: &wire::PushPull) -> wire::PushPull {
        let mut reply = self.message(true);
        let mut seen = vec![false; self.members.len()];
        let mut own_seen = false;
        let mut unknown = hashbrown::HashSet::new();
        // The requester's accusations counted during the merge only if it is a current member
        // here; otherwise they come again in full, after its own entry.
        let requester_current = self.is_current(&request.sender);
        for d in &request.digest {
            let theirs = Version {
                incarnation: d.incarnation,
                state: wire::MemberState::try_from(d.state)
                    .unwrap_or(wire::MemberState::Unspecified),
                fingerprint: d.fingerprint,
            };
            if theirs.state == wire::MemberState::Unspecified {
                continue;
            }
            let (mine, i) = if d.node == self.name {
                if std::mem::replace(&mut own_seen, true) {
                    continue;
                }
                (self.own_version(), None)
            } else if let Some(i) = self.members.find(&d.node) {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                (self.member_version(i), Some(i))
            } else {
                // A member the requester holds gone is not asked for: its entry would not be
                // taken (see `merge_remote_state`); nor one this node forgot after declaring it
                // Dead at that incarnation or later, unless it is the requester itself (see
                // `handle_decoded_alive`).
                let gone = matches!(
                    theirs.state,
                    wire::MemberState::Dead | wire::MemberState::Left
                );
                // (A member back at the same incarnation at another address is not asked for
                // either: gossip, which carries its address, brings it in.)
                let forgotten = || {
                    d.node != request.sender
                        && self
                            .forgotten(&d.node)
                            .is_some_and(|f| d.incarnation <= f.incarnation)
                };
                if !gone
                    && unknown.len() < self.config.max_members
                    && validate_node_name(&d.node).is_ok()
                    && !forgotten()
                    && unknown.insert(d.node.as_str())
                {
                    reply.want.push(d.node.clone());
                }
                continue;
            };
            let accusation = matches!(
                theirs.state,
                wire::MemberState::Suspect | wire::MemberState::Dead
            );
            if theirs.has_news_for(&mine) || (accusation && i.is_some() && !requester_current) {
                reply.want.push(d.node.clone());
            }
            if mine.has_news_for(&theirs) {
                match i {
                    Some(i) => reply.members.push(self.member_entry(i)),
                    // First, so that the requester knows the sender of the accusations after it.
                    None => reply.members.insert(0, self.own_entry()),
                }
            } else if matches!(
                mine.state,
                wire::MemberState::Suspect | wire::MemberState::Dead
            ) {
                reply.digest.push(Self::digest_of(&d.node, mine));
            }
        }
        if !own_seen {
            reply.members.insert(0, self.own_entry());
        }
        for (i, seen) in seen.into_iter().enumerate() {
            if !seen {
                reply.members.push(self.member_entry(i));
            }
        }
        if request.app_state_digest != self.app_state_digest {
            reply.app_state = self.app_state.clone();
            reply.want_app_state = true;
        }
        reply
    }

    /// The members `want` names, each once, this node first if it is one of them (so that the
    /// receiver knows the sender of the accusations after it).
    fn wanted_entries(&self, want: &[String]) -> Vec<wire::MemberEntry> {
        let mut entries = Vec::new();
        let mut sent = vec![false; self.members.len()];
        let mut own_sent = false;
        for name in want {
            if *name == self.name {
                if !std::mem::replace(&mut own_sent, true) {
                    entries.insert(0, self.own_entry());
                }
            } else if let Some(i) = self.members.find(name) {
                if !std::mem::replace(&mut sent[i], true) {
                    entries.push(self.member_entry(i));
                }
            }
        }
        entries
    }

    /// What a digest reply asked for: the members it wants (each once), and the application
    /// state.
    fn push_for(&self, reply: &wire::PushPull) -> wire::PushPull {
        wire::PushPull {
            push: true,
            members: self.wanted_entries(&reply.want),
            app_state: if reply.want_app_state {
                self.app_state.clone()
            } else {
                Bytes::new()
            },
            ..self.message(false)
        }
    }

    /// The answer to a sum reply that carried the other side's digest: what it lacks or holds
    /// older, this node's accusations, what this node wants, and the application state if asked.
    fn push_against(&self, reply: &wire::PushPull) -> wire::PushPull {
        let diff = self.digest_reply(reply);
        wire::PushPull {
            push: true,
            members: diff.members,
            digest: diff.digest,
            want: diff.want,
            app_state: if reply.want_app_state {
                self.app_state.clone()
            } else {
                Bytes::new()
            },
            ..self.message(false)
        }
    }

    /// Sends a push-pull request: a join or a digest.
    pub(super) fn send_push_pull(
        &mut self,
        now: Instant,
        dst: SocketAddr,
        dst_name: Option<String>,
        exchange: Exchange,
    ) {
        let message = match exchange {
            Exchange::Join => {
                return self.send_local_state(dst, dst_name, Channel::Stream, (true, false, false));
            }
            Exchange::Sum | Exchange::Digest => {
                if self.exchanges_sent.len() >= MAX_EXCHANGES_AWAITING_REPLY {
                    self.exchanges_sent.pop_front();
                }
                self.exchanges_sent.push_back((dst, exchange, now));
                if exchange == Exchange::Sum {
                    wire::PushPull {
                        members_sum: self.members_sum(),
                        ..self.message(false)
                    }
                } else {
                    let message = self.message(false);
                    return self.send_encoded(dst, dst_name, message, Channel::Stream, true);
                }
            }
        };
        self.send_message(dst, dst_name, message, Channel::Stream);
    }

    /// Answers a push-pull request from `from` (already merged).
    pub(super) fn answer_push_pull(&mut self, from: SocketAddr, request: &wire::PushPull) {
        let reply = if request.push {
            wire::PushPull {
                push: true,
                members: self.wanted_entries(&request.want),
                ..self.message(true)
            }
        } else if !request.digest.is_empty() {
            self.digest_reply(request)
        } else if request.members.is_empty() && request.members_sum != 0 {
            let (reply, with_digest) = self.sum_reply(request);
            let to = Some(request.sender.clone());
            return self.send_encoded(from, to, reply, Channel::StreamReply, with_digest);
        } else {
            // A join (or a peer that sends its whole state): the whole state back.
            let to = Some(request.sender.clone());
            return self.send_local_state(from, to, Channel::StreamReply, (false, true, false));
        };
        self.send_message(
            from,
            Some(request.sender.clone()),
            reply,
            Channel::StreamReply,
        );
    }

    /// Sends what the reply from `from` to this node's sum or digest request asked for, if
    /// anything; once per request, and never for any other reply (a peer cannot keep this node
    /// sending).
    pub(super) fn push_wanted(&mut self, now: Instant, from: SocketAddr, reply: &wire::PushPull) {
        if reply.push {
            // The answer to a push: the exchange is over.
            return;
        }
        while self
            .exchanges_sent
            .front()
            .is_some_and(|&(_, _, at)| now.saturating_duration_since(at) > EXCHANGE_REPLY_WAIT)
        {
            self.exchanges_sent.pop_front();
        }
        // A sum answer carries the answerer's sum; a digest answer (or a whole state from a
        // peer that reads neither) does not.
        let answers = |kind: Exchange| {
            self.exchanges_sent
                .iter()
                .position(|&(dst, sent, _)| dst == from && sent == kind)
        };
        let k = if reply.members_sum != 0 {
            answers(Exchange::Sum)
        } else {
            answers(Exchange::Digest).or_else(|| answers(Exchange::Sum))
        };
        let Some((_, sent, _)) = k.and_then(|k| self.exchanges_sent.remove(k)) else {
            return;
        };
        let push =
            if reply.app_state_digest == 0 || (sent == Exchange::Sum && reply.members_sum == 0) {
                // A peer that reads neither sums nor digests (an older version): it took nothing
                // from the request, so it gets the whole state (and answers it with its own).
                let to = Some(reply.sender.clone());
                return self.send_local_state(from, to, Channel::Stream, (false, false, true));
            } else if sent == Exchange::Sum && !reply.digest.is_empty() {
                // The sums differ: answer the other side's digest.
                let push = self.push_against(reply);
                if push.members.is_empty()
                    && push.digest.is_empty()
                    && push.want.is_empty()
                    && push.app_state.is_empty()
                {
                    return;
                }
                push
            } else if reply.want.is_empty() && !reply.want_app_state {
                return;
            } else {
                self.push_for(reply)
            };
        self.send_message(from, Some(reply.sender.clone()), push, Channel::Stream);
    }

    fn send_message(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        message: wire::PushPull,
        channel: Channel,
    ) {
        self.send_encoded(dst, dst_name, message, channel, false);
    }

    /// Sends `message`, with `full_digest` this node's whole digest added to it as it is
    /// encoded.
    fn send_encoded(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        mut message: wire::PushPull,
        channel: Channel,
        full_digest: bool,
    ) {
        let encode = |this: &Self, message: &mut wire::PushPull| {
            if full_digest {
                this.encode_with_full_digest(message)
            } else {
                message.encode_to_vec()
            }
        };
        let mut payload = encode(self, &mut message);
        if payload.len() > self.config.max_push_pull_size {
            // Too large for one exchange: send the members without the application state rather than
            // nothing; the application state is repaired by gossip.
            message.app_state = Bytes::new();
            payload = encode(self, &mut message);
            self.stats.dropped_for_limits += 1;
            if payload.len() > self.config.max_push_pull_size {
                return;
            }
        }
        let members = message.members.len();
        self.queue_push_pull(dst, dst_name, channel, payload, members);
    }

    fn queue_push_pull(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        channel: Channel,
        payload: Vec<u8>,
        members: usize,
    ) {
        self.stats.push_pulls_sent += 1;
        self.stats.push_pull_bytes_sent += payload.len() as u64;
        self.stats.push_pull_members_sent += members as u64;
        self.transmits.push_back(Outgoing {
            dst,
            dst_name,
            channel,
            payload,
        });
    }

    pub(super) fn send_join_attempt(&mut self, now: Instant) {
        self.join_app_state = self.app_state.clone();
        for seed in self.seeds.clone() {
            self.send_push_pull(now, seed, None, Exchange::Join);
        }
    }

    pub(super) fn periodic_push_pull(&mut self, now: Instant) {
        let picked = self.random_members_with(1, |m| m.state == MemberState::Alive);
        if let Some(&i) = picked.first() {
            let (addr, name) = (self.members[i].addr(), self.members[i].name().to_owned());
            self.send_push_pull(now, addr, Some(name), Exchange::Sum);
        }
    }

    /// Retries unanswered seeds and failed members, so partitions heal. Each seed no live member
    /// answers for is retried once per `reconnect_interval` by this node (nobody else knows
    /// it). Failed members are retried about once each per `reconnect_interval` across the
    /// whole cluster, not by every node: once per interval this node tries one, picked at
    /// random, with probability failed / live (certain when it has at least as many failed
    /// members as live ones, as across a partition). Every node trying every failed member would
    /// cost each node a dial per crashed member per interval, a cost per node that grows with
    /// the cluster.
    pub(super) fn reconnect(&mut self, now: Instant) {
        // Seeds no live member is reached at. Seeds are few: one pass over the table, with no
        // set of every member's address built (and dropped) each time.
        let mut seeds: Vec<SocketAddr> = self.seeds.clone();
        if !seeds.is_empty() {
            for e in self.members.iter().filter(|e| !e.state.is_gone()) {
                let addr = e.addr();
                seeds.retain(|s| *s != addr);
                if seeds.is_empty() {
                    break;
                }
            }
        }
        // One slot per unanswered seed and one for the failed members, spread over the interval.
        let slots = seeds.len() + 1;
        let slot = self.reconnect_cursor % slots;
        self.reconnect_cursor = self.reconnect_cursor.wrapping_add(1);
        let spacing =
            (self.config.reconnect_interval / slots as u32).max(self.config.gossip_interval);
        self.next_reconnect = now + spacing;
        let (addr, name) = if let Some(&seed) = seeds.get(slot) {
            (seed, None)
        } else {
            let failed = self.failed.len();
            if failed == 0 {
                return;
            }
            // This node and the members not declared gone.
            let live = 1 + self.live_members();
            if self.rng.random::<f64>() >= failed as f64 / live as f64 {
                return;
            }
            let f = &self.failed[self.rng.random_range(0..failed)];
            (f.addr, Some(f.name.clone()))
        };
        self.stats.reconnect_attempts += 1;
        self.send_push_pull(now, addr, name, Exchange::Digest);
    }

    /// Asks `sender`, the relay of the packet just handled, for the members whose alive came
    /// without its certificate chain and could not be checked here (a node that never learnt
    /// their certificate: a chain too large for a packet travels only in push-pulls). One push
    /// request names them in `want`; its answer carries those members in full, chains
    /// included, and nothing else. Each member is asked at most once per [`FETCH_AGAIN_AFTER`]
    /// and [`MAX_FETCHES_PER_PACKET`] per packet, so a relay cannot make this node ask much.
    pub(super) fn fetch_unchecked_members(&mut self, now: Instant, from: SocketAddr, sender: &str) {
        if self.to_fetch.is_empty() {
            return;
        }
        let mut names = std::mem::take(&mut self.to_fetch);
        if self.fetched.len() >= MAX_FETCHES_REMEMBERED {
            self.fetched
                .retain(|_, at| now.saturating_duration_since(*at) < FETCH_AGAIN_AFTER);
            if self.fetched.len() >= MAX_FETCHES_REMEMBERED {
                // Filled by one relay's made-up names, it would stop every fetch: start afresh
                // (the requests stay bounded by one per packet received).
                self.fetched.clear();
            }
        }
        let mut want = Vec::new();
        for name in names.drain(..) {
            if want.len() >= MAX_FETCHES_PER_PACKET || self.fetched.len() >= MAX_FETCHES_REMEMBERED
            {
                break;
            }
            let due = self
                .fetched
                .get(&name)
                .is_none_or(|at| now.saturating_duration_since(*at) >= FETCH_AGAIN_AFTER);
            if due && !want.contains(&name) {
                self.fetched.insert(name.clone(), now);
                want.push(name);
            }
        }
        self.to_fetch = names;
        if want.is_empty() || sender == self.name {
            return;
        }
        self.stats.members_fetched += want.len() as u64;
        let request = wire::PushPull {
            push: true,
            want,
            ..self.message(false)
        };
        self.send_message(from, Some(sender.to_owned()), request, Channel::Stream);
    }

    /// A packet came from `sender`, which this node does not know, holds gone, or knows at
    /// another address: it missed the sender's latest alive (gossip that died out before
    /// reaching it, a restart elsewhere, news from before a partition healed). The transport
    /// authenticated the sender, but only the sender's own signed alive may change what this
    /// node holds: ask it for its state with a push-pull. An unknown or gone sender is asked at
    /// most once per push-pull interval; a sender seen at another address than it announces is
    /// asked once per address (behind a NAT, its packets always come from another address than
    /// the one it announces, and asking again would teach nothing). Past 32 members the number of
    /// unknown senders asked per interval shrinks with the cluster's size, as each ask moves a
    /// digest of every member: during a mass join most senders are unknown for a moment, and gossip teaches
    /// them anyway.
    pub(super) fn ask_unknown_sender(&mut self, now: Instant, from: SocketAddr, sender: &str) {
        if sender == self.name || !self.joined || !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        let known_at = self
            .members
            .find(sender)
            .map(|i| &self.members[i])
            .filter(|m| !m.state.is_gone())
            .map(|m| m.addr());
        match known_at {
            Some(addr) if addr == from => return,
            Some(_) => {
                if self
                    .asked_at_address
                    .iter()
                    .any(|(n, a)| n == sender && *a == from)
                {
                    return;
                }
                if self.asked_at_address.len() >= MAX_ASKED_AT_ADDRESS {
                    self.asked_at_address.pop_front();
                }
                self.asked_at_address.push_back((sender.to_owned(), from));
            }
            None => {
                let interval = self.config.push_pull_interval;
                while self
                    .asked
                    .front()
                    .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= interval)
                {
                    self.asked.pop_front();
                }
                let allowance = (MAX_ASKED * ASK_FULL_ALLOWANCE_UP_TO / self.cluster_size())
                    .clamp(1, MAX_ASKED);
                if self.asked.len() >= allowance || self.asked.iter().any(|(n, _)| n == sender) {
                    return;
                }
                self.asked.push_back((sender.to_owned(), now));
            }
        }
        self.send_push_pull(now, from, Some(sender.to_owned()), Exchange::Digest);
    }

    pub(super) fn finish_leave(&mut self) {
        self.lifecycle = Lifecycle::Left;
        self.probe = None;
        self.suspicions.clear();
        self.indirect.clear();
        self.events.push_back(Event::LeaveComplete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the wire schema specifies, hashed whole.
    fn sha256(bytes: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .to_vec()
    }

    #[test]
    fn fingerprints_version_hashes_and_state_digests_are_sha256_prefixes_of_the_specified_bytes() {
        let v4: SocketAddr = "10.1.2.3:7946".parse().unwrap();
        let v6: SocketAddr = "[fe80::1]:7946".parse().unwrap();
        let mut b = vec![10, 1, 2, 3, 0x1f, 0x0a];
        b.extend_from_slice(b"meta");
        assert_eq!(fingerprint(v4, b"meta").to_be_bytes()[..], sha256(&b)[..4]);
        let mut b = vec![
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x1f, 0x0a,
        ];
        assert_eq!(fingerprint(v6, b"").to_be_bytes()[..], sha256(&b)[..4]);
        b.clear();
        b.extend_from_slice(b"node-1\0");
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.push(MemberState::Suspect.to_wire() as u8);
        b.extend_from_slice(&0xdead_beef_u32.to_be_bytes());
        assert_eq!(
            version_hash("node-1", u64::MAX, MemberState::Suspect, 0xdead_beef).to_be_bytes()[..],
            sha256(&b)[..8]
        );
        assert_eq!(
            app_state_digest(b"state").to_be_bytes()[..],
            sha256(b"state")[..8]
        );
    }

    #[test]
    fn a_full_digest_encodes_byte_for_byte_as_prost_does() {
        let now = Instant::now();
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut m = Membership::new(
            Config::lan(),
            "me",
            addr(7001),
            1,
            now,
            Box::new(crate::claims::TrustAll),
        )
        .unwrap();
        let mut others: Vec<Membership> = (0..20)
            .map(|i| {
                let name = format!("member-{i}");
                Membership::new(
                    Config::lan(),
                    &name,
                    addr(8000 + i),
                    i.into(),
                    now,
                    Box::new(crate::claims::TrustAll),
                )
                .unwrap()
            })
            .collect();
        // Every member's whole state, merged in: members at several incarnations.
        for other in &mut others {
            let state = wire::PushPull {
                members: vec![other.own_entry()],
                ..other.message(false)
            };
            m.merge_remote_state(now, &state);
        }
        assert_eq!(m.members.len(), 20);
        m.members.set_suspect(3);
        let mut message = wire::PushPull {
            digest: vec![Membership::digest_of("first", m.own_version())],
            want: vec!["x".into()],
            app_state: Bytes::from_static(b"state"),
            want_app_state: true,
            members_sum: 5,
            ..m.message(true)
        };
        let expected = {
            let mut full = message.clone();
            full.digest.extend(m.full_digest());
            full.encode_to_vec()
        };
        let before = message.clone();
        assert_eq!(m.encode_with_full_digest(&mut message), expected);
        assert_eq!(message, before, "the message is given back whole");
    }
}
