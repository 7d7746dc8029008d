"""Parity with Hugging Face transformers on tiny random models, and HF <-> r1jax round trips.

Each case builds a random fp32 transformers model (eager attention), saves it as
safetensors, loads it with r1jax.hf.load and compares logits on a padded batch (left- and
right-padded rows, explicit positions) at the real tokens; then exports it back with
r1jax.hf.save and checks every tensor and transformers' logits on the exported folder.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from r1jax import convert, hf, parallel, testing

DEEPSEEK, QWEN2, LLAMA, QWEN3, QWEN3_MOE = (
    hf.DEEPSEEK_V3, hf.QWEN2, hf.LLAMA, hf.QWEN3, hf.QWEN3_MOE)
YARN_DEEPSEEK = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                     original_max_position_embeddings=32, beta_fast=32, beta_slow=1)
YARN_QWEN = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)

# name: (architecture, HF config overrides, r1jax load overrides)
CASES = {
    "deepseek-fullq-group2of2-dense1": (DEEPSEEK, dict(), dict()),
    "deepseek-qlora-yarn-group2of4": (DEEPSEEK, dict(
        q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=0,
        n_shared_experts=2, rope_parameters=YARN_DEEPSEEK), dict()),
    "deepseek-nointerleave-eps-dense2-densemoe": (DEEPSEEK, dict(
        rope_interleave=False, norm_topk_prob=False, rms_norm_eps=1e-3, q_lora_rank=8,
        num_hidden_layers=3, first_k_dense_replace=2), dict(moe_impl="dense")),
    "qwen2-tied": (QWEN2, dict(tie_word_embeddings=True), dict()),
    "qwen2.5-yarn": (QWEN2, dict(rope_parameters=YARN_QWEN), dict()),
    "llama3-rope-headdim": (LLAMA, dict(rope_parameters=LLAMA3), dict()),
    "qwen3-tied": (QWEN3, dict(tie_word_embeddings=True), dict()),
    "qwen3moe-sparse-step2": (QWEN3_MOE, dict(decoder_sparse_step=2, norm_topk_prob=False), dict()),
    "qwen3moe-mlp-only-prefix": (QWEN3_MOE, dict(mlp_only_layers=[0]), dict()),
}
TOL = 1e-4


def batch(vocab_size):
  """Three rows of 11 slots: full, left-padded, right-padded."""
  return testing.padded_batch(vocab_size, [11, 7, 5], 11, seed=1, left=[True, True, False])


def our_logits(model, tokens, mask, positions):
  logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  return np.asarray(logits)


def folder_tensors(path) -> dict:
  reader = hf.SafetensorsReader(path)
  return {key: reader.get(key) for key in reader.keys()}


def hf_load(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_and_round_trip(case, tmp_path):
  arch, hf_overrides, load_overrides = CASES[case]
  reference = testing.tiny_hf_model(arch, **hf_overrides)
  reference.save_pretrained(tmp_path / "hf")
  tokens, mask, positions = batch(reference.config.vocab_size)
  want = testing.hf_logits(reference, tokens, mask, positions)

  model = hf.load(tmp_path / "hf", **load_overrides)
  got = our_logits(model, tokens, mask, positions)
  diff = testing.max_abs_diff_where(got, want, mask)
  print(f"{case}: max |logit diff| = {diff:.2e} (|logits| <= {np.abs(want).max():.1f})")
  assert diff <= TOL, f"{case}: max |logit diff| {diff}"

  # config.json -> ModelConfig -> config.json -> ModelConfig is a fixed point.
  back = hf.config_from_hf(hf.to_hf_config(model.cfg, arch), **load_overrides)
  assert back == model.cfg

  # Export: the same tensors, bit for bit, and transformers gives the same logits. MoE
  # models are written in ~20 kB shards to exercise the sharded layout.
  hf.save(model, tmp_path / "out", arch, max_shard_bytes=20_000 if model.cfg.is_moe else 5 << 30)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists() == model.cfg.is_moe
  source, exported = folder_tensors(tmp_path / "hf"), folder_tensors(tmp_path / "out")
  assert sorted(exported) == sorted(source)
  for key, value in source.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  reloaded = testing.hf_logits(hf_load(tmp_path / "out"), tokens, mask, positions)
  assert testing.max_abs_diff_where(reloaded, want, mask) <= 1e-6


def _rewrite(folder, out, hf_config, transform):
  """Copies an HF folder, passing its tensors through transform(dict) -> list of shards."""
  out.mkdir()
  shards = transform(folder_tensors(folder))
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in shard})
  (out / "model.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
  (out / "config.json").write_text(json.dumps(hf_config))


def test_fused_sharded_bf16_and_fp8_layouts(tmp_path):
  """transformers-5 fused experts, sharded files, bf16 and DeepSeek's block-fp8 all load."""
  reference = testing.tiny_hf_model(DEEPSEEK, num_hidden_layers=2, first_k_dense_replace=1)
  reference.save_pretrained(tmp_path / "hf")
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  n_experts, block = hf_config["n_routed_experts"], 8
  fp8_key = "model.layers.0.self_attn.q_proj.weight"

  def to_fused_bf16_fp8(tensors):
    prefix = "model.layers.1.mlp.experts."
    def pop(e, name):
      return tensors.pop(f"{prefix}{e}.{name}.weight")
    gate_up = [np.concatenate([pop(e, "gate_proj"), pop(e, "up_proj")]) for e in range(n_experts)]
    tensors[prefix + "gate_up_proj"] = np.stack(gate_up)  # [E, 2F, D]
    tensors[prefix + "down_proj"] = np.stack([pop(e, "down_proj") for e in range(n_experts)])  # [E, D, F]
    out = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    w = tensors[fp8_key]  # [96, 32]: 12 x 4 blocks of 8 x 8, each with its own scale
    scale = np.abs(w).reshape(w.shape[0] // block, block, -1, block).max(axis=(1, 3)) / 448.0
    out[fp8_key] = (w / np.repeat(np.repeat(scale, block, 0), block, 1)).astype(ml_dtypes.float8_e4m3fn)
    out[fp8_key + "_scale_inv"] = scale.astype(np.float32)
    keys = sorted(out)
    return [{k: out[k] for k in keys[:len(keys) // 2]}, {k: out[k] for k in keys[len(keys) // 2:]}]

  quantized = dict(hf_config, quantization_config=dict(quant_method="fp8", weight_block_size=[block, block]))
  _rewrite(tmp_path / "hf", tmp_path / "fused", quantized, to_fused_bf16_fp8)
  plain = nnx.to_pure_dict(nnx.state(hf.load(tmp_path / "hf")))
  # Loading onto a mesh puts each weight straight into its logical-axis sharding.
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
  sharded = hf.load(tmp_path / "hf", mesh=mesh)
  w_gate = sharded.layers[1].ffn.w_gate
  assert w_gate[...].sharding.is_equivalent_to(parallel.state_shardings(w_gate, mesh), 3)
  assert not w_gate[...].sharding.is_fully_replicated
  testing.assert_trees_equal(nnx.to_pure_dict(nnx.state(sharded)), plain)
  fused = nnx.to_pure_dict(nnx.state(hf.load(tmp_path / "fused", param_dtype="bfloat16")))

  fp8 = folder_tensors(tmp_path / "fused")
  dequantized = fp8[fp8_key].astype(np.float32) * np.repeat(
      np.repeat(fp8[fp8_key + "_scale_inv"], block, 0), block, 1)
  wq = fused["layers"][0]["attn"].pop("wq")
  np.testing.assert_array_equal(np.asarray(wq), dequantized.T.reshape(wq.shape).astype(ml_dtypes.bfloat16))
  np.testing.assert_allclose(np.asarray(wq, np.float32), np.asarray(plain["layers"][0]["attn"].pop("wq")),
                             rtol=0.07, atol=1e-3)  # fp8 keeps 3 mantissa bits
  assert fused["layers"][1]["ffn"]["bias"].dtype == np.float32  # the balancing bias stays fp32

  def as_stored(path, x):  # what the bf16 file holds, in the dtype load keeps
    x = np.asarray(x).astype(ml_dtypes.bfloat16)
    return x.astype(np.float32) if path[-1].key == "bias" else x
  testing.assert_trees_equal(fused, jax.tree_util.tree_map_with_path(as_stored, plain))


def test_deepseek_mtp_layers_load_when_asked_and_round_trip(tmp_path):
  """model.layers.{n_layers}.* (DeepSeek-V3's MTP module): skipped by default like
  transformers, loaded into model.mtp with mtp_depth=1, written back unchanged."""
  reference = testing.tiny_hf_model(DEEPSEEK)
  reference.save_pretrained(tmp_path / "hf")
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  n, d = hf_config["num_hidden_layers"], hf_config["hidden_size"]
  rng = np.random.default_rng(0)

  def add_mtp_layer(tensors):
    last = f"model.layers.{n - 1}."
    for key in list(tensors):
      if key.startswith(last):
        tensors[f"model.layers.{n}." + key[len(last):]] = tensors[key] + 0.5
    mtp = f"model.layers.{n}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
      tensors[f"{mtp}{name}.weight"] = rng.normal(1.0, 0.1, d).astype(np.float32)
    tensors[mtp + "eh_proj.weight"] = rng.normal(0, 0.1, (d, 2 * d)).astype(np.float32)
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"]
    return [tensors]

  _rewrite(tmp_path / "hf", tmp_path / "mtp", dict(hf_config, num_nextn_predict_layers=1), add_mtp_layer)
  without = hf.load(tmp_path / "mtp")
  assert without.cfg.mtp_depth == 0 and len(without.mtp) == 0
  model = hf.load(tmp_path / "mtp", mtp_depth=1)
  source = folder_tensors(tmp_path / "mtp")
  eh_proj = source[f"model.layers.{n}.eh_proj.weight"]  # [D, 2D] on concat(embedding, hidden)
  np.testing.assert_array_equal(np.asarray(model.mtp[0].proj[...][:d]), eh_proj[:, d:].T)
  np.testing.assert_array_equal(np.asarray(model.mtp[0].embed_norm.scale[...]),
                                source[f"model.layers.{n}.enorm.weight"])
  # Tensors nothing takes are an error (a mapping bug must not pass silently) unless strict=False.
  def add_unknown(tensors):
    return [dict(tensors, **{"model.unknown.weight": np.ones(2, np.float32)})]
  _rewrite(tmp_path / "mtp", tmp_path / "unknown", hf_config, add_unknown)
  with pytest.raises(ValueError, match="no r1jax variable takes.*model.unknown.weight"):
    hf.load(tmp_path / "unknown")
  hf.load(tmp_path / "unknown", strict=False)
  hf.save(model, tmp_path / "out", DEEPSEEK)
  exported = folder_tensors(tmp_path / "out")
  assert sorted(exported) == sorted(source)
  for key, value in source.items():
    assert np.array_equal(exported[key], value), key


def test_convert_cli_round_trip_and_errors(tmp_path, capsys):
  reference = testing.tiny_hf_model(QWEN3, tie_word_embeddings=True, bos_token_id=3, eos_token_id=4)
  reference.save_pretrained(tmp_path / "hf")
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  assert convert.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(ckpt)]) == 0
  assert convert.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
  source, exported = folder_tensors(tmp_path / "hf"), folder_tensors(out)
  assert sorted(exported) == sorted(source)
  assert all(np.array_equal(exported[k], v) for k, v in source.items())
  config = json.loads((out / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"], config["architectures"]) == (3, 4, [QWEN3])
  bf16 = ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
  assert convert.main(bf16) == 0
  as_bf16 = folder_tensors(tmp_path / "bf16")
  assert all(np.array_equal(as_bf16[k], v.astype(ml_dtypes.bfloat16)) for k, v in source.items())
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  capsys.readouterr()

  # Clear errors and a non-zero exit status.
  assert convert.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(ckpt)]) == 1
  assert "already exists" in capsys.readouterr().err
  assert convert.main(["export", "--ckpt", str(tmp_path / "nothing"), "--out", str(out)]) == 1
  assert "not an r1jax checkpoint" in capsys.readouterr().err
  assert convert.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--arch", "GPT2"]) == 1
  assert "supported" in capsys.readouterr().err
  assert convert.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--arch", LLAMA]) == 1
  assert "qk_norm" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["import", "--hf", str(tmp_path / "hf")])  # argparse: --out is required
  assert exit_info.value.code == 2


def test_refuses_pickled_checkpoints(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(hf.to_hf_config(hf.config_from_hf(
      dict(testing.TINY_HF_CONFIGS[LLAMA], architectures=[LLAMA])), LLAMA)))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: it must never be opened")
  with pytest.raises(ValueError, match="never unpickles.*safetensors"):
    hf.load(tmp_path)


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="supported.*DeepseekV3ForCausalLM.*Qwen3MoeForCausalLM"):
    hf.config_from_hf(dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
  qwen3_moe = dict(testing.TINY_HF_CONFIGS[QWEN3_MOE], architectures=[QWEN3_MOE])
  with pytest.raises(NotImplementedError, match="mlp_only_layers"):
    hf.config_from_hf(dict(qwen3_moe, mlp_only_layers=[1]))
  assert hf.config_from_hf(dict(qwen3_moe, mlp_only_layers=[0, 1])).first_k_dense == 2
  with pytest.raises(NotImplementedError, match="rope type 'dynamic'"):
    hf.config_from_hf(dict(qwen3_moe, rope_parameters=dict(rope_type="dynamic", factor=2.0)))
  with pytest.raises(TypeError, match="moe_implementation"):
    hf.config_from_hf(qwen3_moe, moe_implementation="dense")
  assert hf.config_from_hf(qwen3_moe, moe_impl="dense").moe_impl == "dense"
  # Older config.json files keep rope_theta / rope_scaling at the top level.
  scaling = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=16)
  legacy = hf.config_from_hf(dict(testing.TINY_HF_CONFIGS[LLAMA], architectures=[LLAMA], rope_theta=5e5,
                                  rope_scaling=scaling))
  assert (legacy.rope_type, legacy.rope_theta, legacy.rope_factor) == ("llama3", 5e5, 8.0)
  deepseek = hf.config_from_hf(dict(testing.TINY_HF_CONFIGS[DEEPSEEK], architectures=[DEEPSEEK]))
  with pytest.raises(ValueError, match="cannot export as LlamaForCausalLM.*attention='gqa'"):
    hf.to_hf_config(deepseek, LLAMA)
