//! Push-pull (full state exchange), join, reconnecting to failed members and seeds, and
//! leaving.

use super::*;

impl Membership {
    /// Merges a peer's state: each member's own signed alive and leave, then the peer's
    /// accusations (its Suspect and Dead entries), which count as its suspicions: the stream
    /// authenticates the peer, so they need no signature of their own.
    pub(super) fn merge_remote_state(&mut self, now: Instant, pp: &wire::PushPull) {
        for e in &pp.members {
            if let Some(alive) = &e.alive {
                self.handle_alive(now, alive.clone());
            }
            let state =
                wire::MemberState::try_from(e.state).unwrap_or(wire::MemberState::Unspecified);
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
                    if validate_node_name(&e.node).is_err() || e.incarnation >= MAX_INCARNATION {
                        self.stats.packets_invalid += 1;
                        continue;
                    }
                    let accusation = rules::Accusation {
                        node: &e.node,
                        incarnation: e.incarnation,
                        accuser: &pp.sender,
                    };
                    self.accuse(now, accusation, None, None);
                }
                wire::MemberState::Alive | wire::MemberState::Unspecified => {}
            }
        }
    }

    pub(super) fn local_state(&self, join: bool, reply: bool) -> wire::PushPull {
        let mut members = Vec::with_capacity(self.members.len() + 1);
        members.push(wire::MemberEntry {
            node: self.name.clone(),
            addr: Some(encode_addr(self.addr)),
            incarnation: self.incarnation,
            state: wire::MemberState::Alive as i32,
            meta: self.meta.clone(),
            alive: self.own_alive.clone(),
            leave: None,
        });
        for e in &self.members {
            members.push(wire::MemberEntry {
                node: e.name().to_owned(),
                addr: Some(encode_addr(e.addr)),
                incarnation: e.incarnation,
                state: e.state.to_wire() as i32,
                meta: e.meta(),
                alive: Some(e.alive()),
                leave: e.leave().cloned(),
            });
        }
        wire::PushPull {
            protocol_version: wire::PROTOCOL_VERSION,
            sender: self.name.clone(),
            join,
            reply,
            members,
            app_state: self.app_state.clone(),
        }
    }

    pub(super) fn send_push_pull(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        join: bool,
        reply: bool,
    ) {
        let mut state = self.local_state(join, reply);
        let mut payload = state.encode_to_vec();
        if payload.len() > self.config.max_push_pull_size {
            // Too large for one exchange: send the members without the application state rather than
            // nothing; the application state is repaired by gossip.
            state.app_state = Bytes::new();
            payload = state.encode_to_vec();
            self.stats.dropped_for_limits += 1;
            if payload.len() > self.config.max_push_pull_size {
                return;
            }
        }
        self.stats.push_pulls_sent += 1;
        self.stats.push_pull_bytes_sent += payload.len() as u64;
        self.transmits.push_back(Outgoing {
            dst,
            dst_name,
            channel: if reply {
                Channel::StreamReply
            } else {
                Channel::Stream
            },
            payload,
        });
    }

    pub(super) fn send_join_attempt(&mut self, _now: Instant) {
        self.join_app_state = self.app_state.clone();
        for seed in self.seeds.clone() {
            self.send_push_pull(seed, None, true, false);
        }
    }

    pub(super) fn periodic_push_pull(&mut self, _now: Instant) {
        let picked = self.random_members_with(1, |m| m.state == MemberState::Alive);
        if let Some(&i) = picked.first() {
            let (addr, name) = (self.members[i].addr, self.members[i].name().to_owned());
            self.send_push_pull(addr, Some(name), false, false);
        }
    }

    /// One attempt towards the next failed member or unanswered seed, so partitions heal.
    pub(super) fn reconnect(&mut self, now: Instant) {
        let seeds: Vec<SocketAddr> = self
            .seeds
            .iter()
            .copied()
            .filter(|s| {
                !self
                    .members
                    .iter()
                    .any(|e| e.addr == *s && !e.state.is_gone())
            })
            .collect();
        let total = self.failed.len() + seeds.len();
        if total == 0 {
            self.next_reconnect = now + self.config.reconnect_interval;
            return;
        }
        let slot = self.reconnect_cursor % total;
        self.reconnect_cursor = self.reconnect_cursor.wrapping_add(1);
        let (addr, name) = if slot < self.failed.len() {
            let f = &self.failed[slot];
            (f.addr, Some(f.name.clone()))
        } else {
            (seeds[slot - self.failed.len()], None)
        };
        self.stats.reconnect_attempts += 1;
        self.send_push_pull(addr, name, false, false);
        let spacing =
            (self.config.reconnect_interval / total as u32).max(self.config.gossip_interval);
        self.next_reconnect = now + spacing;
    }

    /// A packet came from `sender`, which this node does not know, holds gone, or knows at
    /// another address: it missed the sender's latest alive (gossip that died out before
    /// reaching it, a restart elsewhere, news from before a partition healed). The transport
    /// authenticated the sender, but only the sender's own signed alive may change what this
    /// node holds: ask it for its state with a push-pull. An unknown or gone sender is asked at
    /// most once per push-pull interval; a sender seen at another address than it announces is
    /// asked once per address (behind a NAT, its packets always come from another address than
    /// the one it announces, and asking again would teach nothing). Past 32 members the number of
    /// unknown senders asked per interval shrinks with the cluster's size, as each ask moves the
    /// whole state: during a mass join most senders are unknown for a moment, and gossip teaches
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
            .map(|m| m.addr);
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
        self.send_push_pull(from, Some(sender.to_owned()), false, false);
    }

    pub(super) fn finish_leave(&mut self) {
        self.lifecycle = Lifecycle::Left;
        self.probe = None;
        self.suspicions.clear();
        self.indirect.clear();
        self.events.push_back(Event::LeaveComplete);
    }
}
