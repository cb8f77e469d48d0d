//! Running out of space, on small loop-device filesystems (root only).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::{Fault, FaultProxy};
use crate::support::*;

/// An ext4 filesystem of `mib` MiB on a loop device, mounted on a temp dir; undone on drop.
struct LoopFs {
    mount: tempfile::TempDir,
    _device: LoopDevice,
}

impl LoopFs {
    fn new(mib: u64) -> Option<Self> {
        let device = LoopDevice::new(mib)?;
        let mount = tempfile::tempdir().unwrap();
        let ok = Command::new("mkfs.ext4")
            .arg("-q")
            .arg("-F")
            .arg(&device.path)
            .status()
            .unwrap()
            .success()
            && Command::new("mount")
                .arg(&device.path)
                .arg(mount.path())
                .status()
                .unwrap()
                .success();
        assert!(ok, "mkfs/mount of {} failed", device.path.display());
        Some(Self {
            mount,
            _device: device,
        })
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

fn no_model_published(cache: &Path) {
    assert!(!cache.join("models/gpt-oss-120b").exists());
    let store = cache.join("store/gpt-oss-120b");
    assert!(!store.exists() || std::fs::read_dir(&store).unwrap().next().is_none());
}

#[test]
fn a_filesystem_too_small_for_the_model_fails_before_downloading() {
    let Some(fs) = LoopFs::new(24) else { return };
    let source = small_model(3 << 20, 5); // about 45 MiB selected
    let url = format!("file://{}", source.path().display());
    let mut cmd = prefetch_cmd(None, &url, fs.path(), &["--chunk-size", "1MiB"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not enough space"),
        "{}",
        stderr(&out)
    );
    // The check ran before the first byte: no partial file was created.
    assert!(!fs.path().join("staging/gpt-oss-120b/files").exists());
    no_model_published(fs.path());
}

#[test]
fn a_disk_filled_during_the_run_fails_cleanly_with_nothing_published() {
    let Some(az) = azurite() else { return };
    let Some(fs) = LoopFs::new(64) else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 3 << 20, true));
    let proxy = FaultProxy::start(az.port);
    proxy.add(
        "gpt-oss-120b/model-",
        Fault::Delay(Duration::from_millis(200)),
        None,
    );
    let slow = ["--chunk-size", "1MiB", "--concurrency", "1"];
    let mut cmd = prefetch_cmd(Some(&proxy.endpoint()), &model.url(), fs.path(), &slow);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Once the download has started (past the free-space check), take every free block.
    let files = fs.path().join("staging/gpt-oss-120b/files");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files.exists() {
        assert!(Instant::now() < deadline, "the download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let filler: PathBuf = fs.path().join("filler");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if=/dev/zero of={} bs=1M 2>/dev/null",
            filler.display()
        ))
        .status()
        .unwrap();
    assert!(!status.success(), "dd should stop at a full disk");
    let out = wait_with_limit(child, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.to_lowercase().contains("no space left"), "{err}");
    no_model_published(fs.path());
}
