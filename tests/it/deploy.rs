//! The Kubernetes manifests, the Dockerfile and the vLLM example, checked against the Kubernetes
//! schemas and against the binary itself: every argument, variable and configuration key they
//! pass to modelcache must exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use modelcache::cli::Cli;
use serde_norway::Value;

use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every manifest file (not the kustomizations) and its documents.
fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    let mut out = Vec::new();
    for dir in ["deploy/kubernetes", "deploy/examples", "deploy/gpu"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".yaml") || name == "kustomization.yaml" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = serde_norway::Deserializer::from_str(&text)
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .collect();
            out.push((path, docs));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

/// `kubectl kustomize DIR` (kustomize as kubectl ships it), as documents; None after a loud
/// skip (a failure in CI) when kubectl is not installed.
pub(crate) fn render(dir: &str) -> Option<Vec<Value>> {
    let found = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_or_fail("kubectl is not installed (the test command installs kubernetes-client)");
        return None;
    }
    let mut cmd = std::process::Command::new("kubectl");
    cmd.arg("kustomize").arg(repo().join(dir));
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).trim().is_empty(),
        "kubectl kustomize {dir} warns: {}",
        stderr(&out)
    );
    Some(
        serde_norway::Deserializer::from_str(&stdout(&out))
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect(),
    )
}

/// The one document of `kind` (named `name`, when given).
fn one<'a>(docs: &'a [Value], kind_of: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == kind_of)
        .filter(|d| name.is_none_or(|n| d["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "one {kind_of} {name:?}");
    found[0]
}

/// The container named `name` in a list of containers (a pod spec's `containers` or
/// `initContainers`).
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .unwrap_or_else(|| panic!("no containers where {name} should be"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Every container and init container of workloads, with the document it came from.
fn containers(docs: &[(PathBuf, Vec<Value>)]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (path, file) in docs {
        for doc in file {
            let spec = &doc["spec"]["template"]["spec"];
            for key in ["initContainers", "containers"] {
                if let Some(list) = spec[key].as_sequence() {
                    for c in list {
                        out.push((
                            format!("{} {}", path.display(), c["name"].as_str().unwrap_or("?")),
                            c.clone(),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{x:?}"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let validator = repo().join(".tools/py/bin/kubernetes-validate");
    if !validator.exists() {
        skip_or_fail("kubernetes-validate is not installed in .tools/py (run ./scripts/test)");
        return;
    }
    let raw = manifests();
    let mut documents: usize = raw.iter().map(|(_, docs)| docs.len()).sum();
    let mut files: Vec<PathBuf> = raw.into_iter().map(|(p, _)| p).collect();
    assert!(files.len() >= 5, "{files:?}");
    // And what kustomize makes of the base and of the guide's overlay (the ConfigMap is
    // generated there), as applied.
    let rendered = tempfile::tempdir().unwrap();
    for dir in [
        "deploy",
        "deploy/overlays/aks",
        "deploy/overlays/aks-dragonfly",
    ] {
        let Some(docs) = render(dir) else { return };
        let path = rendered
            .path()
            .join(format!("{}.yaml", dir.replace('/', "-")));
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect();
        std::fs::write(&path, text.join("---\n")).unwrap();
        documents += docs.len();
        files.push(path);
    }
    let mut cmd = std::process::Command::new(&validator);
    cmd.args(["--strict", "--no-warn"]).args(&files);
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out).matches("passed").count() + stderr(&out).matches("passed").count(),
        documents,
        "every document passed: {}",
        stdout(&out)
    );
    // The kustomization lists exactly the resource files beside it (config.toml is generated
    // into the ConfigMap).
    let kustomization: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/kubernetes/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);

    // The top-level kustomization applies the agent and the vLLM example and is the one place
    // that sets the image: every modelcache container uses the name it rewrites.
    let top: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(strings(&top["resources"]), ["kubernetes", "examples"]);
    let name = top["images"][0]["name"].as_str().unwrap();
    let ours: Vec<(String, Value)> = containers(&manifests())
        .into_iter()
        .filter(|(_, c)| c["image"].as_str().unwrap_or("").contains("modelcache"))
        .collect();
    assert!(ours.len() >= 2, "{ours:?}");
    for (at, c) in ours {
        let image = c["image"].as_str().unwrap();
        assert!(
            image.starts_with(&format!("{name}:")),
            "{at} uses {image}, which deploy/kustomization.yaml does not rewrite"
        );
    }
}

#[test]
fn every_workload_tolerates_every_taint_the_guide_puts_on_the_gpu_pool() {
    let guide = std::fs::read_to_string(repo().join("docs/aks.md")).unwrap();
    let mut taints: Vec<&str> = guide
        .split("--node-taints ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(!taints.is_empty(), "the guide adds a tainted GPU pool");
    // Spot GPU pools carry this one; the guide says every workload tolerates it.
    taints.push("kubernetes.azure.com/scalesetpriority=spot:NoSchedule");
    let mut workloads = 0;
    for (path, docs) in manifests() {
        for doc in docs {
            if !matches!(kind(&doc), "DaemonSet" | "Deployment") {
                continue;
            }
            workloads += 1;
            let spec = &doc["spec"]["template"]["spec"];
            let tolerations = spec["tolerations"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{} tolerates nothing", path.display()));
            for taint in &taints {
                let (kv, effect) = taint.split_once(':').unwrap();
                let (key, value) = kv.split_once('=').unwrap();
                let tolerated = tolerations.iter().any(|t| {
                    t["key"].as_str() == Some(key)
                        && (t["operator"].as_str() == Some("Exists")
                            || t["value"].as_str() == Some(value))
                        && t["effect"].as_str().is_none_or(|e| e == effect)
                });
                assert!(tolerated, "{} does not tolerate {taint}", path.display());
            }
        }
    }
    assert_eq!(
        workloads, 3,
        "the agent, the vLLM example and the device plugin"
    );
    // Dragonfly's client, from the Helm values the Dragonfly guide installs.
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/dragonfly/values-aks.yaml")).unwrap(),
    )
    .unwrap();
    let tolerations = values["client"]["tolerations"].as_sequence().unwrap();
    for taint in &taints {
        let (kv, effect) = taint.split_once(':').unwrap();
        let (key, value) = kv.split_once('=').unwrap();
        assert!(
            tolerations.iter().any(|t| t["key"].as_str() == Some(key)
                && (t["operator"].as_str() == Some("Exists")
                    || t["value"].as_str() == Some(value))
                && t["effect"].as_str().is_none_or(|e| e == effect)),
            "Dragonfly's client does not tolerate {taint}"
        );
    }
}

/// The Dragonfly component and the Helm values for Dragonfly's chart describe the same node:
/// the socket the agent connects to is the one dfdaemon opens, in a directory the agent mounts;
/// dfdaemon's storage is the directory the agent shows it, on the cache filesystem.
#[test]
fn the_dragonfly_component_and_dragonflys_helm_values_agree() {
    let Some(docs) = render("deploy/overlays/aks-dragonfly") else {
        return;
    };
    let daemonset = one(&docs, "DaemonSet", Some("modelcache"));
    let spec = &daemonset["spec"]["template"]["spec"];
    let agent = spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap();
    let env = |name: &str| {
        agent["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the agent has no {name}"))
            .to_string()
    };
    let socket = env("MODELCACHE_FETCH_DRAGONFLY_SOCKET");
    let storage_host_path = env("MODELCACHE_FETCH_DRAGONFLY_STORAGE_HOST_PATH");
    let mount_of = |path: &str| {
        agent["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .cloned()
            .unwrap_or_else(|| panic!("the agent mounts nothing at {path}"))
    };
    let volume = |name: &str| {
        spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap()
    };
    let socket_mount = mount_of(&socket);
    let socket_dir = std::path::Path::new(&socket).parent().unwrap();
    assert_eq!(
        volume(socket_mount["name"].as_str().unwrap())["hostPath"]["path"].as_str(),
        socket_dir.to_str()
    );
    let storage_mount = mount_of(&storage_host_path);
    assert_eq!(
        storage_mount["mountPath"].as_str(),
        Some(storage_host_path.as_str())
    );
    assert_eq!(storage_mount["mountPropagation"], "Bidirectional");
    assert_eq!(
        volume(storage_mount["name"].as_str().unwrap())["hostPath"]["path"].as_str(),
        Some(storage_host_path.as_str()),
        "the agent's bind reaches the node at the same path"
    );

    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/dragonfly/values-aks.yaml")).unwrap(),
    )
    .unwrap();
    let client = &values["client"];
    assert_eq!(
        client["config"]["download"]["server"]["socketPath"].as_str(),
        Some(socket.as_str())
    );
    assert_eq!(client["hostNetwork"], true);
    let storage_dir = client["config"]["storage"]["dir"].as_str().unwrap();
    assert_eq!(
        storage_dir.trim_end_matches('/'),
        modelcache::config::agent::DFDAEMON_STORAGE_DIR,
        "dfdaemon's storage where the agent expects it (fetch.dragonfly.dfdaemon_storage_dir)"
    );
    assert_eq!(client["config"]["storage"]["keep"], true);
    let mount = client["extraVolumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(storage_dir))
        .expect("dfdaemon's storage is a mounted volume");
    assert_eq!(mount["mountPropagation"], "HostToContainer");
    let host = client["extraVolumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(
        host["hostPath"]["path"].as_str(),
        Some(format!("{storage_host_path}/storage").as_str()),
        "dfdaemon's storage is the directory the agent shows it"
    );
    assert_eq!(
        host["hostPath"]["type"], "Directory",
        "the kubelet holds dfdaemon until the agent has shown it the cache filesystem"
    );
    // And the agent resolves the variables to the exchange directory dfdaemon writes into.
    let mut check = modelcache();
    check
        .env("MODELCACHE_FETCH_DRAGONFLY_SOCKET", &socket)
        .env(
            "MODELCACHE_FETCH_DRAGONFLY_STORAGE_HOST_PATH",
            &storage_host_path,
        )
        .args(["agent", "--check", "--config"])
        .arg(repo().join("deploy/overlays/aks/config.toml"));
    let out = run(&mut check, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "dragonfly: dfdaemon at {socket}, writing into {storage_dir}modelcache (the agent's /var/lib/modelcache/cache/dragonfly/storage/modelcache); storage shown at {storage_host_path}"
        )),
        "{}",
        stdout(&out)
    );
}

#[test]
fn manifests_pass_only_arguments_variables_and_keys_modelcache_knows() {
    // As the guide applies them: the overlay, rendered.
    let Some(rendered) = render("deploy/overlays/aks") else {
        return;
    };
    let docs = vec![(PathBuf::from("deploy/overlays/aks"), rendered)];
    // Every MODELCACHE_* variable the binary reads: clap's and the configuration's.
    let mut known: BTreeSet<String> = modelcache::config::agent::env_vars().into_iter().collect();
    known.insert("MODELCACHE_LOG".into());
    fn walk(cmd: &clap::Command, known: &mut BTreeSet<String>) {
        for a in cmd.get_arguments() {
            if let Some(e) = a.get_env() {
                known.insert(e.to_string_lossy().into_owned());
            }
        }
        for s in cmd.get_subcommands() {
            walk(s, known);
        }
    }
    walk(&Cli::command(), &mut known);

    let mut checked = 0;
    for (name, c) in containers(&docs) {
        if !c["image"].as_str().unwrap_or("").contains("modelcache") {
            continue;
        }
        let mut argv = vec!["modelcache".to_string()];
        argv.extend(
            strings(&c["command"])
                .into_iter()
                .skip_while(|a| a.ends_with("modelcache")),
        );
        argv.extend(strings(&c["args"]));
        if let Err(e) = Cli::try_parse_from(&argv) {
            panic!("{name}: modelcache does not accept {argv:?}:\n{e}");
        }
        for env in c["env"].as_sequence().into_iter().flatten() {
            let var = env["name"].as_str().unwrap_or("");
            if var.starts_with("MODELCACHE_") {
                assert!(known.contains(var), "{name}: modelcache reads no {var}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 2, "the agent and the init container");

    // The ConfigMap's config.toml passes the binary's own check.
    let configmap = docs
        .iter()
        .flat_map(|(_, d)| d)
        .find(|d| kind(d) == "ConfigMap")
        .unwrap();
    let toml = configmap["data"]["config.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    for file in [
        path.clone(),
        repo().join("deploy/kubernetes/config.toml"),
        repo().join("deploy/overlays/aks/config.toml"),
    ] {
        let mut check = modelcache();
        check.args(["agent", "--check", "--config"]).arg(&file);
        let out = run(&mut check, Duration::from_secs(30));
        assert!(out.status.success(), "{}: {}", file.display(), stderr(&out));
        assert!(
            stdout(&out).contains("gpt-oss-120b (pinned)"),
            "{}",
            stdout(&out)
        );
    }

    // The paths agree: the DaemonSet's hostPath is the cache root; the vLLM pod mounts the same
    // hostPath where its init container waits and where vLLM loads from.
    let config = modelcache::config::agent::AgentConfig::load(
        Some(&path),
        &modelcache::config::Environment::default(),
        &[],
    )
    .unwrap();
    let daemonset = docs
        .iter()
        .flat_map(|(_, d)| d)
        .find(|d| kind(d) == "DaemonSet")
        .unwrap();
    let host_path = |spec: &Value, volume: &str| {
        spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .map(|v| v["hostPath"]["path"].as_str().unwrap().to_string())
    };
    let ds_spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(
        host_path(ds_spec, "cache").as_deref(),
        Some(config.cache_root.to_str().unwrap())
    );
    let agent_mount = ds_spec["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "cache")
        .unwrap();
    assert_eq!(agent_mount["mountPropagation"], "Bidirectional");
    assert_eq!(
        agent_mount["mountPath"].as_str(),
        config.cache_root.to_str()
    );
    let vllm = docs
        .iter()
        .flat_map(|(_, d)| d)
        .find(|d| kind(d) == "Deployment")
        .unwrap();
    let spec = &vllm["spec"]["template"]["spec"];
    assert_eq!(
        host_path(spec, "modelcache").as_deref(),
        Some(config.cache_root.to_str().unwrap())
    );
    let init = named(&spec["initContainers"], "wait-for-model");
    let args = strings(&init["args"]);
    let root = &args[args.iter().position(|a| a == "--cache-root").unwrap() + 1];
    let model = &args[args.iter().position(|a| a == "--model").unwrap() + 1];
    assert!(
        config.models.iter().any(|m| m.name.as_str() == model),
        "{model} is configured"
    );
    let mounted_at = |c: &Value| {
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "modelcache")
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_string(),
                    m["mountPropagation"].as_str().unwrap_or("").to_string(),
                )
            })
    };
    assert_eq!(
        mounted_at(init),
        Some((root.clone(), "HostToContainer".to_string()))
    );
    let vllm_c = named(&spec["containers"], "vllm");
    assert_eq!(
        mounted_at(vllm_c),
        Some((root.clone(), "HostToContainer".to_string())),
        "the server mounts the cache where the init container's link points"
    );
    // One revision per reader: vLLM serves the link the init container makes, in a volume
    // both mount (an emptyDir), leased for the pod's UID, asked of the agent on the node.
    let value_after = |flag: &str| &args[args.iter().position(|a| a == flag).unwrap() + 1];
    let link = value_after("--link");
    assert_eq!(value_after("--lease"), "$(POD_UID)");
    assert_eq!(
        value_after("--api"),
        &format!("http://$(NODE_IP):{}", config.read_addr.port())
    );
    let field_ref = |c: &Value, var: &str| {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var)
            .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
            .map(str::to_string)
    };
    assert_eq!(field_ref(init, "POD_UID").as_deref(), Some("metadata.uid"));
    assert_eq!(field_ref(init, "NODE_IP").as_deref(), Some("status.hostIP"));
    let link_dir = std::path::Path::new(link).parent().unwrap();
    let model_volume_at = |c: &Value| {
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == link_dir.to_str())
            .and_then(|m| m["name"].as_str())
            .map(str::to_string)
    };
    let volume = model_volume_at(init).expect("the init container mounts the link's volume");
    assert_eq!(model_volume_at(vllm_c).as_ref(), Some(&volume));
    assert!(
        spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["name"] == volume.as_str() && !v["emptyDir"].is_null()),
        "the link lives in an emptyDir"
    );
    let vargs = strings(&vllm_c["args"]);
    let model_dir = link.clone();
    assert_eq!(
        vargs[vargs.iter().position(|a| a == "--model").unwrap() + 1],
        model_dir
    );
    // The agent: its private mount is an emptyDir (propagation none) at cache.private_mount,
    // and it sees the kubelet's pod directories, read-only, at leases.pods_dir.
    let agent_c = &ds_spec["containers"][0];
    let agent_mount_of = |path: &std::path::Path| {
        agent_c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == path.to_str())
            .cloned()
    };
    let private = config
        .disk
        .private_mount
        .as_ref()
        .expect("cache.private_mount");
    let private_mount = agent_mount_of(private).expect("a volume at cache.private_mount");
    assert!(private_mount["mountPropagation"].is_null());
    assert!(
        ds_spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["name"] == private_mount["name"] && !v["emptyDir"].is_null())
    );
    let pods = agent_mount_of(&config.leases.pods_dir).expect("a volume at leases.pods_dir");
    assert_eq!(pods["readOnly"], true);
    assert_eq!(
        host_path(ds_spec, pods["name"].as_str().unwrap()).as_deref(),
        config.leases.pods_dir.to_str()
    );
    let tp = &vargs[vargs
        .iter()
        .position(|a| a == "--tensor-parallel-size")
        .unwrap()
        + 1];
    assert_eq!(tp, "4");
    let env: Vec<(String, String)> = vllm_c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(env.contains(&("HF_HUB_OFFLINE".into(), "1".into())));
    assert!(env.contains(&("TIKTOKEN_ENCODINGS_BASE".into(), model_dir)));
}

#[test]
fn the_dockerfile_names_only_paths_and_tools_that_exist() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "the Dockerfile copies {src}, which is not in the repository"
            );
        }
    }
    // Every path the build copies passes .dockerignore, and the target directory does not.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let ignore: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(ignore.first(), Some(&"*"), "the context starts empty");
    for wanted in [
        "!Cargo.toml",
        "!Cargo.lock",
        "!src/**",
        "!benches/**",
        "!tests/**",
        "!deploy/prebuilt/**",
    ] {
        assert!(ignore.contains(&wanted), ".dockerignore lacks {wanted}");
    }
    assert!(
        !ignore.iter().any(|l| l.starts_with("!target")),
        "the target directory (gigabytes) stays out of the context"
    );
    // The tools disk setup runs, and the Debian packages that ship them.
    let apply = std::fs::read_to_string(repo().join("src/disk/apply.rs")).unwrap();
    for (tool, package) in [
        ("mkfs.xfs", "xfsprogs"),
        ("mkfs.ext4", "e2fsprogs"),
        ("\"mdadm\"", "mdadm"),
    ] {
        assert!(
            apply.contains(tool),
            "disk setup no longer runs {tool}: update this test and the Dockerfile"
        );
        assert!(
            text.contains(&format!(" {package} ")),
            "the Dockerfile does not install {package} (for {tool})"
        );
    }
    let copy_dest = text
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    assert!(
        text.contains(&format!("ENTRYPOINT [\"{copy_dest}\"]")),
        "the entrypoint is the copied binary"
    );
    assert!(text.contains("target/release/modelcache"));
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(cargo.contains("name = \"modelcache\""));
    assert!(
        Path::new(&repo().join("Cargo.lock")).exists(),
        "--locked needs Cargo.lock"
    );
}

/// Issue 19: the guide's overlay holds the operator's values, and kustomize puts them where they
/// belong: the image of every modelcache container, the ConfigMap (generated, with a hash in its
/// name, so a change rolls the DaemonSet), the identity and the account. The guide never edits
/// the base: its commands name no file under deploy/kubernetes or deploy/examples, and no `sed
/// -i` (which only GNU sed takes as written).
#[test]
fn issue19_the_aks_overlay_carries_the_operators_values_and_the_base_stays_as_shipped() {
    let Some(docs) = render("deploy/overlays/aks") else {
        return;
    };
    let overlay: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/overlays/aks/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let image = format!(
        "{}:{}",
        overlay["images"][0]["newName"].as_str().unwrap(),
        overlay["images"][0]["newTag"].as_str().unwrap()
    );
    let ours: Vec<(String, Value)> = containers(&[(PathBuf::from("aks"), docs.clone())])
        .into_iter()
        .filter(|(_, c)| c["image"].as_str().unwrap_or("").contains("modelcache"))
        .collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    for (at, c) in &ours {
        assert_eq!(c["image"].as_str(), Some(image.as_str()), "{at}");
    }
    let configmap = one(&docs, "ConfigMap", None);
    let name = configmap["metadata"]["name"].as_str().unwrap();
    assert!(
        name.starts_with("modelcache-") && name.len() > "modelcache-".len(),
        "a generated name with a hash: {name}"
    );
    assert_eq!(
        configmap["data"]["config.toml"].as_str(),
        Some(
            std::fs::read_to_string(repo().join("deploy/overlays/aks/config.toml"))
                .unwrap()
                .as_str()
        )
    );
    let ds = one(&docs, "DaemonSet", Some("modelcache"));
    let config_volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(config_volume["configMap"]["name"].as_str(), Some(name));
    let identity =
        std::fs::read_to_string(repo().join("deploy/overlays/aks/identity.yaml")).unwrap();
    let sa = one(&docs, "ServiceAccount", Some("modelcache"));
    let client_id = sa["metadata"]["annotations"]["azure.workload.identity/client-id"]
        .as_str()
        .unwrap();
    assert!(identity.contains(client_id));
    let account = ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "AZURE_STORAGE_ACCOUNT_NAME")
        .and_then(|e| e["value"].as_str())
        .unwrap();
    assert!(identity.contains(account));

    // The base renders as shipped, with its own configuration and no operator's value.
    let Some(base) = render("deploy") else { return };
    let base_cm = one(&base, "ConfigMap", None);
    assert_eq!(
        base_cm["data"]["config.toml"].as_str(),
        Some(
            std::fs::read_to_string(repo().join("deploy/kubernetes/config.toml"))
                .unwrap()
                .as_str()
        )
    );
    let guide = std::fs::read_to_string(repo().join("docs/aks.md")).unwrap();
    for block in shell_blocks(&guide) {
        for forbidden in ["deploy/kubernetes", "deploy/examples", "sed -i"] {
            assert!(
                !block.contains(forbidden),
                "the guide's commands must leave the base alone ({forbidden}):\n{block}"
            );
        }
    }
    assert!(guide.contains("deploy/overlays/aks/identity.yaml"));
}

/// The vLLM example as an operator needs it: replaced, not surged, on a full GPU pool; run as a
/// non-root user with the writable places it needs; a startup probe for its long load; a
/// Service. The PodMonitor scrapes the agents' port.
#[test]
fn issue19_the_vllm_example_recreates_runs_as_non_root_and_has_probes_and_a_service() {
    let Some(docs) = render("deploy/overlays/aks") else {
        return;
    };
    let deployment = one(&docs, "Deployment", None);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["securityContext"]["runAsUser"].as_u64().unwrap() > 0);
    let vllm = named(&pod["containers"], "vllm");
    assert_eq!(vllm["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(vllm["securityContext"]["privileged"].is_null());
    let env = |var: &str| {
        vllm["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var)
            .and_then(|e| e["value"].as_str())
            .map(str::to_string)
    };
    let mounts: Vec<(String, String)> = vllm["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_string(),
                m["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let empty_dirs: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|v| !v["emptyDir"].is_null())
        .filter_map(|v| v["name"].as_str())
        .collect();
    let writable = |path: &str| {
        mounts.iter().any(|(at, volume)| {
            path.starts_with(at.as_str()) && empty_dirs.contains(&volume.as_str())
        })
    };
    for var in [
        "HOME",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
    ] {
        let path = env(var).unwrap_or_else(|| panic!("{var} is set"));
        assert!(writable(&path), "{var}={path} is in a writable emptyDir");
    }
    assert!(writable("/tmp"), "/tmp is writable");
    assert_eq!(vllm["startupProbe"]["httpGet"]["path"], "/health");
    assert!(vllm["startupProbe"]["failureThreshold"].as_u64().unwrap() >= 60);
    assert_eq!(vllm["readinessProbe"]["httpGet"]["path"], "/health");
    let service = one(&docs, "Service", None);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "the Service selects the pods"
        );
    }
    let port_name = service["spec"]["ports"][0]["targetPort"].as_str().unwrap();
    assert!(
        vllm["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port_name)
    );

    let monitor: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/monitoring/podmonitor.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(monitor["apiVersion"], "azmonitoring.coreos.com/v1");
    let ds = one(&docs, "DaemonSet", Some("modelcache"));
    let ds_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(&ds_labels[k.as_str().unwrap()], v);
    }
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    assert!(
        ds["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port)
    );
}

/// The ```sh blocks of a document, in order.
fn shell_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Issue 19: the guide's commands, in order, as one script, pass `shellcheck` (quoting, portable
/// syntax), and so do every other page's, the README's, the test command and the image script.
#[test]
fn issue19_the_guides_shell_commands_pass_shellcheck() {
    let found = std::process::Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_or_fail("shellcheck is not installed (the test command installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    // Every page a user reads: the guide, Dragonfly's, the README, and the rest of docs/.
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| format!("docs/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|d| d.ends_with(".md"))
        .collect();
    docs.push("README.md".to_string());
    docs.sort();
    for doc in &docs {
        let text = std::fs::read_to_string(repo().join(doc)).unwrap();
        let blocks = shell_blocks(&text);
        if ["docs/aks.md", "docs/dragonfly.md", "README.md"].contains(&doc.as_str()) {
            assert!(!blocks.is_empty(), "{doc} has shell commands");
        }
        if blocks.is_empty() {
            continue;
        }
        // Every block is closed, so none is left out of the script.
        let fences = text.lines().filter(|l| l.trim_start() == "```sh").count();
        assert_eq!(blocks.len(), fences, "{doc}: an unclosed ```sh block");
        let script = dir.path().join(doc.replace('/', "-") + ".sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\nset -eu\n{}", blocks.join("\n")),
        )
        .unwrap();
        checked.push(script);
    }
    checked.push(repo().join("scripts/test"));
    checked.push(repo().join("scripts/build-image"));
    let mut cmd = std::process::Command::new("shellcheck");
    cmd.args(["--severity=warning"]).args(&checked);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
}

/// A shell command of a document, its continuation lines joined (and the lines of a quoted
/// string that spans several): the first one that contains `needle`.
fn command_in(doc: &str, needle: &str) -> String {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let script = shell_blocks(&text).join("\n").replace("\\\n", " ");
    let mut lines = script.lines().skip_while(|l| !l.contains(needle));
    let mut command = lines
        .next()
        .unwrap_or_else(|| panic!("{doc} has no command with {needle}"))
        .to_string();
    while command.matches('\'').count() % 2 == 1 {
        command.push('\n');
        command.push_str(lines.next().expect("the quote closes"));
    }
    command
}

/// The words after `flag` in a command, up to the next flag.
fn words_after(command: &str, flag: &str) -> Vec<String> {
    command
        .split_whitespace()
        .skip_while(|w| *w != flag)
        .skip(1)
        .take_while(|w| !w.starts_with("--"))
        .map(|w| w.trim_matches('"').to_string())
        .collect()
}

/// The namespace of every workload in `docs` that mounts a hostPath volume (which the baseline
/// Pod Security Standard forbids).
fn host_path_namespaces(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .filter(|d| matches!(kind(d), "DaemonSet" | "Deployment"))
        .filter(|d| {
            d["spec"]["template"]["spec"]["volumes"]
                .as_sequence()
                .is_some_and(|v| v.iter().any(|v| !v["hostPath"].is_null()))
        })
        .map(|d| d["metadata"]["namespace"].as_str().unwrap().to_string())
        .collect()
}

/// The vLLM example lives in a namespace of its own, rendered with it, never `default`; every
/// namespace whose pods mount a hostPath allows it (Pod Security Admission) and is among the
/// exclusions the guide makes for Deployment Safeguards and Azure Policy, Dragonfly's included.
#[test]
fn the_vllm_example_has_its_own_namespace_and_the_guide_excludes_every_host_path_namespace() {
    let Some(examples) = render("deploy/examples") else {
        return;
    };
    let Some(overlay) = render("deploy/overlays/aks") else {
        return;
    };
    for docs in [&examples, &overlay] {
        let deployment = one(docs, "Deployment", Some("vllm-gpt-oss-120b"));
        let service = one(docs, "Service", Some("vllm-gpt-oss-120b"));
        let namespace = deployment["metadata"]["namespace"].as_str().unwrap();
        assert_ne!(namespace, "default");
        assert_eq!(service["metadata"]["namespace"].as_str(), Some(namespace));
        one(docs, "Namespace", Some(namespace));
    }
    let needed = host_path_namespaces(&overlay);
    assert!(
        needed.contains("modelcache") && needed.len() == 2,
        "{needed:?}"
    );
    for namespace in &needed {
        let object = one(&overlay, "Namespace", Some(namespace));
        assert_eq!(
            object["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "{namespace} mounts a hostPath, which baseline forbids"
        );
    }
    // Dragonfly's client mounts host paths too, in the namespace its Helm command names, which
    // the Dragonfly page labels the same way before installing.
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/dragonfly/values-aks.yaml")).unwrap(),
    )
    .unwrap();
    assert!(
        values["client"]["extraVolumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| !v["hostPath"].is_null())
    );
    let helm = command_in("docs/dragonfly.md", "helm upgrade --install");
    let dragonfly = words_after(&helm, "--namespace")[0].clone();
    let label = command_in("docs/dragonfly.md", "kubectl label namespace");
    assert!(
        label.contains(&format!(
            "namespace {dragonfly} pod-security.kubernetes.io/enforce=privileged"
        )),
        "{label}"
    );
    let mut all = needed.clone();
    all.insert(dragonfly);

    let safeguards = command_in("docs/aks.md", "az aks safeguards update");
    let excluded: BTreeSet<String> = words_after(&safeguards, "--excluded-ns")
        .into_iter()
        .collect();
    assert!(
        excluded.is_superset(&all),
        "{excluded:?} lacks some of {all:?}"
    );

    // The policy assignment's parameters are its own, with ours added by a jq program: the
    // namespaces it adds, and the initiatives' defaults where it sets none.
    let policy = command_in("docs/aks.md", "jq -c '");
    let program = policy
        .split("jq -c '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the jq program in single quotes");
    let quoted: BTreeSet<String> = program
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    let excluded = quoted;
    assert!(
        program.contains(".excludedNamespaces.value // ") && program.contains("| unique"),
        "{program}"
    );
    assert!(
        excluded.is_superset(&all),
        "{excluded:?} lacks some of {all:?}"
    );
    assert!(
        command_in("docs/aks.md", "az policy assignment update").contains("--params \"$PARAMS\""),
        "the merged parameters are what is applied"
    );
    // Where jq is installed, the program run on an assignment that audits and excludes a
    // namespace of its own, and on one that sets nothing: both keep what they had.
    if std::process::Command::new("jq")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        for (given, kept) in [
            (
                r#"{"effect":{"value":"audit"},"excludedNamespaces":{"value":["kube-system","team-x"]}}"#,
                vec!["team-x", "kube-system"],
            ),
            ("null", vec!["kube-system", "gatekeeper-system"]),
        ] {
            let mut jq = std::process::Command::new("jq");
            jq.args(["-c", program]).stdin(std::process::Stdio::piped());
            let mut child = jq.stdout(std::process::Stdio::piped()).spawn().unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), given.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "jq on {given}");
            let merged: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let list: Vec<&str> = merged["excludedNamespaces"]["value"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            for namespace in all.iter().map(String::as_str).chain(kept) {
                assert!(
                    list.contains(&namespace),
                    "{namespace} missing from {merged}"
                );
            }
            if given != "null" {
                assert_eq!(merged["effect"]["value"], "audit", "the effect is kept");
            }
        }
    }
    assert!(excluded.contains("kube-system"), "the defaults are kept");
}

/// The vLLM pod's first init container runs vLLM's own image (the same as the `vllm` container,
/// the overlay's registry included) with a no-op command, so the kubelet pulls that image when the
/// pod starts; the second is modelcache's `wait`. The guide imports the image the overlay names.
#[test]
fn the_vllm_pod_pulls_its_image_first_then_waits_for_the_model() {
    let Some(base) = render("deploy") else { return };
    let Some(overlay) = render("deploy/overlays/aks") else {
        return;
    };
    let no_ops: [&[&str]; 4] = [
        &["/bin/true"],
        &["true"],
        &["/bin/sh", "-c", "exit 0"],
        &["/bin/sh", "-c", "true"],
    ];
    let mut images = Vec::new();
    for docs in [&base, &overlay] {
        let pod = &one(docs, "Deployment", Some("vllm-gpt-oss-120b"))["spec"]["template"]["spec"];
        let inits = pod["initContainers"].as_sequence().unwrap();
        assert_eq!(inits.len(), 2, "{inits:?}");
        let vllm = named(&pod["containers"], "vllm");
        let image = vllm["image"].as_str().unwrap();
        let (pull, wait) = (&inits[0], &inits[1]);
        assert_eq!(
            pull["image"].as_str(),
            Some(image),
            "the same image as vllm"
        );
        let command = strings(&pull["command"]);
        assert!(
            no_ops.iter().any(|n| *n == command.as_slice()),
            "{command:?} is not a no-op"
        );
        assert!(pull["args"].is_null());
        for c in [pull, vllm] {
            assert_eq!(c["imagePullPolicy"], "IfNotPresent", "pulled once");
        }
        assert_eq!(wait["name"], "wait-for-model");
        assert!(wait["image"].as_str().unwrap().contains("modelcache"));
        assert_eq!(
            strings(&wait["args"]).first().map(String::as_str),
            Some("wait")
        );
        images.push(image.to_string());
    }
    // The overlay moves both containers to the registry the guide imports the image into.
    let kustomization: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/overlays/aks/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let (repository, tag) = images[0].split_once(':').unwrap();
    let entry = kustomization["images"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|i| i["name"] == repository)
        .expect("the overlay names vLLM's image");
    let new_name = entry["newName"].as_str().unwrap();
    assert_eq!(images[1], format!("{new_name}:{tag}"));
    let import = command_in("docs/aks.md", "az acr import");
    assert_eq!(words_after(&import, "--image"), [images[0].clone()]);
    assert_eq!(
        words_after(&import, "--source"),
        [format!("docker.io/{}", images[0])]
    );
    assert!(new_name.ends_with(&format!(".azurecr.io/{repository}")));
}

/// A normal start (the image pull, the longest `wait --timeout`, the whole startup probe) fits
/// in `progressDeadlineSeconds` with twenty minutes to spare for the image pull and the warm
/// read, so the Deployment never reports
/// failure while it progresses; and no probe gives up after the default one second.
#[test]
fn the_vllm_deployment_allows_its_slowest_normal_start_and_its_probes_wait_for_an_answer() {
    let Some(docs) = render("deploy/overlays/aks") else {
        return;
    };
    let deployment = one(&docs, "Deployment", Some("vllm-gpt-oss-120b"));
    let pod = &deployment["spec"]["template"]["spec"];
    let args = strings(&named(&pod["initContainers"], "wait-for-model")["args"]);
    let timeout = &args[args.iter().position(|a| a == "--timeout").unwrap() + 1];
    let timeout = humantime::parse_duration(timeout).unwrap().as_secs();
    let startup = &named(&pod["containers"], "vllm")["startupProbe"];
    let seconds = |v: &Value, default: u64| v.as_u64().unwrap_or(default);
    let startup_budget = seconds(&startup["initialDelaySeconds"], 0)
        + seconds(&startup["periodSeconds"], 10) * seconds(&startup["failureThreshold"], 3);
    let deadline = deployment["spec"]["progressDeadlineSeconds"]
        .as_u64()
        .expect("progressDeadlineSeconds is set");
    assert!(
        deadline >= timeout + startup_budget + 1200,
        "{deadline} s < wait {timeout} s + startup probe {startup_budget} s + 1200 s for the pull and the warm read"
    );
    let mut probes = 0;
    for key in ["initContainers", "containers"] {
        for c in pod[key].as_sequence().unwrap() {
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                if c[probe].is_null() {
                    continue;
                }
                probes += 1;
                assert!(
                    c[probe]["timeoutSeconds"].as_u64().unwrap_or(1) > 1,
                    "{} {probe} gives up after one second",
                    c["name"].as_str().unwrap()
                );
            }
        }
    }
    assert_eq!(probes, 3);
}

/// Copies a directory tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The guide's submodule layout: this repository at `modelcache/` and the operator's overlays
/// beside it, their paths pointing into the submodule as the guide shows, render exactly what
/// the overlays in `deploy/overlays` render.
#[test]
fn the_guides_submodule_layout_renders_what_the_overlays_render() {
    let guide = std::fs::read_to_string(repo().join("docs/aks.md")).unwrap();
    let root = tempfile::tempdir().unwrap();
    copy_tree(
        &repo().join("deploy"),
        &root.path().join("modelcache/deploy"),
    );
    let moves = [
        ("../../kubernetes", "../../modelcache/deploy/kubernetes"),
        ("../../examples", "../../modelcache/deploy/examples"),
        ("../../dragonfly", "../../modelcache/deploy/dragonfly"),
    ];
    for (_, to) in moves {
        assert!(guide.contains(to), "the guide shows {to}");
    }
    for overlay in ["aks", "aks-dragonfly"] {
        let theirs = root.path().join("overlays").join(overlay);
        copy_tree(&repo().join("deploy/overlays").join(overlay), &theirs);
        let path = theirs.join("kustomization.yaml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in moves {
            text = text.replace(&format!("- {from}\n"), &format!("- {to}\n"));
        }
        std::fs::write(&path, text).unwrap();
        let Some(expected) = render(&format!("deploy/overlays/{overlay}")) else {
            return;
        };
        // `render` joins the repository with its argument; an absolute path stays as it is.
        let Some(rendered) = render(theirs.to_str().unwrap()) else {
            return;
        };
        assert_eq!(
            rendered, expected,
            "overlays/{overlay} in the submodule layout"
        );
    }
}
