"""Two processes x 4 CPU devices == one process x 8 devices.

The test starts two copies of this file as worker processes (`python
tests/test_multihost.py WORKER_ID OUT_DIR`) that join one jax.distributed cluster on
loopback through r1jax.parallel.maybe_initialize_distributed (the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables the launch scripts set); cross-process
collectives on CPU are gloo. On a (data 1, fsdp 2, expert 2, tensor 2) mesh, whose fsdp
axis spans the two processes, each worker reads only its own shard of the data through
the grain pipeline (sharded by jax.process_index()), feeds its rows with
parallel.put_host_batch (jax.make_array_from_process_local_data), and then:

  1. runs one next-token train step (sft.make_step);
  2. saves the state with r1jax.checkpoint from both processes and restores it onto the
     same shardings, bit for bit;
  3. runs one GRPO update (rl.trainer.make_update) from the same initial state, on a batch
     of rollouts the parent sampled, each process feeding its own rows;
  4. builds the multi-slice mesh (mesh.dcn_data = 2) with each process as a slice;
  5. scores rewards, each process its share of the groups;
  6. samples with continuous batching over the mesh's 4 batch shards (2 in each
     process; one slot each, so every device refills its slot from its own queue).

Meanwhile the pytest process computes 1, 3 and 6 (plain batching, no mesh) on its 8
simulated devices in one process; losses, gradient norms, parameters and sampled tokens
must agree, and the checkpoint the two processes wrote must restore in the single process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

N_PROCESSES = 2
LOCAL_DEVICES = 4
MESH = dict(data=1, fsdp=2, expert=2, tensor=2)
DCN_MESH = dict(data=2, fsdp=1, expert=4, tensor=1, dcn_data=2)
HOST_BATCH = 4  # rows each process reads per SFT step; the global batch is 8
SEQ_LEN = 40
GRPO_B, GRPO_G, GRPO_N = 4, 4, 6  # questions, samples each, new tokens
TIMEOUT_S = 900


def _model_config():
  from r1jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  # Tiny MoE (vocab 96 = the char tokenizer): small enough to compile quickly on 2 cores.
  return ModelConfig(n_layers=1, n_experts=4, top_k=2, n_shared_experts=1, first_k_dense=0,
                     moe_d_ff=32)


def _optimizer():
  from r1jax import config as config_lib, optim  # pylint: disable=import-outside-toplevel
  return optim.make_optimizer(config_lib.default_config().optim, 10)


def _host_iterator(shard_index=None, shard_count=None):
  """This host's grain iterator over the synthetic arithmetic task (default shard:
  jax.process_index() of jax.process_count(), as in a real multi-host run)."""
  from r1jax.data import sources, tasks  # pylint: disable=import-outside-toplevel
  rows = tasks.generate("arithmetic", 64, seed=0, split="train", max_digits=2)
  return sources.make_iterator(sources.from_records(rows), HOST_BATCH, seed=0,
                               shard_index=shard_index, shard_count=shard_count)


def _host_batch(examples):
  from r1jax import sft  # pylint: disable=import-outside-toplevel
  from r1jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  return sft.make_batch(examples, tokenizer.get_tokenizer("char", None), SEQ_LEN, "short", True)


def _gather(tree):
  """Host numpy copies of the leaves of (possibly non-fully-addressable) global arrays:
  parallel.to_host, which the stage loops read device outputs with."""
  import jax  # pylint: disable=import-outside-toplevel
  from r1jax import parallel  # pylint: disable=import-outside-toplevel
  return [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(tree))]


def _abstract(state):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _setup():
  """(mesh, graphdef, initial state, optimizer, jitted train step) of the tiny model."""
  import jax  # pylint: disable=import-outside-toplevel
  from r1jax import parallel, sft  # pylint: disable=import-outside-toplevel
  from r1jax import state as state_lib  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(MESH)
  tx = _optimizer()
  model = state_lib.create_model(_model_config(), seed=0, mesh=mesh)
  graphdef, state = state_lib.create_state(model, tx)
  step = jax.jit(sft.make_step(graphdef, tx, bias_rate=0.01))
  return mesh, graphdef, state, tx, step


def _grpo_update(graphdef, state, tx, batch):
  """One GRPO update (no KL) on a placed rollout batch."""
  import jax  # pylint: disable=import-outside-toplevel
  from r1jax.rl import grpo, trainer  # pylint: disable=import-outside-toplevel
  rl = grpo.default_rl_config()
  rl.group_size, rl.max_new_tokens, rl.beta = GRPO_G, GRPO_N, 0.0
  prompt_len = batch["tokens"].shape[1] - GRPO_N
  return jax.jit(trainer.make_update(graphdef, tx, rl, prompt_len))(state, batch)


def _rollout_prompts():
  """[GRPO_B, 5] prompts (the first left-padded) and their mask."""
  rng = np.random.default_rng(0)
  ids = rng.integers(4, 90, (GRPO_B, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  return ids, mask


def _sample(graphdef, state, **kw):
  """Host outputs of `generate` from the state's weights on the GRPO prompts (key 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  from r1jax import parallel  # pylint: disable=import-outside-toplevel
  from r1jax.sampling.sampler import SamplingParams, generate  # pylint: disable=import-outside-toplevel
  ids, mask = _rollout_prompts()
  return parallel.to_host(generate(graphdef, state, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=jax.random.key(0),
                                   group_size=GRPO_G, params=SamplingParams(max_new_tokens=GRPO_N), **kw))


def _rollout_batch():
  """A GRPO batch from one-device rollouts of the seed-0 model (deterministic)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from r1jax import state as state_lib  # pylint: disable=import-outside-toplevel
  from r1jax.rl import grpo, trainer  # pylint: disable=import-outside-toplevel
  model = state_lib.create_model(_model_config(), seed=0)
  ids, mask = _rollout_prompts()
  out = _sample(*nnx.split(model))
  batch = trainer.sequence_batch(ids, mask, out, GRPO_G)
  rewards_bg = np.random.default_rng(1).integers(0, 2, (GRPO_B, GRPO_G)).astype(np.float32)
  batch["adv"] = np.asarray(grpo.group_advantages(rewards_bg)).reshape(-1).astype(np.float32)
  return batch


# 5 groups of 2 completions, none with an answer: host 0 scores groups 0-1, host 1 2-4.
REWARD_EXAMPLES = [dict(prompt=f"q{i}", answer=str(i)) for i in range(5)]
REWARD_G = 2
REWARD_TEXTS = ["x" * (i + 1) for i in range(5 * REWARD_G)]  # row i: i + 1 x's, no digits


def _scored_by(prompts, completions, **_):
  """100 x the index of the process that scored the row, plus the row number."""
  import jax  # pylint: disable=import-outside-toplevel
  return [100 * jax.process_index() + len(c.split()[0]) - 1 for c in completions]


# ------------------------------------------------------------------- worker process


def worker(out_dir: str) -> None:
  """One of the N_PROCESSES workers; writes its results to OUT_DIR/worker_<id>.npz."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from r1jax import checkpoint, parallel  # pylint: disable=import-outside-toplevel

  assert parallel.maybe_initialize_distributed()
  pid = jax.process_index()
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (
      N_PROCESSES, N_PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES)
  out = {}
  t0 = time.time()
  lap = lambda what: print(f"worker {pid}: {what} at {time.time() - t0:.0f}s", flush=True)

  # 1. One train step, each process feeding its own shard of the data.
  mesh, graphdef, state, tx, step = _setup()
  it = _host_iterator()
  start, stop = parallel.host_rows(mesh, N_PROCESSES * HOST_BATCH)
  out["rows"] = np.array([start, stop])
  state1, metrics = step(state, parallel.put_host_batch(mesh, _host_batch(next(it))))
  out["loss1"], out["grad_norm1"] = float(metrics["loss"]), float(metrics["grad_norm"])
  for i, leaf in enumerate(_gather(state1)):
    out[f"state1_{i}"] = leaf
  lap("train step")

  # 2. Save from both processes, restore onto the same shardings.
  mgr = checkpoint.manager(os.path.join(out_dir, "ckpt"))
  data_state = dict(iterator=it.get_state())
  checkpoint.save(mgr, 1, state1, data_state, {"model": {}})
  restored, restored_data = checkpoint.restore(mgr, _abstract(state1))
  same = all(np.array_equal(a, b) for a, b in zip(_gather(restored), _gather(state1)))
  placed = all(a.sharding.is_equivalent_to(b.sharding, a.ndim)
               for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state1)))
  out["restored_equal"], out["restored_placed"] = np.array(same), np.array(placed)
  out["data_state"] = np.array(json.dumps(data_state, sort_keys=True))
  out["restored_data_state"] = np.array(json.dumps(restored_data, sort_keys=True))
  lap("checkpoint save + restore")

  # 3. One GRPO update from the initial state; each process feeds its rows of the rollouts.
  with np.load(os.path.join(out_dir, "rollout.npz")) as f:
    rollout = {k: f[k] for k in f.files}
  lo, hi = parallel.host_rows(mesh, len(rollout["tokens"]))
  own = parallel.put_host_batch(mesh, {k: v[lo:hi] for k, v in rollout.items()})
  grpo_state, grpo_metrics = _grpo_update(graphdef, state, tx, own)
  out["grpo_loss"], out["grpo_grad_norm"] = float(grpo_metrics["loss"]), float(grpo_metrics["grad_norm"])
  for i, leaf in enumerate(_gather(grpo_state.params)):
    out[f"grpo_{i}"] = leaf
  lap("grpo update")

  # 5. Rewards: each process scores its share of the groups; every process gets them all.
  from r1jax.rl import rewards, trainer  # pylint: disable=import-outside-toplevel
  total, per_fn, stats = trainer.score_groups({"who": 1.0, "accuracy": 0.0},
                                              {"who": _scored_by, "accuracy": rewards.accuracy_reward},
                                              REWARD_EXAMPLES, REWARD_TEXTS, REWARD_G)
  out["scored"], out["scored_who"], out["no_answer"] = total, per_fn["who"], np.array(stats.n_no_answer)
  lap("rewards")

  # 6. Continuous batching over the mesh's batch shards (fsdp x expert: 4, 2 a process).
  cont = _sample(graphdef, (state.params, state.other), slots=4, mesh=mesh)
  for k in ("tokens", "mask", "logprobs", "experts", "prompt_experts"):
    out[f"cont_{k}"] = np.asarray(cont[k])
  lap("continuous batching")

  # 4. The multi-slice mesh: each process (no TPU slices here) is one DCN granule.
  dcn = parallel.make_mesh(DCN_MESH)
  out["dcn_processes"] = np.array([[d.process_index for d in row.flat] for row in dcn.devices])
  np.savez(os.path.join(out_dir, f"worker_{pid}.npz"), **out)


# ------------------------------------------------------------------------ the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env(port: int, process_id: int) -> dict:
  env = dict(os.environ)
  # Drop the parent's 8-device flag (tests/conftest.py); each worker has 4 devices.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(N_PROCESSES), JAX_PROCESS_ID=str(process_id))
  env.pop("JAX_DISTRIBUTED", None)
  return env


def _start_workers(out_dir: str):
  port = _free_port()
  procs = []
  for i in range(N_PROCESSES):
    log = open(os.path.join(out_dir, f"worker_{i}.log"), "w")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), out_dir],
                                   env=_child_env(port, i), stdout=log, stderr=subprocess.STDOUT),
                  log))
  return procs


def _wait(procs, out_dir: str) -> None:
  """Waits for every worker; on the first failure or the deadline, stops the rest."""
  deadline = time.time() + TIMEOUT_S
  failed = None
  while any(p.poll() is None for p, _ in procs) and failed is None:
    failed = next((i for i, (p, _) in enumerate(procs) if p.poll() not in (None, 0)), None)
    if time.time() > deadline:
      failed = "timeout"
    time.sleep(0.5)
  if failed is None:
    failed = next((i for i, (p, _) in enumerate(procs) if p.returncode != 0), None)
  for p, log in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
    log.close()
  if failed is not None:
    tails = []
    for i in range(len(procs)):
      with open(os.path.join(out_dir, f"worker_{i}.log")) as f:
        lines = [l for l in f.read().splitlines() if not l.startswith(("W0", "I0", "[Gloo]"))]
      tails.append(f"--- worker {i} (rc {procs[i][0].returncode}):\n" + "\n".join(lines[-25:]))
    raise AssertionError(f"multi-process run failed ({failed}):\n" + "\n".join(tails))


def test_distributed_env_contract():
  from r1jax import parallel
  assert parallel.distributed_env({}) is None
  assert parallel.distributed_env({"JAX_DISTRIBUTED": "1"}) == {}
  env = dict(JAX_COORDINATOR_ADDRESS="10.0.0.2:8476", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3")
  assert parallel.distributed_env(env) == dict(coordinator_address="10.0.0.2:8476", num_processes=4,
                                               process_id=3)
  bad = [(dict(env, JAX_PROCESS_ID=""), "JAX_PROCESS_ID missing"),
         (dict(env, JAX_PROCESS_ID="4"), "must be in [0, JAX_NUM_PROCESSES=4)"),
         (dict(env, JAX_NUM_PROCESSES="four"), "must be integers"),
         (dict(env, JAX_COORDINATOR_ADDRESS="10.0.0.2"), "expected host:port")]
  for environ, message in bad:
    with pytest.raises(ValueError, match=re.escape(message)):
      parallel.distributed_env(environ)


def test_bad_launch_environment_exits_2_with_one_message(capsys):
  from r1jax import parallel
  with pytest.raises(SystemExit) as exit_info:
    parallel.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith("error: multi-host launch: JAX_COORDINATOR_ADDRESS set")
  assert parallel.maybe_initialize_distributed({}) is False  # single process: nothing to do


def test_host_groups_cover_every_group_once():
  from r1jax import parallel
  for n_groups in (0, 1, 5, 8, 13):
    for n_hosts in (1, 2, 3, 8):
      shares = [parallel.host_groups(n_groups, h, n_hosts) for h in range(n_hosts)]
      assert [lo for lo, _ in shares] == [0] + [hi for _, hi in shares[:-1]]  # contiguous, in order
      assert shares[-1][1] == n_groups
      sizes = [hi - lo for lo, hi in shares]
      assert max(sizes) - min(sizes) <= 1, (n_groups, n_hosts, sizes)


def test_score_groups_in_one_process_scores_every_row():
  """One process scores all groups itself: rewards row for row as combine_rewards gives
  them (weighted total, per function), and the call's stats."""
  from r1jax.rl import rewards, trainer
  weights = {"who": 2.0, "accuracy": 0.5}
  fns = {"who": _scored_by, "accuracy": rewards.accuracy_reward}
  texts = list(REWARD_TEXTS)
  texts[3] += " <answer>1</answer>"  # group 1's second sample, answer "1": correct
  total, per_fn, stats = trainer.score_groups(weights, fns, REWARD_EXAMPLES, texts, REWARD_G)
  np.testing.assert_array_equal(per_fn["accuracy"], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(per_fn["who"], np.arange(10))
  np.testing.assert_array_equal(total, np.arange(10) * 2.0 + [0, 0, 0, 0.5, 0, 0, 0, 0, 0, 0])
  assert total.dtype == np.float32 and stats.n_no_answer == len(texts) - 1


def test_dcn_mesh_needs_as_many_slices_or_hosts():
  from r1jax import parallel
  with pytest.raises(ValueError, match="number of TPU slices"):
    parallel.make_mesh(dict(data=2, fsdp=4, expert=1, tensor=1, dcn_data=2))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  import jax
  from r1jax import checkpoint, parallel

  assert jax.device_count() == N_PROCESSES * LOCAL_DEVICES
  out_dir = str(tmp_path)
  rollout = _rollout_batch()
  np.savez(os.path.join(out_dir, "rollout.npz"), **rollout)
  procs = _start_workers(out_dir)
  try:
    # The one-process reference on 8 devices, while the workers run. The global batch is
    # the hosts' batches stacked in process order, each read from its own data shard.
    mesh, graphdef, state, tx, step = _setup()
    iters = [_host_iterator(i, N_PROCESSES) for i in range(N_PROCESSES)]
    hosts = [_host_batch(next(it)) for it in iters]
    stacked = {k: np.concatenate([b[k] for b in hosts]) for k in hosts[0]}
    state1, metrics1 = step(state, parallel.put_host_batch(mesh, stacked))
    ref_state1 = _gather(state1)
    ref_grpo_state, ref_grpo = _grpo_update(graphdef, state, tx, parallel.put_host_batch(mesh, rollout))
    ref_grpo_params = _gather(ref_grpo_state.params)
    ref_sample = _sample(graphdef, (state.params, state.other))  # plain batching, one program
    abstract = _abstract(state1)
  finally:
    _wait(procs, out_dir)

  results = []
  for i in range(N_PROCESSES):
    with np.load(os.path.join(out_dir, f"worker_{i}.npz")) as f:
      results.append({k: f[k] for k in f.files})
  for i, r in enumerate(results):
    rows = N_PROCESSES * HOST_BATCH
    assert list(r["rows"]) == [i * rows // N_PROCESSES, (i + 1) * rows // N_PROCESSES]
    np.testing.assert_allclose(r["loss1"], metrics1["loss"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norm1"], metrics1["grad_norm"], rtol=1e-5)
    for j, want in enumerate(ref_state1):
      np.testing.assert_allclose(r[f"state1_{j}"], want, rtol=1e-5, atol=1e-6)
    assert bool(r["restored_equal"]) and bool(r["restored_placed"])
    # One JSON copy of the data state is saved (by process 0); it is valid for every host
    # because a grain shard's state is only its position, the same on all hosts.
    assert str(r["restored_data_state"]) == str(r["data_state"]) == str(results[0]["data_state"])
    np.testing.assert_allclose(r["grpo_loss"], ref_grpo["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["grpo_grad_norm"], ref_grpo["grad_norm"], rtol=1e-5)
    for j, want in enumerate(ref_grpo_params):
      np.testing.assert_allclose(r[f"grpo_{j}"], want, rtol=1e-5, atol=1e-6)
    # Rows 0-3 scored on host 0, rows 4-9 on host 1; the stats summed over both.
    np.testing.assert_array_equal(r["scored"], [0, 1, 2, 3, 104, 105, 106, 107, 108, 109])
    np.testing.assert_array_equal(r["scored_who"], r["scored"])
    assert int(r["no_answer"]) == len(REWARD_TEXTS)
    # Continuous batching split over both processes' devices samples what one program does.
    for k in ("tokens", "mask", "experts", "prompt_experts"):
      np.testing.assert_array_equal(r[f"cont_{k}"], ref_sample[k], err_msg=k)
    np.testing.assert_allclose(r["cont_logprobs"], ref_sample["logprobs"], atol=1e-5)
    # mesh.dcn_data=2 without TPU slices: the data axis runs across the processes.
    assert r["dcn_processes"].tolist() == [[0] * LOCAL_DEVICES, [1] * LOCAL_DEVICES]

  # The checkpoint written by two processes restores whole in one process.
  mgr = checkpoint.manager(os.path.join(out_dir, "ckpt"))
  restored, _ = checkpoint.restore(mgr, abstract)
  for got, want in zip(_gather(restored), ref_state1):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  worker(sys.argv[2])
