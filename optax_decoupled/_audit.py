"""``audit_decay``: which weight decay an optimizer applies, found by probing it from outside.

The probe never reads the transformation's code or state types, so it works on optimizers it
has never seen (optax's, a config's ``optax.chain``, this package's). With zero gradients, an
optimizer's update is its decay alone (Adam, SGD, Lion, Adafactor move nothing on a zero
gradient), so the probe runs ``tx.update`` with zero gradients and fits, per leaf, the model

    u = −c·(θ − r)        (c one number per leaf, r one reference value per element)

and checks the fit. Every label below is a promise about what was measured:

* **none**: the update does not depend on θ (it is zero, or it moves the same at every θ,
  as noise does);
* **coupled_l2**: the decay term entered the optimizer's *statistics*: a state array that
  ``init`` fills the same for every θ (Adam's moments, a momentum buffer) depends on θ after
  a step, as with L2 before a preconditioner (torch's ``Adam(weight_decay=...)``);
* **decoupled**: u = −c·θ with c > 0 within the tolerance, at the first step and at the
  following ones, and the same −c·θ is added when a gradient is present;
* **toward_reference**: u = −c·(θ − r) with r ≠ 0 (L2-SP), r either fixed by the optimizer
  or the parameters given to ``init``;
* **grows**: u = −c·θ with c < 0 (the sign is flipped: the weights grow);
* **nonlinear**: at a zero gradient the update is not affine in θ (``detail`` says what was
  seen: sign-like (L1), a power of θ (θ³), thresholded, or shrink that changes with ‖θ‖
  as behind a clip). No affine label is given to such an update;
* **gradient_dependent**: affine at a zero gradient, but with a gradient present the
  decay is no longer the same −c·(θ − r): it is rescaled by the gradient (LAMB's trust
  ratio, cautious decay, a clip after the decay term). The zero-gradient shrink is reported,
  and does not hold in training;
* **not a float**: integer and boolean leaves, which no optimizer decays.

An L2 term that no preconditioner or momentum transforms (plain SGD) is decoupled decay with
shrink η·λ (Loshchilov & Hutter 2019, Proposition 1), and is reported as such.

The probe (its budget, with P = 6 probe points and k the calls until a first move, 1 for all
but ``optax.MultiSteps``):

1. **Points.** Per leaf a base b whose elements have magnitudes 2^e·(1 + m/8), e in −3..3, and
   both signs; the points are θ = s·b for s in (1, −1, 2, −0.5, 4, −0.25), so every element is
   probed on both sides of zero and most on both sides of |θ| = 1. The values are exact in
   bfloat16 and float16, so no point is rounded. Complex leaves get a complex base.
2. **Fresh runs** (P·k·(1 + 3) calls): each point gets its own ``init`` at that point (the
   optimizer as it will run), one moving step and three more, the updates applied to the
   parameters. The model is fitted at each of the four steps; the relative residual
   ``‖u + c·θ − c·r‖ / ‖u‖`` must be below max(8·ε, 1e-5), ε of the leaf's (or the update's,
   if coarser) dtype.
3. **Statistics** (no calls): the state arrays that ``init`` fills the same at every point
   are compared across points after the steps (``coupled_l2``).
4. **Gradient** (P·k calls): the first step again with a fixed nonzero gradient. The
   vectors u + c·(θ − r) at the P points must be multiples of one vector (the gradient's
   step may be rescaled by ‖θ‖, as Adafactor's parameter scale does; the decay may not
   change).
5. **Held reference** (P·k calls): one ``init`` at b, then steps at the other points. A pull
   toward the point ``init`` saw is ``toward_reference`` (``od.with_decay_toward``); a pull
   with c = 1 at the first step replaces the parameters by a point the state holds
   (schedule-free's iterate averaging) and is not decay.

With ``learning_rate=`` (the schedule the optimizer was built with), zero-gradient steps are
run and the shrink c_t compared with η_t: c_t/η_t constant ("lr": lr- or schedule-coupled,
torch/optax/the paper), c_t/η_t² constant ("lr²": AdamC's corrected decay), or c_t constant
while η_t varies ("independent": TF's DecoupledWeightDecayExtension, optax.adafactor).

Limits: the probe sees the points it chooses. A clip on the gradient before the decay joins
does nothing at a zero gradient: the clip-free behaviour is reported, which is the behaviour
whenever the clip is inactive. A clip after the decay term is seen (``nonlinear`` where it
cuts at the probe points, ``gradient_dependent`` where only the gradient makes it cut). Decay
smaller than the float noise of the gradient's step (bfloat16 with λ·η ≪ ε) is not checked
for gradient dependence (``detail`` says so). A state-held reference pulled with c = 1 at the
first step is read as averaging, not decay. ``optax.MultiSteps`` is probed at its first
boundary step, and its schedule relation is not told (its inner count runs k times slower).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _paths, _report

__all__ = ["DecayAudit", "DecayAuditRow", "audit_decay"]

KINDS = ("none", "coupled_l2", "decoupled", "toward_reference", "grows", "nonlinear",
         "gradient_dependent", "cannot_tell", "not a float")
# Probe points θ = s·b: both signs, |s| from 1/8 to 8; 1.5 and −3 are not powers of two, so
# round-off (which scales exactly with powers of two) is not mistaken for a decay.
SCALES = (1.0, -1.0, 4.0, -0.25, 8.0, -0.125, 1.5, -3.0)
ADVANCE_STEPS = 3  # steps after the first moving one, each fitted again.


@dataclasses.dataclass(frozen=True)
class DecayAuditRow:
  """One leaf of a :class:`DecayAudit`: its kind of decay, first-step shrink c and the fit.

  ``residual`` is the relative residual of the fit u = −c·(θ − r) at a zero gradient (worst
  step), ``None`` where nothing was fitted; ``detail`` says what was seen where the label
  alone does not (the shape of a nonlinear update, a held reference, what was not checked).
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  kind: str
  shrink: float | None  # c at the first moving step, for an affine kind; < 0 for "grows".
  residual: float | None = None
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class DecayAudit:
  """What :func:`audit_decay` found; ``str()`` renders a table.

  ``relation`` names the decay convention the probe found (c_t ∝ η_t: lr- or
  schedule-coupled; ∝ η_t²: corrected; independent), where it could tell.
  """

  rows: tuple[DecayAuditRow, ...]
  relation: str
  shrink_by_step: tuple[tuple[int, float], ...]  # (step, c_t) of the schedule probe.

  def kinds(self) -> dict[str, str]:
    """``{path: kind}``, paths spelled as :func:`describe_mask` spells them."""
    return {r.path: r.kind for r in self.rows}

  def shrink(self) -> dict[str, float]:
    """``{path: c}``: the per-step shrink at the first step, where one is defined."""
    return {r.path: r.shrink for r in self.rows if r.shrink is not None}

  def __str__(self) -> str:
    head = ("path", "shape", "dtype", "kind", "shrink", "detail")
    body = [(r.path, str(r.shape), r.dtype, r.kind, "" if r.shrink is None else f"{r.shrink:.4g}",
             r.detail) for r in self.rows]
    lines = _report.table(head, body)
    counts = {k: sum(r.kind == k for r in self.rows) for k in KINDS}
    lines.append(", ".join(f"{k}: {n}" for k, n in counts.items() if n) + " leaves")
    lines.append(f"shrink vs learning rate: {self.relation}")
    return "\n".join(lines)


# --- probe values ----------------------------------------------------------------------------

def _inexact(dtype: Any) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def _dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """±2^e·(1 + m/8), e = −3..2 in turn over the elements (so |b| from 1/8 to 7.5 in any leaf
  of six or more elements), m in 0..7 and the sign drawn: exact in every float dtype."""
  e = np.arange(int(np.prod(shape, dtype=int))).reshape(shape) % 6 - 3
  m = rng.integers(0, 8, size=shape)
  return rng.choice([-1.0, 1.0], size=shape) * np.ldexp(1.0 + m / 8.0, e)


def _probe_dtype(dtype: Any) -> Any:
  """Half-precision floats are probed in float32 (their ε hides small decays; float16 Adam
  divides 0/0 at a zero gradient), complex and wider floats in their own dtype."""
  if _inexact(dtype) and jnp.dtype(dtype).itemsize < 4:
    return jnp.float32
  return dtype


def _base_values(leaf: Any, seed: int) -> Any:
  """The probe base b of one leaf (non-float leaves are returned unchanged)."""
  value = jnp.asarray(_paths.leaf_value(leaf))
  if not _inexact(value.dtype):
    return value
  rng = np.random.default_rng(seed)
  b = _dyadic(rng, value.shape)
  if jnp.issubdtype(value.dtype, jnp.complexfloating):
    b = b + 1j * _dyadic(rng, value.shape)
  return jnp.asarray(b, _probe_dtype(value.dtype))


def _num(x: Any) -> np.ndarray:
  """A numpy copy in float64 (complex128 for complex values)."""
  a = np.asarray(x)
  return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def _eps(*dtypes: Any) -> float:
  return max(float(jnp.finfo(d).eps) for d in dtypes if _inexact(d))


def _tolerance(*dtypes: Any) -> float:
  return max(8 * _eps(*dtypes), 1e-5)


def _moving(u: Any) -> bool:
  return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def _same_array(a: np.ndarray | None, b: np.ndarray) -> bool:
  return a is not None and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def _state_array(x: Any) -> np.ndarray | None:
  """A state leaf as numpy (PRNG keys by their key data); None for what is not an array."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  try:
    return np.asarray(x)
  except (TypeError, ValueError):
    return None


# --- runs ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Runs:
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
class _Fit:
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


def _fit(thetas: Sequence[np.ndarray], us: Sequence[np.ndarray]) -> _Fit:
  t = np.stack([x.ravel() for x in thetas])
  u = np.stack([x.ravel() for x in us])
  tc, uc = t - t.mean(0), u - u.mean(0)
  denom = float(np.sum(np.abs(tc) ** 2))
  c = -float(np.real(np.vdot(tc, uc))) / denom if denom else 0.0
  d = u.mean(0) + c * t.mean(0)
  u_norm = float(np.linalg.norm(u))
  res = float(np.linalg.norm(u + c * t - d)) / u_norm if u_norm else 0.0
  return _Fit(c, d, res, abs(c) * np.sqrt(denom), u_norm, float(np.linalg.norm(t)))


def _describe(thetas: Sequence[np.ndarray], us: Sequence[np.ndarray], tol: float) -> str:
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
  return f"not affine in θ (relative residual {_fit(thetas, us).residual:.2g})"


def _rank_one(ws: Sequence[np.ndarray]) -> tuple[float, float]:
  """The two largest singular values of the matrix whose rows are ``ws``."""
  s = np.linalg.svd(np.stack([w.ravel() for w in ws]), compute_uv=False)
  return float(s[0]), float(s[1]) if len(s) > 1 else 0.0


# --- statistics ------------------------------------------------------------------------------

def _statistics_that_follow_theta(inits: Sequence[Any], afters: Sequence[Sequence[Any]],
                                  paths: Sequence[str], shapes: Sequence[tuple[int, ...]]
                                  ) -> tuple[dict[int, str], str | None]:
  """Leaves whose statistics depend on θ, with the state path that showed it.

  A statistic is a state array that ``init`` fills the same at every probe point (it does not
  hold θ); it depends on θ if it differs between points after a step. A dependent statistic
  that belongs to no one leaf (by path and shape) is returned as the second value.
  """
  flat0 = [jax.tree_util.tree_flatten_with_path(s)[0] for s in inits]
  init_arrays = [[_state_array(x) for _, x in f] for f in flat0]
  dependent: dict[int, str] = {}
  unattributed = None
  for i, (spath, _) in enumerate(flat0[0]):
    first = init_arrays[0][i]
    if first is None or any(not _same_array(a[i], first) for a in init_arrays[1:]):
      continue  # holds θ (differs at init), or is not an array.
    for after in afters:
      leaves = [jax.tree.leaves(a) for a in after]
      if any(len(x) != len(leaves[0]) for x in leaves):
        continue
      values = [_state_array(x[i]) for x in leaves]
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

def _reference_tol(fit: _Fit, tol: float, eps: float) -> bool:
  """Whether r ≠ 0: ‖d‖ = |c|·‖r‖ above round-off (the floor only where the fit needed it)."""
  floor = 0.0 if fit.residual <= tol else 8 * eps * fit.theta_norm
  d_norm = float(np.linalg.norm(fit.d)) * np.sqrt(len(SCALES))
  return d_norm > max(tol * abs(fit.c) * fit.theta_norm, floor)


Pairs = Sequence[tuple[np.ndarray, np.ndarray]]  # (θ, u) at each probe point.


def _classify(steps: Sequence[Pairs], grad_step: Pairs, held: Pairs, base: np.ndarray,
              statistic: str | None, tol: float, eps: float
              ) -> tuple[str, float | None, float | None, str]:
  """(kind, shrink, residual, detail) of one float leaf from its probes.

  ``steps``: the fresh runs' zero-gradient steps; ``grad_step``: their first step with a
  gradient; ``held``: one ``init`` at ``base``, then a step at each point.
  """
  def finite(pairs: Pairs) -> bool:
    return all(np.isfinite(t).all() and np.isfinite(u).all() for t, u in pairs)

  fits: list[_Fit] = []
  for n, s in enumerate(steps):
    if not finite(s):
      return "cannot_tell", None, None, f"the update is not finite at step {n + 1}"
    fits.append(_fit([t for t, _ in s], [u for _, u in s]))
    moving = any(f.u_norm for f in fits)
    if statistic is None and not fits[-1].affine(tol, eps):
      when = "" if n == 0 else f" (at step {n + 1}; the first step was affine)"
      return ("nonlinear", None, fits[-1].residual,
              _describe([t for t, _ in s], [u for _, u in s], tol) + when)
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
    h = _fit([t for t, _ in held], [u for _, u in held])
    if (h.u_norm and h.affine(tol, eps) and h.follows_theta(tol, eps)
        and _reference_tol(h, tol, eps)):
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
    elif _reference_tol(first, tol, eps) and fixed:
      kind, detail = "toward_reference", "toward a reference the optimizer fixes"
    else:
      kind = "decoupled"
      if _reference_tol(first, tol, eps):
        detail = "plus a move that is the same at every θ and changes between steps"
    c, d = first.c, first.d
  # With a gradient the decay must stay −c·(θ − r); the gradient's step may be rescaled per point.
  ws = [u.ravel() + c * t.ravel() - d for t, u in grad_step]
  s1, s2 = _rank_one(ws)
  theta_norm = float(np.linalg.norm(np.stack([t.ravel() for t, _ in grad_step])))
  u_norm = float(np.linalg.norm(np.stack([u.ravel() for _, u in grad_step])))
  noise = 8 * eps * (u_norm + theta_norm)
  decay_norm = abs(c) * first.theta_norm
  if s2 > max(noise, tol * s1):
    at_zero = "" if shrink is None else f" (c = {shrink:.3g} at g = 0 only)"
    return ("gradient_dependent", None, residual,
            "with a gradient the decay is not the same: it is rescaled by the gradient (a trust "
            "ratio, cautious masking, a clip after the decay)" + at_zero)
  if kind not in ("none",) and decay_norm and noise > 0.5 * decay_norm:
    detail = (detail + "; " if detail else "") + (
        "gradient dependence not checked: the decay is below the float noise of the step")
  return kind, shrink, residual, detail


def _relation(c_by_step, learning_rate) -> str:
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


def audit_decay(
    tx: Any,
    params: Any,
    *,
    learning_rate: Any = None,
    probe_steps: Sequence[int] = (0, 1, 10, 100, 1000),
    max_micro_steps: int = 64,
) -> DecayAudit:
  """Which weight decay ``tx`` applies to each leaf of ``params``, probed from outside.

  See the module docstring for the probe, what each kind guarantees and the probe budget.
  The parameters' *values* are not used (only their structure, paths, shapes and dtypes), so
  the audit is the same for any initialisation.

  Decay convention: none of its own; it reports the one ``tx`` applies.

  Args:
    tx: any optax ``GradientTransformation`` (or an object with ``init``/``update``, such
      as ``optax.MultiSteps``).
    params: a parameter tree (dicts, Flax linen or nnx state, Equinox modules), of any
      float, complex or integer dtypes.
    learning_rate: the learning rate or schedule ``tx`` was built with; given, the audit
      tells whether the shrink follows it (see the module docstring).
    probe_steps: the steps at which the shrink is compared with the learning rate
      (zero-gradient steps are run up to the last one).
    max_micro_steps: how many zero-gradient calls to wait for a first move
      (``optax.MultiSteps`` moves every k-th call).

  Returns:
    A :class:`DecayAudit`: ``print`` it, or read ``.kinds()``, ``.shrink()``,
    ``.relation``, ``.shrink_by_step`` and each row's ``residual`` and ``detail``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> od.audit_decay(optax.adamw(1e-3, weight_decay=0.1), params).kinds()
    {'bias': 'decoupled', 'kernel': 'decoupled'}
    >>> l2 = optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3))
    >>> od.audit_decay(l2, params).kinds()
    {'bias': 'coupled_l2', 'kernel': 'coupled_l2'}
    >>> l1 = optax.chain(optax.adam(1e-3), optax.add_decayed_weights(0.0),
    ...                  optax.scale_by_learning_rate(1e-3))  # no decay at all
    >>> od.audit_decay(l1, params).kinds()
    {'bias': 'none', 'kernel': 'none'}
  """
  pure = jax.tree.map(_paths.leaf_value, params, is_leaf=_paths.is_variable)
  leaves, treedef = jax.tree.flatten(pure)
  paths = [p for p, _ in _paths.leaves_with_paths(pure)]
  base_leaves = [_base_values(x, 1234 + k) for k, x in enumerate(leaves)]
  shapes = [tuple(np.shape(x)) for x in base_leaves]
  floats = [_inexact(jnp.asarray(x).dtype) and x.size > 0 for x in base_leaves]

  def tree(scale: float) -> Any:
    return treedef.unflatten(  # type: ignore[attr-defined]
        [b * jnp.asarray(scale, b.dtype) if f else b for b, f in zip(base_leaves, floats)])

  points = [tree(s) for s in SCALES]
  zeros = jax.tree.map(jnp.zeros_like, points[0])
  rng = np.random.default_rng(4321)
  gradient = treedef.unflatten(  # type: ignore[attr-defined]
      [jnp.asarray(_dyadic(rng, np.shape(b)), b.dtype) if f else jnp.zeros_like(b)
       for b, f in zip(base_leaves, floats)])
  update = jax.jit(tx.update)
  inits = [tx.init(p) for p in points]
  try:
    update(zeros, inits[0], points[0])
  except (TypeError, ValueError) as e:
    raise ValueError(
        "audit_decay probes tx.update(grads, state, params) with zero gradients, and this "
        f"optimizer failed on that call ({type(e).__name__}: {e}). Optimizers that need the "
        "loss or a function of it (optax.contrib.momo's value=, sophia's obj_fn=) cannot be "
        "audited from gradients alone; audit the same chain without that part.") from e

  # Fresh runs: the first moving step (lock-step over the points), then ADVANCE_STEPS more.
  runs = _Runs(update, list(inits), list(points))
  calls = 0
  for calls in range(1, max_micro_steps + 1):
    out = runs.call(zeros)
    if any(_moving(u) for _, u in out):
      break
  steps, afters = [out], [list(runs.states)]
  for _ in range(ADVANCE_STEPS):
    steps.append(runs.step(zeros, calls))
    afters.append(list(runs.states))
  grad_step = _Runs(update, list(inits), list(points)).step(gradient, calls)
  held_state = inits[0]
  held = _Runs(update, [held_state] * len(points), list(points)).step(zeros, calls)

  dependent, unattributed = _statistics_that_follow_theta(inits, afters, paths, shapes)

  def leaf(pairs, k):
    return [(_num(treedef.flatten_up_to(p)[k]), _num(treedef.flatten_up_to(u)[k]))
            for p, u in pairs]

  rows, decoupled_leaf = [], None
  for k, path in enumerate(paths):
    dtype = jnp.asarray(leaves[k]).dtype
    if not _inexact(dtype):
      kind, shrink, residual, detail = "not a float", None, None, ""
    elif not floats[k]:
      kind, shrink, residual, detail = "none", None, None, "empty leaf: nothing to decay"
    else:
      u_dtypes = [jnp.asarray(treedef.flatten_up_to(u)[k]).dtype  # type: ignore[attr-defined]
                  for _, u in steps[0]]
      probe = base_leaves[k].dtype
      tol, eps = _tolerance(probe, *u_dtypes), _eps(probe, *u_dtypes)
      statistic = dependent.get(k, unattributed)
      kind, shrink, residual, detail = _classify(
          [leaf(s, k) for s in steps], leaf(grad_step, k), leaf(held, k),
          _num(base_leaves[k]), statistic, tol, eps)
    if kind == "decoupled" and decoupled_leaf is None:
      decoupled_leaf = k
    rows.append(DecayAuditRow(path, shapes[k], str(dtype), kind, shrink, residual, detail))

  c_by_step: list[tuple[int, float]] = []
  if decoupled_leaf is not None and probe_steps:
    wanted = sorted({int(t) for t in probe_steps})
    p = points[0]
    b = _num(base_leaves[decoupled_leaf]).ravel()
    state = inits[0]
    for t in range(wanted[-1] + 1):
      for _ in range(calls):
        u, state = update(zeros, state, p)
      if t in wanted:
        uk = _num(treedef.flatten_up_to(u)[decoupled_leaf]).ravel()  # type: ignore[attr-defined]
        c_by_step.append((t, -float(np.real(np.vdot(b, uk))) / float(np.sum(np.abs(b) ** 2))))
  return DecayAudit(tuple(rows), _relation(c_by_step, learning_rate), tuple(c_by_step))
