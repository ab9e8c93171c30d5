//! Membership configuration: the SWIM/Lifeguard parameters, their profiles and their validation.

use std::time::Duration;

/// Every tunable of the membership protocol, with the LAN profile as [`Default`].
///
/// Start from a profile ([`Config::lan`], [`Config::wan`], [`Config::local`]), change what you need,
/// then [`validate`](Config::validate) (the state machine's constructor validates too).
///
/// ```
/// use grinta_proto::membership::Config;
/// use std::time::Duration;
///
/// let mut config = Config::wan();
/// config.probe_timeout = Duration::from_secs(2);
/// assert!(config.validate().is_ok());
///
/// config.probe_timeout = config.probe_interval;
/// assert!(config.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Time between two probes of the round-robin walk (scaled by local health).
    pub probe_interval: Duration,
    /// Time to wait for a direct ack before asking for indirect probes (scaled by local health).
    pub probe_timeout: Duration,
    /// How many members are asked to probe a target that did not answer directly.
    pub indirect_checks: usize,
    /// Suspicion timeout multiplier (`min = suspicion_mult x max(1, log10(n)) x probe_interval`).
    pub suspicion_mult: u32,
    /// The longest suspicion timeout, as a multiple of the shortest.
    pub suspicion_max_timeout_mult: u32,
    /// Each broadcast is sent `retransmit_mult x ceil(log10(n + 1))` times by each node.
    pub retransmit_mult: u32,
    /// Time between two gossip rounds (only when something is queued).
    pub gossip_interval: Duration,
    /// Members a gossip round sends to.
    pub gossip_nodes: usize,
    /// Base time between two push-pull exchanges (scaled up above 32 members).
    pub push_pull_interval: Duration,
    /// How long Dead and Left members are still gossiped to and kept in the probe list.
    pub gossip_to_the_dead_time: Duration,
    /// Lifeguard local-health ceiling: the score ranges over `0..awareness_max_multiplier`.
    pub awareness_max_multiplier: u32,
    /// Each failed member (and each seed not known alive) is retried about once per this interval, so
    /// partitions heal.
    pub reconnect_interval: Duration,
    /// A member that was declared Dead may come back at a new address once this long has passed.
    pub dead_node_reclaim_time: Duration,
    /// First delay between join attempts towards the seeds; it doubles up to `join_retry_max`.
    pub join_retry_initial: Duration,
    /// Longest delay between two join attempts.
    pub join_retry_max: Duration,
    /// Longest a graceful leave waits for its announcement to spread.
    pub leave_timeout: Duration,
    /// Largest datagram the membership may send. A node fits it to what one QUIC DATAGRAM frame
    /// carries (`node::MEMBERSHIP_PACKET_BUDGET`, 1100 bytes), so every profile is valid for a node
    /// as given; a smaller value is kept.
    pub max_packet_size: usize,
    /// Largest push-pull message accepted or sent, in bytes.
    pub max_push_pull_size: usize,
    /// Share of each packet's broadcast space reserved for application payloads, in percent (0..=100).
    pub app_broadcast_share_percent: u8,
    /// Most members tracked, self excluded; news about further members is dropped and counted.
    pub max_members: usize,
    /// Most member news queued for gossip at once (a member's own alive or leave, and one
    /// accusation per member); beyond it the most-sent, smallest, oldest item is dropped, and
    /// push-pull repairs what gossip then misses. Each member has at most two items, so below
    /// half this many members nothing is dropped; it bounds the queue in a mass join of a large
    /// cluster, where every node would otherwise hold news of every other (about 150 bytes each
    /// when unsigned). The default, 1024, is about what a node's gossip sends in under a minute
    /// (32 unsigned items per 1200-byte packet, 15 gossip packets a second, each item sent up to
    /// 20 times at 10,000 members: 43 s): news queued beyond that would wait longer than
    /// push-pull takes to repair it. The node's own leave is never dropped.
    pub max_member_broadcasts: usize,
    /// Most application broadcasts queued at once; the oldest, most-sent ones are dropped beyond it.
    pub max_app_broadcasts: usize,
    /// Largest metadata a member may carry, in bytes.
    pub max_meta_size: usize,
    /// Largest application broadcast (key plus payload), in bytes.
    pub max_app_broadcast_size: usize,
    /// Most failed members remembered for reconnection attempts.
    pub max_failed_members: usize,
    /// Most indirect probes this node runs on behalf of others at once.
    pub max_pending_indirect: usize,
    /// Lifeguard on (default) or off (plain SWIM: no health scaling, no nacks, fixed suspicion
    /// timeout). Off exists to measure what Lifeguard buys.
    pub lifeguard: bool,
    /// The incarnation this node starts at (1 ..= 2^61). A process that restarts under the same
    /// name must start above every incarnation of its previous life, or the cluster takes its
    /// announcements for stale news until it learns what to refute (and a node below the
    /// incarnation it was declared Dead at cannot refute it; nodes remember that incarnation after
    /// forgetting the member, up to `max_failed_members`): the fabric starts at the wall clock
    /// in milliseconds since the UNIX epoch, which grows across restarts.
    pub initial_incarnation: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self::lan()
    }
}

impl Config {
    /// Defaults for a local-area network: probes every second, a crash detected in about 5 to 10 s.
    pub fn lan() -> Self {
        Self {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            indirect_checks: 3,
            suspicion_mult: 4,
            suspicion_max_timeout_mult: 6,
            retransmit_mult: 4,
            gossip_interval: Duration::from_millis(200),
            gossip_nodes: 3,
            push_pull_interval: Duration::from_secs(30),
            gossip_to_the_dead_time: Duration::from_secs(30),
            awareness_max_multiplier: 8,
            reconnect_interval: Duration::from_secs(30),
            dead_node_reclaim_time: Duration::from_secs(10),
            join_retry_initial: Duration::from_millis(500),
            join_retry_max: Duration::from_secs(30),
            leave_timeout: Duration::from_secs(5),
            max_packet_size: 1200,
            max_push_pull_size: 8 << 20,
            app_broadcast_share_percent: 30,
            max_members: 16_384,
            max_member_broadcasts: 1024,
            max_app_broadcasts: 4096,
            max_meta_size: 512,
            max_app_broadcast_size: 1024,
            max_failed_members: 1024,
            max_pending_indirect: 1024,
            lifeguard: true,
            initial_incarnation: 1,
        }
    }

    /// Defaults for a wide-area network: slower probes, longer timeouts.
    pub fn wan() -> Self {
        Self {
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            suspicion_mult: 6,
            gossip_interval: Duration::from_millis(500),
            gossip_nodes: 4,
            push_pull_interval: Duration::from_secs(60),
            gossip_to_the_dead_time: Duration::from_secs(60),
            ..Self::lan()
        }
    }

    /// Defaults for nodes on one host (loopback): fast probes, short timeouts.
    pub fn local() -> Self {
        Self {
            probe_timeout: Duration::from_millis(200),
            indirect_checks: 1,
            suspicion_mult: 3,
            retransmit_mult: 2,
            gossip_interval: Duration::from_millis(100),
            push_pull_interval: Duration::from_secs(15),
            gossip_to_the_dead_time: Duration::from_secs(15),
            ..Self::lan()
        }
    }

    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = |field: &'static str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::ZeroDuration { field })
            } else {
                Ok(())
            }
        };
        for (field, value) in [
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("gossip_interval", self.gossip_interval),
            ("push_pull_interval", self.push_pull_interval),
            ("gossip_to_the_dead_time", self.gossip_to_the_dead_time),
            ("reconnect_interval", self.reconnect_interval),
            ("dead_node_reclaim_time", self.dead_node_reclaim_time),
            ("join_retry_initial", self.join_retry_initial),
            ("join_retry_max", self.join_retry_max),
            ("leave_timeout", self.leave_timeout),
        ] {
            if value > MAX_SETTING_DURATION {
                return Err(ConfigError::DurationTooLong { field, value });
            }
        }
        zero("probe_interval", self.probe_interval)?;
        zero("probe_timeout", self.probe_timeout)?;
        zero("gossip_interval", self.gossip_interval)?;
        zero("push_pull_interval", self.push_pull_interval)?;
        zero("reconnect_interval", self.reconnect_interval)?;
        zero("join_retry_initial", self.join_retry_initial)?;
        if self.probe_timeout >= self.probe_interval {
            return Err(ConfigError::ProbeTimeoutTooLong {
                probe_timeout: self.probe_timeout,
                probe_interval: self.probe_interval,
            });
        }
        if self.initial_incarnation == 0 || self.initial_incarnation > super::MAX_INCARNATION / 2 {
            return Err(ConfigError::Inconsistent {
                reason: "initial_incarnation must be in 1..=2^61",
            });
        }
        if self.join_retry_max < self.join_retry_initial {
            return Err(ConfigError::Inconsistent {
                reason: "join_retry_max must be at least join_retry_initial",
            });
        }
        let positive = |field: &'static str, v: u64| {
            if v == 0 {
                Err(ConfigError::Zero { field })
            } else {
                Ok(())
            }
        };
        positive("suspicion_mult", self.suspicion_mult.into())?;
        positive(
            "suspicion_max_timeout_mult",
            self.suspicion_max_timeout_mult.into(),
        )?;
        positive("retransmit_mult", self.retransmit_mult.into())?;
        positive("gossip_nodes", self.gossip_nodes as u64)?;
        positive(
            "awareness_max_multiplier",
            self.awareness_max_multiplier.into(),
        )?;
        positive("max_members", self.max_members as u64)?;
        positive("max_member_broadcasts", self.max_member_broadcasts as u64)?;
        if self.app_broadcast_share_percent > 100 {
            return Err(ConfigError::Inconsistent {
                reason: "app_broadcast_share_percent must be within 0..=100",
            });
        }
        // A packet must hold the header, a probe message and at least one member broadcast.
        if self.max_packet_size < MIN_PACKET_SIZE {
            return Err(ConfigError::PacketTooSmall {
                max_packet_size: self.max_packet_size,
                minimum: MIN_PACKET_SIZE,
            });
        }
        if self.max_app_broadcast_size + 64 > self.max_packet_size {
            return Err(ConfigError::Inconsistent {
                reason: "max_app_broadcast_size must leave 64 bytes of room in max_packet_size",
            });
        }
        if self.max_meta_size + 2 * crate::membership::MAX_NAME_LEN + 64 > self.max_packet_size {
            return Err(ConfigError::Inconsistent {
                reason: "max_meta_size plus a member name must fit in max_packet_size",
            });
        }
        Ok(())
    }
}

/// The longest duration any setting may have (ten years): deadlines computed from settings
/// can then never overflow the clock.
pub const MAX_SETTING_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The smallest `max_packet_size` the membership works with.
pub const MIN_PACKET_SIZE: usize = 512;

/// A membership setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration is longer than [`MAX_SETTING_DURATION`].
    #[error(
        "membership setting `{field}` of {value:?} is longer than the ten years any setting may be"
    )]
    DurationTooLong {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: Duration,
    },
    /// A duration that must be positive is zero.
    #[error("membership setting `{field}` must be longer than zero")]
    ZeroDuration {
        /// The offending field.
        field: &'static str,
    },
    /// A count that must be positive is zero.
    #[error("membership setting `{field}` must be at least 1")]
    Zero {
        /// The offending field.
        field: &'static str,
    },
    /// The probe timeout does not leave room for indirect probes within the probe interval.
    #[error(
        "probe_timeout ({probe_timeout:?}) must be shorter than probe_interval ({probe_interval:?})"
    )]
    ProbeTimeoutTooLong {
        /// The configured probe timeout.
        probe_timeout: Duration,
        /// The configured probe interval.
        probe_interval: Duration,
    },
    /// The packet budget cannot hold a probe plus a broadcast.
    #[error("max_packet_size of {max_packet_size} bytes is below the minimum of {minimum}")]
    PacketTooSmall {
        /// The configured budget.
        max_packet_size: usize,
        /// The smallest budget that works.
        minimum: usize,
    },
    /// Two settings contradict each other.
    #[error("invalid membership settings: {reason}")]
    Inconsistent {
        /// What is wrong and how to fix it.
        reason: &'static str,
    },
}
