//! In-process flows: both ends on one node, connected by a bounded channel per direction.
//!
//! Nothing here touches the network or a codec: a typed value moves as the value itself (boxed),
//! raw bytes move as `Bytes`. The semantics are those of remote flows: messages in order, `finish`
//! ends one direction after everything sent was read, `reset` aborts both directions with a code,
//! dropping an unfinished end resets with `ResetCode::Dropped`, a message larger than
//! `max_message_size` is refused to the sender, and a full direction makes `send` wait.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::codec::CodecError;
use crate::flow::{FlowError, FlowStats, RecvQueue, ResetCode};

use super::Error;

/// Encodes a boxed value with the codec of the typed flow that sent it, for a receiver that wants
/// bytes or a value of another type.
pub(crate) trait ErasedEncode: Send + Sync {
    fn encode(&self, value: &(dyn Any + Send)) -> Result<Bytes, CodecError>;
}

/// One message on a flow: bytes, or (in-process only) a value that was never serialized.
pub(crate) enum Message {
    Bytes(Bytes),
    Value {
        value: Box<dyn Any + Send>,
        encoder: Arc<dyn ErasedEncode>,
    },
}

impl Message {
    /// The message as bytes, encoding a value with its sender's codec.
    pub(crate) fn into_bytes(self) -> Result<Bytes, CodecError> {
        match self {
            Self::Bytes(b) => Ok(b),
            Self::Value { value, encoder } => encoder.encode(&*value),
        }
    }

    /// Bytes counted against buffers and the message size limit (a value has no wire size).
    fn wire_len(&self) -> usize {
        match self {
            Self::Bytes(b) => b.len(),
            Self::Value { .. } => 0,
        }
    }
}

/// Why an in-process flow ended abnormally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    Reset(ResetCode),
    Shutdown,
}

impl Closed {
    fn error(self) -> Error {
        match self {
            Self::Reset(code) => Error::Flow(FlowError::Reset { code }),
            Self::Shutdown => Error::Shutdown,
        }
    }
}

#[derive(Default)]
struct Direction {
    queue: VecDeque<Message>,
    queued_bytes: usize,
    /// The writer finished: once `queue` is empty the reader sees the end.
    finished: bool,
    /// The reader dropped its end after finishing its own direction: writes are discarded.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    messages: u64,
    bytes: u64,
}

struct State {
    /// `directions[s]` carries what side `s` sends.
    directions: [Direction; 2],
    closed: Option<Closed>,
}

/// The shared state of one in-process flow.
pub(crate) struct LocalFlow {
    state: Mutex<State>,
    capacity: usize,
    max_bytes: usize,
    max_message: usize,
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

impl LocalFlow {
    /// A new flow; returns the dialler's end and the acceptor's end.
    pub(crate) fn pair(
        capacity: usize,
        max_bytes: usize,
        max_message: usize,
    ) -> (LocalEnd, LocalEnd) {
        let flow = Arc::new(Self {
            state: Mutex::new(State {
                directions: [Direction::default(), Direction::default()],
                closed: None,
            }),
            capacity: capacity.max(1),
            max_bytes,
            max_message,
        });
        (
            LocalEnd {
                flow: flow.clone(),
                side: 0,
            },
            LocalEnd { flow, side: 1 },
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding this lock; recover the state if something ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the flow both ways (unless it already ended) and wakes everyone waiting on it.
    pub(crate) fn close(&self, why: Closed) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        state.closed = Some(why);
        let mut waiting = Vec::new();
        for d in &mut state.directions {
            d.queue.clear();
            d.queued_bytes = 0;
            waiting.extend(d.reader.take());
            waiting.extend(d.writer.take());
        }
        drop(state);
        waiting.into_iter().for_each(Waker::wake);
    }
}

/// One end of an in-process flow.
pub(crate) struct LocalEnd {
    flow: Arc<LocalFlow>,
    side: usize,
}

impl LocalEnd {
    pub(crate) fn flow(&self) -> &Arc<LocalFlow> {
        &self.flow
    }

    /// Queues `message` (taken from the slot once accepted), waiting while the direction is full.
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        message: &mut Option<Message>,
    ) -> Poll<Result<(), Error>> {
        let Some(len) = message.as_ref().map(Message::wire_len) else {
            return Poll::Ready(Ok(()));
        };
        let mut state = self.flow.lock();
        if let Some(closed) = state.closed {
            return Poll::Ready(Err(closed.error()));
        }
        let out = &mut state.directions[self.side];
        if out.finished {
            return Poll::Ready(Err(FlowError::Finished.into()));
        }
        if len > self.flow.max_message {
            return Poll::Ready(Err(FlowError::MessageTooLarge {
                size: len as u64,
                limit: self.flow.max_message as u64,
            }
            .into()));
        }
        if out.reader_gone {
            message.take();
            out.messages += 1;
            out.bytes += len as u64;
            return Poll::Ready(Ok(()));
        }
        // One message may always be queued on an empty direction, whatever its size.
        let full = out.queue.len() >= self.flow.capacity
            || (out.queued_bytes > 0 && out.queued_bytes + len > self.flow.max_bytes);
        if full {
            store(&mut out.writer, cx);
            return Poll::Pending;
        }
        let mut reader = None;
        if let Some(m) = message.take() {
            out.queue.push_back(m);
            out.queued_bytes += len;
            out.messages += 1;
            out.bytes += len as u64;
            reader = out.reader.take();
        }
        // Wake after unlocking, so the woken task does not start by waiting for this lock.
        drop(state);
        wake(&mut reader);
        Poll::Ready(Ok(()))
    }

    /// The next message; `Ok(None)` once the other side finished and everything was read. Up to
    /// `batch` plain messages queued behind it move to `received` under the same lock, so a busy
    /// reader locks once per batch rather than once per message.
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        received: &mut RecvQueue,
        batch: usize,
    ) -> Poll<Result<Option<Message>, Error>> {
        let mut state = self.flow.lock();
        if let Some(closed) = state.closed {
            return Poll::Ready(Err(closed.error()));
        }
        let incoming = &mut state.directions[1 - self.side];
        if let Some(m) = incoming.queue.pop_front() {
            incoming.queued_bytes -= m.wire_len();
            for _ in 0..batch {
                // A typed value stays for a receiver that may want it as a value.
                if !matches!(incoming.queue.front(), Some(Message::Bytes(_))) {
                    break;
                }
                if let Some(Message::Bytes(b)) = incoming.queue.pop_front() {
                    incoming.queued_bytes -= b.len();
                    received.push_back(b);
                }
            }
            let mut writer = incoming.writer.take();
            drop(state);
            wake(&mut writer);
            return Poll::Ready(Ok(Some(m)));
        }
        if incoming.finished {
            return Poll::Ready(Ok(None));
        }
        store(&mut incoming.reader, cx);
        Poll::Pending
    }

    /// Finishes this end's sending direction.
    pub(crate) fn finish(&self) -> Result<(), Error> {
        let mut state = self.flow.lock();
        if let Some(closed) = state.closed {
            return Err(closed.error());
        }
        let out = &mut state.directions[self.side];
        out.finished = true;
        let mut reader = out.reader.take();
        drop(state);
        wake(&mut reader);
        Ok(())
    }

    /// Aborts the flow both ways with `code`.
    pub(crate) fn reset(&self, code: ResetCode) -> Result<(), Error> {
        if let Some(closed) = self.flow.lock().closed {
            return Err(closed.error());
        }
        self.flow.close(Closed::Reset(code));
        Ok(())
    }

    /// The application dropped this end after finishing it: what the other side still sends is
    /// discarded, what this end sent stays readable.
    pub(crate) fn release(&self) {
        let mut state = self.flow.lock();
        let incoming = &mut state.directions[1 - self.side];
        incoming.reader_gone = true;
        incoming.queue.clear();
        incoming.queued_bytes = 0;
        let mut writer = incoming.writer.take();
        drop(state);
        wake(&mut writer);
    }

    /// Counters and buffer levels, `None` once the flow ended.
    pub(crate) fn stats(&self) -> Option<FlowStats> {
        let state = self.flow.lock();
        if state.closed.is_some() {
            return None;
        }
        let out = &state.directions[self.side];
        let incoming = &state.directions[1 - self.side];
        if out.finished && incoming.finished && incoming.queue.is_empty() {
            return None;
        }
        Some(FlowStats {
            send_queued_bytes: 0,
            recv_queued_bytes: incoming.queued_bytes,
            recv_queued_messages: incoming.queue.len(),
            messages_sent: out.messages,
            bytes_sent: out.bytes,
            messages_received: incoming.messages - incoming.queue.len() as u64,
            bytes_received: incoming.bytes - incoming.queued_bytes as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn bytes(s: &'static str) -> Option<Message> {
        Some(Message::Bytes(Bytes::from_static(s.as_bytes())))
    }

    fn recv(end: &LocalEnd) -> Poll<Result<Option<Bytes>, String>> {
        // One at a time: these tests are about the flow's queue.
        end.poll_recv(&mut cx(), &mut RecvQueue::default(), 0)
            .map(|r| {
                r.map(|m| m.map(|m| m.into_bytes().unwrap()))
                    .map_err(|e| e.to_string())
            })
    }

    struct NoEncoder;

    impl ErasedEncode for NoEncoder {
        fn encode(&self, _: &(dyn Any + Send)) -> Result<Bytes, CodecError> {
            Err(CodecError::encode::<u32>("not needed"))
        }
    }

    #[test]
    fn a_reader_takes_plain_messages_in_batches_and_values_one_by_one() {
        let (a, b) = LocalFlow::pair(16, 1 << 20, 1 << 20);
        for m in ["1", "2", "3"] {
            assert!(a.poll_send(&mut cx(), &mut bytes(m)).is_ready());
        }
        let mut value = Some(Message::Value {
            value: Box::new(7u32),
            encoder: Arc::new(NoEncoder),
        });
        assert!(a.poll_send(&mut cx(), &mut value).is_ready());
        assert!(a.poll_send(&mut cx(), &mut bytes("4")).is_ready());
        let mut received = RecvQueue::default();
        let taken = |q: &mut RecvQueue| std::iter::from_fn(|| q.pop_front()).collect::<Vec<_>>();
        let first = b.poll_recv(&mut cx(), &mut received, 64);
        assert!(matches!(first, Poll::Ready(Ok(Some(Message::Bytes(ref m)))) if m == "1"));
        assert_eq!(
            taken(&mut received),
            ["2", "3"],
            "the plain messages behind it, in order"
        );
        // The value is not turned into bytes: it comes alone, as a value.
        let second = b.poll_recv(&mut cx(), &mut received, 64);
        match second {
            Poll::Ready(Ok(Some(Message::Value { value, .. }))) => {
                assert_eq!(value.downcast_ref::<u32>(), Some(&7));
            }
            _ => panic!("the value comes next"),
        }
        assert_eq!(
            taken(&mut received),
            ["4"],
            "what follows the value comes behind it"
        );
        assert!(recv(&b).is_pending());
    }

    #[test]
    fn a_full_direction_waits_and_order_is_kept() {
        let (a, b) = LocalFlow::pair(2, 1 << 20, 1 << 20);
        assert!(a.poll_send(&mut cx(), &mut bytes("1")).is_ready());
        assert!(a.poll_send(&mut cx(), &mut bytes("2")).is_ready());
        let mut third = bytes("3");
        assert!(a.poll_send(&mut cx(), &mut third).is_pending());
        assert!(third.is_some(), "a refused message stays with the sender");
        assert_eq!(recv(&b), Poll::Ready(Ok(Some(Bytes::from_static(b"1")))));
        assert!(a.poll_send(&mut cx(), &mut third).is_ready());
        a.finish().unwrap();
        assert_eq!(recv(&b), Poll::Ready(Ok(Some(Bytes::from_static(b"2")))));
        assert_eq!(recv(&b), Poll::Ready(Ok(Some(Bytes::from_static(b"3")))));
        assert_eq!(recv(&b), Poll::Ready(Ok(None)));
        // The other direction is still open.
        assert!(recv(&a).is_pending());
    }

    #[test]
    fn bytes_bound_a_direction_but_one_message_always_fits() {
        let (a, b) = LocalFlow::pair(100, 4, 1 << 20);
        assert!(a.poll_send(&mut cx(), &mut bytes("hello world")).is_ready());
        assert!(a.poll_send(&mut cx(), &mut bytes("x")).is_pending());
        assert!(recv(&b).is_ready());
        assert!(a.poll_send(&mut cx(), &mut bytes("x")).is_ready());
    }

    #[test]
    fn reset_and_size_errors() {
        let (a, b) = LocalFlow::pair(4, 1 << 20, 3);
        let too_large = a.poll_send(&mut cx(), &mut bytes("four"));
        assert!(matches!(
            too_large,
            Poll::Ready(Err(Error::Flow(FlowError::MessageTooLarge {
                size: 4,
                limit: 3
            })))
        ));
        b.reset(ResetCode::Application(9)).unwrap();
        let err = recv(&a);
        assert!(
            matches!(err, Poll::Ready(Err(ref e)) if e.contains("Application(9)")),
            "{err:?}"
        );
    }
}
