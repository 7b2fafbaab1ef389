//! Hot reload: the policy and the directory files take effect without a restart (CRLs are
//! covered in revocation.rs); a broken file leaves what is in force; open connections stay.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use accord_client::org::{ClientError, SendOptions};
use accord_proto::pb;
use accord_tests::{alert, TestNet};

async fn net() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap()
}

/// Rewrites `path` so its modification stamp changes even within one clock tick.
fn rewrite(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_applies_to_the_next_envelope_without_a_restart_and_a_broken_one_is_ignored(
) {
    let net = net().await;
    // One client connection for the whole test: reloads drop nothing.
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let ahtd = net.org_id("kh", "ahtd").unwrap();
    c02.send(&ahtd, &alert("before"), &SendOptions::new("R1"))
        .await
        .unwrap();

    let policy = net.root().join("vn-policy.toml");
    rewrite(&policy, "allow = []\n");
    let mut refused = false;
    for _ in 0..60 {
        match c02
            .send(&ahtd, &alert("after"), &SendOptions::new("R1"))
            .await
        {
            Err(ClientError::Gateway(s)) if s.code() == tonic::Code::PermissionDenied => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(refused, "the emptied policy never took effect");

    // A policy that does not parse is refused; the empty one stays in force.
    rewrite(&policy, "allow = [[[\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = c02
        .send(&ahtd, &alert("still"), &SendOptions::new("R1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Gateway(ref s) if s.code() == tonic::Code::PermissionDenied),
        "{err}"
    );

    // Back to the shipped policy: allowed again, on the same connection.
    rewrite(&policy, accord_client::localnet::DEFAULT_POLICY);
    let mut allowed = false;
    for _ in 0..60 {
        if c02
            .send(&ahtd, &alert("again"), &SendOptions::new("R1"))
            .await
            .is_ok()
        {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(allowed);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_own_directory_file_is_taken_without_a_restart_and_reaches_the_peer() {
    let net = net().await;
    let dir: pb::Directory =
        serde_json::from_slice(&std::fs::read(net.root().join("pki/vn/directory.json")).unwrap())
            .unwrap();
    let key = accord_gateway::server::load_key_file(&net.root().join("pki/vn/directory-key.json"))
        .unwrap()
        .signing;
    let mut v2 = dir;
    v2.version = 2;
    let signed = accord_proto::directory::sign(&v2, &key);
    rewrite(
        &net.root().join("pki/vn/directory.signed.json"),
        &serde_json::to_string(&signed).unwrap(),
    );
    let version = |cc: &str| {
        net.gateway(cc)
            .unwrap()
            .pipeline
            .directories()
            .to_wire()
            .into_iter()
            .find(|d| d.country == "vn")
            .unwrap()
            .version
    };
    for _ in 0..100 {
        if version("vn") == 2 && version("kh") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(version("vn"), 2, "VN reloaded its own directory file");
    assert_eq!(version("kh"), 2, "and KH took it over the peer link");
    net.shutdown().await;
}
