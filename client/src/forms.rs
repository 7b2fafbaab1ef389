//! Forms as people handle them: templates to fill (`accord form new`), and an opened
//! message shown with its handling marks and, for child victims, with identifying data
//! masked unless revealed (each reveal recorded locally).

use std::io::Write;
use std::path::Path;

use accord_proto::codes::{self, Handling};
use accord_proto::forms as rules;
use accord_proto::pb::{self, body::Form};

use crate::org::Opened;

macro_rules! examples {
    ($($name:literal),* $(,)?) => {
        /// Every example form: name, then English, Vietnamese and Khmer.
        pub const EXAMPLES: &[(&str, [&str; 3])] = &[$(
            ($name, [
                include_str!(concat!("../../examples/forms/en/", $name, ".json")),
                include_str!(concat!("../../examples/forms/vi/", $name, ".json")),
                include_str!(concat!("../../examples/forms/km/", $name, ".json")),
            ]),
        )*];
    };
}

examples!(
    "suspect-notice",
    "wanted-person-transfer",
    "transfer-response-accept",
    "transfer-response-counter",
    "transfer-handover",
    "victim-identification",
    "verification-result",
    "repatriation-plan",
    "victim-handover",
    "alert",
    "correspondence",
);

/// The languages of the examples, in the order of [`EXAMPLES`].
pub const LANGUAGES: [&str; 3] = ["en", "vi", "km"];

/// A template to fill for `name` (one of [`EXAMPLES`]) in `lang`: the example, preceded by
/// `//` comments on what each field takes and the code lists (`accord send` skips them).
pub fn template(name: &str, lang: &str) -> Result<String, String> {
    let names = || EXAMPLES.iter().map(|e| e.0).collect::<Vec<_>>().join(", ");
    let (_, texts) = EXAMPLES
        .iter()
        .find(|e| e.0 == name)
        .ok_or_else(|| format!("no form {name:?}; forms: {}", names()))?;
    let i = LANGUAGES
        .iter()
        .position(|l| *l == lang)
        .ok_or_else(|| format!("no language {lang:?}; languages: en, vi, km"))?;
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push_str("// ");
        out.push_str(s);
        out.push('\n');
    };
    line(&format!(
        "accord form: {name} ({lang}). Fill in, then: accord send ... FILE"
    ));
    line("Lines starting with // are comments. Texts are UTF-8; names in any of the");
    line("vietnamese, khmer and latin scripts. Times are RFC 3339 (2026-12-01T09:00:00+07:00),");
    line("dates YYYY-MM-DD, countries ISO 3166 alpha-2 in lower case (vn, kh).");
    if name != "correspondence" && name != "alert" && name != "suspect-notice" {
        line("An answer (response, result, plan, handover) is sent with --reply-to REQUEST-ID.");
    }
    line("Header codes are options of accord send: --handling H0|H1|H2|H3:<text>,");
    line("--evaluation <source A|B|C|X><information 1-4> (X4 = cannot be assessed).");
    line("Border gates:");
    for g in codes::BORDER_GATES {
        line(&format!("  {:<34} {} – {}", g.code, g.vn, g.kh));
    }
    line("Provinces:");
    for chunk in codes::PROVINCES.chunks(4) {
        let row: Vec<String> = chunk.iter().map(|p| format!("{:<22}", p.code)).collect();
        line(&format!("  {}", row.join(" ").trim_end()));
    }
    line("Exploitation (ICS-TIP): EXPLOITATION_SEXUAL, _FORCED_LABOUR, _DOMESTIC_SERVITUDE,");
    line("  _FORCED_MARRIAGE, _FORCED_CRIMINALITY, _FORCED_BEGGING, _REMOVAL_OF_ORGANS,");
    line("  _ILLEGAL_ADOPTION, _OTHER.");
    if name == "victim-identification" {
        line("isChild: true sends at FLASH priority and at least H2, whatever the options say.");
    }
    out.push_str(texts[i]);
    Ok(out)
}

/// The handling code's warning line for a reader, if it restricts use.
pub fn handling_mark(header: &pb::Header) -> Option<String> {
    match header.handling_code.parse::<Handling>().ok()? {
        Handling::LawEnforcementOnly => None,
        Handling::NotForCourt => {
            Some("H1: NOT FOR USE IN COURT without the originator's permission".into())
        }
        Handling::NoOnwardTransmission => {
            Some("H2: DO NOT PASS ON without the originator's permission".into())
        }
        Handling::Restricted(text) => Some(format!("H3: RESTRICTED: {text}")),
    }
}

/// `body` with what could identify a child victim replaced, for display without
/// `--reveal`: the person (names, aliases, birth date and year, documents) and every free
/// text, whether the body is the child's request or, `child_case`, a message in reply to
/// it (a result, a plan, a handover, correspondence). Codes, kinds and dates of the
/// procedure stay.
pub fn masked(body: &pb::Body, child_case: bool) -> pb::Body {
    use pb::victim_identification::Answer as V;
    use pb::wanted_person_transfer::Answer as W;
    let mut body = body.clone();
    if !(child_case || rules::concerns_a_child(&body)) {
        return body;
    }
    let hide = |s: &mut String| {
        if !s.is_empty() {
            *s = "[masked: child victim; --reveal to show]".to_owned();
        }
    };
    let handover = |h: &mut pb::HandoverConfirmation| {
        hide(&mut h.received_by);
        hide(&mut h.notes);
    };
    match &mut body.form {
        Some(Form::VictimIdentification(f)) => {
            if let Some(p) = &mut f.presumed_victim {
                let mut name = String::from("x");
                hide(&mut name);
                p.name = Some(pb::PersonName {
                    latin: name,
                    ..Default::default()
                });
                p.aliases.clear();
                p.birth_date.clear();
                p.birth_year = 0;
                p.documents.clear();
            }
            hide(&mut f.circumstances);
            hide(&mut f.family_tracing_needs);
            match &mut f.answer {
                Some(V::Result(r)) => hide(&mut r.details),
                Some(V::Repatriation(p)) => {
                    hide(&mut p.escort);
                    hide(&mut p.receiving_agency);
                    hide(&mut p.reception_support);
                }
                Some(V::Handover(h)) => handover(h),
                None => {}
            }
        }
        Some(Form::WantedPersonTransfer(f)) => {
            if let Some(W::Handover(h)) = &mut f.answer {
                handover(h);
            }
        }
        Some(Form::Correspondence(f)) => {
            hide(&mut f.text);
            for a in &mut f.attachments {
                hide(&mut a.name);
                a.content.clear();
            }
        }
        _ => {}
    }
    body
}

/// Renders an opened message for a person: a summary line, the handling mark, the
/// evaluation, and the form, masked (see [`masked`]) if it concerns a child, or is part of
/// a child's case (`child_case`), and `reveal` is false.
pub fn render(
    opened: &Opened,
    reveal: bool,
    child_case: bool,
) -> Result<String, serde_json::Error> {
    let h = opened.envelope.header();
    let mut out = format!(
        "{} {:?} from {} case {} evaluation {}\n",
        opened.envelope.id(),
        opened.envelope.kind(),
        opened.envelope.sender(),
        h.case_ref,
        if h.evaluation.is_empty() {
            "-"
        } else {
            &h.evaluation
        },
    );
    if let Some(mark) = handling_mark(h) {
        out.push_str(&format!("*** {mark} ***\n"));
    }
    let shown = if reveal {
        opened.body.clone()
    } else {
        masked(&opened.body, child_case)
    };
    out.push_str(&serde_json::to_string_pretty(&shown)?);
    out.push('\n');
    Ok(out)
}

/// Why a message is not exported.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportError {
    /// H2 or H3: no onward transmission without the originator's permission.
    #[error("{0}: not exported (ask the originator for permission)")]
    Restricted(String),
    /// The handling code does not parse (the envelope layer refuses these; defensive).
    #[error("handling code {0:?} unknown: not exported")]
    UnknownHandling(String),
    /// A child victim's data is not exported: children's cases are at least H2.
    #[error("a child victim's case: not exported")]
    Child,
    /// The form does not encode as JSON.
    #[error("form does not encode as JSON: {0}")]
    Encode(String),
}

/// An opened message as a JSON document for use outside Accord (a case file, a court
/// bundle): header codes, the form, and, for H1, the not-for-court marking at the top.
/// H2 and H3 messages, and a child victim's, are never exported.
pub fn export(opened: &Opened, child_case: bool) -> Result<serde_json::Value, ExportError> {
    let h = opened.envelope.header();
    let handling: Handling = h
        .handling_code
        .parse()
        .map_err(|_| ExportError::UnknownHandling(h.handling_code.clone()))?;
    if handling.forbids_onward_transmission() {
        return Err(ExportError::Restricted(
            handling_mark(h).unwrap_or_else(|| h.handling_code.clone()),
        ));
    }
    if child_case || rules::concerns_a_child(&opened.body) {
        return Err(ExportError::Child);
    }
    let mut doc = serde_json::Map::new();
    if handling.not_for_court() {
        doc.insert(
            "handling_notice".into(),
            handling_mark(h).unwrap_or_default().into(),
        );
    }
    doc.insert("message_id".into(), opened.envelope.id().to_string().into());
    doc.insert(
        "envelope_hash".into(),
        opened.envelope.hash().to_string().into(),
    );
    doc.insert("case_ref".into(), h.case_ref.clone().into());
    doc.insert("kind".into(), opened.envelope.kind().as_str_name().into());
    doc.insert("sender".into(), opened.envelope.sender().to_string().into());
    doc.insert("created_at_ms".into(), h.created_at_ms.into());
    doc.insert("handling_code".into(), h.handling_code.clone().into());
    doc.insert("evaluation".into(), h.evaluation.clone().into());
    doc.insert(
        "form".into(),
        serde_json::to_value(&opened.body).map_err(|e| ExportError::Encode(e.to_string()))?,
    );
    Ok(doc.into())
}

/// Records in `org_dir/reveals.log` (owner-only) that a child victim's data in `opened`
/// was shown unmasked, with when and which message: ids only, no names.
pub fn record_reveal(org_dir: &Path, opened: &Opened, at_ms: i64) -> std::io::Result<()> {
    let mut file = crate::casebook::open_owner_only(&org_dir.join("reveals.log"))?;
    writeln!(
        file,
        "{at_ms} revealed child victim data of message {} case {}",
        opened.envelope.id(),
        opened.envelope.header().case_ref
    )?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses_as_its_example_and_names_the_codes() {
        for (name, _) in EXAMPLES {
            for lang in LANGUAGES {
                let t = template(name, lang).unwrap();
                assert!(t.contains("gate:moc-bai--bavet"), "{name} {lang}");
                let body = crate::demo::parse_form(&t).unwrap();
                assert!(body.form.is_some(), "{name} {lang}");
            }
        }
        assert!(template("nothing", "en")
            .unwrap_err()
            .contains("suspect-notice"));
        assert!(template("alert", "fr").unwrap_err().contains("en, vi, km"));
    }

    #[test]
    fn a_child_victims_identifying_data_is_masked() {
        let (_, texts) = EXAMPLES
            .iter()
            .find(|e| e.0 == "victim-identification")
            .unwrap();
        let body = crate::demo::parse_form(texts[1]).unwrap();
        assert!(rules::concerns_a_child(&body));
        let shown = serde_json::to_string(&masked(&body, false)).unwrap();
        for secret in [
            "Trần Thị B",
            "Tran Thi B",
            "2010-03-04",
            "Châu Đốc",
            "karaoke",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("masked"));
        // Non-identifying facts stay.
        assert!(shown.contains("SEX_FEMALE"));
        // An answer in a child's case is masked too; the same answer elsewhere is not.
        let (_, texts) = EXAMPLES.iter().find(|e| e.0 == "victim-handover").unwrap();
        let answer = crate::demo::parse_form(texts[0]).unwrap();
        let shown = serde_json::to_string(&masked(&answer, true)).unwrap();
        assert!(!shown.contains("Department of Labour"), "{shown}");
        assert_eq!(masked(&answer, false), answer);
    }
}
