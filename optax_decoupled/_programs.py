"""Programs of a traced optimizer step, for the chunk loop of ``od.fused_step``.

* :func:`check_elementwise`: whether every operation of ``tx.update`` acts element by
  element (or on scalars only), so that it can be applied to one chunk of a leaf at a time.
* :class:`Split`: the step traced on the whole tree, as a list of operations on numbered
  values (plain ``jit`` calls inlined, custom-derivative calls as their primal program, a
  ``cond`` without effects as both branches and a ``select_n`` per output: the same
  values), each labelled, by one backward pass, with the outputs it feeds. It says whether
  the program splits per leaf (:meth:`Split.mixes_leaves`) and gives a large leaf's part
  rewritten for one chunk (``_chunk_programs.leaf_program``). The masks and rules were decided on the
  real leaves when the step was traced, so the chunks get the whole tree's decisions.

Everything here is linear in the size of the program.
"""

from __future__ import annotations

import math
import struct
import types
from typing import Any

import numpy as np
from jax import lax

try:
  from jax.extend.core import Literal as _Literal
except ImportError:  # older jax
  from jax.core import Literal as _Literal  # type: ignore[attr-defined,no-redef]

__all__ = ["ELEMENTWISE", "REST", "Split", "aval_size", "check_elementwise", "literal_key",
           "params_key", "sub_jaxprs"]

REST = -1  # owner of what is computed outside the chunk loops: small leaves, scalar state.

# Primitives that act element by element (or on scalars). Anything else in the jaxpr of
# ``tx.update`` (reductions, dots, gathers, sorts, collectives...) makes chunking unsafe.
ELEMENTWISE = frozenset([
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "broadcast_in_dim", "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p",
    "cos", "cosh", "div", "eq", "erf", "erf_inv", "exp", "exp2", "expm1", "floor", "ge", "gt",
    "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max",
    "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision",
    "rem", "reshape", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square", "squeeze", "stop_gradient",
    "sub", "tan", "tanh", "xor",
    "pvary",  # inside jax.shard_map: marks a value as varying over mesh axes (same values).
])


# Calls with a custom derivative, inlined as their primal program.
_CUSTOM_DERIVATIVES = frozenset(["custom_jvp_call", "custom_vjp_call"])

# Primitives that generate arrays from scalars (a key, a seed, a shape): chunk by chunk they
# would repeat the same values in every chunk.
_GENERATORS = frozenset(["iota", "rng_uniform", "rng_bit_generator", "threefry2x32"])


def check_elementwise(jaxpr: Any) -> None:
  """Raises unless every equation (recursively) is elementwise, or makes scalars only (step
  counts, schedules; a reduction to a scalar, such as a global norm, which the chunk loop
  takes from one pass over the whole arrays before the loops)."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    subs = sub_jaxprs(eqn)
    if subs:
      for sub in subs:
        check_elementwise(sub)
      continue
    if name in ELEMENTWISE:
      continue
    # Ops making scalars only (schedules, step counts, reductions) cannot mix parameter
    # elements, unless they make new values per element: a random draw or an iota would
    # repeat in every chunk.
    if name not in _GENERATORS and "random" not in name and all(
        getattr(v.aval, "shape", ()) == () for v in eqn.outvars):
      continue
    raise ValueError(
        f"fused_step: the transformation's update uses '{name}', which is not elementwise "
        "(a dot, a sort, a cumulative sum, a random draw...). "
        "Applied chunk by chunk it would compute something else. Use tx.update + "
        "optax.apply_updates for this transformation."
    )


def _plain_call(eqn) -> Any:
  """The closed jaxpr of a plain call (``jit`` or ``closed_call`` without shardings, layouts
  or compiler options), which :class:`Split` inlines; None for any other equation."""
  params, name = eqn.params, eqn.primitive.name
  inner = None
  if name == "closed_call":
    inner = params.get("call_jaxpr")
  elif name in ("jit", "pjit") and not params.get("compiler_options_kvs"):
    layouts = (*params.get("in_layouts", ()), *params.get("out_layouts", ()))
    shardings = (*params.get("in_shardings", ()), *params.get("out_shardings", ()))
    if all(x is None for x in layouts) and all(
        type(s).__name__ == "UnspecifiedValue" for s in shardings):
      inner = params.get("jaxpr")
  return inner if hasattr(inner, "consts") and hasattr(inner, "jaxpr") else None


class _Selection:
  """``lax.select_n(index, *cases)`` standing for one output of an inlined ``cond``: what
  :class:`Split` reads of an equation (primitive, params, effects, context, outputs)."""

  primitive = lax.select_n_p
  params: types.MappingProxyType = types.MappingProxyType({})
  effects: frozenset = frozenset()
  ctx = None

  def __init__(self, aval: Any) -> None:
    self.outvars = [types.SimpleNamespace(aval=aval)]


def sub_jaxprs(eqn) -> list[Any]:
  """The jaxprs in an equation's parameters (a call's body, a cond's branches...)."""
  params = eqn.params.values()
  subs = [v for v in params if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
  subs += [b for v in params if isinstance(v, (tuple, list)) for b in v
           if hasattr(b, "jaxpr") or hasattr(b, "eqns")]
  return [getattr(s, "jaxpr", s) for s in subs]


def aval_size(aval: Any) -> int:
  """The number of elements of a value of type ``aval`` (1 for a scalar)."""
  return math.prod(getattr(aval, "shape", ()))


def literal_key(literal) -> tuple[Any, ...]:
  """A literal as a hashable value, exact (a float by its bytes: 0.0 is not -0.0) and with
  its type (``repr`` is slow)."""
  value, aval = literal.val, getattr(literal, "aval", None)
  typed = (getattr(aval, "dtype", None), getattr(aval, "weak_type", None))
  if isinstance(value, float):
    return ("float", struct.pack("<d", value), typed)
  if isinstance(value, int):
    return ("int", type(value) is bool, int(value), typed)
  value = np.asarray(value)
  return ("array", value.dtype.str, value.shape, value.tobytes(), typed)


def params_key(params: dict[str, Any]) -> tuple[Any, ...]:
  """An equation's parameters as a hashable value (an unhashable one by identity)."""
  if not params:
    return ()
  out = []
  for k in sorted(params):
    v = params[k]
    try:
      hash(v)
    except TypeError:
      v = ("id", id(v))
    out.append((k, v))
  return tuple(out)


class Split:
  """A traced step as one list of operations on numbered values (inputs ``0..n_in-1``; plain
  calls inlined), each labelled by one backward pass with the outputs it feeds.

  Output ``n_out`` is a sink for the operations with effects (evaluated with the scalar
  state, once), and ``n_out + 1`` (``pre``) one for the values in ``reduced``: scalars that
  depend on a reduction over arrays (a global norm and what follows from it), evaluated
  before the loops on the whole arrays (:meth:`evaluate`) and read by the loops as scalars
  (the labels stop there: their operations feed ``pre`` only). Operation i is ``eqns[i]`` on the atoms ``ins[i]`` (numbers, or literals),
  giving the numbers ``outs(i)``. ``ops_of[o]``: the operations output ``o`` needs, in
  program order; ``reads_of[o]``: the inputs it reads.
  """

  def __init__(self, closed, same_state: bool):
    self.same_state = same_state
    # Kept as parallel lists (no tuple per operation: the split lives with its trace).
    self.eqns: list[Any] = []
    self.ins: list[tuple[Any, ...]] = []
    self._first_out: list[int] = []
    self.consts: dict[int, Any] = {}
    self.n_in = len(closed.jaxpr.invars)
    self.avals: dict[int, Any] = {i: v.aval for i, v in enumerate(closed.jaxpr.invars)}
    self._next = self.n_in
    self.custom_derivatives = False  # a custom_jvp/custom_vjp call was inlined
    self.outs = self._inline(closed.jaxpr, closed.consts, list(range(self.n_in)))
    self.n_out = sink = len(self.outs)
    self.pre = sink + 1
    self.reduced = self._reduced()
    only_pre = frozenset((self.pre,))
    # Backward: an operation feeds what its results feed. The sets are shared between values
    # (most feed one output) and replaced, never changed, when they grow.
    feeds: dict[int, frozenset[int]] = {}

    def join(a, fed):
      old = feeds.get(a)
      if old is None:
        feeds[a] = fed
      elif old is not fed and not fed <= old:
        feeds[a] = old | fed

    for o, a in enumerate(self.outs):
      if isinstance(a, int):
        join(a, frozenset((o,)))
    self.feeds: list[frozenset[int] | None] = [None] * len(self.eqns)
    for i in range(len(self.eqns) - 1, -1, -1):
      eqn, ins = self.eqns[i], self.ins[i]
      if len(eqn.outvars) == 1:
        fed = feeds.get(self._first_out[i])
      else:
        fed = frozenset().union(*(feeds.get(v, ()) for v in self.outs_of(i)))
      if fed and self._first_out[i] in self.reduced:
        fed = only_pre
      if eqn.effects:
        fed = frozenset((*(fed or ()), sink))
      if not fed:
        continue
      self.feeds[i] = fed
      for a in ins:
        if isinstance(a, int):
          join(a, fed)
    self.input_feeds = [feeds.get(i, frozenset()) for i in range(self.n_in)]
    self.ops_of: list[list[int]] = [[] for _ in range(sink + 2)]
    for i, fed in enumerate(self.feeds):
      for o in fed or ():
        self.ops_of[o].append(i)
    self.reads_of: list[list[int]] = [[] for _ in range(sink + 2)]
    for i, fed in enumerate(self.input_feeds):
      for o in fed:
        self.reads_of[o].append(i)
    self.leaf_programs: dict[tuple[int, int], Any] = {}  # ``_chunk_programs``' cache
    self.intern: dict[Any, Any] = {}  # hash-consed parts of the leaf programs
    self.literals: dict[Any, Any] = {}  # a literal's key (``literal_key``): its value

  def _reduced(self) -> set[int]:
    """The scalar values that depend on a reduction over arrays (an operation making scalars
    from an array, and every scalar computed from such a value)."""
    reduced: set[int] = set()
    for i, (eqn, ins) in enumerate(zip(self.eqns, self.ins)):
      outs = self.outs_of(i)
      if any(aval_size(self.avals[o]) != 1 for o in outs):
        continue
      if any(isinstance(a, int) and (a in reduced or aval_size(self.avals[a]) != 1) for a in ins):
        reduced.update(outs)
    return reduced

  def evaluate(self, wanted: set[int], inputs: list[Any]) -> dict[int, Any]:
    """The values ``wanted`` (numbers), binding the operations they need on ``inputs`` (the
    step's inputs: whole arrays)."""
    needed, ops = set(wanted), []
    for i in range(len(self.eqns) - 1, -1, -1):
      if any(o in needed for o in self.outs_of(i)):
        ops.append(i)
        needed.update(a for a in self.ins[i] if isinstance(a, int))
    env: dict[int, Any] = {}

    def read(a):
      if not isinstance(a, int):
        return a.val
      if a in env:
        return env[a]
      return inputs[a] if a < self.n_in else self.consts[a]

    ctx = manager = None
    try:
      for i in reversed(ops):
        eqn = self.eqns[i]
        if getattr(eqn, "ctx", None) not in (None, ctx):  # e.g. compute_on, a mesh.
          if manager is not None:
            manager.__exit__(None, None, None)
          ctx, manager = eqn.ctx, eqn.ctx.manager
          manager.__enter__()
        params = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)
        ans = eqn.primitive.bind(*subfuns, *map(read, self.ins[i]), **params)
        env.update(zip(self.outs_of(i), ans if eqn.primitive.multiple_results else (ans,)))
    finally:
      if manager is not None:
        manager.__exit__(None, None, None)
    return {a: read(a) for a in wanted}

  def outs_of(self, i: int) -> range:
    """The numbers of operation i's results."""
    first = self._first_out[i]
    return range(first, first + len(self.eqns[i].outvars))

  def _number(self, aval: Any) -> int:
    number = self._next
    self._next += 1
    self.avals[number] = aval
    return number

  def _add(self, eqn: Any, ins: tuple[Any, ...]) -> range:
    self.eqns.append(eqn)
    self.ins.append(ins)
    self._first_out.append(self._next)
    for v in eqn.outvars:
      self._number(v.aval)
    return self.outs_of(len(self.eqns) - 1)

  def _inline(self, jaxpr, consts, in_atoms):
    env = dict(zip(jaxpr.invars, in_atoms))
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = number = self._number(v.aval)
      self.consts[number] = c

    def atom(v):
      return v if isinstance(v, _Literal) else env[v]  # a Literal stays itself

    for eqn in jaxpr.eqns:
      ins = tuple(atom(v) for v in eqn.invars)
      inner = _plain_call(eqn)
      if inner is not None:
        outs = self._inline(inner.jaxpr, inner.consts, ins)
      elif eqn.primitive.name in _CUSTOM_DERIVATIVES:
        # The primal program: the same values. (A step that runs it then differentiates the
        # plain step: ``custom_derivatives``.)
        self.custom_derivatives = True
        inner = eqn.params["call_jaxpr"]
        outs = self._inline(inner.jaxpr, inner.consts, ins)
      elif eqn.primitive.name == "cond" and not eqn.effects:
        # Both branches, then a select per output: the same values for pure branches, and
        # each leaf's part splits off (optax.MultiSteps's cond takes every leaf).
        cases = [self._inline(b.jaxpr, b.consts, list(ins[1:])) for b in eqn.params["branches"]]
        outs = [self._add(_Selection(v.aval), (ins[0], *(c[j] for c in cases)))[0]
                for j, v in enumerate(eqn.outvars)]
      else:
        outs = self._add(eqn, ins)
      env.update(zip(eqn.outvars, outs))
    return [atom(v) for v in jaxpr.outvars]

  def mixes_leaves(self, tree: Any) -> str | None:
    """None when the program splits per leaf: every operation with an array result, and every
    array input, feeds the outputs of at most one large leaf (and maybe the rest: the small
    leaves, the scalar state, the effects and the reduced values, all evaluated on the whole
    arrays outside the loops)."""
    if not self.same_state or self.n_out != len(tree.out_owner):
      return "the new state is not laid out like the old one"
    owner = [*tree.out_owner, REST, REST]  # the effects and the reduced values: the rest's.
    for eqn, fed in zip(self.eqns, self.feeds):
      if fed is None or len(fed) == 1 or all(
          getattr(v.aval, "shape", ()) == () for v in eqn.outvars):
        continue
      if len({owner[o] for o in fed} - {REST}) > 1:
        return f"an array operation '{eqn.primitive.name}' feeds several leaves"
    for i, fed in enumerate(self.input_feeds):
      if fed and not tree.in_scalar[i] and any(owner[o] not in (tree.in_owner[i], REST)
                                               for o in fed):
        return f"input {i} is read by another leaf"
    return None
