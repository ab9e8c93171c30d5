//! Application datagrams on their way from `send_datagram` to the driver, outside the node's
//! lock.
//!
//! A datagram sender may call [`Fabric::send_datagram`](super::Fabric::send_datagram) millions
//! of times a second. Taking the node's lock for each would make it contend, datagram by
//! datagram, with the driver, which holds that lock while it processes a batch of packets (and a
//! sender that loses that race sleeps in the kernel). Instead, once a name is known to lead to
//! another node, its datagrams go into this outbox under a small lock of its own; the driver
//! moves the whole queue into the node in its next round, where each datagram is routed and
//! framed as if it had been sent under the lock. The first datagram of a burst wakes the driver.
//!
//! The outbox remembers which names led to another node as of the directory's last change (a
//! member joined or failed, a name moved): every change forgets them all, so the next datagram
//! to each name goes through the node once more, which returns the same errors a dial would
//! (no such endpoint) at once. A name whose owner goes away between that check and the driver's
//! round is dropped there and counted, as the connection would have dropped it.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use hashbrown::HashSet;

/// Datagrams the outbox holds for the driver; beyond it a datagram is dropped (and counted), as
/// a full connection drops it, so a sender is never blocked.
pub const DATAGRAM_OUTBOX: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it is a bug in grinta; the state is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct State {
    /// Names that led to another node since the directory last changed.
    remote: HashSet<Box<str>>,
    /// Datagrams for the driver, in the order they were sent, in runs to the same name: a
    /// sender streaming to one name adds to the last run after comparing the name, and shares no
    /// counter with the driver.
    runs: Vec<Run>,
    /// Datagrams in `runs`.
    queued: usize,
    /// The last run's name is still in `remote`.
    last_run_known: bool,
    /// Datagrams dropped because the queue was full, not yet counted by the node.
    dropped: u64,
    /// The fabric is shutting down: every datagram goes through the node, which refuses it.
    closed: bool,
}

/// Datagrams to one name, in the order they were sent.
pub(crate) struct Run {
    pub(crate) endpoint: Box<str>,
    pub(crate) payloads: Vec<Bytes>,
}

/// What [`DatagramOutbox::push`] did.
#[derive(Debug)]
pub(crate) enum Push {
    /// Queued; `wake`: the queue was empty, the driver must be woken.
    Queued { wake: bool },
    /// Dropped and counted: the queue is full.
    Dropped,
    /// The name is not known to lead to another node (or the fabric is shutting down): send it
    /// through the node.
    ThroughNode(Bytes),
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct DatagramOutbox {
    state: Mutex<State>,
}

impl DatagramOutbox {
    /// Queues a datagram for `endpoint` if the name is known to lead to another node.
    pub(crate) fn push(&self, endpoint: &str, payload: Bytes) -> Push {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let same_run = state.last_run_known
            && state
                .runs
                .last()
                .is_some_and(|run| &*run.endpoint == endpoint);
        if !same_run && (state.closed || !state.remote.contains(endpoint)) {
            return Push::ThroughNode(payload);
        }
        if state.queued >= DATAGRAM_OUTBOX {
            state.dropped += 1;
            return Push::Dropped;
        }
        let wake = state.queued == 0;
        state.queued += 1;
        match state.runs.last_mut() {
            Some(run) if same_run => run.payloads.push(payload),
            _ => {
                state.runs.push(Run {
                    endpoint: endpoint.into(),
                    payloads: vec![payload],
                });
                state.last_run_known = true;
            }
        }
        Push::Queued { wake }
    }

    /// Remembers that `endpoint` led to another node (under the node's lock, so no directory
    /// change comes between the node's answer and this).
    pub(crate) fn learn_remote(&self, endpoint: &str) {
        let mut state = lock(&self.state);
        if !state.closed && !state.remote.contains(endpoint) {
            state.remote.insert(endpoint.into());
        }
    }

    /// The directory changed (under the node's lock): every name goes through the node again.
    pub(crate) fn forget_routes(&self) {
        let mut state = lock(&self.state);
        state.last_run_known = false;
        if !state.remote.is_empty() {
            state.remote.clear();
        }
    }

    /// The fabric is shutting down: no datagram is queued any more.
    pub(crate) fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.last_run_known = false;
        state.remote.clear();
    }

    /// Moves the queued datagrams to the end of `into` (the driver, once per round); returns how
    /// many were dropped for want of room since the last call.
    pub(crate) fn take(&self, into: &mut Vec<Run>) -> u64 {
        let mut state = lock(&self.state);
        into.append(&mut state.runs);
        state.queued = 0;
        state.last_run_known = false;
        std::mem::take(&mut state.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_known_to_be_remote_are_queued_and_the_queue_is_bounded() {
        let outbox = DatagramOutbox::default();
        let payload = Bytes::from_static(b"x");
        assert!(matches!(
            outbox.push("svc", payload.clone()),
            Push::ThroughNode(_)
        ));
        outbox.learn_remote("svc");
        assert!(matches!(
            outbox.push("svc", payload.clone()),
            Push::Queued { wake: true }
        ));
        assert!(matches!(
            outbox.push("other", payload.clone()),
            Push::ThroughNode(_)
        ));
        let mut pushed = 1;
        let mut dropped = 0;
        for _ in 0..10_000 {
            match outbox.push("svc", payload.clone()) {
                Push::Queued { wake } => {
                    assert!(!wake, "only the first of a burst wakes the driver");
                    pushed += 1;
                }
                Push::Dropped => dropped += 1,
                Push::ThroughNode(_) => panic!("a known name goes to the outbox"),
            }
        }
        assert_eq!(pushed, DATAGRAM_OUTBOX);
        assert_eq!(dropped, 10_001 - DATAGRAM_OUTBOX as u64);
        let mut taken = Vec::new();
        assert_eq!(outbox.take(&mut taken), dropped);
        assert_eq!(taken.len(), 1, "one run to one name");
        assert_eq!(&*taken[0].endpoint, "svc");
        assert_eq!(taken[0].payloads.len(), DATAGRAM_OUTBOX);
        assert_eq!(outbox.take(&mut taken), 0, "drops are counted once");
        // Room again: the next datagram wakes the driver.
        assert!(matches!(
            outbox.push("svc", payload.clone()),
            Push::Queued { wake: true }
        ));
        // A directory change sends every name through the node again.
        outbox.forget_routes();
        assert!(matches!(
            outbox.push("svc", payload.clone()),
            Push::ThroughNode(_)
        ));
        outbox.learn_remote("svc");
        outbox.close();
        assert!(matches!(outbox.push("svc", payload), Push::ThroughNode(_)));
        outbox.learn_remote("svc");
        assert!(matches!(
            outbox.push("svc", Bytes::new()),
            Push::ThroughNode(_)
        ));
    }

    #[test]
    fn runs_keep_the_order_of_sends_across_names() {
        let outbox = DatagramOutbox::default();
        outbox.learn_remote("a");
        outbox.learn_remote("b");
        for (name, payload) in [("a", 1u8), ("a", 2), ("b", 3), ("a", 4)] {
            assert!(matches!(
                outbox.push(name, Bytes::from(vec![payload])),
                Push::Queued { .. }
            ));
        }
        let mut runs = Vec::new();
        outbox.take(&mut runs);
        let flat: Vec<(&str, Vec<u8>)> = runs
            .iter()
            .map(|run| {
                let bytes = run.payloads.iter().map(|p| p[0]).collect();
                (&*run.endpoint, bytes)
            })
            .collect();
        assert_eq!(flat, [("a", vec![1, 2]), ("b", vec![3]), ("a", vec![4])]);
        // After a directory change, a name must be learnt again even if it is the last run's.
        outbox.learn_remote("a");
        assert!(matches!(
            outbox.push("a", Bytes::new()),
            Push::Queued { wake: true }
        ));
        outbox.forget_routes();
        assert!(matches!(
            outbox.push("a", Bytes::new()),
            Push::ThroughNode(_)
        ));
    }
}
