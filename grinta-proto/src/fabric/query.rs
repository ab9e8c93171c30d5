//! Queries: one question to every node that handles a topic, their answers as a stream.
//!
//! **How a query travels.** A node that handles topic `t` serves the group endpoint
//! `grinta.query.t` ([`Fabric::handle_queries`]), so the handlers of a topic spread by gossip
//! like any group endpoint, and every node knows them. [`Fabric::query`] picks the live handlers
//! that match its [`QueryOptions`] (node names, a tag filter) and asks each one directly: a flow
//! to that node carrying the payload and its end, answered by one reply and its end (a
//! [`Fabric::request`] to that node: one round trip on an open connection). Connections
//! are made as needed (a node need not be connected to every other beforehand; a member it met
//! before resumes its TLS session), at most [`QueryOptions::concurrency`] at once.
//!
//! Why direct, rather than gossiped like serf's queries: the origin knows from the directory
//! exactly which nodes must answer, so the stream ends as soon as the last of them has (not at
//! a timeout), nodes that do not handle the topic see nothing, and every question and answer
//! is reliable, ordered and back-pressured like any flow, of any size a flow allows.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use super::request::{Request, Requests};
use super::{Error, Fabric, Runtime};
use crate::flow::FlowError;
use crate::tags::TagFilter;

/// The prefix of the group endpoint through which a node handles a query topic.
pub const QUERY_ENDPOINT_PREFIX: &str = "grinta.query.";

/// Which nodes a query asks, and for how long (see [`Fabric::query`]).
///
/// ```
/// use grinta_proto::fabric::QueryOptions;
/// use grinta_proto::tags::TagFilter;
/// use std::time::Duration;
///
/// let options = QueryOptions::new()
///     .timeout(Duration::from_secs(2))
///     .filter(TagFilter::new().eq("zone", "eu-west"));
/// assert_eq!(options.max_nodes, 1024);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueryOptions {
    /// How long the query waits for answers in all (5 s): the stream ends then, whatever is
    /// still unanswered.
    pub timeout: Duration,
    /// Only these nodes, if not empty (default: every handler).
    pub nodes: Vec<String>,
    /// Only nodes whose tags match (default: every node).
    pub filter: TagFilter,
    /// The most nodes one query may ask (1,024). A query that matches more fails with
    /// [`Error::Flow`]`(FlowError::LimitReached)`: narrow it, or raise this.
    pub max_nodes: usize,
    /// Nodes asked at once (64); the others wait for a slot.
    pub concurrency: usize,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            nodes: Vec::new(),
            filter: TagFilter::new(),
            max_nodes: 1024,
            concurrency: 64,
        }
    }
}

impl QueryOptions {
    /// The defaults: every handler, 5 s, at most 1,024 nodes, 64 at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds `node` to [`nodes`](Self::nodes).
    pub fn node(mut self, node: &str) -> Self {
        self.nodes.push(node.to_owned());
        self
    }

    /// Sets [`filter`](Self::filter).
    pub fn filter(mut self, filter: TagFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Sets [`max_nodes`](Self::max_nodes).
    pub fn max_nodes(mut self, max_nodes: usize) -> Self {
        self.max_nodes = max_nodes;
        self
    }

    /// Sets [`concurrency`](Self::concurrency) (at least 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }
}

type Ask = Pin<Box<dyn Future<Output = Result<Bytes, Error>> + Send>>;

/// The answers to a query, as `(node, reply)` in the order they arrive: made by
/// [`Fabric::query`].
///
/// The stream ends when every node asked has answered or failed, or at the query's timeout.
/// Then [`unanswered`](Self::unanswered) lists the nodes that did not answer (their handler
/// dropped the question, their node failed, or time ran out) and
/// [`asked`](Self::asked) how many were asked.
pub struct QueryResponses<R: Runtime> {
    fabric: Fabric<R>,
    topic: String,
    endpoint: String,
    /// Replies returned so far.
    replies: u64,
    payload: Bytes,
    asked: usize,
    /// Nodes not asked yet.
    waiting: VecDeque<String>,
    in_flight: Vec<(String, Ask)>,
    concurrency: usize,
    timeout: Duration,
    deadline: Pin<Box<R::Sleep>>,
    unanswered: Vec<String>,
    done: bool,
}

impl<R: Runtime> std::fmt::Debug for QueryResponses<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryResponses")
            .field("endpoint", &self.endpoint)
            .field("asked", &self.asked)
            .field("in_flight", &self.in_flight.len())
            .field("unanswered", &self.unanswered)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> QueryResponses<R> {
    /// How many nodes the query asks.
    pub fn asked(&self) -> usize {
        self.asked
    }

    /// The nodes that did not answer, once the stream has ended (and those that failed so
    /// far, before).
    pub fn unanswered(&self) -> &[String] {
        &self.unanswered
    }

    /// Ends the query: what is still asked or waiting is unanswered, and the counters learn
    /// the outcome.
    fn end(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // Dropping an ask abandons its dial or resets its flow.
        self.unanswered
            .extend(self.in_flight.drain(..).map(|(node, _)| node));
        self.unanswered.extend(self.waiting.drain(..));
        let (replies, unanswered) = (self.replies, self.unanswered.len() as u64);
        self.fabric.shared.lock().count_query(&self.topic, |s| {
            s.replies += replies;
            s.unanswered += unanswered;
        });
    }

    /// One question: a request to `node`, which the query's deadline bounds.
    fn ask(&self, node: String) -> Ask {
        let fabric = self.fabric.clone();
        let endpoint = self.endpoint.clone();
        let payload = self.payload.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            fabric
                .request_owner(&endpoint, &node, payload, timeout)
                .await
        })
    }
}

impl<R: Runtime> futures_core::Stream for QueryResponses<R> {
    type Item = (String, Bytes);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<(String, Bytes)>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        while this.in_flight.len() < this.concurrency {
            let Some(node) = this.waiting.pop_front() else {
                break;
            };
            let ask = this.ask(node.clone());
            this.in_flight.push((node, ask));
        }
        let mut i = 0;
        while i < this.in_flight.len() {
            match this.in_flight[i].1.as_mut().poll(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(result) => {
                    let (node, _) = this.in_flight.swap_remove(i);
                    match result {
                        Ok(reply) => {
                            this.replies += 1;
                            // A slot is free: the next poll starts the next node.
                            if !this.waiting.is_empty() {
                                cx.waker().wake_by_ref();
                            }
                            return Poll::Ready(Some((node, reply)));
                        }
                        Err(_) => this.unanswered.push(node),
                    }
                    // Start the next waiting node, if any.
                    if let Some(next) = this.waiting.pop_front() {
                        let ask = this.ask(next.clone());
                        this.in_flight.push((next, ask));
                    }
                }
            }
        }
        let timed_out = this.deadline.as_mut().poll(cx).is_ready();
        if timed_out || (this.in_flight.is_empty() && this.waiting.is_empty()) {
            this.end();
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl<R: Runtime> Drop for QueryResponses<R> {
    /// Dropped before its end, the query is abandoned: its open asks are reset.
    fn drop(&mut self) {
        self.end();
    }
}

/// One question of a query, received by a [`QueryHandler`]: a [`Request`] on the topic's
/// endpoint. Answer it with [`Request::respond`]; dropping it unanswered tells the asking node
/// that this node did not answer.
pub type Query<R> = Request<R>;

/// The questions asked of this node on a topic: made by [`Fabric::handle_queries`].
///
/// A stream of [`Query`]s, each answered with [`Request::respond`]. While it exists this node
/// is one of the topic's handlers, known to every node by gossip; dropping it withdraws the
/// node. Questions are read as they arrive, at most [`MAX_REQUESTS_READING`](super::MAX_REQUESTS_READING) at once. The
/// stream ends when the fabric shuts down.
pub struct QueryHandler<R: Runtime> {
    topic: String,
    requests: Requests<R>,
}

impl<R: Runtime> std::fmt::Debug for QueryHandler<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryHandler")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> QueryHandler<R> {
    /// The topic handled.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl<R: Runtime> futures_core::Stream for QueryHandler<R> {
    type Item = Query<R>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Query<R>>> {
        let this = self.get_mut();
        loop {
            return match Pin::new(&mut this.requests).poll_next(cx) {
                Poll::Ready(Some(Ok(query))) => {
                    if let Some(fabric) = this.requests.fabric() {
                        fabric.shared.lock().count_query(&this.topic, |s| {
                            s.questions_handled += 1;
                        });
                    }
                    Poll::Ready(Some(query))
                }
                // A group endpoint never loses a conflict: nothing else ends it.
                Poll::Ready(Some(Err(_))) => continue,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl<R: Runtime> Fabric<R> {
    /// Asks `payload` of every live node that handles `topic` (see
    /// [`handle_queries`](Self::handle_queries)) and matches `options`; their replies arrive
    /// as a stream of `(node, reply)`, which ends when every node asked has answered (or failed),
    /// or at `options.timeout`. This node is asked too if it handles the topic. See the
    /// module docs of [`QueryResponses`] for how a query travels.
    ///
    /// Errors: [`Error::Registry`] for an invalid topic (1..=115 bytes of `[A-Za-z0-9._-]`);
    /// `FlowError::LimitReached` if more than `options.max_nodes` nodes match;
    /// [`Error::Shutdown`]. No handler is not an error: the stream ends at once, and
    /// [`QueryResponses::asked`] is 0.
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use futures::StreamExt;
    /// use grinta_proto::fabric::QueryOptions;
    ///
    /// let mut replies = fabric.query("load", "cpu".into(), QueryOptions::new())?;
    /// while let Some((node, reply)) = replies.next().await {
    ///     println!("{node}: {}", String::from_utf8_lossy(&reply));
    /// }
    /// println!("no answer from {:?}", replies.unanswered());
    /// # Ok(())
    /// # }
    /// ```
    pub fn query(
        &self,
        topic: &str,
        payload: Bytes,
        options: QueryOptions,
    ) -> Result<QueryResponses<R>, Error> {
        let endpoint = super::topic_endpoint(QUERY_ENDPOINT_PREFIX, topic)?;
        let nodes: VecDeque<String> = {
            let inner = self.shared.lock();
            if !inner.accepting() {
                return Err(Error::Shutdown);
            }
            inner
                .node
                .live_owners(&endpoint)
                .into_iter()
                .filter(|n| options.nodes.is_empty() || options.nodes.iter().any(|o| o == n))
                .filter(|n| inner.node.tags_match(n, &options.filter))
                .map(str::to_owned)
                .collect()
        };
        if nodes.len() > options.max_nodes {
            return Err(Error::Flow(FlowError::LimitReached {
                what: "query max_nodes",
                limit: options.max_nodes,
            }));
        }
        let asked = nodes.len() as u64;
        self.shared.lock().count_query(topic, |s| {
            s.queries += 1;
            s.nodes_asked += asked;
        });
        Ok(QueryResponses {
            fabric: self.clone(),
            topic: topic.to_owned(),
            replies: 0,
            endpoint,
            payload,
            asked: nodes.len(),
            waiting: nodes,
            in_flight: Vec::new(),
            concurrency: options.concurrency.max(1),
            timeout: options.timeout,
            deadline: Box::pin(R::sleep_until(super::deadline_after(
                R::now(),
                options.timeout,
            ))),
            unanswered: Vec::new(),
            done: false,
        })
    }

    /// Makes this node a handler of query `topic`: the stream of questions asked of it (see
    /// [`QueryHandler`]). Several nodes handle a topic; each node at most once at a time.
    ///
    /// Errors: [`Error::Registry`] for an invalid topic or one this node already handles;
    /// [`Error::Shutdown`].
    ///
    /// ```no_run
    /// # async fn demo(fabric: grinta_proto::fabric::Fabric<impl grinta_proto::fabric::Runtime>) -> Result<(), grinta_proto::fabric::Error> {
    /// use futures::StreamExt;
    ///
    /// let mut questions = fabric.handle_queries("load")?;
    /// while let Some(query) = questions.next().await {
    ///     let answer = format!("{} asked {:?}", query.from(), query.payload());
    ///     let _ = query.respond(answer).await; // the asker may have given up
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn handle_queries(&self, topic: &str) -> Result<QueryHandler<R>, Error> {
        let endpoint = super::topic_endpoint(QUERY_ENDPOINT_PREFIX, topic)?;
        let endpoint = self.register(&endpoint, crate::registry::EndpointKind::Group)?;
        Ok(QueryHandler {
            topic: topic.to_owned(),
            requests: endpoint.into_requests(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked() {
        assert_eq!(
            super::super::topic_endpoint(QUERY_ENDPOINT_PREFIX, "load").expect("valid"),
            "grinta.query.load"
        );
        assert!(super::super::topic_endpoint(QUERY_ENDPOINT_PREFIX, "").is_err());
        assert!(super::super::topic_endpoint(QUERY_ENDPOINT_PREFIX, "a/b").is_err());
        assert!(
            super::super::topic_endpoint(
                QUERY_ENDPOINT_PREFIX,
                &"x".repeat(super::super::MAX_TOPIC_LEN)
            )
            .is_ok()
        );
        assert!(
            super::super::topic_endpoint(
                QUERY_ENDPOINT_PREFIX,
                &"x".repeat(super::super::MAX_TOPIC_LEN + 1)
            )
            .is_err()
        );
    }
}
