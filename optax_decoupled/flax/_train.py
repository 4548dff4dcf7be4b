"""Jitted train steps for Flax nnx and linen, with ``optimizer.update`` or ``od.fused_step``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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

  The optimizer is an ``nnx.Optimizer`` (or an ``nnx.ModelAndOptimizer`` of ``model``).

  Raises:
    TypeError: at the call, for arguments that are not ``(nnx.Module, nnx.Optimizer)``
      (swapped, or a bare optax transform); at tracing, for a loss that is not a float
      scalar, or an output that does not match ``has_aux``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, od.adamw(1e-2, mask=od.min_ndim(2)), wrt=nnx.Param)
    >>> step = odf.nnx_train_step(lambda m, x, y: ((m(x) - y) ** 2).mean())
    >>> loss = step(model, opt, jnp.ones((4, 2)), jnp.zeros((4, 1)))
  """

  checked_loss = _checked_loss(loss_fn, has_aux, "nnx_train_step")

  def step(model, optimizer, *batch):
    grad_fn = nnx.value_and_grad(checked_loss, has_aux=has_aux,
                                 argnums=nnx.DiffState(0, optimizer.wrt))
    out, grads = grad_fn(model, *batch)
    if fused:
      _fused_nnx_update(model, optimizer, grads)
    else:
      # nnx.ModelAndOptimizer.update takes the gradients only; the model is its own.
      nnx.Optimizer.update(optimizer, model, grads)
    return out

  donated = ("model", "optimizer") if donate else None
  jitted = nnx.jit(step, donate_argnames=donated)

  def checked_step(model, optimizer, *batch):
    _check_nnx_arguments(model, optimizer)
    return jitted(model, optimizer, *batch)

  for name in ("lower", "trace", "eval_shape"):
    setattr(checked_step, name, getattr(jitted, name))
  return checked_step


def _check_nnx_arguments(model: Any, optimizer: Any) -> None:
  """A clear error, before tracing, for arguments that are not ``(model, optimizer)``."""
  call = "nnx_train_step(loss_fn)(model, optimizer, *batch)"
  if isinstance(model, nnx.Optimizer) and isinstance(optimizer, nnx.Module):
    raise TypeError(f"{call}: the model comes first, then the optimizer; got them swapped.")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{call}: model must be an nnx.Module, got {type(model).__name__}. For "
                    "linen parameters and a TrainState use odf.linen_train_step.")
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        f"{call}: optimizer must be an nnx.Optimizer, got {type(optimizer).__name__}. Wrap "
        "the transform: nnx.Optimizer(model, tx, wrt=nnx.Param).")
  own = getattr(optimizer, "model", None)
  if isinstance(optimizer, nnx.ModelAndOptimizer) and own is not model:
    raise ValueError(f"{call}: this nnx.ModelAndOptimizer holds another model "
                     f"({type(own).__name__}) than the one passed: pass its .model.")


def _checked_loss(loss_fn: Callable[..., Any], has_aux: bool, who: str) -> Callable[..., Any]:
  """``loss_fn``, whose output is checked at trace time: a scalar float loss (and an aux)."""
  if not callable(loss_fn):
    raise TypeError(f"{who}(loss_fn): loss_fn must be callable, got {type(loss_fn).__name__}.")

  @functools.wraps(loss_fn)
  def checked(*args):
    out = loss_fn(*args)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):  # jax takes a tuple only
        raise TypeError(
            f"{who}(loss_fn, has_aux=True): loss_fn must return a pair (loss, aux), got "
            f"{_describe_output(out)}. Return (loss, aux), or build the step with "
            "has_aux=False.")
      loss = out[0]
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(
            f"{who}(loss_fn): loss_fn returned {_describe_output(out)}, not a scalar loss. "
            "If it returns (loss, aux), build the step with has_aux=True.")
      loss = out
    shape = tuple(np.shape(loss))
    dtype = getattr(loss, "dtype", None) or np.result_type(type(loss))
    if shape or not jnp.issubdtype(dtype, jnp.floating):
      fix = ("Reduce it, e.g. return jnp.mean(per_example_losses)" if shape else
             "Compute it in floating point (gradients of integers are not defined)")
      raise TypeError(
          f"{who}(loss_fn): the loss must be a float scalar (shape ()), got "
          f"{_describe_output(loss)}. {fix}"
          + (", and return aux in the second slot." if has_aux else "."))
    return out

  return checked


def _describe_output(out: Any) -> str:
  if isinstance(out, (tuple, list)):
    return f"a {type(out).__name__} of {len(out)}"
  if hasattr(out, "shape") and hasattr(out, "dtype"):
    return f"an array {np.dtype(out.dtype).name}{list(out.shape)}"
  return f"a {type(out).__name__}"


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

  Raises:
    TypeError: at the call, for a ``state`` without ``params`` and ``apply_gradients``;
      at tracing, for a loss that is not a float scalar, or an output that does not
      match ``has_aux``.
    RuntimeError: with ``donate``, for a state holding an array an earlier call deleted.

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

  checked_loss = _checked_loss(loss_fn, has_aux, "linen_train_step")

  def step(state, *batch):
    out, grads = jax.value_and_grad(checked_loss, has_aux=has_aux)(state.params, *batch)
    if not fused:
      return state.apply_gradients(grads=grads), out
    # TrainState.apply_gradients, with the update and its application in one fused step.
    params, opt_state = _fused.fused_step(state.tx)(state.params, grads, state.opt_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())

  def donating_step(state, *batch):
    if not (hasattr(state, "params") and hasattr(state, "apply_gradients")):
      raise TypeError(
          "linen_train_step(loss_fn)(state, *batch): state must be a TrainState (anything "
          f"with params and apply_gradients), got {type(state).__name__}. Build it with "
          "train_state.TrainState.create(apply_fn=..., params=params, tx=tx).")
    if donate:
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


