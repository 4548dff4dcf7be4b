"""What a hyperparameter may be, checked once, and its value at step t.

The rules, the same for every public entry point:

* a **number** is a real scalar that is finite and >= 0 (> 0 where stated); a bool is not a
  number. Traced values (``jax.jit``, ``jax.vmap``, ``optax.inject_hyperparams``) cannot be
  inspected and pass unchecked;
* a **schedule** is a function of the step count: never a class (``jnp.bfloat16`` is one),
  a dtype, a mask (a predicate, :class:`MaskSpec`) or a callable that cannot take one
  positional argument;
* a **mask** is never a number (checked where masks are resolved, ``_masks``).

Public entry points call these checks on their own arguments, once; private builders never
validate. :func:`value_at` is the one place a hyperparameter is evaluated at a step, and
:func:`check_shrink` the one "per-step shrink >= 1" check.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "ArrayLike",
    "DType",
    "MaskSpec",
    "Numeric",
    "Schedule",
    "ScalarOrSchedule",
    "check_decay_rate",
    "check_dtype",
    "check_flag",
    "check_learning_rate",
    "check_number",
    "check_schedule_or_number",
    "check_shrink",
    "check_weight_decay",
    "constant",
    "is_callable_pytree",
    "is_traced",
    "value_at",
]


#: A number: a Python or numpy scalar, or a 0-d (possibly traced) array.
Numeric: TypeAlias = chex.Numeric
#: A number or array, as optax types Adam's ``b1``, ``b2``, ``eps`` (``jax.typing.ArrayLike``).
ArrayLike: TypeAlias = jax.typing.ArrayLike
#: A function of the step count: optax's ``optax.Schedule``.
Schedule: TypeAlias = optax.Schedule
#: A hyperparameter, a number or a schedule: optax's ``optax.ScalarOrSchedule``.
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule
#: A dtype, or None for "the parameters' dtype".
DType: TypeAlias = "jax.typing.DTypeLike | None"


class MaskSpec:
  """Base of the objects that say which leaves decay (predicates, multiplier rules).

  A mask is never a hyperparameter: passing one as ``weight_decay`` or ``learning_rate``
  is a ``TypeError`` that says to pass it as ``mask=``.
  """

  __slots__ = ()


#: Attribute set on the uncalled predicate factories (``od.exclude_names`` ...).
MASK_FACTORY = "_od_mask_factory"


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a value being traced (by ``jit``, ``vmap``, ``grad``...), not data.

  Public APIs only: a traced ``jax.Array`` has no concrete buffers, so reading its
  ``committed`` property raises ``jax.errors.ConcretizationTypeError`` (under every
  transformation, on every supported jax); a concrete array answers.
  """
  if not isinstance(x, jax.Array):
    return False
  try:
    x.committed  # noqa: B018 - read for its error only.
  except jax.errors.ConcretizationTypeError:
    return True
  return False


def _concrete(x: Any) -> float | None:
  """``float(x)`` for a concrete real scalar that is not a bool, else None."""
  if is_traced(x) or isinstance(x, (bool, np.bool_)) or callable(x):
    return None
  try:
    value = np.asarray(x)
  except Exception:  # noqa: BLE001 - not array-like: the caller raises a TypeError.
    return None
  # jnp's dtype lattice: numpy does not count bfloat16 (an ml_dtypes type) as a number.
  if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.number) or np.iscomplexobj(value):
    return None
  return float(value)


def constant(x: Any) -> float | None:
  """The value of a hyperparameter that is a concrete number, else None.

  Objects with a ``constant()`` method (:class:`~optax_decoupled.CoupledWeightDecay`)
  answer for themselves; schedules and traced values give None.
  """
  if hasattr(x, "constant") and callable(x.constant):
    return x.constant()
  value = _concrete(x)
  return value if value is not None and math.isfinite(value) else None


def value_at(hyperparam: Any, count: Any) -> Any:
  """A constant, or a schedule evaluated at the step ``count``."""
  return hyperparam(count) if callable(hyperparam) else hyperparam


def _mask_hint(x: Any, name: str, who: str) -> TypeError | None:
  if isinstance(x, MaskSpec) or getattr(x, MASK_FACTORY, False):
    return TypeError(
        f"{who}: {name}={x!r} is a weight-decay mask; pass it as mask=... and give {name} "
        "a number or a schedule."
    )
  return None


def _schedule_error(x: Any, name: str, who: str) -> TypeError | None:
  """Why the callable ``x`` is not a schedule (a function of the step), or None."""
  if isinstance(x, type) or isinstance(x, np.dtype):
    kind = "a dtype" if isinstance(x, np.dtype) or _is_dtype_class(x) else "a class"
    return TypeError(
        f"{who}: {name}={x!r} is {kind}, not a number or a schedule (a function of the step "
        "count). Check the positional order: dtypes go to mu_dtype=/nu_dtype=."
    )
  if is_callable_pytree(x):
    return TypeError(
        f"{who}: {name}={type(x).__name__} is callable and also a pytree with leaves (a mask "
        "tree or a module?). Pass a non-negative number or a schedule (a function of the "
        "step count)."
    )
  try:
    inspect.signature(x).bind(0)
  except TypeError:
    return TypeError(
        f"{who}: {name}={x!r} cannot be called with one argument, the step count, so it is "
        "not a schedule. Pass a non-negative number or a function of the step count."
    )
  except ValueError:  # no signature (builtins, ufuncs): taken as a function of the step.
    pass
  return None


def _is_dtype_class(x: Any) -> bool:
  try:
    np.dtype(x)
  except TypeError:
    return False
  return isinstance(x, type)


def is_callable_pytree(x: Any) -> bool:
  """A callable that is also a pytree node with leaves (an Equinox module, ...).

  A plain function is a pytree *leaf*, so it is not one of these.
  """
  if not callable(x):
    return False
  treedef = jax.tree_util.tree_structure(x)
  return not jax.tree_util.treedef_is_leaf(treedef) and treedef.num_leaves > 0  # type: ignore[attr-defined]


def check_number(x: Any, name: str, who: str, *, positive: bool = False, below: float | None = None,
                 hint: str = "") -> None:
  """A finite real scalar >= 0 (> 0 with ``positive``, < ``below`` if given); tracers pass
  unchecked. The error says the range."""
  if is_traced(x):
    return
  error = _mask_hint(x, name, who)
  if error is not None:
    raise error
  if callable(x):
    raise TypeError(f"{who}: {name} must be a number, not a function ({x!r}).")
  value = _concrete(x)
  if value is None:
    raise TypeError(f"{who}: {name} must be a non-negative number, got {x!r}.")
  if (not math.isfinite(value) or value < 0 or (positive and value == 0)
      or (below is not None and value >= below)):
    bound = "> 0" if positive else ">= 0"
    if below is not None:
      bound = f"in {'(' if positive else '['}0, {below:g})"
    hint = hint if value < 0 else ""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      # e.g. optax.inject_hyperparams(..., hyperparam_dtype=jnp.bfloat16): 0.999 rounds to 1.
      hint = (f"{hint} The value is a {jnp.dtype(dtype).name} scalar, which may have rounded "
              "it; pass hyperparameters in float32.").strip()
    raise ValueError(f"{who}: {name} must be finite and {bound}, got {value!r}. {hint}".rstrip())


def check_schedule_or_number(x: Any, name: str, who: str, *, hint: str = "") -> None:
  """A number as in :func:`check_number`, or a schedule (a function of the step count)."""
  if is_traced(x):
    return
  error = _mask_hint(x, name, who)
  if error is None and callable(x):
    error = _schedule_error(x, name, who)
    if error is None:
      return
  if error is None and isinstance(x, np.dtype):
    error = _schedule_error(x, name, who)
  if error is not None:
    raise error
  value = _concrete(x)
  if value is None:
    raise TypeError(
        f"{who}: {name} must be a non-negative number or a schedule (a function of the step "
        f"count), got {x!r}."
    )
  if not math.isfinite(value) or value < 0:
    hint = hint if value < 0 else ""  # the hint explains negative values, not NaN or inf.
    raise ValueError(f"{who}: {name} must be finite and >= 0, got {value!r}. {hint}".rstrip())


def check_learning_rate(x: Any, who: str) -> None:
  """A learning rate: a number >= 0 or a schedule."""
  check_schedule_or_number(x, "learning_rate", who,
                           hint="To maximize an objective, negate the loss.")


def check_weight_decay(x: Any, who: str) -> None:
  """A weight decay λ: a number >= 0 or a schedule."""
  check_schedule_or_number(x, "weight_decay", who, hint="A negative value would grow the weights.")


def check_decay_rate(x: Any, name: str, who: str) -> None:
  """A moment's decay rate (Adam's β1, β2, a momentum): a number in [0, 1).

  The range of torch.optim.Adam (``0.0 <= betas[i] < 1.0``) and torch.optim.SGD's
  momentum: 1 keeps the first moment forever and divides by zero in Adam's bias
  correction. Tracers pass unchecked.
  """
  check_number(x, name, who, below=1.0)


def check_dtype(x: Any, name: str, who: str) -> None:
  """None, or a floating/complex dtype (``jnp.float32``, ``"bfloat16"``, ``np.dtype``).

  An optimizer's moments and buffers accumulate fractions: an integer dtype would truncate
  them to 0. A number here is a positional argument in the wrong place.
  """
  if x is None:
    return
  if isinstance(x, (bool, np.bool_, int, float, complex, np.number)) or is_traced(x):
    raise TypeError(
        f"{who}: {name}={x!r} is a number, not a dtype: check the positional order of "
        f"{who}'s arguments, or pass the hyperparameters after eps_root by keyword "
        "(e.g. weight_decay=1e-4)."
    )
  try:
    dtype = jnp.dtype(x)
  except TypeError as e:
    raise TypeError(f"{who}: {name}={x!r} is not a dtype ({e}). Pass e.g. jnp.float32, "
                    "or None for the parameters' dtype.") from e
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(
        f"{who}: {name}={dtype.name} is not a floating-point dtype: the optimizer's "
        "running averages would be truncated to integers. Pass jnp.float32 (or bfloat16/"
        "float16, or a complex dtype for complex parameters), or None for the parameters' "
        "dtype."
    )


def check_flag(x: Any, name: str, who: str) -> None:
  """``True`` or ``False``, nothing else."""
  if not isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{who}: {name} must be True or False, got {x!r}.")


def check_shrink(shrink: Any, who: str, hint: str) -> None:
  """Refuses a constant per-step decay shrink c >= 1: c·θ would flip or zero every weight."""
  c = constant(shrink)
  if c is not None and c >= 1:
    raise ValueError(
        f"{who}: the per-step weight-decay shrink is {c:.4g} >= 1, so every decayed weight "
        f"would flip sign (or become 0) at each step. {hint}"
    )
