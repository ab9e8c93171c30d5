//! The one task per node that owns the socket and drives the [`Node`](crate::node::Node).
//!
//! Each wake: read datagrams in batches (several buffers per system call, several datagrams per
//! buffer with GRO) and feed them to the node, locking it once per batch; then under one lock run
//! the timers, flush the queued API work and take the packets to send; then, with the node
//! unlocked, send them (several datagrams per system call with GSO). Both directions stop at
//! [`DRIVER_BUDGET`] datagrams and the driver wakes itself again, so a busy flow cannot starve the
//! timers of membership.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSliceMut;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use tracing::debug;

use super::datagram_outbox::Run;
use super::mailbox::{HandlesGone, Mailbox};
use super::{DRIVER_BUDGET, RecvMeta, Runtime, Shared};
use crate::flow::FlowId;
use crate::node::{Node, Transmit};

/// Datagrams per GSO send at most, whatever the socket allows: smaller batches keep the pacing
/// of a flow smooth. The transport also keeps one send within 65,000 bytes, the most one UDP
/// send can carry (44 packets of 1452 bytes, 7 of 8952).
const MAX_TRANSMIT_SEGMENTS: usize = 10;
/// Datagrams taken from the node per round before they are sent.
const OUTBOX_DATAGRAMS: usize = 64;
/// Receive buffers filled per system call.
const RECV_BUFFERS: usize = 8;
/// Bytes per receive buffer: the largest UDP payload, which is also the most GRO coalesces.
const RECV_BUFFER_SIZE: usize = 65_536;

/// Counters of the node's UDP socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Send system calls that succeeded.
    pub send_calls: u64,
    /// Datagrams those calls carried (more than `send_calls` with GSO).
    pub datagrams_sent: u64,
    /// Receive system calls that returned data.
    pub recv_calls: u64,
    /// Datagrams those calls returned (more than `recv_calls` with batching or GRO).
    pub datagrams_received: u64,
    /// Sends that failed (the datagrams are lost; QUIC retransmits).
    pub send_errors: u64,
    /// Receives that failed (for example an ICMP error reported on the socket).
    pub recv_errors: u64,
    /// Datagrams the socket can send per call (GSO segments; 1 without offload).
    pub max_transmit_segments: usize,
    /// Datagrams one receive buffer can hold (GRO segments; 1 without offload).
    pub max_receive_segments: usize,
}

/// The one task per node that owns the socket.
pub(crate) struct Driver<R: Runtime> {
    shared: Arc<Shared>,
    socket: R::Socket,
    sleep: Option<Pin<Box<R::Sleep>>>,
    sleep_at: Option<Instant>,
    /// Packets taken from the node and not yet sent, and how many datagrams they hold.
    outbox: VecDeque<Transmit>,
    outbox_datagrams: usize,
    recv_buf: Box<[u8]>,
    recv_meta: [RecvMeta; RECV_BUFFERS],
    stats: SocketStats,
    /// Mailboxes scheduled for this round.
    scheduled: Vec<Arc<Mailbox>>,
    /// Mailboxes whose sender waits for room in the node.
    blocked: Vec<Arc<Mailbox>>,
    /// Datagrams taken from the fabric's datagram outbox this round.
    datagrams: Vec<Run>,
    /// Scratch space for the flows whose handles are gone.
    gone: Vec<(FlowId, HandlesGone)>,
    /// When the metrics are published next.
    #[cfg(feature = "metrics")]
    next_metrics: Option<Instant>,
}

impl<R: Runtime> Driver<R> {
    pub(crate) fn new(shared: Arc<Shared>, socket: R::Socket) -> Self {
        Self {
            shared,
            sleep: None,
            sleep_at: None,
            outbox: VecDeque::new(),
            outbox_datagrams: 0,
            recv_buf: vec![0u8; RECV_BUFFERS * RECV_BUFFER_SIZE].into_boxed_slice(),
            recv_meta: [RecvMeta::default(); RECV_BUFFERS],
            scheduled: Vec::new(),
            blocked: Vec::new(),
            datagrams: Vec::new(),
            gone: Vec::new(),
            #[cfg(feature = "metrics")]
            next_metrics: None,
            stats: SocketStats {
                max_transmit_segments: R::max_transmit_segments(&socket),
                max_receive_segments: R::max_receive_segments(&socket),
                ..SocketStats::default()
            },
            socket,
        }
    }

    /// One receive system call: returns how many buffers it filled (their contents wait in
    /// `recv_buf`, described by `recv_meta`), 0 after an error, `None` if the socket is empty.
    fn receive(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        let mut bufs: [IoSliceMut<'_>; RECV_BUFFERS] = {
            let mut chunks = self.recv_buf.chunks_mut(RECV_BUFFER_SIZE);
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
        };
        match R::poll_recv(&self.socket, cx, &mut bufs, &mut self.recv_meta) {
            Poll::Ready(Ok(count)) => {
                self.stats.recv_calls += 1;
                Some(count.min(RECV_BUFFERS))
            }
            // An ICMP error reported on the socket, a truncated datagram: the datagram is lost
            // and QUIC or membership recovers.
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "UDP receive failed");
                self.stats.recv_errors += 1;
                Some(0)
            }
            Poll::Pending => None,
        }
    }

    /// Under the node's lock: hands the `filled` receive buffers to the node, runs due timers,
    /// flushes the work the API queued, and moves packets to the outbox. Returns how many
    /// datagrams were received and whether the node has more packets than the outbox took.
    fn process(&mut self, filled: usize) -> (usize, bool) {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        let now = R::now();
        let mut received = 0;
        for (meta, buf) in self
            .recv_meta
            .iter()
            .zip(self.recv_buf.chunks(RECV_BUFFER_SIZE))
            .take(filled)
        {
            // One copy (and one allocation) per receive buffer; its datagrams are split from
            // it and share it, and so do the messages they carry.
            let mut data = BytesMut::from(&buf[..meta.len.min(buf.len())]);
            let stride = if meta.stride == 0 {
                data.len().max(1)
            } else {
                meta.stride
            };
            while !data.is_empty() {
                let datagram = data.split_to(stride.min(data.len()));
                inner.node.handle_datagram(now, meta.source, datagram);
                received += 1;
            }
        }
        self.stats.datagrams_received += received as u64;

        if inner.node.poll_timeout().is_some_and(|t| t <= now) {
            inner.node.handle_timeout(now);
        }
        // GSO can be switched off by the socket after a failed send.
        self.stats.max_transmit_segments = R::max_transmit_segments(&self.socket);
        inner
            .node
            .set_max_transmit_segments(self.stats.max_transmit_segments.min(MAX_TRANSMIT_SEGMENTS));
        // What flow handles queued in their mailboxes joins the node before it writes.
        self.shared.wakeup.take_scheduled(&mut self.scheduled);
        for mailbox in &self.scheduled {
            mailbox.hand_over(&mut inner.node, now);
        }
        // And so do the datagrams senders queued outside the lock, and the flows whose handles
        // were dropped.
        inner.hand_over_datagrams(now, &mut self.datagrams);
        inner.hand_over_gone_flows(now, &mut self.gone);
        self.take_transmits(&mut inner.node, now);
        // After the transmits: building more packets may have driven connections that raised
        // events.
        inner.dispatch();
        // A graceful shutdown moves on as flows end; its deadline is a timer of its own.
        let drain_deadline = inner.advance_shutdown(now);
        if inner.node.has_pending_work() {
            // Leaving queued packets: build them now rather than at the next wake.
            self.take_transmits(&mut inner.node, now);
            inner.dispatch();
        }
        // The transmits freed room for datagrams: senders may queue that much again.
        inner.refresh_datagram_rooms();
        // The streams took what they could: senders waiting for room learn how much is left.
        for mailbox in self.scheduled.drain(..) {
            if !self.blocked.iter().any(|b| Arc::ptr_eq(b, &mailbox)) {
                self.blocked.push(mailbox);
            }
        }
        self.blocked
            .retain(|mailbox| mailbox.refresh_room(&inner.node));
        // Events may have read more from the streams (a reader made room), which is work for
        // another round.
        let more_in_node =
            self.outbox_datagrams >= OUTBOX_DATAGRAMS || inner.node.has_pending_work();
        inner.socket_stats.clone_from(&self.stats);
        #[cfg(feature = "metrics")]
        if self.next_metrics.is_none_or(|at| now >= at) {
            super::metrics::record(&inner);
            self.next_metrics = Some(now + super::metrics::METRICS_INTERVAL);
        }

        let wake_at = match (inner.node.poll_timeout(), drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wake_at {
            Some(deadline) if Some(deadline) != self.sleep_at => {
                self.sleep = Some(Box::pin(R::sleep_until(deadline)));
                self.sleep_at = Some(deadline);
            }
            Some(_) => {}
            None => {
                self.sleep = None;
                self.sleep_at = None;
            }
        }
        (received, more_in_node)
    }

    /// Moves the node's packets to the outbox, doing the work its inputs recorded, until the
    /// outbox holds [`OUTBOX_DATAGRAMS`] or the node has nothing more.
    fn take_transmits(&mut self, node: &mut Node, now: Instant) {
        while self.outbox_datagrams < OUTBOX_DATAGRAMS {
            let Some(t) = node.poll_transmit(now) else {
                break;
            };
            self.outbox_datagrams += t.segment_count();
            self.outbox.push_back(t);
        }
    }

    /// Sends the outbox until it is empty or the socket is full (the socket then wakes the
    /// driver); returns how many datagrams went out and whether the outbox is empty.
    fn send(&mut self, cx: &mut Context<'_>) -> (usize, bool) {
        let mut sent = 0;
        while let Some(transmit) = self.outbox.front() {
            let datagrams = transmit.segment_count();
            match R::poll_send(&self.socket, cx, transmit) {
                Poll::Ready(Ok(())) => {
                    self.stats.send_calls += 1;
                    self.stats.datagrams_sent += datagrams as u64;
                }
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, to = %transmit.destination, "UDP send failed");
                    self.stats.send_errors += 1;
                }
                Poll::Pending => return (sent, false),
            }
            sent += datagrams;
            self.outbox_datagrams -= datagrams;
            self.outbox.pop_front();
        }
        (sent, true)
    }
}

impl<R: Runtime> Future for Driver<R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Every field is Unpin (the timer is boxed), so the driver is Unpin.
        let this = Pin::into_inner(self);
        {
            let inner = this.shared.lock();
            if inner.driver_done(this.outbox.is_empty()) {
                return Poll::Ready(());
            }
            this.shared.wakeup.register_driver(cx.waker());
        }

        // Rounds of: one receive call, the node's work, the sends. Acknowledgements thus leave
        // after every received batch, not after the whole budget.
        let mut moved = 0;
        loop {
            let filled = this.receive(cx);
            let (received, more_in_node) = this.process(filled.unwrap_or(0));
            let (sent, outbox_empty) = this.send(cx);
            // Every round counts, even one that moved nothing (a receive error): the loop is
            // bounded whatever the socket does.
            moved += (received + sent).max(1);
            let socket_empty = filled.is_none();
            let more_to_send = outbox_empty && more_in_node;
            if socket_empty && !more_to_send {
                break;
            }
            if moved >= DRIVER_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
        }

        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                this.sleep = None;
                this.sleep_at = None;
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}
