//! Requests: one message to an endpoint, one reply, in one round trip.
//!
//! A request is a flow whose open, message and end travel together: the dialler writes the
//! `FlowOpen`, the request and the end of its sending side at once, without waiting for the
//! owner's answer. On an open connection the owner thus has all of it after half a round trip,
//! and its `FlowAccept`, reply and end come back together: one round trip in all, against two
//! for a dial followed by an exchange. The owner sees an ordinary flow (`accept`, `recv`,
//! `send`, `finish`); [`Endpoint::into_requests`] makes serving them a loop of a few lines.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;

use super::{Endpoint, Error, Fabric, Flow, Runtime};
use crate::codec::Codec;
use crate::flow::FlowError;
use crate::node::Node;

/// Requests read at once by one [`Requests`] stream before it yields them; beyond it, new
/// flows wait in the endpoint's accept backlog until reads complete.
pub const MAX_REQUESTS_READING: usize = 256;

/// One request received by an endpoint: its message, and the flow to answer on.
///
/// Answer it with [`respond`](Self::respond); dropping it unanswered resets the flow, and the
/// requester gets an error.
pub struct Request<R: Runtime> {
    flow: Flow<R>,
    payload: Bytes,
}

impl<R: Runtime> std::fmt::Debug for Request<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("from", &self.flow.peer())
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Request<R> {
    /// The node that asks.
    pub fn from(&self) -> &str {
        self.flow.peer()
    }

    /// The request's message.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The request's message decoded with `codec` ([`Error::Codec`] if it is not a `T`).
    pub fn decode<T>(&self, codec: &impl Codec<T>) -> Result<T, Error> {
        Ok(codec.decode(self.payload.clone())?)
    }

    /// Answers: the reply and the end of the flow travel together. Fails like a flow's `send`
    /// (the requester gave up, its node failed; `FlowError::MessageTooLarge` for a reply beyond
    /// its `max_message_size`).
    pub async fn respond(mut self, reply: impl Into<Bytes>) -> Result<(), Error> {
        self.flow.send_and_finish(reply.into()).await
    }

    /// Answers with `reply` encoded by `codec`.
    pub async fn respond_with<T>(self, reply: &T, codec: &impl Codec<T>) -> Result<(), Error> {
        let reply = codec.encode(reply)?;
        self.respond(reply).await
    }

    /// The flow underneath, to answer with more than one message (or read more).
    pub fn into_flow(self) -> (Flow<R>, Bytes) {
        (self.flow, self.payload)
    }
}

type Reading<R> = Pin<Box<dyn Future<Output = Option<Request<R>>> + Send>>;

/// The requests sent to an endpoint, as a stream: made by [`Endpoint::into_requests`].
///
/// Each flow the endpoint accepts is read until its first message, at most
/// [`MAX_REQUESTS_READING`] at once (the others wait in the accept backlog), and yielded as a [`Request`] once that message is there
/// (a flow that ends before it is skipped). The stream ends when the endpoint does (the fabric
/// shuts down; [`Error::NameConflict`] for an exclusive name lost to another node is its last
/// item).
pub struct Requests<R: Runtime> {
    endpoint: Option<Endpoint<R>>,
    reading: Vec<Reading<R>>,
    /// The error that ended the endpoint, yielded once.
    ended: Option<Error>,
}

impl<R: Runtime> std::fmt::Debug for Requests<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("endpoint", &self.endpoint.as_ref().map(Endpoint::name))
            .field("reading", &self.reading.len())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Requests<R> {
    pub(super) fn new(endpoint: Endpoint<R>) -> Self {
        Self {
            endpoint: Some(endpoint),
            reading: Vec::new(),
            ended: None,
        }
    }

    /// The fabric the endpoint belongs to, while it is open.
    pub(super) fn fabric(&self) -> Option<&Fabric<R>> {
        self.endpoint.as_ref().map(|e| &e.fabric)
    }
}

impl<R: Runtime> Stream for Requests<R> {
    type Item = Result<Request<R>, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // Beyond MAX_REQUESTS_READING, flows wait in the endpoint's accept backlog (bounded
            // by `accept_backlog`): a finished read frees a slot, and this loop accepts again.
            while this.reading.len() < MAX_REQUESTS_READING {
                let Some(endpoint) = &this.endpoint else {
                    break;
                };
                match endpoint.poll_accept(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(mut flow)) => {
                        // A requester sends its message with the open: one that sends nothing
                        // within the dial timeout does not keep a slot.
                        let limit = endpoint.fabric.shared.flow_limits.dial_timeout;
                        let deadline = R::sleep_until(super::deadline_after(R::now(), limit));
                        this.reading.push(Box::pin(async move {
                            let payload = {
                                let read = async { flow.recv().await.ok().flatten() };
                                let (mut read, mut deadline) = (pin!(read), pin!(deadline));
                                std::future::poll_fn(|cx| {
                                    if let Poll::Ready(payload) = read.as_mut().poll(cx) {
                                        return Poll::Ready(payload);
                                    }
                                    deadline.as_mut().poll(cx).map(|()| None)
                                })
                                .await?
                            };
                            Some(Request { flow, payload })
                        }));
                    }
                    Poll::Ready(Err(e)) => {
                        this.endpoint = None;
                        if !e.is_shutdown() {
                            this.ended = Some(e);
                        }
                    }
                }
            }
            let was_full = this.reading.len() >= MAX_REQUESTS_READING;
            let mut i = 0;
            while i < this.reading.len() {
                match this.reading[i].as_mut().poll(cx) {
                    Poll::Pending => i += 1,
                    Poll::Ready(request) => {
                        drop(this.reading.swap_remove(i));
                        if let Some(request) = request {
                            return Poll::Ready(Some(Ok(request)));
                        }
                    }
                }
            }
            if let Some(e) = this.ended.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if this.endpoint.is_none() && this.reading.is_empty() {
                return Poll::Ready(None);
            }
            // Slots freed while accepting was skipped: accept again, or no waker would wait
            // on the backlog.
            if was_full && this.reading.len() < MAX_REQUESTS_READING && this.endpoint.is_some() {
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl<R: Runtime> Endpoint<R> {
    /// The requests sent to this endpoint (see [`Fabric::request`]), as a stream of
    /// [`Request`]s to answer.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use futures::StreamExt;
    ///
    /// let mut requests = fabric.endpoint("upper")?.into_requests();
    /// while let Some(request) = requests.next().await {
    ///     let request = request?;
    ///     let reply = request.payload().to_ascii_uppercase();
    ///     let _ = request.respond(reply).await; // the requester may have given up
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_requests(self) -> Requests<R> {
        Requests::new(self)
    }
}

impl<R: Runtime> Fabric<R> {
    /// Sends `message` to endpoint `name` (an exclusive endpoint, or one owner of a group,
    /// picked as [`dial`](Self::dial) does) and returns its reply: the first message the owner
    /// sends back. On an open connection it costs one round trip: the open, the message and
    /// the end travel together, and so do the owner's answer, reply and end.
    ///
    /// Errors: those of [`dial`](Self::dial) (no such endpoint, refused, connection lost...);
    /// `FlowError::RequestTimeout` after `FlowLimits::request_timeout` (10 s;
    /// [`FabricBuilder::request_timeout`](super::FabricBuilder::request_timeout));
    /// `FlowError::NoReply` if the owner ended the flow without a reply; `FlowError::Reset` if
    /// it dropped the request; [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// let reply = fabric.request("upper", "hello").await?;
    /// assert_eq!(&reply[..], b"HELLO");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Cancel safety: dropping the future abandons the request (its flow is reset).
    pub async fn request(&self, name: &str, message: impl Into<Bytes>) -> Result<Bytes, Error> {
        let timeout = self.shared.flow_limits.request_timeout;
        self.request_with_timeout(name, message, timeout).await
    }

    /// Like [`request`](Self::request), waiting at most `timeout`.
    pub async fn request_with_timeout(
        &self,
        name: &str,
        message: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        super::refuse_reserved(name)?;
        let message = message.into();
        let early = message.clone();
        self.request_via(
            name,
            message,
            move |node, now| node.dial_request(now, name, early),
            timeout,
        )
        .await
    }

    /// Like [`request`](Self::request), with the message and the reply encoded by codecs.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use grinta_proto::codec::ProstCodec;
    ///
    /// let codec = ProstCodec::<String>::new();
    /// let reply: String = fabric.request_with("upper", &"hello".to_owned(), &codec, &codec).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn request_with<Q, A>(
        &self,
        name: &str,
        message: &Q,
        encoder: &impl Codec<Q>,
        decoder: &impl Codec<A>,
    ) -> Result<A, Error> {
        let message = encoder.encode(message)?;
        let reply = self.request(name, message).await?;
        Ok(decoder.decode(reply)?)
    }

    /// A request to owner `owner` of `name` (a query's question).
    pub(super) async fn request_owner(
        &self,
        name: &str,
        owner: &str,
        message: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let early = message.clone();
        self.request_via(
            name,
            message,
            move |node, now| node.dial_node_request(now, name, owner, early),
            timeout,
        )
        .await
    }

    async fn request_via(
        &self,
        name: &str,
        message: Bytes,
        dial: impl FnOnce(&mut Node, Instant) -> Result<crate::flow::FlowId, FlowError>,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let exchange = async {
            let mut flow = self.dial_with(name, dial).await?;
            if flow.is_local() {
                // In-process: nothing travelled with the dial.
                flow.send(message).await?;
                flow.finish().await?;
            }
            match flow.recv().await? {
                Some(reply) => {
                    if !flow.is_local() {
                        // The message and the end went with the open: once the reply is read,
                        // the flow is released, not reset (which would cost both nodes a
                        // packet). A request given up before its reply still resets it.
                        flow.finished_by_node();
                    }
                    Ok(reply)
                }
                None => Err(Error::Flow(FlowError::NoReply {
                    endpoint: name.to_owned(),
                })),
            }
        };
        let deadline = R::sleep_until(super::deadline_after(R::now(), timeout));
        let (mut exchange, mut deadline) = (pin!(exchange), pin!(deadline));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = exchange.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Error::Flow(FlowError::RequestTimeout {
                    endpoint: name.to_owned(),
                    after: timeout,
                })));
            }
            Poll::Pending
        })
        .await
    }
}
