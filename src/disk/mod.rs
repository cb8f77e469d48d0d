//! The node's local disks: find the local NVMe ([`discover`]), read what is on each before
//! writing anything ([`classify`]), decide ([`plan`]), and carry it out ([`apply`]: RAID0 via
//! mdadm, mkfs, mount); then show consumers the cache read-only ([`view`]). The only module that runs privileged operations; it refuses rather than
//! guesses, and never touches a device holding data it did not create.

pub mod apply;
pub mod classify;
pub mod discover;
pub mod plan;
pub mod view;

use std::path::PathBuf;

use serde::Serialize;

use apply::ArrayTool;
use discover::{HostPaths, Selector};
use plan::Plan;

/// The default model strings of Azure's local NVMe disks.
pub const DEFAULT_MODELS: &[&str] = &[
    "Microsoft NVMe Direct Disk",
    "Microsoft NVMe Direct Disk v2",
];

/// The cache filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// XFS (the default, as the Azure HPC images use on NVMe).
    Xfs,
    /// ext4.
    Ext4,
}

impl Filesystem {
    /// The type name for mkfs and mount.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Xfs => "xfs",
            Filesystem::Ext4 => "ext4",
        }
    }
}

/// Validated disk settings.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Set up disks at agent start.
    pub enabled: bool,
    /// Which devices.
    pub selector: Selector,
    /// Filesystem to make.
    pub filesystem: Filesystem,
    /// RAID0 chunk in bytes.
    pub raid_chunk: u64,
    /// Filesystem label and array name.
    pub label: String,
    /// Mount with `discard`.
    pub discard: bool,
    /// Host roots.
    pub host: HostPaths,
    /// The cache root: what consumers see.
    pub target: PathBuf,
    /// Where the agent mounts the cache filesystem for itself, private to its pod, when
    /// consumers are to see the cache root read-only (see [`view`]).
    pub private_mount: Option<PathBuf>,
    /// How long to wait for a missing member of our array before rebuilding without it.
    pub member_wait: std::time::Duration,
}

/// A disk operation that failed, naming the device or path.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A host file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A device could not be read.
    #[error("failed to read {device}")]
    Probe {
        /// The device.
        device: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Devices listed in `disk.devices` do not exist.
    #[error(
        "listed in disk.devices but not found: {} (hint: check the names against /sys/block, or remove them from disk.devices)",
        devices.join(", ")
    )]
    ListedDeviceMissing {
        /// The names as listed.
        devices: Vec<String>,
    },
    /// A device listed in `disk.devices` cannot be used.
    #[error(
        "listed in disk.devices but not usable: {} (hint: every listed device must be blank or ours; remove the others from disk.devices, the agent never writes to them)",
        report.join("; ")
    )]
    ListedDeviceUnusable {
        /// One line per unusable listed device.
        report: Vec<String>,
    },
    /// No selected device can be used.
    #[error(
        "no usable local disk: {} (hint: check disk.models against /sys/block/*/device/model, or list devices in disk.devices)",
        if report.is_empty() { "no device matched".to_string() } else { report.join("; ") }
    )]
    NoUsableDisk {
        /// One line per device considered.
        report: Vec<String>,
    },
    /// Something else is mounted at the cache root.
    #[error(
        "{target} is already mounted from {source_device} ({fstype}), which is not our filesystem; refusing to mount over it"
    )]
    MountpointBusy {
        /// The cache root.
        target: PathBuf,
        /// What is mounted there.
        source_device: String,
        /// Its type.
        fstype: String,
    },
    /// A device turned out not to be ours right before writing.
    #[error("refusing to write {device}: it holds {what}")]
    Refused {
        /// The device.
        device: PathBuf,
        /// What is on it.
        what: String,
    },
    /// A command could not be started.
    #[error("failed to execute `{program}` (hint: the image needs xfsprogs, mdadm and util-linux)")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{argv}` exited with {status}:\n  {stderr}")]
    CommandFailed {
        /// The full command line.
        argv: String,
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// An array was started but its device never appeared.
    #[error(
        "{device} did not appear within {}s after the array was started (hint: is udev running on the node, and /dev the host's?)",
        waited.as_secs()
    )]
    DeviceMissing {
        /// The device path mdadm was asked to make.
        device: PathBuf,
        /// How long we waited.
        waited: std::time::Duration,
    },
    /// `mount(2)` failed.
    #[error("failed to mount {device} on {target}")]
    Mount {
        /// The device.
        device: PathBuf,
        /// The mount point.
        target: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// `cache.private_mount` lies on a mount that propagates.
    #[error(
        "cache.private_mount {path} lies on {mount}, a shared mount: the agent's writable mount made there would propagate to its peers (hint: mount an emptyDir at {path}, as the DaemonSet does)"
    )]
    PrivateMountShared {
        /// The private mount point.
        path: PathBuf,
        /// The mount it lies on.
        mount: PathBuf,
    },
    /// The path shown to Dragonfly's client is not on a shared mount: a bind made there would
    /// stay in the agent's pod.
    #[error(
        "fetch.dragonfly.storage_host_path {path} lies on {mount}, which does not propagate to the node (hint: mount it as a hostPath volume with mountPropagation: Bidirectional, as deploy/dragonfly does)"
    )]
    DragonflyStorageNotShared {
        /// The configured path.
        path: PathBuf,
        /// The mount it lies on.
        mount: PathBuf,
    },
    /// The cache root is not a mount point, so a view attached there would reach no one.
    #[error(
        "the cache root {target} is not a mount point (hint: in a pod it is the hostPath volume's mount; outside one, unset cache.private_mount)"
    )]
    ViewNeedsMount {
        /// The cache root.
        target: PathBuf,
    },
    /// A step of the read-only view's sequence failed.
    #[error("failed to {op} {path}")]
    MountStep {
        /// What was being done (`bind`, `make private`, `remount read-only`, `move`).
        op: &'static str,
        /// The mount point acted on.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The agent is stopping: disk setup ended while waiting.
    #[error("stopped while waiting for the members of our array")]
    Stopped,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What `disk plan` or `disk apply` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// The device mounted at the cache root after `apply`.
    pub mounted: Option<String>,
    /// The consumers' read-only view, with `cache.private_mount`.
    pub view: Option<view::View>,
}

/// Looks at the host and decides, changing nothing. A missing member of our array is waited
/// for (the plan says so) until `waited_out`.
pub fn plan(config: &DiskConfig, waited_out: bool) -> Result<Plan, DiskError> {
    let at_target = apply::at_target(config)?;
    let found = discover::discover(&config.host, &config.selector)?;
    let mut with_content = Vec::new();
    let mut arrays: Vec<discover::MdArray> = Vec::new();
    for f in found {
        let content = if f.skipped.is_none() {
            Some(apply::probe(
                &f.device.path,
                f.device.size_bytes,
                &config.label,
            )?)
        } else {
            None
        };
        if let Some(name) = &f.in_array {
            if !arrays.iter().any(|a| &a.name == name) {
                arrays.extend(discover::md_array(&config.host, name));
            }
        }
        with_content.push((f, content));
    }
    let target = at_target.as_ref().map(|(m, c)| (m, c.as_ref()));
    plan::decide(&plan::Snapshot {
        found: &with_content,
        at_target: target,
        arrays: &arrays,
        array_path: &config.host.dev.join("md").join(&config.label),
        explicit: !config.selector.devices.is_empty(),
        waited_out,
    })
}

/// How often a missing member of our array is looked for while waiting for it.
const MEMBER_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Decides and carries out the plan. A plan that waits for a missing member of our array is
/// decided again every two seconds, up to `disk.member_wait`, then decided without waiting
/// (it rebuilds over the present disks). `stop` ends the wait early with
/// [`DiskError::Stopped`].
pub fn apply(
    config: &DiskConfig,
    arrays: &dyn ArrayTool,
    stop: &dyn Fn() -> bool,
) -> Result<Report, DiskError> {
    let started = std::time::Instant::now();
    let mut told = false;
    let plan = loop {
        let waited_out = started.elapsed() >= config.member_wait;
        let plan = plan(config, waited_out)?;
        let Some(plan::Step::WaitForMembers { present, expected }) = plan.steps.first() else {
            break plan;
        };
        if !told {
            tracing::warn!(
                "disk: our {expected}-disk array has only {present} of its members; waiting up to {} for the others before rebuilding without them",
                humantime::format_duration(config.member_wait)
            );
            told = true;
        }
        if stop() {
            return Err(DiskError::Stopped);
        }
        std::thread::sleep(MEMBER_POLL.min(config.member_wait.saturating_sub(started.elapsed())));
    };
    if let Some(private) = &config.private_mount {
        // Before anything is mounted there.
        view::check_private(config, private)?;
    }
    let mounted = apply::execute(config, &plan.steps, arrays)?;
    let view = view::expose(config)?;
    Ok(Report {
        plan,
        mounted: Some(mounted),
        view,
    })
}

impl DiskConfig {
    /// Where the cache filesystem is mounted by disk setup: the agent's private mount when
    /// consumers get a read-only view ([`view`]), the cache root otherwise.
    pub fn mount_point(&self) -> PathBuf {
        self.private_mount
            .as_deref()
            .map_or_else(|| self.target.clone(), view::writable_root)
    }
}
