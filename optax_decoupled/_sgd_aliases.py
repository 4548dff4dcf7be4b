"""The SGD family of optimizers of well-known codebases: SGD + L2 and SGDW.

Built as the Adam family in ``_aliases`` is: each alias checks its own arguments once,
builds its chain from private builders, places its state like the parameters and records
which alias built it.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_decoupled import (
    _alias_checks,
    _couplings,
    _decay,
    _hyperparams,
    _recipes,
)
from optax_decoupled._hyperparams import DType, Numeric, ScalarOrSchedule
from optax_decoupled._masks import MaskLike

__all__ = ["sgd_l2", "sgdw"]


def _momentum(momentum: Numeric | None, nesterov: bool, accumulator_dtype: DType) -> Any:
  """optax.sgd's rule: a trace for any number (0 included, so the state's structure never
  depends on a value that optax.inject_hyperparams may trace), none for ``None``."""
  if momentum is None:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)


def sgd_l2(
    learning_rate: ScalarOrSchedule,
    momentum: Numeric | None = None,
    nesterov: bool = False,
    accumulator_dtype: DType = None,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskLike = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum and coupled L2: ``torch.optim.SGD`` (dampening 0).

  .. math::
    g_t \leftarrow g_t + \lambda\theta_{t-1};\quad b_t = \mu b_{t-1} + g_t;\quad
    \theta_t = \theta_{t-1} - \eta_t\,(g_t + \mu b_t \text{ if nesterov else } b_t)

  Decay convention: **coupled L2**. For plain SGD (no momentum) this equals
  decoupled decay with a per-step shrink of η·λ (the paper's Proposition 1).

  The positional arguments are ``optax.sgd``'s, in its order (``learning_rate,
  momentum, nesterov, accumulator_dtype``); the rest is keyword-only.

  Args:
    learning_rate: η, a float or an optax schedule.
    momentum: μ; ``None`` (default, as optax.sgd) keeps no buffer. Any number,
      0 included, keeps one (``optax.trace``), as optax.sgd does, so the state's
      structure never depends on a value ``optax.inject_hyperparams`` may trace.
      With μ = 0 the step equals torch's ``SGD(momentum=0)``.
    nesterov: Nesterov momentum (needs momentum > 0).
    accumulator_dtype: dtype of the momentum buffer (None: the parameters').
    weight_decay: λ of the L2 term (default 0, torch's), a float or a schedule.
    mask: which leaves get the L2 term (any mask form).

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.sgd_l2(0.1, momentum=0.9, weight_decay=5e-4)
    >>> state = tx.init({"w": jnp.ones(3)})

  References:
    torch.optim.SGD; optax.trace (same momentum recursion, first buffer = g).
  """
  who = "sgd_l2"
  _alias_checks.check_lr_wd(who, learning_rate, weight_decay)
  _alias_checks.check_momentum(who, momentum, nesterov)
  _hyperparams.check_dtype(accumulator_dtype, "accumulator_dtype", who)
  tx = optax.chain(
      _decay.decay(weight_decay, mask, who=who, sign=+1, state=_decay.WeightDecayState),
      _momentum(momentum, nesterov, accumulator_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )
  # Plain SGD: L2 with λ is decoupled decay with the per-step shrink η·λ (Proposition 1).
  shrink = _couplings.build(weight_decay, "lr", learning_rate, None, who)
  _hyperparams.check_shrink(shrink, who, _alias_checks.lr_hint(learning_rate))
  return _recipes.record(
      _alias_checks.placed(tx, shrink, mask, who), who,
      learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
      accumulator_dtype=accumulator_dtype, weight_decay=weight_decay, mask=mask)


def sgdw(
    learning_rate: ScalarOrSchedule,
    momentum: Numeric | None = 0.9,
    nesterov: bool = False,
    accumulator_dtype: DType = None,
    *,
    weight_decay: ScalarOrSchedule,
    coupling: str = "schedule",
    mask: MaskLike = None,
    peak_learning_rate: ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGDW: SGD with momentum and decoupled weight decay, the paper's Algorithm 1.

  .. math::
    m_t = \mu\,m_{t-1} + \eta_t\,g_t;\quad
    \theta_t = \theta_{t-1} - m_t - c_t\,\theta_{t-1}

  The momentum buffer holds **lr-scaled** steps (the paper's
  :math:`m_t = \beta_1 m_{t-1} + \eta_t\alpha g_t`, with our η_t = its
  η_t·α), unlike ``torch.optim.SGD``/``optax.sgd`` whose buffer holds
  gradients that are scaled by the *current* learning rate; the two differ
  only when the learning rate changes. The decay is not in the buffer.
  ``nesterov=True`` uses :math:`\eta_t g_t + \mu m_t` in place of
  :math:`m_t` (``optax.trace``'s Nesterov form; the paper has none).

  Decay convention: **schedule-coupled** by default (``coupling="schedule"``,
  :math:`c_t = (\eta_t/\eta_{peak})\lambda`, the paper's): λ is the paper's
  λ, independent of α. ``"lr"`` gives :math:`c_t = \eta_t\lambda`
  (torch-style units; with momentum 0 it equals ``torch.optim.SGD`` with L2
  coefficient λ), ``"none"`` gives λ_t (TF's ``SGDW``), ``"corrected"``
  :math:`\eta_t^2/\eta_{peak}\lambda`. The peak: ``peak_learning_rate``, or a
  constant ``learning_rate``; a schedule without it is an error.

  ``weight_decay`` has no default (as TF's ``SGDW``): its scale depends on the
  convention, so write the one you mean.

  Args:
    learning_rate: η_t (α times the paper's multiplier), a float or schedule.
    momentum: μ (the paper's β1); ``None`` keeps no buffer. Any number, 0
      included, keeps one (see :func:`sgd_l2`).
    nesterov: Nesterov momentum on the lr-scaled buffer.
    accumulator_dtype: dtype of the momentum buffer (None: the parameters').
    weight_decay: λ in the ``coupling`` convention (number, array or schedule).
    coupling: ``"schedule"`` (default), ``"lr"``, ``"none"`` or ``"corrected"``.
    mask: which leaves decay (None: all; any mask form, including
      :func:`decay_multipliers` rules).
    peak_learning_rate: η_peak (α) for ``"schedule"``/``"corrected"``; ignored
      otherwise. Traced values work.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> lr = optax.cosine_decay_schedule(0.1, 1000)
    >>> tx = od.sgdw(lr, momentum=0.9, weight_decay=1e-4, peak_learning_rate=0.1)
    >>> state = tx.init({"w": jnp.ones(3)})

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (Algorithm 1);
    tfa.optimizers.SGDW / tf.contrib.opt.SGDWOptimizer (``coupling="none"``).
  """
  who = "sgdw"
  _couplings.check_args(who, weight_decay=weight_decay, coupling=coupling,
                        learning_rate=learning_rate, peak_learning_rate=peak_learning_rate)
  _alias_checks.check_momentum(who, momentum, nesterov)
  _hyperparams.check_dtype(accumulator_dtype, "accumulator_dtype", who)
  shrink = _couplings.build(weight_decay, coupling, learning_rate, peak_learning_rate, who)
  tx = optax.chain(
      optax.chain(
          optax.scale_by_learning_rate(learning_rate),  # -η_t g_t
          _momentum(momentum, nesterov, accumulator_dtype),  # the buffer holds lr-scaled steps
      ),
      _decay.decay(shrink, mask, who=who, sign=-1, state=_decay.DecoupledDecayState),
  )
  hint = _alias_checks.lr_hint(learning_rate) if coupling == "lr" else _alias_checks.COUPLED_HINT
  _hyperparams.check_shrink(shrink, who, hint)
  return _recipes.record(
      _alias_checks.placed(tx, shrink, mask, who), who, learning_rate=learning_rate,
      momentum=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype,
      weight_decay=weight_decay, coupling=coupling, mask=mask, shrink=shrink)
