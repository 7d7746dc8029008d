"""The GRPO forward that runs each group's prompt once (trainer.prefix_shared_hidden)
equals the whole-row forward: log-probs and their gradients, for dense GQA and MoE MLA
(with routing replay), left-padded prompts and completions that stop early."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import flops
from r1jax import state as state_lib
from r1jax.model.config import ModelConfig
from r1jax.rl import grpo, trainer
from r1jax.sampling.sampler import SamplingParams, generate

DENSE_GQA = ModelConfig(n_heads=4, n_kv_heads=2)
MOE_MLA = ModelConfig(attention="mla", n_experts=4, top_k=2, n_shared_experts=1, q_lora_rank=8,
                      first_k_dense=1)
G, N = 3, 7


def _batch(model):
  """Rollout rows of 3 left-padded prompts x G; the EOS id is row 0's third sampled token,
  so (the same key draws the same tokens) row 0 and maybe others stop early."""
  ids = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [0, 0, 0, 4, 8]], np.int32)
  mask = (ids > 0).astype(np.int32)

  def sample(eos_ids):
    return jax.device_get(generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(3),
                                   group_size=G, params=SamplingParams(max_new_tokens=N, eos_ids=eos_ids)))

  out = sample((int(sample(())["tokens"][0, 2]),))
  assert out["mask"][0].sum() <= 3 and out["mask"].sum(1).max() == N  # some stop early, some run on
  return trainer.sequence_batch(ids, mask, out, G), ids.shape[1]


@pytest.mark.parametrize("cfg", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_prefix_shared_logprobs_and_grads_equal_whole_rows(cfg):
  model = state_lib.create_model(cfg, seed=1)
  batch, tp = _batch(model)
  graphdef, params, other = state_lib.split_model(model)
  batch = jax.tree.map(jnp.asarray, batch)
  mask = np.asarray(batch["completion_mask"]) > 0

  def logp_sum(p, group_size):
    logp = trainer.completion_logprobs(graphdef, p, other, batch, tp, 1.0, replay=True, group_size=group_size)
    return jnp.where(mask, logp, 0).sum(), logp

  (s_whole, logp_whole), g_whole = jax.value_and_grad(logp_sum, has_aux=True)(params, 0)
  (s_shared, logp_shared), g_shared = jax.value_and_grad(logp_sum, has_aux=True)(params, G)
  np.testing.assert_allclose(np.asarray(logp_shared)[mask], np.asarray(logp_whole)[mask], atol=1e-5)
  # The rollout's own log-probs agree too (the sampler runs the same prefill).
  np.testing.assert_allclose(np.asarray(logp_shared)[mask], np.asarray(batch["old_logp"])[mask], atol=1e-5)
  np.testing.assert_allclose(float(s_shared), float(s_whole), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_shared_prefix_group_needs_whole_groups():
  rl = grpo.default_rl_config()
  rl.group_size = 4
  assert trainer.shared_prefix_group(rl, 8) == 4
  assert trainer.shared_prefix_group(rl, 6) == 0  # a minibatch that splits a group runs whole rows
  rl.shared_prefix = False
  assert trainer.shared_prefix_group(rl, 8) == 0


def test_grpo_forward_flops_counts_each_prompt_once_when_shared():
  cfg, b, g, tp, n = DENSE_GQA, 8, 8, 32, 128
  whole = flops.grpo_forward_flops(cfg, b, g, tp, n, shared_prefix=False)
  # A training step over the same rows, less the vocabulary projection at the Tp prompt
  # positions of each row that no completion token needs (N of T + N are projected).
  head = 2 * cfg.d_model * cfg.vocab_size
  np.testing.assert_allclose(3 * whole, flops.train_flops(cfg, b * g * (tp + n), tp + n) - 3 * b * g * tp * head,
                             rtol=1e-12)
  shared = flops.grpo_forward_flops(cfg, b, g, tp, n, shared_prefix=True)
  np.testing.assert_allclose(whole - shared, (g - 1) * b * tp * (flops.forward_flops_per_token(cfg, tp) - head),
                             rtol=1e-12)


def test_training_forwards_never_take_the_sampler_moe_dispatch(monkeypatch):
  """Without a decode cache, an attention returns its keys and values in the cache's
  place; a block must still run its MoE with the training dispatch (cached_moe gives the
  same values, so only this catches it, and its capacity buffers at training sizes are
  6x the memory: bench/NOTES.md, session 9). Covers the plain forward with an MTP depth,
  a prompt forward with return_kv and the completions after it; the sampler still uses
  cached_moe."""
  import r1jax.model.transformer as transformer  # pylint: disable=import-outside-toplevel
  calls = []
  real = transformer.cached_moe
  monkeypatch.setattr(transformer, "cached_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
  model = state_lib.create_model(ModelConfig(**{**MOE_MLA.__dict__, "mtp_depth": 1}), seed=1)
  tokens = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]], jnp.int32)
  _, aux = model(tokens, return_kv=True)
  assert "mtp_logits" in aux and aux["experts"] is not None
  model(tokens[:, :2], jnp.asarray([[4, 5], [4, 5]], jnp.int32), cache=aux["prompt"])
  assert not calls
  generate(model, prompt_ids_bt=np.asarray(tokens), prompt_mask_bt=np.ones((2, 4), np.int32), rng=jax.random.key(0),
           params=SamplingParams(max_new_tokens=2))
  assert calls
