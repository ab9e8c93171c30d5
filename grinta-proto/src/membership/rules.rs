//! The state rules: suspicion, refutation, and how alive, suspect and dead claims change a
//! member (incarnation ordering, the first-hand rule for a node's own state), with the failed-member
//! table.

use super::*;

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
            let Some(&i) = self.index.get(&name) else {
                continue;
            };
            if self.members[i].member.state != MemberState::Suspect {
                continue;
            }
            self.stats.deaths_declared += 1;
            let msg = wire::Dead {
                node: name,
                incarnation,
                from: self.name.clone(),
            };
            self.apply_dead(now, msg, None);
        }
    }

    /// A packet from `from` accused member `i` at an incarnation older than the one we know alive:
    /// its sender missed a refutation, and gossip about the stale incarnation dies out without
    /// reaching the member. Tell the sender directly (collected per packet, one answer per packet).
    pub(super) fn correct_stale_sender(&mut self, i: usize, from: Option<SocketAddr>) {
        let m = &self.members[i].member;
        if from.is_none()
            || m.state != MemberState::Alive
            || self.corrections.len() >= MAX_CORRECTIONS
        {
            return;
        }
        let alive = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Alive(wire::Alive {
                node: m.name.clone(),
                incarnation: m.incarnation,
                addr: Some(encode_addr(m.addr)),
                meta: m.meta.clone(),
            })),
        };
        self.corrections.push(alive.encode_to_vec().into());
    }

    /// A packet from a member we hold Dead: it is running but missed its own death (a
    /// partition, or gossip that died out before reaching it). Tell it, so that it refutes;
    /// otherwise it would go on probing a cluster that ignores it.
    pub(super) fn correct_dead_sender(&mut self, sender: &str) {
        let Some(&i) = self.index.get(sender) else {
            return;
        };
        let m = &self.members[i].member;
        if m.state != MemberState::Dead
            || m.incarnation >= MAX_INCARNATION
            || self.corrections.len() >= MAX_CORRECTIONS
        {
            return;
        }
        let dead = wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Dead(wire::Dead {
                node: m.name.clone(),
                incarnation: m.incarnation,
                from: self.name.clone(),
            })),
        };
        self.corrections.push(dead.encode_to_vec().into());
    }

    pub(super) fn handle_broadcast(
        &mut self,
        now: Instant,
        kind: wire::broadcast::Kind,
        from: Option<SocketAddr>,
    ) {
        use wire::broadcast::Kind;
        match kind {
            Kind::Alive(a) => self.apply_alive(now, a),
            Kind::Suspect(s) => self.apply_suspect(now, s, from),
            Kind::Dead(d) => self.apply_dead(now, d, from),
            Kind::App(app) => {
                if app.key.len() + app.payload.len() > self.config.max_app_broadcast_size {
                    self.stats.packets_invalid += 1;
                    return;
                }
                self.events.push_back(Event::AppBroadcast {
                    key: app.key,
                    payload: app.payload,
                });
            }
        }
    }

    /// Someone suspects this node or declares it dead at `accused`. At or above the current
    /// incarnation, refute. Below it, the accuser holds stale news and missed an earlier refutation:
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
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        self.incarnation = self.incarnation.max(accused).saturating_add(1);
        self.stats.refutations += 1;
        self.adjust_health(1);
        self.events.push_back(Event::Refuted {
            incarnation: self.incarnation,
        });
        self.broadcast_self_alive();
    }

    pub(super) fn broadcast_self_alive(&mut self) {
        let msg = wire::Alive {
            node: self.name.clone(),
            incarnation: self.incarnation,
            addr: Some(encode_addr(self.addr)),
            meta: self.meta.clone(),
        };
        self.queue_member_broadcast(self.name.clone(), wire::broadcast::Kind::Alive(msg));
    }

    pub(super) fn queue_member_broadcast(&mut self, name: String, kind: wire::broadcast::Kind) {
        let encoded = wire::Broadcast { kind: Some(kind) }.encode_to_vec();
        self.member_queue
            .push(BroadcastKey::Member(name.to_owned()), encoded.into());
    }

    pub(super) fn apply_alive(&mut self, now: Instant, a: wire::Alive) {
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
            // Someone announces us with an incarnation we never had (stale state from a previous life)
            // or with another address: out-announce it. Like an accusation, it must leave room to
            // refute (`+ 1`).
            if a.incarnation >= MAX_INCARNATION {
                self.stats.packets_invalid += 1;
                return;
            }
            if a.incarnation > self.incarnation
                || (a.incarnation == self.incarnation && (addr != self.addr || a.meta != self.meta))
            {
                self.refute(a.incarnation);
            }
            return;
        }
        let Some(&i) = self.index.get(&a.node) else {
            if self.members.len() >= self.config.max_members {
                self.stats.dropped_for_limits += 1;
                return;
            }
            let member = Member {
                name: a.node.clone(),
                addr,
                incarnation: a.incarnation,
                state: MemberState::Alive,
                meta: a.meta.clone(),
            };
            self.index.insert(a.node.clone(), self.members.len());
            self.members.push(Entry {
                member: member.clone(),
                state_change: now,
            });
            // A new member is probed at a random point of the current round.
            let pos = self.rng.random_range(0..=self.probe_order.len());
            self.probe_order.insert(pos, a.node.clone());
            if pos < self.probe_cursor {
                self.probe_cursor += 1;
            }
            self.failed.retain(|f| f.name != a.node);
            self.events.push_back(Event::MemberJoined(member));
            self.queue_member_broadcast(a.node.clone(), wire::broadcast::Kind::Alive(a));
            return;
        };
        let entry = &self.members[i];
        let old = entry.member.state;
        if addr != entry.member.addr {
            // Same name, new address: a later life of the member (a higher incarnation: it
            // restarted and moved), or once the old one is surely gone. Names are bound to
            // certificates, so two live processes under one name are one operator's mistake,
            // and the older refutes the newer.
            let reclaimable = a.incarnation > entry.member.incarnation
                || old == MemberState::Left
                || (old == MemberState::Dead
                    && now.saturating_duration_since(entry.state_change)
                        >= self.config.dead_node_reclaim_time);
            if !reclaimable {
                return;
            }
        } else if a.incarnation <= entry.member.incarnation {
            return;
        }
        let entry = &mut self.members[i];
        let meta_changed = entry.member.meta != a.meta || entry.member.addr != addr;
        entry.member.incarnation = a.incarnation;
        entry.member.addr = addr;
        entry.member.meta = a.meta.clone();
        entry.member.state = MemberState::Alive;
        if old != MemberState::Alive {
            entry.state_change = now;
        }
        let member = entry.member.clone();
        self.suspicions.remove(&a.node);
        self.failed.retain(|f| f.name != a.node);
        self.events.push_back(match old {
            MemberState::Alive if meta_changed => Event::MemberUpdated(member),
            MemberState::Alive => {
                self.queue_member_broadcast(a.node.clone(), wire::broadcast::Kind::Alive(a));
                return;
            }
            MemberState::Suspect => Event::MemberAlive(member),
            MemberState::Dead | MemberState::Left => Event::MemberJoined(member),
        });
        self.queue_member_broadcast(a.node.clone(), wire::broadcast::Kind::Alive(a));
    }

    pub(super) fn apply_suspect(
        &mut self,
        now: Instant,
        s: wire::Suspect,
        from: Option<SocketAddr>,
    ) {
        // An accusation must leave its subject room to refute (accused + 1).
        if validate_node_name(&s.from).is_err() || s.incarnation >= MAX_INCARNATION {
            self.stats.packets_invalid += 1;
            return;
        }
        if s.node == self.name {
            self.answer_accusation(s.incarnation);
            return;
        }
        let n = self.cluster_size();
        let Some(&i) = self.index.get(&s.node) else {
            return;
        };
        let entry = &mut self.members[i];
        if s.incarnation < entry.member.incarnation {
            self.correct_stale_sender(i, from);
            return;
        }
        // Left is final until the member itself announces a newer incarnation. A Dead member is
        // suspected again only at a newer incarnation: someone saw it refute after it was declared.
        let same = s.incarnation == entry.member.incarnation;
        match entry.member.state {
            MemberState::Left => return,
            MemberState::Dead if same => return,
            _ => {}
        }
        if entry.member.state == MemberState::Suspect && same {
            if let Some(timer) = self.suspicions.get_mut(&s.node) {
                if timer.confirm(&s.from) {
                    let node = s.node.clone();
                    self.queue_member_broadcast(node.clone(), wire::broadcast::Kind::Suspect(s));
                    if let Some(t) = self.suspicions.get(&node) {
                        if now >= t.deadline {
                            self.run_suspicion_timers(now);
                        }
                    }
                }
            }
            return;
        }
        entry.member.incarnation = s.incarnation;
        entry.member.state = MemberState::Suspect;
        entry.state_change = now;
        let timer = Suspicion::new(&self.config, n, s.incarnation, &s.from, now);
        self.suspicions.insert(s.node.clone(), timer);
        self.events.push_back(Event::MemberSuspect {
            name: s.node.clone(),
            incarnation: s.incarnation,
        });
        let node = s.node.clone();
        self.queue_member_broadcast(node.clone(), wire::broadcast::Kind::Suspect(s));
    }

    pub(super) fn apply_dead(&mut self, now: Instant, d: wire::Dead, from: Option<SocketAddr>) {
        // A leave (from its own subject) may carry MAX_INCARNATION itself; an accusation not.
        let limit = if d.from == d.node {
            MAX_INCARNATION
        } else {
            MAX_INCARNATION - 1
        };
        if validate_node_name(&d.from).is_err() || d.incarnation > limit {
            self.stats.packets_invalid += 1;
            return;
        }
        if d.node == self.name {
            self.answer_accusation(d.incarnation);
            return;
        }
        let Some(&i) = self.index.get(&d.node) else {
            return;
        };
        let entry = &mut self.members[i];
        if d.incarnation < entry.member.incarnation {
            self.correct_stale_sender(i, from);
            return;
        }
        let left = d.node == d.from;
        match entry.member.state {
            MemberState::Left => return,
            MemberState::Dead if !left => {
                // Already dead: only remember a newer incarnation, so views converge whatever the
                // order in which the news arrived.
                if d.incarnation > entry.member.incarnation {
                    entry.member.incarnation = d.incarnation;
                    let name = d.node.clone();
                    self.queue_member_broadcast(name, wire::broadcast::Kind::Dead(d));
                }
                return;
            }
            _ => {}
        }
        entry.member.incarnation = d.incarnation;
        entry.member.state = if left {
            MemberState::Left
        } else {
            MemberState::Dead
        };
        entry.state_change = now;
        let (name, addr) = (entry.member.name.clone(), entry.member.addr);
        self.suspicions.remove(&d.node);
        if self.probe.as_ref().is_some_and(|p| p.target == d.node) {
            // Stop probing a member that is gone; the walk moves on at the interval's end.
            if let Some(p) = self.probe.as_mut() {
                p.acked = true;
            }
        }
        if left {
            self.failed.retain(|f| f.name != name);
            self.events.push_back(Event::MemberLeft {
                name: name.clone(),
                incarnation: d.incarnation,
            });
        } else {
            self.events.push_back(Event::MemberDead {
                name: name.clone(),
                incarnation: d.incarnation,
            });
            self.remember_failed(name.clone(), addr);
        }
        self.queue_member_broadcast(name.clone(), wire::broadcast::Kind::Dead(d));
    }

    pub(super) fn remember_failed(&mut self, name: String, addr: SocketAddr) {
        self.failed.retain(|f| f.name != name);
        if self.failed.len() >= self.config.max_failed_members {
            self.failed.pop_front();
            self.stats.dropped_for_limits += 1;
        }
        self.failed.push_back(FailedMember { name, addr });
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
