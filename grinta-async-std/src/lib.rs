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
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use async_io::{Async, Timer};
pub use grinta_proto as proto;
use grinta_proto::fabric::Runtime;
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

grinta_proto::runtime_aliases!(AsyncIo);

/// Starts a node: binds its socket, starts its driver thread and joins the configured seeds.
pub fn start(config: NodeConfig) -> Result<Fabric, Error> {
    Fabric::start(config)
}
