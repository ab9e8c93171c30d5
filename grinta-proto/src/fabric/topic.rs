//! Topics: publish once, every subscriber in the cluster receives.
//!
//! A node with at least one subscription to topic `t` serves the group endpoint
//! `grinta.topic.t`, so subscriptions spread by gossip like group endpoints and vanish with their
//! node. A publishing node keeps one flow to each subscribing node per topic and sends each
//! message on it once, in publish order; the subscribing node hands it to every local
//! subscription. So a message crosses each link once per subscribing node, whatever the number
//! of subscribing tasks there.
//!
//! Those flows have no handle: the fabric reads and writes them itself, when the driver hands
//! it their events. A subscription is either lossy (the default: a bounded queue that drops the
//! oldest message and reports [`Error::Lagged`]) or reliable: while its queue is full the node
//! stops reading the topic's flows, QUIC flow control slows the publishers, and their
//! `publish` waits.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use futures_core::Stream;
use hashbrown::{HashMap, HashSet};

use super::{Error, Fabric, Runtime};
use crate::flow::{FlowError, FlowEvent, FlowId, Recv};
use crate::node::Node;
use crate::registry::{EndpointKind, RegistryError};

/// The prefix of the group endpoint through which a node receives a topic.
pub const TOPIC_ENDPOINT_PREFIX: &str = "grinta.topic.";

/// Messages a subscription holds for its reader. A lossy subscription drops the oldest beyond
/// it or [`SUBSCRIPTION_QUEUE_BYTES`] (and reports [`Error::Lagged`]); a reliable one stops its
/// node reading the topic.
pub const SUBSCRIPTION_QUEUE: usize = 1024;

/// Bytes of messages a subscription holds for its reader (see [`SUBSCRIPTION_QUEUE`]).
pub const SUBSCRIPTION_QUEUE_BYTES: usize = 4 << 20;

/// Bytes a publishing node holds for one subscribing node before `publish` waits (on top of
/// the flow's own send buffer).
pub const PUBLISH_BUFFER: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one subscription holds for its reader.
#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Bytes>,
    /// Bytes in `messages`.
    bytes: usize,
    /// Messages dropped since the reader last heard of it (lossy only).
    missed: u64,
    reliable: bool,
    waker: Option<Waker>,
    /// The fabric shut down.
    closed: bool,
}

impl Queue {
    fn is_full(&self) -> bool {
        self.messages.len() >= SUBSCRIPTION_QUEUE || self.bytes >= SUBSCRIPTION_QUEUE_BYTES
    }

    fn push(&mut self, message: Bytes) {
        self.bytes += message.len();
        self.messages.push_back(message);
    }

    fn pop(&mut self) -> Option<Bytes> {
        let message = self.messages.pop_front()?;
        self.bytes -= message.len();
        Some(message)
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Counters of one topic on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// Messages this node published.
    pub published: u64,
    /// Copies sent to subscribing nodes (one per node and message).
    pub sent: u64,
    /// Messages received from publishing nodes (once per message, whatever the number of local
    /// subscriptions).
    pub received: u64,
    /// Messages local lossy subscriptions dropped because their reader fell behind.
    pub dropped: u64,
    /// Copies this node could not hand to a subscribing node: no flow could be opened to it,
    /// the message was beyond its `max_message_size`, or its flow failed with them in flight
    /// (a subscribing node whose connection breaks while it stays a member may miss what was
    /// in flight; the next message opens a new flow).
    pub undelivered: u64,
}

/// A publishing node's flow to one subscribing node.
#[derive(Debug)]
struct Outbound {
    flow: FlowId,
    open: bool,
    /// Finish the flow once `pending` is written (the fabric is shutting down).
    finishing: bool,
    /// Messages waiting for the flow to open or to have room.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
}

/// The topics of one fabric: local subscriptions, flows in from publishers and out to
/// subscribers.
#[derive(Debug, Default)]
pub(super) struct Topics {
    subscriptions: HashMap<String, Vec<Weak<Mutex<Queue>>>>,
    /// Flows from publishing nodes: flow -> topic.
    inbound: HashMap<FlowId, String>,
    /// Inbound flows left unread while a reliable subscription is full.
    paused: HashSet<FlowId>,
    /// Flows to subscribing nodes: (topic, node) -> flow.
    outbound: HashMap<(String, String), Outbound>,
    by_flow: HashMap<FlowId, (String, String)>,
    /// Per topic: tasks waiting in `publish` for room.
    waiters: HashMap<String, Vec<Waker>>,
    stats: BTreeMap<String, TopicStats>,
}

impl Topics {
    /// Whether `event` is about one of the topics' flows (or a topic endpoint).
    pub(super) fn owns(&self, event: &FlowEvent) -> bool {
        match event {
            FlowEvent::Incoming { endpoint, .. } => endpoint.starts_with(TOPIC_ENDPOINT_PREFIX),
            FlowEvent::Opened { flow, .. }
            | FlowEvent::DialFailed { flow, .. }
            | FlowEvent::Readable { flow }
            | FlowEvent::Writable { flow }
            | FlowEvent::Finished { flow }
            | FlowEvent::Closed { flow, .. } => {
                self.inbound.contains_key(flow) || self.by_flow.contains_key(flow)
            }
        }
    }

    /// Handles an event of one of the topics' flows.
    pub(super) fn on_flow_event(&mut self, node: &mut Node, now: Instant, event: FlowEvent) {
        match event {
            FlowEvent::Incoming { endpoint, .. } => {
                let topic = endpoint[TOPIC_ENDPOINT_PREFIX.len()..].to_owned();
                while let Some(flow) = node.accept(now, &endpoint) {
                    if self.queues(&topic).is_empty() {
                        // Unsubscribed since: the publisher learns it from the reset.
                        node.drop_flow(flow);
                        continue;
                    }
                    self.inbound.insert(flow, topic.clone());
                    self.read(node, now, flow);
                }
            }
            FlowEvent::Readable { flow } if self.inbound.contains_key(&flow) => {
                self.read(node, now, flow)
            }
            FlowEvent::Opened { flow, .. } => {
                if let Some(key) = self.by_flow.get(&flow).cloned() {
                    if let Some(out) = self.outbound.get_mut(&key) {
                        out.open = true;
                    }
                    self.flush(node, &key);
                }
            }
            FlowEvent::Writable { flow } => {
                if let Some(key) = self.by_flow.get(&flow).cloned() {
                    self.flush(node, &key);
                }
            }
            FlowEvent::DialFailed { flow, .. } | FlowEvent::Closed { flow, .. } => {
                self.forget(node, flow)
            }
            FlowEvent::Finished { flow } => {
                // A publisher finished: what is left is read (the flow goes once read to its
                // end, perhaps after a paused reliable subscription made room).
                if self.inbound.contains_key(&flow) {
                    self.read(node, now, flow);
                } else {
                    self.forget(node, flow);
                }
            }
            FlowEvent::Readable { .. } => {}
        }
    }

    fn forget(&mut self, node: &mut Node, flow: FlowId) {
        if self.inbound.remove(&flow).is_some() {
            self.paused.remove(&flow);
            node.drop_flow(flow);
        }
        if let Some(key) = self.by_flow.remove(&flow) {
            if let Some(out) = self.outbound.remove(&key) {
                let lost = out.pending.len() as u64;
                self.stat(&key.0).undelivered += lost;
            }
            node.drop_flow(flow);
            self.wake_publishers(&key.0);
        }
    }

    /// Wakes the tasks waiting to publish on `topic`.
    fn wake_publishers(&mut self, topic: &str) {
        for w in self.waiters.remove(topic).unwrap_or_default() {
            w.wake();
        }
    }

    /// The live subscriptions of `topic`.
    fn queues(&mut self, topic: &str) -> Vec<Arc<Mutex<Queue>>> {
        let Some(subs) = self.subscriptions.get_mut(topic) else {
            return Vec::new();
        };
        subs.retain(|w| w.strong_count() > 0);
        subs.iter().filter_map(Weak::upgrade).collect()
    }

    /// Whether a reliable subscription of `topic` has no room.
    fn blocked(queues: &[Arc<Mutex<Queue>>]) -> bool {
        queues.iter().any(|q| {
            let q = lock(q);
            q.reliable && q.is_full()
        })
    }

    /// Hands `message` to every local subscription of `topic`.
    fn deliver(&mut self, topic: &str, queues: &[Arc<Mutex<Queue>>], message: &Bytes) {
        let mut dropped = 0;
        for q in queues {
            let mut q = lock(q);
            // Only lossy queues are full here: reliable ones stop the reading first.
            while q.is_full() && q.pop().is_some() {
                q.missed += 1;
                dropped += 1;
            }
            q.push(message.clone());
            q.wake();
        }
        self.stat(topic).dropped += dropped;
    }

    /// Reads inbound `flow` into its topic's subscriptions, until it has nothing more or a
    /// reliable subscription is full (then it waits in `paused`).
    fn read(&mut self, node: &mut Node, now: Instant, flow: FlowId) {
        let Some(topic) = self.inbound.get(&flow).cloned() else {
            return;
        };
        let queues = self.queues(&topic);
        loop {
            if Self::blocked(&queues) {
                self.paused.insert(flow);
                return;
            }
            match node.recv(now, flow) {
                Ok(Recv::Message(message)) => {
                    self.stat(&topic).received += 1;
                    self.deliver(&topic, &queues, &message);
                }
                Ok(Recv::Pending) => {
                    self.paused.remove(&flow);
                    return;
                }
                Ok(Recv::Finished) | Err(_) => {
                    self.forget(node, flow);
                    return;
                }
            }
        }
    }

    /// A reliable subscription made room: read the flows left waiting.
    pub(super) fn resume(&mut self, node: &mut Node, now: Instant) {
        for flow in self.paused.iter().copied().collect::<Vec<_>>() {
            self.read(node, now, flow);
        }
        // Local publishers may wait for the same room.
        for (_, waiters) in self.waiters.drain() {
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    /// Writes what waits for `key`'s flow, while it has room.
    fn flush(&mut self, node: &mut Node, key: &(String, String)) {
        let Some(out) = self.outbound.get_mut(key) else {
            return;
        };
        if !out.open {
            return;
        }
        let mut too_large = 0;
        while let Some(message) = out.pending.front().cloned() {
            let result = node.send(out.flow, message);
            match result {
                Ok(()) | Err(FlowError::MessageTooLarge { .. }) => {
                    if let Some(m) = out.pending.pop_front() {
                        out.pending_bytes -= m.len();
                    }
                    // Beyond what this subscriber takes: that copy only is lost.
                    too_large += u64::from(result.is_err());
                }
                Err(FlowError::WouldBlock) => break,
                Err(_) => {
                    let flow = out.flow;
                    self.forget(node, flow);
                    return;
                }
            }
        }
        if out.finishing && out.pending.is_empty() {
            let _ = node.finish(out.flow);
        }
        let room = out.pending_bytes < PUBLISH_BUFFER;
        self.stat(&key.0).undelivered += too_large;
        if room {
            self.wake_publishers(&key.0);
        }
    }

    /// The fabric starts a graceful shutdown: flows to subscribers finish once what waits is
    /// written, flows from publishers are reset (their publishers see this node go), so that
    /// no topic flow holds the drain.
    pub(super) fn drain(&mut self, node: &mut Node) {
        for flow in self.inbound.keys().copied().collect::<Vec<_>>() {
            self.forget(node, flow);
        }
        let keys: Vec<(String, String)> = self.outbound.keys().cloned().collect();
        for key in keys {
            if let Some(out) = self.outbound.get_mut(&key) {
                out.finishing = true;
            }
            self.flush(node, &key);
        }
    }

    /// Publishes `message` on `topic` if every subscriber has room; `Ok(false)` (and the task
    /// registered to be woken) if one has not.
    fn try_publish(
        &mut self,
        node: &mut Node,
        now: Instant,
        (topic, endpoint): (&str, &str),
        message: &Bytes,
        cx: &Context<'_>,
    ) -> Result<bool, FlowError> {
        let local = node.name().to_owned();
        let owners: Vec<String> = node
            .live_owners(endpoint)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let queues = if owners.contains(&local) {
            self.queues(topic)
        } else {
            Vec::new()
        };
        let full = Self::blocked(&queues)
            || owners.iter().any(|o| {
                self.outbound
                    .get(&(topic.to_owned(), o.clone()))
                    .is_some_and(|out| out.pending_bytes >= PUBLISH_BUFFER)
            });
        if full {
            let waiters = self.waiters.entry_ref(topic).or_default();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            return Ok(false);
        }
        self.deliver(topic, &queues, message);
        let mut sent = 0;
        for owner in owners.iter().filter(|o| **o != local) {
            let key = (topic.to_owned(), owner.clone());
            if !self.outbound.contains_key(&key) {
                // A node not heard from yet: a flow of its own, opened now.
                let Ok(flow) = node.dial_node(now, endpoint, owner) else {
                    self.stat(topic).undelivered += 1;
                    continue;
                };
                self.by_flow.insert(flow, key.clone());
                self.outbound.insert(
                    key.clone(),
                    Outbound {
                        flow,
                        open: false,
                        finishing: false,
                        pending: VecDeque::new(),
                        pending_bytes: 0,
                    },
                );
            }
            if let Some(out) = self.outbound.get_mut(&key) {
                out.pending.push_back(message.clone());
                out.pending_bytes += message.len();
                sent += 1;
            }
            self.flush(node, &key);
        }
        let stats = self.stat(topic);
        stats.published += 1;
        stats.sent += sent;
        Ok(true)
    }

    /// Adds a subscription of `topic`; returns whether it is the node's first (then the node
    /// must serve the topic's endpoint).
    fn subscribe(&mut self, topic: &str, queue: &Arc<Mutex<Queue>>) -> bool {
        let first = self.queues(topic).is_empty();
        self.subscriptions
            .entry_ref(topic)
            .or_default()
            .push(Arc::downgrade(queue));
        first
    }

    /// Takes back a subscription that could not be made.
    fn remove(&mut self, topic: &str, queue: &Arc<Mutex<Queue>>) {
        if let Some(subs) = self.subscriptions.get_mut(topic) {
            let gone = Arc::downgrade(queue);
            subs.retain(|w| !w.ptr_eq(&gone));
        }
    }

    /// A subscription of `topic` went: returns whether it was the node's last (then the node
    /// withdraws the endpoint and drops the topic's inbound flows).
    fn unsubscribe(&mut self, node: &mut Node, topic: &str) -> bool {
        if !self.queues(topic).is_empty() {
            return false;
        }
        self.subscriptions.remove(topic);
        let flows: Vec<FlowId> = self
            .inbound
            .iter()
            .filter(|(_, t)| *t == topic)
            .map(|(f, _)| *f)
            .collect();
        for flow in flows {
            self.forget(node, flow);
        }
        true
    }

    /// The fabric is down: every subscription ends, every publisher wakes.
    pub(super) fn close(&mut self) {
        for subs in self.subscriptions.values() {
            for q in subs.iter().filter_map(Weak::upgrade) {
                let mut q = lock(&q);
                q.closed = true;
                q.wake();
            }
        }
        for (_, waiters) in self.waiters.drain() {
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    /// Counters per topic.
    pub(super) fn stats(&self) -> BTreeMap<String, TopicStats> {
        self.stats.clone()
    }

    /// The counters of `topic` (bounded like every per-name counter: see
    /// [`MAX_NAMES_COUNTED`](super::MAX_NAMES_COUNTED)).
    fn stat(&mut self, topic: &str) -> &mut TopicStats {
        super::counted(&mut self.stats, topic)
    }
}

/// A subscription to a topic: a [`Stream`] of the messages published on it after this node's
/// subscription reached the publisher. Made by [`Fabric::subscribe`] (lossy) or
/// [`Fabric::subscribe_reliable`].
///
/// A lossy subscription yields `Err(Error::Lagged { missed })` when its reader fell more than
/// [`SUBSCRIPTION_QUEUE`] messages (or [`SUBSCRIPTION_QUEUE_BYTES`]) behind and that many were
/// dropped (the oldest first), then
/// goes on with the oldest kept. A reliable one never drops: its node stops reading the topic
/// while it is full, and the publishers' `publish` waits. The stream ends when the fabric shuts
/// down. Dropping it unsubscribes (the node withdraws from the topic with its last
/// subscription). It holds a handle on the fabric: the node runs while it exists.
pub struct Subscription<R: Runtime> {
    fabric: Fabric<R>,
    topic: String,
    queue: Arc<Mutex<Queue>>,
}

impl<R: Runtime> std::fmt::Debug for Subscription<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("reliable", &lock(&self.queue).reliable)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Subscription<R> {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl<R: Runtime> Stream for Subscription<R> {
    type Item = Result<Bytes, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let (item, made_room) = {
            let mut q = lock(&this.queue);
            if q.missed > 0 {
                let missed = std::mem::take(&mut q.missed);
                return Poll::Ready(Some(Err(Error::Lagged { missed })));
            }
            let was_full = q.reliable && q.is_full();
            match q.pop() {
                Some(message) => (Some(message), was_full),
                None if q.closed => return Poll::Ready(None),
                None => {
                    q.waker = Some(cx.waker().clone());
                    (None, false)
                }
            }
        };
        if made_room {
            // The node left the topic's flows unread: read them now.
            this.fabric
                .with(|inner, now| inner.topics.resume(&mut inner.node, now));
        }
        match item {
            Some(message) => Poll::Ready(Some(Ok(message))),
            None => Poll::Pending,
        }
    }
}

impl<R: Runtime> Drop for Subscription<R> {
    fn drop(&mut self) {
        let topic = self.topic.clone();
        let queue = std::mem::take(&mut self.queue);
        self.fabric.with(move |inner, now| {
            // Under the fabric's lock: a subscribe of the same topic meanwhile sees this one
            // either alive or gone with its endpoint.
            drop(queue);
            if inner.topics.unsubscribe(&mut inner.node, &topic) {
                if let Ok(endpoint) = super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, &topic) {
                    let _ = inner.node.unregister_endpoint(now, &endpoint);
                }
            }
            // A reliable subscription gone may unblock the others' reading.
            inner.topics.resume(&mut inner.node, now);
        });
    }
}

impl<R: Runtime> Fabric<R> {
    /// Subscribes to `topic` (lossy: see [`Subscription`]): every message published on it
    /// anywhere in the cluster after this subscription reached the publisher, in each
    /// publisher's order.
    ///
    /// Use a lossy subscription when the latest messages matter more than every message
    /// (prices, positions, metrics): a slow reader never slows the publishers, and learns how
    /// many messages it missed. Use [`subscribe_reliable`](Self::subscribe_reliable) when
    /// every message matters (commands, events to apply in order) and the publishers may wait
    /// for the slowest reliable subscriber.
    ///
    /// Errors: [`Error::Registry`] for an invalid topic (1..=115 bytes of `[A-Za-z0-9._-]`);
    /// [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use futures::StreamExt;
    /// use grinta_proto::fabric::Error;
    ///
    /// let mut prices = fabric.subscribe("prices")?;
    /// while let Some(message) = prices.next().await {
    ///     match message {
    ///         Ok(price) => println!("{price:?}"),
    ///         Err(Error::Lagged { missed }) => println!("missed {missed} prices"),
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn subscribe(&self, topic: &str) -> Result<Subscription<R>, Error> {
        self.subscribe_with(topic, false)
    }

    /// The nodes subscribed to `topic` as this node knows them (this node included), sorted:
    /// those a [`publish`](Self::publish) now reaches. Empty for an invalid topic.
    pub fn subscribers(&self, topic: &str) -> Vec<String> {
        let Ok(endpoint) = super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, topic) else {
            return Vec::new();
        };
        self.shared
            .lock()
            .node
            .live_owners(&endpoint)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Subscribes to `topic`, reliably: no message is ever dropped for this subscription;
    /// while it holds [`SUBSCRIPTION_QUEUE`] unread messages (or [`SUBSCRIPTION_QUEUE_BYTES`]), this node stops reading the topic
    /// and every publisher's [`publish`](Self::publish) waits. See [`subscribe`](Self::subscribe).
    pub fn subscribe_reliable(&self, topic: &str) -> Result<Subscription<R>, Error> {
        self.subscribe_with(topic, true)
    }

    fn subscribe_with(&self, topic: &str, reliable: bool) -> Result<Subscription<R>, Error> {
        let endpoint = super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, topic)?;
        let queue = Arc::new(Mutex::new(Queue {
            reliable,
            ..Queue::default()
        }));
        self.with(|inner, now| {
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            if inner.topics.subscribe(topic, &queue) {
                match inner
                    .node
                    .register_endpoint(now, &endpoint, EndpointKind::Group)
                {
                    Ok(()) | Err(RegistryError::AlreadyRegistered { .. }) => {}
                    Err(e) => {
                        inner.topics.remove(topic, &queue);
                        inner.topics.unsubscribe(&mut inner.node, topic);
                        return Err(e.into());
                    }
                }
            }
            Ok(())
        })?;
        Ok(Subscription {
            fabric: self.clone(),
            topic: topic.to_owned(),
            queue,
        })
    }

    /// Publishes `message` on `topic`: every subscription known to this node receives it, each
    /// subscribing node once (this node's own subscriptions in-process), in this node's
    /// publish order. It waits only while a reliable subscriber has no room (see
    /// [`subscribe_reliable`](Self::subscribe_reliable)) or a subscribing node has
    /// [`PUBLISH_BUFFER`] of this node's messages still to take. No subscriber is not an error.
    ///
    /// Errors: [`Error::Registry`] for an invalid topic; `FlowError::MessageTooLarge` beyond the
    /// flows' `max_message_size`; [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// fabric.publish("prices", "EURUSD 1.0842").await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Cancel safety: dropping the future before it completes publishes nothing.
    pub async fn publish(&self, topic: &str, message: impl Into<Bytes>) -> Result<(), Error> {
        let endpoint = super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, topic)?;
        let message = message.into();
        let limit = self.shared.flow_limits.max_message_size;
        if message.len() > limit {
            return Err(Error::Flow(FlowError::MessageTooLarge {
                size: message.len() as u64,
                limit: limit as u64,
            }));
        }
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if !inner.accepting() {
                return Poll::Ready(Err(Error::Shutdown));
            }
            // The driver is woken only when this message gives it work it did not have yet: a
            // burst of publishes costs one wake, not one per message.
            let had_work = inner.node.has_pending_work();
            let now = inner.now();
            let inner = &mut *inner;
            let published =
                inner
                    .topics
                    .try_publish(&mut inner.node, now, (topic, &endpoint), &message, cx);
            inner.dispatch();
            if !had_work {
                inner.wake_driver();
            }
            match published {
                Ok(true) => Poll::Ready(Ok(())),
                Ok(false) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e.into())),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked() {
        assert_eq!(
            super::super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, "news").expect("valid"),
            "grinta.topic.news"
        );
        assert!(super::super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, "").is_err());
        assert!(super::super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, "a b").is_err());
        assert!(super::super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, &"t".repeat(115)).is_ok());
        assert!(super::super::topic_endpoint(TOPIC_ENDPOINT_PREFIX, &"t".repeat(116)).is_err());
    }
}
