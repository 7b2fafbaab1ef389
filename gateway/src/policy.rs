//! Role policy: which organisation may send which kind of message to which other one
//! (DESIGN.md, "Identities and trust"; the default is `deploy/policy.toml`).
//!
//! Pure: parsing and checking only, no I/O except [`Policy::load`]. The interpretation lives
//! in the policy file, not here: a message is allowed when at least one `[[allow]]` rule
//! matches, and refused otherwise.
//!
//! ```toml
//! excluded_roles = ["auditor"]     # never a sender or a recipient, whatever other roles
//!
//! [[allow]]
//! from = "hotline"                 # a role the sender holds
//! to = ["hotline"]                 # roles of which the recipient holds at least one
//! kinds = ["alert", "correspondence"]   # or ["*"]
//! scope = "paired"                 # domestic | foreign | any | paired | paired_country
//!
//! [pairs]                          # provinces paired across a border, both directions
//! "vn/tay-ninh" = ["kh/svay-rieng"]
//! ```
//!
//! Scopes compare the sender's place with the recipient's: `domestic` (same country),
//! `foreign` (another country), `any`, `paired` (the recipient's province is paired with the
//! sender's; both have one) and `paired_country` (another country in which the sender's
//! province has a paired province).
//!
//! The gateway calls [`Policy::authorize`] on submit and again when an envelope arrives from
//! a peer; a refusal's reason names roles, kind and scope only, never an organisation's name
//! or anything from the message.

use std::collections::BTreeSet;
use std::path::Path;

use accord_proto::ids::{CountryCode, OrgId};
use accord_proto::pb::Kind;
use toml::Value;

/// Why a policy file was refused: every problem found, each naming the key it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {}", problems.join("; "))]
pub struct PolicyError {
    pub file: String,
    pub problems: Vec<String>,
}

/// The facts about one party the policy needs.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    /// The organisation; its country is the one in its SPIFFE id.
    pub org: &'a OrgId,
    /// Its roles as the signed directory lists them; unknown values count for nothing.
    pub roles: &'a [String],
    /// Its province code as the directory lists it (hotlines have one), or empty.
    pub province: &'a str,
}

/// A role an organisation can hold in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    FocalPoint,
    Hotline,
    Auditor,
}

const ROLES: [(Role, &str); 3] = [
    (Role::FocalPoint, "focal_point"),
    (Role::Hotline, "hotline"),
    (Role::Auditor, "auditor"),
];

impl Role {
    fn from_name(name: &str) -> Option<Self> {
        ROLES.iter().find(|(_, n)| *n == name).map(|(r, _)| *r)
    }

    fn name(self) -> &'static str {
        ROLES
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("?", |(_, n)| n)
    }
}

const KINDS: [(Kind, &str); 5] = [
    (Kind::SuspectNotice, "suspect_notice"),
    (Kind::WantedPersonTransfer, "wanted_person_transfer"),
    (Kind::VictimIdentification, "victim_identification"),
    (Kind::Alert, "alert"),
    (Kind::Correspondence, "correspondence"),
];

fn kind_name(kind: Kind) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("unspecified", |(_, n)| n)
}

/// Where the recipient is, seen from the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Domestic,
    Foreign,
    Any,
    Paired,
    PairedCountry,
}

const SCOPES: [(Scope, &str); 5] = [
    (Scope::Domestic, "domestic"),
    (Scope::Foreign, "foreign"),
    (Scope::Any, "any"),
    (Scope::Paired, "paired"),
    (Scope::PairedCountry, "paired_country"),
];

#[derive(Clone, Debug)]
struct Rule {
    from: Role,
    to: Vec<Role>,
    kinds: Vec<Kind>,
    scope: Scope,
}

/// A province: its country and its code as the directory writes it (`vn`, `tay-ninh`).
type Place = (CountryCode, String);

/// A checked policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    excluded: Vec<Role>,
    /// Every pair, in both directions.
    pairs: BTreeSet<(Place, Place)>,
}

impl Policy {
    /// Reads and checks the policy file at `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: file.clone(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        Self::parse(&text, &file)
    }

    /// Checks policy `text` read from `file` (used only in error messages). Unknown keys,
    /// unknown roles, kinds and scopes, malformed pairs and rules that allow nothing are all
    /// reported together.
    pub fn parse(text: &str, file: &str) -> Result<Self, PolicyError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| PolicyError {
            file: file.to_owned(),
            problems: vec![e.to_string().trim_end().to_owned()],
        })?;
        let mut problems = Vec::new();
        for key in table.keys() {
            if !matches!(key.as_str(), "excluded_roles" | "allow" | "pairs") {
                problems.push(format!(
                    "{key:?}: unknown key (known: excluded_roles, allow, pairs)"
                ));
            }
        }

        let mut excluded = Vec::new();
        if let Some(v) = table.get("excluded_roles") {
            for (key, name) in strings(v, "excluded_roles", &mut problems) {
                if let Some(role) = role(name, &key, &mut problems) {
                    excluded.push(role);
                }
            }
        }

        let mut rules = Vec::new();
        match table.get("allow") {
            None => problems.push(
                "allow: missing (write at least one [[allow]] rule, or `allow = []` to refuse \
                 every message)"
                    .into(),
            ),
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let key = format!("allow[{i}]");
                    if let Some(rule) = parse_rule(item, &key, &excluded, &mut problems) {
                        rules.push(rule);
                    }
                }
            }
            Some(other) => problems.push(format!(
                "allow: expected [[allow]] tables, found {}",
                other.type_str()
            )),
        }

        let mut pairs = BTreeSet::new();
        match table.get("pairs") {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    let key = format!("pairs.{k:?}");
                    let from = place(k);
                    if from.is_none() {
                        problems.push(format!("{key}: not \"<cc>/<province>\""));
                    }
                    let list = strings(v, &key, &mut problems);
                    if list.is_empty() && matches!(v, Value::Array(_)) {
                        problems.push(format!("{key}: empty list"));
                    }
                    for (vkey, s) in list {
                        let Some(to) = place(s) else {
                            problems.push(format!("{vkey}: {s:?} is not \"<cc>/<province>\""));
                            continue;
                        };
                        let Some(from) = &from else { continue };
                        if from.0 == to.0 {
                            problems.push(format!(
                                "{vkey}: {s:?} is in the same country, but pairs join provinces \
                                 across a border"
                            ));
                            continue;
                        }
                        pairs.insert((from.clone(), to.clone()));
                        pairs.insert((to, from.clone()));
                    }
                }
            }
            Some(other) => problems.push(format!(
                "pairs: expected a table of \"<cc>/<province>\" = [...], found {}",
                other.type_str()
            )),
        }

        if problems.is_empty() {
            Ok(Self {
                rules,
                excluded,
                pairs,
            })
        } else {
            Err(PolicyError {
                file: file.to_owned(),
                problems,
            })
        }
    }

    /// Ok, or Err with a one-sentence reason naming roles, kind and scope (ids only, nothing
    /// personal), e.g. "a hotline may not send suspect_notice to a focal_point abroad (kh)".
    pub fn authorize(
        &self,
        sender: Party<'_>,
        recipient: Party<'_>,
        kind: Kind,
    ) -> Result<(), String> {
        let sender_roles = roles_of(sender.roles);
        let recipient_roles = roles_of(recipient.roles);
        if kind == Kind::Unspecified {
            return Err("a message of unspecified kind is never allowed".into());
        }
        for (who, roles) in [("sender", &sender_roles), ("recipient", &recipient_roles)] {
            if let Some(role) = roles.iter().find(|r| self.excluded.contains(r)) {
                return Err(format!(
                    "the {who} holds the {} role, which may neither send nor receive messages",
                    role.name()
                ));
            }
        }
        let allowed = self.rules.iter().any(|rule| {
            sender_roles.contains(&rule.from)
                && rule.to.iter().any(|r| recipient_roles.contains(r))
                && rule.kinds.contains(&kind)
                && self.in_scope(rule.scope, sender, recipient)
        });
        if allowed {
            return Ok(());
        }
        Err(format!(
            "{} may not send {} to {} {}",
            describe(&sender_roles),
            kind_name(kind),
            describe(&recipient_roles),
            self.whereabouts(sender, recipient)
        ))
    }

    fn in_scope(&self, scope: Scope, sender: Party<'_>, recipient: Party<'_>) -> bool {
        let domestic = sender.org.country() == recipient.org.country();
        match scope {
            Scope::Any => true,
            Scope::Domestic => domestic,
            Scope::Foreign => !domestic,
            Scope::Paired => self.provinces_paired(sender, recipient),
            Scope::PairedCountry => !domestic && self.country_paired(sender, recipient),
        }
    }

    /// Both parties have a province and the two are paired.
    fn provinces_paired(&self, sender: Party<'_>, recipient: Party<'_>) -> bool {
        !sender.province.is_empty()
            && !recipient.province.is_empty()
            && self.pairs.contains(&(
                (sender.org.country().clone(), sender.province.to_owned()),
                (
                    recipient.org.country().clone(),
                    recipient.province.to_owned(),
                ),
            ))
    }

    /// The sender has a province paired with some province of the recipient's country.
    fn country_paired(&self, sender: Party<'_>, recipient: Party<'_>) -> bool {
        !sender.province.is_empty()
            && self.pairs.iter().any(|((fc, fp), (tc, _))| {
                fc == sender.org.country() && fp == sender.province && tc == recipient.org.country()
            })
    }

    /// The scope part of a refusal: countries and whether provinces are paired.
    fn whereabouts(&self, sender: Party<'_>, recipient: Party<'_>) -> String {
        let (sc, rc) = (sender.org.country(), recipient.org.country());
        if sc == rc {
            return format!("in its own country ({sc})");
        }
        if sender.province.is_empty() {
            format!("abroad ({rc})")
        } else if !recipient.province.is_empty() {
            if self.provinces_paired(sender, recipient) {
                format!("abroad ({rc}) in a paired province")
            } else {
                format!("abroad ({rc}) in a province not paired with its own")
            }
        } else if self.country_paired(sender, recipient) {
            format!("abroad ({rc})")
        } else {
            format!("abroad ({rc}), where its province has no pair")
        }
    }
}

/// The known roles among a directory entry's roles, sorted, each once.
fn roles_of(names: &[String]) -> Vec<Role> {
    let mut roles: Vec<Role> = names.iter().filter_map(|n| Role::from_name(n)).collect();
    roles.sort();
    roles.dedup();
    roles
}

/// "a hotline", "an auditor", "a focal_point/hotline", "an organisation with no role".
fn describe(roles: &[Role]) -> String {
    if roles.is_empty() {
        return "an organisation with no role".into();
    }
    let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    let joined = names.join("/");
    let article = if joined.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {joined}")
}

fn parse_rule(
    item: &Value,
    key: &str,
    excluded: &[Role],
    problems: &mut Vec<String>,
) -> Option<Rule> {
    let Value::Table(t) = item else {
        problems.push(format!(
            "{key}: expected a table, found {}",
            item.type_str()
        ));
        return None;
    };
    for k in t.keys() {
        if !matches!(k.as_str(), "from" | "to" | "kinds" | "scope") {
            problems.push(format!(
                "{key}.{k}: unknown key (known: from, to, kinds, scope)"
            ));
        }
    }
    let mut ok = true;
    let missing = |field: &str, problems: &mut Vec<String>| {
        let v = t.get(field);
        if v.is_none() {
            problems.push(format!("{key}.{field}: missing"));
        }
        v
    };

    let from = match missing("from", problems) {
        None => None,
        Some(Value::String(s)) => role(s, &format!("{key}.from"), problems),
        Some(other) => {
            problems.push(format!(
                "{key}.from: expected one role as a string, found {}",
                other.type_str()
            ));
            None
        }
    };
    if let Some(r) = from.filter(|r| excluded.contains(r)) {
        problems.push(format!(
            "{key}.from: {} is an excluded role (excluded_roles), so no rule may name it",
            r.name()
        ));
        ok = false;
    }

    let mut to = Vec::new();
    if let Some(v) = missing("to", problems) {
        let list = strings(v, &format!("{key}.to"), problems);
        if list.is_empty() && matches!(v, Value::Array(_)) {
            problems.push(format!("{key}.to: empty, so the rule allows nothing"));
        }
        for (k, s) in list {
            match role(s, &k, problems) {
                Some(r) if excluded.contains(&r) => {
                    problems.push(format!(
                        "{k}: {} is an excluded role (excluded_roles), so no rule may name it",
                        r.name()
                    ));
                    ok = false;
                }
                Some(r) => to.push(r),
                None => ok = false,
            }
        }
    }

    let mut kinds = Vec::new();
    if let Some(v) = missing("kinds", problems) {
        let list = strings(v, &format!("{key}.kinds"), problems);
        if list.is_empty() && matches!(v, Value::Array(_)) {
            problems.push(format!("{key}.kinds: empty, so the rule allows nothing"));
        }
        let star = list.iter().any(|(_, s)| *s == "*");
        if star && list.len() > 1 {
            problems.push(format!(
                "{key}.kinds: \"*\" already means every kind, so write it alone"
            ));
        }
        for (k, s) in list {
            if s == "*" {
                kinds.extend(KINDS.iter().map(|(kind, _)| *kind));
            } else if let Some((kind, _)) = KINDS.iter().find(|(_, n)| *n == s) {
                kinds.push(*kind);
            } else {
                problems.push(format!(
                    "{k}: unknown kind {s:?} (known: \"*\", {})",
                    KINDS.map(|(_, n)| n).join(", ")
                ));
                ok = false;
            }
        }
    }

    let scope = match missing("scope", problems) {
        None => None,
        Some(Value::String(s)) => {
            let found = SCOPES.iter().find(|(_, n)| n == s).map(|(sc, _)| *sc);
            if found.is_none() {
                problems.push(format!(
                    "{key}.scope: unknown scope {s:?} (known: {})",
                    SCOPES.map(|(_, n)| n).join(", ")
                ));
            }
            found
        }
        Some(other) => {
            problems.push(format!(
                "{key}.scope: expected a string, found {}",
                other.type_str()
            ));
            None
        }
    };

    match (from, scope) {
        (Some(from), Some(scope)) if ok && !to.is_empty() && !kinds.is_empty() => Some(Rule {
            from,
            to,
            kinds,
            scope,
        }),
        _ => None,
    }
}

/// A role name, or a problem at `key`.
fn role(name: &str, key: &str, problems: &mut Vec<String>) -> Option<Role> {
    let found = Role::from_name(name);
    if found.is_none() {
        let known = ROLES.map(|(_, n)| n).join(", ");
        if name == "gateway" {
            problems.push(format!(
                "{key}: \"gateway\" is not an organisation role: gateways relay envelopes and \
                 are never a party to a message (known roles: {known})"
            ));
        } else {
            problems.push(format!("{key}: unknown role {name:?} (known: {known})"));
        }
    }
    found
}

/// The strings of an array at `key`, each with its own key (`key[i]`); a problem for
/// anything else.
fn strings<'v>(v: &'v Value, key: &str, problems: &mut Vec<String>) -> Vec<(String, &'v str)> {
    let Value::Array(items) = v else {
        problems.push(format!(
            "{key}: expected an array of strings, found {}",
            v.type_str()
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) => out.push((format!("{key}[{i}]"), s.as_str())),
            other => problems.push(format!(
                "{key}[{i}]: expected a string, found {}",
                other.type_str()
            )),
        }
    }
    out
}

/// `<cc>/<province>`: an ISO 3166 alpha-2 code in lowercase and a province code of lowercase
/// letters, digits and hyphens.
fn place(s: &str) -> Option<Place> {
    let (cc, province) = s.split_once('/')?;
    let country = cc.parse::<CountryCode>().ok()?;
    let valid = (1..=63).contains(&province.len())
        && province
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then(|| (country, province.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/policy.toml");

    fn deploy_policy() -> Policy {
        match Policy::load(Path::new(DEPLOY)) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    fn org(cc: &str, name: &str) -> OrgId {
        format!("spiffe://{cc}.accord/org/{name}").parse().unwrap()
    }

    fn party<'a>(org: &'a OrgId, roles: &'a [String], province: &'a str) -> Party<'a> {
        Party {
            org,
            roles,
            province,
        }
    }

    fn strings_of(roles: &[&str]) -> Vec<String> {
        roles.iter().map(|r| r.to_string()).collect()
    }

    /// Where the recipient is. The sender is always in vn/tay-ninh.
    #[derive(Clone, Copy, Debug)]
    enum To {
        /// vn/long-an: same country.
        Domestic,
        /// kh/svay-rieng: paired with vn/tay-ninh.
        Paired,
        /// kh/kampot: the paired country, a province not paired with vn/tay-ninh.
        Unpaired,
        /// cn/yunnan: a third country, where vn/tay-ninh has no pair.
        Third,
    }

    impl To {
        fn place(self) -> (&'static str, &'static str) {
            match self {
                To::Domestic => ("vn", "long-an"),
                To::Paired => ("kh", "svay-rieng"),
                To::Unpaired => ("kh", "kampot"),
                To::Third => ("cn", "yunnan"),
            }
        }
    }

    /// One row of a verdict table: sender's roles, recipient's roles, where the recipient
    /// is, and whether each kind of `KIND_COLUMNS` is allowed.
    type Row = (
        &'static [&'static str],
        &'static [&'static str],
        To,
        [bool; 5],
    );

    const Y: bool = true;
    const N: bool = false;
    const KIND_COLUMNS: [Kind; 5] = [
        Kind::SuspectNotice,
        Kind::WantedPersonTransfer,
        Kind::VictimIdentification,
        Kind::Alert,
        Kind::Correspondence,
    ];

    /// Checks every row: sender roles (vn/tay-ninh), recipient roles and place, and the
    /// expected verdict for each kind in `KIND_COLUMNS` order. Every party carries the
    /// province of its place, whatever its role, so the table also shows that only the
    /// hotline rules look at provinces. Returns how many cases were allowed and denied.
    fn check_table(policy: &Policy, rows: &[Row]) -> (usize, usize) {
        let mut failures = Vec::new();
        let (mut allowed, mut denied) = (0, 0);
        let sender_org = org("vn", "sender");
        for (i, (from, to, place, expected)) in rows.iter().enumerate() {
            let (cc, province) = place.place();
            let recipient_org = org(cc, "recipient");
            let (sender_roles, recipient_roles) = (strings_of(from), strings_of(to));
            let sender = party(&sender_org, &sender_roles, "tay-ninh");
            let recipient = party(&recipient_org, &recipient_roles, province);
            for (kind, want) in KIND_COLUMNS.iter().zip(expected) {
                let got = policy.authorize(sender, recipient, *kind);
                if got.is_ok() {
                    allowed += 1;
                } else {
                    denied += 1;
                }
                if got.is_ok() != *want {
                    failures.push(format!(
                        "row {i}: {from:?} -> {to:?} {place:?} {}: expected {}, got {got:?}",
                        kind_name(*kind),
                        if *want { "allow" } else { "deny" },
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
        (allowed, denied)
    }

    const FP: &[&str] = &["focal_point"];
    const HL: &[&str] = &["hotline"];
    const AU: &[&str] = &["auditor"];
    const NO: &[&str] = &[];

    /// Every sender role x recipient role x place x kind under deploy/policy.toml.
    #[rustfmt::skip]
    const TABLE: &[Row] = &[
        // FP focal point, HL hotline, AU auditor, NO no role; Y allowed, N refused.
        // (sender, recipient, recipient is, [suspect_notice, wanted_person_transfer,
        //                                    victim_identification, alert, correspondence])
        (FP, FP, To::Domestic, [N, N, N, N, N]),
        (FP, FP, To::Paired,   [Y, Y, Y, Y, Y]),
        (FP, FP, To::Unpaired, [Y, Y, Y, Y, Y]),
        (FP, FP, To::Third,    [Y, Y, Y, Y, Y]),
        (FP, HL, To::Domestic, [N, N, N, N, N]),
        (FP, HL, To::Paired,   [N, N, N, Y, Y]),
        (FP, HL, To::Unpaired, [N, N, N, Y, Y]),
        (FP, HL, To::Third,    [N, N, N, Y, Y]),
        (FP, AU, To::Domestic, [N, N, N, N, N]),
        (FP, AU, To::Paired,   [N, N, N, N, N]),
        (FP, AU, To::Unpaired, [N, N, N, N, N]),
        (FP, AU, To::Third,    [N, N, N, N, N]),
        (FP, NO, To::Domestic, [N, N, N, N, N]),
        (FP, NO, To::Paired,   [N, N, N, N, N]),
        (FP, NO, To::Unpaired, [N, N, N, N, N]),
        (FP, NO, To::Third,    [N, N, N, N, N]),

        (HL, FP, To::Domestic, [N, N, N, N, N]),
        (HL, FP, To::Paired,   [N, N, N, Y, Y]),
        (HL, FP, To::Unpaired, [N, N, N, Y, Y]),
        (HL, FP, To::Third,    [N, N, N, N, N]),
        (HL, HL, To::Domestic, [N, N, N, N, N]),
        (HL, HL, To::Paired,   [N, N, N, Y, Y]),
        (HL, HL, To::Unpaired, [N, N, N, N, N]),
        (HL, HL, To::Third,    [N, N, N, N, N]),
        (HL, AU, To::Domestic, [N, N, N, N, N]),
        (HL, AU, To::Paired,   [N, N, N, N, N]),
        (HL, AU, To::Unpaired, [N, N, N, N, N]),
        (HL, AU, To::Third,    [N, N, N, N, N]),
        (HL, NO, To::Domestic, [N, N, N, N, N]),
        (HL, NO, To::Paired,   [N, N, N, N, N]),
        (HL, NO, To::Unpaired, [N, N, N, N, N]),
        (HL, NO, To::Third,    [N, N, N, N, N]),

        (AU, FP, To::Domestic, [N, N, N, N, N]),
        (AU, FP, To::Paired,   [N, N, N, N, N]),
        (AU, FP, To::Unpaired, [N, N, N, N, N]),
        (AU, FP, To::Third,    [N, N, N, N, N]),
        (AU, HL, To::Domestic, [N, N, N, N, N]),
        (AU, HL, To::Paired,   [N, N, N, N, N]),
        (AU, HL, To::Unpaired, [N, N, N, N, N]),
        (AU, HL, To::Third,    [N, N, N, N, N]),
        (AU, AU, To::Domestic, [N, N, N, N, N]),
        (AU, AU, To::Paired,   [N, N, N, N, N]),
        (AU, AU, To::Unpaired, [N, N, N, N, N]),
        (AU, AU, To::Third,    [N, N, N, N, N]),
        (AU, NO, To::Domestic, [N, N, N, N, N]),
        (AU, NO, To::Paired,   [N, N, N, N, N]),
        (AU, NO, To::Unpaired, [N, N, N, N, N]),
        (AU, NO, To::Third,    [N, N, N, N, N]),

        (NO, FP, To::Domestic, [N, N, N, N, N]),
        (NO, FP, To::Paired,   [N, N, N, N, N]),
        (NO, FP, To::Unpaired, [N, N, N, N, N]),
        (NO, FP, To::Third,    [N, N, N, N, N]),
        (NO, HL, To::Domestic, [N, N, N, N, N]),
        (NO, HL, To::Paired,   [N, N, N, N, N]),
        (NO, HL, To::Unpaired, [N, N, N, N, N]),
        (NO, HL, To::Third,    [N, N, N, N, N]),
        (NO, AU, To::Domestic, [N, N, N, N, N]),
        (NO, AU, To::Paired,   [N, N, N, N, N]),
        (NO, AU, To::Unpaired, [N, N, N, N, N]),
        (NO, AU, To::Third,    [N, N, N, N, N]),
        (NO, NO, To::Domestic, [N, N, N, N, N]),
        (NO, NO, To::Paired,   [N, N, N, N, N]),
        (NO, NO, To::Unpaired, [N, N, N, N, N]),
        (NO, NO, To::Third,    [N, N, N, N, N]),
    ];

    #[test]
    fn the_deploy_policy_parses() {
        let policy = deploy_policy();
        assert_eq!(policy.rules.len(), 4);
        assert_eq!(policy.excluded, vec![Role::Auditor]);
        assert_eq!(policy.pairs.len(), 4, "two pairs, both directions");
    }

    #[test]
    fn every_role_kind_and_direction_gets_the_verdict_of_the_table() {
        let roles = [FP, HL, AU, NO];
        let places = [To::Domestic, To::Paired, To::Unpaired, To::Third];
        for from in roles {
            for to in roles {
                for place in places {
                    let present = TABLE
                        .iter()
                        .filter(|(f, t, p, _)| {
                            f == &from
                                && t == &to
                                && std::mem::discriminant(p) == std::mem::discriminant(&place)
                        })
                        .count();
                    assert_eq!(present, 1, "table row for {from:?} -> {to:?} {place:?}");
                }
            }
        }
        let (allowed, denied) = check_table(&deploy_policy(), TABLE);
        assert_eq!((allowed, denied), (27, 293));
    }

    #[test]
    fn an_org_with_several_roles_is_allowed_if_any_role_matches_unless_one_is_excluded() {
        const FP_HL: &[&str] = &["focal_point", "hotline"];
        const AU_FP: &[&str] = &["auditor", "focal_point"];
        const FP_ODD: &[&str] = &["focal_point", "gateway", "inspector"];
        const ODD: &[&str] = &["inspector"];
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // (sender, recipient, recipient is, [suspect_notice, wanted_person_transfer,
            //                                    victim_identification, alert, correspondence])
            (FP_HL,  HL,     To::Domestic, [N, N, N, N, N]),
            (FP_HL,  HL,     To::Paired,   [N, N, N, Y, Y]),
            (FP_HL,  HL,     To::Unpaired, [N, N, N, Y, Y]),
            (FP_HL,  FP,     To::Paired,   [Y, Y, Y, Y, Y]),
            (FP,     FP_HL,  To::Unpaired, [Y, Y, Y, Y, Y]),
            (HL,     FP_HL,  To::Paired,   [N, N, N, Y, Y]),
            (HL,     FP_HL,  To::Unpaired, [N, N, N, Y, Y]),
            (AU_FP,  FP,     To::Paired,   [N, N, N, N, N]),
            (FP,     AU_FP,  To::Paired,   [N, N, N, N, N]),
            (FP_ODD, FP,     To::Paired,   [Y, Y, Y, Y, Y]),
            (FP,     FP_ODD, To::Paired,   [Y, Y, Y, Y, Y]),
            (ODD,    FP,     To::Paired,   [N, N, N, N, N]),
            (FP,     ODD,    To::Paired,   [N, N, N, N, N]),
        ];
        check_table(&deploy_policy(), rows);
    }

    #[test]
    fn pairs_hold_in_both_directions() {
        let policy = deploy_policy();
        let (hl, fp) = (strings_of(HL), strings_of(FP));
        let (svay_rieng, tay_ninh, kampot) = (
            org("kh", "svay-rieng-police"),
            org("vn", "tay-ninh-police"),
            org("kh", "kampot-police"),
        );
        let c02 = org("vn", "c02");
        let from_svay_rieng = party(&svay_rieng, &hl, "svay-rieng");
        let from_kampot = party(&kampot, &hl, "kampot");
        for kind in [Kind::Alert, Kind::Correspondence] {
            let to_tay_ninh = party(&tay_ninh, &hl, "tay-ninh");
            assert_eq!(policy.authorize(from_svay_rieng, to_tay_ninh, kind), Ok(()));
            assert_eq!(
                policy.authorize(from_svay_rieng, party(&c02, &fp, ""), kind),
                Ok(())
            );
            assert!(policy.authorize(from_kampot, to_tay_ninh, kind).is_err());
            assert!(policy
                .authorize(from_kampot, party(&c02, &fp, ""), kind)
                .is_err());
        }
    }

    #[test]
    fn paired_scopes_need_the_sender_to_have_a_province() {
        let policy = deploy_policy();
        let (hl, fp) = (strings_of(HL), strings_of(FP));
        let (a, b, c) = (org("vn", "a"), org("kh", "b"), org("kh", "c"));
        let no_province = party(&a, &hl, "");
        let hotline = party(&b, &hl, "svay-rieng");
        let focal_point = party(&c, &fp, "");
        assert!(policy.authorize(no_province, hotline, Kind::Alert).is_err());
        assert!(policy
            .authorize(no_province, focal_point, Kind::Alert)
            .is_err());
    }

    #[test]
    fn a_refusal_names_roles_kind_and_scope_and_nothing_else() {
        let policy = deploy_policy();
        let (hl, fp, au) = (strings_of(HL), strings_of(FP), strings_of(AU));
        let (tay_ninh, kh_fp, cn_fp, vn_fp, inspectorate) = (
            org("vn", "tay-ninh-police"),
            org("kh", "anti-trafficking-dept"),
            org("cn", "mps"),
            org("vn", "c02"),
            org("vn", "inspectorate"),
        );
        let hotline = party(&tay_ninh, &hl, "tay-ninh");
        let kh = party(&kh_fp, &fp, "");
        let cn = party(&cn_fp, &fp, "");
        let vn = party(&vn_fp, &fp, "");
        let auditor = party(&inspectorate, &au, "");
        let cases = [
            (
                policy.authorize(hotline, kh, Kind::SuspectNotice),
                "a hotline may not send suspect_notice to a focal_point abroad (kh)",
            ),
            (
                policy.authorize(hotline, cn, Kind::Alert),
                "a hotline may not send alert to a focal_point abroad (cn), where its province \
                 has no pair",
            ),
            (
                policy.authorize(vn, hotline, Kind::Alert),
                "a focal_point may not send alert to a hotline in its own country (vn)",
            ),
            (
                policy.authorize(auditor, kh, Kind::Correspondence),
                "the sender holds the auditor role, which may neither send nor receive messages",
            ),
            (
                policy.authorize(kh, auditor, Kind::Correspondence),
                "the recipient holds the auditor role, which may neither send nor receive \
                 messages",
            ),
            (
                policy.authorize(kh, vn, Kind::Unspecified),
                "a message of unspecified kind is never allowed",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, Err(want.to_owned()));
        }
        let kampot = org("kh", "kampot-police");
        let unpaired = party(&kampot, &hl, "kampot");
        assert_eq!(
            policy.authorize(hotline, unpaired, Kind::Alert),
            Err(
                "a hotline may not send alert to a hotline abroad (kh) in a province not paired \
                 with its own"
                    .to_owned()
            )
        );
    }

    #[test]
    fn an_unspecified_kind_is_refused_even_under_a_star_rule() {
        let policy = Policy::parse(
            "[[allow]]\nfrom = \"focal_point\"\nto = [\"focal_point\"]\nkinds = [\"*\"]\n\
             scope = \"any\"\n",
            "p.toml",
        )
        .unwrap();
        let (a, b) = (org("vn", "a"), org("kh", "b"));
        let fp = strings_of(FP);
        let (s, r) = (party(&a, &fp, ""), party(&b, &fp, ""));
        assert!(policy.authorize(s, r, Kind::Unspecified).is_err());
        for kind in KIND_COLUMNS {
            assert_eq!(policy.authorize(s, r, kind), Ok(()));
        }
    }

    fn problems(text: &str) -> Vec<String> {
        match Policy::parse(text, "/etc/accord/policy.toml") {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => {
                assert_eq!(e.file, "/etc/accord/policy.toml");
                e.problems
            }
        }
    }

    fn assert_one_problem(text: &str, parts: &[&str]) {
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        for part in parts {
            assert!(found[0].contains(part), "{part:?} missing from {found:?}");
        }
    }

    const GOOD_RULE: &str =
        "[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\"]\nkinds = [\"alert\"]\nscope = \"paired\"\n";

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        assert_one_problem(
            &format!("polcy = 1\n{GOOD_RULE}"),
            &["\"polcy\"", "unknown key"],
        );
        assert_one_problem(
            "[[allow]]\nform = \"hotline\"\nfrom = \"hotline\"\nto = [\"hotline\"]\n\
             kinds = [\"alert\"]\nscope = \"paired\"\n",
            &["allow[0].form", "unknown key"],
        );
    }

    #[test]
    fn an_unknown_role_is_refused_with_its_key() {
        assert_one_problem(
            "[[allow]]\nfrom = \"focal\"\nto = [\"hotline\"]\nkinds = [\"alert\"]\nscope = \"any\"\n",
            &["allow[0].from", "unknown role \"focal\"", "focal_point"],
        );
        assert_one_problem(
            &format!("{GOOD_RULE}[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\", \"police\"]\nkinds = [\"alert\"]\nscope = \"any\"\n"),
            &["allow[1].to[1]", "\"police\""],
        );
        assert_one_problem(
            "[[allow]]\nfrom = \"gateway\"\nto = [\"hotline\"]\nkinds = [\"alert\"]\nscope = \"any\"\n",
            &["allow[0].from", "never a party"],
        );
        assert_one_problem(
            &format!("excluded_roles = [\"auditors\"]\n{GOOD_RULE}"),
            &["excluded_roles[0]", "\"auditors\""],
        );
    }

    #[test]
    fn an_unknown_kind_or_scope_is_refused_with_its_key() {
        assert_one_problem(
            "[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\"]\nkinds = [\"alert\", \"alerts\"]\nscope = \"paired\"\n",
            &["allow[0].kinds[1]", "unknown kind \"alerts\"", "correspondence"],
        );
        assert_one_problem(
            "[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\"]\nkinds = [\"*\", \"alert\"]\nscope = \"paired\"\n",
            &["allow[0].kinds", "alone"],
        );
        assert_one_problem(
            "[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\"]\nkinds = [\"alert\"]\nscope = \"abroad\"\n",
            &["allow[0].scope", "\"abroad\"", "paired_country"],
        );
    }

    #[test]
    fn a_bad_pair_is_refused_with_its_key() {
        assert_one_problem(
            &format!("{GOOD_RULE}[pairs]\n\"vn-tay-ninh\" = [\"kh/svay-rieng\"]\n"),
            &["pairs.\"vn-tay-ninh\"", "<cc>/<province>"],
        );
        assert_one_problem(
            &format!("{GOOD_RULE}[pairs]\n\"vn/tay-ninh\" = [\"kh/Svay Rieng\"]\n"),
            &["pairs.\"vn/tay-ninh\"[0]", "\"kh/Svay Rieng\""],
        );
        assert_one_problem(
            &format!("{GOOD_RULE}[pairs]\n\"vn/tay-ninh\" = [\"vn/long-an\"]\n"),
            &["pairs.\"vn/tay-ninh\"[0]", "same country"],
        );
        assert_one_problem(
            &format!("{GOOD_RULE}[pairs]\n\"vn/tay-ninh\" = \"kh/svay-rieng\"\n"),
            &["pairs.\"vn/tay-ninh\"", "expected an array"],
        );
    }

    #[test]
    fn a_rule_that_allows_nothing_or_names_an_excluded_role_is_refused() {
        assert_one_problem(
            "[[allow]]\nfrom = \"hotline\"\nto = []\nkinds = [\"alert\"]\nscope = \"any\"\n",
            &["allow[0].to", "empty"],
        );
        assert_one_problem(
            "[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\"]\nkinds = []\nscope = \"any\"\n",
            &["allow[0].kinds", "empty"],
        );
        assert_one_problem(
            "excluded_roles = [\"auditor\"]\n[[allow]]\nfrom = \"focal_point\"\n\
             to = [\"focal_point\", \"auditor\"]\nkinds = [\"*\"]\nscope = \"any\"\n",
            &["allow[0].to[1]", "excluded role"],
        );
        assert_one_problem(
            "[[allow]]\nfrom = \"hotline\"\nto = [\"hotline\"]\nkinds = [\"alert\"]\n",
            &["allow[0].scope", "missing"],
        );
        assert_one_problem("", &["allow", "missing"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
excluded_roles = ["auditor"]
polcy = "strict"

[[allow]]
from = "focal"
to = []
kinds = ["alerts"]
scope = "abroad"
note = "x"

[[allow]]
from = "auditor"
to = ["hotline"]
kinds = []

[pairs]
"vn-tay-ninh" = ["kh/svay-rieng"]
"vn/long-an" = ["vn/tay-ninh", "prey-veng"]
"#;
        let err = match Policy::parse(text, "/etc/accord/policy.toml") {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        let shown = err.to_string();
        assert!(shown.starts_with("/etc/accord/policy.toml: "), "{shown}");
        for part in [
            "\"polcy\"",
            "allow[0].from",
            "allow[0].to: empty",
            "allow[0].kinds[0]",
            "allow[0].scope",
            "allow[0].note",
            "allow[1].from: auditor is an excluded role",
            "allow[1].kinds: empty",
            "allow[1].scope: missing",
            "pairs.\"vn-tay-ninh\"",
            "pairs.\"vn/long-an\"[0]",
            "pairs.\"vn/long-an\"[1]",
        ] {
            assert!(shown.contains(part), "{part:?} missing from: {shown}");
        }
        assert_eq!(err.problems.len(), 12, "{:#?}", err.problems);
        assert_eq!(shown.matches("; ").count(), err.problems.len() - 1);
    }

    #[test]
    fn a_toml_syntax_error_or_an_unreadable_file_is_one_problem() {
        assert_one_problem("[[allow]\n", &["TOML parse error"]);
        let err = Policy::load(Path::new("/nonexistent/policy.toml")).unwrap_err();
        assert_eq!(err.file, "/nonexistent/policy.toml");
        assert!(err.problems[0].starts_with("cannot read"), "{err}");
    }
}
