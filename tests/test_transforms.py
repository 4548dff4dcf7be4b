"""The transforms (od.add_l2_to_grad, od.scale_by_adam, od.add_decoupled_decay) and the traced
algebra of every alias: with and without jit, one compilation, state types, and formulas.

Oracles: optax's own transforms; BERT's ``apply_gradients`` and Keras 3's AdamW step as numpy
transcriptions in ``tests/references.py``; the transforms' one-line formulas
(``u + λ_t·θ``) written out in numpy here.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests import references as R
from tests.fixtures import small_named_params as small_params


def random_grads(params, step: int, seed: int = 1):
  rng = np.random.default_rng(seed * 1000 + step)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(10.0 ** (i % 7 - 4) * rng.normal(size=x.shape), x.dtype)
      for i, x in enumerate(leaves)])


LINEAR_WD = optax.linear_schedule(0.2, 0.0, 40)
BIAS_MASK = od.exclude_names("bias")

TRANSFORMS = {
    "add_l2_to_grad": lambda: od.add_l2_to_grad(0.1),
    "add_l2_to_grad-schedule-mask": lambda: od.add_l2_to_grad(LINEAR_WD, mask=BIAS_MASK),
    "add_decoupled_decay": lambda: od.add_decoupled_decay(0.1),
    "add_decoupled_decay-schedule-mask": lambda: od.add_decoupled_decay(LINEAR_WD, BIAS_MASK),
    "scale_by_adam": lambda: od.scale_by_adam(),
    "scale_by_adam-bert": lambda: od.scale_by_adam(eps=1e-6, bias_correction=False),
    "scale_by_adam-keras": lambda: od.scale_by_adam(eps=1e-7, eps_hat=True),
    "scale_by_adam-nesterov": lambda: od.scale_by_adam(nesterov=True),
    "scale_by_adam-bert-nesterov": lambda: od.scale_by_adam(bias_correction=False, nesterov=True),
    "scale_by_adam-mu-bf16": lambda: od.scale_by_adam(mu_dtype=jnp.bfloat16),
    "adamw": lambda: od.adamw(optax.cosine_decay_schedule(1e-2, 40), weight_decay=0.1,
                              mask=BIAS_MASK),
    "adam_l2": lambda: od.adam_l2(1e-2, weight_decay=0.1),
    "sgd_l2": lambda: od.sgd_l2(1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "bert_adamw": lambda: od.bert_adamw(1e-2),
}
VARIANTS = {"with_jit": jax.jit, "without_jit": lambda f: f}
EPS32 = float(np.finfo(np.float32).eps)


def assert_roundoff_close(actual, desired, ulps: float = 8.0, eps: float = EPS32):
  """Leafwise ``|a − d| ≤ ulps·eps32·max|d|``: float32 round-off at the leaf's scale.

  Under jit XLA:CPU fuses ``a·b + c`` into one fused multiply-add (one rounding instead of
  two), so values computed by cancellation (``m = β1 m + (1−β1) g`` near 0, ``u + λθ``)
  differ from the eager or numpy result by a few ulps of the *operands*, i.e. of the
  leaf's scale, not of the (small) result.
  """
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
    a, d = np.asarray(a, np.float32), np.asarray(d, np.float32)
    assert a.shape == d.shape
    tol = ulps * eps * max(float(np.abs(d).max()), np.finfo(np.float32).tiny)
    np.testing.assert_allclose(a, d, rtol=0, atol=tol)


def run_updates(tx, params, steps, variant, apply=True):
  """``steps`` updates with ``random_grads``: lists of updates and states (state 0 = init)."""
  init, update = VARIANTS[variant](tx.init), VARIANTS[variant](tx.update)
  states, all_updates = [init(params)], []
  for t in range(steps):
    updates, state = update(random_grads(params, t), states[-1], params)
    all_updates.append(updates)
    states.append(state)
    if apply:
      params = optax.apply_updates(params, updates)
  return all_updates, states


# --- with and without jit; structure, shape and dtype of state and updates -------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_with_and_without_jit_structure_shapes_dtypes(name):
  params = small_params()
  results = {}
  for variant in VARIANTS:
    tx = TRANSFORMS[name]()
    all_updates, states = run_updates(tx, params, 4, variant)
    results[variant] = all_updates
    for updates, state in zip(all_updates, states[1:]):
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      chex.assert_tree_all_finite(updates)
      # The state keeps its type, structure, shapes and dtypes (scan/checkpoint compatible).
      assert type(state) is type(states[0])
      chex.assert_trees_all_equal_structs(state, states[0])
      chex.assert_trees_all_equal_shapes_and_dtypes(state, states[0])
    # Every step-counting state counts the steps (int32 scalars).
    counts = [x for p, x in jax.tree_util.tree_leaves_with_path(states[-1])
              if p and getattr(p[-1], "name", None) in ("count", "decay_count")]
    assert counts
    for c in counts:
      chex.assert_shape(c, ())
      chex.assert_type(c, jnp.int32)
      assert int(c) == 4
  # Same float32 ops; XLA fuses multiply-adds under jit, so allow a few ulps. With a bfloat16
  # first moment, XLA may keep intermediates of β1·m in float32 where eager rounds them to
  # bfloat16: a few bfloat16 ulps.
  eps = float(jnp.finfo(jnp.bfloat16).eps) if name.endswith("bf16") else EPS32
  assert_roundoff_close(results["with_jit"], results["without_jit"],
                        ulps=8 if eps == EPS32 else 2, eps=eps)


@pytest.mark.parametrize("name", ["add_decoupled_decay-schedule-mask", "adamw", "sgd_l2",
                                  "bert_adamw", "scale_by_adam-keras"])
def test_one_compilation_for_many_steps(name):
  tx = TRANSFORMS[name]()
  params = small_params()
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(30):  # new values every step, schedules advance: still one trace.
    params, state = step(params, state, random_grads(params, t))
  chex.assert_tree_all_finite(params)
  # The check is live: a step with other shapes must trace again, which it refuses.
  other = jax.tree.map(lambda x: jnp.concatenate([x, x]), params)
  with pytest.raises(AssertionError, match="traced"):
    step(other, tx.init(other), other)


# --- state types --------------------------------------------------------------------------------


ADAM_VARIANTS = [n for n in TRANSFORMS if n.startswith("scale_by_adam")]


@pytest.mark.parametrize("name", ADAM_VARIANTS)
def test_scale_by_adam_state_is_optax_state(name):
  params = small_params()
  tx = TRANSFORMS[name]()
  state = tx.init(params)
  assert isinstance(state, optax.ScaleByAdamState)
  assert type(state) is type(optax.scale_by_adam().init(params))
  chex.assert_trees_all_equal_structs(state, optax.scale_by_adam().init(params))
  _, states = run_updates(tx, params, 2, "with_jit")
  assert isinstance(states[-1], optax.ScaleByAdamState)
  # optax's tree utilities find the usual fields.
  assert int(optax.tree_utils.tree_get(states[-1], "count")) == 2
  mu_dtype = jnp.bfloat16 if name.endswith("bf16") else jnp.float32
  chex.assert_trees_all_equal_shapes(states[-1].mu, params)
  chex.assert_type(jax.tree.leaves(states[-1].mu), mu_dtype)
  chex.assert_trees_all_equal_shapes_and_dtypes(states[-1].nu, params)


def test_scale_by_adam_default_is_optax_scale_by_adam():
  params = small_params()
  ours, _ = run_updates(od.scale_by_adam(), params, 5, "with_jit")
  ref, _ = run_updates(optax.scale_by_adam(), params, 5, "with_jit")
  chex.assert_trees_all_equal(ours, ref)


@pytest.mark.parametrize("factory", [od.add_l2_to_grad, od.add_decoupled_decay])
def test_weight_decay_state_type_does_not_depend_on_schedule(factory):
  params = small_params()
  const, sched = factory(0.1), factory(LINEAR_WD)
  s_const, s_sched = const.init(params), sched.init(params)
  assert type(s_const) is type(s_sched) is od.WeightDecayState
  chex.assert_trees_all_equal_shapes_and_dtypes(s_const, s_sched)
  _, states_c = run_updates(const, params, 3, "with_jit")
  _, states_s = run_updates(sched, params, 3, "with_jit")
  chex.assert_trees_all_equal_shapes_and_dtypes(states_c[-1], states_s[-1])
  # ... so a whole optimizer's state (a checkpoint) does not change shape either.
  lr = optax.cosine_decay_schedule(1e-3, 10)
  a = od.adamw(lr, weight_decay=0.1).init(params)
  b = od.adamw(lr, weight_decay=LINEAR_WD).init(params)
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


# --- formulas against references -------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_bias_correction_false_is_bert_update(variant):
  """google-research/bert optimization.py apply_gradients: update = next_m/(sqrt(next_v)+eps)."""
  params = small_params()
  tx = od.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6, bias_correction=False)
  all_updates, states = run_updates(tx, params, 20, variant, apply=False)
  m = [np.zeros(x.shape, np.float32) for x in jax.tree.leaves(params)]
  v = [np.zeros(x.shape, np.float32) for x in jax.tree.leaves(params)]
  for t, updates in enumerate(all_updates):
    grads = jax.tree.leaves(random_grads(params, t))
    for i, (u, g) in enumerate(zip(jax.tree.leaves(updates), grads)):
      ref, m[i], v[i] = R.bert_adam_update(np.asarray(g), m[i], v[i], 0.9, 0.999, 1e-6)
      assert_roundoff_close(u, ref)
    assert_roundoff_close(states[t + 1].mu, jax.tree.unflatten(jax.tree.structure(params), m))
    assert_roundoff_close(states[t + 1].nu, jax.tree.unflatten(jax.tree.structure(params), v))
  # It is not Adam: with bias correction the first steps differ by far more than round-off.
  adam, _ = run_updates(od.scale_by_adam(eps=1e-6), params, 1, variant, apply=False)
  assert np.abs(R.flat(jax.tree.leaves(adam[0])) /
                R.flat(jax.tree.leaves(all_updates[0])) - 1).min() > 0.3


def test_eps_hat_chain_is_keras_adamw():
  """Keras 3 AdamW (keras/src/optimizers/adam.py update_step + base_optimizer
  _apply_weight_decay), as chain(scale_by_adam(eps_hat=True), add_decoupled_decay, lr)."""
  params = small_params()
  grads = R.quadratic_grad_fn(params)
  steps, lr, wd, eps = 60, optax.cosine_decay_schedule(1e-2, 60, 0.1), 0.004 * 10, 1e-7
  ours = R.run_optax(
      optax.chain(od.scale_by_adam(eps=eps, eps_hat=True), od.add_decoupled_decay(wd),
                  optax.scale_by_learning_rate(lr)), params, grads, steps)
  ref = R.keras_adamw_trajectory(R.to_leaves(params), grads, steps, lr, wd, epsilon=eps)
  tol = steps * np.finfo(np.float32).eps * max(1.0, np.abs(ref).max())
  np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
  # ε's placement matters here (the 1e-4-scale leaf): the textbook placement is far off.
  textbook = R.run_optax(
      optax.chain(od.scale_by_adam(eps=eps), od.add_decoupled_decay(wd),
                  optax.scale_by_learning_rate(lr)), params, grads, steps)
  assert np.abs(textbook - ref).max() > 30 * tol


def test_schedule_weight_decay_is_evaluated_at_the_update_count():
  """Step k (0-based) adds wd(k)·θ: optax's convention, the same count as the learning rate."""
  params = small_params()

  def wd(count):  # a distinct value at every step
    return 0.01 * (count + 1)

  tx = od.add_decoupled_decay(wd)
  all_updates, _ = run_updates(tx, params, 6, "with_jit", apply=False)
  for k, updates in enumerate(all_updates):
    g = random_grads(params, k)
    wd_k = np.float32(wd(k))
    expected = jax.tree.map(lambda u, p, w=wd_k: np.asarray(u) + w * np.asarray(p), g, params)
    assert_roundoff_close(updates, expected, ulps=2)
  # Through an alias, lr and λ schedules share the count: a zero gradient gives θ(1 − η_k λ_k).
  lr = optax.linear_schedule(1e-2, 2e-2, 6)
  tx = od.adamw(lr, weight_decay=wd)
  state, p = tx.init(params), params
  zeros = jax.tree.map(jnp.zeros_like, params)
  for k in range(6):
    u, state = tx.update(zeros, state, p)
    shrink = float(np.float32(lr(k))) * float(np.float32(wd(k)))
    chex.assert_trees_all_close(u, jax.tree.map(lambda x, c=shrink: -c * x, p), rtol=1e-5)
    p = optax.apply_updates(p, u)


# --- masks: excluded leaves get no decay term, and the compiled update has no select ----------


@pytest.mark.parametrize("alias", ["adamw", "adam_l2"])
def test_masked_leaves_follow_the_undecayed_chain_bitwise(alias):
  params = small_params()
  grads = R.quadratic_grad_fn(params)
  decay = od.add_decoupled_decay if alias == "adamw" else od.add_l2_to_grad
  body = [od.scale_by_adam(), optax.scale_by_learning_rate(1e-2)]
  pos = 1 if alias == "adamw" else 0
  masked = optax.chain(*body[:pos], decay(1.0, mask=BIAS_MASK), *body[pos:])
  undecayed = optax.chain(*body)
  steps = 50
  a = R.run_optax(masked, params, grads, steps)
  b = R.run_optax(undecayed, params, grads, steps)
  roundoff = steps * EPS32 * np.abs(b).max()
  names = R.leaf_names(params)
  cols = R.leaf_slices(R.to_leaves(params))
  for n, c in zip(names, cols):
    if "bias" in n:
      np.testing.assert_array_equal(a[:, c], b[:, c], err_msg=n)
    else:
      assert np.abs(a[:, c] - b[:, c]).max() > 100 * roundoff, n


def _selects_on_tensors(hlo: str) -> list[str]:
  """Lines of lowered StableHLO with a select whose operands are not scalars."""
  out = []
  for line in hlo.splitlines():
    if "select" in line:
      types = re.findall(r"tensor<([^>]*)>", line)
      if any("x" in t for t in types):  # shaped types read like tensor<4x3xf32>
        out.append(line.strip())
  return out


@pytest.mark.parametrize("make", [
    lambda: od.add_decoupled_decay(0.1, mask=BIAS_MASK),
    lambda: od.add_l2_to_grad(LINEAR_WD, mask=BIAS_MASK),
    lambda: od.adamw(1e-3, weight_decay=0.1, mask=od.exclude_names(*od.BERT_EXCLUDE)),
], ids=["add_decoupled_decay", "add_l2_to_grad-schedule", "adamw-bert"])
def test_masked_update_compiles_without_select(make):
  params = small_params()
  tx = make()
  hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
  assert "stablehlo" in hlo
  assert _selects_on_tensors(hlo) == []
  # The detector works: a per-element masked decay (what a traced mask costs) is flagged.
  mask = jax.tree.map(lambda x: jnp.full(x.shape, True), params)
  where = jax.jit(lambda u, p, m: jax.tree.map(lambda a, b, c: jnp.where(c, a + 0.1 * b, a),
                                               u, p, m))
  assert _selects_on_tensors(where.lower(params, params, mask).as_text())
