//! Taking a file another principal wrote (dfdaemon's output) into an inode only the agent
//! writes.
//!
//! dfdaemon hands its finished task over as a file in a directory it can write: the same inode
//! as its task storage, which it keeps writing into whenever it re-downloads a piece, which a
//! peer could have filled with forged bytes that pass its own CRC32, and which a compromised
//! dfdaemon can change at will, modification time included. So the agent never publishes that
//! inode, and never acts on that path by name after one open:
//! - the directory and then the file are opened without following a symbolic link, and the
//!   file without blocking on a FIFO;
//! - `fstat` on that descriptor must show a regular file of the expected size;
//! - a new file of the agent's own is made in staging (mode 0644 set on its descriptor), and
//!   the bytes are cloned into it from the descriptor (`FICLONE`: a reflink, instant on XFS
//!   with `reflink=1`, which shares extents copy-on-write, so a later write to dfdaemon's file
//!   never reaches the clone) or, where the filesystem cannot clone (ext4, tmpfs), copied
//!   in the kernel (`copy_file_range`);
//! - the caller hashes the clone, never the source.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// How the bytes came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A reflink: no data was read or written.
    Cloned,
    /// An in-kernel copy.
    Copied,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Cloned => "cloned",
            Method::Copied => "copied",
        })
    }
}

/// Why a file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// Opening the directory or the file failed, a symbolic link among them.
    #[error("cannot open {path} (a symbolic link is refused)")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Not a regular file.
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// Not the expected size.
    #[error("{path} holds {actual} bytes where {expected} were expected")]
    Size {
        /// The path.
        path: PathBuf,
        /// Expected.
        expected: u64,
        /// Found.
        actual: u64,
    },
    /// Creating, cloning into or copying into the agent's own file failed.
    #[error("failed to {action} {path}")]
    Write {
        /// What was being done.
        action: &'static str,
        /// The agent's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A directory another principal can write (dfdaemon's output directory), reached from a
/// directory the agent trusts one component at a time without following a symbolic link, and
/// acted on only through its descriptor afterwards: a link or directory swapped in anywhere on
/// the way is refused, never followed.
#[derive(Debug)]
pub struct ForeignDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl ForeignDir {
    /// Opens `base/relative`, creating the missing components (mode 0755). `base` is the
    /// agent's own; every component of `relative` may be another principal's.
    pub fn open(base: &Path, relative: &Path) -> Result<Self, TakeError> {
        let open_dir = |at: Option<&OwnedFd>, name: &Path, path: &Path| {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            match at {
                None => nix::fcntl::open(name, flags, Mode::empty()),
                Some(fd) => nix::fcntl::openat(fd, name, flags, Mode::empty()),
            }
            .map_err(|source| TakeError::Open {
                path: path.to_path_buf(),
                source,
            })
        };
        let mut fd = open_dir(None, base, base)?;
        let mut path = base.to_path_buf();
        for component in relative.components() {
            let std::path::Component::Normal(name) = component else {
                return Err(TakeError::Open {
                    path: path.join(component.as_os_str()),
                    source: nix::Error::EINVAL,
                });
            };
            path.push(name);
            match nix::sys::stat::mkdirat(&fd, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::Error::EEXIST) => {}
                Err(source) => {
                    return Err(TakeError::Open { path, source });
                }
            }
            fd = open_dir(Some(&fd), Path::new(name), &path)?;
        }
        Ok(Self { fd, path })
    }

    /// The directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `file_name` in it for reading, without following a symbolic link and without
    /// opening anything but a regular file: the name is first opened as a path only
    /// (`O_PATH`, which opens no device and blocks on no FIFO), checked with `fstat`, and only
    /// then reopened for reading through that descriptor. Its size is the caller's to check:
    /// it may still be growing.
    pub fn open_regular(&self, file_name: &str) -> Result<File, TakeError> {
        let path = self.path.join(file_name);
        let located: OwnedFd = nix::fcntl::openat(
            &self.fd,
            file_name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| TakeError::Open {
            path: path.clone(),
            source,
        })?;
        let stat = nix::sys::stat::fstat(&located).map_err(|source| TakeError::Open {
            path: path.clone(),
            source,
        })?;
        if nix::sys::stat::SFlag::from_bits_truncate(stat.st_mode) & nix::sys::stat::SFlag::S_IFMT
            != nix::sys::stat::SFlag::S_IFREG
        {
            return Err(TakeError::NotRegular { path });
        }
        // The same inode, whatever the name points at by now.
        let reopened = nix::fcntl::open(
            Path::new(&format!("/proc/self/fd/{}", located.as_raw_fd())),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| TakeError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(File::from(reopened))
    }

    /// Removes the name `file_name` from it (a link is removed, never followed; a directory
    /// there is left alone).
    pub fn remove(&self, file_name: &str) {
        let _ = nix::unistd::unlinkat(&self.fd, file_name, nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
}

/// Checks that `file` (from [`ForeignDir::open_regular`]) holds at least `end` bytes.
pub fn holds(file: &File, path: &Path, end: u64) -> Result<(), TakeError> {
    let len = file
        .metadata()
        .map_err(|source| TakeError::Write {
            action: "stat",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len < end {
        return Err(TakeError::Size {
            path: path.to_path_buf(),
            expected: end,
            actual: len,
        });
    }
    Ok(())
}

/// Creates the agent's own file `to` (in a directory only the agent writes; an old one is
/// replaced) of `size` bytes, all holes, mode 0644 whatever the umask.
pub fn create_own(to: &Path, size: u64) -> Result<File, TakeError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let failed = |action: &'static str| {
        move |source: std::io::Error| TakeError::Write {
            action,
            path: to.to_path_buf(),
            source,
        }
    };
    match std::fs::remove_file(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("remove")(e)),
    }
    // O_CREAT | O_EXCL: never follows a link, never opens what someone put there.
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(to)
        .map_err(failed("create"))?;
    out.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(failed("chmod"))?;
    out.set_len(size).map_err(failed("size"))?;
    Ok(out)
}

/// Makes bytes `offset..offset + len` of `to` those of `from`: cloned where the filesystem can
/// (the range shares `from`'s extents copy-on-write), copied in the kernel otherwise.
pub fn clone_range(from: &File, to: &File, offset: u64, len: u64) -> std::io::Result<Method> {
    if ficlone::clone_range(from, to, offset, len).is_ok() {
        return Ok(Method::Cloned);
    }
    let mut off_in = i64::try_from(offset).map_err(std::io::Error::other)?;
    let mut off_out = off_in;
    let end = i64::try_from(offset.saturating_add(len)).map_err(std::io::Error::other)?;
    while off_in < end {
        let want = usize::try_from(end - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        let n = nix::fcntl::copy_file_range(
            from.as_fd(),
            Some(&mut off_in),
            to.as_fd(),
            Some(&mut off_out),
            want,
        )
        .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Method::Copied)
}

/// The `FICLONERANGE` ioctl, the one `unsafe` call of the crate.
#[expect(
    unsafe_code,
    reason = "the FICLONERANGE ioctl has no safe wrapper in nix or std"
)]
mod ficlone {
    use super::{AsRawFd, File};

    /// `struct file_clone_range` of linux/fs.h.
    #[repr(C)]
    pub(super) struct FileCloneRange {
        src_fd: i64,
        src_offset: u64,
        src_length: u64,
        dest_offset: u64,
    }

    // FICLONERANGE is _IOW(0x94, 13, struct file_clone_range) in linux/fs.h.
    nix::ioctl_write_ptr!(ficlonerange, 0x94, 13, FileCloneRange);

    /// Makes `to`'s bytes `offset..offset + len` share `from`'s extents.
    pub(super) fn clone_range(from: &File, to: &File, offset: u64, len: u64) -> nix::Result<()> {
        let range = FileCloneRange {
            src_fd: i64::from(from.as_raw_fd()),
            src_offset: offset,
            src_length: len,
            dest_offset: offset,
        };
        // SAFETY: `range` is a live, properly laid out `struct file_clone_range` (repr(C),
        // the kernel's field order and widths) that the kernel only reads during the call;
        // both descriptors stay open for the call, since `from` and `to` are borrowed.
        unsafe { ficlonerange(to.as_raw_fd(), &raw const range) }.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_taken_into_a_new_inode() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let theirs =
            ForeignDir::open(dir.path(), Path::new("dragonfly/storage/modelcache")).unwrap();
        let bytes: Vec<u8> = (0..3 * 65536u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(theirs.path().join("0.part"), &bytes).unwrap();
        let from = theirs.open_regular("0.part").unwrap();
        holds(&from, &theirs.path().join("0.part"), bytes.len() as u64).unwrap();
        let ours = dir.path().join("ours");
        let file = create_own(&ours, bytes.len() as u64).unwrap();
        // The tail first, then the head: ranges in any order.
        clone_range(&from, &file, 65536, 2 * 65536).unwrap();
        clone_range(&from, &file, 0, 65536).unwrap();
        assert_eq!(std::fs::read(&ours).unwrap(), bytes);
        let (a, b) = (from.metadata().unwrap(), file.metadata().unwrap());
        assert_ne!(a.ino(), b.ino());
        assert_eq!(b.nlink(), 1);
        assert_eq!(b.mode() & 0o7777, 0o644);
        // Their later write never reaches ours.
        std::fs::write(theirs.path().join("0.part"), vec![7u8; bytes.len()]).unwrap();
        assert_eq!(std::fs::read(&ours).unwrap(), bytes);
        theirs.remove("0.part");
        assert!(!theirs.path().join("0.part").exists());
    }

    /// Issue 25: a symbolic link (to a device, a secret, anything the agent can reach) swapped
    /// in for dfdaemon's output is refused: never opened, never chmod'ed, never removed through.
    #[test]
    fn issue25_symlinks_devices_fifos_and_short_files_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let theirs = ForeignDir::open(dir.path(), Path::new("theirs")).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"0123456789a").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&secret, theirs.path().join("0.part")).unwrap();
        let err = theirs.open_regular("0.part").unwrap_err();
        assert!(matches!(err, TakeError::NotRegular { .. }), "{err}");
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        theirs.remove("0.part");
        assert!(secret.exists(), "the link went, not its target");
        nix::unistd::mkfifo(
            &theirs.path().join("2.part"),
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(
            theirs.open_regular("2.part"),
            Err(TakeError::NotRegular { .. })
        ));
        // A character device (as root only): never opened.
        if nix::unistd::geteuid().is_root() {
            nix::sys::stat::mknod(
                &theirs.path().join("4.part"),
                nix::sys::stat::SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(1, 3),
            )
            .unwrap();
            assert!(matches!(
                theirs.open_regular("4.part"),
                Err(TakeError::NotRegular { .. })
            ));
        }
        std::fs::create_dir(theirs.path().join("3.part")).unwrap();
        assert!(matches!(
            theirs.open_regular("3.part"),
            Err(TakeError::NotRegular { .. })
        ));
        std::fs::write(theirs.path().join("1.part"), b"0123456789a").unwrap();
        let short = theirs.open_regular("1.part").unwrap();
        assert!(matches!(
            holds(&short, &theirs.path().join("1.part"), 12),
            Err(TakeError::Size { .. })
        ));
    }

    /// Issue 25: a component of the directory's path swapped for a link (`modelcache` ->
    /// `../../store`) is refused, so nothing is created, removed or read through it.
    #[test]
    fn issue25_a_linked_component_of_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store/m");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("0.part"), b"published").unwrap();
        std::fs::create_dir_all(dir.path().join("dragonfly/storage")).unwrap();
        std::os::unix::fs::symlink(
            "../../store/m",
            dir.path().join("dragonfly/storage/modelcache"),
        )
        .unwrap();
        let err =
            ForeignDir::open(dir.path(), Path::new("dragonfly/storage/modelcache")).unwrap_err();
        assert!(matches!(err, TakeError::Open { .. }), "{err}");
        assert!(store.join("0.part").exists());
        for bad in ["../x", "/abs"] {
            assert!(
                ForeignDir::open(dir.path(), Path::new(bad)).is_err(),
                "{bad}"
            );
        }
    }
}
