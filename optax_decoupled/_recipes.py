"""A neutral record of which alias built a transformation, and with which arguments.

The aliases write it; whoever wants to recognise a transformation (``od.fused_step``'s
kernel, a report) reads it. The record says nothing about how it will be used, so the
aliases need not know that anything reads it.

Thread safety: the record is shared and guarded by a lock; the collectors of
:func:`collecting` are per thread, so a block collects what its own thread builds (or
traces), never what another thread builds at the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import optax

__all__ = ["Recipe", "collecting", "recipe_of", "record"]


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
  """``name`` (an alias of this package, e.g. ``"adamw"``) and its arguments by name."""

  name: str
  args: Mapping[str, Any]


_RECIPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RECIPES_LOCK = threading.Lock()


class _Collectors(threading.local):
  """The open :func:`collecting` blocks of the current thread, innermost last."""

  def __init__(self) -> None:
    self.open: list[list[Recipe]] = []


_COLLECTORS = _Collectors()


def record(tx: optax.GradientTransformation, name: str, **args: Any) -> Any:
  """Notes that ``tx`` was built by alias ``name`` from ``args``; returns ``tx``."""
  recipe = Recipe(name, types.MappingProxyType(dict(args)))
  with _RECIPES_LOCK:
    _RECIPES[tx.update] = recipe
  for found in _COLLECTORS.open:
    found.append(recipe)
  return tx


@contextlib.contextmanager
def collecting() -> Iterator[list[Recipe]]:
  """Collects the recipes of the aliases built inside the block, e.g. by a ``tx.update``
  that builds its optimizer from injected hyperparameters (``optax.inject_hyperparams``)."""
  found: list[Recipe] = []
  _COLLECTORS.open.append(found)
  try:
    yield found
  finally:
    _COLLECTORS.open.remove(found)


def recipe_of(tx: Any) -> Recipe | None:
  """The :class:`Recipe` of ``tx``, or None for transformations no alias recorded."""
  try:
    with _RECIPES_LOCK:
      return _RECIPES.get(tx.update)
  except (AttributeError, TypeError):  # not a transformation, or not weakly referenceable.
    return None
