//! The non-repudiation log end to end: checkpoints cosigned across the border, proofs from
//! the audit service, a rewritten log caught by the peer, durability across restarts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use accord_client::org::{OrgClient, SendOptions};
use accord_gateway::store::{Op, Store, Tx};
use accord_proto::merkle::{self, MemoryTree};
use accord_proto::note::{self, Checkpoint, CosignatureVerifier, NoteVerifier};
use accord_proto::pb;
use accord_tests::{alert, fetch_n, TestNet};

async fn net() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02", "inspectorate:auditor"])
        .country("kh", "phnom-penh", &["ahtd", "inspectorate:auditor"])
        .start()
        .await
        .unwrap()
}

fn gateway_entry(client: &OrgClient, cc: &str) -> pb::GatewayEntry {
    client
        .directories()
        .to_wire()
        .into_iter()
        .find(|d| d.country == cc)
        .unwrap()
        .gateways
        .remove(0)
}

/// Waits until the newest checkpoint of the auditor's gateway is cosigned by `witness_cc`
/// and covers at least `min_size` entries; returns it opened and parsed.
async fn cosigned_checkpoint(
    auditor: &OrgClient,
    own_cc: &str,
    witness_cc: &str,
    min_size: u64,
) -> (String, Checkpoint) {
    let own = gateway_entry(auditor, own_cc);
    let witness: CosignatureVerifier = gateway_entry(auditor, witness_cc)
        .witness_verifier_key
        .parse()
        .unwrap();
    let log_key: NoteVerifier = own.log_verifier_key.parse().unwrap();
    for _ in 0..200 {
        let text = auditor
            .audit()
            .get_checkpoint(pb::GetCheckpointRequest {})
            .await
            .unwrap()
            .into_inner()
            .checkpoint;
        let opened = note::open(&text, std::slice::from_ref(&log_key)).unwrap();
        let cp = Checkpoint::parse(&opened.body).unwrap();
        assert_eq!(cp.origin, own.log_origin);
        if cp.size >= min_size && witness.verify_opened(&opened).is_ok() {
            return (text, cp);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no checkpoint of {own_cc} cosigned by {witness_cc}");
}

async fn entries(auditor: &OrgClient, size: u64) -> Vec<Vec<u8>> {
    auditor
        .audit()
        .get_entries(pb::GetEntriesRequest {
            start: 0,
            end: size,
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_cosigned_by_the_peer_and_match_the_entries_independently() {
    let net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let sent = c02
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert("logged"),
            &SendOptions::new("L1"),
        )
        .await
        .unwrap();
    let got = fetch_n(&mut ahtd, 1).await.unwrap();
    ahtd.ack(&got[0]).await.unwrap();

    let vn_auditor = net.client("vn", "inspectorate").await.unwrap();
    let (_, cp) =
        cosigned_checkpoint(&vn_auditor, "vn", "kh", sent.accepted.body.log_index + 1).await;
    // Recompute the root from the raw entries with an independent in-memory tree.
    let all = entries(&vn_auditor, cp.size).await;
    let mut tree = MemoryTree::new();
    for e in &all {
        tree.push(accord_proto::log::leaf_hash(e));
    }
    assert_eq!(merkle::root(&tree, cp.size).unwrap(), cp.root);
    // The accepted receipt's log index names the ACCEPTED entry of this message.
    let accepted =
        pb::LogEntry::decode(all[sent.accepted.body.log_index as usize].as_slice()).unwrap();
    assert_eq!(accepted.event, pb::LogEvent::Accepted as i32);
    assert_eq!(accepted.message_id, sent.id.as_bytes().to_vec());
    assert!(
        all.iter()
            .all(|e| !String::from_utf8_lossy(e).contains("logged")),
        "no contents in the log"
    );

    // Inclusion proof from the audit service verifies against the cosigned root.
    let index = sent.accepted.body.log_index;
    let proof = vn_auditor
        .audit()
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            index,
            tree_size: cp.size,
        })
        .await
        .unwrap()
        .into_inner()
        .proof;
    let proof = accord_tests::hashes(&proof).unwrap();
    merkle::verify_inclusion(
        &accord_proto::log::leaf_hash(&all[index as usize]),
        index,
        cp.size,
        &proof,
        &cp.root,
    )
    .unwrap();

    // More traffic, a newer checkpoint, and a consistency proof between the two.
    c02.send(
        &net.org_id("kh", "ahtd").unwrap(),
        &alert("more"),
        &SendOptions::new("L1"),
    )
    .await
    .unwrap();
    let (_, cp2) = cosigned_checkpoint(&vn_auditor, "vn", "kh", cp.size + 1).await;
    let proof = vn_auditor
        .audit()
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            size1: cp.size,
            size2: cp2.size,
        })
        .await
        .unwrap()
        .into_inner()
        .proof;
    let proof = accord_tests::hashes(&proof).unwrap();
    merkle::verify_consistency(cp.size, cp2.size, &cp.root, &cp2.root, &proof).unwrap();
    // The KH side is witnessed by VN the same way.
    let kh_auditor = net.client("kh", "inspectorate").await.unwrap();
    cosigned_checkpoint(&kh_auditor, "kh", "vn", 1).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_auditors_reach_the_audit_service_and_auditors_cannot_exchange() {
    let net = net().await;
    let c02 = net.client("vn", "c02").await.unwrap();
    let err = c02
        .audit()
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut auditor = net.client("vn", "inspectorate").await.unwrap();
    let err = auditor
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert("x"),
            &SendOptions::new("L2"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, accord_client::org::ClientError::Gateway(ref s) if s.code() == tonic::Code::PermissionDenied),
        "{err}"
    );
    let err = auditor.fetch(10).await.unwrap_err();
    assert!(
        matches!(err, accord_client::org::ClientError::Gateway(ref s) if s.code() == tonic::Code::PermissionDenied),
        "{err}"
    );
    let err = auditor
        .audit()
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            index: 5,
            tree_size: 1_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_rewritten_behind_the_gateways_back_is_caught_by_its_peer() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    for i in 0..3 {
        c02.send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert(&format!("r{i}")),
            &SendOptions::new("L3"),
        )
        .await
        .unwrap();
    }
    let vn_auditor = net.client("vn", "inspectorate").await.unwrap();
    let (_, cp) = cosigned_checkpoint(&vn_auditor, "vn", "kh", 6).await;
    drop((c02, vn_auditor));
    net.stop_gateway("vn").await.unwrap();

    // Rewrite history: drop every log entry and tree node, and what indexes them (event keys,
    // and the receipts, whose records carry their transactions' entries), then append
    // different entries.
    let dir = net.data_dir("vn").unwrap();
    {
        // The stopped gateway's sled lets go of its lock from a background thread.
        let started = std::time::Instant::now();
        let db = loop {
            match sled::open(&dir) {
                Ok(db) => break db,
                Err(e) if started.elapsed() > Duration::from_secs(5) => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        for prefix in [b"l", b"n", b"e", b"r", b"k"] {
            for key in db.scan_prefix(prefix).keys() {
                db.remove(key.unwrap()).unwrap();
            }
        }
        db.insert(b"slog", &0u64.to_be_bytes()[..]).unwrap();
        db.flush().unwrap();
    }
    // The runs hold every key written since the store's layout 4, those among them: all
    // emptied, the log's size with them. The store refuses runs that end before the
    // checkpoint `runs.last` records, a guard against a restore that missed some, not
    // against someone rewriting the store: the rewrite records none.
    std::fs::remove_dir_all(dir.join("runs")).unwrap();
    std::fs::create_dir(dir.join("runs")).unwrap();
    std::fs::write(dir.join("runs.last"), format!("{:020}\n", 0)).unwrap();
    // The store's open waits for the lock the drop above lets go of.
    let forged = (0..cp.size + 2)
        .map(|i| Op::Log(format!("forged {i}").into_bytes()))
        .collect();
    commit_to_stopped_vn(&net, forged).await;
    net.start_gateway("vn").await.unwrap();
    let kh = net.gateway("kh").unwrap().pipeline.clone();
    for _ in 0..200 {
        if kh.witness_alarms.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kh.witness_alarms.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "KH did not raise the alarm"
    );
    // The alarm is in KH's own log.
    let kh_auditor = net.client("kh", "inspectorate").await.unwrap();
    let (_, kh_cp) = cosigned_checkpoint(&kh_auditor, "kh", "vn", 0).await;
    let size = kh.store.log_size().unwrap();
    let all = entries(&kh_auditor, size).await;
    assert!(
        all.iter()
            .any(|e| pb::LogEntry::decode(e.as_slice()).unwrap().event
                == pb::LogEvent::WitnessAlarm as i32),
        "no WITNESS_ALARM entry (checkpoint {})",
        kh_cp.size
    );
    net.shutdown().await;
}

/// Sends one alert from VN's c02 to KH's ahtd.
async fn send_one_alert(net: &TestNet) {
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    c02.send(&to, &alert("one"), &SendOptions::new("L5"))
        .await
        .unwrap();
}

/// Sends one alert from VN to KH and waits for a VN checkpoint cosigned by KH that covers
/// it; returns that checkpoint, note and parsed.
async fn one_exchange_cosigned(net: &TestNet) -> (String, Checkpoint) {
    send_one_alert(net).await;
    let auditor = net.client("vn", "inspectorate").await.unwrap();
    cosigned_checkpoint(&auditor, "vn", "kh", 2).await
}

/// The stopped VN gateway's store, opened by the test.
fn vn_store(net: &TestNet) -> accord_gateway::store::sled::SledStore {
    let dir = net.data_dir("vn").unwrap();
    accord_gateway::store::sled::SledStore::open(&dir, 1 << 20).unwrap()
}

/// Commits `ops` in one transaction to the stopped VN gateway's store.
async fn commit_to_stopped_vn(net: &TestNet, ops: Vec<Op>) {
    let store = vn_store(net);
    let tx = Tx {
        ops,
        receipts: None,
    };
    store.commit(tx).await.unwrap();
}

/// VN refuses to publish a checkpoint, and `checkpoint/latest` still holds `latest`.
async fn assert_no_checkpoint_signed(net: &TestNet, latest: &[u8]) {
    let auditor = net.client("vn", "inspectorate").await.unwrap();
    let err = auditor
        .audit()
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Internal,
        "latest {latest:?}: {err}"
    );
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    let stored = vn.store.meta("checkpoint/latest").unwrap().unwrap();
    assert_eq!(stored, latest, "a checkpoint was signed");
}

/// A log shorter than its last signed checkpoint (a store restored from an older backup, or
/// a damaged size), a last checkpoint that no longer reads or is of another size, or a size
/// record that is not a size, is never signed over: each would move the signed log back or
/// fork it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_behind_its_last_checkpoint_is_not_signed() {
    let mut net = net().await;
    let (note, cp) = one_exchange_cosigned(&net).await;
    let size = |n: u64| n.to_be_bytes().to_vec();
    // (checkpoint/latest, the note stored under it, whether the log grows past it)
    let cases = [
        (size(cp.size + 100), None, false),
        (size(cp.size), Some(Vec::new()), true),
        (size(cp.size - 1), Some(note.into_bytes()), false),
        // Damaged: read as 0, it would skip the consistency check altogether.
        (size(cp.size)[..7].to_vec(), None, true),
    ];
    for (latest, stored_note, grow) in cases {
        net.stop_gateway("vn").await.unwrap();
        let mut ops = vec![Op::PutMeta("checkpoint/latest".into(), latest.clone())];
        if let Some(text) = stored_note {
            let at = u64::from_be_bytes(latest.clone().try_into().unwrap());
            ops.push(Op::PutMeta(format!("checkpoint/{at}"), text));
        }
        if grow {
            ops.push(Op::Log(b"an entry after the damaged checkpoint".to_vec()));
        }
        commit_to_stopped_vn(&net, ops).await;
        net.start_gateway("vn").await.unwrap();
        assert_no_checkpoint_signed(&net, &latest).await;
    }
    net.shutdown().await;
}

/// A tree node changed on disk under a signed checkpoint (a damaged disk: the log's files
/// carry no checksums) stops the gateway signing: a new checkpoint would not extend the
/// old one, and peers and auditors would see a forked log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_tree_node_stops_the_gateway_signing_checkpoints() {
    let mut net = net().await;
    one_exchange_cosigned(&net).await;
    net.stop_gateway("vn").await.unwrap();

    // The newest checkpoint signed (maybe newer than the one above), and the log's size.
    let (signed, size) = {
        let store = vn_store(&net);
        let latest = store.meta("checkpoint/latest").unwrap().unwrap();
        let latest = u64::from_be_bytes(latest.try_into().unwrap());
        (latest, store.log_size().unwrap())
    };
    // Damage a node the next root reads, or derives a node from, and that the checkpoint
    // covers: the perfect subtree of the log of `size` that holds leaf signed − 1.
    let (mut level, mut start) = (63, 0u64);
    loop {
        let width = 1u64 << level;
        if size & width != 0 {
            if signed - 1 < start + width {
                break;
            }
            start += width;
        }
        level -= 1;
    }
    let last = start + (1u64 << level) - 1;
    let position = 2 * last - u64::from(last.count_ones()) + level;
    let nodes = net.data_dir("vn").unwrap().join("log").join("nodes");
    let mut bytes = std::fs::read(&nodes).unwrap();
    bytes[(position * 32) as usize] ^= 0x01;
    std::fs::write(&nodes, bytes).unwrap();

    net.start_gateway("vn").await.unwrap();
    // The log grows past the checkpoint, so the next one must extend it.
    send_one_alert(&net).await;
    assert_no_checkpoint_signed(&net, &signed.to_be_bytes()).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_log_matches_its_last_checkpoint_and_appends_continue() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    c02.send(&to, &alert("before"), &SendOptions::new("L4"))
        .await
        .unwrap();
    let auditor = net.client("vn", "inspectorate").await.unwrap();
    let (_, before) = cosigned_checkpoint(&auditor, "vn", "kh", 2).await;
    drop((c02, auditor));
    net.stop_gateway("vn").await.unwrap();
    net.start_gateway("vn").await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let sent = c02
        .send(&to, &alert("after"), &SendOptions::new("L4"))
        .await
        .unwrap();
    assert!(
        sent.accepted.body.log_index >= before.size,
        "appends continue after the last checkpoint"
    );
    let auditor = net.client("vn", "inspectorate").await.unwrap();
    let (_, after) =
        cosigned_checkpoint(&auditor, "vn", "kh", sent.accepted.body.log_index + 1).await;
    let proof = auditor
        .audit()
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            size1: before.size,
            size2: after.size,
        })
        .await
        .unwrap()
        .into_inner()
        .proof;
    let proof = accord_tests::hashes(&proof).unwrap();
    merkle::verify_consistency(before.size, after.size, &before.root, &after.root, &proof).unwrap();
    net.shutdown().await;
}

use prost::Message as _;
