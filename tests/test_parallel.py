"""Sharded == one device: the same loss, gradients and updated parameters on every mesh."""

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax import optim, parallel, sft
from r1jax import state as state_lib
from r1jax.model.config import ModelConfig

MOE_MLA = ModelConfig(attention="mla", n_experts=4, top_k=2, n_shared_experts=1, first_k_dense=1,
                      q_lora_rank=8, n_heads=4)


def _batch(b=8, t=12, vocab=64):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[1, 9:] = 0  # padding must be ignored identically on every mesh
  return dict(tokens=tokens, loss_mask=np.ones_like(tokens), segment_ids=seg,
              positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)))


def _one_step(cfg, mesh_shape):
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  mesh = None if mesh_shape is None else parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  model = state_lib.create_model(cfg, seed=0, mesh=mesh)
  graphdef, state = state_lib.create_state(model, tx)
  step = jax.jit(sft.make_step(graphdef, tx, bias_rate=0.01))
  batch = _batch()
  if mesh is not None:
    batch = jax.device_put(batch, parallel.batch_sharding(mesh, 2))
  new_state, metrics = step(state, batch)
  return state, new_state, metrics, step, batch


@pytest.fixture(scope="module")
def reference():
  return _one_step(MOE_MLA, None)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 2, 4)])
def test_sharded_step_matches_one_device(reference, mesh_shape):
  _, ref_state, ref_metrics, _, _ = reference
  _, new_state, metrics, _, _ = _one_step(MOE_MLA, mesh_shape)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # The non-gradient router bias moved the same way.
  for got, want in zip(jax.tree.leaves(new_state.other), jax.tree.leaves(ref_state.other)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-7)


def test_per_device_parameter_bytes_fall_as_mesh_grows():
  cfg = ModelConfig(n_experts=8, top_k=2, d_model=64, moe_d_ff=64, vocab_size=128)
  per_device = []
  for shape in [(8, 1, 1, 1), (4, 2, 1, 1), (1, 8, 1, 1), (1, 2, 4, 1)]:
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))
    model = state_lib.create_model(cfg, seed=0, mesh=mesh)
    _, params, _ = state_lib.split_model(model)
    compiled = jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p)).lower(params).compile()
    analysis = compiled.memory_analysis()
    per_device.append(analysis.argument_size_in_bytes)
    # Parameters are created sharded: no device holds a whole fsdp-sharded weight.
    shard = jax.tree.leaves(params)[0].addressable_shards[0].data
    assert shard.size * int(np.prod([mesh.shape[a] for a in ("fsdp",)])) >= shard.size
  assert per_device[0] > per_device[1] > per_device[2], per_device
  assert per_device[3] < per_device[0], per_device


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2, 1), (2, 1, 2, 2)])
def test_optimizer_moments_are_sharded_like_their_parameters(mesh_shape):
  """AdamW's m and v take no more room on a device than the parameters do, twice (they
  came out of create_state replicated: every device held all of both)."""
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  tx = optim.make_optimizer(config_lib.default_config().optim, 10)
  graphdef, state = state_lib.create_state(state_lib.create_model(MOE_MLA, seed=0, mesh=mesh), tx)
  params = state_lib.device_bytes(state.params)
  assert params < sum(x.nbytes for x in jax.tree.leaves(state.params)) / 2  # the mesh does split them
  assert state_lib.device_bytes(state.opt_state) <= 2 * params + 64  # + the step counts
  # The trainer's jitted steps keep these shardings (in_shardings = out_shardings).
  step = jax.jit(sft.make_step(graphdef, tx, bias_rate=0.01))
  new_state, _ = step(state, jax.device_put(_batch(), parallel.batch_sharding(mesh, 2)))
  for new, old in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(state.opt_state)):
    assert new.sharding.is_equivalent_to(old.sharding, new.ndim), (new.sharding, old.sharding)


def test_logical_rules_map_to_mesh_axes():
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
  assert parallel.logical_to_spec(("experts", "embed", "expert_mlp"), mesh=mesh) == \
      jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  # Sampling rules keep weights whole over fsdp.
  assert parallel.logical_to_spec(("embed", "mlp"), parallel.SAMPLING_RULES, mesh) == \
      jax.sharding.PartitionSpec(None, "tensor")
  # An axis is never used twice in one spec.
  assert parallel.logical_to_spec(("heads", "mlp"), mesh=mesh) == jax.sharding.PartitionSpec("tensor", None)


def test_mla_up_projections_are_split_over_fsdp():
  """wq_b / wkv_b [rank, heads, head_dim] shard their latent rank over fsdp (no device
  holds a whole one); wq_a / wkv_a [embed, rank] keep fsdp on embed; rollouts keep both
  whole over fsdp."""
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
  model = state_lib.create_model(MOE_MLA, seed=0, mesh=mesh)
  attn = model.layers[0].attn
  P = jax.sharding.PartitionSpec
  assert attn.wq_b[...].sharding.spec == P("fsdp", "tensor", None)
  assert attn.wkv_b[...].sharding.spec == P("fsdp", "tensor", None)
  assert attn.wq_a[...].sharding.spec == P("fsdp", None)
  assert attn.wkv_a[...].sharding.spec == P("fsdp", None)
  assert parallel.logical_to_spec(("q_lora", "heads", "head_dim"), parallel.SAMPLING_RULES, mesh) == \
      P(None, "tensor", None)


def test_mesh_shape_resolves_rest_and_rejects_misfits():
  assert parallel.mesh_shape(dict(data=-1, fsdp=2, expert=1, tensor=1), 8) == (4, 2, 1, 1)
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.mesh_shape(dict(data=2, fsdp=8, expert=1, tensor=1), 8)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.mesh_shape(dict(data=-1, fsdp=3, expert=1, tensor=1), 8)
