//! This gateway's transparency log and its witnessing of peers (DESIGN.md,
//! "Non-repudiation log").
//!
//! - Checkpoints: C2SP `tlog-checkpoint` bodies signed as C2SP signed notes with the log key,
//!   origin `accord.<cc>/<gateway-name>`, published on an interval and on demand, stored by
//!   size with the cosignatures peers return.
//! - Witnessing: each gateway sends its new checkpoints with a consistency proof to each peer,
//!   which checks it against the last one it cosigned, persists it, cosigns it
//!   (`tlog-cosignature`) and answers the line. An inconsistent checkpoint is refused and
//!   raised as an alarm: a WITNESS_ALARM log entry, an error log line, and a counter.
//! - Proofs and evidence: inclusion and consistency proofs from stored tree nodes; the events
//!   of one message proven against a checkpoint the other side cosigned.
//!
//! Metadata keys: `checkpoint/latest` (u64be size), `checkpoint/<size>` (note text with
//! cosignatures), `cosigned-by/<cc>` (u64be size of our newest checkpoint cosigned by `cc`),
//! `witnessed/<peer id>` (the newest checkpoint note of that peer gateway that we cosigned).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use accord_proto::ids::{CountryCode, MessageId, SpiffeId};
use accord_proto::merkle::{self, Hash, NodeSource, ProofError};
use accord_proto::note::{self, Checkpoint, CosignatureVerifier, NoteVerifier};
use accord_proto::pb::{self, peer_link_client::PeerLinkClient, LogEvent};
use prost::Message;
use tokio::sync::watch;

use crate::pipeline::{Pipeline, PipelineError};
use crate::store::{Op, Store, StoreError, Tx};

/// The keys of this gateway's log: checkpoints are signed by `signer` under `origin`, peers'
/// checkpoints cosigned by `cosigner` (a separate key: C2SP asks one key per signature type).
#[derive(Debug)]
pub struct LogKeys {
    pub origin: String,
    pub signer: note::NoteSigner,
    pub cosigner: note::Cosigner,
}

/// The log tree as the store holds it.
pub struct StoreTree<'a>(pub &'a dyn Store);

impl std::fmt::Debug for StoreTree<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreTree")
    }
}

impl NodeSource for StoreTree<'_> {
    fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError> {
        self.0
            .log_node(level, index)
            .map_err(|e| ProofError::Storage(e.to_string()))?
            .ok_or(ProofError::MissingNode { level, index })
    }
}

fn proof_error(e: ProofError) -> PipelineError {
    match e {
        ProofError::Storage(s) => PipelineError::Store(StoreError::Engine(s)),
        other => PipelineError::BadRequest(other.to_string()),
    }
}

fn note_error(e: note::NoteError) -> PipelineError {
    PipelineError::Store(StoreError::Engine(format!("checkpoint note: {e}")))
}

/// The checkpoint origin of a gateway: `accord.<cc>/<gateway-name>`.
pub fn origin(gateway: &SpiffeId) -> String {
    format!("accord.{}/{}", gateway.country(), gateway.name())
}

impl Pipeline {
    /// A size kept as 8 big-endian bytes under `key`, 0 when absent. Any other length is
    /// damage, not 0: read as 0, a damaged `checkpoint/latest` would skip the check that a
    /// new checkpoint extends the last one signed.
    fn u64_meta(&self, key: &str) -> Result<u64, PipelineError> {
        match self.store.meta(key)? {
            None => Ok(0),
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    tracing::error!(key, bytes = b.len(), "a stored size is not 8 bytes");
                    PipelineError::Store(StoreError::Corrupt(format!(
                        "metadata record {key} ({} bytes, not 8)",
                        b.len()
                    )))
                }),
        }
    }

    fn gateway_entry(&self, id: &SpiffeId) -> Option<pb::GatewayEntry> {
        let want = id.to_string();
        self.directories()
            .to_wire()
            .into_iter()
            .filter(|d| d.country == id.country().as_str())
            .flat_map(|d| d.gateways)
            .find(|g| g.id == want)
    }

    /// The checkpoint of `size`, with every cosignature received so far.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<String>, PipelineError> {
        Ok(self
            .store
            .meta(&format!("checkpoint/{size}"))?
            .and_then(|b| String::from_utf8(b).ok()))
    }

    /// Signs and stores a checkpoint of the current log if it grew; returns the newest.
    pub async fn publish_checkpoint(&self) -> Result<(u64, String), PipelineError> {
        let _one_at_a_time = self.checkpoint_lock.lock().await;
        let size = self.store.log_size()?;
        let latest = self.u64_meta("checkpoint/latest")?;
        if latest == size {
            if let Some(note) = self.checkpoint_at(size)? {
                return Ok((size, note));
            }
        }
        let root = merkle::root(&StoreTree(self.store.as_ref()), size).map_err(proof_error)?;
        if latest > 0 {
            self.check_extends(latest, size, &root)?;
        }
        let body = Checkpoint {
            origin: self.log_keys.origin.clone(),
            size,
            root,
            extensions: vec![],
        }
        .to_body();
        let note = self.log_keys.signer.sign(&body).map_err(note_error)?;
        let ops = vec![
            Op::PutMeta(format!("checkpoint/{size}"), note.clone().into_bytes()),
            Op::PutMeta("checkpoint/latest".into(), size.to_be_bytes().to_vec()),
        ];
        self.store
            .commit(Tx {
                ops,
                receipts: None,
            })
            .await?;
        tracing::debug!(size, root = %hex(&root), "checkpoint published");
        Ok((size, note))
    }

    /// Refuses to sign a tree that does not extend checkpoint `latest`, the last one signed:
    /// the stored nodes changed since (a damaged disk), or the log is shorter (a store
    /// restored from an older backup), and signing would show the world a forked log.
    fn check_extends(&self, latest: u64, size: u64, root: &Hash) -> Result<(), PipelineError> {
        let damaged = |why: String| {
            tracing::error!(latest, size, "refusing to sign a checkpoint: {why}");
            PipelineError::Store(StoreError::Corrupt(format!(
                "the log no longer extends its checkpoint of size {latest} ({why}); no \
                 checkpoint is signed until the store is restored from a backup"
            )))
        };
        if latest > size {
            return Err(damaged(format!("the log holds only {size} entries")));
        }
        // Present unless damaged: a checkpoint and `checkpoint/latest` are one commit.
        let note = self
            .checkpoint_at(latest)?
            .ok_or_else(|| damaged("that checkpoint is missing".into()))?;
        let signed = note::unverified_text(&note)
            .and_then(Checkpoint::parse)
            .map_err(|e| damaged(format!("that checkpoint does not parse: {e}")))?;
        if signed.size != latest {
            return Err(damaged(format!(
                "that checkpoint is of size {}",
                signed.size
            )));
        }
        let tree = StoreTree(self.store.as_ref());
        let proof = merkle::consistency_proof(&tree, latest, size).map_err(|e| match e {
            ProofError::Storage(_) => proof_error(e),
            missing => damaged(format!("consistency proof: {missing}")),
        })?;
        merkle::verify_consistency(latest, size, &signed.root, root, &proof)
            .map_err(|e| damaged(format!("consistency proof: {e}")))
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, PipelineError> {
        self.check_size(size)?;
        merkle::inclusion_proof(&StoreTree(self.store.as_ref()), index, size).map_err(proof_error)
    }

    pub fn consistency_proof(&self, size1: u64, size2: u64) -> Result<Vec<Hash>, PipelineError> {
        self.check_size(size2)?;
        merkle::consistency_proof(&StoreTree(self.store.as_ref()), size1, size2)
            .map_err(proof_error)
    }

    fn check_size(&self, size: u64) -> Result<(), PipelineError> {
        let have = self.store.log_size()?;
        if size > have {
            return Err(PipelineError::BadRequest(format!(
                "tree size {size} is beyond the log's {have} entries"
            )));
        }
        Ok(())
    }

    /// Log entries `[start, end)`.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, PipelineError> {
        self.check_size(end)?;
        (start..end)
            .map(|i| {
                self.store
                    .log_entry(i)?
                    .ok_or_else(|| PipelineError::Store(StoreError::Corrupt(format!("log {i}"))))
            })
            .collect()
    }

    /// Witness side: checks a peer's checkpoint against the last one we cosigned, then
    /// persists and cosigns it.
    pub async fn witness(
        &self,
        peer: &SpiffeId,
        req: pb::WitnessRequest,
    ) -> Result<pb::WitnessResponse, PipelineError> {
        let entry = self.gateway_entry(peer).ok_or_else(|| {
            PipelineError::PermissionDenied(format!("{peer} is not in the directory"))
        })?;
        let verifier: NoteVerifier = entry
            .log_verifier_key
            .parse()
            .map_err(|e| PipelineError::BadRequest(format!("peer log key in directory: {e}")))?;
        let opened = note::open(&req.checkpoint, &[verifier])
            .map_err(|e| PipelineError::BadRequest(format!("checkpoint note: {e}")))?;
        let cp = Checkpoint::parse(&opened.body)
            .map_err(|e| PipelineError::BadRequest(format!("checkpoint: {e}")))?;
        if cp.origin != entry.log_origin {
            return Err(PipelineError::BadRequest(format!(
                "checkpoint origin {:?} is not {:?}",
                cp.origin, entry.log_origin
            )));
        }
        // One witness decision at a time: read, check and persist must not interleave, or two
        // forks of one size could both be cosigned (a split view).
        let _one_at_a_time = self.witness_lock.lock().await;
        let key = format!("witnessed/{peer}");
        let last = match self.store.meta(&key)? {
            None => None,
            Some(b) => {
                let text = String::from_utf8(b)
                    .map_err(|_| PipelineError::Store(StoreError::Corrupt(key.clone())))?;
                let body = text.split("\n\n").next().unwrap_or_default().to_owned() + "\n";
                Some(Checkpoint::parse(&body).map_err(note_error)?)
            }
        };
        let (last_size, last_root) = last
            .as_ref()
            .map(|c| (c.size, c.root))
            .unwrap_or((0, [0; 32]));
        if req.old_size != last_size {
            return Ok(pb::WitnessResponse {
                cosignature: String::new(),
                known_size: last_size,
            });
        }
        let consistent = if last_size == 0 {
            true
        } else if cp.size < last_size {
            false
        } else if cp.size == last_size {
            cp.root == last_root
        } else {
            let proof: Result<Vec<Hash>, _> = req
                .consistency_proof
                .iter()
                .map(|p| p.as_slice().try_into())
                .collect();
            match proof {
                Ok(proof) => {
                    merkle::verify_consistency(last_size, cp.size, &last_root, &cp.root, &proof)
                        .is_ok()
                }
                Err(_) => false,
            }
        };
        if !consistent {
            self.raise_witness_alarm(peer, last_size, cp.size).await;
            return Err(PipelineError::FailedPrecondition(format!(
                "checkpoint of size {} is not consistent with the size {last_size} we cosigned",
                cp.size
            )));
        }
        let now_s = (self.now() / 1000).max(0) as u64;
        let line = self
            .log_keys
            .cosigner
            .cosign(&opened.body, now_s)
            .map_err(note_error)?;
        // Persist before answering: what we cosigned is what we will hold the peer to.
        let ops = vec![Op::PutMeta(key, req.checkpoint.clone().into_bytes())];
        self.store
            .commit(Tx {
                ops,
                receipts: None,
            })
            .await?;
        tracing::debug!(peer = %peer, size = cp.size, "cosigned peer checkpoint");
        Ok(pb::WitnessResponse {
            cosignature: line,
            known_size: 0,
        })
    }

    async fn raise_witness_alarm(&self, peer: &SpiffeId, cosigned: u64, shown: u64) {
        self.witness_alarms.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            peer = %peer,
            cosigned_size = cosigned,
            shown_size = shown,
            "WITNESS ALARM: peer showed a checkpoint inconsistent with one we cosigned"
        );
        let entry = pb::LogEntry {
            event: LogEvent::WitnessAlarm as i32,
            message_id: vec![],
            envelope_hash: vec![],
            actor: peer.to_string(),
            at_ms: self.now(),
            reason: 0,
            receipt_hash: vec![],
        };
        let tx = Tx {
            ops: vec![Op::Log(entry.encode_to_vec())],
            receipts: None,
        };
        if let Err(e) = self.store.commit(tx).await {
            tracing::error!(error = %e, "could not log the witness alarm");
        }
    }

    /// Sends our newest checkpoint to `peer` for cosigning; stores the cosignature.
    pub async fn request_cosignature(
        &self,
        peer: &SpiffeId,
        client: &mut PeerLinkClient<tonic::transport::Channel>,
    ) -> Result<(), PipelineError> {
        let (size, note_text) = self.publish_checkpoint().await?;
        let cc = peer.country();
        let done_key = format!("cosigned-by/{cc}");
        let mut old = self.u64_meta(&done_key)?;
        if size == 0 || size == old {
            return Ok(());
        }
        for _ in 0..2 {
            let proof = if old == 0 || old > size {
                vec![]
            } else {
                self.consistency_proof(old, size)?
            };
            let resp = client
                .witness(pb::WitnessRequest {
                    old_size: old,
                    consistency_proof: proof.iter().map(|h| h.to_vec()).collect(),
                    checkpoint: note_text.clone(),
                })
                .await
                .map_err(|s| {
                    PipelineError::Unavailable(format!("{:?}: {}", s.code(), s.message()))
                })?
                .into_inner();
            if resp.cosignature.is_empty() {
                // The witness holds another size than we thought: prove from that one.
                old = resp.known_size;
                continue;
            }
            let entry = self.gateway_entry(peer).ok_or_else(|| {
                PipelineError::PermissionDenied(format!("{peer} not in directory"))
            })?;
            let witness: CosignatureVerifier = entry
                .witness_verifier_key
                .parse()
                .map_err(|e| PipelineError::BadRequest(format!("peer witness key: {e}")))?;
            let body = note_text
                .split("\n\n")
                .next()
                .unwrap_or_default()
                .to_owned()
                + "\n";
            witness
                .verify_line(&body, &resp.cosignature)
                .map_err(|e| PipelineError::BadRequest(format!("cosignature from {peer}: {e}")))?;
            // Read-modify-write of the stored note: serialised with other peers' cosignatures.
            let _one_at_a_time = self.checkpoint_lock.lock().await;
            let current = self.checkpoint_at(size)?.unwrap_or(note_text.clone());
            let cosigned =
                note::add_signatures(&current, &[resp.cosignature]).map_err(note_error)?;
            let ops = vec![
                Op::PutMeta(format!("checkpoint/{size}"), cosigned.into_bytes()),
                Op::PutMeta(done_key, size.to_be_bytes().to_vec()),
            ];
            self.store
                .commit(Tx {
                    ops,
                    receipts: None,
                })
                .await?;
            tracing::debug!(peer = %peer, size, "checkpoint cosigned by peer");
            return Ok(());
        }
        Err(PipelineError::Unavailable(
            "witness keeps reporting another size".into(),
        ))
    }

    /// Our log's entries about `id`, each with an inclusion proof to our newest checkpoint
    /// that `witness` (a peer country, or ours for same-country messages) cosigned.
    pub fn prove_events(
        &self,
        id: &MessageId,
        witness: &CountryCode,
    ) -> Result<Vec<pb::LoggedEvent>, PipelineError> {
        let size = if witness == self.country() {
            self.u64_meta("checkpoint/latest")?
        } else {
            self.u64_meta(&format!("cosigned-by/{witness}"))?
        };
        let Some(checkpoint) = self.checkpoint_at(size)? else {
            return Ok(vec![]);
        };
        // Only the signatures an auditor of this exchange can check: our log key and the
        // witness of the other party's country (cosigners are named by their origin).
        let mut names = vec![self.log_keys.origin.clone()];
        names.extend(
            self.directories()
                .to_wire()
                .into_iter()
                .filter(|d| d.country == witness.as_str())
                .flat_map(|d| d.gateways)
                .map(|g| g.log_origin),
        );
        let checkpoint = only_signatures_by(&checkpoint, &names);
        let mut events = Vec::new();
        for index in self.store.message_events(id)? {
            if index >= size {
                continue; // not yet under a cosigned checkpoint; ask again later
            }
            let entry = self
                .store
                .log_entry(index)?
                .ok_or_else(|| PipelineError::Store(StoreError::Corrupt(format!("log {index}"))))?;
            events.push(pb::LoggedEvent {
                gateway: self.identity.to_string(),
                index,
                entry,
                tree_size: size,
                inclusion_proof: self
                    .inclusion_proof(index, size)?
                    .iter()
                    .map(|h| h.to_vec())
                    .collect(),
                checkpoint: checkpoint.clone(),
            });
        }
        Ok(events)
    }

    /// Everything an auditor needs about one message: envelope, receipts, and the events of
    /// both gateways' logs proven against checkpoints the other side cosigned.
    pub async fn evidence(&self, id: &MessageId) -> Result<pb::EvidenceBundle, PipelineError> {
        let msg = self.store.message(id)?.ok_or(PipelineError::NotFound)?;
        let sender: accord_proto::ids::OrgId = msg
            .head
            .sender_org
            .parse()
            .map_err(|_| StoreError::Corrupt(id.to_string()))?;
        let recipient: accord_proto::ids::OrgId = msg
            .head
            .recipient_org
            .parse()
            .map_err(|_| StoreError::Corrupt(id.to_string()))?;
        let other = if sender.country() == self.country() {
            recipient.country().clone()
        } else {
            sender.country().clone()
        };
        let mut events = self.prove_events(id, &other)?;
        let mut receipts = self.store.receipts(id)?;
        if &other != self.country() {
            let mut client =
                self.peer_clients.get(&other).cloned().ok_or_else(|| {
                    PipelineError::Unavailable(format!("no peer link to {other}"))
                })?;
            let theirs = client
                .prove_events(pb::ProveEventsRequest {
                    message_id: id.as_bytes().to_vec(),
                })
                .await
                .map_err(|s| PipelineError::Unavailable(format!("peer {other}: {}", s.message())))?
                .into_inner();
            events.extend(theirs.events);
            // The other side holds the receipts it signed first (e.g. the sender's ACCEPTED).
            for r in theirs.receipts {
                if !receipts.contains(&r) {
                    receipts.push(r);
                }
            }
        }
        let countries = [sender.country().as_str(), recipient.country().as_str()];
        let directories = self
            .directories()
            .to_wire()
            .into_iter()
            .filter(|d| countries.contains(&d.country.as_str()))
            .collect();
        Ok(pb::EvidenceBundle {
            version: 1,
            envelope: msg.envelope,
            receipts,
            events,
            directories,
        })
    }

    /// Whether the directory gives `id` the auditor role.
    pub fn is_auditor(&self, id: &SpiffeId) -> bool {
        let Ok(org) = accord_proto::ids::OrgId::try_from(id.clone()) else {
            return false;
        };
        self.directories()
            .org(&org)
            .is_some_and(|o| o.roles.iter().any(|r| r == "auditor"))
    }
}

impl Pipeline {
    /// Offers our country's signed directory to `peer` and takes its own in return.
    pub async fn exchange_directories(
        &self,
        peer: &SpiffeId,
        client: &mut PeerLinkClient<tonic::transport::Channel>,
    ) -> Result<bool, PipelineError> {
        let own = self.own_signed_directory();
        let theirs = client
            .exchange_directories(pb::ExchangeDirectoriesRequest { own })
            .await
            .map_err(|s| PipelineError::Unavailable(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner()
            .own;
        match theirs {
            Some(signed) => self.update_directory(peer.country(), peer, signed).await,
            None => Ok(false),
        }
    }

    /// This country's signed directory as held now.
    pub fn own_signed_directory(&self) -> Option<pb::SignedDirectory> {
        use prost::Message;
        self.directories().signed().into_iter().find(|s| {
            pb::Directory::decode(s.directory.as_slice())
                .is_ok_and(|d| d.country == self.country().as_str())
        })
    }
}

/// How long the witness loop waits for the peer to answer one call.
const WITNESS_CALL_LIMIT: Duration = Duration::from_secs(60);

/// Publishes checkpoints and has each one cosigned by `peer`, every `interval`; exchanges
/// directories with it on the same beat.
pub async fn witness_loop(
    pipeline: Arc<Pipeline>,
    peer: SpiffeId,
    mut client: PeerLinkClient<tonic::transport::Channel>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        // A peer that never answers holds a round no longer than WITNESS_CALL_LIMIT per
        // call, and a stop not at all.
        let round = async {
            let exchange = pipeline.exchange_directories(&peer, &mut client);
            match tokio::time::timeout(WITNESS_CALL_LIMIT, exchange).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "directory exchange failed this round")
                }
                Err(_) => tracing::warn!(peer = %peer, "directory exchange unanswered this round"),
            }
            let cosign = pipeline.request_cosignature(&peer, &mut client);
            match tokio::time::timeout(WITNESS_CALL_LIMIT, cosign).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "checkpoint not cosigned this round")
                }
                Err(_) => {
                    tracing::warn!(peer = %peer, "checkpoint cosignature unanswered this round")
                }
            }
        };
        tokio::select! {
            () = round => {}
            () = crate::server::wait_for(shutdown.clone()) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// The signed note `note` keeping only the signature lines of the named keys.
fn only_signatures_by(note: &str, names: &[String]) -> String {
    let Some(split) = note.rfind("\n\n") else {
        return note.to_owned();
    };
    let (body, lines) = (&note[..split + 1], &note[split + 2..]);
    let mut out = format!("{body}\n");
    for line in lines.lines() {
        let name = line.strip_prefix("— ").and_then(|l| l.split(' ').next());
        if name.is_some_and(|n| names.iter().any(|k| k == n)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_signature_lines_are_kept() {
        let note = "accord.vn/hanoi\n3\nAAAA\n\n— accord.vn/hanoi AAA=\n— accord.la/vientiane BBB=\n— accord.kh/phnom-penh CCC=\n";
        let kept = only_signatures_by(
            note,
            &["accord.vn/hanoi".into(), "accord.kh/phnom-penh".into()],
        );
        assert_eq!(
            kept,
            "accord.vn/hanoi\n3\nAAAA\n\n— accord.vn/hanoi AAA=\n— accord.kh/phnom-penh CCC=\n"
        );
    }
}
