use super::*;

const HOUR: i64 = 3_600_000;
const KH: &str = "spiffe://kh.accord/org/ahtd";

fn entry(id: u8, phase: Phase, direction: Direction, at_h: i64, reply_to: Option<u8>) -> Entry {
    let id_of = |n: u8| format!("00000000-0000-7000-8000-0000000000{n:02x}");
    Entry {
        id: id_of(id),
        case_ref: "VN-KH-2026-0001".into(),
        phase,
        direction,
        counterpart: KH.into(),
        at_ms: at_h * HOUR,
        in_reply_to: reply_to.map(id_of),
        exploitation: vec![],
        province: None,
        child: false,
    }
}

fn book() -> (tempfile::TempDir, CaseBook) {
    let dir = tempfile::tempdir().unwrap();
    let book = CaseBook::open(dir.path()).unwrap();
    (dir, book)
}

#[test]
fn a_transfer_goes_request_response_handover_and_nothing_else_fits() {
    use Direction::*;
    use Phase::*;
    let (_dir, book) = book();
    book.record(entry(1, TransferRequest, Sent, 0, None))
        .unwrap();
    // A handover before acceptance does not fit.
    let early = entry(2, TransferHandover, Received, 1, Some(1));
    assert!(matches!(
        book.fits(&early),
        Err(WorkflowError::DoesNotFit { .. })
    ));
    // An answer to a message never exchanged, or from our own side, does not either.
    let unknown = entry(3, TransferAccepted, Received, 1, Some(9));
    assert!(matches!(
        book.fits(&unknown),
        Err(WorkflowError::UnknownRequest { .. })
    ));
    let own = entry(4, TransferAccepted, Sent, 1, Some(1));
    assert!(matches!(
        book.fits(&own),
        Err(WorkflowError::WrongParty { .. })
    ));
    let mut stranger = entry(5, TransferAccepted, Received, 1, Some(1));
    stranger.counterpart = "spiffe://kh.accord/org/other".into();
    assert!(matches!(
        book.fits(&stranger),
        Err(WorkflowError::WrongParty { .. })
    ));

    let accepted = entry(6, TransferAccepted, Received, 2, Some(1));
    book.fits(&accepted).unwrap();
    book.record(accepted).unwrap();
    let handover = entry(7, TransferHandover, Sent, 30, Some(6));
    book.fits(&handover).unwrap();
    // A refusal closes a request: nothing but correspondence answers it.
    book.record(entry(8, TransferRequest, Sent, 40, None))
        .unwrap();
    book.record(entry(9, TransferRefused, Received, 41, Some(8)))
        .unwrap();
    let after_refusal = entry(10, TransferHandover, Sent, 42, Some(9));
    assert!(matches!(
        book.fits(&after_refusal),
        Err(WorkflowError::DoesNotFit { .. })
    ));
    book.fits(&entry(11, Correspondence, Sent, 42, Some(9)))
        .unwrap();
}

#[test]
fn open_requests_become_overdue_after_their_deadline() {
    use Direction::*;
    use Phase::*;
    let (_dir, book) = book();
    book.record(entry(1, VictimRequest, Received, 0, None))
        .unwrap();
    book.record(entry(2, Alert, Received, 0, None)).unwrap();
    book.record(entry(3, TransferRequest, Sent, 0, None))
        .unwrap();
    book.record(entry(4, TransferAccepted, Received, 5, Some(3)))
        .unwrap();
    let at = |h: i64| {
        book.open_requests(h * HOUR)
            .into_iter()
            .map(|o| (o.entry.phase, o.overdue))
            .collect::<Vec<_>>()
    };
    // The accepted transfer awaits its handover (no deadline); the request was answered.
    assert_eq!(
        at(6),
        vec![
            (VictimRequest, false),
            (Alert, false),
            (TransferAccepted, false)
        ]
    );
    assert_eq!(
        at(13),
        vec![
            (VictimRequest, false),
            (Alert, true),
            (TransferAccepted, false)
        ]
    );
    assert_eq!(
        at(73),
        vec![
            (VictimRequest, true),
            (Alert, true),
            (TransferAccepted, false)
        ]
    );
    book.record(entry(5, Correspondence, Sent, 74, Some(2)))
        .unwrap();
    assert_eq!(at(75).len(), 2, "the alert is answered by correspondence");
}

#[test]
fn the_report_counts_answers_deadlines_outcomes_and_breakdowns() {
    use Direction::*;
    use Phase::*;
    let (dir, book) = book();
    let mut request = entry(1, VictimRequest, Received, 0, None);
    request.exploitation = vec!["sexual".into()];
    request.province = Some("vn:an-giang".into());
    book.record(request).unwrap();
    book.record(entry(2, VictimConfirmed, Sent, 10, Some(1)))
        .unwrap();
    book.record(entry(3, RepatriationPlan, Sent, 20, Some(2)))
        .unwrap();
    book.record(entry(4, VictimHandover, Sent, 100, Some(3)))
        .unwrap();
    book.record(entry(5, TransferRequest, Sent, 0, None))
        .unwrap();
    book.record(entry(6, TransferAccepted, Received, 20, Some(5)))
        .unwrap(); // late: 12 h
    book.record(entry(7, TransferHandover, Received, 50, Some(6)))
        .unwrap();
    book.record(entry(8, Alert, Received, 0, None)).unwrap(); // never answered
    book.record(entry(9, SuspectNotice, Sent, 500, None))
        .unwrap(); // outside the period

    let r = book.report(0, 200 * HOUR, 300 * HOUR);
    assert_eq!(
        r.by_kind["VictimRequest"],
        Counts {
            sent: 0,
            received: 1
        }
    );
    assert_eq!(
        r.by_kind["TransferAccepted"],
        Counts {
            sent: 0,
            received: 1
        }
    );
    assert!(!r.by_kind.contains_key("SuspectNotice"));
    assert_eq!(r.requests_with_deadline, 3);
    assert_eq!(
        r.answered_within_deadline, 1,
        "the victim request, in 10 h of 72"
    );
    assert_eq!(r.overdue, 1, "the alert");
    assert_eq!(r.median_answer_hours, Some(15.0), "10 h and 20 h");
    assert_eq!(r.victims_identified, 1);
    assert_eq!(r.victims_repatriated, 1);
    assert_eq!(r.wanted_persons_handed_over, 1);
    assert_eq!(r.by_exploitation["sexual"], 1);
    assert_eq!(r.by_province["vn:an-giang"], 1);
    let csv = r.csv();
    assert!(csv.contains("totals,overdue,,,1\n"), "{csv}");
    assert!(csv.contains("province,vn:an-giang,,,1\n"), "{csv}");

    // The book is the file: reopened, it holds the same; a torn last line is skipped.
    drop(book);
    let path = dir.path().join("casebook.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"id\":\"torn");
    std::fs::write(&path, text).unwrap();
    let again = CaseBook::open(dir.path()).unwrap();
    assert_eq!(again.report(0, 200 * HOUR, 300 * HOUR), r);
}

#[test]
fn deadlines_come_from_the_organisations_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deadlines.toml"), "alert_hours = 2\n").unwrap();
    let book = CaseBook::open(dir.path()).unwrap();
    assert_eq!(book.deadlines.for_phase(Phase::Alert), Some(2 * HOUR));
    assert_eq!(
        book.deadlines.for_phase(Phase::VictimRequest),
        Some(72 * HOUR)
    );
    std::fs::write(dir.path().join("deadlines.toml"), "alert_hour = 2\n").unwrap();
    assert!(
        CaseBook::open(dir.path()).is_err(),
        "a misspelt key is refused"
    );
}

#[test]
fn an_answered_message_takes_no_second_answer_and_answers_stay_in_their_case() {
    use Direction::*;
    use Phase::*;
    let (_dir, book) = book();
    book.record(entry(1, TransferRequest, Sent, 0, None))
        .unwrap();
    book.record(entry(2, TransferRefused, Received, 1, Some(1)))
        .unwrap();
    // Accept after refuse, or a second refusal: the request is answered.
    for phase in [TransferAccepted, TransferRefused] {
        let late = entry(3, phase, Received, 2, Some(1));
        assert!(
            matches!(book.fits(&late), Err(WorkflowError::AlreadyAnswered { .. })),
            "{phase:?}"
        );
    }
    book.record(entry(4, VictimRequest, Received, 0, None))
        .unwrap();
    let mut elsewhere = entry(5, VictimConfirmed, Sent, 1, Some(4));
    elsewhere.case_ref = "VN-KH-2026-0999".into();
    assert!(matches!(
        book.fits(&elsewhere),
        Err(WorkflowError::OtherCase { .. })
    ));
}

#[test]
fn two_books_on_one_file_see_each_other_and_write_an_id_once() {
    use Direction::*;
    use Phase::*;
    let dir = tempfile::tempdir().unwrap();
    let send = CaseBook::open(dir.path()).unwrap(); // say, `accord send`
    let watch = CaseBook::open(dir.path()).unwrap(); // and a running `accord watch`
    send.record(entry(1, VictimRequest, Sent, 0, None)).unwrap();
    // The watcher learns of the request from the file, and takes its answer.
    let answer = entry(2, VictimConfirmed, Received, 1, Some(1));
    watch.fits(&answer).unwrap();
    watch.record(answer.clone()).unwrap();
    send.record(answer).unwrap();
    let text = std::fs::read_to_string(dir.path().join("casebook.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[test]
fn a_torn_last_line_is_cut_so_the_next_entry_survives() {
    use Direction::*;
    use Phase::*;
    let (dir, book) = book();
    book.record(entry(1, Alert, Received, 0, None)).unwrap();
    drop(book);
    let path = dir.path().join("casebook.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"id\":\"torn");
    std::fs::write(&path, text).unwrap();
    let book = CaseBook::open(dir.path()).unwrap();
    book.record(entry(2, Correspondence, Sent, 1, Some(1)))
        .unwrap();
    drop(book);
    let again = CaseBook::open(dir.path()).unwrap();
    assert_eq!(again.all().len(), 2);
}

#[test]
fn the_book_keeps_codes_not_names_and_knows_a_childs_case() {
    let (dir, book) = book();
    let (_, texts) = crate::forms::EXAMPLES
        .iter()
        .find(|e| e.0 == "victim-identification")
        .unwrap();
    let body = crate::demo::parse_form(texts[1]).unwrap();
    let header = pb::Header {
        message_id: accord_proto::ids::MessageId::new_v7(1, [1; 10])
            .as_bytes()
            .to_vec(),
        case_ref: "VN-KH-2026-0001".into(),
        sender_org: KH.into(),
        created_at_ms: 1,
        ..Default::default()
    };
    let request = Entry::new(&header, &body, Direction::Received).unwrap();
    assert!(request.child);
    book.record(request.clone()).unwrap();
    let mut answer = entry(2, Phase::VictimConfirmed, Direction::Sent, 1, None);
    answer.in_reply_to = Some(request.id.clone());
    book.record(answer.clone()).unwrap();
    assert!(book.in_child_case(&request.id));
    assert!(
        book.in_child_case(&answer.id),
        "an answer in a child's case"
    );
    let text = std::fs::read_to_string(dir.path().join("casebook.jsonl")).unwrap();
    for name in ["Trần", "Tran Thi", "Châu Đốc", "karaoke", "2010"] {
        assert!(!text.contains(name), "{name} in {text}");
    }
}

#[test]
fn a_book_replaced_under_a_running_client_is_read_again_from_the_start() {
    use Direction::*;
    use Phase::*;
    let (dir, book) = book();
    book.record(entry(1, VictimRequest, Sent, 0, None)).unwrap();
    book.record(entry(2, Alert, Received, 0, None)).unwrap();
    // Restored from a backup holding only the request: shorter than what was read.
    let path = dir.path().join("casebook.jsonl");
    let first = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    std::fs::write(&path, format!("{first}\n")).unwrap();
    book.fits(&entry(3, VictimConfirmed, Received, 1, Some(1)))
        .unwrap();
    assert_eq!(book.all().len(), 1, "only what the file holds now");
}

#[test]
fn a_case_book_readable_by_others_is_made_owner_only_on_the_next_record() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, book) = book();
    let path = dir.path().join("casebook.jsonl");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    book.record(entry(1, Phase::Alert, Direction::Sent, 0, None))
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
