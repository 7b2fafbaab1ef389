//! Numbered records, back to back in one file, with where each ends in another: how the
//! store keeps what only ever grows and is read by number (the log's entries, the
//! envelopes of messages).
//!
//! In a folder:
//! ```text
//! entries   the records, back to back
//! ends      u64 big-endian at 8·i: where record i ends in `entries` (it starts where i−1 ends)
//! ```
//!
//! Records are written as a group's other writes are applied: after the group's
//! write-ahead log record is synced, by [`Records::write`], which replay calls again at the
//! same offsets. A group that holds a large message record writes its records before its
//! log record instead, and syncs `entries`; the log record names them by length and
//! checksum, and a replay reads them back ([`Records::read_written`]) and writes them
//! again, `ends` included. Every checkpoint syncs the files before it deletes the segments
//! that hold or name their writes. Bytes past the count the store keeps are ignored, and overwritten by the
//! next appends. Callers check a number
//! against that count before reading it, and the store checks at open that the files hold
//! at least that many records ([`Records::check_holds`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::wal::WrittenFirst;

/// The two files of a folder of records (module docs).
#[derive(Debug)]
pub(crate) struct Records {
    pub(super) entries: File,
    pub(super) ends: File,
    /// `entries` opened a second time, synced by [`Records::sync_entries`] alone: the
    /// kernel reports a failed write-back once per open file, to the first sync that asks.
    /// The committer's sync of records written before their log record, and the
    /// checkpointer's of everything, must each hear of it.
    entries_written_first: File,
    /// Longest record read back: anything longer is a damaged `ends` file.
    max: u64,
    /// The length of `entries` at the last [`Records::sync_entries`].
    #[cfg(test)]
    pub(super) synced_first: std::sync::atomic::AtomicU64,
    /// Bytes read from `entries` by [`Records::get`], [`Records::get_past`] and
    /// [`Records::read_written`].
    #[cfg(test)]
    pub(super) bytes_read: std::sync::atomic::AtomicU64,
}

impl Records {
    /// Opens (or creates) the files in `dir`, then syncs `dir`.
    pub(crate) fn open(dir: &Path, max: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let records = Self {
            entries: open("entries")?,
            ends: open("ends")?,
            entries_written_first: open("entries")?,
            max,
            #[cfg(test)]
            synced_first: Default::default(),
            #[cfg(test)]
            bytes_read: Default::default(),
        };
        File::open(dir)?.sync_all()?;
        Ok(records)
    }

    /// Writes records (by number, ascending and contiguous with what is on file) in one
    /// write per file. Writes the same bytes at the same offsets when called again with
    /// the same arguments, which is how replay stays safe.
    pub(crate) fn write(&self, records: &[(u64, &[u8])]) -> std::io::Result<()> {
        let Some(&(first, _)) = records.first() else {
            return Ok(());
        };
        let mut at = match first {
            0 => 0,
            i => self.end(i - 1)?,
        };
        // Record first − 1 was written before this (synced, or earlier in the replay), so
        // its end lies within the file unless `ends` is damaged.
        if at > self.entries.metadata()?.len() {
            return Err(invalid("an `ends` file points past its `entries`"));
        }
        let (start, mut data, mut ends) = (at, Vec::new(), Vec::new());
        for (n, (number, record)) in records.iter().enumerate() {
            if Some(*number) != first.checked_add(n as u64) {
                return Err(invalid("records to write are not contiguous"));
            }
            at += record.len() as u64;
            data.extend_from_slice(record);
            ends.extend_from_slice(&at.to_be_bytes());
        }
        self.entries.write_all_at(&data, start)?;
        self.ends.write_all_at(&ends, offset(first, 8)?)
    }

    /// Record `number`, which the caller knows is below the count.
    pub(crate) fn get(&self, number: u64) -> std::io::Result<Vec<u8>> {
        let (start, end) = self.span(number)?;
        self.read(start, end)
    }

    /// Record `number` (below the count) without a leading part the caller has no use
    /// for: `skip` is given the record's first `lead` bytes and says how many bytes from
    /// the start to leave unread (`None`: the record is damaged). A record of up to
    /// [`Records::WHOLE_UP_TO`] bytes is read whole, in one read, and given back whole:
    /// the caller's decoding must take the record either way.
    pub(crate) fn get_past(
        &self,
        number: u64,
        lead: usize,
        skip: impl FnOnce(&[u8]) -> Option<u64>,
    ) -> std::io::Result<Vec<u8>> {
        let (start, end) = self.span(number)?;
        if end - start <= Self::WHOLE_UP_TO {
            return self.read(start, end);
        }
        let mut first = vec![0; lead.min((end - start) as usize)];
        self.entries.read_exact_at(&mut first, start)?;
        #[cfg(test)]
        self.bytes_read
            .fetch_add(first.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let past = skip(&first)
            .and_then(|skipped| start.checked_add(skipped))
            .filter(|&past| past <= end)
            .ok_or_else(|| invalid("a record's leading part runs past its end"))?;
        self.read(past, end)
    }

    /// Records up to this long are read whole by [`Records::get_past`]: a second read
    /// would cost more than the bytes it saves.
    pub(crate) const WHOLE_UP_TO: u64 = 4096;

    fn read(&self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        let mut record = vec![0; (end - start) as usize];
        self.entries.read_exact_at(&mut record, start)?;
        #[cfg(test)]
        self.bytes_read
            .fetch_add(end - start, std::sync::atomic::Ordering::Relaxed);
        Ok(record)
    }

    /// Where record `number` starts and ends in `entries`, checked against the limit.
    fn span(&self, number: u64) -> std::io::Result<(u64, u64)> {
        // Where the record starts and ends are adjacent in `ends`: one read for both.
        let (start, end) = match number {
            0 => (0, self.end(0)?),
            i => {
                let mut both = [0; 16];
                self.ends.read_exact_at(&mut both, offset(i - 1, 8)?)?;
                let (mut start, mut end) = ([0; 8], [0; 8]);
                start.copy_from_slice(&both[..8]);
                end.copy_from_slice(&both[8..]);
                (u64::from_be_bytes(start), u64::from_be_bytes(end))
            }
        };
        if end < start || end - start > self.max {
            return Err(invalid("an `ends` file is damaged"));
        }
        Ok((start, end))
    }

    fn end(&self, number: u64) -> std::io::Result<u64> {
        let mut end = [0; 8];
        self.ends.read_exact_at(&mut end, offset(number, 8)?)?;
        Ok(u64::from_be_bytes(end))
    }

    /// Checks that the files hold `count` records. They hold more after a crash; less
    /// means they were lost or cut short.
    pub(crate) fn check_holds(&self, count: u64) -> std::io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        if self.ends.metadata()?.len() < offset(count, 8)? {
            return Err(short("ends", count));
        }
        if self.entries.metadata()?.len() < self.end(count - 1)? {
            return Err(short("entries", count));
        }
        Ok(())
    }

    /// Records `first.0`, `first.0 + 1`, … as [`Records::write`] put them, by the lengths
    /// and checksums given (from the log records that name them), whether or not `ends`
    /// holds them yet: record `first.0` starts where the one before it ends. A record that
    /// is short or does not match its checksum is damage.
    pub(crate) fn read_written(
        &self,
        named: &[(u64, WrittenFirst)],
    ) -> std::io::Result<Vec<Vec<u8>>> {
        let Some(&(first, _)) = named.first() else {
            return Ok(Vec::new());
        };
        let mut at = match first {
            0 => 0,
            i => self.end(i - 1)?,
        };
        let mut read = Vec::with_capacity(named.len());
        for (n, (number, written)) in named.iter().enumerate() {
            if Some(*number) != first.checked_add(n as u64) {
                return Err(invalid("records to read back are not contiguous"));
            }
            if written.len > self.max {
                return Err(invalid(
                    "a record named by the write-ahead log is over the limit",
                ));
            }
            let end = at
                .checked_add(written.len)
                .ok_or_else(|| invalid("a file offset is past 2^64 bytes"))?;
            let record = self.read(at, end)?;
            if crc32fast::hash(&record) != written.crc {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "message record {number}, written before its write-ahead log record, \
                         does not match the checksum that record names"
                    ),
                ));
            }
            at = end;
            read.push(record);
        }
        Ok(read)
    }

    /// `fdatasync` of the records' file, not of `ends` (what a group writes before its
    /// log record must be durable before it; the replay rewrites `ends`).
    pub(crate) fn sync_entries(&self) -> std::io::Result<()> {
        self.entries_written_first.sync_data()?;
        #[cfg(test)]
        self.synced_first.store(
            self.entries.metadata()?.len(),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// `fdatasync` of both files.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.entries.sync_data()?;
        self.ends.sync_data()
    }

    /// Bytes the files occupy.
    pub(crate) fn bytes(&self) -> std::io::Result<u64> {
        Ok(self.entries.metadata()?.len() + self.ends.metadata()?.len())
    }
}

/// Where item `first` of a file of `width`-byte items starts; an error past `u64`.
pub(super) fn offset(first: u64, width: u64) -> std::io::Result<u64> {
    first
        .checked_mul(width)
        .ok_or_else(|| invalid("a file offset is past 2^64 bytes"))
}

/// A file shorter than `count` records (or log entries) need.
pub(super) fn short(file: &str, count: u64) -> std::io::Error {
    invalid(&format!("`{file}` is shorter than {count} records need"))
}

pub(super) fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use std::io::{Seek as _, SeekFrom};

    use super::*;

    /// A record longer than what is read whole is read from where `skip` says, after a
    /// read of its lead alone; a shorter one is read whole, without asking; a skip past
    /// the record's end, or none, is damage.
    #[test]
    fn a_record_is_read_past_its_leading_part_when_it_is_long() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path(), 1 << 20).unwrap();
        let long: Vec<u8> = (0..5_000u32).map(|i| i as u8).collect();
        let short = vec![7; Records::WHOLE_UP_TO as usize];
        let just_over = vec![8; Records::WHOLE_UP_TO as usize + 1];
        records
            .write(&[(0, &short), (1, &long), (2, &just_over)])
            .unwrap();
        let past = records.get_past(2, 11, |_| Some(Records::WHOLE_UP_TO));
        assert_eq!(past.unwrap(), [8]);

        let whole = records.get_past(0, 11, |_| panic!("a short record is read whole"));
        assert_eq!(whole.unwrap(), short);
        let tail = records.get_past(1, 11, |lead| {
            assert_eq!(lead, &long[..11]);
            Some(4_990)
        });
        assert_eq!(tail.unwrap(), &long[4_990..]);
        assert_eq!(records.get_past(1, 11, |_| Some(5_000)).unwrap(), b"");
        for skip in [Some(5_001), Some(u64::MAX), None] {
            let err = records.get_past(1, 11, |_| skip).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{skip:?}");
        }
        assert_eq!(records.get(1).unwrap(), long);
    }

    /// What a log record names must follow on from what is on file, one record after the
    /// other, each within the limit and matching its checksum.
    #[test]
    fn records_named_out_of_order_over_the_limit_or_unlike_their_checksum_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path(), 64).unwrap();
        let (a, b) = (b"first".as_slice(), b"second".as_slice());
        records.write(&[(0, a), (1, b)]).unwrap();
        let named = |r: &[u8]| WrittenFirst::of(r);
        assert_eq!(
            records
                .read_written(&[(0, named(a)), (1, named(b))])
                .unwrap(),
            [a.to_vec(), b.to_vec()]
        );
        assert_eq!(
            records.read_written(&[(1, named(b))]).unwrap(),
            [b.to_vec()]
        );
        for (refused, why) in [
            (vec![(0, named(a)), (2, named(b))], "not contiguous"),
            (
                vec![(0, WrittenFirst { len: 65, crc: 0 })],
                "over the limit",
            ),
            (vec![(0, named(b))], "checksum"),
            (vec![(1, WrittenFirst { len: 7, crc: 0 })], "short"),
        ] {
            let err = records.read_written(&refused).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ),
                "{why}: {err}"
            );
        }
    }

    /// The committer's sync goes through an open of its own: a failed write-back is then
    /// reported to it and to the checkpointer's sync alike (one open file, one report).
    #[test]
    fn records_written_first_are_synced_through_an_open_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path(), 1 << 20).unwrap();
        records.write(&[(0, b"a record".as_slice())]).unwrap();
        let mut first = &records.entries_written_first;
        first.seek(SeekFrom::Start(3)).unwrap();
        let mut entries = &records.entries;
        assert_eq!(
            entries.stream_position().unwrap(),
            0,
            "two open file descriptions, not one shared"
        );
        records.sync_entries().unwrap();
        assert_eq!(records.get(0).unwrap(), b"a record");
    }

    #[test]
    fn records_read_back_and_rewrite_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path(), 1 << 10).unwrap();
        let all: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; usize::from(i) * 3]).collect();
        let batches: Vec<Vec<(u64, &[u8])>> = [0..1, 1..7, 7..8, 8..20]
            .into_iter()
            .map(|r| r.map(|i| (i as u64, all[i].as_slice())).collect())
            .collect();
        for batch in &batches {
            records.write(batch).unwrap();
        }
        let read_all = || ["entries", "ends"].map(|f| std::fs::read(dir.path().join(f)));
        let written = read_all().map(Result::unwrap);
        for batch in &batches {
            records.write(batch).unwrap();
        }
        assert_eq!(read_all().map(Result::unwrap), written);
        for (i, record) in all.iter().enumerate() {
            assert_eq!(&records.get(i as u64).unwrap(), record, "record {i}");
        }
        records.check_holds(20).unwrap();
        assert!(records.check_holds(21).is_err());
        // Each file at its exact length holds the records; one byte less does not.
        for (file, written) in [&records.entries, &records.ends].iter().zip(&written) {
            file.set_len(written.len() as u64 - 1).unwrap();
            assert!(records.check_holds(20).is_err());
            file.write_all_at(&written[written.len() - 1..], written.len() as u64 - 1)
                .unwrap();
            records.check_holds(20).unwrap();
        }
    }

    #[test]
    fn bad_writes_and_a_damaged_ends_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path(), 4).unwrap();
        let gap: Vec<(u64, &[u8])> = vec![(0, b"a"), (2, b"b")];
        assert!(records.write(&gap).is_err());
        records.write(&[(0, b"abc"), (1, b"de")]).unwrap();
        let kind = |e: std::io::Error| e.kind();
        // Record 1 claims to end before it starts.
        records.ends.write_all_at(&1u64.to_be_bytes(), 8).unwrap();
        assert_eq!(
            records.get(1).map_err(kind),
            Err(std::io::ErrorKind::InvalidData)
        );
        // Record 1 claims to be longer than the longest record.
        records.ends.write_all_at(&8u64.to_be_bytes(), 8).unwrap();
        assert_eq!(
            records.get(1).map_err(kind),
            Err(std::io::ErrorKind::InvalidData)
        );
        // Record 1 claims to end past `entries`: the next append would leave a hole.
        records.ends.write_all_at(&9u64.to_be_bytes(), 8).unwrap();
        assert_eq!(
            records.write(&[(2, b"f")]).map_err(kind),
            Err(std::io::ErrorKind::InvalidData)
        );
        // A number whose offset passes 2^64 bytes.
        assert_eq!(
            records.write(&[(u64::MAX / 4, b"g")]).map_err(kind),
            Err(std::io::ErrorKind::InvalidData)
        );
        assert_eq!(
            records.get(u64::MAX / 4).map_err(kind),
            Err(std::io::ErrorKind::InvalidData)
        );
    }
}
