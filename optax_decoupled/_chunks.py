"""The pure-JAX one-pass step: ``tx.update`` applied chunk by chunk, in cache.

An Adam-type step is a streaming computation (read θ, g, m, v; write θ, m, v: 28 bytes per
float32 parameter). XLA:CPU cannot emit a multi-output loop fusion, so a jitted
``tx.update`` + ``optax.apply_updates`` becomes three passes over memory (one each for m, v
and θ: ten array streams instead of seven). Here the *same* transformation is applied to one
cache-sized chunk of each large leaf at a time inside a ``fori_loop``: the three passes then
run over a chunk that is still in L2 cache, so main memory sees each array once, and the
buffers are updated in place (donate them).

Exactness by construction: each chunk goes through ``tx.update``'s own program (not a
re-written formula), traced on the tree with every leaf at its path and of its ndim, so name
and ndim masks make the same decisions. ``fused_step`` takes this path only for an
*elementwise* transformation (``_programs.check_elementwise``) whose program splits per leaf
(:func:`splits_per_leaf`) and computes every output on chunks as on the whole tree
(:func:`decides_like_the_tree`: a mask reading shapes fails this).

Trace once, split per leaf (trace time linear in the number of leaves): ``tx.update`` +
``optax.apply_updates`` is traced once on the tree in which every large leaf is one chunk
(shape ``(1,) * (ndim - 1) + (chunk_size,)``) and every other leaf is itself, and split by
``_programs.Split``: each large leaf's loop body evaluates only the operations of its own
outputs (plus the scalar operations it shares, step counts and schedules), one jitted body
per distinct leaf program; the small leaves and the scalar state are evaluated once, outside
the loops. That trace and the one on the whole tree are cached per transformation and shared
by the checks, :func:`chunked_step` and :func:`plain_step`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_decoupled import _sharding, _step_trace
from optax_decoupled._programs import REST

__all__ = ["chunked_step", "decides_like_the_tree", "has_large_leaves", "splits_per_leaf",
           "state_is_chunkable"]

def decides_like_the_tree(tx, chunk_size, min_leaf_size, params, grads, state) -> str | None:
  """None when ``tx`` computes each chunked leaf as it does the whole leaf, else which leaf
  differs: a mask or rule that reads shapes sees chunks in the chunk loop.

  Compares, for every output (each leaf's new θ and state, the scalar state), the program of
  the whole tree with the one :func:`chunked_step` evaluates (large leaves as chunks):
  primitive names, scalar literals, sub-programs and which inputs are read. Two traces.
  """
  tree = _step_trace.StepTree(params, grads, state, min_leaf_size)
  whole = _step_trace.analysis(tx, tree, None)  # first: the whole tree's trace warns as tx.update does.
  chunks = _step_trace.analysis(tx, tree, chunk_size)
  for o, name in tree.outputs_in_order(chunks.n_out):
    if whole.n_out != chunks.n_out or whole.program(o) != chunks.program(o):
      return name
  return None


def splits_per_leaf(tx, chunk_size, min_leaf_size, params, grads, state) -> str | None:
  """None when the program on chunks splits per leaf (every array operation and array input
  serves one large leaf, or the rest), else why not (the step then takes the plain path)."""
  tree = _step_trace.StepTree(params, grads, state, min_leaf_size)
  return _step_trace.analysis(tx, tree, chunk_size).mixes_leaves(tree)


def has_large_leaves(min_leaf_size, params, grads, state) -> bool:
  """Whether any leaf is large enough (and float32 throughout) to be chunked."""
  return bool(_step_trace.StepTree(params, grads, state, min_leaf_size).big)


def state_is_chunkable(state, params) -> bool:
  """Every non-scalar state array sits in a subtree laid out exactly like ``params``."""
  p_leaves, treedef = jax.tree.flatten(params)
  items, kinds, _ = _step_trace.split_state(state, treedef, [tuple(np.shape(p)) for p in p_leaves])
  return all(kind or np.ndim(item) == 0 for item, kind in zip(items, kinds))


def _zero_depending_on(x: jax.Array, dtype: Any) -> jax.Array:
  """A zero of ``dtype`` that XLA cannot prove to be zero: a data dependency on the float32
  array ``x`` of one element."""
  bits = lax.bitcast_convert_type(lax.reshape(x, ()), jnp.int32)
  # (bits >>> 31) is 0 or 1; >>> 1 again is always 0.
  zero = lax.shift_right_logical(lax.shift_right_logical(bits, np.int32(31)), np.int32(1))
  return lax.convert_element_type(zero, dtype)


# Chunk offsets are never negative: without the normalisation, a slice costs one bind at
# trace time instead of several (trace time grows with the number of leaves).
_NONNEGATIVE = ({"allow_negative_indices": False}
                if "allow_negative_indices" in inspect.signature(lax.dynamic_slice).parameters
                else {})


def _plus(i: Any, c: int) -> Any:
  """``i + c`` for an offset ``i`` (an int or a traced integer scalar), with lax only."""
  if isinstance(i, int) or c == 0:
    return i + c
  return lax.add(i, np.asarray(c, i.dtype))


def chunked_step(tx, chunk_size, min_leaf_size, params, grads, state):
  """``tx.update`` + ``optax.apply_updates``, each large float32 leaf chunk by chunk in place.

  The program is traced once (large leaves as chunks) and split per leaf: the small leaves
  and the scalar state are evaluated once, each large leaf's operations in its own loop.
  With sharded arrays each device runs this on its own shards (``_sharding.per_shard``),
  when the program on its shards' shapes is the whole tree's (a mask reading shapes would
  see the shards'); otherwise the arrays are gathered first (correct, not fast)."""
  tree = _step_trace.StepTree(params, grads, state, min_leaf_size, as_arrays=True)
  n, n_param = tree.n, len(tree.param_js)
  leaves = [*range(n), *(k for _ in range(n_param) for k in range(n))]
  arg_leaf = [*range(n), *leaves] + [None] * len(tree.other_js)
  out_leaf = leaves + [None] * len(tree.other_js)

  def whole(*inputs):
    local = _step_trace.StepTree(*tree.rebuild(inputs), min_leaf_size, as_arrays=True)
    return tuple(_chunked_values(tx, chunk_size, local))

  def plan(mesh, arg_shapes, leaf_shardings):
    try:
      local = [jax.ShapeDtypeStruct(x.shape if k is None else
                                    leaf_shardings[k].shard_shape(tuple(x.shape)), x.dtype)
               for x, k in zip(arg_shapes, arg_leaf)]
    except ValueError:  # an uneven cut.
      return "gather"
    on_shards = _step_trace.StepTree(*tree.rebuild(local), min_leaf_size)
    shards = _step_trace.analysis(tx, on_shards, chunk_size)
    global_tree = _step_trace.StepTree(params, grads, state)
    whole_tree = _step_trace.analysis(tx, global_tree, None)
    same = shards.mixes_leaves(on_shards) is None and shards.n_out == whole_tree.n_out and all(
        shards.program(o) == whole_tree.program(o) for o in range(shards.n_out + 1))
    return None if same else "gather"

  def run(*inputs):
    return _sharding.per_shard(whole, list(inputs), arg_leaf, out_leaf, plan)

  # On a mesh of Explicit axes, slicing a sharded array by chunks is a type error: the loop
  # is traced with the axes made Auto (``auto_axes``), and the outputs given the inputs' types.
  explicit = [_explicit_sharding(x) for x in tree.inputs]
  if any(explicit):
    out_sharding = [explicit[arg_leaf.index(k)] if k is not None else None for k in out_leaf]
    mesh = next(s for s in explicit if s is not None).mesh
    out_sharding = [s if s is not None else NamedSharding(mesh, P()) for s in out_sharding]
    run = jax.sharding.auto_axes(run, out_sharding=out_sharding)
  return tree.unflatten_outputs(run(*tree.inputs))


def _explicit_sharding(x):
  """``x``'s sharding type when it is split along Explicit mesh axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(sharding, NamedSharding) or not any(sharding.spec):
    return None
  return sharding


def _chunked_values(tx, chunk_size, tree):
  """The step's flat outputs (``StepTree`` order) computed chunk by chunk."""
  split = _step_trace.analysis(tx, tree, chunk_size)
  assert split.mixes_leaves(tree) is None, "fused_step plans the chunk loop after checking"
  n = tree.n
  # Leaves below min_leaf_size, and the scalar state (counts), once, outside the loops. So are
  # leaves with any non-float32 array (θ, g or state): with dtype conversions in the chunk's
  # fusions XLA no longer keeps the writes in place and copies the full buffer on every
  # iteration (measured: a bfloat16 leaf of 1e7 took 1.5 s instead of 5 ms).
  rest_in = {i: x for i, x in enumerate(tree.inputs) if tree.in_owner[i] == REST}
  rest_out = [o for o in range(split.n_out) if tree.out_owner[o] == REST]
  values = dict(zip(rest_out, split.run([*rest_out, split.n_out], rest_in)))
  # One jitted update per distinct leaf program (200 layers of the same shape and mask: one
  # trace, then cache hits), so the trace time does not grow with the leaves' operations.
  updates = {}
  for k in tree.big:
    key, theta_ops, state_ops, shared = split.leaf_program(tree, k)
    ins, outs = tree.leaf_inputs(k), tree.leaf_outputs(k)
    # A new state leaf that reads θ or another state leaf needs the old chunks carried.
    prefetch = any(i in split.reads_of[o] for pos, o in enumerate(outs[1:])
                   for i in (ins[0], *ins[2:]) if i != ins[2 + pos])
    if key not in updates:
      updates[key] = jax.jit(_leaf_update(split, ins, outs, theta_ops, state_ops, shared,
                                          chunk_size), static_argnums=4)
    new_p, new_s = updates[key](tree.inputs[k], tree.inputs[n + k],
                                [tree.inputs[i] for i in ins[2:]], [rest_in[i] for i in shared],
                                prefetch)
    values[outs[0]] = new_p
    values.update(zip(outs[1:], new_s))
  return [values[o] for o in range(split.n_out)]


def _leaf_update(split, ins, outs, theta_ops, state_ops, shared, chunk_size):
  """``(θ, g, state leaves, shared scalars) -> (new θ, new state leaves)`` for a large leaf
  whose inputs in ``split`` are ``ins`` and outputs ``outs``: the chunk loop evaluating the
  leaf's operations. Reads no leaf of its own closure, so one function serves every leaf
  with the same program (:meth:`_programs.Split.leaf_program`)."""

  def chunk_loop(p, g, s_leaves, scalars, prefetch):
    base = dict(zip(shared, scalars))

    def theta(pc, gc, sc):
      return split.run(outs[:1], dict(zip(ins, (pc, gc, *sc))), base, theta_ops)[0]

    def state(pc, gc, sc):
      return split.run(outs[1:], dict(zip(ins, (pc, gc, *sc))), base, state_ops)

    return _leaf_in_chunks(theta, state, p, g, s_leaves, chunk_size, prefetch)

  return chunk_loop


def _leaf_in_chunks(theta_call, state_call, p, g, s_leaves, chunk_size, prefetch=False):
  """Updates one leaf (θ and its state leaves) chunk by chunk, in place, in a ``fori_loop``.

  ``theta_call(θ_chunk, g_chunk, state_chunks) -> new θ_chunk`` and ``state_call(...) -> new
  state_chunks``. The chunks are ``[i·c, (i+1)·c)``; a ragged last chunk is moved back to end
  at n, and keeps the old values of the elements the previous chunk already updated (a
  select), so every offset is a loop value: a static offset into a reshaped 2-D leaf made
  XLA copy the whole buffer. With ``prefetch`` (a new state leaf reads θ, as coupled L2
  outside the kernel, or another state leaf, as ``optax.MultiSteps``'s moments read its
  accumulated gradient) the state is computed from the chunk's θ and state as they were,
  read at the end of the previous iteration and carried into this one. (Offsets, slices and
  reshapes are lax primitives: each jnp operator would cost a cached-jit lookup at trace
  time, per leaf.)
  """
  n, nd = math.prod(p.shape), p.ndim
  g_flat = lax.reshape(g, (n,))
  shape = (1,) * (nd - 1) + (chunk_size,)

  def sl(x, start):
    return lax.dynamic_slice(x, (start,), (chunk_size,), **_NONNEGATIVE)

  def compute(fn, pf, sf, start, given=None):
    """``fn`` of the chunk (θ, g, state leaves) read from the buffers at ``start`` (θ's and
    the state's chunks ``given`` instead, when they are)."""
    def chunk(x):
      return lax.reshape(sl(x, start), shape)
    if given is None:
      return fn(chunk(pf), chunk(g_flat), [chunk(x) for x in sf])
    theta, states = given
    return fn(lax.reshape(theta, shape), chunk(g_flat), [lax.reshape(x, shape) for x in states])

  ragged, count = n % chunk_size != 0, -(-n // chunk_size)

  def start_of(i):
    nominal = lax.mul(i, np.asarray(chunk_size, i.dtype))
    return nominal, (lax.min(nominal, np.asarray(n - chunk_size, i.dtype)) if ragged
                     else nominal)

  def body(i, carry):
    """Updates θ and the state in place on chunk i.

    θ is written first, by a fusion that reads the old θ, g and state there. The state is
    then recomputed and written at an offset made to depend on the written θ (a zero XLA
    cannot see through), so XLA orders it after those reads and needs no copy. A state that
    reads θ or another state leaf takes the old chunks from the carry: a loop carry is a
    buffer of its own, which XLA cannot fuse away into a read of a written buffer.
    """
    pf, sf, *old = carry
    nominal, start = start_of(i)
    if ragged:  # the last chunk's first (nominal - start) elements are done already.
      fresh = lax.ge(lax.iota(i.dtype, chunk_size), lax.sub(nominal, start))

    def write(buf, new, at):
      new = lax.reshape(new, (chunk_size,))
      if ragged:
        new = lax.select(fresh, new, sl(buf, at))
      return lax.dynamic_update_slice(buf, new, (at,), **_NONNEGATIVE)

    pf = write(pf, compute(theta_call, pf, sf, start), start)
    last = lax.dynamic_slice(pf, (_plus(start, chunk_size - 1),), (1,), **_NONNEGATIVE)
    after = lax.add(start, _zero_depending_on(last, i.dtype))
    new_s = compute(state_call, pf, sf, after, old if prefetch else None)
    sf = [write(x, y, after) for x, y in zip(sf, new_s)]
    if not prefetch:
      return pf, sf
    # The next chunk's θ and state as they are before that chunk is written (a ragged last
    # chunk re-reads part of this one: those elements are kept as written by the select).
    last_i = np.asarray(count - 1, i.dtype)
    nxt = start_of(lax.min(lax.add(i, np.asarray(1, i.dtype)), last_i))[1]
    return pf, sf, sl(pf, nxt), [sl(x, nxt) for x in sf]

  pf = lax.reshape(p, (n,))
  carry = (pf, [lax.reshape(x, (n,)) for x in s_leaves])
  if prefetch:
    carry = (*carry, sl(pf, 0), [sl(x, 0) for x in carry[1]])
  pf, sf, *_ = lax.fori_loop(0, count, body, carry)
  return lax.reshape(pf, p.shape), [lax.reshape(x, y.shape) for x, y in zip(sf, s_leaves)]
