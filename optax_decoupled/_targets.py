"""Where an Adam chain's step sits inside a transformation, for ``od.fused_step``'s kernel.

Three forms are recognised, and nothing else (anything unrecognised takes the plain step):

* ``od.adamw`` (any coupling), ``od.bert_adamw`` and ``od.adam_l2``, by the record the alias
  leaves (``_recipes``), and ``optax.adamw`` (a constant λ), read from its chain;
* ``optax.inject_hyperparams(od.adamw)(...)``: its ``update`` builds ``od.adamw`` from the
  injected hyperparameters at every step; the record of *that* build (collected while the
  step is traced) gives the arguments, traced values included;
* either of them behind ``optax.clip_by_global_norm(max_norm)`` in an ``optax.chain`` of
  two: the global norm is computed by JAX in one read of g, and the kernel applies
  optax's clip, ``g if ‖g‖ < max_norm else (g / ‖g‖) · max_norm``, as it reads g.

Recognising ``optax.adamw``, ``optax.chain`` and ``optax.clip_by_global_norm`` reads their
closures (optax keeps no other record). The name of each function and of every closure
variable read is checked, and such a target is marked ``read_from_closures``: before the
kernel is used for it, ``_verify`` compares the kernel with the plain step on probe values,
so a future optax that renames or re-means a variable leads to the plain step, never to
other numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

from optax_decoupled import _recipes

__all__ = ["NOT_ADAMW", "AdamWSpec", "Target", "adamw_spec", "split_clip", "target_of"]

NOT_ADAMW = ("the kernel implements od.adamw, od.adam_l2, od.bert_adamw and optax.adamw "
             "(also inside optax.inject_hyperparams, behind optax.clip_by_global_norm); this "
             "transformation is something else")


@dataclasses.dataclass(frozen=True, eq=False)
class AdamWSpec:
  """The hyperparameters of an Adam chain the kernel computes, as it needs them.

  Read from the record the alias left (``_recipes``: ``od.adamw(coupling="lr")``,
  ``od.bert_adamw``, ``od.adam_l2``) or from ``optax.adamw``'s chain. The chain's state is
  ``(ScaleByAdamState, decay state, lr_state)`` (``(decay state, ScaleByAdamState,
  lr_state)`` for ``l2``), where ``lr_state`` is ``ScaleByScheduleState`` for a schedule,
  ``EmptyState`` otherwise.
  """

  learning_rate: Any
  b1: float
  b2: float
  eps: float
  eps_root: float
  weight_decay: Any
  mask: Any
  mu_dtype: Any = None
  nu_dtype: Any = None
  zero_adds_term: bool = False  # optax.add_decayed_weights adds 0·θ unless λ is a Python 0
  bias_correction: bool = True  # od.bert_adamw: m and v are not corrected (bc = 1, exact)
  # "adamw": u + λθ inside the lr scaling; "l2" (od.adam_l2): g + λθ before the moments;
  # "after" (od.adamw's other couplings): θ shrinks by c_t after the finished step.
  layout: str = "adamw"
  nesterov: bool = False  # optax.scale_by_adam(nesterov=True): NAdam's m̂


def adamw_spec(recipe: _recipes.Recipe | None) -> tuple[AdamWSpec | None, str | None]:
  """``(spec, None)`` for the record of an Adam chain the kernel computes, else
  ``(None, why not)``."""
  if recipe is not None and recipe.name == "bert_adamw":  # BERT's AdamWeightDecayOptimizer
    a = recipe.args
    return AdamWSpec(a["learning_rate"], a["b1"], a["b2"], a["eps"], 0.0, a["weight_decay"],
                     a["mask"], bias_correction=False), None
  if recipe is not None and recipe.name == "adam_l2":
    a = recipe.args  # torch.optim.Adam(weight_decay): g + λθ, then Adam
    return AdamWSpec(a["learning_rate"], a["b1"], a["b2"], a["eps"], a["eps_root"],
                     a["weight_decay"], a["mask"], a["mu_dtype"], a["nu_dtype"],
                     layout="l2", nesterov=a["nesterov"]), None
  if recipe is None or recipe.name != "adamw":
    return None, NOT_ADAMW
  a = recipe.args
  if a["coupling"] != "lr":  # θ ← θ − η_t·u − c_t·θ, c_t the coupling's shrink.
    return AdamWSpec(a["learning_rate"], a["b1"], a["b2"], a["eps"], a["eps_root"],
                     a["shrink"], a["mask"], a["mu_dtype"], a["nu_dtype"],
                     layout="after", nesterov=a["nesterov"]), None
  return AdamWSpec(a["learning_rate"], a["b1"], a["b2"], a["eps"], a["eps_root"],
                   a["weight_decay"], a["mask"], a["mu_dtype"], a["nu_dtype"],
                   a.get("zero_adds_term", False), nesterov=a["nesterov"]), None


def _closure(fn: Any) -> dict[str, Any]:
  try:
    return dict(inspect.getclosurevars(fn).nonlocals)
  except (TypeError, ValueError):
    return {}


def _qualname(fn: Any) -> str:
  return getattr(fn, "__qualname__", "")


def _unwrap(update: Any) -> Any:
  """``optax.with_extra_args_support`` wraps a plain transformation's update; unwrap it."""
  inner: Any = _closure(update).get("tx")
  if "with_extra_args_support" in _qualname(update) and hasattr(inner, "update"):
    return inner.update
  return update


def _optax_adamw(update: Any) -> _recipes.Recipe | None:
  """``optax.adamw``'s arguments read from its chain (``optax/_src/alias.py``:
  ``scale_by_adam``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_learning_rate``), as the record ``od.adamw(coupling="lr")`` would leave; None
  for anything else (also a schedule for λ)."""
  fns = _closure(update).get("update_fns")
  if (_qualname(update) != "chain.<locals>.update_fn" or not isinstance(fns, tuple)
      or len(fns) != 3):
    return None
  adam, decay, scale = (_unwrap(f) for f in fns)
  if _qualname(adam) != "scale_by_adam.<locals>.update_fn":
    return None
  args = {k: _closure(adam).get(k, _MISSING) for k in
          ("b1", "b2", "eps", "eps_root", "mu_dtype", "nesterov")}
  mask = None
  if _qualname(decay) == "masked.<locals>.update_fn":
    mask, inner = _closure(decay).get("mask"), _closure(decay).get("inner")
    decay = _unwrap(getattr(inner, "update", None))
  weight_decay = _closure(decay).get("weight_decay")
  if (_qualname(decay) != "add_decayed_weights.<locals>.update_fn" or weight_decay is None
      or callable(weight_decay) or _MISSING in args.values()):
    return None
  if _qualname(scale) == "scale.<locals>.update_fn":
    learning_rate = -_closure(scale)["step_size"]  # scale(-lr): negation is exact.
  elif _qualname(scale) == "scale_by_schedule.<locals>.update_fn":
    fn = _closure(scale).get("step_size_fn")
    if (_qualname(fn) != "scale_by_learning_rate.<locals>.<lambda>"
        or _closure(fn).get("m") != -1):
      return None
    learning_rate = _closure(fn)["learning_rate"]
  else:
    return None
  python_zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
  return _recipes.Recipe("adamw", types.MappingProxyType(dict(
      args, learning_rate=learning_rate, weight_decay=weight_decay, mask=mask, nu_dtype=None,
      coupling="lr", zero_adds_term=not python_zero)))


_MISSING = object()


def split_clip(tx: Any) -> tuple[Any, Any] | None:
  """``(max_norm, rest_update)`` when ``tx`` is ``optax.chain(optax.clip_by_global_norm(
  max_norm), rest)``, else None. ``rest_update`` is the second transformation's update."""
  if _qualname(getattr(tx, "update", None)) != "chain.<locals>.update_fn":
    return None
  fns = _closure(tx.update).get("update_fns")
  if not isinstance(fns, tuple) or len(fns) != 2:
    return None
  first = _unwrap(fns[0])
  if _qualname(first) != "clip_by_global_norm.<locals>.update_fn":
    return None
  max_norm = _closure(first).get("max_norm")
  if max_norm is None:
    return None
  return max_norm, _unwrap(fns[1])


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
  """An ``od.adamw`` step found inside a transformation.

  Attributes:
    recipe: the alias's record, or None when ``tx.update`` builds it (inject_hyperparams).
    max_norm: ``optax.clip_by_global_norm``'s ``max_norm`` in front, or None.
    path: how to reach the ``od.adamw`` state from the transformation's state (tuple
      indices and attribute names).
    read_from_closures: whether any of it was read from optax's closures (then the kernel
      is verified against the plain step before use).
  """

  recipe: _recipes.Recipe | None
  max_norm: Any
  path: tuple[Any, ...]
  read_from_closures: bool = False

  def state_of(self, state: Any) -> Any:
    for key in self.path:
      state = getattr(state, key) if isinstance(key, str) else state[key]
    return state

  def with_state(self, state: Any, inner: Any, path: tuple[Any, ...] | None = None) -> Any:
    """``state`` with the ``od.adamw`` state at ``path`` replaced by ``inner``."""
    path = self.path if path is None else path
    if not path:
      return inner
    key, rest = path[0], path[1:]
    if isinstance(key, str):
      return state._replace(**{key: self.with_state(getattr(state, key), inner, rest)})
    items = list(state)
    items[key] = self.with_state(items[key], inner, rest)
    return type(state)(items) if type(state) is tuple else type(state)(*items)


def target_of(tx: Any) -> tuple[Target | None, str | None]:
  """``(target, None)`` when ``tx`` holds a step the kernel may compute, else
  ``(None, why not)``. Hyperparameters, dtypes and masks are checked per call."""
  max_norm, update = None, getattr(tx, "update", None)
  path: tuple[Any, ...] = ()
  split = split_clip(tx)
  if split is not None:
    (max_norm, update), path = split, (1,)
  recipe = _recipes.recipe_of(types.SimpleNamespace(update=update))
  from_closures = split is not None
  if recipe is None:
    recipe = _optax_adamw(update)
    from_closures = from_closures or recipe is not None
  if recipe is not None:
    return Target(recipe, max_norm, path, from_closures), None
  if "inject_hyperparams" in _qualname(update) or "inject_stateful" in _qualname(update):
    return Target(None, max_norm, (*path, "inner_state"), from_closures), None
  return None, NOT_ADAMW
