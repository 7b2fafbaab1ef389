//! Known-answer tests for `accord_proto::note` against published vectors.
//!
//! - C2SP signed-note v1.0.0, section "Verifier keys / Example"
//!   (https://github.com/C2SP/C2SP/blob/main/signed-note.md): a verifier key and the note
//!   it verifies.
//! - golang.org/x/mod/sumdb/note (https://github.com/golang/mod, `sumdb/note/note.go` doc
//!   comment and `note_test.go`): the PeterNeumann signer key, verifier key and signed note
//!   (Ed25519 is deterministic, so signing must reproduce the note byte for byte), the
//!   EnochRoot key and signature, and the malformed notes of `TestOpen`.
//! - transparency-dev/formats (https://github.com/transparency-dev/formats,
//!   `note/note_cosigv1_test.go`): verifier keys of types 0x01 and 0x04.
//! - C2SP tlog-cosignature (https://github.com/C2SP/C2SP/blob/main/tlog-cosignature.md): the
//!   example cosignature line carries the timestamp of the example signed message.
//! - An Accord checkpoint cosigned by a witness, computed by an independent implementation
//!   of the three specs (Python, pyca/cryptography), reproduced below, so the layout is
//!   checked by code that shares nothing with the crate:
//!
//! ```python
//! import base64, hashlib
//! from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
//! from cryptography.hazmat.primitives import serialization as s
//! def pub(sk): return sk.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
//! def kid(name, t, pk): return hashlib.sha256(name.encode() + b"\n" + bytes([t]) + pk).digest()[:4]
//! b64 = lambda b: base64.b64encode(b).decode()
//! log_name, wit_name = "accord.vn/hanoi", "accord.th/bangkok"
//! log_sk = Ed25519PrivateKey.from_private_bytes(bytes([0x11]) * 32)
//! wit_sk = Ed25519PrivateKey.from_private_bytes(bytes([0x22]) * 32)
//! root = hashlib.sha256(b"").digest()  # any 32 bytes
//! body = f"{log_name}\n20852163\n{b64(root)}\n"
//! lk, wk = kid(log_name, 1, pub(log_sk)), kid(wit_name, 4, pub(wit_sk))
//! print("log vkey:", f"{log_name}+{lk.hex()}+{b64(bytes([1]) + pub(log_sk))}")
//! print("witness vkey:", f"{wit_name}+{wk.hex()}+{b64(bytes([4]) + pub(wit_sk))}")
//! ts = 1679315147
//! msg = f"cosignature/v1\ntime {ts}\n".encode() + body.encode()
//! note = (body + "\n" + f"\u2014 {log_name} {b64(lk + log_sk.sign(body.encode()))}\n"
//!         + f"\u2014 {wit_name} {b64(wk + ts.to_bytes(8, 'big') + wit_sk.sign(msg))}\n")
//! print(repr(note))
//! ```

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use accord_proto::crypto::{sha256, SigningKey};
use accord_proto::note::{
    add_signatures, open, Checkpoint, CosignatureVerifier, Cosigner, NoteError, NoteSigner,
    NoteVerifier, MAX_SIGNATURES,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

// C2SP signed-note, "Example".
const C2SP_VKEY: &str = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
const C2SP_NOTE: &str = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";

// golang.org/x/mod/sumdb/note.
const PETER_SKEY: &str =
    "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                       then you don't know what your problem is.\n";
const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

// transparency-dev/formats note_cosigv1_test.go, TestCoSigV1NewVerifier.
const TD_ED25519_VKEY: &str = "TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6";
const TD_COSIG_VKEY: &str = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2";

// The independent Python implementation above.
const ACCORD_LOG_VKEY: &str =
    "accord.vn/hanoi+6aed05b6+AdBKsjJ0K7SrOhNovUYV5ObQIkq3GgFrr4UgozLJd4c3";
const ACCORD_WITNESS_VKEY: &str =
    "accord.th/bangkok+263a5c38+BKCapfR6Z1mAL/lV+NwtKhSlyZ0jvpf4ZBJ/+Tg0VaTw";
const ACCORD_BODY: &str =
    "accord.vn/hanoi\n20852163\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n";
const ACCORD_LOG_LINE: &str = "\u{2014} accord.vn/hanoi au0FtjJfYwItzvBmtWgSiNL9v8LETPMJ2bLg/kwOXU+JUr3YfThEcOZnwiWi3oSHCSEDAwG8dw/6fyAAkNy1BNvLwQ8=\n";
const ACCORD_WITNESS_LINE: &str = "\u{2014} accord.th/bangkok JjpcOAAAAABkGFDLuWQD40bsZefoS3Et+4nMvsUK90OLPai31OT18WpqLkd3TgjrJwX7jcUHRQwRCyn2NgNnteE4pDNV1WRncy4DAw==\n";
const ACCORD_TS: u64 = 1_679_315_147;

fn peter_signer() -> NoteSigner {
    // "PRIVATE+KEY+<name>+<hex key id>+base64(0x01 ‖ Ed25519 seed)".
    let rest = PETER_SKEY.strip_prefix("PRIVATE+KEY+").unwrap();
    let mut parts = rest.splitn(3, '+');
    let (name, id, material) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let material = B64.decode(material).unwrap();
    assert_eq!(material[0], 0x01);
    let seed: [u8; 32] = material[1..].try_into().unwrap();
    let s = NoteSigner::new(name, SigningKey::from_seed("peter", seed).unwrap()).unwrap();
    assert_eq!(hex::encode(s.key_id()), id);
    s
}

#[test]
fn c2sp_example_verifies() {
    let v: NoteVerifier = C2SP_VKEY.parse().unwrap();
    assert_eq!(v.name, "example.com/foo");
    assert_eq!(v.key_id, [0x53, 0x0d, 0x90, 0x3a]);
    assert_eq!(v.to_string(), C2SP_VKEY);
    let opened = open(C2SP_NOTE, std::slice::from_ref(&v)).unwrap();
    assert_eq!(opened.body, "This is an example message.\n");
    assert_eq!(opened.verified_by, vec!["example.com/foo".to_string()]);
    let tampered = C2SP_NOTE.replace("example message", "example massage");
    assert_eq!(open(&tampered, &[v]), Err(NoteError::BadSignature));
}

#[test]
fn go_signer_reproduces_the_reference_note() {
    let s = peter_signer();
    assert_eq!(s.key_id(), [0xc7, 0x4f, 0x20, 0xa3]);
    assert_eq!(s.verifier_key(), PETER_VKEY);
    assert_eq!(s.sign(GO_TEXT).unwrap(), format!("{GO_TEXT}\n{PETER_SIG}"));
}

#[test]
fn go_open_vectors() {
    let peter: NoteVerifier = PETER_VKEY.parse().unwrap();
    let enoch: NoteVerifier = ENOCH_VKEY.parse().unwrap();
    assert_eq!(enoch.key_id, [0xaf, 0x0c, 0xfe, 0x78]);
    let both = format!("{GO_TEXT}\n{PETER_SIG}{ENOCH_SIG}");

    // One signature verified, one unknown and ignored.
    let n = open(&both, std::slice::from_ref(&peter)).unwrap();
    assert_eq!(n.body, GO_TEXT);
    assert_eq!(n.verified_by, vec!["PeterNeumann".to_string()]);
    assert_eq!(n.signature_lines, vec![PETER_SIG, ENOCH_SIG]);
    // Both verified.
    let n = open(&both, &[peter.clone(), enoch.clone()]).unwrap();
    assert_eq!(n.verified_by, vec!["PeterNeumann", "EnochRoot"]);
    // Neither known.
    assert_eq!(open(&both, &[]), Err(NoteError::NoValidSignature));
    // Too many signatures (the Go test uses 101 against its limit of 100).
    let many = format!("{GO_TEXT}\n{}", PETER_SIG.repeat(MAX_SIGNATURES + 1));
    assert_eq!(
        open(&many, std::slice::from_ref(&peter)),
        Err(NoteError::TooManySignatures)
    );
    assert_eq!(open(&many, &[]), Err(NoteError::TooManySignatures));
    // Invalid signature by a known key.
    let bad = format!("{GO_TEXT}\n{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]);
    assert_eq!(
        open(&bad, std::slice::from_ref(&peter)),
        Err(NoteError::BadSignature)
    );
    // A corrupt signature by an unknown key is ignored.
    let corrupt_enoch = format!("{}ABCD{}", &ENOCH_SIG[..60], &ENOCH_SIG[60..]);
    let n = open(
        &format!("{GO_TEXT}\n{PETER_SIG}{PETER_SIG}{ENOCH_SIG}{corrupt_enoch}"),
        std::slice::from_ref(&peter),
    )
    .unwrap();
    assert_eq!(n.verified_by, vec!["PeterNeumann"]);
    assert_eq!(n.signature_lines.len(), 4);

    // Invalid encoded message syntax (TestOpen's badMsgs).
    let bad_msgs = [
        GO_TEXT.to_string(),
        format!("{GO_TEXT}\n"),
        format!("{GO_TEXT}\n{}", &PETER_SIG[..PETER_SIG.len() - 1]),
        format!("\u{1}{GO_TEXT}\n{PETER_SIG}"),
        format!("{GO_TEXT}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="),
        format!("{GO_TEXT}\n{PETER_SIG}Unexpected line.\n"),
    ];
    for msg in &bad_msgs {
        assert!(
            matches!(
                open(msg, std::slice::from_ref(&peter)),
                Err(NoteError::Malformed(_))
            ),
            "{msg:?}"
        );
    }
    // (Go's "\xff" case is invalid UTF-8, which a &str cannot hold.)
}

#[test]
fn go_verifier_key_manglings_are_refused() {
    // TestNewVerifier: every proper substring and every single-byte increment fails.
    let b = PETER_VKEY.as_bytes();
    for i in 0..=b.len() {
        for j in i + 1..=b.len() {
            if i != 0 || j != b.len() {
                let k = &PETER_VKEY[i..j];
                assert!(k.parse::<NoteVerifier>().is_err(), "{k}");
            }
        }
    }
    for i in 0..b.len() {
        let mut m = b.to_vec();
        m[i] += 1;
        let k = String::from_utf8(m).unwrap();
        assert!(k.parse::<NoteVerifier>().is_err(), "{k}");
    }
    // Wrong length key and unknown algorithm, each with an adjusted key hash.
    assert!(matches!(
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
            .parse::<NoteVerifier>(),
        Err(NoteError::Malformed(_))
    ));
    assert_eq!(
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
            .parse::<NoteVerifier>(),
        Err(NoteError::UnsupportedType(0x65))
    );
}

#[test]
fn transparency_dev_verifier_keys() {
    // Base64 material that itself contains '+'.
    let v: NoteVerifier = TD_ED25519_VKEY.parse().unwrap();
    assert_eq!(v.name, "TEST");
    assert_eq!(v.to_string(), TD_ED25519_VKEY);
    // A type-0x04 (cosignature/v1) key.
    let c: CosignatureVerifier = TD_COSIG_VKEY.parse().unwrap();
    assert_eq!(c.name, "remora.n621.de");
    assert_eq!(c.key_id, [0xda, 0x77, 0xad, 0xe7]);
    assert_eq!(c.to_string(), TD_COSIG_VKEY);
    assert_eq!(
        CosignatureVerifier::from_public_key("remora.n621.de", c.public_key).unwrap(),
        c
    );
    for bad in [
        "bananas.sigstore.dev+12344556",
        "rekor.sigstore.dev+12345678+THIS_IS_NOT_BASE64!",
        "rekor.sigstore.dev+12345678+AwEB",
    ] {
        assert!(bad.parse::<NoteVerifier>().is_err(), "{bad}");
        assert!(bad.parse::<CosignatureVerifier>().is_err(), "{bad}");
    }
}

#[test]
fn c2sp_cosignature_example_layout() {
    // tlog-cosignature's example line: key ID ‖ u64be(1679315147) ‖ 64-byte signature,
    // the timestamp of the spec's example signed message ("time 1679315147").
    let b64 = "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==";
    let raw = B64.decode(b64).unwrap();
    assert_eq!(raw.len(), 4 + 8 + 64);
    assert_eq!(
        u64::from_be_bytes(raw[4..12].try_into().unwrap()),
        1_679_315_147
    );
    // Our own cosignature at that time has the same layout and timestamp bytes.
    let witness = Cosigner::new(
        "witness.example.com/w1",
        SigningKey::from_seed("w", [5; 32]).unwrap(),
    )
    .unwrap();
    let body =
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
    let line = witness.cosign(body, 1_679_315_147).unwrap();
    let ours = B64
        .decode(line.trim_end().rsplit(' ').next().unwrap())
        .unwrap();
    assert_eq!(ours.len(), raw.len());
    assert_eq!(ours[4..12], raw[4..12]);
}

#[test]
fn accord_checkpoint_known_answer() {
    let log = NoteSigner::new(
        "accord.vn/hanoi",
        SigningKey::from_seed("log", [0x11; 32]).unwrap(),
    )
    .unwrap();
    let witness = Cosigner::new(
        "accord.th/bangkok",
        SigningKey::from_seed("w", [0x22; 32]).unwrap(),
    )
    .unwrap();
    assert_eq!(log.verifier_key(), ACCORD_LOG_VKEY);
    assert_eq!(witness.verifier().to_string(), ACCORD_WITNESS_VKEY);

    let cp = Checkpoint {
        origin: "accord.vn/hanoi".into(),
        size: 20_852_163,
        root: sha256(&[b""]),
        extensions: vec![],
    };
    assert_eq!(cp.to_body(), ACCORD_BODY);
    assert_eq!(Checkpoint::parse(ACCORD_BODY).unwrap(), cp);

    let signed = log.sign(ACCORD_BODY).unwrap();
    assert_eq!(signed, format!("{ACCORD_BODY}\n{ACCORD_LOG_LINE}"));
    let line = witness.cosign(ACCORD_BODY, ACCORD_TS).unwrap();
    assert_eq!(line, ACCORD_WITNESS_LINE);
    let cosigned = add_signatures(&signed, &[line]).unwrap();
    assert_eq!(
        cosigned,
        format!("{ACCORD_BODY}\n{ACCORD_LOG_LINE}{ACCORD_WITNESS_LINE}")
    );

    // A verifier holding only the published key strings.
    let log_v: NoteVerifier = ACCORD_LOG_VKEY.parse().unwrap();
    let wit_v: CosignatureVerifier = ACCORD_WITNESS_VKEY.parse().unwrap();
    let opened = open(&cosigned, &[log_v]).unwrap();
    assert_eq!(opened.verified_by, vec!["accord.vn/hanoi"]);
    assert_eq!(Checkpoint::parse(&opened.body).unwrap(), cp);
    assert_eq!(
        wit_v.verify_line(&opened.body, &opened.signature_lines[1]),
        Ok(ACCORD_TS)
    );
    assert_eq!(
        wit_v.verify_line(&opened.body, &opened.signature_lines[0]),
        Err(NoteError::UnknownKey)
    );
    assert_eq!(wit_v.verify_opened(&opened), Ok(ACCORD_TS));
}
