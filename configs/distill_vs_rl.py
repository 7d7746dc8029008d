"""Distillation vs RL on the small model itself (DeepSeek-R1 sec. 4.1, Table 6), at CPU scale.

  python -m r1jax.train --config configs/distill_vs_rl.py --config.workdir=DIR [--config.seed=N]

One pipeline, six stages:
  0_pretrain            teacher base (the default model) on arithmetic text, 30% traces
  1_grpo                teacher: R1-Zero RL from 0 (the default recipe's GRPO)
  2_rejection_sampling  the teacher's verified, readable samples of the training prompts
  3_pretrain            student base: a smaller Qwen2.5-shaped model, same corpus and recipe
  4_sft                 distilled student: 3 fine-tuned on 2's samples (completion-only, packed)
  5_grpo                RL student: 3 trained by GRPO with the same rewards as the teacher

Both students start from the same base (3) and are charged the same training FLOPs:
a GRPO step does, per row of seq_len positions, a rollout forward (prefill + decode), a
reference forward (beta > 0) and the update (3 forwards) -- 5 forwards -- over
batch_size x G rows; an SFT step 3 forwards over batch_size full packed rows. With the
same seq_len, one GRPO step = 5 G / 3 = 13.3 SFT steps, so 150 GRPO steps match 2000
SFT steps. The GRPO side is charged its whole generation budget, though its rollouts stop
at EOS well before it (~20 of 40 tokens): the RL student gets at least its share.
Rejection sampling (the teacher's cost) is not charged to the distilled student, as in
the paper, where the teacher is given.

DIR/summary.json holds teacher_accuracy, teacher_cons@4, distilled_student_accuracy,
rl_student_accuracy and student_base_accuracy (held-out pass@1 over 4 samples at
temperature 1, 256 questions; cons@4 = majority vote of 4), besides every stage's summary.
Seeds: --config.seed=N changes the initialisations, data order and samples (the
held-out split too); the README reports the runs made.
"""

from r1jax.config import default_config

STUDENT = ("model.d_model=32,model.n_layers=2,model.n_heads=4,model.n_kv_heads=2,model.head_dim=8,"
           "model.d_ff=64,model.qkv_bias=true,model.tie_embeddings=true")
GROUP = 8
GRPO_STUDENT_STEPS = 150
SFT_STUDENT_STEPS = round(GRPO_STUDENT_STEPS * 5 * GROUP / 3)  # 2000: see the docstring


def get_config():
  c = default_config()
  c.stage = "pipeline"
  c.stages = "pretrain,grpo,rejection_sampling,pretrain,sft,grpo"
  c.workdir = "runs/distill_vs_rl"
  c.train.update(batch_size=32, seq_len=64, log_every=10, checkpoint_every=100)
  c.rl.update(group_size=GROUP, max_new_tokens=40)
  c.eval.update(n=256, k=4, temperature=1.0, after_sft=True)
  c.rejection.update(n_samples=8, n_prompts=1024, batch_prompts=32, max_per_prompt=2)
  c.per_stage.pretrain = f"train.steps=1500;train.steps=1500,train.init_from=none,{STUDENT}"
  c.per_stage.grpo = ("train.steps=400,train.log_every=10,optim.lr=5e-4,optim.warmup_steps=10;"
                      f"train.steps={GRPO_STUDENT_STEPS},train.log_every=10,optim.lr=5e-4,"
                      f"optim.warmup_steps=10,train.init_from=3,{STUDENT}")
  c.per_stage.sft = (f"train.steps={SFT_STUDENT_STEPS},train.init_from=3,data.pack=true,optim.lr=1e-3,"
                     f"optim.warmup_steps=20,{STUDENT}")
  c.summary_keys = ("teacher_accuracy=1.final_accuracy,teacher_cons@4=1.final_eval.cons@4,"
                    "distilled_student_accuracy=4.final_accuracy,rl_student_accuracy=5.final_accuracy,"
                    "student_base_accuracy=5.base_accuracy,distilled_student_cons@4=4.final_eval.cons@4,"
                    "rl_student_cons@4=5.final_eval.cons@4")
  return c
