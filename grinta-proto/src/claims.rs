//! Signed claims: a node speaks only for itself, even through relays.
//!
//! Mutual TLS proves who sent a packet, but gossip carries news about other nodes. Every claim a
//! node makes about itself (it is alive at an incarnation with an address and metadata, it leaves,
//! it owns an endpoint record) travels signed with the private key of its TLS certificate, and so
//! does every accusation (suspect, dead), signed by its accuser. A relay forwards the signed
//! envelope ([`wire::Signed`]) unchanged; a receiver checks the signature against the signer's
//! certificate before the claim changes anything.
//!
//! **How a node learns certificates.** A node carries its certificate chain in its own `Alive`
//! claims, and a node learns of a member through that member's `Alive` first (by gossip or in a
//! push-pull, which carries each member's latest signed `Alive`). So an `Alive` is checked on its
//! own (the chain must lead to the cluster CA and be valid for the member's name), and every other
//! claim is checked against the certificate its signer's `Alive` brought. No extra round trip, no
//! fetch protocol, and a node that never connected to the signer can still check it. The cost is
//! the chain's size in each `Alive` (about 300 bytes with the development certificates' Ed25519
//! keys); an `Alive` is sent only when a member joins, refutes or changes its metadata.
//!
//! **Chains larger than a packet.** The signature covers the claim's body alone, so a chain can
//! be left out without breaking it. Gossip does so when an `Alive` with its chain would not fit
//! in a membership packet (a leaf and an intermediate with RSA keys already do not): nodes that
//! learnt the member's certificate check it against that, and a node that has not asks the
//! relay for the member in full, over a stream. Push-pulls always carry whole claims, and a
//! node keeps the chain of a member whose newer `Alive` came without it.
//!
//! [`ClaimKeys`] is the seam: [`CertificateKeys`] signs and checks with the node's TLS material
//! (what every [`Node`](crate::node::Node) uses), [`TrustAll`] signs nothing and accepts
//! everything (for a membership run alone, in simulations where every member is honest).
//!
//! ```
//! # #[cfg(feature = "dev-certs")] {
//! use grinta_proto::claims::{CertificateKeys, ClaimKeys, ClaimKind};
//! use grinta_proto::tls::{self, dev::DevCa};
//!
//! let ca = DevCa::new()?;
//! let provider = tls::crypto_provider();
//! let a = CertificateKeys::new(&ca.issue("node-a")?, "node-a", provider.clone(), tls::system_time(), 64)?;
//! let mut b = CertificateKeys::new(&ca.issue("node-b")?, "node-b", provider, tls::system_time(), 64)?;
//!
//! let alive = grinta_proto::claims::sign(&a, ClaimKind::Alive, b"alive at 7".to_vec(), true)?;
//! // b never met a: the certificate chain carried with the alive is enough.
//! grinta_proto::claims::verify(&mut b, "node-a", ClaimKind::Alive, &alive)?;
//! // The same signature does not pass for another node, nor for another kind of claim.
//! assert!(grinta_proto::claims::verify(&mut b, "node-c", ClaimKind::Alive, &alive).is_err());
//! assert!(grinta_proto::claims::verify(&mut b, "node-a", ClaimKind::Dead, &alive).is_err());
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashMap;
use rustls::SignatureScheme;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::time_provider::TimeProvider;

use crate::tls::{TlsConfig, TlsError};
use crate::wire;

/// What a claim states. Its code is signed with the claim, so a signature over one kind of claim
/// never passes for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimKind {
    /// A member is alive (`grinta.v1.Alive`), signed by that member.
    Alive,
    /// A member is suspected (`grinta.v1.Suspect`), signed by the accuser.
    Suspect,
    /// A member left (signed by itself) or is declared dead (signed by the accuser)
    /// (`grinta.v1.Dead`).
    Dead,
    /// An endpoint record (`grinta.v1.EndpointRecord`), signed by its owner.
    Record,
}

impl ClaimKind {
    fn code(self) -> u8 {
        match self {
            Self::Alive => 1,
            Self::Suspect => 2,
            Self::Dead => 3,
            Self::Record => 4,
        }
    }
}

/// What a signature covers: a domain tag, the claim's kind, then the encoded claim.
pub fn signed_message(kind: ClaimKind, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNED_DOMAIN.len() + 1 + body.len());
    put_signed_message(kind, body, &mut message);
    message
}

const SIGNED_DOMAIN: &[u8] = b"grinta/1 claim\0";

/// Appends what a signature covers to `out` (see [`signed_message`]).
fn put_signed_message(kind: ClaimKind, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(SIGNED_DOMAIN);
    out.push(kind.code());
    out.extend_from_slice(body);
}

/// Why a claim was not signed or not accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// No certificate of the signer is known and none came with the claim: its `Alive` has not
    /// reached this node yet.
    #[error("no certificate of node {signer:?} is known; its alive claim has not arrived yet")]
    UnknownSigner {
        /// The signer named by the claim.
        signer: String,
    },
    /// The certificate chain carried with the claim does not lead to the cluster CA.
    #[error("the certificate carried for node {signer:?} is not trusted: {source}")]
    Certificate {
        /// The signer named by the claim.
        signer: String,
        /// What the verifier said.
        source: rustls::Error,
    },
    /// The certificate carried with the claim is valid, but not for the node that claims it.
    #[error("the certificate carried for node {signer:?} is not valid for that name")]
    NameMismatch {
        /// The signer named by the claim.
        signer: String,
    },
    /// The signature scheme is not a TLS 1.3 scheme this node verifies.
    #[error("signature scheme {scheme:#06x} is not supported")]
    UnsupportedScheme {
        /// The scheme's TLS code.
        scheme: u32,
    },
    /// The signature does not match the claim and the signer's certificate: the claim was forged
    /// or altered.
    #[error("the signature of node {signer:?} does not match the claim")]
    BadSignature {
        /// The signer named by the claim.
        signer: String,
    },
    /// This node could not sign (its key supports no TLS 1.3 signature scheme, or signing failed).
    #[error("this node cannot sign its claims: {reason}")]
    Sign {
        /// What went wrong.
        reason: String,
    },
}

/// Signs this node's claims and checks the claims of others.
///
/// [`CertificateKeys`] is the implementation every node uses; [`TrustAll`] exists for membership
/// runs where every member is honest.
pub trait ClaimKeys: fmt::Debug + Send {
    /// Signs `message` (built by [`signed_message`]) as this node: the TLS signature scheme and
    /// the signature.
    fn sign(&self, message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), ClaimError>;

    /// This node's certificate chain, leaf first, carried with its `Alive` claims.
    fn certificates(&self) -> &[Bytes];

    /// Checks that node `signer` signed `message` with `scheme`. `carried` is the certificate
    /// chain that came with the claim (empty but for an `Alive`): it is checked against the
    /// cluster CA and `signer`'s name, and remembered once the signature matches. Without it, the
    /// certificate remembered for `signer` is used.
    fn verify(
        &mut self,
        signer: &str,
        message: &[u8],
        scheme: SignatureScheme,
        signature: &[u8],
        carried: &[Bytes],
    ) -> Result<(), ClaimError>;
}

/// Signs `body`, a claim of `kind` encoded by this node, into an envelope; with `carry_certificates`
/// (for an `Alive`), the node's certificate chain rides along.
pub fn sign(
    keys: &dyn ClaimKeys,
    kind: ClaimKind,
    body: Vec<u8>,
    carry_certificates: bool,
) -> Result<wire::Signed, ClaimError> {
    let (scheme, signature) = keys.sign(&signed_message(kind, &body))?;
    Ok(wire::Signed {
        body: Bytes::from(body),
        scheme: u32::from(u16::from(scheme)),
        signature: Bytes::from(signature),
        certificates: if carry_certificates {
            keys.certificates().to_vec()
        } else {
            Vec::new()
        },
    })
}

/// Checks that node `signer` signed `signed`, a claim of `kind`.
pub fn verify(
    keys: &mut dyn ClaimKeys,
    signer: &str,
    kind: ClaimKind,
    signed: &wire::Signed,
) -> Result<(), ClaimError> {
    verify_with(keys, signer, kind, signed, &mut Vec::new())
}

/// [`verify`], building the signed message in `message` (a buffer the caller keeps from claim
/// to claim: a node checks one per member it learns of).
pub(crate) fn verify_with(
    keys: &mut dyn ClaimKeys,
    signer: &str,
    kind: ClaimKind,
    signed: &wire::Signed,
    message: &mut Vec<u8>,
) -> Result<(), ClaimError> {
    let scheme = u16::try_from(signed.scheme)
        .map(SignatureScheme::from)
        .map_err(|_| ClaimError::UnsupportedScheme {
            scheme: signed.scheme,
        })?;
    message.clear();
    put_signed_message(kind, &signed.body, message);
    keys.verify(
        signer,
        message,
        scheme,
        &signed.signature,
        &signed.certificates,
    )
}

/// Copies an envelope out of the buffer it was decoded from, so that keeping it (a member's latest
/// claim, a directory record) does not keep the whole received datagram or push-pull alive.
pub(crate) fn compact(signed: &wire::Signed) -> wire::Signed {
    wire::Signed {
        body: Bytes::copy_from_slice(&signed.body),
        scheme: signed.scheme,
        signature: Bytes::copy_from_slice(&signed.signature),
        certificates: signed
            .certificates
            .iter()
            .map(|c| Bytes::copy_from_slice(c))
            .collect(),
    }
}

/// Signs nothing and accepts every claim: for a membership run alone where every member is
/// honest (simulations, tests of the protocol's rules). A node never uses it: any member could
/// then speak for any other.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrustAll;

impl ClaimKeys for TrustAll {
    fn sign(&self, _message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), ClaimError> {
        Ok((SignatureScheme::Unknown(0), Vec::new()))
    }

    fn certificates(&self) -> &[Bytes] {
        &[]
    }

    fn verify(
        &mut self,
        _signer: &str,
        _message: &[u8],
        _scheme: SignatureScheme,
        _signature: &[u8],
        _carried: &[Bytes],
    ) -> Result<(), ClaimError> {
        Ok(())
    }
}

/// The TLS 1.3 signature schemes a node signs its claims with, by preference; the only ones it
/// accepts.
const SIGNING_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

/// Signs with the node's TLS key and checks others against the cluster CA: what every node uses.
///
/// It remembers the certificate of at most `capacity` signers (the oldest learnt is forgotten
/// first; a forgotten signer's claims are checked again once its next `Alive` arrives).
pub struct CertificateKeys {
    signer: Box<dyn rustls::sign::Signer>,
    chain: Vec<Bytes>,
    verifier: Arc<dyn ClientCertVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    time: Arc<dyn TimeProvider>,
    known: HashMap<String, Bytes>,
    learnt: VecDeque<String>,
    capacity: usize,
}

impl fmt::Debug for CertificateKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateKeys")
            .field("scheme", &self.signer.scheme())
            .field("known", &self.known.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl CertificateKeys {
    /// Keys of node `name` from its TLS material; `capacity` signers' certificates are remembered
    /// (at least the cluster's size).
    pub fn new(
        tls: &TlsConfig,
        name: &str,
        provider: Arc<CryptoProvider>,
        time: Arc<dyn TimeProvider>,
        capacity: usize,
    ) -> Result<Self, TlsError> {
        let key = provider
            .key_provider
            .load_private_key(tls.key.clone_key())
            .map_err(TlsError::Rustls)?;
        let signer = key
            .choose_scheme(SIGNING_SCHEMES)
            .ok_or(TlsError::Missing {
                what: "a private key that signs with a TLS 1.3 scheme",
            })?;
        let leaf = tls.cert_chain.first().ok_or(TlsError::Missing {
            what: "node certificate chain",
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in &tls.ca_certs {
            roots.add(ca.clone()).map_err(TlsError::BadCa)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let chain: Vec<Bytes> = tls
            .cert_chain
            .iter()
            .map(|c| Bytes::copy_from_slice(c))
            .collect();
        let mut keys = Self {
            signer,
            chain,
            verifier,
            algorithms: provider.signature_verification_algorithms,
            time,
            known: HashMap::new(),
            learnt: VecDeque::new(),
            capacity: capacity.max(1),
        };
        // Its own claims come back through gossip; it checks them like any other.
        keys.remember(name, Bytes::copy_from_slice(leaf));
        Ok(keys)
    }

    /// Signers whose certificate is remembered.
    pub fn known_signers(&self) -> usize {
        self.known.len()
    }

    fn remember(&mut self, signer: &str, leaf: Bytes) {
        if self.known.insert(signer.to_owned(), leaf).is_none() {
            self.learnt.push_back(signer.to_owned());
            while self.known.len() > self.capacity {
                let Some(oldest) = self.learnt.pop_front() else {
                    break;
                };
                self.known.remove(&oldest);
            }
        }
    }

    /// Checks a carried chain: it leads to the cluster CA and its leaf is valid for `signer`.
    fn check_chain(&self, signer: &str, carried: &[Bytes]) -> Result<(), ClaimError> {
        let certificate = |source| ClaimError::Certificate {
            signer: signer.to_owned(),
            source,
        };
        let leaf = CertificateDer::from(&carried[0][..]);
        let intermediates: Vec<CertificateDer<'_>> = carried[1..]
            .iter()
            .map(|c| CertificateDer::from(&c[..]))
            .collect();
        let now = self
            .time
            .current_time()
            .ok_or(certificate(rustls::Error::FailedToGetCurrentTime))?;
        self.verifier
            .verify_client_cert(&leaf, &intermediates, now)
            .map_err(certificate)?;
        match crate::tls::certificate_is_valid_for(&leaf, signer) {
            Ok(true) => Ok(()),
            _ => Err(ClaimError::NameMismatch {
                signer: signer.to_owned(),
            }),
        }
    }
}

impl ClaimKeys for CertificateKeys {
    fn sign(&self, message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), ClaimError> {
        let signature = self.signer.sign(message).map_err(|e| ClaimError::Sign {
            reason: e.to_string(),
        })?;
        Ok((self.signer.scheme(), signature))
    }

    fn certificates(&self) -> &[Bytes] {
        &self.chain
    }

    fn verify(
        &mut self,
        signer: &str,
        message: &[u8],
        scheme: SignatureScheme,
        signature: &[u8],
        carried: &[Bytes],
    ) -> Result<(), ClaimError> {
        let known = self.known.get(signer);
        let (leaf, learnt) = match carried.first() {
            Some(leaf) if known != Some(leaf) => {
                self.check_chain(signer, carried)?;
                (leaf.clone(), true)
            }
            Some(leaf) => (leaf.clone(), false),
            None => match known {
                Some(leaf) => (leaf.clone(), false),
                None => {
                    return Err(ClaimError::UnknownSigner {
                        signer: signer.to_owned(),
                    });
                }
            },
        };
        let unsupported = ClaimError::UnsupportedScheme {
            scheme: u32::from(u16::from(scheme)),
        };
        if !SIGNING_SCHEMES.contains(&scheme) {
            return Err(unsupported);
        }
        let algorithm = self
            .algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .and_then(|(_, algorithms)| algorithms.first())
            .ok_or(unsupported)?;
        let bad = || ClaimError::BadSignature {
            signer: signer.to_owned(),
        };
        let der = CertificateDer::from(&leaf[..]);
        let certificate = webpki::EndEntityCert::try_from(&der).map_err(|_| bad())?;
        certificate
            .verify_signature(*algorithm, message, signature)
            .map_err(|_| bad())?;
        if learnt {
            // A copy: `leaf` may be a slice of a received packet, which it would keep alive.
            self.remember(signer, Bytes::copy_from_slice(&leaf));
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "dev-certs"))]
mod tests {
    use super::*;
    use crate::tls::{self, dev::DevCa};

    fn keys(ca: &DevCa, name: &str) -> CertificateKeys {
        CertificateKeys::new(
            &ca.issue(name).unwrap(),
            name,
            tls::crypto_provider(),
            tls::system_time(),
            4,
        )
        .unwrap()
    }

    #[test]
    fn a_claim_passes_only_for_its_signer_its_kind_and_its_bytes() {
        let ca = DevCa::new().unwrap();
        let a = keys(&ca, "node-a");
        let mut b = keys(&ca, "node-b");
        let alive = sign(&a, ClaimKind::Alive, b"alive".to_vec(), true).unwrap();
        let leave = sign(&a, ClaimKind::Dead, b"leave".to_vec(), false).unwrap();
        // Without a's alive, b knows no certificate of a.
        assert!(matches!(
            verify(&mut b, "node-a", ClaimKind::Dead, &leave),
            Err(ClaimError::UnknownSigner { .. })
        ));
        verify(&mut b, "node-a", ClaimKind::Alive, &alive).unwrap();
        verify(&mut b, "node-a", ClaimKind::Dead, &leave).unwrap();
        // Another kind, another signer, altered bytes: refused.
        assert!(verify(&mut b, "node-a", ClaimKind::Record, &leave).is_err());
        assert!(matches!(
            verify(&mut b, "node-c", ClaimKind::Alive, &alive),
            Err(ClaimError::NameMismatch { .. })
        ));
        let mut altered = leave.clone();
        altered.body = Bytes::from_static(b"leavf");
        assert!(matches!(
            verify(&mut b, "node-a", ClaimKind::Dead, &altered),
            Err(ClaimError::BadSignature { .. })
        ));
        let mut unknown = leave.clone();
        unknown.scheme = 0x1_0000;
        assert!(matches!(
            verify(&mut b, "node-a", ClaimKind::Dead, &unknown),
            Err(ClaimError::UnsupportedScheme { .. })
        ));
    }

    #[test]
    fn a_member_cannot_sign_for_another_even_with_its_own_certificate() {
        let ca = DevCa::new().unwrap();
        let liar = keys(&ca, "liar");
        let mut honest = keys(&ca, "honest");
        // The liar's certificate is valid, but not for the victim's name.
        let forged = sign(&liar, ClaimKind::Alive, b"victim".to_vec(), true).unwrap();
        assert!(matches!(
            verify(&mut honest, "victim", ClaimKind::Alive, &forged),
            Err(ClaimError::NameMismatch { .. })
        ));
        // Nor can it pass a claim signed by itself for the victim's once the victim is known.
        let victim = keys(&ca, "victim");
        let genuine = sign(&victim, ClaimKind::Alive, b"v".to_vec(), true).unwrap();
        verify(&mut honest, "victim", ClaimKind::Alive, &genuine).unwrap();
        let mut stripped = forged.clone();
        stripped.certificates.clear();
        assert!(matches!(
            verify(&mut honest, "victim", ClaimKind::Alive, &stripped),
            Err(ClaimError::BadSignature { .. })
        ));
        // A certificate from another CA is refused.
        let other = DevCa::new().unwrap();
        let stranger = keys(&other, "victim");
        let foreign = sign(&stranger, ClaimKind::Alive, b"v".to_vec(), true).unwrap();
        assert!(matches!(
            verify(&mut honest, "victim", ClaimKind::Alive, &foreign),
            Err(ClaimError::Certificate { .. })
        ));
    }

    #[test]
    fn remembered_certificates_are_bounded() {
        let ca = DevCa::new().unwrap();
        let mut b = keys(&ca, "node-b");
        for i in 0..10 {
            let name = format!("node-{i}");
            let k = keys(&ca, &name);
            let alive = sign(&k, ClaimKind::Alive, b"a".to_vec(), true).unwrap();
            verify(&mut b, &name, ClaimKind::Alive, &alive).unwrap();
            assert!(b.known_signers() <= 4);
        }
    }
}
