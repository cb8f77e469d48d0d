//! The cache's on-disk layout under its root, and the one way a model becomes visible.
//!
//! ```text
//! models/NAME            -> ../store/NAME/REVISION   (what vLLM opens)
//! store/NAME/REVISION/   complete, verified files + .modelcache/{ready,manifest}.json
//! staging/NAME/          FILE.partial files and journal.jsonl; never visible as a model
//! progress/NAME.json     live progress of a download, world-readable
//! leases/NAME/POD_UID    the revision a reading pod resolved (see [`leases`])
//! locks/NAME             flock'd by whoever changes the three above (see [`lock`])
//! ```
//!
//! This module owns paths, the ready marker and [`publish`]; it does not download or hash.
//! Publishing fsyncs every file and directory, moves the staged files into a fresh revision
//! directory, then swaps the `models/NAME` link with a rename, so a reader sees the old revision
//! or the new one, never a mix, and a crash at any step leaves no half-published model.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod leases;
pub mod lock;
pub mod take;

/// Subdirectory of a revision holding the cache's own records.
pub const RECORDS_DIR: &str = ".modelcache";
/// The ready marker inside [`RECORDS_DIR`].
pub const READY_FILE: &str = "ready.json";
/// The copy of the source manifest inside [`RECORDS_DIR`].
pub const MANIFEST_COPY: &str = "manifest.json";
/// The copy of the model's signature (an OpenSSF Model Signing bundle) inside [`RECORDS_DIR`].
pub const SIGNATURE_COPY: &str = "signature.sig";

/// A failure of a cache operation, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A model name that cannot be a directory name.
    #[error(
        "invalid model name {name:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    InvalidName {
        /// The name as given.
        name: String,
    },
    /// A filesystem operation failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done (`create`, `rename`, `fsync`, …).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A pod UID that cannot name a lease.
    #[error("invalid pod UID {uid:?}: expected the pod's metadata.uid (letters, digits and '-')")]
    InvalidPod {
        /// The UID as given (at most 80 characters of it).
        uid: String,
    },
    /// A staged file's length is not the verified size.
    #[error("the staged file {path} holds {actual} bytes where {expected} were verified")]
    StagedSize {
        /// The staged file.
        path: PathBuf,
        /// The verified size.
        expected: u64,
        /// Its length now.
        actual: u64,
    },
    /// A ready marker could not be read or written.
    #[error("the ready marker {path} is unreadable")]
    Marker {
        /// The marker file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }

    /// The OS error behind this failure, if any (to recognise ENOSPC).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A validated model name: safe as one directory name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName(String);

impl ModelName {
    /// Validates a name: 1 to 128 of `[A-Za-z0-9._-]`, not starting with `.`.
    pub fn new(name: &str) -> Result<Self, StoreError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(StoreError::InvalidName {
                name: name.to_string(),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Paths under a cache root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `models/NAME`: the stable link vLLM opens.
    pub fn model_link(&self, name: &ModelName) -> PathBuf {
        self.root.join("models").join(name.as_str())
    }

    /// `store/NAME/REVISION`.
    pub fn revision_dir(&self, name: &ModelName, revision: &str) -> PathBuf {
        self.root.join("store").join(name.as_str()).join(revision)
    }

    /// `staging/NAME`.
    pub fn staging_dir(&self, name: &ModelName) -> PathBuf {
        self.root.join("staging").join(name.as_str())
    }

    /// Where a file's bytes are written while it downloads.
    pub fn partial_path(&self, name: &ModelName, relative: &str) -> PathBuf {
        self.staging_dir(name)
            .join("files")
            .join(format!("{relative}.partial"))
    }

    /// Live progress of a download, for `wait --cache-root`: outside `staging/` (the writer's
    /// own), world-readable, so an init container running as any user can show it.
    pub fn progress_path(&self, name: &ModelName) -> PathBuf {
        self.root
            .join("progress")
            .join(format!("{}.json", name.as_str()))
    }

    /// Removes the progress record of `name` (its download ended or its files went); best
    /// effort, since a stale record only misleads a person watching.
    pub fn remove_progress(&self, name: &ModelName) {
        let _ = std::fs::remove_file(self.progress_path(name));
    }

    /// The resume journal of a model.
    pub fn journal_path(&self, name: &ModelName) -> PathBuf {
        self.staging_dir(name).join("journal.jsonl")
    }

    /// Creates `models/`, `store/` and `progress/` (readable by the pods that mount the cache),
    /// `staging/`, `locks/` and `leases/` (the writer's own: half-fetched bytes are nobody
    /// else's business), and sets those modes whatever the umask.
    pub fn ensure(&self) -> Result<(), StoreError> {
        for (dir, mode) in [
            ("models", PUBLISHED_DIR_MODE),
            ("store", PUBLISHED_DIR_MODE),
            ("progress", PUBLISHED_DIR_MODE),
            ("staging", PRIVATE_DIR_MODE),
            ("locks", PRIVATE_DIR_MODE),
            ("leases", PRIVATE_DIR_MODE),
        ] {
            let p = self.root.join(dir);
            std::fs::create_dir_all(&p).map_err(StoreError::io("create", &p))?;
            set_mode(&p, mode)?;
        }
        Ok(())
    }

    /// The directory (under `store/NAME/`) and marker of `revision` when a copy of it is
    /// published and intact: the linked one first (it may be a repaired `REVISION-N`), then
    /// `REVISION` itself.
    pub fn intact_revision(
        &self,
        name: &ModelName,
        revision: &str,
    ) -> Option<(String, ReadyMarker)> {
        self.linked_intact(name)
            .filter(|(_, marker)| marker.revision == revision)
            .or_else(|| {
                let dir = self.revision_dir(name, revision);
                let marker = ReadyMarker::read(&dir).ok()?;
                (marker.revision == revision && marker.files_present(&dir))
                    .then(|| (revision.to_string(), marker))
            })
    }

    /// The revision directory `models/NAME` links to and its marker, when its files are intact.
    pub fn linked_intact(&self, name: &ModelName) -> Option<(String, ReadyMarker)> {
        let revision = self.published_revision(name)?;
        let dir = self.revision_dir(name, &revision);
        let marker = ReadyMarker::read(&dir).ok()?;
        marker.files_present(&dir).then_some((revision, marker))
    }

    /// The revision `models/NAME` links to, if any.
    pub fn published_revision(&self, name: &ModelName) -> Option<String> {
        let target = std::fs::read_link(self.model_link(name)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }
}

/// How a published model was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verification {
    /// Every file's BLAKE3 matched the manifest, and the structure checked.
    Blake3,
    /// No manifest, but every range arrived with a transactional MD5 from the server that
    /// matched (no bit flipped in transit), and the structure checked.
    Md5,
    /// No manifest: sizes, ETags and safetensors/index structure were checked.
    Structural,
    /// Every byte matched the digests the publisher's signature lists (SHA-256, or BLAKE3 of
    /// shards), computed in order as the ranges landed, and the structure checked. (A BLAKE3
    /// signature of whole files is the manifest: `blake3`.)
    Signature,
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verification::Blake3 => "blake3",
            Verification::Md5 => "md5",
            Verification::Structural => "structural",
            Verification::Signature => "signature",
        })
    }
}

/// One file of a published model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyFile {
    /// Path relative to the revision directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3, when it was computed while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// Modification time at publish, nanoseconds since the epoch: a file rewritten since no
    /// longer matches, without re-hashing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<u64>,
    /// The source's ETag of the file, so a repair can journal the intact files it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// A file's modification time in nanoseconds since the epoch, as ready markers record it.
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> Option<u64> {
    let t = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    u64::try_from(t.as_nanos()).ok()
}

/// `.modelcache/ready.json`: what was published and how it was verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyMarker {
    /// The model name.
    pub name: String,
    /// The source, secrets redacted.
    pub source: String,
    /// The revision: the content's identity. Its directory is named after it, with a `-N`
    /// suffix when a repaired copy replaced a damaged one.
    pub revision: String,
    /// Every file, sorted by path.
    pub files: Vec<ReadyFile>,
    /// Sum of the files' sizes.
    pub bytes: u64,
    /// How the files were verified.
    pub verification: Verification,
    /// When, RFC 3339.
    pub verified_at: String,
    /// What the checks found odd but vLLM loads anyway (an index mapping a tensor its shard
    /// does not hold, a `total_size` computed another way).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Files a scrub found changed since publish: the revision is no longer intact and is
    /// being repaired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<String>,
    /// Who signed the revision (its signature is [`SIGNATURE_COPY`]); absent: unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::fetch::signed::SignatureRecord>,
}

impl ReadyMarker {
    /// A structurally checked marker of one file, for tests.
    #[cfg(test)]
    pub(crate) fn of_one_file(
        name: &str,
        source: &str,
        revision: &str,
        path: &str,
        size: u64,
    ) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
            revision: revision.into(),
            files: vec![ReadyFile {
                path: path.into(),
                size,
                blake3: None,
                mtime_ns: None,
                etag: None,
            }],
            bytes: size,
            verification: Verification::Structural,
            verified_at: "now".into(),
            warnings: Vec::new(),
            damaged: Vec::new(),
            signature: None,
        }
    }

    /// Reads the marker of a revision directory.
    pub fn read(revision_dir: &Path) -> Result<Self, StoreError> {
        let path = revision_dir.join(RECORDS_DIR).join(READY_FILE);
        let bytes = std::fs::read(&path).map_err(StoreError::io("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Marker { path, source })
    }

    /// Replaces the marker of a revision directory atomically (a new file renamed over it).
    pub fn write(&self, revision_dir: &Path) -> Result<(), StoreError> {
        let records = revision_dir.join(RECORDS_DIR);
        let path = records.join(READY_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|source| StoreError::Marker {
            path: path.clone(),
            source,
        })?;
        let tmp = records.join(format!(".{READY_FILE}.tmp-{}", std::process::id()));
        write_synced(&tmp, &json)?;
        std::fs::rename(&tmp, &path).map_err(StoreError::io("rename", &tmp))?;
        fsync_dir(&records)
    }

    /// Whether every file the marker lists exists in `revision_dir` with its recorded size and
    /// modification time: the cheap check that a published model is intact (no re-hash).
    pub fn files_present(&self, revision_dir: &Path) -> bool {
        self.damaged.is_empty()
            && self.files.iter().all(|f| {
                std::fs::metadata(revision_dir.join(&f.path))
                    .map(|m| {
                        m.is_file()
                            && m.len() == f.size
                            && (f.mtime_ns.is_none() || f.mtime_ns == mtime_ns(&m))
                    })
                    .unwrap_or(false)
            })
    }
}

/// A model staged and verified, ready to be published.
#[derive(Debug)]
pub struct StagedModel<'a> {
    /// The model.
    pub name: &'a ModelName,
    /// Its revision.
    pub revision: &'a str,
    /// The marker to write.
    pub marker: &'a ReadyMarker,
    /// The source manifest's bytes, kept beside the marker.
    pub manifest: Option<&'a [u8]>,
    /// The signature's bytes, kept beside the marker.
    pub signature: Option<&'a [u8]>,
}

/// Publishes a staged model: the only code that makes a model visible. Returns the name of the
/// revision directory it linked.
///
/// Steps, each for a reason: (1) fsync every staged file, so the data is durable before any
/// name points at it; (2) move each into a fresh temporary revision directory on the same
/// filesystem (a rename, never a copy) and write the records; (3) fsync every directory touched;
/// (4) rename the temporary directory to `store/NAME/REVISION`; (5) point a new link at it and
/// rename the link over `models/NAME`, then fsync `models/`. A crash before (5) leaves the previous
/// revision linked; staged files already moved are recovered by the next run (see
/// [`recover_publish_leftovers`]).
///
/// The same revision already on disk and intact is linked as it is. A damaged copy (a file
/// changed since it was published, or marked damaged by a scrub: the very reason it was fetched
/// again) is never linked again: the new copy goes to `REVISION-N`, the link swaps to it
/// atomically, and only then is the damaged copy removed (readers that opened its files keep
/// them; no reader ever finds the link dangling), unless a pod holds a lease on it
/// ([`leases`]): a leased revision is never removed from under its reader.
pub fn publish(layout: &Layout, staged: &StagedModel<'_>) -> Result<String, StoreError> {
    let name = staged.name;
    let model_store = layout.root().join("store").join(name.as_str());
    std::fs::create_dir_all(&model_store).map_err(StoreError::io("create", &model_store))?;
    set_mode(&model_store, PUBLISHED_DIR_MODE)?;

    if let Some((intact, _)) = layout.intact_revision(name, staged.revision) {
        link_revision(layout, name, &intact)?;
        return Ok(intact);
    }
    let mut dir_name = staged.revision.to_string();
    let mut n = 2;
    while model_store.join(&dir_name).exists() {
        dir_name = format!("{}-{n}", staged.revision);
        n += 1;
    }
    let final_dir = model_store.join(&dir_name);
    let damaged: Vec<PathBuf> = std::iter::once(staged.revision.to_string())
        .chain((2..n).map(|i| format!("{}-{i}", staged.revision)))
        .map(|d| model_store.join(d))
        .filter(|d| d.exists())
        .collect();

    let tmp = model_store.join(format!(".{}.tmp-{}", staged.revision, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(StoreError::io("remove", &tmp))?;
    }
    let mut dirs = vec![tmp.clone()];
    let mut marker = staged.marker.clone();
    for file in &mut marker.files {
        let from = layout.partial_path(name, &file.path);
        let to = tmp.join(&file.path);
        if file.size == 0 && !from.exists() {
            // A zero-byte file has no range to download, so nothing created its partial.
            if let Some(parent) = from.parent() {
                std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
            }
            File::create(&from).map_err(StoreError::io("create", &from))?;
        }
        let handle = File::open(&from).map_err(StoreError::io("open", &from))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            handle
                .set_permissions(std::fs::Permissions::from_mode(PUBLISHED_FILE_MODE))
                .map_err(StoreError::io("chmod", &from))?;
        }
        handle.sync_all().map_err(StoreError::io("fsync", &from))?;
        let meta = handle.metadata().map_err(StoreError::io("stat", &from))?;
        if meta.len() != file.size {
            // Every check before ran on these bytes; a length that differs now means the
            // staged file is not what was verified. Never publish it.
            return Err(StoreError::StagedSize {
                path: from,
                expected: file.size,
                actual: meta.len(),
            });
        }
        file.mtime_ns = mtime_ns(&meta);
        drop(handle);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
            // Every directory created on the way gets the published mode and an fsync.
            dirs.extend(
                parent
                    .ancestors()
                    .take_while(|d| d.starts_with(&tmp) && *d != tmp.as_path())
                    .map(Path::to_path_buf),
            );
        }
        std::fs::rename(&from, &to).map_err(StoreError::io("rename", &from))?;
    }
    let records = tmp.join(RECORDS_DIR);
    std::fs::create_dir_all(&records).map_err(StoreError::io("create", &records))?;
    dirs.push(records.clone());
    let marker_json = serde_json::to_vec_pretty(&marker).map_err(|source| StoreError::Marker {
        path: records.join(READY_FILE),
        source,
    })?;
    write_synced(&records.join(READY_FILE), &marker_json)?;
    if let Some(manifest) = staged.manifest {
        write_synced(&records.join(MANIFEST_COPY), manifest)?;
    }
    if let Some(signature) = staged.signature {
        write_synced(&records.join(SIGNATURE_COPY), signature)?;
    }
    dirs.sort();
    dirs.dedup();
    for dir in dirs.iter().rev() {
        set_mode(dir, PUBLISHED_DIR_MODE)?;
        fsync_dir(dir)?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(StoreError::io("rename", &tmp))?;
    fsync_dir(&model_store)?;
    link_revision(layout, name, &dir_name)?;
    for dir in damaged {
        let revision = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !leases::readers_of(layout, name, &revision).is_empty() {
            // A pod reads it: it stays, unlinked, until that pod is gone (the agent removes
            // unlinked revisions no lease holds).
            continue;
        }
        let aside = model_store.join(format!(
            ".{}.damaged-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(&dir, &aside).map_err(StoreError::io("rename", &dir))?;
        fsync_dir(&model_store)?;
        std::fs::remove_dir_all(&aside).map_err(StoreError::io("remove", &aside))?;
    }
    Ok(dir_name)
}

/// Points `models/NAME` at `store/NAME/REVISION` with an atomic rename of a fresh link.
pub fn link_revision(layout: &Layout, name: &ModelName, revision: &str) -> Result<(), StoreError> {
    let models = layout.root().join("models");
    std::fs::create_dir_all(&models).map_err(StoreError::io("create", &models))?;
    let link = layout.model_link(name);
    let target = Path::new("..")
        .join("store")
        .join(name.as_str())
        .join(revision);
    if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
        return Ok(());
    }
    let tmp = models.join(format!(".{}.link-{}", name.as_str(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(StoreError::io("create link", &tmp))?;
    std::fs::rename(&tmp, &link).map_err(StoreError::io("rename", &tmp))?;
    fsync_dir(&models)
}

/// The mode of every published file: readable by the pods that mount the cache, writable by
/// none of them, executable by nobody (whatever the source's modes or the agent's umask).
pub const PUBLISHED_FILE_MODE: u32 = 0o644;
/// The mode of every published directory (and `models/`, `store/`).
pub const PUBLISHED_DIR_MODE: u32 = 0o755;
/// The mode of `staging/` and `locks/`.
const PRIVATE_DIR_MODE: u32 = 0o700;

/// Sets `path`'s permission bits to `mode` when they differ.
fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    let current = std::fs::metadata(path).map_err(StoreError::io("stat", path))?;
    if current.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(StoreError::io("chmod", path))?;
    }
    Ok(())
}

/// Writes a small file with the published mode and fsyncs it, checking the close.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt as _;
    let mut f = File::create(path).map_err(StoreError::io("create", path))?;
    f.set_permissions(std::fs::Permissions::from_mode(PUBLISHED_FILE_MODE))
        .map_err(StoreError::io("chmod", path))?;
    f.write_all(bytes).map_err(StoreError::io("write", path))?;
    f.sync_all().map_err(StoreError::io("fsync", path))
}

/// Replaces a small world-readable file (mode 0644 whatever the umask) with a rename, no
/// fsync: for records that only inform, such as progress.
pub fn replace_readable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(PUBLISHED_FILE_MODE))?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// fsyncs a directory so renames and creations in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync", dir))
}

/// Recovers what interrupted publishes of `name` left in `store/NAME/`: the verified files of a
/// `.REVISION.tmp-PID` directory (a revision being assembled when its process died) go back to
/// their staging partials, so the resume finds them journaled and fetches nothing again; then
/// that directory and any `.REVISION.damaged-PID` or `.REVISION.removing-PID` (a copy being
/// removed) are removed.
/// Returns what was removed.
///
/// The caller must hold the model's [`lock`]: every publisher of `name` holds it, so under it
/// any such directory is abandoned, whichever process made it.
pub fn recover_publish_leftovers(
    layout: &Layout,
    held: &lock::ModelLock,
) -> Result<Vec<PathBuf>, StoreError> {
    let name = held.name();
    let model_store = layout.root().join("store").join(name.as_str());
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(&model_store) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(hidden) = file_name.strip_prefix('.') else {
            continue;
        };
        let path = entry.path();
        if hidden.rsplit_once(".tmp-").is_some() {
            move_back_to_staging(layout, name, &path, &path)?;
        } else if hidden.rsplit_once(".damaged-").is_none()
            && hidden.rsplit_once(".removing-").is_none()
        {
            continue;
        }
        std::fs::remove_dir_all(&path).map_err(StoreError::io("remove", &path))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        fsync_dir(&model_store)?;
    }
    Ok(removed)
}

/// Moves every file under `dir` (a temporary revision rooted at `root`) back to its partial in
/// `staging/NAME`, unless a partial of that name exists already (a newer download owns it).
fn move_back_to_staging(
    layout: &Layout,
    name: &ModelName,
    root: &Path,
    dir: &Path,
) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(StoreError::io("read", dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if path != root.join(RECORDS_DIR) {
                move_back_to_staging(layout, name, root, &path)?;
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let Some(relative) = path
            .strip_prefix(root)
            .ok()
            .and_then(|r| r.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let partial = layout.partial_path(name, &relative);
        if partial.exists() {
            continue;
        }
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
        }
        std::fs::rename(&path, &partial).map_err(StoreError::io("rename", &path))?;
    }
    Ok(())
}

/// Reads every file under `dir` once, sequentially per file, two files at a time, so its pages
/// are in the page cache. Under cgroup v2 those pages are charged to the cgroup of the process
/// that reads them and reclaimed at its memory limit: call it from the pod that will read the
/// model (`modelcache wait --warm` in its init container), not from a small-limit agent.
pub fn read_into_page_cache(dir: &Path) -> std::io::Result<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                files(&e.path(), out)?;
            } else {
                out.push(e.path());
            }
        }
        Ok(())
    }
    let mut list = Vec::new();
    files(dir, &mut list)?;
    let next = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    let mut buf = vec![0u8; 4 << 20];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = usize::try_from(i).ok().and_then(|i| list.get(i)) else {
                            return Ok(());
                        };
                        let mut f = std::fs::File::open(path)?;
                        loop {
                            let n = std::io::Read::read(&mut f, &mut buf)?;
                            if n == 0 {
                                break;
                            }
                            total.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| std::io::Error::other("a warming thread panicked"))??;
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(total.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_single_safe_segments() {
        for good in ["gpt-oss-120b", "Llama_3.1-8B"] {
            ModelName::new(good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "x y", &"a".repeat(129)] {
            let err = ModelName::new(bad).unwrap_err();
            assert!(err.to_string().contains("invalid model name"), "{err}");
        }
    }

    #[test]
    fn publish_moves_staged_files_and_swaps_the_link() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        layout.ensure().unwrap();
        let name = ModelName::new("m").unwrap();
        for rev in ["r1", "r2"] {
            let partial = layout.partial_path(&name, "sub/a.bin");
            std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
            std::fs::write(&partial, rev).unwrap();
            let marker = ReadyMarker::of_one_file("m", "file:///x", rev, "sub/a.bin", 2);
            let staged = StagedModel {
                name: &name,
                revision: rev,
                marker: &marker,
                manifest: None,
                signature: None,
            };
            assert_eq!(publish(&layout, &staged).unwrap(), rev);
            assert_eq!(
                std::fs::read_to_string(layout.model_link(&name).join("sub/a.bin")).unwrap(),
                rev
            );
            assert_eq!(layout.published_revision(&name).as_deref(), Some(rev));
            let dir = layout.revision_dir(&name, rev);
            let read = ReadyMarker::read(&dir).unwrap();
            assert_eq!(read.files[0].size, marker.files[0].size);
            assert!(read.files[0].mtime_ns.is_some());
            assert!(read.files_present(&dir));
        }
        // The old revision stays intact for readers that opened it.
        let r1 = layout.revision_dir(&name, "r1");
        assert!(r1.join("sub/a.bin").exists());
        // A file rewritten after publish (same size) fails the cheap check.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(r1.join("sub/a.bin"), "xx").unwrap();
        assert!(!ReadyMarker::read(&r1).unwrap().files_present(&r1));
        // The link is relative, so it resolves the same inside a container's mount.
        let target = std::fs::read_link(layout.model_link(&name)).unwrap();
        assert!(target.is_relative());

        // The linked revision marked damaged (a scrub found a changed file): the repaired copy
        // goes to a new directory, the link swaps to it, and the damaged one is removed.
        let r2 = layout.revision_dir(&name, "r2");
        let mut damaged = ReadyMarker::read(&r2).unwrap();
        damaged.damaged = vec!["sub/a.bin".into()];
        damaged.write(&r2).unwrap();
        assert!(layout.intact_revision(&name, "r2").is_none());
        let partial = layout.partial_path(&name, "sub/a.bin");
        std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
        std::fs::write(&partial, "r2").unwrap();
        let mut marker = damaged.clone();
        marker.damaged.clear();
        let staged = StagedModel {
            name: &name,
            revision: "r2",
            marker: &marker,
            manifest: None,
            signature: None,
        };
        assert_eq!(publish(&layout, &staged).unwrap(), "r2-2");
        assert_eq!(layout.published_revision(&name).as_deref(), Some("r2-2"));
        assert!(!r2.exists());
        assert_eq!(
            layout
                .intact_revision(&name, "r2")
                .map(|(dir, _)| dir)
                .as_deref(),
            Some("r2-2")
        );
    }
}
