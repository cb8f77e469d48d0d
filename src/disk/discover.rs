//! Finding the node's local NVMe disks in sysfs, and the mounts in `mountinfo`, under
//! configurable roots so a fake tree in a temp dir stands in for the host in tests.
//!
//! Disks are selected by their model string (never by index: on NVMe-OS sizes `nvme0n1` is the
//! remote OS disk) or by an explicit device list. A selected disk is still skipped when it holds
//! the root filesystem, anything mounted, partitions, or belongs to another device (holders), or
//! is removable.

use std::path::{Path, PathBuf};

use super::DiskError;

/// Where the host's `/sys`, `/dev` and `/proc` are.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// Usually `/sys`.
    pub sysfs: PathBuf,
    /// Usually `/dev`.
    pub dev: PathBuf,
    /// Usually `/proc`.
    pub proc: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            proc: PathBuf::from("/proc"),
        }
    }
}

/// Which disks to consider.
#[derive(Debug, Clone)]
pub struct Selector {
    /// Model strings (compared trimmed) of the local disks.
    pub models: Vec<String>,
    /// Explicit device names or paths (`nvme1n1`, `/dev/loop3`); when set, models are ignored.
    pub devices: Vec<String>,
}

/// One whole block device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name, e.g. `nvme1n1`.
    pub name: String,
    /// Device node, e.g. `/dev/nvme1n1`.
    pub path: PathBuf,
    /// Trimmed model string, if the device has one.
    pub model: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// `major:minor`.
    pub devno: String,
    /// Removable media.
    pub removable: bool,
    /// Partitions (names) and their `major:minor`.
    pub partitions: Vec<(String, String)>,
    /// Devices built on this one (md, dm).
    pub holders: Vec<String>,
}

/// A device and whether it is a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The device.
    pub device: BlockDevice,
    /// Whether the selector names it (by model string or in `disk.devices`).
    pub wanted: bool,
    /// `None` when selected; otherwise why not.
    pub skipped: Option<String>,
    /// The md array holding it (`md127`), when an md array is its only holder. Such a device is
    /// still a candidate: the plan reads its superblock, and uses or stops the array only when
    /// the array is ours (as after a reboot, when udev assembles arrays before the agent runs).
    pub in_array: Option<String>,
}

/// An md array as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdArray {
    /// Kernel name, e.g. `md127`.
    pub name: String,
    /// Device node, e.g. `/dev/md127`.
    pub path: PathBuf,
    /// `md/array_state`: `clean`, `active`, `inactive`, `readonly`, ...
    pub state: String,
    /// Kernel names of its member devices (`slaves/`), sorted.
    pub members: Vec<String>,
}

impl MdArray {
    /// Whether the array runs (an `inactive` array holds its members but serves no I/O).
    pub fn is_running(&self) -> bool {
        !matches!(self.state.as_str(), "inactive" | "clear" | "")
    }
}

/// Reads the md array `name` (`md127`) from `SYSFS/block`, if it exists.
pub fn md_array(paths: &HostPaths, name: &str) -> Option<MdArray> {
    let dir = paths.sysfs.join("block").join(name);
    if !dir.join("md").is_dir() {
        return None;
    }
    let members = sorted_names(&dir.join("slaves"));
    Some(MdArray {
        name: name.to_string(),
        path: paths.dev.join(name),
        state: read_trimmed(&dir.join("md/array_state")).unwrap_or_default(),
        members,
    })
}

/// One line of `mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device.
    pub devno: String,
    /// The directory of the filesystem that is mounted here: `/` for a whole filesystem, a
    /// subdirectory for a bind mount of a directory (what a `hostPath` volume is in a pod).
    pub root: String,
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (device path).
    pub source: String,
    /// Mounted read-only (this mount; the filesystem may be writable through another).
    pub read_only: bool,
    /// In a shared peer group: mounts made under it propagate to its peers.
    pub shared: bool,
}

/// The entry names of a sysfs directory such as `holders/` or `slaves/`, sorted; none when it
/// is missing.
fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Parses `PROC/self/mountinfo`.
pub fn mounts(paths: &HostPaths) -> Result<Vec<Mount>, DiskError> {
    let file = paths.proc.join("self/mountinfo");
    let text = std::fs::read_to_string(&file).map_err(|source| DiskError::Read {
        path: file.clone(),
        source,
    })?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    // id parent maj:min root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split_whitespace().collect();
    let right: Vec<&str> = right.split_whitespace().collect();
    Some(Mount {
        devno: (*fields.get(2)?).to_string(),
        root: unescape(fields.get(3)?),
        target: PathBuf::from(unescape(fields.get(4)?)),
        fstype: (*right.first()?).to_string(),
        source: right.get(1).map_or(String::new(), |s| unescape(s)),
        read_only: fields
            .get(5)
            .is_some_and(|options| options.split(',').any(|o| o == "ro")),
        shared: fields
            .get(6..)
            .is_some_and(|optional| optional.iter().any(|f| f.starts_with("shared:"))),
    })
}

impl Mount {
    /// Whether this is a bind mount of a directory rather than a whole filesystem.
    pub fn is_directory_bind(&self) -> bool {
        self.root != "/"
    }
}

/// The mount a path shows: the last (topmost) of the mounts at `target`, since a filesystem
/// mounted over a bind mount is listed after it.
pub fn topmost_at(mounts: Vec<Mount>, target: &Path) -> Option<Mount> {
    mounts.into_iter().rfind(|m| m.target == target)
}

/// The mount a path lies on: the topmost mount at the path itself or, failing that, at its
/// nearest ancestor that is a mount point.
pub fn covering(mounts: &[Mount], path: &Path) -> Option<Mount> {
    let deepest = mounts
        .iter()
        .filter(|m| path.starts_with(&m.target))
        .map(|m| m.target.components().count())
        .max()?;
    mounts
        .iter()
        .rfind(|m| path.starts_with(&m.target) && m.target.components().count() == deepest)
        .cloned()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(char::from(n));
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads every whole block device from `SYSFS/block`.
pub fn block_devices(paths: &HostPaths) -> Result<Vec<BlockDevice>, DiskError> {
    let block = paths.sysfs.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| DiskError::Read {
        path: block.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = block.join(&name);
        let sectors: u64 = read_trimmed(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut partitions = Vec::new();
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten() {
                if child.path().join("partition").exists() {
                    let pname = child.file_name().to_string_lossy().into_owned();
                    let devno = read_trimmed(&child.path().join("dev")).unwrap_or_default();
                    partitions.push((pname, devno));
                }
            }
        }
        partitions.sort();
        let holders = sorted_names(&dir.join("holders"));
        out.push(BlockDevice {
            path: paths.dev.join(&name),
            model: read_trimmed(&dir.join("device/model")).filter(|m| !m.is_empty()),
            size_bytes: sectors.saturating_mul(512),
            devno: read_trimmed(&dir.join("dev")).unwrap_or_default(),
            removable: read_trimmed(&dir.join("removable")).as_deref() == Some("1"),
            partitions,
            holders,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Selects the local disks and says why each other device was left alone.
///
/// A device named in `disk.devices` that does not exist is an error naming it: an operator who
/// lists four devices means four, never a silently smaller array.
pub fn discover(paths: &HostPaths, selector: &Selector) -> Result<Vec<Found>, DiskError> {
    let mounts = mounts(paths)?;
    let root_devno = mounts
        .iter()
        .find(|m| m.target == Path::new("/"))
        .map(|m| m.devno.clone());
    let matches = |x: &str, d: &BlockDevice| {
        let x = x.trim();
        x == d.name || Path::new(x) == d.path
    };
    let wanted = |d: &BlockDevice| -> bool {
        if selector.devices.is_empty() {
            d.model
                .as_deref()
                .is_some_and(|m| selector.models.iter().any(|w| w.trim() == m))
        } else {
            selector.devices.iter().any(|x| matches(x, d))
        }
    };
    let devices = block_devices(paths)?;
    let missing: Vec<String> = selector
        .devices
        .iter()
        .filter(|x| !devices.iter().any(|d| matches(x, d)))
        .map(|x| x.trim().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(DiskError::ListedDeviceMissing { devices: missing });
    }
    let mut found = Vec::new();
    for device in devices {
        if !wanted(&device) {
            // Report other disks with a model (real hardware) so a plan shows why they were
            // left alone; loop, ram and md devices stay out of the listing.
            if let Some(model) = device.model.clone() {
                let why = if selector.devices.is_empty() {
                    format!("model {model:?} is not in disk.models")
                } else {
                    "not in disk.devices".to_string()
                };
                found.push(Found {
                    device,
                    wanted: false,
                    skipped: Some(why),
                    in_array: None,
                });
            }
            continue;
        }
        let mut devnos: Vec<&str> = vec![device.devno.as_str()];
        devnos.extend(device.partitions.iter().map(|(_, d)| d.as_str()));
        let in_array = match device.holders.as_slice() {
            [only] if only.starts_with("md") => Some(only.clone()),
            _ => None,
        };
        let skipped = if root_devno.as_deref().is_some_and(|r| devnos.contains(&r)) {
            Some("holds the root filesystem".to_string())
        } else if let Some(m) = mounts.iter().find(|m| devnos.contains(&m.devno.as_str())) {
            Some(format!("is mounted at {}", m.target.display()))
        } else if device.removable {
            Some("is removable".to_string())
        } else if !device.partitions.is_empty() {
            Some(format!(
                "has partitions ({})",
                device
                    .partitions
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        } else if !device.holders.is_empty() && in_array.is_none() {
            Some(format!("is in use by {}", device.holders.join(", ")))
        } else if device.size_bytes == 0 {
            Some("has no media (size 0)".to_string())
        } else {
            None
        };
        found.push(Found {
            device,
            wanted: true,
            skipped,
            in_array,
        });
    }
    Ok(found)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a fake host: `(name, model, sectors, extras)`.
    pub(crate) struct FakeHost {
        pub dir: tempfile::TempDir,
    }

    impl FakeHost {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("sys/block")).unwrap();
            std::fs::create_dir_all(dir.path().join("proc/self")).unwrap();
            std::fs::write(dir.path().join("proc/self/mountinfo"), "").unwrap();
            Self { dir }
        }

        pub(crate) fn paths(&self) -> HostPaths {
            HostPaths {
                sysfs: self.dir.path().join("sys"),
                dev: self.dir.path().join("dev"),
                proc: self.dir.path().join("proc"),
            }
        }

        pub(crate) fn disk(&self, name: &str, model: Option<&str>, devno: &str) -> PathBuf {
            let d = self.dir.path().join("sys/block").join(name);
            std::fs::create_dir_all(d.join("device")).unwrap();
            std::fs::create_dir_all(d.join("holders")).unwrap();
            std::fs::write(d.join("size"), "1875385008\n").unwrap();
            std::fs::write(d.join("dev"), format!("{devno}\n")).unwrap();
            std::fs::write(d.join("removable"), "0\n").unwrap();
            if let Some(m) = model {
                std::fs::write(d.join("device/model"), format!("{m}\n")).unwrap();
            }
            d
        }

        pub(crate) fn partition(&self, disk: &str, part: &str, devno: &str) {
            let p = self.dir.path().join("sys/block").join(disk).join(part);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("partition"), "1\n").unwrap();
            std::fs::write(p.join("dev"), format!("{devno}\n")).unwrap();
        }

        pub(crate) fn mount(&self, devno: &str, target: &str, source: &str) {
            let f = self.dir.path().join("proc/self/mountinfo");
            let mut text = std::fs::read_to_string(&f).unwrap();
            text.push_str(&format!(
                "30 1 {devno} / {target} rw,relatime shared:1 - ext4 {source} rw\n"
            ));
            std::fs::write(f, text).unwrap();
        }
    }

    const DIRECT: &str = "Microsoft NVMe Direct Disk              ";
    const DIRECT_V2: &str = "Microsoft NVMe Direct Disk v2           ";

    fn selector() -> Selector {
        Selector {
            models: vec![
                "Microsoft NVMe Direct Disk".into(),
                "Microsoft NVMe Direct Disk v2".into(),
            ],
            devices: vec![],
        }
    }

    fn selected(found: &[Found]) -> Vec<&str> {
        found
            .iter()
            .filter(|f| f.skipped.is_none())
            .map(|f| f.device.name.as_str())
            .collect()
    }

    #[test]
    fn nc96_selects_its_four_direct_disks_beside_the_scsi_os_and_temporary_disks() {
        let host = FakeHost::new();
        // NC96ads_A100_v4: the OS and temporary disks are SCSI; the local disks are NVMe.
        host.disk("sda", Some("Virtual Disk    "), "8:0");
        host.partition("sda", "sda1", "8:1");
        host.mount("8:1", "/", "/dev/sda1");
        host.disk("sdb", Some("Virtual Disk    "), "8:16");
        for i in 0..4 {
            host.disk(&format!("nvme{i}n1"), Some(DIRECT), &format!("259:{i}"));
        }
        let found = discover(&host.paths(), &selector()).unwrap();
        assert_eq!(
            selected(&found),
            ["nvme0n1", "nvme1n1", "nvme2n1", "nvme3n1"]
        );
    }

    #[test]
    fn nvme_os_sizes_select_the_direct_disks_never_the_remote_os_disk() {
        // Sizes whose OS disk is itself NVMe (the v6 generation): never taken by its index.
        let host = FakeHost::new();
        host.disk(
            "nvme0n1",
            Some("MSFT NVMe Accelerator v1.0              "),
            "259:0",
        );
        host.partition("nvme0n1", "nvme0n1p1", "259:1");
        host.mount("259:1", "/", "/dev/nvme0n1p1");
        for i in 1..=4 {
            host.disk(
                &format!("nvme{i}n1"),
                Some(DIRECT),
                &format!("259:{}", i + 4),
            );
        }
        let found = discover(&host.paths(), &selector()).unwrap();
        assert_eq!(
            selected(&found),
            ["nvme1n1", "nvme2n1", "nvme3n1", "nvme4n1"]
        );
        let os = found.iter().find(|f| f.device.name == "nvme0n1").unwrap();
        assert_eq!(
            os.skipped.as_deref(),
            Some("model \"MSFT NVMe Accelerator v1.0\" is not in disk.models")
        );
    }

    #[test]
    fn nc24_like_and_v2_padding() {
        let host = FakeHost::new();
        host.disk("nvme0n1", Some(DIRECT_V2), "259:0");
        let found = discover(&host.paths(), &selector()).unwrap();
        assert_eq!(selected(&found), ["nvme0n1"]);
        assert_eq!(
            found[0].device.model.as_deref(),
            Some("Microsoft NVMe Direct Disk v2")
        );
        assert_eq!(found[0].device.size_bytes, 1_875_385_008 * 512);
    }

    #[test]
    fn partitioned_mounted_removable_and_held_disks_are_skipped_with_reasons() {
        let host = FakeHost::new();
        host.disk("nvme1n1", Some(DIRECT), "259:1");
        host.partition("nvme1n1", "nvme1n1p1", "259:9");
        host.disk("nvme2n1", Some(DIRECT), "259:2");
        host.mount("259:2", "/data", "/dev/nvme2n1");
        let d = host.disk("nvme3n1", Some(DIRECT), "259:3");
        std::fs::write(d.join("removable"), "1\n").unwrap();
        let d = host.disk("nvme4n1", Some(DIRECT), "259:4");
        std::fs::create_dir_all(d.join("holders/dm-0")).unwrap();
        let d = host.disk("nvme5n1", Some(DIRECT), "259:5");
        std::fs::create_dir_all(d.join("holders/md127")).unwrap();
        host.disk("sda", Some("Virtual Disk"), "8:0");
        let found = discover(&host.paths(), &selector()).unwrap();
        let reasons: Vec<(&str, &str)> = found
            .iter()
            .filter(|f| f.device.name != "sda")
            .map(|f| {
                (
                    f.device.name.as_str(),
                    f.skipped.as_deref().unwrap_or("selected"),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            [
                ("nvme1n1", "has partitions (nvme1n1p1)"),
                ("nvme2n1", "is mounted at /data"),
                ("nvme3n1", "is removable"),
                ("nvme4n1", "is in use by dm-0"),
                ("nvme5n1", "selected"),
            ]
        );
        // An md member stays a candidate: the plan reads whose array it is.
        let md = found.iter().find(|f| f.device.name == "nvme5n1").unwrap();
        assert_eq!(md.in_array.as_deref(), Some("md127"));
    }

    #[test]
    fn a_listed_device_that_does_not_exist_is_an_error_naming_it() {
        let host = FakeHost::new();
        host.disk("loop3", None, "7:3");
        let explicit = Selector {
            models: vec![],
            devices: vec!["loop3".into(), "/dev/nvme9n1".into()],
        };
        let err = discover(&host.paths(), &explicit).unwrap_err().to_string();
        assert!(
            err.contains("/dev/nvme9n1") && !err.contains("loop3"),
            "{err}"
        );
    }

    #[test]
    fn md_arrays_are_read_from_sysfs() {
        let host = FakeHost::new();
        let d = host.disk("md127", None, "9:127");
        std::fs::create_dir_all(d.join("md")).unwrap();
        std::fs::write(d.join("md/array_state"), "inactive\n").unwrap();
        for m in ["nvme2n1", "nvme1n1"] {
            std::fs::create_dir_all(d.join("slaves").join(m)).unwrap();
        }
        let md = md_array(&host.paths(), "md127").unwrap();
        assert_eq!(md.members, ["nvme1n1", "nvme2n1"]);
        assert!(!md.is_running());
        std::fs::write(d.join("md/array_state"), "clean\n").unwrap();
        assert!(md_array(&host.paths(), "md127").unwrap().is_running());
        assert!(md_array(&host.paths(), "nvme1n1").is_none());
    }

    #[test]
    fn no_matching_disk_finds_nothing_and_explicit_devices_win() {
        let host = FakeHost::new();
        host.disk("sda", Some("Virtual Disk"), "8:0");
        host.disk("loop3", None, "7:3");
        assert!(selected(&discover(&host.paths(), &selector()).unwrap()).is_empty());
        let explicit = Selector {
            models: selector().models,
            devices: vec![host.paths().dev.join("loop3").display().to_string()],
        };
        assert_eq!(
            selected(&discover(&host.paths(), &explicit).unwrap()),
            ["loop3"]
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let m = parse_mountinfo_line("36 35 98:0 /mnt1 /mnt/with\\040space rw - ext3 /dev/root rw")
            .unwrap();
        assert_eq!(m.target, PathBuf::from("/mnt/with space"));
        assert_eq!(m.root, "/mnt1");
        assert!(m.is_directory_bind());
        assert_eq!(m.devno, "98:0");
        assert_eq!(m.fstype, "ext3");
        assert!(!m.read_only && !m.shared);
    }

    #[test]
    fn mountinfo_says_read_only_and_shared() {
        let view = parse_mountinfo_line(
            "612 35 9:127 / /mnt/modelcache ro,nosuid,nodev,noatime shared:301 master:7 - xfs /dev/md127 rw,attr2",
        )
        .unwrap();
        assert!(view.read_only && view.shared);
        let mounts = [
            parse_mountinfo_line("1 0 8:1 / / rw shared:1 - ext4 /dev/sda1 rw").unwrap(),
            parse_mountinfo_line("2 1 0:40 / /var/lib/modelcache rw - tmpfs emptydir rw").unwrap(),
        ];
        let on = covering(&mounts, Path::new("/var/lib/modelcache/cache")).unwrap();
        assert_eq!(on.fstype, "tmpfs");
        assert!(!on.shared);
        assert_eq!(covering(&mounts, Path::new("/etc")).unwrap().fstype, "ext4");
    }
}
