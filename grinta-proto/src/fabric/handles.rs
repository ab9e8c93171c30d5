//! The application's handles on flows: [`Flow`], its halves, and typed flows, one API over remote
//! (QUIC) and in-process flows. The flow state machines they drive are in [`crate::flow`].

use std::any::Any;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_sink::Sink;

use crate::codec::{Codec, CodecError};
use crate::flow::{FlowError, FlowId, FlowStats, Recv, RecvQueue, ResetCode, SendQueue};
use crate::wire::framing;

use super::local::{ErasedEncode, LocalEnd, Message};
use super::mailbox::{Committed, HandlesGone, Mailbox, Staged, Taken, Wakeup};
use super::{Error, Fabric, Runtime};

/// Bytes `send_many` frames outside any lock before handing them to the mailbox under its lock.
const STAGE_BYTES: usize = 16 * 1024;

/// A message on its way through `send_many`: owned (`Bytes`, handed over without a copy when
/// large) or borrowed ([`Copied`], copied).
trait Outgoing {
    fn len(&self) -> usize;
    /// Frames the message into `queue`.
    fn stage(self, queue: &mut SendQueue);
    fn into_bytes(self) -> Bytes;
}

impl Outgoing for Bytes {
    fn len(&self) -> usize {
        Bytes::len(self)
    }

    fn stage(self, queue: &mut SendQueue) {
        queue.push_message(self);
    }

    fn into_bytes(self) -> Bytes {
        self
    }
}

/// A message `send_many_copied` copies: the caller keeps it.
struct Copied<T>(T);

impl<T: AsRef<[u8]>> Outgoing for Copied<T> {
    fn len(&self) -> usize {
        self.0.as_ref().len()
    }

    fn stage(self, queue: &mut SendQueue) {
        queue.push_copy(self.0.as_ref());
    }

    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self.0.as_ref())
    }
}

/// How a message queued alone in a mailbox fared (`send`, and `send_many` past the room it
/// knows of).
enum Alone {
    Queued { room: usize },
    Refused(Error),
    AskNode(Bytes),
}

/// Messages a receiving half takes from the node at once (beyond the one it returns), so that a
/// reader of a busy flow locks the node once per batch rather than once per message.
const RECV_BATCH: usize = 64;

const OPEN: u8 = 0;
const FINISHED: u8 = 1;
const RESET: u8 = 2;

pub(crate) enum Route<R: Runtime> {
    /// Over QUIC, through the node; messages pass through the flow's mailbox while it is plainly
    /// open (none if it was no longer open when the handle was made).
    Remote {
        fabric: Fabric<R>,
        id: FlowId,
        mailbox: Option<Arc<Mailbox>>,
    },
    /// In-process; the fabric handle (only held, never read) keeps the node running while the
    /// flow exists.
    Local(LocalEnd, #[allow(dead_code)] Fabric<R>),
}

/// One attempt to queue the message in `slot` in a remote flow's mailbox: `Pending` while the
/// flow's buffer is full (the message stays in `slot`), else how it went.
#[inline]
fn poll_mailbox(
    mailbox: &Arc<Mailbox>,
    wakeup: &Wakeup,
    cx: &mut Context<'_>,
    slot: &mut Option<Bytes>,
) -> Poll<Alone> {
    let Some(message) = slot.take() else {
        return Poll::Ready(Alone::Queued { room: 0 });
    };
    Poll::Ready(match mailbox.stage(cx, wakeup, message) {
        Staged::Queued { room } => Alone::Queued { room },
        Staged::Full(message) => {
            *slot = Some(message);
            return Poll::Pending;
        }
        Staged::TooLarge { size, limit } => {
            Alone::Refused(FlowError::MessageTooLarge { size, limit }.into())
        }
        Staged::AskNode(message) => Alone::AskNode(message),
    })
}

/// What both halves of a flow share; dropping the last half ends the flow as documented on
/// [`Flow`].
pub(crate) struct FlowCore<R: Runtime> {
    route: Route<R>,
    /// OPEN, FINISHED (our sending side) or RESET.
    state: AtomicU8,
    /// The node was told that the reader takes batches (`recv_many`).
    batched: AtomicBool,
}

impl<R: Runtime> Drop for FlowCore<R> {
    fn drop(&mut self) {
        let state = self.state.load(Ordering::Acquire);
        match &self.route {
            Route::Remote { fabric, id, .. } => {
                let gone = match state {
                    OPEN => HandlesGone::Open,
                    FINISHED => HandlesGone::Finished,
                    _ => HandlesGone::Reset,
                };
                // The driver tells the node in its next round (see `Inner::hand_over_gone_flows`).
                fabric.shared.wakeup.handles_gone(*id, gone);
            }
            Route::Local(end, _) => match state {
                OPEN => {
                    let _ = end.reset(ResetCode::Dropped);
                }
                FINISHED => end.release(),
                _ => {}
            },
        }
    }
}

impl<R: Runtime> FlowCore<R> {
    pub(crate) fn new(route: Route<R>) -> Arc<Self> {
        Arc::new(Self {
            route,
            state: AtomicU8::new(OPEN),
            batched: AtomicBool::new(false),
        })
    }

    /// Tells the node, once, that this flow's reader takes its messages in batches: it then
    /// queues received chunks as runs of frames, which the batch cuts into messages.
    fn read_in_batches(&self) {
        if self.batched.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Route::Remote { fabric, id, .. } = &self.route {
            let id = *id;
            fabric.with(|inner, _| inner.node.flow_let_reader_cut(id));
        }
    }

    fn is_local(&self) -> bool {
        matches!(self.route, Route::Local(..))
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        message: &mut Option<Message>,
    ) -> Poll<Result<(), Error>> {
        match &self.route {
            Route::Local(end, _) => end.poll_send(cx, message),
            Route::Remote {
                fabric,
                id,
                mailbox,
            } => {
                let mut slot = match message.take() {
                    None => return Poll::Ready(Ok(())),
                    Some(Message::Bytes(b)) => Some(b),
                    Some(value) => Some(value.into_bytes()?),
                };
                if let Some(mailbox) = mailbox {
                    let wakeup = &fabric.shared.wakeup;
                    match poll_mailbox(mailbox, wakeup, cx, &mut slot) {
                        Poll::Ready(Alone::Queued { .. }) => return Poll::Ready(Ok(())),
                        Poll::Ready(Alone::Refused(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Alone::AskNode(m)) => slot = Some(m),
                        Poll::Pending => {
                            *message = slot.map(Message::Bytes);
                            return Poll::Pending;
                        }
                    }
                }
                let Some(bytes) = slot else {
                    return Poll::Ready(Ok(()));
                };
                let mut inner = fabric.shared.lock();
                let now = inner.now();
                if let Some(mailbox) = mailbox {
                    mailbox.hand_over(&mut inner.node, now);
                }
                // Queued only: the driver builds packets on its next wake, so a burst of small
                // messages shares packets.
                let r = inner.node.send(*id, bytes.clone());
                inner.wake_driver();
                match r {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(FlowError::WouldBlock) if !inner.shutdown => {
                        *message = Some(Message::Bytes(bytes));
                        inner.wait_flow(*id, cx);
                        Poll::Pending
                    }
                    Err(_) if inner.shutdown => Poll::Ready(Err(Error::Shutdown)),
                    Err(e) => Poll::Ready(Err(e.into())),
                }
            }
        }
    }

    /// The next message: from `received` (messages already taken from the node), else from the
    /// node, taking up to [`RECV_BATCH`] more into `received` under the same lock.
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        received: &mut RecvQueue,
    ) -> Poll<Result<Option<Message>, Error>> {
        if let Some(m) = received.pop_front() {
            return Poll::Ready(Ok(Some(Message::Bytes(m))));
        }
        match &self.route {
            Route::Local(end, _) => end.poll_recv(cx, received, RECV_BATCH),
            Route::Remote {
                fabric,
                id,
                mailbox,
            } => {
                if let Some(mailbox) = mailbox {
                    match mailbox.take(cx, &fabric.shared.wakeup, received) {
                        Taken::Message(m) => return Poll::Ready(Ok(Some(Message::Bytes(m)))),
                        Taken::Pending => return Poll::Pending,
                        Taken::AskNode => {}
                    }
                }
                let mut inner = fabric.shared.lock();
                // What the read causes (flow credit for the peer, events) is left to the driver,
                // woken only if there is such work: a reader draining queued messages costs one
                // round of packets, not one per message.
                let now = inner.now();
                if let Some(mailbox) = mailbox {
                    mailbox.hand_over(&mut inner.node, now);
                }
                let r = inner.node.recv_queued(now, *id, received, RECV_BATCH);
                if inner.node.has_pending_work() {
                    inner.wake_driver();
                }
                match r {
                    Ok(Recv::Message(m)) => Poll::Ready(Ok(Some(Message::Bytes(m)))),
                    Ok(Recv::Finished) => Poll::Ready(Ok(None)),
                    Ok(Recv::Pending) | Err(_) if inner.shutdown => {
                        Poll::Ready(Err(Error::Shutdown))
                    }
                    Ok(Recv::Pending) => {
                        inner.wait_flow(*id, cx);
                        Poll::Pending
                    }
                    Err(e) => Poll::Ready(Err(e.into())),
                }
            }
        }
    }

    fn finish(&self) -> Result<(), Error> {
        let r = match &self.route {
            Route::Local(end, _) => end.finish(),
            Route::Remote {
                fabric,
                id,
                mailbox,
            } => {
                let id = *id;
                fabric.with(|inner, now| {
                    if inner.shutdown {
                        return Err(Error::Shutdown);
                    }
                    // Everything sent before, then the end.
                    if let Some(mailbox) = mailbox {
                        mailbox.hand_over(&mut inner.node, now);
                        mailbox.close_outbox();
                    }
                    inner.node.finish(id).map_err(Error::from)
                })
            }
        };
        if r.is_ok() {
            let _ =
                self.state
                    .compare_exchange(OPEN, FINISHED, Ordering::AcqRel, Ordering::Acquire);
        }
        r
    }

    /// A last message and the end under one lock of the node (a request's reply): `Err` gives
    /// the message back if this is not a remote flow or it has no room for it now, and the
    /// caller sends and finishes the usual way.
    fn send_last(&self, message: Bytes) -> Result<Result<(), Error>, Bytes> {
        let Route::Remote {
            fabric,
            id,
            mailbox,
        } = &self.route
        else {
            return Err(message);
        };
        let mut inner = fabric.shared.lock();
        if inner.shutdown {
            return Ok(Err(Error::Shutdown));
        }
        let now = inner.now();
        if let Some(mailbox) = mailbox {
            mailbox.hand_over(&mut inner.node, now);
        }
        match inner.node.send(*id, message.clone()) {
            Ok(()) => {}
            Err(FlowError::WouldBlock) => return Err(message),
            Err(e) => return Ok(Err(e.into())),
        }
        if let Some(mailbox) = mailbox {
            mailbox.close_outbox();
        }
        let r = inner.node.finish(*id).map_err(Error::from);
        inner.wake_driver();
        drop(inner);
        if r.is_ok() {
            let _ =
                self.state
                    .compare_exchange(OPEN, FINISHED, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(r)
    }

    fn reset(&self, code: u32) -> Result<(), Error> {
        self.state.store(RESET, Ordering::Release);
        match &self.route {
            Route::Local(end, _) => end.reset(ResetCode::Application(code)),
            Route::Remote {
                fabric,
                id,
                mailbox,
            } => {
                let id = *id;
                if let Some(mailbox) = mailbox {
                    mailbox.close();
                }
                fabric.with(|inner, _| {
                    if inner.shutdown {
                        return Err(Error::Shutdown);
                    }
                    inner.node.reset(id, code).map_err(Error::from)
                })
            }
        }
    }

    fn stats(&self) -> Option<FlowStats> {
        match &self.route {
            Route::Local(end, _) => end.stats(),
            Route::Remote {
                fabric,
                id,
                mailbox,
            } => {
                let mut inner = fabric.shared.lock();
                let now = inner.now();
                let Some(mailbox) = mailbox else {
                    return inner.node.flow_stats(*id);
                };
                mailbox.hand_over(&mut inner.node, now);
                let mut stats = inner.node.flow_stats(*id)?;
                mailbox.adjust_stats(&mut stats);
                Some(stats)
            }
        }
    }
}

/// An ordered, back-pressured, bidirectional message channel to an endpoint.
///
/// The same type serves both cases: when the endpoint lives on this node the flow is an
/// in-process bounded channel (no network, no serialization); otherwise it is a QUIC stream. The
/// semantics are identical: messages arrive in order, `send` waits while the other side is not
/// reading ([`FlowLimits`](crate::flow::FlowLimits) bounds each direction), [`finish`](Self::finish)
/// ends this direction after everything sent was delivered, [`reset`](Self::reset) aborts both.
///
/// # Dropping
///
/// - Dropping a flow that was neither finished nor reset aborts it: the other side's next
///   `recv` or `send` fails with `FlowError::Reset { code: ResetCode::Dropped }`.
/// - Dropping a finished flow keeps delivering what it sent; what the other side sends from then
///   on is discarded, and the flow ends when the other side finishes.
/// - A flow split into halves ([`split`](Self::split)) is dropped when both halves are.
///
/// ```no_run
/// # async fn demo<R: grinta_proto::fabric::Runtime>(fabric: grinta_proto::fabric::Fabric<R>) -> Result<(), grinta_proto::fabric::Error> {
/// let mut flow = fabric.dial("greeter").await?;
/// flow.send("hello").await?;
/// flow.finish().await?;
/// while let Some(reply) = flow.recv().await? {
///     println!("{reply:?}");
/// }
/// # Ok(()) }
/// ```
pub struct Flow<R: Runtime> {
    /// The sending half; receiving goes through the same core.
    tx: FlowSender<R>,
    /// The node at the other end.
    peer: String,
    /// Messages taken from the node, not yet returned.
    received: RecvQueue,
}

impl<R: Runtime> std::fmt::Debug for Flow<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("local", &self.is_local())
            .finish_non_exhaustive()
    }
}

fn message_bytes(m: Option<Message>) -> Result<Option<Bytes>, Error> {
    Ok(m.map(Message::into_bytes).transpose()?)
}

/// Every message received so far (waiting for one if there is none), for both a whole flow and
/// its receiving half.
async fn recv_messages<R: Runtime>(
    core: &FlowCore<R>,
    received: &mut RecvQueue,
) -> Result<Option<Messages>, Error> {
    core.read_in_batches();
    if received.is_empty() {
        match message_bytes(poll_fn(|cx| core.poll_recv(cx, received)).await?)? {
            None => return Ok(None),
            Some(first) => received.push_front(first),
        }
    }
    Ok(Some(Messages {
        queue: std::mem::take(received),
    }))
}

/// A batch of received messages, in order (see [`Flow::recv_many`]). [`iter`](Self::iter)
/// reads them in place, as borrowed slices; iterating the batch by value gives each as
/// `Bytes` (a reference into the received data, not a copy).
///
/// ```
/// # fn demo(batch: grinta_proto::fabric::Messages) {
/// let total: usize = batch.iter().map(<[u8]>::len).sum();
/// for message in batch {
///     let _owned: bytes::Bytes = message;
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Messages {
    queue: RecvQueue,
}

impl Messages {
    /// How many messages the batch holds (at least one).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether the batch is empty (a batch from `recv_many` never is).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Their payload bytes, length prefixes not counted.
    pub fn bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// The messages in order, borrowed: no reference counting and no allocation per message.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.queue.iter()
    }
}

impl IntoIterator for Messages {
    type Item = Bytes;
    type IntoIter = MessagesIntoIter;

    fn into_iter(self) -> MessagesIntoIter {
        MessagesIntoIter { queue: self.queue }
    }
}

/// The messages of a [`Messages`] batch by value, as `Bytes`.
#[derive(Debug)]
pub struct MessagesIntoIter {
    queue: RecvQueue,
}

impl Iterator for MessagesIntoIter {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        self.queue.pop_front()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.queue.len(), Some(self.queue.len()))
    }
}

impl ExactSizeIterator for MessagesIntoIter {}

/// The next message as bytes, for both a whole flow and its receiving half.
async fn recv_bytes<R: Runtime>(
    core: &FlowCore<R>,
    received: &mut RecvQueue,
) -> Result<Option<Bytes>, Error> {
    // Messages already taken from the mailbox are plain bytes.
    if let Some(m) = received.pop_front() {
        return Ok(Some(m));
    }
    message_bytes(poll_fn(|cx| core.poll_recv(cx, received)).await?)
}

impl<R: Runtime> Flow<R> {
    pub(crate) fn new(route: Route<R>, peer: String) -> Self {
        Self {
            peer,
            tx: FlowSender {
                core: FlowCore::new(route),
                pending: None,
            },
            received: RecvQueue::default(),
        }
    }

    /// Whether the other end is in this process (an in-process channel rather than QUIC).
    pub fn is_local(&self) -> bool {
        self.tx.core.is_local()
    }

    /// Records that the node already finished this flow's sending side (a request's open
    /// carried its end): dropping the handle then releases the flow rather than resetting it.
    pub(crate) fn finished_by_node(&self) {
        let _ = self.tx.core.state.compare_exchange(
            OPEN,
            FINISHED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The name of the node at the other end: the dialler for an accepted flow, the owner for
    /// a dialled one (this node's own name for an in-process flow). A remote peer's name is
    /// the one its certificate proves.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one message, waiting while the flow's buffer towards the other side is full.
    ///
    /// Cancel safety: dropping the future before it completes sends nothing; the flow stays
    /// usable.
    ///
    /// Fails with `FlowError::MessageTooLarge` (the flow stays usable) if the message exceeds
    /// the receiving node's `max_message_size`, `FlowError::Finished` after
    /// [`finish`](Self::finish), `FlowError::Reset` if either side reset the flow,
    /// `FlowError::PeerGone` / `ConnectionLost` if the other node failed, and
    /// [`Error::Shutdown`] once this fabric is shut down.
    pub async fn send(&mut self, message: impl Into<Bytes>) -> Result<(), Error> {
        self.tx.send(message).await
    }

    /// Sends a batch of messages, in order, as if by [`send`](Self::send) one after the other,
    /// but cheaper: over QUIC, small messages are framed into 16 KiB chunks by the calling task,
    /// outside any lock, and each chunk is queued at once, rather than one message at a time.
    /// Use it when messages come in batches (a drained queue, a page of rows); small messages
    /// sent one by one are still packed into shared packets.
    ///
    /// Cancel safety: dropping the future may leave a prefix of the batch sent and the rest not.
    /// On an error, the messages before the failing one were sent and none after it; the error
    /// is the one [`send`](Self::send) would give for that message.
    ///
    /// ```no_run
    /// # async fn demo<R: grinta_proto::fabric::Runtime>(fabric: grinta_proto::fabric::Fabric<R>) -> Result<(), grinta_proto::fabric::Error> {
    /// let mut flow = fabric.dial("metrics-sink").await?;
    /// let batch: Vec<bytes::Bytes> = (0..1000u32).map(|i| i.to_be_bytes().to_vec().into()).collect();
    /// flow.send_many(batch).await?;
    /// flow.finish().await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_many<I>(&mut self, messages: I) -> Result<(), Error>
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        self.tx.send_many(messages).await
    }

    /// Sends copies of a batch of messages the caller keeps, in order, as
    /// [`send_many`](Self::send_many) does (same cancel safety, same errors): for messages
    /// written into a buffer the caller reuses, or held in a batch it still needs. Each message
    /// is copied, into the flow's buffer if it is small, so no `Bytes` is made or dropped per
    /// message; a large message the caller owns costs no copy through `send_many`.
    ///
    /// ```no_run
    /// # async fn demo<R: grinta_proto::fabric::Runtime>(fabric: grinta_proto::fabric::Fabric<R>) -> Result<(), grinta_proto::fabric::Error> {
    /// let mut flow = fabric.dial("metrics-sink").await?;
    /// let rows: Vec<[u8; 16]> = (0..1000u128).map(u128::to_be_bytes).collect();
    /// flow.send_many_copied(&rows).await?;
    /// flow.finish().await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_many_copied<I>(&mut self, messages: I) -> Result<(), Error>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        self.tx.send_many_copied(messages).await
    }

    /// Receives the next message; `Ok(None)` once the other side finished and everything it sent
    /// was read.
    ///
    /// Cancel safety: dropping the future loses no message (what it took from the flow stays
    /// in the flow for the next `recv`), so it can sit in a `select!` loop.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, Error> {
        recv_bytes(&self.tx.core, &mut self.received).await
    }

    /// Receives every message that arrived and was not read yet, at least one (waiting for it
    /// as [`recv`](Self::recv) does); `Ok(None)` once the other side finished and everything
    /// was read. Mixes freely with `recv`, and keeps the order.
    ///
    /// For a reader of many small messages: once a flow was read with `recv_many`, the node
    /// keeps received data as it arrived and the batch cuts it into messages as they are read
    /// ([`Messages::iter`] borrows them, without a reference count or allocation each), rather
    /// than the node cutting each message on arrival. A reader that takes one message at a
    /// time is better served by `recv`.
    ///
    /// Cancel safety: as `recv`, no message is lost if the future is dropped.
    ///
    /// ```no_run
    /// # async fn demo<R: grinta_proto::fabric::Runtime>(fabric: grinta_proto::fabric::Fabric<R>) -> Result<(), grinta_proto::fabric::Error> {
    /// let mut flow = fabric.dial("metrics-source").await?;
    /// let mut bytes = 0;
    /// while let Some(batch) = flow.recv_many().await? {
    ///     for message in batch.iter() {
    ///         bytes += message.len();
    ///     }
    /// }
    /// println!("{bytes} bytes received");
    /// # Ok(()) }
    /// ```
    pub async fn recv_many(&mut self) -> Result<Option<Messages>, Error> {
        recv_messages(&self.tx.core, &mut self.received).await
    }

    /// Finishes the sending direction: everything sent is delivered, then the other side reads
    /// the end (`Ok(None)`). Receiving continues until the other side finishes too.
    ///
    /// Cancel safety: dropping the future before it completes leaves the flow unfinished (a
    /// message a cancelled `Sink` send left behind may have been sent); call it again.
    pub async fn finish(&mut self) -> Result<(), Error> {
        self.tx.finish().await
    }

    /// Sends `message` and finishes (a request's reply and its end): as `send` then `finish`,
    /// cheaper.
    pub(crate) async fn send_and_finish(&mut self, message: Bytes) -> Result<(), Error> {
        self.tx.send_and_finish(message).await
    }

    /// Aborts the flow both ways with an application `code`; the other side sees
    /// `FlowError::Reset { code: ResetCode::Application(code) }`.
    pub fn reset(&mut self, code: u32) -> Result<(), Error> {
        self.tx.reset(code)
    }

    /// Counters (messages and bytes each way) and buffer levels; `None` once the flow ended.
    pub fn stats(&self) -> Option<FlowStats> {
        self.tx.core.stats()
    }

    /// Splits the flow into a sending and a receiving half, usable from two tasks.
    ///
    /// ```no_run
    /// # async fn demo<R: grinta_proto::fabric::Runtime>(flow: grinta_proto::fabric::Flow<R>) -> Result<(), grinta_proto::fabric::Error> {
    /// let (mut tx, mut rx) = flow.split();
    /// let reader = async move {
    ///     while let Some(m) = rx.recv().await? {
    ///         println!("{m:?}");
    ///     }
    ///     Ok::<_, grinta_proto::fabric::Error>(())
    /// };
    /// tx.send("ping").await?;
    /// tx.finish().await?;
    /// reader.await?;
    /// # Ok(()) }
    /// ```
    pub fn split(self) -> (FlowSender<R>, FlowReceiver<R>) {
        let core = self.tx.core.clone();
        (
            self.tx,
            FlowReceiver {
                core,
                received: self.received,
            },
        )
    }

    /// This flow, carrying values of `T` encoded with `codec`. Over an in-process flow values are
    /// moved, never encoded.
    ///
    /// ```no_run
    /// # async fn demo<R: grinta_proto::fabric::Runtime>(flow: grinta_proto::fabric::Flow<R>) -> Result<(), grinta_proto::fabric::Error> {
    /// use grinta_proto::codec::ProstCodec;
    /// use grinta_proto::wire::Ack;
    ///
    /// let mut acks = flow.typed(ProstCodec::<Ack>::default());
    /// acks.send(Ack { seq_no: 1 }).await?;
    /// let reply: Option<Ack> = acks.recv().await?;
    /// # Ok(()) }
    /// ```
    pub fn typed<T, C>(self, codec: C) -> TypedFlow<R, T, C>
    where
        T: Send + 'static,
        C: Codec<T> + 'static,
    {
        TypedFlow::new(self, codec)
    }
}

fn poll_stream<R: Runtime>(
    core: &FlowCore<R>,
    received: &mut RecvQueue,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, Error>>> {
    core.poll_recv(cx, received).map(|r| match r {
        Ok(Some(m)) => Some(m.into_bytes().map_err(Error::from)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    })
}

/// Messages of the flow, until the other side finishes (`None`) or the flow fails (an `Err`
/// item).
impl<R: Runtime> Stream for Flow<R> {
    type Item = Result<Bytes, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        poll_stream(&this.tx.core, &mut this.received, cx)
    }
}

/// `poll_ready` waits for room, `poll_close` finishes the flow (see [`FlowSender`]).
impl<R: Runtime> Sink<Bytes> for Flow<R> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Bytes) -> Result<(), Error> {
        Pin::new(&mut self.get_mut().tx).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_close(cx)
    }
}

/// The sending half of a [`Flow`] (see [`Flow::split`]). Also a [`Sink`] of `Bytes`: an item
/// given to `start_send` is handed to the flow by the next `poll_ready`, `poll_flush` or
/// `poll_close` (which also finishes the flow); an item still held when the sender is dropped is
/// lost, as with any `Sink`.
pub struct FlowSender<R: Runtime> {
    core: Arc<FlowCore<R>>,
    /// An item given to [`Sink::start_send`] and not yet accepted by the flow.
    pending: Option<Message>,
}

impl<R: Runtime> std::fmt::Debug for FlowSender<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowSender")
            .field("local", &self.core.is_local())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> FlowSender<R> {
    /// Whether the other end is in this process.
    pub fn is_local(&self) -> bool {
        self.core.is_local()
    }

    /// Sends one message (see [`Flow::send`]; cancel safe the same way).
    pub async fn send(&mut self, message: impl Into<Bytes>) -> Result<(), Error> {
        self.send_many(std::iter::once(message)).await
    }

    /// Sends a batch of messages in order (see [`Flow::send_many`]).
    pub async fn send_many<I>(&mut self, messages: I) -> Result<(), Error>
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        self.send_outgoing(messages.into_iter().map(Into::into))
            .await
    }

    /// Sends copies of a batch of borrowed messages in order (see [`Flow::send_many_copied`]).
    pub async fn send_many_copied<I>(&mut self, messages: I) -> Result<(), Error>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        self.send_outgoing(messages.into_iter().map(Copied)).await
    }

    async fn send_outgoing<M: Outgoing>(
        &mut self,
        mut rest: impl Iterator<Item = M>,
    ) -> Result<(), Error> {
        let mut left = VecDeque::new();
        if let (
            None,
            Route::Remote {
                fabric,
                mailbox: Some(mailbox),
                ..
            },
        ) = (&self.pending, &self.core.route)
        {
            // The data path of an open remote flow: straight into its mailbox. Messages are
            // framed into `staged` outside any lock, as many as fit the room the mailbox last
            // reported (only this sender adds, so that room is still there), then handed over
            // under the mailbox's lock in a few chunks: the lock is held for a moment, so the
            // driver taking the queue rarely waits for it. The caller's iterator never runs
            // under the lock (it may call into the fabric). A message that does not fit the
            // room known goes alone, waiting for room if need be, which also learns the room:
            // a lone message (`send`) takes that path and allocates nothing.
            let wakeup = &fabric.shared.wakeup;
            let limit = mailbox.peer_max_message();
            let mut staged = SendQueue::for_staging();
            let mut room = 0;
            let mut next = None;
            loop {
                let budget = room.min(STAGE_BYTES);
                let (mut messages, mut bytes) = (0u64, 0u64);
                while let Some(message) = next.take().or_else(|| rest.next()) {
                    let len = message.len();
                    if len as u64 > limit || staged.len() + framing::framed_len(len) > budget {
                        next = Some(message);
                        break;
                    }
                    messages += 1;
                    bytes += len as u64;
                    message.stage(&mut staged);
                }
                if messages > 0 {
                    match mailbox.commit(wakeup, &mut staged, messages, bytes) {
                        Committed::Queued { room: r } => room = r,
                        Committed::Closed => {
                            // Not plainly open: the node decides, for these and the rest.
                            left = std::mem::take(&mut staged).into_messages();
                            left.extend(next.map(Outgoing::into_bytes));
                            break;
                        }
                    }
                    continue;
                }
                let Some(message) = next.take() else {
                    return Ok(());
                };
                let mut one = Some(message.into_bytes());
                let stopped = poll_fn(|cx| poll_mailbox(mailbox, wakeup, cx, &mut one)).await;
                match stopped {
                    Alone::Queued { room: r } => room = r,
                    Alone::Refused(e) => return Err(e),
                    // Not plainly open: the general path asks the node, for this one and the
                    // rest.
                    Alone::AskNode(message) => {
                        left.push_back(message);
                        break;
                    }
                }
            }
        }
        for message in left.into_iter().chain(rest.map(Outgoing::into_bytes)) {
            self.send_message(Message::Bytes(message)).await?;
        }
        Ok(())
    }

    async fn send_message(&mut self, message: Message) -> Result<(), Error> {
        // What a cancelled `Sink` send left goes first.
        if self.pending.is_some() {
            self.flush_pending().await?;
        }
        let mut slot = Some(message);
        poll_fn(|cx| self.core.poll_send(cx, &mut slot)).await
    }

    async fn flush_pending(&mut self) -> Result<(), Error> {
        let core = &self.core;
        let pending = &mut self.pending;
        poll_fn(|cx| core.poll_send(cx, pending)).await
    }

    /// Finishes the sending direction (see [`Flow::finish`]; cancel safe the same way).
    pub async fn finish(&mut self) -> Result<(), Error> {
        self.flush_pending().await?;
        self.core.finish()
    }

    /// Sends `message` and finishes, as `send` then `finish` would; on an open remote flow with
    /// room for it, both under one lock of the node.
    pub(crate) async fn send_and_finish(&mut self, message: Bytes) -> Result<(), Error> {
        let message = if self.pending.is_none() {
            match self.core.send_last(message) {
                Ok(done) => return done,
                Err(message) => message,
            }
        } else {
            message
        };
        self.send(message).await?;
        self.finish().await
    }

    /// Aborts the flow both ways (see [`Flow::reset`]).
    pub fn reset(&mut self, code: u32) -> Result<(), Error> {
        self.pending = None;
        self.core.reset(code)
    }

    /// Counters and buffer levels of the whole flow.
    pub fn stats(&self) -> Option<FlowStats> {
        self.core.stats()
    }
}

impl<R: Runtime> Sink<Bytes> for FlowSender<R> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        this.core.poll_send(cx, &mut this.pending)
    }

    fn start_send(self: Pin<&mut Self>, item: Bytes) -> Result<(), Error> {
        self.get_mut().pending = Some(Message::Bytes(item));
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        this.core.poll_send(cx, &mut this.pending)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        match this.core.poll_send(cx, &mut this.pending) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        if this.core.state.load(Ordering::Acquire) == FINISHED {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(this.core.finish())
    }
}

/// The receiving half of a [`Flow`] (see [`Flow::split`]). Also a [`Stream`] of messages.
pub struct FlowReceiver<R: Runtime> {
    core: Arc<FlowCore<R>>,
    /// Messages taken from the node, not yet returned.
    received: RecvQueue,
}

impl<R: Runtime> std::fmt::Debug for FlowReceiver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowReceiver")
            .field("local", &self.core.is_local())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> FlowReceiver<R> {
    /// Whether the other end is in this process.
    pub fn is_local(&self) -> bool {
        self.core.is_local()
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, Error>> {
        self.core.poll_recv(cx, &mut self.received)
    }

    /// Receives the next message (see [`Flow::recv`]; cancel safe the same way).
    pub async fn recv(&mut self) -> Result<Option<Bytes>, Error> {
        recv_bytes(&self.core, &mut self.received).await
    }

    /// Receives every message not read yet, at least one (see [`Flow::recv_many`]; cancel safe
    /// the same way).
    pub async fn recv_many(&mut self) -> Result<Option<Messages>, Error> {
        recv_messages(&self.core, &mut self.received).await
    }

    /// Counters and buffer levels of the whole flow.
    pub fn stats(&self) -> Option<FlowStats> {
        self.core.stats()
    }
}

impl<R: Runtime> Stream for FlowReceiver<R> {
    type Item = Result<Bytes, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        poll_stream(&this.core, &mut this.received, cx)
    }
}

/// Encodes a boxed `T` with `C`: how an in-process value becomes bytes when its receiver wants
/// bytes or another type.
struct CodecEncoder<T, C> {
    codec: Arc<C>,
    _values: PhantomData<fn(T)>,
}

impl<T: Send + 'static, C: Codec<T> + 'static> ErasedEncode for CodecEncoder<T, C> {
    fn encode(&self, value: &(dyn Any + Send)) -> Result<Bytes, CodecError> {
        match value.downcast_ref::<T>() {
            Some(v) => self.codec.encode(v),
            None => Err(CodecError::encode::<T>("the value is of another type")),
        }
    }
}

/// A [`Flow`] carrying values of `T`, encoded by a [`Codec`] over the network and moved as they
/// are in-process. A message that is not a `T` is [`Error::Codec`] naming the type; the flow stays
/// usable. Like a [`Flow`] it splits into halves ([`split`](Self::split)) and is a [`Stream`] of
/// values and a [`Sink`] of values.
///
/// ```no_run
/// # async fn demo<R: grinta_proto::fabric::Runtime>(flow: grinta_proto::fabric::Flow<R>) -> Result<(), grinta_proto::fabric::Error> {
/// use futures::{SinkExt, StreamExt};
/// use grinta_proto::codec::ProstCodec;
/// use grinta_proto::wire::Ack;
///
/// let (mut tx, mut rx) = flow.typed(ProstCodec::<Ack>::new()).split();
/// tx.send(Ack { seq_no: 1 }).await?; // `SinkExt::send`
/// tx.close().await?; // finishes our direction
/// while let Some(ack) = rx.next().await {
///     println!("{}", ack?.seq_no);
/// }
/// # Ok(()) }
/// ```
pub struct TypedFlow<R: Runtime, T, C> {
    tx: TypedSender<R, T, C>,
    rx: TypedReceiver<R, T, C>,
    peer: String,
}

impl<R: Runtime, T, C> std::fmt::Debug for TypedFlow<R, T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedFlow")
            .field("local", &self.tx.tx.core.is_local())
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> TypedFlow<R, T, C> {
    pub(crate) fn new(flow: Flow<R>, codec: C) -> Self {
        let codec = Arc::new(codec);
        let Flow { tx, received, peer } = flow;
        let core = tx.core.clone();
        Self {
            peer,
            tx: TypedSender {
                tx,
                encoder: Arc::new(CodecEncoder::<T, C> {
                    codec: codec.clone(),
                    _values: PhantomData,
                }),
                codec: codec.clone(),
                _values: PhantomData,
            },
            rx: TypedReceiver {
                rx: FlowReceiver { core, received },
                codec,
                _values: PhantomData,
            },
        }
    }

    /// Whether the other end is in this process (values are then moved, never encoded).
    pub fn is_local(&self) -> bool {
        self.tx.is_local()
    }

    /// The node at the other end (see [`Flow::peer`]).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one value: moved to an in-process receiver, encoded for a remote one.
    ///
    /// Cancel safety: as [`Flow::send`] (dropping the future sends nothing).
    pub async fn send(&mut self, value: T) -> Result<(), Error> {
        self.tx.send(value).await
    }

    /// Receives the next value; `Ok(None)` at the end of the flow.
    ///
    /// Cancel safety: as [`Flow::recv`] (dropping the future loses no value).
    pub async fn recv(&mut self) -> Result<Option<T>, Error> {
        self.rx.recv().await
    }

    /// Finishes the sending direction.
    ///
    /// Cancel safety: as [`Flow::finish`].
    pub async fn finish(&mut self) -> Result<(), Error> {
        self.tx.finish().await
    }

    /// Aborts the flow both ways with an application `code`.
    pub fn reset(&mut self, code: u32) -> Result<(), Error> {
        self.tx.reset(code)
    }

    /// Counters and buffer levels.
    pub fn stats(&self) -> Option<FlowStats> {
        self.tx.stats()
    }

    /// Splits the flow into a sending and a receiving half, usable from two tasks (see
    /// [`Flow::split`]).
    pub fn split(self) -> (TypedSender<R, T, C>, TypedReceiver<R, T, C>) {
        (self.tx, self.rx)
    }

    /// The untyped flow underneath.
    pub fn into_inner(self) -> Flow<R> {
        Flow {
            tx: self.tx.tx,
            received: self.rx.rx.received,
            peer: self.peer,
        }
    }
}

/// Values of the flow, until the other side finishes (`None`) or the flow fails (an `Err`
/// item; a message that is not a `T` is an `Err` and the stream goes on).
impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> Stream for TypedFlow<R, T, C> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().rx).poll_next(cx)
    }
}

/// `poll_ready` waits for room, `poll_close` finishes the flow (see [`FlowSender`]).
impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> Sink<T> for TypedFlow<R, T, C> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<(), Error> {
        Pin::new(&mut self.get_mut().tx).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_close(cx)
    }
}

/// The sending half of a [`TypedFlow`] (see [`TypedFlow::split`]); also a [`Sink`] of values,
/// with the semantics of [`FlowSender`]'s.
pub struct TypedSender<R: Runtime, T, C> {
    tx: FlowSender<R>,
    codec: Arc<C>,
    encoder: Arc<dyn ErasedEncode>,
    _values: PhantomData<fn(T)>,
}

impl<R: Runtime, T, C> std::fmt::Debug for TypedSender<R, T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSender")
            .field("local", &self.tx.core.is_local())
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> TypedSender<R, T, C> {
    /// The message `value` travels as: the value itself in-process, its encoding otherwise.
    fn message(&self, value: T) -> Result<Message, Error> {
        if self.tx.core.is_local() {
            Ok(Message::Value {
                value: Box::new(value),
                encoder: self.encoder.clone(),
            })
        } else {
            Ok(Message::Bytes(self.codec.encode(&value)?))
        }
    }

    /// Whether the other end is in this process.
    pub fn is_local(&self) -> bool {
        self.tx.core.is_local()
    }

    /// Sends one value (see [`TypedFlow::send`]; cancel safe the same way).
    pub async fn send(&mut self, value: T) -> Result<(), Error> {
        let message = self.message(value)?;
        self.tx.send_message(message).await
    }

    /// Finishes the sending direction (see [`Flow::finish`]).
    pub async fn finish(&mut self) -> Result<(), Error> {
        self.tx.finish().await
    }

    /// Aborts the flow both ways (see [`Flow::reset`]).
    pub fn reset(&mut self, code: u32) -> Result<(), Error> {
        self.tx.reset(code)
    }

    /// Counters and buffer levels of the whole flow.
    pub fn stats(&self) -> Option<FlowStats> {
        self.tx.stats()
    }
}

impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> Sink<T> for TypedSender<R, T, C> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<(), Error> {
        let this = self.get_mut();
        this.tx.pending = Some(this.message(item)?);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_close(cx)
    }
}

/// The receiving half of a [`TypedFlow`] (see [`TypedFlow::split`]); also a [`Stream`] of
/// values.
pub struct TypedReceiver<R: Runtime, T, C> {
    rx: FlowReceiver<R>,
    codec: Arc<C>,
    _values: PhantomData<fn() -> T>,
}

impl<R: Runtime, T, C> std::fmt::Debug for TypedReceiver<R, T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedReceiver")
            .field("local", &self.rx.core.is_local())
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> TypedReceiver<R, T, C> {
    /// The value a received message holds.
    fn value(&self, message: Message) -> Result<T, Error> {
        match message {
            Message::Bytes(b) => Ok(self.codec.decode(b)?),
            Message::Value { value, encoder } => match value.downcast::<T>() {
                Ok(v) => Ok(*v),
                // A value of another type: what a remote receiver would see is its encoding.
                Err(other) => Ok(self.codec.decode(encoder.encode(&*other)?)?),
            },
        }
    }

    /// Whether the other end is in this process.
    pub fn is_local(&self) -> bool {
        self.rx.core.is_local()
    }

    /// Receives the next value (see [`TypedFlow::recv`]; cancel safe the same way).
    pub async fn recv(&mut self) -> Result<Option<T>, Error> {
        let message = poll_fn(|cx| self.rx.poll_message(cx)).await?;
        message.map(|m| self.value(m)).transpose()
    }

    /// Counters and buffer levels of the whole flow.
    pub fn stats(&self) -> Option<FlowStats> {
        self.rx.stats()
    }
}

impl<R: Runtime, T: Send + 'static, C: Codec<T> + 'static> Stream for TypedReceiver<R, T, C> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.rx
            .poll_message(cx)
            .map(|r| r.transpose().map(|m| m.and_then(|m| this.value(m))))
    }
}
