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

/// `body` with a child victim's identifying data (names, aliases, birth date, documents)
/// replaced, for display without `--reveal`.
pub fn masked(body: &pb::Body) -> pb::Body {
    let mut body = body.clone();
    if let Some(Form::VictimIdentification(f)) = &mut body.form {
        if f.is_child {
            if let Some(p) = &mut f.presumed_victim {
                let hidden = || "[masked: child victim; --reveal to show]".to_owned();
                p.name = Some(pb::PersonName {
                    latin: hidden(),
                    ..Default::default()
                });
                p.aliases.clear();
                p.birth_date.clear();
                p.documents.clear();
            }
        }
    }
    body
}

/// Renders an opened message for a person: a summary line, the handling mark, the
/// evaluation, and the form (masked if it concerns a child and `reveal` is false).
pub fn render(opened: &Opened, reveal: bool) -> Result<String, serde_json::Error> {
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
    let child = rules::concerns_a_child(&opened.body);
    let shown = if child && !reveal {
        masked(&opened.body)
    } else {
        opened.body.clone()
    };
    out.push_str(&serde_json::to_string_pretty(&shown)?);
    out.push('\n');
    Ok(out)
}

/// Records in `org_dir/reveals.log` (owner-only) that a child victim's data in `opened`
/// was shown unmasked, with when and which message: ids only, no names.
pub fn record_reveal(org_dir: &Path, opened: &Opened, at_ms: i64) -> std::io::Result<()> {
    let path = org_dir.join("reveals.log");
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
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
        let shown = serde_json::to_string(&masked(&body)).unwrap();
        for secret in ["Trần Thị B", "Tran Thi B", "2010-03-04"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("masked"));
        // Non-identifying facts stay.
        assert!(shown.contains("SEX_FEMALE"));
    }
}
