"""Layer-wise learning-rate decay for fine-tuning, for named and for stacked layers.

A :class:`LayerDecay` assigns each leaf a layer id from its path: 0 for the embeddings,
``i + 1`` for the block with (0-based) index ``i`` in its name, ``L + 1`` for the head. A
*stacked* leaf (``nn.scan``, ``nnx.scan``/``nnx.vmap``, MaxText) holds all ``L`` blocks along
one axis, so its slice ``i`` is at layer ``i + 1``. Layer ``l``'s learning rate is multiplied by

.. math:: s_l = \\gamma^{\\,L + 1 - l},

timm's ``param_groups_layer_decay`` (its ``layer_max`` is ``L + 1`` for a model with a head).
:func:`scale_by_layer_decay` multiplies the updates by ``s_l``: a Python float per named leaf, an
array of shape ``(L, 1, ..., 1)`` per stacked leaf, broadcast along the stacked axis.

Like the decay masks it refuses to fail silently: a rule that takes no leaf, a leaf no rule
takes, a block index out of ``0 .. L-1`` and a stacked axis whose length is not ``L`` are errors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_decoupled import _hyperparams, _paths, _report, _rules

__all__ = ["LayerDecay", "layer_decay"]

Patterns = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One path rule, named after the argument of :func:`layer_decay` it came from: "at_layer",
  "embeddings" or "head" (a fixed layer), "layers" (layer = captured index + 1) or
  "stacked" (slice ``i`` along the stacked axis at layer ``i + 1``)."""

  pattern: str
  kind: str
  layer: int = -1  # the layer of an "at_layer", "embeddings" or "head" rule.

  @property
  def fixed(self) -> bool:
    return self.kind not in ("layers", "stacked")

  def describe(self) -> str:
    return f"{self.kind} {self.pattern!r}"


@dataclasses.dataclass(frozen=True)
class LayerDecision:
  """What a :class:`LayerDecay` decided for one leaf."""

  path: str
  leaf: Any
  layers: tuple[int, ...]  # one layer id, or one per slice of a stacked leaf.
  multipliers: tuple[float, ...]  # s_l of each layer in ``layers``.
  rule: str
  stacked: bool


@dataclasses.dataclass(frozen=True)
class LayerDecay:
  """Layer-wise learning-rate decay rules; see :func:`layer_decay`.

  Decay convention: none of its own (it scales updates). After ``od.adamw`` it scales the
  decay term with the step, so the shrink of layer l is η·γ^(L+1−l)·λ (lr-coupled, as
  torch's ``AdamW`` on timm's ``param_groups_layer_decay`` groups).
  """

  decay: float
  num_layers: int
  rules: tuple[_Rule, ...]
  stack_axis: int = 0
  allow_unmatched: bool = False

  def multiplier(self, layer: int) -> float:
    """:math:`\\gamma^{L+1-l}` of layer id ``layer`` (0 .. L + 1)."""
    if not 0 <= layer <= self.num_layers + 1:
      raise ValueError(f"{self!r}: layer {layer} is outside 0 .. {self.num_layers + 1}.")
    return float(self.decay ** (self.num_layers + 1 - layer))

  def __bool__(self) -> bool:
    raise TypeError(
        f"{self!r} is a layer-wise learning-rate decay, not a boolean mask: give it to "
        "od.scale_by_layer_decay and chain that after the optimizer.")

  def _decide(self, path: str, leaf: Any, rule: _Rule) -> LayerDecision:
    n = self.num_layers
    if rule.fixed:
      layers: tuple[int, ...] = (rule.layer,)
      how = rule.describe()
    elif rule.kind == "layers":
      captured = re.fullmatch(rule.pattern, path).group(1)  # type: ignore[union-attr]
      if captured is None or not captured.isdecimal():
        raise ValueError(
            f"{self!r}: the layers pattern {rule.pattern!r} captured {captured!r} from "
            f"{path!r}, not a block index. Its one group must capture the digits, e.g. "
            r"'blocks/(\d+)/.*'.")
      index = int(captured)
      if not 0 <= index < n:
        raise ValueError(
            f"{self!r}: {path!r} has block index {index}, outside 0 .. {n - 1} "
            f"(num_layers={n}). Check num_layers, or the pattern {rule.pattern!r}.")
      layers = (index + 1,)
      how = f"layers {rule.pattern!r}: index {index} + 1"
    else:
      shape = np.shape(_paths.leaf_value(leaf))
      axis = self.stack_axis
      if len(shape) <= axis or shape[axis] != n:
        raise ValueError(
            f"{self!r}: the stacked leaf {path!r} has shape {tuple(shape)}; its axis {axis} "
            f"must have length num_layers={n} (one slice per block). Check num_layers, "
            "stack_axis, or the stacked pattern.")
      layers = tuple(range(1, n + 1))
      how = rule.describe()
    return LayerDecision(path, leaf, layers, tuple(self.multiplier(l) for l in layers), how,
                         rule.kind == "stacked")

  def decisions(self, params: Any) -> list[LayerDecision]:
    """One :class:`LayerDecision` per leaf of ``params`` (nnx Variables are leaves).

    Leaves that are ``optax.MaskedNode`` (inside ``optax.multi_transform``) get no decision
    but count for the check that every rule takes a leaf.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_rules.is_leaf_or_masked)
    every = [(_paths.path_to_str(p), x) for p, x in flat]
    if not every:
      return []
    taken = [False] * len(self.rules)
    out, untaken = [], []
    for path, leaf in every:
      k = next((k for k, r in enumerate(self.rules) if re.fullmatch(r.pattern, path)), None)
      if k is None:
        if not isinstance(leaf, optax.MaskedNode):
          untaken.append(path)
        continue
      taken[k] = True
      if not isinstance(leaf, optax.MaskedNode):
        out.append(self._decide(path, leaf, self.rules[k]))
    if untaken:
      shown = ", ".join(repr(p) for p in untaken[:8]) + (", ..." if len(untaken) > 8 else "")
      raise ValueError(
          f"{self!r}: no rule takes {len(untaken)} of {len(every)} parameters: {shown}. "
          "Give each a layer: embeddings=, layers=, stacked=, head= or at_layer= (patterns "
          "match the whole '/'-joined path, re.fullmatch).")
    unused = [r for r, hit in zip(self.rules, taken) if not hit]
    if unused and not self.allow_unmatched:
      problems = []
      for r in unused:
        if any(re.fullmatch(r.pattern, p) for p, _ in every):
          problems.append(f"{r.pattern!r} only matches paths an earlier rule takes")
        else:
          problems.append(f"{r.pattern!r} matches no parameter path (e.g. {every[0][0]!r})")
      raise ValueError(
          f"{self!r}: " + "; ".join(problems) + ". Fix the pattern (re.fullmatch on the whole "
          "'/'-joined path), or pass allow_unmatched=True.")
    return out

  def multipliers(self, params: Any) -> Any:
    """The tree of multipliers: a float per named leaf, an array per stacked leaf.

    A stacked leaf's array has shape ``(L, 1, ..., 1)`` (``L`` at ``stack_axis``), so it
    broadcasts against the leaf.
    """
    values = []
    for d in self.decisions(params):
      values.append(self._array(d, np.ndim(_paths.leaf_value(d.leaf))) if d.stacked
                    else d.multipliers[0])
    treedef = jax.tree_util.tree_structure(params, is_leaf=_paths.is_variable)
    return jax.tree_util.tree_unflatten(treedef, values)

  def scale(self, updates: Any) -> Any:
    """``updates`` with each leaf (each slice of a stacked leaf) times its multiplier; the
    arithmetic of ``od.scale_by_layer_decay``. ``optax.MaskedNode`` leaves pass through."""
    decided = iter(self.decisions(updates))

    def scale(leaf: Any) -> Any:
      if isinstance(leaf, optax.MaskedNode):
        return leaf
      # An nnx Variable stays one (updates that are a State of Variables).
      return _paths.with_value(leaf, scaled(_paths.leaf_value(leaf)))

    def scaled(u: Any) -> Any:
      d = next(decided)
      if not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
        raise TypeError(f"scale_by_layer_decay: the update at {d.path!r} has dtype "
                        f"{jnp.result_type(u)}; updates are floating point. Keep integer "
                        "leaves out of the optimizer (optax.multi_transform with "
                        "optax.set_to_zero).")
      if d.stacked:
        return u * jnp.asarray(self._array(d, jnp.ndim(u)), dtype=u.dtype)
      mult = d.multipliers[0]
      return u if mult == 1.0 else mult * u

    return jax.tree_util.tree_map(scale, updates, is_leaf=_rules.is_leaf_or_masked)

  def _array(self, d: LayerDecision, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[self.stack_axis] = self.num_layers
    return np.asarray(d.multipliers, np.float64).reshape(shape)

  def describe(self, params: Any, mask: Any = None) -> str:
    """A table of path, shape, layer, lr multiplier and deciding rule; one row per slice of
    a stacked leaf (``path[i]``).

    With ``mask`` (anything ``mask=`` accepts), a ``decay`` column shows what the decay mask
    decides for each leaf, as ``od.describe_mask`` does.
    """
    decided = self.decisions(params)
    decays: dict[str, str] = {}
    if mask is not None:
      decays = {r.path: "yes" if r.decay else "no"
                for r in _report.describe_mask(params, mask).rows}
    rows = []
    for d in decided:
      shape = tuple(int(s) for s in np.shape(_paths.leaf_value(d.leaf)))
      if d.stacked:
        shape = shape[:self.stack_axis] + shape[self.stack_axis + 1:]
      for k, (layer, mult) in enumerate(zip(d.layers, d.multipliers)):
        path = f"{d.path}[{k}]" if d.stacked else d.path
        row = (path, str(shape), str(layer), f"{mult:.6g}", d.rule)
        rows.append(row[:4] + ((decays[d.path],) if mask is not None else ()) + row[4:])
    head = ("path", "shape", "layer", "lr mult") + (("decay",) if mask is not None else ())
    n = self.num_layers
    return "\n".join([
        f"layer decay: {self!r}",
        f"lr multiplier of layer l: {self.decay:g} ** ({n + 1} - l); embeddings at layer 0 "
        f"(x{self.multiplier(0):.6g}), blocks at 1 .. {n}, head at {n + 1} (x1)",
        *_report.table(head + ("rule",), rows)])

  def __repr__(self) -> str:
    parts = [f"{self.decay:g}", str(self.num_layers)]
    groups: dict[str, list[str]] = {}
    ats = [f"{r.pattern!r}: {r.layer}" for r in self.rules if r.kind == "at_layer"]
    for r in self.rules:
      if r.kind != "at_layer":
        groups.setdefault(r.kind, []).append(r.pattern)
    if ats:
      parts.append("at_layer={" + ", ".join(ats) + "}")
    for key in ("embeddings", "layers", "stacked", "head"):
      if key in groups:
        ps = groups[key]
        parts.append(f"{key}={ps[0]!r}" if len(ps) == 1 else f"{key}={tuple(ps)!r}")
    if self.stack_axis:
      parts.append(f"stack_axis={self.stack_axis}")
    if self.allow_unmatched:
      parts.append("allow_unmatched=True")
    return f"layer_decay({', '.join(parts)})"


def _patterns(x: Patterns | None, name: str, who: str) -> tuple[str, ...]:
  if x is None:
    return ()
  return tuple(_rules.regex(p, f"{who} {name}") for p in _rules.patterns(x, who, name))


def _check_int(x: Any, name: str, who: str, low: int, high: int | None = None) -> int:
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
    raise TypeError(f"{who}: {name} must be an int, got {x!r}.")
  if x < low or (high is not None and x > high):
    bound = f">= {low}" if high is None else f"in {low} .. {high}"
    raise ValueError(f"{who}: {name} must be {bound}, got {int(x)}.")
  return int(x)


def layer_decay(
    decay: float,
    num_layers: int,
    *,
    embeddings: Patterns | None = None,
    layers: Patterns | None = None,
    stacked: Patterns | None = None,
    head: Patterns | None = None,
    at_layer: Mapping[str, int] | None = None,
    stack_axis: int = 0,
    allow_unmatched: bool = False,
) -> LayerDecay:
  r"""Layer-wise learning-rate decay: layer :math:`l` of :math:`L` gets :math:`\gamma^{L+1-l}`.

  Layer ids, as timm and BEiT count them: 0 for the embeddings, ``i + 1`` for the block
  with 0-based index ``i`` (``blocks.3`` is layer 4), ``L + 1`` for the head, which keeps the
  base learning rate. With :math:`\gamma` = ``decay``,

  .. math:: s_l = \gamma^{\,L + 1 - l}, \qquad l = 0, \dots, L + 1,

  are the ``lr_scale`` values of timm's ``param_groups_layer_decay`` for a model with a
  head (its ``num_layers`` is ``L + 2``, ``layer_max = L + 1``). Give the rules as regular
  expressions matched against the whole ``"/"``-joined path (``re.fullmatch``, as
  :func:`scale_by_lr_multipliers`); the first rule in the order ``at_layer``,
  ``embeddings``, ``layers``, ``stacked``, ``head`` that matches a leaf takes it.

  Decay convention: none of its own; see :func:`scale_by_layer_decay` for what it does to
  the weight-decay term.

  Args:
    decay: :math:`\gamma`, in (0, 1]; 1 leaves every learning rate as it is.
    num_layers: :math:`L`, the number of blocks (an int >= 1).
    embeddings: patterns of the leaves at layer 0 (patch / token / position embeddings).
    layers: patterns with one capturing group that captures the block's 0-based index,
      e.g. ``r"blocks/(\d+)/.*"`` or ``r"params/encoder/layer_(\d+)/.*"``; the leaf is at
      layer ``index + 1``.
    stacked: patterns of leaves that hold all ``L`` blocks along ``stack_axis`` (a scanned
      or vmapped stack): slice ``i`` is at layer ``i + 1``.
    head: patterns of the leaves at layer ``L + 1`` (multiplier 1).
    at_layer: ``{pattern: layer id}`` for anything else, e.g. ``{"norm/.*": L}``: timm's ViT
      puts its final norm with the last block.
    stack_axis: the axis of a stacked leaf that indexes the blocks (0 for ``nn.scan`` and
      ``nnx.vmap``'s default; MaxText's ``param_scan_axis`` is 1).
    allow_unmatched: allow rules that take no leaf. A leaf that no rule takes is always an
      error: give it a layer.

  Returns:
    A frozen, hashable :class:`LayerDecay`. ``.multipliers(params)`` is the tree of
    multipliers (a float per leaf, an ``(L, 1, ..., 1)`` array per stacked leaf),
    ``.describe(params, mask=None)`` the table path → layer → multiplier.

  Raises:
    ValueError / TypeError at once for a decay outside (0, 1], a num_layers that is not an
    int >= 1, an invalid pattern, a ``layers`` pattern without exactly one group, an
    ``at_layer`` id outside 0 .. L + 1; and when resolved against the parameters, for a leaf
    no rule takes, a rule that takes no leaf, a block index outside 0 .. L - 1, and a stacked
    axis whose length is not L.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled as od
    >>> params = {"embed": jnp.ones((10, 4)), "blocks": [{"w": jnp.ones((4, 4))}] * 2,
    ...           "head": jnp.ones((4, 3))}
    >>> ld = od.layer_decay(0.5, 2, embeddings="embed", layers=r"blocks/(\d+)/.*",
    ...                     head="head")
    >>> ld.multipliers(params)
    {'blocks': [{'w': 0.25}, {'w': 0.5}], 'embed': 0.125, 'head': 1.0}
    >>> stacked = {"embed": jnp.ones((10, 4)), "blocks": {"w": jnp.ones((2, 4, 4))},
    ...            "head": jnp.ones((4, 3))}
    >>> od.layer_decay(0.5, 2, embeddings="embed", stacked="blocks/.*",
    ...                head="head").multipliers(stacked)["blocks"]["w"].ravel().tolist()
    [0.25, 0.5]

  References:
    Clark et al., ELECTRA, https://arxiv.org/abs/2003.10555 (layer-wise learning-rate
    decay); Bao et al., BEiT, https://arxiv.org/abs/2106.08254 (``optim_factory.py``,
    ``get_layer_id_for_vit``); timm ``timm/optim/_param_groups.py``
    (``param_groups_layer_decay``) and ``timm/models/_manipulate.py``
    (``group_with_matcher``).
  """
  who = "layer_decay"
  _hyperparams.check_number(decay, "decay", who, positive=True,
                            hint="Layer-wise decay multiplies by decay ** (L + 1 - layer).")
  if _hyperparams.is_traced(decay):
    raise TypeError(f"{who}: decay must be a concrete number (the multipliers are computed "
                    "when the rules are built), got a traced value.")
  decay = float(decay)
  if decay > 1:
    raise ValueError(f"{who}: decay must be in (0, 1], got {decay!r}: a decay above 1 would "
                     "give the embeddings the largest learning rate. timm's layer_decay=0.75 "
                     "is decay=0.75.")
  n = _check_int(num_layers, "num_layers", who, 1)
  axis = _check_int(stack_axis, "stack_axis", who, 0)
  _hyperparams.check_flag(allow_unmatched, "allow_unmatched", who)
  rules: list[_Rule] = []
  if at_layer is not None:
    if not isinstance(at_layer, Mapping):
      raise TypeError(f"{who}: at_layer takes a dict {{pattern: layer id}}, got {at_layer!r}.")
    for p, layer in at_layer.items():
      if not isinstance(p, str):
        raise TypeError(f"{who}: at_layer's keys are regular expressions (str), got {p!r}.")
      _patterns(p, "at_layer", who)
      rules.append(_Rule(p, "at_layer", _check_int(layer, f"at_layer[{p!r}]", who, 0, n + 1)))
  rules += [_Rule(p, "embeddings", 0) for p in _patterns(embeddings, "embeddings", who)]
  for p in _patterns(layers, "layers", who):
    if re.compile(p).groups != 1:
      raise ValueError(f"{who}: the layers pattern {p!r} needs exactly one capturing group, "
                       r"the block index, e.g. 'blocks/(\d+)/.*' (use (?:...) for others).")
    rules.append(_Rule(p, "layers"))
  rules += [_Rule(p, "stacked") for p in _patterns(stacked, "stacked", who)]
  rules += [_Rule(p, "head", n + 1) for p in _patterns(head, "head", who)]
  if not any(not r.fixed or 0 < r.layer <= n for r in rules):
    raise ValueError(f"{who}: no rule gives a block its layer: pass layers= (named blocks, "
                     r"e.g. r'blocks/(\d+)/.*') or stacked= (a scanned stack).")
  return LayerDecay(decay, n, tuple(rules), axis, bool(allow_unmatched))
