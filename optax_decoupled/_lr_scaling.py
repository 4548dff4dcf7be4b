"""Per-parameter learning-rate scaling: multipliers by path rule, and layer-wise decay.

Both multiply the update of each leaf (or each slice of a stacked leaf) by a factor decided at
trace time from its path. Neither decays anything itself; which decay convention results
depends on where they sit in the chain (each docstring says).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import optax

from optax_decoupled import _layer_decay, _multipliers, _paths, _rules

__all__ = ["scale_by_layer_decay", "scale_by_lr_multipliers"]


def scale_by_lr_multipliers(
    rules: Sequence[tuple[str, float]], *, default: float = 1.0, allow_unmatched: bool = False
) -> optax.GradientTransformation:
  r"""Per-group learning-rate multipliers from regex rules, first full match wins.

  .. math:: u \leftarrow \text{mult}(path)\cdot u

  ``mult`` is the multiplier of the first rule whose regular expression fully matches the
  leaf's path (``re.fullmatch``, the matching and unmatched-rule check of
  :func:`decay_multipliers`), else ``default``; resolved at trace time. A multiplier of
  exactly 1 leaves the update untouched (bitwise), 0 zeroes it (freezes the group).

  Place it anywhere after the learning-rate scaling, e.g.
  ``optax.chain(od.adamw(...), od.scale_by_lr_multipliers(...))``: it is linear, so it
  multiplies the step of the group as a per-group learning rate would. After an alias
  that decays, it multiplies the decay term too, as torch's per-group ``lr`` does with
  lr-coupled AdamW. It is not a decay: to weight λ per group use
  :func:`decay_multipliers`. Layer-wise learning-rate decay for fine-tuning is one rule
  per layer with multiplier :math:`\gamma^{L-l}`.

  Decay convention: none of its own; placed after a decaying alias it scales the decay term
  with the rest of the update, as torch's per-group learning rates do.

  Args:
    rules: ``[(regex, multiplier), ...]``; multipliers finite and >= 0.
    default: the multiplier of leaves no rule matches (1 = unchanged).
    allow_unmatched: allow rules that fully match no path, or only paths an earlier
      rule decides (else ``ValueError`` at ``init`` and at trace time).

  Returns:
    An ``optax.GradientTransformation`` with state ``optax.EmptyState()``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = optax.chain(optax.sgd(1.0), od.scale_by_lr_multipliers([("head/.*", 0.1)]))
    >>> params = {"head": {"kernel": jnp.ones(2)}, "body": {"kernel": jnp.ones(2)}}
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates["head"]["kernel"].tolist(), updates["body"]["kernel"].tolist()
    ([-0.10000000149011612, -0.10000000149011612], [-1.0, -1.0])

  References:
    google-research/big_vision, big_vision/optax.py (``config.lr_mults``: first match
    wins, applied after the optimizer and ``optax.scale(config.lr)``); layer-wise lr decay:
    Clark et al., ELECTRA, https://arxiv.org/abs/2003.10555; Bao et al., BEiT,
    https://arxiv.org/abs/2106.08254.
  """
  mults = _multipliers.parse(_multipliers.LrMultipliers, rules, default, allow_unmatched)

  def scaled(u: Any, mult: float) -> Any:
    if mult == 1.0:
      return u
    value = _paths.leaf_value(u)  # an nnx Variable stays one (updates that are a State).
    return _paths.with_value(u, jnp.zeros_like(value) if mult == 0.0 else mult * value)

  def init_fn(params):
    mults.decisions(params)  # a rule that matches nothing fails at init, not mid-run.
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    decided = mults.decisions(updates)
    return _rules.unflatten_like(updates, [scaled(d.leaf, d.multiplier) for d in decided]), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_layer_decay(rules: _layer_decay.LayerDecay) -> optax.GradientTransformation:
  r"""Multiplies each update by its layer's learning-rate multiplier.

  .. math:: u \leftarrow s_{l(\text{path})}\, u, \qquad s_l = \gamma^{\,L + 1 - l}

  per leaf, and per slice of a stacked leaf (``u * s`` with ``s`` of shape
  ``(L, 1, ..., 1)``). The rules are resolved against the updates' paths at ``init`` and at
  trace time (errors as :func:`layer_decay` lists them). A multiplier of exactly 1 leaves a
  named leaf's update untouched.

  Decay convention: placed after a decaying alias, e.g.
  ``optax.chain(od.adamw(lr, weight_decay=wd, mask=...), od.scale_by_layer_decay(rules))``,
  it multiplies the whole step, decay term included:
  :math:`\theta \leftarrow \theta - s_l\eta_t(\hat m/(\sqrt{\hat v}+\epsilon) + \lambda\theta)`.
  That is torch's ``AdamW`` with timm's parameter groups, whose ``lr`` is ``lr * lr_scale``
  (lr-coupled: the per-step shrink is :math:`s_l\eta_t\lambda`). To decay every layer
  alike, put it before the decay, e.g. ``optax.chain(od.scale_by_adam(),
  od.scale_by_layer_decay(rules), optax.scale_by_learning_rate(lr),
  od.add_decoupled_decay(...))``.

  Args:
    rules: a ``LayerDecay`` from :func:`optax_decoupled.layer_decay`.

  Returns:
    An ``optax.GradientTransformation`` with state ``optax.EmptyState()``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> ld = od.layer_decay(0.5, 2, embeddings="embed", stacked="blocks", head="head")
    >>> tx = optax.chain(optax.sgd(1.0), od.scale_by_layer_decay(ld))
    >>> g = {"embed": jnp.ones(2), "blocks": jnp.ones((2, 3)), "head": jnp.ones(2)}
    >>> u, _ = tx.update(g, tx.init(g))
    >>> u["embed"].tolist(), u["blocks"][:, 0].tolist(), u["head"].tolist()
    ([-0.125, -0.125], [-0.25, -0.5], [-1.0, -1.0])

  References:
    timm ``timm/optim/_param_groups.py`` (``param_groups_layer_decay``: ``lr_scale``) and
    ``timm/scheduler/scheduler.py`` (a group's lr is the scheduled value times ``lr_scale``);
    torch ``torch.optim.AdamW``.
  """
  if not isinstance(rules, _layer_decay.LayerDecay):
    raise TypeError(f"scale_by_layer_decay takes the rules of od.layer_decay(...), got "
                    f"{rules!r}.")

  def init_fn(params: Any) -> optax.EmptyState:
    rules.decisions(params)
    return optax.EmptyState()

  def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    return rules.scale(updates), state

  return optax.GradientTransformation(init_fn, update_fn)
