//! Evidence bundles (`proto/EVIDENCE.md`): a complete synthetic bundle verifies offline, every
//! single-byte change of it is detected, and targeted forgeries fail the step they should.
//!
//! The bundle is built as the gateways build it: two countries (vn, kh), each with a gateway
//! holding a receipt key, a log key and a witness key (fixed seeds), two Merkle logs with
//! entries of unrelated messages around this message's, checkpoints signed by each log and
//! cosigned by the other country's witness, and the accepted, received and delivered receipts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Instant;

use accord_proto::crypto::hpke::RecipientKey;
use accord_proto::crypto::SigningKey;
use accord_proto::envelope::seal_with_ephemeral_ikm;
use accord_proto::evidence::{verify_bundle, Report, VERSION};
use accord_proto::ids::MessageId;
use accord_proto::log::leaf_hash;
use accord_proto::merkle::{self, MemoryTree};
use accord_proto::note::{self, Checkpoint, Cosigner, NoteSigner};
use accord_proto::{pb, receipt};
use prost::Message;

const NOW: i64 = 1_750_000_000_000;
const CASE_REF: &str = "VN-KH-2026-0042";
const ALERT_TEXT: &str = "two minors crossing with an unrelated adult";

fn key(id: &str, pk: [u8; 32]) -> pb::PublicKey {
    pb::PublicKey {
        key_id: id.into(),
        public_key: pk.to_vec(),
        not_before_ms: 0,
        not_after_ms: i64::MAX,
    }
}

/// A gateway's three keys and names.
struct Gateway {
    id: String,
    origin: String,
    receipt_key: SigningKey,
    log: NoteSigner,
    witness: Cosigner,
}

impl Gateway {
    fn new(cc: &str, name: &str, seed: u8) -> Self {
        let origin = format!("accord.{cc}/{name}");
        Self {
            id: format!("spiffe://{cc}.accord/gateway/{name}"),
            receipt_key: SigningKey::from_seed(format!("{cc}-{name}-rcpt-1"), [seed; 32]).unwrap(),
            log: NoteSigner::new(
                &origin,
                SigningKey::from_seed("log", [seed + 1; 32]).unwrap(),
            )
            .unwrap(),
            witness: Cosigner::new(
                &origin,
                SigningKey::from_seed("witness", [seed + 2; 32]).unwrap(),
            )
            .unwrap(),
            origin,
        }
    }

    fn entry(&self) -> pb::GatewayEntry {
        pb::GatewayEntry {
            id: self.id.clone(),
            signing_keys: vec![key(
                self.receipt_key.key_id(),
                self.receipt_key.public_key(),
            )],
            log_origin: self.origin.clone(),
            log_verifier_key: self.log.verifier_key(),
            witness_verifier_key: self.witness.verifier().to_string(),
        }
    }

    fn receipt(&self, stage: pb::Stage, env: &Env, at_ms: i64, log_index: u64) -> pb::Receipt {
        let reason = if stage == pb::Stage::Rejected {
            pb::RejectReason::Expired
        } else {
            pb::RejectReason::Unspecified
        };
        receipt::sign(
            &pb::ReceiptBody {
                envelope_hash: env.hash.to_vec(),
                message_id: env.id.as_bytes().to_vec(),
                stage: stage as i32,
                signer: self.id.clone(),
                signer_key_id: self.receipt_key.key_id().into(),
                at_ms,
                log_index,
                reason: reason as i32,
            },
            &self.receipt_key,
        )
    }
}

/// A gateway's log: stored entries and their Merkle tree.
#[derive(Default)]
struct Log {
    entries: Vec<Vec<u8>>,
    tree: MemoryTree,
}

impl Log {
    fn append(&mut self, e: &pb::LogEntry) -> u64 {
        let bytes = e.encode_to_vec();
        self.tree.push(leaf_hash(&bytes));
        self.entries.push(bytes);
        self.entries.len() as u64 - 1
    }

    /// Entries about other messages.
    fn unrelated(&mut self, n: u8, actor: &str) {
        for k in 0..n {
            let other = MessageId::new_v7(NOW as u64 + 7, [self.entries.len() as u8 + k; 10]);
            self.append(&pb::LogEntry {
                event: pb::LogEvent::Accepted as i32,
                message_id: other.as_bytes().to_vec(),
                envelope_hash: vec![self.entries.len() as u8; 32],
                actor: actor.into(),
                at_ms: NOW - 1000,
                ..Default::default()
            });
        }
    }

    fn checkpoint(&self, log: &NoteSigner, cosigners: &[&Cosigner]) -> String {
        let cp = Checkpoint {
            origin: log.name().into(),
            size: self.tree.size(),
            root: merkle::root(&self.tree, self.tree.size()).unwrap(),
            extensions: vec![],
        };
        let signed = log.sign(&cp.to_body()).unwrap();
        let lines: Vec<String> = cosigners
            .iter()
            .map(|c| c.cosign(&cp.to_body(), (NOW / 1000) as u64 + 60).unwrap())
            .collect();
        if lines.is_empty() {
            signed
        } else {
            note::add_signatures(&signed, &lines).unwrap()
        }
    }

    /// The entries at `indices`, proven to `checkpoint` (of the whole log).
    fn events(&self, gateway: &str, indices: &[u64], checkpoint: &str) -> Vec<pb::LoggedEvent> {
        indices
            .iter()
            .map(|&i| pb::LoggedEvent {
                gateway: gateway.into(),
                index: i,
                entry: self.entries[i as usize].clone(),
                tree_size: self.tree.size(),
                inclusion_proof: merkle::inclusion_proof(&self.tree, i, self.tree.size())
                    .unwrap()
                    .iter()
                    .map(|h| h.to_vec())
                    .collect(),
                checkpoint: checkpoint.into(),
            })
            .collect()
    }
}

struct Env {
    wire: pb::Envelope,
    id: MessageId,
    hash: [u8; 32],
}

fn entry(event: pb::LogEvent, env: &Env, actor: &str, at_ms: i64) -> pb::LogEntry {
    pb::LogEntry {
        event: event as i32,
        message_id: env.id.as_bytes().to_vec(),
        envelope_hash: env.hash.to_vec(),
        actor: actor.into(),
        at_ms,
        ..Default::default()
    }
}

fn receipt_entry(event: pb::LogEvent, env: &Env, actor: &str, r: &pb::Receipt) -> pb::LogEntry {
    pb::LogEntry {
        receipt_hash: receipt::receipt_hash(r).to_vec(),
        ..entry(event, env, actor, NOW + 5_000)
    }
}

/// Everything a test may need to forge variants.
struct Fixture {
    vn: Gateway,
    kh: Gateway,
    other_country_witness: Cosigner,
    sender: SigningKey,
    sender_org: String,
    recipient_org: String,
    directories: Vec<pb::Directory>,
    env: Env,
    vn_log: Log,
    kh_log: Log,
    bundle: pb::EvidenceBundle,
}

impl Fixture {
    fn bytes(&self) -> Vec<u8> {
        self.bundle.encode_to_vec()
    }

    fn verify(&self) -> Report {
        verify_bundle(&self.bytes(), &self.directories)
    }
}

fn directories(
    vn: &Gateway,
    kh: &Gateway,
    c02: &SigningKey,
    ahtd: &SigningKey,
) -> Vec<pb::Directory> {
    let a03 = SigningKey::from_seed("vn-a03-sig-1", [4; 32]).unwrap();
    let a03_enc = RecipientKey::from_bytes([5; 32]);
    vec![
        pb::Directory {
            country: "vn".into(),
            version: 3,
            orgs: vec![
                pb::OrgEntry {
                    id: "spiffe://vn.accord/org/c02".into(),
                    name: "C02".into(),
                    signing_keys: vec![key(c02.key_id(), c02.public_key())],
                    encryption_keys: vec![],
                    roles: vec!["focal_point".into()],
                    province: String::new(),
                },
                pb::OrgEntry {
                    id: "spiffe://vn.accord/org/a03".into(),
                    name: "A03".into(),
                    signing_keys: vec![key(a03.key_id(), a03.public_key())],
                    encryption_keys: vec![key("vn-a03-enc-1", a03_enc.public_key())],
                    roles: vec!["focal_point".into()],
                    province: String::new(),
                },
            ],
            gateways: vec![vn.entry()],
        },
        pb::Directory {
            country: "kh".into(),
            version: 7,
            orgs: vec![pb::OrgEntry {
                id: "spiffe://kh.accord/org/ahtd".into(),
                name: "AHTD".into(),
                signing_keys: vec![key(ahtd.key_id(), ahtd.public_key())],
                encryption_keys: vec![key(
                    "kh-ahtd-enc-1",
                    RecipientKey::from_bytes([2; 32]).public_key(),
                )],
                roles: vec!["focal_point".into()],
                province: String::new(),
            }],
            gateways: vec![kh.entry()],
        },
    ]
}

fn seal(sender: &SigningKey, recipient_org: &str, recipient_key_id: &str, pk: [u8; 32]) -> Env {
    let id = MessageId::new_v7(NOW as u64, [9; 10]);
    let header = pb::Header {
        message_id: id.as_bytes().to_vec(),
        kind: pb::Kind::Alert as i32,
        case_ref: CASE_REF.into(),
        sender_org: "spiffe://vn.accord/org/c02".into(),
        recipient_org: recipient_org.into(),
        recipient_key_id: recipient_key_id.into(),
        created_at_ms: NOW,
        expires_at_ms: NOW + 24 * 3_600_000,
        priority: pb::Priority::Flash as i32,
        handling_code: "H2".into(),
        ..Default::default()
    };
    let body = pb::Body {
        form: Some(pb::body::Form::Alert(pb::Alert {
            what: ALERT_TEXT.into(),
            r#where: "Moc Bai - Bavet".into(),
            ..Default::default()
        })),
    };
    let sealed = seal_with_ephemeral_ikm(header, &body, &pk, sender, &[7; 32]).unwrap();
    Env {
        wire: sealed.to_wire(),
        id,
        hash: sealed.hash().0,
    }
}

/// vn/c02 → kh/ahtd, accepted by vn/hanoi, received by kh/phnompenh, delivered by kh/ahtd.
fn cross_country() -> Fixture {
    let vn = Gateway::new("vn", "hanoi", 10);
    let kh = Gateway::new("kh", "phnompenh", 20);
    let sender = SigningKey::from_seed("vn-c02-sig-1", [1; 32]).unwrap();
    let ahtd = SigningKey::from_seed("kh-ahtd-sig-1", [3; 32]).unwrap();
    let directories = directories(&vn, &kh, &sender, &ahtd);
    let recipient_org = "spiffe://kh.accord/org/ahtd".to_string();
    let env = seal(
        &sender,
        &recipient_org,
        "kh-ahtd-enc-1",
        RecipientKey::from_bytes([2; 32]).public_key(),
    );
    let (mut vn_log, mut kh_log) = (Log::default(), Log::default());

    // The sender's gateway accepts.
    vn_log.unrelated(2, "spiffe://vn.accord/org/c02");
    let submitted = vn_log.append(&entry(
        pb::LogEvent::Submitted,
        &env,
        "spiffe://vn.accord/org/c02",
        NOW + 10,
    ));
    let accepted_at = vn_log.append(&entry(pb::LogEvent::Accepted, &env, &vn.id, NOW + 10));
    let accepted = vn.receipt(pb::Stage::Accepted, &env, NOW + 10, accepted_at);
    vn_log.unrelated(1, "spiffe://vn.accord/org/c02");
    // The recipient's gateway receives.
    kh_log.unrelated(3, &vn.id);
    let received_at = kh_log.append(&entry(pb::LogEvent::Received, &env, &vn.id, NOW + 900));
    let received = kh.receipt(pb::Stage::Received, &env, NOW + 900, received_at);
    let forwarded = vn_log.append(&receipt_entry(
        pb::LogEvent::Forwarded,
        &env,
        &kh.id,
        &received,
    ));
    vn_log.unrelated(1, "spiffe://vn.accord/org/c02");
    // The recipient organisation acks.
    kh_log.unrelated(1, &vn.id);
    let delivered = receipt::sign(
        &pb::ReceiptBody {
            envelope_hash: env.hash.to_vec(),
            message_id: env.id.as_bytes().to_vec(),
            stage: pb::Stage::Delivered as i32,
            signer: recipient_org.clone(),
            signer_key_id: ahtd.key_id().into(),
            at_ms: NOW + 60_000,
            log_index: 0,
            reason: 0,
        },
        &ahtd,
    );
    let delivered_at = kh_log.append(&receipt_entry(
        pb::LogEvent::Delivered,
        &env,
        &recipient_org,
        &delivered,
    ));
    kh_log.unrelated(1, &vn.id);
    let receipt_at = vn_log.append(&receipt_entry(
        pb::LogEvent::Receipt,
        &env,
        &kh.id,
        &delivered,
    ));
    vn_log.unrelated(2, "spiffe://vn.accord/org/c02");

    let vn_cp = vn_log.checkpoint(&vn.log, &[&kh.witness]);
    let kh_cp = kh_log.checkpoint(&kh.log, &[&vn.witness]);
    let mut events = vn_log.events(
        &vn.id,
        &[submitted, accepted_at, forwarded, receipt_at],
        &vn_cp,
    );
    events.extend(kh_log.events(&kh.id, &[received_at, delivered_at], &kh_cp));
    let bundle = pb::EvidenceBundle {
        version: VERSION,
        envelope: Some(env.wire.clone()),
        receipts: vec![accepted, received, delivered],
        events,
        directories: directories.clone(),
    };
    Fixture {
        other_country_witness: Cosigner::new(
            "accord.th/bangkok",
            SigningKey::from_seed("witness", [40; 32]).unwrap(),
        )
        .unwrap(),
        vn,
        kh,
        sender,
        sender_org: "spiffe://vn.accord/org/c02".into(),
        recipient_org,
        directories,
        env,
        vn_log,
        kh_log,
        bundle,
    }
}

fn failures(r: &Report) -> Vec<String> {
    r.steps
        .iter()
        .filter_map(|s| s.verdict.as_ref().err().map(|e| format!("{}: {e}", s.what)))
        .collect()
}

/// The report fails, and some failing step's sentence or reason contains `needle`.
#[track_caller]
fn assert_fails_at(r: &Report, needle: &str) {
    assert!(!r.ok(), "expected a failure at {needle:?}, got:\n{r}");
    let f = failures(r);
    assert!(
        f.iter().any(|s| s.contains(needle)),
        "no failing step mentions {needle:?}:\n{r}"
    );
}

#[test]
fn a_complete_bundle_verifies_and_names_no_contents() {
    let f = cross_country();
    let r = f.verify();
    assert!(r.ok(), "{r}");
    // 3 structure + directories + envelope + 3 receipts + 6 events x 7 + 3 backings + accepted.
    assert_eq!(r.steps.len(), 3 + 1 + 1 + 3 + 6 * 7 + 3 + 1, "{r}");
    let text = r.to_string();
    for secret in [CASE_REF, ALERT_TEXT, "Moc Bai", "H2"] {
        assert!(!text.contains(secret), "report mentions {secret:?}");
    }
    assert!(text.contains(&f.env.id.to_string()));
    assert!(text.contains(&hex::encode(f.env.hash)));
    assert!(text.contains("accord.kh/phnompenh at"), "{text}");
    assert!(text.ends_with("checks passed"), "{text}");
}

#[test]
fn every_single_byte_change_is_detected() {
    let f = cross_country();
    let bytes = f.bytes();
    assert!(verify_bundle(&bytes, &f.directories).ok());
    let start = Instant::now();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let chunk = bytes.len().div_ceil(threads);
    let undetected: Vec<(usize, u8)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (bytes, dirs) = (&bytes, &f.directories);
                s.spawn(move || {
                    let mut missed = Vec::new();
                    let mut b = bytes.clone();
                    for i in (t * chunk)..((t + 1) * chunk).min(bytes.len()) {
                        for mask in [0x01u8, 0xff] {
                            b[i] ^= mask;
                            if verify_bundle(&b, dirs).ok() {
                                missed.push((i, mask));
                            }
                            b[i] ^= mask;
                        }
                    }
                    missed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    eprintln!(
        "{} bytes x 2 changes verified in {:?} on {threads} threads",
        bytes.len(),
        start.elapsed()
    );
    assert!(
        undetected.is_empty(),
        "undetected changes (offset, xor mask): {undetected:?}"
    );
}

#[test]
fn truncations_and_appended_bytes_are_detected() {
    let f = cross_country();
    let bytes = f.bytes();
    for len in (0..bytes.len()).step_by(7) {
        assert!(
            !verify_bundle(&bytes[..len], &f.directories).ok(),
            "prefix {len}"
        );
    }
    for tail in [&[0u8][..], &[0x08, 0x01], &[0xa2, 0x06, 0x00]] {
        let mut b = bytes.clone();
        b.extend_from_slice(tail);
        assert!(!verify_bundle(&b, &f.directories).ok(), "tail {tail:?}");
    }
}

#[test]
fn a_checkpoint_cosigned_by_the_wrong_witness_fails() {
    let mut f = cross_country();
    // The sender's gateway witnessed its own log: a known key, but not the other side's.
    let own = f.vn_log.checkpoint(&f.vn.log, &[&f.vn.witness]);
    for e in f.bundle.events.iter_mut().filter(|e| e.gateway == f.vn.id) {
        e.checkpoint = own.clone();
    }
    assert_fails_at(
        &f.verify(),
        "no cosignature by the witness of a gateway of kh",
    );

    // Not cosigned at all.
    let mut f = cross_country();
    let bare = f.kh_log.checkpoint(&f.kh.log, &[]);
    for e in f.bundle.events.iter_mut().filter(|e| e.gateway == f.kh.id) {
        e.checkpoint = bare.clone();
    }
    assert_fails_at(
        &f.verify(),
        "no cosignature by the witness of a gateway of vn",
    );
}

#[test]
fn a_signature_line_by_a_key_outside_the_directories_fails() {
    let mut f = cross_country();
    let extra = f
        .vn_log
        .checkpoint(&f.vn.log, &[&f.kh.witness, &f.other_country_witness]);
    for e in f.bundle.events.iter_mut().filter(|e| e.gateway == f.vn.id) {
        e.checkpoint = extra.clone();
    }
    assert_fails_at(&f.verify(), "is by no key of the directories");
}

#[test]
fn a_checkpoint_signed_by_another_log_key_fails() {
    let mut f = cross_country();
    let rogue = NoteSigner::new(
        &f.vn.origin,
        SigningKey::from_seed("log", [99; 32]).unwrap(),
    )
    .unwrap();
    let cp = f.vn_log.checkpoint(&rogue, &[&f.kh.witness]);
    f.bundle.events[0].checkpoint = cp;
    assert_fails_at(&f.verify(), "event 0: its checkpoint is a signed note");
}

#[test]
fn a_missing_delivered_event_fails() {
    let mut f = cross_country();
    let kh_delivered = pb::LogEvent::Delivered as i32;
    f.bundle
        .events
        .retain(|e| pb::LogEntry::decode(e.entry.as_slice()).unwrap().event != kh_delivered);
    assert_fails_at(&f.verify(), "DELIVERED entry in the log of a gateway of kh");
}

#[test]
fn a_delivered_event_with_another_receipt_hash_fails() {
    let mut f = cross_country();
    // The recipient's gateway logged a different receipt (e.g. one its org signed later).
    rebuild_kh_log(
        &mut f,
        |entry| {
            if entry.event == pb::LogEvent::Delivered as i32 {
                entry.receipt_hash = vec![0xab; 32];
            }
        },
        None,
    );
    assert_fails_at(&f.verify(), "DELIVERED entry");
}

#[test]
fn a_receipt_for_another_envelope_fails() {
    let mut f = cross_country();
    let mut body = pb::ReceiptBody::decode(f.bundle.receipts[1].body.as_slice()).unwrap();
    body.envelope_hash = vec![0x55; 32];
    f.bundle.receipts[1] = receipt::sign(&body, &f.kh.receipt_key);
    assert_fails_at(&f.verify(), "it names envelope 5555");

    let mut f = cross_country();
    let mut body = pb::ReceiptBody::decode(f.bundle.receipts[0].body.as_slice()).unwrap();
    body.message_id = MessageId::new_v7(NOW as u64, [8; 10]).as_bytes().to_vec();
    f.bundle.receipts[0] = receipt::sign(&body, &f.vn.receipt_key);
    let r = f.verify();
    assert_fails_at(&r, "it names message");
    // Its rejection leaves no ACCEPTED receipt either.
    assert_fails_at(&r, "no ACCEPTED receipt verified");
}

#[test]
fn a_receipt_whose_signer_does_not_fit_its_stage_fails() {
    // RECEIVED signed by the sender's gateway.
    let mut f = cross_country();
    f.bundle.receipts[1] = f.vn.receipt(pb::Stage::Received, &f.env, NOW + 900, 3);
    assert_fails_at(&f.verify(), "may only be signed by a gateway of kh");
    // DELIVERED signed by the sender organisation.
    let mut f = cross_country();
    let mut body = pb::ReceiptBody::decode(f.bundle.receipts[2].body.as_slice()).unwrap();
    body.signer = f.sender_org.clone();
    body.signer_key_id = f.sender.key_id().into();
    f.bundle.receipts[2] = receipt::sign(&body, &f.sender);
    assert_fails_at(
        &f.verify(),
        &format!(
            "may only be signed by the recipient organisation {}",
            f.recipient_org
        ),
    );
}

#[test]
fn a_gateway_receipt_must_point_at_its_own_event() {
    // ACCEPTED pointing at the SUBMITTED entry.
    let mut f = cross_country();
    f.bundle.receipts[0] = f.vn.receipt(pb::Stage::Accepted, &f.env, NOW + 10, 2);
    assert_fails_at(&f.verify(), "entry 2 records SUBMITTED");
    // RECEIVED pointing at an entry the bundle does not prove.
    let mut f = cross_country();
    f.bundle.receipts[1] = f.kh.receipt(pb::Stage::Received, &f.env, NOW + 900, 4);
    assert_fails_at(&f.verify(), "the bundle proves no entry at index 4");
    // REJECTED (expired) pointing at the RECEIVED entry.
    let mut f = cross_country();
    f.bundle
        .receipts
        .push(f.kh.receipt(pb::Stage::Rejected, &f.env, NOW + 900, 3));
    assert_fails_at(&f.verify(), "entry 3 records RECEIVED");
}

#[test]
fn a_bundle_without_an_accepted_receipt_fails() {
    let mut f = cross_country();
    f.bundle.receipts.remove(0);
    assert_fails_at(&f.verify(), "no ACCEPTED receipt verified");
}

#[test]
fn a_directory_differing_from_trust_fails() {
    let f = cross_country();
    let mut trusted = f.directories.clone();
    trusted[1].version += 1;
    let r = verify_bundle(&f.bytes(), &trusted);
    assert_fails_at(&r, "differs from the trusted one");
    assert_eq!(
        r.steps.len(),
        4,
        "nothing is checked under untrusted keys:\n{r}"
    );

    // A rotated witness key in the bundle's copy.
    let mut f = cross_country();
    f.bundle.directories[0].gateways[0].witness_verifier_key = f.kh.witness.verifier().to_string();
    assert_fails_at(&f.verify(), "the directory of vn (version 3) differs");

    // A country the auditor does not trust at all.
    let f = cross_country();
    let r = verify_bundle(&f.bytes(), &f.directories[..1]);
    assert_fails_at(&r, "no trusted directory for country \"kh\"");
}

#[test]
fn a_truncated_or_malformed_proof_fails() {
    let mut f = cross_country();
    f.bundle.events[1].inclusion_proof.pop();
    assert_fails_at(&f.verify(), "event 1: inclusion proof");

    let mut f = cross_country();
    f.bundle.events[4].inclusion_proof[0].pop();
    assert_fails_at(&f.verify(), "proof hash 0 is 31 bytes");

    // The right proof for another index.
    let mut f = cross_country();
    f.bundle.events[0].index += 1;
    assert_fails_at(&f.verify(), "event 0: inclusion proof");
}

#[test]
fn a_tree_size_other_than_the_checkpoints_fails() {
    let mut f = cross_country();
    let e = &mut f.bundle.events[0];
    let smaller = f.vn_log.tree.size() - 1;
    e.tree_size = smaller;
    e.inclusion_proof = merkle::inclusion_proof(&f.vn_log.tree, e.index, smaller)
        .unwrap()
        .iter()
        .map(|h| h.to_vec())
        .collect();
    assert_fails_at(&f.verify(), "event 0: checkpoint size");
}

#[test]
fn an_event_of_another_message_or_gateway_fails() {
    // An unrelated entry of the same log, correctly proven.
    let mut f = cross_country();
    let cp = f.bundle.events[0].checkpoint.clone();
    f.bundle.events.extend(f.vn_log.events(&f.vn.id, &[0], &cp));
    assert_fails_at(&f.verify(), "event 6: entry 0");

    // An event attributed to a gateway of a country with no part in the message.
    let mut f = cross_country();
    f.bundle.events[0].gateway = "spiffe://th.accord/gateway/bangkok".into();
    assert_fails_at(&f.verify(), "a gateway of th has no part in this message");
}

#[test]
fn a_tampered_envelope_stops_the_verification() {
    let mut f = cross_country();
    let env = f.bundle.envelope.as_mut().unwrap();
    let mut ciphertext = env.ciphertext.to_vec();
    *ciphertext.last_mut().unwrap() ^= 1;
    env.ciphertext = ciphertext.into();
    let r = f.verify();
    assert_fails_at(&r, "sender signature does not verify");
    assert_eq!(r.steps.len(), 5, "{r}");
}

#[test]
fn a_same_country_bundle_needs_no_cosignature() {
    // vn/c02 → vn/a03 through vn/hanoi alone: its log has no peer country to witness it.
    let f = cross_country();
    let a03 = SigningKey::from_seed("vn-a03-sig-1", [4; 32]).unwrap();
    let recipient_org = "spiffe://vn.accord/org/a03";
    let env = seal(
        &f.sender,
        recipient_org,
        "vn-a03-enc-1",
        RecipientKey::from_bytes([5; 32]).public_key(),
    );
    let mut log = Log::default();
    log.unrelated(2, &f.sender_org);
    let submitted = log.append(&entry(pb::LogEvent::Submitted, &env, &f.sender_org, NOW));
    let accepted_at = log.append(&entry(pb::LogEvent::Accepted, &env, &f.vn.id, NOW));
    let received_at = log.append(&entry(pb::LogEvent::Received, &env, &f.vn.id, NOW));
    let accepted = f.vn.receipt(pb::Stage::Accepted, &env, NOW, accepted_at);
    let received = f.vn.receipt(pb::Stage::Received, &env, NOW, received_at);
    log.unrelated(1, &f.sender_org);
    let delivered = receipt::sign(
        &pb::ReceiptBody {
            envelope_hash: env.hash.to_vec(),
            message_id: env.id.as_bytes().to_vec(),
            stage: pb::Stage::Delivered as i32,
            signer: recipient_org.into(),
            signer_key_id: "vn-a03-sig-1".into(),
            at_ms: NOW + 1000,
            log_index: 0,
            reason: 0,
        },
        &a03,
    );
    let delivered_at = log.append(&receipt_entry(
        pb::LogEvent::Delivered,
        &env,
        recipient_org,
        &delivered,
    ));
    let indices = [submitted, accepted_at, received_at, delivered_at];
    let mut bundle = pb::EvidenceBundle {
        version: VERSION,
        envelope: Some(env.wire.clone()),
        receipts: vec![accepted, received, delivered],
        events: log.events(&f.vn.id, &indices, &log.checkpoint(&f.vn.log, &[])),
        directories: f.directories.clone(),
    };
    let r = verify_bundle(&bundle.encode_to_vec(), &f.directories);
    assert!(r.ok(), "{r}");
    assert!(r
        .to_string()
        .contains("needs no cosignature (same-country message"));

    // A cosignature by a peer's witness is welcome, and checked.
    bundle.events = log.events(
        &f.vn.id,
        &indices,
        &log.checkpoint(&f.vn.log, &[&f.kh.witness]),
    );
    let bytes = bundle.encode_to_vec();
    assert!(verify_bundle(&bytes, &f.directories).ok());
    let cp = &bundle.events[0].checkpoint;
    let sig_at = cp.len() - 10; // inside the last line's (the cosignature's) signature
    let mut bad = bundle.clone();
    let mut note = cp.clone().into_bytes();
    note[sig_at] = if note[sig_at] == b'A' { b'B' } else { b'A' };
    bad.events[0].checkpoint = String::from_utf8(note).unwrap();
    assert_fails_at(
        &verify_bundle(&bad.encode_to_vec(), &f.directories),
        "cosignature by accord.kh/phnompenh",
    );
}

/// What `accord verify` prints: one line per check, then the verdict.
#[test]
fn the_printed_report_lists_every_check_and_ends_with_the_verdict() {
    let report = cross_country().verify();
    let text = report.to_string();
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok")).count(),
        report.steps.len()
    );
    assert!(
        text.trim_end().ends_with(&format!(
            "bundle verified: {} checks passed",
            report.steps.len()
        )),
        "{text}"
    );
}

/// KH's log rebuilt with `edit` applied to every entry and `extra` (about this message)
/// appended, proven in the bundle in place of the original; returns the appended entry's
/// index.
fn rebuild_kh_log(
    f: &mut Fixture,
    edit: impl Fn(&mut pb::LogEntry),
    extra: Option<pb::LogEntry>,
) -> Option<u64> {
    let mut log = Log::default();
    let mut idx = Vec::new();
    for (i, e) in f.kh_log.entries.iter().enumerate() {
        let mut entry = pb::LogEntry::decode(e.as_slice()).unwrap();
        edit(&mut entry);
        if entry.message_id == f.env.id.as_bytes() {
            idx.push(i as u64);
        }
        log.append(&entry);
    }
    let at = extra.map(|e| log.append(&e));
    idx.extend(at);
    let cp = log.checkpoint(&f.kh.log, &[&f.vn.witness]);
    f.bundle.events.retain(|e| e.gateway != f.kh.id);
    f.bundle.events.extend(log.events(&f.kh.id, &idx, &cp));
    at
}

#[test]
fn a_gateway_refusal_must_give_the_reason_its_log_entry_gives() {
    let mut f = cross_country();
    let mut refused = entry(pb::LogEvent::Rejected, &f.env, &f.kh.id, NOW + 900);
    refused.reason = pb::RejectReason::Policy as i32;
    let at = rebuild_kh_log(&mut f, |_| {}, Some(refused)).unwrap();
    // The receipt claims the message had no route; the log says policy refused it.
    let body = pb::ReceiptBody {
        envelope_hash: f.env.hash.to_vec(),
        message_id: f.env.id.as_bytes().to_vec(),
        stage: pb::Stage::Rejected as i32,
        signer: f.kh.id.clone(),
        signer_key_id: f.kh.receipt_key.key_id().into(),
        at_ms: NOW + 900,
        log_index: at,
        reason: pb::RejectReason::NoRoute as i32,
    };
    f.bundle
        .receipts
        .push(receipt::sign(&body, &f.kh.receipt_key));
    assert_fails_at(
        &f.verify(),
        &format!("entry {at} records REJECTED (reason POLICY)"),
    );
    // With the logged reason, that check passes.
    let mut f = cross_country();
    let mut refused = entry(pb::LogEvent::Rejected, &f.env, &f.kh.id, NOW + 900);
    refused.reason = pb::RejectReason::Policy as i32;
    let at = rebuild_kh_log(&mut f, |_| {}, Some(refused)).unwrap();
    let body = pb::ReceiptBody {
        log_index: at,
        reason: pb::RejectReason::Policy as i32,
        ..body
    };
    f.bundle
        .receipts
        .push(receipt::sign(&body, &f.kh.receipt_key));
    let r = f.verify();
    assert!(
        !failures(&r)
            .iter()
            .any(|s| s.contains(&format!("entry {at} records"))),
        "{r}"
    );
}

#[test]
fn a_delivered_entry_must_name_the_organisation_that_signed_the_receipt() {
    let mut f = cross_country();
    // KH's log records the delivered receipt as the act of another organisation.
    rebuild_kh_log(
        &mut f,
        |entry| {
            if entry.event == pb::LogEvent::Delivered as i32 {
                entry.actor = "spiffe://kh.accord/org/svayrieng".into();
            }
        },
        None,
    );
    assert_fails_at(&f.verify(), "DELIVERED entry");
}
