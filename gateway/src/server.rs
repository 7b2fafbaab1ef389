//! Assembles a gateway from its configuration and runs it until shutdown.
//!
//! Listeners are passed in (bound by the caller), so tests start real gateways on
//! `127.0.0.1:0` and the binary binds the configured addresses.

use std::net::SocketAddr;
use std::sync::Arc;

use accord_proto::directory::Directories;
use accord_proto::envelope::Limits;
use accord_proto::ids::{CountryCode, Role};
use accord_proto::keyfile::KeyFile;
use accord_proto::pb::{
    self as pb, audit_server::AuditServer, exchange_server::ExchangeServer,
    peer_link_client::PeerLinkClient, peer_link_server::PeerLinkServer,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::pipeline::{Clock, Pipeline, Signals};
use crate::service::{AuditService, ExchangeService, PeerLinkService};
use crate::store::sled::SledStore;
use crate::store::Store;
use crate::tls::{self, Admission, CountryRoots, Credentials};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS material is missing, unreadable, or does not name this gateway.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The certificate names another identity than `identity` in the configuration.
    #[error("the certificate names {cert} but the configuration says identity = {config}")]
    IdentityMismatch { cert: String, config: String },
    /// A directory file is unreadable or invalid.
    #[error("directory {path}: {problem}")]
    Directory { path: String, problem: String },
    /// A key file (receipt, log or witness key) is unreadable or invalid.
    #[error("key file {path}: {problem}")]
    Key { path: String, problem: String },
    /// The store could not be opened.
    #[error("store at {path}: {source}")]
    Store {
        path: String,
        source: crate::store::StoreError,
    },
    /// A listen address could not be bound (in use, or not an address of this host).
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Binds the configured listeners, runs the gateway until SIGINT or SIGTERM, then stops it
/// cleanly (in-flight calls finish, the store is flushed): what `accord-gateway run` does.
pub async fn run_until_signal(config: &Config) -> Result<(), StartError> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let client = bind("client_listen", config.client_listen).await?;
    let peer = bind("peer_listen", config.peer_listen).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(StartError::Signals)?;
    let gateway = start(config, client, peer, crate::pipeline::system_clock()).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    if tokio::time::timeout(STOP_LIMIT, gateway.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            limit_s = STOP_LIMIT.as_secs(),
            "stop not done within its limit (a call that does not end): exiting anyway; what was acknowledged is on disk, and the next start replays the store's write-ahead log"
        );
    }
    Ok(())
}

/// How long a stop may take before the process ends anyway: under the service manager's
/// limit (TimeoutStopSec in deploy/accord-gateway.service), past the forwarder's grace.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Reads the pinned directory keys (JSON array of `accord.v1.DirectoryTrust`).
pub fn load_directory_trust(path: &std::path::Path) -> Result<Vec<pb::DirectoryTrust>, StartError> {
    let err = |problem: String| StartError::Directory {
        path: path.display().to_string(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))
}

/// Reads one signed directory file (JSON `accord.v1.SignedDirectory`), unverified.
fn read_signed_directory(path: &std::path::Path) -> Result<pb::SignedDirectory, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Reads every signed directory file (JSON `accord.v1.SignedDirectory`) and verifies each
/// against the pinned keys of its country: an unsigned or wrongly signed one stops the start.
pub fn load_directories(
    paths: &[std::path::PathBuf],
    trust: &[pb::DirectoryTrust],
    now: i64,
) -> Result<Directories, StartError> {
    let mut signed = Vec::new();
    for p in paths {
        let err = |problem: String| StartError::Directory {
            path: p.display().to_string(),
            problem,
        };
        signed.push(read_signed_directory(p).map_err(err)?);
    }
    Directories::from_signed(signed, trust, now).map_err(|e| StartError::Directory {
        path: "(all directories)".into(),
        problem: e.to_string(),
    })
}

/// Refuses a private key file that anyone but its owner may read or write.
fn owner_only(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "permissions {:o} let others read it; chmod 600 it",
            mode & 0o777
        ));
    }
    Ok(())
}

/// The largest key, certificate or key file read: a chain of a few certificates is a few KiB.
const MAX_CREDENTIAL_FILE: u64 = 1 << 20;

/// Reads a key or certificate file with one open: it must be a regular file of at most
/// 1 MiB and, if `secret`, readable by its owner only, checked on the handle the bytes come
/// from (a file swapped in between is not read). The bytes are wiped when dropped.
pub fn read_credential_file(
    path: &std::path::Path,
    secret: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use std::io::Read;
    // Looked at before opening too: opening a FIFO planted at the path would block the
    // reader (the reload loop) until someone writes to it.
    if !std::fs::metadata(path)
        .map_err(|e| e.to_string())?
        .is_file()
    {
        return Err("not a regular file".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_CREDENTIAL_FILE {
        return Err(format!("larger than {MAX_CREDENTIAL_FILE} bytes"));
    }
    if secret {
        owner_only(&meta)?;
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(MAX_CREDENTIAL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE {
        return Err(format!("larger than {MAX_CREDENTIAL_FILE} bytes"));
    }
    Ok(bytes)
}

/// Reads a private key file, refusing one that others may read.
pub fn load_key_file(path: &std::path::Path) -> Result<KeyFile, String> {
    let bytes = read_credential_file(path, true)?;
    KeyFile::from_json(&bytes).map_err(|e| e.to_string())
}

/// A running gateway: where it listens, and how to stop it.
#[derive(Debug)]
pub struct RunningGateway {
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub pipeline: Arc<Pipeline>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl RunningGateway {
    /// Stops listening, lets in-flight calls finish, and closes the store.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Resolves when shutdown was requested (e.g. by a signal handler holding a sender).
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Wraps the store a gateway opened, before anything uses it: for tests that make a real
/// store misbehave (commits that stall) under a running gateway.
pub type StoreLayer = Box<dyn FnOnce(Arc<dyn Store>) -> Arc<dyn Store> + Send>;

/// Starts a gateway on the given listeners.
pub async fn start(
    config: &Config,
    client_listener: TcpListener,
    peer_listener: TcpListener,
    clock: Clock,
) -> Result<RunningGateway, StartError> {
    let as_opened: StoreLayer = Box::new(|store| store);
    start_layered(config, client_listener, peer_listener, clock, as_opened).await
}

/// [`start`], with the store it opens wrapped by `layer`.
pub async fn start_layered(
    config: &Config,
    client_listener: TcpListener,
    peer_listener: TcpListener,
    clock: Clock,
    layer: StoreLayer,
) -> Result<RunningGateway, StartError> {
    let creds = Credentials::load(&config.tls_cert, &config.tls_key)?;
    if creds.id != config.identity {
        return Err(StartError::IdentityMismatch {
            cert: creds.id.to_string(),
            config: config.identity.to_string(),
        });
    }
    let country = config.identity.country().clone();
    let mut own_roots = CountryRoots::default();
    own_roots.add(country.clone(), &config.tls_root)?;
    own_roots.add_crls(country.clone(), &config.tls_crls)?;
    // Peers would refuse a certificate our own root does not accept: say so now.
    creds.check(&own_roots)?;
    let mut peer_roots = CountryRoots::default();
    for p in &config.peers {
        peer_roots.add(p.gateway.country().clone(), &p.root)?;
        peer_roots.add_crls(p.gateway.country().clone(), &p.crls)?;
    }
    let directory_trust = load_directory_trust(&config.directory_trust)?;
    let policy =
        crate::policy::Policy::load(&config.policy).map_err(|e| StartError::Directory {
            path: e.file.clone(),
            problem: e.problems.join("; "),
        })?;
    let directories = load_directories(&config.directories, &directory_trust, clock())?;
    let key = |path: &std::path::Path| {
        load_key_file(path).map_err(|problem| StartError::Key {
            path: path.display().to_string(),
            problem,
        })
    };
    let keys = key(&config.receipt_key)?;
    let origin = crate::transparency::origin(&config.identity);
    let note_err = |e: accord_proto::note::NoteError| StartError::Key {
        path: config.log_key.display().to_string(),
        problem: e.to_string(),
    };
    let log_keys = crate::transparency::LogKeys {
        signer: accord_proto::note::NoteSigner::new(&origin, key(&config.log_key)?.signing)
            .map_err(note_err)?,
        cosigner: accord_proto::note::Cosigner::new(&origin, key(&config.witness_key)?.signing)
            .map_err(note_err)?,
        origin,
    };
    let mut peer_clients = std::collections::HashMap::new();
    let mut forwarder_clients = std::collections::HashMap::new();
    for peer in &config.peers {
        // The shared peer roots (with their CRLs): the verifier checks the chain against the
        // root of the country the certificate names, then demands exactly `peer.gateway`.
        let tls_config = tls::client_config(&creds, peer_roots.clone(), peer.gateway.clone())?;
        let client = |channel| PeerLinkClient::new(channel).max_decoding_message_size(64 << 20);
        let cc = peer.gateway.country().clone();
        peer_clients.insert(
            cc.clone(),
            client(tls::channel(peer.address, tls_config.clone())),
        );
        // The forwarder's calls have a connection of their own, which opens within half a
        // call's limit: a call waits for one connection attempt at most, its own or a call
        // beside it's, and when none opened it fails as one that never left before its own
        // limit runs out (after which the forwarder could not tell whether the peer took it).
        let call_limit = std::time::Duration::from_millis(config.forwarder.call_timeout_ms);
        let channel = tls::channel_connecting_within(peer.address, tls_config, call_limit / 2);
        forwarder_clients.insert(cc, client(channel));
    }
    // Opening the store replays its write-ahead log and may wait up to 3 s for sled's
    // lock, and the chunk store walks its folders: both off the async workers, which may
    // be serving other gateways of the same runtime (tests).
    let data_dir = config.data_dir.clone();
    let cache = config.limits.store_cache_bytes;
    let (store, chunks) = tokio::task::spawn_blocking(move || {
        let store = SledStore::open(&data_dir, cache).map_err(|source| StartError::Store {
            path: data_dir.display().to_string(),
            source,
        })?;
        let chunks_dir = data_dir.join("attachments");
        let chunks =
            crate::attachments::ChunkStore::open(&chunks_dir).map_err(|e| StartError::Store {
                path: chunks_dir.display().to_string(),
                source: e.into(),
            })?;
        Ok::<_, StartError>((store, chunks))
    })
    .await
    .unwrap_or_else(|e| match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        // Cancelled: the runtime is shutting down.
        Err(e) => Err(StartError::Store {
            path: config.data_dir.display().to_string(),
            source: crate::store::StoreError::Engine(format!("opening the store: {e}")),
        }),
    })?;
    let pipeline = Arc::new(Pipeline {
        identity: config.identity.clone(),
        store: layer(Arc::new(store)),
        directories: std::sync::RwLock::new(Arc::new(directories)),
        directory_trust,
        policy: std::sync::RwLock::new(Arc::new(policy)),
        receipt_key: keys.signing,
        limits: Limits {
            max_ciphertext: config.limits.max_ciphertext_bytes,
            ..Limits::default()
        },
        chunks: Arc::new(chunks),
        max_attachment_bytes: config.limits.max_attachment_bytes,
        attachment_quota_bytes: config.limits.attachment_quota_bytes,
        quota_bytes: config.limits.queue_quota_bytes,
        peers: config
            .peers
            .iter()
            .map(|p| p.gateway.country().clone())
            .collect(),
        clock,
        signals: Signals::default(),
        log_keys,
        checkpoint_lock: tokio::sync::Mutex::new(()),
        witness_lock: tokio::sync::Mutex::new(()),
        witness_alarms: std::sync::atomic::AtomicU64::new(0),
        endings: Default::default(),
        peer_clients,
    });

    // Clients: organisations of this country. Peers: exactly the configured peer gateways;
    // certificates are required to carry the EKU of their use (no EKU is no use).
    let client_tls = tls::server_config(
        &creds,
        own_roots.clone(),
        Admission::Any {
            role: Role::Org,
            countries: vec![country.clone()],
        },
    )?;
    let peer_tls = tls::server_config(
        &creds,
        peer_roots.clone(),
        Admission::Exactly(config.peers.iter().map(|p| p.gateway.clone()).collect()),
    )?;
    let client_addr = client_listener
        .local_addr()
        .map_err(|e| tls::TlsError::Pem {
            path: "client_listen".into(),
            problem: e.to_string(),
        })?;
    let peer_addr = peer_listener.local_addr().map_err(|e| tls::TlsError::Pem {
        path: "peer_listen".into(),
        problem: e.to_string(),
    })?;

    let (shutdown, _) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExchangeServer<ExchangeService>>()
        .await;
    health
        .set_serving::<PeerLinkServer<PeerLinkService>>()
        .await;
    health.set_serving::<AuditServer<AuditService>>().await;

    let stop = wait_for(shutdown.subscribe());
    let exchange = ExchangeServer::new(ExchangeService {
        pipeline: pipeline.clone(),
        shutdown: shutdown.subscribe(),
    })
    .max_decoding_message_size(max_upload_message(config));
    let audit = AuditServer::new(AuditService {
        pipeline: pipeline.clone(),
    })
    .max_encoding_message_size(256 << 20);
    let health_c = health_service.clone();
    let incoming = crate::listener::incoming(client_listener, client_tls, "client");
    tasks.spawn(async move {
        let result = tonic::transport::Server::builder()
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
            .add_service(health_c)
            .add_service(exchange)
            .add_service(audit)
            .serve_with_incoming_shutdown(incoming, stop)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "client listener failed");
        }
    });

    let stop = wait_for(shutdown.subscribe());
    let peer_link = PeerLinkServer::new(PeerLinkService {
        pipeline: pipeline.clone(),
    })
    .max_decoding_message_size(
        crate::service::MAX_BATCH * (config.limits.max_ciphertext_bytes + 64 * 1024),
    );
    let incoming = crate::listener::incoming(peer_listener, peer_tls, "peer");
    tasks.spawn(async move {
        let result = tonic::transport::Server::builder()
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
            .max_concurrent_streams(PEER_STREAMS)
            .add_service(health_service)
            .add_service(peer_link)
            .serve_with_incoming_shutdown(incoming, stop)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "peer listener failed");
        }
    });

    // One watcher for every file that takes effect without a restart. Baselines are taken
    // now, not when the task first runs: a file changed right after start must count.
    let roots = vec![own_roots, peer_roots];
    let mut watched: Vec<(std::path::PathBuf, Watched)> = Vec::new();
    for path in creds.files() {
        watched.push((path.to_path_buf(), Watched::Credentials));
    }
    for (i, r) in roots.iter().enumerate() {
        for (cc, path) in r.crl_files() {
            watched.push((path.clone(), Watched::Crls(i, cc.clone())));
        }
    }
    watched.push((config.policy.clone(), Watched::Policy));
    for path in &config.directories {
        watched.push((path.clone(), Watched::Directory));
    }
    let seen = watched.iter().map(|(p, _)| (p.clone(), stamp(p))).collect();
    tasks.spawn(reload_on_change(
        pipeline.clone(),
        creds,
        roots,
        watched,
        seen,
        RELOAD_POLL,
        shutdown.subscribe(),
    ));

    tasks.spawn(sweep_attachments(pipeline.clone(), shutdown.subscribe()));
    tasks.spawn(report_store_health(
        pipeline.store.clone(),
        health,
        shutdown.subscribe(),
    ));

    for peer in &config.peers {
        let client = pipeline
            .peer_clients
            .get(peer.gateway.country())
            .cloned()
            .ok_or_else(|| tls::TlsError::NoIdentity("peer client".into()))?;
        let forwarding = forwarder_clients
            .remove(peer.gateway.country())
            .ok_or_else(|| tls::TlsError::NoIdentity("forwarder's peer client".into()))?;
        tasks.spawn(crate::forwarder::run(
            pipeline.clone(),
            peer.gateway.clone(),
            forwarding,
            config.forwarder.clone(),
            shutdown.subscribe(),
        ));
        tasks.spawn(crate::transparency::witness_loop(
            pipeline.clone(),
            peer.gateway.clone(),
            client,
            std::time::Duration::from_millis(config.log.checkpoint_interval_ms),
            shutdown.subscribe(),
        ));
    }

    tracing::info!(
        identity = %config.identity,
        %client_addr,
        %peer_addr,
        peers = config.peers.len(),
        data_dir = %config.data_dir.display(),
        "gateway ready"
    );
    Ok(RunningGateway {
        client_addr,
        peer_addr,
        pipeline,
        shutdown,
        tasks,
    })
}

/// How long a client or peer connection lives before the gateway asks it to reconnect
/// (HTTP/2 GOAWAY: calls in flight finish, the channel dials again). A certificate revoked
/// or a CRL published while a connection is open takes effect on it within this time.
const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(3600);
/// How long calls in flight (a subscription, say) may run on after that.
const MAX_CONNECTION_AGE_GRACE: std::time::Duration = std::time::Duration::from_secs(300);
/// Most calls a peer may have open at once on one connection (HTTP/2 streams): its
/// forwarder's Deliver calls (at most `forwarder.in_flight`, 8), two attachment pushes,
/// witnessing, directories and proofs, with room to spare. A peer's further calls on the
/// connection wait for one to end.
const PEER_STREAMS: u32 = 32;

/// How often reloadable files are checked for changes.
const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(1);

type Stamps = std::collections::HashMap<std::path::PathBuf, Option<Stamp>>;

/// What tells a changed file apart: modification time and length, and, since either can
/// stay the same (`cp -p`, `rsync -t`, same-size keys, coarse timestamps), the inode, the
/// status change time and the mode (a `chmod 600` after a refusal is a change too).
type Stamp = (std::time::SystemTime, u64, u64, i64, i64, u32);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.modified().ok()?,
        meta.len(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.mode(),
    ))
}

/// What a watched file feeds when it changes.
#[derive(Debug)]
enum Watched {
    /// Our own certificate or its key (index 0 of the roots is our own country's).
    Credentials,
    /// The CRLs of a country, in the roots at this index.
    Crls(usize, CountryCode),
    /// The role policy.
    Policy,
    /// A signed directory.
    Directory,
}

/// Polls the watched files each `every` and applies what changed:
/// - our certificate and key: a pair for the same identity that our own root accepts is
///   presented from the next handshake on (listeners and peer dialers alike);
/// - CRLs: the country's CRLs are re-read and swapped in at once for new handshakes;
/// - the policy: one that parses replaces the one in force for the next envelope;
/// - a directory: one that verifies under the pinned keys and is newer is taken (and logged)
///   exactly as a peer's would be.
///
/// Anything that fails is logged and what is in force stays. No connection is touched.
async fn reload_on_change(
    pipeline: Arc<Pipeline>,
    creds: Arc<Credentials>,
    roots: Vec<CountryRoots>,
    watched: Vec<(std::path::PathBuf, Watched)>,
    mut seen: Stamps,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_credentials: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wait_for(shutdown.clone()) => return,
        }
        if *shutdown.borrow_and_update() {
            return;
        }
        // Several CRL files of one country changing at once reload that country once.
        let mut crls = std::collections::BTreeSet::new();
        // The certificate and its key are read together, once, if either changed.
        let mut credentials = false;
        for (path, what) in &watched {
            let now = stamp(path);
            if seen.insert(path.clone(), now) == Some(now) {
                continue;
            }
            match what {
                Watched::Credentials => credentials = true,
                Watched::Crls(i, cc) => {
                    crls.insert((*i, cc.clone()));
                }
                Watched::Policy => match crate::policy::Policy::load(path) {
                    Ok(p) => {
                        *pipeline.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
                        tracing::info!(file = %path.display(), "policy reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "policy reload refused; the previous policy stays in force")
                    }
                },
                Watched::Directory => {
                    let result = match read_signed_directory(path) {
                        Ok(signed) => match accord_proto::directory::country_of(&signed) {
                            Ok(cc) => pipeline
                                .update_directory(&cc, &pipeline.identity, signed)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(true) => tracing::info!(file = %path.display(), "directory reloaded"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(file = %path.display(), error = %e, "directory reload refused; the held directory stays in force")
                        }
                    }
                }
            }
        }
        // CRLs first: a renewed certificate is checked against the CRLs published with it.
        for (i, country) in crls {
            let Some(r) = roots.get(i) else { continue };
            match r.reload_crls(&country) {
                Ok(()) => tracing::info!(%country, "CRLs reloaded"),
                Err(e) => tracing::error!(
                    %country,
                    error = %e,
                    "CRL reload refused; the previous CRLs stay in force"
                ),
            }
        }
        // A refused pair is tried again every tick until it is taken or replaced: it may
        // become acceptable without its files changing (a clock catching up with its
        // notBefore, say). The error is logged when it first appears or changes.
        if credentials || refused_credentials.is_some() {
            let Some(own) = roots.first() else { continue };
            match creds.reload(own) {
                Ok(()) => {
                    refused_credentials = None;
                    tracing::info!(identity = %creds.id, "TLS certificate reloaded");
                }
                Err(e) => {
                    let e = e.to_string();
                    if refused_credentials.as_ref() != Some(&e) {
                        tracing::error!(
                            error = %e,
                            "TLS certificate reload refused; the certificate in force stays"
                        );
                    }
                    refused_credentials = Some(e);
                }
            }
        }
    }
}

/// How often chunks of expired envelopes are looked for.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Drops expired attachment chunks at start, then every [`SWEEP_INTERVAL`].
async fn sweep_attachments(pipeline: Arc<Pipeline>, shutdown: watch::Receiver<bool>) {
    let stop = wait_for(shutdown);
    tokio::pin!(stop);
    loop {
        pipeline.sweep_attachments().await;
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = &mut stop => return,
        }
    }
}

/// How often the health service looks at the store.
const STORE_HEALTH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Turns the gateway's health (the server's and the exchange and peer services', on both
/// listeners) to NOT_SERVING once its store stopped taking commits, so that monitors and
/// load balancers see what every call would now fail with. Only a restart brings the store
/// back. The audit service only reads: it stays SERVING while the store still answers reads
/// (auditors can check the log as it was when commits stopped), and is looked at on every
/// turn until they fail too.
async fn report_store_health(
    store: Arc<dyn Store>,
    health: tonic_health::server::HealthReporter,
    shutdown: watch::Receiver<bool>,
) {
    let stop = wait_for(shutdown);
    tokio::pin!(stop);
    let mut commits_stopped = false;
    loop {
        if !commits_stopped {
            if let Some(why) = store.stopped() {
                tracing::error!(
                    error = %why,
                    "the store stopped taking commits: health is NOT_SERVING; restart the gateway"
                );
                let not_serving = tonic_health::ServingStatus::NotServing;
                health.set_service_status("", not_serving).await;
                health
                    .set_not_serving::<ExchangeServer<ExchangeService>>()
                    .await;
                health
                    .set_not_serving::<PeerLinkServer<PeerLinkService>>()
                    .await;
                commits_stopped = true;
            }
        }
        // Reads are only looked at once commits stopped: a working store answers them.
        if commits_stopped {
            if let Err(e) = store.log_size() {
                tracing::error!(
                    error = %e,
                    "the store's log cannot be read: the audit service is NOT_SERVING"
                );
                health.set_not_serving::<AuditServer<AuditService>>().await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STORE_HEALTH_EVERY) => {}
            _ = &mut stop => return,
        }
    }
}

/// Largest message a client stream carries: an upload's start (the envelope and a hash list
/// of up to `MAX_CHUNKS` entries) or one chunk, whichever is larger.
fn max_upload_message(config: &Config) -> usize {
    use accord_proto::attachment::{MAX_CHUNKS, MAX_CHUNK_SIZE, TAG_LEN};
    let start = config.limits.max_ciphertext_bytes + MAX_CHUNKS as usize * 34;
    let chunk = MAX_CHUNK_SIZE as usize + TAG_LEN;
    start.max(chunk) + 64 * 1024
}

/// Resolves once `rx` reads true, or its sender is gone: a task's cue to stop.
pub(crate) async fn wait_for(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use accord_proto::ids::MessageId;
    use accord_proto::log::LogIndex;
    use accord_proto::pb;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;
    use crate::store::{Commit, Queue, QueueEntry, QueueKey, StoreError, StoredMessage, Tx};

    /// A store whose commits and reads stop when the test says so: the failures a real one
    /// meets (a full disk, sled failing part way) cannot be provoked from outside.
    #[derive(Default)]
    struct FailingStore {
        stopped: Mutex<Option<String>>,
        reads_fail: AtomicBool,
    }

    impl FailingStore {
        fn read<T>(&self, value: T) -> Result<T, StoreError> {
            if self.reads_fail.load(Ordering::SeqCst) {
                return Err(StoreError::Engine("sled failed part way".into()));
            }
            Ok(value)
        }
    }

    impl Store for FailingStore {
        fn commit(&self, _: Tx) -> Commit {
            Box::pin(async { Err(StoreError::Closed) })
        }
        fn message(&self, _: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
            self.read(None)
        }
        fn receipts(&self, _: &MessageId) -> Result<Vec<pb::Receipt>, StoreError> {
            self.read(Vec::new())
        }
        fn queue(&self, _: &Queue, _: usize) -> Result<Vec<(QueueKey, QueueEntry)>, StoreError> {
            self.read(Vec::new())
        }
        fn log_size(&self) -> Result<u64, StoreError> {
            self.read(7)
        }
        fn log_entry(&self, _: LogIndex) -> Result<Option<Vec<u8>>, StoreError> {
            self.read(None)
        }
        fn disk_usage(&self) -> Result<u64, StoreError> {
            self.read(0)
        }
        fn log_node(&self, _: u32, _: u64) -> Result<Option<[u8; 32]>, StoreError> {
            self.read(None)
        }
        fn message_events(&self, _: &MessageId) -> Result<Vec<LogIndex>, StoreError> {
            self.read(Vec::new())
        }
        fn meta(&self, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.read(None)
        }
        fn stopped(&self) -> Option<String> {
            self.stopped.lock().unwrap().clone()
        }
    }

    async fn status(health: &tonic_health::server::HealthService, service: &str) -> ServingStatus {
        let request = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        let answer = health.check(request).await.expect("registered service");
        answer.into_inner().status()
    }

    #[tokio::test(start_paused = true)]
    async fn audit_turns_not_serving_when_reads_fail_after_commits_stopped() {
        use ServingStatus::{NotServing, Serving};
        let store = Arc::new(FailingStore::default());
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_serving::<ExchangeServer<ExchangeService>>()
            .await;
        reporter.set_serving::<AuditServer<AuditService>>().await;
        let (shutdown, watching) = watch::channel(false);
        let task = tokio::spawn(report_store_health(store.clone(), reporter, watching));
        let (exchange, audit) = ("accord.v1.Exchange", "accord.v1.Audit");
        let a_few_turns = STORE_HEALTH_EVERY * 3;

        tokio::time::sleep(a_few_turns).await;
        assert_eq!(status(&health, "").await, Serving);
        assert_eq!(status(&health, exchange).await, Serving);

        *store.stopped.lock().unwrap() = Some("disk full".into());
        tokio::time::sleep(a_few_turns).await;
        assert_eq!(status(&health, "").await, NotServing);
        assert_eq!(status(&health, exchange).await, NotServing);
        assert_eq!(status(&health, audit).await, Serving, "reads still work");

        // Reads failing later, not only when commits stopped, turn the audit service off.
        store.reads_fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(a_few_turns).await;
        assert_eq!(status(&health, audit).await, NotServing);
        assert!(task.is_finished(), "nothing is left to report");
        drop(shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn a_working_store_keeps_every_service_serving_until_shutdown() {
        let store = Arc::new(FailingStore::default());
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        reporter.set_serving::<AuditServer<AuditService>>().await;
        let (shutdown, watching) = watch::channel(false);
        let task = tokio::spawn(report_store_health(store, reporter, watching));
        tokio::time::sleep(STORE_HEALTH_EVERY * 3).await;
        assert_eq!(status(&health, "").await, ServingStatus::Serving);
        assert_eq!(
            status(&health, "accord.v1.Audit").await,
            ServingStatus::Serving
        );
        assert!(!task.is_finished(), "still watching a working store");
        shutdown.send(true).unwrap();
        tokio::time::timeout(STORE_HEALTH_EVERY, task)
            .await
            .expect("the reporter stops at shutdown")
            .unwrap();
    }
}
