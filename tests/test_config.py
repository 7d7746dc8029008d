"""Configs: every recipe loads and validates; bad values give one clear message."""

import glob
import os
import subprocess
import sys

import pytest

from r1jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_recipe_loads_and_validates(path):
  config = config_lib.load(path)
  config_lib.validate(config)


def test_default_validates_on_the_test_mesh():
  config_lib.validate(config_lib.default_config(), n_devices=8)


@pytest.mark.parametrize("override, message", [
    ("--config.model.head_dim=15", "head_dim=15 must be positive and even"),
    ("--config.model.n_kv_heads=3", "must be a multiple of model.n_kv_heads=3"),
    ("--config.stage=pretrian", "stage='pretrian': choose one of"),
    ("--config.mesh.fsdp=3", "does not fit the 8 available devices"),
    ("--config.optim.lr=-1", "optim.lr=-1.0 must be positive"),
])
def test_bad_values_name_the_key(override, message):
  config = config_lib.apply_overrides(config_lib.default_config(), [override])
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    config_lib.validate(config, n_devices=8)


def test_moe_topk_above_experts_and_groups():
  config = config_lib.apply_overrides(config_lib.default_config(), [
      "model.n_experts=4", "model.top_k=5", "model.n_group=3"])
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  text = str(e.value)
  assert "top_k=5 must be in 1..model.n_experts=4" in text
  assert "n_experts=4 must be divisible by model.n_group=3" in text


def test_unknown_key_suggests_the_right_one():
  with pytest.raises(config_lib.ConfigError, match="has no key 'stpes'. Did you mean 'steps'"):
    config_lib.apply_overrides(config_lib.default_config(), ["--config.train.stpes=3"])


def test_wrong_type_is_reported():
  with pytest.raises(config_lib.ConfigError, match="'abc' is not an integer"):
    config_lib.apply_overrides(config_lib.default_config(), ["--config.train.steps=abc"])
  with pytest.raises(config_lib.ConfigError, match="is not a bool"):
    config_lib.apply_overrides(config_lib.default_config(), ["--config.model.qk_norm=maybe"])


def test_overrides_parse_to_the_default_type():
  config = config_lib.apply_overrides(config_lib.default_config(), [
      "--config.optim.lr=1e-4", "--config.model.qk_norm=true", "--config.train.steps=7"])
  assert config.optim.lr == 1e-4 and config.model.qk_norm is True and config.train.steps == 7


def test_recipe_file_errors(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="no such file"):
    config_lib.load(str(tmp_path / "missing.py"))
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  from r1jax.config import default_config\n"
                 "  c = default_config()\n  c.unlock()\n  c.trian = 1\n  return c\n")
  with pytest.raises(config_lib.ConfigError, match="unknown key 'trian'. Did you mean 'train'"):
    config_lib.load(str(bad))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(config_lib.ConfigError, match="failed to load: SyntaxError"):
    config_lib.load(str(broken))


def _cli(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "r1jax.train", *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=300)


def test_cli_bad_input_one_message_nonzero_exit(tmp_path):
  result = _cli("--config.model.top_k=99", "--config.model.n_experts=4", cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith("error: invalid config")
  assert "Traceback" not in result.stderr
  result = _cli("--config", str(tmp_path / "nope.py"), cwd=tmp_path)
  assert result.returncode == 2 and "no such file" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("recipe, billions", [
    ("r1_zero_deepseek_v3.py", 671.0),  # DeepSeek-V3: 671B total parameters (MTP off)
    ("r1_zero_qwen2_5_math_1_5b.py", 1.54),  # Qwen2.5-Math-1.5B (tied embeddings)
])
def test_pod_recipes_build_abstractly(recipe, billions):
  import jax
  from flax import nnx
  from r1jax.model.transformer import Transformer
  config = config_lib.load(os.path.join(ROOT, "configs", recipe))
  config_lib.validate(config)
  model = nnx.eval_shape(lambda: Transformer(config_lib.model_config(config), nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(n / 1e9 - billions) / billions < 0.01, n


def test_memory_knobs_are_validated_and_remat_on_cpu_gets_a_note():
  from r1jax import train
  for override, message in (("model.remat=some", "model.remat='some': choose one of"),
                            ("model.attention_chunk=-1", "model.attention_chunk=-1 must be >= 0"),
                            ("model.logits_chunk=-8", "model.logits_chunk=-8 must be >= 0")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(config_lib.apply_overrides(config_lib.default_config(), [override]))
  config = config_lib.default_config()
  assert train.cpu_remat_note(config, "cpu", "") is None  # remat off
  config.model.remat = "full"
  note = train.cpu_remat_note(config, "cpu", "--xla_force_host_platform_device_count=8")
  assert note and train.CPU_MEMORY_SCHEDULER_FLAG in note
  assert train.cpu_remat_note(config, "cpu", train.CPU_MEMORY_SCHEDULER_FLAG) is None
  assert train.cpu_remat_note(config, "gpu", "") is None
