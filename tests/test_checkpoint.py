"""Checkpoint hand-over across device sets: params written on 8 devices restore on 4."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax

from r1jax import checkpoint, parallel
from r1jax import state as state_lib
from r1jax.model.config import ModelConfig

CFG = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)

RESTORE = """
import sys, jax, numpy as np, optax
from r1jax import checkpoint, parallel, state as state_lib
from r1jax.model.config import ModelConfig
mesh = parallel.make_mesh(dict(data=1, fsdp=jax.device_count(), expert=1, tensor=1))
_, st = state_lib.create_state(state_lib.create_model(ModelConfig(**{cfg}), seed=1, mesh=mesh),
                               optax.adam(1e-3))
params = checkpoint.restore_params(sys.argv[1], st.params)
leaves = jax.tree.leaves(params)
assert all(x.sharding.mesh.size == 4 for x in leaves), [x.sharding for x in leaves]
np.savez(sys.argv[2], *[np.asarray(x) for x in leaves])
"""


def test_params_restore_onto_a_different_device_set(tmp_path):
  """A pod's checkpoint read on one host (eval CLI, next stage on other hardware): the
  saved shardings name devices the reader lacks, which orbax refuses unless every array
  gets a target sharding. Only params are read, into the reader's own shardings."""
  mesh = parallel.make_mesh(dict(data=1, fsdp=8, expert=1, tensor=1))
  _, st = state_lib.create_state(state_lib.create_model(ModelConfig(**CFG), seed=0, mesh=mesh),
                                 optax.adam(1e-3))
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(checkpoint.manager(ckpt), 3, state_lib.replicate_unsharded(st), {}, {})
  out = str(tmp_path / "restored.npz")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", RESTORE.format(cfg=CFG), ckpt, out], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with np.load(out) as f:
    got = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
  want = [np.asarray(x) for x in jax.tree.leaves(st.params)]
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_restore_params_skips_parameters_the_model_lacks(tmp_path, monkeypatch):
  """A checkpoint with parameters the target model does not have (a reward model started
  from an LM checkpoint drops its head; a stage without MTP modules): the shared ones
  restore exactly, and the extras are not read at all (they used to be read whole onto
  device 0, which on a pod is a full LM head on one chip)."""
  big = ModelConfig(**CFG, tie_embeddings=False, mtp_depth=1)
  small = ModelConfig(**CFG, tie_embeddings=True, mtp_depth=0)
  _, saved = state_lib.create_state(state_lib.create_model(big, seed=0), optax.adam(1e-3))
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(checkpoint.manager(ckpt), 1, saved, {}, {})
  _, target = state_lib.create_state(state_lib.create_model(small, seed=1), optax.adam(1e-3))

  requested = []
  real = checkpoint.ocp.args.PyTreeRestore
  monkeypatch.setattr(checkpoint.ocp.args, "PyTreeRestore",
                      lambda item, **kw: requested.append(item) or real(item, **kw))
  got = checkpoint.restore_params(ckpt, target.params)

  def by_key(tree):  # {"params/layers/0/attn/wq": leaf, ...}
    return {checkpoint._path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}  # pylint: disable=protected-access

  assert len(requested) == 1
  asked = set(by_key(requested[0]))
  assert asked and not any("lm_head" in k or "mtp" in k for k in asked), sorted(asked)
  want = by_key(saved.params)
  for key, leaf in by_key(got).items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[key]))
