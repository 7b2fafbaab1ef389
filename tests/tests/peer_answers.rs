//! VN's forwarder against a stand-in for KH's gateway that answers each item as the test
//! says: the outbox's side of retries and refusals. The stand-in holds KH's real gateway
//! certificate and receipt key and listens where KH's gateway listened, so VN's forwarder
//! dials it over the same mutual TLS, and a received receipt it signs verifies at VN.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accord_client::org::SendOptions;
use accord_gateway::store::{Op, Queue, QueueEntry, QueueKey, Tx};
use accord_proto::crypto::SigningKey;
use accord_proto::ids::MessageId;
use accord_proto::pb::{self, Stage};
use accord_tests::{
    alert, alert_received_at_kh, expired_at_vn, fetch_n, short_lived_alert, until_expiry,
    wait_stage, TestNet,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

const KH_GATEWAY: &str = "spiffe://kh.accord/gateway/phnom-penh";

/// How the stand-in answers an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// `retry_reason`: take it again later.
    Retry,
    /// `retry_reason` "quota full": the peer's store takes nothing now.
    QuotaFull,
    /// `retry_reason` "storage error": the peer's store failed, it may have kept it or not.
    StorageError,
    /// `refused`: never send it again.
    Refuse,
    /// No field set, as a gateway from before `refused` answers a refusal.
    Nothing,
    /// For an envelope, a RECEIVED receipt signed with KH's key; for a receipt, stored.
    Take,
    /// For an envelope, a RECEIVED receipt that claims KH's key but is signed with another.
    Forge,
    /// For an envelope, a REJECTED receipt (expired) signed with KH's key.
    Reject,
    /// `retry_reason`: the peer lacks the envelope's attachment chunks.
    ChunksMissing,
}

struct Script {
    receipts: Answer,
    envelopes: Answer,
    /// Answers for the envelopes of these messages, over `envelopes`.
    envelope_of: HashMap<MessageId, Answer>,
    /// Every item offered, in order: whether it was a receipt, the message it names, and
    /// when.
    offered: Vec<(bool, MessageId, std::time::Instant)>,
    /// Per Deliver call, the encoded size of each envelope it carried.
    calls: Vec<Vec<usize>>,
    /// How long each Deliver call takes before it is answered.
    delay: Duration,
    /// The Deliver call (counted from 1, as they arrive) answered UNAVAILABLE after its
    /// delay, its items not looked at.
    fail_call: Option<usize>,
    /// The Deliver call (counted from 1, as they arrive) never answered.
    hang_call: Option<usize>,
    /// Deliver calls being answered now, and the most there were at once.
    out: usize,
    /// Questions about held chunks asked so far; none is ever answered.
    chunk_states: usize,
    /// How long each directory exchange takes before it is refused.
    offer_delay: Duration,
    most_out: usize,
    /// Each Deliver call answered: when it came, when it was answered, and whether it
    /// answered an envelope "quota full".
    answered: Vec<(std::time::Instant, std::time::Instant, bool)>,
    /// Envelopes answered `Take` so far, and how many it takes before its store is full
    /// (then it answers them `QuotaFull`).
    taken: Vec<MessageId>,
    quota: usize,
}

#[derive(Clone)]
struct StandIn {
    key: Arc<SigningKey>,
    script: Arc<Mutex<Script>>,
    /// Its server, stopped by [`StandIn::stop`].
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    stopping: Arc<tokio::sync::Notify>,
}

impl StandIn {
    /// Stops serving and closes its connections: the peer is down.
    async fn stop(&self) {
        self.stopping.notify_one();
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("the stand-in stops")
                .unwrap();
        }
    }

    fn answer(&self, receipts: Answer, envelopes: Answer) {
        let mut s = self.script.lock().unwrap();
        s.receipts = receipts;
        s.envelopes = envelopes;
    }

    /// Answers the envelope of message `id` with `answer`, whatever the others get.
    fn answer_envelope_of(&self, id: MessageId, answer: Answer) {
        self.script.lock().unwrap().envelope_of.insert(id, answer);
    }

    /// When message `id`'s envelope was offered.
    fn envelope_offers(&self, id: &MessageId) -> Vec<std::time::Instant> {
        let s = self.script.lock().unwrap();
        s.offered
            .iter()
            .filter(|(r, o, _)| !r && o == id)
            .map(|(.., at)| *at)
            .collect()
    }

    /// Answers each Deliver call after `delay`, and the `fail_call`th UNAVAILABLE.
    fn slow(&self, delay: Duration, fail_call: Option<usize>) {
        let mut s = self.script.lock().unwrap();
        s.delay = delay;
        s.fail_call = fail_call;
    }

    /// Takes `n` envelopes more, then answers them "quota full".
    fn quota(&self, n: usize) {
        let mut s = self.script.lock().unwrap();
        s.quota = s.taken.len().saturating_add(n);
    }

    /// The envelopes it answered `Take`, in that order.
    fn envelopes_taken(&self) -> Vec<MessageId> {
        self.script.lock().unwrap().taken.clone()
    }

    /// Each Deliver call answered: when it came, when it was answered, and whether it
    /// answered "quota full".
    fn answered(&self) -> Vec<(std::time::Instant, std::time::Instant, bool)> {
        self.script.lock().unwrap().answered.clone()
    }

    /// Refuses each directory offer after `delay`.
    fn slow_offers(&self, delay: Duration) {
        self.script.lock().unwrap().offer_delay = delay;
    }

    /// Never answers the `n`th Deliver call (counted from 1).
    fn hang(&self, n: usize) {
        self.script.lock().unwrap().hang_call = Some(n);
    }

    /// The most Deliver calls it was answering at once.
    fn most_out(&self) -> usize {
        self.script.lock().unwrap().most_out
    }

    /// Per Deliver call so far, the encoded size of each envelope it carried.
    fn calls(&self) -> Vec<Vec<usize>> {
        self.script.lock().unwrap().calls.clone()
    }

    /// When each message's receipt was offered.
    fn receipts_offered(&self) -> HashMap<MessageId, Vec<std::time::Instant>> {
        let mut seen: HashMap<_, Vec<_>> = HashMap::new();
        for (receipt, id, at) in &self.script.lock().unwrap().offered {
            if *receipt {
                seen.entry(*id).or_default().push(*at);
            }
        }
        seen
    }

    fn envelopes_offered(&self) -> Vec<MessageId> {
        let s = self.script.lock().unwrap();
        s.offered
            .iter()
            .filter(|(r, ..)| !r)
            .map(|(_, id, _)| *id)
            .collect()
    }

    fn result(&self, item: pb::peer_item::Item) -> pb::PeerResult {
        let (receipt, id, envelope) = match item {
            pb::peer_item::Item::Receipt(r) => {
                let body = pb::ReceiptBody::decode(r.body.as_slice()).unwrap();
                (true, MessageId::from_slice(&body.message_id).unwrap(), None)
            }
            pb::peer_item::Item::Envelope(env) => {
                let sealed = accord_proto::envelope::SealedEnvelope::from_wire(
                    env,
                    &accord_proto::envelope::Limits::default(),
                )
                .unwrap();
                let header = pb::Header::decode(sealed.header().as_bytes()).unwrap();
                let id = MessageId::from_slice(&header.message_id).unwrap();
                (false, id, Some(sealed.hash()))
            }
        };
        let answer = {
            let mut s = self.script.lock().unwrap();
            s.offered.push((receipt, id, std::time::Instant::now()));
            if receipt {
                s.receipts
            } else {
                match s.envelope_of.get(&id).copied().unwrap_or(s.envelopes) {
                    Answer::Take if s.taken.len() >= s.quota => Answer::QuotaFull,
                    Answer::Take => {
                        s.taken.push(id);
                        Answer::Take
                    }
                    other => other,
                }
            }
        };
        match (answer, envelope) {
            (Answer::Retry, _) => pb::PeerResult {
                retry_reason: "signer not known yet".into(),
                ..Default::default()
            },
            (Answer::ChunksMissing, _) => pb::PeerResult {
                retry_reason: accord_gateway::transfer::CHUNKS_MISSING.into(),
                ..Default::default()
            },
            (Answer::QuotaFull, _) => pb::PeerResult {
                retry_reason: accord_gateway::service::RETRY_QUOTA_FULL.into(),
                ..Default::default()
            },
            (Answer::StorageError, _) => pb::PeerResult {
                retry_reason: accord_gateway::service::RETRY_STORAGE_ERROR.into(),
                ..Default::default()
            },
            (Answer::Refuse, _) => pb::PeerResult {
                refused: "the stand-in refuses it".into(),
                ..Default::default()
            },
            (Answer::Nothing, _) | (Answer::Take | Answer::Forge | Answer::Reject, None) => {
                pb::PeerResult::default()
            }
            (Answer::Take | Answer::Forge | Answer::Reject, Some(hash)) => {
                let (stage, reason) = match answer {
                    Answer::Reject => (Stage::Rejected, pb::RejectReason::Expired),
                    _ => (Stage::Received, pb::RejectReason::Unspecified),
                };
                let body = pb::ReceiptBody {
                    envelope_hash: hash.0.to_vec(),
                    message_id: id.as_bytes().to_vec(),
                    stage: stage as i32,
                    signer: KH_GATEWAY.into(),
                    signer_key_id: self.key.key_id().into(),
                    at_ms: accord_tests::now_ms(),
                    log_index: 0,
                    reason: reason as i32,
                };
                let key = match answer {
                    Answer::Forge => &SigningKey::generate(self.key.key_id()).unwrap(),
                    _ => &*self.key,
                };
                pb::PeerResult {
                    receipt: Some(accord_proto::receipt::sign(&body, key)),
                    ..Default::default()
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::peer_link_server::PeerLink for StandIn {
    async fn deliver(
        &self,
        req: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverResponse>, Status> {
        let req = req.into_inner();
        let envelopes = req.items.iter().filter_map(|i| match &i.item {
            Some(pb::peer_item::Item::Envelope(e)) => Some(e.encoded_len()),
            _ => None,
        });
        let call = envelopes.collect();
        let (delay, fail) = {
            let mut s = self.script.lock().unwrap();
            s.calls.push(call);
            s.out += 1;
            s.most_out = s.most_out.max(s.out);
            let hang = s.hang_call == Some(s.calls.len());
            let delay = if hang {
                Duration::from_secs(3600)
            } else {
                s.delay
            };
            (delay, s.fail_call == Some(s.calls.len()))
        };
        let came = std::time::Instant::now();
        tokio::time::sleep(delay).await;
        self.script.lock().unwrap().out -= 1;
        if fail {
            return Err(Status::unavailable("the stand-in drops this call"));
        }
        let results: Vec<pb::PeerResult> = req
            .items
            .into_iter()
            .map(|i| self.result(i.item.unwrap()))
            .collect();
        let full = results
            .iter()
            .any(|r| r.retry_reason == accord_gateway::service::RETRY_QUOTA_FULL);
        let answered = (came, std::time::Instant::now(), full);
        self.script.lock().unwrap().answered.push(answered);
        Ok(Response::new(pb::DeliverResponse { results }))
    }
    async fn witness(
        &self,
        _: Request<pb::WitnessRequest>,
    ) -> Result<Response<pb::WitnessResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn prove_events(
        &self,
        _: Request<pb::ProveEventsRequest>,
    ) -> Result<Response<pb::ProveEventsResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn exchange_directories(
        &self,
        _: Request<pb::ExchangeDirectoriesRequest>,
    ) -> Result<Response<pb::ExchangeDirectoriesResponse>, Status> {
        let delay = self.script.lock().unwrap().offer_delay;
        tokio::time::sleep(delay).await;
        Err(Status::unimplemented("stand-in"))
    }
    async fn put_chunks(
        &self,
        _: Request<tonic::Streaming<pb::ChunkUpload>>,
    ) -> Result<Response<pb::ChunkState>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn get_chunk_state(
        &self,
        _: Request<pb::ChunkStateRequest>,
    ) -> Result<Response<pb::ChunkState>, Status> {
        self.script.lock().unwrap().chunk_states += 1;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Err(Status::unimplemented("stand-in"))
    }
}

/// Stops KH's gateway and serves the stand-in in its place ([`stand_in_for_kh`]).
async fn replace_kh(net: &mut TestNet, receipts: Answer, envelopes: Answer) -> StandIn {
    net.stop_gateway("kh").await.unwrap();
    stand_in_for_kh(net, receipts, envelopes, HashMap::new()).await
}

/// Serves the stand-in where KH's stopped gateway listened for peers, with KH's
/// credentials, admitting only VN's gateway; it answers receipts and envelopes as said, and
/// the envelopes of the messages in `envelope_of` as it says.
async fn stand_in_for_kh(
    net: &TestNet,
    receipts: Answer,
    envelopes: Answer,
    envelope_of: HashMap<MessageId, Answer>,
) -> StandIn {
    use accord_gateway::tls::{self, Admission, CountryRoots, Credentials};
    let addr: SocketAddr = net.peer_address("kh").unwrap();
    let pki = net.root().join("pki");
    let creds = Credentials::load(
        &pki.join("kh/gateway/cert.pem"),
        &pki.join("kh/gateway/key.pem"),
    )
    .unwrap();
    let mut roots = CountryRoots::default();
    roots
        .add("vn".parse().unwrap(), &pki.join("vn/ca.pem"))
        .unwrap();
    let admit = Admission::Exactly(vec![net.gateway_address("vn").unwrap().id]);
    let config = tls::server_config(&creds, roots, admit).unwrap();
    let keys = accord_gateway::server::load_key_file(&pki.join("kh/gateway/keys.json")).unwrap();
    let stand_in = StandIn {
        key: Arc::new(keys.signing),
        script: Arc::new(Mutex::new(Script {
            receipts,
            envelopes,
            envelope_of,
            offered: Vec::new(),
            calls: Vec::new(),
            delay: Duration::ZERO,
            fail_call: None,
            hang_call: None,
            out: 0,
            chunk_states: 0,
            offer_delay: Duration::ZERO,
            most_out: 0,
            answered: Vec::new(),
            taken: Vec::new(),
            quota: usize::MAX,
        })),
        server: Arc::new(Mutex::new(None)),
        stopping: Arc::new(tokio::sync::Notify::new()),
    };
    let listener = accord_client::localnet::bind_again(addr).await.unwrap();
    let incoming = accord_gateway::listener::incoming(listener, config, "stand-in");
    let service = pb::peer_link_server::PeerLinkServer::new(stand_in.clone());
    let stopping = stand_in.stopping.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stopping.notified())
            .await
            .unwrap();
    });
    *stand_in.server.lock().unwrap() = Some(server);
    stand_in
}

async fn net() -> TestNet {
    accord_tests::vn_and_kh().start().await.unwrap()
}

/// [`net`] with forwarders that send `batch` entries at once (and so hold back at most 16
/// times that many in place).
async fn net_with_batches_of(batch: usize) -> TestNet {
    let net = accord_tests::vn_and_kh().forwarder_batch(batch);
    net.start().await.unwrap()
}

/// Stops KH's gateway, then has VN C02 (`c02`) send `n` alerts to KH AHTD: they wait
/// in VN's outbox in that order. Their ids.
async fn queued_while_kh_is_down(
    net: &mut TestNet,
    c02: &mut accord_client::org::OrgClient,
    n: usize,
) -> Vec<MessageId> {
    net.stop_gateway("kh").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let mut sent = Vec::new();
    for i in 0..n {
        let what = alert(&format!("queued {i}"));
        let s = c02.send(&to, &what, &SendOptions::new("P1")).await.unwrap();
        sent.push(s.id);
    }
    sent
}

/// KH AHTD sends `n` alerts to VN C02; C02 takes them in and acknowledges them only once
/// KH's gateway is replaced by the stand-in, so that their `n` DELIVERED receipts go to the
/// stand-in, which answers them with `answer`. Receipts are URGENT: they go ahead of ROUTINE
/// and later URGENT envelopes.
async fn receipts_for_stand_in(
    net: &mut TestNet,
    n: usize,
    answer: Answer,
) -> (StandIn, Vec<MessageId>) {
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("vn", "c02").unwrap();
    for i in 0..n {
        ahtd.send(&to, &alert(&format!("alert {i}")), &SendOptions::new("P1"))
            .await
            .unwrap();
    }
    let got = fetch_n(&mut c02, n).await.unwrap();
    assert_eq!(got.len(), n);
    let stand_in = replace_kh(net, answer, Answer::Take).await;
    for r in c02.ack_many(&got).await.unwrap() {
        r.unwrap();
    }
    (stand_in, got.iter().map(|o| o.envelope.id()).collect())
}

/// The entries of VN's outbox for KH, in the order they go.
fn vn_outbox_entries(net: &TestNet) -> Vec<(QueueKey, QueueEntry)> {
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    vn.store
        .queue(&Queue::Outbox("kh".parse().unwrap()), 10_000)
        .unwrap()
}

/// Starts the net `net` builds; VN C02 queues `n` alerts for KH while KH is down, and the
/// stand-in serves in KH's place, taking everything until told otherwise. The alerts' ids.
async fn stand_in_after(
    net: accord_client::localnet::Builder,
    n: usize,
) -> (TestNet, StandIn, Vec<MessageId>) {
    let mut net = net.start().await.unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let queued = queued_while_kh_is_down(&mut net, &mut c02, n).await;
    let stand_in = stand_in_for_kh(&net, Answer::Take, Answer::Take, HashMap::new()).await;
    (net, stand_in, queued)
}

/// Waits (up to 4 s) until `done` holds.
async fn eventually(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receipts and envelopes waiting in VN's outbox for KH.
fn vn_outbox(net: &TestNet) -> (usize, usize) {
    let entries = vn_outbox_entries(net);
    let receipts = entries.iter().filter(|(_, e)| e.receipt.is_some()).count();
    (receipts, entries.len() - receipts)
}

/// Waits (up to 10 s) until VN's outbox for KH is empty; fails if it never is.
async fn outbox_empties(net: &TestNet) {
    for _ in 0..100 {
        if vn_outbox(net) == (0, 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(vn_outbox(net), (0, 0));
}

/// The most times one entry can be offered in `span` from its first offer, with this net's
/// forwarder backoff (50 ms doubling to 1 s, jitter into the upper half: at least 25, 50,
/// 100, 200, 400, then 500 ms between offers).
fn offers_within(span: Duration) -> usize {
    let (mut offers, mut at, mut gap) = (1, Duration::ZERO, Duration::from_millis(25));
    while at + gap <= span {
        at += gap;
        offers += 1;
        gap = (gap * 2).min(Duration::from_millis(500));
    }
    offers
}

/// A batch closes at the first envelope that brings it to `batch_bytes`, as it does at
/// `batch` items: a backlog of large envelopes goes in calls of bounded size, each envelope
/// once, and with one call out at a time in the outbox's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stops_at_its_bytes_as_well_as_at_its_count() {
    let (net, stand_in, queued) = stand_in_after(
        accord_tests::vn_and_kh()
            .forwarder_batch_bytes(2_000)
            .forwarder_in_flight(1),
        12,
    )
    .await;
    outbox_empties(&net).await;
    assert_eq!(stand_in.envelopes_offered(), queued, "in order, each once");
    assert_eq!(stand_in.most_out(), 1);
    let calls: Vec<_> = stand_in
        .calls()
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect();
    let one = calls[0][0];
    assert!(one < 2_000, "an alert's envelope is {one} bytes");
    for call in &calls {
        let (last, before) = call.split_last().unwrap();
        let before: usize = before.iter().sum();
        assert!(before < 2_000, "{calls:?}");
        assert!(
            before + last >= 2_000 || call == calls.last().unwrap(),
            "{calls:?}"
        );
    }
    assert!(calls.len() >= 12 * one / (2_000 + one), "{calls:?}");
    net.shutdown().await;
}

fn sorted(mut ids: Vec<MessageId>) -> Vec<MessageId> {
    ids.sort();
    ids
}

/// VN queues `n` alerts for KH while it is down; then a stand-in that answers each Deliver
/// call after `delay` (the `fail_call`th UNAVAILABLE) takes them from a forwarder that keeps
/// up to `in_flight` calls of 4 out. Returns once VN's outbox is empty.
async fn drained_by_a_slow_stand_in(
    n: usize,
    in_flight: usize,
    delay: Duration,
    fail_call: Option<usize>,
) -> (StandIn, Vec<MessageId>) {
    let (net, stand_in, queued) = stand_in_after(
        accord_tests::vn_and_kh()
            .forwarder_batch(4)
            .forwarder_in_flight(in_flight),
        n,
    )
    .await;
    stand_in.slow(delay, fail_call);
    outbox_empties(&net).await;
    net.shutdown().await;
    (stand_in, queued)
}

/// While a full batch is out, the next goes before the peer answers it, up to
/// `forwarder.in_flight` calls at once; each envelope is taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_go_while_the_one_before_is_answered_up_to_in_flight() {
    for in_flight in [1, 2, 3] {
        let (stand_in, queued) =
            drained_by_a_slow_stand_in(20, in_flight, Duration::from_millis(150), None).await;
        assert_eq!(stand_in.most_out(), in_flight, "in_flight = {in_flight}");
        assert_eq!(
            sorted(stand_in.envelopes_offered()),
            sorted(queued),
            "each once"
        );
        let calls = stand_in.calls();
        assert!(calls.iter().all(|c| c.len() <= 4), "{calls:?}");
    }
}

/// A call that fails while another is out: the other is still settled, and the failed
/// call's entries stay in the outbox and go again. Nothing is lost, nothing taken twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_fails_beside_another_loses_nothing_and_repeats_nothing_taken() {
    // The first call goes alone (the link is not known to work yet); the second and third
    // are out together, and whichever arrives second fails.
    let (stand_in, queued) =
        drained_by_a_slow_stand_in(20, 2, Duration::from_millis(150), Some(2)).await;
    assert_eq!(stand_in.most_out(), 2);
    // The stand-in looked at no item of the failed call: each envelope it took, once.
    assert_eq!(sorted(stand_in.envelopes_offered()), sorted(queued));
    let calls = stand_in.calls();
    assert_eq!(calls[1].len(), 4, "the failed call was a full batch");
    assert_eq!(
        calls.iter().map(Vec::len).sum::<usize>(),
        20 + 4,
        "{calls:?}"
    );
}

/// A gateway stopping while it pushes an envelope's attachment chunks stops the push too:
/// nothing of it keeps the store open, and the gateway starts again at once in the same
/// process (a store still open is waited for, then refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_stops_its_attachment_pushes() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let scan = files.path().join("scan.pdf");
    std::fs::write(&scan, vec![7u8; 100_000]).unwrap();
    let outbox = accord_client::attach::Outbox::open(&net.org_dir("vn", "c02").unwrap()).unwrap();
    let letter = pb::Body {
        form: Some(pb::body::Form::Correspondence(pb::Correspondence {
            text: "with a scan".into(),
            attachments: vec![],
        })),
    };
    let progress: accord_client::attach::ProgressFn = Arc::new(|_: &_| {});
    c02.send_files(
        &net.org_id("kh", "ahtd").unwrap(),
        &letter,
        &SendOptions::new("P1"),
        &[(scan, "application/pdf".to_owned())],
        &outbox,
        progress,
    )
    .await
    .unwrap();
    // The stand-in lacks the chunks, and never answers what it holds: the push hangs.
    let stand_in = stand_in_for_kh(&net, Answer::Take, Answer::ChunksMissing, HashMap::new()).await;
    eventually(|| stand_in.script.lock().unwrap().chunk_states > 0).await;
    assert_eq!(
        stand_in.script.lock().unwrap().chunk_states,
        1,
        "a push is out"
    );
    net.stop_gateway("vn").await.unwrap();
    // A push left running holds the store, and this start is refused once its wait for
    // the store's lock runs out.
    net.start_gateway("vn").await.unwrap();
    net.shutdown().await;
}

/// A gateway told to stop while a call is out waits for the peer's answer and settles it:
/// what the peer took is not offered again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_settles_the_call_it_has_out() {
    // Checkpoints far apart: the only calls the stand-in sees are the forwarder's.
    let (mut net, stand_in, queued) =
        stand_in_after(accord_tests::vn_and_kh().checkpoint_interval_ms(600_000), 3).await;
    // The stand-in answers the call slowly; the stop comes while it is out.
    stand_in.slow(Duration::from_millis(700), None);
    eventually(|| !stand_in.calls().is_empty()).await;
    assert!(stand_in.answered().is_empty(), "the call is out");
    net.stop_gateway("vn").await.unwrap();
    assert_eq!(sorted(stand_in.envelopes_taken()), sorted(queued.clone()));
    net.start_gateway("vn").await.unwrap();
    assert_eq!(vn_outbox(&net), (0, 0), "settled before the stop");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stand_in.envelopes_offered().len(), 3, "none offered again");
    net.shutdown().await;
}

/// A stop while the peer holds a call unanswered waits for it no longer than the
/// forwarder's grace (10 s), not the call's own limit (a minute): the entries stay in the
/// outbox and go at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_a_call_the_peer_never_answers_no_longer_than_its_grace() {
    let (mut net, stand_in, queued) =
        stand_in_after(accord_tests::vn_and_kh().checkpoint_interval_ms(600_000), 3).await;
    stand_in.hang(1);
    eventually(|| !stand_in.calls().is_empty()).await;
    assert_eq!(stand_in.calls().len(), 1, "the call is out");
    let stopping = std::time::Instant::now();
    net.stop_gateway("vn").await.unwrap();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(20), "the stop took {took:?}");
    net.start_gateway("vn").await.unwrap();
    outbox_empties(&net).await;
    assert_eq!(sorted(stand_in.envelopes_taken()), sorted(queued));
    net.shutdown().await;
}

/// A call the peer never answers, its connection open, counts as failed after
/// `call_timeout_ms`: the link does not hang on it, and its entries go again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_peer_never_answers_fails_after_its_timeout_and_goes_again() {
    let (net, stand_in, queued) =
        stand_in_after(accord_tests::vn_and_kh().forwarder_call_timeout_ms(300), 3).await;
    stand_in.hang(1);
    outbox_empties(&net).await;
    assert_eq!(sorted(stand_in.envelopes_taken()), sorted(queued));
    assert!(
        stand_in.calls().len() >= 2,
        "the unanswered call went again"
    );
    net.shutdown().await;
}

/// A peer that never answers the directory offer sent before a call holds the link no
/// longer than an unanswered call: the envelopes go after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_offer_the_peer_never_answers_does_not_hold_the_link() {
    let (net, stand_in, queued) = stand_in_after(
        accord_tests::vn_and_kh()
            .forwarder_call_timeout_ms(300)
            .checkpoint_interval_ms(600_000),
        3,
    )
    .await;
    stand_in.slow_offers(Duration::from_secs(3600));
    outbox_empties(&net).await;
    assert_eq!(sorted(stand_in.envelopes_taken()), sorted(queued));
    net.shutdown().await;
}

/// A link that worked, then finds the peer's store full, goes back to one call at a time,
/// one per backoff: two calls out at once would offer the full store twice as much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_link_that_finds_the_peer_full_goes_back_to_one_call_per_backoff() {
    let (net, stand_in, queued) = stand_in_after(
        accord_tests::vn_and_kh()
            .forwarder_batch(4)
            .forwarder_in_flight(2),
        40,
    )
    .await;
    // The first call goes alone and is taken; the two out together next fill the store.
    stand_in.slow(Duration::from_millis(100), None);
    stand_in.quota(8);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(stand_in.most_out(), 2, "the link worked first");
    let answered = stand_in.answered();
    let full_at = answered
        .iter()
        .filter(|(.., full)| *full)
        .map(|(_, at, _)| *at)
        .min()
        .expect("the store filled");
    // Calls that came after the first "quota full": the first may have gone before it was
    // settled; from then on one at a time, each after the one before was answered.
    let after: Vec<_> = answered
        .iter()
        .filter(|(came, ..)| *came > full_at)
        .collect();
    assert!(after.len() >= 4, "{} calls", after.len());
    for pair in after[1..].windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two calls out at once: {pair:?}");
    }
    let span = after[after.len() - 1].0 - after[1].0;
    assert!(
        after.len() - 1 <= offers_within(span),
        "{} calls in {span:?}",
        after.len()
    );
    // Nothing was lost: once the store takes them, every envelope goes, each taken once.
    stand_in.quota(usize::MAX);
    outbox_empties(&net).await;
    assert_eq!(sorted(stand_in.envelopes_taken()), sorted(queued));
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_the_peer_asks_to_retry_do_not_hold_back_the_outbox_behind_them() {
    let mut net = net().await;
    // Retried receipts at the head of the outbox, more than three batches (of 64) hold.
    let (stand_in, acked) = receipts_for_stand_in(&mut net, 200, Answer::Retry).await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    // The ROUTINE envelope behind them gets through, and KH's receipt for it is taken.
    let sent = alert_received_at_kh(&net, &mut c02, "behind the receipts")
        .await
        .unwrap();
    assert_eq!(stand_in.envelopes_offered(), vec![sent.id]);
    // A busy outbox (every envelope wakes it) does not resend them at each wake-up: each
    // waits out its own backoff, at least 25, 50, 100, 200, 400 ms, then 500 ms each time
    // here. Resent at each wake-up, they went about once per envelope (27 of 30 in a trial
    // with holds of 20 ms).
    for i in 0..30 {
        alert_received_at_kh(&net, &mut c02, &format!("busy {i}"))
            .await
            .unwrap();
    }
    for (id, at) in stand_in.receipts_offered() {
        let span = at[at.len() - 1] - at[0];
        let most = offers_within(span);
        assert!(
            at.len() <= most,
            "{id}: offered {} times in {span:?}, at most {most} with its backoff",
            at.len()
        );
    }
    // Every receipt was offered, and none is lost: all still wait for KH to take them.
    let offered = stand_in.receipts_offered();
    assert_eq!(offered.len(), acked.len(), "{offered:?}");
    assert!(acked.iter().all(|id| offered.contains_key(id)));
    assert_eq!(vn_outbox(&net), (acked.len(), 0));
    // Once KH takes them, they leave the outbox.
    stand_in.answer(Answer::Take, Answer::Take);
    outbox_empties(&net).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_peer_refuses_leaves_the_outbox_and_the_sender_learns_it() {
    let mut net = net().await;
    // A receipt refused for good is not sent again; an envelope refused without a receipt,
    // or answered with nothing by a gateway from before `refused`, ends REJECTED for its
    // sender, signed by VN.
    let (stand_in, acked) = receipts_for_stand_in(&mut net, 3, Answer::Refuse).await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    stand_in.answer(Answer::Refuse, Answer::Refuse);
    let refused = c02
        .send(&to, &alert("refused"), &SendOptions::new("P1"))
        .await
        .unwrap();
    let chain = wait_stage(&mut c02, &refused.id, Stage::Rejected)
        .await
        .unwrap();
    let rejected = chain.iter().find(|r| r.stage() == Stage::Rejected).unwrap();
    assert_eq!(rejected.body.reason, pb::RejectReason::RefusedByPeer as i32);
    assert_eq!(
        rejected.signer.to_string(),
        "spiffe://vn.accord/gateway/hanoi"
    );
    stand_in.answer(Answer::Refuse, Answer::Nothing);
    let unanswered = c02
        .send(
            &to,
            &alert("answered with nothing"),
            &SendOptions::new("P1"),
        )
        .await
        .unwrap();
    let chain = wait_stage(&mut c02, &unanswered.id, Stage::Rejected)
        .await
        .unwrap();
    let rejected = chain.iter().find(|r| r.stage() == Stage::Rejected).unwrap();
    assert_eq!(rejected.body.reason, pb::RejectReason::RefusedByPeer as i32);
    assert_eq!(vn_outbox(&net), (0, 0));
    // Rounds keep going (wake-ups, backoff up to 1 s); nothing refused is offered again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let offered = stand_in.receipts_offered();
    assert_eq!(offered.len(), acked.len());
    assert!(offered.values().all(|at| at.len() == 1), "{offered:?}");
    assert_eq!(
        stand_in.envelopes_offered(),
        vec![refused.id, unanswered.id]
    );
    net.shutdown().await;
}

/// VN C02's alert, received and delivered at KH, is back in VN's outbox as after an answer
/// lost on the way back; the stand-in then in KH's place answers it with `answer`. The
/// stages of the sender's chain once the entry left the outbox.
async fn ended_then_answered(answer: Answer) -> Vec<Stage> {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let sent = alert_received_at_kh(&net, &mut c02, "delivered, answer lost")
        .await
        .unwrap();
    let mut ahtd = net.client("kh", "ahtd").await.unwrap();
    let got = fetch_n(&mut ahtd, 1).await.unwrap();
    ahtd.ack(&got[0]).await.unwrap();
    wait_stage(&mut c02, &sent.id, Stage::Delivered)
        .await
        .unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, answer).await;
    let vn = net.gateway("vn").unwrap().pipeline.clone();
    let again = Op::Enqueue(
        Queue::Outbox("kh".parse().unwrap()),
        pb::Priority::Routine,
        QueueEntry::message(&sent.id),
    );
    vn.store
        .commit(Tx {
            ops: vec![again],
            receipts: None,
        })
        .await
        .unwrap();
    outbox_empties(&net).await;
    assert_eq!(stand_in.envelopes_offered(), vec![sent.id], "answered once");
    let (_, chain) = c02.status(&sent.id).await.unwrap();
    net.shutdown().await;
    chain.iter().map(|r| r.stage()).collect()
}

/// The peer refuses (without a receipt) an envelope whose delivery ended: the entry leaves,
/// and VN signs no REJECTED beside the DELIVERED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_an_envelope_whose_delivery_ended_adds_no_second_ending() {
    let stages = ended_then_answered(Answer::Refuse).await;
    assert!(stages.contains(&Stage::Delivered), "{stages:?}");
    assert!(!stages.contains(&Stage::Rejected), "{stages:?}");
}

/// The peer answers a REJECTED receipt of its own for an envelope whose delivery ended (as
/// a gateway that checks expiry before its duplicates would): the entry leaves, and the
/// peer's rejection is not stored beside the DELIVERED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_rejection_of_an_envelope_whose_delivery_ended_is_not_stored_beside_it() {
    let stages = ended_then_answered(Answer::Reject).await;
    assert!(stages.contains(&Stage::Delivered), "{stages:?}");
    assert!(!stages.contains(&Stage::Rejected), "{stages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_receipt_keeps_its_own_envelope_back_and_settles_the_rest_of_the_batch() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    // Three envelopes wait in VN's outbox while KH is down, so that they go in one batch,
    // in the order sent.
    let sent = queued_while_kh_is_down(&mut net, &mut c02, 3).await;
    assert_eq!(vn_outbox(&net), (0, 3));
    // The stand-in answers the first with a receipt that does not verify.
    let forged = HashMap::from([(sent[0], Answer::Forge)]);
    let stand_in = stand_in_for_kh(&net, Answer::Take, Answer::Take, forged).await;
    // The two behind it are received: each receipt stands on its own.
    for id in &sent[1..] {
        wait_stage(&mut c02, id, Stage::Received).await.unwrap();
    }
    // The first is kept, not lost, and offered again later, not at once: it waits out its
    // own backoff (25 ms at least), and the link backs off too.
    for _ in 0..100 {
        if stand_in.envelope_offers(&sent[0]).len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(vn_outbox(&net), (0, 1));
    let (_, chain) = c02.status(&sent[0]).await.unwrap();
    assert_eq!(accord_client::org::furthest_stage(&chain), Stage::Accepted);
    let at = stand_in.envelope_offers(&sent[0]);
    let span = at[at.len() - 1] - at[0];
    assert!(
        at.len() >= 3 && at.len() <= offers_within(span),
        "offered {} times in {span:?}",
        at.len()
    );
    assert_eq!(stand_in.envelope_offers(&sent[1]).len(), 1);
    // Once the peer answers it properly, it is received too.
    stand_in.answer_envelope_of(sent[0], Answer::Take);
    wait_stage(&mut c02, &sent[0], Stage::Received)
        .await
        .unwrap();
    assert_eq!(vn_outbox(&net), (0, 0));
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_retried_past_the_hold_bound_move_behind_the_rest_of_the_outbox() {
    // Batches of 2: the forwarder holds back at most 16 batches, 32 entries, in place.
    let mut net = net_with_batches_of(2).await;
    let (stand_in, acked) = receipts_for_stand_in(&mut net, 34, Answer::Retry).await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    // The envelope behind 34 retried receipts goes: the 2 that could not be held were
    // moved behind it. Resent with every round instead, those 2 filled every batch.
    alert_received_at_kh(&net, &mut c02, "behind 34 receipts")
        .await
        .unwrap();
    let outbox = vn_outbox_entries(&net);
    assert_eq!(outbox.len(), acked.len(), "every receipt still waits");
    let deferred: Vec<MessageId> = outbox
        .iter()
        .filter(|(_, e)| e.deferred)
        .map(|(_, e)| MessageId::from_slice(&e.message_id).unwrap())
        .collect();
    assert_eq!(
        deferred.len(),
        34 - 32,
        "the ones past the bound, and no more"
    );
    assert!(
        outbox[32..].iter().all(|(_, e)| e.deferred),
        "deferred entries are at the back"
    );
    // Each envelope wakes the outbox with room left in its batch of 2; the deferred
    // receipts still wait out their backoff (at least 25, 50, 100, 200, 400, then 500 ms
    // between offers here), together. Sent whenever a batch had room, they went with
    // about every envelope.
    for i in 0..30 {
        alert_received_at_kh(&net, &mut c02, &format!("after {i}"))
            .await
            .unwrap();
    }
    let offered = stand_in.receipts_offered();
    for id in &deferred {
        let at = &offered[id];
        let span = at[at.len() - 1] - at[0];
        assert!(
            at.len() <= offers_within(span),
            "{id}: offered {} times in {span:?}",
            at.len()
        );
    }
    // None is lost: once KH takes them, every receipt leaves the outbox.
    assert!(acked.iter().all(|id| offered.contains_key(id)));
    stand_in.answer(Answer::Take, Answer::Take);
    outbox_empties(&net).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_quota_is_full_is_sent_one_batch_per_backoff_and_nothing_is_moved() {
    // Batches of 2: at most 32 entries held back in place.
    let mut net = net_with_batches_of(2).await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let to = net.org_id("kh", "ahtd").unwrap();
    let sent = queued_while_kh_is_down(&mut net, &mut c02, 40).await;
    // The first 32 are put off one by one (held, to the bound); then the store is full.
    let retried = sent[..32].iter().map(|id| (*id, Answer::Retry)).collect();
    let stand_in = stand_in_for_kh(&net, Answer::Take, Answer::QuotaFull, retried).await;
    // The head past the bound stays where it is and goes once per backoff of the link (at
    // least 25, 50, 100, 200, 400, then 500 ms apart here), and new entries do not cut
    // the backoff short. Moved behind the rest instead, the 8 behind it went as well.
    for i in 0..100 {
        if stand_in.envelope_offers(&sent[32]).len() >= 6 {
            break;
        }
        c02.send(&to, &alert(&format!("more {i}")), &SendOptions::new("P1"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = stand_in.envelope_offers(&sent[32]);
    assert!(at.len() >= 6, "offered {} times", at.len());
    let span = at[at.len() - 1] - at[0];
    assert!(
        at.len() <= offers_within(span),
        "offered {} times in {span:?}",
        at.len()
    );
    let offered: std::collections::HashSet<_> = stand_in.envelopes_offered().into_iter().collect();
    assert_eq!(
        offered.len(),
        34,
        "the held ones and the head, nothing behind"
    );
    assert!(sent[..34].iter().all(|id| offered.contains(id)));
    let outbox = vn_outbox_entries(&net);
    assert!(outbox.len() >= 40);
    assert!(outbox.iter().all(|(_, e)| !e.deferred), "nothing moved");
    // Once the peer takes them again, all go.
    stand_in.answer(Answer::Take, Answer::Take);
    for id in &sent[..32] {
        stand_in.answer_envelope_of(*id, Answer::Take);
    }
    for id in &sent {
        wait_stage(&mut c02, id, Stage::Received).await.unwrap();
    }
    outbox_empties(&net).await;
    net.shutdown().await;
}

/// An envelope that went to the peer, whose answers told nothing of it yet (the peer asks to
/// retry it), is not expired by VN when its time runs out: the peer may hold it (an answer
/// lost would look the same), so it goes again, and the peer's answer ends it. Here the
/// peer takes it at last; the sender's chain holds its RECEIVED and no REJECTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_may_have_reached_the_peer_is_not_expired_here_but_sent_again() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, Answer::Retry).await;
    let sent = short_lived_alert(&net, &mut c02, "went", 1_000)
        .await
        .unwrap();
    eventually(|| !stand_in.envelope_offers(&sent.id).is_empty()).await;
    let expired_at = std::time::Instant::now() + until_expiry(&net, "vn", &sent.id).unwrap();
    // Offered again twice past its expiry, and still not ended.
    let offered_since = || {
        let offers = stand_in.envelope_offers(&sent.id);
        offers.iter().filter(|at| **at > expired_at).count()
    };
    eventually(|| offered_since() >= 2).await;
    assert!(
        offered_since() >= 2,
        "offered {} times since",
        offered_since()
    );
    let (_, chain) = c02.status(&sent.id).await.unwrap();
    assert_eq!(
        accord_client::org::furthest_stage(&chain),
        Stage::Accepted,
        "not retired here"
    );
    assert_eq!(vn_outbox(&net), (0, 1));
    stand_in.answer_envelope_of(sent.id, Answer::Take);
    let chain = wait_stage(&mut c02, &sent.id, Stage::Received)
        .await
        .unwrap();
    assert!(chain.iter().all(|r| r.stage() != Stage::Rejected));
    outbox_empties(&net).await;
    net.shutdown().await;
}

/// A call the peer never answers (its answer lost, as far as VN can tell) leaves its
/// envelope marked as one the peer may hold; the peer then goes down, and VN's calls find
/// no connection. Past the envelope's expiry VN does not retire it: only the peer's word
/// ends it, here its REJECTED once it is back, which the sender's chain then holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_whose_call_went_unanswered_waits_for_the_peer_past_its_expiry() {
    let mut net = accord_tests::vn_and_kh()
        .forwarder_call_timeout_ms(300)
        .checkpoint_interval_ms(600_000)
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, Answer::Take).await;
    stand_in.hang(1);
    let sent = short_lived_alert(&net, &mut c02, "unanswered", 1_500)
        .await
        .unwrap();
    eventually(|| !stand_in.calls().is_empty()).await;
    // The peer goes down with the call out; the call's own limit runs out at VN, which
    // cannot tell whether the peer took it. VN restarts: the mark is on disk.
    stand_in.stop().await;
    net.stop_gateway("vn").await.unwrap();
    net.start_gateway("vn").await.unwrap();
    let past = until_expiry(&net, "vn", &sent.id).unwrap() + Duration::from_millis(1_500);
    tokio::time::sleep(past).await;
    let (_, chain) = c02.status(&sent.id).await.unwrap();
    assert_eq!(
        accord_client::org::furthest_stage(&chain),
        Stage::Accepted,
        "not retired here"
    );
    assert_eq!(vn_outbox(&net), (0, 1));
    assert_eq!(stand_in.calls().len(), 1, "the peer was down since");
    let back = stand_in_for_kh(&net, Answer::Take, Answer::Reject, HashMap::new()).await;
    let chain = wait_stage(&mut c02, &sent.id, Stage::Rejected)
        .await
        .unwrap();
    let rejected: Vec<_> = chain
        .iter()
        .filter(|r| r.stage() == Stage::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        rejected[0].signer.to_string(),
        KH_GATEWAY,
        "the peer's word"
    );
    assert_eq!(back.envelopes_offered(), vec![sent.id]);
    outbox_empties(&net).await;
    net.shutdown().await;
}

/// An envelope the peer answered "quota full" the first time it went was not kept there
/// (a full store says so before it keeps anything): past its expiry VN retires it, as one
/// that never left, and its sender learns it while the peer is still full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_a_full_peer_did_not_keep_expires_here() {
    let mut net = net().await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, Answer::QuotaFull).await;
    let sent = short_lived_alert(&net, &mut c02, "not kept", 1_000)
        .await
        .unwrap();
    eventually(|| !stand_in.envelope_offers(&sent.id).is_empty()).await;
    expired_at_vn(&mut c02, &sent.id).await.unwrap();
    outbox_empties(&net).await;
    net.shutdown().await;
}

/// With one envelope per call and KH down, each call marks its envelope and, finding no
/// connection, unmarks it (a link that does not work marks nothing ahead): each of the
/// three expires at VN, and its sender learns it from VN while KH is still down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_behind_calls_that_never_left_expire_here() {
    let mut net = net_with_batches_of(1).await;
    net.stop_gateway("kh").await.unwrap();
    // VN notices its connection to KH closed (see the same wait in exchange.rs).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let mut sent = Vec::new();
    for n in 0..3 {
        let what = format!("too late {n}");
        let alert = short_lived_alert(&net, &mut c02, &what, 1_000).await;
        sent.push(alert.unwrap().id);
    }
    for id in &sent {
        expired_at_vn(&mut c02, id).await.unwrap();
    }
    net.shutdown().await;
}

/// On a working link, the commit that marks a call's envelopes as ones the peer may hold
/// marks those of the next calls too, before any of them goes. Those no call carried are
/// unmarked when the forwarder stops: they never went, and may expire here again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_marked_ahead_that_no_call_carried_are_unmarked_at_a_stop() {
    use accord_gateway::store::Store as _;
    let builder = accord_tests::vn_and_kh()
        .forwarder_batch(1)
        .checkpoint_interval_ms(600_000);
    let (mut net, stand_in, queued) = stand_in_after(builder, 6).await;
    stand_in.slow(Duration::from_millis(800), None);
    // The first call is answered, so the link works: the next two go (one envelope each,
    // two calls out), and the three behind them are marked with the first of them.
    eventually(|| stand_in.calls().len() >= 3).await;
    let entries = vn_outbox_entries(&net);
    let marked: Vec<bool> = entries.iter().map(|(_, e)| e.may_have_left()).collect();
    assert_eq!(marked, vec![true; 5], "marked ahead");
    net.stop_gateway("vn").await.unwrap();
    assert_eq!(
        sorted(stand_in.envelopes_taken()),
        sorted(queued[..3].to_vec())
    );
    let dir = net.data_dir("vn").unwrap();
    let started = std::time::Instant::now();
    let store = loop {
        match accord_gateway::store::sled::SledStore::open(&dir, 16 << 20) {
            Ok(store) => break store,
            Err(e) if started.elapsed() > Duration::from_secs(5) => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let left = store
        .queue(&Queue::Outbox("kh".parse().unwrap()), 10)
        .unwrap();
    let ids: Vec<MessageId> = left
        .iter()
        .map(|(_, e)| MessageId::from_slice(&e.message_id).unwrap())
        .collect();
    assert_eq!(ids, queued[3..].to_vec());
    assert!(
        left.iter().all(|(_, e)| !e.may_have_left()),
        "unmarked at the stop"
    );
    drop(store);
    net.start_gateway("vn").await.unwrap();
    outbox_empties(&net).await;
    assert_eq!(sorted(stand_in.envelopes_taken()), sorted(queued));
    net.shutdown().await;
}

/// The peer turns full while two calls are out on a working link, with three entries
/// marked ahead of them: every envelope it did not take expires at VN while it is still
/// full, those it answered "quota full" on their first call and those marked ahead alike
/// (each goes once, is answered "quota full", and is unmarked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_a_peer_turned_full_did_not_take_expire_here() {
    let mut net = accord_tests::vn_and_kh()
        .forwarder_batch(1)
        .checkpoint_interval_ms(600_000)
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    let mut sent = Vec::new();
    for n in 0..6 {
        let what = format!("marked ahead {n}");
        let alert = short_lived_alert(&net, &mut c02, &what, 4_000).await;
        sent.push(alert.unwrap().id);
    }
    let stand_in = stand_in_for_kh(&net, Answer::Take, Answer::Take, HashMap::new()).await;
    stand_in.slow(Duration::from_millis(800), None);
    eventually(|| stand_in.calls().len() >= 3).await;
    assert_eq!(stand_in.calls().len(), 3, "two calls out behind the first");
    stand_in.answer(Answer::Take, Answer::QuotaFull);
    wait_stage(&mut c02, &sent[0], Stage::Received)
        .await
        .unwrap();
    for id in &sent[1..] {
        expired_at_vn(&mut c02, id).await.unwrap();
    }
    net.shutdown().await;
}

/// Envelopes marked ahead that FLASH alerts then pushed behind what the forwarder reads are
/// still taken back when the peer turns full: each that the peer did not take expires at VN
/// while it is still full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_marked_ahead_then_pushed_back_by_flash_alerts_expire_here() {
    let mut net = accord_tests::vn_and_kh()
        .forwarder_batch(1)
        .forwarder_in_flight(1)
        .checkpoint_interval_ms(600_000)
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, Answer::Take).await;
    // Slow enough for the FLASH alerts to come while a1 is out.
    stand_in.slow(Duration::from_millis(1_500), None);
    // It takes a0, a1 and the first FLASH alert, then is full.
    stand_in.quota(3);
    let mut routine = Vec::new();
    for n in 0..6 {
        let what = format!("routine {n}");
        let alert = short_lived_alert(&net, &mut c02, &what, 6_000).await;
        routine.push(alert.unwrap().id);
    }
    // a0's call finds the link working; a1's marks a2..a5 ahead (4 = 4 rounds × 1 call ×
    // 1 entry). While a1 is out, FLASH alerts come: they are read first from then on, and
    // a3..a5 go behind what the next marks ahead read.
    let marked_ahead = |id: &MessageId| {
        vn_outbox_entries(&net)
            .iter()
            .any(|(_, e)| e.message_id == id.as_bytes() && e.may_have_left())
    };
    eventually(|| marked_ahead(&routine[5])).await;
    assert!(
        marked_ahead(&routine[5]),
        "a1's call went, marking a5 ahead"
    );
    let to = net.org_id("kh", "ahtd").unwrap();
    let flash = SendOptions {
        priority: pb::Priority::Flash,
        ttl_ms: 6_000,
        ..SendOptions::new("F1")
    };
    let mut urgent = Vec::new();
    for n in 0..4 {
        let what = format!("flash {n}");
        urgent.push(c02.send(&to, &alert(&what), &flash).await.unwrap().id);
    }
    for id in [&routine[0], &routine[1], &urgent[0]] {
        wait_stage(&mut c02, id, Stage::Received).await.unwrap();
    }
    // A full peer is offered the head of the outbox once per backoff, and what is behind it
    // is read (and expires) once what is ahead has left: the FLASH alerts expire first.
    for id in urgent[1..].iter().chain(&routine[2..]) {
        expired_at_vn(&mut c02, id).await.unwrap();
    }
    net.shutdown().await;
}

/// A store that stopped taking commits may hold on disk an unmark it answered as failed
/// (its record written, its sync failed), replayed at the next start: an envelope that
/// reads as marked in memory may then read as never sent, and expire at VN while KH holds
/// it. So VN sends nothing while its store is stopped, not even an envelope marked long ago
/// that goes without a commit of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_store_stopped_taking_commits_sends_nothing() {
    let mut net = net().await;
    let vn = accord_tests::restart_with_stalled_commits(&mut net, "vn")
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, Answer::Retry).await;
    let sent = c02
        .send(
            &net.org_id("kh", "ahtd").unwrap(),
            &alert("asked again"),
            &SendOptions::new("P1"),
        )
        .await
        .unwrap();
    // Marked with its first call, and kept marked by the peer's "retry": each call after
    // it goes without a commit.
    eventually(|| stand_in.envelope_offers(&sent.id).len() >= 2).await;
    assert!(stand_in.envelope_offers(&sent.id).len() >= 2, "sent again");
    vn.stop();
    // A call whose marks had landed may still go.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let offers = stand_in.envelope_offers(&sent.id).len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stand_in.envelope_offers(&sent.id).len(),
        offers,
        "nothing sent since"
    );
    stand_in.stop().await;
    net.shutdown().await;
}

/// KH's host takes TCP connections but never answers the TLS handshake (a proxy or host
/// that hangs), and VN's calls may go unanswered for one second. A connection must open
/// within half that: every call fails as one that never left, before its own limit runs
/// out (which would leave its envelope marked as possibly taken), and the envelope expires
/// at VN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_whose_calls_never_got_a_connection_expires_here_with_a_short_call_limit() {
    let mut net = accord_tests::vn_and_kh()
        .forwarder_call_timeout_ms(1_000)
        .start()
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    net.stop_gateway("kh").await.unwrap();
    let silent = tokio::net::TcpListener::bind(net.peer_address("kh").unwrap())
        .await
        .unwrap();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            connections.push(tcp);
        }
    });
    let sent = short_lived_alert(&net, &mut c02, "no handshake", 2_000)
        .await
        .unwrap();
    expired_at_vn(&mut c02, &sent.id).await.unwrap();
    held.abort();
    net.shutdown().await;
}

/// A net for tests of marking ahead, returned while a0's call is still out.
struct Behind {
    net: TestNet,
    /// VN's store, whose commits the test can stall.
    vn: Arc<accord_tests::StalledCommits>,
    c02: accord_client::org::OrgClient,
    stand_in: StandIn,
    a0: MessageId,
    /// e1..e5, queued behind a0.
    sent: Vec<MessageId>,
}

/// VN (its store's commits in the test's hands) with forwarders of batch 1, `in_flight`
/// calls and calls limited to `call_timeout_ms`, and the stand-in in KH's place: a0 goes
/// in a call the stand-in answers after a second, and e1..e5 are queued behind it. The
/// stand-in answers at once from then on; the link works once a0 is answered.
async fn five_behind_a_slow_call(in_flight: usize, call_timeout_ms: u64) -> Behind {
    let mut net = accord_tests::vn_and_kh()
        .forwarder_batch(1)
        .forwarder_in_flight(in_flight)
        .forwarder_call_timeout_ms(call_timeout_ms)
        .checkpoint_interval_ms(600_000)
        .start()
        .await
        .unwrap();
    let vn = accord_tests::restart_with_stalled_commits(&mut net, "vn")
        .await
        .unwrap();
    let mut c02 = net.client("vn", "c02").await.unwrap();
    let stand_in = replace_kh(&mut net, Answer::Take, Answer::Take).await;
    stand_in.slow(Duration::from_secs(1), None);
    let to = net.org_id("kh", "ahtd").unwrap();
    let opts = SendOptions::new("P1");
    let a0 = c02.send(&to, &alert("a0"), &opts).await.unwrap().id;
    eventually(|| stand_in.calls().len() == 1).await;
    let mut sent = Vec::new();
    for n in 1..=5 {
        let what = format!("e{n}");
        sent.push(c02.send(&to, &alert(&what), &opts).await.unwrap().id);
    }
    stand_in.slow(Duration::ZERO, None);
    Behind {
        net,
        vn,
        c02,
        stand_in,
        a0,
        sent,
    }
}

/// A call that carries an envelope marked ahead, by the commit of a call before it, waits
/// until that commit lands: here VN's commits of marks stall, and neither the call whose
/// own commit marked e1 (and e2..e5 ahead) nor the call carrying e2 leaves until they land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_carrying_an_envelope_marked_ahead_waits_for_the_commit_that_marked_it() {
    let Behind {
        net,
        vn,
        mut c02,
        stand_in,
        a0,
        sent,
    } = five_behind_a_slow_call(2, 60_000).await;
    vn.stall_marks();
    wait_stage(&mut c02, &a0, Stage::Received).await.unwrap();
    // The link works: e1's call marks e1 and, ahead, e2..e5 in one commit, which stalls;
    // the call carrying e2 goes out beside it with no commit of its own.
    let mut waited = Duration::ZERO;
    while vn.waiting() == 0 {
        assert!(waited < Duration::from_secs(10), "no marks were committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        stand_in.calls().len(),
        1,
        "nothing left before its marks landed"
    );
    vn.resume();
    for id in &sent {
        wait_stage(&mut c02, id, Stage::Received).await.unwrap();
    }
    stand_in.stop().await;
    net.shutdown().await;
}

/// The peer's store fails (it answers "storage error", the link backs off) with entries
/// marked ahead of the call it answered: before the link waits, they are unmarked, as no
/// call carried them, and may expire here. The entry the call carried stays marked: the
/// peer may have kept it. (The next call hangs, so that nothing else is carried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_marked_ahead_are_unmarked_before_the_link_backs_off() {
    // The hung call below gives up in time for the stand-in to stop.
    let Behind {
        net,
        vn: _,
        mut c02,
        stand_in,
        a0,
        sent,
    } = five_behind_a_slow_call(1, 2_000).await;
    for id in &sent {
        stand_in.answer_envelope_of(*id, Answer::StorageError);
    }
    // The call after e1's is never answered: the link waits on it, and carries nothing
    // more (e1 or e2 in it, whichever the backoff holds back).
    stand_in.hang(3);
    wait_stage(&mut c02, &a0, Stage::Received).await.unwrap();
    // e1's call marks e1 and, ahead, e2..e5; the peer's store fails on e1.
    eventually(|| stand_in.calls().len() >= 3).await;
    let left = |id: &MessageId| {
        vn_outbox_entries(&net)
            .into_iter()
            .find(|(_, e)| e.message_id == id.as_bytes())
            .map(|(_, e)| e.may_have_left())
    };
    assert_eq!(stand_in.calls().len(), 3, "the third call hangs");
    let unmarked = || sent[2..].iter().all(|id| left(id) == Some(false));
    eventually(unmarked).await;
    assert_eq!(left(&sent[0]), Some(true), "e1 went: the peer may hold it");
    for id in &sent[2..] {
        assert_eq!(left(id), Some(false), "never carried, unmarked");
    }
    assert!(sent[2..]
        .iter()
        .all(|id| stand_in.envelope_offers(id).is_empty()));
    stand_in.stop().await;
    net.shutdown().await;
}
