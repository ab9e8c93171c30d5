//! What signed claims cost, reported for docs/node.md: bytes per claim, CPU per signature and
//! per verification, and dissemination with whole nodes at N=100 against the membership spec's
//! bounds. Both tests are `#[ignore]`d measurements:
//!
//! ```text
//! cargo test --release -p grinta-tests --test claims_cost -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use grinta_proto::claims::{self, CertificateKeys, ClaimKind};
use grinta_proto::membership::MemberState;
use grinta_proto::registry::{EndpointKind, Record};
use grinta_proto::tls::{self, TlsConfig};
use grinta_proto::wire;
use grinta_tests::membership_sim::{Cluster, node_name, quantile};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};
use prost::Message;
use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// TLS material for `names` under one CA, with keys of `alg`.
fn material(alg: &'static rcgen::SignatureAlgorithm, names: &[&str]) -> Vec<TlsConfig> {
    let ca_key = rcgen::KeyPair::generate_for(alg).expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(params, ca_key);
    names
        .iter()
        .map(|name| {
            let key = rcgen::KeyPair::generate_for(alg).expect("node key");
            let params = rcgen::CertificateParams::new(vec![(*name).to_owned()]).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("node certificate");
            TlsConfig {
                ca_certs: vec![CertificateDer::from(ca.der().to_vec())],
                cert_chain: vec![CertificateDer::from(cert.der().to_vec())],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            }
        })
        .collect()
}

fn keys(tls: &TlsConfig, name: &str) -> CertificateKeys {
    CertificateKeys::new(tls, name, tls::crypto_provider(), tls::system_time(), 16).expect("keys")
}

/// Encoded size of one piggybacked broadcast carrying `claim`.
fn broadcast_len(kind: wire::broadcast::Kind) -> usize {
    wire::Broadcast { kind: Some(kind) }.encoded_len() + 2
}

#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn bytes_and_cpu_per_claim() {
    let alive = wire::Alive {
        node: "node-042".into(),
        incarnation: 1_764_612_345_678,
        addr: Some(wire::SocketAddress {
            ip: vec![10, 0, 0, 42].into(),
            port: 7946,
        }),
        meta: Default::default(),
    };
    let suspect = wire::Suspect {
        node: "node-042".into(),
        incarnation: 1_764_612_345_678,
        from: "node-007".into(),
    };
    let record = Record {
        name: "billing".into(),
        owner: "node-042".into(),
        owner_incarnation: 1_764_612_345_678,
        version: 12_345,
        claimed: true,
        kind: EndpointKind::Exclusive,
        value: bytes::Bytes::new(),
        durable: false,
    }
    .to_wire();
    let unsigned = |body: Vec<u8>| wire::Signed {
        body: body.into(),
        ..Default::default()
    };
    println!("claim sizes in a membership packet (bytes, unsigned -> signed):");
    for (label, alg) in [
        ("Ed25519", &rcgen::PKCS_ED25519),
        ("ECDSA P-256", &rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let tls = material(alg, &["node-042", "node-007"]);
        let signer = keys(&tls[0], "node-042");
        let mut checker = keys(&tls[1], "node-007");
        let cert_len = tls[0].cert_chain[0].len();
        let signed_alive =
            claims::sign(&signer, ClaimKind::Alive, alive.encode_to_vec(), true).unwrap();
        let signed_suspect =
            claims::sign(&signer, ClaimKind::Suspect, suspect.encode_to_vec(), false).unwrap();
        let signed_record =
            claims::sign(&signer, ClaimKind::Record, record.encode_to_vec(), false).unwrap();
        let mut alive_no_cert = signed_alive.clone();
        alive_no_cert.certificates.clear();
        use wire::broadcast::Kind;
        println!(
            "  {label}: certificate {cert_len}; alive {} -> {} with its certificate ({} without); \
             suspect {} -> {}; record {} -> {}",
            broadcast_len(Kind::Alive(unsigned(alive.encode_to_vec()))),
            broadcast_len(Kind::Alive(signed_alive.clone())),
            broadcast_len(Kind::Alive(alive_no_cert)),
            broadcast_len(Kind::Suspect(unsigned(suspect.encode_to_vec()))),
            broadcast_len(Kind::Suspect(signed_suspect.clone())),
            record.encoded_len() + 2,
            signed_record.encoded_len() + 2,
        );
        // The checker learns the signer's certificate from its alive, as a node does.
        claims::verify(&mut checker, "node-042", ClaimKind::Alive, &signed_alive).unwrap();
        // CPU: median of 5 batches of 2,000.
        let batch = 2_000u32;
        let mut sign = Vec::new();
        let mut verify = Vec::new();
        let mut first = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..batch {
                claims::sign(&signer, ClaimKind::Suspect, suspect.encode_to_vec(), false).unwrap();
            }
            sign.push(t.elapsed() / batch);
            let t = Instant::now();
            for _ in 0..batch {
                claims::verify(
                    &mut checker,
                    "node-042",
                    ClaimKind::Suspect,
                    &signed_suspect,
                )
                .unwrap();
            }
            verify.push(t.elapsed() / batch);
            // A certificate seen for the first time: its chain is checked too.
            let t = Instant::now();
            for _ in 0..batch / 10 {
                let mut fresh = keys(&tls[1], "node-007");
                claims::verify(&mut fresh, "node-042", ClaimKind::Alive, &signed_alive).unwrap();
            }
            first.push(t.elapsed() / (batch / 10));
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        println!(
            "  {label}: sign {:?}, verify {:?}, first alive of a signer (chain + signature, \
             keys included) {:?}",
            median(&mut sign),
            median(&mut verify),
            median(&mut first)
        );
    }
}

#[test]
#[ignore = "minutes in release; run with --release --ignored --nocapture"]
fn dissemination_at_n100_with_signed_claims() {
    let (seed, _g) = seed(7);
    let n = 100;
    let ca = tls::dev::DevCa::from_seed(seed).expect("dev CA");
    let mut c: Cluster<SimulatedNode> =
        Cluster::nodes(seed, lan(), node_membership_config(), certificates(&ca, n));
    c.form(Duration::from_secs(10));
    c.run_until(Duration::from_secs(120), |c| c.converged())
        .expect("formed");
    c.run_for(Duration::from_secs(30));
    let packets: u64 = (0..n)
        .map(|i| c.sim.node(i).node.stats().membership.packets_sent)
        .sum();
    let bytes: u64 = (0..n)
        .map(|i| c.sim.node(i).node.stats().membership.packet_bytes_sent)
        .sum();
    println!(
        "N={n} formed: {:.0} bytes per membership packet on average",
        bytes as f64 / packets as f64
    );

    // Endpoint records: visible everywhere (p99 over 20 names).
    let mut visible = Vec::new();
    for k in 0..20 {
        let owner = c.sim.rng().random_range(0..n);
        let name = format!("svc-{k}");
        let t0 = c.sim.now();
        c.sim
            .with_node(owner, |node, now| {
                node.node
                    .register_endpoint(now, &name, EndpointKind::Exclusive)
            })
            .expect("register");
        let seen = c
            .run_until(Duration::from_secs(30), |c| {
                (0..n).all(|i| !c.sim.node(i).node.registry().resolve(&name).is_empty())
            })
            .expect("visible");
        visible.push(seen);
        let _ = t0;
        c.run_for(Duration::from_secs(2));
    }
    println!(
        "record visible everywhere: median {:?}, p99 {:?} (bound 3 s)",
        quantile(&visible, 0.5).unwrap(),
        quantile(&visible, 0.99).unwrap()
    );

    // A false suspicion, raised by a member and signed by it, refuted everywhere.
    let (victim, accuser) = (42usize, 17usize);
    let inc = c
        .sim
        .node(0)
        .node
        .membership()
        .member(&node_name(victim))
        .unwrap()
        .incarnation;
    let suspect = wire::Suspect {
        node: node_name(victim),
        incarnation: inc,
        from: node_name(accuser),
    };
    let claim = c
        .sim
        .with_node(accuser, |node, _| {
            node.node.sign_claim(ClaimKind::Suspect, &suspect)
        })
        .unwrap();
    let packet: bytes::Bytes = wire::Packet {
        sender: node_name(accuser),
        message: None,
        broadcasts: vec![wire::Broadcast {
            kind: Some(wire::broadcast::Kind::Suspect(claim)),
        }],
    }
    .encode_to_vec()
    .into();
    c.sim.with_node(accuser, |node, now| {
        for target in [1usize, 2, 3] {
            node.node.send_raw_membership_datagram(
                now,
                &node_name(target),
                grinta_tests::membership_sim::node_addr(target),
                packet.clone(),
            );
        }
    });
    let refuted = c
        .run_until(Duration::from_secs(30), |c| {
            (0..n).filter(|&i| i != victim).all(|i| {
                c.sim
                    .node(i)
                    .node
                    .membership()
                    .member(&node_name(victim))
                    .is_some_and(|m| m.state == MemberState::Alive && m.incarnation > inc)
            })
        })
        .expect("refuted");
    println!("false suspicion refuted everywhere after {refuted:?} (bound 2 s)");

    // A killed node declared Dead by every survivor.
    let victim = 77;
    c.kill(victim);
    let t0 = c.sim.now();
    c.run_until(Duration::from_secs(90), |c| {
        c.detection_times(victim, t0).iter().all(Option::is_some)
    });
    let times: Vec<Duration> = c
        .detection_times(victim, t0)
        .into_iter()
        .flatten()
        .collect();
    println!(
        "kill detection ({} of {} survivors): median {:?}, p99 {:?} (bounds 12 s, 20 s)",
        times.len(),
        n - 1,
        quantile(&times, 0.5).unwrap(),
        quantile(&times, 0.99).unwrap()
    );
    let verified: u64 = (0..n)
        .map(|i| c.sim.node(i).node.stats().membership.claims_verified)
        .sum();
    println!(
        "claims verified per node over the run: {}",
        verified / n as u64
    );
}
