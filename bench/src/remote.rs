//! Flows between two fabrics over loopback UDP with mutual TLS, against raw quinn with the same
//! rustls crypto provider (ring) and mutual TLS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grinta_proto::tls::dev::DevCa;
use grinta_proto::tls::{TlsConfig, crypto_provider};
use grinta_proto::transport::{JUMBO_MAX_UDP_PAYLOAD, TransportLimits};
use grinta_tokio::{Fabric, Profile};

use crate::tcp_tls::TcpTls;
use crate::{Measurement, middle, percentile_us, round_trips};

const BULK_MESSAGE: usize = 1 << 20;
const BULK_MESSAGES: usize = 256;
const SMALL: usize = 64;
const SMALL_MESSAGES: usize = 300_000;
/// Messages handed over at once in the small-message stream, by both sides.
const SMALL_BATCH: usize = 1000;
const ROUND_TRIPS: usize = 5_000;
const REQUESTS: usize = 2_000;
const REQUESTERS: usize = 64;
const REQUESTS_EACH: usize = 300;

async fn until(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "benchmark setup timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two joined fabrics; `b` serves `sink` (counts bytes) and `echo`.
struct GrintaPair {
    a: Fabric,
    b: Fabric,
    ca: DevCa,
}

async fn grinta_pair() -> GrintaPair {
    grinta_pair_with(TransportLimits::default()).await
}

/// The same with other transport limits on both nodes.
async fn grinta_pair_with(limits: TransportLimits) -> GrintaPair {
    let ca = DevCa::new().expect("dev CA");
    let a = Fabric::builder("bench-a")
        .dev_certificates(&ca)
        .profile(Profile::Lan)
        .transport_limits(limits.clone())
        .start()
        .expect("a");
    let b = Fabric::builder("bench-b")
        .dev_certificates(&ca)
        .profile(Profile::Lan)
        .transport_limits(limits)
        .seed(a.local_addr())
        .start()
        .expect("b");
    for (name, echo) in [("sink", false), ("echo", true)] {
        let endpoint = b.endpoint(name).expect("endpoint");
        tokio::spawn(async move {
            while let Ok(mut flow) = endpoint.accept().await {
                tokio::spawn(async move {
                    if !echo {
                        // The sink reads in batches, in place, as raw quinn's reader parses
                        // its chunks.
                        let mut bytes = 0;
                        while let Ok(Some(batch)) = flow.recv_many().await {
                            bytes += batch.iter().map(<[u8]>::len).sum::<usize>();
                        }
                        std::hint::black_box(bytes);
                    }
                    while let Ok(Some(m)) = flow.recv().await {
                        if echo && flow.send(m).await.is_err() {
                            return;
                        }
                    }
                    let _ = flow.finish().await;
                });
            }
        });
    }
    // `req` answers each request with its message.
    let mut requests = b.endpoint("req").expect("endpoint").into_requests();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(Ok(request)) = requests.next().await {
            let reply = request.payload().clone();
            let _ = request.respond(reply).await;
        }
    });
    until(|| a.endpoints("").len() == 3).await;
    GrintaPair { a, b, ca }
}

/// Sends `count` messages of `size` bytes through a new flow to `sink`, `batch` per
/// `send_many_copied` (1: one `send` each), and waits for the end: messages per second.
async fn grinta_stream(a: &Fabric, size: usize, count: usize, batch: usize) -> f64 {
    let mut flow = a.dial("sink").await.expect("dial");
    let message = Bytes::from(vec![3u8; size]);
    let start = Instant::now();
    if batch == 1 {
        for _ in 0..count {
            flow.send(message.clone()).await.expect("send");
        }
    } else {
        let mut sent = 0;
        while sent < count {
            let k = batch.min(count - sent);
            // The batch is borrowed and copied into the flow, as raw quinn's writer copies its
            // frames into one buffer per batch.
            flow.send_many_copied(std::iter::repeat_n(&message[..], k))
                .await
                .expect("send_many_copied");
            sent += k;
        }
    }
    flow.finish().await.expect("finish");
    // The sink finishes after reading everything: its end marks full delivery.
    assert_eq!(flow.recv().await.expect("end"), None);
    count as f64 / start.elapsed().as_secs_f64()
}

async fn grinta_rtt(a: &Fabric) -> Vec<Duration> {
    let mut flow = a.dial("echo").await.expect("dial");
    let message = Bytes::from(vec![1u8; SMALL]);
    let mut v = Vec::new();
    for i in 0..ROUND_TRIPS + 500 {
        let t = Instant::now();
        flow.send(message.clone()).await.expect("send");
        flow.recv().await.expect("recv").expect("reply");
        if i >= 500 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    v
}

/// Sequential requests of `SMALL` bytes to `req`: their round trips, sorted.
async fn grinta_request_rtt(a: &Fabric) -> Vec<Duration> {
    let message = Bytes::from(vec![5u8; SMALL]);
    let mut v = Vec::new();
    for i in 0..REQUESTS + 200 {
        let t = Instant::now();
        let reply = a.request("req", message.clone()).await.expect("reply");
        assert_eq!(reply.len(), SMALL);
        if i >= 200 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    v
}

/// `REQUESTERS` tasks sending `REQUESTS_EACH` requests each: requests per second.
async fn grinta_request_throughput(a: &Fabric) -> f64 {
    let message = Bytes::from(vec![5u8; SMALL]);
    let start = Instant::now();
    let tasks: Vec<_> = (0..REQUESTERS)
        .map(|_| {
            let (a, message) = (a.clone(), message.clone());
            tokio::spawn(async move {
                for _ in 0..REQUESTS_EACH {
                    a.request("req", message.clone()).await.expect("reply");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("requester");
    }
    (REQUESTERS * REQUESTS_EACH) as f64 / start.elapsed().as_secs_f64()
}

/// Dial (through the owner's accept and answer) over the existing connection.
async fn grinta_dial_existing(a: &Fabric) -> f64 {
    let mut v = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let flow = a.dial("echo").await.expect("dial");
        v.push(t.elapsed());
        drop(flow);
    }
    v.sort();
    percentile_us(&v, 0.5)
}

/// Dial from a node that just joined: its first flow to the owner.
async fn grinta_dial_new_peer(pair: &GrintaPair) -> f64 {
    let mut v = Vec::new();
    for i in 0..10 {
        let c = Fabric::builder(&format!("bench-new-{i}"))
            .dev_certificates(&pair.ca)
            .profile(Profile::Lan)
            .seed(pair.b.local_addr())
            .start()
            .expect("c");
        until(|| c.endpoints("echo").len() == 1).await;
        let t = Instant::now();
        let flow = c.dial("echo").await.expect("dial");
        v.push(t.elapsed());
        drop(flow);
        c.shutdown().await;
    }
    v.sort();
    percentile_us(&v, 0.5)
}

pub(crate) mod raw {
    //! The baseline: what a user would write with quinn directly.

    use super::*;
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

    pub(crate) struct QuinnPair {
        pub(crate) server: quinn::Endpoint,
        pub(crate) client: quinn::Endpoint,
        /// The client's connection to the server.
        pub(crate) conn: quinn::Connection,
        /// The same connection, as the server accepted it.
        pub(crate) server_conn: quinn::Connection,
    }

    /// The largest UDP payload the baseline's path MTU discovery looks for: quinn's default
    /// (1452), or `GRINTA_BENCH_QUINN_MAX_UDP_PAYLOAD` to measure raw quinn with the jumbo bound
    /// of grinta's `_jumbo` rows (their notes then still say "its default bound").
    fn max_udp_payload() -> Option<u16> {
        std::env::var("GRINTA_BENCH_QUINN_MAX_UDP_PAYLOAD")
            .ok()
            .and_then(|v| v.parse().ok())
    }

    fn configs(ca: &DevCa) -> (quinn::ServerConfig, quinn::ClientConfig) {
        let (server_tls, client_tls) = tls_configs(ca, b"bench");
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).expect("quic server"),
        ));
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).expect("quic client"),
        ));
        if let Some(max) = max_udp_payload() {
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(max);
            let mut transport = quinn::TransportConfig::default();
            transport.mtu_discovery_config(Some(mtu));
            let transport = Arc::new(transport);
            server.transport_config(transport.clone());
            client.transport_config(transport);
        }
        (server, client)
    }

    /// A quinn endpoint on a fresh loopback port, a server if `server` is given.
    fn endpoint(server: Option<quinn::ServerConfig>) -> quinn::Endpoint {
        let mut config = quinn::EndpointConfig::default();
        if let Some(max) = max_udp_payload() {
            config.max_udp_payload_size(max).expect("payload size");
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let runtime = quinn::default_runtime().expect("runtime");
        quinn::Endpoint::new(config, server, socket, runtime).expect("endpoint")
    }

    /// Mutual TLS 1.3 with ring, as grinta uses it: the server `quinn-server`, the client
    /// `quinn-client`, both issued by `ca`, speaking `alpn`.
    pub(crate) fn tls_configs(
        ca: &DevCa,
        alpn: &[u8],
    ) -> (rustls::ServerConfig, rustls::ClientConfig) {
        let provider = crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.certificate().clone()).expect("CA");
        let roots = Arc::new(roots);
        let server: TlsConfig = ca.issue("quinn-server").expect("cert");
        let client: TlsConfig = ca.issue("quinn-client").expect("cert");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_client_cert_verifier(verifier)
            .with_single_cert(server.cert_chain, server.key)
            .expect("server cert");
        server_tls.alpn_protocols = vec![alpn.to_vec()];
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_client_auth_cert(client.cert_chain, client.key)
            .expect("client cert");
        client_tls.alpn_protocols = vec![alpn.to_vec()];
        (server_tls, client_tls)
    }

    /// A server that, per bidi stream, either echoes length-prefixed messages or counts them.
    pub(crate) async fn pair(ca: &DevCa) -> QuinnPair {
        let (server_config, client_config) = configs(ca);
        let server = endpoint(Some(server_config));
        let accept = server.clone();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut first = Some(first_tx);
            while let Some(incoming) = accept.accept().await {
                let first = first.take();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    if let Some(first) = first {
                        let _ = first.send(conn.clone());
                    }
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve_stream(send, recv));
                    }
                });
            }
        });
        let client = new_client(client_config);
        let conn = connect(&client, &server).await;
        let server_conn = first_rx.await.expect("the server accepts the connection");
        QuinnPair {
            server,
            client,
            conn,
            server_conn,
        }
    }

    pub(super) fn new_client(config: quinn::ClientConfig) -> quinn::Endpoint {
        let mut client = endpoint(None);
        client.set_default_client_config(config);
        client
    }

    pub(super) fn client_config(ca: &DevCa) -> quinn::ClientConfig {
        configs(ca).1
    }

    pub(super) async fn connect(
        client: &quinn::Endpoint,
        server: &quinn::Endpoint,
    ) -> quinn::Connection {
        client
            .connect(server.local_addr().expect("addr"), "quinn-server")
            .expect("connect")
            .await
            .expect("handshake")
    }

    async fn read_varint(recv: &mut quinn::RecvStream) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut byte = [0u8; 1];
            recv.read_exact(&mut byte).await.ok()?;
            value |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// First byte: 1 = echo each message, 0 = count messages (large reads, frames parsed).
    async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let mut mode = [0u8; 1];
        if recv.read_exact(&mut mode).await.is_err() {
            return;
        }
        if mode[0] == 1 {
            while let Some(len) = read_varint(&mut recv).await {
                let mut body = vec![0u8; len as usize];
                if recv.read_exact(&mut body).await.is_err() {
                    return;
                }
                let mut out = Vec::with_capacity(body.len() + 10);
                prost::encoding::encode_varint(len, &mut out);
                out.extend_from_slice(&body);
                if send.write_all(&out).await.is_err() {
                    return;
                }
            }
        } else {
            // Parse the length prefixes as they stream by (bodies are skipped, not copied).
            let mut frames = 0u64;
            let mut skip = 0usize;
            let mut prefix = Vec::new();
            while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
                let mut data = &chunk.bytes[..];
                while !data.is_empty() {
                    if skip > 0 {
                        let n = skip.min(data.len());
                        skip -= n;
                        data = &data[n..];
                        continue;
                    }
                    prefix.push(data[0]);
                    data = &data[1..];
                    if prefix.last().is_some_and(|b| b & 0x80 == 0) {
                        let mut p = &prefix[..];
                        skip = prost::encoding::decode_varint(&mut p).unwrap_or(0) as usize;
                        prefix.clear();
                        frames += 1;
                    }
                }
            }
            let _ = send.write_all(&frames.to_be_bytes()).await;
            let _ = send.finish();
        }
    }

    /// Sends `count` length-prefixed messages of `size` bytes, `batch` messages per write:
    /// messages per second, once the server confirmed it counted them all.
    pub(super) async fn stream(
        conn: &quinn::Connection,
        size: usize,
        count: usize,
        batch: usize,
    ) -> f64 {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let mut frame = Vec::new();
        prost::encoding::encode_varint(size as u64, &mut frame);
        frame.extend(std::iter::repeat_n(3u8, size));
        let start = Instant::now();
        send.write_all(&[0]).await.expect("mode");
        let mut sent = 0;
        while sent < count {
            let k = batch.min(count - sent);
            let buf = Bytes::from(frame.repeat(k));
            send.write_chunk(buf).await.expect("write");
            sent += k;
        }
        send.finish().expect("finish");
        let mut n = [0u8; 8];
        recv.read_exact(&mut n).await.expect("count");
        assert_eq!(u64::from_be_bytes(n), count as u64);
        count as f64 / start.elapsed().as_secs_f64()
    }

    pub(super) async fn rtt(conn: &quinn::Connection) -> Vec<Duration> {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(&[1]).await.expect("mode");
        let mut frame = Vec::new();
        prost::encoding::encode_varint(SMALL as u64, &mut frame);
        frame.extend(std::iter::repeat_n(1u8, SMALL));
        let mut reply = vec![0u8; frame.len()];
        let mut v = Vec::new();
        for i in 0..ROUND_TRIPS + 500 {
            let t = Instant::now();
            send.write_all(&frame).await.expect("write");
            recv.read_exact(&mut reply).await.expect("reply");
            if i >= 500 {
                v.push(t.elapsed());
            }
        }
        v.sort();
        v
    }

    /// A request as a user would write it with quinn: a new bidi stream, the length-prefixed
    /// message and the end, then the reply read back.
    pub(super) async fn request(conn: &quinn::Connection, message: &[u8]) {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let mut out = vec![1u8];
        prost::encoding::encode_varint(message.len() as u64, &mut out);
        out.extend_from_slice(message);
        send.write_all(&out).await.expect("write");
        send.finish().expect("finish");
        let mut reply = vec![0u8; out.len() - 1];
        recv.read_exact(&mut reply).await.expect("reply");
    }

    /// Open a stream and complete one 1-byte round trip on it.
    pub(super) async fn open_and_round_trip(conn: &quinn::Connection) {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(&[1, 1, 9]).await.expect("write");
        let mut reply = [0u8; 2];
        recv.read_exact(&mut reply).await.expect("reply");
    }
}

/// Runs grinta's request throughput measurement (64 requesters) for about ten seconds, then
/// prints the rates.
pub(crate) async fn profile_requests() {
    let pair = grinta_pair().await;
    let start = Instant::now();
    let mut rates = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        rates.push(grinta_request_throughput(&pair.a).await);
    }
    eprintln!("requests per second per run: {rates:.0?}");
}

/// Sequential requests (as `request_rtt` makes them) for about ten seconds, then the median.
pub(crate) async fn profile_request_rtt(baseline: bool) {
    let pair = grinta_pair().await;
    let quinn = raw::pair(&pair.ca).await;
    let message = vec![5u8; SMALL];
    let start = Instant::now();
    let mut rtts = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        if baseline {
            raw::request(&quinn.conn, &message).await;
        } else {
            let reply = pair.a.request("req", Bytes::from(message.clone())).await;
            assert_eq!(reply.expect("reply").len(), SMALL);
        }
        rtts.push(t.elapsed());
    }
    rtts.sort();
    eprintln!(
        "{} requests, p50 {:?}, p99 {:?}",
        rtts.len(),
        rtts[rtts.len() / 2],
        rtts[rtts.len() * 99 / 100]
    );
}

/// Runs grinta's (or with `baseline` raw quinn's) bulk or small-message stream for about ten
/// seconds, then prints the rate and grinta's socket counters.
pub(crate) async fn profile(small: bool, baseline: bool) {
    let pair = grinta_pair().await;
    let quinn = raw::pair(&pair.ca).await;
    let (size, count, batch) = if small {
        (SMALL, SMALL_MESSAGES, SMALL_BATCH)
    } else {
        (BULK_MESSAGE, BULK_MESSAGES, 1)
    };
    let start = Instant::now();
    let mut rates = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        let rate = if baseline {
            raw::stream(&quinn.conn, size, count, batch).await
        } else {
            grinta_stream(&pair.a, size, count, batch).await
        };
        rates.push(rate * size as f64 / 1e6);
    }
    eprintln!("MB/s per run: {rates:.1?}");
    eprintln!("sender socket: {:#?}", pair.a.stats().socket);
    eprintln!("receiver socket: {:#?}", pair.b.stats().socket);
}

pub(crate) async fn run() -> Vec<Measurement> {
    let pair = grinta_pair().await;
    let quinn = raw::pair(&pair.ca).await;
    let mut out = Vec::new();

    // Bulk: 1 MiB messages.
    let mb = |msgs_per_s: f64| msgs_per_s * BULK_MESSAGE as f64 / 1e6;
    let tcp = TcpTls::start(&pair.ca).await;
    // The same nodes with jumbo-sized packets, as on a network that carries them.
    let jumbo = grinta_pair_with(TransportLimits {
        max_udp_payload: JUMBO_MAX_UDP_PAYLOAD,
        ..TransportLimits::default()
    })
    .await;
    let mut g = Vec::new();
    let mut j = Vec::new();
    let mut b = Vec::new();
    let mut t = Vec::new();
    for _ in 0..3 {
        g.push(mb(
            grinta_stream(&pair.a, BULK_MESSAGE, BULK_MESSAGES, 1).await
        ));
        j.push(mb(
            grinta_stream(&jumbo.a, BULK_MESSAGE, BULK_MESSAGES, 1).await
        ));
        b.push(mb(
            raw::stream(&quinn.conn, BULK_MESSAGE, BULK_MESSAGES, 1).await
        ));
        t.push(mb(tcp.stream(BULK_MESSAGE, BULK_MESSAGES, 1).await));
    }
    let bulk = middle(g);
    let baseline_bulk = middle(b);
    out.push(Measurement::higher(
        "remote_flow_bulk",
        bulk,
        "MB/s",
        "raw quinn, one bidi stream, length-prefixed 1 MiB writes",
        baseline_bulk,
    ));
    out.push(Measurement::higher(
        "remote_flow_bulk_jumbo",
        middle(j),
        "MB/s",
        "raw quinn as above (its default bound); grinta with max_udp_payload 8952",
        baseline_bulk,
    ));
    out.push(Measurement::higher(
        "tcp_tls_flow_bulk",
        bulk,
        "MB/s",
        "TCP + TLS 1.3 (tokio-rustls), length-delimited 1 MiB frames, one flush each",
        middle(t),
    ));

    // Small messages, five interleaved runs: both sides hand over 1000 messages at a time.
    let mut g = Vec::new();
    let mut j = Vec::new();
    let mut one_by_one = Vec::new();
    let mut b = Vec::new();
    let mut t = Vec::new();
    for _ in 0..5 {
        g.push(grinta_stream(&pair.a, SMALL, SMALL_MESSAGES, SMALL_BATCH).await);
        j.push(grinta_stream(&jumbo.a, SMALL, SMALL_MESSAGES, SMALL_BATCH).await);
        one_by_one.push(grinta_stream(&pair.a, SMALL, SMALL_MESSAGES, 1).await);
        b.push(raw::stream(&quinn.conn, SMALL, SMALL_MESSAGES, SMALL_BATCH).await);
        t.push(tcp.stream(SMALL, SMALL_MESSAGES, SMALL_BATCH).await);
    }
    let small = middle(g);
    let baseline_small = middle(b.clone());
    out.push(Measurement::higher(
        "remote_flow_64b",
        small,
        "msg/s",
        "raw quinn, the same frames batched 1000 per write (grinta: send_many_copied of 1000, read with recv_many)",
        middle(b),
    ));
    out.push(Measurement::higher(
        "remote_flow_64b_jumbo",
        middle(j),
        "msg/s",
        "raw quinn as above (its default bound); grinta with max_udp_payload 8952",
        baseline_small,
    ));
    out.push(Measurement::higher(
        "remote_flow_64b_send",
        middle(one_by_one),
        "msg/s",
        "raw quinn, the same frames batched 1000 per write (grinta: one send per message)",
        baseline_small,
    ));
    out.push(Measurement::higher(
        "tcp_tls_flow_64b",
        small,
        "msg/s",
        "TCP + TLS 1.3 (tokio-rustls), length-delimited frames (written 8 KiB at a time, flushed per 1000)",
        middle(t),
    ));

    // Latency.
    let grtt = grinta_rtt(&pair.a).await;
    let brtt = raw::rtt(&quinn.conn).await;
    out.extend(round_trips(
        "remote_rtt",
        &grtt,
        "raw quinn, echo on one bidi stream",
        &brtt,
    ));
    let dial = grinta_dial_existing(&pair.a).await;
    let mut base = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        raw::open_and_round_trip(&quinn.conn).await;
        base.push(t.elapsed());
    }
    base.sort();
    out.push(Measurement::lower(
        "remote_dial_existing_p50",
        dial,
        "us",
        "raw quinn: open a bidi stream + one round trip",
        percentile_us(&base, 0.5),
    ));
    // Requests: one round trip each, against a quinn stream opened per request.
    let grtt = grinta_request_rtt(&pair.a).await;
    let message = vec![5u8; SMALL];
    let mut base = Vec::new();
    for i in 0..REQUESTS + 200 {
        let t = Instant::now();
        raw::request(&quinn.conn, &message).await;
        if i >= 200 {
            base.push(t.elapsed());
        }
    }
    base.sort();
    out.extend(round_trips(
        "request_rtt",
        &grtt,
        "raw quinn: a bidi stream per request, message + end, reply",
        &base,
    ));
    let mut g = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        g.push(grinta_request_throughput(&pair.a).await);
        let start = Instant::now();
        let tasks: Vec<_> = (0..REQUESTERS)
            .map(|_| {
                let (conn, message) = (quinn.conn.clone(), message.clone());
                tokio::spawn(async move {
                    for _ in 0..REQUESTS_EACH {
                        raw::request(&conn, &message).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("requester");
        }
        b.push((REQUESTERS * REQUESTS_EACH) as f64 / start.elapsed().as_secs_f64());
    }
    out.push(Measurement::higher(
        "request_throughput",
        middle(g),
        "req/s",
        "raw quinn: 64 tasks, a bidi stream per request",
        middle(b),
    ));
    let dial_new = grinta_dial_new_peer(&pair).await;
    let mut base = Vec::new();
    for _ in 0..10 {
        let client = raw::new_client(raw::client_config(&pair.ca));
        let t = Instant::now();
        let conn = raw::connect(&client, &quinn.server).await;
        raw::open_and_round_trip(&conn).await;
        base.push(t.elapsed());
        conn.close(0u32.into(), b"done");
    }
    base.sort();
    out.push(Measurement::lower(
        "remote_dial_new_peer_p50",
        dial_new,
        "us",
        "raw quinn: handshake + open a bidi stream + one round trip",
        percentile_us(&base, 0.5),
    ));
    drop(quinn.client);
    pair.a.abort();
    pair.b.abort();
    out
}
