"""Basic layers: parameters with logical axis names, RMSNorm, rotary embeddings, SwiGLU MLP.

Every parameter carries `axes`, a tuple of logical axis names (one per dimension), which
`r1jax.parallel` maps onto mesh axes; the model itself never names a mesh axis.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.model.config import ModelConfig


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def param(rngs: nnx.Rngs, shape, axes, std: float | None, dtype=jnp.float32) -> nnx.Param:
  """A parameter initialised N(0, std) (std None: ones), tagged with logical axes."""
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * w, computed in fp32 as the reference implementations do."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, axis_name: str | None = "norm"):
    self.eps = eps
    self.scale = param(rngs, (dim,), (axis_name,), None)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * x32.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


# --- Projections ---------------------------------------------------------------------


def project(x, w, n_in: int = 1, out_dtype=None):
  """x [..., *in] contracted with w [*in, *out] -> [..., *out], its last n_in axes with
  w's first n_in: every weight matmul of the model ("btd,dhk->bthk" is n_in=1,
  "bthk,hkd->btd" is n_in=2). out_dtype: the product's dtype when it is not x's (the
  head's fp32 logits from bf16 weights: accumulated and returned in fp32).

  The value is the einsum's. What differs is the backward pass (`_project_bwd`): the
  weight gradient is written as x^T @ dy over flattened rows. Left to autodiff, XLA:CPU
  computes it as (dy^T x)^T and writes dy transposed inside the fusion that produces it
  (for the MLP that is the SwiGLU backward, [N, F] written column by column): that one
  fusion took 16% of a GRPO update on CPU, and a SwiGLU MLP's forward + backward ran at
  49% of the matmul ceiling where this form runs at 82% (bench/NOTES.md).
  """
  return _project(x, w, n_in, None if out_dtype is None else jnp.dtype(out_dtype))


def _contract(x, w, n_in, out_dtype):
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
                             preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x, w, n_in, out_dtype):
  return _contract(x, w, n_in, out_dtype)


def _project_fwd(x, w, n_in, out_dtype):
  return _contract(x, w, n_in, out_dtype), (_rows_last(x.reshape(-1, math.prod(w.shape[:n_in]))), w)


def _rows_last(x_nd):
  """x^T [D, N], kept for the weight gradient x^T . dy.

  On CPU the transpose is made real, here in the forward pass while x is still in cache.
  Left to itself XLA folds it into the dot (the barrier stops that), and a dot that
  contracts its left operand's leading (row) axis runs on Eigen at ~330 GFLOP/s where
  YNNPACK runs the same product from x^T at ~440 (a [2048, 256]^T x [2048, 512] product
  on the AVX-512 machine); with this the dense GRPO update took 3.5% less time
  (bench/NOTES.md, session 14). Other backends read transposed operands natively, so
  there the transpose stays foldable."""
  x_dn = x_nd.T
  return jax.lax.optimization_barrier(x_dn) if jax.default_backend() == "cpu" else x_dn


def _project_bwd(n_in, out_dtype, res, dy):
  x_dn, w = res
  n_out = w.ndim - n_in
  # dx = dy . w^T over the output axes; dw = x^T . dy over every row.
  dx = jax.lax.dot_general(dy, w, ((tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(n_in, w.ndim))),
                                   ((), ())))
  dy_2d = dy.reshape(-1, math.prod(w.shape[n_in:]))
  # An fp32 product (out_dtype) keeps its fp32 cotangent for dw, as autodiff of the
  # einsum with preferred_element_type would.
  dw = (x_dn @ (dy_2d if out_dtype is not None else dy_2d.astype(x_dn.dtype))).reshape(w.shape)
  return dx.astype(x_dn.dtype), dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)


# --- Rotary position embeddings ------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [Dr/2] and the cos/sin multiplier for the configured RoPE kind.

  default: theta^(-2i/d) (RoFormer). llama3: low frequencies divided by `factor`, a
  smooth ramp between (Llama 3 report). yarn: NTK-by-parts interpolation with the
  attention temperature folded into cos/sin (YaRN paper, eqs. 19-23; DeepSeek-V3 sec. 4.3).
  """
  dim = cfg.rope_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_type == "default":
    return inv.astype(np.float32), 1.0
  if cfg.rope_type == "llama3":
    old = cfg.rope_original_max_len
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  # yarn
  factor, base = cfg.rope_factor, cfg.rope_theta
  def correction_dim(rotations):
    return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
  low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
  inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
  attention_factor = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(factor, cfg.yarn_mscale_all_dim) \
      if cfg.yarn_mscale and cfg.yarn_mscale_all_dim else yarn_mscale(factor, 1.0)
  return inv.astype(np.float32), float(attention_factor)


def yarn_mscale(scale: float, mscale: float) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
  """1/sqrt(d_qk), times mscale^2 under YaRN with mscale_all_dim (DeepSeek-V3's MLA)."""
  d = cfg.qk_head_dim if cfg.attention == "mla" else cfg.head_dim
  scale = d ** -0.5
  if cfg.rope_type == "yarn" and cfg.yarn_mscale_all_dim:
    m = yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim)
    scale *= m * m
  return scale


def apply_rope(x, positions, inv_freq, attention_factor: float, interleaved: bool):
  """Rotates x [..., T, H, Dr] by positions [..., T] (rotate-half layout).

  An interleaved checkpoint (DeepSeek) rotates pairs (x0,x1),(x2,x3)...; we de-interleave
  first, which gives the same q.k products as rotating the pairs in place.
  """
  if interleaved:
    x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., T, Dr/2]
  cos = (jnp.cos(angles) * attention_factor)[..., None, :]
  sin = (jnp.sin(angles) * attention_factor)[..., None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# --- Feed-forward ---------------------------------------------------------------------


def activation(name: str):
  return {"silu": jax.nn.silu, "gelu": jax.nn.gelu}[name]


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(act(x W_gate) * (x W_up))."""

  def __init__(self, cfg: ModelConfig, d_ff: int, rngs: nnx.Rngs):
    d, std = cfg.d_model, cfg.init_std
    self.act = cfg.hidden_act
    self.dtype = dtype_of(cfg.dtype)
    self.w_gate = param(rngs, (d, d_ff), ("embed", "mlp"), std)
    self.w_up = param(rngs, (d, d_ff), ("embed", "mlp"), std)
    self.w_down = param(rngs, (d_ff, d), ("mlp", "embed"), std)

  def __call__(self, x_btd):
    dt = self.dtype
    gate = project(x_btd, self.w_gate[...].astype(dt))
    up = project(x_btd, self.w_up[...].astype(dt))
    h = activation(self.act)(gate) * up
    return project(h, self.w_down[...].astype(dt))
