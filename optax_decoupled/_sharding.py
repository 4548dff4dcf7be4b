"""Optimizer state placed like the parameters, also when ``init`` runs under ``jax.jit``.

``jnp.zeros_like(θ)`` does not read θ, so under ``jax.jit`` XLA has no reason to give the
moments θ's sharding: ``jax.jit(optax.adamw(...).init)(params)`` returns moments on one
device, which for FSDP-sharded parameters is an out-of-memory error at scale. Here every
state subtree laid out like the parameters (Adam's ``mu`` and ``nu``, a momentum trace, a
reference θ) is tied to the parameters with ``jax.experimental.shard_alike``, so XLA gives
each state array the sharding of its parameter. Values are unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental.shard_alike import shard_alike

from optax_decoupled import _flat

__all__ = ["shard_state_like"]


def shard_state_like(state: Any, params: Any) -> Any:
  """``state`` with each parameter-shaped subtree sharded like ``params``."""
  p_leaves, treedef = jax.tree.flatten(params)
  if not p_leaves:
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
    return sdef.unflatten([shard_alike(p, s)[1] if isinstance(s, jax.core.Tracer) else s  # type: ignore[attr-defined]
                           for p, s in zip(p_leaves, leaves)])

  return jax.tree.map(tie, state, is_leaf=params_like)
