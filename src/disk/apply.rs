//! Carrying out a plan: the only code in the project that runs privileged operations (mdadm,
//! mkfs, mount). Each step is short, logged with its full argument list, re-checks the device
//! right before writing, and is idempotent, so a failed or interrupted `apply` leaves devices as
//! they were or in a state the next `apply` recognises.
//!
//! The md array step sits behind [`ArrayTool`], a seam with the real [`Mdadm`] and, in tests, a
//! recording fake: the kernel of the test machines has no md driver.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use tracing::info;

use super::classify::{Content, PROBE_BYTES, classify};
use super::discover::{HostPaths, mounts, topmost_at};
use super::plan::{Step, Target};
use super::{DiskConfig, DiskError, Filesystem};

/// Creates, assembles and stops our md array.
pub trait ArrayTool: std::fmt::Debug + Send + Sync {
    /// Stops the array at `device` (only ever one of ours, per the plan).
    fn stop(&self, device: &Path) -> Result<(), DiskError>;
    /// Creates a RAID0 array named `name` over `members`, chunk `chunk_kib` KiB.
    fn create(&self, name: &str, members: &[PathBuf], chunk_kib: u64)
    -> Result<PathBuf, DiskError>;
    /// Assembles the existing array `name` from `members`.
    fn assemble(&self, name: &str, members: &[PathBuf]) -> Result<PathBuf, DiskError>;
}

/// `mdadm --create` arguments: named after us (assembled by name after a reboot, never by
/// `/dev/mdN` number), metadata 1.2 (superblock 4 KiB in, where `classify` looks).
pub fn mdadm_create_args(
    dev: &Path,
    name: &str,
    members: &[PathBuf],
    chunk_kib: u64,
) -> Vec<String> {
    let mut args = vec![
        "--create".to_string(),
        dev.join("md").join(name).display().to_string(),
        "--run".into(),
        "--level=0".into(),
        format!("--raid-devices={}", members.len()),
        format!("--chunk={chunk_kib}"),
        "--metadata=1.2".into(),
        format!("--name={name}"),
        "--homehost=any".into(),
    ];
    args.extend(members.iter().map(|m| m.display().to_string()));
    args
}

/// `mdadm --assemble` arguments for our array from its known members.
pub fn mdadm_assemble_args(dev: &Path, name: &str, members: &[PathBuf]) -> Vec<String> {
    let mut args = vec![
        "--assemble".to_string(),
        dev.join("md").join(name).display().to_string(),
        "--run".into(),
    ];
    args.extend(members.iter().map(|m| m.display().to_string()));
    args
}

/// The real md tool.
#[derive(Debug, Clone)]
pub struct Mdadm {
    /// Where `/dev` is.
    pub dev: PathBuf,
}

impl ArrayTool for Mdadm {
    fn stop(&self, device: &Path) -> Result<(), DiskError> {
        run(
            "mdadm",
            &["--stop".to_string(), device.display().to_string()],
        )
    }

    fn create(
        &self,
        name: &str,
        members: &[PathBuf],
        chunk_kib: u64,
    ) -> Result<PathBuf, DiskError> {
        run(
            "mdadm",
            &mdadm_create_args(&self.dev, name, members, chunk_kib),
        )?;
        device_appears(self.dev.join("md").join(name), ARRAY_DEVICE_WAIT)
    }

    fn assemble(&self, name: &str, members: &[PathBuf]) -> Result<PathBuf, DiskError> {
        run("mdadm", &mdadm_assemble_args(&self.dev, name, members))?;
        device_appears(self.dev.join("md").join(name), ARRAY_DEVICE_WAIT)
    }
}

/// How long a started array's `/dev/md/NAME` may take to appear.
const ARRAY_DEVICE_WAIT: Duration = Duration::from_secs(30);

/// Returns `device` once it exists. With udev running, mdadm leaves `/dev/md/NAME` to udev,
/// which makes it asynchronously after mdadm has returned: a busy node was seen to run mkfs on
/// it before it existed. So every caller of the tool gets a device it can open: `udevadm
/// settle` when it can reach udev, then a bounded wait for the link (udev may be out of
/// reach from the container; mdadm makes the link itself when udev is not running at all).
fn device_appears(device: PathBuf, limit: Duration) -> Result<PathBuf, DiskError> {
    if device.exists() {
        return Ok(device);
    }
    // Best effort: absent in the image or without the host's /run/udev it just fails.
    let _ = Command::new("udevadm")
        .args(["settle", &format!("--timeout={}", limit.as_secs())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let started = Instant::now();
    while !device.exists() {
        if started.elapsed() >= limit {
            return Err(DiskError::DeviceMissing {
                device,
                waited: limit,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(device)
}

/// `mkfs` arguments: our label, stripe alignment over `width` devices of `chunk` bytes, no
/// discard (mkfs would otherwise TRIM the whole device, including any region the probe did not
/// read), and `force` only when replacing our own old data.
pub fn mkfs_args(
    fs: Filesystem,
    device: &Path,
    label: &str,
    chunk: u64,
    width: u32,
    force: bool,
) -> (String, Vec<String>) {
    let mut args: Vec<String> = vec!["-q".into(), "-L".into(), label.into()];
    match fs {
        Filesystem::Xfs => {
            args.push("-K".into());
            // Reflinks (the default since xfsprogs 5.1, named so an older or differently
            // configured mkfs cannot leave them out): files taken from dfdaemon are cloned into
            // inodes of the agent's own instead of copied.
            args.push("-m".into());
            args.push("reflink=1".into());
            if force {
                args.push("-f".into());
            }
            if width > 1 {
                args.push("-d".into());
                args.push(format!("su={}k,sw={width}", chunk / 1024));
            }
            args.push(device.display().to_string());
            ("mkfs.xfs".into(), args)
        }
        Filesystem::Ext4 => {
            // No reserved blocks on a cache; stride in 4 KiB blocks.
            args.extend(["-m".into(), "0".into()]);
            if force {
                args.push("-F".into());
            }
            let stride = chunk / 4096;
            args.push("-E".into());
            args.push(if width > 1 {
                format!(
                    "nodiscard,stride={stride},stripe_width={}",
                    stride * u64::from(width)
                )
            } else {
                "nodiscard".into()
            });
            args.push(device.display().to_string());
            ("mkfs.ext4".into(), args)
        }
    }
}

/// Runs a command, logging its argv; a spawn failure and a non-zero exit are separate errors,
/// the latter with the captured stderr.
fn run(program: &str, args: &[String]) -> Result<(), DiskError> {
    let argv = format!("{program} {}", args.join(" "));
    info!(argv = %argv, "running {argv}");
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DiskError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        info!(argv = %argv, status = %output.status, "{argv} failed: {stderr}");
        return Err(DiskError::CommandFailed {
            argv,
            status: output.status.to_string(),
            stderr,
        });
    }
    info!(argv = %argv, "{argv} succeeded");
    Ok(())
}

/// Evenly spread samples read between the first and last MiB when probing a device.
pub const PROBE_SAMPLES: u64 = 256;
/// Bytes in each sample.
const SAMPLE_BYTES: u64 = 64 << 10;
/// ext4's block group with 4 KiB blocks: backup superblocks, group descriptors, bitmaps and
/// inode tables start on its multiples.
const EXT4_GROUP: u64 = 128 << 20;

/// Where `probe` samples a device of `size` bytes beyond its first and last MiB: every
/// sixteenth of the device (xfs allocation groups start there for 4, 8 or 16 groups; a sample
/// covers the AG header even when the group size was rounded down) and [`PROBE_SAMPLES`] evenly
/// spaced offsets on ext4 block-group boundaries (about 17 MiB read in all, whatever the size).
pub fn sample_offsets(size: u64) -> Vec<u64> {
    let (start, end) = (PROBE_BYTES as u64, size.saturating_sub(PROBE_BYTES as u64));
    if end <= start + SAMPLE_BYTES {
        return Vec::new();
    }
    let mut offsets: Vec<u64> = (1..16u64)
        .map(|k| (size / 16 * k).saturating_sub(SAMPLE_BYTES / 2) / 4096 * 4096)
        .collect();
    let stride = (end - start)
        .div_ceil(PROBE_SAMPLES)
        .div_ceil(EXT4_GROUP)
        .max(1)
        * EXT4_GROUP;
    offsets.extend((1..).map(|k| k * stride).take_while(|&at| at < end));
    offsets.retain(|&at| at >= start && at + SAMPLE_BYTES <= end);
    offsets.sort_unstable();
    offsets.dedup();
    offsets
}

/// Reads a device (read-only): its first and last MiB, where every signature we know lives,
/// then the [`sample_offsets`] between them, so a device whose signatures were wiped but whose
/// filesystem metadata remains is not called blank. What no sample sees is still never
/// discarded: mkfs runs without discard.
pub fn probe(device: &Path, size: u64, label: &str) -> Result<Content, DiskError> {
    use std::os::unix::fs::FileExt;
    let err = |source| DiskError::Probe {
        device: device.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(device).map_err(err)?;
    let size = if size == 0 {
        // A device node's metadata length is 0; seek to the end instead.
        use std::io::Seek;
        let mut f = &file;
        f.seek(std::io::SeekFrom::End(0)).map_err(err)?
    } else {
        size
    };
    let window = usize::try_from(size.min(PROBE_BYTES as u64)).unwrap_or(PROBE_BYTES);
    let mut head = vec![0u8; window];
    file.read_exact_at(&mut head, 0).map_err(err)?;
    let mut tail = vec![0u8; window];
    file.read_exact_at(&mut tail, size - window as u64)
        .map_err(err)?;
    let content = classify(&head, &tail, label);
    if content != Content::Blank {
        return Ok(content);
    }
    let mut sample = vec![0u8; usize::try_from(SAMPLE_BYTES).unwrap_or(1 << 16)];
    for at in sample_offsets(size) {
        file.read_exact_at(&mut sample, at).map_err(err)?;
        if let Some(pos) = sample.iter().position(|&b| b != 0) {
            return Ok(Content::Foreign {
                what: format!(
                    "data {} into the device (its first and last MiB are zero)",
                    crate::config::human_bytes(at + pos as u64)
                ),
            });
        }
    }
    Ok(Content::Blank)
}

fn devno_of(device: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device).ok()?.rdev();
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

/// Carries out `steps`; returns the device mounted at the cache root.
pub fn execute(
    config: &DiskConfig,
    steps: &[Step],
    arrays: &dyn ArrayTool,
) -> Result<String, DiskError> {
    let mut array: Option<PathBuf> = None;
    let resolve = |t: &Target, array: &Option<PathBuf>| -> Result<PathBuf, DiskError> {
        match t {
            Target::Device(p) => Ok(p.clone()),
            Target::Array => array
                .clone()
                .ok_or(DiskError::Internal("no array before its use".into())),
        }
    };
    let mut mounted = String::new();
    for step in steps {
        info!(step = %step, "disk: {step}");
        match step {
            Step::AlreadyMounted { device } => mounted.clone_from(device),
            Step::UseArray { device } => array = Some(device.clone()),
            Step::StopArray { device } => arrays.stop(device)?,
            Step::AssembleArray { members, .. } => {
                array = Some(arrays.assemble(&config.label, members)?);
            }
            Step::CreateArray { members, .. } => {
                // Re-check right before writing: a device that became foreign since the plan
                // stops everything.
                for m in members {
                    if let Content::Foreign { what } = probe(m, 0, &config.label)? {
                        return Err(DiskError::Refused {
                            device: m.clone(),
                            what,
                        });
                    }
                }
                let chunk_kib = config.raid_chunk / 1024;
                array = Some(arrays.create(&config.label, members, chunk_kib)?);
            }
            Step::EnsureFilesystem {
                target,
                may_overwrite,
                stripe_width,
            } => {
                let device = resolve(target, &array)?;
                match probe(&device, 0, &config.label)? {
                    Content::OurFilesystem { fstype } if fstype == config.filesystem.as_str() => {
                        info!(device = %device.display(), "{} already has our {fstype} filesystem: kept", device.display());
                    }
                    Content::Blank => make_fs(config, &device, *stripe_width, false)?,
                    other if *may_overwrite => {
                        info!(device = %device.display(), "replacing our own old data on {} ({other:?})", device.display());
                        make_fs(config, &device, *stripe_width, true)?;
                    }
                    Content::Foreign { what } => return Err(DiskError::Refused { device, what }),
                    other => {
                        return Err(DiskError::Refused {
                            device,
                            what: format!(
                                "{other:?}, not the configured {}",
                                config.filesystem.as_str()
                            ),
                        });
                    }
                }
            }
            Step::MakeFilesystem {
                target,
                stripe_width,
            } => {
                // The array was created by the step before over devices re-checked right
                // before it: whatever shows through is our own old data.
                let device = resolve(target, &array)?;
                make_fs(config, &device, *stripe_width, true)?;
            }
            Step::Mount { target } => {
                let device = resolve(target, &array)?;
                mount_cache(config, &device)?;
                mounted = device.display().to_string();
            }
            Step::WaitForMembers { .. } => {
                // `disk::apply` waits and decides again; a plan that still waits is not run.
                return Err(DiskError::Internal(
                    "a plan waiting for array members was carried out".into(),
                ));
            }
        }
    }
    Ok(mounted)
}

fn make_fs(config: &DiskConfig, device: &Path, width: u32, force: bool) -> Result<(), DiskError> {
    let (program, args) = mkfs_args(
        config.filesystem,
        device,
        &config.label,
        config.raid_chunk,
        width,
        force,
    );
    run(&program, &args)
}

/// Mounts our filesystem at the cache root (noatime, optional discard) and makes the mount
/// shared so pods with `mountPropagation: HostToContainer` see it. Skips when it is already
/// mounted there from this device; mounts over a bind mount of a directory (the pod's
/// `hostPath` volume), so the mount propagates through it to the host.
fn mount_cache(config: &DiskConfig, device: &Path) -> Result<(), DiskError> {
    let target = &config.mount_point();
    let private = config.private_mount.is_some();
    if let Some(m) = topmost_at(mounts(&config.host)?, target) {
        if Some(&m.devno) == devno_of(device).as_ref() && !m.is_directory_bind() {
            info!(target = %target.display(), "{} is already mounted at {}", device.display(), target.display());
            return Ok(());
        }
        if !m.is_directory_bind() {
            return Err(DiskError::MountpointBusy {
                target: target.clone(),
                source_device: m.source,
                fstype: m.fstype,
            });
        }
        if !private {
            info!(target = %target.display(), "{} is a bind mount of {} on {}: mounting over it", target.display(), m.root, m.source);
        }
    }
    std::fs::create_dir_all(target).map_err(|source| DiskError::Probe {
        device: target.clone(),
        source,
    })?;
    let data = config.discard.then_some("discard");
    info!(device = %device.display(), target = %target.display(), "mount -t {} -o noatime{} {} {}", config.filesystem.as_str(), if config.discard { ",discard" } else { "" }, device.display(), target.display());
    mount(
        Some(device),
        target.as_path(),
        Some(config.filesystem.as_str()),
        MsFlags::MS_NOATIME,
        data,
    )
    .map_err(|source| DiskError::Mount {
        device: device.to_path_buf(),
        target: target.clone(),
        source,
    })?;
    if private {
        // The agent's own mount: the consumers get a read-only view of it (`view::expose`).
        return Ok(());
    }
    // Shared propagation: pods mounting the cache root with HostToContainer see this mount.
    mount(
        None::<&str>,
        target.as_path(),
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|source| DiskError::Mount {
        device: device.to_path_buf(),
        target: target.clone(),
        source,
    })
}

/// Finds what is mounted at the cache root and classifies its device.
pub fn at_target(
    config: &DiskConfig,
) -> Result<Option<(super::discover::Mount, Option<Content>)>, DiskError> {
    let found = topmost_at(mounts(&config.host)?, &config.target);
    Ok(found.map(|m| {
        let content = probe(Path::new(&m.source), 0, &config.label).ok();
        (m, content)
    }))
}

/// The default host paths (kept here so only this module names `/sys`, `/dev` and `/proc`).
pub fn host_defaults() -> HostPaths {
    HostPaths::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdadm_invocations_name_the_array_and_never_a_number() {
        let members = [PathBuf::from("/dev/nvme1n1"), PathBuf::from("/dev/nvme2n1")];
        assert_eq!(
            mdadm_create_args(Path::new("/dev"), "modelcache", &members, 512).join(" "),
            "--create /dev/md/modelcache --run --level=0 --raid-devices=2 --chunk=512 --metadata=1.2 --name=modelcache --homehost=any /dev/nvme1n1 /dev/nvme2n1"
        );
        assert_eq!(
            mdadm_assemble_args(Path::new("/dev"), "modelcache", &members).join(" "),
            "--assemble /dev/md/modelcache --run /dev/nvme1n1 /dev/nvme2n1"
        );
    }

    #[test]
    fn samples_cover_ext4_groups_and_xfs_sixteenths_at_a_bounded_cost() {
        let mib = 1u64 << 20;
        let small = sample_offsets(320 * mib);
        assert!(
            small.contains(&(128 * mib)) && small.contains(&(256 * mib)),
            "{small:?}"
        );
        assert!(
            small.contains(&(80 * mib - 32 * 1024)),
            "xfs AG 1 of 4: {small:?}"
        );
        for size in [320 * mib, 960_197_124_096, 7_680_000_000_000] {
            let offsets = sample_offsets(size);
            assert!(offsets.len() <= 16 + 256, "{}", offsets.len());
            assert!(
                offsets
                    .iter()
                    .all(|&at| at >= mib && at + SAMPLE_BYTES <= size - mib),
                "{size}"
            );
        }
        let nc96 = sample_offsets(960_197_124_096);
        assert!(nc96.len() > 200, "{}", nc96.len());
        assert!(sample_offsets(2 * mib).is_empty());
    }

    #[test]
    fn mkfs_is_stripe_aware_and_forces_only_when_told() {
        let (p, a) = mkfs_args(
            Filesystem::Xfs,
            Path::new("/dev/md/modelcache"),
            "modelcache",
            512 << 10,
            4,
            false,
        );
        assert_eq!(
            format!("{p} {}", a.join(" ")),
            "mkfs.xfs -q -L modelcache -K -m reflink=1 -d su=512k,sw=4 /dev/md/modelcache"
        );
        let (p, a) = mkfs_args(
            Filesystem::Ext4,
            Path::new("/dev/nvme1n1"),
            "modelcache",
            512 << 10,
            1,
            true,
        );
        assert_eq!(
            format!("{p} {}", a.join(" ")),
            "mkfs.ext4 -q -L modelcache -m 0 -F -E nodiscard /dev/nvme1n1"
        );
        let (_, a) = mkfs_args(
            Filesystem::Ext4,
            Path::new("/dev/md0"),
            "modelcache",
            512 << 10,
            4,
            false,
        );
        assert!(
            a.contains(&"nodiscard,stride=128,stripe_width=512".to_string()),
            "{a:?}"
        );
    }

    /// A device that udev makes a moment after mdadm returns is waited for; one that never
    /// comes is an error naming it, after the limit.
    #[test]
    fn an_array_device_is_waited_for_within_a_limit() {
        let dir = tempfile::tempdir().unwrap();
        let late = dir.path().join("late");
        let maker = {
            let late = late.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                std::fs::write(&late, b"").unwrap();
            })
        };
        assert_eq!(
            device_appears(late.clone(), Duration::from_secs(20)).unwrap(),
            late
        );
        maker.join().unwrap();
        let never = dir.path().join("never");
        let err = device_appears(never, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
    }
}
