"""Reward functions: answer extraction and checking, timeouts, format, language, combining."""

import os
import time

import pytest

from r1jax.rl import rewards

TIMEOUT_S = 2.0  # short, so that the timeout paths keep the suite fast


@pytest.fixture(scope="module", autouse=True)
def verifier_pool():
  """One pool for the whole module: starting workers costs seconds."""
  settings = rewards.configure(timeout_s=TIMEOUT_S, n_workers=2)
  yield rewards.get_pool()
  rewards.shutdown_pool()
  rewards.configure(timeout_s=5.0)
  assert settings.n_workers == 2


def accuracy(completion, answer, **columns):
  columns = {k: [v] for k, v in columns.items()}
  return rewards.accuracy_reward(["Q"], [completion], answer=[answer], **columns)[0]


# --------------------------------------------------------------------------- accuracy

ACCURACY_TABLE = [
    # equivalent forms
    ("<answer>0.5</answer>", "1/2", 1.0),
    ("<answer>1/2</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
    ("<answer>\\frac12</answer>", "1/2", 1.0),
    ("<answer>3.0</answer>", "3", 1.0),
    ("<answer>x = 5</answer>", "5", 1.0),
    ("<answer>$x=5$</answer>", "5", 1.0),
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>\\sqrt{2}/2</answer>", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("<answer>4</answer>", "5", 0.0),
    ("<answer>-2</answer>", "2", 0.0),
    ("<answer>banana</answer>", "5", 0.0),
    ("<answer>Yes</answer>", "yes", 1.0),  # a non-math reference compares as text
    # \boxed, nested braces
    ("<think>so</think><answer>\\boxed{\\frac{3}{4}}</answer>", "3/4", 1.0),
    ("we get \\boxed{\\frac{1}{\\frac{1}{2}}} at the end", "2", 1.0),
    ("first \\boxed{7}, then corrected: \\boxed{8}", "8", 1.0),
    ("unbalanced \\boxed{\\frac{1}{2} but \\boxed{6}", "6", 1.0),
    # tags: the last complete <answer> wins; an empty one is no answer
    ("<answer>4</answer> wait <answer>5</answer>", "5", 1.0),
    ("<answer>5</answer> wait <answer>4</answer>", "5", 0.0),
    ("<answer></answer> 5", "5", 0.0),
    ("<answer>5", "5", 1.0),  # malformed: no complete block, the last number is 5
    ("</answer>5<answer>", "5", 1.0),
    ("The total is 12 apples and 15 pears", "15", 1.0),
    ("no number at all", "5", 0.0),
    # unicode: NFKC, so full-width digits and vulgar fractions are the same numbers
    ("<answer>５</answer>", "5", 1.0),
    ("<answer>½</answer>", "1/2", 1.0),
    ("<answer>\u22123</answer>", "-3", 1.0),
    ("<answer>٣</answer>", "3", 0.0),  # Arabic-Indic digit: not a number to math-verify
]


@pytest.mark.parametrize("completion,answer,expected", ACCURACY_TABLE)
def test_accuracy_table(completion, answer, expected):
  assert accuracy(completion, answer) == expected


def test_accuracy_batch_keeps_order_and_counts():
  before = rewards.reward_stats()
  completions = [c for c, _, _ in ACCURACY_TABLE]
  answers = [a for _, a, _ in ACCURACY_TABLE]
  got = rewards.accuracy_reward(["Q"] * len(completions), completions, answer=answers)
  assert got == [e for _, _, e in ACCURACY_TABLE]
  delta = rewards.reward_stats() - before
  assert delta.n_checked + delta.n_no_answer == len(completions)
  assert delta.n_timeouts == 0 and delta.n_errors == 0


def test_huge_completion_is_fast():
  start = time.monotonic()
  assert accuracy("x" * 10**6 + "<answer>5</answer>", "5") == 1.0
  assert accuracy("<answer>" * 200_000 + "5", "5") == 1.0
  assert accuracy("\\boxed{" * 100_000 + "5", "5") == 1.0
  before = rewards.reward_stats()
  assert accuracy("1" * 10**6, "5") == 0.0  # a million-digit answer is not checked
  assert (rewards.reward_stats() - before).n_no_answer == 1
  assert time.monotonic() - start < 10


def test_huge_expression_times_out_counted_and_pool_recovers():
  before = rewards.reward_stats()
  start = time.monotonic()
  got = rewards.accuracy_reward(["Q"] * 3, ["<answer>9**9**9**9</answer>", "<answer>2</answer>",
                                            "<answer>\\frac{4}{2}</answer>"], answer=["5", "2", "2"])
  assert got == [0.0, 1.0, 1.0]
  assert time.monotonic() - start < TIMEOUT_S + 15
  delta = rewards.reward_stats() - before
  assert delta.n_timeouts == 1 and delta.n_errors == 0
  assert accuracy("<answer>\\frac{6}{3}</answer>", "2") == 1.0  # the replaced worker works


def test_pool_kills_hung_workers_and_reports_crashes(verifier_pool):
  restarts = verifier_pool.n_restarts
  start = time.monotonic()
  outcomes = verifier_pool.run(
      [(time.sleep, (60,)), (divmod, (7, 2)), (os._exit, (3,)), (divmod, (1, 0)), (abs, (-4,))],
      timeout_s=1.0)
  assert time.monotonic() - start < 20
  assert outcomes[0] == ("timeout", None)
  assert outcomes[1] == ("ok", (3, 1)) and outcomes[4] == ("ok", 4)
  assert outcomes[2][0] == "error" and outcomes[3][0] == "error"
  assert "ZeroDivisionError" in outcomes[3][1]
  assert verifier_pool.n_restarts == restarts + 2
  assert verifier_pool.run([(abs, (-1,))], timeout_s=5.0) == [("ok", 1)]


def test_answer_extraction_rules():
  assert rewards.extract_answer("<answer> \\boxed{12} </answer>") == "12"
  assert rewards.extract_answer("\\boxed {3}") == "3"
  assert rewards.extract_answer("<answer>\n  42\n</answer>") == "42"
  assert rewards.extract_answer("<answer>  </answer>") is None
  assert rewards.extract_answer("it is -3.5 or 2/3") == "2/3"
  assert rewards.normalize_answer("½") == "1/2"


# ------------------------------------------------------------------- synthetic tasks


def test_synthetic_tasks_use_their_verifiers():
  completions = ["<think>3+5=8 8*2=16</think><answer>(3+5)*2</answer>",
                 "<answer>(3+5)*2+0</answer>",  # 0 is not one of the numbers
                 "<answer>85</answer>",
                 "<answer>x = -4</answer>",
                 "<answer>\\frac{1}{2}</answer>"]
  columns = dict(
      task=["countdown", "countdown", "arithmetic", "linear", "math"],
      answer=["(3+5)*2", "(3+5)*2", "85", "-4", "0.5"],
      numbers=[[3, 5, 2], [3, 5, 2], None, None, None],
      target=[16, 16, None, None, None])
  got = rewards.accuracy_reward(["Q"] * 5, completions, **columns)
  assert got == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_example_dicts_column():
  example = [{"task": "countdown", "prompt": "Use 4 6 to make 24", "answer": "4*6",
              "numbers": [6, 4], "target": 24}]
  assert rewards.accuracy_reward(["Q"], ["<answer>6*4</answer>"], example=example) == [1.0]


# ----------------------------------------------------------------------------- format

FORMAT_TABLE = [
    ("<think>reason</think><answer>5</answer>", 1.0),
    ("  <think>\nreason\n</think>\n\n<answer> 5 </answer>\n", 1.0),
    ("<answer>5</answer>", 0.0),
    ("reason</think><answer>5</answer>", 0.0),
    ("<think>reason</think><answer>5</answer> trailing", 0.0),
    ("<think>reason</think> between <answer>5</answer>", 0.0),
    ("<think>reason</think><answer>5</answer><answer>6</answer>", 0.0),
    ("<think>a</think><think>b</think><answer>5</answer>", 0.0),
    ("<answer>5</answer><think>reason</think>", 0.0),
    ("<think> </think><answer>5</answer>", 0.0),
    ("<think>reason</think><answer> </answer>", 0.0),
    ("<think>reason<answer>5</answer></think>", 0.0),
    ("<think>reason</think><answer>5", 0.0),
]


@pytest.mark.parametrize("completion,expected", FORMAT_TABLE)
def test_format_table(completion, expected):
  assert rewards.format_reward(["Assistant:"], [completion]) == [expected]


def test_format_with_think_in_prompt():
  prompt = "<|User|>2+3?<|Assistant|><think>\n"
  assert rewards.format_reward([prompt], ["reason</think><answer>5</answer>"]) == [1.0]
  assert rewards.format_reward([prompt], ["<think>reason</think><answer>5</answer>"]) == [0.0]


# --------------------------------------------------------------------------- language


def test_language_consistency():
  lang = rewards.language_consistency
  assert lang("We add the numbers and get 12", "en") == 1.0
  assert lang("我们把数字相加", "zh") == 1.0
  assert lang("我们把数字相加", "en") == 0.0
  # 4 English words + 2 Han characters: 4/6 in English, 2/6 in Chinese
  assert lang("so the answer is 答案", "en") == pytest.approx(4 / 6)
  assert lang("so the answer is 答案", "zh") == pytest.approx(2 / 6)
  # math counts for both: x, \frac, 3, sin
  assert lang("因为 x = \\frac{3}{4} 所以 sin", "zh") == 1.0
  assert lang("тогда ответ 5", "en") == pytest.approx(1 / 3)
  assert lang("数の和は α", "zh") == pytest.approx(3 / 5)  # kana are not Chinese; α is math
  assert lang("", "en") == 0.0 and lang("  ... !!", "zh") == 0.0
  with pytest.raises(ValueError):
    lang("text", "fr")


def test_language_reward_reads_only_the_reasoning():
  completions = ["<think>我们 think</think><answer>five 五</answer>", "<answer>5</answer>",
                 "no tags at all"]
  got = rewards.language_consistency_reward(["Assistant:"] * 3, completions, language="en")
  assert got == [pytest.approx(1 / 3), 0.0, 1.0]
  got = rewards.REWARD_FUNCTIONS["language_zh"](["x<think>"], ["因为 so</think><answer>5</answer>"])
  assert got == [pytest.approx(2 / 3)]  # 因, 为 and "so"


# -------------------------------------------------------------------------- combining


def test_resolve_and_combine():
  weights, fns = rewards.resolve("accuracy:1, format:0.1,language_en:0")
  assert weights == {"accuracy": 1.0, "format": 0.1, "language_en": 0.0}
  completions = ["<think>add</think><answer>5</answer>", "<answer>5</answer>", "<think>x</think>"]
  total, per_fn, stats = rewards.compute_rewards(weights, fns, ["Q"] * 3, completions,
                                                 answer=["5", "5", "5"], task=[None] * 3)
  assert per_fn["accuracy"] == [1.0, 1.0, 0.0]
  assert per_fn["format"] == [1.0, 0.0, 0.0]
  assert total == pytest.approx([1.1, 1.0, 0.0])
  assert isinstance(stats, rewards.RewardStats) and stats.n_no_answer == 1


def test_resolve_import_paths_and_errors():
  weights, fns = rewards.resolve("r1jax.rl.rewards:format_reward:0.5,r1jax.rl.rewards.accuracy_reward")
  assert weights == {"r1jax.rl.rewards:format_reward": 0.5, "r1jax.rl.rewards.accuracy_reward": 1.0}
  assert fns["r1jax.rl.rewards:format_reward"] is rewards.format_reward
  with pytest.raises(ValueError, match="Did you mean 'accuracy'"):
    rewards.resolve("acuracy:1")
  with pytest.raises(ValueError, match="cannot import"):
    rewards.resolve("no_such_module_r1jax:fn")
  with pytest.raises(ValueError, match="no callable"):
    rewards.resolve("r1jax.rl.rewards:no_such_fn")
  with pytest.raises(ValueError, match="twice"):
    rewards.resolve("format:1,format:2")
  with pytest.raises(ValueError, match="names no reward"):
    rewards.resolve(" , ")


def test_combine_rejects_bad_reward_functions():
  fns = {"short": lambda p, c, **_: [1.0], "nan": lambda p, c, **_: [float("nan")] * len(c)}
  with pytest.raises(ValueError, match="short"):
    rewards.combine_rewards({"short": 1.0}, fns, ["a", "b"], ["x", "y"])
  with pytest.raises(ValueError, match="nan"):
    rewards.combine_rewards({"nan": 1.0}, fns, ["a"], ["x"])
