"""Rules meeting a parameter tree: the one place paths are matched and rules are checked.

Every rule set of this package (the mask predicates, ``decay_multipliers``, ``labels``,
``scale_by_lr_multipliers``) decides per leaf from the leaf's path (``_paths``) and value,
and reports its decisions as :class:`Decision`. This module owns what they share:

* :func:`read` and :func:`leaves` read a tree the way every rule set reads it: nnx
  Variables are leaves, ``optax.MaskedNode`` leaves (a transform inside ``optax.masked`` or
  ``optax.multi_transform`` is given its group alone) get no decision but their paths count
  for the unmatched-rule check, and a step count in place of the parameters (what
  ``optax.inject_hyperparams`` gives a callable argument) is refused;
* :func:`unmatched_error`, the one text of "a rule matches no parameter", with its hint for
  rules used inside a group;
* :func:`patterns` and :func:`regex`, the one reading of a pattern list (a bare string is
  one pattern) and of a pattern;
* :func:`closest`, the paths named when a pattern matches none.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from optax_decoupled import _paths

__all__ = [
    "Decision",
    "closest",
    "Tree",
    "leaves",
    "patterns",
    "read",
    "regex",
    "unflatten_like",
    "unmatched_error",
]


@dataclasses.dataclass(frozen=True)
class Decision:
  """What a rule decided for one leaf, and which rule decided it.

  ``Decision(decay, rule)`` is what a predicate's ``decide(path, leaf)`` returns: whether
  the leaf is selected (decayed, for a mask) and a short text naming the deciding rule.
  Rules that give a multiplier (``od.decay_multipliers``) set ``weight``; the decisions of a
  whole tree (``od.describe_mask``, ``Predicate.decisions``) also carry the leaf's ``path``
  and ``leaf``.

  Decay convention: none (a decision selects leaves; the transform it is given to applies
  its own convention).
  """

  decay: bool
  rule: str
  weight: float | None = None  # the multiplier of a weighted rule; None for a yes/no rule.
  path: str = ""
  leaf: Any = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    if self.weight is not None and self.decay != (self.weight != 0):
      raise ValueError(f"Decision: decay={self.decay} disagrees with weight={self.weight}.")

  @classmethod
  def weighted_by(cls, weight: float, rule: str) -> Decision:
    """The decision of a multiplier rule: selected where the multiplier is nonzero."""
    return cls(weight != 0, rule, float(weight))

  @property
  def multiplier(self) -> float:
    """The multiplier of λ: ``weight``, or 1.0/0.0 for a yes/no rule."""
    return self.weight if self.weight is not None else float(self.decay)

  @property
  def weighted(self) -> bool:
    """True for the decision of a multiplier rule."""
    return self.weight is not None

  def at(self, path: str, leaf: Any) -> Decision:
    """This decision, for the leaf ``leaf`` at ``path``."""
    return dataclasses.replace(self, path=path, leaf=leaf)


#: Said after an unmatched-rule error when the tree holds ``optax.MaskedNode`` leaves.
GROUPED_HINT = ("This runs inside optax.masked or optax.multi_transform and sees only its own "
                "group: pass allow_unmatched=True, or give the rules to the outer transform.")


def is_leaf_or_masked(x: Any) -> bool:
  return _paths.is_variable(x) or isinstance(x, optax.MaskedNode)


def _check_not_a_count(tree: Any, owner: Any, argument: str) -> None:
  """``optax.inject_hyperparams`` calls every callable hyperparameter with the step count."""
  if (hasattr(tree, "dtype") and np.ndim(tree) == 0
      and np.issubdtype(np.dtype(tree.dtype), np.integer)):
    raise TypeError(
        f"{owner!r} was called with a step count, not with the parameters: "
        "optax.inject_hyperparams treats every callable argument as a schedule. Pass "
        f"static_args=({argument!r},) to optax.inject_hyperparams so that it stays a "
        "function of the parameters."
    )


@dataclasses.dataclass(frozen=True)
class Tree:
  """A tree as every rule set reads it; see :func:`read`."""

  paths: tuple[str, ...]  # every leaf's path, those of optax.MaskedNode leaves included.
  leaves: tuple[tuple[str, Any], ...]  # (path, leaf) of the leaves that get a decision.

  @property
  def grouped(self) -> bool:
    """The tree is one group of ``optax.masked`` / ``optax.multi_transform``."""
    return len(self.leaves) < len(self.paths) or not self.leaves


def read(tree: Any, owner: Any, argument: str = "mask") -> Tree:
  """The paths and leaves of ``tree``; refuses a step count in place of it.

  ``argument`` names the static argument of ``optax.inject_hyperparams`` that keeps
  ``owner`` a function of the parameters. ``optax.MaskedNode`` leaves get no decision but
  their paths are read; nnx Variables are leaves.
  """
  _check_not_a_count(tree, owner, argument)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf_or_masked)
  every = [(_paths.path_to_str(p), x) for p, x in flat]
  return Tree(tuple(p for p, _ in every),
              tuple((p, x) for p, x in every if not isinstance(x, optax.MaskedNode)))


def leaves(
    tree: Any,
    owner: Any,
    unmatched: Callable[[list[str]], list[str]],
    *,
    subject: str,
    fix: str,
) -> tuple[tuple[str, Any], ...]:
  """``(path, leaf)`` of the leaves of ``tree`` that get a decision, after the checks.

  :func:`read`, then ``unmatched(paths)``, given every path including those of
  ``optax.MaskedNode`` leaves, lists the rules that match nothing; a nonempty list is a
  ``ValueError`` (:func:`unmatched_error`).
  """
  read_tree = read(tree, owner)
  problems = unmatched(list(read_tree.paths)) if read_tree.paths else []
  if problems:
    raise unmatched_error(subject, problems, fix, grouped=read_tree.grouped)
  return read_tree.leaves


def unmatched_error(subject: str, problems: Sequence[str], fix: str, *,
                    grouped: bool = False) -> ValueError:
  """The error for rules that match no parameter: what, then how to fix it."""
  hint = f" {GROUPED_HINT}" if grouped else ""
  return ValueError(f"{subject}: " + "; ".join(problems) + f". {fix}{hint}")


def unflatten_like(tree: Any, values: list[Any]) -> Any:
  """A tree with the structure of ``tree`` (nnx Variables as leaves, MaskedNodes kept in
  place) whose other leaves are ``values``."""
  treedef = jax.tree_util.tree_structure(tree, is_leaf=_paths.is_variable)
  return jax.tree_util.tree_unflatten(treedef, values)


def regex(pattern: Any, who: str) -> str:
  """``pattern`` if it is a str that compiles as a regular expression, else the error."""
  if not isinstance(pattern, str):
    raise TypeError(f"{who}: a pattern is a regular expression (str), got {pattern!r}.")
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{who}: {pattern!r} is not a valid regular expression: {e}") from e
  return pattern


def patterns(value: Any, who: str, argument: str) -> tuple[Any, ...]:
  """A pattern list as a tuple: a bare ``str`` is *one* pattern, never its letters.

  ``value`` is a str, or a collection (list, tuple, set) of patterns, whose items the
  caller checks. Anything else (a predicate, a number, bytes, a dict) is a ``TypeError``
  naming the argument.
  """
  if isinstance(value, str):
    return (value,)
  if isinstance(value, Collection) and not isinstance(value, (bytes, Mapping)):
    return tuple(value)
  raise TypeError(
      f"{who}: {argument} takes a pattern (str) or a list of patterns, got {value!r}."
  )


def closest(pattern: str, paths: Sequence[str]) -> list[str]:
  """Up to three paths that look like ``pattern`` (for "matches no parameter" errors)."""
  lowered = {p.lower(): p for p in paths}
  parts = {c.lower(): p for p in paths for c in p.split("/")}
  hits = difflib.get_close_matches(pattern.lower(), list(parts), n=3, cutoff=0.5)
  found = [parts[h] for h in hits]
  hits = difflib.get_close_matches(pattern.lower(), list(lowered), n=3, cutoff=0.3)
  found += [lowered[h] for h in hits]
  return list(dict.fromkeys(found))[:3]
