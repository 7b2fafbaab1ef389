//! Merkle tree roots and proofs for the non-repudiation log: RFC 9162 §2.1 (= RFC 6962 §2.1).
//!
//! Hashing is [`crate::log::leaf_hash`] and [`crate::log::node_hash`]; this module only arranges
//! them. A tree is stored as its *perfect subtrees*: node `(level, index)` is the root of the
//! `2^level` leaves starting at leaf `index << level` (level 0 holds the leaf hashes). Every
//! appended leaf completes at most `log2(n) + 1` of them ([`completed_nodes`]), and every root and
//! proof is built from `O(log n)` of them through a [`NodeSource`]: a right edge that is not a
//! perfect subtree is hashed from the perfect subtrees it is made of, never from leaves.
//!
//! Verification ([`verify_inclusion`], [`verify_consistency`]) is arithmetic on the proof alone,
//! following the algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2. No function here panics, whatever
//! its input: sizes and indices are checked first, and proofs of the wrong length are rejected
//! before any hashing.

use crate::crypto::sha256;
use crate::log::node_hash;

/// A SHA-256 Merkle tree hash: a leaf hash, an interior node or a tree root.
pub type Hash = [u8; 32];

/// Why a proof could not be built or did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// A leaf index is not below the tree size (`0 <= index < size` is required).
    #[error("leaf index {index} is out of range for tree size {size}")]
    IndexOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size it was asked for.
        size: u64,
    },
    /// A consistency proof needs `0 < size1 <= size2`: the new tree cannot be smaller, and a
    /// proof from the empty tree is meaningless (every tree extends it; RFC 9162 §2.1.4.1 defines
    /// `PROOF(m, D_n)` for `0 < m < n`, and `m == n` gives the empty proof).
    #[error("tree sizes {size1} and {size2} do not satisfy 0 < size1 <= size2")]
    SizesOutOfOrder {
        /// The older tree's size.
        size1: u64,
        /// The newer tree's size.
        size2: u64,
    },
    /// A proof has the wrong number of hashes for its index and sizes.
    #[error("proof has {got} hashes, expected {expected}")]
    WrongProofLength {
        /// The length the index and sizes call for.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// The root hash computed from the proof differs from the one given.
    #[error("the proof does not lead to the expected root hash")]
    RootMismatch,
    /// The node source does not hold a node the computation needs (for example, the tree is
    /// smaller than the size asked for).
    #[error("missing tree node at level {level}, index {index}")]
    MissingNode {
        /// The node's level (0 = leaves).
        level: u32,
        /// The node's index within its level.
        index: u64,
    },
    /// The node source failed to read a node.
    #[error("node storage: {0}")]
    Storage(String),
}

/// Read access to a tree's stored perfect-subtree nodes.
pub trait NodeSource {
    /// Hash of the perfect subtree at `level` whose leftmost leaf is `index << level`; level 0 =
    /// leaf hashes. Returns [`ProofError::MissingNode`] if the node is not (yet) stored.
    fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError>;
}

/// Root of the first `size` leaves (size 0: SHA-256 of the empty string). Uses only stored
/// perfect-subtree nodes: O(log n) node reads (one per set bit of `size`).
///
/// This is MTH(D\[0:size\]) of RFC 9162 §2.1.1.
pub fn root(src: &impl NodeSource, size: u64) -> Result<Hash, ProofError> {
    range_hash(src, 0, size)
}

/// RFC 9162 §2.1.3.1: PATH(index, D\[0:size\]), the inclusion proof of leaf `index` in the tree
/// of the first `size` leaves, ordered from the leaf's sibling up to the root's child.
///
/// Errors: [`ProofError::IndexOutOfRange`] unless `index < size`; a source error (such as
/// [`ProofError::MissingNode`] if the source holds fewer than `size` leaves). O(log n) reads.
pub fn inclusion_proof(
    src: &impl NodeSource,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // Walk down from the root. Invariant: the current subtree is D[start:start+n], `m` is the
    // leaf's index within it, and `start` is a multiple of a power of two >= n.
    let (mut start, mut n, mut m) = (0u64, size, index);
    let mut top_down = Vec::new();
    while n > 1 {
        let k = split(n);
        if m < k {
            // PATH(m, D[0:k]) : MTH(D[k:n])
            top_down.push(range_hash(src, start + k, n - k)?);
            n = k;
        } else {
            // PATH(m - k, D[k:n]) : MTH(D[0:k])
            top_down.push(range_hash(src, start, k)?);
            (start, n, m) = (start + k, n - k, m - k);
        }
    }
    top_down.reverse();
    Ok(top_down)
}

/// RFC 9162 §2.1.4.1: PROOF(size1, D\[0:size2\]), the consistency proof between the trees of the
/// first `size1` and the first `size2` leaves. Empty if `size1 == size2`.
///
/// Errors: [`ProofError::SizesOutOfOrder`] unless `0 < size1 <= size2`; a source error (such as
/// [`ProofError::MissingNode`] if the source holds fewer than `size2` leaves). O(log n) reads.
pub fn consistency_proof(
    src: &impl NodeSource,
    size1: u64,
    size2: u64,
) -> Result<Vec<Hash>, ProofError> {
    if size1 == 0 || size1 > size2 {
        return Err(ProofError::SizesOutOfOrder { size1, size2 });
    }
    // SUBPROOF(m, D[start:start+n], b), unrolled; same invariant as in `inclusion_proof`.
    let (mut start, mut n, mut m, mut b) = (0u64, size2, size1, true);
    let mut top_down = Vec::new();
    while m < n {
        let k = split(n);
        if m <= k {
            // SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            top_down.push(range_hash(src, start + k, n - k)?);
            n = k;
        } else {
            // SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            top_down.push(range_hash(src, start, k)?);
            (start, n, m, b) = (start + k, n - k, m - k, false);
        }
    }
    // m == n: SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}.
    if !b {
        top_down.push(range_hash(src, start, n)?);
    }
    top_down.reverse();
    Ok(top_down)
}

/// RFC 9162 §2.1.3.2: verifies that `proof` shows the leaf hash `leaf` at `index` in the tree of
/// `size` leaves whose root is `root`.
///
/// Errors: [`ProofError::IndexOutOfRange`] unless `index < size`;
/// [`ProofError::WrongProofLength`]; [`ProofError::RootMismatch`].
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let expected = inclusion_proof_len(index, size);
    let wrong_length = ProofError::WrongProofLength {
        expected,
        got: proof.len(),
    };
    if proof.len() != expected {
        return Err(wrong_length);
    }
    // Steps 2-5 of §2.1.3.2 (with the length checked, `s` reaches 0 exactly at the end).
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(wrong_length);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                (f, s) = (f >> 1, s >> 1);
            }
        } else {
            r = node_hash(&r, p);
        }
        (f, s) = (f >> 1, s >> 1);
    }
    if s != 0 {
        return Err(wrong_length);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: verifies that `proof` shows the tree of `size2` leaves with root `root2`
/// extends the tree of `size1` leaves with root `root1`.
///
/// `size1 == size2` needs an empty proof and equal roots. Errors:
/// [`ProofError::SizesOutOfOrder`] unless `0 < size1 <= size2` (a proof from the empty tree is
/// meaningless: a caller whose last seen size is 0 has nothing to check);
/// [`ProofError::WrongProofLength`]; [`ProofError::RootMismatch`].
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if size1 == 0 || size1 > size2 {
        return Err(ProofError::SizesOutOfOrder { size1, size2 });
    }
    let expected = consistency_proof_len(size1, size2);
    let wrong_length = ProofError::WrongProofLength {
        expected,
        got: proof.len(),
    };
    if proof.len() != expected {
        return Err(wrong_length);
    }
    if size1 == size2 {
        return if root1 == root2 {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    // Step 2: if size1 is a power of two, the proof starts with root1 (implicitly).
    let (first, rest) = if size1.is_power_of_two() {
        (root1, proof)
    } else {
        match proof.split_first() {
            Some(split) => split,
            None => return Err(wrong_length),
        }
    };
    // Steps 3-7 (with the length checked, `s` reaches 0 exactly at the end).
    let (mut f, mut s) = (size1 - 1, size2 - 1);
    while f & 1 == 1 {
        (f, s) = (f >> 1, s >> 1);
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s == 0 {
            return Err(wrong_length);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                (f, s) = (f >> 1, s >> 1);
            }
        } else {
            sr = node_hash(&sr, c);
        }
        (f, s) = (f >> 1, s >> 1);
    }
    if s != 0 {
        return Err(wrong_length);
    }
    if fr != *root1 || sr != *root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// When leaf `index` (with hash `leaf`) is appended to a tree of size `index`, the
/// perfect-subtree nodes that become complete, bottom-up, starting with `(0, index, leaf)`. The
/// left siblings are read from `src`. O(log n). The caller stores them all; this is how an append
/// stays O(log n).
///
/// Node `(level + 1, i / 2)` completes when node `(level, i)` does and `i` is odd (a right
/// child); its hash is `node_hash(node(level, i - 1), node(level, i))` (RFC 9162 §2.1.1).
/// Errors: [`ProofError::IndexOutOfRange`] if `index == u64::MAX` (the new size would not fit
/// in a `u64`); a source error if a left sibling is missing.
pub fn completed_nodes(
    src: &impl NodeSource,
    index: u64,
    leaf: Hash,
) -> Result<Vec<(u32, u64, Hash)>, ProofError> {
    if index == u64::MAX {
        return Err(ProofError::IndexOutOfRange {
            index,
            size: u64::MAX,
        });
    }
    let (mut level, mut i, mut hash) = (0u32, index, leaf);
    let mut nodes = vec![(level, i, hash)];
    while i & 1 == 1 {
        hash = node_hash(&src.node(level, i - 1)?, &hash);
        (level, i) = (level + 1, i >> 1);
        nodes.push((level, i, hash));
    }
    Ok(nodes)
}

/// An in-memory tree (for tests, auditors and verifiers): append leaf hashes, NodeSource over its
/// stored nodes.
#[derive(Clone, Debug, Default)]
pub struct MemoryTree {
    /// `levels[l][i]` is node `(l, i)`; `levels[0]` holds the leaf hashes.
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash (see [`crate::log::leaf_hash`]) and stores the nodes it completes.
    pub fn push(&mut self, leaf: Hash) {
        // Cannot fail: each left sibling read was stored by an earlier push, and a tree of
        // u64::MAX leaves does not fit in memory.
        let Ok(nodes) = completed_nodes(self, self.size(), leaf) else {
            return;
        };
        for (level, _, hash) in nodes {
            // Nodes complete left to right within a level, so `index` is the row's length.
            match self.levels.get_mut(level as usize) {
                Some(row) => row.push(hash),
                None => self.levels.push(vec![hash]),
            }
        }
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }
}

impl NodeSource for MemoryTree {
    fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.levels.get(level as usize)?.get(i))
            .copied()
            .ok_or(ProofError::MissingNode { level, index })
    }
}

/// The largest power of two below `n` (RFC 9162 §2.1.1's `k`), for `n >= 2`.
fn split(n: u64) -> u64 {
    1 << (63 - n.saturating_sub(1).leading_zeros().min(63))
}

/// MTH(D\[start:start+len\]) (RFC 9162 §2.1.1) for `start` a multiple of a power of two `>= len`,
/// as every subtree in the RFC's recursion is: the perfect subtrees of the binary decomposition of
/// `len`, left to right, hashed together right to left. `len == 0` gives MTH({}) = SHA-256("").
fn range_hash(src: &impl NodeSource, start: u64, len: u64) -> Result<Hash, ProofError> {
    let mut acc: Option<Hash> = None;
    let mut end = start.saturating_add(len);
    for level in 0..u64::BITS {
        if (len >> level) & 1 == 1 {
            end -= 1 << level; // the subtree D[end - 2^level : end]
            let node = src.node(level, end >> level)?;
            acc = Some(match acc {
                Some(right) => node_hash(&node, &right),
                None => node,
            });
        }
    }
    Ok(acc.unwrap_or_else(|| sha256(&[])))
}

/// Length of PATH(index, D\[0:size\]) for `index < size`: one hash per level below the point
/// where the paths to `index` and `size - 1` meet, plus one per left sibling above it.
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let inner = u64::BITS - (index ^ (size - 1)).leading_zeros();
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner + border) as usize
}

/// Length of PROOF(size1, D\[0:size2\]) for `0 < size1 <= size2`: the inclusion path of leaf
/// `size1 - 1` in the new tree without its levels inside the largest perfect subtree that leaf
/// ends (of `2^shift` leaves), plus that subtree's root unless it is the whole old tree.
fn consistency_proof_len(size1: u64, size2: u64) -> usize {
    if size1 == size2 {
        return 0;
    }
    let full = inclusion_proof_len(size1 - 1, size2) as u32;
    // Its lowest `shift` levels are inside that subtree (at least `shift + 1` as size1 < size2).
    let shift = size1.trailing_zeros();
    let seed = u32::from(!size1.is_power_of_two());
    (seed + full.saturating_sub(shift)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::leaf_hash;

    /// RFC 9162 §2.1.1, straight from the definition.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => sha256(&[]),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    fn tree(leaves: &[Hash]) -> MemoryTree {
        let mut t = MemoryTree::new();
        for l in leaves {
            t.push(*l);
        }
        t
    }

    /// Copies of `proof` with one bit flipped in one element: every bit of every element for
    /// trees up to 16 leaves; beyond that (to keep the test fast), one bit of every byte, cycling
    /// through the bit positions.
    fn tampered(proof: &[Hash], size: u64) -> impl Iterator<Item = Vec<Hash>> + '_ {
        let step = if size <= 16 { 1 } else { 8 };
        (0..proof.len() * 256).step_by(step).map(move |i| {
            let (element, byte) = (i / 256, i % 256 / 8);
            let bit = (i + byte) % 8; // with step 8: bit `byte % 8`, so all eight positions
            let mut p = proof.to_vec();
            p[element][byte] ^= 1 << bit;
            p
        })
    }

    /// A node source that counts its reads.
    struct Counting<'a>(&'a MemoryTree, std::cell::Cell<u32>);

    impl NodeSource for Counting<'_> {
        fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError> {
            self.1.set(self.1.get() + 1);
            self.0.node(level, index)
        }
    }

    /// Values in `0..n`: all of them for the exhaustive range (n <= 71, covering every m <= 70),
    /// else the edges, powers of two and an even spread.
    fn sample(n: u64) -> Vec<u64> {
        if n <= 71 {
            return (0..n).collect();
        }
        let mut v: Vec<u64> = (0..8).chain(n - 8..n).collect();
        v.extend((1..24).map(|j| n * j / 24));
        v.extend([63, 64, 65, 127, 128].into_iter().filter(|&x| x < n));
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Tree sizes checked: 0..=70 exhaustively, then a few larger ones.
    fn sizes() -> impl Iterator<Item = u64> {
        (0..=70).chain([127, 128, 129, 1000, 3000])
    }

    /// Leaves enough for every size above and the wrong sizes tried against it (up to 2n + 1).
    const LEAVES: u64 = 6001;

    #[test]
    fn root_matches_mth_and_empty_tree() {
        assert_eq!(
            hex::encode(root(&MemoryTree::new(), 0).unwrap()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let all = leaves(3000);
        let t = tree(&all);
        for n in sizes() {
            assert_eq!(root(&t, n).unwrap(), mth(&all[..n as usize]), "size {n}");
        }
        assert_eq!(
            root(&t, 3001),
            Err(ProofError::MissingNode {
                level: 0,
                index: 3000
            })
        );
    }

    #[test]
    fn rfc6962_known_roots_and_proofs() {
        // The 8-leaf tree of RFC 6962's test data (as used by transparency-dev/merkle).
        let data: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let t = tree(&data.map(leaf_hash));
        assert_eq!(
            hex::encode(root(&t, 8).unwrap()),
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
        );
        assert_eq!(
            hex::encode(root(&t, 3).unwrap()),
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"
        );
        // Known proofs over the same tree, as hex prefixes.
        let short = |p: Vec<Hash>| p.iter().map(|h| hex::encode(&h[..4])).collect::<Vec<_>>();
        let cases = [
            (
                inclusion_proof(&t, 0, 8),
                vec!["96a296d2", "5f083f0a", "6b47aaf2"],
            ),
            (
                inclusion_proof(&t, 5, 8),
                vec!["bc1a0643", "ca854ea1", "d37ee418"],
            ),
            (inclusion_proof(&t, 2, 3), vec!["fac54203"]),
            (
                inclusion_proof(&t, 1, 5),
                vec!["6e340b9c", "5f083f0a", "bc1a0643"],
            ),
            (
                consistency_proof(&t, 1, 8),
                vec!["96a296d2", "5f083f0a", "6b47aaf2"],
            ),
            (
                consistency_proof(&t, 6, 8),
                vec!["0ebc5d34", "ca854ea1", "d37ee418"],
            ),
            (consistency_proof(&t, 2, 5), vec!["5f083f0a", "bc1a0643"]),
            (
                consistency_proof(&t, 6, 7),
                vec!["0ebc5d34", "b08693ec", "d37ee418"],
            ),
        ];
        for (proof, want) in cases {
            assert_eq!(short(proof.unwrap()), want);
        }
    }

    #[test]
    fn inclusion_proofs_verify_and_reject_tampering() {
        let all = leaves(LEAVES);
        let t = tree(&all);
        let root_at = |size: u64| root(&t, size).unwrap();
        for n in sizes() {
            let r = root_at(n);
            for m in sample(n) {
                let leaf = &all[m as usize];
                let proof = inclusion_proof(&t, m, n).unwrap();
                assert_eq!(verify_inclusion(leaf, m, n, &proof, &r), Ok(()), "{m}/{n}");
                assert_eq!(proof.len(), inclusion_proof_len(m, n));
                for bad in tampered(&proof, n) {
                    assert!(verify_inclusion(leaf, m, n, &bad, &r).is_err());
                }
                for wrong in [m ^ 1, m ^ 2, m.wrapping_sub(1), m + 1, u64::MAX] {
                    if wrong != m {
                        let res = verify_inclusion(leaf, wrong, n, &proof, &r);
                        assert!(res.is_err(), "{m}/{n} as index {wrong}");
                    }
                }
                // Against another tree's checkpoint (size and its root).
                for wrong in [n - 1, n + 1, n * 2 + 1, n / 2] {
                    if wrong != n {
                        let res = verify_inclusion(leaf, m, wrong, &proof, &root_at(wrong));
                        assert!(res.is_err(), "{m}/{n} as size {wrong}");
                    }
                }
                let mut longer = proof.clone();
                longer.push(r);
                assert!(verify_inclusion(leaf, m, n, &longer, &r).is_err());
                longer.rotate_right(1);
                assert!(verify_inclusion(leaf, m, n, &longer, &r).is_err());
                if let Some((_, shorter)) = proof.split_last() {
                    assert!(verify_inclusion(leaf, m, n, shorter, &r).is_err());
                }
                if n > 1 {
                    assert!(verify_inclusion(&r, m, n, &proof, &r).is_err());
                }
            }
            assert_eq!(
                inclusion_proof(&t, n, n),
                Err(ProofError::IndexOutOfRange { index: n, size: n })
            );
        }
    }

    #[test]
    fn consistency_proofs_verify_and_reject_tampering() {
        let all = leaves(LEAVES);
        let t = tree(&all);
        let root_at = |size: u64| root(&t, size).unwrap();
        for n in sizes() {
            let r2 = root_at(n);
            assert_eq!(
                consistency_proof(&t, 0, n),
                Err(ProofError::SizesOutOfOrder { size1: 0, size2: n })
            );
            assert!(verify_consistency(0, n, &root_at(0), &r2, &[]).is_err());
            for m in sample(n + 1).into_iter().filter(|&m| m > 0) {
                let r1 = root_at(m);
                let proof = consistency_proof(&t, m, n).unwrap();
                assert_eq!(
                    verify_consistency(m, n, &r1, &r2, &proof),
                    Ok(()),
                    "{m}/{n}"
                );
                assert_eq!(proof.len(), consistency_proof_len(m, n));
                for bad in tampered(&proof, n) {
                    assert!(verify_consistency(m, n, &r1, &r2, &bad).is_err());
                }
                if m != n {
                    assert!(verify_consistency(m, n, &r2, &r1, &proof).is_err());
                    assert!(verify_consistency(m, n, &r1, &r2, &[]).is_err());
                }
                // Against other checkpoints (sizes with their roots), as either tree.
                for wrong in [m - 1, m + 1, m ^ 1, m ^ 2] {
                    if wrong != m && wrong <= LEAVES {
                        let res = verify_consistency(wrong, n, &root_at(wrong), &r2, &proof);
                        assert!(res.is_err(), "{m}/{n} as size1 {wrong}");
                    }
                }
                for wrong in [n - 1, n + 1, n * 2 + 1, n / 2] {
                    if wrong != n {
                        let res = verify_consistency(m, wrong, &r1, &root_at(wrong), &proof);
                        assert!(res.is_err(), "{m}/{n} as size2 {wrong}");
                    }
                }
                let mut longer = proof.clone();
                longer.push(r1);
                assert!(verify_consistency(m, n, &r1, &r2, &longer).is_err());
                longer.rotate_right(1);
                assert!(verify_consistency(m, n, &r1, &r2, &longer).is_err());
                if let Some((_, shorter)) = proof.split_last() {
                    assert!(verify_consistency(m, n, &r1, &r2, shorter).is_err());
                }
            }
            assert_eq!(
                consistency_proof(&t, n + 1, n),
                Err(ProofError::SizesOutOfOrder {
                    size1: n + 1,
                    size2: n
                })
            );
        }
    }

    #[test]
    fn reads_are_logarithmic() {
        let t = tree(&leaves(3000));
        for n in sizes().filter(|&n| n > 0) {
            let bound = 2 * (u64::BITS - n.leading_zeros()) + 1;
            let src = Counting(&t, 0.into());
            let reads = |f: &dyn Fn(&Counting)| {
                src.1.set(0);
                f(&src);
                src.1.get()
            };
            assert!(reads(&|s| drop(root(s, n))) <= n.count_ones());
            for m in sample(n) {
                let r = reads(&|s| drop(inclusion_proof(s, m, n)));
                assert!(r <= bound, "inclusion {m}/{n}: {r} reads");
                let r = reads(&|s| drop(consistency_proof(s, m + 1, n)));
                assert!(r <= bound, "consistency {}/{n}: {r} reads", m + 1);
            }
        }
    }

    #[test]
    fn completed_nodes_match_stored_perfect_subtrees() {
        let all = leaves(300);
        let mut t = MemoryTree::new();
        for (i, leaf) in (0u64..).zip(&all) {
            let nodes = completed_nodes(&t, i, *leaf).unwrap();
            t.push(*leaf);
            // Exactly the perfect subtrees ending at leaf i: one per trailing one bit of i, + 1.
            assert_eq!(nodes.len() as u32, i.trailing_ones() + 1);
            for (k, &(level, index, hash)) in nodes.iter().enumerate() {
                assert_eq!(level as usize, k);
                assert_eq!((index + 1) << level, i + 1);
                let first = (index << level) as usize;
                assert_eq!(hash, mth(&all[first..=i as usize]));
                assert_eq!(t.node(level, index), Ok(hash));
            }
        }
        assert_eq!(t.size(), 300);
        assert!(t.node(0, 300).is_err() && t.node(9, 0).is_err());
    }

    #[test]
    fn edge_cases_never_panic() {
        let t = tree(&leaves(5));
        let h = [7u8; 32];
        let proof = vec![h; 70];
        for a in [0, 1, 2, 5, u64::MAX - 1, u64::MAX] {
            for b in [0, 1, 2, 5, u64::MAX - 1, u64::MAX] {
                for len in [0, 1, 2, 63, 64, 65, 70] {
                    let p = &proof[..len];
                    let _ = verify_inclusion(&h, a, b, p, &h);
                    let _ = verify_consistency(a, b, &h, &h, p);
                }
                let _ = inclusion_proof(&t, a, b);
                let _ = consistency_proof(&t, a, b);
                let _ = root(&t, a);
                let _ = completed_nodes(&t, a, h);
            }
        }
        assert_eq!(
            verify_inclusion(&h, 0, 0, &[], &h),
            Err(ProofError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert_eq!(verify_inclusion(&h, 0, 1, &[], &h), Ok(()));
        assert_eq!(verify_consistency(3, 3, &h, &h, &[]), Ok(()));
        assert_eq!(
            verify_consistency(3, 3, &h, &[0; 32], &[]),
            Err(ProofError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(3, 3, &h, &h, &[h]),
            Err(ProofError::WrongProofLength {
                expected: 0,
                got: 1
            })
        );
        assert!(matches!(
            verify_consistency(0, 0, &h, &h, &[]),
            Err(ProofError::SizesOutOfOrder { .. })
        ));
        assert_eq!(consistency_proof(&t, 5, 5), Ok(vec![]));
        assert!(matches!(
            inclusion_proof(&t, 0, 6),
            Err(ProofError::MissingNode { .. })
        ));
        assert!(completed_nodes(&t, u64::MAX, h).is_err());
        // A full-width tree: sizes near u64::MAX verify without overflow.
        let big = u64::MAX;
        let len = inclusion_proof_len(big - 1, big);
        assert_eq!(len, 63);
        assert_eq!(
            verify_inclusion(&h, big - 1, big, &proof[..len], &h),
            Err(ProofError::RootMismatch)
        );
    }
}
