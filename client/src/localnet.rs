//! A local network of countries, each with a gateway on loopback, a dev PKI and organisations:
//! what `accord demo` runs and what the end-to-end tests build on.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let net = accord_client::localnet::LocalNet::builder()
//!     .country("vn", "hanoi", &["c02"])
//!     .country("kh", "phnom-penh", &["ahtd"])
//!     .start()
//!     .await?;
//! let mut c02 = net.client("vn", "c02").await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use accord_certs::{CountryFiles, CountrySpec, DevPki};
use accord_gateway::config::Config;
use accord_gateway::pipeline::system_clock;
use accord_gateway::server::{self, RunningGateway};
use anyhow::Context;
use tokio::net::TcpListener;

use crate::org::{GatewayAddress, OrgClient};

/// The role policy gateways of a [`LocalNet`] enforce unless told otherwise.
pub const DEFAULT_POLICY: &str = include_str!("../../deploy/policy.toml");

/// Builds a [`LocalNet`].
#[derive(Debug, Default)]
pub struct Builder {
    countries: Vec<CountrySpec>,
    dir: Option<PathBuf>,
    policies: BTreeMap<String, String>,
    limits: BTreeMap<String, String>,
    checkpoint_interval_ms: Option<u64>,
    forwarder_batch: Option<usize>,
    forwarder_batch_bytes: Option<usize>,
    forwarder_in_flight: Option<usize>,
    forwarder_call_timeout_ms: Option<u64>,
}

/// How often gateways of a [`LocalNet`] publish checkpoints unless told otherwise: often,
/// so that tests see them soon (a deployed gateway's default is a second).
const TEST_CHECKPOINT_INTERVAL_MS: u64 = 200;

impl Builder {
    pub fn country(mut self, cc: &str, gateway: &str, orgs: &[&str]) -> Self {
        self.countries.push(CountrySpec {
            country: cc.parse().expect("test country codes are valid"),
            gateway: gateway.to_owned(),
            orgs: orgs.iter().map(|o| o.to_string()).collect(),
        });
        self
    }

    /// The role policy (TOML, as `deploy/policy.toml`) of `cc`'s gateway.
    pub fn policy(mut self, cc: &str, toml: &str) -> Self {
        self.policies.insert(cc.to_owned(), toml.to_owned());
        self
    }

    /// The `[limits]` table (TOML lines, e.g. `attachment_quota_bytes = 1000`) of `cc`'s
    /// gateway configuration.
    pub fn limits(mut self, cc: &str, toml: &str) -> Self {
        self.limits.insert(cc.to_owned(), toml.to_owned());
        self
    }

    /// How often every gateway publishes a checkpoint and has its peers cosign it (at
    /// least every millisecond, as the gateway requires).
    pub fn checkpoint_interval_ms(mut self, ms: u64) -> Self {
        self.checkpoint_interval_ms = Some(ms.max(1));
        self
    }

    /// How many outbox entries every gateway's forwarder sends to a peer at once (the
    /// gateway's default unless told).
    pub fn forwarder_batch(mut self, batch: usize) -> Self {
        self.forwarder_batch = Some(batch);
        self
    }

    /// How many bytes of envelopes every gateway's forwarder puts in one batch before it
    /// closes it (the gateway's default unless told).
    pub fn forwarder_batch_bytes(mut self, bytes: usize) -> Self {
        self.forwarder_batch_bytes = Some(bytes);
        self
    }

    /// How many Deliver calls every gateway's forwarder keeps out at once (the gateway's
    /// default unless told).
    pub fn forwarder_in_flight(mut self, calls: usize) -> Self {
        self.forwarder_in_flight = Some(calls);
        self
    }

    /// How long every gateway's forwarder waits for a peer to answer a call (the gateway's
    /// default unless told).
    pub fn forwarder_call_timeout_ms(mut self, ms: u64) -> Self {
        self.forwarder_call_timeout_ms = Some(ms);
        self
    }

    /// Keep files under `dir` instead of a fresh temporary directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Writes the PKI and configurations, binds every listener, starts every gateway.
    pub async fn start(self) -> anyhow::Result<LocalNet> {
        let mut net = self.prepare().await?;
        let names: Vec<String> = net.countries.keys().cloned().collect();
        for cc in &names {
            net.start_gateway(cc).await?;
        }
        Ok(net)
    }

    /// Writes the PKI and configurations and binds every listener (choosing the ports), but
    /// starts no gateway: for running them here ([`LocalNet::start_gateway`]) or as processes
    /// ([`LocalNet::release_listeners`], then `accord gateway CONFIG`).
    pub async fn prepare(self) -> anyhow::Result<LocalNet> {
        accord_gateway::tls::install_default_provider();
        let (tmp, root) = match self.dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let now = crate::org::now_ms();
        let files = DevPki::write(&root.join("pki"), &self.countries, now)?;
        let mut countries = BTreeMap::new();
        for (spec, files) in self.countries.iter().zip(files) {
            let client = TcpListener::bind("127.0.0.1:0").await?;
            let peer = TcpListener::bind("127.0.0.1:0").await?;
            let addrs = (client.local_addr()?, peer.local_addr()?);
            countries.insert(
                spec.country.to_string(),
                Country {
                    files,
                    addrs,
                    listeners: Some((client, peer)),
                    gateway: None,
                    config: None,
                    tuning: Default::default(),
                },
            );
        }
        for spec in &self.countries {
            let cc = spec.country.to_string();
            let text = self
                .policies
                .get(&cc)
                .map_or(DEFAULT_POLICY, String::as_str);
            std::fs::write(root.join(format!("{cc}-policy.toml")), text)?;
        }
        let mut net = LocalNet {
            root,
            _tmp: tmp,
            countries,
        };
        let names: Vec<String> = net.countries.keys().cloned().collect();
        for cc in &names {
            let limits = self.limits.get(cc).map_or("", String::as_str);
            let every = self
                .checkpoint_interval_ms
                .unwrap_or(TEST_CHECKPOINT_INTERVAL_MS);
            let forwarder: String = [
                self.forwarder_batch.map(|b| format!("batch = {b}\n")),
                self.forwarder_batch_bytes
                    .map(|b| format!("batch_bytes = {b}\n")),
                self.forwarder_in_flight
                    .map(|n| format!("in_flight = {n}\n")),
                self.forwarder_call_timeout_ms
                    .map(|ms| format!("call_timeout_ms = {ms}\n")),
            ]
            .into_iter()
            .flatten()
            .collect();
            let config = net.write_config(cc, limits, every, &forwarder)?;
            let c = net.countries.get_mut(cc).context("country")?;
            c.config = Some(config);
            c.tuning = (every, forwarder);
        }
        Ok(net)
    }
}

#[derive(Debug)]
struct Country {
    files: CountryFiles,
    addrs: (SocketAddr, SocketAddr),
    listeners: Option<(TcpListener, TcpListener)>,
    gateway: Option<RunningGateway>,
    config: Option<Config>,
    /// The checkpoint interval and `[forwarder]` lines its configuration was written with.
    tuning: (u64, String),
}

/// Running gateways of several countries on loopback, with their dev PKI.
#[derive(Debug)]
pub struct LocalNet {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    countries: BTreeMap<String, Country>,
}

impl LocalNet {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn country(&self, cc: &str) -> anyhow::Result<&Country> {
        self.countries
            .get(cc)
            .with_context(|| format!("no country {cc} in this net"))
    }

    /// The gateway configuration file of `cc` (written as TOML, as an operator would).
    pub fn config_path(&self, cc: &str) -> PathBuf {
        self.root.join(format!("{cc}-gateway.toml"))
    }

    fn write_config(
        &self,
        cc: &str,
        limits: &str,
        checkpoint_ms: u64,
        forwarder: &str,
    ) -> anyhow::Result<Config> {
        let me = self.country(cc)?;
        let pki = self.root.join("pki");
        let mut toml = format!(
            "identity = \"{id}\"\ndata_dir = \"data/{cc}\"\nclient_listen = \"{c}\"\npeer_listen = \"{p}\"\n\
             receipt_key = \"pki/{cc}/gateway/keys.json\"\nlog_key = \"pki/{cc}/gateway/log-key.json\"\n\
             witness_key = \"pki/{cc}/gateway/witness-key.json\"\ndirectory_trust = \"pki/directory-trust.json\"\npolicy = \"{cc}-policy.toml\"\ndirectories = [{dirs}]\n\n\
             [tls]\nroot = \"pki/{cc}/ca.pem\"\ncert = \"pki/{cc}/gateway/cert.pem\"\nkey = \"pki/{cc}/gateway/key.pem\"\ncrls = [\"pki/{cc}/crl.pem\"]\n\n\
             [forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 1000\n{forwarder}\n[log]\ncheckpoint_interval_ms = {checkpoint_ms}\n",
            id = me.files.gateway_id,
            c = me.addrs.0,
            p = me.addrs.1,
            dirs = self.countries.keys().map(|k| format!("\"pki/{k}/directory.signed.json\"")).collect::<Vec<_>>().join(", "),
        );
        if !limits.is_empty() {
            toml.push_str(&format!("\n[limits]\n{limits}\n"));
        }
        for (other, c) in &self.countries {
            if other != cc {
                toml.push_str(&format!(
                    "\n[[peers]]\ngateway = \"{}\"\naddress = \"{}\"\nroot = \"pki/{other}/ca.pem\"\ncrls = [\"pki/{other}/crl.pem\"]\n",
                    c.files.gateway_id, c.addrs.1
                ));
            }
        }
        let _ = pki;
        let path = self.config_path(cc);
        std::fs::write(&path, toml)?;
        Ok(Config::load(&path)?)
    }

    /// Starts (or restarts) the gateway of `cc` on its original addresses.
    pub async fn start_gateway(&mut self, cc: &str) -> anyhow::Result<()> {
        self.start_gateway_layered(cc, Box::new(|store| store))
            .await
    }

    /// [`Self::start_gateway`], with the store the gateway opens wrapped by `layer`.
    pub async fn start_gateway_layered(
        &mut self,
        cc: &str,
        layer: server::StoreLayer,
    ) -> anyhow::Result<()> {
        let c = self
            .countries
            .get_mut(cc)
            .with_context(|| format!("no country {cc}"))?;
        anyhow::ensure!(c.gateway.is_none(), "gateway {cc} already running");
        let (client, peer) = match c.listeners.take() {
            Some(l) => l,
            None => (bind_again(c.addrs.0).await?, bind_again(c.addrs.1).await?),
        };
        let config = c.config.as_ref().context("config")?;
        c.gateway = Some(server::start_layered(config, client, peer, system_clock(), layer).await?);
        Ok(())
    }

    /// Writes `cc`'s configuration again with the `[limits]` lines `toml` (in place of any
    /// set before), as an operator changing them would: they take effect at its next start.
    pub fn set_limits(&mut self, cc: &str, toml: &str) -> anyhow::Result<()> {
        let (every, forwarder) = self.country(cc)?.tuning.clone();
        let config = self.write_config(cc, toml, every, &forwarder)?;
        let c = self.countries.get_mut(cc).context("country")?;
        c.config = Some(config);
        Ok(())
    }

    /// Frees the addresses chosen for `cc`'s gateway, for a gateway process to bind them.
    pub fn release_listeners(&mut self, cc: &str) -> anyhow::Result<()> {
        let c = self
            .countries
            .get_mut(cc)
            .with_context(|| format!("no country {cc}"))?;
        c.listeners = None;
        Ok(())
    }

    /// Stops the gateway of `cc`, closing its store; its addresses stay reserved for a restart.
    pub async fn stop_gateway(&mut self, cc: &str) -> anyhow::Result<()> {
        let c = self
            .countries
            .get_mut(cc)
            .with_context(|| format!("no country {cc}"))?;
        if let Some(g) = c.gateway.take() {
            g.shutdown().await;
        }
        Ok(())
    }

    pub fn gateway(&self, cc: &str) -> anyhow::Result<&RunningGateway> {
        self.country(cc)?
            .gateway
            .as_ref()
            .with_context(|| format!("gateway {cc} is stopped"))
    }

    /// The store folder of `cc`'s gateway.
    pub fn data_dir(&self, cc: &str) -> anyhow::Result<PathBuf> {
        let c = self.country(cc)?;
        Ok(c.config.as_ref().context("config")?.data_dir.clone())
    }

    /// How a client of `cc` reaches its gateway.
    pub fn gateway_address(&self, cc: &str) -> anyhow::Result<GatewayAddress> {
        let c = self.country(cc)?;
        Ok(GatewayAddress {
            addr: c.addrs.0,
            id: c.files.gateway_id.clone(),
            root: c.files.ca(),
            trust: accord_certs::DevPki::trust_file(&self.root.join("pki")),
        })
    }

    /// Where `cc`'s gateway listens (or listened, and will again) for its peers.
    pub fn peer_address(&self, cc: &str) -> anyhow::Result<SocketAddr> {
        Ok(self.country(cc)?.addrs.1)
    }

    pub fn org_dir(&self, cc: &str, org: &str) -> anyhow::Result<PathBuf> {
        Ok(self.country(cc)?.files.org_dir(org))
    }

    pub fn org_id(&self, cc: &str, org: &str) -> anyhow::Result<accord_proto::ids::OrgId> {
        Ok(format!("spiffe://{cc}.accord/org/{org}").parse()?)
    }

    /// Connects organisation `org` of `cc` to its gateway.
    pub async fn client(&self, cc: &str, org: &str) -> anyhow::Result<OrgClient> {
        let dir = self.org_dir(cc, org)?;
        Ok(OrgClient::connect(&dir, &self.gateway_address(cc)?).await?)
    }

    /// Stops every gateway.
    pub async fn shutdown(mut self) {
        let names: Vec<String> = self.countries.keys().cloned().collect();
        for cc in names {
            let _ = self.stop_gateway(&cc).await;
        }
    }
}

/// Rebinds a port just released by a stopped gateway (the OS may take a moment), e.g. for a
/// test that puts a stand-in where a gateway listened.
pub async fn bind_again(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("bind {addr}")))
}
