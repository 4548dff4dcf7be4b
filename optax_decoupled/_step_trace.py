"""One optimizer step as a flat program, traced once per transformation and tree.

``StepTree`` lays ``(params, grads, state)`` out as one flat list of inputs and says which
large leaf owns each input and each output of ``tx.update`` + ``optax.apply_updates``.
:func:`analysis` traces that step on the tree through ``jax.jit`` and splits it
(``_programs.Split``); the trace is cached per transformation (weakly, by its update
function), structure and avals, so the checks of ``fused_step``, its chunk loop and its
plain fallback (:func:`plain_step`) share one trace.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _flat, _programs
from optax_decoupled._programs import REST

__all__ = ["StepTree", "analysis", "plain_step", "split_state", "whole_program",
           "whole_values"]


def split_state(state: Any, treedef: Any, shapes: list[tuple[int, ...]]):
  """Flattens ``state`` into (leaves, def); a parameter-shaped subtree is one 'leaf' (a list)."""

  def is_param_tree(x):
    return _flat.laid_out_like(x, treedef, shapes)

  leaves, sdef = jax.tree.flatten(state, is_leaf=is_param_tree)
  marked = [jax.tree.leaves(x) if is_param_tree(x) else x for x in leaves]
  kinds = [is_param_tree(x) for x in leaves]
  return marked, kinds, sdef


class StepTree:
  """``(params, grads, state)`` as one flat list of inputs, and which large leaf owns each
  input and each output of the step (else ``REST``).

  Inputs: θ (n leaves), g (n), each params-shaped state tree (n each), the other state items.
  Outputs: new θ (n), each new params-shaped state tree (n each), the other new state items.
  """

  def __init__(self, params, grads, state, min_leaf_size=None, as_arrays=False):
    p_leaves, self.treedef = jax.tree.flatten(params)
    try:
      g_leaves = self.treedef.flatten_up_to(grads)
    except ValueError as e:
      raise ValueError(
          f"fused_step: grads and params have different tree structures: {e}") from e
    if as_arrays:
      p_leaves = [jnp.asarray(p) for p in p_leaves]
      g_leaves = [jnp.asarray(g) for g in g_leaves]
    n = self.n = len(p_leaves)
    self.s_items, self.s_kinds, self.s_def = split_state(
        state, self.treedef, [tuple(np.shape(p)) for p in p_leaves])
    self.param_js = [j for j, kind in enumerate(self.s_kinds) if kind]
    self.other_js = [j for j, kind in enumerate(self.s_kinds) if not kind]
    self.inputs = [*p_leaves, *g_leaves, *(x for j in self.param_js for x in self.s_items[j]),
                   *(self.s_items[j] for j in self.other_js)]
    self._params = params  # for the leaves' paths, when a message needs them
    self._paths: list[str] | None = None

    def float32_only(k):
      arrays = [p_leaves[k], g_leaves[k], *(self.s_items[j][k] for j in self.param_js)]
      return all(np.dtype(getattr(x, "dtype", None) or jnp.result_type(x)) == np.float32
                 for x in arrays)

    self.big = [] if min_leaf_size is None else [
        k for k, p in enumerate(p_leaves)
        if math.prod(np.shape(p)) >= min_leaf_size and float32_only(k)]
    big = set(self.big)
    n_param = len(self.param_js)
    in_leaf = [*range(n), *range(n), *(k for _ in range(n_param) for k in range(n))]
    out_leaf = [*range(n), *(k for _ in range(n_param) for k in range(n))]
    self.in_owner = [k if k in big else REST for k in in_leaf] + [REST] * len(self.other_js)
    self.out_owner = [k if k in big else REST for k in out_leaf] + [REST] * len(self.other_js)
    self.in_scalar = [np.ndim(x) == 0 for x in self.inputs]

  def leaf_inputs(self, k):
    """Input indices of leaf k: θ, g, then its state leaves."""
    return [k, self.n + k, *(2 * self.n + pos * self.n + k for pos in range(len(self.param_js)))]

  def leaf_outputs(self, k):
    """Output indices of leaf k: new θ, then its new state leaves."""
    return [k, *(self.n + pos * self.n + k for pos in range(len(self.param_js)))]

  def specs(self):
    """The avals traced: every input's own (with its varying axes inside ``shard_map``)."""
    return [jax.typeof(x) if hasattr(jax, "typeof") else jax.api_util.shaped_abstractify(x)
            for x in self.inputs]

  def path(self, k):
    """Leaf k's path, as ``jax.tree_util.keystr`` writes it."""
    if self._paths is None:
      self._paths = [jax.tree_util.keystr(p)
                     for p, _ in jax.tree_util.tree_flatten_with_path(self._params)[0]]
    return self._paths[k]

  def function(self, update: Any, same_state: list):
    """``inputs -> outputs`` (θ and state), i.e. ``tx.update`` + ``optax.apply_updates``, for
    ``update`` a weak reference to ``tx.update``. Appends to ``same_state`` whether the new
    state has the old one's layout. Holds the tree's structure only, and ``tx.update`` weakly
    (it is cached with the trace, keyed weakly by ``tx.update``)."""
    n, treedef, s_def, s_kinds = self.n, self.treedef, self.s_def, list(self.s_kinds)
    param_js, other_js = list(self.param_js), list(self.other_js)

    def fn(*flat):
      tp = list(flat[:n])
      ts, at = [None] * len(s_kinds), 2 * n
      for j in param_js:
        ts[j], at = treedef.unflatten(flat[at:at + n]), at + n
      for j in other_js:
        ts[j], at = flat[at], at + 1
      tp_tree = treedef.unflatten(tp)
      updates, new_state = update()(treedef.unflatten(flat[n:2 * n]), s_def.unflatten(ts),
                                    tp_tree)
      new_p = treedef.flatten_up_to(optax.apply_updates(tp_tree, updates))
      items, kinds, sdef = split_state(new_state, treedef, [np.shape(x) for x in tp])
      same_state.append(sdef == s_def and kinds == s_kinds)
      if not same_state[-1]:
        return [*new_p, *jax.tree.leaves(new_state)]
      return [*new_p, *(x for j in param_js for x in items[j]), *(items[j] for j in other_js)]

    return fn

  def rebuild(self, inputs):
    """``(params, grads, state)`` from a flat list like ``inputs`` (e.g. other shapes)."""
    n = self.n
    items, at = [None] * len(self.s_items), 2 * n
    for j in self.param_js:
      items[j], at = self.treedef.unflatten(inputs[at:at + n]), at + n
    for j in self.other_js:
      items[j], at = inputs[at], at + 1
    return (self.treedef.unflatten(inputs[:n]), self.treedef.unflatten(inputs[n:2 * n]),
            self.s_def.unflatten(items))

  def unflatten_outputs(self, values):
    """(new params, new state) from the flat outputs."""
    n = self.n
    items, at = [None] * len(self.s_items), n
    for j in self.param_js:
      items[j], at = self.treedef.unflatten(values[at:at + n]), at + n
    for j in self.other_js:
      items[j], at = values[at], at + 1
    return self.treedef.unflatten(values[:n]), self.s_def.unflatten(items)


class _Traced:
  """One trace of the step (:meth:`StepTree.function`) through ``jax.jit``: calling ``jitted``
  on arguments of the same avals reuses it (no second trace); ``split`` is made on first use."""

  def __init__(self, fn: Callable[[list], Any], specs: list[Any]) -> None:
    same_state: list[bool] = []
    self.jitted = jax.jit(fn(same_state))
    self.closed = self.jitted.trace(*specs).jaxpr
    self.same_state = same_state[-1]
    self._split: _programs.Split | None = None

  @property
  def split(self) -> _programs.Split:
    if self._split is None:
      self._split = _programs.Split(self.closed, self.same_state)
    return self._split


# Per transformation (weakly, by its update function): {(structure, avals): _Traced}. The
# trace depends only on these (inputs are traced abstract), as jax.jit's own cache assumes.
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHED_PER_TX = 8


def _traced(tx, tree: StepTree) -> _Traced:
  """The step on ``tree``, traced once per transformation, structure and avals."""
  specs = tree.specs()
  update: Callable[[], Any]
  method = tx.update
  try:
    key = (tree.treedef, tree.s_def, tuple(tree.s_kinds), tuple(specs),
           getattr(method, "__func__", None))
    hash(key)
    if inspect.ismethod(method):  # e.g. optax.MultiSteps: a new bound method per access.
      update, owner = weakref.WeakMethod(method), method.__self__
    else:
      update, owner = weakref.ref(method), method
    cache = _TRACES.setdefault(owner, {})
  except TypeError:  # an unhashable structure or an update that takes no weak reference.
    key, cache, update = None, {}, lambda: tx.update
  traced = cache.get(key)
  if traced is None:
    traced = _Traced(lambda same_state: tree.function(update, same_state), specs)
    # Not kept when the program closes over a tracer (a transformation built inside a trace).
    if key is not None and not any(isinstance(c, jax.core.Tracer) for c in traced.closed.consts):
      cache[key] = traced
      while len(cache) > _CACHED_PER_TX:
        cache.pop(next(iter(cache)))
  return traced


def analysis(tx, tree: StepTree) -> _programs.Split:
  """The split program of the step on ``tree``."""
  return _traced(tx, tree).split


def whole_program(tx, tree: StepTree) -> Any:
  """The closed jaxpr of ``tx.update`` + ``optax.apply_updates`` on ``tree`` (inputs: θ, g,
  state leaves; outputs: θ, state), traced once and shared with :func:`analysis` and
  :func:`plain_step`."""
  return _traced(tx, tree).closed


def whole_values(tx, tree: StepTree) -> list[Any]:
  """The step's flat outputs (``StepTree`` order) as one nested ``jit`` call of the program
  :func:`analysis` split (no new trace). Outputs left unused cost nothing: XLA removes the
  operations that only they need."""
  return list(_traced(tx, tree).jitted(*tree.inputs))


def plain_step(tx, params, grads, state) -> tuple[Any, Any]:
  """``tx.update`` + ``optax.apply_updates`` (the same operations, as one nested ``jit``
  call), reusing the trace of :func:`whole_program` when the avals are the same."""
  tree = StepTree(params, grads, state)
  if not _traced(tx, tree).same_state:  # the outputs cannot be put back in the state's layout.
    updates, new_state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new_state
  return tree.unflatten_outputs(whole_values(tx, tree))
