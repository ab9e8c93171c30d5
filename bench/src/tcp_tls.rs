//! The other baseline: what most users would write without grinta, TCP with TLS 1.3 (tokio +
//! tokio-rustls, mutual TLS with the same certificates and the same ring provider) carrying
//! length-delimited frames (tokio-util's `LengthDelimitedCodec`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use grinta_proto::tls::dev::DevCa;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::remote::raw;

/// A TCP + TLS server counting frames: an empty frame ends a run, answered with the count.
pub(crate) struct TcpTls {
    addr: std::net::SocketAddr,
    connector: TlsConnector,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(4 << 20)
        .new_codec()
}

impl TcpTls {
    pub(crate) async fn start(ca: &DevCa) -> Self {
        let (server, client) = raw::tls_configs(ca, b"bench-tcp");
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut framed = Framed::new(tls, codec());
                    let mut frames = 0u64;
                    while let Some(Ok(frame)) = framed.next().await {
                        if frame.is_empty() {
                            let count = Bytes::copy_from_slice(&frames.to_be_bytes());
                            if framed.send(count).await.is_err() {
                                return;
                            }
                            frames = 0;
                        } else {
                            frames += 1;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connector: TlsConnector::from(Arc::new(client)),
        }
    }

    /// Connects (TCP + TLS handshake), then sends `count` frames of `size` bytes, flushing every
    /// `batch` frames, and waits for the server's count: frames per second, handshake excluded.
    pub(crate) async fn stream(&self, size: usize, count: usize, batch: usize) -> f64 {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from("quinn-server").expect("name");
        let tls = self.connector.connect(name, tcp).await.expect("TLS");
        let mut framed = Framed::new(tls, codec());
        let message = Bytes::from(vec![3u8; size]);
        let start = Instant::now();
        for i in 0..count {
            framed.feed(message.clone()).await.expect("feed");
            if (i + 1) % batch == 0 {
                SinkExt::<Bytes>::flush(&mut framed).await.expect("flush");
            }
        }
        framed.send(Bytes::new()).await.expect("end");
        let reply = framed.next().await.expect("reply").expect("reply");
        let mut n = [0u8; 8];
        n.copy_from_slice(&reply[..8]);
        assert_eq!(u64::from_be_bytes(n), count as u64);
        count as f64 / start.elapsed().as_secs_f64()
    }
}
