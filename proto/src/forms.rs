//! Checks on a form (the sealed body) and on the header fields that go with it.
//!
//! Gateways cannot read bodies; clients run [`check`] before sealing and again after
//! opening, with the envelope's creation time as "now", so both sides judge a form the same
//! way whenever it is opened. Errors name the field path (`subject.birth_date`), so a
//! person can fix the form they wrote.
//!
//! The rules: required fields; lengths; names and texts in Unicode NFC (the sender's
//! library normalises with [`normalize`], the receiver refuses anything else); codes from
//! [`crate::codes`]; dates that make sense (no birth in the future, a proposed handover
//! after the request). An answer (a transfer response, a verification result, ...) is the
//! same kind as its request, carries only the answer, and must name the request it answers
//! in the header ([`check_header`]).

use unicode_normalization::{is_nfc, UnicodeNormalization};

use crate::codes::{self, Evaluation, Handling};
use crate::pb::{self, body::Form};
use crate::UnixMillis;

/// A form that does not satisfy its rules; `path` names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {problem}")]
pub struct FormError {
    pub path: String,
    pub problem: &'static str,
}

fn fail(path: &str, problem: &'static str) -> FormError {
    FormError {
        path: path.to_owned(),
        problem,
    }
}

/// The kind a form belongs to.
pub fn kind_of(form: &Form) -> pb::Kind {
    match form {
        Form::SuspectNotice(_) => pb::Kind::SuspectNotice,
        Form::WantedPersonTransfer(_) => pb::Kind::WantedPersonTransfer,
        Form::VictimIdentification(_) => pb::Kind::VictimIdentification,
        Form::Alert(_) => pb::Kind::Alert,
        Form::Correspondence(_) => pb::Kind::Correspondence,
    }
}

/// Which step of its workflow a form is: a request (or a notice that expects no answer) or
/// one of the answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// A suspect notice, an alert or correspondence: nothing is expected back by rule.
    Notice,
    TransferRequest,
    TransferResponse,
    TransferHandover,
    VictimRequest,
    VerificationResult,
    RepatriationPlan,
    VictimHandover,
}

impl Step {
    /// Whether this step answers an earlier message (and so needs `in_reply_to`).
    pub fn is_answer(self) -> bool {
        !matches!(
            self,
            Self::Notice | Self::TransferRequest | Self::VictimRequest
        )
    }
}

/// The workflow step of `form`.
pub fn step_of(form: &Form) -> Step {
    use pb::victim_identification::Answer as V;
    use pb::wanted_person_transfer::Answer as W;
    match form {
        Form::WantedPersonTransfer(f) => match &f.answer {
            None => Step::TransferRequest,
            Some(W::Response(_)) => Step::TransferResponse,
            Some(W::Handover(_)) => Step::TransferHandover,
        },
        Form::VictimIdentification(f) => match &f.answer {
            None => Step::VictimRequest,
            Some(V::Result(_)) => Step::VerificationResult,
            Some(V::Repatriation(_)) => Step::RepatriationPlan,
            Some(V::Handover(_)) => Step::VictimHandover,
        },
        _ => Step::Notice,
    }
}

/// Whether the form concerns a child victim (the strictest handling applies).
pub fn concerns_a_child(body: &pb::Body) -> bool {
    matches!(&body.form, Some(Form::VictimIdentification(f)) if f.is_child)
}

const MAX_TEXT: usize = 16 * 1024;
const MAX_NAME: usize = 256;
const MAX_LIST: usize = 64;
/// How far a time may lie before the message's creation (clocks of two offices differ).
const SKEW_MS: i64 = 10 * 60 * 1000;

struct At<'a> {
    path: &'a str,
}

impl At<'_> {
    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }
}

fn text(path: &str, value: &str, max: usize) -> Result<(), FormError> {
    if value.len() > max {
        return Err(fail(path, "too long"));
    }
    if !is_nfc(value) {
        return Err(fail(
            path,
            "not in Unicode NFC (normalise it before sending)",
        ));
    }
    Ok(())
}

fn required(path: &str, value: &str) -> Result<(), FormError> {
    if value.trim().is_empty() {
        return Err(fail(path, "required"));
    }
    text(path, value, MAX_TEXT)
}

fn optional(path: &str, value: &str) -> Result<(), FormError> {
    text(path, value, MAX_TEXT)
}

fn empty(path: &str, value: &str) -> Result<(), FormError> {
    if !value.is_empty() {
        return Err(fail(path, "must be empty in an answer"));
    }
    Ok(())
}

fn list(path: &str, values: &[String]) -> Result<(), FormError> {
    if values.len() > MAX_LIST {
        return Err(fail(path, "too many entries"));
    }
    for (i, v) in values.iter().enumerate() {
        required(&format!("{path}[{i}]"), v)?;
        if v.len() > MAX_NAME {
            return Err(fail(&format!("{path}[{i}]"), "too long"));
        }
    }
    Ok(())
}

fn place(path: &str, code: &str, required_here: bool) -> Result<(), FormError> {
    if code.is_empty() {
        return if required_here {
            Err(fail(path, "required"))
        } else {
            Ok(())
        };
    }
    if !codes::is_place(code) {
        return Err(fail(path, "not a province or border gate code"));
    }
    Ok(())
}

fn gate(path: &str, code: &str) -> Result<(), FormError> {
    if code.is_empty() {
        return Err(fail(path, "required"));
    }
    if codes::border_gate(code).is_none() {
        return Err(fail(path, "not a border gate code"));
    }
    Ok(())
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn time(path: &str, value: &str) -> Result<UnixMillis, FormError> {
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|_| fail(path, "not an RFC 3339 time (2026-12-01T09:00:00+07:00)"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as UnixMillis)
}

fn year_of(ms: UnixMillis) -> i32 {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .map(|t| t.year())
        .unwrap_or(1970)
}

fn country(path: &str, cc: &str) -> Result<(), FormError> {
    if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(fail(
            path,
            "an ISO 3166 alpha-2 code in lower case (vn, kh)",
        ));
    }
    Ok(())
}

fn exploitation(path: &str, values: &[i32]) -> Result<(), FormError> {
    if values.len() > 16 {
        return Err(fail(path, "too many entries"));
    }
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            return Err(fail(&format!("{path}[{i}]"), "listed twice"));
        }
        match pb::Exploitation::try_from(*v) {
            Ok(pb::Exploitation::Unspecified) | Err(_) => {
                return Err(fail(&format!("{path}[{i}]"), "not an ICS-TIP category"))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

fn person(path: &str, p: Option<&pb::Person>, at: UnixMillis) -> Result<(), FormError> {
    let p = p.ok_or_else(|| fail(path, "required"))?;
    let f = At { path };
    let name = p
        .name
        .as_ref()
        .ok_or_else(|| fail(&f.field("name"), "required"))?;
    if [&name.vietnamese, &name.khmer, &name.latin]
        .iter()
        .all(|n| n.trim().is_empty())
    {
        return Err(fail(
            &f.field("name"),
            "at least one script (vietnamese, khmer, latin) is required",
        ));
    }
    for (script, n) in [
        ("vietnamese", &name.vietnamese),
        ("khmer", &name.khmer),
        ("latin", &name.latin),
    ] {
        text(&f.field(&format!("name.{script}")), n, MAX_NAME)?;
    }
    if p.aliases.len() > MAX_LIST {
        return Err(fail(&f.field("aliases"), "too many entries"));
    }
    for (i, a) in p.aliases.iter().enumerate() {
        required(&f.field(&format!("aliases[{i}]")), a)?;
        text(&f.field(&format!("aliases[{i}]")), a, MAX_NAME)?;
    }
    if pb::Sex::try_from(p.sex).is_err() {
        return Err(fail(&f.field("sex"), "not a listed value"));
    }
    let this_year = year_of(at);
    if p.birth_year != 0 && !(1900..=this_year).contains(&(p.birth_year as i32)) {
        return Err(fail(
            &f.field("birth_year"),
            "not between 1900 and this year",
        ));
    }
    if !p.birth_date.is_empty() {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        let date = time::Date::parse(&p.birth_date, &format)
            .map_err(|_| fail(&f.field("birth_date"), "not a date (YYYY-MM-DD)"))?;
        let born = date.midnight().assume_utc().unix_timestamp() * 1000;
        if born > at {
            return Err(fail(&f.field("birth_date"), "in the future"));
        }
        if date.year() < 1900 {
            return Err(fail(&f.field("birth_date"), "before 1900"));
        }
        if p.birth_year != 0 && p.birth_year as i32 != date.year() {
            return Err(fail(&f.field("birth_year"), "does not match birth_date"));
        }
    }
    if !p.nationality.is_empty() {
        country(&f.field("nationality"), &p.nationality)?;
    }
    if p.documents.len() > MAX_LIST {
        return Err(fail(&f.field("documents"), "too many entries"));
    }
    for (i, d) in p.documents.iter().enumerate() {
        let d_path = f.field(&format!("documents[{i}]"));
        let df = At { path: &d_path };
        required(&df.field("kind"), &d.kind)?;
        text(&df.field("kind"), &d.kind, MAX_NAME)?;
        required(&df.field("number"), &d.number)?;
        text(&df.field("number"), &d.number, MAX_NAME)?;
        country(&df.field("issuer"), &d.issuer)?;
    }
    Ok(())
}

fn handover(path: &str, h: &pb::HandoverConfirmation, at: UnixMillis) -> Result<(), FormError> {
    let f = At { path };
    gate(&f.field("border_gate"), &h.border_gate)?;
    required(&f.field("handed_over_at"), &h.handed_over_at)?;
    if time(&f.field("handed_over_at"), &h.handed_over_at)? > at.saturating_add(SKEW_MS) {
        return Err(fail(
            &f.field("handed_over_at"),
            "after the confirmation was written",
        ));
    }
    required(&f.field("received_by"), &h.received_by)?;
    optional(&f.field("notes"), &h.notes)
}

/// Checks `body` against `kind` as of `at` (the envelope's creation time): exactly the
/// matching form, its required fields, lengths, NFC text, codes and dates.
pub fn check(kind: pb::Kind, body: &pb::Body, at: UnixMillis) -> Result<(), FormError> {
    use pb::victim_identification::Answer as V;
    use pb::wanted_person_transfer::Answer as W;
    let form = body.form.as_ref().ok_or_else(|| fail("form", "required"))?;
    if kind_of(form) != kind {
        return Err(fail("form", "does not match the message kind"));
    }
    match form {
        Form::SuspectNotice(f) => {
            person("subject", f.subject.as_ref(), at)?;
            required("suspected_conduct", &f.suspected_conduct)?;
            list("linked_rings", &f.linked_rings)?;
            list("linked_subjects", &f.linked_subjects)?;
            if f.last_known_places.len() > MAX_LIST {
                return Err(fail("last_known_places", "too many entries"));
            }
            for (i, p) in f.last_known_places.iter().enumerate() {
                place(&format!("last_known_places[{i}]"), p, true)?;
            }
            match pb::RequestedAction::try_from(f.requested_action) {
                Ok(pb::RequestedAction::Unspecified) | Err(_) => {
                    return Err(fail("requested_action", "required"))
                }
                Ok(_) => {}
            }
            exploitation("exploitation", &f.exploitation)?;
        }
        Form::WantedPersonTransfer(f) => match &f.answer {
            None => {
                person("subject", f.subject.as_ref(), at)?;
                required("warrant_reference", &f.warrant_reference)?;
                required("legal_basis", &f.legal_basis)?;
                gate("border_gate", &f.border_gate)?;
                required("proposed_time", &f.proposed_time)?;
                if time("proposed_time", &f.proposed_time)? < at.saturating_sub(SKEW_MS) {
                    return Err(fail("proposed_time", "before the request"));
                }
                optional("escort", &f.escort)?;
            }
            Some(answer) => {
                if f.subject.is_some() {
                    return Err(fail("subject", "must be empty in an answer"));
                }
                for (path, v) in [
                    ("warrant_reference", &f.warrant_reference),
                    ("legal_basis", &f.legal_basis),
                    ("border_gate", &f.border_gate),
                    ("proposed_time", &f.proposed_time),
                    ("escort", &f.escort),
                ] {
                    empty(path, v)?;
                }
                match answer {
                    W::Response(r) => {
                        use pb::transfer_response::Decision;
                        match Decision::try_from(r.decision) {
                            Ok(Decision::Accept) => optional("response.reason", &r.reason)?,
                            Ok(Decision::Refuse) => required("response.reason", &r.reason)?,
                            Ok(Decision::CounterProposal) => {
                                optional("response.reason", &r.reason)?;
                                if r.border_gate.is_empty() && r.proposed_time.is_empty() {
                                    return Err(fail(
                                        "response",
                                        "a counter-proposal names another border_gate or proposed_time",
                                    ));
                                }
                                if !r.border_gate.is_empty() {
                                    gate("response.border_gate", &r.border_gate)?;
                                }
                                if !r.proposed_time.is_empty()
                                    && time("response.proposed_time", &r.proposed_time)?
                                        < at.saturating_sub(SKEW_MS)
                                {
                                    return Err(fail("response.proposed_time", "in the past"));
                                }
                            }
                            Ok(Decision::Unspecified) | Err(_) => {
                                return Err(fail("response.decision", "required"))
                            }
                        }
                    }
                    W::Handover(h) => handover("handover", h, at)?,
                }
            }
        },
        Form::VictimIdentification(f) => match &f.answer {
            None => {
                person("presumed_victim", f.presumed_victim.as_ref(), at)?;
                required("circumstances", &f.circumstances)?;
                optional("family_tracing_needs", &f.family_tracing_needs)?;
                if f.accompanying_children > 100 {
                    return Err(fail("accompanying_children", "out of range"));
                }
                exploitation("exploitation", &f.exploitation)?;
                place("province", &f.province, false)?;
            }
            Some(answer) => {
                if f.presumed_victim.is_some() {
                    return Err(fail("presumed_victim", "must be empty in an answer"));
                }
                for (path, v) in [
                    ("circumstances", &f.circumstances),
                    ("family_tracing_needs", &f.family_tracing_needs),
                    ("province", &f.province),
                ] {
                    empty(path, v)?;
                }
                if !f.exploitation.is_empty() || f.accompanying_children != 0 {
                    return Err(fail("exploitation", "must be empty in an answer"));
                }
                match answer {
                    V::Result(r) => {
                        use pb::verification_result::Outcome;
                        match Outcome::try_from(r.outcome) {
                            Ok(Outcome::Confirmed) => optional("result.details", &r.details)?,
                            Ok(Outcome::NotConfirmed | Outcome::NeedsMoreInformation) => {
                                required("result.details", &r.details)?
                            }
                            Ok(Outcome::Unspecified) | Err(_) => {
                                return Err(fail("result.outcome", "required"))
                            }
                        }
                    }
                    V::Repatriation(p) => {
                        gate("repatriation.border_gate", &p.border_gate)?;
                        required("repatriation.planned_time", &p.planned_time)?;
                        if time("repatriation.planned_time", &p.planned_time)?
                            < at.saturating_sub(SKEW_MS)
                        {
                            return Err(fail("repatriation.planned_time", "in the past"));
                        }
                        required("repatriation.receiving_agency", &p.receiving_agency)?;
                        optional("repatriation.escort", &p.escort)?;
                        optional("repatriation.reception_support", &p.reception_support)?;
                    }
                    V::Handover(h) => handover("handover", h, at)?,
                }
            }
        },
        Form::Alert(f) => {
            required("what", &f.what)?;
            required("where", &f.r#where)?;
            place("place", &f.place, false)?;
            let when = (!f.when.is_empty())
                .then(|| time("when", &f.when))
                .transpose()?;
            if !f.until.is_empty() {
                let until = time("until", &f.until)?;
                if when.is_some_and(|w| until < w) {
                    return Err(fail("until", "before when"));
                }
            }
        }
        Form::Correspondence(f) => {
            required("text", &f.text)?;
            if f.attachments.len() > MAX_LIST {
                return Err(fail("attachments", "too many entries"));
            }
            for (i, a) in f.attachments.iter().enumerate() {
                required(&format!("attachments[{i}].name"), &a.name)?;
                text(&format!("attachments[{i}].name"), &a.name, MAX_NAME)?;
                required(&format!("attachments[{i}].media_type"), &a.media_type)?;
                if a.part != 0 && !a.content.is_empty() {
                    return Err(fail(
                        &format!("attachments[{i}].content"),
                        "empty when the file travels in chunks (part)",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The header a child victim's message travels with: FLASH, and the sender's handling
/// code if it is at least H2 (H2 or H3), else H2.
pub fn protect_child(handling_code: &str) -> (pb::Priority, String) {
    let strict_enough = handling_code
        .parse::<Handling>()
        .is_ok_and(|h| h.forbids_onward_transmission());
    let handling = if strict_enough { handling_code } else { "H2" };
    (pb::Priority::Flash, handling.to_owned())
}

/// Checks the header fields a form constrains: handling and evaluation codes (required
/// here, whatever the gateways accept), an answer naming what it answers, and the child
/// rule (highest priority, at least H2) for a child victim's request and, `child_case`,
/// for every message answering one (which the caller's case book knows).
pub fn check_header(
    body: &pb::Body,
    header: &pb::Header,
    child_case: bool,
) -> Result<(), FormError> {
    let handling: Handling = header
        .handling_code
        .parse()
        .map_err(|_| fail("header.handling_code", "H0, H1, H2 or H3:<restrictions>"))?;
    header.evaluation.parse::<Evaluation>().map_err(|_| {
        fail(
            "header.evaluation",
            "source A, B, C or X and information 1 to 4, e.g. B2",
        )
    })?;
    let form = body.form.as_ref().ok_or_else(|| fail("form", "required"))?;
    if step_of(form).is_answer() && header.in_reply_to.is_empty() {
        return Err(fail(
            "header.in_reply_to",
            "an answer names the request it answers",
        ));
    }
    check_parts(form, header)?;
    if concerns_a_child(body) || child_case {
        if header.priority != pb::Priority::Flash as i32 {
            return Err(fail("header.priority", "a child victim's message is FLASH"));
        }
        if !handling.forbids_onward_transmission() {
            return Err(fail(
                "header.handling_code",
                "a child victim's message is at least H2",
            ));
        }
    }
    Ok(())
}

/// Every attachment the header commits to is named by exactly one of the body's attachments
/// (`part`, 1-based), with the same size; only correspondence carries attachments.
fn check_parts(form: &Form, header: &pb::Header) -> Result<(), FormError> {
    let named: &[pb::Attachment] = match form {
        Form::Correspondence(f) => &f.attachments,
        _ => &[],
    };
    let mut seen = vec![false; header.attachments.len()];
    for (i, a) in named.iter().enumerate() {
        if a.part == 0 {
            continue;
        }
        let path = format!("attachments[{i}].part");
        let digest = header
            .attachments
            .get(a.part as usize - 1)
            .ok_or_else(|| fail(&path, "names no attachment of the header"))?;
        if std::mem::replace(&mut seen[a.part as usize - 1], true) {
            return Err(fail(&path, "names an attachment another entry names"));
        }
        if digest.size != a.size {
            return Err(fail(
                &format!("attachments[{i}].size"),
                "differs from the header's attachment",
            ));
        }
    }
    if seen.contains(&false) {
        return Err(fail(
            "header.attachments",
            "an attachment no entry of the form names",
        ));
    }
    Ok(())
}

/// Puts every text of `body` in Unicode NFC, as the sender's library does before sealing.
pub fn normalize(body: &mut pb::Body) {
    fn nfc(s: &mut String) {
        if !is_nfc(s) {
            *s = s.nfc().collect();
        }
    }
    fn person(p: &mut Option<pb::Person>) {
        let Some(p) = p else { return };
        if let Some(n) = &mut p.name {
            nfc(&mut n.vietnamese);
            nfc(&mut n.khmer);
            nfc(&mut n.latin);
        }
        p.aliases.iter_mut().for_each(nfc);
        for d in &mut p.documents {
            nfc(&mut d.kind);
            nfc(&mut d.number);
        }
    }
    fn handover(h: &mut pb::HandoverConfirmation) {
        nfc(&mut h.received_by);
        nfc(&mut h.notes);
    }
    use pb::victim_identification::Answer as V;
    use pb::wanted_person_transfer::Answer as W;
    match &mut body.form {
        Some(Form::SuspectNotice(f)) => {
            person(&mut f.subject);
            nfc(&mut f.suspected_conduct);
            f.linked_rings.iter_mut().for_each(nfc);
            f.linked_subjects.iter_mut().for_each(nfc);
        }
        Some(Form::WantedPersonTransfer(f)) => {
            person(&mut f.subject);
            for s in [&mut f.warrant_reference, &mut f.legal_basis, &mut f.escort] {
                nfc(s);
            }
            match &mut f.answer {
                Some(W::Response(r)) => nfc(&mut r.reason),
                Some(W::Handover(h)) => handover(h),
                None => {}
            }
        }
        Some(Form::VictimIdentification(f)) => {
            person(&mut f.presumed_victim);
            nfc(&mut f.circumstances);
            nfc(&mut f.family_tracing_needs);
            match &mut f.answer {
                Some(V::Result(r)) => nfc(&mut r.details),
                Some(V::Repatriation(p)) => {
                    for s in [
                        &mut p.escort,
                        &mut p.receiving_agency,
                        &mut p.reception_support,
                    ] {
                        nfc(s);
                    }
                }
                Some(V::Handover(h)) => handover(h),
                None => {}
            }
        }
        Some(Form::Alert(f)) => {
            nfc(&mut f.what);
            nfc(&mut f.r#where);
        }
        Some(Form::Correspondence(f)) => {
            nfc(&mut f.text);
            for a in &mut f.attachments {
                nfc(&mut a.name);
                nfc(&mut a.media_type);
            }
        }
        None => {}
    }
}

#[cfg(test)]
mod tests;
