"""Masks from the nnx module graph, and presets named after the codebases they follow."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from flax import nnx

from optax_decoupled import _paths, _predicates

__all__ = ["NORM_TYPES", "bert_mask", "exclude_module_types", "hf_trainer_mask", "nanogpt_mask"]

#: Flax nnx normalization layers, grouped as one rule of alternatives: the rule
#: counts as matched when a module of *any* of these types owns a parameter.
NORM_TYPES: tuple[type, ...] = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm)

TypeRule = type | Sequence[type]

#: Name rule for norm layers where no model object is at hand (linen param trees):
#: linen's automatic names (``LayerNorm_0``, ``RMSNorm_1``, ``BatchNorm_0``, ...),
#: BERT/HF spellings (``LayerNorm``, ``layer_norm``) and nanoGPT's ``ln_1``/``ln_f``.
_NORM_NAMES: tuple[str, ...] = (r"(?i)norm", r"(^|/)ln_?[^/]*/")


def _type_name(t: type) -> str:
  return t.__name__


def _rule_name(alternatives: tuple[type, ...]) -> str:
  if len(alternatives) == 1:
    return _type_name(alternatives[0])
  return "(" + ", ".join(_type_name(t) for t in alternatives) + ")"


def _normalize_type_rules(types: Sequence[TypeRule]) -> tuple[tuple[type, ...], ...]:
  if not types:
    raise ValueError(
        "exclude_module_types(model, *types) needs at least one module class, "
        "e.g. exclude_module_types(model, nnx.LayerNorm, nnx.Embed)."
    )
  rules = []
  for t in types:
    alternatives = (t,) if isinstance(t, type) else tuple(t)
    if not alternatives or not all(isinstance(a, type) for a in alternatives):
      raise TypeError(
          "exclude_module_types() takes module classes (e.g. nnx.LayerNorm), or tuples "
          f"of classes that count as one rule; got {t!r}."
      )
    rules.append(alternatives)
  return tuple(rules)


def _param_owners_by_rule(
    model: Any, rules: tuple[tuple[type, ...], ...], wrt: Any
) -> tuple[tuple[str, ...], tuple[tuple[tuple[str, str], ...], ...]]:
  """All ``wrt`` paths of ``model`` and, per rule, ``(path, owning type name)`` pairs.

  A parameter belongs to a module if it is reachable from it (directly or through
  submodules), as in HF's ``get_parameter_names``; the innermost matching module
  names it. Ownership is established by Variable identity and, as a cross-check,
  by path prefix, so shared (tied) modules are handled however the state names them.
  """
  leaves = _paths.leaves_with_paths(nnx.state(model, wrt))
  all_paths = tuple(p for p, _ in leaves)
  modules = list(nnx.iter_modules(model))  # children before their parents
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
  _lookup: tuple[dict[str, str], ...] = dataclasses.field(
      init=False, repr=False, compare=False, hash=False)

  def __post_init__(self):
    object.__setattr__(self, "_lookup", tuple(dict(o) for o in self.owners))

  @property
  def owned(self) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(d) for d in self._lookup)

  def decide(self, path: str, leaf: Any) -> _predicates.Decision:
    for lookup in self._lookup:
      if path in lookup:
        return _predicates.Decision(False, f"excluded: in a {lookup[path]} module")
    return _predicates.Decision(True, "not in an excluded module type")

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    if self.allow_unmatched:
      return []
    present = set(paths)
    known = set().union(*self.owned)
    if known and not known & present:
      problem = (
          f"{self!r} was built from a {self.model_name} whose parameter paths "
          f"(e.g. {min(known)!r}) are not in the tree being masked "
          f"(e.g. {sorted(present)[:1]}): build it from the model you optimize"
      )
      return [problem]
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


def exclude_module_types(
    model: nnx.Module,
    *types: TypeRule,
    allow_unmatched: bool = False,
    wrt: Any = nnx.Param,
) -> _predicates.Predicate:
  """Decay every parameter except those that belong to modules of ``types``.

  The HF Trainer rule by type (``get_parameter_names(model, [nn.LayerNorm])``),
  for Flax nnx models: the parameter paths owned by every module that is an
  instance of one of ``types`` (directly or through its submodules) are read
  from the model graph (``nnx.iter_modules``) once, here, so the predicate
  works whatever the attributes are called (``ln_1``, ``attn_norm``, ...) and
  for stacked (``nnx.vmap``) layers, whose norm scales are 2-D. The paths are
  those of ``nnx.state(model, wrt)``, which ``nnx.Optimizer`` hands to the
  transform at ``init`` (as Variables) and at ``update`` (as arrays).

  Args:
    model: the nnx model whose parameters will be masked.
    *types: module classes (``nnx.LayerNorm``, ``nnx.Embed``, your own
      ``RMSNorm``...), or tuples of classes that count as one rule.
    allow_unmatched: if False (default), a rule whose types own no parameter
      is a ``ValueError`` here, and again when the mask is resolved on a tree
      that lacks those parameters.
    wrt: the nnx filter of the optimized variables (``nnx.Optimizer``'s ``wrt``).

  Returns:
    A frozen, printable :class:`optax_decoupled.Predicate`; combine it with
    name rules, e.g. ``odf.exclude_module_types(model, nnx.LayerNorm) &
    od.exclude_names("bias")``.

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
  if not isinstance(model, nnx.Module):
    raise TypeError(
        "exclude_module_types(model, *types) needs the nnx model as first argument "
        f"(got {type(model).__name__}). For linen parameter trees use name rules, "
        "e.g. od.exclude_names(*od.BERT_EXCLUDE)."
    )
  rules = _normalize_type_rules(types)
  all_paths, owners = _param_owners_by_rule(model, rules, wrt)
  pred = _ModuleTypes(rules, owners, type(model).__name__, allow_unmatched)
  problems = pred.unmatched(all_paths)
  if problems:
    raise ValueError(
        "Weight-decay mask " + "; ".join(problems) + f" of {type(model).__name__}. "
        "Name the module classes your model uses, or pass allow_unmatched=True."
    )
  return pred


def bert_mask() -> _predicates.Predicate:
  """BERT's preset: no decay on any path containing LayerNorm/layer_norm or bias.

  ``od.exclude_names(*od.BERT_EXCLUDE)``: google-research/bert's
  ``_do_use_weight_decay`` (``re.search`` of "LayerNorm", "layer_norm",
  "bias"), with the two norm spellings as one rule. Purely by name: nnx
  attributes and linen submodules must be *called* ``LayerNorm...`` or
  ``layer_norm...`` (linen's automatic ``LayerNorm_0`` is), else the rule is
  unmatched and resolving it raises. Stacking does not matter (names only).

  Example:
    >>> import jax.numpy as jnp, optax_decoupled.flax as odf
    >>> odf.bert_mask()({"layer_norm": {"scale": jnp.ones(2)}, "dense": {"bias": jnp.ones(2),
    ...                  "kernel": jnp.ones((2, 2))}})
    {'dense': {'bias': False, 'kernel': True}, 'layer_norm': {'scale': False}}
  """
  return _predicates.exclude_names(*_predicates.BERT_EXCLUDE)


def hf_trainer_mask(
    model: nnx.Module,
    norm_types: TypeRule = NORM_TYPES,
    *,
    allow_unmatched: bool = False,
    wrt: Any = nnx.Param,
) -> _predicates.Predicate:
  """HF Trainer's preset: no decay on norm layers (by type) and on biases (by name).

  ``exclude_module_types(model, norm_types) & od.exclude_names("bias")``, the
  rule of ``transformers.Trainer.get_decay_parameter_names``
  (``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` minus names containing
  "bias"). ``norm_types`` is one rule of alternatives: the check passes when
  the model has any of them; add your own norm classes, e.g.
  ``(*odf.NORM_TYPES, MyRMSNorm)``. Embeddings are decayed, as in HF. Stacked
  layers are handled: membership is by module type, not by ndim.

  Example:
    >>> from flax import nnx
    >>> import optax_decoupled as od, optax_decoupled.flax as odf
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.norm = nnx.RMSNorm(2, rngs=rngs)
    ...     self.dense = nnx.Linear(2, 2, rngs=rngs)
    >>> model = Net(nnx.Rngs(0))
    >>> mask = odf.hf_trainer_mask(model)
    >>> nnx.to_pure_dict(od.resolve_mask(nnx.state(model, nnx.Param), mask))
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
  """
  types = norm_types if isinstance(norm_types, type) else tuple(norm_types)
  return exclude_module_types(
      model, types, allow_unmatched=allow_unmatched, wrt=wrt
  ) & _predicates.exclude_names("bias", allow_unmatched=allow_unmatched)


def nanogpt_mask(
    model: nnx.Module | None = None,
    norm_types: TypeRule = NORM_TYPES,
    *,
    wrt: Any = nnx.Param,
) -> _predicates.Predicate:
  """nanoGPT/timm preset: decay tensors of >= 2 dims only, safe for stacked layers.

  nanoGPT (``configure_optimizers``: ``p.dim() >= 2``) and timm
  (``param_groups_weight_decay``: no decay if ``ndim <= 1`` or the name ends in
  ``.bias``) decide by ndim, which breaks for stacked/scanned layers: a stacked
  LayerNorm scale or bias is 2-D. This preset is therefore
  ``od.min_ndim(2) & <not a norm parameter> & <not a bias>``: on unstacked
  models it equals nanoGPT's rule (norm scales and biases are 1-D anyway); on
  stacked ones it still excludes them. Norm parameters are found by module
  type when ``model`` (nnx) is given, else by name (linen trees: any path
  containing "norm", case-insensitive, or an ``ln_*`` module). The extra rules
  may match nothing (``allow_unmatched``), since nanoGPT's rule needs no names.
  A stacked 1-D parameter of another kind (a custom gain) is still decayed:
  exclude it by name or type.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled.flax as odf
    >>> stacked = {"LayerNorm_0": {"scale": jnp.ones((4, 8))}, "Dense_0": {
    ...            "kernel": jnp.ones((4, 8, 8)), "bias": jnp.ones((4, 8))}}
    >>> odf.nanogpt_mask()(stacked)
    {'Dense_0': {'bias': False, 'kernel': True}, 'LayerNorm_0': {'scale': False}}
  """
  if model is None:
    norm = _predicates.exclude_names(_NORM_NAMES, allow_unmatched=True)
  else:
    types = norm_types if isinstance(norm_types, type) else tuple(norm_types)
    norm = exclude_module_types(model, types, allow_unmatched=True, wrt=wrt)
  return _predicates.min_ndim(2) & norm & _predicates.exclude_names("bias", allow_unmatched=True)


