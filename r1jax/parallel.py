"""Device mesh, logical-axis rules and sharded parameter creation.

The model names its parameter dimensions with logical axes ("embed", "heads", "experts",
...). One table maps them onto the four mesh axes:
  data   - pure data parallelism (replicated params)
  fsdp   - data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert - expert parallelism for routed experts (and data parallelism for the rest)
  tensor - tensor (Megatron) parallelism over heads and FFN width
Activations are sharded over batch on (data, fsdp, expert). A sampling variant keeps
weights unsharded over fsdp (no per-token all-gathers while decoding).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

TRAIN_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("norm", None),
)
# Rollouts: the same, but weights are not split over fsdp.
SAMPLING_RULES = tuple((name, None if name == "embed" else axes) for name, axes in TRAIN_RULES)


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when launched as one process per host.

  Triggers on the coordinator variables our launch scripts set (or SLURM / TPU pod
  metadata, which jax detects itself when JAX_DISTRIBUTED=1).
  """
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, ...]:
  """Resolves the one -1 axis to the devices left over."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  fixed = int(np.prod([s for s in sizes if s > 0]))
  if -1 in sizes:
    if n_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // fixed
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{n_devices} available")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The global mesh. With mesh.dcn_data > 1 the data axis spans slices / hosts over DCN
  and every other axis stays inside a slice (ICI), as multi-slice TPU training wants."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  dcn = int(mesh_config.get("dcn_data", 1)) if hasattr(mesh_config, "get") else 1
  if dcn > 1:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    ici = (shape[0] // dcn,) + shape[1:]
    grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1, 1), devices=devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes, rules=TRAIN_RULES, mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axes; a mesh axis of size 1 or used twice is dropped."""
  table = dict(rules)
  used, spec = set(), []
  for name in axes:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape[t] > 1))
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def state_shardings(state, mesh: Mesh, rules=TRAIN_RULES):
  """NamedShardings for an nnx.State (abstract or concrete) from each variable's `axes`."""
  def one(var):
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    shape = var.get_value().shape if isinstance(var, nnx.Variable) else var.shape
    spec = logical_to_spec(axes, rules, mesh) if axes else P()
    return NamedSharding(mesh, _fit(spec, shape, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops a mesh axis from any dimension it does not divide (tiny test shapes)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(entry if size and dim % size == 0 else None)
  return P(*out)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading dimension over the batch axes, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
  lead = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def create_sharded_model(make_model, mesh: Mesh, rules=TRAIN_RULES):
  """Builds the model with every parameter created directly in its sharding.

  `make_model()` is traced abstractly first, then run under jit with out_shardings, so a
  parameter is never materialised whole on one device.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)
