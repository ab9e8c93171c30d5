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
use grinta_tests::membership_sim::{Cluster, ClusterNode, node_addr, node_name, quantile};
use grinta_tests::node_sim::{SimulatedNode, certificates, node_membership_config};
use grinta_tests::{lan, seed};
use prost::Message;
use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn keys(tls: &TlsConfig, name: &str) -> CertificateKeys {
    CertificateKeys::new(tls, name, tls::crypto_provider(), tls::system_time(), 16).expect("keys")
}

/// `n` whole nodes, not joined, each with a chain longer than a membership packet: a leaf and
/// four intermediate CAs, Ed25519 throughout (the simulator signs deterministically), about
/// 1.6 KB, the size of a leaf and one intermediate with RSA keys.
fn long_chain_cluster(seed: u64, n: usize) -> Cluster<SimulatedNode> {
    let names: Vec<String> = (0..n).map(node_name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let certs = chained_material(&rcgen::PKCS_ED25519, 4, &names);
    Cluster::nodes(
        seed,
        lan(),
        node_membership_config(),
        std::sync::Arc::new(certs),
    )
}

/// Whether every node but `victim` holds it Alive above incarnation `inc`: its refutation of a
/// suspicion at `inc` reached them all.
fn refuted_everywhere(c: &Cluster<SimulatedNode>, victim: usize, inc: u64) -> bool {
    (0..c.sim.len()).filter(|&i| i != victim).all(|i| {
        c.sim
            .node(i)
            .node
            .membership()
            .member(&node_name(victim))
            .is_some_and(|m| m.state == MemberState::Alive && m.incarnation > inc)
    })
}

/// Makes `accuser` suspect `victim` at the incarnation node 0 holds, with a suspicion it signs
/// itself, sent straight to `targets`; returns that incarnation.
fn raise_false_suspicion(
    c: &mut Cluster<SimulatedNode>,
    victim: usize,
    accuser: usize,
    targets: &[usize],
) -> u64 {
    let inc = c
        .incarnation_seen(0, victim)
        .expect("node 0 knows the victim");
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
        for &target in targets {
            node.node.send_raw_membership_datagram(
                now,
                &node_name(target),
                node_addr(target),
                packet.clone(),
            );
        }
    });
    inc
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
        // Issued by the root CA itself: no intermediate.
        let tls = chained_material(alg, 0, &["node-042", "node-007"]);
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
    let inc = raise_false_suspicion(&mut c, victim, accuser, &[1, 2, 3]);
    let refuted = c
        .run_until(Duration::from_secs(30), |c| {
            refuted_everywhere(c, victim, inc)
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

/// TLS material for `names` under a root CA and `depth` intermediate CAs, all with keys of
/// `alg`: each node's chain is its leaf then every intermediate, as private PKIs issue them.
fn chained_material(
    alg: &'static rcgen::SignatureAlgorithm,
    depth: usize,
    names: &[&str],
) -> Vec<TlsConfig> {
    let ca_params = || {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
    };
    let root_key = rcgen::KeyPair::generate_for(alg).expect("root key");
    let root = ca_params().self_signed(&root_key).expect("root");
    let mut issuer = rcgen::Issuer::new(ca_params(), root_key);
    let mut intermediates = Vec::new();
    for k in 0..depth {
        let key = rcgen::KeyPair::generate_for(alg).expect("intermediate key");
        let mut params = ca_params();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("grinta intermediate {k}"),
        );
        let cert = params.signed_by(&key, &issuer).expect("intermediate");
        intermediates.push(CertificateDer::from(cert.der().to_vec()));
        issuer = rcgen::Issuer::new(params, key);
    }
    // Leaf first, then the intermediates from the leaf's issuer up.
    intermediates.reverse();
    names
        .iter()
        .map(|name| {
            let key = rcgen::KeyPair::generate_for(alg).expect("node key");
            let params = rcgen::CertificateParams::new(vec![(*name).to_owned()]).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("node certificate");
            let mut chain = vec![CertificateDer::from(cert.der().to_vec())];
            chain.extend(intermediates.iter().cloned());
            TlsConfig {
                ca_certs: vec![CertificateDer::from(root.der().to_vec())],
                cert_chain: chain,
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            }
        })
        .collect()
}

/// A node whose certificate chain is longer than a membership packet (here a leaf and four
/// intermediate CAs, Ed25519) still refutes a false suspicion everywhere and is never declared
/// Dead: five seeds, each refuted everywhere within 5 s, the median within 2 s (at eight
/// nodes each holds an item for four transmissions, so now and then one node misses every
/// copy and learns the refutation a few seconds later).
#[test]
fn a_chain_longer_than_a_packet_still_refutes_a_false_suspicion() {
    let (seed, _g) = seed(9);
    let n = 8;
    let names: Vec<String> = (0..n).map(node_name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // Ed25519 throughout: the simulator signs deterministically. Four intermediates make a
    // chain the size of a leaf and one intermediate with RSA keys.
    let certs = std::sync::Arc::new(chained_material(&rcgen::PKCS_ED25519, 4, &names));
    let chain_len: usize = certs[0].cert_chain.iter().map(|c| c.len()).sum();
    assert!(chain_len > grinta_proto::node::MEMBERSHIP_PACKET_BUDGET);
    let mut times = Vec::new();
    for s in seed..seed + 5 {
        let mut c: Cluster<SimulatedNode> =
            Cluster::nodes(s, lan(), node_membership_config(), certs.clone());
        c.form(Duration::from_secs(2));
        c.run_for(Duration::from_secs(5));
        let (victim, accuser) = (5usize, 2usize);
        let inc = raise_false_suspicion(&mut c, victim, accuser, &[1, 3]);
        let refuted = c.run_until(Duration::from_secs(30), |c| {
            refuted_everywhere(c, victim, inc)
        });
        c.run_for(Duration::from_secs(30));
        let dead = (0..n)
            .filter(|&i| c.sim.node(i).seen.dead.contains_key(&node_name(victim)))
            .count();
        println!("seed {s}: refuted everywhere after {refuted:?}; {dead} nodes declared it Dead");
        assert_eq!(dead, 0, "seed {s}: a live node was declared Dead");
        let refuted = refuted.unwrap_or_else(|| panic!("seed {s}: never refuted everywhere"));
        assert!(refuted <= Duration::from_secs(5), "seed {s}: {refuted:?}");
        times.push(refuted);
    }
    let median = quantile(&times, 0.5).unwrap();
    assert!(median <= Duration::from_secs(2), "median {median:?}");
}

/// A member whose certificate chain is longer than a membership packet, never seen before,
/// joins: gossip carries its alive without the chain, and a node that cannot check it asks the
/// relay for the member in full (`Stats::members_fetched`). Every node holds it Alive within
/// 2.5 s, the spec's bound for a broadcast to reach 99.99% of nodes (8.8 s without the fetch,
/// when nodes learnt it only from push-pulls and from its own first packets).
#[test]
fn a_joiner_whose_chain_is_longer_than_a_packet_is_known_everywhere_as_fast_as_gossip() {
    let (seed, _g) = seed(10);
    let n = 12;
    let mut c = long_chain_cluster(seed, n);
    let joiner = n - 1;
    // Never started before: nobody has seen its certificate.
    c.kill(joiner);
    for i in 1..joiner {
        c.sim
            .with_node(i, |node, now| node.join(now, &[node_addr(0)]));
        c.run_for(Duration::from_millis(100));
    }
    c.run_until(Duration::from_secs(60), |c| c.converged())
        .expect("formed");
    c.restart(joiner, 1, None, 0);
    let everywhere = c.run_until(Duration::from_secs(60), |c| {
        (0..joiner).all(|i| {
            c.sim
                .node(i)
                .node
                .membership()
                .member(&node_name(joiner))
                .is_some_and(|m| m.state == MemberState::Alive)
        })
    });
    let fetched: u64 = (0..joiner)
        .map(|i| c.sim.node(i).node.stats().membership.members_fetched)
        .sum();
    println!("joiner known everywhere after {everywhere:?}; {fetched} members fetched");
    assert!(
        everywhere.is_some_and(|t| t <= Duration::from_millis(2500)),
        "seed {seed}: joiner known everywhere after {everywhere:?}"
    );
    assert!(fetched > 0, "the joiner was fetched of relays");
}

/// Churn with certificate chains longer than a packet: 12 nodes for 20 simulated minutes, a
/// node crashing every minute and the one before it coming back as a new process (its alive
/// travels without its chain, and nodes that reaped it ask for it in full). Every crash is seen
/// as Dead, no live node ever is, and the cluster is whole at the end.
#[test]
fn churn_with_chains_longer_than_a_packet_keeps_the_cluster_whole() {
    let (seed, _g) = seed(12);
    let n = 12;
    let mut c = long_chain_cluster(seed, n);
    c.form(Duration::from_secs(2));
    let mut down: Option<(usize, Instant)> = None;
    let mut crashes: Vec<(usize, Instant, Option<Instant>)> = Vec::new();
    for minute in 0..20u64 {
        c.run_for(Duration::from_secs(30));
        if let Some((back, _)) = down.take() {
            c.restart(back, minute + 1, None, 0);
            if let Some(last) = crashes.last_mut() {
                last.2 = Some(c.sim.now());
            }
        }
        let victim = c.sim.rng().random_range(1..n);
        c.kill(victim);
        down = Some((victim, c.sim.now()));
        crashes.push((victim, c.sim.now(), None));
        c.run_for(Duration::from_secs(30));
    }
    if let Some((back, _)) = down.take() {
        c.restart(back, 99, None, 0);
        if let Some(last) = crashes.last_mut() {
            last.2 = Some(c.sim.now());
        }
    }
    let settled = c.run_until(Duration::from_secs(60), |c| c.converged());
    // A Dead event is false unless its member was down then.
    let mut false_dead = 0;
    for i in 0..n {
        for (t, member) in &c.sim.node(i).seen.dead_events {
            let was_down = crashes.iter().any(|&(v, from, to)| {
                node_name(v) == *member && *t >= from && to.is_none_or(|to| *t <= to)
            });
            if !was_down {
                false_dead += 1;
            }
        }
    }
    let fetched: u64 = (0..n)
        .map(|i| c.sim.node(i).node.stats().membership.members_fetched)
        .sum();
    println!(
        "{} crashes; whole again after {settled:?}; {false_dead} false Dead; {fetched} members fetched",
        crashes.len()
    );
    assert_eq!(false_dead, 0, "seed {seed}");
    assert!(settled.is_some(), "seed {seed}: the cluster is not whole");
}
