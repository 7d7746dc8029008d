"""layers.project: the model's weight matmuls, with a hand-written backward pass.

Its value and both gradients must be the einsum's (autodiff of jnp.einsum is the
independent reference), for one and two contracted axes, under jit, in fp32 and with
bf16 operands over fp32 master weights (the gradient dtypes of the cast chain).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model.layers import project

CASES = [((2, 3, 8), (8, 4, 6), 1, "btd,dhk->bthk"),
         ((2, 3, 4, 6), (4, 6, 8), 2, "bthk,hkd->btd"),
         ((5, 8), (8, 7), 1, "nd,df->nf")]


@pytest.mark.parametrize("x_shape,w_shape,n_in,spec", CASES, ids=[c[3] for c in CASES])
def test_project_value_and_gradients_equal_einsum(x_shape, w_shape, n_in, spec):
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  r = jax.random.normal(kr, jnp.einsum(spec, x, w).shape)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * r), argnums=(0, 1)))

  got_v, (got_dx, got_dw) = loss(lambda x, w: project(x, w, n_in))(x, w)
  want_v, (want_dx, want_dw) = loss(lambda x, w: jnp.einsum(spec, x, w))(x, w)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-6)
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-6)


def test_project_bf16_operands_give_gradients_in_each_inputs_dtype():
  x = jax.random.normal(jax.random.key(1), (3, 4, 8), jnp.bfloat16)
  w32 = jax.random.normal(jax.random.key(2), (8, 5))

  def f(x, w32, fn):
    return jnp.sum(fn(x, w32.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

  dx, dw = jax.grad(f, argnums=(0, 1))(x, w32, project)
  want_dx, want_dw = jax.grad(f, argnums=(0, 1))(x, w32, lambda x, w: jnp.einsum("btd,df->btf", x, w))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(dw, want_dw, rtol=2e-2, atol=2e-2)


def test_project_fp32_product_of_bf16_operands_equals_einsum_with_preferred_type():
  """The head's form: bf16 hidden states and weights, fp32 logits. Value and gradients
  must be the einsum's with preferred_element_type=fp32 (the fp32 cotangent reaches dw
  uncast, so dw is as close as autodiff's, not bf16-rounded)."""
  x = jax.random.normal(jax.random.key(3), (2, 5, 16), jnp.bfloat16)
  w32 = jax.random.normal(jax.random.key(4), (16, 24))
  r = jax.random.normal(jax.random.key(5), (2, 5, 24))

  def f(x, w32, fn):
    y = fn(x, w32.astype(jnp.bfloat16))
    assert y.dtype == jnp.float32
    return jnp.sum(jax.nn.log_softmax(y) * r)

  got = jax.jit(jax.value_and_grad(lambda x, w: f(x, w, lambda a, b: project(a, b, out_dtype=jnp.float32)),
                                   argnums=(0, 1)))(x, w32)
  want = jax.jit(jax.value_and_grad(lambda x, w: f(x, w, lambda a, b: jnp.einsum(
      "btd,dv->btv", a, b, preferred_element_type=jnp.float32)), argnums=(0, 1)))(x, w32)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got[1][0], np.float32), np.asarray(want[1][0], np.float32),
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(got[1][1], want[1][1], rtol=1e-5, atol=1e-5)
