//! Checks on a body's form: it matches the header's kind and carries its required fields.
//!
//! Gateways cannot read bodies; clients run these checks before sealing and after opening.
//! Errors name the field path (`subject.name`), so a person can fix the form they wrote.

use crate::pb::{self, body::Form};

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

const MAX_TEXT: usize = 16 * 1024;

fn required(path: &str, value: &str) -> Result<(), FormError> {
    if value.trim().is_empty() {
        return Err(fail(path, "required"));
    }
    if value.len() > MAX_TEXT {
        return Err(fail(path, "too long"));
    }
    Ok(())
}

fn person(path: &str, p: Option<&pb::Person>) -> Result<(), FormError> {
    let p = p.ok_or_else(|| fail(path, "required"))?;
    let name = p
        .name
        .as_ref()
        .ok_or_else(|| fail(&format!("{path}.name"), "required"))?;
    if [&name.vietnamese, &name.khmer, &name.latin]
        .iter()
        .all(|n| n.trim().is_empty())
    {
        return Err(fail(
            &format!("{path}.name"),
            "at least one script (vietnamese, khmer, latin) is required",
        ));
    }
    if p.birth_year != 0 && !(1900..=2100).contains(&p.birth_year) {
        return Err(fail(&format!("{path}.birth_year"), "out of range"));
    }
    Ok(())
}

/// Checks `body` against `kind`: exactly the matching form, with its required fields.
pub fn check(kind: pb::Kind, body: &pb::Body) -> Result<(), FormError> {
    let form = body.form.as_ref().ok_or_else(|| fail("form", "required"))?;
    if kind_of(form) != kind {
        return Err(fail("form", "does not match the message kind"));
    }
    match form {
        Form::SuspectNotice(f) => {
            person("subject", f.subject.as_ref())?;
            required("suspected_conduct", &f.suspected_conduct)?;
            if f.requested_action == pb::RequestedAction::Unspecified as i32 {
                return Err(fail("requested_action", "required"));
            }
        }
        Form::WantedPersonTransfer(f) => {
            person("subject", f.subject.as_ref())?;
            required("warrant_reference", &f.warrant_reference)?;
            required("legal_basis", &f.legal_basis)?;
        }
        Form::VictimIdentification(f) => {
            person("presumed_victim", f.presumed_victim.as_ref())?;
            required("circumstances", &f.circumstances)?;
        }
        Form::Alert(f) => {
            required("what", &f.what)?;
            required("where", &f.r#where)?;
        }
        Form::Correspondence(f) => required("text", &f.text)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_of_another_kind_is_refused() {
        let body = pb::Body {
            form: Some(Form::Alert(pb::Alert {
                what: "x".into(),
                r#where: "y".into(),
                ..Default::default()
            })),
        };
        assert!(check(pb::Kind::Alert, &body).is_ok());
        assert_eq!(
            check(pb::Kind::SuspectNotice, &body).unwrap_err().path,
            "form"
        );
    }

    #[test]
    fn errors_name_the_field_path() {
        let body = pb::Body {
            form: Some(Form::SuspectNotice(pb::SuspectNotice {
                subject: Some(pb::Person {
                    name: Some(pb::PersonName::default()),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        assert_eq!(
            check(pb::Kind::SuspectNotice, &body).unwrap_err().path,
            "subject.name"
        );
    }
}
