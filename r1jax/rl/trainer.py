"""The GRPO stage: rollouts -> rewards -> advantages -> jitted policy update.

One step (DeepSeek-R1 sec. 2.2; DeepSeekMath eq. 3):
  1. B questions, G samples each from the current policy (r1jax.sampling), with the
     sampler's log-probs as pi_old and, for MoE, the experts it chose.
  2. Rule rewards on the host (r1jax.rl.rewards), group-relative advantages.
  3. pi_ref log-probs when beta > 0 (no reference forward at all when beta = 0).
  4. `mu` passes over the batch in `minibatches` optimizer steps (one jitted function).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import checkpoint, optim, parallel, session
from r1jax import config as config_lib
from r1jax import state as state_lib
from r1jax.data import templates
from r1jax.eval import completions_of, evaluate_stage, stop_params
from r1jax.microbatch import merge_rows, split_rows, spread_rows, summed_gradients
from r1jax.model.logprobs import token_logprobs_from_hidden
from r1jax.rl import grpo, rewards
from r1jax.runlog import MetricsLog
from r1jax.sampling import continuous
from r1jax.sampling.sampler import expert_parallel_specs, generate, prompt_positions, row_axes


def sequence_batch(prompt_ids, prompt_mask, out, group_size: int) -> dict:
  """Prompt + completion rows [B*G, Tp + N] for the trainer's forward."""
  ids = np.repeat(prompt_ids, group_size, axis=0)
  pmask = np.repeat(prompt_mask, group_size, axis=0)
  tokens = np.concatenate([ids, np.asarray(out["tokens"])], axis=1)
  seg = np.concatenate([pmask, np.asarray(out["mask"])], axis=1).astype(np.int32)
  positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  batch = dict(tokens=tokens.astype(np.int32), segment_ids=seg, positions=positions,
               completion_mask=np.asarray(out["mask"], np.int32),
               old_logp=np.asarray(out["logprobs"], np.float32))
  if out.get("experts") is not None:  # stored batch-major [B*G, L, Tp + N, k] so minibatches split axis 0
    batch["experts"] = np.moveaxis(np.concatenate(
        [np.asarray(out["prompt_experts"]), np.asarray(out["experts"])], axis=2), 1, 0)
  return batch


def completion_logprobs(graphdef, params, other, batch, prompt_len: int, temperature: float,
                        replay: bool, with_entropy: bool = False, group_size: int = 0):
  """log pi(completion token) [B, N] at the sampling temperature (fp32), and with_entropy
  the entropy of each of those distributions [B, N].

  group_size = G > 1: rows come in groups of G that repeat one prompt (sequence_batch),
  and the prompt runs once per group (`prefix_shared_hidden`); 0: every row runs whole.
  Only the positions that predict a completion token go through the vocabulary
  projection, model.logits_chunk tokens at a time (0: all at once; r1jax.model.logprobs).
  """
  model = state_lib.merge(graphdef, params, other)
  forced = batch.get("experts") if replay else None
  if forced is not None:
    forced = jnp.moveaxis(forced, 0, 1)  # [L, B, T, k] as the model takes it
  if group_size > 1:
    h_bnd = prefix_shared_hidden(model, batch, prompt_len, group_size, forced)
  else:
    h_btd, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], forced_experts=forced,
                     return_hidden=True)
    h_bnd = h_btd[:, prompt_len - 1:-1]
  return token_logprobs_from_hidden(model.head, h_bnd, batch["tokens"][:, prompt_len:], model.cfg.logits_chunk,
                                    temperature, with_entropy)


def prefix_shared_hidden(model, batch, prompt_len: int, group_size: int, forced_lrtk=None):
  """Final-normed hidden states [R, N, D] of the model at each completion token's
  preceding position, with the prompt run once per group of G rows instead of G times.

  The G rows of a group repeat one prompt, so their prompt hidden states are equal. The
  prompt (one row per group) runs once and returns each layer's keys and values; the
  completions run after it, each token attending to its group's prompt keys (copied to
  the G rows, Tp keys a layer: attention.with_prompt) and causally to its own row.
  Backpropagation sums the G rows' gradients into the prompt's keys. It
  does B*Tp + R*N token positions of work instead of R*(Tp + N) (R = B*G), e.g. 17.5%
  fewer at Tp = 32, N = 128, G = 8; the values equal the whole-row forward's up to float
  rounding (tests/test_prefix_shared.py). This is the idea of Hydragen (Juravsky et al.,
  2024) / cascade attention, applied to the training forward.
  """
  r, t = batch["tokens"].shape
  g, n = group_size, t - prompt_len
  b = r // g
  first = lambda x: x.reshape((b, g) + x.shape[1:])[:, 0]  # pylint: disable=unnecessary-lambda-assignment
  prompt_ids = first(batch["tokens"])[:, :prompt_len]
  prompt_seg = first(batch["segment_ids"])[:, :prompt_len]
  forced_p = forced_c = None
  if forced_lrtk is not None:  # [L, R, T, k]
    forced_p = forced_lrtk.reshape((forced_lrtk.shape[0], b, g) + forced_lrtk.shape[2:])[:, :, 0, :prompt_len]
    forced_c = forced_lrtk[:, :, prompt_len:]
  # Left padding: the prompt's real tokens take positions 0 .. length - 1, as in the sampler.
  h_btd, aux = model(prompt_ids, prompt_positions(prompt_seg, t), prompt_seg, forced_experts=forced_p, mtp=False,
                     return_hidden=True, return_kv=True)
  # Completion token j of a row sits at position prompt length + j: one each, also past
  # the stop (those tokens are masked out as keys and in the loss).
  lengths_b = prompt_seg.sum(axis=1).astype(jnp.int32)
  pos_c = jnp.repeat(lengths_b, g)[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  h_rnd, _ = model(batch["tokens"][:, prompt_len:], pos_c, batch["segment_ids"][:, prompt_len:],
                   cache=aux["prompt"], forced_experts=forced_c, return_hidden=True)
  return jnp.concatenate([jnp.repeat(h_btd[:, -1:], g, axis=0), h_rnd[:, :-1]], axis=1)


def shared_prefix_group(rl, rows: int) -> int:
  """G when a forward over `rows` rows can run each group's prompt once (rl.shared_prefix
  and whole groups: a minibatch of the update holds whole groups when the question count
  divides by rl.minibatches), else 0 (every row runs whole)."""
  return rl.group_size if rl.shared_prefix and rows % rl.group_size == 0 else 0


def pass_logprobs(graphdef, rl, prompt_len: int, params, other, batch, with_entropy: bool = False):
  """completion_logprobs of one forward pass over `batch` with the stage's settings: the
  sampling temperature, routing replay, and each group's prompt run once when the rows
  hold whole groups."""
  return completion_logprobs(graphdef, params, other, batch, prompt_len, rl.temperature, rl.routing_replay,
                             with_entropy, group_size=shared_prefix_group(rl, batch["tokens"].shape[0]))


def make_reference_logprobs(graphdef, rl, prompt_len: int):
  """(params, other, batch) -> log pi [R, N] of the batch's completion tokens (the
  reference policy's when given its params), in rl.minibatches x rl.microbatches passes
  of the update's micro-batch rows (lax.map): the reference forward then never holds
  more rows than the update does, and on CPU it runs ~1.4x faster than one pass over
  all rows (bench/NOTES.md, session 10)."""
  parts, g = rl.minibatches * rl.microbatches, rl.group_size
  one_pass = functools.partial(pass_logprobs, graphdef, rl, prompt_len)

  def reference_logprobs(params, other, batch):
    if parts == 1:
      return one_pass(params, other, batch)
    passes = split_rows(batch, parts, g)
    return merge_rows(jax.lax.map(lambda b: one_pass(params, other, spread_rows(b)), passes), g)

  return reference_logprobs


def make_update(graphdef, tx, rl, prompt_len: int):
  """(state, batch) -> (state, metrics): mu passes x minibatches optimizer steps, each
  minibatch's gradient summed over rl.microbatches forward + backward passes.

  Gradient accumulation: a micro-batch's loss divides by the whole minibatch's
  normaliser (grpo.loss_denominator), so the micro-batch gradients sum to the
  minibatch's, and the logged loss and metrics are computed once over the minibatch's
  log-probs: the same values as one pass, up to float summation order
  (tests/test_grad_accumulation.py). Only one micro-batch's activations are live at a time; on
  CPU, micro-batches that fit the cache also run faster (bench/NOTES.md, session 10).
  """
  n_mb, n_micro, g = rl.minibatches, rl.microbatches, rl.group_size
  logprobs = functools.partial(pass_logprobs, graphdef, rl, prompt_len, with_entropy=True)

  def loss(logp, mb, denominator=None):
    return grpo.policy_loss(
        logp, mb["old_logp"], mb["adv"], mb["completion_mask"], eps_low=rl.eps_low,
        eps_high=rl.eps_high, dual_clip_c=rl.dual_clip or None, ratio_level=rl.ratio_level,
        ref_logp_bt=mb.get("ref_logp"), beta=rl.beta, kl_kind=rl.kl_kind,
        aggregation=rl.aggregation, max_len=rl.max_new_tokens, denominator=denominator)

  def grads_and_logprobs(params, other, mb, denominator=None):
    def loss_fn(p):
      logp, entropy = logprobs(p, other, mb)
      return loss(logp, mb, denominator)[0], (logp, entropy)
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, aux

  def one_minibatch(state, mb):
    mb = spread_rows(mb)
    if n_micro == 1:
      grads, (logp, entropy) = grads_and_logprobs(state.params, state.other, mb)
    else:
      denominator = grpo.loss_denominator(mb["completion_mask"], rl.aggregation, rl.max_new_tokens)

      grads, (logp, entropy) = summed_gradients(
          lambda micro: grads_and_logprobs(state.params, state.other, micro, denominator),
          state.params, split_rows(mb, n_micro, g))
      logp, entropy = merge_rows(logp, g), merge_rows(entropy, g)
    value, metrics = loss(jax.lax.stop_gradient(logp), mb)
    valid = mb["completion_mask"] > 0
    metrics["entropy"] = jnp.where(valid, entropy, 0).sum() / jnp.maximum(valid.sum(), 1)
    state, opt_metrics = state_lib.apply_gradients(state, grads, tx, value)
    return state, dict(metrics, **opt_metrics)

  def update(state, batch):
    split = split_rows(batch, n_mb, g)
    metrics = None
    for _ in range(rl.mu):
      state, metrics = jax.lax.scan(one_minibatch, state, split)
    return state, jax.tree.map(lambda m: m[0], metrics)  # the first minibatch of the last pass

  return update


def rollout(st, rl, tok, examples, rng, prompt_len: int, weights, fns):
  """Samples G completions per example and scores them; host-side numpy results.

  Every process samples the same global prompts with the same key (the mesh splits the
  rows) and reads the whole output back; each scores its share of the groups
  (`score_groups`) and the rewards are gathered, so rewards, advantages and logged
  figures are the same on every host."""
  prompts = [e["prompt"] for e in examples]
  ids, mask = templates.encode_prompts(prompts, tok, prompt_len, st.config.data.template)
  params = stop_params(tok, rl.max_new_tokens, rl.temperature, rl.top_p)
  params = dataclasses.replace(params, top_k=rl.top_k, cache_segments=rl.cache_segments)
  state = (st.state.params, st.state.other)
  # The prompts split over the mesh when the weights allow (parallel.rollout_mesh),
  # with plain or continuous batching: otherwise every device would decode every row.
  mesh = parallel.rollout_mesh(state, len(prompts))
  out = generate(st.graphdef, state, prompt_ids_bt=ids, prompt_mask_bt=mask, rng=rng,
                 group_size=rl.group_size, params=params, slots=rl.slots or None, mesh=mesh)
  out = parallel.to_host(out)
  texts = completions_of(tok, out)
  g = rl.group_size
  total, per_fn, stats = score_groups(weights, fns, examples, texts, g)
  lengths = np.asarray(out["mask"]).sum(-1)
  if rl.overlong_buffer:
    total = total + np.asarray(grpo.overlong_penalty(
        lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty))
  return dict(ids=ids, mask=mask, out=out, texts=texts, rewards=total.reshape(-1, g),
              per_fn=per_fn, stats=stats, lengths=lengths)


def rollout_layout(st, rl, n_prompts: int) -> str:
  """One line on how `rollout` places its rows on the devices (printed at stage start)."""
  state = (st.state.params, st.state.other)
  mesh = parallel.rollout_mesh(state, n_prompts)
  if mesh is None:
    where = f"{n_prompts} prompts in one program partitioned by XLA from the weights' shardings"
    return where + (f", continuous batching over {rl.slots} slots" if rl.slots else "")
  shards = int(np.prod([mesh.shape[a] for a in row_axes(mesh)]))
  tensor = mesh.shape.get("tensor", 1)
  where = f"{n_prompts} prompts split over {shards} " + (
      "devices" if tensor == 1 else f"batch shards, each tensor-parallel over {tensor} devices")
  if rl.slots:  # continuous.generate_continuous: its own batcher on every shard, experts whole
    return f"{where}, continuous batching over {continuous.slots_per_shard(rl.slots, shards)} slots on each"
  ep = expert_parallel_specs(state, mesh)[1]  # as generate(mesh=...) splits the experts
  return where + (f", routed experts split over expert={ep}" if ep > 1 else "")


def score_groups(weights, fns, examples, texts, group_size: int):
  """Rule rewards of the G completions of each example -> (total [B*G] float32,
  {name: [B*G] float32}, RewardStats summed over hosts).

  With several processes each scores a contiguous share of the groups
  (`parallel.host_groups`) and the shares are gathered: a code reward's sandbox runs
  once per completion rather than once per host, and a verifier timeout on one host
  cannot make the hosts' advantages differ. A group stays on one host, so a reward
  function may look at a whole group."""
  n_groups, g = len(examples), group_size
  lo, hi = parallel.host_groups(n_groups)
  own = [e for e in examples[lo:hi] for _ in range(g)]
  total, per_fn, stats = rewards.compute_rewards(
      weights, fns, [e["prompt"] for e in own], texts[lo * g:hi * g], example=own,
      answer=[str(e.get("answer", "")) for e in own])
  names = list(per_fn)
  cols = np.asarray([total] + [per_fn[n] for n in names], np.float32).T.reshape(len(own), 1 + len(names))
  if jax.process_count() > 1:
    cols = parallel.allgather_host_rows(cols, n_groups * g)
    fields = [f.name for f in dataclasses.fields(stats)]
    summed = parallel.allgather_host_rows(np.array([[getattr(stats, f) for f in fields]], np.float32),
                                          jax.process_count()).sum(0)
    stats = type(stats)(**{f: type(getattr(stats, f))(v) for f, v in zip(fields, summed)})
  return cols[:, 0], {n: cols[:, 1 + i] for i, n in enumerate(names)}, stats


def run(config, workdir: str, init_from: str | None = None) -> dict:
  """Runs GRPO for config.train.steps steps; resumable; returns the stage summary."""
  config_lib.refuse_stage_problems("grpo", config_lib.grpo_row_split_problems(config))
  rl, steps = config.rl, config.train.steps
  prompt_len = config.train.seq_len - rl.max_new_tokens
  rewards.configure(timeout_s=rl.reward_timeout, n_workers=rl.reward_workers)
  weights, fns = rewards.resolve(rl.reward_weights)
  tx = optim.make_optimizer(config.optim, steps)
  st = session.open_stage(config, "grpo", workdir, tx, init_from)
  tok = st.tokenizer
  train = session.load_examples(config, "train")
  test = session.load_examples(config, "test")[:config.eval.n]
  n_questions = config.train.batch_size
  n_sampled = math.ceil(rl.oversample * n_questions) if rl.dynamic_sampling else n_questions
  it = session.global_iterator(train, n_sampled, config.seed)
  if st.data_state:
    it.set_state(st.data_state["iterator"])

  # The reference policy: a frozen copy, refreshed every rl.ref_refresh_every steps.
  ref = None
  if rl.beta > 0:
    ref = jax.tree.map(jnp.copy, st.state.params)
    if st.data_state.get("has_ref"):
      ref = checkpoint.restore_params(os.path.join(workdir, "reference"), ref)

  def eval_now():
    return evaluate_stage(config, st, test)

  print(f"[grpo] rollouts: {rollout_layout(st, rl, n_sampled)}", flush=True)
  base_eval = st.data_state.get("base_eval") or eval_now()
  print(f"[grpo] base model: pass@1={base_eval['pass@1']:.3f} format={base_eval['format']:.3f}",
        flush=True)
  shardings = session.state_shardings(st.state)
  update = jax.jit(make_update(st.graphdef, tx, rl, prompt_len),
                   in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
  ref_logp_fn = jax.jit(make_reference_logprobs(st.graphdef, rl, prompt_len))
  log = MetricsLog(workdir, steps, "grpo")
  key = jax.random.key(config.seed)
  for step in range(st.start_step, steps):
    t0 = time.time()
    examples = next(it)
    ro = rollout(st, rl, tok, examples, jax.random.fold_in(key, step), prompt_len, weights, fns)
    t_rollout = time.time() - t0
    r_bg = ro["rewards"]
    keep = np.arange(len(examples))
    n_filled = 0
    if rl.dynamic_sampling:
      keep, n_filled = grpo.select_groups(r_bg, n_questions)
      keep = np.asarray(keep)
    rows = (keep[:, None] * rl.group_size + np.arange(rl.group_size)[None]).reshape(-1)
    batch = _select_rows(ro, keep, rows, rl.group_size)
    adv = np.asarray(grpo.group_advantages(jnp.asarray(r_bg[keep]), rl.adv_mode)).reshape(-1)
    batch["adv"] = adv.astype(np.float32)
    t1 = time.time()
    # The forward passes and the update trace under the mesh, so MoE layers dispatch per
    # device (expert-parallel when mesh.expert > 1; the sampler keeps its own partitioning).
    # Each process puts its own rows of the global batch on its devices.
    batch = parallel.put_global_batch(st.mesh, batch)
    with jax.set_mesh(st.mesh):
      if ref is not None:
        batch["ref_logp"] = jax.block_until_ready(ref_logp_fn(ref, st.state.other, batch))
      t_ref = time.time() - t1
      t2 = time.time()
      st.state, metrics = update(st.state, batch)
    metrics = parallel.to_host(metrics)
    t_update = time.time() - t2
    if rl.ref_refresh_every and ref is not None and (step + 1) % rl.ref_refresh_every == 0:
      ref = jax.tree.map(jnp.copy, st.state.params)
    if int(st.state.nonfinite_run) >= config.train.max_nonfinite_steps:
      raise FloatingPointError(
          f"[grpo] {int(st.state.nonfinite_run)} consecutive non-finite updates at step {step + 1}; "
          f"stopped. The last good checkpoint in {workdir} is intact.")
    lengths = ro["lengths"][rows]
    r_kept = r_bg[keep]
    n_tokens = int(np.asarray(ro["out"]["mask"]).sum())
    row = dict(metrics, reward_mean=r_kept.mean(), reward_std=r_kept.std(),
               accuracy=np.mean(ro["per_fn"].get("accuracy", [0.0])),
               format=np.mean(ro["per_fn"].get("format", [0.0])),
               completion_len_mean=lengths.mean(), completion_len_max=lengths.max(),
               clipped_frac=np.mean(lengths >= rl.max_new_tokens),
               zero_variance_frac=np.mean(r_bg.std(axis=1) == 0), groups_filled=n_filled,
               verifier_timeouts=ro["stats"].n_timeouts, verifier_errors=ro["stats"].n_errors,
               t_rollout=t_rollout, t_ref=t_ref, t_update=t_update,
               tokens_per_s=n_tokens / max(time.time() - t0, 1e-9))
    if config.eval.every and (step + 1) % config.eval.every == 0:
      row["eval_pass@1"] = eval_now()["pass@1"]
    if (step + 1) % config.train.log_every == 0 or step + 1 == steps or "eval_pass@1" in row:
      log.write(step + 1, row, show=("reward_mean", "accuracy", "completion_len_mean", "kl",
                                     "eval_pass@1"))
    if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == steps:
      if ref is not None:
        _save_reference(workdir, step + 1, ref, st)
      st.save(step + 1, dict(iterator=it.get_state(), base_eval=base_eval, has_ref=ref is not None))
  log.close()
  final_eval = eval_now()
  print(f"[grpo] pass@1 {base_eval['pass@1']:.3f} -> {final_eval['pass@1']:.3f}", flush=True)
  return dict(stage="grpo", steps=steps, base_accuracy=base_eval["pass@1"],
              final_accuracy=final_eval["pass@1"], base_eval=base_eval, final_eval=final_eval)


def _select_rows(ro, keep, rows, group_size):
  out = {k: v for k, v in ro["out"].items()}
  for name in ("tokens", "mask", "logprobs"):
    out[name] = np.asarray(out[name])[rows]
  for name in ("experts", "prompt_experts"):
    if out.get(name) is not None:
      out[name] = np.asarray(out[name])[:, rows]
  return sequence_batch(ro["ids"][keep], ro["mask"][keep], out, group_size)


def _save_reference(workdir, step, ref, st):
  mgr = checkpoint.manager(os.path.join(workdir, "reference"), keep=1)
  # The counters go on the mesh too: orbax refuses host-local arrays with several processes.
  checkpoint.save(mgr, step, state_lib.replicate_unsharded(state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params=ref, other=st.state.other, opt_state={},
      nonfinite_run=jnp.zeros((), jnp.int32))), {}, st.meta())
