//! What the runtime adapters share (feature `adapter`): a UDP socket's quinn-udp state with
//! non-blocking batched receive and send in grinta's types, and the wall clock. An adapter adds
//! only readiness (waiting until the socket is readable or writable on its reactor), timers and
//! a way to spawn.
//!
//! This module touches a real socket and reads the clock, so it stays behind a feature the
//! sans-IO core never enables; the adapters do.

use std::io::{self, IoSliceMut};

use quinn_udp::{UdpSockRef, UdpSocketState};

use crate::fabric::RecvMeta;
use crate::node::Transmit;

/// The wall clock as time since the UNIX epoch, for
/// [`Runtime::unix_time`](crate::fabric::Runtime::unix_time). A clock set before 1970 reads as the
/// epoch (the node then starts at incarnation 1).
pub fn unix_time() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The quinn-udp state of one UDP socket: which offloads (GSO, GRO) the platform gave it.
#[derive(Debug)]
pub struct UdpState(UdpSocketState);

impl UdpState {
    /// Sets `socket` non-blocking and turns on the offloads the platform has.
    pub fn new<'a>(socket: impl Into<UdpSockRef<'a>>) -> io::Result<Self> {
        UdpSocketState::new(socket.into()).map(Self)
    }

    /// Datagrams one send may carry (segmentation offload; 1 without).
    pub fn max_transmit_segments(&self) -> usize {
        self.0.max_gso_segments()
    }

    /// Datagrams one receive buffer may hold (receive offload; 1 without).
    pub fn max_receive_segments(&self) -> usize {
        self.0.gro_segments()
    }

    /// Whether the socket may fragment datagrams (then path MTU discovery is unsound).
    pub fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }

    /// Receives what is ready, up to one datagram (or one GRO batch) per buffer, without
    /// blocking: `WouldBlock` when nothing is. Returns how many buffers were filled, each
    /// described by the `meta` entry of the same index.
    pub fn try_recv<'a>(
        &self,
        socket: impl Into<UdpSockRef<'a>>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let mut udp_meta = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let count = bufs.len().min(meta.len()).min(udp_meta.len());
        let n = self
            .0
            .recv(socket.into(), &mut bufs[..count], &mut udp_meta[..count])?;
        for (to, from) in meta.iter_mut().zip(&udp_meta[..n]) {
            *to = RecvMeta {
                source: from.addr,
                len: from.len,
                stride: from.stride,
            };
        }
        Ok(n)
    }

    /// Sends `transmit` (one datagram, or several of `segment_size` bytes) without blocking:
    /// `WouldBlock` when the socket's buffer is full.
    pub fn try_send<'a>(
        &self,
        socket: impl Into<UdpSockRef<'a>>,
        transmit: &Transmit,
    ) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: None,
            contents: &transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        self.0.try_send(socket.into(), &transmit)
    }
}
