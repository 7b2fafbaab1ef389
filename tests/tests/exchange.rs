//! End-to-end: real gateways, mTLS, sled on disk, through the client library.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::time::Duration;

use accord_client::org::{furthest_stage, SendOptions};
use accord_gateway::store::Queue;
use accord_proto::pb::{self, Stage};
use accord_tests::{alert, fetch_n, wait_stage, TestNet};

async fn two_countries() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02", "tayninh-police"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_delivers_every_kind_in_both_directions() {
    let mut out = Vec::new();
    accord_client::demo::run(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("All 9 messages delivered."), "{text}");
    assert!(text.contains("opened Correspondence "), "{text}");
    assert!(
        text.contains("the saved scan is byte for byte the file VN sent"),
        "{text}"
    );
    for kind in [
        "SuspectNotice",
        "WantedPersonTransfer",
        "VictimIdentification",
        "Alert",
    ] {
        assert_eq!(
            text.matches(&format!("opened {kind} ")).count(),
            2,
            "{kind}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_opens_to_what_was_sent_and_its_chain_is_complete() {
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let body = accord_client::demo::parse_form(accord_client::demo::EXAMPLE_FORMS[2].1).unwrap();
    let sent = vn
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &body,
            &SendOptions::new("VN-KH-1"),
        )
        .await
        .unwrap();
    assert_eq!(sent.accepted.stage(), Stage::Accepted);
    let got = fetch_n(&mut kh, 1).await.unwrap();
    assert_eq!(got[0].body, body);
    assert_eq!(got[0].envelope.id(), sent.id);
    kh.ack(&got[0]).await.unwrap();
    let chain = wait_stage(&mut vn, &sent.id, Stage::Delivered)
        .await
        .unwrap();
    let stages: Vec<_> = chain.iter().map(|r| r.stage()).collect();
    for s in [Stage::Accepted, Stage::Received, Stage::Delivered] {
        assert!(stages.contains(&s), "{stages:?}");
    }
    // Every signer fits its stage for this sender and recipient...
    let (vn_id, kh_id) = (vn.id.clone(), kh.id.clone());
    vn.status_between(&sent.id, &vn_id, &kh_id).await.unwrap();
    // ...and not for another recipient, or the other direction.
    let neighbour = net.org_id("kh", "svayrieng").unwrap();
    let err = accord_client::org::check_chain(&chain, &vn_id, &neighbour).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "DELIVERED may only be signed by the recipient organisation {neighbour}"
        )),
        "{err}"
    );
    let err = accord_client::org::check_chain(&chain, &kh_id, &vn_id).unwrap_err();
    assert!(
        err.to_string()
            .contains("ACCEPTED may only be signed by a gateway of kh (the sender's)"),
        "{err}"
    );
    // Acked envelopes leave the inbox.
    assert!(kh.fetch(10).await.unwrap().is_empty());
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_countries_are_routed_by_the_recipients_country() {
    let net = accord_tests::vn_and_kh()
        .country("la", "vientiane", &["dcp"])
        .start()
        .await
        .unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let mut la = net.client("la", "dcp").await.unwrap();
    let to_kh = vn
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert("to kh"),
            &SendOptions::new("C1"),
        )
        .await
        .unwrap();
    let to_la = vn
        .send(
            &net.org_id("la", "dcp").unwrap(),
            &alert("to la"),
            &SendOptions::new("C1"),
        )
        .await
        .unwrap();
    let kh_got = fetch_n(&mut kh, 1).await.unwrap();
    let la_got = fetch_n(&mut la, 1).await.unwrap();
    assert_eq!(kh_got.len(), 1);
    assert_eq!(la_got.len(), 1);
    assert_eq!(kh_got[0].envelope.id(), to_kh.id);
    assert_eq!(la_got[0].envelope.id(), to_la.id);
    net.shutdown().await;
}

/// A store that can no longer write stops the gateway accepting, and its health service
/// says so. The write-ahead log's folder is replaced by a file, so the next segment cannot
/// be made: submits then fail, nothing is accepted, and the health of the server, of the
/// exchange and of the peer link turns NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_turns_the_gateway_not_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    let net = TestNet::builder()
        .country("vn", "hanoi", &["c02", "inspectorate:auditor"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let exchange = pb::exchange_server::SERVICE_NAME;
    let peer_link = pb::peer_link_server::SERVICE_NAME;
    let audit = pb::audit_server::SERVICE_NAME;
    let auditor = net.client("vn", "inspectorate").await.unwrap();
    let checker = vn.health();
    let health = move |service: &str| {
        let mut client = checker.clone();
        let request = HealthCheckRequest {
            service: service.into(),
        };
        async move { client.check(request).await.unwrap().into_inner().status() }
    };
    for service in ["", exchange, peer_link, audit] {
        assert_eq!(health(service).await, ServingStatus::Serving, "{service:?}");
    }
    vn.send(&to, &alert("before"), &SendOptions::new("C2"))
        .await
        .unwrap();

    let wal = net.data_dir("vn").unwrap().join("wal");
    std::fs::rename(&wal, wal.with_extension("moved")).unwrap();
    std::fs::write(&wal, b"not a folder").unwrap();
    let started = std::time::Instant::now();
    let refused = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still accepting"
        );
        match vn.send(&to, &alert("after"), &SendOptions::new("C2")).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => break e.to_string(),
        }
    };
    assert!(refused.contains("not accepted"), "{refused}");
    while health("").await != ServingStatus::NotServing {
        assert!(started.elapsed() < Duration::from_secs(10), "still serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for service in [exchange, peer_link] {
        assert_eq!(
            health(service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert!(vn
        .send(&to, &alert("still after"), &SendOptions::new("C2"))
        .await
        .is_err());
    // Reads still work: the audit service says so, and answers.
    assert_eq!(health(audit).await, ServingStatus::Serving);
    let entries = auditor
        .audit()
        .get_entries(pb::GetEntriesRequest { start: 0, end: 1 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_down_queues_and_delivers_when_it_returns() {
    let mut net = two_countries().await;
    net.stop_gateway("kh").await.unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            vn.send(&to, &alert(&format!("queued {i}")), &SendOptions::new("C2"))
                .await
                .unwrap()
                .id,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, chain) = vn.status(&ids[0]).await.unwrap();
    assert_eq!(
        furthest_stage(&chain),
        Stage::Accepted,
        "nothing can be received while KH is down"
    );
    net.start_gateway("kh").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 5).await.unwrap();
    let got: HashSet<_> = got.iter().map(|o| o.envelope.id()).collect();
    assert_eq!(got, ids.iter().copied().collect());
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_either_gateway_mid_flow_loses_nothing_and_delivers_nothing_twice() {
    let mut net = two_countries().await;
    let to = net.org_id("kh", "ahtd").unwrap();
    let mut ids = HashSet::new();
    {
        let mut vn = net.client("vn", "c02").await.unwrap();
        for i in 0..20 {
            ids.insert(
                vn.send(&to, &alert(&format!("m{i}")), &SendOptions::new("C3"))
                    .await
                    .unwrap()
                    .id,
            );
        }
    }
    // Restart both while forwarding is under way.
    net.stop_gateway("vn").await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    net.start_gateway("kh").await.unwrap();
    net.start_gateway("vn").await.unwrap();
    {
        let mut vn = net.client("vn", "c02").await.unwrap();
        for i in 20..30 {
            ids.insert(
                vn.send(&to, &alert(&format!("m{i}")), &SendOptions::new("C3"))
                    .await
                    .unwrap()
                    .id,
            );
        }
    }
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 30).await.unwrap();
    assert_eq!(got.len(), 30, "each message exactly once in the inbox");
    let got_ids: HashSet<_> = got.iter().map(|o| o.envelope.id()).collect();
    assert_eq!(got_ids, ids);
    // The sender side still knows every message it accepted.
    let mut vn = net.client("vn", "c02").await.unwrap();
    for id in ids.iter().take(3) {
        let chain = wait_stage(&mut vn, id, Stage::Received).await.unwrap();
        assert!(chain.iter().any(|r| r.stage() == Stage::Accepted));
    }
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_item_carries_its_gateways_received_receipt() {
    use prost::Message;
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    for text in ["first", "second"] {
        vn.send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert(text),
            &SendOptions::new("C4"),
        )
        .await
        .unwrap();
    }
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    fetch_n(&mut kh, 2).await.unwrap();
    let items = kh
        .exchange()
        .fetch(pb::FetchRequest { max: 10 })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), 2);
    let kh_gateway = net.gateway_address("kh").unwrap().id.to_string();
    for item in &items {
        let receipt = item.received.as_ref().expect("a RECEIVED receipt");
        let body = pb::ReceiptBody::decode(receipt.body.as_slice()).unwrap();
        assert_eq!(body.stage, Stage::Received as i32);
        assert_eq!(body.signer, kh_gateway);
        let header = item.envelope.as_ref().unwrap().header.as_ref();
        assert_eq!(
            body.message_id,
            pb::Header::decode(header).unwrap().message_id
        );
        // Each item's own receipt, not its neighbour's.
        assert_eq!(body.envelope_hash, item.envelope_hash);
    }
    assert_ne!(items[0].envelope_hash, items[1].envelope_hash);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_submit_is_idempotent_and_returns_the_same_receipt() {
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let sent = vn
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert("once"),
            &SendOptions::new("C4"),
        )
        .await
        .unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 1).await.unwrap();
    // Submit the very same envelope again, twice.
    let wire = got[0].envelope.to_wire();
    for _ in 0..2 {
        let again = vn
            .exchange()
            .submit(pb::SubmitRequest {
                envelope: Some(wire.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .accepted
            .unwrap();
        assert_eq!(again, sent.accepted.wire);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        kh.fetch(10).await.unwrap().len(),
        1,
        "no second copy in the inbox"
    );
    net.shutdown().await;
}

/// A copy of an envelope VN accepted, submitted again by its sender past its expiry (the
/// answer to the first was lost, a send resumed late), gets the receipt it got then, not a
/// refusal as expired (or as too large, after the limit was lowered) while the first copy
/// travels on. Another organisation submitting the same bytes is checked anew, and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_submitted_again_past_its_expiry_gets_its_first_receipt() {
    let mut net = two_countries().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let sent = accord_tests::short_lived_alert(&net, &mut c02, "resumed late", 1_500)
        .await
        .unwrap();
    let wire = accord_tests::stored_envelope(&net, "vn", &sent.id).unwrap();
    let past = accord_tests::until_expiry(&net, "vn", &sent.id).unwrap();
    tokio::time::sleep(past + Duration::from_millis(200)).await;
    let again = c02
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(wire.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .accepted
        .unwrap();
    assert_eq!(again, sent.accepted.wire);

    let mut hotline = net.client("vn", "tayninh-police").await.unwrap();
    let err = hotline
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(wire.clone()),
        })
        .await
        .unwrap_err();
    // Not its own: checked anew, and refused.
    assert!(err.message().contains("EXPIRED"), "{err}");

    // Nor is its sender's copy held to a ciphertext limit lowered since.
    let smaller = wire.ciphertext.len() - 1;
    net.stop_gateway("vn").await.unwrap();
    net.set_limits("vn", &format!("max_ciphertext_bytes = {smaller}"))
        .unwrap();
    net.start_gateway("vn").await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let again = c02
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(wire),
        })
        .await
        .unwrap()
        .into_inner()
        .accepted
        .unwrap();
    assert_eq!(again, sent.accepted.wire);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_with_different_bytes_is_refused() {
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    vn.send(
        &net.org_id("kh", "ahtd").unwrap(),
        &alert("first"),
        &SendOptions::new("C5"),
    )
    .await
    .unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 1).await.unwrap();
    // Re-seal a different body under the same header fields (same message id).
    let mut header = got[0].envelope.header().clone();
    header.case_ref = "C5-changed".into();
    let pk = vn
        .directories()
        .current_encryption_key(&net.org_id("kh", "ahtd").unwrap(), header.created_at_ms)
        .unwrap()
        .1;
    let sealed =
        accord_proto::envelope::seal(header, &alert("second"), &pk, &vn.keys().signing).unwrap();
    let err = vn
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(sealed.to_wire()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_waiting_and_new_messages_live_and_can_ack_as_they_come() {
    use futures::StreamExt;
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let first = vn
        .send(&to, &alert("waiting"), &SendOptions::new("C6"))
        .await
        .unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let mut stream = std::pin::pin!(kh.subscribe().await.unwrap());
    let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.envelope.id(), first.id);
    kh.ack(&got).await.unwrap();
    // A message sent after subscribing arrives on the same stream, once.
    let second = vn
        .send(
            &to,
            &alert("live"),
            &SendOptions {
                priority: pb::Priority::Flash,
                ..SendOptions::new("C6")
            },
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.envelope.id(), second.id);
    kh.ack(&got).await.unwrap();
    wait_stage(&mut vn, &second.id, Stage::Delivered)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(700), stream.next())
            .await
            .is_err(),
        "nothing else, nothing twice"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_expires_in_the_queue_is_not_delivered_and_its_sender_gets_a_rejected_receipt(
) {
    let mut net = two_countries().await;
    net.stop_gateway("kh").await.unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let short = SendOptions {
        ttl_ms: 300,
        ..SendOptions::new("C11")
    };
    let doomed = vn.send(&to, &alert("too late"), &short).await.unwrap();
    let kept = vn
        .send(&to, &alert("in time"), &SendOptions::new("C11"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    net.start_gateway("kh").await.unwrap();
    let chain = wait_stage(&mut vn, &doomed.id, Stage::Rejected)
        .await
        .unwrap();
    let rejected = chain.iter().find(|r| r.stage() == Stage::Rejected).unwrap();
    assert_eq!(rejected.body.reason, pb::RejectReason::Expired as i32);
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<_> = got.iter().map(|o| o.envelope.id()).collect();
    assert_eq!(
        got,
        vec![kept.id],
        "the expired envelope is never delivered"
    );
    // Both left VN's outbox (the kept one once KH took it), and the expired one was
    // retired once, not at every round.
    let vn_store = net.gateway("vn").unwrap().pipeline.store.clone();
    let outbox = Queue::Outbox("kh".parse().unwrap());
    for _ in 0..100 {
        if vn_store.queue(&outbox, 10).unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        vn_store.queue(&outbox, 10).unwrap().is_empty(),
        "left in the outbox"
    );
    let (_, chain) = vn.status(&doomed.id).await.unwrap();
    let rejected = chain
        .iter()
        .filter(|r| r.stage() == Stage::Rejected)
        .count();
    assert_eq!(rejected, 1, "retired {rejected} times");
    net.shutdown().await;
}

/// An envelope that expires while KH stays down is retired by VN, and its sender learns it
/// without waiting for KH: the forwarder's calls never reached KH (no connection), so
/// nothing marks the envelope as one KH may hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_expires_while_its_peer_stays_down_is_retired_here() {
    let mut net = two_countries().await;
    net.stop_gateway("kh").await.unwrap();
    // VN notices its connection to KH closed: a call on a connection closing under it may
    // have reached KH, and would rightly leave the envelope to KH's word.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let doomed = accord_tests::short_lived_alert(&net, &mut vn, "too late", 1_000)
        .await
        .unwrap();
    accord_tests::expired_at_vn(&mut vn, &doomed.id)
        .await
        .unwrap();
    let outbox = Queue::Outbox("kh".parse().unwrap());
    let vn_store = net.gateway("vn").unwrap().pipeline.store.clone();
    assert!(vn_store.queue(&outbox, 10).unwrap().is_empty());
    net.shutdown().await;
}

/// VN C02 sends KH AHTD an alert with a short life, and AHTD acknowledges it (or refuses
/// it, `refuse`); then, with KH down, VN's outbox holds the envelope again, as after a lost
/// answer, until the forwarder takes it off past its expiry. The stages and reasons of the
/// sender's chain then.
async fn ended_then_found_in_the_outbox(refuse: bool) -> Vec<(Stage, i32)> {
    let mut net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    // Long enough for KH to deliver it first on a loaded machine.
    let short = SendOptions {
        ttl_ms: 4_000,
        ..SendOptions::new("C11")
    };
    let sent = vn
        .send(&to, &alert("answered, answer lost"), &short)
        .await
        .unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 1).await.unwrap();
    let ending = if refuse {
        let opened = &got[0].envelope;
        kh.refuse(&opened.id(), &opened.hash()).await.unwrap();
        Stage::Rejected
    } else {
        kh.ack(&got[0]).await.unwrap();
        Stage::Delivered
    };
    wait_stage(&mut vn, &sent.id, ending).await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    let pipeline = net.gateway("vn").unwrap().pipeline.clone();
    let outbox = Queue::Outbox("kh".parse().unwrap());
    let again = accord_gateway::store::Op::Enqueue(
        outbox.clone(),
        pb::Priority::Routine,
        accord_gateway::store::QueueEntry::message(&sent.id),
    );
    pipeline
        .store
        .commit(accord_gateway::store::Tx {
            ops: vec![again],
            receipts: None,
        })
        .await
        .unwrap();
    assert_eq!(pipeline.store.queue(&outbox, 10).unwrap().len(), 1);
    for _ in 0..200 {
        if pipeline.store.queue(&outbox, 10).unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pipeline.store.queue(&outbox, 10).unwrap().is_empty());
    let (_, chain) = vn.status(&sent.id).await.unwrap();
    net.shutdown().await;
    chain.iter().map(|r| (r.stage(), r.body.reason)).collect()
}

/// An envelope still in VN's outbox that KH delivered meanwhile is not retired as expired
/// when its time runs out: its DELIVERED receipt came back, so the entry only leaves the
/// outbox, and the sender's chain holds one ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_delivered_while_its_entry_waited_is_not_expired_beside_it() {
    let chain = ended_then_found_in_the_outbox(false).await;
    let stages: Vec<Stage> = chain.iter().map(|(s, _)| *s).collect();
    assert!(stages.contains(&Stage::Delivered), "{chain:?}");
    assert!(!stages.contains(&Stage::Rejected), "{chain:?}");
}

/// The same for an envelope its recipient refused: a refusal is an ending too, and the
/// chain holds that one REJECTED, not a second one for its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_refused_while_its_entry_waited_is_not_expired_beside_it() {
    let chain = ended_then_found_in_the_outbox(true).await;
    let rejected: Vec<i32> = chain
        .iter()
        .filter(|(s, _)| *s == Stage::Rejected)
        .map(|(_, reason)| *reason)
        .collect();
    assert_eq!(
        rejected,
        vec![pb::RejectReason::RefusedByRecipient as i32],
        "{chain:?}"
    );
}

/// The store's quota (`queue_quota_bytes`) refuses new envelopes with RESOURCE_EXHAUSTED and
/// the `quota-full` key once the store outgrows it, and loses nothing it accepted before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_over_its_quota_refuses_new_envelopes_and_keeps_what_it_accepted() {
    let net = accord_tests::vn_and_kh()
        .limits("vn", "queue_quota_bytes = 4194304")
        .start()
        .await
        .unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let kh = net.org_id("kh", "ahtd").unwrap();
    let body = accord_client::bench::body_of_size(64 << 10);
    let mut accepted = HashSet::new();
    let refused = loop {
        assert!(accepted.len() < 200, "4 MiB quota never reached");
        match vn
            .send(&kh, &body, &SendOptions::new("VN-KH-2026-0099"))
            .await
        {
            Ok(sent) => {
                accepted.insert(sent.id);
            }
            Err(accord_client::org::ClientError::Gateway(status)) => break status,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(
        accord_gateway::service::error_key(&refused),
        Some(accord_gateway::service::QUOTA_FULL)
    );
    assert!(!accepted.is_empty());
    // An envelope whose attachment was never uploaded: the full store says it is full,
    // rather than asking for chunks it could not keep (a peer's forwarder would push them).
    let files = tempfile::tempdir().unwrap();
    let scan = files.path().join("scan.pdf");
    std::fs::write(&scan, vec![7u8; 1000]).unwrap();
    let letter = pb::Body {
        form: Some(pb::body::Form::Correspondence(pb::Correspondence {
            text: "the scan".into(),
            attachments: vec![],
        })),
    };
    let mut chunks = Vec::new();
    let (sealed, _) = vn
        .seal_with_files(
            &kh,
            &letter,
            &SendOptions::new("VN-KH-2026-0099"),
            &mut [accord_client::attach::FileToSend {
                path: &scan,
                media_type: "application/pdf".into(),
                out: &mut chunks,
            }],
        )
        .unwrap();
    match vn.submit(&sealed).await {
        Err(accord_client::org::ClientError::Gateway(status)) => assert_eq!(
            accord_gateway::service::error_key(&status),
            Some(accord_gateway::service::QUOTA_FULL),
            "{status:?}"
        ),
        other => panic!("{other:?}"),
    }
    // Everything accepted before the refusal is delivered.
    let mut kh_client = net.client("kh", "ahtd").await.unwrap();
    let got: HashSet<_> = fetch_n(&mut kh_client, accepted.len())
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.envelope.id())
        .collect();
    assert_eq!(got, accepted);
    net.shutdown().await;
}

/// A recipient working through a backlog acknowledges it in one call; each receipt in it
/// is decided on its own, so one that is not the recipient's to give is refused while the
/// others are taken, and a repeat is harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_acknowledged_in_one_call_each_receipt_decided_on_its_own() {
    let net = two_countries().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let mut sent = Vec::new();
    for i in 0..3 {
        let s = c02
            .send(
                &to,
                &alert(&format!("backlog {i}")),
                &SendOptions::new("B1"),
            )
            .await
            .unwrap();
        sent.push(s);
    }
    let opened = fetch_n(&mut ahtd, 3).await.unwrap();

    // Through the client library: two taken, each with its own delivered receipt.
    let taken = ahtd.ack_many(&opened[..2]).await.unwrap();
    assert_eq!(taken.len(), 2);
    for (done, o) in taken.iter().zip(&opened) {
        let r = accord_proto::receipt::verify(done.as_ref().unwrap(), ahtd.directories()).unwrap();
        assert_eq!(
            (r.stage(), r.message_id),
            (Stage::Delivered, o.envelope.id())
        );
    }

    // On the wire: the third, a repeat of the first, and a receipt of a stage only a
    // gateway signs (RECEIVED, signed by the recipient): refused on its own.
    let signing = &ahtd.keys().signing;
    let body = |o: &accord_client::org::Opened, stage: Stage| pb::ReceiptBody {
        envelope_hash: o.envelope.hash().0.to_vec(),
        message_id: o.envelope.id().as_bytes().to_vec(),
        stage: stage as i32,
        signer: to.to_string(),
        signer_key_id: signing.key_id().to_owned(),
        at_ms: accord_tests::now_ms(),
        log_index: 0,
        reason: 0,
    };
    let receipts = vec![
        accord_proto::receipt::sign(&body(&opened[2], Stage::Delivered), signing),
        taken[0].as_ref().unwrap().clone(),
        accord_proto::receipt::sign(&body(&opened[2], Stage::Received), signing),
    ];
    let results = ahtd
        .exchange()
        .ack_many(pb::AckManyRequest { receipts })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<tonic::Code> = results.iter().map(|r| tonic::Code::from(r.code)).collect();
    assert_eq!(
        codes,
        [
            tonic::Code::Ok,
            tonic::Code::Ok,
            tonic::Code::InvalidArgument
        ],
        "{results:?}"
    );

    // Each sender's chain ends in one delivery.
    for s in &sent {
        let chain = wait_stage(&mut c02, &s.id, Stage::Delivered).await.unwrap();
        let deliveries = chain.iter().filter(|r| r.stage() == Stage::Delivered);
        assert_eq!(deliveries.count(), 1);
    }
    assert!(
        ahtd.fetch(10).await.unwrap().is_empty(),
        "the inbox is empty"
    );

    // More than a call may carry is refused whole.
    let first = taken[0].as_ref().unwrap().clone();
    let too_many = vec![first; accord_gateway::service::MAX_BATCH + 1];
    let err = ahtd
        .exchange()
        .ack_many(pb::AckManyRequest { receipts: too_many })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    net.shutdown().await;
}

/// AHTD's acknowledgement is cancelled once KH's gateway handed its commit to the store (a
/// client that hung up), and AHTD's refusal of the same message comes right behind it:
/// the refusal is decided only against the landed acknowledgement, so the message ends
/// once. Released with the cancelled call instead, the guard let the refusal read the
/// chain before the acknowledgement landed, and both were stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_acknowledgement_still_holds_off_a_contrary_ending_until_it_lands() {
    use std::future::Future as _;
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let kh = net.gateway("kh").unwrap().pipeline.clone();
    let caller: accord_proto::ids::SpiffeId = to.to_string().parse().unwrap();
    for round in 0..5 {
        let sent = vn
            .send(&to, &alert("acked, then refused"), &SendOptions::new("C11"))
            .await
            .unwrap();
        let got = fetch_n(&mut ahtd, 1).await.unwrap();
        let (id, hash) = (got[0].envelope.id(), got[0].envelope.hash());
        let ending = |stage: Stage, reason: pb::RejectReason| {
            let body = pb::ReceiptBody {
                envelope_hash: hash.0.to_vec(),
                message_id: id.as_bytes().to_vec(),
                stage: stage as i32,
                signer: to.to_string(),
                signer_key_id: ahtd.keys().signing.key_id().to_owned(),
                at_ms: accord_tests::now_ms(),
                log_index: 0,
                reason: reason as i32,
            };
            accord_proto::receipt::sign(&body, &ahtd.keys().signing)
        };
        let delivered = ending(Stage::Delivered, pb::RejectReason::Unspecified);
        let refused = ending(Stage::Rejected, pb::RejectReason::RefusedByRecipient);
        {
            let mut ack = std::pin::pin!(kh.ack(&caller, &delivered));
            let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(ack.as_mut().poll(cx)));
            assert!(polled.await.is_pending(), "the commit waits for its sync");
        }
        // The acknowledgement's commit is with the store; its caller is gone.
        let refusal = kh.ack(&caller, &refused).await;
        assert!(refusal.is_err(), "round {round}: {refusal:?}");
        // Its commit lands on its own.
        let mut endings = Vec::new();
        for _ in 0..200 {
            let (_, chain) = ahtd.status(&sent.id).await.unwrap();
            endings = chain
                .iter()
                .map(|r| r.stage())
                .filter(|s| matches!(s, Stage::Delivered | Stage::Rejected))
                .collect();
            if !endings.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(endings, vec![Stage::Delivered], "round {round}");
    }
    net.shutdown().await;
}

/// AHTD opened an alert that then expired in KH's inbox. Its refusal, coming after, is
/// refused as too late (the delivery ended as expired), not answered as if it were on
/// record: an expiry is a REJECTED too, but not the recipient's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_the_message_expired_in_the_inbox_is_refused_as_too_late() {
    let net = two_countries().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let sent = accord_tests::short_lived_alert(&net, &mut vn, "opened, then expired", 1_500)
        .await
        .unwrap();
    let got = fetch_n(&mut ahtd, 1).await.unwrap();
    let (id, hash) = (got[0].envelope.id(), got[0].envelope.hash());
    // Past its expiry, the next look at the inbox retires it.
    let wait = (got[0].envelope.header().expires_at_ms - accord_tests::now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait + 200)).await;
    assert!(ahtd.fetch(10).await.unwrap().is_empty());
    let chain = wait_stage(&mut vn, &sent.id, Stage::Rejected)
        .await
        .unwrap();
    let refused = ahtd.refuse(&id, &hash).await;
    match refused {
        Err(accord_client::org::ClientError::Gateway(s)) => {
            assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}")
        }
        other => panic!("{other:?}"),
    }
    let reasons: Vec<i32> = chain
        .iter()
        .filter(|r| r.stage() == Stage::Rejected)
        .map(|r| r.body.reason)
        .collect();
    assert_eq!(reasons, vec![pb::RejectReason::Expired as i32]);
    net.shutdown().await;
}
