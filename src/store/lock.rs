//! The one owner of a model's files.
//!
//! Every change to `staging/NAME`, `store/NAME` and `models/NAME` (fetch, publish, refresh,
//! evict, delete, cleanup) happens while holding an exclusive `flock` on `locks/NAME`, whoever
//! makes it: an agent job, an agent eviction, or a `modelcache prefetch` run beside the agent.
//! `flock` locks belong to an open file, so two tasks of one process exclude each other as two
//! processes do, and the kernel releases the lock when its holder dies (no stale lock after
//! `kill -9`). The lock file is never removed: removing it would let a waiter lock an unlinked
//! inode while a newcomer locks a fresh one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;

use super::{Layout, ModelName, StoreError};

/// An exclusive hold on one model's files; released when dropped.
#[derive(Debug)]
pub struct ModelLock {
    _held: Flock<File>,
    name: ModelName,
}

impl ModelLock {
    /// The model this lock holds.
    pub fn name(&self) -> &ModelName {
        &self.name
    }
}

/// What happened to an attempt to take a model's lock.
#[derive(Debug)]
pub enum TryLock {
    /// Taken.
    Held(ModelLock),
    /// Someone else holds it; their description (`pid 42: modelcache prefetch`), if readable.
    Busy(String),
}

fn lock_path(layout: &Layout, name: &ModelName) -> PathBuf {
    layout.root().join("locks").join(name.as_str())
}

/// Takes the lock of `name` if it is free, recording `holder` in it for whoever waits.
pub fn try_lock(layout: &Layout, name: &ModelName, holder: &str) -> Result<TryLock, StoreError> {
    let path = lock_path(layout, name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(StoreError::io("open", &path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            // Best effort: the description only makes a waiter's message clearer.
            let _ = held.set_len(0);
            let _ = held.rewind();
            let _ = write!(held, "pid {}: {holder}", std::process::id());
            Ok(TryLock::Held(ModelLock {
                _held: held,
                name: name.clone(),
            }))
        }
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut who = String::new();
            let _ = file.read_to_string(&mut who);
            let who = who.trim();
            Ok(TryLock::Busy(if who.is_empty() {
                "another process".to_string()
            } else {
                who.to_string()
            }))
        }
        Err((_, errno)) => Err(StoreError::Io {
            action: "lock",
            path,
            source: errno.into(),
        }),
    }
}

/// Takes the lock of `name`, waiting while another holder has it: `on_wait` is told once who
/// that is. Returns `None` when `cancel` fires first.
pub async fn lock(
    layout: &Layout,
    name: &ModelName,
    holder: &str,
    cancel: &CancellationToken,
    on_wait: impl FnOnce(&str),
) -> Result<Option<ModelLock>, StoreError> {
    let mut on_wait = Some(on_wait);
    // The holder is another process or task doing long work (a download, a publish); polling
    // every few hundred milliseconds costs nothing next to it and, unlike a blocking `flock` in
    // a thread, stops the moment `cancel` fires.
    let mut delay = Duration::from_millis(20);
    loop {
        match try_lock(layout, name, holder)? {
            TryLock::Held(lock) => return Ok(Some(lock)),
            TryLock::Busy(who) => {
                if let Some(tell) = on_wait.take() {
                    tell(&who);
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_within_a_process_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let name = ModelName::new("m").unwrap();
        let TryLock::Held(first) = try_lock(&layout, &name, "job 1").unwrap() else {
            panic!("a free lock must be taken");
        };
        match try_lock(&layout, &name, "job 2").unwrap() {
            TryLock::Busy(who) => assert!(who.ends_with("job 1"), "{who}"),
            TryLock::Held(_) => panic!("two holders of one model"),
        }
        let other = ModelName::new("n").unwrap();
        assert!(matches!(
            try_lock(&layout, &other, "job 3").unwrap(),
            TryLock::Held(_)
        ));
        drop(first);
        assert!(matches!(
            try_lock(&layout, &name, "job 2").unwrap(),
            TryLock::Held(_)
        ));
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_the_holder_lets_go_and_stops_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let name = ModelName::new("m").unwrap();
        let TryLock::Held(first) = try_lock(&layout, &name, "holder").unwrap() else {
            panic!("a free lock must be taken");
        };
        let cancel = CancellationToken::new();
        let (told_tx, told_rx) = tokio::sync::oneshot::channel();
        let waiter = {
            let (layout, name, cancel) = (layout.clone(), name.clone(), cancel.clone());
            tokio::spawn(async move {
                lock(&layout, &name, "waiter", &cancel, |who| {
                    let _ = told_tx.send(who.to_string());
                })
                .await
            })
        };
        // The waiter says whom it waits for before the holder lets go.
        assert!(told_rx.await.unwrap().ends_with("holder"));
        drop(first);
        let got = waiter.await.unwrap().unwrap();
        assert!(got.is_some());

        let cancel_waiter = {
            let (layout, name, cancel) = (layout.clone(), name.clone(), cancel.clone());
            tokio::spawn(async move { lock(&layout, &name, "late", &cancel, |_| {}).await })
        };
        cancel.cancel();
        assert!(cancel_waiter.await.unwrap().unwrap().is_none());
        drop(got);
    }
}
