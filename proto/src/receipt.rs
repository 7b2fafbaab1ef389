//! Receipts: signed proof of each stage of a message's delivery chain (DESIGN.md, "Receipts").
//!
//! ```text
//! signed = "accord/v1/receipt" ‖ u64be(len(body)) ‖ body
//! ```
//! `body` is the `ReceiptBody` protobuf as the signer serialized it; like header bytes it is
//! never re-encoded. Gateways sign accepted, received and rejected receipts; the recipient
//! organisation signs the delivered receipt, or a rejected one with reason
//! REFUSED_BY_RECIPIENT when it refuses what it opened.

use prost::Message;

use crate::crypto::{self, len_be, Domain, SigningKey};
use crate::directory::Directories;
use crate::ids::{EnvelopeHash, MessageId, Role, SpiffeId};
use crate::pb;

/// Why a receipt is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiptError {
    /// The body does not decode or a field is out of range.
    #[error("malformed receipt: {0}")]
    Malformed(&'static str),
    /// The signer or its key is not in the directory.
    #[error("unknown receipt signer: {0}")]
    UnknownSigner(String),
    /// The signature does not verify.
    #[error("receipt signature does not verify")]
    BadSignature,
    /// The stage is signed by the wrong kind of party (e.g. delivered by a gateway).
    #[error("stage {stage:?} cannot be signed by {signer}")]
    WrongSigner { stage: pb::Stage, signer: String },
}

/// Whether `r`'s signer may sign its stage for a message from `sender` to `recipient`: the
/// sender's country's gateway accepts, the recipient's country's gateway receives, the
/// recipient organisation itself delivers or refuses what it opened, and either country's
/// gateway rejects. ([`verify`] has already checked the signer's role.) The error says who
/// may sign.
pub fn check_signer_for(
    r: &VerifiedReceipt,
    sender: &crate::ids::OrgId,
    recipient: &crate::ids::OrgId,
) -> Result<(), String> {
    let cc = r.signer.country();
    let refused_by_recipient = r.body.reason == pb::RejectReason::RefusedByRecipient as i32;
    let fits = match r.stage() {
        pb::Stage::Accepted => cc == sender.country(),
        pb::Stage::Received => cc == recipient.country(),
        pb::Stage::Rejected if refused_by_recipient => &r.signer == recipient.spiffe(),
        pb::Stage::Rejected => cc == sender.country() || cc == recipient.country(),
        pb::Stage::Delivered => &r.signer == recipient.spiffe(),
        pb::Stage::Unspecified => false,
    };
    if fits {
        return Ok(());
    }
    let who = match r.stage() {
        pb::Stage::Accepted => format!("a gateway of {} (the sender's)", sender.country()),
        pb::Stage::Received => format!("a gateway of {} (the recipient's)", recipient.country()),
        pb::Stage::Rejected if !refused_by_recipient => {
            if sender.country() == recipient.country() {
                format!("a gateway of {}", sender.country())
            } else {
                format!(
                    "a gateway of {} or {}",
                    sender.country(),
                    recipient.country()
                )
            }
        }
        _ => format!("the recipient organisation {recipient}"),
    };
    let stage = r.stage().as_str_name().trim_start_matches("STAGE_");
    Err(format!(
        "{stage} may only be signed by {who}, not by {}",
        r.signer
    ))
}

/// Signs a receipt body with a gateway's or organisation's key.
pub fn sign(body: &pb::ReceiptBody, key: &SigningKey) -> pb::Receipt {
    let bytes = body.encode_to_vec();
    let signature = key.sign(Domain::Receipt, &[&len_be(&bytes), &bytes]);
    pb::Receipt {
        body: bytes,
        signature: signature.to_vec(),
    }
}

/// A receipt whose signature verified against the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedReceipt {
    pub body: pb::ReceiptBody,
    pub signer: SpiffeId,
    pub envelope_hash: EnvelopeHash,
    pub message_id: MessageId,
    pub wire: pb::Receipt,
}

impl VerifiedReceipt {
    pub fn stage(&self) -> pb::Stage {
        pb::Stage::try_from(self.body.stage).unwrap_or(pb::Stage::Unspecified)
    }
}

/// SHA-256 of a receipt's body and signature, for log entries.
pub fn receipt_hash(r: &pb::Receipt) -> [u8; 32] {
    crypto::sha256(&[
        &len_be(&r.body),
        &r.body,
        &len_be(&r.signature),
        &r.signature,
    ])
}

/// Verifies a receipt's signature and that its stage fits its signer's role.
pub fn verify(
    receipt: &pb::Receipt,
    directories: &Directories,
) -> Result<VerifiedReceipt, ReceiptError> {
    let body = pb::ReceiptBody::decode(receipt.body.as_slice())
        .map_err(|_| ReceiptError::Malformed("body"))?;
    let stage = pb::Stage::try_from(body.stage).map_err(|_| ReceiptError::Malformed("stage"))?;
    let signer: SpiffeId = body
        .signer
        .parse()
        .map_err(|_| ReceiptError::Malformed("signer"))?;
    let envelope_hash = EnvelopeHash::from_slice(&body.envelope_hash)
        .map_err(|_| ReceiptError::Malformed("envelope_hash"))?;
    let message_id = MessageId::from_slice(&body.message_id)
        .map_err(|_| ReceiptError::Malformed("message_id"))?;
    // A reason exactly on rejected receipts, and a known one.
    let reason =
        pb::RejectReason::try_from(body.reason).map_err(|_| ReceiptError::Malformed("reason"))?;
    if (stage == pb::Stage::Rejected) != (reason != pb::RejectReason::Unspecified) {
        return Err(ReceiptError::Malformed("reason"));
    }
    let role_ok = match stage {
        pb::Stage::Unspecified => false,
        pb::Stage::Delivered => signer.role() == Role::Org,
        // The recipient organisation refuses what it opened; gateways refuse the rest.
        pb::Stage::Rejected if reason == pb::RejectReason::RefusedByRecipient => {
            signer.role() == Role::Org
        }
        pb::Stage::Accepted | pb::Stage::Received | pb::Stage::Rejected => {
            signer.role() == Role::Gateway
        }
    };
    if !role_ok {
        return Err(ReceiptError::WrongSigner {
            stage,
            signer: signer.to_string(),
        });
    }
    let key = directories
        .signing_key(&signer, &body.signer_key_id, body.at_ms)
        .map_err(|e| ReceiptError::UnknownSigner(e.to_string()))?;
    crypto::verify(
        &key,
        Domain::Receipt,
        &[&len_be(&receipt.body), &receipt.body],
        &receipt.signature,
    )
    .map_err(|_| ReceiptError::BadSignature)?;
    Ok(VerifiedReceipt {
        body,
        signer,
        envelope_hash,
        message_id,
        wire: receipt.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SigningKey, Directories, pb::ReceiptBody) {
        let key = SigningKey::from_seed("gw1", [9; 32]).unwrap();
        let dir = pb::Directory {
            country: "vn".into(),
            version: 1,
            orgs: vec![],
            gateways: vec![pb::GatewayEntry {
                id: "spiffe://vn.accord/gateway/hanoi".into(),
                signing_keys: vec![pb::PublicKey {
                    key_id: "gw1".into(),
                    public_key: key.public_key().to_vec(),
                    not_before_ms: 0,
                    not_after_ms: i64::MAX,
                }],
                ..Default::default()
            }],
        };
        let body = pb::ReceiptBody {
            envelope_hash: vec![1; 32],
            message_id: MessageId::new_v7(1, [2; 10]).as_bytes().to_vec(),
            stage: pb::Stage::Accepted as i32,
            signer: "spiffe://vn.accord/gateway/hanoi".into(),
            signer_key_id: "gw1".into(),
            at_ms: 1000,
            log_index: 3,
            reason: 0,
        };
        (key, Directories::new([dir]).unwrap(), body)
    }

    #[test]
    fn a_signed_receipt_verifies() {
        let (key, dir, body) = setup();
        let r = sign(&body, &key);
        let v = verify(&r, &dir).unwrap();
        assert_eq!(v.stage(), pb::Stage::Accepted);
        assert_eq!(v.body, body);
    }

    #[test]
    fn any_flipped_byte_of_a_receipt_is_refused() {
        let (key, dir, body) = setup();
        let r = sign(&body, &key);
        for i in 0..r.body.len() {
            let mut t = r.clone();
            t.body[i] ^= 1;
            assert!(verify(&t, &dir).is_err(), "body byte {i}");
        }
        for i in 0..r.signature.len() {
            let mut t = r.clone();
            t.signature[i] ^= 1;
            assert_eq!(verify(&t, &dir), Err(ReceiptError::BadSignature));
        }
    }

    #[test]
    fn a_rejected_receipt_needs_a_reason_and_only_it_may_have_one() {
        let (key, dir, mut body) = setup();
        body.reason = pb::RejectReason::Expired as i32;
        assert_eq!(
            verify(&sign(&body, &key), &dir),
            Err(ReceiptError::Malformed("reason"))
        );
        body.stage = pb::Stage::Rejected as i32;
        assert!(verify(&sign(&body, &key), &dir).is_ok());
        body.reason = 0;
        assert_eq!(
            verify(&sign(&body, &key), &dir),
            Err(ReceiptError::Malformed("reason"))
        );
        body.reason = 999;
        assert_eq!(
            verify(&sign(&body, &key), &dir),
            Err(ReceiptError::Malformed("reason"))
        );
    }

    #[test]
    fn an_organisation_signs_no_rejection_but_its_own_refusal() {
        let (_, _, mut body) = setup();
        let org = SigningKey::from_seed("org1", [11; 32]).unwrap();
        let dir = pb::Directory {
            country: "vn".into(),
            version: 1,
            orgs: vec![pb::OrgEntry {
                id: "spiffe://vn.accord/org/c02".into(),
                signing_keys: vec![pb::PublicKey {
                    key_id: "org1".into(),
                    public_key: org.public_key().to_vec(),
                    not_before_ms: 0,
                    not_after_ms: i64::MAX,
                }],
                ..Default::default()
            }],
            gateways: vec![],
        };
        let dirs = Directories::new([dir]).unwrap();
        body.signer = "spiffe://vn.accord/org/c02".into();
        body.signer_key_id = "org1".into();
        body.stage = pb::Stage::Rejected as i32;
        body.reason = pb::RejectReason::Expired as i32;
        assert!(matches!(
            verify(&sign(&body, &org), &dirs),
            Err(ReceiptError::WrongSigner { .. })
        ));
        body.reason = pb::RejectReason::RefusedByRecipient as i32;
        assert!(verify(&sign(&body, &org), &dirs).is_ok());
    }

    #[test]
    fn only_the_recipient_refuses_and_only_that_way() {
        let (key, dir, mut body) = setup();
        // The setup's signer is a gateway: it cannot sign the recipient's refusal.
        body.stage = pb::Stage::Rejected as i32;
        body.reason = pb::RejectReason::RefusedByRecipient as i32;
        assert!(matches!(
            verify(&sign(&body, &key), &dir),
            Err(ReceiptError::WrongSigner { .. })
        ));
    }

    #[test]
    fn a_gateway_cannot_sign_a_delivered_receipt() {
        let (key, dir, mut body) = setup();
        body.stage = pb::Stage::Delivered as i32;
        assert!(matches!(
            verify(&sign(&body, &key), &dir),
            Err(ReceiptError::WrongSigner { .. })
        ));
    }

    #[test]
    fn a_receipt_signed_by_an_unlisted_key_is_refused() {
        let (_, dir, body) = setup();
        let rogue = SigningKey::from_seed("gw1", [10; 32]).unwrap();
        assert_eq!(
            verify(&sign(&body, &rogue), &dir),
            Err(ReceiptError::BadSignature)
        );
    }
}
