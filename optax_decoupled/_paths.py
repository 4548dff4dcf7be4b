"""One path string per leaf, the same at ``init`` and at ``update``.

A leaf's path is its key path joined with ``"/"``: dict keys and attribute
names as they are, sequence indices as decimal numbers. Flax nnx ``Variable``
objects are treated as leaves, so the path of an nnx parameter is the same
whether the optimizer sees the Variable (``nnx.Optimizer`` calls ``tx.init`` on
a state of Variables, whose key paths end in ``.value``) or the plain array
(``tx.update`` sees arrays). flax is never imported here: a Variable can only
exist if the user already imported ``flax.nnx``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["is_variable", "leaf_dtype", "leaf_value", "leaves_with_paths", "map_with_path",
           "path_to_str", "with_value"]


def is_variable(x: Any) -> bool:
  """True if ``x`` is a Flax nnx ``Variable`` (without importing flax)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def leaf_value(x: Any) -> Any:
  """The array held by a leaf: the Variable's value for nnx Variables, else ``x``."""
  if is_variable(x):
    return x.get_value() if hasattr(x, "get_value") else x.value
  return x


def with_value(x: Any, value: Any) -> Any:
  """``value`` in the container of the leaf ``x``: a Variable like ``x`` for nnx Variables.

  Updates computed from a State of Variables (``jax.grad`` with respect to the output of
  ``nnx.split``) hold Variables; a transform keeps them Variables, as optax's do.
  """
  if is_variable(x):
    return x.replace(value)
  return value


def leaf_dtype(x: Any) -> np.dtype:
  """The dtype of a leaf's value (a Python float's is numpy's: float64)."""
  value = leaf_value(x)
  return np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)


def _key_to_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_to_str(keypath: tuple[Any, ...]) -> str:
  """Joins a JAX key path with ``"/"``, e.g. ``encoder/layer_0/LayerNorm_0/scale``."""
  return "/".join(_key_to_str(k) for k in keypath)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """``(path, leaf)`` pairs in flattening order; nnx Variables count as leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  return [(path_to_str(p), leaf) for p, leaf in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Maps ``fn(path, leaf)`` over ``tree`` keeping its structure (Variables are leaves)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(path_to_str(p), x), tree, is_leaf=is_variable
  )
