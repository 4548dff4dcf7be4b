"""Resolving a mask: what every accepted mask form decides for each leaf, at trace time.

A mask is one of: ``None`` (every leaf), a :class:`~optax_decoupled.Predicate`, a pytree
of Python bools with the structure of the parameters, a function of the parameters
returning one (optax's convention), or :func:`~optax_decoupled.decay_multipliers` rules.
Every decay transform accepts all of them, through :func:`decisions` here: one decision per
leaf, with its multiplier of λ (1 or 0 for boolean masks) and the rule that decided.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import chex
import jax
import numpy as np
import optax

from optax_decoupled import _hyperparams, _multipliers, _paths, _predicates, _rules
from optax_decoupled._rules import Decision

__all__ = ["MaskLike", "decisions", "resolve_mask", "resolve_multipliers"]

#: What ``mask=`` accepts: None (every leaf), a predicate or ``decay_multipliers`` rules
#: (:class:`~optax_decoupled._hyperparams.MaskSpec`), a pytree of bools, or a function of the
#: parameters returning one.
MaskLike: TypeAlias = "None | _hyperparams.MaskSpec | chex.ArrayTree | Callable[[chex.ArrayTree], chex.ArrayTree]"


def _to_bool(x: Any, path: str) -> bool:
  x = _paths.leaf_value(x)  # nnx: a mask function of a State of Variables returns Variables.
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if _hyperparams.is_traced(x):
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


def _is_number(x: Any) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return False
  return isinstance(x, (int, float, complex, np.number)) or (
      hasattr(x, "dtype") and np.ndim(x) == 0 and not np.issubdtype(x.dtype, np.bool_)
  )


def _is_bool(x: Any) -> bool:
  x = _paths.leaf_value(x)
  return isinstance(x, (bool, np.bool_)) or _hyperparams.is_traced(x) or (
      np.ndim(x) == 0 and np.asarray(x).dtype == np.bool_)


def _check_mask_fn_result(fn: Any, result: Any) -> None:
  """A mask function must return bools: catch schedules and the like passed as masks."""
  leaves = jax.tree_util.tree_leaves(result, is_leaf=_paths.is_variable)
  bad = [x for x in leaves if not _is_bool(x)]
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


def _tree_decisions(params: Any, mask: Any) -> list[Decision]:
  """Decisions of a bool tree, or of a function of the params returning one."""
  leaves = _paths.leaves_with_paths(params)
  if getattr(mask, _hyperparams.MASK_FACTORY, False):
    example = "2" if mask.__name__ == "min_ndim" else repr("bias")
    raise TypeError(
        f"mask=od.{mask.__name__} is the predicate factory, not a predicate: call it, "
        f"e.g. mask=od.{mask.__name__}({example})."
    )
  if callable(mask):
    if _hyperparams.is_callable_pytree(mask):
      raise TypeError(
          f"mask={type(mask).__name__} is both callable and a pytree with leaves "
          "(an Equinox module?), so it is ambiguous. Pass a predicate, a plain "
          "function of the parameters, or a pytree of bools."
      )
    fn = mask
    try:
      mask = fn(params)
    except Exception as e:  # noqa: BLE001 - any failure: say what a mask function must be.
      name = getattr(fn, "__qualname__", type(fn).__name__)
      raise TypeError(
          f"mask={name} failed when called with the parameters ({type(e).__name__}: {e}). "
          "A mask function takes the parameter tree and returns a pytree of Python bools; "
          "schedules go to learning_rate= or weight_decay=. Pass a predicate such as "
          "od.exclude_names('bias') instead."
      ) from e
    _check_mask_fn_result(fn, mask)
  elif _is_number(mask):
    raise TypeError(
        f"mask={mask!r} is a number. A mask says which leaves decay (a predicate such "
        "as od.exclude_names('bias'), or a pytree of bools); the decay strength goes "
        "to weight_decay=."
    )
  # optax.MaskedNode leaves (inside optax.masked / multi_transform) are leaves here, so a
  # mask tree with the full parameters' structure fits, as optax's own masks do; their
  # entries are dropped below (they get no decision).
  flat_params, params_def = jax.tree_util.tree_flatten(params, is_leaf=_rules.is_leaf_or_masked)
  try:
    mask_leaves = params_def.flatten_up_to(mask)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as e:
    mask_def = jax.tree_util.tree_structure(mask, is_leaf=_paths.is_variable)
    raise ValueError(
        "The weight-decay mask does not have the structure of the parameters.\n"
        f"  parameters: {params_def}\n  mask:       {mask_def}\n"
        "Build the mask from the parameters, e.g. mask=od.exclude_names('bias')."
    ) from e
  mask_leaves = [m for x, m in zip(flat_params, mask_leaves)
                 if not isinstance(x, optax.MaskedNode)]
  return [
      Decision(_to_bool(m, p), "mask tree", path=p, leaf=x)
      for (p, x), m in zip(leaves, mask_leaves)
  ]


def decisions(params: chex.ArrayTree, mask: MaskLike, *, warn: bool = True) -> list[Decision]:
  """One :class:`Decision` per leaf of ``params`` (nnx Variables count as leaves).

  Validates ``mask`` (unmatched name rules, structure, leaf types) and, with ``warn``,
  warns for boolean masks that decay nothing or every leaf including 1-D ones.
  """
  if isinstance(params, _hyperparams.MaskSpec) or getattr(params, _hyperparams.MASK_FACTORY,
                                                          False):
    raise TypeError(
        f"The parameters are {params!r}, a mask: the arguments are (params, mask), e.g. "
        "od.resolve_mask(params, od.exclude_names('bias')) or od.describe_mask(params, mask)."
    )
  if mask is None:
    return [Decision(True, "mask=None: every leaf", path=p, leaf=x)
            for p, x in _paths.leaves_with_paths(params)]
  if isinstance(mask, _multipliers.DecayMultipliers):
    return mask.decisions(params)
  if isinstance(mask, _predicates.Predicate):
    out = mask.decisions(params)
  else:
    out = _tree_decisions(params, mask)
  if warn:
    _predicates.warn_if_degenerate(out)
  return out


def resolve_mask(params: chex.ArrayTree, mask: MaskLike) -> chex.ArrayTree:
  """The boolean mask tree of ``mask`` for ``params`` (Python bools).

  ``mask`` may be None (decay every leaf), a :class:`Predicate`, a pytree of
  bools with the structure of ``params``, a function of the parameters
  returning one (optax's convention), or :func:`decay_multipliers` rules
  (a leaf decays when its multiplier is nonzero). Raises ``ValueError`` for
  unmatched name rules and structure mismatches; warns for masks that decay
  nothing or every leaf including 1-D ones. The transforms resolve their mask
  at ``init`` and at ``update`` trace time; call this to see the mask a
  transform will use.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> od.resolve_mask(params, od.min_ndim(2))
    {'bias': False, 'kernel': True}
  """
  return _rules.unflatten_like(params, [d.decay for d in decisions(params, mask)])


def resolve_multipliers(params: chex.ArrayTree, mask: MaskLike) -> chex.ArrayTree:
  """The tree of Python-float multipliers of λ of ``mask`` (1.0/0.0 for boolean masks)."""
  return _rules.unflatten_like(params, [d.multiplier for d in decisions(params, mask)])
