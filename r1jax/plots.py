"""The R1-Zero curves (DeepSeek-R1 Fig. 1 / 3 analogues) as PNGs from metrics.jsonl."""

from __future__ import annotations

import os

from r1jax.runlog import read_metrics

CURVES = (("reward_mean", "reward"), ("accuracy", "training accuracy"),
          ("completion_len_mean", "mean completion length (tokens)"), ("loss", "loss"))


def plot_run(workdir: str) -> list[str]:
  """Writes one PNG per available curve into workdir; returns their paths."""
  rows = read_metrics(workdir)
  if not rows:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  for key, label in CURVES:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if not points:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(*zip(*points), marker=".")
    evals = [(r["step"], r["eval_pass@1"]) for r in rows if "eval_pass@1" in r]
    if key == "accuracy" and evals:
      ax.plot(*zip(*evals), marker="o", label="held-out pass@1")
      ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, f"{key}.png")
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written
