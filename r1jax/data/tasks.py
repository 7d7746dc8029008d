"""Synthetic tasks with rule-checkable answers: arithmetic, Countdown, linear, code.

R1-Zero's reward is rule based (DeepSeek-R1 paper, Section 2.2: "accuracy rewards
evaluate whether the response is correct" by a deterministic check), which needs tasks
whose answers a program can verify. These three are small enough for the tiny CPU model
and have the shape of the paper's math prompts: a question, a checkable final answer.

An example is a dict {'id', 'task', 'prompt', 'answer', 'trace', ...task fields}. The
'trace' is a short reference chain of thought (column sums, elimination steps) used by
SFT / cold start; it is written in steps a 2-layer character model can imitate.

Train and test are disjoint by construction: a hash of the canonical problem (e.g.
"37+48", or the sorted Countdown numbers with the target) puts every problem in exactly
one split, whatever the seed, n or difficulty.

'code' examples are function-synthesis problems, f(xs) = AGG(MAP(x) for x in xs if
PRED(x)), with generated call tests ('tests', 'entry_point': the schema of
r1jax.rl.code) and a reference solution as 'answer'; they are checked by running the
answer in the sandbox (r1jax.rl.sandbox), so their verifier is not pure.

CLI:
  python -m r1jax.data.tasks write --task arithmetic --n_train 1000 --n_test 100 --out DIR
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import os
import random
import re
import sys
from fractions import Fraction

TASKS = ("arithmetic", "countdown", "linear", "code")
TEST_FRACTION = 0.1  # share of each task's problem space that belongs to 'test'

DIFFICULTY = {
    # operands have min_digits..max_digits digits; ops from "+-*"
    "arithmetic": dict(max_digits=2, min_digits=1, ops="+-"),
    # TinyZero's Countdown: 3-4 numbers, each used exactly once, +-*/ and parentheses
    "countdown": dict(min_numbers=3, max_numbers=4, max_number=20, max_target=100),
    # a*x + b = c with integer x
    "linear": dict(max_coef=9, max_x=9, max_const=20),
    # f(xs) = AGG(MAP(x) for x in xs if PRED(x)): aggregations from `aggs`, maps up to
    # level `maps` (0: x; 1: x*x, 2*x, 3*x, -x; 2: 2*x+1, 3*x-1, abs(x), x*x-x),
    # predicates x%k==r (k <= max_mod) or x>t / x<t (|t| <= max_threshold); n_tests
    # lists of up to max_len integers in [-max_value, max_value]
    "code": dict(aggs="sum,count,max,min", maps=1, max_mod=6, max_threshold=9, n_tests=5,
                 max_len=6, max_value=9),
}


# ------------------------------------------------------------------------ generation

def generate(task: str, n: int, seed: int, split: str = "train", **difficulty) -> list[dict]:
  """n distinct problems of `task` from `split`; the same arguments give the same list."""
  knobs = difficulty_knobs(task, difficulty)
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}: choose 'train' or 'test'")
  rng = random.Random(f"{task}:{seed}:{split}")  # str seeds hash stably across runs
  examples, seen = [], set()
  attempts, max_attempts = 0, 100 * n + 10_000
  while len(examples) < n:
    attempts += 1
    if attempts > max_attempts:
      raise ValueError(f"found only {len(examples)} distinct {split} problems of {task} with "
                       f"{knobs} after {max_attempts} draws: ask for fewer or raise the difficulty")
    sampled = _SAMPLERS[task](rng, **knobs)
    if sampled is None:
      continue
    canonical, example = sampled
    digest = _digest(task, canonical)
    if digest in seen or split_of(task, canonical) != split:
      continue
    seen.add(digest)
    examples.append({"id": f"{task}-{digest[:12]}", "task": task, **example})
  return examples


def split_of(task: str, canonical: str) -> str:
  """'train' or 'test': decided by the problem alone, so no problem is in both."""
  return "test" if int(_digest(task, canonical)[:8], 16) < TEST_FRACTION * 16**8 else "train"


def difficulty_knobs(task: str, overrides: dict) -> dict:
  """The task's default knobs updated by `overrides`, checked."""
  if task not in TASKS:
    raise ValueError(f"task {task!r}: choose one of {TASKS}")
  unknown = set(overrides) - set(DIFFICULTY[task])
  if unknown:
    raise ValueError(f"{task} has no difficulty knob {sorted(unknown)}; "
                     f"its knobs are {DIFFICULTY[task]}")
  knobs = {**DIFFICULTY[task], **overrides}
  problems = []
  if task == "arithmetic":
    if not 1 <= knobs["min_digits"] <= knobs["max_digits"]:
      problems.append("need 1 <= min_digits <= max_digits")
    if not knobs["ops"] or set(knobs["ops"]) - set("+-*"):
      problems.append(f"ops={knobs['ops']!r}: use a non-empty string of '+', '-', '*'")
  elif task == "countdown":
    if not 2 <= knobs["min_numbers"] <= knobs["max_numbers"] <= 6:
      problems.append("need 2 <= min_numbers <= max_numbers <= 6")
    if knobs["max_number"] < 2 or knobs["max_target"] < 1:
      problems.append("need max_number >= 2 and max_target >= 1")
  elif task == "code":
    problems.extend(_code_knob_problems(knobs))
  else:
    if knobs["max_coef"] < 1 or knobs["max_x"] < 0 or knobs["max_const"] < 0:
      problems.append("need max_coef >= 1, max_x >= 0, max_const >= 0")
  if problems:
    raise ValueError(f"{task} difficulty {knobs}: " + "; ".join(problems))
  return knobs


def _digest(task: str, canonical: str) -> str:
  return hashlib.sha256(f"{task}:{canonical}".encode()).hexdigest()


def _sample_arithmetic(rng, max_digits, min_digits, ops):
  op = rng.choice(ops)
  a, b = (_number_with_digits(rng, rng.randint(min_digits, max_digits)) for _ in range(2))
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  problem = f"{a}{op}{b}"
  return problem, {"prompt": problem, "answer": str(value), "trace": _arithmetic_trace(a, op, b)}


def _number_with_digits(rng, digits: int) -> int:
  return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arithmetic_trace(a: int, op: str, b: int) -> str:
  """Schoolbook steps, ones column first.

  37+48 -> "7+8=15 c1 3+4+1=8"     (column sums, c1 = carry)
  85-37 -> "15-7=8 b1 8-3-1=4"     (column differences, b1 = borrow)
  37-85 -> "-(85-37) 15-7=8 b1 8-3-1=4"
  37*48 -> "37*8=296 37*40=1480 296+1480=1776"
  """
  if op == "+":
    return _column_steps(a, b, add=True)
  if op == "-":
    if a >= b:
      return _column_steps(a, b, add=False)
    return f"-({b}-{a}) " + _column_steps(b, a, add=False)
  partials = [(a * d * 10**i, f"{a}*{d * 10**i}") for i, d in enumerate(_digits(b)) if d]
  partials = partials or [(0, f"{a}*0")]
  steps = [f"{name}={value}" for value, name in partials]
  if len(partials) > 1:
    steps.append("+".join(str(v) for v, _ in partials) + f"={a * b}")
  return " ".join(steps)


def _digits(x: int) -> list[int]:
  """Decimal digits of x >= 0, ones first."""
  return [int(c) for c in reversed(str(x))]


def _column_steps(a: int, b: int, add: bool) -> str:
  da, db = _digits(a), _digits(b)
  width = max(len(da), len(db))
  da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
  steps, carry = [], 0
  for i in range(width):
    last = i == width - 1
    if add:
      total = da[i] + db[i] + carry
      step = f"{da[i]}+{db[i]}" + (f"+{carry}" if carry else "") + f"={total}"
      carry = total // 10
      marker = "c1"
    else:
      borrow = int(da[i] - db[i] - carry < 0)
      total = da[i] + 10 * borrow - db[i] - carry
      step = f"{da[i] + 10 * borrow}-{db[i]}" + (f"-{carry}" if carry else "") + f"={total}"
      carry = borrow
      marker = "b1"
    steps.append(step + (f" {marker}" if carry and not last else ""))
  return " ".join(steps)


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _sample_countdown(rng, min_numbers, max_numbers, max_number, max_target):
  """Combines the numbers left to right with random ops into a target; None to redraw.

  Intermediate values stay positive integers (division only when exact), as in the
  usual Countdown rules, so every trace step is integer arithmetic.
  """
  numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
  order = rng.sample(numbers, len(numbers))
  value, expression, top_op, steps = order[0], str(order[0]), None, []
  for x in order[1:]:
    ops = ["+", "*"] + (["-"] if value > x else []) + (["/"] if x > 1 and value % x == 0 else [])
    op = rng.choice(ops)
    new = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
    steps.append(f"{value}{op}{x}={new}")
    left = f"({expression})" if top_op and _PRECEDENCE[top_op] < _PRECEDENCE[op] else expression
    expression, top_op, value = f"{left}{op}{x}", op, new
  if not 1 <= value <= max_target:
    return None
  shown = rng.sample(numbers, len(numbers))  # the prompt's order does not give the solution away
  canonical = ",".join(map(str, sorted(numbers))) + f"->{value}"
  return canonical, {
      "prompt": f"Use {' '.join(map(str, shown))} to make {value}",
      "answer": expression, "trace": " ".join(steps), "numbers": shown, "target": value}


def _sample_linear(rng, max_coef, max_x, max_const):
  a = rng.choice([k for k in range(-max_coef, max_coef + 1) if k])
  x, b = rng.randint(-max_x, max_x), rng.randint(-max_const, max_const)
  c = a * x + b
  ax = {1: "x", -1: "-x"}.get(a, f"{a}x")
  equation = ax + (f"{b:+d}" if b else "") + f"={c}"
  # "3x+5=20" -> "3x=20-5=15 x=15/3=5": move the constant, then divide.
  steps = []
  if b:
    steps.append(f"{ax}={c}{'-' if b > 0 else '+'}{abs(b)}={c - b}")
  if a != 1:
    steps.append(f"x={c - b}/{a}={x}")
  return f"{a}x{b:+d}={c}", {
      "prompt": f"Solve {equation}", "answer": str(x), "trace": " ".join(steps) or f"x={x}",
      "equation": equation}


_CODE_AGGS = ("sum", "count", "max", "min")
_CODE_MAPS = {  # text -> (level, function); the text is the Python the answer uses
    "x": (0, lambda x: x), "x*x": (1, lambda x: x * x), "2*x": (1, lambda x: 2 * x),
    "3*x": (1, lambda x: 3 * x), "-x": (1, lambda x: -x), "2*x+1": (2, lambda x: 2 * x + 1),
    "3*x-1": (2, lambda x: 3 * x - 1), "abs(x)": (2, abs), "x*x-x": (2, lambda x: x * x - x)}


def _code_knob_problems(knobs) -> list[str]:
  problems = []
  aggs = str(knobs["aggs"]).split(",")
  if not aggs or set(aggs) - set(_CODE_AGGS):
    problems.append(f"aggs={knobs['aggs']!r}: a comma-separated subset of {_CODE_AGGS}")
  if knobs["maps"] not in (0, 1, 2):
    problems.append("maps must be 0, 1 or 2")
  if knobs["max_mod"] < 2 or knobs["max_threshold"] < 0 or knobs["max_value"] < 1:
    problems.append("need max_mod >= 2, max_threshold >= 0, max_value >= 1")
  if knobs["n_tests"] < 2 or knobs["max_len"] < 2:
    problems.append("need n_tests >= 2 and max_len >= 2")
  return problems


def _sample_code(rng, aggs, maps, max_mod, max_threshold, n_tests, max_len, max_value):
  """A function-synthesis problem with call tests; None to redraw (a predicate that no
  value in range, or every value, satisfies cannot tell solutions apart).

  Prompts stay under 40 characters ("f(xs): max of 3*x for x%4==1 or 0") for the char
  model; max and min of nothing are 0.
  """
  agg = rng.choice(str(aggs).split(","))
  mapped = "x" if agg == "count" else rng.choice(
      [text for text, (level, _) in _CODE_MAPS.items() if level <= maps])
  kind = rng.choice(["mod", "gt", "lt"])
  if kind == "mod":
    k = rng.randint(2, max_mod)
    r = rng.randint(0, k - 1)
    pred, keep = f"x%{k}=={r}", lambda x: x % k == r
  else:
    t = rng.randint(-max_threshold, max_threshold)
    pred, keep = (f"x>{t}", lambda x: x > t) if kind == "gt" else (f"x<{t}", lambda x: x < t)
  values = range(-max_value, max_value + 1)
  hits, misses = [v for v in values if keep(v)], [v for v in values if not keep(v)]
  if not hits or not misses:
    return None
  fn = _CODE_MAPS[mapped][1]
  tests = []
  for i in range(n_tests):  # the first list is empty; the others hit and miss the filter
    xs = [] if i == 0 else [rng.choice(values) for _ in range(rng.randint(0, max_len - 2))]
    if i:
      xs += [rng.choice(hits), rng.choice(misses)]
      rng.shuffle(xs)
    kept = [fn(x) for x in xs if keep(x)]
    expected = len(kept) if agg == "count" else ({"sum": sum, "max": max, "min": min}[agg](kept)
                                                 if kept else 0)
    tests.append({"args": [xs], "expected": expected})
  or_zero = " or 0" if agg in ("max", "min") else ""
  body = {"sum": f"sum({mapped} for x in xs if {pred})",
          "count": f"sum(1 for x in xs if {pred})",
          "max": f"max(({mapped} for x in xs if {pred}), default=0)",
          "min": f"min(({mapped} for x in xs if {pred}), default=0)"}[agg]
  steps = f"keep {pred}" + ("" if agg == "count" else f", map {mapped}") + f", {agg}"
  return f"{agg}|{mapped}|{pred}", {
      "prompt": f"f(xs): {agg} of {mapped} for {pred}{or_zero}",
      "answer": f"def f(xs):\n  return {body}\n",
      "trace": steps + (", none->0" if or_zero else ""), "entry_point": "f", "tests": tests}


_SAMPLERS = {"arithmetic": _sample_arithmetic, "countdown": _sample_countdown,
             "linear": _sample_linear, "code": _sample_code}


# ------------------------------------------------------------------------- verifiers
# Pure functions of (answer_text, example) -> bool. They never raise on any answer text
# and never evaluate it: Countdown expressions are walked as an `ast`.

_MAX_ANSWER_CHARS = 256  # longer answers are wrong; also bounds parse time and int sizes
_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(/[+-]?\d+)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(,\d{3})+")


def answer_span(text: str) -> str:
  """The inside of the last <answer>...</answer> when the text has one, else the text."""
  start = text.rfind("<answer>")
  if start < 0:
    return text.strip()
  inside = text[start + len("<answer>"):]
  end = inside.find("</answer>")
  return (inside if end < 0 else inside[:end]).strip()


def verify_arithmetic(answer_text: str, example: dict) -> bool:
  """True when the answer is the exact integer result ("85", "85.0", "1,776" accepted)."""
  text = _clean(answer_text)
  if text is None:
    return False
  if _GROUPED.fullmatch(text):
    text = text.replace(",", "")
  if not _INTEGER.fullmatch(text):
    return False
  return int(text.split(".")[0]) == int(example["answer"])


def verify_linear(answer_text: str, example: dict) -> bool:
  """True when the answer ("5", "x=5", "x = 5.0", "10/2") equals x within 1e-6."""
  text = _clean(answer_text)
  if text is None:
    return False
  text = re.sub(r"^x\s*=\s*", "", text)
  value = _parse_number(text)
  return value is not None and abs(value - Fraction(example["answer"])) <= Fraction(1, 10**6)


def verify_countdown(answer_text: str, example: dict) -> bool:
  """True when the answer is an expression of + - * / and parentheses over the example's
  numbers, each used exactly once, equal to the target within 1e-6."""
  text = _clean(answer_text)
  if text is None or not re.fullmatch(r"[\d\s+\-*/()]+", text):
    return False
  try:
    tree = ast.parse(text, mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return False
  used = []
  value = _evaluate(tree.body, used)
  if value is None:
    return False
  if collections.Counter(used) != collections.Counter(int(n) for n in example["numbers"]):
    return False
  return abs(value - Fraction(example["target"])) <= Fraction(1, 10**6)


def verify(answer_text: str, example: dict) -> bool:
  """Dispatches on example['task']."""
  task = example.get("task")
  if task not in VERIFIERS:
    raise ValueError(f"no verifier for task {task!r}: the tasks are {TASKS}")
  return VERIFIERS[task](answer_text, example)


def _clean(answer_text) -> str | None:
  if not isinstance(answer_text, str):
    return None
  text = answer_span(answer_text)
  return text if 0 < len(text) <= _MAX_ANSWER_CHARS else None


def _parse_number(text: str) -> Fraction | None:
  if not _NUMBER.fullmatch(text):
    return None
  try:
    return Fraction(text)
  except (ValueError, ZeroDivisionError):
    return None


_BINARY = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y,
           ast.Mult: lambda x, y: x * y, ast.Div: lambda x, y: x / y}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction | None:
  """Exact value of an expression of integer literals and + - * /, or None for anything
  else (names, calls, powers, unary signs, floats) and for division by zero."""
  if isinstance(node, ast.Constant):
    if type(node.value) is not int:
      return None
    used.append(node.value)
    return Fraction(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _evaluate(node.left, used), _evaluate(node.right, used)
    if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
      return None
    return _BINARY[type(node.op)](left, right)
  return None


def verify_code(answer_text: str, example: dict) -> bool:
  """True when the answer's program passes every test of the example, run in the
  sandbox (r1jax.rl.code; raises SandboxUnavailable where programs cannot be isolated)."""
  from r1jax.rl import code
  return code.check(answer_text, example, scoring="all") == 1.0


VERIFIERS = {"arithmetic": verify_arithmetic, "countdown": verify_countdown,
             "linear": verify_linear, "code": verify_code}


# ---------------------------------------------------------------------------------- CLI

def write_splits(task: str, n_train: int, n_test: int, out: str, seed: int = 0,
                 **difficulty) -> dict[str, str]:
  """Writes DIR/train.jsonl and DIR/test.jsonl; returns split -> path."""
  os.makedirs(out, exist_ok=True)
  paths = {}
  for split, n in (("train", n_train), ("test", n_test)):
    paths[split] = os.path.join(out, f"{split}.jsonl")
    with open(paths[split], "w", encoding="utf-8") as f:
      for example in generate(task, n, seed, split, **difficulty):
        f.write(json.dumps(example) + "\n")
  return paths


def _parse_knob(item: str) -> tuple[str, object]:
  if "=" not in item:
    raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE, e.g. max_digits=3")
  key, raw = item.split("=", 1)
  try:
    return key, int(raw)
  except ValueError:
    return key, raw


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m r1jax.data.tasks",
                                   description="Write synthetic verifiable tasks as JSONL.")
  commands = parser.add_subparsers(dest="command", required=True)
  write = commands.add_parser("write", help="write DIR/train.jsonl and DIR/test.jsonl")
  write.add_argument("--task", choices=TASKS, required=True)
  write.add_argument("--n_train", type=int, required=True)
  write.add_argument("--n_test", type=int, required=True)
  write.add_argument("--out", required=True, help="output folder")
  write.add_argument("--seed", type=int, default=0)
  write.add_argument("--difficulty", type=_parse_knob, nargs="*", default=[],
                     metavar="KEY=VALUE", help="e.g. max_digits=3 ops=+-*")
  args = parser.parse_args(argv)
  try:
    paths = write_splits(args.task, args.n_train, args.n_test, args.out, args.seed,
                         **dict(args.difficulty))
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {paths['train']} ({args.n_train}) and {paths['test']} ({args.n_test})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
