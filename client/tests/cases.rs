//! Case threads and workflow through the `accord` binary: each organisation keeps its case
//! book, answers must fit their request, and the report and case views come from it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

use accord_client::localnet::LocalNet;

/// `accord ARGS` as organisation `org` of `cc`: the session flags go after the subcommand
/// words (`send`, or `case show`), before the rest.
fn as_org(net: &LocalNet, cc: &str, org: &str, args: &[&str]) -> Output {
    let gw = net.gateway_address(cc).unwrap();
    let words = if args[0] == "case" { 2 } else { 1 };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_accord"));
    cmd.args(&args[..words])
        .arg("--org")
        .arg(net.org_dir(cc, org).unwrap())
        .args([
            "--gateway",
            &gw.addr.to_string(),
            "--gateway-id",
            &gw.id.to_string(),
        ])
        .arg("--root")
        .arg(&gw.root)
        .arg("--trust")
        .arg(&gw.trust)
        .args(&args[words..]);
    cmd.output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn example(name: &str, lang: &str) -> String {
    format!(
        "{}/../examples/forms/{lang}/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Fetches (and acks) until something arrives; returns the output.
fn fetch_some(net: &LocalNet, cc: &str, org: &str) -> (String, String) {
    for _ in 0..100 {
        let out = as_org(net, cc, org, &["fetch", "--ack"]);
        let stdout = String::from_utf8(out.stdout.clone()).unwrap();
        let stderr = String::from_utf8(out.stderr.clone()).unwrap();
        assert!(out.status.success(), "{stderr}");
        if !stdout.is_empty() || !stderr.is_empty() {
            return (stdout, stderr);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("nothing arrived for {org}");
}

fn accepted_id(stdout: &str) -> String {
    stdout.split_whitespace().nth(1).unwrap().to_owned()
}

/// `accord send` of the example alert from VN's c02 to KH's ahtd in `case`; its message id.
fn alert_c02_to_ahtd(net: &LocalNet, case: &str) -> String {
    let to = "spiffe://kh.accord/org/ahtd";
    let alert = example("alert", "en");
    accepted_id(&ok(as_org(
        net,
        "vn",
        "c02",
        &["send", "--to", to, "--case", case, &alert],
    )))
}

/// VN with organisation c02 and KH with ahtd, gateways running.
async fn vn_and_kh() -> LocalNet {
    LocalNet::builder()
        .country("vn", "hanoi", &["c02"])
        .country("kh", "phnom-penh", &["ahtd"])
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_victim_case_runs_request_result_plan_and_the_book_reports_it() {
    let net = vn_and_kh().await;
    let (vn, kh) = ("spiffe://vn.accord/org/c02", "spiffe://kh.accord/org/ahtd");
    let case = "VN-KH-2026-0100";

    // KH asks VN to identify a presumed (child) victim, in Khmer.
    let request = accepted_id(&ok(as_org(
        &net,
        "kh",
        "ahtd",
        &[
            "send",
            "--to",
            vn,
            "--case",
            case,
            "--evaluation",
            "B2",
            &example("victim-identification", "km"),
        ],
    )));
    let (shown, _) = fetch_some(&net, "vn", "c02");
    assert!(
        shown.contains("masked") && shown.contains("H2: DO NOT PASS ON"),
        "{shown}"
    );

    // VN cannot jump to a handover: the request allows a verification result only.
    let jump = as_org(
        &net,
        "vn",
        "c02",
        &[
            "send",
            "--to",
            kh,
            "--case",
            case,
            "--reply-to",
            &request,
            &example("victim-handover", "vi"),
        ],
    );
    assert!(!jump.status.success());
    let said = String::from_utf8_lossy(&jump.stderr);
    assert!(said.contains("cannot answer a VictimRequest"), "{said}");

    // The result, in Vietnamese, answering the request.
    let result = accepted_id(&ok(as_org(
        &net,
        "vn",
        "c02",
        &[
            "send",
            "--to",
            kh,
            "--case",
            case,
            "--reply-to",
            &request,
            &example("verification-result", "vi"),
        ],
    )));
    let (opened, refused) = fetch_some(&net, "kh", "ahtd");
    assert!(
        refused.is_empty() && opened.contains(&result),
        "{opened}{refused}"
    );
    // An answer in a child's case travels as the child's request does, and is masked.
    assert!(opened.contains("H2: DO NOT PASS ON"), "{opened}");
    assert!(
        opened.contains("masked") && !opened.contains("dân cư"),
        "{opened}"
    );

    // KH's case view: request, answer, and the confirmed victim awaiting a plan.
    let thread = ok(as_org(&net, "kh", "ahtd", &["case", "show", case]));
    assert!(
        thread.contains("VictimRequest") && thread.contains("VictimConfirmed"),
        "{thread}"
    );
    assert!(
        thread.contains("Delivered"),
        "the request's chain: {thread}"
    );
    assert!(
        thread.contains(&format!("open: VictimConfirmed {result}")),
        "{thread}"
    );

    let list = ok(Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(["case", "list", "--open", "--org"])
        .arg(net.org_dir("kh", "ahtd").unwrap())
        .output()
        .unwrap());
    assert!(list.contains(case) && list.contains("1 open"), "{list}");

    // A sender whose library keeps no case book sends a handover against the request;
    // KH's client refuses it on arrival and says why, and shows the rest.
    let mut raw = net.client("vn", "c02").await.unwrap();
    let body = accord_client::demo::parse_form(
        &std::fs::read_to_string(example("victim-handover", "en")).unwrap(),
    )
    .unwrap();
    let mut opts = accord_client::org::SendOptions::new(case);
    opts.in_reply_to = Some(request.parse().unwrap());
    raw.send(&kh.parse().unwrap(), &body, &opts).await.unwrap();
    let (_, refused) = fetch_some(&net, "kh", "ahtd");
    assert!(
        refused.contains(
            "refused a message: workflow: a VictimHandover cannot answer a VictimRequest"
        ),
        "{refused}"
    );

    // Correspondence may answer anything, but in a child's case it travels as the child's
    // request does: sent ROUTINE and H0 by a library without a case book, it is refused.
    let letter = accord_client::demo::parse_form(
        &std::fs::read_to_string(example("correspondence", "en")).unwrap(),
    )
    .unwrap();
    raw.send(&kh.parse().unwrap(), &letter, &opts)
        .await
        .unwrap();
    let (_, refused) = fetch_some(&net, "kh", "ahtd");
    assert!(
        refused.contains("header.priority: a child victim's message is FLASH"),
        "{refused}"
    );

    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("report.csv");
    let report = ok(Command::new(env!("CARGO_BIN_EXE_accord"))
        .args([
            "report",
            "--from",
            "2000-01-01",
            "--to",
            "2100-01-01",
            "--org",
        ])
        .arg(net.org_dir("vn", "c02").unwrap())
        .arg("--csv")
        .arg(&csv)
        .output()
        .unwrap());
    assert!(report.contains("victims identified 1"), "{report}");
    assert!(report.contains("answered within it 1"), "{report}");
    let csv = std::fs::read_to_string(Path::new(&csv)).unwrap();
    assert!(csv.contains("province,vn:an-giang,,,1"), "{csv}");
    assert!(csv.contains("exploitation,sexual,,,1"), "{csv}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_files_travel_with_progress_are_saved_before_the_ack_and_a_childs_only_revealed() {
    let net = vn_and_kh().await;
    let (vn, kh) = ("spiffe://vn.accord/org/c02", "spiffe://kh.accord/org/ahtd");
    let tmp = tempfile::tempdir().unwrap();
    let scan: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let scan_path = tmp.path().join("list of persons.pdf");
    std::fs::write(&scan_path, &scan).unwrap();
    let saved_dir = tmp.path().join("saved");

    // A letter with a scan: progress on stderr, accepted on stdout.
    let out = as_org(
        &net,
        "vn",
        "c02",
        &[
            "send",
            "--to",
            kh,
            "--case",
            "VN-KH-2026-0101",
            "--attach",
            scan_path.to_str().unwrap(),
            &example("correspondence", "en"),
        ],
    );
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    let letter = accepted_id(&ok(out));
    assert!(
        progress.contains("list of persons.pdf [####################] 100% 1.4/1.4 MiB"),
        "{progress}"
    );

    let fetch = |extra: &[&str]| {
        let mut args = vec![
            "fetch",
            "--ack",
            "--attachments",
            saved_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        as_org(&net, "kh", "ahtd", &args)
    };
    let mut shown = String::new();
    for _ in 0..100 {
        shown = ok(fetch(&[]));
        if shown.contains("acknowledged") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let saved = saved_dir.join(&letter).join("1-list of persons.pdf");
    assert!(
        shown.contains(&format!("saved {}", saved.display())),
        "{shown}"
    );
    assert_eq!(std::fs::read(&saved).unwrap(), scan);

    // In a child victim's case, files are saved only with --reveal, and the message waits
    // in the inbox until they are.
    let request = accepted_id(&ok(as_org(
        &net,
        "kh",
        "ahtd",
        &[
            "send",
            "--to",
            vn,
            "--case",
            "VN-KH-2026-0102",
            "--evaluation",
            "B2",
            &example("victim-identification", "en"),
        ],
    )));
    let _ = fetch_some(&net, "vn", "c02");
    let photo_path = tmp.path().join("photo.jpg");
    std::fs::write(&photo_path, vec![5u8; 70_000]).unwrap();
    let reply = accepted_id(&ok(as_org(
        &net,
        "vn",
        "c02",
        &[
            "send",
            "--to",
            kh,
            "--case",
            "VN-KH-2026-0102",
            "--reply-to",
            &request,
            "--attach",
            photo_path.to_str().unwrap(),
            &example("correspondence", "en"),
        ],
    )));
    let mut withheld = String::new();
    for _ in 0..100 {
        let out = fetch(&[]);
        withheld = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{withheld}");
        if withheld.contains("withheld") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        withheld.contains(&format!("{reply}: attached files withheld")),
        "{withheld}"
    );
    assert!(!saved_dir.join(&reply).exists());
    let revealed = ok(fetch(&["--reveal"]));
    assert!(revealed.contains("acknowledged"), "{revealed}");
    assert_eq!(
        std::fs::read(saved_dir.join(&reply).join("1-photo.jpg")).unwrap(),
        vec![5u8; 70_000]
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_carry_the_h1_notice_and_h2_or_h3_never_leave() {
    let net = vn_and_kh().await;
    let kh = "spiffe://kh.accord/org/ahtd";
    let mut ids = Vec::new();
    for handling in ["H1", "H2", "H3:share with the prosecutor only"] {
        ids.push(accepted_id(&ok(as_org(
            &net,
            "vn",
            "c02",
            &[
                "send",
                "--to",
                kh,
                "--case",
                "VN-KH-2026-0103",
                "--handling",
                handling,
                &example("correspondence", "en"),
            ],
        ))));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("exports");
    let mut said = String::new();
    for _ in 0..100 {
        let out = as_org(
            &net,
            "kh",
            "ahtd",
            &["fetch", "--ack", "--export", dir.to_str().unwrap()],
        );
        said.push_str(&String::from_utf8_lossy(&out.stderr));
        ok(out);
        if said.matches("not exported").count() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let h1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{}.json", ids[0]))).unwrap())
            .unwrap();
    assert_eq!(
        h1["handling_notice"],
        "H1: NOT FOR USE IN COURT without the originator's permission"
    );
    assert_eq!(h1["handling_code"], "H1");
    assert!(h1["form"]["correspondence"]["text"].is_string(), "{h1}");
    for id in &ids[1..] {
        assert!(!dir.join(format!("{id}.json")).exists());
        assert!(said.contains(&format!("{id}: H")), "{said}");
    }
    assert!(said.contains("H2: DO NOT PASS ON"), "{said}");
    net.shutdown().await;
}

/// Messages waiting together are acknowledged together, by `watch --ack` as they arrive and
/// by `fetch --ack`, and each reaches its sender as delivered; an acknowledged message is
/// not fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_messages_are_acknowledged_together_and_each_reaches_its_sender() {
    let net = vn_and_kh().await;
    let send = |i: usize| alert_c02_to_ahtd(&net, &format!("VN-KH-2026-{:04}", 300 + i));
    let watched_ids: Vec<String> = (0..3).map(send).collect();
    let watched = ok(as_org(
        &net,
        "kh",
        "ahtd",
        &["watch", "--ack", "--count", "3"],
    ));
    for id in &watched_ids {
        assert!(watched.contains(&format!("acknowledged {id}")), "{watched}");
    }

    let fetched_ids: Vec<String> = (3..8).map(send).collect();
    // Until all five wait in the inbox, shown and left there.
    let mut shown = String::new();
    for _ in 0..100 {
        shown = ok(as_org(&net, "kh", "ahtd", &["fetch"]));
        if fetched_ids.iter().all(|id| shown.contains(id.as_str())) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!shown.contains("acknowledged"), "{shown}");
    let acked = ok(as_org(&net, "kh", "ahtd", &["fetch", "--ack"]));
    for id in &fetched_ids {
        assert!(acked.contains(&format!("acknowledged {id}")), "{acked}");
    }
    assert_eq!(ok(as_org(&net, "kh", "ahtd", &["fetch"])), "");

    for id in watched_ids.iter().chain(&fetched_ids) {
        let mut status = String::new();
        for _ in 0..100 {
            status = ok(as_org(&net, "vn", "c02", &["status", id]));
            if status.contains(": Delivered") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(status.contains(": Delivered"), "{status}");
    }
    net.shutdown().await;
}

/// A fetch that fails part way (here: one message cannot be exported) still acknowledges
/// what it took in before, so the next fetch does not show, save and export it again; the
/// message that failed stays in the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_fails_part_way_acknowledges_what_it_took_in_before() {
    let net = vn_and_kh().await;
    let send = |case: &str| alert_c02_to_ahtd(&net, case);
    let (first, second) = (send("VN-KH-2026-0400"), send("VN-KH-2026-0401"));
    for _ in 0..100 {
        let shown = ok(as_org(&net, "kh", "ahtd", &["fetch"]));
        if shown.contains(&first) && shown.contains(&second) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let exports = tempfile::tempdir().unwrap();
    // The second message's export file cannot be written: a folder holds its name.
    std::fs::create_dir(exports.path().join(format!("{second}.json"))).unwrap();
    let out = as_org(
        &net,
        "kh",
        "ahtd",
        &[
            "fetch",
            "--ack",
            "--export",
            exports.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("acknowledged {first}")), "{said}");
    assert!(!said.contains(&format!("acknowledged {second}")), "{said}");
    let left = ok(as_org(&net, "kh", "ahtd", &["fetch"]));
    assert!(left.contains(&second) && !left.contains(&first), "{left}");
    net.shutdown().await;
}
