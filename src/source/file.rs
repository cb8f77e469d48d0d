//! A local or mounted directory as a source (`file:///PATH`): a PVC, an Azure Files share or a
//! blobfuse mount. Symbolic links are followed, so a Hugging Face snapshot folder works as is.
//!
//! The ETag of a local file is its size and modification time: a file rewritten in place between
//! listing and reading is reported as [`SourceError::Changed`], like a replaced blob.
//!
//! A directory is listed once: a link back to one already listed (a loop, or two links to one
//! directory) is refused rather than walked again, so two `-> .` links cannot make the walk
//! exponential. A source confined to a directory (one a request named under an allowed prefix)
//! may not reach outside it through a link: the listing refuses such a link by name, and every
//! open resolves beneath the directory in the kernel (`openat2` with `RESOLVE_BENEATH`), so a
//! link swapped in after the listing is refused too.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    ByteStream, MAX_LISTED_FILES, MAX_SMALL_FILE, RemoteFile, RetryCause, Source, SourceError,
};

/// Bytes read per blocking read call.
const READ_SIZE: u64 = 1 << 20;

/// A directory tree read with positional reads.
#[derive(Debug)]
pub struct FileSource {
    root: PathBuf,
    confine: Option<Arc<Confined>>,
}

/// The directory a confined source must stay beneath.
#[derive(Debug)]
struct Confined {
    /// The directory, canonical.
    dir: PathBuf,
    /// A handle on it that every open resolves beneath.
    handle: OwnedFd,
    /// The source's root relative to `dir`.
    root: PathBuf,
}

impl Confined {
    /// Opens `relative` (to the source root) for reading, resolving beneath the directory.
    fn open(&self, relative: &str) -> std::io::Result<File> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
        let path = self.root.join(relative);
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(&self.handle, path.as_path(), how) {
            Ok(fd) => Ok(File::from(fd)),
            // Kernels before 5.6: the same rule, checked before the open.
            Err(nix::errno::Errno::ENOSYS) => {
                let full = self.dir.join(&path).canonicalize()?;
                if !full.starts_with(&self.dir) {
                    return Err(std::io::Error::from_raw_os_error(libc_exdev()));
                }
                File::open(full)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `EXDEV`: what `openat2` answers for a path that leaves the directory.
fn libc_exdev() -> i32 {
    nix::errno::Errno::EXDEV as i32
}

impl FileSource {
    /// A source rooted at `root` (the part after `file://`); with `confine`, every file must
    /// lie beneath that directory once links are resolved.
    pub fn new(root: &str, confine: Option<&Path>) -> Result<Self, SourceError> {
        if !root.starts_with('/') {
            return Err(SourceError::InvalidUrl {
                url: format!("file://{root}"),
                reason: "file:// URLs need an absolute path, e.g. file:///models/gpt-oss-120b"
                    .into(),
            });
        }
        let mut source = Self {
            root: PathBuf::from(root),
            confine: None,
        };
        if let Some(dir) = confine {
            let dir = dir.canonicalize().map_err(|e| source.io_error("", e))?;
            let handle = nix::fcntl::open(
                &dir,
                nix::fcntl::OFlag::O_PATH
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| source.io_error("", e.into()))?;
            let real_root = source
                .root
                .canonicalize()
                .map_err(|e| source.io_error("", e))?;
            let Ok(relative) = real_root.strip_prefix(&dir).map(Path::to_path_buf) else {
                return Err(SourceError::Outside {
                    path: root.to_string(),
                    target: real_root.display().to_string().into(),
                    allowed: dir.display().to_string().into(),
                });
            };
            source.confine = Some(Arc::new(Confined {
                dir,
                handle,
                root: relative,
            }));
        }
        Ok(source)
    }

    fn io_error(&self, path: &str, e: std::io::Error) -> SourceError {
        match e.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound {
                path: self.root.join(path).display().to_string(),
            },
            std::io::ErrorKind::PermissionDenied => SourceError::Unreadable {
                path: self.root.join(path).display().to_string(),
                source: Box::new(e),
            },
            // A mounted network filesystem fails transiently with these.
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                SourceError::transient(path, RetryCause::Timeout, e)
            }
            _ if e.raw_os_error() == Some(libc_exdev()) => SourceError::Outside {
                path: path.to_string(),
                target: "a path outside it".into(),
                allowed: self
                    .confine
                    .as_ref()
                    .map_or_else(String::new, |c| c.dir.display().to_string())
                    .into(),
            },
            _ => SourceError::Other {
                path: self.root.join(path).display().to_string(),
                source: Box::new(e),
            },
        }
    }
}

fn local_etag(meta: &std::fs::Metadata) -> String {
    format!(
        "{:x}-{:x}.{:x}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

/// Why a walk stopped.
enum WalkError {
    Io(String, std::io::Error),
    Refused(SourceError),
}

/// Lists the files under `root`, following links (Hugging Face snapshots are links into a blob
/// store), each directory once, and none outside `confine`.
struct Walk<'a> {
    root: &'a Path,
    confine: Option<&'a Path>,
    /// Directories listed so far, by (device, inode), with the name they were listed under.
    seen: HashMap<(u64, u64), String>,
    out: Vec<RemoteFile>,
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path, name: &str) -> Result<(), WalkError> {
        let io = |e| WalkError::Io(name.to_string(), e);
        let entries = std::fs::read_dir(dir).map_err(io)?;
        for entry in entries {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let rel = path.strip_prefix(self.root).unwrap_or(&path);
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let io = |e| WalkError::Io(rel.clone(), e);
            let is_link = entry.file_type().map_err(io)?.is_symlink();
            if let (true, Some(allowed)) = (is_link, self.confine) {
                let target = path.canonicalize().map_err(io)?;
                if !target.starts_with(allowed) {
                    return Err(WalkError::Refused(SourceError::Outside {
                        path: rel,
                        target: target.display().to_string().into(),
                        allowed: allowed.display().to_string().into(),
                    }));
                }
            }
            let meta = std::fs::metadata(&path).map_err(io)?;
            if meta.is_dir() {
                if let Some(first) = self.seen.insert((meta.dev(), meta.ino()), rel.clone()) {
                    return Err(WalkError::Refused(SourceError::LinkLoop {
                        path: rel,
                        first,
                    }));
                }
                self.dir(&path, &rel)?;
            } else if meta.is_file() {
                if self.out.len() >= MAX_LISTED_FILES {
                    return Err(WalkError::Refused(SourceError::TooManyFiles {
                        limit: MAX_LISTED_FILES,
                    }));
                }
                self.out.push(RemoteFile {
                    path: rel,
                    size: meta.len(),
                    etag: local_etag(&meta),
                });
            }
        }
        Ok(())
    }
}

fn walk(root: &Path, confine: Option<&Path>) -> Result<Vec<RemoteFile>, WalkError> {
    let meta = std::fs::metadata(root).map_err(|e| WalkError::Io(String::new(), e))?;
    let mut walk = Walk {
        root,
        confine,
        seen: HashMap::from([((meta.dev(), meta.ino()), ".".to_string())]),
        out: Vec::new(),
    };
    walk.dir(root, "")?;
    Ok(walk.out)
}

#[async_trait]
impl Source for FileSource {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn list(&self) -> Result<Vec<RemoteFile>, SourceError> {
        let root = self.root.clone();
        let confine = self.confine.as_ref().map(|c| c.dir.clone());
        let listed = tokio::task::spawn_blocking(move || walk(&root, confine.as_deref()))
            .await
            .map_err(|e| SourceError::Other {
                path: self.root.display().to_string(),
                source: Box::new(e),
            })?;
        let mut files = match listed {
            Ok(files) => files,
            Err(WalkError::Io(path, e)) => return Err(self.io_error(&path, e)),
            Err(WalkError::Refused(e)) => return Err(e),
        };
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    async fn read_range(
        &self,
        file: &RemoteFile,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        let name = file.path.clone();
        let confine = self.confine.clone();
        let root = self.root.clone();
        let opening = name.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let f = match &confine {
                Some(c) => c.open(&opening)?,
                None => File::open(root.join(&opening))?,
            };
            let meta = f.metadata()?;
            Ok::<_, std::io::Error>((f, local_etag(&meta)))
        })
        .await
        .map_err(|e| SourceError::Other {
            path: name.clone(),
            source: Box::new(e),
        })?;
        let (handle, etag) = opened.map_err(|e| self.io_error(&file.path, e))?;
        if etag != file.etag {
            return Err(SourceError::Changed { path: name });
        }
        // Each range owns its handle, positioned once: `read_to_end` into fresh capacity then
        // fills the buffer without zeroing it first.
        let stream = futures::stream::unfold(
            (Some(handle), range.start, false),
            move |(handle, pos, seeked)| {
                let name = name.clone();
                let end = range.end;
                async move {
                    let mut handle = handle?;
                    if pos >= end {
                        return None;
                    }
                    let want = (end - pos).min(READ_SIZE);
                    let read = tokio::task::spawn_blocking(move || {
                        if !seeked {
                            handle.seek(SeekFrom::Start(pos))?;
                        }
                        let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
                        (&mut handle).take(want).read_to_end(&mut buf)?;
                        Ok::<_, std::io::Error>((handle, buf))
                    })
                    .await;
                    match read {
                        Ok(Ok((_, buf))) if buf.is_empty() => Some((
                            Err(SourceError::transient(
                                &name,
                                RetryCause::ShortBody,
                                "the file is shorter than listed",
                            )),
                            (None, end, true),
                        )),
                        Ok(Ok((handle, buf))) => {
                            let next = pos + buf.len() as u64;
                            Some((Ok(Bytes::from(buf)), (Some(handle), next, true)))
                        }
                        Ok(Err(e)) => Some((
                            Err(SourceError::transient(&name, RetryCause::Connection, e)),
                            (None, end, true),
                        )),
                        Err(e) => Some((
                            Err(SourceError::Other {
                                path: name.clone(),
                                source: Box::new(e),
                            }),
                            (None, end, true),
                        )),
                    }
                }
            },
        );
        Ok(stream.boxed())
    }

    async fn read_small(&self, path: &str) -> Result<Option<Bytes>, SourceError> {
        let (confine, root, name) = (self.confine.clone(), self.root.clone(), path.to_string());
        let read = tokio::task::spawn_blocking(move || {
            let f = match &confine {
                Some(c) => c.open(&name)?,
                None => File::open(root.join(&name))?,
            };
            // Bounded whatever the file's size says (it may grow while being read).
            let mut data = Vec::new();
            f.take(MAX_SMALL_FILE + 1).read_to_end(&mut data)?;
            Ok::<_, std::io::Error>(data)
        })
        .await
        .map_err(|e| SourceError::Other {
            path: path.to_string(),
            source: Box::new(e),
        })?;
        match read {
            Ok(data) if data.len() as u64 > MAX_SMALL_FILE => Err(SourceError::TooLarge {
                path: path.to_string(),
                size: data.len() as u64,
                limit: MAX_SMALL_FILE,
            }),
            Ok(data) => Ok(Some(Bytes::from(data))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_error(path, e)),
        }
    }

    async fn put_small(&self, path: &str, data: Bytes) -> Result<(), SourceError> {
        let target = self.root.join(path);
        let tmp = self
            .root
            .join(format!(".{path}.tmp-{}", std::process::id()));
        let result = async {
            tokio::fs::write(&tmp, &data).await?;
            tokio::fs::rename(&tmp, &target).await
        }
        .await;
        result.map_err(|e| self.io_error(path, e))
    }
}
