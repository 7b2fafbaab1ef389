//! RFC 6962 / RFC 9162 inclusion and consistency proof probes from github.com/transparency-dev/merkle
//! (commit 417fb0c, Apache-2.0; see `vectors/MERKLE-README.md`): every `wantErr: true` case must be
//! rejected by `accord_proto::merkle`'s verifiers and every other case accepted.
//!
//! The probes carry byte strings; our verifiers take `[u8; 32]` hashes. A leaf hash that is not 32
//! bytes long cannot be passed at all: that case is rejected at the type boundary, as the Go
//! verifier rejects it with "leafHash has unexpected size". Roots and proof elements of another
//! length (the probes' "WrongRoot", "don't care" and empty garbage values) are only ever compared
//! or hashed as opaque bytes, so they are passed as a stand-in: SHA-256 of a test-only prefix and
//! the bytes, which keeps equal values equal and can never equal a real tree hash.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::path::{Path, PathBuf};

use accord_proto::crypto::sha256;
use accord_proto::merkle::{verify_consistency, verify_inclusion, Hash};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;

const PROBES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/transparency-dev-merkle/testdata"
);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InclusionProbe {
    leaf_idx: u64,
    tree_size: u64,
    root: String,
    leaf_hash: String,
    proof: Option<Vec<String>>,
    desc: String,
    want_err: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsistencyProbe {
    size1: u64,
    size2: u64,
    root1: String,
    root2: String,
    proof: Option<Vec<String>>,
    desc: String,
    want_err: bool,
}

/// Every `.json` file under `dir`, recursively, sorted.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(json_files(&path));
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn bytes(b64: &str) -> Vec<u8> {
    STANDARD.decode(b64).unwrap()
}

/// A 32-byte value as is; anything else as its stand-in (see the module docs).
fn opaque(b64: &str) -> Hash {
    let b = bytes(b64);
    Hash::try_from(b.as_slice())
        .unwrap_or_else(|_| sha256(&[b"accord merkle_vectors: not 32 bytes\0", &b]))
}

fn proof(elements: &Option<Vec<String>>) -> Vec<Hash> {
    elements.iter().flatten().map(|e| opaque(e)).collect()
}

/// Checks one outcome; returns a description of the failure, if any.
fn check(path: &Path, desc: &str, want_err: bool, rejected: Option<String>) -> Option<String> {
    match (want_err, rejected) {
        (true, Some(_)) | (false, None) => None,
        (true, None) => Some(format!("{}: {desc}: accepted", path.display())),
        (false, Some(e)) => Some(format!("{}: {desc}: rejected: {e}", path.display())),
    }
}

#[test]
fn transparency_dev_probes() {
    let (mut checked, mut rejected_at_boundary) = (0usize, 0usize);
    let mut failures = Vec::new();

    for path in json_files(&Path::new(PROBES).join("inclusion")) {
        let p: InclusionProbe = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let outcome = match Hash::try_from(bytes(&p.leaf_hash).as_slice()) {
            Err(_) => {
                rejected_at_boundary += 1;
                Some("leaf hash is not 32 bytes".to_owned())
            }
            Ok(leaf) => verify_inclusion(
                &leaf,
                p.leaf_idx,
                p.tree_size,
                &proof(&p.proof),
                &opaque(&p.root),
            )
            .err()
            .map(|e| e.to_string()),
        };
        failures.extend(check(&path, &p.desc, p.want_err, outcome));
        checked += 1;
    }
    let inclusion = checked;

    for path in json_files(&Path::new(PROBES).join("consistency")) {
        let p: ConsistencyProbe =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let outcome = verify_consistency(
            p.size1,
            p.size2,
            &opaque(&p.root1),
            &opaque(&p.root2),
            &proof(&p.proof),
        )
        .err()
        .map(|e| e.to_string());
        failures.extend(check(&path, &p.desc, p.want_err, outcome));
        checked += 1;
    }

    println!(
        "transparency-dev/merkle probes: {checked} checked ({inclusion} inclusion, {} consistency; \
         {rejected_at_boundary} rejected at the [u8; 32] boundary)",
        checked - inclusion
    );
    assert!(
        inclusion > 0 && checked > inclusion,
        "no probes found under {PROBES}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
