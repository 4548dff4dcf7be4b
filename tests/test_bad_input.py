"""Bad input: a clear error, early, that says what to do; nothing corrupted.

One parametrized table (``BAD``): each row builds an optimizer and runs
``init`` and one ``update`` on a small parameter tree, and asserts the exact
error type, a message fragment that names the fix, and that the parameters,
gradients and (for update-time errors) the optimizer state given to ``update``
are bit-for-bit what they were before the call.

Then the edge cases that are *not* errors (None leaves, optax.MaskedNode,
empty trees, zero-size arrays, scalars, complex parameters, integer leaves
excluded by the mask), each checked against optax.adamw, whose update rule is
the oracle (optax/_src/alias.py ``adamw``: chain(scale_by_adam,
add_decayed_weights, scale_by_learning_rate)).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od


def _params():
  rng = np.random.default_rng(0)
  return {
      "dense": {
          "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
      },
      "norm": {"scale": jnp.asarray(1 + rng.normal(size=(2,)), jnp.float32)},
  }


def _grads(params):
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


@dataclasses.dataclass(frozen=True)
class Row:
  """``make()`` returns the optimizer (errors here are construction-time)."""

  id: str
  make: Callable[[], optax.GradientTransformation]
  error: type[Exception]
  fragment: str
  params: Callable[[], Any] = _params


def _int_params():
  return {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}


def _bool_params():
  return {"w": jnp.ones((2, 2)), "frozen": jnp.zeros((2,), bool)}


BAD = [
    # Weight decay values: ValueError at construction.
    Row("wd-negative", lambda: od.adamw(1e-3, weight_decay=-1e-2), ValueError, "finite and >= 0"),
    Row("wd-nan", lambda: od.adamw(1e-3, weight_decay=float("nan")), ValueError, "finite and >= 0"),
    Row("wd-inf", lambda: od.adamw(1e-3, weight_decay=float("inf")), ValueError, "finite and >= 0"),
    Row("wd-jnp-nan", lambda: od.add_decoupled_decay(jnp.nan), ValueError, "finite and >= 0"),
    Row("l2-negative", lambda: od.add_l2_to_grad(-1.0), ValueError, "finite and >= 0"),
    Row("adam-l2-inf", lambda: od.adam_l2(1e-3, weight_decay=np.inf), ValueError, "finite and >= 0"),
    Row("bert-negative", lambda: od.bert_adamw(1e-3, weight_decay=-0.01), ValueError, ">= 0"),
    # Per-step shrink η·λ >= 1 flips the weights' sign: known at construction for constants.
    Row("shrink-adamw", lambda: od.adamw(0.1, weight_decay=10.0), ValueError,
        "weight_decay < 1/learning_rate"),
    Row("shrink-adamw-equal-1", lambda: od.adamw(0.5, weight_decay=2.0), ValueError, ">= 1"),
    Row("shrink-sgd-l2", lambda: od.sgd_l2(1.0, weight_decay=1.5), ValueError, "flip sign"),
    Row("shrink-bert", lambda: od.bert_adamw(2.0, weight_decay=0.5), ValueError, "flip sign"),
    # Learning-rate values.
    Row("lr-nan", lambda: od.adamw(float("nan")), ValueError, "learning_rate must be finite"),
    Row("lr-negative", lambda: od.adamw(-1e-3), ValueError, "negate the loss"),
    # A constant learning rate is its own peak for 'schedule'/'corrected': 0 would be 0/0.
    Row("lr-zero-adamw-schedule-coupling",
        lambda: od.adamw(0.0, weight_decay=1e-3, coupling="schedule"), ValueError,
        "Pass peak_learning_rate=..."),
    Row("lr-zero-sgdw", lambda: od.sgdw(0, weight_decay=1e-3), ValueError,
        "Pass peak_learning_rate=..."),
    # Masks where a schedule/number is expected, and the reverse.
    Row("predicate-as-wd", lambda: od.adamw(1e-3, weight_decay=od.exclude_names("bias")),
        TypeError, "pass it as mask="),
    Row("predicate-as-lr", lambda: od.adamw(od.min_ndim(2)), TypeError, "pass it as mask="),
    Row("predicate-as-lr-sgd", lambda: od.sgd_l2(od.min_ndim(2)), TypeError, "pass it as mask="),
    Row("mask-tree-as-wd",
        lambda: od.add_decoupled_decay({"dense": {"kernel": True, "bias": False}}),
        TypeError, "a non-negative number or a schedule"),
    Row("array-as-wd", lambda: od.adamw(1e-3, weight_decay=jnp.ones(3)), TypeError,
        "a non-negative number or a schedule"),
    Row("bool-as-wd", lambda: od.adamw(1e-3, weight_decay=True), TypeError,
        "a non-negative number or a schedule"),
    Row("schedule-as-mask", lambda: od.adamw(1e-3, mask=optax.constant_schedule(0.1)),
        TypeError, "schedules go to learning_rate= or weight_decay="),
    Row("cosine-schedule-as-mask",
        lambda: od.adamw(1e-3, mask=optax.cosine_decay_schedule(1.0, 10)),
        TypeError, "schedules go to learning_rate= or weight_decay="),
    Row("float-fn-as-mask",
        lambda: od.adamw(1e-3, mask=lambda p: jax.tree.map(lambda _: 1.0, p)),
        TypeError, "must return a pytree of Python bools"),
    Row("array-fn-as-mask",
        lambda: od.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x > 0, p)),
        TypeError, "must return a pytree of Python bools"),
    Row("factory-as-mask", lambda: od.adamw(1e-3, mask=od.exclude_names), TypeError,
        "call it, e.g. mask=od.exclude_names('bias')"),
    Row("factory-as-wd", lambda: od.adamw(1e-3, weight_decay=od.min_ndim), TypeError,
        "pass it as mask="),
    Row("number-as-mask", lambda: od.adamw(1e-3, mask=0.01), TypeError,
        "the decay strength goes to weight_decay="),
    # Moment/buffer dtypes: a number in a dtype slot is a positional slip; an integer dtype
    # would truncate the running averages (optax accepts both and fails late or silently).
    Row("dtype-number-adamw", lambda: od.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0, 1e-4), TypeError,
        "mu_dtype=0.0001 is a number, not a dtype"),
    Row("dtype-int-adamw", lambda: od.adamw(1e-3, mu_dtype=jnp.int32), ValueError,
        "mu_dtype=int32 is not a floating-point dtype"),
    Row("dtype-int-nu", lambda: od.scale_by_adam(nu_dtype="int8"), ValueError,
        "nu_dtype=int8 is not a floating-point dtype"),
    Row("dtype-unknown-adam-l2", lambda: od.adam_l2(1e-3, mu_dtype="foo"), TypeError,
        "mu_dtype='foo' is not a dtype"),
    Row("dtype-int-sgdw", lambda: od.sgdw(0.1, 0.9, False, jnp.int32, weight_decay=1e-4),
        ValueError, "accumulator_dtype=int32"),
    Row("dtype-number-sgd-l2", lambda: od.sgd_l2(0.1, 0.9, False, 5e-4), TypeError,
        "accumulator_dtype=0.0005 is a number"),
    # Mask structure and names.
    Row("mask-structure", lambda: od.adamw(1e-3, mask={"dense": {"kernel": True}}), ValueError,
        "Build the mask from the parameters"),
    Row("mask-structure-extra",
        lambda: od.add_l2_to_grad(1e-2, mask={"dense": {"kernel": True, "bias": False},
                                              "norm": {"scale": False}, "head": True}),
        ValueError, "does not have the structure of the parameters"),
    Row("pattern-matches-nothing", lambda: od.adamw(1e-3, mask=od.exclude_names("LayerNrm")),
        ValueError, "allow_unmatched=True"),
    Row("include-matches-nothing",
        lambda: od.adamw(1e-3, mask=od.include_names("kernel", "weight")),
        ValueError, "pattern 'weight'"),
    # A name pattern that matches the empty string matches every path (re.search).
    Row("pattern-every-empty", lambda: od.adamw(1e-3, mask=od.exclude_names("")), ValueError,
        "matches every path"),
    Row("pattern-every-alternative", lambda: od.adamw(1e-3, mask=od.include_names("kernel|")),
        ValueError, "matches every path"),
    Row("pattern-every-bert", lambda: od.bert_adamw(1e-3, exclude=("bias", ".*")), ValueError,
        "matches every path"),
    Row("bert-on-model-without-bias",
        lambda: od.bert_adamw(1e-4), ValueError, "matches no parameter",
        params=lambda: {"LayerNorm": {"scale": jnp.ones(2)}, "w": jnp.ones((2, 2))}),
    Row("bert-allow-unmatched-not-a-bool", lambda: od.bert_adamw(1e-4, allow_unmatched="no"),
        TypeError, "allow_unmatched"),
    # Non-float leaves the mask decays: decay is defined for floating leaves only.
    Row("int-leaf-decayed", lambda: od.adamw(1e-3), TypeError,
        "floating-point parameters only", params=_int_params),
    Row("bool-leaf-decayed", lambda: od.add_decoupled_decay(1e-2, mask=od.min_ndim(0)),
        TypeError, "Exclude it from the mask", params=_bool_params),
]


@pytest.mark.parametrize("row", BAD, ids=[r.id for r in BAD])
def test_bad_input_table(row: Row):
  params = row.params()
  grads = jax.tree.map(
      lambda p: jnp.ones_like(p) if jnp.issubdtype(p.dtype, jnp.inexact) else p, params
  )
  before = jax.tree.map(np.array, (params, grads))
  state_before = None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # degenerate-mask warnings are not the point.
    with pytest.raises(row.error, match=re.escape(row.fragment)):
      tx = row.make()
      state = tx.init(params)
      state_before = jax.tree.map(np.array, state)
      tx.update(grads, state, params)
  # Nothing corrupted: the inputs are unchanged, bit for bit.
  after = jax.tree.map(np.array, (params, grads))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  if state_before is not None:
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), state_before)


def test_errors_are_raised_before_any_step_runs():
  """Construction-time rows raise from the factory itself, not from init/update."""
  for row in BAD:
    if row.id.startswith(("wd-", "shrink-", "lr-", "predicate-as", "array-as", "bool-as",
                          "mask-tree-as", "l2-", "adam-l2", "bert-negative", "pattern-every",
                          "dtype-")):
      with pytest.raises(row.error):
        row.make()


def test_update_time_mask_error_leaves_state_alone():
  """A mask that fits the init tree but not the update tree fails at update; state intact."""
  params = _params()
  tx = od.add_decoupled_decay(1e-2, mask=od.exclude_names("bias"))  # state has no params
  state = tx.init(params)
  snapshot = jax.tree.map(np.array, state)
  other = {"kernel": params["dense"]["kernel"]}  # no 'bias' any more: pattern unmatched
  with pytest.raises(ValueError, match="matches no parameter"):
    tx.update(jax.tree.map(jnp.ones_like, other), state, other)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), snapshot)


def test_schedules_are_accepted_as_weight_decay_and_learning_rate():
  """Plain functions are pytree *leaves*, not callable pytrees: schedules must pass.

  Oracle: u = -η_t(adam(g) + λ_t θ) with optax.scale_by_adam for adam(g) and the
  schedules evaluated by hand at the step count.
  """
  params = _params()
  grads = _grads(params)
  lr = optax.linear_schedule(1e-2, 1e-3, 10)
  wd = optax.linear_schedule(0.1, 0.0, 10)
  tx = od.adamw(lr, weight_decay=wd)
  adam = optax.scale_by_adam()
  s, a = tx.init(params), adam.init(params)
  p = params
  for t in range(3):
    u, s = tx.update(grads, s, p)
    au, a = adam.update(grads, a, p)
    expected = jax.tree.map(lambda x, th, t=t: -lr(t) * (x + wd(t) * th), au, p)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), u, expected)
    p = optax.apply_updates(p, u)


def test_bfloat16_hyperparameters_are_numbers_and_their_rounding_is_named():
  """Hyperparameters in bfloat16 (``optax.inject_hyperparams(..., hyperparam_dtype=...)``).

  A bfloat16 scalar is a number (numpy alone does not count it as one). Oracle: optax.adamw
  with the same bfloat16-rounded hyperparameters. 0.999 rounds to 1.0 in bfloat16, outside
  Adam's b2 range [0, 1): the error says the dtype rounded it.
  """
  params = _params()
  grads = _grads(params)
  ours = optax.inject_hyperparams(od.adamw, hyperparam_dtype=jnp.bfloat16)(
      1e-2, b2=0.99, weight_decay=1e-2)
  ref = optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.bfloat16)(
      1e-2, b2=0.99, weight_decay=1e-2)
  u, _ = ours.update(grads, ours.init(params), params)
  v, _ = ref.update(grads, ref.init(params), params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u, v)
  with pytest.raises(ValueError, match=r"b2 must be .* got 1\.0\. The value is a bfloat16"):
    od.adamw(1e-2, b2=jnp.bfloat16(0.999))


@pytest.mark.parametrize("make", [
    lambda: od.add_decoupled_decay(1e-2),
    lambda: od.add_l2_to_grad(1e-2, mask=od.exclude_names("bias")),
], ids=["add_decoupled_decay", "add_l2_to_grad"])
def test_state_of_another_optimizer_is_named(make):
  """A decay transform given another optimizer's state says so (not an AttributeError)."""
  params = _params()
  tx = make()
  foreign = optax.adam(1e-3).init(params)
  with pytest.raises(TypeError, match=r"the state is tuple, not the WeightDecayState.*tx\.init"):
    tx.update(_grads(params), foreign, params)


@pytest.mark.parametrize("make", [
    lambda: od.adamw(1e-2, weight_decay=0.1),
    lambda: od.add_decoupled_decay(0.1),
    lambda: od.with_decoupled_decay(optax.sgd(0.1), 0.01),
], ids=["adamw", "add_decoupled_decay", "with_decoupled_decay"])
@pytest.mark.parametrize("wrong", [(1,), (3, 2)], ids=["broadcasts", "incompatible"])
def test_params_whose_shapes_are_not_the_updates_are_refused(make, wrong):
  """λ·θ with a θ of another shape would broadcast into the update (changing its shape, or
  silently for a (1,) θ) or fail deep in jax: the error names the leaf and both shapes."""
  params = _params()
  grads = _grads(params)
  tx = make()
  state = tx.init(params)
  other = jax.tree.map(lambda x: x, params)
  other["dense"]["bias"] = jnp.ones(wrong, jnp.float32)
  with pytest.raises(ValueError, match=re.escape(f"'dense/bias' has shape (2,), the parameter "
                                                 f"{wrong}")):
    tx.update(grads, state, other)


def _optax_adamw_step(params, grads, **kw):
  tx = optax.adamw(1e-2, weight_decay=0.1, **kw)
  return tx.update(grads, tx.init(params), params)[0]


def test_none_leaves_zero_size_and_scalars_match_optax():
  params = {
      "kernel": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32),
      "empty": jnp.zeros((0, 4), jnp.float32),
      "scalar": jnp.float32(2.5),
      "absent": None,
  }
  grads = {"kernel": jnp.ones((3, 2)), "empty": jnp.zeros((0, 4)), "scalar": jnp.float32(-1.0),
           "absent": None}
  tx = od.adamw(1e-2, weight_decay=0.1)
  u, _ = tx.update(grads, tx.init(params), params)
  ref = _optax_adamw_step(params, grads)
  assert u["absent"] is None and u["empty"].shape == (0, 4) and u["scalar"].shape == ()
  jax.tree.map(np.testing.assert_array_equal, u, ref)


def test_empty_tree_is_a_no_op():
  for tx in (od.adamw(1e-3), od.adamw(1e-3, mask=od.exclude_names("bias")), od.sgd_l2(0.1)):
    state = tx.init({})
    u, _ = tx.update({}, state, {})
    assert u == {}


def test_inside_optax_masked_equals_optax():
  """optax.masked hands the inner transform MaskedNode leaves; paths of the others stay."""
  params = _params()
  grads = _grads(params)
  outer = {"dense": {"kernel": True, "bias": True}, "norm": {"scale": False}}
  inner_mask = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
  ours = optax.masked(od.adamw(1e-2, weight_decay=0.1, mask=od.exclude_names("bias")), outer)
  ref = optax.masked(optax.adamw(1e-2, weight_decay=0.1, mask=inner_mask), outer)
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize("as_fn", [False, True], ids=["tree", "function"])
def test_full_structure_bool_mask_inside_optax_masked_equals_optax(as_fn):
  """Inside optax.masked (or multi_transform) the inner transform sees MaskedNode leaves; a
  bool mask tree with the full parameters' structure fits there for optax.adamw, whose
  result is the oracle. Its entries at MaskedNode leaves are ignored."""
  params = _params()
  grads = _grads(params)
  outer = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": True}}
  inner = {"dense": {"kernel": True, "bias": True}, "norm": {"scale": False}}
  mask = (lambda p: inner) if as_fn else inner
  ours = optax.masked(od.adamw(1e-2, weight_decay=0.1, mask=mask), outer)
  ref = optax.masked(optax.adamw(1e-2, weight_decay=0.1, mask=mask), outer)
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)
  # A mask built from the masked tree (MaskedNode where the params have one) fits too.
  ours = optax.masked(od.adamw(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(
      lambda x: x.ndim > 1, p)), outer)
  u3, _ = ours.update(grads, ours.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, u3, u2)


def test_masked_node_leaves_in_params():
  """A tree that already holds optax.MaskedNode (as under optax.masked) is handled."""
  params = {"w": jnp.ones((2, 2)), "frozen": optax.MaskedNode()}
  grads = {"w": jnp.full((2, 2), 0.5), "frozen": optax.MaskedNode()}
  tx = od.adamw(1e-2, weight_decay=0.1)
  u, _ = tx.update(grads, tx.init(params), params)
  ref = _optax_adamw_step({"w": params["w"]}, {"w": grads["w"]})
  assert isinstance(u["frozen"], optax.MaskedNode)
  np.testing.assert_array_equal(u["w"], ref["w"])


def test_int_leaf_excluded_by_mask_is_untouched_by_decay():
  """Documented choice: non-float leaves are an error if decayed, untouched if excluded."""
  params = {"w": jnp.full((2,), 2.0), "step": jnp.asarray(7, jnp.int32)}
  updates = {"w": jnp.zeros((2,)), "step": jnp.asarray(1, jnp.int32)}
  tx = od.add_decoupled_decay(0.5, mask=od.exclude_names("step"))
  u, _ = tx.update(updates, tx.init(params), params)
  assert u["step"].dtype == jnp.int32 and int(u["step"]) == 1
  np.testing.assert_array_equal(u["w"], 0.5 * params["w"])


def test_complex_parameters_adam_algebra():
  """Complex θ: ν tracks |g|² (optax's convention, transform.py scale_by_adam via
  tree.update_moment_per_elem_norm), the decay is λθ. Oracle: numpy transcription
  of Algorithm 2 of the paper with that ν, and optax.adamw."""
  rng = np.random.default_rng(0)
  theta = (rng.normal(size=(3,)) + 1j * rng.normal(size=(3,))).astype(np.complex64)
  lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
  tx = od.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  params = {"z": jnp.asarray(theta)}
  state = tx.init(params)
  m = np.zeros(3, np.complex128)
  v = np.zeros(3, np.float64)
  th = theta.astype(np.complex128)
  for t in range(1, 4):
    g = (rng.normal(size=(3,)) + 1j * rng.normal(size=(3,))).astype(np.complex64)
    u, state = tx.update({"z": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, u)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * np.abs(g) ** 2
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    th = th - lr * (mhat / (np.sqrt(vhat) + eps) + wd * th)
    assert params["z"].dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(params["z"]), th, rtol=2e-5)
  ref = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  p2 = {"z": jnp.asarray(theta)}
  s2 = ref.init(p2)
  rng = np.random.default_rng(0)
  rng.normal(size=(3,)), rng.normal(size=(3,))
  for _ in range(3):
    g = (rng.normal(size=(3,)) + 1j * rng.normal(size=(3,))).astype(np.complex64)
    u2, s2 = ref.update({"z": jnp.asarray(g)}, s2, p2)
    p2 = optax.apply_updates(p2, u2)
  np.testing.assert_array_equal(params["z"], p2["z"])


def _nnx_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  _, state = nnx.split(model, nnx.Param)
  grads = jax.tree.map(lambda x: jnp.sin(3 * x + 1), state)  # a State of Param too.
  return nnx, state, grads


@pytest.mark.parametrize("mask", [None, od.min_ndim(2)], ids=["all", "min_ndim"])
def test_nnx_state_of_variables_as_updates_and_params_matches_optax(mask):
  """``jax.grad`` with respect to the State of ``nnx.split`` gives a State of Variables; the
  decay keeps them Variables, so optax.apply_updates works. Oracle: optax.adamw on the same
  States (it maps over the Variables' values)."""
  nnx, state, grads = _nnx_state()
  for ours, ref in [(od.adamw(1e-2, weight_decay=0.1, mask=mask),
                     optax.adamw(1e-2, weight_decay=0.1, mask=mask)),
                    (od.sgdw(1e-2, momentum=None, weight_decay=1e-3, coupling="lr", mask=mask),
                     optax.chain(optax.sgd(1e-2), optax.masked(optax.add_decayed_weights(
                         -1e-5), mask if mask is not None else lambda p: jax.tree.map(
                             lambda _: True, p))))]:
    u, _ = ours.update(grads, ours.init(state), state)
    expected, _ = ref.update(grads, ref.init(state), state)
    assert jax.tree.structure(u) == jax.tree.structure(grads)
    assert all(isinstance(x, nnx.Param) for x in jax.tree.leaves(
        u, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), u,
                 expected)
    optax.apply_updates(state, u)  # the structures agree.


def test_nnx_state_of_variables_through_lr_multipliers_and_layer_decay():
  """The per-group scalings keep Variables Variables. Oracle: the same transform on the
  plain arrays (``nnx.to_pure_dict``)."""
  nnx, state, grads = _nnx_state()
  pure = nnx.to_pure_dict(grads)
  for tx in (od.scale_by_lr_multipliers([("kernel", 0.5), ("bias", 0.0)]),
             od.scale_by_layer_decay(od.layer_decay(0.5, 2, embeddings="kernel",
                                                    stacked="bias"))):
    u, _ = tx.update(grads, tx.init(state), state)
    expected, _ = tx.update(pure, tx.init(pure))
    assert jax.tree.structure(u) == jax.tree.structure(grads)
    np.testing.assert_array_equal(u["kernel"].get_value(), expected["kernel"])
    np.testing.assert_array_equal(u["bias"].get_value(), expected["bias"])
    optax.apply_updates(state, u)
