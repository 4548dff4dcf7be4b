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
from typing import Any

import jax

from optax_decoupled import _hyperparams, _paths

__all__ = ["DecayMultipliers", "decay_multipliers"]


@dataclasses.dataclass(frozen=True)
class DecayMultipliers(_hyperparams.MaskSpec):
  """Regex → multiplier rules, first full match wins; see :func:`decay_multipliers`."""

  rules: tuple[tuple[str, float], ...]
  default: float
  allow_unmatched: bool = False

  def decide(self, path: str) -> tuple[float, str]:
    """The multiplier of the leaf at ``path`` and the rule that gave it."""
    for pattern, mult in self.rules:
      if re.fullmatch(pattern, path):
        return mult, f"{pattern!r} -> x{mult:g}"
    return self.default, f"default -> x{self.default:g}"

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    """Rules that decide no leaf (match nothing, or only leaves an earlier rule took)."""
    if self.allow_unmatched:
      return []
    out = []
    for k, (pattern, _) in enumerate(self.rules):
      hits = [p for p in paths if re.fullmatch(pattern, p)]
      if not hits:
        out.append(f"rule {pattern!r} fully matches no parameter path (e.g. {paths[0]!r})"
                   if paths else f"rule {pattern!r} matches no parameter")
      elif all(any(re.fullmatch(q, p) for q, _ in self.rules[:k]) for p in hits):
        out.append(f"rule {pattern!r} only matches paths an earlier rule already decides")
    return out

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
    treedef = jax.tree_util.tree_structure(params, is_leaf=_paths.is_variable)
    return jax.tree_util.tree_unflatten(treedef, [m for _, _, m, _ in self.decisions(params)])

  def decisions(self, params: Any) -> list[tuple[str, Any, float, str]]:
    """``(path, leaf, multiplier, rule)`` per leaf; raises for unmatched rules."""
    leaves = _paths.leaves_with_paths(params)
    problems = self.unmatched([p for p, _ in leaves]) if leaves else []
    if problems:
      raise ValueError(
          f"Weight-decay multipliers {self!r}: " + "; ".join(problems) + ". Fix the rule, or "
          "pass allow_unmatched=True. Paths are matched whole (re.fullmatch); "
          "od.describe_mask(params, mults) lists them."
      )
    return [(p, x, *self.decide(p)) for p, x in leaves]

  def __repr__(self) -> str:
    rules = ", ".join(f"({p!r}, {m:g})" for p, m in self.rules)
    extra = ", allow_unmatched=True" if self.allow_unmatched else ""
    return f"decay_multipliers([{rules}], default={self.default:g}{extra})"


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
  who = "decay_multipliers"
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(f"{who}: rules must be a list of (regex, multiplier) pairs, got {rules!r}.")
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise TypeError(f"{who}: each rule is a (regex, multiplier) pair, got {rule!r}.")
    pattern, mult = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{who}: {pattern!r} is not a valid regular expression: {e}") from e
    out.append((pattern, _check_mult(mult, f"{who}: multiplier of {pattern!r}")))
  return DecayMultipliers(tuple(out), _check_mult(default, f"{who}: default"), allow_unmatched)


def _check_mult(x: Any, what: str) -> float:
  _hyperparams.check_number(x, "multiplier", what)
  return float(x)
