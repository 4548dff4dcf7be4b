"""Conversions between decay conventions, normalized decay, timescales, warm restarts.

Oracles: the formulas of the papers written out in numpy here (each cited),
torch's CosineAnnealingWarmRestarts, and the trajectories of
tests/decay_references.py.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests import decay_references as ref
from tests.test_coupling import ATOL_ADAM, RTOL, STEPS, multiplier_schedule, run

COUPLINGS = ("lr", "schedule", "none", "corrected")


@pytest.mark.parametrize("a, b", list(itertools.product(COUPLINGS, COUPLINGS)))
@pytest.mark.parametrize("lr", [1e-3, 0.3, 2.0])
def test_conversions_round_trip(a, b, lr):
  for value in (1e-5, 0.01, 0.5):
    there = od.convert_weight_decay(value, from_coupling=a, to_coupling=b, learning_rate=lr)
    back = od.convert_weight_decay(there, from_coupling=b, to_coupling=a, learning_rate=lr)
    assert back == pytest.approx(value, rel=1e-14)


def test_worked_conversions():
  """λ_paper = α·λ_torch (paper Sec. 2): torch AdamW(1e-3, wd=1e-2) → 1e-5."""
  to = od.convert_weight_decay
  assert to(1e-2, from_coupling="lr", to_coupling="schedule", learning_rate=1e-3) == (
      pytest.approx(1e-2 * 1e-3))
  # at the peak, the schedule-coupled and independent λ are both the per-step shrink.
  assert to(1e-5, from_coupling="schedule", to_coupling="none", learning_rate=1e-3) == 1e-5
  # Paper App. B.1: λ_norm-derived 1.26e-4 is ≈ 0.126 in lr-coupled units at α = 1e-3.
  assert to(1.26e-4, from_coupling="schedule", to_coupling="lr", learning_rate=1e-3) == (
      pytest.approx(0.126))


def test_conversion_rejects_bad_input():
  with pytest.raises(ValueError, match="coupling"):
    od.convert_weight_decay(1e-2, from_coupling="torch", to_coupling="lr", learning_rate=1e-3)
  with pytest.raises(ValueError, match="learning_rate"):
    od.convert_weight_decay(1e-2, from_coupling="lr", to_coupling="none", learning_rate=0.0)
  with pytest.raises(TypeError, match="learning_rate"):
    od.convert_weight_decay(1e-2, from_coupling="lr", to_coupling="none",
                            learning_rate=optax.constant_schedule(1e-3))


def _adamw_runs(lr, alpha, lam_lr, problem):
  """od.adamw in the four conventions, λ converted from lr-coupled units at α."""
  out = {}
  for coupling in COUPLINGS:
    lam = od.convert_weight_decay(lam_lr, from_coupling="lr", to_coupling=coupling,
                                  learning_rate=alpha)
    out[coupling] = run(od.adamw(lr, weight_decay=lam, coupling=coupling,
                                 peak_learning_rate=alpha), problem)
  return out


def test_constant_lr_conventions_coincide_after_conversion():
  p = ref.Problem(seed=11, kind="drift")
  alpha, lam_lr = 3e-2, 0.5
  runs = _adamw_runs(alpha, alpha, lam_lr, p)
  oracle = ref.torch_style_adamw(p.theta0, p.grad, np.full(STEPS, alpha), STEPS, lam=lam_lr)
  for coupling, traj in runs.items():
    np.testing.assert_allclose(traj, oracle, rtol=RTOL, atol=ATOL_ADAM, err_msg=coupling)


def test_cosine_schedule_conventions_differ_after_conversion():
  """Converted at the peak, 'lr' and 'schedule' both anneal the shrink with s_t and agree;
  'none' keeps shrinking by the peak value, 'corrected' anneals it with s_t²."""
  p = ref.Problem(seed=12, kind="drift")
  alpha, lam_lr = 3e-2, 0.5
  mult = ref.cosine_multiplier(STEPS)
  runs = _adamw_runs(multiplier_schedule(mult, alpha), alpha, lam_lr, p)
  lr = alpha * mult
  shrink = {"lr": lr * lam_lr, "schedule": mult * alpha * lam_lr,
            "none": np.full(STEPS, alpha * lam_lr), "corrected": lr**2 / alpha * lam_lr}
  for coupling, traj in runs.items():
    oracle = ref.torch_style_adamw(p.theta0, p.grad, lr, STEPS, lam=shrink[coupling] / lr)
    np.testing.assert_allclose(traj, oracle, rtol=RTOL, atol=ATOL_ADAM, err_msg=coupling)
  np.testing.assert_allclose(runs["lr"], runs["schedule"], rtol=RTOL, atol=ATOL_ADAM)
  for coupling in ("none", "corrected"):
    assert np.abs(runs[coupling][-1] - runs["lr"][-1]).max() > 1e-2, coupling


def test_changing_alpha_changes_lr_coupled_decay_only():
  """The point of 'schedule' coupling: at fixed λ, the shrink does not move with α."""
  for coupling, moves in (("lr", True), ("schedule", False), ("none", False)):
    shrinks = [
        float(od.coupled_weight_decay(1e-2, coupling=coupling, learning_rate=alpha)(0))
        for alpha in (1e-3, 1e-2)
    ]
    assert (not math.isclose(*shrinks)) == moves, coupling


def test_normalized_weight_decay_worked_example():
  """Paper App. B.1: λ = λ_norm·√(b/(B·T)); CIFAR-10, b=128, B=50000, T=100, λ_norm=0.025."""
  lam = od.normalized_weight_decay(0.025, batch_size=128, num_examples=50_000, num_epochs=100)
  assert lam == pytest.approx(0.025 * np.sqrt(128 / (50_000 * 100)), rel=1e-12)
  assert abs(lam - 1.26e-4) < 0.01e-4  # the paper's rounded number (App. B.1)
  with pytest.raises(ValueError, match="swap"):
    od.normalized_weight_decay(0.025, 50_000, 128, 100)
  with pytest.raises(ValueError, match="num_epochs"):
    od.normalized_weight_decay(0.025, 128, 50_000, 0)


def test_timescale_helpers():
  """Wang & Aitchison 2024: τ_iter = 1/(η·λ) with λ lr-coupled; τ_epoch = τ_iter / iters."""
  eta, tau = 1e-3, 10_000
  lam = od.weight_decay_from_timescale(tau, eta)
  assert lam * eta * tau == pytest.approx(1.0, rel=1e-12)
  assert od.weight_decay_from_timescale(learning_rate=eta, tau_epochs=5,
                                        iterations_per_epoch=2_000) == pytest.approx(lam)
  assert od.timescale_from_weight_decay(lam, eta) == pytest.approx(tau)
  assert od.timescale_from_weight_decay(lam, eta, iterations_per_epoch=2_000) == (
      pytest.approx(5.0))
  # in the paper's units the timescale is 1/λ_paper, whatever η.
  lam_paper = od.weight_decay_from_timescale(tau, eta, coupling="schedule")
  assert lam_paper == pytest.approx(1 / tau)
  assert od.timescale_from_weight_decay(lam_paper, 0.5, coupling="schedule") == (
      pytest.approx(tau))
  # the timescale is what an untouched weight sees: (1 − ηλ)^τ ≈ e^{-1}.
  assert (1 - eta * lam) ** tau == pytest.approx(math.exp(-1), rel=1e-3)
  with pytest.raises(ValueError, match="exactly one"):
    od.weight_decay_from_timescale(tau, eta, tau_epochs=5, iterations_per_epoch=10)
  with pytest.raises(ValueError, match="iterations_per_epoch"):
    od.weight_decay_from_timescale(learning_rate=eta, tau_epochs=5)
  # a missing or zero learning rate is named by the function that was called.
  for bad in (None, 0.0):
    with pytest.raises((TypeError, ValueError),
                       match="^timescale_from_weight_decay: learning_rate"):
      od.timescale_from_weight_decay(lam, bad)


@pytest.mark.parametrize("t0, t_mult", [(10, 1), (10, 2), (7, 3)])
def test_warm_restarts_match_torch(t0, t_mult):
  torch = pytest.importorskip("torch")
  base, eta_min, steps = 0.1, 0.001, 300
  w = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([w], lr=base)
  sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=t_mult,
                                                               eta_min=eta_min)
  expected = []
  for _ in range(steps):
    expected.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  ours = od.cosine_warm_restarts_schedule(base, first_period=t0, period_multiplier=t_mult,
                                          min_value=eta_min)
  got = np.asarray(jax.vmap(ours)(jnp.arange(steps)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # restarts land on T_0, T_0(1 + T_mult), ...: the value is back at the peak exactly there.
  restarts, start, period = [], 0, t0
  while start + period < steps:
    start += period
    restarts.append(start)
    period *= t_mult
  at_peak = [t for t in range(1, steps) if got[t] == np.float32(base)]
  assert at_peak == restarts


def test_warm_restarts_far_out_and_under_jit():
  """Integer restart arithmetic: exact restarts even after a million steps."""
  s = od.cosine_warm_restarts_schedule(1.0, first_period=1000, period_multiplier=2)
  restart = 1000 * (2**10 - 1)  # start of the 11th period
  half = 1000 * 2**10 // 2  # half of the 11th period: cos(π/2) → 0.5
  vals = jax.jit(jax.vmap(s))(jnp.array([restart - 1, restart, restart + half]))
  assert float(vals[0]) < 1e-5 and float(vals[1]) == 1.0
  assert float(vals[2]) == pytest.approx(0.5, abs=1e-6)


def test_warm_restarts_as_decay_multiplier():
  """AdamWR: one multiplier drives both the lr and the decay; the shrink restarts with it."""
  alpha, lam = 1e-3, 1e-4
  mult = od.cosine_warm_restarts_schedule(1.0, first_period=10, period_multiplier=2)
  lr = lambda t: alpha * mult(t)
  shrink = od.coupled_weight_decay(lam, coupling="schedule", learning_rate=lr,
                                   peak_learning_rate=alpha)
  for t in (0, 10, 30, 70):
    assert float(shrink(t)) == pytest.approx(lam, rel=1e-6)
  assert float(shrink(9)) < 0.05 * lam
  # the same via with_decoupled_decay and a decay schedule written by hand.
  params = {"w": jnp.ones(3)}
  tx = od.with_decoupled_decay(optax.identity(), lambda t: lam * mult(t))
  state = tx.init(params)
  for t in range(12):
    updates, state = tx.update({"w": jnp.zeros(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -lam * float(mult(t)), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs", [{"first_period": 0}, {"period_multiplier": 1.5}, {"first_period": True}]
)
def test_warm_restarts_reject_bad_periods(kwargs):
  with pytest.raises(ValueError, match="int >= 1"):
    od.cosine_warm_restarts_schedule(1.0, **kwargs)
