//! grinta on async-std and smol, built on async-io.
//!
//! This crate gives the runtime-independent user API of [`grinta_proto::fabric`] an async-io UDP
//! socket and async-io timers. async-std and smol both run on async-io's reactor, so the types work
//! under either executor. Each node's driver runs on its own thread under `async_io::block_on`,
//! which needs no executor of its own.
//!
//! ```no_run
//! use grinta_proto::node::NodeConfig;
//! use grinta_proto::tls::dev::DevCa;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = DevCa::new()?;
//! let config = NodeConfig::new("node-a", "127.0.0.1:7001".parse()?, ca.issue("node-a")?);
//! let fabric = grinta_async_std::start(config)?;
//! let mut flow = fabric.dial("greeter").await?;
//! flow.send(b"hello".to_vec()).await?;
//! # Ok(()) }
//! ```
//!
//! Status: the same API as `grinta-tokio` (remote flows over QUIC); in-process flows, codecs and
//! `Stream`/`Sink` are not there yet.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use async_io::{Async, Timer};
pub use grinta_proto as proto;
use grinta_proto::fabric::{self, Runtime};
use grinta_proto::node::NodeConfig;

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

impl Runtime for AsyncIo {
    type Socket = Async<UdpSocket>;
    type Sleep = Sleep;

    fn bind(addr: SocketAddr) -> io::Result<Self::Socket> {
        Async::<UdpSocket>::bind(addr)
    }

    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr> {
        socket.get_ref().local_addr()
    }

    fn poll_recv_from(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        loop {
            match socket.get_ref().recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(socket.poll_readable(cx))?;
                }
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_send_to(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        buf: &[u8],
        to: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        loop {
            match socket.get_ref().send_to(buf, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(socket.poll_writable(cx))?;
                }
                result => return Poll::Ready(result),
            }
        }
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        Sleep(Timer::at(deadline))
    }

    fn spawn(future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        std::thread::Builder::new()
            .name("grinta-driver".into())
            .spawn(move || async_io::block_on(future))
            .expect("cannot start the grinta driver thread");
    }

    fn now() -> Instant {
        Instant::now()
    }
}

/// A node of the fabric on async-io.
pub type Fabric = fabric::Fabric<AsyncIo>;
/// An endpoint served by an async-io fabric.
pub type Endpoint = fabric::Endpoint<AsyncIo>;
/// A flow on an async-io fabric.
pub type Flow = fabric::Flow<AsyncIo>;
/// Errors of the user API.
pub use grinta_proto::fabric::Error;

/// Starts a node: binds its socket, starts its driver thread and joins the configured seeds.
pub fn start(config: NodeConfig) -> Result<Fabric, Error> {
    Fabric::start(config)
}
