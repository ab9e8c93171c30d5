//! The user API, written once for every runtime: [`Fabric`], [`Endpoint`], [`Flow`].
//!
//! This module holds no runtime: it uses `std::task` only. An adapter (`grinta-tokio`,
//! `grinta-async-std`) implements [`Runtime`] (a UDP socket, a timer, a clock and a way to spawn)
//! and calls [`FabricBuilder::start`]. One driver task per node owns the socket; it feeds received
//! datagrams and timeouts to the [`Node`], sends what it produces, and wakes the tasks waiting on
//! flows and endpoints. API calls lock the node, act, and wake the driver, except the data path
//! of an open remote flow: its messages pass through a mailbox of the flow's own, which the driver
//! empties and fills once per round, so sending and receiving never wait on the node's lock. Work
//! per driver wake is bounded ([`DRIVER_BUDGET`] datagrams received and sent) so one busy flow
//! cannot starve membership. The socket is batched: several datagrams per send (GSO) and per receive (GRO,
//! `recvmmsg`) where the adapter's socket allows it.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use tracing::debug;

use crate::codec::CodecError;
use crate::flow::{FlowError, FlowEvent, FlowId, RejectReason, ResetCode};
use crate::membership::{Member, MemberState};
use crate::node::{Event, Node, NodeConfig, NodeError};
use crate::registry::{EndpointKind, RegistryError, RegistryEvent};
use crate::tags::{TagError, TagFilter, Tags};

mod builder;
mod datagram_outbox;
mod driver;
mod handles;
mod kv;
mod local;
mod mailbox;
#[cfg(feature = "metrics")]
mod metrics;
mod query;
mod request;
mod topic;
mod watch;

pub use crate::node::DownReason;
pub use builder::{FabricBuilder, Profile};
pub use datagram_outbox::DATAGRAM_OUTBOX;
pub use driver::SocketStats;
pub use handles::{
    Flow, FlowReceiver, FlowSender, Messages, MessagesIntoIter, TypedFlow, TypedReceiver,
    TypedSender,
};
pub use kv::{Kv, KvEntry, KvEvent, KvWatch, MAX_KEY_LEN, MAX_VALUE_LEN};
#[cfg(feature = "metrics")]
pub use metrics::METRICS_INTERVAL;
pub use query::{QUERY_ENDPOINT_PREFIX, Query, QueryHandler, QueryOptions, QueryResponses};
pub use request::{MAX_REQUESTS_READING, Request, Requests};
pub use topic::{
    PUBLISH_BUFFER, SUBSCRIPTION_QUEUE, SUBSCRIPTION_QUEUE_BYTES, Subscription,
    TOPIC_ENDPOINT_PREFIX, TopicStats,
};
pub use watch::{EndpointMonitor, MemberWatch, NameEvent, NameWatch, NodeMonitor};

use datagram_outbox::DatagramOutbox;
use driver::Driver;
use handles::Route;
use local::{Closed, LocalEnd, LocalFlow};
use mailbox::{Mailbox, Wakeup};

/// Datagrams the driver receives and sends, together, per wake before it yields (and wakes itself
/// again).
pub const DRIVER_BUDGET: usize = 256;

/// What one receive buffer holds after [`Runtime::poll_recv`]: `len` bytes from `source`, one
/// datagram or, with receive offload (GRO), several of `stride` bytes each (the last possibly
/// shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Where the datagrams came from.
    pub source: SocketAddr,
    /// Bytes written into the buffer.
    pub len: usize,
    /// The size of each datagram in the buffer (equal to `len` for a single datagram).
    pub stride: usize,
}

impl Default for RecvMeta {
    fn default() -> Self {
        Self {
            source: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            stride: 0,
        }
    }
}

/// Where the driver answers a remote dial, under a lock of its own: the dialling task learns the
/// answer, and gets the open flow's mailbox, without taking the node's lock a second time.
#[derive(Default)]
struct DialSlot {
    state: Mutex<DialState>,
}

#[derive(Default)]
struct DialState {
    answer: Option<DialAnswer>,
    waker: Option<Waker>,
}

/// The owner's answer to a remote dial, as the driver saw it.
enum DialAnswer {
    /// Accepted: the flow's mailbox (made under the driver's lock, so what arrived with the
    /// answer is in it) and the peer's name.
    Open {
        mailbox: Option<Arc<Mailbox>>,
        peer: String,
    },
    Failed(FlowError),
    Shutdown,
}

impl DialSlot {
    fn lock(&self) -> MutexGuard<'_, DialState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the answer and wakes the dialling task.
    fn answer(&self, answer: DialAnswer) {
        let waker = {
            let mut state = self.lock();
            state.answer = Some(answer);
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The answer, if there is one; otherwise the task is woken when it comes.
    fn poll(&self, cx: &Context<'_>) -> Poll<DialAnswer> {
        let mut state = self.lock();
        if let Some(answer) = state.answer.take() {
            return Poll::Ready(answer);
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Abandons a remote dial whose future was dropped before it took the owner's answer: the flow is
/// reset (the owner, if it already accepted, sees it end), and its dial entry and mailbox go.
/// Like a dropped flow handle, it does not wait for the node's lock.
struct DialGuard<'a, R: Runtime> {
    fabric: &'a Fabric<R>,
    flow: FlowId,
    slot: Arc<DialSlot>,
    answered: bool,
}

impl<R: Runtime> Drop for DialGuard<'_, R> {
    fn drop(&mut self) {
        if !self.answered {
            self.fabric
                .shared
                .wakeup
                .handles_gone(self.flow, mailbox::HandlesGone::Open);
        }
    }
}

/// Counters of a fabric: its node and its socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FabricStats {
    /// Membership and transport counters.
    pub node: crate::node::NodeStats,
    /// UDP socket counters (system calls, datagrams, errors, offload sizes).
    pub socket: SocketStats,
    /// Remote flows open on the node (dialling, waiting for `accept`, or open), whether or not
    /// a handle holds them.
    pub open_flows: usize,
    /// Remote dials waiting for their answer.
    pub pending_dials: usize,
    /// Per endpoint name dialled or served through this fabric (at most
    /// [`MAX_NAMES_COUNTED`] names; the others are counted under [`OTHER_NAMES`]).
    pub endpoints: BTreeMap<String, EndpointStats>,
    /// Per query topic asked or handled through this fabric (bounded like `endpoints`).
    pub queries: BTreeMap<String, QueryStats>,
    /// Per pub/sub topic published or subscribed to on this node.
    pub topics: BTreeMap<String, TopicStats>,
}

/// Most endpoint names (and, apart, query topics) a fabric keeps counters for; names beyond
/// them are counted together under [`OTHER_NAMES`], so the counters (and the labels of
/// metrics) stay bounded whatever names an application uses.
pub const MAX_NAMES_COUNTED: usize = 1024;

/// The key that counts the names beyond [`MAX_NAMES_COUNTED`].
pub const OTHER_NAMES: &str = "_other";

/// Counters of one endpoint name, as used through one fabric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// Flows this node's endpoint of that name accepted (in-process ones included).
    pub flows_accepted: u64,
    /// Dials of that name from this node that opened a flow.
    pub dials_opened: u64,
    /// Dials of that name from this node that failed (no owner, refused, timed out...).
    pub dials_failed: u64,
}

/// Counters of one query topic, as used through one fabric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueryStats {
    /// Queries this node made.
    pub queries: u64,
    /// Nodes those queries asked.
    pub nodes_asked: u64,
    /// Replies they received.
    pub replies: u64,
    /// Nodes that did not answer them (failed, dropped the question, timed out).
    pub unanswered: u64,
    /// Questions this node's handler received.
    pub questions_handled: u64,
}

/// Counters kept per name, bounded by [`MAX_NAMES_COUNTED`].
fn counted<'a, T: Default>(map: &'a mut BTreeMap<String, T>, name: &str) -> &'a mut T {
    let key = if map.contains_key(name) || map.len() < MAX_NAMES_COUNTED {
        name
    } else {
        OTHER_NAMES
    };
    // A name already counted is found without copying it.
    if !map.contains_key(key) {
        map.insert(key.to_owned(), T::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// What an adapter provides: a UDP socket, a timer, a clock and a spawner.
///
/// The socket side is batched: one [`poll_send`](Self::poll_send) may carry several datagrams to
/// one destination (GSO) and one [`poll_recv`](Self::poll_recv) may fill several buffers, each
/// holding several datagrams (`recvmmsg`, GRO). An adapter without offload reports 1 segment and
/// fills one buffer per call; the driver adapts.
pub trait Runtime: Send + Sync + 'static {
    /// The UDP socket type.
    type Socket: Send + Sync + Unpin + 'static;
    /// A timer future.
    type Sleep: Future<Output = ()> + Send + 'static;

    /// Binds a UDP socket (non-blocking, registered with the runtime's reactor).
    fn bind(addr: SocketAddr) -> io::Result<Self::Socket>;
    /// The socket's local address.
    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr>;
    /// How many datagrams one [`Transmit`](crate::node::Transmit) given to
    /// [`poll_send`](Self::poll_send) may hold (1 without GSO).
    fn max_transmit_segments(socket: &Self::Socket) -> usize;
    /// How many datagrams one receive buffer may hold (1 without GRO).
    fn max_receive_segments(socket: &Self::Socket) -> usize;
    /// Whether the IP layer may fragment what the socket sends (then QUIC path MTU discovery,
    /// which relies on oversized probes being dropped, is turned off).
    fn may_fragment(socket: &Self::Socket) -> bool;
    /// Receives into `bufs`, filling `meta` for each buffer used; returns how many were used.
    fn poll_recv(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>>;
    /// Sends a transmit: one datagram, or several of `segment_size` bytes. Errors other than
    /// "would block" are the datagram's loss, which QUIC recovers from; the driver counts them.
    fn poll_send(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        transmit: &crate::node::Transmit,
    ) -> Poll<io::Result<()>>;
    /// A timer that completes at `deadline`.
    fn sleep_until(deadline: Instant) -> Self::Sleep;
    /// Runs `future` in the background (a node's driver); fails if the runtime cannot (for
    /// example no thread can be started).
    fn spawn(future: Pin<Box<dyn Future<Output = ()> + Send>>) -> io::Result<()>;
    /// The current time (the clock reads of grinta happen here, in the adapter).
    fn now() -> Instant;
    /// The wall clock: time since the UNIX epoch. Read once, when a node starts, for the
    /// incarnation it starts at (above any of a previous life under the same name).
    fn unix_time() -> std::time::Duration;
}

/// Errors of the user API.
///
/// Each method's documentation says which variants it returns. The helpers spare a match two
/// levels deep:
///
/// ```no_run
/// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
/// use grinta_proto::flow::RejectReason;
///
/// match fabric.dial("billing").await {
///     Ok(flow) => { /* ... */ }
///     Err(e) if e.reject_reason() == Some(RejectReason::BacklogFull) => { /* retry later */ }
///     Err(e) if e.is_no_such_endpoint() || e.is_timeout() => { /* nobody serves it now */ }
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node could not start (configuration, TLS material).
    #[error(transparent)]
    Start(#[from] NodeError),
    /// The node's driver could not be started (the runtime refused, e.g. no thread available).
    #[error("cannot start the node's driver: {0}")]
    Spawn(#[source] io::Error),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// A directory operation failed (invalid name, name taken, limit).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A flow operation failed. (This node shutting down is always [`Error::Shutdown`], never
    /// `Flow(FlowError::ShuttingDown)`.)
    #[error(transparent)]
    Flow(FlowError),
    /// The endpoint lost its name to another node.
    #[error("endpoint {name:?} lost its name to node {winner:?}")]
    NameConflict {
        /// The endpoint.
        name: String,
        /// The node that keeps the name.
        winner: String,
    },
    /// The fabric was shut down (or is shutting down: it accepts no new flows or endpoints).
    #[error("the fabric is shut down")]
    Shutdown,
    /// This subscriber fell behind: `missed` member events were dropped before it read them
    /// (the fabric keeps the last [`MEMBER_EVENT_CAPACITY`]). The next call returns the oldest
    /// event still kept.
    #[error("missed {missed} member events: the reader fell behind")]
    Lagged {
        /// How many events this subscriber will never see.
        missed: u64,
    },
    /// A typed flow received a message that is not a value of its type (or could not encode one).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A tag cannot be set (see [`crate::tags`] for the limits).
    #[error(transparent)]
    Tag(#[from] TagError),
}

impl From<FlowError> for Error {
    fn from(e: FlowError) -> Self {
        match e {
            // One way to hear of a shutdown, whichever layer noticed it first.
            FlowError::ShuttingDown => Self::Shutdown,
            e => Self::Flow(e),
        }
    }
}

impl Error {
    /// The flow error, if this is one.
    pub fn flow_error(&self) -> Option<&FlowError> {
        match self {
            Self::Flow(e) => Some(e),
            _ => None,
        }
    }

    /// The directory error, if this is one (invalid name, name taken, limit).
    pub fn registry_error(&self) -> Option<&RegistryError> {
        match self {
            Self::Registry(e) => Some(e),
            _ => None,
        }
    }

    /// The TLS error, if the node could not start because of its TLS material.
    pub fn tls_error(&self) -> Option<&crate::tls::TlsError> {
        match self {
            Self::Start(NodeError::Tls(e)) => Some(e),
            _ => None,
        }
    }

    /// The code the flow was reset with (by either side), if it was reset.
    pub fn reset_code(&self) -> Option<crate::flow::ResetCode> {
        self.flow_error().and_then(FlowError::reset_code)
    }

    /// The application's code, if the other side reset the flow with `reset(code)`.
    pub fn application_code(&self) -> Option<u32> {
        self.flow_error().and_then(FlowError::application_code)
    }

    /// Why the owner refused the dial, if it did.
    pub fn reject_reason(&self) -> Option<crate::flow::RejectReason> {
        self.flow_error().and_then(FlowError::reject_reason)
    }

    /// Whether the owner refused the dial.
    pub fn is_refused(&self) -> bool {
        self.reject_reason().is_some()
    }

    /// Whether no live node serves the endpoint dialled.
    pub fn is_no_such_endpoint(&self) -> bool {
        matches!(self, Self::Flow(FlowError::NoSuchEndpoint { .. }))
    }

    /// Whether the dial (or the request) timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::Flow(FlowError::DialTimeout { .. } | FlowError::RequestTimeout { .. })
        )
    }

    /// Whether the other node failed or left, or the connection to it was lost.
    pub fn is_peer_failure(&self) -> bool {
        self.flow_error().is_some_and(FlowError::is_peer_failure)
    }

    /// Whether this fabric is shut down or shutting down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Self::Shutdown)
    }
}

/// Member events a fabric keeps for its readers; a reader further behind gets
/// [`Error::Lagged`].
pub const MEMBER_EVENT_CAPACITY: usize = 1024;

/// The last `capacity` events of a stream, read by any number of readers, each with its own
/// cursor (the sequence number of the next event it wants): every reader sees every event, or
/// learns how many it missed.
struct EventLog<T> {
    events: VecDeque<T>,
    /// The sequence number of `events[0]`.
    first: u64,
    capacity: usize,
}

impl<T: Clone> EventLog<T> {
    fn new(capacity: usize) -> Self {
        Self {
            events: VecDeque::new(),
            first: 0,
            capacity: capacity.max(1),
        }
    }

    fn push(&mut self, event: T) {
        if self.events.len() >= self.capacity {
            self.events.pop_front();
            self.first += 1;
        }
        self.events.push_back(event);
    }

    /// The cursor of the next event to come.
    fn end(&self) -> u64 {
        self.first + self.events.len() as u64
    }

    /// The event at `cursor`, moving it on; `Err(missed)` (and the cursor moved to the oldest
    /// event kept) if the reader fell behind; `Ok(None)` if it has read everything.
    fn read(&self, cursor: &mut u64) -> Result<Option<T>, u64> {
        if *cursor < self.first {
            let missed = self.first - *cursor;
            *cursor = self.first;
            return Err(missed);
        }
        let index = usize::try_from(*cursor - self.first).unwrap_or(usize::MAX);
        let event = self.events.get(index).cloned();
        if event.is_some() {
            *cursor += 1;
        }
        Ok(event)
    }
}

#[derive(Default)]
struct Waiters {
    /// Per flow: tasks waiting to read or write, and dials waiting for an answer.
    flows: HashMap<FlowId, Vec<Waker>>,
    /// Per endpoint: tasks waiting in `accept`.
    endpoints: HashMap<String, Vec<Waker>>,
    /// Per endpoint: tasks waiting in `recv_datagram`.
    datagrams: HashMap<String, Vec<Waker>>,
    /// Tasks waiting for a member event.
    members: Vec<Waker>,
    /// Tasks waiting for a name to become resolvable (`wait_for`), name watches and endpoint
    /// monitors: woken by every directory or membership change.
    names: Vec<Waker>,
}

pub(crate) struct Inner {
    pub(crate) node: Node,
    waiters: Waiters,
    /// Remote dials waiting for the owner's answer.
    dials: HashMap<FlowId, Arc<DialSlot>>,
    conflicts: HashMap<String, String>,
    /// The last member events; each `Fabric` handle reads them with its own cursor.
    member_events: EventLog<crate::membership::Event>,
    /// Counts the changes of the directory or of membership: watches rebuild their view when it
    /// moved.
    directory_changes: u64,
    /// The registry's generation as of the last `directory_changes` bump.
    registry_generation: u64,
    /// In-process flows dialled to local endpoints, waiting for `accept`.
    local_backlogs: HashMap<String, VecDeque<LocalEnd>>,
    /// Every in-process flow, to close them at shutdown (pruned as they end).
    local_flows: Vec<Weak<LocalFlow>>,
    /// The mailbox of every remote flow that has a handle.
    mailboxes: HashMap<FlowId, Arc<Mailbox>>,
    wakeup: Arc<Wakeup>,
    datagram_outbox: Arc<DatagramOutbox>,
    /// The driver's socket counters, as of its last wake.
    socket_stats: SocketStats,
    /// See [`FabricStats::endpoints`].
    endpoint_stats: BTreeMap<String, EndpointStats>,
    /// See [`FabricStats::queries`].
    query_stats: BTreeMap<String, QueryStats>,
    /// Subscriptions, and the flows of published messages.
    topics: topic::Topics,
    /// The runtime's clock: every input given to the node carries the time it is made at.
    clock: fn() -> Instant,
    /// A graceful shutdown is under way: no new flows or endpoints; open flows may finish
    /// until this deadline.
    draining_until: Option<Instant>,
    /// The drain is over: the node is leaving the cluster.
    leaving: bool,
    /// Every user handle is gone (or `abort`): the driver stops without waiting for anything.
    pub(crate) abandoned: bool,
    /// Down: every call ends with [`Error::Shutdown`].
    shutdown: bool,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Live user handles: `Fabric` clones, including those in endpoints and flows. The driver
    /// stops when the last goes.
    handles: AtomicUsize,
    /// The driver's waker and scheduled mailboxes, under a lock of their own.
    pub(crate) wakeup: Arc<Wakeup>,
    /// Datagrams to names known to lead to other nodes, under a lock of their own.
    pub(crate) datagram_outbox: Arc<DatagramOutbox>,
    local_addr: SocketAddr,
    /// The node's name (fixed for its life).
    name: String,
    /// The node's flow limits (fixed for its life), read without its lock.
    pub(crate) flow_limits: crate::flow::FlowLimits,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in grinta; the state is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Counts something of endpoint `name` (the fabric's own names are counted as queries).
    fn count_endpoint(&mut self, name: &str, count: impl FnOnce(&mut EndpointStats)) {
        if !crate::registry::is_reserved_name(name) {
            count(counted(&mut self.endpoint_stats, name));
        }
    }

    /// Counts something of query `topic`.
    pub(crate) fn count_query(&mut self, topic: &str, count: impl FnOnce(&mut QueryStats)) {
        count(counted(&mut self.query_stats, topic));
    }

    pub(crate) fn wake_driver(&mut self) {
        self.wakeup.wake_driver();
    }

    /// Whether the driver should stop: down, and abandoned or done with its last packets.
    pub(crate) fn driver_done(&self, outbox_empty: bool) -> bool {
        self.shutdown && (outbox_empty || self.abandoned)
    }

    /// Hands the datagrams senders queued outside the lock (see [`datagram_outbox`]) to the
    /// node, which routes and frames them; `runs` is scratch space, left empty. The driver does
    /// it every round, and [`Fabric::stats`] before it counts. Returns whether there were any.
    pub(crate) fn hand_over_datagrams(
        &mut self,
        now: Instant,
        runs: &mut Vec<datagram_outbox::Run>,
    ) -> bool {
        let dropped = self.datagram_outbox.take(runs);
        self.node.count_datagrams_dropped(dropped);
        let any = !runs.is_empty();
        for run in runs.drain(..) {
            if self.shutdown {
                // No driver sends any more (abandoned, or down): dropped, not handed to the node.
                self.node.count_datagrams_dropped(run.payloads.len() as u64);
            } else {
                self.node.send_datagrams(now, &run.endpoint, run.payloads);
            }
        }
        any
    }

    /// After the driver's transmits freed room in the connections: the datagram outbox looks
    /// up the room of the names it queued to, or ran short of room for.
    pub(crate) fn refresh_datagram_rooms(&mut self) {
        let node = &mut self.node;
        self.datagram_outbox
            .refresh_rooms(|name| node.datagram_room(name));
    }

    /// The runtime's current time.
    pub(crate) fn now(&self) -> Instant {
        (self.clock)()
    }

    /// Whether new flows and endpoints are allowed (no shutdown under way).
    fn accepting(&self) -> bool {
        !self.shutdown && !self.leaving && self.draining_until.is_none()
    }

    /// A flow lost its last handle: nothing waits on it any more.
    pub(crate) fn forget_flow_waiters(&mut self, flow: FlowId) {
        self.waiters.flows.remove(&flow);
        self.dials.remove(&flow);
    }

    /// Tells the node about the remote flows whose last handle was dropped since the last call
    /// (queued by the handles outside the lock, see [`mailbox::Wakeup::handles_gone`]); `gone`
    /// is scratch space. Whatever the handles sent before was handed over when they finished,
    /// and a flow dropped open is reset, so the order against the mailboxes does not matter.
    pub(crate) fn hand_over_gone_flows(
        &mut self,
        now: Instant,
        gone: &mut Vec<(FlowId, mailbox::HandlesGone)>,
    ) {
        self.wakeup.take_gone(gone);
        for (id, how) in gone.drain(..) {
            self.mailboxes.remove(&id);
            // Nothing waits on a flow without handles.
            self.forget_flow_waiters(id);
            match how {
                mailbox::HandlesGone::Open => self.node.drop_flow(id),
                mailbox::HandlesGone::Finished => self.node.release_flow(now, id),
                mailbox::HandlesGone::Reset => {}
            }
        }
    }

    /// Stops at once, as a crash would: the driver ends, the cluster sees the node fail.
    fn abandon(&mut self) {
        self.abandoned = true;
        self.go_down();
    }

    fn go_down(&mut self) {
        self.shutdown = true;
        self.datagram_outbox.close();
        self.topics.close();
        self.close_local_flows();
        self.wake_all();
    }

    /// Moves a graceful shutdown on (called by the driver on each wake): once the open flows
    /// ended or the grace period is over, what remains is reset and the node leaves; once the
    /// leave has spread, the fabric is down. Returns the drain deadline to wake up at, if any.
    pub(crate) fn advance_shutdown(&mut self, now: Instant) -> Option<Instant> {
        if let Some(deadline) = self.draining_until {
            self.local_flows.retain(|f| f.strong_count() > 0);
            let drained = self.node.flow_count() == 0 && self.local_flows.is_empty();
            if !drained && now < deadline {
                return Some(deadline);
            }
            self.draining_until = None;
            self.leaving = true;
            self.node.leave(now);
        }
        if self.leaving && !self.shutdown && self.node.membership().has_left() {
            self.go_down();
        }
        None
    }

    /// The handle of open remote flow `id`, with its mailbox (see [`mailbox`]).
    fn open_remote<R: Runtime>(&mut self, fabric: &Fabric<R>, id: FlowId) -> Flow<R> {
        let (mailbox, peer) = self.open_mailbox(id);
        Flow::new(
            Route::Remote {
                fabric: fabric.clone(),
                id,
                mailbox,
            },
            peer,
        )
    }

    /// The mailbox of open remote flow `id` (kept for the driver) and the peer's name: what a
    /// flow handle is made of.
    fn open_mailbox(&mut self, id: FlowId) -> (Option<Arc<Mailbox>>, String) {
        let now = self.now();
        let mailbox = Mailbox::open(&mut self.node, now, id);
        if let Some(mailbox) = &mailbox {
            self.mailboxes.insert(id, mailbox.clone());
        }
        let peer = self.node.flow_peer(id).unwrap_or_default().to_owned();
        (mailbox, peer)
    }

    /// Registers the task to wake when something happens to remote flow `flow`.
    pub(crate) fn wait_flow(&mut self, flow: FlowId, cx: &Context<'_>) {
        let waiters = self.waiters.flows.entry(flow).or_default();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
    }

    /// Closes the in-process flows waiting in `endpoint`'s backlog.
    fn close_local_backlog(&mut self, endpoint: &str, code: ResetCode) {
        for end in self.local_backlogs.remove(endpoint).unwrap_or_default() {
            end.flow().close(Closed::Reset(code));
        }
    }

    /// Ends every in-process flow (the fabric is shut down).
    fn close_local_flows(&mut self) {
        for flow in self.local_flows.drain(..).filter_map(|f| f.upgrade()) {
            flow.close(Closed::Shutdown);
        }
        self.local_backlogs.clear();
    }

    /// Wakes every task waiting on this fabric (it is shut down).
    fn wake_all(&mut self) {
        self.wake_driver();
        for (_, slot) in self.dials.drain() {
            slot.answer(DialAnswer::Shutdown);
        }
        // The handles keep their own; what the driver no longer reads is freed now.
        for (_, mailbox) in self.mailboxes.drain() {
            mailbox.close();
        }
        for (_, ws) in self.waiters.flows.drain() {
            ws.into_iter().for_each(Waker::wake);
        }
        for (_, ws) in self.waiters.endpoints.drain() {
            ws.into_iter().for_each(Waker::wake);
        }
        for (_, ws) in self.waiters.datagrams.drain() {
            ws.into_iter().for_each(Waker::wake);
        }
        self.waiters.members.drain(..).for_each(Waker::wake);
        self.waiters.names.drain(..).for_each(Waker::wake);
    }

    fn wake_flow(&mut self, flow: FlowId) {
        for w in self.waiters.flows.remove(&flow).unwrap_or_default() {
            w.wake();
        }
    }

    /// Routes node events to waiting tasks.
    fn dispatch(&mut self) {
        while let Some(event) = self.node.poll_event() {
            match event {
                Event::Flow(e) if self.topics.owns(&e) => {
                    let now = (self.clock)();
                    self.topics.on_flow_event(&mut self.node, now, e);
                }
                Event::Flow(e) => match e {
                    FlowEvent::Opened { flow, endpoint, .. } => match self.dials.remove(&flow) {
                        Some(slot) => {
                            self.count_endpoint(&endpoint, |s| s.dials_opened += 1);
                            let (mailbox, peer) = self.open_mailbox(flow);
                            slot.answer(DialAnswer::Open { mailbox, peer });
                        }
                        // Nobody waits for it any more: end it at once.
                        None => self.node.drop_flow(flow),
                    },
                    FlowEvent::DialFailed {
                        flow,
                        endpoint,
                        error,
                    } => {
                        if let Some(slot) = self.dials.remove(&flow) {
                            self.count_endpoint(&endpoint, |s| s.dials_failed += 1);
                            slot.answer(DialAnswer::Failed(error));
                        }
                        self.wake_flow(flow);
                    }
                    FlowEvent::Incoming { endpoint, .. } => {
                        for w in self.waiters.endpoints.remove(&endpoint).unwrap_or_default() {
                            w.wake();
                        }
                    }
                    FlowEvent::Readable { flow } => {
                        if let Some(mailbox) = self.mailboxes.get(&flow) {
                            mailbox.fill(&mut self.node, (self.clock)());
                        }
                        self.wake_flow(flow);
                    }
                    FlowEvent::Finished { flow } => {
                        if let Some(mailbox) = self.mailboxes.get(&flow) {
                            mailbox.close_inbox();
                        }
                        self.wake_flow(flow);
                    }
                    FlowEvent::Closed { flow, .. } => {
                        if let Some(mailbox) = self.mailboxes.get(&flow) {
                            mailbox.close();
                        }
                        self.wake_flow(flow);
                    }
                    FlowEvent::Writable { flow } => self.wake_flow(flow),
                },
                Event::Registry(RegistryEvent::NameConflict { name, winner }) => {
                    self.waiters.names.drain(..).for_each(Waker::wake);
                    self.close_local_backlog(&name, ResetCode::NameConflict);
                    for w in self.waiters.endpoints.remove(&name).unwrap_or_default() {
                        w.wake();
                    }
                    self.conflicts.insert(name, winner);
                }
                Event::Registry(_) => self.waiters.names.drain(..).for_each(Waker::wake),
                Event::ConnectionLost { .. } => {}
                Event::Datagram { endpoint } => {
                    // The waiters' list stays (emptied) until the endpoint closes.
                    if let Some(waiters) = self.waiters.datagrams.get_mut(&endpoint) {
                        waiters.drain(..).for_each(Waker::wake);
                    }
                }
                Event::Membership(e) => {
                    self.directory_changes += 1;
                    self.datagram_outbox.forget_routes();
                    self.waiters.names.drain(..).for_each(Waker::wake);
                    self.member_events.push(e);
                    for w in self.waiters.members.drain(..) {
                        w.wake();
                    }
                }
            }
        }
        // Changes without an event of their own (an owner joins a group name) move the
        // directory too.
        let generation = self.node.directory_generation();
        if generation != self.registry_generation {
            self.registry_generation = generation;
            self.directory_changes += 1;
            self.datagram_outbox.forget_routes();
            self.waiters.names.drain(..).for_each(Waker::wake);
        }
    }
}

/// `now + timeout`, or a century from now for a timeout that would overflow the clock
/// (`Duration::MAX` meaning "no timeout").
pub(crate) fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Longest query or pub/sub topic, in bytes: an endpoint name less its prefix
/// ([`QUERY_ENDPOINT_PREFIX`], [`TOPIC_ENDPOINT_PREFIX`], 13 bytes each).
pub const MAX_TOPIC_LEN: usize =
    crate::registry::MAX_ENDPOINT_NAME_LEN - QUERY_ENDPOINT_PREFIX.len();

const _: () = assert!(QUERY_ENDPOINT_PREFIX.len() == TOPIC_ENDPOINT_PREFIX.len());

/// The endpoint name of a query or pub/sub `topic` under `prefix`, checked: 1..=
/// [`MAX_TOPIC_LEN`] bytes of `[A-Za-z0-9._-]`.
fn topic_endpoint(prefix: &str, topic: &str) -> Result<String, Error> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(RegistryError::InvalidName {
            name: topic.chars().take(MAX_TOPIC_LEN + 8).collect(),
            reason: "a topic is 1..=115 bytes long",
        }
        .into());
    }
    let name = format!("{prefix}{topic}");
    crate::registry::validate_endpoint_name(&name).map_err(|_| RegistryError::InvalidName {
        name: topic.to_owned(),
        reason: "a topic may only hold A-Z, a-z, 0-9, '.', '_' and '-'",
    })?;
    Ok(name)
}

/// Refuses the fabric's own endpoint names (see [`crate::registry::RESERVED_PREFIX`]).
pub(crate) fn refuse_reserved(name: &str) -> Result<(), Error> {
    if crate::registry::is_reserved_name(name) {
        return Err(RegistryError::InvalidName {
            name: name.to_owned(),
            reason: "names that start with \"grinta.\" are reserved for the fabric",
        }
        .into());
    }
    Ok(())
}

/// A node of the fabric, driven by a runtime `R`. Cheap to clone; every clone is the same node.
///
/// The node runs while any handle exists: a `Fabric` clone, an [`Endpoint`] or a [`Flow`]. When
/// the last is dropped without [`shutdown`](Self::shutdown), the node stops as a crash would: its
/// socket closes and the cluster declares it failed.
pub struct Fabric<R: Runtime> {
    pub(crate) shared: Arc<Shared>,
    /// This handle's place in the member events (see [`next_member_event`](Self::next_member_event)).
    member_cursor: AtomicU64,
    _runtime: std::marker::PhantomData<fn() -> R>,
}

impl<R: Runtime> Clone for Fabric<R> {
    /// Another handle on the same node. It reads member events from where this one is.
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
            member_cursor: AtomicU64::new(self.member_cursor.load(Ordering::Relaxed)),
            _runtime: std::marker::PhantomData,
        }
    }
}

impl<R: Runtime> Drop for Fabric<R> {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: nobody can use the node any more.
            let mut inner = self.shared.lock();
            if !inner.shutdown {
                let span = inner.node.span().clone();
                span.in_scope(|| debug!("last handle dropped: the node stops"));
            }
            inner.abandon();
        }
    }
}

impl<R: Runtime> std::fmt::Debug for Fabric<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric")
            .field("name", &self.shared.lock().node.name())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Fabric<R> {
    /// A builder for a node named `name` (see [`FabricBuilder`]).
    pub fn builder(name: &str) -> FabricBuilder<R> {
        FabricBuilder::new(name)
    }

    /// Binds the socket, starts the node and spawns its driver; joins the configured seeds. `seed`
    /// drives the protocol's randomness (probe order, gossip targets); `None` takes a fresh one
    /// (it need not be secret: cryptographic randomness comes from the TLS provider). The one
    /// way in is [`FabricBuilder::start`].
    ///
    /// Binding port 0 picks a free port; with no `advertise` address the node then advertises the
    /// bound address (which must not be a wildcard IP).
    pub(crate) fn start(mut config: NodeConfig, seed: Option<u64>) -> Result<Self, Error> {
        let seed = seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish()
        });
        let socket = R::bind(config.bind).map_err(|source| Error::Bind {
            addr: config.bind,
            source,
        })?;
        let local_addr = R::local_addr(&socket).map_err(|source| Error::Bind {
            addr: config.bind,
            source,
        })?;
        config.bind = local_addr;
        // Probing larger packets is only sound when the socket sets "don't fragment".
        config.transport.mtu_discovery &= !R::may_fragment(&socket);
        // A restarted process starts above every incarnation of its previous life, so the
        // cluster takes it at its word at once (see `membership::Config::initial_incarnation`).
        let wall_millis = u64::try_from(R::unix_time().as_millis()).unwrap_or(u64::MAX);
        config.membership.initial_incarnation = config
            .membership
            .initial_incarnation
            .max(wall_millis.min(crate::membership::MAX_INCARNATION / 2));
        let now = R::now();
        let name = config.name.clone();
        let mut node = Node::new(config, seed, now)?;
        node.join(now, &[]);
        let wakeup = Arc::new(Wakeup::default());
        let datagram_outbox = Arc::new(DatagramOutbox::default());
        let flow_limits = node.flow_limits().clone();
        let shared = Arc::new(Shared {
            flow_limits,
            wakeup: wakeup.clone(),
            datagram_outbox: datagram_outbox.clone(),
            inner: Mutex::new(Inner {
                node,
                waiters: Waiters::default(),
                dials: HashMap::new(),
                conflicts: HashMap::new(),
                member_events: EventLog::new(MEMBER_EVENT_CAPACITY),
                directory_changes: 0,
                registry_generation: 0,
                local_backlogs: HashMap::new(),
                local_flows: Vec::new(),
                mailboxes: HashMap::new(),
                wakeup,
                datagram_outbox,
                socket_stats: SocketStats::default(),
                endpoint_stats: BTreeMap::new(),
                query_stats: BTreeMap::new(),
                topics: topic::Topics::default(),
                clock: R::now,
                draining_until: None,
                leaving: false,
                abandoned: false,
                shutdown: false,
            }),
            handles: AtomicUsize::new(1),
            local_addr,
            name,
        });
        // The driver runs inside the node's span, so what it logs carries the node's name.
        let span = shared.lock().node.span().clone();
        R::spawn(Box::pin(tracing::Instrument::instrument(
            Driver::<R>::new(shared.clone(), socket),
            span,
        )))
        .map_err(Error::Spawn)?;
        Ok(Self {
            shared,
            member_cursor: AtomicU64::new(0),
            _runtime: std::marker::PhantomData,
        })
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Inner, Instant) -> T) -> T {
        let mut inner = self.shared.lock();
        let now = R::now();
        let t = f(&mut inner, now);
        inner.dispatch();
        inner.wake_driver();
        t
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address the node's UDP socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The members this node knows (itself excluded), in every state: alive, suspect, and
    /// those that failed or left while the node still remembers them. See
    /// [`alive_members`](Self::alive_members) for the live ones.
    pub fn members(&self) -> Vec<Member> {
        self.shared.lock().node.membership().members().collect()
    }

    /// The members this node sees alive (itself excluded).
    pub fn alive_members(&self) -> Vec<Member> {
        self.shared
            .lock()
            .node
            .membership()
            .members()
            .filter(|m| m.state == MemberState::Alive)
            .collect()
    }

    /// The next membership event (joined, suspect, dead, left...) for this handle.
    ///
    /// Every handle sees every event from the node's start: one clone reading events takes
    /// nothing from another (a clone starts where its source is). The fabric keeps the last
    /// [`MEMBER_EVENT_CAPACITY`] events; a handle that falls further behind gets
    /// [`Error::Lagged`] with the number it missed, then the oldest kept. [`Error::Shutdown`]
    /// once the fabric is shut down and this handle has read everything.
    ///
    /// Cancel safety: dropping the future loses no event (the handle's place moves only when
    /// an event is returned).
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// use grinta_proto::fabric::Error;
    /// loop {
    ///     match fabric.next_member_event().await {
    ///         Ok(event) => println!("{event:?}"),
    ///         Err(Error::Lagged { missed }) => println!("missed {missed} events"),
    ///         Err(_) => break, // shut down
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn next_member_event(&self) -> Result<crate::membership::Event, Error> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            // Only moved under the lock.
            let mut cursor = self.member_cursor.load(Ordering::Relaxed);
            let read = inner.member_events.read(&mut cursor);
            self.member_cursor.store(cursor, Ordering::Relaxed);
            match read {
                Err(missed) => return Poll::Ready(Err(Error::Lagged { missed })),
                Ok(Some(e)) => return Poll::Ready(Ok(e)),
                Ok(None) => {}
            }
            if inner.shutdown {
                return Poll::Ready(Err(Error::Shutdown));
            }
            let waiters = &mut inner.waiters.members;
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Names of endpoints with a live owner that start with `prefix`.
    pub fn endpoints(&self, prefix: &str) -> Vec<String> {
        self.shared
            .lock()
            .node
            .registry()
            .names(prefix)
            .into_iter()
            .filter(|name| !crate::registry::is_reserved_name(name))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until endpoint `name` can be dialled: a node of the cluster (this one included)
    /// serves it and membership does not hold that node gone. Returns at once if it already can.
    ///
    /// A name spreads by gossip, so a node that has just started (or a name just registered
    /// elsewhere) is not resolvable at once, and [`dial`](Self::dial) would fail with
    /// `FlowError::NoSuchEndpoint`. Wait for it instead of polling
    /// [`endpoints`](Self::endpoints) in a sleep loop.
    ///
    /// Errors: [`Error::Registry`] for an invalid name; `FlowError::NoSuchEndpoint` (see
    /// [`Error::is_no_such_endpoint`]) if `timeout` passes first; [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use std::time::Duration;
    ///
    /// fabric.wait_for("billing", Duration::from_secs(10)).await?;
    /// let flow = fabric.dial("billing").await?;
    /// # drop(flow);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Cancel safety: dropping the future leaves nothing behind.
    pub async fn wait_for(&self, name: &str, timeout: Duration) -> Result<(), Error> {
        crate::registry::validate_endpoint_name(name)?;
        let deadline = deadline_after(R::now(), timeout);
        let mut sleep = Box::pin(R::sleep_until(deadline));
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.shutdown {
                return Poll::Ready(Err(Error::Shutdown));
            }
            if inner.node.is_resolvable(name) {
                return Poll::Ready(Ok(()));
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Error::Flow(FlowError::NoSuchEndpoint {
                    name: name.to_owned(),
                })));
            }
            let waiters = &mut inner.waiters.names;
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Watches the endpoint names that start with `prefix` (`""` for all): a stream of
    /// [`NameEvent`]s that starts with the current state (`NameAdded`, then `OwnerAdded` for
    /// each live owner) and goes on with every change this node sees: owners added and
    /// removed, names gone. It ends when the fabric shuts down. See [`NameWatch`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// use futures::StreamExt;
    /// use grinta_proto::fabric::NameEvent;
    ///
    /// let mut workers = fabric.watch("worker.");
    /// while let Some(event) = workers.next().await {
    ///     match event {
    ///         NameEvent::OwnerAdded { name, owner } => println!("{owner} serves {name}"),
    ///         NameEvent::NameGone { name } => println!("nobody serves {name} any more"),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub fn watch(&self, prefix: &str) -> NameWatch<R> {
        NameWatch::new(self.clone(), prefix)
    }

    /// Watches membership: a stream of every member event (joined, updated, suspect, alive,
    /// dead, left) from now on, each watch seeing every event; `Err(Error::Lagged)` if it
    /// falls more than [`MEMBER_EVENT_CAPACITY`] events behind. Take [`members`](Self::members)
    /// after making the watch for the state it starts from. See [`MemberWatch`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// use futures::StreamExt;
    /// use grinta_proto::membership::Event;
    ///
    /// let mut events = fabric.watch_members();
    /// let members = fabric.members(); // the state the events start from
    /// # drop(members);
    /// while let Some(event) = events.next().await {
    ///     match event {
    ///         Ok(Event::MemberDead { name, .. }) => println!("{name} failed"),
    ///         Ok(_) => {}
    ///         Err(e) => println!("{e}"), // lagged: take `members()` again
    ///     }
    /// }
    /// # }
    /// ```
    pub fn watch_members(&self) -> MemberWatch<R> {
        MemberWatch::new(self.clone())
    }

    /// A future that completes with the [`DownReason`] when member `node` leaves or fails (at
    /// once if it already has, or if no member of that name is known). See [`NodeMonitor`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// use grinta_proto::fabric::DownReason;
    ///
    /// match fabric.monitor_node("node-b").await {
    ///     DownReason::Failed => println!("node-b failed"),
    ///     DownReason::Left => println!("node-b left"),
    ///     other => println!("node-b: {other}"),
    /// }
    /// # }
    /// ```
    pub fn monitor_node(&self, node: &str) -> NodeMonitor<R> {
        NodeMonitor::new(self.clone(), node)
    }

    /// A future that completes with the [`DownReason`] when endpoint `name` goes away: every
    /// owner it had (and, for a group endpoint, every owner that joined since) withdrew it,
    /// lost it to a conflict, failed or left. At once with [`DownReason::NotFound`] if no live
    /// node serves it now. See [`EndpointMonitor`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// let flow = fabric.dial("billing").await?;
    /// let gone = fabric.monitor_endpoint("billing");
    /// // ... use the flow; `gone.await` tells why the endpoint went away.
    /// # drop(flow); drop(gone);
    /// # Ok(())
    /// # }
    /// ```
    pub fn monitor_endpoint(&self, name: &str) -> EndpointMonitor<R> {
        EndpointMonitor::new(self.clone(), name)
    }

    /// This node's tags (see [`crate::tags`]); every node sees them on [`Member::tags`].
    pub fn tags(&self) -> Tags {
        self.shared.lock().node.tags()
    }

    /// Sets tag `key` of this node to `value`. It spreads with the node's next alive: every
    /// node sees it on [`Member::tags`] about as fast as a join spreads.
    ///
    /// Errors: [`Error::Tag`] for a key or value beyond the limits (see [`crate::tags`]) or tags
    /// that no longer fit in the membership metadata; [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// fabric.set_tag("zone", "eu-west")?;
    /// assert_eq!(fabric.tags().get("zone"), Some("eu-west"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_tag(&self, key: &str, value: &str) -> Result<(), Error> {
        self.change_tags(|tags| tags.insert(key, value).map(drop))
    }

    /// Removes tag `key` of this node (nothing happens if it has none).
    pub fn remove_tag(&self, key: &str) -> Result<(), Error> {
        self.change_tags(|tags| {
            tags.remove(key);
            Ok(())
        })
    }

    fn change_tags(
        &self,
        change: impl FnOnce(&mut Tags) -> Result<(), TagError>,
    ) -> Result<(), Error> {
        self.with(|inner, _now| {
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            let mut tags = inner.node.tags();
            let before = tags.clone();
            change(&mut tags)?;
            if tags == before {
                return Ok(());
            }
            match inner.node.set_tags(&tags) {
                Ok(()) => Ok(()),
                Err(crate::membership::Error::MetaTooLarge { size, limit }) => {
                    Err(TagError::TooLarge { size, limit }.into())
                }
                Err(_) => Err(Error::Shutdown),
            }
        })
    }

    /// Sends `message` to endpoint `name` as a datagram: unreliable and unordered, in a QUIC
    /// DATAGRAM frame (or in-process, to an endpoint of this node), received with
    /// [`Endpoint::recv_datagram`]. It never waits: a datagram the connection has no room for
    /// (membership keeps priority) or that its receiver has no room for is dropped and counted
    /// in [`FabricStats`] (`node.datagrams`). The first datagrams to a node not yet connected
    /// wait for the connection (a few of them).
    ///
    /// Once a name is known to lead to another node, its datagrams are queued for the node's
    /// driver without taking the node's lock (at most [`DATAGRAM_OUTBOX`], and no more than its
    /// connection has room for; beyond that they are dropped and counted at once), so a tight
    /// sending loop does not contend with the driver, nor make it work for datagrams that will
    /// be dropped.
    ///
    /// Errors: [`Error::Registry`] for an invalid name; `FlowError::MessageTooLarge` beyond
    /// [`max_datagram_size`](Self::max_datagram_size); `FlowError::NoSuchEndpoint` (for a name
    /// withdrawn a moment ago, a few datagrams may still be accepted and then dropped, counted,
    /// until the node's driver has seen the change); [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// fabric.send_datagram("telemetry", "cpu=0.42")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn send_datagram(&self, name: &str, message: impl Into<Bytes>) -> Result<(), Error> {
        let mut message = message.into();
        // A name known to lead to another node: queued for the driver without the node's lock
        // (see `datagram_outbox`). Only a valid name, not reserved, was ever learnt there, so
        // the name is checked on the way through the node (in the same order as there).
        if crate::datagram::check_size(message.len()).is_ok() {
            message = match self.shared.datagram_outbox.push(name, message) {
                datagram_outbox::Push::Queued { wake } => {
                    if wake {
                        self.shared.wakeup.wake_driver();
                    }
                    return Ok(());
                }
                datagram_outbox::Push::Dropped => return Ok(()),
                datagram_outbox::Push::ThroughNode(message) => message,
            };
        }
        crate::registry::validate_endpoint_name(name)?;
        refuse_reserved(name)?;
        crate::datagram::check_size(message.len())?;
        let mut inner = self.shared.lock();
        if !inner.accepting() {
            return Err(Error::Shutdown);
        }
        // The driver is woken only when this datagram gives it work it did not have yet: a
        // burst of datagrams costs one wake, not one per datagram.
        let had_work = inner.node.has_pending_work();
        let now = R::now();
        inner.node.send_datagram(now, name, message)?;
        if !inner.node.registry().is_local(name) {
            // It went to another node: the next ones may skip the node's lock until the
            // directory changes.
            let room = inner.node.datagram_room(name);
            inner.datagram_outbox.learn_remote(name, room);
        }
        // An in-process delivery wakes the endpoint's reader.
        inner.dispatch();
        if !had_work {
            inner.wake_driver();
        }
        Ok(())
    }

    /// The largest datagram [`send_datagram`](Self::send_datagram) takes, in bytes
    /// ([`MAX_DATAGRAM_SIZE`](crate::datagram::MAX_DATAGRAM_SIZE): 960, whatever the path).
    pub fn max_datagram_size(&self) -> usize {
        crate::datagram::MAX_DATAGRAM_SIZE
    }

    /// Registers an exclusive endpoint named `name`: dials of `name` from anywhere reach it.
    ///
    /// Fails with [`Error::Registry`] if the name is invalid (1..=128 bytes of
    /// `[A-Za-z0-9._-]`, not starting with `grinta.`, which the fabric keeps for itself),
    /// already served here, or owned by another node.
    pub fn endpoint(&self, name: &str) -> Result<Endpoint<R>, Error> {
        refuse_reserved(name)?;
        self.register(name, EndpointKind::Exclusive)
    }

    /// Registers this node as one owner of group endpoint `name`: a dial reaches this node if it
    /// comes from this node, otherwise a random live owner.
    pub fn group_endpoint(&self, name: &str) -> Result<Endpoint<R>, Error> {
        refuse_reserved(name)?;
        self.register(name, EndpointKind::Group)
    }

    pub(crate) fn register(&self, name: &str, kind: EndpointKind) -> Result<Endpoint<R>, Error> {
        self.with(|inner, now| {
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            inner.conflicts.remove(name);
            inner.node.register_endpoint(now, name, kind)?;
            Ok(Endpoint {
                fabric: self.clone(),
                name: name.to_owned(),
                ended: false,
                datagrams: Mutex::default(),
            })
        })
    }

    /// Dials endpoint `name` anywhere in the cluster; completes when the owner accepted.
    ///
    /// An endpoint served by this node gives an in-process flow at once (queued for its
    /// `accept`). Errors: [`Error::Registry`] for an invalid name, `FlowError::NoSuchEndpoint` (no live node serves the name),
    /// `FlowError::Rejected` (the owner refused: backlog full, endpoint gone, limits),
    /// `FlowError::DialTimeout`, `FlowError::PeerGone` / `ConnectionLost`, [`Error::Shutdown`].
    ///
    /// Cancel safety: dropping the future before it completes (a timeout, a `select!` that
    /// chose another branch) abandons the dial and leaves nothing behind: a flow the owner
    /// already accepted is reset, so its acceptor sees it end (`ResetCode::Dropped`).
    pub async fn dial(&self, name: &str) -> Result<Flow<R>, Error> {
        self.dial_where(name, &TagFilter::new()).await
    }

    /// Like [`dial`](Self::dial), to an owner of `name` whose tags match `filter` (a group
    /// endpoint restricted to a zone, say); `FlowError::NoSuchEndpoint` if no live owner does.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use grinta_proto::tags::TagFilter;
    ///
    /// let flow = fabric
    ///     .dial_where("workers", &TagFilter::new().eq("zone", "eu-west"))
    ///     .await?;
    /// # drop(flow);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn dial_where(&self, name: &str, filter: &TagFilter) -> Result<Flow<R>, Error> {
        refuse_reserved(name)?;
        self.dial_with(name, |node, now| node.dial_where(now, name, filter))
            .await
    }

    /// Dials `name` where `dial` sends it (`FlowError::LocalEndpoint`: in-process), and
    /// counts the outcome.
    pub(crate) async fn dial_with(
        &self,
        name: &str,
        dial: impl FnOnce(&mut Node, Instant) -> Result<FlowId, FlowError>,
    ) -> Result<Flow<R>, Error> {
        crate::registry::validate_endpoint_name(name)?;
        // The dial is counted under the lock that settles it, not under one more.
        let count = |inner: &mut Inner, opened: bool| {
            inner.count_endpoint(name, |s| {
                if opened {
                    s.dials_opened += 1;
                } else {
                    s.dials_failed += 1;
                }
            });
        };
        // The first poll dials and, for a remote owner, registers for the answer under the same
        // lock; the driver answers in the dial's slot (see `DialSlot`), which later polls read
        // without the node's lock. Dropped before it (a timeout, a `select!`), the guard abandons
        // the dial.
        let mut dial = Some(dial);
        let mut guard: Option<DialGuard<'_, R>> = None;
        std::future::poll_fn(|cx| {
            if let Some(dial) = dial.take() {
                let mut inner = self.shared.lock();
                let inner = &mut *inner;
                if !inner.accepting() {
                    count(inner, false);
                    return Poll::Ready(Err(Error::Shutdown));
                }
                let now = inner.now();
                // Flows whose handles were dropped end first: they must not hold the room
                // (`max_flows`, per peer, pending dials) this dial may need.
                inner.hand_over_gone_flows(now, &mut Vec::new());
                let dialled = match dial(&mut inner.node, now) {
                    Ok(flow) => {
                        let slot = Arc::new(DialSlot::default());
                        slot.lock().waker = Some(cx.waker().clone());
                        inner.dials.insert(flow, slot.clone());
                        guard = Some(DialGuard {
                            fabric: self,
                            flow,
                            slot,
                            answered: false,
                        });
                        None
                    }
                    Err(FlowError::LocalEndpoint { .. }) => {
                        Some(inner.dial_local(name).map(|end| {
                            Flow::new(Route::Local(end, self.clone()), self.name().to_owned())
                        }))
                    }
                    Err(e) => Some(Err(e.into())),
                };
                if let Some(result) = &dialled {
                    count(inner, result.is_ok());
                }
                inner.dispatch();
                inner.wake_driver();
                return match dialled {
                    Some(result) => Poll::Ready(result),
                    None => Poll::Pending,
                };
            }
            let Some(g) = guard.as_mut() else {
                // Only a first poll that completed leaves no guard, and a completed future is
                // not polled again; answered as a dial that cannot go on would be.
                return Poll::Ready(Err(Error::Shutdown));
            };
            let answer = std::task::ready!(g.slot.poll(cx));
            g.answered = true;
            Poll::Ready(match answer {
                // Counted by the driver, which gave the answer.
                DialAnswer::Open { mailbox, peer } => Ok(Flow::new(
                    Route::Remote {
                        fabric: self.clone(),
                        id: g.flow,
                        mailbox,
                    },
                    peer,
                )),
                DialAnswer::Failed(e) => Err(e.into()),
                DialAnswer::Shutdown => {
                    count(&mut self.shared.lock(), false);
                    Err(Error::Shutdown)
                }
            })
        })
        .await
    }

    /// Counters of the node (membership, transport) and of its UDP socket.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) {
    /// let stats = fabric.stats();
    /// println!(
    ///     "{} datagrams in {} send calls",
    ///     stats.socket.datagrams_sent, stats.socket.send_calls
    /// );
    /// # }
    /// ```
    pub fn stats(&self) -> FabricStats {
        let mut inner = self.shared.lock();
        // Datagrams still queued for the driver are sent (or dropped) first, so the counts
        // cover every datagram sent before this call.
        let now = inner.now();
        if inner.hand_over_datagrams(now, &mut Vec::new()) {
            inner.wake_driver();
        }
        // And the flows whose handles are gone no longer count as open.
        inner.hand_over_gone_flows(now, &mut Vec::new());
        FabricStats {
            open_flows: inner.node.flow_count(),
            pending_dials: inner.dials.len(),
            node: inner.node.stats(),
            socket: inner.socket_stats.clone(),
            endpoints: inner.endpoint_stats.clone(),
            queries: inner.query_stats.clone(),
            topics: inner.topics.stats(),
        }
    }

    /// Leaves the cluster gracefully, the way a server drains:
    ///
    /// 1. At once: no new flows or endpoints ([`Error::Shutdown`]; remote dials are refused with
    ///    `RejectReason::ShuttingDown`), every name is withdrawn (the cluster stops routing to
    ///    this node), flows waiting for `accept` are reset, pending `accept`s end.
    /// 2. Open flows carry on, both ways, until they end or the grace period
    ///    (`FlowLimits::shutdown_grace`, 5 s by default; [`FabricBuilder::shutdown_grace`]) is
    ///    over; what remains is then reset with `ResetCode::ShuttingDown`.
    /// 3. The node announces its leave and waits at most the membership profile's leave timeout
    ///    for it to spread; then every call on this fabric ends with [`Error::Shutdown`].
    ///
    /// The driver runs these steps, so the returned future only waits for them. Cancel safety:
    /// dropping it does not stop the shutdown.
    ///
    /// Dropping every handle without calling `shutdown` stops the node as a crash would (see
    /// [`Fabric`]).
    pub async fn shutdown(&self) {
        self.with(|inner, now| {
            if !inner.accepting() {
                return;
            }
            let grace = inner.node.flow_limits().shutdown_grace;
            inner.draining_until = Some(deadline_after(now, grace));
            inner.datagram_outbox.close();
            inner.node.stop_accepting(now);
            inner.topics.drain(&mut inner.node);
            let names: Vec<String> = inner.local_backlogs.keys().cloned().collect();
            for name in names {
                inner.close_local_backlog(&name, ResetCode::ShuttingDown);
            }
            for (_, ws) in inner.waiters.endpoints.drain() {
                ws.into_iter().for_each(Waker::wake);
            }
        });
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.shutdown {
                return Poll::Ready(());
            }
            let waiters = &mut inner.waiters.members;
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }

    /// Stops the driver at once, without telling the cluster (as a crash would). For tests and
    /// demos of failure detection.
    pub fn abort(&self) {
        self.shared.lock().abandon();
    }
}

impl Inner {
    /// Connects a dial to an endpoint of this node in-process, queueing the acceptor's end.
    fn dial_local(&mut self, name: &str) -> Result<LocalEnd, Error> {
        let limits = self.node.flow_limits().clone();
        let backlog = self.local_backlogs.entry(name.to_owned()).or_default();
        if backlog.len() >= limits.accept_backlog {
            return Err(FlowError::Rejected {
                endpoint: name.to_owned(),
                reason: RejectReason::BacklogFull,
                detail: format!(
                    "{} flows already wait for accept (accept_backlog)",
                    backlog.len()
                ),
            }
            .into());
        }
        let (dialler, acceptor) = LocalFlow::pair(
            limits.local_capacity,
            limits.recv_buffer,
            limits.max_message_size,
        );
        self.local_flows.retain(|f| f.strong_count() > 0);
        self.local_flows.push(Arc::downgrade(dialler.flow()));
        backlog.push_back(acceptor);
        for w in self.waiters.endpoints.remove(name).unwrap_or_default() {
            w.wake();
        }
        Ok(dialler)
    }
}

/// A named endpoint served by this node. Dropping it withdraws the name; flows it accepted keep
/// running, flows still waiting for `accept` are reset with `ResetCode::EndpointClosed`.
pub struct Endpoint<R: Runtime> {
    fabric: Fabric<R>,
    name: String,
    /// As a `Stream`: the error that ends it was returned.
    ended: bool,
    /// Datagrams taken from the node, not yet returned: a busy reader takes the node's whole
    /// queue for it each time it locks the node.
    datagrams: Mutex<VecDeque<(String, Bytes)>>,
}

/// Datagrams an endpoint takes from the node at once (once it has read the last batch): a
/// reader takes the lock once per few thousand datagrams, and holds at most this many besides
/// the node's queue.
const DATAGRAM_BATCH: usize = 4096;

impl<R: Runtime> std::fmt::Debug for Endpoint<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .finish()
    }
}

impl<R: Runtime> Endpoint<R> {
    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the next flow dialled to this endpoint, from another node or from this one.
    /// Fails with [`Error::NameConflict`] if the endpoint lost its name to another node, and
    /// [`Error::Shutdown`] once the fabric shuts down.
    ///
    /// Cancel safety: dropping the future loses no flow (a flow is taken from the backlog only
    /// when it is returned), so it can sit in a `select!` loop.
    pub async fn accept(&self) -> Result<Flow<R>, Error> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Withdraws the name: the cluster stops resolving it here, flows waiting in the accept
    /// backlog are reset with `ResetCode::EndpointClosed`, accepted flows carry on. Dropping the
    /// endpoint does the same.
    pub fn close(self) {
        drop(self);
    }

    /// The next datagram sent to this endpoint ([`Fabric::send_datagram`]): the sending node's
    /// name and the payload. Datagrams are unordered and may be lost; at most
    /// [`DATAGRAM_QUEUE`](crate::datagram::DATAGRAM_QUEUE) wait here, beyond which new ones are
    /// dropped. [`Error::Shutdown`] once the fabric is shut down.
    ///
    /// Cancel safety: dropping the future loses no datagram.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// let telemetry = fabric.endpoint("telemetry")?;
    /// loop {
    ///     let (from, payload) = telemetry.recv_datagram().await?;
    ///     println!("{from}: {payload:?}");
    /// }
    /// # }
    /// ```
    pub async fn recv_datagram(&self) -> Result<(String, Bytes), Error> {
        std::future::poll_fn(|cx| self.poll_recv_datagram(cx)).await
    }

    /// Polls for the next datagram (see [`recv_datagram`](Self::recv_datagram)).
    pub fn poll_recv_datagram(&self, cx: &mut Context<'_>) -> Poll<Result<(String, Bytes), Error>> {
        let mut taken = self.datagrams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(datagram) = taken.pop_front() {
            return Poll::Ready(Ok(datagram));
        }
        let mut inner = self.fabric.shared.lock();
        inner
            .node
            .recv_datagrams(&self.name, &mut taken, DATAGRAM_BATCH);
        if let Some(datagram) = taken.pop_front() {
            return Poll::Ready(Ok(datagram));
        }
        if inner.shutdown {
            return Poll::Ready(Err(Error::Shutdown));
        }
        // The queue is empty: the next datagram for it wakes this task.
        let waiters = match inner.waiters.datagrams.get_mut(&self.name) {
            Some(waiters) => waiters,
            None => inner.waiters.datagrams.entry_ref(&self.name).or_default(),
        };
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Polls for the next flow (see [`accept`](Self::accept)).
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Result<Flow<R>, Error>> {
        let mut inner = self.fabric.shared.lock();
        if let Some(winner) = inner.conflicts.get(&self.name) {
            return Poll::Ready(Err(Error::NameConflict {
                name: self.name.clone(),
                winner: winner.clone(),
            }));
        }
        if !inner.accepting() {
            return Poll::Ready(Err(Error::Shutdown));
        }
        let now = inner.now();
        if let Some(id) = inner.node.accept(now, &self.name) {
            inner.count_endpoint(&self.name, |s| s.flows_accepted += 1);
            return Poll::Ready(Ok(inner.open_remote(&self.fabric, id)));
        }
        if let Some(end) = inner
            .local_backlogs
            .get_mut(&self.name)
            .and_then(VecDeque::pop_front)
        {
            inner.count_endpoint(&self.name, |s| s.flows_accepted += 1);
            let peer = self.fabric.name().to_owned();
            return Poll::Ready(Ok(Flow::new(Route::Local(end, self.fabric.clone()), peer)));
        }
        let waiters = inner
            .waiters
            .endpoints
            .entry(self.name.clone())
            .or_default();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The endpoint's incoming flows, as [`accept`](Endpoint::accept) returns them. The stream ends
/// after the fabric shuts down (`None`, without an error) or after yielding
/// [`Error::NameConflict`] once.
///
/// ```no_run
/// # async fn demo<R: grinta_proto::fabric::Runtime>(fabric: grinta_proto::fabric::Fabric<R>) -> Result<(), grinta_proto::fabric::Error> {
/// use futures::StreamExt;
///
/// let mut incoming = fabric.endpoint("echo")?;
/// while let Some(flow) = incoming.next().await {
///     let mut flow = flow?;
///     // serve `flow`, perhaps in a task of its own
/// #   let _ = flow.finish().await;
/// }
/// # Ok(()) }
/// ```
impl<R: Runtime> futures_core::Stream for Endpoint<R> {
    type Item = Result<Flow<R>, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match this.poll_accept(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(flow)) => Poll::Ready(Some(Ok(flow))),
            Poll::Ready(Err(Error::Shutdown)) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

impl<R: Runtime> Drop for Endpoint<R> {
    fn drop(&mut self) {
        let name = self.name.clone();
        self.fabric.with(|inner, now| {
            inner.close_local_backlog(&name, ResetCode::EndpointClosed);
            inner.waiters.endpoints.remove(&name);
            inner.waiters.datagrams.remove(&name);
            inner.conflicts.remove(&name);
            let _ = inner.node.unregister_endpoint(now, &name);
        });
    }
}

/// Declares the user-facing type aliases of an adapter for its runtime type `$runtime`:
/// `Fabric`, `FabricBuilder`, `Endpoint`, `Flow`, `FlowSender`, `FlowReceiver`, `TypedFlow`,
/// `TypedSender`, `TypedReceiver`, `Request`, `Requests`, `Query`, `QueryHandler`,
/// `QueryResponses`, the watches and monitors, `Kv` and `KvWatch`, and
/// re-exports `Error` and `Profile`. Both adapters use it, so their APIs cannot drift apart.
#[macro_export]
macro_rules! runtime_aliases {
    ($runtime:ty) => {
        /// A node of the fabric on this runtime. Start one with `Fabric::builder(name)`.
        pub type Fabric = $crate::fabric::Fabric<$runtime>;
        /// Settings of a node on this runtime, then `start()`.
        pub type FabricBuilder = $crate::fabric::FabricBuilder<$runtime>;
        /// An endpoint served by a fabric on this runtime.
        pub type Endpoint = $crate::fabric::Endpoint<$runtime>;
        /// A flow (in-process or over QUIC) on this runtime.
        pub type Flow = $crate::fabric::Flow<$runtime>;
        /// The sending half of a split flow.
        pub type FlowSender = $crate::fabric::FlowSender<$runtime>;
        /// The receiving half of a split flow.
        pub type FlowReceiver = $crate::fabric::FlowReceiver<$runtime>;
        /// A flow carrying values of `T` through codec `C`.
        pub type TypedFlow<T, C> = $crate::fabric::TypedFlow<$runtime, T, C>;
        /// The sending half of a `TypedFlow` on this runtime.
        pub type TypedSender<T, C> = $crate::fabric::TypedSender<$runtime, T, C>;
        /// The receiving half of a `TypedFlow` on this runtime.
        pub type TypedReceiver<T, C> = $crate::fabric::TypedReceiver<$runtime, T, C>;
        /// A request received by an endpoint, to answer with `respond`.
        pub type Request = $crate::fabric::Request<$runtime>;
        /// The requests sent to an endpoint (`Endpoint::into_requests`).
        pub type Requests = $crate::fabric::Requests<$runtime>;
        /// A question of a query, received by a `QueryHandler`.
        pub type Query = $crate::fabric::Query<$runtime>;
        /// The questions asked of this node on a topic (`Fabric::handle_queries`).
        pub type QueryHandler = $crate::fabric::QueryHandler<$runtime>;
        /// The answers to a query (`Fabric::query`).
        pub type QueryResponses = $crate::fabric::QueryResponses<$runtime>;
        /// A watch of the endpoint names under a prefix (`Fabric::watch`).
        pub type NameWatch = $crate::fabric::NameWatch<$runtime>;
        /// A watch of the membership events (`Fabric::watch_members`).
        pub type MemberWatch = $crate::fabric::MemberWatch<$runtime>;
        /// Completes when a node goes away (`Fabric::monitor_node`).
        pub type NodeMonitor = $crate::fabric::NodeMonitor<$runtime>;
        /// Completes when an endpoint goes away (`Fabric::monitor_endpoint`).
        pub type EndpointMonitor = $crate::fabric::EndpointMonitor<$runtime>;
        /// The replicated key/value table (`Fabric::kv`).
        pub type Kv = $crate::fabric::Kv<$runtime>;
        /// A watch of the key/value entries under a prefix (`Kv::watch`).
        pub type KvWatch = $crate::fabric::KvWatch<$runtime>;
        /// A subscription to a topic (`Fabric::subscribe`).
        pub type Subscription = $crate::fabric::Subscription<$runtime>;
        pub use $crate::api::*;
        pub use $crate::fabric::{Error, FabricStats, Profile, SocketStats};
    };
}

#[cfg(test)]
mod tests {
    use super::EventLog;

    #[test]
    fn every_reader_sees_every_event_or_how_many_it_missed() {
        let mut log = EventLog::new(4);
        let (mut fast, mut slow) = (0u64, 0u64);
        for i in 0..3 {
            log.push(i);
        }
        assert_eq!(log.read(&mut fast), Ok(Some(0)));
        assert_eq!(log.read(&mut fast), Ok(Some(1)));
        // Readers do not take from each other.
        assert_eq!(log.read(&mut slow), Ok(Some(0)));
        for i in 3..10 {
            log.push(i);
        }
        // Kept: 6..10. The fast reader (at 2) missed 2..6, the slow one (at 1) missed 1..6.
        assert_eq!(log.read(&mut fast), Err(4));
        assert_eq!(log.read(&mut slow), Err(5));
        for want in 6..10 {
            assert_eq!(log.read(&mut fast), Ok(Some(want)));
        }
        assert_eq!(log.read(&mut fast), Ok(None));
        assert_eq!(log.read(&mut slow), Ok(Some(6)));
        // 10,000 events through a log of 4: memory stays bounded, counts stay exact.
        let mut idle = fast;
        for i in 10..10_010 {
            log.push(i);
            assert!(log.events.len() <= 4);
        }
        assert_eq!(log.read(&mut idle), Err(9_996));
        assert_eq!(log.read(&mut idle), Ok(Some(10_006)));
    }
}
