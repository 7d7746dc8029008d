"""Group rollouts inside JAX, with the trainer's own model (one code path, DESIGN.md).

`generate` prefills each prompt once, copies its cache to the G samples of its group,
then decodes in a jitted `lax.while_loop` that stops as soon as every sequence has
finished. Prompts are left-padded to one length; each row keeps its own positions, and
cache slot s holds position s, so rows of different prompt lengths decode side by side.

Shapes: B prompts, G group size, N = max_new_tokens, Tp prompt length, V vocab,
L number of MoE layers, k top-k.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.sampling import filters


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  greedy: bool = False
  eos_ids: tuple[int, ...] = ()
  # Stop sequences as token-id tuples (e.g. the ids of "</answer>"); the stop tokens are
  # kept in the completion and the mask ends with them.
  stop_sequences: tuple[tuple[int, ...], ...] = ()


def prompt_positions(prompt_mask_bt, pad_slot: int):
  """Positions 0..L-1 of the real (right-aligned) prompt tokens; padding goes to a slot
  past the cache end, so its writes are dropped."""
  pos = jnp.cumsum(prompt_mask_bt, axis=1) - 1
  return jnp.where(prompt_mask_bt > 0, pos, pad_slot).astype(jnp.int32)


def _stop_table(stop_sequences):
  """[n_stop, M] right-aligned ids, -1 where shorter (a wildcard)."""
  if not stop_sequences:
    return None
  m = max(len(s) for s in stop_sequences)
  table = np.full((len(stop_sequences), m), -1, np.int32)
  for i, s in enumerate(stop_sequences):
    table[i, m - len(s):] = s
  return jnp.asarray(table)


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size", "params"))
def _generate(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, group_size, params):
  model = nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)
  b, tp = prompt_ids_bt.shape
  n, g = params.max_new_tokens, group_size
  cache_len = tp + n
  pos_bt = prompt_positions(prompt_mask_bt, cache_len)

  # Prefill: once per prompt (not G times), then share the cache with the group.
  cache = model.init_cache(b, cache_len)
  logits, aux = model(prompt_ids_bt, pos_bt, prompt_mask_bt, cache=cache)
  repeat = lambda x: jnp.repeat(x, g, axis=0)
  cache = jax.tree.map(repeat, aux["cache"])
  next_logits = repeat(logits[:, -1])  # left padding: the last column is the last real token
  prompt_experts = aux["experts"]
  if prompt_experts is not None:
    prompt_experts = jnp.repeat(prompt_experts, g, axis=1)
  bg = b * g
  lengths0 = repeat(prompt_mask_bt.sum(axis=1).astype(jnp.int32))
  n_moe = 0 if prompt_experts is None else prompt_experts.shape[0]
  top_k = 0 if prompt_experts is None else prompt_experts.shape[-1]
  stop_table = _stop_table(params.stop_sequences)
  eos = jnp.asarray(params.eos_ids or (-1,), jnp.int32)

  carry = dict(
      i=jnp.zeros((), jnp.int32), cache=cache, logits=next_logits,
      done=jnp.zeros((bg,), bool), rng=rng,
      tokens=jnp.zeros((bg, n), jnp.int32), logp=jnp.zeros((bg, n), jnp.float32),
      mask=jnp.zeros((bg, n), jnp.int32),
      experts=jnp.zeros((n_moe, bg, n, top_k), jnp.int32))

  def cond(c):
    return (c["i"] < n) & ~jnp.all(c["done"])

  def body(c):
    i = c["i"]
    rng, key = jax.random.split(c["rng"])
    token, logp = filters.sample(key, c["logits"], params.temperature, params.top_k,
                                 params.top_p, params.greedy)
    live = ~c["done"]
    token = jnp.where(live, token, 0)
    tokens = c["tokens"].at[:, i].set(token)
    finished = jnp.any(token[:, None] == eos[None, :], axis=-1)
    if stop_table is not None:
      finished |= filters.ends_with_any(tokens, i, stop_table)
    done = c["done"] | (live & finished)
    # Feed the token at its own position; finished rows feed a dropped write.
    pos = jnp.where(live, lengths0 + i, cache_len)[:, None]
    logits, aux = model(token[:, None], pos, live[:, None].astype(jnp.int32), cache=c["cache"])
    out = dict(i=i + 1, cache=aux["cache"], logits=logits[:, 0], done=done, rng=rng,
               tokens=tokens, logp=c["logp"].at[:, i].set(jnp.where(live, logp, 0.0)),
               mask=c["mask"].at[:, i].set(live.astype(jnp.int32)), experts=c["experts"])
    if n_moe:
      out["experts"] = c["experts"].at[:, :, i].set(aux["experts"][:, :, 0])
    return out

  c = jax.lax.while_loop(cond, body, carry)
  return dict(tokens=c["tokens"], mask=c["mask"], logprobs=c["logp"], steps=c["i"],
              experts=c["experts"] if n_moe else None, prompt_experts=prompt_experts)


def generate(model_or_graphdef, state=None, *, prompt_ids_bt, prompt_mask_bt, rng,
             group_size: int = 1, params: SamplingParams = SamplingParams()):
  """Samples G completions per prompt.

  Args:
    model_or_graphdef: an nnx model, or its graphdef with `state` (params + other).
    prompt_ids_bt, prompt_mask_bt: left-padded prompts [B, Tp] and their mask.
  Returns a dict:
    tokens [B*G, N] int32 (row b*G + j is sample j of prompt b), mask [B*G, N] (1 up to
    and including the stop token), logprobs [B*G, N] fp32 log pi(token) at the sampling
    temperature, experts [L, B*G, N, k] and prompt_experts [L, B*G, Tp, k] (MoE only),
    steps: decode iterations run.
  """
  if state is None:
    graphdef, state = nnx.split(model_or_graphdef)
  else:
    graphdef = model_or_graphdef
  return _generate(graphdef, state, jnp.asarray(prompt_ids_bt, jnp.int32),
                   jnp.asarray(prompt_mask_bt, jnp.int32), rng, group_size, params)
