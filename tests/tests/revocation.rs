//! Revocation: a CRL per root, published by rewriting the CRL file the gateways are configured
//! with, taken into account without a restart.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use accord_proto::pb;
use accord_tests::TestNet;

async fn net() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02", "tayninh-police"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap()
}

/// Publishes a CRL of `cc`'s root revoking the certificates at `certs` (relative to
/// `pki/<cc>`), as an operator would: write aside, then rename over the configured file.
fn publish_crl(net: &TestNet, cc: &str, certs: &[&str]) {
    let dir = net.root().join("pki").join(cc);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let serials: Vec<Vec<u8>> = certs
        .iter()
        .map(|c| accord_certs::serial_of(&read(&dir.join(c))).unwrap())
        .collect();
    let crl = accord_certs::revoke(
        &read(&dir.join("ca.pem")),
        &read(&dir.join("ca.key")),
        &serials,
        time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
    )
    .unwrap();
    let aside = dir.join("crl.pem.new");
    std::fs::write(&aside, crl).unwrap();
    std::fs::rename(&aside, dir.join("crl.pem")).unwrap();
}

/// Whether a call failed in the TLS handshake (a transport error), not in the service. The
/// client sees either the `certificate_revoked` alert or, when the server closes first, only
/// the closed connection.
fn refused_in_handshake(debug: &str) -> bool {
    debug.contains("CertificateRevoked") || debug.contains("transport::Error(Transport")
}

/// Long enough for the once-a-second poll to see the new file.
const RELOAD: Duration = Duration::from_millis(2200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_organisation_certificate_cannot_connect_once_its_crl_is_published_without_a_restart(
) {
    let net = net().await;
    let mut before = net.client("vn", "c02").await.unwrap();
    publish_crl(&net, "vn", &["orgs/c02/cert.pem"]);
    tokio::time::sleep(RELOAD).await;

    let err = net.client("vn", "c02").await.unwrap_err();
    assert!(refused_in_handshake(&format!("{err:?}")), "{err:?}");
    // Another organisation of the same country still connects.
    let mut other = net.client("vn", "tayninh-police").await.unwrap();
    other.fetch(1).await.unwrap();
    // The connection opened before the revocation is not dropped by the reload.
    before.fetch(1).await.unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_gateway_certificate_fails_the_peer_handshake() {
    let net = net().await;
    accord_tests::peer_link_as(&net, "kh", "vn")
        .unwrap()
        .deliver(pb::DeliverRequest { items: vec![] })
        .await
        .unwrap();
    publish_crl(&net, "kh", &["gateway/cert.pem"]);
    tokio::time::sleep(RELOAD).await;

    let err = accord_tests::peer_link_as(&net, "kh", "vn")
        .unwrap()
        .deliver(pb::DeliverRequest { items: vec![] })
        .await
        .unwrap_err();
    assert!(refused_in_handshake(&format!("{err:?}")), "{err:?}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_does_not_start_with_a_certificate_its_own_root_has_revoked() {
    let mut net = net().await;
    publish_crl(&net, "vn", &["gateway/cert.pem"]);
    net.stop_gateway("vn").await.unwrap();
    let err = net.start_gateway("vn").await.unwrap_err();
    assert!(format!("{err:#}").contains("Revoked"), "{err:#}");
    net.shutdown().await;
}
