"""Optimizer state placed like the parameters, also when ``init`` runs under ``jax.jit``.

``jnp.zeros_like(θ)`` does not read θ, so under ``jax.jit`` XLA has no reason to give the
moments θ's sharding: ``jax.jit(optax.adamw(...).init)(params)`` returns moments on one
device, which for FSDP-sharded parameters is an out-of-memory error at scale. Here every
state subtree laid out like the parameters (Adam's ``mu`` and ``nu``, a momentum trace, a
reference θ) is tied to the parameters with ``jax.experimental.shard_alike``, so XLA gives
each state array the sharding of its parameter. Values are unchanged. On a jax
which has no ``shard_alike``, the state is returned as it is (``TIES_STATE`` is False): place
it with ``jax.jit(tx.init, out_shardings=...)`` there.

:func:`per_shard` runs an elementwise step (the fused step's kernel) on each
device's shards of sharded arrays, with no collective, keeping their shardings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_decoupled import _flat, _hyperparams

__all__ = ["per_shard", "shard_state_like"]



def _find_shard_alike() -> Callable[..., Any] | None:
  """``jax.experimental.shard_alike.shard_alike``, or None on a jax without it (removed from
  newer releases, without a public successor)."""
  try:
    module = importlib.import_module("jax.experimental.shard_alike")
  except ImportError:
    return None
  return getattr(module, "shard_alike", None)


_shard_alike = _find_shard_alike()

#: Whether ``shard_state_like`` can tie the state to the params (see the module docstring).
TIES_STATE = _shard_alike is not None


def shard_state_like(state: Any, params: Any) -> Any:
  """``state`` with each parameter-shaped subtree sharded like ``params``."""
  p_leaves, treedef = jax.tree.flatten(params)
  if not p_leaves or _shard_alike is None:
    return state
  shapes = [tuple(np.shape(p)) for p in p_leaves]

  def params_like(x: Any) -> bool:
    return _flat.laid_out_like(x, treedef, shapes)

  def tie(subtree: Any) -> Any:
    if not params_like(subtree):
      return subtree
    leaves, sdef = jax.tree.flatten(subtree)
    # Concrete arrays already carry their sharding (jnp.zeros_like copies it); only traced
    # ones need the tie, and shard_alike on concrete arrays would consume its inputs.
    return sdef.unflatten([_shard_alike(p, s)[1] if _hyperparams.is_traced(s) else s  # type: ignore[attr-defined]
                           for p, s in zip(p_leaves, leaves)])

  return jax.tree.map(tie, state, is_leaf=params_like)


def per_shard(fn: Callable[..., tuple], args: list[Any], arg_leaf: list[int | None],
              out_leaf: list[int | None], plan: Callable[..., Any] | None = None) -> list[Any]:
  """``fn(*args)``, run by each device on its shards when the arrays are sharded.

  ``fn`` must be elementwise per leaf: argument i belongs to leaf ``arg_leaf[i]`` (None: a
  value every device needs whole, such as the step's scalars), output j to leaf
  ``out_leaf[j]`` (None: a scalar, such as a step count). It is a ``custom_partitioning``: under ``jax.jit`` every array of leaf k
  takes the sharding of leaf k's first argument (its θ), the others are replicated, and
  each device runs ``fn`` on its own shards: no gather, no collective, and the outputs keep
  the shardings. ``plan(mesh, arg_shapes, leaf_shardings)`` may decide otherwise for a
  sharded call: None (per shard), a function to run per shard instead of ``fn``, or
  ``"gather"`` (every array replicated first: correct, not fast). On one device, and inside
  ``jax.shard_map`` (whose results then vary over the same mesh axes as the arguments),
  it is ``fn`` itself; under ``jax.vmap`` too (``custom_partitioning`` has no batching).
  With a single device in the process nothing can be sharded: ``fn`` is called directly.
  """
  if jax.device_count() == 1:
    return list(fn(*args))
  n_leaves = 1 + max((k for k in (*arg_leaf, *out_leaf) if k is not None), default=-1)
  first = {k: arg_leaf.index(k) for k in range(n_leaves)}

  def specs(mesh, arg_shapes, gather=False):
    replicated = NamedSharding(mesh, P())
    leaf = [replicated if gather else arg_shapes[first[k]].sharding for k in range(n_leaves)]
    return (tuple(replicated if k is None else leaf[k] for k in arg_leaf),
            tuple(replicated if k is None else leaf[k] for k in out_leaf), leaf)

  def infer(mesh, arg_shapes, result_shape):
    return specs(mesh, arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    ins, outs, leaf = specs(mesh, arg_shapes)
    decided = plan(mesh, arg_shapes, leaf) if plan is not None and not all(
        s.is_fully_replicated for s in leaf) else None
    if decided == "gather":
      ins, outs, _ = specs(mesh, arg_shapes, gather=True)
      decided = None
    return mesh, fn if decided is None else decided, outs, ins

  def factors(i, k, x):
    name = f"l{k}" if k is not None else f"r{i}"
    return " ".join(f"{name}d{j}" for j in range(np.ndim(x)))

  arg_factors = [factors(i, k, x) for i, (k, x) in enumerate(zip(arg_leaf, args))]
  leaf_factors = {k: arg_factors[first[k]] for k in range(n_leaves)}
  out_factors = [leaf_factors[k] if k is not None else "" for k in out_leaf]
  replicated_factors = tuple(f for i, k in enumerate(arg_leaf) if k is None
                             for f in arg_factors[i].split())
  call = custom_partitioning(fn)
  call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=", ".join(arg_factors) + " -> " + ", ".join(out_factors),
                     need_replication_factors=replicated_factors)

  @jax.custom_batching.custom_vmap
  def partitioned(*xs):
    return call(*xs)

  @partitioned.def_vmap
  def _(axis_size, in_batched, *xs):
    out = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched], axis_size=axis_size)(*xs)
    return out, tuple(True for _ in out)

  res = list(partitioned(*args))
  # Inside jax.shard_map, a leaf's outputs vary over the mesh axes its arguments vary over,
  # and the other outputs over those of the other arguments.
  axes: dict[int | None, frozenset] = {}
  for k, x in zip(arg_leaf, args):
    axes[k] = axes.get(k, frozenset()) | _varying(x)
  return [_vary(r, axes.get(k, frozenset())) for r, k in zip(res, out_leaf)]


def _vary(x: Any, axes: frozenset) -> Any:
  missing = tuple(sorted(axes - _varying(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying(x: Any) -> frozenset:
  """The mesh axes ``x`` varies over inside ``jax.shard_map`` (jax >= 0.10:
  ``manual_axis_type.varying``)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)
  return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))
