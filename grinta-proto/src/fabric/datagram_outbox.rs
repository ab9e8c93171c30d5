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
//!
//! It also remembers, per name, how many bytes its connections would take
//! ([`Node::datagram_room`](crate::node::Node::datagram_room)), less what was queued since: a
//! datagram beyond that room is dropped (and counted) here, at once, as the node would drop it,
//! without waking the driver. A sender offering more than the path carries thus costs the
//! driver nothing for what is dropped. The driver looks the room up again after each round's
//! transmits, for every name queued to since, and for every name whose room ran low until it
//! has room again.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use hashbrown::{HashMap, HashSet};

use crate::datagram::{MAX_ENCODED_LEN, encoded_len};

/// What a queued datagram costs a connection's datagram buffer besides its framed bytes (quinn
/// counts each queued datagram's handle, a `Bytes`), so the room is spent as the node spends it.
const QUEUED_OVERHEAD: usize = std::mem::size_of::<Bytes>();

/// What a datagram of `payload_len` bytes to `endpoint` takes of its connection's room.
fn room_taken(endpoint: &str, payload_len: usize) -> usize {
    encoded_len(endpoint, payload_len) + QUEUED_OVERHEAD
}

/// Datagrams the outbox holds for the driver; beyond it a datagram is dropped (and counted), as
/// a full connection drops it, so a sender is never blocked.
pub const DATAGRAM_OUTBOX: usize = 1024;

/// A name whose room is below this many bytes keeps having its room looked up by the driver
/// each round until it is above: its connection is busy, and will free room as it sends.
const LOW_ROOM: usize = 16 * MAX_ENCODED_LEN;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it is a bug in grinta; the state is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct State {
    /// Names that led to another node since the directory last changed, with the bytes of
    /// framed datagrams their connections take (as of the driver's last look, less what was
    /// queued since). The last run's room is kept in `last_room` while it is the last run.
    remote: HashMap<Box<str>, usize>,
    /// Datagrams for the driver, in the order they were sent, in runs to the same name: a
    /// sender streaming to one name adds to the last run after comparing the name, and shares no
    /// counter with the driver.
    runs: Vec<Run>,
    /// Datagrams in `runs`.
    queued: usize,
    /// The last run's name is still in `remote`, and `last_room` is its room.
    last_run_known: bool,
    last_room: usize,
    /// Names whose room the driver looks up again after its next transmits: queued to or handed
    /// over since its last look, or short of room.
    stale: HashSet<Box<str>>,
    /// Datagrams dropped (queue full, no room), not yet counted by the node.
    dropped: u64,
    /// The fabric is shutting down: every datagram goes through the node, which refuses it.
    closed: bool,
}

impl State {
    /// Writes the last run's room back to `remote` (its name is about to stop being the last
    /// run's, or the runs are taken).
    fn save_last_room(&mut self) {
        if !self.last_run_known {
            return;
        }
        let room = self.last_room;
        if let Some(run) = self.runs.last() {
            if let Some(saved) = self.remote.get_mut(&*run.endpoint) {
                *saved = room;
            }
        }
    }

    /// Sets `endpoint`'s room to `room` in the node less what is queued here for it; returns
    /// the room left.
    fn set_room(&mut self, endpoint: &str, room: usize) -> usize {
        let queued: usize = self
            .runs
            .iter()
            .filter(|run| &*run.endpoint == endpoint)
            .map(|run| run.bytes)
            .sum();
        let left = room.saturating_sub(queued);
        let last_is_it = self.last_run_known
            && self
                .runs
                .last()
                .is_some_and(|run| &*run.endpoint == endpoint);
        if last_is_it {
            self.last_room = left;
        } else if let Some(saved) = self.remote.get_mut(endpoint) {
            *saved = left;
        }
        left
    }

    /// Starts a run to `endpoint`, whose room is `room`; the last run, if empty, gives way.
    fn start_run(&mut self, endpoint: &str, room: usize) {
        self.save_last_room();
        if self.runs.last().is_some_and(|run| run.payloads.is_empty()) {
            self.runs.pop();
        }
        if !self.stale.contains(endpoint) {
            self.stale.insert(endpoint.into());
        }
        self.runs.push(Run {
            endpoint: endpoint.into(),
            payloads: Vec::new(),
            bytes: 0,
        });
        self.last_room = room;
        self.last_run_known = true;
    }
}

/// Datagrams to one name, in the order they were sent.
pub(crate) struct Run {
    pub(crate) endpoint: Box<str>,
    pub(crate) payloads: Vec<Bytes>,
    /// The room they take ([`room_taken`]).
    bytes: usize,
}

/// What [`DatagramOutbox::push`] did.
#[derive(Debug)]
pub(crate) enum Push {
    /// Queued; `wake`: the queue was empty, the driver must be woken.
    Queued { wake: bool },
    /// Dropped and counted: the queue is full, or the name's connections have no room.
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
        let len = room_taken(endpoint, payload.len());
        let mut state = lock(&self.state);
        let state = &mut *state;
        let same_run = state.last_run_known
            && state
                .runs
                .last()
                .is_some_and(|run| &*run.endpoint == endpoint);
        if !same_run {
            if state.closed {
                return Push::ThroughNode(payload);
            }
            let Some(&room) = state.remote.get(endpoint) else {
                return Push::ThroughNode(payload);
            };
            state.start_run(endpoint, room);
        }
        if state.queued >= DATAGRAM_OUTBOX || len > state.last_room {
            state.dropped += 1;
            return Push::Dropped;
        }
        state.last_room -= len;
        let wake = state.queued == 0;
        state.queued += 1;
        if let Some(run) = state.runs.last_mut() {
            run.payloads.push(payload);
            run.bytes += len;
        }
        Push::Queued { wake }
    }

    /// Remembers that `endpoint` led to another node whose connections take `room` bytes of
    /// datagrams (under the node's lock, so no directory change comes between the node's answer
    /// and this).
    pub(crate) fn learn_remote(&self, endpoint: &str, room: usize) {
        let mut state = lock(&self.state);
        if state.closed {
            return;
        }
        if !state.remote.contains_key(endpoint) {
            state.remote.insert(endpoint.into(), 0);
        }
        state.set_room(endpoint, room);
    }

    /// The directory changed (under the node's lock): every name goes through the node again.
    pub(crate) fn forget_routes(&self) {
        let mut state = lock(&self.state);
        state.last_run_known = false;
        if !state.remote.is_empty() {
            state.remote.clear();
        }
        state.stale.clear();
    }

    /// The fabric is shutting down: no datagram is queued any more.
    pub(crate) fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.last_run_known = false;
        state.remote.clear();
        state.stale.clear();
    }

    /// Moves the queued datagrams to the end of `into` (the driver, once per round); returns how
    /// many were dropped since the last call.
    pub(crate) fn take(&self, into: &mut Vec<Run>) -> u64 {
        let mut state = lock(&self.state);
        let state = &mut *state;
        state.save_last_room();
        // The driver looks again at the room of every name it hands over, even one it looked at
        // since the run began: the run may have used that room up since.
        for run in &state.runs {
            if !state.stale.contains(&*run.endpoint) {
                state.stale.insert(run.endpoint.clone());
            }
        }
        into.extend(state.runs.drain(..).filter(|run| !run.payloads.is_empty()));
        state.queued = 0;
        state.last_run_known = false;
        std::mem::take(&mut state.dropped)
    }

    /// Looks up again the room of the names queued to since the last call, or short of room
    /// (the driver, under the node's lock, after its transmits freed room): `room` gives a name's
    /// room in the node.
    pub(crate) fn refresh_rooms(&self, mut room: impl FnMut(&str) -> usize) {
        // The rooms are looked up without the outbox's lock, which senders take.
        let stale = {
            let mut state = lock(&self.state);
            if state.stale.is_empty() {
                return;
            }
            std::mem::take(&mut state.stale)
        };
        let rooms: Vec<(Box<str>, usize)> = stale
            .into_iter()
            .map(|endpoint| {
                let room = room(&endpoint);
                (endpoint, room)
            })
            .collect();
        let mut state = lock(&self.state);
        for (endpoint, room) in rooms {
            // Forgotten meanwhile (the directory changed): learnt afresh when next sent to.
            if !state.remote.contains_key(&*endpoint) {
                continue;
            }
            let left = state.set_room(&endpoint, room);
            if left < LOW_ROOM && !state.stale.contains(&*endpoint) {
                state.stale.insert(endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room for any number of datagrams (the tests of the queue's own bound).
    const PLENTY: usize = usize::MAX / 2;

    #[test]
    fn only_names_known_to_be_remote_are_queued_and_the_queue_is_bounded() {
        let outbox = DatagramOutbox::default();
        let payload = Bytes::from_static(b"x");
        assert!(matches!(
            outbox.push("svc", payload.clone()),
            Push::ThroughNode(_)
        ));
        outbox.learn_remote("svc", PLENTY);
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
        outbox.learn_remote("svc", PLENTY);
        outbox.close();
        assert!(matches!(outbox.push("svc", payload), Push::ThroughNode(_)));
        outbox.learn_remote("svc", PLENTY);
        assert!(matches!(
            outbox.push("svc", Bytes::new()),
            Push::ThroughNode(_)
        ));
    }

    #[test]
    fn runs_keep_the_order_of_sends_across_names() {
        let outbox = DatagramOutbox::default();
        outbox.learn_remote("a", PLENTY);
        outbox.learn_remote("b", PLENTY);
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
        outbox.learn_remote("a", PLENTY);
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

    #[test]
    fn a_name_gets_no_more_than_its_room_until_the_driver_looks_again() {
        let outbox = DatagramOutbox::default();
        let payload = Bytes::from_static(&[1u8; 64]);
        let each = room_taken("a", 64);
        outbox.learn_remote("a", 10 * each + each / 2);
        outbox.learn_remote("b", PLENTY);
        let mut queued = 0;
        for i in 0..100_000 {
            match outbox.push("a", payload.clone()) {
                Push::Queued { .. } => queued += 1,
                Push::Dropped => {}
                Push::ThroughNode(_) => panic!("a known name"),
            }
            // Another name, with room, is not held back by this one's.
            if i % 1000 == 0 {
                assert!(matches!(
                    outbox.push("b", payload.clone()),
                    Push::Queued { .. }
                ));
            }
        }
        assert_eq!(queued, 10, "the room fits ten");
        let mut runs = Vec::new();
        assert_eq!(outbox.take(&mut runs), 100_000 - 10);
        let a: usize = runs
            .iter()
            .filter(|r| &*r.endpoint == "a")
            .map(|r| r.payloads.len())
            .sum();
        assert_eq!(a, 10);
        assert!(
            runs.len() <= 202,
            "runs to the two names alternate, none empty: {}",
            runs.len()
        );
        assert!(runs.iter().all(|r| !r.payloads.is_empty()));
        // Still no room: the driver has not looked again.
        assert!(matches!(outbox.push("a", payload.clone()), Push::Dropped));
        // Three datagrams queued since the take count against the room the driver finds.
        outbox.refresh_rooms(|_| 3 * each);
        for _ in 0..3 {
            assert!(matches!(
                outbox.push("a", payload.clone()),
                Push::Queued { .. }
            ));
        }
        assert!(matches!(outbox.push("a", payload.clone()), Push::Dropped));
        outbox.take(&mut runs);
        outbox.refresh_rooms(|_| each);
        assert!(matches!(
            outbox.push("a", payload.clone()),
            Push::Queued { .. }
        ));
        outbox.refresh_rooms(|name| if name == "a" { 2 * each } else { PLENTY });
        // Room for two, one of which is queued already.
        assert!(matches!(
            outbox.push("a", payload.clone()),
            Push::Queued { .. }
        ));
        assert!(matches!(outbox.push("a", payload.clone()), Push::Dropped));
    }

    #[test]
    fn a_name_whose_run_used_up_its_room_is_looked_up_after_the_take() {
        let outbox = DatagramOutbox::default();
        let payload = Bytes::from_static(&[1u8; 900]);
        let each = room_taken("a", 900);
        outbox.learn_remote("a", 2 * LOW_ROOM);
        assert!(matches!(
            outbox.push("a", payload.clone()),
            Push::Queued { wake: true }
        ));
        // The driver looks while the run is young: plenty of room, so `a` is not short of it.
        let mut looked = 0;
        outbox.refresh_rooms(|_| {
            looked += 1;
            2 * LOW_ROOM
        });
        assert_eq!(looked, 1);
        // The same run then uses the room up.
        let mut queued = 1;
        while matches!(outbox.push("a", payload.clone()), Push::Queued { .. }) {
            queued += 1;
        }
        assert_eq!(queued, 2 * LOW_ROOM / each);
        let mut runs = Vec::new();
        outbox.take(&mut runs);
        // The connection sent them: the driver looks again, and `a` has room.
        outbox.refresh_rooms(|_| {
            looked += 1;
            2 * LOW_ROOM
        });
        assert_eq!(looked, 2, "a name handed over is looked at after the take");
        assert!(matches!(
            outbox.push("a", payload.clone()),
            Push::Queued { wake: true }
        ));
    }

    #[test]
    fn a_name_short_of_room_is_looked_up_until_it_has_room_again() {
        let outbox = DatagramOutbox::default();
        let payload = Bytes::from_static(&[1u8; 64]);
        outbox.learn_remote("a", 0);
        assert!(matches!(outbox.push("a", payload.clone()), Push::Dropped));
        let mut runs = Vec::new();
        assert_eq!(outbox.take(&mut runs), 1);
        assert!(runs.is_empty(), "an empty run is not handed over");
        // The driver looks again after each round while the room stays short, even with no
        // datagram sent meanwhile (the connection frees room as it sends).
        let mut looked = 0;
        for room in [0, 100, LOW_ROOM - 1] {
            outbox.refresh_rooms(|_| {
                looked += 1;
                room
            });
        }
        assert_eq!(looked, 3);
        outbox.refresh_rooms(|_| {
            looked += 1;
            LOW_ROOM
        });
        assert_eq!(looked, 4);
        outbox.refresh_rooms(|_| {
            looked += 1;
            LOW_ROOM
        });
        assert_eq!(
            looked, 4,
            "a name with room and nothing queued is left alone"
        );
        assert!(matches!(
            outbox.push("a", payload.clone()),
            Push::Queued { wake: true }
        ));
        // A forgotten name is not looked up.
        outbox.forget_routes();
        outbox.refresh_rooms(|_| {
            looked += 1;
            0
        });
        assert_eq!(looked, 4);
    }
}
