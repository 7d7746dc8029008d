"""Checkpoints (orbax): the TrainState pytree, the data-iterator state and run metadata.

A step directory is written atomically by orbax (temporary name, renamed when complete),
so a run killed at any moment resumes from the last complete checkpoint. The model
config is stored beside the state; resuming with a different model shape is refused
before anything in the workdir is touched.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of a different model."""


def manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict) -> None:
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)))
  mgr.wait_until_finished()


def read_meta(mgr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  step = mgr.latest_step() if step is None else step
  if step is None:
    return None
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mgr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """(state, data_state) of `step` (default latest), placed like `abstract_state`."""
  step = mgr.latest_step() if step is None else step
  target = jax.tree.map(
      lambda x: ocp.utils.to_shape_dtype_struct(x) if hasattr(x, "shape") else x, abstract_state)
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return out["state"], out["data"]


def check_compatible(meta: dict | None, model_config: dict, where: str) -> None:
  if meta is None:
    return
  saved = meta.get("model", {})
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
           for k, v in model_config.items() if k in saved and saved[k] != v
           and k not in ("moe_impl", "dtype")]
  if diffs:
    raise CheckpointMismatch(
        f"{where} holds a checkpoint of a different model ({'; '.join(diffs[:4])}). "
        f"Use a new --config.workdir, or match the model config to resume.")


def write_json(path: str, obj) -> None:
  """Atomic JSON write (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def restore_params(directory: str, params_like):
  """The `params` of the latest checkpoint in `directory`, laid out like `params_like`
  (an nnx.State with shardings): the hand-over between pipeline stages, and the eval CLI.

  Only the parameters are read (not the optimizer state), each straight into its target
  sharding, so a checkpoint written on another device set (a pod's, read on one host, or
  the other way round) restores: orbax refuses to reuse the saved shardings there.
  """
  mgr = manager(directory)
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint to start from")
  saved = ocp.StandardCheckpointer().metadata(os.path.join(mgr.directory, str(step), "state"))
  saved_params = getattr(saved, "item_metadata", saved)["params"]
  like_by_path = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(params_like)[0]}
  saved_keys = set()

  def target(path, meta):
    key = _path_key(path)
    saved_keys.add(key)
    like = like_by_path.get(key)
    if like is not None and tuple(meta.shape) != tuple(like.shape):
      raise CheckpointMismatch(f"{directory}: parameter {key} has shape {tuple(meta.shape)}, "
                               f"the model expects {tuple(like.shape)}")
    if like is None:  # saved but not in the model (e.g. an LM head a reward model drops): not read
      return None
    return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=like.sharding)

  item = {"params": _without_none(jax.tree_util.tree_map_with_path(target, saved_params))}
  missing = sorted(set(like_by_path) - saved_keys)
  if missing:
    raise CheckpointMismatch(f"{directory}: checkpoint has no parameter {missing[0]}")
  raw = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  by_path = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(raw["state"]["params"])[0]}
  return jax.tree_util.tree_map_with_path(
      lambda path, like: by_path[_path_key(path)].astype(like.dtype), params_like)


def _without_none(tree):
  """`tree` (nested dicts, as orbax's metadata gives nnx params) with None leaves and
  emptied dicts removed, so orbax's partial restore reads only what is left."""
  if isinstance(tree, dict):
    kept = {k: _without_none(v) for k, v in tree.items()}
    kept = {k: v for k, v in kept.items() if v is not None}
    return kept or None
  return tree


def _path_key(path) -> str:
  parts = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    if name in ("value", "raw_value"):
      continue
    parts.append(str(name))
  return "/".join(parts)
