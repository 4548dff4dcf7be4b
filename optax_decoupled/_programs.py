"""Programs of a traced optimizer step, for the chunk loop of ``od.fused_step``.

* :func:`check_elementwise`: whether every operation of ``tx.update`` acts element by
  element (or on scalars only), so that it can be applied to one chunk of a leaf at a time.
* :class:`Split`: one traced step as a list of operations on numbered values (plain ``jit``
  calls inlined; a ``cond`` without effects inlined as both branches and a ``select_n`` per
  output, the same values), each labelled, by one backward pass, with the outputs it feeds. It says
  whether the program splits per leaf (:meth:`Split.mixes_leaves`), evaluates the operations
  of chosen outputs (:meth:`Split.run`), gives a large leaf's own program with a key equal
  for leaves that run the same operations (:meth:`Split.leaf_program`), and gives each
  output's program as a comparable value (:meth:`Split.program`: primitive names, exact
  literals and scalar constants, sub-programs, the inputs read; shapes left out), so the
  program on chunks can be compared with the program on the whole tree.

Everything here is linear in the size of the program.
"""

from __future__ import annotations

import itertools
import struct
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:
  from jax.extend.core import Literal as _Literal
except ImportError:  # older jax
  from jax.core import Literal as _Literal  # type: ignore[attr-defined,no-redef]

__all__ = ["REST", "Split", "check_elementwise"]

REST = -1  # owner of what is computed outside the chunk loops: small leaves, scalar state.

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


def _plain_call(eqn) -> Any:
  """The closed jaxpr of a plain call (``jit`` or ``closed_call`` without shardings, layouts
  or compiler options), which :class:`_Split` inlines; None for any other equation."""
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


def _sub_jaxprs(eqn) -> list[Any]:
  params = eqn.params.values()
  subs = [v for v in params if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
  subs += [b for v in params if isinstance(v, (tuple, list)) for b in v
           if hasattr(b, "jaxpr") or hasattr(b, "eqns")]
  return [getattr(s, "jaxpr", s) for s in subs]


def _literal_key(literal) -> tuple[Any, ...]:
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


def _params_key(params: dict[str, Any]) -> tuple[Any, ...]:
  """An equation's parameters as a hashable value (an unhashable one by identity)."""
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
  state, once). ``ops_of[o]``: the operations output ``o`` needs, in program order;
  ``reads_of[o]``: the inputs it reads.
  """

  def __init__(self, closed, same_state: bool):
    self.same_state = same_state
    self.ops: list[tuple[Any, tuple, tuple]] = []  # (equation, input atoms, output numbers)
    self.consts: dict[int, Any] = {}
    self.n_in = len(closed.jaxpr.invars)
    self._numbers = itertools.count(self.n_in)
    self.outs = self._inline(closed.jaxpr, closed.consts, list(range(self.n_in)))
    self.n_out = sink = len(self.outs)
    feeds: dict[int, set[int]] = {}
    for o, a in enumerate(self.outs):
      if isinstance(a, int):
        feeds.setdefault(a, set()).add(o)
    # Backward: an operation feeds what its results feed. (A result's set is final once its
    # operation is reached, so a one-result operation shares it.)
    self.feeds: list[set[int] | None] = [None] * len(self.ops)
    for i in range(len(self.ops) - 1, -1, -1):
      eqn, ins, outs = self.ops[i]
      if len(outs) == 1:
        fed = feeds.get(outs[0])
      else:
        fed = set().union(*(feeds.get(v, ()) for v in outs))
      if eqn.effects:
        fed = {*(fed or ()), sink}
      if not fed:
        continue
      self.feeds[i] = fed
      for a in ins:
        if isinstance(a, int):
          feeds.setdefault(a, set()).update(fed)
    self.input_feeds = [feeds.get(i, set()) for i in range(self.n_in)]
    self.ops_of: list[list[int]] = [[] for _ in range(sink + 1)]
    for i, fed in enumerate(self.feeds):
      for o in fed or ():
        self.ops_of[o].append(i)
    self.reads_of: list[list[int]] = [[] for _ in range(sink + 1)]
    for i, fed in enumerate(self.input_feeds):
      for o in fed:
        self.reads_of[o].append(i)
    self._signatures: dict[int, tuple[Any, ...]] = {}

  def _inline(self, jaxpr, consts, in_atoms):
    env = dict(zip(jaxpr.invars, in_atoms))
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = number = next(self._numbers)
      self.consts[number] = c

    def atom(v):
      return v if isinstance(v, _Literal) else env[v]  # a Literal stays itself

    for eqn in jaxpr.eqns:
      ins = tuple(atom(v) for v in eqn.invars)
      inner = _plain_call(eqn)
      if inner is not None:
        outs = self._inline(inner.jaxpr, inner.consts, ins)
      elif eqn.primitive.name == "cond" and not eqn.effects:
        # Both branches, then a select per output: the same values for pure branches, and
        # each leaf's part splits off (optax.MultiSteps's cond takes every leaf).
        cases = [self._inline(b.jaxpr, b.consts, list(ins[1:])) for b in eqn.params["branches"]]
        outs = tuple(next(self._numbers) for _ in eqn.outvars)
        for j, (v, out) in enumerate(zip(eqn.outvars, outs)):
          self.ops.append((_Selection(v.aval), (ins[0], *(c[j] for c in cases)), (out,)))
      else:
        outs = tuple(next(self._numbers) for _ in eqn.outvars)
        self.ops.append((eqn, ins, outs))
      env.update(zip(eqn.outvars, outs))
    return [atom(v) for v in jaxpr.outvars]

  def mixes_leaves(self, tree: Any) -> str | None:
    """None when the program splits per leaf: every operation with an array result, and every
    array input, feeds the outputs of one owner only (a large leaf, or the rest)."""
    if not self.same_state or self.n_out != len(tree.out_owner):
      return "the new state is not laid out like the old one"
    owner = [*tree.out_owner, REST]  # the effects sink is evaluated with the rest.
    for (eqn, _, _), fed in zip(self.ops, self.feeds):
      if fed is None or len(fed) == 1 or all(
          getattr(v.aval, "shape", ()) == () for v in eqn.outvars):
        continue
      if len({owner[o] for o in fed}) > 1:
        return f"an array operation '{eqn.primitive.name}' feeds several leaves"
    for i, fed in enumerate(self.input_feeds):
      if fed and not tree.in_scalar[i] and any(owner[o] != tree.in_owner[i] for o in fed):
        return f"input {i} is read by another leaf"
    return None

  def run(self, outputs, values, base=None, ops=None) -> list[Any]:
    """The values of ``outputs`` (the sink adds nothing), binding only the operations they
    need (or ``ops``, indices in program order), from ``values`` and ``base`` ({input index:
    value}) and the constants."""
    if ops is None:
      ops = sorted(set().union(*(self.ops_of[o] for o in outputs)))
    env, base, consts = dict(values), base or {}, self.consts

    def read(a):
      if not isinstance(a, int):
        return a.val
      if a in env:
        return env[a]
      return base[a] if a in base else consts[a]

    ctx = manager = None
    try:
      for i in ops:
        eqn, ins, outs = self.ops[i]
        if getattr(eqn, "ctx", None) not in (None, ctx):  # e.g. compute_on, threefry, a mesh.
          if manager is not None:
            manager.__exit__(None, None, None)
          ctx, manager = eqn.ctx, eqn.ctx.manager
          manager.__enter__()
        params = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)
        ans = eqn.primitive.bind(*subfuns, *map(read, ins), **params)
        env.update(zip(outs, ans if eqn.primitive.multiple_results else (ans,)))
    finally:
      if manager is not None:
        manager.__exit__(None, None, None)
    return [read(self.outs[o]) for o in outputs if o < self.n_out]

  def leaf_program(self, tree: Any, k: int):
    """Large leaf k's program: (key, operations of its new θ, operations of its new state,
    the other inputs it reads). Two leaves have equal keys exactly when they run the same
    operations (primitives, parameters, literals, constants) on their own arrays and on the
    same other inputs (scalars: step counts, hyperparameters)."""
    ins, outs = tree.leaf_inputs(k), tree.leaf_outputs(k)
    theta = self.ops_of[outs[0]]
    state = sorted(set().union(*(self.ops_of[o] for o in outs[1:])))
    in_theta, in_state = set(theta), set(state)
    names: dict[int, Any] = {a: ("leaf", pos) for pos, a in enumerate(ins)}
    shared: list[int] = []

    def name(a):
      if not isinstance(a, int):
        return _literal_key(a)
      got = names.get(a)
      if got is None:
        if a < self.n_in:
          shared.append(a)
          got = ("input", a)
        else:
          got = ("const", id(self.consts[a]))
        names[a] = got
      return got

    key: list[Any] = []
    for i in sorted(in_theta | in_state):
      eqn, op_ins, op_outs = self.ops[i]
      key.append((eqn.primitive, getattr(eqn, "ctx", None), tuple(map(name, op_ins)),
                  _params_key(eqn.params), i in in_theta, i in in_state))
      for pos, v in enumerate(op_outs):
        names[v] = ("value", len(key), pos)
    key.append(tuple(name(self.outs[o]) for o in outs))
    return tuple(key), theta, state, shared

  def _constant_key(self, number):
    """A constant (a value closed over) by shape and dtype, and by value when a scalar: an
    array constant made from a leaf's shape is a chunk's shape in the chunk program."""
    value = self.consts[number]
    shape, dtype = tuple(np.shape(value)), str(jnp.result_type(value))
    if shape or isinstance(value, jax.core.Tracer):
      return ("constant", shape, dtype)
    return ("constant", shape, dtype, np.asarray(value).tobytes())

  def _signature(self, i):
    sig = self._signatures.get(i)
    if sig is None:
      eqn, ins, _ = self.ops[i]
      literals = tuple(_literal_key(a) if not isinstance(a, int) else self._constant_key(a)
                       for a in ins if not isinstance(a, int) or a in self.consts)
      subs = tuple(tuple(_program(j, k) for k in range(len(j.outvars)))
                   for j in _sub_jaxprs(eqn))
      sig = self._signatures[i] = (eqn.primitive.name, literals, subs)
    return sig

  def program(self, o):
    """Output ``o``'s program as a comparable value: its operations (names, scalar
    literals, constants, sub-programs; shapes of values left out), how the output is given,
    the inputs it reads."""
    a = self.outs[o] if o < self.n_out else None
    given = (("none",) if a is None else _literal_key(a) if not isinstance(a, int)
             else ("input", a) if a < self.n_in
             else self._constant_key(a) if a in self.consts else ("computed",))
    return [self._signature(i) for i in self.ops_of[o]], given, tuple(self.reads_of[o])


