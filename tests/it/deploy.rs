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

/// Every manifest file (not the kustomization) and its documents.
fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    let mut out = Vec::new();
    for dir in ["deploy/kubernetes", "deploy/examples"] {
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
    let files: Vec<PathBuf> = manifests().into_iter().map(|(p, _)| p).collect();
    assert!(files.len() >= 5, "{files:?}");
    let mut cmd = std::process::Command::new(&validator);
    cmd.args(["--strict", "--no-warn"]).args(&files);
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out).matches("passed").count() + stderr(&out).matches("passed").count(),
        files.len()
    );
    // The kustomization lists exactly the resource files beside it.
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
    assert_eq!(
        strings(&top["resources"]),
        ["kubernetes", "examples/vllm-gpt-oss-120b.yaml"]
    );
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
fn the_vllm_example_tolerates_every_taint_the_guide_puts_on_the_gpu_pool() {
    let guide = std::fs::read_to_string(repo().join("docs/aks.md")).unwrap();
    let taints: Vec<&str> = guide
        .split("--node-taints ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(!taints.is_empty(), "the guide adds a tainted GPU pool");
    for (path, docs) in manifests() {
        for doc in docs {
            let spec = &doc["spec"]["template"]["spec"];
            let Some(tolerations) = spec["tolerations"].as_sequence() else {
                continue;
            };
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
}

#[test]
fn manifests_pass_only_arguments_variables_and_keys_modelcache_knows() {
    let docs = manifests();
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
    let mut check = modelcache();
    check.args(["agent", "--check", "--config"]).arg(&path);
    let out = run(&mut check, Duration::from_secs(30));
    assert!(out.status.success(), "config.toml: {}", stderr(&out));
    assert!(
        stdout(&out).contains("gpt-oss-120b (pinned)"),
        "{}",
        stdout(&out)
    );

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
    let init = &spec["initContainers"][0];
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
    let vllm_c = &spec["containers"][0];
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
