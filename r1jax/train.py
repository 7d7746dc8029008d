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
  from r1jax import checkpoint, plots, runlog  # pylint: disable=import-outside-toplevel
  main_process = runlog.is_main_process()
  names = ([s.strip() for s in config.stages.split(",") if s.strip()]
           if config.stage == "pipeline" else [config.stage])
  start = time.time()
  dirs = [config.workdir if len(names) == 1 else os.path.join(config.workdir, f"{i}_{name}")
          for i, name in enumerate(names)]
  dry = Handover(config.train.init_from)  # a bad init_from spec fails before any stage runs
  for _, index, _ in parse_summary_keys(config.summary_keys):
    if index >= len(names):
      from r1jax import config as config_lib  # pylint: disable=import-outside-toplevel
      raise config_lib.ConfigError(f"summary_keys names stage {index}, but the run has stages 0..{len(names) - 1}")
  for i, name in enumerate(names):
    dry.record(dry.prepare(*_stage_config(config, name, names[:i].count(name)), name)[0], name,
               dirs[i])
  summaries, handover = [], Handover(config.train.init_from)
  for i, (name, stage_dir) in enumerate(zip(names, dirs)):
    stage_config, init_spec = _stage_config(config, name, names[:i].count(name))
    stage_config, init_from = handover.prepare(stage_config, init_spec, name)
    summaries.append(_run_stage(stage_config, name, stage_dir, init_from))
    # Hosts share the workdir: process 0 alone writes the plots and the summary.
    summaries[-1].update(init_from=init_from, plots=plots.plot_run(stage_dir) if main_process else [])
    handover.record(stage_config, name, stage_dir)
  summary = dict(stages=summaries, wall_seconds=time.time() - start)
  # The R1-Zero headline: accuracy of the model RL started from, and where RL ended.
  with_acc = [s for s in summaries if "final_accuracy" in s]
  if with_acc:
    summary["base_accuracy"] = with_acc[0].get("base_accuracy")
    summary["final_accuracy"] = with_acc[-1]["final_accuracy"]
  summary.update(summary_extras(config.summary_keys, summaries))
  if main_process:
    os.makedirs(config.workdir, exist_ok=True)
    checkpoint.write_json(os.path.join(config.workdir, "summary.json"), summary)
  return summary


def parse_summary_keys(spec: str) -> list[tuple[str, int, list[str]]]:
  """"name=INDEX.key.key,..." -> [(name, stage index, key path)]; ConfigError when malformed."""
  from r1jax import config as config_lib  # pylint: disable=import-outside-toplevel
  out = []
  for item in (i.strip() for i in spec.split(",") if i.strip()):
    name, _, path = item.partition("=")
    index, *keys = path.split(".")
    if not name or not index.isdigit() or not keys:
      raise config_lib.ConfigError(f"summary_keys item {item!r}: write name=STAGE_INDEX.key[.key...], "
                                   f"e.g. teacher_accuracy=1.final_accuracy")
    out.append((name, int(index), keys))
  return out


def summary_extras(spec: str, summaries: list[dict]) -> dict:
  """The values `summary_keys` names, read from the stages' summaries (None if absent)."""
  extras = {}
  for name, index, keys in parse_summary_keys(spec):
    value = summaries[index] if index < len(summaries) else None
    for key in keys:
      value = value.get(key) if isinstance(value, dict) else None
    extras[name] = value
  return extras


POLICY_STAGES = ("pretrain", "sft", "grpo")  # stages whose checkpoints are a policy


class Handover:
  """What a pipeline stage takes from the stages before it (DeepSeek-R1 sec. 2.3):

  - weights: `train.init_from` of the stage, resolved here -- "" the last policy stage
    (pretrain / sft / grpo; rejection_sampling and reward_model produce no policy), "base"
    the pipeline's base model (the last pretrain stage, else what the run started from),
    "none" a fresh init, a stage name (its last run) or index, or a checkpoint path.
    The run starts from the top-level train.init_from (a path, or "" for a fresh init).
    R1 fine-tunes the BASE model on the rejection-sampled data (sec. 2.3.3), hence
    `per_stage.sft = "...;train.init_from=base"` in configs/r1_pipeline_tiny.py.
  - data: an sft stage after a rejection_sampling stage (with rejection.handover) trains
    on its output folder `<i>_rejection_sampling/data` (data.path), mixed with
    data.general_path rows at data.general_ratio (r1jax/sft.py).
  - reward model: a grpo stage with no reward_model.path gets the last reward_model
    stage's checkpoints, and with them the "reward_model" reward (r1jax/reward_model.py).
  """

  def __init__(self, start: str):
    self.stages = []  # (name, workdir) of the stages run so far
    self.start = None if start in ("", "base", "none", "previous") else self.resolve(start)
    self.base = self.policy = self.start
    self.samples = None  # the last rejection-sampling output to hand to an sft stage
    self.reward_model = None

  def prepare(self, config, init_spec: str, name: str):
    """(the stage's config with its inputs filled in, the checkpoint dir it starts from)."""
    with config.unlocked():
      if name == "sft" and self.samples:
        config.data.path = self.samples
      if name == "grpo" and self.reward_model and not config.reward_model.path:
        config.reward_model.path = self.reward_model
    return config, self.resolve(init_spec)

  def resolve(self, spec: str) -> str | None:
    if spec in ("", "previous"):
      return self.policy
    if spec == "base":
      return self.base
    if spec == "none":
      return None
    from r1jax import config as config_lib  # pylint: disable=import-outside-toplevel
    if spec.isdigit() or spec in config_lib.STAGES:
      runs = [(i, d) for i, (n, d) in enumerate(self.stages) if str(i) == spec or n == spec]
      if not runs or self.stages[runs[-1][0]][0] not in POLICY_STAGES:
        raise config_lib.ConfigError(
            f"train.init_from={spec}: weights come from a {', '.join(POLICY_STAGES)} stage that "
            f"runs before this one (numbered from 0); {spec} is none of those")
      return os.path.join(runs[-1][1], "checkpoints")
    if not os.path.isdir(spec):
      raise config_lib.ConfigError(f"train.init_from={spec!r}: no such checkpoint folder; use "
                                   f"'', base, none, a stage name or index, or a path")
    return _checkpoint_dir(spec)

  def record(self, config, name: str, workdir: str) -> None:
    self.stages.append((name, workdir))
    checkpoints = os.path.join(workdir, "checkpoints")
    if name in POLICY_STAGES:
      self.policy = checkpoints
    if name == "pretrain":
      self.base = checkpoints
    if name == "rejection_sampling" and config.rejection.handover:
      self.samples = os.path.join(workdir, "data")
    if name == "sft":
      self.samples = None  # handed over once: a later sft reads its own data.path again
    if name == "reward_model":
      self.reward_model = checkpoints


def _checkpoint_dir(path: str) -> str:
  """A stage workdir names its checkpoints/ folder; a checkpoints folder names itself."""
  inner = os.path.join(path, "checkpoints")
  return inner if os.path.isdir(inner) else path


def _stage_config(config, name: str, occurrence: int = 0):
  """(the config a pipeline stage runs with, its train.init_from spec).

  `per_stage.<name>` holds "key=value,key=value" overrides (e.g. per_stage.grpo =
  "optim.lr=1e-4,train.steps=50"); a stage that runs more than once may take different
  overrides for each run, separated by ";" (per_stage.sft = "train.steps=40;train.steps=3"
  runs the first sft 40 steps and the second 3; a single alternative applies to all).
  The init spec is "" unless the overrides set train.init_from: a stage's weights come
  from the stages before it (Handover), the top-level value only says where the run starts.
  """
  from r1jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config.copy_and_resolve_references()
  if config.stage != "pipeline":  # per_stage overrides shape pipelines, not a single stage
    return c, ""
  with c.unlocked():
    c.stage = name
  spec = c.per_stage.get(name, "") if name in c.per_stage else ""
  alternatives = spec.split(";")
  spec = alternatives[min(occurrence, len(alternatives) - 1)]
  items = [item.strip() for item in spec.split(",") if item.strip()]
  init = [i.split("=", 1)[1] for i in items if i.removeprefix("--config.").startswith("train.init_from=")]
  return config_lib.apply_overrides(c, items), (init[-1] if init else "")


def _run_stage(config, name: str, workdir: str, init_from: str | None) -> dict:
  if name in ("pretrain", "sft"):
    from r1jax import sft  # pylint: disable=import-outside-toplevel
    return sft.run(config, name, workdir, init_from)
  if name == "grpo":
    from r1jax import reward_model  # pylint: disable=import-outside-toplevel
    from r1jax.rl import trainer  # pylint: disable=import-outside-toplevel
    return trainer.run(reward_model.prepare_grpo(config), workdir, init_from)
  if name == "rejection_sampling":
    from r1jax import rejection  # pylint: disable=import-outside-toplevel
    return rejection.run(config, workdir, init_from)
  if name == "reward_model":
    from r1jax import reward_model  # pylint: disable=import-outside-toplevel
    return reward_model.run(config, workdir, init_from)
  raise NotImplementedError(f"stage {name!r} is not available yet in this version of r1jax")


def print_before_after(summary: dict) -> None:
  """The R1-Zero headline: the model RL started from against the final policy. With
  several evaluated stages (an R1 pipeline, distillation vs RL), one row per stage, since
  each starts from its own weights; then the summary_keys figures."""
  rows = [(i, s) for i, s in enumerate(summary["stages"]) if "base_eval" in s]
  if len(rows) == 1:
    base, final = rows[0][1]["base_eval"], rows[0][1]["final_eval"]
    print(f"\nheld-out ({base['n']} questions, k={base['k']}, temperature {base['temperature']})")
    print(f"{'':<14}{'base':>8}{'after RL':>10}")
    for key in [k for k in base if k.startswith(("pass@", "cons@"))] + ["format", "mean_length"]:
      print(f"{key:<14}{base[key]:>8.3f}{final[key]:>10.3f}")
  elif rows:
    first = rows[0][1]["base_eval"]
    cons = next(k for k in first if k.startswith("cons@"))
    print(f"\nheld-out ({first['n']} questions, k={first['k']}, temperature {first['temperature']}); "
          f"each stage from its own starting weights")
    print(f"{'stage':<22}{'pass@1 before':>14}{'after':>8}{cons + ' after':>13}")
    for i, s in rows:
      print(f"{f'{i}_' + s['stage']:<22}{s['base_eval']['pass@1']:>14.3f}{s['final_eval']['pass@1']:>8.3f}"
            f"{s['final_eval'][cons]:>13.3f}")
  extras = {k: v for k, v in summary.items() if k not in ("stages", "wall_seconds", "base_accuracy",
                                                          "final_accuracy")}
  for key, value in extras.items():
    print(f"{key:<28}{value:.3f}" if isinstance(value, float) else f"{key:<28}{value}")


CPU_MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def cpu_remat_note(config, backend: str, xla_flags: str) -> str | None:
  """A note when model.remat is asked for on XLA:CPU without the memory-aware scheduler,
  under which the recomputation is scheduled early and saves nothing (bench/NOTES.md)."""
  if backend != "cpu" or config.model.remat == "none" or CPU_MEMORY_SCHEDULER_FLAG in xla_flags:
    return None
  return (f"note: model.remat={config.model.remat} saves memory on XLA:CPU only with the memory-aware "
          f"scheduler: XLA_FLAGS={CPU_MEMORY_SCHEDULER_FLAG} (see bench/NOTES.md, session 7)")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from r1jax import checkpoint, config as config_lib, parallel, session  # pylint: disable=import-outside-toplevel
  parallel.maybe_initialize_distributed()  # one process per host (launch/): join the cluster first
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
  note = cpu_remat_note(config, jax.default_backend(), os.environ.get("XLA_FLAGS", ""))
  if note:
    print(note, file=sys.stderr)
  try:
    summary = run(config)
  except (session.DataError, checkpoint.CheckpointMismatch, FloatingPointError,
          NotImplementedError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_before_after(summary)
  print(f"done in {summary['wall_seconds']:.0f}s; summary in {config.workdir}/summary.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
