//! Files on a case (scans, photos) sent beside an envelope in encrypted chunks, with
//! resumable transfers and progress.
//!
//! Sending: [`OrgClient::send_files`] seals the files chunk by chunk into this organisation's
//! outbox spool (`<org>/outbox/<message id>/`: the sealed envelope, each file's ciphertext
//! chunks and hash list, the case-book entry), uploads what the gateway does not hold yet,
//! submits, and clears the spool. A send cut short (network, process killed) leaves the spool:
//! [`OrgClient::resume_sends`] picks it up and uploads only what is missing. The spool holds
//! ciphertext and ids only, never plaintext.
//!
//! Receiving: [`OrgClient::download`] fetches a message's chunks into
//! `<dir>/<message id>/<part>-<name>.part`, checking each against the hash list the signed
//! header commits to before decrypting it, and renames the file once complete. A download
//! cut short resumes from the last whole chunk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use accord_proto::attachment::{self, DEFAULT_CHUNK_SIZE};
use accord_proto::envelope::{Limits, SealedEnvelope, Sealer};
use accord_proto::ids::{EnvelopeHash, MessageId, OrgId};
use accord_proto::pb::{self, body::Form};
use futures::StreamExt;
use prost::Message;

use accord_gateway::service::{error_key, CHUNKS_MISSING, QUOTA_FULL};

use crate::casebook::{Direction, Entry};
use crate::org::{message_id_of, ClientError, Opened, OrgClient, SendOptions, Sent};

/// Attempts of one transfer before giving up (the first and four retries).
const ATTEMPTS: u32 = 5;

/// A file to attach: where it is, and its media type.
pub struct FileToSend<'a> {
    pub path: &'a Path,
    pub media_type: String,
    /// Where its ciphertext chunks go, in order.
    pub out: &'a mut dyn Write,
}

impl std::fmt::Debug for FileToSend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileToSend")
            .field("path", &self.path)
            .field("media_type", &self.media_type)
            .finish_non_exhaustive()
    }
}

/// How far a transfer is, for a progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub name: String,
    pub done: u64,
    pub total: u64,
}

/// Each attached file's chunk hash list (SHA-256 of each ciphertext chunk), in file order.
pub type HashLists = Vec<Vec<[u8; 32]>>;

/// A spooled send as read back.
struct Spooled {
    sealed: SealedEnvelope,
    lists: HashLists,
    entry: Option<Entry>,
}

/// Called as chunks go out or come in.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

fn file_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::File(format!("{}: {e}", path.display()))
}

/// A media type from a file name's extension, for files given without one.
pub fn media_type_of(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "tif" | "tiff" => "image/tiff",
        "txt" => "text/plain",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// Seals each file into `sealer` (chunk by chunk, to its `out`) and names it in the body,
/// which must be correspondence. Returns each file's chunk hash list.
pub(crate) fn seal_files(
    sealer: &mut Sealer,
    body: &mut pb::Body,
    files: &mut [FileToSend<'_>],
) -> Result<HashLists, ClientError> {
    if files.is_empty() {
        return Ok(vec![]);
    }
    let Some(Form::Correspondence(letter)) = body.form.as_mut() else {
        return Err(accord_proto::forms::FormError {
            path: "attachments".into(),
            problem: "files travel with correspondence only",
        }
        .into());
    };
    let mut lists = Vec::with_capacity(files.len());
    for f in files.iter_mut() {
        let mut input = File::open(f.path).map_err(|e| file_err(f.path, e))?;
        let mut chunks = sealer
            .attachment(DEFAULT_CHUNK_SIZE)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        let mut buf = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
        loop {
            let n = read_full(&mut input, &mut buf).map_err(|e| file_err(f.path, e))?;
            if n == 0 {
                break;
            }
            let ct = chunks.push(&buf[..n]).map_err(|e| file_err(f.path, e))?;
            f.out.write_all(&ct).map_err(|e| file_err(f.path, e))?;
            if n < buf.len() {
                break;
            }
        }
        let (sealed_file, hashes) = chunks.finish().map_err(|e| file_err(f.path, e))?;
        let name = f
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| file_err(f.path, "the file name is not UTF-8"))?;
        letter.attachments.push(pb::Attachment {
            name: name.to_owned(),
            media_type: f.media_type.clone(),
            content: vec![],
            part: sealed_file.index() + 1,
            size: sealed_file.digest().size,
        });
        sealer
            .add_attachment(sealed_file)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        lists.push(hashes);
    }
    accord_proto::forms::normalize(body);
    Ok(lists)
}

/// Reads until `buf` is full or the input ends; returns how much it read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// This organisation's sends that are sealed but not yet accepted (module docs).
#[derive(Clone, Debug)]
pub struct Outbox {
    dir: PathBuf,
}

/// One spooled send.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

impl Outbox {
    /// The spool directory of the organisation at `org_dir`, created owner-only.
    pub fn open(org_dir: &Path) -> Result<Self, ClientError> {
        let dir = org_dir.join("outbox");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| file_err(&dir, e))?;
        Ok(Self { dir })
    }

    fn spool(&self, id: &MessageId) -> Spool {
        Spool {
            dir: self.dir.join(id.to_string()),
        }
    }

    /// Sends sealed and spooled but not yet accepted, oldest first (ids are UUIDv7).
    pub fn pending(&self) -> Result<Vec<Spool>, ClientError> {
        let mut ids: Vec<MessageId> = fs::read_dir(&self.dir)
            .map_err(|e| file_err(&self.dir, e))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort();
        Ok(ids
            .iter()
            .map(|id| self.spool(id))
            .filter(|s| s.dir.join("envelope").exists())
            .collect())
    }
}

impl Spool {
    fn chunks_path(&self, a: usize) -> PathBuf {
        self.dir.join(format!("{a}.chunks"))
    }

    /// Writes the envelope, the hash lists and the case-book entry, durably: from here on the
    /// send can be resumed.
    fn save(
        &self,
        sealed: &SealedEnvelope,
        lists: &[Vec<[u8; 32]>],
        entry: Option<&Entry>,
    ) -> Result<(), ClientError> {
        for (a, list) in lists.iter().enumerate() {
            write_synced(&self.dir.join(format!("{a}.hashes")), &list.concat())?;
        }
        if let Some(entry) = entry {
            let json = serde_json::to_vec(entry).map_err(|e| file_err(&self.dir, e))?;
            write_synced(&self.dir.join("entry.json"), &json)?;
        }
        // Last: its presence marks a complete spool.
        write_synced(
            &self.dir.join("envelope"),
            &sealed.to_wire().encode_to_vec(),
        )
    }

    fn load(&self) -> Result<Spooled, ClientError> {
        let bytes = fs::read(self.dir.join("envelope")).map_err(|e| file_err(&self.dir, e))?;
        let wire = pb::Envelope::decode(bytes.as_slice()).map_err(|e| file_err(&self.dir, e))?;
        let sealed = SealedEnvelope::from_wire(wire, &Limits::default())
            .map_err(|e| file_err(&self.dir, e))?;
        let header =
            pb::Header::decode(sealed.header().as_bytes()).map_err(|e| file_err(&self.dir, e))?;
        let mut lists = Vec::new();
        for a in 0..header.attachments.len() {
            let path = self.dir.join(format!("{a}.hashes"));
            let raw = fs::read(&path).map_err(|e| file_err(&path, e))?;
            lists.push(
                raw.chunks_exact(32)
                    .map(|c| c.try_into().expect("32-byte chunks"))
                    .collect(),
            );
        }
        let entry = match fs::read(self.dir.join("entry.json")) {
            Ok(json) => Some(serde_json::from_slice(&json).map_err(|e| file_err(&self.dir, e))?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(file_err(&self.dir, e)),
        };
        Ok(Spooled {
            sealed,
            lists,
            entry,
        })
    }

    fn remove(&self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(spool = %self.dir.display(), error = %e, "spool not removed");
        }
    }
}

/// Owner-only, written whole or not at all, and durable with its folder entry
/// (`accord_certs::write_file`).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    accord_certs::write_file(path, bytes, true).map_err(|e| file_err(path, e))
}

/// Whether a failed call is worth repeating: the link or the gateway, not the request.
fn transient(e: &ClientError) -> bool {
    matches!(e, ClientError::Gateway(s) if match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Aborted => true,
        // A full queue empties; an envelope or message too large stays too large.
        tonic::Code::ResourceExhausted => error_key(s) == Some(QUOTA_FULL),
        _ => false,
    })
}

/// Runs `attempt` up to [`ATTEMPTS`] times while it fails transiently, backing off.
async fn with_retries<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = Duration::from_millis(250);
    for n in 1.. {
        match attempt().await {
            Err(e) if n < ATTEMPTS && transient(&e) => {
                tracing::warn!(%what, attempt = n, error = %e, "transfer interrupted; resuming");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// A file name safe to create in a directory and to print: no separators, no control or
/// invisible formatting characters (bidi overrides could disguise an extension), no leading
/// dot, at most 200 bytes (names on disk are limited to 255, and a part number and `.part`
/// are added).
pub fn safe_name(name: &str) -> String {
    /// Default-ignorable and line-breaking code points (Unicode's
    /// Default_Ignorable_Code_Point, with the separators), Khmer's invisible vowels included.
    fn invisible(c: char) -> bool {
        matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}'
            | '\u{17B4}' | '\u{17B5}' | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}')
    }
    let mut cleaned = String::new();
    for c in name.chars().filter(|c| !c.is_control() && !invisible(*c)) {
        let c = if matches!(c, '/' | '\\' | ':') {
            '_'
        } else {
            c
        };
        if cleaned.len() + c.len_utf8() > 200 {
            break;
        }
        cleaned.push(c);
    }
    let trimmed = cleaned.trim_start_matches('.');
    if trimmed.is_empty() {
        "attachment".into()
    } else {
        trimmed.into()
    }
}

impl OrgClient {
    /// Seals `body` (correspondence) with `files` attached, spools it, uploads the chunks,
    /// submits, and records it in the case book. `files`: paths and media types.
    pub async fn send_files(
        &mut self,
        recipient: &OrgId,
        body: &pb::Body,
        opts: &SendOptions,
        files: &[(PathBuf, String)],
        outbox: &Outbox,
        progress: ProgressFn,
    ) -> Result<Sent, ClientError> {
        // The message id is drawn while sealing; chunks go to a staging directory that is
        // renamed to the spool once the id is known.
        let staging = outbox.dir.join(format!(".sealing-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| file_err(&staging, e))?;
        let sealed = (|| {
            let mut outs = (0..files.len())
                .map(|a| {
                    let path = staging.join(format!("{a}.chunks"));
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map(io::BufWriter::new)
                        .map_err(|e| file_err(&path, e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut to_send: Vec<FileToSend<'_>> = files
                .iter()
                .zip(outs.iter_mut())
                .map(|((path, media_type), out)| FileToSend {
                    path,
                    media_type: media_type.clone(),
                    out,
                })
                .collect();
            let (sealed, lists) = self.seal_with_files(recipient, body, opts, &mut to_send)?;
            drop(to_send);
            for out in outs {
                out.into_inner()
                    .map_err(|e| file_err(&staging, e.error()))?
                    .sync_all()
                    .map_err(|e| file_err(&staging, e))?;
            }
            Ok::<_, ClientError>((sealed, lists))
        })();
        let (sealed, lists) = match sealed {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let id = message_id_of(&sealed)?;
        let spool = outbox.spool(&id);
        fs::rename(&staging, &spool.dir).map_err(|e| file_err(&spool.dir, e))?;
        // The book keeps ids and codes, which the attachment entries do not change.
        let entry = match self.case_book() {
            Some(_) => {
                let header = pb::Header::decode(sealed.header().as_bytes())
                    .map_err(|e| ClientError::Verify(e.to_string()))?;
                Some(Entry::new(&header, body, Direction::Sent)?)
            }
            None => None,
        };
        spool.save(&sealed, &lists, entry.as_ref())?;
        let names = files
            .iter()
            .map(|(p, _)| {
                p.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            })
            .collect();
        self.finish_spooled(&spool, names, progress).await
    }

    /// Uploads, submits and records every spooled send; each result on its own.
    pub async fn resume_sends(
        &mut self,
        outbox: &Outbox,
        progress: ProgressFn,
    ) -> Result<Vec<(MessageId, Result<Sent, ClientError>)>, ClientError> {
        let mut results = Vec::new();
        for spool in outbox.pending()? {
            let id = spool
                .dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| file_err(&spool.dir, "not a message id"))?;
            // The spool keeps no file names (the body is sealed): progress names by index.
            results.push((
                id,
                self.finish_spooled(&spool, vec![], progress.clone()).await,
            ));
        }
        Ok(results)
    }

    async fn finish_spooled(
        &mut self,
        spool: &Spool,
        names: Vec<String>,
        progress: ProgressFn,
    ) -> Result<Sent, ClientError> {
        let Spooled {
            sealed,
            lists,
            entry,
        } = spool.load()?;
        let session = self.clone();
        let submit = || {
            let mut me = session.clone();
            let sealed = sealed.clone();
            async move { me.submit(&sealed).await }
        };
        // Submitted first: a send resumed after its accepted answer was lost is done
        // without uploading again; FAILED_PRECONDITION says chunks are missing.
        let sent = match with_retries("submit", submit).await {
            Err(ClientError::Gateway(s)) if error_key(&s) == Some(CHUNKS_MISSING) => {
                self.upload(&sealed, spool, &lists, &names, progress)
                    .await?;
                with_retries("submit", submit).await?
            }
            other => other?,
        };
        if let (Some(book), Some(entry)) = (self.case_book(), entry) {
            book.record(entry)?;
        }
        spool.remove();
        Ok(sent)
    }

    /// Uploads every chunk the gateway does not hold yet, attachment by attachment, resuming
    /// after a broken connection from what the gateway reports it holds.
    async fn upload(
        &mut self,
        sealed: &SealedEnvelope,
        spool: &Spool,
        lists: &[Vec<[u8; 32]>],
        names: &[String],
        progress: ProgressFn,
    ) -> Result<(), ClientError> {
        let header = pb::Header::decode(sealed.header().as_bytes())
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        for (a, digest) in header.attachments.iter().enumerate() {
            let name = names
                .get(a)
                .cloned()
                .unwrap_or_else(|| format!("attachment {}", a + 1));
            with_retries("upload", || {
                self.clone().upload_once(
                    sealed.clone(),
                    spool.chunks_path(a),
                    a as u32,
                    digest.clone(),
                    lists[a].clone(),
                    name.clone(),
                    progress.clone(),
                )
            })
            .await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_once(
        mut self,
        sealed: SealedEnvelope,
        chunks_path: PathBuf,
        a: u32,
        digest: pb::AttachmentDigest,
        list: Vec<[u8; 32]>,
        name: String,
        progress: ProgressFn,
    ) -> Result<(), ClientError> {
        let hash = sealed.hash();
        let n = attachment::chunk_count(&digest) as u32;
        let answer = self
            .exchange()
            .get_chunk_state(pb::ChunkStateRequest {
                envelope_hash: hash.0.to_vec(),
                attachment: a,
            })
            .await
            .map(tonic::Response::into_inner);
        let missing = attachment::missing_chunks(answer, n)?;
        let done_before = digest.size - plain_bytes(&digest, &missing);
        progress(&Progress {
            name: name.clone(),
            done: done_before,
            total: digest.size,
        });
        if missing.is_empty() {
            return Ok(());
        }
        let start = pb::ChunkUpload {
            part: Some(pb::chunk_upload::Part::Start(pb::AttachmentStart {
                envelope: Some(sealed.to_wire()),
                attachment: a,
                chunk_hashes: list.iter().map(|h| h.to_vec()).collect(),
            })),
        };
        let mut file = File::open(&chunks_path).map_err(|e| file_err(&chunks_path, e))?;
        let stride = u64::from(digest.chunk_size) + attachment::TAG_LEN as u64;
        let mut done = done_before;
        let (total, shown) = (digest.size, name.clone());
        let chunks = futures::stream::iter(missing).filter_map(move |i| {
            let len = attachment::chunk_len(&digest, u64::from(i)).unwrap_or(0);
            let mut data = vec![0u8; len];
            let read = file
                .seek(SeekFrom::Start(u64::from(i) * stride))
                .and_then(|_| file.read_exact(&mut data));
            let item = match read {
                Ok(()) => {
                    done += (len - attachment::TAG_LEN) as u64;
                    progress(&Progress {
                        name: shown.clone(),
                        done,
                        total,
                    });
                    Some(pb::ChunkUpload {
                        part: Some(pb::chunk_upload::Part::Chunk(pb::Chunk { index: i, data })),
                    })
                }
                // The gateway then reports the chunk missing and the upload fails below.
                Err(e) => {
                    tracing::error!(chunk = i, error = %e, "spooled chunk unreadable");
                    None
                }
            };
            futures::future::ready(item)
        });
        let state = self
            .exchange()
            .put_chunks(futures::stream::once(async move { start }).chain(chunks))
            .await?
            .into_inner();
        if state.held.len() as u32 != n {
            return Err(ClientError::File(format!(
                "{}: the gateway holds {} of {n} chunks of attachment {} after the upload; the spool \
                 is damaged, send the file again",
                chunks_path.display(),
                state.held.len(),
                a + 1
            )));
        }
        Ok(())
    }

    /// Downloads, checks and decrypts every chunked attachment of an opened message into
    /// `dir/<message id>/`, resuming partial files. Returns the files written.
    pub async fn download(
        &mut self,
        opened: &Opened,
        dir: &Path,
        progress: ProgressFn,
    ) -> Result<Vec<PathBuf>, ClientError> {
        let Some(Form::Correspondence(letter)) = &opened.body.form else {
            return Ok(vec![]);
        };
        let target_dir = dir.join(opened.envelope.id().to_string());
        let mut written = Vec::new();
        for f in letter.attachments.iter().filter(|f| f.part != 0) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&target_dir)
                .map_err(|e| file_err(&target_dir, e))?;
            let a = f.part - 1;
            let target = target_dir.join(format!("{}-{}", f.part, safe_name(&f.name)));
            let digest = opened
                .envelope
                .attachments()
                .get(a as usize)
                .cloned()
                .ok_or_else(|| {
                    ClientError::Verify(format!("attachment {} not in the header", f.part))
                })?;
            with_retries("download", || {
                self.clone().download_once(
                    opened,
                    a,
                    digest.clone(),
                    target.clone(),
                    f.name.clone(),
                    progress.clone(),
                )
            })
            .await?;
            written.push(target);
        }
        Ok(written)
    }

    async fn download_once(
        mut self,
        opened: &Opened,
        a: u32,
        digest: pb::AttachmentDigest,
        target: PathBuf,
        name: String,
        progress: ProgressFn,
    ) -> Result<(), ClientError> {
        let hash: EnvelopeHash = opened.envelope.hash();
        let key = opened
            .chunk_key
            .as_ref()
            .ok_or_else(|| ClientError::Verify("no chunk key for this message".into()))?;
        let state = self
            .exchange()
            .get_chunk_state(pb::ChunkStateRequest {
                envelope_hash: hash.0.to_vec(),
                attachment: a,
            })
            .await?
            .into_inner();
        let list = attachment::check_hash_list(&digest, &state.chunk_hashes)
            .map_err(|e| ClientError::Verify(e.to_string()))?;
        // A file saved before (an ack lost after the save) is kept only if every chunk of
        // it checks out; otherwise it is fetched again.
        if target.exists() {
            let kept = verified_prefix(&target, &digest, &list, key, a)?;
            if kept == list.len() as u64 {
                return Ok(());
            }
            fs::remove_file(&target).map_err(|e| file_err(&target, e))?;
        }
        let part = target.with_extension(match target.extension().and_then(|e| e.to_str()) {
            Some(ext) => format!("{ext}.part"),
            None => "part".into(),
        });
        // Whole chunks a cut-off download wrote are kept once checked against the signed
        // hash list; from the first that does not check (torn, zeroed by a crash) on, the
        // file is cut and fetched again.
        let cs = u64::from(digest.chunk_size);
        let from = if part.exists() {
            verified_prefix(&part, &digest, &list, key, a)?
        } else {
            0
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&part)
            .map_err(|e| file_err(&part, e))?;
        // Cut to the chunks kept (never past the end: the last chunk is short).
        let kept = (from * cs).min(digest.size);
        file.set_len(kept).map_err(|e| file_err(&part, e))?;
        file.seek(SeekFrom::Start(kept))
            .map_err(|e| file_err(&part, e))?;
        let mut done = kept;
        progress(&Progress {
            name: name.clone(),
            done,
            total: digest.size,
        });
        let mut stream = self
            .exchange()
            .get_chunks(pb::GetChunksRequest {
                envelope_hash: hash.0.to_vec(),
                attachment: a,
                from: from as u32,
            })
            .await?
            .into_inner();
        let mut next = from;
        while let Some(chunk) = stream.message().await? {
            if u64::from(chunk.index) != next {
                return Err(ClientError::Verify(format!(
                    "the gateway sent chunk {} where {next} was due",
                    chunk.index
                )));
            }
            attachment::check_chunk(&digest, &list, next, &chunk.data)
                .map_err(|e| ClientError::Verify(e.to_string()))?;
            let plain = key
                .open(a, next, &chunk.data)
                .map_err(|e| ClientError::Verify(e.to_string()))?;
            file.write_all(&plain).map_err(|e| file_err(&part, e))?;
            done += plain.len() as u64;
            progress(&Progress {
                name: name.clone(),
                done,
                total: digest.size,
            });
            next += 1;
        }
        if next != list.len() as u64 {
            // Ended early without an error status: resume from here.
            return Err(ClientError::Gateway(tonic::Status::unavailable(format!(
                "download of attachment {} ended at chunk {next} of {}",
                a + 1,
                list.len()
            ))));
        }
        let len = file.metadata().map_err(|e| file_err(&part, e))?.len();
        if len != digest.size {
            return Err(ClientError::Verify(format!(
                "attachment {} came out at {len} bytes, not the {} its header says",
                a + 1,
                digest.size
            )));
        }
        file.sync_all().map_err(|e| file_err(&part, e))?;
        fs::rename(&part, &target).map_err(|e| file_err(&target, e))?;
        Ok(())
    }
}

/// How many whole chunks at the start of `path` are the plaintext of the chunks `list`
/// names: each is sealed again under the message's chunk key and its hash compared.
fn verified_prefix(
    path: &Path,
    digest: &pb::AttachmentDigest,
    list: &[[u8; 32]],
    key: &attachment::ChunkKey,
    a: u32,
) -> Result<u64, ClientError> {
    let mut file = File::open(path).map_err(|e| file_err(path, e))?;
    let mut buf = vec![0u8; digest.chunk_size as usize];
    for (i, expected) in list.iter().enumerate() {
        let want = attachment::chunk_len(digest, i as u64)
            .map_err(|e| ClientError::Verify(e.to_string()))?
            - attachment::TAG_LEN;
        let n = read_full(&mut file, &mut buf[..want]).map_err(|e| file_err(path, e))?;
        if n < want || !key.matches(a, i as u64, &buf[..want], expected) {
            return Ok(i as u64);
        }
    }
    // Every chunk is there; anything after them (padding, another file's tail) is not the
    // attachment, and the last chunk is fetched again to cut it off.
    let mut extra = [0u8; 1];
    if read_full(&mut file, &mut extra).map_err(|e| file_err(path, e))? != 0 {
        return Ok(list.len().saturating_sub(1) as u64);
    }
    Ok(list.len() as u64)
}

/// Plaintext bytes of the chunks `indexes` of an attachment.
fn plain_bytes(d: &pb::AttachmentDigest, indexes: &[u32]) -> u64 {
    indexes
        .iter()
        .map(|&i| {
            attachment::chunk_len(d, u64::from(i)).map_or(0, |l| (l - attachment::TAG_LEN) as u64)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_names_cannot_leave_their_directory() {
        assert_eq!(safe_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(safe_name(".hidden"), "hidden");
        assert_eq!(safe_name("a\nb\u{7}.pdf"), "ab.pdf");
        assert_eq!(safe_name(""), "attachment");
        assert_eq!(safe_name("C:\\x"), "C__x");
        assert_eq!(safe_name("hộ chiếu.jpg"), "hộ chiếu.jpg");
        assert_eq!(safe_name(&"x".repeat(300)).len(), 200);
        // Multibyte names are cut at a character boundary, within 200 bytes.
        let khmer = safe_name(&"ក".repeat(100));
        assert!(
            khmer.len() <= 200 && khmer.chars().all(|c| c == 'ក'),
            "{khmer}"
        );
        assert_eq!(safe_name("invoice\u{202E}fdp.exe"), "invoicefdp.exe");
        assert_eq!(safe_name("a\u{200B}b\u{2066}c"), "abc");
        assert_eq!(safe_name("ក\u{17B4}ខ\u{E0041}.pdf"), "កខ.pdf");
    }
}
