//! `accord demo`: a Vietnamese and a Cambodian gateway on loopback with a fresh dev PKI;
//! one message of each kind in both directions; every receipt up to delivered printed.

use std::io::Write;
use std::time::Duration;

use accord_proto::pb;
use anyhow::Context;

use crate::localnet::LocalNet;
use crate::org::{furthest_stage, now_ms, OrgClient, SendOptions, Sent};

/// The English example forms shipped under `examples/forms/en/` that open a case thread
/// (requests and notices), by name. `examples/forms/{vi,km}/` hold the same in Vietnamese
/// and Khmer, with the answers.
pub const EXAMPLE_FORMS: [(&str, &str); 5] = [
    (
        "suspect-notice",
        include_str!("../../examples/forms/en/suspect-notice.json"),
    ),
    (
        "wanted-person-transfer",
        include_str!("../../examples/forms/en/wanted-person-transfer.json"),
    ),
    (
        "victim-identification",
        include_str!("../../examples/forms/en/victim-identification.json"),
    ),
    ("alert", include_str!("../../examples/forms/en/alert.json")),
    (
        "correspondence",
        include_str!("../../examples/forms/en/correspondence.json"),
    ),
];

/// Parses a form file: proto3 JSON of `accord.v1.Body`, where lines whose first non-blank
/// characters are `//` are comments (as in the templates of `accord form new`).
pub fn parse_form(json: &str) -> anyhow::Result<pb::Body> {
    let text: String = json
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&text).context("the form is not valid accord.v1.Body JSON")
}

/// Moves the times of an example form that must lie ahead of its sending (a proposed
/// handover, a planned repatriation, an alert's window) to `now_ms` and after, so the
/// examples stay valid on any day.
pub fn retime(body: &mut pb::Body, now_ms: i64) {
    use pb::body::Form;
    use pb::victim_identification::Answer as V;
    use pb::wanted_person_transfer::Answer as W;
    let at = |days: i64| {
        time::OffsetDateTime::from_unix_timestamp(now_ms / 1000 + days * 86_400)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    };
    match &mut body.form {
        Some(Form::WantedPersonTransfer(f)) => match &mut f.answer {
            None => f.proposed_time = at(7),
            Some(W::Response(r)) if !r.proposed_time.is_empty() => r.proposed_time = at(8),
            _ => {}
        },
        Some(Form::VictimIdentification(f)) => {
            if let Some(V::Repatriation(p)) = &mut f.answer {
                p.planned_time = at(10);
            }
        }
        Some(Form::Alert(f)) => {
            f.when = at(0);
            f.until = at(1);
        }
        _ => {}
    }
}

/// Runs the demo, writing its account to `out`.
pub async fn run(out: &mut (impl Write + Send)) -> anyhow::Result<()> {
    writeln!(
        out,
        "Starting a VN and a KH gateway on loopback with a fresh dev PKI..."
    )?;
    let net = LocalNet::builder()
        .country("vn", "hanoi", &["c02", "tayninh-police"])
        .country("kh", "phnom-penh", &["ahtd", "svayrieng-police"])
        .start()
        .await?;
    for cc in ["vn", "kh"] {
        let g = net.gateway(cc)?;
        writeln!(
            out,
            "  {} clients on {}, peers on {}",
            g.pipeline.identity, g.client_addr, g.peer_addr
        )?;
    }
    let mut vn = net.client("vn", "c02").await?;
    let mut kh = net.client("kh", "ahtd").await?;
    let mut sent = Vec::new();
    for (kind, json) in EXAMPLE_FORMS.iter().filter(|(k, _)| *k != "correspondence") {
        let mut body = parse_form(json)?;
        retime(&mut body, now_ms());
        let mut opts = SendOptions::new("VN-KH-2026-0001");
        if *kind == "alert" {
            opts.priority = pb::Priority::Flash;
        }
        for (from, to, label) in [
            (&mut vn, net.org_id("kh", "ahtd")?, "VN C02 -> KH AHTD"),
            (&mut kh, net.org_id("vn", "c02")?, "KH AHTD -> VN C02"),
        ] {
            let s = from
                .send(&to, &body, &opts)
                .await
                .with_context(|| format!("sending {kind}"))?;
            writeln!(
                out,
                "sent {kind:<24} {label}  id {}  accepted (log #{})",
                s.id, s.accepted.body.log_index
            )?;
            sent.push((label, kind.to_string(), s));
        }
    }
    // A letter with a scanned document: the file travels in encrypted chunks.
    let scan = net.root().join("list-of-persons-scan.pdf");
    let scan_bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&scan, &scan_bytes)?;
    let letter = parse_form(
        EXAMPLE_FORMS
            .iter()
            .find(|(k, _)| *k == "correspondence")
            .context("correspondence example")?
            .1,
    )?;
    let outbox = crate::attach::Outbox::open(&net.org_dir("vn", "c02")?)?;
    let s = vn
        .send_files(
            &net.org_id("kh", "ahtd")?,
            &letter,
            &SendOptions::new("VN-KH-2026-0001"),
            &[(scan, "application/pdf".into())],
            &outbox,
            std::sync::Arc::new(|_: &crate::attach::Progress| {}),
        )
        .await
        .context("sending correspondence with an attachment")?;
    writeln!(
        out,
        "sent {:<24} VN C02 -> KH AHTD  id {}  accepted (log #{}), with a 1.4 MiB scan in 2 chunks",
        "correspondence", s.id, s.accepted.body.log_index
    )?;
    sent.push(("VN C02 -> KH AHTD", "correspondence".into(), s));

    writeln!(out, "\nRecipients fetch, verify, open and acknowledge:")?;
    let saved_dir = net.root().join("received");
    let mut saved = Vec::new();
    for (client, name, want) in [(&mut kh, "KH AHTD", 5), (&mut vn, "VN C02", 4)] {
        saved.extend(receive_all(client, name, want, &saved_dir, out).await?);
    }
    anyhow::ensure!(
        saved.len() == 1 && std::fs::read(&saved[0])? == scan_bytes,
        "the attachment saved by KH differs from the file VN sent"
    );
    writeln!(
        out,
        "  the saved scan is byte for byte the file VN sent (SHA-256 {})",
        hex::encode(accord_proto::crypto::sha256(&[&scan_bytes]))
    )?;
    writeln!(
        out,
        "\nDelivery chains, as each sender sees them (every receipt verified):"
    )?;
    for (label, kind, s) in &sent {
        let client = if label.starts_with("VN") {
            &mut vn
        } else {
            &mut kh
        };
        let chain = wait_delivered(client, s).await?;
        writeln!(out, "{kind} {label} {}", s.id)?;
        for r in &chain {
            writeln!(
                out,
                "    {:<10} signed by {:<40} at {} log #{}",
                format!("{:?}", r.stage()),
                r.signer.to_string(),
                r.body.at_ms,
                r.body.log_index
            )?;
        }
    }
    writeln!(out, "\nAll {} messages delivered.", sent.len())?;
    net.shutdown().await;
    Ok(())
}

/// Fetches, opens, saves attached files under `files` and acknowledges until `want`
/// messages arrived; returns the files saved.
async fn receive_all(
    client: &mut OrgClient,
    name: &str,
    want: usize,
    files: &std::path::Path,
    out: &mut (impl Write + Send),
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut got = 0;
    let mut saved = Vec::new();
    for _ in 0..200 {
        for opened in client.fetch(16).await? {
            let kind = opened.envelope.kind();
            writeln!(
                out,
                "  {name} opened {:?} {} from {}",
                kind,
                opened.envelope.id(),
                opened.envelope.sender()
            )?;
            let no_progress: crate::attach::ProgressFn = std::sync::Arc::new(|_| {});
            for path in client.download(&opened, files, no_progress).await? {
                writeln!(out, "    saved attachment {}", path.display())?;
                saved.push(path);
            }
            client.ack(&opened).await?;
            got += 1;
        }
        if got >= want {
            return Ok(saved);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{name} received {got} of {want} messages in time")
}

async fn wait_delivered(
    client: &mut OrgClient,
    s: &Sent,
) -> anyhow::Result<Vec<accord_proto::receipt::VerifiedReceipt>> {
    for _ in 0..200 {
        let (_, chain) = client.status(&s.id).await?;
        if furthest_stage(&chain) == pb::Stage::Delivered {
            return Ok(chain);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("message {} not delivered in time", s.id)
}
