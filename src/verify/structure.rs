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

use serde::Deserialize;

use super::VerifyError;
use crate::source::validate_name;

/// Largest safetensors header accepted (its JSON, after the 8-byte length). The format allows
/// 100,000,000 bytes; real headers are about 100 KB (GPT-OSS-120B's largest is about 60 KiB),
/// and parsing one costs several times its size in memory, so a header 160 times the largest
/// real one is refused before it is read.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// Largest sum of a model's shard headers: what the index check keeps about them is bounded
/// by it (16 bytes per tensor), whatever the number of shards.
pub const MAX_HEADERS_TOTAL: u64 = 256 << 20;

/// Largest `*.safetensors.index.json` accepted. A large real index (DeepSeek-V3's, about 90,000
/// tensors) is under 10 MB; parsing holds about twice its size.
pub const MAX_INDEX_BYTES: u64 = 32 << 20;

/// Header and index bytes parsed at once by default, across every prefetch sharing a budget.
pub const PARSE_BUDGET_BYTES: u64 = 32 << 20;

/// Bounds the memory spent parsing untrusted headers and indexes at once: parsing JSON costs
/// several times its size, so every parse holds permits for its bytes until it is done, across
/// every prefetch that shares the budget (the agent's models share one).
#[derive(Debug, Clone)]
pub struct ParseBudget {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    total: u32,
}

/// Bytes per permit of a [`ParseBudget`].
const PARSE_PERMIT: u64 = 64 << 10;

impl ParseBudget {
    /// A budget of `bytes` (rounded up to 64 KiB).
    pub fn new(bytes: u64) -> Self {
        let total = u32::try_from(bytes.div_ceil(PARSE_PERMIT).max(1)).unwrap_or(u32::MAX);
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
        }
    }

    fn permits_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(PARSE_PERMIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total)
    }

    /// Waits until `bytes` may be parsed (a parse larger than the budget takes all of it);
    /// the permit is held until dropped. (The semaphore is never closed, so this is `None`
    /// never in practice.)
    pub async fn hold(&self, bytes: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = self.permits_for(bytes);
        std::sync::Arc::clone(&self.permits)
            .acquire_many_owned(n)
            .await
            .ok()
    }

    /// [`ParseBudget::hold`] from a blocking thread (never from an async task).
    pub fn hold_blocking(&self, bytes: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        futures::executor::block_on(self.hold(bytes))
    }
}

impl Default for ParseBudget {
    fn default() -> Self {
        Self::new(PARSE_BUDGET_BYTES)
    }
}

/// The tensors of one checked shard, as the index check needs them: each name's hash with its
/// byte size, sorted. Sixteen bytes a tensor whatever its name's length, so every shard's can
/// be kept at once for the index check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardTensors {
    tensors: Vec<(u64, u64)>,
}

impl ShardTensors {
    /// From (name, byte size) pairs.
    pub fn from_sizes<'a>(sizes: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut tensors: Vec<(u64, u64)> = sizes
            .into_iter()
            .map(|(name, size)| (name_key(name), size))
            .collect();
        tensors.sort_unstable();
        Self { tensors }
    }

    /// The byte size of `tensor`, if the shard holds it. Two names with one 64-bit hash would
    /// make a missing tensor look present; that changes only a warning, and is about one chance
    /// in 10^10 for a million tensors.
    pub fn size_of(&self, tensor: &str) -> Option<u64> {
        let key = name_key(tensor);
        let at = self.tensors.partition_point(|(k, _)| *k < key);
        self.tensors
            .get(at)
            .filter(|(k, _)| *k == key)
            .map(|(_, size)| *size)
    }

    /// The bytes of all its tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0, |sum, (_, size)| sum.saturating_add(*size))
    }

    /// How many tensors the shard holds.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the shard holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

fn name_key(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same in every run, so preflight and final check agree.
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
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
/// Returns its tensors and its header's length. Reads only the header (its length field is
/// checked against the limit first), and judges it exactly as [`check_safetensors_header`]
/// judges the same bytes read from the source.
pub fn check_safetensors(file: &Path, name: &str) -> Result<(ShardTensors, u64), VerifyError> {
    use std::io::Read;
    let io = |source| VerifyError::Io {
        path: file.to_path_buf(),
        source,
    };
    let handle = File::open(file).map_err(io)?;
    let len = handle.metadata().map_err(io)?.len();
    let mut first = Vec::with_capacity(8);
    (&handle).take(8).read_to_end(&mut first).map_err(io)?;
    let end = header_end(&first, len, name)?;
    let mut head = first;
    head.reserve(usize::try_from(end).unwrap_or(0));
    (&handle).take(end - 8).read_to_end(&mut head).map_err(io)?;
    let tensors = check_safetensors_header(&head, len, name)?;
    Ok((tensors, end))
}

/// Reads an index file from the cache, refusing one over [`MAX_INDEX_BYTES`] before reading.
pub fn read_index(file: &Path, name: &str) -> Result<Vec<u8>, VerifyError> {
    let io = |source| VerifyError::Io {
        path: file.to_path_buf(),
        source,
    };
    let handle = File::open(file).map_err(io)?;
    let len = handle.metadata().map_err(io)?.len();
    if len > MAX_INDEX_BYTES {
        return Err(VerifyError::TooLarge {
            path: name.to_string(),
            what: "index",
            size: len,
            limit: MAX_INDEX_BYTES,
        });
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(handle, MAX_INDEX_BYTES + 1),
        &mut bytes,
    )
    .map_err(io)?;
    Ok(bytes)
}

/// The length a shard's first 8 bytes give its header (capped at [`MAX_HEADER_BYTES`] + 1),
/// read without reading the header: how much a parse of it will hold.
pub fn header_len(file: &Path) -> Result<u64, VerifyError> {
    let mut first = [0u8; 8];
    let read = File::open(file).and_then(|mut f| std::io::Read::read(&mut f, &mut first));
    let read = read.map_err(|source| VerifyError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    Ok(if read == 8 {
        u64::from_le_bytes(first).min(MAX_HEADER_BYTES + 1)
    } else {
        0
    })
}

/// Adds one shard's header length to the model's running total, refusing a model whose
/// headers add up to more than [`MAX_HEADERS_TOTAL`].
pub fn add_header(total: &mut u64, header_len: u64, name: &str) -> Result<(), VerifyError> {
    *total = total.saturating_add(header_len);
    if *total > MAX_HEADERS_TOTAL {
        return Err(VerifyError::TooLarge {
            path: name.to_string(),
            what: "shard headers, added up over the model,",
            size: *total,
            limit: MAX_HEADERS_TOTAL,
        });
    }
    Ok(())
}

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
    if n > MAX_HEADER_BYTES {
        return Err(VerifyError::TooLarge {
            path: name.to_string(),
            what: "safetensors header",
            size: n,
            limit: MAX_HEADER_BYTES,
        });
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
    let entries: HeaderEntries = serde_json::from_str(text).map_err(|e| {
        fail(safetensors::SafeTensorError::InvalidHeaderDeserialization(
            e,
        ))
    })?;
    let metadata = entries.into_metadata().map_err(fail)?;
    if end.checked_add(metadata.data_len() as u64) != Some(file_len) {
        return Err(fail(safetensors::SafeTensorError::MetadataIncompleteBuffer));
    }
    Ok(tensors_of(&metadata))
}

/// A safetensors header as the crate reads it (`__metadata__`, then tensors by name, a later
/// duplicate name replacing an earlier one), parsed entry by entry. The crate's own
/// `Deserialize` goes through `#[serde(flatten)]`, which first buffers the whole document as
/// generic values: several hundred bytes a tensor, over 300 MB for a 14 MiB header.
struct HeaderEntries {
    metadata: Option<HashMap<String, String>>,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

impl HeaderEntries {
    /// The crate's `Metadata`, sorted by offsets and validated by the crate itself (offsets
    /// contiguous from 0, each size = elements × dtype size).
    fn into_metadata(self) -> Result<safetensors::tensor::Metadata, safetensors::SafeTensorError> {
        let mut tensors: Vec<_> = self.tensors.into_iter().collect();
        tensors.sort_by_key(|(_, info)| info.data_offsets);
        safetensors::tensor::Metadata::new(self.metadata, tensors)
    }
}

impl<'de> Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = HeaderEntries;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderEntries, A::Error> {
                let mut out = HeaderEntries {
                    metadata: None,
                    tensors: HashMap::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        out.metadata = map.next_value()?;
                    } else {
                        out.tensors.insert(key, map.next_value()?);
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

fn tensors_of(metadata: &safetensors::tensor::Metadata) -> ShardTensors {
    let tensors = metadata.tensors();
    ShardTensors::from_sizes(tensors.iter().map(|(tensor, info)| {
        let (begin, end) = info.data_offsets;
        (tensor.as_str(), (end - begin) as u64)
    }))
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
    if bytes.len() as u64 > MAX_INDEX_BYTES {
        return Err(VerifyError::TooLarge {
            path: index_path.to_string(),
            what: "index",
            size: bytes.len() as u64,
            limit: MAX_INDEX_BYTES,
        });
    }
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
        match info.size_of(tensor) {
            Some(size) => mapped_bytes = mapped_bytes.saturating_add(size),
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
        let (t, header) = check_safetensors(&p, "s.safetensors").unwrap();
        assert_eq!(header, 8 + GOOD.len() as u64);
        assert_eq!(t.size_of("a_blocks"), Some(32));
        assert_eq!(t.size_of("b"), Some(8));
        assert_eq!(t.size_of("c"), None);
        assert_eq!(t.len(), 3);
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
            let full = check_safetensors(&path, &name).map(|(t, _)| t);
            assert_eq!(early.is_ok(), good, "case {i}: {early:?}");
            assert_eq!(full.is_ok(), good, "case {i}: {full:?}");
            if let (Ok(a), Ok(b)) = (early, full) {
                assert_eq!(a, b);
            }
        }
        // A length field past the end of the file, or past the 16 MiB limit, is refused from 8
        // bytes.
        let huge = (MAX_HEADER_BYTES + 1).to_le_bytes();
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
        // A header length claiming more than the limit, named as such.
        let path = dir.path().join("big.safetensors");
        let mut bytes = (200_000_000u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes).unwrap();
        let err = check_safetensors(&path, "big.safetensors").unwrap_err();
        assert!(
            err.to_string().contains("big.safetensors") && err.to_string().contains("limit"),
            "{err}"
        );
        // Too short to hold a header length.
        std::fs::write(dir.path().join("tiny.safetensors"), b"abc").unwrap();
        assert!(check_safetensors(&dir.path().join("tiny.safetensors"), "tiny").is_err());
    }

    #[test]
    fn index_is_checked_against_shard_headers() {
        let mut shards = HashMap::new();
        shards.insert(
            "m/s1.safetensors".to_string(),
            ShardTensors::from_sizes([("a", 32u64), ("b", 8)]),
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
            ShardTensors::from_sizes([("a", 32u64), ("b", 8)]),
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
