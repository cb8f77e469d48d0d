//! Issue 18: hostile sizes under the DaemonSet's memory limit, in a real memory cgroup. Shard
//! headers that claim 90 MB each and a 1 GB index are refused with a clear error before they
//! are read; a model whose headers are just under the limits is fetched; the agent is never
//! OOM-killed and its peak RSS stays under the limit.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::agent::{Agent, config, model_entry};
use crate::support::*;

const SHARDS: usize = 16;

fn shard_name(i: usize) -> String {
    format!("model-{i:05}-of-{:05}.safetensors", SHARDS - 1)
}

/// Sixteen shards whose length fields claim a 90 MB header each (1.44 GB in all), sparse.
fn claims_huge_headers(dir: &Path) {
    for i in 0..SHARDS {
        let mut f = std::fs::File::create(dir.join(shard_name(i))).unwrap();
        f.write_all(&90_000_000u64.to_le_bytes()).unwrap();
        f.set_len(90_000_100).unwrap();
    }
    std::fs::write(dir.join("config.json"), "{}").unwrap();
}

/// A small good model whose index is a 1 GB (sparse) file.
fn huge_index(dir: &Path) {
    let model = small_model(10_000, 61);
    for f in files_under(model.path()) {
        let to = dir.join(&f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(model.path().join(&f), to).unwrap();
    }
    let index = std::fs::File::create(dir.join("model.safetensors.index.json")).unwrap();
    index.set_len(1 << 30).unwrap();
}

/// Sixteen shards with valid headers of about `header_bytes` each (empty tensors and one real
/// one), and an index mapping the real ones: as large as the limits allow.
fn large_valid_headers(dir: &Path, header_bytes: usize) {
    let mut weight_map = serde_json::Map::new();
    for i in 0..SHARDS {
        let mut header = String::with_capacity(header_bytes + 256);
        header.push('{');
        let mut n = 0;
        while header.len() < header_bytes {
            header.push_str(&format!(
                "\"layers.{n}.expert_{i}.bias\":{{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}},"
            ));
            n += 1;
        }
        header.push_str(&format!(
            "\"w{i}\":{{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}}}"
        ));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[7u8; 16]);
        std::fs::write(dir.join(shard_name(i)), bytes).unwrap();
        weight_map.insert(format!("w{i}"), shard_name(i).into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
}

/// The DaemonSet's `limits.memory` and the environment it sets.
fn daemonset_limit_and_env() -> (u64, Vec<(String, String)>) {
    let daemonset = crate::nodeboot::yaml_docs("deploy/kubernetes/daemonset.yaml");
    let agent = &daemonset[0]["spec"]["template"]["spec"]["containers"][0];
    let limit = crate::vm::quantity(agent["resources"]["limits"]["memory"].as_str().unwrap());
    let env = agent["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .filter(|(name, _)| name != "AZURE_STORAGE_ACCOUNT_NAME")
        .collect();
    (limit, env)
}

#[test]
fn issue18_hostile_sizes_are_refused_under_the_daemonsets_memory_limit() {
    let (limit, env) = daemonset_limit_and_env();
    let Some(group) = MemoryCgroup::new(limit) else {
        return;
    };
    let in_group = || {
        let mut cmd = group.modelcache();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    };
    let sources = tempfile::tempdir().unwrap();
    let (headers, index, large) = (
        sources.path().join("headers"),
        sources.path().join("index"),
        sources.path().join("large"),
    );
    for d in [&headers, &index, &large] {
        std::fs::create_dir(d).unwrap();
    }
    claims_huge_headers(&headers);
    huge_index(&index);
    // 14 MiB a header: 224 MiB of headers in all, under both limits.
    large_valid_headers(&large, 14 << 20);

    // The command line, in the group: refused in a moment, before reading the headers.
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = in_group();
    cmd.args(["prefetch", "--json", "--model", "m", "--cache-root"])
        .arg(cache.path())
        .arg(format!("--source=file://{}", headers.display()));
    let out = run(&mut cmd, Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("safetensors header is 90000000 bytes") && err.contains("limit"),
        "{err}"
    );

    // The agent, as the DaemonSet runs it, with all three configured at once.
    let dir = tempfile::tempdir().unwrap();
    let models = [("headers", &headers), ("index", &index), ("large", &large)]
        .iter()
        .map(|(name, path)| model_entry(name, &format!("file://{}", path.display()), false))
        .collect::<String>();
    let agent = Agent::start_in(
        dir.path(),
        &config(&dir.path().join("cache"), &models, ""),
        "http://127.0.0.1:9",
        &[],
        in_group(),
    );
    let failed = |name: &str, says: &str| {
        let j = agent.until(
            &format!("/v1/models/{name}"),
            Duration::from_secs(120),
            |_, j| j["state"] == "failed",
        );
        let error = j["last_error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(says), "{name}: {j}");
    };
    failed("headers", "safetensors header is 90000000 bytes, over the");
    failed("index", "index is 1073741824 bytes, over the");
    let ready = agent.until("/v1/models/large", Duration::from_secs(300), |_, j| {
        j["state"] == "ready"
    });
    assert_eq!(ready["bytes_total"], ready["bytes_done"], "{ready}");
    // Still alive, and trying again later rather than dying in a loop.
    let (status, _) = crate::agent::http(&agent.read, "GET", "/healthz", &[], "");
    assert_eq!(status, 200);
    let peak = peak_rss(agent.pid());
    assert_eq!(group.oom_kills(), 0, "the agent was OOM-killed");
    assert!(peak > 0 && peak < limit, "peak RSS {peak} of {limit}");
    report(&format!(
        "memory: agent peak RSS {} MiB under a {} MiB cgroup limit (16 shards claiming 90 MB headers and a 1 GB index refused; 16 valid 14 MiB headers fetched)",
        peak >> 20,
        limit >> 20
    ));
}
