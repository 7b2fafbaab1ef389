//! Attachments through real gateways: files cross the border in encrypted chunks checked at
//! every hop, an interrupted upload resumes with only what is missing, and chunks that do
//! not match the signed header, uploads by the wrong party and downloads by anyone but the
//! recipient are refused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accord_client::attach::{Outbox, Progress, ProgressFn};
use accord_client::org::{ClientError, OrgClient, SendOptions};
use accord_proto::attachment::{self, DEFAULT_CHUNK_SIZE};
use accord_proto::envelope::{SealedEnvelope, Sealer};
use accord_proto::ids::EnvelopeHash;
use accord_proto::pb;
use accord_tests::{fetch_n, now_ms, peer_link_as, TestNet};
use prost::Message;

async fn net() -> TestNet {
    TestNet::builder()
        .country("vn", "hanoi", &["c02", "tay-ninh"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap()
}

fn letter(text: &str) -> pb::Body {
    pb::Body {
        form: Some(pb::body::Form::Correspondence(pb::Correspondence {
            text: text.into(),
            attachments: vec![],
        })),
    }
}

/// A file of `len` bytes that no two offsets repeat within a chunk.
fn write_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let bytes: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn recorder() -> (ProgressFn, Arc<Mutex<Vec<Progress>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        Arc::new(move |p: &Progress| s.lock().unwrap().push(p.clone())),
        seen,
    )
}

fn chunk_dir(net: &TestNet, cc: &str, hash: &EnvelopeHash) -> PathBuf {
    net.data_dir(cc)
        .unwrap()
        .join("attachments")
        .join(hash.to_string())
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_cross_the_border_in_chunks_and_arrive_intact() {
    let net = net().await;
    let tmp = tempfile::tempdir().unwrap();
    let scan = write_file(
        tmp.path(),
        "passport-scan.pdf",
        2 * DEFAULT_CHUNK_SIZE as usize + 12_345,
    );
    let photo = write_file(tmp.path(), "vehicle.jpg", 5_000);
    let mut vn = net.client("vn", "c02").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let outbox = Outbox::open(&net.org_dir("vn", "c02").unwrap()).unwrap();
    let (progress, seen) = recorder();
    let files = vec![
        (scan.clone(), "application/pdf".to_owned()),
        (photo.clone(), "image/jpeg".to_owned()),
    ];
    let sent = vn
        .send_files(
            &kh.id,
            &letter("scan of the passport and the vehicle"),
            &SendOptions::new("VN-KH-2026-0042"),
            &files,
            &outbox,
            progress,
        )
        .await
        .unwrap();
    // Progress reached the whole of each file, and the spool is gone once accepted.
    let seen = seen.lock().unwrap().clone();
    for (name, len) in [
        ("passport-scan.pdf", 2 * 1048576 + 12_345),
        ("vehicle.jpg", 5_000),
    ] {
        assert!(
            seen.iter()
                .any(|p| p.name == name && p.done == len && p.total == len),
            "{seen:?}"
        );
    }
    assert!(outbox.pending().unwrap().is_empty());

    let got = fetch_n(&mut kh, 1).await.unwrap();
    let opened = &got[0];
    assert_eq!(opened.envelope.attachments().len(), 2);
    let out = tempfile::tempdir().unwrap();
    let (progress, _) = recorder();
    let saved = kh.download(opened, out.path(), progress).await.unwrap();
    assert_eq!(saved.len(), 2);
    assert_eq!(
        std::fs::read(&saved[0]).unwrap(),
        std::fs::read(&scan).unwrap()
    );
    assert_eq!(
        std::fs::read(&saved[1]).unwrap(),
        std::fs::read(&photo).unwrap()
    );
    assert!(saved[0].ends_with(format!("{}/1-passport-scan.pdf", sent.id)));

    // Delivered: the recipient's gateway drops the chunks, and so did the sender's once
    // the peer held them and answered with its received receipt.
    kh.ack(opened).await.unwrap();
    assert!(!chunk_dir(&net, "kh", &sent.hash).exists());
    eventually("VN drops the forwarded chunks", || {
        !chunk_dir(&net, "vn", &sent.hash).exists()
    })
    .await;
    for attempt in 0.. {
        let (_, chain) = vn.status(&sent.id).await.unwrap();
        if chain.iter().any(|r| r.stage() == pb::Stage::Delivered) {
            break;
        }
        assert!(
            attempt < 200,
            "the delivered receipt never reached the sender"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both gateways noted, from the signed header, that this message lists attachments,
    // and that an alert lists none: ending the alert's delivery looks at no chunks.
    let alert = accord_tests::alert_received_at_kh(&net, &mut vn, "no files")
        .await
        .unwrap();
    for cc in ["vn", "kh"] {
        let store = &net.gateway(cc).unwrap().pipeline.store;
        let head = |id| store.message_head(id).unwrap().expect("stored");
        assert!(head(&sent.id).lists_attachments(), "{cc}");
        assert!(!head(&alert.id).lists_attachments(), "{cc}");
    }
    net.shutdown().await;
}

/// Seals a letter with one file straight from memory: the envelope, its chunks and hash list.
fn seal_in_memory(
    client: &OrgClient,
    to: &accord_proto::ids::OrgId,
    file: &[u8],
) -> (SealedEnvelope, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (header, pk) =
        accord_tests::raw_header(client, to, pb::Kind::Correspondence, "VN-KH-2026-0043").unwrap();
    let header = pb::Header {
        evaluation: "B2".into(),
        ..header
    };
    let mut sealer = Sealer::new(header, &pk).unwrap();
    let mut a = sealer.attachment(attachment::MIN_CHUNK_SIZE).unwrap();
    let chunks: Vec<Vec<u8>> = file
        .chunks(attachment::MIN_CHUNK_SIZE as usize)
        .map(|c| a.push(c).unwrap())
        .collect();
    let (sealed_file, hashes) = a.finish().unwrap();
    let size = sealed_file.digest().size;
    sealer.add_attachment(sealed_file).unwrap();
    let body = pb::Body {
        form: Some(pb::body::Form::Correspondence(pb::Correspondence {
            text: "file".into(),
            attachments: vec![pb::Attachment {
                name: "f.bin".into(),
                media_type: "application/octet-stream".into(),
                part: 1,
                size,
                ..Default::default()
            }],
        })),
    };
    let sealed = sealer.seal(&body, &client.keys().signing).unwrap();
    let list = hashes.iter().map(|h| h.to_vec()).collect();
    (sealed, chunks, list)
}

fn upload(
    sealed: &SealedEnvelope,
    list: &[Vec<u8>],
    chunks: Vec<(u32, Vec<u8>)>,
) -> impl futures::Stream<Item = pb::ChunkUpload> + Send + 'static {
    let start = pb::ChunkUpload {
        part: Some(pb::chunk_upload::Part::Start(pb::AttachmentStart {
            envelope: Some(sealed.to_wire()),
            attachment: 0,
            chunk_hashes: list.to_vec(),
        })),
    };
    let rest = chunks.into_iter().map(|(index, data)| pb::ChunkUpload {
        part: Some(pb::chunk_upload::Part::Chunk(pb::Chunk { index, data })),
    });
    futures::stream::iter(std::iter::once(start).chain(rest))
}

fn state_req(sealed: &SealedEnvelope) -> pb::ChunkStateRequest {
    pb::ChunkStateRequest {
        envelope_hash: sealed.hash().0.to_vec(),
        attachment: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_break_the_signed_header_or_come_from_the_wrong_party_are_refused() {
    let net = net().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let mut hotline = net.client("vn", "tay-ninh").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let file: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let (sealed, chunks, list) = seal_in_memory(&vn, &kh.id, &file);
    let wire = sealed.to_wire();

    // Submitted before its chunks: refused until they are all held.
    let err = vn
        .exchange()
        .submit(pb::SubmitRequest {
            envelope: Some(wire.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // A tampered chunk: refused, not held.
    let mut bad = chunks[1].clone();
    bad[7] ^= 1;
    let err = vn
        .exchange()
        .put_chunks(upload(
            &sealed,
            &list,
            vec![(0, chunks[0].clone()), (1, bad)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let state = vn
        .exchange()
        .get_chunk_state(state_req(&sealed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state.held,
        vec![0],
        "the good chunk before it is kept, the bad one is not"
    );

    // A hash list that does not match the signed root.
    let mut forged = list.clone();
    forged.swap(0, 1);
    let err = vn
        .exchange()
        .put_chunks(upload(&sealed, &forged, vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Another organisation cannot upload for, or look at, VN C02's envelope.
    let err = hotline
        .exchange()
        .put_chunks(upload(&sealed, &list, vec![(2, chunks[2].clone())]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = hotline
        .exchange()
        .get_chunk_state(state_req(&sealed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // The rest, then submit: accepted.
    let rest = (1..chunks.len() as u32)
        .map(|i| (i, chunks[i as usize].clone()))
        .collect();
    let state = vn
        .exchange()
        .put_chunks(upload(&sealed, &list, rest))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.held.len(), chunks.len());
    vn.submit(&sealed).await.unwrap();

    // A peer gateway's upload is checked the same way: a tampered chunk from VN's gateway
    // is refused by KH's.
    let mut peer = peer_link_as(&net, "vn", "kh").unwrap();
    let mut bad = chunks[0].clone();
    bad[0] ^= 0x80;
    let err = peer
        .put_chunks(upload(&sealed, &list, vec![(0, bad)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Only the recipient downloads, and only once the message is in its inbox.
    let got = fetch_n(&mut kh, 1).await.unwrap();
    let get = |c: &mut OrgClient| {
        let mut ex = c.exchange().clone();
        let req = pb::GetChunksRequest {
            envelope_hash: sealed.hash().0.to_vec(),
            attachment: 0,
            from: 0,
        };
        async move { ex.get_chunks(req).await }
    };
    assert_eq!(
        get(&mut vn).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        get(&mut hotline).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let saved = tempfile::tempdir().unwrap();
    let (progress, _) = recorder();
    let paths = kh.download(&got[0], saved.path(), progress).await.unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), file);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_over_the_gateway_limit_are_refused_at_submit() {
    let net = net().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let kh = net.org_id("kh", "ahtd").unwrap();
    let (sealed, _, _) = seal_in_memory(&vn, &kh, b"x");
    // The same envelope, re-signed with a digest claiming 300 MiB (the default limit is 256).
    let header = pb::Header::decode(sealed.header().as_bytes()).unwrap();
    let (_, pk) = vn
        .directories()
        .current_encryption_key(&kh, now_ms())
        .unwrap();
    let mut sealer = Sealer::new(header, &pk).unwrap();
    sealer
        .add_unsealed_digest(pb::AttachmentDigest {
            size: 300 << 20,
            chunk_size: attachment::MAX_CHUNK_SIZE,
            chunks_root: vec![0; 32],
        })
        .unwrap();
    let body = pb::Body {
        form: Some(pb::body::Form::Correspondence(pb::Correspondence {
            text: "big".into(),
            attachments: vec![],
        })),
    };
    let big = sealer.seal(&body, &vn.keys().signing).unwrap();
    let err = vn
        .exchange()
        .put_chunks(upload(&big, &[], vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("TOO_LARGE"), "{err:?}");
    let err = vn.submit(&big).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Gateway(s) if s.code() == tonic::Code::ResourceExhausted),
        "{err}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cut_off_mid_upload_resumes_with_only_the_missing_chunks() {
    let mut net = net().await;
    let tmp = tempfile::tempdir().unwrap();
    let len = 3 * DEFAULT_CHUNK_SIZE as usize + 100;
    let file = write_file(tmp.path(), "ledger.tif", len);
    let org_dir = net.org_dir("vn", "c02").unwrap();
    let outbox = Outbox::open(&org_dir).unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let kh_id = net.org_id("kh", "ahtd").unwrap();

    // The gateway goes away after the client connected: the send is sealed and spooled,
    // and fails after its retries.
    net.stop_gateway("vn").await.unwrap();
    let (progress, _) = recorder();
    let err = vn
        .send_files(
            &kh_id,
            &letter("the ledger"),
            &SendOptions::new("VN-KH-2026-0044"),
            &[(file.clone(), "image/tiff".into())],
            &outbox,
            progress,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Gateway(s) if s.code() == tonic::Code::Unavailable),
        "{err}"
    );
    let pending = outbox.pending().unwrap();
    assert_eq!(pending.len(), 1, "the sealed send waits in the outbox");

    // Back up, and part of the upload got through before the cut: two chunks of four.
    net.start_gateway("vn").await.unwrap();
    let spooled = std::fs::read_dir(org_dir.join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("envelope").exists())
        .unwrap();
    let wire =
        pb::Envelope::decode(std::fs::read(spooled.join("envelope")).unwrap().as_slice()).unwrap();
    let sealed = SealedEnvelope::from_wire(wire, &Default::default()).unwrap();
    let list: Vec<Vec<u8>> = std::fs::read(spooled.join("0.hashes"))
        .unwrap()
        .chunks(32)
        .map(<[u8]>::to_vec)
        .collect();
    let stride = DEFAULT_CHUNK_SIZE as usize + attachment::TAG_LEN;
    let spool = std::fs::read(spooled.join("0.chunks")).unwrap();
    let first_two = vec![
        (0, spool[..stride].to_vec()),
        (1, spool[stride..2 * stride].to_vec()),
    ];
    let mut fresh = net.client("vn", "c02").await.unwrap();
    fresh
        .exchange()
        .put_chunks(upload(&sealed, &list, first_two))
        .await
        .unwrap();

    // Resumed: the first progress report starts at the two chunks the gateway holds.
    let (progress, seen) = recorder();
    let results = fresh.resume_sends(&outbox, progress).await.unwrap();
    assert_eq!(results.len(), 1);
    let sent = results.into_iter().next().unwrap().1.unwrap();
    assert_eq!(sent.hash, sealed.hash());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].done, 2 * DEFAULT_CHUNK_SIZE as u64, "{seen:?}");
    assert_eq!(seen.last().unwrap().done, len as u64);
    assert!(outbox.pending().unwrap().is_empty());

    // It arrives whole.
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh, 1).await.unwrap();
    let saved = tempfile::tempdir().unwrap();
    let (progress, _) = recorder();
    let paths = kh.download(&got[0], saved.path(), progress).await.unwrap();
    assert_eq!(
        std::fs::read(&paths[0]).unwrap(),
        std::fs::read(&file).unwrap()
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_resumes_from_the_last_whole_chunk() {
    let net = net().await;
    let tmp = tempfile::tempdir().unwrap();
    let len = 3 * DEFAULT_CHUNK_SIZE as usize + 7;
    let file = write_file(tmp.path(), "photo.png", len);
    let mut vn = net.client("vn", "c02").await.unwrap();
    let mut kh = net.client("kh", "ahtd").await.unwrap();
    let outbox = Outbox::open(&net.org_dir("vn", "c02").unwrap()).unwrap();
    let (progress, _) = recorder();
    let sent = vn
        .send_files(
            &kh.id,
            &letter("photo"),
            &SendOptions::new("VN-KH-2026-0045"),
            &[(file.clone(), "image/png".into())],
            &outbox,
            progress,
        )
        .await
        .unwrap();
    let got = fetch_n(&mut kh, 1).await.unwrap();
    // A previous download wrote one whole chunk and part of the next, then broke.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join(sent.id.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let original = std::fs::read(&file).unwrap();
    let cut = DEFAULT_CHUNK_SIZE as usize + 1000;
    std::fs::write(dir.join("1-photo.png.part"), &original[..cut]).unwrap();
    let (progress, seen) = recorder();
    let paths = kh.download(&got[0], out.path(), progress).await.unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), original);
    assert_eq!(seen.lock().unwrap()[0].done, DEFAULT_CHUNK_SIZE as u64);
    assert!(!dir.join("1-photo.png.part").exists());

    // A crash left two chunks' worth of zeros: nothing of it is trusted.
    std::fs::remove_file(&paths[0]).unwrap();
    std::fs::write(
        dir.join("1-photo.png.part"),
        vec![0u8; 2 * DEFAULT_CHUNK_SIZE as usize],
    )
    .unwrap();
    let (progress, seen) = recorder();
    let paths = kh.download(&got[0], out.path(), progress).await.unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), original);
    assert_eq!(seen.lock().unwrap()[0].done, 0);

    // A download cut off after its last chunk, before the rename: the whole file is kept,
    // with nothing added after its short last chunk.
    std::fs::remove_file(&paths[0]).unwrap();
    std::fs::write(dir.join("1-photo.png.part"), &original).unwrap();
    let (progress, _) = recorder();
    let paths = kh.download(&got[0], out.path(), progress).await.unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), original);
    // A partial file with bytes after the whole attachment: cut back to it.
    std::fs::remove_file(&paths[0]).unwrap();
    let mut longer = original.clone();
    longer.extend_from_slice(b"trailing bytes");
    std::fs::write(dir.join("1-photo.png.part"), &longer).unwrap();
    let (progress, _) = recorder();
    let paths = kh.download(&got[0], out.path(), progress).await.unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), original);

    // A saved file altered since (same size) is fetched again, not taken as saved.
    let mut altered = original.clone();
    altered[len - 1] ^= 1;
    std::fs::write(&paths[0], &altered).unwrap();
    let (progress, _) = recorder();
    let paths = kh.download(&got[0], out.path(), progress).await.unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), original);
    net.shutdown().await;
}

/// One upload stream of raw parts, for sending what a well-behaved client would not.
fn parts(
    items: Vec<pb::chunk_upload::Part>,
) -> impl futures::Stream<Item = pb::ChunkUpload> + Send + 'static {
    futures::stream::iter(
        items
            .into_iter()
            .map(|part| pb::ChunkUpload { part: Some(part) }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_uploads_replays_and_foreign_peers_get_nothing_kept() {
    use pb::chunk_upload::Part;
    let net = net().await;
    let mut vn = net.client("vn", "c02").await.unwrap();
    let kh = net.org_id("kh", "ahtd").unwrap();
    let file: Vec<u8> = (0..9_000u32).map(|i| (i % 241) as u8).collect();
    let (sealed, chunks, list) = seal_in_memory(&vn, &kh, &file);
    let start = |attachment: u32, hashes: Vec<Vec<u8>>| {
        Part::Start(pb::AttachmentStart {
            envelope: Some(sealed.to_wire()),
            attachment,
            chunk_hashes: hashes,
        })
    };
    let chunk = |index: u32, data: Vec<u8>| Part::Chunk(pb::Chunk { index, data });
    let short = chunks[0][..100].to_vec();
    let cases = vec![
        (
            "a chunk before the start",
            vec![chunk(0, chunks[0].clone())],
        ),
        (
            "two starts",
            vec![start(0, list.clone()), start(0, list.clone())],
        ),
        (
            "an attachment the header lacks",
            vec![start(1, list.clone())],
        ),
        ("a hash list one short", vec![start(0, list[..2].to_vec())]),
        (
            "a chunk index past the end",
            vec![start(0, list.clone()), chunk(3, chunks[0].clone())],
        ),
        (
            "a chunk index of u32::MAX",
            vec![start(0, list.clone()), chunk(u32::MAX, chunks[0].clone())],
        ),
        (
            "a short chunk",
            vec![start(0, list.clone()), chunk(0, short)],
        ),
        (
            "another chunk's bytes",
            vec![start(0, list.clone()), chunk(0, chunks[1].clone())],
        ),
    ];
    for (what, items) in cases {
        let err = vn.exchange().put_chunks(parts(items)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
    }
    // None of it was kept.
    let state = vn
        .exchange()
        .get_chunk_state(state_req(&sealed))
        .await
        .map(|s| s.into_inner().held)
        .unwrap_or_default();
    assert!(state.is_empty(), "{state:?}");

    // Attachments ride on correspondence only: an alert carrying one is refused.
    let (header, pk) =
        accord_tests::raw_header(&vn, &kh, pb::Kind::Alert, "VN-KH-2026-0046").unwrap();
    let header = pb::Header {
        priority: pb::Priority::Urgent as i32,
        evaluation: "B2".into(),
        ..header
    };
    let mut sealer = Sealer::new(header, &pk).unwrap();
    let mut a = sealer.attachment(attachment::MIN_CHUNK_SIZE).unwrap();
    let alert_chunk = a.push(b"photo").unwrap();
    let (sealed_file, hashes) = a.finish().unwrap();
    sealer.add_attachment(sealed_file).unwrap();
    let alert = sealer
        .seal(
            &accord_tests::alert("crossing at night"),
            &vn.keys().signing,
        )
        .unwrap();
    let err = vn
        .exchange()
        .put_chunks(upload(
            &alert,
            &[hashes[0].to_vec()],
            vec![(0, alert_chunk)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("correspondence"), "{err:?}");

    // Sent and delivered; then a replay of the upload is answered complete and keeps
    // nothing, on either gateway.
    let all = (0..chunks.len() as u32)
        .map(|i| (i, chunks[i as usize].clone()))
        .collect();
    vn.exchange()
        .put_chunks(upload(&sealed, &list, all))
        .await
        .unwrap();
    vn.submit(&sealed).await.unwrap();
    let mut kh_client = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut kh_client, 1).await.unwrap();
    kh_client.ack(&got[0]).await.unwrap();
    eventually("VN drops the forwarded chunks", || {
        !chunk_dir(&net, "vn", &sealed.hash()).exists()
    })
    .await;
    let replay = (0..chunks.len() as u32)
        .map(|i| (i, chunks[i as usize].clone()))
        .collect();
    let state = vn
        .exchange()
        .put_chunks(upload(&sealed, &list, replay))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.held.len(), chunks.len());
    assert!(!chunk_dir(&net, "vn", &sealed.hash()).exists());
    let mut peer = peer_link_as(&net, "vn", "kh").unwrap();
    peer.put_chunks(upload(&sealed, &list, vec![(0, chunks[0].clone())]))
        .await
        .unwrap();
    assert!(!chunk_dir(&net, "kh", &sealed.hash()).exists());

    // KH's gateway may not look at what VN's clients upload to VN.
    let (other, other_chunks, other_list) = seal_in_memory(&vn, &kh, &file);
    vn.exchange()
        .put_chunks(upload(
            &other,
            &other_list,
            vec![(0, other_chunks[0].clone())],
        ))
        .await
        .unwrap();
    let mut kh_as_peer = peer_link_as(&net, "kh", "vn").unwrap();
    let err = kh_as_peer
        .get_chunk_state(state_req(&other))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    // Nor upload chunks of an envelope whose sender is not of its country.
    let err = kh_as_peer
        .put_chunks(upload(
            &other,
            &other_list,
            vec![(1, other_chunks[1].clone())],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("SENDER_MISMATCH"), "{err:?}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_chunk_quota_are_refused_and_envelopes_still_flow() {
    // Room for about one 40 KiB file of chunks at VN, not two.
    let net = accord_tests::vn_and_kh()
        .limits("vn", "attachment_quota_bytes = 60000")
        .start()
        .await
        .unwrap();
    let mut vn = net.client("vn", "c02").await.unwrap();
    let kh = net.org_id("kh", "ahtd").unwrap();
    let file = vec![7u8; 40_000];
    let (first, chunks, list) = seal_in_memory(&vn, &kh, &file);
    let all = |chunks: &[Vec<u8>]| {
        (0..chunks.len() as u32)
            .map(|i| (i, chunks[i as usize].clone()))
            .collect::<Vec<_>>()
    };
    vn.exchange()
        .put_chunks(upload(&first, &list, all(&chunks)))
        .await
        .unwrap();
    let (second, chunks2, list2) = seal_in_memory(&vn, &kh, &file);
    let err = vn
        .exchange()
        .put_chunks(upload(&second, &list2, all(&chunks2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("quota"), "{err:?}");
    // Envelopes without attachments are not held back by the chunks' quota.
    vn.send(
        &kh,
        &accord_tests::alert("crossing at night"),
        &SendOptions::new("VN-KH-2026-0047"),
    )
    .await
    .unwrap();
    net.shutdown().await;
}

/// A peer whose store is over its quota says so before it asks for an envelope's chunks: the
/// sending gateway pushes it none, and keeps the envelope, where it is, for later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_peer_is_pushed_no_chunks() {
    let net = TestNet::builder()
        .country("vn", "hanoi", &["c02"])
        .country("kh", "phnom-penh", &["ahtd"])
        .limits("kh", "queue_quota_bytes = 1")
        .start()
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let scan = write_file(tmp.path(), "scan.pdf", 3_000);
    let mut vn = net.client("vn", "c02").await.unwrap();
    let outbox = Outbox::open(&net.org_dir("vn", "c02").unwrap()).unwrap();
    let (progress, _) = recorder();
    vn.send_files(
        &net.org_id("kh", "ahtd").unwrap(),
        &letter("the scan"),
        &SendOptions::new("VN-KH-2026-0043"),
        &[(scan, "application/pdf".to_owned())],
        &outbox,
        progress,
    )
    .await
    .unwrap();
    // VN's forwarder offers it (KH answers "quota full", and backs off) several times.
    let vn_gateway = net.gateway("vn").unwrap().pipeline.clone();
    let waiting = || {
        vn_gateway
            .store
            .queue(
                &accord_gateway::store::Queue::Outbox("kh".parse().unwrap()),
                10,
            )
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let entries = waiting();
    assert_eq!(entries.len(), 1, "kept");
    assert!(!entries[0].1.deferred, "not moved");
    let kh_chunks = net.data_dir("kh").unwrap().join("attachments");
    let held = std::fs::read_dir(&kh_chunks).map_or(0, |d| d.count());
    assert_eq!(held, 0, "chunks pushed to a full store");
    net.shutdown().await;
}
