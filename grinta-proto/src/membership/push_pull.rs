//! Push-pull (full state exchange), join, reconnecting to failed members and seeds, and
//! leaving.

use super::*;

impl Membership {
    pub(super) fn merge_remote_state(&mut self, now: Instant, pp: &wire::PushPull) {
        for e in &pp.members {
            let Some(addr) = e.addr.as_ref().and_then(decode_addr) else {
                continue;
            };
            let state =
                wire::MemberState::try_from(e.state).unwrap_or(wire::MemberState::Unspecified);
            match state {
                wire::MemberState::Alive => self.apply_alive(
                    now,
                    wire::Alive {
                        node: e.node.clone(),
                        incarnation: e.incarnation,
                        addr: Some(encode_addr(addr)),
                        meta: e.meta.clone(),
                    },
                ),
                wire::MemberState::Left => self.apply_dead(
                    now,
                    wire::Dead {
                        node: e.node.clone(),
                        incarnation: e.incarnation,
                        from: e.node.clone(),
                    },
                    None,
                ),
                // Never trust a remote "dead": it becomes a local suspicion that the member can refute.
                wire::MemberState::Dead | wire::MemberState::Suspect => self.apply_suspect(
                    now,
                    wire::Suspect {
                        node: e.node.clone(),
                        incarnation: e.incarnation,
                        from: pp.sender.clone(),
                    },
                    None,
                ),
                wire::MemberState::Unspecified => {}
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
        });
        for e in &self.members {
            members.push(wire::MemberEntry {
                node: e.member.name.clone(),
                addr: Some(encode_addr(e.member.addr)),
                incarnation: e.member.incarnation,
                state: e.member.state.to_wire() as i32,
                meta: e.member.meta.clone(),
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
        for seed in self.seeds.clone() {
            self.send_push_pull(seed, None, true, false);
        }
    }

    pub(super) fn periodic_push_pull(&mut self, _now: Instant) {
        let picked = self.random_members(1, |m| m.state == MemberState::Alive);
        if let Some(&i) = picked.first() {
            let (addr, name) = (
                self.members[i].member.addr,
                self.members[i].member.name.clone(),
            );
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
                    .any(|e| e.member.addr == *s && !e.member.state.is_gone())
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

    pub(super) fn finish_leave(&mut self) {
        self.lifecycle = Lifecycle::Left;
        self.probe = None;
        self.suspicions.clear();
        self.indirect.clear();
        self.events.push_back(Event::LeaveComplete);
    }
}
