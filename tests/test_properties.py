"""Property-based tests (hypothesis): invariants over random pytrees, shapes and dtypes.

Derandomized (a fixed example sequence, no flakiness) and small (max_examples=25).
Oracles: optax.adam / optax.sgd (the undecayed optimizers), and the paper's
Proposition 1 (Loshchilov & Hutter 2019): for plain SGD, L2 with coefficient λ
equals decoupled decay θ ← θ(1 − ηλ) − ηg.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_decoupled as od

settings.register_profile(
    "optax_decoupled", derandomize=True, max_examples=25, deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
SETTINGS = settings.get_profile("optax_decoupled")

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
NAMES = ["kernel", "bias", "scale", "embedding", "w"]
# A fixed menu of shapes (scalar, zero-size, 1-D to 3-D): eager JAX compiles each primitive
# once per shape and dtype, so a small menu keeps the examples fast.
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 3), (4, 1, 2)]


@st.composite
def trees(draw, min_leaves=1):
  """{group_i: {name: array}} with random shapes (incl. scalars, zero-size), dtypes, values."""
  n = draw(st.integers(min_leaves, 5))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  tree = {}
  for i in range(n):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    name = draw(st.sampled_from(NAMES))
    tree.setdefault(f"group{i % 3}", {})[f"{name}{i}"] = jnp.asarray(
        rng.normal(size=shape), dtype)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), tree)
  return tree, grads


def _run(tx, params, grads, steps=2):
  state = tx.init(params)
  out = []
  for _ in range(steps):
    u, state = tx.update(grads, state, params)
    out.append(u)
    params = optax.apply_updates(params, u)
  return out, params


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow  # over a second: the quick suite leaves it out
@SETTINGS
@given(data=trees(), lr=st.sampled_from([1e-3, 1e-2, 0.1]))
def test_zero_weight_decay_equals_the_undecayed_optimizer_exactly(data, lr):
  params, grads = data
  mask = od.exclude_names("bias", allow_unmatched=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    cases = [
        (od.adamw(lr, weight_decay=0.0, mask=mask), optax.adam(lr)),
        (od.adam_l2(lr, weight_decay=0.0), optax.adam(lr)),
        (od.sgd_l2(lr, momentum=0.9, weight_decay=0.0), optax.sgd(lr, momentum=0.9)),
    ]
    for ours, ref in cases:
      u1, p1 = _run(ours, params, grads)
      u2, p2 = _run(ref, params, grads)
      _equal(u1, u2)
      _equal(p1, p2)


@SETTINGS
@given(data=trees(), lr=st.sampled_from([1e-3, 1e-2, 0.1]))
def test_bert_adamw_zero_weight_decay_regression_pin(data, lr):
  """Regression pin: pins current behaviour, od.bert_adamw(weight_decay=0) equal bit for bit
  to our own undecayed chain (scale_by_adam without bias correction, then the lr). Both
  sides are this package's code: no claim of correctness (that is test_aliases' BERT
  transcription)."""
  params, grads = data
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    ours = od.bert_adamw(lr, weight_decay=0.0, exclude=(tuple(NAMES),))
    pinned = optax.chain(od.scale_by_adam(eps=1e-6, bias_correction=False),
                         optax.scale_by_learning_rate(lr))
    u1, p1 = _run(ours, params, grads)
    u2, p2 = _run(pinned, params, grads)
  _equal(u1, u2)
  _equal(p1, p2)


@pytest.mark.slow  # over a second: the quick suite leaves it out
@SETTINGS
@given(data=trees(), bits=st.lists(st.booleans(), min_size=15, max_size=15),
       wd=st.sampled_from([1e-3, 0.1, 0.5]))
def test_masked_out_leaves_are_untouched_by_the_decay(data, bits, wd):
  """Masked-out leaves: update == optax.adam's exactly. Decayed leaves: optax.adam's
  update minus lr·wd·θ (the paper's Algorithm 2, line 12)."""
  params, grads = data
  lr = 1e-2
  leaves, treedef = jax.tree.flatten(params)
  mask = jax.tree.unflatten(treedef, [bool(b) for b in bits[: len(leaves)]])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    (u,), _ = _run(od.adamw(lr, weight_decay=wd, mask=mask), params, grads, steps=1)
  (ref,), _ = _run(optax.adam(lr), params, grads, steps=1)
  for decay, x, r, p in zip(jax.tree.leaves(mask), jax.tree.leaves(u), jax.tree.leaves(ref),
                            leaves):
    if not decay:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
    else:
      expected = np.asarray(r, np.float64) - lr * wd * np.asarray(p, np.float64)
      tol = float(jnp.finfo(p.dtype).eps) * 4
      np.testing.assert_allclose(np.asarray(x, np.float64), expected, rtol=tol, atol=tol * lr)


@SETTINGS
@given(data=trees(), lr=st.sampled_from([1e-3, 1e-2, 0.1]), wd=st.sampled_from([0.0, 1e-2, 1.0]))
def test_l2_and_decoupled_decay_agree_for_plain_sgd(data, lr, wd):
  """Proposition 1: SGD with L2 coefficient λ is θ(1 − ηλ) − ηg. The L2 chain (sgd_l2) and
  the decoupled chain each match that numpy form (float64) to round-off of the leaf dtype."""
  params, grads = data
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
    l2 = od.sgd_l2(lr, weight_decay=wd)
    _, p1 = _run(l2, params, grads, steps=1)
    decoupled = optax.chain(od.add_decoupled_decay(wd), optax.scale_by_learning_rate(lr))
    _, p2 = _run(decoupled, params, grads, steps=1)
  for ours in (p1, p2):
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, params)
    for x, p, g in zip(jax.tree.leaves(ours), jax.tree.leaves(params), jax.tree.leaves(grads)):
      p64, g64 = np.asarray(p, np.float64), np.asarray(g, np.float64)
      expected = p64 * (1 - lr * wd) - lr * g64
      tol = float(jnp.finfo(p.dtype).eps) * 2
      scale = np.abs(p64) + lr * np.abs(g64) + lr * wd * np.abs(p64)
      assert np.all(np.abs(np.asarray(x, np.float64) - expected) <= tol * scale + 1e-30)


@pytest.mark.slow  # over a second: the quick suite leaves it out
@SETTINGS
@given(data=trees())
def test_init_update_dtypes_and_shapes_follow_the_parameters(data):
  """For every dtype and shape (scalars, zero-size): updates keep the leaf's shape, and
  applying them keeps the parameters' dtypes."""
  params, grads = data
  tx = od.adamw(1e-3, weight_decay=1e-2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
    (u,), p = _run(tx, params, grads, steps=1)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), u, params)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), p, params)
