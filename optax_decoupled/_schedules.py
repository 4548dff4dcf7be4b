"""Schedules of the paper: SGDR / AdamWR cosine annealing with warm restarts."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from optax_decoupled import _hyperparams

__all__ = ["cosine_warm_restarts_schedule"]

_LIMIT = 2**62  # restart steps are listed up to here (int64 step counts, with x64 enabled).


@dataclasses.dataclass(frozen=True, eq=False)
class _WarmRestarts:
  peak_value: Any
  first_period: int
  period_multiplier: int
  min_value: Any
  starts: tuple[int, ...]  # restart steps (first at 0), below _LIMIT.
  periods: tuple[int, ...]  # T_i of the period that begins at each start (Python ints).

  def __call__(self, count: Any) -> Any:
    if isinstance(count, (int, np.integer)) and not isinstance(count, bool):
      position, period = self._position(int(count))  # exact for any Python int step.
      frac = jnp.float32(position / period)
    else:
      t = jnp.asarray(count)
      if not jnp.issubdtype(t.dtype, jnp.integer):
        t = t.astype(jnp.int32)
      if self.period_multiplier == 1:
        frac = jnp.mod(t, self.first_period).astype(jnp.float32) / jnp.float32(self.first_period)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return self.min_value + (self.peak_value - self.min_value) * cosine
      top = np.iinfo(t.dtype).max
      n = sum(1 for s in self.starts if s <= top)  # restarts a count of this dtype can reach.
      starts = jnp.asarray(self.starts[:n], t.dtype)
      i = jnp.searchsorted(starts, t, side="right") - 1
      t_cur = t - starts[i]
      # Periods as float32: a period past the int32 range stays exact to float32 round-off.
      t_i = jnp.asarray(self.periods[:n], jnp.float32)[i]
      frac = t_cur.astype(jnp.float32) / t_i
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return self.min_value + (self.peak_value - self.min_value) * cosine

  def _position(self, t: int) -> tuple[int, int]:
    """(steps since the last restart, length of the current period) of step ``t``."""
    if self.period_multiplier == 1:
      return t % self.first_period, self.first_period
    k = int(np.searchsorted(np.asarray(self.starts, np.int64), t, side="right")) - 1
    start, period = self.starts[k], self.periods[k]
    while t >= start + period:  # past _LIMIT: keep multiplying, in Python ints.
      start, period = start + period, period * self.period_multiplier
    return t - start, period


def cosine_warm_restarts_schedule(
    peak_value: Any = 1.0,
    first_period: int = 100,
    period_multiplier: int = 1,
    min_value: Any = 0.0,
) -> Any:
  r"""SGDR/AdamWR cosine annealing with warm restarts, advanced every step.

  .. math::
    \eta_t = \eta_{min} + (\eta_{peak} - \eta_{min})\cdot
    \tfrac12\big(1 + \cos(\pi T_{cur}/T_i)\big)

  where :math:`T_{cur}` counts steps since the last restart and the period
  :math:`T_i` starts at ``first_period`` (T_0) and is multiplied by
  ``period_multiplier`` (T_mult) at each restart: restarts happen at steps
  T_0, T_0(1 + T_mult), T_0(1 + T_mult + T_mult²), ... Restart steps are
  computed in integer arithmetic, so they land exactly.

  With ``peak_value=1`` and ``min_value=0`` this is the paper's multiplier
  :math:`\eta_t` of AdamWR, usable both as a learning-rate schedule
  (``optax.scale_by_schedule``, or scaled by α) and as the decay multiplier
  (``coupling="schedule"`` with ``peak_learning_rate=α``, or
  ``od.with_decoupled_decay(inner, lambda t: λ * sched(t))``). Equals
  ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` stepped each batch.
  Decay convention: none (a schedule).

  Args:
    peak_value: value at each restart (η_max; 1.0 for a multiplier).
    first_period: T_0, the first period in steps (int > 0).
    period_multiplier: T_mult (int >= 1, as torch).
    min_value: η_min, the value approached at the end of each period.

  Returns:
    A schedule: a function of the step count.

  Example:
    >>> import optax_decoupled as od
    >>> s = od.cosine_warm_restarts_schedule(1.0, first_period=10, period_multiplier=2)
    >>> [float(s(t)) for t in (0, 10, 30)]  # restarts at 10 and 10 + 20
    [1.0, 1.0, 1.0]

  References:
    Loshchilov & Hutter, SGDR, https://arxiv.org/abs/1608.03983 (Eq. 5);
    AdamWR: https://arxiv.org/abs/1711.05101 (Sec. 3).
  """
  who = "cosine_warm_restarts_schedule"
  for name, v in (("first_period", first_period), ("period_multiplier", period_multiplier)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{who}: {name} must be an int >= 1 (as torch's T_0, T_mult), got {v!r}.")
  _hyperparams.check_number(peak_value, "peak_value", who)
  _hyperparams.check_number(min_value, "min_value", who)
  period, mult = int(first_period), int(period_multiplier)
  starts, periods = [0], [period]
  while mult > 1 and starts[-1] + periods[-1] < _LIMIT:
    starts.append(starts[-1] + periods[-1])
    periods.append(periods[-1] * mult)
  if mult == 1:  # one period, repeated: start k·T_0 of step t is found by t mod T_0.
    starts, periods = [0], [period]
  return _WarmRestarts(peak_value, period, mult, min_value, tuple(starts), tuple(periods))
