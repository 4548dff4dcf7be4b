"""``describe_mask``: a readable account of which parameters a mask decays."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_decoupled import _masks, _paths

__all__ = ["MaskReport", "MaskRow", "describe_mask", "table"]


def table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  """Left-aligned columns two spaces apart: the header, a rule, one line per row."""
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  return [fmt.format(*row).rstrip() for row in (head, ["-" * w for w in widths], *body)]


@dataclasses.dataclass(frozen=True)
class MaskRow:
  """One leaf of a :class:`MaskReport`."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  decay: bool
  rule: str
  multiplier: float | None = None  # λ multiplier, for od.decay_multipliers rules.

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class MaskReport:
  """Per-leaf decisions of a mask; ``str()`` renders them as a table with totals."""

  rows: tuple[MaskRow, ...]
  mask: str

  @property
  def decayed(self) -> tuple[MaskRow, ...]:
    return tuple(r for r in self.rows if r.decay)

  @property
  def excluded(self) -> tuple[MaskRow, ...]:
    return tuple(r for r in self.rows if not r.decay)

  def __str__(self) -> str:
    head: tuple[str, ...] = ("path", "shape", "dtype", "decay", "rule")
    body: list[tuple[str, ...]] = [
        (r.path, str(r.shape), r.dtype, "yes" if r.decay else "no", r.rule)
        for r in self.rows
    ]
    if any(r.multiplier is not None for r in self.rows):  # a multipliers rule set
      head = head[:4] + ("mult",) + head[4:]
      body = [b[:4] + (f"{r.multiplier:g}",) + b[4:] for b, r in zip(body, self.rows)]
    lines = [f"mask: {self.mask}", *table(head, body)]
    n_dec = sum(r.size for r in self.decayed)
    n_all = sum(r.size for r in self.rows)
    lines.append(
        f"decayed: {len(self.decayed)} of {len(self.rows)} leaves, "
        f"{n_dec:,} of {n_all:,} parameters; "
        f"not decayed: {len(self.excluded)} leaves, {n_all - n_dec:,} parameters"
    )
    return "\n".join(lines)


def describe_mask(params: Any, mask: Any = None) -> MaskReport:
  """Reports, leaf by leaf, whether ``mask`` decays it and which rule decided.

  Args:
    params: any parameter pytree (dicts, Flax linen or nnx state, Equinox
      modules, lists, ...).
    mask: anything the transforms accept as ``mask`` (None, a predicate, a
      pytree of bools, a function of the parameters), or
      :func:`decay_multipliers` rules, which add a ``mult`` column (the
      multiplier of λ; a leaf is decayed when it is nonzero).

  Returns:
    A :class:`MaskReport`; ``print(report)`` shows a table of path, shape,
    dtype, decay and rule, then the totals (leaves and parameter counts,
    decayed vs not). Raises the same errors as resolving the mask would.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    >>> report = od.describe_mask(params, od.exclude_names("bias"))
    >>> [(r.path, r.decay) for r in report.rows]
    [('dense/bias', False), ('dense/kernel', True)]
  """
  rows = []
  for d in _masks.decisions(params, mask, warn=False):
    value = _paths.leaf_value(d.leaf)
    rows.append(
        MaskRow(
            path=d.path,
            shape=tuple(int(n) for n in np.shape(value)),
            dtype=str(getattr(value, "dtype", type(value).__name__)),
            decay=d.decay,
            rule=d.rule,
            multiplier=d.multiplier if d.weighted else None,
        )
    )
  return MaskReport(rows=tuple(rows), mask=repr(mask))
