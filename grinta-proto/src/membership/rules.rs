//! The state rules: suspicion, refutation, and how alive, suspect and dead claims change a
//! member (incarnation ordering, the first-hand rule for a node's own state, signed claims), with
//! the failed-member table.

use super::*;

/// Who accuses whom, at which incarnation.
pub(super) struct Accusation<'a> {
    pub(super) node: &'a str,
    pub(super) incarnation: u64,
    pub(super) accuser: &'a str,
}

impl Membership {
    pub(super) fn run_suspicion_timers(&mut self, now: Instant) {
        let due: Vec<(String, u64)> = self
            .suspicions
            .iter()
            .filter(|(_, s)| now >= s.deadline)
            .map(|(name, s)| (name.clone(), s.incarnation))
            .collect();
        for (name, incarnation) in due {
            self.suspicions.remove(&name);
            let Some(i) = self.members.find(&name) else {
                continue;
            };
            if self.members[i].state != MemberState::Suspect {
                continue;
            }
            self.stats.deaths_declared += 1;
            let claim = self.sign_claim(
                ClaimKind::Dead,
                &wire::Dead {
                    node: name.clone(),
                    incarnation,
                    from: self.name.clone(),
                },
            );
            self.mark_gone(now, i, incarnation, None);
            if let Some(claim) = claim {
                self.queue_accusation(name, wire::broadcast::Kind::Dead(claim));
            }
        }
    }

    /// Signs a claim this node makes. Signing fails only with a broken key; the claim is then
    /// not sent (and logged), never sent unsigned.
    pub(super) fn sign_claim(
        &mut self,
        kind: ClaimKind,
        claim: &impl Message,
    ) -> Option<wire::Signed> {
        match claims::sign(
            &*self.keys,
            kind,
            claim.encode_to_vec(),
            kind == ClaimKind::Alive,
        ) {
            Ok(signed) => Some(signed),
            Err(error) => {
                self.stats.claims_unsigned += 1;
                warn!(%error, ?kind, "cannot sign a claim; it is not sent");
                None
            }
        }
    }

    /// Checks that `signer` signed `claim`; a claim that fails is dropped and counted.
    pub(super) fn verified(&mut self, signer: &str, kind: ClaimKind, claim: &wire::Signed) -> bool {
        let mut message = std::mem::take(&mut self.signed_buf);
        let verified = claims::verify_with(&mut *self.keys, signer, kind, claim, &mut message);
        super::keep_scratch(&mut self.signed_buf, message);
        match verified {
            Ok(()) => {
                self.stats.claims_verified += 1;
                true
            }
            Err(error) => {
                self.stats.claims_rejected += 1;
                debug!(%error, %signer, ?kind, "dropping a claim whose signature does not hold");
                false
            }
        }
    }

    /// Whether `name` may accuse: this node, or a member not declared gone.
    pub(super) fn is_current(&self, name: &str) -> bool {
        name == self.name
            || self
                .members
                .find(name)
                .is_some_and(|i| !self.members[i].state.is_gone())
    }

    /// A packet from `from` accused member `i` at an incarnation older than the one we know alive:
    /// its sender missed a refutation, and gossip about the stale incarnation dies out without
    /// reaching the member. Tell the sender directly, with the member's own signed alive
    /// (collected per packet, one answer per packet).
    pub(super) fn correct_stale_sender(&mut self, i: usize, from: Option<SocketAddr>) {
        let entry = &self.members[i];
        if from.is_none()
            || entry.state != MemberState::Alive
            || self.corrections.len() >= MAX_CORRECTIONS
        {
            return;
        }
        let alive = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Alive(entry.alive())),
        };
        self.corrections.push(alive.encode_to_vec().into());
    }

    /// Sends the corrections the input just handled produced (if any) to its sender.
    pub(super) fn send_corrections(&mut self, to: SocketAddr, name: &str) {
        if self.corrections.is_empty() {
            return;
        }
        let corrections = std::mem::take(&mut self.corrections);
        self.stats.corrections_sent += 1;
        self.send_packet(to, Some(name.to_owned()), None, &corrections);
    }

    /// A packet from a member we hold Dead: it is running but missed its own death (a
    /// partition, or gossip that died out before reaching it). Tell it, so that it refutes;
    /// otherwise it would go on probing a cluster that ignores it.
    pub(super) fn correct_dead_sender(&mut self, sender: &str) {
        let Some(i) = self.members.find(sender) else {
            return;
        };
        let m = &self.members[i];
        if m.state == MemberState::Dead {
            self.correct_with_death(sender, m.incarnation);
        }
    }

    /// Tells the sender of the input being handled that this node declared member `node` (the
    /// sender itself) Dead at `incarnation`, so that it refutes.
    pub(super) fn correct_with_death(&mut self, node: &str, incarnation: u64) {
        if incarnation >= MAX_INCARNATION || self.corrections.len() >= MAX_CORRECTIONS {
            return;
        }
        let dead = wire::Dead {
            node: node.to_owned(),
            incarnation,
            from: self.name.clone(),
        };
        if let Some(claim) = self.sign_claim(ClaimKind::Dead, &dead) {
            let dead = wire::Broadcast {
                kind: Some(wire::broadcast::Kind::Dead(claim)),
            };
            self.corrections.push(dead.encode_to_vec().into());
        }
    }

    pub(super) fn handle_broadcast(
        &mut self,
        now: Instant,
        kind: wire::broadcast::Kind,
        from: Option<SocketAddr>,
    ) {
        use wire::broadcast::Kind;
        match kind {
            Kind::Alive(claim) => self.handle_alive(now, claim),
            Kind::Suspect(claim) => {
                let Ok(s) = wire::Suspect::decode(&claim.body[..]) else {
                    self.stats.packets_invalid += 1;
                    return;
                };
                // An accusation must leave its subject room to refute (accused + 1).
                if validate_node_name(&s.from).is_err()
                    || validate_node_name(&s.node).is_err()
                    || s.incarnation >= MAX_INCARNATION
                {
                    self.stats.packets_invalid += 1;
                    return;
                }
                let accusation = Accusation {
                    node: &s.node,
                    incarnation: s.incarnation,
                    accuser: &s.from,
                };
                self.accuse(now, accusation, from, Some((ClaimKind::Suspect, claim)));
            }
            Kind::Dead(claim) => {
                let Ok(d) = wire::Dead::decode(&claim.body[..]) else {
                    self.stats.packets_invalid += 1;
                    return;
                };
                // A leave (from its own subject) may carry MAX_INCARNATION itself; an accusation
                // not.
                let limit = if d.from == d.node {
                    MAX_INCARNATION
                } else {
                    MAX_INCARNATION - 1
                };
                if validate_node_name(&d.from).is_err()
                    || validate_node_name(&d.node).is_err()
                    || d.incarnation > limit
                {
                    self.stats.packets_invalid += 1;
                    return;
                }
                if d.from == d.node {
                    self.handle_leave(now, d, claim, from);
                } else {
                    // Another node's declaration of death counts as its suspicion: only a
                    // member's own leave is final on the word of the network.
                    let accusation = Accusation {
                        node: &d.node,
                        incarnation: d.incarnation,
                        accuser: &d.from,
                    };
                    self.accuse(now, accusation, from, Some((ClaimKind::Dead, claim)));
                }
            }
            Kind::App(app) => {
                if app.key.len() + app.payload.len() > self.config.max_app_broadcast_size {
                    self.stats.packets_invalid += 1;
                    return;
                }
                // Copies: the fields are slices of the received packet, which the application
                // would otherwise keep alive for as long as it keeps them.
                self.events.push_back(Event::AppBroadcast {
                    key: bytes::Bytes::copy_from_slice(&app.key),
                    payload: bytes::Bytes::copy_from_slice(&app.payload),
                });
            }
        }
    }

    /// Someone suspects this node or declares it dead at `accused`, its current incarnation:
    /// refute. Below it, the accuser holds stale news and missed an earlier refutation:
    /// re-announce the current incarnation (no increment) so it catches up.
    pub(super) fn answer_accusation(&mut self, accused: u64) {
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        if accused >= self.incarnation {
            self.refute(accused);
        } else {
            self.broadcast_self_alive();
        }
    }

    pub(super) fn refute(&mut self, accused: u64) {
        // One refutation per packet or push-pull: a chain of accusations at this node's
        // incarnation, the next, and so on, cannot advance it (and make it sign) more than once
        // per input.
        if !matches!(self.lifecycle, Lifecycle::Running) || self.refuted_in_input {
            return;
        }
        self.refuted_in_input = true;
        self.incarnation = self.incarnation.max(accused).saturating_add(1);
        self.stats.refutations += 1;
        self.adjust_health(1);
        self.events.push_back(Event::Refuted {
            incarnation: self.incarnation,
        });
        self.broadcast_self_alive();
    }

    /// Signs this node's alive at its current incarnation, address and metadata, keeps it for
    /// push-pull, and queues it for gossip.
    pub(super) fn broadcast_self_alive(&mut self) {
        self.sign_own_alive();
        if let Some(claim) = self.own_alive.clone() {
            let name = self.name.clone();
            self.queue_member_broadcast(&name, wire::broadcast::Kind::Alive(claim));
        }
    }

    /// Signs this node's alive (after a change of incarnation, address or metadata); the alive
    /// signed for the current incarnation is reused (its metadata and address change only with
    /// the incarnation), so re-announcing costs no signature.
    pub(super) fn sign_own_alive(&mut self) {
        if self.own_alive.is_some() && self.own_alive_incarnation == self.incarnation {
            return;
        }
        let alive = wire::Alive {
            node: self.name.clone(),
            incarnation: self.incarnation,
            addr: Some(encode_addr(self.addr)),
            meta: self.meta.clone(),
        };
        if let Some(claim) = self.sign_claim(ClaimKind::Alive, &alive) {
            self.own_alive = Some(claim);
            self.own_alive_incarnation = self.incarnation;
        }
    }

    /// Queues what a member says of itself (its alive or its leave) for gossip.
    ///
    /// An alive whose certificate chain would not fit in a packet goes without it: the signature
    /// covers the claim's body alone, so the claim still holds, and a node that learnt the
    /// member's certificate (from an earlier alive or a push-pull, which carries whole claims
    /// over a stream) checks it against that. Refutations and updates of known members then
    /// spread by gossip whatever the chain's size; a node that never learnt the member's
    /// certificate drops the alive and learns the member in full from a push-pull.
    pub(super) fn queue_member_broadcast(&mut self, name: &str, mut kind: wire::broadcast::Kind) {
        let too_large = framed_broadcast_len(kind.encoded_len()) > self.max_broadcast_len();
        if let wire::broadcast::Kind::Alive(claim) = &mut kind {
            if too_large {
                claim.certificates = Vec::new();
            }
        }
        let encoded = self.encode_broadcast(kind);
        // Not to the member itself: it knows what it says (an accusation, below, does go to it).
        let key = BroadcastKey::Member(name.into());
        self.member_queue.push_about(key, &encoded, Some(name));
        super::keep_scratch(&mut self.broadcast_out, encoded);
    }

    /// The largest framed broadcast a gossip packet of this node can carry: the packet size
    /// less its header (the sender's name).
    fn max_broadcast_len(&self) -> usize {
        self.config
            .max_packet_size
            .saturating_sub(crate::wire::delimited_len(1, self.name.len()))
    }

    /// Queues an accusation of member `name` for gossip.
    pub(super) fn queue_accusation(&mut self, name: String, kind: wire::broadcast::Kind) {
        let encoded = self.encode_broadcast(kind);
        self.member_queue
            .push(BroadcastKey::Accusation(name.as_str().into()), &encoded);
        super::keep_scratch(&mut self.broadcast_out, encoded);
    }

    /// `kind` encoded as a `grinta.v1.Broadcast` in the buffer the node keeps for it (the queue
    /// copies the bytes; the caller puts the buffer back in `broadcast_out`).
    fn encode_broadcast(&mut self, kind: wire::broadcast::Kind) -> Vec<u8> {
        let mut encoded = std::mem::take(&mut self.broadcast_out);
        encoded.clear();
        wire::Broadcast { kind: Some(kind) }.encode_raw(&mut encoded);
        encoded
    }

    /// A member's own alive: it is up at an incarnation, with an address and metadata. Checked
    /// for news first (a claim that changes nothing costs no signature check), then for its
    /// signature, then applied and passed on unchanged.
    pub(super) fn handle_alive(&mut self, now: Instant, claim: wire::Signed) {
        // Most alives a node hears are news it has (gossip repeats each item many times): tell
        // them by name and incarnation alone, without decoding the rest.
        if let Some((node, incarnation)) = peek_alive(&claim.body) {
            if let Some(i) = self.members.find(node) {
                let e = &self.members[i];
                // Older, or the same without the one exception below (a Dead member back at
                // another address): nothing to do.
                if incarnation < e.incarnation
                    || (incarnation == e.incarnation && e.state != MemberState::Dead)
                {
                    return;
                }
            }
        }
        // Decoded from the body's own buffer (the address and metadata are slices of it, not
        // copies; metadata kept by the member table is copied out in `accept_alive`) into an
        // `Alive` the node keeps, whose name keeps its room: no allocation per claim.
        let mut a = std::mem::take(&mut self.alive_buf);
        a.clear();
        if a.merge(claim.body.clone()).is_ok() {
            self.handle_decoded_alive(now, &a, claim);
        } else {
            self.stats.packets_invalid += 1;
        }
        // Its slices of the claim go; the name's room stays (unless a hostile name made it
        // large: a valid one is far shorter).
        a.addr = None;
        a.meta = Bytes::new();
        if a.node.capacity() > 1024 {
            a.node = String::new();
        }
        self.alive_buf = a;
    }

    /// [`handle_alive`](Self::handle_alive) once the claim's body is decoded into `a`.
    fn handle_decoded_alive(&mut self, now: Instant, a: &wire::Alive, claim: wire::Signed) {
        if validate_node_name(&a.node).is_err()
            || a.meta.len() > self.config.max_meta_size
            || a.incarnation > MAX_INCARNATION
        {
            self.stats.packets_invalid += 1;
            return;
        }
        let Some(addr) = a.addr.as_ref().and_then(decode_addr) else {
            self.stats.packets_invalid += 1;
            return;
        };
        if a.node == self.name {
            // An alive of ours that we no longer hold (a previous life's, replayed or late):
            // out-announce it. Like an accusation, it must leave room to refute (`+ 1`).
            if a.incarnation >= MAX_INCARNATION {
                self.stats.packets_invalid += 1;
                return;
            }
            let news = a.incarnation > self.incarnation
                || (a.incarnation == self.incarnation
                    && (addr != self.addr || a.meta != self.meta));
            if news && self.verified(&a.node, ClaimKind::Alive, &claim) {
                self.refute(a.incarnation);
            }
            return;
        }
        let known = self.members.find(&a.node);
        let mut tell_died_at = None;
        match known {
            None if self.members.len() >= self.config.max_members => {
                self.stats.dropped_for_limits += 1;
                return;
            }
            None => {
                // A member declared Dead here and forgotten since: its alive of that life, still
                // relayed by nodes that hold it Suspect or have not reaped it, would bring it back
                // to be declared Dead a second time. Taken only from the member itself (it is
                // running: it is then told it died, and refutes); a restart at the same
                // incarnation elsewhere is a reclaim (the entry is reaped long after
                // `dead_node_reclaim_time`).
                if let Some(f) = self.forgotten(&a.node) {
                    let died_at = f.incarnation;
                    let stale =
                        a.incarnation < died_at || (a.incarnation == died_at && addr == f.addr);
                    if stale && self.input_sender != a.node {
                        self.stats.forgotten_alives_dropped += 1;
                        return;
                    }
                    if stale {
                        // Once the claim checks: its newer incarnation then reaches the nodes
                        // that drop this one.
                        tell_died_at = Some(died_at);
                    }
                }
            }
            Some(i) => {
                let entry = &self.members[i];
                let known_incarnation = entry.incarnation;
                if a.incarnation <= known_incarnation {
                    // Old news, or a replay. The one exception: the same incarnation at a new
                    // address, from a member declared dead long enough ago (it restarted
                    // without a newer incarnation). Never for a member that left: only a newer
                    // life comes back from a leave.
                    let reclaim = a.incarnation == known_incarnation
                        && addr != entry.addr()
                        && entry.state == MemberState::Dead
                        && self.members.in_state_for(entry, now)
                            >= self.config.dead_node_reclaim_time;
                    if !reclaim {
                        return;
                    }
                }
                if a.incarnation - known_incarnation > MAX_INCARNATION_STEP {
                    self.stats.claims_refused += 1;
                    return;
                }
            }
        }
        // A signed alive relayed without its certificate chain (too large for a packet): a
        // member this node does not hold is asked of the relay in full rather than taken, even
        // when a certificate remembered from an earlier life checks it, so that the member
        // table holds every member's chain and hands it on in push-pulls.
        // (Only where claims carry chains at all: this node's own alives do.)
        let chainless = claim.certificates.is_empty() && !self.keys.certificates().is_empty();
        if chainless && known.is_none() {
            self.want_in_full(&a.node);
            return;
        }
        if !self.verified(&a.node, ClaimKind::Alive, &claim) {
            // Relayed without its chain, and checked against no certificate this node knows
            // (a member back with a new key): asked of the relay in full too.
            if chainless {
                self.want_in_full(&a.node);
            }
            return;
        }
        if let Some(died_at) = tell_died_at {
            self.correct_with_death(&a.node, died_at);
        }
        self.accept_alive(now, known, a, addr, claim);
    }

    /// Asks for member `name` in full of the sender of the packet being handled, once it is
    /// handled (see [`Membership::fetch_unchecked_members`]).
    fn want_in_full(&mut self, name: &str) {
        if self.to_fetch.len() < MAX_FETCHES_PER_PACKET {
            self.to_fetch.push(name.to_owned());
        }
    }

    /// Applies a checked alive of a member (`i`, if already known).
    fn accept_alive(
        &mut self,
        now: Instant,
        known: Option<usize>,
        a: &wire::Alive,
        addr: SocketAddr,
        claim: wire::Signed,
    ) {
        // Kept by the member table: out of the received packet it is a slice of.
        let meta = if a.meta.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&a.meta)
        };
        // Encoded into the queue and dropped: no copy out of the received packet needed.
        let relay = wire::broadcast::Kind::Alive(claim.clone());
        let Some(i) = known else {
            let i = self
                .members
                .insert(now, &a.node, a.incarnation, addr, meta, &claim);
            self.place_in_probe_walk(i);
            self.failed.retain(|f| f.name != a.node);
            self.events
                .push_back(Event::MemberJoined(self.members[i].member()));
            self.queue_member_broadcast(&a.node, relay);
            return;
        };
        let entry = &self.members[i];
        let old = entry.state;
        let moved = entry.addr() != addr;
        let meta_changed = moved || !entry.meta_eq(&a.meta);
        self.members.set_alive(i, a.incarnation, addr, meta, &claim);
        if moved {
            // A connection to the old address says nothing about the new one.
            self.members.set_connected(i, false);
        }
        if old != MemberState::Alive {
            self.members.touch(i, now);
        }
        let member = self.members[i].member();
        self.suspicions.remove(&a.node);
        self.failed.retain(|f| f.name != a.node);
        // Accusations of an older incarnation are stale now.
        self.member_queue
            .remove(&BroadcastKey::Accusation(a.node.as_str().into()));
        match old {
            MemberState::Alive if meta_changed => {
                self.events.push_back(Event::MemberUpdated(member))
            }
            MemberState::Alive => {}
            MemberState::Suspect => self.events.push_back(Event::MemberAlive(member)),
            MemberState::Dead | MemberState::Left => {
                self.events.push_back(Event::MemberJoined(member))
            }
        }
        self.queue_member_broadcast(&a.node, relay);
    }

    /// This node suspects member `i` after its own failed probe: a signed accusation.
    pub(super) fn suspect_after_probe(&mut self, now: Instant, i: usize) {
        let m = &self.members[i];
        let s = wire::Suspect {
            node: m.name().to_owned(),
            incarnation: m.incarnation,
            from: self.name.clone(),
        };
        let Some(claim) = self.sign_claim(ClaimKind::Suspect, &s) else {
            return;
        };
        let accusation = Accusation {
            node: &s.node,
            incarnation: s.incarnation,
            accuser: &s.from,
        };
        self.accuse(now, accusation, None, Some((ClaimKind::Suspect, claim)));
    }

    /// An accusation (suspect, or another node's declaration of death) of `node` at
    /// `incarnation` by `accuser`, which signed `claim`. A claim-less accusation comes from a
    /// push-pull, whose sender the stream authenticates; it is not relayed.
    ///
    /// It counts only from a current member, only at the incarnation this node knows (an
    /// accusation never raises anyone's incarnation: only a member's own alive does), and
    /// never declares anyone dead here: it starts or confirms a suspicion, which the member
    /// refutes.
    pub(super) fn accuse(
        &mut self,
        now: Instant,
        accusation: Accusation<'_>,
        from: Option<SocketAddr>,
        claim: Option<(ClaimKind, wire::Signed)>,
    ) {
        let Accusation {
            node,
            incarnation,
            accuser,
        } = accusation;
        if node == self.name {
            // About this node itself, any member's word may be answered, even one held gone
            // (after a partition each side holds the other dead): a refutation only makes this
            // node more alive.
            // Nobody knows a newer life of this node than itself: an accusation above its
            // incarnation is a forgery that would push it towards the maximum.
            if incarnation > self.incarnation {
                self.stats.claims_refused += 1;
                return;
            }
            if let (true, Some((kind, claim))) = (incarnation == self.incarnation, &claim) {
                if !self.verified(accuser, *kind, claim) {
                    return;
                }
            }
            self.answer_accusation(incarnation);
            return;
        }
        if !self.is_current(accuser) {
            self.stats.claims_refused += 1;
            return;
        }
        let Some(i) = self.members.find(node) else {
            return;
        };
        let entry = &self.members[i];
        if incarnation < entry.incarnation {
            self.correct_stale_sender(i, from);
            return;
        }
        if incarnation > entry.incarnation {
            self.stats.claims_refused += 1;
            return;
        }
        let suspect = match entry.state {
            MemberState::Left | MemberState::Dead => return,
            MemberState::Suspect => true,
            MemberState::Alive => false,
        };
        if suspect
            && !self
                .suspicions
                .get(node)
                .is_some_and(|timer| timer.would_count(accuser))
        {
            return;
        }
        if let Some((kind, claim)) = &claim {
            if !self.verified(accuser, *kind, claim) {
                return;
            }
        }
        let relay = claim.map(|(kind, claim)| {
            let claim = claims::compact(&claim);
            match kind {
                ClaimKind::Dead => wire::broadcast::Kind::Dead(claim),
                _ => wire::broadcast::Kind::Suspect(claim),
            }
        });
        if suspect {
            let Some(timer) = self.suspicions.get_mut(node) else {
                return;
            };
            timer.confirm(accuser);
            let due = now >= timer.deadline;
            if let Some(relay) = relay {
                self.queue_accusation(node.to_owned(), relay);
            }
            if due {
                self.run_suspicion_timers(now);
            }
            return;
        }
        let n = self.cluster_size();
        self.members.set_suspect(i);
        self.members.touch(i, now);
        let mut timer = Suspicion::new(&self.config, n, incarnation, accuser, now);
        timer.buddy = relay
            .clone()
            .map(|kind| wire::Broadcast { kind: Some(kind) }.encode_to_vec().into());
        self.suspicions.insert(node.to_owned(), timer);
        self.events.push_back(Event::MemberSuspect {
            name: node.to_owned(),
            incarnation,
        });
        if let Some(relay) = relay {
            self.queue_accusation(node.to_owned(), relay);
        }
    }

    /// A member's own leave (a `Dead` about itself, signed by it): final until it announces a
    /// newer life.
    fn handle_leave(
        &mut self,
        now: Instant,
        d: wire::Dead,
        claim: wire::Signed,
        from: Option<SocketAddr>,
    ) {
        if d.node == self.name {
            // A leave of ours we did not make in this life: a previous life's, replayed.
            // Out-announce it if it is not older than the current incarnation.
            if d.incarnation < self.incarnation {
                self.broadcast_self_alive();
            } else if d.incarnation < MAX_INCARNATION
                && self.verified(&d.node, ClaimKind::Dead, &claim)
            {
                self.refute(d.incarnation);
            }
            return;
        }
        let Some(i) = self.members.find(&d.node) else {
            return;
        };
        let entry = &self.members[i];
        if d.incarnation < entry.incarnation {
            self.correct_stale_sender(i, from);
            return;
        }
        if entry.state == MemberState::Left {
            return;
        }
        if d.incarnation - entry.incarnation > MAX_INCARNATION_STEP {
            self.stats.claims_refused += 1;
            return;
        }
        if !self.verified(&d.node, ClaimKind::Dead, &claim) {
            return;
        }
        let claim = claims::compact(&claim);
        self.mark_gone(now, i, d.incarnation, Some(claim.clone()));
        self.queue_member_broadcast(&d.node, wire::broadcast::Kind::Dead(claim));
    }

    /// Member `i` is gone at `incarnation`: left, with its signed `leave`, or declared dead by
    /// this node.
    fn mark_gone(&mut self, now: Instant, i: usize, incarnation: u64, leave: Option<wire::Signed>) {
        let left = leave.is_some();
        self.members.set_gone(i, incarnation, leave);
        self.members.touch(i, now);
        // The node closes its connections to a gone member: gossip must not prefer it.
        self.members.set_connected(i, false);
        let entry = &self.members[i];
        let (name, addr) = (entry.name().to_owned(), entry.addr());
        self.suspicions.remove(&name);
        if self.probe.as_ref().is_some_and(|p| p.target == name) {
            // Stop probing a member that is gone; the walk moves on at the interval's end.
            if let Some(p) = self.probe.as_mut() {
                p.acked = true;
            }
        }
        if left {
            self.failed.retain(|f| f.name != name);
            self.events
                .push_back(Event::MemberLeft { name, incarnation });
        } else {
            self.events.push_back(Event::MemberDead {
                name: name.clone(),
                incarnation,
            });
            self.remember_failed(name, addr, incarnation);
        }
    }

    pub(super) fn remember_failed(&mut self, name: String, addr: SocketAddr, incarnation: u64) {
        self.failed.retain(|f| f.name != name);
        if self.failed.len() >= self.config.max_failed_members {
            self.failed.pop_front();
            self.stats.dropped_for_limits += 1;
        }
        self.failed.push_back(FailedMember {
            name,
            addr,
            incarnation,
        });
    }

    /// What member `name`, which the table does not hold (callers have looked it up), died at if
    /// this node declared it Dead and has since forgotten it (its entry reaped).
    /// O(`max_failed_members`).
    pub(super) fn forgotten(&self, name: &str) -> Option<&FailedMember> {
        debug_assert!(self.members.find(name).is_none());
        self.failed.iter().find(|f| f.name == name)
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;

/// The name and incarnation an encoded `Alive` carries, read in place; `None` if it does not
/// parse that far (the full decode then rejects it).
pub(super) fn peek_alive(body: &[u8]) -> Option<(&str, u64)> {
    use crate::wire::FieldInPlace;
    let (mut node, mut incarnation) = (None, 0u64);
    crate::wire::fields_in_place(body, |tag, field| match (tag, field) {
        (1, FieldInPlace::Bytes(bytes)) => node = Some(bytes),
        (2, FieldInPlace::Varint(value)) => incarnation = value,
        _ => {}
    })?;
    Some((std::str::from_utf8(node?).ok()?, incarnation))
}
