"""Decay masks from parameter-name and shape predicates, resolved at trace time.

A predicate decides, for each leaf, from its path string (see ``_paths``) and
its shape, whether weight decay applies. Predicates are small frozen,
hashable, printable types (never bare lambdas, so they cannot be mistaken for
pytrees or schedules); they combine with ``&``, ``|`` and ``~``; and calling
one on a parameter tree returns the boolean mask tree optax expects, so a
predicate is accepted wherever optax takes a ``mask``.

Masks refuse to fail silently: a name pattern that matches no parameter is a
``ValueError`` (unless ``allow_unmatched=True``), and a mask that decays no
leaf, or every leaf including 1-D ones, warns.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import re
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from optax_decoupled import _paths

__all__ = [
  "BERT_EXCLUDE",
  "Decision",
  "Predicate",
  "exclude_names",
  "include_names",
  "min_ndim",
  "resolve_mask",
]


class Decision(NamedTuple):
  """What a predicate decided for one leaf, and which rule decided it."""

  decay: bool
  rule: str


def _ndim(leaf: Any) -> int:
  return int(np.ndim(_paths.leaf_value(leaf)))


class Predicate(abc.ABC):
  """Base class of decay predicates: ``decide(path, leaf) -> Decision``.

  Subclasses are frozen dataclasses. ``predicate(params)`` returns the mask
  tree (Python bools, same structure as ``params`` with nnx Variables counted
  as leaves), after checking that every name rule matched some leaf.
  """

  @abc.abstractmethod
  def decide(self, path: str, leaf: Any) -> Decision:
    """Whether the leaf at ``path`` is decayed, with the deciding rule."""

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    """Descriptions of the name rules of this predicate that match no path."""
    del paths
    return []

  def __call__(self, params: Any) -> Any:
    return resolve_mask(params, self)

  def __and__(self, other: Predicate) -> Predicate:
    return _AllOf(self, _check_predicate(other, "&"))

  def __or__(self, other: Predicate) -> Predicate:
    return _AnyOf(self, _check_predicate(other, "|"))

  def __invert__(self) -> Predicate:
    return _Not(self)


def _check_predicate(other: Any, op: str) -> Predicate:
  if not isinstance(other, Predicate):
    raise TypeError(
        f"Predicates combine with {op!r} only with other predicates, got "
        f"{type(other).__name__}. Build one with od.exclude_names, "
        "od.include_names or od.min_ndim."
    )
  return other


Rule = str | Sequence[str]


def _normalize_rules(patterns: Sequence[Rule], factory: str) -> tuple[tuple[str, ...], ...]:
  if not patterns:
    raise ValueError(f"{factory}() needs at least one pattern.")
  rules = []
  for p in patterns:
    alternatives = (p,) if isinstance(p, str) else tuple(p)
    if not alternatives or not all(isinstance(a, str) for a in alternatives):
      raise TypeError(
          f"{factory}() takes regular expressions (str), or tuples of str "
          f"that are alternative spellings of one rule; got {p!r}."
      )
    for a in alternatives:
      try:
        re.compile(a)
      except re.error as e:
        raise ValueError(f"{factory}(): {a!r} is not a valid regular expression: {e}") from e
    rules.append(alternatives)
  return tuple(rules)


def _rule_str(alternatives: tuple[str, ...]) -> str:
  return repr(alternatives[0]) if len(alternatives) == 1 else repr(alternatives)


def _closest(pattern: str, paths: Sequence[str]) -> list[str]:
  lowered = {p.lower(): p for p in paths}
  parts = {c.lower(): p for p in paths for c in p.split("/")}
  hits = difflib.get_close_matches(pattern.lower(), list(parts), n=3, cutoff=0.5)
  found = [parts[h] for h in hits]
  hits = difflib.get_close_matches(pattern.lower(), list(lowered), n=3, cutoff=0.3)
  found += [lowered[h] for h in hits]
  return list(dict.fromkeys(found))[:3]


@dataclasses.dataclass(frozen=True)
class _NameRules(Predicate):
  rules: tuple[tuple[str, ...], ...]
  allow_unmatched: bool = False

  def _matching_rule(self, path: str) -> tuple[str, ...] | None:
    for alternatives in self.rules:
      if any(re.search(a, path) for a in alternatives):
        return alternatives
    return None

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    if self.allow_unmatched:
      return []
    out = []
    for alternatives in self.rules:
      if not any(re.search(a, p) for a in alternatives for p in paths):
        close = [c for a in alternatives for c in _closest(a, paths)]
        hint = f" Closest paths: {close[:3]}." if close else ""
        out.append(f"pattern {_rule_str(alternatives)} of {self!r} matches no parameter.{hint}")
    return out

  def _args(self) -> str:
    args = [_rule_str(r) for r in self.rules]
    if self.allow_unmatched:
      args.append("allow_unmatched=True")
    return ", ".join(args)


class _ExcludeNames(_NameRules):

  def decide(self, path: str, leaf: Any) -> Decision:
    rule = self._matching_rule(path)
    if rule is None:
      return Decision(True, "no exclude pattern matched")
    return Decision(False, f"excluded by {_rule_str(rule)}")

  def __repr__(self) -> str:
    return f"exclude_names({self._args()})"


class _IncludeNames(_NameRules):

  def decide(self, path: str, leaf: Any) -> Decision:
    rule = self._matching_rule(path)
    if rule is None:
      return Decision(False, "no include pattern matched")
    return Decision(True, f"included by {_rule_str(rule)}")

  def __repr__(self) -> str:
    return f"include_names({self._args()})"


def exclude_names(*patterns: Rule, allow_unmatched: bool = False) -> Predicate:
  """Decay every leaf whose path matches none of ``patterns`` (BERT's rule).

  Each pattern is a regular expression searched (``re.search``, as BERT's
  ``_do_use_weight_decay``) in the leaf's path joined with ``"/"``, e.g.
  ``encoder/layer_0/LayerNorm_0/scale``. A pattern may be a tuple of
  alternative spellings of one rule, e.g. ``("LayerNorm", "layer_norm")``:
  the rule counts as matched when any spelling matches.

  Args:
    *patterns: regular expressions, or tuples of alternative spellings.
    allow_unmatched: if False (default), a rule that matches no leaf of the
      parameter tree raises ``ValueError`` naming the pattern and the closest
      paths, when the mask is resolved (at ``init``/``update`` trace time).

  Returns:
    A :class:`Predicate`; ``predicate(params)`` is the boolean mask tree.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> od.exclude_names("bias")(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  return _ExcludeNames(_normalize_rules(patterns, "exclude_names"), allow_unmatched)


def include_names(*patterns: Rule, allow_unmatched: bool = False) -> Predicate:
  """Decay only the leaves whose path matches one of ``patterns``.

  Same pattern semantics and unmatched-pattern check as :func:`exclude_names`.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> od.include_names("kernel$")(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  return _IncludeNames(_normalize_rules(patterns, "include_names"), allow_unmatched)


@dataclasses.dataclass(frozen=True)
class _MinNdim(Predicate):
  n: int

  def decide(self, path: str, leaf: Any) -> Decision:
    nd = _ndim(leaf)
    if nd >= self.n:
      return Decision(True, f"ndim {nd} >= {self.n}")
    return Decision(False, f"ndim {nd} < {self.n}")

  def __repr__(self) -> str:
    return f"min_ndim({self.n})"


def min_ndim(n: int) -> Predicate:
  """Decay only tensors with at least ``n`` dimensions (the nanoGPT/timm rule).

  Beware stacked or scanned layers: a stacked LayerNorm scale is 2-D. Combine
  with a name rule, e.g. ``od.min_ndim(2) & od.exclude_names("scale")``.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> od.min_ndim(2)({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
    {'b': False, 'w': True}
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"min_ndim(n) needs a non-negative int, got {n!r}.")
  return _MinNdim(int(n))


@dataclasses.dataclass(frozen=True)
class _AllOf(Predicate):
  left: Predicate
  right: Predicate

  def decide(self, path: str, leaf: Any) -> Decision:
    d = self.left.decide(path, leaf)
    return d if not d.decay else self.right.decide(path, leaf)

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    return self.left.unmatched(paths) + self.right.unmatched(paths)

  def __repr__(self) -> str:
    return f"({self.left!r} & {self.right!r})"


@dataclasses.dataclass(frozen=True)
class _AnyOf(Predicate):
  left: Predicate
  right: Predicate

  def decide(self, path: str, leaf: Any) -> Decision:
    d = self.left.decide(path, leaf)
    return d if d.decay else self.right.decide(path, leaf)

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    return self.left.unmatched(paths) + self.right.unmatched(paths)

  def __repr__(self) -> str:
    return f"({self.left!r} | {self.right!r})"


@dataclasses.dataclass(frozen=True)
class _Not(Predicate):
  inner: Predicate

  def decide(self, path: str, leaf: Any) -> Decision:
    d = self.inner.decide(path, leaf)
    return Decision(not d.decay, f"not ({d.rule})")

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    return self.inner.unmatched(paths)

  def __repr__(self) -> str:
    return f"~{self.inner!r}"


#: BERT's exclude list (google-research/bert optimization.py), with its two
#: spellings of the norm rule grouped as one rule so that a model using either
#: spelling satisfies the unmatched-pattern check.
BERT_EXCLUDE: tuple[Rule, ...] = (("LayerNorm", "layer_norm"), "bias")


def _to_bool(x: Any, path: str) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, jax.core.Tracer):
    raise TypeError(
        f"The mask leaf at {path!r} is a traced value. Masks are resolved at trace "
        "time: give Python bools, a predicate (od.exclude_names, ...) or a function "
        "of the parameters that returns Python bools."
    )
  if np.ndim(x) == 0 and np.asarray(x).dtype == np.bool_:
    return bool(x)
  raise TypeError(
      f"The mask leaf at {path!r} is {x!r}; a mask leaf must be a Python bool "
      "(True = apply weight decay)."
  )


def is_callable_pytree(x: Any) -> bool:
  """True for callables that are also pytree nodes with leaves (Equinox modules, ...).

  A plain function is a pytree *leaf* (``tree_leaves(f) == [f]``), so it is not
  one of these; a callable object whose flattening yields children is.
  """
  if not callable(x):
    return False
  treedef = jax.tree_util.tree_structure(x)
  return not jax.tree_util.treedef_is_leaf(treedef) and treedef.num_leaves > 0


def is_predicate_factory(x: Any) -> bool:
  """True for the uncalled factories ``od.exclude_names`` & co. (a common slip)."""
  return x is exclude_names or x is include_names or x is min_ndim


def _is_number(x: Any) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return False
  return isinstance(x, (int, float, complex, np.number)) or (
      hasattr(x, "dtype") and np.ndim(x) == 0 and not np.issubdtype(x.dtype, np.bool_)
  )


def _check_mask_fn_result(fn: Any, result: Any) -> None:
  """A mask function must return bools: catch schedules and the like passed as masks."""
  leaves = jax.tree_util.tree_leaves(result)
  bad = [
      x for x in leaves
      if not isinstance(x, (bool, np.bool_, jax.core.Tracer))  # tracers: see _to_bool.
      and not (np.ndim(x) == 0 and np.asarray(x).dtype == np.bool_)
  ]
  if not leaves or not bad:
    return
  name = getattr(fn, "__qualname__", type(fn).__name__)
  looks_like_schedule = "schedule" in name or (len(leaves) == 1 and _is_number(leaves[0]))
  hint = (
      " It looks like a schedule: schedules go to learning_rate= or weight_decay=."
      if looks_like_schedule else ""
  )
  raise TypeError(
      f"mask={name} returned {bad[0]!r} where a mask function must return a pytree of "
      "Python bools with the structure of the parameters (True = apply weight decay)."
      f"{hint} Pass a predicate such as od.exclude_names('bias') instead."
  )


def _decisions(params: Any, mask: Any) -> list[tuple[str, Any, Decision]]:
  """(path, leaf, decision) for every leaf of ``params``; validates ``mask``."""
  leaves = _paths.leaves_with_paths(params)
  if mask is None:
    return [(p, x, Decision(True, "mask=None: every leaf")) for p, x in leaves]
  if isinstance(mask, Predicate):
    problems = mask.unmatched([p for p, _ in leaves]) if leaves else []
    if problems:
      raise ValueError(
          "Weight-decay mask " + "; ".join(problems) + " Fix the pattern, or pass "
          "allow_unmatched=True to the predicate if it may legitimately match nothing."
      )
    return [(p, x, mask.decide(p, x)) for p, x in leaves]
  if is_predicate_factory(mask):
    raise TypeError(
        f"mask=od.{mask.__name__} is the predicate factory, not a predicate: call it, "
        f"e.g. mask=od.{mask.__name__}({'2' if mask is min_ndim else repr('bias')})."
    )
  if callable(mask):
    if is_callable_pytree(mask):
      raise TypeError(
          f"mask={type(mask).__name__} is both callable and a pytree with leaves "
          "(an Equinox module?), so it is ambiguous. Pass a predicate, a plain "
          "function of the parameters, or a pytree of bools."
      )
    fn, mask = mask, mask(params)
    _check_mask_fn_result(fn, mask)
  elif _is_number(mask):
    raise TypeError(
        f"mask={mask!r} is a number. A mask says which leaves decay (a predicate such "
        "as od.exclude_names('bias'), or a pytree of bools); the decay strength goes "
        "to weight_decay=."
    )
  mask_leaves, mask_def = jax.tree_util.tree_flatten(mask)
  params_def = jax.tree_util.tree_structure(params, is_leaf=_paths.is_variable)
  if mask_def.num_leaves != params_def.num_leaves or mask_def != params_def:
    try:
      params_def.flatten_up_to(mask)  # allows e.g. FrozenDict vs dict
      mask_leaves = params_def.flatten_up_to(mask)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "The weight-decay mask does not have the structure of the parameters.\n"
          f"  parameters: {params_def}\n  mask:       {mask_def}\n"
          "Build the mask from the parameters, e.g. mask=od.exclude_names('bias')."
      ) from e
  return [
      (p, x, Decision(_to_bool(m, p), "mask tree"))
      for (p, x), m in zip(leaves, mask_leaves)
  ]


def _warn_if_degenerate(decisions: list[tuple[str, Any, Decision]]) -> None:
  if not decisions:
    return
  decayed = [d.decay for _, _, d in decisions]
  if not any(decayed):
    warnings.warn(
        "The weight-decay mask decays no parameter: weight decay has no effect. "
        "Check the mask's patterns against od.describe_mask(params, mask).",
        UserWarning,
        stacklevel=4,
    )
  elif all(decayed) and any(_ndim(x) <= 1 for _, x, _ in decisions):
    warnings.warn(
        "The weight-decay mask decays every parameter, including 1-D ones (biases, "
        "norm scales). If that is intended, pass mask=None.",
        UserWarning,
        stacklevel=4,
    )


def resolve_mask(params: Any, mask: Any) -> Any:
  """The boolean mask tree of ``mask`` for ``params`` (Python bools).

  ``mask`` may be None (decay every leaf), a :class:`Predicate`, a pytree of
  bools with the structure of ``params``, or a function of the parameters
  returning one (optax's convention). Raises ``ValueError`` for unmatched name
  rules and structure mismatches; warns for masks that decay nothing or every
  leaf including 1-D ones. The transforms call it at ``init`` and at ``update``
  trace time; call it yourself to see the mask a transform will use.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> od.resolve_mask(params, od.min_ndim(2))
    {'bias': False, 'kernel': True}
  """
  decisions = _decisions(params, mask)
  if mask is not None:
    _warn_if_degenerate(decisions)
  treedef = jax.tree_util.tree_structure(params, is_leaf=_paths.is_variable)
  return jax.tree_util.tree_unflatten(treedef, [d.decay for _, _, d in decisions])
