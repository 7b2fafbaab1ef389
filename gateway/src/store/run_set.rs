//! The runs of one folder, newest first: what checkpoints add and compaction merges
//! (docs/store-next.md).
//!
//! A run's file is named by the checkpoints it holds: `first-last`, two 20-digit numbers.
//! A checkpoint's run holds one (`n-n`); a merge of runs holds all of theirs, and is
//! written before its inputs are deleted. An open that finds a run whose checkpoints another
//! run holds too (a merge that a crash stopped before it deleted its inputs) deletes it: the
//! merge holds everything it held, and may have dropped removals that it would otherwise
//! bring back. Checkpoints are numbered from 1 without gaps, so an open that finds one
//! missing refuses the folder: a run lost from it would silently take its keys back to
//! older values.
//!
//! The newest runs, or all of them, cannot be told missing from the names alone. So each
//! checkpoint's number is also recorded beside the folder, in `<folder>.last` (for the
//! store, `runs.last`): 20 digits and a newline, written whole (a temporary file, synced,
//! renamed, the parent folder synced) after the run it names is linked in. An open refuses
//! a folder whose runs end before the record, and a folder that holds runs but no record.
//! The record may lag: by the one run a crash linked before it was written, or by more
//! after a binary of layout 4 wrote runs. An open brings it up to the runs it takes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::runs::{self, BlockCache, Run};

/// The fewest runs a merge takes ([`due`]): a key is rewritten about once for each
/// fourfold growth of the data written after it, and the runs stay a few per size.
const MERGE_AT: usize = 4;

/// The runs of a folder, newest first.
#[derive(Debug)]
pub(crate) struct RunSet {
    dir: PathBuf,
    /// Newest first; readers take a copy of the list ([`RunSet::runs`]) and keep reading the
    /// files they hold while a merge replaces them.
    runs: Arc<Vec<Arc<Named>>>,
    /// Whether nothing under the runs holds keys (no sled below them): only then does a
    /// merge that takes the oldest run drop removals.
    nothing_below: bool,
    /// Keys written once only, whose removal a merge drops once it hid their value
    /// ([`runs::compact`]).
    put_once: fn(&[u8]) -> bool,
    /// Why an `add` or a merge failed part way: the folder may hold a run the list does
    /// not, so nothing more is written until the set is opened again, which reads the
    /// folder as it is (a merge's leftover inputs deleted, an added run taken in).
    broken: Option<String>,
    /// The blocks the runs' reads took lately, shared by every run of the set.
    cache: Arc<BlockCache>,
}

/// A run and the checkpoints it holds.
#[derive(Debug)]
pub(crate) struct Named {
    pub(crate) run: Run,
    first: u64,
    last: u64,
}

impl RunSet {
    /// Opens the runs in `dir`, deleting unfinished writes and runs a finished merge holds,
    /// and refusing a folder whose newest runs are gone ([module docs](self)): one with no
    /// record of its last checkpoint is taken only if this open makes it.
    /// `nothing_below`: no other store under the runs holds keys their removals hide.
    pub(crate) fn open(dir: &Path, nothing_below: bool) -> std::io::Result<Self> {
        let new = !dir.try_exists()?;
        Self::open_recorded(dir, nothing_below, new, &BlockCache::new(0))
    }

    /// [`RunSet::open`] for a folder written before checkpoints were recorded beside it: a
    /// missing record is written from the runs found.
    pub(crate) fn adopt(dir: &Path, nothing_below: bool) -> std::io::Result<Self> {
        Self::open_recorded(dir, nothing_below, true, &BlockCache::new(0))
    }

    fn open_recorded(
        dir: &Path,
        nothing_below: bool,
        unrecorded_is_whole: bool,
        cache: &Arc<BlockCache>,
    ) -> std::io::Result<Self> {
        let exists = dir.try_exists()?;
        let recorded = read_record(dir)?;
        let mut found = Vec::new();
        let entries = if exists {
            std::fs::read_dir(dir)?.collect()
        } else {
            Vec::new()
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            match parse_name(&name) {
                Some(span) => found.push((span, entry.path())),
                None if name.ends_with(runs::TEMPORARY_SUFFIX) => {
                    std::fs::remove_file(entry.path())?;
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not a run", entry.path().display()),
                    ))
                }
            }
        }
        // Newest first; of runs ending at one checkpoint, the widest first.
        found.sort_by(|((f1, l1), _), ((f2, l2), _)| l2.cmp(l1).then(f1.cmp(f2)));
        let mut runs: Vec<Arc<Named>> = Vec::new();
        for ((first, last), path) in found {
            let held_by_another = runs.iter().any(|r| r.first <= first && last <= r.last);
            let overlaps = runs.iter().any(|r| r.first <= last && first <= r.last);
            if held_by_another {
                std::fs::remove_file(&path)?;
                continue;
            }
            if overlaps {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} overlaps another run", path.display()),
                ));
            }
            runs.push(Arc::new(open_named(&path, first, last, cache)?));
        }
        // Oldest to newest, each run starts where the one before it ended.
        let mut expected = 1;
        for named in runs.iter().rev() {
            if named.first != expected {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} lacks the run of checkpoint {expected} (the next run holds {} to \
                         {}): a run was lost",
                        dir.display(),
                        named.first,
                        named.last
                    ),
                ));
            }
            expected = named.last + 1;
        }
        let last = runs.first().map_or(0, |r| r.last);
        match recorded {
            Some(recorded) if last < recorded => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} records checkpoint {recorded}, but the runs in {} end at \
                         checkpoint {last}: the newest runs were lost",
                        record_path(dir).display(),
                        dir.display()
                    ),
                ))
            }
            None if !unrecorded_is_whole => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is missing: nothing tells whether the newest runs in {} are there",
                        record_path(dir).display(),
                        dir.display()
                    ),
                ))
            }
            _ => {}
        }
        if !exists {
            std::fs::create_dir_all(dir)?;
        }
        // Before the record can name them: a run linked just before a crash may not be in
        // the folder durably yet, and a catch-up must not record it ahead of its link.
        // Deletions above are made durable too.
        std::fs::File::open(dir)?.sync_all()?;
        // A crash inside `write_record` leaves its temporary file.
        match std::fs::remove_file(record_temporary(dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // A record behind the runs is brought up to them, so that it guards the runs this
        // open took: one run behind after a crash between the run and its record, more after
        // a binary of layout 4 wrote runs.
        if recorded != Some(last) {
            if recorded.is_some_and(|recorded| recorded + 1 < last) {
                tracing::warn!(
                    recorded = recorded.unwrap_or(0),
                    last,
                    "the runs' record was more than one checkpoint behind them; brought up to \
                     date"
                );
            }
            write_record(dir, last)?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            runs: Arc::new(runs),
            nothing_below,
            put_once: |_| false,
            broken: None,
            cache: cache.clone(),
        })
    }

    /// The same folder opened again, as [`RunSet::open`] reads it now: how a set that refuses
    /// writes after a failure ([`RunSet::add`]) is replaced.
    pub(crate) fn reopen(&self) -> std::io::Result<Self> {
        let set = Self::open_recorded(&self.dir, self.nothing_below, false, &self.cache)?;
        Ok(set.with_put_once(self.put_once))
    }

    /// Says whether another store under the runs holds keys their removals hide.
    pub(crate) fn set_nothing_below(&mut self, nothing_below: bool) {
        self.nothing_below = nothing_below;
    }

    /// Says which keys are written once only, never again after a removal: a merge that
    /// finds such a key's removal over its value drops both ([`runs::compact`]).
    pub(crate) fn with_put_once(mut self, put_once: fn(&[u8]) -> bool) -> Self {
        self.put_once = put_once;
        self
    }

    /// Keeps up to `bytes` of the blocks the runs' reads take in memory, for reads that come
    /// back to them ([`BlockCache`]); none until this is called. A set opened again
    /// ([`RunSet::reopen`]) shares the cache.
    pub(crate) fn with_cache_bytes(self, bytes: usize) -> Self {
        self.cache.set_budget(bytes);
        self
    }

    /// The runs, newest first, as they are now.
    pub(crate) fn runs(&self) -> Arc<Vec<Arc<Named>>> {
        self.runs.clone()
    }

    /// The last checkpoint the runs hold, 0 if none.
    pub(crate) fn last_checkpoint(&self) -> u64 {
        self.runs.first().map_or(0, |r| r.last)
    }

    /// Runs `write` unless an earlier one failed, and marks the set broken if it fails.
    fn writing<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        if let Some(why) = &self.broken {
            return Err(std::io::Error::other(format!(
                "the runs in {} are not written to after a failure ({why}): open them again",
                self.dir.display()
            )));
        }
        let done = write(self);
        if let Err(e) = &done {
            self.broken = Some(e.to_string());
        }
        done
    }

    /// Writes checkpoint `number`'s keys (ascending; later than every run's) as the newest
    /// run.
    pub(crate) fn add<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        number: u64,
        entries: impl IntoIterator<Item = std::io::Result<(K, Option<V>)>>,
    ) -> std::io::Result<()> {
        self.writing(|set| set.add_run(number, entries))
    }

    fn add_run<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        number: u64,
        entries: impl IntoIterator<Item = std::io::Result<(K, Option<V>)>>,
    ) -> std::io::Result<()> {
        if number <= self.last_checkpoint() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("checkpoint {number} is not after the runs' last"),
            ));
        }
        let path = self.dir.join(name(number, number));
        runs::write(&path, entries)?;
        let named = open_named(&path, number, number, &self.cache)?;
        write_record(&self.dir, number)?;
        let mut runs = Vec::with_capacity(self.runs.len() + 1);
        runs.push(Arc::new(named));
        runs.extend(self.runs.iter().cloned());
        self.runs = Arc::new(runs);
        Ok(())
    }

    /// Merges runs while [`due`] finds a window; returns how many merges it made.
    pub(crate) fn compact(&mut self) -> std::io::Result<usize> {
        self.writing(|set| {
            let mut merges = 0;
            while let Some(window) = set.due() {
                set.merge(window)?;
                merges += 1;
            }
            Ok(merges)
        })
    }

    /// The first window of runs (indexes, newest first) due a merge ([`due`]).
    fn due(&self) -> Option<std::ops::Range<usize>> {
        due(&self.runs.iter().map(|r| r.run.bytes()).collect::<Vec<_>>())
    }

    /// Merges a window of runs in a row into one, written before they are deleted.
    fn merge(&mut self, window: std::ops::Range<usize>) -> std::io::Result<()> {
        let replaced = &self.runs[window.clone()];
        let inputs: Vec<&Run> = replaced.iter().map(|r| &r.run).collect();
        let (first, last) = (replaced[replaced.len() - 1].first, replaced[0].last);
        let nothing_below = self.nothing_below && window.end == self.runs.len();
        let path = self.dir.join(name(first, last));
        runs::compact(&path, &inputs, nothing_below, self.put_once)?;
        let merged = Arc::new(open_named(&path, first, last, &self.cache)?);
        let gone: Vec<PathBuf> = replaced
            .iter()
            .map(|r| self.dir.join(name(r.first, r.last)))
            .collect();
        let mut runs = self.runs[..window.start].to_vec();
        runs.push(merged);
        runs.extend(self.runs[window.end..].iter().cloned());
        self.runs = Arc::new(runs);
        for path in gone {
            std::fs::remove_file(path)?;
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

/// Runs below this size count as this size, so that a quiet hour's small checkpoints merge
/// too.
const SMALL_RUN: u64 = 1 << 20;

/// The first window of runs (sizes, newest first) due a merge: from a run, each older run
/// joins while it is at most twice the window's bytes so far (small ones counted as
/// [`SMALL_RUN`]), as universal compaction does; [`MERGE_AT`] or more make a merge, at
/// most twice that many. A sum, not the first run's size: a small run left between
/// larger ones is taken into the next window instead of cutting the list for good.
fn due(sizes: &[u64]) -> Option<std::ops::Range<usize>> {
    (0..sizes.len()).find_map(|start| {
        let mut total = sizes[start].max(SMALL_RUN);
        let mut end = start + 1;
        while end < sizes.len()
            && end - start < 2 * MERGE_AT
            && sizes[end].max(SMALL_RUN) <= 2 * total
        {
            total += sizes[end].max(SMALL_RUN);
            end += 1;
        }
        (end - start >= MERGE_AT).then_some(start..end)
    })
}

/// Where the last checkpoint of the runs in `dir` is recorded: `<dir>.last`, beside it.
pub(crate) fn record_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".last");
    dir.with_file_name(name)
}

/// Where [`write_record`] writes the record before renaming it into place.
fn record_temporary(dir: &Path) -> PathBuf {
    let mut path = record_path(dir).into_os_string();
    path.push(runs::TEMPORARY_SUFFIX);
    PathBuf::from(path)
}

/// Whether the folder `dir` or its record shows checkpoints written: a run there, or a
/// record past 0. A store whose index of everything else is new must not hold any.
pub(crate) fn written(dir: &Path) -> std::io::Result<bool> {
    if read_record(dir)?.is_some_and(|last| last > 0) {
        return Ok(true);
    }
    if !dir.try_exists()? {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir)? {
        if parse_name(&entry?.file_name().to_string_lossy()).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Bytes of a record: 20 digits and a newline.
const RECORD_LEN: usize = 21;

/// The checkpoint recorded for the runs in `dir`, `None` if no record is there; a record
/// that is not [`RECORD_LEN`] bytes of digits and a newline is an error.
fn read_record(dir: &Path) -> std::io::Result<Option<u64>> {
    let path = record_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            let what = format!("reading {}: {e}", path.display());
            return Err(std::io::Error::new(e.kind(), what));
        }
    };
    let number = match bytes.split_last() {
        Some((b'\n', digits)) if bytes.len() == RECORD_LEN => std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok()),
        _ => None,
    };
    number.map(Some).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} is damaged: it is not a checkpoint number",
                path.display()
            ),
        )
    })
}

/// Records `number` as the last checkpoint of the runs in `dir`, whole or not at all: a
/// temporary file, synced, renamed over the record, and the parent folder synced.
fn write_record(dir: &Path, number: u64) -> std::io::Result<()> {
    let (path, temporary) = (record_path(dir), record_temporary(dir));
    {
        let mut file = std::fs::File::create(&temporary)?;
        std::io::Write::write_all(&mut file, format!("{number:020}\n").as_bytes())?;
        file.sync_data()?;
    }
    std::fs::rename(&temporary, &path)?;
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(parent.unwrap_or(Path::new(".")))?.sync_all()
}

fn open_named(
    path: &Path,
    first: u64,
    last: u64,
    cache: &Arc<BlockCache>,
) -> std::io::Result<Named> {
    let run = Run::open(path, cache)?;
    Ok(Named { run, first, last })
}

fn name(first: u64, last: u64) -> String {
    format!("{first:020}-{last:020}")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (first, last) = name.split_once('-')?;
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(first) && digits(last)) {
        return None;
    }
    let span = (first.parse().ok()?, last.parse().ok()?);
    (span.0 <= span.1).then_some(span)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::runs::{Held, Merged};

    type Map = BTreeMap<Vec<u8>, Held>;

    fn key(i: u32) -> Vec<u8> {
        format!("k{i:05}").into_bytes()
    }

    /// Checkpoint `n`'s writes: puts of keys n..n+40 (value n), and a removal of key n-1.
    fn writes(n: u64) -> Map {
        let n32 = n as u32;
        let mut map: Map = (n32..n32 + 40)
            .map(|i| (key(i), Some(vec![n as u8; 30])))
            .collect();
        if n32 > 0 {
            map.insert(key(n32 - 1), None);
        }
        map
    }

    fn add(set: &mut RunSet, n: u64, applied: &mut Map) {
        let map = writes(n);
        set.add(n, map.iter().map(|(k, v)| Ok((k.as_slice(), v.as_deref()))))
            .unwrap();
        applied.extend(map);
    }

    /// What readers see: every run merged, newest first, removals hidden.
    fn contents(set: &RunSet) -> Map {
        let runs = set.runs();
        Merged::new(runs.iter().map(|r| r.run.scan(b"")))
            .map(Result::unwrap)
            .filter(|(_, v)| v.is_some())
            .collect()
    }

    fn live(applied: &Map) -> Map {
        applied
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A set in `dir` with checkpoints 1 to 4 added, none merged yet, and what they wrote.
    fn four_checkpoints(dir: &Path, nothing_below: bool) -> (RunSet, Map) {
        let mut set = RunSet::open(dir, nothing_below).unwrap();
        let mut applied = Map::new();
        for n in 1..=4 {
            add(&mut set, n, &mut applied);
        }
        (set, applied)
    }

    /// The folder of runs in `dir`, whose record is written beside it, in `dir` too.
    fn runs_in(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("runs")
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The set's cache holds what reads take, never what a merge reads; a set opened again
    /// shares it; closed runs, merged away or replaced by a reopen, leave it.
    #[test]
    fn the_runs_share_the_sets_cache_through_merges_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (set, applied) = four_checkpoints(&runs_in(&dir), true);
        let mut set = set.with_cache_bytes(1 << 20);
        assert_eq!(set.cache.bytes(), 0);
        // Held, as a reader may, so that they stay open through the merge.
        let merged_away = set.runs();
        assert_eq!(set.compact().unwrap(), 1);
        assert_eq!(set.cache.bytes(), 0, "a merge's reads pass the cache by");
        drop(merged_away);
        assert_eq!(contents(&set), live(&applied));
        let after_reads = set.cache.bytes();
        assert!(after_reads > 0);
        let again = set.reopen().unwrap();
        assert!(Arc::ptr_eq(&again.cache, &set.cache));
        assert_eq!(contents(&again), live(&applied));
        assert_eq!(
            set.cache.bytes(),
            2 * after_reads,
            "each open's blocks, apart"
        );
        drop(set);
        assert_eq!(
            again.cache.bytes(),
            after_reads,
            "the closed runs' blocks gone"
        );
        let cache = again.cache.clone();
        drop(again);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn four_small_runs_in_a_row_become_one_and_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::open(&runs_in(&dir), true).unwrap();
        let mut applied = Map::new();
        for n in 1..=3 {
            add(&mut set, n, &mut applied);
            assert_eq!(set.compact().unwrap(), 0);
        }
        add(&mut set, 4, &mut applied);
        assert_eq!(set.compact().unwrap(), 1);
        assert_eq!(files(&runs_in(&dir)), vec![name(1, 4)]);
        assert_eq!(contents(&set), live(&applied));
        assert_eq!(set.last_checkpoint(), 4);
        let err = set.add(4, [Ok((b"a", Some(b"b")))]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);

        // The merge was the oldest run: its removals are gone, not only hidden.
        let merged = &set.runs()[0].run;
        // Key 1: put by checkpoint 1, removed by checkpoint 2.
        assert_eq!(
            merged.get(&key(1)).unwrap(),
            None,
            "removed, and nothing below"
        );
        assert_eq!(merged.get(&key(4)).unwrap(), Some(Some(vec![4; 30])));
        drop(set);
        let set = RunSet::open(&runs_in(&dir), true).unwrap();
        assert_eq!(contents(&set), live(&applied));
    }

    /// Over another store (sled, until it is folded away), the oldest run's removals stay:
    /// they hide what that store holds.
    #[test]
    fn over_another_store_a_merge_keeps_its_removals() {
        let dir = tempfile::tempdir().unwrap();
        let (mut set, _) = four_checkpoints(&runs_in(&dir), false);
        assert_eq!(set.compact().unwrap(), 1);
        let merged = &set.runs()[0].run;
        assert_eq!(
            merged.get(&key(1)).unwrap(),
            Some(None),
            "the removal is kept"
        );
    }

    /// Over another store, a removal of a key written once only goes with the value it hid
    /// in the merge; one that hid no value there may hide one below, and stays.
    #[test]
    fn a_merge_drops_a_put_once_keys_removal_with_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let (set, applied) = four_checkpoints(&runs_in(&dir), false);
        let mut set = set.with_put_once(|key| key != self::key(2).as_slice());
        assert_eq!(set.compact().unwrap(), 1);
        let merged = &set.runs()[0].run;
        // Key 1: put by checkpoint 1, removed by checkpoint 2, both in the merge.
        assert_eq!(merged.get(&key(1)).unwrap(), None, "both gone");
        // Key 0: removed by checkpoint 1, put by none of them: sled may hold it.
        assert_eq!(merged.get(&key(0)).unwrap(), Some(None));
        // Key 2: its value hidden too, but not a key written once.
        assert_eq!(merged.get(&key(2)).unwrap(), Some(None));
        assert_eq!(contents(&set), live(&applied));
    }

    #[test]
    fn many_checkpoints_keep_few_runs_and_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::open(&runs_in(&dir), true).unwrap();
        let mut applied = Map::new();
        let mut most = 0;
        for n in 1..=200 {
            add(&mut set, n, &mut applied);
            set.compact().unwrap();
            most = most.max(set.runs().len());
        }
        assert!(most <= MERGE_AT * 2, "{most} runs at once");
        assert_eq!(contents(&set), live(&applied));
        assert_eq!(files(&runs_in(&dir)).len(), set.runs().len());
    }

    /// A crash after a merge's run was renamed into place, before its inputs were deleted:
    /// the open deletes the inputs. Read beside the merge, an input would bring back a key
    /// that a removal in a later input took away and the merge (the oldest run) dropped.
    #[test]
    fn an_open_after_a_merge_cut_short_deletes_the_merged_runs() {
        let dir = tempfile::tempdir().unwrap();
        let aside = tempfile::tempdir().unwrap();
        let (mut set, applied) = four_checkpoints(&runs_in(&dir), true);
        let inputs = files(&runs_in(&dir));
        for f in &inputs {
            std::fs::copy(runs_in(&dir).join(f), aside.path().join(f)).unwrap();
        }
        set.compact().unwrap();
        drop(set);
        for f in &inputs {
            std::fs::copy(aside.path().join(f), runs_in(&dir).join(f)).unwrap();
        }
        std::fs::write(
            runs_in(&dir).join(format!("{}.tmp", name(5, 5))),
            b"half a run",
        )
        .unwrap();
        assert_eq!(files(&runs_in(&dir)).len(), 6);

        let set = RunSet::open(&runs_in(&dir), true).unwrap();
        assert_eq!(files(&runs_in(&dir)), vec![name(1, 4)]);
        assert_eq!(set.runs().len(), 1);
        assert_eq!(contents(&set), live(&applied));
        assert!(!contents(&set).contains_key(&key(1)), "key 1 stays removed");
    }

    #[test]
    fn readers_keep_the_runs_they_took_while_a_merge_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut set, applied) = four_checkpoints(&runs_in(&dir), true);
        let taken = set.runs();
        set.compact().unwrap();
        assert_eq!(taken.len(), 4);
        let read: Map = Merged::new(taken.iter().map(|r| r.run.scan(b"")))
            .map(Result::unwrap)
            .filter(|(_, v)| v.is_some())
            .collect();
        assert_eq!(read, live(&applied), "deleted files still read");
    }

    #[test]
    fn a_file_that_is_not_a_run_or_runs_that_overlap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(runs_in(&dir)).unwrap();
        std::fs::write(runs_in(&dir).join("notes.txt"), b"").unwrap();
        let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
        assert!(err.to_string().contains("not a run"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(runs_in(&dir)).unwrap();
        for (first, last) in [(1, 4), (3, 6)] {
            let path = runs_in(&dir).join(name(first, last));
            runs::write(&path, [Ok((b"a", Some(b"b")))]).unwrap();
        }
        let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    /// Merges over sizes alone, as `compact` makes them after each checkpoint (a merge's
    /// size the sum of its inputs', the most it can be): the runs left, and the most at
    /// once.
    fn tiers(sizes: impl IntoIterator<Item = u64>) -> (usize, usize) {
        let (mut runs, mut most) = (Vec::new(), 0);
        for size in sizes {
            runs.insert(0, size);
            while let Some(window) = due(&runs) {
                let merged: u64 = runs[window.clone()].iter().sum();
                runs.splice(window, [merged]);
            }
            most = most.max(runs.len());
        }
        (runs.len(), most)
    }

    /// Runs over the 1 MiB floor, of sizes that vary with load: they stay few. (From
    /// helper 46's review: with each run compared to its window's first, 2,000 checkpoints
    /// of 2-8 MiB left 398 runs, and sizes alternating 1.5 and 4 MiB never merged.)
    #[test]
    fn checkpoints_of_any_size_leave_few_runs() {
        let mib = SMALL_RUN;
        let alternating = (0..1_000).map(|i| if i % 2 == 0 { 3 * mib / 2 } else { 4 * mib });
        let (left, most) = tiers(alternating);
        assert!(most <= 4 * MERGE_AT, "{left} left, {most} at most");
        let mut rng = 0x5eed_u64;
        let varying = (0..2_000).map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            2 * mib + rng % (6 * mib)
        });
        let (left, most) = tiers(varying);
        assert!(most <= 4 * MERGE_AT, "{left} left, {most} at most");
        let (_, most) = tiers((0..2_000).map(|i| 1 + i % 5_000));
        assert!(most <= 2 * MERGE_AT, "small runs: {most}");
        assert_eq!(due(&[mib; 3]), None);
        assert_eq!(due(&[mib; 4]), Some(0..4));
        assert_eq!(due(&[mib; 20]), Some(0..8), "at most eight at once");
        assert_eq!(due(&[mib, mib, mib, 100 * mib]), None, "a large run waits");
    }

    /// An add that fails leaves the set refusing writes until it is opened again, which
    /// takes the folder as it is.
    #[test]
    fn after_a_failed_write_the_set_takes_no_more_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::open(&runs_in(&dir), true).unwrap();
        let mut applied = Map::new();
        add(&mut set, 1, &mut applied);
        // A file where checkpoint 2's run goes: its link fails.
        std::fs::write(runs_in(&dir).join(name(2, 2)), b"in the way").unwrap();
        let entries = writes(2);
        let tried = set.add(
            2,
            entries
                .iter()
                .map(|(k, v)| Ok((k.as_slice(), v.as_deref()))),
        );
        assert_eq!(tried.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        let err = set.add(3, [Ok((b"a", Some(b"b")))]).unwrap_err();
        assert!(err.to_string().contains("open them again"), "{err}");
        assert!(set.compact().is_err());
        assert_eq!(contents(&set), live(&applied), "reads go on");

        std::fs::remove_file(runs_in(&dir).join(name(2, 2))).unwrap();
        let mut set = RunSet::open(&runs_in(&dir), true).unwrap();
        add(&mut set, 2, &mut applied);
        assert_eq!(contents(&set), live(&applied));
    }

    /// A run lost from the folder (a restore that missed it, a deleted file) is refused at
    /// open, whether it was the oldest or one in between, rather than read around.
    #[test]
    fn a_folder_missing_a_run_is_refused() {
        for lost in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let mut set = RunSet::open(&runs_in(&dir), true).unwrap();
            let mut applied = Map::new();
            for n in 1..=3 {
                add(&mut set, n, &mut applied);
            }
            drop(set);
            std::fs::remove_file(runs_in(&dir).join(name(lost, lost))).unwrap();
            let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
            let said = format!("lacks the run of checkpoint {lost}");
            assert!(err.to_string().contains(&said), "{err}");
        }
    }

    /// A restore that missed the newest runs, or all of them, would read the keys they
    /// wrote at older values, with no gap in the names to show it: the record beside the
    /// folder does.
    #[test]
    fn a_folder_whose_newest_runs_are_gone_is_refused() {
        // The newest run, every run, the folder itself.
        let newest = vec![name(5, 5)];
        let every = vec![name(5, 5), name(1, 4)];
        for (lost, folder_gone, ends_at) in
            [(&newest, false, 4), (&every, false, 0), (&every, true, 0)]
        {
            let dir = tempfile::tempdir().unwrap();
            let (mut set, mut applied) = four_checkpoints(&runs_in(&dir), true);
            set.compact().unwrap();
            add(&mut set, 5, &mut applied);
            assert_eq!(files(&runs_in(&dir)), vec![name(1, 4), name(5, 5)]);
            drop(set);
            for f in lost {
                std::fs::remove_file(runs_in(&dir).join(f)).unwrap();
            }
            if folder_gone {
                std::fs::remove_dir(runs_in(&dir)).unwrap();
            }
            let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
            let said = "records checkpoint 5, but the runs in";
            assert!(err.to_string().contains(said), "{err}");
            let said = format!("end at checkpoint {ends_at}: the newest runs were lost");
            assert!(err.to_string().contains(&said), "{err}");
            let err = RunSet::adopt(&runs_in(&dir), true).unwrap_err();
            assert!(err.to_string().contains(&said), "never adopted over: {err}");
            assert_eq!(
                runs_in(&dir).exists(),
                !folder_gone,
                "a refusal makes nothing"
            );
        }
    }

    /// Runs and no record: a record deleted, or a folder from before records. Only
    /// `adopt`, for the latter, takes the runs as whole, and records them.
    #[test]
    fn runs_without_a_record_are_refused_unless_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let (set, applied) = four_checkpoints(&runs_in(&dir), true);
        drop(set);
        let record = record_path(&runs_in(&dir));
        assert_eq!(record, dir.path().join("runs.last"));
        std::fs::remove_file(&record).unwrap();
        let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("runs.last is missing"), "{err}");

        let set = RunSet::adopt(&runs_in(&dir), true).unwrap();
        assert_eq!(read_record(&runs_in(&dir)).unwrap(), Some(4));
        assert_eq!(contents(&set), live(&applied));
        drop(set);
        std::fs::remove_file(runs_in(&dir).join(name(4, 4))).unwrap();
        let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
        assert!(err.to_string().contains("newest runs were lost"), "{err}");

        // An existing folder without runs or a record is not taken as new either.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(runs_in(&dir)).unwrap();
        assert!(RunSet::open(&runs_in(&dir), true).is_err());
        assert!(RunSet::adopt(&runs_in(&dir), true).is_ok());
        assert_eq!(read_record(&runs_in(&dir)).unwrap(), Some(0));
    }

    /// A crash after a run was linked in, before its record was written, leaves the record
    /// one run behind; a binary of layout 4 writing runs leaves it further behind. The open
    /// takes the runs and brings the record up to them, so that it guards them from then on.
    #[test]
    fn a_record_behind_the_runs_is_brought_up_to_them() {
        for behind in [1, 3] {
            let dir = tempfile::tempdir().unwrap();
            let (set, mut applied) = four_checkpoints(&runs_in(&dir), true);
            drop(set);
            write_record(&runs_in(&dir), 4 - behind).unwrap();
            std::fs::write(record_temporary(&runs_in(&dir)), b"0000").unwrap();
            let mut set = RunSet::open(&runs_in(&dir), true).unwrap();
            assert_eq!(set.last_checkpoint(), 4);
            assert_eq!(
                read_record(&runs_in(&dir)).unwrap(),
                Some(4),
                "{behind} behind"
            );
            assert_eq!(contents(&set), live(&applied));
            assert!(
                !files(dir.path()).iter().any(|f| f.ends_with(".tmp")),
                "a crashed write's temporary record is deleted"
            );
            add(&mut set, 5, &mut applied);
            assert_eq!(read_record(&runs_in(&dir)).unwrap(), Some(5));
            drop(set);
            std::fs::remove_file(runs_in(&dir).join(name(5, 5))).unwrap();
            assert!(RunSet::open(&runs_in(&dir), true).is_err());
        }
    }

    /// A set reopened after a failed write reads the folder strictly: gone, it is refused,
    /// not taken as new.
    #[test]
    fn a_reopen_never_takes_a_folder_as_new() {
        let dir = tempfile::tempdir().unwrap();
        let (set, _) = four_checkpoints(&runs_in(&dir), true);
        std::fs::remove_dir_all(runs_in(&dir)).unwrap();
        std::fs::remove_file(record_path(&runs_in(&dir))).unwrap();
        let err = set.reopen().unwrap_err();
        assert!(err.to_string().contains("runs.last is missing"), "{err}");
        assert!(!runs_in(&dir).exists());
    }

    #[test]
    fn a_damaged_record_is_refused() {
        for damaged in [
            &b""[..],
            b"4\n",
            b"00000000000000000004",
            b"0000000000000000000x\n",
            b"00000000000000000004\n\n",
            b"+0000000000000000004\n",
            b"99999999999999999999\n",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (set, _) = four_checkpoints(&runs_in(&dir), true);
            drop(set);
            std::fs::write(record_path(&runs_in(&dir)), damaged).unwrap();
            let err = RunSet::open(&runs_in(&dir), true).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{damaged:?}");
            assert!(err.to_string().contains("damaged"), "{damaged:?}: {err}");
        }
    }

    #[test]
    fn run_names_say_first_and_last_checkpoint() {
        assert_eq!(parse_name(&name(3, 9)), Some((3, 9)));
        for bad in [
            "3-9",
            &name(9, 3),
            "00000000000000000003-0000000000000000000x",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
