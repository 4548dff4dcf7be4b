"""``od.fused_step``: one optimizer step through the C++ kernel, or exactly the plain step.

Dispatch only. For each call the plan (:func:`_plan`, decided at trace time and shown by
``step.explain``) picks one of:

* ``"kernel"``: the C++ kernel (``_kernel``) for the Adam chains it computes (``_targets``);
* ``"plain"``: ``tx.update`` + ``optax.apply_updates``, for everything else, and whenever
  there is any doubt (the reason is in ``explain``).

The flat-buffer mode (``layout=``) has the same plan; its plain step is ``tx`` on the
unpacked tree, packed again. Off CPU the step is always the plain one
(``lax.platform_dependent``: accelerators fuse it themselves).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax import lax

from optax_decoupled import _flat, _kernel, _targets, _verify

__all__ = ["fused_step"]


def fused_step(
    tx: optax.GradientTransformation,
    *,
    kernel: str = "auto",
    layout: _flat.FlatLayout | None = None,
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  r"""One optimizer step, ``(params, grads, state) -> (params, state)``, in one memory pass.

  .. math:: (\theta_t, s_t) = \text{apply\_updates}(\theta_{t-1},\ \text{tx.update}(g_t, s_{t-1},
     \theta_{t-1}))

  For ``od.adamw`` (any coupling, Nesterov too), ``od.bert_adamw``, ``od.adam_l2`` and
  ``optax.adamw``, with any mask or ``od.decay_multipliers``, float32 moments and float32 or
  bfloat16 parameters (bfloat16 weights: ``mu_dtype=nu_dtype=jnp.float32``), also as
  ``optax.inject_hyperparams(od.adamw)`` and behind ``optax.clip_by_global_norm`` (in an
  ``optax.chain`` of two; float32 gradients), the CPU step is a C++ kernel
  (``csrc/adam_step.cc``, compiled on first use against the installed jaxlib when a C++
  compiler is present, called through ``jax.ffi``): one call per 32 leaves, in place, on
  all of XLA's CPU threads, so that each array crosses main memory once. With sharded
  arrays (FSDP) each device runs it on its own shard (``custom_partitioning``): no gather,
  no collective, shardings kept; inside ``jax.shard_map`` it runs on the local blocks. It
  rounds each operation of the chain as written (XLA fuses some multiply-adds), so it equals
  the plain step to a few ulp.

  Every other transformation, and every case the kernel does not cover, is exactly
  ``tx.update`` followed by ``optax.apply_updates``: a slowdown, never an error and never
  other numbers. ``step.explain(params, grads, state)`` says which path is taken and why.
  The state is ``tx.init(params)``'s, unchanged, so the fused and the plain step can be
  swapped at any time (and checkpoints do not change). Decay convention: the one of ``tx``
  (this only changes how the step is scheduled on the hardware).

  Use it inside your jitted train step and donate params and state
  (``jax.jit(step, donate_argnums=(0, 2))``): the buffers are then updated in place.

  Under ``jax.grad``/``jax.jvp`` (as in meta-learning, also with respect to a learning rate
  or weight decay the transformation closes over) a kernel step has the plain step's
  derivative; under ``jax.vmap`` (e.g. a sweep over a closed-over learning rate) the kernel
  runs once per batch element. ``jax.export`` of a kernel step for CPU fails with JAX's error
  on custom calls without compatibility guarantees; export ``fused_step(tx, kernel="off")``
  instead (accelerators export the plain step).

  Args:
    tx: any ``optax.GradientTransformation``.
    kernel: ``"auto"`` (default: the C++ kernel where it applies, else the plain step),
      ``"require"`` (a ``ValueError`` at trace time saying why if the kernel cannot compute
      this step) or ``"off"`` (always the plain step).
    layout: an :class:`FlatLayout` for the flat-buffer mode: the step then takes and returns
      ``layout.pack(params)``, ``layout.pack(grads)`` and ``layout.pack_state(state)``
      (one buffer each, so a many-leaf tree costs what one leaf costs); masks still decide
      per original leaf.

  Returns:
    ``step(params, grads, state) -> (new_params, new_state)``, with an ``explain(params,
    grads, state) -> str`` attribute: ``"kernel: why"`` or ``"plain: why"``, and with
    ``kernel="require"`` where the kernel cannot run, ``"error: why"`` (the step raises;
    ``explain`` does not).

  Raises:
    TypeError: at once, if ``tx`` is not a gradient transformation.

  Example:
    >>> import jax, jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.adamw(1e-3, weight_decay=1e-2)
    >>> params = {"w": jnp.ones(3_000_000), "b": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> step = jax.jit(od.fused_step(tx), donate_argnums=(0, 2))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> params, state = step(params, grads, state)
    >>> od.fused_step(tx).explain(params, grads, state).split(":")[0] in ("kernel", "plain")
    True

  References:
    The idea of a single fused multi-tensor kernel is torch's ``AdamW(fused=True)``
    (``aten/src/ATen/native/cpu/FusedAdamKernel.cpp``); the kernel follows optax's formulas
    instead (torch folds the bias corrections into the step size).
  """
  _check_transformation(tx)
  if kernel not in ("auto", "require", "off"):
    raise ValueError(f"fused_step: kernel must be 'auto', 'require' or 'off', got {kernel!r}.")
  if layout is not None and not isinstance(layout, _flat.FlatLayout):
    raise TypeError(f"fused_step: layout must be an od.FlatLayout, got {type(layout).__name__}.")
  target, not_recognised = _targets.target_of(tx)

  def as_tree(params, grads, state):
    if layout is None:
      return params, grads, state
    return layout.unpack(params), layout.unpack(grads), layout.unpack_state(state)

  def plain(params, grads, state):
    if layout is not None:
      params, grads, state = as_tree(params, grads, state)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if layout is not None:
      return layout.pack(params), layout.pack_state(state)
    return params, state

  def plan(params, grads, state) -> tuple[str, str, _kernel.Prepared | None]:
    """(path, why, what the kernel needs), decided at trace time; path is "kernel",
    "plain" or "error" (kernel='require' without a kernel: the step raises ``why``)."""
    if kernel == "off":
      why_not: str | None = "kernel='off'"
      prepared = None
    else:
      prepared, why_not = _kernel_plan(tx, target, not_recognised, *as_tree(params, grads,
                                                                            state))
    if prepared is not None:
      where = "one flat buffer, decay decided per original leaf" if layout else "all leaves"
      clipped = (", the global-norm clip applied as g is read"
                 if target is not None and target.max_norm is not None else "")
      return "kernel", (f"the C++ kernel: the Adam step and its decay term with float32 "
                        f"moments{clipped}, one pass on all CPU threads over {where}, per shard "
                        "when sharded"), prepared
    if kernel == "require":
      return "error", (
          f"fused_step(kernel='require'): the CPU kernel cannot compute this step: {why_not}. "
          "Use kernel='auto' to take the plain step instead (same results)."), None
    unpacked = " on the unpacked tree, packed again" if layout else ""
    return "plain", f"tx.update + optax.apply_updates{unpacked}; no kernel: {why_not}", None

  def step(params, grads, state):
    path, why, _ = plan(params, grads, state)
    if path == "error":
      raise ValueError(why)
    if path == "plain":
      return plain(params, grads, state)

    def kernel_step(p, g, s):
      # Prepared again from this function's own arguments, so that nothing it uses is
      # closed over from the plan's trace (the new scalar state comes from these s).
      ready, _ = _kernel.prepare(target, tx, *as_tree(p, g, s))
      if ready is None:  # the plan's checks passed on the same avals; never a crash if not.
        return plain(p, g, s)
      if layout is None:
        return _kernel.adamw_step(ready, p, g, s)
      return _kernel.adamw_flat_step(ready, layout, p, g, s)

    def fast(p, g, s):
      return lax.platform_dependent(p, g, s, cpu=kernel_step, default=plain)

    return _with_plain_derivative(fast, plain, params, grads, state)

  def explain(params, grads, state) -> str:
    """Which path the CPU step takes for these arguments, and why (``"error: ..."`` where
    ``kernel='require'`` makes the step raise; explain itself does not)."""
    path, why, _ = plan(params, grads, state)
    return f"{path}: {why}"

  step.explain = explain  # type: ignore[attr-defined]
  return step


def _check_transformation(tx: Any) -> None:
  if isinstance(tx, optax.GradientTransformation) or (
      callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    return
  hint = (" (a function: call it to build the transformation, e.g. od.adamw(1e-3))"
          if callable(tx) else "")
  raise TypeError(f"fused_step: tx must be an optax.GradientTransformation, got "
                  f"{type(tx).__name__}{hint}.")


def _kernel_plan(tx, target, not_recognised, params, grads, state):
  """``(prepared, None)`` when the kernel computes this step as the plain step would, else
  ``(None, why not)``."""
  if target is None:
    return None, not_recognised
  why = _same_layout(params, grads) or _explicit_mesh()
  if why is not None:
    return None, why
  prepared, why = _kernel.prepare(target, tx, params, grads, state)
  if prepared is None:
    return None, why
  if target.read_from_closures:
    why = _verify.kernel_agrees(tx, target, params, grads)
    if why is not None:
      return None, why
  return prepared, None


def _same_layout(params: Any, grads: Any) -> str | None:
  """Why the kernel cannot pair θ and g leaf by leaf, or None (the plain step then gives
  optax's own error or broadcasting)."""
  try:
    same = jax.tree.leaves(jax.tree.map(lambda p, g: np.shape(p) == np.shape(g), params, grads))
  except (ValueError, TypeError):
    return "grads and params have different tree structures"
  if len(same) != len(jax.tree.leaves(grads)):
    return "grads and params have different tree structures"
  if not all(same):
    return "grads and params have leaves of different shapes"
  return None


def _explicit_mesh() -> str | None:
  """Under ``jax.set_mesh`` with ``AxisType.Explicit`` axes, array types carry their sharding
  and the two branches of ``lax.platform_dependent`` must agree on it, which the kernel's
  per-shard call does not: the plain step then."""
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  if explicit is None or get_mesh is None:
    return None
  if explicit in tuple(getattr(get_mesh(), "axis_types", None) or ()):
    return ("the step is traced under jax.set_mesh with Explicit mesh axes (types carry the "
            "sharding)")
  return None


def _with_plain_derivative(fast, plain, params, grads, state):
  """``fast(params, grads, state)``, differentiated as ``plain`` (the FFI call has no
  derivative).

  Values the step closes over (a learning rate or weight decay traced by an outer
  ``jax.grad``, ``jax.jvp``, ``jax.vmap`` or ``jax.jit``) become explicit arguments
  (``jax.closure_convert``), so the derivative also flows to them."""
  fast_c, fast_consts = jax.closure_convert(fast, params, grads, state)
  if not fast_consts:  # nothing traced from outside: plain's derivative w.r.t. the arguments.
    simple = jax.custom_jvp(lambda p, g, s: fast_c(p, g, s))
    # The primal output is the custom_jvp function itself, so that a derivative of the
    # derivative (a Hessian, jacfwd of grad) also goes through this rule, not the FFI call.
    simple.defjvp(lambda primals, tangents: (simple(*primals),
                                             jax.jvp(plain, primals, tangents)[1]))
    return simple(params, grads, state)
  plain_c, plain_consts = jax.closure_convert(plain, params, grads, state)

  @jax.custom_jvp
  def run(p, g, s, f_consts, p_consts):
    del p_consts
    return fast_c(p, g, s, *f_consts)

  @run.defjvp
  def _(primals, tangents):
    p, g, s, f_consts, p_consts = primals
    tp, tg, ts, _, tc = tangents
    out = run(p, g, s, f_consts, p_consts)  # higher derivatives: this rule again.
    _, t_out = jax.jvp(lambda p, g, s, c: plain_c(p, g, s, *c), (p, g, s, p_consts),
                       (tp, tg, ts, tc))
    return out, t_out

  return run(params, grads, state, list(fast_consts), list(plain_consts))

