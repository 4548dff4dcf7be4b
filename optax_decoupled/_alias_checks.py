"""Construction-time checks of the aliases: their arguments, and the guards of a decay.

These sit in the aliases' layer: each alias calls them once, on its own arguments, before it
builds its chain from private builders that do not check again.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_decoupled import _hyperparams, _precision, _sharding

__all__ = ["COUPLED_HINT", "check_lr_wd", "check_momentum", "guarded", "lr_hint"]

LR_HINT = "To maximize an objective, negate the loss."
WD_HINT = "A negative value would grow the weights."


def check_lr_wd(who: str, learning_rate: Any, weight_decay: Any) -> None:
  _hyperparams.check_schedule_or_number(learning_rate, "learning_rate", who, hint=LR_HINT)
  _hyperparams.check_schedule_or_number(weight_decay, "weight_decay", who, hint=WD_HINT)


def guarded(tx: optax.GradientTransformation, shrink: Any, mask: Any, who: str,
             hint: str) -> optax.GradientTransformation:
  """``tx`` with the construction-time guards of a decay whose per-step shrink is ``shrink``.

  A constant shrink >= 1 is a ``ValueError`` now (it would flip or zero every decayed
  weight); at ``init``, a :class:`LowPrecisionDecayWarning` names the decayed
  bfloat16/float16 leaves on which a constant shrink rounds to nothing, and the
  parameter-shaped state is placed like the parameters (``_sharding``). Updates and state
  values are ``tx``'s, unchanged.
  """
  _hyperparams.check_shrink(shrink, who, hint)
  c = _hyperparams.constant(shrink)

  def init_fn(params):
    if c:  # a constant, nonzero shrink: can it round to nothing?
      _precision.warn_if_decay_vanishes(params, c, mask, who)
    return _sharding.shard_state_like(tx.init(params), params)

  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return optax.GradientTransformationExtraArgs(init_fn, tx.update)
  return optax.GradientTransformation(init_fn, tx.update)


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
    _hyperparams.check_number(momentum, "momentum", who)
  mu = _hyperparams.constant(momentum)
  if mu is not None and mu >= 1:
    raise ValueError(f"{who}: momentum must be in [0, 1), got {mu!r}.")
  if nesterov and (momentum is None or mu == 0):
    raise ValueError(f"{who}: nesterov=True needs momentum > 0 (as torch.optim.SGD).")
