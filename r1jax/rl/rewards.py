"""Rule-based rewards (host side): accuracy, format, language consistency, and their sum.

DeepSeek-R1 (Section 2.2.2, R1-Zero) trains on rule rewards only: an accuracy reward (a
deterministic check of the final answer) and a format reward (reasoning inside
<think></think>, the answer inside <answer></answer>); R1's reasoning RL adds a
language-consistency reward (the share of target-language words in the chain of
thought). Every reward function has the signature

  fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where `columns` are the dataset's columns as lists aligned with `completions` (answer,
task, numbers, target, ...); a function takes the columns it needs and ignores the rest.

Answers are checked in worker processes (VerifierPool) with a wall-clock timeout:
math-verify runs sympy, which can hang on inputs such as 9**9**9**9, and its own signal
timeouts fail off the main thread. A timeout or a crash scores 0 and is counted in
RewardStats; a hung worker is killed and replaced, so a call never hangs.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import difflib
import functools
import importlib
import logging
import math
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import threading
import time
import unicodedata

SYNTHETIC_TASKS = ("arithmetic", "countdown", "linear")  # checked by r1jax.data.tasks


# ------------------------------------------------------------------------- settings


@dataclasses.dataclass
class VerifierSettings:
  timeout_s: float = 5.0        # wall clock per verification, then it scores 0
  n_workers: int = 2            # verifier processes
  max_answer_chars: int = 1000  # longer extracted answers score 0 without a verifier


_SETTINGS = VerifierSettings()
_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def configure(timeout_s: float | None = None, n_workers: int | None = None,
              max_answer_chars: int | None = None) -> VerifierSettings:
  """Sets the verifier settings (from config.rl.reward_timeout / reward_workers)."""
  if timeout_s is not None:
    _SETTINGS.timeout_s = float(timeout_s)
  if max_answer_chars is not None:
    _SETTINGS.max_answer_chars = int(max_answer_chars)
  if n_workers is not None and n_workers != _SETTINGS.n_workers:
    _SETTINGS.n_workers = int(n_workers)
    shutdown_pool()
  return _SETTINGS


def get_pool() -> VerifierPool:
  """The module's verifier pool, started on first use and shared by every call."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = VerifierPool(_SETTINGS.n_workers)
    return _POOL


def shutdown_pool() -> None:
  """Stops the verifier workers (a later call starts new ones)."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is not None:
      _POOL.close()
      _POOL = None


# ---------------------------------------------------------------------- worker pool


class VerifierPool:
  """Worker processes that run `fn(*args)` jobs, each under a wall-clock timeout.

  Not concurrent.futures.ProcessPoolExecutor: that pool can neither tell a queued job
  from a running one (so a timeout would count queueing time) nor kill one hung worker
  without breaking every other. Here each worker runs one job at a time over its own
  pipe; a job's clock starts when a ready worker receives it, and a worker past its
  deadline is killed and replaced while the others carry on.

  Workers are fresh interpreters (subprocess, not fork: forking a parent that runs JAX
  threads can deadlock the child; and not multiprocessing's spawn, which re-runs the
  parent's __main__ in every worker, breaking unguarded scripts and importing JAX
  there). Jobs and results travel as pickles over two pipes. Each worker preloads
  math-verify (sympy) before it reports ready, so the import (seconds) never counts
  against a job's timeout. Jobs must be module-level functions.
  """

  def __init__(self, n_workers: int = 2, start_timeout_s: float = 300.0,
               memory_limit_mb: int | None = 8192):
    self.n_workers = max(1, n_workers)
    self.start_timeout_s = start_timeout_s
    self.memory_limit_mb = memory_limit_mb
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self.n_restarts = 0  # workers replaced after a timeout or a crash

  def run(self, jobs: list, timeout_s: float) -> list[tuple[str, object]]:
    """Runs [(fn, args)] -> [(status, value)] in order; status 'ok', 'timeout' or 'error'."""
    with self._lock:
      return self._run(jobs, timeout_s)

  def _run(self, jobs, timeout_s):
    outcomes = [None] * len(jobs)
    pending = collections.deque(range(len(jobs)))
    for worker in [w for w in self._workers if w.job is not None]:
      self._replace(worker)  # left busy by a run that raised (e.g. KeyboardInterrupt)
    while len(self._workers) < self.n_workers:
      self._workers.append(self._start())
    failed_starts = 0
    while pending or any(w.job is not None for w in self._workers):
      now = time.monotonic()
      for worker in self._workers:
        if worker.ready and worker.job is None and pending:
          index = pending.popleft()
          if not worker.send(jobs[index], index, now + timeout_s):
            pending.appendleft(index)
            self._replace(worker)
      waiting = [w for w in self._workers if w.job is not None or not w.ready]
      deadline = min(w.deadline for w in waiting)
      ready = multiprocessing.connection.wait([w.conn for w in waiting],
                                              timeout=max(0.0, deadline - time.monotonic()))
      for worker in [w for w in waiting if w.conn in ready]:
        message = worker.receive()
        if message is None:  # the process died: a crash in the job, or at start-up
          if worker.job is not None:
            outcomes[worker.job] = ("error", "verifier worker died")
          else:
            failed_starts += 1
            if failed_starts > 2 * self.n_workers:
              raise RuntimeError("verifier workers keep dying at start-up; run "
                                 "r1jax.rl.rewards.verify_math('1', '1') to see why")
          self._replace(worker)
        elif message[0] == "ready":
          worker.ready, worker.deadline = True, math.inf
        else:
          outcomes[worker.job] = message
          worker.job, worker.deadline = None, math.inf
      now = time.monotonic()
      for worker in [w for w in waiting if w.deadline <= now and w in self._workers]:
        if worker.job is None:
          self._replace(worker)
          raise RuntimeError(f"a verifier worker did not start within {self.start_timeout_s} s")
        outcomes[worker.job] = ("timeout", None)
        self._replace(worker)
    return outcomes

  def _start(self) -> "_Worker":
    job_read, job_write = os.pipe()
    result_read, result_write = os.pipe()
    code = (f"from r1jax.rl.rewards import _worker_main; "
            f"_worker_main({job_read}, {result_write}, {self.memory_limit_mb!r})")
    env = dict(os.environ)  # the child finds r1jax wherever the parent did
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH")] if p)
    try:
      process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(job_read, result_write),
                                 stdin=subprocess.DEVNULL, env=env)
    finally:
      os.close(job_read)
      os.close(result_write)
    jobs = multiprocessing.connection.Connection(job_write, readable=False)
    results = multiprocessing.connection.Connection(result_read, writable=False)
    return _Worker(process, jobs, results, time.monotonic() + self.start_timeout_s)

  def _replace(self, worker: "_Worker") -> None:
    worker.kill()
    self._workers[self._workers.index(worker)] = self._start()
    self.n_restarts += 1

  def close(self) -> None:
    for worker in self._workers:
      worker.kill()
    self._workers = []


class _Worker:
  """Parent-side handle of one verifier process."""

  def __init__(self, process, jobs, results, start_deadline: float):
    self.process, self.jobs, self.conn = process, jobs, results
    self.ready, self.job, self.deadline = False, None, start_deadline

  def send(self, job, index: int, deadline: float) -> bool:
    try:
      self.jobs.send(job)
    except (OSError, ValueError):  # broken pipe: the idle worker died
      return False
    self.job, self.deadline = index, deadline
    return True

  def receive(self):
    try:
      return self.conn.recv()
    except (EOFError, OSError):
      return None

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
    try:
      self.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      pass
    self.jobs.close()
    self.conn.close()


def _worker_main(job_fd: int, result_fd: int, memory_limit_mb: int | None) -> None:
  """Verifier process: preload, say ready, then run (fn, args) jobs until EOF."""
  # Ctrl-C reaches the whole process group: the parent handles it and kills us.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  jobs = multiprocessing.connection.Connection(job_fd, writable=False)
  conn = multiprocessing.connection.Connection(result_fd, readable=False)
  if memory_limit_mb:
    try:  # a runaway sympy expression fails with MemoryError instead of swapping the host
      import resource
      limit = memory_limit_mb * 2**20
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
      pass
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
  try:
    import math_verify  # noqa: F401  (seconds of sympy import, off the job clock)
  except ImportError:
    pass
  conn.send(("ready", None))
  while True:
    try:
      fn, args = jobs.recv()
    except (EOFError, OSError):
      return
    except Exception as e:  # noqa: BLE001  (a job that does not unpickle here)
      conn.send(("error", f"{type(e).__name__}: {str(e)[:200]}"))
      continue
    try:
      result = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001  (MemoryError, RecursionError, ...)
      result = ("error", f"{type(e).__name__}: {str(e)[:200]}")
    conn.send(result)


atexit.register(lambda: shutdown_pool())


# ---------------------------------------------------------------------------- stats


@dataclasses.dataclass
class RewardStats:
  """Counts of what happened to answers, cumulative since import (or a delta)."""
  n_checked: int = 0    # answers that reached a verifier or the exact-match shortcut
  n_exact: int = 0      # decided by exact string match, no verifier needed
  n_no_answer: int = 0  # no answer found, or longer than max_answer_chars
  n_timeouts: int = 0   # verifier past the timeout: worker killed, scored 0
  n_errors: int = 0     # verifier raised or its worker died: scored 0
  seconds: float = 0.0  # wall clock spent in accuracy checks

  def __sub__(self, other: "RewardStats") -> "RewardStats":
    return RewardStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                          for f in dataclasses.fields(self)})


_STATS = RewardStats()
_STATS_LOCK = threading.Lock()


def reward_stats() -> RewardStats:
  """A copy of the cumulative counters."""
  with _STATS_LOCK:
    return dataclasses.replace(_STATS)


def _count(**deltas) -> None:
  with _STATS_LOCK:
    for name, delta in deltas.items():
      setattr(_STATS, name, getattr(_STATS, name) + delta)


# ----------------------------------------------------------------------- extraction

_THINK, _END_THINK, _ANSWER, _END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MAX_BOXED_TRIES = 8


def extract_answer(completion: str, max_chars: int | None = None) -> str | None:
  """The final answer of a completion, or None.

  In order of preference: the content of the last complete <answer>...</answer> (its
  \\boxed{} content if it has one; an empty block means no answer), else the content of
  the last balanced \\boxed{...}, else the last number. Every step is linear in the
  length of the completion, so a 10^6-character completion costs milliseconds.
  """
  max_chars = _SETTINGS.max_answer_chars if max_chars is None else max_chars
  end = completion.rfind(_END_ANSWER)
  start = completion.rfind(_ANSWER, 0, end) if end >= 0 else -1
  if start >= 0:
    content = completion[start + len(_ANSWER):end].strip()
    if not content:
      return None
    return _last_boxed(content, max_chars) or content
  boxed = _last_boxed(completion, max_chars)
  if boxed is not None:
    return boxed
  last = None
  for last in _NUMBER.finditer(completion):
    pass
  return last.group(0) if last else None


def _last_boxed(text: str, max_chars: int) -> str | None:
  """Content of the last \\boxed{...} whose braces balance within max_chars."""
  end = len(text)
  for _ in range(_MAX_BOXED_TRIES):
    at = text.rfind("\\boxed", 0, end)
    if at < 0:
      return None
    open_at = at + len("\\boxed")
    while open_at < len(text) and text[open_at] == " ":
      open_at += 1
    if open_at < len(text) and text[open_at] == "{":
      depth = 0
      for i in range(open_at, min(len(text), open_at + max_chars + 2)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
          return text[open_at + 1:i].strip()
    end = at
  return None


def normalize_answer(text: str) -> str:
  """NFKC plus a few symbols NFKC keeps, so a number reads the same in any script.

  Decision: full-width digits ("５") and vulgar fractions ("½" -> "1/2") are the same
  numbers as their ASCII forms and count as correct; a tokenizer may emit either.
  """
  text = unicodedata.normalize("NFKC", text)
  return text.replace("\u2044", "/").replace("\u2212", "-").replace("\u00f7", "/").strip()


def _canonical(text: str) -> str:
  """Spelling differences that never change an answer: outer $, spaces, a final period."""
  return text.strip().strip("$").strip().rstrip(".").rstrip()


# ------------------------------------------------------------- verifiers (in workers)


def _parse_math(text: str):
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
  config = [LatexExtractionConfig(), ExprExtractionConfig()]
  # math-verify's LaTeX extraction only looks inside $...$ or \boxed{}: bare LaTeX such
  # as "\frac34" parses only once wrapped. Timeouts are ours (the pool), hence None.
  candidates = [f"${text}$", text] if "\\" in text and "$" not in text else [text]
  for candidate in candidates:
    parsed = parse(candidate, extraction_config=config, parsing_timeout=None)
    if parsed:
      return parsed
  return []


def verify_math(prediction: str, reference: str) -> bool:
  """math-verify equivalence of two answers (numbers, fractions, LaTeX, expressions).

  Runs in a worker process: it may take arbitrarily long on adversarial input.
  """
  from math_verify import verify
  gold = _parse_math(reference)
  if not gold:  # a non-mathematical reference ("Yes", "B"): compare as text
    return _canonical(prediction).lower() == _canonical(reference).lower()
  pred = _parse_math(prediction)
  return bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def verify_task(prediction: str, example: dict) -> bool:
  """The synthetic task's own verifier (r1jax.data.tasks.verify)."""
  from r1jax.data import tasks
  return bool(tasks.verify(prediction, example))


# ------------------------------------------------------------------ reward functions


def accuracy_reward(prompts, completions, answer=None, task=None, example=None, **columns):
  """1.0 when the completion's final answer (see extract_answer) is correct, else 0.0.

  Synthetic tasks (task in SYNTHETIC_TASKS) go to their exact verifier with the row as
  the example dict; everything else goes to math-verify against `answer`. `example`,
  if given, is a list of ready example dicts. Counters land in RewardStats.
  """
  started = time.perf_counter()
  n = len(completions)
  scores = [0.0] * n
  jobs, job_rows = [], []
  n_exact = n_no_answer = 0
  for i, completion in enumerate(completions):
    row_example = _row_example(i, prompts, answer, task, example, columns)
    prediction = extract_answer(normalize_answer(completion))
    if prediction is None or len(prediction) > _SETTINGS.max_answer_chars:
      n_no_answer += 1
      continue
    if row_example is not None and row_example.get("task") in SYNTHETIC_TASKS:
      jobs.append((verify_task, (prediction, row_example)))
    else:
      reference = _reference(i, answer, row_example)
      if _canonical(prediction) == _canonical(reference):
        scores[i] = 1.0
        n_exact += 1
        continue
      jobs.append((verify_math, (prediction, reference)))
    job_rows.append(i)
  outcomes = get_pool().run(jobs, timeout_s=_SETTINGS.timeout_s) if jobs else []
  for i, (status, value) in zip(job_rows, outcomes):
    scores[i] = 1.0 if status == "ok" and value else 0.0
  _count(n_checked=len(jobs) + n_exact, n_exact=n_exact, n_no_answer=n_no_answer,
         n_timeouts=sum(s == "timeout" for s, _ in outcomes),
         n_errors=sum(s == "error" for s, _ in outcomes),
         seconds=time.perf_counter() - started)
  return scores


def _row_example(i, prompts, answer, task, example, columns) -> dict | None:
  if example is not None:
    return example[i]
  if task is None or task[i] not in SYNTHETIC_TASKS:
    return None
  row = {"task": task[i], "prompt": prompts[i]}
  if answer is not None:
    row["answer"] = answer[i]
  row.update({key: values[i] for key, values in columns.items()})
  return row


def _reference(i, answer, row_example) -> str:
  if answer is not None:
    return normalize_answer(str(answer[i]))
  if row_example is not None and "answer" in row_example:
    return normalize_answer(str(row_example["answer"]))
  raise ValueError("accuracy_reward needs an `answer` column (or `example` dicts with "
                   "an 'answer') to check math answers against")


def _with_think_prefix(prompt: str, completion: str) -> str:
  """The completion as the model produced its reasoning block.

  The R1-Zero template ends the prompt with "Assistant:", so the completion itself
  opens with <think>. Chat templates (R1, Qwen3) end the prompt with "<think>": then
  the tag is the prompt's and is put back here, and a second <think> is a format error.
  """
  return _THINK + completion if prompt.rstrip().endswith(_THINK) else completion


def format_reward(prompts, completions, **_):
  """1.0 iff the completion is <think>R</think> <answer>A</answer>, else 0.0.

  Whitespace may surround the blocks; R and A must hold non-whitespace text; each tag
  appears exactly once (so there is nothing hidden after the answer) and nothing but
  whitespace follows </answer>. Prompts ending in <think> lend the completion that tag.
  """
  return [float(_is_formatted(_with_think_prefix(p, c))) for p, c in zip(prompts, completions)]


def _is_formatted(text: str) -> bool:
  text = text.strip()
  if any(text.count(tag) != 1 for tag in (_THINK, _END_THINK, _ANSWER, _END_ANSWER)):
    return False
  if not (text.startswith(_THINK) and text.endswith(_END_ANSWER)):
    return False
  think_end, answer_start = text.find(_END_THINK), text.find(_ANSWER)
  if answer_start < think_end or text[think_end + len(_END_THINK):answer_start].strip():
    return False
  reasoning = text[len(_THINK):think_end]
  answer = text[answer_start + len(_ANSWER):-len(_END_ANSWER)]
  return bool(reasoning.strip()) and bool(answer.strip())


# Words: LaTeX commands and numbers (math, neutral), Han characters one by one, runs of
# Latin letters, runs of any other letters. Han and Latin are excluded from the last
# class so that "приветhello" splits into two words.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
_WORD = re.compile(rf"(\\[A-Za-z]+)|(\d+(?:\.\d+)?)|([{_HAN}])|([{_LATIN}]+)"
                   rf"|((?:(?![{_HAN}{_LATIN}])[^\W\d_])+)")
_MATH_WORDS = frozenset("sin cos tan cot sec csc log ln exp lim max min mod gcd lcm det "
                        "arcsin arccos arctan sqrt".split())
LANGUAGES = ("en", "zh")


def language_consistency(text: str, language: str) -> float:
  """Share of the words of `text` that are in `language` (0.0 for no words).

  Math counts as consistent in either language: LaTeX commands, numbers, single Latin
  or Greek letters (variables) and function names such as sin or log. 'en': Latin-script
  words are consistent, Han, Cyrillic, kana and other scripts are not. 'zh': each Han
  character is a word and consistent; Latin words other than math are not.
  """
  if language not in LANGUAGES:
    raise ValueError(f"language {language!r}: choose one of {LANGUAGES}")
  consistent = total = 0
  for latex, number, han, latin, other in _WORD.findall(text):
    total += 1
    if latex or number:
      consistent += 1
    elif han:
      consistent += language == "zh"
    elif latin:
      consistent += language == "en" or len(latin) == 1 or latin.lower() in _MATH_WORDS
    else:  # a lone Greek letter is a variable; other scripts are another language
      consistent += len(other) == 1 and "\u0370" <= other <= "\u03ff"
  return consistent / total if total else 0.0


def _reasoning(prompt: str, completion: str) -> str:
  """The chain of thought: after <think> (or the start) up to </think> (or <answer>)."""
  text = _with_think_prefix(prompt, completion)
  start = text.find(_THINK)
  start = 0 if start < 0 else start + len(_THINK)
  end = text.find(_END_THINK, start)
  if end < 0:
    end = text.find(_ANSWER, start)
  return text[start:] if end < 0 else text[start:end]


def language_consistency_reward(prompts, completions, language: str = "en", **_):
  """DeepSeek-R1 Section 2.3.2: proportion of target-language words in the CoT."""
  return [language_consistency(_reasoning(p, c), language) for p, c in zip(prompts, completions)]


def code_reward(prompts, completions, **columns):
  """Share of the row's test cases the completion's program passes, run in the sandbox
  (r1jax.rl.code; `scoring='all'` for all-or-nothing). Imported on first use."""
  from r1jax.rl import code
  return code.code_reward(prompts, completions, **columns)


def reward_model_reward(prompts, completions, **columns):
  """The learned reward of r1jax.reward_model (the checkpoint of reward_model.path,
  loaded once by reward_model.prepare_grpo). Imported on first use: verifier workers
  import this module and must not start JAX."""
  from r1jax import reward_model
  return reward_model.reward(prompts, completions, **columns)


REWARD_FUNCTIONS = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "code": code_reward,
    "code_all": functools.partial(code_reward, scoring="all"),
    "language": functools.partial(language_consistency_reward, language="en"),
    "language_en": functools.partial(language_consistency_reward, language="en"),
    "language_zh": functools.partial(language_consistency_reward, language="zh"),
    "reward_model": reward_model_reward,
}


# --------------------------------------------------------------------- combination


def combine_rewards(weights: dict, fns: dict, prompts, completions, **columns):
  """Weighted sum of reward functions -> (total list[float], {name: list[float]}).

  Every function in `weights` runs, weight 0 included (logged, not trained on). A
  function that returns the wrong length or a non-finite value raises ValueError.
  """
  n = len(completions)
  if len(prompts) != n:
    raise ValueError(f"{len(prompts)} prompts for {n} completions")
  total = [0.0] * n
  per_fn = {}
  for name, weight in weights.items():
    if name not in fns:
      raise KeyError(f"reward {name!r} has a weight but no function")
    values = [float(v) for v in fns[name](prompts, completions, **columns)]
    if len(values) != n or not all(math.isfinite(v) for v in values):
      raise ValueError(f"reward {name!r} must return {n} finite numbers, got "
                       f"{len(values)}: {values[:8]}")
    per_fn[name] = values
    total = [t + weight * v for t, v in zip(total, values)]
  return total, per_fn


def compute_rewards(weights: dict, fns: dict, prompts, completions, **columns):
  """combine_rewards plus the RewardStats of this call -> (total, per_fn, stats)."""
  before = reward_stats()
  total, per_fn = combine_rewards(weights, fns, prompts, completions, **columns)
  return total, per_fn, reward_stats() - before


def resolve(spec: str) -> tuple[dict, dict]:
  """Parses "accuracy:1,format:0.1" -> ({name: weight}, {name: fn}).

  A name is a REWARD_FUNCTIONS key or an import path "package.module:function" (or
  "package.module.function") of a user function; a missing weight means 1.0, so
  "mypkg.rewards:brevity:0.5" and "mypkg.rewards:brevity" both work.
  """
  weights, fns = {}, {}
  for item in (part.strip() for part in spec.split(",")):
    if not item:
      continue
    name, weight = item, 1.0
    head, _, tail = item.rpartition(":")
    if head:
      try:
        name, weight = head.strip(), float(tail)
      except ValueError:
        pass
    if name in weights:
      raise ValueError(f"reward spec {spec!r} names {name!r} twice")
    weights[name], fns[name] = weight, _lookup(name)
  if not weights:
    raise ValueError(f"reward spec {spec!r} names no reward function, e.g. 'accuracy:1,format:0.1'")
  return weights, fns


def _lookup(name: str):
  if name in REWARD_FUNCTIONS:
    return REWARD_FUNCTIONS[name]
  if ":" not in name and "." not in name:
    close = difflib.get_close_matches(name, list(REWARD_FUNCTIONS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown reward {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or an "
                     f"import path 'package.module:function'.{hint}")
  module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"reward {name!r}: cannot import module {module_name!r}: {e}") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"reward {name!r}: {module_name} has no callable {attr!r}")
  return fn
