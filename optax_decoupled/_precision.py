"""Low-precision parameters: when the decay rounds to nothing, and stochastic rounding.

A decoupled-decay step multiplies a weight by ``1 − η·λ``. In a parameter
dtype with machine epsilon ε (bfloat16: 2⁻⁷, float16: 2⁻¹⁰), round-to-nearest
returns the weight unchanged whenever ``η·λ·|θ|`` is below half the spacing
of the grid at θ, i.e. for *every* θ once ``η·λ < ε/4`` and for most θ once
``η·λ < ε/2``; typical values (η = 1e-3, λ = 1e-2) are far below both. The
decay then vanishes silently unless the Adam step that is added with it happens
to dither the rounding.

Two remedies, measured by ``examples/precision_decay.py``:

* compute the whole update in float32 (``od.scale_by_adam(mu_dtype=jnp.float32,
  nu_dtype=jnp.float32)``: moments, the decay term and the learning-rate
  scaling all stay in float32) and let ``optax.apply_updates`` round θ + u to
  the parameter dtype once;
* additionally round θ + u *stochastically* (:func:`stochastic_rounding`), so
  that rounding is unbiased in expectation and a shrink far below one ulp still
  acts on average.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _masks, _paths

__all__ = [
    "LowPrecisionDecayWarning",
    "StochasticRoundingState",
    "stochastic_rounding",
    "vanishing_decay_leaves",
]


class LowPrecisionDecayWarning(UserWarning):
  """The per-step shrink η·λ is below the rounding resolution of a decayed leaf's dtype."""


def is_low_precision(dtype: Any) -> bool:
  """Real floating dtypes narrower than float32 (bfloat16, float16, float8 ...)."""
  dtype = np.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def vanishing_decay_leaves(params: Any, shrink: float, mask: Any = None) -> list[tuple[str, str]]:
  """``(path, dtype)`` of the decayed low-precision leaves where a shrink of ``shrink`` is lost.

  A leaf is listed when its dtype is narrower than float32 and
  ``0 < shrink < ε/2`` for that dtype: round-to-nearest then maps
  ``θ·(1 − shrink)`` back to θ for most values of θ.
  """
  if not shrink > 0:
    return []
  out = []
  for d in _masks.decisions(params, mask, warn=False):
    dtype = _paths.leaf_dtype(d.leaf)
    c = shrink * d.multiplier
    if d.decay and is_low_precision(dtype) and c < float(jnp.finfo(dtype).eps) / 2:
      out.append((d.path, str(dtype)))
  return out


def warn_if_decay_vanishes(params: Any, shrink: float, mask: Any, who: str) -> None:
  """Warns (:class:`LowPrecisionDecayWarning`) when the shrink rounds to nothing."""
  import warnings

  lost = vanishing_decay_leaves(params, shrink, mask)
  if not lost:
    return
  dtype = lost[0][1]
  eps = float(jnp.finfo(np.dtype(dtype)).eps)
  warnings.warn(
      f"{who}: the per-step weight-decay shrink η·λ = {shrink:.3g} is below half the "
      f"rounding step of {dtype} (ε/2 = {eps / 2:.3g}), so with round-to-nearest the decay "
      f"alone rounds to nothing on {len(lost)} decayed leaf/leaves, e.g. {lost[0][0]!r}. "
      "Keep the update in float32 (mu_dtype=nu_dtype=jnp.float32) and wrap the optimizer "
      "in od.stochastic_rounding(tx), or keep float32 parameters. Silence with "
      "warnings.simplefilter('ignore', od.LowPrecisionDecayWarning).",
      LowPrecisionDecayWarning,
      stacklevel=3,
  )


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`."""

  inner_state: Any  # the wrapped transform's state.
  key: chex.Array  # shape=(2,), dtype=jnp.uint32; raw threefry key, split once per step.


def _round_stochastically(x: chex.Array, dtype: Any, key: chex.Array) -> chex.Array:
  """Rounds float32 ``x`` to ``dtype`` up or down with probability ∝ proximity (unbiased)."""
  nearest = x.astype(dtype)
  nearest_f = nearest.astype(jnp.float32)
  toward = jnp.where(nearest_f > x, -jnp.inf, jnp.inf).astype(dtype)
  other = jnp.nextafter(nearest, toward)
  other_f = other.astype(jnp.float32)
  lo_f, hi_f = jnp.minimum(nearest_f, other_f), jnp.maximum(nearest_f, other_f)
  lo, hi = jnp.where(nearest_f <= other_f, nearest, other), jnp.where(
      nearest_f <= other_f, other, nearest
  )
  # Round up with probability (x − lo)/(hi − lo), written without a division: hi − lo is a
  # power of two and x − lo is exact in float32, so the comparison is exact and the same
  # under any compilation (sharded or not).
  u = jax.random.uniform(key, x.shape, jnp.float32)
  rounded = jnp.where(u * (hi_f - lo_f) < x - lo_f, hi, lo)
  return jnp.where((nearest_f == x) | ~jnp.isfinite(x), nearest, rounded)


def stochastic_rounding(
    inner: optax.GradientTransformation, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
  r"""Makes ``optax.apply_updates`` round low-precision leaves stochastically.

  .. math:: \theta_t = \mathrm{SR}_{\text{dtype}}(\theta_{t-1} + u_t),\quad
    \mathbb{E}[\theta_t] = \theta_{t-1} + u_t

  For every leaf whose parameter dtype is narrower than float32, the returned
  update is ``SR(θ + u) − θ`` computed in float32, where ``SR`` rounds to one of
  the two neighbouring representable values with probability proportional to
  proximity; ``optax.apply_updates`` then lands exactly on ``SR(θ + u)``. A
  per-step shrink far below one ulp (η·λ = 1e-5 in bfloat16) therefore still
  shrinks the weights on average instead of vanishing. Leaves of float32 or
  wider are passed through bit for bit. Decay convention: that of ``inner``.

  Use it with a float32 update (``mu_dtype=nu_dtype=jnp.float32``), so that
  ``u`` itself has not already been rounded. Inside, the wrapped transform's
  :class:`LowPrecisionDecayWarning` is silenced, since this is the remedy.

  Args:
    inner: the optimizer, e.g. ``od.adamw(...)``; its update must be the last
      step before ``optax.apply_updates``.
    seed: an int (or an integer array, e.g. traced in a seed sweep), the seed
      of the rounding noise (a threefry key in the state, so a checkpointed run
      resumes with the same noise).

  Returns:
    A transformation with state :class:`StochasticRoundingState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = od.stochastic_rounding(optax.chain(
    ...     od.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32),
    ...     od.add_decoupled_decay(1e-2), optax.scale_by_learning_rate(1e-3)))
    >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": jnp.zeros(4, jnp.bfloat16)}, state, params)
    >>> optax.apply_updates(params, u)["w"].dtype
    dtype(bfloat16)

  References:
    Gupta et al., Deep Learning with Limited Numerical Precision, ICML 2015
    (stochastic rounding); Zamirai et al., Revisiting BFloat16 Training, 2020.
  """
  who = "stochastic_rounding"
  if not isinstance(inner, optax.GradientTransformation):
    hint = " (a factory? call it, e.g. od.adamw(1e-3))" if callable(inner) else ""
    raise TypeError(f"{who}: inner must be an optax.GradientTransformation{hint}, got "
                    f"{inner!r}.")
  is_int = isinstance(seed, (int, np.integer)) or (
      hasattr(seed, "dtype") and np.ndim(seed) == 0
      and jnp.issubdtype(seed.dtype, jnp.integer))  # an int array (traced in a seed sweep).
  if isinstance(seed, (bool, np.bool_)) or not is_int:
    raise TypeError(f"{who}: seed must be an int (the rounding noise's key is made from it), "
                    f"got {seed!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    import warnings

    with warnings.catch_warnings():
      warnings.simplefilter("ignore", LowPrecisionDecayWarning)
      inner_state = inner.init(params)
    return StochasticRoundingState(inner_state, jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{who} needs the parameters: tx.update(updates, state, params).")
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    key, sub = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    try:
      p_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{who}: updates and params have different tree structures: {e}") from e
    out = []
    for i, (u, p) in enumerate(zip(leaves, p_leaves)):
      # Python-float parameters (float64 to numpy) are never low precision: passed through.
      if u is None or not is_low_precision(_paths.leaf_dtype(p)):
        out.append(u)
        continue
      p32 = jnp.asarray(p).astype(jnp.float32)
      q = _round_stochastically(p32 + u.astype(jnp.float32), p.dtype, jax.random.fold_in(sub, i))
      out.append(q.astype(jnp.float32) - p32)
    return jax.tree.unflatten(treedef, out), StochasticRoundingState(inner_state, key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
