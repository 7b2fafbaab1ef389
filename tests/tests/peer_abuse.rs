//! A peer gateway that misbehaves: the test holds KH's real gateway certificate and calls
//! VN's peer link directly with what an honest KH gateway would never send.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::time::Duration;

use accord_client::org::{furthest_stage, SendOptions};
use accord_proto::crypto::SigningKey;
use accord_proto::pb::{self, Stage};
use accord_tests::{alert, TestNet};
use prost::Message as _;

/// The default policy plus domestic exchange between VN focal points, for a VN-internal
/// message the peer has no business with.
const WITH_DOMESTIC: &str = concat!(
    include_str!("../../deploy/policy.toml"),
    "\n[[allow]]\nfrom = \"focal_point\"\nto = [\"focal_point\"]\nkinds = [\"*\"]\nscope = \"domestic\"\n"
);

/// A REJECTED receipt about `id` for `reason`, genuinely signed by KH's gateway key.
fn rejected_by_kh_gateway(
    net: &TestNet,
    id: &accord_proto::ids::MessageId,
    hash: &accord_proto::ids::EnvelopeHash,
    reason: pb::RejectReason,
) -> pb::Receipt {
    let kh_keys =
        accord_gateway::server::load_key_file(&net.root().join("pki/kh/gateway/keys.json"))
            .unwrap();
    rejected_by(
        KH_GATEWAY,
        &kh_keys.signing,
        id,
        hash,
        reason,
        accord_tests::now_ms(),
    )
}

const KH_GATEWAY: &str = "spiffe://kh.accord/gateway/phnom-penh";

/// A REJECTED receipt about `id` in the name of `signer`, signed with `key` at `at_ms`.
fn rejected_by(
    signer: &str,
    key: &SigningKey,
    id: &accord_proto::ids::MessageId,
    hash: &accord_proto::ids::EnvelopeHash,
    reason: pb::RejectReason,
    at_ms: i64,
) -> pb::Receipt {
    accord_proto::receipt::sign(
        &pb::ReceiptBody {
            envelope_hash: hash.0.to_vec(),
            message_id: id.as_bytes().to_vec(),
            stage: Stage::Rejected as i32,
            signer: signer.into(),
            signer_key_id: key.key_id().into(),
            at_ms,
            log_index: 0,
            reason: reason as i32,
        },
        key,
    )
}

/// Delivers `receipts` to VN in one call over the peer link held as KH; the answers.
async fn deliver_receipts(
    kh: &mut pb::peer_link_client::PeerLinkClient<tonic::transport::Channel>,
    receipts: impl IntoIterator<Item = pb::Receipt>,
) -> Vec<pb::PeerResult> {
    let items = receipts
        .into_iter()
        .map(|r| pb::PeerItem {
            item: Some(pb::peer_item::Item::Receipt(r)),
        })
        .collect();
    kh.deliver(pb::DeliverRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results
}

/// Has a Thai peer gateway offer `envelope` to `kh`, which refuses it without a receipt
/// (PermissionDenied); the size of `kh`'s log before.
async fn offered_by_a_thai_peer(
    kh: &std::sync::Arc<accord_gateway::pipeline::Pipeline>,
    envelope: pb::Envelope,
) -> u64 {
    let log_size = kh.store.log_size().unwrap();
    let thai: accord_proto::ids::SpiffeId = "spiffe://th.accord/gateway/bangkok".parse().unwrap();
    let answer = kh.receive(&thai, envelope).await;
    assert!(
        matches!(
            answer,
            Err(accord_gateway::pipeline::PipelineError::PermissionDenied(_))
        ),
        "{answer:?}"
    );
    log_size
}

async fn net() -> TestNet {
    TestNet::builder()
        .policy("vn", WITH_DOMESTIC)
        .country("vn", "hanoi", &["c02", "tayninh-police"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_inject_receipts_for_messages_it_never_handled_nor_replay_them_into_the_log()
{
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut hotline = net.client("vn", "tayninh-police").await.unwrap();
    // A VN-internal message: KH has nothing to say about it.
    let local = c02
        .send(
            &net.org_id("vn", "tayninh-police").unwrap(),
            &alert("internal"),
            &SendOptions::new("P1"),
        )
        .await
        .unwrap();
    let got = accord_tests::fetch_n(&mut hotline, 1).await.unwrap();
    let delivered = hotline.ack(&got[0]).await.unwrap();
    // A message to KH, for the receipts below that name it.
    // Received at KH, so that its log entries are all in before the count below.
    let to_kh = accord_tests::alert_received_at_kh(&net, &mut c02, "to kh")
        .await
        .unwrap();
    // A REJECTED receipt genuinely signed by KH's gateway key, about that VN-internal message.
    let forged_rejection =
        rejected_by_kh_gateway(&net, &local.id, &local.hash, pb::RejectReason::Expired);
    let mut kh = accord_tests::peer_link_as(&net, "kh", "vn").unwrap();
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    let before = vn.store.log_size().unwrap();
    let replays =
        std::iter::repeat_n(forged_rejection, 10).chain(std::iter::repeat_n(delivered, 10));
    for r in replays {
        let resp = deliver_receipts(&mut kh, [r]).await;
        assert_eq!(resp.len(), 1);
        // Refused for good, and the peer is told so and why, not answered as if stored.
        let result = &resp[0];
        assert!(result.refused.contains("does not fit"), "{result:?}");
        assert!(result.retry_reason.is_empty() && result.receipt.is_none());
    }
    // A message that does not exist, and a message sent to KH named with another
    // envelope's hash, are answered exactly as the message that is not KH's business: the
    // peer learns nothing of which ids exist here.
    let unknown_id = accord_proto::ids::MessageId::new_v7(1, [9; 10]);
    let wrong_hash = accord_proto::ids::EnvelopeHash([7; 32]);
    let mut answers = HashSet::new();
    for r in [
        rejected_by_kh_gateway(&net, &local.id, &local.hash, pb::RejectReason::Expired),
        rejected_by_kh_gateway(&net, &unknown_id, &local.hash, pb::RejectReason::Expired),
        rejected_by_kh_gateway(&net, &to_kh.id, &wrong_hash, pb::RejectReason::Expired),
    ] {
        let resp = deliver_receipts(&mut kh, [r]).await;
        answers.insert(format!("{:?}", resp));
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    // Signed by a KH key VN's directory does not hold (yet): retried, not refused for
    // good. But signed an hour ago, that key will not come; and in the name of VN's own
    // gateway, no directory from KH can bring it: both refused.
    let stranger = SigningKey::generate("not-yet-published").unwrap();
    let an_hour = 3_600_000;
    let now = accord_tests::now_ms();
    for (signer, at_ms, retried) in [
        (KH_GATEWAY, now, true),
        (KH_GATEWAY, now - an_hour, false),
        ("spiffe://vn.accord/gateway/hanoi", now, false),
    ] {
        let r = rejected_by(
            signer,
            &stranger,
            &to_kh.id,
            &to_kh.hash,
            pb::RejectReason::Expired,
            at_ms,
        );
        let resp = deliver_receipts(&mut kh, [r]).await;
        let result = &resp[0];
        let said = if retried {
            &result.retry_reason
        } else {
            &result.refused
        };
        assert!(
            said.contains("unknown receipt signer") || said.contains("not in our directory"),
            "{result:?}"
        );
        assert_eq!(result.refused.is_empty(), retried, "{result:?}");
    }
    // An envelope too broken to name a refusal is refused without a receipt, and said so.
    let broken = kh
        .deliver(pb::DeliverRequest {
            items: vec![pb::PeerItem {
                item: Some(pb::peer_item::Item::Envelope(pb::Envelope::default())),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let result = &broken.results[0];
    assert!(
        result.receipt.is_none() && result.retry_reason.is_empty() && !result.refused.is_empty(),
        "{result:?}"
    );
    // An item carrying nothing is refused too.
    let empty = kh
        .deliver(pb::DeliverRequest {
            items: vec![pb::PeerItem { item: None }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!empty.results[0].refused.is_empty(), "{empty:?}");
    assert_eq!(
        vn.store.log_size().unwrap(),
        before,
        "refused receipts leave no trace but their refusal"
    );
    let (_, chain) = c02.status(&local.id).await.unwrap();
    assert_eq!(
        chain
            .iter()
            .filter(|r| r.stage() == Stage::Delivered)
            .count(),
        1
    );
    assert!(
        chain.iter().all(|r| r.stage() != Stage::Rejected),
        "a foreign rejection joined the chain"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_delivered_receipt_is_stored_and_logged_once_and_a_second_ending_is_refused() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let sent = c02
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert("once"),
            &SendOptions::new("P2"),
        )
        .await
        .unwrap();
    let got = accord_tests::fetch_n(&mut ahtd, 1).await.unwrap();
    let delivered = ahtd.ack(&got[0]).await.unwrap();
    // Acking twice is harmless.
    ahtd.ack(&got[0]).await.unwrap();
    accord_tests::wait_stage(&mut c02, &sent.id, Stage::Delivered)
        .await
        .unwrap();
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    let events_before = vn.store.message_events(&sent.id).unwrap().len();
    let mut kh = accord_tests::peer_link_as(&net, "kh", "vn").unwrap();
    for _ in 0..10 {
        let resp = deliver_receipts(&mut kh, [delivered.clone()]).await;
        // Already held: answered as stored.
        assert_eq!(resp, vec![pb::PeerResult::default()]);
    }
    // KH's gateway, which did receive the message, now says it expired: a delivery ends
    // once, so VN refuses this second ending, neither stores nor logs it, and says so.
    let late = rejected_by_kh_gateway(&net, &sent.id, &sent.hash, pb::RejectReason::Expired);
    let resp = deliver_receipts(&mut kh, [late]).await;
    assert!(resp[0].refused.contains("already ended"), "{:?}", resp);
    assert_eq!(
        vn.store.message_events(&sent.id).unwrap().len(),
        events_before
    );
    let (_, chain) = c02.status(&sent.id).await.unwrap();
    assert_eq!(
        chain
            .iter()
            .filter(|r| r.stage() == Stage::Delivered)
            .count(),
        1
    );
    assert!(
        chain.iter().all(|r| r.stage() != Stage::Rejected),
        "a second ending joined the chain"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_envelope_reusing_a_message_id_does_not_touch_that_messages_chain() {
    let net = net().await;
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    // A real KH -> VN message, delivered.
    let sent = ahtd
        .send(
            &net.org_id("vn", "c02").unwrap(),
            &alert("real"),
            &SendOptions::new("P3"),
        )
        .await
        .unwrap();
    let got = accord_tests::fetch_n(&mut c02, 1).await.unwrap();
    // The "peer" replays its bytes with a flipped ciphertext byte under the same id.
    let forged = accord_tests::tampered(got[0].envelope.to_wire());
    let mut kh = accord_tests::peer_link_as(&net, "kh", "vn").unwrap();
    let resp = kh
        .deliver(accord_tests::deliver_one(forged))
        .await
        .unwrap()
        .into_inner();
    let rejected =
        pb::ReceiptBody::decode(resp.results[0].receipt.as_ref().unwrap().body.as_slice()).unwrap();
    assert_eq!(rejected.stage, Stage::Rejected as i32);
    assert_eq!(rejected.reason, pb::RejectReason::BadSignature as i32);
    // The genuine chain is untouched and still verifies for the sender.
    for _ in 0..100 {
        let (_, chain) = ahtd.status(&sent.id).await.unwrap();
        if furthest_stage(&chain) == Stage::Received {
            assert!(chain.iter().all(|r| r.stage() != Stage::Rejected));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c02.ack(&got[0]).await.unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_relay_envelopes_of_another_country_or_for_another_country() {
    let net = accord_tests::vn_and_kh()
        .country("la", "vientiane", &["dcp"])
        .start()
        .await
        .unwrap();
    // A genuine LA -> VN envelope, which KH then tries to relay to VN as if it were its own.
    let mut dcp = net.client("la", "dcp").await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    dcp.send(
        &net.org_id("vn", "c02").unwrap(),
        &alert("from la"),
        &SendOptions::new("P4"),
    )
    .await
    .unwrap();
    let got = accord_tests::fetch_n(&mut c02, 1).await.unwrap();
    // And a genuine LA -> KH envelope, which KH tries to pass off to VN.
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    dcp.send(
        &net.org_id("kh", "ahtd").unwrap(),
        &alert("from la to kh"),
        &SendOptions::new("P4"),
    )
    .await
    .unwrap();
    let to_kh = accord_tests::fetch_n(&mut ahtd, 1).await.unwrap();
    let mut kh = accord_tests::peer_link_as(&net, "kh", "vn").unwrap();
    let resp = kh
        .deliver(pb::DeliverRequest {
            items: [&got[0], &to_kh[0]]
                .map(|o| pb::PeerItem {
                    item: Some(pb::peer_item::Item::Envelope(o.envelope.to_wire())),
                })
                .into(),
        })
        .await
        .unwrap()
        .into_inner();
    // VN holds the first: no receipt of VN's answers it, not even a refusal, which would
    // read as a second ending of a message VN delivered.
    let held = &resp.results[0];
    assert!(
        held.receipt.is_none() && !held.refused.is_empty(),
        "{held:?}"
    );
    // Nor the second, which is not KH's to deliver: a refusal signed over it would stand
    // beside the receipts of its own sender's gateway.
    let other = &resp.results[1];
    assert!(
        other.receipt.is_none() && other.refused.contains("sender is not of your country"),
        "{other:?}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_can_neither_prove_others_messages_nor_witness_forged_notes_nor_offer_foreign_directories(
) {
    let net = accord_tests::vn_and_kh()
        .country("la", "vientiane", &["dcp"])
        .start()
        .await
        .unwrap();
    // A VN <-> LA message: KH may not ask VN for its log entries.
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let sent = c02
        .send(
            &net.org_id("la", "dcp").unwrap(),
            &alert("vn-la"),
            &SendOptions::new("P5"),
        )
        .await
        .unwrap();
    let mut kh = accord_tests::peer_link_as(&net, "kh", "vn").unwrap();
    let err = kh
        .prove_events(pb::ProveEventsRequest {
            message_id: sent.id.as_bytes().to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

    // A checkpoint note signed by some other key, under KH's origin: refused, nothing stored.
    let rogue = accord_proto::note::NoteSigner::new(
        "accord.kh/phnom-penh",
        SigningKey::generate("x").unwrap(),
    )
    .unwrap();
    let body = accord_proto::note::Checkpoint {
        origin: "accord.kh/phnom-penh".into(),
        size: 1,
        root: [7; 32],
        extensions: vec![],
    }
    .to_body();
    let err = kh
        .witness(pb::WitnessRequest {
            old_size: 0,
            consistency_proof: vec![],
            checkpoint: rogue.sign(&body).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // KH's real log key, but another gateway's origin: refused too.
    let kh_log =
        accord_gateway::server::load_key_file(&net.root().join("pki/kh/gateway/log-key.json"))
            .unwrap();
    let signer =
        accord_proto::note::NoteSigner::new("accord.kh/phnom-penh", kh_log.signing).unwrap();
    let other_origin = accord_proto::note::Checkpoint {
        origin: "accord.kh/elsewhere".into(),
        size: 1,
        root: [7; 32],
        extensions: vec![],
    }
    .to_body();
    let err = kh
        .witness(pb::WitnessRequest {
            old_size: 0,
            consistency_proof: vec![],
            checkpoint: signer.sign(&other_origin).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // KH offering LA's (genuine, signed) directory: only a country's own gateway may.
    let la_signed: pb::SignedDirectory = serde_json::from_slice(
        &std::fs::read(net.root().join("pki/la/directory.signed.json")).unwrap(),
    )
    .unwrap();
    let err = kh
        .exchange_directories(pb::ExchangeDirectoriesRequest {
            own: Some(la_signed),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    net.shutdown().await;
}

/// Two different endings of one message in one batch (the items of a batch are handled
/// concurrently): one is taken, the other waits for it and is then refused, so the
/// message still ends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endings_of_one_message_in_one_batch_end_it_once() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    // KH's gateway holds it (its received receipt reached VN), and no one acks it.
    let sent = accord_tests::alert_received_at_kh(&net, &mut c02, "twice")
        .await
        .unwrap();
    let endings = [pb::RejectReason::Expired, pb::RejectReason::Policy]
        .map(|reason| rejected_by_kh_gateway(&net, &sent.id, &sent.hash, reason));
    let mut kh = accord_tests::peer_link_as(&net, "kh", "vn").unwrap();
    let results = deliver_receipts(&mut kh, endings.iter().cloned()).await;
    let retried: Vec<usize> = (0..2)
        .filter(|&i| !results[i].retry_reason.is_empty())
        .collect();
    assert_eq!(
        retried.len(),
        1,
        "one ending waits for the other: {results:?}"
    );
    // Sent again, as the peer's forwarder would: now refused, the delivery having ended.
    deliver_receipts(&mut kh, [endings[retried[0]].clone()]).await;
    let (_, chain) = c02.status(&sent.id).await.unwrap();
    let ended: Vec<_> = chain
        .iter()
        .filter(|r| matches!(r.stage(), Stage::Rejected | Stage::Delivered))
        .collect();
    assert_eq!(ended.len(), 1, "the message ended twice");
    assert_eq!(
        ended[0].wire,
        endings[1 - retried[0]],
        "the ending taken first stays"
    );
    net.shutdown().await;
}

/// VN sends an envelope again that KH took and AHTD acknowledged, as after an answer lost
/// on the way back, and only once it expired: KH answers with the RECEIVED receipt it gave
/// the first time, not a refusal as expired, which would contradict the delivery. The same
/// bytes from a gateway of another country get no receipt of KH's, not even a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_envelope_kh_holds_gets_its_first_receipt_even_past_its_expiry() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    // Long enough for AHTD's acknowledgement to beat KH's own expiry on a loaded machine.
    let sent = accord_tests::short_lived_alert(&net, &mut c02, "taken", 5_000)
        .await
        .unwrap();
    let got = accord_tests::fetch_n(&mut ahtd, 1).await.unwrap();
    ahtd.ack(&got[0]).await.unwrap();
    let chain = accord_tests::wait_stage(&mut c02, &sent.id, Stage::Delivered)
        .await
        .unwrap();
    let envelope = accord_tests::stored_envelope(&net, "vn", &sent.id).unwrap();
    let past = accord_tests::until_expiry(&net, "vn", &sent.id).unwrap();
    tokio::time::sleep(past + Duration::from_millis(100)).await;

    let mut kh = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let answer = kh
        .deliver(accord_tests::deliver_one(envelope.clone()))
        .await
        .unwrap()
        .into_inner();
    let first = chain.iter().find(|r| r.stage() == Stage::Received).unwrap();
    let again = answer.results[0].receipt.as_ref().expect("a receipt");
    assert_eq!(again, &first.wire, "the receipt given the first time");

    let kh_pipeline = net.gateway("kh").unwrap().pipeline.clone();
    let log_size = offered_by_a_thai_peer(&kh_pipeline, envelope).await;
    assert_eq!(
        kh_pipeline.store.log_size().unwrap(),
        log_size + 1,
        "nothing kept, the refusal logged"
    );
    net.shutdown().await;
}

/// KH's disk stalls while it commits the first copy of an envelope, and the peer's call
/// gives up (KH's handler of it is dropped, its commit still with the store). A copy sent
/// again past its expiry is answered "retry", not checked anew: refused as expired, it would
/// end the message at VN as REJECTED while KH takes the first copy. Once the commit lands,
/// a copy gets the first copy's receipt. (The copies go over a link of the test's own, VN's
/// gateway stopped, so that its own resends cannot take the first copy's place.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_arriving_while_kh_commits_the_first_is_answered_retry_then_its_receipt() {
    let mut net = accord_tests::vn_and_kh()
        .checkpoint_interval_ms(600_000)
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    // Time to stop VN and start KH again before it expires, on a loaded machine.
    let sent = accord_tests::short_lived_alert(&net, &mut c02, "slow disk", 4_000)
        .await
        .unwrap();
    let envelope = accord_tests::stored_envelope(&net, "vn", &sent.id).unwrap();
    let copy = accord_tests::deliver_one(envelope);
    let past = accord_tests::until_expiry(&net, "vn", &sent.id).unwrap();
    let expiry = tokio::time::Instant::now() + past;
    net.stop_gateway("vn").await.unwrap();
    let kh = accord_tests::restart_with_stalled_commits(&mut net, "kh")
        .await
        .unwrap();
    kh.stall();

    let mut link = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let request = copy.clone();
    let first = tokio::spawn(async move { link.deliver(request).await });
    let mut waited = Duration::ZERO;
    while !kh.waiting_to_insert(&sent.id) {
        assert!(
            waited < Duration::from_secs(10),
            "the first copy never reached KH"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    // The call gives up: KH drops its handler.
    first.abort();
    tokio::time::sleep_until(expiry + Duration::from_millis(300)).await;
    let mut link = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let request = copy.clone();
    let mut second = tokio::spawn(async move { link.deliver(request).await });
    // A copy checked anew waits for its refusal's commit; one answered "retry" does not.
    let early = tokio::time::timeout(Duration::from_secs(3), &mut second).await;
    kh.resume();
    let answer = match early {
        Ok(answer) => answer,
        Err(_) => second.await,
    };
    let answer = answer.unwrap().unwrap().into_inner();
    let result = &answer.results[0];
    assert!(
        result.receipt.is_none() && result.refused.is_empty() && !result.retry_reason.is_empty(),
        "answered retry: {result:?}"
    );

    let mut link = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let mut received = None;
    for _ in 0..100 {
        let answer = link.deliver(copy.clone()).await.unwrap().into_inner();
        if let Some(r) = answer.results[0].receipt.clone() {
            received = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let receipt = received.expect("the first copy's receipt, once it landed");
    let body = pb::ReceiptBody::decode(receipt.body.as_slice()).unwrap();
    assert_eq!(body.stage(), Stage::Received);
    let kh_store = net.gateway("kh").unwrap().pipeline.store.clone();
    let events: Vec<_> = kh_store
        .message_events(&sent.id)
        .unwrap()
        .into_iter()
        .map(|i| {
            let bytes = kh_store.log_entry(i).unwrap().unwrap();
            pb::LogEntry::decode(bytes.as_slice()).unwrap().event()
        })
        .collect();
    assert_eq!(events, vec![pb::LogEvent::Received], "no refusal at KH");
    net.shutdown().await;
}

/// An operator lowers KH's limit on an envelope's ciphertext after KH took an envelope over
/// it. A copy of that envelope (VN sending it again after an answer was lost) still gets
/// the receipt KH gave it: refused for its size, without a receipt, it would end the
/// message at VN while KH delivers it. Any other envelope that size is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_envelope_kh_took_before_its_limit_was_lowered_gets_its_receipt() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let sent = accord_tests::alert_received_at_kh(&net, &mut c02, "taken, then too large")
        .await
        .unwrap();
    let (_, chain) = c02.status(&sent.id).await.unwrap();
    let first = chain.iter().find(|r| r.stage() == Stage::Received).unwrap();
    let envelope = accord_tests::stored_envelope(&net, "vn", &sent.id).unwrap();
    let smaller = envelope.ciphertext.len() - 1;
    net.stop_gateway("kh").await.unwrap();
    net.set_limits("kh", &format!("max_ciphertext_bytes = {smaller}"))
        .unwrap();
    net.start_gateway("kh").await.unwrap();

    let mut kh = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let answer = kh.deliver(accord_tests::deliver_one(envelope.clone()));
    let answer = answer.await.unwrap();
    let again = &answer.into_inner().results[0];
    assert_eq!(again.receipt.as_ref(), Some(&first.wire), "{again:?}");

    let other = accord_tests::tampered(envelope);
    let answer = kh.deliver(accord_tests::deliver_one(other)).await.unwrap();
    let refused = &answer.into_inner().results[0];
    assert!(refused.receipt.is_none(), "{refused:?}");
    assert!(refused.refused.contains("too large"), "{refused:?}");
    net.shutdown().await;
}

/// Copies naming a message KH holds, but not carrying its envelope (a peer's junk, or other
/// bytes under its id), only read the message: they take no guard, so a stream of them
/// cannot hold up its acknowledgement (or its expiry) while their refusals commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_naming_a_held_message_do_not_hold_up_its_acknowledgement() {
    let mut net = accord_tests::vn_and_kh()
        .checkpoint_interval_ms(600_000)
        .start()
        .await
        .unwrap();
    let kh = accord_tests::restart_with_stalled_commits(&mut net, "kh")
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let sent = accord_tests::alert_received_at_kh(&net, &mut c02, "held at KH")
        .await
        .unwrap();
    let got = accord_tests::fetch_n(&mut ahtd, 1).await.unwrap();
    let envelope = accord_tests::stored_envelope(&net, "vn", &sent.id).unwrap();
    let junk = accord_tests::tampered(envelope);

    kh.stall();
    let mut link = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let junk = tokio::spawn(async move { link.deliver(accord_tests::deliver_one(junk)).await });
    let mut waited = Duration::ZERO;
    while kh.waiting() == 0 {
        assert!(
            waited < Duration::from_secs(10),
            "the junk's refusal never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    // The acknowledgement would wait 2 s for a guard the junk held, then be told to retry.
    let ack = tokio::spawn(async move { ahtd.ack(&got[0]).await });
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(!ack.is_finished(), "the ack waits for its own commit");
    kh.resume();
    ack.await.unwrap().unwrap();
    let refused = junk.await.unwrap().unwrap().into_inner();
    let receipt = refused.results[0]
        .receipt
        .as_ref()
        .expect("a signed refusal");
    let body = pb::ReceiptBody::decode(receipt.body.as_slice()).unwrap();
    assert_eq!(body.stage(), Stage::Rejected);
    accord_tests::wait_stage(&mut c02, &sent.id, Stage::Delivered)
        .await
        .unwrap();
    net.shutdown().await;
}

/// An envelope KH does not hold yet, offered by a peer not of its sender's country (one
/// that copied the bytes on the way), is refused without a receipt, before it is checked:
/// a REJECTED signed by KH over it (here, as expired) would stand beside the receipts of
/// VN's gateway for it. The refusal is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_not_held_yet_from_a_peer_not_of_its_senders_country_gets_no_receipt() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    let sent = accord_tests::short_lived_alert(&net, &mut c02, "copied on the way", 1_500)
        .await
        .unwrap();
    let envelope = accord_tests::stored_envelope(&net, "vn", &sent.id).unwrap();
    let past = accord_tests::until_expiry(&net, "vn", &sent.id).unwrap();
    // VN cannot deliver it meanwhile.
    net.stop_gateway("vn").await.unwrap();
    net.start_gateway("kh").await.unwrap();
    tokio::time::sleep(past + Duration::from_millis(200)).await;
    let kh = net.gateway("kh").unwrap().pipeline.clone();
    let log_size = offered_by_a_thai_peer(&kh, envelope).await;
    assert_eq!(
        kh.store.log_size().unwrap(),
        log_size + 1,
        "the refusal logged"
    );
    let entry = kh.store.log_entry(log_size).unwrap().unwrap();
    let entry = pb::LogEntry::decode(entry.as_slice()).unwrap();
    assert_eq!(entry.reason, pb::RejectReason::SenderMismatch as i32);
    assert!(kh.store.receipts(&sent.id).unwrap().is_empty());
    assert!(kh.store.message_head(&sent.id).unwrap().is_none());
    drop(kh);

    // It never left VN: VN retires it.
    net.start_gateway("vn").await.unwrap();
    accord_tests::expired_at_vn(&mut c02, &sent.id)
        .await
        .unwrap();
    net.shutdown().await;
}

/// VN's clock runs ahead of KH's by more than the allowed skew: KH refuses an envelope
/// made a little too far ahead with "retry", not with a signed REJECTED, since it becomes
/// acceptable as KH's clock catches up (a copy sent again then would be taken, beside the
/// refusal). One made so far ahead that it is not taken to catch up is refused, signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_made_a_little_ahead_of_kh_clock_is_put_off_not_refused() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let template = accord_tests::alert_received_at_kh(&net, &mut c02, "template")
        .await
        .unwrap();
    let stored = accord_tests::stored_envelope(&net, "vn", &template.id).unwrap();
    let ahtd = net.org_id("kh", "ahtd").unwrap();
    let made_ahead = |minutes: i64, n: u8| {
        let mut header = pb::Header::decode(&stored.header[..]).unwrap();
        let created = accord_tests::now_ms() + minutes * 60_000;
        header.message_id = accord_proto::ids::MessageId::new_v7(created as u64, [n; 10])
            .as_bytes()
            .to_vec();
        header.created_at_ms = created;
        header.expires_at_ms = created + 3_600_000;
        let key = c02
            .directories()
            .current_encryption_key(&ahtd, accord_tests::now_ms())
            .unwrap()
            .1;
        let body = alert("from a clock ahead");
        let sealed = accord_proto::envelope::seal(header, &body, &key, &c02.keys().signing);
        sealed.unwrap().to_wire()
    };
    let mut kh = accord_tests::peer_link_as(&net, "vn", "kh").unwrap();
    let answer = kh
        .deliver(accord_tests::deliver_one(made_ahead(8, 1)))
        .await
        .unwrap()
        .into_inner();
    let put_off = &answer.results[0];
    assert!(
        put_off.receipt.is_none() && put_off.refused.is_empty() && !put_off.retry_reason.is_empty(),
        "{put_off:?}"
    );

    let answer = kh
        .deliver(accord_tests::deliver_one(made_ahead(60, 2)))
        .await
        .unwrap()
        .into_inner();
    let receipt = answer.results[0]
        .receipt
        .as_ref()
        .expect("a signed refusal");
    let body = pb::ReceiptBody::decode(receipt.body.as_slice()).unwrap();
    assert_eq!(body.stage(), Stage::Rejected);
    assert_eq!(body.reason, pb::RejectReason::ClockSkew as i32);
    net.shutdown().await;
}
