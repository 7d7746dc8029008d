"""`python -m r1jax.train [--config configs/NAME.py] [--config.KEY=VALUE ...] [--dry_run]`

Parses the config, validates it, and runs `config.stage` (or each stage of a pipeline,
each starting from the previous stage's last checkpoint). With no --config it runs the
embedded CPU default. Bad input exits with one message and status 2.
"""

from __future__ import annotations

import os
import sys
import time

USAGE = __doc__


def parse_args(argv: list[str]):
  path, overrides, dry_run = None, [], False
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg in ("-h", "--help"):
      print(USAGE)
      sys.exit(0)
    if arg == "--dry_run":
      dry_run = True
    elif arg == "--config":
      if i + 1 >= len(argv):
        raise SystemExit("error: --config needs a file path, e.g. --config configs/default.py")
      path = argv[i + 1]
      i += 1
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      overrides.append(arg)
    else:
      raise SystemExit(f"error: unknown argument {arg!r}. {USAGE}")
    i += 1
  return path, overrides, dry_run


def run(config) -> dict:
  """Runs the configured stage(s); returns the summary dict (also written to disk)."""
  from r1jax import checkpoint, plots  # pylint: disable=import-outside-toplevel
  names = ([s.strip() for s in config.stages.split(",") if s.strip()]
           if config.stage == "pipeline" else [config.stage])
  start = time.time()
  summaries, init_from = [], None
  for i, name in enumerate(names):
    stage_dir = config.workdir if len(names) == 1 else os.path.join(config.workdir, f"{i}_{name}")
    stage_config = _stage_config(config, name)
    summaries.append(_run_stage(stage_config, name, stage_dir, init_from))
    summaries[-1]["plots"] = plots.plot_run(stage_dir)
    init_from = os.path.join(stage_dir, "checkpoints")
  summary = dict(stages=summaries, wall_seconds=time.time() - start)
  # The R1-Zero headline: accuracy of the model RL started from, and where RL ended.
  with_acc = [s for s in summaries if "final_accuracy" in s]
  if with_acc:
    summary["base_accuracy"] = with_acc[0].get("base_accuracy")
    summary["final_accuracy"] = with_acc[-1]["final_accuracy"]
  os.makedirs(config.workdir, exist_ok=True)
  checkpoint.write_json(os.path.join(config.workdir, "summary.json"), summary)
  return summary


def _stage_config(config, name: str):
  """The config a pipeline stage runs with: `per_stage.<name>` holds "key=value" overrides
  (e.g. per_stage.grpo = "optim.lr=1e-4,train.steps=50")."""
  from r1jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.stage = name
  spec = c.per_stage.get(name, "") if name in c.per_stage else ""
  return config_lib.apply_overrides(c, [item for item in spec.split(",") if item.strip()])


def _run_stage(config, name: str, workdir: str, init_from: str | None) -> dict:
  if name in ("pretrain", "sft"):
    from r1jax import sft  # pylint: disable=import-outside-toplevel
    return sft.run(config, name, workdir, init_from)
  if name == "grpo":
    from r1jax.rl import trainer  # pylint: disable=import-outside-toplevel
    return trainer.run(config, workdir, init_from)
  raise NotImplementedError(f"stage {name!r} is not available yet in this version of r1jax")


def print_before_after(summary: dict) -> None:
  """The R1-Zero headline: the base model RL started from against the final policy."""
  rl = [s for s in summary["stages"] if "base_eval" in s]
  if not rl:
    return
  base, final = rl[0]["base_eval"], rl[-1]["final_eval"]
  print(f"\nheld-out ({base['n']} questions, k={base['k']}, temperature {base['temperature']})")
  print(f"{'':<14}{'base':>8}{'after RL':>10}")
  for key in [k for k in base if k.startswith(("pass@", "cons@"))] + ["format", "mean_length"]:
    print(f"{key:<14}{base[key]:>8.3f}{final[key]:>10.3f}")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from r1jax import checkpoint, config as config_lib, session  # pylint: disable=import-outside-toplevel
  try:
    path, overrides, dry_run = parse_args(argv)
    config = config_lib.apply_overrides(config_lib.load(path), overrides)
    import jax  # pylint: disable=import-outside-toplevel
    # A dry run plans for a pod: the mesh need not fit the devices of this machine.
    config_lib.validate(config, n_devices=None if dry_run else jax.device_count())
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if dry_run:
    from r1jax import memory  # pylint: disable=import-outside-toplevel
    return memory.report(config)
  try:
    summary = run(config)
  except (session.DataError, checkpoint.CheckpointMismatch, FloatingPointError,
          NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_before_after(summary)
  print(f"done in {summary['wall_seconds']:.0f}s; summary in {config.workdir}/summary.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
