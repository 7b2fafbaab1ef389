//! The role policy through real gateways: enforced at submit, and again on arrival from a
//! peer whose own policy let the envelope through. (The full role × kind × direction table
//! is a unit test of `accord_gateway::policy`.)

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use accord_client::org::{furthest_stage, ClientError, SendOptions};
use accord_proto::pb::{self, Stage};
use accord_tests::{alert, fetch_n, TestNet};
use prost::Message as _;

const ORGS_VN: &[&str] = &["c02", "tayninh-police:hotline:tay-ninh"];
const ORGS_KH: &[&str] = &[
    "ahtd",
    "svayrieng-police:hotline:svay-rieng",
    "kampot-police:hotline:kampot",
];

fn suspect_notice() -> pb::Body {
    accord_client::demo::parse_form(accord_client::demo::EXAMPLE_FORMS[0].1).unwrap()
}

fn denied(err: &ClientError) -> bool {
    matches!(err, ClientError::Gateway(s) if s.code() == tonic::Code::PermissionDenied && s.message().contains("POLICY"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotlines_reach_their_paired_province_only_and_refusals_are_logged() {
    let net = TestNet::builder()
        .country("vn", "hanoi", ORGS_VN)
        .country("kh", "phnom-penh", ORGS_KH)
        .start()
        .await
        .unwrap();
    let mut tay_ninh = net.client("vn", "tayninh-police").await.unwrap();
    let mut svay_rieng = net.client("kh", "svayrieng-police").await.unwrap();
    // Paired provinces: an alert goes through and arrives.
    let ok = tay_ninh
        .send(
            &net.org_id("kh", "svayrieng-police").unwrap(),
            &alert("crossing now"),
            &SendOptions::new("H1"),
        )
        .await
        .unwrap();
    assert_eq!(
        fetch_n(&mut svay_rieng, 1).await.unwrap()[0].envelope.id(),
        ok.id
    );
    // Unpaired province, and a kind hotlines may not send: PERMISSION_DENIED (POLICY).
    let err = tay_ninh
        .send(
            &net.org_id("kh", "kampot-police").unwrap(),
            &alert("x"),
            &SendOptions::new("H1"),
        )
        .await
        .unwrap_err();
    assert!(denied(&err), "{err}");
    let err = tay_ninh
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &suspect_notice(),
            &SendOptions::new("H1"),
        )
        .await
        .unwrap_err();
    assert!(denied(&err), "{err}");
    // Focal points may send every kind abroad.
    let mut c02 = net.client("vn", "c02").await.unwrap();
    c02.send(
        &net.org_id("kh", "ahtd").unwrap(),
        &suspect_notice(),
        &SendOptions::new("H1"),
    )
    .await
    .unwrap();
    // Each refusal is an entry of VN's log with its reason.
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    let refusals = (0..vn.store.log_size().unwrap())
        .filter_map(|i| {
            pb::LogEntry::decode(vn.store.log_entry(i).unwrap().unwrap().as_slice()).ok()
        })
        .filter(|e| {
            e.event == pb::LogEvent::Rejected as i32 && e.reason == pb::RejectReason::Policy as i32
        })
        .count();
    assert_eq!(refusals, 2);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiving_country_enforces_its_own_policy_on_arrival() {
    // VN's (mis)configured policy lets hotlines send anything abroad; KH's does not.
    let lax = concat!(
        include_str!("../../deploy/policy.toml"),
        "\n[[allow]]\nfrom = \"hotline\"\nto = [\"focal_point\"]\nkinds = [\"*\"]\nscope = \"foreign\"\n"
    );
    let net = TestNet::builder()
        .policy("vn", lax)
        .country("vn", "hanoi", ORGS_VN)
        .country("kh", "phnom-penh", ORGS_KH)
        .start()
        .await
        .unwrap();
    let mut tay_ninh = net.client("vn", "tayninh-police").await.unwrap();
    let sent = tay_ninh
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &suspect_notice(),
            &SendOptions::new("H2"),
        )
        .await
        .unwrap();
    let mut chain = vec![];
    for _ in 0..200 {
        chain = tay_ninh.status(&sent.id).await.unwrap().1;
        if furthest_stage(&chain) == Stage::Rejected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejected = chain
        .iter()
        .find(|r| r.stage() == Stage::Rejected)
        .expect("KH should reject it");
    assert_eq!(rejected.body.reason, pb::RejectReason::Policy as i32);
    assert_eq!(
        rejected.signer.to_string(),
        "spiffe://kh.accord/gateway/phnom-penh"
    );
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ahtd.fetch(10).await.unwrap().is_empty(), "never delivered");
    net.shutdown().await;
}
