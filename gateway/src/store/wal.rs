//! The store's write-ahead log: a commit is durable once its group's record is here and
//! `fdatasync`ed, one device round trip, and sled is brought to disk later, in bulk
//! (see `sled.rs`).
//!
//! A segment file `wal/<seq:016x>.wal` is a run of records:
//! ```text
//! len: u32 LE ‖ crc32(payload): u32 LE ‖ crc32(len ‖ crc32(payload)): u32 LE ‖ payload
//! ```
//! where the payload, `len` bytes (never 0), is a `WalGroup` in protobuf. A record holds a
//! group's writes as they reach sled: absolute values, so replaying a record twice, or over
//! a sled that already holds it, leaves the same state.
//!
//! A record is appended only after the one before it was synced, so a crash can tear only
//! the last record of the last segment: short, or with sectors that never reached the disk
//! (zeros, or old bytes). It was never acknowledged, and [`read_segment`] drops it. A bad
//! record followed by a good one cannot be a torn write: that is damage, and opening fails
//! rather than skip acknowledged records. The header's own checksum is what lets a damaged
//! length field be told from a torn record: the reader looks for a good record after it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use prost::Message;

/// One key's new value (`None`: removed).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WalWrite {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
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
    bytes: u64,
}

impl Segment {
    /// Creates segment `seq` in `dir`, and syncs `dir` so the file survives a power cut.
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(dir, seq))?;
        File::open(dir)?.sync_all()?;
        Ok(Self {
            file,
            seq,
            bytes: 0,
        })
    }

    /// Appends one record and syncs it; returns the bytes written.
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
        self.file.write_all(&record)?;
        self.file.sync_data()?;
        self.bytes += record.len() as u64;
        Ok(record.len() as u64)
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
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

/// Reads every record of a segment. A bad record is a torn write, dropped (and counted),
/// only when `last` says no segment follows and no good record comes after it; anything
/// else is [`WalError::Damaged`].
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
                },
                WalWrite {
                    key: vec![b'x', n],
                    value: None,
                },
            ],
        }
    }

    fn three_records(dir: &Path) -> (PathBuf, Vec<u64>) {
        let mut segment = Segment::create(dir, 7).unwrap();
        let ends = (1..=3)
            .scan(0, |end, n| {
                *end += segment.append(&group(n)).unwrap();
                Some(*end)
            })
            .collect();
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
        // Zeros past the last record (a file extended but never written): also dropped.
        let mut bytes = full;
        bytes.extend_from_slice(&[0; 64]);
        std::fs::write(&path, &bytes).unwrap();
        let read = read_segment(&path, true).unwrap();
        assert_eq!(read.groups, vec![group(1), group(2), group(3)]);
        assert_eq!(read.torn_bytes, 64);
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
