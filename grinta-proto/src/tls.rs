//! Mutual TLS between nodes: the cluster CA, node certificates and the rustls configurations.
//!
//! Every node holds a certificate signed by the cluster CA whose DNS SAN is its node name. Dialling
//! node `n` verifies that the peer's certificate is valid for `n`; the acceptor verifies the dialler's
//! client certificate against the same CA and binds the connection to the node name that certificate
//! is valid for (checked on the first message that names the sender). TLS 1.3 only, ALPN `grinta/1`.
//!
//! The crypto provider is a single choice, made in [`crypto_provider`]: rustls with `ring`.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::time_provider::TimeProvider;

use crate::wire::ALPN;

/// The crypto provider every node uses: rustls with `ring` (it builds with a C compiler alone).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The time source rustls checks certificate validity against: the system clock. This is the one
/// place grinta lets a library read the wall clock; simulations substitute a fixed clock
/// ([`crate::node::NodeConfig::time_provider`]).
pub fn system_time() -> Arc<dyn TimeProvider> {
    Arc::new(rustls::time_provider::DefaultTimeProvider)
}

/// A node's TLS material: the cluster CA certificates it trusts, its own certificate chain (leaf
/// first, valid for its node name) and the leaf's private key.
#[derive(Debug)]
pub struct TlsConfig {
    /// Certificates of the cluster CA (more than one while rotating CAs).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// The node's certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key of the leaf certificate.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsConfig {
    fn clone(&self) -> Self {
        Self {
            ca_certs: self.ca_certs.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {}: {source}", path.display())]
    Read {
        /// Which material.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O or PEM error.
        source: rustls::pki_types::pem::Error,
    },
    /// PEM data held nothing of the expected kind.
    #[error("no {what} found in the PEM data")]
    Missing {
        /// Which material.
        what: &'static str,
    },
    /// PEM data could not be parsed.
    #[error("invalid PEM {what}: {source}")]
    Pem {
        /// Which material.
        what: &'static str,
        /// The PEM error.
        source: rustls::pki_types::pem::Error,
    },
    /// The node certificate is not valid for the node's name.
    #[error(
        "the node certificate is not valid for node name {name:?} (its DNS SAN must be the node name)"
    )]
    NameMismatch {
        /// The node name.
        name: String,
    },
    /// The node certificate could not be parsed.
    #[error("the node certificate is not a valid X.509 certificate: {0}")]
    BadCertificate(#[source] webpki::Error),
    /// rustls refused the material (for example a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// A CA certificate could not be added to the trust store.
    #[error("invalid CA certificate: {0}")]
    BadCa(#[source] rustls::Error),
    /// No certificate verifier could be built from the CA certificates.
    #[error("cannot verify peers against the CA certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The builder was given no TLS material.
    #[error(
        "no TLS material: give the builder a TlsConfig (`tls`), PEM files (`tls_pem_files`) or development certificates (`dev_certificates`)"
    )]
    NotConfigured,
    /// Development certificates could not be made (`dev-certs` feature).
    #[error("cannot make development certificates: {0}")]
    DevCertificates(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TlsConfig {
    /// Loads the material from PEM files: the CA certificate(s), the node certificate chain and its
    /// private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let read_certs =
            |what: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
                let err = |source| TlsError::Read {
                    what,
                    path: path.to_owned(),
                    source,
                };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?;
                if certs.is_empty() {
                    return Err(TlsError::Missing { what });
                }
                Ok(certs)
            };
        let key_path = key.as_ref();
        Ok(Self {
            ca_certs: read_certs("CA certificates", ca.as_ref())?,
            cert_chain: read_certs("node certificate chain", cert_chain.as_ref())?,
            key: PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Read {
                what: "private key",
                path: key_path.to_owned(),
                source,
            })?,
        })
    }

    /// Parses the material from PEM bytes.
    pub fn from_pem(ca: &[u8], cert_chain: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let certs =
            |what: &'static str, data: &[u8]| -> Result<Vec<CertificateDer<'static>>, TlsError> {
                let certs = CertificateDer::pem_slice_iter(data)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| TlsError::Pem { what, source })?;
                if certs.is_empty() {
                    return Err(TlsError::Missing { what });
                }
                Ok(certs)
            };
        Ok(Self {
            ca_certs: certs("CA certificates", ca)?,
            cert_chain: certs("node certificate chain", cert_chain)?,
            key: PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
                what: "private key",
                source,
            })?,
        })
    }
}

/// TLS sessions a node remembers for resumption, as client (one ticket for each of this many
/// servers) and as server (this many sessions; each a few hundred bytes): enough for every peer
/// of a cluster of this many nodes to reconnect without a full handshake.
pub const TLS_SESSION_CACHE: usize = 4096;

/// At most one value per key for up to `capacity` keys; past that, the key first inserted is
/// forgotten. Grows as keys come: an empty map holds no room for `capacity` of them.
#[derive(Debug)]
struct OnePerKey<K, V> {
    values: HashMap<K, V>,
    /// Keys in the order they were first inserted.
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Default> OnePerKey<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            values: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// The value of `key`, made (with its default) if it has none.
    fn get_or_insert(&mut self, key: K) -> &mut V {
        if !self.values.contains_key(&key) {
            if self.order.len() >= self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.values.remove(&oldest);
                }
            }
            self.order.push_back(key.clone());
        }
        self.values.entry(key).or_default()
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.values.get_mut(key)
    }

    /// Forgets `key` and returns its value.
    fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let value = self.values.remove(key)?;
        if let Some(at) = self.order.iter().position(|k| k.borrow() == key) {
            self.order.remove(at);
        }
        Some(value)
    }
}

/// The server's resumption store: the sessions behind the tickets it issued, the
/// [`TLS_SESSION_CACHE`] most recent, each used once. It grows with the tickets issued
/// (rustls's `ServerSessionMemoryCache` reserves room for all of them when made: 490 KiB per
/// node for 4,096, whatever the cluster's size).
#[derive(Debug)]
struct ServerSessions(Mutex<OnePerKey<Vec<u8>, Vec<u8>>>);

impl ServerSessions {
    fn new(sessions: usize) -> Self {
        Self(Mutex::new(OnePerKey::new(sessions)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut OnePerKey<Vec<u8>, Vec<u8>>) -> T) -> T {
        with_locked(&self.0, f)
    }
}

/// Runs `f` on what `store` guards. A panic while holding the lock leaves nothing half-done
/// worth refusing, so a poisoned lock is used as is.
fn with_locked<S, T>(store: &Mutex<S>, f: impl FnOnce(&mut S) -> T) -> T {
    f(&mut store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()))
}

impl rustls::server::StoresServerSessions for ServerSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.with(|s| *s.get_or_insert(key) = value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with(|s| s.values.get(key).cloned())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with(|s| s.remove(key))
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// What the client remembers of one server: the key exchange it chose and one ticket.
#[derive(Debug, Default)]
struct ServerSession {
    kx_hint: Option<rustls::NamedGroup>,
    ticket: Option<rustls::client::Tls13ClientSessionValue>,
}

/// The client's resumption store: one TLS 1.3 ticket per server, for [`TLS_SESSION_CACHE`]
/// servers. A node's server sends one ticket per handshake and a ticket is used once, so one is
/// all a client can use; rustls's `ClientSessionMemoryCache` keeps room for eight per server and
/// remembers an eighth as many servers as its size (512 for 4,096), so past 512 peers a node
/// would reconnect to some with a full handshake.
#[derive(Debug)]
struct SessionTickets(Mutex<OnePerKey<ServerName<'static>, ServerSession>>);

impl SessionTickets {
    fn new(servers: usize) -> Self {
        Self(Mutex::new(OnePerKey::new(servers)))
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut OnePerKey<ServerName<'static>, ServerSession>) -> T,
    ) -> T {
        with_locked(&self.0, f)
    }
}

impl rustls::client::ClientSessionStore for SessionTickets {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.with(|s| s.get_or_insert(server_name).kx_hint = Some(group));
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        let name = server_name.to_owned();
        self.with(|s| s.get_mut(&name).and_then(|x| x.kx_hint))
    }

    // TLS 1.3 only: nothing to keep for TLS 1.2.
    fn set_tls12_session(
        &self,
        _server_name: ServerName<'static>,
        _value: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(
        &self,
        _server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.with(|s| s.get_or_insert(server_name).ticket = Some(value));
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.with(|s| s.get_mut(server_name).and_then(|x| x.ticket.take()))
    }
}

/// The rustls configurations of one node.
#[derive(Debug, Clone)]
pub(crate) struct NodeTls {
    pub(crate) server: Arc<rustls::ServerConfig>,
    pub(crate) client: Arc<rustls::ClientConfig>,
    /// The client, accepting any node name the cluster CA vouches for: to dial seeds, known by
    /// address only.
    pub(crate) client_any_name: Arc<rustls::ClientConfig>,
}

/// Builds the server (acceptor) and client (dialler) configurations of node `name`.
pub(crate) fn build(
    tls: &TlsConfig,
    name: &str,
    provider: Arc<CryptoProvider>,
    time_provider: Arc<dyn TimeProvider>,
) -> Result<NodeTls, TlsError> {
    let leaf = tls.cert_chain.first().ok_or(TlsError::Missing {
        what: "node certificate chain",
    })?;
    if !certificate_is_valid_for(leaf, name)? {
        return Err(TlsError::NameMismatch {
            name: name.to_owned(),
        });
    }
    if tls.ca_certs.is_empty() {
        return Err(TlsError::Missing {
            what: "CA certificates",
        });
    }
    let mut roots = RootCertStore::empty();
    for ca in &tls.ca_certs {
        roots.add(ca.clone()).map_err(TlsError::BadCa)?;
    }
    let roots = Arc::new(roots);

    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()?;
    let mut server =
        rustls::ServerConfig::builder_with_details(provider.clone(), time_provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    // Session resumption: a member reconnecting (a probe after the idle timeout closed the
    // connection) skips the certificate exchange and its signatures. One ticket per handshake,
    // sessions for as many peers as a large cluster holds.
    server.session_storage = Arc::new(ServerSessions::new(TLS_SESSION_CACHE));
    server.send_tls13_tickets = 1;

    let mut client = rustls::ClientConfig::builder_with_details(provider.clone(), time_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(tls.cert_chain.clone(), tls.key.clone_key())?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.enable_early_data = false;
    client.resumption =
        rustls::client::Resumption::store(Arc::new(SessionTickets::new(TLS_SESSION_CACHE)));

    let mut any = client.clone();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
    any.dangerous()
        .set_certificate_verifier(Arc::new(AnyNameVerifier(inner)));

    Ok(NodeTls {
        server: Arc::new(server),
        client: Arc::new(client),
        client_any_name: Arc::new(any),
    })
}

/// Accepts any certificate chained to the cluster CA whatever its name: used only to dial seeds known
/// by address; the connection is then bound on its first message to a name the certificate proves.
#[derive(Debug)]
struct AnyNameVerifier(Arc<dyn rustls::client::danger::ServerCertVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError;
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Whether `cert` carries a DNS SAN valid for `name`.
pub(crate) fn certificate_is_valid_for(
    cert: &CertificateDer<'_>,
    name: &str,
) -> Result<bool, TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(TlsError::BadCertificate)?;
    let Ok(server_name) = ServerName::try_from(name) else {
        return Ok(false);
    };
    Ok(parsed
        .verify_is_valid_for_subject_name(&server_name)
        .is_ok())
}

/// Development certificates: a throw-away cluster CA and node certificates, in memory or on disk.
///
/// Keys are Ed25519 (deterministic signatures, small certificates). Never use them in production:
/// the CA key lives in memory and is not protected.
///
/// ```
/// use grinta_proto::tls::dev::DevCa;
///
/// let ca = DevCa::new()?;
/// let node_a = ca.issue("node-a")?;
/// assert_eq!(node_a.ca_certs.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(feature = "dev-certs")]
pub mod dev {
    use std::path::Path;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        PKCS_ED25519,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::TlsConfig;

    /// Failure to make or write development certificates.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum DevCertError {
        /// rcgen could not make a key or certificate (for example an invalid name).
        #[error("cannot generate a development certificate: {0}")]
        Generate(#[from] rcgen::Error),
        /// Writing the files failed.
        #[error("cannot write development certificates: {0}")]
        Io(#[from] std::io::Error),
    }

    /// A development cluster CA.
    pub struct DevCa {
        cert: CertificateDer<'static>,
        cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
        /// Set by [`DevCa::from_seed`]: every key is derived from it.
        seed: Option<u64>,
    }

    impl std::fmt::Debug for DevCa {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DevCa").finish_non_exhaustive()
        }
    }

    impl DevCa {
        /// Makes a new CA with a fresh Ed25519 key.
        pub fn new() -> Result<Self, DevCertError> {
            Self::with_key(KeyPair::generate_for(&PKCS_ED25519)?, None)
        }

        /// Makes a CA whose key, and the key of every certificate it issues, is a pure function of
        /// `seed` (and of the node name): two runs with one seed get byte-identical certificates.
        ///
        /// This is for reproducible tests and simulations, where certificate sizes must not vary
        /// from run to run. **Never use it for a deployment**: anyone who knows the seed holds
        /// every private key.
        ///
        /// ```
        /// use grinta_proto::tls::dev::DevCa;
        ///
        /// let a = DevCa::from_seed(7)?.issue("node-a")?;
        /// let b = DevCa::from_seed(7)?.issue("node-a")?;
        /// assert_eq!(a.cert_chain, b.cert_chain);
        /// # Ok::<(), Box<dyn std::error::Error>>(())
        /// ```
        pub fn from_seed(seed: u64) -> Result<Self, DevCertError> {
            Self::with_key(seeded_key(seed, "grinta development CA")?, Some(seed))
        }

        fn with_key(key: KeyPair, seed: Option<u64>) -> Result<Self, DevCertError> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "grinta development CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            Ok(Self {
                cert_pem: cert.pem(),
                cert: cert.der().clone(),
                issuer: Issuer::new(params, key),
                seed,
            })
        }

        /// The CA certificate.
        pub fn certificate(&self) -> &CertificateDer<'static> {
            &self.cert
        }

        /// Issues the TLS material of node `name` (DNS SAN = `name`).
        pub fn issue(&self, name: &str) -> Result<TlsConfig, DevCertError> {
            let (cert, key) = self.issue_raw(name)?;
            Ok(TlsConfig {
                ca_certs: vec![self.cert.clone()],
                cert_chain: vec![cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            })
        }

        fn issue_raw(&self, name: &str) -> Result<(rcgen::Certificate, KeyPair), DevCertError> {
            let key = match self.seed {
                Some(seed) => seeded_key(seed, name)?,
                None => KeyPair::generate_for(&PKCS_ED25519)?,
            };
            let mut params = CertificateParams::new(vec![name.to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &self.issuer)?;
            Ok((cert, key))
        }

        /// Writes `ca.pem`, then `<name>.pem` and `<name>.key` for each node, into `dir`.
        pub fn write_to_dir(
            &self,
            dir: impl AsRef<Path>,
            names: &[&str],
        ) -> Result<(), DevCertError> {
            let dir = dir.as_ref();
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("ca.pem"), &self.cert_pem)?;
            for name in names {
                let (cert, key) = self.issue_raw(name)?;
                std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
                std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
            }
            Ok(())
        }
    }

    /// An Ed25519 key whose 32-byte secret is `SHA-256(seed_le || label)`.
    fn seeded_key(seed: u64, label: &str) -> Result<KeyPair, DevCertError> {
        // PKCS#8 v1 for Ed25519 (RFC 8410): a fixed header, then the 32-byte secret.
        const PKCS8_ED25519_HEADER: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(&seed.to_le_bytes());
        digest.update(label.as_bytes());
        let mut der = PKCS8_ED25519_HEADER.to_vec();
        der.extend_from_slice(digest.finish().as_ref());
        let der = PrivatePkcs8KeyDer::from(der);
        Ok(KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519)?)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_seeded_ca_issues_the_same_material_for_one_seed_and_different_for_another() {
            let a = DevCa::from_seed(1).unwrap();
            let b = DevCa::from_seed(1).unwrap();
            let c = DevCa::from_seed(2).unwrap();
            assert_eq!(a.certificate(), b.certificate());
            assert_ne!(a.certificate(), c.certificate());
            let (x, y) = (a.issue("node-a").unwrap(), b.issue("node-a").unwrap());
            assert_eq!(x.cert_chain, y.cert_chain);
            assert_eq!(x.key.secret_der(), y.key.secret_der());
            assert_ne!(x.cert_chain, a.issue("node-b").unwrap().cert_chain);
            assert!(
                super::super::build(
                    &x,
                    "node-a",
                    super::super::crypto_provider(),
                    super::super::system_time()
                )
                .is_ok()
            );
        }

        #[test]
        fn issued_material_builds_and_names_match() {
            let ca = DevCa::new().unwrap();
            let tls = ca.issue("node-a").unwrap();
            assert!(
                super::super::build(
                    &tls,
                    "node-a",
                    super::super::crypto_provider(),
                    super::super::system_time()
                )
                .is_ok()
            );
            let err = super::super::build(
                &tls,
                "node-b",
                super::super::crypto_provider(),
                super::super::system_time(),
            )
            .unwrap_err();
            assert!(
                matches!(err, super::super::TlsError::NameMismatch { .. }),
                "{err}"
            );
        }

        #[test]
        fn pem_files_round_trip() {
            let ca = DevCa::new().unwrap();
            let dir = std::env::temp_dir().join(format!("grinta-dev-certs-{}", std::process::id()));
            ca.write_to_dir(&dir, &["node-a"]).unwrap();
            let tls = TlsConfig::from_pem_files(
                dir.join("ca.pem"),
                dir.join("node-a.pem"),
                dir.join("node-a.key"),
            )
            .unwrap();
            assert!(
                super::super::build(
                    &tls,
                    "node-a",
                    super::super::crypto_provider(),
                    super::super::system_time()
                )
                .is_ok()
            );
            let missing = TlsConfig::from_pem_files(
                dir.join("nope.pem"),
                dir.join("node-a.pem"),
                dir.join("node-a.key"),
            );
            assert!(missing.unwrap_err().to_string().contains("nope.pem"));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;

    #[test]
    fn one_value_per_key_for_as_many_keys_as_the_capacity_the_first_inserted_forgotten() {
        let mut m: OnePerKey<u32, Option<u32>> = OnePerKey::new(4096);
        for k in 0..10_000u32 {
            *m.get_or_insert(k) = Some(k);
            // A second value for the same key replaces the first.
            *m.get_or_insert(k) = Some(k + 1);
            assert!(m.values.len() <= 4096 && m.order.len() == m.values.len());
        }
        for k in 0..10_000u32 {
            let kept = m.get_mut(&k).and_then(|v| v.take());
            assert_eq!(kept, (k >= 10_000 - 4096).then_some(k + 1), "{k}");
        }
        // Taken once: nothing left to take, and the key stays known.
        assert_eq!(m.get_mut(&9_999).and_then(|v| v.take()), None);
        assert_eq!(m.values.len(), 4096);
    }

    #[test]
    fn the_server_keeps_the_4096_latest_sessions_each_taken_once() {
        use rustls::server::StoresServerSessions;
        let store = ServerSessions::new(TLS_SESSION_CACHE);
        let key = |i: u32| i.to_be_bytes().to_vec();
        // Nothing reserved up front.
        assert_eq!(store.with(|s| s.values.capacity()), 0);
        for i in 0..50_000u32 {
            assert!(store.put(key(i), key(i + 1)));
        }
        assert_eq!(
            store.with(|s| (s.values.len(), s.order.len())),
            (4096, 4096)
        );
        for i in 0..50_000u32 {
            let kept = (i >= 50_000 - 4096).then(|| key(i + 1));
            assert_eq!(store.get(&key(i)), kept, "{i}");
            assert_eq!(store.take(&key(i)), kept, "{i}");
            assert_eq!(store.take(&key(i)), None, "taken once: {i}");
        }
        assert_eq!(store.with(|s| (s.values.len(), s.order.len())), (0, 0));
        // Sessions taken as fast as they are issued (every reconnection resumes) hold nothing.
        for i in 0..50_000u32 {
            store.put(key(i), key(i));
            assert_eq!(store.take(&key(i)), Some(key(i)));
        }
        assert_eq!(store.with(|s| (s.values.len(), s.order.len())), (0, 0));
        // A key stored again after it was taken is forgotten only when its turn comes again.
        store.put(key(1), key(1));
        store.take(&key(1));
        for i in 1..=4096u32 {
            store.put(key(i), key(i));
        }
        assert_eq!(store.get(&key(1)), Some(key(1)));
        store.put(key(5000), key(5000));
        assert_eq!(store.get(&key(1)), None);
        assert_eq!(store.get(&key(2)), Some(key(2)));
    }

    #[test]
    fn the_client_remembers_a_key_exchange_for_each_of_4096_servers() {
        use rustls::client::ClientSessionStore;
        let store = SessionTickets::new(TLS_SESSION_CACHE);
        let name = |i: usize| ServerName::try_from(format!("node-{i}")).expect("a DNS name");
        for i in 0..TLS_SESSION_CACHE {
            store.set_kx_hint(name(i), rustls::NamedGroup::X25519);
        }
        // rustls's own memory cache of this size remembers 512 servers.
        for i in 0..TLS_SESSION_CACHE {
            assert_eq!(store.kx_hint(&name(i)), Some(rustls::NamedGroup::X25519));
        }
        store.set_kx_hint(name(TLS_SESSION_CACHE), rustls::NamedGroup::X25519);
        assert_eq!(store.kx_hint(&name(0)), None, "the first one is forgotten");
        assert!(store.take_tls13_ticket(&name(1)).is_none());
    }
}
