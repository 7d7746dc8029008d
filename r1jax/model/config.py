"""ModelConfig: one frozen dataclass describing every architecture r1jax builds.

The same decoder covers DeepSeek-V3 (MLA + DeepSeekMoE), Qwen2/2.5, Llama-3, Qwen3 and
Qwen3-MoE. Field names follow the DeepSeek-V3 paper where they exist; `r1jax.hf` maps
them to and from Hugging Face `config.json` keys.

Shape legend used across the model package:
  B batch, T length (queries), S length (keys / cache), D d_model, F ffn width,
  H query heads, K kv heads (GQA), Dh head dim, E experts, k top-k, V vocab, R lora rank.
"""

from __future__ import annotations

import dataclasses

ATTENTION_KINDS = ("gqa", "mla")
ROPE_KINDS = ("default", "llama3", "yarn")
ROUTER_KINDS = ("sigmoid", "softmax")
MOE_IMPLS = ("auto", "ragged", "dense", "pallas", "blocked")
# moe_impl="auto": the fastest correct grouped FFN measured on each backend (bench/RESULTS.md,
# bench/train_step.py --moe): XLA:CPU expands ragged_dot densely (6.5x slower than
# blocked in a CPU MoE step); on an H200 the Triton gmm step ran 1.6x blocked and 2.6x
# ragged; TPUs run ragged_dot natively (megablox-style).
AUTO_MOE_IMPL = {"cpu": "blocked", "gpu": "pallas", "tpu": "ragged"}


def resolve_moe_impl(impl: str) -> str:
  """The grouped-FFN implementation to trace: `impl`, or the backend's choice for "auto"."""
  if impl != "auto":
    return impl
  import jax  # pylint: disable=import-outside-toplevel
  return AUTO_MOE_IMPL.get(jax.default_backend(), "ragged")
EP_ALL_TO_ALL = ("tiled", "ragged")
DTYPES = ("float32", "bfloat16")
# model.remat: what a differentiated forward keeps per block for the backward pass
# (r1jax.model.transformer.REMAT_POLICIES): everything, only the block's input, or the
# block's input plus its matmul outputs.
REMAT_KINDS = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Trunk.
  vocab_size: int = 96  # the char tokenizer of the tiny recipes has 96 ids
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  d_ff: int = 128
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  hidden_act: str = "silu"

  # Attention. "gqa" covers MHA/GQA/MQA (Llama, Qwen); "mla" is DeepSeek's
  # Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1).
  attention: str = "gqa"
  qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v (not on o).
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  q_lora_rank: int = 0  # MLA: 0 means a full-rank q projection.
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 16
  qk_rope_head_dim: int = 8
  v_head_dim: int = 16
  rope_interleave: bool = True  # DeepSeek checkpoints store RoPE dims as (x0,x1),(x2,x3)...

  # Rotary embeddings.
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_original_max_len: int = 4096
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 0.0

  # Mixture of experts (DeepSeekMoE, DeepSeek-V3 paper section 2.1.2). n_experts = 0: dense.
  n_experts: int = 0
  n_shared_experts: int = 0
  moe_d_ff: int = 64
  top_k: int = 2
  router: str = "sigmoid"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  first_k_dense: int = 0
  moe_every: int = 1  # Qwen3-MoE decoder_sparse_step.
  moe_impl: str = "auto"  # auto | ragged | pallas | blocked | dense (see resolve_moe_impl)
  capacity_factor: float = 0.0  # 0: drop-less (DeepSeek-V3 drops no tokens).
  # Expert parallelism: "tiled" lax.all_to_all (runs everywhere) or "ragged"
  # lax.ragged_all_to_all (accelerators only; XLA:CPU does not implement it).
  ep_all_to_all: str = "tiled"
  # Complementary sequence-wise balance loss weight alpha (DeepSeek-V3 eqs. 17-20); 0: off.
  seq_balance_alpha: float = 0.0

  # Multi-token prediction (DeepSeek-V3 section 2.2); 0 disables the MTP head.
  mtp_depth: int = 0

  # Memory of a differentiated forward (training, reference and GRPO log-probs; the
  # sampler's prefill and decode never use them). Same values and gradients either way.
  remat: str = "none"  # none | full | save_dots: recompute each block in the backward pass
  attention_chunk: int = 0  # queries per attention block (scores [chunk, S], not [T, S]); 0: whole
  logits_chunk: int = 0  # tokens per vocabulary-projection block for log-probs; 0: whole [T, V]

  # Precision: fp32 master params; `dtype` is the matmul/activation dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  @property
  def is_moe(self) -> bool:
    return self.n_experts > 0

  def layer_is_moe(self, layer: int) -> bool:
    return (
        self.is_moe
        and layer >= self.first_k_dense
        and (layer + 1) % self.moe_every == 0
    )

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def rope_dim(self) -> int:
    return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

  def problems(self) -> list[str]:
    """Every inconsistency in this config, each as one readable sentence."""
    out = []
    def need(cond, msg):
      if not cond:
        out.append(msg)
    need(self.attention in ATTENTION_KINDS, f"model.attention={self.attention!r}: choose one of {ATTENTION_KINDS}")
    need(self.rope_type in ROPE_KINDS, f"model.rope_type={self.rope_type!r}: choose one of {ROPE_KINDS}")
    need(self.router in ROUTER_KINDS, f"model.router={self.router!r}: choose one of {ROUTER_KINDS}")
    need(self.moe_impl in MOE_IMPLS, f"model.moe_impl={self.moe_impl!r}: choose one of {MOE_IMPLS}")
    need(self.dtype in DTYPES, f"model.dtype={self.dtype!r}: choose one of {DTYPES}")
    need(self.param_dtype in DTYPES, f"model.param_dtype={self.param_dtype!r}: choose one of {DTYPES}")
    need(self.hidden_act in ("silu", "gelu"), f"model.hidden_act={self.hidden_act!r}: choose 'silu' or 'gelu'")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
      need(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
    if self.attention == "gqa":
      need(self.n_kv_heads > 0 and self.n_heads % max(self.n_kv_heads, 1) == 0,
           f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
      need(self.head_dim > 0 and self.head_dim % 2 == 0,
           f"model.head_dim={self.head_dim} must be positive and even (RoPE rotates pairs)")
    else:
      need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
           f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be positive and even")
      need(self.kv_lora_rank > 0, f"model.kv_lora_rank={self.kv_lora_rank} must be positive for MLA")
      need(self.v_head_dim > 0, f"model.v_head_dim={self.v_head_dim} must be positive")
      need(self.q_lora_rank >= 0, f"model.q_lora_rank={self.q_lora_rank} must be >= 0 (0: full rank)")
    if self.is_moe:
      need(0 < self.top_k <= self.n_experts,
           f"model.top_k={self.top_k} must be in 1..model.n_experts={self.n_experts}")
      need(self.n_group >= 1 and self.n_experts % self.n_group == 0,
           f"model.n_experts={self.n_experts} must be divisible by model.n_group={self.n_group}")
      need(1 <= self.topk_group <= self.n_group,
           f"model.topk_group={self.topk_group} must be in 1..model.n_group={self.n_group}")
      if self.n_group > 1 and self.n_experts % self.n_group == 0:
        per_group = self.n_experts // self.n_group
        need(per_group >= 2, f"group-limited routing scores a group by its top-2 experts: "
             f"model.n_experts/model.n_group={per_group} must be >= 2")
        need(self.topk_group * per_group >= self.top_k,
             f"model.topk_group={self.topk_group} groups of {per_group} experts cannot hold "
             f"model.top_k={self.top_k} choices")
      need(self.moe_d_ff > 0, f"model.moe_d_ff={self.moe_d_ff} must be positive")
      need(self.capacity_factor >= 0, f"model.capacity_factor={self.capacity_factor} must be >= 0 (0: drop-less)")
      need(self.moe_every >= 1, f"model.moe_every={self.moe_every} must be >= 1")
      need(self.ep_all_to_all in EP_ALL_TO_ALL,
           f"model.ep_all_to_all={self.ep_all_to_all!r}: choose one of {EP_ALL_TO_ALL}")
      need(self.seq_balance_alpha >= 0, f"model.seq_balance_alpha={self.seq_balance_alpha} must be >= 0")
    if self.rope_type != "default":
      need(self.rope_factor >= 1.0, f"model.rope_factor={self.rope_factor} must be >= 1 for {self.rope_type} scaling")
    need(self.mtp_depth >= 0, f"model.mtp_depth={self.mtp_depth} must be >= 0")
    need(self.remat in REMAT_KINDS, f"model.remat={self.remat!r}: choose one of {REMAT_KINDS}")
    for name in ("attention_chunk", "logits_chunk"):
      need(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0 (0: off)")
    return out
