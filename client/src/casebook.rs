//! The organisation's own record of its case messages: what was sent and received, in
//! which case, answering what, and how far each workflow has got. It drives the workflow
//! rules (which answer may come next), the case threads (`accord case show`), overdue
//! requests, and the periodic report. It is kept beside the organisation's keys
//! (`casebook.jsonl`, owner-only) and holds ids, codes, times and counts, never names or
//! free text, so the report is built from it without plaintext leaving anything.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use accord_proto::pb::{self, body::Form};
use serde::{Deserialize, Serialize};

/// Where a message stands in its workflow, read from its form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    SuspectNotice,
    Alert,
    Correspondence,
    TransferRequest,
    TransferAccepted,
    TransferRefused,
    TransferCounter,
    TransferHandover,
    VictimRequest,
    VictimConfirmed,
    VictimNotConfirmed,
    VictimNeedsInformation,
    RepatriationPlan,
    VictimHandover,
}

impl Phase {
    pub fn of(body: &pb::Body) -> Option<Self> {
        use pb::transfer_response::Decision;
        use pb::verification_result::Outcome;
        use pb::victim_identification::Answer as V;
        use pb::wanted_person_transfer::Answer as W;
        Some(match body.form.as_ref()? {
            Form::SuspectNotice(_) => Self::SuspectNotice,
            Form::Alert(_) => Self::Alert,
            Form::Correspondence(_) => Self::Correspondence,
            Form::WantedPersonTransfer(f) => match &f.answer {
                None => Self::TransferRequest,
                Some(W::Response(r)) => match Decision::try_from(r.decision).ok()? {
                    Decision::Accept => Self::TransferAccepted,
                    Decision::Refuse => Self::TransferRefused,
                    Decision::CounterProposal => Self::TransferCounter,
                    Decision::Unspecified => return None,
                },
                Some(W::Handover(_)) => Self::TransferHandover,
            },
            Form::VictimIdentification(f) => match &f.answer {
                None => Self::VictimRequest,
                Some(V::Result(r)) => match Outcome::try_from(r.outcome).ok()? {
                    Outcome::Confirmed => Self::VictimConfirmed,
                    Outcome::NotConfirmed => Self::VictimNotConfirmed,
                    Outcome::NeedsMoreInformation => Self::VictimNeedsInformation,
                    Outcome::Unspecified => return None,
                },
                Some(V::Repatriation(_)) => Self::RepatriationPlan,
                Some(V::Handover(_)) => Self::VictimHandover,
            },
        })
    }

    /// Whether this phase answers a message (and so must fit the thread's state).
    pub fn is_answer(self) -> bool {
        !matches!(
            self,
            Self::SuspectNotice
                | Self::Alert
                | Self::Correspondence
                | Self::TransferRequest
                | Self::VictimRequest
        )
    }

    /// The answers a message in this phase allows from the other side. Correspondence may
    /// answer anything and is not listed.
    pub fn allowed_answers(self) -> &'static [Phase] {
        use Phase::*;
        match self {
            TransferRequest | TransferCounter => {
                &[TransferAccepted, TransferRefused, TransferCounter]
            }
            TransferAccepted => &[TransferHandover],
            VictimRequest => &[VictimConfirmed, VictimNotConfirmed, VictimNeedsInformation],
            VictimConfirmed => &[RepatriationPlan],
            RepatriationPlan => &[VictimHandover],
            _ => &[],
        }
    }

    /// Whether the other side owes an answer to a message in this phase.
    pub fn awaits_answer(self) -> bool {
        self == Self::Alert || !self.allowed_answers().is_empty()
    }
}

/// Opens `path` to read and append, creating it owner-only, and takes group and other
/// permissions away from a file that had them (one made before this rule, or by hand):
/// the case book and the reveals log say who dealt with which victim.
pub(crate) fn open_owner_only(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(file)
}

/// Answer deadlines by what is awaited, configurable per organisation
/// (`deadlines.toml` beside `casebook.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Deadlines {
    /// An alert, answered by correspondence.
    pub alert_hours: f64,
    /// A wanted-person transfer request or counter-proposal, answered by a response.
    pub transfer_hours: f64,
    /// A victim identification request, answered by a verification result.
    pub victim_verification_hours: f64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            alert_hours: 12.0,
            transfer_hours: 12.0,
            victim_verification_hours: 72.0,
        }
    }
}

impl Deadlines {
    fn check(&self) -> Result<(), String> {
        for (name, hours) in [
            ("alert_hours", self.alert_hours),
            ("transfer_hours", self.transfer_hours),
            ("victim_verification_hours", self.victim_verification_hours),
        ] {
            if !(hours > 0.0 && hours <= 8760.0) {
                return Err(format!("{name}: between 0 and 8760 hours"));
            }
        }
        Ok(())
    }

    /// The answer deadline of a message in `phase`, if it has one (handovers are scheduled
    /// events: awaited, not overdue).
    pub fn for_phase(&self, phase: Phase) -> Option<i64> {
        let hours = match phase {
            Phase::Alert => self.alert_hours,
            Phase::TransferRequest | Phase::TransferCounter => self.transfer_hours,
            Phase::VictimRequest => self.victim_verification_hours,
            _ => return None,
        };
        Some((hours * 3_600_000.0) as i64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Sent,
    Received,
}

/// One message as the book keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub case_ref: String,
    pub phase: Phase,
    pub direction: Direction,
    /// The other organisation (recipient if sent, sender if received).
    pub counterpart: String,
    /// When it was sent (our clock), or when it reached our gateway (the time in its signed
    /// RECEIVED receipt, not the sender's `created_at`): deadlines and answer times are
    /// measured with it.
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exploitation: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub province: Option<String>,
    #[serde(default)]
    pub child: bool,
}

impl Entry {
    /// The book's record of a message: ids, codes and times from the header and form.
    pub fn new(
        header: &pb::Header,
        body: &pb::Body,
        direction: Direction,
    ) -> Result<Self, WorkflowError> {
        let phase = Phase::of(body).ok_or(WorkflowError::NoPhase)?;
        let id = accord_proto::ids::MessageId::from_slice(&header.message_id)
            .map_err(|_| WorkflowError::NoPhase)?
            .to_string();
        let in_reply_to = if header.in_reply_to.is_empty() {
            None
        } else {
            accord_proto::ids::MessageId::from_slice(&header.in_reply_to)
                .ok()
                .map(|i| i.to_string())
        };
        let (exploitation, province) = match &body.form {
            Some(Form::SuspectNotice(f)) => (names(&f.exploitation), None),
            Some(Form::VictimIdentification(f)) => (
                names(&f.exploitation),
                (!f.province.is_empty()).then(|| f.province.clone()),
            ),
            _ => (vec![], None),
        };
        Ok(Self {
            id,
            case_ref: header.case_ref.clone(),
            phase,
            direction,
            counterpart: match direction {
                Direction::Sent => header.recipient_org.clone(),
                Direction::Received => header.sender_org.clone(),
            },
            at_ms: header.created_at_ms,
            in_reply_to,
            exploitation,
            province,
            child: accord_proto::forms::concerns_a_child(body),
        })
    }
}

fn names(categories: &[i32]) -> Vec<String> {
    categories
        .iter()
        .filter_map(|c| pb::Exploitation::try_from(*c).ok())
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("EXPLOITATION_")
                .to_lowercase()
        })
        .collect()
}

/// Why a message does not fit its case's workflow, or the book could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    #[error("the form has no workflow step (an undecided response or result)")]
    NoPhase,
    #[error("this {phase:?} answers message {id}, which this organisation has no record of")]
    UnknownRequest { phase: Phase, id: String },
    #[error("a {phase:?} cannot answer a {answered:?} (allowed: {allowed})")]
    DoesNotFit {
        phase: Phase,
        answered: Phase,
        allowed: String,
    },
    #[error("this {phase:?} answers message {id}, which was not exchanged with {counterpart}")]
    WrongParty {
        phase: Phase,
        id: String,
        counterpart: String,
    },
    #[error("message {id} belongs to case {case_ref}; an answer stays in its request's case")]
    OtherCase { id: String, case_ref: String },
    #[error("message {id} has already been answered; send correspondence, or a new request")]
    AlreadyAnswered { id: String },
    #[error("case book {path}: {problem}")]
    Book { path: PathBuf, problem: String },
}

/// A request still waiting for its answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpenRequest {
    pub entry: Entry,
    pub deadline_ms: Option<i64>,
    pub overdue: bool,
}

/// The organisation's case book (see the module docs).
#[derive(Debug)]
pub struct CaseBook {
    path: PathBuf,
    pub deadlines: Deadlines,
    entries: Mutex<Vec<Entry>>,
    /// How much of the file `entries` holds: later reads start there.
    read_to: Mutex<u64>,
}

impl CaseBook {
    /// Opens (or starts) the book of the organisation folder `org_dir`, with the deadlines
    /// of `org_dir/deadlines.toml` if there is one.
    pub fn open(org_dir: &Path) -> Result<Self, WorkflowError> {
        let path = org_dir.join("casebook.jsonl");
        let err = |problem: String| WorkflowError::Book {
            path: path.clone(),
            problem,
        };
        let deadlines_file = org_dir.join("deadlines.toml");
        let deadlines = match std::fs::read_to_string(&deadlines_file) {
            Ok(text) => {
                let d: Deadlines = toml::from_str(&text).map_err(|e| WorkflowError::Book {
                    path: deadlines_file.clone(),
                    problem: e.to_string(),
                })?;
                d.check().map_err(|problem| WorkflowError::Book {
                    path: deadlines_file.clone(),
                    problem,
                })?;
                d
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Deadlines::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        let book = Self {
            path: path.clone(),
            deadlines,
            entries: Mutex::new(Vec::new()),
            read_to: Mutex::new(0),
        };
        book.read_file().map_err(|e| err(e.to_string()))?;
        Ok(book)
    }

    /// Reads the file again (another process, say `accord send` beside a running `accord
    /// watch`, may have added to it), under the file lock. A line cut short by a crash
    /// mid-write has no newline: it is cut off, so the next entry starts on a line of its
    /// own. An id seen twice is kept once.
    fn read_file(&self) -> std::io::Result<()> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        file.lock()?;
        let result = self.read_locked(&file);
        let _ = file.unlock();
        result
    }

    /// Takes in what was appended since the last read (all of it, if the file shrank:
    /// then it was replaced). Called with the file lock held.
    fn read_locked(&self, file: &std::fs::File) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        // Lock order: entries, then read_to (as in `record`).
        let mut entries = self.entries();
        let mut read_to = self.read_to.lock().unwrap_or_else(|e| e.into_inner());
        if file.metadata()?.len() < *read_to {
            *read_to = 0;
            entries.clear();
        }
        let mut bytes = Vec::new();
        let mut reader = file;
        reader.seek(SeekFrom::Start(*read_to))?;
        reader.read_to_end(&mut bytes)?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            file.set_len(*read_to + complete as u64)?;
            tracing::warn!("case book: an unfinished last line was cut off");
        }
        for line in bytes[..complete].split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Entry>(line) {
                Ok(e) => {
                    if !entries.iter().any(|x| x.id == e.id) {
                        entries.push(e);
                    }
                }
                // Nothing of the line: a value could be quoted in the error.
                Err(_) => tracing::warn!("case book: a line that does not parse was skipped"),
            }
        }
        *read_to += complete as u64;
        Ok(())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `entry` (a message about to be sent, or just opened) fits its case: an
    /// answer must answer a message this organisation exchanged with the same counterpart,
    /// and be one of the answers that message allows.
    pub fn fits(&self, entry: &Entry) -> Result<(), WorkflowError> {
        if !entry.phase.is_answer() {
            return Ok(());
        }
        self.read_file().map_err(|e| WorkflowError::Book {
            path: self.path.clone(),
            problem: e.to_string(),
        })?;
        let Some(answered_id) = &entry.in_reply_to else {
            return Err(WorkflowError::UnknownRequest {
                phase: entry.phase,
                id: "(none)".into(),
            });
        };
        let entries = self.entries();
        let answered = entries
            .iter()
            .find(|e| &e.id == answered_id)
            .ok_or_else(|| WorkflowError::UnknownRequest {
                phase: entry.phase,
                id: answered_id.clone(),
            })?;
        if answered.case_ref != entry.case_ref {
            return Err(WorkflowError::OtherCase {
                id: answered_id.clone(),
                case_ref: answered.case_ref.clone(),
            });
        }
        if answered.counterpart != entry.counterpart || answered.direction == entry.direction {
            return Err(WorkflowError::WrongParty {
                phase: entry.phase,
                id: answered_id.clone(),
                counterpart: entry.counterpart.clone(),
            });
        }
        if !answered.phase.allowed_answers().contains(&entry.phase) {
            let allowed = answered.phase.allowed_answers();
            return Err(WorkflowError::DoesNotFit {
                phase: entry.phase,
                answered: answered.phase,
                allowed: if allowed.is_empty() {
                    "only correspondence".into()
                } else {
                    format!("{allowed:?}")
                },
            });
        }
        let already = entries.iter().any(|e| {
            e.in_reply_to.as_deref() == Some(answered_id.as_str())
                && e.id != entry.id
                && e.direction == entry.direction
                && answered.phase.allowed_answers().contains(&e.phase)
        });
        if already {
            return Err(WorkflowError::AlreadyAnswered {
                id: answered_id.clone(),
            });
        }
        Ok(())
    }

    /// Records a message (once: a message opened twice is recorded once).
    pub fn record(&self, entry: Entry) -> Result<(), WorkflowError> {
        let err = |e: std::io::Error| WorkflowError::Book {
            path: self.path.clone(),
            problem: e.to_string(),
        };
        let mut file = open_owner_only(&self.path).map_err(err)?;
        // Under the lock, with what other processes wrote, so an id is written once.
        file.lock().map_err(err)?;
        self.read_locked(&file).map_err(err)?;
        let mut entries = self.entries();
        if entries.iter().any(|e| e.id == entry.id) {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&entry).map_err(|e| WorkflowError::Book {
            path: self.path.clone(),
            problem: e.to_string(),
        })?;
        line.push(b'\n');
        file.write_all(&line).map_err(err)?;
        file.sync_data().map_err(err)?;
        *self.read_to.lock().unwrap_or_else(|e| e.into_inner()) += line.len() as u64;
        entries.push(entry);
        Ok(())
    }

    /// Whether the message `id` is, or answers down a chain of answers, a request about a
    /// child victim: its answers get the child's protection too.
    pub fn in_child_case(&self, id: &str) -> bool {
        let entries = self.entries();
        let mut next = Some(id.to_owned());
        for _ in 0..64 {
            let Some(current) = next.take() else { break };
            let Some(e) = entries.iter().find(|e| e.id == current) else {
                break;
            };
            if e.child {
                return true;
            }
            next = e.in_reply_to.clone();
        }
        false
    }

    /// Every entry of case `case_ref`, in time order.
    pub fn thread(&self, case_ref: &str) -> Vec<Entry> {
        let mut thread: Vec<Entry> = self
            .entries()
            .iter()
            .filter(|e| e.case_ref == case_ref)
            .cloned()
            .collect();
        thread.sort_by_key(|e| e.at_ms);
        thread
    }

    /// Every entry, in time order.
    pub fn all(&self) -> Vec<Entry> {
        let mut all = self.entries().clone();
        all.sort_by_key(|e| e.at_ms);
        all
    }

    /// The first answer to each message that has one: answered id → answer.
    fn first_answers(entries: &[Entry]) -> HashMap<String, Entry> {
        let by_id: HashMap<&str, &Entry> = entries.iter().map(|e| (e.id.as_str(), e)).collect();
        let mut answers: HashMap<String, Entry> = HashMap::new();
        for e in entries {
            let Some(to) = &e.in_reply_to else { continue };
            let Some(asked) = by_id.get(to.as_str()) else {
                continue;
            };
            let counts = if asked.phase == Phase::Alert {
                e.phase == Phase::Correspondence
            } else {
                asked.phase.allowed_answers().contains(&e.phase)
            };
            if counts && e.direction != asked.direction && e.counterpart == asked.counterpart {
                let keep = answers.get(to).is_none_or(|a| a.at_ms > e.at_ms);
                if keep {
                    answers.insert(to.clone(), e.clone());
                }
            }
        }
        answers
    }

    /// Requests (sent or received) still awaiting their answer as of `now_ms`.
    pub fn open_requests(&self, now_ms: i64) -> Vec<OpenRequest> {
        let entries = self.all();
        let answers = Self::first_answers(&entries);
        entries
            .into_iter()
            .filter(|e| e.phase.awaits_answer() && !answers.contains_key(&e.id))
            .map(|e| {
                let deadline_ms = self.deadlines.for_phase(e.phase).map(|d| e.at_ms + d);
                OpenRequest {
                    overdue: deadline_ms.is_some_and(|d| now_ms > d),
                    deadline_ms,
                    entry: e,
                }
            })
            .collect()
    }

    /// The periodic report over messages created in `[from_ms, to_ms)`, as of `now_ms`.
    pub fn report(&self, from_ms: i64, to_ms: i64, now_ms: i64) -> Report {
        let entries = self.all();
        let answers = Self::first_answers(&entries);
        let in_period: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.at_ms >= from_ms && e.at_ms < to_ms)
            .collect();
        let mut by_kind: BTreeMap<String, Counts> = BTreeMap::new();
        let mut by_exploitation: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_province: BTreeMap<String, u64> = BTreeMap::new();
        let mut answer_hours = Vec::new();
        let (mut with_deadline, mut within, mut overdue) = (0, 0, 0);
        let mut r = Report {
            from_ms,
            to_ms,
            ..Report::default()
        };
        for e in &in_period {
            let c = by_kind.entry(format!("{:?}", e.phase)).or_default();
            match e.direction {
                Direction::Sent => c.sent += 1,
                Direction::Received => c.received += 1,
            }
            for x in &e.exploitation {
                *by_exploitation.entry(x.clone()).or_default() += 1;
            }
            if let Some(p) = &e.province {
                *by_province.entry(p.clone()).or_default() += 1;
            }
            match e.phase {
                Phase::VictimConfirmed => r.victims_identified += 1,
                Phase::VictimHandover => r.victims_repatriated += 1,
                Phase::TransferHandover => r.wanted_persons_handed_over += 1,
                _ => {}
            }
            if let Some(deadline) = self.deadlines.for_phase(e.phase) {
                with_deadline += 1;
                match answers.get(&e.id) {
                    Some(a) => {
                        let took = a.at_ms - e.at_ms;
                        answer_hours.push(took as f64 / 3_600_000.0);
                        if took <= deadline {
                            within += 1;
                        }
                    }
                    None if now_ms > e.at_ms + deadline => overdue += 1,
                    None => {}
                }
            }
        }
        answer_hours.sort_by(f64::total_cmp);
        r.requests_with_deadline = with_deadline;
        r.answered_within_deadline = within;
        r.overdue = overdue;
        r.median_answer_hours = match answer_hours.len() {
            0 => None,
            n if n % 2 == 1 => Some(answer_hours[n / 2]),
            n => Some((answer_hours[n / 2 - 1] + answer_hours[n / 2]) / 2.0),
        };
        r.by_kind = by_kind;
        r.by_exploitation = by_exploitation;
        r.by_province = by_province;
        r
    }
}

/// Messages of one phase, by direction.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    pub sent: u64,
    pub received: u64,
}

/// The 6- or 12-month report the plan requires, from the book alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub from_ms: i64,
    pub to_ms: i64,
    pub by_kind: BTreeMap<String, Counts>,
    pub requests_with_deadline: u64,
    pub answered_within_deadline: u64,
    pub median_answer_hours: Option<f64>,
    pub overdue: u64,
    pub victims_identified: u64,
    pub victims_repatriated: u64,
    pub wanted_persons_handed_over: u64,
    pub by_exploitation: BTreeMap<String, u64>,
    pub by_province: BTreeMap<String, u64>,
}

impl Report {
    /// One row per figure: `section,key,sent,received,value`.
    pub fn csv(&self) -> String {
        let mut out = String::from("section,key,sent,received,value\n");
        for (k, c) in &self.by_kind {
            out.push_str(&format!(
                "messages,{k},{},{},{}\n",
                c.sent,
                c.received,
                c.sent + c.received
            ));
        }
        for (k, v) in [
            ("requests_with_deadline", self.requests_with_deadline),
            ("answered_within_deadline", self.answered_within_deadline),
            ("overdue", self.overdue),
            ("victims_identified", self.victims_identified),
            ("victims_repatriated", self.victims_repatriated),
            (
                "wanted_persons_handed_over",
                self.wanted_persons_handed_over,
            ),
        ] {
            out.push_str(&format!("totals,{k},,,{v}\n"));
        }
        if let Some(m) = self.median_answer_hours {
            out.push_str(&format!("totals,median_answer_hours,,,{m:.2}\n"));
        }
        for (k, v) in &self.by_exploitation {
            out.push_str(&format!("exploitation,{k},,,{v}\n"));
        }
        for (k, v) in &self.by_province {
            out.push_str(&format!("province,{k},,,{v}\n"));
        }
        out
    }

    /// The report as a table for a terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<28} {:>6} {:>9}\n",
            "messages", "sent", "received"
        ));
        for (k, c) in &self.by_kind {
            out.push_str(&format!("{k:<28} {:>6} {:>9}\n", c.sent, c.received));
        }
        out.push_str(&format!(
            "\nrequests with a deadline {}, answered within it {}, overdue {}, median answer {}\n",
            self.requests_with_deadline,
            self.answered_within_deadline,
            self.overdue,
            self.median_answer_hours
                .map_or_else(|| "-".into(), |h| format!("{h:.1} h"))
        ));
        out.push_str(&format!(
            "victims identified {}, repatriated {}; wanted persons handed over {}\n",
            self.victims_identified, self.victims_repatriated, self.wanted_persons_handed_over
        ));
        for (title, map) in [
            ("by exploitation (ICS-TIP)", &self.by_exploitation),
            ("by province", &self.by_province),
        ] {
            if !map.is_empty() {
                out.push_str(&format!("{title}: "));
                let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
                out.push_str(&parts.join(", "));
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
