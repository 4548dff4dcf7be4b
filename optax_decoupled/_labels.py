"""Parameter groups: labels for ``optax.multi_transform`` from predicates.

:func:`labels` turns the predicates that build decay masks (``od.exclude_names``,
``od.min_ndim``, their combinations, the ``odf`` module-type presets) into the label
function ``optax.multi_transform`` / ``optax.partition`` take: the first rule whose
predicate selects a leaf names its group. Like a mask, it refuses to fail silently: a rule
that takes no leaf, and a leaf no rule takes (without ``default``), are errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from optax_decoupled import _hyperparams, _paths, _predicates, _report, _rules

__all__ = ["Labels", "labels"]

#: How to fix a label rule that takes no leaf.
_UNMATCHED_FIX = ("Fix or reorder the rules, or pass allow_unmatched=True (to labels() for a "
                  "rule that takes no leaf, to the predicate for its own name patterns).")


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
    tree = _rules.read(params, self, argument="param_labels")
    leaves = tree.leaves
    problems = [f"rule {name!r}: {problem}" for name, predicate in self.rules
                for problem in (predicate.unmatched(list(tree.paths)) if tree.paths else [])]
    taken: list[tuple[str, str] | None] = [None] * len(leaves)
    refused: list[list[str]] = [[] for _ in leaves]
    for name, predicate in self.rules:
      decided = [predicate.decide(p, x) for p, x in leaves]
      selected = [k for k, d in enumerate(decided) if d.decay]
      for k, d in enumerate(decided):
        if not d.decay:
          refused[k].append(f"{name}: {d.rule}")
      fresh = [k for k in selected if taken[k] is None]
      for k in fresh:
        taken[k] = (name, f"{name}: {decided[k].rule}")
      if not leaves or self.allow_unmatched or fresh:
        continue
      if not selected:
        problems.append(f"rule {name!r} ({predicate!r}) selects no parameter")
      else:
        earlier = sorted({t[0] for t in (taken[k] for k in selected) if t is not None})
        problems.append(f"rule {name!r} ({predicate!r}) only selects parameters that "
                        f"earlier rules {earlier} already took (the first rule wins)")
    if problems:
      raise _rules.unmatched_error("labels()", problems, _UNMATCHED_FIX, grouped=tree.grouped)
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
    return _rules.unflatten_like(params, [lab for _, _, lab, _ in self.decisions(params)])

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
    if isinstance(predicate, str):
      raise TypeError(
          f"labels(): rule {name!r} is the string {predicate!r}; a rule is a predicate. For "
          f"the leaves whose path matches it, write od.include_names({predicate!r}).")
    if not isinstance(predicate, _predicates.Predicate):
      raise TypeError(
          f"labels(): rule {name!r} is {predicate!r}; a rule is a predicate (od.exclude_names"
          ", od.include_names, od.min_ndim, their combinations, or an odf preset).")
  if default is not None and not isinstance(default, str):
    raise TypeError(f"labels(): default must be a str label or None, got {default!r}.")
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", "labels")
  return Labels(tuple(rules.items()), default, bool(allow_unmatched))
