//! Gossip: piggybacking broadcasts on packets, building and sending packets within the
//! packet budget, and picking random members.

use super::*;

impl Membership {
    pub(super) fn gossip(&mut self, now: Instant) {
        if self.member_queue.is_empty() && self.app_queue.is_empty() {
            return;
        }
        let dead_time = self.config.gossip_to_the_dead_time;
        let epoch = self.members.epoch();
        let k = self.config.gossip_nodes;
        let eligible = |e: &Entry| !e.state.is_gone() || e.in_state_for(epoch, now) < dead_time;
        let targets = if self.connection_hints {
            // Three random draws per target, connected members first (in the order drawn):
            // still random targets, but a node with fewer connections than members does not
            // open one for most of its gossip packets.
            let mut drawn = self.random_members_with(3 * k, eligible);
            let mut targets: Vec<usize> = Vec::with_capacity(k);
            targets.extend(drawn.iter().filter(|&&i| self.members[i].connected).take(k));
            drawn.retain(|i| !targets.contains(i));
            let missing = k.saturating_sub(targets.len());
            targets.extend(drawn.into_iter().take(missing));
            targets
        } else {
            self.random_members_with(k, eligible)
        };
        for i in targets {
            let (addr, name) = (self.members[i].addr(), self.members[i].name().to_owned());
            if self.send_packet(addr, Some(name), None, &[]) {
                self.stats.gossip_packets_sent += 1;
            }
        }
    }

    /// Builds and queues one packet to `dst`: the optional probe message, the optional `first`
    /// broadcast, then as many queued broadcasts as fit. A packet with neither a message nor a
    /// broadcast is not sent. Returns whether a packet was queued.
    pub(super) fn send_packet(
        &mut self,
        dst: SocketAddr,
        dst_name: Option<String>,
        message: Option<wire::packet::Message>,
        first: &[Bytes],
    ) -> bool {
        let has_message = message.is_some();
        // Built in a buffer the node keeps, then copied out at its exact size: one allocation
        // per packet, where growing the packet item by item took three or four.
        let mut payload = std::mem::take(&mut self.packet_out);
        payload.clear();
        // The fields of a `grinta.v1.Packet` as prost encodes them, without building one (and
        // copying the sender's name into it).
        if !self.name.is_empty() {
            wire::put_delimited(1, self.name.as_bytes(), &mut payload);
        }
        if let Some(message) = &message {
            message.encode(&mut payload);
        }
        let header_len = payload.len();
        let mut budget = self.config.max_packet_size.saturating_sub(header_len);
        for item in first {
            let need = framed_broadcast_len(item.len());
            if need <= budget {
                budget -= need;
                put_framed_broadcast(item, &mut payload);
            }
        }
        let limit = self.retransmit_limit();
        // Application items get a guaranteed share: member news may use everything but that share
        // (or less, if fewer application bytes are waiting); application items then take whatever
        // member news left.
        let app_share = budget * usize::from(self.config.app_broadcast_share_percent) / 100;
        let reserved = app_share.min(self.app_queue.framed_bytes());
        let used =
            self.member_queue
                .fill(budget - reserved, limit, dst_name.as_deref(), &mut payload);
        self.app_queue
            .fill(budget - used, limit, dst_name.as_deref(), &mut payload);
        if !has_message && payload.len() == header_len {
            self.packet_out = payload;
            return false;
        }
        debug_assert!(payload.len() <= self.config.max_packet_size.max(header_len));
        // The copy goes out at its exact size; the buffer stays for the next packet.
        let packet = payload.clone();
        self.packet_out = payload;
        let payload = packet;
        self.stats.packets_sent += 1;
        self.stats.packet_bytes_sent += payload.len() as u64;
        self.transmits.push_back(Outgoing {
            dst,
            dst_name,
            channel: Channel::Datagram,
            payload,
        });
        true
    }

    /// Up to `k` distinct random members matching `filter`.
    pub(super) fn random_members_with(
        &mut self,
        k: usize,
        filter: impl Fn(&Entry) -> bool,
    ) -> Vec<usize> {
        let n = self.members.len();
        let mut picked: Vec<usize> = Vec::with_capacity(k);
        if k == 0 || n == 0 {
            return picked;
        }
        if n <= 4 * k + 16 {
            let mut candidates: Vec<usize> = (0..n).filter(|&i| filter(&self.members[i])).collect();
            for _ in 0..k.min(candidates.len()) {
                let j = self.rng.random_range(0..candidates.len());
                picked.push(candidates.swap_remove(j));
            }
            return picked;
        }
        // Large tables: rejection sampling, then a scan if the matching members are rare.
        for _ in 0..8 * k {
            let i = self.rng.random_range(0..n);
            if !picked.contains(&i) && filter(&self.members[i]) {
                picked.push(i);
                if picked.len() == k {
                    return picked;
                }
            }
        }
        let mut candidates: Vec<usize> = (0..n)
            .filter(|i| !picked.contains(i) && filter(&self.members[*i]))
            .collect();
        while picked.len() < k && !candidates.is_empty() {
            let j = self.rng.random_range(0..candidates.len());
            picked.push(candidates.swap_remove(j));
        }
        picked
    }
}
