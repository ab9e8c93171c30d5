//! grinta on async-std and smol, built on async-io.
//!
//! This crate gives the runtime-independent user API of [`grinta_proto::fabric`] an async-io UDP
//! socket and async-io timers. async-std and smol both run on async-io's reactor, so the types work
//! under either executor. Each node's driver runs on its own thread under `async_io::block_on`,
//! which needs no executor of its own.
//!
//! ```no_run
//! use grinta_async_std::Fabric;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let fabric = Fabric::builder("node-a")
//!     .bind("127.0.0.1:7001".parse()?)
//!     .seed("127.0.0.1:7000".parse()?)
//!     .tls_pem_files("certs/ca.pem", "certs/node-a.pem", "certs/node-a.key")
//!     .start()?;
//! let mut flow = fabric.dial("greeter").await?;
//! flow.send(b"hello".to_vec()).await?;
//! # Ok(()) }
//! ```
//!
//! The API is the same as `grinta-tokio`'s: both adapters declare their types with
//! [`grinta_proto::runtime_aliases`].

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use async_io::{Async, Timer};
pub use grinta_proto as proto;
use grinta_proto::adapter::UdpState;
use grinta_proto::fabric::{RecvMeta, Runtime};
use grinta_proto::node::Transmit;

/// The async-io runtime for grinta (async-std, smol).
#[derive(Debug, Clone, Copy)]
pub struct AsyncIo;

/// A timer that completes at its deadline.
#[derive(Debug)]
pub struct Sleep(Timer);

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// A UDP socket on async-io's reactor that sends several datagrams per system call (GSO) and
/// receives several per call (`recvmmsg`, GRO) where the platform allows, through quinn-udp.
#[derive(Debug)]
pub struct UdpSocket {
    io: Async<std::net::UdpSocket>,
    state: UdpState,
}

impl Runtime for AsyncIo {
    type Socket = UdpSocket;
    type Sleep = Sleep;

    fn bind(addr: SocketAddr) -> io::Result<Self::Socket> {
        let socket = std::net::UdpSocket::bind(addr)?;
        // Sets the socket non-blocking and turns on the offloads the platform has.
        let state = UdpState::new(&socket)?;
        Ok(UdpSocket {
            io: Async::new_nonblocking(socket)?,
            state,
        })
    }

    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr> {
        socket.io.get_ref().local_addr()
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
            match socket.state.try_recv(socket.io.get_ref(), bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(socket.io.poll_readable(cx))?;
                }
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
            match socket.state.try_send(socket.io.get_ref(), transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(socket.io.poll_writable(cx))?;
                }
                result => return Poll::Ready(result),
            }
        }
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        Sleep(Timer::at(deadline))
    }

    fn spawn(future: Pin<Box<dyn Future<Output = ()> + Send>>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("grinta-driver".into())
            .spawn(move || async_io::block_on(future))
            .map(drop)
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn unix_time() -> std::time::Duration {
        grinta_proto::adapter::unix_time()
    }
}

grinta_proto::runtime_aliases!(AsyncIo);
