"""The rejection-sampling stage: sample, verify, filter, deduplicate, write SFT JSONL.

DeepSeek-R1 sec. 2.3.3: when reasoning RL converges, sample several responses per
prompt from its checkpoint, keep only the correct ones, and drop chain-of-thought that
mixes languages, is overlong, or is hard to read; the kept samples (~600k reasoning,
plus ~200k non-reasoning) fine-tune the base model again. Here, for each training prompt
(data.path, or the synthetic task) and each of rejection.n_samples completions:

  kept iff  not truncated and not over rejection.max_chars   ("overlong")
            format_reward == 1: <think>R</think><answer>A</answer>   ("malformed")
            accuracy_reward == 1: the verifier accepts A          ("incorrect")
            language_consistency(R) == 1 in rejection.language    ("mixed_language")
            (R, A) new for this prompt, whitespace aside          ("duplicate")
            fewer than rejection.max_per_prompt kept so far       ("over_cap")

Output, in the stage workdir:
  data/samples-HHHHH-of-NNNNN.jsonl   one file per host: prompt, solution (= R), answer
      (= A), task fields, reference_answer, and provenance (checkpoint, checkpoint_step,
      prompt_id, sample_index, reward, rewards, temperature); `sft` reads the folder.
  progress-HHHHH-of-NNNNN.jsonl       one line per finished prompt (its id, task, counts)
  rejection_summary.json              kept fraction per task, rejection reasons
  metrics.jsonl                       one row per sampling batch

Resumable: prompts in any progress file are skipped; a batch's samples are written and
synced before its progress lines, and on restart sample rows of prompts without a
progress line (a kill between the two writes) are dropped, so nothing is duplicated.
Batches are fixed slices of the prompts with a key per batch, so a resumed run samples
what an uninterrupted one would. With several hosts every host samples every batch
together (the model is sharded over all of them, so `generate` is one global
computation with the same inputs on every host), and host h screens and writes the
prompts k with k % process_count() == h.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time

import jax
import numpy as np

from r1jax import checkpoint, parallel, session
from r1jax.data import templates, tokenizer as tokenizer_lib
from r1jax.rl import rewards

REASONS = ("overlong", "malformed", "incorrect", "mixed_language", "duplicate", "over_cap")
_COPIED_OUT = ("prompt", "answer", "trace", "solution", "id")  # rewritten, not copied


def prompt_id(example: dict) -> str:
  """The example's id, else a hash of its prompt and answer (stable across runs)."""
  if example.get("id") not in (None, ""):
    return str(example["id"])
  text = f"{example['prompt']}\x00{example.get('answer', '')}"
  return "p-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def split_completion(text: str) -> tuple[str, str]:
  """(reasoning R, answer A) of a well-formed "<think>R</think><answer>A</answer>"."""
  think = text.index("<think>") + len("<think>")
  end_think = text.index("</think>", think)
  answer = text.index("<answer>", end_think) + len("<answer>")
  return text[think:end_think].strip(), text[answer:text.rindex("</answer>")].strip()


def screen(examples, texts, truncated, n_samples: int, rj) -> list[tuple[list, collections.Counter]]:
  """Applies the filters to n_samples completions of each example.

  Args:
    examples: B example dicts; texts: B*N completions (row b*N + j is sample j of b);
    truncated: B*N bools, True where sampling hit its token budget without stopping.
  Returns:
    per example: ([(sample index, R, A, per-reward scores)] kept, Counter of reasons).
  """
  prompts = [e["prompt"] for e in examples for _ in range(n_samples)]
  rep = [e for e in examples for _ in range(n_samples)]
  acc = rewards.accuracy_reward(prompts, texts, example=rep,
                                answer=[str(e.get("answer", "")) for e in rep])
  fmt = rewards.format_reward(prompts, texts)
  lang = rewards.language_consistency_reward(prompts, texts, language=rj.language)
  results = []
  for b in range(len(examples)):
    kept, reasons, seen = [], collections.Counter(), set()
    for j in range(n_samples):
      i = b * n_samples + j
      reason = None
      if truncated[i] or (rj.max_chars and len(texts[i]) > rj.max_chars):
        reason = "overlong"
      elif fmt[i] < 1:
        reason = "malformed"
      elif acc[i] < 1:
        reason = "incorrect"
      elif lang[i] < 1:  # R1: "filtered out chain-of-thought with mixed languages"
        reason = "mixed_language"
      else:
        trace, answer = split_completion(texts[i])
        key = (" ".join(trace.split()), " ".join(answer.split()))
        if key in seen:
          reason = "duplicate"
        elif rj.max_per_prompt and len(kept) >= rj.max_per_prompt:
          reason = "over_cap"
        else:
          seen.add(key)
          kept.append((j, trace, answer, dict(accuracy=acc[i], format=fmt[i], language=lang[i])))
      if reason:
        reasons[reason] += 1
    results.append((kept, reasons))
  return results


def sample_row(example: dict, pid: str, j: int, trace: str, answer: str, scores: dict,
               provenance: dict) -> dict:
  """One SFT row: what sft reads (prompt, solution, answer) plus where it came from."""
  row = {"id": f"{pid}-s{j}", "prompt": example["prompt"], "solution": trace, "answer": answer}
  row.update({k: v for k, v in example.items() if k not in _COPIED_OUT and not k.startswith("_")})
  row.update(reference_answer=str(example.get("answer", "")), prompt_id=pid, sample_index=j,
             reward=scores["accuracy"], rewards=scores, source="rejection_sampling", **provenance)
  return row


def make_sampler(config, workdir: str, init_from: str | None, prompt_len: int, max_new: int):
  """(sample_fn, provenance): sample_fn(prompts, rng) -> (B*N texts, B*N truncated flags),
  from the model at `init_from` (the previous stage's checkpoints in a pipeline)."""
  import optax  # pylint: disable=import-outside-toplevel
  from r1jax.eval import completions_of, stop_params  # pylint: disable=import-outside-toplevel
  from r1jax.sampling.sampler import generate  # pylint: disable=import-outside-toplevel
  rj = config.rejection
  if not init_from:
    print("[rejection_sampling] warning: no checkpoint to start from (train.init_from); "
          "sampling from a freshly initialised model", flush=True)
  st = session.open_stage(config, "rejection_sampling", workdir, optax.identity(), init_from)
  tok = st.tokenizer
  params = stop_params(tok, max_new, rj.temperature, rj.top_p)
  step = checkpoint.manager(init_from).latest_step() if init_from else None

  def sample_fn(prompts, rng):
    ids, mask = templates.encode_prompts(prompts, tok, prompt_len, config.data.template)
    state = (st.state.params, st.state.other)
    out = parallel.to_host(generate(st.graphdef, state, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=rng,
                                    group_size=rj.n_samples, params=params,
                                    mesh=parallel.rollout_mesh(state, len(prompts))))
    texts = completions_of(tok, out)
    n_r = np.asarray(out["mask"]).sum(-1)
    last_r = np.asarray(out["tokens"])[np.arange(len(n_r)), np.maximum(n_r - 1, 0)]
    truncated = [bool(n >= max_new and last != tok.eos_id and not t.rstrip().endswith("</answer>"))
                 for n, last, t in zip(n_r, last_r, texts)]
    return texts, truncated

  return sample_fn, dict(checkpoint=os.path.abspath(init_from) if init_from else None,
                         checkpoint_step=step, temperature=rj.temperature)


def run(config, workdir: str, init_from: str | None = None, sample_fn=None,
        provenance: dict | None = None) -> dict:
  """Runs rejection sampling over this host's prompts; resumable; returns the summary.

  `sample_fn` (with `provenance`) replaces the model, e.g. in tests; see make_sampler.
  """
  from r1jax.runlog import MetricsLog  # pylint: disable=import-outside-toplevel
  rj = config.rejection
  max_new = rj.max_new_tokens or config.rl.max_new_tokens
  prompt_len = config.train.seq_len - max_new
  host, n_hosts = hosts()
  rewards.configure(timeout_s=config.rl.reward_timeout, n_workers=config.rl.reward_workers)
  tok = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path or None)

  examples = session.load_examples(config, "train")
  examples = examples[:rj.n_prompts] if rj.n_prompts else examples
  unique, too_long = {}, 0
  for e in examples:
    if len(templates.encode_prompt(e["prompt"], tok, config.data.template)) > prompt_len:
      too_long += 1  # the prompt budget is train.seq_len - max_new_tokens
      continue
    unique.setdefault(prompt_id(e), e)
  prompts = list(unique.items())
  mine = prompts[host::n_hosts]
  owner = {pid: k % n_hosts for k, (pid, _) in enumerate(prompts)}

  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  tag = f"{host:05d}-of-{n_hosts:05d}"
  out_path = os.path.join(data_dir, f"samples-{tag}.jsonl")
  progress_path = os.path.join(workdir, f"progress-{tag}.jsonl")
  done = {r["prompt_id"] for r in _read_progress(workdir)}
  _clean_jsonl(progress_path, lambda r: "prompt_id" in r)
  _clean_jsonl(out_path, lambda r: r.get("prompt_id") in done)
  if n_hosts > 1:  # every host decides which batches to skip from the same files
    barrier()
    done = {r["prompt_id"] for r in _read_progress(workdir)}
    barrier()
  if sample_fn is None:
    sample_fn, provenance = make_sampler(config, workdir, init_from, prompt_len, max_new)
  provenance = dict(provenance or {})

  bs = rj.batch_prompts
  batches = [prompts[k:k + bs] for k in range(0, len(prompts), bs)]
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  log = MetricsLog(workdir, len(batches), "rejection_sampling")
  n_done_before = sum(pid in done for pid, _ in mine)
  print(f"[rejection_sampling] host {host}/{n_hosts}: {len(mine)} prompts "
        f"({n_done_before} already done), {rj.n_samples} samples each -> {out_path}", flush=True)
  start = time.time()
  for b, batch in enumerate(batches):
    if all(pid in done for pid, _ in batch):  # the same decision on every host
      continue
    todo = [i for i, (pid, _) in enumerate(batch) if pid not in done and owner[pid] == host]
    # A full batch every call (the last one padded with repeats): one compiled shape.
    padded = batch + [batch[-1]] * (bs - len(batch))
    texts, truncated = sample_fn([e["prompt"] for _, e in padded], jax.random.fold_in(key, b))
    if not todo:  # this host sampled with the others but owns none of these prompts
      continue
    n = rj.n_samples
    rows_of = lambda seq: [x for i in todo for x in seq[i * n:(i + 1) * n]]  # this host's prompts
    results = screen([batch[i][1] for i in todo], rows_of(texts), rows_of(truncated), n, rj)
    rows, progress = [], []
    for i, (kept, reasons) in zip(todo, results):
      pid, example = batch[i]
      rows += [sample_row(example, pid, j, r, a, s, provenance) for j, r, a, s in kept]
      progress.append(dict(prompt_id=pid, task=example.get("task", ""), samples=n,
                           kept=len(kept), reasons=dict(reasons)))
    _append_jsonl(out_path, rows)  # samples first, then the progress that vouches for them
    _append_jsonl(progress_path, progress)
    done.update(p["prompt_id"] for p in progress)
    n_kept = sum(p["kept"] for p in progress)
    log.write(b + 1, dict(kept_fraction=n_kept / (n * max(len(progress), 1)), kept=n_kept,
                          prompts_done=sum(pid in done for pid, _ in mine),
                          prompts_per_s=len(progress) / max(time.time() - start, 1e-9)),
              show=("prompts_done", "kept_fraction"))
    start = time.time()
  log.close()
  if n_hosts > 1:  # the next stage reads every host's file
    barrier()
  summary = summarize(_read_progress(workdir))
  summary.update(stage="rejection_sampling", output=data_dir, prompts_too_long=too_long,
                 **{k: v for k, v in provenance.items() if k == "checkpoint"})
  if host == 0:
    checkpoint.write_json(os.path.join(workdir, "rejection_summary.json"), summary)
  for task, t in summary["per_task"].items():
    print(f"[rejection_sampling] {task}: kept {t['kept']}/{t['samples']} samples "
          f"({t['kept_fraction']:.1%}), {t['prompts_with_kept']}/{t['prompts']} prompts", flush=True)
  if not summary["kept"]:
    print("[rejection_sampling] warning: no sample was kept; an sft stage on this output "
          "has no data", flush=True)
  return summary


def hosts() -> tuple[int, int]:
  """(this host's index, the number of hosts): the prompts are sliced over hosts."""
  return jax.process_index(), jax.process_count()


def barrier() -> None:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.sync_global_devices("rejection_sampling_done")


def summarize(progress: list[dict]) -> dict:
  """Totals and the kept fraction per task over progress records (every host's)."""
  per_task = collections.defaultdict(lambda: dict(prompts=0, samples=0, kept=0, prompts_with_kept=0))
  reasons = collections.Counter()
  for p in {p["prompt_id"]: p for p in progress}.values():
    t = per_task[p["task"] or "unknown"]
    t["prompts"] += 1
    t["samples"] += p["samples"]
    t["kept"] += p["kept"]
    t["prompts_with_kept"] += p["kept"] > 0
    reasons.update(p["reasons"])
  for t in per_task.values():
    t["kept_fraction"] = t["kept"] / max(t["samples"], 1)
  samples = sum(t["samples"] for t in per_task.values())
  kept = sum(t["kept"] for t in per_task.values())
  return dict(prompts=sum(t["prompts"] for t in per_task.values()), samples=samples, kept=kept,
              kept_fraction=kept / max(samples, 1), per_task=dict(per_task),
              reasons={r: reasons[r] for r in REASONS})


# ------------------------------------------------------------------------ JSONL files


def _append_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _read_jsonl(path: str) -> tuple[list[dict], bool]:
  """(the complete JSON lines of a file, whether anything else was in it)."""
  if not os.path.exists(path):
    return [], False
  rows, damaged = [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if not line.endswith("\n"):
          raise ValueError("a line cut by a kill")
        rows.append(json.loads(line))
      except ValueError:
        damaged = True
  return rows, damaged


def _clean_jsonl(path: str, keep) -> None:
  """Rewrites `path` (atomically) without damaged lines and rows `keep` rejects."""
  rows, damaged = _read_jsonl(path)
  kept = [r for r in rows if keep(r)]
  if damaged or len(kept) < len(rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for row in kept:
        f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, path)


def _read_progress(workdir: str) -> list[dict]:
  rows = []
  for name in sorted(os.listdir(workdir)):
    if name.startswith("progress-") and name.endswith(".jsonl"):
      rows += [r for r in _read_jsonl(os.path.join(workdir, name))[0] if "prompt_id" in r]
  return rows
