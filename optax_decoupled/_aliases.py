"""The Adam family of optimizers of well-known codebases, each a short chain of small
transforms (the SGD family is in ``_sgd_aliases``).

The chain *is* the documentation of the algorithm: read it top to bottom as the order in
which the update is computed. Aliases named after an optax or torch optimizer take that
optimizer's positional arguments in the same order; this package's extra arguments are
keyword-only.

Each alias checks its own arguments once (``_alias_checks``, ``_transforms.check_adam``,
``_hyperparams.check_shrink``), builds its chain from private builders (which do not check
again), wraps its ``init`` to place the state like the parameters
(``_alias_checks.placed``) and records which alias built it (``_recipes``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import optax

from optax_decoupled import (
    _alias_checks,
    _couplings,
    _decay,
    _hyperparams,
    _predicates,
    _recipes,
    _rules,
    _transforms,
)
from optax_decoupled._hyperparams import ArrayLike, DType, ScalarOrSchedule
from optax_decoupled._masks import MaskLike

__all__ = ["adam_l2", "adamw", "bert_adamw"]

def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DType = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskLike = None,
    *,
    nesterov: bool = False,
    nu_dtype: DType = None,
    coupling: str = "lr",
    peak_learning_rate: ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW: Adam with decoupled weight decay, lr-coupled (torch / optax) by default.

  .. math::
    \theta_t = \theta_{t-1} - \eta_t\big(\hat m_t/(\sqrt{\hat v_t+\epsilon_{root}}+\epsilon)
    + \lambda\,\theta_{t-1}\big)

  Decay convention: **lr-coupled** by default, a per-step shrink of
  :math:`\eta_t\lambda`; ``coupling`` selects another (see below). With the
  default ``coupling="lr"`` this is the chain below, equal (to float32
  round-off) to ``torch.optim.AdamW`` and ``optax.adamw`` with the same
  hyperparameters.

  ``coupling="schedule"`` is the paper's Algorithm 2,
  :math:`\theta_t = \theta_{t-1} - \eta_t\hat m_t/(\sqrt{\hat v_t}+\epsilon)
  - (\eta_t/\eta_{peak})\lambda\theta_{t-1}`: the schedule multiplies the
  decay, the base learning rate does not (λ_paper = α·λ_torch).
  ``coupling="none"`` shrinks by λ_t whatever the learning rate (TF's
  ``DecoupledWeightDecayExtension``; λ may be its own schedule), and
  ``"corrected"`` by :math:`\eta_t^2/\eta_{peak}\cdot\lambda` (Defazio 2025).
  For ``"schedule"``/``"corrected"`` the peak is ``peak_learning_rate`` if
  given, else a constant ``learning_rate``; a learning-rate schedule without
  ``peak_learning_rate`` is an error (see :func:`coupled_weight_decay`). These
  variants are the finished Adam step followed by the decay of
  :func:`with_decoupled_decay` with shrink c_t.

  The default ``weight_decay=1e-4`` is optax.adamw's, so this is a drop-in
  replacement for it; torch's default is 1e-2, Keras's 4e-3: pass the value
  of the code you port (in the convention ``coupling`` names).

  The positional arguments are ``optax.adamw``'s, in its order
  (``learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask``);
  everything after them is keyword-only.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1, b2, eps, eps_root: Adam's hyperparameters (see :func:`scale_by_adam`).
    mu_dtype: dtype of the first moment (None: the parameters').
    weight_decay: λ, a float or a schedule.
    mask: which leaves decay (None: all); e.g. ``od.exclude_names("bias")``,
      a bool tree, a function of the params, or :func:`decay_multipliers` rules.
    nesterov: NAdamW; equals ``optax.nadamw`` (not timm's ``NAdamW``, whose
      Nesterov term is bias-corrected differently).
    nu_dtype: dtype of the second moment (None: the parameters'); pass
      ``mu_dtype=nu_dtype=jnp.float32`` with bfloat16/float16 weights.
    coupling: ``"lr"`` (default), ``"schedule"``, ``"none"`` or ``"corrected"``.
    peak_learning_rate: η_peak (α) for ``"schedule"``/``"corrected"``; ignored
      otherwise. Traced values work (e.g. inside ``jax.vmap`` over α).

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = od.adamw(1e-3, weight_decay=1e-2, mask=od.min_ndim(2))
    >>> state = tx.init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 1000)
    >>> paper = od.adamw(lr, weight_decay=1e-5, coupling="schedule", peak_learning_rate=1e-3)

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (Algorithm 2);
    torch.optim.AdamW; optax.adamw.
  """
  who = "adamw"
  _couplings.check_args(who, weight_decay=weight_decay, coupling=coupling,
                        learning_rate=learning_rate, peak_learning_rate=peak_learning_rate)
  _transforms.check_adam(who, b1, b2, eps, eps_root)
  _transforms.check_moment_dtypes(who, mu_dtype, nu_dtype)
  _hyperparams.check_flag(nesterov, "nesterov", who)
  shrink = _couplings.build(weight_decay, coupling, learning_rate, peak_learning_rate, who)
  adam = _transforms.adam_scaling(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
                                  nu_dtype=nu_dtype)
  if coupling == "lr":  # optax.adamw's chain: λθ joins the Adam step, then both scale by η_t.
    tx = optax.chain(
        adam,
        _decay.decay(weight_decay, mask, who=who, sign=+1, state=_decay.WeightDecayState),
        optax.scale_by_learning_rate(learning_rate),
    )
    hint = _alias_checks.lr_hint(learning_rate)
  else:  # the finished Adam step, then θ shrinks by c_t of the coupling.
    tx = optax.chain(
        optax.chain(adam, optax.scale_by_learning_rate(learning_rate)),
        _decay.decay(shrink, mask, who=who, sign=-1, state=_decay.DecoupledDecayState),
    )
    hint = _alias_checks.COUPLED_HINT
  _hyperparams.check_shrink(shrink, who, hint)
  return _recipes.record(
      _alias_checks.placed(tx, shrink, mask, who), who, learning_rate=learning_rate, b1=b1,
      b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask,
      nesterov=nesterov, nu_dtype=nu_dtype, coupling=coupling, shrink=shrink)


def adam_l2(
    learning_rate: ScalarOrSchedule, b1: ArrayLike = 0.9, b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0, mu_dtype: DType = None,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskLike = None,
    nesterov: bool = False,
    nu_dtype: DType = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with coupled L2 regularization: ``torch.optim.Adam(weight_decay=λ)``.

  .. math::
    g_t \leftarrow g_t + \lambda\theta_{t-1};\quad
    \theta_t = \theta_{t-1} - \eta_t\,\hat m_t/(\sqrt{\hat v_t}+\epsilon)

  Decay convention: **coupled L2** (the λθ term enters m and v and is
  normalised by √v̂; large weights are not shrunk more). This is the optimizer
  that code ported from torch's ``Adam(weight_decay=...)`` needs and that
  optax has no alias for; it is *not* AdamW. The default ``weight_decay=0.0``
  is torch's. Keras 3's ``Adam(weight_decay=λ)`` is *not* this optimizer: Keras
  applies decoupled, lr-coupled decay in every optimizer (``od.adamw`` with
  Keras's ε placement), not L2.

  The positional arguments are ``optax.adam``'s, in its order
  (``learning_rate, b1, b2, eps, eps_root, mu_dtype``); the rest is keyword-only.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1, b2, eps, eps_root: Adam's hyperparameters (see :func:`scale_by_adam`).
    mu_dtype, nu_dtype: dtypes of the first and second moments (None: the
      parameters').
    weight_decay: λ of the L2 term, a float or a schedule.
    mask: which leaves get the L2 term (any mask form, see :func:`add_l2_to_grad`).
    nesterov: NAdam, as ``optax.adam(nesterov=True)``.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.adam_l2(1e-3, weight_decay=1e-4)
    >>> state = tx.init({"w": jnp.ones(3)})

  References:
    torch.optim.Adam (``grad = grad.add(param, alpha=weight_decay)``);
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (Adam with L2).
  """
  who = "adam_l2"
  _alias_checks.check_lr_wd(who, learning_rate, weight_decay)
  _transforms.check_adam(who, b1, b2, eps, eps_root)
  _transforms.check_moment_dtypes(who, mu_dtype, nu_dtype)
  _hyperparams.check_flag(nesterov, "nesterov", who)
  tx = optax.chain(
      _decay.decay(weight_decay, mask, who=who, sign=+1, state=_decay.WeightDecayState),
      _transforms.adam_scaling(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
                               nu_dtype=nu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _recipes.record(  # L2 has no direct shrink: no shrink to check or warn about.
      _alias_checks.placed(tx, None, mask, who), who, learning_rate=learning_rate, b1=b1,
      b2=b2, eps=eps, eps_root=eps_root,
      mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask, nesterov=nesterov,
      nu_dtype=nu_dtype)


def bert_adamw(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.01,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    exclude: str | Collection[Any] | None = _predicates.BERT_EXCLUDE,
    *,
    allow_unmatched: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""BERT's ``AdamWeightDecayOptimizer``: AdamW without bias correction.

  .. math::
    \theta_t = \theta_{t-1} - \eta_t\big(m_t/(\sqrt{v_t}+\epsilon) + \lambda\theta_{t-1}\big)

  with no bias correction of m and v, and no decay on parameters whose path
  matches (``re.search``) one of ``exclude``. Decay convention:
  **lr-coupled**. The default ``exclude`` is BERT's list
  ``["LayerNorm", "layer_norm", "bias"]`` with its two spellings of the norm
  rule grouped, ``(("LayerNorm", "layer_norm"), "bias")``, so a model using
  either spelling passes the unmatched-pattern check; a rule that matches
  nothing is an error (see :func:`exclude_names`). ``exclude=()`` or ``None``
  decays every parameter, as BERT's ``exclude_from_weight_decay=None``. A bare
  string is one pattern (``exclude="bias"``). ``allow_unmatched=True`` lets a
  rule match nothing (a model without biases, whose bias may also be named
  otherwise: ``b`` in Haiku), as :func:`exclude_names`'s.

  The patterns are case-sensitive, as BERT's: a model that spells its norm
  ``layernorm`` (MindSpore's BERT) leaves the default's norm rule unmatched, which
  is an error. Prefix ``(?i)`` for a case-insensitive pattern, e.g.
  ``exclude=(r"(?i)layer_?norm", "bias")``.

  The positional arguments are this alias's own (BERT's ``AdamWeightDecayOptimizer``
  order: ``learning_rate, weight_decay, b1, b2, eps, exclude``). Args are checked as
  in :func:`adamw`: ``b1, b2`` in [0, 1), ``eps`` finite and >= 0.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...           "LayerNorm": {"scale": jnp.ones(2)}}
    >>> state = od.bert_adamw(1e-4).init(params)

  References:
    google-research/bert, optimization.py, ``AdamWeightDecayOptimizer.apply_gradients``
    and ``_do_use_weight_decay``.
  """
  who = "bert_adamw"
  _alias_checks.check_lr_wd(who, learning_rate, weight_decay)
  _transforms.check_adam(who, b1, b2, eps, 0.0)
  patterns = _rules.patterns(exclude, who, "exclude") if exclude is not None else ()
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", who)
  # BERT: no list, no exclusion.
  mask = (_predicates.exclude_names(*patterns, allow_unmatched=allow_unmatched) if patterns
          else None)
  tx = optax.chain(
      _transforms.adam_scaling(b1, b2, eps, 0.0, None, nesterov=False, bias_correction=False),
      _decay.decay(weight_decay, mask, who=who, sign=+1, state=_decay.WeightDecayState),
      optax.scale_by_learning_rate(learning_rate),
  )
  shrink = _couplings.build(weight_decay, "lr", learning_rate, None, who)
  _hyperparams.check_shrink(shrink, who, _alias_checks.lr_hint(learning_rate))
  return _recipes.record(
      _alias_checks.placed(tx, shrink, mask, who), who,
      learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps, mask=mask)
