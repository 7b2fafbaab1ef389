//! One conformance suite for every [`Store`] backend: atomicity of inserts, queue order,
//! log indexes, receipts, and that a reopened store holds everything acknowledged.

use std::path::Path;

use accord_proto::ids::{MessageId, OrgId};
use accord_proto::pb;

use prost::Message as _;

use super::*;

fn msg(n: u8) -> (MessageId, StoredMessage) {
    let id = MessageId::new_v7(1_000 + n as u64, [n; 10]);
    let m = StoredMessage {
        envelope: Some(pb::Envelope {
            header: vec![n; 10].into(),
            // Odd messages longer than what is read whole for a head.
            ciphertext: vec![n; if n % 2 == 1 { 10_000 } else { 2_000 }].into(),
            signature: vec![n; 64].into(),
        }),
        head: MessageHead {
            envelope_hash: vec![n; 32],
            sender_org: "spiffe://vn.accord/org/c02".into(),
            recipient_org: "spiffe://kh.accord/org/ahtd".into(),
            stored_at_ms: n as i64,
            expires_at_ms: i64::MAX,
            // Both ways on both read paths (1 and 3 long, 2 short).
            no_attachments: n >= 2,
        },
    };
    (id, m)
}

/// The organisation whose inbox the tests use.
pub(crate) fn ahtd() -> OrgId {
    "spiffe://kh.accord/org/ahtd".parse().unwrap()
}

/// Appends a log entry that names message `id`.
pub(crate) fn log_naming(id: &MessageId) -> Op {
    Op::Log(
        pb::LogEntry {
            message_id: id.as_bytes().to_vec(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// Stores, in the commit, a receipt for `id` whose body is the first log index it names.
pub(crate) fn receipt_naming_index(id: MessageId) -> Option<ReceiptMaker> {
    Some(Box::new(move |index| {
        vec![Op::PutReceipt(
            id,
            pb::Receipt {
                body: index.to_be_bytes().to_vec(),
                signature: vec![],
            },
        )]
    }))
}

pub(crate) async fn run<S: Store>(dir: &Path, open: impl Fn(&Path) -> S) {
    let kh = Queue::Outbox("kh".parse().unwrap());
    let (id1, m1) = msg(1);
    let (id2, m2) = msg(2);
    let (id3, m3) = msg(3);
    {
        let store = open(dir);
        let tx = |id: MessageId, m: StoredMessage, prio| Tx {
            ops: vec![
                Op::InsertMessage(id, m),
                Op::Enqueue(kh.clone(), prio, QueueEntry::message(&id)),
                Op::Log(id.as_bytes().to_vec()),
            ],
            receipts: receipt_naming_index(id),
        };
        let r1 = store.commit(tx(id1, m1.clone(), pb::Priority::Routine));
        let r2 = store.commit(tx(id2, m2.clone(), pb::Priority::Routine));
        let r3 = store.commit(tx(id3, m3.clone(), pb::Priority::Flash));
        let (r1, r2, r3) = (r1.await.unwrap(), r2.await.unwrap(), r3.await.unwrap());
        assert_eq!(
            r1,
            TxOutcome::Committed {
                first_log_index: Some(0)
            }
        );
        assert_eq!(
            r2,
            TxOutcome::Committed {
                first_log_index: Some(1)
            }
        );
        assert_eq!(
            r3,
            TxOutcome::Committed {
                first_log_index: Some(2)
            }
        );

        // A second insert of the same id changes nothing, not even the queue or log.
        let dup = store
            .commit(tx(id1, m1.clone(), pb::Priority::Flash))
            .await
            .unwrap();
        assert_eq!(dup, TxOutcome::Exists(id1));
        assert_eq!(store.log_size().unwrap(), 3);
        assert_eq!(store.queue(&kh, 10).unwrap().len(), 3);

        // One transaction inserting a message twice is refused whole: nothing is stored,
        // not even a second, unreachable copy of the message.
        let (id4, m4) = msg(4);
        let twice = Tx {
            ops: vec![
                Op::InsertMessage(id4, m4.clone()),
                Op::Log(id4.as_bytes().to_vec()),
                Op::InsertMessage(id4, m4.clone()),
            ],
            receipts: None,
        };
        let err = store.commit(twice).await.unwrap_err();
        assert!(err.to_string().contains("inserts message"), "{err}");
        assert_eq!(store.message(&id4).unwrap(), None);
        assert_eq!(store.log_size().unwrap(), 3);

        // The receipt made inside the commit carries the log index it was given.
        let receipts = store.receipts(&id2).unwrap();
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].body, 1u64.to_be_bytes());
        // An identical receipt is stored once, even when one transaction names it twice.
        let again = || Op::PutReceipt(id2, receipts[0].clone());
        store
            .commit(Tx {
                ops: vec![again()],
                receipts: None,
            })
            .await
            .unwrap();
        assert_eq!(store.receipts(&id2).unwrap().len(), 1);
        let mut other = receipts[0].clone();
        other.body = 9u64.to_be_bytes().to_vec();
        let twice = || Op::PutReceipt(id2, other.clone());
        store
            .commit(Tx {
                ops: vec![twice(), again(), twice()],
                receipts: None,
            })
            .await
            .unwrap();
        let stored = store.receipts(&id2).unwrap();
        assert_eq!(stored, vec![receipts[0].clone(), other.clone()]);
    }
    // Reopen: everything acknowledged is there, queue order is priority then arrival.
    let store = open(dir);
    for (id, m) in [(id1, &m1), (id2, &m2), (id3, &m3)] {
        assert_eq!(store.message_head(&id).unwrap().as_ref(), Some(&m.head));
    }
    assert_eq!(store.message_head(&msg(4).0).unwrap(), None);
    assert_eq!(store.message(&id1).unwrap(), Some(m1));
    assert_eq!(store.log_size().unwrap(), 3);
    assert_eq!(store.log_entry(1).unwrap(), Some(id2.as_bytes().to_vec()));
    let q = store.queue(&kh, 10).unwrap();
    let order: Vec<_> = q.iter().map(|(_, e)| e.message_id.clone()).collect();
    assert_eq!(
        order,
        vec![
            id3.as_bytes().to_vec(),
            id1.as_bytes().to_vec(),
            id2.as_bytes().to_vec()
        ]
    );
    // Dequeue removes exactly one entry; appends after reopen continue the log.
    let next = store
        .commit(Tx {
            ops: vec![Op::Dequeue(q[0].0.clone()), Op::Log(b"after".to_vec())],
            receipts: None,
        })
        .await
        .unwrap();
    assert_eq!(
        next,
        TxOutcome::Committed {
            first_log_index: Some(3)
        }
    );
    assert_eq!(store.queue(&kh, 10).unwrap().len(), 2);
    // Taking an entry off again changes nothing.
    store
        .commit(Tx {
            ops: vec![Op::Dequeue(q[0].0.clone())],
            receipts: None,
        })
        .await
        .unwrap();
    assert_eq!(store.queue(&kh, 10).unwrap().len(), 2);
    // An inbox entry can be removed by its message's id, once; the rest of the inbox, and
    // the same message's entry in another queue, stay.
    let ahtd = ahtd();
    let inbox = Queue::Inbox(ahtd.clone());
    for id in [id1, id2] {
        store
            .commit(Tx {
                ops: vec![Op::Enqueue(
                    inbox.clone(),
                    pb::Priority::Routine,
                    QueueEntry::message(&id),
                )],
                receipts: None,
            })
            .await
            .unwrap();
    }
    for _ in 0..2 {
        store
            .commit(Tx {
                ops: vec![Op::RemoveFromInbox(ahtd.clone(), id1)],
                receipts: None,
            })
            .await
            .unwrap();
    }
    let left = store.queue(&inbox, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.message_id, id2.as_bytes().to_vec());
    assert_eq!(store.queue(&kh, 10).unwrap().len(), 2);
    assert!(store
        .queue(
            &Queue::Inbox("spiffe://kh.accord/org/nchr".parse().unwrap()),
            10
        )
        .unwrap()
        .is_empty());
    // A message's events: every log entry that names it, ascending, whether one
    // transaction logged several of them or one each.
    let base = store.log_size().unwrap();
    for ops in [
        vec![
            log_naming(&id1),
            log_naming(&id2),
            log_naming(&id1),
            log_naming(&id1),
        ],
        vec![Op::Log(b"no message".to_vec()), log_naming(&id1)],
    ] {
        store
            .commit(Tx {
                ops,
                receipts: None,
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store.message_events(&id1).unwrap(),
        vec![base, base + 2, base + 3, base + 5]
    );
    assert_eq!(store.message_events(&id2).unwrap(), vec![base + 1]);
    assert!(store.message_events(&id3).unwrap().is_empty());
    assert!(store.disk_usage().unwrap() > 0);

    // A deferred outbox entry goes behind every entry not deferred, FLASH ones that arrive
    // later included. Deferred entries keep their priority among themselves, then the order
    // they were deferred in; an entry that is gone is not brought back.
    let order = |store: &S| -> Vec<(Vec<u8>, bool)> {
        let q = store.queue(&kh, 10).unwrap();
        q.into_iter()
            .map(|(_, e)| (e.message_id, e.deferred))
            .collect()
    };
    let key_of = |store: &S, id: &MessageId| -> QueueKey {
        let q = store.queue(&kh, 10).unwrap();
        q.into_iter()
            .find(|(_, e)| e.message_id == id.as_bytes())
            .unwrap()
            .0
    };
    let commit = |ops: Vec<Op>| {
        store.commit(Tx {
            ops,
            receipts: None,
        })
    };
    let (b1, b2, b3) = (id1.as_bytes(), id2.as_bytes(), id3.as_bytes());
    assert_eq!(
        order(&store),
        vec![(b1.to_vec(), false), (b2.to_vec(), false)]
    );
    let first_key = key_of(&store, &id1);
    commit(vec![Op::Defer(first_key.clone())]).await.unwrap();
    let flash = QueueEntry::message(&id3);
    commit(vec![Op::Enqueue(kh.clone(), pb::Priority::Flash, flash)])
        .await
        .unwrap();
    assert_eq!(
        order(&store),
        vec![
            (b3.to_vec(), false),
            (b2.to_vec(), false),
            (b1.to_vec(), true)
        ]
    );
    commit(vec![Op::Defer(key_of(&store, &id2))]).await.unwrap();
    commit(vec![Op::Defer(key_of(&store, &id3))]).await.unwrap();
    assert_eq!(
        order(&store),
        vec![
            (b3.to_vec(), true),
            (b1.to_vec(), true),
            (b2.to_vec(), true)
        ],
        "FLASH first among deferred entries, then the order deferred"
    );
    // Deferred again: behind the other deferred entries of its priority.
    commit(vec![Op::Defer(key_of(&store, &id1))]).await.unwrap();
    assert_eq!(
        order(&store),
        vec![
            (b3.to_vec(), true),
            (b2.to_vec(), true),
            (b1.to_vec(), true)
        ]
    );
    // Gone: under its old key, taken off earlier in the same transaction, or deferred twice
    // in one transaction, it is not brought back or copied.
    commit(vec![Op::Defer(first_key)]).await.unwrap();
    let k2 = key_of(&store, &id2);
    commit(vec![Op::Dequeue(k2.clone()), Op::Defer(k2)])
        .await
        .unwrap();
    let k3 = key_of(&store, &id3);
    commit(vec![Op::Defer(k3.clone()), Op::Defer(k3)])
        .await
        .unwrap();
    assert_eq!(
        order(&store),
        vec![(b3.to_vec(), true), (b1.to_vec(), true)]
    );
    // Reopened (a replay of the write-ahead log): the same order, still marked, and taken
    // off by the key it is read under, as any entry.
    drop(store);
    let store = open(dir);
    assert_eq!(
        order(&store),
        vec![(b3.to_vec(), true), (b1.to_vec(), true)]
    );
    store
        .commit(Tx {
            ops: vec![Op::Dequeue(key_of(&store, &id1))],
            receipts: None,
        })
        .await
        .unwrap();
    assert_eq!(order(&store), vec![(b3.to_vec(), true)]);
    // Only outbox entries are deferred: an inbox entry is found by id, under its key.
    let inbox_key = store.queue(&inbox, 1).unwrap()[0].0.clone();
    let refused = store
        .commit(Tx {
            ops: vec![Op::Defer(inbox_key)],
            receipts: None,
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(store.queue(&inbox, 10).unwrap().len(), 1);

    // An outbox entry marked sent keeps its key and its place; the mark outlives a deferral
    // and a reopen. A gone entry is not brought back, and only outbox entries are marked.
    let sent = |store: &S| -> Vec<(Vec<u8>, bool, bool)> {
        let q = store.queue(&kh, 10).unwrap();
        q.into_iter()
            .map(|(_, e)| (e.may_have_left(), e))
            .map(|(left, e)| (e.message_id, e.deferred, left))
            .collect()
    };
    store
        .commit(Tx {
            ops: vec![Op::Enqueue(
                kh.clone(),
                pb::Priority::Urgent,
                QueueEntry::message(&id2),
            )],
            receipts: None,
        })
        .await
        .unwrap();
    let k2 = key_of(&store, &id2);
    let k3 = key_of(&store, &id3);
    store
        .commit(Tx {
            ops: vec![Op::SetSent(k2.clone(), true), Op::SetSent(k2.clone(), true)],
            receipts: None,
        })
        .await
        .unwrap();
    assert_eq!(key_of(&store, &id2), k2, "marked in place");
    assert_eq!(
        sent(&store),
        vec![(b2.to_vec(), false, true), (b3.to_vec(), true, false)]
    );
    store
        .commit(Tx {
            ops: vec![
                Op::Defer(k2),
                Op::Dequeue(k3.clone()),
                Op::SetSent(k3, true),
            ],
            receipts: None,
        })
        .await
        .unwrap();
    drop(store);
    let store = open(dir);
    assert_eq!(sent(&store), vec![(b2.to_vec(), true, true)]);
    let k2 = key_of(&store, &id2);
    store
        .commit(Tx {
            ops: vec![Op::SetSent(k2, false)],
            receipts: None,
        })
        .await
        .unwrap();
    assert_eq!(sent(&store), vec![(b2.to_vec(), true, false)], "cleared");
    let inbox_key = store.queue(&inbox, 1).unwrap()[0].0.clone();
    let refused = store
        .commit(Tx {
            ops: vec![Op::SetSent(inbox_key, true)],
            receipts: None,
        })
        .await;
    assert!(refused.is_err());
    assert!(!store.queue(&inbox, 1).unwrap()[0].1.may_have_left());

    // A transaction is the store's once `commit` is called, and one caller's transactions
    // apply in the order it called: a mark whose future was dropped still lands, before the
    // unmark called after it, and an unmark dropped lands after the mark called before it.
    let k2 = key_of(&store, &id2);
    let mark = |on: bool| Tx {
        ops: vec![Op::SetSent(k2.clone(), on)],
        receipts: None,
    };
    drop(store.commit(mark(true)));
    store.commit(mark(false)).await.unwrap();
    assert_eq!(
        sent(&store),
        vec![(b2.to_vec(), true, false)],
        "unmarked last"
    );
    let marked = store.commit(mark(true));
    drop(store.commit(mark(false)));
    marked.await.unwrap();
    let barrier = Tx {
        ops: vec![Op::Log(b"after the dropped unmark".to_vec())],
        receipts: None,
    };
    store.commit(barrier).await.unwrap();
    assert_eq!(
        sent(&store),
        vec![(b2.to_vec(), true, false)],
        "the dropped unmark landed"
    );
}
