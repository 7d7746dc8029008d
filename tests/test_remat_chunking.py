"""The memory knobs of a differentiated forward (model.remat, model.attention_chunk) keep
the model's values and gradients, and do cut what XLA allocates.

References: the same model with both knobs off (remat "none", whole [T, S] attention).
Rows are packed (two segments and padding), T is not a multiple of the query block, and
the GRPO update's shared-prompt forward (cache=SharedPrompt) is checked too.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import state as state_lib
from r1jax.model.attention import over_query_blocks
from r1jax.model.config import ModelConfig
from r1jax.model.transformer import attention_mask, token_logprobs
from r1jax.sampling.sampler import SamplingParams, generate, prompt_positions

DENSE_GQA = ModelConfig(n_layers=3, n_heads=4, n_kv_heads=2)
MOE_MLA = ModelConfig(n_layers=3, attention="mla", n_experts=4, top_k=2, n_shared_experts=1,
                      q_lora_rank=8, first_k_dense=1)
T = 13
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = [dict(remat="full"), dict(remat="save_dots"), dict(attention_chunk=4),
         dict(remat="full", attention_chunk=5)]


def _packed_batch(vocab: int):
  """Two rows of T tokens: row 0 packs segments of 6 and 7, row 1 is 9 tokens + padding."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, size=(2, T)).astype(np.int32)
  seg = np.array([[1] * 6 + [2] * 7, [1] * 9 + [0] * 4], np.int32)
  pos = np.array([list(range(6)) + list(range(7)), list(range(9)) + [0] * 4], np.int32)
  return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _loss_and_grads(cfg):
  """(logits, mean NLL, gradients) of a model built from seed 1 with `cfg`."""
  model = state_lib.create_model(cfg, seed=1)
  graphdef, params, other = state_lib.split_model(model)
  tokens, pos, seg = _packed_batch(cfg.vocab_size)

  def loss(p):
    logits, _ = state_lib.merge(graphdef, p, other)(tokens, pos, seg)
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    nll = -jnp.where(valid, token_logprobs(logits[:, :-1], tokens[:, 1:]), 0).sum() / valid.sum()
    return nll, logits

  (nll, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), float(nll), grads


@pytest.mark.parametrize("base", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_remat_and_attention_blocks_keep_values_and_gradients(base):
  want_logits, want_nll, want_grads = _loss_and_grads(base)
  real = np.asarray(_packed_batch(base.vocab_size)[2]) > 0
  for knobs in KNOBS:
    logits, nll, grads = _loss_and_grads(dataclasses.replace(base, **knobs))
    np.testing.assert_allclose(logits[real], want_logits[real], atol=2e-5, err_msg=str(knobs))
    np.testing.assert_allclose(nll, want_nll, rtol=1e-6, err_msg=str(knobs))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6,
                                 err_msg=f"{knobs} {jax.tree_util.keystr(path)}")


def test_query_blocks_see_every_key_and_drop_the_padding():
  """over_query_blocks against the whole call, on a function whose output depends on the
  query's own row (a wrong block order, offset or block mask would move values between
  rows). Two packed segments per row, causal."""
  x = jnp.arange(2 * 11 * 3, dtype=jnp.float32).reshape(2, 11, 3) / 50
  keys = jnp.linspace(-1.0, 1.0, 2 * 11 * 3).reshape(2, 11, 3)
  seg = jnp.asarray([[1] * 4 + [2] * 7, [1] * 8 + [0] * 3], jnp.int32)
  pos = jnp.asarray([list(range(4)) + list(range(7)), list(range(8)) + [0] * 3], jnp.int32)
  mask = attention_mask(pos, seg)

  def attend(q, m):  # [B, t, 3] queries over all 11 keys
    s = jnp.where(m, jnp.einsum("btd,bsd->bts", q, keys), -1e30)
    return jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, axis=-1), keys) + q

  want = attend(x, mask.dense())
  for chunk in (1, 3, 4, 11, 16):
    np.testing.assert_allclose(np.asarray(over_query_blocks(attend, x, mask, chunk)), np.asarray(want),
                               rtol=1e-6, err_msg=f"chunk {chunk}")
  pair = lambda qs, m: attend(qs[0], m) - qs[1]  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_allclose(np.asarray(over_query_blocks(pair, (x, 2 * x), mask, 4)),
                             np.asarray(want - 2 * x), rtol=1e-6)


@pytest.mark.parametrize("base", [DENSE_GQA, MOE_MLA], ids=["dense_gqa", "moe_mla"])
def test_shared_prompt_forward_with_blocks_and_remat(base):
  """The GRPO update's shared-prompt pass: 2 rows of 9 completion tokens after each of 2
  left-padded prompts (cache=SharedPrompt), differentiated. Same values and gradients with
  the knobs (the query blocks split the completions, not the prompt)."""
  prompt = jnp.asarray([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]], jnp.int32)
  pmask = (prompt > 0).astype(jnp.int32)
  comp = jnp.asarray(np.random.default_rng(1).integers(1, base.vocab_size, size=(4, 9)), jnp.int32)
  pos = jnp.repeat(pmask.sum(1), 2)[:, None] + jnp.arange(9, dtype=jnp.int32)[None]

  def run(cfg):
    model = state_lib.create_model(cfg, seed=2)
    graphdef, params, other = state_lib.split_model(model)

    def loss(p):
      m = state_lib.merge(graphdef, p, other)
      _, aux = m(prompt, prompt_positions(pmask, 14), pmask, mtp=False, return_hidden=True, return_kv=True)
      logits, _ = m(comp, pos, jnp.ones_like(comp), cache=aux["prompt"])
      return token_logprobs(logits[:, :-1], comp[:, 1:]).sum(), logits

    (s, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(s), np.asarray(logits), grads

  want_s, want_logits, want_grads = run(base)
  s, logits, grads = run(dataclasses.replace(base, remat="full", attention_chunk=4))
  np.testing.assert_allclose(logits, want_logits, atol=2e-5)
  np.testing.assert_allclose(s, want_s, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_sampler_unchanged_by_the_knobs():
  """Greedy rollouts (a chunked prefill, decode untouched) give the same tokens and
  log-probs; remat never applies on the sampling path."""
  ids = np.array([[0, 0, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int32)
  params = SamplingParams(max_new_tokens=6, greedy=True)

  def roll(cfg):
    model = state_lib.create_model(cfg, seed=3)
    return jax.device_get(generate(model, prompt_ids_bt=ids, prompt_mask_bt=(ids > 0).astype(np.int32),
                                   rng=jax.random.key(0), group_size=2, params=params))

  want = roll(DENSE_GQA)
  got = roll(dataclasses.replace(DENSE_GQA, remat="full", attention_chunk=4))
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)


MEMORY_CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
                         d_ff=128)


def _loss_of(cfg, t: int):
  """(next-token loss of params, params) over a [2, t] batch: activations dominate."""
  model = state_lib.create_model(cfg, seed=0)
  graphdef, params, other = state_lib.split_model(model)
  tokens = jnp.zeros((2, t), jnp.int32)

  def loss(p):
    logits, _ = state_lib.merge(graphdef, p, other)(tokens)
    return token_logprobs(logits[:, :-1], tokens[:, 1:]).sum()

  return loss, params


def _residual_bytes(cfg, t: int) -> int:
  """Bytes autodiff keeps from the forward pass for the backward pass (the vjp's
  residuals, as shapes: nothing runs). Backend-independent."""
  loss, params = _loss_of(cfg, t)
  residuals = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
  return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in residuals)


def test_remat_and_query_blocks_cut_what_the_backward_pass_keeps():
  """8 layers at T = 512: without remat every layer's [T, T] scores and activations are
  kept; "full" keeps each block's input; "save_dots" adds the projections; query
  blocks of 64 drop the [T, T] terms."""
  none = _residual_bytes(MEMORY_CFG, 512)
  full = _residual_bytes(dataclasses.replace(MEMORY_CFG, remat="full"), 512)
  dots = _residual_bytes(dataclasses.replace(MEMORY_CFG, remat="save_dots"), 512)
  blocks = _residual_bytes(dataclasses.replace(MEMORY_CFG, attention_chunk=64), 512)
  assert full < 0.05 * none, (none, full)
  assert full < dots < 0.2 * none, (none, full, dots)
  assert blocks < 0.3 * none, (none, blocks)


COMPILED_MEMORY = """
import dataclasses, json, jax
from tests import test_remat_chunking as t
out = {}
for name, knobs in dict(none={}, full=dict(remat="full"), blocks=dict(attention_chunk=64),
                        both=dict(remat="full", attention_chunk=64)).items():
  loss, params = t._loss_of(dataclasses.replace(t.MEMORY_CFG, **knobs), 512)
  out[name] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


def test_compiled_gradient_allocates_less(tmp_path):
  """XLA's own memory analysis of the compiled gradient. On XLA:CPU this needs the
  memory-aware scheduler: the default concurrency-optimised one schedules every block's
  recomputation early and the saving vanishes (bench/NOTES.md, session 7), so the check
  runs in a process started with that flag (XLA reads it at start-up)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
  run = subprocess.run([sys.executable, "-c", COMPILED_MEMORY], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  temp = json.loads(run.stdout.strip().splitlines()[-1])
  assert temp["full"] < 0.4 * temp["none"], temp
  assert temp["blocks"] < 0.5 * temp["none"], temp
  assert temp["both"] < 0.5 * min(temp["full"], temp["blocks"]), temp
