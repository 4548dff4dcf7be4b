"""The source paper's propositions (Loshchilov & Hutter 2019, Sec. 2 and App. A) as exact checks on whole trajectories.

Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019
(https://arxiv.org/abs/1711.05101), Propositions 1–3 and the zero-gradient consequence:

1. plain SGD: L2 with coefficient λ' *is* decoupled decay (same λ in the lr-coupled form,
   λ = αλ' in the independent form);
2. Adam: no L2 coefficient reproduces AdamW (the gap has a lower bound derived below);
3. a fixed diagonal preconditioner diag(s)⁻¹: decoupled decay equals L2 on θ⊙√s;
4. a parameter whose gradient is always zero decays as Π(1 − η_t λ) under AdamW, and moves
   by ≈ η_t per step towards 0 under Adam+L2 whatever its size.

"Equal" means equal to float32 round-off over the trajectory, T·eps·max|θ| (T steps, each
rounding every parameter).

Every trajectory of ours runs under chex variants: with jit, without jit, and with pmap when
more than one device is present (chex skips it otherwise).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_decoupled as od
from tests import references as R
from tests.fixtures import small_named_params

EPS32 = float(np.finfo(np.float32).eps)
VARIANTS = {"with_jit": True, "without_jit": True, "with_pmap": True}


def roundoff(reference: np.ndarray) -> float:
  steps = reference.shape[0] - 1
  return steps * EPS32 * max(1.0, float(np.abs(reference).max()))


# --- Proposition 1: plain SGD, L2 ≡ decoupled decay --------------------------------------------


SGD_T = 100
SGD_SCHEDULE = optax.cosine_decay_schedule(1e-2, SGD_T, alpha=0.1)


class Proposition1Test(chex.TestCase):

  @chex.variants(**VARIANTS)
  @parameterized.named_parameters(("constant", 1e-2), ("cosine", SGD_SCHEDULE))
  def test_prop1_sgd_l2_is_decoupled_decay(self, lr):
    params = small_named_params()
    grads = R.quadratic_grad_fn(params)
    lam = 0.5  # L2 coefficient λ'
    l2 = R.run_optax(od.sgd_l2(lr, weight_decay=lam), params, grads, SGD_T, self.variant)
    # lr-coupled decoupled decay with the same λ: add_decoupled_decay before the lr scaling.
    decoupled = R.run_optax(
        optax.chain(od.add_decoupled_decay(lam), optax.scale_by_learning_rate(lr)),
        params, grads, SGD_T, self.variant)
    # The oracle, independent form (TF DecoupledWeightDecayExtension): shrink by
    # λ_t = α_t·λ' per step. Both sides of the proposition equal it to round-off.
    independent = R.independent_decay_sgd_trajectory(
        R.to_leaves(params), grads, SGD_T, lr,
        weight_decay=(lambda t: lr(t) * lam) if callable(lr) else lr * lam)
    tol = roundoff(independent)
    chex.assert_trees_all_close(l2, independent, rtol=0, atol=tol)
    chex.assert_trees_all_close(decoupled, independent, rtol=0, atol=tol)
    chex.assert_tree_all_finite((l2, decoupled))
    # The decay is visible, so the equalities say something.
    no_decay = R.run_optax(od.sgd_l2(lr), params, grads, SGD_T)
    assert np.abs(l2 - no_decay).max() > 100 * tol
    if callable(lr):
      # Under a schedule the independent λ must follow it: a constant α_0·λ' is far off.
      frozen = R.independent_decay_sgd_trajectory(
          R.to_leaves(params), grads, SGD_T, lr, weight_decay=R.lr_at(lr, 0) * lam)
      assert np.abs(l2 - frozen).max() > 100 * tol


# --- Proposition 2: Adam, no L2 coefficient reproduces AdamW -----------------------------------

# Two leaves: "w" has a data gradient (a quadratic), "z" has none. For z, AdamW gives
#   z_T = z_0 (1 − ηλ)^T                                  (the data gradient is 0: m = v = 0)
# and Adam+L2 with any κ ≥ 0 feeds g_t = κ z_{t−1} to Adam. While z keeps its sign, g_t is
# positive and non-increasing; m̂_t and v̂_t are weighted means of g_i and g_i² with weights
# ∝ β1^(t−i) and ∝ β2^(t−i), and with β2 > β1 the second puts more mass on older (larger) g_i,
# so m̂_t ≤ mean_w2(g) ≤ √v̂_t (Jensen): every step moves z by at most η towards 0, and
#   |z_T| ≥ |z_0| − ηT   for every κ.
# With z_0 = 20, η = 1e-2, λ = 0.5, T = 100: AdamW has z_T = 20·0.995^100 ≈ 12.12, Adam+L2
# has z_T ≥ 19, so the trajectories differ by at least 20(1 − (1 − ηλ)^T) − ηT ≈ 6.88 (less
# T·eps·20 ≈ 2.4e-4 for the float32 rounding of z), whatever κ.
ADAM_T, ADAM_LR, ADAM_WD = 100, 1e-2, 0.5
Z0 = np.array([10.0, -10.0, 20.0, -20.0], np.float32)
KAPPAS = ADAM_WD * 10.0 ** np.linspace(-6, 3, 37)  # includes κ = λ; 1e-6·λ .. 1e3·λ


def _two_leaf_problem():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=8), jnp.float32), "z": jnp.asarray(Z0)}
  target = jnp.asarray(rng.normal(size=8), jnp.float32)
  noise = jnp.asarray(0.1 * rng.normal(size=(ADAM_T, 8)), jnp.float32)

  def grads(p, t):
    return {"w": (p["w"] - target) + noise[t], "z": jnp.zeros_like(p["z"])}

  return params, grads


def _trajectory(tx, params, grads):
  """The whole trajectory in one lax.scan (κ may be traced, so it vmaps over a grid)."""
  def body(carry, t):
    p, state = carry
    u, state = tx.update(grads(p, t), state, p)
    p = optax.apply_updates(p, u)
    return (p, state), jnp.concatenate([p["w"], p["z"]])

  _, traj = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(ADAM_T))
  return jnp.concatenate([jnp.concatenate([params["w"], params["z"]])[None], traj])


def _gaps_over_kappa(make_l2, reference, wrap, kappas=KAPPAS):
  params, grads = _two_leaf_problem()
  run = wrap(jax.vmap(lambda k: _trajectory(make_l2(k), params, grads)))
  trajs = np.asarray(run(jnp.asarray(kappas, jnp.float32)))
  chex.assert_shape(trajs, (len(kappas), ADAM_T + 1, 8 + len(Z0)))
  chex.assert_tree_all_finite(trajs)
  return np.abs(trajs - reference[None]).max(axis=(1, 2)), trajs


class Proposition2Test(chex.TestCase):

  @chex.variants(**VARIANTS)
  def test_prop2_no_l2_coefficient_reproduces_adamw(self):
    params, grads = _two_leaf_problem()
    adamw = np.asarray(self.variant(lambda p: _trajectory(
        od.adamw(ADAM_LR, weight_decay=ADAM_WD), p, grads))(params))
    gaps, trajs = _gaps_over_kappa(lambda k: od.adam_l2(ADAM_LR, weight_decay=k), adamw,
                                   self.variant)
    # AdamW's zero-gradient leaf shrinks geometrically ...
    chex.assert_trees_all_close(adamw[-1, 8:], Z0 * (1 - ADAM_LR * ADAM_WD) ** ADAM_T,
                                rtol=1e-4)
    # ... while under Adam+L2 it moves by at most η per step, for every κ on the grid ...
    steps = np.abs(np.diff(trajs[:, :, 8:], axis=1))
    assert steps.max() <= ADAM_LR * (1 + 1e-4) + 2 * EPS32 * 20
    # ... so no κ comes closer than the bound derived above.
    z0 = float(np.abs(Z0).max())
    bound = (z0 * (1 - (1 - ADAM_LR * ADAM_WD) ** ADAM_T) - ADAM_LR * ADAM_T
             - ADAM_T * EPS32 * z0)
    assert bound > 6.8
    assert gaps.min() >= bound, (gaps.min(), KAPPAS[gaps.argmin()])

  @chex.variants(**VARIANTS)
  def test_prop2_control_for_sgd_the_same_scan_finds_the_match(self):
    """The κ scan is able to find a match when one exists: for SGD it is κ = λ (Prop. 1)."""
    params, grads = _two_leaf_problem()
    sgdw = np.asarray(self.variant(lambda p: _trajectory(
        optax.chain(od.add_decoupled_decay(ADAM_WD), optax.scale_by_learning_rate(ADAM_LR)),
        p, grads))(params))
    kappas = KAPPAS[KAPPAS * ADAM_LR <= 1]  # SGD+L2 diverges for ηκ > 2.
    gaps, _ = _gaps_over_kappa(lambda k: od.sgd_l2(ADAM_LR, weight_decay=k), sgdw,
                               self.variant, kappas)
    best = int(gaps.argmin())
    assert kappas[best] == pytest.approx(ADAM_WD)
    assert gaps[best] <= roundoff(sgdw)
    assert np.delete(gaps, best).min() > 100 * roundoff(sgdw)


# --- Proposition 3: fixed diagonal preconditioner ---------------------------------------------

# With a fixed preconditioner P = diag(s)⁻¹ (s > 0) and θ_{t+1} = θ_t − η·u_t:
#   decoupled:        u_t = g_t / s + λ θ_t
#   L2 on θ⊙√s:       R(θ) = (λ/2)‖θ⊙√s‖² = (λ/2) Σ s_i θ_i²,  ∇R = λ s⊙θ,
#                     u_t = (g_t + λ s⊙θ_t) / s = g_t / s + λ θ_t.
# The identity tested: chain(fixed_preconditioner(s), add_decoupled_decay(λ), lr(η)) and
# chain(add ∇R (by jax.grad), fixed_preconditioner(s), lr(η)) give the same trajectory to
# float32 round-off; plain L2 (on θ, not θ⊙√s) does not, unless s is a multiple of 1.


def fixed_preconditioner(s) -> optax.GradientTransformation:
  """u ← u / s: the fixed diagonal preconditioner diag(s)⁻¹ (s a pytree like the params)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, si: u / si, updates, s), state

  return optax.GradientTransformation(init_fn, update_fn)


def add_grad_of(regularizer) -> optax.GradientTransformation:
  """u ← u + ∇R(θ): a regularizer added to the loss, by automatic differentiation."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    return jax.tree.map(jnp.add, updates, jax.grad(regularizer)(params)), state

  return optax.GradientTransformation(init_fn, update_fn)


def weighted_l2(lam, s):
  """R(θ) = (λ/2)‖θ⊙√s‖²."""
  def regularizer(params):
    return 0.5 * lam * sum(jnp.sum(jnp.square(p * jnp.sqrt(si)))
                           for p, si in zip(jax.tree.leaves(params), jax.tree.leaves(s)))
  return regularizer


class Proposition3Test(chex.TestCase):

  @chex.variants(**VARIANTS)
  @parameterized.named_parameters(("s_spread", False), ("s_uniform", True))
  def test_prop3_fixed_preconditioner_decoupled_is_l2_on_scaled_params(self, uniform):
    params = small_named_params()
    grads = R.quadratic_grad_fn(params)
    rng = np.random.default_rng(5)
    # s spans 1..100 (stable: η·curvature/s ≤ 1e-2·1e2/1 = 1 on the stiffest leaf).
    s = jax.tree.map(
        lambda x: jnp.full(x.shape, 7.0, jnp.float32) if uniform else
        jnp.asarray(10.0 ** rng.uniform(0, 2, size=x.shape), jnp.float32), params)
    lam, lr, steps = 1.0, 1e-2, 100
    decoupled = R.run_optax(optax.chain(fixed_preconditioner(s), od.add_decoupled_decay(lam),
                                        optax.scale_by_learning_rate(lr)), params, grads, steps,
                           self.variant)
    l2_scaled = R.run_optax(optax.chain(add_grad_of(weighted_l2(lam, s)), fixed_preconditioner(s),
                                        optax.scale_by_learning_rate(lr)), params, grads, steps,
                           self.variant)
    tol = roundoff(decoupled)
    chex.assert_trees_all_close(l2_scaled, decoupled, rtol=0, atol=tol)
    undecayed = R.run_optax(optax.chain(fixed_preconditioner(s), optax.scale_by_learning_rate(lr)),
                            params, grads, steps)
    assert np.abs(decoupled - undecayed).max() > 100 * tol
    # Plain L2 before the preconditioner, with the best single coefficient (λ·mean s):
    # equal only when s is a multiple of the identity (then it is Proposition 1).
    mean_s = float(np.mean(np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)])))
    plain = R.run_optax(optax.chain(od.add_l2_to_grad(lam * mean_s), fixed_preconditioner(s),
                                    optax.scale_by_learning_rate(lr)), params, grads, steps)
    if uniform:
      chex.assert_trees_all_close(plain, decoupled, rtol=0, atol=tol)
    else:
      assert np.abs(plain - decoupled).max() > 100 * tol


# --- Zero-gradient parameters: Π(1 − η_t λ) under AdamW, ≈ η_t per step under Adam+L2 ----------


ZERO_T = 100
ZERO_SCHEDULE = optax.cosine_decay_schedule(1e-2, ZERO_T, alpha=0.1)  # Σ η_t ≈ 0.55
FROZEN0 = np.array([5.0, -5.0, 50.0, -500.0], np.float32)


def _frozen_problem():
  params = {**small_named_params(), "frozen": jnp.asarray(FROZEN0)}
  data = R.quadratic_grad_fn(small_named_params())
  names = R.leaf_names(params)
  i_frozen = names.index("frozen")

  def grad_fn(t, leaves):
    g = data(t, leaves[:i_frozen] + leaves[i_frozen + 1:])
    return g[:i_frozen] + [np.zeros_like(leaves[i_frozen])] + g[i_frozen:]

  cols = R.leaf_slices(R.to_leaves(params))[i_frozen]
  return params, grad_fn, cols


class ZeroGradientTest(chex.TestCase):

  @chex.variants(**VARIANTS)
  def test_zero_gradient_parameter_decays_geometrically_under_adamw(self):
    params, grad_fn, cols = _frozen_problem()
    lam = 0.5
    traj = R.run_optax(od.adamw(ZERO_SCHEDULE, weight_decay=lam), params, grad_fn, ZERO_T,
                       self.variant)
    etas = np.array([R.lr_at(ZERO_SCHEDULE, t) for t in range(ZERO_T)], np.float64)
    expected = FROZEN0[None].astype(np.float64) * np.concatenate(
        [[1.0], np.cumprod(1 - etas * lam)])[:, None]
    chex.assert_trees_all_close(traj[:, cols], expected, rtol=2 * ZERO_T * EPS32, atol=0)
    # The relative shrink is the same for every size: large weights lose more in absolute terms.
    moved = np.abs(traj[-1, cols] - traj[0, cols])
    np.testing.assert_allclose(moved / np.abs(FROZEN0), moved[0] / 5.0, rtol=1e-4)


  @chex.variants(**VARIANTS)
  def test_zero_gradient_parameter_moves_by_eta_under_adam_l2(self):
    params, grad_fn, cols = _frozen_problem()
    traj = R.run_optax(od.adam_l2(ZERO_SCHEDULE, weight_decay=0.5), params, grad_fn, ZERO_T,
                       self.variant)
    z = traj[:, cols].astype(np.float64)
    etas = np.array([R.lr_at(ZERO_SCHEDULE, t) for t in range(ZERO_T)], np.float64)
    total = etas.sum()
    assert 0.5 < total < 0.6
    # Each step moves towards 0 by η_t·m̂/√v̂, with (g = κθ positive, non-increasing, see
    # Prop. 2) min g / max g ≤ m̂/√v̂ ≤ 1, and min g / max g ≥ (|θ_0| − Σ η)/|θ_0|; plus the
    # float32 rounding of θ itself (≤ eps·|θ| per step).
    step = -(np.diff(z, axis=0)) * np.sign(FROZEN0)[None]
    slack = 2 * EPS32 * np.abs(z[:-1])
    lower = etas[:, None] * (np.abs(FROZEN0) - total) / np.abs(FROZEN0)
    assert np.all(step >= lower - slack)
    assert np.all(step <= etas[:, None] * (1 + 1e-6) + slack)
    # So every weight, 5 or 500, moves by ≈ Σ η_t: large weights are not shrunk more.
    moved = np.abs(z[-1] - z[0])
    np.testing.assert_allclose(moved, total, rtol=0.1)
    assert moved.max() / moved.min() < 1.25  # AdamW: 100 (= 500/5)
