"""Parameter groups: labels for ``optax.multi_transform`` from predicates, lr multipliers.

:func:`labels` turns the predicates that build decay masks (``od.exclude_names``,
``od.min_ndim``, their combinations, the ``odf`` module-type presets) into the label
function ``optax.multi_transform`` / ``optax.partition`` take: the first rule whose
predicate selects a leaf names its group. Like a mask, it refuses to fail silently: a rule
that takes no leaf, and a leaf no rule takes (without ``default``), are errors.

:func:`scale_by_lr_multipliers` gives each group its own learning-rate multiplier from
regex rules, with the matching of :func:`~optax_decoupled.decay_multipliers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _hyperparams, _multipliers, _paths, _predicates, _report

__all__ = ["Labels", "labels", "scale_by_lr_multipliers"]


def _is_leaf_or_masked(x: Any) -> bool:
  return _paths.is_variable(x) or isinstance(x, optax.MaskedNode)


def _grouped_hint(params: Any, n_leaves: int) -> str:
  flat = jax.tree_util.tree_leaves(params, is_leaf=_is_leaf_or_masked)
  if len(flat) == n_leaves:
    return ""
  return (" This runs inside optax.masked or optax.multi_transform and sees only its own "
          "group: pass allow_unmatched=True, or use it in the outer transform.")


@dataclasses.dataclass(frozen=True)
class Labels:
  """Predicate rules → group labels, first taking rule wins; see :func:`labels`."""

  rules: tuple[tuple[str, _predicates.Predicate], ...]
  default: str | None = None
  allow_unmatched: bool = False

  def __bool__(self) -> bool:
    raise TypeError(
        f"{self!r} is a label function for optax.multi_transform / optax.partition, not a "
        "boolean mask: pass it as their param_labels argument. For a decay mask, pass one "
        "of its predicates as mask=."
    )

  def decisions(self, params: Any) -> list[tuple[str, Any, str, str]]:
    """``(path, leaf, label, deciding rule)`` per leaf of ``params`` (Variables are leaves).

    Runs each predicate's own unmatched-name check, then this rule set's: every rule must
    take a leaf, and every leaf must be taken or get ``default``.
    """
    if (hasattr(params, "dtype") and np.ndim(params) == 0
        and np.issubdtype(np.dtype(params.dtype), np.integer)):
      raise TypeError(f"{self!r} was called with a step count, not with the parameters "
                      "(optax.inject_hyperparams treats callables as schedules: make "
                      "param_labels a static argument).")
    leaves = _paths.leaves_with_paths(params)
    taken: list[tuple[str, str] | None] = [None] * len(leaves)
    refused: list[list[str]] = [[] for _ in leaves]
    problems = []
    for name, predicate in self.rules:
      try:
        decided = predicate.decisions(params)
      except ValueError as e:
        msg = str(e).replace("Weight-decay mask ", "", 1)
        raise ValueError(f"labels(): rule {name!r}: {msg}") from e
      selected = [k for k, (_, _, d) in enumerate(decided) if d.decay]
      for k, (_, _, d) in enumerate(decided):
        if not d.decay:
          refused[k].append(f"{name}: {d.rule}")
      fresh = [k for k in selected if taken[k] is None]
      for k in fresh:
        taken[k] = (name, f"{name}: {decided[k][2].rule}")
      if not leaves or self.allow_unmatched or fresh:
        continue
      if not selected:
        problems.append(f"rule {name!r} ({predicate!r}) selects no parameter")
      else:
        earlier = sorted({t[0] for t in (taken[k] for k in selected) if t is not None})
        problems.append(f"rule {name!r} ({predicate!r}) only selects parameters that "
                        f"earlier rules {earlier} already took (the first rule wins)")
    if problems:
      raise ValueError("labels(): " + "; ".join(problems) + ". Fix or reorder the rules, or "
                       "pass allow_unmatched=True." + _grouped_hint(params, len(leaves)))
    untaken = [p for (p, _), t in zip(leaves, taken) if t is None]
    if untaken and self.default is None:
      shown = ", ".join(repr(p) for p in untaken[:8]) + (", ..." if len(untaken) > 8 else "")
      raise ValueError(
          f"labels(): no rule takes {len(untaken)} of {len(leaves)} parameters: {shown}. "
          "Add a rule for them, or pass default='<label>'.")
    return [(p, x, *(t or (self.default or "", f"default ({'; '.join(r)})")))
            for (p, x), t, r in zip(leaves, taken, refused)]

  def __call__(self, params: Any) -> Any:
    """The label tree: ``params``' structure (nnx Variables as leaves), str leaves."""
    return _predicates.unflatten_like(params, [lab for _, _, lab, _ in self.decisions(params)])

  def describe(self, params: Any) -> str:
    """A table of path, shape, label and deciding rule, then the totals per label."""
    rows = []
    for path, leaf, label, rule in self.decisions(params):
      shape = tuple(int(n) for n in np.shape(_paths.leaf_value(leaf)))
      rows.append((path, str(shape), label, rule, int(np.prod(shape, dtype=np.int64))))
    lines = [f"labels: {self!r}",
             *_report.table(("path", "shape", "label", "rule"), [r[:4] for r in rows])]
    total = sum(r[4] for r in rows)
    for label in dict.fromkeys([name for name, _ in self.rules] + [r[2] for r in rows]):
      mine = [r for r in rows if r[2] == label]
      if mine:
        lines.append(f"{label}: {len(mine)} of {len(rows)} leaves, "
                     f"{sum(r[4] for r in mine):,} of {total:,} parameters")
    return "\n".join(lines)

  def __repr__(self) -> str:
    rules = ", ".join(f"{name!r}: {p!r}" for name, p in self.rules)
    extra = f", default={self.default!r}" if self.default is not None else ""
    extra += ", allow_unmatched=True" if self.allow_unmatched else ""
    return f"labels({{{rules}}}{extra})"


def labels(
    rules: Mapping[str, _predicates.Predicate], *, default: str | None = None,
    allow_unmatched: bool = False,
) -> Labels:
  """Group labels for ``optax.multi_transform`` / ``optax.partition``, from predicates.

  Each leaf gets the label of the *first* rule, in the order of ``rules``, whose predicate
  decides ``decay=True`` for it (the predicate *selects* it); leaves no rule selects get
  ``default``. The predicates are the mask builders: ``od.exclude_names``,
  ``od.include_names``, ``od.min_ndim``, their ``&``/``|``/``~`` combinations and the
  ``optax_decoupled.flax`` presets. The labels are resolved from paths and shapes at
  ``init`` and at trace time, with nnx Variables as leaves, so ``nnx.Optimizer`` (which
  gives ``init`` Variables and ``update`` arrays) gets the same labels at both.

  Errors (``ValueError``, when resolved): a predicate's own unmatched name pattern; a rule
  that takes no leaf, because its predicate selects nothing or only leaves an earlier
  rule took (unless ``allow_unmatched=True``); a leaf no rule takes when ``default`` is
  None. ``Labels.describe(params)`` shows which rule labelled each leaf.

  Decay convention: none of its own (labels); each group's optimizer keeps its own.

  Args:
    rules: ``{label: predicate}``, in priority order.
    default: the label of leaves no rule takes; None makes such a leaf an error.
    allow_unmatched: allow rules that take no leaf (the predicates' own name checks are
      governed by their own ``allow_unmatched``).

  Returns:
    A frozen, hashable :class:`Labels`; ``labels(params)`` is the label tree. It is not a
    pytree and refuses ``bool()``, so it cannot be mistaken for a mask.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> params = {"embed": jnp.ones((8, 2)), "dense": {"kernel": jnp.ones((2, 2)),
    ...           "bias": jnp.ones(2)}}
    >>> lab = od.labels({"muon": od.min_ndim(2) & od.exclude_names("embed")},
    ...              default="adam")
    >>> lab(params)
    {'dense': {'bias': 'adam', 'kernel': 'muon'}, 'embed': 'adam'}
    >>> tx = optax.multi_transform({"muon": optax.sgd(0.1), "adam": optax.adam(0.1)}, lab)

  References:
    optax ``multi_transform`` / ``partition`` (labels: a tree or a function of the
    parameters); the hidden-matrix split of Muon: Jordan, modded-nanogpt (2024),
    https://github.com/KellerJordan/modded-nanogpt, and Liu et al., Muon is Scalable for
    LLM Training, https://arxiv.org/abs/2502.16982.
  """
  if not isinstance(rules, Mapping):
    raise TypeError(f"labels() takes a dict {{label: predicate}}, got {rules!r}.")
  if not rules:
    raise ValueError("labels() needs at least one rule {label: predicate}.")
  for name, predicate in rules.items():
    if not isinstance(name, str):
      raise TypeError(f"labels(): labels are str, got {name!r}.")
    if getattr(predicate, _hyperparams.MASK_FACTORY, False):
      raise TypeError(f"labels(): rule {name!r} is the predicate factory "
                      f"od.{getattr(predicate, '__name__', '')}, not a predicate: call it.")
    if not isinstance(predicate, _predicates.Predicate):
      raise TypeError(
          f"labels(): rule {name!r} is {predicate!r}; a rule is a predicate (od.exclude_names"
          ", od.include_names, od.min_ndim, their combinations, or an odf preset).")
  if default is not None and not isinstance(default, str):
    raise TypeError(f"labels(): default must be a str label or None, got {default!r}.")
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", "labels")
  return Labels(tuple(rules.items()), default, bool(allow_unmatched))


def scale_by_lr_multipliers(
    rules: Sequence[tuple[str, float]], *, default: float = 1.0, allow_unmatched: bool = False
) -> optax.GradientTransformation:
  r"""Per-group learning-rate multipliers from regex rules, first full match wins.

  .. math:: u \leftarrow \text{mult}(path)\cdot u

  ``mult`` is the multiplier of the first rule whose regular expression fully matches the
  leaf's path (``re.fullmatch``, the matching and unmatched-rule check of
  :func:`decay_multipliers`), else ``default``; resolved at trace time. A multiplier of
  exactly 1 leaves the update untouched (bitwise), 0 zeroes it (freezes the group).

  Place it anywhere after the learning-rate scaling, e.g.
  ``optax.chain(od.adamw(...), od.scale_by_lr_multipliers(...))``: it is linear, so it
  multiplies the step of the group as a per-group learning rate would. After an alias
  that decays, it multiplies the decay term too, as torch's per-group ``lr`` does with
  lr-coupled AdamW. It is not a decay: to weight λ per group use
  :func:`decay_multipliers`. Layer-wise learning-rate decay for fine-tuning is one rule
  per layer with multiplier :math:`\gamma^{L-l}`.

  Decay convention: none of its own; placed after a decaying alias it scales the decay term
  with the rest of the update, as torch's per-group learning rates do.

  Args:
    rules: ``[(regex, multiplier), ...]``; multipliers finite and >= 0.
    default: the multiplier of leaves no rule matches (1 = unchanged).
    allow_unmatched: allow rules that fully match no path, or only paths an earlier
      rule decides (else ``ValueError`` at ``init`` and at trace time).

  Returns:
    An ``optax.GradientTransformation`` with state ``optax.EmptyState()``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = optax.chain(optax.sgd(1.0), od.scale_by_lr_multipliers([("head/.*", 0.1)]))
    >>> params = {"head": {"kernel": jnp.ones(2)}, "body": {"kernel": jnp.ones(2)}}
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates["head"]["kernel"].tolist(), updates["body"]["kernel"].tolist()
    ([-0.10000000149011612, -0.10000000149011612], [-1.0, -1.0])

  References:
    google-research/big_vision, big_vision/optax.py (``config.lr_mults``: first match
    wins, applied after the optimizer and ``optax.scale(config.lr)``); layer-wise lr decay:
    Clark et al., ELECTRA, https://arxiv.org/abs/2003.10555; Bao et al., BEiT,
    https://arxiv.org/abs/2106.08254.
  """
  who = "scale_by_lr_multipliers"
  try:
    mults = _multipliers.decay_multipliers(rules, default=default,
                                           allow_unmatched=allow_unmatched)
  except (TypeError, ValueError) as e:
    raise type(e)(str(e).replace("decay_multipliers", who)) from e
  shown = repr(mults).replace("decay_multipliers", who)

  def check(tree: Any) -> None:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf_or_masked)
    every = [_paths.path_to_str(p) for p, _ in flat]
    problems = mults.unmatched(every) if every else []
    if problems:
      n = sum(not isinstance(x, optax.MaskedNode) for _, x in flat)
      raise ValueError(
          f"{shown}: " + "; ".join(problems) + ". Fix the rule, or pass allow_unmatched=True. "
          "Paths are matched whole (re.fullmatch)." + _grouped_hint(tree, n))

  def scale(path: Any, u: Any) -> Any:
    if isinstance(u, optax.MaskedNode):
      return u
    mult, _ = mults.decide(_paths.path_to_str(path))
    if mult == 1.0:
      return u
    return jnp.zeros_like(u) if mult == 0.0 else mult * u

  def init_fn(params: Any) -> optax.EmptyState:
    check(params)
    return optax.EmptyState()

  def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    check(updates)
    return jax.tree_util.tree_map_with_path(scale, updates, is_leaf=_is_leaf_or_masked), state

  return optax.GradientTransformation(init_fn, update_fn)
