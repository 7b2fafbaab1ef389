//! Harness for Accord's end-to-end tests: real gateways on loopback with real TLS and
//! on-disk stores. [`TestNet`] is the client library's local network, so the demo and the
//! tests exercise one and the same assembly.

pub use accord_client::localnet::LocalNet as TestNet;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use accord_gateway::store::{
    Commit, MessageHead, Queue, QueueEntry, QueueKey, Store, StoreError, StoredMessage, Tx,
};
use accord_proto::ids::MessageId;
use accord_proto::log::LogIndex;

use accord_client::org::Opened;
use accord_client::org::OrgClient;

/// The net most tests run: VN's Hanoi gateway with organisation C02 and KH's Phnom Penh
/// gateway with AHTD. Add countries, policies or limits before `start`.
pub fn vn_and_kh() -> accord_client::localnet::Builder {
    TestNet::builder()
        .country("vn", "hanoi", &["c02"])
        .country("kh", "phnom-penh", &["ahtd"])
}

/// Sends the alert `what` from VN C02 (`c02`, its client in `net`) to KH AHTD and waits
/// until KH's gateway holds it (its received receipt is back at VN); what was sent.
pub async fn alert_received_at_kh(
    net: &TestNet,
    c02: &mut OrgClient,
    what: &str,
) -> anyhow::Result<accord_client::org::Sent> {
    let sent = c02
        .send(
            &net.org_id("kh", "ahtd")?,
            &alert(what),
            &accord_client::org::SendOptions::new("P1"),
        )
        .await?;
    wait_stage(c02, &sent.id, accord_proto::pb::Stage::Received).await?;
    Ok(sent)
}

/// Sends the alert `what` from VN C02 (`c02`, its client in `net`) to KH AHTD, to expire
/// `ttl_ms` from now; what was sent.
pub async fn short_lived_alert(
    net: &TestNet,
    c02: &mut OrgClient,
    what: &str,
    ttl_ms: i64,
) -> anyhow::Result<accord_client::org::Sent> {
    let short = accord_client::org::SendOptions {
        ttl_ms,
        ..accord_client::org::SendOptions::new("C11")
    };
    Ok(c02
        .send(&net.org_id("kh", "ahtd")?, &alert(what), &short)
        .await?)
}

/// How long until message `id`, held by `cc`'s gateway in `net`, expires (zero if it did).
pub fn until_expiry(
    net: &TestNet,
    cc: &str,
    id: &accord_proto::ids::MessageId,
) -> anyhow::Result<Duration> {
    let head = net
        .gateway(cc)?
        .pipeline
        .store
        .message_head(id)?
        .ok_or_else(|| anyhow::anyhow!("{cc} holds no message {id}"))?;
    Ok(Duration::from_millis(
        (head.expires_at_ms - now_ms()).max(0) as u64,
    ))
}

/// Waits until `id`'s chain ends with a REJECTED for its expiry signed by VN's own gateway
/// (retired there, not on the peer's word); the chain.
pub async fn expired_at_vn(
    client: &mut OrgClient,
    id: &accord_proto::ids::MessageId,
) -> anyhow::Result<Vec<accord_proto::receipt::VerifiedReceipt>> {
    let chain = wait_stage(client, id, accord_proto::pb::Stage::Rejected).await?;
    let rejected = chain
        .iter()
        .find(|r| r.stage() == accord_proto::pb::Stage::Rejected)
        .ok_or_else(|| anyhow::anyhow!("no REJECTED"))?;
    anyhow::ensure!(
        rejected.body.reason == accord_proto::pb::RejectReason::Expired as i32
            && rejected.signer.to_string() == "spiffe://vn.accord/gateway/hanoi",
        "not expired at VN: {:?}",
        rejected.body
    );
    Ok(chain)
}

/// Polls `id`'s chain of receipts until its furthest stage is `stage` (or fails after
/// ~15 s); the chain.
pub async fn wait_stage(
    client: &mut OrgClient,
    id: &accord_proto::ids::MessageId,
    stage: accord_proto::pb::Stage,
) -> anyhow::Result<Vec<accord_proto::receipt::VerifiedReceipt>> {
    for _ in 0..300 {
        let (_, chain) = client.status(id).await?;
        if accord_client::org::furthest_stage(&chain) == stage {
            return Ok(chain);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("message {id} never reached {stage:?}")
}

/// Fetches until `want` envelopes arrived (or fails after ~10 s), acknowledging none.
pub async fn fetch_n(client: &mut OrgClient, want: usize) -> anyhow::Result<Vec<Opened>> {
    let mut got = Vec::new();
    for _ in 0..200 {
        got = client.fetch(256).await?;
        if got.len() >= want {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("received {} of {want} envelopes in time", got.len())
}

/// The wall clock in Unix milliseconds, as envelopes carry it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A header from `from` to `to` as a client's library fills one (a fresh UUIDv7, created
/// now, an hour to live, ROUTINE, H0, X4), with the recipient's current encryption key:
/// for tests that seal what a well-behaved client would not. Change fields with `..`.
pub fn raw_header(
    from: &OrgClient,
    to: &accord_proto::ids::OrgId,
    kind: accord_proto::pb::Kind,
    case_ref: &str,
) -> anyhow::Result<(accord_proto::pb::Header, [u8; 32])> {
    use accord_proto::pb;
    let now = now_ms();
    let (key_id, pk) = from.directories().current_encryption_key(to, now)?;
    let id = accord_proto::ids::MessageId::new_v7(now as u64, accord_proto::crypto::random()?);
    let header = pb::Header {
        message_id: id.as_bytes().to_vec(),
        kind: kind as i32,
        case_ref: case_ref.into(),
        sender_org: from.id.to_string(),
        recipient_org: to.to_string(),
        recipient_key_id: key_id,
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
        priority: pb::Priority::Routine as i32,
        handling_code: "H0".into(),
        evaluation: "X4".into(),
        ..Default::default()
    };
    Ok((header, pk))
}

/// An alert form, for tests that do not care about the kind.
pub fn alert(what: &str) -> accord_proto::pb::Body {
    accord_proto::pb::Body {
        form: Some(accord_proto::pb::body::Form::Alert(
            accord_proto::pb::Alert {
                what: what.into(),
                r#where: "Xa Mát – Trapeang Phlong".into(),
                ..Default::default()
            },
        )),
    }
}

/// Fetches a message's evidence bundle through `auditor` until it verifies against the
/// directory files of `net` (events join a bundle once a cosigned checkpoint covers them).
pub async fn verified_evidence(
    net: &TestNet,
    auditor: &OrgClient,
    id: &accord_proto::ids::MessageId,
) -> anyhow::Result<Vec<u8>> {
    let trusted = trusted_directories(net)?;
    let mut last = String::new();
    for _ in 0..200 {
        let bundle = auditor
            .audit()
            .get_evidence(accord_proto::pb::GetEvidenceRequest {
                message_id: id.as_bytes().to_vec(),
            })
            .await?
            .into_inner();
        let bytes = prost::Message::encode_to_vec(&bundle);
        let report = accord_proto::evidence::verify_bundle(&bytes, &trusted);
        if report.ok() {
            return Ok(bytes);
        }
        last = report.to_string();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("evidence never verified; last report:\n{last}")
}

/// The directory files the dev PKI of `net` wrote: what an auditor trusts.
pub fn trusted_directories(net: &TestNet) -> anyhow::Result<Vec<accord_proto::pb::Directory>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(net.root().join("pki"))? {
        let country = entry?.path();
        if !country.is_dir() {
            continue;
        }
        let path = country.join("directory.json");
        out.push(serde_json::from_slice(&std::fs::read(path)?)?);
    }
    Ok(out)
}

/// `to`'s peer link, dialled with the real gateway credentials of `from`: for tests that act
/// as a (misbehaving) peer gateway.
pub fn peer_link_as(
    net: &TestNet,
    from: &str,
    to: &str,
) -> anyhow::Result<accord_proto::pb::peer_link_client::PeerLinkClient<tonic::transport::Channel>> {
    use accord_gateway::tls::{self, CountryRoots, Credentials};
    let pki = net.root().join("pki");
    let creds = Credentials::load(
        &pki.join(format!("{from}/gateway/cert.pem")),
        &pki.join(format!("{from}/gateway/key.pem")),
    )?;
    let mut roots = CountryRoots::default();
    roots.add(to.parse()?, &pki.join(format!("{to}/ca.pem")))?;
    let gw = net.gateway_address(to)?;
    let config = tls::client_config(&creds, roots, gw.id)?;
    let channel = tls::channel(net.gateway(to)?.peer_addr, config);
    Ok(accord_proto::pb::peer_link_client::PeerLinkClient::new(
        channel,
    ))
}

/// The envelope of message `id` as `cc`'s gateway in `net` keeps it: the bytes a test sends
/// again, as a peer or a client resending would.
pub fn stored_envelope(
    net: &TestNet,
    cc: &str,
    id: &MessageId,
) -> anyhow::Result<accord_proto::pb::Envelope> {
    let message = net.gateway(cc)?.pipeline.store.message(id)?;
    message
        .and_then(|m| m.envelope)
        .ok_or_else(|| anyhow::anyhow!("{cc} holds no envelope of {id}"))
}

/// A Deliver call that carries `envelope` alone.
pub fn deliver_one(envelope: accord_proto::pb::Envelope) -> accord_proto::pb::DeliverRequest {
    use accord_proto::pb;
    pb::DeliverRequest {
        items: vec![pb::PeerItem {
            item: Some(pb::peer_item::Item::Envelope(envelope)),
        }],
    }
}

/// `envelope` with the first byte of its ciphertext flipped: other bytes under its id and
/// header, whose signature no longer verifies.
pub fn tampered(mut envelope: accord_proto::pb::Envelope) -> accord_proto::pb::Envelope {
    let mut ciphertext = envelope.ciphertext.to_vec();
    ciphertext[0] ^= 1;
    envelope.ciphertext = ciphertext.into();
    envelope
}

/// Proof hashes as the audit service sends them, as the verifier takes them.
pub fn hashes(proof: &[Vec<u8>]) -> anyhow::Result<Vec<accord_proto::merkle::Hash>> {
    proof
        .iter()
        .map(|p| {
            p.as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("a proof hash is not 32 bytes"))
        })
        .collect()
}

/// A gateway's store whose commits the test can stall, as a writer stuck on a slow disk
/// would: while stalled, transactions wait unapplied (reads do not see them) and go to the
/// store in the order they came once the test resumes it. Or stop: every later commit
/// fails, and the store says it stopped, as after a failed write. Wraps a real store
/// ([`TestNet::start_gateway_layered`]).
pub struct StalledCommits {
    inner: Arc<dyn Store>,
    stall: Mutex<Stall>,
}

impl std::fmt::Debug for StalledCommits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StalledCommits")
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Stall {
    on: bool,
    /// Only commits that mark outbox entries as sent stall ([`StalledCommits::stall_marks`]).
    marks_only: bool,
    stopped: bool,
    waiting: Vec<(Tx, tokio::sync::oneshot::Sender<Commit>)>,
}

impl StalledCommits {
    /// Wraps `inner`, its commits going through until [`Self::stall`].
    pub fn over(inner: Arc<dyn Store>) -> Arc<StalledCommits> {
        Arc::new(StalledCommits {
            inner,
            stall: Default::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, Stall> {
        self.stall.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits from now on wait until [`Self::resume`].
    pub fn stall(&self) {
        let mut state = self.state();
        (state.on, state.marks_only) = (true, false);
    }

    /// Commits that mark outbox entries as sent (`Op::SetSent(_, true)`) wait from now on
    /// until [`Self::resume`]; the others go through, ahead of them, which a real store
    /// never lets happen. Only for tests where no unmark follows a stalled mark.
    pub fn stall_marks(&self) {
        let mut state = self.state();
        (state.on, state.marks_only) = (true, true);
    }

    /// Every later commit fails, and the store says it stopped taking commits.
    pub fn stop(&self) {
        self.state().stopped = true;
    }

    /// How many commits wait.
    pub fn waiting(&self) -> usize {
        self.state().waiting.len()
    }

    /// Whether a waiting commit inserts message `id`.
    pub fn waiting_to_insert(&self, id: &MessageId) -> bool {
        self.state().waiting.iter().any(|(tx, _)| {
            tx.ops
                .iter()
                .any(|op| matches!(op, accord_gateway::store::Op::InsertMessage(m, _) if m == id))
        })
    }

    /// Hands every waiting commit to the store, in order, and lets later ones through.
    pub fn resume(&self) {
        let mut state = self.state();
        state.on = false;
        for (tx, answer) in state.waiting.drain(..) {
            let _ = answer.send(self.inner.commit(tx));
        }
    }
}

impl Store for StalledCommits {
    fn commit(&self, tx: Tx) -> Commit {
        let mut state = self.state();
        if state.stopped {
            return Box::pin(async {
                Err(StoreError::Engine("the test stopped the store".into()))
            });
        }
        let marks = || {
            tx.ops
                .iter()
                .any(|op| matches!(op, accord_gateway::store::Op::SetSent(_, true)))
        };
        if !state.on || (state.marks_only && !marks()) {
            return self.inner.commit(tx);
        }
        let (answer, handed) = tokio::sync::oneshot::channel();
        state.waiting.push((tx, answer));
        Box::pin(async move {
            match handed.await {
                Ok(commit) => commit.await,
                Err(_) => Err(StoreError::Closed),
            }
        })
    }
    fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        self.inner.message(id)
    }
    fn message_head(&self, id: &MessageId) -> Result<Option<MessageHead>, StoreError> {
        self.inner.message_head(id)
    }
    fn receipts(&self, id: &MessageId) -> Result<Vec<accord_proto::pb::Receipt>, StoreError> {
        self.inner.receipts(id)
    }
    fn queue(
        &self,
        queue: &Queue,
        limit: usize,
    ) -> Result<Vec<(QueueKey, QueueEntry)>, StoreError> {
        self.inner.queue(queue, limit)
    }
    fn log_size(&self) -> Result<u64, StoreError> {
        self.inner.log_size()
    }
    fn log_entry(&self, index: LogIndex) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.log_entry(index)
    }
    fn disk_usage(&self) -> Result<u64, StoreError> {
        self.inner.disk_usage()
    }
    fn log_node(&self, level: u32, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        self.inner.log_node(level, index)
    }
    fn message_events(&self, id: &MessageId) -> Result<Vec<LogIndex>, StoreError> {
        self.inner.message_events(id)
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key)
    }
    fn stopped(&self) -> Option<String> {
        if self.state().stopped {
            return Some("the test stopped the store".into());
        }
        self.inner.stopped()
    }
}

/// Restarts `cc`'s gateway on a store whose commits the test can stall.
pub async fn restart_with_stalled_commits(
    net: &mut TestNet,
    cc: &str,
) -> anyhow::Result<Arc<StalledCommits>> {
    net.stop_gateway(cc).await?;
    let slot = Arc::new(Mutex::new(None));
    let kept = slot.clone();
    net.start_gateway_layered(
        cc,
        Box::new(move |store| {
            let stalled = StalledCommits::over(store);
            *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(stalled.clone());
            stalled as Arc<dyn Store>
        }),
    )
    .await?;
    let stalled = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    stalled.ok_or_else(|| anyhow::anyhow!("the gateway did not open its store"))
}
