"""Hugging Face checkpoints <-> r1jax models: safetensors only, nothing is ever unpickled.

  model = load(path, **overrides)          # HF folder -> Transformer (overrides: ModelConfig fields)
  save(model, path, arch)                  # Transformer -> HF folder transformers can load
  cfg = config_from_hf(hf_config_dict)     # config.json -> ModelConfig
  hf_config = to_hf_config(cfg, arch)      # ModelConfig -> config.json

Supported architectures: DeepseekV3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM,
Qwen3ForCausalLM, Qwen3MoeForCausalLM (see ARCHITECTURES).

Loading streams: the model is created abstractly (nnx.eval_shape) and each variable is
filled as soon as its tensors are read, so at most one variable's worth of host memory
(one layer's stacked experts) is held besides the model itself.

Layout conversions (torch Linear weights are [out, in]; ours are [in, ..., out, ...]):
  q_proj.weight [H*Dh, D]   -> wq [D, H, Dh]        o_proj.weight [D, H*Dh] -> wo [H, Dh, D]
  gate_proj.weight [F, D]   -> w_gate [D, F]        down_proj.weight [D, F] -> w_down [F, D]
  experts.{e}.gate_proj.weight [F, D] (x E)  or fused experts.gate_up_proj [E, 2F, D]
                            -> w_gate, w_up [E, D, F]
  experts.{e}.down_proj.weight [D, F] (x E)  or fused experts.down_proj [E, D, F]
                            -> w_down [E, F, D]
  gate.e_score_correction_bias [E] -> MoE bias (DeepSeek-V3 eq. 16's b_i)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from r1jax.model.config import ModelConfig
from r1jax.model.moe import RouterBias
from r1jax.model.transformer import Transformer

log = logging.getLogger(__name__)

DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
LLAMA = "LlamaForCausalLM"
QWEN3 = "Qwen3ForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
# Architecture class name -> HF model_type.
ARCHITECTURES = {DEEPSEEK_V3: "deepseek_v3", QWEN2: "qwen2", LLAMA: "llama", QWEN3: "qwen3",
                 QWEN3_MOE: "qwen3_moe"}
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def canonical_arch(name: str) -> str:
  """'Qwen2ForCausalLM' or its model_type 'qwen2' -> 'Qwen2ForCausalLM'."""
  by_type = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
  if name in ARCHITECTURES:
    return name
  if name in by_type:
    return by_type[name]
  raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)} "
                   f"(or their model_type: {', '.join(by_type)})")


def arch_of(hf: dict) -> str:
  """The architecture a config.json describes."""
  names = list(hf.get("architectures") or []) + [hf.get("model_type", "")]
  for name in names:
    if name in ARCHITECTURES or name in ARCHITECTURES.values():
      return canonical_arch(name)
  raise ValueError(f"unsupported architecture {names}; supported: {', '.join(ARCHITECTURES)}")


# --- config.json <-> ModelConfig -----------------------------------------------------


def _unsupported(arch: str, what: str):
  raise NotImplementedError(f"{arch}: {what} is not supported by r1jax's model")


def _rope_fields(hf: dict, arch: str) -> dict:
  """RoPE fields, from transformers-5 `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    _unsupported(arch, "partial_rotary_factor != 1")
  if kind == "default":
    return dict(rope_theta=float(theta), rope_type="default")
  # As transformers' standardize_rope_params: a top-level original_max_position_embeddings wins.
  original = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
              or hf["max_position_embeddings"])
  out = dict(rope_theta=float(theta), rope_type=kind, rope_original_max_len=int(original))
  if kind == "llama3":
    return dict(out, rope_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]))
  if kind == "yarn":
    if params.get("attention_factor") is not None:
      _unsupported(arch, "an explicit yarn attention_factor")
    if params.get("truncate", True) is False:
      _unsupported(arch, "yarn with truncate=False")
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    # transformers falls back to mscale(factor, 1) unless both mscale and mscale_all_dim are
    # set; our yarn_mscale=0 selects that same fallback.
    return dict(out, rope_factor=float(factor), yarn_beta_fast=float(params.get("beta_fast") or 32),
                yarn_beta_slow=float(params.get("beta_slow") or 1),
                yarn_mscale=float(params.get("mscale") or 0.0),
                yarn_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0))
  _unsupported(arch, f"rope type {kind!r} (supported: default, llama3, yarn)")


def _activation(name: str, arch: str) -> str:
  # jax.nn.gelu defaults to the tanh approximation, which is HF's gelu_pytorch_tanh / gelu_new.
  names = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
  if name not in names:
    _unsupported(arch, f"hidden_act={name!r}")
  return names[name]


def _moe_fields(hf: dict, arch: str) -> dict:
  if arch == DEEPSEEK_V3:
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
      _unsupported(arch, f"scoring_func={hf['scoring_func']!r}")
    return dict(n_experts=hf.get("n_routed_experts", hf.get("num_local_experts", 256)),
                n_shared_experts=hf.get("n_shared_experts", 1),
                moe_d_ff=hf.get("moe_intermediate_size", 2048), top_k=hf.get("num_experts_per_tok", 8),
                router="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
                n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                first_k_dense=hf.get("first_k_dense_replace", 3), moe_every=1)
  # Qwen3-MoE: layer i is sparse iff i not in mlp_only_layers and (i + 1) % step == 0. Only a
  # prefix 0..k-1 of dense layers maps onto our first_k_dense.
  dense = sorted(hf.get("mlp_only_layers") or [])
  if dense != list(range(len(dense))):
    _unsupported(arch, f"mlp_only_layers={dense} (only a prefix [0, ..., k-1] maps to first_k_dense)")
  # transformers 5 writes num_experts under its attribute_map name, num_local_experts.
  return dict(n_experts=hf.get("num_experts", hf.get("num_local_experts", 128)), n_shared_experts=0,
              moe_d_ff=hf.get("moe_intermediate_size", 768), top_k=hf.get("num_experts_per_tok", 8),
              router="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
              routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense=len(dense),
              moe_every=hf.get("decoder_sparse_step", 1))


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """A ModelConfig from a config.json dict; `overrides` are ModelConfig fields (e.g. moe_impl)."""
  arch = arch_of(hf)
  if hf.get("quantization_config") and hf["quantization_config"].get("quant_method") != "fp8":
    _unsupported(arch, f"quantization {hf['quantization_config'].get('quant_method')!r}")
  if hf.get("use_sliding_window"):
    _unsupported(arch, "sliding-window attention")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    _unsupported(arch, "attention_bias / mlp_bias (biases beyond Qwen2's q/k/v)")
  n_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or d_model // n_heads, d_ff=hf["intermediate_size"],
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      hidden_act=_activation(hf.get("hidden_act", "silu"), arch), **_rope_fields(hf, arch))
  if arch == DEEPSEEK_V3:
    fields.update(attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0,
                  kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                  qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                  rope_interleave=bool(hf.get("rope_interleave", True)),
                  head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"])
  fields.update(qkv_bias=arch == QWEN2, qk_norm=arch in (QWEN3, QWEN3_MOE))
  if arch in (DEEPSEEK_V3, QWEN3_MOE):
    fields.update(_moe_fields(hf, arch))
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise TypeError(f"unknown ModelConfig override(s) {sorted(unknown)}")
  cfg = ModelConfig(**{**fields, **overrides})
  if cfg.problems():
    raise ValueError(f"{arch} config does not give a valid ModelConfig: " + "; ".join(cfg.problems()))
  return cfg


def _rope_parameters(cfg: ModelConfig) -> dict:
  out = dict(rope_type=cfg.rope_type, rope_theta=cfg.rope_theta)
  if cfg.rope_type == "llama3":
    out.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  elif cfg.rope_type == "yarn":
    out.update(factor=cfg.rope_factor, beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
               original_max_position_embeddings=cfg.rope_original_max_len)
    if cfg.yarn_mscale:
      out["mscale"] = cfg.yarn_mscale
    if cfg.yarn_mscale_all_dim:
      out["mscale_all_dim"] = cfg.yarn_mscale_all_dim
  return out


def _export_problems(cfg: ModelConfig, arch: str) -> list[str]:
  """Why `cfg` cannot be written as `arch` (empty when it can)."""
  mla, moe = arch == DEEPSEEK_V3, arch in (DEEPSEEK_V3, QWEN3_MOE)
  wants = dict(attention="mla" if mla else "gqa", qkv_bias=arch == QWEN2, qk_norm=arch in (QWEN3, QWEN3_MOE))
  out = [f"{arch} needs model.{k}={v!r}, got {getattr(cfg, k)!r}" for k, v in wants.items()
         if getattr(cfg, k) != v]
  if moe != cfg.is_moe:
    out.append(f"{arch} {'needs' if moe else 'has no'} routed experts (model.n_experts={cfg.n_experts})")
  if arch == DEEPSEEK_V3 and cfg.is_moe and (cfg.router != "sigmoid" or cfg.moe_every != 1):
    out.append(f"{arch} needs model.router='sigmoid' and model.moe_every=1")
  if arch == QWEN3_MOE and cfg.is_moe and (cfg.router != "softmax" or cfg.n_shared_experts or cfg.n_group != 1
                                           or cfg.routed_scaling_factor != 1.0):
    out.append(f"{arch} needs model.router='softmax', no shared experts, n_group=1, routed_scaling_factor=1")
  if arch != DEEPSEEK_V3 and cfg.mtp_depth:
    out.append(f"{arch} has no multi-token-prediction layers (model.mtp_depth={cfg.mtp_depth})")
  return out


def to_hf_config(cfg: ModelConfig, arch: str, base: dict | None = None) -> dict:
  """The config.json of `cfg` written as `arch`; `base` supplies non-model keys (token ids, ...)."""
  arch = canonical_arch(arch)
  problems = _export_problems(cfg, arch)
  if problems:
    raise ValueError(f"cannot export as {arch}: " + "; ".join(problems))
  carried = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range")
  out = {k: base[k] for k in carried if base and k in base}
  out.setdefault("max_position_embeddings", int(cfg.rope_original_max_len * max(cfg.rope_factor, 1.0)))
  out.update(
      architectures=[arch], model_type=ARCHITECTURES[arch], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_heads if arch == DEEPSEEK_V3 else cfg.n_kv_heads,  # MLA: no GQA
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      hidden_act="gelu_pytorch_tanh" if cfg.hidden_act == "gelu" else cfg.hidden_act,
      rope_parameters=_rope_parameters(cfg), attention_bias=False, dtype=cfg.param_dtype)
  if arch != DEEPSEEK_V3:
    out["head_dim"] = cfg.head_dim  # Qwen2 reads it too when present (else hidden_size / heads)
  if arch == DEEPSEEK_V3:
    out.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
               qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
               v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
               n_routed_experts=cfg.n_experts, n_shared_experts=cfg.n_shared_experts,
               moe_intermediate_size=cfg.moe_d_ff, num_experts_per_tok=cfg.top_k,
               norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
               n_group=cfg.n_group, topk_group=cfg.topk_group, first_k_dense_replace=cfg.first_k_dense,
               num_nextn_predict_layers=cfg.mtp_depth)
  if arch == QWEN3_MOE:
    out.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.moe_d_ff, num_experts_per_tok=cfg.top_k,
               norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.moe_every,
               mlp_only_layers=list(range(cfg.first_k_dense)))
  return out


# --- Tensor map: which HF tensors make which of our variables -------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our variables and the HF tensors it is made of.

  to_ours(hf_arrays, our_shape) -> our array; to_hf(our_array) -> hf arrays (hf_keys order),
  None when this layout is read but never written (fused experts).
  """
  path: tuple
  hf_keys: tuple[str, ...]
  to_ours: Callable
  to_hf: Callable | None


def _copy(path, key, hf_ndim=1) -> Entry:
  """Same values, at most reshaped (q_proj.bias [H*Dh] <-> bq [H, Dh])."""
  return Entry(path, (key,), lambda ws, shape: ws[0].reshape(shape),
               lambda x: [x.reshape(x.shape[:hf_ndim - 1] + (-1,))])


def _linear(path, key, n_in=1) -> Entry:
  """torch Linear weight [out, in] <-> ours [in dims (n_in of them)..., out dims...]."""
  return Entry(path, (key,), lambda ws, shape: ws[0].T.reshape(shape),
               lambda x: [x.reshape(math.prod(x.shape[:n_in]), -1).T])


def _experts(path, keys) -> Entry:
  """One torch Linear weight [out, in] per expert <-> stacked [E, in, out]."""
  return Entry(path, tuple(keys), lambda ws, shape: np.stack([w.T for w in ws]).reshape(shape),
               lambda x: [x[e].T for e in range(x.shape[0])])


def _fused_experts(path, key, part) -> Entry:
  """transformers-5 in-memory layout: gate_up_proj [E, 2F, D] (gate first), down_proj [E, D, F]."""
  def to_ours(ws, shape):
    w = ws[0]
    if part != "down":
      f = shape[-1]
      w = w[:, :f] if part == "gate" else w[:, f:]
    return w.transpose(0, 2, 1).reshape(shape)
  return Entry(path, (key,), to_ours, None)


def _mtp_proj(path, key) -> Entry:
  """eh_proj [D, 2D] acts on concat(enorm(embedding), hnorm(hidden)) (DeepSeek-V3's MTP);
  our proj [2D, D] acts on concat(hidden, embedding): transpose and swap the halves."""
  def to_ours(ws, shape):
    w_in_out = ws[0].T
    d = w_in_out.shape[0] // 2
    return np.concatenate([w_in_out[d:], w_in_out[:d]]).reshape(shape)
  def to_hf(x):
    d = x.shape[0] // 2
    return [np.concatenate([x[d:], x[:d]]).T]
  return Entry(path, (key,), to_ours, to_hf)


def _mlp(path, prefix) -> list[Entry]:
  return [_linear(path + ("w_gate",), prefix + "gate_proj.weight"),
          _linear(path + ("w_up",), prefix + "up_proj.weight"),
          _linear(path + ("w_down",), prefix + "down_proj.weight")]


def _attention(cfg: ModelConfig, path, prefix) -> list[Entry]:
  if cfg.attention == "mla":
    out = [_linear(path + ("wq_a",), prefix + "q_a_proj.weight"),
           _copy(path + ("q_norm", "scale"), prefix + "q_a_layernorm.weight"),
           _linear(path + ("wq_b",), prefix + "q_b_proj.weight")] if cfg.q_lora_rank else \
          [_linear(path + ("wq",), prefix + "q_proj.weight")]
    return out + [_linear(path + ("wkv_a",), prefix + "kv_a_proj_with_mqa.weight"),
                  _copy(path + ("kv_norm", "scale"), prefix + "kv_a_layernorm.weight"),
                  _linear(path + ("wkv_b",), prefix + "kv_b_proj.weight"),
                  _linear(path + ("wo",), prefix + "o_proj.weight", n_in=2)]
  out = [_linear(path + (f"w{n}",), prefix + f"{n}_proj.weight") for n in "qkv"]
  out.append(_linear(path + ("wo",), prefix + "o_proj.weight", n_in=2))
  if cfg.qkv_bias:
    out += [_copy(path + (f"b{n}",), prefix + f"{n}_proj.bias") for n in "qkv"]
  if cfg.qk_norm:
    out += [_copy(path + (f"{n}_norm", "scale"), prefix + f"{n}_norm.weight") for n in "qk"]
  return out


def _moe(cfg: ModelConfig, arch: str, path, prefix, fused: bool) -> list[Entry]:
  out = [_linear(path + ("router",), prefix + "gate.weight")]
  if arch == DEEPSEEK_V3:
    out.append(_copy(path + ("bias",), prefix + "gate.e_score_correction_bias"))
  if fused:
    out += [_fused_experts(path + ("w_gate",), prefix + "experts.gate_up_proj", "gate"),
            _fused_experts(path + ("w_up",), prefix + "experts.gate_up_proj", "up"),
            _fused_experts(path + ("w_down",), prefix + "experts.down_proj", "down")]
  else:
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
      keys = [f"{prefix}experts.{e}.{theirs}.weight" for e in range(cfg.n_experts)]
      out.append(_experts(path + (ours,), keys))
  if cfg.n_shared_experts:
    out += _mlp(path + ("shared",), prefix + "shared_experts.")
  return out


def _block(cfg, arch, path, prefix, layer, fused_layers) -> list[Entry]:
  out = [_copy(path + ("attn_norm", "scale"), prefix + "input_layernorm.weight"),
         _copy(path + ("ffn_norm", "scale"), prefix + "post_attention_layernorm.weight")]
  out += _attention(cfg, path + ("attn",), prefix + "self_attn.")
  if cfg.layer_is_moe(layer):
    return out + _moe(cfg, arch, path + ("ffn",), prefix + "mlp.", layer in fused_layers)
  return out + _mlp(path + ("ffn",), prefix + "mlp.")


def mtp_shared_keys(cfg: ModelConfig) -> list[str]:
  """DeepSeek-V3 stores copies of the embedding and LM head in each MTP layer; ours share
  the main model's (the paper's MTP modules share them too, sec. 2.2)."""
  keys = []
  for j in range(cfg.mtp_depth):
    prefix = f"model.layers.{cfg.n_layers + j}."
    keys += [prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"]
  return keys


def tensor_map(cfg: ModelConfig, arch: str, fused_layers=frozenset()) -> list[Entry]:
  """Every variable of Transformer(cfg) and its HF tensors; `fused_layers` are layer indices
  whose experts are stored fused (gate_up_proj / down_proj) rather than one per expert."""
  arch = canonical_arch(arch)
  out = [_copy(("embed",), "model.embed_tokens.weight", hf_ndim=2),
         _copy(("final_norm", "scale"), "model.norm.weight")]
  if not cfg.tie_embeddings:
    out.append(_linear(("lm_head",), "lm_head.weight"))
  for i in range(cfg.n_layers):
    out += _block(cfg, arch, ("layers", i), f"model.layers.{i}.", i, fused_layers)
  for j in range(cfg.mtp_depth):
    n = cfg.n_layers + j
    prefix, path = f"model.layers.{n}.", ("mtp", j)
    out += [_copy(path + ("hidden_norm", "scale"), prefix + "hnorm.weight"),
            _copy(path + ("embed_norm", "scale"), prefix + "enorm.weight"),
            _mtp_proj(path + ("proj",), prefix + "eh_proj.weight"),
            _copy(path + ("final_norm", "scale"), prefix + "shared_head.norm.weight")]
    out += _block(cfg, arch, path + ("block",), prefix, n, fused_layers)
  return out


# --- Reading safetensors ---------------------------------------------------------------


class SafetensorsReader:
  """Tensor-by-tensor access to a folder of safetensors files (single or sharded)."""

  def __init__(self, folder: Path):
    index = folder / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.file_of = {key: folder / name for key, name in weight_map.items()}
    else:
      files = sorted(folder.glob("*.safetensors"))
      if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
          raise ValueError(
              f"{folder} holds only pickled weights ({', '.join(pickled)}); r1jax never unpickles "
              "checkpoints. Convert them to safetensors first (e.g. transformers' "
              "save_pretrained(..., safe_serialization=True)).")
        raise FileNotFoundError(f"no *.safetensors in {folder}")
      self.file_of = {}
      for file in files:
        with safe_open(file, framework="numpy") as f:
          self.file_of.update({key: file for key in f.keys()})
    self._open = {}

  def keys(self) -> set[str]:
    return set(self.file_of)

  def _handle(self, file):
    if file not in self._open:
      self._open[file] = safe_open(file, framework="numpy")
    return self._open[file]

  def get(self, key: str) -> np.ndarray:
    file = self.file_of[key]
    handle = self._handle(file)
    if handle.get_slice(key).get_dtype().startswith("F8"):
      return _read_raw(file, key)  # safetensors' numpy backend has no float8 dtypes
    return handle.get_tensor(key)

  def close(self):
    self._open.clear()


def _read_raw(file: Path, key: str) -> np.ndarray:
  """One tensor read straight from the safetensors layout (8-byte header size, JSON header)."""
  dtypes = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
  with open(file, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(header_len))[key]
    start, end = info["data_offsets"]
    f.seek(8 + header_len + start)
    data = f.read(end - start)
  return np.frombuffer(data, dtypes[info["dtype"]]).reshape(info["shape"])


def _dequantize_fp8(w_oi, scale_inv_blocks, block) -> np.ndarray:
  """DeepSeek-V3's block fp8: each [b0, b1] block of the weight is multiplied by its scale."""
  rows, cols = w_oi.shape
  scale = np.repeat(np.repeat(scale_inv_blocks.astype(np.float32), block[0], 0), block[1], 1)
  return w_oi.astype(np.float32) * scale[:rows, :cols]


# --- load / save -----------------------------------------------------------------------


def _variable(model, path) -> nnx.Variable:
  node = model
  for name in path:
    node = node[name] if isinstance(name, int) else getattr(node, name)
  return node


def _layer_index(key: str) -> int | None:
  match = re.match(r"model\.layers\.(\d+)\.", key)
  return int(match.group(1)) if match else None


def load(path, *, mesh=None, rules=None, strict: bool = True, **overrides) -> Transformer:
  """The Transformer of a Hugging Face folder (config.json + safetensors).

  overrides: ModelConfig fields, e.g. moe_impl="dense", dtype="bfloat16" (compute dtype),
    param_dtype="bfloat16" (the dtype weights are held in; default float32), mtp_depth=1 (load
    DeepSeek-V3's MTP layers, skipped otherwise as transformers does).
  mesh, rules: put each weight straight into its NamedSharding from its logical axes
    (r1jax.parallel rules, TRAIN_RULES by default); without a mesh: the default device.
  strict: raise on checkpoint tensors no variable takes (else log them).
  """
  folder = Path(path)
  if not (folder / "config.json").exists():
    raise FileNotFoundError(f"{folder} has no config.json (expected a Hugging Face model folder)")
  hf = json.loads((folder / "config.json").read_text())
  cfg = config_from_hf(hf, **overrides)
  arch = arch_of(hf)
  reader = SafetensorsReader(folder)
  keys = reader.keys()
  fused_layers = {_layer_index(k) for k in keys if k.endswith("mlp.experts.gate_up_proj")}
  block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  used = set()
  try:
    for entry in tensor_map(cfg, arch, fused_layers):
      missing = [k for k in entry.hf_keys if k not in keys]
      if missing:
        raise ValueError(f"{folder}: missing tensor(s) {missing[:4]} for {'.'.join(map(str, entry.path))}")
      arrays = []
      for key in entry.hf_keys:
        array = reader.get(key)
        if key + "_scale_inv" in keys:
          array = _dequantize_fp8(array, reader.get(key + "_scale_inv"), block)
          used.add(key + "_scale_inv")
        arrays.append(array)
      var = _variable(model, entry.path)
      shape = var.get_value().shape
      value = entry.to_ours(arrays, shape)
      del arrays
      if value.shape != shape:
        raise ValueError(f"{entry.hf_keys[0]}: gives {value.shape} for {entry.path}, expected {shape}")
      # The balancing bias stays fp32 like the reference (it shifts sigmoid scores near 0.5).
      dtype = np.float32 if isinstance(var, RouterBias) else NUMPY_DTYPES[cfg.param_dtype]
      var.set_value(_place(value.astype(dtype, copy=False), var, mesh, rules))
      used.update(entry.hf_keys)
  finally:
    reader.close()
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and isinstance(var.get_value(), jax.ShapeDtypeStruct):
      if not isinstance(var, RouterBias):
        raise AssertionError(f"r1jax bug: no checkpoint tensor maps to {path}")
      # Qwen3-MoE has no balancing bias: selection is by the scores alone.
      var.set_value(_place(np.zeros(var.get_value().shape, np.float32), var, mesh, rules))
  used.update(k for k in mtp_shared_keys(cfg) if k in keys)
  _report_unused(keys - used, cfg, strict)
  return model


def _place(value: np.ndarray, var: nnx.Variable, mesh, rules) -> jax.Array:
  if mesh is None:
    return jnp.asarray(value)
  from r1jax import parallel  # pylint: disable=import-outside-toplevel
  sharding = parallel.state_shardings(var, mesh, rules or parallel.TRAIN_RULES)
  # Every process reads the whole tensor and keeps only its own shards (works multi-host).
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _report_unused(unused: set[str], cfg: ModelConfig, strict: bool):
  first_skipped = cfg.n_layers + cfg.mtp_depth
  mtp = {k for k in unused if _layer_index(k) is not None and _layer_index(k) >= first_skipped}
  if mtp:
    log.info("skipped %d multi-token-prediction tensors (layers >= %d), as transformers does; "
             "load with mtp_depth=N to keep them", len(mtp), cfg.n_layers)
  # Old checkpoints save the RoPE tables; they are recomputed from the config.
  rest = sorted(k for k in unused - mtp if not k.endswith("rotary_emb.inv_freq"))
  if rest:
    message = f"checkpoint tensors no r1jax variable takes: {rest[:8]}{' ...' if len(rest) > 8 else ''}"
    if strict:
      raise ValueError(message + " (load(..., strict=False) to ignore them)")
    log.warning(message)


def _hf_tensors(model: Transformer, arch: str, dtype):
  """(key, array) pairs of the model in HF layout, one variable at a time."""
  cfg = model.cfg
  def host(value, keep_dtype=False):
    value = np.asarray(jax.device_get(value))
    return value if keep_dtype or dtype is None else value.astype(NUMPY_DTYPES[dtype])
  for entry in tensor_map(cfg, arch):
    var = _variable(model, entry.path)
    value = host(var.get_value(), keep_dtype=isinstance(var, RouterBias))
    for key, array in zip(entry.hf_keys, entry.to_hf(value)):
      yield key, np.ascontiguousarray(array)
  if cfg.mtp_depth:
    embed = host(model.embed.get_value())
    head = embed if cfg.tie_embeddings else host(model.lm_head.get_value()).T
    for key in mtp_shared_keys(cfg):
      yield key, np.ascontiguousarray(embed if key.endswith("embed_tokens.weight") else head)


def save(model: Transformer, path, arch: str, *, dtype: str | None = None, max_shard_bytes: int = 5 << 30,
         base_config: dict | None = None):
  """Writes `model` as a Hugging Face folder of `arch`: config.json + model.safetensors, or
  model-0000i-of-0000n.safetensors shards + model.safetensors.index.json when larger than
  max_shard_bytes. dtype: 'float32' / 'bfloat16' to cast weights (default: as held).
  Weights are gathered to this host one variable at a time (single-process export)."""
  arch = canonical_arch(arch)
  cfg = model.cfg
  hf_config = to_hf_config(cfg, arch, base=base_config)
  if dtype:
    hf_config["dtype"] = dtype
  if arch == QWEN3_MOE:
    for i in range(cfg.n_layers):
      if cfg.layer_is_moe(i) and np.any(np.asarray(model.layers[i].ffn.bias.get_value())):
        raise ValueError(f"layer {i} has a non-zero routing bias, which {arch} cannot store")
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  # Shards are written as they fill (at most one shard in host memory), under temporary
  # names until their count is known.
  shards, shard, shard_bytes, total_bytes = [], {}, 0, 0
  for key, array in _hf_tensors(model, arch, dtype):
    if shard and shard_bytes + array.nbytes > max_shard_bytes:
      shards.append((_write_shard(folder, len(shards), shard), list(shard)))
      shard, shard_bytes = {}, 0
    shard[key] = array
    shard_bytes += array.nbytes
    total_bytes += array.nbytes
  shards.append((_write_shard(folder, len(shards), shard), list(shard)))
  if len(shards) == 1:
    os.replace(shards[0][0], folder / "model.safetensors")
  else:
    weight_map = {}
    for i, (tmp, keys) in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      os.replace(tmp, folder / name)
      weight_map.update({k: name for k in keys})
    index = dict(metadata=dict(total_size=total_bytes), weight_map=weight_map)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))


def _write_shard(folder: Path, i: int, tensors: dict) -> Path:
  name = folder / f".r1jax-shard-{i}.tmp"
  save_file(tensors, str(name), metadata={"format": "pt"})  # transformers expects format=pt
  return name
