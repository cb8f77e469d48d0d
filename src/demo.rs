//! A GPT-OSS-shaped model generated on the spot, for `modelcache demo`, the tests and the
//! benchmarks: no download needed, every byte known.
//!
//! The layout follows `openai/gpt-oss-120b`: 15 shards named `model-0000N-of-00014.safetensors`
//! holding MXFP4 experts as U8 `*_blocks`/`*_scales` tensors and BF16 attention weights, a
//! `model.safetensors.index.json`, config and tokenizer files, the tiktoken encodings the gpt-oss
//! tokenizer needs offline, and the `original/` and `metal/` folders vLLM never reads.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// How big the generated model is.
#[derive(Debug, Clone, Copy)]
pub struct DemoShape {
    /// Number of shards (15 for GPT-OSS-120B).
    pub shards: usize,
    /// Approximate bytes per shard.
    pub shard_bytes: usize,
    /// Bytes in `original/` (skipped by default selection).
    pub original_bytes: usize,
    /// Seed for the tensor bytes.
    pub seed: u64,
}

impl Default for DemoShape {
    fn default() -> Self {
        Self {
            shards: 15,
            shard_bytes: 20 << 20,
            original_bytes: 24 << 20,
            seed: 120,
        }
    }
}

/// The shard file name for index `i` of `n` shards, as Hugging Face names them.
pub fn shard_name(i: usize, n: usize) -> String {
    format!("model-{i:05}-of-{:05}.safetensors", n.saturating_sub(1))
}

/// Writes the model into `dir` (created if needed) and returns the total bytes written.
pub fn generate_model(dir: &Path, shape: &DemoShape) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let mut rng = fastrand::Rng::with_seed(shape.seed);
    let mut weight_map: HashMap<String, String> = HashMap::new();
    let mut total_tensor_bytes: u64 = 0;
    // Per layer: experts' blocks (U8 [E, R, 16]), their scales (U8 [E, R]), one BF16 projection.
    // Rows grow with the shard so that a shard holds at most about 24 layers, as real ones do
    // (GPT-OSS-120B: 36 layers over 15 shards): headers and the index stay realistically small.
    let experts = 8usize;
    let rows = (shape.shard_bytes / (24 * experts * 17)).max(256);
    let layer_bytes = experts * rows * 16 + experts * rows + 2 * 64 * 64;
    let layers_per_shard = (shape.shard_bytes / layer_bytes).max(1);
    for s in 0..shape.shards {
        let name = shard_name(s, shape.shards);
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for l in 0..layers_per_shard {
            let layer = s * layers_per_shard + l;
            let prefix = format!("model.layers.{layer}");
            let mut blocks = vec![0u8; experts * rows * 16];
            rng.fill(&mut blocks);
            let mut scales = vec![0u8; experts * rows];
            rng.fill(&mut scales);
            let mut proj = vec![0u8; 2 * 64 * 64];
            rng.fill(&mut proj);
            tensors.push((
                format!("{prefix}.mlp.experts.gate_up_proj_blocks"),
                Dtype::U8,
                vec![experts, rows, 16],
                blocks,
            ));
            tensors.push((
                format!("{prefix}.mlp.experts.gate_up_proj_scales"),
                Dtype::U8,
                vec![experts, rows],
                scales,
            ));
            tensors.push((
                format!("{prefix}.self_attn.q_proj.weight"),
                Dtype::BF16,
                vec![64, 64],
                proj,
            ));
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dtype, shape, data)| {
                TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (n.clone(), v))
                    .map_err(std::io::Error::other)
            })
            .collect::<Result<_, _>>()?;
        for (n, _, _, data) in &tensors {
            weight_map.insert(n.clone(), name.clone());
            total_tensor_bytes += data.len() as u64;
        }
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(views, Some(metadata), &dir.join(&name))
            .map_err(std::io::Error::other)?;
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total_tensor_bytes},
        "weight_map": weight_map,
    });
    write_json(&dir.join("model.safetensors.index.json"), &index)?;
    write_json(
        &dir.join("config.json"),
        &serde_json::json!({
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "num_hidden_layers": shape.shards * layers_per_shard, "num_local_experts": experts,
            "quantization_config": {"quant_method": "mxfp4"}, "torch_dtype": "bfloat16"
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": 199998, "eos_token_id": [200002, 199999]}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"model_max_length": 131072}),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::json!({"eos_token": "<|return|>"}),
    )?;
    write_json(
        &dir.join("tokenizer.json"),
        &serde_json::json!({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}),
    )?;
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}\n",
    )?;
    // Same line format as the real encodings: base64 token, space, rank.
    for (file, ranks) in [
        ("o200k_base.tiktoken", 4000u32),
        ("cl100k_base.tiktoken", 2000),
    ] {
        let mut text = String::new();
        for rank in 0..ranks {
            text.push_str(&base64_of(&rank.to_le_bytes()));
            text.push(' ');
            text.push_str(&rank.to_string());
            text.push('\n');
        }
        std::fs::write(dir.join(file), text)?;
    }
    // Another full checkpoint, as in the real repository; the default selection skips it.
    let original = dir.join("original");
    std::fs::create_dir_all(&original)?;
    let mut bytes = vec![0u8; shape.original_bytes];
    rng.fill(&mut bytes);
    let view =
        TensorView::new(Dtype::U8, vec![bytes.len()], &bytes).map_err(std::io::Error::other)?;
    safetensors::serialize_to_file(
        vec![("embedding.weight".to_string(), view)],
        None,
        &original.join("model--00001-of-00001.safetensors"),
    )
    .map_err(std::io::Error::other)?;
    write_json(
        &original.join("config.json"),
        &serde_json::json!({"num_hidden_layers": 36}),
    )?;
    let metal = dir.join("metal");
    std::fs::create_dir_all(&metal)?;
    std::fs::write(metal.join("model.bin"), &bytes[..bytes.len().min(1 << 20)])?;
    dir_size(dir)
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

fn base64_of(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::structure::{check_index, check_safetensors};

    #[test]
    fn generated_model_passes_structure_checks() {
        let dir = tempfile::tempdir().unwrap();
        let shape = DemoShape {
            shards: 3,
            shard_bytes: 200_000,
            original_bytes: 10_000,
            seed: 1,
        };
        generate_model(dir.path(), &shape).unwrap();
        let mut shards = HashMap::new();
        for i in 0..3 {
            let name = shard_name(i, 3);
            shards.insert(
                name.clone(),
                check_safetensors(&dir.path().join(&name), &name).unwrap().0,
            );
        }
        assert_eq!(shard_name(0, 15), "model-00000-of-00014.safetensors");
        let index = std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap();
        let warnings = check_index("model.safetensors.index.json", &index, &shards).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(
            dir.path()
                .join("original/model--00001-of-00001.safetensors")
                .exists()
        );
        assert_eq!(base64_of(b"Man"), "TWFu");
        assert_eq!(base64_of(b"Ma"), "TWE=");
    }
}
