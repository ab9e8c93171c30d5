//! The one task per node that owns the socket and drives the [`Node`](crate::node::Node).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::{DRIVER_BUDGET, Runtime, Shared};

/// The one task per node that owns the socket.
pub(crate) struct Driver<R: Runtime> {
    shared: Arc<Shared>,
    socket: R::Socket,
    sleep: Option<Pin<Box<R::Sleep>>>,
    sleep_at: Option<Instant>,
    outbox: VecDeque<(SocketAddr, Vec<u8>)>,
    buf: Vec<u8>,
}

impl<R: Runtime> Driver<R> {
    pub(crate) fn new(shared: Arc<Shared>, socket: R::Socket) -> Self {
        Self {
            shared,
            socket,
            sleep: None,
            sleep_at: None,
            outbox: VecDeque::new(),
            buf: vec![0u8; 65_536],
        }
    }
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

        // Timers, then the packets of messages the API queued since the last wake.
        let now = R::now();
        if inner.node.poll_timeout().is_some_and(|t| t <= now) {
            inner.node.handle_timeout(now);
        }
        inner.node.flush(now);
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
