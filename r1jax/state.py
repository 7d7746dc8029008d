"""The training state pytree and the pieces every step shares.

A step is a pure function `step(state, batch) -> (state, metrics)`: the model's graph
definition is static (closed over), everything that changes is in `TrainState`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from r1jax import parallel
from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of nnx.Param: what the optimizer updates
  other: Any  # nnx.State of the rest (the MoE balancing biases)
  opt_state: Any
  nonfinite_run: jax.Array  # consecutive skipped (non-finite) updates


def split_model(model: Transformer):
  """(graphdef, params, other): trainable params apart from non-gradient variables."""
  return nnx.split(model, nnx.Param, ...)


def merge(graphdef, params, other) -> Transformer:
  return nnx.merge(graphdef, params, other)


def create_model(cfg: ModelConfig, seed: int, mesh=None, rules=parallel.TRAIN_RULES) -> Transformer:
  make = lambda: Transformer(cfg, nnx.Rngs(seed))
  if mesh is None:
    return make()
  return parallel.create_sharded_model(make, mesh, rules)


def create_state(model: Transformer, tx: optax.GradientTransformation):
  """(graphdef, TrainState), the optimizer state sharded as the params (`opt_shardings`)."""
  graphdef, params, other = split_model(model)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings(params, tx))(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, other=other,
                     opt_state=opt_state, nonfinite_run=jnp.zeros((), jnp.int32))
  return graphdef, replicate_unsharded(state)


def opt_shardings(params, tx: optax.GradientTransformation):
  """Shardings of tx.init(params): each moment as its parameter, the rest (step counts)
  replicated; None when the params are on no mesh.

  Left to jit, the moments came out replicated (zeros do not depend on the params, so
  XLA's propagation has nothing to follow): on an (fsdp 4, expert 2) mesh every device
  held all of AdamW's m and v, and the jitted steps, which keep the state's shardings,
  kept them so. A moment is an nnx.Param with its parameter's `axes` and shape, and two
  parameters with the same axes and shape get the same sharding under any rules, so
  the lookup is by (axes, shape)."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  placed = {}
  for var in jax.tree.leaves(params, is_leaf=is_var):
    value = var.get_value()
    if isinstance(value.sharding, NamedSharding):
      placed[(var.get_metadata().get("axes"), value.shape)] = value.sharding
  if not placed:
    return None
  replicated = NamedSharding(next(iter(placed.values())).mesh, PartitionSpec())

  def one(leaf):
    if is_var(leaf):
      return placed.get((leaf.get_metadata().get("axes"), leaf.get_value().shape), replicated)
    return replicated
  return jax.tree.map(one, jax.eval_shape(tx.init, params), is_leaf=is_var)


def device_bytes(tree) -> int:
  """Bytes of the tree's arrays held on this process's first device."""
  device = jax.local_devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def describe_memory(state: TrainState) -> str:
  """What the state holds on one device (each stage prints it before its first step): a sharding that
  went wrong (a replicated optimizer state on an fsdp mesh) shows here first."""
  def size(tree):
    n = device_bytes(tree)
    unit, bits = next(((u, b) for u, b in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if n >= 2**b), ("B", 0))
    return f"{n / 2**bits:,.1f} {unit}"
  return f"params {size(state.params)}, optimizer {size(state.opt_state)} on each device"


def replicate_unsharded(tree):
  """Puts every leaf not already on the params' mesh (step counters, optimizer counts)
  on it, replicated, so a jitted step sees one device set."""
  leaves = jax.tree.leaves(tree)
  mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding)), None)
  if mesh is None:
    return tree
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree)


def apply_gradients(state: TrainState, grads, tx, loss):
  """Optimizer update, skipped (params and moments unchanged) when loss or any gradient
  is not finite; the run loop stops after too many consecutive skips."""
  finite = jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt = tx.update(safe_grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
  return state, dict(grad_norm=optax.tree.norm(safe_grads), skipped=(~finite).astype(jnp.float32))


def update_router_bias(graphdef, params, other, experts_lbtk, mask_bt, rate: float):
  """Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): after the update, lower the bias
  of overloaded experts and raise it for underloaded ones by `rate` (gamma).
  Returns (other, metrics)."""
  if experts_lbtk is None:
    return other, {}
  model = merge(graphdef, params, other)
  weights = jnp.broadcast_to(mask_bt[None, ..., None], experts_lbtk.shape).astype(jnp.float32)
  onehot = jax.nn.one_hot(experts_lbtk, model.cfg.n_experts, dtype=jnp.float32) * weights[..., None]
  load_le = onehot.sum(axis=(1, 2, 3))
  imbalance = load_le.max(-1) / jnp.maximum(load_le.mean(-1), 1e-9)
  if rate:
    delta_le = rate * jnp.sign(load_le.mean(-1, keepdims=True) - load_le)
    for i, layer in enumerate(model.moe_layers):
      bias = model.layers[layer].ffn.bias
      bias[...] = bias[...] + delta_le[i]
  _, _, other = split_model(model)
  return other, dict(expert_max_over_mean=imbalance.mean())
