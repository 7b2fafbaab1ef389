//! The `accord` binary as an operator or auditor runs it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use accord_client::localnet::LocalNet;
use accord_client::org::SendOptions;

fn accord() -> Command {
    Command::new(env!("CARGO_BIN_EXE_accord"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accord_verify_prints_each_check_and_fails_on_a_tampered_bundle() {
    let net = LocalNet::builder()
        .country("vn", "hanoi", &["c02", "inspectorate:auditor"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let body = accord_client::demo::parse_form(accord_client::demo::EXAMPLE_FORMS[3].1).unwrap();
    let sent = c02
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &body,
            &SendOptions::new("CLI-1"),
        )
        .await
        .unwrap();
    for _ in 0..100 {
        if let Some(o) = ahtd.fetch(1).await.unwrap().pop() {
            ahtd.ack(&o).await.unwrap();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Let a cosigned checkpoint cover the events, then fetch through the CLI.
    let gw = net.gateway_address("vn").unwrap();
    let org = net.org_dir("vn", "inspectorate").unwrap();
    let out = net.root().join("bundle.bin");
    let trust = [
        net.root().join("pki/vn/directory.json"),
        net.root().join("pki/kh/directory.json"),
    ];
    let mut verified = None;
    for _ in 0..100 {
        let fetched = accord()
            .args(["audit-evidence", "--org"])
            .arg(&org)
            .args([
                "--gateway",
                &gw.addr.to_string(),
                "--gateway-id",
                &gw.id.to_string(),
                "--root",
            ])
            .arg(&gw.root)
            .arg("--trust")
            .arg(&gw.trust)
            .arg(sent.id.to_string())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            fetched.status.success(),
            "{}",
            String::from_utf8_lossy(&fetched.stderr)
        );
        let verify = accord()
            .arg("verify")
            .arg(&out)
            .arg("--trust")
            .arg(&trust[0])
            .arg("--trust")
            .arg(&trust[1])
            .output()
            .unwrap();
        if verify.status.success() {
            verified = Some(String::from_utf8(verify.stdout).unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let report = verified.expect("the bundle never verified");
    assert!(
        report.lines().count() > 10 && report.contains("bundle verified"),
        "{report}"
    );

    // One flipped byte: exit status 1, and the report says which check failed.
    let mut bytes = std::fs::read(&out).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&out, &bytes).unwrap();
    let verify = accord()
        .arg("verify")
        .arg(&out)
        .arg("--trust")
        .arg(&trust[0])
        .arg("--trust")
        .arg(&trust[1])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("FAIL"));
    net.shutdown().await;
}

#[test]
fn accord_certs_writes_a_dev_pki_and_a_bad_country_spec_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ok = accord()
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--country", "vn:hanoi:c02,tayninh-police:hotline"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(dir.path().join("vn/orgs/tayninh-police/keys.json").exists());
    let bad = accord()
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--country", "vietnam"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cc:gateway:org1,org2"));
}
