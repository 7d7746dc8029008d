"""`--dry_run`: per-device memory of a config on its mesh, before anything is allocated.

Parameter and optimizer bytes come from the model's abstract shapes and the sharding
rules (exact); KV-cache and activation bytes are estimates from the config's shapes.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from r1jax import config as config_lib
from r1jax import parallel
from r1jax.model.transformer import Transformer

GIB = 1024 ** 3


def per_device_param_bytes(config, mesh_shape) -> tuple[int, float]:
  """(total parameter count, fp32 bytes per device under the train rules)."""
  cfg = config_lib.model_config(config)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  sizes = dict(zip(parallel.MESH_AXES, mesh_shape))
  total, per_device = 0, 0.0
  for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    shape = var.get_value().shape
    n = int(np.prod(shape))
    total += n
    spec = parallel.logical_to_spec(var.get_metadata().get("axes") or (None,) * len(shape))
    split = 1
    for dim, entry in zip(shape, spec):
      names = (entry,) if isinstance(entry, str) else tuple(entry or ())
      ways = int(np.prod([sizes[a] for a in names])) if names else 1
      split *= ways if dim % ways == 0 else 1
    per_device += 4 * n / split
  return total, per_device


def report(config, n_devices: int | None = None) -> int:
  n_devices = n_devices or int(np.prod([max(v, 1) for v in
                                        (config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor)]))
  try:
    mesh_shape = parallel.mesh_shape(config.mesh, n_devices if -1 not in
                                     [config.mesh[a] for a in parallel.MESH_AXES] else jax.device_count())
  except ValueError as e:
    print(f"error: {e}")
    return 2
  cfg = config_lib.model_config(config)
  total, params = per_device_param_bytes(config, mesh_shape)
  optimizer = 2 * params  # AdamW first and second moments, fp32
  batch_ways = int(np.prod(mesh_shape[:3]))
  rows = max(config.train.batch_size * config.rl.group_size // batch_ways, 1)
  bytes_per = 2 if cfg.dtype == "bfloat16" else 4
  if cfg.attention == "mla":
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  else:
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim // max(mesh_shape[3], 1)
  kv_cache = rows * config.train.seq_len * cfg.n_layers * per_token * bytes_per
  # Activations with per-layer rematerialisation: the residual stream at every layer
  # boundary plus one layer's working set (~ 16 x d_model a token).
  tokens = rows * config.train.seq_len
  activations = tokens * cfg.d_model * bytes_per * (cfg.n_layers + 16)
  logits = tokens * cfg.vocab_size * 4 / max(mesh_shape[3], 1)
  table = [("parameters (fp32)", params), ("optimizer (AdamW, fp32)", optimizer),
           ("KV cache (rollout)", kv_cache), ("activations (est.)", activations),
           ("logits (fp32, est.)", logits)]
  print(f"model: {total / 1e9:.2f}B parameters; mesh data,fsdp,expert,tensor = {mesh_shape}")
  print(f"{'per device':<26} {'GiB':>10}")
  for name, value in table:
    print(f"{name:<26} {value / GIB:>10.2f}")
  need = sum(v for _, v in table)
  print(f"{'total':<26} {need / GIB:>10.2f}")
  return 0
