//! The DaemonSet's mount shape on loop devices: the cache root inside the agent's mount
//! namespace is a bind mount of the host path (`hostPath`, `mountPropagation: Bidirectional`),
//! and a vLLM pod mounts the same host path read-only with `HostToContainer`. The agent's disk
//! setup must mount over that bind so the filesystem propagates to the host and on to the
//! vLLM pod, and must still refuse a cache root where someone else's filesystem is mounted.
//!
//! Each scenario runs inside `unshare -m` (the "node"), so nothing leaks into this machine's
//! own mounts; the pods are further mount namespaces created from it as a container runtime
//! does (their mounts start as copies of the node's, shared ones stay peers).

use std::process::Command;
use std::time::Duration;

use crate::disk::have_xfs;
use crate::support::*;

/// The node, the vLLM pod and the agent pod, as a script: prints `KEY=VALUE` lines to check.
const PODS: &str = r#"
set -u
# The node: the host path is a shared mount, as kubelet requires for Bidirectional volumes.
mount --bind "$HOST" "$HOST"
mount --make-shared "$HOST"
echo 'left by the node before any disk' > "$HOST/on-the-os-disk.txt"

# A vLLM pod scheduled before the disk is mounted: the host path, read-only, HostToContainer.
unshare -m --propagation unchanged sh -c '
  mount --bind "$HOST" "$POD" && mount -o remount,bind,ro "$POD" && mount --make-rslave "$POD" &&
  touch "$STATE/vllm-ready" && exec sleep 300' &
VLLM=$!
while [ ! -e "$STATE/vllm-ready" ]; do
  kill -0 $VLLM 2>/dev/null || { echo "VLLM_FAILED=1"; exit 1; }
  sleep 0.05
done

# The agent's pod: the host path at the cache root (an rbind, as runtimes bind volumes), rshared.
unshare -m --propagation unchanged sh -c '
  mount --rbind "$HOST" "$CACHE" && mount --make-rshared "$CACHE" &&
  exec "$MC" disk apply --config "$CONFIG"' > "$STATE/apply.out" 2> "$STATE/apply.err"
echo "APPLY_EXIT=$?"

# What the node sees at the host path, and what the vLLM pod sees.
echo "NODE_FS=$(stat -f -c %T "$HOST")"
echo 'written on the node after the mount' > "$HOST/on-the-cache.txt"
echo "VLLM_FS=$(nsenter -t $VLLM -m stat -f -c %T "$POD")"
echo "VLLM_READS=$(nsenter -t $VLLM -m cat "$POD/on-the-cache.txt")"
nsenter -t $VLLM -m sh -c "echo x > '$POD/vllm-write.txt'" 2>/dev/null && echo "VLLM_WROTE=1" || echo "VLLM_WROTE=0"

# A restarted agent container: a new mount namespace whose rbind of the host path carries the
# filesystem mounted over it; apply has nothing to do.
unshare -m --propagation unchanged sh -c '
  mount --rbind "$HOST" "$CACHE" && mount --make-rshared "$CACHE" &&
  exec "$MC" disk apply --config "$CONFIG"' > "$STATE/again.out" 2>&1
echo "AGAIN_EXIT=$?"
kill $VLLM

# Beneath the mount, the host directory is as the node left it.
umount "$HOST"
umount "$HOST" 2>/dev/null
echo "UNDERNEATH=$(cat "$HOST/on-the-os-disk.txt")"
"#;

/// Someone else's filesystem mounted whole at the host path: the pod's bind shows its root.
const FOREIGN: &str = r#"
set -u
mount -t tmpfs -o size=8m someones-data "$HOST"
mount --make-shared "$HOST"
echo precious > "$HOST/data.txt"
unshare -m --propagation unchanged sh -c '
  mount --rbind "$HOST" "$CACHE" && mount --make-rshared "$CACHE" &&
  exec "$MC" disk apply --config "$CONFIG"' > "$STATE/apply.out" 2> "$STATE/apply.err"
echo "APPLY_EXIT=$?"
echo "NODE_FS=$(stat -f -c %T "$HOST")"
echo "DATA=$(cat "$HOST/data.txt")"
"#;

struct Scenario {
    dir: tempfile::TempDir,
    lines: Vec<(String, String)>,
}

impl Scenario {
    fn run(script: &str, device: &LoopDevice) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["host", "cache", "pod", "state"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "cache_root = \"{}\"\n[disk]\nenabled = true\ndevices = [\"{}\"]\n",
                dir.path().join("cache").display(),
                device.path.display()
            ),
        )
        .unwrap();
        let out = run(
            Command::new("unshare")
                .args(["-m", "bash", "-c", script])
                .env("MC", bin())
                .env("CONFIG", &config)
                .env("HOST", dir.path().join("host"))
                .env("CACHE", dir.path().join("cache"))
                .env("POD", dir.path().join("pod"))
                .env("STATE", dir.path().join("state")),
            Duration::from_secs(180),
        );
        let lines = stdout(&out)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let scenario = Self { dir, lines };
        assert!(
            out.status.success(),
            "{}\n{}\napply: {}",
            stdout(&out),
            stderr(&out),
            scenario.file("apply.err")
        );
        scenario
    }

    fn get(&self, key: &str) -> &str {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("state").join(name)).unwrap_or_default()
    }
}

fn namespaces_available() -> bool {
    let ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail("mount namespaces need root and unshare(1)");
    }
    ok
}

#[test]
fn disk_setup_in_the_agent_pod_mounts_over_the_hostpath_bind_and_reaches_the_vllm_pod() {
    if !have_xfs() || !namespaces_available() {
        return;
    }
    let Some(nvme) = LoopDevice::new(320) else {
        return;
    };
    let s = Scenario::run(PODS, &nvme);
    assert_eq!(
        s.get("APPLY_EXIT"),
        "0",
        "{}{}",
        s.file("apply.out"),
        s.file("apply.err")
    );
    assert!(
        s.file("apply.out").contains("bind mount of the directory"),
        "the plan says why it mounts over the cache root: {}",
        s.file("apply.out")
    );
    assert_eq!(s.get("NODE_FS"), "xfs", "the mount propagated to the host");
    assert_eq!(s.get("VLLM_FS"), "xfs", "and on to the vLLM pod");
    assert_eq!(s.get("VLLM_READS"), "written on the node after the mount");
    // A read-only hostPath volume does not make the mounts that propagate into it read-only
    // (Kubernetes' recursiveReadOnly excludes HostToContainer): the README says so.
    eprintln!(
        "a write from the vLLM pod through its read-only volume: {}",
        if s.get("VLLM_WROTE") == "1" {
            "succeeded"
        } else {
            "refused"
        }
    );
    assert_eq!(s.get("AGAIN_EXIT"), "0", "{}", s.file("again.out"));
    assert!(
        s.file("again.out").contains("nothing to do"),
        "{}",
        s.file("again.out")
    );
    assert_eq!(s.get("UNDERNEATH"), "left by the node before any disk");
}

#[test]
fn disk_setup_in_the_agent_pod_refuses_someone_elses_filesystem_at_the_host_path() {
    if !have_xfs() || !namespaces_available() {
        return;
    }
    let Some(nvme) = LoopDevice::new(320) else {
        return;
    };
    let before = nvme.ends_hash();
    let s = Scenario::run(FOREIGN, &nvme);
    assert_eq!(s.get("APPLY_EXIT"), "10", "{}", s.file("apply.err"));
    assert!(
        s.file("apply.err")
            .contains("already mounted from someones-data (tmpfs)"),
        "{}",
        s.file("apply.err")
    );
    assert_eq!(s.get("NODE_FS"), "tmpfs");
    assert_eq!(s.get("DATA"), "precious");
    assert_eq!(nvme.ends_hash(), before, "the device was not written");
}
