"""What every stage sets up: tokenizer, examples, mesh, model + state, resume.

A stage runner calls `open_stage(...)`, gets a `Stage` with everything ready (state
restored from the workdir's last checkpoint when there is one), runs its loop, and
calls `stage.save(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from r1jax import checkpoint, parallel, runlog
from r1jax import config as config_lib
from r1jax import state as state_lib
from r1jax.data import sources, tasks, tokenizer as tokenizer_lib


class DataError(ValueError):
  """A missing, unreadable or empty dataset."""


def task_knobs(config) -> dict:
  if config.data.task == "arithmetic":
    return dict(max_digits=config.data.max_digits, ops=config.data.ops)
  return {}


def load_examples(config, split: str) -> list[dict]:
  """Examples of a split: from data.path / data.test_path (JSONL / Parquet), else the
  synthetic task generator (train and test disjoint by construction)."""
  path = config.data.path if split == "train" else config.data.test_path
  if path:
    try:
      source = sources.read_records(path, required=("prompt", "answer"))
    except (FileNotFoundError, sources.BadRowError, ValueError) as e:
      raise DataError(f"data.{'path' if split == 'train' else 'test_path'}={path!r}: {e}") from None
    rows = [dict(source[i]) for i in range(len(source))]
    for row in rows:
      row.setdefault("task", config.data.task)
      if "trace" not in row and "solution" in row:  # a JSONL "solution" is the CoT trace
        row["trace"] = row["solution"]
  else:
    n = config.data.n_train if split == "train" else config.data.n_test
    rows = tasks.generate(config.data.task, n, seed=config.seed, split=split, **task_knobs(config))
  if not rows:
    raise DataError(f"the {split} split is empty (data.path={config.data.path!r}, "
                    f"data.task={config.data.task!r}); point data.path at a non-empty file")
  return rows


@dataclasses.dataclass
class Stage:
  config: Any
  name: str
  workdir: str
  mesh: Any
  tokenizer: Any
  graphdef: Any
  state: state_lib.TrainState
  tx: Any
  mgr: Any
  data_state: dict
  start_step: int

  @property
  def model_config(self):
    return config_lib.model_config(self.config)

  def meta(self) -> dict:
    return {"model": self.config.model.to_dict(), "stage": self.name}

  def save(self, step: int, data_state: dict) -> None:
    checkpoint.save(self.mgr, step, self.state, data_state, self.meta())

  def model(self):
    return state_lib.merge(self.graphdef, self.state.params, self.state.other)


def prepare_workdir(config, workdir: str):
  """(model config, tokenizer, mesh, checkpoint manager) of a stage, after refusing a
  tokenizer that does not fit the model or a workdir holding another model's checkpoint."""
  os.makedirs(workdir, exist_ok=True)
  mcfg = config_lib.model_config(config)
  tok = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path or None)
  tok.check_fits(mcfg.vocab_size)
  mesh = parallel.make_mesh(config.mesh)
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
  checkpoint.check_compatible(checkpoint.read_meta(mgr), config.model.to_dict(), workdir)
  return mcfg, tok, mesh, mgr


def open_stage(config, name: str, workdir: str, tx, init_from: str | None = None) -> Stage:
  """Builds everything a stage needs, resuming from `workdir` when it has a checkpoint,
  else starting from `init_from` (a previous stage's checkpoint dir) or from scratch."""
  mcfg, tok, mesh, mgr = prepare_workdir(config, workdir)

  with jax.set_mesh(mesh):
    model = state_lib.create_model(mcfg, config.seed, mesh)
    graphdef, state = state_lib.create_state(model, tx)
  data_state, start = {}, 0
  if mgr.latest_step() is not None:
    state, data_state = checkpoint.restore(mgr, state, mgr.latest_step())
    start = int(state.step)
    print(f"[{name}] resumed from {workdir} at step {start}", flush=True)
  elif init_from:
    params = checkpoint.restore_params(init_from, state.params)
    state = state.replace(params=params)
    print(f"[{name}] initialised from {init_from}", flush=True)
  write_config(config, workdir)
  sizes = [mesh.shape[a] for a in parallel.MESH_AXES]
  print(f"[{name}] state: {state_lib.describe_memory(state)} (mesh {parallel.mesh_text(sizes)})", flush=True)
  return Stage(config, name, workdir, mesh, tok, graphdef, state, tx, mgr, data_state, start)


def write_config(config, workdir: str) -> None:
  """workdir/config.json, from process 0 only: hosts share the workdir."""
  if runlog.is_main_process():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)


def state_shardings(state):
  return jax.tree.map(lambda x: x.sharding, state)


def global_iterator(records, batch_size: int, seed: int, **source_kwargs):
  """A resumable grain iterator of GLOBAL batches (lists of batch_size records) over
  in-memory rows: every process reads the same stream (no per-host shard; the rows are in
  memory, so that costs only host CPU) and feeds its own rows of each batch with
  parallel.put_global_batch. Hence the iterator state is the same on every host, and an
  N-process run is the one-process run on as many devices."""
  return sources.make_iterator(sources.from_records(records, **source_kwargs), batch_size,
                               seed=seed, shard_index=0, shard_count=1)
