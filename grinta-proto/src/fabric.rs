//! The user API, written once for every runtime: [`Fabric`], [`Endpoint`], [`Flow`].
//!
//! This module holds no runtime: it uses `std::task` only. An adapter (`grinta-tokio`,
//! `grinta-async-std`) implements [`Runtime`] (a UDP socket, a timer, a clock and a way to spawn)
//! and calls [`Fabric::start`]. One driver task per node owns the socket; it feeds received
//! datagrams and timeouts to the [`Node`], sends what it produces, and wakes the tasks waiting on
//! flows and endpoints. API calls lock the node, act, and wake the driver. Work per driver wake is
//! bounded ([`DRIVER_BUDGET`] datagrams in, [`DRIVER_BUDGET`] out) so one busy flow cannot starve
//! membership.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use hashbrown::HashMap;

use crate::codec::{Codec, CodecError};
use crate::flow::{FlowError, FlowEvent, FlowId, Recv};
use crate::membership::{Member, MemberState};
use crate::node::{Event, Node, NodeConfig, NodeError};
use crate::registry::{EndpointKind, RegistryError, RegistryEvent};

/// Datagrams the driver receives, and sends, per wake before yielding.
pub const DRIVER_BUDGET: usize = 64;

/// What an adapter provides: a UDP socket, a timer, a clock and a spawner.
pub trait Runtime: Send + Sync + 'static {
    /// The UDP socket type.
    type Socket: Send + Sync + Unpin + 'static;
    /// A timer future.
    type Sleep: Future<Output = ()> + Send + 'static;

    /// Binds a UDP socket (non-blocking, registered with the runtime's reactor).
    fn bind(addr: SocketAddr) -> io::Result<Self::Socket>;
    /// The socket's local address.
    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr>;
    /// Receives one datagram.
    fn poll_recv_from(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>>;
    /// Sends one datagram.
    fn poll_send_to(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        buf: &[u8],
        to: SocketAddr,
    ) -> Poll<io::Result<usize>>;
    /// A timer that completes at `deadline`.
    fn sleep_until(deadline: Instant) -> Self::Sleep;
    /// Runs `future` in the background.
    fn spawn(future: Pin<Box<dyn Future<Output = ()> + Send>>);
    /// The current time (the only clock read in grinta, and it happens here, in the adapter).
    fn now() -> Instant;
}

/// Errors of the user API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node could not start (configuration, TLS material).
    #[error(transparent)]
    Start(#[from] NodeError),
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
    /// A flow operation failed.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The endpoint lost its name to another node.
    #[error("endpoint {name:?} lost its name to node {winner:?}")]
    NameConflict {
        /// The endpoint.
        name: String,
        /// The node that keeps the name.
        winner: String,
    },
    /// The fabric was shut down.
    #[error("the fabric is shut down")]
    Shutdown,
    /// A typed flow received a message that is not a value of its type (or could not encode one).
    #[error(transparent)]
    Codec(#[from] CodecError),
}

#[derive(Default)]
struct Waiters {
    /// Per flow: tasks waiting to read or write, and dials waiting for an answer.
    flows: HashMap<FlowId, Vec<Waker>>,
    /// Per endpoint: tasks waiting in `accept`.
    endpoints: HashMap<String, Vec<Waker>>,
    /// Tasks waiting for a member event.
    members: Vec<Waker>,
}

struct Inner {
    node: Node,
    waiters: Waiters,
    dials: HashMap<FlowId, Option<Result<(), FlowError>>>,
    /// Terminal state of flows (finished or closed), for waiters.
    closed: HashMap<FlowId, FlowError>,
    conflicts: HashMap<String, String>,
    member_events: VecDeque<crate::membership::Event>,
    driver: Option<Waker>,
    shutdown: bool,
}

struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in grinta; the state is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn wake_driver(&mut self) {
        if let Some(w) = self.driver.take() {
            w.wake();
        }
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
                Event::Flow(e) => match e {
                    FlowEvent::Opened { flow, .. } => {
                        self.dials.insert(flow, Some(Ok(())));
                        self.wake_flow(flow);
                    }
                    FlowEvent::DialFailed { flow, error, .. } => {
                        self.dials.insert(flow, Some(Err(error)));
                        self.wake_flow(flow);
                    }
                    FlowEvent::Incoming { endpoint, .. } => {
                        for w in self.waiters.endpoints.remove(&endpoint).unwrap_or_default() {
                            w.wake();
                        }
                    }
                    FlowEvent::Readable { flow }
                    | FlowEvent::Writable { flow }
                    | FlowEvent::Finished { flow } => self.wake_flow(flow),
                    FlowEvent::Closed { flow, error } => {
                        self.closed.insert(flow, error);
                        self.wake_flow(flow);
                    }
                },
                Event::Registry(RegistryEvent::NameConflict { name, winner }) => {
                    for w in self.waiters.endpoints.remove(&name).unwrap_or_default() {
                        w.wake();
                    }
                    self.conflicts.insert(name, winner);
                }
                Event::Registry(_) | Event::ConnectionLost { .. } => {}
                Event::Membership(e) => {
                    if self.member_events.len() >= 1024 {
                        self.member_events.pop_front();
                    }
                    self.member_events.push_back(e);
                    for w in self.waiters.members.drain(..) {
                        w.wake();
                    }
                }
            }
        }
    }
}

/// A node of the fabric, driven by a runtime `R`. Cheap to clone; every clone is the same node.
pub struct Fabric<R: Runtime> {
    shared: Arc<Shared>,
    _runtime: std::marker::PhantomData<fn() -> R>,
}

impl<R: Runtime> Clone for Fabric<R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _runtime: std::marker::PhantomData,
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
    /// Like [`start_with_seed`](Self::start_with_seed), with a fresh seed for the protocol's
    /// randomness (it need not be secret: cryptographic randomness comes from the TLS provider).
    pub fn start(config: NodeConfig) -> Result<Self, Error> {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        Self::start_with_seed(config, h.finish())
    }

    /// Binds the socket, starts the node and spawns its driver; joins the configured seeds. `seed`
    /// drives the protocol's randomness (probe order, gossip targets).
    pub fn start_with_seed(config: NodeConfig, seed: u64) -> Result<Self, Error> {
        let socket = R::bind(config.bind).map_err(|source| Error::Bind {
            addr: config.bind,
            source,
        })?;
        let now = R::now();
        let mut node = Node::new(config, seed, now)?;
        node.join(now, &[]);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                node,
                waiters: Waiters::default(),
                dials: HashMap::new(),
                closed: HashMap::new(),
                conflicts: HashMap::new(),
                member_events: VecDeque::new(),
                driver: None,
                shutdown: false,
            }),
        });
        R::spawn(Box::pin(Driver::<R> {
            shared: shared.clone(),
            socket,
            sleep: None,
            sleep_at: None,
            outbox: VecDeque::new(),
            buf: vec![0u8; 65_536],
        }));
        Ok(Self {
            shared,
            _runtime: std::marker::PhantomData,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner, Instant) -> T) -> T {
        let mut inner = self.shared.lock();
        let t = f(&mut inner, R::now());
        inner.dispatch();
        inner.wake_driver();
        t
    }

    /// This node's name.
    pub fn name(&self) -> String {
        self.shared.lock().node.name().to_owned()
    }

    /// The members this node knows (itself excluded).
    pub fn members(&self) -> Vec<Member> {
        self.shared
            .lock()
            .node
            .membership()
            .members()
            .cloned()
            .collect()
    }

    /// Members this node sees alive.
    pub fn alive_members(&self) -> Vec<String> {
        self.shared
            .lock()
            .node
            .membership()
            .members()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.name.clone())
            .collect()
    }

    /// The next membership event (joined, suspect, dead, left...).
    pub async fn next_member_event(&self) -> Result<crate::membership::Event, Error> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(e) = inner.member_events.pop_front() {
                return Poll::Ready(Ok(e));
            }
            if inner.shutdown {
                return Poll::Ready(Err(Error::Shutdown));
            }
            inner.waiters.members.push(cx.waker().clone());
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
            .map(str::to_owned)
            .collect()
    }

    /// Registers an exclusive endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Result<Endpoint<R>, Error> {
        self.register(name, EndpointKind::Exclusive)
    }

    /// Registers this node as one owner of group endpoint `name`.
    pub fn group_endpoint(&self, name: &str) -> Result<Endpoint<R>, Error> {
        self.register(name, EndpointKind::Group)
    }

    fn register(&self, name: &str, kind: EndpointKind) -> Result<Endpoint<R>, Error> {
        self.with(|inner, now| {
            if inner.shutdown {
                return Err(Error::Shutdown);
            }
            inner.conflicts.remove(name);
            inner.node.register_endpoint(now, name, kind)?;
            Ok(Endpoint {
                fabric: self.clone(),
                name: name.to_owned(),
            })
        })
    }

    /// Dials endpoint `name` anywhere in the cluster; completes when the owner accepted.
    pub async fn dial(&self, name: &str) -> Result<Flow<R>, Error> {
        let flow = self.with(|inner, now| {
            if inner.shutdown {
                return Err(Error::Shutdown);
            }
            let flow = inner.node.dial(now, name)?;
            inner.dials.insert(flow, None);
            Ok(flow)
        })?;
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            match inner.dials.get(&flow) {
                Some(Some(_)) => {
                    let result = inner.dials.remove(&flow).flatten().unwrap_or(Ok(()));
                    Poll::Ready(result.map_err(Error::from))
                }
                _ if inner.shutdown => Poll::Ready(Err(Error::Shutdown)),
                _ => {
                    inner
                        .waiters
                        .flows
                        .entry(flow)
                        .or_default()
                        .push(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await?;
        Ok(Flow {
            fabric: self.clone(),
            id: flow,
            finished: false,
        })
    }

    /// Counters of the node.
    pub fn stats(&self) -> crate::node::NodeStats {
        self.shared.lock().node.stats()
    }

    /// Leaves the cluster gracefully (withdraws names, closes flows), then stops the driver.
    pub async fn shutdown(&self) {
        self.with(|inner, now| inner.node.leave(now));
        // Wait (bounded by the leave timeout) until the announcement has spread.
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.node.membership().has_left() {
                inner.shutdown = true;
                inner.wake_driver();
                for (_, ws) in inner.waiters.flows.drain() {
                    ws.into_iter().for_each(Waker::wake);
                }
                for (_, ws) in inner.waiters.endpoints.drain() {
                    ws.into_iter().for_each(Waker::wake);
                }
                inner.waiters.members.drain(..).for_each(Waker::wake);
                return Poll::Ready(());
            }
            inner.waiters.members.push(cx.waker().clone());
            inner.wake_driver();
            Poll::Pending
        })
        .await;
    }

    /// Stops the driver at once, without telling the cluster (as a crash would). For tests and
    /// demos of failure detection.
    pub fn abort(&self) {
        let mut inner = self.shared.lock();
        inner.shutdown = true;
        inner.wake_driver();
    }
}

/// A named endpoint served by this node.
pub struct Endpoint<R: Runtime> {
    fabric: Fabric<R>,
    name: String,
}

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

    /// Waits for the next flow dialled to this endpoint. Fails with [`Error::NameConflict`] if the
    /// endpoint lost its name to another node.
    pub async fn accept(&self) -> Result<Flow<R>, Error> {
        std::future::poll_fn(|cx| {
            let mut inner = self.fabric.shared.lock();
            if let Some(winner) = inner.conflicts.get(&self.name) {
                return Poll::Ready(Err(Error::NameConflict {
                    name: self.name.clone(),
                    winner: winner.clone(),
                }));
            }
            if inner.shutdown {
                return Poll::Ready(Err(Error::Shutdown));
            }
            if let Some(id) = inner.node.accept(&self.name) {
                return Poll::Ready(Ok(Flow {
                    fabric: self.fabric.clone(),
                    id,
                    finished: false,
                }));
            }
            inner
                .waiters
                .endpoints
                .entry(self.name.clone())
                .or_default()
                .push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl<R: Runtime> Drop for Endpoint<R> {
    fn drop(&mut self) {
        let name = self.name.clone();
        self.fabric.with(|inner, now| {
            let _ = inner.node.unregister_endpoint(now, &name);
        });
    }
}

/// An ordered, back-pressured, bidirectional message channel.
///
/// Dropping a flow that was not finished aborts it: the other side sees `ResetCode::Dropped`. A
/// finished flow still delivers everything it sent after it is dropped.
pub struct Flow<R: Runtime> {
    fabric: Fabric<R>,
    id: FlowId,
    finished: bool,
}

impl<R: Runtime> Drop for Flow<R> {
    fn drop(&mut self) {
        if !self.finished {
            let id = self.id;
            self.fabric.with(|inner, now| inner.node.drop_flow(now, id));
        }
    }
}

impl<R: Runtime> std::fmt::Debug for Flow<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow").field("id", &self.id).finish()
    }
}

impl<R: Runtime> Flow<R> {
    fn wait(&self, cx: &mut Context<'_>, inner: &mut Inner) {
        inner
            .waiters
            .flows
            .entry(self.id)
            .or_default()
            .push(cx.waker().clone());
    }

    /// Sends one message, waiting while the flow's send buffer is full.
    pub async fn send(&mut self, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = message.into();
        std::future::poll_fn(|cx| {
            let mut inner = self.fabric.shared.lock();
            let now = R::now();
            let r = inner.node.send(now, self.id, message.clone());
            inner.dispatch();
            inner.wake_driver();
            match r {
                Ok(()) => Poll::Ready(Ok(())),
                Err(FlowError::WouldBlock) => {
                    self.wait(cx, &mut inner);
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e.into())),
            }
        })
        .await
    }

    /// Receives the next message; `Ok(None)` once the other side finished and everything was read.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, Error> {
        std::future::poll_fn(|cx| {
            let mut inner = self.fabric.shared.lock();
            let now = R::now();
            let r = inner.node.recv(now, self.id);
            inner.dispatch();
            inner.wake_driver();
            match r {
                Ok(Recv::Message(m)) => Poll::Ready(Ok(Some(m))),
                Ok(Recv::Finished) => Poll::Ready(Ok(None)),
                Ok(Recv::Pending) if inner.shutdown => Poll::Ready(Err(Error::Shutdown)),
                Ok(Recv::Pending) => {
                    self.wait(cx, &mut inner);
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e.into())),
            }
        })
        .await
    }

    /// Finishes the sending side: everything sent is delivered, then the other side reads the end.
    pub async fn finish(&mut self) -> Result<(), Error> {
        let id = self.id;
        self.finished = true;
        self.fabric
            .with(|inner, now| inner.node.finish(now, id))
            .map_err(Error::from)
    }

    /// Aborts the flow both ways with an application `code`.
    pub fn reset(&mut self, code: u32) -> Result<(), Error> {
        let id = self.id;
        self.finished = true;
        self.fabric
            .with(|inner, now| inner.node.reset(now, id, code))
            .map_err(Error::from)
    }
}

impl<R: Runtime> Flow<R> {
    /// This flow, carrying values of `T` encoded with `codec`.
    ///
    /// ```no_run
    /// # async fn demo<R: grinta_proto::fabric::Runtime>(flow: grinta_proto::fabric::Flow<R>) -> Result<(), grinta_proto::fabric::Error> {
    /// use grinta_proto::codec::ProstCodec;
    /// use grinta_proto::wire::Ack;
    ///
    /// let mut acks = flow.typed(ProstCodec::<Ack>::default());
    /// acks.send(&Ack { seq_no: 1 }).await?;
    /// let reply: Option<Ack> = acks.recv().await?;
    /// # Ok(()) }
    /// ```
    pub fn typed<T, C: Codec<T>>(self, codec: C) -> TypedFlow<R, T, C> {
        TypedFlow {
            flow: self,
            codec,
            _values: std::marker::PhantomData,
        }
    }
}

/// A [`Flow`] carrying values of `T`, encoded by a [`Codec`]. A message that does not decode as a
/// `T` is [`Error::Codec`]; the flow stays usable.
pub struct TypedFlow<R: Runtime, T, C> {
    flow: Flow<R>,
    codec: C,
    _values: std::marker::PhantomData<fn() -> T>,
}

impl<R: Runtime, T, C> std::fmt::Debug for TypedFlow<R, T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedFlow")
            .field("flow", &self.flow)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<R: Runtime, T, C: Codec<T>> TypedFlow<R, T, C> {
    /// Sends one value.
    pub async fn send(&mut self, value: &T) -> Result<(), Error> {
        let message = self.codec.encode(value)?;
        self.flow.send(message).await
    }

    /// Receives the next value; `Ok(None)` at the end of the flow.
    pub async fn recv(&mut self) -> Result<Option<T>, Error> {
        match self.flow.recv().await? {
            Some(message) => Ok(Some(self.codec.decode(message)?)),
            None => Ok(None),
        }
    }

    /// Finishes the sending side.
    pub async fn finish(&mut self) -> Result<(), Error> {
        self.flow.finish().await
    }

    /// Aborts the flow both ways with an application `code`.
    pub fn reset(&mut self, code: u32) -> Result<(), Error> {
        self.flow.reset(code)
    }

    /// The untyped flow underneath.
    pub fn into_inner(self) -> Flow<R> {
        self.flow
    }
}

/// The one task per node that owns the socket.
struct Driver<R: Runtime> {
    shared: Arc<Shared>,
    socket: R::Socket,
    sleep: Option<Pin<Box<R::Sleep>>>,
    sleep_at: Option<Instant>,
    outbox: VecDeque<(SocketAddr, Vec<u8>)>,
    buf: Vec<u8>,
}

impl<R: Runtime> Future for Driver<R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Every field is Unpin (the timer is boxed), so the driver is Unpin.
        let this = Pin::into_inner(self);
        let shared = this.shared.clone();
        let mut inner = shared.lock();
        if inner.shutdown && this.outbox.is_empty() {
            return Poll::Ready(());
        }
        inner.driver = Some(cx.waker().clone());

        // Receive, bounded.
        let mut budget_hit = false;
        for i in 0..=DRIVER_BUDGET {
            if i == DRIVER_BUDGET {
                budget_hit = true;
                break;
            }
            match R::poll_recv_from(&this.socket, cx, &mut this.buf) {
                Poll::Ready(Ok((n, from))) => {
                    let now = R::now();
                    inner.node.handle_datagram(now, from, &this.buf[..n]);
                }
                // An ICMP error or a truncated datagram: nothing to do with it.
                Poll::Ready(Err(_)) => continue,
                Poll::Pending => break,
            }
        }

        // Timers.
        let now = R::now();
        if inner.node.poll_timeout().is_some_and(|t| t <= now) {
            inner.node.handle_timeout(now);
        }
        inner.dispatch();

        // Send, bounded.
        while this.outbox.len() < 4 * DRIVER_BUDGET {
            match inner.node.poll_transmit() {
                Some(t) => this.outbox.push_back((t.destination, t.contents)),
                None => break,
            }
        }
        let mut sent = 0;
        while let Some((to, data)) = this.outbox.front() {
            if sent == DRIVER_BUDGET {
                budget_hit = true;
                break;
            }
            match R::poll_send_to(&this.socket, cx, data, *to) {
                Poll::Ready(_) => {
                    this.outbox.pop_front();
                    sent += 1;
                }
                Poll::Pending => break,
            }
        }

        // Sleep until the next deadline.
        match inner.node.poll_timeout() {
            Some(deadline) if Some(deadline) != this.sleep_at => {
                this.sleep = Some(Box::pin(R::sleep_until(deadline)));
                this.sleep_at = Some(deadline);
            }
            Some(_) => {}
            None => {
                this.sleep = None;
                this.sleep_at = None;
            }
        }
        drop(inner);
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                this.sleep = None;
                this.sleep_at = None;
                cx.waker().wake_by_ref();
            }
        }
        if budget_hit {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}
