"""Parameter-name and shape predicates: which leaves decay, decided from path and shape.

A predicate decides, for each leaf, from its path string (see ``_paths``) and
its shape, whether weight decay applies. Predicates are small frozen,
hashable, printable types (never bare lambdas, so they cannot be mistaken for
pytrees or schedules); they combine with ``&``, ``|`` and ``~``; and calling
one on a parameter tree returns the boolean mask tree optax expects, so a
predicate is accepted wherever optax takes a ``mask``.

Predicates refuse to fail silently: a name pattern that matches no parameter is a
``ValueError`` (unless ``allow_unmatched=True``), and a mask that decays no
leaf, or every leaf including 1-D ones, warns.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_decoupled import _hyperparams, _paths, _rules
from optax_decoupled._rules import Decision

__all__ = [
  "BERT_EXCLUDE",
  "Decision",
  "Predicate",
  "exclude_names",
  "include_names",
  "min_ndim",
]


def _ndim(leaf: Any) -> int:
  return int(np.ndim(_paths.leaf_value(leaf)))


class Predicate(_hyperparams.MaskSpec, abc.ABC):
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
    decisions = self.decisions(params)
    warn_if_degenerate(decisions)
    return _rules.unflatten_like(params, [d.decay for d in decisions])

  def decisions(self, params: Any) -> list[Decision]:
    """One :class:`Decision` per leaf of ``params``, after the unmatched-rule check.

    Leaves that are ``optax.MaskedNode`` (this transform runs inside ``optax.masked`` or
    ``optax.multi_transform`` and sees only its group) count for the unmatched check, so a
    rule that matches a leaf of another group is not reported as a typo; they get no
    decision.
    """
    leaves = _rules.leaves(params, self, self.unmatched, subject="Weight-decay mask",
                           fix=UNMATCHED_FIX)
    return [self.decide(p, x).at(p, x) for p, x in leaves]

  def __and__(self, other: Predicate) -> Predicate:
    return _AllOf(self, _check_predicate(other, "&"))

  def __or__(self, other: Predicate) -> Predicate:
    return _AnyOf(self, _check_predicate(other, "|"))

  def __invert__(self) -> Predicate:
    return _Not(self)


#: How to fix a predicate's name rule that matches no parameter.
UNMATCHED_FIX = ("Fix the pattern, or pass allow_unmatched=True to the predicate if it may "
                 "legitimately match nothing.")


def warn_if_degenerate(decisions: Sequence[Decision]) -> None:
  """Warns for a mask that decays no leaf, or every leaf including 1-D ones."""
  if not decisions:
    return
  decayed = [d.decay for d in decisions]
  if not any(decayed):
    warnings.warn(
        "The weight-decay mask decays no parameter: weight decay has no effect. "
        "Check the mask's patterns against od.describe_mask(params, mask).",
        UserWarning,
        stacklevel=4,
    )
  elif all(decayed) and any(_ndim(d.leaf) <= 1 for d in decisions):
    warnings.warn(
        "The weight-decay mask decays every parameter, including 1-D ones (biases, "
        "norm scales). If that is intended, pass mask=None.",
        UserWarning,
        stacklevel=4,
    )


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
    try:
      alternatives = tuple(_rules.regex(a, f"{factory}()")
                           for a in _rules.patterns(p, f"{factory}()", "a rule"))
    except TypeError:
      alternatives = ()
    if not alternatives:
      raise TypeError(
          f"{factory}() takes regular expressions (str), or tuples of str "
          f"that are alternative spellings of one rule; got {p!r}."
      )
    for a in alternatives:
      if _matches_every_path(a):
        raise ValueError(
            f"{factory}(): the pattern {a!r} matches every path (re.search finds it in "
            "any string, as it matches the empty string), so it would decide every leaf "
            "alike. Name what it should match, e.g. 'bias'; to decay every leaf pass "
            "mask=None."
        )
    rules.append(alternatives)
  return tuple(rules)


def _matches_every_path(pattern: str) -> bool:
  """``re.search(pattern, path)`` succeeds for any path: '' , 'x*', 'bias|', '(?i)'.

  Such a pattern matches the empty string at the start of any text; '^$' (a root leaf's
  empty path only) does not.
  """
  return re.match(pattern, "") is not None and re.match(pattern, "\x00") is not None


def _rule_str(alternatives: tuple[str, ...]) -> str:
  return repr(alternatives[0]) if len(alternatives) == 1 else repr(alternatives)


@dataclasses.dataclass(frozen=True)
class _NameRules(Predicate):
  """Decay where no rule matches (``include=False``), or only where one does."""

  rules: tuple[tuple[str, ...], ...]
  allow_unmatched: bool = False
  include: bool = False

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
        close = list(dict.fromkeys(c for a in alternatives for c in _rules.closest(a, paths)))
        hint = f". Closest paths: {close[:3]}" if close else ""
        out.append(f"pattern {_rule_str(alternatives)} of {self!r} matches no parameter{hint}")
    return out

  def decide(self, path: str, leaf: Any) -> Decision:
    rule = self._matching_rule(path)
    kind = "include" if self.include else "exclude"
    if rule is None:
      return Decision(not self.include, f"no {kind} pattern matched")
    return Decision(self.include, f"{kind}d by {_rule_str(rule)}")

  def __repr__(self) -> str:
    args = [_rule_str(r) for r in self.rules]
    if self.allow_unmatched:
      args.append("allow_unmatched=True")
    return f"{'include' if self.include else 'exclude'}_names({', '.join(args)})"


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
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", "exclude_names")
  return _NameRules(_normalize_rules(patterns, "exclude_names"), bool(allow_unmatched))


setattr(exclude_names, _hyperparams.MASK_FACTORY, True)


def include_names(*patterns: Rule, allow_unmatched: bool = False) -> Predicate:
  """Decay only the leaves whose path matches one of ``patterns``.

  Same pattern semantics and unmatched-pattern check as :func:`exclude_names`.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> od.include_names("kernel$")(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", "include_names")
  return _NameRules(_normalize_rules(patterns, "include_names"), bool(allow_unmatched),
                    include=True)


setattr(include_names, _hyperparams.MASK_FACTORY, True)


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


setattr(min_ndim, _hyperparams.MASK_FACTORY, True)


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
