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
  ratio, cautious decay, a clip after the decay term), or a θ-proportional term appears
  only with a gradient (none at g = 0). The zero-gradient shrink is in ``detail``, and does
  not hold in training;
* **cannot_tell**: the update is not finite, the optimizer did not move within the probe's
  budget, or a one-element leaf's update with a gradient changes between the points (a
  gradient step rescaled per point and a decay rescaled by the gradient look the same on one
  element); ``detail`` says which;
* **not a float**: integer and boolean leaves, which no optimizer decays.

An L2 term that no preconditioner or momentum transforms (plain SGD) is decoupled decay with
shrink η·λ (Loshchilov & Hutter 2019, Proposition 1), and is reported as such.

The probe (its budget, with P = 8 probe points and k the calls until a first move, 1 for all
but ``optax.MultiSteps``; an optimizer that does not move at a zero gradient is stepped with
the gradient until it moves, and k is those calls):

1. **Points.** Per leaf a base b whose elements have magnitudes 2^e·(1 + m/8), e in −3..2, and
   both signs; the points are θ = s·b for s in (1, −1, 4, −0.25, 8, −0.125, 1.5, −3), so every
   element is probed on both sides of zero and most on both sides of |θ| = 1. The values are
   exact in bfloat16 and float16, so no point is rounded. Complex leaves get a complex base.
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
boundary step, and its schedule relation is not told (its inner count runs k times slower);
an optimizer that moves neither at a zero gradient nor with one within ``max_micro_steps``
calls, or only after them, is ``cannot_tell``. A ``tx.update`` that returns updates of
another structure or shape than the parameters is a ``ValueError``; one that cannot be traced
by ``jax.jit`` (Python control flow on values) is probed without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _audit_fit, _paths, _report

__all__ = ["DecayAudit", "DecayAuditRow", "audit_decay"]

KINDS = ("none", "coupled_l2", "decoupled", "toward_reference", "grows", "nonlinear",
         "gradient_dependent", "cannot_tell", "not a float")


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
    lines.append(", ".join(f"{k}: {n}" for k, n in counts.items() if n) + " leaves"
                 if self.rows else "no leaves")
    lines.append(f"shrink vs learning rate: {self.relation}")
    return "\n".join(lines)


_NOT_JITTABLE = tuple(getattr(jax.errors, name) for name in (
    "ConcretizationTypeError", "TracerArrayConversionError", "TracerBoolConversionError",
    "TracerIntegerConversionError", "NonConcreteBooleanIndexError")
    if hasattr(jax.errors, name))


def _check_updates(updates: Any, params: Any) -> None:
  """A clear error when ``tx.update`` returns updates that cannot be applied to ``params``."""
  want, got = str(jax.tree.structure(params)), str(jax.tree.structure(updates))
  if got != want:
    raise ValueError(
        "audit_decay: tx.update returned updates whose tree structure is not the parameters' "
        f"({got} instead of {want}); an optax transformation returns one update per "
        "parameter, in the parameters' tree.")
  for (path, p), u in zip(_paths.leaves_with_paths(params), jax.tree.leaves(updates)):
    if np.shape(u) != np.shape(p):
      raise ValueError(
          f"audit_decay: tx.update returned an update of shape {np.shape(u)} for {path!r}, "
          f"whose shape is {np.shape(p)}; an optax transformation returns one update per "
          "parameter, of its shape.")


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
  if isinstance(max_micro_steps, bool) or not isinstance(max_micro_steps, (int, np.integer)) \
      or max_micro_steps < 1:
    raise ValueError(f"audit_decay: max_micro_steps must be an integer >= 1, got "
                     f"{max_micro_steps!r}.")
  pure = jax.tree.map(_paths.leaf_value, params, is_leaf=_paths.is_variable)
  leaves, treedef = jax.tree.flatten(pure)
  paths = [p for p, _ in _paths.leaves_with_paths(pure)]
  base_leaves = [_audit_fit.base_values(x, 1234 + k) for k, x in enumerate(leaves)]
  shapes = [tuple(np.shape(x)) for x in base_leaves]
  floats = [_audit_fit.inexact(jnp.asarray(x).dtype) and x.size > 0 for x in base_leaves]

  def tree(scale: float) -> Any:
    return treedef.unflatten(  # type: ignore[attr-defined]
        [b * jnp.asarray(scale, b.dtype) if f else b for b, f in zip(base_leaves, floats)])

  points = [tree(s) for s in _audit_fit.SCALES]
  zeros = jax.tree.map(jnp.zeros_like, points[0])
  rng = np.random.default_rng(4321)
  gradient = treedef.unflatten(  # type: ignore[attr-defined]
      [jnp.asarray(_audit_fit.dyadic(rng, np.shape(b)), b.dtype) if f else jnp.zeros_like(b)
       for b, f in zip(base_leaves, floats)])
  update = jax.jit(tx.update)
  inits = [tx.init(p) for p in points]
  try:
    try:
      first, _ = update(zeros, inits[0], points[0])
    except _NOT_JITTABLE:  # Python control flow on values: probed without jit, slower.
      update = tx.update
      first, _ = update(zeros, inits[0], points[0])
  except (TypeError, ValueError) as e:
    raise ValueError(
        "audit_decay probes tx.update(grads, state, params) with zero gradients, and this "
        f"optimizer failed on that call ({type(e).__name__}: {e}). Optimizers that need the "
        "loss or a function of it (optax.contrib.momo's value=, sophia's obj_fn=) cannot be "
        "audited from gradients alone; audit the same chain without that part.") from e
  except Exception as e:
    e.add_note("(raised by tx.update(zero grads, tx.init(params), params), audit_decay's "
               "first probe call)")
    raise
  _check_updates(first, points[0])

  # Fresh runs: the first moving step (lock-step over the points), then _audit_fit.ADVANCE_STEPS more.
  runs = _audit_fit.Runs(update, list(inits), list(points))
  calls, moved = 0, False
  for calls in range(1, max_micro_steps + 1):
    out = runs.call(zeros)
    moved = any(_audit_fit.moving(u) for _, u in out)
    if moved:
      break
  at_rest = False
  if not moved:  # no decay to align on: a step is the calls until a gradient moves it.
    g_runs = _audit_fit.Runs(update, list(inits), list(points))
    for calls in range(1, max_micro_steps + 1):
      if any(_audit_fit.moving(u) for _, u in g_runs.call(gradient)):
        break
    else:
      at_rest, calls = True, 1
  steps, afters = [out], [list(runs.states)]
  for _ in range(_audit_fit.ADVANCE_STEPS):
    steps.append(runs.step(zeros, calls))
    afters.append(list(runs.states))
  # Still at rest within the budget, and moving afterwards: the boundary of a step was not
  # found (optax.MultiSteps with more micro-steps than max_micro_steps), and fits of calls
  # that are not steps would mislabel it.
  late = not moved and any(_audit_fit.moving(u) for s in steps[1:] for _, u in s)
  # The gradient step: at the first move; an optimizer at rest at g = 0 is given the whole
  # budget of gradient calls, so that a decay its statistics grow into (mechanize) is seen.
  grad_step = _audit_fit.Runs(update, list(inits), list(points)).step(
      gradient, calls if moved else max_micro_steps)
  held_state = inits[0]
  held = _audit_fit.Runs(update, [held_state] * len(points), list(points)).step(zeros, calls)

  dependent, unattributed = _audit_fit.statistics_that_follow_theta(inits, afters, paths, shapes)

  def leaf(pairs, k):
    return [(_audit_fit.num(treedef.flatten_up_to(p)[k]), _audit_fit.num(treedef.flatten_up_to(u)[k]))
            for p, u in pairs]

  rows, decoupled_leaf = [], None
  for k, path in enumerate(paths):
    dtype = jnp.asarray(leaves[k]).dtype
    if not _audit_fit.inexact(dtype):
      kind, shrink, residual, detail = "not a float", None, None, ""
    elif not floats[k]:
      kind, shrink, residual, detail = "none", None, None, "empty leaf: nothing to decay"
    elif late or at_rest:
      seen = ("a move after them" if late else "and none with a gradient either")
      kind, shrink, residual, detail = "cannot_tell", None, None, (
          f"no move in the first {max_micro_steps} zero-gradient calls, {seen}: pass a larger "
          "max_micro_steps (optax.MultiSteps: at least its every_k_schedule)")
    else:
      u_dtypes = [jnp.asarray(treedef.flatten_up_to(u)[k]).dtype  # type: ignore[attr-defined]
                  for _, u in steps[0]]
      probe = base_leaves[k].dtype
      tol, eps = _audit_fit.tolerance(probe, *u_dtypes), _audit_fit.eps(probe, *u_dtypes)
      statistic = dependent.get(k, unattributed)
      kind, shrink, residual, detail = _audit_fit.classify(
          [leaf(s, k) for s in steps], leaf(grad_step, k), leaf(held, k),
          _audit_fit.num(base_leaves[k]), statistic, tol, eps)
    if kind == "decoupled" and decoupled_leaf is None:
      decoupled_leaf = k
    rows.append(DecayAuditRow(path, shapes[k], str(dtype), kind, shrink, residual, detail))

  c_by_step: list[tuple[int, float]] = []
  if decoupled_leaf is not None and probe_steps:
    wanted = sorted({int(t) for t in probe_steps})
    p = points[0]
    b = _audit_fit.num(base_leaves[decoupled_leaf]).ravel()
    state = inits[0]
    for t in range(wanted[-1] + 1):
      for _ in range(calls):
        u, state = update(zeros, state, p)
      if t in wanted:
        uk = _audit_fit.num(treedef.flatten_up_to(u)[decoupled_leaf]).ravel()  # type: ignore[attr-defined]
        c_by_step.append((t, -float(np.real(np.vdot(b, uk))) / float(np.sum(np.abs(b) ** 2))))
  return DecayAudit(tuple(rows), _audit_fit.relation(c_by_step, learning_rate), tuple(c_by_step))
