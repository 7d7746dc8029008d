"""The decoder: embeddings, pre-norm blocks (attention + MLP or MoE), final norm, LM head.

One class covers DeepSeek-V3 (MLA + DeepSeekMoE, first layers dense, optional MTP head),
Qwen2/2.5, Llama-3, Qwen3 and Qwen3-MoE; the differences are ModelConfig values.

Call signature (shapes: B batch, T tokens, S cache slots, V vocab, k top-k, L_moe MoE layers):
  logits_btv, aux = model(tokens_bt, positions_bt=None, segment_ids_bt=None,
                          cache=None, forced_experts=None, mtp=None, return_hidden=False,
                          return_kv=False)
  segment_ids_bt: 0 marks padding; packed rows use 1, 2, ... per example, and attention
    never crosses a segment boundary.
  aux["experts"]: [L_moe, B, T, k] chosen experts (for routing replay), or None.
  aux["cache"]:   the updated cache when one was passed.
  cache=SharedPrompt (not a cache): the rows continue prompts that ran in an earlier call
    with return_kv=True (aux["prompt"]), G consecutive rows per prompt; each token attends
    to its group's prompt and causally to its own row (the GRPO update's forward,
    r1jax.rl.trainer.prefix_shared_hidden). Differentiable; MoE layers dispatch as in
    training.
  aux["mtp_logits"]: [D_mtp, B, T, V]; depth j at position i predicts token i + j + 2.
  aux["balance_loss"]: model.seq_balance_alpha x the sequence-wise balance loss summed
                       over MoE layers (only when alpha > 0; a packed row counts as one
                       sequence); the pretrain / SFT loss adds it.
  return_hidden=True returns the final-normed hidden states [B, T, D] instead of logits.
  model.remat reruns each block in the backward pass of a differentiated forward (no
  cache, or a SharedPrompt); model.attention_chunk runs attention in query blocks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.model.attention import KeyMask, PrefixKV, make_attention, rope_tables
from r1jax.model.cached_moe import cached_moe
from r1jax.model.config import ModelConfig
from r1jax.model.layers import MLP, RMSNorm, dtype_of, param, project
from r1jax.model.moe import MoE

# model.remat -> the jax.checkpoint policy of each block in a differentiated forward:
# "full" keeps only the block's input (the backward pass reruns the whole block: ~1/3
# more FLOPs, activations of one layer instead of L); "save_dots" also keeps the matmul
# outputs without batch dimensions (the projections), and reruns the norms, RoPE,
# softmax and activations. The attention score matmuls have batch dimensions and are
# rerun either way.
REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class SharedPrompt(NamedTuple):
  """B prompts' keys and values, from their forward with return_kv=True (aux["prompt"]):
  layers[i] is layer i's (attention.PrefixKV.kv), valid [B, Tp] their real tokens."""
  layers: tuple
  valid: jax.Array


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.attn = make_attention(cfg, rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.is_moe = cfg.layer_is_moe(layer)
    self.ffn = MoE(cfg, rngs) if self.is_moe else MLP(cfg, cfg.d_ff, rngs)

  def __call__(self, x_btd, positions_bt, mask: KeyMask, cache=None, forced_experts_btk=None, rope=None,
               valid_bt=None):
    """-> (x_btd, cache, experts_btk or None, balance loss of this layer (0.0 if none)).

    cache: the sampler's layer cache (returned updated), a PrefixKV (returns None), or
    None (returns the layer's keys and values, for a SharedPrompt)."""
    # Only the sampler's calls (a cache, not a PrefixKV) take the MoE sampling dispatch;
    # decide before the attention, which returns keys and values when called without one.
    sampling = cache is not None and not isinstance(cache, PrefixKV)
    h, cache = self.attn(self.attn_norm(x_btd), positions_bt, mask, cache, rope)
    x_btd = x_btd + h
    experts, balance = None, jnp.zeros((), jnp.float32)
    if self.is_moe and sampling:
      h, experts = cached_moe(self.ffn, self.ffn_norm(x_btd), forced_experts_btk)
    elif self.is_moe:
      h, aux = self.ffn.forward(self.ffn_norm(x_btd), forced_experts_btk, mask_bt=valid_bt)
      experts, balance = aux["experts"], aux["balance_loss"]
    else:
      h = self.ffn(self.ffn_norm(x_btd))
    return x_btd + h, cache, experts, balance


class MTPModule(nnx.Module):
  """One multi-token-prediction depth (DeepSeek-V3 eq. 21-23): combine the previous
  depth's hidden state with the embedding of the next token, run one block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.hidden_norm = RMSNorm(d, cfg.norm_eps, rngs)
    self.embed_norm = RMSNorm(d, cfg.norm_eps, rngs)
    self.proj = param(rngs, (2 * d, d), (None, "embed"), cfg.init_std)
    self.block = Block(cfg, cfg.n_layers, rngs)
    self.final_norm = RMSNorm(d, cfg.norm_eps, rngs)


class Transformer(nnx.Module):
  """The decoder-only language model."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
    self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
    self.mtp = nnx.List([MTPModule(cfg, rngs) for _ in range(cfg.mtp_depth)])

  @property
  def moe_layers(self) -> list[int]:
    return [i for i in range(self.cfg.n_layers) if self.cfg.layer_is_moe(i)]

  def head(self, x_btd):
    """fp32 logits: the log-probs that enter GRPO ratios and KL must be fp32."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    dt = dtype_of(self.cfg.dtype)
    return project(x_btd.astype(dt), w.astype(dt), out_dtype=jnp.float32)

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None,
               forced_experts=None, mtp=None, return_hidden=False, return_kv=False):
    """return_hidden=True: returns the final-normed hidden states [B, T, D] in place of the
    logits (callers apply `head` themselves, e.g. in token blocks: model.logits_chunk).
    return_kv=True (no cache): aux["prompt"] is a SharedPrompt of these rows, for a later
    call whose rows continue them (cache=SharedPrompt)."""
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones((b, t), jnp.int32)
    x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)

    shared = isinstance(cache, SharedPrompt)
    if cache is None:
      mask = attention_mask(positions_bt, segment_ids_bt)
    elif shared:
      # The row's own keys: its real tokens up to the query's position (every query sees
      # the whole prompt, which precedes it: PrefixKV).
      own = (segment_ids_bt > 0).astype(jnp.int32)
      mask = KeyMask(positions_bt, jnp.ones_like(own), positions_bt, own)
    else:
      rows = jnp.arange(b)[:, None]
      valid = cache["valid"].at[rows, positions_bt].set(segment_ids_bt > 0, mode="drop")
      slots = jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)
      # Keys are the slots: a query sees the filled ones up to its own position.
      mask = KeyMask(positions_bt, jnp.ones_like(positions_bt), slots, valid.astype(jnp.int32))
      new_layers = []

    experts, moe_i, balance = [], 0, jnp.zeros((), jnp.float32)
    rope = rope_tables(cfg, positions_bt)  # once, shared by every layer
    valid_bt = segment_ids_bt > 0
    # A decode cache runs MoE layers with the sampler's dispatch (cached_moe), undifferentiated.
    sampling = cache is not None and not shared
    run_block = self._block_runner(differentiated=not sampling)
    kv_layers = []
    for i, block in enumerate(self.layers):
      forced = None
      if forced_experts is not None and block.is_moe:
        forced = forced_experts[moe_i]
      layer_cache = (None if cache is None else PrefixKV(cache.layers[i], cache.valid) if shared
                     else cache["layers"][i])
      x, layer_cache, chosen, layer_balance = run_block(block, x, positions_bt, mask, layer_cache, forced, rope,
                                                        valid_bt)
      balance = balance + layer_balance
      if sampling:
        new_layers.append(layer_cache)
      elif cache is None and return_kv:
        kv_layers.append(layer_cache)  # without a cache, the layer's keys and values
      if chosen is not None:
        experts.append(chosen)
        moe_i += 1

    aux = dict(experts=jnp.stack(experts) if experts else None)
    if cfg.is_moe and cfg.seq_balance_alpha and cache is None:
      aux["balance_loss"] = balance  # summed over MoE layers (DeepSeek-V3 eq. 17: per layer)
    if sampling:
      aux["cache"] = dict(valid=valid, layers=tuple(new_layers))
    if return_kv:
      aux["prompt"] = SharedPrompt(tuple(kv_layers), segment_ids_bt > 0)
    if cfg.mtp_depth and mtp is not False and cache is None:
      aux["mtp_logits"] = self._mtp(x, tokens_bt, positions_bt, mask)
    if return_hidden:
      return self.final_norm(x), aux
    return self.head(self.final_norm(x)), aux

  def _block_runner(self, differentiated: bool):
    """How a block is called: under jax.checkpoint (model.remat) in a differentiated
    forward, plainly otherwise (the sampler's prefill and decode)."""
    if self.cfg.remat == "none" or not differentiated:
      return _call_block
    return functools.partial(_remat_block, policy=REMAT_POLICIES[self.cfg.remat])

  def _mtp(self, h_btd, tokens_bt, positions_bt, mask):
    """Depth j combines h (position i) with the embedding of token i + j + 1."""
    dt = dtype_of(self.cfg.dtype)
    out = []
    for j, module in enumerate(self.mtp):
      next_tokens = jnp.roll(tokens_bt, -(j + 1), axis=1)  # wrapped tail is masked by the loss
      e = jnp.take(self.embed[...], next_tokens, axis=0).astype(dt)
      z = jnp.concatenate([module.hidden_norm(h_btd), module.embed_norm(e)], axis=-1)
      h_btd = jnp.einsum("btc,cd->btd", z, module.proj[...].astype(dt))
      h_btd = self._block_runner(differentiated=True)(module.block, h_btd, positions_bt, mask, None, None, None,
                                                       None)[0]
      out.append(self.head(module.final_norm(h_btd)))
    return jnp.stack(out)

  def init_cache(self, batch: int, length: int):
    """An empty cache of `length` slots per row (slot s holds position s)."""
    dt = dtype_of(self.cfg.dtype)
    return dict(valid=jnp.zeros((batch, length), bool),
                layers=tuple(block.attn.init_cache(batch, length, dt) for block in self.layers))


def _call_block(block, x_btd, positions_bt, mask, cache, forced_btk, rope, valid_bt):
  return block(x_btd, positions_bt, mask, cache, forced_btk, rope, valid_bt)


def _remat_block(block, *args, policy):
  """_call_block under jax.checkpoint. The block goes in as its state (a pytree of
  arrays) and is rebuilt inside: nnx.remat would try to write the variables back across
  trace levels (the update merges the model inside its own jit), which nnx refuses."""
  graphdef, state = nnx.split(block)
  run = lambda state, *arrays: _call_block(nnx.merge(graphdef, state), *arrays)
  return jax.checkpoint(run, policy=policy)(state, *args)


def attention_mask(positions_bt, segment_ids_bt) -> KeyMask:
  """The tokens attend to each other: same segment, not padding, causal by position
  (`.dense()` is the [B, T, T] boolean)."""
  return KeyMask(positions_bt, segment_ids_bt, positions_bt, segment_ids_bt)


def token_logprobs(logits_btv, targets_bt):
  """log p(target) in fp32 [B, T]."""
  logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
