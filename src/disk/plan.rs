//! Deciding what to do with the discovered disks: a pure function from what was found to a
//! list of steps, so every boot scenario is a unit test and `modelcache disk plan` can print it
//! without changing anything.
//!
//! The policy, in order:
//! - the cache root already mounted with our filesystem: nothing to do; anything else mounted
//!   there: refuse;
//! - foreign devices are left alone and reported;
//! - one usable device: use our filesystem on it, or make one if it is blank (or only holds an
//!   old array member of ours);
//! - several: use our array if it is running; assemble it when every usable device is a member
//!   of the same array of ours and none is missing; otherwise, when every usable device is ours
//!   or blank, create a new array over all of them (this drops the old cache, and says so).

use std::path::PathBuf;

use serde::Serialize;

use super::DiskError;
use super::classify::Content;
use super::discover::{Found, Mount};

/// What a step writes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A device node.
    Device(PathBuf),
    /// The array the previous step produced.
    Array,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum Step {
    /// The cache root is already mounted with our filesystem.
    AlreadyMounted {
        /// The mount source.
        device: String,
    },
    /// Our array is already running.
    UseArray {
        /// Its device.
        device: PathBuf,
    },
    /// Assemble our existing array from its members.
    AssembleArray {
        /// Members.
        members: Vec<PathBuf>,
    },
    /// Create a new RAID0 array.
    CreateArray {
        /// Members.
        members: Vec<PathBuf>,
    },
    /// Make our filesystem unless it is already there.
    EnsureFilesystem {
        /// Where.
        target: Target,
        /// Whether something other than blank may be overwritten (only our own old data).
        may_overwrite: bool,
        /// Devices the filesystem spans (for stripe alignment).
        stripe_width: u32,
    },
    /// Mount at the cache root, shared.
    Mount {
        /// What.
        target: Target,
    },
}

impl Step {
    /// A short name: `already-mounted`, `use-array`, `assemble`, `create`, `filesystem`, `mount`.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::AlreadyMounted { .. } => "already-mounted",
            Step::UseArray { .. } => "use-array",
            Step::AssembleArray { .. } => "assemble",
            Step::CreateArray { .. } => "create",
            Step::EnsureFilesystem { .. } => "filesystem",
            Step::Mount { .. } => "mount",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |t: &Target| match t {
            Target::Device(p) => p.display().to_string(),
            Target::Array => "the array".to_string(),
        };
        let list = |m: &[PathBuf]| {
            m.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            Step::AlreadyMounted { device } => write!(
                f,
                "nothing to do: the cache root is already mounted from {device} with our filesystem"
            ),
            Step::UseArray { device } => write!(f, "use our running array {}", device.display()),
            Step::AssembleArray { members } => {
                write!(f, "assemble our array from {}", list(members))
            }
            Step::CreateArray { members } => {
                write!(f, "create a RAID0 array over {}", list(members))
            }
            Step::EnsureFilesystem {
                target,
                may_overwrite,
                ..
            } => write!(
                f,
                "make our filesystem on {} if it is not there{}",
                t(target),
                if *may_overwrite {
                    " (overwriting only what our own old array left)"
                } else {
                    " (only if blank)"
                }
            ),
            Step::Mount { target } => {
                write!(f, "mount {} at the cache root, noatime, shared", t(target))
            }
        }
    }
}

/// A device as the plan reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceLine {
    /// Kernel name.
    pub name: String,
    /// Device node.
    pub path: PathBuf,
    /// Model string.
    pub model: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Why it was skipped, if it was.
    pub skipped: Option<String>,
    /// What is on it (selected devices only).
    pub content: Option<String>,
}

/// What would be done and why.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Every device considered.
    pub devices: Vec<DeviceLine>,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Decisions worth telling an operator.
    pub notes: Vec<String>,
}

fn describe(c: &Content) -> String {
    match c {
        Content::Blank => "blank".into(),
        Content::OurFilesystem { fstype } => format!("ours ({fstype} filesystem)"),
        Content::OurArrayMember { raid_disks, .. } => {
            format!("ours (member of our {raid_disks}-disk array)")
        }
        Content::Foreign { what } => format!("foreign: {what}; left untouched"),
    }
}

/// Decides the steps. `found` pairs each device with its content (read for selected devices
/// only); `at_target` is what is mounted at the cache root, with its content; `active_array` is
/// our array's device when it is running.
pub fn decide(
    found: &[(Found, Option<Content>)],
    at_target: Option<(&Mount, Option<&Content>)>,
    active_array: Option<PathBuf>,
) -> Result<Plan, DiskError> {
    let devices: Vec<DeviceLine> = found
        .iter()
        .map(|(f, c)| DeviceLine {
            name: f.device.name.clone(),
            path: f.device.path.clone(),
            model: f.device.model.clone(),
            size_bytes: f.device.size_bytes,
            skipped: f.skipped.clone(),
            content: c.as_ref().map(describe),
        })
        .collect();
    let mut notes = Vec::new();
    if let Some((mount, content)) = at_target {
        return match content {
            Some(Content::OurFilesystem { .. }) => Ok(Plan {
                devices,
                steps: vec![Step::AlreadyMounted {
                    device: mount.source.clone(),
                }],
                notes,
            }),
            _ => Err(DiskError::MountpointBusy {
                target: mount.target.clone(),
                source_device: mount.source.clone(),
                fstype: mount.fstype.clone(),
            }),
        };
    }
    let usable: Vec<(&Found, &Content)> = found
        .iter()
        .filter(|(f, _)| f.skipped.is_none())
        .filter_map(|(f, c)| c.as_ref().map(|c| (f, c)))
        .filter(|(_, c)| c.is_usable())
        .collect();
    for (f, c) in found {
        if let Some(Content::Foreign { what }) = c {
            notes.push(format!(
                "{} holds {what}: it is never touched",
                f.device.path.display()
            ));
        }
    }
    if usable.is_empty() {
        let report = devices
            .iter()
            .map(|d| {
                format!(
                    "{} ({}): {}",
                    d.path.display(),
                    d.model.as_deref().unwrap_or("no model"),
                    d.skipped
                        .clone()
                        .or_else(|| d.content.clone())
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>();
        return Err(DiskError::NoUsableDisk { report });
    }
    let paths: Vec<PathBuf> = usable.iter().map(|(f, _)| f.device.path.clone()).collect();
    let width = u32::try_from(paths.len()).unwrap_or(u32::MAX);
    let mut steps = Vec::new();
    if let Some(array) = active_array {
        steps.push(Step::UseArray { device: array });
        steps.push(Step::EnsureFilesystem {
            target: Target::Array,
            may_overwrite: false,
            stripe_width: width,
        });
        steps.push(Step::Mount {
            target: Target::Array,
        });
    } else if let [(only, content)] = usable.as_slice() {
        let may_overwrite = matches!(content, Content::OurArrayMember { .. });
        if may_overwrite {
            notes.push(format!(
                "{} was a member of our old array; a single disk needs no array, so it gets our filesystem directly",
                only.device.path.display()
            ));
        }
        let target = Target::Device(only.device.path.clone());
        steps.push(Step::EnsureFilesystem {
            target: target.clone(),
            may_overwrite,
            stripe_width: 1,
        });
        steps.push(Step::Mount { target });
    } else {
        let first_uuid = match usable[0].1 {
            Content::OurArrayMember {
                array_uuid,
                raid_disks,
            } => Some((array_uuid.clone(), *raid_disks)),
            _ => None,
        };
        let complete_array = first_uuid.as_ref().is_some_and(|(uuid, disks)| {
            usize::try_from(*disks).ok() == Some(usable.len())
                && usable.iter().all(|(_, c)| matches!(c, Content::OurArrayMember { array_uuid, .. } if array_uuid == uuid))
        });
        if complete_array {
            steps.push(Step::AssembleArray { members: paths });
            steps.push(Step::EnsureFilesystem {
                target: Target::Array,
                may_overwrite: false,
                stripe_width: width,
            });
        } else {
            let ours = usable
                .iter()
                .filter(|(_, c)| !matches!(c, Content::Blank))
                .count();
            if ours > 0 {
                notes.push(format!(
                    "{ours} of {} devices hold our old data but do not form a complete array of ours: creating a new array over all {}; the old cache is dropped and refetched",
                    usable.len(),
                    usable.len()
                ));
            }
            steps.push(Step::CreateArray { members: paths });
            steps.push(Step::EnsureFilesystem {
                target: Target::Array,
                may_overwrite: true,
                stripe_width: width,
            });
        }
        steps.push(Step::Mount {
            target: Target::Array,
        });
    }
    Ok(Plan {
        devices,
        steps,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::discover::BlockDevice;

    fn dev(i: u32, skipped: Option<&str>) -> Found {
        Found {
            device: BlockDevice {
                name: format!("nvme{i}n1"),
                path: PathBuf::from(format!("/dev/nvme{i}n1")),
                model: Some("Microsoft NVMe Direct Disk".into()),
                size_bytes: 960_197_124_096,
                devno: format!("259:{i}"),
                removable: false,
                partitions: vec![],
                holders: vec![],
            },
            skipped: skipped.map(str::to_string),
        }
    }

    fn member(uuid: &str, disks: u32) -> Content {
        Content::OurArrayMember {
            array_uuid: uuid.into(),
            raid_disks: disks,
        }
    }

    fn kinds(p: &Plan) -> Vec<&'static str> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::EnsureFilesystem {
                    may_overwrite: true,
                    ..
                } => "mkfs-overwrite",
                Step::EnsureFilesystem { .. } => "mkfs-if-blank",
                other => other.kind(),
            })
            .collect()
    }

    #[test]
    fn four_blank_disks_get_a_new_array() {
        let found: Vec<_> = (1..=4)
            .map(|i| (dev(i, None), Some(Content::Blank)))
            .collect();
        let p = decide(&found, None, None).unwrap();
        assert_eq!(kinds(&p), ["create", "mkfs-overwrite", "mount"]);
        assert!(p.notes.is_empty());
    }

    #[test]
    fn a_complete_array_of_ours_is_assembled_not_recreated() {
        let found: Vec<_> = (1..=4)
            .map(|i| (dev(i, None), Some(member("aa", 4))))
            .collect();
        assert_eq!(
            kinds(&decide(&found, None, None).unwrap()),
            ["assemble", "mkfs-if-blank", "mount"]
        );
        let p = decide(&found, None, Some(PathBuf::from("/dev/md127"))).unwrap();
        assert_eq!(kinds(&p), ["use-array", "mkfs-if-blank", "mount"]);
    }

    #[test]
    fn one_replaced_blank_disk_recreates_the_array_and_says_so() {
        let mut found: Vec<_> = (1..=3)
            .map(|i| (dev(i, None), Some(member("aa", 4))))
            .collect();
        found.push((dev(4, None), Some(Content::Blank)));
        let p = decide(&found, None, None).unwrap();
        assert_eq!(kinds(&p), ["create", "mkfs-overwrite", "mount"]);
        assert!(p.notes[0].contains("old cache is dropped"), "{:?}", p.notes);
    }

    #[test]
    fn foreign_disks_are_left_out_and_reported() {
        let found = vec![
            (dev(1, None), Some(Content::Blank)),
            (
                dev(2, None),
                Some(Content::Foreign {
                    what: "a GPT partition table".into(),
                }),
            ),
        ];
        let p = decide(&found, None, None).unwrap();
        assert_eq!(kinds(&p), ["mkfs-if-blank", "mount"]);
        assert!(
            matches!(&p.steps[0], Step::EnsureFilesystem { target: Target::Device(d), .. } if d == &PathBuf::from("/dev/nvme1n1"))
        );
        assert!(p.notes[0].contains("/dev/nvme2n1") && p.notes[0].contains("never touched"));
    }

    #[test]
    fn nothing_usable_is_an_error_listing_every_device() {
        let found = vec![
            (dev(1, Some("is mounted at /data")), None),
            (
                dev(2, None),
                Some(Content::Foreign {
                    what: "unrecognised data".into(),
                }),
            ),
        ];
        let err = decide(&found, None, None).unwrap_err().to_string();
        assert!(
            err.contains("/dev/nvme1n1")
                && err.contains("mounted at /data")
                && err.contains("unrecognised"),
            "{err}"
        );
        assert!(decide(&[], None, None).is_err());
    }

    #[test]
    fn an_existing_mount_is_reused_if_ours_and_refused_otherwise() {
        let m = Mount {
            devno: "9:127".into(),
            target: "/mnt/modelcache".into(),
            fstype: "xfs".into(),
            source: "/dev/md127".into(),
        };
        let ours = Content::OurFilesystem { fstype: "xfs" };
        assert_eq!(
            kinds(&decide(&[], Some((&m, Some(&ours))), None).unwrap()),
            ["already-mounted"]
        );
        let err = decide(
            &[],
            Some((&m, Some(&Content::Foreign { what: "x".into() }))),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/dev/md127"), "{err}");
    }

    #[test]
    fn a_single_disk_needs_no_array() {
        let p = decide(&[(dev(1, None), Some(member("aa", 2)))], None, None).unwrap();
        assert_eq!(kinds(&p), ["mkfs-overwrite", "mount"]);
        let p = decide(
            &[(dev(1, None), Some(Content::OurFilesystem { fstype: "xfs" }))],
            None,
            None,
        )
        .unwrap();
        assert_eq!(kinds(&p), ["mkfs-if-blank", "mount"]);
    }
}
