"""Composable transforms: coupled L2, Adam scaling, decoupled weight decay.

``add_l2_to_grad`` and ``add_decoupled_decay`` perform the same arithmetic,
``u + λ_t·θ`` on the masked leaves; what makes them different optimizers is
where they sit in a chain. Before an adaptive scaling (``scale_by_adam``) the
term enters Adam's moments and is normalised by them (coupled L2). After it,
and before ``optax.scale_by_learning_rate``, it is decoupled weight decay with
a per-step shrink of η_t·λ (the "lr-coupled" convention of torch, optax, Keras
and BERT). Keeping two names for the two roles makes the chain read as the
algorithm it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _decay, _hyperparams, _paths
from optax_decoupled._hyperparams import ArrayLike, DType, ScalarOrSchedule
from optax_decoupled._masks import MaskLike

__all__ = [
  "add_decoupled_decay",
  "add_l2_to_grad",
  "adam_scaling",
  "check_adam",
  "check_moment_dtypes",
  "scale_by_adam",
]


def add_l2_to_grad(weight_decay: ScalarOrSchedule, mask: MaskLike = None) -> optax.GradientTransformation:
  r"""Coupled L2 regularization: adds ``λ_t·θ`` to the incoming gradient.

  .. math:: g_t \leftarrow g_t + \lambda_t \theta_{t-1}

  This is the gradient of :math:`\tfrac{\lambda}{2}\lVert\theta\rVert^2`. Place it
  *first* in a chain, before an adaptive scaling: the term then enters Adam's
  first and second moments and is normalised by :math:`\sqrt{\hat v}` along with
  the data gradient. Decay convention: **coupled L2** (not weight decay: with
  Adam the effective shrink of a weight depends on its gradient history; only
  for plain SGD does it equal decoupled decay with λ·η).

  Args:
    weight_decay: λ, a non-negative number or an optax schedule of the step.
    mask: which leaves get the term: None (all), a predicate
      (``od.exclude_names(...)``), a pytree of bools, a function of the
      parameters returning one, or :func:`decay_multipliers` rules (λ times
      the leaf's multiplier). Resolved at trace time; excluded leaves pass
      through unchanged (their L2 term is simply absent).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`WeightDecayState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = optax.chain(od.add_l2_to_grad(0.1), od.scale_by_adam(),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones(2)}
    >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)

  References:
    torch.optim.Adam(weight_decay=λ), torch.optim.SGD(weight_decay=λ):
    ``grad = grad.add(param, alpha=weight_decay)`` before the moment updates.
  """
  who = "add_l2_to_grad"
  _hyperparams.check_weight_decay(weight_decay, who)
  return _decay.decay(weight_decay, mask, who=who, sign=+1,
                      state=_decay.WeightDecayState)


def add_decoupled_decay(weight_decay: ScalarOrSchedule, mask: MaskLike = None) -> optax.GradientTransformation:
  r"""Decoupled weight decay: adds ``λ_t·θ`` *after* the adaptive scaling.

  .. math:: u_t \leftarrow u_t + \lambda_t \theta_{t-1}

  Place it after ``scale_by_adam`` (or any preconditioner) and before
  ``optax.scale_by_learning_rate(η)``; the step is then
  :math:`\theta_t = \theta_{t-1} - \eta_t(\hat m/(\sqrt{\hat v}+\epsilon) + \lambda\theta_{t-1})`,
  a per-step shrink of :math:`\eta_t\lambda`. Decay convention:
  **lr-coupled** (torch AdamW, optax.adamw, Keras, BERT). For the paper's
  schedule-coupled form or an lr-independent shrink, see the ``coupling``
  option of the aliases.

  Unlike ``optax.masked(optax.add_decayed_weights(...), mask)``, the mask is
  resolved at trace time from names and shapes, the compiled update holds no
  per-element select, and excluded leaves pass through with no decay term;
  ``optax.masked`` would likewise pass them through untouched, which means the
  *incoming update* continues unchanged, not that the leaf is frozen.

  Args:
    weight_decay: λ, a non-negative number or an optax schedule of the step.
    mask: which leaves decay: None (all), a predicate, a pytree of bools, a
      function of the parameters returning one, or :func:`decay_multipliers`
      rules.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`WeightDecayState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_decoupled as od
    >>> tx = optax.chain(od.scale_by_adam(),
    ...                  od.add_decoupled_decay(1e-2, mask=od.exclude_names("bias")),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)

  References:
    Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019,
    https://arxiv.org/abs/1711.05101 (Algorithm 2, line 12).
  """
  who = "add_decoupled_decay"
  _hyperparams.check_weight_decay(weight_decay, who)
  return _decay.decay(weight_decay, mask, who=who, sign=+1,
                      state=_decay.WeightDecayState)


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DType = None,
    *,
    nesterov: bool = False,
    bias_correction: bool = True,
    eps_hat: bool = False,
    nu_dtype: DType = None,
) -> optax.GradientTransformation:
  r"""Adam's preconditioning, with BERT's and Keras's variants as keywords.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

  with :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)`.

  * ``bias_correction=False``: :math:`u_t = m_t/(\sqrt{v_t}+\epsilon)`, the step
    of BERT's ``AdamWeightDecayOptimizer`` (google-research/bert optimization.py).
  * ``eps_hat=True``: the "epsilon hat" placement of Keras/TF,
    :math:`u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, m_t/(\sqrt{v_t}+\hat\epsilon)`.

  No decay is applied here (decay convention: none). With the defaults this is
  exactly ``optax.scale_by_adam`` (it is returned as is), and the state is
  ``optax.ScaleByAdamState(count, mu, nu)`` in every case, so optax's tree
  utilities and checkpoints see the usual fields.

  The positional arguments are ``optax.scale_by_adam``'s, in its order
  (``b1, b2, eps, eps_root, mu_dtype``); everything after them is keyword-only.

  Args:
    b1, b2: moment decay rates, in [0, 1) (torch.optim.Adam's range).
    eps, eps_root: see the formula; finite and >= 0.
    mu_dtype: dtype of the first moment (None: that of the parameters).
    nesterov: Nesterov momentum (NAdam), as in ``optax.scale_by_adam``.
    bias_correction: divide the moments by :math:`1-\beta^t` (Adam) or not (BERT).
    eps_hat: Keras/TF placement of ε (outside the bias correction).
    nu_dtype: dtype of the second moment (None: that of the parameters). With
      bfloat16/float16 parameters, ``mu_dtype=nu_dtype=jnp.float32`` keeps both
      moments, the update and the decay term in float32; ``optax.apply_updates``
      then rounds ``θ + u`` to the parameter dtype once. (optax.scale_by_adam has
      no such option; with ``nu_dtype=None`` the optax function is returned.)
      In the variants built here (``nu_dtype`` set, ``bias_correction=False``,
      ``eps_hat=True``) gradients are cast up to ``mu_dtype``/``nu_dtype``
      before entering that moment, so a float32 moment sees a bfloat16
      gradient exactly (no bfloat16 (1−β)·g product).

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> tx = od.scale_by_adam(bias_correction=False, eps=1e-6)
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> type(state).__name__
    'ScaleByAdamState'

  References:
    Kingma & Ba, Adam, https://arxiv.org/abs/1412.6980.
  """
  who = "scale_by_adam"
  check_adam(who, b1, b2, eps, eps_root)
  check_moment_dtypes(who, mu_dtype, nu_dtype)
  for name, flag in (("nesterov", nesterov), ("bias_correction", bias_correction),
                     ("eps_hat", eps_hat)):
    _hyperparams.check_flag(flag, name, who)
  if eps_hat and nesterov:
    raise ValueError(f"{who}: eps_hat=True (Keras) has no Nesterov form; set nesterov=False.")
  return adam_scaling(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
                      bias_correction=bias_correction, eps_hat=eps_hat, nu_dtype=nu_dtype)


def check_adam(who: str, b1: Any, b2: Any, eps: Any, eps_root: Any) -> None:
  """Adam's hyperparameters, in the ranges torch.optim.Adam accepts.

  ``0 <= b1, b2 < 1`` and ``eps >= 0`` (torch/optim/adam.py, ``Adam.__init__``), all
  finite; ``eps_root >= 0`` and finite (inside the square root, as optax adds it). A NaN
  or an out-of-range value would make every weight NaN (or grow) after one step. Traced
  values (``jax.vmap`` over a hyperparameter, ``optax.inject_hyperparams``) pass unchecked.
  """
  _hyperparams.check_decay_rate(b1, "b1", who)
  _hyperparams.check_decay_rate(b2, "b2", who)
  _hyperparams.check_number(eps, "eps", who)
  _hyperparams.check_number(eps_root, "eps_root", who)


def check_moment_dtypes(who: str, mu_dtype: Any, nu_dtype: Any) -> None:
  """``mu_dtype`` and ``nu_dtype``: None or a floating/complex dtype."""
  _hyperparams.check_dtype(mu_dtype, "mu_dtype", who)
  _hyperparams.check_dtype(nu_dtype, "nu_dtype", who)


def adam_scaling(
    b1: Any, b2: Any, eps: Any, eps_root: Any, mu_dtype: DType, *, nesterov: bool,
    bias_correction: bool = True, eps_hat: bool = False, nu_dtype: DType = None,
) -> optax.GradientTransformation:
  """The builder of :func:`scale_by_adam` (arguments checked by the caller).

  Complex parameters follow optax: m is complex, v holds :math:`|g|^2` (real values). A
  real ``mu_dtype`` would drop the imaginary part of m, so ``init`` refuses it for complex
  leaves.
  """
  if bias_correction and not eps_hat and nu_dtype is None:
    tx = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
  else:
    tx = _adam_variant(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
                       bias_correction=bias_correction, eps_hat=eps_hat, nu_dtype=nu_dtype)
  if mu_dtype is None or jnp.issubdtype(mu_dtype, jnp.complexfloating):
    return tx

  def init_fn(params):
    for path, leaf in _paths.leaves_with_paths(params):
      if jnp.issubdtype(_paths.leaf_dtype(leaf), jnp.complexfloating):
        raise TypeError(
            f"scale_by_adam: mu_dtype={np.dtype(mu_dtype).name} is real, but the parameter "
            f"{path!r} is {_paths.leaf_dtype(leaf)}: its first moment would lose the imaginary "
            "part. Pass a complex mu_dtype (e.g. jnp.complex64) or mu_dtype=None."
        )
    return tx.init(params)

  return optax.GradientTransformation(init_fn, tx.update)


def _adam_variant(
    b1: Any, b2: Any, eps: Any, eps_root: Any, mu_dtype: DType, *, nesterov: bool,
    bias_correction: bool, eps_hat: bool, nu_dtype: DType,
) -> optax.GradientTransformation:
  """Adam with BERT's or Keras's variant, or float32 moments of low-precision parameters."""
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None
  nu_dtype = jax.dtypes.canonicalize_dtype(nu_dtype) if nu_dtype is not None else None

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params, dtype=nu_dtype)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def correct(tree, decay, count):
    return optax.tree.bias_correction(tree, decay, count) if bias_correction else tree

  def upcast(tree, like):
    # Low-precision gradients enter float32 moments in float32 (no bf16 (1-β)·g rounding).
    return jax.tree.map(
        lambda g, s: None if g is None else g.astype(jnp.promote_types(g.dtype, s.dtype)),
        tree, like, is_leaf=lambda x: x is None,
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(
        upcast(updates, state.mu) if mu_dtype is not None else updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(
        upcast(updates, state.nu) if nu_dtype is not None else updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    if eps_hat:
      # Keras: lr_t = lr·√(1−β2^t)/(1−β1^t); step = lr_t·m/(√v + ε̂).
      t = count_inc.astype(jnp.float32)
      scale = jnp.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else 1.0
      mu_hat, nu_hat = mu, nu
    else:
      scale = 1.0
      mu_hat, nu_hat = correct(mu, b1, count_inc), correct(nu, b2, count_inc)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: b1 * m + (1 - b1) * g,
          correct(mu, b1, optax.safe_increment(count_inc)),
          correct(upcast(updates, state.mu) if mu_dtype is not None else updates, b1, count_inc),
      )
    updates = jax.tree.map(
        lambda m, v: None if m is None else scale * m / (jnp.sqrt(v + eps_root) + eps),
        mu_hat,
        nu_hat,
        is_leaf=lambda x: x is None,
    )
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
