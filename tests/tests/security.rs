//! End-to-end refusals: identities, roots, tampering, misaddressing.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use accord_client::org::{OrgClient, SendOptions};
use accord_proto::pb;
use accord_tests::{alert, fetch_n, TestNet};

async fn net() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02", "tayninh-police"])
        .country("kh", "phnom-penh", &["ahtd", "svayrieng-police"])
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_submit_as_another_organisation() {
    let net = net().await;
    // Tay Ninh police holds its own certificate but signs with C02's keys.
    let mut hotline = net.client("vn", "tayninh-police").await.unwrap();
    let c02 = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let (header, pk) = accord_tests::raw_header(&c02, &to, pb::Kind::Alert, "C9").unwrap();
    let sealed =
        accord_proto::envelope::seal(header, &alert("spoof"), &pk, &c02.keys().signing).unwrap();
    let err = hotline
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(sealed.to_wire()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_untrusted_root_cannot_connect() {
    let net = net().await;
    // A twin root for "vn" issues a certificate with C02's exact identity.
    let twin = accord_certs::CountryCa::new(&"vn".parse().unwrap()).unwrap();
    let cert = twin
        .issue(&"spiffe://vn.accord/org/c02".parse().unwrap())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    accord_certs::write_file(
        &dir.path().join("cert.pem"),
        cert.cert_pem.as_bytes(),
        false,
    )
    .unwrap();
    accord_certs::write_file(&dir.path().join("key.pem"), cert.key_pem.as_bytes(), true).unwrap();
    let keys = std::fs::read(net.org_dir("vn", "c02").unwrap().join("keys.json")).unwrap();
    accord_certs::write_file(&dir.path().join("keys.json"), &keys, true).unwrap();
    // TLS 1.3 refuses the client certificate after connect(): the first call must fail.
    let err = OrgClient::connect(dir.path(), &net.gateway_address("vn").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, accord_client::org::ClientError::Gateway(_)),
        "{err}"
    );
    // A KH organisation cannot use the VN gateway either, though its root is a real one.
    let err = OrgClient::connect(
        &net.org_dir("kh", "ahtd").unwrap(),
        &net.gateway_address("vn").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            accord_client::org::ClientError::Gateway(_)
                | accord_client::org::ClientError::Credentials(_)
        ),
        "{err}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_gateway_with_another_identity() {
    let net = net().await;
    let mut wrong = net.gateway_address("vn").unwrap();
    wrong.id = "spiffe://vn.accord/gateway/impostor".parse().unwrap();
    assert!(
        OrgClient::connect(&net.org_dir("vn", "c02").unwrap(), &wrong)
            .await
            .is_err()
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_envelope_is_refused_with_invalid_argument() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    c02.send(
        &net.org_id("kh", "ahtd").unwrap(),
        &alert("original"),
        &SendOptions::new("C7"),
    )
    .await
    .unwrap();
    let wire = fetch_n(&mut kh, 1).await.unwrap()[0].envelope.to_wire();
    let mut tampered = wire.clone();
    let mut ciphertext = tampered.ciphertext.to_vec();
    *ciphertext.last_mut().unwrap() ^= 1;
    tampered.ciphertext = ciphertext.into();
    let err = c02
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(tampered),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("BAD_SIGNATURE"), "{err}");
    let mut oversize = wire;
    oversize.ciphertext = vec![0; 5 << 20].into();
    let err = c02
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(oversize),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{err}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_never_receives_an_envelope_addressed_to_another_organisation() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let mut svay = net.client("kh", "svayrieng-police").await.unwrap();
    c02.send(
        &net.org_id("kh", "svayrieng-police").unwrap(),
        &alert("for svay rieng"),
        &SendOptions::new("C8"),
    )
    .await
    .unwrap();
    let got = fetch_n(&mut svay, 1).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(ahtd.fetch(10).await.unwrap().is_empty());
    // Nor can it ack or read the status of someone else's message.
    let forged = ahtd.ack(&got[0]).await.unwrap_err();
    assert!(
        matches!(forged, accord_client::org::ClientError::Gateway(ref s) if s.code() == tonic::Code::NotFound),
        "{forged}"
    );
    assert!(ahtd.status(&got[0].envelope.id()).await.is_err());
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_recipient_is_refused() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let nobody: accord_proto::ids::OrgId = "spiffe://kh.accord/org/nobody".parse().unwrap();
    assert!(c02
        .send(&nobody, &alert("x"), &SendOptions::new("C10"))
        .await
        .is_err());
    net.shutdown().await;
}
