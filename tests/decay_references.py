"""Numpy transcriptions (float64) of the decay conventions' reference algorithms.

Each function runs ``steps`` updates on a deterministic problem and returns
the trajectory ``[θ_0, θ_1, ..., θ_steps]``. The gradient oracle is
``grad(theta, k)`` (k = 0-based update index); ``mult[k]`` is the schedule
multiplier the paper calls η_t, used at update k (t = k + 1).
"""

from __future__ import annotations

import numpy as np


def f32(x):
  """A hyperparameter as float32 represents it (0.999 is 0.99900001287 in float32).

  The oracles run in float64 on the float32 values of β1, β2, α, λ, so that
  comparisons measure the arithmetic, not the representation of the constants
  (1 − β2 alone differs by 1.3e-5 relative between the two).
  """
  return float(np.float32(x))


def paper_adamw(theta0, grad, mult, steps, *, alpha, lam, b1=0.9, b2=0.999, eps=1e-8):
  """Loshchilov & Hutter 2019, Algorithm 2 (AdamW), lines 6-12.

  g_t = ∇f_t(θ_{t−1}); m_t = β1 m + (1−β1) g; v_t = β2 v + (1−β2) g²;
  m̂ = m/(1−β1^t); v̂ = v/(1−β2^t); η_t = SetScheduleMultiplier(t);
  θ_t = θ_{t−1} − η_t (α m̂/(√v̂ + ε) + λ θ_{t−1}).  (α does not multiply λ.)
  """
  alpha, lam, b1, b2, eps = map(f32, (alpha, lam, b1, b2, eps))
  theta = np.array(theta0, np.float64)
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  out = [theta.copy()]
  for k in range(steps):
    t = k + 1
    g = grad(theta, k)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    eta = mult[k]
    theta = theta - eta * (alpha * m_hat / (np.sqrt(v_hat) + eps) + lam * theta)
    out.append(theta.copy())
  return out


def paper_sgdw(theta0, grad, mult, steps, *, alpha, lam, b1=0.9):
  """Loshchilov & Hutter 2019, Algorithm 1 (SGDW), lines 6-9.

  g_t = ∇f_t(θ_{t−1}); η_t = SetScheduleMultiplier(t);
  m_t = β1 m_{t−1} + η_t α g_t; θ_t = θ_{t−1} − m_t − η_t λ θ_{t−1}.
  """
  alpha, lam, b1 = map(f32, (alpha, lam, b1))
  theta = np.array(theta0, np.float64)
  m = np.zeros_like(theta)
  out = [theta.copy()]
  for k in range(steps):
    g = grad(theta, k)
    eta = mult[k]
    m = b1 * m + eta * alpha * g
    theta = theta - m - eta * lam * theta
    out.append(theta.copy())
  return out


def tf_adamw(theta0, grad, lr, wd, steps, *, b1=0.9, b2=0.999, eps=1e-7):
  """TF's ``DecoupledWeightDecayExtension`` around Keras Adam (tfa.optimizers.AdamW).

  tensorflow_addons/optimizers/weight_decay_optimizers.py,
  ``DecoupledWeightDecayExtension._decay_weights_op``: ``var.assign_sub(wd_t * var)``
  runs first (λ_t not multiplied by the learning rate), then the base
  optimizer's ``_resource_apply_dense`` with the gradient computed at the
  undecayed θ. The base is Keras Adam (keras/optimizers/optimizer_v2/adam.py):
  lr_t = lr·√(1−β2^t)/(1−β1^t); m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²;
  θ ← θ − lr_t·m/(√v + ε̂) ("epsilon hat").
  """
  b1, b2, eps = map(f32, (b1, b2, eps))
  theta = np.array(theta0, np.float64)
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  out = [theta.copy()]
  for k in range(steps):
    t = k + 1
    g = grad(theta, k)
    theta = theta - wd[k] * theta  # _decay_weights_op
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    lr_t = lr[k] * np.sqrt(1 - b2**t) / (1 - b1**t)
    theta = theta - lr_t * m / (np.sqrt(v) + eps)
    out.append(theta.copy())
  return out


def tf_sgdw(theta0, grad, lr, wd, steps, *, momentum=0.9, nesterov=False):
  """tfa.optimizers.SGDW: ``DecoupledWeightDecayExtension`` around Keras SGD.

  Decay first, θ ← θ − λ_t·θ (not × lr), then Keras SGD with momentum
  (keras/optimizers/optimizer_v2/gradient_descent.py): v ← μ·v − η·g;
  θ ← θ + v, or θ ← θ + μ·v − η·g with Nesterov. g is computed at the undecayed θ.
  """
  momentum = f32(momentum)
  theta = np.array(theta0, np.float64)
  v = np.zeros_like(theta)
  out = [theta.copy()]
  for k in range(steps):
    g = grad(theta, k)
    theta = theta - wd[k] * theta
    v = momentum * v - lr[k] * g
    theta = theta + (momentum * v - lr[k] * g if nesterov else v)
    out.append(theta.copy())
  return out


def torch_style_adamw(theta0, grad, lr, steps, *, lam, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW (torch/optim/adamw.py, single-tensor path): lr-coupled decay.

  θ ← θ(1 − η_t λ); m, v as Adam; θ ← θ − η_t m̂/(√v̂ + ε). ``lam`` may be an
  array (λ_t per step), e.g. AdamC's λ·η_t/η_max (Defazio 2025, Algorithm 1).
  """
  lam = np.broadcast_to(np.asarray(lam, np.float32).astype(np.float64), (steps,))
  b1, b2, eps = map(f32, (b1, b2, eps))
  theta = np.array(theta0, np.float64)
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  out = [theta.copy()]
  for k in range(steps):
    t = k + 1
    g = grad(theta, k)
    theta = theta * (1 - lr[k] * lam[k])
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta - lr[k] * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    out.append(theta.copy())
  return out


def cosine_multiplier(steps: int, warmup: int = 0) -> np.ndarray:
  """s_k for k = 0..steps-1: linear warmup from 0 (s_0 = 0), then 0.5(1 + cos(π·frac))."""
  k = np.arange(steps, dtype=np.float64)
  if warmup:
    cos_part = 0.5 * (1 + np.cos(np.pi * (k - warmup) / (steps - warmup)))
    return np.where(k < warmup, k / warmup, cos_part)
  return 0.5 * (1 + np.cos(np.pi * k / steps))


class Problem:
  """A deterministic problem with fixed-seed gradients.

  ``kind="quadratic"``: g(θ, k) = h ⊙ (θ − θ*) + noise_k, curvatures h over
  three decades (for SGD: a linear, stable recursion).
  ``kind="drift"``: g(θ, k) = d ⊙ (1 + 0.5·noise_k), independent of θ and of
  constant sign per coordinate, magnitudes over four decades. Adam's m/√v is
  well conditioned there, so differences measure round-off, not the
  amplification of round-off by gradients that cross zero.
  """

  def __init__(self, n: int = 6, steps: int = 150, seed: int = 0, kind: str = "quadratic"):
    rng = np.random.default_rng(seed)
    self.kind = kind
    self.theta0 = rng.normal(size=n)
    self.h = 10.0 ** rng.uniform(-2, 1, size=n)
    self.target = rng.normal(size=n)
    self.noise = 0.1 * rng.normal(size=(steps, n))
    self.d = rng.choice([-1.0, 1.0], size=n) * 10.0 ** rng.uniform(-3, 1, size=n)

  def grad(self, theta, k):
    if self.kind == "drift":
      return self.d * (1 + 3 * self.noise[k])
    return self.h * (theta - self.target) + self.noise[k]

  def grad_jax(self, theta, k):
    """The same gradient in jax.numpy, float32, traceable in k."""
    import jax.numpy as jnp

    noise = jnp.asarray(self.noise, jnp.float32)
    if self.kind == "drift":
      return jnp.asarray(self.d, jnp.float32) * (1 + 3 * noise[k])
    return jnp.asarray(self.h, jnp.float32) * (theta - jnp.asarray(self.target, jnp.float32)) \
        + noise[k]
