"""Checks a kernel target read from optax's closures against the plain step, on probes.

``_targets`` recognises ``optax.adamw`` and ``optax.clip_by_global_norm`` by the names of
their functions and closure variables. A name is not a meaning: a future optax (or a
look-alike transformation) could keep the names and change the arithmetic. So before the
kernel is used for such a target, the kernel's arithmetic (``_kernel.reference``, the C++
loop in float64 on the scalars it would be given) is compared with ``tx.update`` on probe
values, in three steps: zero gradients on a fresh state (the decay term alone), gradients
spanning nine decades with the clip active, and a second step with the clip inactive (bias
corrections past the first step). Any disagreement, or anything that cannot be evaluated
(traced hyperparameters), means the plain step; the verdict is cached per transformation and
tree structure.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _kernel, _targets

__all__ = ["kernel_agrees"]

_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# An infinite weight tells whether a zero λ still adds 0·θ (NaN there), as optax's
# add_decayed_weights does or not depending on its release and λ's type.
_THETA = np.array([-1.5, -0.3, 0.02, 0.7, 1.2, -2.0, 0.5, np.inf])
_GRADS = (np.zeros(8),
          np.array([3.0, -1e-7, 2e-5, -0.4, 1e-3, -7.0, 5e-8, 0.9]),
          np.array([-0.2, 4e-6, -3e-3, 0.05, -8e-8, 0.6, 1e-4, -1.0]))


def kernel_agrees(tx: optax.GradientTransformation, target: _targets.Target,
                  params: Any, grads: Any) -> str | None:
  """None when the kernel computes ``tx``'s step on probes of ``params``' structure (and
  ``params``' dtypes, ``grads``' for the gradients), else why it was not trusted."""
  key = (jax.tree.structure(params),
         tuple((jnp.ndim(x), jnp.result_type(x)) for x in jax.tree.leaves(params)),
         tuple(jnp.result_type(x) for x in jax.tree.leaves(grads)))
  try:
    verdicts = _VERDICTS.setdefault(tx.update, {})
  except TypeError:  # not weakly referenceable: check every time.
    verdicts = {}
  if key not in verdicts:
    try:
      with jax.ensure_compile_time_eval(), np.errstate(all="ignore"):  # inf probes
        verdicts[key] = _check(tx, target, params, grads)
    except Exception as e:  # noqa: BLE001 - cannot be evaluated: not verified.
      return (f"the recognised optax chain could not be checked against the plain step "
              f"({type(e).__name__}: {e})")
  return verdicts[key]


def _probe(params: Any, values: np.ndarray, scale: float = 1.0, like: Any = None) -> Any:
  """A tree of ``params``' structure, each leaf of its ndim and dtype (``like``'s dtype, if
  given) with ``values``."""
  def leaf(x, d):
    shape = (1,) * (jnp.ndim(x) - 1) + (values.size,) if jnp.ndim(x) else ()
    v = values * scale if shape else values[3] * scale
    return jnp.asarray(np.reshape(v, shape), jnp.result_type(d))
  return jax.tree.map(leaf, params, params if like is None else like)


def _check(tx, target, params, like_grads) -> str | None:
  theta = _probe(params, _THETA)
  state = tx.init(theta)
  for t, values in enumerate(_GRADS):
    grads = _probe(params, values, like=like_grads)
    if target.max_norm is not None and t:
      norm = float(optax.tree.norm(grads))
      grads = _probe(params, values, float(target.max_norm) * (3.0 if t == 1 else 1 / 3) / norm,
                     like=like_grads)
    prepared, why = _kernel.prepare(target, tx, theta, grads, state)
    if prepared is None:
      return f"the recognised optax chain could not be checked: {why}"
    want = _kernel.reference(prepared, theta, grads, state)
    updates, new_state = tx.update(grads, state, theta)
    adam = _kernel.state_parts(target.state_of(new_state))[0]
    got = zip(jax.tree.leaves(updates), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu))
    for (u_want, m_want, v_want), (u, m, v), x in zip(want, got, jax.tree.leaves(theta)):
      rtol = 1e-4 if jnp.result_type(x) == jnp.float32 else 2e-2
      for name, a, b in (("update", u, u_want), ("mu", m, m_want), ("nu", v, v_want)):
        a = np.asarray(a, np.float64)
        scale = float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0))
        if not np.allclose(a, b, rtol=rtol, atol=rtol * 1e-3 * scale, equal_nan=True):
          return (f"the chain read from optax's closures does not compute what the kernel "
                  f"would (the {name}s differ on a probe at step {t + 1}): optax has changed, "
                  "or this is another transformation")
    theta = optax.apply_updates(theta, updates)
    state = new_state
  return None
