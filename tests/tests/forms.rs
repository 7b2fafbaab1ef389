//! The common forms through real gateways: the child rule applied by the sender's library
//! and checked by the recipient's, answers tied to their request, and a recipient refusing
//! a form that breaks the rules with the field named.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use accord_client::forms::EXAMPLES;
use accord_client::org::{ClientError, SendOptions};
use accord_proto::pb;
use accord_tests::{fetch_n, now_ms, TestNet};

async fn net() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02", "inspectorate:auditor"])
        .country("kh", "phnom-penh", &["ahtd", "svayrieng"])
        .start()
        .await
        .unwrap()
}

/// The wire form of the last receipt of a chain.
fn last_wire(chain: &[accord_proto::receipt::VerifiedReceipt]) -> pb::Receipt {
    chain.last().unwrap().wire.clone()
}

fn example(name: &str, lang: usize) -> pb::Body {
    let (_, texts) = EXAMPLES.iter().find(|e| e.0 == name).unwrap();
    let mut body = accord_client::demo::parse_form(texts[lang]).unwrap();
    accord_client::demo::retime(&mut body, now_ms());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_victim_request_travels_at_flash_and_h2_and_its_answer_names_it() {
    let net = net().await;
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    // Asked for routine and H0: the library raises both for a child.
    let request = kh
        .send(
            &net.org_id("vn", "c02").unwrap(),
            &example("victim-identification", 2),
            &SendOptions::new("VN-KH-2026-0007"),
        )
        .await
        .unwrap();
    let got = fetch_n(&mut vn, 1).await.unwrap();
    let header = got[0].envelope.header();
    assert_eq!(header.priority, pb::Priority::Flash as i32);
    assert_eq!(header.handling_code, "H2");
    assert_eq!(header.evaluation, "X4");
    assert!(accord_proto::forms::concerns_a_child(&got[0].body));
    let shown = accord_client::forms::render(&got[0], false, false).unwrap();
    assert!(
        !shown.contains("Trần Thị B") && shown.contains("masked"),
        "{shown}"
    );
    assert!(shown.contains("H2: DO NOT PASS ON"), "{shown}");

    // An answer without the request it answers is refused before sealing...
    let result = example("verification-result", 1);
    let err = vn
        .send(&kh.id, &result, &SendOptions::new("VN-KH-2026-0007"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Form(e) if e.path == "header.in_reply_to"),
        "{err}"
    );
    // ...and with it, it arrives tied to the request.
    let mut opts = SendOptions::new("VN-KH-2026-0007");
    opts.in_reply_to = Some(request.id);
    opts.evaluation = "A1".into();
    vn.send(&kh.id, &result, &opts).await.unwrap();
    let answer = fetch_n(&mut kh, 1).await.unwrap();
    assert_eq!(
        answer[0].envelope.header().in_reply_to,
        request.id.as_bytes().to_vec()
    );
    assert_eq!(answer[0].envelope.header().evaluation, "A1");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refuses_a_form_that_breaks_the_rules_and_names_the_field() {
    let net = net().await;
    let vn = net.client("vn", "c02").await.unwrap();
    let mut raw = net.client("vn", "c02").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    // A sender that skips its library's checks: a birth date in the future. The gateways
    // cannot read bodies and pass it on.
    let mut body = example("suspect-notice", 0);
    if let Some(pb::body::Form::SuspectNotice(f)) = &mut body.form {
        f.subject.as_mut().unwrap().birth_date = "2999-01-01".into();
        f.subject.as_mut().unwrap().birth_year = 0;
    }
    let (header, pk) =
        accord_tests::raw_header(&vn, &kh.id, pb::Kind::SuspectNotice, "VN-KH-2026-0008").unwrap();
    let sealed = accord_proto::envelope::seal(header, &body, &pk, &vn.keys().signing).unwrap();
    raw.submit(&sealed).await.unwrap();
    let mut refused = None;
    for _ in 0..100 {
        match kh.fetch(8).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(items) => assert!(items.is_empty(), "a broken form was opened"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let err = refused.expect("the recipient never saw the envelope");
    let ClientError::Refused {
        message_id,
        envelope_hash,
        cause,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(
        matches!(cause.as_ref(), ClientError::Form(e) if e.path == "subject.birth_date"),
        "{err}"
    );
    assert_eq!(*envelope_hash, sealed.hash());
    // Another organisation of the recipient's country cannot refuse it in its place.
    let mut neighbour = net.client("kh", "svayrieng").await.unwrap();
    let err = neighbour
        .refuse(message_id, envelope_hash)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Gateway(s) if s.code() == tonic::Code::PermissionDenied || s.code() == tonic::Code::NotFound),
        "{err}"
    );
    // Refused: it leaves the inbox, and the sender's chain ends in the recipient's
    // signed refusal.
    kh.refuse(message_id, envelope_hash).await.unwrap();
    assert!(kh.fetch(8).await.unwrap().is_empty());
    let mut chain = Vec::new();
    for _ in 0..100 {
        chain = raw.status(message_id).await.unwrap().1;
        if accord_client::org::furthest_stage(&chain) == pb::Stage::Rejected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let last = chain.last().unwrap();
    assert_eq!(last.stage(), pb::Stage::Rejected, "{chain:?}");
    assert_eq!(
        last.body.reason,
        pb::RejectReason::RefusedByRecipient as i32
    );
    assert_eq!(last.signer.to_string(), kh.id.to_string());
    // An auditor's evidence bundle proves the refusal: the recipient's signed REJECTED
    // receipt, recorded in the recipient's gateway log.
    let auditor = net.client("vn", "inspectorate").await.unwrap();
    let trusted = accord_tests::trusted_directories(&net).unwrap();
    let mut last = String::new();
    let mut proven = false;
    for _ in 0..200 {
        let bundle = auditor
            .audit()
            .get_evidence(pb::GetEvidenceRequest {
                message_id: message_id.as_bytes().to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        let has_refusal = bundle.receipts.iter().any(|r| r == &last_wire(&chain));
        let report = accord_proto::evidence::verify_bundle(
            &prost::Message::encode_to_vec(&bundle),
            &trusted,
        );
        if has_refusal && report.ok() {
            proven = true;
            break;
        }
        last = report.to_string();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(proven, "the refusal was never proven; last report:\n{last}");

    // A delivery ends once: the recipient cannot now take it as delivered.
    let delivered = accord_proto::receipt::sign(
        &pb::ReceiptBody {
            envelope_hash: envelope_hash.0.to_vec(),
            message_id: message_id.as_bytes().to_vec(),
            stage: pb::Stage::Delivered as i32,
            signer: kh.id.to_string(),
            signer_key_id: kh.keys().signing.key_id().to_owned(),
            at_ms: now_ms(),
            ..Default::default()
        },
        &kh.keys().signing,
    );
    let err = kh
        .exchange()
        .ack(pb::AckRequest {
            delivered: Some(delivered),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    // Only the recipient can refuse: the sender cannot end its own message that way.
    let err = raw.refuse(message_id, envelope_hash).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Gateway(s) if s.code() == tonic::Code::PermissionDenied || s.code() == tonic::Code::NotFound),
        "{err}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backdated_answer_is_booked_when_it_arrived_not_when_its_sender_says() {
    let net = net().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let book = std::sync::Arc::new(
        accord_client::casebook::CaseBook::open(&net.org_dir("vn", "c02").unwrap()).unwrap(),
    );
    vn.use_case_book(book.clone()).unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let alert = vn
        .send(
            &kh.id,
            &example("alert", 0),
            &SendOptions::new("VN-KH-2026-0009"),
        )
        .await
        .unwrap();
    fetch_n(&mut kh, 1).await.unwrap();
    // KH answers with correspondence dated two hours before the alert was even sent.
    let backdated = now_ms() - 2 * 3_600_000;
    let (header, pk) =
        accord_tests::raw_header(&kh, &vn.id, pb::Kind::Correspondence, "VN-KH-2026-0009").unwrap();
    let header = pb::Header {
        created_at_ms: backdated,
        in_reply_to: alert.id.as_bytes().to_vec(),
        evaluation: "B2".into(),
        ..header
    };
    let body = example("correspondence", 0);
    let sealed = accord_proto::envelope::seal(header, &body, &pk, &kh.keys().signing).unwrap();
    let answer = kh.submit(&sealed).await.unwrap();
    fetch_n(&mut vn, 1).await.unwrap();
    let booked = book
        .all()
        .into_iter()
        .find(|e| e.id == answer.id.to_string())
        .expect("the answer is in VN's case book");
    let asked = book
        .all()
        .into_iter()
        .find(|e| e.id == alert.id.to_string())
        .unwrap();
    assert!(
        booked.at_ms >= asked.at_ms && booked.at_ms > backdated + 3_600_000,
        "booked at {} (alert at {}, header says {backdated})",
        booked.at_ms,
        asked.at_ms
    );
    net.shutdown().await;
}
