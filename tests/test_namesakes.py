"""Optimizers that share a name but not an update rule, checked against their sources.

1. Keras 3 ``keras.optimizers.Adam(weight_decay=λ)`` is *not* torch's ``Adam(weight_decay=λ)``
   (coupled L2, ``od.adam_l2``): every Keras optimizer applies, before its own update,
   ``θ ← θ − θ·λ·lr`` (keras/src/optimizers/base_optimizer.py, ``_apply_weight_decay``), so
   Keras ``Adam`` with a weight decay is lr-coupled decoupled decay, the same update as Keras
   ``AdamW`` (keras/src/optimizers/adamw.py subclasses ``Adam`` and only changes the default
   λ to 0.004). The oracle is the installed ``keras`` package, run on its JAX backend.
2. ``od.adamw(lr, nesterov=True, weight_decay=λ)`` is ``optax.nadamw`` (the installed optax,
   optax/_src/alias.py ``nadamw``), not timm's ``NAdamW`` (timm/optim/nadamw.py in
   huggingface/pytorch-image-models), whose Nesterov term is bias-corrected with 1−β1^t
   instead of 1−β1^(t+1): its first step is (1+β1)²/(1+2β1) ≈ 1.29× optax's.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od

LR, WD = 1e-2, 0.1
THETA0 = np.array([1.5, -2.0, 0.3, 4.0, -0.7, 0.05], np.float32)


def _grads(n_steps):
  """Fixed gradients of mixed scales and signs (independent of θ)."""
  rng = np.random.default_rng(0)
  return [(rng.normal(size=THETA0.shape) * np.array([0.1, 1, 0.02, 3, 10, 1e-3]))
          .astype(np.float32) for _ in range(n_steps)]


def _run_optax(tx, grads, theta0=THETA0):
  params = jnp.asarray(theta0)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params)


# --- 1. Keras 3 Adam(weight_decay=λ) ------------------------------------------------------


def _keras_chain(lr=LR, wd=WD):
  """Keras's Adam step: ε-hat placement (od.scale_by_adam's ``eps_hat=True``, ε̂ = 1e-7,
  keras/src/optimizers/adam.py ``update_step``), plus the lr-coupled decay of θ_{t-1}."""
  return optax.chain(od.scale_by_adam(eps=1e-7, eps_hat=True), od.add_decoupled_decay(wd),
                     optax.scale_by_learning_rate(lr))


def test_keras_adam_weight_decay_is_decoupled_lr_coupled_like_its_adamw():
  # Oracle: the installed keras 3 package, keras/src/optimizers/base_optimizer.py
  # (``_apply_weight_decay``: variable - variable * wd * lr, called before ``update_step``)
  # and keras/src/optimizers/adam.py (``update_step``), on the JAX backend.
  os.environ["KERAS_BACKEND"] = "jax"  # read by keras when it is first imported
  keras = pytest.importorskip("keras")
  if not keras.__version__.startswith("3.") or keras.backend.backend() != "jax":
    pytest.skip(f"needs keras 3 on the JAX backend, got {keras.__version__} on "
                f"{keras.backend.backend()}")
  grads = _grads(6)

  def run_keras(cls):
    var = keras.Variable(THETA0.copy())
    opt = cls(learning_rate=LR, weight_decay=WD)
    for g in grads:
      opt.apply_gradients([(jnp.asarray(g), var)])
    return np.asarray(var.value)

  keras_adam = run_keras(keras.optimizers.Adam)
  keras_adamw = run_keras(keras.optimizers.AdamW)
  np.testing.assert_array_equal(keras_adam, keras_adamw)  # one code path

  ours = _run_optax(_keras_chain(), grads)
  np.testing.assert_allclose(keras_adam, ours, rtol=1e-6, atol=1e-7)
  # The README's spelling of Keras's AdamW: the finished Keras Adam step + lr-coupled decay.
  readme_row = od.with_decoupled_decay(
      optax.chain(od.scale_by_adam(eps=1e-7, eps_hat=True), optax.scale_by_learning_rate(LR)),
      od.coupled_weight_decay(WD, coupling="lr", learning_rate=LR))
  np.testing.assert_allclose(keras_adamw, _run_optax(readme_row, grads), rtol=1e-6, atol=1e-7)

  # Not torch's coupled L2 (torch.optim.Adam(weight_decay=λ) = od.adam_l2, whose λθ is divided
  # by √v̂): after 6 steps the two differ by far more than ε or round-off.
  for eps in (1e-7, 1e-8):
    torch_like = _run_optax(od.adam_l2(LR, weight_decay=WD, eps=eps), grads)
    assert np.max(np.abs(torch_like - keras_adam)) > 1e-3
  # Without decay the chain is Keras's plain Adam, so the difference is the decay alone.
  var = keras.Variable(THETA0.copy())
  opt = keras.optimizers.Adam(learning_rate=LR)
  for g in grads:
    opt.apply_gradients([(jnp.asarray(g), var)])
  np.testing.assert_allclose(np.asarray(var.value), _run_optax(_keras_chain(wd=0.0), grads),
                             rtol=1e-6, atol=1e-7)


# --- 2. NAdamW: optax's, not timm's --------------------------------------------------------


def _timm_nadamw(theta0, grads, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
  """numpy (float64) transcription of timm's NAdamW, ``_single_tensor_nadamw`` in
  timm/optim/nadamw.py (huggingface/pytorch-image-models), defaults caution=False,
  corrected_weight_decay=False, maximize=False:

    step += 1
    param *= 1 - lr * weight_decay
    exp_avg = β1·exp_avg + (1−β1)·g;  exp_avg_sq = β2·exp_avg_sq + (1−β2)·g²
    step_size = lr / (1 − β1^step)
    m̃ = β1·exp_avg + (1−β1)·g            (a temporary; the state keeps exp_avg)
    param −= step_size · m̃ / (√exp_avg_sq / √(1 − β2^step) + eps)
  """
  b1, b2 = betas
  theta = np.asarray(theta0, np.float64).copy()
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  for step, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    theta *= 1.0 - lr * weight_decay
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step_size = lr / (1 - b1**step)
    nesterov_m = b1 * m + (1 - b1) * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**step) + eps
    theta -= step_size * nesterov_m / denom
  return theta


def test_od_nesterov_adamw_is_optax_nadamw():
  # Oracle: the installed optax, optax/_src/alias.py ``nadamw`` (scale_by_adam(nesterov=True),
  # optax/_src/transform.py, then add_decayed_weights and the learning rate).
  grads = _grads(8)
  for wd in (0.0, WD, 0.5):
    ours = _run_optax(od.adamw(LR, nesterov=True, weight_decay=wd), grads)
    theirs = _run_optax(optax.nadamw(LR, weight_decay=wd), grads)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_timm_nadamw_is_a_different_optimizer():
  # Oracle: timm/optim/nadamw.py, transcribed in _timm_nadamw above.
  # First step, m0 = v0 = 0, |g| ≫ ε, ignoring the (identical) decay factor 1 − lr·λ:
  #   timm:  lr·(β1(1−β1)g + (1−β1)g)/(1−β1) / |g|            = lr·(1+β1)·sign(g)
  #   optax: lr·(β1·(1−β1)g/(1−β1²) + (1−β1)g/(1−β1)) / |g|    = lr·(1+2β1)/(1+β1)·sign(g)
  #   ratio = (1+β1)²/(1+2β1) = 3.61/2.8 ≈ 1.2893 for β1 = 0.9.
  b1 = 0.9
  expected_ratio = (1 + b1) ** 2 / (1 + 2 * b1)
  assert abs(expected_ratio - 1.2893) < 1e-4
  grads = _grads(1)
  shrunk = THETA0.astype(np.float64) * (1 - LR * WD)  # both decay θ_0 by lr·λ first
  timm_step = shrunk - _timm_nadamw(THETA0, grads, LR, WD)
  optax_step = shrunk - _run_optax(optax.nadamw(LR, weight_decay=WD), grads)
  od_step = shrunk - _run_optax(od.adamw(LR, nesterov=True, weight_decay=WD), grads)
  big = np.abs(grads[0]) > 1e-2  # where ε = 1e-8 is negligible against |g|
  np.testing.assert_allclose(timm_step[big] / optax_step[big], expected_ratio, rtol=2e-4)
  np.testing.assert_allclose(timm_step[big] / od_step[big], expected_ratio, rtol=2e-4)
  # The transcription is NAdamW-shaped: its first step is lr·(1+β1) per coordinate.
  np.testing.assert_allclose(np.abs(timm_step[big]), LR * (1 + b1), rtol=1e-6)

  # Over several steps the two stay apart (the ratio of the Nesterov terms tends to 1 only as
  # β1^t → 0), so timm's NAdamW hyperparameters do not transfer to od.adamw(nesterov=True).
  grads = _grads(8)
  timm = _timm_nadamw(THETA0, grads, LR, WD)
  ours = _run_optax(od.adamw(LR, nesterov=True, weight_decay=WD), grads)
  assert np.max(np.abs(timm - ours)) > 1e-3
