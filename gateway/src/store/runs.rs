//! Immutable sorted runs: a checkpoint's keys, written once to a file of their own and read
//! by key or by prefix (docs/store-next.md).
//!
//! A run file:
//! ```text
//! block…   entries, then crc32(entries): u32; a block closes once it reaches BLOCK_BYTES
//!          entry: u32 len(key) ‖ key ‖ 0x00 ‖ u32 len(value) ‖ value   (a value)
//!                 u32 len(key) ‖ key ‖ 0x01                            (a removal)
//! index    u32 blocks, then per block: u64 offset ‖ u32 len ‖ u32 len(first key) ‖ first key
//! filter   u32 hashes ‖ u32 prefix bytes ‖ u64 bits ‖ the bits, bytes rounded up: every
//!          key, and every distinct first PREFIX_BYTES of a key at least that long
//! tail     u64 index offset ‖ u64 filter offset ‖ u64 keys
//!          ‖ crc32(index ‖ filter ‖ the tail's first 24 bytes): u32 ‖ "ARN1"
//! ```
//! Integers are big-endian; the checksums are CRC-32 (IEEE). Keys are strictly ascending,
//! within and across blocks. A run is written under a temporary name, synced, then linked
//! into place (never over another run) and its folder synced ([`write`]): a run that can be
//! opened is whole, and its checksums, with each block's keys checked against the index,
//! catch what the disk damaged since, each time a block is read from the file: a block
//! kept in the [`BlockCache`] is checked once, when it is read.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A block closes once its entries reach this many bytes (an entry is never split).
const BLOCK_BYTES: usize = 4 << 10;
/// Filter bits per key: about 1% of absent keys pass it with [`HASHES`] hashes.
const BITS_PER_KEY: u64 = 10;
const HASHES: u32 = 7;
/// Key prefixes the filter holds too, for prefix scans: a message's keys share their first
/// 17 bytes (family, id), and its receipts and events are read by that prefix. A scan
/// under such a prefix skips a run whose filter refuses it, as a lookup does.
const PREFIX_BYTES: u32 = 17;
const MAGIC: &[u8; 4] = b"ARN1";
const TAIL_BYTES: u64 = 8 + 8 + 8 + 4 + 4;
/// Longest footer read back: anything longer is a damaged offset. (A block's length is at
/// most `u32::MAX`, and checked to lie inside the file when the run is opened.)
const MAX_READ: u64 = 1 << 30;

/// What a run holds for a key: a value, or its removal (which hides older runs' values).
pub(crate) type Held = Option<Vec<u8>>;

/// Writes `entries` (strictly ascending keys) as a run at `path`: under a temporary name,
/// synced, then linked into place (an existing file at `path` is an error, never replaced),
/// and the folder synced. Returns how many keys it holds. An error from the folder's sync
/// leaves the run in place: the caller must take it as maybe written.
pub(crate) fn write<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    path: &Path,
    entries: impl IntoIterator<Item = std::io::Result<(K, Option<V>)>>,
) -> std::io::Result<u64> {
    let temporary = temporary_path(path);
    let written = write_file(&temporary, entries);
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    let keys = written?;
    // A link fails where a run already is; a rename would replace it.
    let linked = std::fs::hard_link(&temporary, path);
    std::fs::remove_file(&temporary)?;
    linked?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(keys)
}

/// How the name of a run not yet whole ends ([`temporary_path`]).
pub(crate) const TEMPORARY_SUFFIX: &str = ".tmp";

/// Where [`write`] puts a run before it is whole: a file the store deletes at open.
pub(crate) fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMPORARY_SUFFIX);
    PathBuf::from(name)
}

/// The footer's checksum: the index and filter, then the tail's offsets and key count.
fn footer_crc(footer: &[u8], tail_head: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(footer);
    crc.update(tail_head);
    crc.finalize()
}

fn write_file<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    path: &Path,
    entries: impl IntoIterator<Item = std::io::Result<(K, Option<V>)>>,
) -> std::io::Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut out = BufWriter::new(&file);
    let (mut offset, mut block, mut index) = (0u64, Vec::new(), Vec::new());
    let mut first_key: Option<Vec<u8>> = None;
    let mut last_key: Option<Vec<u8>> = None;
    let (mut hashes, mut keys) = (Vec::new(), 0u64);
    let mut close = |block: &mut Vec<u8>, first: Vec<u8>, out: &mut BufWriter<&File>| {
        block.extend_from_slice(&crc32fast::hash(block).to_be_bytes());
        let len = u32::try_from(block.len()).map_err(|_| invalid("a block of 4 GiB or more"))?;
        out.write_all(block)?;
        index.push((offset, len, first));
        offset += block.len() as u64;
        block.clear();
        std::io::Result::Ok(())
    };
    for entry in entries {
        let (key, value) = entry?;
        let (key, value) = (key.as_ref(), value.as_ref().map(AsRef::as_ref));
        if last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(invalid("run keys must be strictly ascending"));
        }
        let p = PREFIX_BYTES as usize;
        let new_prefix = key.len() >= p
            && last_key
                .as_deref()
                .is_none_or(|last| last.get(..p) != Some(&key[..p]));
        if new_prefix {
            hashes.push(key_hash(&key[..p]));
        }
        match &mut last_key {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => last_key = Some(key.to_vec()),
        }
        hashes.push(key_hash(key));
        keys += 1;
        first_key.get_or_insert_with(|| key.to_vec());
        put_bytes(&mut block, key)?;
        match value {
            Some(value) => {
                block.push(0);
                put_bytes(&mut block, value)?;
            }
            None => block.push(1),
        }
        if block.len() >= BLOCK_BYTES {
            let first = first_key.take().expect("set for this block");
            close(&mut block, first, &mut out)?;
        }
    }
    if let Some(first) = first_key.take() {
        close(&mut block, first, &mut out)?;
    }
    let mut footer = Vec::new();
    footer.extend_from_slice(&(index.len() as u32).to_be_bytes());
    for (at, len, first) in &index {
        footer.extend_from_slice(&at.to_be_bytes());
        footer.extend_from_slice(&len.to_be_bytes());
        put_bytes(&mut footer, first)?;
    }
    let filter_offset = offset + footer.len() as u64;
    Filter::of(&hashes).encode(&mut footer);
    let mut tail = Vec::with_capacity(TAIL_BYTES as usize);
    tail.extend_from_slice(&offset.to_be_bytes());
    tail.extend_from_slice(&filter_offset.to_be_bytes());
    tail.extend_from_slice(&keys.to_be_bytes());
    tail.extend_from_slice(&footer_crc(&footer, &tail).to_be_bytes());
    tail.extend_from_slice(MAGIC);
    out.write_all(&footer)?;
    out.write_all(&tail)?;
    out.flush()?;
    drop(out);
    file.sync_all()?;
    Ok(keys)
}

/// An open run: its blocks' first keys and its filter in memory, its entries on disk, and
/// the blocks read lately in its set's [`BlockCache`].
#[derive(Debug)]
pub(crate) struct Run {
    /// Names this open of the run in the cache: never given to another open, so that a
    /// cached block is only ever one this open read and checked.
    id: u64,
    cache: Arc<BlockCache>,
    file: File,
    path: PathBuf,
    blocks: Vec<Block>,
    filter: Filter,
    keys: u64,
    /// The file's size when opened (a run is never written again).
    bytes: u64,
}

#[derive(Debug)]
struct Block {
    offset: u64,
    len: u32,
    first_key: Vec<u8>,
}

impl Run {
    /// Opens a run [`write`] wrote, checking its footer; the blocks its reads take are kept
    /// in `cache`.
    pub(crate) fn open(path: &Path, cache: &Arc<BlockCache>) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let damaged = |what: &str| invalid(&format!("run {}: {what}", path.display()));
        if size < TAIL_BYTES {
            return Err(damaged("shorter than its tail"));
        }
        let mut tail = [0u8; TAIL_BYTES as usize];
        file.read_exact_at(&mut tail, size - TAIL_BYTES)?;
        let word = |at: usize| u64::from_be_bytes(tail[at..at + 8].try_into().expect("8 bytes"));
        let (index_at, filter_at, keys) = (word(0), word(8), word(16));
        let crc = u32::from_be_bytes(tail[24..28].try_into().expect("4 bytes"));
        if &tail[28..] != MAGIC {
            return Err(damaged("no run tail (torn or not a run)"));
        }
        let footer_end = size - TAIL_BYTES;
        if !(index_at <= filter_at && filter_at <= footer_end && footer_end - index_at <= MAX_READ)
        {
            return Err(damaged("footer offsets out of range"));
        }
        let mut footer = vec![0; (footer_end - index_at) as usize];
        file.read_exact_at(&mut footer, index_at)?;
        if footer_crc(&footer, &tail[..24]) != crc {
            return Err(damaged("footer checksum"));
        }
        let (index, filter) = footer.split_at((filter_at - index_at) as usize);
        let mut reader = Reader(index);
        let count = reader.u32().ok_or_else(|| damaged("index"))?;
        let mut blocks = Vec::new();
        let mut expected_at = 0;
        for _ in 0..count {
            let block = (|| {
                Some(Block {
                    offset: reader.u64()?,
                    len: reader.u32()?,
                    first_key: reader.bytes()?.to_vec(),
                })
            })()
            .ok_or_else(|| damaged("index"))?;
            let ordered = blocks
                .last()
                .is_none_or(|b: &Block| b.first_key < block.first_key);
            if block.offset != expected_at || block.len < 4 || !ordered {
                return Err(damaged("index out of order"));
            }
            expected_at = block.offset + u64::from(block.len);
            blocks.push(block);
        }
        if expected_at != index_at || !reader.0.is_empty() {
            return Err(damaged("index does not cover the blocks"));
        }
        let filter = Filter::decode(filter).ok_or_else(|| damaged("filter"))?;
        static OPENS: AtomicU64 = AtomicU64::new(0);
        Ok(Self {
            id: OPENS.fetch_add(1, Ordering::Relaxed),
            cache: cache.clone(),
            file,
            path: path.to_owned(),
            blocks,
            filter,
            keys,
            bytes: size,
        })
    }

    /// How many keys the run holds.
    pub(crate) fn keys(&self) -> u64 {
        self.keys
    }

    /// The bytes of blocks its set's cache holds, this run's and others'.
    #[cfg(test)]
    pub(crate) fn cached_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The run file's size.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the run may name the probe's key: its filter, in memory, without reading a
    /// block (about 1% of absent keys pass).
    pub(crate) fn may_hold(&self, probe: &Probe<'_>) -> bool {
        self.filter.may_hold(probe.hash)
    }

    /// What the run holds for `key`: `None` if it does not name it (the store looks keys up
    /// with [`Run::get_probed`]).
    #[cfg(test)]
    pub(crate) fn get(&self, key: &[u8]) -> std::io::Result<Option<Held>> {
        self.get_probed(&Probe::new(key))
    }

    /// [`Run::get`] with the key's hash computed once for every run looked in.
    pub(crate) fn get_probed(&self, probe: &Probe<'_>) -> std::io::Result<Option<Held>> {
        let key = probe.key;
        if !self.filter.may_hold(probe.hash) {
            return Ok(None);
        }
        let Some(at) = self.block_for(key) else {
            // Below the first block's first key: that block is read all the same, for the
            // reason below.
            if !self.blocks.is_empty() {
                self.cached_block(0)?;
            }
            return Ok(None);
        };
        let block = self.cached_block(at)?;
        // The block's keys ascend (checked when it was read).
        let found = block.entries.partition_point(|e| block.key(e) < key);
        if let Some(entry) = block.entries.get(found) {
            return Ok((block.key(entry) == key).then(|| block.held(entry)));
        }
        // Past the block's last key, and the filter let it through: a false positive, or
        // an index that puts the next block's first key too high. Reading the next block
        // checks its first key against the index, so the second fails rather than hide a
        // key the run holds. (One read more for about 1% of absent keys.)
        if at + 1 < self.blocks.len() {
            self.cached_block(at + 1)?;
        }
        Ok(None)
    }

    /// The run's entries whose keys start with `prefix`, in key order, removals included.
    /// Nothing is read when the prefix is at least the filter's prefix length and the
    /// filter refuses its start.
    pub(crate) fn scan<'a>(&'a self, prefix: &'a [u8]) -> Scan<'a> {
        self.scan_from(prefix, prefix)
    }

    /// [`Run::scan`]'s entries from key `from` on (at least `prefix`).
    pub(crate) fn scan_from<'a>(&'a self, prefix: &'a [u8], from: &[u8]) -> Scan<'a> {
        let p = self.filter.prefix_bytes as usize;
        let refused = p > 0 && prefix.len() >= p && !self.filter.may_hold(key_hash(&prefix[..p]));
        let from = from.max(prefix).to_vec();
        Scan {
            run: self,
            prefix,
            next_block: if refused {
                self.blocks.len()
            } else {
                self.block_for(&from).unwrap_or(0)
            },
            from,
            block: None,
            at: 0,
            cached: true,
            done: refused,
        }
    }

    /// Every entry of the run, in key order, removals included, read past the cache: a
    /// merge reads each block once, and would only push out the blocks readers use.
    pub(crate) fn entries(&self) -> Scan<'_> {
        Scan {
            cached: false,
            ..self.scan(b"")
        }
    }

    /// The last block whose first key is at most `key`.
    fn block_for(&self, key: &[u8]) -> Option<usize> {
        let after = self
            .blocks
            .partition_point(|b| b.first_key.as_slice() <= key);
        after.checked_sub(1)
    }

    /// Block `at` as [`Run::read_block`] returns it, from the cache if a read of this open
    /// put it there.
    fn cached_block(&self, at: usize) -> std::io::Result<Arc<Parsed>> {
        if let Some(block) = self.cache.get(self.id, at) {
            return Ok(block);
        }
        let block = Arc::new(self.read_block(at)?);
        self.cache.insert(self.id, at, &block);
        Ok(block)
    }

    /// Block `at`'s entries, checked: its checksum, then its keys against the index (the
    /// first is the index's, they ascend, the last is below the next block's first), so
    /// that a block in the wrong place or an index written wrong fails the read instead
    /// of hiding a key. Returns the block's bytes and where each entry's parts lie in them.
    fn read_block(&self, at: usize) -> std::io::Result<Parsed> {
        let block = &self.blocks[at];
        let mut bytes = vec![0; block.len as usize];
        self.file.read_exact_at(&mut bytes, block.offset)?;
        let damaged = |what: &str| {
            invalid(&format!(
                "run {}: block at {} damaged ({what})",
                self.path.display(),
                block.offset
            ))
        };
        let body = bytes.len() - 4;
        if crc32fast::hash(&bytes[..body]).to_be_bytes() != bytes[body..] {
            return Err(damaged("checksum"));
        }
        bytes.truncate(body);
        let parsed = Parsed::parse(bytes).ok_or_else(|| damaged("entries"))?;
        let next_first = self.blocks.get(at + 1).map(|b| b.first_key.as_slice());
        let keys_fit = parsed.entries.first().map(|e| parsed.key(e)) == Some(&block.first_key[..])
            && parsed
                .entries
                .windows(2)
                .all(|w| parsed.key(&w[0]) < parsed.key(&w[1]))
            && next_first
                .is_none_or(|next| parsed.entries.last().is_some_and(|e| parsed.key(e) < next));
        if !keys_fit {
            return Err(damaged("keys out of place"));
        }
        Ok(parsed)
    }
}

/// A block's entries: its bytes, and the spans of each entry's key and value in them, so
/// that a lookup copies only what it returns.
struct Parsed {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

struct Entry {
    key: std::ops::Range<usize>,
    value: Option<std::ops::Range<usize>>,
}

impl Parsed {
    fn parse(bytes: Vec<u8>) -> Option<Self> {
        let mut entries = Vec::new();
        let mut at = 0;
        let span = |at: &mut usize| {
            let len = u32::from_be_bytes(bytes.get(*at..*at + 4)?.try_into().ok()?) as usize;
            let start = *at + 4;
            let end = start.checked_add(len).filter(|&end| end <= bytes.len())?;
            *at = end;
            Some(start..end)
        };
        while at < bytes.len() {
            let key = span(&mut at)?;
            let kind = *bytes.get(at)?;
            at += 1;
            let value = match kind {
                0 => Some(span(&mut at)?),
                1 => None,
                _ => return None,
            };
            entries.push(Entry { key, value });
        }
        Some(Self { bytes, entries })
    }

    fn key(&self, entry: &Entry) -> &[u8] {
        &self.bytes[entry.key.clone()]
    }

    fn held(&self, entry: &Entry) -> Held {
        entry.value.clone().map(|v| self.bytes[v].to_vec())
    }

    /// The memory the block takes while cached.
    fn weight(&self) -> usize {
        self.bytes.capacity() + self.entries.capacity() * std::mem::size_of::<Entry>()
    }
}

/// Entries under a prefix, block by block ([`Run::scan`]); only those returned are copied
/// out of their block.
pub(crate) struct Scan<'a> {
    run: &'a Run,
    prefix: &'a [u8],
    from: Vec<u8>,
    next_block: usize,
    /// The block being read, and the index of its next entry.
    block: Option<Arc<Parsed>>,
    at: usize,
    /// Whether blocks are taken from, and kept in, the run's cache ([`Run::entries`]).
    cached: bool,
    done: bool,
}

impl Iterator for Scan<'_> {
    type Item = std::io::Result<(Vec<u8>, Held)>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if let Some(block) = &self.block {
                if let Some(entry) = block.entries.get(self.at) {
                    self.at += 1;
                    let key = block.key(entry);
                    if !key.starts_with(self.prefix) {
                        self.done = true;
                        return None;
                    }
                    return Some(Ok((key.to_vec(), block.held(entry))));
                }
            }
            if self.next_block >= self.run.blocks.len() {
                self.done = true;
                return None;
            }
            let read = if self.cached {
                self.run.cached_block(self.next_block)
            } else {
                self.run.read_block(self.next_block).map(Arc::new)
            };
            match read {
                Ok(block) => {
                    // The block's keys ascend (checked when it was read).
                    self.at = block
                        .entries
                        .partition_point(|e| block.key(e) < &self.from[..]);
                    self.block = Some(block);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            self.next_block += 1;
        }
        None
    }
}

/// Blocks read from runs lately, checked and parsed, shared by the runs of a set and
/// bounded in bytes: the least recently used go first. A message's records are read
/// again within moments of their checkpoint (its receipts as they arrive, the message as
/// it is forwarded and opened), each time from the same block. Blocks are named by the
/// open of their run, never by its file: a block damaged on disk after it was cached is
/// served as it was read and checked, until it is pushed out and read again. The budget
/// counts each block's bytes and entry spans; the cache's own bookkeeping (about 100 bytes
/// a block) and blocks that a scan in progress still holds after they were pushed out come
/// on top.
pub(crate) struct BlockCache {
    lru: Mutex<Lru>,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Lru {
    /// The most bytes of blocks held.
    budget: usize,
    bytes: usize,
    clock: u64,
    blocks: HashMap<(u64, usize), (Arc<Parsed>, u64)>,
    /// The cached blocks by their last use, oldest first.
    by_use: BTreeMap<u64, (u64, usize)>,
}

impl BlockCache {
    /// A cache holding at most `budget` bytes of blocks (0: none is kept).
    pub(crate) fn new(budget: usize) -> Arc<Self> {
        let cache = Arc::new(Self {
            lru: Mutex::default(),
        });
        cache.set_budget(budget);
        cache
    }

    /// Holds at most `budget` bytes of blocks from now on, the least recently used pushed
    /// out at once if it holds more.
    pub(crate) fn set_budget(&self, budget: usize) {
        let mut lru = self.lru();
        lru.budget = budget;
        lru.evict();
    }

    /// The bytes of blocks held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.lru().bytes
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while it was held leaves at worst a block that the order of use lost,
        // freed with its run: the cache is still right.
        self.lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, run: u64, at: usize) -> Option<Arc<Parsed>> {
        let mut lru = self.lru();
        lru.clock += 1;
        let now = lru.clock;
        let (block, used) = lru.blocks.get_mut(&(run, at))?;
        let (block, before) = (block.clone(), std::mem::replace(used, now));
        lru.by_use.remove(&before);
        lru.by_use.insert(now, (run, at));
        Some(block)
    }

    fn insert(&self, run: u64, at: usize, block: &Arc<Parsed>) {
        let weight = block.weight();
        let mut lru = self.lru();
        // A block of more than an eighth of the budget (an entry larger than a block) would
        // push out many others for one read.
        if weight > lru.budget / 8 {
            return;
        }
        lru.clock += 1;
        let now = lru.clock;
        if let Some((twice, used)) = lru.blocks.insert((run, at), (block.clone(), now)) {
            // Read by two readers at once: the first copy goes.
            lru.by_use.remove(&used);
            lru.bytes -= twice.weight();
        }
        lru.by_use.insert(now, (run, at));
        lru.bytes += weight;
        lru.evict();
    }

    /// Drops a closed run's blocks.
    fn forget(&self, run: u64, blocks: usize) {
        let mut lru = self.lru();
        let lru = &mut *lru;
        if blocks <= lru.blocks.len() {
            for at in 0..blocks {
                if let Some((gone, used)) = lru.blocks.remove(&(run, at)) {
                    lru.by_use.remove(&used);
                    lru.bytes -= gone.weight();
                }
            }
        } else {
            lru.blocks.retain(|&(r, _), (gone, used)| {
                if r == run {
                    lru.by_use.remove(used);
                    lru.bytes -= gone.weight();
                }
                r != run
            });
        }
    }
}

impl Lru {
    /// Pushes out the least recently used blocks until those left fit the budget.
    fn evict(&mut self) {
        while self.bytes > self.budget {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((gone, _)) = self.blocks.remove(&oldest) {
                self.bytes -= gone.weight();
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.cache.forget(self.id, self.blocks.len());
    }
}

/// Several sources of entries in key order, merged into one, newest first winning: where
/// sources name the same key, the first source's entry is taken and the others' skipped.
/// The sources are the held keys and the runs, newest first, for a read; the runs being
/// compacted, for [`compact`]. An error from a source ends the merge.
pub(crate) struct Merged<I: Iterator> {
    sources: Vec<std::iter::Peekable<I>>,
    failed: bool,
    /// Whether the last entry taken hid an older source's value of its key.
    hid_a_value: bool,
}

impl<I: Iterator<Item = std::io::Result<(Vec<u8>, Held)>>> Merged<I> {
    /// `sources` newest first.
    pub(crate) fn new(sources: impl IntoIterator<Item = I>) -> Self {
        Self {
            sources: sources.into_iter().map(Iterator::peekable).collect(),
            failed: false,
            hid_a_value: false,
        }
    }

    /// Whether the entry [`Iterator::next`] returned last hid a value an older source held
    /// for its key.
    pub(crate) fn hid_a_value(&self) -> bool {
        self.hid_a_value
    }
}

impl<I: Iterator<Item = std::io::Result<(Vec<u8>, Held)>>> Iterator for Merged<I> {
    type Item = std::io::Result<(Vec<u8>, Held)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        // The least key any source is at, and the newest source at it. Few sources are
        // merged at a time, so a scan of them beats a heap.
        let mut least: Option<(usize, &[u8])> = None;
        for (i, source) in self.sources.iter_mut().enumerate() {
            match source.peek() {
                Some(Err(_)) => {
                    self.failed = true;
                    return source.next();
                }
                Some(Ok((key, _))) if least.is_none_or(|(_, l)| key.as_slice() < l) => {
                    least = Some((i, key.as_slice()));
                }
                _ => {}
            }
        }
        let (winner, key) = least?;
        let key = key.to_vec();
        let taken = self.sources[winner].next();
        // Every older source's entries for the key are shadowed (a run names a key once;
        // a source that repeats one is skipped past all of them).
        self.hid_a_value = false;
        for source in &mut self.sources[winner..] {
            while let Some(Ok((k, held))) = source.peek() {
                if *k != key {
                    break;
                }
                self.hid_a_value |= held.is_some();
                source.next();
            }
        }
        taken
    }
}

/// Merges `runs` (newest first) into one run at `path`, values shadowed by newer ones
/// dropped. A removal is kept while something older may still hold its key, and dropped
/// when nothing can:
/// - `nothing_below`: nothing older than these runs holds keys (no older run, and no other
///   store under the runs, such as sled until step 4 of docs/store-next.md);
/// - or the removal hid a value of its key in these runs, and `put_once` says that keys
///   like it are written once only (a queue entry's key holds a sequence number never
///   used again), so that no older value exists.
///
/// Returns how many keys the new run holds.
pub(crate) fn compact(
    path: &Path,
    runs: &[&Run],
    nothing_below: bool,
    put_once: fn(&[u8]) -> bool,
) -> std::io::Result<u64> {
    let mut merged = Merged::new(runs.iter().map(|run| run.entries()));
    let kept = std::iter::from_fn(|| loop {
        let entry = merged.next()?;
        let has_nothing_to_hide = matches!(&entry, Ok((key, None))
            if nothing_below || (merged.hid_a_value() && put_once(key)));
        if !has_nothing_to_hide {
            return Some(entry);
        }
    });
    write(path, kept)
}

/// A Bloom filter over the keys' hashes: a key it refuses is not in the run.
#[derive(Debug)]
struct Filter {
    hashes: u32,
    /// The key prefixes' length it holds as well as the keys ([`PREFIX_BYTES`]).
    prefix_bytes: u32,
    bits: u64,
    words: Vec<u8>,
}

impl Filter {
    fn of(hashes: &[u64]) -> Self {
        let bits = (hashes.len() as u64 * BITS_PER_KEY).max(64);
        let mut filter = Self {
            hashes: HASHES,
            prefix_bytes: PREFIX_BYTES,
            bits,
            words: vec![0; bits.div_ceil(8) as usize],
        };
        for &h in hashes {
            let bits: Vec<u64> = filter.bits_of(h).collect();
            for bit in bits {
                filter.words[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        filter
    }

    fn may_hold(&self, hash: u64) -> bool {
        self.bits_of(hash)
            .all(|bit| self.words[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    /// Double hashing (Kirsch and Mitzenmacher): bit i is h1 + i·h2 modulo the bits.
    fn bits_of(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        let (h1, h2) = (hash, mix(hash) | 1);
        (0..u64::from(self.hashes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % self.bits)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hashes.to_be_bytes());
        out.extend_from_slice(&self.prefix_bytes.to_be_bytes());
        out.extend_from_slice(&self.bits.to_be_bytes());
        out.extend_from_slice(&self.words);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut reader = Reader(bytes);
        let (hashes, prefix_bytes, bits) = (reader.u32()?, reader.u32()?, reader.u64()?);
        let words = reader.0.to_vec();
        let fits = bits > 0 && (1..=32).contains(&hashes) && words.len() as u64 == bits.div_ceil(8);
        fits.then_some(Self {
            hashes,
            prefix_bytes,
            bits,
            words,
        })
    }
}

/// A key looked up in several runs, with its filter hash computed once.
pub(crate) struct Probe<'a> {
    key: &'a [u8],
    hash: u64,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(key: &'a [u8]) -> Self {
        Self {
            key,
            hash: key_hash(key),
        }
    }
}

/// FNV-1a over the key, then mixed: stable across Rust versions, as a stored filter needs
/// (std's hashers promise no such thing).
fn key_hash(key: &[u8]) -> u64 {
    let fnv = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(fnv)
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("a key or value of 4 GiB or more"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// xorshift64*: the same keys on every run of the tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, max: u64) -> Vec<u8> {
            // Few distinct leading bytes, so that prefixes are shared as in the store's keys.
            let len = 1 + self.below(max);
            (0..len)
                .map(|i| {
                    if i == 0 {
                        b'a' + self.below(4) as u8
                    } else {
                        self.next() as u8
                    }
                })
                .collect()
        }
    }

    /// Opens a run with a cache of its own.
    fn open_run(path: &Path) -> std::io::Result<Run> {
        Run::open(path, &BlockCache::new(1 << 20))
    }

    fn write_map(path: &Path, map: &BTreeMap<Vec<u8>, Held>) {
        let entries = map.iter().map(|(k, v)| Ok((k.as_slice(), v.as_deref())));
        assert_eq!(write(path, entries).unwrap(), map.len() as u64);
    }

    fn written(dir: &Path, map: &BTreeMap<Vec<u8>, Held>) -> Run {
        let path = dir.join("run-1");
        write_map(&path, map);
        assert!(
            !temporary_path(&path).exists(),
            "linked into place, the temporary name gone"
        );
        open_run(&path).unwrap()
    }

    fn sample(seed: u64, keys: usize) -> BTreeMap<Vec<u8>, Held> {
        let mut rng = Rng(seed);
        let mut map = BTreeMap::new();
        while map.len() < keys {
            let value = (rng.below(5) > 0).then(|| rng.bytes(300));
            map.insert(rng.bytes(40), value);
        }
        map
    }

    #[test]
    fn a_run_answers_every_key_and_prefix_as_the_map_it_was_written_from() {
        let dir = tempfile::tempdir().unwrap();
        let map = sample(0x5eed, 5_000);
        drop(written(dir.path(), &map));
        // No cache, one that holds a few blocks, one that holds them all.
        for budget in [0, 64 << 10, 4 << 20] {
            let cache = BlockCache::new(budget);
            let run = Run::open(&dir.path().join("run-1"), &cache).unwrap();
            answers_as(&run, &map);
            assert!(cache.bytes() <= budget, "{} of {budget}", cache.bytes());
            // Everything again, from a cache now full.
            answers_as(&run, &map);
            assert!(cache.bytes() <= budget, "{} of {budget}", cache.bytes());
            if budget == 4 << 20 {
                assert!(cache.bytes() > 0, "blocks kept");
            }
            drop(run);
            assert_eq!(cache.bytes(), 0, "a closed run's blocks go");
        }
    }

    fn answers_as(run: &Run, map: &BTreeMap<Vec<u8>, Held>) {
        assert!(run.blocks.len() > 50, "many blocks: {}", run.blocks.len());
        assert_eq!(run.keys(), 5_000);
        for (key, held) in map {
            assert_eq!(run.get(key).unwrap().as_ref(), Some(held), "{key:?}");
        }
        let mut rng = Rng(7);
        for _ in 0..5_000 {
            let absent = rng.bytes(40);
            if !map.contains_key(&absent) {
                assert_eq!(run.get(&absent).unwrap(), None);
            }
        }
        for _ in 0..300 {
            let prefix = rng.bytes(3);
            let expected: Vec<_> = map
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let scanned: Vec<_> = run.scan(&prefix).map(Result::unwrap).collect();
            assert_eq!(scanned, expected, "prefix {prefix:?}");
            // From a key inside the prefix's entries, often inside a block.
            if let Some((from, _)) = expected.get(expected.len() / 2) {
                let scanned: Vec<_> = run.scan_from(&prefix, from).map(Result::unwrap).collect();
                assert_eq!(
                    scanned,
                    expected[expected.len() / 2..],
                    "{prefix:?} from {from:?}"
                );
            }
        }
        let everything: Vec<_> = run.scan(b"").map(Result::unwrap).collect();
        assert_eq!(everything.len(), map.len());
        let entries: Vec<_> = run.entries().map(Result::unwrap).collect();
        assert_eq!(entries, everything);
    }

    /// A block of one entry whose value is `len` bytes, and the weight the cache gives it.
    fn block_of(len: usize) -> (Arc<Parsed>, usize) {
        let mut bytes = Vec::new();
        put_bytes(&mut bytes, b"k").unwrap();
        bytes.push(0);
        put_bytes(&mut bytes, &vec![7; len]).unwrap();
        let block = Parsed::parse(bytes).unwrap();
        let weight = block.weight();
        (Arc::new(block), weight)
    }

    #[test]
    fn the_cache_keeps_the_blocks_used_last_within_its_budget() {
        let (block, weight) = block_of(1000);
        let cache = BlockCache::new(8 * weight);
        for at in 0..8 {
            cache.insert(1, at, &block);
        }
        assert_eq!(cache.bytes(), 8 * weight);
        // Read by two readers at once: counted once.
        cache.insert(1, 7, &block);
        assert_eq!(cache.bytes(), 8 * weight);
        // Block 0, used again, outlives block 1, which goes first.
        assert!(cache.get(1, 0).is_some());
        cache.insert(1, 8, &block);
        assert_eq!(cache.bytes(), 8 * weight);
        assert!(cache.get(1, 0).is_some(), "used last but one");
        assert!(cache.get(1, 1).is_none(), "used least lately");
        // More than an eighth of the budget: not kept, nothing pushed out for it.
        let (large, large_weight) = block_of(2000);
        assert!(large_weight > weight);
        cache.insert(1, 9, &large);
        assert!(cache.get(1, 9).is_none());
        assert_eq!(cache.bytes(), 8 * weight);
        // Another run's blocks stay when one run's go.
        cache.insert(2, 0, &block);
        assert!(cache.get(2, 0).is_some());
        cache.set_budget(2 * weight);
        assert_eq!(
            cache.bytes(),
            2 * weight,
            "pushed out down to the new budget"
        );
        assert!(
            cache.get(2, 0).is_some() && cache.get(1, 0).is_some(),
            "the two used last"
        );
        // Either way of forgetting: block by block, or over the cache when it holds fewer
        // blocks than the run has.
        cache.forget(1, 1);
        assert_eq!(cache.bytes(), weight);
        assert!(cache.get(2, 0).is_some());
        cache.forget(2, 1_000);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn reads_keep_their_blocks_in_the_cache_and_a_merges_reads_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (sample(0xcace, 2_000), sample(0xcaf0, 2_000));
        let (path_one, path_two) = (dir.path().join("one"), dir.path().join("two"));
        write_map(&path_one, &one);
        write_map(&path_two, &two);
        let cache = BlockCache::new(4 << 20);
        let (run_one, run_two) = (
            Run::open(&path_one, &cache).unwrap(),
            Run::open(&path_two, &cache).unwrap(),
        );
        assert_eq!(run_one.entries().count(), one.len());
        assert_eq!(cache.bytes(), 0, "a merge's reads pass the cache by");
        // Two runs' blocks of the same places, side by side in one cache.
        for ((k1, v1), (k2, v2)) in one.iter().zip(&two) {
            assert_eq!(run_one.get(k1).unwrap().as_ref(), Some(v1));
            assert_eq!(run_two.get(k2).unwrap().as_ref(), Some(v2));
        }
        assert!(cache.bytes() > 0);
        // Once cached, a block is not read again: damage on disk since goes unseen by this
        // open, and is caught by the next.
        let in_second = run_one.blocks[1].first_key.clone();
        let file = OpenOptions::new().write(true).open(&path_one).unwrap();
        file.write_all_at(&[0xff], run_one.blocks[1].offset + 10)
            .unwrap();
        assert_eq!(
            run_one.get(&in_second).unwrap().as_ref(),
            Some(&one[&in_second])
        );
        let err = open_run(&path_one).unwrap().get(&in_second).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        drop(run_two);
        assert!(cache.bytes() > 0, "the other run's blocks stay");
        drop(run_one);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn keys_at_block_edges_and_entries_larger_than_a_block_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut map = BTreeMap::new();
        // Each entry is exactly a quarter block with its framing, so blocks close on an
        // entry's last byte; then one value of three blocks.
        let framing = 4 + 9 + 1 + 4;
        for i in 0..16u64 {
            let key = [b"q".as_slice(), &i.to_be_bytes()].concat();
            map.insert(key, Some(vec![i as u8; BLOCK_BYTES / 4 - framing]));
        }
        map.insert(b"r-large".to_vec(), Some(vec![9; 3 * BLOCK_BYTES]));
        map.insert(b"s".to_vec(), None);
        let run = written(dir.path(), &map);
        assert_eq!(
            run.blocks.len(),
            6,
            "4 full blocks, the large one, the last"
        );
        for (key, held) in &map {
            assert_eq!(run.get(key).unwrap().as_ref(), Some(held));
        }
        let queue: Vec<_> = run.scan(b"q").map(Result::unwrap).collect();
        assert_eq!(queue.len(), 16);
        assert_eq!(
            run.scan(b"s").map(Result::unwrap).collect::<Vec<_>>(),
            vec![(b"s".to_vec(), None)]
        );
        assert_eq!(run.scan(b"t").count(), 0);
        assert_eq!(run.scan(b"0").count(), 0, "before every key");
    }

    #[test]
    fn an_empty_run_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let run = written(dir.path(), &BTreeMap::new());
        assert_eq!((run.keys(), run.blocks.len()), (0, 0));
        assert_eq!(run.get(b"any").unwrap(), None);
        assert_eq!(run.scan(b"").count(), 0);
    }

    #[test]
    fn keys_out_of_order_or_repeated_are_refused_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run-1");
        for keys in [[&b"b"[..], b"a"], [b"a", b"a"]] {
            let err = write(&path, keys.map(|k| Ok((k, Some(&b"v"[..]))))).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
            assert!(!path.exists() && !temporary_path(&path).exists());
        }
    }

    #[test]
    fn a_damaged_block_fails_its_reads_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let map = sample(0xb10c, 2_000);
        let run = written(dir.path(), &map);
        let second = &run.blocks[1];
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("run-1"))
            .unwrap();
        file.write_all_at(&[0xff], second.offset + 10).unwrap();
        let in_second = run.blocks[1].first_key.clone();
        let err = run.get(&in_second).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        let in_first = run.blocks[0].first_key.clone();
        assert!(run.get(&in_first).unwrap().is_some());
        let scanned: Vec<_> = run.scan(b"").collect();
        assert!(
            scanned.last().unwrap().is_err(),
            "a scan ends with the error"
        );
    }

    #[test]
    fn a_torn_or_damaged_footer_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let map = sample(0xf007, 500);
        drop(written(dir.path(), &map));
        let path = dir.path().join("run-1");
        let whole = std::fs::read(&path).unwrap();

        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        let err = open_run(&path).unwrap_err();
        assert!(err.to_string().contains("tail"), "{err}");

        let mut flipped = whole.clone();
        let in_footer = whole.len() - TAIL_BYTES as usize - 20;
        flipped[in_footer] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = open_run(&path).unwrap_err();
        assert!(err.to_string().contains("footer checksum"), "{err}");

        std::fs::write(&path, &whole[..3]).unwrap();
        assert!(open_run(&path).is_err());
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(open_run(&path).unwrap().keys(), 500);
    }

    /// Four generations of writes over one key space, each a run; merged newest first,
    /// they read as the generations applied in order to one map.
    #[test]
    fn merged_runs_read_as_their_generations_applied_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(0xc0de);
        let space: Vec<Vec<u8>> = (0..3_000).map(|_| rng.bytes(12)).collect();
        let mut applied = BTreeMap::new();
        let mut runs = Vec::new();
        for generation in 0..4 {
            let mut writes = BTreeMap::new();
            for _ in 0..1_500 {
                let key = space[rng.below(space.len() as u64) as usize].clone();
                let value = (rng.below(4) > 0).then(|| vec![generation; rng.below(50) as usize]);
                writes.insert(key, value);
            }
            applied.extend(writes.clone());
            let path = dir.path().join(format!("run-{generation}"));
            let entries = writes.iter().map(|(k, v)| Ok((k.as_slice(), v.as_deref())));
            write(&path, entries).unwrap();
            runs.push(open_run(&path).unwrap());
        }
        runs.reverse();
        let newest_first: Vec<&Run> = runs.iter().collect();

        let merged: Vec<_> = Merged::new(newest_first.iter().map(|r| r.scan(b"")))
            .map(Result::unwrap)
            .collect();
        let expected: Vec<_> = applied.clone().into_iter().collect();
        assert_eq!(merged, expected);
        let prefix = &space[0][..1];
        let under: Vec<_> = Merged::new(newest_first.iter().map(|r| r.scan(prefix)))
            .map(Result::unwrap)
            .collect();
        let expected_under: Vec<_> = expected
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .cloned()
            .collect();
        assert_eq!(under, expected_under);

        // Compacted above an older run, removals stay; as the oldest, they go.
        let above = dir.path().join("above");
        assert_eq!(
            compact(&above, &newest_first, false, |_| false).unwrap(),
            applied.len() as u64
        );
        let above = open_run(&above).unwrap();
        let read: Vec<_> = above.scan(b"").map(Result::unwrap).collect();
        assert_eq!(read, expected);
        let bottom = dir.path().join("bottom");
        compact(&bottom, &newest_first, true, |_| false).unwrap();
        let bottom = open_run(&bottom).unwrap();
        let read: Vec<_> = bottom.scan(b"").map(Result::unwrap).collect();
        let live: Vec<_> = expected.into_iter().filter(|(_, v)| v.is_some()).collect();
        assert!(live.len() < applied.len(), "some keys end removed");
        assert_eq!(read, live);
        for (key, held) in &applied {
            let want = held.as_ref().map(|v| Some(v.clone()));
            assert_eq!(bottom.get(key).unwrap(), want);
        }
    }

    #[test]
    fn a_merge_ends_at_a_sources_error() {
        let dir = tempfile::tempdir().unwrap();
        let map = sample(0xe770, 2_000);
        let run = written(dir.path(), &map);
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("run-1"))
            .unwrap();
        file.write_all_at(&[0xff], run.blocks[3].offset + 5)
            .unwrap();
        let newer = dir.path().join("newer");
        write(&newer, [Ok((&b"a"[..], Some(&b"1"[..])))]).unwrap();
        let newer = open_run(&newer).unwrap();
        let merged: Vec<_> = Merged::new([newer.scan(b""), run.scan(b"")]).collect();
        assert!(merged.last().unwrap().is_err());
        let before: Vec<_> = merged[..merged.len() - 1]
            .iter()
            .map(|e| e.as_ref().unwrap().clone())
            .collect();
        let mut want: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        want.insert(
            want.partition_point(|(k, _)| k.as_slice() < &b"a"[..]),
            (b"a".to_vec(), Some(b"1".to_vec())),
        );
        want.dedup_by(|later, earlier| later.0 == earlier.0);
        assert!(
            want.starts_with(&before),
            "what came before the error is right"
        );
        let in_first_three = map.range(..run.blocks[3].first_key.clone()).count();
        assert!(before.len() >= in_first_three, "blocks 0 to 2 were read");
        assert_eq!(
            merged.iter().filter(|e| e.is_err()).count(),
            1,
            "and nothing after"
        );
        let target = dir.path().join("compacted");
        assert!(compact(&target, &[&newer, &run], true, |_| false).is_err());
        assert!(!target.exists() && !temporary_path(&target).exists());
    }

    /// A message's keys share their first 17 bytes: a scan under an absent message's
    /// prefix reads no block of most runs, and one under a present one reads them all.
    #[test]
    fn a_scan_under_an_absent_messages_prefix_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let id = |i: u64| [b"r".as_slice(), &[7; 8], &i.to_be_bytes()].concat();
        let mut map = BTreeMap::new();
        for i in 0..500u64 {
            for seq in 0..3u64 {
                map.insert(
                    [id(i * 2), seq.to_be_bytes().to_vec()].concat(),
                    Some(vec![1; 60]),
                );
            }
        }
        let run = written(dir.path(), &map);
        // Every block damaged: a scan that reads one fails.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("run-1"))
            .unwrap();
        for block in &run.blocks {
            file.write_all_at(&[0xff, 0xff], block.offset + 2).unwrap();
        }
        let present = id(10);
        assert!(
            run.scan(&present).any(|e| e.is_err()),
            "a present one is read"
        );
        let read = (0..1_000u64)
            .filter(|i| run.scan(&id(i * 2 + 1)).next().is_some())
            .count();
        assert!(read < 30, "{read} of 1,000 absent prefixes read a block");
        assert!(
            run.scan(&b"r"[..]).next().unwrap().is_err(),
            "short prefixes are read"
        );
    }

    #[test]
    fn the_filter_refuses_most_absent_keys() {
        let hashes: Vec<u64> = (0..10_000u64).map(|i| key_hash(&i.to_be_bytes())).collect();
        let filter = Filter::of(&hashes);
        assert!(
            hashes.iter().all(|&h| filter.may_hold(h)),
            "no false negatives"
        );
        let passed = (10_000..110_000u64)
            .filter(|i| filter.may_hold(key_hash(&i.to_be_bytes())))
            .count();
        assert!(passed < 2_000, "{passed} of 100,000 absent keys passed");
    }

    #[test]
    fn key_hashes_are_stable() {
        // Stored in every run's filter: a change here makes every run refuse its own keys.
        assert_eq!(key_hash(b"m"), 0xcf6b_2b49_3a85_337d);
        assert_eq!(key_hash(b""), 0xf52a_15e9_a9b5_e89b);
    }

    /// The whole layout of a small run, byte for byte: runs on disk outlive the code that
    /// wrote them, so any change to blocks, index, filter or tail must fail here first.
    #[test]
    fn a_small_run_is_laid_out_byte_for_byte_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run-1");
        write(
            &path,
            [Ok((&b"k1"[..], Some(&b"v"[..]))), Ok((b"k2", None))],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_RUN);
        let run = open_run(&path).unwrap();
        assert_eq!(run.get(b"k1").unwrap(), Some(Some(b"v".to_vec())));
        assert_eq!(run.get(b"k2").unwrap(), Some(None));
    }

    /// The filter of a run whose keys share a 17-byte prefix, byte for byte: it pins the
    /// prefix half of the filter, which the run above (short keys) does not reach.
    #[test]
    fn the_filter_of_keys_under_one_message_is_laid_out_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run-1");
        let message = [b"r".as_slice(), &[0x11; 16]].concat();
        let keys = [
            [message.as_slice(), b"1"].concat(),
            [message.as_slice(), b"2"].concat(),
        ];
        write(
            &path,
            keys.iter().map(|k| Ok((k.as_slice(), Some(&b"v"[..])))),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let tail_at = bytes.len() - TAIL_BYTES as usize;
        let filter_at = u64::from_be_bytes(bytes[tail_at + 8..tail_at + 16].try_into().unwrap());
        let filter: String = bytes[filter_at as usize..tail_at]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(filter, GOLDEN_PREFIX_FILTER);
        let run = open_run(&path).unwrap();
        assert_eq!(run.scan(&message).count(), 2);
    }

    const GOLDEN_PREFIX_FILTER: &str = "0000000700000011000000000000004091098a4470205281";

    const GOLDEN_RUN: &str = concat!(
        "000000026b3100000000017600000002", // block: "k1" = "v",
        "6b3201",                           //   "k2" removed,
        "fe03ae2a",                         //   the block's CRC
        "00000001",                         // index: one block,
        "000000000000000000000017",         //   at 0, 23 bytes,
        "000000026b31",                     //   first key "k1"
        "0000000700000011",                 // filter: 7 hashes, 17-byte prefixes,
        "000000000000004052004a0100a50094", //   64 bits
        "0000000000000017000000000000002d", // tail: index at 23, filter at 45,
        "0000000000000002785a26a441524e31", //   2 keys, CRC, "ARN1"
    );

    /// Loads the run at `path`, checks every key, some absent ones and some prefixes
    /// against `map`: `Ok(true)` if all read right, `Ok(false)` if an error was met (with
    /// nothing read wrong before it), `Err` describing a wrong answer.
    fn read_against(path: &Path, map: &BTreeMap<Vec<u8>, Held>) -> Result<bool, String> {
        let Ok(run) = open_run(path) else {
            return Ok(false);
        };
        if run.keys() != map.len() as u64 {
            return Err(format!("keys() = {}", run.keys()));
        }
        let mut clean = true;
        let absent = (0..200u32).map(|i| format!("b{i:04}-absent").into_bytes());
        for key in map.keys().cloned().chain(absent) {
            match run.get(&key) {
                Ok(got) if got.as_ref() == map.get(&key) => {}
                Ok(got) => return Err(format!("get {key:?} read {got:?}")),
                Err(_) => clean = false,
            }
        }
        for prefix in [&b""[..], b"a", b"b1", b"c"] {
            let want: Vec<_> = map
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut got = Vec::new();
            for entry in run.scan(prefix) {
                match entry {
                    Ok(entry) => got.push(entry),
                    Err(_) => {
                        clean = false;
                        break;
                    }
                }
            }
            if !want.starts_with(&got) || (clean && got != want) {
                return Err(format!("scan {prefix:?} read {} entries", got.len()));
            }
        }
        Ok(clean)
    }

    fn three_block_sample() -> BTreeMap<Vec<u8>, Held> {
        (0..300u32)
            .map(|i| {
                let key = format!("{}{:05}", ["a", "b", "c"][i as usize % 3], i * 7);
                (
                    key.into_bytes(),
                    (i % 5 != 0).then(|| vec![i as u8; (i % 40) as usize]),
                )
            })
            .collect()
    }

    /// Every byte of a run flipped, and the run cut at every length: each read that does
    /// not fail reads right. (From helper 45's review.)
    #[test]
    fn every_flipped_byte_or_cut_is_an_error_never_a_wrong_answer() {
        let dir = tempfile::tempdir().unwrap();
        let map = three_block_sample();
        let good = dir.path().join("good");
        write_map(&good, &map);
        assert!(open_run(&good).unwrap().blocks.len() >= 3);
        let whole = std::fs::read(&good).unwrap();
        let bad = dir.path().join("bad");
        let mut failed = 0;
        for at in 0..whole.len() {
            let mut bytes = whole.clone();
            bytes[at] ^= 0x41;
            std::fs::write(&bad, &bytes).unwrap();
            match read_against(&bad, &map) {
                Ok(true) => {}
                Ok(false) => failed += 1,
                Err(wrong) => panic!("byte {at} flipped: {wrong}"),
            }
        }
        assert_eq!(failed, whole.len(), "every flip is noticed");
        for len in 0..whole.len() {
            std::fs::write(&bad, &whole[..len]).unwrap();
            assert_eq!(read_against(&bad, &map), Ok(false), "cut at {len}");
        }
    }

    /// Rewrites the index with `edit` and the footer's checksum to match: what a writer
    /// bug would leave, which no checksum catches.
    fn rewrite_index(path: &Path, edit: impl FnOnce(&mut [u8])) {
        let mut bytes = std::fs::read(path).unwrap();
        let tail_at = bytes.len() - TAIL_BYTES as usize;
        let index_at = u64::from_be_bytes(bytes[tail_at..tail_at + 8].try_into().unwrap());
        let filter_at = u64::from_be_bytes(bytes[tail_at + 8..tail_at + 16].try_into().unwrap());
        edit(&mut bytes[index_at as usize..filter_at as usize]);
        let crc = footer_crc(
            &bytes[index_at as usize..tail_at],
            &bytes[tail_at..tail_at + 24],
        );
        bytes[tail_at + 24..tail_at + 28].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn an_index_written_wrong_or_blocks_out_of_place_fail_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let map = three_block_sample();
        let path = dir.path().join("run");
        write_map(&path, &map);
        let whole = std::fs::read(&path).unwrap();
        let run = open_run(&path).unwrap();
        let (second, third) = (&run.blocks[1], &run.blocks[2]);

        // Block 1's first key a byte larger, still below block 2's.
        let first = second.first_key.clone();
        rewrite_index(&path, |index| {
            let at = index.windows(first.len()).position(|w| w == first).unwrap();
            index[at + first.len() - 1] += 1;
        });
        assert_eq!(read_against(&path, &map), Ok(false));
        let err = open_run(&path).unwrap().get(&first).unwrap_err();
        assert!(err.to_string().contains("out of place"), "{err}");

        // The same with the first block's, which no block before it covers.
        std::fs::write(&path, &whole).unwrap();
        let first = run.blocks[0].first_key.clone();
        rewrite_index(&path, |index| {
            let at = index.windows(first.len()).position(|w| w == first).unwrap();
            index[at + first.len() - 1] += 1;
        });
        let err = open_run(&path).unwrap().get(&first).unwrap_err();
        assert!(err.to_string().contains("out of place"), "{err}");

        // Two blocks swapped, each under the other's checksum-correct bytes.
        let mut swapped = whole.clone();
        let (a, b) = (second.offset as usize, third.offset as usize);
        let n = (second.len as usize).min(third.len as usize);
        if second.len == third.len {
            let block_a = whole[a..a + n].to_vec();
            swapped.copy_within(b..b + n, a);
            swapped[b..b + n].copy_from_slice(&block_a);
        } else {
            // A lost write that left the previous block's bytes in the next one's place.
            swapped.copy_within(a..a + n, b);
        }
        std::fs::write(&path, &swapped).unwrap();
        assert_eq!(read_against(&path, &map), Ok(false));
    }

    #[test]
    fn a_run_is_never_written_over_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run-1");
        write(&path, [Ok((&b"a"[..], Some(&b"1"[..])))]).unwrap();
        let err = write(&path, [Ok((&b"a"[..], Some(&b"2"[..])))]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(!temporary_path(&path).exists());
        let run = open_run(&path).unwrap();
        assert_eq!(run.get(b"a").unwrap(), Some(Some(b"1".to_vec())));
    }

    #[test]
    fn a_source_that_repeats_a_key_lets_no_shadowed_value_through() {
        type Entry = std::io::Result<(Vec<u8>, Held)>;
        let newer: Vec<Entry> = vec![Ok((b"k".to_vec(), Some(b"new".to_vec())))];
        let older: Vec<Entry> = vec![
            Ok((b"k".to_vec(), Some(b"old 1".to_vec()))),
            Ok((b"k".to_vec(), Some(b"old 2".to_vec()))),
            Ok((b"l".to_vec(), None)),
        ];
        let merged: Vec<_> = Merged::new([newer.into_iter(), older.into_iter()])
            .map(Result::unwrap)
            .collect();
        let want = vec![
            (b"k".to_vec(), Some(b"new".to_vec())),
            (b"l".to_vec(), None),
        ];
        assert_eq!(merged, want);
    }
}
