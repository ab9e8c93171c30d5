//! Seeded, fully deterministic crypto and QUIC configuration for simulation.
//!
//!
//! The whole-node simulator must give byte-identical packet logs for two runs of one seed. grinta's
//! transport draws every QUIC secret (connection IDs, reset and token keys) from the crypto
//! provider's secure random source, so replacing the provider is enough:
//!
//! * [`deterministic_provider`]: ring's rustls provider whose `secure_random` and only key-exchange
//!   group (X25519, via x25519-dalek) draw from a ChaCha8 stream seeded by a `u64`, and whose key
//!   loader accepts only Ed25519 keys (ring's ECDSA and RSA-PSS signatures are randomized; the
//!   development certificates are Ed25519).
//! * [`FixedClock`]: a wall clock that never moves, for rustls's certificate validity checks.
//!
//! **Never use any of this outside simulation**: every secret is a pure function of the seed.
//! Give each simulated node its own seed and build fresh configurations for each run.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, SharedSecret,
    SupportedKxGroup,
};
use rustls::pki_types::{PrivateKeyDer, UnixTime};
use rustls::sign::SigningKey;
use rustls::time_provider::TimeProvider;
use rustls::{Error, NamedGroup, PeerMisbehaved, SignatureAlgorithm};

/// Default simulated wall-clock time: 2026-01-01T00:00:00Z, in seconds since the UNIX epoch.
pub const SIM_UNIX_SECS: u64 = 1_767_225_600;

/// Builds a ChaCha8 RNG from `seed`, domain-separated by `label`.
///
/// The 32-byte ChaCha key is `SHA-256(label || 0x00 || seed_le)`, so the
/// different consumers fed from one seed produce unrelated streams.
fn seeded_rng(seed: u64, label: &str) -> ChaCha8Rng {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(label.as_bytes());
    ctx.update(&[0]);
    ctx.update(&seed.to_le_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    ChaCha8Rng::from_seed(key)
}

/// Derives an independent child seed, e.g. one per simulated node.
///
/// `derive_seed(sim_seed, "node-a")` and `derive_seed(sim_seed, "node-b")`
/// are unrelated, and both are pure functions of their inputs.
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    seeded_rng(seed, label).next_u64()
}

/// `SecureRandom` backed by a seeded ChaCha8 stream.
#[derive(Debug)]
struct SeededRandom {
    rng: Mutex<ChaCha8Rng>,
}

impl SeededRandom {
    fn fill_bytes(&self, buf: &mut [u8]) {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fill_bytes(buf);
    }
}

impl SecureRandom for SeededRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        self.fill_bytes(buf);
        Ok(())
    }
}

/// X25519 (x25519-dalek) whose ephemeral secrets come from the seeded stream.
#[derive(Debug)]
struct SeededX25519 {
    rng: &'static SeededRandom,
}

impl SupportedKxGroup for SeededX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut bytes = [0u8; 32];
        self.rng.fill_bytes(&mut bytes);
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Box::new(X25519Exchange { secret, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// One in-progress X25519 exchange.
struct X25519Exchange {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        let peer: [u8; 32] = peer_pub_key
            .try_into()
            .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        // Same rule as ring: reject low-order points (all-zero shared secret).
        if !shared.was_contributory() {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_bytes()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// ring's key loader, restricted to Ed25519 (the only deterministic signer).
#[derive(Debug)]
struct Ed25519OnlyKeys;

impl KeyProvider for Ed25519OnlyKeys {
    fn load_private_key(
        &self,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, Error> {
        let key = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
        if key.algorithm() != SignatureAlgorithm::ED25519 {
            return Err(Error::General(format!(
                "deterministic simulation requires Ed25519 keys, got {:?} \
                 (ring's ECDSA/RSA-PSS signatures are randomized)",
                key.algorithm()
            )));
        }
        Ok(Arc::new(CountedKey(key)))
    }
}

static ED25519_ONLY_KEYS: Ed25519OnlyKeys = Ed25519OnlyKeys;

/// Signatures made by every simulated node so far: two per full TLS handshake (the server's and
/// the client's `CertificateVerify`), none for a resumed one.
pub fn signatures() -> u64 {
    SIGNATURES.load(std::sync::atomic::Ordering::Relaxed)
}

static SIGNATURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A signing key that counts its signatures.
#[derive(Debug)]
struct CountedKey(Arc<dyn SigningKey>);

impl SigningKey for CountedKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        self.0
            .choose_scheme(offered)
            .map(|signer| Box::new(CountedSigner(signer)) as Box<dyn rustls::sign::Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.0.algorithm()
    }
}

#[derive(Debug)]
struct CountedSigner(Box<dyn rustls::sign::Signer>);

impl rustls::sign::Signer for CountedSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        SIGNATURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.sign(message)
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.0.scheme()
    }
}

/// rustls `CryptoProvider` whose randomness is a pure function of `seed`.
///
/// Starts from `rustls::crypto::ring::default_provider()` and replaces:
///
/// * `secure_random`: a ChaCha8 stream seeded from `seed` behind a `Mutex`
///   (ClientHello/ServerHello randoms, extension-order shuffling, session
///   ticket nonces/ids/age_add, ...);
/// * `kx_groups`: a single X25519 group (x25519-dalek) whose ephemeral
///   secrets are drawn from that same stream;
/// * `key_provider`: ring's loader restricted to **Ed25519** keys. ring's
///   ECDSA and RSA-PSS signing use the OS RNG internally, so simulated
///   certificates must be Ed25519; loading any other key fails with
///   `Error::General`.
///
/// Cipher suites and signature-verification algorithms are ring's.
///
/// `CryptoProvider` requires `&'static` random and key-exchange objects, so
/// each call leaks two small allocations (`Box::leak`, under 200 bytes).
/// That is acceptable in a simulator; do not call this in a hot loop.
///
/// The stream is shared by every connection using this provider, so the
/// bytes each one gets depend on call order: use one provider per simulated
/// node and drive the simulation single-threaded.
pub fn deterministic_provider(seed: u64) -> Arc<CryptoProvider> {
    let random: &'static SeededRandom = Box::leak(Box::new(SeededRandom {
        rng: Mutex::new(seeded_rng(seed, "grinta/det-crypto/rustls-random")),
    }));
    let x25519: &'static SeededX25519 = Box::leak(Box::new(SeededX25519 { rng: random }));
    Arc::new(CryptoProvider {
        kx_groups: vec![x25519],
        secure_random: random,
        key_provider: &ED25519_ONLY_KEYS,
        ..rustls::crypto::ring::default_provider()
    })
}

/// A wall clock that never moves, for rustls's certificate validity checks (pass it as
/// `NodeConfig::time_provider`). The time must lie inside the certificates' validity period
/// (rcgen's default is 1975..4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedClock {
    since_epoch: Duration,
}

impl FixedClock {
    /// A clock stuck at `secs` seconds after the UNIX epoch.
    pub const fn from_unix_secs(secs: u64) -> Self {
        Self {
            since_epoch: Duration::from_secs(secs),
        }
    }

    /// The time this clock reports.
    pub fn system_time(&self) -> SystemTime {
        UNIX_EPOCH + self.since_epoch
    }
}

impl Default for FixedClock {
    /// A clock at [`SIM_UNIX_SECS`].
    fn default() -> Self {
        Self::from_unix_secs(SIM_UNIX_SECS)
    }
}

impl TimeProvider for FixedClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(self.since_epoch))
    }
}
