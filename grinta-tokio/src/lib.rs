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
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

pub use grinta_proto as proto;
use grinta_proto::fabric::Runtime;
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

grinta_proto::runtime_aliases!(Tokio);

/// Starts a node on the current tokio runtime: binds its socket, spawns its driver and joins the
/// configured seeds. Must be called from within a tokio runtime.
pub fn start(config: NodeConfig) -> Result<Fabric, Error> {
    Fabric::start(config)
}

/// The README's example, compiled as a doctest so that it stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
