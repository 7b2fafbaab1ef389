//! The non-repudiation log's entries and RFC 6962 tree nodes, in append-only files beside
//! sled.
//!
//! In sled, every log entry cost four B-tree inserts (the entry and, on average, two tree
//! nodes, plus sled's leaf splits and copies every few inserts); the log is append-only
//! and dense, so flat files indexed by arithmetic hold it for a few writes per group.
//!
//! Layout, in the store's `log/` folder:
//! ```text
//! entries, ends   the encoded entries as numbered records (`records.rs`)
//! nodes           the 32-byte hash of perfect subtree (level, index) at 32·p,
//!                 p = 2m − popcount(m) + level, m = the subtree's last leaf: nodes in the
//!                 order appends complete them
//! ```
//!
//! Entries are written, replayed, synced, bounded by the log's size and checked at open as
//! every folder of records is (`records.rs`); the nodes alongside them, the same way.
//!
//! The files carry no checksums of their own: an entry read back is checked against its
//! leaf hash, and the tree's nodes against the last signed checkpoint before the next is
//! signed (`transparency.rs`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use accord_proto::merkle::{Hash, NodeSource, ProofError};

use super::records::{invalid, offset, short, Records};

/// Largest entry the log takes; anything longer read back is a damaged `ends` file.
pub(crate) const MAX_ENTRY: u64 = 1 << 20;

/// The log's files (module docs).
#[derive(Debug)]
pub(crate) struct LogFiles {
    entries: Records,
    nodes: File,
}

/// The last leaf under node (`level`, `index`); `None` past `u64`.
fn last_leaf(level: u32, index: u64) -> Option<u64> {
    index
        .checked_add(1)?
        .checked_mul(1u64.checked_shl(level)?)?
        .checked_sub(1)
}

/// Where node (`level`, `index`) sits in `nodes`, counted in nodes; `None` past `u64`.
pub(crate) fn node_position(level: u32, index: u64) -> Option<u64> {
    let m = last_leaf(level, index)?;
    // Appending leaf k completes trailing_ones(k) + 1 nodes, so 2m − popcount(m) nodes
    // precede leaf m's, which come level by level.
    (m.checked_mul(2)? - u64::from(m.count_ones())).checked_add(u64::from(level))
}

/// Whether node (`level`, `index`) exists in a log of `size` entries.
pub(crate) fn node_exists(level: u32, index: u64, size: u64) -> bool {
    last_leaf(level, index).is_some_and(|m| m < size)
}

/// How many nodes a log of `size` entries has: leaf k completes trailing_ones(k) + 1.
fn node_count(size: u64) -> Option<u64> {
    size.checked_mul(2)?
        .checked_sub(u64::from(size.count_ones()))
}

impl LogFiles {
    /// Opens (or creates) the files in `dir`, and syncs `dir`.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        let entries = Records::open(dir, MAX_ENTRY)?;
        let nodes = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("nodes"))?;
        File::open(dir)?.sync_all()?;
        Ok(Self { entries, nodes })
    }

    /// Writes entries (by index, ascending and contiguous with what is on file) and tree
    /// nodes, one write per run of adjacent positions. Writes the same bytes at the same
    /// offsets when called again with the same arguments, which is how replay stays safe.
    pub(crate) fn write(
        &self,
        entries: &[(u64, &[u8])],
        nodes: &mut [(u64, &[u8])],
    ) -> std::io::Result<()> {
        self.entries.write(entries)?;
        nodes.sort_unstable_by_key(|(position, _)| *position);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        for (position, hash) in nodes.iter() {
            if hash.len() != 32 {
                return Err(invalid("a tree node is not 32 bytes"));
            }
            if !run.is_empty() && run_start + (run.len() / 32) as u64 != *position {
                self.nodes.write_all_at(&run, offset(run_start, 32)?)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = *position;
            }
            run.extend_from_slice(hash);
        }
        if !run.is_empty() {
            self.nodes.write_all_at(&run, offset(run_start, 32)?)?;
        }
        Ok(())
    }

    /// Entry `index`, which the caller knows is below the log's size, checked against its
    /// leaf hash.
    pub(crate) fn entry(&self, index: u64) -> std::io::Result<Vec<u8>> {
        let entry = self.entries.get(index)?;
        if accord_proto::log::leaf_hash(&entry) != self.node(0, index)? {
            return Err(invalid("a log entry does not match its leaf hash"));
        }
        Ok(entry)
    }

    /// Tree node (`level`, `index`), which the caller knows exists.
    pub(crate) fn node(&self, level: u32, index: u64) -> std::io::Result<Hash> {
        let position = node_position(level, index)
            .ok_or_else(|| invalid("tree node position out of range"))?;
        let mut hash = [0; 32];
        self.nodes.read_exact_at(&mut hash, offset(position, 32)?)?;
        Ok(hash)
    }

    /// Checks that the files hold a log of `size` entries: its entries and its nodes. They
    /// hold more after a crash; less means they were lost or cut short.
    pub(crate) fn check_holds(&self, size: u64) -> std::io::Result<()> {
        self.entries.check_holds(size)?;
        let nodes = node_count(size).ok_or_else(|| invalid("log size past 2^63"))?;
        if self.nodes.metadata()?.len() < offset(nodes, 32)? {
            return Err(short("nodes", size));
        }
        Ok(())
    }

    /// `fdatasync` of the three files.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.entries.sync()?;
        self.nodes.sync_data()
    }

    /// Bytes the files occupy.
    pub(crate) fn bytes(&self) -> std::io::Result<u64> {
        Ok(self.entries.bytes()? + self.nodes.metadata()?.len())
    }
}

/// For the committer, which reads only nodes that appends before it completed.
impl NodeSource for LogFiles {
    fn node(&self, level: u32, index: u64) -> Result<Hash, ProofError> {
        LogFiles::node(self, level, index).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProofError::MissingNode { level, index },
            _ => ProofError::Storage(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use accord_proto::merkle::{self, MemoryTree};

    use super::*;

    /// The position formula against the order appends complete nodes in.
    #[test]
    fn node_positions_follow_the_order_appends_complete_nodes() {
        let mut position = 0;
        for leaf in 0u64..1000 {
            let (mut level, mut index) = (0, leaf);
            loop {
                assert_eq!(
                    node_position(level, index),
                    Some(position),
                    "({level}, {index})"
                );
                assert!(node_exists(level, index, leaf + 1));
                assert!(!node_exists(level, index, leaf));
                position += 1;
                if index & 1 == 0 {
                    break;
                }
                (level, index) = (level + 1, index >> 1);
            }
        }
        assert_eq!(node_position(63, 2), None);
        assert_eq!(node_position(64, 0), None);
        assert_eq!(node_position(0, u64::MAX), None);
        assert!(!node_exists(64, 0, u64::MAX));
    }

    /// Entries and nodes written group by group read back, and rewriting every group again
    /// in order, after all were written (a replay), changes no byte of any file.
    #[test]
    fn groups_of_entries_and_nodes_read_back_and_rewrite_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::open(&dir.path().join("log")).unwrap();
        let mut tree = MemoryTree::new();
        let entries: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 1 + i as usize * 7]).collect();
        let mut groups = Vec::new();
        let mut next = 0;
        for group_len in [1, 3, 7, 2, 15, 22] {
            let group: Vec<(u64, &[u8])> = (next..next + group_len)
                .map(|i| (i, entries[i as usize].as_slice()))
                .collect();
            let mut nodes = Vec::new();
            for &(i, entry) in &group {
                let leaf = accord_proto::log::leaf_hash(entry);
                nodes.extend(merkle::completed_nodes(&tree, i, leaf).unwrap());
                tree.push(leaf);
            }
            let nodes: Vec<(u64, [u8; 32])> = nodes
                .into_iter()
                .map(|(l, i, h)| (node_position(l, i).unwrap(), h))
                .collect();
            let mut refs: Vec<(u64, &[u8])> = nodes.iter().map(|(p, h)| (*p, &h[..])).collect();
            files.write(&group, &mut refs).unwrap();
            groups.push((group, nodes));
            next += group_len;
        }
        assert_eq!(next, 50);
        let read_all =
            || ["entries", "ends", "nodes"].map(|f| std::fs::read(dir.path().join("log").join(f)));
        let written = read_all().map(Result::unwrap);
        for (group, nodes) in &groups {
            let mut refs: Vec<(u64, &[u8])> = nodes.iter().map(|(p, h)| (*p, &h[..])).collect();
            files.write(group, &mut refs).unwrap();
        }
        assert_eq!(read_all().map(Result::unwrap), written);
        assert_eq!(written[1].len(), 50 * 8);
        assert_eq!(written[2].len() as u64, node_count(50).unwrap() * 32);

        let files = LogFiles::open(&dir.path().join("log")).unwrap();
        files.check_holds(50).unwrap();
        assert!(files.check_holds(51).is_err());
        // Each file at its exact length holds the log; one byte less does not.
        for (file, written) in [&files.entries.entries, &files.entries.ends, &files.nodes]
            .iter()
            .zip(&written)
        {
            file.set_len(written.len() as u64 - 1).unwrap();
            assert!(files.check_holds(50).is_err());
            file.write_all_at(&written[written.len() - 1..], written.len() as u64 - 1)
                .unwrap();
            files.check_holds(50).unwrap();
        }
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(&files.entry(i as u64).unwrap(), entry);
        }
        for size in 1..=50 {
            assert_eq!(
                merkle::root(&files, size).unwrap(),
                merkle::root(&tree, size).unwrap()
            );
        }
        assert!(files.entry(50).is_err(), "an entry past the end");
    }

    /// Node writes that are not 32 bytes or land past 2^64 bytes are refused; an entry that
    /// no longer matches its leaf hash is refused on read (damaged `ends` and the rest of
    /// the records' checks: `records.rs`).
    #[test]
    fn bad_node_writes_and_a_changed_entry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::open(dir.path()).unwrap();
        let kind = |e: std::io::Error| e.kind();
        let invalid = Err(std::io::ErrorKind::InvalidData);
        assert_eq!(
            files.write(&[], &mut [(0, &[1; 31][..])]).map_err(kind),
            invalid
        );
        let far = u64::MAX / 2;
        assert_eq!(
            files.write(&[], &mut [(far, &[1; 32][..])]).map_err(kind),
            invalid
        );
        let leaf = accord_proto::log::leaf_hash(b"abc");
        files.write(&[(0, b"abc")], &mut [(0, &leaf[..])]).unwrap();
        assert_eq!(files.entry(0).unwrap(), b"abc");
        files.entries.entries.write_all_at(b"x", 1).unwrap();
        assert_eq!(
            files.entry(0).map_err(kind),
            Err(std::io::ErrorKind::InvalidData)
        );
    }
}
