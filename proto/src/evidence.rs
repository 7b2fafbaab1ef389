//! Offline verification of evidence bundles: one message's delivery chain, checked with the
//! trusted directories alone. Format and verification steps: `proto/EVIDENCE.md`.
//!
//! An [`pb::EvidenceBundle`] holds the sealed envelope (ciphertext only), its receipts, the
//! log entries that record them with inclusion proofs to checkpoints signed by each gateway's
//! log key and cosigned by the other country's gateway, and the directories whose keys all
//! of this verifies under. [`verify_bundle`] checks everything, never panics, and reports
//! every check as a [`Step`] with its verdict, in order, so a command-line tool can print
//! them. Sentences carry ids, key names and hashes only, never message contents.
//!
//! The bundle is refused unless its bytes are the canonical protobuf encoding of what they
//! decode to, its directories are byte-identical to the trusted ones, and every signature line
//! of every checkpoint is by a key of those directories and verifies: nothing in a bundle is
//! left unchecked, so a change of any byte is detected.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use prost::Message;

use crate::directory::Directories;
use crate::envelope::{Limits, SealedEnvelope, VerifiedEnvelope};
use crate::ids::{CountryCode, Role, SpiffeId};
use crate::log::leaf_hash;
use crate::merkle::{self, Hash};
use crate::note::{self, Checkpoint, CosignatureVerifier, NoteError, NoteVerifier, OpenedNote};
use crate::pb;
use crate::receipt::{self, VerifiedReceipt};

/// The bundle format version this module verifies.
pub const VERSION: u32 = 1;

/// One check and its verdict, in the order performed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// What was checked, as a sentence naming ids, keys and hashes (never contents).
    pub what: String,
    /// `Ok` if the check passed, otherwise why it failed.
    pub verdict: Result<(), String>,
}

/// Every check [`verify_bundle`] performed, in order.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    /// Every step passed and there was at least one.
    pub fn ok(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.verdict.is_ok())
    }

    /// Records a step; returns whether it passed.
    fn push(&mut self, what: impl Into<String>, verdict: Result<(), String>) -> bool {
        let passed = verdict.is_ok();
        self.steps.push(Step {
            what: what.into(),
            verdict,
        });
        passed
    }
}

/// One line per step: `ok   <what>` or `FAIL <what>: <why>`, then a verdict line.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            match &step.verdict {
                Ok(()) => writeln!(f, "ok   {}", step.what)?,
                Err(why) => writeln!(f, "FAIL {}: {why}", step.what)?,
            }
        }
        let failed = self.steps.iter().filter(|s| s.verdict.is_err()).count();
        if self.ok() {
            write!(f, "bundle verified: {} checks passed", self.steps.len())
        } else if self.steps.is_empty() {
            write!(f, "bundle NOT verified: nothing was checked")
        } else {
            write!(
                f,
                "bundle NOT verified: {failed} of {} checks failed",
                self.steps.len()
            )
        }
    }
}

/// Verifies an encoded bundle against trusted directories; never panics; reports every step.
///
/// `trusted` are the directories the auditor trusts (its trust roots). The bundle's own
/// directories must each be byte-identical to the trusted directory of the same country.
pub fn verify_bundle(bundle: &[u8], trusted: &[pb::Directory]) -> Report {
    let mut report = Report::default();
    run(&mut report, bundle, trusted);
    report
}

fn run(report: &mut Report, bytes: &[u8], trusted: &[pb::Directory]) -> Option<()> {
    // Steps 1-3 of EVIDENCE.md: structure.
    let decoded = pb::EvidenceBundle::decode(bytes);
    let decode_ok = report.push(
        format!(
            "bundle ({} bytes) decodes as an accord.v1.EvidenceBundle",
            bytes.len()
        ),
        decoded.as_ref().map(|_| ()).map_err(|e| e.to_string()),
    );
    let bundle = decoded.ok().filter(|_| decode_ok)?;
    report.push(
        "bundle bytes are the canonical encoding of what they decode to (no unknown, repeated \
         or default-valued fields, minimal lengths)",
        if bundle.encode_to_vec() == bytes {
            Ok(())
        } else {
            Err("not canonically encoded: some bytes are not covered by any check".into())
        },
    );
    let version_ok = report.push(
        format!("bundle format version is {VERSION}"),
        if bundle.version == VERSION {
            Ok(())
        } else {
            Err(format!("version {} is not supported", bundle.version))
        },
    );
    if !version_ok {
        return None;
    }

    // Step 4: trust.
    let directories = check_directories(report, &bundle.directories, trusted)?;

    // Step 5: the envelope.
    let env = check_envelope(report, bundle.envelope.as_ref(), &directories)?;
    let msg = Msg::new(env, &bundle.directories);

    // Step 6: receipts.
    let receipts: Vec<Option<VerifiedReceipt>> = bundle
        .receipts
        .iter()
        .enumerate()
        .map(|(i, r)| check_receipt(report, i, r, &msg, &directories))
        .collect();

    // Step 7: logged events.
    let mut cache = CheckpointCache::new();
    let events: Vec<Option<ProvenEvent>> = bundle
        .events
        .iter()
        .enumerate()
        .map(|(j, e)| check_event(report, j, e, &msg, &mut cache))
        .collect();
    let proven: Vec<&ProvenEvent> = events.iter().flatten().collect();

    // Steps 8 and 9: receipts backed by log entries.
    for (i, r) in receipts.iter().enumerate() {
        let Some(r) = r else { continue };
        match r.stage() {
            pb::Stage::Rejected if refused_by_recipient(r) => {
                check_delivery_logged(report, i, r, &msg, &proven)
            }
            pb::Stage::Accepted | pb::Stage::Received | pb::Stage::Rejected => {
                check_gateway_receipt_logged(report, i, r, &proven)
            }
            pb::Stage::Delivered => check_delivery_logged(report, i, r, &msg, &proven),
            pb::Stage::Unspecified => {}
        }
    }

    // Step 10: the chain starts.
    let accepted: Vec<String> = receipts
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().is_some_and(|r| r.stage() == pb::Stage::Accepted))
        .map(|(i, _)| i.to_string())
        .collect();
    report.push(
        if accepted.is_empty() {
            "the bundle holds a valid ACCEPTED receipt by the sender's country gateway".into()
        } else {
            format!(
                "the bundle holds a valid ACCEPTED receipt by the sender's country gateway \
                 (receipt {})",
                accepted.join(", ")
            )
        },
        if accepted.is_empty() {
            Err("no ACCEPTED receipt verified".into())
        } else {
            Ok(())
        },
    );
    Some(())
}

/// The message the bundle is about, once its envelope verified.
struct Msg<'a> {
    env: VerifiedEnvelope,
    sender_cc: CountryCode,
    recipient_cc: CountryCode,
    dirs: &'a [pb::Directory],
}

impl<'a> Msg<'a> {
    fn new(env: VerifiedEnvelope, dirs: &'a [pb::Directory]) -> Self {
        Self {
            sender_cc: env.sender().country().clone(),
            recipient_cc: env.recipient().country().clone(),
            env,
            dirs,
        }
    }

    fn cross_country(&self) -> bool {
        self.sender_cc != self.recipient_cc
    }

    /// "vn or kh", or "vn" for a same-country message.
    fn countries(&self) -> String {
        if self.cross_country() {
            format!("{} or {}", self.sender_cc, self.recipient_cc)
        } else {
            self.sender_cc.to_string()
        }
    }

    /// The country whose gateway must witness a log of `cc`: the other party's.
    fn witness_country(&self, cc: &CountryCode) -> Option<&CountryCode> {
        if !self.cross_country() {
            None
        } else if cc == &self.sender_cc {
            Some(&self.recipient_cc)
        } else {
            Some(&self.sender_cc)
        }
    }

    fn gateway(&self, id: &SpiffeId) -> Option<&'a pb::GatewayEntry> {
        let want = id.to_string();
        self.dirs
            .iter()
            .filter(|d| d.country == id.country().as_str())
            .flat_map(|d| &d.gateways)
            .find(|g| g.id == want)
    }
}

fn short(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn stage_name(stage: i32) -> String {
    match pb::Stage::try_from(stage) {
        Ok(s) => s.as_str_name().trim_start_matches("STAGE_").to_string(),
        Err(_) => format!("stage {stage}"),
    }
}

fn reason_name(reason: i32) -> String {
    pb::RejectReason::try_from(reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("REJECT_REASON_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("unknown ({reason})"))
}

fn event_name(event: i32) -> String {
    match pb::LogEvent::try_from(event) {
        Ok(e) => e.as_str_name().trim_start_matches("LOG_EVENT_").to_string(),
        Err(_) => format!("event {event}"),
    }
}

fn check_directories(
    report: &mut Report,
    bundled: &[pb::Directory],
    trusted: &[pb::Directory],
) -> Option<Directories> {
    let listed: Vec<String> = bundled
        .iter()
        .map(|d| format!("{} v{}", d.country.escape_debug(), d.version))
        .collect();
    let verdict = (|| {
        Directories::new(trusted.iter().cloned())
            .map_err(|e| format!("the trusted directories are unusable: {e}"))?;
        if bundled.is_empty() {
            return Err("the bundle carries no directory".to_string());
        }
        for d in bundled {
            let t = trusted
                .iter()
                .find(|t| t.country == d.country)
                .ok_or_else(|| format!("no trusted directory for country {:?}", d.country))?;
            if t.encode_to_vec() != d.encode_to_vec() {
                return Err(format!(
                    "the directory of {} (version {}) differs from the trusted one (version {})",
                    d.country.escape_debug(),
                    d.version,
                    t.version
                ));
            }
        }
        Directories::new(bundled.iter().cloned()).map_err(|e| e.to_string())
    })();
    let what = format!(
        "the bundle's directories ({}) are byte-identical to the trusted directories of their \
         countries",
        listed.join(", ")
    );
    match verdict {
        Ok(d) => {
            report.push(what, Ok(()));
            Some(d)
        }
        Err(e) => {
            report.push(what, Err(e));
            None
        }
    }
}

fn check_envelope(
    report: &mut Report,
    env: Option<&pb::Envelope>,
    directories: &Directories,
) -> Option<VerifiedEnvelope> {
    let Some(env) = env else {
        report.push("the bundle carries the envelope", Err("no envelope".into()));
        return None;
    };
    let header = pb::Header::decode(&env.header[..]).ok();
    let created_at = header.as_ref().map_or(0, |h| h.created_at_ms);
    let result = SealedEnvelope::from_wire(env.clone(), &Limits::default())
        .and_then(|s| s.verify(directories, created_at));
    let what = match (&result, &header) {
        (Ok(v), _) => format!(
            "envelope of message {} (hash {}) is signed by {} with key {:?}, valid at its \
             creation time {} ms",
            v.id(),
            v.hash(),
            v.sender(),
            v.header().sender_key_id,
            created_at
        ),
        (Err(_), Some(h)) => format!(
            "envelope signed by {:?} with key {:?} verifies at its creation time {} ms",
            h.sender_org, h.sender_key_id, created_at
        ),
        (Err(_), None) => "envelope verifies".to_string(),
    };
    match result {
        Ok(v) => {
            report.push(what, Ok(()));
            Some(v)
        }
        Err(e) => {
            report.push(what, Err(e.to_string()));
            None
        }
    }
}

fn check_receipt(
    report: &mut Report,
    i: usize,
    r: &pb::Receipt,
    msg: &Msg<'_>,
    directories: &Directories,
) -> Option<VerifiedReceipt> {
    let body = pb::ReceiptBody::decode(r.body.as_slice()).ok();
    let what = match &body {
        Some(b) => format!(
            "receipt {i}: {} signed by {} (key {:?}) at {} ms verifies, names this envelope \
             and message, and its signer may sign that stage for this message",
            stage_name(b.stage),
            b.signer.escape_debug(),
            b.signer_key_id,
            b.at_ms
        ),
        None => format!("receipt {i} verifies"),
    };
    let verdict = (|| {
        let v = receipt::verify(r, directories).map_err(|e| e.to_string())?;
        if v.envelope_hash != msg.env.hash() {
            return Err(format!(
                "it names envelope {}, not {}",
                v.envelope_hash,
                msg.env.hash()
            ));
        }
        if v.message_id != msg.env.id() {
            return Err(format!(
                "it names message {}, not {}",
                v.message_id,
                msg.env.id()
            ));
        }
        receipt::check_signer_for(&v, msg.env.sender(), msg.env.recipient())?;
        Ok(v)
    })();
    match verdict {
        Ok(v) => {
            report.push(what, Ok(()));
            Some(v)
        }
        Err(e) => {
            report.push(what, Err(e));
            None
        }
    }
}

/// A logged event whose every check passed.
struct ProvenEvent {
    gateway: SpiffeId,
    index: u64,
    entry: pb::LogEntry,
}

/// The outcome of checking one checkpoint of one gateway (cached: events of one log usually
/// share their checkpoint).
struct CheckpointCheck {
    /// The log's signature (and the checkpoint's syntax): the parsed checkpoint.
    signed: Result<Checkpoint, String>,
    /// Origin equals the directory's `log_origin`.
    origin: Result<(), String>,
    /// Signature lines: all known and valid; the other side's witness among them. `what`
    /// sentence on both sides.
    cosigned: (String, Result<(), String>),
}

/// Checkpoint checks by (gateway id, checkpoint note), as they appear in the bundle.
type CheckpointCache = HashMap<(String, String), CheckpointCheck>;

fn check_event(
    report: &mut Report,
    j: usize,
    e: &pb::LoggedEvent,
    msg: &Msg<'_>,
    cache: &mut CheckpointCache,
) -> Option<ProvenEvent> {
    let mut ok = true;
    // 7a. The gateway.
    let gateway: Result<(SpiffeId, &pb::GatewayEntry), String> = (|| {
        let id: SpiffeId = e.gateway.parse().map_err(|e| format!("{e}"))?;
        if id.role() != Role::Gateway {
            return Err("not a gateway id".into());
        }
        let cc = id.country();
        if cc != &msg.sender_cc && cc != &msg.recipient_cc {
            return Err(format!("a gateway of {cc} has no part in this message"));
        }
        let entry = msg
            .gateway(&id)
            .ok_or_else(|| format!("{id} is not in the directory of {cc}"))?;
        Ok((id, entry))
    })();
    ok &= report.push(
        format!(
            "event {j}: {} is a gateway of {} listed in the directories",
            e.gateway.escape_debug(),
            msg.countries()
        ),
        gateway.as_ref().map(|_| ()).map_err(Clone::clone),
    );

    if let Ok((id, gw)) = &gateway {
        let cp = cache
            .entry((e.gateway.clone(), e.checkpoint.clone()))
            .or_insert_with(|| check_checkpoint(id, gw, &e.checkpoint, msg));
        // 7b. Log signature.
        ok &= report.push(
            format!(
                "event {j}: its checkpoint is a signed note by {}'s log key {:?} and a \
                 well-formed checkpoint",
                e.gateway,
                vkey_name(&gw.log_verifier_key)
            ),
            cp.signed.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        if let Ok(checkpoint) = &cp.signed {
            // 7c. Origin.
            ok &= report.push(
                format!(
                    "event {j}: checkpoint origin {:?} is {}'s log origin {:?}",
                    checkpoint.origin, e.gateway, gw.log_origin
                ),
                cp.origin.clone(),
            );
            // 7d. Size.
            ok &= report.push(
                format!(
                    "event {j}: checkpoint size {} equals the proof's tree size {}",
                    checkpoint.size, e.tree_size
                ),
                if checkpoint.size == e.tree_size {
                    Ok(())
                } else {
                    Err("sizes differ".into())
                },
            );
            // 7e. Cosignature.
            ok &= report.push(
                format!("event {j}: {}", cp.cosigned.0),
                cp.cosigned.1.clone(),
            );
            // 7f. Inclusion.
            ok &= report.push(
                format!(
                    "event {j}: inclusion proof ({} hashes) of entry {} (leaf {}) leads to the \
                     checkpoint's root {} at size {}",
                    e.inclusion_proof.len(),
                    e.index,
                    short(&leaf_hash(&e.entry)),
                    short(&checkpoint.root),
                    checkpoint.size
                ),
                check_inclusion(e, &checkpoint.root),
            );
        }
    }

    // 7g. The entry.
    let entry = pb::LogEntry::decode(e.entry.as_slice());
    let what = match &entry {
        Ok(entry) => format!(
            "event {j}: entry {} of the log of {} is a canonical LogEntry ({} by {:?} at {} ms) \
             naming message {} and envelope {}",
            e.index,
            e.gateway.escape_debug(),
            event_name(entry.event),
            entry.actor,
            entry.at_ms,
            msg.env.id(),
            msg.env.hash()
        ),
        Err(_) => format!(
            "event {j}: entry {} of the log of {} decodes as a LogEntry",
            e.index,
            e.gateway.escape_debug()
        ),
    };
    let verdict = (|| {
        let entry = entry.as_ref().map_err(|e| e.to_string())?;
        if entry.encode_to_vec() != e.entry {
            return Err("not canonically encoded".to_string());
        }
        match pb::LogEvent::try_from(entry.event) {
            Ok(pb::LogEvent::Unspecified) | Err(_) => {
                return Err(format!("unknown event type {}", entry.event))
            }
            Ok(_) => {}
        }
        if entry.message_id != msg.env.id().as_bytes() {
            return Err(format!("it names message id {}", short(&entry.message_id)));
        }
        if entry.envelope_hash != msg.env.hash().0 {
            return Err(format!("it names envelope {}", short(&entry.envelope_hash)));
        }
        Ok(())
    })();
    ok &= report.push(what, verdict);

    match (ok, gateway, entry) {
        (true, Ok((gateway, _)), Ok(entry)) => Some(ProvenEvent {
            gateway,
            index: e.index,
            entry,
        }),
        _ => None,
    }
}

/// The key name of a verifier key string, for sentences.
fn vkey_name(vkey: &str) -> &str {
    vkey.split('+').next().unwrap_or_default()
}

fn check_checkpoint(
    id: &SpiffeId,
    gw: &pb::GatewayEntry,
    note_text: &str,
    msg: &Msg<'_>,
) -> CheckpointCheck {
    let opened: Result<(NoteVerifier, OpenedNote, Checkpoint), String> = (|| {
        let log_key: NoteVerifier = gw
            .log_verifier_key
            .parse()
            .map_err(|e| format!("the directory's log verifier key of {id}: {e}"))?;
        let opened =
            note::open(note_text, std::slice::from_ref(&log_key)).map_err(|e| e.to_string())?;
        let cp = Checkpoint::parse(&opened.body).map_err(|e| e.to_string())?;
        Ok((log_key, opened, cp))
    })();
    let (log_key, opened, cp) = match opened {
        Ok(o) => o,
        Err(e) => {
            return CheckpointCheck {
                signed: Err(e.clone()),
                origin: Err(e.clone()),
                cosigned: (String::new(), Err(e)),
            }
        }
    };
    let origin = if cp.origin == gw.log_origin {
        Ok(())
    } else {
        Err("origins differ".into())
    };
    let cosigned = check_signature_lines(&opened, &log_key, msg.witness_country(id.country()), msg);
    CheckpointCheck {
        signed: Ok(cp),
        origin,
        cosigned,
    }
}

/// The key name and key ID of a signature line (`— <name> base64(key ID ‖ signature)`).
fn line_key(line: &str) -> Option<(&str, [u8; 4])> {
    let rest = line
        .strip_suffix('\n')
        .unwrap_or(line)
        .strip_prefix("\u{2014} ")?;
    let (name, b64) = rest.split_once(' ')?;
    let raw = B64.decode(b64).ok()?;
    let id: [u8; 4] = raw.get(..4)?.try_into().ok()?;
    Some((name, id))
}

/// Every signature line must be by the log key (already verified by `note::open`) or by the
/// witness key of a gateway of the bundle's directories, and verify; the witness of a gateway
/// of `other` (the other party's country) must be among them. `other` is `None` for a
/// same-country message: no peer country exists, so no cosignature is required.
fn check_signature_lines(
    opened: &OpenedNote,
    log_key: &NoteVerifier,
    other: Option<&CountryCode>,
    msg: &Msg<'_>,
) -> (String, Result<(), String>) {
    let witnesses: Vec<(&str, CosignatureVerifier)> = msg
        .dirs
        .iter()
        .flat_map(|d| d.gateways.iter().map(move |g| (d.country.as_str(), g)))
        .filter_map(|(cc, g)| Some((cc, g.witness_verifier_key.parse().ok()?)))
        .collect();
    let what = match other {
        Some(cc) => format!(
            "checkpoint is cosigned by the witness key of a gateway of {cc} (the other \
             party's country), and every signature line on it is by a key of the directories \
             and verifies"
        ),
        None => "checkpoint needs no cosignature (same-country message: there is no other \
                 party's country to witness it), and every signature line on it is by a key \
                 of the directories and verifies"
            .to_string(),
    };
    let mut by_other = Vec::new();
    for line in &opened.signature_lines {
        let Some((name, key_id)) = line_key(line) else {
            return (what, Err("a signature line does not parse".into()));
        };
        if name == log_key.name && key_id == log_key.key_id {
            continue;
        }
        let mut known = false;
        for (cc, w) in &witnesses {
            match w.verify_line(&opened.body, line) {
                Ok(ts) => {
                    known = true;
                    if other.is_some_and(|o| o.as_str() == *cc) {
                        by_other.push(format!("{} at {ts}", w.name));
                    }
                }
                Err(NoteError::UnknownKey) => {}
                Err(e) => return (what, Err(format!("cosignature by {}: {e}", w.name))),
            }
        }
        if !known {
            return (
                what,
                Err(format!(
                    "signature line by {name:?} (key ID {}) is by no key of the directories",
                    hex::encode(key_id)
                )),
            );
        }
    }
    match other {
        Some(cc) if by_other.is_empty() => (
            what,
            Err(format!(
                "no cosignature by the witness of a gateway of {cc}"
            )),
        ),
        Some(_) => (format!("{what} ({})", by_other.join(", ")), Ok(())),
        None => (what, Ok(())),
    }
}

fn check_inclusion(e: &pb::LoggedEvent, root: &Hash) -> Result<(), String> {
    let proof = e
        .inclusion_proof
        .iter()
        .enumerate()
        .map(|(k, h)| {
            Hash::try_from(h.as_slice())
                .map_err(|_| format!("proof hash {k} is {} bytes, not 32", h.len()))
        })
        .collect::<Result<Vec<Hash>, String>>()?;
    merkle::verify_inclusion(&leaf_hash(&e.entry), e.index, e.tree_size, &proof, root)
        .map_err(|e| e.to_string())
}

/// A gateway receipt's `log_index` names the entry of the signer's log that records it.
fn check_gateway_receipt_logged(
    report: &mut Report,
    i: usize,
    r: &VerifiedReceipt,
    proven: &[&ProvenEvent],
) {
    let stage = r.stage();
    let fits = |e: pb::LogEvent| match stage {
        pb::Stage::Accepted => e == pb::LogEvent::Accepted,
        pb::Stage::Received => e == pb::LogEvent::Received,
        pb::Stage::Rejected => e == pb::LogEvent::Rejected || e == pb::LogEvent::Expired,
        _ => false,
    };
    let expected = match stage {
        pb::Stage::Rejected => "REJECTED or EXPIRED",
        pb::Stage::Accepted => "ACCEPTED",
        _ => "RECEIVED",
    };
    let index = r.body.log_index;
    let what = format!(
        "receipt {i} ({} by {}) is backed by a proven {expected} entry at index {index} of \
         its signer's log",
        stage_name(r.body.stage),
        r.signer
    );
    let at: Vec<&&ProvenEvent> = proven
        .iter()
        .filter(|e| e.gateway == r.signer && e.index == index)
        .collect();
    let verdict = if at.is_empty() {
        Err(format!(
            "the bundle proves no entry at index {index} of {}'s log",
            r.signer
        ))
    } else if at.iter().any(|e| {
        let ev = pb::LogEvent::try_from(e.entry.event).unwrap_or(pb::LogEvent::Unspecified);
        fits(ev)
            // A refusal's receipt and its log entry give the same reason.
            && match ev {
                pb::LogEvent::Expired => r.body.reason == pb::RejectReason::Expired as i32,
                pb::LogEvent::Rejected => e.entry.reason == r.body.reason,
                _ => true,
            }
    }) {
        Ok(())
    } else {
        let names: Vec<String> = at
            .iter()
            .map(|e| match pb::LogEvent::try_from(e.entry.event) {
                Ok(pb::LogEvent::Rejected | pb::LogEvent::Expired) => format!(
                    "{} (reason {})",
                    event_name(e.entry.event),
                    reason_name(e.entry.reason)
                ),
                _ => event_name(e.entry.event),
            })
            .collect();
        Err(format!(
            "entry {index} records {}, which does not match this receipt",
            names.join(", ")
        ))
    };
    report.push(what, verdict);
}

/// The delivered receipt is logged as DELIVERED, with its hash, by the recipient's gateway.
/// A REJECTED receipt the recipient organisation signed: it refused what it opened.
fn refused_by_recipient(r: &VerifiedReceipt) -> bool {
    r.body.reason == pb::RejectReason::RefusedByRecipient as i32
}

/// How the recipient organisation ended the delivery (DELIVERED, or REJECTED with reason
/// REFUSED_BY_RECIPIENT): it signs no log, so its gateway's log must hold the receipt.
fn check_delivery_logged(
    report: &mut Report,
    i: usize,
    r: &VerifiedReceipt,
    msg: &Msg<'_>,
    proven: &[&ProvenEvent],
) {
    let hash = receipt::receipt_hash(&r.wire);
    let (stage, event) = if r.stage() == pb::Stage::Rejected {
        ("REJECTED", pb::LogEvent::Rejected)
    } else {
        ("DELIVERED", pb::LogEvent::Delivered)
    };
    let what = format!(
        "receipt {i} ({stage} by {}, receipt hash {}) is recorded as a proven {stage} \
         entry in the log of a gateway of {} (the recipient's country)",
        r.signer,
        short(&hash),
        msg.recipient_cc
    );
    let found = proven.iter().any(|e| {
        e.gateway.country() == &msg.recipient_cc
            && e.entry.event == event as i32
            && e.entry.receipt_hash == hash
            && e.entry.actor == r.signer.to_string()
    });
    report.push(
        what,
        if found {
            Ok(())
        } else {
            Err("the bundle proves no such entry".into())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_report_is_not_ok() {
        assert!(!Report::default().ok());
    }

    #[test]
    fn garbage_and_empty_bundles_fail_without_panicking() {
        // The empty input decodes (to a bundle of version 0) and fails on the version.
        let r = verify_bundle(&[], &[]);
        assert!(!r.ok());
        assert!(r.steps.iter().any(|s| s.what.contains("version")));
        for bytes in [&[0xff_u8; 7][..], b"not a bundle", &[0x0a, 0x05, 0x01]] {
            let r = verify_bundle(bytes, &[]);
            assert!(!r.ok(), "{bytes:?}");
            assert!(!r.steps.is_empty());
        }
    }

    #[test]
    fn a_bundle_without_directories_or_envelope_stops_early() {
        let b = pb::EvidenceBundle {
            version: VERSION,
            ..Default::default()
        };
        let r = verify_bundle(&b.encode_to_vec(), &[]);
        assert!(!r.ok());
        assert_eq!(r.steps.len(), 4, "{r}");
        assert!(r.steps.get(3).is_some_and(|s| s.verdict.is_err()));
    }

    #[test]
    fn a_non_canonical_bundle_is_refused() {
        let b = pb::EvidenceBundle {
            version: VERSION,
            ..Default::default()
        };
        // Field 1 written twice: decodes to the same message, but is not its encoding.
        let mut bytes = b.encode_to_vec();
        bytes.extend_from_slice(&[0x08, 0x01]);
        let r = verify_bundle(&bytes, &[]);
        assert!(r.steps.get(1).is_some_and(|s| s.verdict.is_err()), "{r}");
    }

    #[test]
    fn signature_line_keys_parse() {
        let line = "\u{2014} accord.vn/hanoi AAECAwQF\n";
        assert_eq!(line_key(line), Some(("accord.vn/hanoi", [0, 1, 2, 3])));
        assert_eq!(line_key("- x AAECAwQF"), None);
        assert_eq!(line_key("\u{2014} x AAE="), None);
    }
}
