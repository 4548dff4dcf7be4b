"""The pure-JAX one-pass step: ``tx.update`` applied chunk by chunk, in cache.

An Adam-type step is a streaming computation (read θ, g, m, v; write θ, m, v: 28 bytes per
float32 parameter). XLA:CPU cannot emit a multi-output loop fusion, so a jitted
``tx.update`` + ``optax.apply_updates`` becomes three passes over memory (one each for m, v
and θ: ten array streams instead of seven). Here the *same* program is applied to one
cache-sized chunk of each large leaf at a time inside a ``fori_loop``: the three passes then
run over a chunk that is still in L2 cache, so main memory sees each array once, and the
buffers are updated in place (donate them).

Exactness by construction: ``tx.update`` + ``optax.apply_updates`` is traced once, on the
real tree, so every mask and rule decides on the real leaves (names, shapes, sizes), and
that program is split per leaf (``_programs.Split``). Each large leaf's loop body evaluates
the leaf's own operations of that program on chunks (``_chunk_programs``: elementwise
operations unchanged, broadcasts and reshapes given the chunk's shape); the small leaves and
the scalar state are evaluated once, outside the loops, as the program has them.
``fused_step`` takes this path only for an *elementwise* transformation
(``_programs.check_elementwise``) whose program splits per leaf (:func:`splits_per_leaf`).

One trace: the chunk path, its checks and ``fused_step``'s plain fallback share the trace
of the whole tree (cached per transformation in ``_step_trace``), and one jitted loop body
serves every leaf whose program is the same (200 layers of one shape and mask: one body).
"""

from __future__ import annotations

import collections
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_decoupled import _chunk_programs, _sharding, _step_trace
from optax_decoupled._programs import REST

__all__ = ["chunked_step", "has_custom_derivatives", "reduced_reads", "splits_per_leaf",
           "state_is_chunkable"]


def splits_per_leaf(tx, chunk_size, tree) -> str | None:
  """None when the step's program on ``tree`` (a ``_step_trace.StepTree``) splits per leaf
  (every array operation and array input serves one large leaf, or the rest) and each large
  leaf's part runs on chunks, else why not (the step then takes the plain path)."""
  split = _step_trace.analysis(tx, tree)
  mixed = split.mixes_leaves(tree)
  if mixed is not None:
    return f"the program does not split per leaf ({mixed})"
  for k in tree.big:
    program = _chunk_programs.leaf_program(split, tree, k, chunk_size)
    if isinstance(program, str):
      return f"the program cannot run chunk by chunk: {program}"
  return None


def reduced_reads(tx, chunk_size, tree) -> str:
  """What the loops read of the values reduced over whole arrays (computed in one pass
  before them), in words; empty when nothing."""
  split = _step_trace.analysis(tx, tree)
  programs = [_chunk_programs.leaf_program(split, tree, k, chunk_size) for k in tree.big]
  reads = {v for program in programs if not isinstance(program, str)
           for kind, v in program.scalars if kind == "reduced"}
  if not reads:
    return ""
  return f"{len(reads)} value{'s' if len(reads) > 1 else ''} reduced over whole arrays " \
         "(a global norm...)"


def has_custom_derivatives(tx, params, grads, state) -> bool:
  """Whether the chunk loop of ``tx`` runs a custom-derivative call as its primal program
  (its derivative would then differ from the plain step's: differentiate that instead)."""
  return _step_trace.analysis(tx, _step_trace.StepTree(params, grads, state)).custom_derivatives


def state_is_chunkable(tree) -> bool:
  """Every non-scalar state array of ``tree`` (a ``_step_trace.StepTree``) sits in a subtree
  laid out exactly like the params."""
  return all(kind or np.ndim(item) == 0 for item, kind in zip(tree.s_items, tree.s_kinds))


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

  The small leaves and the scalar state are evaluated once, as the whole tree's program has
  them; each large leaf's operations run in its own loop. With sharded arrays each device
  runs the loops on its own shards (``_sharding.per_shard``): the program is elementwise
  and decided on the whole tree, so a shard's elements get what the whole leaf's get. An
  uneven cut gathers first (correct, not fast).

  Only on CPU (``lax.platform_dependent`` around the loops): elsewhere the large leaves take
  the whole program's values too, so the step is the plain one there."""
  tree = _step_trace.StepTree(params, grads, state, min_leaf_size, as_arrays=True)
  split = _step_trace.analysis(tx, tree)
  assert split.mixes_leaves(tree) is None, "fused_step plans the chunk loop after checking"
  # Leaves below min_leaf_size, and the scalar state (counts), once, outside the loops. So are
  # leaves with any non-float32 array (θ, g or state): with dtype conversions in the chunk's
  # fusions XLA no longer keeps the writes in place and copies the full buffer on every
  # iteration (measured: a bfloat16 leaf of 1e7 took 1.5 s instead of 5 ms).
  # They are the whole program's outputs (one call of its jitted trace, whose operations for
  # the large leaves XLA removes, unused); its effects run there, once.
  rest_in = {i: x for i, x in enumerate(tree.inputs) if tree.in_owner[i] == REST}
  whole = _step_trace.whole_values(tx, tree)
  values = {o: whole[o] for o in range(split.n_out) if tree.out_owner[o] == REST}

  # The loops' arguments: per large leaf θ, g, its state leaves and its leaf-sized
  # constants (leaf j of the call), then every leaf's scalars (replicated).
  leaves = []
  args: list[Any] = []
  arg_leaf: list[int | None] = []
  for j, k in enumerate(tree.big):
    program = _chunk_programs.leaf_program(split, tree, k, chunk_size)
    assert isinstance(program, _chunk_programs.LeafProgram), program
    arrays = [tree.inputs[i] for i in tree.leaf_inputs(k)] + list(program.leaf_consts)
    leaves.append((k, program, len(args), len(arrays)))
    args += arrays
    arg_leaf += [j] * len(arrays)
  # Values reduced over whole arrays (a global norm), once, before the loops.
  reduced = split.evaluate({v for _, program, _, _ in leaves
                            for kind, v in program.scalars if kind == "reduced"}, tree.inputs)
  scalar_at = []
  for k, program, _, _ in leaves:
    scalar_at.append(len(args))
    args += [rest_in[v] if kind == "input" else reduced[v] if kind == "reduced" else v
             for kind, v in program.scalars]
    arg_leaf += [None] * len(program.scalars)
  out_leaf = [j for j, k in enumerate(tree.big) for _ in tree.leaf_outputs(k)]

  def loops(*xs):
    out = []
    for (k, program, at, count), s_at in zip(leaves, scalar_at):
      ins, outs = tree.leaf_inputs(k), tree.leaf_outputs(k)
      theta, g, s_leaves = xs[at], xs[at + 1], list(xs[at + 2:at + len(ins)])
      consts = list(xs[at + len(ins):at + count])
      # A new state leaf that reads θ or another state leaf needs the old chunks carried.
      prefetch = any(i in split.reads_of[o] for pos, o in enumerate(outs[1:])
                     for i in (ins[0], *ins[2:]) if i != ins[2 + pos])
      new_p, new_s = _loop_body(program, chunk_size)(
          theta, [g, *consts], s_leaves, list(xs[s_at:s_at + len(program.scalars)]), prefetch)
      out += [new_p, *new_s]
    return tuple(out)

  def plan(mesh, arg_shapes, leaf_shardings):
    try:
      for x, j in zip(arg_shapes, arg_leaf):
        if j is not None:
          leaf_shardings[j].shard_shape(tuple(x.shape))
    except ValueError:  # an uneven cut.
      return "gather"
    return None

  def run(*xs):
    return _sharding.per_shard(loops, list(xs), arg_leaf, out_leaf, plan)

  # On a mesh of Explicit axes, slicing a sharded array by chunks is a type error: the loops
  # are traced with the axes made Auto (``auto_axes``), and the outputs given θ's types.
  explicit = [_explicit_sharding(x) for x in args]
  if any(explicit):
    mesh = next(s for s in explicit if s is not None).mesh
    firsts = [explicit[arg_leaf.index(j)] for j in out_leaf]
    run = jax.sharding.auto_axes(run, out_sharding=[
        s if s is not None else NamedSharding(mesh, P()) for s in firsts])
  big = [o for k in tree.big for o in tree.leaf_outputs(k)]
  results = iter(lax.platform_dependent(
      *args, *(whole[o] for o in big), cpu=lambda *xs: tuple(run(*xs[:len(args)])),
      default=lambda *xs: tuple(xs[len(args):])))
  for k in tree.big:
    values.update(zip(tree.leaf_outputs(k), results))
  return tree.unflatten_outputs([values[o] for o in range(split.n_out)])


def _explicit_sharding(x):
  """``x``'s sharding type when it is split along Explicit mesh axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(sharding, NamedSharding) or not any(sharding.spec):
    return None
  return sharding


# Jitted loops by (leaf program, chunk size): leaves, steps and transformations that run the
# same program share one (jax.jit then traces it once per shape). An entry holds its program,
# so the objects whose identities its key holds stay alive with it.
_BODIES: collections.OrderedDict = collections.OrderedDict()
_BODIES_KEPT = 64


def _loop_body(program, chunk_size):
  key = (program.key, chunk_size)
  body = _BODIES.get(key)
  if body is None:
    body = _BODIES[key] = jax.jit(_leaf_update(program.runner(), chunk_size), static_argnums=4)
    while len(_BODIES) > _BODIES_KEPT:
      _BODIES.popitem(last=False)
  else:
    _BODIES.move_to_end(key)
  return body


def _leaf_update(program, chunk_size):
  """``(θ, [g, leaf constants], state leaves, scalars, prefetch) -> (new θ, new state
  leaves)``: the chunk loop evaluating ``program`` (a ``LeafProgram.runner()``).
  Reads no leaf of its own closure, so one function serves every leaf with the same
  program."""

  def chunk_loop(p, reads, s_leaves, scalars, prefetch):
    def theta(pc, rc, sc):
      return program.run(False, [pc, rc[0], *sc, *rc[1:]], scalars)[0]

    def state(pc, rc, sc):
      return program.run(True, [pc, rc[0], *sc, *rc[1:]], scalars)

    return _leaf_in_chunks(theta, state, p, reads, s_leaves, chunk_size, prefetch)

  return chunk_loop


def _leaf_in_chunks(theta_call, state_call, p, reads, s_leaves, chunk_size, prefetch=False):
  """Updates one leaf (θ and its state leaves) chunk by chunk, in place, in a ``fori_loop``.

  ``theta_call(θ_chunk, read_chunks, state_chunks) -> new θ_chunk`` and ``state_call(...) ->
  new state_chunks``; ``reads`` are arrays of θ's size read only (g, constants). The chunks are ``[i·c, (i+1)·c)``; a ragged last chunk is moved back to end
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
  reads_flat = [lax.reshape(x, (n,)) for x in reads]
  shape = (1,) * (nd - 1) + (chunk_size,)
  read_shapes = [(1,) * (np.ndim(x) - 1) + (chunk_size,) for x in reads]

  def sl(x, start):
    return lax.dynamic_slice(x, (start,), (chunk_size,), **_NONNEGATIVE)

  def compute(fn, pf, sf, start, given=None):
    """``fn`` of the chunk (θ, reads, state leaves) read from the buffers at ``start`` (θ's
    and the state's chunks ``given`` instead, when they are)."""
    def chunk(x, to=shape):
      return lax.reshape(sl(x, start), to)
    read = [chunk(x, to) for x, to in zip(reads_flat, read_shapes)]
    if given is None:
      return fn(chunk(pf), read, [chunk(x) for x in sf])
    theta, states = given
    return fn(lax.reshape(theta, shape), read, [lax.reshape(x, shape) for x in states])

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
