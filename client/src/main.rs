//! `accord`: the command-line client. One library call per subcommand.
use std::io::IsTerminal;
use std::path::PathBuf;

use accord_client::org::{furthest_stage, now_ms, GatewayAddress, OrgClient, SendOptions};
use accord_proto::pb;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: accord_gateway::Allocator = accord_gateway::ALLOCATOR;

#[derive(Parser)]
#[command(
    name = "accord",
    version,
    about = "Accord client: send, receive and follow sealed case messages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Who we are and which gateway we talk to.
#[derive(Args)]
struct Session {
    /// Organisation folder with cert.pem, key.pem and keys.json (as `accord certs` writes).
    #[arg(long)]
    org: PathBuf,
    /// The gateway's client address, host:port.
    #[arg(long)]
    gateway: std::net::SocketAddr,
    /// The gateway's SPIFFE id, e.g. spiffe://vn.accord/gateway/hanoi.
    #[arg(long)]
    gateway_id: String,
    /// The country root CA that vouches for the gateway.
    #[arg(long)]
    root: PathBuf,
    /// Pinned directory keys of every country (directory-trust.json of `accord certs`).
    #[arg(long)]
    trust: PathBuf,
}

impl Session {
    async fn connect(&self) -> anyhow::Result<OrgClient> {
        let gw = GatewayAddress {
            addr: self.gateway,
            id: self.gateway_id.parse()?,
            root: self.root.clone(),
            trust: self.trust.clone(),
        };
        let client = OrgClient::connect(&self.org, &gw).await?;
        // Every command keeps the organisation's case book: workflow rules and threads.
        let book = accord_client::casebook::CaseBook::open(&self.org)?;
        client.use_case_book(std::sync::Arc::new(book))?;
        Ok(client)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a local two-country exchange (VN and KH gateways on loopback) and show every receipt.
    Demo,
    /// Make a dev PKI: roots, gateway and organisation certificates, keys and directories.
    Certs {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// A country as cc:gateway:org1,org2 (repeatable), e.g. vn:hanoi:c02,tayninh-police
        #[arg(long = "country", required = true)]
        countries: Vec<String>,
    },
    /// Send a form (proto3 JSON of accord.v1.Body, see examples/forms/) to an organisation.
    Send {
        #[command(flatten)]
        session: Session,
        /// Recipient, e.g. spiffe://kh.accord/org/ahtd
        #[arg(long)]
        to: String,
        /// Case reference.
        #[arg(long)]
        case: String,
        /// routine, urgent or flash.
        #[arg(long, default_value = "routine")]
        priority: String,
        /// Handling code: H0 (law enforcement only), H1 (not for court without permission),
        /// H2 (no onward transmission without permission) or H3:<restrictions>.
        #[arg(long, default_value = "H0")]
        handling: String,
        /// Evaluation: source reliability A, B, C or X and information 1 to 4 (e.g. B2);
        /// X4 means not assessed.
        #[arg(long, default_value = "X4")]
        evaluation: String,
        /// The message this one answers (a response, result, plan or handover).
        #[arg(long)]
        reply_to: Option<String>,
        /// A file to attach to correspondence (scan, photo); repeat for more. It travels in
        /// encrypted chunks with a progress display; an interrupted send resumes with
        /// `accord resume`.
        #[arg(long = "attach")]
        attach: Vec<PathBuf>,
        form: PathBuf,
    },
    /// Finish sends that were interrupted (e.g. a broken connection during an attachment
    /// upload): upload what the gateway does not hold yet, then submit.
    Resume {
        #[command(flatten)]
        session: Session,
    },
    /// Forms: `accord form new KIND [--lang en|vi|km]` prints a commented template to fill.
    Form {
        #[command(subcommand)]
        action: FormAction,
    },
    /// Fetch, verify and open waiting messages; with --ack, acknowledge each one. A child
    /// victim's identifying data is masked unless --reveal (each reveal is recorded in the
    /// organisation folder's reveals.log).
    Fetch {
        #[command(flatten)]
        session: Session,
        #[command(flatten)]
        intake: Intake,
    },
    /// Watch the inbox live (server stream): print each message as it arrives; with --ack,
    /// acknowledge each one. Stops after --count messages, or runs until interrupted.
    Watch {
        #[command(flatten)]
        session: Session,
        #[command(flatten)]
        intake: Intake,
        #[arg(long)]
        count: Option<usize>,
    },
    /// Auditors: fetch a message's evidence bundle from the gateway and write it to a file.
    AuditEvidence {
        #[command(flatten)]
        session: Session,
        message_id: String,
        /// Where to write the bundle (accord.v1.EvidenceBundle, binary protobuf).
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify an evidence bundle offline against trusted directory files; prints each check
    /// and its verdict, exits 1 if any fails.
    Verify {
        bundle: PathBuf,
        /// A trusted directory file (accord.v1.Directory JSON); repeat for each country.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
    },
    /// Run a gateway from its TOML configuration until SIGINT or SIGTERM (the same as
    /// `accord-gateway run CONFIG`).
    Gateway { config: PathBuf },
    /// Load-test two local gateways (separate processes, mutual TLS, fsynced stores), or
    /// with --attach two running ones, and measure them against the transport, crypto and
    /// store limits of this machine.
    Bench {
        /// Concurrent senders, each with one submit in flight (1 to 1024).
        #[arg(long, default_value_t = 16)]
        senders: usize,
        /// Size of each form before sealing, in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Messages in the timed phase.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Messages sent end to end before the timed phase.
        #[arg(long, default_value_t = 500)]
        warmup: usize,
        /// Folder for the PKI, configurations, stores and gateway logs (default: a fresh
        /// temporary folder, removed afterwards). Its disk is the one measured.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Instead of the exchange: KH down while VN accepts this many envelopes, then VN
        /// restarted with them, then KH up and everything drained (memory, restart time,
        /// drain rate).
        #[arg(long)]
        backlog: Option<usize>,
        /// With --backlog: first exchange this many envelopes end to end, so that VN
        /// restarts on a long log (each adds 4 entries to VN's log).
        #[arg(long, default_value_t = 0, requires = "backlog")]
        history: usize,
        /// Messages per second offered by all senders together, evenly spaced (light load:
        /// `--senders 1 --rate 20`). Without it, each sender submits as soon as its last
        /// submit was accepted.
        #[arg(long, conflicts_with = "backlog", value_parser = positive_rate)]
        rate: Option<f64>,
        /// The gateways' log filter (`RUST_LOG`): `info`, as the deployed unit runs, logs a
        /// line per message at each stage.
        #[arg(long, default_value = "warn")]
        gateway_log: String,
        /// Measure two running gateways instead of starting a pair: a TOML file with a
        /// [sender] and a [recipient] table, each with org, gateway, gateway_id, root and
        /// trust (as the other commands take them), and optionally the gateway's pid and
        /// data_dir on this machine. Only the end-to-end phase runs.
        #[arg(long, conflicts_with = "backlog")]
        attach: Option<PathBuf>,
        /// Print the report as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Case threads from the organisation's case book.
    Case {
        #[command(subcommand)]
        action: CaseAction,
    },
    /// The periodic (6- or 12-month) report from the organisation's own case book: counts by
    /// kind and direction, answers within deadline, median answer time, overdue, victims
    /// identified and repatriated, wanted persons handed over, by exploitation category and
    /// province. Printed as a table; --csv and --json write files.
    Report {
        /// Organisation folder (where casebook.jsonl is).
        #[arg(long)]
        org: PathBuf,
        /// First day of the period, YYYY-MM-DD (UTC).
        #[arg(long)]
        from: String,
        /// Day after the period, YYYY-MM-DD (UTC).
        #[arg(long)]
        to: String,
        #[arg(long)]
        csv: Option<PathBuf>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Show a message's chain of receipts.
    Status {
        #[command(flatten)]
        session: Session,
        message_id: String,
    },
}

#[derive(Subcommand)]
enum CaseAction {
    /// A case's messages in order (kind and step, direction, counterpart, delivery state of
    /// what we sent) and its open requests.
    Show {
        #[command(flatten)]
        session: Session,
        case_ref: String,
    },
    /// Cases with their open requests; filters combine.
    List {
        /// Organisation folder (where casebook.jsonl is).
        #[arg(long)]
        org: PathBuf,
        /// Only cases with an open request.
        #[arg(long)]
        open: bool,
        /// Only cases with an overdue request.
        #[arg(long)]
        overdue: bool,
        /// Only cases with a message of this step, e.g. victim_request, alert.
        #[arg(long)]
        kind: Option<String>,
        /// Only cases exchanged with this organisation (SPIFFE id).
        #[arg(long)]
        counterpart: Option<String>,
    },
}

#[derive(Subcommand)]
enum FormAction {
    /// Print a commented template of a form (see examples/forms/), to fill and send.
    New {
        /// suspect-notice, wanted-person-transfer, transfer-response-accept, ...
        kind: String,
        /// Language of the example texts: en, vi or km.
        #[arg(long, default_value = "en")]
        lang: String,
    },
}

/// Says why a message was refused; with `ack`, a refusal of its content is also sent back
/// to the sender (a rejected receipt) and the message leaves the inbox.
async fn refused(
    client: &mut OrgClient,
    e: accord_client::org::ClientError,
    ack: bool,
) -> anyhow::Result<()> {
    eprintln!("refused a message: {e}");
    if let accord_client::org::ClientError::Refused {
        message_id,
        envelope_hash,
        ..
    } = &e
    {
        if ack {
            match client.refuse(message_id, envelope_hash).await {
                Ok(_) => {
                    eprintln!("  {message_id} returned to its sender as REFUSED_BY_RECIPIENT")
                }
                Err(e) => eprintln!("  {message_id} could not be returned to its sender: {e}"),
            }
        } else {
            eprintln!("  {message_id} stays in the inbox; --ack returns it to its sender");
        }
    }
    Ok(())
}

/// What `fetch` and `watch` do with each message they open.
#[derive(clap::Args, Debug)]
struct Intake {
    /// Acknowledge each message (a delivered receipt signed by the organisation). Messages
    /// fetched together, or already waiting when watched, are acknowledged in one call.
    #[arg(long)]
    ack: bool,
    /// Show a child victim's identifying data and save their files (recorded in
    /// reveals.log).
    #[arg(long)]
    reveal: bool,
    /// Where attached files are saved, one folder per message (default: the organisation
    /// folder's attachments/). A message is acknowledged only once its files are saved.
    #[arg(long)]
    attachments: Option<PathBuf>,
    /// Also write each message as JSON to DIR/<message id>.json for use outside Accord.
    /// H2 and H3 messages, and a child victim's, are never exported; H1 exports carry the
    /// not-for-court notice.
    #[arg(long)]
    export: Option<PathBuf>,
}

/// Acknowledges the messages taken in, up to the gateway's batch in each call (one durable
/// write at the gateway for many, as a backlog needs), and says which were acknowledged.
/// One that is not taken stays in the inbox; the error then counts them.
async fn acknowledge(
    client: &mut OrgClient,
    taken: &[accord_client::org::Opened],
) -> anyhow::Result<()> {
    let mut not_taken = 0;
    for batch in taken.chunks(accord_gateway::service::MAX_BATCH) {
        let results = client
            .ack_many(batch)
            .await
            .context("acknowledging; the messages stay in the inbox, fetch again to retry")?;
        for (opened, done) in batch.iter().zip(results) {
            match done {
                Ok(_) => println!("acknowledged {}", opened.envelope.id()),
                Err(e) => {
                    eprintln!(
                        "could not acknowledge {}: {e}; it stays in the inbox",
                        opened.envelope.id()
                    );
                    not_taken += 1;
                }
            }
        }
    }
    anyhow::ensure!(
        not_taken == 0,
        "{not_taken} of {} acknowledgements were not taken (see above)",
        taken.len()
    );
    Ok(())
}

/// Shows an opened message, saves its files, and exports it if asked and its handling
/// allows. False when it could not be shown or its files not saved: it then stays in the
/// inbox and is not to be acknowledged.
async fn take_in(
    session: &Session,
    client: &mut OrgClient,
    opened: &accord_client::org::Opened,
    intake: &Intake,
) -> anyhow::Result<bool> {
    if let Err(e) = print_opened(session, client, opened, intake.reveal) {
        eprintln!("could not show message {}: {e:#}", opened.envelope.id());
        return Ok(false);
    }
    let files = intake
        .attachments
        .clone()
        .unwrap_or_else(|| session.org.join("attachments"));
    if !save_files(client, opened, intake.reveal, &files).await {
        return Ok(false);
    }
    if let Some(dir) = &intake.export {
        export_message(client, opened, dir)?;
    }
    Ok(true)
}

/// Whether `opened` concerns a child victim, itself or by the case it answers.
fn child_case(client: &OrgClient, opened: &accord_client::org::Opened) -> bool {
    let answered = &opened.envelope.header().in_reply_to;
    accord_proto::forms::concerns_a_child(&opened.body)
        || accord_proto::ids::MessageId::from_slice(answered).is_ok_and(|id| {
            client
                .case_book()
                .is_some_and(|b| b.in_child_case(&id.to_string()))
        })
}

/// Saves a message's attached files under `dir`; false when they are not all saved (the
/// message then stays in the inbox, unacknowledged). A child victim's files are saved only
/// with --reveal, which print_opened has recorded.
async fn save_files(
    client: &mut OrgClient,
    opened: &accord_client::org::Opened,
    reveal: bool,
    dir: &std::path::Path,
) -> bool {
    if opened.envelope.attachments().is_empty() {
        return true;
    }
    if child_case(client, opened) && !reveal {
        eprintln!(
            "{}: attached files withheld (a child victim's case); fetch with --reveal to save them",
            opened.envelope.id()
        );
        return false;
    }
    match client.download(opened, dir, progress_display()).await {
        Ok(paths) => {
            for p in paths {
                println!("  saved {}", p.display());
            }
            true
        }
        Err(e) => {
            eprintln!(
                "{}: attached files not saved ({e}); the message stays in the inbox, fetch again \
                 to resume",
                opened.envelope.id()
            );
            false
        }
    }
}

/// Writes `opened` to `dir/<message id>.json` (owner-only) if its handling allows export;
/// says why not otherwise.
fn export_message(
    client: &OrgClient,
    opened: &accord_client::org::Opened,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id = opened.envelope.id();
    let doc = match accord_client::forms::export(opened, child_case(client, opened)) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("{id}: {e}");
            return Ok(());
        }
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{id}.json"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(&serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("  exported {}", path.display());
    Ok(())
}

/// Progress of attachment transfers on stderr: a bar redrawn in place on a terminal, a line
/// per quarter otherwise (logs, CI).
fn progress_display() -> accord_client::attach::ProgressFn {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let last = std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new());
    std::sync::Arc::new(move |p: &accord_client::attach::Progress| {
        let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let step = if tty { pct } else { pct / 25 * 25 };
        // A received file's name is the sender's text: shown only as a safe file name.
        let name = accord_client::attach::safe_name(&p.name);
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.get(&name) == Some(&step) && p.done < p.total {
            return;
        }
        last.insert(name.clone(), step);
        let filled = (pct / 5) as usize;
        let line = format!(
            "{} [{}{}] {:>3}% {:.1}/{:.1} MiB",
            name,
            "#".repeat(filled),
            " ".repeat(20 - filled.min(20)),
            pct,
            mib(p.done),
            mib(p.total)
        );
        if tty {
            eprint!("\r{line}{}", if p.done >= p.total { "\n" } else { "" });
        } else {
            eprintln!("{line}");
        }
    })
}

/// Prints an opened message; a child victim's data shown unmasked is recorded first.
fn print_opened(
    session: &Session,
    client: &OrgClient,
    opened: &accord_client::org::Opened,
    reveal: bool,
) -> anyhow::Result<()> {
    let answered = &opened.envelope.header().in_reply_to;
    let child_case = accord_proto::ids::MessageId::from_slice(answered).is_ok_and(|id| {
        client
            .case_book()
            .is_some_and(|b| b.in_child_case(&id.to_string()))
    });
    if reveal && self::child_case(client, opened) {
        accord_client::forms::record_reveal(&session.org, opened, now_ms())
            .context("recording the reveal in reveals.log; nothing shown")?;
    }
    print!(
        "{}",
        accord_client::forms::render(opened, reveal, child_case)?
    );
    Ok(())
}

/// `--rate`: messages per second, from one every 1,000 s to a million a second (beyond
/// that, no sender could keep up and the pacing means nothing).
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.001..=1e6).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate from 0.001 to 1000000 messages per second"
        )),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    accord_gateway::tls::install_default_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a gateway run by `accord bench` logs to a file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo => accord_client::demo::run(&mut std::io::stdout()).await,
        Command::Gateway { config } => {
            let loaded = accord_gateway::config::Config::load(&config)?;
            accord_gateway::server::run_until_signal(&loaded)
                .await
                .with_context(|| format!("running the gateway of {}", config.display()))
        }
        Command::Bench {
            senders,
            size,
            count,
            warmup,
            dir,
            timeout,
            backlog,
            history,
            rate,
            gateway_log,
            attach,
            json,
        } => {
            let attach = attach
                .map(|path| accord_client::bench::Attach::load(&path))
                .transpose()?;
            let opts = accord_client::bench::Options {
                senders,
                body_bytes: size,
                messages: count,
                warmup,
                dir,
                gateway_exe: std::env::current_exe().context("locating this executable")?,
                timeout: std::time::Duration::from_secs(timeout),
                gateway_log,
                rate,
                attach,
            };
            if let Some(backlog) = backlog {
                let report = accord_client::bench::run_backlog(
                    &opts,
                    backlog,
                    history,
                    &mut std::io::stderr(),
                )
                .await?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    accord_client::bench::print_backlog(&report, &mut std::io::stdout())?;
                }
                return Ok(());
            }
            let report = accord_client::bench::run(&opts, &mut std::io::stderr()).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                accord_client::bench::print(&report, &mut std::io::stdout())?;
            }
            Ok(())
        }
        Command::Certs { out, countries } => {
            let spec = countries
                .iter()
                .map(|c| {
                    let mut parts = c.splitn(3, ':');
                    let (cc, gw, orgs) = (parts.next(), parts.next(), parts.next());
                    match (cc, gw, orgs) {
                        (Some(cc), Some(gw), Some(orgs)) => Ok(accord_certs::CountrySpec {
                            country: cc.parse()?,
                            gateway: gw.to_owned(),
                            orgs: orgs.split(',').map(str::to_owned).collect(),
                        }),
                        _ => anyhow::bail!("--country {c:?}: expected cc:gateway:org1,org2"),
                    }
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for f in accord_certs::DevPki::write(&out, &spec, now_ms())? {
                println!("{}: {}", f.gateway_id, f.dir.display());
            }
            Ok(())
        }
        Command::Send {
            session,
            to,
            case,
            priority,
            handling,
            evaluation,
            reply_to,
            attach,
            form,
        } => {
            let mut client = session.connect().await?;
            let json = std::fs::read_to_string(&form)
                .with_context(|| format!("reading {}", form.display()))?;
            let body = accord_client::demo::parse_form(&json)
                .with_context(|| form.display().to_string())?;
            let mut opts = SendOptions::new(&case);
            opts.priority = match priority.as_str() {
                "routine" => pb::Priority::Routine,
                "urgent" => pb::Priority::Urgent,
                "flash" => pb::Priority::Flash,
                other => anyhow::bail!("--priority {other:?}: use routine, urgent or flash"),
            };
            opts.handling_code = handling;
            opts.evaluation = evaluation;
            opts.in_reply_to = reply_to
                .map(|id| id.parse())
                .transpose()
                .context("--reply-to takes a message id (UUID)")?;
            let sent = if attach.is_empty() {
                client.send(&to.parse()?, &body, &opts).await?
            } else {
                let files: Vec<(PathBuf, String)> = attach
                    .iter()
                    .map(|p| {
                        (
                            p.clone(),
                            accord_client::attach::media_type_of(p).to_owned(),
                        )
                    })
                    .collect();
                let outbox = accord_client::attach::Outbox::open(&session.org)?;
                client
                    .send_files(
                        &to.parse()?,
                        &body,
                        &opts,
                        &files,
                        &outbox,
                        progress_display(),
                    )
                    .await
                    .context(
                        "sending with attachments; if the message was sealed, `accord resume` \
                         finishes it from where it stopped",
                    )?
            };
            println!(
                "accepted {} envelope {} log #{}",
                sent.id, sent.hash, sent.accepted.body.log_index
            );
            Ok(())
        }
        Command::Resume { session } => {
            let mut client = session.connect().await?;
            let outbox = accord_client::attach::Outbox::open(&session.org)?;
            let results = client.resume_sends(&outbox, progress_display()).await?;
            if results.is_empty() {
                println!("nothing to resume");
            }
            let mut failed = 0;
            for (id, result) in results {
                match result {
                    Ok(sent) => println!(
                        "accepted {} envelope {} log #{}",
                        sent.id, sent.hash, sent.accepted.body.log_index
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{id}: {e}; it stays in the outbox");
                    }
                }
            }
            anyhow::ensure!(failed == 0, "{failed} sends could not be finished");
            Ok(())
        }
        Command::Form {
            action: FormAction::New { kind, lang },
        } => {
            let text = accord_client::forms::template(&kind, &lang).map_err(anyhow::Error::msg)?;
            print!("{text}");
            Ok(())
        }
        Command::Case {
            action: CaseAction::Show { session, case_ref },
        } => {
            let mut client = session.connect().await?;
            let book = accord_client::casebook::CaseBook::open(&session.org)?;
            let thread = book.thread(&case_ref);
            anyhow::ensure!(
                !thread.is_empty(),
                "no messages of case {case_ref} in the case book"
            );
            println!("case {case_ref}: {} messages", thread.len());
            for e in &thread {
                let delivery = match e.direction {
                    accord_client::casebook::Direction::Sent => {
                        let id = e.id.parse()?;
                        let recipient = e.counterpart.parse()?;
                        let me = client.id.clone();
                        match client.status_between(&id, &me, &recipient).await {
                            Ok((_, chain)) => format!("{:?}", furthest_stage(&chain)),
                            Err(err) => format!("status unavailable: {err}"),
                        }
                    }
                    accord_client::casebook::Direction::Received => "opened".into(),
                };
                println!(
                    "  {} {:<8} {:<24} {:<40} {} {}{}",
                    e.at_ms,
                    format!("{:?}", e.direction).to_lowercase(),
                    format!("{:?}", e.phase),
                    e.counterpart,
                    e.id,
                    delivery,
                    e.in_reply_to
                        .as_ref()
                        .map_or_else(String::new, |r| format!(" (answers {r})"))
                );
            }
            for o in book.open_requests(now_ms()) {
                if o.entry.case_ref == case_ref {
                    println!(
                        "  open: {:?} {} awaits an answer{}",
                        o.entry.phase,
                        o.entry.id,
                        match (o.deadline_ms, o.overdue) {
                            (Some(_), true) => " - OVERDUE".to_owned(),
                            (Some(d), false) => format!(" by {d}"),
                            (None, _) => String::new(),
                        }
                    );
                }
            }
            Ok(())
        }
        Command::Case {
            action:
                CaseAction::List {
                    org,
                    open,
                    overdue,
                    kind,
                    counterpart,
                },
        } => {
            let book = accord_client::casebook::CaseBook::open(&org)?;
            let requests = book.open_requests(now_ms());
            let mut cases: std::collections::BTreeMap<String, Vec<_>> = Default::default();
            for e in book.all() {
                cases.entry(e.case_ref.clone()).or_default().push(e);
            }
            for (case_ref, entries) in cases {
                let open_here: Vec<_> = requests
                    .iter()
                    .filter(|o| o.entry.case_ref == case_ref)
                    .collect();
                let overdue_here = open_here.iter().filter(|o| o.overdue).count();
                if (open && open_here.is_empty())
                    || (overdue && overdue_here == 0)
                    || kind.as_ref().is_some_and(|k| {
                        !entries
                            .iter()
                            .any(|e| serde_json::to_value(e.phase).is_ok_and(|v| v == k.as_str()))
                    })
                    || counterpart
                        .as_ref()
                        .is_some_and(|c| !entries.iter().any(|e| &e.counterpart == c))
                {
                    continue;
                }
                println!(
                    "{case_ref:<24} {:>3} messages, {} open, {} overdue, last {}",
                    entries.len(),
                    open_here.len(),
                    overdue_here,
                    entries.last().map_or(0, |e| e.at_ms)
                );
            }
            Ok(())
        }
        Command::Report {
            org,
            from,
            to,
            csv,
            json,
        } => {
            let book = accord_client::casebook::CaseBook::open(&org)?;
            let day = |s: &str, flag: &str| -> anyhow::Result<i64> {
                let format = time::macros::format_description!("[year]-[month]-[day]");
                let d = time::Date::parse(s, &format)
                    .with_context(|| format!("--{flag} {s:?}: use YYYY-MM-DD"))?;
                Ok(d.midnight().assume_utc().unix_timestamp() * 1000)
            };
            let (from_ms, to_ms) = (day(&from, "from")?, day(&to, "to")?);
            anyhow::ensure!(from_ms < to_ms, "--from must be before --to");
            let report = book.report(from_ms, to_ms, now_ms());
            println!(
                "report {from} to {to} (from the case book of {})\n",
                org.display()
            );
            print!("{}", report.table());
            if let Some(path) = csv {
                std::fs::write(&path, report.csv())
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("CSV written to {}", path.display());
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("JSON written to {}", path.display());
            }
            Ok(())
        }
        Command::Fetch { session, intake } => {
            let mut client = session.connect().await?;
            // Taken in (shown, files saved, exported) and to be acknowledged: even when a
            // later message fails the command, these are acknowledged first, or the next
            // fetch would show, save and export them again.
            let mut taken = Vec::new();
            let took = async {
                for item in client.fetch_each(64).await? {
                    match item {
                        Ok(opened) => {
                            if take_in(&session, &mut client, &opened, &intake).await? && intake.ack
                            {
                                taken.push(opened);
                            }
                        }
                        Err(e) => refused(&mut client, e, intake.ack).await?,
                    }
                }
                anyhow::Ok(())
            }
            .await;
            let acked = acknowledge(&mut client, &taken).await;
            took?;
            acked
        }
        Command::Watch {
            session,
            intake,
            count,
        } => {
            use futures::{FutureExt, StreamExt};
            let mut client = session.connect().await?;
            let mut stream = std::pin::pin!(client.subscribe().await?);
            eprintln!(
                "watching the inbox of {} (Ctrl-C to stop)",
                session.org.display()
            );
            let mut seen = 0;
            // Taken in and not yet acknowledged: what the stream already holds is taken in
            // first, then acknowledged together, a gateway batch at most. Whatever ends the
            // watch, these are acknowledged first.
            let mut taken = Vec::new();
            let watched = async {
                loop {
                    let ready = if taken.len() < accord_gateway::service::MAX_BATCH {
                        stream.next().now_or_never()
                    } else {
                        None
                    };
                    let next = match ready {
                        Some(next) => next,
                        None => {
                            acknowledge(&mut client, &std::mem::take(&mut taken)).await?;
                            stream.next().await
                        }
                    };
                    let Some(opened) = next else { break };
                    let opened = match opened {
                        Ok(opened) => opened,
                        // A refused message (a broken form, an answer that does not fit) is
                        // reported; the stream goes on. A broken stream ends the watch.
                        Err(accord_client::org::ClientError::Gateway(s)) => {
                            return Err(accord_client::org::ClientError::Gateway(s).into())
                        }
                        Err(e) => {
                            refused(&mut client, e, intake.ack).await?;
                            continue;
                        }
                    };
                    if !take_in(&session, &mut client, &opened, &intake).await? {
                        continue;
                    }
                    if intake.ack {
                        taken.push(opened);
                    }
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        break;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            let acked = acknowledge(&mut client, &taken).await;
            watched?;
            acked
        }
        Command::AuditEvidence {
            session,
            message_id,
            out,
        } => {
            let client = session.connect().await?;
            let bundle = client
                .audit()
                .get_evidence(pb::GetEvidenceRequest {
                    message_id: message_id
                        .parse::<accord_proto::ids::MessageId>()?
                        .as_bytes()
                        .to_vec(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("gateway said {}: {}", s.code(), s.message()))?
                .into_inner();
            std::fs::write(&out, prost::Message::encode_to_vec(&bundle))
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} receipts, {} log events)",
                out.display(),
                bundle.receipts.len(),
                bundle.events.len()
            );
            Ok(())
        }
        Command::Verify { bundle, trust } => {
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let mut trusted = Vec::new();
            for path in &trust {
                let json =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let dir: pb::Directory = serde_json::from_slice(&json).with_context(|| {
                    format!(
                        "{} is not a directory (accord.v1.Directory JSON)",
                        path.display()
                    )
                })?;
                trusted.push(dir);
            }
            let report = accord_proto::evidence::verify_bundle(&bytes, &trusted);
            print!("{report}");
            anyhow::ensure!(report.ok(), "{} did not verify", bundle.display());
            Ok(())
        }
        Command::Status {
            session,
            message_id,
        } => {
            let mut client = session.connect().await?;
            let id = message_id.parse()?;
            // The case book says who the message was between; the chain's signers are
            // checked against them. A message it does not know is checked by role only.
            let known = client
                .case_book()
                .and_then(|b| b.all().into_iter().find(|e| e.id == message_id));
            let (hash, chain) = match known {
                Some(e) => {
                    let other: accord_proto::ids::OrgId = e.counterpart.parse()?;
                    let (sender, recipient) = match e.direction {
                        accord_client::casebook::Direction::Sent => (client.id.clone(), other),
                        accord_client::casebook::Direction::Received => (other, client.id.clone()),
                    };
                    client.status_between(&id, &sender, &recipient).await?
                }
                None => {
                    eprintln!(
                        "{message_id} is not in the case book: receipt signers are checked by \
                         role, not against the message's sender and recipient"
                    );
                    client.status(&id).await?
                }
            };
            println!("{message_id} envelope {hash}: {:?}", furthest_stage(&chain));
            for r in chain {
                println!(
                    "  {:?} by {} at {} log #{}",
                    r.stage(),
                    r.signer,
                    r.body.at_ms,
                    r.body.log_index
                );
            }
            Ok(())
        }
    }
}
