"""Evaluation: pass@1 averaged over k samples, cons@k (majority vote) and pass@k.

`python -m r1jax.eval --config configs/NAME.py --checkpoint DIR [--config.KEY=VALUE ...]`
prints a table and writes the figures as JSON (DIR/../eval.json, or --out FILE).

pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), with
n = k samples per question here; greedy decoding (temperature 0) gives one sample.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys

import jax
import numpy as np

from r1jax import parallel, runlog
from r1jax.data import templates
from r1jax.rl import rewards
from r1jax.sampling.sampler import SamplingParams, generate


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def stop_params(tokenizer, max_new_tokens: int, temperature: float, top_p: float = 1.0):
  """Sampling that ends at EOS or at "</answer>"."""
  stop = tuple(tokenizer.encode("</answer>"))
  return SamplingParams(max_new_tokens=max_new_tokens, temperature=max(temperature, 0.0),
                        top_p=top_p, greedy=temperature <= 0, eos_ids=(tokenizer.eos_id,),
                        stop_sequences=(stop,) if stop else ())


def completions_of(tokenizer, out) -> list[str]:
  tokens, mask = np.asarray(out["tokens"]), np.asarray(out["mask"])
  return [tokenizer.decode(row[:int(m.sum())].tolist()) for row, m in zip(tokens, mask)]


def evaluate(graphdef, state, tokenizer, examples, *, template: str, prompt_len: int,
             max_new_tokens: int, k: int = 1, temperature: float = 0.0, batch_size: int = 64,
             seed: int = 0) -> dict:
  """Samples k completions per example and scores them with the task verifiers."""
  k = 1 if temperature <= 0 else k
  params = stop_params(tokenizer, max_new_tokens, temperature)
  correct = np.zeros((len(examples), k), bool)
  formatted = np.zeros((len(examples), k), bool)
  lengths = np.zeros((len(examples), k))
  votes_right = np.zeros(len(examples), bool)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    prompts = [e["prompt"] for e in chunk]
    ids, mask = templates.encode_prompts(prompts, tokenizer, prompt_len, template)
    # Every process samples the same prompts and reads all rows back (to_host gathers
    # rows split over hosts), so every host computes the same figures.
    out = parallel.to_host(generate(graphdef, state, prompt_ids_bt=ids, prompt_mask_bt=mask,
                                    rng=jax.random.fold_in(jax.random.key(seed), start),
                                    group_size=k, params=params,
                                    mesh=parallel.rollout_mesh(state, len(chunk))))
    texts = completions_of(tokenizer, out)
    rep_prompts = [p for p in prompts for _ in range(k)]
    rep_examples = [e for e in chunk for _ in range(k)]
    acc = rewards.accuracy_reward(rep_prompts, texts, example=rep_examples)
    fmt = rewards.format_reward(rep_prompts, texts)
    n = len(chunk)
    correct[start:start + n] = np.asarray(acc).reshape(n, k) > 0
    formatted[start:start + n] = np.asarray(fmt).reshape(n, k) > 0
    lengths[start:start + n] = np.asarray(out["mask"]).sum(-1).reshape(n, k)
    for i in range(n):
      answers = [rewards.extract_answer(texts[i * k + j]) for j in range(k)]
      counted = collections.Counter(a for a in answers if a is not None)
      if counted:
        top = counted.most_common(1)[0][0]
        votes_right[start + i] = bool(correct[start + i][answers.index(top)])
  c = correct.sum(1)
  return {"n": len(examples), "k": k, "temperature": temperature,
          "pass@1": float(correct.mean()),
          f"cons@{k}": float(votes_right.mean()),
          f"pass@{k}": float(np.mean([pass_at_k(k, int(ci), k) for ci in c])),
          "format": float(formatted.mean()), "mean_length": float(lengths.mean())}


def evaluate_stage(config, st, examples) -> dict:
  """`evaluate` of a stage's current weights (a session.Stage) under config.eval, on
  examples[:eval.n], with the GRPO prompt / generation lengths of config.train / config.rl."""
  ev = config.eval
  return evaluate(st.graphdef, (st.state.params, st.state.other), st.tokenizer, examples[:ev.n],
                  template=config.data.template, prompt_len=config.train.seq_len - config.rl.max_new_tokens,
                  max_new_tokens=config.rl.max_new_tokens, k=ev.k, temperature=ev.temperature,
                  seed=config.seed)


def main(argv: list[str] | None = None) -> int:
  from r1jax import checkpoint, config as config_lib, session  # pylint: disable=import-outside-toplevel
  from r1jax import optim  # pylint: disable=import-outside-toplevel
  argv = sys.argv[1:] if argv is None else list(argv)
  ckpt, out_path, rest = None, None, []
  i = 0
  while i < len(argv):
    if argv[i] in ("--checkpoint", "--out") and i + 1 < len(argv):
      if argv[i] == "--checkpoint":
        ckpt = argv[i + 1]
      else:
        out_path = argv[i + 1]
      i += 2
      continue
    rest.append(argv[i])
    i += 1
  if not ckpt:
    print("error: --checkpoint DIR is required (a stage's workdir or its checkpoints/ folder)",
          file=sys.stderr)
    return 2
  from r1jax import train  # pylint: disable=import-outside-toplevel
  try:
    path, overrides, _ = train.parse_args(rest)
    config = config_lib.apply_overrides(config_lib.load(path), overrides)
    config_lib.validate(config, n_devices=jax.device_count())
    ckpt_dir = os.path.join(ckpt, "checkpoints") if os.path.isdir(os.path.join(ckpt, "checkpoints")) else ckpt
    tx = optim.make_optimizer(config.optim, 1)
    with_model = session.open_stage(config, "eval", os.path.join(config.workdir, "eval"), tx, ckpt_dir)
    examples = session.load_examples(config, "test")
  except (config_lib.ConfigError, session.DataError, checkpoint.CheckpointMismatch,
          FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result = evaluate_stage(config, with_model, examples)
  print(f"{'metric':<12} value")
  for key, value in result.items():
    print(f"{key:<12} {value}")
  out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "eval.json")
  if runlog.is_main_process():  # hosts share the folder
    with open(out_path, "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
