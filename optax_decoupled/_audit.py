"""``audit_decay``: which weight decay an optimizer applies, found by probing it from outside.

The probe never reads the transformation's code or state types, so it works on optimizers it
has never seen (optax's, a config's ``optax.chain``, this package's). With zero gradients, an
optimizer's update is its decay alone (Adam, SGD, Lion, Adafactor move nothing on a zero
gradient), so it runs ``tx.update`` with zero gradients at two points p = 2·b and p = 3·b
(b a fixed, nonzero probe value per element; ``init`` at b) and reads, per leaf:

* **none**: the update is zero at both points;
* **coupled_l2**: the optimizer's new *state* depends on p: the decay term entered its
  statistics (Adam's moments, a momentum buffer), as with L2 before a preconditioner;
* otherwise the update is affine in p, u = −c·(p − r): **decoupled** (r = 0, c > 0),
  **toward_reference** (r ≠ 0: L2-SP), **grows** (c < 0: the sign is flipped).

An L2 term that no preconditioner or momentum transforms (plain SGD) is decoupled decay with
shrink η·λ (Loshchilov & Hutter 2019, Proposition 1), and is reported as such.

With ``learning_rate=`` (the schedule the optimizer was built with), zero-gradient steps are
run and the shrink c_t compared with η_t: c_t/η_t constant ("lr": lr- or schedule-coupled,
torch/optax/the paper), c_t/η_t² constant ("lr²": AdamC's corrected decay), or c_t constant
while η_t varies ("independent": TF's DecoupledWeightDecayExtension, optax.adafactor).

Limits: decay that depends on the gradient (cautious decay) is probed at g = 0 only;
optimizers that move on a zero gradient (a non-zero momentum state, noise) confuse the probe;
``optax.MultiSteps`` is probed at its first boundary step, and its schedule relation is not
told (its inner count runs k times slower).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_decoupled import _paths, _report

__all__ = ["DecayAudit", "DecayAuditRow", "audit_decay"]

KINDS = ("none", "coupled_l2", "decoupled", "toward_reference", "grows")


@dataclasses.dataclass(frozen=True)
class DecayAuditRow:
  """One leaf of a :class:`DecayAudit`: its kind of decay and first-step shrink c."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  kind: str
  shrink: float | None  # c at the first moving step; < 0 for "grows".


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
    head = ("path", "shape", "dtype", "kind", "shrink")
    body = [(r.path, str(r.shape), r.dtype, r.kind, "" if r.shrink is None else f"{r.shrink:.4g}")
            for r in self.rows]
    lines = _report.table(head, body)
    counts = {k: sum(r.kind == k for r in self.rows) for k in KINDS}
    lines.append(", ".join(f"{k}: {n}" for k, n in counts.items() if n) + " leaves")
    lines.append(f"shrink vs learning rate: {self.relation}")
    return "\n".join(lines)


def _probe_values(leaf: Any, k: int) -> Any:
  """Fixed nonzero values of the leaf's shape and dtype: |b| in [0.5, 1.5), mixed signs."""
  value = jnp.asarray(_paths.leaf_value(leaf))
  if not jnp.issubdtype(value.dtype, jnp.floating):
    return value
  rng = np.random.default_rng(1234 + k)
  b = rng.uniform(0.5, 1.5, size=value.shape) * rng.choice([-1.0, 1.0], size=value.shape)
  return jnp.asarray(b, value.dtype)


def _moving(u: Any) -> bool:
  return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def _state_dependence(state_a: Any, state_b: Any, paths: Sequence[str],
                      shapes: Sequence[tuple[int, ...]]) -> tuple[set[int], bool]:
  """Leaves whose state differs between the two probe points, and whether some state array
  that belongs to no one leaf differs (then every moving leaf counts as dependent)."""
  flat_a, _ = jax.tree_util.tree_flatten_with_path(state_a)
  flat_b = jax.tree.leaves(state_b)
  dependent, unattributed = set(), False
  for (spath, a), b in zip(flat_a, flat_b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or np.array_equal(a, b, equal_nan=True):
      continue
    name = "/" + _paths.path_to_str(spath)
    owners = [k for k, (p, s) in enumerate(zip(paths, shapes))
              if name.endswith("/" + p) and tuple(a.shape) == s]
    if owners:
      dependent.add(max(owners, key=lambda k: len(paths[k])))
    else:
      unattributed = True
  return dependent, unattributed


def _classify(ua: np.ndarray, ub: np.ndarray, base: np.ndarray, dependent: bool):
  """(kind, shrink) of one leaf from its updates at p = 2·b and p = 3·b."""
  if not ua.any() and not ub.any():
    return "none", None
  if dependent:
    return "coupled_l2", None
  c = float(-np.median((ub - ua) / base))  # u = −c·(p − r): slope over p, with Δp = b.
  if c < 0:
    return "grows", c
  if c == 0:
    return "coupled_l2", None  # moves, but not in proportion to θ: normalised by a statistic.
  r = 2 * base + ua / c
  if np.median(np.abs(r)) > 1e-3 * np.median(np.abs(base)):
    return "toward_reference", c
  return "decoupled", c


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

  See the module docstring for the probe. The parameters' *values* are not used (only their
  structure, paths, shapes and dtypes), so the audit is the same for any initialisation.

  Decay convention: none of its own; it reports the one ``tx`` applies.

  Args:
    tx: any optax ``GradientTransformation`` (or an object with ``init``/``update``, such
      as ``optax.MultiSteps``).
    params: a parameter tree (dicts, Flax linen or nnx state, Equinox modules).
    learning_rate: the learning rate or schedule ``tx`` was built with; given, the audit
      tells whether the shrink follows it (see the module docstring).
    probe_steps: the steps at which the shrink is compared with the learning rate
      (zero-gradient steps are run up to the last one).
    max_micro_steps: how many zero-gradient calls to wait for a first move
      (``optax.MultiSteps`` moves every k-th call).

  Returns:
    A :class:`DecayAudit`: ``print`` it, or read ``.kinds()``, ``.shrink()``,
    ``.relation`` and ``.shrink_by_step``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> od.audit_decay(optax.adamw(1e-3, weight_decay=0.1), params).kinds()
    {'bias': 'decoupled', 'kernel': 'decoupled'}
    >>> l2 = optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3))
    >>> od.audit_decay(l2, params).kinds()
    {'bias': 'coupled_l2', 'kernel': 'coupled_l2'}
  """
  pure = jax.tree.map(_paths.leaf_value, params, is_leaf=_paths.is_variable)
  leaves, treedef = jax.tree.flatten(pure)
  paths = [p for p, _ in _paths.leaves_with_paths(pure)]
  base_leaves = [_probe_values(x, k) for k, x in enumerate(leaves)]
  base = treedef.unflatten(base_leaves)  # type: ignore[attr-defined]
  point = {a: jax.tree.map(lambda b, a=a: b * a if jnp.issubdtype(b.dtype, jnp.floating) else b,
                           base) for a in (2, 3)}
  zeros = jax.tree.map(jnp.zeros_like, base)
  update = jax.jit(tx.update)
  state0 = tx.init(base)

  results = {}
  for a, p in point.items():
    state = state0
    for _ in range(max_micro_steps):
      u, state = update(zeros, state, p)
      if _moving(u):
        break
    results[a] = (u, state)
  (ua, sa), (ub, sb) = results[2], results[3]
  shapes = [tuple(np.shape(x)) for x in base_leaves]
  dependent, unattributed = _state_dependence(sa, sb, paths, shapes)
  rows, decoupled_leaf = [], None
  for k, (path, b, x, y) in enumerate(zip(paths, base_leaves, treedef.flatten_up_to(ua),  # type: ignore[attr-defined]
                                          treedef.flatten_up_to(ub))):  # type: ignore[attr-defined]
    b = np.asarray(b, np.float64)
    if x is None or not np.issubdtype(np.asarray(x).dtype, np.floating) or b.size == 0:
      kind, c = "none", None
    else:
      kind, c = _classify(np.asarray(x, np.float64), np.asarray(y, np.float64), b,
                          k in dependent or unattributed)
    if kind == "decoupled" and decoupled_leaf is None:
      decoupled_leaf = k
    value = jnp.asarray(leaves[k])
    rows.append(DecayAuditRow(path, shapes[k], str(value.dtype), kind, c))

  c_by_step: list[tuple[int, float]] = []
  if decoupled_leaf is not None and probe_steps:
    steps = sorted({int(t) for t in probe_steps})
    b = np.asarray(base_leaves[decoupled_leaf], np.float64)
    state = state0
    for t in range(steps[-1] + 1):
      u, state = update(zeros, state, point[2])
      if t in steps:
        uk = np.asarray(treedef.flatten_up_to(u)[decoupled_leaf], np.float64)  # type: ignore[attr-defined]
        c_by_step.append((t, float(-np.median(uk / (2 * b)))))
  return DecayAudit(tuple(rows), _relation(c_by_step, learning_rate), tuple(c_by_step))
