"""Optimizers of well-known codebases, each a short chain of small transforms.

The chain *is* the documentation of the algorithm: read it top to bottom as
the order in which the update is computed.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_decoupled import _conventions, _kernel, _masks, _multipliers, _transforms, _wrappers

__all__ = ["adam_l2", "adamw", "bert_adamw", "sgd_l2", "sgdw"]


def adamw(
    learning_rate: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: Any = 1e-4,
    mask: Any = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    coupling: str = "lr",
    peak_learning_rate: Any = None,
) -> optax.GradientTransformation:
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
  variants are built as ``od.with_decoupled_decay(adam_chain, c_t, mask=mask)``.

  The default ``weight_decay=1e-4`` is optax.adamw's, so this is a drop-in
  replacement for it; torch's default is 1e-2, Keras's 4e-3: pass the value
  of the code you port (in the convention ``coupling`` names).

  Args:
    learning_rate: η, a float or an optax schedule.
    b1, b2, eps, eps_root: Adam's hyperparameters (see :func:`scale_by_adam`).
    weight_decay: λ, a float or a schedule.
    mask: which leaves decay (None: all); e.g. ``od.exclude_names("bias")``,
      or :func:`decay_multipliers` rules.
    mu_dtype, nu_dtype: dtypes of the first and second moments (None: the
      parameters'); pass ``jnp.float32`` for both with bfloat16/float16 weights.
    nesterov: NAdamW.
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
  _conventions.check_coupling(coupling, "adamw")
  adam = _transforms.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                                   nesterov=nesterov)
  if coupling == "lr" and not isinstance(mask, _multipliers.DecayMultipliers):
    tx = optax.chain(
        adam,
        _transforms.add_decoupled_decay(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    tx = _transforms.guard_decay(tx, learning_rate, weight_decay, mask, "adamw")
    if nesterov:
      return tx
    # od.fused_step may compute this chain with the CPU kernel (same operations, one pass).
    return _kernel.register(tx, _kernel.AdamWSpec(learning_rate, b1, b2, eps, eps_root,
                                                  weight_decay, mask, mu_dtype, nu_dtype))
  return _decoupled(optax.chain(adam, optax.scale_by_learning_rate(learning_rate)),
                    learning_rate, weight_decay, coupling, peak_learning_rate, mask, "adamw")


def _decoupled(inner, learning_rate, weight_decay, coupling, peak_learning_rate, mask, who):
  """``with_decoupled_decay(inner, c_t)`` with the shrink c_t of ``coupling``."""
  _transforms.check_learning_rate(learning_rate, who)
  shrink = _conventions.coupled_weight_decay(
      weight_decay, coupling=coupling, learning_rate=learning_rate,
      peak_learning_rate=peak_learning_rate)
  tx = _wrappers.with_decoupled_decay(inner, shrink, mask=mask)
  constant = shrink.constant()  # the construction-time checks see the per-step shrink.
  if constant is not None and constant >= 1:
    raise ValueError(
        f"{who}: coupling={coupling!r} gives a per-step shrink c = {constant:.4g} >= 1, so "
        "every decayed weight would flip sign (or become 0) each step. In the 'schedule' and "
        "'none' conventions λ is itself the per-step shrink at the peak (typically 1e-5 ... "
        "1e-3); od.convert_weight_decay converts a torch-style λ."
    )
  guard_mask = None if isinstance(mask, _multipliers.DecayMultipliers) else mask
  return _transforms.guard_decay(tx, 1.0, shrink if constant is None else constant,
                                 guard_mask, who)


def adam_l2(
    learning_rate: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Any = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  r"""Adam with coupled L2 regularization: ``torch.optim.Adam(weight_decay=λ)``.

  .. math::
    g_t \leftarrow g_t + \lambda\theta_{t-1};\quad
    \theta_t = \theta_{t-1} - \eta_t\,\hat m_t/(\sqrt{\hat v_t}+\epsilon)

  Decay convention: **coupled L2** (the λθ term enters m and v and is
  normalised by √v̂; large weights are not shrunk more). This is the optimizer
  that code ported from torch's ``Adam(weight_decay=...)`` needs and that
  optax has no alias for; it is *not* AdamW. The default ``weight_decay=0.0``
  is torch's.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.adam_l2(1e-3, weight_decay=1e-4)
    >>> state = tx.init({"w": jnp.ones(3)})

  References:
    torch.optim.Adam (``grad = grad.add(param, alpha=weight_decay)``);
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (Adam with L2).
  """
  tx = optax.chain(
      _transforms.add_l2_to_grad(weight_decay, mask),
      _transforms.scale_by_adam(b1, b2, eps),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _transforms.guard_decay(tx, learning_rate, 0.0, mask, "adam_l2")  # L2: no direct shrink.


def sgd_l2(
    learning_rate: Any,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: Any = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  r"""SGD with momentum and coupled L2: ``torch.optim.SGD`` (dampening 0).

  .. math::
    g_t \leftarrow g_t + \lambda\theta_{t-1};\quad b_t = \mu b_{t-1} + g_t;\quad
    \theta_t = \theta_{t-1} - \eta_t\,(g_t + \mu b_t \text{ if nesterov else } b_t)

  Decay convention: **coupled L2**. For plain SGD (no momentum) this equals
  decoupled decay with a per-step shrink of η·λ (the paper's Proposition 1).

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.sgd_l2(0.1, momentum=0.9, weight_decay=5e-4)
    >>> state = tx.init({"w": jnp.ones(3)})

  References:
    torch.optim.SGD; optax.trace (same momentum recursion, first buffer = g).
  """
  if nesterov and not momentum:
    raise ValueError("sgd_l2: nesterov=True needs momentum > 0 (as torch.optim.SGD).")
  tx = optax.chain(
      _transforms.add_l2_to_grad(weight_decay, mask),
      optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _transforms.guard_decay(tx, learning_rate, weight_decay, mask, "sgd_l2")


def sgdw(
    learning_rate: Any,
    momentum: Any = 0.9,
    nesterov: bool = False,
    *,
    weight_decay: Any,
    coupling: str = "schedule",
    mask: Any = None,
    peak_learning_rate: Any = None,
) -> optax.GradientTransformation:
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
    momentum: μ (the paper's β1); 0 disables the buffer.
    nesterov: Nesterov momentum on the lr-scaled buffer.
    weight_decay: λ in the ``coupling`` convention (number, array or schedule).
    coupling: ``"schedule"`` (default), ``"lr"``, ``"none"`` or ``"corrected"``.
    mask: which leaves decay (None: all), or :func:`decay_multipliers` rules.
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
  _conventions.check_coupling(coupling, who)
  if not isinstance(nesterov, bool):
    raise TypeError(f"{who}: nesterov must be True or False, got {nesterov!r}.")
  _conventions.check_number(momentum, "momentum", who, allow_schedule=False)
  mu = _conventions.concrete(momentum)
  if mu is not None and mu >= 1:
    raise ValueError(f"{who}: momentum must be in [0, 1), got {mu!r}.")
  if nesterov and mu == 0:
    raise ValueError(f"{who}: nesterov=True needs momentum > 0.")
  inner = optax.chain(
      optax.scale_by_learning_rate(learning_rate),  # -η_t g_t
      optax.identity() if mu == 0 else optax.trace(decay=momentum, nesterov=nesterov),
  )
  return _decoupled(inner, learning_rate, weight_decay, coupling, peak_learning_rate, mask, who)


def bert_adamw(
    learning_rate: Any,
    weight_decay: Any = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    exclude: tuple[Any, ...] = _masks.BERT_EXCLUDE,
) -> optax.GradientTransformation:
  r"""BERT's ``AdamWeightDecayOptimizer``: AdamW without bias correction.

  .. math::
    \theta_t = \theta_{t-1} - \eta_t\big(m_t/(\sqrt{v_t}+\epsilon) + \lambda\theta_{t-1}\big)

  with no bias correction of m and v, and no decay on parameters whose path
  matches (``re.search``) one of ``exclude``. Decay convention:
  **lr-coupled**. The default ``exclude`` is BERT's list
  ``["LayerNorm", "layer_norm", "bias"]`` with its two spellings of the norm
  rule grouped, ``(("LayerNorm", "layer_norm"), "bias")``, so a model using
  either spelling passes the unmatched-pattern check; a rule that matches
  nothing is an error (see :func:`exclude_names`). ``exclude=()`` decays every
  parameter, as BERT's ``exclude_from_weight_decay=None``.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...           "LayerNorm": {"scale": jnp.ones(2)}}
    >>> state = od.bert_adamw(1e-4).init(params)

  References:
    google-research/bert, optimization.py, ``AdamWeightDecayOptimizer.apply_gradients``
    and ``_do_use_weight_decay``.
  """
  mask = _masks.exclude_names(*exclude) if exclude else None  # BERT: no list, no exclusion.
  tx = optax.chain(
      _transforms.scale_by_adam(b1, b2, eps, bias_correction=False),
      _transforms.add_decoupled_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _transforms.guard_decay(tx, learning_rate, weight_decay, mask, "bert_adamw")
