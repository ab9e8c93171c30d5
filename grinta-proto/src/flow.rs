//! Flows: ordered, back-pressured, bidirectional message channels over QUIC streams.
//!
//! A dial opens a bidirectional stream to the endpoint's owner and sends a length-prefixed
//! `FlowOpen`; it completes only when the owner answers `FlowAccept`, or fails with the
//! `FlowReject` reason or a timeout. The acceptor learns the dialler's node name (checked against its
//! certificate). After that each message is a varint length prefix plus payload. The receiver
//! enforces its maximum message size: a larger message resets that stream (both ways, code
//! `MESSAGE_TOO_LARGE`) and nothing else. `finish` delivers everything sent, then the end of the
//! flow; `reset` aborts both ways with a code. Sending is refused with
//! [`FlowError::WouldBlock`] once `send_buffer` bytes wait, and a [`FlowEvent::Writable`] follows when
//! there is room again; received messages are read from QUIC only while fewer than `recv_buffer`
//! bytes wait for the application, so a slow reader slows its writer through QUIC flow control.
//! Flows to a peer that membership declares Dead or Left fail at once.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use tracing::debug;

use bytes::{Bytes, BytesMut};
use hashbrown::HashMap;
use prost::Message;
use quinn_proto::{ConnectionHandle, StreamId};

use crate::registry::Registry;
use crate::transport::FlowRead;
use crate::wire::framing::{self, FrameDecoder, FrameError, FrameRun};
use crate::wire::{self, StreamErrorCode};

/// Identifies a flow on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flow#{}", self.0)
    }
}

/// Flow limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLimits {
    /// Largest message this node accepts on a flow (and announces to the other side).
    pub max_message_size: usize,
    /// Bytes a flow may hold waiting to be sent before `send` answers `WouldBlock`.
    pub send_buffer: usize,
    /// Bytes of received messages a flow holds for the application before it stops reading.
    pub recv_buffer: usize,
    /// Accepted flows waiting for [`accept`](crate::node::Node::accept) per endpoint; beyond it
    /// dials are rejected with `BACKLOG_FULL`. Sized like a listen backlog (4096): an acceptor
    /// that keeps up never sees a burst refused, one that falls behind does.
    pub accept_backlog: usize,
    /// How long a dial waits for the owner's answer.
    pub dial_timeout: Duration,
    /// Most flows open at once on this node (all peers).
    pub max_flows: usize,
    /// Most flows open at once with one peer (both directions); beyond it dials to that peer fail
    /// and its dials here are rejected with `LIMIT_EXCEEDED`.
    pub max_flows_per_peer: usize,
    /// Most dials waiting for an answer at once.
    pub max_pending_dials: usize,
    /// Messages an in-process flow (both ends on this node) holds per direction before `send`
    /// waits; such a flow is also bounded by `recv_buffer` bytes, like a remote one.
    pub local_capacity: usize,
    /// How long a graceful shutdown lets open flows finish before resetting them (5 s).
    pub shutdown_grace: Duration,
    /// How long a request (`Fabric::request`) waits for its reply, the dial included (10 s).
    pub request_timeout: Duration,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            max_message_size: 4 << 20,
            send_buffer: 1 << 20,
            recv_buffer: 1 << 20,
            accept_backlog: 4096,
            dial_timeout: Duration::from_secs(10),
            max_flows: 10_000,
            max_flows_per_peer: 1024,
            max_pending_dials: 4096,
            local_capacity: 256,
            shutdown_grace: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the owner refused a dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The owner has no endpoint of that name (any more).
    NoSuchEndpoint,
    /// The endpoint's accept backlog is full.
    BacklogFull,
    /// The owner is shutting down.
    ShuttingDown,
    /// The endpoint lost a name conflict.
    NameConflict,
    /// The owner speaks another protocol version.
    VersionMismatch,
    /// A flow limit of the owner was reached.
    LimitExceeded,
    /// A reason this version does not know.
    Unknown,
}

impl RejectReason {
    fn from_wire(code: i32) -> Self {
        use wire::FlowRejectReason as R;
        match R::try_from(code) {
            Ok(R::NoSuchEndpoint) => Self::NoSuchEndpoint,
            Ok(R::BacklogFull) => Self::BacklogFull,
            Ok(R::ShuttingDown) => Self::ShuttingDown,
            Ok(R::NameConflict) => Self::NameConflict,
            Ok(R::VersionMismatch) => Self::VersionMismatch,
            Ok(R::LimitExceeded) => Self::LimitExceeded,
            _ => Self::Unknown,
        }
    }

    fn to_wire(self) -> wire::FlowRejectReason {
        use wire::FlowRejectReason as R;
        match self {
            Self::NoSuchEndpoint => R::NoSuchEndpoint,
            Self::BacklogFull => R::BacklogFull,
            Self::ShuttingDown => R::ShuttingDown,
            Self::NameConflict => R::NameConflict,
            Self::VersionMismatch => R::VersionMismatch,
            Self::LimitExceeded => R::LimitExceeded,
            Self::Unknown => R::Unspecified,
        }
    }
}

/// The code a flow was reset with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetCode {
    /// The application reset the flow with its own code.
    Application(u32),
    /// A message exceeded the receiver's maximum size.
    MessageTooLarge,
    /// The stream carried bytes that are not valid grinta frames.
    ProtocolViolation,
    /// The endpoint holding the flow was closed or unregistered.
    EndpointClosed,
    /// The node holding the other end is shutting down.
    ShuttingDown,
    /// The endpoint lost a name conflict.
    NameConflict,
    /// The other end dropped the flow without finishing it.
    Dropped,
    /// A code this version does not know.
    Unknown(u64),
}

impl ResetCode {
    /// The application's code, if the flow was reset by the application (`reset(code)`).
    pub fn application(self) -> Option<u32> {
        match self {
            Self::Application(code) => Some(code),
            _ => None,
        }
    }
}

/// Application reset codes travel as `APP_CODE_BASE + code`; smaller codes are grinta's own
/// (`grinta.v1.StreamErrorCode`).
pub const APP_CODE_BASE: u64 = 0x100;

impl ResetCode {
    /// The QUIC application error code.
    pub fn to_quic(self) -> u64 {
        match self {
            Self::Application(c) => APP_CODE_BASE + u64::from(c),
            Self::MessageTooLarge => StreamErrorCode::MessageTooLarge as u64,
            Self::ProtocolViolation => StreamErrorCode::ProtocolViolation as u64,
            Self::EndpointClosed => StreamErrorCode::EndpointClosed as u64,
            Self::ShuttingDown => StreamErrorCode::ShuttingDown as u64,
            Self::NameConflict => StreamErrorCode::NameConflict as u64,
            Self::Dropped => StreamErrorCode::Dropped as u64,
            Self::Unknown(c) => c,
        }
    }

    /// Reads a QUIC application error code.
    pub fn from_quic(code: u64) -> Self {
        if code >= APP_CODE_BASE {
            return u32::try_from(code - APP_CODE_BASE)
                .map_or(Self::Unknown(code), Self::Application);
        }
        match i32::try_from(code)
            .ok()
            .and_then(|c| StreamErrorCode::try_from(c).ok())
        {
            Some(StreamErrorCode::MessageTooLarge) => Self::MessageTooLarge,
            Some(StreamErrorCode::ProtocolViolation) => Self::ProtocolViolation,
            Some(StreamErrorCode::EndpointClosed) => Self::EndpointClosed,
            Some(StreamErrorCode::ShuttingDown) => Self::ShuttingDown,
            Some(StreamErrorCode::NameConflict) => Self::NameConflict,
            Some(StreamErrorCode::Dropped) => Self::Dropped,
            Some(StreamErrorCode::ResetByApplication) => Self::Application(0),
            _ => Self::Unknown(code),
        }
    }
}

/// What went wrong with a flow or a flow operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// No live node serves the endpoint.
    #[error("no node serves endpoint {name:?}")]
    NoSuchEndpoint {
        /// The endpoint.
        name: String,
    },
    /// The owner refused the dial.
    #[error("the owner of {endpoint:?} refused the flow: {reason:?} ({detail})")]
    Rejected {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: RejectReason,
        /// The owner's explanation.
        detail: String,
    },
    /// The owner did not answer in time.
    #[error("dial to {endpoint:?} timed out after {after:?}")]
    DialTimeout {
        /// The endpoint.
        endpoint: String,
        /// The timeout.
        after: Duration,
    },
    /// The connection to the peer failed or closed.
    #[error("the connection to node {peer:?} was lost")]
    ConnectionLost {
        /// The peer.
        peer: String,
    },
    /// Membership declared the peer Dead or Left.
    #[error("node {peer:?} left or was declared dead")]
    PeerGone {
        /// The peer.
        peer: String,
    },
    /// A message exceeds the receiver's maximum size.
    #[error("message of {size} bytes exceeds the maximum message size of {limit} bytes")]
    MessageTooLarge {
        /// The message size.
        size: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// The flow was reset (by either side) with this code.
    #[error("flow reset: {code:?}")]
    Reset {
        /// The code.
        code: ResetCode,
    },
    /// `send` after `finish`.
    #[error("the flow was finished; nothing more can be sent")]
    Finished,
    /// The send buffer is full: wait for [`FlowEvent::Writable`].
    #[error("the flow's send buffer is full; wait until it is writable")]
    WouldBlock,
    /// The flow is not open yet (the dial has not completed).
    #[error("the flow is not open yet")]
    NotOpen,
    /// No such flow (it ended long ago, or never existed).
    #[error("unknown flow")]
    UnknownFlow,
    /// A flow limit was reached.
    #[error("{what} limit of {limit} reached")]
    LimitReached {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
    /// This node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The endpoint is served by this node: connect to it in-process.
    #[error("endpoint {name:?} is served by this node; connect in-process")]
    LocalEndpoint {
        /// The endpoint.
        name: String,
    },
    /// A request got no reply in time (the dial, the exchange and the reply together).
    #[error("request to {endpoint:?} got no reply within {after:?}")]
    RequestTimeout {
        /// The endpoint.
        endpoint: String,
        /// The timeout.
        after: Duration,
    },
    /// The owner ended a request's flow without a reply.
    #[error("the owner of {endpoint:?} ended the request without a reply")]
    NoReply {
        /// The endpoint.
        endpoint: String,
    },
}

impl FlowError {
    /// The code the flow was reset with (by either side), if it was reset.
    pub fn reset_code(&self) -> Option<ResetCode> {
        match self {
            Self::Reset { code } => Some(*code),
            _ => None,
        }
    }

    /// The application's code, if a side reset the flow with `reset(code)`.
    pub fn application_code(&self) -> Option<u32> {
        self.reset_code().and_then(ResetCode::application)
    }

    /// Why the owner refused the dial, if it did.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            Self::Rejected { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Whether the other node failed or left, or the connection to it was lost.
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, Self::PeerGone { .. } | Self::ConnectionLost { .. })
    }
}

/// Something that happened to a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowEvent {
    /// A dial completed: the owner accepted.
    Opened {
        /// The flow.
        flow: FlowId,
        /// The endpoint dialled.
        endpoint: String,
        /// The owner node.
        peer: String,
    },
    /// A dial failed.
    DialFailed {
        /// The flow the dial would have been.
        flow: FlowId,
        /// The endpoint dialled.
        endpoint: String,
        /// Why.
        error: FlowError,
    },
    /// A flow was accepted for a local endpoint and waits in its backlog.
    Incoming {
        /// The flow.
        flow: FlowId,
        /// The local endpoint.
        endpoint: String,
        /// The dialling node.
        peer: String,
    },
    /// Messages (or the end of the flow) can be read.
    Readable {
        /// The flow.
        flow: FlowId,
    },
    /// The send buffer has room again after a `WouldBlock`.
    Writable {
        /// The flow.
        flow: FlowId,
    },
    /// The other side finished: after the buffered messages, `recv` reports the end.
    Finished {
        /// The flow.
        flow: FlowId,
    },
    /// The flow ended abnormally (reset by either side, too-large message, peer gone).
    Closed {
        /// The flow.
        flow: FlowId,
        /// Why.
        error: FlowError,
    },
}

/// Counters and buffer levels of one flow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Bytes queued for sending, not yet taken by QUIC.
    pub send_queued_bytes: usize,
    /// Bytes of received messages waiting for `recv`.
    pub recv_queued_bytes: usize,
    /// Messages waiting for `recv`.
    pub recv_queued_messages: usize,
    /// Messages accepted by `send`.
    pub messages_sent: u64,
    /// Bytes of the messages accepted by `send` (message bodies, without framing).
    pub bytes_sent: u64,
    /// Messages returned by `recv`.
    pub messages_received: u64,
    /// Bytes of the messages returned by `recv`.
    pub bytes_received: u64,
}

/// What [`recv`](crate::node::Node::recv) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recv {
    /// The next message.
    Message(Bytes),
    /// Nothing yet; a [`FlowEvent::Readable`] will follow.
    Pending,
    /// The other side finished and every message was delivered.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Dialler: waiting for the stream, then for the owner's answer.
    Dialing { deadline: Instant },
    /// Acceptor: waiting for `FlowOpen`, which must come before the deadline (the dial timeout).
    AwaitOpen { deadline: Instant },
    /// Messages flow.
    Open,
}

#[derive(Debug)]
struct Flow {
    endpoint: String,
    peer: String,
    stream: Option<(ConnectionHandle, StreamId)>,
    phase: Phase,
    parser: FlowStreamParser,
    recv_queue: RecvQueue,
    /// The reader takes messages in batches and cuts them out of their frames itself
    /// ([`Flows::let_reader_cut`]): received chunks are queued as runs of frames, not message
    /// by message.
    reader_cuts: bool,
    recv_bytes: usize,
    remote_finished: bool,
    send_queue: SendQueue,
    finish_requested: bool,
    fin_sent: bool,
    peer_max_message: u64,
    writer_blocked: bool,
    /// Messages wait in `send_queue` for the next `flush_sends`.
    send_dirty: bool,
    held: bool,
    /// The application dropped its handle after finishing: what still arrives is read and
    /// discarded so the peer never stalls, and the flow ends when the peer finishes.
    released: bool,
    /// Accepted by the node but not yet by the application: nothing is read from the stream
    /// beyond its `FlowOpen`, so a flow waiting in a backlog holds no more than QUIC's windows.
    awaiting_accept: bool,
    /// A request's message, written right after the `FlowOpen` (with the end) when the stream
    /// opens, without waiting for the owner's answer.
    early: Option<Bytes>,
    messages_sent: u64,
    bytes_sent: u64,
    messages_received: u64,
    bytes_received: u64,
    /// `flow{id, endpoint, peer}`, inside the node's span: the flow's events are logged in it.
    span: tracing::Span,
}

/// Messages up to this size are copied into the flow's batch buffer; larger ones are handed to
/// the stream as they are, without a copy.
const COALESCE_MAX: usize = 4096;
/// The most the batch buffer grows by at once; it starts at [`FIRST_BATCH_CAPACITY`] and
/// doubles, so a flow that sends a few messages holds little and a busy one batches in 64 KiB.
const BATCH_CAPACITY: usize = 64 * 1024;
const FIRST_BATCH_CAPACITY: usize = 1024;

/// The bytes of a flow waiting to be written to its stream: length prefixes, control messages and
/// small messages accumulate in one batch buffer, large messages stay separate chunks, so a burst
/// of small messages becomes one write and the stream's buffer holds a few large chunks instead of
/// one per message.
#[derive(Debug, Default)]
pub(crate) struct SendQueue {
    /// Sealed chunks, in order, before `batch`.
    chunks: VecDeque<Bytes>,
    /// The open batch buffer.
    batch: BytesMut,
    /// What the batch buffer grows by next time (0 before the first).
    next_batch: usize,
    /// Bytes queued in total.
    len: usize,
}

impl SendQueue {
    /// Bytes queued (length prefixes included).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An empty queue for a sender to frame a batch of messages in before it hands them over
    /// with [`append`](Self::append): its first message goes into a batch buffer too.
    pub(crate) fn for_staging() -> Self {
        Self {
            next_batch: FIRST_BATCH_CAPACITY,
            ..Self::default()
        }
    }

    /// The messages of a queue that holds only messages (a staging queue), cut back out of
    /// their frames, in order.
    pub(crate) fn into_messages(mut self) -> VecDeque<Bytes> {
        self.seal();
        let mut decoder = FrameDecoder::new(usize::MAX);
        for chunk in self.chunks {
            decoder.push(chunk);
        }
        std::iter::from_fn(|| decoder.next_frame().ok().flatten()).collect()
    }

    /// Moves everything `other` holds to the end of this queue, without copying bytes.
    pub(crate) fn append(&mut self, other: &mut SendQueue) {
        self.seal();
        other.seal();
        self.len += std::mem::take(&mut other.len);
        self.chunks.extend(other.chunks.drain(..));
    }

    /// Queues a length-prefixed control message, in a chunk of its own: a flow that only ever
    /// sends its open or its answer holds no batch buffer.
    fn push_control(&mut self, message: &impl Message) {
        self.push_control_then(message, None);
    }

    /// Like [`push_control`](Self::push_control), followed by application message `first`
    /// (a request's, sent with the open), in the same chunk if it is small.
    fn push_control_then(&mut self, message: &impl Message, first: Option<Bytes>) {
        let first_len = first
            .as_ref()
            .filter(|m| m.len() <= COALESCE_MAX)
            .map_or(0, |m| framing::MAX_VARINT_LEN + m.len());
        let mut framed =
            Vec::with_capacity(framing::MAX_VARINT_LEN + message.encoded_len() + first_len);
        framing::encode_message(message, &mut framed);
        let mut large = None;
        if let Some(first) = first {
            if first_len > 0 {
                prost::encoding::encode_varint(first.len() as u64, &mut framed);
                framed.extend_from_slice(&first);
            } else {
                large = Some(first);
            }
        }
        self.seal();
        self.len += framed.len();
        self.chunks.push_back(framed.into());
        if let Some(first) = large {
            self.push_message(first);
        }
    }

    /// Queues an application message with its length prefix.
    pub(crate) fn push_message(&mut self, message: Bytes) {
        if message.len() <= COALESCE_MAX {
            self.push_small(&message);
        } else {
            self.push_large(message);
        }
    }

    /// Queues an application message the caller keeps, with its length prefix: copied, into
    /// the batch buffer if it is small, into a chunk of its own if not.
    pub(crate) fn push_copy(&mut self, message: &[u8]) {
        if message.len() <= COALESCE_MAX {
            self.push_small(message);
        } else {
            self.push_large(Bytes::copy_from_slice(message));
        }
    }

    /// A message of at most [`COALESCE_MAX`] bytes, copied with its prefix.
    fn push_small(&mut self, message: &[u8]) {
        if self.batch.capacity() == 0 && self.next_batch == 0 {
            // A flow's first message is a chunk of its own, sized to it: a flow that sends one
            // message (a request's reply) holds no batch buffer, and its bytes reach the stream
            // without a split of one.
            let mut framed = Vec::with_capacity(framing::MAX_VARINT_LEN + message.len());
            prost::encoding::encode_varint(message.len() as u64, &mut framed);
            framed.extend_from_slice(message);
            self.len += framed.len();
            self.chunks.push_back(framed.into());
            self.next_batch = FIRST_BATCH_CAPACITY;
            return;
        }
        self.reserve(framing::MAX_VARINT_LEN + message.len());
        let before = self.batch.len();
        prost::encoding::encode_varint(message.len() as u64, &mut self.batch);
        self.batch.extend_from_slice(message);
        self.len += self.batch.len() - before;
    }

    /// A larger message: its prefix in the batch buffer, its bytes a chunk of their own.
    fn push_large(&mut self, message: Bytes) {
        self.reserve(framing::MAX_VARINT_LEN);
        let before = self.batch.len();
        prost::encoding::encode_varint(message.len() as u64, &mut self.batch);
        self.len += self.batch.len() - before + message.len();
        self.seal();
        self.chunks.push_back(message);
    }

    fn reserve(&mut self, additional: usize) {
        if self.batch.capacity() - self.batch.len() < additional {
            self.seal();
            let grow = self.next_batch.max(FIRST_BATCH_CAPACITY);
            self.next_batch = (grow * 2).min(BATCH_CAPACITY);
            self.batch.reserve(additional.max(grow));
        }
    }

    /// Moves the batch buffer's bytes to the sealed chunks.
    fn seal(&mut self) {
        if !self.batch.is_empty() {
            self.chunks.push_back(self.batch.split().freeze());
        }
    }

    /// Hands everything queued to `write`, which consumes what it takes from the front of the
    /// chunks (emptying or advancing them) and returns how many bytes it took, or `None` if the
    /// stream is gone. Returns what `write` returned.
    fn write_with(&mut self, write: impl FnOnce(&mut [Bytes]) -> Option<usize>) -> Option<usize> {
        self.seal();
        let written = write(self.chunks.make_contiguous())?;
        self.len -= written;
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
        Some(written)
    }
}

/// Received messages not yet taken by the application, in order: whole messages, or runs of
/// complete length-prefixed frames cut from one received chunk. The node checks a run's frames
/// when it cuts it (each complete and within the limit) and cuts the messages out only as they
/// are taken, so a busy flow costs the driver one slice per packet, and the per-message
/// reference counting happens on the reader's thread, on the reader's cache lines.
#[derive(Debug, Default)]
pub(crate) struct RecvQueue {
    items: VecDeque<RecvItem>,
    /// Messages in `items`.
    messages: usize,
    /// Their payload bytes (length prefixes not counted).
    bytes: usize,
}

/// The messages of one [`RecvItem`], borrowed.
enum ItemMessages<'a> {
    One(Option<&'a [u8]>),
    Frames { rest: &'a [u8], left: usize },
}

impl<'a> Iterator for ItemMessages<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            ItemMessages::One(m) => m.take(),
            ItemMessages::Frames { rest, left } => {
                if *left == 0 {
                    return None;
                }
                let Ok(framing::FrameHeader::Complete { header_len, len }) =
                    framing::peek_frame(rest, usize::MAX)
                else {
                    // Unreachable: runs are checked when cut.
                    *left = 0;
                    return None;
                };
                let message = rest.get(header_len..header_len + len)?;
                *rest = rest.get(header_len + len..)?;
                *left -= 1;
                Some(message)
            }
        }
    }
}

#[derive(Debug)]
enum RecvItem {
    Message(Bytes),
    /// `count` complete frames, prefixes included, holding `body` payload bytes.
    Frames {
        frames: Bytes,
        count: usize,
        body: usize,
    },
}

impl RecvQueue {
    /// Messages queued.
    pub(crate) fn len(&self) -> usize {
        self.messages
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Payload bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Puts one message back in front (the one a reader took first).
    pub(crate) fn push_front(&mut self, message: Bytes) {
        self.messages += 1;
        self.bytes += message.len();
        self.items.push_front(RecvItem::Message(message));
    }

    /// Every message, in order, borrowed: runs are walked, not cut.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.items.iter().flat_map(|item| match item {
            RecvItem::Message(m) => ItemMessages::One(Some(&m[..])),
            RecvItem::Frames { frames, count, .. } => ItemMessages::Frames {
                rest: &frames[..],
                left: *count,
            },
        })
    }

    /// Queues one message.
    pub(crate) fn push_back(&mut self, message: Bytes) {
        self.messages += 1;
        self.bytes += message.len();
        self.items.push_back(RecvItem::Message(message));
    }

    fn push_run(&mut self, run: FrameRun) {
        match run {
            FrameRun::One(message) => self.push_back(message),
            FrameRun::Frames {
                frames,
                count,
                body,
            } => {
                self.messages += count;
                self.bytes += body;
                self.items.push_back(RecvItem::Frames {
                    frames,
                    count,
                    body,
                });
            }
        }
    }

    /// Takes the next message.
    pub(crate) fn pop_front(&mut self) -> Option<Bytes> {
        let message = match self.items.front_mut()? {
            RecvItem::Message(_) => match self.items.pop_front() {
                Some(RecvItem::Message(m)) => m,
                _ => return None,
            },
            RecvItem::Frames {
                frames,
                count,
                body,
            } => match FrameRun::split_next(frames) {
                Some(m) => {
                    *count -= 1;
                    *body -= m.len().min(*body);
                    if *count == 0 {
                        self.items.pop_front();
                    }
                    m
                }
                None => {
                    // Unreachable: the run was checked when it was cut. Drop it whole rather
                    // than panic, keeping the counts.
                    if let Some(RecvItem::Frames { count, body, .. }) = self.items.pop_front() {
                        self.messages = self.messages.saturating_sub(count);
                        self.bytes = self.bytes.saturating_sub(body);
                    }
                    return self.pop_front();
                }
            },
        };
        self.messages -= 1;
        self.bytes -= message.len();
        Some(message)
    }

    /// Moves messages from the front to `into` until it holds `max` (or nothing is left): whole
    /// items while they fit, then single messages cut from the run that does not. Returns the
    /// messages and bytes moved.
    fn move_to(&mut self, into: &mut RecvQueue, max: usize) -> (usize, usize) {
        let (mut messages, mut bytes) = (0, 0);
        while into.messages < max {
            let (m, b) = match self.items.front() {
                None => break,
                Some(RecvItem::Message(message)) => (1, message.len()),
                Some(RecvItem::Frames { count, body, .. }) => (*count, *body),
            };
            if into.messages + m > max {
                // Part of a run: message by message.
                while into.messages < max {
                    let Some(message) = self.pop_front() else {
                        break;
                    };
                    messages += 1;
                    bytes += message.len();
                    into.push_back(message);
                }
                break;
            }
            if let Some(item) = self.items.pop_front() {
                self.messages -= m;
                self.bytes -= b;
                into.messages += m;
                into.bytes += b;
                into.items.push_back(item);
                messages += m;
                bytes += b;
            }
        }
        (messages, bytes)
    }

    /// Moves everything to the end of `into`.
    pub(crate) fn append_to(&mut self, into: &mut RecvQueue) {
        if into.items.is_empty() {
            std::mem::swap(self, into);
        } else {
            into.messages += std::mem::take(&mut self.messages);
            into.bytes += std::mem::take(&mut self.bytes);
            into.items.append(&mut self.items);
        }
    }

    fn clear(&mut self) {
        self.items.clear();
        self.messages = 0;
        self.bytes = 0;
    }
}

/// One item of a flow stream.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowFrame {
    /// The dialler's opening message (first frame towards the acceptor).
    Open(wire::FlowOpen),
    /// The acceptor's answer (first frame towards the dialler).
    Response(wire::FlowResponse),
    /// An application message.
    Message(Bytes),
}

/// Parses the bytes one side of a flow stream carries: one control message first (`FlowOpen`
/// towards the acceptor, `FlowResponse` towards the dialler), then length-prefixed messages of at
/// most `max_message` bytes. Incremental: feed any split of the bytes; never panics.
///
/// ```
/// use grinta_proto::flow::{FlowFrame, FlowStreamParser};
/// use grinta_proto::wire::{self, framing};
///
/// let mut bytes = Vec::new();
/// framing::encode_message(&wire::FlowResponse { result: None }, &mut bytes);
/// framing::encode_frame(b"hello", &mut bytes);
/// let mut parser = FlowStreamParser::for_dialler(1024);
/// parser.push(bytes.into());
/// assert!(matches!(parser.next_frame(), Ok(Some(FlowFrame::Response(_)))));
/// assert_eq!(parser.next_frame(), Ok(Some(FlowFrame::Message("hello".into()))));
/// assert_eq!(parser.next_frame(), Ok(None));
/// ```
#[derive(Debug)]
pub struct FlowStreamParser {
    decoder: FrameDecoder,
    /// The control message still expected, if any: true for `FlowOpen`, false for `FlowResponse`.
    expect_open: Option<bool>,
    max_message: usize,
}

impl FlowStreamParser {
    /// The parser of the bytes an acceptor receives (`FlowOpen`, then messages).
    pub fn for_acceptor(max_message: usize) -> Self {
        Self::new(Some(true), max_message)
    }

    /// The parser of the bytes a dialler receives (`FlowResponse`, then messages).
    pub fn for_dialler(max_message: usize) -> Self {
        Self::new(Some(false), max_message)
    }

    fn new(expect_open: Option<bool>, max_message: usize) -> Self {
        Self {
            decoder: FrameDecoder::new(MAX_CONTROL_MESSAGE),
            expect_open,
            max_message,
        }
    }

    /// Appends received bytes. Frames within one chunk are returned as slices of it, without a
    /// copy.
    pub fn push(&mut self, data: Bytes) {
        self.decoder.push(data);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<FlowFrame>, FlowError> {
        let violation = || FlowError::Reset {
            code: ResetCode::ProtocolViolation,
        };
        let Some(frame) = self.next_raw_frame()? else {
            return Ok(None);
        };
        match self.expect_open.take() {
            None => Ok(Some(FlowFrame::Message(frame))),
            Some(open) => {
                self.decoder.set_max_frame_len(self.max_message);
                if open {
                    wire::FlowOpen::decode(frame)
                        .map(|o| Some(FlowFrame::Open(o)))
                        .map_err(|_| violation())
                } else {
                    wire::FlowResponse::decode(frame)
                        .map(|r| Some(FlowFrame::Response(r)))
                        .map_err(|_| violation())
                }
            }
        }
    }
}

impl FlowStreamParser {
    /// The next application message, once the control message was parsed (`Ok(None)` before,
    /// or if more bytes are needed): the loop of a busy flow, without the phase checks of
    /// [`next_frame`](Self::next_frame).
    fn next_message(&mut self) -> Result<Option<Bytes>, FlowError> {
        if self.expect_open.is_some() {
            return Ok(None);
        }
        self.next_raw_frame()
    }

    /// Like [`next_message`](Self::next_message), but every complete message of the next
    /// chunk at once, left in their frames (see [`FrameDecoder::next_run`]).
    fn next_run(&mut self) -> Result<Option<FrameRun>, FlowError> {
        if self.expect_open.is_some() {
            return Ok(None);
        }
        self.decoder.next_run().map_err(Self::frame_error)
    }

    fn next_raw_frame(&mut self) -> Result<Option<Bytes>, FlowError> {
        self.decoder.next_frame().map_err(Self::frame_error)
    }

    fn frame_error(error: FrameError) -> FlowError {
        match error {
            FrameError::TooLarge { size, limit } => FlowError::MessageTooLarge {
                size,
                limit: limit as u64,
            },
            _ => FlowError::Reset {
                code: ResetCode::ProtocolViolation,
            },
        }
    }
}

/// What the flow layer needs from the transport: the QUIC streams its flows run on, and the
/// connections they hold. [`Transport`](crate::transport::Transport) implements it over QUIC;
/// the unit tests below implement it in memory, so the flow state machines are tested without
/// QUIC or TLS.
pub(crate) trait FlowStreams {
    /// Opens a stream to node `peer` (at `addr`), connecting first if needed; answers with
    /// `FlowStreamOpened` or `FlowStreamOpenFailed` carrying `token`.
    fn open_flow_stream(
        &mut self,
        now: Instant,
        peer: &str,
        addr: std::net::SocketAddr,
        token: u64,
    );
    /// Whether `name` is the node the connection's certificate proves (binding it if unbound).
    fn authenticate(&mut self, conn: ConnectionHandle, name: &str) -> bool;
    /// Writes what flow control allows of `chunks`: bytes written, `None` if the stream is gone.
    fn flow_write_chunks(
        &mut self,
        conn: ConnectionHandle,
        stream: StreamId,
        chunks: &mut [Bytes],
    ) -> Option<usize>;
    /// Reads at most `max` bytes, and whether the peer finished or reset its side.
    fn flow_read(&mut self, conn: ConnectionHandle, stream: StreamId, max: usize) -> FlowRead;
    /// Finishes the sending half (after everything written).
    fn flow_finish(&mut self, conn: ConnectionHandle, stream: StreamId);
    /// Gives the stream back: its receiving half is read and discarded to the peer's end.
    fn flow_release(&mut self, conn: ConnectionHandle, stream: StreamId);
    /// Answers with one last message, finishes and releases the stream.
    fn flow_reply_and_release(&mut self, conn: ConnectionHandle, stream: StreamId, data: Bytes);
    /// Resets the sending half and stops the receiving half with `code`, and forgets the stream.
    fn abort_stream(&mut self, conn: ConnectionHandle, stream: StreamId, code: u64);
    /// Keeps the connection open while a flow runs on it.
    fn hold_conn(&mut self, now: Instant, conn: ConnectionHandle);
    /// Releases one [`hold_conn`](Self::hold_conn).
    fn release_conn(&mut self, conn: ConnectionHandle);
}

/// Largest control message (`FlowOpen`, `FlowResponse`) accepted.
const MAX_CONTROL_MESSAGE: usize = 2048;

/// How many ended flows remember why they ended (so a late `recv` still gets the reason).
const ENDED_MEMORY: usize = 1024;

/// Every flow of one node.
#[derive(Debug)]
pub(crate) struct Flows {
    limits: FlowLimits,
    local_name: String,
    next_id: u64,
    /// The flows by id: a hash map, as a node opens and ends a flow per request (a `BTreeMap`
    /// moved whole `Flow`s around its nodes on every insert and removal). Its order is random:
    /// whatever walks it sorts the ids first, so that a simulation replays exactly.
    flows: HashMap<FlowId, Flow>,
    by_stream: HashMap<(ConnectionHandle, StreamId), FlowId>,
    backlogs: HashMap<String, VecDeque<FlowId>>,
    ended: VecDeque<(FlowId, Result<(), FlowError>)>,
    events: VecDeque<FlowEvent>,
    /// Flows with messages queued since the last `flush_sends`.
    dirty: Vec<FlowId>,
    shutting_down: bool,
    /// Deadlines of flows not yet open (dial timeouts, incoming streams awaiting their open),
    /// ordered. Entries of flows that opened or ended are dropped when they reach the front.
    deadlines: BTreeSet<(Instant, FlowId)>,
    /// Flows dialled and not yet answered.
    dialing: usize,
    /// Flows per peer node, in both directions.
    per_peer: HashMap<String, usize>,
}

impl Flows {
    pub(crate) fn new(local_name: &str, limits: FlowLimits) -> Self {
        Self {
            limits,
            local_name: local_name.to_owned(),
            next_id: 1,
            flows: HashMap::new(),
            by_stream: HashMap::new(),
            backlogs: HashMap::new(),
            ended: VecDeque::new(),
            events: VecDeque::new(),
            dirty: Vec::new(),
            shutting_down: false,
            deadlines: BTreeSet::new(),
            dialing: 0,
            per_peer: HashMap::new(),
        }
    }

    pub(crate) fn limits(&self) -> &FlowLimits {
        &self.limits
    }

    pub(crate) fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// The node at the other end of flow `id`.
    pub(crate) fn peer(&self, id: FlowId) -> Option<&str> {
        self.flows.get(&id).map(|f| f.peer.as_str())
    }

    pub(crate) fn stats(&self, id: FlowId) -> Option<FlowStats> {
        self.flows.get(&id).map(|f| FlowStats {
            send_queued_bytes: f.send_queue.len(),
            recv_queued_bytes: f.recv_bytes,
            recv_queued_messages: f.recv_queue.len(),
            messages_sent: f.messages_sent,
            bytes_sent: f.bytes_sent,
            messages_received: f.messages_received,
            bytes_received: f.bytes_received,
        })
    }

    /// Flows open (or opening) with `peer`.
    fn flows_with(&self, peer: &str) -> usize {
        self.per_peer.get(peer).copied().unwrap_or(0)
    }

    /// Counts flow `id` as one with `peer` (once it is known).
    fn count_peer(&mut self, peer: &str) {
        if !peer.is_empty() {
            *self.per_peer.entry(peer.to_owned()).or_default() += 1;
        }
    }

    /// Takes flow `id` out of every table and count.
    fn remove_flow(&mut self, id: FlowId) -> Option<Flow> {
        let flow = self.flows.remove(&id)?;
        if matches!(flow.phase, Phase::Dialing { .. }) {
            self.dialing -= 1;
        }
        if let Some(count) = self.per_peer.get_mut(&flow.peer) {
            *count -= 1;
            if *count == 0 {
                self.per_peer.remove(&flow.peer);
            }
        }
        Some(flow)
    }

    /// The deadline of a flow not yet open, if `entry` still is one.
    fn is_live_deadline(&self, &(at, id): &(Instant, FlowId)) -> bool {
        self.flows.get(&id).is_some_and(|f| match f.phase {
            Phase::Dialing { deadline } | Phase::AwaitOpen { deadline } => deadline == at,
            Phase::Open => false,
        })
    }

    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(first) = self.deadlines.first() {
            if self.is_live_deadline(first) {
                return Some(first.0);
            }
            self.deadlines.pop_first();
        }
        None
    }

    fn new_flow(
        &mut self,
        endpoint: &str,
        peer: &str,
        phase: Phase,
        parser: FlowStreamParser,
    ) -> FlowId {
        let id = FlowId(self.next_id);
        self.next_id += 1;
        let span = tracing::debug_span!(
            "flow",
            id = id.0,
            endpoint = tracing::field::Empty,
            peer = tracing::field::Empty
        );
        if !endpoint.is_empty() {
            span.record("endpoint", tracing::field::display(endpoint));
            span.record("peer", tracing::field::display(peer));
        }
        match phase {
            Phase::Dialing { deadline } => {
                self.dialing += 1;
                self.deadlines.insert((deadline, id));
            }
            Phase::AwaitOpen { deadline } => {
                self.deadlines.insert((deadline, id));
            }
            Phase::Open => {}
        }
        self.count_peer(peer);
        self.flows.insert(
            id,
            Flow {
                endpoint: endpoint.to_owned(),
                peer: peer.to_owned(),
                stream: None,
                phase,
                parser,
                recv_queue: RecvQueue::default(),
                reader_cuts: false,
                recv_bytes: 0,
                remote_finished: false,
                early: None,
                send_queue: SendQueue::default(),
                finish_requested: false,
                fin_sent: false,
                peer_max_message: 0,
                writer_blocked: false,
                send_dirty: false,
                held: false,
                released: false,
                awaiting_accept: false,
                messages_sent: 0,
                bytes_sent: 0,
                messages_received: 0,
                bytes_received: 0,
                span,
            },
        );
        id
    }

    /// Whether this node is shutting down (no new flows).
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Starts a dial of `endpoint` at node `peer` (at `addr`).
    pub(crate) fn dial(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        endpoint: &str,
        peer: &str,
        addr: std::net::SocketAddr,
    ) -> Result<FlowId, FlowError> {
        let refused = |error: FlowError| {
            debug!(endpoint, peer, %error, "dial refused here");
            Err(error)
        };
        if self.shutting_down {
            return refused(FlowError::ShuttingDown);
        }
        if self.flows.len() >= self.limits.max_flows {
            return refused(FlowError::LimitReached {
                what: "max_flows",
                limit: self.limits.max_flows,
            });
        }
        if self.dialing >= self.limits.max_pending_dials {
            return refused(FlowError::LimitReached {
                what: "max_pending_dials",
                limit: self.limits.max_pending_dials,
            });
        }
        if self.flows_with(peer) >= self.limits.max_flows_per_peer {
            return refused(FlowError::LimitReached {
                what: "max_flows_per_peer",
                limit: self.limits.max_flows_per_peer,
            });
        }
        let deadline = now + self.limits.dial_timeout;
        let parser = FlowStreamParser::for_dialler(self.limits.max_message_size);
        let id = self.new_flow(endpoint, peer, Phase::Dialing { deadline }, parser);
        if let Some(flow) = self.flows.get(&id) {
            debug!(parent: &flow.span, "dialling");
        }
        transport.open_flow_stream(now, peer, addr, id.0);
        Ok(id)
    }

    /// Starts a dial like [`dial`](Self::dial) that carries one message and the end of the
    /// sending side: they are written with the `FlowOpen`, so on an open connection the owner
    /// has the open, the message and the end after half a round trip, and its answer and reply
    /// can travel together. If the owner refuses, it discards them.
    pub(crate) fn dial_request(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        (endpoint, peer, addr): (&str, &str, std::net::SocketAddr),
        message: Bytes,
    ) -> Result<FlowId, FlowError> {
        let id = self.dial(now, transport, endpoint, peer, addr)?;
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.messages_sent += 1;
            flow.bytes_sent += message.len() as u64;
            flow.early = Some(message);
            flow.finish_requested = true;
        }
        Ok(id)
    }

    pub(crate) fn on_stream_opened(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        token: u64,
        conn: ConnectionHandle,
        stream: StreamId,
    ) {
        let id = FlowId(token);
        let Some(flow) = self.flows.get_mut(&id) else {
            // The dial already failed (timeout): abandon the stream.
            transport.abort_stream(conn, stream, ResetCode::Dropped.to_quic());
            return;
        };
        flow.stream = Some((conn, stream));
        flow.held = true;
        transport.hold_conn(now, conn);
        self.by_stream.insert((conn, stream), id);
        let open = wire::FlowOpen {
            protocol_version: wire::PROTOCOL_VERSION,
            endpoint: flow.endpoint.clone(),
            source_node: self.local_name.clone(),
            max_message_size: self.limits.max_message_size as u64,
        };
        let early = flow.early.take();
        flow.send_queue.push_control_then(&open, early);
        self.flush(transport, id);
    }

    pub(crate) fn on_open_failed(&mut self, token: u64) {
        let id = FlowId(token);
        if let Some(flow) = self.flows.get(&id) {
            let error = FlowError::ConnectionLost {
                peer: flow.peer.clone(),
            };
            debug!(parent: &flow.span, %error, "dial failed: no connection");
            let endpoint = flow.endpoint.clone();
            self.end(id, Err(error.clone()));
            self.events.push_back(FlowEvent::DialFailed {
                flow: id,
                endpoint,
                error,
            });
        }
    }

    pub(crate) fn on_incoming(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        conn: ConnectionHandle,
        stream: StreamId,
    ) {
        if self.flows.len() >= self.limits.max_flows {
            debug!(
                limit = self.limits.max_flows,
                "incoming flow refused: max_flows reached"
            );
            transport.abort_stream(conn, stream, StreamErrorCode::ShuttingDown as u64);
            return;
        }
        let parser = FlowStreamParser::for_acceptor(self.limits.max_message_size);
        let deadline = now + self.limits.dial_timeout;
        let id = self.new_flow("", "", Phase::AwaitOpen { deadline }, parser);
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.stream = Some((conn, stream));
        }
        self.by_stream.insert((conn, stream), id);
    }

    pub(crate) fn on_readable(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        conn: ConnectionHandle,
        stream: StreamId,
    ) {
        if let Some(&id) = self.by_stream.get(&(conn, stream)) {
            self.read(now, transport, registry, id);
        }
    }

    /// Reads what the flow has room for and processes the frames.
    fn read(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        id: FlowId,
    ) {
        loop {
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            let Some((conn, stream)) = flow.stream else {
                return;
            };
            let room = self.limits.recv_buffer.saturating_sub(flow.recv_bytes);
            if room == 0 || flow.remote_finished || flow.awaiting_accept {
                return;
            }
            let read = transport.flow_read(conn, stream, room.min(64 * 1024));
            let got = read.data.iter().map(Bytes::len).sum::<usize>();
            for chunk in read.data {
                flow.parser.push(chunk);
            }
            if let Err(e) = self.process_frames(now, transport, registry, id) {
                return self.fail_with_reset(transport, id, e);
            }
            if let Some(code) = read.reset {
                let code = ResetCode::from_quic(code);
                let error = match code {
                    ResetCode::MessageTooLarge => FlowError::MessageTooLarge {
                        size: 0,
                        limit: self.flows.get(&id).map_or(0, |f| f.peer_max_message),
                    },
                    _ => FlowError::Reset { code },
                };
                // Reset our sending half too, or the stream would hold one of the peer's
                // concurrent-stream slots forever.
                return self.close(transport, id, error, Some(code));
            }
            if read.finished {
                self.on_remote_finished(transport, id);
                return;
            }
            if got == 0 {
                return;
            }
        }
    }

    fn on_remote_finished(&mut self, transport: &mut impl FlowStreams, id: FlowId) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if flow.parser.buffered() > 0 {
            return self.fail_with_reset(
                transport,
                id,
                FlowError::Reset {
                    code: ResetCode::ProtocolViolation,
                },
            );
        }
        match flow.phase {
            Phase::Open => {
                flow.remote_finished = true;
                self.events.push_back(FlowEvent::Finished { flow: id });
                self.events.push_back(FlowEvent::Readable { flow: id });
                self.maybe_done(transport, id);
            }
            Phase::Dialing { .. } | Phase::AwaitOpen { .. } => {
                // Ended before the open was answered (or made): a broken peer.
                let error = FlowError::Reset {
                    code: ResetCode::ProtocolViolation,
                };
                self.close(transport, id, error, Some(ResetCode::ProtocolViolation));
            }
        }
    }

    /// Decodes complete frames according to the flow's phase.
    fn process_frames(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        id: FlowId,
    ) -> Result<(), FlowError> {
        loop {
            let Some(flow) = self.flows.get_mut(&id) else {
                return Ok(());
            };
            if flow.phase == Phase::Open {
                // The data path: every complete message, in one loop.
                let was_empty = flow.recv_queue.is_empty();
                let before = flow.recv_queue.bytes();
                if flow.reader_cuts {
                    while let Some(run) = flow.parser.next_run()? {
                        if !flow.released {
                            flow.recv_queue.push_run(run);
                        }
                    }
                } else {
                    while let Some(message) = flow.parser.next_message()? {
                        if !flow.released {
                            flow.recv_queue.push_back(message);
                        }
                    }
                }
                flow.recv_bytes += flow.recv_queue.bytes() - before;
                if was_empty && !flow.recv_queue.is_empty() {
                    self.events.push_back(FlowEvent::Readable { flow: id });
                }
                return Ok(());
            }
            let Some(frame) = flow.parser.next_frame()? else {
                return Ok(());
            };
            let violation = FlowError::Reset {
                code: ResetCode::ProtocolViolation,
            };
            match (flow.phase, frame) {
                (Phase::Dialing { .. }, FlowFrame::Response(response)) => match response.result {
                    Some(wire::flow_response::Result::Accept(accept)) => {
                        flow.phase = Phase::Open;
                        self.dialing -= 1;
                        flow.peer_max_message = accept.max_message_size;
                        debug!(parent: &flow.span, "flow open");
                        self.events.push_back(FlowEvent::Opened {
                            flow: id,
                            endpoint: flow.endpoint.clone(),
                            peer: flow.peer.clone(),
                        });
                    }
                    Some(wire::flow_response::Result::Reject(reject)) => {
                        let error = FlowError::Rejected {
                            endpoint: flow.endpoint.clone(),
                            reason: RejectReason::from_wire(reject.reason),
                            detail: reject.detail,
                        };
                        let endpoint = flow.endpoint.clone();
                        debug!(parent: &flow.span, %error, "dial refused by the owner");
                        self.forget(transport, id);
                        self.remember(id, Err(error.clone()));
                        self.events.push_back(FlowEvent::DialFailed {
                            flow: id,
                            endpoint,
                            error,
                        });
                        return Ok(());
                    }
                    None => {
                        return Err(FlowError::Reset {
                            code: ResetCode::ProtocolViolation,
                        });
                    }
                },
                (Phase::AwaitOpen { .. }, FlowFrame::Open(mut open)) => {
                    let (conn, _) = flow.stream.ok_or(FlowError::UnknownFlow)?;
                    if !transport.authenticate(conn, &open.source_node) {
                        return Err(FlowError::Reset {
                            code: ResetCode::ProtocolViolation,
                        });
                    }
                    let backlog = self.backlogs.get(&open.endpoint).map_or(0, VecDeque::len);
                    let refusal = if open.protocol_version != wire::PROTOCOL_VERSION {
                        Some(RejectReason::VersionMismatch)
                    } else if self.shutting_down {
                        Some(RejectReason::ShuttingDown)
                    } else if registry.lost_conflict(&open.endpoint) {
                        Some(RejectReason::NameConflict)
                    } else if !registry.is_local(&open.endpoint) {
                        Some(RejectReason::NoSuchEndpoint)
                    } else if backlog >= self.limits.accept_backlog {
                        Some(RejectReason::BacklogFull)
                    } else if self.flows_with(&open.source_node) >= self.limits.max_flows_per_peer {
                        Some(RejectReason::LimitExceeded)
                    } else {
                        None
                    };
                    self.count_peer(&open.source_node);
                    let flow = self.flows.get_mut(&id).ok_or(FlowError::UnknownFlow)?;
                    flow.endpoint = std::mem::take(&mut open.endpoint);
                    flow.peer = std::mem::take(&mut open.source_node);
                    flow.span
                        .record("endpoint", tracing::field::display(&flow.endpoint));
                    flow.span
                        .record("peer", tracing::field::display(&flow.peer));
                    let response = match refusal {
                        Some(reason) => wire::flow_response::Result::Reject(wire::FlowReject {
                            reason: reason.to_wire() as i32,
                            detail: format!("{reason:?}"),
                        }),
                        None => wire::flow_response::Result::Accept(wire::FlowAccept {
                            max_message_size: self.limits.max_message_size as u64,
                        }),
                    };
                    if let Some(reason) = refusal {
                        debug!(parent: &flow.span, ?reason, "incoming flow refused");
                        // The refusal is the stream's last message; the flow never existed for
                        // the application, so it leaves no trace here.
                        let mut answer = Vec::new();
                        framing::encode_message(
                            &wire::FlowResponse {
                                result: Some(response),
                            },
                            &mut answer,
                        );
                        let (conn, stream) = flow.stream.ok_or(FlowError::UnknownFlow)?;
                        self.remove_flow(id);
                        self.by_stream.remove(&(conn, stream));
                        transport.flow_reply_and_release(conn, stream, answer.into());
                        return Ok(());
                    }
                    flow.send_queue.push_control(&wire::FlowResponse {
                        result: Some(response),
                    });
                    flow.phase = Phase::Open;
                    flow.peer_max_message = open.max_message_size;
                    flow.held = true;
                    flow.awaiting_accept = true;
                    transport.hold_conn(now, conn);
                    debug!(parent: &flow.span, "incoming flow queued for accept");
                    let (endpoint, peer) = (flow.endpoint.clone(), flow.peer.clone());
                    self.flush(transport, id);
                    match self.backlogs.get_mut(&endpoint) {
                        Some(backlog) => backlog.push_back(id),
                        None => {
                            self.backlogs.insert(endpoint.clone(), VecDeque::from([id]));
                        }
                    }
                    self.events.push_back(FlowEvent::Incoming {
                        flow: id,
                        endpoint,
                        peer,
                    });
                }
                // A frame the phase does not allow (the parser only yields the control message
                // first, so this is a message on a flow that was refused).
                _ => return Err(violation),
            }
        }
    }

    /// Takes the next flow waiting in `endpoint`'s backlog.
    pub(crate) fn accept(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        endpoint: &str,
    ) -> Option<FlowId> {
        let id = self.backlogs.get_mut(endpoint)?.pop_front()?;
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.awaiting_accept = false;
        }
        // What arrived while it waited is read now.
        self.read(now, transport, registry, id);
        Some(id)
    }

    /// Queues `message` for sending; [`flush_sends`](Self::flush_sends) writes it to the stream.
    /// `check_size` false skips the peer's size limit (tests of the receiver's enforcement only).
    pub(crate) fn send(
        &mut self,
        id: FlowId,
        message: Bytes,
        check_size: bool,
    ) -> Result<(), FlowError> {
        let limit = self.limits.send_buffer;
        let flow = self.sendable(id)?;
        if check_size && message.len() as u64 > flow.peer_max_message {
            return Err(FlowError::MessageTooLarge {
                size: message.len() as u64,
                limit: flow.peer_max_message,
            });
        }
        // One message may always be queued on an empty buffer, whatever its size.
        let queued = flow.send_queue.len();
        if queued > 0 && queued + message.len() > limit {
            flow.writer_blocked = true;
            return Err(FlowError::WouldBlock);
        }
        flow.messages_sent += 1;
        flow.bytes_sent += message.len() as u64;
        flow.send_queue.push_message(message);
        // Written to the stream at the next `flush_sends`: messages sent in a burst share one
        // write (and the stream's buffer holds one chunk for them, not one per message).
        if !std::mem::replace(&mut flow.send_dirty, true) {
            self.dirty.push(id);
        }
        Ok(())
    }

    /// The flow `id` if it can take messages to send, else why not.
    fn sendable(&mut self, id: FlowId) -> Result<&mut Flow, FlowError> {
        if !self.flows.contains_key(&id) {
            return Err(self.ended_error(id));
        }
        let flow = self.flows.get_mut(&id).ok_or(FlowError::UnknownFlow)?;
        if flow.phase != Phase::Open {
            return Err(FlowError::NotOpen);
        }
        if flow.finish_requested {
            return Err(FlowError::Finished);
        }
        Ok(flow)
    }

    /// Queues messages already framed elsewhere (`messages` of `bytes` bytes of bodies, checked
    /// against the peer's size limit by whoever framed them); like [`send`](Self::send) but
    /// without the send buffer limit, which the caller enforces.
    pub(crate) fn send_staged(
        &mut self,
        id: FlowId,
        staged: &mut SendQueue,
        messages: u64,
        bytes: u64,
    ) -> Result<(), FlowError> {
        let flow = self.sendable(id)?;
        flow.messages_sent += messages;
        flow.bytes_sent += bytes;
        flow.send_queue.append(staged);
        if !std::mem::replace(&mut flow.send_dirty, true) {
            self.dirty.push(id);
        }
        Ok(())
    }

    /// Bytes of a flow waiting to be written to its stream; `None` once it ended.
    pub(crate) fn send_queued(&self, id: FlowId) -> Option<usize> {
        self.flows.get(&id).map(|f| f.send_queue.len())
    }

    /// The largest message the other side of an open flow accepts.
    pub(crate) fn peer_max_message(&self, id: FlowId) -> Option<u64> {
        self.flows
            .get(&id)
            .filter(|f| f.phase == Phase::Open)
            .map(|f| f.peer_max_message)
    }

    /// Moves every received message of a flow, in order, to the end of `into`. They are
    /// counted as received but still count against the flow's receive buffer until
    /// [`release_received`](Self::release_received) gives their bytes back.
    pub(crate) fn take_received(&mut self, id: FlowId, into: &mut RecvQueue) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.messages_received += flow.recv_queue.len() as u64;
        flow.bytes_received += flow.recv_queue.bytes() as u64;
        flow.recv_queue.append_to(into);
    }

    /// From now on, flow `id` queues what it receives as runs of whole frames, which whoever
    /// takes them cuts into messages: one slice per received chunk here instead of one per
    /// message, for a reader that takes messages in batches (`Flow::recv_many`).
    pub(crate) fn let_reader_cut(&mut self, id: FlowId) {
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.reader_cuts = true;
        }
    }

    /// Whether a flow holds as many received bytes as its receive buffer allows (it reads no
    /// more from its stream until some are released).
    pub(crate) fn recv_full(&self, id: FlowId) -> bool {
        self.flows
            .get(&id)
            .is_some_and(|f| f.recv_bytes >= self.limits.recv_buffer)
    }

    /// The application consumed `bytes` of messages taken with
    /// [`take_received`](Self::take_received): room again, so the flow reads on if it had stopped.
    pub(crate) fn release_received(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        id: FlowId,
        bytes: usize,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let was_full = flow.recv_bytes >= self.limits.recv_buffer;
        flow.recv_bytes = flow.recv_bytes.saturating_sub(bytes);
        if was_full {
            self.read(now, transport, registry, id);
        }
    }

    /// Whether messages wait for [`flush_sends`](Self::flush_sends) or events for the node.
    pub(crate) fn needs_flush(&self) -> bool {
        !self.dirty.is_empty() || !self.events.is_empty()
    }

    /// Writes the messages queued by [`send`](Self::send) since the last call to their streams.
    pub(crate) fn flush_sends(&mut self, transport: &mut impl FlowStreams) {
        let dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            if let Some(flow) = self.flows.get_mut(&id) {
                flow.send_dirty = false;
                self.flush(transport, id);
            }
        }
        // Keep the allocation.
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Takes the next received message.
    /// Takes the next message, and up to `max_more` further queued ones into `more`.
    pub(crate) fn recv(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        id: FlowId,
        more: &mut RecvQueue,
        max_more: usize,
    ) -> Result<Recv, FlowError> {
        let Some(flow) = self.flows.get_mut(&id) else {
            return match self.ended.iter().find(|(f, _)| *f == id) {
                Some((_, Ok(()))) => Ok(Recv::Finished),
                Some((_, Err(e))) => Err(e.clone()),
                None => Err(FlowError::UnknownFlow),
            };
        };
        if let Some(message) = flow.recv_queue.pop_front() {
            let was_full = flow.recv_bytes >= self.limits.recv_buffer;
            flow.recv_bytes -= message.len();
            flow.messages_received += 1;
            flow.bytes_received += message.len() as u64;
            let (messages, bytes) = flow.recv_queue.move_to(more, max_more);
            flow.recv_bytes -= bytes;
            flow.messages_received += messages as u64;
            flow.bytes_received += bytes as u64;
            if was_full || flow.recv_queue.is_empty() {
                // Room again: pull more from QUIC (which reopens the peer's flow-control window).
                self.read(now, transport, registry, id);
            }
            return Ok(Recv::Message(message));
        }
        if flow.remote_finished {
            self.maybe_done(transport, id);
            return Ok(Recv::Finished);
        }
        Ok(Recv::Pending)
    }

    /// Finishes the sending side once everything queued is sent.
    pub(crate) fn finish(
        &mut self,
        transport: &mut impl FlowStreams,
        id: FlowId,
    ) -> Result<(), FlowError> {
        let Some(flow) = self.flows.get_mut(&id) else {
            return Err(self.ended_error(id));
        };
        if flow.phase != Phase::Open {
            return Err(FlowError::NotOpen);
        }
        flow.finish_requested = true;
        self.flush(transport, id);
        Ok(())
    }

    /// The application dropped a finished flow: stop delivering to it (what arrives is read and
    /// discarded) and let the flow end once the peer finishes.
    pub(crate) fn release(
        &mut self,
        now: Instant,
        transport: &mut impl FlowStreams,
        registry: &Registry,
        id: FlowId,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.released = true;
        flow.recv_queue.clear();
        flow.recv_bytes = 0;
        self.read(now, transport, registry, id);
        self.maybe_done(transport, id);
    }

    /// Aborts the flow both ways with `code`.
    pub(crate) fn reset(
        &mut self,
        transport: &mut impl FlowStreams,
        id: FlowId,
        code: ResetCode,
    ) -> Result<(), FlowError> {
        if !self.flows.contains_key(&id) {
            return Err(self.ended_error(id));
        }
        self.close(transport, id, FlowError::Reset { code }, Some(code));
        // The local side knows it reset (or gave up its dial); no event for it.
        self.events.retain(|e| {
            !matches!(e, FlowEvent::Closed { flow, .. } | FlowEvent::DialFailed { flow, .. } if *flow == id)
        });
        Ok(())
    }

    pub(crate) fn on_writable(
        &mut self,
        transport: &mut impl FlowStreams,
        conn: ConnectionHandle,
        stream: StreamId,
    ) {
        if let Some(&id) = self.by_stream.get(&(conn, stream)) {
            self.flush(transport, id);
        }
    }

    pub(crate) fn on_stopped(
        &mut self,
        transport: &mut impl FlowStreams,
        conn: ConnectionHandle,
        stream: StreamId,
        code: u64,
    ) {
        if let Some(&id) = self.by_stream.get(&(conn, stream)) {
            let code = ResetCode::from_quic(code);
            let error = match code {
                ResetCode::MessageTooLarge => FlowError::MessageTooLarge {
                    size: 0,
                    limit: self.flows.get(&id).map_or(0, |f| f.peer_max_message),
                },
                _ => FlowError::Reset { code },
            };
            self.close(transport, id, error, Some(code));
        }
    }

    /// Every flow on a lost connection fails.
    pub(crate) fn on_connection_lost(
        &mut self,
        transport: &mut impl FlowStreams,
        conn: ConnectionHandle,
    ) {
        let ids: Vec<FlowId> = self
            .by_stream
            .iter()
            .filter(|((c, _), _)| *c == conn)
            .map(|(_, id)| *id)
            .collect();
        let mut ids = ids;
        ids.sort();
        for id in ids {
            let peer = self
                .flows
                .get(&id)
                .map(|f| f.peer.clone())
                .unwrap_or_default();
            self.fail(transport, id, FlowError::ConnectionLost { peer });
        }
    }

    /// Every flow with `peer` fails: membership declared it Dead or Left.
    pub(crate) fn on_peer_gone(&mut self, transport: &mut impl FlowStreams, peer: &str) {
        let mut ids: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| f.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        // In id order, so that a simulation replays exactly.
        ids.sort_unstable();
        for id in ids {
            self.fail(
                transport,
                id,
                FlowError::PeerGone {
                    peer: peer.to_owned(),
                },
            );
        }
    }

    /// An endpoint stopped being served here: flows waiting in its backlog are reset.
    pub(crate) fn on_endpoint_closed(
        &mut self,
        transport: &mut impl FlowStreams,
        endpoint: &str,
        code: ResetCode,
    ) {
        if let Some(backlog) = self.backlogs.remove(endpoint) {
            for id in backlog {
                self.close(transport, id, FlowError::Reset { code }, Some(code));
                self.events
                    .retain(|e| !matches!(e, FlowEvent::Closed { flow, .. } if *flow == id));
            }
        }
    }

    /// Fails dials whose owner did not answer in time, and drops incoming streams whose
    /// `FlowOpen` did not come in time.
    pub(crate) fn handle_timeout(&mut self, now: Instant, transport: &mut impl FlowStreams) {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            match self.flows.get(&id).map(|f| f.phase) {
                Some(Phase::Dialing { deadline }) if deadline == at => due.push((id, true)),
                Some(Phase::AwaitOpen { deadline }) if deadline == at => due.push((id, false)),
                // Opened or ended since.
                _ => {}
            }
        }
        for (id, dialing) in due {
            if dialing {
                let endpoint = self
                    .flows
                    .get(&id)
                    .map(|f| f.endpoint.clone())
                    .unwrap_or_default();
                let error = FlowError::DialTimeout {
                    endpoint,
                    after: self.limits.dial_timeout,
                };
                self.close(transport, id, error, Some(ResetCode::Dropped));
            } else {
                let error = FlowError::Reset {
                    code: ResetCode::ProtocolViolation,
                };
                self.close(transport, id, error, Some(ResetCode::ProtocolViolation));
            }
        }
    }

    /// Refuses new flows from now on (dials fail, incoming ones are refused with
    /// `ShuttingDown`); open flows carry on.
    pub(crate) fn stop_accepting(&mut self) {
        self.shutting_down = true;
    }

    /// Refuses new flows from now on and resets the open ones.
    pub(crate) fn shut_down(&mut self, transport: &mut impl FlowStreams) {
        self.shutting_down = true;
        let mut ids: Vec<FlowId> = self.flows.keys().copied().collect();
        // In id order, so that a simulated shutdown replays exactly.
        ids.sort_unstable();
        for id in ids {
            self.close(
                transport,
                id,
                FlowError::ShuttingDown,
                Some(ResetCode::ShuttingDown),
            );
        }
    }

    fn flush(&mut self, transport: &mut impl FlowStreams, id: FlowId) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let Some((conn, stream)) = flow.stream else {
            return;
        };
        if flow
            .send_queue
            .write_with(|chunks| transport.flow_write_chunks(conn, stream, chunks))
            .is_none()
        {
            // The stream is gone; the stop or reset event tells why.
            return;
        }
        if flow.send_queue.is_empty() && flow.finish_requested && !flow.fin_sent {
            flow.fin_sent = true;
            transport.flow_finish(conn, stream);
        }
        if flow.writer_blocked && flow.send_queue.len() < self.limits.send_buffer {
            flow.writer_blocked = false;
            self.events.push_back(FlowEvent::Writable { flow: id });
        }
        self.maybe_done(transport, id);
    }

    /// A flow whose both sides finished and whose messages were all read is done.
    fn maybe_done(&mut self, transport: &mut impl FlowStreams, id: FlowId) {
        let done = self.flows.get(&id).is_some_and(|f| {
            f.fin_sent && f.remote_finished && f.recv_queue.is_empty() && f.send_queue.is_empty()
        });
        if done {
            if let Some(flow) = self.flows.get(&id) {
                debug!(parent: &flow.span, "flow finished both ways");
            }
            self.forget(transport, id);
            self.remember(id, Ok(()));
        }
    }

    /// Resets the flow because of what the peer sent (`error`), telling the peer why.
    fn fail_with_reset(&mut self, transport: &mut impl FlowStreams, id: FlowId, error: FlowError) {
        let code = match &error {
            FlowError::MessageTooLarge { .. } => ResetCode::MessageTooLarge,
            _ => ResetCode::ProtocolViolation,
        };
        self.close(transport, id, error, Some(code));
    }

    fn fail(&mut self, transport: &mut impl FlowStreams, id: FlowId, error: FlowError) {
        self.close(transport, id, error, Some(ResetCode::Dropped));
    }

    /// Ends the flow with `error`; `reset` aborts the stream with that code. The application
    /// hears of it as the phase requires: a dial fails ([`FlowEvent::DialFailed`]), an open flow
    /// closes ([`FlowEvent::Closed`]), an incoming flow not yet opened was never seen.
    fn close(
        &mut self,
        transport: &mut impl FlowStreams,
        id: FlowId,
        error: FlowError,
        reset: Option<ResetCode>,
    ) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        let (phase, endpoint) = (flow.phase, flow.endpoint.clone());
        debug!(parent: &flow.span, %error, ?reset, "flow ended");
        self.forget_aborting(transport, id, reset);
        match phase {
            Phase::Dialing { .. } => {
                self.remember(id, Err(error.clone()));
                self.events.push_back(FlowEvent::DialFailed {
                    flow: id,
                    endpoint,
                    error,
                });
            }
            Phase::Open => {
                self.remember(id, Err(error.clone()));
                self.events.push_back(FlowEvent::Closed { flow: id, error });
            }
            Phase::AwaitOpen { .. } => {}
        }
    }

    fn end(&mut self, id: FlowId, result: Result<(), FlowError>) {
        if let Some(flow) = self.remove_flow(id) {
            debug!(parent: &flow.span, ?result, "flow ended");
        }
        self.remember(id, result);
    }

    /// Drops the flow's state and gives its stream back: a sending half not finished is reset,
    /// the receiving half is read to its end and discarded, so the stream is freed on both sides
    /// however the flow ended.
    fn forget(&mut self, transport: &mut impl FlowStreams, id: FlowId) {
        self.forget_aborting(transport, id, None);
    }

    /// [`forget`](Self::forget), but with `abort`, the whole stream is aborted with that code
    /// whatever was sent: the one call that gives the stream back.
    fn forget_aborting(
        &mut self,
        transport: &mut impl FlowStreams,
        id: FlowId,
        abort: Option<ResetCode>,
    ) {
        if let Some(flow) = self.remove_flow(id) {
            // A stream another flow now holds (never expected) is that flow's to end.
            let stream = flow
                .stream
                .filter(|key| !matches!(self.by_stream.get(key), Some(&other) if other != id));
            if let Some((conn, stream)) = stream {
                self.by_stream.remove(&(conn, stream));
                match abort {
                    Some(code) => transport.abort_stream(conn, stream, code.to_quic()),
                    None if flow.fin_sent => transport.flow_release(conn, stream),
                    None => transport.abort_stream(conn, stream, ResetCode::Dropped.to_quic()),
                }
                if flow.held {
                    transport.release_conn(conn);
                }
            }
            if let Some(backlog) = self.backlogs.get_mut(&flow.endpoint) {
                backlog.retain(|f| *f != id);
            }
        }
    }

    fn remember(&mut self, id: FlowId, result: Result<(), FlowError>) {
        if self.ended.len() >= ENDED_MEMORY {
            self.ended.pop_front();
        }
        self.ended.push_back((id, result));
    }

    fn ended_error(&self, id: FlowId) -> FlowError {
        match self.ended.iter().find(|(f, _)| *f == id) {
            Some((_, Ok(()))) => FlowError::Finished,
            Some((_, Err(e))) => e.clone(),
            None => FlowError::UnknownFlow,
        }
    }
}

#[cfg(test)]
#[path = "flow_tests.rs"]
mod tests;
