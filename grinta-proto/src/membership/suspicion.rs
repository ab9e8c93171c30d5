//! Lifeguard's dynamic suspicion timeout.
//!
//! With `n` known members: `min = suspicion_mult x max(1, log10(max(1, n))) x probe_interval`,
//! `max = suspicion_max_timeout_mult x min`, and `k = suspicion_mult - 2` wanted confirmations (0 when
//! `n - 2 < k`). The timer starts at `max` when `k >= 1`, else `min`; after `c` independent confirmations
//! the deadline is `start + max(min, max - (max - min) x ln(c + 1) / ln(k + 1))`.

use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::Config;

/// A running suspicion of one member.
#[derive(Debug, Clone)]
pub(crate) struct Suspicion {
    /// Incarnation the suspicion is about.
    pub(crate) incarnation: u64,
    start: Instant,
    min: Duration,
    max: Duration,
    wanted: u32,
    accuser: String,
    confirmations: SmallVec<[String; 4]>,
    pub(crate) deadline: Instant,
    /// A signed accusation (an encoded `Broadcast`) to show the suspect when probing it (the
    /// buddy system), so that it refutes at once.
    pub(crate) buddy: Option<bytes::Bytes>,
}

/// `(min, max, k)` for a cluster of `n` known members.
pub(crate) fn parameters(config: &Config, n: usize) -> (Duration, Duration, u32) {
    let scale = (n.max(1) as f64).log10().max(1.0);
    let min = config
        .probe_interval
        .mul_f64(f64::from(config.suspicion_mult) * scale);
    if !config.lifeguard {
        // Plain SWIM: one fixed timeout, confirmations change nothing.
        return (min, min, 0);
    }
    let max = min * config.suspicion_max_timeout_mult;
    let k = config.suspicion_mult.saturating_sub(2);
    let k = if (n as i64 - 2) < i64::from(k) { 0 } else { k };
    (min, max, k)
}

impl Suspicion {
    pub(crate) fn new(
        config: &Config,
        n: usize,
        incarnation: u64,
        accuser: &str,
        now: Instant,
    ) -> Self {
        let (min, max, wanted) = parameters(config, n);
        let first = if wanted >= 1 { max } else { min };
        Self {
            incarnation,
            start: now,
            min,
            max,
            wanted,
            accuser: accuser.to_owned(),
            confirmations: SmallVec::new(),
            deadline: now + first,
            buddy: None,
        }
    }

    /// Counts `from` as an independent confirmation. Returns true if it was new (and so worth
    /// re-broadcasting); the deadline moves earlier accordingly.
    pub(crate) fn confirm(&mut self, from: &str) -> bool {
        if !self.would_count(from) {
            return false;
        }
        self.confirmations.push(from.to_owned());
        let c = self.confirmations.len() as f64;
        let fraction = (c + 1.0).ln() / (f64::from(self.wanted) + 1.0).ln();
        let span = self.max.saturating_sub(self.min).mul_f64(fraction.min(1.0));
        let timeout = self.max.saturating_sub(span).max(self.min);
        self.deadline = self.start + timeout;
        true
    }

    /// Whether [`confirm`](Self::confirm) would count `from`: checked before its claim's
    /// signature, so that repeated news costs no verification.
    pub(crate) fn would_count(&self, from: &str) -> bool {
        !(self.wanted == 0
            || self.confirmations.len() as u32 >= self.wanted
            || from == self.accuser
            || self.confirmations.iter().any(|c| c == from))
    }

    /// Number of independent confirmations counted so far.
    #[cfg(test)]
    pub(crate) fn confirmations(&self) -> usize {
        self.confirmations.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_the_formula() {
        let c = Config::lan();
        // n = 100: log10 = 2, min = 4 x 2 x 1 s = 8 s, max = 48 s, k = 2.
        assert_eq!(
            parameters(&c, 100),
            (Duration::from_secs(8), Duration::from_secs(48), 2)
        );
        // n = 10: log10 = 1.
        assert_eq!(
            parameters(&c, 10),
            (Duration::from_secs(4), Duration::from_secs(24), 2)
        );
        // n = 3: log10 < 1 is clamped to 1 and n - 2 < k, so no confirmations are wanted.
        assert_eq!(parameters(&c, 3).2, 0);
        assert_eq!(parameters(&c, 3).0, Duration::from_secs(4));
    }

    #[test]
    fn confirmations_shorten_the_deadline_down_to_min() {
        let c = Config::lan();
        let t0 = Instant::now();
        let mut s = Suspicion::new(&c, 100, 1, "a", t0);
        assert_eq!(s.deadline, t0 + Duration::from_secs(48));
        assert!(!s.confirm("a"), "the first accuser is not a confirmation");
        assert!(s.confirm("b"));
        assert!(!s.confirm("b"), "each sender counts once");
        // c = 1, k = 2: 48 - 40 x ln 2 / ln 3 = 22.76 s.
        let expected =
            Duration::from_secs(48) - Duration::from_secs(40).mul_f64(2f64.ln() / 3f64.ln());
        assert_eq!(s.deadline, t0 + expected);
        assert!(s.confirm("c"));
        assert_eq!(s.deadline, t0 + Duration::from_secs(8));
        assert!(!s.confirm("d"), "no more than k confirmations count");
        assert_eq!(s.confirmations(), 2);
    }

    #[test]
    fn without_lifeguard_the_timeout_is_fixed() {
        let c = Config {
            lifeguard: false,
            ..Config::lan()
        };
        let t0 = Instant::now();
        let mut s = Suspicion::new(&c, 100, 1, "a", t0);
        assert_eq!(s.deadline, t0 + Duration::from_secs(8));
        assert!(!s.confirm("b"));
    }
}
