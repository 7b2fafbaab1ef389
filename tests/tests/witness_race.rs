//! Split views: two concurrent Witness calls for the same peer, each carrying a different
//! checkpoint of the same size, both consistent with what KH last cosigned. A correct witness
//! cosigns at most one of them (found by review; this test reproduced it 10 times in 30).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use accord_client::org::SendOptions;
use accord_proto::merkle::{self, MemoryTree};
use accord_proto::note::{self, Checkpoint};
use accord_proto::pb;
use accord_tests::alert;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_witness_never_cosigns_two_different_checkpoints_of_one_size() {
    let mut net = accord_tests::vn_and_kh().start().await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    c02.send(
        &net.org_id("kh", "ahtd").unwrap(),
        &alert("x"),
        &SendOptions::new("L1"),
    )
    .await
    .unwrap();
    drop(c02);
    let kh = net.gateway("kh").unwrap().pipeline.clone();
    for _ in 0..200 {
        if kh
            .store
            .meta("witnessed/spiffe://vn.accord/gateway/hanoi")
            .unwrap()
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    net.stop_gateway("vn").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // VN's real log, read from its store.
    let dir = net.data_dir("vn").unwrap();
    let mut entries = Vec::new();
    {
        use accord_gateway::store::Store;
        let store = accord_gateway::store::sled::SledStore::open(&dir, 1 << 20).unwrap();
        let n = store.log_size().unwrap();
        for i in 0..n {
            entries.push(store.log_entry(i).unwrap().unwrap());
        }
    }
    let vn_id: accord_proto::ids::SpiffeId = "spiffe://vn.accord/gateway/hanoi".parse().unwrap();
    let origin = accord_gateway::transparency::origin(&vn_id);
    let key =
        accord_gateway::server::load_key_file(&net.root().join("pki/vn/gateway/log-key.json"))
            .unwrap();
    let signer = note::NoteSigner::new(&origin, key.signing).unwrap();

    let mut split_views = 0;
    for round in 0..30 {
        let stored = String::from_utf8(
            kh.store
                .meta("witnessed/spiffe://vn.accord/gateway/hanoi")
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        let body = stored.split("\n\n").next().unwrap().to_owned() + "\n";
        let last = Checkpoint::parse(&body).unwrap();
        // Rebuild the tree KH holds us to (fork entries of earlier rounds are in `entries`).
        let mut base = MemoryTree::new();
        for e in &entries[..last.size as usize] {
            base.push(accord_proto::log::leaf_hash(e));
        }
        assert_eq!(
            merkle::root(&base, last.size).unwrap(),
            last.root,
            "round {round}"
        );
        let mut reqs = Vec::new();
        let mut forks = Vec::new();
        for fork in ["A", "B"] {
            let mut t = MemoryTree::new();
            for e in &entries[..last.size as usize] {
                t.push(accord_proto::log::leaf_hash(e));
            }
            let extra = format!("fork {fork} round {round}").into_bytes();
            t.push(accord_proto::log::leaf_hash(&extra));
            let size = last.size + 1;
            let cp = Checkpoint {
                origin: origin.clone(),
                size,
                root: merkle::root(&t, size).unwrap(),
                extensions: vec![],
            };
            let note_text = signer.sign(&cp.to_body()).unwrap();
            let proof = merkle::consistency_proof(&t, last.size, size).unwrap();
            reqs.push(pb::WitnessRequest {
                old_size: last.size,
                consistency_proof: proof.iter().map(|h| h.to_vec()).collect(),
                checkpoint: note_text,
            });
            forks.push((cp.root, extra));
        }
        let (a, b) = {
            let (k1, k2) = (kh.clone(), kh.clone());
            let (v1, v2) = (vn_id.clone(), vn_id.clone());
            let (r1, r2) = (reqs.remove(0), reqs.remove(0));
            let h1 = tokio::spawn(async move { k1.witness(&v1, r1).await });
            let h2 = tokio::spawn(async move { k2.witness(&v2, r2).await });
            (h1.await.unwrap(), h2.await.unwrap())
        };
        let cos =
            |r: &Result<pb::WitnessResponse, _>| matches!(r, Ok(w) if !w.cosignature.is_empty());
        if cos(&a) && cos(&b) {
            split_views += 1;
        }
        // Continue from whichever fork KH persisted.
        let stored = String::from_utf8(
            kh.store
                .meta("witnessed/spiffe://vn.accord/gateway/hanoi")
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        let body = stored.split("\n\n").next().unwrap().to_owned() + "\n";
        let now = Checkpoint::parse(&body).unwrap();
        let (_, extra) = forks.into_iter().find(|(r, _)| *r == now.root).unwrap();
        entries.truncate(last.size as usize);
        entries.push(extra);
    }
    eprintln!("rounds where KH cosigned two different checkpoints of one size: {split_views}/30");
    assert_eq!(split_views, 0, "witness cosigned a split view");
    net.shutdown().await;
}
