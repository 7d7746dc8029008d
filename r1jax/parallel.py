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
import sys

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
    # MLA's latent ranks: wq_b / wkv_b ([rank, heads, head_dim], 151 + 67 MB a layer in
    # fp32 for DeepSeek-V3) would otherwise be whole on every fsdp shard. wq_a / wkv_a
    # ([embed, rank]) keep fsdp on embed: a mesh axis is used once per array.
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    ("norm", None),
)
# Rollouts: the same, but weights are not split over fsdp.
SAMPLING_RULES = tuple((name, None if axes == "fsdp" else axes) for name, axes in TRAIN_RULES)


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_env(environ=None) -> dict | None:
  """The jax.distributed.initialize() arguments our launch scripts pass, or None.

  launch/slurm.sbatch and the Kubernetes note set all three of JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; JAX_DISTRIBUTED=1
  instead lets jax detect the cluster itself (TPU VM pods: launch/tpu_vm.sh; SLURM).
  Returns {} for auto-detection, None for a single-process run. A partial or malformed
  set raises ValueError naming the variable, rather than hanging at the first collective.
  """
  env = os.environ if environ is None else environ
  given = [k for k in DISTRIBUTED_ENV if env.get(k, "") != ""]
  if not given:
    return {} if env.get("JAX_DISTRIBUTED", "") == "1" else None
  missing = [k for k in DISTRIBUTED_ENV if k not in given]
  if missing:
    raise ValueError(f"multi-host launch: {', '.join(given)} set but {', '.join(missing)} missing; "
                     f"set all of {', '.join(DISTRIBUTED_ENV)} (or none, with JAX_DISTRIBUTED=1)")
  address = env["JAX_COORDINATOR_ADDRESS"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port, e.g. 10.0.0.2:8476")
  try:
    n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
  except ValueError:
    raise ValueError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                     f"{env['JAX_PROCESS_ID']!r} must be integers") from None
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"JAX_PROCESS_ID={i} must be in [0, JAX_NUM_PROCESSES={n})")
  return dict(coordinator_address=address, num_processes=n, process_id=i)


def maybe_initialize_distributed(environ=None) -> bool:
  """jax.distributed.initialize() when launched as one process per host; True if it ran.

  Call before anything touches the devices (the first jax.devices() fixes the backend).
  On CPU the cross-process collectives are gloo (jax's default), which the multi-host
  test uses on loopback. A bad set of variables exits with status 2 and one message.
  """
  if jax.distributed.is_initialized():
    return False
  try:
    kwargs = distributed_env(environ)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  print(f"[r1jax] process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
  return True


def host_rows(mesh: Mesh, n_rows: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows this process feeds under batch_sharding.

  Processes own contiguous blocks of the batch (devices are process-major in the mesh);
  a block is checked to be contiguous, so a mesh that interleaves hosts fails loudly.
  """
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((n_rows,))
  rows = sorted({r for (sl,) in index_map.values() for r in range(*sl.indices(n_rows))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} owns non-contiguous batch rows; "
                     f"put the host-spanning axes first in the mesh")
  return rows[0], rows[-1] + 1


def put_host_batch(mesh: Mesh, batch: dict) -> dict:
  """Global arrays under batch_sharding from each process's own rows: the rows
  host_rows(mesh, n) names (a dict of [b_local, ...] arrays, same keys and shapes on every
  process). When the batch axes span the processes, the global batch is their batches
  stacked in process order; with one process this is a plain device_put.
  """
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()}


def put_global_batch(mesh: Mesh, batch: dict) -> dict:
  """Global arrays under batch_sharding from a GLOBAL batch that every process holds whole
  (a dict of [B, ...] arrays, identical on every process): each process hands over only its
  rows host_rows(mesh, B) (put_host_batch). The stage loops feed batches this way: every
  host reads the same data stream, so an N-process run computes what one process with as
  many devices does, and its data-iterator state is the same on every host. (A
  jax.device_put of the whole batch is valid only while every process passes identical
  values, and copies rows to hosts that do not need them.)
  """
  start, stop = host_rows(mesh, len(next(iter(batch.values()))))
  return put_host_batch(mesh, {k: np.asarray(v)[start:stop] for k, v in batch.items()})


def to_host(tree):
  """Host (numpy) copies of device outputs, whole on every process: jax.device_get, except
  for arrays split over the devices of several processes (e.g. sharded over batch axes
  that span hosts: the data-parallel sampler's rows), which jax.device_get refuses. Those
  are gathered with multihost_utils.process_allgather(tiled=True), whose result for such
  an array is the global array itself (tiled=False refuses it; for process-local arrays
  tiled=True would instead concatenate every host's copy, hence the per-leaf test).
  Fully replicated arrays (metrics' scalars, the trainer's rollouts) are read locally.
  A collective when something is gathered: every process must call it on the same tree.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)

  return jax.tree.map(one, tree)


def host_groups(n_groups: int, host: int | None = None, n_hosts: int | None = None) -> tuple[int, int]:
  """[start, stop) of the n_groups groups this process works on: contiguous, as even as
  can be (the first hosts take one fewer when they do not divide)."""
  host = jax.process_index() if host is None else host
  n_hosts = jax.process_count() if n_hosts is None else n_hosts
  return n_groups * host // n_hosts, n_groups * (host + 1) // n_hosts


def allgather_host_rows(rows_mf, n_rows: int):
  """Every process's rows_mf [m_h, F] (float32; m_h may differ, the hosts' shares in
  process order) -> the [n_rows, F] concatenation, on every process. A collective: every
  process must call it. Each share is padded to n_rows so the gathered arrays line up
  (meant for small tables: rewards, counters)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  rows_mf = np.asarray(rows_mf, np.float32).reshape(len(rows_mf), -1)
  if len(rows_mf) > n_rows:
    raise ValueError(f"allgather_host_rows: this host's share has {len(rows_mf)} rows, more than all {n_rows}")
  padded = np.zeros((n_rows, rows_mf.shape[1]), np.float32)
  padded[:len(rows_mf)] = rows_mf
  got = multihost_utils.process_allgather(dict(rows=padded, count=np.array([len(rows_mf)], np.int32)))
  out = np.concatenate([r[:int(c[0])] for r, c in zip(np.asarray(got["rows"]), np.asarray(got["count"]))])
  if len(out) != n_rows:
    raise RuntimeError(f"allgather_host_rows: the hosts' shares add up to {len(out)} rows, expected {n_rows}")
  return out


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
    if shape[0] % dcn:
      raise ValueError(f"mesh.data={shape[0]} must be a multiple of mesh.dcn_data={dcn}")
    ici = (shape[0] // dcn,) + shape[1:]
    # TPU slices carry slice_index; GPU / CPU hosts do not, so each host is a granule.
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    n_hosts = len({d.process_index for d in devices})
    if dcn not in (n_slices, n_hosts):
      raise ValueError(f"mesh.dcn_data={dcn} must equal the number of TPU slices ({n_slices}) or, "
                       f"without slices, of hosts ({n_hosts})")
    grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1, 1), devices=devices,
                                                process_is_granule=n_slices != dcn)
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


def rollout_mesh(state, n_prompts: int) -> Mesh | None:
  """The mesh a stage's rollouts split their prompts over (`generate(mesh=...)`), or None.

  `state` is the model state the sampler gets; its mesh is the stage's. Splitting the
  prompts over the batch axes (data / fsdp / expert), each device decoding its own rows
  with the dense weights whole and, with mesh.expert > 1, its slice of the routed
  experts, is the sampler's own layout (SAMPLING_RULES: no fsdp split while decoding).
  A split over `tensor` stays: each shard's decode is tensor-parallel (the sampler's
  shard_map is manual over the batch axes only). None, and XLA partitions the sampler
  from the weights' shardings instead, when the batch axes are 1 (nothing to split) or
  there are fewer prompts than batch shards (most devices would decode padding:
  generate pads B up to a multiple of the shards).
  With several processes every host passes the same global prompts and key, and reads
  every row back (to_host), as on the other path (tests/test_multihost_cli.py).
  """
  meshes = [x.sharding.mesh for x in jax.tree.leaves(state)
            if isinstance(getattr(x, "sharding", None), NamedSharding)]
  if not meshes or not rollouts_split(meshes[0].shape, n_prompts):
    return None
  return meshes[0]


def rollouts_split(sizes, n_prompts: int) -> bool:
  """Whether rollout_mesh splits n_prompts over a mesh of these axis sizes (a mapping
  axis -> size; also what the --dry_run memory plan assumes)."""
  shards = int(np.prod([sizes.get(a, 1) for a in BATCH_AXES]))
  return 1 < shards <= n_prompts


def mesh_text(sizes) -> str:
  """"data=2 fsdp=4 expert=1 tensor=1" for mesh sizes in MESH_AXES order."""
  return " ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))


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
