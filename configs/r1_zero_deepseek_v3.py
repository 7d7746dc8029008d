"""R1-Zero on a DeepSeek-V3-shaped MoE (671B total, 37B active), the paper's base.

MLA (q_lora 1536, kv_lora 512, 128 + 64 RoPE qk dims), DeepSeekMoE (1 shared + 256
routed experts, top-8, 8 groups / top-4 groups, scaling 2.5), first 3 layers dense, YaRN
(factor 40 over 4,096). During RL: the balancing bias is frozen (train.bias_update_rate
0), the MTP head is off, routing replay is on (DESIGN.md). Sized for a TPU v5p pod
slice of 1,024 chips (95 GiB each) at the paper's 32K-token completions: experts over 8,
heads / vocabulary / FFN width over tensor 8, fsdp over the rest (16), so the 512 rollout
rows split over 128 batch shards; remat and query / logits blocks keep a 33,792-token
row within ~75 GiB a chip (`--dry_run` prints the terms, r1jax/memory.py).
"""

from r1jax.config import default_config
from r1jax.rl.grpo import apply_preset


def get_config():
  c = default_config()
  c.stage = "grpo"
  c.workdir = "gs://YOUR_BUCKET/r1jax/r1_zero_deepseek_v3"
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads = 129280, 7168, 61, 128
  m.attention, m.q_lora_rank, m.kv_lora_rank = "mla", 1536, 512
  m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 128, 64, 128
  m.d_ff, m.moe_d_ff = 18432, 2048
  m.n_experts, m.n_shared_experts, m.top_k = 256, 1, 8
  m.router, m.norm_topk_prob, m.routed_scaling_factor = "sigmoid", True, 2.5
  m.n_group, m.topk_group, m.first_k_dense = 8, 4, 3
  m.rope_theta, m.rope_type, m.rope_factor, m.rope_original_max_len = 10000.0, "yarn", 40.0, 4096
  m.yarn_beta_fast, m.yarn_beta_slow, m.yarn_mscale, m.yarn_mscale_all_dim = 32.0, 1.0, 1.0, 1.0
  m.norm_eps, m.dtype, m.mtp_depth = 1e-6, "bfloat16", 0
  # 32K-token rows: rerun each block in the backward pass and never hold [T, T] scores
  # or [T, V] logits whole (r1jax/memory.py; the dry run shows each term).
  m.remat, m.attention_chunk, m.logits_chunk = "full", 2048, 2048
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, 8, 8
  apply_preset(c.rl, "r1_zero")
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-6, 0, "constant"
  c.train.bias_update_rate = 0.0
  c.train.batch_size = 32
  c.train.seq_len = 1024 + c.rl.max_new_tokens
  c.train.steps, c.train.checkpoint_every, c.train.log_every = 10400, 50, 1
  c.data.tokenizer, c.data.tokenizer_path, c.data.template = "hf", "PATH/TO/DeepSeek-V3-Base", "r1_zero"
  c.data.path, c.data.test_path = "PATH/TO/train.jsonl", "PATH/TO/test.jsonl"
  c.eval.n, c.eval.k, c.eval.temperature = 512, 16, 0.6
  return c
