"""Jitted train steps for Flax nnx and linen, with ``optimizer.update`` or ``od.fused_step``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from optax_decoupled import _fused

__all__ = ["linen_train_step", "nnx_train_step"]


def nnx_train_step(
    loss_fn: Callable[..., Any], *, has_aux: bool = False, donate: bool = True,
    fused: bool = False,
) -> Callable[..., Any]:
  """A jitted nnx train step: ``step(model, optimizer, *batch) -> loss``.

  ``loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)`` then
  ``optimizer.update(model, grads)``, under ``nnx.jit`` with the model's and
  optimizer's buffers donated (``donate_argnames=("model", "optimizer")``),
  so parameters and Adam's moments are updated in place. It compiles once
  for a fixed model structure and batch shapes/dtypes; keep ``loss_fn`` and
  the batch shapes fixed (pad the last batch) to avoid retracing. Donated
  arrays are deleted after the call: copy (``np.array``, not ``np.asarray``,
  whose zero-copy view on CPU silently blocks donation) any parameter you want
  to keep.

  Args:
    loss_fn: ``loss_fn(model, *batch) -> scalar`` (``-> (scalar, aux)`` with
      ``has_aux=True``); differentiated with respect to the optimizer's
      ``wrt`` (nnx.Param by default).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the step then
      returns ``(loss, aux)``.
    donate: donate the model and optimizer buffers (default True).
    fused: apply the update with :func:`optax_decoupled.fused_step` (one pass over
      memory on CPU; the C++ kernel for ``od.adamw`` with float32 moments) instead of
      ``optimizer.update``; same results to round-off, same optimizer state.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, od.adamw(1e-2, mask=od.min_ndim(2)), wrt=nnx.Param)
    >>> step = odf.nnx_train_step(lambda m, x, y: ((m(x) - y) ** 2).mean())
    >>> loss = step(model, opt, jnp.ones((4, 2)), jnp.zeros((4, 1)))
  """

  def step(model, optimizer, *batch):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=has_aux, argnums=nnx.DiffState(0, optimizer.wrt))
    out, grads = grad_fn(model, *batch)
    if fused:
      _fused_nnx_update(model, optimizer, grads)
    else:
      optimizer.update(model, grads)
    return out

  donated = ("model", "optimizer") if donate else None
  return nnx.jit(step, donate_argnames=donated)


def _fused_nnx_update(model, optimizer, grads) -> None:
  """``optimizer.update(model, grads)`` (flax's ``nnx.Optimizer.update``: params and
  optimizer state as pure arrays, the step, then written back) with ``od.fused_step``."""
  pure = getattr(nnx, "as_pure", None) or nnx.pure
  params = pure(nnx.state(model, optimizer.wrt))
  grad_arrays = pure(nnx.state(grads, optimizer.wrt))
  params, opt_state = _fused.fused_step(optimizer.tx)(params, grad_arrays,
                                                  pure(optimizer.opt_state))
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, nnx.state(opt_state))
  optimizer.step[...] += 1


def linen_train_step(
    loss_fn: Callable[..., Any], *, has_aux: bool = False, donate: bool = True,
    fused: bool = False,
) -> Callable[..., Any]:
  """A jitted linen train step: ``step(state, *batch) -> (state, loss)``.

  For ``flax.training.train_state.TrainState`` (any state with ``params`` and
  ``apply_gradients``): ``loss, grads = jax.value_and_grad(loss_fn)(state.params,
  *batch)``, then ``state.apply_gradients(grads=grads)``, under ``jax.jit``
  with the state donated (``donate_argnums=0``): do not reuse the old state,
  do not build a second ``TrainState`` from the same ``params`` (the first step deletes
  them; copy with ``jax.tree.map(jnp.copy, params)``), and copy (``np.array``) any array
  you want to keep. A deleted input is reported before the call with this advice.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)``),
      typically calling ``model.apply({"params": params}, ...)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the input state's buffers (default True).
    fused: apply the update with :func:`optax_decoupled.fused_step` (one pass over
      memory on CPU; the C++ kernel for ``od.adamw`` with float32 moments) instead of
      ``state.apply_gradients``; same results to round-off, same state.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from flax.training import train_state
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> net = nn.Dense(1)
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    >>> state = train_state.TrainState.create(
    ...     apply_fn=net.apply, params=params,
    ...     tx=od.adamw(1e-2, weight_decay=1e-2, mask=od.exclude_names("bias")))
    >>> loss_fn = lambda p, x, y: ((net.apply({"params": p}, x) - y) ** 2).mean()
    >>> state, loss = odf.linen_train_step(loss_fn)(state, jnp.ones((4, 2)), jnp.zeros((4, 1)))
  """

  def step(state, *batch):
    out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(state.params, *batch)
    if not fused:
      return state.apply_gradients(grads=grads), out
    # TrainState.apply_gradients, with the update and its application in one fused step.
    params, opt_state = _fused.fused_step(state.tx)(state.params, grads, state.opt_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
  if not donate:
    return jitted

  def donating_step(state, *batch):
    _check_not_donated(state, "state")
    return jitted(state, *batch)

  donating_step.lower = jitted.lower  # type: ignore[attr-defined]
  return donating_step


def _check_not_donated(tree: Any, name: str) -> None:
  """A clear error, before the call, for arrays an earlier donating step already consumed."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(x, jax.Array) and x.is_deleted():
      raise RuntimeError(
          f"The train step's {name} holds an array that an earlier call deleted "
          f"({name}{jax.tree_util.keystr(path)}): the step donates its input buffers "
          "(donate=True), so an array passed to one call is gone after it. Pass the state "
          "the previous call returned; do not build two states from the same params "
          "(copy them: jax.tree.map(jnp.copy, params)); or build the step with donate=False."
      )


