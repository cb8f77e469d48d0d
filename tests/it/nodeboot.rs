//! A node's boot, played on this machine as closely as it can be: a loop device as the local
//! NVMe, Azurite holding a GPT-OSS-shaped model and its manifest under the ConfigMap's source,
//! the agent started in a mount namespace of its own (the host path a shared bind, an emptyDir
//! at its private mount point) with the ConfigMap's own config.toml (only the endpoint, listen
//! addresses, paths and device overridden), the vLLM example's init container command, as its
//! user, asking the agent, linking and leasing the revision, and then a consumer that opens
//! every shard the way vLLM does (`safe_open`) through that link and checks every tensor's bytes
//! against the source.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_norway::Value;

use crate::disk::{Target, have_xfs};
use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn python() -> Option<PathBuf> {
    let py = repo().join(".tools/py/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import safetensors, numpy, ml_dtypes"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail(
            "the Python safetensors/numpy/ml_dtypes venv in .tools/py is missing (run ./scripts/test)",
        );
        return None;
    }
    Some(py)
}

pub(crate) fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

pub(crate) const CONSUMER: &str = r#"
import json, sys
import ml_dtypes  # numpy learns bfloat16, as torch would load it
from safetensors import safe_open
cache, source = sys.argv[1], sys.argv[2]
index = json.load(open(f"{cache}/model.safetensors.index.json"))
shards = sorted(set(index["weight_map"].values()))
checked = 0
for shard in shards:
    with safe_open(f"{cache}/{shard}", framework="np") as got, safe_open(f"{source}/{shard}", framework="np") as want:
        assert sorted(got.keys()) == sorted(want.keys()), shard
        for name in got.keys():
            a, b = got.get_tensor(name), want.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (shard, name)
            checked += 1
assert checked == len(index["weight_map"]), (checked, len(index["weight_map"]))
print(f"{len(shards)} shards, {checked} tensors identical")
"#;

/// A GPT-OSS-shaped model (15 shards of 2 MiB) and its manifest uploaded where the ConfigMap's
/// source points, `az://models/gpt-oss-120b`; returns the local original.
pub(crate) fn publish_at_configmap_source(az: &Azurite, seed: u64) -> tempfile::TempDir {
    create_container(az, "models");
    let source = small_model(2 << 20, seed);
    tokio::runtime::Runtime::new().unwrap().block_on(upload_dir(
        &store(az, "models"),
        source.path(),
        "gpt-oss-120b",
    ));
    let mut manifest = modelcache();
    with_emulator(&mut manifest, &az.endpoint());
    manifest.args([
        "manifest",
        "--upload",
        "--source",
        "az://models/gpt-oss-120b",
    ]);
    let out = run(&mut manifest, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    source
}

#[test]
fn a_gpu_node_boots_fetches_verifies_and_serves_the_model_to_a_vllm_style_reader() {
    if !have_xfs() {
        return;
    }
    let Some(az) = azurite() else { return };
    let Some(py) = python() else { return };
    let Some(nvme) = LoopDevice::new(1024) else {
        return;
    };

    // The ConfigMap's source is az://models/gpt-oss-120b: publish the model exactly there.
    let config_toml =
        std::fs::read_to_string(repo().join("deploy/kubernetes/config.toml")).unwrap();
    assert!(config_toml.contains("source = \"az://models/gpt-oss-120b\""));
    let source = publish_at_configmap_source(az, 42);

    // The node boots: the host path is a shared mount, as kubelet requires of a Bidirectional
    // hostPath; the DaemonSet's agent runs in a mount namespace of its own with an emptyDir at
    // its private mount point, with the ConfigMap's config.
    let hostpath = Target::new();
    make_shared_mount(hostpath.path());
    let private = tempfile::tempdir().unwrap();
    let pods = tempfile::tempdir().unwrap();
    let pod_uid = "0b9f6a52-4a5e-4c1e-9d9b-7f3a2c1e5d40";
    std::fs::create_dir(pods.path().join(pod_uid)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nvme_path = nvme.path.display().to_string();
    let started = Instant::now();
    let agent = crate::agent::Agent::start_in(
        dir.path(),
        &config_toml,
        &az.endpoint(),
        &[
            ("MODELCACHE_CACHE_ROOT", hostpath.path().to_str().unwrap()),
            (
                "MODELCACHE_CACHE_PRIVATE_MOUNT",
                private.path().to_str().unwrap(),
            ),
            ("MODELCACHE_LEASES_PODS_DIR", pods.path().to_str().unwrap()),
            ("MODELCACHE_LISTEN_READ", "127.0.0.1:0"),
            ("MODELCACHE_DISK_DEVICES", &nvme_path),
        ],
        in_agent_pod(private.path()),
    );

    // The vLLM pod's init container, with its exact arguments, as its user (uid 10001): its
    // mount path maps to the hostPath here, its emptyDir to a directory it may write, the
    // downward API's values to the agent's address and a pod of this "node".
    let example = yaml_docs("deploy/examples/vllm-gpt-oss-120b.yaml");
    // The init container that waits (the first one only pulls vLLM's image).
    let init = example[0]["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .and_then(|all| all.iter().find(|c| c["name"] == "wait-for-model"))
        .expect("the example's wait-for-model init container");
    let mount_path = init["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    let empty_dir = tempfile::tempdir().unwrap();
    for (path, mode) in [(empty_dir.path(), 0o777), (hostpath.path(), 0o755)] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let args: Vec<String> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a == mount_path {
                hostpath.path().display().to_string()
            } else if let Some(name) = a.strip_prefix("/model/") {
                empty_dir.path().join(name).display().to_string()
            } else {
                a.replace("$(POD_UID)", pod_uid)
                    .replace("$(NODE_IP):8080", &agent.read)
            }
        })
        .collect();
    let link =
        std::path::PathBuf::from(&args[args.iter().position(|a| a == "--link").unwrap() + 1]);
    let mut wait = std::process::Command::new("setpriv");
    wait.env_clear()
        .args(["--reuid=10001", "--regid=10001", "--clear-groups"])
        .arg(bin())
        .args(&args);
    let out = run(&mut wait, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "init container: {}\n{}\nagent log:\n{}",
        stdout(&out),
        stderr(&out),
        agent.log()
    );
    let to_ready = started.elapsed();
    eprintln!(
        "node boot: agent start to model ready in {:.2} s",
        to_ready.as_secs_f64()
    );
    assert!(
        stdout(&out).contains("gpt-oss-120b is ready") && stdout(&out).contains("leased"),
        "{}",
        stdout(&out)
    );

    // The disk is the cache, shown read-only at the host path: even root on the node cannot
    // write there; the model is verified, leased for the pod, and the node is ready.
    let line = hostpath
        .mount_line()
        .expect("the NVMe is mounted at the cache root");
    assert!(
        line.contains(&nvme_path) && line.contains(" - xfs "),
        "{line}"
    );
    let write = std::fs::write(hostpath.path().join("node-write"), "x").unwrap_err();
    assert_eq!(
        write.raw_os_error(),
        Some(nix::errno::Errno::EROFS as i32),
        "{write}"
    );
    let (status, body) = crate::agent::http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");
    // The pod's UID on the admin socket only, never on the node address.
    let (_, body) = crate::agent::http(&agent.read, "GET", "/v1/models/gpt-oss-120b", &[], "");
    assert!(
        !body.contains(pod_uid) && body.contains("\"leases\":1"),
        "{body}"
    );
    let (_, body) = crate::agent::http(&agent.admin, "GET", "/v1/models/gpt-oss-120b", &[], "");
    assert!(body.contains(pod_uid), "the lease: {body}");
    let model_dir = link.clone();
    assert!(
        std::fs::read_link(&link)
            .unwrap()
            .starts_with(hostpath.path().join("store/gpt-oss-120b"))
    );
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join(".modelcache/ready.json")).unwrap())
            .unwrap();
    assert_eq!(marker["verification"], "blake3");
    assert!(!model_dir.join("original").exists());
    assert!(
        model_dir.join("o200k_base.tiktoken").exists(),
        "TIKTOKEN_ENCODINGS_BASE finds its files"
    );

    // vLLM's way of reading: safe_open on every shard the index names.
    let out = Command::new(&py)
        .args(["-c", CONSUMER])
        .arg(&model_dir)
        .arg(source.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "consumer: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("15 shards"), "{}", stdout(&out));
    eprintln!("consumer: {}", stdout(&out).trim());
    drop(agent);
}
