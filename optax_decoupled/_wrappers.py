"""Decoupled decay around any complete optax optimizer, and its variants.

``with_decoupled_decay(inner, c)`` runs ``inner`` (an optimizer whose updates
are already scaled by its learning rate and sign-flipped, like ``optax.adam``)
and then subtracts ``c_t·θ`` from its update, θ being the parameters *before*
the step. Because the decay is applied after the inner optimizer and with a
minus sign, it cannot end up inside Adam's moments nor with the wrong sign
(the flax sst2 example's ``chain(sgd, add_decayed_weights)`` adds +λθ after
the sign flip, which makes weights grow).

Variants: decay toward a reference point (L2-SP), cautious decay (only where
the update and the weight agree in sign), per-parameter multipliers; and, via
:func:`coupled_weight_decay`, the four couplings of ``c_t`` to the learning rate.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_decoupled import _decay, _hyperparams
from optax_decoupled._hyperparams import ScalarOrSchedule
from optax_decoupled._masks import MaskLike

__all__ = ["with_decay_toward", "with_decoupled_decay"]


def _check_inner(inner: Any, who: str) -> None:
  if not isinstance(inner, optax.GradientTransformation):
    hint = (" (a factory? call it, e.g. optax.adam(1e-3))" if callable(inner) else "")
    raise TypeError(
        f"{who}: inner must be an optax.GradientTransformation{hint}, got {inner!r}."
    )


#: Said when the constant per-step shrink given to a wrapper is >= 1.
_SHRINK_HINT = ("Here weight_decay is the per-step shrink c_t itself (typically 1e-5 ... 1e-2; "
                "for with_decay_toward it acts on θ − θ_ref). For λ in torch's units pass "
                "od.coupled_weight_decay(λ, coupling='lr', learning_rate=η).")


def _check(inner: Any, weight_decay: ScalarOrSchedule, who: str) -> None:
  _check_inner(inner, who)
  _hyperparams.check_weight_decay(weight_decay, who)
  _hyperparams.check_shrink(weight_decay, who, _SHRINK_HINT)


def with_decoupled_decay(
    inner: optax.GradientTransformation,
    weight_decay: ScalarOrSchedule,
    *,
    mask: MaskLike = None,
    cautious: bool = False,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay around any complete optimizer.

  .. math:: u_t = \text{inner}(g_t) - c_t\,\theta_{t-1}
            \quad\Rightarrow\quad
            \theta_t = (1 - c_t)\,\theta_{t-1} + \text{inner}(g_t)

  on the leaves ``mask`` selects (times their multiplier, for a
  :func:`decay_multipliers` rule set). ``inner`` is an optimizer whose
  updates are already scaled by its learning rate and sign-flipped
  (``optax.sgd``, ``optax.adam``, ``optax.lion``, ``optax.adafactor``, ...);
  θ is the parameters before the step. ``weight_decay`` is the **per-step
  shrink** c_t directly: a number, an array (traced values work, e.g. from
  ``optax.inject_hyperparams``), or a schedule of the step. Decay convention:
  **independent** (TF's DecoupledWeightDecayExtension) as written; pass
  :func:`coupled_weight_decay` to get the lr- or schedule-coupled shrink.

  With ``cautious=True`` a coordinate is decayed only where the update
  direction agrees in sign with the weight (Chen et al. 2025): with
  θ ← θ − η(d + λθ) written in terms of the direction d = −u/η, decay where
  d·θ >= 0, i.e. where the inner update u satisfies u·θ <= 0.

  The state is ``(inner_state, DecoupledDecayState(count))``, an
  ``optax.chain`` state.

  Args:
    inner: a complete ``optax.GradientTransformation``.
    weight_decay: c_t, the per-step shrink (number, array or schedule); a
      constant c_t >= 1 (every weight zeroed or flipped) is a ``ValueError``.
    mask: None (all leaves), a predicate, a bool tree, a function of the
      params, or :func:`decay_multipliers` rules.
    cautious: decay only where sign(update direction) = sign(θ).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = od.with_decoupled_decay(optax.sgd(0.1), 0.01)
    >>> params = {"w": jnp.ones(2)}
    >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    >>> updates["w"].tolist()  # weights shrink: -0.01 * 1
    [-0.009999999776482582, -0.009999999776482582]

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (decoupled decay);
    tf.contrib.opt / tfa.optimizers ``DecoupledWeightDecayExtension``;
    Chen et al., Cautious Weight Decay, https://arxiv.org/abs/2510.12402.
  """
  who = "with_decoupled_decay"
  _check(inner, weight_decay, who)
  _hyperparams.check_flag(cautious, "cautious", who)
  return optax.chain(inner, _decay.decay(weight_decay, mask, who=who, sign=-1,
                                         state=_decay.DecoupledDecayState, cautious=cautious))


def with_decay_toward(
    inner: optax.GradientTransformation,
    weight_decay: ScalarOrSchedule,
    *,
    reference: Any = None,
    mask: MaskLike = None,
) -> optax.GradientTransformation:
  r"""Decay toward a reference point (L2-SP, for fine-tuning) around any optimizer.

  .. math:: u_t = \text{inner}(g_t) - c_t\,(\theta_{t-1} - \theta_{ref})

  on the masked leaves. θ_ref is held in the state (only for decayed leaves):
  the parameters given to ``init`` when ``reference=None`` (the usual L2-SP:
  the pretrained weights), or the pytree ``reference``. ``weight_decay`` is
  the per-step shrink c_t as in :func:`with_decoupled_decay` (decay
  convention: **independent**; use :func:`coupled_weight_decay` for coupled
  forms). With θ_ref = 0 this is :func:`with_decoupled_decay`.

  Args:
    inner: a complete ``optax.GradientTransformation``.
    weight_decay: c_t (number, array or schedule); a constant c_t >= 1 is a
      ``ValueError``, as in :func:`with_decoupled_decay`.
    reference: None (θ at ``init``) or a pytree with the params' structure
      and shapes (arrays of any kind: jax, numpy, Python floats).
    mask: which leaves are pulled back (as in :func:`with_decoupled_decay`).

  Returns:
    An ``optax.GradientTransformation`` with state
    ``(inner_state, DecayTowardState(count, reference))``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> pretrained = {"w": jnp.ones(2)}
    >>> tx = od.with_decay_toward(optax.sgd(0.1), 0.5)
    >>> state = tx.init(pretrained)
    >>> moved = {"w": jnp.array([3.0, 1.0])}
    >>> updates, _ = tx.update({"w": jnp.zeros(2)}, state, moved)
    >>> optax.apply_updates(moved, updates)["w"].tolist()  # pulled toward 1.0, not 0
    [2.0, 1.0]

  References:
    Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks (L2-SP), https://arxiv.org/abs/1802.01483.
  """
  who = "with_decay_toward"
  _check(inner, weight_decay, who)
  return optax.chain(inner, _decay.decay(weight_decay, mask, who=who, sign=-1,
                                         state=_decay.DecayTowardState, toward=True,
                                         reference=reference))
