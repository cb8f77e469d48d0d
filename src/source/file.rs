//! A local or mounted directory as a source (`file:///PATH`): a PVC, an Azure Files share or a
//! blobfuse mount. Symbolic links are followed, so a Hugging Face snapshot folder works as is.
//!
//! The ETag of a local file is its size and modification time: a file rewritten in place between
//! listing and reading is reported as [`SourceError::Changed`], like a replaced blob.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{ByteStream, RemoteFile, RetryCause, Source, SourceError};

/// Bytes read per blocking read call.
const READ_SIZE: u64 = 1 << 20;

/// A directory tree read with positional reads.
#[derive(Debug)]
pub struct FileSource {
    root: PathBuf,
}

impl FileSource {
    /// A source rooted at `root` (the part after `file://`).
    pub fn new(root: &str) -> Result<Self, SourceError> {
        if !root.starts_with('/') {
            return Err(SourceError::InvalidUrl {
                url: format!("file://{root}"),
                reason: "file:// URLs need an absolute path, e.g. file:///models/gpt-oss-120b"
                    .into(),
            });
        }
        Ok(Self {
            root: PathBuf::from(root),
        })
    }

    fn io_error(&self, path: &str, e: std::io::Error) -> SourceError {
        match e.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound {
                path: self.root.join(path).display().to_string(),
            },
            std::io::ErrorKind::PermissionDenied => SourceError::PermissionDenied {
                path: self.root.join(path).display().to_string(),
                source: Box::new(e),
            },
            // A mounted network filesystem fails transiently with these.
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                SourceError::transient(path, RetryCause::Timeout, e)
            }
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

fn walk(root: &Path, dir: &Path, out: &mut Vec<RemoteFile>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        // Follow links: Hugging Face snapshots are links into a blob store.
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(RemoteFile {
                path: name,
                size: meta.len(),
                etag: local_etag(&meta),
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Source for FileSource {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn list(&self) -> Result<Vec<RemoteFile>, SourceError> {
        let root = self.root.clone();
        let listed = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &root, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| SourceError::Other {
            path: self.root.display().to_string(),
            source: Box::new(e),
        })?;
        let mut files = listed.map_err(|e| self.io_error("", e))?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    async fn read_range(
        &self,
        file: &RemoteFile,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        let full = self.root.join(&file.path);
        let name = file.path.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let f = File::open(&full)?;
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
        match tokio::fs::read(self.root.join(path)).await {
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
