//! The DaemonSet's mount shape on loop devices: the cache root inside the agent's mount
//! namespace is a bind mount of the host path (`hostPath`, `mountPropagation: Bidirectional`),
//! its private mount point an emptyDir, and a vLLM pod mounts the same host path read-only with
//! `HostToContainer`. The agent's disk setup mounts the filesystem on its private mount and
//! shows it read-only over that bind, so it propagates to the host and on to the vLLM pod,
//! which cannot write to it; it must still refuse a cache root where someone else's filesystem
//! is mounted.
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

# The agent's pod: the host path at the cache root (an rbind, as runtimes bind volumes),
# rshared, and an emptyDir (private) at its private mount point. It sets up the disk, then
# writes a file through its own mount, as publishing does.
AGENT_POD='mount --rbind "$HOST" "$CACHE" && mount --make-rshared "$CACHE" &&
  mount -t tmpfs -o size=4m emptydir "$PRIV" && mount --make-private "$PRIV" &&
  "$MC" disk apply --config "$CONFIG" && echo "$1" > "$PRIV/cache/$2"'
unshare -m --propagation unchanged sh -c "$AGENT_POD" sh 'written by the agent' first.txt \
  > "$STATE/apply.out" 2> "$STATE/apply.err"
echo "APPLY_EXIT=$?"

# What the node sees at the host path, and what the vLLM pod sees.
echo "NODE_FS=$(stat -f -c %T "$HOST")"
echo "VLLM_FS=$(nsenter -t $VLLM -m stat -f -c %T "$POD")"
echo "VLLM_READS=$(nsenter -t $VLLM -m cat "$POD/first.txt")"
# Root in the vLLM pod (started before the agent), and on the node, cannot write.
echo "VLLM_WRITE=$(nsenter -t $VLLM -m sh -c "echo x > '$POD/vllm-write.txt'" 2>&1 && echo allowed)"
echo "NODE_WRITE=$(sh -c "echo x > '$HOST/node-write.txt'" 2>&1 && echo allowed)"
# A pod started after the agent: the same.
echo "LATER_WRITE=$(unshare -m --propagation unchanged sh -c '
  mount --bind "$HOST" "$POD" && mount --make-rslave "$POD" && echo x > "$POD/later.txt"' 2>&1 && echo allowed)"

# A restarted agent container: a new mount namespace whose rbind of the host path carries the
# read-only view; the disk has nothing to do, the agent writes through a clone of it.
unshare -m --propagation unchanged sh -c "$AGENT_POD" sh 'after a restart' second.txt \
  > "$STATE/again.out" 2>&1
echo "AGAIN_EXIT=$?"
echo "VLLM_READS_AGAIN=$(nsenter -t $VLLM -m cat "$POD/second.txt")"
echo "VLLM_WRITE_AGAIN=$(nsenter -t $VLLM -m sh -c "echo x > '$POD/vllm-write.txt'" 2>&1 && echo allowed)"
kill $VLLM

# Beneath the mounts, the host directory is as the node left it.
umount "$HOST"
umount "$HOST" 2>/dev/null
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
        for d in ["host", "cache", "pod", "state", "private"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "cache_root = \"{}\"\n[cache]\nprivate_mount = \"{}\"\n[disk]\nenabled = true\ndevices = [\"{}\"]\n",
                dir.path().join("cache").display(),
                dir.path().join("private").display(),
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
                .env("PRIV", dir.path().join("private"))
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
        s.file("apply.out")
            .contains("read-only; the agent writes at"),
        "apply says how the cache is shown: {}",
        s.file("apply.out")
    );
    assert_eq!(s.get("NODE_FS"), "xfs", "the view propagated to the host");
    assert_eq!(s.get("VLLM_FS"), "xfs", "and on to the vLLM pod");
    assert_eq!(s.get("VLLM_READS"), "written by the agent");
    // Issue 18: consumers see the cache read-only, as far as the kernel is concerned: root in
    // a pod that started before the agent, on the node, and in a pod that started after.
    for key in [
        "VLLM_WRITE",
        "NODE_WRITE",
        "LATER_WRITE",
        "VLLM_WRITE_AGAIN",
    ] {
        assert!(
            s.get(key).contains("Read-only file system"),
            "{key}: {}",
            s.get(key)
        );
    }
    assert_eq!(s.get("AGAIN_EXIT"), "0", "{}", s.file("again.out"));
    assert!(
        s.file("again.out").contains("nothing to do")
            && s.file("again.out").contains("as an earlier run left it"),
        "{}",
        s.file("again.out")
    );
    assert_eq!(
        s.get("VLLM_READS_AGAIN"),
        "after a restart",
        "the agent still publishes"
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
