"""``od.fused_step``: one optimizer step in one pass over memory, or the plain step.

Dispatch only. For each call the plan (:func:`_plan`, decided at trace time and shown by
``step.explain``) picks one of:

* ``"kernel"``: the C++ kernel (``_kernel``) for the transformations it recognises;
* ``"chunks"``: the pure-JAX chunk loop (``_chunks``) for any other elementwise
  transformation whose state is laid out like the params;
* ``"plain"``: ``tx.update`` + ``optax.apply_updates``.

The same plan serves the tree mode and the flat-buffer mode (``layout=``), where the
fallback (``"unpacked"``) is the plain step on the unpacked tree. On platforms other than CPU the step is
always the plain one (accelerators fuse it themselves).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax import lax

from optax_decoupled import _chunks, _flat, _kernel, _programs, _step_trace, _targets

__all__ = ["fused_step"]


def fused_step(
    tx: optax.GradientTransformation,
    *,
    kernel: str = "auto",
    layout: _flat.FlatLayout | None = None,
    chunk_size: int = 32768,
    min_leaf_size: int = 2**21,
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  r"""One optimizer step, ``(params, grads, state) -> (params, state)``, in one memory pass.

  .. math:: (\theta_t, s_t) = \text{apply\_updates}(\theta_{t-1},\ \text{tx.update}(g_t, s_{t-1},
     \theta_{t-1}))

  computed chunk by chunk on CPU so that each array crosses main memory once (see the module
  docstring); on other platforms it is exactly ``tx.update`` followed by
  ``optax.apply_updates``. The state is ``tx.init(params)``'s, unchanged, so the fused and the
  plain step can be swapped at any time (and checkpoints do not change). Decay convention: the
  one of ``tx`` (this only changes how the step is scheduled on the hardware).

  For ``od.adamw`` (any coupling, Nesterov too), ``od.bert_adamw``, ``od.adam_l2`` and
  ``optax.adamw``, with any mask or ``od.decay_multipliers``, float32 moments and float32 or
  bfloat16 parameters (bfloat16 weights: ``mu_dtype=nu_dtype=jnp.float32``), also as
  ``optax.inject_hyperparams(od.adamw)`` and behind ``optax.clip_by_global_norm`` (in an
  ``optax.chain`` of two; float32 gradients), the CPU step is a C++ kernel
  (``csrc/adam_step.cc``, built by the package's install when a C++ compiler is present,
  called through ``jax.ffi``): one call per 32 leaves, in place, on all of XLA's CPU
  threads. With sharded arrays (FSDP) each device runs it on its own shard
  (``custom_partitioning``): no gather, no collective, shardings kept; inside
  ``jax.shard_map`` it runs on the local blocks. It rounds each operation of the chain as
  written (XLA fuses some multiply-adds), so it equals the pure-JAX step to a few ulp.
  Every other transformation, or a machine where the kernel was not built, takes the
  pure-JAX chunk loop below; ``step.explain(params, grads, state)`` says which path is taken
  and why.

  Use it inside your jitted train step and donate params and state
  (``jax.jit(step, donate_argnums=(0, 2))``): the buffers are then updated in place and the
  step needs no full-size temporary.

  Differentiating the step (``jax.grad``/``jax.jvp`` through it, as in meta-learning) gives
  the plain step's derivative: the kernel has no derivative of its own, so a kernel step (or
  a chunk loop that runs a custom-derivative function as its primal program) differentiates
  the plain step; any other chunk loop runs the plain step's operations and is
  differentiated itself. ``jax.export`` of a
  kernel step for CPU fails with JAX's error on custom calls without compatibility guarantees;
  export ``fused_step(tx, kernel="off")`` instead (accelerators export the plain step).

  Args:
    tx: an *elementwise* transformation: any alias of this package (``od.adamw``,
      ``od.adam_l2``, ``od.bert_adamw``, ``od.sgd_l2``), ``optax.adamw``/``adam``/``sgd``,
      also wrapped in ``optax.inject_hyperparams``, optionally with reductions to one
      scalar (``optax.clip_by_global_norm`` anywhere in an ``optax.chain``, ``optax.lamb``'s
      trust ratios: computed in one pass over the whole arrays before the chunk loop).
      Reductions to arrays (a norm per row), dots and random draws are refused with a
      ``ValueError`` at trace time.
    kernel: ``"auto"`` (default: the C++ kernel where it applies, else pure JAX),
      ``"require"`` (a ``ValueError`` at trace time saying why if the kernel cannot compute
      this step) or ``"off"`` (always pure JAX).
    layout: an :class:`FlatLayout` for the flat-buffer mode: the step then takes and returns
      ``layout.pack(params)``, ``layout.pack(grads)`` and ``layout.pack_state(state)``
      (one buffer each, so a many-leaf tree costs what one leaf costs); masks still decide
      per original leaf. Without the kernel it runs ``tx`` on the unpacked tree.
    chunk_size: (pure-JAX path) elements per chunk (default 32768: 128 KiB per float32
      array, so the seven chunk arrays fit in a 2 MiB L2 cache with room to spare).
    min_leaf_size: (pure-JAX path) leaves with fewer elements take the plain path (default
      2**21: below that, θ, g, m and v of a leaf fit in a 32 MiB L3 cache together, XLA's
      three passes mostly hit the cache, and its two-thread loops are faster than the
      one-thread chunk loop). Must be >= ``chunk_size``.

  Returns:
    ``step(params, grads, state) -> (new_params, new_state)``, with an ``explain(params,
    grads, state) -> str`` attribute.

  Example:
    >>> import jax, jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.adamw(1e-3, weight_decay=1e-2)
    >>> params = {"w": jnp.ones(3_000_000), "b": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> step = jax.jit(od.fused_step(tx), donate_argnums=(0, 2))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> params, state = step(params, grads, state)
    >>> od.fused_step(tx).explain(params, grads, state).split(":")[0] in ("kernel", "chunks")
    True

  References:
    The idea of a single fused multi-tensor kernel is torch's ``AdamW(fused=True)``
    (``aten/src/ATen/native/cpu/FusedAdamKernel.cpp``); the kernel follows optax's formulas
    instead (torch folds the bias corrections into the step size), and the fallback
    expresses the same one-pass schedule in plain XLA.
  """
  if kernel not in ("auto", "require", "off"):
    raise ValueError(f"fused_step: kernel must be 'auto', 'require' or 'off', got {kernel!r}.")
  if not isinstance(chunk_size, int) or chunk_size < 1024:
    raise ValueError(f"fused_step: chunk_size must be an int >= 1024, got {chunk_size!r}.")
  if not isinstance(min_leaf_size, int) or min_leaf_size < chunk_size:
    raise ValueError(
        f"fused_step: min_leaf_size must be an int >= chunk_size={chunk_size}, got "
        f"{min_leaf_size!r}.")
  if layout is not None and not isinstance(layout, _flat.FlatLayout):
    raise TypeError(f"fused_step: layout must be an od.FlatLayout, got {type(layout).__name__}.")
  target, not_recognised = _targets.target_of(tx)
  clip = _targets.split_clip(tx)

  def plain(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def as_tree(params, grads, state):
    if layout is None:
      return params, grads, state
    return layout.unpack(params), layout.unpack(grads), layout.unpack_state(state)

  def plan(params, grads, state) -> tuple[str, str, _kernel.Prepared | None]:
    """(path, why, what the kernel needs), decided at trace time; the path is "kernel",
    "chunks", "plain" or (flat mode) "unpacked"."""
    params, grads, state = as_tree(params, grads, state)
    why_not: str | None
    prepared = None
    if kernel == "off":
      why_not = "kernel='off'"
    elif target is None:
      why_not = not_recognised
    else:
      prepared, why_not = _kernel.prepare(target, tx, params, grads, state)
    if prepared is not None:
      where = "one flat buffer, decay decided per original leaf" if layout else "all leaves"
      clipped = ", the global-norm clip applied as g is read" if clip else ""
      return "kernel", (f"the C++ kernel: the Adam step and its decay term with float32 "
                        f"moments{clipped}, one pass on all CPU threads over {where}, per shard "
                        "when sharded"), prepared
    tree = None
    if layout is None:  # the flat mode never chunks: its fallback runs tx on the tree.
      tree = _step_trace.StepTree(params, grads, state, min_leaf_size)
      _programs.check_elementwise(_step_trace.whole_program(tx, tree).jaxpr)
    if kernel == "require":
      raise ValueError(
          f"fused_step(kernel='require'): the CPU kernel cannot compute this step: {why_not}. "
          "Use kernel='auto' to fall back to the pure-JAX path (same results).")
    if tree is None:
      return "unpacked", f"tx.update on the unpacked tree, packed again; no kernel: {why_not}", None
    if not tree.big:
      return "plain", (f"no float32 leaf has min_leaf_size={min_leaf_size} elements (smaller "
                       f"ones fit in cache, where the plain step is as fast); no kernel: "
                       f"{why_not}"), None
    if not _chunks.state_is_chunkable(tree):
      # Per-parameter arrays not laid out like the params (e.g. optax.masked around a
      # stateful transform keeps moments for a subset of leaves): cannot be sliced per leaf.
      return "plain", f"the state is not laid out like the params; no kernel: {why_not}", None
    refused = _chunks.splits_per_leaf(tx, chunk_size, tree)
    if refused is not None:
      return "plain", f"{refused}; no kernel: {why_not}", None
    first = _chunks.reduced_reads(tx, chunk_size, tree)
    first = f" after one pass for {first}" if first else ""
    return "chunks", f"the pure-JAX chunk loop{first}; no kernel: {why_not}", None

  def fallback(params, grads, state):
    if layout is None:  # the same program as the plan's whole-tree trace (traced once).
      return _step_trace.plain_step(tx, params, grads, state)
    new_params, new_state = plain(*as_tree(params, grads, state))
    return layout.pack(new_params), layout.pack_state(new_state)

  def step(params, grads, state):
    path, _, prepared = plan(params, grads, state)
    if path in ("plain", "unpacked"):
      return fallback(params, grads, state)
    if path == "chunks":  # off CPU the large leaves take the plain step's values (inside).
      def chunks(p, g, s):
        return _chunks.chunked_step(tx, chunk_size, min_leaf_size, p, g, s)
      # The loop runs custom-derivative calls as their primal programs: then differentiate
      # the plain step. (Otherwise the loop's derivative is the plain step's: the same ops.)
      if _chunks.has_custom_derivatives(tx, params, grads, state):
        chunks = jax.custom_jvp(chunks)
        chunks.defjvp(lambda primals, tangents: jax.jvp(fallback, primals, tangents))
      return chunks(params, grads, state)

    def kernel_step(p, g, s, new_state):
      # new_state (prepared.new_state) is an argument, not closed over, so that the step
      # stays a function of its inputs under custom_jvp.
      ready = dataclasses.replace(prepared, new_state=new_state)
      if layout is None:
        return _kernel.adamw_step(ready, p, g, s)
      return _kernel.adamw_flat_step(ready, layout, p, g, s)

    def fast(p, g, s, new_state):
      return lax.platform_dependent(p, g, s, new_state, cpu=kernel_step,
                                    default=lambda p, g, s, _: fallback(p, g, s))

    # The FFI call has no derivative: differentiate the plain step.
    fast = jax.custom_jvp(fast)
    fast.defjvp(lambda primals, tangents: jax.jvp(fallback, primals[:3], tangents[:3]))
    return fast(params, grads, state, prepared.new_state)

  def explain(params, grads, state) -> str:
    """Which path the CPU step takes for these arguments, and why."""
    path, why, _ = plan(params, grads, state)
    return f"{path}: {why}"

  step.explain = explain  # type: ignore[attr-defined]
  return step
