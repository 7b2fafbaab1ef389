use super::*;
use crate::crypto::hpke::RecipientKey;

pub(crate) struct Fixture {
    pub sender: SigningKey,
    pub recipient: RecipientKey,
    pub directories: Directories,
}

const NOW: i64 = 1_750_000_000_000;

fn fixture() -> Fixture {
    let sender = SigningKey::from_seed("vn-c02-sig-1", [1; 32]).unwrap();
    let recipient = RecipientKey::from_bytes([2; 32]);
    let key = |id: &str, pk: [u8; 32]| pb::PublicKey {
        key_id: id.into(),
        public_key: pk.to_vec(),
        not_before_ms: 0,
        not_after_ms: i64::MAX,
    };
    let vn = pb::Directory {
        country: "vn".into(),
        version: 1,
        orgs: vec![pb::OrgEntry {
            id: "spiffe://vn.accord/org/c02".into(),
            name: "C02".into(),
            signing_keys: vec![key("vn-c02-sig-1", sender.public_key())],
            encryption_keys: vec![],
            roles: vec![],
            province: String::new(),
        }],
        gateways: vec![],
    };
    let kh = pb::Directory {
        country: "kh".into(),
        version: 1,
        orgs: vec![pb::OrgEntry {
            id: "spiffe://kh.accord/org/ahtd".into(),
            name: "AHTD".into(),
            signing_keys: vec![],
            encryption_keys: vec![key("kh-ahtd-enc-1", recipient.public_key())],
            roles: vec![],
            province: String::new(),
        }],
        gateways: vec![],
    };
    Fixture {
        sender,
        recipient,
        directories: Directories::new([vn, kh]).unwrap(),
    }
}

fn header() -> pb::Header {
    pb::Header {
        message_id: MessageId::new_v7(NOW as u64, [5; 10]).as_bytes().to_vec(),
        kind: pb::Kind::Alert as i32,
        case_ref: "VN-KH-2026-0001".into(),
        sender_org: "spiffe://vn.accord/org/c02".into(),
        recipient_org: "spiffe://kh.accord/org/ahtd".into(),
        recipient_key_id: "kh-ahtd-enc-1".into(),
        created_at_ms: NOW,
        expires_at_ms: NOW + 3_600_000,
        priority: pb::Priority::Urgent as i32,
        handling_code: "H0".into(),
        ..Default::default()
    }
}

fn body() -> pb::Body {
    pb::Body {
        form: Some(pb::body::Form::Alert(pb::Alert {
            what: "group of 5 crossing".into(),
            r#where: "Moc Bai - Bavet".into(),
            ..Default::default()
        })),
    }
}

fn sealed(f: &Fixture) -> SealedEnvelope {
    seal_with_ephemeral_ikm(
        header(),
        &body(),
        &f.recipient.public_key(),
        &f.sender,
        &[4; 32],
    )
    .unwrap()
}

#[test]
fn a_sealed_envelope_verifies_and_opens_to_its_body() {
    let f = fixture();
    let env = sealed(&f).verify(&f.directories, NOW).unwrap();
    assert_eq!(env.sender().to_string(), "spiffe://vn.accord/org/c02");
    assert_eq!(env.open(&f.recipient).unwrap(), body());
}

#[test]
fn the_hash_covers_every_part_with_length_prefixes() {
    let f = fixture();
    let s = sealed(&f);
    let w = s.to_wire();
    let manual = crypto::sha256(&[
        &len_be(&w.header),
        &w.header,
        &len_be(&w.ciphertext),
        &w.ciphertext,
        &len_be(&w.signature),
        &w.signature,
    ]);
    assert_eq!(s.hash().0, manual);
}

#[test]
fn any_flipped_byte_of_header_ciphertext_or_signature_is_refused() {
    let f = fixture();
    let wire = sealed(&f).to_wire();
    let lens = [
        wire.header.len(),
        wire.ciphertext.len(),
        wire.signature.len(),
    ];
    for (part, len) in lens.into_iter().enumerate() {
        for i in 0..len {
            let mut t = wire.clone();
            let bytes = match part {
                0 => &mut t.header,
                1 => &mut t.ciphertext,
                _ => &mut t.signature,
            };
            let mut flipped = bytes.to_vec();
            flipped[i] ^= 0x01;
            *bytes = flipped.into();
            let res = SealedEnvelope::from_wire(t, &Limits::default())
                .and_then(|s| s.verify(&f.directories, NOW));
            assert!(res.is_err(), "part {part} byte {i} accepted");
        }
    }
}

#[test]
fn the_wrong_recipient_key_cannot_open() {
    let f = fixture();
    let env = sealed(&f).verify(&f.directories, NOW).unwrap();
    let wrong = RecipientKey::from_bytes([3; 32]);
    assert_eq!(env.open(&wrong), Err(EnvelopeError::CommitmentMismatch));
}

#[test]
fn a_commitment_mismatch_is_refused_even_when_signed() {
    // A sender who signs a header whose commitment does not match the HPKE context
    // (e.g. to open differently for different keys) is caught on open.
    let f = fixture();
    let mut h = header();
    let id = MessageId::from_slice(&h.message_id).unwrap();
    let info = [INFO_PREFIX, id.as_bytes()].concat();
    let (enc, mut ctx) =
        hpke::setup_base_sender(&f.recipient.public_key(), &info, &[4; 32]).unwrap();
    h.sender_key_id = f.sender.key_id().into();
    h.hpke_enc = enc.to_vec();
    h.key_commitment = vec![0xee; 32];
    let hb = h.encode_to_vec();
    let ct = ctx.seal(&hb, &body().encode_to_vec()).unwrap();
    let sig = f.sender.sign(
        Domain::Envelope,
        &[&len_be(&hb), &hb, &crypto::sha256(&[&ct])],
    );
    let wire = pb::Envelope {
        header: hb.into(),
        ciphertext: ct.into(),
        signature: sig.to_vec().into(),
    };
    let env = SealedEnvelope::from_wire(wire, &Limits::default())
        .unwrap()
        .verify(&f.directories, NOW)
        .unwrap();
    assert_eq!(
        env.open(&f.recipient),
        Err(EnvelopeError::CommitmentMismatch)
    );
}

#[test]
fn expired_and_future_envelopes_are_refused() {
    let f = fixture();
    assert_eq!(
        sealed(&f).verify(&f.directories, NOW + 3_600_000),
        Err(EnvelopeError::Expired)
    );
    assert_eq!(
        sealed(&f).verify(&f.directories, NOW - MAX_CLOCK_SKEW_MS - 1),
        Err(EnvelopeError::ClockSkew)
    );
}

#[test]
fn a_signature_by_an_unlisted_key_is_refused() {
    let f = fixture();
    let rogue = SigningKey::from_seed("vn-c02-sig-1", [7; 32]).unwrap();
    let s = seal_with_ephemeral_ikm(
        header(),
        &body(),
        &f.recipient.public_key(),
        &rogue,
        &[4; 32],
    )
    .unwrap();
    assert_eq!(
        s.verify(&f.directories, NOW),
        Err(EnvelopeError::BadSignature)
    );
    let unknown = SigningKey::from_seed("vn-c02-sig-9", [1; 32]).unwrap();
    let s = seal_with_ephemeral_ikm(
        header(),
        &body(),
        &f.recipient.public_key(),
        &unknown,
        &[4; 32],
    )
    .unwrap();
    assert!(matches!(
        s.verify(&f.directories, NOW),
        Err(EnvelopeError::UnknownSender(_))
    ));
}

#[test]
fn oversize_parts_are_refused_before_parsing() {
    let f = fixture();
    let mut wire = sealed(&f).to_wire();
    let limits = Limits {
        max_header: 4096,
        max_ciphertext: 16,
    };
    assert_eq!(
        SealedEnvelope::from_wire(wire.clone(), &limits),
        Err(EnvelopeError::TooLarge("ciphertext"))
    );
    wire.header = vec![0; 5000].into();
    assert_eq!(
        SealedEnvelope::from_wire(wire, &Limits::default()),
        Err(EnvelopeError::TooLarge("header"))
    );
}

#[test]
fn malformed_headers_are_refused() {
    let f = fixture();
    let bad_headers = [
        pb::Header {
            message_id: vec![1; 16],
            ..header()
        },
        pb::Header {
            sender_org: "spiffe://vn.accord/gateway/hanoi".into(),
            ..header()
        },
        pb::Header {
            kind: 0,
            ..header()
        },
        pb::Header {
            expires_at_ms: NOW - 1,
            ..header()
        },
        pb::Header {
            case_ref: String::new(),
            ..header()
        },
        // Printed and logged by clients: no newlines, quotes or control characters.
        pb::Header {
            case_ref: "VN-KH-1\nforged log line".into(),
            ..header()
        },
        pb::Header {
            case_ref: "VN-KH-\u{202e}1".into(),
            ..header()
        },
        pb::Header {
            handling_code: String::new(),
            ..header()
        },
        pb::Header {
            handling_code: "H3:".into(),
            ..header()
        },
        pb::Header {
            evaluation: "D9".into(),
            ..header()
        },
    ];
    for h in bad_headers {
        let res =
            seal_with_ephemeral_ikm(h, &body(), &f.recipient.public_key(), &f.sender, &[4; 32])
                .and_then(|s| s.verify(&f.directories, NOW));
        assert!(matches!(res, Err(EnvelopeError::Malformed(_))), "{res:?}");
    }
    let garbage = pb::Envelope {
        header: vec![0xff; 40].into(),
        ciphertext: Default::default(),
        signature: vec![0; 64].into(),
    };
    assert!(matches!(
        SealedEnvelope::from_wire(garbage, &Limits::default())
            .unwrap()
            .verify(&f.directories, NOW),
        Err(EnvelopeError::Malformed(_))
    ));
}

#[test]
fn a_misaddressed_envelope_is_refused() {
    let f = fixture();
    for (org, key) in [
        ("spiffe://zz.accord/org/nobody", "kh-ahtd-enc-1"),
        ("spiffe://kh.accord/org/ahtd", "kh-ahtd-enc-9"),
    ] {
        let h = pb::Header {
            recipient_org: org.into(),
            recipient_key_id: key.into(),
            ..header()
        };
        let s = seal_with_ephemeral_ikm(h, &body(), &f.recipient.public_key(), &f.sender, &[4; 32])
            .unwrap();
        assert!(matches!(
            s.verify(&f.directories, NOW),
            Err(EnvelopeError::UnknownRecipient(_))
        ));
    }
}

#[test]
fn a_header_with_duplicate_or_unknown_fields_is_refused_though_signed() {
    let f = fixture();
    let good = sealed(&f).to_wire();
    // Field 3 (case_ref) again, then an unknown field 99: prost would accept both.
    let mut extra = good.header.to_vec();
    extra.extend_from_slice(&[0x1a, 0x05, b'O', b'T', b'H', b'E', b'R']);
    let mut unknown = good.header.to_vec();
    unknown.extend_from_slice(&[0x98, 0x06, 0x01]);
    for header in [extra, unknown] {
        let sig = f.sender.sign(
            Domain::Envelope,
            &[
                &len_be(&header),
                &header,
                &crypto::sha256(&[&good.ciphertext]),
            ],
        );
        let wire = pb::Envelope {
            header: header.into(),
            ciphertext: good.ciphertext.clone(),
            signature: sig.to_vec().into(),
        };
        let res = SealedEnvelope::from_wire(wire, &Limits::default())
            .unwrap()
            .verify(&f.directories, NOW);
        assert!(matches!(res, Err(EnvelopeError::Malformed(_))), "{res:?}");
    }
}

#[test]
fn a_backdated_envelope_with_a_long_lifetime_is_refused() {
    let f = fixture();
    let h = pb::Header {
        created_at_ms: NOW - 400 * 86_400_000,
        expires_at_ms: NOW + 86_400_000,
        ..header()
    };
    let s = seal_with_ephemeral_ikm(h, &body(), &f.recipient.public_key(), &f.sender, &[4; 32])
        .unwrap();
    assert!(matches!(
        s.verify(&f.directories, NOW),
        Err(EnvelopeError::Malformed(_))
    ));
}

#[test]
fn seal_draws_a_fresh_ephemeral_key_each_time() {
    let f = fixture();
    let pk = f.recipient.public_key();
    let a = seal(header(), &body(), &pk, &f.sender).unwrap().to_wire();
    let b = seal(header(), &body(), &pk, &f.sender).unwrap().to_wire();
    assert_ne!(
        a.header, b.header,
        "same enc twice would reuse the AES-GCM nonce"
    );
}

#[test]
fn debug_output_shows_ids_and_hashes_not_case_data() {
    let f = fixture();
    let env = sealed(&f).verify(&f.directories, NOW).unwrap();
    let dbg = format!("{env:?}");
    assert!(
        !dbg.contains("VN-KH-2026-0001") && !dbg.contains("c02"),
        "{dbg}"
    );
}

#[test]
fn attachments_seal_beside_the_envelope_and_open_with_its_chunk_key() {
    let f = fixture();
    let mut sealer = Sealer::new(header(), &f.recipient.public_key()).unwrap();
    let file: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let mut a = sealer.attachment(4096).unwrap();
    let chunks: Vec<Vec<u8>> = file.chunks(4096).map(|c| a.push(c).unwrap()).collect();
    let (sealed_file, hashes) = a.finish().unwrap();
    sealer.add_attachment(sealed_file).unwrap();
    let env = sealer
        .seal(&body(), &f.sender)
        .unwrap()
        .verify(&f.directories, NOW)
        .unwrap();
    let d = &env.attachments()[0];
    let list: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_vec()).collect();
    let checked = attachment::check_hash_list(d, &list).unwrap();
    let (opened, key) = env.open_with_chunk_key(&f.recipient).unwrap();
    assert_eq!(opened, body());
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        attachment::check_chunk(d, &checked, i as u64, c).unwrap();
        out.extend(key.open(0, i as u64, c).unwrap());
    }
    assert_eq!(out, file);
    // The digest is signed: a chunk list for other bytes does not fit it.
    let mut other = list.clone();
    other[0] = crypto::sha256(&[b"other"]).to_vec();
    assert!(attachment::check_hash_list(d, &other).is_err());
}

#[test]
fn header_attachment_digests_out_of_the_rules_are_refused() {
    let f = fixture();
    let good = pb::AttachmentDigest {
        size: 10,
        chunk_size: attachment::MIN_CHUNK_SIZE,
        chunks_root: vec![0; 32],
    };
    let too_many = vec![good.clone(); attachment::MAX_ATTACHMENTS + 1];
    let bad = [
        vec![pb::AttachmentDigest {
            size: 0,
            ..good.clone()
        }],
        vec![pb::AttachmentDigest {
            chunk_size: 1,
            ..good.clone()
        }],
        vec![pb::AttachmentDigest {
            chunks_root: vec![],
            ..good.clone()
        }],
        too_many,
    ];
    for digests in bad {
        let mut sealer = Sealer::new(header(), &f.recipient.public_key()).unwrap();
        for d in digests {
            sealer.add_unsealed_digest(d).unwrap();
        }
        let res = sealer
            .seal(&body(), &f.sender)
            .and_then(|s| s.verify(&f.directories, NOW));
        assert!(matches!(res, Err(EnvelopeError::Malformed(_))), "{res:?}");
    }
    // One good digest passes the envelope layer (its chunks are the gateway's business).
    let mut sealer = Sealer::new(header(), &f.recipient.public_key()).unwrap();
    sealer.add_unsealed_digest(good).unwrap();
    assert!(sealer
        .seal(&body(), &f.sender)
        .unwrap()
        .verify(&f.directories, NOW)
        .is_ok());
}

#[test]
fn attachment_sealers_never_share_an_index_and_take_their_own_place() {
    let f = fixture();
    let mut sealer = Sealer::new(header(), &f.recipient.public_key()).unwrap();
    let mut first = sealer.attachment(attachment::MIN_CHUNK_SIZE).unwrap();
    first.push(b"first file").unwrap();
    let (first, _) = first.finish().unwrap();
    let mut second = sealer.attachment(attachment::MIN_CHUNK_SIZE).unwrap();
    second.push(b"second file").unwrap();
    let (second, _) = second.finish().unwrap();
    assert_eq!((first.index(), second.index()), (0, 1));
    // The second cannot take the first's place (its chunks carry nonces of index 1), nor
    // can a digest sealed elsewhere take the place the first reserved.
    assert!(sealer.add_attachment(second.clone()).is_err());
    assert!(sealer.add_unsealed_digest(first.digest().clone()).is_err());
    sealer.add_attachment(first).unwrap();
    sealer.add_attachment(second).unwrap();
    assert_eq!(sealer.header().attachments.len(), 2);
}
