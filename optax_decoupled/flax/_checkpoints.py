"""Checkpoints of parameters and optimizer state with orbax, restored bitwise."""

from __future__ import annotations

import operator
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["restore_checkpoint", "save_checkpoint"]


def _is_nnx_state(tree: Any) -> bool:
  return isinstance(tree, nnx.State)


def _name(dtype: Any) -> str:
  try:
    return np.dtype(dtype).name
  except TypeError:  # not a numpy dtype (e.g. an extended JAX dtype)
    return str(dtype)


def _describe(dtype: Any, shape: Any) -> str:
  if dtype is None and not shape:
    return "a Python scalar"
  return f"{_name(dtype) if dtype is not None else '?'}[{','.join(map(str, shape))}]"


def _join(keys: tuple[Any, ...]) -> str:
  return "/".join(map(str, keys))


def _check_step(step: Any, who: str) -> int:
  """``step`` as an int: any integer (Python, numpy, a concrete JAX scalar), not a bool."""
  try:
    value = operator.index(step)
  except TypeError:
    value = None
  if isinstance(step, (bool, np.bool_)) or value is None or value < 0:
    raise ValueError(f"{who}: step must be a non-negative integer, got {step!r}.")
  return value


def _check_against_metadata(metadata: Any, abstract: Any, step: int, path: str) -> None:
  """Raises ValueError at the first leaf of ``abstract`` whose dtype/shape is not the saved one.

  ``metadata`` is ``CheckpointManager.item_metadata(step)`` (an orbax
  ``TreeMetadata``; None for a checkpoint without metadata, then nothing is
  checked). Leaves are matched by orbax's own flat keys (``to_flat_dict``:
  dict keys and sequence indices as strings, NamedTuple fields by name), so an
  ``optax`` state or an ``nnx`` pure dict is compared leaf by leaf, after the sets of
  leaves themselves (a template with leaves the checkpoint lacks, or without some of
  its leaves, is refused naming them).
  """
  import orbax.checkpoint as ocp

  if metadata is None:
    return
  saved = ocp.tree.to_flat_dict(getattr(metadata, "tree", metadata))
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  wanted = {ocp.utils.tuple_path_from_keypath(k) for k, _ in leaves}
  only_saved = sorted(set(saved) - wanted, key=str)
  only_like = sorted(wanted - set(saved), key=str)
  if only_saved or only_like:
    diffs = ([f"the checkpoint has {_join(k)!r}, the template does not" for k in only_saved[:2]]
             + [f"the template has {_join(k)!r}, the checkpoint does not" for k in only_like[:2]])
    raise ValueError(
        f"restore_checkpoint: the template `like` does not have the saved tree's structure"
        f" (checkpoint {step} in {path!r}; {len(only_saved)} saved leaves missing from it,"
        f" {len(only_like)} of its leaves not saved): {'; '.join(diffs)}. Build `like` as the"
        " saved tree was built, e.g. nnx.state((model, optimizer)) for both, with the same"
        " model and optimizer configuration.")
  bad = []
  for keypath, leaf in leaves:
    meta = saved.get(ocp.utils.tuple_path_from_keypath(keypath))
    if meta is None:
      continue
    want_dtype = getattr(leaf, "dtype", None)  # None for a Python scalar: no fixed width
    if want_dtype is not None and jax.dtypes.issubdtype(want_dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)  # typed keys are saved as their data
      want_dtype = leaf.dtype
    want_shape = tuple(getattr(leaf, "shape", ()))
    got_shape = tuple(getattr(meta, "shape", None) or ())
    got_dtype = getattr(meta, "dtype", None)
    # A saved Python scalar (orbax ScalarMetadata) has no fixed-width dtype.
    scalar = type(meta).__name__ == "ScalarMetadata"
    if got_shape != want_shape or (
        not scalar and got_dtype is not None and want_dtype is not None
        and _name(got_dtype) != _name(want_dtype)):
      bad.append((jax.tree_util.keystr(keypath), got_dtype, got_shape, want_dtype, want_shape))
  if bad:
    where, got_dtype, got_shape, want_dtype, want_shape = bad[0]
    more = f"; {len(bad)} of {len(leaves)} leaves differ" if len(bad) > 1 else ""
    if got_shape != want_shape:
      why = ("the template's shape is not the checkpoint's. Build `like` with the shapes it was"
             " saved with (the same model and optimizer configuration as when saving)")
    else:
      why = ("orbax would silently convert it to the template's dtype, so the restore would not"
             " be bitwise. Build `like` with the dtypes it was saved with (e.g. initialize the"
             " model and optimizer as when saving), and cast after restoring if you want"
             f" {_name(want_dtype)}, e.g. `jax.tree.map(lambda x:"
             f" x.astype(jnp.{_name(want_dtype)}), tree)`")
    raise ValueError(
        f"restore_checkpoint: leaf {where} was saved as {_describe(got_dtype, got_shape)} but the"
        f" template `like` has {_describe(want_dtype, want_shape)} (checkpoint {step} in"
        f" {path!r}{more}): {why}."
    )


def save_checkpoint(directory: str | os.PathLike, step: int, tree: Any) -> None:
  """Saves ``tree`` as checkpoint ``step`` under ``directory`` (orbax), and waits.

  ``tree`` is any pytree of arrays (a linen ``TrainState``, a dict of
  parameters and ``optax`` states), or an ``nnx.State``, e.g.
  ``nnx.state((model, optimizer))`` for the parameters and the optimizer
  state together (stored as its pure dict). An existing checkpoint ``step``
  is replaced. Uses
  ``orbax.checkpoint.CheckpointManager`` with ``StandardSave``; the values are
  stored exactly (restoring gives bitwise the same arrays).

  Raises:
    ValueError: ``step`` is not a non-negative integer.
    NotADirectoryError: ``directory`` is a file.
    RuntimeError: a leaf is an array a donating train step deleted (named, before
      anything is written).

  Example:
    >>> import tempfile, jax.numpy as jnp, optax_decoupled.flax as odf
    >>> d = tempfile.mkdtemp()
    >>> odf.save_checkpoint(d, 10, {"w": jnp.ones(3)})
    >>> odf.restore_checkpoint(d, {"w": jnp.zeros(3)})[0]
    10
  """
  import orbax.checkpoint as ocp

  step = _check_step(step, "save_checkpoint")
  path = os.path.abspath(os.fspath(directory))
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"save_checkpoint: {path!r} is a file, not a checkpoint directory.")
  if _is_nnx_state(tree):
    tree = nnx.to_pure_dict(tree)
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
      raise RuntimeError(
          f"save_checkpoint: leaf {jax.tree_util.keystr(keypath)} of the tree is a deleted array:"
          " a train step that donates its inputs (odf.nnx_train_step, odf.linen_train_step)"
          " consumed it. Save the model, optimizer or state as they are after the step (for"
          " linen, the state the step returned), not a tree taken before it.")
  with ocp.CheckpointManager(path) as mgr:
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

  Raises:
    FileNotFoundError: there is no directory ``directory`` (it is not created), or no
      checkpoint (``step``) in it.
    ValueError: ``step`` is not a non-negative integer; ``like`` has leaves the
      checkpoint lacks or lacks some of its leaves (the first are named); or
      a leaf of ``like`` has another dtype or shape than the saved
      one (read from the checkpoint's metadata). orbax would cast silently (a
      float32 checkpoint restored into a bfloat16 template comes back rounded),
      so the restore is refused and the message names the first such leaf.
      Build ``like`` with the saved dtypes and cast after restoring instead.
      Python scalars (a ``like`` leaf such as a fresh ``TrainState.step``,
      ``0``, or a saved one) have no fixed-width dtype: their dtype is not
      checked.

  Example:
    >>> import tempfile, jax.numpy as jnp, optax_decoupled.flax as odf
    >>> d = tempfile.mkdtemp()
    >>> odf.save_checkpoint(d, 1, {"w": jnp.ones(3, jnp.float32)})
    >>> odf.restore_checkpoint(d, {"w": jnp.zeros(3, jnp.bfloat16)})
    Traceback (most recent call last):
    ...
    ValueError: restore_checkpoint: leaf ['w'] was saved as float32[3] but the template ...
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(directory))
  if step is not None:
    step = _check_step(step, "restore_checkpoint")
  if not os.path.isdir(path):  # CheckpointManager would create it
    raise FileNotFoundError(
        f"restore_checkpoint: no checkpoint directory {path!r}"
        f"{' (it is a file)' if os.path.exists(path) else ''}.")
  # The handler lets ``item_metadata`` read the saved shapes and dtypes (without
  # it, orbax-checkpoint 0.12 returns None for an item it was not told how to read).
  with ocp.CheckpointManager(path, item_handlers=ocp.StandardCheckpointHandler()) as mgr:
    if step is None:
      step = mgr.latest_step()
    if step is None or step not in mgr.all_steps():
      raise FileNotFoundError(
          f"restore_checkpoint: no checkpoint{'' if step is None else f' {step}'} in {path!r}"
          f" (available steps: {list(mgr.all_steps())})."
      )
    target = nnx.to_pure_dict(like) if _is_nnx_state(like) else like
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    _check_against_metadata(mgr.item_metadata(step), abstract, step, path)
    restored = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  if _is_nnx_state(like):
    out = jax.tree.map(lambda x: x, like)  # new Variables: ``like`` is left untouched.
    nnx.replace_by_pure_dict(out, restored)
    return int(step), out
  return int(step), restored
