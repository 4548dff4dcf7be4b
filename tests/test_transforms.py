"""The transforms (od.add_l2_to_grad, od.scale_by_adam, od.add_decoupled_decay) and the traced
algebra of the aliases: under chex variants (with jit, without jit, and with pmap where more
than one device is present), one compilation, state types, and formulas.

Oracles: Adam as Kingma & Ba 2015, Algorithm 1 (Nesterov: Dozat 2016), BERT's
``apply_gradients`` and Keras 3's AdamW step as numpy transcriptions in ``tests/references.py``;
the transforms' one-line formulas (``u + λ_t·θ``, mask by leaf name) written out in numpy here;
optax's own ``scale_by_adam`` for the undecayed chain of the mask test.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

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
# chex variants of every traced-algebra test. The pmap variant broadcasts the arguments to
# all devices and keeps the first device's output; chex skips it when only one device exists
# (run with XLA_FLAGS=--xla_force_host_platform_device_count=2 to include it on CPU).
VARIANTS = {"with_jit": True, "without_jit": True, "with_pmap": True}
EPS32 = float(np.finfo(np.float32).eps)


def named(names):
  """absl named parameters from names that may hold '-'."""
  return [(n.replace("-", "_"), n) for n in names]


def assert_roundoff_close(actual, desired, ulps: float = 8.0, eps: float = EPS32):
  """Leafwise ``|a − d| ≤ ulps·eps·max|d|``: float32 round-off at the leaf's scale.

  Under jit XLA:CPU fuses ``a·b + c`` into one fused multiply-add (one rounding instead of
  two), so values computed by cancellation (``m = β1 m + (1−β1) g`` near 0, ``u + λθ``)
  differ from the eager or numpy result by a few ulps of the *operands*, i.e. of the
  leaf's scale, not of the (small) result.
  """
  chex.assert_trees_all_equal_shapes(actual, desired)
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    d = np.asarray(d, np.float32)
    tol = ulps * eps * max(float(np.abs(d).max(initial=0.0)), np.finfo(np.float32).tiny)
    chex.assert_trees_all_close(np.asarray(a, np.float32), d, rtol=0, atol=tol)


def run_updates(tx, params, steps, wrap=jax.jit, apply=True):
  """``steps`` updates with ``random_grads``, ``tx.init`` and ``tx.update`` wrapped by ``wrap``
  (a chex variant, or jax.jit): lists of updates and states (state 0 = init)."""
  init, update = wrap(tx.init), wrap(tx.update)
  states, all_updates = [init(params)], []
  for t in range(steps):
    updates, state = update(random_grads(params, t), states[-1], params)
    all_updates.append(updates)
    states.append(state)
    if apply:
      params = optax.apply_updates(params, updates)
  return all_updates, states


# --- under each variant: structure, shape and dtype of state and updates; formulas -------------



def _assert_moments_follow(params, all_updates, states, oracle, ulps=8.0):
  """Each step's updates and moments equal ``oracle(g, m, v, t) -> (u, m, v)`` (a numpy
  transcription, run leaf by leaf from zero moments on the same gradients)."""
  treedef = jax.tree.structure(params)
  m = [np.zeros(x.shape, np.float32) for x in jax.tree.leaves(params)]
  v = [np.zeros(x.shape, np.float32) for x in jax.tree.leaves(params)]
  for t, updates in enumerate(all_updates):
    ref = []
    for i, g in enumerate(jax.tree.leaves(random_grads(params, t))):
      u, m[i], v[i] = oracle(np.asarray(g), m[i], v[i], t + 1)
      ref.append(u)
    assert_roundoff_close(updates, jax.tree.unflatten(treedef, ref), ulps=ulps)
    assert_roundoff_close(states[t + 1].mu, jax.tree.unflatten(treedef, m))
    assert_roundoff_close(states[t + 1].nu, jax.tree.unflatten(treedef, v))

class TracedAlgebraTest(chex.TestCase):

  @chex.variants(**VARIANTS)
  @parameterized.named_parameters(*named(TRANSFORMS))
  def test_state_and_updates_keep_structure_shapes_dtypes(self, name):
    params = small_params()
    tx = TRANSFORMS[name]()
    all_updates, states = run_updates(tx, params, 4, self.variant)
    for updates, state in zip(all_updates, states[1:]):
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      chex.assert_tree_all_finite(updates)
      # The state keeps its type, structure, shapes and dtypes (scan/checkpoint compatible).
      assert type(state) is type(states[0])
      chex.assert_trees_all_equal_structs(state, states[0])
      chex.assert_trees_all_equal_shapes_and_dtypes(state, states[0])
      chex.assert_tree_all_finite(state)
    # Every step-counting state counts the steps (int32 scalars).
    counts = [x for p, x in jax.tree_util.tree_leaves_with_path(states[-1])
              if p and getattr(p[-1], "name", None) in ("count", "decay_count")]
    assert counts
    for c in counts:
      chex.assert_shape(c, ())
      chex.assert_type(c, jnp.int32)
      chex.assert_trees_all_equal(c, jnp.asarray(4, jnp.int32))

  @chex.variants(**VARIANTS)
  @parameterized.named_parameters(("adam", False), ("nesterov", True))
  def test_scale_by_adam_is_kingma_ba_algorithm_1(self, nesterov):
    """Kingma & Ba 2015, Algorithm 1 (Nesterov: Dozat 2016), transcribed in references.py."""
    params = small_params()
    tx = od.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, nesterov=nesterov)
    all_updates, states = run_updates(tx, params, 20, self.variant, apply=False)
    _assert_moments_follow(params, all_updates, states, lambda g, m, v, t: R.adam_update(
        g, m, v, t, nesterov=nesterov), ulps=16)
    # The two variants differ by far more than round-off, so the parameter is wired through.
    other, _ = run_updates(od.scale_by_adam(nesterov=not nesterov), params, 2, self.variant,
                           apply=False)
    assert np.abs(R.flat(jax.tree.leaves(other[1])) -
                  R.flat(jax.tree.leaves(all_updates[1]))).max() > 0.1

  @chex.variants(**VARIANTS)
  def test_bias_correction_false_is_bert_update(self):
    """google-research/bert optimization.py apply_gradients: update = next_m/(sqrt(next_v)+eps)."""
    params = small_params()
    tx = od.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6, bias_correction=False)
    all_updates, states = run_updates(tx, params, 20, self.variant, apply=False)
    _assert_moments_follow(params, all_updates, states, lambda g, m, v, t: R.bert_adam_update(
        g, m, v, 0.9, 0.999, 1e-6))
    # It is not Adam: with bias correction the first steps differ by far more than round-off.
    adam, _ = run_updates(od.scale_by_adam(eps=1e-6), params, 1, self.variant, apply=False)
    assert np.abs(R.flat(jax.tree.leaves(adam[0])) /
                  R.flat(jax.tree.leaves(all_updates[0])) - 1).min() > 0.3

  @chex.variants(**VARIANTS)
  @parameterized.named_parameters(("add_l2_to_grad", od.add_l2_to_grad),
                                  ("add_decoupled_decay", od.add_decoupled_decay))
  def test_decay_adds_scheduled_term_on_unmasked_leaves(self, factory):
    """Step k (0-based) adds wd(k)·θ (optax's convention: the same count as the learning
    rate) to every leaf whose name has no "bias"; the others pass through unchanged."""
    params = small_params()

    def wd(count):  # a distinct value at every step
      return 0.01 * (count + 1)

    decayed = ["bias" not in n for n in R.leaf_names(params)]  # independent of od's masks
    assert any(decayed) and not all(decayed)
    tx = factory(wd, mask=BIAS_MASK)
    all_updates, states = run_updates(tx, params, 6, self.variant, apply=False)
    for k, updates in enumerate(all_updates):
      g, p = jax.tree.leaves(random_grads(params, k)), jax.tree.leaves(params)
      wd_k = np.float32(wd(k))
      expected = [np.asarray(gi) + wd_k * np.asarray(pi) if d else np.asarray(gi)
                  for gi, pi, d in zip(g, p, decayed)]
      assert_roundoff_close(updates, jax.tree.unflatten(jax.tree.structure(params), expected),
                            ulps=2)
      for gi, ui, d in zip(g, jax.tree.leaves(updates), decayed):
        if not d:  # excluded leaves: no term at all, bitwise.
          chex.assert_trees_all_equal(ui, gi)
    chex.assert_trees_all_equal(states[-1].decay_count, jnp.asarray(6, jnp.int32))

  @chex.variants(**VARIANTS)
  def test_alias_lr_and_decay_schedules_share_the_count(self):
    """Through od.adamw, a zero gradient gives θ(1 − η_k λ_k) at step k: lr and λ schedules
    are evaluated at the same count (torch.optim.AdamW's ``param.mul_(1 - lr * wd)``)."""
    params = small_params()

    def wd(count):
      return 0.01 * (count + 1)

    lr = optax.linear_schedule(1e-2, 2e-2, 6)
    tx = od.adamw(lr, weight_decay=wd)
    update = self.variant(tx.update)
    state, p = self.variant(tx.init)(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    for k in range(6):
      u, state = update(zeros, state, p)
      shrink = float(np.float32(lr(k))) * float(np.float32(wd(k)))
      chex.assert_trees_all_close(u, jax.tree.map(lambda x, c=shrink: -c * x, p), rtol=1e-5)
      p = optax.apply_updates(p, u)

  @chex.variants(**VARIANTS)
  def test_eps_hat_chain_is_keras_adamw(self):
    """Keras 3 AdamW (keras/src/optimizers/adam.py update_step + base_optimizer
    _apply_weight_decay), as chain(scale_by_adam(eps_hat=True), add_decoupled_decay, lr)."""
    params = small_params()
    grads = R.quadratic_grad_fn(params)
    steps, lr, wd, eps = 60, optax.cosine_decay_schedule(1e-2, 60, 0.1), 0.004 * 10, 1e-7
    ours = R.run_optax(
        optax.chain(od.scale_by_adam(eps=eps, eps_hat=True), od.add_decoupled_decay(wd),
                    optax.scale_by_learning_rate(lr)), params, grads, steps, self.variant)
    ref = R.keras_adamw_trajectory(R.to_leaves(params), grads, steps, lr, wd, epsilon=eps)
    tol = steps * np.finfo(np.float32).eps * max(1.0, np.abs(ref).max())
    chex.assert_trees_all_close(ours, ref, rtol=0, atol=tol)
    # ε's placement matters here (the 1e-4-scale leaf): the textbook placement is far off.
    textbook = R.run_optax(
        optax.chain(od.scale_by_adam(eps=eps), od.add_decoupled_decay(wd),
                    optax.scale_by_learning_rate(lr)), params, grads, steps)
    assert np.abs(textbook - ref).max() > 30 * tol


# --- one compilation -----------------------------------------------------------------------------


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
  chex.assert_tree_all_finite(state)
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
  _, states = run_updates(tx, params, 2)
  assert isinstance(states[-1], optax.ScaleByAdamState)
  # optax's tree utilities find the usual fields.
  assert int(optax.tree_utils.tree_get(states[-1], "count")) == 2
  mu_dtype = jnp.bfloat16 if name.endswith("bf16") else jnp.float32
  chex.assert_trees_all_equal_shapes(states[-1].mu, params)
  chex.assert_type(jax.tree.leaves(states[-1].mu), mu_dtype)
  chex.assert_trees_all_equal_shapes_and_dtypes(states[-1].nu, params)


@pytest.mark.parametrize("factory", [od.add_l2_to_grad, od.add_decoupled_decay])
def test_weight_decay_state_type_does_not_depend_on_schedule(factory):
  params = small_params()
  const, sched = factory(0.1), factory(LINEAR_WD)
  s_const, s_sched = const.init(params), sched.init(params)
  assert type(s_const) is type(s_sched) is od.WeightDecayState
  chex.assert_trees_all_equal_shapes_and_dtypes(s_const, s_sched)
  _, states_c = run_updates(const, params, 3)
  _, states_s = run_updates(sched, params, 3)
  chex.assert_trees_all_equal_shapes_and_dtypes(states_c[-1], states_s[-1])
  # ... so a whole optimizer's state (a checkpoint) does not change shape either.
  lr = optax.cosine_decay_schedule(1e-3, 10)
  a = od.adamw(lr, weight_decay=0.1).init(params)
  b = od.adamw(lr, weight_decay=LINEAR_WD).init(params)
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


# --- masks: excluded leaves get no decay term, and the compiled update has no select ----------


@pytest.mark.parametrize("alias", ["adamw", "adam_l2"])
def test_masked_leaves_follow_the_undecayed_chain_bitwise(alias):
  params = small_params()
  grads = R.quadratic_grad_fn(params)
  decay = od.add_decoupled_decay if alias == "adamw" else od.add_l2_to_grad
  body = [od.scale_by_adam(), optax.scale_by_learning_rate(1e-2)]
  pos = 1 if alias == "adamw" else 0
  masked = optax.chain(*body[:pos], decay(1.0, mask=BIAS_MASK), *body[pos:])
  # The oracle is optax's own Adam chain with no decay at all.
  undecayed = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
  steps = 50
  a = R.run_optax(masked, params, grads, steps)
  b = R.run_optax(undecayed, params, grads, steps)
  roundoff = steps * EPS32 * np.abs(b).max()
  names = R.leaf_names(params)
  cols = R.leaf_slices(R.to_leaves(params))
  for n, c in zip(names, cols):
    if "bias" in n:
      chex.assert_trees_all_equal(a[:, c], b[:, c], custom_message=n)
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


@pytest.mark.hlo
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
