"""Flat-buffer mode: a parameter tree kept as one contiguous buffer, leaves as views into it.

A jitted step over a tree of L leaves passes about 4L buffers in and 3L out; JAX and XLA pay
a small cost per buffer (about 2 ms per call for BERT's ~200 leaves on a 2-core
x86_64 machine, ~40% of a 12M-parameter AdamW step; ``benchmarks/bench_step.py``). Packing the leaves into one buffer removes that
cost, and lets ``od.fused_step`` update every parameter with one kernel call over one array,
while name and ndim masks still decide per original leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FlatLayout"]


def standin(leaf: Any) -> Any:
  """A zero-size array with ``leaf``'s ndim and dtype (a scalar stays itself): it keeps the
  leaf's path and ndim for masks while carrying no data (see ``fused_step``)."""
  if jnp.ndim(leaf) == 0:
    return leaf
  return jnp.zeros((0,) + tuple(jnp.shape(leaf)[1:]), jnp.result_type(leaf))


def laid_out_like(x: Any, treedef: Any, shapes: Any) -> bool:
  """Whether ``x`` is a tree with ``treedef`` and leaf shapes ``shapes`` (a params-like
  subtree of an optimizer state, e.g. Adam's ``mu``)."""
  if isinstance(x, (jax.Array, np.ndarray)) and treedef.num_leaves != 1:
    return False
  try:
    leaves, d = jax.tree.flatten(x)
  except Exception:  # noqa: BLE001 - not a tree we can compare.
    return False
  return d == treedef and [tuple(np.shape(a)) for a in leaves] == [tuple(s) for s in shapes]


@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Where each leaf of a parameter tree lives in one flat buffer (frozen, hashable).

  ``pack`` concatenates the raveled leaves in ``jax.tree.leaves`` order; ``unpack`` gives the
  tree back as reshaped slices (inside ``jax.jit`` these are views XLA fuses into their
  users). Optimizer state is packed the same way: every subtree laid out like the params
  (Adam's ``mu`` and ``nu``, a reference θ) becomes one buffer, scalars stay as they are.

  Decay convention: none of its own (a storage layout); the optimizer stepping the buffer
  keeps its convention, and its mask decides per original leaf.

  Example:
    >>> import jax, jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    >>> layout = od.FlatLayout.of(params)
    >>> flat = layout.pack(params)
    >>> flat.shape, layout.paths
    ((16,), ('dense/bias', 'dense/kernel'))
    >>> tx = od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias"))
    >>> state = layout.pack_state(tx.init(params))
    >>> step = jax.jit(od.fused_step(tx, layout=layout), donate_argnums=(0, 2))
    >>> flat, state = step(flat, jnp.ones_like(flat), state)
    >>> layout.unpack(flat)["dense"]["bias"].shape
    (4,)
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtype: str
  paths: tuple[str, ...]

  @classmethod
  def of(cls, params: Any) -> FlatLayout:
    """The layout of ``params`` (arrays or ``jax.ShapeDtypeStruct``\\ s of one float dtype)."""
    from optax_decoupled import _paths

    leaves, treedef = jax.tree.flatten(params)
    dtypes = sorted({str(jnp.result_type(x)) for x in leaves})
    if len(dtypes) > 1:
      raise ValueError(
          f"FlatLayout: one buffer holds one dtype, and the leaves have {dtypes}. Cast the "
          "parameters to one dtype first (e.g. jax.tree.map(lambda x: x.astype(jnp.float32), "
          "params)) or keep the tree form.")
    if dtypes and not jnp.issubdtype(dtypes[0], jnp.floating):
      raise ValueError(f"FlatLayout: parameters must be floating point, got {dtypes[0]}.")
    paths = tuple(path for path, _ in _paths.leaves_with_paths(params))
    if len(paths) != len(leaves):
      raise ValueError("FlatLayout: the tree has leaves that are not arrays (e.g. nnx "
                       "Variables); pass the array state, e.g. nnx.state(model, nnx.Param).")
    return cls(treedef, tuple(tuple(int(d) for d in np.shape(x)) for x in leaves),
               dtypes[0] if dtypes else "float32", paths)

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

  @property
  def size(self) -> int:
    return sum(self.sizes)

  def _check(self, tree: Any, what: str) -> list:
    try:
      leaves = self.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
      raise ValueError(f"FlatLayout.{what}: the tree does not have the layout's structure "
                       f"{self.treedef}: {e}") from e
    for path, shape, x in zip(self.paths, self.shapes, leaves):
      if tuple(np.shape(x)) != shape:
        raise ValueError(f"FlatLayout.{what}: leaf '{path}' has shape {np.shape(x)}, the "
                         f"layout says {shape}.")
    return leaves

  def pack(self, tree: Any) -> jax.Array:
    """One 1-D buffer holding ``tree``'s leaves (in the dtype of ``tree``)."""
    leaves = self._check(tree, "pack")
    if not leaves:
      return jnp.zeros((0,), self.dtype)
    return jnp.concatenate([jnp.ravel(x) for x in leaves])

  def unpack(self, flat: jax.Array) -> Any:
    """The tree whose leaves are the slices of ``flat`` (shape ``(size,)``)."""
    if jnp.shape(flat) != (self.size,):
      raise ValueError(f"FlatLayout.unpack: expected a buffer of shape ({self.size},), got "
                       f"{jnp.shape(flat)}.")
    offsets = np.cumsum((0,) + self.sizes)
    return self.treedef.unflatten([
        jax.lax.slice(flat, (int(a),), (int(b),)).reshape(shape)
        for a, b, shape in zip(offsets[:-1], offsets[1:], self.shapes)])

  def _is_params_tree(self, x: Any) -> bool:
    return laid_out_like(x, self.treedef, self.shapes)

  def pack_state(self, state: Any) -> Any:
    """``state`` with every subtree laid out like the params packed into one buffer."""
    return jax.tree.map(lambda x: self.pack(x) if self._is_params_tree(x) else x, state,
                        is_leaf=self._is_params_tree)

  def unpack_state(self, state: Any) -> Any:
    """The inverse of :meth:`pack_state`: every ``(size,)`` buffer back to a tree.

    (A non-scalar state array of exactly ``(size,)`` elements is taken to be a packed
    parameter-shaped subtree.)
    """
    return jax.tree.map(lambda x: self.unpack(x) if jnp.shape(x) == (self.size,)
                        and self.size else x, state)
