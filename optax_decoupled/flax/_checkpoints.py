"""Checkpoints of parameters and optimizer state with orbax, restored bitwise."""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

__all__ = ["restore_checkpoint", "save_checkpoint"]


def _is_nnx_state(tree: Any) -> bool:
  return isinstance(tree, nnx.State)


def save_checkpoint(directory: str | os.PathLike, step: int, tree: Any) -> None:
  """Saves ``tree`` as checkpoint ``step`` under ``directory`` (orbax), and waits.

  ``tree`` is any pytree of arrays (a linen ``TrainState``, a dict of
  parameters and ``optax`` states), or an ``nnx.State``, e.g.
  ``nnx.state((model, optimizer))`` for the parameters and the optimizer
  state together (stored as its pure dict). An existing checkpoint ``step``
  is replaced. Uses
  ``orbax.checkpoint.CheckpointManager`` with ``StandardSave``; the values are
  stored exactly (restoring gives bitwise the same arrays).

  Example:
    >>> import tempfile, jax.numpy as jnp, optax_decoupled.flax as odf
    >>> d = tempfile.mkdtemp()
    >>> odf.save_checkpoint(d, 10, {"w": jnp.ones(3)})
    >>> odf.restore_checkpoint(d, {"w": jnp.zeros(3)})[0]
    10
  """
  import orbax.checkpoint as ocp

  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}.")
  if _is_nnx_state(tree):
    tree = nnx.to_pure_dict(tree)
  with ocp.CheckpointManager(os.path.abspath(os.fspath(directory))) as mgr:
    if step in mgr.all_steps():
      mgr.delete(step)  # a re-run overwrites its own step instead of failing
    mgr.save(step, args=ocp.args.StandardSave(tree), force=True)
    mgr.wait_until_finished()


def restore_checkpoint(
    directory: str | os.PathLike, like: Any, step: int | None = None
) -> tuple[int, Any]:
  """Restores checkpoint ``step`` (default: the latest) shaped like ``like``.

  Args:
    directory: the directory given to :func:`save_checkpoint`.
    like: a tree with the structure, shapes and dtypes of the saved one (e.g.
      the freshly initialized ``TrainState``, or ``nnx.state((model, optimizer))``);
      it is not modified.
    step: which checkpoint; None for the latest.

  Returns:
    ``(step, tree)``; for an ``nnx.State`` ``like``, ``tree`` is an
    ``nnx.State`` to apply with ``nnx.update((model, optimizer), tree)``.
    Raises ``FileNotFoundError`` if there is no checkpoint.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(directory))
  with ocp.CheckpointManager(path) as mgr:
    if step is None:
      step = mgr.latest_step()
    if step is None or step not in mgr.all_steps():
      raise FileNotFoundError(
          f"restore_checkpoint: no checkpoint{'' if step is None else f' {step}'} in {path!r}"
          f" (available steps: {list(mgr.all_steps())})."
      )
    target = nnx.to_pure_dict(like) if _is_nnx_state(like) else like
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  if _is_nnx_state(like):
    out = jax.tree.map(lambda x: x, like)  # new Variables: ``like`` is left untouched.
    nnx.replace_by_pure_dict(out, restored)
    return int(step), out
  return int(step), restored
