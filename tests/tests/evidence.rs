//! Evidence bundles from the real gateways, verified offline with the trust roots alone.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use accord_client::org::SendOptions;
use accord_proto::pb;
use accord_tests::{alert, fetch_n, trusted_directories, verified_evidence, TestNet};
use prost::Message as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_messages_evidence_verifies_offline_from_either_side_without_plaintext() {
    let net = TestNet::builder()
        .country("vn", "hanoi", &["c02", "inspectorate:auditor"])
        .country("kh", "phnom-penh", &["ahtd", "inspectorate:auditor"])
        .country("la", "vientiane", &["dcp"])
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let secret = "Bavet casino, room 12";
    let sent = c02
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert(secret),
            &SendOptions::new("E1"),
        )
        .await
        .unwrap();
    let got = fetch_n(&mut ahtd, 1).await.unwrap();
    ahtd.ack(&got[0]).await.unwrap();

    for cc in ["vn", "kh"] {
        let auditor = net.client(cc, "inspectorate").await.unwrap();
        let bytes = verified_evidence(&net, &auditor, &sent.id).await.unwrap();
        let bundle = pb::EvidenceBundle::decode(bytes.as_slice()).unwrap();
        let stages: Vec<i32> = bundle
            .receipts
            .iter()
            .map(|r| pb::ReceiptBody::decode(r.body.as_slice()).unwrap().stage)
            .collect();
        assert!(
            stages.contains(&(pb::Stage::Accepted as i32)),
            "{cc}: {stages:?}"
        );
        assert!(
            stages.contains(&(pb::Stage::Received as i32)),
            "{cc}: {stages:?}"
        );
        let gateways: std::collections::HashSet<_> =
            bundle.events.iter().map(|e| e.gateway.clone()).collect();
        assert_eq!(gateways.len(), 2, "{cc}: events from both gateways' logs");
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "{cc}: plaintext in the bundle"
        );
        // The bundle checks against the trust roots only: a different trust fails it.
        let mut wrong = trusted_directories(&net).unwrap();
        wrong.iter_mut().for_each(|d| d.version += 1);
        assert!(!accord_proto::evidence::verify_bundle(&bytes, &wrong).ok());
    }
    net.shutdown().await;
}
