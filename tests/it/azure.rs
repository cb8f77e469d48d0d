//! Prefetch from a real Azurite.

use std::time::Duration;

use crate::support::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// `prefetch --json` of `url` into `cache` through `endpoint`, 8 ranges at a time.
fn prefetch_via(endpoint: String, url: &str, cache: &std::path::Path) -> std::process::Output {
    let mut cmd = prefetch_cmd(Some(&endpoint), url, cache, &["--concurrency", "8"]);
    run(&mut cmd, Duration::from_secs(120))
}

#[test]
fn model_uploaded_in_blocks_is_prefetched_byte_identical_and_skips_original() {
    let Some(az) = azurite() else { return };
    let model = runtime().block_on(azure_model(az, 200_000, true));
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(az.endpoint(), &model.url(), cache.path());
    let s = summary(&out);
    assert_eq!(s["verification"], "blake3");
    assert_eq!(s["bytes_fetched"], s["bytes_total"]);
    assert_eq!(s["bytes_reused"], 0);
    let link = cache.path().join("models/gpt-oss-120b");
    assert_published_identical(model.source.path(), &link);
    assert!(!link.join("original").exists());
    assert!(link.join(".modelcache/ready.json").exists());
    assert!(
        !cache.path().join("staging/gpt-oss-120b").exists(),
        "staging is cleaned after publish"
    );

    // A second run finds the revision published and fetches nothing.
    let again = summary(&prefetch_via(az.endpoint(), &model.url(), cache.path()));
    assert_eq!(again["already_published"], true);
    assert_eq!(again["bytes_fetched"], 0);
    assert_eq!(again["revision"], s["revision"]);
}

#[test]
fn blob_replaced_after_listing_restarts_from_a_new_listing() {
    let Some(az) = azurite() else { return };
    let rt = runtime();
    let model = rt.block_on(azure_model(az, 200_000, true));
    // The replacement: shard 3 from a model with other bytes but the same tensors, and a
    // manifest that matches the new content.
    let other = small_model(200_000, 99);
    let shard = "model-00003-of-00014.safetensors";
    let expected = tempfile::tempdir().unwrap();
    for rel in files_under(model.source.path()) {
        let from = if rel == shard {
            other.path().join(&rel)
        } else {
            model.source.path().join(&rel)
        };
        let to = expected.path().join(&rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
    let mut entries = Vec::new();
    for rel in files_under(expected.path()) {
        if rel.starts_with("original/") || rel.starts_with("metal/") {
            continue;
        }
        let data = std::fs::read(expected.path().join(&rel)).unwrap();
        entries.push(modelcache::verify::manifest::ManifestEntry {
            path: rel,
            size: data.len() as u64,
            blake3: blake3::hash(&data).to_hex().to_string(),
        });
    }
    let manifest = modelcache::verify::manifest::Manifest::from_entries(entries)
        .unwrap()
        .to_json();
    let new_shard = std::fs::read(expected.path().join(shard)).unwrap();

    let proxy = crate::proxy::FaultProxy::start(az.port);
    let store = model.store.clone();
    proxy.hook(
        shard,
        Box::new(move || {
            Box::pin(async move {
                upload_blocks(&store, &format!("gpt-oss-120b/{shard}"), &new_shard).await;
                put_small(
                    &store,
                    "gpt-oss-120b/modelcache.manifest.json",
                    manifest.as_bytes(),
                )
                .await;
            })
        }),
    );
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(proxy.endpoint(), &model.url(), cache.path());
    let s = summary(&out);
    assert!(s["source_restarts"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        stderr(&out).contains("changed in the source"),
        "{}",
        stderr(&out)
    );
    assert_published_identical(expected.path(), &cache.path().join("models/gpt-oss-120b"));
}

#[test]
fn corrupted_shard_under_a_stale_manifest_is_refused_and_nothing_is_published() {
    let Some(az) = azurite() else { return };
    let rt = runtime();
    let model = rt.block_on(azure_model(az, 200_000, true));
    // Same size, different bytes: the manifest no longer describes the blob.
    let shard = "model-00005-of-00014.safetensors";
    let mut data = std::fs::read(model.source.path().join(shard)).unwrap();
    let n = data.len();
    data[n - 100] ^= 0xff;
    rt.block_on(upload_blocks(
        &model.store,
        &format!("gpt-oss-120b/{shard}"),
        &data,
    ));

    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(az.endpoint(), &model.url(), cache.path());
    assert_eq!(out.status.code(), Some(5), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(shard) && err.contains("BLAKE3"), "{err}");
    assert!(
        err.contains("fetching it once more"),
        "the file is re-fetched once first: {err}"
    );
    assert!(!cache.path().join("models/gpt-oss-120b").exists());
    let store_dir = cache.path().join("store/gpt-oss-120b");
    assert!(!store_dir.exists() || std::fs::read_dir(&store_dir).unwrap().next().is_none());
}

#[test]
fn blob_names_that_escape_the_model_are_refused() {
    let Some(az) = azurite() else { return };
    let container = unique("hostile");
    create_container(az, &container);
    let source = small_model(50_000, 3);
    let store = store(az, &container);
    runtime().block_on(upload_dir(&store, source.path(), "m"));
    // A literal `..` segment, percent-encoded so no HTTP layer resolves it away.
    put_raw_blob(az, &container, "m/sub/%2E%2E/%2E%2E/evil.json", b"{}");
    let listed = runtime().block_on(async {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect::<Vec<_>>()
            .await
    });
    eprintln!("listing: {listed:?}");

    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(az.endpoint(), &format!("az://{container}/m"), cache.path());
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout: {} stderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains(".."), "{err}");
    assert!(!cache.path().join("models/gpt-oss-120b").exists());
    assert!(!cache.path().join("evil.json").exists());
}

#[test]
fn a_missing_container_is_a_clear_source_error() {
    let Some(az) = azurite() else { return };
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(
        az.endpoint(),
        "az://no-such-container/gpt-oss-120b",
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("az://no-such-container/gpt-oss-120b"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
}

/// A model vLLM could not load is refused from its headers and index, read with small ranged
/// GETs, before any tensor data is fetched: here an index (with a manifest that matches it)
/// maps a tensor to a shard that is not in the model.
#[test]
fn a_broken_index_is_refused_before_the_download_begins() {
    let Some(az) = azurite() else { return };
    let rt = runtime();
    let model = rt.block_on(azure_model(az, 400_000, false));
    let index = "model.safetensors.index.json";
    let mut parsed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.source.path().join(index)).unwrap()).unwrap();
    parsed["weight_map"]["extra.weight"] = "model-00099-of-00014.safetensors".into();
    rt.block_on(upload_blocks(
        &model.store,
        &format!("gpt-oss-120b/{index}"),
        &serde_json::to_vec(&parsed).unwrap(),
    ));
    let mut manifest = modelcache();
    with_emulator(&mut manifest, &az.endpoint());
    manifest.args(["manifest", "--upload", "--source", &model.url()]);
    let out = run(&mut manifest, Duration::from_secs(120));
    assert!(out.status.success(), "manifest --upload: {}", stderr(&out));

    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(az.endpoint(), &model.url(), cache.path());
    assert_refused_before_download(
        &out,
        cache.path(),
        "model-00099-of-00014.safetensors, which is not in the model",
    );
}

/// A zero-byte shard cannot hold a header: refused before the download, without asking Blob
/// for an empty range.
#[test]
fn an_empty_shard_is_refused_before_the_download_begins() {
    let Some(az) = azurite() else { return };
    let rt = runtime();
    let model = rt.block_on(azure_model(az, 100_000, false));
    rt.block_on(put_small(
        &model.store,
        "gpt-oss-120b/extra.safetensors",
        b"",
    ));
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_via(az.endpoint(), &model.url(), cache.path());
    assert_refused_before_download(
        &out,
        cache.path(),
        "extra.safetensors is not a valid safetensors file",
    );
}
