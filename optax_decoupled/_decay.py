"""The one decay builder: every decay term of this package is computed here.

Leaf rule, on the leaves the mask selects:

.. math:: \\text{term} = c_t\\cdot\\text{mult}\\cdot(\\theta - \\theta_{ref})

added to the incoming update (``sign=+1``: coupled L2 before a preconditioner, or
lr-coupled decoupled decay before ``scale_by_learning_rate``) or subtracted from a finished
update (``sign=-1``: decay after a complete optimizer). ``θ_ref`` is 0 unless a reference is
held in the state (L2-SP). With ``cautious=True`` the term is kept only where the update
direction agrees in sign with θ (Chen et al. 2025).

One rule for a constant c = 0: no term is added at all (as torch's ``if weight_decay != 0``),
so the chain is exactly the undecayed optimizer, also for -0.0 updates and non-finite θ.

The builder does not validate its arguments: the public entry points do (``_hyperparams``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _hyperparams, _masks, _paths, _rules

__all__ = ["DecayTowardState", "DecoupledDecayState", "WeightDecayState", "decay"]


class WeightDecayState(NamedTuple):
  """State of :func:`add_l2_to_grad` and :func:`add_decoupled_decay`.

  The same type whether ``weight_decay`` is a constant or a schedule. The step counter is
  called ``decay_count``, not ``count``, so that ``optax.tree_utils.tree_get(state,
  "count")`` finds the one step count of ``od.adamw``'s state, as on ``optax.adamw``'s.
  """

  decay_count: chex.Array  # shape=(), dtype=jnp.int32; steps taken, for λ schedules.


class DecoupledDecayState(NamedTuple):
  """State of the decay step appended by :func:`with_decoupled_decay`."""

  decay_count: chex.Array  # shape=(), dtype=jnp.int32; steps taken, for λ schedules.


class DecayTowardState(NamedTuple):
  """State of the decay step appended by :func:`with_decay_toward`."""

  decay_count: chex.Array  # shape=(), dtype=jnp.int32; steps taken, for λ schedules.
  reference: Any  # the params' tree structure; θ_ref on decayed leaves, None elsewhere.


def _check_decayed_dtypes(decisions: list[_rules.Decision], who: str, cautious: bool) -> None:
  """Decay is defined for floating and complex leaves only: refuse int/bool leaves it selects.

  Complex leaves decay as real ones do (λθ, optax's convention); cautious decay compares
  signs, which complex numbers do not have, so it refuses them.
  """
  for d in decisions:
    dtype = _paths.leaf_dtype(d.leaf)
    if d.decay and cautious and jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(
          f"{who}: cautious decay keeps the term where the update and θ agree in sign, which "
          f"complex numbers do not have, and the leaf {d.path!r} is {dtype}. Use "
          "cautious=False, or exclude complex leaves from the mask."
      )
    if d.decay and not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{who}: weight decay applies to floating-point parameters only, but the leaf "
          f"{d.path!r} has dtype {dtype} and the mask decays it. Exclude it from the mask "
          f"(e.g. mask=od.exclude_names({d.path.split('/')[-1]!r}) or od.include_names(...)), "
          "or keep integer/bool state out of the tree given to the optimizer."
      )


def multipliers(params: Any, mask: Any, who: str, cautious: bool = False) -> list[float]:
  """The multiplier of λ per leaf of ``params`` (flattening order), dtypes checked."""
  decisions = _masks.decisions(params, mask)
  _check_decayed_dtypes(decisions, who, cautious)
  return [d.multiplier for d in decisions]


def _same_shape(who: str, what: str, x: Any, param: Any, fix: str) -> None:
  """Refuse ``x`` (a leaf of the updates or of θ_ref) whose shape is not its parameter's."""
  shape, expected = np.shape(x), np.shape(_paths.leaf_value(param))
  if shape != expected:
    raise ValueError(f"{who}: {what} has shape {shape}, the parameter {expected}. {fix}")


def _reference(params: Any, reference: Any, mults: list[float], who: str) -> Any:
  """θ_ref, stored for the decayed leaves only (None elsewhere)."""
  # optax.MaskedNode leaves (inside optax.masked / multi_transform) are leaves here, so a
  # reference with the full parameters' structure fits; they stay MaskedNodes in the state.
  flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=_rules.is_leaf_or_masked)
  source = params if reference is None else reference
  try:
    refs = treedef.flatten_up_to(source)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as e:
    raise ValueError(f"{who}: reference and params have different tree structures: {e}") from e
  masked = [isinstance(x, optax.MaskedNode) for x in flat]
  refs = [r for r, m in zip(refs, masked) if not m]
  out: list[Any] = []
  for (path, p), r, mult in zip(_paths.leaves_with_paths(params), refs, mults):
    if not mult:
      out.append(None)
      continue
    r = _paths.leaf_value(r)
    _same_shape(who, f"the reference leaf {path!r}", r, p,
                "Give θ_ref with the parameters' shapes (broadcasting is not applied).")
    out.append(jnp.array(r, dtype=_paths.leaf_dtype(p), copy=True))
  values = iter(out)
  return treedef.unflatten([x if m else next(values)  # type: ignore[attr-defined]
                            for x, m in zip(flat, masked)])


def decay(
    weight_decay: Any,
    mask: Any,
    *,
    who: str,
    sign: int,
    state: type,
    cautious: bool = False,
    toward: bool = False,
    reference: Any = None,
) -> optax.GradientTransformation:
  """``u ← u + sign·c_t·mult·(θ − θ_ref)`` on the leaves ``mask`` selects.

  Args:
    weight_decay: c_t, a number, array, tracer or schedule (validated by the caller).
    mask: any mask form (see ``_masks``).
    who: the public name, for error messages.
    sign: +1 (add to the incoming update) or -1 (subtract from a finished update).
    state: the state NamedTuple (``decay_count``; ``reference`` too with ``toward``).
    cautious: keep the term only where the update direction agrees in sign with θ.
    toward: hold θ_ref in the state: ``reference``, or the params given to ``init``.
    reference: θ_ref (a tree like the params) when ``toward``; None means θ at init.
  """
  zero = _hyperparams.constant(weight_decay) == 0.0

  def init_fn(params):
    mults = multipliers(params, mask, who, cautious)  # a bad mask fails at init, not mid-run.
    count = jnp.zeros([], jnp.int32)
    if not toward:
      return state(decay_count=count)
    return state(decay_count=count, reference=_reference(params, reference, mults, who))

  def update_fn(updates, opt_state, params=None):
    if params is None:
      raise ValueError(f"{who} needs the parameters: call tx.update(updates, state, params).")
    if not isinstance(opt_state, state):
      raise TypeError(
          f"{who}: the state is {type(opt_state).__name__}, not the {state.__name__} this "
          "transform's init returns: it was made by another optimizer or another part of the "
          "chain. Pass the state returned by tx.init(params) of this same tx."
      )
    mults = multipliers(params, mask, who, cautious)
    c = _hyperparams.value_at(weight_decay, opt_state.decay_count)
    treedef = jax.tree_util.tree_structure(params, is_leaf=_paths.is_variable)
    mults = treedef.unflatten(mults)
    refs = opt_state.reference if toward else treedef.unflatten([None] * treedef.num_leaves)

    def leaf(keypath, u, p, mult, ref):
      if u is None or not mult or zero:
        return u
      value = _paths.leaf_value(u)
      # c·θ would broadcast into the update and change its shape (or fail deep in jax).
      _same_shape(who, f"the update at {_paths.path_to_str(keypath)!r}", value, p,
                  "Pass the parameters the updates are for: tx.update(updates, state, params).")
      return _paths.with_value(u, term_of(value, p, mult, ref))

    def term_of(u, p, mult, ref):
      u = jnp.asarray(u)  # a Python-float gradient (a Python-float parameter) is a weak array.
      p = jnp.asarray(_paths.leaf_value(p))
      # The wider of the update's and θ's dtype: a float32 update of a bfloat16 θ gets
      # λ·θ in float32 (θ cast exactly); the result is cast back to the update's dtype.
      dtype = jnp.promote_types(u.dtype, p.dtype)
      p = p.astype(dtype)
      target = p if ref is None else p - ref.astype(dtype)
      term = c * target if mult == 1.0 else (c * mult) * target
      if cautious:  # decay where the direction (u for sign=+1, -u for sign=-1) agrees with θ.
        agree = u * p >= 0 if sign > 0 else u * p <= 0
        term = jnp.where(agree, term, jnp.zeros_like(term))
      out = u.astype(dtype) + term if sign > 0 else u.astype(dtype) - term
      return out.astype(u.dtype)

    # nnx Variables are leaves: updates that are a State of Variables stay one.
    is_leaf = lambda x: x is None or _paths.is_variable(x)  # noqa: E731
    try:
      jax.tree_util.tree_structure(updates, is_leaf=is_leaf).flatten_up_to(params)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{who}: updates and params have different tree structures: {e}") from e
    # The updates keep their own containers (a FrozenDict stays one).
    updates = jax.tree_util.tree_map_with_path(leaf, updates, params, mults, refs,
                                               is_leaf=is_leaf)
    count = optax.safe_increment(opt_state.decay_count)
    new_state = (state(decay_count=count) if not toward
                 else state(decay_count=count, reference=opt_state.reference))
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
