"""The reward-model stage and the "reward_model" reward of GRPO.

DeepSeek-R1 sec. 2.3.4 (all-scenario RL): reasoning prompts keep the rule rewards;
"for general data, we resort to reward models to capture human preferences". The model
is the policy's transformer with a scalar head: r(x, y) = w . h_last + b, where h_last is
the final-norm hidden state of the last real token of prompt + response + EOS, trained
on preference pairs with the Bradley-Terry loss

  L = -mean log sigmoid(r(x, y_chosen) - r(x, y_rejected))

(the pairwise loss of InstructGPT / DeepSeek-V3's reward models).

Data: reward_model.data_path JSONL rows {prompt, chosen, rejected}; empty, synthetic
pairs from data.task (chosen: the reference completion; rejected: a wrong answer or an
answer without reasoning). Checkpoints carry the tokenizer, template and length, so
GRPO scores exactly the text layout the model was trained on.

In GRPO (`prepare_grpo`, called by r1jax/train.py): with reward_model.path set (in a
pipeline, the last reward_model stage) and weight > 0, "reward_model:<weight>" joins
rl.reward_weights. reward_model.scope="unverifiable" scores only rows that no rule
verifies (a `task` outside r1jax.data.tasks.TASKS, or "verifiable": false) and gives the
rest 0, so the sum is rule rewards for reasoning prompts and the learned reward for the
others; "all" scores every row.

Shapes: B rows, P pairs (B = 2P: chosen rows, then rejected rows), T length, D model.
"""

from __future__ import annotations

import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import checkpoint, microbatch, parallel, session
from r1jax import config as config_lib
from r1jax import state as state_lib
from r1jax.data import templates, tokenizer as tokenizer_lib
from r1jax.model.config import ModelConfig
from r1jax.model.layers import param
from r1jax.model.transformer import Transformer

KIND = "reward_model"  # checkpoint meta "kind": policy stages refuse these weights


class RewardModel(nnx.Module):
  """The transformer trunk (`lm`, loadable from any policy checkpoint) + a scalar head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.lm = Transformer(cfg, rngs)
    self.score_w = param(rngs, (cfg.d_model,), ("embed",), cfg.init_std)
    self.score_b = param(rngs, (), (), 0.0)

  def __call__(self, tokens_bt, positions_bt, segment_ids_bt):
    """Rewards [B] (fp32) at each row's last real token (rows are right-padded)."""
    h_btd = hidden_states(self.lm, tokens_bt, positions_bt, segment_ids_bt)
    last_b = jnp.maximum((segment_ids_bt > 0).sum(axis=1) - 1, 0)
    h_bd = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,d->b", h_bd.astype(jnp.float32), self.score_w[...]) + self.score_b[...]


def hidden_states(lm: Transformer, tokens_bt, positions_bt, segment_ids_bt):
  """Final-norm hidden states [B, T, D]: Transformer.__call__ without the LM head (no
  cache, no MTP; model.remat and attention_chunk apply); tests/test_reward_model.py
  checks lm.head(this) == lm(...) logits."""
  return lm(tokens_bt, positions_bt, segment_ids_bt, mtp=False, return_hidden=True)[0]


def bt_loss(r_chosen_p, r_rejected_p, n_pairs=None):
  """Bradley-Terry negative log-likelihood, mean over pairs; n_pairs: divide by that
  many (a larger step's pairs, for a pass over part of them) instead of these P."""
  n = r_chosen_p.shape[0] if n_pairs is None else n_pairs
  return -jnp.sum(jax.nn.log_sigmoid(r_chosen_p - r_rejected_p)) / n


# ----------------------------------------------------------------------------- data


def encode_row(prompt: str, response: str, tokenizer, seq_len: int, template: str) -> list[int]:
  """Prompt (as the policy sees it) + response + EOS, cut at seq_len."""
  ids = templates.encode_prompt(prompt, tokenizer, template)
  return (ids + tokenizer.encode(response) + [tokenizer.eos_id])[:seq_len]


def rows_batch(rows: list[list[int]], seq_len: int, pad_id: int) -> dict:
  """Right-padded tokens, segment_ids and positions, each [B, T]."""
  tokens = np.full((len(rows), seq_len), pad_id, np.int32)
  seg = np.zeros((len(rows), seq_len), np.int32)
  for b, row in enumerate(rows):
    tokens[b, :len(row)] = row
    seg[b, :len(row)] = 1
  positions = np.tile(np.arange(seq_len, dtype=np.int32), (len(rows), 1))
  return dict(tokens=tokens, segment_ids=seg, positions=positions)


def pairs_batch(pairs: list[dict], tokenizer, seq_len: int, template: str) -> dict:
  """[2P, T] arrays: the P chosen rows, then the P rejected rows."""
  rows = [encode_row(p["prompt"], p[side], tokenizer, seq_len, template)
          for side in ("chosen", "rejected") for p in pairs]
  return rows_batch(rows, seq_len, tokenizer.pad_id)


def synthetic_pairs(examples: list[dict]) -> list[dict]:
  """Preference pairs from task examples: the reference completion is chosen over a wrong
  answer with the same reasoning, or (every other example) over an answer with none."""
  from r1jax.data.templates import completion_text  # pylint: disable=import-outside-toplevel
  pairs = []
  for i, e in enumerate(examples):
    answer = str(e["answer"])
    chosen = completion_text(e.get("trace", ""), answer)
    if i % 2:
      rejected = f"<answer>{answer}</answer>"
    else:
      shift = 1 + zlib.crc32(answer.encode()) % 9
      wrong = str(int(answer) + shift) if answer.lstrip("-").isdigit() else answer + "0"
      rejected = completion_text(e.get("trace", ""), wrong)
    pairs.append(dict(prompt=e["prompt"], chosen=chosen, rejected=rejected))
  return pairs


def load_pairs(config) -> tuple[list[dict], list[dict]]:
  """(train pairs, test pairs): reward_model.data_path / test_path (the last tenth of the
  train file when no test file), or synthetic pairs from the task."""
  from r1jax.data import sources  # pylint: disable=import-outside-toplevel
  rm = config.reward_model
  if not rm.data_path:
    n_test = max(rm.n_pairs // 4, 1)
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.data.n_train, c.data.n_test = rm.n_pairs, n_test
    return (synthetic_pairs(session.load_examples(c, "train")[:rm.n_pairs]),
            synthetic_pairs(session.load_examples(c, "test")[:n_test]))

  def read(path, key):
    try:
      source = sources.read_records(path, required=("prompt",))
    except (FileNotFoundError, sources.BadRowError, ValueError) as e:
      raise session.DataError(f"reward_model.{key}={path!r}: {e}") from None
    rows = [dict(source[i]) for i in range(len(source))]
    bad = [i for i, r in enumerate(rows)
           if not all(isinstance(r.get(k), str) for k in ("chosen", "rejected"))]
    if bad:
      raise session.DataError(f"reward_model.{key}={path!r}: {len(bad)} rows lack string "
                              f"'chosen' and 'rejected' fields (first: row {bad[0] + 1})")
    return rows

  train = read(rm.data_path, "data_path")
  if rm.test_path:
    return train, read(rm.test_path, "test_path")
  n_test = max(len(train) // 10, 1)
  if len(train) <= n_test:
    raise session.DataError(f"reward_model.data_path={rm.data_path!r}: {len(train)} pairs are "
                            f"too few to hold out a test tenth; add rows or set test_path")
  return train[:-n_test], train[-n_test:]


# ------------------------------------------------------------------------- the stage


def meta(config) -> dict:
  """Checkpoint metadata: the trunk's shape and the text layout it was trained on."""
  return dict(model=config.model.to_dict(), stage="reward_model", kind=KIND,
              tokenizer=config.data.tokenizer, tokenizer_path=config.data.tokenizer_path,
              template=config.data.template, seq_len=config.train.seq_len)


def create_model(cfg: ModelConfig, seed: int, mesh, init_from: str | None = None) -> RewardModel:
  """A sharded RewardModel; its trunk loaded from a policy checkpoint when given.

  As for policy hand-overs (session.open_stage), only nnx.Param is restored."""
  with jax.set_mesh(mesh):
    model = parallel.create_sharded_model(lambda: RewardModel(cfg, nnx.Rngs(seed)), mesh)
    if init_from:
      nnx.update(model.lm, checkpoint.restore_params(init_from, nnx.state(model.lm, nnx.Param)))
  return model


def open_stage(config, workdir: str, tx, init_from: str | None) -> session.Stage:
  """session.open_stage for a RewardModel: resume from workdir, else the trunk from init_from."""
  mcfg, tok, mesh, mgr = session.prepare_workdir(config, workdir)
  resume = mgr.latest_step() is not None
  model = create_model(mcfg, config.seed, mesh, None if resume else init_from)
  graphdef, state = state_lib.create_state(model, tx)
  data_state, start = {}, 0
  if resume:
    state, data_state = checkpoint.restore(mgr, state)
    start = int(state.step)
    print(f"[reward_model] resumed from {workdir} at step {start}", flush=True)
  elif init_from:
    print(f"[reward_model] trunk initialised from {init_from}", flush=True)
  session.write_config(config, workdir)
  return session.Stage(config, "reward_model", workdir, mesh, tok, graphdef, state, tx, mgr,
                       data_state, start)


def make_step(graphdef, tx, microbatches: int = 1):
  """The pure step: Bradley-Terry loss over [2P, T] rows (P chosen, then their P
  rejected), gradients, optimizer. An MoE trunk's balancing bias stays as loaded: the
  scalar head, not routing, should learn the preference (as in RL, DESIGN.md).

  microbatches = k > 1: the gradient is summed over k passes of P / k pairs each, every
  pass dividing by all P pairs (r1jax/microbatch.py): the one-pass step up to float
  summation order (tests/test_reward_model.py)."""

  def grads_of(params, other, rows, n_pairs):
    def loss_fn(p):
      r_b = state_lib.merge(graphdef, p, other)(rows["tokens"], rows["positions"], rows["segment_ids"])
      r_chosen, r_rejected = jnp.split(r_b, 2)
      margin = r_chosen - r_rejected
      return bt_loss(r_chosen, r_rejected, n_pairs), dict(accuracy=(margin > 0).sum() / n_pairs,
                                                          margin=margin.sum() / n_pairs)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, (loss, metrics)

  def step(state, batch):
    n_pairs = batch["tokens"].shape[0] // 2
    if microbatches == 1:
      grads, (loss, metrics) = grads_of(state.params, state.other, batch, n_pairs)
    else:  # [2P, ...] -> [P, 2, ...]: a pass takes whole pairs
      pairs = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((2, n_pairs) + x.shape[1:]), 0, 1), batch)
      as_rows = lambda part: jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), part)
      grads, (losses, metrics) = microbatch.summed_gradients(
          lambda part: grads_of(state.params, state.other, as_rows(part), n_pairs), state.params,
          microbatch.split_rows(pairs, microbatches))
      loss, metrics = losses.sum(), jax.tree.map(lambda m: m.sum(0), metrics)
    state, opt_metrics = state_lib.apply_gradients(state, grads, tx, loss)
    return state, dict(loss=loss, **metrics, **opt_metrics)

  return step


@functools.partial(jax.jit, static_argnums=0)
def _rewards(graphdef, state, tokens, positions, segment_ids):
  return nnx.merge(graphdef, *state)(tokens, positions, segment_ids)


def score_rows(graphdef, state, rows: list[list[int]], seq_len: int, pad_id: int,
               batch: int) -> np.ndarray:
  """Rewards of token rows, `batch` rows a call (the last call padded: one shape)."""
  out = []
  for start in range(0, len(rows), batch):
    chunk = rows[start:start + batch]
    b = rows_batch(chunk + [chunk[-1]] * (batch - len(chunk)), seq_len, pad_id)
    r = _rewards(graphdef, state, b["tokens"], b["positions"], b["segment_ids"])
    out.append(parallel.to_host(r)[:len(chunk)])  # split over hosts in a multi-process run
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def pairwise_accuracy(graphdef, state, pairs, tokenizer, seq_len, template, batch: int) -> float:
  """Share of pairs with r(chosen) > r(rejected)."""
  b = pairs_batch(pairs, tokenizer, seq_len, template)
  rows = [list(t[s > 0]) for t, s in zip(b["tokens"], b["segment_ids"])]
  r = score_rows(graphdef, state, rows, seq_len, tokenizer.pad_id, batch)
  return float(np.mean(r[:len(pairs)] > r[len(pairs):]))


def run(config, workdir: str, init_from: str | None = None) -> dict:
  """Trains the reward model for config.train.steps steps; resumable; returns the summary."""
  from r1jax import optim  # pylint: disable=import-outside-toplevel
  from r1jax.runlog import MetricsLog  # pylint: disable=import-outside-toplevel
  config_lib.refuse_stage_problems("reward_model", config_lib.train_row_split_problems(config))
  steps, t, template = config.train.steps, config.train.seq_len, config.data.template
  tx = optim.make_optimizer(config.optim, steps)
  st = open_stage(config, workdir, tx, init_from)
  train, test = load_pairs(config)
  it = session.global_iterator(train, config.train.batch_size, config.seed, required=("prompt",))
  if st.data_state:
    it.set_state(st.data_state)
  shardings = session.state_shardings(st.state)
  step_fn = jax.jit(make_step(st.graphdef, tx, config.train.microbatches), in_shardings=(shardings, None),
                    out_shardings=(shardings, None), donate_argnums=0)
  accuracy = lambda: pairwise_accuracy(st.graphdef, (st.state.params, st.state.other), test,
                                       st.tokenizer, t, template, 2 * config.train.batch_size)
  before = accuracy()
  log = MetricsLog(workdir, steps, "reward_model")
  for step in range(st.start_step, steps):
    batch = parallel.put_global_batch(st.mesh, pairs_batch(next(it), st.tokenizer, t, template))
    st.state, metrics = step_fn(st.state, batch)
    if int(st.state.nonfinite_run) >= config.train.max_nonfinite_steps:
      raise FloatingPointError(f"[reward_model] {int(st.state.nonfinite_run)} consecutive "
                               f"non-finite steps at step {step + 1}; stopped.")
    if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
      log.write(step + 1, metrics, show=("loss", "accuracy"))
    if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == steps:
      checkpoint.save(st.mgr, step + 1, st.state, it.get_state(), meta(config))
  log.close()
  after = accuracy()
  print(f"[reward_model] held-out pairwise accuracy {before:.3f} -> {after:.3f}", flush=True)
  return dict(stage="reward_model", steps=steps, heldout_pair_accuracy_before=before,
              heldout_pair_accuracy_after=after, n_train_pairs=len(train), n_test_pairs=len(test),
              checkpoint=os.path.join(workdir, "checkpoints"))


# -------------------------------------------------------------- the reward function


class Scorer:
  """A reward-model checkpoint loaded once, scoring (prompt, completion) batches."""

  def __init__(self, path: str, mesh_config=None, batch: int = 64):
    mgr = checkpoint.manager(path)
    info = checkpoint.read_meta(mgr)
    if info is None:
      raise FileNotFoundError(f"reward_model.path={path!r}: no checkpoint there")
    if info.get("kind") != KIND:
      raise checkpoint.CheckpointMismatch(f"reward_model.path={path!r} holds a {info.get('stage')} "
                                          f"checkpoint, not a reward model")
    self.cfg = ModelConfig(**info["model"])
    self.tokenizer = tokenizer_lib.get_tokenizer(info["tokenizer"], info["tokenizer_path"] or None)
    self.template, self.seq_len, self.batch = info["template"], info["seq_len"], batch
    mesh = parallel.make_mesh(mesh_config) if mesh_config is not None else \
        parallel.make_mesh(config_lib.default_config().mesh)
    model = create_model(self.cfg, 0, mesh)
    nnx.update(model, checkpoint.restore_params(path, nnx.state(model, nnx.Param)))
    self.graphdef, params, other = state_lib.split_model(model)
    self.state = (params, other)
    self.path = path

  def __call__(self, prompts, completions) -> np.ndarray:
    rows = [encode_row(p, c, self.tokenizer, self.seq_len, self.template)
            for p, c in zip(prompts, completions)]
    return score_rows(self.graphdef, self.state, rows, self.seq_len, self.tokenizer.pad_id,
                      self.batch)


_SCORER: Scorer | None = None
_SCOPE = "unverifiable"


def configure(path: str, scope: str = "unverifiable", mesh_config=None, batch: int = 64) -> Scorer:
  """Loads the reward model of `path` for the "reward_model" reward (once per path)."""
  global _SCORER, _SCOPE
  if _SCORER is None or _SCORER.path != path:
    _SCORER = Scorer(path, mesh_config, batch)
  _SCOPE = scope
  return _SCORER


def is_verifiable(example: dict | None) -> bool:
  """A rule checks this row: a synthetic task, or a row that says so ("verifiable")."""
  from r1jax.data import tasks  # pylint: disable=import-outside-toplevel
  if not example:
    return False
  return bool(example.get("verifiable", example.get("task") in tasks.TASKS))


def reward(prompts, completions, example=None, **_):
  """The learned reward of each completion (0 for verifiable rows when scope is
  'unverifiable'); REWARD_FUNCTIONS["reward_model"]."""
  if _SCORER is None:
    raise ValueError("the reward_model reward needs a reward model: set reward_model.path "
                     "(in a pipeline, run a reward_model stage before this grpo stage)")
  scored = [i for i in range(len(completions))
            if _SCOPE == "all" or not is_verifiable(example[i] if example else None)]
  out = np.zeros(len(completions), np.float64)
  if scored:
    out[scored] = _SCORER([prompts[i] for i in scored], [completions[i] for i in scored])
  return out.tolist()


def prepare_grpo(config):
  """The GRPO config with the reward model joined to rl.reward_weights when there is one
  (reward_model.path, weight > 0), and the scorer loaded; unchanged otherwise."""
  from r1jax.rl import rewards  # pylint: disable=import-outside-toplevel
  rm = config.reward_model
  weights, _ = rewards.resolve(config.rl.reward_weights)
  if rm.path and rm.weight and KIND not in weights:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.rl.reward_weights = f"{config.rl.reward_weights},{KIND}:{rm.weight}"
    weights[KIND] = rm.weight
  if KIND in weights:
    if not rm.path:
      raise config_lib.ConfigError("rl.reward_weights names reward_model but reward_model.path "
                                   "is empty: set it, or run a reward_model stage first")
    configure(rm.path, rm.scope, config.mesh, rm.score_batch)
    print(f"[grpo] reward model {rm.path} (scope {rm.scope}); rewards: "
          f"{config.rl.reward_weights}", flush=True)
  return config
