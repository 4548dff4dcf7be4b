"""Masks from the nnx module graph: HF Trainer's preset and this library's own rules.

``hf_trainer_mask`` is transformers' current rule, transcribed from the source file its
docstring cites. ``norm_and_bias_mask`` and ``stacked_ndim_mask`` are this library's own
rules (norm layers by type; ndim for stacked layers) and are named for what they do. The
presets that need no model are in ``_name_presets``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from flax import nnx

from optax_decoupled import _paths, _predicates, _rules

__all__ = ["NORM_TYPES", "exclude_module_types", "hf_trainer_mask", "norm_and_bias_mask",
           "stacked_ndim_mask"]

#: Flax nnx normalization layers, grouped as one rule of alternatives: the rule
#: counts as matched when a module of *any* of these types owns a parameter.
NORM_TYPES: tuple[type, ...] = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm)

TypeRule = type | Sequence[type]

#: Norm layers by name, for trees without a model (linen): ``LayerNorm_0``, ``RMSNorm_1``,
#: ``layer_norm``, ``input_layernorm``, ``norm1``, ``normalization``, GPT-2's ``ln_1``/``ln_f``;
#: not words that run on (``normal_head``, ``enormous``, ``relative_position_bias_table``).
_NORM_NAMES: tuple[str, ...] = (
    r"(?i)norm(?:ali[sz](?:ation|er?))?(?![a-z])", r"(?:^|/)ln(?:_\w+|\d+)?/")

#: ``transformers.Trainer.get_decay_parameter_names``' ``forbidden_name_patterns``.
_HF_FORBIDDEN_NAMES = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _rule_name(alternatives: tuple[type, ...]) -> str:
  names = ", ".join(t.__name__ for t in alternatives)
  return names if len(alternatives) == 1 else f"({names})"


def _normalize_type_rules(types: Sequence[TypeRule]) -> tuple[tuple[type, ...], ...]:
  if not types:
    raise ValueError("exclude_module_types(model, *types) needs at least one module class, "
                     "e.g. exclude_module_types(model, nnx.LayerNorm, nnx.Embed).")
  rules = []
  for t in types:
    alternatives = (t,) if isinstance(t, type) else tuple(t)
    if not alternatives or not all(isinstance(a, type) for a in alternatives):
      raise TypeError("exclude_module_types() takes module classes (e.g. nnx.LayerNorm), or "
                      f"tuples of classes that count as one rule; got {t!r}.")
    for a in alternatives:
      if not issubclass(a, nnx.Module):
        raise TypeError(f"exclude_module_types() takes nnx module classes; {_not_nnx_module(a)}")
    rules.append(alternatives)
  return tuple(rules)


def _not_nnx_module(cls: type) -> str:
  """Why ``cls`` owns no parameter of an nnx model, and what to pass instead."""
  name = f"{cls.__module__}.{cls.__qualname__}"
  if issubclass(cls, nnx.Variable):
    return (f"{name} is a Variable type: it selects what is optimized, which is wrt= (e.g. "
            "wrt=nnx.Param), not a module whose parameters to exclude.")
  if cls.__module__.startswith("flax.linen") or any(
      c.__module__.startswith("flax.linen") for c in cls.__mro__[1:]):
    return (f"{name} is a linen class, which no nnx model contains: pass its nnx "
            f"counterpart (e.g. nnx.{cls.__name__}).")
  return (f"{name} is not an nnx.Module subclass, and the owners of parameters are read from"
          " the model's modules (nnx.iter_modules): make it an nnx.Module.")


def _param_owners_by_rule(
    model: Any, rules: tuple[tuple[type, ...], ...], wrt: Any, skip_root: bool = False
) -> tuple[tuple[str, ...], tuple[tuple[tuple[str, str], ...], ...]]:
  """All ``wrt`` paths of ``model`` and, per rule, ``(path, owning type name)`` pairs.

  A parameter belongs to a module if it is reachable from it (directly or through
  submodules), as in HF's ``get_parameter_names``; the innermost matching module
  names it. Ownership is established by Variable identity and, as a cross-check,
  by path prefix, so shared (tied) modules are handled however the state names them.
  ``skip_root``: the model itself is not checked (HF tests children only).
  """
  leaves = _paths.leaves_with_paths(nnx.state(model, wrt))
  all_paths = tuple(p for p, _ in leaves)
  modules = [(m, x) for m, x in nnx.iter_modules(model) if m or not skip_root]
  owners = []
  for alternatives in rules:
    owner: dict[str, str] = {}
    for mpath, module in modules:
      if not isinstance(module, alternatives):
        continue
      prefix = _paths.path_to_str(mpath)
      ids = {id(v) for _, v in _paths.leaves_with_paths(nnx.state(module, wrt))}
      for p, v in leaves:
        if p not in owner and (id(v) in ids or not prefix or p.startswith(prefix + "/")):
          owner[p] = type(module).__name__
    owners.append(tuple(sorted(owner.items())))
  return all_paths, tuple(owners)


@dataclasses.dataclass(frozen=True)
class _ModuleTypes(_predicates.Predicate):
  rules: tuple[tuple[type, ...], ...]
  owners: tuple[tuple[tuple[str, str], ...], ...]
  model_name: str
  allow_unmatched: bool = False
  #: Every ``wrt`` path of the model the owners were read from.
  model_paths: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)
  _lookup: tuple[dict[str, str], ...] = dataclasses.field(
      init=False, repr=False, compare=False, hash=False)

  def __post_init__(self):
    object.__setattr__(self, "_lookup", tuple(dict(o) for o in self.owners))

  @property
  def owned(self) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(d) for d in self._lookup)

  def decide(self, path: str, leaf: Any) -> _rules.Decision:
    for lookup in self._lookup:
      if path in lookup:
        return _rules.Decision(False, f"excluded: in a {lookup[path]} module")
    return _rules.Decision(True, "not in an excluded module type")

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    # Module types are read from one model: on a leaf that model does not have, this
    # predicate cannot tell who owns it, whatever allow_unmatched says.
    foreign = [p for p in paths if p not in self.model_paths]
    if foreign:
      raise ValueError(
          f"Weight-decay mask: {self!r} was built from a {self.model_name} that has no "
          f"parameter at {foreign[0]!r} ({len(foreign)} of {len(paths)} paths of the tree "
          f"being masked are not the model's; it has e.g. {min(self.model_paths, default=None)!r}):"
          " build it from the model you optimize, after adding all its layers, with the"
          " optimizer's wrt (allow_unmatched does not apply: the module types of those leaves"
          " are unknown).")
    if self.allow_unmatched:
      return []
    present = set(paths)
    return [
        f"module type {_rule_name(alternatives)} of {self!r} owns no parameter "
        "of the tree being masked"
        for alternatives, owned in zip(self.rules, self.owned)
        if not owned & present
    ]

  def __repr__(self) -> str:
    args = [_rule_name(r) for r in self.rules]
    if self.allow_unmatched:
      args.append("allow_unmatched=True")
    return f"exclude_module_types({', '.join(args)})"


def _check_model(model: Any, call: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{call} needs the nnx model as first argument (got {type(model).__name__})."
                    " For linen parameter trees use name rules, e.g. od.exclude_names(...).")


def exclude_module_types(
    model: nnx.Module, *types: TypeRule, allow_unmatched: bool = False, wrt: Any = nnx.Param
) -> _predicates.Predicate:
  """Decay every parameter except those that belong to modules of ``types``.

  The HF Trainer rule by type (``get_parameter_names(model, [nn.LayerNorm])``), for Flax
  nnx models: the parameter paths owned by every module that is an instance of one of
  ``types`` (directly or through its submodules) are read from the model graph
  (``nnx.iter_modules``) once, here, so the predicate works whatever the attributes are
  called (``ln_1``, ``attn_norm``, ...) and for stacked (``nnx.vmap``) layers, whose norm
  scales are 2-D. The paths are those of ``nnx.state(model, wrt)``, which ``nnx.Optimizer``
  hands to the transform at ``init`` (as Variables) and at ``update`` (as arrays).

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Args:
    model: the nnx model whose parameters will be masked.
    *types: module classes (``nnx.LayerNorm``, ``nnx.Embed``, your own ``RMSNorm``...), or
      tuples of classes that count as one rule.
    allow_unmatched: if False (default), a rule whose types own no parameter is a
      ``ValueError`` here, and again when the mask is resolved on a tree that lacks them.
      Either way, resolving it on a tree with a leaf ``model`` does not have (another
      model, a layer added since, another ``wrt``) is a ``ValueError``: the module type
      of that leaf is unknown.
    wrt: the nnx filter of the optimized variables (``nnx.Optimizer``'s ``wrt``).

  Returns:
    A frozen, printable :class:`optax_decoupled.Predicate`; combine it with name rules,
    e.g. ``odf.exclude_module_types(model, nnx.LayerNorm) & od.exclude_names("bias")``.

  Example:
    >>> from flax import nnx
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.ln = nnx.LayerNorm(2, rngs=rngs)
    ...     self.dense = nnx.Linear(2, 2, rngs=rngs)
    >>> model = Net(nnx.Rngs(0))
    >>> mask = odf.exclude_module_types(model, nnx.LayerNorm)
    >>> nnx.to_pure_dict(od.resolve_mask(nnx.state(model, nnx.Param), mask))
    {'dense': {'bias': True, 'kernel': True}, 'ln': {'bias': False, 'scale': False}}
  """
  _check_model(model, "exclude_module_types(model, *types)")
  rules = _normalize_type_rules(types)
  all_paths, owners = _param_owners_by_rule(model, rules, wrt)
  pred = _ModuleTypes(rules, owners, type(model).__name__, allow_unmatched, frozenset(all_paths))
  problems = pred.unmatched(all_paths)
  if problems:
    raise _rules.unmatched_error(
        f"exclude_module_types() on a {type(model).__name__}", problems,
        "Name the module classes your model uses, or pass allow_unmatched=True.")
  return pred


@dataclasses.dataclass(frozen=True)
class _DottedNames(_predicates.Predicate):
  """No decay where a pattern is ``re.search``-found in the dotted, lowercased path."""

  patterns: tuple[str, ...]

  def decide(self, path: str, leaf: Any) -> _rules.Decision:
    name = path.replace("/", ".").lower()
    for p in self.patterns:
      if re.search(p, name):
        return _rules.Decision(False, f"excluded: {name!r} matches {p!r}")
    return _rules.Decision(True, "no forbidden name pattern matched")

  def __repr__(self) -> str:
    return f"hf_forbidden_names({', '.join(map(repr, self.patterns))})"


def hf_trainer_mask(model: nnx.Module, *, wrt: Any = nnx.Param) -> _predicates.Predicate:
  """HF Trainer's rule: no decay inside ``nnx.LayerNorm`` modules or on norm/bias names.

  transformers 5.x ``Trainer.get_decay_parameter_names`` (transformers/trainer.py):
  ``get_parameter_names(model, [nn.LayerNorm], [r"bias", r"layernorm", r"rmsnorm",
  r"(?:^|\\.)norm(?:$|\\.)", r"_norm(?:$|\\.)"])`` (transformers/trainer_pt_utils.py). A
  parameter is not decayed if a submodule of type LayerNorm (here ``nnx.LayerNorm``,
  subclasses included, found in the module graph) holds it, or if ``re.search`` finds
  one of the patterns in its dotted, lowercased name (``blocks/0/attn_norm/scale`` is
  read as ``blocks.0.attn_norm.scale``); every other parameter, embeddings included, is
  decayed: ``nnx.BatchNorm``/``GroupNorm``/``RMSNorm`` scales decay unless their
  attribute is named like a norm (``norm``, ``*_norm``, ``*layernorm*``, ``*rmsnorm*``).
  As in HF, rules that match nothing are fine (a bias-free RMSNorm model does not raise);
  a tree with a leaf ``model`` does not have (another model's) raises ``ValueError``.
  For every norm type, plus "bias", with the unmatched check: :func:`norm_and_bias_mask`.

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Example:
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, features, *, rngs):
    ...     self.dense = nnx.Linear(features, features, rngs=rngs)
    ...     self.bn, self.final_norm = (nnx.BatchNorm(features, rngs=rngs),
    ...                                 nnx.RMSNorm(features, rngs=rngs))
    >>> model = Block(2, rngs=nnx.Rngs(0))
    >>> mask = od.resolve_mask(nnx.state(model, nnx.Param), odf.hf_trainer_mask(model))
    >>> nnx.to_pure_dict(mask)["bn"], nnx.to_pure_dict(mask)["final_norm"]
    ({'bias': False, 'scale': True}, {'scale': False})
  """
  _check_model(model, "hf_trainer_mask(model)")
  rules = ((nnx.LayerNorm,),)
  all_paths, owners = _param_owners_by_rule(model, rules, wrt, skip_root=True)
  by_type = _ModuleTypes(rules, owners, type(model).__name__, allow_unmatched=True,
                         model_paths=frozenset(all_paths))
  return by_type & _DottedNames(_HF_FORBIDDEN_NAMES)


def norm_and_bias_mask(
    model: nnx.Module, norm_types: TypeRule = NORM_TYPES, *, allow_unmatched: bool = False,
    wrt: Any = nnx.Param) -> _predicates.Predicate:
  """No decay on norm layers (by module type) nor on any path containing "bias".

  ``exclude_module_types(model, norm_types) & od.exclude_names("bias")``: HF's older
  rule (``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` minus names containing
  "bias") widened to every norm type. ``norm_types`` is one rule of alternatives,
  matched when the model has any of them; add your own classes, e.g.
  ``(*odf.NORM_TYPES, MyNorm)``. A rule that matches nothing raises ``ValueError``
  unless ``allow_unmatched``. Stacked layers are handled (by type, not by ndim).

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Example:
    >>> from flax import nnx
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.bn = nnx.BatchNorm(2, rngs=rngs)
    ...     self.dense = nnx.Linear(2, 2, rngs=rngs)
    >>> model = Net(nnx.Rngs(0))
    >>> mask = odf.norm_and_bias_mask(model)
    >>> nnx.to_pure_dict(od.resolve_mask(nnx.state(model, nnx.Param), mask))
    {'bn': {'bias': False, 'scale': False}, 'dense': {'bias': False, 'kernel': True}}
  """
  types = norm_types if isinstance(norm_types, type) else tuple(norm_types)
  by_type = exclude_module_types(model, types, allow_unmatched=allow_unmatched, wrt=wrt)
  return by_type & _predicates.exclude_names("bias", allow_unmatched=allow_unmatched)


def stacked_ndim_mask(
    model: nnx.Module | None = None, norm_types: TypeRule = NORM_TYPES, *, wrt: Any = nnx.Param
) -> _predicates.Predicate:
  """ndim >= 2 (nanoGPT) minus norm parameters and biases: safe for stacked layers.

  ``od.min_ndim(2) & <not in a norm layer> & <last path segment is not "bias">``. On
  unstacked models it equals :func:`nanogpt_mask` (norm scales and biases are 1-D); on
  stacked ones it still keeps them out. Norm layers are found by module type when the
  nnx ``model`` is given, else by name (linen trees: ``LayerNorm_0``, ``attn_norm``,
  ``norm1``, ``ln_f``...; see ``_NORM_NAMES``). Biases are leaves named exactly ``bias``
  (timm's ``name.endswith(".bias")``), so a 2-D ``relative_position_bias_table`` keeps
  its decay. The extra rules may match nothing. A stacked 1-D parameter of another
  kind (a custom gain) is still decayed: exclude it by name or type.

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled.flax as odf
    >>> stacked = {"LayerNorm_0": {"scale": jnp.ones((4, 8))}, "Dense_0": {
    ...            "kernel": jnp.ones((4, 8, 8)), "bias": jnp.ones((4, 8))}}
    >>> odf.stacked_ndim_mask()(stacked)
    {'Dense_0': {'bias': False, 'kernel': True}, 'LayerNorm_0': {'scale': False}}
  """
  if model is None:
    norm = _predicates.exclude_names(_NORM_NAMES, allow_unmatched=True)
  else:
    types = norm_types if isinstance(norm_types, type) else tuple(norm_types)
    norm = exclude_module_types(model, types, allow_unmatched=True, wrt=wrt)
  bias = _predicates.exclude_names(r"(?:^|/)bias$", allow_unmatched=True)
  return _predicates.min_ndim(2) & norm & bias
