"""Rejection sampling: only verified, readable, distinct samples are kept and written
with their provenance; a killed run resumes without duplicating; hosts sample together
and split the writing.

A scripted sampler stands in for the model (the stage's model path runs in
tests/test_r1_pipeline.py), so every filter sees a known completion.
"""

import json
import os
import threading

import jax
import pytest

from r1jax import config as config_lib
from r1jax import rejection, runlog, session

N_PROMPTS = 7
PROVENANCE = dict(checkpoint="/ckpt/3_grpo/checkpoints", checkpoint_step=12, temperature=1.0)


def _config(workdir):
  c = config_lib.default_config()
  c.workdir = str(workdir)
  c.data.n_train = N_PROMPTS
  c.rejection.n_samples = 5
  c.rejection.batch_prompts = 3
  c.rl.reward_workers = 1
  return c


def _examples(config):
  return {e["prompt"]: e for e in session.load_examples(config, "train")}


def _scripted(config, calls):
  """sample_fn: for each prompt the same 5 completions of known fate; the 5th varies."""
  by_prompt = _examples(config)

  def sample_fn(prompts, rng):
    calls.append(list(prompts))
    texts, truncated = [], []
    for p in prompts:
      e = by_prompt[p]
      good = f"<think>{e['trace']}</think><answer>{e['answer']}</answer>"
      k = sorted(by_prompt).index(p) % 4
      fifth = [f"<think>{e['trace']} so</think> <answer>{e['answer']}</answer>",  # kept: distinct
               f"<think>因为 {e['trace']}</think><answer>{e['answer']}</answer>",   # mixed language
               f"<think>{e['trace']}</think>",                                      # malformed
               good][k]                                                             # truncated
      texts += [good,
                f"<think>  {e['trace']} </think>\n<answer>{e['answer']} </answer>",  # duplicate
                f"<think>{e['trace']}</think><answer>{int(e['answer']) + 1}</answer>",  # wrong
                f"<answer>{e['answer']}</answer>",                                  # malformed
                fifth]
      truncated += [False, False, False, False, k == 3]
    return texts, truncated

  return sample_fn


def _read(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def _rows(workdir):
  return [r for name in sorted(os.listdir(workdir / "data")) for r in _read(workdir / "data" / name)]


def test_keeps_only_verified_readable_distinct_samples_with_provenance(tmp_path):
  config = _config(tmp_path)
  calls = []
  summary = rejection.run(config, str(tmp_path), sample_fn=_scripted(config, calls),
                          provenance=PROVENANCE)
  rows = _rows(tmp_path)
  examples = _examples(config)
  order = sorted(examples)
  want = {}
  for p, e in examples.items():
    want[(rejection.prompt_id(e), 0)] = e["trace"]
    if order.index(p) % 4 == 0:
      want[(rejection.prompt_id(e), 4)] = e["trace"] + " so"
  assert {(r["prompt_id"], r["sample_index"]): r["solution"] for r in rows} == want
  assert len(rows) == len(want)
  for r in rows:
    e = examples[r["prompt"]]
    assert r["answer"] == e["answer"] == r["reference_answer"] and r["task"] == "arithmetic"
    assert r["checkpoint"] == PROVENANCE["checkpoint"] and r["checkpoint_step"] == 12
    assert r["reward"] == 1.0 and r["rewards"] == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
  n_extra = sum(order.index(p) % 4 == 0 for p in examples)
  assert summary["kept"] == N_PROMPTS + n_extra and summary["samples"] == 5 * N_PROMPTS
  task = summary["per_task"]["arithmetic"]
  assert task["kept_fraction"] == pytest.approx((N_PROMPTS + n_extra) / (5 * N_PROMPTS))
  assert summary["reasons"]["duplicate"] == N_PROMPTS and summary["reasons"]["incorrect"] == N_PROMPTS
  assert summary["reasons"]["mixed_language"] == sum(order.index(p) % 4 == 1 for p in examples)
  assert summary["reasons"]["overlong"] == sum(order.index(p) % 4 == 3 for p in examples)
  assert json.loads((tmp_path / "rejection_summary.json").read_text())["kept"] == summary["kept"]
  # The next SFT stage reads the folder: solution becomes the trace it trains on.
  sft_config = _config(tmp_path / "sft")
  sft_config.data.path = str(tmp_path / "data")
  loaded = session.load_examples(sft_config, "train")
  assert sorted(r["trace"] for r in loaded) == sorted(want.values())


def test_resume_after_a_kill_does_not_duplicate(tmp_path):
  config = _config(tmp_path)
  straight = tmp_path / "straight"
  rejection.run(_config(straight), str(straight), sample_fn=_scripted(config, []),
                provenance=PROVENANCE)
  want = sorted((r["prompt_id"], r["sample_index"]) for r in _rows(straight))

  killed = tmp_path / "killed"
  calls = []
  inner = _scripted(config, calls)

  def dies_on_third_batch(prompts, rng):
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    return inner(prompts, rng)

  with pytest.raises(KeyboardInterrupt):
    rejection.run(_config(killed), str(killed), sample_fn=dies_on_third_batch, provenance=PROVENANCE)
  assert len(calls) == 2
  # A kill between a batch's sample write and its progress write, and one mid-line.
  done = {json.loads(l)["prompt_id"] for l in next(killed.glob("progress-*")).read_text().splitlines()}
  orphan = next(r for r in _rows(straight) if r["prompt_id"] not in done)
  with open(next((killed / "data").glob("*.jsonl")), "a") as f:
    f.write(json.dumps(orphan) + "\n")
  with open(next(killed.glob("progress-*")), "a") as f:
    f.write('{"prompt_id": "half-writ')
  calls.clear()
  rejection.run(_config(killed), str(killed), sample_fn=inner, provenance=PROVENANCE)
  assert len(calls) == 1  # only the batch left: 7 prompts in batches of 3
  got = sorted((r["prompt_id"], r["sample_index"]) for r in _rows(killed))
  assert got == want
  summary = json.loads((killed / "rejection_summary.json").read_text())
  assert summary["prompts"] == N_PROMPTS and summary["kept"] == len(want)


def test_hosts_sample_together_and_write_their_own_prompts(tmp_path, monkeypatch):
  """With several hosts, `generate` is one global computation, so every host must call
  the sampler with the same prompts and key, batch after batch; each host then screens
  and writes only its own prompts. Together they write what one host writes alone."""
  single = tmp_path / "single"
  rejection.run(_config(single), str(single), sample_fn=_scripted(_config(single), []),
                provenance=PROVENANCE)
  multi = tmp_path / "multi"
  config = _config(multi)
  # The two hosts run as threads that meet at rejection.barrier, as processes would.
  meet, local = threading.Barrier(2, timeout=60), threading.local()
  monkeypatch.setattr(rejection, "barrier", meet.wait)
  monkeypatch.setattr(rejection, "hosts", lambda: (local.host, 2))
  # Only host 0 writes the run log, as jax.process_index() decides on a pod. Two threads that
  # both think they are process 0 race to create the same TensorBoard folder.
  monkeypatch.setattr(runlog, "is_main_process", lambda: local.host == 0)
  calls_by_host, summaries, errors = [[], []], [None, None], []

  def host_main(host):
    local.host = host
    inner = _scripted(config, [])

    def sample_fn(prompts, rng):
      calls_by_host[host].append((list(prompts), jax.random.key_data(rng).tolist()))
      return inner(prompts, rng)

    try:
      summaries[host] = rejection.run(config, str(multi), sample_fn=sample_fn, provenance=PROVENANCE)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      meet.abort()

  threads = [threading.Thread(target=host_main, args=(h,)) for h in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  summary = summaries[1]
  assert calls_by_host[0] == calls_by_host[1] and calls_by_host[0]
  files = sorted(os.listdir(multi / "data"))
  assert files == ["samples-00000-of-00002.jsonl", "samples-00001-of-00002.jsonl"]
  per_host = [{r["prompt_id"] for r in _read(multi / "data" / f)} for f in files]
  assert per_host[0] and per_host[1] and not per_host[0] & per_host[1]
  assert summary["prompts"] == N_PROMPTS  # the last host's summary covers every host
  key = lambda r: (r["prompt_id"], r["sample_index"], r["solution"], r["answer"])
  assert sorted(map(key, _rows(multi))) == sorted(map(key, _rows(single)))
