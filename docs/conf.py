"""Sphinx configuration of the optax_decoupled documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference (``api.md``) is generated at build time from ``optax_decoupled.__all__``
and ``optax_decoupled.flax.__all__``: every public name is documented, grouped by topic
(``_OD_GROUPS``/``_ODF_GROUPS`` below); a name the groups do not list lands in "Other", and
a listed name that is not public (yet) is skipped, so adding or removing a public name never
breaks the build.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys

sys.path.insert(0, os.path.abspath(".."))

import optax_decoupled  # noqa: E402

project = "optax_decoupled"
author = "optax_decoupled authors"
copyright = "optax_decoupled authors"  # noqa: A001
release = optax_decoupled.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

try:
  import furo  # noqa: F401

  html_theme = "furo"
except ImportError:  # the default theme, if furo is not installed
  html_theme = "alabaster"
html_title = "optax_decoupled"
html_static_path: list[str] = []

# ---------------------------------------------------------------------------------------
# The generated API reference.

# (section title, names). Order is the page's order; names missing from __all__ are skipped.
_OD_GROUPS = [
    ("Optimizers", ["adamw", "adam_l2", "sgdw", "sgd_l2", "bert_adamw"]),
    ("Transforms", ["add_l2_to_grad", "add_decoupled_decay", "scale_by_adam"]),
    ("Wrappers", ["with_decoupled_decay", "with_decay_toward", "stochastic_rounding"]),
    ("Decay conventions and setting λ",
     ["coupled_weight_decay", "CoupledWeightDecay", "COUPLINGS", "convert_weight_decay",
      "normalized_weight_decay", "weight_decay_from_timescale",
      "timescale_from_weight_decay"]),
    ("Masks and predicates",
     ["exclude_names", "include_names", "min_ndim", "BERT_EXCLUDE", "Predicate", "Decision",
      "resolve_mask", "describe_mask", "MaskReport", "MaskRow"]),
    ("Per-parameter multipliers and groups",
     ["decay_multipliers", "DecayMultipliers", "labels", "Labels",
      "scale_by_lr_multipliers"]),
    ("Layer-wise learning-rate decay", ["layer_decay", "LayerDecay", "scale_by_layer_decay"]),
    ("Auditing an optimizer", ["audit_decay", "DecayAudit", "DecayAuditRow"]),
    ("Schedules", ["cosine_warm_restarts_schedule"]),
    ("Performance", ["fused_step", "FlatLayout"]),
    ("States and warnings",
     ["WeightDecayState", "DecoupledDecayState", "DecayTowardState",
      "StochasticRoundingState", "LowPrecisionDecayWarning"]),
]
_ODF_GROUPS = [
    ("Presets and module-type masks",
     ["bert_mask", "hf_trainer_mask", "nanogpt_mask", "timm_mask", "norm_and_bias_mask",
      "stacked_ndim_mask", "exclude_module_types", "NORM_TYPES"]),
    ("Train steps", ["nnx_train_step", "linen_train_step"]),
    ("Checkpoints", ["save_checkpoint", "restore_checkpoint"]),
]
# Classes whose public methods and properties are worth listing.
_WITH_MEMBERS = {"FlatLayout", "DecayAudit", "MaskReport", "DecayMultipliers", "Predicate",
                 "CoupledWeightDecay", "Labels", "LayerDecay"}


def _attribute_doc(package, name: str, obj) -> str:
  """The ``#:`` comment documenting a module-level constant, from the module defining it."""
  from sphinx.pycode import ModuleAnalyzer

  modules = [package.__name__] + [
      f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
  for modname in modules:
    try:
      module = importlib.import_module(modname)
    except ImportError:
      continue
    if getattr(module, name, None) is not obj:
      continue
    try:
      docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # noqa: BLE001 - no source: no comment.
      continue
    lines = docs.get(("", name))
    if lines:
      return "\n".join(line for line in lines if line.strip())
  return ""


def _directive(package, name: str) -> str:
  """The reStructuredText that documents ``package.name``."""
  qualified = f"{package.__name__}.{name}"
  obj = getattr(package, name)
  if inspect.isclass(obj):
    options = "   :members:\n" if name in _WITH_MEMBERS else ""
    return f".. autoclass:: {qualified}\n{options}"
  if callable(obj):
    return f".. autofunction:: {qualified}\n"
  doc = _attribute_doc(package, name, obj) or f"The constant ``{name}``."
  body = "\n".join("   " + line for line in doc.splitlines())
  return f".. py:data:: {qualified}\n   :value: {obj!r}\n\n{body}\n"


def _section(package, groups, heading: str) -> str:
  public = list(package.__all__)
  missing = [n for n in public if not hasattr(package, n)]
  if missing:
    raise RuntimeError(f"{package.__name__}.__all__ lists names it does not define: {missing}")
  listed = {n for _, names in groups for n in names}
  sections = [(title, [n for n in names if n in public]) for title, names in groups]
  other = sorted(n for n in public if n not in listed)
  if other:
    sections.append(("Other", other))
  out = []
  for title, names in sections:
    if not names:
      continue
    out.append(f"{heading} {title}\n")
    rst = "\n".join(_directive(package, n) for n in names)
    out.append("```{eval-rst}\n" + rst + "```\n")
  return "\n".join(out)


def _fill_api(app, docname, source):
  if docname != "api":
    return
  import optax_decoupled.flax as odf

  text = source[0]
  text = text.replace("<!-- api:optax_decoupled -->", _section(optax_decoupled, _OD_GROUPS, "###"))
  text = text.replace("<!-- api:optax_decoupled.flax -->", _section(odf, _ODF_GROUPS, "###"))
  source[0] = text


def setup(app):
  app.connect("source-read", _fill_api)
  return {"parallel_read_safe": True}
