//! The resume phase: which ranges earlier runs already made durable, so they are never read
//! again, and how many bytes are still to be written.

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use super::PrefetchError;
use super::journal::{Journal, JournalLine, index_lines};
use super::pieces::{FileSlot, Sink};
use super::plan::Plan;
use crate::config::FetchOptions;
use crate::store::{Layout, ModelName};

/// The files of a plan with what is already done, and the journal that records the rest.
pub(super) struct Resumed {
    pub(super) slots: Vec<FileSlot>,
    pub(super) journal: Arc<Mutex<Journal>>,
    /// Bytes of ranges kept from earlier runs.
    pub(super) reused: u64,
    /// Bytes of files that have no full-size partial yet: what the disk must still hold.
    pub(super) needed_space: u64,
}

/// Keeps the journal lines that match this plan (same file, size, ETag and chunk size) and whose
/// partial file has its full size, and rewrites the journal to exactly those.
pub(super) fn resume(
    layout: &Layout,
    name: &ModelName,
    plan: &Plan,
    options: &FetchOptions,
) -> Result<Resumed, PrefetchError> {
    let journal_path = layout.journal_path(name);
    let lines = Journal::load(&journal_path)?;
    let by_file = index_lines(&lines);
    let chunk = options.chunk_size;
    let mut kept: Vec<JournalLine> = Vec::new();
    let mut slots = Vec::with_capacity(plan.files.len());
    let mut needed_space: u64 = 0;
    for f in &plan.files {
        let partial = layout.partial_path(name, &f.path);
        if f.size == 0 {
            // Nothing to download, so nothing this run writes would replace what a partial of
            // that name holds (an earlier revision's bytes), and BLAKE3 of empty input matches
            // whatever it is: publish creates the file empty instead.
            remove_if_present(&partial)?;
        }
        let mut meta = std::fs::symlink_metadata(&partial).ok();
        if meta.as_ref().is_some_and(|m| !m.file_type().is_file()) {
            // Only ever a regular file of ours: a link or anything else there is not one.
            if meta.as_ref().is_some_and(std::fs::Metadata::is_dir) {
                std::fs::remove_dir_all(&partial)
                    .map_err(|e| PrefetchError::local("remove", partial.clone(), e))?;
            } else {
                remove_if_present(&partial)?;
            }
            meta = None;
        }
        let partial_len = meta.as_ref().map(std::fs::Metadata::len);
        let kept_before = kept.len();
        let slot = FileSlot::new(f.clone(), Some(Sink::new(partial.clone())), chunk);
        if partial_len == Some(f.size) {
            if let Some(done) = by_file.get(&(f.path.clone(), f.size, f.etag.clone(), chunk)) {
                let mut digests = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
                for line in done {
                    let digest = if options.hash {
                        line.digest_bytes()
                    } else {
                        Some([0; 32])
                    };
                    let Some(digest) = digest else { continue };
                    if let Some(d) = usize::try_from(line.index)
                        .ok()
                        .and_then(|i| digests.get_mut(i))
                    {
                        if d.is_none() {
                            *d = Some(digest);
                            kept.push(line.clone());
                        }
                    }
                }
            }
        } else {
            needed_space += f.size;
        }
        // A repair links the intact files of the published revision into staging. Such a
        // partial shares its inode with a published file, so it is never written: unless every
        // range of it is kept, it goes, with its lines, and the file is fetched afresh. Any
        // other name for the inode (dfdaemon's task file, from an agent that published its
        // inode) is another principal's way to change it after its ranges were hashed: such a
        // partial is never trusted.
        let shared = meta.as_ref().is_some_and(|m| m.nlink() > 1);
        let ours = meta
            .as_ref()
            .is_some_and(|m| is_published_inode(layout, name, &f.path, m));
        let complete = u64::try_from(kept.len() - kept_before).ok() == Some(f.size.div_ceil(chunk));
        if shared && !(ours && complete) {
            kept.truncate(kept_before);
            slot.digests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter_mut()
                .for_each(|d| *d = None);
            std::fs::remove_file(&partial)
                .map_err(|e| PrefetchError::local("remove", partial.clone(), e))?;
            if partial_len == Some(f.size) {
                needed_space += f.size;
            }
        }
        slots.push(slot);
    }
    let reused: u64 = kept
        .iter()
        .map(|l| (l.index * chunk + chunk).min(l.size) - l.index * chunk)
        .sum();
    let journal = Arc::new(Mutex::new(Journal::rewrite(&journal_path, &kept)?));
    Ok(Resumed {
        slots,
        journal,
        reused,
        needed_space,
    })
}

/// Whether `meta` is the inode of `path` in the revision `models/NAME` links to: a repair's
/// link to a file only the agent writes.
fn is_published_inode(
    layout: &Layout,
    name: &ModelName,
    path: &str,
    meta: &std::fs::Metadata,
) -> bool {
    let Some(revision) = layout.published_revision(name) else {
        return false;
    };
    // Two names exactly: the published one and this partial, nobody else's.
    meta.nlink() == 2
        && std::fs::symlink_metadata(layout.revision_dir(name, &revision).join(path))
            .is_ok_and(|p| p.is_file() && p.dev() == meta.dev() && p.ino() == meta.ino())
}

fn remove_if_present(path: &std::path::Path) -> Result<(), PrefetchError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PrefetchError::local("remove", path.to_path_buf(), e)),
    }
}
