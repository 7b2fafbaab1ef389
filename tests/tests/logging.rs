//! The gateways' logs: a line names one message at most, its own. Many envelopes are in
//! flight at once on each gateway's few threads, and a line that carried another
//! envelope's ids would send an operator or an auditor to the wrong message.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use accord_client::org::SendOptions;
use accord_tests::alert;

/// Where the test's subscriber writes: every line of both gateways.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The ids a line names: in its spans and in its fields.
fn message_ids(line: &str) -> HashSet<&str> {
    line.split("message_id=")
        .skip(1)
        .map(|rest| rest.split([' ', '}']).next().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_names_only_its_own_message_while_many_are_in_flight() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let net = accord_tests::vn_and_kh().start().await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..8 {
        let mut client = net.client("vn", "c02").await.unwrap();
        let to = to.clone();
        senders.spawn(async move {
            let mut ids = Vec::new();
            for m in 0..10 {
                let body = alert(&format!("sender {s} message {m}"));
                let sent = client
                    .send(&to, &body, &SendOptions::new("P1"))
                    .await
                    .unwrap();
                ids.push(sent.id.to_string());
            }
            ids
        });
    }
    let mut sent = HashSet::new();
    while let Some(ids) = senders.join_next().await {
        sent.extend(ids.unwrap());
    }
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let got = accord_tests::fetch_n(&mut ahtd, 80).await.unwrap();
    for done in ahtd.ack_many(&got).await.unwrap() {
        done.unwrap();
    }
    net.shutdown().await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for line in text.lines() {
        let ids = message_ids(line);
        assert!(
            ids.len() <= 1,
            "a line naming {} messages: {line}",
            ids.len()
        );
    }
    // Each stage's line names each message once: none named twice, none left out.
    for stage in [" accepted", " received into inbox"] {
        let lines: Vec<&str> = text.lines().filter(|l| l.ends_with(stage)).collect();
        let named: HashSet<String> = lines
            .iter()
            .flat_map(|l| message_ids(l))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 80, "{stage}: {text}");
        assert_eq!(named, sent, "{stage}");
    }
}
