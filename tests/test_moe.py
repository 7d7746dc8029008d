"""MoE: expert parallelism (shard_map + all_to_all) == the one-device dense reference;
capacity drops; load statistics; bias balancing; group-limited routing; balance loss."""

import dataclasses
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import parallel, sft
from r1jax import state as state_lib
from r1jax.model import expert_parallel, moe
from r1jax.model.config import ModelConfig

MOE = ModelConfig(d_model=16, n_experts=8, top_k=2, moe_d_ff=8, init_std=0.3)
ACT = jax.nn.silu


def _mesh(shape):
  return parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))


def _moe(cfg, mesh=None, seed=0):
  """An MoE layer (sharded like the model's when a mesh is given) with a random bias."""
  make = lambda: moe.MoE(cfg, nnx.Rngs(seed))
  layer = make() if mesh is None else parallel.create_sharded_model(make, mesh)
  layer.bias[...] = 0.05 * jax.random.normal(jax.random.key(seed + 7), (cfg.n_experts,))
  return layer


def _inputs(cfg, b=8, t=4, seed=1):
  x = jax.random.normal(jax.random.key(seed), (b, t, cfg.d_model))
  return x, jax.random.normal(jax.random.key(seed + 1), x.shape)


def _reference(cfg, layer, x_btd, ct_btd, forced_nk=None, keep_nk=None):
  """One device, no mesh: `route` + `dispatch_dense`, with the slots where keep_nk is
  False zeroed. Returns (y_btd, experts_nk, grads of sum(y * ct) wrt the four weights
  (router, w_gate, w_up, w_down) and x)."""
  kw = dict(top_k=cfg.top_k, router=cfg.router, n_group=cfg.n_group, topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)

  def forward(params, x_btd):
    router, w_gate, w_up, w_down, bias = params
    x_nd = x_btd.reshape(-1, x_btd.shape[-1])
    weights_nk, experts_nk = moe.route(x_nd @ router, bias, forced_experts_nk=forced_nk, **kw)
    if keep_nk is not None:
      weights_nk = weights_nk * keep_nk
    y_nd = moe.dispatch_dense(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, ACT)
    return (y_nd.reshape(x_btd.shape) * ct_btd).sum(), (y_nd.reshape(x_btd.shape), experts_nk)

  params = tuple(jnp.asarray(np.asarray(w[...]))
                 for w in (layer.router, layer.w_gate, layer.w_up, layer.w_down, layer.bias))
  run = jax.jit(jax.value_and_grad(forward, (0, 1), has_aux=True))
  (_, (y_btd, experts_nk)), (g_params, g_x) = run(params, x_btd)
  return y_btd, experts_nk, g_params[:4] + (g_x,)


def _ep_value_and_grad(layer, mesh, x_btd, ct_btd, forced_btk=None):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x_btd):
    y_btd, aux = nnx.merge(graphdef, params, rest).forward(x_btd, forced_btk)
    return (y_btd * ct_btd).sum(), (y_btd, aux)

  x_btd = jax.device_put(x_btd, parallel.batch_sharding(mesh, 3))
  with jax.set_mesh(mesh):
    (_, (y_btd, aux)), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x_btd)
  grads = tuple(g_params[name][...] for name in ("router", "w_gate", "w_up", "w_down"))
  return y_btd, aux, grads + (g_x,)


def _close(got, want, what):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=what)


# --- EP == one-device dense reference -----------------------------------------------


@pytest.mark.parametrize("mesh_shape,impl", [
    ((1, 1, 8, 1), "ragged"), ((1, 2, 2, 2), "ragged"), ((2, 1, 4, 1), "blocked"),
    ((1, 2, 2, 2), "pallas"),
    ((4, 2, 1, 1), "blocked")])  # expert = 1: data-parallel, each device dispatches its own tokens
def test_expert_parallel_matches_dense_reference(mesh_shape, impl):
  cfg = dataclasses.replace(MOE, moe_impl=impl)
  mesh = _mesh(mesh_shape)
  layer = _moe(cfg, mesh)
  x, ct = _inputs(cfg)
  want_y, want_experts, want_grads = _reference(cfg, layer, x, ct)
  y, aux, grads = _ep_value_and_grad(layer, mesh, x, ct)
  _close(y, want_y, "output")
  np.testing.assert_array_equal(aux["experts"].reshape(-1, cfg.top_k), want_experts)
  for got, want, name in zip(grads, want_grads, ("router", "w_gate", "w_up", "w_down", "x")):
    _close(got, want, f"grad {name}")
  # Load statistics: the slots each expert received == a bincount of the routing.
  np.testing.assert_array_equal(aux["load"], np.bincount(np.asarray(want_experts).ravel(), minlength=8))
  assert int(aux["dropped"]) == 0


def test_expert_parallel_exchanges_tokens_not_weights():
  mesh = _mesh((1, 1, 8, 1))
  layer = _moe(MOE, mesh)
  graphdef, state = nnx.split(layer)
  x = jax.device_put(_inputs(MOE)[0], parallel.batch_sharding(mesh, 3))
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  with jax.set_mesh(mesh):
    hlo = fn.lower(state, x).compile().as_text()
  assert "all-to-all" in hlo
  assert "all-gather" not in hlo and "all-reduce" not in hlo  # experts stay put, tokens move
  # No mesh in context: plain auto-partitioning, no shard_map.
  assert "all-to-all" not in fn.lower(state, x).compile().as_text()


# --- Capacity: drops ----------------------------------------------------------------


def _keep_by_token_order(experts_nk, n_local, e_local, cap):
  """Each source shard (n_local consecutive tokens) keeps, per destination device, its
  first `cap` slots in slot order i*k + j: the documented drop priority."""
  keep = np.zeros(experts_nk.shape, bool)
  for start in range(0, experts_nk.shape[0], n_local):
    sent = {}
    for i in range(start, start + n_local):
      for j, e in enumerate(experts_nk[i]):
        dest = int(e) // e_local
        keep[i, j] = sent.get(dest, 0) < cap
        sent[dest] = sent.get(dest, 0) + 1
  return keep


@pytest.mark.parametrize("mesh_shape,capacity_factor,want_cap", [((1, 1, 8, 1), 0.5, 1), ((2, 1, 4, 1), 1.0, 2)])
def test_capacity_drops_exactly_the_late_slots(mesh_shape, capacity_factor, want_cap):
  cfg = dataclasses.replace(MOE, capacity_factor=capacity_factor)
  mesh = _mesh(mesh_shape)
  ep, n = mesh.shape["expert"], 32
  n_local, e_local = n // 8, cfg.n_experts // ep  # all 8 devices split the batch
  cap = expert_parallel.capacity(n_local, cfg.top_k, e_local, ep, capacity_factor)
  assert cap == want_cap == math.ceil(capacity_factor * n_local * cfg.top_k / ep)
  layer = _moe(cfg, mesh, seed=3)
  x, ct = _inputs(cfg, seed=3)
  experts = np.asarray(_reference(cfg, layer, x, ct)[1])
  keep = _keep_by_token_order(experts, n_local, e_local, cap)
  assert 0 < (~keep).sum() < keep.size // 2
  want_y, _, want_grads = _reference(cfg, layer, x, ct, keep_nk=jnp.asarray(keep))

  y, aux, grads = _ep_value_and_grad(layer, mesh, x, ct)
  _close(y, want_y, "output with drops")
  assert int(aux["dropped"]) == (~keep).sum()
  np.testing.assert_array_equal(aux["load"], np.bincount(experts[keep], minlength=cfg.n_experts))
  # A dropped slot adds nothing and gets no gradient: its expert sees only kept tokens.
  for got, want in zip(grads, want_grads):
    _close(got, want, "grads with drops")


def test_dropless_capacity_is_the_worst_case():
  # Every local slot to one device; a token picks an expert once, so <= min(k, E_loc).
  assert expert_parallel.capacity(16, 8, 4, 8, 0.0) == 16 * 4
  assert expert_parallel.capacity(16, 2, 4, 8, 0.0) == 16 * 2
  assert expert_parallel.capacity(16, 2, 4, 8, 100.0) == 16 * 2  # never above drop-less


def test_bucket_slots_keeps_token_order_and_skips_padding():
  dest_s = jnp.asarray([1, 0, 1, 2, 1, 1, 0], jnp.int32)  # 2 = padding (not sent)
  slot_pc, filled_pc, rank_s, kept_s, dropped = jax.jit(expert_parallel.bucket_slots, static_argnums=(1, 2))(
      dest_s, 2, 2)
  np.testing.assert_array_equal(slot_pc[filled_pc], [1, 6, 0, 2])
  np.testing.assert_array_equal(rank_s[:3], [0, 0, 1])
  np.testing.assert_array_equal(kept_s, [True, True, True, False, False, False, True])
  assert int(dropped) == 2


# --- Mesh discovery, padding, replay ----------------------------------------------------


def test_expert_mesh_comes_from_the_context_or_the_module():
  assert expert_parallel.expert_mesh() is None
  with jax.set_mesh(_mesh((8, 1, 1, 1))):  # data-parallel: per-device dispatch, no exchange
    assert expert_parallel.expert_mesh().shape["data"] == 8
  with jax.set_mesh(_mesh((1, 1, 1, 8))):  # tokens not split: XLA partitions the layer
    assert expert_parallel.expert_mesh() is None
  mesh = _mesh((2, 1, 4, 1))
  with jax.set_mesh(mesh):
    assert expert_parallel.expert_mesh().shape["expert"] == 4
  assert expert_parallel.expert_mesh(mesh) is mesh
  # An explicit mesh at construction runs EP without any context.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: moe.MoE(MOE, nnx.Rngs(0), mesh=mesh)))
  x = jax.ShapeDtypeStruct((8, 4, MOE.d_model), jnp.float32)
  assert "all_to_all" in jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x).as_text()


def test_padded_tokens_and_routing_replay_under_ep():
  mesh = _mesh((1, 1, 8, 1))
  layer = _moe(MOE, mesh)
  x, ct = _inputs(MOE, b=3, t=5)  # 15 tokens on 8 shards: padded, never sent
  forced = jax.random.randint(jax.random.key(5), (15, 2), 0, 8)
  forced = jnp.where(forced[:, :1] == forced[:, 1:], jnp.stack([forced[:, 0], (forced[:, 0] + 1) % 8], 1), forced)
  want_y, want_experts, _ = _reference(MOE, layer, x, ct, forced_nk=forced)
  graphdef, state = nnx.split(layer)
  with jax.set_mesh(mesh):
    y, aux = jax.jit(lambda s, x, f: nnx.merge(graphdef, s).forward(x, f))(state, x, forced.reshape(3, 5, 2))
  _close(y, want_y, "padded + replayed")
  np.testing.assert_array_equal(aux["experts"].reshape(-1, 2), forced)
  assert int(aux["load"].sum()) == 30 and int(aux["dropped"]) == 0


# --- Group-limited routing under EP -------------------------------------------------------


def test_group_limited_routing_holds_under_ep():
  # 4 groups of 2 experts, one group per device: node-limited routing (DeepSeek-V3
  # sec. 2.1.2) sends each token to at most topk_group = 2 devices. moe_impl='pallas'
  # runs the Pallas routing kernel (and grouped matmul) on each device.
  cfg = dataclasses.replace(MOE, top_k=3, n_group=4, topk_group=2, moe_impl="pallas")
  mesh = _mesh((1, 1, 4, 2))
  layer = _moe(cfg, mesh)
  x, ct = _inputs(cfg)
  want_y, want_experts, _ = _reference(cfg, layer, x, ct)
  graphdef, state = nnx.split(layer)
  with jax.set_mesh(mesh):
    y, aux = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, x)
  experts = np.asarray(aux["experts"]).reshape(-1, 3)
  np.testing.assert_array_equal(experts, want_experts)
  devices_per_token = [len(set(row // 2)) for row in experts]
  assert max(devices_per_token) <= 2 and min(devices_per_token) >= 2  # k=3 needs 2 groups
  _close(y, want_y, "group-limited output")


# --- Balancing ------------------------------------------------------------------------------


def _skewed_transformer(mesh):
  """One MoE layer whose router favours expert 0: every token shares a direction u and
  the router's column 0 points along it."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                    d_ff=32, n_experts=8, top_k=2, moe_d_ff=16)
  model = state_lib.create_model(cfg, seed=0, mesh=mesh)
  u_d = jnp.ones((cfg.d_model,)) / math.sqrt(cfg.d_model)
  model.embed[...] = model.embed[...] + 0.1 * u_d
  router = model.layers[0].ffn.router
  router[...] = (0.3 * jax.random.normal(jax.random.key(3), router.shape)).at[:, 0].add(u_d)
  return model


def test_bias_update_evens_out_a_skewed_router_under_ep():
  mesh = _mesh((1, 1, 8, 1))
  graphdef, params, other0 = state_lib.split_model(_skewed_transformer(mesh))
  tokens = jax.device_put(jax.random.randint(jax.random.key(0), (8, 16), 0, 64), parallel.batch_sharding(mesh, 2))
  mask = jnp.ones(tokens.shape, bool)

  @functools.partial(jax.jit, static_argnums=0)
  def step(rate, other):
    experts = state_lib.merge(graphdef, params, other)(tokens)[1]["experts"]
    other, metrics = state_lib.update_router_bias(graphdef, params, other, experts, mask, rate)
    return other, metrics["expert_max_over_mean"], jnp.bincount(experts.reshape(-1), length=8)

  def run(rate, steps):
    other, ratios = other0, []
    with jax.set_mesh(mesh):
      for _ in range(steps):
        other, ratio, load_e = step(rate, other)
        # update_router_bias's statistic is max/mean of a bincount of the EP routing.
        np.testing.assert_allclose(ratio, load_e.max() / load_e.mean(), rtol=1e-6)
        ratios.append(float(ratio))
    return ratios

  ratios = run(0.02, 20)
  assert ratios[0] > 3.0, ratios  # expert 0 takes nearly every token (max/mean <= E/k = 4)
  # The sign update (eq. 16) ends in a small limit cycle around the mean.
  assert max(ratios[-4:]) < 1.35, ratios
  frozen = run(0.0, 3)  # gamma = 0 (the RL default): the skew stays
  assert min(frozen) > 3.0 and len(set(frozen)) == 1, frozen


def _np_balance_loss(logits_bte, experts_btk, mask_bt, alpha):
  """DeepSeek-V3 eqs. 17-20 written out term by term."""
  b, t, e = logits_bte.shape
  k = experts_btk.shape[-1]
  s = 1 / (1 + np.exp(-logits_bte))
  total = []
  for row in range(b):
    real = mask_bt[row] > 0
    n_tok = real.sum()
    f = np.array([e / (k * n_tok) * sum(i in experts_btk[row, tt] for tt in range(t) if real[tt])
                  for i in range(e)])
    s_norm = s[row][real] / s[row][real].sum(-1, keepdims=True)
    total.append(alpha * (f * s_norm.mean(0)).sum())
  return np.mean(total)


def test_sequence_balance_loss_matches_the_paper_and_ep():
  cfg = dataclasses.replace(MOE, seq_balance_alpha=0.01)
  x, ct = _inputs(cfg)
  mask = np.ones((8, 4), np.float32)
  mask[1, 2:] = 0
  layer = _moe(cfg)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  _, aux = jax.jit(lambda p, x, m: nnx.merge(graphdef, p, rest).forward(x, mask_bt=m))(params, x, jnp.asarray(mask))
  logits = np.asarray(x.reshape(-1, 16) @ layer.router[...]).reshape(8, 4, 8)
  np.testing.assert_allclose(aux["balance_loss"], _np_balance_loss(logits, np.asarray(aux["experts"]), mask, 0.01),
                             rtol=1e-5)
  # Its gradient reaches the router, and EP computes the same value and gradient.
  loss = lambda p, x: nnx.merge(graphdef, p, rest).forward(x)[1]["balance_loss"]
  want, want_g = jax.jit(jax.value_and_grad(loss))(params, x)
  assert float(jnp.abs(want_g["router"][...]).max()) > 0
  mesh = _mesh((2, 1, 4, 1))
  with jax.set_mesh(mesh):
    got, got_g = jax.jit(jax.value_and_grad(loss))(params, x)
  _close(got, want, "balance loss under EP")
  _close(got_g["router"][...], want_g["router"][...], "balance loss router grad under EP")
  off = nnx.merge(nnx.split(_moe(MOE))[0], nnx.split(layer)[1])  # the same weights, alpha = 0
  assert float(jax.jit(lambda x: off.forward(x)[1]["balance_loss"])(x)) == 0.0


# --- The blocked grouped FFN ------------------------------------------------------------


def test_blocked_ffn_matches_ragged_dot_with_empty_groups():
  m, d, f = 23, 8, 4
  sizes = jnp.asarray([5, 0, 9, 1, 0, 3], jnp.int32)  # 18 rows in groups, 5 past the end
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (m, d))
  ws = (0.3 * jax.random.normal(keys[1], (6, d, f)), 0.3 * jax.random.normal(keys[2], (6, d, f)),
        0.3 * jax.random.normal(keys[3], (6, f, d)))
  for b in (1, 7):
    _, valid_p, _, dst_r = jax.jit(moe.block_layout, static_argnums=(1, 2))(sizes, m, b)
    assert int(valid_p.sum()) == 18 and int((dst_r >= 0).sum()) == 18

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(impl, x, *ws):
    run = lambda *a: moe.grouped_ffn(a[0], sizes, *a[1:], ACT, impl)
    return run(x, *ws), jax.grad(lambda *a: (run(*a) ** 2).sum(), range(4))(x, *ws)

  want, want_g = value_and_grads("ragged", x, *ws)
  assert float(jnp.abs(want[18:]).max()) == 0.0
  for impl in ("blocked", "dense"):
    got, got_g = value_and_grads(impl, x, *ws)
    _close(got, want, f"{impl} forward")
    for g, w in zip(got_g, want_g):
      _close(g, w, f"{impl} grads")


# --- A whole training step under EP ---------------------------------------------------------


def test_sft_step_under_expert_parallel_matches_auto_partitioning():
  # tests/test_parallel.py checks the auto-partitioned step against one device; this
  # checks the expert-parallel step (mesh in context) against the auto-partitioned one.
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=32,
                    n_experts=8, top_k=2, moe_d_ff=16, n_shared_experts=1)
  tx = optax.sgd(0.1)  # plain SGD: the updated params show the gradients themselves
  mesh = _mesh((1, 2, 4, 1))
  graphdef, state = state_lib.create_state(state_lib.create_model(cfg, 0, mesh), tx)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (8, 12)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[1, 9:] = 0
  batch = dict(tokens=tokens, loss_mask=np.ones_like(tokens), segment_ids=seg,
               positions=np.tile(np.arange(12, dtype=np.int32), (8, 1)))
  batch = jax.device_put(batch, parallel.batch_sharding(mesh, 2))
  step = jax.jit(sft.make_step(graphdef, tx, bias_rate=0.01))
  want_state, want_m = step(state, batch)
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  assert "all-to-all" in compiled.as_text()
  got_state, got_m = compiled(state, batch)
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_state.params) + jax.tree.leaves(got_state.other),
                       jax.tree.leaves(want_state.params) + jax.tree.leaves(want_state.other)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# --- Accelerator-only: ragged all-to-all ------------------------------------------------------


def test_ragged_all_to_all_option_traces_with_gradients():
  # XLA:CPU cannot compile ragged-all-to-all, but the program (forward and backward,
  # with JAX's transpose of the ragged exchange) must lower for the accelerators.
  cfg = dataclasses.replace(MOE, ep_all_to_all="ragged")
  mesh = _mesh((1, 1, 8, 1))
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: moe.MoE(cfg, nnx.Rngs(0))), nnx.Param, ...)
  loss = lambda p, r, x: nnx.merge(graphdef, p, r)(x)[0].sum()
  x = jax.ShapeDtypeStruct((8, 4, cfg.d_model), jnp.float32)
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss)).lower(params, rest, x).as_text()
  assert text.count("ragged_all_to_all") >= 4  # tokens, expert ids, results; and the transposes


@pytest.mark.skipif(jax.default_backend() == "cpu" or jax.device_count() < 2,
                    reason="XLA:CPU does not implement ragged-all-to-all; needs >= 2 accelerators")
def test_ragged_all_to_all_matches_tiled():
  ep = 2 ** int(math.log2(min(jax.device_count(), 8)))  # divides E = 8 and the batch of 8
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=ep, tensor=1), jax.devices()[:ep])
  results = []
  for mode in ("tiled", "ragged"):
    cfg = dataclasses.replace(MOE, ep_all_to_all=mode)
    layer = _moe(cfg, mesh)
    x, ct = _inputs(cfg)
    results.append(_ep_value_and_grad(layer, mesh, x, ct))
  _close(results[1][0], results[0][0], "ragged a2a output")
  for got, want in zip(results[1][2], results[0][2]):
    _close(got, want, "ragged a2a grads")


def test_auto_moe_impl_picks_per_backend(monkeypatch):
  from r1jax.model import config as config_lib  # pylint: disable=import-outside-toplevel
  assert config_lib.ModelConfig().moe_impl == "auto"
  assert config_lib.resolve_moe_impl("ragged") == "ragged"  # an explicit choice is kept
  for backend, want in (("cpu", "blocked"), ("gpu", "pallas"), ("tpu", "ragged")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert config_lib.resolve_moe_impl("auto") == want


def test_balance_loss_enters_the_training_loss_and_skips_padding():
  from r1jax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  base = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=16,
                     n_experts=8, top_k=2, moe_d_ff=8, init_std=0.3)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 32, size=(2, 6)), jnp.int32)
  seg = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  batch = dict(tokens=tokens, segment_ids=seg, loss_mask=seg,
               positions=jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6)))
  params = nnx.split(Transformer(base, nnx.Rngs(0)), nnx.Param, ...)[1:]

  def run(alpha, batch):
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(dataclasses.replace(base, seq_balance_alpha=alpha),
                                                            nnx.Rngs(0))), nnx.Param, ...)[0]
    loss_fn = lambda p: sft.lm_loss(nnx.merge(graphdef, p, params[1]), batch)[0]
    model = nnx.merge(graphdef, *params)
    aux = model(batch["tokens"], batch["positions"], batch["segment_ids"])[1]
    return jax.value_and_grad(loss_fn)(params[0]), aux.get("balance_loss")

  (loss0, grads0), none = run(0.0, batch)
  (loss1, grads1), bal1 = run(0.01, batch)
  (_, _), bal2 = run(0.02, batch)
  assert none is None and float(bal1) > 0
  np.testing.assert_allclose(float(bal2), 2 * float(bal1), rtol=1e-6)  # linear in alpha
  np.testing.assert_allclose(float(loss1 - loss0), float(bal1), rtol=1e-5)  # added to the loss
  router = lambda g: g["layers"][0]["ffn"]["router"][...]
  assert float(jnp.abs(router(grads1) - router(grads0)).max()) > 0  # and trains the router
  # Padding is left out: changing a padded token changes nothing.
  padded = dict(batch, tokens=batch["tokens"].at[0, 5].set((batch["tokens"][0, 5] + 1) % 32))
  np.testing.assert_allclose(float(run(0.01, padded)[1]), float(bal1), rtol=1e-6)


def test_tracing_moe_imports_nothing_that_changes_the_jit_cache_key():
  """Importing a Pallas module can define a config that is part of the jit cache key
  (jax 0.11: pallas.tpu -> fuser adds one). If the model imported its kernels while
  tracing, the first jitted call would run under a different key than the second, and
  the second would compile everything again: on an H200 that re-compiled the MoE
  sampler on its second rollout (+29 s). So the kernels load with r1jax.model."""
  code = (
      "from jax._src import config\n"
      "import r1jax.model.transformer, r1jax.sampling.sampler\n"
      "n = len(config.trace_context())\n"
      "import r1jax.kernels.gmm, r1jax.kernels.routing, r1jax.model.expert_parallel\n"
      "print(n, len(config.trace_context()))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  assert out[0] == out[1], f"trace context grew from {out[0]} to {out[1]} values"
