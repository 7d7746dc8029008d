"""Test helpers: tiny random Hugging Face reference models, padded batches, tree comparisons.

torch and transformers are test-only dependencies, so they are imported inside the helpers
that need them.
"""

from __future__ import annotations

import jax
import numpy as np

# Tiny configs per architecture: a few layers, odd-ish sizes, initializer_range large enough
# that logits are O(1) (so a 1e-4 tolerance is meaningful) and routing scores are spread.
TINY_HF_CONFIGS = {
    "DeepseekV3ForCausalLM": dict(
        vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        v_head_dim=12, qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=128),
    "Qwen2ForCausalLM": dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "LlamaForCausalLM": dict(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    "Qwen3ForCausalLM": dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    "Qwen3MoeForCausalLM": dict(
        vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=128),
}


def tiny_hf_model(arch: str, seed: int = 0, init_std: float = 0.2, **overrides):
  """A random fp32 transformers model of `arch` with eager attention.

  Norm weights, biases and DeepSeek's e_score_correction_bias (zeros / ones at HF init) are
  randomised so that every tensor's mapping matters; router weights get a larger spread so
  top-k choices are far from ties.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  config_class = transformers.AutoConfig.for_model(_model_type(arch)).__class__
  config = config_class(**{**TINY_HF_CONFIGS[arch], "initializer_range": init_std, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      if "rotary_emb" in name:
        continue
      if name.endswith("norm.weight"):
        tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
      elif name.endswith("bias"):  # q/k/v biases and e_score_correction_bias
        tensor.copy_(0.2 * torch.randn_like(tensor))
      elif name.endswith("mlp.gate.weight"):
        tensor.copy_(torch.randn_like(tensor) / tensor.shape[-1] ** 0.5)
  return model


def _model_type(arch: str) -> str:
  from r1jax import hf  # pylint: disable=import-outside-toplevel
  return hf.ARCHITECTURES[hf.canonical_arch(arch)]


def padded_batch(vocab_size: int, lengths, length: int, seed: int = 0, left=None):
  """Token ids [B, T] with padding, the 0/1 mask [B, T] and positions [B, T].

  Row b holds lengths[b] real tokens, left-padded where left[b] (default: all rows) else
  right-padded; positions = cumsum(mask) - 1 clipped at 0, as transformers' generate does.
  """
  rng = np.random.default_rng(seed)
  left = [True] * len(lengths) if left is None else left
  mask = np.zeros((len(lengths), length), np.int32)
  for b, (n, is_left) in enumerate(zip(lengths, left)):
    if is_left:
      mask[b, length - n:] = 1
    else:
      mask[b, :n] = 1
  tokens = rng.integers(1, vocab_size, size=mask.shape).astype(np.int32) * mask
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def hf_logits(model, tokens, mask, positions) -> np.ndarray:
  """fp32 logits [B, T, V] of a transformers model on a padded batch."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def max_abs_diff_where(a, b, mask) -> float:
  """max |a - b| over the positions where mask [B, T] is set (a, b: [B, T, ...])."""
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return float(diff[np.asarray(mask).astype(bool)].max())


def assert_trees_equal(a, b):
  """Same structure, same shapes and dtypes, bit-identical values."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b, f"tree structures differ:\n{tree_a}\n{tree_b}"
  for path_leaf, x, y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    where = jax.tree_util.keystr(path_leaf[0])
    assert x.shape == y.shape and x.dtype == y.dtype, f"{where}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
    assert np.array_equal(x, y), f"{where}: values differ (max |diff| {np.abs(x - y).max()})"


def assert_trees_close(a, b, atol: float = 1e-6, rtol: float = 0.0):
  """Same structure and shapes, values within atol + rtol * |b|."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b, f"tree structures differ:\n{tree_a}\n{tree_b}"
  for path_leaf, x, y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path_leaf[0]))
