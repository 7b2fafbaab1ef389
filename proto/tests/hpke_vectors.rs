//! RFC 9180 test vectors (base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM)
//! and negative tests for the HPKE module.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use accord_proto::crypto::hpke::{
    setup_base_recipient, setup_base_sender, HpkeError, RecipientKey, N_ENC,
};
use serde::Deserialize;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/rfc9180-hpke-x25519-sha256-aes256gcm.json"
);

#[derive(Deserialize)]
struct Vector {
    mode: u8,
    kem_id: u16,
    kdf_id: u16,
    aead_id: u16,
    info: String,
    #[serde(rename = "ikmR")]
    ikm_r: String,
    #[serde(rename = "ikmE")]
    ikm_e: String,
    #[serde(rename = "skRm")]
    sk_rm: String,
    #[serde(rename = "pkRm")]
    pk_rm: String,
    #[serde(rename = "pkEm")]
    pk_em: String,
    enc: String,
    key: String,
    base_nonce: String,
    exporter_secret: String,
    encryptions: Vec<Encryption>,
    exports: Vec<Export>,
}

#[derive(Deserialize)]
struct Encryption {
    aad: String,
    ct: String,
    nonce: String,
    pt: String,
}

#[derive(Deserialize)]
struct Export {
    exporter_context: String,
    #[serde(rename = "L")]
    len: usize,
    exported_value: String,
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("vector fields are hex")
}

fn array32(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32-byte vector field")
}

/// The mode 0 entries for our suite; there must be at least one, or the tests prove nothing.
fn base_vectors() -> Vec<Vector> {
    let json = std::fs::read_to_string(VECTORS).expect("read vector file");
    let all: Vec<Vector> = serde_json::from_str(&json).expect("parse vector file");
    let base: Vec<Vector> = all
        .into_iter()
        .filter(|v| v.mode == 0 && v.kem_id == 0x20 && v.kdf_id == 1 && v.aead_id == 2)
        .collect();
    assert!(!base.is_empty(), "no base-mode vectors for this suite");
    base
}

#[test]
fn derived_recipient_key_matches_vector() {
    for v in base_vectors() {
        let sk_r = RecipientKey::derive(&unhex(&v.ikm_r));
        assert_eq!(sk_r.public_key(), array32(&v.pk_rm));
        assert_eq!(*sk_r.to_secret_bytes(), array32(&v.sk_rm));
    }
}

#[test]
fn recipient_key_from_stored_bytes_has_vector_public_key() {
    for v in base_vectors() {
        let sk_r = RecipientKey::from_bytes(array32(&v.sk_rm));
        assert_eq!(sk_r.public_key(), array32(&v.pk_rm));
    }
}

#[test]
fn sender_setup_produces_vector_enc() {
    for v in base_vectors() {
        let (enc, _) = setup_base_sender(&array32(&v.pk_rm), &unhex(&v.info), &unhex(&v.ikm_e))
            .expect("setup sender");
        assert_eq!(enc, array32(&v.enc));
        assert_eq!(enc, array32(&v.pk_em));
    }
}

#[test]
fn vector_sequence_numbers_are_consecutive_from_zero() {
    // The seal and open tests replay encryptions in file order, which is only right if
    // entry i was made with sequence number i: nonce = base_nonce XOR I2OSP(i, 12).
    for v in base_vectors() {
        let base_nonce = unhex(&v.base_nonce);
        for (i, e) in v.encryptions.iter().enumerate() {
            let mut expected = base_nonce.clone();
            for (n, s) in expected[4..].iter_mut().zip((i as u64).to_be_bytes()) {
                *n ^= s;
            }
            assert_eq!(unhex(&e.nonce), expected, "encryption {i}");
        }
    }
}

#[test]
fn seal_produces_every_vector_ciphertext_in_order() {
    for v in base_vectors() {
        let (_, mut sender) =
            setup_base_sender(&array32(&v.pk_rm), &unhex(&v.info), &unhex(&v.ikm_e))
                .expect("setup sender");
        for (i, e) in v.encryptions.iter().enumerate() {
            let ct = sender.seal(&unhex(&e.aad), &unhex(&e.pt)).expect("seal");
            assert_eq!(ct, unhex(&e.ct), "encryption {i}");
        }
    }
}

#[test]
fn open_recovers_every_vector_plaintext_in_order() {
    for v in base_vectors() {
        let sk_r = RecipientKey::derive(&unhex(&v.ikm_r));
        let mut recipient =
            setup_base_recipient(&unhex(&v.enc), &sk_r, &unhex(&v.info)).expect("setup recipient");
        for (i, e) in v.encryptions.iter().enumerate() {
            let pt = recipient.open(&unhex(&e.aad), &unhex(&e.ct)).expect("open");
            assert_eq!(pt, unhex(&e.pt), "encryption {i}");
        }
    }
}

#[test]
fn exports_match_vector_values_on_both_sides() {
    for v in base_vectors() {
        let info = unhex(&v.info);
        let (enc, sender) =
            setup_base_sender(&array32(&v.pk_rm), &info, &unhex(&v.ikm_e)).expect("setup sender");
        let sk_r = RecipientKey::derive(&unhex(&v.ikm_r));
        let recipient = setup_base_recipient(&enc, &sk_r, &info).expect("setup recipient");
        for x in &v.exports {
            let context = unhex(&x.exporter_context);
            let expected = unhex(&x.exported_value);
            assert_eq!(sender.export(&context, x.len).expect("export"), expected);
            assert_eq!(recipient.export(&context, x.len).expect("export"), expected);
        }
    }
}

/// One sealed message under a fixed recipient, for the negative tests.
struct Sealed {
    sk_r: RecipientKey,
    enc: [u8; N_ENC],
    info: Vec<u8>,
    aad: Vec<u8>,
    ct: Vec<u8>,
}

fn sealed() -> Sealed {
    let sk_r = RecipientKey::derive(b"negative test recipient");
    let info = b"accord hpke test".to_vec();
    let aad = b"header".to_vec();
    let (enc, mut sender) =
        setup_base_sender(&sk_r.public_key(), &info, b"negative test ephemeral")
            .expect("setup sender");
    let ct = sender.seal(&aad, b"attack at dawn").expect("seal");
    let sealed = Sealed {
        sk_r,
        enc,
        info,
        aad,
        ct,
    };
    // The untampered message must open, so each failure below is due to its one change.
    assert_eq!(
        open(&sealed, &sealed.enc, &sealed.aad, &sealed.ct),
        Ok(b"attack at dawn".to_vec())
    );
    sealed
}

fn open(s: &Sealed, enc: &[u8], aad: &[u8], ct: &[u8]) -> Result<Vec<u8>, HpkeError> {
    setup_base_recipient(enc, &s.sk_r, &s.info)?.open(aad, ct)
}

#[test]
fn flipped_ciphertext_bit_fails_to_open() {
    let s = sealed();
    for i in [0, s.ct.len() - 1] {
        let mut ct = s.ct.clone();
        ct[i] ^= 0x01;
        assert_eq!(open(&s, &s.enc, &s.aad, &ct), Err(HpkeError::OpenFailed));
    }
}

#[test]
fn truncated_ciphertext_fails_to_open() {
    let s = sealed();
    assert_eq!(
        open(&s, &s.enc, &s.aad, &s.ct[..s.ct.len() - 1]),
        Err(HpkeError::OpenFailed)
    );
    assert_eq!(open(&s, &s.enc, &s.aad, &[]), Err(HpkeError::OpenFailed));
}

#[test]
fn flipped_aad_bit_fails_to_open() {
    let s = sealed();
    let mut aad = s.aad.clone();
    aad[0] ^= 0x01;
    assert_eq!(open(&s, &s.enc, &aad, &s.ct), Err(HpkeError::OpenFailed));
}

#[test]
fn flipped_enc_bit_fails_to_open() {
    let s = sealed();
    let mut enc = s.enc;
    enc[0] ^= 0x01;
    assert_eq!(open(&s, &enc, &s.aad, &s.ct), Err(HpkeError::OpenFailed));
}

#[test]
fn flipped_enc_high_bit_fails_to_open_although_x25519_ignores_it() {
    // X25519 masks the top bit, so the DH output is unchanged; the KEM still binds the
    // exact enc bytes through kem_context (RFC 9180 §4.1), so the keys differ.
    let s = sealed();
    let mut enc = s.enc;
    enc[31] ^= 0x80;
    assert_eq!(open(&s, &enc, &s.aad, &s.ct), Err(HpkeError::OpenFailed));
}

#[test]
fn wrong_recipient_key_fails_to_open() {
    let s = sealed();
    let other = RecipientKey::derive(b"someone else");
    let mut recipient = setup_base_recipient(&s.enc, &other, &s.info).expect("setup recipient");
    assert_eq!(recipient.open(&s.aad, &s.ct), Err(HpkeError::OpenFailed));
}

#[test]
fn wrong_info_fails_to_open() {
    let s = sealed();
    let mut recipient =
        setup_base_recipient(&s.enc, &s.sk_r, b"another context").expect("setup recipient");
    assert_eq!(recipient.open(&s.aad, &s.ct), Err(HpkeError::OpenFailed));
}

#[test]
fn replayed_ciphertext_fails_to_open_at_the_next_sequence_number() {
    let s = sealed();
    let mut recipient = setup_base_recipient(&s.enc, &s.sk_r, &s.info).expect("setup recipient");
    assert!(recipient.open(&s.aad, &s.ct).is_ok());
    assert_eq!(recipient.open(&s.aad, &s.ct), Err(HpkeError::OpenFailed));
}

#[test]
fn failed_open_does_not_advance_the_sequence_number() {
    let s = sealed();
    let mut recipient = setup_base_recipient(&s.enc, &s.sk_r, &s.info).expect("setup recipient");
    assert_eq!(recipient.open(b"wrong", &s.ct), Err(HpkeError::OpenFailed));
    assert_eq!(
        recipient.open(&s.aad, &s.ct),
        Ok(b"attack at dawn".to_vec())
    );
}

/// Low-order X25519 points, all of which give an all-zero DH output.
const LOW_ORDER_POINTS: [[u8; 32]; 3] = [
    [0; 32],
    {
        let mut one = [0; 32];
        one[0] = 1;
        one
    },
    // A point of order 8.
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
];

#[test]
fn all_zero_enc_is_refused_with_invalid_key() {
    let s = sealed();
    let result = setup_base_recipient(&[0u8; N_ENC], &s.sk_r, &s.info);
    assert_eq!(result.err(), Some(HpkeError::InvalidKey));
}

#[test]
fn low_order_enc_is_refused_with_invalid_key() {
    let s = sealed();
    for point in LOW_ORDER_POINTS {
        let result = setup_base_recipient(&point, &s.sk_r, &s.info);
        assert_eq!(result.err(), Some(HpkeError::InvalidKey), "{point:02x?}");
    }
}

#[test]
fn low_order_recipient_public_key_is_refused_by_the_sender() {
    for point in LOW_ORDER_POINTS {
        let result = setup_base_sender(&point, b"", b"ephemeral");
        assert_eq!(result.err(), Some(HpkeError::InvalidKey), "{point:02x?}");
    }
}

#[test]
fn wrong_length_enc_is_refused_with_invalid_key() {
    let s = sealed();
    for len in [0, N_ENC - 1, N_ENC + 1] {
        let mut enc = s.enc.to_vec();
        enc.resize(len, 0);
        let result = setup_base_recipient(&enc, &s.sk_r, &s.info);
        assert_eq!(result.err(), Some(HpkeError::InvalidKey), "length {len}");
    }
}

#[test]
fn export_longer_than_255_hash_blocks_is_refused() {
    let s = sealed();
    let recipient = setup_base_recipient(&s.enc, &s.sk_r, &s.info).expect("setup recipient");
    assert_eq!(
        recipient.export(b"", 255 * 32).map(|v| v.len()),
        Ok(255 * 32)
    );
    assert_eq!(
        recipient.export(b"", 255 * 32 + 1),
        Err(HpkeError::ExportTooLong)
    );
}

#[test]
fn recipient_key_debug_does_not_contain_the_secret() {
    for v in base_vectors() {
        let sk_r = RecipientKey::derive(&unhex(&v.ikm_r));
        let debug = format!("{sk_r:?} {sk_r:#?}");
        let secret = unhex(&v.sk_rm);
        assert!(!debug.contains(&hex::encode(&secret)), "{debug}");
        assert!(!debug.contains(&hex::encode_upper(&secret)), "{debug}");
        assert!(!debug.contains(&format!("{:?}", &secret[..4])), "{debug}");
        // It does show the public key, which is what someone debugging needs.
        assert!(debug.contains(&v.pk_rm), "{debug}");
    }
}

#[test]
fn context_debug_does_not_contain_key_schedule_secrets() {
    for v in base_vectors() {
        let info = unhex(&v.info);
        let (enc, sender) =
            setup_base_sender(&array32(&v.pk_rm), &info, &unhex(&v.ikm_e)).expect("setup sender");
        let sk_r = RecipientKey::derive(&unhex(&v.ikm_r));
        let recipient = setup_base_recipient(&enc, &sk_r, &info).expect("setup recipient");
        let debug = format!("{sender:?} {sender:#?} {recipient:?} {recipient:#?}");
        for secret in [&v.key, &v.base_nonce, &v.exporter_secret] {
            let bytes = unhex(secret);
            assert!(!debug.contains(secret.as_str()), "{debug}");
            assert!(!debug.contains(&hex::encode_upper(&bytes)), "{debug}");
            assert!(!debug.contains(&format!("{:?}", &bytes[..4])), "{debug}");
        }
    }
}
