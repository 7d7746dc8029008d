"""Run output: metrics.jsonl (one object a step), TensorBoard events, a progress line."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from r1jax import parallel


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricsLog:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, name: str = ""):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total = total_steps
    self.name = name
    self.start = time.time()
    self.tb = None
    if is_main_process():
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        # tensorboardX checks, then creates the folder: make it first so that two writers
        # starting together cannot race into FileExistsError.
        os.makedirs(os.path.join(workdir, "tb"), exist_ok=True)
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        self.tb = None

  def write(self, step: int, metrics: dict, show: tuple[str, ...] = ()) -> dict:
    row = {"step": int(step)}
    # Read on every process (to_host may gather across hosts), written by process 0 only.
    for k, v in parallel.to_host(dict(metrics)).items():
      v = np.asarray(v)
      if v.size == 1:
        row[k] = float(v)
    if not is_main_process():
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step":
          self.tb.add_scalar(f"{self.name}/{k}" if self.name else k, v, step)
    self.progress(step, row, show)
    return row

  def progress(self, step: int, row: dict, show) -> None:
    elapsed = time.time() - self.start
    frac = min(step / max(self.total, 1), 1.0)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    items = " ".join(f"{k}={row[k]:.4g}" for k in show if k in row)
    print(f"[{self.name}] {bar} {step}/{self.total} {items} ({elapsed:.0f}s)", file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
