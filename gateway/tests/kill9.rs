//! Nothing acknowledged is lost on kill -9: real `accord-gateway` processes, real TLS, sled on
//! disk. The VN gateway accepts envelopes while its peer is down, is killed with SIGKILL,
//! restarted, and must still hold every envelope it acknowledged; when KH comes up, every
//! one reaches the inbox exactly once.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use accord_certs::{CountrySpec, DevPki};
use accord_gateway::tls::{self, CountryRoots, Credentials};
use accord_proto::envelope;
use accord_proto::ids::{MessageId, SpiffeId};
use accord_proto::keyfile::KeyFile;
use accord_proto::pb::{self, audit_client::AuditClient, exchange_client::ExchangeClient};
use tonic::transport::Channel;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Country {
    cc: &'static str,
    gateway: SpiffeId,
    client: SocketAddr,
    peer: SocketAddr,
}

fn write_config(root: &Path, me: &Country, other: &Country) -> PathBuf {
    let (cc, oc) = (me.cc, other.cc);
    let text = format!(
        "identity = \"{}\"\ndata_dir = \"data/{cc}\"\nclient_listen = \"{}\"\npeer_listen = \"{}\"\n\
         receipt_key = \"pki/{cc}/gateway/keys.json\"\n\
         log_key = \"pki/{cc}/gateway/log-key.json\"\nwitness_key = \"pki/{cc}/gateway/witness-key.json\"\n\
         directory_trust = \"pki/directory-trust.json\"\npolicy = \"policy.toml\"\n\
         directories = [\"pki/vn/directory.signed.json\", \"pki/kh/directory.signed.json\"]\n\
         [tls]\nroot = \"pki/{cc}/ca.pem\"\ncert = \"pki/{cc}/gateway/cert.pem\"\nkey = \"pki/{cc}/gateway/key.pem\"\n\
         [forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\n\
         [[peers]]\ngateway = \"{}\"\naddress = \"{}\"\nroot = \"pki/{oc}/ca.pem\"\n",
        me.gateway, me.client, me.peer, other.gateway, other.peer
    );
    let path = root.join(format!("{cc}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_accord-gateway"))
        .arg("run")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn channel(root: &Path, cc: &str, org: &str, gw: &Country) -> Channel {
    let dir = root.join("pki").join(cc).join("orgs").join(org);
    let creds = Credentials::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    let mut roots = CountryRoots::default();
    roots
        .add(
            cc.parse().unwrap(),
            &root.join("pki").join(cc).join("ca.pem"),
        )
        .unwrap();
    let config = tls::client_config(&creds, roots, gw.gateway.clone()).unwrap();
    tls::channel(gw.client, config)
}

async fn connect(root: &Path, cc: &str, org: &str, gw: &Country) -> ExchangeClient<Channel> {
    let mut client = ExchangeClient::new(channel(root, cc, org, gw));
    // Wait for the process to listen.
    for _ in 0..100 {
        if client
            .get_directory(pb::GetDirectoryRequest {})
            .await
            .is_ok()
        {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway {cc} did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_gateway_is_killed_with_sigkill() {
    tls::install_default_provider();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let spec = [
        CountrySpec {
            country: "vn".parse().unwrap(),
            gateway: "hanoi".into(),
            orgs: vec!["c02".into(), "inspectorate:auditor".into()],
        },
        CountrySpec {
            country: "kh".parse().unwrap(),
            gateway: "phnom-penh".into(),
            orgs: vec!["ahtd".into()],
        },
    ];
    DevPki::write(&root.join("pki"), &spec, now()).unwrap();
    let vn = Country {
        cc: "vn",
        gateway: "spiffe://vn.accord/gateway/hanoi".parse().unwrap(),
        client: free_addr(),
        peer: free_addr(),
    };
    let kh = Country {
        cc: "kh",
        gateway: "spiffe://kh.accord/gateway/phnom-penh".parse().unwrap(),
        client: free_addr(),
        peer: free_addr(),
    };
    std::fs::write(
        root.join("policy.toml"),
        include_str!("../../deploy/policy.toml"),
    )
    .unwrap();
    let vn_cfg = write_config(root, &vn, &kh);
    let kh_cfg = write_config(root, &kh, &vn);

    let mut vn_proc = spawn(&vn_cfg);
    let mut client = connect(root, "vn", "c02", &vn).await;
    let keys = KeyFile::from_json(&std::fs::read(root.join("pki/vn/orgs/c02/keys.json")).unwrap())
        .unwrap();
    let kh_dir: pb::Directory =
        serde_json::from_slice(&std::fs::read(root.join("pki/kh/directory.json")).unwrap())
            .unwrap();
    let enc = &kh_dir.orgs[0].encryption_keys[0];
    let pk: [u8; 32] = enc.public_key.as_slice().try_into().unwrap();

    // Phase 1: 100 concurrent submissions, all answered. Phase 2: 2000 more in flight when the
    // process is killed with SIGKILL; whatever was answered must survive too.
    let envelope_for = |i: u32| {
        let header = pb::Header {
            message_id: MessageId::new_v7(now() as u64, accord_proto::crypto::random().unwrap())
                .as_bytes()
                .to_vec(),
            kind: pb::Kind::Alert as i32,
            handling_code: "H0".into(),
            evaluation: "X4".into(),
            case_ref: "KILL-9".into(),
            sender_org: "spiffe://vn.accord/org/c02".into(),
            recipient_org: "spiffe://kh.accord/org/ahtd".into(),
            recipient_key_id: enc.key_id.clone(),
            created_at_ms: now(),
            expires_at_ms: now() + 3_600_000,
            priority: pb::Priority::Routine as i32,
            ..Default::default()
        };
        let body = pb::Body {
            form: Some(pb::body::Form::Alert(pb::Alert {
                what: format!("n{i}"),
                r#where: "x".into(),
                ..Default::default()
            })),
        };
        envelope::seal(header, &body, &pk, &keys.signing)
            .unwrap()
            .to_wire()
    };
    let mut acknowledged = HashSet::new();
    let mut checkpoint_before = None;
    for phase in 0..2u32 {
        let mut in_flight = tokio::task::JoinSet::new();
        // Phase 2 is large enough to still be in flight when the kill lands.
        let n = if phase == 0 { 100 } else { 2000 };
        for i in 0..n {
            let env = envelope_for(phase * 100 + i);
            let mut c = client.clone();
            in_flight.spawn(async move {
                let header = pb::Header::decode(&env.header[..]).unwrap();
                let id = MessageId::from_slice(&header.message_id).unwrap();
                c.submit(pb::SubmitRequest {
                    envelope: Some(env),
                })
                .await
                .ok()
                .map(|_| id)
            });
        }
        if phase == 1 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            vn_proc.kill().unwrap(); // SIGKILL
        }
        let before = acknowledged.len();
        while let Some(r) = in_flight.join_next().await {
            if let Some(id) = r.unwrap() {
                acknowledged.insert(id);
            }
        }
        println!(
            "phase {phase}: {} acknowledged",
            acknowledged.len() - before
        );
        if phase == 0 {
            assert_eq!(
                acknowledged.len(),
                100,
                "phase 1 must be fully acknowledged"
            );
            let mut audit = AuditClient::new(channel(root, "vn", "inspectorate", &vn));
            checkpoint_before = Some(checkpoint(&mut audit).await);
        }
    }
    vn_proc.wait().unwrap();
    assert!(
        acknowledged.len() >= 100,
        "only {} acknowledged before the kill",
        acknowledged.len()
    );
    println!(
        "{} envelopes acknowledged before SIGKILL",
        acknowledged.len()
    );

    // Restart: every acknowledged envelope still has its accepted receipt.
    let mut vn_proc = spawn(&vn_cfg);
    client = connect(root, "vn", "c02", &vn).await;
    for id in &acknowledged {
        let status = client
            .status(pb::StatusRequest {
                message_id: id.as_bytes().to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!status.receipts.is_empty(), "{id} lost its receipt");
    }
    // The log survived too: the checkpoint from before the kill is consistent with a fresh
    // one, which covers the events of everything acknowledged since.
    let (size1, root1) = checkpoint_before.unwrap();
    let mut audit = AuditClient::new(channel(root, "vn", "inspectorate", &vn));
    let (size2, root2) = checkpoint(&mut audit).await;
    let since = acknowledged.len() as u64 - 100;
    assert!(
        size2 >= size1 + 2 * since,
        "log lost entries: {size1} -> {size2}"
    );
    let proof: Vec<[u8; 32]> = audit
        .get_consistency_proof(pb::GetConsistencyProofRequest { size1, size2 })
        .await
        .unwrap()
        .into_inner()
        .proof
        .iter()
        .map(|p| p.as_slice().try_into().unwrap())
        .collect();
    accord_proto::merkle::verify_consistency(size1, size2, &root1, &root2, &proof).unwrap();
    println!("log grew from {size1} to {size2} entries, consistently");

    // Bring KH up: everything acknowledged arrives, exactly once.
    let mut kh_proc = spawn(&kh_cfg);
    let mut kh_client = connect(root, "kh", "ahtd", &kh).await;
    // Drain KH's inbox: fetch, check each envelope arrives once, ack with a delivered receipt.
    let ahtd = KeyFile::from_json(&std::fs::read(root.join("pki/kh/orgs/ahtd/keys.json")).unwrap())
        .unwrap();
    let mut arrived = HashSet::new();
    for _ in 0..600 {
        let items = kh_client
            .fetch(pb::FetchRequest { max: 256 })
            .await
            .unwrap()
            .into_inner()
            .items;
        for item in items {
            let env = item.envelope.unwrap();
            let header = pb::Header::decode(&env.header[..]).unwrap();
            let id = MessageId::from_slice(&header.message_id).unwrap();
            assert!(arrived.insert(id), "{id} arrived twice");
            let body = pb::ReceiptBody {
                envelope_hash: item.envelope_hash.clone(),
                message_id: header.message_id.clone(),
                stage: pb::Stage::Delivered as i32,
                signer: "spiffe://kh.accord/org/ahtd".into(),
                signer_key_id: ahtd.signing.key_id().into(),
                at_ms: now(),
                log_index: 0,
                reason: 0,
            };
            let delivered = accord_proto::receipt::sign(&body, &ahtd.signing);
            kh_client
                .ack(pb::AckRequest {
                    delivered: Some(delivered),
                })
                .await
                .unwrap();
        }
        if acknowledged.is_subset(&arrived) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        acknowledged.is_subset(&arrived),
        "{} acknowledged, {} arrived",
        acknowledged.len(),
        arrived.len()
    );
    println!("{} arrived at KH, each once", arrived.len());
    vn_proc.kill().unwrap();
    kh_proc.kill().unwrap();
    let _ = (vn_proc.wait(), kh_proc.wait());
}

use prost::Message as _;

/// The gateway's checkpoint now (published on demand).
async fn checkpoint(audit: &mut AuditClient<Channel>) -> (u64, [u8; 32]) {
    let text = audit
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
        .checkpoint;
    let body = text.split("\n\n").next().unwrap().to_owned() + "\n";
    let cp = accord_proto::note::Checkpoint::parse(&body).unwrap();
    (cp.size, cp.root)
}
