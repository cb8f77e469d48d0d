//! Deciding what to do with the discovered disks: a pure function from a snapshot of the host
//! to a list of steps, so every boot scenario is a unit test and `modelcache disk plan` can
//! print it without changing anything.
//!
//! The policy, in order:
//! - the cache root shows our filesystem: nothing to do; a whole filesystem of someone else
//!   mounted there: refuse. A bind mount of a *directory* there is what a pod's `hostPath`
//!   volume is (mountinfo root other than `/`): our filesystem is mounted over it, which hides
//!   but never changes what the directory holds;
//! - devices listed in `disk.devices` must all be usable (blank or ours): a listed device that
//!   is not is an error naming it, never a silently smaller array. Devices selected by model
//!   string that hold foreign data are left alone and reported;
//! - one usable device: use our filesystem on it, or make one if it is blank (or only holds an
//!   old array member of ours);
//! - several: use our array when it is running over exactly its members (as udev assembles
//!   it at boot), or assemble it, whenever every member it was made with is present; disks
//!   beside a complete array (blank, or left over from an earlier array of ours) are left
//!   unused and reported, so a disk that comes back after a rebuild never triggers another;
//! - an array of ours with a member missing and nothing to replace it (fewer usable devices
//!   than it had members): wait up to `disk.member_wait` for the member (a disk can appear late
//!   at boot), then rebuild once over the present devices, saying why. With replacements there
//!   (a blank disk in the missing one's place), rebuild at once;
//! - otherwise, when every usable device is ours or blank, stop any partial array of ours,
//!   create a new array over all of them and always make a new filesystem on it (a new array
//!   can show an old superblock through; this drops the old cache, and says so).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;

use super::DiskError;
use super::classify::Content;
use super::discover::{Found, MdArray, Mount};

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
    /// Our array is already running over exactly the usable devices.
    UseArray {
        /// Its device.
        device: PathBuf,
    },
    /// Stop an array of ours that does not match the devices (incomplete, or inactive).
    StopArray {
        /// Its device.
        device: PathBuf,
    },
    /// Assemble our existing array from its members.
    AssembleArray {
        /// The array's name, e.g. `/dev/md/modelcache`.
        array: PathBuf,
        /// Members.
        members: Vec<PathBuf>,
    },
    /// Create a new RAID0 array.
    CreateArray {
        /// The array's name, e.g. `/dev/md/modelcache`.
        array: PathBuf,
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
    /// Make a new filesystem, whatever the device shows: only on an array just created.
    MakeFilesystem {
        /// Where.
        target: Target,
        /// Devices the filesystem spans (for stripe alignment).
        stripe_width: u32,
    },
    /// Our array has members missing and nothing to replace them: wait for them before
    /// deciding again (after `disk.member_wait`, the decision rebuilds without them).
    WaitForMembers {
        /// How many of its members are present.
        present: u32,
        /// How many it was made with.
        expected: u32,
    },
    /// Mount at the cache root, shared.
    Mount {
        /// What.
        target: Target,
    },
}

impl Step {
    /// A short name: `already-mounted`, `use-array`, `stop-array`, `assemble`, `create`,
    /// `filesystem`, `mkfs`, `wait`, `mount`.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::AlreadyMounted { .. } => "already-mounted",
            Step::UseArray { .. } => "use-array",
            Step::StopArray { .. } => "stop-array",
            Step::AssembleArray { .. } => "assemble",
            Step::CreateArray { .. } => "create",
            Step::EnsureFilesystem { .. } => "filesystem",
            Step::MakeFilesystem { .. } => "mkfs",
            Step::WaitForMembers { .. } => "wait",
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
            Step::StopArray { device } => write!(
                f,
                "stop our array {} (it does not span exactly the usable devices)",
                device.display()
            ),
            Step::AssembleArray { array, members } => {
                write!(
                    f,
                    "assemble our array {} from {}",
                    array.display(),
                    list(members)
                )
            }
            Step::CreateArray { array, members } => {
                write!(
                    f,
                    "create a RAID0 array {} over {}",
                    array.display(),
                    list(members)
                )
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
            Step::MakeFilesystem { target, .. } => {
                write!(f, "make a new filesystem on {} (new array)", t(target))
            }
            Step::WaitForMembers { present, expected } => write!(
                f,
                "wait for the missing member(s) of our {expected}-disk array ({present} present; a disk may still be appearing), up to disk.member_wait; then rebuild over the present disks"
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

/// Everything `decide` looks at, read from the host before anything is written.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// Each device with its content (read for candidates only).
    pub found: &'a [(Found, Option<Content>)],
    /// The topmost mount at the cache root, with its device's content.
    pub at_target: Option<(&'a Mount, Option<&'a Content>)>,
    /// The md arrays holding candidate devices.
    pub arrays: &'a [MdArray],
    /// Where our array appears by name: `/dev/md/LABEL`.
    pub array_path: &'a std::path::Path,
    /// Whether devices were listed in `disk.devices` (then every one must be usable).
    pub explicit: bool,
    /// Whether the wait for missing members of our array is over (`disk.member_wait`).
    pub waited_out: bool,
}

/// Decides the steps for a snapshot of the host.
pub fn decide(snapshot: &Snapshot<'_>) -> Result<Plan, DiskError> {
    let found = snapshot.found;
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
    if let Some((mount, content)) = snapshot.at_target {
        match content {
            Some(Content::OurFilesystem { .. }) if !mount.is_directory_bind() => {
                return Ok(Plan {
                    devices,
                    steps: vec![Step::AlreadyMounted {
                        device: mount.source.clone(),
                    }],
                    notes,
                });
            }
            _ if mount.is_directory_bind() => notes.push(format!(
                "the cache root is a bind mount of the directory {} on {} (a hostPath volume): our filesystem is mounted over it",
                mount.root, mount.source
            )),
            _ => {
                return Err(DiskError::MountpointBusy {
                    target: mount.target.clone(),
                    source_device: mount.source.clone(),
                    fstype: mount.fstype.clone(),
                });
            }
        }
    }
    if snapshot.explicit {
        let unusable: Vec<String> = found
            .iter()
            .filter(|(f, _)| f.wanted)
            .filter_map(|(f, c)| {
                let why = match (&f.skipped, c) {
                    (Some(why), _) => why.clone(),
                    (None, Some(Content::Foreign { what })) => format!("holds {what}"),
                    (None, None) => "could not be read".to_string(),
                    (None, Some(_)) => return None,
                };
                Some(format!("{} {why}", f.device.path.display()))
            })
            .collect();
        if !unusable.is_empty() {
            return Err(DiskError::ListedDeviceUnusable { report: unusable });
        }
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
    // Arrays of ours that hold usable devices: only these may be used or stopped.
    let ours: Vec<&MdArray> = snapshot
        .arrays
        .iter()
        .filter(|a| {
            usable.iter().any(|(f, c)| {
                f.in_array.as_deref() == Some(a.name.as_str())
                    && matches!(c, Content::OurArrayMember { .. })
            })
        })
        .collect();
    // Our arrays by superblock: members present, and members each was made with.
    let mut arrays_of_ours: Vec<(&str, u32, Vec<&Found>)> = Vec::new();
    for (f, c) in &usable {
        if let Content::OurArrayMember {
            array_uuid,
            raid_disks,
        } = c
        {
            match arrays_of_ours.iter_mut().find(|(u, _, _)| u == array_uuid) {
                Some((_, _, members)) => members.push(f),
                None => arrays_of_ours.push((array_uuid.as_str(), *raid_disks, vec![f])),
            }
        }
    }
    let complete = arrays_of_ours
        .iter()
        .filter(|(_, disks, members)| {
            *disks > 1 && usize::try_from(*disks).ok() == Some(members.len())
        })
        .max_by_key(|(_, disks, _)| *disks);
    let array = snapshot.array_path.to_path_buf();
    let mut steps = Vec::new();
    if let Some((uuid, disks, members)) = complete {
        // Every member it was made with is here: keep it (and the cache on it), whatever else
        // is beside it.
        let member_names: BTreeSet<&str> = members.iter().map(|f| f.device.name.as_str()).collect();
        let member_paths: Vec<PathBuf> = members.iter().map(|f| f.device.path.clone()).collect();
        for (f, c) in &usable {
            if member_names.contains(f.device.name.as_str()) {
                continue;
            }
            notes.push(match c {
                Content::OurArrayMember { .. } => format!(
                    "{} is left over from an earlier array of ours (it came back after that array was rebuilt without it): it stays unused and the cache on our {disks}-disk array is kept (hint: to use it, wipe it with `wipefs -a` and reboot the node, which rebuilds the array and drops the cache)",
                    f.device.path.display()
                ),
                _ => format!(
                    "{} is {}; it stays unused: our {disks}-disk array is complete without it and the cache on it is kept",
                    f.device.path.display(),
                    describe(c)
                ),
            });
        }
        let width = *disks;
        let running = ours.iter().find(|a| {
            a.is_running()
                && a.members
                    .iter()
                    .map(String::as_str)
                    .collect::<BTreeSet<_>>()
                    == member_names
        });
        match running {
            Some(a) => steps.push(Step::UseArray {
                device: a.path.clone(),
            }),
            None => {
                for a in ours.iter().filter(|a| {
                    usable.iter().any(|(f, c)| {
                        f.in_array.as_deref() == Some(a.name.as_str())
                            && matches!(c, Content::OurArrayMember { array_uuid, .. } if array_uuid == uuid)
                    })
                }) {
                    stop(a, "is not running over all its members: it is stopped and assembled again", &mut notes, &mut steps);
                }
                steps.push(Step::AssembleArray {
                    array,
                    members: member_paths,
                });
            }
        }
        steps.push(Step::EnsureFilesystem {
            target: Target::Array,
            may_overwrite: false,
            stripe_width: width,
        });
        steps.push(Step::Mount {
            target: Target::Array,
        });
        return Ok(Plan {
            devices,
            steps,
            notes,
        });
    }
    // An array of ours missing members, with nothing in their place: they may yet appear.
    let incomplete = arrays_of_ours
        .iter()
        .filter(|(_, disks, members)| {
            *disks > 1 && usize::try_from(*disks).is_ok_and(|d| members.len() < d)
        })
        .max_by_key(|(_, _, members)| members.len());
    if let Some((_, disks, members)) = incomplete {
        let present = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let replaced = usize::try_from(*disks).is_ok_and(|d| usable.len() >= d);
        if !replaced {
            if !snapshot.waited_out {
                return Ok(Plan {
                    devices,
                    steps: vec![Step::WaitForMembers {
                        present,
                        expected: *disks,
                    }],
                    notes,
                });
            }
            notes.push(format!(
                "our {disks}-disk array still has only {present} of its members after disk.member_wait: rebuilding over the {} present disk(s); the old cache is dropped and refetched (if the missing disk comes back it stays unused, and the rebuilt array keeps serving)",
                usable.len()
            ));
        }
    }
    for array in &ours {
        stop(
            array,
            "does not span exactly the usable devices: it is stopped first",
            &mut notes,
            &mut steps,
        );
    }
    if let [(only, content)] = usable.as_slice() {
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
        return Ok(Plan {
            devices,
            steps,
            notes,
        });
    }
    let old = usable
        .iter()
        .filter(|(_, c)| !matches!(c, Content::Blank))
        .count();
    if old > 0 {
        notes.push(format!(
            "{old} of {} devices hold our old data but do not form a complete array of ours: creating a new array over all {}; the old cache is dropped and refetched",
            usable.len(),
            usable.len()
        ));
    }
    steps.push(Step::CreateArray {
        array,
        members: paths,
    });
    steps.push(Step::MakeFilesystem {
        target: Target::Array,
        stripe_width: width,
    });
    steps.push(Step::Mount {
        target: Target::Array,
    });
    Ok(Plan {
        devices,
        steps,
        notes,
    })
}

/// Stops an array of ours, noting why.
fn stop(array: &MdArray, why: &str, notes: &mut Vec<String>, steps: &mut Vec<Step>) {
    notes.push(format!(
        "our array {} ({}, members {}) {why}",
        array.path.display(),
        array.state,
        array.members.join(" ")
    ));
    steps.push(Step::StopArray {
        device: array.path.clone(),
    });
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
            wanted: true,
            skipped: skipped.map(str::to_string),
            in_array: None,
        }
    }

    fn held(i: u32, array: &str) -> Found {
        let mut f = dev(i, None);
        f.device.holders = vec![array.to_string()];
        f.in_array = Some(array.to_string());
        f
    }

    fn member(uuid: &str, disks: u32) -> Content {
        Content::OurArrayMember {
            array_uuid: uuid.into(),
            raid_disks: disks,
        }
    }

    fn md(state: &str, members: &[u32]) -> MdArray {
        MdArray {
            name: "md127".into(),
            path: "/dev/md127".into(),
            state: state.into(),
            members: members.iter().map(|i| format!("nvme{i}n1")).collect(),
        }
    }

    fn decide_with(
        found: &[(Found, Option<Content>)],
        at_target: Option<(&Mount, Option<&Content>)>,
        arrays: &[MdArray],
        explicit: bool,
    ) -> Result<Plan, DiskError> {
        decide_after(found, at_target, arrays, explicit, false)
    }

    fn decide_after(
        found: &[(Found, Option<Content>)],
        at_target: Option<(&Mount, Option<&Content>)>,
        arrays: &[MdArray],
        explicit: bool,
        waited_out: bool,
    ) -> Result<Plan, DiskError> {
        decide(&Snapshot {
            found,
            at_target,
            arrays,
            array_path: std::path::Path::new("/dev/md/modelcache"),
            explicit,
            waited_out,
        })
    }

    fn plain(found: &[(Found, Option<Content>)]) -> Result<Plan, DiskError> {
        decide_with(found, None, &[], false)
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
    fn four_blank_disks_get_a_new_named_array_and_a_new_filesystem() {
        let found: Vec<_> = (1..=4)
            .map(|i| (dev(i, None), Some(Content::Blank)))
            .collect();
        let p = plain(&found).unwrap();
        assert_eq!(kinds(&p), ["create", "mkfs", "mount"]);
        assert!(p.notes.is_empty());
        assert!(
            p.steps[0].to_string().contains("/dev/md/modelcache"),
            "{}",
            p.steps[0]
        );
    }

    #[test]
    fn a_complete_array_of_ours_is_assembled_or_used_not_recreated() {
        let found: Vec<_> = (1..=4)
            .map(|i| (dev(i, None), Some(member("aa", 4))))
            .collect();
        assert_eq!(
            kinds(&plain(&found).unwrap()),
            ["assemble", "mkfs-if-blank", "mount"]
        );
        // Assembled by udev at boot, before the agent: its members are held by it.
        let found: Vec<_> = (1..=4)
            .map(|i| (held(i, "md127"), Some(member("aa", 4))))
            .collect();
        let p = decide_with(&found, None, &[md("clean", &[1, 2, 3, 4])], false).unwrap();
        assert_eq!(kinds(&p), ["use-array", "mkfs-if-blank", "mount"]);
        assert_eq!(
            p.steps[0],
            Step::UseArray {
                device: "/dev/md127".into()
            }
        );
        // Held but inactive (udev started it and waits for members): stopped, assembled.
        let p = decide_with(&found, None, &[md("inactive", &[1, 2, 3, 4])], false).unwrap();
        assert_eq!(
            kinds(&p),
            ["stop-array", "assemble", "mkfs-if-blank", "mount"]
        );
    }

    #[test]
    fn one_replaced_blank_disk_stops_the_partial_array_and_recreates_it_and_says_so() {
        let mut found: Vec<_> = (1..=3)
            .map(|i| (held(i, "md127"), Some(member("aa", 4))))
            .collect();
        found.push((dev(4, None), Some(Content::Blank)));
        let p = decide_with(&found, None, &[md("inactive", &[1, 2, 3])], false).unwrap();
        assert_eq!(kinds(&p), ["stop-array", "create", "mkfs", "mount"]);
        assert!(
            p.notes.iter().any(|n| n.contains("old cache is dropped")),
            "{:?}",
            p.notes
        );
        // Without udev's array: the same, minus the stop.
        let found: Vec<_> = found
            .into_iter()
            .map(|(mut f, c)| {
                f.in_array = None;
                (f, c)
            })
            .collect();
        assert_eq!(kinds(&plain(&found).unwrap()), ["create", "mkfs", "mount"]);
    }

    /// Issue 18: a member of our array missing, with nothing in its place, used to stop the
    /// array, create a new one over the rest and run mkfs at once, and again at the next boot
    /// when the disk came back. Now: wait for it, then rebuild once, saying why.
    #[test]
    fn issue18_a_missing_member_is_waited_for_then_rebuilt_once() {
        let found: Vec<_> = (1..=3)
            .map(|i| (held(i, "md127"), Some(member("aa", 4))))
            .collect();
        let udev = [md("inactive", &[1, 2, 3])];
        let p = decide_with(&found, None, &udev, false).unwrap();
        assert_eq!(kinds(&p), ["wait"]);
        assert_eq!(
            p.steps[0],
            Step::WaitForMembers {
                present: 3,
                expected: 4
            }
        );
        let p = decide_after(&found, None, &udev, false, true).unwrap();
        assert_eq!(kinds(&p), ["stop-array", "create", "mkfs", "mount"]);
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("only 3 of its members after disk.member_wait")),
            "{:?}",
            p.notes
        );
    }

    /// The disk that was missing comes back after the rebuild: the rebuilt array (and the
    /// cache on it) is kept, the returning disk stays unused and is reported. No rebuild loop.
    #[test]
    fn issue18_a_member_that_comes_back_after_a_rebuild_changes_nothing() {
        let mut found: Vec<_> = (1..=3)
            .map(|i| (dev(i, None), Some(member("bb", 3))))
            .collect();
        found.push((dev(4, None), Some(member("aa", 4))));
        for waited_out in [false, true] {
            let p = decide_after(&found, None, &[], false, waited_out).unwrap();
            assert_eq!(kinds(&p), ["assemble", "mkfs-if-blank", "mount"]);
            let Step::AssembleArray { members, .. } = &p.steps[0] else {
                panic!("{p:?}")
            };
            assert!(
                !members.contains(&PathBuf::from("/dev/nvme4n1")),
                "{members:?}"
            );
            assert!(
                p.notes
                    .iter()
                    .any(|n| n.contains("/dev/nvme4n1") && n.contains("earlier array")),
                "{:?}",
                p.notes
            );
        }
        // Assembled by udev at boot, the returning disk beside it: used as it runs.
        let found: Vec<_> = found
            .into_iter()
            .map(|(f, c)| {
                if f.device.name == "nvme4n1" {
                    (f, c)
                } else {
                    let i: u32 = f.device.name[4..5].parse().unwrap();
                    (held(i, "md127"), c)
                }
            })
            .collect();
        let p = decide_with(&found, None, &[md("clean", &[1, 2, 3])], false).unwrap();
        assert_eq!(kinds(&p), ["use-array", "mkfs-if-blank", "mount"]);
    }

    /// A blank disk beside a complete array of ours does not cost the cache.
    #[test]
    fn a_complete_array_keeps_its_cache_beside_a_new_blank_disk() {
        let mut found: Vec<_> = (1..=4)
            .map(|i| (dev(i, None), Some(member("aa", 4))))
            .collect();
        found.push((dev(5, None), Some(Content::Blank)));
        let p = plain(&found).unwrap();
        assert_eq!(kinds(&p), ["assemble", "mkfs-if-blank", "mount"]);
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("/dev/nvme5n1") && n.contains("stays unused")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn a_foreign_array_is_never_used_nor_stopped() {
        let found: Vec<_> = (1..=2)
            .map(|i| {
                (
                    held(i, "md127"),
                    Some(Content::Foreign {
                        what: "a member of md array \"data\"".into(),
                    }),
                )
            })
            .chain([(dev(3, None), Some(Content::Blank))])
            .collect();
        let p = decide_with(&found, None, &[md("clean", &[1, 2])], false).unwrap();
        assert_eq!(kinds(&p), ["mkfs-if-blank", "mount"]);
        assert!(!p.steps.iter().any(|s| matches!(s, Step::StopArray { .. })));
    }

    #[test]
    fn foreign_disks_selected_by_model_are_left_out_and_reported() {
        let found = vec![
            (dev(1, None), Some(Content::Blank)),
            (
                dev(2, None),
                Some(Content::Foreign {
                    what: "a GPT partition table".into(),
                }),
            ),
        ];
        let p = plain(&found).unwrap();
        assert_eq!(kinds(&p), ["mkfs-if-blank", "mount"]);
        assert!(
            matches!(&p.steps[0], Step::EnsureFilesystem { target: Target::Device(d), .. } if d == &PathBuf::from("/dev/nvme1n1"))
        );
        assert!(p.notes[0].contains("/dev/nvme2n1") && p.notes[0].contains("never touched"));
    }

    #[test]
    fn a_listed_device_that_is_foreign_or_skipped_is_an_error_naming_it() {
        let found = vec![
            (dev(1, None), Some(Content::Blank)),
            (
                dev(2, None),
                Some(Content::Foreign {
                    what: "a GPT partition table".into(),
                }),
            ),
            (dev(3, Some("is mounted at /data")), None),
        ];
        let err = decide_with(&found, None, &[], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/nvme2n1 holds a GPT")
                && err.contains("/dev/nvme3n1 is mounted at /data")
                && !err.contains("nvme1n1"),
            "{err}"
        );
        // Devices that are not listed do not count.
        let mut other = dev(4, Some("not in disk.devices"));
        other.wanted = false;
        let found = vec![(dev(1, None), Some(Content::Blank)), (other, None)];
        assert!(decide_with(&found, None, &[], true).is_ok());
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
        let err = plain(&found).unwrap_err().to_string();
        assert!(
            err.contains("/dev/nvme1n1")
                && err.contains("mounted at /data")
                && err.contains("unrecognised"),
            "{err}"
        );
        assert!(plain(&[]).is_err());
    }

    fn mount(root: &str, source: &str) -> Mount {
        Mount {
            devno: "9:127".into(),
            root: root.into(),
            target: "/mnt/modelcache".into(),
            fstype: "xfs".into(),
            source: source.into(),
            read_only: false,
            shared: true,
        }
    }

    #[test]
    fn an_existing_mount_is_reused_if_ours_and_refused_otherwise() {
        let m = mount("/", "/dev/md127");
        let ours = Content::OurFilesystem { fstype: "xfs" };
        assert_eq!(
            kinds(&decide_with(&[], Some((&m, Some(&ours))), &[], false).unwrap()),
            ["already-mounted"]
        );
        let err = decide_with(
            &[],
            Some((&m, Some(&Content::Foreign { what: "x".into() }))),
            &[],
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/dev/md127"), "{err}");
    }

    #[test]
    fn a_hostpath_bind_of_a_directory_is_mounted_over() {
        // The pod's view: the host's /mnt/modelcache directory on the OS disk, bound at the
        // cache root.
        let m = mount("/mnt/modelcache", "/dev/sda1");
        let foreign = Content::Foreign {
            what: "an ext2/3/4 filesystem labelled \"cloudimg-rootfs\"".into(),
        };
        let found = vec![(dev(1, None), Some(Content::Blank))];
        let p = decide_with(&found, Some((&m, Some(&foreign))), &[], false).unwrap();
        assert_eq!(kinds(&p), ["mkfs-if-blank", "mount"]);
        assert!(p.notes[0].contains("bind mount"), "{:?}", p.notes);
        // The same filesystem mounted whole at the cache root is someone else's: refused.
        let whole = mount("/", "/dev/sda1");
        assert!(matches!(
            decide_with(&found, Some((&whole, Some(&foreign))), &[], false),
            Err(DiskError::MountpointBusy { .. })
        ));
    }

    #[test]
    fn a_single_disk_needs_no_array() {
        // The other member of its 2-disk array may still appear: waited for first.
        let alone = [(dev(1, None), Some(member("aa", 2)))];
        assert_eq!(kinds(&plain(&alone).unwrap()), ["wait"]);
        let p = decide_after(&alone, None, &[], false, true).unwrap();
        assert_eq!(kinds(&p), ["mkfs-overwrite", "mount"]);
        let p = plain(&[(dev(1, None), Some(Content::OurFilesystem { fstype: "xfs" }))]).unwrap();
        assert_eq!(kinds(&p), ["mkfs-if-blank", "mount"]);
    }
}
