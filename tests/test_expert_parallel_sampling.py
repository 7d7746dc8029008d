"""Expert-parallel rollouts: `generate(mesh=...)` on a mesh with an `expert` axis splits the
routed experts over it (r1jax.model.cached_moe). Every result must equal one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from r1jax import testing
from r1jax.model import expert_parallel
from r1jax.model.cached_moe import cached_moe, moe_capacities
from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer
from r1jax.sampling.sampler import SamplingParams, expert_parallel_specs, generate

MOE_MLA = ModelConfig(attention="mla", n_experts=4, top_k=2, n_shared_experts=1, q_lora_rank=8,
                      first_k_dense=1)
MOE_GQA = ModelConfig(n_heads=4, n_kv_heads=2, n_experts=8, top_k=2, moe_d_ff=32)


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _prompts(b, seed, vocab=96, length=6):
  """Left-padded prompts of 2..length tokens [B, length] and their mask."""
  lengths = np.random.default_rng(seed).integers(2, length + 1, size=b)
  return testing.padded_batch(vocab, lengths, length, seed=seed)[:2]


def test_specs_split_only_the_routed_experts():
  model = Transformer(MOE_MLA, nnx.Rngs(0))
  _, state = nnx.split(model)
  specs, ep = expert_parallel_specs(state, _mesh((2, 2), ("data", "expert")))
  assert ep == 2
  flat = {jax.tree_util.keystr(path): spec for path, spec in
          jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}
  split = sorted(k for k, s in flat.items() if any(a is not None for a in s))
  assert split == [f"['layers'][1]['ffn']['{w}']" for w in ("w_down", "w_gate", "w_up")], split
  assert flat["['layers'][1]['ffn']['w_gate']"] == P("expert", None, None)
  # No expert axis, or a dense model: nothing is split.
  assert expert_parallel_specs(state, _mesh((2,), ("data",)))[1] == 1
  dense_state = nnx.split(Transformer(ModelConfig(), nnx.Rngs(0)))[1]
  assert expert_parallel_specs(dense_state, _mesh((2,), ("expert",)))[1] == 1


@pytest.mark.parametrize("cfg,shape,names", [
    (MOE_MLA, (2, 2, 2), ("data", "expert", "tensor")),
    (MOE_GQA, (4,), ("expert",)),
], ids=["mla_data2_expert2", "gqa_expert4"])
def test_expert_parallel_rollouts_equal_one_device(cfg, shape, names):
  """Tokens, masks, experts and decode steps are equal and log-probs within 1e-5, with
  rows of different lengths on different devices (the devices of an expert group must
  run the same number of steps: the loop stops when none of them has a live row)."""
  model = Transformer(cfg, nnx.Rngs(2))
  ids, mask = _prompts(4, seed=6)
  params = SamplingParams(max_new_tokens=7, temperature=1.0, cache_segments=2)
  rng = np.random.default_rng(7)
  budget = rng.integers(1, 8, size=8).astype(np.int32)
  budget[:2] = 7  # the longest rows sit on the first device only
  run = lambda **kw: jax.device_get(generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(3),
                                             group_size=2, params=params, max_tokens_per_row=budget, **kw))
  one, split = run(), run(mesh=_mesh(shape, names))
  for key in ("tokens", "mask", "experts", "prompt_experts"):
    np.testing.assert_array_equal(split[key], one[key], err_msg=key)
  np.testing.assert_allclose(split["logprobs"], one["logprobs"], atol=1e-5)
  assert int(split["steps"]) == int(one["steps"]) == 7
  assert (one["mask"].sum(-1) == budget).all()


@pytest.mark.parametrize("forced", ["none", "replay", "skewed"])
def test_cached_moe_expert_parallel_equals_module(forced):
  """cached_moe inside a shard_map with the experts split over `expert` (two devices,
  eight experts each) gives the module's outputs: its own routing, replayed experts, and
  a skewed replay that overflows every capacity (the grouped-FFN fallback, where the
  other device's slots are empty rows)."""
  cfg = ModelConfig(n_experts=16, top_k=2, n_shared_experts=1, moe_d_ff=32, d_model=32)
  moe = Transformer(cfg, nnx.Rngs(3)).layers[0].ffn
  b = 40
  x = jax.random.normal(jax.random.key(4), (b, 1, cfg.d_model))
  experts = jnp.zeros((b, 1, 2), jnp.int32)
  if forced == "replay":
    first = jax.random.randint(jax.random.key(5), (b, 1, 1), 0, 8)
    experts = jnp.concatenate([first, first + 8], axis=-1)  # distinct per token
  elif forced == "skewed":
    experts = jnp.broadcast_to(jnp.array([3, 12]), (b, 1, 2))  # one busy expert per device
    assert b > moe_capacities(b, cfg.n_experts, cfg.top_k)[-1]
  want_y, want_e = moe(x, None if forced == "none" else experts)

  mesh = _mesh((2,), ("expert",))
  graphdef, state = nnx.split(moe)
  specs = jax.tree.map(lambda v: P("expert") if v.shape[0] == cfg.n_experts and v.ndim == 3 else P(), state)

  def local(state, x, experts):
    part = nnx.merge(graphdef, state)
    assert part.w_gate.shape[0] == cfg.n_experts // 2  # this device's slice of the experts
    return cached_moe(part, x, None if forced == "none" else experts)

  run = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(expert_parallel.EXPERT_AXIS), P(expert_parallel.EXPERT_AXIS)),
                      out_specs=P(expert_parallel.EXPERT_AXIS), check_vma=False)
  got_y, got_e = jax.jit(run)(state, x, experts)
  np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_e))
  np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), atol=1e-5)


def test_prompts_that_do_not_divide_over_the_mesh_are_padded():
  """3 prompts over 4 row shards (data 2 x expert 2): generate pads to 4 and drops the
  padding's rows; the 6 real rows equal one device's."""
  model = Transformer(MOE_MLA, nnx.Rngs(4))
  ids, mask = _prompts(3, seed=9)
  params = SamplingParams(max_new_tokens=5, temperature=1.0)
  run = lambda **kw: jax.device_get(generate(model, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(8),
                                             group_size=2, params=params, **kw))
  one, split = run(), run(mesh=_mesh((2, 2), ("data", "expert")))
  assert split["tokens"].shape == one["tokens"].shape == (6, 5)
  for key in ("tokens", "mask", "experts", "prompt_experts"):
    np.testing.assert_array_equal(split[key], one[key], err_msg=key)
  np.testing.assert_allclose(split["logprobs"], one["logprobs"], atol=1e-5)
  assert int(split["steps"]) == int(one["steps"])
