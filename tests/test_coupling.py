"""The ``coupling`` keyword of od.adamw and od.sgdw, against numpy transcriptions.

Oracles (tests/decay_references.py): the paper's Algorithm 2 (AdamW) and
Algorithm 1 (SGDW), TF's DecoupledWeightDecayExtension around Keras Adam and SGD, and
torch's AdamW. Trajectories are 150 steps of a noisy quadratic with curvatures
over three decades; float32 (ours) against float64 (oracle).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests import decay_references as ref

STEPS = 150
# float32 round-off accumulated over 150 steps. For SGD the recursion is linear and
# stable: 2e-6 absolute on θ ~ 1. For Adam, optax's own float32 step (bias corrections
# 1 − β^t computed in float32) drifts from the float64 transcription by ~1e-7 per step
# at α = 3e-2: measured 1.6e-5 max over 150 steps for optax.scale_by_adam alone
# (λ = 0), so Adam trajectories get ATOL_ADAM. Conventions differ by > 1e-3.
RTOL, ATOL, ATOL_ADAM = 2e-5, 2e-6, 3e-5


def run(tx, problem: ref.Problem, steps: int = STEPS):
  """Our trajectory in float32: [θ_0, ..., θ_steps]."""

  def step(carry, k):
    theta, state = carry
    g = {"w": problem.grad_jax(theta["w"], k)}
    updates, state = tx.update(g, state, theta)
    theta = optax.apply_updates(theta, updates)
    return (theta, state), theta["w"]

  theta = {"w": jnp.asarray(problem.theta0, jnp.float32)}
  _, traj = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))((theta, tx.init(theta)))
  return np.concatenate([np.asarray(theta["w"])[None], np.asarray(traj)])


def multiplier_schedule(mult: np.ndarray, alpha: float = 1.0):
  """η_k = α·mult[k] as an optax schedule (the numpy multiplier, cast to float32)."""
  table = jnp.asarray(mult, jnp.float32)
  return lambda count: alpha * table[jnp.minimum(count, len(mult) - 1)]


def assert_traj(ours, oracle, atol=ATOL_ADAM):
  np.testing.assert_allclose(ours, np.asarray(oracle), rtol=RTOL, atol=atol)


@pytest.mark.parametrize("warmup", [0, 10])
def test_adamw_schedule_coupling_is_paper_algorithm_2(warmup):
  p = ref.Problem(kind="drift")
  mult = ref.cosine_multiplier(STEPS, warmup)  # warmup: multiplier 0 at step 0
  alpha, lam = 3e-2, 1e-2
  tx = od.adamw(multiplier_schedule(mult, alpha), weight_decay=lam, coupling="schedule",
                peak_learning_rate=alpha)
  oracle = ref.paper_adamw(p.theta0, p.grad, mult, STEPS, alpha=alpha, lam=lam)
  assert_traj(run(tx, p), oracle)
  # The decay is not multiplied by α: the lr-coupled AdamW with the same λ decays less.
  lr_coupled = run(od.adamw(multiplier_schedule(mult, alpha), weight_decay=lam), p)
  assert np.abs(lr_coupled[-1] - oracle[-1]).max() > 1e-3


def test_adamw_schedule_coupling_with_an_optax_schedule():
  """optax.cosine_decay_schedule(α, T) is α times the paper's cosine multiplier."""
  p = ref.Problem(seed=1, kind="drift")
  alpha, lam = 1e-2, 5e-3
  tx = od.adamw(optax.cosine_decay_schedule(alpha, STEPS), weight_decay=lam,
                coupling="schedule", peak_learning_rate=alpha)
  oracle = ref.paper_adamw(p.theta0, p.grad, ref.cosine_multiplier(STEPS), STEPS,
                           alpha=alpha, lam=lam)
  assert_traj(run(tx, p), oracle)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("warmup", [0, 10])
def test_sgdw_default_is_paper_algorithm_1(momentum, warmup):
  p = ref.Problem(seed=2)
  mult = ref.cosine_multiplier(STEPS, warmup)
  alpha, lam = 2e-2, 1e-2
  tx = od.sgdw(multiplier_schedule(mult, alpha), momentum=momentum, weight_decay=lam,
               peak_learning_rate=alpha)  # default coupling="schedule"
  oracle = ref.paper_sgdw(p.theta0, p.grad, mult, STEPS, alpha=alpha, lam=lam, b1=momentum)
  assert_traj(run(tx, p), oracle, atol=ATOL)


def test_sgdw_buffer_holds_lr_scaled_steps():
  """With a changing lr, Algorithm 1 differs from optax.sgd's buffer of raw gradients."""
  p = ref.Problem(seed=3)
  mult = ref.cosine_multiplier(STEPS)
  alpha = 2e-2
  ours = run(od.sgdw(multiplier_schedule(mult, alpha), weight_decay=0.0,
                     peak_learning_rate=alpha), p)
  optax_sgd = run(optax.sgd(multiplier_schedule(mult, alpha), momentum=0.9), p)
  oracle = ref.paper_sgdw(p.theta0, p.grad, mult, STEPS, alpha=alpha, lam=0.0)
  assert_traj(ours, oracle, atol=ATOL)
  assert np.abs(optax_sgd - ours).max() > 1e-3


def test_sgdw_lr_coupling_and_no_momentum_equals_sgd_with_l2():
  """Paper Proposition 1: plain SGD + L2(λ) = decoupled decay with shrink η·λ. Both sides
  against tfa.optimizers.SGDW with momentum 0 and λ_t = η·λ (decay_references.tf_sgdw)."""
  p = ref.Problem(seed=4)
  lr, lam = 1e-2, 0.3
  oracle = ref.tf_sgdw(p.theta0, p.grad, np.full(STEPS, lr), np.full(STEPS, lr * lam), STEPS,
                       momentum=0.0)
  assert_traj(run(od.sgdw(lr, momentum=0.0, weight_decay=lam, coupling="lr"), p), oracle,
              atol=ATOL)
  assert_traj(run(od.sgd_l2(lr, weight_decay=lam), p), oracle, atol=ATOL)
  undecayed = ref.tf_sgdw(p.theta0, p.grad, np.full(STEPS, lr), np.zeros(STEPS), STEPS,
                          momentum=0.0)
  assert np.abs(undecayed[-1] - oracle[-1]).max() > 1e-3


def test_adamw_none_coupling_is_tf_decoupled_weight_decay_extension():
  """λ_t is its own schedule, not multiplied by the lr; Keras ε-hat Adam step."""
  p = ref.Problem(seed=5, kind="drift")
  mult = ref.cosine_multiplier(STEPS, 10)
  lr, wd = 1e-2, 1e-3
  tf_like = od.with_decoupled_decay(
      optax.chain(od.scale_by_adam(eps=1e-7, eps_hat=True),
                  optax.scale_by_learning_rate(multiplier_schedule(mult, lr))),
      multiplier_schedule(mult, wd))  # TF docs: schedule λ_t by hand with the lr.
  oracle = ref.tf_adamw(p.theta0, p.grad, lr * mult, wd * mult, STEPS)
  assert_traj(run(tf_like, p), oracle)
  # od.adamw(coupling="none") is the same convention with the default Adam step.
  ours = od.adamw(multiplier_schedule(mult, lr), eps=1e-7, weight_decay=1e-3, coupling="none")
  const = ref.tf_adamw(p.theta0, p.grad, lr * mult, np.full(STEPS, wd), STEPS)
  assert np.abs(run(ours, p)[-1] - const[-1]).max() < 1e-3


def test_keras3_adamw_recipe():
  """Keras 3 AdamW (keras/src/optimizers/adamw.py + base_optimizer._apply_weight_decay):
  θ ← θ − η_t·λ·θ first (lr-coupled), then the ε-hat Adam step (ε̂ = 1e-7, λ = 0.004).
  It is TF's extension with λ_t = η_t·λ: the README's recipe."""
  p = ref.Problem(seed=9, kind="drift")
  mult = ref.cosine_multiplier(STEPS, 10)
  lr, lam = 1e-2, 0.004
  sched = multiplier_schedule(mult, lr)
  keras = od.with_decoupled_decay(
      optax.chain(od.scale_by_adam(eps=1e-7, eps_hat=True), optax.scale_by_learning_rate(sched)),
      od.coupled_weight_decay(lam, coupling="lr", learning_rate=sched))
  oracle = ref.tf_adamw(p.theta0, p.grad, lr * mult, np.float32(lr * mult) * np.float32(lam),
                        STEPS)
  assert_traj(run(keras, p), oracle)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdw_none_coupling_is_tfa_sgdw(nesterov):
  p = ref.Problem(seed=10)
  mult = ref.cosine_multiplier(STEPS, 10)
  lr, wd = 2e-2, 1e-3
  tx = od.sgdw(multiplier_schedule(mult, lr), momentum=0.9, nesterov=nesterov,
               weight_decay=multiplier_schedule(mult, wd), coupling="none")
  oracle = ref.tf_sgdw(p.theta0, p.grad, np.float32(lr * mult), np.float32(wd * mult), STEPS,
                       nesterov=nesterov)
  assert_traj(run(tx, p), oracle, atol=ATOL)


def test_adamw_lr_coupling_is_torch_adamw():
  p = ref.Problem(seed=6, kind="drift")
  mult = ref.cosine_multiplier(STEPS)
  lr, lam = 1e-2, 0.1
  oracle = ref.torch_style_adamw(p.theta0, p.grad, lr * mult, STEPS, lam=lam)
  assert_traj(run(od.adamw(multiplier_schedule(mult, lr), weight_decay=lam, coupling="lr"), p),
              oracle)


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "cosine"])
def test_adamw_default_and_lr_coupling_are_torch_adamw(schedule):
  """The default coupling is torch.optim.AdamW's (torch/optim/adamw.py): θ(1 − η_t λ) then
  the Adam step, with or without an explicit coupling='lr'."""
  p = ref.Problem(seed=7, kind="drift")
  lr0, lam = 1e-2, 1e-2
  mult = ref.cosine_multiplier(STEPS) if schedule else np.ones(STEPS)
  lr = optax.cosine_decay_schedule(lr0, STEPS) if schedule else lr0
  oracle = ref.torch_style_adamw(p.theta0, p.grad, lr0 * mult, STEPS, lam=lam)
  assert_traj(run(od.adamw(lr, weight_decay=lam), p), oracle)
  assert_traj(run(od.adamw(lr, weight_decay=lam, coupling="lr"), p), oracle)
  # The decay is visible: λ = 0 is far from the oracle.
  assert np.abs(run(od.adamw(lr, weight_decay=0.0), p)[-1] - oracle[-1]).max() > 1e-3
  # The state is Adam's moments, the decay's step count and optax's lr-scaling state, with
  # the parameters' shapes and dtypes (a checkpoint's layout).
  params = {"w": jnp.ones(3)}
  state = od.adamw(lr).init(params)
  lr_state = optax.scale_by_learning_rate(lr).init(params)
  assert [type(x) for x in state] == [optax.ScaleByAdamState, od.WeightDecayState,
                                      type(lr_state)]
  chex.assert_trees_all_equal_shapes_and_dtypes(state[2], lr_state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state[0].mu, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state[0].nu, params)
  chex.assert_shape(state[1].decay_count, ())
  chex.assert_type(state[1].decay_count, jnp.int32)


def test_traced_hyperparameters_under_vmap_and_jit():
  """A grid search's call: schedules built from a traced α, traced λ and peak, inside vmap."""
  p = ref.Problem(seed=8, kind="drift")
  mult = ref.cosine_multiplier(STEPS, 10)
  alphas = np.array([1e-2, 3e-2])
  lams = np.array([1e-3, 1e-2])

  def final(alpha, lam, which):
    sched = multiplier_schedule(mult, alpha)
    if which == "adamw":
      tx = od.adamw(learning_rate=sched, weight_decay=lam, coupling="schedule",
                    peak_learning_rate=alpha)
    else:
      tx = od.sgdw(learning_rate=sched, momentum=0.9, weight_decay=lam, coupling=which,
                   peak_learning_rate=alpha)
    return jnp.asarray(run_traced(tx, p))

  for which, oracle_fn, atol in [("adamw", ref.paper_adamw, ATOL_ADAM),
                                 ("schedule", ref.paper_sgdw, ATOL)]:
    out = jax.vmap(functools.partial(final, which=which))(alphas, lams)
    for i in range(2):
      oracle = oracle_fn(p.theta0, p.grad, mult, STEPS, alpha=alphas[i], lam=lams[i])
      np.testing.assert_allclose(np.asarray(out[i]), oracle[-1], rtol=RTOL, atol=atol)
  # coupling="lr" ignores the traced peak and shrinks by η_t·λ = α·s_t·λ.
  out = jax.vmap(functools.partial(final, which="lr"))(alphas, lams)
  for i in range(2):
    oracle = ref.paper_sgdw(p.theta0, p.grad, mult, STEPS, alpha=alphas[i],
                            lam=alphas[i] * lams[i])
    np.testing.assert_allclose(np.asarray(out[i]), oracle[-1], rtol=RTOL, atol=ATOL)


def run_traced(tx, problem):
  """Like ``run`` but traceable (no jit/np inside), returning θ_T."""

  def step(carry, k):
    theta, state = carry
    updates, state = tx.update({"w": problem.grad_jax(theta["w"], k)}, state, theta)
    return (optax.apply_updates(theta, updates), state), None

  theta = {"w": jnp.asarray(problem.theta0, jnp.float32)}
  (theta, _), _ = jax.lax.scan(step, (theta, tx.init(theta)), jnp.arange(STEPS))
  return theta["w"]


def test_schedule_coupling_needs_the_peak_of_a_schedule():
  with pytest.raises(ValueError, match="peak_learning_rate"):
    od.adamw(optax.cosine_decay_schedule(1e-3, 10), coupling="schedule")
  with pytest.raises(ValueError, match="peak_learning_rate"):
    od.sgdw(optax.cosine_decay_schedule(1e-3, 10), weight_decay=1e-4)
  with pytest.raises(ValueError, match="peak_learning_rate"):
    od.sgdw(0.1, weight_decay=1e-4, peak_learning_rate=0.0)
  # a constant learning rate is its own peak: the shrink is λ per step.
  c = od.coupled_weight_decay(1e-4, coupling="schedule", learning_rate=0.1)
  assert float(c(0)) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"coupling": "paper"}, ValueError),
        ({"coupling": "schedule", "weight_decay": -1.0}, ValueError),
        ({"coupling": "lr", "weight_decay": "0.1"}, TypeError),
        ({"coupling": "lr", "momentum": 1.0}, ValueError),
        ({"coupling": "lr", "momentum": 0.0, "nesterov": True}, ValueError),
        ({"coupling": "schedule", "weight_decay": 1.5}, ValueError),  # shrink >= 1 per step
        ({"coupling": "none", "weight_decay": 1.0}, ValueError),
    ],
)
def test_bad_arguments_fail_early(kwargs, error):
  kwargs = dict({"weight_decay": 1e-4}, **kwargs)
  with pytest.raises(error):
    od.sgdw(0.1, **kwargs)


def test_adamw_rejects_unknown_coupling():
  with pytest.raises(ValueError, match="coupling"):
    od.adamw(1e-3, coupling="decoupled")
