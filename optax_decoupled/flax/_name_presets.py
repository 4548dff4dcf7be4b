"""Presets that decide from names and shapes alone, named after the codebases they follow.

Each is that codebase's current rule, transcribed from the source file its docstring cites,
and works on any parameter tree (dicts, linen, nnx state): no model is needed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from optax_decoupled import _paths, _predicates, _rules

__all__ = ["bert_mask", "nanogpt_mask", "timm_mask"]


def bert_mask(*, allow_unmatched: bool = False) -> _predicates.Predicate:
  """BERT's preset: no decay on any path containing LayerNorm/layer_norm or bias.

  google-research/bert optimization.py, ``AdamWeightDecayOptimizer._do_use_weight_decay``
  (``re.search`` of "LayerNorm", "layer_norm", "bias"), with the two norm spellings as one
  rule. Purely by name: nnx attributes and linen submodules must be *called*
  ``LayerNorm...`` or ``layer_norm...`` (linen's automatic ``LayerNorm_0`` is), else the
  norm rule is unmatched and resolving it raises, since a norm under another name would
  silently decay. The "bias" rule may match nothing: Flax (and Equinox) name every bias
  ``bias``, so a tree without one is a bias-free model, on which BERT's rule is the norm
  rule alone (a Haiku-style ``b`` is not a bias to this rule, nor to BERT's). Stacking
  does not matter (names only).

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Args:
    allow_unmatched: if True, a tree with no LayerNorm/layer_norm path (a model without
      norms) is not an error; the mask then excludes the biases only.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled.flax as odf
    >>> odf.bert_mask()({"layer_norm": {"scale": jnp.ones(2)}, "dense": {"bias": jnp.ones(2),
    ...                  "kernel": jnp.ones((2, 2))}})
    {'dense': {'bias': False, 'kernel': True}, 'layer_norm': {'scale': False}}
  """
  norm, bias = _predicates.BERT_EXCLUDE
  return (_predicates.exclude_names(norm, allow_unmatched=allow_unmatched)
          & _predicates.exclude_names(bias, allow_unmatched=True))


def nanogpt_mask() -> _predicates.Predicate:
  """nanoGPT's rule: decay a parameter iff it has at least 2 dimensions.

  karpathy/nanoGPT model.py, ``GPT.configure_optimizers``: ``decay_params = [p for n, p
  in param_dict.items() if p.dim() >= 2]``; this is ``od.min_ndim(2)``. Stacked
  (``nnx.vmap``/``nn.scan``) norm scales and biases are 2-D, so this rule decays them:
  use :func:`stacked_ndim_mask` for stacked layers.

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled.flax as odf
    >>> odf.nanogpt_mask()({"ln_f": {"scale": jnp.ones(2)}, "wte": jnp.ones((3, 2))})
    {'ln_f': {'scale': False}, 'wte': True}
  """
  return _predicates.min_ndim(2)


@dataclasses.dataclass(frozen=True)
class _Timm(_predicates.Predicate):
  no_weight_decay: tuple[str, ...] = ()
  allow_unmatched: bool = True

  def decide(self, path: str, leaf: Any) -> _rules.Decision:
    name = path.replace("/", ".")
    nd = int(np.ndim(_paths.leaf_value(leaf)))
    if nd <= 1:
      return _rules.Decision(False, f"excluded: ndim {nd} <= 1")
    if name.endswith(".bias"):
      return _rules.Decision(False, "excluded: name ends with '.bias'")
    for p in self.no_weight_decay:
      if fnmatch.fnmatch(name, p):
        return _rules.Decision(False, f"excluded: no_weight_decay {p!r}")
    return _rules.Decision(True, "ndim >= 2, not a bias, not in no_weight_decay")

  def unmatched(self, paths: Sequence[str]) -> list[str]:
    names = [p.replace("/", ".") for p in paths]
    return [] if self.allow_unmatched else [
        f"pattern {p!r} of {self!r} matches no parameter name (timm patterns match the "
        f"whole dotted name: for a nested parameter write '*.{p}')"
        for p in self.no_weight_decay if not any(fnmatch.fnmatch(n, p) for n in names)]

  def __repr__(self) -> str:
    args = [f"no_weight_decay={self.no_weight_decay!r}"] if self.no_weight_decay else []
    args += ["allow_unmatched=False"] if not self.allow_unmatched else []
    return f"timm_mask({', '.join(args)})"


def timm_mask(
    no_weight_decay: str | Collection[str] = (), *, allow_unmatched: bool = True
) -> _predicates.Predicate:
  """timm's rule: no decay on tensors of ndim <= 1, on ``*.bias`` and on listed names.

  timm/optim/_param_groups.py ``param_groups_weight_decay`` (what ``create_optimizer_v2``
  uses, with ``no_weight_decay_list=model.no_weight_decay()``): no decay if ``param.ndim
  <= 1 or name.endswith(".bias") or any(fnmatch(name, p) for p in no_weight_decay_list)``.
  ``name`` is the dotted path (``blocks/0/attn/qkv/kernel`` -> ``blocks.0.attn.qkv.kernel``)
  and ``fnmatch`` matches the *whole* name: ViT's ``{"pos_embed", "cls_token"}`` match
  top-level parameters only, so for a nested one write ``"*.relative_position_bias_table"``
  (swin's ``no_weight_decay()`` lists full names instead). Works on any tree (dicts, linen,
  nnx state); needs no model.

  Decay convention: none of its own (a mask); the optimizer it is given to keeps its own.

  Args:
    no_weight_decay: fnmatch patterns (a set, like ``model.no_weight_decay()``; the empty
      dict some timm models return counts as no pattern).
    allow_unmatched: True (default) ignores a pattern that matches no parameter, as timm
      does; False raises ``ValueError`` for it, when the mask is resolved.

  Example:
    >>> import jax.numpy as jnp, optax_decoupled.flax as odf
    >>> params = {"pos_embed": jnp.ones((1, 4, 2)), "head": {"kernel": jnp.ones((2, 3)),
    ...           "bias": jnp.ones(3)}}
    >>> odf.timm_mask({"pos_embed", "cls_token"})(params)
    {'head': {'bias': False, 'kernel': True}, 'pos_embed': False}
  """
  if isinstance(no_weight_decay, Mapping) and not no_weight_decay:
    no_weight_decay = ()  # timm's pvt_v2 returns {} from no_weight_decay(): no pattern
  patterns = _rules.patterns(no_weight_decay, "timm_mask()", "no_weight_decay")
  if not all(isinstance(p, str) for p in patterns):
    raise TypeError(f"timm_mask() takes fnmatch patterns (str); got {no_weight_decay!r}.")
  return _Timm(tuple(sorted(set(patterns))), bool(allow_unmatched))
