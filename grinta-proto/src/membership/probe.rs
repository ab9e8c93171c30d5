//! Probing: the probe walk, direct and indirect probes, acks and nacks, and the
//! Lifeguard local-health adjustments they drive.

use super::*;

impl Membership {
    pub(super) fn next_seq(&mut self) -> u32 {
        self.seq_no = self.seq_no.wrapping_add(1);
        self.seq_no
    }

    pub(super) fn run_probe_timers(&mut self, now: Instant) {
        if let Some(p) = &self.probe {
            if !p.acked && !p.indirect_sent && now >= p.timeout_at {
                self.send_indirect_probes(now);
            }
        }
        if self.probe.as_ref().is_some_and(|p| now >= p.end_at) {
            self.finish_probe(now);
        }
        if self.probe.is_none() && now >= self.next_probe {
            self.start_probe(now);
        }
    }

    /// Picks the next target of the round-robin walk, reshuffling at each wrap-around.
    pub(super) fn next_probe_target(&mut self, now: Instant) -> Option<usize> {
        for _ in 0..2 {
            while self.probe_cursor < self.probe_order.len() {
                let i = self.probe_order[self.probe_cursor] as usize;
                self.probe_cursor += 1;
                if i < self.members.len() && !self.members[i].state.is_gone() {
                    return Some(i);
                }
            }
            self.reshuffle_probe_order(now);
        }
        None
    }

    pub(super) fn reshuffle_probe_order(&mut self, now: Instant) {
        // The member probed last, named before reaping moves positions.
        let last = self
            .probe_order
            .last()
            .filter(|&&i| (i as usize) < self.members.len())
            .map(|&i| self.members[i as usize].name().to_owned());
        // Forget Dead and Left members once they have been gossiped about long enough.
        let reap: Vec<String> = self
            .members
            .iter()
            .filter(|e| {
                e.state.is_gone()
                    && self.members.in_state_for(e, now) >= self.config.gossip_to_the_dead_time
            })
            .map(|e| e.name().to_owned())
            .collect();
        for name in reap {
            self.remove_member(&name);
        }
        self.probe_order.clear();
        self.probe_order.extend(0..self.members.len() as u32);
        // Fisher-Yates with our seeded generator.
        for i in (1..self.probe_order.len()).rev() {
            let j = self.rng.random_range(0..=i);
            self.probe_order.swap(i, j);
        }
        // Never probe the same member twice in a row across the wrap-around.
        let first = self
            .probe_order
            .first()
            .map(|&i| self.members[i as usize].name());
        if self.probe_order.len() > 1 && first.is_some() && first == last.as_deref() {
            let j = self.rng.random_range(1..self.probe_order.len());
            self.probe_order.swap(0, j);
        }
        self.probe_cursor = 0;
    }

    /// A new member (position `i`) is probed at a random point of the current round, in O(1):
    /// it takes a random place in the walk and the member there moves, so that every member is
    /// still probed once per round. A place not yet walked gives its member to the end; a place
    /// already walked gives it to the cursor's place, whose member goes to the end, and the
    /// cursor moves past the moved member (walked already).
    pub(super) fn place_in_probe_walk(&mut self, i: usize) {
        let i = i as u32;
        let pos = self.rng.random_range(0..=self.probe_order.len());
        table::make_room_for_one(&mut self.probe_order);
        if pos >= self.probe_cursor || self.probe_cursor >= self.probe_order.len() {
            // Not walked yet (or the round is over): swap with the end.
            self.probe_order.push(i);
            let end = self.probe_order.len() - 1;
            self.probe_order.swap(pos, end);
            return;
        }
        // `pos` was walked: its member keeps its walked status at the cursor's place, and the
        // member that waited there goes to the end.
        let c = self.probe_cursor;
        let waiting = self.probe_order[c];
        self.probe_order.push(waiting);
        self.probe_order[c] = self.probe_order[pos];
        self.probe_order[pos] = i;
        self.probe_cursor += 1;
    }

    pub(super) fn remove_member(&mut self, name: &str) {
        if !self.members.remove(name) {
            return;
        }
        self.suspicions.remove(name);
        self.member_queue.remove(&BroadcastKey::Member(name.into()));
        self.member_queue
            .remove(&BroadcastKey::Accusation(name.into()));
    }

    pub(super) fn start_probe(&mut self, now: Instant) {
        let interval = self.scaled(self.config.probe_interval);
        let Some(i) = self.next_probe_target(now) else {
            self.next_probe = now + interval;
            return;
        };
        let seq = self.next_seq();
        let target = self.members[i].member();
        let buddy: Option<Bytes> = if target.state == MemberState::Suspect && self.config.lifeguard
        {
            // Buddy system: tell the target it is suspected (with a signed accusation) so it
            // can refute at once.
            self.buddy_claim(&target)
        } else {
            None
        };
        let ping = wire::packet::Message::Ping(wire::Ping {
            seq_no: seq,
            target: target.name.clone(),
            source_addr: Some(encode_addr(self.addr)),
        });
        self.stats.pings_sent += 1;
        self.send_packet(
            target.addr,
            Some(target.name.clone()),
            Some(ping),
            buddy.as_slice(),
        );
        self.probe = Some(Probe {
            target: target.name,
            addr: target.addr,
            seq,
            timeout_at: now + self.scaled(self.config.probe_timeout),
            end_at: now + interval,
            indirect_sent: false,
            expected_nacks: 0,
            nacks: 0,
            acked: false,
            helpers: Vec::new(),
        });
        self.next_probe = now + interval;
    }

    pub(super) fn send_indirect_probes(&mut self, now: Instant) {
        let Some(p) = self.probe.as_mut() else {
            return;
        };
        p.indirect_sent = true;
        let (target, addr, seq, end_at) = (p.target.clone(), p.addr, p.seq, p.end_at);
        let helpers = self.random_members_with(self.config.indirect_checks, |m| {
            m.state == MemberState::Alive && m.name() != target
        });
        let budget = end_at.saturating_duration_since(now);
        let want_nack = self.config.lifeguard;
        for h in &helpers {
            let (helper_addr, helper_name) = {
                let m = &self.members[*h];
                (m.addr(), m.name().to_owned())
            };
            let msg = wire::packet::Message::IndirectPing(wire::IndirectPing {
                seq_no: seq,
                target: target.clone(),
                target_addr: Some(encode_addr(addr)),
                budget_micros: budget.as_micros() as u64,
                want_nack,
                source_addr: Some(encode_addr(self.addr)),
            });
            self.stats.indirect_pings_sent += 1;
            self.send_packet(helper_addr, Some(helper_name), Some(msg), &[]);
        }
        let helper_names: Vec<String> = helpers
            .iter()
            .map(|&h| self.members[h].name().to_owned())
            .collect();
        if let Some(p) = self.probe.as_mut() {
            p.expected_nacks = if want_nack { helpers.len() as u32 } else { 0 };
            p.helpers = helper_names;
        }
    }

    pub(super) fn finish_probe(&mut self, now: Instant) {
        let Some(p) = self.probe.take() else {
            return;
        };
        if p.acked {
            return;
        }
        self.stats.probes_failed += 1;
        let delta = if p.expected_nacks == 0 {
            1
        } else {
            i64::from(p.expected_nacks.saturating_sub(p.nacks))
        };
        self.adjust_health(delta);
        let Some(i) = self.members.find(&p.target) else {
            return;
        };
        let m = &self.members[i];
        if m.state.is_gone() {
            return;
        }
        debug!(target = %p.target, "probe failed, suspecting");
        if m.state == MemberState::Alive {
            self.stats.suspicions_raised += 1;
        }
        self.suspect_after_probe(now, i);
    }

    /// The signed accusation shown to a suspect when probing it: the one that started the
    /// suspicion, or, for a suspicion learnt from a push-pull, this node's own.
    fn buddy_claim(&mut self, target: &Member) -> Option<Bytes> {
        if let Some(buddy) = self
            .suspicions
            .get(&target.name)
            .and_then(|s| s.buddy.clone())
        {
            return Some(buddy);
        }
        let claim = self.sign_claim(
            ClaimKind::Suspect,
            &wire::Suspect {
                node: target.name.clone(),
                incarnation: target.incarnation,
                from: self.name.clone(),
            },
        )?;
        let buddy: Bytes = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Suspect(claim)),
        }
        .encode_to_vec()
        .into();
        if let Some(s) = self.suspicions.get_mut(&target.name) {
            s.buddy = Some(buddy.clone());
        }
        Some(buddy)
    }

    pub(super) fn handle_message(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: &str,
        message: wire::packet::Message,
    ) {
        use wire::packet::Message as M;
        match message {
            M::Ping(ping) => {
                if !ping.target.is_empty() && ping.target != self.name {
                    return; // meant for a previous owner of this address
                }
                self.stats.acks_sent += 1;
                let ack = M::Ack(wire::Ack {
                    seq_no: ping.seq_no,
                });
                self.send_packet(from, Some(sender.to_owned()), Some(ack), &[]);
            }
            M::IndirectPing(req) => {
                let Some(target_addr) = req.target_addr.as_ref().and_then(decode_addr) else {
                    self.stats.packets_invalid += 1;
                    return;
                };
                if validate_node_name(&req.target).is_err() {
                    self.stats.packets_invalid += 1;
                    return;
                }
                if self.indirect.len() >= self.config.max_pending_indirect {
                    self.stats.dropped_for_limits += 1;
                    return;
                }
                let seq = self.next_seq();
                // Bound the budget: a peer cannot make us hold state for long.
                let budget = Duration::from_micros(req.budget_micros)
                    .min(self.config.probe_interval * self.config.awareness_max_multiplier);
                self.indirect.insert(
                    seq,
                    IndirectProbe {
                        target: req.target.clone(),
                        origin: from,
                        origin_name: sender.to_owned(),
                        origin_seq: req.seq_no,
                        nack_at: now + budget.mul_f64(0.8),
                        expire_at: now + budget,
                        want_nack: req.want_nack,
                        nack_sent: false,
                    },
                );
                let ping = M::Ping(wire::Ping {
                    seq_no: seq,
                    target: req.target.clone(),
                    source_addr: Some(encode_addr(self.addr)),
                });
                self.stats.pings_sent += 1;
                self.send_packet(target_addr, Some(req.target), Some(ping), &[]);
            }
            M::Ack(ack) => {
                // Only the node probed, or a helper asked to probe it, answers a probe: a
                // sequence number guessed by anyone else proves nothing.
                if let Some(p) = self.probe.as_mut() {
                    let entitled = p.target == sender || p.helpers.iter().any(|h| h == sender);
                    if p.seq == ack.seq_no && !p.acked && entitled {
                        p.acked = true;
                        self.adjust_health(-1);
                        return;
                    }
                }
                if self
                    .indirect
                    .get(&ack.seq_no)
                    .is_some_and(|fwd| fwd.target == sender)
                {
                    let Some(fwd) = self.indirect.remove(&ack.seq_no) else {
                        return;
                    };
                    self.stats.acks_sent += 1;
                    let msg = M::Ack(wire::Ack {
                        seq_no: fwd.origin_seq,
                    });
                    self.send_packet(fwd.origin, Some(fwd.origin_name), Some(msg), &[]);
                }
            }
            M::Nack(nack) => {
                if let Some(p) = self.probe.as_mut() {
                    if p.seq == nack.seq_no
                        && p.indirect_sent
                        && p.helpers.iter().any(|h| h == sender)
                    {
                        p.nacks = (p.nacks + 1).min(p.expected_nacks);
                    }
                }
            }
        }
    }

    pub(super) fn run_indirect_timers(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .indirect
            .iter()
            .filter(|(_, f)| {
                now >= f.expire_at || (f.want_nack && !f.nack_sent && now >= f.nack_at)
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in due {
            let Some(f) = self.indirect.get_mut(&seq) else {
                continue;
            };
            if f.want_nack && !f.nack_sent && now >= f.nack_at {
                f.nack_sent = true;
                let (origin, name, origin_seq) = (f.origin, f.origin_name.clone(), f.origin_seq);
                self.stats.nacks_sent += 1;
                let msg = wire::packet::Message::Nack(wire::Nack { seq_no: origin_seq });
                self.send_packet(origin, Some(name), Some(msg), &[]);
            }
            if self.indirect.get(&seq).is_some_and(|f| now >= f.expire_at) {
                self.indirect.remove(&seq);
            }
        }
    }
}
