"""The aliases' checks and guards: their arguments at construction, their state at init.

These sit in the aliases' layer: each alias calls them once, on its own arguments, before it
builds its chain from private builders that do not check again.
"""

from __future__ import annotations

from typing import Any, TypeVar

import optax

from optax_decoupled import _hyperparams, _precision, _sharding

__all__ = ["COUPLED_HINT", "check_lr_wd", "check_momentum", "lr_hint", "placed"]

_T = TypeVar("_T", bound=optax.GradientTransformation)


def check_lr_wd(who: str, learning_rate: Any, weight_decay: Any) -> None:
  _hyperparams.check_learning_rate(learning_rate, who)
  _hyperparams.check_weight_decay(weight_decay, who)


def placed(tx: _T, shrink: Any, mask: Any, who: str) -> _T:
  """``tx`` whose ``init`` places the parameter-shaped state like the parameters.

  Before it, for a constant nonzero per-step ``shrink`` of the leaves ``mask`` decays, a
  :class:`LowPrecisionDecayWarning` names the bfloat16/float16 leaves on which it rounds to
  nothing. Updates and state values are ``tx``'s, unchanged; the type of ``tx`` is kept
  (``optax.GradientTransformationExtraArgs`` stays one).
  """
  c = _hyperparams.constant(shrink)

  def init_fn(params):
    if c:
      _precision.warn_if_decay_vanishes(params, c, mask, who)
    return _sharding.shard_state_like(tx.init(params), params)

  return type(tx)(init_fn, tx.update)


def lr_hint(learning_rate: Any) -> str:
  lr = _hyperparams.constant(learning_rate)
  bound = f" = {1 / lr:.4g}" if lr else ""
  return (f"Use weight_decay < 1/learning_rate{bound} (lr-coupled λ values are typically "
          "1e-4 ... 1e-1).")


COUPLED_HINT = ("In the 'schedule' and 'none' conventions λ is itself the per-step shrink at "
                 "the peak (typically 1e-5 ... 1e-3); od.convert_weight_decay converts a "
                 "torch-style λ.")


def check_momentum(who: str, momentum: Any, nesterov: Any) -> None:
  """``None`` (no buffer) or a number in [0, 1); Nesterov needs a buffer."""
  _hyperparams.check_flag(nesterov, "nesterov", who)
  if momentum is not None:
    _hyperparams.check_decay_rate(momentum, "momentum", who)
  if nesterov and (momentum is None or _hyperparams.constant(momentum) == 0):
    raise ValueError(f"{who}: nesterov=True needs momentum > 0 (as torch.optim.SGD).")
