use super::*;

/// 2026-11-23T00:00:00Z, the "now" of these tests.
const AT: UnixMillis = 1_795_392_000_000;

fn victim() -> pb::Person {
    pb::Person {
        name: Some(pb::PersonName {
            vietnamese: "Trần Thị B".into(),
            latin: "Tran Thi B".into(),
            ..Default::default()
        }),
        sex: pb::Sex::Female as i32,
        birth_date: "2010-03-04".into(),
        nationality: "vn".into(),
        ..Default::default()
    }
}

fn transfer() -> pb::WantedPersonTransfer {
    pb::WantedPersonTransfer {
        subject: Some(victim()),
        warrant_reference: "KH-PP-2026-0912".into(),
        legal_basis: "art. 8".into(),
        border_gate: "gate:moc-bai--bavet".into(),
        proposed_time: "2026-12-01T09:00:00+07:00".into(),
        ..Default::default()
    }
}

fn body(form: Form) -> pb::Body {
    pb::Body { form: Some(form) }
}

fn path_of(kind: pb::Kind, b: &pb::Body) -> String {
    check(kind, b, AT).unwrap_err().path
}

#[test]
fn a_form_of_another_kind_is_refused() {
    let b = body(Form::Alert(pb::Alert {
        what: "x".into(),
        r#where: "y".into(),
        ..Default::default()
    }));
    assert_eq!(check(pb::Kind::Alert, &b, AT), Ok(()));
    assert_eq!(path_of(pb::Kind::SuspectNotice, &b), "form");
}

#[test]
fn each_broken_field_is_named_by_its_path() {
    type Edit = fn(&mut pb::WantedPersonTransfer);
    let cases: Vec<(&str, Edit)> = vec![
        ("subject.name", |f| {
            f.subject.as_mut().unwrap().name = Some(Default::default())
        }),
        ("subject.birth_date", |f| {
            f.subject.as_mut().unwrap().birth_date = "2027-01-01".into()
        }),
        ("subject.birth_date", |f| {
            f.subject.as_mut().unwrap().birth_date = "2010-02-30".into()
        }),
        ("subject.birth_year", |f| {
            f.subject.as_mut().unwrap().birth_year = 2011
        }),
        ("subject.birth_year", |f| {
            let s = f.subject.as_mut().unwrap();
            s.birth_date.clear();
            s.birth_year = 2030;
        }),
        ("subject.nationality", |f| {
            f.subject.as_mut().unwrap().nationality = "VNM".into()
        }),
        ("subject.name.vietnamese", |f| {
            // "Trần" with a combining grave accent: NFD, not NFC.
            f.subject
                .as_mut()
                .unwrap()
                .name
                .as_mut()
                .unwrap()
                .vietnamese = "Tra\u{0300}n Thi B".into()
        }),
        ("subject.aliases[0]", |f| {
            f.subject.as_mut().unwrap().aliases = vec![" ".into()]
        }),
        ("subject.documents[0].issuer", |f| {
            f.subject.as_mut().unwrap().documents = vec![pb::IdentityDocument {
                kind: "passport".into(),
                number: "N123".into(),
                issuer: "".into(),
            }]
        }),
        ("warrant_reference", |f| f.warrant_reference.clear()),
        ("border_gate", |f| f.border_gate = "Moc Bai".into()),
        ("proposed_time", |f| f.proposed_time = "1 Dec 2026".into()),
        ("proposed_time", |f| {
            f.proposed_time = "2026-11-01T09:00:00+07:00".into()
        }),
        ("escort", |f| f.escort = "x".repeat(MAX_TEXT + 1)),
    ];
    for (path, edit) in cases {
        let mut f = transfer();
        edit(&mut f);
        let b = body(Form::WantedPersonTransfer(f));
        assert_eq!(path_of(pb::Kind::WantedPersonTransfer, &b), path, "{b:?}");
    }
    assert_eq!(
        check(
            pb::Kind::WantedPersonTransfer,
            &body(Form::WantedPersonTransfer(transfer())),
            AT
        ),
        Ok(())
    );
}

#[test]
fn answers_carry_only_the_answer_and_their_own_required_fields() {
    use pb::transfer_response::Decision;
    use pb::wanted_person_transfer::Answer;
    let answer = |r: pb::TransferResponse| pb::WantedPersonTransfer {
        answer: Some(Answer::Response(r)),
        ..Default::default()
    };
    let ok = answer(pb::TransferResponse {
        decision: Decision::Accept as i32,
        ..Default::default()
    });
    let kind = pb::Kind::WantedPersonTransfer;
    assert_eq!(
        check(kind, &body(Form::WantedPersonTransfer(ok.clone())), AT),
        Ok(())
    );
    assert_eq!(
        step_of(&Form::WantedPersonTransfer(ok.clone())),
        Step::TransferResponse
    );

    let mut with_request_field = ok;
    with_request_field.warrant_reference = "X".into();
    assert_eq!(
        path_of(kind, &body(Form::WantedPersonTransfer(with_request_field))),
        "warrant_reference"
    );
    let refuse = answer(pb::TransferResponse {
        decision: Decision::Refuse as i32,
        ..Default::default()
    });
    assert_eq!(
        path_of(kind, &body(Form::WantedPersonTransfer(refuse))),
        "response.reason"
    );
    let counter = answer(pb::TransferResponse {
        decision: Decision::CounterProposal as i32,
        ..Default::default()
    });
    assert_eq!(
        path_of(kind, &body(Form::WantedPersonTransfer(counter))),
        "response"
    );
    let undecided = answer(pb::TransferResponse::default());
    assert_eq!(
        path_of(kind, &body(Form::WantedPersonTransfer(undecided))),
        "response.decision"
    );
    let handover = pb::WantedPersonTransfer {
        answer: Some(Answer::Handover(pb::HandoverConfirmation {
            border_gate: "gate:moc-bai--bavet".into(),
            handed_over_at: "2026-12-02T09:00:00+07:00".into(), // after the confirmation
            received_by: "C02".into(),
            notes: String::new(),
        })),
        ..Default::default()
    };
    assert_eq!(
        path_of(kind, &body(Form::WantedPersonTransfer(handover))),
        "handover.handed_over_at"
    );
}

#[test]
fn victim_answers_need_details_unless_confirmed() {
    use pb::verification_result::Outcome;
    use pb::victim_identification::Answer;
    let result = |outcome: Outcome, details: &str| {
        body(Form::VictimIdentification(pb::VictimIdentification {
            answer: Some(Answer::Result(pb::VerificationResult {
                outcome: outcome as i32,
                details: details.into(),
            })),
            ..Default::default()
        }))
    };
    let kind = pb::Kind::VictimIdentification;
    assert_eq!(check(kind, &result(Outcome::Confirmed, ""), AT), Ok(()));
    assert_eq!(
        path_of(kind, &result(Outcome::NeedsMoreInformation, "")),
        "result.details"
    );
    assert_eq!(
        check(kind, &result(Outcome::NotConfirmed, "no record"), AT),
        Ok(())
    );
    assert_eq!(
        path_of(kind, &result(Outcome::Unspecified, "")),
        "result.outcome"
    );
}

#[test]
fn the_header_carries_valid_codes_answers_name_their_request_and_children_are_protected() {
    let child = body(Form::VictimIdentification(pb::VictimIdentification {
        presumed_victim: Some(victim()),
        circumstances: "found at a border market".into(),
        is_child: true,
        ..Default::default()
    }));
    let header = pb::Header {
        handling_code: "H2".into(),
        evaluation: "B2".into(),
        priority: pb::Priority::Flash as i32,
        ..Default::default()
    };
    assert_eq!(check_header(&child, &header, false), Ok(()));
    let with = |edit: fn(&mut pb::Header)| {
        let mut h = header.clone();
        edit(&mut h);
        check_header(&child, &h, false).unwrap_err().path
    };
    assert_eq!(
        with(|h| h.priority = pb::Priority::Urgent as i32),
        "header.priority"
    );
    assert_eq!(
        with(|h| h.handling_code = "H1".into()),
        "header.handling_code"
    );
    assert_eq!(
        with(|h| h.handling_code = "H9".into()),
        "header.handling_code"
    );
    assert_eq!(with(|h| h.evaluation = String::new()), "header.evaluation");
    // H3 is at least as strict as H2.
    let mut h3 = header.clone();
    h3.handling_code = "H3:C02 only".into();
    assert_eq!(check_header(&child, &h3, false), Ok(()));

    let answer = body(Form::VictimIdentification(pb::VictimIdentification {
        answer: Some(pb::victim_identification::Answer::Result(
            pb::VerificationResult {
                outcome: pb::verification_result::Outcome::Confirmed as i32,
                details: String::new(),
            },
        )),
        ..Default::default()
    }));
    assert_eq!(
        check_header(&answer, &header, false).unwrap_err().path,
        "header.in_reply_to"
    );
    let mut replying = header;
    replying.in_reply_to = vec![1; 16];
    assert_eq!(check_header(&answer, &replying, false), Ok(()));
}

#[test]
fn normalize_puts_names_and_texts_in_nfc() {
    let mut b = body(Form::SuspectNotice(pb::SuspectNotice {
        subject: Some(pb::Person {
            name: Some(pb::PersonName {
                vietnamese: "Nguye\u{0302}\u{0303}n Va\u{0306}n A".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        suspected_conduct: "Tuye\u{0302}\u{0309}n mo\u{0323}".into(),
        requested_action: pb::RequestedAction::Locate as i32,
        ..Default::default()
    }));
    assert_eq!(
        path_of(pb::Kind::SuspectNotice, &b),
        "subject.name.vietnamese"
    );
    normalize(&mut b);
    assert_eq!(check(pb::Kind::SuspectNotice, &b, AT), Ok(()));
    let Some(Form::SuspectNotice(f)) = &b.form else {
        unreachable!()
    };
    assert_eq!(
        f.subject
            .as_ref()
            .unwrap()
            .name
            .as_ref()
            .unwrap()
            .vietnamese,
        "Nguyễn Văn A"
    );
}

#[test]
fn every_example_form_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/forms");
    let mut seen = 0;
    for lang in std::fs::read_dir(&dir).unwrap() {
        let lang = lang.unwrap().path();
        if !lang.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&lang).unwrap() {
            let path = file.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let b: pb::Body =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let form = b.form.as_ref().unwrap();
            assert_eq!(check(kind_of(form), &b, AT), Ok(()), "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 3 * 10, "examples in three languages: {seen}");
}

#[test]
fn an_unlisted_sex_and_repeated_or_too_many_categories_are_refused() {
    let mut f = transfer();
    f.subject.as_mut().unwrap().sex = 7;
    assert_eq!(
        path_of(
            pb::Kind::WantedPersonTransfer,
            &body(Form::WantedPersonTransfer(f))
        ),
        "subject.sex"
    );
    let notice = |exploitation: Vec<i32>| {
        body(Form::SuspectNotice(pb::SuspectNotice {
            subject: Some(victim()),
            suspected_conduct: "x".into(),
            requested_action: pb::RequestedAction::Verify as i32,
            exploitation,
            ..Default::default()
        }))
    };
    let sexual = pb::Exploitation::Sexual as i32;
    assert_eq!(
        check(pb::Kind::SuspectNotice, &notice(vec![sexual]), AT),
        Ok(())
    );
    assert_eq!(
        path_of(pb::Kind::SuspectNotice, &notice(vec![sexual, sexual])),
        "exploitation[1]"
    );
    assert_eq!(
        path_of(pb::Kind::SuspectNotice, &notice(vec![0])),
        "exploitation[0]"
    );
    assert_eq!(
        path_of(pb::Kind::SuspectNotice, &notice(vec![1; 17])),
        "exploitation"
    );
}

#[test]
fn alerts_and_plans_keep_their_times_in_order() {
    let alert = |when: &str, until: &str| {
        body(Form::Alert(pb::Alert {
            what: "x".into(),
            r#where: "y".into(),
            when: when.into(),
            until: until.into(),
            place: "gate:moc-bai--bavet".into(),
        }))
    };
    assert_eq!(
        check(
            pb::Kind::Alert,
            &alert("2026-11-23T04:00:00Z", "2026-11-23T16:00:00Z"),
            AT
        ),
        Ok(())
    );
    assert_eq!(
        path_of(
            pb::Kind::Alert,
            &alert("2026-11-23T04:00:00Z", "2026-11-22T16:00:00Z")
        ),
        "until"
    );
    let mut bad_place = alert("", "");
    if let Some(Form::Alert(a)) = &mut bad_place.form {
        a.place = "Mộc Bài".into();
    }
    assert_eq!(path_of(pb::Kind::Alert, &bad_place), "place");
    let plan = |when: &str| {
        body(Form::VictimIdentification(pb::VictimIdentification {
            answer: Some(pb::victim_identification::Answer::Repatriation(
                pb::RepatriationPlan {
                    border_gate: "gate:tinh-bien--phnom-den".into(),
                    planned_time: when.into(),
                    receiving_agency: "DOLISA".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }))
    };
    assert_eq!(
        check(
            pb::Kind::VictimIdentification,
            &plan("2026-12-05T09:00:00+07:00"),
            AT
        ),
        Ok(())
    );
    assert_eq!(
        path_of(
            pb::Kind::VictimIdentification,
            &plan("2026-11-01T09:00:00+07:00")
        ),
        "repatriation.planned_time"
    );
    let letter = body(Form::Correspondence(pb::Correspondence {
        text: "x".into(),
        attachments: vec![pb::Attachment {
            name: String::new(),
            media_type: "text/plain".into(),
            content: vec![],
            ..Default::default()
        }],
    }));
    assert_eq!(
        path_of(pb::Kind::Correspondence, &letter),
        "attachments[0].name"
    );
}

#[test]
fn every_chunked_attachment_is_named_once_with_its_size() {
    let part = |part: u32, size: u64| pb::Attachment {
        name: "scan.pdf".into(),
        media_type: "application/pdf".into(),
        part,
        size,
        ..Default::default()
    };
    let letter = |attachments| {
        body(Form::Correspondence(pb::Correspondence {
            text: "scan attached".into(),
            attachments,
        }))
    };
    let digest = |size| pb::AttachmentDigest {
        size,
        ..Default::default()
    };
    let header = pb::Header {
        handling_code: "H0".into(),
        evaluation: "B2".into(),
        priority: pb::Priority::Routine as i32,
        attachments: vec![digest(10), digest(20)],
        ..Default::default()
    };
    let ok = letter(vec![part(2, 20), part(1, 10)]);
    assert_eq!(check_header(&ok, &header, false), Ok(()));
    let path = |b: &pb::Body| check_header(b, &header, false).unwrap_err().path;
    assert_eq!(path(&letter(vec![part(1, 10)])), "header.attachments");
    assert_eq!(
        path(&letter(vec![part(1, 10), part(1, 10)])),
        "attachments[1].part"
    );
    assert_eq!(
        path(&letter(vec![part(1, 10), part(3, 20)])),
        "attachments[1].part"
    );
    assert_eq!(
        path(&letter(vec![part(1, 11), part(2, 20)])),
        "attachments[0].size"
    );
    // Another form cannot carry the header's attachments.
    let alert = body(Form::Alert(pb::Alert {
        what: "x".into(),
        r#where: "y".into(),
        ..Default::default()
    }));
    assert_eq!(path(&alert), "header.attachments");
    // Inline bytes and a part at once are refused.
    let both = letter(vec![pb::Attachment {
        content: b"x".to_vec(),
        ..part(1, 10)
    }]);
    assert_eq!(
        path_of(pb::Kind::Correspondence, &both),
        "attachments[0].content"
    );
}
