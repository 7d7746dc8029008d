"""Pallas kernels (interpret mode) against their pure-JAX references.

Compiling interpret-mode kernels dominates the time, so each test compiles one small
shape once and runs many group layouts through it (group sizes are data, not shapes).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.kernels import gmm as gmm_lib
from r1jax.kernels import routing
from r1jax.model.config import ModelConfig
from r1jax.model.moe import route, sort_by_expert
from r1jax.model.transformer import Transformer, token_logprobs

# M=40 rows in blocks of 8, D=24 and F=20 in blocks of 16 (so both are padded and
# k-tiled), E=5 groups.
M, D, F, E = 40, 24, 20, 5
BLOCKS = dict(block_m=8, block_k=16, block_f=16)
GROUP_LAYOUTS = {
    "uneven_not_block_aligned": [3, 11, 5, 13, 8],
    "empty_first_middle_last": [0, 17, 0, 23, 0],
    "trailing_rows_beyond_total": [2, 9, 0, 6, 4],
    "all_in_first": [M, 0, 0, 0, 0],
    "all_in_last": [0, 0, 0, 0, M],
    "block_aligned": [8, 16, 0, 8, 8],
    "all_empty": [0, 0, 0, 0, 0],
    "one_row_each": [1, 1, 1, 1, 1],
}


def _operands(seed=0):
  rng = np.random.default_rng(seed)
  lhs_md = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  rhs_edf = jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32)
  dout_mf = jnp.asarray(rng.normal(size=(M, F)), jnp.float32)
  return lhs_md, rhs_edf, dout_mf


@functools.cache
def _kernel_fns(strategy):
  gmm = functools.partial(gmm_lib.gmm, strategy=strategy, interpret=True, **BLOCKS)
  fwd = jax.jit(gmm)
  vjp = jax.jit(lambda lhs, rhs, gs, dout: jax.vjp(lambda a, b: gmm(a, b, gs), lhs, rhs)[1](dout))
  return fwd, vjp


_ref_fwd = jax.jit(gmm_lib.gmm_reference)
_ref_vjp = jax.jit(lambda lhs, rhs, gs, dout: jax.vjp(
    lambda a, b: gmm_lib.gmm_reference(a, b, gs), lhs, rhs)[1](dout))


def test_visit_schedule_covers_each_overlap_once():
  bm, n_tiles = 8, M // 8
  for sizes in GROUP_LAYOUTS.values():
    starts, ends = gmm_lib.group_bounds(jnp.asarray(sizes), M)
    tile_v, group_v, total = gmm_lib.visit_schedule(starts, ends, bm, n_tiles, n_tiles + E)
    got = list(zip(np.asarray(tile_v)[:int(total[0])].tolist(), np.asarray(group_v)[:int(total[0])].tolist()))
    want = [(t, g) for g in range(E) for t in range(n_tiles)
            if sizes[g] and int(starts[g]) < (t + 1) * bm and int(ends[g]) > t * bm]
    assert got == want, sizes


@pytest.mark.parametrize("strategy", gmm_lib.STRATEGIES)
def test_gmm_forward_matches_ragged_dot(strategy):
  lhs_md, rhs_edf, _ = _operands()
  fwd, _ = _kernel_fns(strategy)
  for name, sizes in GROUP_LAYOUTS.items():
    gs = jnp.asarray(sizes, jnp.int32)
    want = _ref_fwd(lhs_md, rhs_edf, gs)
    np.testing.assert_allclose(gmm_lib.gmm_dense_reference(lhs_md, rhs_edf, gs), want, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(fwd(lhs_md, rhs_edf, gs), want, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("strategy", gmm_lib.STRATEGIES)
def test_gmm_grads_match_ragged_dot(strategy):
  lhs_md, rhs_edf, dout_mf = _operands(1)
  _, vjp = _kernel_fns(strategy)
  for name, sizes in GROUP_LAYOUTS.items():
    gs = jnp.asarray(sizes, jnp.int32)
    d_lhs, d_rhs = vjp(lhs_md, rhs_edf, gs, dout_mf)
    want_lhs, want_rhs = _ref_vjp(lhs_md, rhs_edf, gs, dout_mf)
    np.testing.assert_allclose(d_lhs, want_lhs, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(d_rhs, want_rhs, atol=1e-5, rtol=1e-5, err_msg=name)


def test_gmm_bf16_inputs_accumulate_in_fp32():
  lhs_md, rhs_edf, _ = _operands(2)
  lhs_md, rhs_edf = lhs_md.astype(jnp.bfloat16), rhs_edf.astype(jnp.bfloat16)
  gs = jnp.asarray(GROUP_LAYOUTS["uneven_not_block_aligned"], jnp.int32)
  out = jax.jit(functools.partial(gmm_lib.gmm, interpret=True, **BLOCKS))(lhs_md, rhs_edf, gs)
  assert out.dtype == jnp.bfloat16
  want = gmm_lib.gmm_reference(lhs_md.astype(jnp.float32), rhs_edf.astype(jnp.float32), gs)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=0.1, rtol=2e-2)


ROUTER_CASES = {
    "sigmoid_bias_groups": dict(top_k=4, router="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                                routed_scaling_factor=2.5),
    "softmax": dict(top_k=2, router="softmax", n_group=1, topk_group=1, norm_topk_prob=False,
                    routed_scaling_factor=1.0),
    "softmax_normalised_groups": dict(top_k=3, router="softmax", n_group=2, topk_group=1, norm_topk_prob=True,
                                      routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_route_pallas_matches_route(case):
  kw = ROUTER_CASES[case]
  rng = np.random.default_rng(3)
  n, e = 37, 12 if kw["n_group"] == 2 else 16  # 37 tokens: a padded last block; 12: padded experts
  logits_ne = jnp.asarray(2 * rng.normal(size=(n, e)), jnp.float32)
  bias_e = jnp.asarray(0.3 * rng.normal(size=(e,)), jnp.float32)
  loss = lambda fn: lambda l: (fn(l, bias_e, **kw)[0] * jnp.arange(1.0, kw["top_k"] + 1)).sum()
  weights, experts = jax.jit(functools.partial(routing.route_pallas, interpret=True, block_n=16, **kw))(
      logits_ne, bias_e)
  want_weights, want_experts = route(logits_ne, bias_e, **kw)
  np.testing.assert_array_equal(experts, want_experts)
  np.testing.assert_allclose(weights, want_weights, atol=1e-6, rtol=1e-6)
  grad = jax.jit(jax.grad(loss(functools.partial(routing.route_pallas, interpret=True))))(logits_ne)
  np.testing.assert_allclose(grad, jax.grad(loss(route))(logits_ne), atol=1e-6)


def test_sort_by_expert_pallas_matches_reference():
  # 21 tokens: a padded last block; ids 0..4 of 6 experts, so expert 5 is empty.
  experts_nk = jnp.asarray(np.random.default_rng(4).choice(5, size=(21, 3)), jnp.int32)
  sort = jax.jit(functools.partial(routing.sort_by_expert_pallas, n_experts=6, interpret=True, block_n=16))
  order, sizes = sort(experts_nk)
  want_order, want_sizes = sort_by_expert(experts_nk, 6)
  np.testing.assert_array_equal(order, want_order)
  np.testing.assert_array_equal(sizes, want_sizes)
  assert int(sizes[5]) == 0


def _tiny_moe_model(impl):
  cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32,
                    n_experts=4, top_k=2, moe_d_ff=16, n_shared_experts=1, moe_impl=impl, init_std=0.2)
  return Transformer(cfg, nnx.Rngs(0))


def test_moe_transformer_pallas_matches_ragged_and_dense():
  tokens_bt = jnp.asarray(np.random.default_rng(5).integers(0, 32, size=(2, 9)), jnp.int32)
  # One set of weights (initialised under jit: eager init compiles op by op), three
  # graphdefs that differ only in moe_impl.
  params, rest = jax.jit(lambda: nnx.split(_tiny_moe_model("ragged"), nnx.Param, ...)[1:])()
  results = {}
  for impl in ("pallas", "ragged", "dense"):
    graphdef = nnx.split(nnx.eval_shape(lambda impl=impl: _tiny_moe_model(impl)), nnx.Param, ...)[0]

    def loss(params, graphdef=graphdef):
      logits_btv, _ = nnx.merge(graphdef, params, rest)(tokens_bt)
      return -token_logprobs(logits_btv[:, :-1], tokens_bt[:, 1:]).mean(), logits_btv

    (_, logits_btv), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results[impl] = (logits_btv, grads)
  logits_btv, grads = results["pallas"]
  for impl in ("ragged", "dense"):
    want_logits, want_grads = results[impl]
    np.testing.assert_allclose(logits_btv, want_logits, atol=1e-5, err_msg=impl)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=impl), grads, want_grads)
