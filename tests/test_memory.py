"""--dry_run memory planning: exact parameter bytes, the documented estimates, and the
refusal of a mesh that cannot fit (one message, exit status 2)."""

import os

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax import memory, parallel, train
from r1jax import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def _tiny(stage="pretrain", **model):
  c = config_lib.default_config()
  c.stage = stage
  for key, value in dict(dict(attention="mla", q_lora_rank=8, n_experts=4, top_k=2, n_shared_experts=1,
                              first_k_dense=1, n_heads=4, vocab_size=96), **model).items():
    c.model[key] = value
  return c


def test_parameter_bytes_match_the_sharded_model():
  mesh_shape = (1, 2, 2, 2)
  # vocab 99 does not divide over tensor=2: the estimate must leave it whole, as _fit does.
  config = _tiny(vocab_size=99)
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  model = state_lib.create_model(config_lib.model_config(config), seed=0, mesh=mesh)
  _, params, _ = state_lib.split_model(model)
  device = jax.devices()[0]
  actual = sum(next(s.data.nbytes for s in x.addressable_shards if s.device == device)
               for x in jax.tree.leaves(params))
  total, estimated = memory.per_device_param_bytes(config, mesh_shape)
  assert estimated == actual
  assert total == sum(x.size for x in jax.tree.leaves(params))


def test_report_fits_refuses_or_says_memory_is_unknown(capsys):
  config = _tiny()
  assert memory.report(config, n_devices=8, device_memory_gib=80.0) == 0
  out = capsys.readouterr().out
  assert "parameters (fp32)" in out and "fits:" in out and "mesh data=8 fsdp=1 expert=1 tensor=1" in out
  assert memory.report(config, n_devices=8, device_memory_gib=1e-4) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: mesh data=8") and "GiB per device" in err[0]
  assert memory.report(config, n_devices=8) == 0  # on CPU no memory figure: no verdict
  assert "R1JAX_DEVICE_MEMORY_GIB" in capsys.readouterr().out


def test_target_from_environment(monkeypatch, capsys):
  config = _tiny()
  config.mesh.fsdp = 2  # data=-1 takes the rest
  monkeypatch.setenv("R1JAX_NUM_DEVICES", "16")
  monkeypatch.setenv("R1JAX_DEVICE_MEMORY_GIB", "95")
  shape, mem, _ = memory.target(config)
  assert shape == (8, 2, 1, 1) and mem == 95 * GIB
  monkeypatch.setenv("R1JAX_NUM_DEVICES", "3")
  assert memory.report(config) == 2
  assert "R1JAX_NUM_DEVICES" in capsys.readouterr().err
  monkeypatch.setenv("R1JAX_NUM_DEVICES", "lots")
  assert memory.report(config) == 2
  assert "must be a positive integer" in capsys.readouterr().err


def test_grpo_rows_must_split_over_the_batch_shards(capsys):
  config = _tiny(stage="grpo")
  config.train.batch_size, config.rl.group_size = 3, 2  # 6 rows over 8 shards
  assert memory.report(config, n_devices=8, device_memory_gib=80.0) == 2
  err = capsys.readouterr().err
  assert "6 rows cannot be split evenly over data x fsdp x expert = 8" in err
  config.mesh.data, config.mesh.tensor = 2, 4  # 2 batch shards, heads over tensor
  assert memory.report(config, n_devices=8, device_memory_gib=80.0) == 0


def test_documented_formulas():
  config = _tiny(stage="grpo", dtype="bfloat16")
  config.train.batch_size, config.train.seq_len = 4, 64
  config.rl.group_size, config.rl.max_new_tokens, config.rl.minibatches = 4, 32, 2
  cfg = config_lib.model_config(config)
  est = memory.estimate(config, (2, 2, 1, 1))
  rows = est["rows"]
  p = rows["parameters (fp32)"]
  assert rows["gradients (fp32)"] == rows["reference policy (fp32)"] == p
  assert rows["optimizer (AdamW m, v; fp32)"] == 2 * p
  # The MLA cache keeps the latent and the RoPE key: (R + Dr) x 2 bytes a slot and layer.
  samples = 4 * 4 // 4
  slot = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
  assert rows["rollout: KV cache"] == samples * 64 * (cfg.n_layers * slot + 1)
  # Dense attention: quadratic in the sequence; logits linear.
  longer = config.copy_and_resolve_references()
  longer.train.seq_len = 128
  est2 = memory.estimate(longer, (2, 2, 1, 1))
  assert est2["rows"]["update: attention scores (dense)"] == 4 * rows["update: attention scores (dense)"]
  assert est2["rows"]["update: activations (no remat)"] == 2 * rows["update: activations (no remat)"]
  assert est["total"] == est["persistent"] + max(est["phases"].values())
  # fsdp 2, tensor 1: the stage's sampler splits the rows and holds the weights without
  # the fsdp split (parallel.rollout_mesh), next to the training shards.
  n_params, _ = memory.per_device_param_bytes(config, (1, 1, 1, 1))
  whole = rows["rollout: weights whole (no fsdp split)"]
  assert whole == 4 * n_params and p < whole <= 2 * p  # expert = 1: every weight whole
  assert est["phases"]["rollout"] >= whole + rows["rollout: KV cache"]
  # tensor 2: the copy is whole over fsdp only; the tensor split stays.
  _, tensor_split = memory.per_device_param_bytes(config, (1, 1, 1, 2))
  assert memory.estimate(config, (1, 2, 1, 2))["rows"]["rollout: weights whole (no fsdp split)"] == tensor_split
  assert tensor_split < whole
  # Continuous batching over 8 slots: 2 a device (4 batch shards) + a store of 1 prompt.
  continuous = config.copy_and_resolve_references()
  continuous.rl.slots = 8
  est3 = memory.estimate(continuous, (2, 2, 1, 1))
  assert est3["rows"]["rollout: KV cache"] == (2 + 1) * 64 * (cfg.n_layers * slot + 1)
  assert "3 cache row(s) of 64 slots per device (8 continuous-batching slots over 4 batch shards" in (
      " ".join(est3["notes"]))


def test_deepseek_v3_recipe_fits_1024_chips_at_32k_and_would_not_without_remat(monkeypatch, capsys):
  """The paper-scale recipe as shipped (33,792-token rows, remat and query / logits
  blocks, experts over 8 and tensor 8) fits 1,024 chips of 95 GiB. Without remat and with
  whole [T, T] attention the dry run refuses it, naming the quadratic term; with experts
  over 64 and no tensor axis, 512 rollout rows cannot split over 1,024 batch shards."""
  monkeypatch.setenv("R1JAX_NUM_DEVICES", "1024")
  monkeypatch.setenv("R1JAX_DEVICE_MEMORY_GIB", "95")
  recipe = os.path.join(ROOT, "configs", "r1_zero_deepseek_v3.py")
  assert train.main(["--config", recipe, "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "671.03B parameters" in out and "33792 tokens" in out and "fits:" in out
  assert "update: activations (remat full)" in out and "attention scores (blocks of 2048)" in out

  assert train.main(["--config", recipe, "--dry_run", "--config.model.remat=none",
                     "--config.model.attention_chunk=0"]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and "Traceback" not in captured.err
  assert err[0].startswith("error: mesh data=1 fsdp=16 expert=8 tensor=8 cannot run this config")
  assert "update: attention scores (dense)" in err[0]

  assert train.main(["--config", recipe, "--dry_run", "--config.mesh.expert=64", "--config.mesh.tensor=1"]) == 2
  err = capsys.readouterr().err
  assert "512 rows cannot be split evenly over data x fsdp x expert = 1024" in err


def test_qwen_1_5b_recipe_fits_32_chips_with_every_device_busy(monkeypatch, capsys):
  """The 1.5B dense recipe as shipped fits its v5p-64 (32 chips of 95 GiB) at 32K-token
  rows; each of its 16 minibatches of 2 groups spreads its 32 rows over the 32 shards
  (microbatch.spread_rows), so the plan has no idle-device note."""
  monkeypatch.setenv("R1JAX_NUM_DEVICES", "32")
  monkeypatch.setenv("R1JAX_DEVICE_MEMORY_GIB", "95")
  recipe = os.path.join(ROOT, "configs", "r1_zero_qwen2_5_math_1_5b.py")
  assert train.main(["--config", recipe, "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "1.54B parameters" in out and "1 row(s) of 33792 tokens per device (32 rows over 32 batch shards)" in out
  assert "fits:" in out and "idle" not in out
  assert train.main(["--config", recipe, "--dry_run", "--config.model.remat=none",
                     "--config.model.attention_chunk=0"]) == 2
  assert "update: attention scores (dense)" in capsys.readouterr().err


@pytest.mark.parametrize("knobs", [{}, dict(attention_chunk=64, logits_chunk=64),
                                   dict(remat="full", attention_chunk=64, logits_chunk=64)],
                         ids=["dense", "blocks", "remat_and_blocks"])
def test_estimate_is_a_lower_bound_of_the_compiled_step(knobs):
  """The update-phase estimate against XLA's own accounting of the compiled train step
  (XLA:CPU, one device): within [1x, 2x] of it (measured on this model: 1.34x plain,
  1.38x with query and logits blocks, 1.82x with remat too, which XLA:CPU's default
  scheduler does not realise; 1.07x / 1.11x / 1.44x with the memory-aware one)."""
  from r1jax import optim, sft
  config = _tiny(q_lora_rank=32, kv_lora_rank=32, d_model=128, n_layers=2, first_k_dense=0, moe_d_ff=64,
                 vocab_size=1024, **knobs)
  config.train.seq_len, config.train.batch_size = 256, 4
  est = memory.estimate(config, (1, 1, 1, 1))
  tx = optim.make_optimizer(config.optim, 10)
  graphdef, st = state_lib.create_state(state_lib.create_model(config_lib.model_config(config), 0), tx)
  batch = dict(tokens=np.zeros((4, 256), np.int32), loss_mask=np.ones((4, 256), np.int32),
               segment_ids=np.ones((4, 256), np.int32), positions=np.tile(np.arange(256, dtype=np.int32), (4, 1)))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  st, batch = jax.device_put((st, batch), one)
  analysis = jax.jit(sft.make_step(graphdef, tx), donate_argnums=0).lower(st, batch).compile().memory_analysis()
  compiled = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
              - analysis.alias_size_in_bytes)
  assert est["total"] <= compiled <= 2 * est["total"], (est["total"], compiled)
