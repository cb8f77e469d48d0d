//! The consumers' read-only view of the cache.
//!
//! A `readOnly` hostPath volume does not make the mounts that propagate into it read-only: a
//! filesystem the agent mounts at the host path (Bidirectional) reaches every vLLM pod
//! (HostToContainer) writable, and a read-only bind made afterwards in two steps (`mount
//! --bind`, then `remount,bind,ro`) reaches them writable too, because a remount does not
//! propagate. A mount that is already read-only when it is attached does: every copy the kernel
//! propagates keeps the read-only flag.
//!
//! So with `cache.private_mount` (an emptyDir of the agent's pod, propagation none):
//! - the agent writes through `PRIVATE/cache`, a mount of the cache filesystem private to its
//!   pod (disk setup mounts the device there, or it is cloned from the cache root);
//! - the cache root shows a bind of it made read-only at `PRIVATE/view`, beside it, and then
//!   moved over the cache root in one step, so the node and every pod mounting the host path
//!   (also those that started before) see it read-only: a write fails with EROFS, whoever makes
//!   it.
//!
//! Both are idempotent. A restarted agent finds the read-only view at the cache root (it
//! outlives the agent's mount namespace on the node) and clones a writable mount of it back
//! into its own pod; a reboot starts over. Like the rest of `disk`, this is privileged code:
//! each step says why, and fails with the path it acted on.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use tracing::info;

use super::discover::{Mount, covering, mounts, topmost_at};
use super::{DiskConfig, DiskError};

/// Where the agent reads and writes the cache: `PRIVATE/cache`.
pub fn writable_root(private: &Path) -> PathBuf {
    private.join("cache")
}

/// Where the read-only bind is made before it is moved over the cache root.
fn staging(private: &Path) -> PathBuf {
    private.join("view")
}

/// What [`expose`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct View {
    /// Where the agent writes.
    pub writable: PathBuf,
    /// Whether the writable mount was cloned from the cache root (a restarted agent).
    pub cloned: bool,
    /// Whether the read-only view was attached now (false: it was there from an earlier run).
    pub attached: bool,
}

/// Refuses a private mount point on a mount that propagates: the agent's writable mount made
/// there would appear (writable) wherever that mount's peers are. An emptyDir volume is
/// mounted with propagation none.
pub fn check_private(config: &DiskConfig, private: &Path) -> Result<(), DiskError> {
    let all = mounts(&config.host)?;
    match covering(&all, private) {
        Some(m) if m.shared => Err(DiskError::PrivateMountShared {
            path: private.to_path_buf(),
            mount: m.target,
        }),
        _ => Ok(()),
    }
}

/// Makes the cache filesystem writable at [`writable_root`] for the agent alone and shows it
/// read-only at the cache root (see the module's documentation); `None` without
/// `cache.private_mount`. Expects the cache root to be a mount point (the pod's hostPath
/// bind, or the cache filesystem disk setup mounted).
pub fn expose(config: &DiskConfig) -> Result<Option<View>, DiskError> {
    let Some(private) = &config.private_mount else {
        return Ok(None);
    };
    let writable = writable_root(private);
    let stage = staging(private);
    check_private(config, private)?;
    for dir in [&writable, &stage] {
        std::fs::create_dir_all(dir).map_err(|source| DiskError::Probe {
            device: dir.clone(),
            source,
        })?;
    }
    let all = mounts(&config.host)?;
    let cache_root =
        topmost_at(all.clone(), &config.target).ok_or_else(|| DiskError::ViewNeedsMount {
            target: config.target.clone(),
        })?;
    // 1. The agent's own writable mount. Disk setup mounts the device there at boot; otherwise
    //    (a restart, or no disk setup) it is a clone of what the cache root shows.
    let mut cloned = false;
    let own = match topmost_at(all.clone(), &writable) {
        Some(m) => m,
        None => {
            info!(target = %writable.display(), "the agent's writable mount of the cache: a bind of {} (private to this pod)", config.target.display());
            // A non-recursive bind: only the cache filesystem, none of what is mounted under it.
            mount_step("bind", &config.target, &writable, MsFlags::MS_BIND)?;
            cloned = true;
            mine(&writable, config)?
        }
    };
    // Private: nothing done under it reaches the node, and the node's changes do not reach it.
    mount_step("make private", &writable, &writable, MsFlags::MS_PRIVATE)?;
    if own.read_only {
        // Cloned from the read-only view: writable again for this mount only (a bind remount
        // changes this mount's flags, not the filesystem's, and never propagates).
        mount_step(
            "remount read-write",
            &writable,
            &writable,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOATIME,
        )?;
    }
    let own = mine(&writable, config)?;
    // 2. The consumers' view: there already when the cache root shows this filesystem
    //    read-only (an earlier agent attached it; it outlived that agent on the node).
    let attached =
        !(cache_root.read_only && cache_root.devno == own.devno && cache_root.root == own.root);
    if attached {
        // Made read-only where no one sees it (beside the writable mount, private) ...
        mount_step("bind", &writable, &stage, MsFlags::MS_BIND)?;
        mount_step(
            "remount read-only",
            &stage,
            &stage,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOATIME,
        )?;
        // ... then moved over the cache root in one step: the propagated copies are made from
        // a mount that is already read-only, so every one of them is.
        mount_step("move", &stage, &config.target, MsFlags::MS_MOVE)?;
        info!(target = %config.target.display(), "consumers see {} read-only; the agent writes at {}", config.target.display(), writable.display());
    } else {
        info!(target = %config.target.display(), "{} already shows the cache read-only; the agent writes at {}", config.target.display(), writable.display());
    }
    Ok(Some(View {
        writable,
        cloned,
        attached,
    }))
}

/// The directory of the cache filesystem, under the agent's writable root, that Dragonfly's
/// client keeps its storage in.
pub const DRAGONFLY_STORAGE: &str = "dragonfly/storage";

/// What [`share_dragonfly_storage`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// The node's path of dfdaemon's storage, on the cache filesystem.
    pub storage: PathBuf,
    /// Whether the bind was made now (false: an earlier agent's is still there).
    pub attached: bool,
}

/// Shows the cache filesystem's `dragonfly/` directory, writable, at `host_path`, so that
/// Dragonfly's client, given `host_path/storage` as its storage, keeps its tasks on the cache
/// filesystem: a file it downloads for modelcache is then hard-linked into the cache, never
/// copied. `host_path` must be a hostPath volume of the agent's pod with Bidirectional
/// propagation, so the bind reaches the node. Idempotent: an earlier agent's bind (it outlives
/// the agent's pod on the node) is kept.
pub fn share_dragonfly_storage(
    config: &DiskConfig,
    writable: &Path,
    host_path: &Path,
) -> Result<Shared, DiskError> {
    let dir = writable.join("dragonfly");
    let storage = writable.join(DRAGONFLY_STORAGE);
    std::fs::create_dir_all(&storage).map_err(|source| DiskError::Probe {
        device: storage.clone(),
        source,
    })?;
    // Only root reads dfdaemon's tasks: the cache root's read-only view shows this directory
    // to every pod that mounts it.
    std::fs::set_permissions(
        &dir,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
    )
    .map_err(|source| DiskError::Probe {
        device: dir.clone(),
        source,
    })?;
    let all = mounts(&config.host)?;
    match covering(&all, host_path) {
        Some(m) if m.shared => {}
        Some(m) => {
            return Err(DiskError::DragonflyStorageNotShared {
                path: host_path.to_path_buf(),
                mount: m.target,
            });
        }
        None => {
            return Err(DiskError::DragonflyStorageNotShared {
                path: host_path.to_path_buf(),
                mount: PathBuf::from("/"),
            });
        }
    }
    let already = topmost_at(all.clone(), host_path).is_some_and(|m| {
        covering(&all, writable).is_some_and(|own| {
            m.devno == own.devno
                && m.root == format!("{}/dragonfly", own.root.trim_end_matches('/'))
        })
    });
    if already {
        info!(target = %host_path.display(), "dfdaemon's storage is already shown at {}", host_path.display());
    } else {
        std::fs::create_dir_all(host_path).map_err(|source| DiskError::Probe {
            device: host_path.to_path_buf(),
            source,
        })?;
        // A non-recursive bind of one directory of the cache filesystem; it propagates to the
        // node through the Bidirectional hostPath it is made on.
        mount_step("bind", &dir, host_path, MsFlags::MS_BIND)?;
        info!(target = %host_path.display(), "dfdaemon's storage: {} shows the cache filesystem's dragonfly/ directory", host_path.display());
    }
    Ok(Shared {
        storage: host_path.join("storage"),
        attached: !already,
    })
}

/// The mount at `path`, which a step just made.
fn mine(path: &Path, config: &DiskConfig) -> Result<Mount, DiskError> {
    topmost_at(mounts(&config.host)?, path).ok_or_else(|| {
        DiskError::Internal(format!(
            "{} is not a mount point after mounting it",
            path.display()
        ))
    })
}

/// One `mount(2)` call of the sequence above, logged and named in its error.
fn mount_step(op: &'static str, from: &Path, to: &Path, flags: MsFlags) -> Result<(), DiskError> {
    let source = flags
        .intersects(MsFlags::MS_BIND | MsFlags::MS_MOVE)
        .then_some(from)
        .filter(|_| !flags.contains(MsFlags::MS_REMOUNT));
    info!(op, from = %from.display(), to = %to.display(), "mount: {op} {}", to.display());
    mount(source, to, None::<&str>, flags, None::<&str>).map_err(|source| DiskError::MountStep {
        op,
        path: to.to_path_buf(),
        source,
    })
}
