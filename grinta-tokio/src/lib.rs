//! grinta on tokio.
//!
//! This crate is the tokio adapter: it gives the runtime-independent user API of
//! [`grinta_proto::fabric`] a UDP socket, tokio timers and `tokio::spawn`. Everything else (the
//! protocol, the API types) lives in `grinta-proto`.
//!
//! ```no_run
//! use grinta_proto::node::NodeConfig;
//! use grinta_proto::tls::dev::DevCa;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = DevCa::new()?;
//! let config = NodeConfig::new("node-a", "127.0.0.1:7001".parse()?, ca.issue("node-a")?);
//! let fabric = grinta_tokio::start(config)?;
//! let greeter = fabric.endpoint("greeter")?;
//! let mut flow = greeter.accept().await?;
//! while let Some(message) = flow.recv().await? {
//!     flow.send(message).await?; // echo
//! }
//! # Ok(()) }
//! ```
//!
//! Status: remote flows over QUIC work, untyped or typed through a codec
//! ([`grinta_proto::codec`]); in-process flows (an endpoint dialled from its own node),
//! `Stream`/`Sink` and GSO/GRO through quinn-udp are not there yet.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

pub use grinta_proto as proto;
use grinta_proto::fabric::{self, Runtime};
use grinta_proto::node::NodeConfig;

/// The tokio runtime for grinta.
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

impl Runtime for Tokio {
    type Socket = tokio::net::UdpSocket;
    type Sleep = tokio::time::Sleep;

    fn bind(addr: SocketAddr) -> io::Result<Self::Socket> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(socket)
    }

    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr> {
        socket.local_addr()
    }

    fn poll_recv_from(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut read = tokio::io::ReadBuf::new(buf);
        socket
            .poll_recv_from(cx, &mut read)
            .map_ok(|from| (read.filled().len(), from))
    }

    fn poll_send_to(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        buf: &[u8],
        to: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        socket.poll_send_to(cx, buf, to)
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }

    fn spawn(future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn now() -> Instant {
        Instant::now()
    }
}

/// A node of the fabric on tokio.
pub type Fabric = fabric::Fabric<Tokio>;
/// An endpoint served by a tokio fabric.
pub type Endpoint = fabric::Endpoint<Tokio>;
/// A flow on a tokio fabric.
pub type Flow = fabric::Flow<Tokio>;
/// A typed flow on a tokio fabric.
pub type TypedFlow<T, C> = fabric::TypedFlow<Tokio, T, C>;
/// Errors of the user API.
pub use grinta_proto::fabric::Error;

/// Starts a node on the current tokio runtime: binds its socket, spawns its driver and joins the
/// configured seeds. Must be called from within a tokio runtime.
pub fn start(config: NodeConfig) -> Result<Fabric, Error> {
    Fabric::start(config)
}

/// The README's example, compiled as a doctest so that it stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
