"""The peer for r1jax's GRPO step bench: google-tunix 0.1.7's own GRPO learner, timed per step.

What it measures: wall seconds of one GRPO training step of tunix's real learner
(tunix.rl.grpo.grpo_learner.GRPOLearner driving tunix.rl.rl_cluster.RLCluster with the
"vanilla" rollout engine, i.e. tunix's Sampler), one CPU device (a 1x1 mesh), on the
workload r1jax's bench uses:
  * tunix Qwen3 at the issue's sizes (as bench/peer_tunix.py): vocab 512, d_model 256,
    4 layers, MLP 512, 4 heads / 2 KV heads, head_dim 64, rope 1e4, eps 1e-6, untied
    embeddings, fp32; --moe: 8 experts top-2 in every layer;
  * 8 prompts x G=8 generations (64 rows), prompt 32 tokens, 128 new tokens,
    temperature 1.0, top_p 1.0; EOS id = vocab (never drawn), so every row is 128 long;
  * GRPO beta 0.04 with a reference model (a second Qwen3 built from the same seed, so
    the same initial weights in separate buffers), mu (num_iterations) = 1, epsilon 0.2,
    optax.adamw(1e-6), one optimizer step per training step over all 64 rows
    (mini_batch_size = the full 8-prompt batch), its gradient accumulated over
    --microbatches passes (train_micro_batch_size = prompts / microbatches; r1jax's
    bench passes the same number as its rl.microbatches);
  * reward: a cheap random reward (the model is random; only time is measured).
One step = rollout + reference log-probs + rewards/advantages + the actor update, as
tunix's train loop runs them. Step 1 (compilation) is the warm-up; then --iters steps.

Run (in the peer venv, see bench/peer_tunix.py for how it was made):
  /work/peer_venv/bin/python bench/peer_tunix_grpo.py [--moe] [--iters 3]

Per-step times come from the prompt iterator handed to learner.train(): tunix asks it
for the next batch at the start of every step, and once more after the last (which ends
training), so step k = time between request k and k+1. The per-phase times (rollout,
ref_logps, update) come from thin timing wrappers on the RLCluster instance; the
ref-logps wrapper blocks on its result (tunix would block on it a moment later anyway).

Deviations we could not avoid: tunix's masks treat id 0 as padding, so a completion
token sampled as 0 (about 1 in 512) is masked out of the loss; this does not change
the work done. Tunix has no prompt sharing across a group: the 8 prompts are repeated
to 64 rows before the rollout (its own design; also what bench/peer_tunix.py times).
RolloutConfig.seed is left None, so tunix samples every step with PRNGKey(0) (its
default; the prompts differ per step). The phases do not add up to the step: rewards,
advantages and tunix's bookkeeping are the rest.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np

from peer_tunix import VOCAB, IdTokenizer, add_workload_args, qwen3_config  # bench/ is sys.path[0]


def main():
  ap = argparse.ArgumentParser()
  add_workload_args(ap)
  ap.add_argument("--microbatches", type=int, default=1,
                  help="gradient-accumulation passes per step (train_micro_batch_size = prompts / this)")
  args = ap.parse_args()
  if args.prompts % args.microbatches:
    ap.error(f"--microbatches {args.microbatches} must divide --prompts {args.prompts}")

  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tunix.models.qwen3 import model as qwen3  # pylint: disable=import-outside-toplevel
  from tunix.rl import rl_cluster as rl_cluster_lib  # pylint: disable=import-outside-toplevel
  from tunix.rl.grpo import grpo_learner  # pylint: disable=import-outside-toplevel
  from tunix.rl.rollout import base_rollout  # pylint: disable=import-outside-toplevel

  vocab = VOCAB
  cfg = qwen3_config(args.moe)
  actor = qwen3.Qwen3(cfg, rngs=nnx.Rngs(args.seed))
  reference = qwen3.Qwen3(cfg, rngs=nnx.Rngs(args.seed))  # same initial weights, own copy

  # Every role on one 1x1 mesh of the single CPU device: actor and rollout share weights.
  # Auto axes (tunix's sharding annotations assume them; jax.make_mesh now defaults to Explicit).
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  roles = rl_cluster_lib.Role
  rollout_cfg = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.new_tokens, max_prompt_length=args.prompt_len,
      kv_cache_size=args.prompt_len + args.new_tokens, temperature=1.0, top_p=1.0, top_k=None,
      eos_tokens=[vocab])
  training_cfg = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(1e-6),
      eval_every_n_steps=10**9,
      max_steps=10**9,  # the prompt iterator ends training (see the docstring)
      mini_batch_size=args.prompts, train_micro_batch_size=args.prompts // args.microbatches,
      # Rollout and log-probs stay whole (they would default to the training micro-batch).
      rollout_micro_batch_size=args.prompts, compute_logps_micro_batch_size=args.prompts,
      checkpoint_root_directory=None, metrics_logging_options=None)  # no ckpt, no logs
  cluster_cfg = rl_cluster_lib.ClusterConfig(
      role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=training_cfg, rollout_config=rollout_cfg)
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=IdTokenizer(eos=vocab), cluster_config=cluster_cfg)
  del actor, reference

  algo_cfg = grpo_learner.GRPOConfig(
      num_generations=args.group, num_iterations=1, beta=0.04, epsilon=0.2)
  reward_rng = np.random.default_rng(args.seed)

  def random_reward(prompts, completions, **_):
    return list(reward_rng.random(len(completions)))

  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, algo_config=algo_cfg, reward_fns=random_reward)

  # Thin per-phase timers on this RLCluster instance (the learner calls these methods).
  phases = {"rollout": [], "ref_logps": [], "update": []}

  def timed(name, fn, block=False, check=None):
    def wrapper(*a, **kw):
      start = time.perf_counter()
      out = fn(*a, **kw)
      if block:
        jax.block_until_ready(out)
      phases[name].append(time.perf_counter() - start)
      if check:
        check(out)
      return out
    return wrapper

  def full_rows(out):  # the workload: 64 rows, each all --new_tokens long (EOS never drawn)
    lens = [len(t) for t in out.tokens]
    assert lens == [args.new_tokens] * (args.prompts * args.group), lens

  cluster.generate = timed("rollout", cluster.generate, check=full_rows)
  cluster.get_ref_per_token_logps = timed("ref_logps", cluster.get_ref_per_token_logps, True)
  cluster.update_actor = timed("update", cluster.update_actor)  # ends in wait_for_all

  rng = np.random.default_rng(args.seed)
  stamps = []

  def batches():
    """1 warm-up + --iters batches of 8 prompt strings; stamps each request."""
    for _ in range(1 + args.iters):
      stamps.append(time.perf_counter())
      prompts = rng.integers(1, vocab, size=(args.prompts, args.prompt_len))
      # An array, not a list: tunix np.repeat()s every pytree leaf G times.
      yield {"prompts": np.array([" ".join(map(str, p)) for p in prompts])}
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    stamps.append(time.perf_counter())  # tunix asked past the last batch: training is over

  learner.train(batches())
  steps = list(np.diff(stamps))
  compile_s, times = float(steps[0]), [float(s) for s in steps[1:]]
  assert len(times) == args.iters, (len(stamps), args.iters)
  assert cluster.actor_trainer.train_steps == 1 + args.iters, cluster.actor_trainer.train_steps
  med = statistics.median(times)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  phase_med = {k: statistics.median(v[1:]) for k, v in phases.items() if len(v) > 1}
  rows = args.prompts * args.group
  print(f"tunix GRPO {jax.__version__}  {'moe' if args.moe else 'dense'}  rows {rows}  "
        f"steps {' '.join(f'{t:.2f}' for t in times)}s  median {med:.3f}s  "
        f"warm-up {compile_s:.1f}s  peak RSS {rss / 2**30:.2f} GiB  phases "
        + " ".join(f"{k} {v:.2f}s" for k, v in phase_med.items()))
  print(json.dumps(dict(peer="google-tunix 0.1.7 GrpoLearner", moe=args.moe, step_seconds=times,
                        median_step_s=med, peak_rss_bytes=rss, compile_s=compile_s,
                        phase_median_s=phase_med, rows=rows, new_tokens=args.new_tokens, microbatches=args.microbatches,
                        jax=jax.__version__)))


if __name__ == "__main__":
  main()
