//! [`FabricBuilder`]: a node's settings, then [`start`](FabricBuilder::start).

use std::net::SocketAddr;
use std::path::Path;

use crate::flow::FlowLimits;
use crate::membership;
use crate::node::{NodeConfig, NodeError};
use crate::registry::RegistryLimits;
use crate::tags::{TagError, Tags};
use crate::tls::TlsConfig;
use crate::transport::TransportLimits;

use super::{Error, Fabric, Runtime};

/// Membership timing presets (see `docs/membership.md` for the figures behind each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// A local-area network: probes every second, a crash detected in about 5 to 10 s.
    #[default]
    Lan,
    /// A wide-area network: slower probes and longer timeouts.
    Wan,
    /// Nodes on one host (loopback): fast probes, a crash detected in a few seconds.
    Local,
}

impl Profile {
    /// The membership settings of this profile.
    pub fn membership(self) -> membership::Config {
        match self {
            Self::Lan => membership::Config::lan(),
            Self::Wan => membership::Config::wan(),
            Self::Local => membership::Config::local(),
        }
    }
}

/// Settings of a node, then [`start`](Self::start). Obtained from [`Fabric::builder`] (or the
/// adapters' `Fabric::builder`).
///
/// Defaults: bind `127.0.0.1:0` (loopback, a free port), advertise the bound address, no seeds
/// (a cluster of one until others join through this node), [`Profile::Lan`], default limits.
/// TLS material is required.
///
/// ```no_run
/// # fn demo<R: grinta_proto::fabric::Runtime>() -> Result<(), Box<dyn std::error::Error>> {
/// use grinta_proto::fabric::{Fabric, Profile};
///
/// let fabric = Fabric::<R>::builder("node-b")
///     .bind("0.0.0.0:7002".parse()?)
///     .advertise("10.0.0.2:7002".parse()?)
///     .seed("10.0.0.1:7001".parse()?)
///     .tls_pem_files("certs/ca.pem", "certs/node-b.pem", "certs/node-b.key")
///     .profile(Profile::Lan)
///     .start()?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `start`"]
pub struct FabricBuilder<R: Runtime> {
    name: String,
    bind: SocketAddr,
    advertise: Option<SocketAddr>,
    seeds: Vec<SocketAddr>,
    tls: Option<Result<TlsConfig, Error>>,
    membership: membership::Config,
    flows: FlowLimits,
    registry: RegistryLimits,
    transport: TransportLimits,
    rng_seed: Option<u64>,
    /// The tags so far, or the first tag refused.
    tags: Result<Tags, TagError>,
    _runtime: std::marker::PhantomData<fn() -> R>,
}

impl<R: Runtime> std::fmt::Debug for FabricBuilder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricBuilder")
            .field("name", &self.name)
            .field("bind", &self.bind)
            .field("advertise", &self.advertise)
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> FabricBuilder<R> {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            seeds: Vec::new(),
            tls: None,
            membership: Profile::Lan.membership(),
            flows: FlowLimits::default(),
            registry: RegistryLimits::default(),
            transport: TransportLimits::default(),
            rng_seed: None,
            tags: Ok(Tags::new()),
            _runtime: std::marker::PhantomData,
        }
    }

    /// The local address of the node's UDP socket. Port 0 picks a free port.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// The address other nodes reach this one at (needed when binding a wildcard IP, or behind
    /// NAT); defaults to the bound address.
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.advertise = Some(addr);
        self
    }

    /// Adds a seed: the address of a member to join through. Any member will do.
    pub fn seed(mut self, addr: SocketAddr) -> Self {
        self.seeds.push(addr);
        self
    }

    /// Adds seeds (see [`seed`](Self::seed)).
    pub fn seeds(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.seeds.extend(addrs);
        self
    }

    /// The node's TLS material: cluster CA, certificate (whose DNS SAN is the node name), key.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(Ok(tls));
        self
    }

    /// Loads the TLS material from PEM files (errors surface at [`start`](Self::start)).
    pub fn tls_pem_files(
        mut self,
        ca: impl AsRef<Path>,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Self {
        self.tls = Some(
            TlsConfig::from_pem_files(ca, cert_chain, key)
                .map_err(|e| Error::Start(NodeError::Tls(e))),
        );
        self
    }

    /// Issues this node a development certificate from `ca` (for tests and demos: every node of
    /// the cluster must use the same `DevCa`).
    #[cfg(feature = "dev-certs")]
    pub fn dev_certificates(mut self, ca: &crate::tls::dev::DevCa) -> Self {
        self.tls = Some(ca.issue(&self.name).map_err(|e| {
            Error::Start(NodeError::Tls(crate::tls::TlsError::DevCertificates(
                Box::new(e),
            )))
        }));
        self
    }

    /// Membership timing preset (replaces any [`membership`](Self::membership) settings).
    pub fn profile(mut self, profile: Profile) -> Self {
        self.membership = profile.membership();
        self
    }

    /// Membership settings in full, for tuning beyond the profiles.
    pub fn membership(mut self, config: membership::Config) -> Self {
        self.membership = config;
        self
    }

    /// Flow limits: message size, buffers, accept backlog, dial timeout, flow counts.
    pub fn flow_limits(mut self, limits: FlowLimits) -> Self {
        self.flows = limits;
        self
    }

    /// How long [`Fabric::shutdown`] lets open flows finish before resetting them (default
    /// 5 s; zero resets them at once).
    pub fn shutdown_grace(mut self, grace: std::time::Duration) -> Self {
        self.flows.shutdown_grace = grace;
        self
    }

    /// How long [`Fabric::request`] waits for a reply, the dial included (default 10 s).
    pub fn request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.flows.request_timeout = timeout;
        self
    }

    /// Endpoint-directory limits.
    pub fn registry_limits(mut self, limits: RegistryLimits) -> Self {
        self.registry = limits;
        self
    }

    /// Transport limits: connections, idle timeout, and the largest packets path MTU discovery
    /// looks for (`TransportLimits::max_udp_payload`: raise it to `JUMBO_MAX_UDP_PAYLOAD` on
    /// every node where paths carry jumbo frames or the nodes share a host; no profile does).
    pub fn transport_limits(mut self, limits: TransportLimits) -> Self {
        self.transport = limits;
        self
    }

    /// Gives the node tag `key` = `value` from its start (see [`crate::tags`]; it can change
    /// later with [`Fabric::set_tag`]). A key or value beyond the limits fails `start` with
    /// [`Error::Tag`].
    ///
    /// ```no_run
    /// # fn demo<R: grinta_proto::fabric::Runtime>(tls: grinta_proto::tls::TlsConfig) -> Result<(), Box<dyn std::error::Error>> {
    /// use grinta_proto::fabric::Fabric;
    ///
    /// let fabric = Fabric::<R>::builder("node-a")
    ///     .tls(tls)
    ///     .tag("zone", "eu-west")
    ///     .tag("role", "billing")
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn tag(mut self, key: &str, value: &str) -> Self {
        if let Ok(tags) = &mut self.tags {
            if let Err(e) = tags.insert(key, value) {
                self.tags = Err(e);
            }
        }
        self
    }

    /// Seeds the protocol's randomness (probe order, gossip targets) for reproducible runs;
    /// cryptographic randomness always comes from the TLS provider.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// The [`NodeConfig`] these settings make (for [`Node`](crate::node::Node) users and for
    /// inspection); fails like [`start`](Self::start) on missing or unusable TLS material.
    pub fn config(self) -> Result<NodeConfig, Error> {
        let tls = self.tls.unwrap_or(Err(Error::Start(NodeError::Tls(
            crate::tls::TlsError::NotConfigured,
        ))))?;
        let mut config = NodeConfig::new(&self.name, self.bind, tls);
        config.advertise = self.advertise;
        config.seeds = self.seeds;
        config.membership = self.membership;
        config.flows = self.flows;
        config.registry = self.registry;
        config.transport = self.transport;
        config.tags = self.tags?;
        Ok(config)
    }

    /// Binds the socket, starts the node and its driver, and joins the seeds.
    pub fn start(self) -> Result<Fabric<R>, Error> {
        let seed = self.rng_seed;
        Fabric::start(self.config()?, seed)
    }
}
