"""A large leaf's part of a traced optimizer step, rewritten to act on one chunk.

:func:`leaf_program` takes the operations that compute one large leaf's new θ and state in
the step traced on the whole tree (``_programs.Split``) and rewrites them for a chunk of
the leaf: shape ``(1,) * (ndim - 1) + (chunk_size,)``, the same elements in the same
row-major order. The masks and rules were decided when the step was traced on the real
leaves, so every chunk gets the decisions the whole leaf gets. Every array the operations
make or read must have the leaf's size n (it becomes a chunk) or one element (it stays as
it is):

* elementwise operations act on chunks unchanged (a ``sharding`` parameter dropped: a chunk
  is one device's);
* a ``broadcast_in_dim``, ``reshape`` or ``squeeze`` that makes an n-element array gets the
  chunk's shape (they keep the row-major order; a transposing ``reshape`` is refused);
* a constant of n elements is read chunk by chunk, like g; scalar inputs (step counts,
  hyperparameters), scalar constants and reduced values (``Split.reduced``: a global norm,
  computed before the loops) are passed whole;
* anything else on an n-element array (a reduction, a draw, a sub-program, side effects)
  is refused, with the reason, and the step takes the plain path.

A :class:`LeafProgram`'s operations are hash-consed within the split, so leaves that run
the same program share them, and its ``key`` is equal exactly for those leaves: one jitted
loop serves them all.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_decoupled._programs import ELEMENTWISE, literal_key, params_key, sub_jaxprs
from optax_decoupled._programs import aval_size as _size

__all__ = ["LeafProgram", "leaf_program"]


def leaf_program(split: Any, tree: Any, k: int, chunk_size: int) -> LeafProgram | str:
  """Large leaf k's operations in ``split`` (a ``_programs.Split`` of the step on ``tree``,
  a ``_step_trace.StepTree``) rewritten to act on one chunk, or why they cannot be;
  computed once per split, leaf and chunk size."""
  got = split.leaf_programs.get((k, chunk_size))
  if got is None:
    got = split.leaf_programs[k, chunk_size] = _leaf_program(split, tree, k, chunk_size)
  return got


def _leaf_program(split: Any, tree: Any, k: int, chunk_size: int) -> LeafProgram | str:
  ins, outs = tree.leaf_inputs(k), tree.leaf_outputs(k)
  avals, consts, intern, literals = split.avals, split.consts, split.intern, split.literals
  n = _size(avals[ins[0]])
  path = _LazyPath(tree, k)
  theta = set(split.ops_of[outs[0]])
  state = set().union(*(split.ops_of[o] for o in outs[1:]))
  refs: dict[int, tuple[Any, ...]] = {a: _ref("leaf", pos) for pos, a in enumerate(ins)}
  program = LeafProgram(len(ins), literals)
  scalars: list[Any] = []

  def ref(a):
    if not isinstance(a, int):
      key = literal_key(a)
      literals.setdefault(key, a.val)
      return intern.setdefault(("literal", key), ("literal", key))
    got = refs.get(a)
    if got is not None:
      return got
    size = _size(avals[a])
    if a in split.reduced:  # a global norm...: computed before the loops, read as a scalar.
      got = _ref("scalar", len(program.scalars))
      program.scalars.append(("reduced", a))
      scalars.append("reduced")
    elif a in consts and size == n:
      got = _ref("leaf", program.n_leaf_inputs + len(program.leaf_consts))
      program.leaf_consts.append(consts[a])
    elif size != 1:
      raise _Refused(f"leaf {path} reads an array of shape {avals[a].shape}")
    else:
      got = _ref("scalar", len(program.scalars))
      program.scalars.append(("const", consts[a]) if a in consts else ("input", a))
      scalars.append(_constant_key(consts[a]) if a in consts else "input")
    refs[a] = got
    return got

  # Hash-consed (``split.intern``): leaves that run the same program share their operations'
  # tuples, so what is kept per leaf is a list of references.
  try:
    for i in sorted(theta | state):
      eqn, op_ins, op_outs = split.eqns[i], split.ins[i], split.outs_of(i)
      prim, subfuns, params = _on_chunks(
          eqn, [avals[a] if isinstance(a, int) else a.aval for a in op_ins],
          [avals[v] for v in op_outs], n, chunk_size, path)
      p_key = params_key(params)
      op_refs = tuple(map(ref, op_ins))
      op = (prim, subfuns, intern.setdefault(p_key, p_key), intern.setdefault(op_refs, op_refs),
            len(op_outs), i in theta, i in state)
      program.ops.append(intern.setdefault(op, op))
      program.params.append(params)
      for pos, v in enumerate(op_outs):
        refs[v] = _ref("value", len(program.ops) - 1, pos)
    program.outs = tuple(map(ref, (split.outs[o] for o in outs)))
  except _Refused as e:
    return str(e)
  program.key = (tuple(program.ops), program.outs, program.n_leaf_inputs,
                 len(program.leaf_consts), tuple(scalars))
  return program


_REFS: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _ref(*ref: Any) -> tuple[Any, ...]:
  """One tuple per reference (``("leaf", 0)``, ``("value", 3, 0)``...), shared."""
  return _REFS.setdefault(ref, ref)


class _Refused(Exception):
  pass


class _LazyPath:
  """Leaf k's path, found only when a message prints it."""

  def __init__(self, tree: Any, k: int) -> None:
    self.tree, self.k = tree, k

  def __str__(self) -> str:
    return self.tree.path(self.k)


def _constant_key(value: Any) -> tuple[Any, ...]:
  return (tuple(np.shape(value)), str(jnp.result_type(value)))


def _chunk_shape(aval: Any, n: int, chunk_size: int) -> tuple[int, ...] | None:
  """An n-element value's shape on a chunk; None for a one-element value (unchanged)."""
  return (1,) * (len(aval.shape) - 1) + (chunk_size,) if _size(aval) == n else None


def _on_chunks(eqn, in_avals, out_avals, n, chunk_size, path) -> tuple[Any, tuple, Any]:
  """(primitive, sub-functions, parameters) that bind ``eqn`` on chunks of its n-element
  values."""
  name, params = eqn.primitive.name, eqn.params
  if eqn.effects:
    raise _Refused(f"'{name}' on leaf {path} has side effects, which would repeat per chunk")
  sizes = [_size(a) for a in (*in_avals, *out_avals)]
  if all(s == 1 for s in sizes):  # scalar work (schedules, counts): as it is.
    bind = eqn.primitive.get_bind_params(params)
    subfuns, bind = bind if isinstance(bind, tuple) else ((), bind)
    return eqn.primitive, tuple(subfuns), bind
  if any(s not in (1, n) for s in sizes):
    shape = next(a.shape for a in (*in_avals, *out_avals) if _size(a) not in (1, n))
    raise _Refused(f"leaf {path}'s program makes an array of shape {shape} ('{name}')")
  if sub_jaxprs(eqn) or name not in ELEMENTWISE:  # (an inlined cond's select_n is)
    raise _Refused(f"'{name}' acts on leaf {path}, and only elementwise operations can run "
                   "chunk by chunk")
  if getattr(getattr(eqn, "ctx", None), "compute_type", None) is not None:
    raise _Refused(f"'{name}' on leaf {path} runs under compute_on")
  out_shape = _chunk_shape(out_avals[0], n, chunk_size)
  if name in ("broadcast_in_dim", "reshape", "squeeze") and out_shape is not None:
    if name == "reshape" and params["dimensions"] is not None:
      raise _Refused(f"a transposing reshape acts on leaf {path}")
    if _size(in_avals[0]) == n:  # unit axes only: the same elements in the same order.
      return lax.reshape_p, (), {"new_sizes": out_shape, "dimensions": None, "sharding": None}
    params = {**params, "shape": out_shape, "sharding": None}  # broadcast of one element
  elif params.get("sharding") is not None:
    params = {**params, "sharding": None}  # a chunk is one device's
  return eqn.primitive, (), params


class LeafProgram:
  """A large leaf's step on one chunk (:func:`leaf_program`).

  ``ops``: (primitive, sub-functions, parameters' key, input references, number of results,
  needed for θ, needed for the state), in program order, and ``params`` their parameters.
  References: ``("leaf", pos)`` the chunk of the leaf's arrays (θ, g, its state leaves, then
  ``leaf_consts``), ``("scalar", j)`` the j-th of ``scalars`` (``("input", index)`` of the
  step, ``("const", value)`` or ``("reduced", number)``: ``Split.evaluate``'s), ``("literal", key)`` (its value in ``literals``),
  ``("value", op, result)``. ``outs``: new θ, new state leaves. Two leaves with equal
  ``key`` run the same operations.
  """

  def __init__(self, n_leaf_inputs: int, literals: dict[Any, Any]) -> None:
    self.n_leaf_inputs = n_leaf_inputs
    self.literals = literals
    self.ops: list[tuple[Any, ...]] = []
    self.params: list[Any] = []
    self.outs: tuple = ()
    self.leaf_consts: list[Any] = []
    self.scalars: list[tuple[str, Any]] = []
    self.key: tuple = ()

  def runner(self) -> _Runner:
    """The operations to evaluate on chunks, without the leaf's constants (a jitted loop
    keeps it)."""
    return _Runner(tuple(self.ops), tuple(self.params), self.outs, self.literals)


class _Runner:
  """Evaluates a :class:`LeafProgram`'s operations on chunks."""

  def __init__(self, ops: tuple, params: tuple, outs: tuple, literals: dict[Any, Any]) -> None:
    self.ops, self.params, self.outs, self.literals = ops, params, outs, literals

  def run(self, state: bool, leaf: list[Any], scalars: list[Any]) -> list[Any]:
    """The new θ chunk (``state=False``: ``[θ']``) or the new state chunks, from the chunks
    of the leaf's arrays and the scalars' values."""
    values: list[Any] = []
    literals = self.literals

    def read(r):
      kind = r[0]
      if kind == "value":
        return values[r[1]][r[2]]
      if kind == "leaf":
        return leaf[r[1]]
      return scalars[r[1]] if kind == "scalar" else literals[r[1]]

    for (prim, subfuns, _, ins, _, for_theta, for_state), params in zip(self.ops, self.params):
      if not (for_state if state else for_theta):
        values.append(())
        continue
      ans = prim.bind(*subfuns, *map(read, ins), **params)
      values.append(ans if prim.multiple_results else (ans,))
    return [read(r) for r in (self.outs[1:] if state else self.outs[:1])]
