"""The probing and fitting behind ``od.audit_decay``: probe values, lock-step runs of an
optimizer, and the checked fit of u = −c·(θ − r) that gives each leaf its label (the labels
and their promises are in ``_audit``'s docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _paths

# Probe points θ = s·b: both signs, |s| from 1/8 to 8; 1.5 and −3 are not powers of two, so
# round-off (which scales exactly with powers of two) is not mistaken for a decay.
SCALES = (1.0, -1.0, 4.0, -0.25, 8.0, -0.125, 1.5, -3.0)
ADVANCE_STEPS = 3  # steps after the first moving one, each fitted again.


# --- probe values ----------------------------------------------------------------------------

def inexact(dtype: Any) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """±2^e·(1 + m/8), e = −3..2 in turn over the elements (so |b| from 1/8 to 7.5 in any leaf
  of six or more elements), m in 0..7 and the sign drawn: exact in every float dtype."""
  e = np.arange(int(np.prod(shape, dtype=int))).reshape(shape) % 6 - 3
  m = rng.integers(0, 8, size=shape)
  return rng.choice([-1.0, 1.0], size=shape) * np.ldexp(1.0 + m / 8.0, e)


def probe_dtype(dtype: Any) -> Any:
  """Half-precision floats are probed in float32 (their ε hides small decays; float16 Adam
  divides 0/0 at a zero gradient), complex and wider floats in their own dtype."""
  if inexact(dtype) and jnp.dtype(dtype).itemsize < 4:
    return jnp.float32
  return dtype


def base_values(leaf: Any, seed: int) -> Any:
  """The probe base b of one leaf (non-float leaves are returned unchanged)."""
  value = jnp.asarray(_paths.leaf_value(leaf))
  if not inexact(value.dtype):
    return value
  rng = np.random.default_rng(seed)
  b = dyadic(rng, value.shape)
  if jnp.issubdtype(value.dtype, jnp.complexfloating):
    b = b + 1j * dyadic(rng, value.shape)
  return jnp.asarray(b, probe_dtype(value.dtype))


def num(x: Any) -> np.ndarray:
  """A numpy copy in float64 (complex128 for complex values)."""
  a = np.asarray(x)
  return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def eps(*dtypes: Any) -> float:
  return max(float(jnp.finfo(d).eps) for d in dtypes if inexact(d))


def tolerance(*dtypes: Any) -> float:
  return max(8 * eps(*dtypes), 1e-5)


def moving(u: Any) -> bool:
  return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def same_array(a: np.ndarray | None, b: np.ndarray) -> bool:
  return a is not None and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def state_array(x: Any) -> np.ndarray | None:
  """A state leaf as numpy (PRNG keys by their key data); None for what is not an array."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  try:
    return np.asarray(x)
  except (TypeError, ValueError):
    return None


# --- runs ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Runs:
  """Lock-step runs from several (state, params): each call applies its update (consistent)."""

  update: Any
  states: list[Any]
  params: list[Any]

  def call(self, grads: Any) -> list[tuple[Any, Any]]:
    """One call at every point: ``[(params before, update)]``."""
    out = []
    for j, (s, p) in enumerate(zip(self.states, self.params)):
      u, self.states[j] = self.update(grads, s, p)
      self.params[j] = optax.apply_updates(p, u)
      out.append((p, u))
    return out

  def step(self, grads: Any, calls: int) -> list[tuple[Any, Any]]:
    out = []
    for _ in range(calls):
      out = self.call(grads)
    return out


# --- fits ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fit:
  """Least squares fit of u_j = −c·θ_j + d over points j (d per element, d = c·r).

  Two tolerances: ``tol`` relative to ‖u‖ (round-off of an update computed at its own
  scale, as −η·λ·θ is), and ``floor`` = 8·ε·‖θ‖ (round-off of an update computed as the
  difference of θ-sized values, as schedule-free's is). A fit that needs the floor must
  have a slope above it: round-off alone is no decay.
  """

  c: float
  d: np.ndarray
  residual: float  # ‖u + c·θ − d‖ / ‖u‖ (0 where u = 0).
  slope_norm: float  # ‖c·(θ − mean θ)‖: how much of u follows θ.
  u_norm: float
  theta_norm: float

  def affine(self, tol: float, eps: float) -> bool:
    return self.residual * self.u_norm <= max(tol * self.u_norm, 8 * eps * self.theta_norm)

  def round_off(self, tol: float, eps: float) -> bool:
    """The fit holds only within the round-off floor, and u is no larger than it."""
    return self.residual > tol and self.u_norm <= 8 * eps * self.theta_norm

  def follows_theta(self, tol: float, eps: float) -> bool:
    floor = 0.0 if self.residual <= tol else 8 * eps * self.theta_norm
    return self.slope_norm > max(tol * self.u_norm, floor)

  def has_reference(self, tol: float) -> bool:
    d_norm = float(np.linalg.norm(self.d)) * np.sqrt(len(SCALES))
    return d_norm > tol * abs(self.c) * self.theta_norm


def fit(thetas: Sequence[np.ndarray], us: Sequence[np.ndarray]) -> Fit:
  t = np.stack([x.ravel() for x in thetas])
  u = np.stack([x.ravel() for x in us])
  tc, uc = t - t.mean(0), u - u.mean(0)
  denom = float(np.sum(np.abs(tc) ** 2))
  c = -float(np.real(np.vdot(tc, uc))) / denom if denom else 0.0
  d = u.mean(0) + c * t.mean(0)
  u_norm = float(np.linalg.norm(u))
  res = float(np.linalg.norm(u + c * t - d)) / u_norm if u_norm else 0.0
  return Fit(c, d, res, abs(c) * np.sqrt(denom), u_norm, float(np.linalg.norm(t)))


def describe(thetas: Sequence[np.ndarray], us: Sequence[np.ndarray], tol: float) -> str:
  """What a non-affine zero-gradient update looks like, in a few words."""
  t = np.concatenate([np.real(x).ravel() for x in thetas])
  u = np.concatenate([np.real(x).ravel() for x in us])
  moving = u != 0
  if moving.any() and not moving.all():
    lo, hi = np.abs(t[~moving]).max(), np.abs(t[moving]).min()
    if lo < hi:
      return f"thresholded: zero where |θ| ≤ {lo:.3g}, moves where |θ| ≥ {hi:.3g}"
    return f"zero on {int((~moving).sum())} of {u.size} probed values, not by |θ|"
  k = -float(np.mean(u * np.sign(t)))
  if np.linalg.norm(u + k * np.sign(t)) <= tol * np.linalg.norm(u):
    return f"sign-like: u = −{k:.3g}·sign(θ) (L1 decay)"
  if np.all(np.sign(u) == -np.sign(t)):
    q, a = np.polyfit(np.log(np.abs(t)), np.log(np.abs(u)), 1)
    if np.abs(np.log(np.abs(u)) - (q * np.log(np.abs(t)) + a)).max() <= 10 * tol:
      return f"a power of θ: u = −{np.exp(a):.3g}·sign(θ)·|θ|^{q:.3g}"
  slopes = [-float(np.real(np.vdot(x.ravel(), y.ravel()))) / float(np.sum(np.abs(x) ** 2))
            for x, y in zip(thetas, us)]
  if all(np.linalg.norm(y.ravel() + s * x.ravel()) <= tol * max(float(np.linalg.norm(y)), 1e-300)
         for x, y, s in zip(thetas, us, slopes)):
    return (f"u = −c·θ at each point, but c changes with ‖θ‖ from {min(slopes):.3g} to "
            f"{max(slopes):.3g} (a clip or a normalisation)")
  return f"not affine in θ (relative residual {fit(thetas, us).residual:.2g})"


def rank_one(ws: Sequence[np.ndarray]) -> tuple[float, float]:
  """The two largest singular values of the matrix whose rows are ``ws``."""
  s = np.linalg.svd(np.stack([w.ravel() for w in ws]), compute_uv=False)
  return float(s[0]), float(s[1]) if len(s) > 1 else 0.0


# --- statistics ------------------------------------------------------------------------------

def statistics_that_follow_theta(inits: Sequence[Any], afters: Sequence[Sequence[Any]],
                                  paths: Sequence[str], shapes: Sequence[tuple[int, ...]]
                                  ) -> tuple[dict[int, str], str | None]:
  """Leaves whose statistics depend on θ, with the state path that showed it.

  A statistic is a float state array that ``init`` fills the same at every probe point (it
  does not hold θ); it depends on θ if it differs between points after a step. Integer and
  boolean state (counts, flags) holds no decay term, and is not a statistic. A dependent statistic
  that belongs to no one leaf (by path and shape) is returned as the second value.
  """
  flat0 = [jax.tree_util.tree_flatten_with_path(s)[0] for s in inits]
  init_arrays = [[state_array(x) for _, x in f] for f in flat0]
  dependent: dict[int, str] = {}
  unattributed = None
  for i, (spath, _) in enumerate(flat0[0]):
    first = init_arrays[0][i]
    if first is None or not np.issubdtype(first.dtype, np.inexact):
      continue  # not an array, or counts and flags.
    if any(not same_array(a[i], first) for a in init_arrays[1:]):
      continue  # holds θ (differs at init).
    for after in afters:
      leaves = [jax.tree.leaves(a) for a in after]
      if any(len(x) != len(leaves[0]) for x in leaves):
        continue
      values = [state_array(x[i]) for x in leaves]
      if values[0] is None or all(v is not None and v.shape == values[0].shape
                                  and np.array_equal(v, values[0], equal_nan=True)
                                  for v in values[1:]):
        continue
      name = "/" + _paths.path_to_str(spath)
      owners = [k for k, (p, s) in enumerate(zip(paths, shapes))
                if name.endswith("/" + p) and tuple(values[0].shape) == s]
      if owners:
        dependent.setdefault(max(owners, key=lambda k: len(paths[k])), name.lstrip("/"))
      elif unattributed is None:
        unattributed = name.lstrip("/") or "<state>"
      break
  return dependent, unattributed


# --- classification --------------------------------------------------------------------------

def reference_tol(fit: Fit, tol: float, eps: float) -> bool:
  """Whether r ≠ 0: ‖d‖ = |c|·‖r‖ above round-off (the floor only where the fit needed it)."""
  floor = 0.0 if fit.residual <= tol else 8 * eps * fit.theta_norm
  d_norm = float(np.linalg.norm(fit.d)) * np.sqrt(len(SCALES))
  return d_norm > max(tol * abs(fit.c) * fit.theta_norm, floor)


Pairs = Sequence[tuple[np.ndarray, np.ndarray]]  # (θ, u) at each probe point.


def classify(steps: Sequence[Pairs], grad_step: Pairs, held: Pairs, base: np.ndarray,
              statistic: str | None, tol: float, eps: float
              ) -> tuple[str, float | None, float | None, str]:
  """(kind, shrink, residual, detail) of one float leaf from its probes.

  ``steps``: the fresh runs' zero-gradient steps; ``grad_step``: their first step with a
  gradient; ``held``: one ``init`` at ``base``, then a step at each point.
  """
  def finite(pairs: Pairs) -> bool:
    return all(np.isfinite(t).all() and np.isfinite(u).all() for t, u in pairs)

  fits: list[Fit] = []
  for n, s in enumerate(steps):
    if not finite(s):
      return "cannot_tell", None, None, f"the update is not finite at step {n + 1}"
    fits.append(fit([t for t, _ in s], [u for _, u in s]))
    moving = any(f.u_norm for f in fits)
    if statistic is None and not fits[-1].affine(tol, eps):
      when = "" if n == 0 else f" (at step {n + 1}; the first step was affine)"
      return ("nonlinear", None, fits[-1].residual,
              describe([t for t, _ in s], [u for _, u in s], tol) + when)
  if statistic is not None and moving:
    return "coupled_l2", None, None, f"the decay enters the state's statistics ({statistic})"
  if not (finite(grad_step) and finite(held)):
    return "cannot_tell", None, None, "the update is not finite with a gradient or held state"
  residual = max(f.residual for f in fits)
  first = fits[0]
  follows = [f.follows_theta(tol, eps) for f in fits]
  if not any(follows):
    kind, shrink, detail = "none", None, ""
    if any(f.u_norm and f.residual > tol for f in fits):
      detail = "moves only by float round-off"
    elif moving:
      detail = "moves on a zero gradient, the same at every θ"
    h = fit([t for t, _ in held], [u for _, u in held])
    if (h.u_norm and h.affine(tol, eps) and h.follows_theta(tol, eps)
        and reference_tol(h, tol, eps)):
      if abs(h.c - 1.0) <= max(tol, 8 * eps):
        detail = ("the state holds the parameters: its first update replaces them by the "
                  "state's point (averaging, not decay)")
      else:
        r = h.d / h.c
        at_init = np.linalg.norm(r - base.ravel()) <= max(tol, 8 * eps) * np.linalg.norm(base)
        kind, shrink = "toward_reference", h.c
        detail = ("toward the parameters given to init" if at_init
                  else "toward a point the state holds")
    c, d = 0.0, np.zeros(())
  else:
    signs = {np.sign(f.c) for f, ok in zip(fits, follows) if ok}
    if len(signs) > 1 or not follows[0]:
      return ("nonlinear", None, residual,
              "the shrink changes sign or vanishes between steps: c = "
              + ", ".join(f"{f.c:.3g}" for f in fits))
    shrink, detail = first.c, ""
    # A reference r = d/c is the same at every step; a move the same at every θ (noise, a
    # momentum) also gives an intercept d, but one that changes between steps.
    refs = [f.d / f.c for f, ok in zip(fits, follows) if ok]
    fixed = all(np.linalg.norm(r - refs[0]) <= 1e-3 * np.linalg.norm(refs[0]) for r in refs)
    if first.c < 0:
      kind = "grows"
    elif reference_tol(first, tol, eps) and fixed:
      kind, detail = "toward_reference", "toward a reference the optimizer fixes"
    else:
      kind = "decoupled"
      if reference_tol(first, tol, eps):
        detail = "plus a move that is the same at every θ and changes between steps"
    c, d = first.c, first.d
  # With a gradient the decay must stay −c·(θ − r); the gradient's step may be rescaled per point.
  ws = [u.ravel() + c * t.ravel() - d for t, u in grad_step]
  s1, s2 = rank_one(ws)
  theta_norm = float(np.linalg.norm(np.stack([t.ravel() for t, _ in grad_step])))
  u_norm = float(np.linalg.norm(np.stack([u.ravel() for _, u in grad_step])))
  noise = 8 * eps * (u_norm + theta_norm)
  decay_norm = abs(c) * first.theta_norm
  if s2 > max(noise, tol * s1):
    at_zero = "" if shrink is None else f" (c = {shrink:.3g} at g = 0 only)"
    return ("gradient_dependent", None, residual,
            "with a gradient the decay is not the same: it is rescaled by the gradient (a trust "
            "ratio, cautious masking, a clip after the decay)" + at_zero)
  # A θ-proportional term that a gradient adds or rescales (a decay applied only where g ≠ 0,
  # or scaled by ‖g‖) leaves the w's rank one, all along θ: with a gradient u is again affine
  # in θ, with a slope the zero-gradient fit did not see. (A gradient's step rescaled per
  # point, as Adafactor's parameter scale does, is |s|·v: not affine in θ = s·b.)
  g_fit = fit([t for t, _ in grad_step], ws)
  g_floor = max(tol * g_fit.u_norm, noise)
  if g_fit.residual * g_fit.u_norm <= g_floor and g_fit.slope_norm > g_floor:
    at_zero = "" if shrink is None else f"; c = {shrink:.3g} at g = 0 only"
    return ("gradient_dependent", None, residual,
            f"with a gradient the shrink changes by {g_fit.c:.3g}: the decay is applied or "
            f"rescaled by the gradient{at_zero}")
  # One element: any w's are "multiples of one vector", so the rank test above is blind. A w
  # that changes between points is a gradient step rescaled per point (Adafactor's parameter
  # scale) or a decay rescaled by the gradient (LAMB's trust ratio), and one element cannot
  # tell which.
  if base.size == 1:
    w = np.stack(ws)
    if float(np.linalg.norm(w - w.mean(0))) > max(noise, tol * float(np.linalg.norm(w))):
      return ("cannot_tell", None, residual,
              "a one-element leaf whose update with a gradient changes between probe points: "
              "a rescaled gradient step and a decay rescaled by the gradient look the same "
              "on one element")
  if kind not in ("none",) and decay_norm and noise > 0.5 * decay_norm:
    detail = (detail + "; " if detail else "") + (
        "gradient dependence not checked: the decay is below the float noise of the step")
  return kind, shrink, residual, detail


def relation(c_by_step, learning_rate) -> str:
  if learning_rate is None:
    return "not probed (pass learning_rate=, the optimizer's schedule or constant)"
  steps = [(t, c) for t, c in c_by_step if c > 0]
  eta = [float(learning_rate(t)) if callable(learning_rate) else float(learning_rate)
         for t, _ in steps]
  pairs = [(c, e) for (_, c), e in zip(steps, eta) if e > 0]
  if len(pairs) < 2:
    return "not told (the probe found fewer than two steps with decay and η_t > 0)"
  cs, es = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

  def constant(x):
    return np.ptp(x) <= 1e-3 * np.max(np.abs(x))

  if constant(es):
    return "not told: the learning rate is constant over the probed steps"
  for name, ratio in (("lr (c_t ∝ η_t: lr- or schedule-coupled)", cs / es),
                      ("lr² (c_t ∝ η_t²: corrected decay)", cs / es**2),
                      ("independent (c_t does not follow η_t)", cs)):
    if constant(ratio):
      return name
  return "other (c_t follows neither η_t, η_t² nor a constant)"
