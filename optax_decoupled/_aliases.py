"""Optimizers of well-known codebases, each a short chain of small transforms.

The chain *is* the documentation of the algorithm: read it top to bottom as
the order in which the update is computed.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_decoupled import _masks, _transforms

__all__ = ["adamw", "adam_l2", "sgd_l2", "bert_adamw"]


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
    nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""AdamW: Adam with decoupled weight decay, lr-coupled (torch / optax).

  .. math::
    \theta_t = \theta_{t-1} - \eta_t\big(\hat m_t/(\sqrt{\hat v_t+\epsilon_{root}}+\epsilon)
    + \lambda\,\theta_{t-1}\big)

  Decay convention: **lr-coupled**, a per-step shrink of :math:`\eta_t\lambda`.
  Equal (to float32 round-off) to ``torch.optim.AdamW`` and ``optax.adamw``
  with the same hyperparameters. The default ``weight_decay=1e-4`` is
  optax.adamw's, so this is a drop-in replacement for it; torch's default is
  1e-2, Keras's 4e-3: pass the value of the code you port.

  Args:
    learning_rate: η, a float or an optax schedule.
    b1, b2, eps, eps_root: Adam's hyperparameters (see :func:`scale_by_adam`).
    weight_decay: λ, a float or a schedule.
    mask: which leaves decay (None: all); e.g. ``od.exclude_names("bias")``.
    mu_dtype: dtype of the first moment. nesterov: NAdamW.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.adamw(1e-3, weight_decay=1e-2, mask=od.min_ndim(2))
    >>> state = tx.init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 ;
    torch.optim.AdamW; optax.adamw.
  """
  tx = optax.chain(
      _transforms.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
      _transforms.add_decoupled_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _transforms.guard_decay(tx, learning_rate, weight_decay, mask, "adamw")


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
  nothing is an error (see :func:`exclude_names`).

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...           "LayerNorm": {"scale": jnp.ones(2)}}
    >>> state = od.bert_adamw(1e-4).init(params)

  References:
    google-research/bert, optimization.py, ``AdamWeightDecayOptimizer.apply_gradients``
    and ``_do_use_weight_decay``.
  """
  mask = _masks.exclude_names(*exclude)
  tx = optax.chain(
      _transforms.scale_by_adam(b1, b2, eps, bias_correction=False),
      _transforms.add_decoupled_decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _transforms.guard_decay(tx, learning_rate, weight_decay, mask, "bert_adamw")
