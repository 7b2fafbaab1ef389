//! Gateway configuration: TOML, unknown keys refused, paths relative to the file, and every
//! problem reported at once with the file and key it concerns.
//!
//! ```toml
//! identity = "spiffe://vn.accord/gateway/hanoi"   # must match the TLS certificate's SAN
//! data_dir = "data/vn"                             # the embedded store
//! client_listen = "127.0.0.1:7443"                 # mTLS, organisations of this country
//! peer_listen = "127.0.0.1:7444"                   # mTLS, peer gateways
//!
//! [tls]
//! root = "vn/ca.pem"                               # this country's root CA
//! cert = "vn/gateway/cert.pem"
//! key = "vn/gateway/key.pem"
//! crls = ["vn/crl.pem"]                            # optional: CRLs of this country's root, for
//!                                                  # the client listener; PEM, reloaded when
//!                                                  # changed (polled every second)
//!
//! receipt_key = "vn/gateway/keys.json"             # Ed25519 key that signs receipts
//! log_key = "vn/gateway/log-key.json"              # Ed25519 key that signs checkpoints
//! witness_key = "vn/gateway/witness-key.json"      # Ed25519 key that cosigns peers' checkpoints
//! directory_trust = "directory-trust.json"          # pinned directory keys of every country
//! policy = "policy.toml"                           # role policy (deploy/policy.toml)
//! directories = ["vn/directory.signed.json", "kh/directory.signed.json"]
//!
//! [[peers]]
//! gateway = "spiffe://kh.accord/gateway/phnom-penh"
//! address = "127.0.0.1:8444"
//! root = "kh/ca.pem"
//! crls = ["kh/crl.pem"]                            # optional: CRLs of that peer's root
//!
//! [limits]                                         # all optional
//! max_ciphertext_bytes = 4194304
//! queue_quota_bytes = 10737418240
//! store_cache_bytes = 16777216
//!
//! [log]                                            # optional
//! checkpoint_interval_ms = 1000                    # publish and have peers cosign this often
//!
//! [forwarder]                                      # all optional
//! batch = 64
//! batch_bytes = 2097152
//! in_flight = 2
//! call_timeout_ms = 60000
//! initial_backoff_ms = 200
//! max_backoff_ms = 30000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use accord_proto::ids::{Role, SpiffeId};
use serde::Deserialize;

/// Why a configuration was refused: every problem found, each naming its file and key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {}", problems.join("; "))]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    identity: String,
    data_dir: PathBuf,
    client_listen: String,
    peer_listen: String,
    tls: RawTls,
    receipt_key: PathBuf,
    log_key: PathBuf,
    witness_key: PathBuf,
    directory_trust: PathBuf,
    policy: PathBuf,
    directories: Vec<PathBuf>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    forwarder: ForwarderConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    crls: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    gateway: String,
    address: String,
    root: PathBuf,
    #[serde(default)]
    crls: Vec<PathBuf>,
}

/// Size and space limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest ciphertext accepted in an envelope.
    pub max_ciphertext_bytes: usize,
    /// Disk the store may use before submissions are refused with RESOURCE_EXHAUSTED.
    pub queue_quota_bytes: u64,
    /// Memory for the store's reads: the blocks of its runs read lately, and sled's page
    /// cache, which only a store made before layout 4 fills (up to this much each).
    pub store_cache_bytes: u64,
    /// Most attachment bytes (plaintext, all attachments together) one envelope may carry.
    pub max_attachment_bytes: u64,
    /// Attachment chunks held (uploads, queued and undelivered messages) before uploads get
    /// RESOURCE_EXHAUSTED; apart from `queue_quota_bytes`, so envelopes still flow.
    pub attachment_quota_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ciphertext_bytes: 4 << 20,
            queue_quota_bytes: 10 << 30,
            store_cache_bytes: 16 << 20,
            max_attachment_bytes: 256 << 20,
            attachment_quota_bytes: 8 << 30,
        }
    }
}

/// The transparency log.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// How often a new checkpoint is published and sent to every peer to cosign.
    pub checkpoint_interval_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval_ms: 1000,
        }
    }
}

/// The most envelope bytes a forwarder's call may gather before it closes: a peer holds a
/// whole call in memory while it answers it.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// Most Deliver calls a forwarder may keep out at once: each holds its envelopes in memory
/// at both ends, `batch_bytes` and the one envelope that closed the batch.
pub const MAX_IN_FLIGHT: usize = 8;

/// How outboxes drain towards peers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwarderConfig {
    /// Most items sent in one Deliver call.
    pub batch: usize,
    /// A Deliver call's envelopes stop at the first to reach this many bytes together (one
    /// goes, whatever its size): 64 envelopes of 1 MiB made one 64 MiB call, held whole at
    /// both ends, and nothing else moved on the link until it was settled.
    pub batch_bytes: usize,
    /// Most Deliver calls out on a peer link at once. A further call goes only while the one
    /// before it is full (more entries wait behind it) and the link's last answer moved
    /// entries, so that the peer stores one batch while the next travels; a link that keeps
    /// up, or that failed, sends one at a time. Calls out together may be stored by the
    /// peer in either order.
    pub in_flight: usize,
    /// How long a Deliver call (or the directory offer before it) may go unanswered, plus a
    /// second per MiB it carries; then it counts as failed (its entries go again after a
    /// backoff). A peer that stops answering with its connection open would otherwise hold
    /// the link until TCP gives up. At least 100.
    pub call_timeout_ms: u64,
    /// First retry delay after a failure; doubles up to `max_backoff_ms`, with jitter.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            batch: 64,
            batch_bytes: 2 << 20,
            in_flight: 2,
            call_timeout_ms: 60_000,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
        }
    }
}

/// A peer gateway: who it is, where it listens, which root vouches for it.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub gateway: SpiffeId,
    pub address: SocketAddr,
    pub root: PathBuf,
    /// CRLs of the peer's root (checked on both peer listener and dialer).
    pub crls: Vec<PathBuf>,
}

/// A checked configuration with absolute paths.
#[derive(Clone, Debug)]
pub struct Config {
    pub identity: SpiffeId,
    pub data_dir: PathBuf,
    pub client_listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub tls_root: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// CRLs of this country's root, for the client listener.
    pub tls_crls: Vec<PathBuf>,
    pub receipt_key: PathBuf,
    pub log_key: PathBuf,
    pub witness_key: PathBuf,
    pub directory_trust: PathBuf,
    pub policy: PathBuf,
    pub directories: Vec<PathBuf>,
    pub peers: Vec<PeerConfig>,
    pub log: LogConfig,
    pub limits: Limits,
    pub forwarder: ForwarderConfig,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        Self::parse(&text, path)
    }

    /// Checks TOML `text` as if read from `path` (relative paths resolve from its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![e.to_string()],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| base.join(p);
        let mut problems = Vec::new();
        let must_exist = |problems: &mut Vec<String>, key: &str, p: &Path| {
            if !p.exists() {
                problems.push(format!("{key}: {} does not exist", p.display()));
            }
        };
        let tls_root = abs(&raw.tls.root);
        let tls_cert = abs(&raw.tls.cert);
        let tls_key = abs(&raw.tls.key);
        let receipt_key = abs(&raw.receipt_key);
        must_exist(&mut problems, "tls.root", &tls_root);
        must_exist(&mut problems, "tls.cert", &tls_cert);
        must_exist(&mut problems, "tls.key", &tls_key);
        let tls_crls: Vec<_> = raw.tls.crls.iter().map(|p| abs(p)).collect();
        for (i, c) in tls_crls.iter().enumerate() {
            must_exist(&mut problems, &format!("tls.crls[{i}]"), c);
        }
        must_exist(&mut problems, "receipt_key", &receipt_key);
        let log_key = abs(&raw.log_key);
        let witness_key = abs(&raw.witness_key);
        must_exist(&mut problems, "log_key", &log_key);
        must_exist(&mut problems, "witness_key", &witness_key);
        let directory_trust = abs(&raw.directory_trust);
        must_exist(&mut problems, "directory_trust", &directory_trust);
        let policy = abs(&raw.policy);
        if policy.exists() {
            // Checked at start like the rest: a bad policy stops the gateway.
            if let Err(e) = crate::policy::Policy::load(&policy) {
                problems.extend(e.problems.into_iter().map(|p| format!("policy: {p}")));
            }
        } else {
            problems.push(format!("policy: {} does not exist", policy.display()));
        }
        if raw.log.checkpoint_interval_ms == 0 {
            problems.push("log.checkpoint_interval_ms: must be at least 1".into());
        }
        let directories: Vec<_> = raw.directories.iter().map(|p| abs(p)).collect();
        for (i, d) in directories.iter().enumerate() {
            must_exist(&mut problems, &format!("directories[{i}]"), d);
        }
        let mut peers = Vec::new();
        for (i, p) in raw.peers.iter().enumerate() {
            let root = abs(&p.root);
            must_exist(&mut problems, &format!("peers[{i}].root"), &root);
            let crls: Vec<_> = p.crls.iter().map(|c| abs(c)).collect();
            for (j, c) in crls.iter().enumerate() {
                must_exist(&mut problems, &format!("peers[{i}].crls[{j}]"), c);
            }
            let gateway = p.gateway.parse::<SpiffeId>();
            let address = p.address.parse::<SocketAddr>();
            match (&gateway, &address) {
                (Ok(g), Ok(a)) if g.role() == Role::Gateway => peers.push(PeerConfig {
                    gateway: g.clone(),
                    address: *a,
                    root,
                    crls,
                }),
                _ => {
                    if !matches!(&gateway, Ok(g) if g.role() == Role::Gateway) {
                        problems.push(format!(
                            "peers[{i}].gateway: {:?} is not spiffe://<cc>.accord/gateway/<name>",
                            p.gateway
                        ));
                    }
                    if address.is_err() {
                        problems.push(format!(
                            "peers[{i}].address: {:?} is not host:port",
                            p.address
                        ));
                    }
                }
            }
        }
        let identity = match raw.identity.parse::<SpiffeId>() {
            Ok(id) if id.role() == Role::Gateway => Some(id),
            _ => {
                problems.push(format!(
                    "identity: {:?} is not spiffe://<cc>.accord/gateway/<name>",
                    raw.identity
                ));
                None
            }
        };
        if let Some(id) = &identity {
            for (i, p) in peers.iter().enumerate() {
                if p.gateway.country() == id.country() {
                    problems.push(format!(
                        "peers[{i}].gateway: a peer must be another country"
                    ));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in peers.iter().enumerate() {
            if !seen.insert(p.gateway.country().clone()) {
                problems.push(format!("peers[{i}].gateway: a second peer for one country"));
            }
        }
        let client_listen = parse_addr("client_listen", &raw.client_listen, &mut problems);
        let peer_listen = parse_addr("peer_listen", &raw.peer_listen, &mut problems);
        if !(1..=crate::service::MAX_BATCH).contains(&raw.forwarder.batch) {
            problems.push(format!(
                "forwarder.batch: must be between 1 and {} (the most a peer takes in one call)",
                crate::service::MAX_BATCH
            ));
        }
        if !(1..=MAX_BATCH_BYTES).contains(&raw.forwarder.batch_bytes) {
            problems.push(format!(
                "forwarder.batch_bytes: must be between 1 and {MAX_BATCH_BYTES} (64 MiB)"
            ));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&raw.forwarder.in_flight) {
            problems.push(format!(
                "forwarder.in_flight: must be between 1 and {MAX_IN_FLIGHT}"
            ));
        }
        if raw.forwarder.call_timeout_ms < 100 {
            problems.push("forwarder.call_timeout_ms: must be at least 100".into());
        }
        if raw.forwarder.initial_backoff_ms == 0
            || raw.forwarder.max_backoff_ms < raw.forwarder.initial_backoff_ms
        {
            problems.push("forwarder: need 0 < initial_backoff_ms <= max_backoff_ms".into());
        }
        match (identity, client_listen, peer_listen) {
            (Some(identity), Some(client_listen), Some(peer_listen)) if problems.is_empty() => {
                Ok(Config {
                    identity,
                    data_dir: abs(&raw.data_dir),
                    client_listen,
                    peer_listen,
                    tls_root,
                    tls_cert,
                    tls_key,
                    tls_crls,
                    receipt_key,
                    log_key,
                    witness_key,
                    directory_trust,
                    policy,
                    directories,
                    peers,
                    log: raw.log,
                    limits: raw.limits,
                    forwarder: raw.forwarder,
                })
            }
            _ => Err(ConfigError { file, problems }),
        }
    }
}

fn parse_addr(key: &str, value: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match value.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!("{key}: {value:?} is not host:port"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err =
            Config::parse("identity = 'x'\nidentiy = 'y'", Path::new("/x/gw.toml")).unwrap_err();
        assert!(err.to_string().contains("identiy"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
identity = "spiffe://vn.accord/org/c02"
data_dir = "d"
client_listen = "nope"
peer_listen = "127.0.0.1:0"
receipt_key = "missing.json"
log_key = "log.json"
witness_key = "witness.json"
directory_trust = "trust.json"
policy = "policy.toml"
directories = []
[tls]
root = "r.pem"
cert = "c.pem"
key = "k.pem"
crls = ["crl.pem"]
[forwarder]
batch = 0
batch_bytes = 0
in_flight = 0
call_timeout_ms = 0
[[peers]]
gateway = "spiffe://kh.accord/gateway/pp"
address = "bad"
root = "kh.pem"
crls = ["kh-crl.pem"]
"#;
        let err = Config::parse(text, Path::new("/nonexistent/gw.toml")).unwrap_err();
        let s = err.to_string();
        for key in [
            "identity",
            "client_listen",
            "tls.root",
            "receipt_key",
            "peers[0].address",
            "peers[0].root",
            "tls.crls[0]",
            "peers[0].crls[0]",
            "forwarder.batch:",
            "forwarder.batch_bytes:",
            "forwarder.in_flight:",
            "forwarder.call_timeout_ms:",
        ] {
            assert!(s.contains(key), "{key} missing from: {s}");
        }
        assert!(s.starts_with("/nonexistent/gw.toml"));
        // Above the bounds as well as below: more items than a peer takes in one call, more
        // calls out than allowed.
        let over = text
            .replace("batch = 0", "batch = 257")
            .replace("batch_bytes = 0", "batch_bytes = 67108865")
            .replace("in_flight = 0", "in_flight = 9")
            .replace("call_timeout_ms = 0", "call_timeout_ms = 99");
        let s = Config::parse(&over, Path::new("/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("forwarder.batch: must be between 1 and 256"),
            "{s}"
        );
        assert!(
            s.contains("forwarder.in_flight: must be between 1 and 8"),
            "{s}"
        );
        for problem in [
            "forwarder.batch_bytes: must be between",
            "forwarder.call_timeout_ms: must be at least 100",
        ] {
            assert!(s.contains(problem), "{s}");
        }
        let within = text
            .replace("batch = 0", "batch = 256")
            .replace("batch_bytes = 0", "batch_bytes = 67108864")
            .replace("in_flight = 0", "in_flight = 8")
            .replace("call_timeout_ms = 0", "call_timeout_ms = 100");
        let s = Config::parse(&within, Path::new("/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(!s.contains("forwarder."), "{s}");
    }
}

#[cfg(test)]
mod deploy_example {
    use super::*;

    #[test]
    fn the_deploy_example_config_has_only_missing_file_problems() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/vn-gateway.toml"
        ));
        match Config::load(path) {
            Ok(_) => {}
            Err(e) => {
                for p in &e.problems {
                    assert!(p.ends_with("does not exist"), "unexpected problem: {p}");
                }
            }
        }
    }
}
