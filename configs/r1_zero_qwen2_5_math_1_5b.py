"""R1-Zero, paper-faithful objective, on a Qwen2.5-Math-1.5B-shaped dense model.

DeepSeek-R1 (Nature, 2025) R1-Zero settings via the `r1_zero` preset: GRPO with the k3
KL estimator, beta 0.001, G = 16, temperature 1, 32 questions a step, 32,768 new
tokens, the reference refreshed every 400 steps; lr 3e-6. Load real weights with
`python -m r1jax.convert import --hf PATH --out DIR` and start from that checkpoint.
Sized for a TPU v5p-64 / 32 chips (fsdp over all devices): remat and query / logits
blocks keep a 33,792-token row within ~23 GiB a chip, where whole [T, T] scores alone
would ask ~2.2 TiB (`--dry_run` prints the terms, r1jax/memory.py).
"""

from r1jax.config import default_config
from r1jax.rl.grpo import apply_preset


def get_config():
  c = default_config()
  c.stage = "grpo"
  c.workdir = "gs://YOUR_BUCKET/r1jax/r1_zero_qwen2_5_math_1_5b"
  m = c.model
  m.vocab_size, m.d_model, m.n_layers = 151936, 1536, 28
  m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff = 12, 2, 128, 8960
  m.qkv_bias, m.tie_embeddings, m.norm_eps = True, True, 1e-6
  m.rope_theta = 10000.0
  m.dtype = "bfloat16"
  # 32K-token rows: rerun each block in the backward pass and never hold [T, T] scores
  # or [T, V] logits whole (a 151,936-token vocabulary: 20 GB of fp32 logits a row).
  m.remat, m.attention_chunk, m.logits_chunk = "full", 2048, 2048
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, 1, 1
  apply_preset(c.rl, "r1_zero")
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-6, 0, "constant"
  c.optim.weight_decay, c.optim.clip_norm = 0.0, 1.0
  c.train.batch_size = 32  # questions per step; x G = 512 samples
  c.train.seq_len = 1024 + c.rl.max_new_tokens  # prompt budget + generation budget
  c.train.steps, c.train.checkpoint_every, c.train.log_every = 8000, 100, 1
  c.data.tokenizer, c.data.tokenizer_path, c.data.template = "hf", "PATH/TO/Qwen2.5-Math-1.5B", "r1_zero"
  c.data.path, c.data.test_path = "PATH/TO/train.jsonl", "PATH/TO/test.jsonl"
  c.eval.n, c.eval.k, c.eval.temperature = 512, 16, 0.6
  return c
