"""Code rewards and their sandbox: extraction, schema, scoring, and hostile programs.

Hostile programs run under small limits (1 s, 256 MB, 4 processes); the fork bomb runs
only after a bounded check that RLIMIT_NPROC binds. After every hostile run the test
asserts that nothing the sandbox started is still alive.
"""

import collections
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from r1jax.data import tasks
from r1jax.rl import code, rewards, sandbox

LIMITS = sandbox.Limits(timeout_s=1.0, memory_mb=256, max_processes=4,
                        max_output_bytes=4096, disk_mb=8)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _host_can_isolate() -> bool:
  """Whether this host lets us create the namespaces (checked without the sandbox, so a
  broken sandbox fails the tests instead of skipping them)."""
  flags = sandbox.CLONE_NEWNS | sandbox.CLONE_NEWNET | sandbox.CLONE_NEWPID
  if os.geteuid() != 0:
    flags |= sandbox.CLONE_NEWUSER
  probe = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
           f"raise SystemExit(0 if libc.unshare({flags}) == 0 else 1)")
  return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


def descendants(root: int) -> list[int]:
  """Every live process under `root` (zombies included)."""
  children = collections.defaultdict(list)
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      children[ppid].append(int(name))
  found, todo = [], [root]
  while todo:
    for child in children[todo.pop()]:
      found.append(child)
      todo.append(child)
  return found


# Descendants of this process alive when the current test started (e.g. the reward
# verifier pool an earlier test of the same pytest worker left running): not the test's.
_STARTED_BEFORE = set()


@pytest.fixture(autouse=True)
def _note_earlier_processes():
  _STARTED_BEFORE.clear()
  _STARTED_BEFORE.update(descendants(os.getpid()))


def assert_all_gone(box, timeout_s: float = 3.0) -> None:
  """Nothing the sandbox started is alive: no descendant of ours that the test started,
  no process of a sandbox uid (root mode)."""
  deadline = time.monotonic() + timeout_s
  while True:
    left = [p for p in descendants(os.getpid()) if p not in _STARTED_BEFORE]
    if os.geteuid() == 0:
      for slot in range(box.n_workers):
        left += sandbox.processes_of(box.uid_base + slot)
    if not left or time.monotonic() > deadline:
      break
    time.sleep(0.05)
  assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def box():
  if not _host_can_isolate():
    pytest.skip("this host cannot create namespaces (the refusal has its own test)")
  sb = sandbox.Sandbox(LIMITS, n_workers=2)
  facts = sb.check()  # on a host that can isolate, the sandbox must not refuse
  assert sb.mode == "namespaces", facts
  yield sb
  sb.close()


@pytest.fixture(scope="module")
def shared_sandbox(box):
  """The module-level sandbox behind the 'code' reward, with the test limits."""
  code.configure(n_workers=2, **dataclasses.asdict(LIMITS))
  yield code.get_sandbox()
  code.configure(**dataclasses.asdict(sandbox.Limits()))


def run1(box, program, stdin="", **kw):
  """One stdin test -> its TestRun."""
  result = box.run(program, [{"stdin": stdin}])
  return result.tests[0]


# ----------------------------------------------------------------------- extraction

@pytest.mark.parametrize("completion,program", [
    ("<think>t</think><answer>```python\nprint(1)\n```</answer>", "print(1)"),
    ("<answer>```\nprint(1)\n```</answer>", "print(1)"),
    ("<answer>```py\nprint(1)\n```\nthen\n```python\nprint(2)\n```</answer>", "print(2)"),
    ("<answer>```python\nprint(1)\n```\n```text\n1\n```</answer>", "print(1)"),  # python wins
    ("<answer>```bash\nls\n```</answer>", "ls"),                 # else the last block
    ("<answer>print(3)</answer>", "print(3)"),                   # the answer itself
    ("<answer>\n    x = 1\n    print(x)\n</answer>", "x = 1\nprint(x)"),  # dedented
    ("```python\nprint(4)\n```", "print(4)"),                    # no tags: whole text
    ("<answer>```python\nprint(5)\n</answer>", "print(5)"),      # unclosed fence
    ("<answer>```python\nold\n```</answer> <answer>print(6)</answer>", "print(6)"),
    ("<answer></answer>", None), ("<answer>```python\n```</answer>", None), (None, None),
    ("<answer>" + "x = 1\n" * 5000 + "</answer>", None),       # over MAX_PROGRAM_CHARS
])
def test_extract_program(completion, program):
  assert code.extract_program(completion) == program


# -------------------------------------------------------------------- schema, loader

GOOD = {"prompt": "add", "entry_point": "f",
        "tests": [{"args": [1, 2], "expected": 3}, {"input": "1 2", "output": "3"},
                  {"assert": "assert f(1, 1) == 2"}]}


@pytest.mark.parametrize("row,message", [
    ([], "expected a JSON object"),
    ({"tests": GOOD["tests"]}, "'prompt' must be"),
    ({"prompt": "p", "tests": []}, "'tests' must be a non-empty list"),
    ({"prompt": "p", "tests": [{"input": "1"}]}, "exactly one of"),
    ({"prompt": "p", "tests": [{"input": "1", "output": "2", "args": []}]}, "exactly one of"),
    ({"prompt": "p", "tests": [{"input": 1, "output": "2"}]}, "must be strings"),
    ({"prompt": "p", "tests": [{"args": 1, "expected": 2}], "entry_point": "f"}, "must be a list"),
    ({"prompt": "p", "tests": [{"args": [1], "expected": 2}]}, "need 'entry_point'"),
    ({"prompt": "p", "tests": [{"args": [1], "expected": 2}], "entry_point": "f x"}, "entry_point"),
    ({**GOOD, "answer": 3}, "reference solution"),
])
def test_validate_problem_rejects_with_clear_errors(row, message):
  with pytest.raises(code.ProblemError, match=message):
    code.validate_problem(row, "row")


def test_load_problems(tmp_path):
  path = tmp_path / "problems.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "b", "extra": 1}) + "\n")
  problems = code.load_problems(str(path))
  assert [p["task"] for p in problems] == ["code", "code"]
  assert problems[0]["id"].startswith("code-") and problems[1]["extra"] == 1
  path.write_text(json.dumps(GOOD) + "\n{not json\n")
  with pytest.raises(code.ProblemError, match=r"problems.jsonl:2: not valid JSON"):
    code.load_problems(str(path))
  path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
  with pytest.raises(code.ProblemError, match=r":2: id .* repeats line 1"):
    code.load_problems(str(path))
  path.write_text("\n")
  with pytest.raises(code.ProblemError, match="no problems"):
    code.load_problems(str(path))


def test_comparisons():
  assert code.normalize_output("1 \r\n2\n\n") == code.normalize_output("1\n2")
  assert code.normalize_output(" 1") != code.normalize_output("1")
  assert code.values_equal([1, 0.1 + 0.2, {"a": [2]}], [1, 0.3, {"a": [2]}])
  assert not code.values_equal(True, 1) and not code.values_equal([1], [1, 1])
  assert not code.values_equal("1", 1) and not code.values_equal(1.1, 1)


# --------------------------------------------------------------------------- scoring

SUM_IO = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}]}
EVENS = {"entry_point": "f", "tests": [
    {"args": [[1, 2, 3, 4]], "expected": 6}, {"args": [[]], "expected": 0},
    {"args": [[-2, 7]], "expected": -2}, {"args": [[1, 3]], "expected": 0}]}


def test_correct_and_incorrect_programs(box):
  sum_io = "print(sum(map(int, input().split())))"
  assert code.check(f"<answer>```python\n{sum_io}\n```</answer>", SUM_IO, box=box) == 1.0
  assert code.check("<answer>print(3)</answer>", SUM_IO, "fraction", box=box) == 0.5
  assert code.check("<answer>print(input())</answer>", SUM_IO, box=box) == 0.0
  evens = "def f(xs):\n  return sum(x for x in xs if x % 2 == 0)"
  assert code.check(evens, EVENS, box=box) == 1.0
  assert code.check("def f(xs):\n  return sum(xs)", EVENS, box=box) == 0.0
  assert code.check("def g(xs):\n  return 0", EVENS, box=box) == 0.0  # wrong name
  asserts = {"tests": [{"assert": "assert f([2]) == 2"}, {"assert": "assert f([3]) == 0"}]}
  assert code.check(evens, asserts, box=box) == 1.0
  assert code.check("def f(xs):\n  return 2", asserts, "fraction", box=box) == 0.5


def test_partial_credit_and_all_or_nothing(box):
  half = "def f(xs):\n  return 0 if len(xs) < 2 else 6"  # passes the first two tests
  assert code.check(half, EVENS, "fraction", box=box) == 0.5
  assert code.check(half, EVENS, "all", box=box) == 0.0
  with pytest.raises(ValueError, match="scoring="):
    code.score(["passed"], "most")


def test_call_values_are_compared_outside_and_must_be_json(box):
  # An object that equals everything cannot pass: only its JSON leaves the sandbox.
  cheat = "class A:\n  def __eq__(self, o): return True\ndef f(xs):\n  return A()"
  assert code.check(cheat, EVENS, "fraction", box=box) == 0.0
  floats = {"entry_point": "f", "tests": [{"args": [], "expected": 0.3}]}
  assert code.check("def f():\n  return 0.1 + 0.2", floats, box=box) == 1.0


def test_results_keep_input_order_and_the_pool_is_bounded(box):
  jobs = [(f"import time\ntime.sleep({0.3 if i % 3 == 0 else 0})\nprint({i})", [{"stdin": ""}])
          for i in range(8)]
  box.max_in_flight = 0
  results = box.run_many(jobs)
  assert [r.tests[0].stdout for r in results] == [f"{i}\n" for i in range(8)]
  assert box.max_in_flight == box.n_workers  # in parallel, never more


# ------------------------------------------------------------------ hostile programs

def test_infinite_loop_times_out(box):
  started = time.monotonic()
  result = box.run("while True:\n  pass", [{"stdin": ""}, {"stdin": ""}, {"stdin": ""}])
  assert [t.status for t in result.tests] == ["timeout"] * 3  # later ones skipped
  assert time.monotonic() - started < LIMITS.timeout_s + 3
  started = time.monotonic()
  run = run1(box, "import time\ntime.sleep(60)")  # wall clock, not only CPU time
  assert run.status == "timeout" and time.monotonic() - started < LIMITS.timeout_s + 2
  assert_all_gone(box)


FORK_COUNT = """
import os, time
n = 0
for _ in range(20):
  try:
    pid = os.fork()
  except OSError:
    break
  if pid == 0:
    time.sleep(30)
    os._exit(0)
  n += 1
print(n)
"""

FORK_BOMB = """
import os
while True:
  try:
    os.fork()
  except OSError:
    pass
"""


def test_fork_bomb_is_bounded_and_cleaned_up(box):
  # First, bounded: the process limit must bind (20 sleepers asked, 3 allowed besides
  # the program), and the sleepers must die with the test, long before their 30 s.
  run = run1(box, FORK_COUNT)
  assert run.status == "ran" and int(run.stdout) == LIMITS.max_processes - 1, run
  assert_all_gone(box)
  # Only then the bomb.
  before = len([p for p in os.listdir("/proc") if p.isdigit()])
  run = run1(box, FORK_BOMB)
  assert run.status == "timeout"
  assert_all_gone(box)
  after = len([p for p in os.listdir("/proc") if p.isdigit()])
  assert after <= before + 20  # a shared machine: others may start a few meanwhile


def test_memory_blow_up(box):
  assert run1(box, "x = ' ' * 10**10").status == "memory"
  # Growing: ~250 MB of pages are touched before the limit, slow on a loaded machine.
  roomy = sandbox.Sandbox(dataclasses.replace(LIMITS, timeout_s=5.0), n_workers=1)
  roomy._mode = box.mode
  assert run1(roomy, "x = []\nwhile True:\n  x.append(bytearray(10**7))").status == "memory"
  assert_all_gone(roomy)


def test_huge_output_is_capped(box):
  run = run1(box, "while True:\n  print('x' * 1000)")
  assert run.status == "output_limit" and len(run.stdout) <= LIMITS.max_output_bytes
  assert run1(box, "import sys\nsys.stderr.write('y' * 10**6)").status == "output_limit"
  assert run1(box, "open('big', 'w').write('z' * 10**6)").status == "output_limit"
  assert run1(box, "print('ok')").stdout == "ok\n"  # and the sandbox carries on


def test_writing_outside_is_impossible_or_confined(box, tmp_path):
  token = uuid.uuid4().hex
  targets = [f"/tmp/r1jax-pwned-{token}", f"{REPO}/pwned-{token}", str(tmp_path / token),
             os.path.expanduser(f"~/pwned-{token}"), f"/pwned-{token}"]
  program = (f"for path in {targets!r}:\n  try:\n    open(path, 'w').write('x')\n"
             "    print('wrote', path)\n  except OSError as e:\n    print('failed', path)")
  run = run1(box, program)
  assert run.status == "ran" and run.stdout.count("\n") == len(targets)
  for path in targets:
    assert not os.path.exists(path), path


def test_deleting_files_outside_is_impossible(box, tmp_path):
  sentinel = tmp_path / "sentinel.txt"
  sentinel.write_text("keep me")
  os.chmod(tmp_path, 0o777)  # even a world-writable folder is out of reach
  program = ("import os, shutil\n"
             f"for act in (lambda: os.remove({str(sentinel)!r}),\n"
             f"            lambda: shutil.rmtree({str(tmp_path)!r}),\n"
             f"            lambda: os.system('rm -rf {tmp_path}')):\n"
             "  try:\n    act()\n  except OSError as e:\n    print('failed', e.errno)")
  assert run1(box, program).status == "ran"
  assert sentinel.read_text() == "keep me"


def test_environment_secrets_do_not_reach_the_program(box, monkeypatch):
  monkeypatch.setenv("R1JAX_FAKE_SECRET", "s3cr3t-token-value")
  program = ("import os\nprint(dict(os.environ))\n"
             f"for pid in os.listdir('/proc') + ['{os.getpid()}']:\n"
             "  try:\n    print(open(f'/proc/{pid}/environ', 'rb').read())\n"
             "  except OSError:\n    pass")
  run = run1(box, program)
  assert run.status == "ran" and "PATH" in run.stdout
  assert "s3cr3t-token-value" not in run.stdout + run.stderr
  assert os.environ["R1JAX_FAKE_SECRET"] == "s3cr3t-token-value"  # it was there to steal


def test_network_is_unreachable(box):
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.settimeout(0.5)
  port = server.getsockname()[1]
  program = ("import socket\n"
             f"for address in [('127.0.0.1', {port}), ('8.8.8.8', 53)]:\n"
             "  s = socket.socket()\n  s.settimeout(0.5)\n"
             "  try:\n    s.connect(address)\n    print('connected')\n"
             "  except OSError as e:\n    print('failed', e.errno)")
  run = run1(box, program)
  with pytest.raises(socket.timeout):
    server.accept()
  server.close()
  assert run.status == "ran" and run.stdout.count("failed") == 2 and "connected" not in run.stdout


def test_program_cannot_signal_the_trainer(box):
  me = os.getpid()
  program = ("import os, signal\n"
             f"for pid in ({me}, os.getppid(), -1, 1):\n"
             "  try:\n    os.kill(pid, signal.SIGKILL)\n    print('sent', pid)\n"
             "  except OSError as e:\n    print('failed', pid, e.errno)")
  result = box.run(program, [{"stdin": ""}, {"stdin": ""}])
  assert f"failed {me}" in result.tests[0].stdout  # not visible (pid namespace) / not ours
  assert [t.status for t in result.tests] == ["ran", "ran"]  # the harness survived too
  assert os.getpid() == me  # and so did we


TAMPER = """
import os
print(sorted(os.listdir('.')))
for k in ('in', 'out', 'err', 'res', 'scratch'):
  try:
    os.mkfifo(f'.t1.{k}')
  except OSError:
    pass
try:
  open('fill', 'wb').write(b'x' * 4000)
  os.chmod('.', 0o500)
except OSError:
  pass
print('done')
"""


def test_harness_survives_tampering_with_its_folder(box):
  result = box.run(TAMPER, [{"stdin": ""}] * 3)  # the next tests see the damage
  assert [t.status for t in result.tests] == ["ran"] * 3, result
  assert result.tests[0].stdout == "['solution.py']\ndone\n"  # no harness files in sight
  assert all(t.stdout.endswith("done\n") for t in result.tests)


def test_killed_launcher_takes_the_whole_run_down(box):
  """The trainer-side safety net: SIGKILL on the launcher ends every sandboxed process."""
  program = "import os, time\nif os.fork() == 0:\n  os.setsid()\ntime.sleep(60)"
  slow = sandbox.Sandbox(dataclasses.replace(LIMITS, timeout_s=60), n_workers=1)
  slow._mode = "namespaces"
  outcome = {}
  worker = threading.Thread(target=lambda: outcome.update(r=slow.run(program, [{"stdin": ""}])))
  worker.start()
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and len(descendants(os.getpid())) < 4:
    time.sleep(0.05)  # launcher, harness, program, its setsid child
  launcher = [p for p in descendants(os.getpid())
              if "sandbox.py" in open(f"/proc/{p}/cmdline").read()][0]
  os.kill(launcher, signal.SIGKILL)
  worker.join(10)
  assert not worker.is_alive() and outcome["r"].tests[0].status == "sandbox_error"
  assert_all_gone(slow)


def test_collect_kills_on_deadline():
  proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)
  started = time.monotonic()
  _, _, killed = sandbox._collect(proc, time.monotonic() + 0.3, 100)
  assert killed == "timeout" and proc.returncode == -signal.SIGKILL
  assert time.monotonic() - started < 5


# ----------------------------------------------------------- rewards, metrics, tasks

HOSTILE = {
    "timeout": "while True:\n  pass",
    "memory": "x = ' ' * 10**10",
    "output_limit": "print('x' * 10**6)",
    "crash": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
    "error": "raise ValueError('no')",
}


def test_code_reward_scores_and_counts_failures(shared_sandbox):
  problem = {"prompt": "sum", **SUM_IO}
  completions = ["<answer>print(sum(map(int, input().split())))</answer>", "<answer></answer>"]
  completions += [f"<answer>{p}</answer>" for p in HOSTILE.values()]
  before = code.code_stats()
  scores = rewards.REWARD_FUNCTIONS["code"](["sum"] * len(completions), completions,
                                            example=[problem] * len(completions))
  delta = code.code_stats() - before
  assert scores == [1.0] + [0.0] * (len(completions) - 1)
  assert delta.n_completions == len(completions) and delta.n_no_program == 1
  assert delta.n_passed == 2 and delta.n_tests == 2 * (len(completions) - 1)
  for outcome in HOSTILE:  # the timeout skips the second test: 2 of each
    assert getattr(delta, f"n_{outcome}") == 2, (outcome, delta)


def test_registry_columns_and_dedup(shared_sandbox):
  weights, fns = rewards.resolve("code:1,code_all:0.5")
  right = "<answer>def f(xs):\n  return sum(x for x in xs if x % 2 == 0)</answer>"
  half = "<answer>def f(xs):\n  return 0 if len(xs) < 2 else 6</answer>"
  before = code.code_stats()
  total, per_fn = rewards.combine_rewards(
      weights, fns, ["p"] * 4, [right, right, half, right], tests=[json.dumps(EVENS["tests"])] * 4,
      entry_point=["f"] * 4)
  assert per_fn["code"] == [1.0, 1.0, 0.5, 1.0] and per_fn["code_all"] == [1.0, 1.0, 0.0, 1.0]
  assert total == [1.5, 1.5, 0.5, 1.5]
  assert (code.code_stats() - before).n_runs <= 2  # 2 distinct programs, run once each
  with pytest.raises(ValueError, match="needs test cases"):
    fns["code"](["p"], [right], answer=["1"])
  # a mixed batch: rows without tests score 0; tests may come as JSON text
  mixed = [{"prompt": "1+1", "answer": "2"}, {**EVENS, "tests": json.dumps(EVENS["tests"])}]
  assert fns["code"](["p", "p"], [right, right], example=mixed) == [0.0, 1.0]
  assert fns["code"](["p"], [right], example=mixed[:1]) == [0.0]


def test_generated_code_tasks_verify_in_the_sandbox(shared_sandbox):
  examples = tasks.generate("code", 6, seed=0) + tasks.generate("code", 3, seed=0, split="test",
                                                                  maps=2, aggs="max,min")
  for e in examples:
    assert {"tests", "entry_point", "answer"} <= set(e) and len(e["prompt"]) < 40
    assert tasks.verify(e["answer"], e), e
    assert tasks.verify(f"<think>{e['trace']}</think><answer>{e['answer']}</answer>", e)
    assert not tasks.verify("def f(xs):\n  return None", e)
  with pytest.raises(ValueError, match="aggs="):
    tasks.generate("code", 1, 0, aggs="sum,avg")
  with pytest.raises(ValueError, match="maps must be"):
    tasks.generate("code", 1, 0, maps=3)


def test_refuses_without_namespaces_unless_allowed(monkeypatch):
  monkeypatch.setattr(sandbox.Sandbox, "_probe",
                      lambda self, mode: ({}, ["no namespaces here (simulated)"]))
  with pytest.raises(sandbox.SandboxUnavailable, match="allow_unsandboxed=True"):
    sandbox.Sandbox(LIMITS).run("print(1)", [{"stdin": ""}])
  python = "/usr/bin/python3"
  if os.geteuid() == 0 and not sandbox._world_readable(os.path.realpath(sys.executable)):
    with pytest.raises(sandbox.SandboxUnavailable, match="python="):
      sandbox.Sandbox(LIMITS, allow_unsandboxed=True).check()
    if not (os.path.exists(python) and sandbox._world_readable(os.path.realpath(python))):
      pytest.skip("no interpreter an unprivileged uid can run")
  else:
    python = sys.executable
  weak = sandbox.Sandbox(LIMITS, n_workers=1, allow_unsandboxed=True, python=python)
  assert weak.mode == "none" and "simulated" in weak.facts["fallback_reason"]
  result = weak.run("print(sum(map(int, input().split())))", [{"stdin": "2 3"}])
  assert result.tests[0].stdout == "5\n"
  assert weak.run("while True:\n  pass", [{"stdin": ""}]).tests[0].status == "timeout"
  assert_all_gone(weak)
