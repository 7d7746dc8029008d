"""Synthetic tasks: determinism, disjoint splits, verifiers (and what they reject), CLI."""

import json
import subprocess
import sys

import pytest

from r1jax.data import tasks

EXAMPLE_COUNTDOWN = {"task": "countdown", "numbers": [3, 5, 7], "target": 22, "answer": "3*5+7"}


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generation_is_deterministic_by_seed(task):
  a = tasks.generate(task, 50, seed=3)
  assert a == tasks.generate(task, 50, seed=3)
  assert a != tasks.generate(task, 50, seed=4)
  assert len({e["id"] for e in a}) == 50
  for e in a:
    assert {"id", "task", "prompt", "answer", "trace"} <= set(e) and e["task"] == task


@pytest.mark.parametrize("task", tasks.TASKS)
def test_train_and_test_are_disjoint_by_construction(task):
  train = tasks.generate(task, 600, seed=0, split="train")
  for seed in (0, 1):
    test = tasks.generate(task, 60, seed=seed, split="test")
    assert not {e["id"] for e in train} & {e["id"] for e in test}
  if task != "countdown":  # countdown ids cover the number order, prompts do not
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}


@pytest.mark.parametrize("task,knobs", [
    ("arithmetic", {}), ("arithmetic", {"max_digits": 3, "ops": "+-*"}),
    ("countdown", {}), ("countdown", {"min_numbers": 4, "max_number": 50}),
    ("linear", {}), ("linear", {"max_coef": 3, "max_x": 20})])
def test_every_reference_answer_verifies(task, knobs):
  for split in ("train", "test"):
    for e in tasks.generate(task, 200, seed=0, split=split, **knobs):
      assert tasks.verify(e["answer"], e), e
      assert tasks.verify(f"<think>{e['trace']}</think><answer>{e['answer']}</answer>", e)


def test_traces_and_prompts_are_short_for_the_char_model():
  for task in tasks.TASKS:
    examples = tasks.generate(task, 300, seed=0)
    assert max(len(e["prompt"]) for e in examples) < 40
    assert max(len(e["trace"]) for e in examples) <= 40


def test_arithmetic_traces():
  assert tasks._arithmetic_trace(37, "+", 48) == "7+8=15 c1 3+4+1=8"
  assert tasks._arithmetic_trace(85, "-", 37) == "15-7=8 b1 8-3-1=4"
  assert tasks._arithmetic_trace(37, "-", 85) == "-(85-37) 15-7=8 b1 8-3-1=4"
  assert tasks._arithmetic_trace(37, "*", 48) == "37*8=296 37*40=1480 296+1480=1776"
  assert tasks._arithmetic_trace(7, "+", 48) == "7+8=15 c1 0+4+1=5"


def test_countdown_trace_steps_reach_the_target():
  for e in tasks.generate("countdown", 100, seed=1):
    assert e["trace"].endswith(f"={e['target']}")
    assert len(e["trace"].split()) == len(e["numbers"]) - 1
    assert e["prompt"] == f"Use {' '.join(map(str, e['numbers']))} to make {e['target']}"


@pytest.mark.parametrize("answer,ok", [
    ("3*5+7", True), ("7+5*3", True), (" (5*3)+7 ", True), ("<answer>7+3*5</answer>", True),
    ("3*5+8", False),            # wrong number
    ("3*5+7+7-7", False),        # numbers reused
    ("3*7+1", False),            # a number missing (and 1 not given)
    ("5*5-3", False),            # 5 reused, 7 missing
    ("3*5+7.0", False),          # floats are not given numbers
    ("-(3-5*7)-(10)", False),    # unary minus
    ("__import__('os').system('true')", False),
    ("9**9**9", False), ("3**2+5+7", False),
    ("(3+5)//7", False), ("3*5+7=22", False), ("", False), ("(" * 300, False),
    ("7/(5-5)+3", False),        # division by zero
])
def test_verify_countdown(answer, ok):
  assert tasks.verify_countdown(answer, EXAMPLE_COUNTDOWN) is ok


def test_verify_countdown_exact_division_and_tolerance():
  example = {"task": "countdown", "numbers": [6, 4, 3], "target": 8}
  assert tasks.verify_countdown("6/3*4", example)
  assert tasks.verify_countdown("(6*4)/3", example)
  assert not tasks.verify_countdown("6/4*3", example)  # 4.5


@pytest.mark.parametrize("answer,ok", [
    ("85", True), (" 85 ", True), ("85.0", True), ("<answer>85</answer>", True), ("+85", True),
    ("86", False), ("8 5", False), ("85.5", False), ("eighty-five", False), ("85abc", False),
    ("", False), (None, False), ("9" * 300, False)])
def test_verify_arithmetic(answer, ok):
  assert tasks.verify_arithmetic(answer, {"task": "arithmetic", "answer": "85"}) is ok


def test_verify_arithmetic_negative_and_grouped():
  assert tasks.verify_arithmetic("-48", {"answer": "-48"})
  assert not tasks.verify_arithmetic("48", {"answer": "-48"})
  assert tasks.verify_arithmetic("1,776", {"answer": "1776"})
  assert not tasks.verify_arithmetic("17,76", {"answer": "1776"})


@pytest.mark.parametrize("answer,ok", [
    ("5", True), ("x=5", True), ("x = 5.0", True), ("10/2", True), ("<answer>5</answer>", True),
    ("-5", False), ("x=6", False), ("y=5", False), ("5/0", False), ("__import__('os')", False)])
def test_verify_linear(answer, ok):
  assert tasks.verify_linear(answer, {"task": "linear", "answer": "5"}) is ok


def test_verify_dispatches_and_rejects_unknown_tasks():
  assert tasks.verify("22", {"task": "arithmetic", "answer": "22"})
  assert not tasks.verify("3*5+7", {"task": "arithmetic", "answer": "22"})
  assert tasks.verify("3*5+7", EXAMPLE_COUNTDOWN)
  with pytest.raises(ValueError, match="no verifier"):
    tasks.verify("1", {"task": "poetry"})


def test_bad_difficulty_and_impossible_requests():
  with pytest.raises(ValueError, match="no difficulty knob"):
    tasks.generate("arithmetic", 1, 0, digits=3)
  with pytest.raises(ValueError, match="ops="):
    tasks.generate("arithmetic", 1, 0, ops="^")
  with pytest.raises(ValueError, match="choose one of"):
    tasks.generate("chess", 1, 0)
  with pytest.raises(ValueError, match="found only"):  # 1-digit addition has 100 problems
    tasks.generate("arithmetic", 200, 0, max_digits=1, ops="+")


def test_cli_writes_jsonl(tmp_path):
  out = tmp_path / "data"
  cmd = [sys.executable, "-m", "r1jax.data.tasks", "write", "--task", "linear", "--n_train", "30",
         "--n_test", "10", "--out", str(out), "--seed", "2", "--difficulty", "max_coef=3"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
  test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
  assert len(train) == 30 and len(test) == 10
  assert train == tasks.generate("linear", 30, seed=2, max_coef=3)
  assert all(tasks.verify(e["answer"], e) for e in train + test)
  bad = subprocess.run(cmd[:-1] + ["nonsense=1"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 1 and "no difficulty knob" in bad.stderr
  assert "Traceback" not in bad.stderr
