"""The R1 recipe end to end through the CLI, shrunk from configs/r1_pipeline_tiny.py:
cold-start sft -> grpo -> rejection_sampling -> sft (from the base, on the samples + general
data) -> reward_model -> grpo (with the reward model), every stage's outputs on disk.

The cold start runs enough steps (60) to memorise four one-digit sums, so rejection
sampling has verified samples to keep and the second sft has data; every other stage
runs 2 steps. A persistent compilation cache lets repeated stages reuse programs.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLD_START = [("1+1", "1+1=2", "2"), ("2+2", "2+2=4", "4"), ("3+1", "3+1=4", "4"), ("2+3", "2+3=5", "5")]


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_r1_pipeline_runs_every_stage_and_hands_over(tmp_path):
  cold = tmp_path / "cold_start.jsonl"
  _write(cold, [dict(prompt=p, solution=s, answer=a) for p, s, a in COLD_START])
  general = tmp_path / "general.jsonl"
  _write(general, [dict(prompt="hi", answer="hello"), dict(prompt="bye", answer="see you")])
  wd = tmp_path / "run"
  args = [
      "--config", os.path.join(ROOT, "configs", "r1_pipeline_tiny.py"), f"--config.workdir={wd}",
      "--config.stages=sft,grpo,rejection_sampling,sft,reward_model,grpo",
      f"--config.data.path={cold}", f"--config.data.test_path={cold}",
      "--config.train.batch_size=8", "--config.train.seq_len=40", "--config.train.log_every=1",
      "--config.rl.group_size=4", "--config.rl.max_new_tokens=24",
      "--config.eval.n=4", "--config.eval.k=1", "--config.eval.temperature=0.0",
      "--config.rejection.n_samples=4", "--config.rejection.batch_prompts=4",
      "--config.rejection.temperature=0.7",
      "--config.reward_model.n_pairs=8", "--config.rl.reward_workers=1",
      "--config.per_stage.sft=train.steps=60,data.pack=true,optim.lr=5e-3,optim.warmup_steps=0;"
      f"train.steps=2,data.pack=true,train.init_from=base,data.general_path={general}",
      "--config.per_stage.grpo=train.steps=2,optim.lr=1e-5",
      "--config.per_stage.reward_model=train.steps=2",
  ]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",  # one CPU device, a user's plain run
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # stage 5 reuses stage 1's
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")          # programs, 3 reuses 0's
  result = subprocess.run([sys.executable, "-m", "r1jax.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  summary = json.loads((wd / "summary.json").read_text())
  names = ["sft", "grpo", "rejection_sampling", "sft", "reward_model", "grpo"]
  assert [s["stage"] for s in summary["stages"]] == names
  dirs = {i: wd / f"{i}_{n}" for i, n in enumerate(names)}
  for i in (0, 1, 3, 4, 5):  # every training stage: metrics and a checkpoint
    assert (dirs[i] / "metrics.jsonl").read_text().strip(), i
    assert any(p.name.isdigit() for p in (dirs[i] / "checkpoints").iterdir()), i

  # Rejection sampling: samples of the RL policy, verified, with provenance.
  rs = summary["stages"][2]
  assert rs["init_from"] == str(dirs[1] / "checkpoints") and rs["kept"] > 0
  rows = [json.loads(l) for l in (dirs[2] / "data" / "samples-00000-of-00001.jsonl").read_text().splitlines()]
  assert len(rows) == rs["kept"]
  answers = {p: a for p, _, a in COLD_START}
  for r in rows:
    assert r["answer"] == answers[r["prompt"]] and r["checkpoint"] == os.path.abspath(dirs[1] / "checkpoints")
    assert {"prompt_id", "sample_index", "reward", "solution"} <= set(r)
  assert json.loads((dirs[2] / "rejection_summary.json").read_text())["kept"] == rs["kept"]

  # The second sft: the base model (a fresh init: this run has no pretrain stage), on the
  # rejection-sampled folder mixed with general data.
  first_sft, second_sft = summary["stages"][0], summary["stages"][3]
  assert second_sft["init_from"] is None
  # Same weights as the cold start began from (same held-out batch, same loss), not RL's.
  assert second_sft["heldout_nll_before"] == first_sft["heldout_nll_before"]
  assert first_sft["heldout_nll_after"] < first_sft["heldout_nll_before"] / 4
  assert second_sft["data_path"] == str(dirs[2] / "data") and second_sft["general_path"] == str(general)
  assert first_sft["general_path"] == ""  # the ";" alternatives: only the second sft mixes

  # The reward model trains on the sft policy's trunk; the last grpo scores with it.
  assert summary["stages"][4]["init_from"] == str(dirs[3] / "checkpoints")
  final = summary["stages"][5]
  assert final["init_from"] == str(dirs[3] / "checkpoints")
  final_config = json.loads((dirs[5] / "config.json").read_text())
  assert final_config["reward_model"]["path"] == str(dirs[4] / "checkpoints")
  assert final_config["rl"]["reward_weights"].endswith(",reward_model:0.5")
  assert "language:0.1" in final_config["rl"]["reward_weights"]
  assert 0.0 <= summary["final_accuracy"] <= 1.0
