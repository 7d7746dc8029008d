"""Next-token training: pretraining, cold-start SFT and distillation share one loss.

A batch is a dict of [B, T] arrays: `tokens`, `loss_mask` (1 where the token is a target:
every real token for pretraining, only completion tokens for SFT), `segment_ids` (0 =
padding; packed rows number their examples 1, 2, ...) and `positions`.

With data.pack, rows hold several examples (r1jax/packing.py); with data.general_path,
every batch takes data.general_ratio of its examples from that file (non-reasoning data,
DeepSeek-R1 sec. 2.3.3). In a pipeline, an sft stage after rejection sampling reads its
samples as data.path (r1jax/train.py, Handover).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import microbatch
from r1jax import state as state_lib
from r1jax.model.logprobs import token_logprobs_from_hidden
from r1jax.model.transformer import token_logprobs


def next_token_mask(batch, shift: int = 1):
  """Targets tokens[:, shift:] from positions [:, :-shift], within one segment only."""
  seg = batch["segment_ids"]
  same = (seg[:, shift:] == seg[:, :-shift]) & (seg[:, shift:] > 0)
  return batch["loss_mask"][:, shift:].astype(jnp.float32) * same


def rows_with_tokens(batch):
  """How many rows hold any token: the rows the sequence-wise balance loss averages over."""
  return jnp.any(batch["segment_ids"] > 0, axis=-1).sum()


def loss_totals(batch, mtp_depth: int = 0) -> dict:
  """The normalisers of lm_loss's terms over a whole batch, for a pass over part of it:
  target tokens, rows with any token (the balance loss is a mean over sequences) and,
  per MTP depth, that depth's target tokens."""
  totals = dict(tokens=next_token_mask(batch).sum(), rows=rows_with_tokens(batch))
  if mtp_depth:
    totals["mtp_tokens"] = jnp.stack([next_token_mask(batch, j + 2).sum() for j in range(mtp_depth)])
  return totals


def lm_loss(model, batch, mtp_weight: float = 0.0, totals=None):
  """Mean negative log-likelihood over target tokens (+ weighted MTP loss, DeepSeek-V3 eq. 25).

  totals (`loss_totals` of a larger batch this one is part of): every mean divides by
  the larger batch's count instead of this batch's, so the parts' losses, gradients and
  metrics sum to the whole batch's (gradient accumulation, r1jax/microbatch.py)."""
  tokens = batch["tokens"]
  mask = next_token_mask(batch)
  # model.logits_chunk tokens at a time through the vocabulary projection (r1jax.model.logprobs).
  h_btd, aux = model(tokens, batch["positions"], batch["segment_ids"], return_hidden=True)
  logp = token_logprobs_from_hidden(model.head, h_btd[:, :-1], tokens[:, 1:], model.cfg.logits_chunk)
  n = jnp.maximum(mask.sum() if totals is None else totals["tokens"], 1.0)
  loss = -(logp * mask).sum() / n
  metrics = dict(nll=loss, tokens=mask.sum())
  if "balance_loss" in aux:  # complementary sequence-wise balance loss (DeepSeek-V3 eq. 17)
    balance = aux["balance_loss"]  # a mean over this batch's rows with tokens
    if totals is not None:
      balance = balance * rows_with_tokens(batch) / jnp.maximum(totals["rows"], 1)
    metrics["balance_loss"] = balance
    loss = loss + balance
  # The MTP head's logits stay whole even with model.logits_chunk: the model returns them
  # as aux["mtp_logits"] [D_mtp, B, T, V], so with mtp_depth > 0 the peak still holds those.
  if "mtp_logits" in aux and mtp_weight:
    mtp_losses = []
    for j in range(aux["mtp_logits"].shape[0]):
      shift = j + 2
      m = next_token_mask(batch, shift)
      lp = token_logprobs(aux["mtp_logits"][j][:, :-shift], tokens[:, shift:])
      count = m.sum() if totals is None else totals["mtp_tokens"][j]
      mtp_losses.append(-(lp * m).sum() / jnp.maximum(count, 1.0))
    mtp = jnp.mean(jnp.stack(mtp_losses))
    metrics["mtp_nll"] = mtp
    loss = loss + mtp_weight * mtp
  return loss, (metrics, aux.get("experts"))


def make_step(graphdef, tx, mtp_weight: float = 0.0, bias_rate: float = 0.0, microbatches: int = 1):
  """The pure step: loss, gradients, optimizer, then the non-gradient MoE bias nudge.

  microbatches = k > 1: the gradient is summed over k forward + backward passes of
  B / k rows each (r1jax/microbatch.py); every pass normalises by the whole batch's
  counts (`loss_totals`), so the loss, metrics, gradient and the router-bias update are
  the one-pass values up to float summation order (tests/test_sft_microbatches.py).
  """

  def grads_of(params, other, batch, totals=None):
    def loss_fn(p):
      return lm_loss(state_lib.merge(graphdef, p, other), batch, mtp_weight, totals)
    (loss, (metrics, experts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, (loss, metrics, experts)

  def step(state: state_lib.TrainState, batch):
    if microbatches == 1:
      grads, (loss, metrics, experts) = grads_of(state.params, state.other, batch)
      valid = batch["segment_ids"] > 0
    else:
      mtp_depth = state_lib.merge(graphdef, state.params, state.other).cfg.mtp_depth
      totals = loss_totals(batch, mtp_depth if mtp_weight else 0)
      parts = microbatch.split_rows(batch, microbatches)
      grads, (losses, metrics, experts) = microbatch.summed_gradients(
          lambda part: grads_of(state.params, state.other, part, totals), state.params, parts)
      loss, metrics = losses.sum(), jax.tree.map(lambda m: m.sum(0), metrics)
      # The bias update counts each expert's load over all rows: the parts side by side.
      valid = (parts["segment_ids"] > 0).reshape((-1,) + batch["segment_ids"].shape[1:])
      if experts is not None:  # [parts, L, B / k, T, k] -> [L, B, T, k] in the same row order
        experts = jnp.moveaxis(experts, 0, 1).reshape((experts.shape[1], -1) + experts.shape[3:])
    new_state, opt_metrics = state_lib.apply_gradients(state, grads, tx, loss)
    other, moe_metrics = state_lib.update_router_bias(
        graphdef, new_state.params, new_state.other, experts, valid, bias_rate)
    new_state = new_state.replace(other=other)
    return new_state, dict(loss=loss, **metrics, **opt_metrics, **moe_metrics)

  return step


@functools.partial(jax.jit, static_argnums=(0,))
def eval_loss(graphdef, params, other, batch):
  model = state_lib.merge(graphdef, params, other)
  return lm_loss(model, batch)[0]


# --- The stage loop ---------------------------------------------------------------------


NO_TRACE = "guess"


def hide_traces(examples, trace_fraction: float):
  """Keeps the worked trace in `trace_fraction` of the examples (chosen by a hash of the
  id, so the choice is fixed across epochs and resumes); the rest skip the work and
  write only "guess" inside <think>. A base model pretrained on such a corpus often
  answers without reasoning -- the situation R1-Zero starts from, where RL must find
  out that reasoning pays (DeepSeek-R1 sec. 2.2.4: accuracy and length grow together)."""
  if trace_fraction >= 1.0:
    return examples
  out = []
  for e in examples:
    keep = (zlib.crc32(str(e.get("id", e["prompt"])).encode()) % 10_000) < trace_fraction * 10_000
    out.append(e if keep else dict(e, trace=NO_TRACE))
  return out


def make_batch(examples, tokenizer, seq_len: int, template: str, completion_only: bool,
               trace_fraction: float = 1.0):
  """[B, T] arrays for lm_loss: prompt + <think>trace</think><answer>answer</answer> + EOS."""
  from r1jax.data import templates  # pylint: disable=import-outside-toplevel
  batch = templates.sft_batch(hide_traces(examples, trace_fraction), tokenizer, seq_len, template)
  if not completion_only:  # pretraining: every real token is a target
    batch["loss_mask"] = batch["segment_ids"].copy()
  b, t = batch["tokens"].shape
  batch["positions"] = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return batch


def run(config, stage_name: str, workdir: str, init_from: str | None = None) -> dict:
  """Runs a next-token stage (`pretrain` or `sft`) to config.train.steps; resumable."""
  from r1jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from r1jax import optim, packing, parallel, session  # pylint: disable=import-outside-toplevel
  from r1jax.eval import evaluate_stage  # pylint: disable=import-outside-toplevel
  from r1jax.runlog import MetricsLog  # pylint: disable=import-outside-toplevel

  config_lib.refuse_stage_problems(stage_name, config_lib.train_row_split_problems(config))
  steps = config.train.steps
  tx = optim.make_optimizer(config.optim, steps)
  st = session.open_stage(config, stage_name, workdir, tx, init_from)
  train = session.load_examples(config, "train")
  test = session.load_examples(config, "test")
  missing = sum("trace" not in row for row in train)
  if missing:
    raise session.DataError(f"{missing} of {len(train)} training rows have no 'solution' "
                            f"(reasoning trace) field, which {stage_name} trains on")
  completion_only = stage_name != "pretrain"
  template = config.data.template
  trace_fraction = config.data.trace_fraction if stage_name == "pretrain" else 1.0
  batches = packing.training_batches(config, train, st.tokenizer, completion_only, trace_fraction)
  if st.data_state:  # {"batches": iterator state, "base_eval": ...}
    batches.set_state(st.data_state["batches"])
  eval_batch = parallel.put_global_batch(st.mesh, make_batch(
      test[:config.train.batch_size], st.tokenizer, config.train.seq_len, template,
      completion_only, trace_fraction))

  shardings = session.state_shardings(st.state)
  step_fn = jax.jit(make_step(st.graphdef, tx, config.train.mtp_weight, config.train.bias_update_rate,
                              config.train.microbatches),
                    in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
  log = MetricsLog(workdir, steps, stage_name)
  eval_before = float(eval_loss(st.graphdef, st.state.params, st.state.other, eval_batch))
  base_eval = None
  if config.eval.after_sft and stage_name == "sft":  # kept across resumes in the checkpoint
    base_eval = (st.data_state or {}).get("base_eval") or evaluate_stage(config, st, test)
  first_loss = last = None
  for step in range(st.start_step, steps):
    # Every process draws the same global batch and puts its own rows on its devices.
    batch = parallel.put_global_batch(st.mesh, next(batches))
    # Under the mesh, MoE layers dispatch each device's tokens in a shard_map (with an
    # all_to_all when mesh.expert > 1); with one device XLA runs them as they are.
    with jax.set_mesh(st.mesh):
      st.state, metrics = step_fn(st.state, batch)
    if int(st.state.nonfinite_run) >= config.train.max_nonfinite_steps:
      raise FloatingPointError(
          f"[{stage_name}] {int(st.state.nonfinite_run)} consecutive non-finite steps at step "
          f"{step + 1}; stopped. The last good checkpoint in {workdir} is intact. Lower optim.lr "
          f"or check the data.")
    if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
      row = log.write(step + 1, dict(metrics, examples=batches.last_examples),
                      show=("loss", "grad_norm"))
      first_loss = row["loss"] if first_loss is None else first_loss
      last = row["loss"]
    if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == steps:
      st.save(step + 1, dict(batches=batches.get_state(), base_eval=base_eval))
  log.close()
  eval_after = float(eval_loss(st.graphdef, st.state.params, st.state.other, eval_batch))
  summary = dict(stage=stage_name, steps=steps, first_logged_loss=first_loss, final_loss=last,
                 heldout_nll_before=eval_before, heldout_nll_after=eval_after,
                 data_path=config.data.path, general_path=config.data.general_path,
                 packed=bool(config.data.pack))
  print(f"[{stage_name}] held-out loss {eval_before:.3f} -> {eval_after:.3f}", flush=True)
  if config.eval.after_sft and stage_name == "sft":
    final_eval = evaluate_stage(config, st, test)
    print(f"[sft] pass@1 {base_eval['pass@1']:.3f} -> {final_eval['pass@1']:.3f}", flush=True)
    summary.update(base_accuracy=base_eval["pass@1"], final_accuracy=final_eval["pass@1"],
                   base_eval=base_eval, final_eval=final_eval)
  return summary

