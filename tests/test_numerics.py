"""Numerics: low-precision parameters, non-finite gradients, step counters past 2^31.

Oracles: optax.scale_by_adam / optax.adamw (optax/_src/transform.py and alias.py),
and numpy transcriptions of Adam (Kingma & Ba, Algorithm 1) and of the paper's
decoupled decay θ ← θ(1 − ηλ) (Loshchilov & Hutter, Algorithm 2, line 12).
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from optax_decoupled import _precision

INT32_MAX = np.iinfo(np.int32).max


def _tree(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), dtype),
                "bias": jnp.asarray(rng.normal(size=(4,)), dtype)},
      "scale": jnp.asarray(1 + 0.1 * rng.normal(size=(4,)), dtype),
  }


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------- low precision


def test_nu_dtype_none_is_optax_scale_by_adam_itself():
  # Default path untouched: the optax function is returned.
  tx = od.scale_by_adam()
  assert tx.update.__qualname__ == optax.scale_by_adam().update.__qualname__


def test_nu_dtype_float32_on_float32_params_is_bitwise_optax():
  params, grads = _tree(), _tree(seed=1)
  ours, ref = od.scale_by_adam(nu_dtype=jnp.float32), optax.scale_by_adam()
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1)
    u2, s2 = ref.update(grads, s2)
    _assert_tree_equal(u1, u2)
  _assert_tree_equal(s1, s2)


def test_adamw_passes_float32_moment_dtypes_through():
  """od.adamw(mu_dtype=, nu_dtype=) reaches its Adam state: float32 moments for bf16 weights."""
  params = _tree(jnp.bfloat16)
  tx = od.adamw(1e-2, weight_decay=0.5, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  state = tx.init(params)
  adam_state = state[0]
  assert isinstance(adam_state, optax.ScaleByAdamState)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam_state.mu, adam_state.nu)))
  default = od.adamw(1e-2, weight_decay=0.5).init(params)[0]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(default.nu))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_float32_moments_for_low_precision_params(dtype):
  """mu_dtype=nu_dtype=float32: state is float32 and the step equals optax's Adam run on
  the float32 images of the (exactly representable) low-precision gradients."""
  params, grads = _tree(dtype), _tree(dtype, seed=1)
  ours = od.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  ref = optax.scale_by_adam()
  s1 = ours.init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((s1.mu, s1.nu)))
  g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  s2 = ref.init(g32)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1)
    u2, s2 = ref.update(g32, s2)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u1))
    _assert_tree_equal(u1, u2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((s1.mu, s1.nu)))


def test_low_precision_decay_warning_names_the_leaf():
  params = _tree(jnp.bfloat16)
  with pytest.warns(od.LowPrecisionDecayWarning, match="rounds to nothing") as rec:
    od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias")).init(params)
  msg = str(rec[0].message)
  assert "od.stochastic_rounding" in msg and "dense/bias" not in msg


@pytest.mark.parametrize(
    "make, params",
    [
        (lambda: od.adamw(1e-3, weight_decay=1e-2), _tree(jnp.float32)),  # float32: fine
        (lambda: od.adamw(1e-3, weight_decay=1e-2, mask=od.include_names("kernel")),
         {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2, jnp.bfloat16)}),  # bf16 not decayed
        (lambda: od.adamw(0.1, weight_decay=0.1), _tree(jnp.bfloat16)),  # η·λ = 1e-2 > ε/2
        (lambda: od.stochastic_rounding(od.adamw(1e-3, weight_decay=1e-2)), _tree(jnp.bfloat16)),
    ],
)
def test_no_precision_warning_when_decay_survives(make, params):
  with warnings.catch_warnings():
    warnings.simplefilter("error", od.LowPrecisionDecayWarning)
    make().init(params)


@pytest.mark.slow  # over a second: the quick suite leaves it out
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_is_unbiased(dtype):
  """E[SR(x)] = x: the mean over many draws is within 5 standard errors of x."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64,)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = jax.vmap(lambda k: _precision._round_stochastically(x, dtype, k))(keys)
  assert draws.dtype == dtype
  d = np.asarray(draws.astype(jnp.float32))
  lo = np.asarray(x.astype(dtype).astype(jnp.float32))
  # every draw is one of the two neighbours of x
  spacing = np.abs(np.asarray(jnp.nextafter(x.astype(dtype), jnp.asarray(jnp.inf, dtype))
                              .astype(jnp.float32)) - lo)
  assert np.all(np.abs(d - np.asarray(x)[None]) <= 2 * spacing[None])
  se = d.std(axis=0) / np.sqrt(len(keys)) + 1e-12
  assert np.all(np.abs(d.mean(axis=0) - np.asarray(x)) <= 5 * se + 1e-7)


def test_stochastic_rounding_passes_float32_leaves_bit_for_bit():
  params, grads = _tree(), _tree(seed=1)
  inner = od.adamw(1e-2, weight_decay=0.1)
  tx = od.stochastic_rounding(inner)
  u1, _ = tx.update(grads, tx.init(params), params)
  u2, _ = inner.update(grads, inner.init(params), params)
  _assert_tree_equal(u1, u2)


def test_stochastic_rounding_passes_python_float_leaves():
  """Python-float parameters (float64 to numpy, never low precision) pass through, as in
  the wrapped optimizer (the oracle)."""
  params = {"a": 1.5, "b": jnp.ones(2, jnp.float32)}
  grads = {"a": 0.25, "b": jnp.full(2, 0.5, jnp.float32)}
  inner = optax.sgd(0.1)
  tx = od.stochastic_rounding(inner)
  u1, _ = tx.update(grads, tx.init(params), params)
  u2, _ = inner.update(grads, inner.init(params), params)
  _assert_tree_equal(u1, u2)


@pytest.mark.parametrize("inner, seed, fragment", [
    (optax.sgd, 0, "a factory? call it"),
    (None, 0, "inner must be an optax.GradientTransformation"),
    ("tx", 1.5, "seed must be an int"),
    ("tx", jax.random.key(0), "seed must be an int"),
    ("tx", True, "seed must be an int"),
])
def test_stochastic_rounding_refuses_bad_arguments_at_construction(inner, seed, fragment):
  """Not at init, deep in jax (an AttributeError, or PRNGKey's message)."""
  inner = optax.sgd(0.1) if inner == "tx" else inner
  with pytest.raises(TypeError, match=re.escape(fragment)):
    od.stochastic_rounding(inner, seed=seed)


def test_stochastic_rounding_names_mismatched_trees():
  tx = od.stochastic_rounding(optax.sgd(0.1))
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  with pytest.raises(ValueError, match="stochastic_rounding: updates and params have different"):
    tx.update({"v": jnp.ones(2, jnp.bfloat16)}, tx.init(params), {"v": jnp.ones(2)} | params)


def _decay_only(dtype, rounding: str, steps: int, lr=1e-3, wd=1e-2):
  """Zero gradients: only the decay acts. Returns θ after ``steps``."""
  params = {"w": jnp.ones((4096,), dtype)}
  tx = optax.chain(
      od.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32),
      od.add_decoupled_decay(wd),
      optax.scale_by_learning_rate(lr),
  )
  if rounding == "stochastic":
    tx = od.stochastic_rounding(tx, seed=0)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def step(carry, _):
    p, s = carry
    u, s = tx.update(zeros, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
      (params, tx.init(params)))
  return np.asarray(p["w"].astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_sub_ulp_decay_vanishes_with_round_to_nearest_but_acts_with_stochastic_rounding(dtype):
  """η·λ = 1e-5 is far below ε/2 of bf16 (3.9e-3) and f16 (4.9e-4).

  Oracle: θ_T = (1 − ηλ)^T θ_0 (paper, Prop. 4 / Algorithm 2 with zero gradient).
  Round-to-nearest (float32 update, rounded once) leaves θ exactly at θ_0: the
  failure the warning announces. Stochastic rounding shrinks the mean to the
  oracle within 5 standard errors.
  """
  steps, lr, wd = 2000, 1e-3, 1e-2
  expected = (1 - lr * wd) ** steps
  nearest = _decay_only(dtype, "nearest", steps, lr, wd)
  np.testing.assert_array_equal(nearest, 1.0)  # the decay silently vanished
  sr = _decay_only(dtype, "stochastic", steps, lr, wd)
  se = sr.std() / np.sqrt(sr.size)
  assert abs(sr.mean() - expected) < 5 * se + 1e-5, (sr.mean(), expected, se)
  assert sr.mean() < 1 - 0.5 * (1 - expected)  # it did shrink


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda: od.adamw(1e-2, weight_decay=0.1, mask=od.exclude_names("bias")),
        lambda: od.adam_l2(1e-2, weight_decay=0.1),
        lambda: od.bert_adamw(1e-2, exclude=("bias",)),
        lambda: od.sgd_l2(0.1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw", "adam_l2", "bert_adamw", "sgd_l2"],
)
def test_apply_if_finite_leaves_params_and_state_bit_identical(make, bad):
  """optax.apply_if_finite: a non-finite step is skipped; params and the inner state are
  bit-identical; the next finite step equals the run that never saw the bad one."""
  tx = optax.apply_if_finite(make(), max_consecutive_errors=3)
  params = _tree()
  @jax.jit
  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  params, state = step(_tree(seed=1), state, params)
  bad_grads = _tree(seed=2)
  bad_grads["dense"]["kernel"] = bad_grads["dense"]["kernel"].at[1, 2].set(bad)
  p_bad, s_bad = step(bad_grads, state, params)
  _assert_tree_equal(p_bad, params)
  _assert_tree_equal(s_bad.inner_state, state.inner_state)
  assert int(s_bad.notfinite_count) == 1 and not bool(s_bad.last_finite)
  good = _tree(seed=3)
  p_after, _ = step(good, s_bad, p_bad)
  p_clean, _ = step(good, state, params)
  _assert_tree_equal(p_after, p_clean)


# ---------------------------------------------------------------- long runs


def _with_count(state, count):
  """Sets every int32 step counter in an optimizer state to ``count``."""
  return jax.tree.map(
      lambda x: jnp.asarray(count, jnp.int32) if getattr(x, "dtype", None) == jnp.int32
      and x.shape == () else x, state)


@pytest.mark.parametrize(
    "ours, ref",
    [
        (lambda: od.adamw(1e-3, weight_decay=1e-2), lambda: optax.adamw(1e-3, weight_decay=1e-2)),
        (lambda: od.adamw(optax.cosine_decay_schedule(1e-3, 1000), weight_decay=1e-2),
         lambda: optax.adamw(optax.cosine_decay_schedule(1e-3, 1000), weight_decay=1e-2)),
        (lambda: od.adam_l2(1e-3, weight_decay=1e-2),
         lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-3))),
    ],
    ids=["adamw", "adamw-schedule", "adam_l2"],
)
def test_step_counter_saturates_past_int32_and_matches_optax(ours, ref):
  """Counts start 2 below int32 max; after 5 steps they sit at int32 max (no wrap to a
  negative count), every update is finite, and the result is optax's bit for bit."""
  params, grads = _tree(), _tree(seed=1)
  t1, t2 = ours(), ref()
  s1 = _with_count(t1.init(params), INT32_MAX - 2)
  s2 = _with_count(t2.init(params), INT32_MAX - 2)
  p1 = p2 = params
  for _ in range(5):
    u1, s1 = jax.jit(t1.update)(grads, s1, p1)
    u2, s2 = jax.jit(t2.update)(grads, s2, p2)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(u1))
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    _assert_tree_equal(p1, p2)
  counts = [int(x) for x in jax.tree.leaves(s1) if x.dtype == jnp.int32 and x.shape == ()]
  assert counts and all(c == INT32_MAX for c in counts)


@pytest.mark.parametrize(
    "kw", [{"bias_correction": False}, {"eps_hat": True}, {"nu_dtype": jnp.float32}],
    ids=["bert", "eps_hat", "nu_dtype"])
def test_adam_variants_stay_finite_at_saturated_count(kw):
  """Bias correction at t = 2^31 − 1: 1 − β^t is exactly 1 in float32, so the step is
  m/(√v + ε) (numpy transcription of Adam with t → ∞, and Keras's ε̂ form)."""
  params, grads = _tree(), _tree(seed=1)
  tx = od.scale_by_adam(**kw)
  s = _with_count(tx.init(params), INT32_MAX - 1)
  for _ in range(3):
    u, s = jax.jit(tx.update)(grads, s)
  assert int(s.count) == INT32_MAX
  for m, v, uu in zip(jax.tree.leaves(s.mu), jax.tree.leaves(s.nu), jax.tree.leaves(u)):
    m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
    np.testing.assert_allclose(np.asarray(uu), m / (np.sqrt(v) + 1e-8), rtol=1e-5)


def test_weight_decay_state_counter_saturates():
  tx = od.add_decoupled_decay(optax.linear_schedule(0.1, 0.0, 100))
  params = _tree()
  s = od.WeightDecayState(decay_count=jnp.asarray(INT32_MAX - 1, jnp.int32))
  for _ in range(3):
    u, s = tx.update(params, s, params)
  assert int(s.decay_count) == INT32_MAX
  _assert_tree_equal(u, params)  # schedule ended at 0: u + 0·θ
