//! Disk setup on real loop devices (root): formatting, mounting, idempotence, refusing foreign
//! data; and the RAID path through the array seam with a recording fake, since this kernel has
//! no md driver (mkfs and mount still run for real on a loop device standing in for the array).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use modelcache::disk::apply::{ArrayTool, mdadm_assemble_args, mdadm_create_args};
use modelcache::disk::discover::{HostPaths, Selector};
use modelcache::disk::plan::Step;
use modelcache::disk::{DiskConfig, DiskError, Filesystem};

use crate::support::*;

pub(crate) fn have_xfs() -> bool {
    let ok = Command::new("sh")
        .args(["-c", "command -v mkfs.xfs"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip_or_fail("mkfs.xfs is missing (the test command installs xfsprogs)");
    }
    ok
}

/// The cache root: unmounted (lazily, to be safe) on drop.
pub(crate) struct Target(tempfile::TempDir);

impl Target {
    pub(crate) fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
    pub(crate) fn mount_line(&self) -> Option<String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let target = self.path().display().to_string();
        // The topmost mount there (a filesystem mounted over a bind is listed after it).
        text.lines()
            .rfind(|l| l.split_whitespace().nth(4) == Some(target.as_str()))
            .map(str::to_string)
    }
    fn unmount(&self) {
        assert!(
            Command::new("umount")
                .arg(self.path())
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        while self.mount_line().is_some() {
            if !Command::new("umount")
                .arg("-l")
                .arg(self.path())
                .status()
                .is_ok_and(|s| s.success())
            {
                break;
            }
        }
    }
}

fn disk_cmd(action: &str, target: &Path, devices: &[&LoopDevice]) -> std::process::Command {
    let list: Vec<String> = devices
        .iter()
        .map(|d| d.path.display().to_string())
        .collect();
    let mut cmd = modelcache();
    cmd.args(["disk", action, "--set", "disk.enabled=true"])
        .arg("--set")
        .arg(format!("cache_root={}", target.display()))
        .arg("--set")
        .arg(format!("disk.devices={}", list.join(",")));
    cmd
}

#[test]
fn a_blank_device_is_formatted_and_mounted_once_and_its_data_survives_reapply() {
    if !have_xfs() {
        return;
    }
    let Some(dev) = LoopDevice::new(320) else {
        return;
    };
    let target = Target::new();
    let before = dev.ends_hash();

    let plan = run(
        &mut disk_cmd("plan", target.path(), &[&dev]),
        Duration::from_secs(60),
    );
    assert!(plan.status.success(), "{}", stderr(&plan));
    let text = stdout(&plan);
    assert!(
        text.contains("blank") && text.contains("make our filesystem"),
        "{text}"
    );
    assert_eq!(dev.ends_hash(), before, "plan changes nothing");
    assert!(target.mount_line().is_none());

    let apply = run(
        &mut disk_cmd("apply", target.path(), &[&dev]),
        Duration::from_secs(120),
    );
    assert!(apply.status.success(), "{}", stderr(&apply));
    assert!(
        stderr(&apply).contains("mkfs.xfs -q -L modelcache"),
        "every command is logged: {}",
        stderr(&apply)
    );
    let line = target.mount_line().expect("mounted");
    assert!(
        line.contains(" - xfs ") && line.contains("noatime") && line.contains("shared:"),
        "{line}"
    );
    std::fs::write(target.path().join("kept.txt"), "still here").unwrap();

    // Again while mounted: nothing to do.
    let again = run(
        &mut disk_cmd("apply", target.path(), &[&dev]),
        Duration::from_secs(60),
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("nothing to do"),
        "{}",
        stdout(&again)
    );
    assert!(!stderr(&again).contains("mkfs"), "{}", stderr(&again));

    // After an unmount (a reboot that kept the disk): mounted again, not formatted.
    target.unmount();
    let reboot = run(
        &mut disk_cmd("apply", target.path(), &[&dev]),
        Duration::from_secs(60),
    );
    assert!(reboot.status.success(), "{}", stderr(&reboot));
    assert!(
        stdout(&reboot).contains("ours (xfs filesystem)"),
        "{}",
        stdout(&reboot)
    );
    assert!(!stderr(&reboot).contains("mkfs"), "{}", stderr(&reboot));
    assert_eq!(
        std::fs::read_to_string(target.path().join("kept.txt")).unwrap(),
        "still here"
    );
}

/// Writes a protective MBR and a GPT header, as a partitioning tool would.
fn write_gpt(dev: &LoopDevice) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.path)
        .unwrap();
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0xEE;
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    f.write_all_at(&mbr, 0).unwrap();
    let mut header = vec![0u8; 92];
    header[..8].copy_from_slice(b"EFI PART");
    header[8..12].copy_from_slice(&[0, 0, 1, 0]);
    f.write_all_at(&header, 512).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn foreign_devices_are_refused_and_left_byte_identical() {
    if !have_xfs() {
        return;
    }
    let (Some(ext4), Some(gpt), Some(xfs), Some(blank)) = (
        LoopDevice::new(64),
        LoopDevice::new(64),
        LoopDevice::new(320),
        LoopDevice::new(320),
    ) else {
        return;
    };
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "data"])
            .arg(&ext4.path)
            .status()
            .unwrap()
            .success()
    );
    write_gpt(&gpt);
    assert!(
        Command::new("mkfs.xfs")
            .args(["-q", "-f", "-L", "elsewhere"])
            .arg(&xfs.path)
            .status()
            .unwrap()
            .success()
    );
    let foreign = [&ext4, &gpt, &xfs];
    let hashes: Vec<String> = foreign.iter().map(|d| d.ends_hash()).collect();

    // Listed foreign devices, alone or beside a blank one: an error naming each, never a
    // silently smaller array, and nothing written anywhere.
    let target = Target::new();
    let blank_hash = blank.ends_hash();
    for listed in [&foreign[..], &[&ext4, &gpt, &xfs, &blank]] {
        let out = run(
            &mut disk_cmd("apply", target.path(), listed),
            Duration::from_secs(60),
        );
        assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
        let err = stderr(&out);
        for needle in [
            "not usable",
            "labelled \"data\"",
            "GPT partition table",
            "labelled \"elsewhere\"",
        ] {
            assert!(err.contains(needle), "missing {needle}: {err}");
        }
        assert!(
            !err.contains(&format!("{} ", blank.path.display())),
            "{err}"
        );
        assert!(target.mount_line().is_none());
    }
    assert_eq!(blank.ends_hash(), blank_hash);

    // A listed device that does not exist: named.
    let mut cmd = disk_cmd("apply", target.path(), &[&blank]);
    cmd.args(["--set", "disk.devices=/dev/loop-none"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    assert!(stderr(&out).contains("/dev/loop-none"), "{}", stderr(&out));

    // Only the blank one listed: used; the others never touched.
    let out = run(
        &mut disk_cmd("apply", target.path(), &[&blank]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line = target.mount_line().expect("mounted");
    assert!(line.contains(&blank.path.display().to_string()), "{line}");
    let after: Vec<String> = foreign.iter().map(|d| d.ends_hash()).collect();
    assert_eq!(after, hashes, "foreign devices are byte-identical");
}

/// Records the mdadm invocations the real tool would run and plays their effect: members get
/// an md 1.2 superblock naming the array, and a loop device stands in for `/dev/md/NAME`.
#[derive(Debug)]
struct RecordedMdadm {
    stand_in: PathBuf,
    calls: Mutex<Vec<String>>,
}

impl RecordedMdadm {
    fn write_superblocks(members: &[PathBuf], name: &str) {
        use std::os::unix::fs::FileExt;
        let mut sb = vec![0u8; 256];
        sb[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
        sb[4..8].copy_from_slice(&1u32.to_le_bytes());
        sb[16..32].copy_from_slice(&[0x5a; 16]);
        let full = format!("any:{name}");
        sb[32..32 + full.len()].copy_from_slice(full.as_bytes());
        sb[92..96].copy_from_slice(&u32::try_from(members.len()).unwrap().to_le_bytes());
        for m in members {
            let f = std::fs::OpenOptions::new().write(true).open(m).unwrap();
            f.write_all_at(&sb, 4096).unwrap();
            f.sync_all().unwrap();
        }
    }
}

impl ArrayTool for RecordedMdadm {
    fn stop(&self, device: &Path) -> Result<(), DiskError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("mdadm --stop {}", device.display()));
        Ok(())
    }
    fn create(
        &self,
        name: &str,
        members: &[PathBuf],
        chunk_kib: u64,
    ) -> Result<PathBuf, DiskError> {
        self.calls.lock().unwrap().push(format!(
            "mdadm {}",
            mdadm_create_args(Path::new("/dev"), name, members, chunk_kib).join(" ")
        ));
        Self::write_superblocks(members, name);
        Ok(self.stand_in.clone())
    }
    fn assemble(&self, name: &str, members: &[PathBuf]) -> Result<PathBuf, DiskError> {
        self.calls.lock().unwrap().push(format!(
            "mdadm {}",
            mdadm_assemble_args(Path::new("/dev"), name, members).join(" ")
        ));
        Ok(self.stand_in.clone())
    }
}

fn kinds(steps: &[Step]) -> Vec<&'static str> {
    steps.iter().map(Step::kind).collect()
}

#[test]
fn raid0_is_created_then_assembled_after_a_reboot_and_recreated_when_a_member_is_replaced() {
    if !have_xfs() {
        return;
    }
    let (Some(a), Some(b), Some(c), Some(array)) = (
        LoopDevice::new(64),
        LoopDevice::new(64),
        LoopDevice::new(64),
        LoopDevice::new(1024),
    ) else {
        return;
    };
    let target = Target::new();
    // In the order discovery lists them: by kernel name (so loop10 sorts before loop9).
    let mut members: Vec<PathBuf> = [&a, &b, &c].iter().map(|d| d.path.clone()).collect();
    members.sort_by_key(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let config = DiskConfig {
        enabled: true,
        selector: Selector {
            models: vec![],
            devices: members.iter().map(|p| p.display().to_string()).collect(),
        },
        filesystem: Filesystem::Xfs,
        raid_chunk: 512 << 10,
        label: "modelcache".into(),
        discard: false,
        host: HostPaths::default(),
        target: target.path().to_path_buf(),
        private_mount: None,
        member_wait: std::time::Duration::from_secs(120),
    };
    let md = RecordedMdadm {
        stand_in: array.path.clone(),
        calls: Mutex::default(),
    };
    let list = members
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");

    // First boot: three blank disks → create, mkfs (stripe-aware) and mount.
    let report = modelcache::disk::apply(&config, &md, &|| false).unwrap();
    assert_eq!(kinds(&report.plan.steps), ["create", "mkfs", "mount"]);
    assert_eq!(
        md.calls.lock().unwrap().clone(),
        [format!(
            "mdadm --create /dev/md/modelcache --run --level=0 --raid-devices=3 --chunk=512 --metadata=1.2 --name=modelcache --homehost=any {list}"
        )]
    );
    assert!(
        target
            .mount_line()
            .unwrap()
            .contains(&array.path.display().to_string())
    );
    std::fs::write(target.path().join("model.bin"), "weights").unwrap();

    // Reboot that kept the disks: the array is not running; its members are ours → assemble.
    target.unmount();
    md.calls.lock().unwrap().clear();
    let report = modelcache::disk::apply(&config, &md, &|| false).unwrap();
    assert_eq!(
        kinds(&report.plan.steps),
        ["assemble", "filesystem", "mount"]
    );
    assert_eq!(
        md.calls.lock().unwrap().clone(),
        [format!("mdadm --assemble /dev/md/modelcache --run {list}")]
    );
    assert_eq!(
        std::fs::read_to_string(target.path().join("model.bin")).unwrap(),
        "weights",
        "kept, not reformatted"
    );

    // One disk replaced by a blank one: every member is ours or blank → a new array, said so.
    target.unmount();
    md.calls.lock().unwrap().clear();
    assert!(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=64", "status=none"])
            .arg(format!("of={}", b.path.display()))
            .status()
            .unwrap()
            .success()
    );
    let plan = modelcache::disk::plan(&config, false).unwrap();
    assert_eq!(kinds(&plan.steps), ["create", "mkfs", "mount"]);
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("old cache is dropped")),
        "{:?}",
        plan.notes
    );
}

#[test]
fn the_agent_sets_up_its_disk_at_start_and_reports_it() {
    if !have_xfs() {
        return;
    }
    let (Some(blank), Some(foreign)) = (LoopDevice::new(320), LoopDevice::new(64)) else {
        return;
    };
    write_gpt(&foreign);
    let dir = tempfile::tempdir().unwrap();
    let endpoint = "http://127.0.0.1:9"; // no source is contacted: no model is configured
    let config = |target: &Path, device: &LoopDevice| {
        format!(
            "cache_root = \"{}\"\n[listen]\nread = \"127.0.0.1:0\"\n[disk]\nenabled = true\ndevices = [\"{}\"]\n[[models]]\nname = \"m\"\nsource = \"az://c/m\"\n",
            target.display(),
            device.path.display()
        )
    };

    // Only a foreign device: the agent serves, says why it is not ready, and writes nothing.
    let refused = Target::new();
    let hash = foreign.ends_hash();
    let agent =
        crate::agent::Agent::start(dir.path(), &config(refused.path(), &foreign), endpoint, &[]);
    let (status, body) = crate::agent::http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("not usable") && body.contains("GPT"),
        "{body}"
    );
    let (status, body) = crate::agent::http(&agent.read, "GET", "/v1/disk", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(refused.mount_line().is_none());
    assert!(
        !refused.path().join("models").exists(),
        "nothing is written to the OS disk"
    );
    assert_eq!(foreign.ends_hash(), hash);
    drop(agent);

    // A blank device: formatted and mounted before anything else; /v1/disk shows the plan.
    let target = Target::new();
    let agent =
        crate::agent::Agent::start(dir.path(), &config(target.path(), &blank), endpoint, &[]);
    let (status, body) = crate::agent::http(&agent.read, "GET", "/v1/disk", &[], "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("create_array") || body.contains("ensure_filesystem"),
        "{body}"
    );
    assert!(target.mount_line().is_some_and(|l| l.contains(" - xfs ")));
    assert!(
        target.path().join("models").is_dir(),
        "the cache layout lives on the new filesystem"
    );
    drop(agent);
}

#[test]
fn a_filesystem_whose_ends_were_zeroed_is_not_blank_and_is_left_as_it_was() {
    if !have_xfs() {
        return;
    }
    let Some(dev) = LoopDevice::new(320) else {
        return;
    };
    // Someone's ext4 with a file, then its first and last MiB zeroed (as an over-eager wipe of
    // its signatures would leave it): the backup superblock at 128 MiB and the metadata of
    // every block group remain.
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "data"])
            .arg(&dev.path)
            .status()
            .unwrap()
            .success()
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev.path)
            .unwrap();
        let zeros = vec![0u8; 1 << 20];
        f.write_all_at(&zeros, 0).unwrap();
        f.write_all_at(&zeros, (320 << 20) - (1 << 20)).unwrap();
        f.sync_all().unwrap();
    }
    let whole = || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&dev.path).unwrap())
            .unwrap();
        h.finalize().to_hex().to_string()
    };
    let before = whole();
    let target = Target::new();
    let out = run(
        &mut disk_cmd("apply", target.path(), &[&dev]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("into the device (its first and last MiB are zero)"),
        "{}",
        stderr(&out)
    );
    assert!(target.mount_line().is_none());
    assert_eq!(whole(), before, "every byte left as it was");
}

#[test]
fn disk_apply_with_disk_setup_disabled_does_nothing_and_says_so() {
    let target = Target::new();
    let mut cmd = modelcache();
    cmd.args(["disk", "apply", "--set", "disk.enabled=false"])
        .arg("--set")
        .arg(format!("cache_root={}", target.path().display()));
    let out = run(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("disk setup is disabled (disk.enabled = false): nothing was done"),
        "{}",
        stdout(&out)
    );
    assert!(target.mount_line().is_none());
}
