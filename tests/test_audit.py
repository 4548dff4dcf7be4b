"""``od.audit_decay`` tells the kind of decay, its shrink and its schedule relation from outside.

Oracles: the update rules as their sources define them, written out per case below:
optax/_src/alias.py (``adamw`` = chain(scale_by_adam, add_decayed_weights, scale_by_lr):
shrink η·λ on the masked leaves; ``adam``: none; ``lion``: decay after the sign, shrink η·λ;
``adafactor``: ``add_decayed_weights`` after the learning-rate scaling, shrink λ whatever η);
torch's ``Adam(weight_decay)`` / ``chain(add_decayed_weights, adam)`` (L2 through the moments);
SGD with L2 before it (Loshchilov & Hutter 2019, Prop. 1: decoupled with shrink η·λ without
momentum; through the buffer with momentum) or after it (the flax sst2 chain: +λθ after the
sign flip, the weights grow); L2-SP (Li et al. 2018) for ``with_decay_toward``; and the
couplings of ``od.coupled_weight_decay`` (c_t = η_t·λ, η_t/α·λ, λ, η_t²/α·λ).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_decoupled as od

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
          "LayerNorm": {"scale": jnp.ones(2)}}
ALL = ("LayerNorm/scale", "dense/bias", "dense/kernel")
BERT = od.exclude_names(*od.BERT_EXCLUDE)
LR = optax.cosine_decay_schedule(1e-2, 2000)


def _kinds(kind, only=ALL):
  return {p: (kind if p in only else "none") for p in ALL}


def _matrices(p):
  return jax.tree.map(lambda x: x.ndim > 1, p)


# name: (optimizer, expected kinds, expected shrink c on the decayed leaves, or None)
CASES = {
    "optax.adamw": (lambda: optax.adamw(1e-3, weight_decay=0.1), _kinds("decoupled"), 1e-4),
    "optax.adamw-mask": (lambda: optax.adamw(1e-3, weight_decay=0.1, mask=_matrices),
                         _kinds("decoupled", ("dense/kernel",)), 1e-4),
    "optax.adam": (lambda: optax.adam(1e-3), _kinds("none"), None),
    "l2-then-adam": (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3)),
                     _kinds("coupled_l2"), None),
    "optax.lion": (lambda: optax.lion(1e-3, weight_decay=0.1), _kinds("decoupled"), 1e-4),
    "optax.adafactor": (lambda: optax.adafactor(1e-2, weight_decay_rate=1e-3),
                        _kinds("decoupled"), 1e-3),
    "l2-then-sgd": (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1)),
                    _kinds("decoupled"), 0.01),
    "l2-then-momentum-sgd": (lambda: optax.chain(optax.add_decayed_weights(0.1),
                                                 optax.sgd(0.1, 0.9)), _kinds("coupled_l2"), None),
    "sgd-then-l2-grows": (lambda: optax.chain(optax.sgd(0.1), optax.add_decayed_weights(0.1)),
                          _kinds("grows"), -0.1),
    "od.adamw-bert": (lambda: od.adamw(1e-3, weight_decay=0.1, mask=BERT),
                      _kinds("decoupled", ("dense/kernel",)), 1e-4),
    "od.adamw-schedule": (lambda: od.adamw(1e-3, weight_decay=1e-4, coupling="schedule"),
                          _kinds("decoupled"), 1e-4),
    "od.adamw-none": (lambda: od.adamw(1e-3, weight_decay=1e-4, coupling="none"),
                      _kinds("decoupled"), 1e-4),
    "od.adamw-corrected": (lambda: od.adamw(1e-3, weight_decay=0.1, coupling="corrected"),
                           _kinds("decoupled"), 1e-4),
    "od.adamw-nesterov": (lambda: od.adamw(1e-3, weight_decay=0.1, nesterov=True),
                          _kinds("decoupled"), 1e-4),
    "od.adam_l2": (lambda: od.adam_l2(1e-3, weight_decay=0.1), _kinds("coupled_l2"), None),
    "od.sgd_l2-plain": (lambda: od.sgd_l2(0.1, weight_decay=1e-3), _kinds("decoupled"), 1e-4),
    "od.sgd_l2-momentum": (lambda: od.sgd_l2(0.1, 0.9, weight_decay=1e-3),
                           _kinds("coupled_l2"), None),
    "od.sgdw": (lambda: od.sgdw(0.1, weight_decay=1e-4), _kinds("decoupled"), 1e-4),
    "od.sgdw-lr": (lambda: od.sgdw(0.1, weight_decay=1e-3, coupling="lr"),
                   _kinds("decoupled"), 1e-4),
    "od.bert_adamw": (lambda: od.bert_adamw(1e-3), _kinds("decoupled", ("dense/kernel",)), 1e-5),
    "od.with_decay_toward": (lambda: od.with_decay_toward(optax.adam(1e-3), 0.01),
                             _kinds("toward_reference"), 0.01),
    "inject_hyperparams": (lambda: optax.inject_hyperparams(od.adamw)(1e-3, weight_decay=0.1),
                           _kinds("decoupled"), 1e-4),
    "MultiSteps": (lambda: optax.MultiSteps(od.adamw(1e-3, weight_decay=0.1), 4),
                   _kinds("decoupled"), 1e-4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kinds_and_first_step_shrink(name):
  make, kinds, shrink = CASES[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    report = od.audit_decay(make(), PARAMS, probe_steps=())
  assert report.kinds() == kinds
  if shrink is None:
    assert report.shrink() == {}
  else:
    for path, c in report.shrink().items():
      assert c == pytest.approx(shrink, rel=1e-4), path


RELATIONS = {
    "od.adamw-lr": (lambda: od.adamw(LR, weight_decay=0.1), "lr (c_t ∝ η_t"),
    "od.adamw-schedule": (lambda: od.adamw(LR, weight_decay=1e-4, coupling="schedule",
                                           peak_learning_rate=1e-2), "lr (c_t ∝ η_t"),
    "od.adamw-none": (lambda: od.adamw(LR, weight_decay=1e-4, coupling="none"), "independent"),
    "od.adamw-corrected": (lambda: od.adamw(LR, weight_decay=0.1, coupling="corrected",
                                            peak_learning_rate=1e-2), "lr²"),
    "od.sgdw": (lambda: od.sgdw(LR, weight_decay=1e-4, peak_learning_rate=1e-2), "lr (c_t"),
    "optax.adamw": (lambda: optax.adamw(LR, weight_decay=0.1), "lr (c_t ∝ η_t"),
    "optax.adafactor": (lambda: optax.adafactor(LR, weight_decay_rate=1e-3), "independent"),
}


@pytest.mark.parametrize("name", list(RELATIONS))
def test_schedule_relation(name):
  make, relation = RELATIONS[name]
  report = od.audit_decay(make(), PARAMS, learning_rate=LR, probe_steps=(0, 100, 500))
  assert report.relation.startswith(relation), report.relation
  steps = dict(report.shrink_by_step)
  assert sorted(steps) == [0, 100, 500]


def test_relation_is_not_guessed():
  report = od.audit_decay(od.adamw(1e-3, weight_decay=0.1), PARAMS, learning_rate=1e-3)
  assert report.relation.startswith("not told: the learning rate is constant")
  assert od.audit_decay(od.adamw(1e-3), PARAMS).relation.startswith("not probed")


def test_the_audit_does_not_depend_on_parameter_values():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)  # zero biases/weights still get probed
  tx = od.adamw(1e-3, weight_decay=0.1, mask=BERT)
  assert od.audit_decay(tx, zero).kinds() == od.audit_decay(tx, PARAMS).kinds()


def test_printed_table_and_paths_as_describe_mask():
  report = od.audit_decay(od.adamw(1e-3, weight_decay=0.1, mask=BERT), PARAMS)
  text = str(report)
  assert "dense/kernel" in text and "decoupled" in text and "none: 2, decoupled: 1" in text
  assert list(report.kinds()) == [r.path for r in od.describe_mask(PARAMS, BERT).rows]


def test_nnx_state_of_variables():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  report = od.audit_decay(optax.adamw(1e-3, weight_decay=0.1, mask=_matrices), state)
  assert report.kinds() == {"bias": "none", "kernel": "decoupled"}


# --- the fit is checked: no affine label for what is not affine -----------------------------

AFFINE = {"decoupled", "toward_reference", "grows", "coupled_l2"}


def _elementwise(rule):
  """A stateless transformation adding ``rule(θ)`` to the update: a decay of a known form."""
  return optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda u, s, p: (jax.tree.map(lambda g, x: g + rule(x), u, p), s))


def _minus_cube(x):
  return -0.01 * x**3


def _minus_sign(x):
  return -0.01 * jnp.sign(x)


def _above_one(x):
  return -0.01 * jnp.where(jnp.abs(x) > 1, x, 0)


def _almost_linear(x):
  return -0.01 * x * (1 + 1e-3 * x * x)


# name: (decay rule, a word the detail must contain). Each update is written out, so its form
# is the truth: u = −0.01·θ³, −0.01·sign θ, −0.01·θ·1[|θ| > 1], −0.01·θ·(1 + 1e-3·θ²).
NONLINEAR = {
    "cubic": (_minus_cube, "|θ|^3"),
    "l1": (_minus_sign, "sign-like"),
    "above-one": (_above_one, "thresholded"),
    "almost-linear": (_almost_linear, ""),
}


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_nonlinear_decay_gets_no_affine_label(name):
  rule, word = NONLINEAR[name]
  report = od.audit_decay(_elementwise(rule), PARAMS, probe_steps=())
  for row in report.rows:
    assert row.kind == "nonlinear" and row.shrink is None, row
    assert word in row.detail, row.detail


def test_decay_through_a_clip_is_not_affine():
  # L2, then clip_by_global_norm(1), then sgd: u = −η·clip(λθ), which is −ηλθ only while
  # ‖λθ‖ ≤ 1; the probe's points reach ‖λθ‖ > 1, so the shrink is seen to change with ‖θ‖.
  tx = optax.chain(optax.add_decayed_weights(0.1), optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  for row in od.audit_decay(tx, PARAMS, probe_steps=()).rows:
    assert row.kind == "nonlinear" and "clip" in row.detail, row


def test_a_clip_on_the_gradient_alone_is_not_seen():
  # clip_by_global_norm before adamw clips g only; the decay after it is optax.adamw's.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  assert od.audit_decay(tx, PARAMS, probe_steps=()).kinds() == _kinds("decoupled")


def _with_grads(rule):
  """A stateless transformation u = rule(g, θ), leaf by leaf."""
  return optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda g, s, p=None: (jax.tree.map(rule, g, p), s))


GRADIENT_DEPENDENT = {
    # optax/_src/alias.py lamb: chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio,
    # scale_by_lr): the decay term is divided by ‖adam(g) + λθ‖ with the gradient's step.
    "optax.lamb": lambda: optax.lamb(1e-3, weight_decay=0.1),
    # Chen et al. 2025: the term is kept where sign(update) = sign(θ), which g decides.
    "od.cautious": lambda: od.with_decoupled_decay(optax.adam(1e-3), 1e-3, cautious=True),
    # optax/contrib/_mechanic.py: + λ·s·‖g‖/‖θ‖·θ, scaled by the gradient's norm.
    "optax.contrib.mechanize": lambda: optax.contrib.mechanize(optax.sgd(1e-2), weight_decay=0.1),
    # −λθ only where g ≠ 0: nothing at a zero gradient, a shrink λ with one (not "none").
    "decay-where-g-is-nonzero": lambda: _with_grads(lambda g, p: -0.1 * p * (g != 0)),
    # −λ·(1 + ‖g‖)·θ: λ at a zero gradient, more with one (not "decoupled" with shrink λ).
    "decay-scaled-by-grad-norm": lambda: _with_grads(
        lambda g, p: -0.1 * (1 + jnp.linalg.norm(g)) * p),
}


@pytest.mark.parametrize("name", list(GRADIENT_DEPENDENT))
def test_decay_rescaled_by_the_gradient(name):
  report = od.audit_decay(GRADIENT_DEPENDENT[name](), PARAMS, probe_steps=())
  assert report.kinds() == _kinds("gradient_dependent")
  assert report.shrink() == {}


# --- the optimizer as it runs: state that holds θ ------------------------------------------

def test_schedule_free_without_decay_is_none():
  # optax/contrib/_schedule_free.py: z = y at init; with g = 0 the base update is 0, z and x
  # stay at y, and y does not move.
  for tx in (optax.contrib.schedule_free_sgd(1.0),
             optax.contrib.schedule_free_adamw(1e-3, weight_decay=0.0)):
    assert od.audit_decay(tx, PARAMS, probe_steps=()).kinds() == _kinds("none")


@pytest.mark.parametrize("make, shrink", [
    # schedule_free_adamw's base is chain(scale_by_adam, add_decayed_weights, scale_by_lr): at
    # the first step c_k = 1 and y ← z − γ(adam(0) + λy) = (1 − γλ)·y.
    (lambda: optax.contrib.schedule_free_adamw(1e-3, weight_decay=0.1), 1e-4),
    # schedule_free_sgd's base is chain(add_decayed_weights, sgd): L2 through plain SGD is
    # decoupled with shrink γλ (Loshchilov & Hutter 2019, Prop. 1).
    (lambda: optax.contrib.schedule_free_sgd(1.0, weight_decay=0.1), 0.1),
])
def test_schedule_free_with_decay_is_decoupled(make, shrink):
  report = od.audit_decay(make(), PARAMS, probe_steps=())
  assert report.kinds() == _kinds("decoupled")
  # u is a difference of θ-sized values (y_new − y): round-off ε·|θ| against γλ·|θ| ≈ 1e-4·|θ|.
  assert all(c == pytest.approx(shrink, rel=1e-2) for c in report.shrink().values())


def test_fixed_reference_is_toward_reference():
  # od.with_decay_toward with a given θ_ref: u = −c·(θ − θ_ref) at every step.
  ref = jax.tree.map(lambda x: jnp.full_like(x, 0.3), PARAMS)
  report = od.audit_decay(od.with_decay_toward(optax.sgd(0.1), 0.01, reference=ref), PARAMS,
                          probe_steps=())
  assert report.kinds() == _kinds("toward_reference")
  assert all(c == pytest.approx(0.01, rel=1e-4) for c in report.shrink().values())


# --- every dtype, any state -----------------------------------------------------------------

def _as(dtype):
  return jax.tree.map(lambda x: x.astype(dtype), PARAMS)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64])
@pytest.mark.parametrize("make, kind, shrink", [
    (lambda: optax.adamw(1e-3, weight_decay=0.1), "decoupled", 1e-4),
    (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3)), "coupled_l2", None),
    (lambda: od.adamw(1e-3, weight_decay=0.1), "decoupled", 1e-4),
    (lambda: optax.adam(1e-3), "none", None),
])
def test_every_float_dtype(dtype, make, kind, shrink):
  report = od.audit_decay(make(), _as(dtype), probe_steps=())
  assert report.kinds() == _kinds(kind)
  assert {r.dtype for r in report.rows} == {jnp.dtype(dtype).name}
  for c in report.shrink().values():
    assert c == pytest.approx(shrink, rel=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_floats_with_float32_moments(dtype):
  # od.adamw keeps m in float32 and decays u = −η·λ·θ in the parameters' dtype.
  tx = od.adamw(1e-3, weight_decay=0.1, mu_dtype=jnp.float32)
  report = od.audit_decay(tx, _as(dtype), probe_steps=())
  assert report.kinds() == _kinds("decoupled")
  assert all(c == pytest.approx(1e-4, rel=1e-3) for c in report.shrink().values())


def test_integer_leaves_are_not_floats():
  params = {"w": jnp.ones(4), "steps": jnp.zeros(3, jnp.int32), "on": jnp.ones(2, bool)}
  report = od.audit_decay(optax.adamw(1e-3, weight_decay=0.1), params, probe_steps=())
  assert report.kinds() == {"on": "not a float", "steps": "not a float", "w": "decoupled"}


def test_state_with_prng_keys_masked_nodes_and_nones():
  # noisy_sgd holds a key; masked leaves hold MaskedNode; a chain's state may hold None.
  none_state = optax.GradientTransformation(lambda p: (None, optax.EmptyState()),
                                            lambda u, s, p: (u, s))
  tx = optax.chain(none_state, optax.masked(optax.noisy_sgd(0.1), _matrices),
                   optax.adamw(1e-3, weight_decay=0.1, mask=_matrices))
  report = od.audit_decay(tx, PARAMS, probe_steps=())
  assert report.kinds() == _kinds("decoupled", ("dense/kernel",))


def test_integer_state_that_follows_theta_is_no_statistic():
  # u = −0.01·θ at every step; an integer state counts positive weights. Counts hold no decay
  # term: decoupled, not coupled_l2.
  def init(p):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.int32), p)

  def update(g, s, p=None):
    return (jax.tree.map(lambda x: -0.01 * x, p),
            jax.tree.map(lambda n, x: n + (x > 0).astype(jnp.int32), s, p))
  report = od.audit_decay(optax.GradientTransformation(init, update), PARAMS, probe_steps=())
  assert report.kinds() == _kinds("decoupled")
  assert all(c == pytest.approx(0.01, rel=1e-5) for c in report.shrink().values())


@pytest.mark.parametrize("every_k, budget", [(4, 3), (10, 3)])
@pytest.mark.parametrize("inner", ["adamw", "adam"])
def test_multisteps_beyond_the_call_budget_is_cannot_tell(every_k, budget, inner):
  # optax.MultiSteps moves at call k only: with fewer probe calls than k, neither the decay
  # (adamw) nor its absence (adam) was seen.
  tx = optax.MultiSteps(optax.adamw(1e-3, weight_decay=0.1) if inner == "adamw"
                        else optax.adam(1e-3), every_k)
  report = od.audit_decay(tx, PARAMS, probe_steps=(), max_micro_steps=budget)
  assert report.kinds() == _kinds("cannot_tell")
  assert all("max_micro_steps" in r.detail for r in report.rows)
  # Within the budget the boundary is found, with and without decay.
  report = od.audit_decay(tx, PARAMS, probe_steps=(), max_micro_steps=every_k)
  assert report.kinds() == _kinds("decoupled" if inner == "adamw" else "none")


def test_an_optimizer_that_never_moves_is_cannot_tell():
  # optax.set_to_zero moves at no call, with or without a gradient: nothing was measured.
  report = od.audit_decay(optax.set_to_zero(), PARAMS, probe_steps=(), max_micro_steps=4)
  assert report.kinds() == _kinds("cannot_tell")


@pytest.mark.parametrize("updates, match", [
    (lambda g, p: [jnp.zeros(())], "tree structure"),
    (lambda g, p: None, "tree structure"),
    (lambda g, p: jax.tree.map(lambda x: jnp.zeros(x.shape + (2,)), p), "shape"),
])
def test_updates_that_do_not_fit_the_parameters_are_a_clear_error(updates, match):
  tx = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                    lambda g, s, p=None: (updates(g, p), s))
  with pytest.raises(ValueError, match=f"audit_decay: tx.update returned .*{match}"):
    od.audit_decay(tx, PARAMS)


@pytest.mark.parametrize("make, kind", [
    (lambda: optax.adamw(1e-3, weight_decay=0.1), "decoupled"),
    (lambda: optax.lion(1e-3, weight_decay=0.1), "decoupled"),
    (lambda: optax.adam(1e-3), "none"),
    (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3)), "coupled_l2"),
    # optax lamb: u = −η·‖θ‖/‖adam(g) + λθ‖·(adam(g) + λθ); on one element that is
    # −η·|θ|·sign(adam(g) + λθ), a decay the gradient rescales; the rank test cannot see it.
    (lambda: optax.lamb(1e-3, weight_decay=0.1), "cannot_tell"),
])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_one_element_leaves(make, kind, shape):
  report = od.audit_decay(make(), {"s": jnp.ones(shape)}, probe_steps=())
  assert report.kinds() == {"s": kind}, report


def test_an_update_that_cannot_be_jitted_is_probed_without_jit():
  # Python control flow on a value (float() of a traced norm) fails under jit; the update is
  # still u = −0.01·θ.
  def update(g, s, p=None):
    c = 0.01 if float(optax.tree.norm(p)) > 0 else 0.0
    return jax.tree.map(lambda x: -c * x, p), s
  tx = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
  report = od.audit_decay(tx, PARAMS, probe_steps=())
  assert report.kinds() == _kinds("decoupled")
  assert all(c == pytest.approx(0.01, rel=1e-5) for c in report.shrink().values())


def test_an_update_that_raises_keeps_its_error_and_says_where():
  def update(g, s, p=None):
    raise RuntimeError("boom")
  with pytest.raises(RuntimeError, match="boom") as e:
    od.audit_decay(optax.GradientTransformation(lambda p: optax.EmptyState(), update), PARAMS)
  assert any("first probe call" in note for note in getattr(e.value, "__notes__", []))
  with pytest.raises(ValueError, match="max_micro_steps"):
    od.audit_decay(optax.adam(1e-3), PARAMS, max_micro_steps=0)


def test_noise_is_not_decay():
  # optax.noisy_sgd: −η·(g + noise), the noise the same at every θ for one key.
  report = od.audit_decay(optax.noisy_sgd(0.1), PARAMS, probe_steps=())
  assert report.kinds() == _kinds("none")
  assert all("the same at every θ" in r.detail for r in report.rows)


def test_not_finite_is_cannot_tell():
  # optax.contrib.prodigy divides by its zero-gradient statistics: the probe cannot tell.
  report = od.audit_decay(optax.contrib.prodigy(1.0, weight_decay=0.1), PARAMS, probe_steps=())
  assert report.kinds() == _kinds("cannot_tell")


def test_optimizer_that_needs_the_loss_is_refused():
  with pytest.raises(ValueError, match="cannot be audited from gradients alone"):
    od.audit_decay(optax.contrib.momo(1.0, weight_decay=0.1), PARAMS)


# --- every optax and optax.contrib optimizer that takes a weight decay ---------------------
# The label each source implies: add_decayed_weights after the preconditioner and before
# scale_by_learning_rate is decoupled; before a preconditioner, momentum or a step-size
# statistic it is coupled L2; inside a normalisation of the whole update it depends on g.

C = optax.contrib
SOURCES = {
    # optax/_src/alias.py
    "adadelta": (lambda: optax.adadelta(1.0, weight_decay=0.1), "coupled_l2"),  # L2 first
    "adafactor": (lambda: optax.adafactor(1e-2, weight_decay_rate=1e-3), "decoupled"),  # after lr
    "adamaxw": (lambda: optax.adamaxw(1e-3, weight_decay=0.1), "decoupled"),
    "adamw": (lambda: optax.adamw(1e-3, weight_decay=0.1), "decoupled"),
    "adan": (lambda: optax.adan(1e-3, weight_decay=0.1), "decoupled"),
    "lamb": (lambda: optax.lamb(1e-3, weight_decay=0.1), "gradient_dependent"),  # trust ratio
    "lars": (lambda: optax.lars(1e-3, weight_decay=0.1), "coupled_l2"),  # L2, then momentum
    "lion": (lambda: optax.lion(1e-3, weight_decay=0.1), "decoupled"),
    "nadamw": (lambda: optax.nadamw(1e-3, weight_decay=0.1), "decoupled"),
    # scale_by_novograd adds λθ to g/√ν before the momentum.
    "novograd": (lambda: optax.novograd(1e-3, weight_decay=0.1), "coupled_l2"),
    # optax/contrib/*.py
    "acprop": (lambda: C.acprop(1e-3, weight_decay=0.1), "decoupled"),
    "ademamix": (lambda: C.ademamix(1e-3, weight_decay=0.1), "decoupled"),
    "cocob": (lambda: C.cocob(1.0, weight_decay=0.1), "coupled_l2"),  # L2 first
    # d-adaptation divides by its gradient statistics: not finite at a zero gradient.
    "dadapt_adamw": (lambda: C.dadapt_adamw(1.0, weight_decay=0.1), "cannot_tell"),
    "dog": (lambda: C.dog(1.0, weight_decay=0.1), "coupled_l2"),  # L2 into Σ‖g‖²
    "dowg": (lambda: C.dowg(1.0, weight_decay=0.1), "coupled_l2"),
    "galore": (lambda: C.galore(1e-3, weight_decay=0.1), "decoupled"),
    "madgrad": (lambda: C.madgrad(1e-2, weight_decay=0.1), "coupled_l2"),  # L2 first
    "mechanize": (lambda: C.mechanize(optax.sgd(1e-2), weight_decay=0.1), "gradient_dependent"),
    "prodigy": (lambda: C.prodigy(1.0, weight_decay=0.1), "cannot_tell"),
    "schedule_free_adamw": (lambda: C.schedule_free_adamw(1e-3, weight_decay=0.1), "decoupled"),
    "schedule_free_sgd": (lambda: C.schedule_free_sgd(1.0, weight_decay=0.1), "decoupled"),
    "simplified_ademamix": (lambda: C.simplified_ademamix(1e-3, weight_decay=0.1), "decoupled"),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_optax_optimizer_with_weight_decay(name):
  make, kind = SOURCES[name]
  assert od.audit_decay(make(), PARAMS, probe_steps=()).kinds() == _kinds(kind)


def test_muon_decays_matrices_only():
  # optax/contrib/_muon.py: muon (with add_decayed_weights after it) on 2-D leaves, adam with
  # adam_weight_decay (default 0) on the others.
  report = od.audit_decay(C.muon(1e-3, weight_decay=0.1), PARAMS, probe_steps=())
  assert report.kinds() == _kinds("decoupled", ("dense/kernel",))
