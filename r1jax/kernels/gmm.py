"""Grouped matmul (gmm) and its transpose (tgmm) as Pallas kernels, with a custom VJP.

  gmm(lhs_md, rhs_edf, group_sizes_e) -> out_mf
The rows of lhs are sorted by group: rows [offset_e, offset_e + size_e) multiply
rhs_edf[e]; rows past sum(size_e) give zeros. This is `jax.lax.ragged_dot`, which the
MoE layer runs on token slots sorted by expert. The backward pass needs
  d_lhs_md  = gmm(dout_mf, rhs_edf^T)                         (a gmm, rhs transposed)
  d_rhs_edf[e] = lhs_md[rows of e]^T @ dout_mf[rows of e]       (tgmm)
Letters: M rows (token slots), D contraction, F output width, E groups (experts).

Two grid plans, because TPU and GPU Pallas differ in what a grid may do:

* "schedule" (TPU, and the CPU/interpret default so CPU tests run the TPU plan).
  Mosaic runs the grid in order and keeps an output block resident while its block
  index does not change, and scalar prefetch lets index maps read data. The wrapper
  lists the (row tile, group) pairs that overlap, in row order: at most
  n_tiles + E of them, since each group boundary inside a tile adds one visit.
  gmm walks grid (f tile, visit, k tile): a visit writes only the rows of its group
  (so a tile straddling groups is filled by consecutive visits, no atomics), and a
  sentinel group owning the rows past the last group writes their zeros. tgmm walks
  grid (d tile, f tile, visit) and accumulates each group's masked row tiles into
  that group's [D, F] block. Padded visits repeat the last block index (no copy) and
  are skipped. Traffic and steps grow with n_tiles + E, not n_tiles * E.
* "visits" (GPU, Triton): Triton has no scalar prefetch and runs grid programs in
  parallel, but it can mask stores and loads. gmm runs one program per (visit, f tile)
  of the same visit list: a plain k loop (which Triton software-pipelines) and a masked
  store of its group's rows, so programs sharing a row tile write disjoint rows and
  nothing races. tgmm: one program per (group, d tile, f tile) loops over that group's
  row tiles with masked loads. Operands are whole-array refs indexed with dynamic
  slices (pointers on Triton; on TPU they would have to fit VMEM, so TPU uses
  "schedule").

The schedule plan accumulates in an fp32 output block in place (no scratch) and casts
afterwards; the visits plan accumulates in registers and stores the input dtype.

Tests run interpret mode (CPU). The Triton lowering ("visits") was compiled and checked
against ragged_dot on an H200 by bench/kernels.py (values and both gradients, bf16:
relative error 1.7e-3; timings in bench/RESULTS.md). It replaced a plan with one
program per output tile looping over that tile's groups, which was 1.2-1.4x slower
forward+backward. The Mosaic (TPU) lowering is untested.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

STRATEGIES = ("schedule", "visits")


@dataclasses.dataclass(frozen=True)
class Options:
  """Static kernel settings; hashable so the custom VJP can close over them."""
  interpret: bool | None = None  # None: interpret when the backend is CPU.
  strategy: str | None = None  # None: "visits" on GPU, else "schedule".
  block_m: int | None = None  # None: the strategy's default (DEFAULT_BLOCKS)
  block_k: int | None = None
  block_f: int | None = None
  num_warps: int = 4  # Triton only
  num_stages: int = 3  # Triton only: software-pipelining depth of the k loop

  def resolved(self) -> "Options":
    backend = jax.default_backend()
    interpret = backend == "cpu" if self.interpret is None else self.interpret
    strategy = self.strategy or ("visits" if backend == "gpu" else "schedule")
    if strategy not in STRATEGIES:
      raise ValueError(f"gmm strategy={strategy!r}: choose one of {STRATEGIES}")
    if strategy == "schedule" and backend == "gpu" and not interpret:
      raise ValueError("gmm strategy='schedule' needs scalar prefetch, which Triton lacks: use 'visits' on GPU")
    bm, bk, bf = DEFAULT_BLOCKS[strategy]
    return dataclasses.replace(self, interpret=interpret, strategy=strategy, block_m=self.block_m or bm,
                               block_k=self.block_k or bk, block_f=self.block_f or bf)


# (block_m, block_k, block_f). schedule: Mosaic keeps blocks in VMEM (tens of MiB), so
# large k and f blocks cut grid steps. visits: Triton stages the lhs and rhs tiles in
# shared memory, num_stages deep (227 KiB on an H100/H200): 128x512 + 512x512 bf16 tiles
# ask for 1.25 MiB and fail to compile. On an H200 (bench/RESULTS.md) 64x64x128 with 4
# warps and 3 stages was fastest forward+backward in 2 of 3 shapes (64x64x256 with 8
# warps in the third, by 4%); 128x64x256 overflows in tgmm.
DEFAULT_BLOCKS = {"schedule": (128, 512, 512), "visits": (64, 64, 128)}


def _cdiv(a, b):
  return -(-a // b)


def _block(dim: int, want: int, pow2: bool, multiple: int = 1) -> int:
  """Block size for one axis. Triton tensors must be powers of two (and >= 16 for
  tl.dot); Mosaic takes the full axis or a multiple of the hardware tile."""
  if pow2:
    return max(16, min(pl.next_power_of_2(dim), pl.next_power_of_2(want)))
  return _cdiv(dim, multiple) * multiple if dim <= want else want


def _pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def compiler_params(interpret: bool, tpu_semantics, num_warps: int = 4, num_stages: int = 2):
  """Backend compiler params for a pallas_call; None in interpret mode."""
  if interpret:
    return None
  backend = jax.default_backend()
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=tpu_semantics)
  if backend == "gpu":
    # Without Triton params jax 0.10 lowers pallas_call to Mosaic GPU, which this
    # BlockSpec kernel is not written for.
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return None


def group_bounds(group_sizes_e, m: int):
  """Row range [start_e, end_e) of each group, clipped to the m real rows."""
  ends_e = jnp.minimum(jnp.cumsum(group_sizes_e.astype(jnp.int32)), m)
  starts_e = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_e[:-1]])
  return starts_e, ends_e


def visit_schedule(starts_g, ends_g, block_m: int, n_tiles: int, n_visits: int):
  """The (row tile, group) pairs that overlap, in row order, padded to n_visits.

  Returns tile_v, group_v (int32 [n_visits]) and total_1, the number of real visits;
  padded entries repeat the last real one so their block indices trigger no copy.
  """
  first_g = starts_g // block_m
  count_g = jnp.where(ends_g > starts_g, (ends_g - 1) // block_m - first_g + 1, 0)
  cum_g = jnp.cumsum(count_g)
  total = cum_g[-1]
  v = jnp.minimum(jnp.arange(n_visits, dtype=jnp.int32), jnp.maximum(total - 1, 0))
  group_v = jnp.minimum(jnp.searchsorted(cum_g, v, side="right"), starts_g.shape[0] - 1)
  tile_v = first_g[group_v] + v - (cum_g[group_v] - count_g[group_v])
  tile_v = jnp.clip(tile_v, 0, n_tiles - 1)
  return tile_v.astype(jnp.int32), group_v.astype(jnp.int32), total.astype(jnp.int32)[None]


def _dot(a, b, transpose_b: bool):
  dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _row_mask(shape, row0, start, end):
  rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= start) & (rows < end)


def _tgmm_tile(lhs, dout, row0, start, end):
  """fp32 [bd, bf] = lhs^T @ dout over the rows of [start, end) in this row tile.

  Both operands are masked: a neighbour group's rows must add nothing, even inf * 0.
  Select and transpose in fp32 (TPUs before v6 have no bf16 VPU), then matmul in the
  input dtype with fp32 accumulation.
  """
  mask = lambda x: jnp.where(_row_mask(x.shape, row0, start, end), x.astype(jnp.float32), 0.0)
  lhs_t = mask(lhs).T.astype(lhs.dtype)
  return _dot(lhs_t, mask(dout).astype(dout.dtype), transpose_b=False)


# ---------------------------------------------------------------- schedule (TPU) plan

def _gmm_schedule_kernel(tile_ref, group_ref, rhs_group_ref, starts_ref, ends_ref, total_ref,
                         lhs_ref, rhs_ref, out_ref, *, n_groups: int, transpose_rhs: bool):
  """Grid (f tile j, visit v, k tile); out_ref [bm, bf] fp32, resident across k and
  across consecutive visits of the same row tile."""
  del rhs_group_ref
  v, k = pl.program_id(1), pl.program_id(2)
  group = group_ref[v]
  live = v < total_ref[0]
  mask = _row_mask(out_ref.shape, tile_ref[v] * out_ref.shape[0], starts_ref[group], ends_ref[group])

  @pl.when(live & (group < n_groups))
  def _matmul():
    part = _dot(lhs_ref[...], rhs_ref[...], transpose_rhs)
    old = out_ref[...]
    # k == 0 starts this group's rows afresh; other rows belong to other visits.
    base = jnp.where(k > 0, old, 0.0)
    out_ref[...] = jnp.where(mask, base + part, old)

  @pl.when(live & (group == n_groups) & (k == 0))
  def _tail():  # rows past the last group: zeros, as ragged_dot gives
    out_ref[...] = jnp.where(mask, 0.0, out_ref[...])


def _gmm_schedule(lhs_md, rhs, starts_e, ends_e, bm, bk, bf, transpose_rhs, opts):
  m, d = lhs_md.shape
  e = rhs.shape[0]
  f = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  n_tiles, n_visits = m // bm, m // bm + e
  # The sentinel group e owns [total, m): every output row is written by one visit.
  starts_g = jnp.concatenate([starts_e, ends_e[-1:]])
  ends_g = jnp.concatenate([ends_e, jnp.full((1,), m, jnp.int32)])
  tile_v, group_v, total_1 = visit_schedule(starts_g, ends_g, bm, n_tiles, n_visits)
  # Sentinel visits point at the previous group's weights: same block, so no copy.
  rhs_group_v = jnp.maximum(lax.cummax(jnp.where(group_v < e, group_v, -1)), 0)

  def lhs_map(j, v, k, tile, group, rhs_group, *_):
    return tile[v], k

  def rhs_map(j, v, k, tile, group, rhs_group, *_):
    return (rhs_group[v], j, k) if transpose_rhs else (rhs_group[v], k, j)

  def out_map(j, v, k, tile, *_):
    return tile[v], j

  rhs_block = (None, bf, bk) if transpose_rhs else (None, bk, bf)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(f // bf, n_visits, d // bk),
      in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
      out_specs=pl.BlockSpec((bm, bf), out_map),
  )
  kernel = functools.partial(_gmm_schedule_kernel, n_groups=e, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, f), jnp.float32),
      grid_spec=grid_spec,
      compiler_params=compiler_params(opts.interpret, ("parallel", "arbitrary", "arbitrary")),
      interpret=opts.interpret,
      name="gmm",
  )(tile_v, group_v, rhs_group_v, starts_g, ends_g, total_1, lhs_md, rhs)


def _tgmm_schedule_kernel(tile_ref, group_ref, starts_ref, ends_ref, total_ref,
                          lhs_ref, dout_ref, out_ref):
  """Grid (d tile, f tile, visit v); out_ref [bd, bf] fp32 of group_ref[v], resident
  across that group's consecutive visits."""
  v = pl.program_id(2)
  group = group_ref[v]

  @pl.when((v == 0) | (group != group_ref[jnp.maximum(v - 1, 0)]))
  def _init():
    out_ref[...] = jnp.zeros_like(out_ref)

  @pl.when(v < total_ref[0])
  def _accumulate():
    row0 = tile_ref[v] * lhs_ref.shape[0]
    out_ref[...] += _tgmm_tile(lhs_ref[...], dout_ref[...], row0, starts_ref[group], ends_ref[group])


def _tgmm_schedule(lhs_md, dout_mf, starts_e, ends_e, bm, bd, bf, opts):
  m, d = lhs_md.shape
  f, e = dout_mf.shape[1], starts_e.shape[0]
  n_tiles = m // bm
  tile_v, group_v, total_1 = visit_schedule(starts_e, ends_e, bm, n_tiles, n_tiles + e)

  def lhs_map(i, j, v, tile, *_):
    return tile[v], i

  def dout_map(i, j, v, tile, *_):
    return tile[v], j

  def out_map(i, j, v, tile, group, *_):
    return group[v], i, j

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(d // bd, f // bf, n_tiles + e),
      in_specs=[pl.BlockSpec((bm, bd), lhs_map), pl.BlockSpec((bm, bf), dout_map)],
      out_specs=pl.BlockSpec((None, bd, bf), out_map),
  )
  return pl.pallas_call(
      _tgmm_schedule_kernel,
      out_shape=jax.ShapeDtypeStruct((e, d, f), jnp.float32),
      grid_spec=grid_spec,
      compiler_params=compiler_params(opts.interpret, ("parallel", "parallel", "arbitrary")),
      interpret=opts.interpret,
      name="tgmm",
  )(tile_v, group_v, starts_e, ends_e, total_1, lhs_md, dout_mf)


# ------------------------------------------------------------------ visits (GPU) plan

def _gmm_visits_kernel(tile_ref, group_ref, starts_ref, ends_ref, total_ref, lhs_ref, rhs_ref, out_ref,
                       *, bm: int, bk: int, bf: int, n_k: int, n_groups: int, transpose_rhs: bool):
  """Grid (visit v, f tile j): one (row tile, group) pair of the visit schedule.

  Each program runs one plain k loop (which Triton software-pipelines) and stores only
  its group's rows of the tile, with a masked store: programs sharing a tile write
  disjoint rows, so nothing races and no program loops over groups.
  """
  v, j = pl.program_id(0), pl.program_id(1)
  tile, group = tile_ref[v], group_ref[v]
  rows, cols = pl.ds(pl.multiple_of(tile * bm, bm), bm), pl.ds(pl.multiple_of(j * bf, bf), bf)
  mask = _row_mask((bm, bf), tile * bm, starts_ref[group], ends_ref[group])
  live = v < total_ref[0]

  @pl.when(live & (group < n_groups))
  def _matmul():
    def k_body(kk, acc):
      ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
      rhs = rhs_ref[group, cols, ks] if transpose_rhs else rhs_ref[group, ks, cols]
      return acc + _dot(lhs_ref[rows, ks], rhs, transpose_rhs)

    acc = lax.fori_loop(0, n_k, k_body, jnp.zeros((bm, bf), jnp.float32))
    pltriton.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=mask)

  @pl.when(live & (group == n_groups))
  def _tail():  # rows past the last group: zeros, as ragged_dot gives
    pltriton.store(out_ref.at[rows, cols], jnp.zeros((bm, bf), out_ref.dtype), mask=mask)


def _gmm_visits(lhs_md, rhs, starts_e, ends_e, bm, bk, bf, transpose_rhs, out_dtype, opts):
  m, d = lhs_md.shape
  e = rhs.shape[0]
  f = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  n_tiles, n_visits = m // bm, m // bm + e  # e + 1 groups: at most e boundaries
  starts_g = jnp.concatenate([starts_e, ends_e[-1:]])  # sentinel group e: rows [total, m)
  ends_g = jnp.concatenate([ends_e, jnp.full((1,), m, jnp.int32)])
  tile_v, group_v, total_1 = visit_schedule(starts_g, ends_g, bm, n_tiles, n_visits)
  kernel = functools.partial(_gmm_visits_kernel, bm=bm, bk=bk, bf=bf, n_k=d // bk, n_groups=e,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, f), out_dtype),
      grid=(n_visits, f // bf),
      compiler_params=compiler_params(opts.interpret, ("parallel", "parallel"), opts.num_warps, opts.num_stages),
      interpret=opts.interpret,
      name="gmm_visits",
  )(tile_v, group_v, starts_g, ends_g, total_1, lhs_md, rhs)


def _tgmm_visits_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, bm: int, bd: int, bf: int):
  """Grid (group g, d tile i, f tile j); loops over group g's row tiles with masked
  loads (a neighbour group's rows load as zeros, so even inf * 0 adds nothing)."""
  g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]
  dcols, fcols = pl.ds(pl.multiple_of(i * bd, bd), bd), pl.ds(pl.multiple_of(j * bf, bf), bf)

  def body(t, acc):
    rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
    in_group = _row_mask((bm, 1), t * bm, start, end)
    lhs = pltriton.load(lhs_ref.at[rows, dcols], mask=jnp.broadcast_to(in_group, (bm, bd)), other=0)
    dout = pltriton.load(dout_ref.at[rows, fcols], mask=jnp.broadcast_to(in_group, (bm, bf)), other=0)
    return acc + lax.dot_general(lhs, dout, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  stop = jnp.where(end > start, _cdiv(end, bm), start // bm)
  acc = lax.fori_loop(start // bm, stop, body, jnp.zeros((bd, bf), jnp.float32))
  out_ref[g, dcols, fcols] = acc.astype(out_ref.dtype)


def _tgmm_visits(lhs_md, dout_mf, starts_e, ends_e, bm, bd, bf, out_dtype, opts):
  m, d = lhs_md.shape
  f, e = dout_mf.shape[1], starts_e.shape[0]
  return pl.pallas_call(
      functools.partial(_tgmm_visits_kernel, bm=bm, bd=bd, bf=bf),
      out_shape=jax.ShapeDtypeStruct((e, d, f), out_dtype),
      grid=(e, d // bd, f // bf),
      compiler_params=compiler_params(opts.interpret, ("parallel", "parallel", "parallel"), opts.num_warps,
                                      opts.num_stages),
      interpret=opts.interpret,
      name="tgmm_visits",
  )(starts_e, ends_e, lhs_md, dout_mf)


# --------------------------------------------------------------------- entry points

def _plan(m, d, f, opts):
  """Blocks (bm, bk, bf) and the padded sizes they tile exactly."""
  pow2 = opts.strategy == "visits"
  bm = _block(m, opts.block_m, pow2, multiple=16)  # 16: a bf16 sublane tile on TPU
  bk = _block(d, opts.block_k, pow2)
  bf = _block(f, opts.block_f, pow2)
  return (bm, bk, bf), (_cdiv(m, bm) * bm, _cdiv(d, bk) * bk, _cdiv(f, bf) * bf)


def _gmm_impl(lhs_md, rhs, group_sizes_e, opts: Options, transpose_rhs: bool):
  """out[m, f] for rhs [E, D, F] (or [E, F, D] with transpose_rhs)."""
  m, d = lhs_md.shape
  e = rhs.shape[0]
  f = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.promote_types(lhs_md.dtype, rhs.dtype)
  if m == 0 or e == 0:
    return jnp.zeros((m, f), out_dtype)
  (bm, bk, bf), (mp, dp, fp) = _plan(m, d, f, opts)
  # Zero padding: padded k columns add nothing; padded rows belong to no group.
  lhs_md = _pad_axis(_pad_axis(lhs_md.astype(out_dtype), 0, mp), 1, dp)
  rhs = _pad_axis(_pad_axis(rhs.astype(out_dtype), 1, fp if transpose_rhs else dp),
                  2, dp if transpose_rhs else fp)
  starts_e, ends_e = group_bounds(group_sizes_e, m)
  if opts.strategy == "visits":
    out = _gmm_visits(lhs_md, rhs, starts_e, ends_e, bm, bk, bf, transpose_rhs, out_dtype, opts)
  else:
    out = _gmm_schedule(lhs_md, rhs, starts_e, ends_e, bm, bk, bf, transpose_rhs, opts)
  return out[:m, :f].astype(out_dtype)


def _tgmm_impl(lhs_md, dout_mf, group_sizes_e, opts: Options):
  """d_rhs[e] = lhs[rows of e]^T @ dout[rows of e], [E, D, F]; zero for empty groups."""
  m, d = lhs_md.shape
  f, e = dout_mf.shape[1], group_sizes_e.shape[0]
  dtype = jnp.promote_types(lhs_md.dtype, dout_mf.dtype)
  if m == 0:
    return jnp.zeros((e, d, f), dtype)
  (bm, bd, bf), (mp, dp, fp) = _plan(m, d, f, opts)
  lhs_md = _pad_axis(_pad_axis(lhs_md.astype(dtype), 0, mp), 1, dp)
  dout_mf = _pad_axis(_pad_axis(dout_mf.astype(dtype), 0, mp), 1, fp)
  starts_e, ends_e = group_bounds(group_sizes_e, m)
  if opts.strategy == "visits":
    out = _tgmm_visits(lhs_md, dout_mf, starts_e, ends_e, bm, bd, bf, dtype, opts)
  else:
    out = _tgmm_schedule(lhs_md, dout_mf, starts_e, ends_e, bm, bd, bf, opts)
    # Empty groups are never visited, so their blocks were never written.
    out = jnp.where((ends_e > starts_e)[:, None, None], out, 0.0)
  return out[:, :d, :f].astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_md, rhs_edf, group_sizes_e, opts: Options):
  return _gmm_impl(lhs_md, rhs_edf, group_sizes_e, opts, transpose_rhs=False)


def _gmm_fwd(lhs_md, rhs_edf, group_sizes_e, opts):
  return _gmm(lhs_md, rhs_edf, group_sizes_e, opts), (lhs_md, rhs_edf, group_sizes_e)


def _gmm_bwd(opts, res, dout_mf):
  lhs_md, rhs_edf, group_sizes_e = res
  d_lhs = _gmm_impl(dout_mf.astype(rhs_edf.dtype), rhs_edf, group_sizes_e, opts, transpose_rhs=True)
  d_rhs = _tgmm_impl(lhs_md, dout_mf.astype(lhs_md.dtype), group_sizes_e, opts)
  return d_lhs.astype(lhs_md.dtype), d_rhs.astype(rhs_edf.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_md, rhs_edf, group_sizes_e, *, interpret: bool | None = None, strategy: str | None = None,
        block_m: int | None = None, block_k: int | None = None, block_f: int | None = None,
        num_warps: int = 4, num_stages: int = 3):
  """Grouped matmul, the Pallas twin of `jax.lax.ragged_dot(lhs_md, rhs_edf, group_sizes_e)`.

  lhs_md [M, D] rows sorted by group; rhs_edf [E, D, F]; group_sizes_e [E] int.
  Returns out_mf [M, F] in the promoted input dtype (fp32 accumulation); rows past
  sum(group_sizes_e) are zero. Differentiable in lhs and rhs (custom VJP: gmm with rhs
  transposed, and tgmm). interpret=None interprets on CPU; strategy=None picks
  "schedule" (TPU/CPU) or "visits" (GPU). Blocks (None: DEFAULT_BLOCKS of the strategy)
  are clipped to the array sizes; num_warps / num_stages are Triton's.
  """
  opts = Options(interpret, strategy, block_m, block_k, block_f, num_warps, num_stages).resolved()
  return _gmm(lhs_md, rhs_edf, group_sizes_e.astype(jnp.int32), opts)


def tgmm(lhs_md, dout_mf, group_sizes_e, *, interpret: bool | None = None, strategy: str | None = None,
         block_m: int | None = None, block_k: int | None = None, block_f: int | None = None,
         num_warps: int = 4, num_stages: int = 3):
  """Transposed grouped matmul: out_edf[e] = lhs_md[rows of e]^T @ dout_mf[rows of e]."""
  opts = Options(interpret, strategy, block_m, block_k, block_f, num_warps, num_stages).resolved()
  return _tgmm_impl(lhs_md, dout_mf, group_sizes_e.astype(jnp.int32), opts)


def gmm_reference(lhs_md, rhs_edf, group_sizes_e):
  """XLA's grouped matmul: the reference the kernel must match, values and grads."""
  return lax.ragged_dot(lhs_md, rhs_edf, group_sizes_e.astype(jnp.int32))


def gmm_dense_reference(lhs_md, rhs_edf, group_sizes_e):
  """The obvious reference: every group on every row, keeping the group's own rows."""
  starts_e, ends_e = group_bounds(group_sizes_e, lhs_md.shape[0])
  rows_m = jnp.arange(lhs_md.shape[0])
  out = jnp.zeros((lhs_md.shape[0], rhs_edf.shape[2]), jnp.promote_types(lhs_md.dtype, rhs_edf.dtype))
  for e in range(rhs_edf.shape[0]):
    mask_m = (rows_m >= starts_e[e]) & (rows_m < ends_e[e])
    out = out + jnp.where(mask_m[:, None], lhs_md @ rhs_edf[e], 0)
  return out
