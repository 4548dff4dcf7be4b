"""The optional CPU kernel behind :func:`optax_decoupled.fused_step` for Adam chains.

``csrc/adam_step.cc``, compiled on first use and registered with XLA by ``_kernel_build``,
computes the step
of the Adam chains ``_targets`` recognises (``od.adamw`` with any coupling, ``od.bert_adamw``,
``od.adam_l2``, ``optax.adamw``; inside ``optax.inject_hyperparams``; behind
``optax.clip_by_global_norm``) with the operations and float32 rounding of the optax chain
(see the comment at the top of the C++ file), for up to 32 leaves per call, in place, on all
of XLA's CPU threads: each array crosses main memory once. Sharded arrays are stepped per
shard (``custom_partitioning``), without collectives.

Only the elementwise arithmetic is in C++. Everything else stays in JAX and in the chain's
own code: the scalars (bias corrections, η_t, λ_t, the clip's global norm) are computed from
the state exactly as the chain computes them, the decay mask and multipliers are resolved by
the same ``_masks.decisions``, and the new scalar state (step counts, injected
hyperparameters) comes from ``tx.update`` itself, called on zero-size stand-ins.

Dtypes: float32 moments; θ and g float32 or bfloat16 (bfloat16 gradients only with
``mu_dtype=nu_dtype=jnp.float32``, whose ``od.scale_by_adam`` widens g before the moments,
as the kernel does; float32 θ and g for L2 and for a clip). When no C++ compiler is present,
or the kernel cannot be built or loaded, or does not cover a case, ``fused_step`` takes the
plain step; ``_kernel_build.unavailable`` and ``step.explain`` say why.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from optax_decoupled import (_flat, _hyperparams, _kernel_build, _masks, _recipes, _sharding,
                             _targets)

_GROUP = 32  # leaves per kernel call (see adamw_step)


def _adam_path(inner: Any) -> tuple[int, ...] | None:
  """Where the ``ScaleByAdamState`` is in the chain's state: (0,) for AdamW (adam, decay,
  lr), (1,) for Adam + L2 (decay, adam, lr), (0, 0) for the other couplings ((adam, lr),
  decay); None for anything else."""
  if isinstance(inner, tuple) and len(inner) == 3:
    for i in (0, 1):
      if isinstance(inner[i], optax.ScaleByAdamState):
        return (i,)
  if (isinstance(inner, tuple) and len(inner) == 2 and isinstance(inner[0], tuple)
      and len(inner[0]) == 2 and isinstance(inner[0][0], optax.ScaleByAdamState)):
    return (0, 0)
  return None


def state_parts(inner: Any) -> tuple[Any, Any, Any]:
  """(Adam state, decay state, learning-rate state) of a chain state :func:`_adam_path`
  recognises."""
  path = _adam_path(inner)
  assert path is not None, "checked by prepare"
  if path == (0, 0):
    return inner[0][0], inner[1], inner[0][1]
  return inner[path[0]], inner[1 - path[0]], inner[2]


def _with_moments(inner: Any, mu: Any, nu: Any, path: tuple[int, ...] | None = None) -> Any:
  """``inner`` with the Adam state's moments replaced (the state's tuples rebuilt)."""
  path = _adam_path(inner) if path is None else path
  assert path, "checked by prepare"
  i, rest = path[0], path[1:]
  new = inner[i]._replace(mu=mu, nu=nu) if not rest else _with_moments(inner[i], mu, nu, rest)
  return (*inner[:i], new, *inner[i + 1:])


_LAYOUT = {"adamw": (0,), "l2": (1,), "after": (0, 0)}


def _adamw_state(target: _targets.Target, state: Any) -> Any:
  """The Adam chain's state inside ``state``, or None if ``state`` is not laid out so."""
  try:
    inner = target.state_of(state)
  except (AttributeError, IndexError, KeyError, TypeError):
    return None
  return inner if _adam_path(inner) is not None else None


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
  """What a kernel step needs besides the arrays, found by :func:`prepare` at trace time.

  Attributes:
    target: where the ``od.adamw`` step sits in the transformation.
    spec: its arguments (traced values included, for ``optax.inject_hyperparams``).
    new_state: the transformation's new state with zero-size moments (``tx.update`` on
      zero-size stand-ins: the chain's own step counts and hyperparameters).
    decay: per leaf, 0 (no decay term) or the index k >= 1 of its multiplier in ``mults``.
    mults: the distinct decay multipliers (:func:`_decay_indices`).
  """

  target: _targets.Target
  spec: _targets.AdamWSpec
  new_state: Any
  decay: tuple[int, ...]
  mults: tuple[float, ...]


def prepare(target: _targets.Target, tx: optax.GradientTransformation, params: Any,
            grads: Any, state: Any) -> tuple[Prepared | None, str | None]:
  """``(prepared, None)`` when the kernel computes this step exactly as ``tx`` would, else
  ``(None, why not)``.

  Any error while looking (``tx.update`` on stand-ins, a mask refusing the tree) means the
  plain step, which then raises its own error if the input is at fault."""
  try:
    return _prepare(target, tx, params, grads, state)
  except Exception as e:  # noqa: BLE001 - any doubt: the plain step, with the reason.
    return None, f"the kernel's preparation failed ({type(e).__name__}: {e})"


def _prepare(target, tx, params, grads, state):
  if target.recipe is not None and _targets.adamw_spec(target.recipe)[0] is None:
    return None, _targets.adamw_spec(target.recipe)[1]
  inner = _adamw_state(target, state)
  if inner is None:
    return None, "the state is not that of an Adam chain (ScaleByAdamState, decay, lr states)"
  spec, why, new_state = _traced(tx, target, params, grads, state)
  if spec is None:
    return None, why
  if _adam_path(inner) != _LAYOUT[spec.layout]:
    return None, ("the state is not laid out as the chain's (adam, decay, lr), (decay, adam, "
                  "lr) or ((adam, lr), decay)")
  decay, mults = _decay_indices(spec, params)  # the mask, resolved once per trace
  why = (_unsupported(spec, target, inner, params, grads, mults)
         or _moments_stay_float32(target, new_state))
  if why is not None:
    return None, why
  return Prepared(target, spec, new_state, tuple(decay), tuple(mults)), None


def _moments_stay_float32(target: _targets.Target, new_state: Any) -> str | None:
  """Why the chain's new moments are not the kernel's (float32, the input's layout), or None.

  The kernel writes float32 moments in place; the chain may promote them (a float64 β₁ or
  β₂ with ``jax_enable_x64`` makes ``β₁·m`` float64), which the stand-in update shows."""
  new_inner = _adamw_state(target, new_state)
  if new_inner is None:
    return "the chain's new state is not laid out as its input state"
  adam = state_parts(new_inner)[0]
  dtypes = {jnp.result_type(x) for x in jax.tree.leaves((adam.mu, adam.nu))}
  if dtypes - {jnp.dtype(jnp.float32)}:
    return (f"the chain's step returns moments in {sorted(str(d) for d in dtypes)} and the "
            "kernel writes float32 ones (a float64 hyperparameter promotes them)")
  return None


def _unsupported(spec: _targets.AdamWSpec, target: _targets.Target, inner: Any, params: Any,
                 grads: Any, mults: list[float]) -> str | None:
  f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
  # bfloat16 gradients enter the moments widened to float32 only in od.scale_by_adam's
  # mu_dtype/nu_dtype variant; optax.scale_by_adam rounds (1-b1)·g in bfloat16 first.
  # A clip divides g in g's dtype: the kernel clips float32 gradients only.
  # L2 adds λθ to g in g's dtype: the kernel takes float32 θ and g for it.
  widened = spec.mu_dtype is not None and spec.nu_dtype is not None
  l2 = spec.layout == "l2"
  allowed = {"params": {f32} if l2 else {f32, bf16},
             "grads": {f32, bf16} if widened and target.max_norm is None and not l2
             else {f32},
             "mu": {f32}, "nu": {f32}}
  adam = state_parts(inner)[0]
  arrays = {"params": params, "grads": grads, "mu": adam.mu, "nu": adam.nu}
  for name, tree in arrays.items():
    dtypes = {jnp.result_type(x) for x in jax.tree.leaves(tree)}
    if dtypes - allowed[name]:
      hint = (" (bfloat16 weights: keep the moments in float32 with "
              "mu_dtype=nu_dtype=jnp.float32; a clipped step: float32 grads)"
              if bf16 in dtypes else "")
      return (f"the kernel takes {name} in {sorted(str(d) for d in allowed[name])}, got "
              f"{sorted(str(d) for d in dtypes)}{hint}")
  if len(mults) > 127:  # decay indices are int8
    return f"the kernel takes at most 127 distinct decay multipliers, got {len(mults)}"
  values = {"learning_rate": spec.learning_rate, "weight_decay": spec.weight_decay,
            "max_norm": target.max_norm}
  for name, value in values.items():  # the kernel takes scalars; (1,) broadcasts.
    if value is None:
      continue
    shape = (jax.eval_shape(value, jnp.zeros([], jnp.int32)).shape if callable(value)
             else jnp.shape(value))
    if shape != ():
      return f"the kernel takes a scalar {name}, and this one has shape {shape}"
  return _kernel_build.unavailable()


def _standins(tree: Any) -> Any:
  return jax.tree.map(_flat.standin, tree)


def _traced(tx, target, params, grads, state):
  """``(spec, why not, new state)``: ``tx.update`` on zero-size stand-ins.

  This gives the new state with the chain's own step counts (and hyperparameters, for
  ``optax.inject_hyperparams``), runs the chain's own checks (mask, dtypes) on the real
  paths, and yields the ``od.adamw`` arguments: the alias's record, or the record of the
  ``od.adamw`` that ``tx.update`` builds (with this trace's values)."""
  inner = target.state_of(state)
  adam = state_parts(inner)[0]
  standin_state = target.with_state(state, _with_moments(inner, _standins(adam.mu),
                                                         _standins(adam.nu)))
  with warnings.catch_warnings(), _recipes.collecting() as built:
    warnings.simplefilter("ignore")  # a mask judging stand-ins may warn; the real tree decides.
    new_state = tx.update(_standins(grads), standin_state, _standins(params))[1]
  recipe = target.recipe
  if recipe is None:
    recipe = built[0] if len(built) == 1 else None
  spec, why = _targets.adamw_spec(recipe)
  return spec, why, new_state


def _scalars(spec: _targets.AdamWSpec, state: Any, max_norm: Any, grads: Any,
             mults: list[float]) -> jax.Array:
  """The step's scalars as the chain computes them (optax.clip_by_global_norm,
  optax.scale_by_adam, the decay term of ``_decay.decay``, optax.scale_by_learning_rate),
  each rounded to float32 where the chain rounds it, then the decay coefficient of each
  multiplier in ``mults`` (decay index k is ``mults[k - 1]``). ``state`` is the chain's."""
  adam, wd_state, lr_state = state_parts(state)
  clip: Any = 0.0
  g_norm: Any = 1.0
  if max_norm is not None:  # optax/transforms/_clipping.py: g_norm = optax.tree.norm(g)
    g_norm = optax.tree.norm(grads)
    clip = jnp.where(jnp.squeeze(g_norm < max_norm), 0.0, 1.0)
    max_norm = jnp.asarray(max_norm, jnp.float32)
  count = optax.safe_increment(adam.count)
  bc1, bc2 = 1 - spec.b1**count, 1 - spec.b2**count  # optax.tree.bias_correction
  bc1_next = 1 - spec.b1**optax.safe_increment(count)  # Nesterov's m'/(1 - b1^(t+1))
  if not spec.bias_correction:  # m/1 and v/1 are exact: the uncorrected step.
    bc1, bc2 = 1.0, 1.0
  lr = spec.learning_rate
  neg_lr = -1 * lr(lr_state.count) if callable(lr) else -1 * lr
  wd = (spec.weight_decay(wd_state.decay_count) if callable(spec.weight_decay)
        else spec.weight_decay)
  # _decay.decay's term: c·θ, or (c·mult)·θ with c·mult rounded first.
  coefficients = [wd if m == 1.0 else wd * m for m in mults]
  return jnp.stack([jnp.asarray(x, jnp.float32) for x in (
      neg_lr, 1 - spec.b1, spec.b1, 1 - spec.b2, spec.b2, bc1, bc2, spec.eps, spec.eps_root,
      float(("adamw", "l2", "after").index(spec.layout)), clip, g_norm,
      1.0 if max_norm is None else max_norm, 1.0 if spec.nesterov else 0.0, bc1_next,
      *coefficients)])


def _decay_indices(spec: _targets.AdamWSpec, params: Any) -> tuple[list[int], list[float]]:
  """Per leaf, 0 (no decay term) or k >= 1, the leaf's multiplier being ``mults[k - 1]``
  (the same ``_masks.decisions``; a constant λ = 0 adds no term at all, as in
  ``_decay.decay``, except optax.adamw's array 0)."""
  decisions = _masks.decisions(params, spec.mask, warn=False)
  if _hyperparams.constant(spec.weight_decay) == 0.0 and not spec.zero_adds_term:
    return [0] * len(decisions), []
  mults = sorted({d.multiplier for d in decisions if d.multiplier})
  index = {m: k + 1 for k, m in enumerate(mults)}
  return [index[d.multiplier] if d.multiplier else 0 for d in decisions], mults


def _call(scalars, leaves, segment_sizes, decay, shard=None, shard_size=0):
  """The kernel on ``leaves`` = [(θ, g, m, v), ...]; returns [(θ', m', v'), ...].

  ``shard`` (traced int32 index) and ``shard_size``: the leaves are shard ``shard`` of a
  buffer cut into ``shard_size`` pieces, and start there in the segments."""
  whole = shard is None
  shard = jnp.zeros((1,), jnp.int32) if shard is None else jnp.reshape(shard, (1,))
  args, outs, aliases = [scalars, shard], [], {}
  for k, leaf in enumerate(leaves):
    args += leaf
    outs += [jax.ShapeDtypeStruct(jnp.shape(leaf[0]), jnp.result_type(leaf[0]))]
    outs += [jax.ShapeDtypeStruct(jnp.shape(leaf[0]), jnp.float32)] * 2
    aliases.update({2 + 4 * k: 3 * k, 2 + 4 * k + 2: 3 * k + 1, 2 + 4 * k + 3: 3 * k + 2})
  res = jax.ffi.ffi_call(_kernel_build.TARGET, outs, input_output_aliases=aliases,
                         vmap_method="sequential")(
      *args, segment_sizes=np.asarray(segment_sizes, np.int64),
      decay=np.asarray(decay, np.int8), shard_size=np.int64(shard_size), whole=whole)
  return [tuple(res[3 * k:3 * k + 3]) for k in range(len(leaves))]


def _per_shard(scalars, leaves, local_call, segments=False):
  """``local_call(scalars, leaves, shard)`` on each device's shard of the leaves
  (``_sharding.per_shard``: θ, g, m and v of a leaf take θ's sharding, no collective).

  ``shard`` is None, except with ``segments=True`` (one packed 1-D buffer whose segments
  decide the decay) sharded evenly along mesh axes, where it is ``(index, size)`` of this
  device's shard; a packed buffer sharded any other way is gathered first (correct, not
  fast).
  """
  n = len(leaves)

  def unflatten(arrays):
    return [tuple(arrays[4 * k:4 * k + 4]) for k in range(n)]

  def whole(scalars, *arrays):
    return tuple(x for r in local_call(scalars, unflatten(arrays), None) for x in r)

  def plan(mesh, arg_shapes, leaf_shardings):
    if not segments:
      return None
    spec = leaf_shardings[0].spec if isinstance(leaf_shardings[0], NamedSharding) else ()
    axes = spec[0] if len(spec) == 1 else None
    axes = axes if isinstance(axes, tuple) or axes is None else (axes,)
    count = int(np.prod([mesh.shape[a] for a in axes])) if axes else 0
    size = arg_shapes[1].shape[0]
    if not count or size % count:  # not an even cut along mesh axes.
      return "gather"

    def lower(scalars, *arrays):
      shard = (jax.lax.axis_index(axes), size // count)
      return tuple(x for r in local_call(scalars, unflatten(arrays), shard) for x in r)
    return lower

  res = _sharding.per_shard(whole, [scalars, *(x for leaf in leaves for x in leaf)],
                            [None, *(k for k in range(n) for _ in range(4))],
                            [k for k in range(n) for _ in range(3)], plan)
  return [tuple(res[3 * k:3 * k + 3]) for k in range(n)]


def adamw_step(prepared: Prepared, params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
  """``tx.update`` + ``optax.apply_updates`` through the kernel (see :func:`prepare`)."""
  target, spec, new_state = prepared.target, prepared.spec, prepared.new_state
  p_leaves, treedef = jax.tree.flatten(params)
  inner = target.state_of(state)
  adam = state_parts(inner)[0]
  leaves = list(zip(p_leaves, treedef.flatten_up_to(grads), treedef.flatten_up_to(adam.mu),  # type: ignore[attr-defined]
                    treedef.flatten_up_to(adam.nu)))  # type: ignore[attr-defined]
  decay, mults = prepared.decay, list(prepared.mults)
  scalars = _scalars(spec, inner, target.max_norm, grads, mults)
  # At most _GROUP leaves per call: XLA's compile time grows faster than linearly with the
  # operands of one custom call (with aliasing), and per-call overhead is a few microseconds.
  res = []
  for a in range(0, len(leaves), _GROUP):
    b = a + _GROUP
    group_decay = decay[a:b]
    res += _per_shard(scalars, leaves[a:b], lambda sc, lv, shard, d=group_decay: _call(
        sc, lv, [int(np.size(leaf[0])) for leaf in lv], d))
  new_inner = _with_moments(target.state_of(new_state),
                            treedef.unflatten([r[1] for r in res]),  # type: ignore[attr-defined]
                            treedef.unflatten([r[2] for r in res]))  # type: ignore[attr-defined]
  return (treedef.unflatten([r[0] for r in res]),  # type: ignore[attr-defined]
          target.with_state(new_state, new_inner))


def adamw_flat_step(prepared: Prepared, layout: Any, flat: jax.Array, flat_grads: jax.Array,
                    state: Any) -> tuple[Any, Any]:
  """The same step on one packed buffer (``od.FlatLayout``): one leaf, one segment per
  original leaf, whose path decides its decay (``prepared`` on the unpacked tree)."""
  target, spec, new_state = prepared.target, prepared.spec, prepared.new_state
  inner = target.state_of(state)
  adam = state_parts(inner)[0]
  grads = layout.unpack(flat_grads)  # the clip's norm is taken leaf by leaf, as optax does.
  decay, mults = prepared.decay, list(prepared.mults)

  def local(scalars, leaves, shard):
    index, size = (None, 0) if shard is None else shard
    return _call(scalars, leaves, layout.sizes, decay, index, size)
  (theta, m, v), = _per_shard(_scalars(spec, inner, target.max_norm, grads, mults),
                              [(flat, flat_grads, adam.mu, adam.nu)], local, segments=True)
  return theta, target.with_state(new_state, _with_moments(target.state_of(new_state), m, v))


def reference(prepared: Prepared, params: Any, grads: Any, state: Any) -> list[tuple]:
  """The kernel's arithmetic in float64 numpy, per leaf ``(u, m', v')`` with ``u`` the update
  it adds to θ: the loop of ``csrc/adam_step.cc`` written out, on the scalars it would be
  given (:func:`_scalars`). Concrete arrays only; ``_verify`` compares it with ``tx.update``."""
  target, spec = prepared.target, prepared.spec
  inner = target.state_of(state)
  adam = state_parts(inner)[0]
  s = np.asarray(_scalars(spec, inner, target.max_norm, grads, list(prepared.mults)),
                 np.float64)
  (neg_lr, omb1, b1, omb2, b2, bc1, bc2, eps, eps_root, mode, clip, g_norm, max_norm,
   nesterov, bc1_next) = s[:15]
  p_leaves, treedef = jax.tree.flatten(params)
  out = []
  for k, (theta, g, m, v) in enumerate(zip(
      p_leaves, treedef.flatten_up_to(grads), treedef.flatten_up_to(adam.mu),  # type: ignore[attr-defined]
      treedef.flatten_up_to(adam.nu))):  # type: ignore[attr-defined]
    theta, g, m, v = (np.asarray(x, np.float64) for x in (theta, g, m, v))
    # A segment without decay (index 0) has no term at all (the C++ loop's mode -1).
    term = mode if prepared.decay[k] else -1
    c = s[14 + prepared.decay[k]] if prepared.decay[k] else 0.0
    if clip:
      g = (g / g_norm) * max_norm
    if term == 1:
      g = g + c * theta
    m = omb1 * g + b1 * m
    v = omb2 * (g * g) + b2 * v
    m_hat = b1 * (m / bc1_next) + omb1 * (g / bc1) if nesterov else m / bc1
    u = m_hat / (np.sqrt(v / bc2 + eps_root) + eps)
    if term == 0:
      u = u + c * theta
    u = neg_lr * u
    if term == 2:
      u = u - c * theta
    out.append((u, m, v))
  return out
