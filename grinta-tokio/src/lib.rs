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
use grinta_proto::fabric::{RecvMeta, Runtime};
use grinta_proto::node::Transmit;
use quinn_udp::UdpSocketState;
use tokio::io::Interest;

/// The tokio runtime for grinta.
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

/// A UDP socket on tokio's reactor that sends several datagrams per system call (GSO) and
/// receives several per call (`recvmmsg`, GRO) where the platform allows, through quinn-udp.
#[derive(Debug)]
pub struct UdpSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl Runtime for Tokio {
    type Socket = UdpSocket;
    type Sleep = tokio::time::Sleep;

    fn bind(addr: SocketAddr) -> io::Result<Self::Socket> {
        current_runtime()?;
        let socket = std::net::UdpSocket::bind(addr)?;
        // Sets the socket non-blocking and turns on the offloads the platform has.
        let state = UdpSocketState::new((&socket).into())?;
        Ok(UdpSocket {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
        })
    }

    fn local_addr(socket: &Self::Socket) -> io::Result<SocketAddr> {
        socket.io.local_addr()
    }

    fn max_transmit_segments(socket: &Self::Socket) -> usize {
        socket.state.max_gso_segments()
    }

    fn max_receive_segments(socket: &Self::Socket) -> usize {
        socket.state.gro_segments()
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
        let mut udp_meta = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let count = bufs.len().min(meta.len()).min(udp_meta.len());
        loop {
            ready!(socket.io.poll_recv_ready(cx))?;
            let received = socket.io.try_io(Interest::READABLE, || {
                let state = &socket.state;
                state.recv(
                    (&socket.io).into(),
                    &mut bufs[..count],
                    &mut udp_meta[..count],
                )
            });
            match received {
                Ok(n) => {
                    for (to, from) in meta.iter_mut().zip(&udp_meta[..n]) {
                        *to = RecvMeta {
                            source: from.addr,
                            len: from.len,
                            stride: from.stride,
                        };
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_send(
        socket: &Self::Socket,
        cx: &mut Context<'_>,
        transmit: &Transmit,
    ) -> Poll<io::Result<()>> {
        let transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: None,
            contents: &transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        loop {
            ready!(socket.io.poll_send_ready(cx))?;
            let sent = socket.io.try_io(Interest::WRITABLE, || {
                socket.state.try_send((&socket.io).into(), &transmit)
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
        // A clock set before 1970 reads as the epoch: the node then starts at incarnation 1.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
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
