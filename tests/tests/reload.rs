//! Hot reload: the gateway's own certificate, the policy and the directory files take effect
//! without a restart (CRLs are covered in revocation.rs); a broken file leaves what is in
//! force; open connections stay.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use accord_client::org::{ClientError, SendOptions};
use accord_proto::pb;
use accord_tests::{alert, TestNet};

async fn net() -> TestNet {
    accord_tests::vn_and_kh().start().await.unwrap()
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

/// The certificate the gateway of `cc` presents in a new handshake on its client listener,
/// as seen by the organisation `org` of that country (DER).
async fn presented_certificate(net: &TestNet, cc: &str, org: &str) -> Vec<u8> {
    use accord_gateway::tls::{self, CountryRoots, Credentials};
    let dir = net.org_dir(cc, org).unwrap();
    let creds = Credentials::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    let mut roots = CountryRoots::default();
    roots
        .add(
            cc.parse().unwrap(),
            &net.root().join(format!("pki/{cc}/ca.pem")),
        )
        .unwrap();
    let config = tls::client_config(&creds, roots, net.gateway_address(cc).unwrap().id).unwrap();
    let addr = net.gateway(cc).unwrap().client_addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_gateway_certificate_is_used_without_a_restart_and_the_old_one_can_be_revoked() {
    let mut net = net().await;
    let pki = net.root().join("pki/vn");
    let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let ahtd = net.org_id("kh", "ahtd").unwrap();
    let c02_id = net.org_id("vn", "c02").unwrap();
    let old_cert = read("gateway/cert.pem");
    let old = presented_certificate(&net, "vn", "c02").await;

    // The VN root renews the gateway's certificate; the operator puts the certificate in
    // place, then (a moment later, so the gateway sees the pair mismatched first) its key.
    let renewed = accord_certs::reissue(
        &read("ca.pem"),
        &read("ca.key"),
        &net.gateway_address("vn").unwrap().id,
    )
    .unwrap();
    rewrite(&pki.join("gateway/cert.pem"), &renewed.cert_pem);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(presented_certificate(&net, "vn", "c02").await, old);
    accord_certs::write_file(
        &pki.join("gateway/key.pem"),
        renewed.key_pem.as_bytes(),
        true,
    )
    .unwrap();
    let mut now = old.clone();
    for _ in 0..60 {
        now = presented_certificate(&net, "vn", "c02").await;
        if now != old {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(now, old, "the renewed certificate was never presented");
    let renewed_der: Vec<u8> = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    assert_eq!(now, renewed_der);

    // The old certificate is revoked. KH, which checks VN's CRL, would now refuse any
    // handshake in which VN still presented it.
    let crl = accord_certs::revoke(
        &read("ca.pem"),
        &read("ca.key"),
        &[accord_certs::serial_of(&old_cert).unwrap()],
        time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
    )
    .unwrap();
    rewrite(&pki.join("crl.pem"), &crl);
    tokio::time::sleep(Duration::from_millis(2200)).await;

    // A KH restart makes both peer links handshake afresh: VN dials KH with its renewed
    // client certificate, KH dials VN and checks its renewed server certificate. The alert
    // is sent while KH is down, so it can only travel on a new connection; it is sent on the
    // client connection opened before the renewal, which is still up.
    net.stop_gateway("kh").await.unwrap();
    c02.send(&ahtd, &alert("while KH restarts"), &SendOptions::new("R1"))
        .await
        .unwrap();
    net.start_gateway("kh").await.unwrap();
    let mut ahtd_client = net.client("kh", "ahtd").await.unwrap();
    let got = accord_tests::fetch_n(&mut ahtd_client, 1).await.unwrap();
    assert_eq!(got.len(), 1);
    ahtd_client
        .send(&c02_id, &alert("reply"), &SendOptions::new("R1"))
        .await
        .unwrap();
    let back = accord_tests::fetch_n(&mut c02, 1).await.unwrap();
    assert_eq!(back.len(), 1);
    net.shutdown().await;
}
