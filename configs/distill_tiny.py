"""Distillation (DeepSeek-R1 sec. 2.4): plain SFT of a small dense student on the teacher's
rejection-sampled traces, at CPU scale.

The teacher is configs/r1_pipeline_tiny.py; its 3_rejection_sampling stage wrote
data/samples-*.jsonl (prompt, solution, answer + provenance). The rows hold TEXT, so the
student re-tokenises them with its own tokenizer: a student with another vocabulary
(e.g. data.tokenizer="hf", data.tokenizer_path=<a Qwen2.5 folder>, model.vocab_size to
match, data.template="chat") needs no other change. Start from a real student with
train.init_from=<a checkpoint written by `python -m r1jax.convert import`>; here the
student is a fresh Qwen2.5-shaped toy (q/k/v biases, tied embeddings, GQA).

  python -m r1jax.train --config configs/r1_pipeline_tiny.py   # the teacher, once
  python -m r1jax.train --config configs/distill_tiny.py

The paper's finding -- distilling a strong teacher beats RL on the small model itself
(sec. 4.1) -- is reproduced, with matched student FLOPs and several seeds, by
configs/distill_vs_rl.py (results in the README).
"""

from r1jax.config import default_config


def get_config():
  c = default_config()
  c.stage = "sft"
  c.workdir = "runs/distill_tiny"
  # The teacher's rejection-sampled traces (a folder of JSONL shards, one per host).
  c.data.path = "runs/r1_pipeline_tiny/3_rejection_sampling/data"
  c.data.pack = True  # short traces: several per row, segment-masked
  c.train.init_from = "none"
  m = c.model  # Qwen2.5 in miniature
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff = 48, 2, 4, 2, 12, 96
  m.qkv_bias, m.tie_embeddings, m.rope_theta = True, True, 1_000_000.0
  c.train.update(steps=400, batch_size=32, seq_len=64, log_every=10, checkpoint_every=100)
  c.optim.update(lr=1e-3, warmup_steps=20)
  return c
