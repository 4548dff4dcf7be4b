"""The pure-JAX one-pass step: ``tx.update`` applied chunk by chunk, in cache.

An Adam-type step is a streaming computation (read θ, g, m, v; write θ, m, v: 28 bytes per
float32 parameter). XLA:CPU cannot emit a multi-output loop fusion, so a jitted
``tx.update`` + ``optax.apply_updates`` becomes three passes over memory (one each for m, v
and θ: ten array streams instead of seven). Here the *same* transformation is applied to one
cache-sized chunk of each large leaf at a time inside a ``fori_loop``: the three passes then
run over a chunk that is still in L2 cache, so main memory sees each array once, and the
buffers are updated in place (donate them).

Exactness by construction: the chunk is handed to ``tx.update`` itself (not a re-written
formula), with every other leaf of the tree present as a zero-size stand-in, so name and
ndim masks see the same paths and make the same decisions. This only holds for
*elementwise* transformations (each output element depends on the same element of the inputs
and on scalar state such as the step count): :func:`check_elementwise` inspects the jaxpr of
``tx.update`` and refuses anything else.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_decoupled import _flat

__all__ = ["check_elementwise", "chunked_step", "decides_like_the_tree", "state_is_chunkable",
           "state_reads_params"]

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


# Primitives that generate arrays from scalars (a key, a seed, a shape): chunk by chunk they
# would repeat the same values in every chunk.
_GENERATORS = frozenset(["iota", "rng_uniform", "rng_bit_generator", "threefry2x32"])


def check_elementwise(jaxpr: Any) -> None:
  """Raises unless every equation (recursively) is elementwise or acts on scalars only."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    subs = [v for v in eqn.params.values() if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
    subs += [b for v in eqn.params.values() if isinstance(v, (tuple, list)) for b in v
             if hasattr(b, "jaxpr") or hasattr(b, "eqns")]
    if subs:
      for sub in subs:
        check_elementwise(getattr(sub, "jaxpr", sub))
      continue
    if name in _ELEMENTWISE:
      continue
    # Ops on scalars only (schedules, step counts) cannot mix parameter elements, unless they
    # make new values per element: a random draw or an iota would repeat in every chunk.
    if name not in _GENERATORS and "random" not in name and all(
        getattr(v.aval, "shape", ()) == () for v in eqn.invars):
      continue
    raise ValueError(
        f"fused_step: the transformation's update uses '{name}', which is not elementwise "
        "(a reduction over parameters such as a global-norm clip, a random draw, a dot...). "
        "Applied chunk by chunk it would compute something else. Use tx.update + "
        "optax.apply_updates for this transformation."
    )


def _program(jaxpr: Any, out_index: int) -> list[tuple[Any, ...]]:
  """The equations that output ``out_index`` depends on: primitive names and scalar literals
  (shapes left out), recursively into sub-programs, as a comparable list."""
  needed = {jaxpr.outvars[out_index]}
  program: list[tuple[Any, ...]] = []
  for eqn in reversed(jaxpr.eqns):
    if not any(v in needed for v in eqn.outvars):
      continue
    needed.update(v for v in eqn.invars if not hasattr(v, "val"))
    literals = tuple(repr(v.val) for v in eqn.invars if hasattr(v, "val"))
    inner = [getattr(b, "jaxpr", b) for b in eqn.params.values()
             if hasattr(b, "jaxpr") or hasattr(b, "eqns")]
    program.append((eqn.primitive.name, literals,
                    tuple(tuple(_program(j, i) for i in range(len(j.outvars))) for j in inner)))
  reads = tuple(i for i, v in enumerate(jaxpr.invars) if v in needed)
  return [*program, ("reads", reads)]


def decides_like_the_tree(tx, chunk_size, min_leaf_size, params, grads, state) -> str | None:
  """None when ``tx`` computes each chunked leaf as it does the whole leaf, else which leaf
  differs: a mask or rule that reads shapes sees chunks and stand-ins in the chunk loop."""
  p_leaves, treedef = jax.tree.flatten(params)
  g_leaves = treedef.flatten_up_to(grads)  # type: ignore[attr-defined]
  s_items, s_kinds, s_def = _split_state(state, treedef, [tuple(np.shape(p)) for p in p_leaves])
  param_js = [j for j, kind in enumerate(s_kinds) if kind]
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def new_params(tp, tg, ts):
    updates, _ = tx.update(treedef.unflatten(tg), s_def.unflatten(ts), treedef.unflatten(tp))
    return treedef.flatten_up_to(optax.apply_updates(treedef.unflatten(tp), updates))

  def traced(tp, tg, ts, k):
    """Program of new θ_k, with θ_k, g_k and its state leaves as the first inputs."""
    def fn(pk, gk, *sk):
      tp2, tg2, ts2 = list(tp), list(tg), list(ts)
      tp2[k], tg2[k] = pk, gk
      for pos, j in enumerate(param_js):
        leaves = treedef.flatten_up_to(ts2[j])
        leaves[k] = sk[pos]
        ts2[j] = treedef.unflatten(leaves)
      return new_params(tp2, tg2, ts2)[k]
    args = (tp[k], tg[k], *(treedef.flatten_up_to(ts[j])[k] for j in param_js))
    return _program(jax.make_jaxpr(fn)(*args).jaxpr, 0)

  ts_real = [treedef.unflatten(x) if kind else x for x, kind in zip(s_items, s_kinds)]  # type: ignore[attr-defined]
  for k, p in enumerate(p_leaves):
    if np.size(p) < min_leaf_size:
      continue
    standins = [_flat.standin(x) for x in p_leaves]
    chunk = lambda x: jnp.zeros((1,) * (np.ndim(x) - 1) + (chunk_size,),  # noqa: E731
                                jnp.result_type(x))
    tp, tg = list(standins), [_flat.standin(x) for x in g_leaves]
    tp[k], tg[k] = chunk(p), chunk(g_leaves[k])
    ts = list(s_items)
    for j in param_js:
      leaves = [_flat.standin(x) for x in s_items[j]]
      leaves[k] = chunk(s_items[j][k])
      ts[j] = treedef.unflatten(leaves)  # type: ignore[attr-defined]
    with warnings.catch_warnings():  # masks judging stand-ins may warn; the real tree decides.
      warnings.simplefilter("ignore")
      same = traced(p_leaves, g_leaves, ts_real, k) == traced(tp, tg, ts, k)
    if not same:
      return paths[k]
  return None


def state_reads_params(tx, grads, state, params) -> bool:
  """Whether ``tx.update``'s new state depends on ``params`` (e.g. coupled L2 moments)."""
  closed = jax.make_jaxpr(lambda p: tx.update(grads, state, p)[1])(params)
  jaxpr = closed.jaxpr
  needed = {v for v in jaxpr.outvars if not hasattr(v, "val")}
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if not hasattr(v, "val"))
  return any(v in needed for v in jaxpr.invars)


def state_is_chunkable(state, params) -> bool:
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


def chunked_step(tx, chunk_size, min_leaf_size, params, grads, state):
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
