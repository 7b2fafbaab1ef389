//! The store's write-ahead log: a commit is durable once its group's record is here and
//! `fdatasync`ed, one device round trip, and sled is brought to disk later, in bulk
//! (see `sled.rs`).
//!
//! A segment file `wal/<seq:016x>.wal` is a run of records:
//! ```text
//! len: u32 LE ‖ crc32(payload): u32 LE ‖ crc32(len ‖ crc32(payload)): u32 LE ‖ payload
//! ```
//! where the payload, `len` bytes (never 0), is a `WalGroup` in protobuf. A record holds a
//! group's writes as they reach the store: absolute values, so replaying a record twice, or
//! over files that already hold it, leaves the same state. A group that holds a large
//! message record writes its message records to their files first, synced, and its log
//! record names them by length and checksum ([`WrittenFirst`]) instead of holding them. A segment may be made from a
//! spare, a file of zeros written and synced in advance: records are written over its
//! zeros from the start, and zeros that fill the rest of the last segment end it. A full
//! segment is cut to its records before the next is made, so that in any other segment
//! zeros are damage (lost writes), as they were before spares.
//!
//! A record is appended only after the one before it was synced, so a crash can tear only
//! the last record of the last segment: short, or with sectors that never reached the disk
//! (zeros, or old bytes). It was never acknowledged, and [`read_segment`] drops it. A bad
//! record followed by a good one cannot be a torn write: that is damage, and opening fails
//! rather than skip acknowledged records. The header's own checksum is what lets a damaged
//! length field be told from a torn record: the reader looks for a good record after it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use prost::Message;

/// One key's new value (`None`: removed, unless `written_first` names it).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WalWrite {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
    /// A message record written to the message files, and synced, before this record:
    /// named here instead of held (`value` is then `None`).
    #[prost(message, optional, tag = "3")]
    pub written_first: Option<WrittenFirst>,
}

/// A message record the log's record names instead of holding: its length and checksum,
/// which a replay checks against what the message files hold.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub(crate) struct WrittenFirst {
    #[prost(uint64, tag = "1")]
    pub len: u64,
    /// CRC-32 (IEEE) of the record.
    #[prost(fixed32, tag = "2")]
    pub crc: u32,
}

impl WrittenFirst {
    pub(crate) fn of(record: &[u8]) -> Self {
        Self {
            len: record.len() as u64,
            crc: crc32fast::hash(record),
        }
    }
}

/// The writes of one commit group, applied to sled together (see `sled.rs`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WalGroup {
    #[prost(message, repeated, tag = "1")]
    pub writes: Vec<WalWrite>,
}

pub(crate) const HEADER: usize = 12;

/// Why the log could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalError {
    #[error("write-ahead log: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "write-ahead log segment {path} is damaged at byte {offset} ({why}), with acknowledged \
         records possibly after it; restore the data directory from a backup"
    )]
    Damaged {
        path: PathBuf,
        offset: u64,
        why: &'static str,
    },
}

/// The segment being appended to.
#[derive(Debug)]
pub(crate) struct Segment {
    file: File,
    seq: u64,
    /// Bytes of records written.
    bytes: u64,
    /// The file's length: `bytes`, or more when the segment was a spare.
    len: u64,
}

/// A file of zeros, synced, that the next segment is made from ([`prepare_spare`]).
const SPARE: &str = "spare";
const SPARE_TMP: &str = "spare.tmp";

impl Segment {
    /// Creates segment `seq` in `dir` from the spare file if one is ready, else as an empty
    /// file, and syncs `dir` so the name survives a power cut. A record written over a
    /// spare's zeros changes neither the file's size nor its blocks, so its `fdatasync` is
    /// one device write without a journal commit (about 90 µs here, against 130 µs for an
    /// append).
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let path = segment_path(dir, seq);
        if path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let file = match std::fs::rename(dir.join(SPARE), &path) {
            Ok(()) => OpenOptions::new().write(true).open(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)?,
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        File::open(dir)?.sync_all()?;
        Ok(Self {
            file,
            seq,
            bytes: 0,
            len,
        })
    }

    /// Writes one record after the last and syncs it; returns how much the file grew.
    pub fn append(&mut self, group: &WalGroup) -> std::io::Result<u64> {
        let payload = group.encode_to_vec();
        let len = u32::try_from(payload.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "commit group over 4 GiB")
        })?;
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&record).to_le_bytes());
        record.extend_from_slice(&payload);
        self.file.write_all_at(&record, self.bytes)?;
        self.file.sync_data()?;
        self.bytes += record.len() as u64;
        let grown = self.bytes.saturating_sub(self.len);
        self.len += grown;
        Ok(grown)
    }

    /// Makes every later append fail, as a disk that refuses writes would: for tests of
    /// what a failed log record does.
    #[cfg(test)]
    pub fn fail_appends(&mut self) -> std::io::Result<()> {
        self.file = File::open("/dev/null")?;
        Ok(())
    }

    /// Cuts a full segment's file to its records, before the next segment is made: from
    /// then on it is not the last, and its end must be its file's end. Returns the bytes
    /// freed.
    pub fn seal(&mut self) -> std::io::Result<u64> {
        let freed = self.len - self.bytes;
        if freed > 0 {
            self.file.set_len(self.bytes)?;
            self.file.sync_data()?;
            self.len = self.bytes;
        }
        Ok(freed)
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The file's length, spare zeros included.
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// Makes sure a spare of at least `bytes` zeros is ready in `dir` for the next
/// [`Segment::create`]: written, synced, and only then given its name, so a spare is all
/// zeros whenever it exists. Returns the bytes of zeros written.
pub(crate) fn prepare_spare(dir: &Path, bytes: u64) -> std::io::Result<u64> {
    match std::fs::metadata(dir.join(SPARE)) {
        Ok(m) if m.len() >= bytes => return Ok(0),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let tmp = dir.join(SPARE_TMP);
    let made = write_zeros(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, dir.join(SPARE)));
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| bytes)
}

fn write_zeros(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    // A static buffer: a heap one of a megabyte would, once freed, raise glibc's mmap
    // threshold and leave later large buffers in the heap for good (RSS).
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let zeros = &ZEROS;
    let mut written = 0;
    while written < bytes {
        let n = (bytes - written).min(zeros.len() as u64);
        file.write_all(&zeros[..n as usize])?;
        written += n;
    }
    file.sync_all()
}

/// At open: deletes a half-made spare, and the spare too, so that whatever becomes a
/// segment was made by the running process.
pub(crate) fn remove_spares(dir: &Path) -> std::io::Result<()> {
    for name in [SPARE, SPARE_TMP] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

/// The segments in `dir`, oldest first, with their sizes. Other files are left alone.
pub(crate) fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .filter(|n| n.len() == 16)
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        found.push((seq, entry.path(), entry.metadata()?.len()));
    }
    found.sort();
    Ok(found)
}

/// What a segment held.
#[derive(Debug)]
pub(crate) struct SegmentContents {
    pub groups: Vec<WalGroup>,
    /// Bytes of a torn last record dropped from the end, if any.
    pub torn_bytes: u64,
}

/// Reads every record of a segment, up to the end of the file or, in the last segment, to
/// zeros that fill the rest of it (a spare's). A bad record is a torn write, dropped (and counted), only when
/// `last` says no segment follows and no good record comes after it; anything else is
/// [`WalError::Damaged`].
pub(crate) fn read_segment(path: &Path, last: bool) -> Result<SegmentContents, WalError> {
    let bytes = std::fs::read(path)?;
    let mut groups = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        match record_at(&bytes[at..]) {
            Ok((group, len)) => {
                groups.push(group);
                at += len;
            }
            // The rest of the spare the last segment was made from. A full segment was cut
            // to its records before the next one was made ([`Segment::seal`]), so zeros in
            // one are damage.
            Err(_) if last && bytes[at..].iter().all(|b| *b == 0) => break,
            Err(Bad { why, end }) => {
                // A good header says where the next append would start; without one, any
                // good record further on shows the log went on after this one.
                let later = match end {
                    Some(end) => record_at(&bytes[(at + end).min(bytes.len())..]).is_ok(),
                    None => (at + 1..bytes.len()).any(|p| record_at(&bytes[p..]).is_ok()),
                };
                if !last || later {
                    return Err(WalError::Damaged {
                        path: path.to_owned(),
                        offset: at as u64,
                        why,
                    });
                }
                return Ok(SegmentContents {
                    groups,
                    torn_bytes: (bytes.len() - at) as u64,
                });
            }
        }
    }
    Ok(SegmentContents {
        groups,
        torn_bytes: 0,
    })
}

/// Why there is no good record at some offset; `end`: where it ends, if its header is good.
struct Bad {
    why: &'static str,
    end: Option<usize>,
}

/// The record at the start of `bytes` and its length, or why there is none.
fn record_at(bytes: &[u8]) -> Result<(WalGroup, usize), Bad> {
    let bad = |why, end| Bad { why, end };
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .and_then(|w| w.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let (Some(len), Some(crc), Some(header_crc)) = (word(0), word(4), word(8)) else {
        return Err(bad("short header", None));
    };
    if crc32fast::hash(&bytes[..8]) != header_crc {
        return Err(bad("header checksum", None));
    }
    let end = HEADER.saturating_add(len as usize);
    let payload = match bytes.get(HEADER..end) {
        Some(p) if !p.is_empty() => p,
        Some(_) => return Err(bad("empty record", Some(end))),
        None => return Err(bad("record runs past the end of the file", Some(end))),
    };
    if crc32fast::hash(payload) != crc {
        return Err(bad("payload checksum", Some(end)));
    }
    let group = WalGroup::decode(payload).map_err(|_| bad("undecodable payload", Some(end)))?;
    Ok((group, end))
}

/// Deletes segments up to and including `through`, oldest first, syncing `dir` after each:
/// a crash then leaves a run of the newest segments, never an old one without the ones
/// after it (replaying that alone would roll sled back). Returns the bytes freed.
pub(crate) fn remove_through(dir: &Path, through: u64) -> std::io::Result<u64> {
    let mut freed = 0;
    for (seq, path, len) in segments(dir)? {
        if seq <= through {
            std::fs::remove_file(path)?;
            File::open(dir)?.sync_all()?;
            freed += len;
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u8) -> WalGroup {
        WalGroup {
            writes: vec![
                WalWrite {
                    key: vec![b'k', n],
                    value: Some(vec![n; 100 + n as usize]),
                    written_first: None,
                },
                WalWrite {
                    key: vec![b'x', n],
                    value: None,
                    written_first: None,
                },
            ],
        }
    }

    fn three_records(dir: &Path) -> (PathBuf, Vec<u64>) {
        let mut segment = Segment::create(dir, 7).unwrap();
        let ends: Vec<u64> = (1..=3)
            .map(|n| {
                segment.append(&group(n)).unwrap();
                segment.bytes()
            })
            .collect();
        assert!(ends[0] > 0);
        (segment_path(dir, 7), ends)
    }

    #[test]
    fn records_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), ends[2]);
        let read = read_segment(&path, true).unwrap();
        assert_eq!(read.groups, vec![group(1), group(2), group(3)]);
        assert_eq!(read.torn_bytes, 0);
        assert_eq!(segments(dir.path()).unwrap()[0].0, 7);
    }

    /// A crash can stop the last append at any byte: whatever the cut, the records before it
    /// come back whole and the torn one is dropped, never half applied.
    #[test]
    fn a_last_record_cut_at_any_byte_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let full = std::fs::read(&path).unwrap();
        for cut in ends[1] + 1..ends[2] {
            std::fs::write(&path, &full[..cut as usize]).unwrap();
            let read = read_segment(&path, true).unwrap();
            assert_eq!(read.groups, vec![group(1), group(2)], "cut at {cut}");
            assert_eq!(read.torn_bytes, cut - ends[1]);
            // The same cut in a segment that others follow is damage, not a torn write.
            assert!(matches!(
                read_segment(&path, false),
                Err(WalError::Damaged { .. })
            ));
        }
    }

    /// Sectors of the last record that never reached the disk read back as zeros: its
    /// tail, or its header with the payload after it on disk.
    #[test]
    fn a_last_record_with_lost_sectors_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let full = std::fs::read(&path).unwrap();
        for lost in [
            ends[2] as usize - 20..ends[2] as usize,
            ends[1] as usize..ends[1] as usize + HEADER,
        ] {
            let mut bytes = full.clone();
            bytes[lost.clone()].fill(0);
            std::fs::write(&path, &bytes).unwrap();
            let read = read_segment(&path, true).unwrap();
            assert_eq!(read.groups, vec![group(1), group(2)], "zeros at {lost:?}");
            assert_eq!(read.torn_bytes, ends[2] - ends[1]);
        }
        // Zeros past the last record of the last segment (a spare's) end it: nothing is
        // torn. In a segment that others follow they are lost writes: damage.
        let mut bytes = full;
        bytes.extend_from_slice(&[0; 64]);
        std::fs::write(&path, &bytes).unwrap();
        let read = read_segment(&path, true).unwrap();
        assert_eq!(read.groups, vec![group(1), group(2), group(3)]);
        assert_eq!(read.torn_bytes, 0);
        assert!(matches!(
            read_segment(&path, false),
            Err(WalError::Damaged { offset, .. }) if offset == ends[2]
        ));
    }

    /// A segment made from a spare: records are written over its zeros without growing the
    /// file until they pass its end, and read back whether or not segments follow.
    #[test]
    fn a_segment_made_from_a_spare_reads_back_up_to_its_zeros() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(prepare_spare(dir.path(), 16 << 10).unwrap(), 16 << 10);
        assert_eq!(prepare_spare(dir.path(), 8 << 10).unwrap(), 0, "big enough");
        let mut segment = Segment::create(dir.path(), 1).unwrap();
        assert!(
            !dir.path().join(SPARE).exists(),
            "the spare became the segment"
        );
        assert_eq!(segment.len(), 16 << 10);
        let mut groups = Vec::new();
        let mut grown = 0;
        for n in 0..100u8 {
            grown += segment.append(&group(n)).unwrap();
            groups.push(group(n));
        }
        // 100 records of about 200 bytes pass the spare's 16 KiB: the file grew by the rest.
        assert_eq!(grown, segment.bytes() - (16 << 10));
        assert_eq!(segment.len(), segment.bytes());
        let path = segment_path(dir.path(), 1);
        for last in [true, false] {
            let read = read_segment(&path, last).unwrap();
            assert_eq!(read.groups, groups);
            assert_eq!(read.torn_bytes, 0);
        }

        // A smaller spare is replaced by a bigger one; a segment's records stay inside it,
        // and closing the segment cuts the zeros after them.
        assert_eq!(prepare_spare(dir.path(), 16 << 10).unwrap(), 16 << 10);
        assert_eq!(prepare_spare(dir.path(), 32 << 10).unwrap(), 32 << 10);
        let mut segment = Segment::create(dir.path(), 2).unwrap();
        assert_eq!(segment.append(&group(1)).unwrap(), 0);
        assert_eq!(segment.append(&group(2)).unwrap(), 0);
        let path = segment_path(dir.path(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 32 << 10);
        let both = vec![group(1), group(2)];
        assert_eq!(read_segment(&path, true).unwrap().groups, both);
        let records = segment.bytes();
        assert_eq!(segment.seal().unwrap(), (32 << 10) - records);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), records);
        assert_eq!(read_segment(&path, false).unwrap().groups, both);
    }

    /// The last record in a spare, cut short by a crash: the part that reached the disk is
    /// followed by the spare's zeros. It is dropped as torn in the last segment, and is
    /// damage in one that others follow (a full segment is cut to its records first).
    #[test]
    fn a_record_torn_inside_a_spare_is_dropped_only_at_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        prepare_spare(dir.path(), 16 << 10).unwrap();
        let (path, ends) = three_records(dir.path());
        let full = std::fs::read(&path).unwrap();
        assert_eq!(full.len(), 16 << 10);
        for cut in ends[1] as usize + 1..ends[2] as usize {
            let mut bytes = full.clone();
            bytes[cut..ends[2] as usize].fill(0);
            std::fs::write(&path, &bytes).unwrap();
            let read = read_segment(&path, true).unwrap();
            assert_eq!(read.groups, vec![group(1), group(2)], "cut at {cut}");
            assert!(
                matches!(
                    read_segment(&path, false),
                    Err(WalError::Damaged { offset, .. }) if offset == ends[1]
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn spares_left_at_open_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        prepare_spare(dir.path(), 16 << 10).unwrap();
        std::fs::write(dir.path().join(SPARE_TMP), b"half made").unwrap();
        remove_spares(dir.path()).unwrap();
        assert!(!dir.path().join(SPARE).exists());
        assert!(!dir.path().join(SPARE_TMP).exists());
        remove_spares(dir.path()).unwrap();
        let segment = Segment::create(dir.path(), 1).unwrap();
        assert_eq!(segment.len(), 0, "an empty file without a spare");
    }

    /// A flipped byte in a record that others follow was acknowledged: the log refuses to
    /// open rather than silently drop it and everything after it.
    #[test]
    fn a_damaged_record_before_the_end_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = three_records(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[ends[0] as usize + HEADER + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_segment(&path, true).unwrap_err();
        assert!(
            matches!(err, WalError::Damaged { offset, .. } if offset == ends[0]),
            "{err}"
        );
        // A length flipped to run past the end: the header's checksum catches it, and the
        // good record after it shows it is not a torn write.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[ends[0] as usize + HEADER + 3] ^= 0x40;
        bytes[ends[0] as usize + 3] = 0x7f;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_segment(&path, true).unwrap_err();
        assert!(
            matches!(err, WalError::Damaged { offset, .. } if offset == ends[0]),
            "{err}"
        );
    }

    #[test]
    fn removing_segments_keeps_later_ones_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for seq in 1..=3 {
            Segment::create(dir.path(), seq)
                .unwrap()
                .append(&group(seq as u8))
                .unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"keep").unwrap();
        let freed = remove_through(dir.path(), 2).unwrap();
        assert!(freed > 0);
        let left: Vec<_> = segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(left, vec![3]);
        assert!(dir.path().join("notes.txt").exists());
        assert!(
            Segment::create(dir.path(), 3).is_err(),
            "never reuses a segment"
        );
    }
}
