"""Configs: defaults (the embedded CPU recipe), loading, CLI overrides and validate().

A recipe is a Python file in `configs/` whose `get_config()` returns a ConfigDict built
from `default_config()`. The CLI overrides any leaf with `--config.a.b=value`; the value is
parsed to the type of the default it replaces. `validate()` collects every problem into one
`ConfigError` whose message names the key, what is wrong and how to fix it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os

import ml_collections

from r1jax.model.config import ModelConfig
from r1jax.rl import grpo

STAGES = ("pretrain", "sft", "grpo", "rejection_sampling", "reward_model", "pipeline")


class ConfigError(ValueError):
  """A bad config value; the message says what, where and how to fix it."""


def model_config(config) -> ModelConfig:
  """The frozen ModelConfig of a run config."""
  return ModelConfig(**config.model.to_dict())


def default_config() -> ml_collections.ConfigDict:
  """Every key a run can set, with the tiny CPU defaults."""
  c = ml_collections.ConfigDict()
  # The embedded CPU recipe is R1-Zero in miniature: pretrain a tiny base model from
  # scratch on arithmetic text where only 30% of the examples show their work, then GRPO
  # with rule rewards (accuracy + format) from that base.
  c.stage = "pipeline"
  c.stages = "pretrain,grpo"  # for stage=pipeline: comma-separated stage names, run in order
  c.seed = 0
  c.workdir = "runs/default"
  # Pipeline stages' own overrides: per_stage.<stage> = "key=value,key=value".
  c.per_stage = ml_collections.ConfigDict(dict(
      pretrain="train.steps=1500",
      # rl.microbatches=4: the update's gradient summed over 4 passes of 64 rows, 1.5x
      # faster on CPU than one pass of 256 (bench/NOTES.md, session 10).
      grpo=("train.steps=400,train.log_every=10,optim.lr=5e-4,optim.warmup_steps=10,"
            "train.checkpoint_every=100,rl.microbatches=4"),
      sft="", rejection_sampling="",
                                               reward_model=""))

  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

  # Mesh axes (see r1jax/parallel.py); -1 takes the devices left over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=200, batch_size=32, seq_len=64, log_every=10, eval_every=0,
      checkpoint_every=100, keep_checkpoints=2, max_nonfinite_steps=5,
      mtp_weight=0.3, bias_update_rate=0.001,
      # pretrain / sft / reward_model: the step's gradient summed over this many forward +
      # backward passes of batch_size / microbatches rows (pairs) each (gradient accumulation,
      # r1jax/microbatch.py): the same update, 1 / microbatches of the activations.
      microbatches=1,
      # Where a stage's weights come from (r1jax/train.py, "hand-overs"): "" the previous
      # policy stage (or, at the top level, the checkpoint the run starts from), "base" the
      # pipeline's base model, "none" a fresh init, a stage name or index, or a path.
      init_from=""))

  c.data = ml_collections.ConfigDict(dict(
      task="arithmetic", n_train=4096, n_test=256, max_digits=2, ops="+-", path="", test_path="",
      tokenizer="char", tokenizer_path="", template="short",
      # Pretraining only: the share of examples that show the worked trace (the rest
      # write only "guess" in <think>); see r1jax.sft.hide_traces.
      trace_fraction=0.3,
      # SFT: pack short examples into full rows (r1jax/packing.py); mix general
      # (non-reasoning) rows from general_path into every batch at general_ratio
      # (DeepSeek-R1 sec. 2.3.3: ~600k reasoning + ~200k non-reasoning samples).
      pack=False, general_path="", general_ratio=0.25))

  # Rejection sampling (r1jax/rejection.py; DeepSeek-R1 sec. 2.3.3).
  c.rejection = ml_collections.ConfigDict(dict(
      n_samples=4, temperature=1.0, top_p=1.0,
      max_new_tokens=0,      # 0: rl.max_new_tokens
      n_prompts=0,           # 0: every training prompt
      batch_prompts=16,      # prompts per sampling call
      max_per_prompt=0,      # distinct kept samples per prompt; 0: all
      language="en",         # the chain of thought must be all this language
      max_chars=0,           # longer completions are dropped; 0: only truncated ones
      handover=True))        # the next sft stage of a pipeline trains on this output

  # Reward model (r1jax/reward_model.py): Bradley-Terry on (prompt, chosen, rejected)
  # pairs; used in GRPO as the "reward_model" reward.
  c.reward_model = ml_collections.ConfigDict(dict(
      data_path="", test_path="",  # pair JSONL; empty: synthetic pairs from data.task
      n_pairs=512,                 # synthetic pairs (train; test gets a quarter)
      path="",                     # checkpoint dir GRPO scores with ("" in a pipeline:
                                   # the last reward_model stage)
      weight=1.0,                  # its weight when GRPO has a reward model
      scope="unverifiable",        # unverifiable (R1 sec. 2.3.4) | all
      score_batch=64))             # rows per scoring call

  c.rl = grpo.default_rl_config()
  c.rl.max_new_tokens = 40  # the tiny recipe's traces + tags + answer fit in ~30 chars
  # Held-out evaluation: n test examples, k samples each at this temperature (0: greedy,
  # k = 1). pass@1 is the mean over the k samples, as in the R1 paper's evaluation.
  # after_sft: an sft stage also reports held-out pass@1 before and after (like grpo).
  c.eval = ml_collections.ConfigDict(dict(n=256, k=4, temperature=1.0, every=0, after_sft=False))
  # Pipeline summary.json extras: "name=STAGE_INDEX.key[.key...],..." copies a value out of a
  # stage's summary, e.g. "teacher_accuracy=1.final_accuracy" (configs/distill_vs_rl.py).
  c.summary_keys = ""
  return c


def load(path: str | None) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a recipe file, or the embedded default when path is None."""
  if path is None:
    config = default_config()
  else:
    if not os.path.isfile(path):
      raise ConfigError(f"--config {path}: no such file. Recipes live in configs/ "
                        f"(e.g. --config configs/default.py).")
    spec = importlib.util.spec_from_file_location("_r1jax_recipe", path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # a recipe is user code: report, don't trace back
      raise ConfigError(f"--config {path}: the file failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
      raise ConfigError(f"--config {path}: the file defines no get_config() function.")
    try:
      config = module.get_config()
    except AttributeError as e:
      raise ConfigError(f"--config {path}: get_config() set a key that does not exist: {e}") from e
    check_keys(config, default_config(), where=path)
  return config


def check_keys(config, reference, where: str, prefix: str = "") -> None:
  """Raises ConfigError for the first key of `config` that `reference` lacks."""
  for key, value in config.items():
    name = prefix + key
    if key not in reference:
      raise ConfigError(f"{where}: unknown key {name!r}.{_suggest(key, reference.keys())}")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
      check_keys(value, reference[key], where, prefix=name + ".")


def _suggest(key, candidates) -> str:
  close = difflib.get_close_matches(key, list(candidates), n=1)
  return f" Did you mean {close[0]!r}?" if close else ""


def apply_overrides(config, overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` strings (the `--config.` prefix optional)."""
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r}: expected --config.KEY=VALUE")
    dotted, raw = text.split("=", 1)
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        here = ".".join(parts[:i]) or "the config"
        keys = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"override {item!r}: {here} has no key {part!r}.{_suggest(part, keys)}")
      if i < len(parts) - 1:
        node = node[part]
    leaf = parts[-1]
    old = node[leaf]
    try:
      value = _parse_like(raw, old)
    except ValueError as e:
      raise ConfigError(f"override {item!r}: {e}") from None
    with node.unlocked():
      node[leaf] = value
  return config


def _parse_like(raw: str, old):
  """Parses `raw` to the type of `old` (bool/int/float/str/tuple)."""
  if isinstance(old, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"{raw!r} is not a bool (use true or false)")
  if isinstance(old, int):
    try:
      return int(raw)
    except ValueError:
      raise ValueError(f"{raw!r} is not an integer") from None
  if isinstance(old, float):
    try:
      return float(raw)
    except ValueError:
      raise ValueError(f"{raw!r} is not a number") from None
  if isinstance(old, (tuple, list)):
    try:
      return tuple(ast.literal_eval(raw))
    except (ValueError, SyntaxError, TypeError):
      raise ValueError(f"{raw!r} is not a tuple literal such as (1, 2)") from None
  if old is None or isinstance(old, str):
    return raw
  raise ValueError(f"cannot override a value of type {type(old).__name__}")


def validate(config, n_devices: int | None = None) -> None:
  """Raises one ConfigError listing every problem in `config`."""
  problems = []
  reference = default_config()
  for key in reference.keys():
    if key not in config:
      problems.append(f"missing section or key {key!r}: start recipes from r1jax.config.default_config()")
  for key, value in _flat(config):
    if key in _flat_dict(reference):
      ref = _flat_dict(reference)[key]
      if ref is not None and not _type_ok(value, ref):
        problems.append(f"{key}={value!r} has type {type(value).__name__}, expected {type(ref).__name__}")
  if problems:
    raise ConfigError(_join(problems))

  if config.stage not in STAGES:
    problems.append(f"stage={config.stage!r}: choose one of {STAGES}")
  if config.stage == "pipeline":
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    if not names:
      problems.append("stage='pipeline' needs stages, e.g. --config.stages=pretrain,grpo")
    for s in names:
      if s not in STAGES or s == "pipeline":
        problems.append(f"stages contains {s!r}: choose from {STAGES[:-1]}")
  problems += model_config(config).problems()

  mesh = config.mesh
  sizes = [mesh.data, mesh.fsdp, mesh.expert, mesh.tensor]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    problems.append(f"mesh sizes {dict(mesh)} must be positive, with at most one -1 ('the rest')")
  elif n_devices is not None:
    fixed = 1
    for s in sizes:
      fixed *= s if s > 0 else 1
    if (-1 in sizes and n_devices % fixed) or (-1 not in sizes and fixed != n_devices):
      problems.append(
          f"mesh data={mesh.data} fsdp={mesh.fsdp} expert={mesh.expert} tensor={mesh.tensor} "
          f"does not fit the {n_devices} available devices: the product must equal the device count "
          f"(or divide it, with one axis set to -1)")
  m = model_config(config)
  if m.is_moe and mesh.expert > 0 and m.n_experts % mesh.expert:
    problems.append(f"model.n_experts={m.n_experts} must be divisible by mesh.expert={mesh.expert}")
  if m.attention == "gqa" and mesh.tensor > 1 and m.n_kv_heads % mesh.tensor:
    problems.append(f"model.n_kv_heads={m.n_kv_heads} must be divisible by mesh.tensor={mesh.tensor}")

  problems += grpo.validate_rl(config.rl)
  problems += _handover_problems(config)
  if config.stage in ("grpo", "pipeline"):
    problems += grpo_row_split_problems(config)
  if config.stage in ("pretrain", "sft", "reward_model", "pipeline"):
    problems += train_row_split_problems(config)
  if config.stage in ("grpo", "pipeline") and config.rl.max_new_tokens >= config.train.seq_len:
    problems.append(f"rl.max_new_tokens={config.rl.max_new_tokens} must be below "
                    f"train.seq_len={config.train.seq_len}: the rest is the prompt budget")
  t = config.train
  for name in ("steps", "batch_size", "seq_len"):
    if t[name] <= 0:
      problems.append(f"train.{name}={t[name]} must be positive")
  if config.optim.lr <= 0:
    problems.append(f"optim.lr={config.optim.lr} must be positive")
  if config.optim.schedule not in ("cosine", "constant", "linear"):
    problems.append(f"optim.schedule={config.optim.schedule!r}: choose cosine, constant or linear")
  if problems:
    raise ConfigError(_join(problems))


def grpo_row_split_problems(config) -> list[str]:
  """The GRPO update splits its B x G rows into rl.minibatches x rl.microbatches equal
  passes; also checked when a pipeline's grpo stage starts (per_stage overrides)."""
  rows, parts = config.train.batch_size * config.rl.group_size, config.rl.minibatches * config.rl.microbatches
  if parts < 1 or rows % parts == 0:
    return []
  return [f"train.batch_size x rl.group_size = {rows} rollout rows do not split into rl.minibatches="
          f"{config.rl.minibatches} x rl.microbatches={config.rl.microbatches} equal parts: "
          f"choose values whose product divides {rows}"]


def refuse_stage_problems(stage: str, problems: list[str]) -> None:
  """Raises ConfigError with a stage's first problem, if any. A stage re-runs its own
  checks when it starts: a pipeline's per_stage overrides arrive after validate()."""
  if problems:
    raise ConfigError(f"[{stage}] {problems[0]}")


def train_row_split_problems(config) -> list[str]:
  """A pretrain / sft step splits its batch_size rows (reward_model: pairs) into
  train.microbatches equal passes; also checked when a pipeline's stage starts
  (per_stage overrides)."""
  t = config.train
  if t.microbatches < 1:
    return [f"train.microbatches={t.microbatches} must be at least 1 (1: one pass over the batch)"]
  if t.batch_size > 0 and t.batch_size % t.microbatches:
    return [f"train.batch_size={t.batch_size} rows do not split into train.microbatches={t.microbatches} "
            f"equal passes: choose a train.microbatches that divides {t.batch_size}"]
  return []


def _handover_problems(config) -> list[str]:
  """The data / rejection / reward_model keys of the R1 pipeline stages."""
  problems = []
  if not 0.0 <= config.data.general_ratio < 1.0:
    problems.append(f"data.general_ratio={config.data.general_ratio} must be in [0, 1): the "
                    f"share of each SFT batch taken from data.general_path")
  rj = config.rejection
  if rj.n_samples < 1 or rj.batch_prompts < 1:
    problems.append(f"rejection.n_samples={rj.n_samples} and rejection.batch_prompts="
                    f"{rj.batch_prompts} must be positive")
  if config.stage in ("rejection_sampling", "pipeline") and (
      (rj.max_new_tokens or config.rl.max_new_tokens) >= config.train.seq_len):
    problems.append(f"rejection.max_new_tokens (0: rl.max_new_tokens) must be below "
                    f"train.seq_len={config.train.seq_len}: the rest is the prompt budget")
  if config.reward_model.scope not in ("unverifiable", "all"):
    problems.append(f"reward_model.scope={config.reward_model.scope!r}: choose unverifiable or all")
  return problems


def _type_ok(value, ref) -> bool:
  if isinstance(ref, bool):
    return isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(ref, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def _flat(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat(value, prefix + key + ".")
    else:
      yield prefix + key, value


def _flat_dict(config):
  return dict(_flat(config))


def _join(problems: list[str]) -> str:
  if len(problems) == 1:
    return "invalid config: " + problems[0]
  return "invalid config:\n" + "\n".join(f"  - {p}" for p in problems)
