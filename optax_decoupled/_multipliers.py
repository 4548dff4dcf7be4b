"""Per-parameter weight-decay multipliers from regex rules (big_vision's ``wd_mults``).

A rule set maps each leaf's path to a multiplier of λ: the first rule whose
regular expression *fully* matches the path wins (``re.fullmatch``, as
big_vision's ``make_mask_trees``), and leaves no rule matches get the explicit
``default``. A multiplier of 0 means "not decayed".

A rule set is deliberately *not* callable, not a pytree and refuses ``bool()``:
passed to a transform that only understands boolean masks (``optax.adamw``,
``od.add_decoupled_decay``) it fails with an error instead of being silently
read as "decay everything".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from optax_decoupled import _hyperparams, _rules

__all__ = ["DecayMultipliers", "LrMultipliers", "decay_multipliers", "parse"]


@dataclasses.dataclass(frozen=True)
class _FullMatchRules:
  """Regex → multiplier rules, first full match (``re.fullmatch``) wins, else ``default``."""

  rules: tuple[tuple[str, float], ...]
  default: float
  allow_unmatched: bool = False

  #: The public factory, for ``repr`` and errors.
  factory: ClassVar[str] = ""

  def decide(self, path: str) -> _rules.Decision:
    """The multiplier of the leaf at ``path`` and the rule that gave it."""
    for pattern, mult in self.rules:
      if re.fullmatch(pattern, path):
        return _rules.Decision.weighted_by(mult, f"{pattern!r} -> x{mult:g}")
    return _rules.Decision.weighted_by(self.default, f"default -> x{self.default:g}")

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    """Rules that decide no leaf (match nothing, or only leaves an earlier rule took)."""
    if self.allow_unmatched:
      return []
    out = []
    for k, (pattern, _) in enumerate(self.rules):
      hits = [p for p in paths if re.fullmatch(pattern, p)]
      if not hits:
        out.append(f"rule {pattern!r} fully matches no parameter path (e.g. {paths[0]!r})")
      elif all(any(re.fullmatch(q, p) for q, _ in self.rules[:k]) for p in hits):
        out.append(f"rule {pattern!r} only matches paths an earlier rule already decides")
    return out

  def decisions(self, params: Any) -> list[_rules.Decision]:
    """One weighted :class:`Decision` per leaf; raises for unmatched rules."""
    leaves = _rules.leaves(
        params, self, self.unmatched, subject=repr(self),
        fix="Fix the rule, or pass allow_unmatched=True. Paths are matched whole "
            "(re.fullmatch), as od.describe_mask(params) lists them.")
    return [self.decide(p).at(p, x) for p, x in leaves]

  def __repr__(self) -> str:
    rules = ", ".join(f"({p!r}, {m:g})" for p, m in self.rules)
    extra = ", allow_unmatched=True" if self.allow_unmatched else ""
    return f"{self.factory}([{rules}], default={self.default:g}{extra})"


@dataclasses.dataclass(frozen=True, repr=False)
class DecayMultipliers(_FullMatchRules, _hyperparams.MaskSpec):
  """Regex → multiplier of λ rules, first full match wins; see :func:`decay_multipliers`."""

  factory: ClassVar[str] = "decay_multipliers"

  def __bool__(self) -> bool:
    # optax.masked / optax.adamw(mask=...) would read a non-callable mask object as
    # one truthy leaf and decay every parameter with multiplier 1: refuse instead.
    raise TypeError(
        f"{self!r} is a set of per-parameter decay multipliers, not a boolean mask: "
        "optax.masked and optax's mask= arguments cannot use it. Pass it as mask= to "
        "any od transform or alias, or use "
        "mults.resolve(params) to get the multiplier tree."
    )

  def resolve(self, params: Any) -> Any:
    """The tree of Python-float multipliers for ``params`` (nnx Variables are leaves)."""
    return _rules.unflatten_like(params, [d.multiplier for d in self.decisions(params)])


@dataclasses.dataclass(frozen=True, repr=False)
class LrMultipliers(_FullMatchRules):
  """Regex → learning-rate multiplier rules of :func:`scale_by_lr_multipliers`."""

  factory: ClassVar[str] = "scale_by_lr_multipliers"


def parse(cls: type[_FullMatchRules], rules: Any, default: Any, allow_unmatched: Any) -> Any:
  """``cls`` from user rules ``[(regex, multiplier), ...]``, each checked, named as
  ``cls.factory`` in the errors."""
  who = cls.factory
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(f"{who}: rules must be a list of (regex, multiplier) pairs, got {rules!r}.")
  if (len(rules) == 2 and isinstance(rules[0], str)
      and not isinstance(rules[1], (str, tuple, list))):
    raise TypeError(f"{who}: rules must be a list of (regex, multiplier) pairs, got the one "
                    f"pair {tuple(rules)!r}: write [{tuple(rules)!r}].")
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise TypeError(f"{who}: each rule is a (regex, multiplier) pair, got {rule!r}.")
    pattern, mult = rule
    out.append((_rules.regex(pattern, who), _check_mult(mult, f"{who}: multiplier of {pattern!r}")))
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", who)
  return cls(tuple(out), _check_mult(default, f"{who}: default"), bool(allow_unmatched))


def decay_multipliers(
    rules: Sequence[tuple[str, float]], *, default: float, allow_unmatched: bool = False
) -> DecayMultipliers:
  r"""Per-parameter multipliers of λ from regex rules, first full match wins.

  The decay term of a leaf becomes :math:`\text{mult}(path)\cdot c_t\,\theta`.
  Paths are the library's ``a/b/c`` strings; patterns are matched with
  ``re.fullmatch`` (big_vision's semantics; note that :func:`exclude_names`
  uses ``re.search``). ``default`` is required: big_vision's implicit default
  is 0 (no decay) for leaves that no rule matches. Accepted as ``mask=`` by
  every decay transform and alias of this package (``add_l2_to_grad``,
  ``add_decoupled_decay``, ``with_decoupled_decay``, ``with_decay_toward``,
  ``od.adamw``, ...), and reported (multiplier column) by :func:`describe_mask`.
  Decay convention: that of the transform it is given to.

  A rule that fully matches no path, or only paths an earlier rule already
  decides, is a ``ValueError`` when the multipliers are resolved (at ``init``
  and at trace time), unless ``allow_unmatched=True``.

  Args:
    rules: ``[(regex, multiplier), ...]``; multipliers finite and >= 0.
    default: the multiplier of leaves no rule matches (0 = no decay).
    allow_unmatched: turn the unmatched-rule check off.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> mults = od.decay_multipliers([(".*head/kernel", 2.0), (".*/kernel", 1.0)], default=0.0)
    >>> params = {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...           "body": {"kernel": jnp.ones((2, 2))}}
    >>> mults.resolve(params)
    {'body': {'kernel': 1.0}, 'head': {'bias': 0.0, 'kernel': 2.0}}

  References:
    google-research/big_vision, big_vision/optax.py (``config.wd_mults``,
    default ``[(".*/kernel$", 1.0)]``) and big_vision/utils.py
    (``make_mask_trees``: first ``fullmatch`` wins).
  """
  return parse(DecayMultipliers, rules, default, allow_unmatched)


def _check_mult(x: Any, what: str) -> float:
  _hyperparams.check_number(x, "multiplier", what)
  return float(x)
