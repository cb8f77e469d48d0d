//! The agent's Unix sockets.
//!
//! The admin socket (`listen.admin`): a Unix socket in a directory only root can enter, so the
//! state-changing API is reachable by the node's root and the agent's own container, and not by
//! the pods that share the host network (a loopback TCP port would be open to all of them).
//!
//! The readers' socket (`CACHE_ROOT/readers.sock`): open to every process that mounts the
//! cache, which is how a consumer pod proves which pod it is (see [`crate::agent::pods`]).

use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tracing::info;

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve {which} {path}: {problem}")]
pub struct SocketError {
    /// Which socket: the admin socket (`listen.admin`) or the readers' socket.
    pub which: &'static str,
    /// The socket's path.
    pub path: PathBuf,
    /// What is wrong, and what to do.
    pub problem: String,
}

/// The bound socket's file, removed when this is dropped (if it is still ours).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: Option<u64>,
}

/// Makes the socket's directory root-only (creating it, or tightening one this user owns),
/// replaces a stale socket a dead agent left, and binds with mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let fail = |problem: String| SocketError {
        which: "the admin socket (listen.admin)",
        path: path.to_path_buf(),
        problem,
    };
    let dir = path
        .parent()
        .ok_or_else(|| fail("the path has no directory".into()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| fail(format!("reading {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(fail(format!(
            "{} is not a directory (a symbolic link is refused: whoever can change it decides where the socket is)",
            dir.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(fail(format!(
            "{} belongs to uid {}, not to this agent's uid {me}: its owner could replace the socket; choose a directory the agent owns",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("making {} owner-only: {e}", dir.display())))?;
        info!(
            "made {} owner-only (it was {:o}): only this user may reach the admin socket",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    // The directory is already owner-only; the socket's own mode says the same for anyone who
    // is handed the path through another mount.
    replace_and_bind(path, 0o600, "the admin socket (listen.admin)")
}

/// Binds the readers' socket in the cache root: any process that mounts the cache may connect
/// (mode 0666; connect(2) works through a read-only mount), since the agent identifies each
/// reader's pod from the connecting process and serves only the read routes there.
pub fn bind_readers(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    replace_and_bind(path, 0o666, "the readers' socket")
}

/// Binds a socket at `path` with `mode`, replacing a stale one a killed agent left (nobody
/// answers it); a live one, or anything that is not a socket, is refused.
fn replace_and_bind(
    path: &Path,
    mode: u32,
    which: &'static str,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let fail = |problem: String| SocketError {
        which,
        path: path.to_path_buf(),
        problem,
    };
    match std::fs::symlink_metadata(path) {
        Ok(existing) if existing.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail(
                    "another agent is serving on it; stop that one first".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(fail(
                "something that is not a socket is there; remove it or choose another path".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("reading it: {e}"))),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(format!("binding: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("setting its mode to {mode:o}: {e}")))?;
    let inode = std::fs::symlink_metadata(path).ok().map(|m| m.ino());
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only our own socket: a newer agent may have replaced it already.
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| m.ino())
            .is_some_and(|ino| Some(ino) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_directory_becomes_owner_only_and_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = run.join("admin.sock");
        let socket = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&run), 0o700);
        assert_eq!(mode(&path), 0o600);

        let err = bind(&path).unwrap_err().to_string();
        assert!(err.contains("another agent is serving"), "{err}");

        // A killed agent leaves its socket file: nobody answers it, so it is replaced.
        std::mem::forget(socket);
        let stale = tokio::net::UnixListener::bind(run.join("other.sock")).unwrap();
        drop(stale);
        let replaced = bind(&run.join("other.sock")).unwrap();
        drop(replaced);
        assert!(!run.join("other.sock").exists(), "removed when dropped");

        std::fs::write(run.join("file"), "keep").unwrap();
        let err = bind(&run.join("file")).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(run.join("file")).unwrap(), "keep");
    }
}
