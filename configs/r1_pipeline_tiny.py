"""The whole DeepSeek-R1 recipe (paper sec. 2.3) in miniature: one `pipeline` run on CPU.

  0_pretrain            a tiny base model on arithmetic text (our DeepSeek-V3-Base)
  1_sft                 cold start: CoT traces, completion-only loss, packed rows (2.3.1)
  2_grpo                reasoning RL: accuracy + format + language consistency (2.3.2)
  3_rejection_sampling  samples of 2_grpo, kept when verified and readable -> data/ (2.3.3)
  4_sft                 the BASE model (0_pretrain) on 3's samples, + general rows (2.3.3)
  5_reward_model        Bradley-Terry on preference pairs, trunk from 4_sft (2.3.4)
  6_grpo                all-scenario RL from 4_sft: rule rewards + 5's reward model (2.3.4)

Hand-overs (r1jax/train.py `Handover`): weights flow from the last policy stage unless
train.init_from says otherwise (4_sft: "base"); 3's data/ folder becomes 4's data.path;
5's checkpoints become 6's reward_model.path, which adds "reward_model:<weight>" to its
rewards. `per_stage.<name>` holds one override list per run of that stage, split by ";".

  python -m r1jax.train --config configs/r1_pipeline_tiny.py

General (non-reasoning) SFT data: set data.general_path to a JSONL of prompt / answer
(/ solution) rows, mixed into 4_sft at data.general_ratio (R1: ~200k of ~800k). The
synthetic task has no general prompts, so the reward model scores every row here
(reward_model.scope="all"); with real data keep "unverifiable", as in the paper.
"""

from r1jax.config import default_config


def get_config():
  c = default_config()
  c.stage = "pipeline"
  c.stages = "pretrain,sft,grpo,rejection_sampling,sft,reward_model,grpo"
  c.workdir = "runs/r1_pipeline_tiny"
  c.data.task, c.data.max_digits = "arithmetic", 2
  c.train.update(batch_size=32, seq_len=64, log_every=10, checkpoint_every=100)
  c.rl.update(group_size=8, max_new_tokens=40, beta=0.001,
              reward_weights="accuracy:1,format:0.1,language:0.1")
  c.eval.update(n=128, k=4, temperature=1.0)
  c.rejection.update(n_samples=8, n_prompts=1024, batch_prompts=32, max_per_prompt=2)
  c.reward_model.update(n_pairs=1024, scope="all", weight=0.5)
  c.per_stage.pretrain = "train.steps=1500,data.trace_fraction=0.3"
  # Cold start: few steps of packed CoT; then the base model again on the kept samples.
  c.per_stage.sft = ("train.steps=100,data.pack=true,optim.lr=1e-3;"
                     "train.steps=300,data.pack=true,optim.lr=1e-3,train.init_from=base")
  c.per_stage.grpo = ("train.steps=200,optim.lr=5e-4,optim.warmup_steps=10;"
                      "train.steps=100,optim.lr=3e-4,optim.warmup_steps=10")
  c.per_stage.reward_model = "train.steps=200,optim.lr=1e-3"
  c.per_stage.rejection_sampling = ""
  return c
