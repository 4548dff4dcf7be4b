"""od.with_decoupled_decay around any optimizer, its variants, and decay multipliers.

Oracles: optax's own optimizers (optax.adamw, optax.lion, optax.adafactor carry
their own decay: ours around the decay-free version must reproduce them), the
inner optimizer run alone (final update = inner update − c_t·θ), numpy
transcriptions of cautious weight decay (Chen et al. 2025, Eq. for CWD),
AdamC's corrected decay (Defazio 2025) and L2-SP (Li et al. 2018), and a
transcription of big_vision's optax chain (big_vision/optax.py ``make``).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests import decay_references as ref
from tests.fixtures import bert_linen_params, multiscale_grads
from tests.test_coupling import ATOL_ADAM, RTOL, STEPS, multiplier_schedule, run


def _trajectory(tx, params, steps=20, seed=0):
  """Params after each step of ``tx`` on multiscale gradients (tests/fixtures.py)."""
  state = tx.init(params)
  step = jax.jit(tx.update)
  out = []
  for k in range(steps):
    updates, state = step(multiscale_grads(params, k, seed), state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "name, inner",
    [
        ("sgd", optax.sgd(0.05, momentum=0.9)),
        ("adam", optax.adam(optax.cosine_decay_schedule(1e-2, 20))),
        ("lion", optax.lion(1e-3)),
        ("adafactor", optax.adafactor(1e-2)),
    ],
)
@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_update_is_inner_update_minus_shrink(name, inner):
  """Step by step: u = inner(g) − c_t·θ_before on decayed leaves, inner(g) elsewhere."""
  params = bert_linen_params(seed=1)
  c = lambda t: 1e-3 * (1.0 + t)
  mask = od.exclude_names("bias", "LayerNorm")
  tx = od.with_decoupled_decay(inner, c, mask=mask)
  state, inner_state = tx.init(params), inner.init(params)
  decayed = mask(params)
  for k in range(5):
    grads = multiscale_grads(params, k)
    updates, state = tx.update(grads, state, params)
    expected, inner_state = inner.update(grads, inner_state, params)
    expected = jax.tree.map(lambda u, p, d, k=k: u - c(k) * p if d else u,
                            expected, params, decayed)
    _assert_trees_close(updates, expected, rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, updates)


def test_around_optax_adam_is_optax_adamw():
  """optax.adamw decays by η_t·λ: coupling 'lr' around optax.adam reproduces it."""
  params = bert_linen_params(seed=2)
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 20)
  ours = od.with_decoupled_decay(
      optax.adam(lr), od.coupled_weight_decay(0.1, coupling="lr", learning_rate=lr))
  _assert_trees_close(_trajectory(ours, params)[-1],
                      _trajectory(optax.adamw(lr, weight_decay=0.1), params)[-1])


def test_around_optax_lion_is_optax_lion_with_decay():
  params = bert_linen_params(seed=3)
  ours = od.with_decoupled_decay(  # optax.lion's own default weight_decay is 1e-3: turn it off.
      optax.lion(1e-3, weight_decay=0.0),
      od.coupled_weight_decay(1.0, coupling="lr", learning_rate=1e-3))
  _assert_trees_close(_trajectory(ours, params)[-1],
                      _trajectory(optax.lion(1e-3, weight_decay=1.0), params)[-1])


def test_around_optax_adafactor_is_its_unscaled_decay():
  """optax.adafactor adds weight_decay_rate·θ after the lr scaling: an independent shrink."""
  params = bert_linen_params(seed=4)
  ours = od.with_decoupled_decay(optax.adafactor(1e-2), 1e-3)
  theirs = optax.adafactor(1e-2, weight_decay_rate=1e-3)
  _assert_trees_close(_trajectory(ours, params)[-1], _trajectory(theirs, params)[-1])


def test_flax_sst2_mistake_grows_weights_ours_shrinks_them():
  """flax examples/sst2: chain(sgd, add_decayed_weights(wd)) adds +wd·θ after the sign flip."""
  params = {"w": jnp.full(3, 2.0)}
  zero = {"w": jnp.zeros(3)}
  wrong = optax.chain(optax.sgd(0.1), optax.add_decayed_weights(1e-2))
  right = od.with_decoupled_decay(optax.sgd(0.1), 1e-2)
  p_wrong, p_right = params, params
  s_wrong, s_right = wrong.init(params), right.init(params)
  for _ in range(10):
    u, s_wrong = wrong.update(zero, s_wrong, p_wrong)
    p_wrong = optax.apply_updates(p_wrong, u)
    u, s_right = right.update(zero, s_right, p_right)
    p_right = optax.apply_updates(p_right, u)
  np.testing.assert_allclose(p_wrong["w"], 2.0 * 1.01**10, rtol=1e-6)  # grew
  np.testing.assert_allclose(p_right["w"], 2.0 * 0.99**10, rtol=1e-6)  # shrank


def test_inject_hyperparams_changes_weight_decay_at_run_time():
  params = {"w": jnp.arange(1.0, 4.0)}
  grads = {"w": jnp.full(3, 0.5)}
  tx = optax.inject_hyperparams(od.with_decoupled_decay)(optax.sgd(0.1), weight_decay=0.01)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for wd in (0.01, 0.5, 0.0):
    state.hyperparams["weight_decay"] = jnp.asarray(wd)
    updates, state = step(grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 - wd * params["w"], rtol=1e-6)
  # and a traced λ under vmap (a sweep over λ in one program).
  def update_with(wd):
    tx = od.with_decoupled_decay(optax.sgd(0.1), wd)
    return tx.update(grads, tx.init(params), params)[0]["w"]

  wds = jnp.array([0.0, 0.1, 0.2])
  np.testing.assert_allclose(jax.vmap(update_with)(wds),
                             -0.05 - wds[:, None] * params["w"][None], rtol=1e-6)


def test_inject_hyperparams_on_the_aliases():
  """λ, α and the peak injected as arrays: od.adamw and od.sgdw in every coupling."""
  p = ref.Problem(seed=21, kind="drift")
  alpha, lam = 3e-2, 1e-2
  for coupling in ("lr", "schedule", "none", "corrected"):
    tx = optax.inject_hyperparams(od.adamw)(learning_rate=alpha, weight_decay=lam,
                                            coupling=coupling, peak_learning_rate=alpha)
    direct = od.adamw(alpha, weight_decay=lam, coupling=coupling, peak_learning_rate=alpha)
    # inject_hyperparams also turns b1, b2, eps into float32 arrays, which moves the
    # round-off of (1 − β): the Adam trajectories then agree to float32 round-off only.
    np.testing.assert_allclose(run(tx, p), run(direct, p), rtol=RTOL, atol=ATOL_ADAM)
  tx = optax.inject_hyperparams(od.sgdw)(learning_rate=alpha, weight_decay=lam)
  oracle = ref.paper_sgdw(p.theta0, p.grad, np.ones(STEPS), STEPS, alpha=alpha, lam=lam)
  np.testing.assert_allclose(run(tx, p), oracle, rtol=RTOL, atol=2e-6)


def test_corrected_decay_is_adamc():
  """Defazio 2025 (AdamC): AdamW whose λ_t = λ·η_t/η_max, i.e. shrink λ·η_t²/η_max."""
  p = ref.Problem(seed=22, kind="drift")
  alpha, lam = 3e-2, 0.5
  mult = ref.cosine_multiplier(STEPS, 10)
  tx = od.adamw(multiplier_schedule(mult, alpha), weight_decay=lam, coupling="corrected",
                peak_learning_rate=alpha)
  oracle = ref.torch_style_adamw(p.theta0, p.grad, alpha * mult, STEPS,
                                 lam=lam * (alpha * mult) / alpha)
  np.testing.assert_allclose(run(tx, p), oracle, rtol=RTOL, atol=ATOL_ADAM)


def test_cautious_weight_decay():
  """Chen et al. 2025: θ ← θ − η(u + λ·1[u⊙θ ≥ 0]⊙θ), u the update direction (here SGD's g)."""
  p = ref.Problem(seed=23)
  eta, lam = 0.05, 0.2
  tx = od.with_decoupled_decay(optax.sgd(eta), eta * lam, cautious=True)
  theta = np.asarray(p.theta0, np.float64)
  oracle = [theta]
  for k in range(STEPS):
    u = p.grad(theta, k)
    theta = theta - eta * (u + lam * (u * theta >= 0) * theta)
    oracle.append(theta)
  ours = run(tx, p)
  np.testing.assert_allclose(ours, np.array(oracle), rtol=RTOL, atol=2e-6)
  plain = run(od.with_decoupled_decay(optax.sgd(eta), eta * lam), p)
  assert np.abs(plain[-1] - ours[-1]).max() > 1e-3  # the gate did something


def test_decay_toward_reference_is_l2_sp():
  """L2-SP (Li et al. 2018) as decoupled decay: θ ← θ + inner(g) − c·(θ − θ_ref), masked."""
  params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full(2, 3.0)}
  ref_point = {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}
  mask = od.exclude_names("bias")
  for reference, expected_ref in ((None, params), (ref_point, ref_point)):
    tx = od.with_decay_toward(optax.sgd(0.1), 0.25, reference=reference, mask=mask)
    state = tx.init(params)
    assert state[1].reference["bias"] is None  # θ_ref stored for decayed leaves only
    p = {"kernel": jnp.full((2, 2), 5.0), "bias": jnp.full(2, 5.0)}
    grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    updates, state = jax.jit(tx.update)(grads, state, p)
    np.testing.assert_allclose(updates["kernel"],
                               -0.1 - 0.25 * (5.0 - expected_ref["kernel"]), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1, rtol=1e-6)
  with pytest.raises(ValueError, match="structure"):
    od.with_decay_toward(optax.sgd(0.1), 0.1, reference={"kernel": jnp.ones((2, 2))}).init(params)


def _big_vision_mults(names, rules):
  """big_vision/utils.py make_mask_trees.matchfirst: first re.fullmatch wins; unmatched → 0."""
  out = {}
  for name in names:
    mult = 0.0
    for pattern, value in rules:
      if re.fullmatch(pattern, name):
        mult = value
        break
    out[name] = mult
  return out


def test_decay_multipliers_follow_big_vision_rules():
  params = bert_linen_params(seed=5, layers=1)
  rules = [("pooler/kernel", 2.0), (".*/kernel", 1.0), (".*embedding", 0.5)]
  mults = od.decay_multipliers(rules, default=0.0)
  paths = [p for p, _ in _leaves(params)]
  expected = _big_vision_mults(paths, rules)
  got = dict(zip(paths, jax.tree.leaves(mults.resolve(params))))
  assert got == expected
  report = od.describe_mask(params, mults)
  assert {r.path: r.multiplier for r in report.rows} == expected
  assert "mult" in str(report).splitlines()[1]
  # and in the update: u = inner(g) − c·mult·θ
  tx = od.with_decoupled_decay(optax.sgd(0.1), 1e-2, mask=mults)
  grads = multiscale_grads(params, 0)
  updates, _ = tx.update(grads, tx.init(params), params)
  want = jax.tree.map(lambda g, p, m: -0.1 * g - 1e-2 * m * p, grads, params,
                      mults.resolve(params))
  _assert_trees_close(updates, want, atol=1e-9)


def test_big_vision_chain_reproduced_by_od_adamw():
  """big_vision/optax.py make(): chain(scale_by_adam, scale(lr), add_decayed_weights(wd·mult,
  mask) per rule, scale_by_schedule(sched), scale(-1)): u = −s_t(η·adam + λ·mult·θ)."""
  params = bert_linen_params(seed=6, layers=1)
  rules = [(".*/kernel", 1.0), (".*embedding", 0.3)]
  lr, wd = 1e-2, 1e-3
  sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, 3, 20)
  paths = [p for p, _ in _leaves(params)]
  bv_mults = _big_vision_mults(paths, rules)
  masks = [jax.tree.unflatten(jax.tree.structure(params),
                              [bool(re.fullmatch(pat, n)) and
                               not any(re.fullmatch(q, n) for q, _ in rules[:i])
                               for n in paths])
           for i, (pat, _) in enumerate(rules)]
  assert any(bv_mults.values())
  big_vision = optax.chain(
      optax.scale_by_adam(), optax.scale(lr),
      *[optax.add_decayed_weights(wd * m, mask) for (_, m), mask in zip(rules, masks)],
      optax.scale_by_schedule(sched), optax.scale(-1.0))
  ours = od.adamw(lambda t: lr * sched(t), weight_decay=wd, coupling="schedule",
                  peak_learning_rate=lr, mask=od.decay_multipliers(rules, default=0.0))
  _assert_trees_close(_trajectory(ours, params)[-1], _trajectory(big_vision, params)[-1],
                      rtol=2e-6, atol=1e-7)


def _leaves(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [("/".join(str(k.key) for k in path), x) for path, x in flat]


def test_multipliers_are_never_read_as_a_plain_mask():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  mults = od.decay_multipliers([(".*/kernel", 2.0)], default=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.adamw(1e-3, mask=mults)  # optax reads masks as bools: refused, not "decay all".
  with pytest.raises((TypeError, ValueError)):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("make", [od.add_decoupled_decay, od.add_l2_to_grad])
def test_every_decay_transform_takes_multipliers(make):
  # The leaf rule u + λ·mult·θ, with mult from the first full match (big_vision's rule).
  params = {"dense": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)}}
  mults = od.decay_multipliers([(".*/kernel", 2.0)], default=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make(1e-2, mults)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["dense"]["kernel"], 1.0 + 1e-2 * 2.0 * 3.0, rtol=1e-6)
  np.testing.assert_array_equal(u["dense"]["bias"], 1.0)


@pytest.mark.parametrize(
    "rules, default, error, match",
    [
        ([("kernel", 1.0)], 0.0, ValueError, "fully matches no parameter"),
        ([(".*/kernel", 1.0), ("dense/kernel", 2.0)], 0.0, ValueError, "earlier rule"),
        ([(".*/kernel", -1.0)], 0.0, ValueError, ">= 0"),
        ([(".*/kernel", 1.0)], float("nan"), ValueError, ">= 0"),
        ([("(", 1.0)], 0.0, ValueError, "regular expression"),
        ([".*/kernel"], 0.0, TypeError, "pair"),
    ],
)
def test_multiplier_rule_errors(rules, default, error, match):
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  with pytest.raises(error, match=match):
    mults = od.decay_multipliers(rules, default=default)
    od.with_decoupled_decay(optax.sgd(0.1), 1e-2, mask=mults).init(params)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"inner": optax.adam}, TypeError, "factory"),
        ({"weight_decay": od.exclude_names("bias")}, TypeError, "mask"),
        ({"weight_decay": -0.1}, ValueError, ">= 0"),
        ({"weight_decay": "0.1"}, TypeError, "number or a schedule"),
        ({"cautious": 1}, TypeError, "cautious"),
        # weight_decay is the per-step shrink c: θ(1 − c) flips every weight for c > 1.
        ({"weight_decay": 2.0}, ValueError, "flip sign"),
        ({"weight_decay": 1.0}, ValueError, "per-step shrink c_t itself"),
        ({"weight_decay": od.coupled_weight_decay(20.0, coupling="lr", learning_rate=0.1)},
         ValueError, ">= 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
  args = dict({"inner": optax.sgd(0.1), "weight_decay": 1e-2}, **kwargs)
  inner, wd = args.pop("inner"), args.pop("weight_decay")
  with pytest.raises(error, match=match):
    od.with_decoupled_decay(inner, wd, **args)


def test_decay_toward_refuses_a_shrink_that_overshoots_the_reference():
  """c > 1 moves θ − θ_ref past zero every step (it grows in magnitude for c > 2)."""
  with pytest.raises(ValueError, match="shrink is 1.5 >= 1"):
    od.with_decay_toward(optax.sgd(0.1), 1.5)


def test_update_without_params_is_an_error():
  tx = od.with_decoupled_decay(optax.sgd(0.1), 1e-2)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, tx.init(params))


def test_under_nnx_optimizer():
  """nnx.Optimizer calls init on Variables and update on arrays: masks, multipliers and the
  L2-SP reference must see the same paths and values in both."""
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.ones((2, 2)))
      self.bias = nnx.Param(jnp.ones(2))

  def zero_loss(m):
    return 0.0 * (m.kernel[...].sum() + m.bias[...].sum())

  model = Model()
  mults = od.decay_multipliers([("kernel", 0.5)], default=0.0)
  tx = od.with_decay_toward(optax.sgd(0.1), 0.5, mask=mults)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  model.kernel[...] = model.kernel[...] * 3.0  # move away from the reference (ones)
  opt.update(model, nnx.grad(zero_loss)(model))
  np.testing.assert_allclose(model.kernel[...], 3.0 - 0.5 * 0.5 * (3.0 - 1.0))
  np.testing.assert_allclose(model.bias[...], 1.0)


def test_int_leaf_selected_for_decay_is_refused_like_add_decoupled_decay():
  """Same dtype rule as od.add_decoupled_decay: decay is for floating-point leaves only."""
  params = {"w": jnp.ones(3), "step": jnp.array(3, jnp.int32)}
  for tx in (od.with_decoupled_decay(optax.sgd(0.1), 0.01),
             optax.chain(od.add_decoupled_decay(0.01), optax.scale_by_learning_rate(0.1))):
    with pytest.raises(TypeError, match="'step' has dtype int32"):
      tx.init(params)
  excluded = od.with_decoupled_decay(optax.sgd(0.1), 0.01, mask=od.exclude_names("step"))
  excluded.init(params)  # excluded int leaf: fine


def test_bfloat16_weight_with_float32_update_is_decayed_in_float32():
  """u − c·θ is computed in the wider dtype (θ cast exactly), as add_decoupled_decay does:
  with c = 1e-3 and θ = 1.0 in bfloat16, a float32 update gets exactly −1e-3 (float32), not
  the bfloat16 product −1.0004e-3 that a weakly typed c times a bfloat16 θ would give."""
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  inner = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                       lambda u, s, p=None: (u, s))
  tx = od.with_decoupled_decay(inner, 1e-3)  # a Python float: weakly typed
  updates, _ = tx.update({"w": jnp.zeros(4, jnp.float32)}, tx.init(params), params)
  assert updates["w"].dtype == jnp.float32
  np.testing.assert_array_equal(updates["w"], np.full(4, -np.float32(1e-3), np.float32))


def test_decay_toward_full_reference_inside_optax_masked():
  """Inside optax.masked / multi_transform the inner transform sees optax.MaskedNode
  leaves; a reference with the full parameters' structure fits, its entries there unused.
  Oracle: L2-SP's u = −η·g − c·(θ − θ_ref) on the selected leaf (Li et al. 2018), and the
  untouched update elsewhere (optax.masked)."""
  params = {"w": jnp.full((2, 2), 3.0), "b": jnp.ones(2)}
  reference = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
  grads = {"w": jnp.full((2, 2), 0.5), "b": jnp.full((2,), 0.25)}
  inner = od.with_decay_toward(optax.sgd(0.1), 0.25, reference=reference)
  for tx, expected_b in [
      (optax.masked(inner, {"w": True, "b": False}), grads["b"]),  # passed through
      (optax.multi_transform({"l2sp": inner, "sgd": optax.sgd(0.1)},
                             {"w": "l2sp", "b": "sgd"}), -0.1 * grads["b"]),
  ]:
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1 * 0.5 - 0.25 * (3.0 - 1.0))
    np.testing.assert_allclose(u["b"], expected_b)
