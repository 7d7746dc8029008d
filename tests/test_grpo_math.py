"""GRPO math against hand-written NumPy formulas: advantages, KL, policy loss and grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.rl import grpo

# ----------------------------------------------------------------- NumPy references


def np_advantages(r_bg, mode, eps=1e-6):
  r_bg = np.asarray(r_bg, np.float64)
  g = r_bg.shape[1]
  centred = r_bg - r_bg.mean(1, keepdims=True)
  if mode == "group":
    adv = centred / (r_bg.std(1, ddof=1, keepdims=True) + eps)
  elif mode == "none":
    adv = centred
  elif mode == "batch":
    adv = centred / (r_bg.std(ddof=1) + eps)
  else:  # leave-one-out, written as its definition
    adv = np.stack([r_bg[:, i] - np.delete(r_bg, i, axis=1).mean(1) for i in range(g)], 1)
  return np.where(np.all(r_bg == r_bg[:, :1], 1, keepdims=True), 0.0, adv)


def np_kl(logp, ref, kind):
  d = logp - ref
  return {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1}[kind]


def np_kl_grad(logp, ref, kind):
  d = logp - ref
  return {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d)}[kind]


def np_policy_loss_and_grad(logp, old, adv, mask, *, eps_low=0.2, eps_high=0.2, dual_clip_c=None,
                            ratio_level="token", ref=None, beta=0.0, kl_kind="k3",
                            aggregation="sequence_mean", max_len=None):
  """Loss and d loss / d logp from the formulas, with the derivative worked by hand."""
  logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
  m = np.asarray(mask) > 0
  b, t = logp.shape
  n_b = m.sum(1)
  lr = np.where(m, logp - old, 0.0)
  if ratio_level == "sequence":
    lr = np.repeat((lr.sum(1) / np.maximum(n_b, 1))[:, None], t, 1)
  r = np.exp(lr)
  a = np.repeat(adv[:, None], t, 1)
  unclipped, clipped = r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a
  pg = -np.minimum(unclipped, clipped)
  dpg_dr = np.where(unclipped <= clipped, -a, 0.0)  # the clipped branch is flat in r
  if dual_clip_c:
    capped = (a < 0) & (pg > -dual_clip_c * a)
    pg = np.where(capped, -dual_clip_c * a, pg)
    dpg_dr = np.where(capped, 0.0, dpg_dr)
  loss_t = pg
  if beta > 0:
    loss_t = pg + beta * np_kl(logp, ref, kl_kind)
  loss_t = np.where(m, loss_t, 0.0)
  if aggregation == "sequence_mean":
    w = np.repeat((1.0 / np.maximum(n_b, 1) / max((n_b > 0).sum(), 1))[:, None], t, 1)
  elif aggregation == "token_mean":
    w = np.full((b, t), 1.0 / max(m.sum(), 1))
  else:
    w = np.full((b, t), 1.0 / (b * (t if max_len is None else max_len)))
  loss = (w * loss_t).sum()
  if ratio_level == "token":
    grad = w * dpg_dr * r
  else:  # every token of sequence i moves s_i by s_i / n_i
    per_seq = (np.where(m, w * dpg_dr, 0.0) * r).sum(1) / np.maximum(n_b, 1)
    grad = np.repeat(per_seq[:, None], t, 1)
  if beta > 0:
    grad = grad + beta * w * np_kl_grad(logp, ref, kl_kind)
  return loss, np.where(m, grad, 0.0)


def random_batch(seed, b=6, t=9, spread=0.5):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
  old = (logp + rng.normal(0, spread, (b, t))).astype(np.float32)
  ref = (logp + rng.normal(0, spread, (b, t))).astype(np.float32)
  adv = rng.normal(0, 1, b).astype(np.float32)
  mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
  mask[0] = 0.0  # a sequence without a trained token
  mask[1] = 1.0
  return logp, old, ref, adv, mask


def jax_loss_and_grad(logp, old, adv, mask, **kwargs):
  fn = functools.partial(grpo.policy_loss, **kwargs)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: fn(lp, old, adv, mask), has_aux=True)(jnp.asarray(logp))
  return loss, grad, metrics


# ----------------------------------------------------------------------- advantages


@pytest.mark.parametrize("mode", grpo.ADV_MODES)
def test_advantages_match_numpy(mode):
  rng = np.random.default_rng(0)
  r_bg = rng.normal(size=(5, 8)).astype(np.float32)
  r_bg[2] = 0.7  # all equal
  r_bg[3] = rng.integers(0, 2, 8)  # binary, as accuracy rewards are
  adv = np.asarray(grpo.group_advantages(r_bg, mode))
  np.testing.assert_allclose(adv, np_advantages(r_bg, mode), rtol=1e-5, atol=1e-5)
  assert np.all(adv[2] == 0.0)


@pytest.mark.parametrize("mode", grpo.ADV_MODES)
def test_equal_rewards_give_exact_zero_advantages(mode):
  for value in (0.0, 1.0, 0.1, -3.3):
    adv = grpo.group_advantages(jnp.full((3, 16), value), mode)
    assert not np.any(np.isnan(adv)) and np.all(np.asarray(adv) == 0.0)
  assert np.all(np.asarray(grpo.group_advantages(jnp.ones((4, 1)) * 2.0, mode)) == 0.0)


def test_group_advantages_use_sample_std():
  adv = np.asarray(grpo.group_advantages(jnp.array([[0.0, 1.0]]), "group", eps=0.0))
  np.testing.assert_allclose(adv, [[-1 / np.sqrt(2), 1 / np.sqrt(2)]], rtol=1e-6)


def test_rloo_is_leave_one_out():
  adv = np.asarray(grpo.group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), "rloo"))
  np.testing.assert_allclose(adv, [[1.0, -1 / 3, -1 / 3, -1 / 3]], rtol=1e-6)


def test_unknown_adv_mode_raises():
  with pytest.raises(ValueError, match="adv mode"):
    grpo.group_advantages(jnp.ones((2, 2)), "mean")


# ------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("kind", grpo.KL_KINDS)
def test_kl_estimators_match_numpy(kind):
  _, old, ref, _, _ = random_batch(1)
  got = grpo.kl_penalty(jnp.asarray(old), jnp.asarray(ref), kind)
  np.testing.assert_allclose(got, np_kl(old.astype(np.float64), ref, kind), rtol=1e-5, atol=1e-6)


def test_k3_is_nonnegative_and_zero_at_equality():
  rng = np.random.default_rng(2)
  logp = jnp.asarray(rng.normal(-2, 3, (64, 64)), jnp.float32)
  ref = jnp.asarray(rng.normal(-2, 3, (64, 64)), jnp.float32)
  assert float(grpo.kl_penalty(logp, ref, "k3").min()) >= 0.0
  assert np.all(np.asarray(grpo.kl_penalty(logp, logp, "k3")) == 0.0)
  # ruled-out tokens (logp -> -inf relative to ref) stay finite
  far = grpo.kl_penalty(jnp.array([-200.0]), jnp.array([0.0]), "k3")
  assert np.isfinite(far).all()


# ----------------------------------------------------------------------- policy loss


CASES = [
    dict(),
    dict(aggregation="token_mean"),
    dict(aggregation="constant", max_len=16),
    dict(aggregation="constant"),
    dict(eps_low=0.2, eps_high=0.28, aggregation="token_mean"),
    dict(beta=0.04, kl_kind="k3"),
    dict(beta=0.1, kl_kind="k1", aggregation="token_mean"),
    dict(beta=0.1, kl_kind="k2", aggregation="constant"),
    dict(dual_clip_c=3.0),
    dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4),
    dict(ratio_level="sequence", eps_low=0.2, eps_high=0.3, aggregation="token_mean"),
    dict(eps_low=10.0, eps_high=10.0, beta=0.001),
]


@pytest.mark.parametrize("kwargs", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_grad_match_numpy(kwargs, seed):
  logp, old, ref, adv, mask = random_batch(seed, spread=0.5 if seed else 0.05)
  extra = dict(ref_logp_bt=jnp.asarray(ref)) if kwargs.get("beta") else {}
  loss, grad, _ = jax_loss_and_grad(logp, old, adv, mask, **kwargs, **extra)
  want_loss, want_grad = np_policy_loss_and_grad(logp, old, adv, mask, ref=ref, **kwargs)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=1e-6)


def test_policy_loss_jits():
  logp, old, ref, adv, mask = random_batch(3)
  fn = jax.jit(functools.partial(grpo.policy_loss, aggregation="token_mean", beta=0.01))
  loss, metrics = fn(logp, old, adv, mask, ref_logp_bt=ref)
  want, _ = np_policy_loss_and_grad(logp, old, adv, mask, ref=ref, aggregation="token_mean",
                                    beta=0.01)
  np.testing.assert_allclose(loss, want, rtol=2e-5)
  assert set(metrics) >= {"clip_frac", "kl", "ratio_mean", "ratio_max", "pg_loss", "n_tokens"}


def test_accepts_group_shaped_advantages():
  logp, old, _, adv, mask = random_batch(4)
  flat, _ = grpo.policy_loss(logp, old, adv, mask)
  grouped, _ = grpo.policy_loss(logp, old, adv.reshape(3, 2), mask)
  np.testing.assert_allclose(flat, grouped)


def test_masked_tokens_contribute_nothing():
  logp, old, ref, adv, mask = random_batch(5)
  kwargs = dict(beta=0.05, ref_logp_bt=ref, aggregation="token_mean")
  loss, grad, metrics = jax_loss_and_grad(logp, old, adv, mask, **kwargs)
  garbage = np.where(mask > 0, 0.0, np.nan).astype(np.float32)
  poisoned = [np.where(mask > 0, x, v) for x, v in ((logp, np.inf), (old, -np.inf), (ref, np.nan))]
  for logp2, old2, ref2 in ([*poisoned], [logp + garbage, old - garbage, ref + garbage]):
    loss2, grad2, metrics2 = jax_loss_and_grad(logp2, old2, adv, mask, **{**kwargs, "ref_logp_bt": ref2})
    assert loss2 == loss
    np.testing.assert_array_equal(grad2, grad)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics2))
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_sequence_mean_ignores_empty_sequences():
  logp, old, _, adv, mask = random_batch(6)
  loss, _ = grpo.policy_loss(logp, old, adv, mask)
  loss_without_row0, _ = grpo.policy_loss(logp[1:], old[1:], adv[1:], mask[1:])
  np.testing.assert_allclose(loss, loss_without_row0, rtol=1e-6)


def test_ratio_far_outside_clip_has_zero_gradient():
  mask = np.ones((2, 4), np.float32)
  old = np.zeros((2, 4), np.float32)
  logp = np.array([[5.0] * 4, [-5.0] * 4], np.float32)  # ratio e^5 and e^-5
  adv = np.array([1.0, -1.0], np.float32)  # both on the clipped side
  loss, grad, metrics = jax_loss_and_grad(logp, old, adv, mask)
  assert np.all(np.asarray(grad) == 0.0)
  np.testing.assert_allclose(loss, -(1.2 - 0.8) / 2, rtol=1e-6)
  assert float(metrics["clip_frac"]) == 1.0
  # the other side is not clipped: a bad token made likelier keeps its gradient
  _, grad, metrics = jax_loss_and_grad(logp, old, -adv, mask)
  assert np.all(np.asarray(grad) != 0.0) and float(metrics["clip_frac"]) == 0.0


def test_extreme_log_ratios_stay_finite():
  mask = np.ones((2, 3), np.float32)
  logp = np.array([[300.0, 0.0, -300.0], [-300.0, 0.0, 300.0]], np.float32)
  loss, grad, metrics = jax_loss_and_grad(logp, np.zeros_like(logp), np.array([1.0, -1.0]), mask,
                                          dual_clip_c=3.0)
  assert np.isfinite(loss) and np.isfinite(np.asarray(grad)).all()


def test_dual_clip_caps_negative_advantage_loss():
  mask = np.ones((1, 4), np.float32)
  old = np.zeros((1, 4), np.float32)
  logp = np.full((1, 4), 3.0, np.float32)  # ratio e^3 ~ 20
  adv = np.array([-2.0], np.float32)
  free, _, _ = jax_loss_and_grad(logp, old, adv, mask)
  capped, grad, metrics = jax_loss_and_grad(logp, old, adv, mask, dual_clip_c=3.0)
  np.testing.assert_allclose(free, np.exp(3.0) * 2.0, rtol=1e-5)
  np.testing.assert_allclose(capped, 3.0 * 2.0, rtol=1e-6)
  assert np.all(np.asarray(grad) == 0.0) and float(metrics["dual_clip_frac"]) == 1.0
  # positive advantages are untouched by the dual clip
  pos, _, _ = jax_loss_and_grad(logp, old, -adv, mask, dual_clip_c=3.0)
  np.testing.assert_allclose(pos, -1.2 * 2.0, rtol=1e-6)


def test_gspo_sequence_ratio_is_exp_mean_log_ratio():
  logp, old, _, adv, mask = random_batch(7, spread=0.3)
  _, metrics = grpo.policy_loss(logp, old, adv, mask, ratio_level="sequence")
  n_b = mask.sum(1)
  s_b = np.exp(np.where(mask > 0, logp - old, 0).sum(1) / np.maximum(n_b, 1))
  want_mean = (s_b * n_b).sum() / n_b.sum()  # every valid token carries its sequence's s_i
  np.testing.assert_allclose(metrics["ratio_mean"], want_mean, rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max"], s_b[n_b > 0].max(), rtol=1e-5)


def test_beta_zero_needs_no_reference_and_beta_positive_does():
  logp, old, _, adv, mask = random_batch(8)
  _, metrics = grpo.policy_loss(logp, old, adv, mask, beta=0.0, ref_logp_bt=None)
  assert "kl" not in metrics
  with pytest.raises(ValueError, match="ref_logp_bt"):
    grpo.policy_loss(logp, old, adv, mask, beta=0.1)


def test_on_policy_metrics():
  logp, _, _, adv, mask = random_batch(9)
  loss, metrics = grpo.policy_loss(logp, logp, adv, mask)
  assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0
  assert float(metrics["old_kl"]) == 0.0 and int(metrics["n_tokens"]) == int(mask.sum())


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_denominator_splits_into_microbatches(aggregation):
  logp, old, _, adv, mask = random_batch(10, b=8)
  full, _ = grpo.policy_loss(logp, old, adv, mask, aggregation=aggregation)
  denominator = {"sequence_mean": (mask.sum(1) > 0).sum(), "token_mean": mask.sum(),
                 "constant": 8 * mask.shape[1]}[aggregation]
  assert float(grpo.loss_denominator(mask, aggregation)) == float(denominator)
  parts = [grpo.policy_loss(logp[s], old[s], adv[s], mask[s], aggregation=aggregation,
                            denominator=denominator)[0] for s in (slice(0, 3), slice(3, 8))]
  np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


# ------------------------------------------------------------ DAPO sampling, shaping


def test_select_groups_prefers_informative_groups():
  r_bg = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0], [2, 2, 2]], np.float32)
  idx, n_filled = grpo.select_groups(r_bg, 2)
  assert idx.tolist() == [1, 3] and n_filled == 0
  idx, n_filled = grpo.select_groups(r_bg, 4)
  assert idx.tolist() == [1, 3, 0, 2] and n_filled == 2
  assert idx.dtype == np.int32
  again, _ = grpo.select_groups(r_bg, 4)
  assert again.tolist() == idx.tolist()
  with pytest.raises(ValueError):
    grpo.select_groups(r_bg, 6)


def test_overlong_penalty_follows_dapo_eq13():
  lengths = np.array([0, 10, 12, 14, 16, 17, 100])
  got = grpo.overlong_penalty(lengths, max_len=16, buffer=4, penalty=1.0)
  np.testing.assert_allclose(got, [0, 0, 0, -0.5, -1, -1, -1])
  np.testing.assert_allclose(grpo.overlong_penalty(lengths, 16, 4, penalty=0.5),
                             np.asarray(got) * 0.5)
  np.testing.assert_allclose(grpo.overlong_penalty(lengths, 16, 0), [0, 0, 0, 0, 0, -1, -1])


# --------------------------------------------------------------------- config, presets


RL_KEYS = {"group_size", "temperature", "top_k", "top_p", "max_new_tokens", "beta", "kl_kind",
           "eps_low", "eps_high", "dual_clip", "ratio_level", "aggregation", "adv_mode", "mu",
           "minibatches", "microbatches", "ref_refresh_every", "routing_replay", "dynamic_sampling", "oversample",
           "overlong_buffer", "overlong_penalty", "reward_weights", "preset", "reward_timeout",
           "reward_workers", "slots", "cache_segments", "shared_prefix"}


def test_default_rl_config_has_every_key_and_validates():
  rl = grpo.default_rl_config()
  assert set(rl.keys()) == RL_KEYS
  assert grpo.validate_rl(rl) == []
  rl.slots = -1
  assert any("rl.slots=-1" in p for p in grpo.validate_rl(rl))
  rl.slots, rl.cache_segments = 0, 0
  assert any("rl.cache_segments=0" in p for p in grpo.validate_rl(rl))


@pytest.mark.parametrize("name", sorted(grpo.PRESETS))
def test_presets_apply_and_validate(name):
  rl = grpo.apply_preset(grpo.default_rl_config(), name)
  assert rl.preset == name and grpo.validate_rl(rl) == []
  for key, value in grpo.PRESETS[name].items():
    assert rl[key] == value


def test_presets_override_each_other_completely():
  a = grpo.apply_preset(grpo.apply_preset(grpo.default_rl_config(), "dapo"), "gspo")
  b = grpo.apply_preset(grpo.default_rl_config(), "gspo")
  for key in ("eps_low", "eps_high", "aggregation", "beta", "dynamic_sampling", "ratio_level"):
    assert a[key] == b[key]


def test_preset_values_from_the_papers():
  p = grpo.PRESETS
  assert (p["r1_zero"]["beta"], p["r1_zero"]["kl_kind"], p["r1_zero"]["group_size"]) == (0.001, "k3", 16)
  assert p["r1_zero"]["ref_refresh_every"] == 400 and p["r1_zero"]["eps_high"] == 10.0
  assert (p["dr_grpo"]["adv_mode"], p["dr_grpo"]["aggregation"], p["dr_grpo"]["beta"]) == ("none", "constant", 0.0)
  assert (p["dapo"]["eps_low"], p["dapo"]["eps_high"], p["dapo"]["aggregation"]) == (0.2, 0.28, "token_mean")
  assert p["dapo"]["dynamic_sampling"] and p["dapo"]["overlong_buffer"] > 0
  assert p["gspo"]["ratio_level"] == "sequence" and p["gspo"]["eps_high"] < 1e-3


def test_validate_rl_reports_bad_values():
  rl = grpo.default_rl_config()
  rl.aggregation, rl.dual_clip, rl.overlong_buffer = "mean", 0.5, 1000
  problems = "\n".join(grpo.validate_rl(rl))
  assert "aggregation" in problems and "dual_clip" in problems and "overlong_buffer" in problems
  with pytest.raises(ValueError, match="choose one of"):
    grpo.apply_preset(rl, "ppo")


def test_all_masked_batch_is_zero_and_finite():
  logp, old, _, adv, mask = random_batch(11)
  for aggregation in grpo.AGGREGATIONS:
    loss, grad, metrics = jax_loss_and_grad(logp, old, adv, np.zeros_like(mask),
                                            aggregation=aggregation)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
    assert float(metrics["ratio_max"]) == 1.0 and int(metrics["n_tokens"]) == 0


def test_ratio_extremes_ignore_masked_tokens():
  mask = np.array([[1, 1, 0]], np.float32)
  logp = np.log(np.array([[0.5, 0.25, 100.0]], np.float32))
  _, metrics = grpo.policy_loss(logp, np.zeros_like(logp), np.ones(1), mask)
  np.testing.assert_allclose([metrics["ratio_max"], metrics["ratio_min"]], [0.5, 0.25], rtol=1e-6)
