//! Signed directories: pinned country keys decide what is trusted, only newer versions
//! replace older ones, and peers exchange them over the peer link.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use accord_client::org::OrgClient;
use accord_proto::crypto::SigningKey;
use accord_proto::pb;
use accord_tests::{now_ms, TestNet};

async fn net() -> TestNet {
    accord_tests::vn_and_kh().start().await.unwrap()
}

fn plain(net: &TestNet, cc: &str) -> pb::Directory {
    serde_json::from_slice(
        &std::fs::read(net.root().join(format!("pki/{cc}/directory.json"))).unwrap(),
    )
    .unwrap()
}

fn publish(net: &TestNet, cc: &str, dir: &pb::Directory, key: &SigningKey) {
    let signed = accord_proto::directory::sign(dir, key);
    std::fs::write(
        net.root().join(format!("pki/{cc}/directory.signed.json")),
        serde_json::to_vec(&signed).unwrap(),
    )
    .unwrap();
}

fn directory_key(net: &TestNet, cc: &str) -> SigningKey {
    accord_gateway::server::load_key_file(&net.root().join(format!("pki/{cc}/directory-key.json")))
        .unwrap()
        .signing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_refuses_to_start_with_a_directory_not_signed_by_its_countrys_key() {
    let mut net = net().await;
    net.stop_gateway("vn").await.unwrap();
    let rogue = SigningKey::generate("vn-directory-1").unwrap();
    publish(&net, "vn", &plain(&net, "vn"), &rogue);
    let err = net.start_gateway("vn").await.unwrap_err();
    assert!(
        format!("{err:#}").contains("not signed by its country's directory key"),
        "{err:#}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusts_directories_only_under_its_pinned_keys() {
    let net = net().await;
    // Pins that name another key for KH: the gateway's KH directory must be refused.
    let mut trust: Vec<pb::DirectoryTrust> = serde_json::from_slice(
        &std::fs::read(net.root().join("pki/directory-trust.json")).unwrap(),
    )
    .unwrap();
    for t in trust.iter_mut().filter(|t| t.country == "kh") {
        t.keys[0].public_key = SigningKey::generate("x").unwrap().public_key().to_vec();
    }
    let pins = net.root().join("wrong-trust.json");
    std::fs::write(&pins, serde_json::to_vec(&trust).unwrap()).unwrap();
    let mut gw = net.gateway_address("vn").unwrap();
    gw.trust = pins;
    let err = OrgClient::connect(&net.org_dir("vn", "c02").unwrap(), &gw)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("directory from the gateway"),
        "{err}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_directory_reaches_the_peer_without_a_restart_and_an_older_one_is_refused() {
    let mut net = net().await;
    let key = directory_key(&net, "kh");
    let mut v2 = plain(&net, "kh");
    v2.version = 2;
    v2.orgs[0].name = "Anti-Human-Trafficking Department".into();
    net.stop_gateway("kh").await.unwrap();
    publish(&net, "kh", &v2, &key);
    net.start_gateway("kh").await.unwrap();
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    let kh_version = |p: &accord_gateway::pipeline::Pipeline| {
        p.directories()
            .to_wire()
            .into_iter()
            .find(|d| d.country == "kh")
            .unwrap()
            .version
    };
    for _ in 0..100 {
        if kh_version(&vn) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kh_version(&vn),
        2,
        "VN took KH's new directory over the peer link"
    );
    // The change is in VN's log.
    let size = vn.store.log_size().unwrap();
    let changed = (0..size).any(|i| {
        let e = vn.store.log_entry(i).unwrap().unwrap();
        prost::Message::decode(e.as_slice())
            .is_ok_and(|e: pb::LogEntry| e.event == pb::LogEvent::DirectoryChange as i32)
    });
    assert!(changed, "no DIRECTORY_CHANGE entry");
    // A VN client now sees version 2 from its own gateway.
    let c02 = net.client("vn", "c02").await.unwrap();
    assert!(c02
        .directories()
        .to_wire()
        .iter()
        .any(|d| d.country == "kh" && d.version == 2));

    // KH rolls back to version 1: VN refuses it and keeps version 2.
    let mut v1 = plain(&net, "kh");
    v1.version = 1;
    net.stop_gateway("kh").await.unwrap();
    publish(&net, "kh", &v1, &key);
    net.start_gateway("kh").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        kh_version(&vn),
        2,
        "an older directory must not replace a newer one"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_through_new_directories_and_envelopes_in_flight_under_the_old_keys_still_open()
{
    use accord_client::org::SendOptions;
    use accord_proto::crypto::hpke::RecipientKey;
    let mut net = net().await;
    net.stop_gateway("kh").await.unwrap();
    let ahtd_id = net.org_id("kh", "ahtd").unwrap();
    let old = {
        let mut c02 = net.client("vn", "c02").await.unwrap();
        c02.send(
            &ahtd_id,
            &accord_tests::alert("sealed before the rotation"),
            &SendOptions::new("K1"),
        )
        .await
        .unwrap()
    };
    // A key is valid up to, not including, its `not_after`: an envelope sealed in the
    // millisecond a key retires is refused. A submit takes under a millisecond, so the
    // rotation is dated after the last millisecond `old` could have been sealed in.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let rotation = now_ms();

    // VN: C02 gets a new signing key; the old one is retired now (envelopes it signed
    // before stay verifiable by its validity at signing time).
    let c02_dir = net.org_dir("vn", "c02").unwrap();
    let mut c02_keys = accord_gateway::server::load_key_file(&c02_dir.join("keys.json")).unwrap();
    let s2 = SigningKey::generate("vn-c02-sig-2").unwrap();
    let mut vn = plain(&net, "vn");
    vn.version = 2;
    let org = vn.orgs.iter_mut().find(|o| o.id.ends_with("/c02")).unwrap();
    org.signing_keys[0].not_after_ms = rotation;
    org.signing_keys.push(pb::PublicKey {
        key_id: s2.key_id().into(),
        public_key: s2.public_key().to_vec(),
        not_before_ms: rotation - 1,
        not_after_ms: rotation + 86_400_000,
    });
    let retired = std::mem::replace(&mut c02_keys.signing, s2);
    accord_certs::write_file(
        &c02_dir.join("keys.json"),
        c02_keys.to_json().as_bytes(),
        true,
    )
    .unwrap();

    // KH: AHTD gets a new encryption key; the old one stays in its key file.
    let ahtd_dir = net.org_dir("kh", "ahtd").unwrap();
    let mut ahtd_keys = accord_gateway::server::load_key_file(&ahtd_dir.join("keys.json")).unwrap();
    let e2 = RecipientKey::from_bytes(accord_proto::crypto::random().unwrap());
    let mut kh = plain(&net, "kh");
    kh.version = 2;
    kh.orgs[0].encryption_keys.push(pb::PublicKey {
        key_id: "kh-ahtd-enc-2".into(),
        public_key: e2.public_key().to_vec(),
        not_before_ms: rotation - 1,
        not_after_ms: rotation + 86_400_000,
    });
    let e1 = ahtd_keys
        .encryption
        .replace(("kh-ahtd-enc-2".into(), e2))
        .unwrap();
    ahtd_keys.previous_encryption.push(e1);
    accord_certs::write_file(
        &ahtd_dir.join("keys.json"),
        ahtd_keys.to_json().as_bytes(),
        true,
    )
    .unwrap();

    net.stop_gateway("vn").await.unwrap();
    publish(&net, "vn", &vn, &directory_key(&net, "vn"));
    publish(&net, "kh", &kh, &directory_key(&net, "kh"));
    net.start_gateway("vn").await.unwrap();
    net.start_gateway("kh").await.unwrap();

    let mut c02 = net.client("vn", "c02").await.unwrap();
    let new = c02
        .send(
            &ahtd_id,
            &accord_tests::alert("sealed after the rotation"),
            &SendOptions::new("K1"),
        )
        .await
        .unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let got = accord_tests::fetch_n(&mut ahtd, 2).await.unwrap();
    let by_id = |id| got.iter().find(|o| o.envelope.id() == id).unwrap();
    assert_eq!(
        by_id(old.id).envelope.header().recipient_key_id,
        "kh-ahtd-enc-1"
    );
    assert_eq!(
        by_id(old.id).envelope.header().sender_key_id,
        "vn-c02-sig-1"
    );
    assert_eq!(
        by_id(new.id).envelope.header().recipient_key_id,
        "kh-ahtd-enc-2"
    );
    assert_eq!(
        by_id(new.id).envelope.header().sender_key_id,
        "vn-c02-sig-2"
    );

    // The retired key cannot sign anything new.
    let (header, pk) = accord_tests::raw_header(&c02, &ahtd_id, pb::Kind::Alert, "K1").unwrap();
    let stale =
        accord_proto::envelope::seal(header, &accord_tests::alert("late"), &pk, &retired).unwrap();
    let err = c02
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(stale.to_wire()),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("UNKNOWN_SENDER"), "{err}");
    net.shutdown().await;
}
