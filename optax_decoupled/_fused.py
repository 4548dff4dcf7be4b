"""A one-pass optimizer step for XLA:CPU: the update applied chunk by chunk, in cache.

Why: an Adam-type step is a streaming computation (read θ, g, m, v; write θ, m, v: 28 bytes
per float32 parameter). XLA:CPU cannot emit a multi-output loop fusion, so a jitted
``tx.update`` + ``optax.apply_updates`` becomes three passes over memory (one each for m, v
and θ: ten array streams instead of seven). :func:`fused_step` keeps the *same* transformation
but applies it to one cache-sized chunk of each large leaf at a time inside a ``fori_loop``:
the three passes then run over a chunk that is still in L2 cache, so main memory sees each
array once, and the buffers are updated in place (donate them).

Exactness by construction: the chunk is handed to ``tx.update`` itself (not a re-written
formula), with every other leaf of the tree present as a zero-size stand-in, so name and ndim
masks see the same paths and make the same decisions; the result equals
``tx.update`` + ``optax.apply_updates`` to float round-off (a few ulp at most: XLA may contract
a multiply-add differently inside the chunk's fusion).

This only holds for *elementwise* transformations (each output element depends on the same
element of the inputs and on scalar state such as the step count). Every alias of this package
and optax's Adam/AdamW/SGD family qualify (those whose moments read θ, i.e. coupled L2, take
the plain step: see ``_leaf_in_chunks``); ``optax.clip_by_global_norm`` or any other
transform that reduces over parameters does not, and :func:`fused_step` refuses it at trace
time by inspecting the jaxpr of ``tx.update``. On platforms other than CPU the step is the
plain ``tx.update`` + ``optax.apply_updates`` (accelerators fuse it themselves).

For ``od.adamw`` with float32 moments the CPU step is instead one call of a C++ kernel through
``jax.ffi`` (see ``_kernel.py``): XLA's chunk loop runs on one core, the kernel on all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_decoupled import _flat, _kernel

__all__ = ["fused_step"]

# Primitives that act element by element (or on scalars). Anything else in the jaxpr of
# ``tx.update`` (reductions, dots, gathers, sorts, collectives...) makes chunking unsafe.
_ELEMENTWISE = frozenset([
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "broadcast_in_dim", "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p",
    "cos", "cosh", "div", "eq", "erf", "erf_inv", "exp", "exp2", "expm1", "floor", "ge", "gt",
    "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max",
    "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision",
    "rem", "reshape", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square", "squeeze", "stop_gradient",
    "sub", "tan", "tanh", "xor",
])


def _check_elementwise(jaxpr: Any) -> None:
  """Raises unless every equation (recursively) is elementwise or acts on scalars only."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    subs = [v for v in eqn.params.values() if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
    subs += [b for v in eqn.params.values() if isinstance(v, (tuple, list)) for b in v
             if hasattr(b, "jaxpr") or hasattr(b, "eqns")]
    if subs:
      for sub in subs:
        _check_elementwise(getattr(sub, "jaxpr", sub))
      continue
    if name in _ELEMENTWISE:
      continue
    # Ops on scalars only (schedules, step counts) cannot mix parameter elements.
    if all(getattr(v.aval, "shape", ()) == () for v in eqn.invars):
      continue
    raise ValueError(
        f"fused_step: the transformation's update uses '{name}', which is not elementwise "
        "(a reduction over parameters such as a global-norm clip, a random draw, a dot...). "
        "Applied chunk by chunk it would compute something else. Use tx.update + "
        "optax.apply_updates for this transformation."
    )


def _state_reads_params(tx, grads, state, params) -> bool:
  """Whether ``tx.update``'s new state depends on ``params`` (e.g. coupled L2 moments)."""
  closed = jax.make_jaxpr(lambda p: tx.update(grads, state, p)[1])(params)
  jaxpr = closed.jaxpr
  needed = {v for v in jaxpr.outvars if not hasattr(v, "val")}
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if not hasattr(v, "val"))
  return any(v in needed for v in jaxpr.invars)


def _state_is_chunkable(state, params) -> bool:
  """Every non-scalar state array sits in a subtree laid out exactly like ``params``."""
  p_leaves, treedef = jax.tree.flatten(params)
  items, kinds, _ = _split_state(state, treedef, [tuple(np.shape(p)) for p in p_leaves])
  return all(kind or np.ndim(item) == 0 for item, kind in zip(items, kinds))


def _zero_depending_on(tree: Any) -> jax.Array:
  """An int32 zero that XLA cannot prove to be zero: a data dependency on ``tree``."""
  zero = jnp.int32(0)
  for x in jax.tree.leaves(tree):
    first = lax.dynamic_slice(x.reshape(-1), (0,), (1,))[0]
    bits = lax.bitcast_convert_type(first.astype(jnp.float32), jnp.int32)
    # (bits >>> 31) is 0 or 1; >>> 1 again is always 0.
    zero = zero + lax.shift_right_logical(lax.shift_right_logical(bits, 31), 1)
  return zero


def _split_state(state: Any, treedef: Any, shapes: list[tuple[int, ...]]):
  """Flattens ``state`` into (leaves, def); a parameter-shaped subtree is one 'leaf' (a list)."""

  def is_param_tree(x):
    return _flat.laid_out_like(x, treedef, shapes)

  leaves, sdef = jax.tree.flatten(state, is_leaf=is_param_tree)
  marked = [jax.tree.leaves(x) if is_param_tree(x) else x for x in leaves]
  kinds = [is_param_tree(x) for x in leaves]
  return marked, kinds, sdef


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

  For ``od.adamw`` (``coupling="lr"``, no Nesterov) with float32 moments and float32 or
  bfloat16 parameters (bfloat16 weights: ``mu_dtype=nu_dtype=jnp.float32``),
  the CPU step is a C++ kernel (``csrc/adam_step.cc``, built by the package's install when
  a C++ compiler is present, called through ``jax.ffi``): all leaves in one call, in place,
  on all of XLA's CPU threads. It rounds each operation of the chain as written (XLA fuses
  some multiply-adds), so it equals the pure-JAX step to a few ulp. Every other
  transformation, or a machine where the kernel was not built, takes the pure-JAX chunk loop
  below; ``step.explain(params, grads, state)`` says which path is taken and why.

  Use it inside your jitted train step and donate params and state
  (``jax.jit(step, donate_argnums=(0, 2))``): the buffers are then updated in place and the
  step needs no full-size temporary.

  Args:
    tx: an *elementwise* transformation: any alias of this package (``od.adamw``,
      ``od.adam_l2``, ``od.bert_adamw``, ``od.sgd_l2``), ``optax.adamw``/``adam``/``sgd``,
      also wrapped in ``optax.inject_hyperparams``. Transforms that reduce over parameters
      (global-norm clipping) are refused with a ``ValueError`` at trace time.
    kernel: ``"auto"`` (default: the C++ kernel where it applies, else pure JAX),
      ``"require"`` (a ``ValueError`` at trace time saying why if the kernel cannot compute
      this step) or ``"off"`` (always pure JAX).
    layout: an :class:`FlatLayout` for the flat-buffer mode: the step then takes and returns
      ``layout.pack(params)``, ``layout.pack(grads)`` and ``layout.pack_state(state)``
      (one buffer each, so a many-leaf tree costs what one leaf costs); masks still decide
      per original leaf. Without the kernel it runs ``tx`` on the unpacked tree.
    chunk_size: (pure-JAX path) elements per chunk (default 32768: 128 KiB per float32
      array, so the seven chunk arrays fit in a 2 MiB L2 cache with room to spare; 16K-32K
      elements measured best on this project's machine, 64K and more ~10% slower).
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

  def plain(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def chunked(params, grads, state):
    return _chunked_step(tx, chunk_size, min_leaf_size, params, grads, state)

  spec = _kernel.spec_of(tx)

  def with_kernel(params, grads, state):
    return _kernel.adamw_step(tx, spec, params, grads, state)

  def plan(params, grads, state) -> tuple[str, str]:
    """(path, why): path is "kernel", "chunks" or "plain" (decided at trace time)."""
    jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)
    _check_elementwise(jaxpr.jaxpr)
    why_not = ("kernel='off'" if kernel == "off"
               else _kernel.unsupported(spec, params, grads, state))
    if why_not is None:
      return "kernel", ("the C++ kernel: od.adamw with float32 moments, one pass on all CPU "
                        "threads")
    if kernel == "require":
      raise ValueError(
          f"fused_step(kernel='require'): the CPU kernel cannot compute this step: {why_not}. "
          "Use kernel='auto' to fall back to the pure-JAX path (same results).")
    if _state_reads_params(tx, grads, state, params):
      # Coupled L2 (λθ enters the moments): the in-place chunk order below needs the new
      # state to be computable after θ is written, so this transform takes the plain path.
      return "plain", f"the new state reads θ (coupled L2); no kernel: {why_not}"
    if not _state_is_chunkable(state, params):
      # Per-parameter arrays not laid out like the params (e.g. optax.masked around a
      # stateful transform keeps moments for a subset of leaves): cannot be sliced per leaf.
      return "plain", f"the state is not laid out like the params; no kernel: {why_not}"
    return "chunks", f"the pure-JAX chunk loop; no kernel: {why_not}"

  def step(params, grads, state):
    path, _ = plan(params, grads, state)
    if path == "plain":
      return plain(params, grads, state)
    cpu = with_kernel if path == "kernel" else chunked
    return lax.platform_dependent(params, grads, state, cpu=cpu, default=plain)

  if layout is not None:
    step, plan = _on_flat_buffers(tx, spec, kernel, layout, plain)

  def explain(params, grads, state) -> str:
    """Which path the CPU step takes for these arguments, and why."""
    path, why = plan(params, grads, state)
    return f"{path}: {why}"

  step.explain = explain
  return step


def _on_flat_buffers(tx, spec, kernel, layout, plain):
  """(step, plan) of ``fused_step(tx, layout=layout)``: params, grads and the parameter-
  shaped state are single buffers (``layout.pack`` / ``layout.pack_state``)."""
  if not isinstance(layout, _flat.FlatLayout):
    raise TypeError(f"fused_step: layout must be an od.FlatLayout, got {type(layout).__name__}.")

  def unpacked(flat, flat_grads, state):
    """The plain step on the unpacked tree, packed again (any transformation)."""
    params, state = plain(layout.unpack(flat), layout.unpack(flat_grads),
                          layout.unpack_state(state))
    return layout.pack(params), layout.pack_state(state)

  def with_kernel(flat, flat_grads, state):
    return _kernel.adamw_flat_step(tx, spec, layout, flat, flat_grads, state)

  def plan(flat, flat_grads, state):
    why_not = "kernel='off'" if kernel == "off" else _kernel.unsupported(
        spec, layout.unpack(flat), layout.unpack(flat_grads), layout.unpack_state(state))
    if why_not is None:
      return "kernel", ("the C++ kernel on one flat buffer: od.adamw with float32 moments, one "
                        "pass on all CPU threads, decay decided per original leaf")
    if kernel == "require":
      raise ValueError(
          f"fused_step(kernel='require'): the CPU kernel cannot compute this step: {why_not}. "
          "Use kernel='auto' to fall back to the pure-JAX path (same results).")
    return "unpacked", f"tx.update on the unpacked tree, packed again; no kernel: {why_not}"

  def step(flat, flat_grads, state):
    if plan(flat, flat_grads, state)[0] == "unpacked":
      return unpacked(flat, flat_grads, state)
    return lax.platform_dependent(flat, flat_grads, state, cpu=with_kernel, default=unpacked)

  return step, plan


def _chunked_step(tx, chunk_size, min_leaf_size, params, grads, state):
  p_leaves, treedef = jax.tree.flatten(params)
  try:
    g_leaves = treedef.flatten_up_to(grads)
  except ValueError as e:
    raise ValueError(f"fused_step: grads and params have different tree structures: {e}") from e
  p_leaves = [jnp.asarray(p) for p in p_leaves]
  g_leaves = [jnp.asarray(g) for g in g_leaves]
  s_items, s_kinds, s_def = _split_state(state, treedef, [tuple(p.shape) for p in p_leaves])
  param_js = [j for j, kind in enumerate(s_kinds) if kind]  # the parameter-shaped state trees

  def call(given: dict[int, tuple[Any, Any, list]]):
    """``tx`` + ``apply_updates`` on the tree whose leaf k holds ``given[k] = (θ, g, state
    leaves)``; every other leaf is a zero-size stand-in (same path and ndim, so masks decide
    as on the real tree). Returns {k: (new θ, new state leaves)} and the new state items."""
    tp = [given[k][0] if k in given else _flat.standin(p) for k, p in enumerate(p_leaves)]
    tg = [given[k][1] if k in given else _flat.standin(g) for k, g in enumerate(g_leaves)]
    ts = list(s_items)
    for pos, j in enumerate(param_js):
      ts[j] = treedef.unflatten([given[k][2][pos] if k in given else _flat.standin(x)
                                 for k, x in enumerate(s_items[j])])
    tp, tg = treedef.unflatten(tp), treedef.unflatten(tg)
    updates, new_state = tx.update(tg, s_def.unflatten(ts), tp)
    new_p = treedef.flatten_up_to(optax.apply_updates(tp, updates))
    new_items, _, _ = _split_state(new_state, treedef,
                                   [tuple(x.shape) for x in treedef.flatten_up_to(tp)])
    return {k: (new_p[k], [new_items[j][k] for j in param_js]) for k in given}, new_items

  # Leaves below min_leaf_size, and the scalar state (counts), in one plain call. So are
  # leaves with any non-float32 array (θ, g or state): with dtype conversions in the chunk's
  # fusions XLA no longer keeps the writes in place and copies the full buffer on every
  # iteration (measured: a bfloat16 leaf of 1e7 took 1.5 s instead of 5 ms).
  def float32_only(k):
    arrays = [p_leaves[k], g_leaves[k], *(s_items[j][k] for j in param_js)]
    return all(x.dtype == jnp.float32 for x in arrays)

  big = [k for k, p in enumerate(p_leaves) if p.size >= min_leaf_size and float32_only(k)]
  small = {k: (p_leaves[k], g_leaves[k], [s_items[j][k] for j in param_js])
           for k in range(len(p_leaves)) if k not in big}
  done, new_items = call(small)
  for k in big:
    leaf_call = lambda pc, gc, sc, k=k: call({k: (pc, gc, sc)})[0][k]
    done[k] = _leaf_in_chunks(leaf_call, p_leaves[k], g_leaves[k],
                              [s_items[j][k] for j in param_js], chunk_size)
  out_p = [done[k][0] for k in range(len(p_leaves))]
  for pos, j in enumerate(param_js):
    new_items[j] = treedef.unflatten([done[k][1][pos] for k in range(len(p_leaves))])
  return treedef.unflatten(out_p), s_def.unflatten(new_items)


def _leaf_in_chunks(leaf_call, p, g, s_leaves, chunk_size):
  """Updates one leaf (θ and its state leaves) chunk by chunk, in place, in a ``fori_loop``.

  ``leaf_call(θ_chunk, g_chunk, state_chunks) -> (new θ_chunk, new state_chunks)``.
  """
  n, nd = p.size, p.ndim
  g_flat = g.reshape(-1)

  def compute(pf, sf, start, size):
    """The chunk's new (θ, state leaves), read from the buffers at ``start``."""
    shape = (1,) * (nd - 1) + (size,)
    def sl(x):
      return lax.dynamic_slice(x, (start,), (size,)).reshape(shape)
    new_p, new_s = leaf_call(sl(pf), sl(g_flat), [sl(x) for x in sf])
    return new_p.reshape(-1), [x.reshape(-1) for x in new_s]

  def chunk(pf, sf, start, size, keep=0):
    """Updates θ and the state in place on [start, start + size) (the last ``keep`` only).

    θ is written first, by a fusion that reads the old θ, g and state there. The state is
    then recomputed and written at an offset made to depend on the written θ (a zero XLA
    cannot see through), so XLA orders it after those reads and needs no copy; the new state
    must therefore not depend on θ (checked by ``fused_step``).
    """
    cut = size - keep if keep else 0
    new_p, _ = compute(pf, sf, start, size)
    pf = lax.dynamic_update_slice(pf, new_p[cut:], (start + cut,))
    after = start + _zero_depending_on(lax.dynamic_slice(pf, (start + size - 1,), (1,)))
    _, new_s = compute(pf, sf, after, size)
    sf = [lax.dynamic_update_slice(x, y[cut:], (after + cut,)) for x, y in zip(sf, new_s)]
    return pf, sf

  pf = p.reshape(-1)
  sf = [x.reshape(-1) for x in s_leaves]
  n_full, tail = divmod(n, chunk_size)
  if tail:  # the ragged end first: a full chunk ending at n, of which the last `tail` are kept.
    pf, sf = chunk(pf, sf, n - chunk_size, chunk_size, keep=tail)
  pf, sf = lax.fori_loop(
      0, n_full, lambda i, c: chunk(c[0], c[1], i * chunk_size, chunk_size), (pf, sf))
  return pf.reshape(p.shape), [x.reshape(y.shape) for x, y in zip(sf, s_leaves)]
