//! grinta on tokio.
//!
//! This crate is the tokio adapter: it gives the runtime-independent user API of
//! [`grinta_proto::fabric`] a UDP socket, tokio timers and `tokio::spawn`. Everything else (the
//! protocol, the API types) lives in `grinta-proto`.
//!
//! ```no_run
//! use grinta_tokio::Fabric;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let fabric = Fabric::builder("node-a")
//!     .bind("127.0.0.1:7001".parse()?)
//!     .tls_pem_files("certs/ca.pem", "certs/node-a.pem", "certs/node-a.key")
//!     .start()?;
//! let greeter = fabric.endpoint("greeter")?;
//! let mut flow = greeter.accept().await?;
//! while let Some(message) = flow.recv().await? {
//!     flow.send(message).await?; // echo
//! }
//! # Ok(()) }
//! ```
//!
//! A flow to an endpoint of the same node is an in-process channel; any other flow runs over
//! QUIC. Both behave the same (see [`grinta_proto::fabric::Flow`]).

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

pub use grinta_proto as proto;
use grinta_proto::adapter::UdpState;
use grinta_proto::fabric::{RecvMeta, Runtime};
use grinta_proto::node::Transmit;
use tokio::io::Interest;

/// The tokio runtime for grinta.
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

/// A UDP socket on tokio's reactor that sends several datagrams per system call (GSO) and
/// receives several per call (`recvmmsg`, GRO) where the platform allows, through quinn-udp.
#[derive(Debug)]
pub struct UdpSocket {
    io: tokio::net::UdpSocket,
    state: UdpState,
}

impl Runtime for Tokio {
    type Socket = UdpSocket;
    type Sleep = tokio::time::Sleep;

    fn bind(addr: SocketAddr) -> io::Result<Self::Socket> {
        current_runtime()?;
        let socket = std::net::UdpSocket::bind(addr)?;
        // Sets the socket non-blocking and turns on the offloads the platform has.
        let state = UdpState::new(&socket)?;
        Ok(UdpSocket {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
        })
    }

    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr> {
        socket.io.local_addr()
    }

    fn max_transmit_segments(socket: &Self::Socket) -> usize {
        socket.state.max_transmit_segments()
    }

    fn max_receive_segments(socket: &Self::Socket) -> usize {
        socket.state.max_receive_segments()
    }

    fn may_fragment(socket: &Self::Socket) -> bool {
        socket.state.may_fragment()
    }

    fn poll_recv(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(socket.io.poll_recv_ready(cx))?;
            let received = socket.io.try_io(Interest::READABLE, || {
                socket.state.try_recv(&socket.io, bufs, meta)
            });
            match received {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_send(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        transmit: &Transmit,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(socket.io.poll_send_ready(cx))?;
            let sent = socket.io.try_io(Interest::WRITABLE, || {
                socket.state.try_send(&socket.io, transmit)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }

    fn spawn(future: Pin<Box<dyn Future<Output = ()> + Send>>) -> io::Result<()> {
        current_runtime()?.spawn(future);
        Ok(())
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn unix_time() -> std::time::Duration {
        grinta_proto::adapter::unix_time()
    }
}

/// The tokio runtime this call runs in; outside one, an error that says so (tokio itself would
/// panic).
fn current_runtime() -> io::Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        io::Error::other("no tokio runtime: start the fabric from within a tokio runtime")
    })
}

grinta_proto::runtime_aliases!(Tokio);

/// The README's example, compiled as a doctest so that it stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
