"""A neutral record of which alias built a transformation, and with which arguments.

The aliases write it; whoever wants to recognise a transformation (``od.fused_step``'s
kernel, a report) reads it. The record says nothing about how it will be used, so the
aliases need not know that anything reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


_COLLECTORS: list[list[Recipe]] = []


def record(tx: optax.GradientTransformation, name: str, **args: Any) -> Any:
  """Notes that ``tx`` was built by alias ``name`` from ``args``; returns ``tx``."""
  recipe = Recipe(name, types.MappingProxyType(dict(args)))
  _RECIPES[tx.update] = recipe
  for found in _COLLECTORS:
    found.append(recipe)
  return tx


@contextlib.contextmanager
def collecting() -> Iterator[list[Recipe]]:
  """Collects the recipes of the aliases built inside the block, e.g. by a ``tx.update``
  that builds its optimizer from injected hyperparameters (``optax.inject_hyperparams``)."""
  found: list[Recipe] = []
  _COLLECTORS.append(found)
  try:
    yield found
  finally:
    _COLLECTORS.remove(found)


def recipe_of(tx: Any) -> Recipe | None:
  """The :class:`Recipe` of ``tx``, or None for transformations no alias recorded."""
  try:
    return _RECIPES.get(tx.update)
  except (AttributeError, TypeError):  # not a transformation, or not weakly referenceable.
    return None
