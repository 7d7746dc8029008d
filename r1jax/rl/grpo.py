"""GRPO math: group advantages, KL estimators, the clipped policy loss and its variants.

Pure functions of arrays, no model and no optimizer: the jitted train step calls them.
Variants are values of the `rl` config section (default_rl_config, PRESETS below), not
subclasses:

  GRPO (DeepSeekMath eq. 3, DeepSeek-R1 eq. 1-3): group-normalised advantages, token
    ratio clipped to [1-eps, 1+eps], k3 KL to a reference, 1/G sum_i 1/|o_i| sum_t.
  Dr.GRPO (Liu et al. 2025): no std scaling, constant normaliser, no KL.
  DAPO (Yu et al. 2025): clip-higher (eps_low < eps_high), token-level mean, dynamic
    sampling (select_groups), overlong reward shaping (overlong_penalty).
  GSPO (Zheng et al. 2025): the sequence-level ratio exp(mean_t log ratio), tiny eps.
  Dual clip (Ye et al. 2020): the loss of a negative-advantage token is capped at c|A|.

Shapes: in `group_advantages` B counts questions and G samples per question. The loss
works on sequences flattened question-major (sequence b*G + g), so there B counts
sequences and T completion tokens; `adv_b` holds one advantage per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ADV_MODES = ("group", "none", "batch", "rloo")
KL_KINDS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant")

# exp() of a log-ratio above this overflows float32 (e^88) and turns a masked-out
# branch of min/where into 0 * inf = NaN in the backward pass; verl clamps the same way.
_MAX_LOG_RATIO = 20.0


def group_advantages(rewards_bg: jax.Array, mode: str = "group", eps: float = 1e-6) -> jax.Array:
  """Per-sample advantages from rewards [B, G] (B questions, G samples each) -> [B, G].

  group: (r - mean_g) / (std_g + eps)      DeepSeekMath / DeepSeek-R1 eq. 3.
  none:  r - mean_g                         Dr.GRPO: the std division biases towards
                                            too-easy and too-hard questions.
  batch: (r - mean_g) / (std_batch + eps)   group baseline, batch scale ("Lite PPO").
  rloo:  r_i - mean_{j != i} r_j            leave-one-out baseline (Ahmadian et al. 2024).

  Standard deviations are the sample (unbiased, ddof=1) estimate, as `torch.std` in
  DeepSeekMath's setup, TRL and verl; G == 1 gives zero advantages. A group whose
  rewards are all equal gets advantages of exactly 0 (not rounding noise over eps),
  because it carries no learning signal.
  """
  if mode not in ADV_MODES:
    raise ValueError(f"adv mode {mode!r}: choose one of {ADV_MODES}")
  r_bg = jnp.asarray(rewards_bg, jnp.float32)
  group_size = r_bg.shape[1]
  if group_size < 2:
    return jnp.zeros_like(r_bg)
  centred_bg = r_bg - r_bg.mean(axis=1, keepdims=True)
  if mode == "group":
    std_b1 = r_bg.std(axis=1, ddof=1, keepdims=True)
    adv_bg = centred_bg / (std_b1 + eps)
  elif mode == "none":
    adv_bg = centred_bg
  elif mode == "batch":
    adv_bg = centred_bg / (r_bg.std(ddof=1) + eps)
  else:  # rloo: r_i - (sum - r_i)/(G-1) == G/(G-1) (r_i - mean)
    adv_bg = centred_bg * (group_size / (group_size - 1))
  all_equal_b1 = jnp.all(r_bg == r_bg[:, :1], axis=1, keepdims=True)
  return jnp.where(all_equal_b1, 0.0, adv_bg)


def kl_penalty(logp_bt: jax.Array, ref_logp_bt: jax.Array, kind: str = "k3") -> jax.Array:
  """Per-token estimates of KL(pi || pi_ref) from sampled-token log-probs -> [B, T].

  k1 = log pi - log pi_ref                       unbiased, high variance, can be < 0
  k2 = (log pi - log pi_ref)^2 / 2               biased, low variance
  k3 = pi_ref/pi - log(pi_ref/pi) - 1            unbiased and >= 0 (Schulman 2020);
                                                 DeepSeekMath eq. 4, DeepSeek-R1 eq. 2.
  k3 is evaluated as exp(d) - d - 1 with d = ref - logp clamped above at 20, so it stays
  finite (and its gradient too) for tokens the policy has nearly ruled out.
  """
  diff_bt = logp_bt - ref_logp_bt
  if kind == "k1":
    return diff_bt
  if kind == "k2":
    return 0.5 * jnp.square(diff_bt)
  if kind == "k3":
    d_bt = jnp.minimum(-diff_bt, _MAX_LOG_RATIO)
    return jnp.exp(d_bt) - d_bt - 1.0
  raise ValueError(f"kl kind {kind!r}: choose one of {KL_KINDS}")


def policy_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    adv_b: jax.Array,
    mask_bt: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    ratio_level: str = "token",
    ref_logp_bt: jax.Array | None = None,
    beta: float = 0.0,
    kl_kind: str = "k3",
    aggregation: str = "sequence_mean",
    max_len: int | None = None,
    denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped GRPO surrogate (to minimise) and its metrics.

  Args:
    logp_bt: [B, T] log pi_theta of the sampled tokens (B sequences, the gradient path).
    old_logp_bt: [B, T] log pi_old of the same tokens, from the rollout policy.
    adv_b: [B] one advantage per sequence, or [Bq, G] from group_advantages (flattened
      question-major to [B]).
    mask_bt: [B, T] 1 for completion tokens that are trained, 0 for prompt and padding.
      Masked positions may hold anything, inf and NaN included: they are replaced
      before any arithmetic, so they reach neither the loss nor the gradients.
    eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high]; DAPO's
      clip-higher sets eps_high > eps_low.
    dual_clip_c: None or 0 for off; else c > 1 and the per-token loss of a negative
      advantage is capped at c |A| (Ye et al. 2020, dual-clip PPO).
    ratio_level: 'token' (GRPO) or 'sequence': GSPO's s_i = exp(mean over the valid
      tokens of (logp - old)), shared by every token of sequence i.
    ref_logp_bt: [B, T] log pi_ref, needed only when beta > 0 (also logged if given).
    beta: the KL coefficient (DeepSeek-R1: 0.001).
    kl_kind: 'k1' | 'k2' | 'k3', see kl_penalty.
    aggregation: how per-token losses become a scalar:
      'sequence_mean' 1/G sum_i 1/|o_i| sum_t   (DeepSeekMath/R1; sequences without a
                      valid token are left out of the mean)
      'token_mean'    sum_{i,t} / sum_i |o_i|    (DAPO: long answers weigh more)
      'constant'      sum_{i,t} / (B * max_len)  (Dr.GRPO: no length bias)
    max_len: the constant normaliser's length; the generation budget, T if None.
    denominator: overrides the aggregation's divisor (number of non-empty sequences,
      of valid tokens, or B * max_len), for gradient accumulation where the micro-batch
      losses must share the normaliser of the whole batch.

  The hyperparameters (eps_*, dual_clip_c, ratio_level, beta, kl_kind, aggregation,
  max_len) are Python values, static under jit: they choose the computation.

  Returns:
    (loss, metrics): a scalar, and scalars named pg_loss, kl, ratio_mean, ratio_max,
    ratio_min, clip_frac, clip_low_frac, clip_high_frac, dual_clip_frac, old_kl,
    n_tokens and loss (kl only when ref_logp_bt is given).
  """
  if ratio_level not in RATIO_LEVELS:
    raise ValueError(f"ratio_level {ratio_level!r}: choose one of {RATIO_LEVELS}")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r}: choose one of {AGGREGATIONS}")
  if beta > 0 and ref_logp_bt is None:
    raise ValueError("beta > 0 needs ref_logp_bt (the reference policy's log-probs)")
  n_seqs = logp_bt.shape[0]
  valid_bt = jnp.asarray(mask_bt) > 0
  adv_b = jnp.reshape(adv_b, (-1,)).astype(jnp.float32)
  if adv_b.shape[0] != n_seqs:
    raise ValueError(f"adv has {adv_b.shape[0]} sequences, logp_bt has {n_seqs}")

  # Replace masked entries first: where() passes a zero cotangent to the unselected
  # branch, so garbage there cannot become 0 * inf = NaN further down.
  def clean(x_bt):
    return jnp.where(valid_bt, x_bt.astype(jnp.float32), 0.0)

  logp_bt, old_logp_bt = clean(logp_bt), clean(old_logp_bt)
  n_valid_b = valid_bt.sum(axis=1)
  token_log_ratio_bt = log_ratio_bt = logp_bt - old_logp_bt
  if ratio_level == "sequence":
    # GSPO's s_i: the length-normalised sequence likelihood ratio, broadcast to tokens;
    # d s_i / d logp_t = s_i / |o_i|, exactly GSPO's sequence-level gradient.
    mean_log_ratio_b = log_ratio_bt.sum(axis=1) / jnp.maximum(n_valid_b, 1)
    log_ratio_bt = jnp.broadcast_to(mean_log_ratio_b[:, None], log_ratio_bt.shape)
  ratio_bt = jnp.exp(jnp.clip(log_ratio_bt, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))

  adv_bt = jnp.broadcast_to(adv_b[:, None], ratio_bt.shape)
  clipped_ratio_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high)
  # PPO-clip: maximise min(r A, clip(r) A), i.e. minimise its negative.
  pg_bt = -jnp.minimum(ratio_bt * adv_bt, clipped_ratio_bt * adv_bt)
  dual_clipped_bt = jnp.zeros_like(valid_bt)
  if dual_clip_c:
    cap_bt = -dual_clip_c * adv_bt  # c |A| where A < 0
    dual_clipped_bt = (adv_bt < 0) & (pg_bt > cap_bt)
    pg_bt = jnp.where(adv_bt < 0, jnp.minimum(pg_bt, cap_bt), pg_bt)
  pg_bt = jnp.where(valid_bt, pg_bt, 0.0)

  kl_bt = None
  if ref_logp_bt is not None:
    kl_bt = jnp.where(valid_bt, kl_penalty(logp_bt, clean(ref_logp_bt), kl_kind), 0.0)
  loss_bt = pg_bt + beta * kl_bt if beta > 0 else pg_bt

  if denominator is None:
    denominator = loss_denominator(valid_bt, aggregation, max_len)

  def aggregate(x_bt):
    if aggregation == "sequence_mean":
      return (x_bt.sum(axis=1) / jnp.maximum(n_valid_b, 1)).sum() / denominator
    return x_bt.sum() / denominator

  loss = aggregate(loss_bt)
  metrics = _metrics(jax.lax.stop_gradient(ratio_bt), adv_bt, valid_bt, eps_low, eps_high,
                     dual_clipped_bt, jax.lax.stop_gradient(token_log_ratio_bt))
  metrics["pg_loss"] = jax.lax.stop_gradient(aggregate(pg_bt))
  if kl_bt is not None:
    metrics["kl"] = _token_mean(jax.lax.stop_gradient(kl_bt), valid_bt)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


def loss_denominator(mask_bt, aggregation: str, max_len: int | None = None) -> jax.Array:
  """What policy_loss divides the summed per-token (or per-sequence) losses by, over the
  batch `mask_bt` [B, T] covers: the non-empty sequences (sequence_mean), the valid
  tokens (token_mean) or B * max_len (constant; T when max_len is None). Computed once
  over a whole minibatch and passed as `denominator` to each micro-batch's loss, the
  micro-batch losses (and gradients) sum to the minibatch's."""
  valid_bt = jnp.asarray(mask_bt) > 0
  n_valid_b = valid_bt.sum(axis=1)
  if aggregation == "sequence_mean":
    return jnp.maximum((n_valid_b > 0).sum(), 1)
  if aggregation == "token_mean":
    return jnp.maximum(n_valid_b.sum(), 1)
  return jnp.asarray(valid_bt.shape[0] * (valid_bt.shape[1] if max_len is None else max_len))


def _token_mean(x_bt, valid_bt):
  return jnp.where(valid_bt, x_bt, 0.0).sum() / jnp.maximum(valid_bt.sum(), 1)


def _metrics(ratio_bt, adv_bt, valid_bt, eps_low, eps_high, dual_clipped_bt, log_ratio_bt):
  """Diagnostics over valid tokens; clipping counts where the clipped branch was taken."""
  any_valid = valid_bt.any()  # else ratio_max/min report 1.0, not -inf/inf
  clip_low_bt = (adv_bt < 0) & (ratio_bt < 1.0 - eps_low)
  clip_high_bt = (adv_bt > 0) & (ratio_bt > 1.0 + eps_high)
  # k3 of old vs current: how far the inner iterations have moved the policy.
  d_bt = jnp.minimum(-log_ratio_bt, _MAX_LOG_RATIO)
  return dict(
      ratio_mean=_token_mean(ratio_bt, valid_bt),
      ratio_max=jnp.where(any_valid, jnp.where(valid_bt, ratio_bt, -jnp.inf).max(), 1.0),
      ratio_min=jnp.where(any_valid, jnp.where(valid_bt, ratio_bt, jnp.inf).min(), 1.0),
      clip_frac=_token_mean(clip_low_bt | clip_high_bt, valid_bt),
      clip_low_frac=_token_mean(clip_low_bt, valid_bt),
      clip_high_frac=_token_mean(clip_high_bt, valid_bt),
      dual_clip_frac=_token_mean(dual_clipped_bt, valid_bt),
      old_kl=_token_mean(jnp.exp(d_bt) - d_bt - 1.0, valid_bt),
      n_tokens=valid_bt.sum(),
  )


def select_groups(rewards_bg, keep: int) -> tuple[np.ndarray, int]:
  """DAPO dynamic sampling with a static batch shape: which `keep` of B groups to train.

  DAPO (Section 3.2) drops groups whose rewards are all equal (zero advantage, zero
  gradient) and samples more until the batch is full. Shapes must stay static under
  jit, so the rollout oversamples B >= keep groups and this picks `keep` of them:
  informative groups first, in their original order (deterministic), then, when too
  few exist, zero-variance ones to fill the batch.

  Args:
    rewards_bg: [B, G] rewards (host array).
    keep: groups to return, 0 < keep <= B.
  Returns:
    (idx [keep] int32, n_filled): the group indices, and how many zero-variance groups
    had to fill the batch (log it: a large value means the oversampling is too low).
  """
  r_bg = np.asarray(rewards_bg)
  if not 0 < keep <= r_bg.shape[0]:
    raise ValueError(f"keep={keep} must be in 1..{r_bg.shape[0]} (the sampled groups)")
  informative_b = ~np.all(r_bg == r_bg[:, :1], axis=1)
  # Stable sort puts informative groups first and keeps each kind in original order.
  order = np.argsort(~informative_b, kind="stable")
  idx = order[:keep].astype(np.int32)
  return idx, int(keep - min(keep, int(informative_b.sum())))


def overlong_penalty(lengths_b, max_len: int, buffer: int, penalty: float = 1.0) -> jax.Array:
  """DAPO eq. 13, soft overlong punishment in tokens: [B] lengths -> [B] rewards to add.

  0 up to max_len - buffer, then falling linearly to -penalty at max_len, -penalty
  beyond. buffer == 0 is a hard step at max_len.
  """
  length_b = jnp.asarray(lengths_b, jnp.float32)
  start = max_len - buffer
  ramp_b = (start - length_b) / max(buffer, 1)
  shaped_b = jnp.where(length_b <= start, 0.0, jnp.where(length_b <= max_len, ramp_b, -1.0))
  return penalty * shaped_b


# ---------------------------------------------------------------------------------------
# The `rl` config section and the published recipes as presets.


def default_rl_config():
  """Every key of the `rl` config section, with small CPU-sized defaults.

  The loss defaults are the DeepSeek-R1 GRPO objective (group advantages, token ratio,
  k3 KL with beta 0.001, 1/G sum_i 1/|o_i| sum_t); sizes are tiny. Off-switches are
  typed values, not None, so `--config.rl.KEY=VALUE` overrides parse: dual_clip 0.0,
  top_k 0, top_p 1.0, ref_refresh_every 0 (never) and overlong_buffer 0 mean "off".
  """
  return ml_collections.ConfigDict(dict(
      preset="",                 # the name last given to apply_preset, for the logs
      # Rollouts.
      group_size=8,              # G samples per question
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=64,         # generation budget; also the 'constant' normaliser
      slots=0,                   # >0: continuous batching over this many decode rows (refill
                                 # finished rows; on a mesh, a batcher with slots / shards rows
                                 # on each batch shard); 0: all B*G rows at once
      cache_segments=4,          # plain batching decodes in segments over a growing KV cache,
                                 # so early steps skip empty slots (CPU: 11-18% faster rollouts,
                                 # one more decode-loop compile per segment)
      # Objective.
      adv_mode="group",          # group | none | batch | rloo
      beta=0.001,                # KL coefficient (R1: 0.001); 0 needs no reference model
      kl_kind="k3",              # k1 | k2 | k3
      eps_low=0.2,
      eps_high=0.2,
      dual_clip=0.0,             # c > 1 caps negative-advantage token losses at c|A|
      ratio_level="token",       # token | sequence (GSPO)
      aggregation="sequence_mean",  # sequence_mean | token_mean | constant
      # Schedule.
      mu=1,                      # inner iterations over one rollout batch
      minibatches=1,             # optimizer steps per inner iteration
      microbatches=1,            # forward + backward passes a minibatch's gradient is summed
                                 # over (gradient accumulation): activations / microbatches;
                                 # on CPU, 8-16-row micro-batches also run ~1.4x faster.
                                 # A pass holds whole groups: keep it >= one group per
                                 # batch shard, or devices idle (the --dry_run plan says)
      ref_refresh_every=0,       # copy the policy into the reference every N steps
      routing_replay=True,       # MoE: replay the rollout's expert choices in the update
      shared_prefix=True,        # reference and update forwards run each group's prompt once
                                 # (trainer.prefix_shared_hidden) when minibatches hold whole groups
      # DAPO extras.
      dynamic_sampling=False,    # keep only groups with unequal rewards (select_groups)
      oversample=1.0,            # sample ceil(oversample * B) groups to select B from
      overlong_buffer=0,         # tokens before max_new_tokens where shaping starts
      overlong_penalty=1.0,      # reward at and beyond max_new_tokens: -overlong_penalty
      # Rewards (r1jax/rl/rewards.py).
      reward_weights="accuracy:1,format:0.1",
      reward_timeout=5.0,        # seconds per verification before it scores 0
      reward_workers=2,          # verifier processes
  ))


# Each preset sets every loss-shaping key, so applying one after another leaves no
# trace of the first; sizes appear only where the paper ties them to the method.
PRESETS = {
    # DeepSeek-R1 (Nature, 2025), R1-Zero RL: lr 3e-6 (optim.lr, not this section),
    # beta 0.001 with the k3 estimator, G = 16, temperature 1, 32 questions a step,
    # 32,768 new tokens, the reference replaced every 400 steps, 8,192 outputs a rollout
    # split into 16 minibatches for one inner epoch, and a clip ratio eps = 10. We keep
    # eps = 10 as reported: it leaves only the upper bound 1 + eps = 11 active and is the
    # paper's choice, not a typo for 0.2; use eps_low/high 0.2 for the DeepSeekMath value.
    "r1_zero": dict(
        group_size=16, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32768,
        adv_mode="group", beta=0.001, kl_kind="k3", eps_low=10.0, eps_high=10.0,
        dual_clip=0.0, ratio_level="token", aggregation="sequence_mean",
        mu=1, minibatches=16, ref_refresh_every=400,
        dynamic_sampling=False, overlong_buffer=0,
        reward_weights="accuracy:1,format:1"),  # R1: Reward_rule = acc + format
    # Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): drop the std
    # division and the 1/|o_i| length normaliser (both bias the gradient), and the KL.
    "dr_grpo": dict(
        adv_mode="none", beta=0.0, kl_kind="k3", eps_low=0.2, eps_high=0.2,
        dual_clip=0.0, ratio_level="token", aggregation="constant",
        dynamic_sampling=False, overlong_buffer=0),
    # DAPO (Yu et al. 2025): clip-higher 0.2/0.28, token-level loss, no KL, dynamic
    # sampling, soft overlong punishment with L_max = 20,480 and L_cache = 4,096, G = 16.
    "dapo": dict(
        group_size=16, max_new_tokens=20480,
        adv_mode="group", beta=0.0, kl_kind="k3", eps_low=0.2, eps_high=0.28,
        dual_clip=0.0, ratio_level="token", aggregation="token_mean",
        dynamic_sampling=True, oversample=2.0, overlong_buffer=4096, overlong_penalty=1.0),
    # GSPO (Zheng et al. 2025): sequence-level ratio and clipping, with the much smaller
    # clip range the length-normalised ratio needs (3e-4 / 4e-4), no KL.
    "gspo": dict(
        adv_mode="group", beta=0.0, kl_kind="k3", eps_low=3e-4, eps_high=4e-4,
        dual_clip=0.0, ratio_level="sequence", aggregation="sequence_mean",
        dynamic_sampling=False, overlong_buffer=0),
}


def apply_preset(rl_config, name: str):
  """Sets the keys of PRESETS[name] on an `rl` section in place and returns it."""
  if name not in PRESETS:
    raise ValueError(f"rl preset {name!r}: choose one of {sorted(PRESETS)}")
  with rl_config.unlocked():
    for key, value in PRESETS[name].items():
      if key not in rl_config:
        raise KeyError(f"preset {name!r} sets {key!r}, which the rl config lacks")
      rl_config[key] = value
    rl_config.preset = name
  return rl_config


def validate_rl(rl) -> list[str]:
  """Problems of an `rl` section, one line each, for r1jax.config.validate()."""
  problems = []

  def choice(key, options):
    if rl[key] not in options:
      problems.append(f"rl.{key}={rl[key]!r}: choose one of {options}")

  choice("adv_mode", ADV_MODES)
  choice("kl_kind", KL_KINDS)
  choice("ratio_level", RATIO_LEVELS)
  choice("aggregation", AGGREGATIONS)
  if rl.cache_segments < 1:
    problems.append(f"rl.cache_segments={rl.cache_segments} must be >= 1 (1: one decode loop "
                    f"over the whole cache)")
  if rl.slots < 0:
    problems.append(f"rl.slots={rl.slots} must be >= 0 (0: plain batching; N: continuous "
                    f"batching over N decode rows)")
  for key in ("group_size", "max_new_tokens", "mu", "minibatches", "microbatches"):
    if rl[key] < 1:
      problems.append(f"rl.{key}={rl[key]} must be at least 1")
  if rl.group_size < 2:
    problems.append(f"rl.group_size={rl.group_size}: group advantages need G >= 2")
  if rl.temperature <= 0:
    problems.append(f"rl.temperature={rl.temperature} must be positive")
  if not 0 < rl.top_p <= 1:
    problems.append(f"rl.top_p={rl.top_p} must be in (0, 1]")
  if rl.beta < 0 or rl.eps_low < 0 or rl.eps_high < 0:
    problems.append("rl.beta, rl.eps_low and rl.eps_high must be >= 0")
  if rl.dual_clip and rl.dual_clip <= 1:
    problems.append(f"rl.dual_clip={rl.dual_clip}: use 0 (off) or a value > 1 (e.g. 3)")
  if rl.oversample < 1:
    problems.append(f"rl.oversample={rl.oversample} must be >= 1")
  if not 0 <= rl.overlong_buffer < rl.max_new_tokens:
    problems.append(f"rl.overlong_buffer={rl.overlong_buffer} must be in "
                    f"[0, max_new_tokens={rl.max_new_tokens})")
  if rl.preset and rl.preset not in PRESETS:
    problems.append(f"rl.preset={rl.preset!r}: choose one of {sorted(PRESETS)} or ''")
  return problems
