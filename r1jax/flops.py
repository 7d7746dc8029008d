"""Model FLOPs counted from a ModelConfig's shapes: the numerator of every MFU.

Convention (stated, since MFU figures are only comparable under one): a matmul of
[m, k] @ [k, n] is 2 m k n FLOPs. Per token, the forward pass does 2 x the *active*
matmul parameters (attention projections, the FFN -- for MoE layers the top_k routed
plus the shared experts and the router -- and the vocabulary projection; embeddings
are a gather, norms and RoPE are not counted), plus attention's two matmuls against
the (causal) context: a token at position t attends to t + 1 keys, so a sequence of T
tokens averages (T + 1) / 2. Training is 3 x forward (backward = 2 x forward). Work a
particular implementation adds (the dense masked T x T attention r1jax computes, a
dense MoE dispatch, rematerialisation) is overhead, not model FLOPs: MFU charges it.
"""

from __future__ import annotations

from r1jax.model.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
  d, h = cfg.d_model, cfg.n_heads
  if cfg.attention == "mla":
    q_out = h * cfg.qk_head_dim
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * q_out if cfg.q_lora_rank else d * q_out
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d
  return d * h * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim + h * cfg.head_dim * d


def ffn_params(cfg: ModelConfig, layer: int) -> int:
  """Active FFN matmul parameters of one layer (SwiGLU: 3 matrices)."""
  if cfg.layer_is_moe(layer):
    return 3 * cfg.d_model * cfg.moe_d_ff * (cfg.top_k + cfg.n_shared_experts) + cfg.d_model * cfg.n_experts
  return 3 * cfg.d_model * cfg.d_ff


def active_matmul_params(cfg: ModelConfig) -> int:
  layers = sum(attention_params(cfg) + ffn_params(cfg, i) for i in range(cfg.n_layers))
  return layers + cfg.d_model * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward score + value matmuls of one token against its causal context, all layers."""
  qk = cfg.qk_head_dim if cfg.attention == "mla" else cfg.head_dim
  v = cfg.v_head_dim if cfg.attention == "mla" else cfg.head_dim
  return cfg.n_layers * 2.0 * cfg.n_heads * (qk + v) * (seq_len + 1) / 2


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 2.0 * active_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def train_flops(cfg: ModelConfig, n_tokens: int, seq_len: int) -> float:
  """Model FLOPs of one training step over n_tokens tokens in rows of seq_len."""
  return 3.0 * n_tokens * forward_flops_per_token(cfg, seq_len)


def grpo_forward_flops(cfg: ModelConfig, prompts: int, group: int, prompt_len: int, new_tokens: int,
                       shared_prefix: bool) -> float:
  """Model FLOPs of one forward over a GRPO batch of B prompts x G completions: the
  prompts B times when each group's prompt runs once (trainer.prefix_shared_hidden),
  B*G times when every row runs whole. A completion token at position Tp + j attends
  to Tp + j + 1 keys: on average those of a (2 Tp + N)-token sequence. The vocabulary
  projection runs at the N positions of a row that predict its completion (the last
  prompt token and the first N - 1 completion tokens; trainer.completion_logprobs),
  not at every position."""
  head = 2.0 * cfg.d_model * cfg.vocab_size
  prompt_rows = prompts if shared_prefix else prompts * group
  rows = prompts * group
  return (prompt_rows * prompt_len * (forward_flops_per_token(cfg, prompt_len) - head)
          + rows * new_tokens * forward_flops_per_token(cfg, 2 * prompt_len + new_tokens))
