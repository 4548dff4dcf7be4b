"""The three weight-decay conventions, conversions between them, and tools to set λ.

Every decoupled decay shrinks the weights by a factor ``c_t`` per step,
θ ← θ − c_t·θ. Codebases differ only in how ``c_t`` is built from the λ the
user writes:

=============  ===========================  ===========================================
coupling       per-step shrink ``c_t``       used by
=============  ===========================  ===========================================
``"lr"``       η_t·λ                         torch AdamW, optax.adamw, Keras, BERT, HF
``"schedule"`` s_t·λ, s_t = η_t/η_peak       the paper (its η_t), big_vision, AXLearn
``"none"``     λ_t (its own constant/sched)  TF ``DecoupledWeightDecayExtension``
``"corrected"`` η_t²/η_peak·λ                Defazio 2025 (AdamC), opt-in
=============  ===========================  ===========================================

:func:`coupled_weight_decay` turns ``(λ, coupling, learning rate, peak)`` into
the per-step shrink ``c_t`` (a schedule) that :func:`with_decoupled_decay`
applies; :func:`convert_weight_decay` moves a λ from one convention to another.

Everything here accepts traced values (inside ``jax.jit``/``jax.vmap``):
validation (``_hyperparams``) looks only at concrete numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optax_decoupled import _hyperparams
from optax_decoupled._hyperparams import Numeric, ScalarOrSchedule

__all__ = [
  "COUPLINGS",
  "CoupledWeightDecay",
  "convert_weight_decay",
  "coupled_weight_decay",
  "normalized_weight_decay",
  "timescale_from_weight_decay",
  "weight_decay_from_timescale",
]

#: The accepted values of ``coupling``.
COUPLINGS = ("lr", "schedule", "none", "corrected")


def check_coupling(coupling: Any, who: str) -> str:
  if not isinstance(coupling, str) or coupling not in COUPLINGS:
    raise ValueError(
        f"{who}: coupling={coupling!r} is not one of {COUPLINGS}: 'lr' (shrink η_t·λ, "
        "torch/optax), 'schedule' (shrink η_t/η_peak·λ, the paper), 'none' (shrink λ_t, "
        "TF DecoupledWeightDecayExtension), 'corrected' (shrink η_t²/η_peak·λ, AdamC)."
    )
  return coupling


@dataclasses.dataclass(frozen=True, eq=False)
class CoupledWeightDecay:
  """The per-step shrink ``c_t`` of a coupling: a schedule (call it with the step count).

  Built by :func:`coupled_weight_decay`; fields may hold traced values.
  """

  weight_decay: ScalarOrSchedule
  coupling: str
  learning_rate: Any = None
  peak_learning_rate: Any = None

  def __call__(self, count: Any) -> Any:
    wd = _hyperparams.value_at(self.weight_decay, count)
    if self.coupling == "none":
      return wd
    lr = _hyperparams.value_at(self.learning_rate, count)
    if self.coupling == "lr":
      return lr * wd
    if self.coupling == "schedule":
      return lr / self.peak_learning_rate * wd
    return lr * lr / self.peak_learning_rate * wd  # "corrected"

  def constant(self) -> float | None:
    """The shrink as a Python float when it is the same at every step, else None.

    A constant λ = 0 gives 0.0 whatever the learning rate: no decay term at all.
    """
    wd = _hyperparams.constant(self.weight_decay)
    if wd == 0.0:
      return 0.0
    parts = {name: getattr(self, name) for name in ("learning_rate", "peak_learning_rate")}
    values = {name: None if x is None else _hyperparams.constant(x) for name, x in parts.items()}
    if wd is None or any(values[n] is None for n, x in parts.items() if x is not None):
      return None
    # Python floats only: concrete jax arrays (inject_hyperparams' state) would be staged
    # into the surrounding trace by the arithmetic.
    return float(dataclasses.replace(self, weight_decay=wd,
                                     learning_rate=values["learning_rate"],
                                     peak_learning_rate=values["peak_learning_rate"])(0))


def build(weight_decay: Any, coupling: str, learning_rate: Any, peak_learning_rate: Any,
          who: str) -> CoupledWeightDecay:
  """The :class:`CoupledWeightDecay` of arguments already validated by the caller.

  Raises only for what no single argument shows: a coupling that needs the learning rate
  without one, and a learning-rate schedule without ``peak_learning_rate``.
  """
  if coupling == "none":
    return CoupledWeightDecay(weight_decay, coupling)
  if learning_rate is None:
    raise ValueError(f"{who}: coupling={coupling!r} needs the learning rate (learning_rate=...).")
  if coupling == "lr":
    return CoupledWeightDecay(weight_decay, coupling, learning_rate)
  if peak_learning_rate is None:
    if callable(learning_rate):
      raise ValueError(
          f"{who}: coupling={coupling!r} with a learning-rate schedule needs "
          "peak_learning_rate=..., the base learning rate α the schedule is a multiple of "
          "(e.g. 1e-3 for optax.warmup_cosine_decay_schedule(0.0, 1e-3, ...)); the shrink "
          "is then η_t/α·λ. A schedule's peak is not inferred."
      )
    if _hyperparams.constant(learning_rate) == 0:
      raise ValueError(
          f"{who}: coupling={coupling!r} takes a constant learning_rate as its own peak, and "
          "learning_rate=0 gives the shrink η_t/η_peak·λ = 0/0. Pass peak_learning_rate=... "
          "(> 0), or use coupling='lr' or 'none'."
      )
    peak_learning_rate = learning_rate
  return CoupledWeightDecay(weight_decay, coupling, learning_rate, peak_learning_rate)


def coupled_weight_decay(
    weight_decay: ScalarOrSchedule,
    *,
    coupling: str,
    learning_rate: ScalarOrSchedule | None = None,
    peak_learning_rate: Numeric | None = None,
) -> CoupledWeightDecay:
  r"""The per-step shrink :math:`c_t` of a decay convention, as a schedule.

  * ``"lr"``: :math:`c_t = \eta_t\lambda_t` (torch AdamW, optax.adamw).
  * ``"schedule"``: :math:`c_t = (\eta_t/\eta_{peak})\lambda_t`, the paper's
    :math:`\eta_t\lambda` where its :math:`\eta_t` is the schedule multiplier.
  * ``"none"``: :math:`c_t = \lambda_t` (TF ``DecoupledWeightDecayExtension``);
    ``learning_rate`` is not used.
  * ``"corrected"``: :math:`c_t = \eta_t^2/\eta_{peak}\cdot\lambda_t` (Defazio 2025).

  **How the peak is known** (``"schedule"``, ``"corrected"``): an explicit
  ``peak_learning_rate`` always wins; a constant ``learning_rate`` is its own
  peak (so :math:`s_t = 1`); a learning-rate *schedule* without
  ``peak_learning_rate`` is an error, because a schedule's maximum cannot be
  read off it (a warmup schedule is 0 at step 0), and so is a constant
  ``learning_rate=0`` without one (0/0). ``peak_learning_rate`` is
  ignored for ``"lr"`` and ``"none"``, so a sweep can switch coupling without
  changing its call.

  Args:
    weight_decay: λ (a number, array, tracer or schedule of the step).
    coupling: ``"lr"``, ``"schedule"``, ``"none"`` or ``"corrected"``.
    learning_rate: η_t, a number or a schedule (unused for ``"none"``).
    peak_learning_rate: η_peak for ``"schedule"``/``"corrected"`` (> 0).

  Returns:
    A :class:`CoupledWeightDecay`, callable with the step count.

  Example:
    >>> import optax, optax_decoupled as od
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    >>> c = od.coupled_weight_decay(1e-4, coupling="schedule", learning_rate=lr,
    ...                             peak_learning_rate=1e-3)
    >>> float(c(0)), round(float(c(10)), 8)
    (0.0, 0.0001)

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (Algorithms 1-2);
    Defazio, https://arxiv.org/abs/2506.02285 (corrected decay).
  """
  who = "coupled_weight_decay"
  check_args(who, weight_decay=weight_decay, coupling=coupling, learning_rate=learning_rate,
             peak_learning_rate=peak_learning_rate)
  return build(weight_decay, coupling, learning_rate, peak_learning_rate, who)


def check_args(who: str, *, weight_decay: Any, coupling: str, learning_rate: Any,
               peak_learning_rate: Any) -> None:
  """The checks of :func:`coupled_weight_decay`'s arguments, for entry points that take them."""
  check_coupling(coupling, who)
  _hyperparams.check_weight_decay(weight_decay, who)
  if learning_rate is not None:
    _hyperparams.check_learning_rate(learning_rate, who)
  if peak_learning_rate is not None:
    _hyperparams.check_number(peak_learning_rate, "peak_learning_rate", who, positive=True)


def convert_weight_decay(
    value: Any, *, from_coupling: str, to_coupling: str, learning_rate: Any
) -> Any:
  r"""Converts λ between conventions so that the shrink *at the peak* is the same.

  At the peak learning rate α (where the schedule multiplier is 1) the
  per-step shrinks are α·λ_lr = λ_schedule = λ_none = α·λ_corrected, so

  .. math:: \lambda_{paper} = \alpha\,\lambda_{torch},\qquad
            \lambda_{none} = \lambda_{paper}.

  With a constant learning rate the converted optimizers are identical at
  every step; with a decaying schedule they agree only at the peak
  (``"none"`` keeps shrinking at full strength while the others anneal).

  Worked numbers: torch ``AdamW(lr=1e-3, weight_decay=1e-2)`` is the paper's
  λ = 1e-5; the paper's normalized λ ≈ 1.26e-4 at α = 1e-3 is 0.126 in
  torch's units.

  Args:
    value: λ in the ``from_coupling`` convention (number or array).
    from_coupling, to_coupling: ``"lr"``, ``"schedule"``, ``"none"`` or
      ``"corrected"``.
    learning_rate: the peak (base) learning rate α, a number > 0.

  Returns:
    λ in the ``to_coupling`` convention.

  Example:
    >>> import optax_decoupled as od
    >>> round(od.convert_weight_decay(1e-2, from_coupling="lr", to_coupling="schedule",
    ...                               learning_rate=1e-3), 12)
    1e-05
    >>> round(od.convert_weight_decay(1.26e-4, from_coupling="schedule", to_coupling="lr",
    ...                               learning_rate=1e-3), 12)
    0.126

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101 (Sec. 2 and App. B.1).
  """
  who = "convert_weight_decay"
  check_coupling(from_coupling, who)
  check_coupling(to_coupling, who)
  _hyperparams.check_number(value, "value", who)
  _hyperparams.check_number(learning_rate, "learning_rate", who, positive=True)
  lr_units = ("lr", "corrected")  # λ multiplied by η (at the peak) to give the shrink.
  shrink = value * learning_rate if from_coupling in lr_units else value
  return shrink / learning_rate if to_coupling in lr_units else shrink


def normalized_weight_decay(
    lambda_norm: float, batch_size: int, num_examples: int, num_epochs: float
) -> float:
  r"""The paper's normalized weight decay: :math:`\lambda = \lambda_{norm}\sqrt{b/(B\,T)}`.

  ``b`` is the batch size, ``B`` the number of training points and ``T`` the
  number of epochs (of the current restart, for AdamWR). The result is a
  **schedule-coupled** λ (the paper's, per step at the peak); multiply by
  1/α, or use :func:`convert_weight_decay`, for torch's lr-coupled units.

  Worked example (paper, App. B.1): CIFAR-10, b = 128, B = 50000, T = 100,
  λ_norm = 0.025 gives λ = 0.025·√(128/5e6) ≈ 1.265e-4.

  Example:
    >>> import optax_decoupled as od
    >>> round(od.normalized_weight_decay(0.025, 128, 50_000, 100), 7)
    0.0001265

  References:
    Loshchilov & Hutter, https://arxiv.org/abs/1711.05101, Appendix B.1.
  """
  who = "normalized_weight_decay"
  _hyperparams.check_number(lambda_norm, "lambda_norm", who)
  for name, v in (("batch_size", batch_size), ("num_examples", num_examples),
                  ("num_epochs", num_epochs)):
    _hyperparams.check_number(v, name, who, positive=True)
  b, n = _hyperparams.constant(batch_size), _hyperparams.constant(num_examples)
  if b is not None and n is not None and b > n:
    raise ValueError(
        f"{who}: batch_size={batch_size} exceeds num_examples={num_examples}; "
        "did you swap them?"
    )
  return lambda_norm * (batch_size / (num_examples * num_epochs)) ** 0.5


def _iterations(tau_iterations, tau_epochs, iterations_per_epoch, who):
  if (tau_iterations is None) == (tau_epochs is None):
    raise ValueError(f"{who}: give exactly one of tau_iterations or tau_epochs.")
  if tau_epochs is not None:
    if iterations_per_epoch is None:
      raise ValueError(f"{who}: tau_epochs needs iterations_per_epoch=... to convert.")
    _hyperparams.check_number(tau_epochs, "tau_epochs", who, positive=True)
    _hyperparams.check_number(iterations_per_epoch, "iterations_per_epoch", who, positive=True)
    return tau_epochs * iterations_per_epoch
  _hyperparams.check_number(tau_iterations, "tau_iterations", who, positive=True)
  return tau_iterations


def weight_decay_from_timescale(
    tau_iterations: Any = None,
    learning_rate: Any = None,
    *,
    tau_epochs: Any = None,
    iterations_per_epoch: Any = None,
    coupling: str = "lr",
) -> Any:
  r"""λ from the EMA timescale of decoupled decay: :math:`\tau_{iter} = 1/(\eta\lambda)`.

  AdamW's weights are an exponential moving average of recent updates with a
  per-step forgetting rate of c = ηλ, i.e. a timescale of τ = 1/c iterations
  (Wang & Aitchison 2024), whose good values in *epochs* transfer across
  model and data sizes. Give τ in iterations, or in epochs with
  ``iterations_per_epoch``. The result is in the ``coupling`` convention
  (default lr-coupled, torch's λ = 1/(η τ)); for ``"schedule"``/``"none"``
  it is the per-step shrink 1/τ at the peak, independent of η.

  Example:
    >>> import optax_decoupled as od
    >>> od.weight_decay_from_timescale(10_000, 1e-3)  # doctest: +ELLIPSIS
    0.1...
    >>> od.weight_decay_from_timescale(learning_rate=1e-3, tau_epochs=5,
    ...                                iterations_per_epoch=2_000)  # doctest: +ELLIPSIS
    0.1...

  References:
    Wang & Aitchison, How to set AdamW's weight decay as you scale model and
    dataset size, https://arxiv.org/abs/2405.13698.
  """
  who = "weight_decay_from_timescale"
  check_coupling(coupling, who)
  tau = _iterations(tau_iterations, tau_epochs, iterations_per_epoch, who)
  if learning_rate is None:
    raise ValueError(f"{who}: learning_rate=... (the peak η) is required.")
  return convert_weight_decay(1.0 / tau, from_coupling="none", to_coupling=coupling,
                              learning_rate=learning_rate)


def timescale_from_weight_decay(
    weight_decay: ScalarOrSchedule,
    learning_rate: Any,
    *,
    coupling: str = "lr",
    iterations_per_epoch: Any = None,
) -> Any:
  r"""The EMA timescale :math:`\tau = 1/(\eta\lambda)` of a decay, inverse of
  :func:`weight_decay_from_timescale`.

  Returns τ in iterations, or in epochs when ``iterations_per_epoch`` is
  given. ``coupling`` names the convention of ``weight_decay`` (default
  lr-coupled).

  Example:
    >>> import optax_decoupled as od
    >>> round(od.timescale_from_weight_decay(0.1, 1e-3))
    10000
    >>> round(od.timescale_from_weight_decay(0.1, 1e-3, iterations_per_epoch=2_000), 6)
    5.0

  References:
    Wang & Aitchison, https://arxiv.org/abs/2405.13698.
  """
  who = "timescale_from_weight_decay"
  check_coupling(coupling, who)
  _hyperparams.check_number(weight_decay, "weight_decay", who, positive=True)
  _hyperparams.check_number(learning_rate, "learning_rate", who, positive=True)
  shrink = convert_weight_decay(weight_decay, from_coupling=coupling, to_coupling="none",
                                learning_rate=learning_rate)
  tau = 1.0 / shrink
  if iterations_per_epoch is None:
    return tau
  _hyperparams.check_number(iterations_per_epoch, "iterations_per_epoch", who, positive=True)
  return tau / iterations_per_epoch
