"""Code rewards: run the program in a completion against its problem's test cases.

DeepSeek-R1's reasoning RL covers coding challenges, rewarded by rules: "a compiler can
be used to evaluate the model's responses against a suite of predefined test cases"
(Section 2.2.2). Here:

  completion --extract_program--> program --Sandbox (r1jax.rl.sandbox)--> one run per
  completion, a forked process per test --compared here, outside the sandbox--> score

The score is the fraction of tests passed (scoring='fraction', reward 'code') or 1.0
only when all pass (scoring='all', reward 'code_all'). A program that crashes, hangs,
runs out of memory or prints too much fails that test and is counted in CodeStats.
Expected outputs never enter the sandbox, so a program cannot read or forge them;
assert-style tests are the exception (they run inside the program's process) and are
meant for trusted test suites, not for RL against a policy that may learn to cheat.

Problem schema: one JSON object per line of a .jsonl file (load_problems checks it):

  {"id": "sum-evens",            optional str; default: a hash of the prompt
   "prompt": "Write f(xs) ...",  required non-empty str
   "entry_point": "f",           required (an identifier) when a test is a call test
   "tests": [                    required non-empty list, each test exactly one of:
     {"input": "1 2\\n", "output": "3\\n"},   stdin -> stdout, compared line by line
                                              after stripping trailing whitespace
     {"args": [[1, 2, 3]], "expected": 2},    entry_point(*args) == expected (JSON
                                              values; floats within 1e-6 relative)
     {"assert": "assert f([]) == 0"}],        a statement run after the program
   "answer": "def f(xs): ...",   optional reference solution (str)
   ...}                          other keys are kept as columns

A call test imports the program (__name__ != "__main__"); a stdin test runs it as
__main__. Programs get the Python standard library only.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import re
import textwrap
import threading
import time

from r1jax.rl import sandbox as sandbox_lib

SCORINGS = ("fraction", "all")
MAX_PROGRAM_CHARS = 20_000  # longer programs score 0 without a run
OUTCOMES = ("passed", "failed", "error", "timeout", "memory", "output_limit", "crash",
            "sandbox_error")


class ProblemError(ValueError):
  """A code problem (or a line of a problems file) that does not follow the schema."""


# ----------------------------------------------------------------------- extraction

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)
_PYTHON_TAGS = ("", "python", "python3", "py")


def extract_program(completion, max_chars: int = MAX_PROGRAM_CHARS) -> str | None:
  """The program of a completion, or None.

  The answer is the inside of the last <answer>...</answer> (or the whole completion
  without one); the program is its last fenced code block tagged python (or untagged),
  else its last fenced block, else the answer itself (an unclosed opening fence, as in
  a completion cut at max length, is dropped).
  """
  if not isinstance(completion, str):
    return None
  answer = _answer_span(completion)
  blocks = _FENCE.findall(answer)
  python = [code for tag, code in blocks if tag.lower() in _PYTHON_TAGS]
  if python or blocks:
    program = (python or [code for _, code in blocks])[-1]
  elif answer.lstrip().startswith("```"):
    program = answer.lstrip().split("\n", 1)[1] if "\n" in answer.lstrip() else ""
  else:
    program = answer
  program = textwrap.dedent(program.strip("\n")).strip()
  return program if program.strip() and len(program) <= max_chars else None


def _answer_span(text: str) -> str:
  """As r1jax.data.tasks.answer_span, but keeping indentation (a program's first line
  may be indented like the rest)."""
  start = text.rfind("<answer>")
  if start < 0:
    return text
  inside = text[start + len("<answer>"):]
  end = inside.find("</answer>")
  return inside if end < 0 else inside[:end]


# ------------------------------------------------------------------------- problems


def validate_problem(row, where: str = "problem") -> dict:
  """The problem with 'task': 'code' and an 'id', or ProblemError saying what is wrong."""
  if not isinstance(row, dict):
    raise ProblemError(f"{where}: expected a JSON object, got {type(row).__name__}")
  prompt = row.get("prompt")
  if not isinstance(prompt, str) or not prompt.strip():
    raise ProblemError(f"{where}: 'prompt' must be a non-empty string")
  tests = row.get("tests")
  if not isinstance(tests, list) or not tests:
    raise ProblemError(f"{where}: 'tests' must be a non-empty list of test objects")
  kinds = [_test_kind(test, f"{where}: tests[{j}]") for j, test in enumerate(tests)]
  entry = row.get("entry_point")
  if "call" in kinds and not (isinstance(entry, str) and entry.isidentifier()):
    raise ProblemError(f"{where}: call tests ('args'/'expected') need 'entry_point', the "
                       f"function's name; got {entry!r}")
  if "answer" in row and not isinstance(row["answer"], str):
    raise ProblemError(f"{where}: 'answer' (a reference solution) must be a string")
  problem_id = row.get("id") or "code-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
  return {**row, "id": str(problem_id), "task": row.get("task", "code")}


_TEST_KEYS = {"io": {"input", "output"}, "call": {"args", "expected"}, "assert": {"assert"}}


def _test_kind(test, where: str) -> str:
  if not isinstance(test, dict):
    raise ProblemError(f"{where}: expected an object, got {type(test).__name__}")
  kinds = [kind for kind, keys in _TEST_KEYS.items() if keys <= set(test)]
  if len(kinds) != 1 or set(test) - _TEST_KEYS[kinds[0]]:
    raise ProblemError(f"{where}: a test is exactly one of {{'input', 'output'}}, "
                       f"{{'args', 'expected'}} or {{'assert'}}; got keys {sorted(test)}")
  kind = kinds[0]
  if kind == "io" and not (isinstance(test["input"], str) and isinstance(test["output"], str)):
    raise ProblemError(f"{where}: 'input' and 'output' must be strings")
  if kind == "call" and not isinstance(test["args"], list):
    raise ProblemError(f"{where}: 'args' must be a list of positional arguments")
  if kind == "assert" and not isinstance(test["assert"], str):
    raise ProblemError(f"{where}: 'assert' must be a string of Python")
  return kind


def load_problems(path: str) -> list[dict]:
  """Reads and checks a .jsonl file of code problems (schema: the module docstring)."""
  problems, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ProblemError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
      problem = validate_problem(row, where)
      if problem["id"] in seen:
        raise ProblemError(f"{where}: id {problem['id']!r} repeats line {seen[problem['id']]}")
      seen[problem["id"]] = line_no
      problems.append(problem)
  if not problems:
    raise ProblemError(f"{path}: no problems in the file")
  return problems


def sandbox_tests(problem: dict) -> list[dict]:
  """The problem's tests as sandbox test cases: inputs only, never expected values."""
  cases = []
  for test in problem["tests"]:
    if "input" in test:
      cases.append({"stdin": test["input"]})
    elif "args" in test:
      cases.append({"call": problem["entry_point"], "args": test["args"]})
    else:
      cases.append({"assert": test["assert"]})
  return cases


# ----------------------------------------------------------------------- comparison


def normalize_output(text: str) -> str:
  """Trailing whitespace of each line and trailing blank lines never matter."""
  lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
  while lines and not lines[-1]:
    lines.pop()
  return "\n".join(lines)


def values_equal(got, expected) -> bool:
  """JSON values equal; floats within 1e-6 relative (1e-9 absolute); bool is not int."""
  if isinstance(got, bool) or isinstance(expected, bool):
    return type(got) is type(expected) and got == expected
  if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
    if isinstance(got, int) and isinstance(expected, int):
      return got == expected
    return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
  if isinstance(got, list) and isinstance(expected, list):
    return len(got) == len(expected) and all(map(values_equal, got, expected))
  if isinstance(got, dict) and isinstance(expected, dict):
    return got.keys() == expected.keys() and all(values_equal(got[k], expected[k]) for k in got)
  return type(got) is type(expected) and got == expected


def outcome_of(test: dict, run: sandbox_lib.TestRun) -> str:
  """'passed' / 'failed' for a run that finished, else the run's status."""
  if run.status != "ran":
    return run.status
  if "output" in test:
    ok = normalize_output(run.stdout) == normalize_output(test["output"])
  elif "expected" in test:
    try:
      ok = values_equal(json.loads(run.value), test["expected"])
    except (TypeError, ValueError):
      ok = False
  else:
    ok = run.value == "true"
  return "passed" if ok else "failed"


def score(outcomes: list[str], scoring: str = "fraction") -> float:
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}: choose one of {SCORINGS}")
  passed = outcomes.count("passed")
  if scoring == "all":
    return float(bool(outcomes) and passed == len(outcomes))
  return passed / len(outcomes) if outcomes else 0.0


# --------------------------------------------------------------------------- stats


@dataclasses.dataclass
class CodeStats:
  """Counts since import (or a delta): completions, runs, and test outcomes."""
  n_completions: int = 0
  n_no_program: int = 0     # no program found, or longer than MAX_PROGRAM_CHARS
  n_runs: int = 0           # sandbox runs (identical programs of a batch run once)
  n_tests: int = 0
  n_passed: int = 0
  n_failed: int = 0         # ran, wrong answer
  n_error: int = 0          # exception or non-zero exit
  n_timeout: int = 0        # wall clock or CPU time
  n_memory: int = 0         # MemoryError under RLIMIT_AS
  n_output_limit: int = 0
  n_crash: int = 0          # killed by a signal
  n_sandbox_error: int = 0  # the run itself failed: counted, scored 0
  seconds: float = 0.0

  def __sub__(self, other: "CodeStats") -> "CodeStats":
    return CodeStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                        for f in dataclasses.fields(self)})


_STATS = CodeStats()
_LOCK = threading.Lock()


def code_stats() -> CodeStats:
  with _LOCK:
    return dataclasses.replace(_STATS)


def _count(outcomes: collections.Counter, **deltas) -> None:
  with _LOCK:
    for outcome, n in outcomes.items():
      setattr(_STATS, f"n_{outcome}", getattr(_STATS, f"n_{outcome}") + n)
    _STATS.n_tests += sum(outcomes.values())
    for name, delta in deltas.items():
      setattr(_STATS, name, getattr(_STATS, name) + delta)


# -------------------------------------------------------------------------- sandbox

_SETTINGS = {"limits": sandbox_lib.Limits(), "n_workers": None, "allow_unsandboxed": False,
             "python": None}
_SANDBOX: sandbox_lib.Sandbox | None = None
_CACHE: collections.OrderedDict = collections.OrderedDict()  # run key -> RunResult
_CACHE_SIZE = 8192  # the rewards of a step (e.g. 'code' and 'code_all') share runs


def configure(n_workers: int | None = None, allow_unsandboxed: bool | None = None,
              python: str | None = None, **limits) -> dict:
  """Sets the shared sandbox's settings; `limits` are Limits fields (timeout_s, ...)."""
  global _SANDBOX
  with _LOCK:
    if limits:
      _SETTINGS["limits"] = dataclasses.replace(_SETTINGS["limits"], **limits)
    for key, value in (("n_workers", n_workers), ("allow_unsandboxed", allow_unsandboxed),
                       ("python", python)):
      if value is not None:
        _SETTINGS[key] = value
    old, _SANDBOX = _SANDBOX, None
    _CACHE.clear()  # other limits, other outcomes
  if old is not None:
    old.close()
  return dict(_SETTINGS)


def get_sandbox() -> sandbox_lib.Sandbox:
  """The shared sandbox, made (and its isolation checked) on first use."""
  global _SANDBOX
  with _LOCK:
    if _SANDBOX is None:
      _SANDBOX = sandbox_lib.Sandbox(**_SETTINGS)
    box = _SANDBOX
  box.check()
  return box


# -------------------------------------------------------------------------- rewards


def run_programs(programs: list[str | None], problems: list[dict | None],
                 box: sandbox_lib.Sandbox | None = None) -> tuple[list[list[str] | None], int]:
  """(test outcomes of each (program, problem), None where either is missing; number of
  sandbox runs). Identical pairs run once: a group of G samples often repeats itself."""
  keys, jobs, cached = [], {}, {}
  with _LOCK:  # only the shared sandbox's results are cached: its limits are the cache's
    for program, problem in zip(programs, problems):
      key = None
      if program is not None and problem is not None:
        cases = sandbox_tests(problem)
        key = hashlib.sha256(json.dumps([program, cases], sort_keys=True).encode()).hexdigest()
        if box is None and key in _CACHE:
          cached[key] = _CACHE[key]
        else:
          jobs.setdefault(key, (program, cases))
      keys.append(key)
  results = (box or get_sandbox()).run_many(list(jobs.values())) if jobs else []
  by_key = dict(cached, **dict(zip(jobs, results)))
  if box is None:
    with _LOCK:
      for key, result in zip(jobs, results):
        if result.status == "ok":  # a killed or broken run may go better next time
          _CACHE[key] = result
      while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
  outcomes = []
  for key, problem in zip(keys, problems):
    if key is None:
      outcomes.append(None)
    else:
      runs = by_key[key].tests
      outcomes.append([outcome_of(t, r) for t, r in zip(problem["tests"], runs)])
  return outcomes, len(jobs)


def code_reward(prompts, completions, example=None, tests=None, entry_point=None,
                scoring: str = "fraction", **_):
  """Score of each completion's program on its row's tests (see score()).

  Rows come from `example` (a list of problem dicts, as the trainer passes) or from
  `tests` / `entry_point` columns ('tests' may be a JSON string). Rows without tests
  score 0 (a mixed dataset); neither column at all is a configuration error.
  """
  started = time.perf_counter()
  score(["passed"], scoring)  # checks `scoring` before any run
  if example is None and tests is None:
    raise ValueError("the code reward needs test cases: an `example` column of problems "
                     "with 'tests', or a `tests` column (see r1jax.rl.code)")
  n = len(completions)
  problems = [_row_problem(i, example, tests, entry_point) for i in range(n)]
  programs = [extract_program(c) if p is not None else None
              for c, p in zip(completions, problems)]
  outcomes, n_runs = run_programs(programs, problems)
  counts = collections.Counter(o for row in outcomes if row for o in row)
  _count(counts, n_completions=sum(p is not None for p in problems), n_runs=n_runs,
         n_no_program=sum(p is not None and q is None for p, q in zip(problems, programs)),
         seconds=time.perf_counter() - started)
  return [score(row, scoring) if row else 0.0 for row in outcomes]


def check(answer_text: str, problem: dict, scoring: str = "all",
          box: sandbox_lib.Sandbox | None = None) -> float:
  """Score of one answer on one problem (tasks.verify for the 'code' task uses it)."""
  outcomes, _ = run_programs([extract_program(answer_text)], [problem], box)
  return score(outcomes[0], scoring) if outcomes[0] else 0.0


def _row_problem(i, example, tests, entry_point) -> dict | None:
  if example is not None:
    row = example[i] if isinstance(example[i], dict) else {}
  else:
    row = {"tests": tests[i], "entry_point": entry_point[i] if entry_point is not None else None}
  row_tests = row.get("tests")
  if isinstance(row_tests, str):  # a JSON column (Parquet, CSV)
    row_tests = json.loads(row_tests) if row_tests.strip() else None
  return {**row, "tests": row_tests} if row_tests else None
