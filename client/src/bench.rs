//! `accord bench`: a load generator over two real gateways, with the limits it is measured
//! against taken in the same run.
//!
//! The exchange: a VN and a KH gateway run as separate `accord gateway` processes, with mutual
//! TLS and fsynced sled stores in the run folder (on the disk the folder is on). `senders`
//! VN connections each submit envelopes one at a time (sealed and signed before the timed
//! phase); one KH organisation subscribes, opens each envelope and acknowledges it with a
//! signed delivered receipt. Measured: submit→accepted and submit→delivered-and-acked
//! latencies and throughputs, CPU seconds per message of every process, peak RSS of each
//! gateway, bytes on disk per message.
//!
//! The limits, in the same process and on the same machine, so that ratios hold on a noisy
//! one:
//! - transport: a bare tonic unary echo over the same mutual TLS, same bodies, same
//!   concurrency ([`accord_proto::bench_pb`]);
//! - crypto: the signatures, verifications, HPKE and hashing one message costs on its way
//!   (the same `ring` build), turned into a ceiling for the machine's cores;
//! - store: durable transactions per second on the same store, disk and concurrency.
//!
//! With [`Options::attach`] it measures two gateways already running instead ([`Attach`]):
//! the end-to-end phase only, since it cannot take the receiving gateway down, and each
//! gateway's CPU, memory and disk growth where the attach file says where to read them.
//! The limits are still measured in this process, on a throwaway PKI in the run folder.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accord_gateway::store::{Store, Tx};
use accord_proto::envelope::{Limits, SealedEnvelope};
use accord_proto::ids::MessageId;
use accord_proto::pb;
use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;

use crate::localnet::LocalNet;
use crate::org::{now_ms, Opened, OrgClient, SendOptions};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Concurrent sender connections, each with one submit in flight.
    pub senders: usize,
    /// Encoded size of each form (`accord.v1.Body`) before sealing.
    pub body_bytes: usize,
    /// Messages in the timed phase.
    pub messages: usize,
    /// Messages sent end to end before the timed phase (connections, caches, log warm).
    pub warmup: usize,
    /// Where the PKI, configurations and stores go (a fresh temporary folder if `None`).
    pub dir: Option<PathBuf>,
    /// The executable that runs a gateway as `EXE gateway CONFIG` (normally `accord`).
    pub gateway_exe: PathBuf,
    /// Give up on the timed phase after this long.
    pub timeout: Duration,
    /// The gateways' log filter (`RUST_LOG`). The deployed unit runs `info`, which logs
    /// a line per message at each stage.
    pub gateway_log: String,
    /// Messages per second offered by all senders together, evenly spaced, in the timed
    /// phases; `None`: each sender submits as soon as its last submit was accepted.
    pub rate: Option<f64>,
    /// Measure these running gateways instead of starting a pair.
    pub attach: Option<Attach>,
}

/// Two running gateways to measure (`accord bench --attach FILE`, TOML): the organisation
/// that sends, the one that receives, and each one's gateway. Use organisations kept for
/// benchmarks: the recipient acknowledges what it is sent, and the run refuses to start
/// while its inbox holds anything.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub sender: AttachedOrg,
    pub recipient: AttachedOrg,
}

/// One side of [`Attach`]. Paths are relative to the attach file's folder.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachedOrg {
    /// Organisation folder with cert.pem, key.pem and keys.json (as `accord certs` writes).
    pub org: PathBuf,
    /// The gateway's client address, host:port.
    pub gateway: std::net::SocketAddr,
    /// The gateway's SPIFFE id.
    pub gateway_id: String,
    /// The country root CA that vouches for the gateway.
    pub root: PathBuf,
    /// Pinned directory keys of every country.
    pub trust: PathBuf,
    /// The gateway's process id, when it runs on this machine: its CPU and peak RSS.
    pub pid: Option<u32>,
    /// The gateway's `data_dir`, when it is on this machine: bytes on disk per message.
    pub data_dir: Option<PathBuf>,
}

impl Attach {
    /// Reads an attach file; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the attach file {}", path.display()))?;
        let mut attach: Attach =
            toml::from_str(&text).with_context(|| format!("the attach file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (name, side) in [
            ("sender", &mut attach.sender),
            ("recipient", &mut attach.recipient),
        ] {
            for p in [&mut side.org, &mut side.root, &mut side.trust] {
                *p = base.join(&*p);
            }
            if let Some(d) = &mut side.data_dir {
                *d = base.join(&*d);
            }
            side.check()
                .with_context(|| format!("[{name}] in the attach file {}", path.display()))?;
        }
        Ok(attach)
    }

    /// The gateways' processes on this machine, named by side (one entry if both
    /// organisations use the same gateway).
    fn processes(&self) -> Vec<(String, u32)> {
        let mut pids: Vec<(String, u32)> = Vec::new();
        for (name, side) in [("sender", &self.sender), ("recipient", &self.recipient)] {
            match (side.pid, pids.first()) {
                (Some(pid), Some((_, first))) if *first == pid => {
                    pids[0].0 = "gateway (attached, both sides)".into()
                }
                (Some(pid), _) => pids.push((format!("{name}'s gateway (attached)"), pid)),
                (None, _) => {}
            }
        }
        pids
    }

    /// The stores' folders on this machine, each once.
    fn data_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.sender.data_dir, &self.recipient.data_dir]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        dirs.dedup();
        dirs
    }
}

impl AttachedOrg {
    /// What can be checked before anything is measured: the id, the process, the folder.
    fn check(&self) -> anyhow::Result<()> {
        self.gateway_id
            .parse::<accord_proto::ids::SpiffeId>()
            .with_context(|| format!("gateway_id {:?}", self.gateway_id))?;
        if let Some(pid) = self.pid {
            anyhow::ensure!(
                runs_accord(pid),
                "pid {pid} is not a running accord process on this machine"
            );
        }
        if let Some(dir) = &self.data_dir {
            std::fs::read_dir(dir).with_context(|| {
                format!(
                    "data_dir {}: this user must be able to read the store's folder",
                    dir.display()
                )
            })?;
        }
        Ok(())
    }

    async fn connect(&self) -> anyhow::Result<OrgClient> {
        let gateway = crate::org::GatewayAddress {
            addr: self.gateway,
            id: self
                .gateway_id
                .parse()
                .with_context(|| format!("gateway_id {:?}", self.gateway_id))?,
            root: self.root.clone(),
            trust: self.trust.clone(),
        };
        OrgClient::connect(&self.org, &gateway)
            .await
            .with_context(|| {
                format!(
                    "connecting {} to the gateway at {}",
                    self.org.display(),
                    self.gateway
                )
            })
    }
}

impl Options {
    /// How long each sender waits between the starts of its submits, with `rate`: at least
    /// a microsecond, at most a year (the CLI keeps `rate` well inside both).
    fn pace(&self) -> Option<Duration> {
        self.rate.map(|rate| {
            Duration::try_from_secs_f64(self.senders as f64 / rate)
                .unwrap_or(Duration::MAX)
                .clamp(Duration::from_micros(1), Duration::from_secs(365 * 86_400))
        })
    }
}

/// A throughput and its latency distribution.
#[derive(Clone, Debug, Serialize)]
pub struct Rate {
    pub messages: usize,
    pub seconds: f64,
    pub throughput_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// The latency distribution of one stage of the end-to-end path, over every message.
#[derive(Clone, Debug, Serialize)]
pub struct StageLatency {
    pub stage: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// How much the machine got in the way during a phase, from the kernel's counters: the
/// share of the machine's CPU time the hypervisor gave to others (steal), and the share of
/// wall time in which some task waited for a CPU, or for I/O (pressure stall information;
/// our own processes' waits included, so under load these are mostly ours). `None` where
/// the kernel does not expose it.
#[derive(Clone, Debug, Serialize)]
pub struct Noise {
    pub steal_percent: Option<f64>,
    pub cpu_pressure_percent: Option<f64>,
    pub io_pressure_percent: Option<f64>,
}

/// The counters behind [`Noise`] at one instant.
struct NoiseCounters {
    at: Instant,
    /// Summed over the machine's `cpus`, in clock ticks of 1/100 s (Linux's USER_HZ).
    steal: Option<Steal>,
    cpu_waiting_us: Option<u64>,
    io_waiting_us: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
struct Steal {
    ticks: u64,
    cpus: usize,
}

/// The steal time in `/proc/stat` text: the `cpu` line's eighth figure ("cpu user nice
/// system idle iowait irq softirq steal …"), summed over the `cpuN` lines that follow.
fn parse_steal(stat: &str) -> Option<Steal> {
    let mut lines = stat.lines();
    let ticks = lines.next()?.split_whitespace().nth(8)?.parse().ok()?;
    let cpus = lines.take_while(|l| l.starts_with("cpu")).count().max(1);
    Some(Steal { ticks, cpus })
}

/// The "some" total, in µs, of a `/proc/pressure/*` file: its first line reads
/// "some avg10=… avg60=… avg300=… total=<µs>".
fn parse_pressure_total(text: &str) -> Option<u64> {
    let some = text.lines().next()?.strip_prefix("some ")?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

impl NoiseCounters {
    fn now() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        Self {
            at: Instant::now(),
            steal: read("/proc/stat").as_deref().and_then(parse_steal),
            cpu_waiting_us: read("/proc/pressure/cpu")
                .as_deref()
                .and_then(parse_pressure_total),
            io_waiting_us: read("/proc/pressure/io")
                .as_deref()
                .and_then(parse_pressure_total),
        }
    }

    /// What happened between `self` and now.
    fn since(&self) -> Noise {
        let now = Self::now();
        let wall_us = (now.at - self.at).as_micros().max(1) as f64;
        let share = |before: Option<u64>, after: Option<u64>, of_us: f64| {
            Some(after?.saturating_sub(before?) as f64 / of_us * 100.0)
        };
        let cpus = now.steal.as_ref().map_or(1, |s| s.cpus) as f64;
        Noise {
            steal_percent: share(
                self.steal.as_ref().map(|s| s.ticks),
                now.steal.as_ref().map(|s| s.ticks),
                wall_us / 10_000.0 * cpus,
            ),
            cpu_pressure_percent: share(self.cpu_waiting_us, now.cpu_waiting_us, wall_us),
            io_pressure_percent: share(self.io_waiting_us, now.io_waiting_us, wall_us),
        }
    }
}

/// The stages of [`StageLatency`], in the order a message passes them.
pub const END_TO_END_STAGES: [&str; 3] = [
    "submit -> accepted by VN",
    "accepted -> opened by recipient",
    "opened -> ack durable at KH",
];

/// One message of the end-to-end phase: when its acknowledgement completed, its latency
/// from the submit, and what each of [`END_TO_END_STAGES`] took.
struct Delivery {
    done: Instant,
    latency: Duration,
    stages: [Duration; 3],
}

/// One process's share of the work in the timed phase.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessUse {
    pub name: String,
    pub cpu_seconds: f64,
    pub cpu_us_per_message: f64,
    /// Peak resident set over the process's life (VmHWM); `None` for the bench process,
    /// whose peak includes presealing every envelope.
    pub peak_rss_mib: Option<f64>,
}

impl ProcessUse {
    /// `cpu_seconds` spent on `messages`.
    fn new(name: String, cpu_seconds: f64, messages: usize, peak_rss_mib: Option<f64>) -> Self {
        Self {
            name,
            cpu_seconds,
            cpu_us_per_message: us_per_message(cpu_seconds, messages),
            peak_rss_mib,
        }
    }
}

/// The submit-only phase: its rate and what it cost the VN gateway.
#[derive(Clone, Debug, Serialize)]
pub struct SubmitAlone {
    #[serde(flatten)]
    pub rate: Rate,
    pub vn_cpu_us_per_message: f64,
    pub bench_cpu_us_per_message: f64,
}

/// One stage of the per-message cryptographic work.
#[derive(Clone, Debug, Serialize)]
pub struct CryptoStage {
    pub stage: String,
    /// How many times one message goes through it, on all parties together.
    pub times_per_message: u32,
    pub us_each: f64,
}

/// The crypto ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct CryptoLimit {
    pub stages: Vec<CryptoStage>,
    /// CPU time of the work in the timed path, per message.
    pub us_per_message: f64,
    pub cores: usize,
    /// `cores` seconds of CPU divided by the per-message work.
    pub ceiling_per_sec: f64,
    /// The lowest and highest ceiling of a single round ([`CRYPTO_ROUNDS`]), over both
    /// halves: how much the machine's speed moved while the ceiling was timed.
    pub round_ceilings_per_sec: [f64; 2],
    /// The ceiling of the half of the rounds timed before the end-to-end phase, and of the
    /// half after it: a gap between them says the machine's speed moved during the phase.
    pub halves_per_sec: [f64; 2],
    /// Sealing and signing at the sender, done before the timed phase (not in the ceiling).
    pub seal_us: f64,
}

impl CryptoLimit {
    /// Two timings of as many rounds each, taken as one.
    fn merged(self, other: CryptoLimit) -> CryptoLimit {
        let stages: Vec<CryptoStage> = (self.stages.into_iter().zip(other.stages))
            .map(|(a, b)| CryptoStage {
                us_each: (a.us_each + b.us_each) / 2.0,
                ..a
            })
            .collect();
        let us_per_message = (stages.iter())
            .map(|s| f64::from(s.times_per_message) * s.us_each)
            .sum::<f64>();
        let [low, high] = self.round_ceilings_per_sec;
        let [other_low, other_high] = other.round_ceilings_per_sec;
        CryptoLimit {
            ceiling_per_sec: self.cores as f64 * 1e6 / us_per_message,
            round_ceilings_per_sec: [low.min(other_low), high.max(other_high)],
            halves_per_sec: [self.ceiling_per_sec, other.ceiling_per_sec],
            seal_us: (self.seal_us + other.seal_us) / 2.0,
            stages,
            us_per_message,
            cores: self.cores,
        }
    }
}

/// The limits measured in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct LimitFigures {
    pub transport: Rate,
    pub crypto: CryptoLimit,
    pub store: Rate,
}

/// Accord's throughput as a fraction of each ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    pub end_to_end_vs_transport: f64,
    pub end_to_end_vs_crypto: f64,
    pub end_to_end_vs_store: f64,
    pub submit_vs_transport: f64,
    pub submit_vs_store: f64,
    /// The ceiling Accord comes closest to.
    pub nearest_limit: String,
    /// The process that spends the most CPU per message.
    pub busiest_process: String,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub senders: usize,
    /// [`Options::rate`]: with it, throughputs are the offered rate, and the latencies
    /// are those of that load.
    pub offered_per_sec: Option<f64>,
    pub body_bytes: usize,
    pub messages: usize,
    /// Measured running gateways ([`Options::attach`]): no submit-alone or drain phase.
    pub attached: bool,
    /// Durable submit→accepted with KH down, so that nothing else runs on the machine: a
    /// broker's publish+confirm phase. Envelopes sealed beforehand.
    pub submit_alone: Option<SubmitAlone>,
    /// Those envelopes drained once KH is up: forwarded, opened and acknowledged (a
    /// broker's consume+ack phase), timed from KH's start.
    pub drain: Option<Rate>,
    /// Durable submit→accepted of envelopes sealed before the timed phase, while the
    /// recipient drains them (the end-to-end phase).
    pub submit: Rate,
    /// Submitted → delivered, opened and acknowledged by the recipient.
    pub end_to_end: Rate,
    /// Where each end-to-end message's time went, stage by stage.
    pub end_to_end_stages: Vec<StageLatency>,
    /// How much the machine got in the way during the end-to-end phase.
    pub end_to_end_noise: Noise,
    pub processes: Vec<ProcessUse>,
    /// Both stores' size over every envelope of the run; attached, their growth during it
    /// (`None` where the attach file names no store).
    pub disk_bytes_per_message: Option<f64>,
    pub limits: LimitFigures,
    pub ratios: Ratios,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub run_dir_filesystem: String,
    /// The gateways' log filter in this run ([`Options::gateway_log`]).
    pub gateway_log: String,
}

const SENDER_ORG: &str = "c02";
const RECIPIENT_ORG: &str = "ahtd";

/// Runs the benchmark, reporting progress on `progress`.
pub async fn run(opts: &Options, progress: &mut (impl Write + Send)) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.messages >= opts.senders,
        "--count must be at least --senders"
    );
    // Attached, the net only lends its PKI and folder to the limits.
    let net = bench_net(opts).await?;
    let measured = match &opts.attach {
        Some(attach) => measure_attached(opts, attach, &net, progress).await?,
        None => measure_own_pair(opts, &net, progress).await?,
    };
    let Measured {
        alone,
        drain,
        exchange,
        mut processes,
        disk_bytes_per_message,
    } = measured;
    let Exchange {
        submit,
        end_to_end,
        stages: end_to_end_stages,
        noise,
        bench_cpu,
        gateway_cpu: _,
        crypto,
    } = exchange;
    processes.push(ProcessUse::new(
        "clients (bench process)".into(),
        bench_cpu,
        opts.messages,
        None,
    ));

    writeln!(progress, "limits: transport (bare mTLS echo)...")?;
    let transport = transport_limit(opts, &net).await?;
    writeln!(progress, "limits: store (durable transactions)...")?;
    let store = store_limit(opts, net.root()).await?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let e2e = end_to_end.throughput_per_sec;
    let fractions = [
        ("transport", ratio(e2e, transport.throughput_per_sec)),
        ("crypto", ratio(e2e, crypto.ceiling_per_sec)),
        (
            "store",
            ratio(submit.throughput_per_sec, store.throughput_per_sec),
        ),
    ];
    let nearest_limit = fractions
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or("none", |f| f.0)
        .to_owned();
    let busiest_process = processes
        .iter()
        .max_by(|a, b| a.cpu_us_per_message.total_cmp(&b.cpu_us_per_message))
        .map_or_else(String::new, |p| p.name.clone());
    let ratios = Ratios {
        end_to_end_vs_transport: fractions[0].1,
        end_to_end_vs_crypto: fractions[1].1,
        end_to_end_vs_store: ratio(e2e, store.throughput_per_sec),
        submit_vs_transport: ratio(submit.throughput_per_sec, transport.throughput_per_sec),
        submit_vs_store: fractions[2].1,
        nearest_limit,
        busiest_process,
    };
    let report = Report {
        machine: machine(net.root(), &opts.gateway_log),
        senders: opts.senders,
        offered_per_sec: opts.rate,
        body_bytes: opts.body_bytes,
        messages: opts.messages,
        attached: opts.attach.is_some(),
        submit_alone: alone,
        drain,
        submit,
        end_to_end,
        end_to_end_stages,
        end_to_end_noise: noise,
        processes,
        disk_bytes_per_message,
        limits: LimitFigures {
            transport,
            crypto,
            store,
        },
        ratios,
    };
    net.shutdown().await;
    Ok(report)
}

/// What a run measured of the gateways, with the crypto ceiling timed around the
/// end-to-end phase; the other limits are measured after it.
struct Measured {
    alone: Option<SubmitAlone>,
    drain: Option<Rate>,
    exchange: Exchange,
    /// The gateways' processes, with the CPU of the end-to-end phase.
    processes: Vec<ProcessUse>,
    disk_bytes_per_message: Option<f64>,
}

/// Starts VN and KH as processes, runs the three phases, stops them.
async fn measure_own_pair(
    opts: &Options,
    net: &LocalNet,
    progress: &mut (impl Write + Send),
) -> anyhow::Result<Measured> {
    let mut gateways = vec![GatewayProcess::spawn(opts, net, "vn")?];
    let result = phases(opts, net, &mut gateways, progress).await;
    for g in &mut gateways {
        g.stop();
    }
    let (alone, drain, exchange) = result?;
    let processes = gateways
        .iter()
        .zip(&exchange.gateway_cpu)
        .map(|(g, &cpu)| {
            ProcessUse::new(
                format!("{}-gateway", g.country),
                cpu,
                opts.messages,
                g.peak_rss_mib,
            )
        })
        .collect();
    let on_disk: u64 = ["vn", "kh"]
        .iter()
        .map(|cc| {
            net.data_dir(cc)
                .map(|d| accord_gateway::attachments::dir_size(&d))
        })
        .sum::<anyhow::Result<u64>>()?;
    // Every envelope of the three phases: submit alone (drained), warm-up, end to end.
    let stored = 2 * opts.messages + opts.warmup;
    Ok(Measured {
        alone: Some(alone),
        drain: Some(drain),
        exchange,
        processes,
        disk_bytes_per_message: Some(on_disk as f64 / stored as f64),
    })
}

/// Measures the running gateways of `attach`: the warm-up and the end-to-end phase.
async fn measure_attached(
    opts: &Options,
    attach: &Attach,
    net: &LocalNet,
    progress: &mut (impl Write + Send),
) -> anyhow::Result<Measured> {
    writeln!(
        progress,
        "connecting to the attached gateways ({} and {})...",
        attach.sender.gateway, attach.recipient.gateway
    )?;
    let mut senders = Vec::with_capacity(opts.senders);
    for _ in 0..opts.senders {
        // A connection each, as separate organisations' clients would have.
        senders.push(attach.sender.connect().await?);
    }
    let mut recipient = attach.recipient.connect().await?;
    // Every item, whether it opens or not: any of them means the inbox is in use.
    let waiting = recipient
        .fetch_each(accord_gateway::service::MAX_BATCH as u32)
        .await?;
    anyhow::ensure!(
        waiting.is_empty(),
        "the recipient {} has messages waiting in its inbox, and the bench acknowledges \
         whatever it is sent: give it an organisation kept for benchmarks, or let the \
         recipient take what is waiting first. Nothing was sent or acknowledged",
        recipient.id
    );
    let to = recipient.id.clone();
    let pids = attach.processes();
    let dirs = attach.data_dirs();
    let on_disk = || -> u64 {
        dirs.iter()
            .map(|d| accord_gateway::attachments::dir_size(d))
            .sum()
    };
    let disk_before = on_disk();
    let pid_list: Vec<u32> = pids.iter().map(|p| p.1).collect();
    let exchange = exchange(
        opts,
        net,
        &mut senders,
        &mut recipient,
        &to,
        &pid_list,
        progress,
    )
    .await?;
    for (name, pid) in &pids {
        // Its CPU would read as what it spent before it went.
        anyhow::ensure!(
            runs_accord(*pid),
            "the {name} (pid {pid}) stopped during the run: its figures would be wrong"
        );
    }
    let grown = on_disk().saturating_sub(disk_before);
    let processes = pids
        .into_iter()
        .zip(&exchange.gateway_cpu)
        .map(|((name, pid), &cpu)| ProcessUse::new(name, cpu, opts.messages, peak_rss_mib(pid)))
        .collect();
    Ok(Measured {
        alone: None,
        drain: None,
        exchange,
        processes,
        disk_bytes_per_message: (!dirs.is_empty())
            .then(|| grown as f64 / (opts.messages + opts.warmup) as f64),
    })
}

/// The two-country net of a run, configured but with no gateway started: the gateways
/// run as processes on the addresses chosen for them.
async fn bench_net(opts: &Options) -> anyhow::Result<LocalNet> {
    anyhow::ensure!(
        (1..=1024).contains(&opts.senders),
        "--senders must be 1 to 1024"
    );
    // Checkpoints as often as a deployed gateway publishes them (tests' nets do it 5x as
    // often).
    let mut builder = LocalNet::builder()
        .country("vn", "hanoi", &[SENDER_ORG])
        .country("kh", "phnom-penh", &[RECIPIENT_ORG])
        .checkpoint_interval_ms(
            accord_gateway::config::LogConfig::default().checkpoint_interval_ms,
        );
    if let Some(dir) = &opts.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        builder = builder.dir(dir);
    }
    let mut net = builder.prepare().await?;
    for cc in ["vn", "kh"] {
        net.release_listeners(cc)?;
    }
    Ok(net)
}

/// The end-to-end phase's figures.
struct Exchange {
    submit: Rate,
    end_to_end: Rate,
    stages: Vec<StageLatency>,
    /// How much the machine got in the way meanwhile.
    noise: Noise,
    /// CPU seconds of this process in the phase.
    bench_cpu: f64,
    /// CPU seconds the gateways' processes spent in it, in the order their ids were given.
    gateway_cpu: Vec<f64>,
    /// The crypto ceiling, timed half right before the phase and half right after.
    crypto: CryptoLimit,
}

/// Submit alone (KH down), drain (KH up), then the end-to-end exchange. `gateways` holds
/// the running VN gateway; KH is started and pushed after the submit-only phase.
async fn phases(
    opts: &Options,
    net: &LocalNet,
    gateways: &mut Vec<GatewayProcess>,
    progress: &mut (impl Write + Send),
) -> anyhow::Result<(SubmitAlone, Rate, Exchange)> {
    writeln!(progress, "waiting for VN...")?;
    let mut senders = Vec::new();
    for _ in 0..opts.senders {
        senders.push(ready_client(net, "vn", SENDER_ORG, gateways).await?);
    }
    let to = net.org_id("kh", RECIPIENT_ORG)?;
    let body = body_of_size(opts.body_bytes);

    writeln!(
        progress,
        "submit alone (KH down): sealing {} envelopes of {} bytes...",
        opts.messages, opts.body_bytes
    )?;
    let batches = preseal(&senders, &to, &body, &bench_options(), opts.messages)?;
    writeln!(progress, "submit alone: {} senders...", opts.senders)?;
    let vn_before = cpu_seconds(gateways[0].pid);
    let bench_before = cpu_seconds(std::process::id());
    let (start, accepted) = tokio::time::timeout(
        opts.timeout,
        submit_all(&senders, batches, None, opts.pace()),
    )
    .await
    .with_context(|| format!("the submit-only phase took longer than {:?}", opts.timeout))??;
    let alone = SubmitAlone {
        rate: rate(start, &accepted),
        vn_cpu_us_per_message: us_per_message(
            cpu_seconds(gateways[0].pid) - vn_before,
            opts.messages,
        ),
        bench_cpu_us_per_message: us_per_message(
            cpu_seconds(std::process::id()) - bench_before,
            opts.messages,
        ),
    };

    writeln!(
        progress,
        "drain: KH up, recipient takes {}...",
        opts.messages
    )?;
    let (drain, mut recipient) = drain_after_kh_starts(opts, net, gateways, opts.messages).await?;
    let pids: Vec<u32> = gateways.iter().map(|g| g.pid).collect();
    let exchange = exchange(
        opts,
        net,
        &mut senders,
        &mut recipient,
        &to,
        &pids,
        progress,
    )
    .await?;
    Ok((alone, drain, exchange))
}

/// What every bench envelope is sent with.
fn bench_options() -> SendOptions {
    SendOptions::new("BENCH-1")
}

/// The warm-up, then the timed end-to-end phase, with the CPU it cost the processes `pids`
/// and this one, between the two halves of the crypto ceiling's rounds.
async fn exchange(
    opts: &Options,
    net: &LocalNet,
    senders: &mut [OrgClient],
    recipient: &mut OrgClient,
    to: &accord_proto::ids::OrgId,
    pids: &[u32],
    progress: &mut (impl Write + Send),
) -> anyhow::Result<Exchange> {
    let body = body_of_size(opts.body_bytes);
    if opts.warmup > 0 {
        writeln!(progress, "warm-up: {} messages end to end...", opts.warmup)?;
        let warm = preseal(senders, to, &body, &bench_options(), opts.warmup)?;
        timed_phase(senders, recipient, warm, None, opts.timeout).await?;
    }
    writeln!(
        progress,
        "sealing {} envelopes of {} bytes...",
        opts.messages, opts.body_bytes
    )?;
    let batches = preseal(senders, to, &body, &bench_options(), opts.messages)?;
    // The warm-up's last checkpoint may still be due: both halves are timed on idle gateways.
    let (waited, idle) = wait_until_idle(pids).await;
    writeln!(
        progress,
        "limits: crypto (per-message work), first half, after {:.1} s {}...",
        waited.as_secs_f64(),
        idle_words(idle)
    )?;
    let ceiling_before = crypto_limit(opts.body_bytes, net, CRYPTO_ROUNDS / 2)?;
    writeln!(
        progress,
        "end to end: {} senders, {} messages...",
        opts.senders, opts.messages
    )?;
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let bench_before = cpu_seconds(std::process::id());
    let noise_before = NoiseCounters::now();
    let (submit, end_to_end, stages) =
        timed_phase(senders, recipient, batches, opts.pace(), opts.timeout).await?;
    let noise = noise_before.since();
    let bench_cpu = cpu_seconds(std::process::id()) - bench_before;
    let gateway_cpu = pids
        .iter()
        .zip(before)
        .map(|(&p, b)| cpu_seconds(p) - b)
        .collect();
    // The gateways may still be writing the last receipts, or checkpointing.
    let (waited, idle) = wait_until_idle(pids).await;
    writeln!(
        progress,
        "limits: crypto (per-message work), second half, after {:.1} s {}...",
        waited.as_secs_f64(),
        idle_words(idle)
    )?;
    let ceiling_after = crypto_limit(opts.body_bytes, net, CRYPTO_ROUNDS / 2)?;
    Ok(Exchange {
        submit,
        end_to_end,
        stages,
        noise,
        bench_cpu,
        gateway_cpu,
        crypto: ceiling_before.merged(ceiling_after),
    })
}

/// CPU seconds spread over `messages`, in µs each.
fn us_per_message(cpu_seconds: f64, messages: usize) -> f64 {
    cpu_seconds / messages as f64 * 1e6
}

/// Starts KH (added to `gateways`, which holds VN) and lets the recipient open and
/// acknowledge the `queued` envelopes VN holds for it. The rate is timed from KH's start;
/// the recipient is returned for what follows.
async fn drain_after_kh_starts(
    opts: &Options,
    net: &LocalNet,
    gateways: &mut Vec<GatewayProcess>,
    queued: usize,
) -> anyhow::Result<(Rate, OrgClient)> {
    let start = Instant::now();
    gateways.push(GatewayProcess::spawn(opts, net, "kh")?);
    let recipient = ready_client(net, "kh", RECIPIENT_ORG, gateways).await?;
    let delivered = tokio::time::timeout(
        opts.timeout,
        open_and_ack(recipient.clone(), queued, |_| Some((start, None))),
    )
    .await
    .with_context(|| format!("the drain took longer than {:?}", opts.timeout))??;
    let delivered: Vec<_> = delivered.iter().map(|d| (d.done, d.latency)).collect();
    Ok((rate(start, &delivered), recipient))
}

/// A client of `org` whose gateway answers (the gateway process may still be starting).
async fn ready_client(
    net: &LocalNet,
    cc: &str,
    org: &str,
    gateways: &[GatewayProcess],
) -> anyhow::Result<OrgClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match net.client(cc, org).await {
            Ok(mut c) => match c.fetch(0).await {
                Ok(_) => return Ok(c),
                Err(e) => anyhow::Error::from(e),
            },
            Err(e) => e,
        };
        if let Some(g) = gateways.iter().find(|g| g.exited()) {
            anyhow::bail!(
                "the {} gateway exited; its log is {}",
                g.country,
                g.log.display()
            );
        }
        if Instant::now() > deadline {
            return Err(last.context(format!("the {cc} gateway did not answer within 30 s")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `total` envelopes, sealed and signed, dealt round-robin to the senders.
fn preseal(
    senders: &[OrgClient],
    to: &accord_proto::ids::OrgId,
    body: &pb::Body,
    options: &SendOptions,
    total: usize,
) -> anyhow::Result<Vec<Vec<SealedEnvelope>>> {
    let mut batches: Vec<Vec<SealedEnvelope>> = vec![Vec::new(); senders.len()];
    for i in 0..total {
        let s = i % senders.len();
        batches[s].push(senders[s].seal(to, body, options)?);
    }
    Ok(batches)
}

/// Submits every batch (one sender per batch, one envelope in flight each) while the
/// recipient opens and acknowledges; returns submit→accepted and submit→acked figures,
/// both timed from the same start.
async fn timed_phase(
    senders: &mut [OrgClient],
    recipient: &mut OrgClient,
    batches: Vec<Vec<SealedEnvelope>>,
    pace: Option<Duration>,
    timeout: Duration,
) -> anyhow::Result<(Rate, Rate, Vec<StageLatency>)> {
    let total: usize = batches.iter().map(Vec::len).sum();
    let submitted_at: Arc<Mutex<Submitted>> = Arc::new(Mutex::new(HashMap::with_capacity(total)));
    let start = Instant::now();
    let times = submitted_at.clone();
    let receiving = tokio::spawn(open_and_ack(recipient.clone(), total, move |id| {
        times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }));

    let run = async {
        let (_, accepted) = submit_all(senders, batches, Some(submitted_at), pace).await?;
        let delivered = receiving.await??;
        Ok::<_, anyhow::Error>((accepted, delivered))
    };
    let (accepted, delivered) = tokio::time::timeout(timeout, run)
        .await
        .with_context(|| format!("the timed phase took longer than {timeout:?}"))??;
    let stages = END_TO_END_STAGES
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let (p50_ms, p99_ms, p999_ms) =
                percentiles(delivered.iter().map(|d| d.stages[i]).collect());
            StageLatency {
                stage,
                p50_ms,
                p99_ms,
                p999_ms,
            }
        })
        .collect();
    let delivered: Vec<_> = delivered.iter().map(|d| (d.done, d.latency)).collect();
    Ok((rate(start, &accepted), rate(start, &delivered), stages))
}

/// When each message's submit started, and when it was accepted once it was.
type Submitted = HashMap<MessageId, (Instant, Option<Instant>)>;

/// Submits every batch, one sender per batch with one envelope in flight each, noting in
/// `submitted_at` when each submit started. With `pace`, each sender starts a submit
/// every `pace` (the senders staggered across it), or as soon as the last is accepted if
/// that took longer. Returns when the submits started and when each was accepted, with
/// its latency.
async fn submit_all(
    senders: &[OrgClient],
    batches: Vec<Vec<SealedEnvelope>>,
    submitted_at: Option<Arc<Mutex<Submitted>>>,
    pace: Option<Duration>,
) -> anyhow::Result<(Instant, Vec<(Instant, Duration)>)> {
    let total: usize = batches.iter().map(Vec::len).sum();
    let start = Instant::now();
    let mut sending = tokio::task::JoinSet::new();
    let count = senders.len() as u32;
    for (k, (client, batch)) in senders.iter().cloned().zip(batches).enumerate() {
        let times = submitted_at.clone();
        let mut client = client;
        let mut ticks = pace.map(|every| {
            // k < count, so this stays below `every`.
            let first = tokio::time::Instant::from_std(start) + every / count * k as u32;
            let mut ticks = tokio::time::interval_at(first, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        sending.spawn(async move {
            let mut accepted = Vec::with_capacity(batch.len());
            for sealed in batch {
                if let Some(ticks) = &mut ticks {
                    ticks.tick().await;
                }
                let t0 = Instant::now();
                let id = match &times {
                    Some(times) => {
                        let id = crate::org::message_id_of(&sealed)?;
                        times
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id, (t0, None));
                        Some((times, id))
                    }
                    None => None,
                };
                client.submit(&sealed).await?;
                let t1 = Instant::now();
                accepted.push((t1, t1 - t0));
                if let Some((times, id)) = id {
                    if let Some(t) = times.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&id) {
                        t.1 = Some(t1);
                    }
                }
            }
            Ok::<_, anyhow::Error>(accepted)
        });
    }
    let mut accepted = Vec::with_capacity(total);
    while let Some(r) = sending.join_next().await {
        accepted.extend(r??);
    }
    Ok((start, accepted))
}

/// Acknowledgement calls a bench recipient keeps in flight; each carries what was opened
/// while the others were out (`OrgClient::ack_many`), as a recipient working through a
/// backlog would send them.
const ACK_CALLS_IN_FLIGHT: usize = 2;

/// The recipient's side: subscribes, opens each envelope and acknowledges it, until
/// `total` are acknowledged. Acknowledgements go out in batches, up to
/// [`ACK_CALLS_IN_FLIGHT`] calls at a time (each receipt is a durable write at its gateway).
/// `since(id)` says when the message's submit started and, if known, when it was accepted
/// (ids are noted before their submit starts); a message it does not know was not sent by
/// this run and is neither acknowledged nor counted. Returns each message's [`Delivery`].
async fn open_and_ack(
    mut recipient: OrgClient,
    total: usize,
    since: impl Fn(&MessageId) -> Option<(Instant, Option<Instant>)>,
) -> anyhow::Result<Vec<Delivery>> {
    let mut inbox = recipient.subscribe().await?;
    let mut delivered = Vec::with_capacity(total);
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut opened: Vec<Opened> = Vec::new();
    let mut opened_at: HashMap<MessageId, Instant> = HashMap::with_capacity(total);
    let mut received = 0;
    while delivered.len() < total {
        if !opened.is_empty() && acks.len() < ACK_CALLS_IN_FLIGHT {
            let batch: Vec<_> = opened
                .drain(..opened.len().min(accord_gateway::service::MAX_BATCH))
                .collect();
            let mut client = recipient.clone();
            acks.push(async move {
                let ids: Vec<MessageId> = batch.iter().map(|o| o.envelope.id()).collect();
                for done in client.ack_many(&batch).await? {
                    done.context("an acknowledgement was not taken")?;
                }
                Ok::<_, anyhow::Error>((ids, Instant::now()))
            });
        }
        tokio::select! {
            item = inbox.next(), if received < total => {
                let item = item.context("the inbox stream ended")??;
                let id = item.envelope.id();
                if since(&id).is_none() {
                    // Not sent by this run (an attached recipient's other mail): left in
                    // the inbox, neither acknowledged nor counted.
                    tracing::warn!(message_id = %id, "not sent by this bench: left unacknowledged");
                    continue;
                }
                opened_at.insert(id, Instant::now());
                opened.push(item);
                received += 1;
            }
            Some(done) = acks.next() => {
                let (ids, at) = done?;
                for id in ids {
                    let (Some((from, accepted)), Some(opened)) = (since(&id), opened_at.remove(&id))
                    else {
                        continue;
                    };
                    // A push may overtake the submit's answer, or its sender may not have
                    // noted it yet: the accept then ends at the open, never after it.
                    let accepted = accepted.map_or(opened, |a| a.min(opened));
                    delivered.push(Delivery {
                        done: at,
                        latency: at - from,
                        stages: [accepted - from, opened - accepted, at - opened],
                    });
                }
            }
            // Everything received and acknowledged, yet not every message counted: an id
            // came twice, or one nobody sent.
            else => anyhow::bail!(
                "{} of {total} messages acknowledged as sent in this phase",
                delivered.len()
            ),
        }
    }
    Ok(delivered)
}

/// p50, p99 and p99.9 of `latencies`, in milliseconds (zeros when there are none).
fn percentiles(mut latencies: Vec<Duration>) -> (f64, f64, f64) {
    latencies.sort();
    let pct = |p: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    (pct(0.50), pct(0.99), pct(0.999))
}

/// Throughput from `start` to the last completion, and the latency percentiles.
fn rate(start: Instant, done: &[(Instant, Duration)]) -> Rate {
    let end = done.iter().map(|d| d.0).max().unwrap_or(start);
    let seconds = (end - start).as_secs_f64();
    let (p50_ms, p99_ms, p999_ms) = percentiles(done.iter().map(|d| d.1).collect());
    Rate {
        messages: done.len(),
        seconds,
        throughput_per_sec: if seconds > 0.0 {
            done.len() as f64 / seconds
        } else {
            0.0
        },
        p50_ms,
        p99_ms,
        p999_ms,
    }
}

/// A form whose encoding is `size` bytes (or the smallest possible, if less): an alert up
/// to the text limit, above it correspondence with one attachment.
pub fn body_of_size(size: usize) -> pb::Body {
    use prost::Message;
    // Printable, incompressible enough: nothing in the path compresses anyway.
    let filler = |n: usize| -> String {
        (0..n)
            .map(|i| char::from(b'a' + ((i * 7 + i / 26) % 26) as u8))
            .collect()
    };
    let make = |n: usize| -> pb::Body {
        if size <= 8 * 1024 {
            pb::Body {
                form: Some(pb::body::Form::Alert(pb::Alert {
                    what: filler(n),
                    r#where: "Mộc Bài – Bavet".into(),
                    ..Default::default()
                })),
            }
        } else {
            pb::Body {
                form: Some(pb::body::Form::Correspondence(pb::Correspondence {
                    text: "bench".into(),
                    attachments: vec![pb::Attachment {
                        name: "scan.bin".into(),
                        media_type: "application/octet-stream".into(),
                        content: filler(n).into_bytes(),
                        ..Default::default()
                    }],
                })),
            }
        }
    };
    // Length prefixes grow with the content: converge on the exact size in a few steps.
    let mut n = size;
    for _ in 0..4 {
        let len = make(n).encoded_len();
        if len == size {
            break;
        }
        n = (n + size).saturating_sub(len);
    }
    make(n)
}

/// A gateway running as its own process, so its CPU and memory are its own.
struct GatewayProcess {
    country: String,
    child: std::process::Child,
    pid: u32,
    log: PathBuf,
    peak_rss_mib: Option<f64>,
}

impl GatewayProcess {
    fn spawn(opts: &Options, net: &LocalNet, cc: &str) -> anyhow::Result<Self> {
        let exe = &opts.gateway_exe;
        let log = net.root().join(format!("{cc}-gateway.log"));
        let out = std::fs::File::create(&log)?;
        let child = std::process::Command::new(exe)
            .arg("gateway")
            .arg(net.config_path(cc))
            .env("RUST_LOG", &opts.gateway_log)
            // As deploy/accord-gateway.service runs it: glibc's per-thread arenas otherwise
            // add about 35 MiB to a gateway draining a backlog.
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} gateway {}", exe.display(), cc))?;
        Ok(Self {
            country: cc.to_owned(),
            pid: child.id(),
            child,
            log,
            peak_rss_mib: None,
        })
    }

    fn exited(&self) -> bool {
        std::fs::metadata(format!("/proc/{}", self.pid)).is_err()
            || proc_status(self.pid, "State:").is_some_and(|s| s.starts_with('Z'))
    }

    /// Reads the peak RSS, then stops the process with SIGTERM (a clean shutdown).
    fn stop(&mut self) {
        self.peak_rss_mib = peak_rss_mib(self.pid);
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether process `pid` runs here and is an `accord` executable.
fn runs_accord(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        cmd.split(|&b| b == 0)
            .next()
            .and_then(|exe| Path::new(std::str::from_utf8(exe).ok()?).file_name())
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("accord"))
    })
}

/// A process's peak resident set so far (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    proc_status(pid, "VmHWM:")
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
}

/// A field of `/proc/PID/status`.
fn proc_status(pid: u32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
}

/// Waits for the gateways' last store checkpoint, then, up to 4 s in all, for a 100 ms
/// window in which the processes `pids` used together at most one tick (10 ms) of CPU; says
/// how long it waited, and whether they went idle (`None`: no process to watch). The last
/// commit to a store can come one transparency checkpoint interval after the traffic (the
/// witness loop commits cosignatures while the log grew), and the store's checkpoint up to
/// [`CHECKPOINT_EVERY`] after that.
async fn wait_until_idle(pids: &[u32]) -> (Duration, Option<bool>) {
    use accord_gateway::config::LogConfig;
    use accord_gateway::store::sled::CHECKPOINT_EVERY;
    let used = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let start = Instant::now();
    let witness = Duration::from_millis(LogConfig::default().checkpoint_interval_ms);
    tokio::time::sleep(witness + CHECKPOINT_EVERY + Duration::from_millis(200)).await;
    if pids.is_empty() {
        return (start.elapsed(), None);
    }
    let mut last = used();
    while start.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = used();
        if now - last <= 0.0105 {
            return (start.elapsed(), Some(true));
        }
        last = now;
    }
    (start.elapsed(), Some(false))
}

/// How [`wait_until_idle`] ended, for the progress line.
fn idle_words(idle: Option<bool>) -> &'static str {
    match idle {
        Some(true) => "with the gateways idle",
        Some(false) => "with the gateways still busy",
        None => "(gateways not watched: no pid given)",
    }
}

/// User plus system CPU seconds of a process so far (`/proc/PID/stat`, in clock ticks of
/// 1/100 s, the kernel's USER_HZ on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn machine(run_dir: &Path, gateway_log: &str) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cores: cores(),
        cpu,
        kernel,
        run_dir_filesystem: filesystem_of(run_dir),
        gateway_log: gateway_log.to_owned(),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The filesystem type of the mount holding `path` (longest matching mount point).
fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mount, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), fs.to_owned()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |m| m.1)
}

/// The transport limit: a tonic unary echo over the same mutual TLS (the VN gateway's
/// certificate on the server side, the sender organisation's on the client side), the same
/// bodies and the same number of connections, each with one call in flight.
async fn transport_limit(opts: &Options, net: &LocalNet) -> anyhow::Result<Rate> {
    use accord_gateway::tls::{self, Admission, CountryRoots, Credentials};
    use accord_proto::bench_pb::echo_client::EchoClient;
    use accord_proto::bench_pb::echo_server::{Echo, EchoServer};
    use accord_proto::bench_pb::Payload;

    #[derive(Debug)]
    struct Mirror;
    #[tonic::async_trait]
    impl Echo for Mirror {
        async fn echo(
            &self,
            request: tonic::Request<Payload>,
        ) -> Result<tonic::Response<Payload>, tonic::Status> {
            Ok(tonic::Response::new(request.into_inner()))
        }
    }

    let pki = net.root().join("pki");
    let vn = "vn".parse()?;
    let mut roots = CountryRoots::default();
    roots.add(vn, &pki.join("vn/ca.pem"))?;
    let gw = pki.join("vn/gateway");
    let server_creds = Credentials::load(&gw.join("cert.pem"), &gw.join("key.pem"))?;
    let server_tls = tls::server_config(
        &server_creds,
        roots.clone(),
        Admission::Any {
            role: accord_proto::ids::Role::Org,
            countries: vec!["vn".parse()?],
        },
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = accord_gateway::listener::incoming(listener, server_tls, "bench-echo");
    let limit = opts.body_bytes + 64 * 1024;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                EchoServer::new(Mirror)
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );

    let org = net.org_dir("vn", SENDER_ORG)?;
    let client_creds = Credentials::load(&org.join("cert.pem"), &org.join("key.pem"))?;
    let gateway_id = net.gateway_address("vn")?.id;
    let data = vec![0x5a_u8; opts.body_bytes];
    let per_sender = opts.messages.div_ceil(opts.senders);
    let mut clients = Vec::new();
    for _ in 0..opts.senders {
        let config = tls::client_config(&client_creds, roots.clone(), gateway_id.clone())?;
        let mut client = EchoClient::new(tls::channel(addr, config))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        // Connect and warm up outside the timed part, as the exchange's clients are.
        client
            .echo(Payload { data: data.clone() })
            .await
            .context("bench echo server")?;
        clients.push(client);
    }
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for mut client in clients {
        let data = data.clone();
        calls.spawn(async move {
            let mut done = Vec::with_capacity(per_sender);
            for _ in 0..per_sender {
                let t0 = Instant::now();
                let reply = client.echo(Payload { data: data.clone() }).await?;
                anyhow::ensure!(reply.get_ref().data.len() == data.len(), "short echo");
                let t1 = Instant::now();
                done.push((t1, t1 - t0));
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut done = Vec::new();
    while let Some(r) = calls.join_next().await {
        done.extend(r??);
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(rate(start, &done))
}

/// The crypto ceiling over `rounds` rounds (half of [`CRYPTO_ROUNDS`] on each side of the
/// end-to-end phase): each stage's cost measured here, single-threaded, with the same
/// library code and `ring` build the gateways and clients use, weighted by how often one
/// message passes through it between submit and acknowledgement.
fn crypto_limit(body_bytes: usize, net: &LocalNet, rounds: usize) -> anyhow::Result<CryptoLimit> {
    use accord_proto::directory::Directories;
    use accord_proto::receipt;

    let pki = net.root().join("pki");
    let load_keys = |p: PathBuf| -> anyhow::Result<accord_proto::keyfile::KeyFile> {
        accord_gateway::server::load_key_file(&p).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let sender = load_keys(pki.join(format!("vn/orgs/{SENDER_ORG}/keys.json")))?;
    let recipient = load_keys(pki.join(format!("kh/orgs/{RECIPIENT_ORG}/keys.json")))?;
    let gateway = load_keys(pki.join("vn/gateway/keys.json"))?;
    let trust = accord_gateway::server::load_directory_trust(&pki.join("directory-trust.json"))?;
    let now = now_ms();
    let directories = accord_gateway::server::load_directories(
        &[
            pki.join("vn/directory.signed.json"),
            pki.join("kh/directory.signed.json"),
        ],
        &trust,
        now,
    )?;
    let to = net.org_id("kh", RECIPIENT_ORG)?;
    let (key_id, pk) = directories.current_encryption_key(&to, now)?;
    let body = body_of_size(body_bytes);
    let header = |id: u8| pb::Header {
        message_id: MessageId::new_v7(now as u64, [id; 10]).as_bytes().to_vec(),
        kind: pb::Kind::Alert as i32,
        handling_code: "H0".into(),
        evaluation: "X4".into(),
        attachments: vec![],
        case_ref: "BENCH-1".into(),
        sender_org: net
            .org_id("vn", SENDER_ORG)
            .map(|o| o.to_string())
            .unwrap_or_default(),
        recipient_org: to.to_string(),
        recipient_key_id: key_id.clone(),
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
        priority: pb::Priority::Routine as i32,
        ..Default::default()
    };
    let seal = || accord_proto::envelope::seal(header(1), &body, &pk, &sender.signing);
    let sealed = seal()?;
    let wire = sealed.to_wire();
    let verify = |d: &Directories| -> anyhow::Result<accord_proto::envelope::VerifiedEnvelope> {
        Ok(SealedEnvelope::from_wire(wire.clone(), &Limits::default())?.verify(d, now)?)
    };
    let verified = verify(&directories)?;
    let key = recipient
        .encryption_key_by_id(&key_id)
        .context("the recipient's key file lacks its current key")?;
    let receipt_body = pb::ReceiptBody {
        envelope_hash: sealed.hash().0.to_vec(),
        message_id: verified.id().as_bytes().to_vec(),
        stage: pb::Stage::Accepted as i32,
        signer: "spiffe://vn.accord/gateway/hanoi".into(),
        signer_key_id: gateway.signing.key_id().to_owned(),
        at_ms: now,
        log_index: 1,
        reason: 0,
    };
    let signed = receipt::sign(&receipt_body, &gateway.signing);

    // What one message costs, stage by stage: `(stage, times per message, the work)`.
    type Work<'a> = Box<dyn FnMut() -> anyhow::Result<()> + 'a>;
    let mut stages: Vec<(&str, u32, Work)> = vec![
        (
            // VN gateway on submit, KH gateway on arrival, the recipient before opening;
            // each includes hashing the envelope.
            "envelope verify (SHA-256 of the envelope, Ed25519)",
            3,
            Box::new(|| verify(&directories).map(|_| ())),
        ),
        (
            "HPKE open (X25519, HKDF, AES-256-GCM)",
            1,
            Box::new(|| {
                verified.open(key)?;
                Ok(())
            }),
        ),
        (
            // accepted (VN), received (KH), delivered (recipient).
            "receipt sign (Ed25519)",
            3,
            Box::new(|| {
                std::hint::black_box(receipt::sign(&receipt_body, &gateway.signing));
                Ok(())
            }),
        ),
        (
            // The sender checks accepted; VN checks received; KH and VN check delivered.
            "receipt verify (Ed25519)",
            4,
            Box::new(|| {
                receipt::verify(&signed, &directories)?;
                Ok(())
            }),
        ),
    ];
    // The copy of the wire envelope is part of what from_wire needs in the first stage;
    // the gateways decode theirs off the connection instead, so it is timed in every round
    // and taken out.
    let mut copy = || {
        std::hint::black_box(wire.clone());
        Ok(())
    };
    let times: Vec<f64> = stages.iter().map(|s| f64::from(s.1)).collect();
    let per_message = |us: &[f64]| -> f64 { times.iter().zip(us).map(|(t, us)| t * us).sum() };

    for (_, _, work) in &mut stages {
        for _ in 0..3 {
            work()?;
        }
    }
    let cores = cores();
    // Each stage's cost is the mean of its rounds', so the ceiling lies between the
    // rounds' lowest and highest.
    let mut us = vec![0.0; stages.len()];
    let (mut lowest, mut highest) = (f64::MAX, 0.0f64);
    for _ in 0..rounds {
        let mut round = Vec::with_capacity(stages.len());
        for (_, _, work) in &mut stages {
            round.push(time_us(work, CRYPTO_SLICE)?);
        }
        round[0] = (round[0] - time_us(&mut copy, CRYPTO_SLICE)?).max(0.0);
        let ceiling = cores as f64 * 1e6 / per_message(&round);
        (lowest, highest) = (lowest.min(ceiling), highest.max(ceiling));
        for (total, r) in us.iter_mut().zip(round) {
            *total += r / rounds as f64;
        }
    }
    let us_per_message = per_message(&us);
    let seal_us = time_us(
        &mut || seal().map(|_| ()).map_err(Into::into),
        CRYPTO_SLICE * 3,
    )?;
    let ceiling_per_sec = cores as f64 * 1e6 / us_per_message;
    Ok(CryptoLimit {
        ceiling_per_sec,
        round_ceilings_per_sec: [lowest, highest],
        halves_per_sec: [ceiling_per_sec; 2],
        stages: stages
            .iter()
            .zip(us)
            .map(|((stage, times, _), us_each)| CryptoStage {
                stage: (*stage).into(),
                times_per_message: *times,
                us_each,
            })
            .collect(),
        us_per_message,
        cores,
        seal_us,
    })
}

/// The crypto ceiling is timed in rounds, each timing every stage for [`CRYPTO_SLICE`], and
/// taken over all of them. A shared machine's speed moves by a tenth or more from
/// one second to the next (`openssl speed` on this project's CI machine, idle, read 17,200
/// to 23,200 Ed25519 signatures per second in twelve one-second runs): one short timing
/// per stage made the ceiling, and the ratio to it, swing by as much. Rounds spread each
/// change over every stage alike, and about 2.4 s of timing (8 rounds of 5 slices: the
/// four stages and the copy) averages over most of it. Half the rounds run right before the
/// end-to-end phase and half right after it, so that the ceiling is taken at the speed of
/// the seconds the phase ran in. Slices are whole multiples of the scheduler's 4 ms tick,
/// at which `/proc/thread-self/schedstat` is updated.
const CRYPTO_ROUNDS: usize = 8;
const _: () = assert!(
    CRYPTO_ROUNDS.is_multiple_of(2),
    "half the rounds on each side of the phase"
);
const CRYPTO_SLICE: Duration = Duration::from_millis(60);

/// Mean microseconds of this thread's CPU per call of `work` (of wall time where the
/// kernel does not say), calling it for at least `slice` and 10 times.
fn time_us(work: &mut impl FnMut() -> anyhow::Result<()>, slice: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let on_cpu = thread_cpu_ns();
    let mut calls = 0u32;
    while calls < 10 || start.elapsed() < slice {
        work()?;
        calls += 1;
    }
    let ns = match (on_cpu, thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64,
        _ => start.elapsed().as_nanos() as f64,
    };
    Ok(ns / 1e3 / f64::from(calls))
}

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`, first field).
/// The crypto ceiling is a figure of CPU work: timed by the wall clock, a stage would also
/// count the time other processes held the core, which lowers the ceiling on a busy machine.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The store limit: durable transactions per second on a fresh store beside the gateways'
/// (same disk), `senders` writers with one transaction in flight each, each storing a
/// message of the bench's size and one log entry, the core of what a submit writes.
async fn store_limit(opts: &Options, root: &Path) -> anyhow::Result<Rate> {
    use accord_gateway::store::sled::SledStore;
    use accord_gateway::store::{MessageHead, Op, StoredMessage};

    let dir = root.join("store-limit");
    let store = Arc::new(SledStore::open(&dir, 64 << 20)?);
    let per_writer = opts.messages.div_ceil(opts.senders);
    let envelope = pb::Envelope {
        header: vec![1; 200].into(),
        ciphertext: vec![2; opts.body_bytes + 48].into(),
        signature: vec![3; 64].into(),
    };
    let start = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..opts.senders {
        let store = store.clone();
        let envelope = envelope.clone();
        writers.spawn(async move {
            let mut done = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let mut random = [0u8; 10];
                random[..2].copy_from_slice(&(w as u16).to_be_bytes());
                random[2..].copy_from_slice(&(i as u64).to_be_bytes());
                let id = MessageId::new_v7(now_ms() as u64, random);
                let t0 = Instant::now();
                let tx = Tx {
                    ops: vec![
                        Op::InsertMessage(
                            id,
                            StoredMessage {
                                envelope: Some(envelope.clone()),
                                head: MessageHead {
                                    envelope_hash: vec![4; 32],
                                    ..Default::default()
                                },
                            },
                        ),
                        Op::Log(vec![5; 120]),
                    ],
                    receipts: None,
                };
                store.commit(tx).await?;
                let t1 = Instant::now();
                done.push((t1, t1 - t0));
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut done = Vec::new();
    while let Some(r) = writers.join_next().await {
        done.extend(r??);
    }
    let result = rate(start, &done);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

/// What the backlog scenario measured.
#[derive(Clone, Debug, Serialize)]
pub struct BacklogReport {
    pub machine: Machine,
    pub senders: usize,
    pub body_bytes: usize,
    /// Envelopes accepted by VN while KH was down.
    pub backlog: usize,
    /// Durable submit→accepted while the backlog built up.
    pub submit: Rate,
    /// Peak RSS of the VN gateway holding the backlog.
    pub vn_peak_rss_with_backlog_mib: f64,
    /// VN's store on disk with the backlog.
    pub vn_disk_mib: f64,
    /// Entries in VN's log when it was restarted.
    pub vn_log_entries: u64,
    /// From starting the VN gateway process again to its first answered call.
    pub restart_to_ready_ms: f64,
    /// Envelopes exchanged end to end before the backlog (to lengthen the log).
    pub history: usize,
    /// KH comes up: from then until the recipient has opened and acknowledged everything.
    pub drain: Rate,
    pub vn_peak_rss_after_drain_mib: Option<f64>,
    pub kh_peak_rss_after_drain_mib: Option<f64>,
}

/// The backlog scenario: after `history` envelopes end to end, KH is down while VN accepts
/// `backlog` envelopes (sealed as they go), then VN is restarted with the backlog in its
/// store, then KH comes up and the recipient drains everything. Peak memory with the backlog, restart time, drain rate.
pub async fn run_backlog(
    opts: &Options,
    backlog: usize,
    history: usize,
    progress: &mut (impl Write + Send),
) -> anyhow::Result<BacklogReport> {
    anyhow::ensure!(
        backlog >= opts.senders,
        "--backlog must be at least --senders"
    );
    anyhow::ensure!(
        opts.attach.is_none(),
        "--backlog stops and restarts the gateways it measures: it cannot attach to running ones"
    );
    let net = bench_net(opts).await?;
    let mut vn = GatewayProcess::spawn(opts, &net, "vn")?;
    let mut senders = Vec::new();
    for _ in 0..opts.senders {
        senders.push(ready_client(&net, "vn", SENDER_ORG, std::slice::from_ref(&vn)).await?);
    }
    let to = net.org_id("kh", RECIPIENT_ORG)?;
    let body = body_of_size(opts.body_bytes);
    if history > 0 {
        vn = exchange_history(opts, &net, &mut senders, vn, history, progress).await?;
    }
    writeln!(progress, "KH down; VN accepts {backlog} envelopes...")?;
    let start = Instant::now();
    let mut sending = tokio::task::JoinSet::new();
    let per_sender = backlog.div_ceil(opts.senders);
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (i, client) in senders.into_iter().enumerate() {
        let n = per_sender.min(backlog.saturating_sub(i * per_sender));
        let (to, body, count) = (to.clone(), body.clone(), count.clone());
        sending.spawn(async move {
            let mut client = client;
            let options = SendOptions::new("BENCH-BACKLOG");
            let mut done = Vec::with_capacity(n);
            for _ in 0..n {
                let sealed = client.seal(&to, &body, &options)?;
                let t0 = Instant::now();
                client.submit(&sealed).await?;
                let t1 = Instant::now();
                done.push((t1, t1 - t0));
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut accepted = Vec::with_capacity(backlog);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tokio::select! {
            r = sending.join_next() => match r {
                Some(r) => accepted.extend(r??),
                None => break,
            },
            _ = tick.tick() => {
                let n = count.load(std::sync::atomic::Ordering::Relaxed);
                writeln!(progress, "  {n} of {backlog} accepted")?;
            }
        }
    }
    let submit = rate(start, &accepted);
    let vn_peak = peak_rss_mib(vn.pid).unwrap_or(0.0);
    let vn_disk =
        accord_gateway::attachments::dir_size(&net.data_dir("vn")?) as f64 / (1 << 20) as f64;

    writeln!(progress, "restarting VN with the backlog...")?;
    vn.stop();
    let vn_log_entries = log_entries(&net.data_dir("vn")?)?;
    let restarted = Instant::now();
    let vn = GatewayProcess::spawn(opts, &net, "vn")?;
    ready_client(&net, "vn", SENDER_ORG, std::slice::from_ref(&vn)).await?;
    let restart_to_ready_ms = restarted.elapsed().as_secs_f64() * 1e3;

    writeln!(progress, "KH up; draining {backlog} envelopes...")?;
    let mut gateways = vec![vn];
    let drained = drain_after_kh_starts(opts, &net, &mut gateways, backlog).await;
    for g in &mut gateways {
        g.stop();
    }
    let (drain, _) = drained?;
    let (vn, kh) = (&gateways[0], &gateways[1]);
    let report = BacklogReport {
        machine: machine(net.root(), &opts.gateway_log),
        senders: opts.senders,
        body_bytes: opts.body_bytes,
        backlog,
        submit,
        vn_peak_rss_with_backlog_mib: vn_peak,
        vn_disk_mib: vn_disk,
        vn_log_entries,
        restart_to_ready_ms,
        history,
        drain,
        vn_peak_rss_after_drain_mib: vn.peak_rss_mib,
        kh_peak_rss_after_drain_mib: kh.peak_rss_mib,
    };
    net.shutdown().await;
    Ok(report)
}

/// `history` envelopes end to end (KH up, the recipient acknowledging), in rounds of at
/// most 20,000 sealed ahead, so the backlog run starts on a long log. KH is stopped after.
async fn exchange_history(
    opts: &Options,
    net: &LocalNet,
    senders: &mut [OrgClient],
    vn: GatewayProcess,
    history: usize,
    progress: &mut (impl Write + Send),
) -> anyhow::Result<GatewayProcess> {
    let mut both = vec![vn, GatewayProcess::spawn(opts, net, "kh")?];
    let result = async {
        let mut recipient = ready_client(net, "kh", RECIPIENT_ORG, &both).await?;
        let (to, body) = (
            net.org_id("kh", RECIPIENT_ORG)?,
            body_of_size(opts.body_bytes),
        );
        let options = SendOptions::new("BENCH-HISTORY");
        let mut done = 0;
        while done < history {
            let n = (history - done).min(20_000).max(senders.len());
            let batches = preseal(senders, &to, &body, &options, n)?;
            timed_phase(senders, &mut recipient, batches, None, opts.timeout).await?;
            done += n;
            writeln!(
                progress,
                "  history: {done} of {history} exchanged end to end"
            )?;
        }
        anyhow::Ok(())
    }
    .await;
    both[1].stop();
    result?;
    Ok(both.swap_remove(0))
}

/// The number of entries in the log of the (stopped) gateway whose store is at `data_dir`.
fn log_entries(data_dir: &Path) -> anyhow::Result<u64> {
    use accord_gateway::store::sled::SledStore;
    let store = SledStore::open(data_dir, 8 << 20)?;
    Ok(store.log_size()?)
}

/// The backlog report as a table.
pub fn print_backlog(r: &BacklogReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "accord bench --backlog: {} envelopes of {} B, {} senders; {} cores ({}), gateways \
         logging at {}",
        r.backlog, r.body_bytes, r.senders, r.machine.cores, r.machine.cpu, r.machine.gateway_log
    )?;
    writeln!(
        out,
        "  submit while the peer is down   {:>8.0} msg/s  p50 {:.2} ms  p99 {:.2} ms",
        r.submit.throughput_per_sec, r.submit.p50_ms, r.submit.p99_ms
    )?;
    writeln!(
        out,
        "  VN peak RSS with the backlog    {:>8.1} MiB   store on disk {:.0} MiB",
        r.vn_peak_rss_with_backlog_mib, r.vn_disk_mib
    )?;
    writeln!(
        out,
        "  VN restart to ready             {:>8.0} ms    ({} log entries, {} queued)",
        r.restart_to_ready_ms, r.vn_log_entries, r.backlog
    )?;
    writeln!(
        out,
        "  drain after KH comes up         {:>8.0} msg/s  ({:.1} s for everything)",
        r.drain.throughput_per_sec, r.drain.seconds
    )?;
    let mib = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1} MiB"));
    writeln!(
        out,
        "  peak RSS after the drain        VN {}, KH {}",
        mib(r.vn_peak_rss_after_drain_mib),
        mib(r.kh_peak_rss_after_drain_mib)
    )
}

/// The report as a table.
pub fn print(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let m = &report.machine;
    writeln!(
        out,
        "accord bench: {} senders{}, {} B bodies, {} messages; {} cores ({}), run folder on \
         {}, {}",
        report.senders,
        report
            .offered_per_sec
            .map(|r| format!(" offering {r} msg/s"))
            .unwrap_or_default(),
        report.body_bytes,
        report.messages,
        m.cores,
        m.cpu,
        m.run_dir_filesystem,
        if report.attached {
            "gateways attached (running with their own log levels)".to_owned()
        } else {
            format!("gateways logging at {}", m.gateway_log)
        }
    )?;
    writeln!(
        out,
        "\n{:<34} {:>10} {:>9} {:>9} {:>9}",
        "", "msg/s", "p50 ms", "p99 ms", "p99.9 ms"
    )?;
    let row = |out: &mut dyn Write, name: &str, r: &Rate| {
        writeln!(
            out,
            "{:<34} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
            name, r.throughput_per_sec, r.p50_ms, r.p99_ms, r.p999_ms
        )
    };
    match (&report.submit_alone, &report.drain) {
        (Some(alone), Some(drain)) => {
            row(out, "submit alone (KH down)", &alone.rate)?;
            row(out, "drain once KH is up", drain)?;
        }
        _ => writeln!(
            out,
            "{:<34} not measured: the gateways were attached, not started here",
            "submit alone, drain"
        )?,
    }
    row(out, "submit -> accepted (durable)", &report.submit)?;
    row(out, "submit -> delivered and acked", &report.end_to_end)?;
    for s in &report.end_to_end_stages {
        writeln!(
            out,
            "  {:<32} {:>10} {:>9.2} {:>9.2} {:>9.2}",
            s.stage, "", s.p50_ms, s.p99_ms, s.p999_ms
        )?;
    }
    let n = &report.end_to_end_noise;
    let pct = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1}%"));
    writeln!(
        out,
        "  machine meanwhile: CPU stolen {}, some task (ours included) waiting for a CPU {} / for I/O {} of the time",
        pct(n.steal_percent),
        pct(n.cpu_pressure_percent),
        pct(n.io_pressure_percent)
    )?;
    row(out, "limit: bare mTLS echo", &report.limits.transport)?;
    row(out, "limit: store, durable tx", &report.limits.store)?;
    let c = &report.limits.crypto;
    writeln!(
        out,
        "{:<34} {:>10.0}   ({:.1} µs of crypto per message on {} cores; {:.0} to {:.0} in single rounds; {:.0} before the phase, {:.0} after)",
        "limit: crypto ceiling",
        c.ceiling_per_sec,
        c.us_per_message,
        c.cores,
        c.round_ceilings_per_sec[0],
        c.round_ceilings_per_sec[1],
        c.halves_per_sec[0],
        c.halves_per_sec[1]
    )?;
    for s in &c.stages {
        writeln!(
            out,
            "    {:<44} {} x {:>8.1} µs",
            s.stage, s.times_per_message, s.us_each
        )?;
    }
    writeln!(
        out,
        "    {:<44}     {:>8.1} µs (sender, before the timed phase)",
        "seal and sign", c.seal_us
    )?;
    writeln!(out, "\nCPU per message and memory")?;
    if let Some(alone) = &report.submit_alone {
        writeln!(
            out,
            "    submit alone: vn-gateway {:.0} µs CPU/msg, clients {:.0} µs CPU/msg",
            alone.vn_cpu_us_per_message, alone.bench_cpu_us_per_message
        )?;
    }
    for p in &report.processes {
        let rss = p
            .peak_rss_mib
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.0} MiB peak RSS"));
        writeln!(
            out,
            "    {:<28} {:>8.0} µs CPU/msg  {:>7.2} CPU s   {}",
            p.name, p.cpu_us_per_message, p.cpu_seconds, rss
        )?;
    }
    match report.disk_bytes_per_message {
        Some(bytes) => {
            let what = if report.attached {
                "on disk (stores' growth)"
            } else {
                "on disk (both gateways)"
            };
            writeln!(out, "    {what:<28} {bytes:>8.0} bytes/msg")?
        }
        None => writeln!(
            out,
            "    on disk: not measured (no data_dir in the attach file)"
        )?,
    }
    let r = &report.ratios;
    writeln!(out, "\nend to end as a fraction of each ceiling")?;
    writeln!(
        out,
        "    transport {:>6.1}%",
        r.end_to_end_vs_transport * 100.0
    )?;
    writeln!(
        out,
        "    crypto    {:>6.1}%",
        r.end_to_end_vs_crypto * 100.0
    )?;
    writeln!(out, "    store     {:>6.1}%", r.end_to_end_vs_store * 100.0)?;
    writeln!(
        out,
        "submit as a fraction of: transport {:.1}%, store {:.1}%",
        r.submit_vs_transport * 100.0,
        r.submit_vs_store * 100.0
    )?;
    writeln!(
        out,
        "nearest ceiling: {}; most CPU per message: {}",
        r.nearest_limit, r.busiest_process
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The halves timed before and after the end-to-end phase make one ceiling: each
    /// stage's mean, the work per message and the ceiling from them, the widest round spread.
    #[test]
    fn two_halves_of_the_crypto_rounds_make_one_ceiling() {
        let half = |verify: f64, sign: f64, spread: [f64; 2]| {
            let stage = |name: &str, times: u32, us_each: f64| CryptoStage {
                stage: name.into(),
                times_per_message: times,
                us_each,
            };
            let us_per_message = 3.0 * verify + 3.0 * sign;
            CryptoLimit {
                stages: vec![stage("verify", 3, verify), stage("sign", 3, sign)],
                us_per_message,
                cores: 2,
                ceiling_per_sec: 2e6 / us_per_message,
                round_ceilings_per_sec: spread,
                halves_per_sec: [2e6 / us_per_message; 2],
                seal_us: 100.0,
            }
        };
        let merged =
            half(60.0, 20.0, [3_000.0, 4_000.0]).merged(half(40.0, 30.0, [3_500.0, 4_500.0]));
        let each: Vec<f64> = merged.stages.iter().map(|s| s.us_each).collect();
        assert_eq!(each, [50.0, 25.0]);
        assert_eq!(merged.us_per_message, 225.0);
        assert_eq!(merged.ceiling_per_sec, 2e6 / 225.0);
        assert_eq!(merged.round_ceilings_per_sec, [3_000.0, 4_500.0]);
        assert_eq!(merged.halves_per_sec, [2e6 / 240.0, 2e6 / 210.0]);
        assert_eq!(merged.stages[0].times_per_message, 3);
    }

    #[test]
    fn bodies_have_the_size_asked_for() {
        use prost::Message;
        for size in [512, 1024, 8 * 1024, 64 * 1024, 1 << 20] {
            assert_eq!(body_of_size(size).encoded_len(), size, "{size}");
        }
    }

    #[test]
    fn steal_and_pressure_are_read_from_the_kernels_text() {
        let stat = "cpu  2915389 26961 385998 9454990 60446 0 39528 46607 0 0\n\
                    cpu0 1457694 13480 192999 4727495 30223 0 19764 23303 0 0\n\
                    cpu1 1457695 13481 192999 4727495 30223 0 19764 23304 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(
            parse_steal(stat),
            Some(Steal {
                ticks: 46607,
                cpus: 2
            })
        );
        assert_eq!(parse_steal("cpu  1 2 3\n"), None, "a kernel without steal");
        assert_eq!(parse_steal(""), None);
        let psi = "some avg10=0.39 avg60=1.43 avg300=2.20 total=5293099713\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_pressure_total(psi), Some(5_293_099_713));
        assert_eq!(parse_pressure_total("full avg10=0 total=5\n"), None);
        assert_eq!(parse_pressure_total("some avg10=0.39\n"), None);
    }

    /// An attached recipient may get mail the bench did not send while it runs: that is
    /// left in its inbox, neither acknowledged nor counted as the bench's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_the_bench_did_not_send_is_left_unacknowledged() {
        let net = LocalNet::builder()
            .country("vn", "hanoi", &["c02", "tayninh-police"])
            .country("kh", "phnom-penh", &["ahtd"])
            .start()
            .await
            .unwrap();
        let to = net.org_id("kh", "ahtd").unwrap();
        let body = body_of_size(256);
        let mut other = net.client("vn", "tayninh-police").await.unwrap();
        let foreign = other.send(&to, &body, &bench_options()).await.unwrap().id;
        let mut c02 = net.client("vn", "c02").await.unwrap();
        let mut ours = HashMap::new();
        for _ in 0..2 {
            let at = Instant::now();
            let id = c02.send(&to, &body, &bench_options()).await.unwrap().id;
            ours.insert(id, at);
        }
        let recipient = net.client("kh", "ahtd").await.unwrap();
        let delivered = tokio::time::timeout(
            Duration::from_secs(30),
            open_and_ack(recipient.clone(), 2, |id| {
                ours.get(id).map(|&at| (at, None))
            }),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(delivered.len(), 2);
        let mut recipient = recipient;
        let left: Vec<MessageId> = recipient
            .fetch(10)
            .await
            .unwrap()
            .iter()
            .map(|o| o.envelope.id())
            .collect();
        assert_eq!(
            left,
            vec![foreign],
            "only the other sender's message is left"
        );
        net.shutdown().await;
    }

    /// An attach file's paths are taken from its folder; what can be wrong with it is
    /// said before anything runs, naming the side; one gateway serving both sides is one
    /// process.
    #[test]
    fn attach_files_are_resolved_and_checked_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("attach.toml");
        let me = std::process::id();
        let side = |name: &str, id: &str, pid: u32| {
            format!(
                "[{name}]\norg = \"orgs/{name}\"\ngateway = \"127.0.0.1:7443\"\n\
                 gateway_id = \"{id}\"\nroot = \"ca.pem\"\ntrust = \"trust.json\"\n\
                 pid = {pid}\ndata_dir = \".\"\n"
            )
        };
        let gw = "spiffe://vn.accord/gateway/hanoi";
        let load = |text: String| {
            std::fs::write(&file, text).unwrap();
            Attach::load(&file)
        };
        // This test's own process is an `accord_client-…` executable; pid 1 is not one.
        let why = |r: anyhow::Result<Attach>| format!("{:#}", r.unwrap_err());
        let text = why(load(
            side("sender", "not an id", me) + &side("recipient", gw, me),
        ));
        assert!(
            text.contains("[sender]") && text.contains("gateway_id"),
            "{text}"
        );
        let text = why(load(side("sender", gw, me) + &side("recipient", gw, 1)));
        assert!(
            text.contains("[recipient]") && text.contains("pid 1 is not"),
            "{text}"
        );
        let unknown = side("sender", gw, me).replace("pid", "pidd") + &side("recipient", gw, me);
        assert!(why(load(unknown)).contains("pidd"));
        let no_pids = |t: String| {
            t.lines()
                .filter(|l| !l.starts_with("pid"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let missing_dir = no_pids(side("sender", gw, me) + &side("recipient", gw, me))
            .replace("data_dir = \".\"", "data_dir = \"nowhere\"");
        let text = why(load(missing_dir));
        assert!(
            text.contains("data_dir") && text.contains("nowhere"),
            "{text}"
        );

        let attach = load(no_pids(side("sender", gw, me) + &side("recipient", gw, me))).unwrap();
        assert_eq!(attach.sender.org, dir.path().join("orgs/sender"));
        assert_eq!(attach.recipient.trust, dir.path().join("trust.json"));
        assert_eq!(attach.data_dirs(), vec![dir.path().join(".")]);
        assert!(attach.processes().is_empty());
        let mut shared = attach.clone();
        (shared.sender.pid, shared.recipient.pid) = (Some(7), Some(7));
        assert_eq!(
            shared.processes(),
            vec![("gateway (attached, both sides)".to_owned(), 7)]
        );
        shared.recipient.pid = Some(8);
        assert_eq!(shared.processes().len(), 2);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let start = Instant::now();
        let done: Vec<(Instant, Duration)> = (1..=1000)
            .map(|i| (start + Duration::from_secs(2), Duration::from_millis(i)))
            .collect();
        let r = rate(start, &done);
        assert_eq!(r.p50_ms, 500.0);
        assert_eq!(r.p99_ms, 990.0);
        assert_eq!(r.p999_ms, 999.0);
        assert!((r.throughput_per_sec - 500.0).abs() < 1e-9);
    }
}
