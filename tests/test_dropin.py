"""Drop-in means drop-in: optax's signatures, and optax's compositions around od.

Oracles: optax itself (``optax/_src/alias.py``: ``adamw``, ``adam``, ``sgd`` and their
positional order), ``optax.inject_hyperparams`` and ``optax.masked`` /
``optax.multi_transform`` (``optax/_src/combine.py``, ``wrappers.py``) used on optax's own
optimizers, and exact Python arithmetic for the SGDR schedule (Loshchilov & Hutter, SGDR,
Eq. 5).
"""

from __future__ import annotations

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=2), jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}}


def _grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _params())


def _run(tx, params, steps=4):
  state = tx.init(params)
  for t in range(steps):
    u, state = tx.update(_grads(t + 1), state, params)
    params = optax.apply_updates(params, u)
  return params


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# -- 1. Signatures ------------------------------------------------------------------------

ADAMW_POSITIONAL = [
    (1e-3,),
    (1e-3, 0.8),
    (1e-3, 0.8, 0.99),
    (1e-3, 0.8, 0.99, 1e-6),
    (1e-3, 0.8, 0.99, 1e-6, 1e-9),
    (1e-3, 0.8, 0.99, 1e-6, 1e-9, jnp.bfloat16),
    (1e-3, 0.8, 0.99, 1e-6, 1e-9, None, 3e-2),
    (1e-3, 0.8, 0.99, 1e-6, 1e-9, None, 3e-2, lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
]


@pytest.mark.parametrize("args", ADAMW_POSITIONAL, ids=[str(len(a)) for a in ADAMW_POSITIONAL])
def test_adamw_takes_optax_adamws_positional_arguments(args):
  # optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, *, ...)
  _assert_same(_run(od.adamw(*args), _params()), _run(optax.adamw(*args), _params()))


def test_positional_names_match_optax_and_extras_are_keyword_only():
  pairs = [(od.adamw, optax.adamw), (od.adam_l2, optax.adam), (od.sgd_l2, optax.sgd),
           (od.sgdw, optax.sgd)]
  for ours, theirs in pairs:
    def positional(f):
      return [p.name for p in inspect.signature(f).parameters.values()
              if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional(ours) == positional(theirs), ours.__name__


def test_adam_l2_and_sgd_l2_without_decay_are_optax_adam_and_sgd():
  _assert_same(_run(od.adam_l2(1e-3, 0.8, 0.99, 1e-6, 1e-9), _params()),
               _run(optax.adam(1e-3, 0.8, 0.99, 1e-6, 1e-9), _params()))
  _assert_same(_run(od.sgd_l2(0.1, 0.9, True), _params()),
               _run(optax.sgd(0.1, 0.9, True), _params()))


@pytest.mark.parametrize("bad", [jnp.bfloat16, jnp.float32, np.float16, np.dtype("float32"),
                                 dict, lambda: 0.1, lambda t, u: 0.1],
                         ids=["bf16", "f32", "np-f16", "dtype", "class", "no-arg", "two-args"])
def test_dtypes_classes_and_non_schedules_are_never_schedules(bad):
  for make in (lambda: od.adamw(1e-3, weight_decay=bad), lambda: od.adamw(bad),
               lambda: od.sgdw(0.1, weight_decay=bad), lambda: od.add_decoupled_decay(bad),
               lambda: od.with_decoupled_decay(optax.sgd(0.1), bad)):
    with pytest.raises(TypeError, match="schedule"):
      make()


def test_old_positional_slip_no_longer_zeroes_the_weights():
  # The sixth positional argument is mu_dtype, as in optax: weights decay by η·λ with the
  # default λ = 1e-4, never to zero.
  def run(tx):
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    step = jax.jit(lambda p, s: optax.apply_updates(p, tx.update({"w": jnp.zeros(4)}, s, p)[0]))
    update = jax.jit(lambda p, s: tx.update({"w": jnp.zeros(4)}, s, p)[1])
    for _ in range(1000):
      params, state = step(params, state), update(params, state)
    return params["w"]

  args = (1e-3, 0.9, 0.999, 1e-8, 0.0, jnp.float32)
  w = run(od.adamw(*args))
  np.testing.assert_array_equal(w, run(optax.adamw(*args)))
  assert float(w.min()) > 0.9998  # (1 − 1e-7)^1000 ≈ 0.9999, up to float32 rounding


# -- 3. optax compositions ----------------------------------------------------------------

INJECTABLE = {
    "adamw": (od.adamw, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "adam_l2": (od.adam_l2, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "sgd_l2": (od.sgd_l2, dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2)),
    "sgd_l2-momentum-0": (od.sgd_l2, dict(learning_rate=0.1, momentum=0.0, weight_decay=1e-2)),
    "sgdw": (od.sgdw, dict(learning_rate=0.1, weight_decay=1e-2)),
    "sgdw-momentum-0": (od.sgdw, dict(learning_rate=0.1, momentum=0.0, weight_decay=1e-2)),
    "bert_adamw": (od.bert_adamw, dict(learning_rate=1e-2, weight_decay=1e-2, exclude=())),
    "optax.sgd": (optax.sgd, dict(learning_rate=0.1, momentum=0.0)),
}


@pytest.mark.parametrize("name", list(INJECTABLE))
def test_inject_hyperparams_under_jit_equals_rebuilding_each_step(name):
  factory, kw = INJECTABLE[name]
  tx = optax.inject_hyperparams(factory)(**kw)
  params, ref_params = _params(), _params()
  state, ref_state = tx.init(params), factory(**kw).init(ref_params)
  update = jax.jit(tx.update)
  for t in range(4):
    if t == 2:  # change the learning rate (and λ, where there is one) mid-run
      state.hyperparams["learning_rate"] = jnp.asarray(kw["learning_rate"] / 2)
      kw = dict(kw, learning_rate=kw["learning_rate"] / 2)
      if "weight_decay" in kw:
        state.hyperparams["weight_decay"] = jnp.asarray(kw["weight_decay"] * 3)
        kw = dict(kw, weight_decay=kw["weight_decay"] * 3)
    g = _grads(t + 1)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    ru, ref_state = jax.jit(factory(**kw).update)(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ru)
  # Traced hyperparameters are not constant-folded: equal to float32 round-off.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params, ref_params)


def test_predicate_under_inject_hyperparams_names_static_args():
  mask = od.exclude_names("bias")
  with pytest.raises(TypeError, match=r"static_args=\('mask',\)"):
    optax.inject_hyperparams(od.adamw)(1e-3, weight_decay=1e-2, mask=mask).init(_params())
  tx = optax.inject_hyperparams(od.adamw, static_args=("mask",))(1e-3, weight_decay=1e-2,
                                                                 mask=mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               _run(tx, _params()), _run(od.adamw(1e-3, weight_decay=1e-2, mask=mask), _params()))


def test_nnx_mask_function_idiom_works_as_with_optax():
  nnx = pytest.importorskip("flax.nnx")
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731 - optax's idiom

  def train(tx):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for t in range(3):
      grads = nnx.state(model, nnx.Param)
      grads = jax.tree.map(lambda x, t=t: jnp.full_like(x, 0.1 * (t + 1)), grads)
      optimizer.update(model, grads)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  _assert_same(train(od.adamw(1e-2, weight_decay=0.5, mask=mask)),
               train(optax.adamw(1e-2, weight_decay=0.5, mask=mask)))


ALIASES = {
    "adamw": lambda: od.adamw(1e-2, weight_decay=1e-2),
    "adam_l2": lambda: od.adam_l2(1e-2, weight_decay=1e-2),
    "sgd_l2": lambda: od.sgd_l2(0.1, 0.9, weight_decay=1e-2),
    "sgdw": lambda: od.sgdw(0.1, weight_decay=1e-2),
    "bert_adamw": lambda: od.bert_adamw(1e-2, exclude=()),
    "adamw-f32-moments": lambda: od.adamw(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32),
    "adamw-schedule": lambda: od.adamw(1e-2, weight_decay=1e-4, coupling="schedule"),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_python_float_leaves_are_parameters_too(name):
  # A Python float leaf is a float32 scalar parameter (optax.adamw takes it): the step
  # equals the one on the same tree with a jnp.float32 scalar.
  with_float = {"temperature": 1.5, "w": jnp.ones(3)}
  with_array = {"temperature": jnp.float32(1.5), "w": jnp.ones(3)}
  grads = {"temperature": jnp.float32(0.25), "w": jnp.full(3, 0.5)}
  tx = ALIASES[name]()
  u1, _ = tx.update(grads, tx.init(with_float), with_float)
  u2, _ = tx.update(grads, tx.init(with_array), with_array)
  _assert_same(u1, u2)
  if name == "adamw":
    ref = optax.adamw(1e-2, weight_decay=1e-2)
    _assert_same(u1, ref.update(grads, ref.init(with_float), with_float)[0])


def test_multi_transform_with_a_predicate_matching_another_group():
  # The predicate inside one group of optax.multi_transform sees MaskedNode leaves for the
  # other group; a rule that matches a leaf of the other group is not a typo.
  labels = {"dense": {"kernel": "adam", "bias": "adam"}, "head": {"kernel": "sgd"}}
  inner = od.adamw(1e-2, weight_decay=0.1, mask=od.exclude_names("bias", "head"))
  tx = optax.multi_transform({"adam": inner, "sgd": optax.sgd(0.1)}, labels)
  ref = optax.multi_transform(
      {"adam": optax.adamw(1e-2, weight_decay=0.1,
                           mask={"dense": {"kernel": True, "bias": False},
                                 "head": {"kernel": False}}),
       "sgd": optax.sgd(0.1)}, labels)
  _assert_same(_run(tx, _params()), _run(ref, _params()))


def test_masked_with_a_typo_says_why_and_how():
  tx = optax.masked(od.adamw(1e-2, mask=od.exclude_names("bais")),
                    {"dense": {"kernel": True, "bias": False}, "head": {"kernel": False}})
  with pytest.raises(ValueError, match="optax.masked or optax.multi_transform"):
    tx.init(_params())


def test_tree_get_finds_the_one_step_count_as_on_optax():
  for tx in (od.adamw(1e-3), optax.adamw(1e-3)):
    state = tx.init(_params())
    for t in range(3):
      _, state = tx.update(_grads(t), state, _params())
    assert int(optax.tree_utils.tree_get(state, "count")) == 3


def test_decay_toward_a_numpy_reference_and_refusing_broadcasts():
  params = _params()
  reference = jax.tree.map(lambda x: np.asarray(x) * 0.5, params)  # numpy arrays
  tx = od.with_decay_toward(optax.sgd(0.1), 0.1, reference=reference)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  # u = −c·(θ − θ_ref) = −0.1·0.5·θ
  jax.tree.map(lambda a, p: np.testing.assert_allclose(a, -0.05 * np.asarray(p), rtol=1e-6),
               u, params)
  bad = jax.tree.map(lambda x: np.ones(x.shape[-1:], np.float32), params)  # broadcasts
  with pytest.raises(ValueError, match="broadcasting is not applied"):
    od.with_decay_toward(optax.sgd(0.1), 0.1, reference=bad).init(params)


# -- 4. Long runs -------------------------------------------------------------------------

def _sgdr_exact(t, t0, mult):
  """SGDR (Loshchilov & Hutter 2017, Eq. 5) in Python integers: the position in the period."""
  if mult == 1:
    return 0.5 * (1 + math.cos(math.pi * (t % t0) / t0))
  start, period = 0, t0
  while t >= start + period:
    start, period = start + period, period * mult
  return 0.5 * (1 + math.cos(math.pi * (t - start) / period))


@pytest.mark.parametrize("t0, mult", [(10, 3), (7, 2), (100, 1), (1, 5)])
def test_warm_restarts_are_exact_at_the_end_of_int32(t0, mult):
  sched = od.cosine_warm_restarts_schedule(1.0, first_period=t0, period_multiplier=mult)
  for t in (2**31 - 1, 2**31 - 2, 2**30 + 7, 123_456_789):
    want = _sgdr_exact(t, t0, mult)
    assert float(jax.jit(sched)(jnp.int32(t))) == pytest.approx(want, abs=2e-6), t
  for t in (2**31 + 5, 3 * 2**40 + 1, 2**62 + 3):  # Python ints past int32: exact too
    assert float(sched(t)) == pytest.approx(_sgdr_exact(t, t0, mult), abs=2e-6), t


def test_warnings_stay_quiet_on_a_clean_chain():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _run(od.adamw(1e-3, weight_decay=1e-2, mask=od.min_ndim(2)), _params())
