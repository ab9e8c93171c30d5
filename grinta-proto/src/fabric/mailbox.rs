//! The exchange between a remote flow's handle and the driver, outside the node's lock.
//!
//! A busy flow moves millions of small messages a second. If every `send` and `recv` locked the
//! node, the flow's tasks would contend message by message with the driver, which holds that lock
//! while it processes a batch of packets. Instead each remote flow has a [`Mailbox`] with two small
//! locks of its own:
//!
//! - the **outbox**: `send` frames the message into the flow's own queue and returns; the first
//!   message after a hand-over schedules the mailbox, and the driver moves the whole queue into
//!   the node (no copy) in its next round. The send buffer limit counts both this queue and what
//!   the node still holds for the stream.
//! - the **inbox**: the driver moves the flow's received messages into it when the flow becomes
//!   readable; `recv` takes them all at once. The bytes the reader took are given back to the
//!   node's receive buffer the next time the driver looks, or at once (by scheduling the
//!   mailbox) if the node had stopped reading for lack of room.
//!
//! - **dropped handles**: the last handle of a flow queues what the node must do with it (reset
//!   or release) on the driver's wake-up lock and wakes the driver, which tells the node in its
//!   next round: dropping a flow never waits for the node's lock.
//!
//! Whatever is not plain data (the flow finished, failed, was reset, the fabric shut down) sets
//! `closed` on a side, and that side's next call goes through the node, under its lock, where the
//! flow's state decides the answer. Before any such call the mailbox is handed over, so the order
//! of messages never changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Instant;

use bytes::Bytes;

use crate::flow::{FlowId, FlowStats, RecvQueue, SendQueue};
use crate::node::Node;

/// Locks a mailbox mutex; a panic while holding it is a bug in grinta, and the state is still
/// usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the driver is woken, and the mailboxes it must look at: a lock of its own, so flow handles
/// can wake the driver without taking the node's.
#[derive(Default)]
pub(crate) struct Wakeup {
    state: Mutex<WakeState>,
}

#[derive(Default)]
struct WakeState {
    driver: Option<Waker>,
    scheduled: Vec<Arc<Mailbox>>,
    /// Remote flows whose last handle is gone, for the driver to tell the node.
    gone: Vec<(FlowId, HandlesGone)>,
}

/// How a remote flow's last handle left it: what the node must do with the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandlesGone {
    /// Dropped while the flow could still send: the node resets it.
    Open,
    /// Dropped after `finish`: the node releases it (reads and discards what still arrives).
    Finished,
    /// Dropped after a reset: the node has nothing left to do.
    Reset,
}

impl Wakeup {
    /// Wakes the driver (if it waits).
    pub(crate) fn wake_driver(&self) {
        let waker = lock(&self.state).driver.take();
        wake(waker);
    }

    /// Registers the driver's waker.
    pub(crate) fn register_driver(&self, waker: &Waker) {
        let mut state = lock(&self.state);
        match &state.driver {
            Some(w) if w.will_wake(waker) => {}
            _ => state.driver = Some(waker.clone()),
        }
    }

    /// Asks the driver to look at `mailbox` in its next round.
    fn schedule(&self, mailbox: &Arc<Mailbox>) {
        if mailbox.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let waker = {
            let mut state = lock(&self.state);
            state.scheduled.push(mailbox.clone());
            state.driver.take()
        };
        wake(waker);
    }

    /// Queues what the node must do now that remote flow `id` has no handle left, and wakes the
    /// driver: a dropped handle does not wait for the node's lock (a request's flow is dropped
    /// once per request, on both nodes).
    pub(crate) fn handles_gone(&self, id: FlowId, gone: HandlesGone) {
        let waker = {
            let mut state = lock(&self.state);
            state.gone.push((id, gone));
            state.driver.take()
        };
        wake(waker);
    }

    /// Moves the flows whose handles are gone to `into` (the driver once per round, and
    /// whatever reads the node's flows for the application).
    pub(crate) fn take_gone(&self, into: &mut Vec<(FlowId, HandlesGone)>) {
        into.append(&mut lock(&self.state).gone);
    }

    /// Moves the scheduled mailboxes to `into` (the driver, once per round).
    pub(crate) fn take_scheduled(&self, into: &mut Vec<Arc<Mailbox>>) {
        into.append(&mut lock(&self.state).scheduled);
        for mailbox in into.iter() {
            // Cleared before the driver looks: what a handle does from now on schedules again.
            mailbox.scheduled.store(false, Ordering::Release);
        }
    }
}

/// What the sending half queued and the node has not taken yet.
#[derive(Default)]
struct Outbox {
    queue: SendQueue,
    /// Messages and body bytes in `queue`, for the flow's counters.
    messages: u64,
    bytes: u64,
    /// Bytes the node still holds for the stream, as of the driver's last look.
    node_queued: usize,
    /// The size of the message a sender waits to queue.
    wanted: Option<usize>,
    waker: Option<Waker>,
    /// Sends go through the node (finished, failed, reset, shut down).
    closed: bool,
}

impl Outbox {
    /// Whether a message of `len` bytes fits: one message always fits when nothing is queued.
    fn has_room(&self, len: usize, send_buffer: usize) -> bool {
        let queued = self.queue.len() + self.node_queued;
        queued == 0 || queued + len <= send_buffer
    }

    /// Bytes that fit beyond what is queued.
    fn room(&self, send_buffer: usize) -> usize {
        send_buffer.saturating_sub(self.queue.len() + self.node_queued)
    }

    /// The waiting sender's waker, to wake once the lock is released (a sender woken under
    /// it would wait for it at once).
    fn take_waker(&mut self) -> Option<Waker> {
        self.wanted = None;
        self.waker.take()
    }
}

/// Wakes `waker`, if any: called with no mailbox lock held.
fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// Received messages the driver moved out of the node for the receiving half.
#[derive(Default)]
struct Inbox {
    messages: RecvQueue,
    /// Bytes the reader took that the node still counts against the flow's receive buffer.
    consumed: usize,
    /// The node stopped reading the stream for lack of room.
    node_full: bool,
    waker: Option<Waker>,
    /// Once `messages` is empty, receives go through the node (the other side finished, the flow
    /// failed or was reset, the fabric shut down).
    closed: bool,
}

/// What [`Mailbox::stage`] did with a message.
pub(crate) enum Staged {
    /// Queued, with `room` bytes left for the sender (see [`Mailbox::commit`]).
    Queued { room: usize },
    /// No room: the task is woken when there is.
    Full(Bytes),
    /// The flow is not plainly open: the node decides.
    AskNode(Bytes),
    /// Larger than the other side accepts.
    TooLarge {
        /// The message's size.
        size: u64,
        /// The other side's limit.
        limit: u64,
    },
}

/// What [`Mailbox::commit`] did with a batch.
pub(crate) enum Committed {
    /// Queued, with `room` bytes left for the sender.
    Queued { room: usize },
    /// The flow is not plainly open: nothing was taken, and the node decides.
    Closed,
}

/// What [`Mailbox::take`] found.
pub(crate) enum Taken {
    /// The next message (more may have been moved to the reader's queue).
    Message(Bytes),
    /// Nothing yet: the task is woken when there is.
    Pending,
    /// Nothing left here and the flow is not plainly open: the node decides.
    AskNode,
}

/// One remote flow's exchange between its handle and the driver (see the module docs).
pub(crate) struct Mailbox {
    id: FlowId,
    peer_max_message: u64,
    send_buffer: usize,
    /// In the driver's list for its next round.
    scheduled: AtomicBool,
    outbox: Mutex<Outbox>,
    inbox: Mutex<Inbox>,
}

impl Mailbox {
    /// The mailbox of open flow `id`, filled with what the node already received for it; `None`
    /// if the flow is not open.
    pub(crate) fn open(node: &mut Node, now: Instant, id: FlowId) -> Option<Arc<Self>> {
        let mailbox = Arc::new(Self {
            id,
            peer_max_message: node.flow_peer_max_message(id)?,
            send_buffer: node.flow_limits().send_buffer,
            scheduled: AtomicBool::new(false),
            outbox: Mutex::default(),
            inbox: Mutex::default(),
        });
        mailbox.fill(node, now);
        Some(mailbox)
    }

    /// The sending half, without the node's lock: queues one message if it fits (see
    /// [`commit`](Self::commit) for a batch framed beforehand).
    pub(crate) fn stage(
        self: &Arc<Self>,
        cx: &Context<'_>,
        wakeup: &Wakeup,
        message: Bytes,
    ) -> Staged {
        let len = message.len();
        if len as u64 > self.peer_max_message {
            return Staged::TooLarge {
                size: len as u64,
                limit: self.peer_max_message,
            };
        }
        let mut out = lock(&self.outbox);
        if out.closed {
            return Staged::AskNode(message);
        }
        if out.has_room(len, self.send_buffer) {
            let was_empty = out.queue.is_empty();
            out.messages += 1;
            out.bytes += len as u64;
            out.queue.push_message(message);
            let room = out.room(self.send_buffer);
            drop(out);
            // The first message since the last hand-over asks the driver to come (the following
            // ones join it).
            if was_empty {
                wakeup.schedule(self);
            }
            return Staged::Queued { room };
        }
        out.wanted = Some(len);
        match &out.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => out.waker = Some(cx.waker().clone()),
        }
        drop(out);
        // A sender waiting for room asks the driver to make some.
        wakeup.schedule(self);
        Staged::Full(message)
    }

    /// The largest message the other side accepts.
    pub(crate) fn peer_max_message(&self) -> u64 {
        self.peer_max_message
    }

    /// The sending half, without the node's lock: appends `staged`, `messages` messages of
    /// `bytes` payload bytes that the sender framed outside any lock, in a few chunks, so the
    /// lock is held for a moment whatever the batch. The batch must fit the room the sender's
    /// previous call reported: the sender is the only one that adds, so that room has only grown
    /// since. Returns the room left; `Closed` leaves `staged` untouched.
    pub(crate) fn commit(
        self: &Arc<Self>,
        wakeup: &Wakeup,
        staged: &mut SendQueue,
        messages: u64,
        bytes: u64,
    ) -> Committed {
        let mut out = lock(&self.outbox);
        if out.closed {
            return Committed::Closed;
        }
        let was_empty = out.queue.is_empty();
        out.messages += messages;
        out.bytes += bytes;
        out.queue.append(staged);
        let room = out.room(self.send_buffer);
        drop(out);
        if was_empty {
            wakeup.schedule(self);
        }
        Committed::Queued { room }
    }

    /// The receiving half: the next message, taking everything the inbox holds into `received`.
    pub(crate) fn take(
        self: &Arc<Self>,
        cx: &Context<'_>,
        wakeup: &Wakeup,
        received: &mut RecvQueue,
    ) -> Taken {
        let mut inbox = lock(&self.inbox);
        if inbox.messages.is_empty() {
            if inbox.closed {
                return Taken::AskNode;
            }
            match &inbox.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inbox.waker = Some(cx.waker().clone()),
            }
            return Taken::Pending;
        }
        inbox.consumed += inbox.messages.bytes();
        inbox.messages.append_to(received);
        let node_waits = std::mem::take(&mut inbox.node_full);
        drop(inbox);
        if node_waits {
            // The node stopped reading: it needs the room back now.
            wakeup.schedule(self);
        }
        match received.pop_front() {
            Some(m) => Taken::Message(m),
            None => Taken::Pending,
        }
    }

    /// Under the node's lock: moves the outbox into the node and gives back the receive buffer
    /// the reader freed. Done before anything that goes through the node, so the order of
    /// messages is kept.
    pub(crate) fn hand_over(&self, node: &mut Node, now: Instant) {
        let mut waker = None;
        {
            let mut out = lock(&self.outbox);
            if !out.queue.is_empty() {
                let (messages, bytes) = (out.messages, out.bytes);
                out.messages = 0;
                out.bytes = 0;
                if node
                    .send_staged(self.id, &mut out.queue, messages, bytes)
                    .is_err()
                {
                    // The flow is not open for sending: what was queued is lost with it, and
                    // the next send asks the node why.
                    out.queue = SendQueue::default();
                    out.closed = true;
                    waker = out.take_waker();
                }
            }
            out.node_queued = node.flow_send_queued(self.id).unwrap_or(0);
        }
        wake(waker);
        let consumed = std::mem::take(&mut lock(&self.inbox).consumed);
        if consumed > 0 {
            node.release_received(now, self.id, consumed);
        }
    }

    /// After the node wrote to the streams: refreshes what it holds for this flow and wakes a
    /// sender waiting for that room. Returns whether a sender still waits.
    pub(crate) fn refresh_room(&self, node: &Node) -> bool {
        let mut out = lock(&self.outbox);
        let (waker, waits) = match node.flow_send_queued(self.id) {
            Some(queued) => {
                out.node_queued = queued;
                match out.wanted {
                    Some(len) if out.has_room(len, self.send_buffer) => (out.take_waker(), false),
                    Some(_) => (None, true),
                    None => (None, false),
                }
            }
            None => {
                // Ended: the sender learns why from the node.
                out.closed = true;
                (out.take_waker(), false)
            }
        };
        drop(out);
        wake(waker);
        waits
    }

    /// Under the node's lock, when the flow became readable: moves its received messages to the
    /// inbox and wakes the reader.
    pub(crate) fn fill(&self, node: &mut Node, now: Instant) {
        let mut inbox = lock(&self.inbox);
        if inbox.consumed > 0 {
            let consumed = std::mem::take(&mut inbox.consumed);
            node.release_received(now, self.id, consumed);
        }
        node.take_received(self.id, &mut inbox.messages);
        inbox.node_full = node.flow_recv_full(self.id);
        let waker = if inbox.messages.is_empty() {
            None
        } else {
            inbox.waker.take()
        };
        drop(inbox);
        wake(waker);
    }

    /// The other side finished: once the inbox is empty, the reader asks the node.
    pub(crate) fn close_inbox(&self) {
        let mut inbox = lock(&self.inbox);
        inbox.closed = true;
        let waker = inbox.waker.take();
        drop(inbox);
        wake(waker);
    }

    /// This side finished: further sends ask the node (which refuses them).
    pub(crate) fn close_outbox(&self) {
        let mut out = lock(&self.outbox);
        out.closed = true;
        let waker = out.take_waker();
        drop(out);
        wake(waker);
    }

    /// The flow ended or the fabric shut down: both halves ask the node from now on.
    pub(crate) fn close(&self) {
        self.close_outbox();
        self.close_inbox();
    }

    /// Adds what waits in the mailbox to the node's counters of the flow: queued messages count
    /// as received only once the reader took them.
    pub(crate) fn adjust_stats(&self, stats: &mut FlowStats) {
        let inbox = lock(&self.inbox);
        let waiting = inbox.messages.len();
        stats.recv_queued_messages += waiting;
        stats.messages_received -= (waiting as u64).min(stats.messages_received);
        stats.bytes_received -= (inbox.messages.bytes() as u64).min(stats.bytes_received);
    }
}
