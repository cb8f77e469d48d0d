//! Structure checks that need no manifest: every `.safetensors` header (through the
//! `safetensors` crate) and every `*.safetensors.index.json` against the shards it names.
//!
//! The header check proves a shard is complete and self-consistent: header length at most
//! 100 MB, valid JSON, offsets sorted and contiguous from 0, each tensor's byte size equal to its
//! element count times its dtype's size (U8, BF16 and the 4/6/8-bit float types included), and
//! `8 + N + last end` equal to the file length. It cannot prove the bytes are the right ones;
//! only the manifest's BLAKE3 does that.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use safetensors::SafeTensors;
use serde::Deserialize;

use super::VerifyError;
use crate::source::validate_name;

/// The tensors of one checked shard: name → byte size.
#[derive(Debug, Clone, Default)]
pub struct ShardTensors {
    /// Tensor name → bytes of data.
    pub tensors: HashMap<String, u64>,
}

/// Whether a relative path names a safetensors shard.
pub fn is_safetensors(path: &str) -> bool {
    path.ends_with(".safetensors")
}

/// Whether a relative path names a safetensors index.
pub fn is_index(path: &str) -> bool {
    path.ends_with(".safetensors.index.json")
}

/// Checks one shard's header and length; `name` is the shard's path relative to the model.
pub fn check_safetensors(file: &Path, name: &str) -> Result<ShardTensors, VerifyError> {
    let io = |source| VerifyError::Io {
        path: file.to_path_buf(),
        source,
    };
    let handle = File::open(file).map_err(io)?;
    let len = handle.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(VerifyError::Safetensors {
            path: name.to_string(),
            source: safetensors::SafeTensorError::HeaderTooSmall,
        });
    }
    // The crate checks `8 + N + data end == buffer length`, so it wants the whole file as a
    // slice; a map gives that while only the header pages are ever read.
    #[expect(
        unsafe_code,
        reason = "memory-mapping a file is unsafe in Rust's model"
    )]
    // SAFETY: the map is read-only and private to this function. The file sits in the cache's own
    // staging or store directory, which only this process writes, and every write to it finished
    // before verification began. Another process truncating it would fault the read, not corrupt
    // memory we rely on; the map is dropped before returning.
    let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(io)?;
    let (_, metadata) =
        SafeTensors::read_metadata(&map).map_err(|source| VerifyError::Safetensors {
            path: name.to_string(),
            source,
        })?;
    Ok(tensors_of(&metadata))
}

/// The longest header a shard may have (the `safetensors` crate's own limit).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Where a shard's header ends (8 + its length field), judged from the first bytes of the file
/// (at least 8) and the file's size: the byte count to read before
/// [`check_safetensors_header`] can run.
pub fn header_end(first: &[u8], file_len: u64, name: &str) -> Result<u64, VerifyError> {
    let fail = |source| VerifyError::Safetensors {
        path: name.to_string(),
        source,
    };
    let Some(len_field) = first.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return Err(fail(safetensors::SafeTensorError::HeaderTooSmall));
    };
    let n = u64::from_le_bytes(len_field);
    if n > MAX_HEADER_LEN {
        return Err(fail(safetensors::SafeTensorError::HeaderTooLarge));
    }
    let end = 8 + n;
    if end > file_len {
        return Err(fail(safetensors::SafeTensorError::InvalidHeaderLength));
    }
    Ok(end)
}

/// Checks a shard from its header alone (`head` holds at least the first [`header_end`] bytes)
/// and the size the source lists for it: the same rules as [`check_safetensors`], before a byte
/// of tensor data is fetched.
pub fn check_safetensors_header(
    head: &[u8],
    file_len: u64,
    name: &str,
) -> Result<ShardTensors, VerifyError> {
    let fail = |source| VerifyError::Safetensors {
        path: name.to_string(),
        source,
    };
    let end = header_end(head, file_len, name)?;
    let json = usize::try_from(end)
        .ok()
        .and_then(|end| head.get(8..end))
        .ok_or(fail(safetensors::SafeTensorError::InvalidHeaderLength))?;
    let text = std::str::from_utf8(json)
        .map_err(|e| fail(safetensors::SafeTensorError::InvalidHeader(e)))?;
    // Deserializing `Metadata` runs the crate's own validation (offsets, dtype sizes).
    let metadata: safetensors::tensor::Metadata = serde_json::from_str(text).map_err(|e| {
        fail(safetensors::SafeTensorError::InvalidHeaderDeserialization(
            e,
        ))
    })?;
    if end.checked_add(metadata.data_len() as u64) != Some(file_len) {
        return Err(fail(safetensors::SafeTensorError::MetadataIncompleteBuffer));
    }
    Ok(tensors_of(&metadata))
}

fn tensors_of(metadata: &safetensors::tensor::Metadata) -> ShardTensors {
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(tensor, info)| {
            let (begin, end) = info.data_offsets;
            (tensor, (end - begin) as u64)
        })
        .collect();
    ShardTensors { tensors }
}

#[derive(Debug, Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: Option<IndexMetadata>,
    weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct IndexMetadata {
    #[serde(default)]
    total_size: Option<u64>,
}

/// Checks an index (`index_path` relative to the model, `bytes` its contents) against the
/// checked shards, keyed by their paths relative to the model.
///
/// Refused, because vLLM would fail on them: an index that is not valid JSON of that shape, and
/// a shard it names that is unsafe as a path or not in the model (vLLM loads exactly the shards
/// the index names). Returned as warnings, because real published repositories have them and
/// vLLM loads those repositories anyway (it reads tensors from the shards' own headers and
/// ignores `total_size`): a tensor mapped to a shard whose header does not hold it, and a
/// `metadata.total_size` that differs from the bytes of the mapped tensors (tools compute it
/// in different ways).
pub fn check_index(
    index_path: &str,
    bytes: &[u8],
    shards: &HashMap<String, ShardTensors>,
) -> Result<Vec<String>, VerifyError> {
    let fail = |reason: String| VerifyError::Index {
        path: index_path.to_string(),
        reason,
    };
    let index: IndexFile =
        serde_json::from_slice(bytes).map_err(|e| fail(format!("not a valid index: {e}")))?;
    let dir = match index_path.rsplit_once('/') {
        Some((d, _)) => format!("{d}/"),
        None => String::new(),
    };
    let mut mapped_bytes: u64 = 0;
    let mut unheld: Vec<(&str, &str)> = Vec::new();
    for (tensor, shard) in &index.weight_map {
        validate_name(shard).map_err(|e| fail(e.to_string()))?;
        let full = format!("{dir}{shard}");
        let Some(info) = shards.get(&full) else {
            return Err(fail(format!(
                "tensor {tensor} is mapped to shard {shard}, which is not in the model"
            )));
        };
        match info.tensors.get(tensor) {
            Some(size) => mapped_bytes = mapped_bytes.saturating_add(*size),
            None => unheld.push((tensor, shard)),
        }
    }
    let mut warnings = Vec::new();
    if let Some((tensor, shard)) = unheld.first() {
        let more = match unheld.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more)"),
        };
        warnings.push(format!(
            "{index_path}: tensor {tensor} is mapped to shard {shard}, whose header has no such tensor{more}; vLLM reads tensors from the shards' headers, so this is harmless unless the model needs that tensor"
        ));
    }
    if let Some(total) = index.metadata.and_then(|m| m.total_size) {
        if total != mapped_bytes {
            warnings.push(format!(
                "{index_path}: metadata.total_size is {total} but the mapped tensors hold {mapped_bytes} bytes; vLLM ignores total_size"
            ));
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_shard(dir: &Path, name: &str, header: &str, data_len: usize) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    const GOOD: &str = r#"{"a_blocks":{"dtype":"U8","shape":[2,16],"data_offsets":[0,32]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[32,40]},"s":{"dtype":"F4","shape":[2],"data_offsets":[40,41]}}"#;

    #[test]
    fn a_good_shard_passes_and_lists_its_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_shard(dir.path(), "s.safetensors", GOOD, 41);
        let t = check_safetensors(&p, "s.safetensors").unwrap();
        assert_eq!(t.tensors["a_blocks"], 32);
        assert_eq!(t.tensors["b"], 8);
    }

    /// The header-only check (before the download) judges every shard as the full check does.
    #[test]
    fn the_header_check_agrees_with_the_full_check() {
        let dir = tempfile::tempdir().unwrap();
        let holed = GOOD
            .replace("[32,40]", "[33,41]")
            .replace("[40,41]", "[41,42]");
        let wrong = GOOD.replace("\"shape\":[4]", "\"shape\":[5]");
        let cases = [
            (GOOD, 41usize, true),
            (GOOD, 40, false),
            (GOOD, 42, false),
            (holed.as_str(), 42, false),
            (wrong.as_str(), 41, false),
            ("{not json", 0, false),
        ];
        for (i, (header, data_len, good)) in cases.into_iter().enumerate() {
            let name = format!("{i}.safetensors");
            let path = write_shard(dir.path(), &name, header, data_len);
            let bytes = std::fs::read(&path).unwrap();
            let len = bytes.len() as u64;
            let end = header_end(&bytes[..8], len, &name).unwrap();
            let head = &bytes[..usize::try_from(end).unwrap()];
            let early = check_safetensors_header(head, len, &name);
            let full = check_safetensors(&path, &name);
            assert_eq!(early.is_ok(), good, "case {i}: {early:?}");
            assert_eq!(full.is_ok(), good, "case {i}: {full:?}");
            if let (Ok(a), Ok(b)) = (early, full) {
                assert_eq!(a.tensors, b.tensors);
            }
        }
        // A length field past the end of the file, or past 100 MB, is refused from 8 bytes.
        let huge = 200_000_000u64.to_le_bytes();
        assert!(header_end(&huge, u64::MAX, "h").is_err());
        assert!(header_end(&100u64.to_le_bytes(), 50, "h").is_err());
        assert!(header_end(&[1, 2, 3], 50, "h").is_err());
    }

    #[test]
    fn truncated_holed_and_oversized_shards_fail() {
        let dir = tempfile::tempdir().unwrap();
        // One byte short of the data.
        let p = write_shard(dir.path(), "t.safetensors", GOOD, 40);
        assert!(check_safetensors(&p, "t.safetensors").is_err());
        // A hole between tensors.
        let holed = GOOD
            .replace("[32,40]", "[33,41]")
            .replace("[40,41]", "[41,42]");
        let p = write_shard(dir.path(), "h.safetensors", &holed, 42);
        assert!(check_safetensors(&p, "h.safetensors").is_err());
        // A size that is not numel × dtype size.
        let wrong = GOOD.replace("\"shape\":[4]", "\"shape\":[5]");
        let p = write_shard(dir.path(), "w.safetensors", &wrong, 41);
        assert!(check_safetensors(&p, "w.safetensors").is_err());
        // A header length claiming more than 100 MB.
        let path = dir.path().join("big.safetensors");
        let mut bytes = (200_000_000u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes).unwrap();
        let err = check_safetensors(&path, "big.safetensors").unwrap_err();
        assert!(err.to_string().contains("big.safetensors"), "{err}");
        // Too short to hold a header length.
        std::fs::write(dir.path().join("tiny.safetensors"), b"abc").unwrap();
        assert!(check_safetensors(&dir.path().join("tiny.safetensors"), "tiny").is_err());
    }

    #[test]
    fn index_is_checked_against_shard_headers() {
        let mut shards = HashMap::new();
        shards.insert(
            "m/s1.safetensors".to_string(),
            ShardTensors {
                tensors: [("a".to_string(), 32u64), ("b".to_string(), 8)].into(),
            },
        );
        let good = br#"{"metadata":{"total_size":40},"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}}"#;
        check_index("m/model.safetensors.index.json", good, &shards).unwrap();
        let missing_shard = br#"{"weight_map":{"a":"s2.safetensors"}}"#;
        let err =
            check_index("m/model.safetensors.index.json", missing_shard, &shards).unwrap_err();
        assert!(err.to_string().contains("s2.safetensors"), "{err}");
        let escape = br#"{"weight_map":{"a":"../s1.safetensors"}}"#;
        assert!(check_index("m/i.safetensors.index.json", escape, &shards).is_err());
        let not_json = br#"{"weight_map":["a"]}"#;
        assert!(check_index("m/i.safetensors.index.json", not_json, &shards).is_err());
    }

    /// What real repositories have and vLLM loads anyway is a warning, not a refusal.
    #[test]
    fn inconsistent_index_metadata_is_a_warning() {
        let mut shards = HashMap::new();
        shards.insert(
            "s1.safetensors".to_string(),
            ShardTensors {
                tensors: [("a".to_string(), 32u64), ("b".to_string(), 8)].into(),
            },
        );
        let good = br#"{"metadata":{"total_size":40},"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}}"#;
        assert!(
            check_index("i.safetensors.index.json", good, &shards)
                .unwrap()
                .is_empty()
        );
        let missing_tensor =
            br#"{"weight_map":{"a":"s1.safetensors","y":"s1.safetensors","zz":"s1.safetensors"}}"#;
        let warnings = check_index("i.safetensors.index.json", missing_tensor, &shards).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("tensor y") && warnings[0].contains("(and 1 more)"),
            "{warnings:?}"
        );
        // File bytes instead of tensor bytes, as some tools compute it.
        let file_bytes = br#"{"metadata":{"total_size":1234},"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}}"#;
        let warnings = check_index("i.safetensors.index.json", file_bytes, &shards).unwrap();
        assert!(warnings[0].contains("total_size is 1234"), "{warnings:?}");
    }
}
