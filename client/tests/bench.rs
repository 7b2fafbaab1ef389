//! `accord bench` end to end: the real binary starts two gateway processes, drives them
//! over mutual TLS with fsynced stores, measures the limits, and reports as JSON.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn accord(args: &[&str]) -> serde_json::Value {
    let out = accord_output(args);
    assert!(
        out.status.success(),
        "accord {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `accord ARGS` and returns what it printed and how it ended.
fn accord_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(args)
        .output()
        .unwrap()
}

fn positive(v: &serde_json::Value, path: &str) -> f64 {
    let x = v
        .pointer(path)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing in {v}"));
    assert!(x > 0.0, "{path} = {x}");
    x
}

#[test]
fn the_exchange_benchmark_delivers_every_message_and_reports_every_figure() {
    let r = accord(&[
        "bench",
        "--senders",
        "3",
        "--count",
        "90",
        "--warmup",
        "6",
        "--size",
        "2048",
        "--json",
    ]);
    assert_eq!(r["messages"], 90);
    assert_eq!(r["submit"]["messages"], 90, "every submit accepted");
    assert_eq!(
        r["end_to_end"]["messages"], 90,
        "every message delivered and acked"
    );
    for path in [
        "/submit/throughput_per_sec",
        "/end_to_end/throughput_per_sec",
        "/end_to_end/p99_ms",
        "/limits/transport/throughput_per_sec",
        "/limits/store/throughput_per_sec",
        "/limits/crypto/ceiling_per_sec",
        "/disk_bytes_per_message",
    ] {
        positive(&r, path);
    }
    // Delivery comes after acceptance.
    assert!(positive(&r, "/end_to_end/p50_ms") >= positive(&r, "/submit/p50_ms"));
    // Each message's stages add up to its latency, so no stage's percentile passes the
    // end-to-end one.
    let stages = r["end_to_end_stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3, "{stages:?}");
    for (i, s) in stages.iter().enumerate() {
        for p in ["p50_ms", "p99_ms", "p999_ms"] {
            let (v, total) = (s[p].as_f64().unwrap(), r["end_to_end"][p].as_f64().unwrap());
            assert!(v > 0.0 && v <= total, "stage {i} {p}: {v} of {total}");
        }
    }
    // The machine's noise meanwhile: read from /proc on Linux, where this runs.
    let noise = &r["end_to_end_noise"];
    for key in [
        "steal_percent",
        "cpu_pressure_percent",
        "io_pressure_percent",
    ] {
        let v = &noise[key];
        assert!(v.is_null() || v.as_f64().unwrap() >= 0.0, "{key}: {v}");
    }
    if let Some(steal) = noise["steal_percent"].as_f64() {
        assert!(steal < 100.0, "{noise}");
    }
    // Each stage's cost is the mean of its timing rounds', so the ceiling lies within the
    // rounds' ceilings, and the stages add up to the cost per message.
    let crypto = &r["limits"]["crypto"];
    let ceiling = crypto["ceiling_per_sec"].as_f64().unwrap();
    let floats = |key: &str| -> Vec<f64> {
        (crypto[key].as_array().unwrap().iter())
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let rounds = floats("round_ceilings_per_sec");
    assert!(
        rounds.len() == 2 && 0.0 < rounds[0] && rounds[0] <= rounds[1],
        "{crypto}"
    );
    assert!(
        rounds[0] * 0.999 <= ceiling && ceiling <= rounds[1] * 1.001,
        "{crypto}"
    );
    // Half the rounds before the end-to-end phase, half after: the ceiling lies between
    // the two halves' ceilings, each within the rounds'.
    let halves = floats("halves_per_sec");
    assert_eq!(halves.len(), 2, "{crypto}");
    let (low, high) = (halves[0].min(halves[1]), halves[0].max(halves[1]));
    assert!(
        low * 0.999 <= ceiling && ceiling <= high * 1.001,
        "{crypto}"
    );
    assert!(
        rounds[0] * 0.999 <= low && high <= rounds[1] * 1.001,
        "{crypto}"
    );
    let stages_us: f64 = crypto["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["times_per_message"].as_f64().unwrap() * s["us_each"].as_f64().unwrap())
        .sum();
    let us = crypto["us_per_message"].as_f64().unwrap();
    assert!((stages_us - us).abs() <= us * 1e-9, "{crypto}");
    let processes = r["processes"].as_array().unwrap();
    for gw in ["vn-gateway", "kh-gateway"] {
        let p = processes.iter().find(|p| p["name"] == gw).unwrap();
        assert!(p["peak_rss_mib"].as_f64().unwrap() > 1.0, "{p}");
        assert!(p["cpu_seconds"].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(
        ["transport", "crypto", "store"].contains(&r["ratios"]["nearest_limit"].as_str().unwrap())
    );
}

#[test]
fn the_backlog_benchmark_restarts_the_holder_and_drains_everything() {
    let r = accord(&["bench", "--backlog", "60", "--senders", "2", "--json"]);
    assert_eq!(r["backlog"], 60);
    assert_eq!(r["submit"]["messages"], 60);
    assert_eq!(
        r["drain"]["messages"], 60,
        "every envelope drained after the restart"
    );
    // Each accepted envelope is at least one log entry (accepted) at VN.
    assert!(r["vn_log_entries"].as_u64().unwrap() >= 60, "{r}");
    positive(&r, "/restart_to_ready_ms");
    positive(&r, "/vn_peak_rss_with_backlog_mib");
}

/// `--rate` spaces the submits: 40 messages from 2 senders at 100 msg/s cannot be accepted
/// faster than the last one's start allows (390 ms), whatever the machine. The gateways
/// log at the level asked for.
#[test]
fn an_offered_rate_paces_the_senders_and_the_log_level_is_the_one_asked_for() {
    let r = accord(&[
        "bench",
        "--senders",
        "2",
        "--count",
        "40",
        "--warmup",
        "0",
        "--rate",
        "100",
        "--gateway-log",
        "info",
        "--json",
    ]);
    assert_eq!(r["offered_per_sec"], 100.0);
    assert_eq!(r["machine"]["gateway_log"], "info");
    assert_eq!(r["end_to_end"]["messages"], 40, "every message delivered");
    for path in [
        "/submit_alone/throughput_per_sec",
        "/submit/throughput_per_sec",
    ] {
        let rate = positive(&r, path);
        assert!(rate <= 105.0, "{path} = {rate} msg/s, offered 100");
    }
}

#[test]
fn a_rate_must_be_above_zero_and_is_not_for_the_backlog() {
    for args in [
        &["bench", "--rate", "0"][..],
        &["bench", "--rate", "fast"],
        &["bench", "--rate", "1e-300"],
        &["bench", "--rate", "1e12"],
        &["bench", "--rate", "NaN"],
        &["bench", "--rate", "10", "--backlog", "10"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_accord"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("--rate"), "{args:?}: {said}");
    }
}

/// A gateway process the test started; killed when dropped, whatever the outcome.
struct GatewayProcess(std::process::Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VN and a KH gateway, each in a process of its own, on a net prepared under `dir`;
/// once both answer: the net, the processes, the `[sender]` and `[recipient]` tables of an
/// attach file, and a client of each side. Fails if a gateway exits first (within 15 s).
async fn attached_pair(
    dir: &std::path::Path,
) -> anyhow::Result<(
    accord_client::localnet::LocalNet,
    Vec<GatewayProcess>,
    String,
    accord_client::org::OrgClient,
    accord_client::org::OrgClient,
)> {
    let mut net = accord_client::localnet::LocalNet::builder()
        .country("vn", "hanoi", &["c02"])
        .country("kh", "phnom-penh", &["ahtd"])
        .dir(dir)
        .prepare()
        .await?;
    let mut gateways = Vec::new();
    let mut side = String::new();
    for (cc, org, name) in [("vn", "c02", "sender"), ("kh", "ahtd", "recipient")] {
        net.release_listeners(cc)?;
        let child = Command::new(env!("CARGO_BIN_EXE_accord"))
            .arg("gateway")
            .arg(net.config_path(cc))
            .env("RUST_LOG", "warn")
            .spawn()?;
        let gw = net.gateway_address(cc)?;
        side += &format!(
            "[{name}]\norg = {:?}\ngateway = \"{}\"\ngateway_id = \"{}\"\nroot = {:?}\n\
             trust = {:?}\npid = {}\ndata_dir = {:?}\n",
            net.org_dir(cc, org)?,
            gw.addr,
            gw.id,
            gw.root,
            gw.trust,
            child.id(),
            net.data_dir(cc)?,
        );
        gateways.push(GatewayProcess(child));
    }
    for _ in 0..300 {
        for g in &mut gateways {
            if let Some(status) = g.0.try_wait()? {
                anyhow::bail!("a gateway exited at start: {status}");
            }
        }
        let both = async {
            let mut c02 = net.client("vn", "c02").await?;
            let mut ahtd = net.client("kh", "ahtd").await?;
            c02.fetch(0).await?;
            ahtd.fetch(0).await?;
            Ok::<_, anyhow::Error>((c02, ahtd))
        };
        if let Ok((c02, ahtd)) = both.await {
            return Ok((net, gateways, side, c02, ahtd));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("no answer from both gateways in 15 s")
}

/// `--attach` measures two gateways that were running before it and still run after it:
/// the end-to-end phase, each gateway's CPU and memory by its pid, and the stores' growth.
/// It refuses to start while the recipient has a message waiting, and leaves it there.
#[test]
fn an_attached_run_measures_running_gateways_and_leaves_a_waiting_inbox_alone() {
    use accord_client::org::SendOptions;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Each gateway process binds the address its net chose and released: another test of
    // this binary can take that port in between. A gateway that exits at start is
    // therefore retried, on a fresh net with other ports.
    let mut attempt = 0;
    let (net, mut gateways, side, mut c02, mut ahtd) = loop {
        attempt += 1;
        match runtime.block_on(attached_pair(&dir.path().join(format!("net-{attempt}")))) {
            Ok(started) => break started,
            Err(e) if attempt < 5 => eprintln!("attempt {attempt}: {e:#}"),
            Err(e) => panic!("the gateways never answered: {e:#}"),
        }
    };
    let attach = dir.path().join("attach.toml");
    std::fs::write(&attach, side).unwrap();
    let attach = attach.to_str().unwrap();

    // A message waiting for the recipient.
    let to = runtime.block_on(async {
        let to = net.org_id("kh", "ahtd").unwrap();
        let body = accord_client::bench::body_of_size(512);
        c02.send(&to, &body, &SendOptions::new("T-1"))
            .await
            .unwrap();
        to
    });
    let waiting = runtime.block_on(async {
        for _ in 0..300 {
            let got = ahtd.fetch(1).await.unwrap();
            if !got.is_empty() {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the message never reached {to}");
    });

    let args = [
        "bench",
        "--attach",
        attach,
        "--senders",
        "2",
        "--count",
        "200",
        "--warmup",
        "2",
        "--timeout",
        "120",
        "--json",
    ];
    let refused = accord_output(&args);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "ran with mail waiting: {why}");
    assert!(
        why.contains("inbox") && why.contains("Nothing was sent or acknowledged"),
        "{why}"
    );
    runtime.block_on(async {
        let still = ahtd.fetch(1).await.unwrap();
        assert_eq!(still.len(), 1, "the waiting message was taken");
        assert_eq!(still[0].envelope.id(), waiting[0].envelope.id());
        ahtd.ack(&still[0]).await.unwrap();
    });

    let r = accord(&args);
    assert_eq!(r["attached"], true);
    assert!(r["submit_alone"].is_null() && r["drain"].is_null(), "{r}");
    assert_eq!(r["submit"]["messages"], 200, "every submit accepted");
    assert_eq!(r["end_to_end"]["messages"], 200, "every message acked");
    for path in [
        "/end_to_end/throughput_per_sec",
        "/disk_bytes_per_message",
        "/limits/transport/throughput_per_sec",
        "/limits/crypto/ceiling_per_sec",
        "/limits/store/throughput_per_sec",
    ] {
        positive(&r, path);
    }
    let processes = r["processes"].as_array().unwrap();
    for name in [
        "sender's gateway (attached)",
        "recipient's gateway (attached)",
    ] {
        let p = processes.iter().find(|p| p["name"] == name).unwrap();
        assert!(p["cpu_seconds"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["peak_rss_mib"].as_f64().unwrap() > 1.0, "{p}");
    }
    // The table says what an attached run leaves out.
    let table = accord_output(&[
        "bench",
        "--attach",
        attach,
        "--senders",
        "1",
        "--count",
        "5",
        "--warmup",
        "0",
    ]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    println!("{text}");
    assert!(
        text.contains("not measured: the gateways were attached")
            && text.contains("stores' growth")
            && text.contains("recipient's gateway (attached)"),
        "{text}"
    );
    for g in &mut gateways {
        assert!(
            g.0.try_wait().unwrap().is_none(),
            "the bench stopped a gateway"
        );
    }
}
