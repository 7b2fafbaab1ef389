//! Load generator for the side-by-side peer benchmark (issue #6).
//!
//! Drives RabbitMQ (quorum queue, persistent messages, publisher confirms) or
//! NATS JetStream (file storage, JetStream publish acks) the way `accord bench`
//! drives Accord: N concurrent senders, each with exactly one message in
//! flight, then a consumer that acknowledges every message.
//!
//! Three phases, each preceded by an untimed warm-up:
//! 1. `publish`: N senders publish `count` messages; per-message
//!    publish -> confirm (RabbitMQ) / PubAck (NATS) latency.
//! 2. `consume`: one consumer drains those `count` messages with explicit
//!    per-message acks; throughput only.
//! 3. `end_to_end`: a fresh queue/stream, the consumer running while the N
//!    senders publish `count` more messages; latency is publish start ->
//!    message received and ack sent, throughput is `count` over the time from
//!    the first timed publish to the last timed message consumed.
//!
//! Prints one JSON object on stdout; progress goes to stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Barrier;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Broker {
    Rabbitmq,
    Nats,
}

#[derive(Parser, Debug)]
#[command(about = "RabbitMQ quorum / NATS JetStream load generator for the Accord peer benchmark")]
struct Args {
    /// Which broker to drive.
    #[arg(long, value_enum)]
    broker: Broker,
    /// amqps://user:pass@127.0.0.1:PORT/%2f or tls://127.0.0.1:PORT
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) that signed the broker's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long)]
    cert: PathBuf,
    /// Client private key (PEM, PKCS#8 or SEC1).
    #[arg(long)]
    key: PathBuf,
    /// Concurrent senders, one message in flight each.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Message body size in bytes (at least 16: a timestamp and a flag live in it).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Timed messages per phase.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Untimed warm-up messages per phase, in per cent of --count (at least 1 per sender).
    #[arg(long, default_value_t = 2.0)]
    warmup_percent: f64,
    /// Broker connections the senders are spread over (AMQP: one channel per sender).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Consumer prefetch (AMQP basic.qos) / pull batch size (NATS).
    #[arg(long, default_value_t = 512)]
    prefetch: u16,
    /// Skip the concurrent end-to-end phase.
    #[arg(long)]
    no_e2e: bool,
    /// Keep the queues/streams this run created (default: delete them at the end).
    #[arg(long)]
    keep: bool,
    /// Prefix of the queue / stream names; a unique suffix is appended.
    #[arg(long, default_value = "peerbench")]
    name: String,
}

const TS_LEN: usize = 8;
const FLAG_TIMED: u8 = 1;
const FLAG_WARMUP: u8 = 0;

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Body: 8-byte publish timestamp (ns since the Unix epoch), 1 flag byte, filler.
fn make_body(size: usize, flag: u8) -> Vec<u8> {
    let mut body = vec![0xA5u8; size];
    body[..TS_LEN].copy_from_slice(&now_nanos().to_be_bytes());
    body[TS_LEN] = flag;
    body
}

fn parse_body(body: &[u8]) -> Option<(u64, u8)> {
    if body.len() < TS_LEN + 1 {
        return None;
    }
    let mut ts = [0u8; TS_LEN];
    ts.copy_from_slice(&body[..TS_LEN]);
    Some((u64::from_be_bytes(ts), body[TS_LEN]))
}

fn new_hist() -> Histogram<u64> {
    // microseconds, 1 us .. 10 min, 3 significant figures
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    h.saturating_record(us);
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn latency_json(throughput: f64, h: &Histogram<u64>) -> Value {
    json!({
        "throughput_per_sec": round3(throughput),
        "p50_ms": round3(ms(h, 0.50)),
        "p99_ms": round3(ms(h, 0.99)),
        "p999_ms": round3(ms(h, 0.999)),
        "max_ms": round3(h.max() as f64 / 1000.0),
        "samples": h.len(),
    })
}

/// Splits `total` messages over `senders`, the remainder going to the first ones.
fn share(total: u64, senders: usize, i: usize) -> u64 {
    let n = senders as u64;
    total / n + u64::from((i as u64) < total % n)
}

fn warmup_count(args: &Args) -> u64 {
    let w = (args.count as f64 * args.warmup_percent / 100.0).ceil() as u64;
    w.max(args.senders as u64)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[loadgen] {}", msg.as_ref());
}

/// What every sender reports back.
struct SenderResult {
    hist: Histogram<u64>,
}

/// Result of one timed publish phase.
struct PublishPhase {
    elapsed: Duration,
    /// Instant the timed part started (all senders released together).
    started: Instant,
    hist: Histogram<u64>,
}

fn merge(results: Vec<SenderResult>) -> Histogram<u64> {
    let mut h = new_hist();
    for r in results {
        h.add(&r.hist).expect("same histogram bounds");
    }
    h
}

/// What a consumer saw.
struct Consumed {
    got: u64,
    /// Messages consumed before the drain clock starts (the warm-up, which the
    /// queue/stream holds ahead of the timed messages in the drain phase).
    skip: u64,
    /// Set when the `skip`-th message has been acked (or at start if skip is 0).
    clock: Option<Instant>,
    timed: u64,
    /// When the last timed message was acked.
    last_timed: Option<Instant>,
    /// When the last message was acked.
    last: Option<Instant>,
    /// Publish start -> received and ack sent, timed messages only.
    e2e: Histogram<u64>,
}

impl Consumed {
    fn new(skip: u64) -> Self {
        Consumed {
            got: 0,
            skip,
            clock: (skip == 0).then(Instant::now),
            timed: 0,
            last_timed: None,
            last: None,
            e2e: new_hist(),
        }
    }

    fn seen(&mut self, body: &[u8]) {
        self.got += 1;
        self.last = Some(Instant::now());
        if self.got == self.skip {
            self.clock = Some(Instant::now());
        }
        if let Some((ts, flag)) = parse_body(body) {
            if flag == FLAG_TIMED {
                self.timed += 1;
                self.last_timed = Some(Instant::now());
                record(
                    &mut self.e2e,
                    Duration::from_nanos(now_nanos().saturating_sub(ts)),
                );
            }
        }
    }

    /// Throughput of the messages consumed after the first `skip`.
    fn drain_throughput(&self) -> f64 {
        let (Some(start), Some(end)) = (self.clock, self.last) else {
            return f64::NAN;
        };
        let n = self.got.saturating_sub(self.skip);
        n as f64 / end.saturating_duration_since(start).as_secs_f64()
    }
}

/// End-to-end figures: latency of timed messages, throughput from the release of
/// the timed senders to the last timed message consumed.
fn e2e_json(who: &str, c: &Consumed, p: &PublishPhase, count: u64) -> Result<Value> {
    if c.timed != count {
        bail!(
            "end-to-end: consumed {} timed messages, expected {count}",
            c.timed
        );
    }
    let last = c
        .last_timed
        .ok_or_else(|| anyhow!("no timed message consumed"))?;
    let tput = count as f64 / last.saturating_duration_since(p.started).as_secs_f64();
    log(format!("{who}: end-to-end {tput:.0} msg/s"));
    Ok(latency_json(tput, &c.e2e))
}

// ---------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------

mod rabbit {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    pub async fn connect(args: &Args) -> Result<Connection> {
        let ca = std::fs::read_to_string(&args.ca).context("reading --ca")?;
        let cert = std::fs::read(&args.cert).context("reading --cert")?;
        let key = std::fs::read(&args.key).context("reading --key")?;
        let tls = OwnedTLSConfig {
            identity: Some(OwnedIdentity::PKCS8 { pem: cert, key }),
            cert_chain: Some(ca),
        };
        let runtime = lapin::runtime::default_runtime().map_err(|e| anyhow!("{e}"))?;
        Connection::connect_with_config(&args.url, ConnectionProperties::default(), tls, runtime)
            .await
            .with_context(|| format!("AMQPS connect to {}", redact(&args.url)))
    }

    fn redact(url: &str) -> String {
        match (url.find("://"), url.find('@')) {
            (Some(s), Some(a)) if a > s => format!("{}://***{}", &url[..s], &url[a..]),
            _ => url.to_string(),
        }
    }

    pub async fn declare_quorum(ch: &Channel, queue: &str) -> Result<()> {
        let mut qargs = FieldTable::default();
        qargs.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            qargs,
        )
        .await
        .with_context(|| format!("declaring quorum queue {queue}"))?;
        Ok(())
    }

    /// Opens one confirm-mode channel per sender, spread over the connections.
    async fn publisher_channels(conns: &[Connection], senders: usize) -> Result<Vec<Channel>> {
        let mut chans = Vec::with_capacity(senders);
        for i in 0..senders {
            let ch = conns[i % conns.len()].create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            chans.push(ch);
        }
        Ok(chans)
    }

    async fn publish_one(ch: &Channel, queue: &str, body: &[u8]) -> Result<()> {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            bail!("broker nacked a message");
        }
        if !confirm.is_ack() {
            // Confirmation::NotRequested: the channel is not in confirm mode.
            bail!("no publisher confirm for a message (channel not in confirm mode?)");
        }
        Ok(())
    }

    /// Runs `warmup` untimed then `count` timed publishes over the channels.
    async fn publish_phase(
        chans: &[Channel],
        queue: &str,
        size: usize,
        warmup: u64,
        count: u64,
    ) -> Result<PublishPhase> {
        let n = chans.len();
        let barrier = Arc::new(Barrier::new(n + 1));
        let mut tasks = Vec::with_capacity(n);
        for (i, ch) in chans.iter().enumerate() {
            let ch = ch.clone();
            let queue = queue.to_string();
            let barrier = barrier.clone();
            let w = share(warmup, n, i);
            let c = share(count, n, i);
            tasks.push(tokio::spawn(async move {
                for _ in 0..w {
                    publish_one(&ch, &queue, &make_body(size, FLAG_WARMUP)).await?;
                }
                barrier.wait().await;
                let mut hist = new_hist();
                for _ in 0..c {
                    let body = make_body(size, FLAG_TIMED);
                    let t0 = Instant::now();
                    publish_one(&ch, &queue, &body).await?;
                    record(&mut hist, t0.elapsed());
                }
                anyhow::Ok(SenderResult { hist })
            }));
        }
        barrier.wait().await;
        let started = Instant::now();
        let mut results = Vec::with_capacity(n);
        for t in tasks {
            results.push(t.await??);
        }
        Ok(PublishPhase {
            elapsed: started.elapsed(),
            started,
            hist: merge(results),
        })
    }

    /// Consumes exactly `n` messages with per-message manual acks.
    pub async fn consume_n(
        ch: &Channel,
        queue: &str,
        tag: &str,
        n: u64,
        skip: u64,
    ) -> Result<Consumed> {
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions {
                    no_ack: false,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut c = Consumed::new(skip);
        while c.got < n {
            let got = c.got;
            let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .map_err(|_| anyhow!("no delivery for 60 s after {got} of {n} messages"))?
                .ok_or_else(|| anyhow!("consumer stream ended after {got} of {n} messages"))??;
            delivery.ack(BasicAckOptions::default()).await?;
            c.seen(&delivery.data);
        }
        ch.basic_cancel(tag.into(), Default::default()).await?;
        Ok(c)
    }

    pub async fn run(args: &Args) -> Result<Value> {
        let suffix = format!("{}-{}", std::process::id(), now_nanos() % 1_000_000_000);
        let q_main = format!("{}-q-{}", args.name, suffix);
        let q_e2e = format!("{}-e2e-{}", args.name, suffix);
        let warmup = warmup_count(args);

        let mut conns = Vec::new();
        for _ in 0..args.connections.max(1) {
            conns.push(connect(args).await?);
        }
        let admin = conns[0].create_channel().await?;
        declare_quorum(&admin, &q_main).await?;
        let chans = publisher_channels(&conns, args.senders).await?;
        // The consumer gets its own connection, like a separate receiving client.
        let cconn = connect(args).await?;
        let cch = cconn.create_channel().await?;
        cch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;

        // Phase 1: publish + confirm.
        log(format!(
            "rabbitmq: publish phase, {} senders, {} warm-up + {} timed messages of {} B",
            args.senders, warmup, args.count, args.size
        ));
        let publish = publish_phase(&chans, &q_main, args.size, warmup, args.count).await?;
        let pub_tput = args.count as f64 / publish.elapsed.as_secs_f64();
        log(format!("rabbitmq: publish {pub_tput:.0} msg/s"));

        // Phase 2: drain. The warm-up messages were all confirmed before the
        // first timed one was published, so they are the first `warmup` in the
        // queue; the clock starts once they have been consumed.
        log("rabbitmq: consume phase");
        let drained = consume_n(&cch, &q_main, "drain", warmup + args.count, warmup).await?;
        if drained.timed != args.count {
            bail!(
                "drained {} timed messages, expected {}",
                drained.timed,
                args.count
            );
        }
        let consume_tput = drained.drain_throughput();
        log(format!("rabbitmq: consume {consume_tput:.0} msg/s"));

        // Phase 3: end to end, consumer running while the senders publish.
        let e2e = if args.no_e2e {
            Value::Null
        } else {
            log("rabbitmq: end-to-end phase");
            declare_quorum(&admin, &q_e2e).await?;
            let cch2 = cch.clone();
            let q = q_e2e.clone();
            let total = warmup + args.count;
            let consumer = tokio::spawn(async move { consume_n(&cch2, &q, "e2e", total, 0).await });
            let p = publish_phase(&chans, &q_e2e, args.size, warmup, args.count).await?;
            let c = consumer.await??;
            e2e_json("rabbitmq", &c, &p, args.count)?
        };

        if !args.keep {
            for q in [&q_main, &q_e2e] {
                let _ = admin
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for c in conns.iter().chain(std::iter::once(&cconn)) {
            let _ = c.close(200, "bye".into()).await;
        }

        Ok(json!({
            "system": "rabbitmq-quorum",
            "durable": true,
            "label": "durable reference: RabbitMQ quorum queue with publisher confirms",
            "senders": args.senders,
            "body_bytes": args.size,
            "messages": args.count,
            "warmup_messages": warmup,
            "connections": args.connections.max(1),
            "publish": latency_json(pub_tput, &publish.hist),
            "consume": {
                "throughput_per_sec": round3(consume_tput),
                "prefetch": args.prefetch,
            },
            "end_to_end": e2e,
            "queues": if args.keep { json!([q_main, q_e2e]) } else { json!([]) },
            "note": "RabbitMQ quorum queue (x-queue-type=quorum, durable), delivery_mode=2, \
                     publisher confirms, one message in flight per sender (one channel each), \
                     manual per-message acks; single node, so a confirm means the message is \
                     fsynced to the local Raft WAL",
        }))
    }
}

// ---------------------------------------------------------------------------
// NATS JetStream
// ---------------------------------------------------------------------------

mod nats {
    use super::*;

    pub const NATS_LABEL: &str =
        "non-durable upper reference: nats-server 2.9 acknowledges before fsync";
    use async_nats::jetstream::{self, consumer, stream};
    use bytes::Bytes;

    pub async fn connect(args: &Args) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(args.ca.clone())
            .add_client_certificate(args.cert.clone(), args.key.clone())
            .connect(args.url.as_str())
            .await
            .with_context(|| format!("NATS connect to {}", args.url))
    }

    /// Sender i publishes on connection i % connections: `warmup` untimed, then
    /// (after all senders are warm) its share of `count`, timed.
    async fn publish_phase(
        ctxs: &[jetstream::Context],
        subject: &str,
        args: &Args,
        warmup: u64,
    ) -> Result<PublishPhase> {
        let (senders, size, count) = (args.senders, args.size, args.count);
        let barrier = Arc::new(Barrier::new(senders + 1));
        let mut tasks = Vec::with_capacity(senders);
        for i in 0..senders {
            let js = ctxs[i % ctxs.len()].clone();
            let subject = subject.to_string();
            let barrier = barrier.clone();
            let w = share(warmup, senders, i);
            let c = share(count, senders, i);
            tasks.push(tokio::spawn(async move {
                for _ in 0..w {
                    let body = Bytes::from(make_body(size, FLAG_WARMUP));
                    js.publish(subject.clone(), body).await?.await?;
                }
                barrier.wait().await;
                let mut hist = new_hist();
                for _ in 0..c {
                    let body = Bytes::from(make_body(size, FLAG_TIMED));
                    let t0 = Instant::now();
                    // Waits for the PubAck: one message in flight per sender.
                    js.publish(subject.clone(), body).await?.await?;
                    record(&mut hist, t0.elapsed());
                }
                anyhow::Ok(SenderResult { hist })
            }));
        }
        barrier.wait().await;
        let started = Instant::now();
        let mut results = Vec::with_capacity(senders);
        for t in tasks {
            results.push(t.await??);
        }
        Ok(PublishPhase {
            elapsed: started.elapsed(),
            started,
            hist: merge(results),
        })
    }

    async fn consume_n(
        consumer: consumer::Consumer<consumer::pull::Config>,
        batch: usize,
        n: u64,
        skip: u64,
    ) -> Result<Consumed> {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .messages()
            .await?;
        let mut c = Consumed::new(skip);
        while c.got < n {
            let got = c.got;
            let msg = tokio::time::timeout(Duration::from_secs(60), messages.next())
                .await
                .map_err(|_| anyhow!("no message for 60 s after {got} of {n}"))?
                .ok_or_else(|| anyhow!("message stream ended after {got} of {n}"))?
                .map_err(|e| anyhow!("pull: {e}"))?;
            msg.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
            c.seen(&msg.payload);
        }
        Ok(c)
    }

    async fn make_stream(js: &jetstream::Context, name: &str) -> Result<stream::Stream> {
        js.create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{name}.msgs")],
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {name}: {e}"))
    }

    async fn make_consumer(
        stream: &stream::Stream,
        name: &str,
    ) -> Result<consumer::Consumer<consumer::pull::Config>> {
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.to_string()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating consumer {name}: {e}"))
    }

    pub async fn run(args: &Args) -> Result<Value> {
        let suffix = format!("{}_{}", std::process::id(), now_nanos() % 1_000_000_000);
        let s_main = format!("{}_s_{}", args.name.replace(['-', '.'], "_"), suffix);
        let s_e2e = format!("{}_e2e_{}", args.name.replace(['-', '.'], "_"), suffix);
        let warmup = warmup_count(args);
        let batch = usize::from(args.prefetch.max(1));

        let mut clients = Vec::new();
        for _ in 0..args.connections.max(1) {
            clients.push(connect(args).await?);
        }
        let ctxs: Vec<_> = clients.iter().map(|c| jetstream::new(c.clone())).collect();
        let consumer_client = connect(args).await?;
        let cjs = jetstream::new(consumer_client.clone());

        make_stream(&ctxs[0], &s_main).await?;
        log(format!(
            "nats ({NATS_LABEL}): publish phase, {} senders, {} warm-up + {} timed messages of {} B",
            args.senders, warmup, args.count, args.size
        ));
        let publish = publish_phase(&ctxs, &format!("{s_main}.msgs"), args, warmup).await?;
        let pub_tput = args.count as f64 / publish.elapsed.as_secs_f64();
        log(format!("nats: publish {pub_tput:.0} msg/s"));

        // Warm-up messages were all acked before the timed ones were sent, so they
        // are the first `warmup` in the stream; the clock starts after them.
        log("nats: consume phase");
        let c_main = make_consumer(&cjs.get_stream(&s_main).await?, "drain").await?;
        let drained = consume_n(c_main, batch, warmup + args.count, warmup).await?;
        if drained.timed != args.count {
            bail!(
                "drained {} timed messages, expected {}",
                drained.timed,
                args.count
            );
        }
        let consume_tput = drained.drain_throughput();
        log(format!("nats: consume {consume_tput:.0} msg/s"));

        let e2e = if args.no_e2e {
            Value::Null
        } else {
            log("nats: end-to-end phase");
            make_stream(&ctxs[0], &s_e2e).await?;
            let c = make_consumer(&cjs.get_stream(&s_e2e).await?, "e2e").await?;
            let total = warmup + args.count;
            let consumer = tokio::spawn(async move { consume_n(c, batch, total, 0).await });
            let p = publish_phase(&ctxs, &format!("{s_e2e}.msgs"), args, warmup).await?;
            let c = consumer.await??;
            e2e_json("nats", &c, &p, args.count)?
        };

        if !args.keep {
            for s in [&s_main, &s_e2e] {
                let _ = ctxs[0].delete_stream(s).await;
            }
        }
        for c in clients.iter().chain(std::iter::once(&consumer_client)) {
            let _ = c.flush().await;
        }

        Ok(json!({
            "system": "nats-jetstream",
            "durable": false,
            "senders": args.senders,
            "body_bytes": args.size,
            "messages": args.count,
            "warmup_messages": warmup,
            "connections": args.connections.max(1),
            "publish": latency_json(pub_tput, &publish.hist),
            "consume": {
                "throughput_per_sec": round3(consume_tput),
                "pull_batch": batch,
            },
            "end_to_end": e2e,
            "streams": if args.keep { json!([s_main, s_e2e]) } else { json!([]) },
            "label": NATS_LABEL,
            "note": format!("{NATS_LABEL}. JetStream file-storage stream, R1; js.publish waits \
                     for the PubAck, one message in flight per sender; pull consumer with \
                     explicit per-message acks"),
        }))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.senders == 0 {
        bail!("--senders must be at least 1");
    }
    if args.size < TS_LEN + 1 {
        bail!("--size must be at least {} bytes", TS_LEN + 1);
    }
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match args.broker {
            Broker::Rabbitmq => rabbit::run(&args).await,
            Broker::Nats => nats::run(&args).await,
        }
    })?;
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
