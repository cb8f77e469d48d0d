//! Property tests over every parser of untrusted bytes: safetensors headers, indexes, manifests,
//! journals, blob and model names, selection globs, the configuration file and API bodies.
//! Each input, random or built to look almost right, must end in `Ok` or a clear error: never a
//! panic, never a slow case, and never an accepted path outside the cache root.
//!
//! The seed is random unless `MODELCACHE_FUZZ_SEED` sets it; it and the case counts are printed
//! in the test command's closing report, so a failure is replayed with the same seed.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use modelcache::agent::http::PrefetchBody;
use modelcache::agent::sources::check_allowed;
use modelcache::config::agent::AgentConfig;
use modelcache::config::{Environment, Selection};
use modelcache::fetch::journal::{Journal, index_lines};
use modelcache::source::validate_name;
use modelcache::store::{Layout, ModelName};
use modelcache::verify::manifest::Manifest;
use modelcache::verify::structure::{ShardTensors, check_index, check_safetensors};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

use crate::support::report;

/// The slowest any one case may be; far above what a parser of these sizes needs, far below a
/// hang.
const SLOW_CASE: Duration = Duration::from_secs(2);

fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        std::env::var("MODELCACHE_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                    .unwrap_or(1)
            })
    })
}

/// Runs `check` over `cases` inputs from `strategy`; a panic or an `Err` fails the test with the
/// smallest input proptest finds, and the counts go to the report.
fn property<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), String>,
) where
    S::Value: std::fmt::Debug,
{
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed().to_le_bytes());
    key[8..8 + name.len().min(24)].copy_from_slice(&name.as_bytes()[..name.len().min(24)]);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    );
    let ran = AtomicU64::new(0);
    let slowest = AtomicU64::new(0);
    let started = Instant::now();
    let outcome = runner.run(&strategy, |input| {
        let case = Instant::now();
        let result = check(input);
        let took = case.elapsed();
        ran.fetch_add(1, Ordering::Relaxed);
        slowest.fetch_max(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if took > SLOW_CASE {
            return Err(TestCaseError::fail(format!("took {took:?}")));
        }
        result.map_err(TestCaseError::fail)
    });
    match outcome {
        Ok(()) => report(&format!(
            "property {name}: {} cases, 0 failures, slowest {:.1} ms, {:.1} s, seed {}",
            ran.load(Ordering::Relaxed),
            slowest.load(Ordering::Relaxed) as f64 / 1000.0,
            started.elapsed().as_secs_f64(),
            seed()
        )),
        Err(TestError::Fail(reason, input)) => panic!(
            "property {name} failed (MODELCACHE_FUZZ_SEED={}): {reason}\nsmallest input: {input:#?}",
            seed()
        ),
        Err(TestError::Abort(reason)) => panic!("property {name} aborted: {reason}"),
    }
}

/// Strings as hostile names are made of: path separators, dots, percent escapes, NUL,
/// backslashes, reserved names, multi-byte characters, and ordinary letters.
fn hostile_text() -> BoxedStrategy<String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2f".to_string()),
        Just("\\".to_string()),
        Just("\0".to_string()),
        Just(".modelcache".to_string()),
        Just(".partial".to_string()),
        Just("model.safetensors".to_string()),
        Just("é".to_string()),
        Just("*".to_string()),
        Just("{".to_string()),
        Just("[".to_string()),
        "[a-z0-9_-]{1,8}",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..8)
        .prop_map(|p| p.concat())
        .boxed()
}

/// Whether a path accepted relative to a directory stays inside it (lexically: every component
/// a plain name).
fn stays_inside(relative: &str) -> bool {
    !relative.is_empty()
        && Path::new(relative)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[test]
fn blob_and_model_names_never_leave_the_cache_root() {
    property("blob names", 10_000, hostile_text(), |name| {
        if validate_name(&name).is_ok() && !stays_inside(&name) {
            return Err(format!("accepted {name:?}, which leaves its directory"));
        }
        Ok(())
    });
    let layout = Layout::new("/cache");
    property("model names", 5_000, hostile_text(), |name| {
        if let Ok(model) = ModelName::new(&name) {
            for path in [
                layout.model_link(&model),
                layout.staging_dir(&model),
                layout.revision_dir(&model, "r"),
            ] {
                let rest = path.strip_prefix("/cache").map_err(|e| e.to_string())?;
                if !rest.to_str().is_some_and(stays_inside) {
                    return Err(format!("model {name:?} maps to {}", path.display()));
                }
            }
        }
        Ok(())
    });
}

/// A safetensors file: the 8-byte header length (true or arbitrary), a JSON header built from
/// arbitrary tensors (or arbitrary bytes), and a data section of arbitrary length.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32".to_string()),
        Just("BF16".to_string()),
        Just("U8".to_string()),
        Just("F8_E4M3".to_string()),
        "[A-Z0-9_]{0,6}",
    ];
    let offset = prop_oneof![0u64..4096, any::<u64>()];
    let shape = prop::collection::vec(prop_oneof![0u64..64, any::<u64>()], 0..4);
    let tensor = (hostile_text(), dtype, shape, offset.clone(), offset);
    let header = prop::collection::vec(tensor, 0..6).prop_map(|tensors| {
        let map: serde_json::Map<String, serde_json::Value> = tensors
            .into_iter()
            .map(|(name, dtype, shape, a, b)| {
                (
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}),
                )
            })
            .collect();
        serde_json::to_vec(&map).unwrap_or_default()
    });
    let header = prop_oneof![3 => header, 1 => prop::collection::vec(any::<u8>(), 0..256)];
    (
        header,
        prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        0usize..4096,
    )
        .prop_map(|(header, stated_len, data)| {
            let len = stated_len.unwrap_or(header.len() as u64);
            let mut file = len.to_le_bytes().to_vec();
            file.extend_from_slice(&header);
            file.resize(file.len() + data, 0);
            file
        })
}

#[test]
fn safetensors_headers_are_accepted_or_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard.safetensors");
    let raw = prop::collection::vec(any::<u8>(), 0..64);
    let files = prop_oneof![4 => safetensors_file(), 1 => raw];
    property("safetensors headers", 4_000, files, |bytes| {
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        if let Ok((shard, header)) = check_safetensors(&path, "shard.safetensors") {
            let total = shard.total_bytes() + header;
            if total > bytes.len() as u64 {
                return Err(format!(
                    "accepted {total} bytes of tensors in a {}-byte file",
                    bytes.len()
                ));
            }
        }
        Ok(())
    });
}

#[test]
fn indexes_are_accepted_or_refused_cleanly() {
    let shards: HashMap<String, ShardTensors> = [
        ("model-00001-of-00002.safetensors", "a"),
        ("model-00002-of-00002.safetensors", "b"),
    ]
    .into_iter()
    .map(|(shard, tensor)| {
        (
            shard.to_string(),
            ShardTensors::from_sizes([(tensor, 16u64)]),
        )
    })
    .collect();
    let shard_name = prop_oneof![
        Just("model-00001-of-00002.safetensors".to_string()),
        Just("model-00002-of-00002.safetensors".to_string()),
        Just("../model-00001-of-00002.safetensors".to_string()),
        Just("/etc/passwd".to_string()),
        hostile_text(),
    ];
    let structured = (
        prop::collection::vec((hostile_text(), shard_name), 0..8),
        prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    )
        .prop_map(|(map, total)| {
            let weight_map: serde_json::Map<String, serde_json::Value> =
                map.into_iter().map(|(t, s)| (t, s.into())).collect();
            let index = match total {
                Some(t) => {
                    serde_json::json!({"metadata": {"total_size": t}, "weight_map": weight_map})
                }
                None => serde_json::json!({"weight_map": weight_map}),
            };
            serde_json::to_vec(&index).unwrap_or_default()
        });
    let bytes = prop_oneof![4 => structured, 1 => prop::collection::vec(any::<u8>(), 0..128)];
    property("safetensors indexes", 5_000, bytes, |bytes| {
        if check_index("model.safetensors.index.json", &bytes, &shards).is_ok() {
            let index: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            for shard in index["weight_map"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
            {
                let shard = shard.as_str().unwrap_or_default();
                if !shards.contains_key(shard) {
                    return Err(format!("accepted an index naming {shard:?}"));
                }
            }
        }
        Ok(())
    });
}

#[test]
fn manifests_are_accepted_or_refused_cleanly() {
    let hash = prop_oneof![
        Just("0".repeat(64)),
        "[0-9a-f]{64}",
        "[0-9A-Fa-f]{0,70}",
        any::<String>(),
    ];
    let entry = (hostile_text(), any::<u64>(), hash)
        .prop_map(|(path, size, b3)| serde_json::json!({"path": path, "size": size, "blake3": b3}));
    let format = prop_oneof![Just("modelcache.manifest/v1".to_string()), any::<String>()];
    let algorithm = prop_oneof![Just("blake3".to_string()), any::<String>()];
    let structured = (format, algorithm, prop::collection::vec(entry, 0..6)).prop_map(
        |(format, algorithm, files)| {
            serde_json::to_vec(
                &serde_json::json!({"format": format, "algorithm": algorithm, "files": files}),
            )
            .unwrap_or_default()
        },
    );
    let bytes = prop_oneof![4 => structured, 1 => prop::collection::vec(any::<u8>(), 0..128)];
    property("manifests", 5_000, bytes, |bytes| {
        if let Ok(manifest) = Manifest::parse(&bytes, "manifest") {
            for entry in manifest.entries() {
                if !stays_inside(&entry.path) {
                    return Err(format!("accepted the path {:?}", entry.path));
                }
            }
        }
        Ok(())
    });
}

#[test]
fn journals_load_whatever_a_crash_or_an_intruder_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.jsonl");
    let line = (
        hostile_text(),
        any::<u64>(),
        any::<String>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof!["[0-9a-f]{64}", any::<String>()],
        any::<bool>(),
    )
        .prop_map(|(p, size, etag, chunk, index, digest, checked)| {
            let mut text =
                serde_json::json!({"path": p, "size": size, "etag": etag, "chunk": chunk,
                "index": index, "digest": digest, "checked": checked})
                .to_string()
                .into_bytes();
            text.push(b'\n');
            text
        });
    let piece = prop_oneof![4 => line, 1 => prop::collection::vec(any::<u8>(), 0..64)];
    // Whole lines and arbitrary bytes, then cut anywhere (a torn last write).
    let journal = (
        prop::collection::vec(piece, 0..8),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(pieces, cut)| {
            let mut bytes = pieces.concat();
            let keep = if bytes.is_empty() {
                0
            } else {
                cut.index(bytes.len() + 1)
            };
            bytes.truncate(keep);
            bytes
        });
    property("journals", 3_000, journal, |bytes| {
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        let lines = Journal::load(&path).map_err(|e| e.to_string())?;
        for line in &lines {
            let _ = line.digest_bytes();
        }
        let _ = index_lines(&lines);
        Ok(())
    });
}

#[test]
fn selection_globs_compile_or_are_refused() {
    let patterns = prop::collection::vec(hostile_text(), 0..4).boxed();
    let input = (patterns.clone(), patterns, any::<bool>(), hostile_text());
    property(
        "selection globs",
        5_000,
        input,
        |(include, exclude, defaults, path)| {
            if let Ok(selection) = Selection::new(&include, &exclude, defaults) {
                let _ = selection.is_selected(&path);
            }
            Ok(())
        },
    );
}

/// A configuration file: known keys in their sections with values of any type, or any text.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just(("", "cache_root")),
        Just(("listen", "read")),
        Just(("listen", "admin")),
        Just(("listen", "token_file")),
        Just(("listen", "max_connections")),
        Just(("fetch", "concurrency")),
        Just(("fetch", "chunk_size")),
        Just(("fetch", "stall_timeout")),
        Just(("fetch", "max_attempts")),
        Just(("cache", "budget")),
        Just(("cache", "scrub_rate")),
        Just(("cache", "warm_page_cache")),
        Just(("disk", "devices")),
        Just(("disk", "raid_chunk")),
        Just(("disk", "label")),
        Just(("api", "allowed_sources")),
        Just(("models", "name")),
        Just(("models", "source")),
        Just(("models", "include")),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        hostile_text().prop_map(|s| toml::Value::String(s).to_string()),
        "[0-9]{1,4}(B|KiB|MiB|GiB|%|s|m|h)?".prop_map(|s| format!("\"{s}\"")),
        prop::collection::vec(hostile_text(), 0..3).prop_map(|v| toml::Value::Array(
            v.into_iter().map(toml::Value::String).collect()
        )
        .to_string()),
    ];
    let structured = prop::collection::vec((key, value), 0..6).prop_map(|entries| {
        let mut text = String::new();
        for (section, (key, value)) in entries.iter().map(|((s, k), v)| (*s, (*k, v))) {
            match section {
                "" => text.insert_str(0, &format!("{key} = {value}\n")),
                "models" => text.push_str(&format!("[[models]]\n{key} = {value}\n")),
                s => text.push_str(&format!("[{s}]\n{key} = {value}\n")),
            }
        }
        text
    });
    prop_oneof![4 => structured, 1 => any::<String>()]
}

#[test]
fn configuration_files_load_or_say_what_is_wrong() {
    let env = Environment::from_pairs(Vec::<(String, String)>::new());
    property("configuration files", 5_000, config_text(), |text| {
        match AgentConfig::from_toml(&text, "fuzz.toml", &env, &[]) {
            Ok(config) => {
                if !config.admin_socket.is_absolute() {
                    return Err(format!(
                        "accepted a relative admin socket {}",
                        config.admin_socket.display()
                    ));
                }
            }
            Err(e) if e.to_string().trim().is_empty() => {
                return Err("an error without a message".into());
            }
            Err(_) => {}
        }
        Ok(())
    });
}

#[test]
fn api_bodies_and_sources_are_accepted_or_refused_cleanly() {
    let source = prop_oneof![
        hostile_text().prop_map(|s| format!("file:///mnt/models/{s}")),
        hostile_text().prop_map(|s| format!("az://models/{s}")),
        hostile_text().prop_map(|s| format!("file://{s}")),
        hostile_text(),
    ]
    .boxed();
    let structured = (
        prop_oneof![Just(None), source.clone().prop_map(Some)],
        prop_oneof![Just(None), hostile_text().prop_map(Some)],
        prop_oneof![
            Just(None),
            prop::collection::vec(hostile_text(), 0..3).prop_map(Some)
        ],
        prop_oneof![Just(None), any::<bool>().prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(source, account, include, pin, extra)| {
            let mut body = serde_json::json!({
                "source": source, "account": account, "include": include, "pin": pin,
            });
            if extra {
                body["unknown"] = serde_json::json!(1);
            }
            serde_json::to_vec(&body).unwrap_or_default()
        });
    let bytes = prop_oneof![4 => structured, 1 => prop::collection::vec(any::<u8>(), 0..128)];
    property("API bodies", 5_000, bytes, |bytes| {
        if let Err(e) = PrefetchBody::parse(&bytes) {
            if e.is_empty() {
                return Err("an error without a message".into());
            }
        }
        Ok(())
    });
    let allowed = vec![
        "file:///mnt/models/".to_string(),
        "az://models/".to_string(),
    ];
    property("allowed sources", 10_000, source, |source| {
        if check_allowed(&source, &allowed).is_ok() {
            let under = ["file:///mnt/models/", "az://models/"]
                .iter()
                .any(|p| source.starts_with(p) || source == p.trim_end_matches('/'));
            let path = source.split(['?', '#']).next().unwrap_or_default();
            let decoded = path.replace("%2e", ".").replace("%2E", ".");
            let dotted = decoded.split(['/', '\\']).any(|s| s == "." || s == "..");
            if !under || dotted {
                return Err(format!("allowed {source:?}"));
            }
        }
        Ok(())
    });
}

/// Model signatures (OpenSSF Model Signing bundles), random or the reference signer's (signed
/// with a key, and with a certificate chain) with bytes changed, inserted or cut: a clean error,
/// or, where the change missed what the signature covers, exactly what the publisher signed;
/// never another file list.
#[test]
fn model_signatures_are_verified_or_refused_cleanly() {
    use modelcache::verify::signature::{Trust, TrustedKey, TrustedRoot, verify};
    const BY_KEY: &[u8] = include_bytes!("../../src/verify/fixtures/oms/sha256.sig");
    const BY_CERTIFICATE: &[u8] = include_bytes!("../../src/verify/fixtures/oms/certificate.sig");
    let trust = Trust {
        keys: vec![
            TrustedKey::from_pem(
                "publisher",
                include_str!("../../src/verify/fixtures/oms/key.pub.pem"),
            )
            .unwrap(),
        ],
        roots: vec![
            TrustedRoot::from_pem(
                "root",
                include_str!("../../src/verify/fixtures/oms/root.pem"),
            )
            .unwrap(),
        ],
    };
    let originals: Vec<_> = [BY_KEY, BY_CERTIFICATE]
        .iter()
        .map(|b| verify(b, &trust).unwrap().resources)
        .collect();
    let edit = (0..2usize, any::<prop::sample::Index>(), any::<u8>(), 0..3u8).prop_map(
        |(which, at, byte, how)| {
            let mut bytes = [BY_KEY, BY_CERTIFICATE][which].to_vec();
            let at = at.index(bytes.len());
            match how {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => bytes.truncate(at),
            }
            bytes
        },
    );
    let bytes = prop_oneof![
        6 => edit,
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => hostile_text().prop_map(String::into_bytes),
    ];
    property("model signatures", 3_000, bytes, |bytes| {
        match verify(&bytes, &trust) {
            Ok(signed) if !originals.contains(&signed.resources) => Err(format!(
                "accepted another file list: {:?}",
                signed.resources
            )),
            _ => Ok(()),
        }
    });
}
