//! Attachments: files that travel beside an envelope in encrypted chunks (ENVELOPE.md §7).
//!
//! ```text
//! key         = HPKE Export("accord/v1/attachment", 32), same context as the body
//! chunk a,i   = AES-256-GCM(key, nonce = u32be(a) ‖ u64be(i),
//!                           aad = "accord/v1/chunk" ‖ message_id, plaintext chunk)
//! hash a,i    = SHA-256(chunk a,i)
//! root a      = SHA-256("accord/v1/chunks" ‖ hash a,0 ‖ ... ‖ hash a,n-1)
//! header      : attachments[a] = { size, chunk_size, root a }
//! ```
//!
//! The signed header commits to each root, so every chunk's hash is bound into the sender's
//! signature and the envelope hash. A gateway holds no key: it checks a hash list against the
//! root once ([`check_hash_list`]) and then each chunk against its entry ([`check_chunk`]),
//! before anything touches its disk. The recipient checks the same, then decrypts.

use ring::aead;
use zeroize::Zeroizing;

use crate::crypto::{self, ct_eq};
use crate::ids::MessageId;
use crate::pb;

/// HPKE exporter context of the chunk key.
pub(crate) const EXPORT_CONTEXT: &[u8] = b"accord/v1/attachment";
const CHUNK_AAD_PREFIX: &[u8] = b"accord/v1/chunk";
const ROOT_PREFIX: &[u8] = b"accord/v1/chunks";
/// AES-GCM tag bytes each ciphertext chunk carries beyond its plaintext.
pub const TAG_LEN: usize = 16;
/// Most attachments one envelope carries.
pub const MAX_ATTACHMENTS: usize = 16;
/// Smallest and largest plaintext chunk.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Most chunks of one attachment: bounds a hash list (32 bytes each) to 2 MiB.
pub const MAX_CHUNKS: u64 = 1 << 16;
/// The chunk size senders use unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Why an attachment or one of its chunks is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachmentError {
    /// The header's digest is out of the rules (sizes, root length).
    #[error("attachment digest: {0}")]
    Digest(&'static str),
    /// The hash list does not have one 32-byte entry per chunk, or its root differs.
    #[error("chunk hash list does not match the signed header")]
    HashList,
    /// No such chunk (index beyond the attachment's last).
    #[error("chunk {0} is beyond the attachment")]
    NoSuchChunk(u64),
    /// The chunk's length or hash differs from what the header commits to.
    #[error("chunk {0} does not match its signed hash")]
    BadChunk(u64),
    /// The chunk does not decrypt under this message's key.
    #[error("chunk {0} does not decrypt")]
    OpenFailed(u64),
    /// Sealing was used out of order (a chunk after a short one, or an empty attachment).
    #[error("sealing: {0}")]
    Seal(&'static str),
}

/// Number of chunks of an attachment of `size` bytes cut in `chunk_size` pieces.
pub fn chunk_count(d: &pb::AttachmentDigest) -> u64 {
    d.size.div_ceil(u64::from(d.chunk_size.max(1)))
}

/// Checks a digest from a header: size, chunk size, chunk count and root length.
/// Returns the number of chunks.
pub fn check_digest(d: &pb::AttachmentDigest) -> Result<u64, AttachmentError> {
    if d.size == 0 {
        return Err(AttachmentError::Digest("size must be at least 1"));
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&d.chunk_size) {
        return Err(AttachmentError::Digest("chunk_size out of range"));
    }
    if d.chunks_root.len() != 32 {
        return Err(AttachmentError::Digest("chunks_root must be 32 bytes"));
    }
    let n = chunk_count(d);
    if n > MAX_CHUNKS {
        return Err(AttachmentError::Digest("too many chunks"));
    }
    Ok(n)
}

/// Length of ciphertext chunk `i`: its plaintext (a full chunk, or the rest) plus the tag.
pub fn chunk_len(d: &pb::AttachmentDigest, i: u64) -> Result<usize, AttachmentError> {
    let n = chunk_count(d);
    if i >= n {
        return Err(AttachmentError::NoSuchChunk(i));
    }
    let cs = u64::from(d.chunk_size);
    let plain = if i + 1 == n { d.size - cs * i } else { cs };
    Ok(plain as usize + TAG_LEN)
}

/// The root a header commits to for these chunk hashes.
pub fn chunks_root(hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ROOT_PREFIX);
    for h in hashes {
        ctx.update(h);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Checks a chunk hash list (as it travels, `repeated bytes`) against a header's digest.
pub fn check_hash_list(
    d: &pb::AttachmentDigest,
    list: &[Vec<u8>],
) -> Result<Vec<[u8; 32]>, AttachmentError> {
    let n = check_digest(d)?;
    if list.len() as u64 != n {
        return Err(AttachmentError::HashList);
    }
    let hashes = list
        .iter()
        .map(|h| <[u8; 32]>::try_from(h.as_slice()).map_err(|_| AttachmentError::HashList))
        .collect::<Result<Vec<_>, _>>()?;
    if !ct_eq(&chunks_root(&hashes), &d.chunks_root) {
        return Err(AttachmentError::HashList);
    }
    Ok(hashes)
}

/// The chunks of an attachment of `n` chunks that a `GetChunkState` answer does not list as
/// held, in order; NOT_FOUND (nothing held, for the caller) means all of them.
pub fn missing_chunks(
    answer: Result<pb::ChunkState, tonic::Status>,
    n: u32,
) -> Result<Vec<u32>, tonic::Status> {
    let held: std::collections::HashSet<u32> = match answer {
        Ok(state) => state.held.into_iter().collect(),
        Err(s) if s.code() == tonic::Code::NotFound => Default::default(),
        Err(s) => return Err(s),
    };
    Ok((0..n).filter(|i| !held.contains(i)).collect())
}

/// Checks ciphertext chunk `i` against a checked hash list: its length, then its hash.
pub fn check_chunk(
    d: &pb::AttachmentDigest,
    hashes: &[[u8; 32]],
    i: u64,
    chunk: &[u8],
) -> Result<(), AttachmentError> {
    let expected = hashes
        .get(i as usize)
        .ok_or(AttachmentError::NoSuchChunk(i))?;
    if chunk.len() != chunk_len(d, i)? || !ct_eq(&crypto::sha256(&[chunk]), expected) {
        return Err(AttachmentError::BadChunk(i));
    }
    Ok(())
}

/// The key of one message's chunks. The exported secret is zeroized once the AEAD key is
/// built; `Debug` shows only the message id.
pub struct ChunkKey {
    key: aead::LessSafeKey,
    aad: Vec<u8>,
    message_id: MessageId,
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkKey")
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl ChunkKey {
    /// From the exported secret of the message's HPKE context.
    pub(crate) fn new(secret: Zeroizing<Vec<u8>>, message_id: MessageId) -> Self {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &secret)
            .expect("the exporter yields 32 bytes, an AES-256 key");
        Self {
            key: aead::LessSafeKey::new(unbound),
            aad: [CHUNK_AAD_PREFIX, message_id.as_bytes()].concat(),
            message_id,
        }
    }

    fn nonce(attachment: u32, i: u64) -> aead::Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&attachment.to_be_bytes());
        n[4..].copy_from_slice(&i.to_be_bytes());
        aead::Nonce::assume_unique_for_key(n)
    }

    /// Encrypts chunk `i` of attachment `attachment`. Each (attachment, index) pair is sealed
    /// once per message key, so a nonce never repeats under a key.
    fn seal(&self, attachment: u32, i: u64, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        self.key
            .seal_in_place_append_tag(
                Self::nonce(attachment, i),
                aead::Aad::from(&self.aad),
                &mut out,
            )
            .expect("a chunk is far below AES-GCM's message limit");
        out
    }

    /// Whether `plaintext` is what chunk `i` of `attachment` with hash `expected` decrypts to:
    /// sealing is deterministic under a message's key, so a recipient can check bytes it
    /// kept (a download resumed after a crash) without the ciphertext.
    pub fn matches(&self, attachment: u32, i: u64, plaintext: &[u8], expected: &[u8; 32]) -> bool {
        ct_eq(
            &crypto::sha256(&[&self.seal(attachment, i, plaintext)]),
            expected,
        )
    }

    /// Decrypts ciphertext chunk `i` of `attachment` (check it with [`check_chunk`] first).
    pub fn open(
        &self,
        attachment: u32,
        i: u64,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, AttachmentError> {
        let mut buf = ciphertext.to_vec();
        let len = self
            .key
            .open_in_place(
                Self::nonce(attachment, i),
                aead::Aad::from(&self.aad),
                &mut buf,
            )
            .map_err(|_| AttachmentError::OpenFailed(i))?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// Seals one attachment chunk by chunk, so a file of any size passes through a fixed amount of
/// memory. From [`crate::envelope::Sealer::attachment`].
#[derive(Debug)]
pub struct AttachmentSealer<'k> {
    key: &'k ChunkKey,
    index: u32,
    chunk_size: u32,
    size: u64,
    hashes: Vec<[u8; 32]>,
    short_seen: bool,
}

impl<'k> AttachmentSealer<'k> {
    pub(crate) fn new(key: &'k ChunkKey, index: u32, chunk_size: u32) -> Self {
        Self {
            key,
            index,
            chunk_size,
            size: 0,
            hashes: Vec::new(),
            short_seen: false,
        }
    }

    /// Encrypts the next chunk: `chunk_size` bytes, except the last, which may be shorter.
    /// Returns the ciphertext chunk to keep for upload.
    pub fn push(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, AttachmentError> {
        if self.short_seen {
            return Err(AttachmentError::Seal("a chunk after the last (short) one"));
        }
        if plaintext.is_empty() || plaintext.len() > self.chunk_size as usize {
            return Err(AttachmentError::Seal("chunk length out of range"));
        }
        if self.hashes.len() as u64 >= MAX_CHUNKS {
            return Err(AttachmentError::Seal("too many chunks"));
        }
        self.short_seen = plaintext.len() < self.chunk_size as usize;
        let ct = self
            .key
            .seal(self.index, self.hashes.len() as u64, plaintext);
        self.hashes.push(crypto::sha256(&[&ct]));
        self.size += plaintext.len() as u64;
        Ok(ct)
    }

    /// The digest for the header (to pass to `Sealer::add_attachment`) and the hash list for
    /// upload.
    pub fn finish(self) -> Result<(SealedAttachment, Vec<[u8; 32]>), AttachmentError> {
        if self.size == 0 {
            return Err(AttachmentError::Seal(
                "an attachment needs at least one byte",
            ));
        }
        let digest = pb::AttachmentDigest {
            size: self.size,
            chunk_size: self.chunk_size,
            chunks_root: chunks_root(&self.hashes).to_vec(),
        };
        Ok((
            SealedAttachment {
                index: self.index,
                digest,
            },
            self.hashes,
        ))
    }
}

/// An attachment sealed under an index the sealer reserved: it can only take that place in
/// the header, so chunk nonces and header positions agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedAttachment {
    pub(crate) index: u32,
    pub(crate) digest: pb::AttachmentDigest,
}

impl SealedAttachment {
    /// Its 0-based place among the header's attachments.
    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn digest(&self) -> &pb::AttachmentDigest {
        &self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ChunkKey {
        ChunkKey::new(
            Zeroizing::new(vec![7u8; 32]),
            MessageId::new_v7(1_750_000_000_000, [1; 10]),
        )
    }

    fn sealed(key: &ChunkKey, data: &[u8], cs: u32) -> (pb::AttachmentDigest, Vec<Vec<u8>>) {
        let mut s = AttachmentSealer::new(key, 2, cs);
        let chunks = data
            .chunks(cs as usize)
            .map(|c| s.push(c).unwrap())
            .collect();
        (s.finish().unwrap().0.digest, chunks)
    }

    fn list(chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
        chunks
            .iter()
            .map(|c| crypto::sha256(&[c]).to_vec())
            .collect()
    }

    #[test]
    fn chunks_round_trip_and_check_against_the_digest() {
        let k = key();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (d, chunks) = sealed(&k, &data, 4096);
        assert_eq!(check_digest(&d), Ok(3));
        let hashes = check_hash_list(&d, &list(&chunks)).unwrap();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            check_chunk(&d, &hashes, i as u64, c).unwrap();
            out.extend(k.open(2, i as u64, c).unwrap());
        }
        assert_eq!(out, data);
        assert_eq!(chunk_len(&d, 2), Ok(10_000 - 8192 + TAG_LEN));
    }

    #[test]
    fn tampered_swapped_or_truncated_chunks_are_refused() {
        let k = key();
        let (d, chunks) = sealed(&k, &[9u8; 9000], 4096);
        let hashes = check_hash_list(&d, &list(&chunks)).unwrap();
        let mut bad = chunks[1].clone();
        bad[0] ^= 1;
        assert_eq!(
            check_chunk(&d, &hashes, 1, &bad),
            Err(AttachmentError::BadChunk(1))
        );
        // Right bytes at the wrong index: hash and nonce both differ.
        assert_eq!(
            check_chunk(&d, &hashes, 0, &chunks[1]),
            Err(AttachmentError::BadChunk(0))
        );
        assert_eq!(
            k.open(2, 0, &chunks[1]),
            Err(AttachmentError::OpenFailed(0))
        );
        // Another attachment index, another nonce.
        assert_eq!(
            k.open(3, 1, &chunks[1]),
            Err(AttachmentError::OpenFailed(1))
        );
        assert_eq!(
            check_chunk(&d, &hashes, 3, &chunks[0]),
            Err(AttachmentError::NoSuchChunk(3))
        );
        // A hash list missing its last entry, or reordered, or a wrong key's chunks.
        let short = list(&chunks[..2]);
        assert_eq!(check_hash_list(&d, &short), Err(AttachmentError::HashList));
        let mut swapped = list(&chunks);
        swapped.swap(0, 1);
        assert_eq!(
            check_hash_list(&d, &swapped),
            Err(AttachmentError::HashList)
        );
        let other = ChunkKey::new(
            Zeroizing::new(vec![8u8; 32]),
            MessageId::new_v7(1_750_000_000_000, [1; 10]),
        );
        assert_eq!(
            other.open(2, 0, &chunks[0]),
            Err(AttachmentError::OpenFailed(0))
        );
    }

    #[test]
    fn digests_out_of_the_rules_are_refused() {
        let ok = pb::AttachmentDigest {
            size: 1,
            chunk_size: MIN_CHUNK_SIZE,
            chunks_root: vec![0; 32],
        };
        assert_eq!(check_digest(&ok), Ok(1));
        for bad in [
            pb::AttachmentDigest {
                size: 0,
                ..ok.clone()
            },
            pb::AttachmentDigest {
                chunk_size: MIN_CHUNK_SIZE - 1,
                ..ok.clone()
            },
            pb::AttachmentDigest {
                chunk_size: MAX_CHUNK_SIZE + 1,
                ..ok.clone()
            },
            pb::AttachmentDigest {
                chunks_root: vec![0; 31],
                ..ok.clone()
            },
            pb::AttachmentDigest {
                size: (MAX_CHUNKS + 1) * u64::from(MIN_CHUNK_SIZE),
                ..ok.clone()
            },
        ] {
            assert!(check_digest(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_sealer_takes_no_chunk_after_a_short_one() {
        let k = key();
        let mut s = AttachmentSealer::new(&k, 0, 4096);
        s.push(&[1; 10]).unwrap();
        assert!(s.push(&[1; 10]).is_err());
        assert!(AttachmentSealer::new(&k, 0, 4096).finish().is_err());
        assert!(AttachmentSealer::new(&k, 0, 4096).push(&[1; 4097]).is_err());
    }
}
