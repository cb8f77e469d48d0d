//! A GPU node's life on a real kernel: a VM (QEMU, software emulation, booted with virtme-ng
//! over this machine's own files) with four emulated NVMe disks, md RAID0, XFS and cgroup v2.
//! Each boot runs `tests/vm/node-boot.sh`: the DaemonSet's agent in a mount namespace and memory
//! cgroup that mirror its pod (an emptyDir at its private mount point, the kubelet's pod
//! directories), with the ConfigMap's config.toml (only the Blob endpoint, the disk model string
//! and how long to wait for a missing array member changed); a vLLM pod beside it, started
//! first, whose init container runs the example's exact `wait` command as the example's user
//! while the agent works and whose server reads every tensor with `safe_open` through the link
//! it made. Azurite runs here, behind a proxy that counts requests, reached from the VM through
//! its user-mode network.
//!
//! The boots, on the same disk images:
//! 1. first boot, four blank disks: RAID0 created, XFS made, shown read-only over the hostPath
//!    bind; the init container (uid 10001) prints progress, leases and links the revision; the
//!    vLLM pod reads it and cannot write to the cache, before and after an agent restart, after
//!    which a second pod's lease is still recorded;
//! 2. reboot: udev assembles the array before the agent starts; the agent uses it and is ready
//!    without a single request to the source;
//! 3. one disk gone: the agent waits for it (disk.member_wait), then rebuilds over the other
//!    three, says why, and fetches the model again;
//! 4. the disk comes back, holding its old array's superblock: the rebuilt array and its cache
//!    are kept, nothing is fetched, the returning disk is reported unused;
//! 5. a foreign disk (ext4 with data) in place of a member: left byte-identical; the agent
//!    rebuilds over the other three at once (the returned disk stands in for the lost one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_norway::Value;

use crate::proxy::FaultProxy;
use crate::support::*;

const DISK_MIB: u64 = 384;
const MODEL: &str = "gpt-oss-120b";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// virtme-ng, QEMU and a kernel, or a loud skip (a failure in CI).
fn vm_tools() -> Option<(PathBuf, PathBuf)> {
    let vng = repo().join(".tools/vng/bin/vng");
    let qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .is_ok_and(|o| o.status.success());
    let kernel = std::fs::read_dir("/boot").ok().and_then(|d| {
        let mut k: Vec<PathBuf> = d
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        k.sort();
        k.pop()
    });
    match (is_root(), vng.exists(), qemu, kernel) {
        (true, true, true, Some(kernel)) => Some((vng, kernel)),
        (root, vng_ok, qemu_ok, kernel) => {
            skip_or_fail(&format!(
                "the VM test needs root ({root}), virtme-ng in .tools/vng ({vng_ok}), qemu-system-x86_64 ({qemu_ok}) and a kernel in /boot ({}); the test command installs them",
                kernel.is_some()
            ));
            None
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// `1Gi` and friends, in bytes.
pub(crate) fn quantity(q: &str) -> u64 {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = digits.parse().unwrap();
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => panic!("unexpected quantity unit {other}"),
    }
}

struct Node {
    vng: PathBuf,
    kernel: PathBuf,
    disks: tempfile::TempDir,
    share: tempfile::TempDir,
    /// The disk images attached at the next boot.
    attached: Vec<u32>,
}

struct Boot {
    results: BTreeMap<String, String>,
    share: PathBuf,
    seconds: f64,
}

impl Boot {
    fn get(&self, key: &str) -> &str {
        self.results.get(key).map_or("", String::as_str)
    }
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.share.join(name)).unwrap_or_default()
    }
    fn explain(&self) -> String {
        format!(
            "results: {:#?}\nagent log:\n{}\ninit log:\n{}\nsecond init log:\n{}\nconsumer:\n{}\nconsole:\n{}",
            self.results,
            self.log("agent.log"),
            self.log("init.log"),
            self.log("init-2.log"),
            self.log("consumer.log"),
            self.log("console.log")
        )
    }
    fn model_json(&self) -> serde_json::Value {
        serde_json::from_str(self.get("MODEL")).unwrap_or(serde_json::Value::Null)
    }
}

impl Node {
    fn new(vng: PathBuf, kernel: PathBuf) -> Self {
        let disks = tempfile::tempdir().unwrap();
        for i in 1..=4 {
            Self::blank(&disks.path().join(format!("nvme{i}.img")));
        }
        let mut share = tempfile::tempdir().unwrap();
        // MODELCACHE_VM_KEEP=1 keeps the logs and results of every boot for a look afterwards.
        if std::env::var_os("MODELCACHE_VM_KEEP").is_some() {
            share.disable_cleanup(true);
            eprintln!("vm: logs and results in {}", share.path().display());
        }
        Self {
            vng,
            kernel,
            disks,
            share,
            attached: vec![1, 2, 3, 4],
        }
    }

    fn disk(&self, i: u32) -> PathBuf {
        self.disks.path().join(format!("nvme{i}.img"))
    }

    /// A new, blank disk image (sparse).
    fn blank(path: &Path) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(DISK_MIB << 20).unwrap();
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.share.path().join(name), text).unwrap();
    }

    /// Boots the node once and runs the boot script; returns its results.
    fn boot(&self) -> Boot {
        let share = self.share.path();
        for f in [
            "results.txt",
            "agent.log",
            "init.log",
            "init-2.log",
            "consumer.log",
            "console.log",
        ] {
            let _ = std::fs::remove_file(share.join(f));
        }
        let drives: Vec<String> = self
            .attached
            .iter()
            .map(|i| {
                format!(
                    "-drive file={},if=none,id=n{i},format=raw -device nvme,serial=mc{i},drive=n{i}",
                    self.disk(*i).display()
                )
            })
            .collect();
        let path = format!(
            "{}:{}",
            self.vng.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = Instant::now();
        let out = run_group(
            Command::new(&self.vng)
                .env("PATH", path)
                .arg("--run")
                .arg(&self.kernel)
                .args([
                    "--disable-kvm",
                    "--memory",
                    "2G",
                    "--cpus",
                    "2",
                    "--network",
                    "user",
                    "--no-dhcp",
                ])
                .arg(format!("--rwdir={}", share.display()))
                .arg(format!("--qemu-opts={}", drives.join(" ")))
                .arg("--exec")
                .arg(format!(
                    "bash {} {}",
                    repo().join("tests/vm/node-boot.sh").display(),
                    share.display()
                )),
            // Generous: emulated, a boot takes 1.5-2.5 min on 2 idle cores and three times that
            // beside a release build; only a hang should reach this.
            Duration::from_secs(900),
        );
        let seconds = started.elapsed().as_secs_f64();
        std::fs::write(
            share.join("console.log"),
            out.as_ref()
                .map_or("the VM did not finish in time".to_string(), |o| {
                    format!("{}\n{}", stdout(o), stderr(o))
                }),
        )
        .unwrap();
        let results = std::fs::read_to_string(share.join("results.txt"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let boot = Boot {
            results,
            share: share.to_path_buf(),
            seconds,
        };
        assert_eq!(
            boot.get("DONE"),
            "1",
            "the boot script did not finish: {}",
            boot.explain()
        );
        boot
    }
}

/// Runs `cmd` in its own process group and, past `limit`, kills the whole group (virtme-ng's
/// QEMU would otherwise outlive it); returns None then.
fn run_group(cmd: &mut Command, limit: Duration) -> Option<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Some(out.unwrap()),
        Err(_) => {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            None
        }
    }
}

fn hash_file(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

fn pagecache(boot: &Boot, key: &str) -> (u64, u64) {
    let v: Vec<u64> = boot
        .get(key)
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    (
        v.first().copied().unwrap_or(0),
        v.get(1).copied().unwrap_or(0),
    )
}

fn percent(part: u64, whole: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a percentage for the log")]
    let p = part as f64 * 100.0 / whole.max(1) as f64;
    p
}

#[test]
fn a_gpu_node_in_a_vm_builds_raid0_serves_vllm_survives_reboots_and_disk_changes() {
    let Some((vng, kernel)) = vm_tools() else {
        return;
    };
    let Some(az) = azurite() else { return };
    let Some(py) = crate::nodeboot::python() else {
        return;
    };

    // The source: a GPT-OSS-shaped model and its manifest where the ConfigMap points.
    let source = crate::nodeboot::publish_at_configmap_source(az, 7);
    let proxy = FaultProxy::start(az.port);

    // The DaemonSet, its ConfigMap and the vLLM example, as shipped.
    let config_text =
        std::fs::read_to_string(repo().join("deploy/kubernetes/config.toml")).unwrap();
    let config_toml = config_text.as_str();
    let config = modelcache::config::agent::AgentConfig::from_toml(
        config_toml,
        "configmap",
        &modelcache::config::Environment::default(),
        &[],
    )
    .unwrap();
    let daemonset = crate::nodeboot::yaml_docs("deploy/kubernetes/daemonset.yaml");
    let agent = &daemonset[0]["spec"]["template"]["spec"]["containers"][0];
    let mut agent_env: Vec<String> = agent["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}={}",
                e["name"].as_str().unwrap(),
                e["value"].as_str().unwrap_or("")
            )
        })
        // The endpoint: Azurite through the proxy instead of a storage account.
        .filter(|e| !e.starts_with("AZURE_STORAGE_ACCOUNT_NAME="))
        .collect();
    agent_env.extend([
        "AZURE_STORAGE_USE_EMULATOR=true".to_string(),
        format!("AZURITE_BLOB_STORAGE_URL=http://10.0.2.2:{}", proxy.port),
        // The devices: QEMU's NVMe model string instead of Azure's.
        "MODELCACHE_DISK_MODELS=QEMU NVMe Ctrl".to_string(),
        // A missing array member is waited for ten seconds, not two minutes.
        "MODELCACHE_DISK_MEMBER_WAIT=10s".to_string(),
    ]);
    let agent_memory = quantity(
        agent["resources"]["limits"]["memory"]
            .as_str()
            .expect("the DaemonSet sets a memory limit"),
    );
    let example = crate::nodeboot::yaml_docs("deploy/examples/vllm-gpt-oss-120b.yaml");
    // The init container that waits (the first one only pulls vLLM's image).
    let init = example[0]["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .and_then(|all| all.iter().find(|c| c["name"] == "wait-for-model"))
        .expect("the example's wait-for-model init container");
    let init_memory = quantity(init["resources"]["limits"]["memory"].as_str().unwrap());
    let init_user = init["securityContext"]["runAsUser"].as_u64().unwrap();
    let mount_of = |volume: &str| {
        init["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap()
            .to_string()
    };
    let (pod_mount, link_mount) = (mount_of("modelcache"), mount_of("model"));

    let mut node = Node::new(vng, kernel);
    node.write("config.toml", config_toml);
    node.write("agent.args", &(strings(&agent["args"]).join("\n") + "\n"));
    node.write("agent.env", &(agent_env.join("\n") + "\n"));
    // The init container's exact arguments, its mount paths mapped to where the vLLM pod's
    // namespace mounts its volumes (the VM's root is read-only); the downward API's values are
    // the boot script's.
    let in_pod = |a: &str| {
        for m in [&pod_mount, &link_mount] {
            if a == m.as_str() || a.starts_with(&format!("{m}/")) {
                return format!("/run/vllm-pod{a}");
            }
        }
        a.to_string()
    };
    let init_args: Vec<String> = strings(&init["args"]).iter().map(|a| in_pod(a)).collect();
    node.write("init.args", &(init_args.join("\n") + "\n"));
    node.write("consumer.py", crate::nodeboot::CONSUMER);
    node.write(
        "env.sh",
        &format!(
            "MC='{}'\nPY='{}'\nCONSUMER='{}'\nSOURCE='{}'\nMODEL='{MODEL}'\nPOD_MOUNT='{pod_mount}'\nLINK_MOUNT='{link_mount}'\nPRIVATE='{}'\nPODS='{}'\nINIT_USER={init_user}\nAGENT_MEMORY_MAX={agent_memory}\nINIT_MEMORY_MAX={init_memory}\n",
            bin().display(),
            py.display(),
            node.share.path().join("consumer.py").display(),
            source.path().display(),
            config.disk.private_mount.as_ref().unwrap().display(),
            config.leases.pods_dir.display(),
        ),
    );
    let requests = || proxy.requests.load(std::sync::atomic::Ordering::Relaxed);

    // 1. First boot: four blank NVMe disks. The shards answer slowly for a while, so the init
    // container, which starts with the agent, has a download to show.
    let before = requests();
    for i in 0..15 {
        proxy.add(
            &format!("model-{i:05}-of-00014"),
            crate::proxy::Fault::Delay(Duration::from_millis(600)),
            Some(2),
        );
    }
    node.write("boot.env", "MEASURE_PAGECACHE=1\nREAD_TENSORS=1\n");
    let first = node.boot();
    node.write("boot.env", "MEASURE_PAGECACHE=0\nREAD_TENSORS=1\n");
    let why = first.explain();
    assert_eq!(first.get("AGENT_READY"), "1", "{why}");
    assert_eq!(
        first.get("MDSTAT_AT_BOOT"),
        "",
        "blank disks: no array at boot: {why}"
    );
    assert!(
        first.get("MDSTAT_AFTER").contains("raid0")
            && ["nvme0n1", "nvme1n1", "nvme2n1", "nvme3n1"]
                .iter()
                .all(|d| first.get("MDSTAT_AFTER").contains(d)),
        "{why}"
    );
    let node_mount = first.get("NODE_MOUNT");
    assert!(
        node_mount.contains("xfs") && node_mount.split(',').any(|o| o.ends_with("ro")),
        "the node sees the cache read-only: {why}"
    );
    assert!(
        first.log("agent.log").contains("su=512k,sw=4"),
        "stripe-aligned xfs: {why}"
    );
    assert!(
        first
            .log("agent.log")
            .contains("consumers see /mnt/modelcache read-only"),
        "{why}"
    );
    // The init container, as uid 10001, showed the download and leased the revision it linked.
    assert_eq!(
        first.get("INIT_EXIT"),
        "0",
        "the init container's wait: {why}"
    );
    let init_log = first.log("init.log");
    assert!(
        init_log
            .lines()
            .any(|l| l.contains("downloading") && l.contains('%')),
        "progress with a percent: {why}"
    );
    assert!(
        init_log.contains("leased for this pod") && init_log.contains("into the page cache"),
        "{why}"
    );
    let revision = first.model_json()["revision"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        first
            .get("LINK")
            .ends_with(&format!("/store/{MODEL}/{revision}")),
        "the link points at the revision: {why}"
    );
    assert_eq!(first.get("CONSUMER_EXIT"), "0", "{why}");
    assert!(
        first.log("consumer.log").contains("tensors identical"),
        "{why}"
    );
    assert_whole_model_fetched(&first.model_json(), &why);
    assert_eq!(first.model_json()["verification"], "blake3", "{why}");
    assert!(requests() > before);
    // Root in the vLLM pod, started before the agent, cannot write, also after the agent
    // restarted; the restarted agent still writes (the second pod's lease).
    for key in ["VLLM_WRITE", "VLLM_WRITE_AFTER_RESTART"] {
        assert!(
            first.get(key).contains("Read-only file system"),
            "{key}: {why}"
        );
    }
    assert_eq!(first.get("AGENT_READY_AFTER_RESTART"), "1", "{why}");
    assert_eq!(first.get("INIT_2_EXIT"), "0", "{why}");
    assert!(
        first.get("LEASE_2").contains(&revision),
        "the restarted agent records leases: {why}"
    );
    let (after_init, size) = pagecache(&first, "PAGECACHE_AFTER_INIT");
    let (cold, _) = pagecache(&first, "PAGECACHE_COLD");
    let (after_init_2, _) = pagecache(&first, "PAGECACHE_AFTER_INIT_2");
    let (small_reader, _) = pagecache(&first, "PAGECACHE_SMALL_READER");
    assert!(cold < size / 10, "the page cache was dropped: {why}");
    assert!(
        after_init >= size && after_init_2 >= size,
        "the init container's wait --warm leaves every shard cached: {why}"
    );
    assert!(
        small_reader <= size / 3,
        "a reader limited to a quarter of the model keeps no more than that cached: {why}"
    );
    // mdadm --create ran under the DaemonSet's read-only /sys (its sysfs write refused, the
    // array made through the device node instead).
    let sys = first.get("AGENT_SYS");
    assert!(
        sys.split(';')
            .next()
            .is_some_and(|options| options.split(',').next() == Some("ro"))
            && sys.contains("Read-only file system"),
        "the agent's /sys is read-only, as in the DaemonSet: {sys}: {why}"
    );
    // The node's time to serving, by step, from the agent and from the init container.
    let timeline = first.model_json()["timeline"].clone();
    let steps: Vec<f64> = crate::timeline::STEPS
        .iter()
        .map(|s| timeline[*s].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(
        steps[0] >= 0.0 && steps.windows(2).all(|w| w[0] <= w[1]),
        "every step, in order: {timeline}: {why}"
    );
    let wait_line = first.get("WAIT_LINE");
    assert!(
        wait_line.starts_with(&format!("{MODEL}: serving "))
            && wait_line.contains(" s after the pod started: ")
            && wait_line.contains("warm "),
        "{wait_line}: {why}"
    );
    report(&format!(
        "vm boot 1 timeline, seconds after the agent started: disks settled {:.1} (mdadm --create under a read-only /sys, mkfs, mount), listing {:.1}, first byte {:.1}, last byte {:.1}, verified {:.1}, published {:.1}, ready {:.1}",
        steps[0], steps[1], steps[2], steps[3], steps[4], steps[5], steps[6]
    ));
    report(&format!(
        "vm boot 1, the init container's last line: {wait_line}"
    ));
    report(&format!(
        "vm boot 1 (first boot, 4 blank NVMe): agent start to ready {} s, boot to ready {} s (VM uptime), whole boot {:.0} s; {} bytes fetched; agent restart to ready {} s",
        first.get("AGENT_START_TO_READY_SECONDS"),
        first.get("BOOT_TO_READY_SECONDS"),
        first.seconds,
        first.model_json()["bytes_fetched"],
        first.get("AGENT_RESTART_TO_READY_SECONDS"),
    ));
    report(&format!(
        "vm page cache of the {size}-byte shards: {:.0}% after the init container's wait --warm (memory.max {init_memory}); after dropping caches {:.0}%, then {:.0}% after a restarted pod's init container; {:.0}% after a reader with memory.max = a quarter of the model read them all (the agent's memory.max is {agent_memory})",
        percent(after_init, size),
        percent(cold, size),
        percent(after_init_2, size),
        percent(small_reader, size),
    ));

    // 2. Reboot: udev assembles the array before the agent; nothing is fetched.
    let before = requests();
    let second = node.boot();
    let why = second.explain();
    assert_eq!(second.get("AGENT_READY"), "1", "{why}");
    assert!(
        second.get("MDSTAT_AT_BOOT").contains("active raid0"),
        "the host assembled the array before the agent: {why}"
    );
    assert!(
        second.get("DISK").contains("use_array"),
        "the agent used the running array: {why}"
    );
    assert_eq!(
        requests(),
        before,
        "ready without a single request to the source: {why}"
    );
    assert_eq!(second.get("INIT_EXIT"), "0", "{why}");
    assert_eq!(second.get("CONSUMER_EXIT"), "0", "{why}");
    assert!(
        second.get("VLLM_WRITE").contains("Read-only file system"),
        "{why}"
    );
    report(&format!(
        "vm boot 2 (reboot, array assembled by udev): agent start to ready {} s, boot to ready {} s, whole boot {:.0} s, 0 requests to the source",
        second.get("AGENT_START_TO_READY_SECONDS"),
        second.get("BOOT_TO_READY_SECONDS"),
        second.seconds
    ));

    // 3. One disk gone. From here on the init container's wait (the model verified,
    // published, intact and linked) stands for the reader: tensors were read on boots 1 and 2.
    node.write("boot.env", "MEASURE_PAGECACHE=0\nREAD_TENSORS=0\n");
    node.attached = vec![1, 2, 4];
    let third = node.boot();
    let why = third.explain();
    assert_eq!(third.get("AGENT_READY"), "1", "{why}");
    assert!(
        third
            .log("agent.log")
            .contains("waiting up to 10s for the others"),
        "the agent waited for the missing disk: {why}"
    );
    assert!(
        third.get("DISK").contains("create_array")
            && third
                .log("agent.log")
                .contains("of its members after disk.member_wait"),
        "then rebuilt, saying why: {why}"
    );
    assert_eq!(members(&third), 3, "{why}");
    assert_whole_model_fetched(&third.model_json(), &why);
    assert_eq!(third.get("INIT_EXIT"), "0", "{why}");
    report(&format!(
        "vm boot 3 (one disk gone): waited 10 s for it, rebuilt over 3, model fetched again, agent start to ready {} s, whole boot {:.0} s",
        third.get("AGENT_START_TO_READY_SECONDS"),
        third.seconds
    ));

    // 4. The disk comes back: the rebuilt array and its cache are kept; no rebuild loop.
    node.attached = vec![1, 2, 3, 4];
    let before = requests();
    let fourth = node.boot();
    let why = fourth.explain();
    assert_eq!(fourth.get("AGENT_READY"), "1", "{why}");
    assert!(
        !fourth.get("DISK").contains("create_array")
            && fourth.get("DISK").contains("earlier array"),
        "the returning disk is reported, nothing is rebuilt: {why}"
    );
    assert_eq!(requests(), before, "nothing fetched: {why}");
    assert_eq!(members(&fourth), 3, "{why}");
    assert_eq!(fourth.get("INIT_EXIT"), "0", "{why}");
    report(&format!(
        "vm boot 4 (the missing disk back): rebuilt array and cache kept, 0 requests to the source, agent start to ready {} s, whole boot {:.0} s",
        fourth.get("AGENT_START_TO_READY_SECONDS"),
        fourth.seconds
    ));

    // 5. A foreign disk (ext4 with someone's data) in place of a member of the array.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("precious.txt"), "someone else's data").unwrap();
    let foreign = node.disk(2);
    Node::blank(&foreign);
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "data", "-d"])
        .arg(data.path())
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", stderr(&mkfs));
    let foreign_hash = hash_file(&foreign);
    let fifth = node.boot();
    let why = fifth.explain();
    assert_eq!(
        hash_file(&foreign),
        foreign_hash,
        "the foreign disk is byte-identical: {why}"
    );
    assert_eq!(fifth.get("AGENT_READY"), "1", "{why}");
    let disk = fifth.get("DISK");
    assert!(
        disk.contains("labelled \\\"data\\\"") && disk.contains("never touched"),
        "the foreign disk is reported: {why}"
    );
    assert!(
        !fifth.log("agent.log").contains("waiting up to"),
        "a disk stands in for the lost member: no wait: {why}"
    );
    assert_eq!(members(&fifth), 3, "an array over the other three: {why}");
    assert_whole_model_fetched(&fifth.model_json(), &why);
    assert_eq!(fifth.get("INIT_EXIT"), "0", "{why}");
    report(&format!(
        "vm boot 5 (a foreign ext4 disk in place of a member): left byte-identical, array over the other 3, agent start to ready {} s, whole boot {:.0} s",
        fifth.get("AGENT_START_TO_READY_SECONDS"),
        fifth.seconds
    ));
}

/// The NVMe members of the running array after a boot (an inactive array udev made of a
/// leftover disk is not counted).
fn members(boot: &Boot) -> usize {
    boot.get("MDSTAT_AFTER")
        .split(';')
        .filter(|array| array.contains(": active raid0"))
        .flat_map(str::split_whitespace)
        .filter(|w| w.starts_with("nvme"))
        .count()
}

/// Every byte came from the source and none from an earlier cache. A range may be fetched more
/// than once (a retry after a stall, a hedge of a straggler: the test VM's emulated CPU and disks
/// are slow and uneven), so the fetched bytes are at least the model, not exactly it.
fn assert_whole_model_fetched(model: &serde_json::Value, why: &str) {
    assert_eq!(model["bytes_reused"], 0, "{why}");
    assert_eq!(model["bytes_done"], model["bytes_total"], "{why}");
    let (fetched, total) = (
        model["bytes_fetched"].as_u64().unwrap_or(0),
        model["bytes_total"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(
        fetched >= total,
        "{fetched} bytes fetched of {total}: {why}"
    );
}
