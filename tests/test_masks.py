"""Masks from parameter-name and shape predicates (od.exclude_names & co.).

Oracle for the name rule: BERT's ``_do_use_weight_decay`` (google-research/bert,
optimization.py), transcribed in ``bert_decays`` below: a parameter decays unless
``re.search(r, name)`` finds one of the exclude patterns.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests.fixtures import bert_linen_params


def bert_decays(name: str, exclude=("LayerNorm", "layer_norm", "bias")) -> bool:
  """google-research/bert optimization.py, AdamWeightDecayOptimizer._do_use_weight_decay."""
  for r in exclude:
    if re.search(r, name) is not None:
      return False
  return True



def decisions(params, mask) -> dict[str, bool]:
  return {r.path: r.decay for r in od.describe_mask(params, mask).rows}


# --- BERT's rule on a BERT-shaped linen tree -------------------------------------------------


def test_bert_exclude_matches_bert_rule_on_every_leaf():
  params = bert_linen_params()
  got = decisions(params, od.exclude_names(*od.BERT_EXCLUDE))
  assert len(got) == len(jax.tree.leaves(params))
  for path, decay in got.items():
    assert decay == bert_decays(path), path
  # Sanity of the fixture: both kinds occur, LayerNorm scales and all biases are excluded.
  assert any(got.values()) and not all(got.values())
  assert got["embeddings/LayerNorm/scale"] is False
  assert got["encoder/layer_1/LayerNorm_1/scale"] is False
  assert got["pooler/bias"] is False
  assert got["encoder/layer_0/attention/query/kernel"] is True


def test_mask_tree_has_params_structure_and_python_bools():
  params = bert_linen_params()
  tree = od.exclude_names("bias")(params)
  assert jax.tree.structure(tree) == jax.tree.structure(params)
  assert all(type(x) is bool for x in jax.tree.leaves(tree))


def test_predicate_accepted_by_optax_masked_and_optax_adamw():
  params = bert_linen_params()
  mask = od.exclude_names(*od.BERT_EXCLUDE)
  grads = jax.tree.map(jnp.zeros_like, params)
  # optax.adamw with a callable mask: zero gradient, so the update is -lr*wd*θ on decayed leaves.
  tx = optax.adamw(0.1, weight_decay=0.5, mask=mask)
  updates, _ = tx.update(grads, tx.init(params), params)
  for (path, decay), u, p in zip(decisions(params, mask).items(), jax.tree.leaves(updates),
                                 jax.tree.leaves(params)):
    expected = -0.1 * 0.5 * p if decay else jnp.zeros_like(p)
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=path)
  # optax.masked with a predicate.
  tx = optax.masked(optax.scale(3.0), od.include_names("kernel$"))
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  for path, u in zip(decisions(params, None), jax.tree.leaves(updates)):
    assert float(u.ravel()[0]) == (3.0 if path.endswith("kernel") else 1.0), path


# --- the same paths on every kind of pytree --------------------------------------------------


class Pair(NamedTuple):
  weight: jax.Array
  bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
  weight: jax.Array
  bias: jax.Array


@pytest.mark.parametrize(
    "tree, expected",
    [
        ([jnp.ones((2, 2)), jnp.ones(2)], {"0": True, "1": True}),
        ((jnp.ones((2, 2)), {"bias": jnp.ones(2)}), {"0": True, "1/bias": False}),
        (Pair(jnp.ones((2, 2)), jnp.ones(2)), {"weight": True, "bias": False}),
        (Block(jnp.ones((2, 2)), jnp.ones(2)), {"weight": True, "bias": False}),
        ({"layers": [Pair(jnp.ones((2, 2)), jnp.ones(2))]},
         {"layers/0/weight": True, "layers/0/bias": False}),
    ],
    ids=["list", "tuple+dict", "namedtuple", "dataclass", "nested"],
)
def test_paths_on_plain_pytrees(tree, expected):
  assert decisions(tree, od.exclude_names("bias", allow_unmatched=True)) == expected


def test_frozendict_gives_same_paths_as_dict():
  flax_core = pytest.importorskip("flax.core")
  params = bert_linen_params()
  frozen = flax_core.freeze(params)
  mask = od.exclude_names(*od.BERT_EXCLUDE)
  assert decisions(frozen, mask) == decisions(params, mask)


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_equinox_module_paths():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_array)
  got = decisions(params, od.exclude_names("bias"))
  assert got == {
      "layers/0/weight": True,
      "layers/0/bias": False,
      "layers/1/weight": True,
      "layers/1/bias": False,
  }
  # The mask works inside a real update.
  tx = od.adamw(1e-2, weight_decay=0.1, mask=od.exclude_names("bias"))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates.layers[0].bias, 0.0)
  np.testing.assert_allclose(updates.layers[0].weight, -1e-3 * params.layers[0].weight, rtol=1e-6)


def test_equinox_module_as_mask_is_refused():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.Linear(2, 2, key=jax.random.PRNGKey(0))  # callable *and* a pytree
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(TypeError, match="both callable and a pytree"):
    od.resolve_mask(params, model)


def _nnx_model():
  nnx = pytest.importorskip("flax.nnx")

  class Tiny(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.LayerNorm = nnx.LayerNorm(4, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.LayerNorm(self.dense(x)))

  return nnx, Tiny(nnx.Rngs(0))


def test_nnx_state_paths_equal_at_init_and_update():
  nnx, model = _nnx_model()
  state = nnx.state(model, nnx.Param)  # leaves are Variables: key paths end in `.value`
  pure = nnx.as_pure(state)  # what nnx.Optimizer hands to tx.update
  mask = od.exclude_names(*od.BERT_EXCLUDE)
  at_init, at_update = decisions(state, mask), decisions(pure, mask)
  assert at_init == at_update
  assert at_init == {
      "LayerNorm/bias": False,
      "LayerNorm/scale": False,
      "dense/bias": False,
      "dense/kernel": True,
      "head/bias": False,
      "head/kernel": True,
  }


def test_nnx_optimizer_applies_name_mask():
  nnx, model = _nnx_model()
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(lambda x: np.array(x), nnx.as_pure(before))
  opt = nnx.Optimizer(model, od.adamw(0.1, weight_decay=0.5,
                                      mask=od.exclude_names(*od.BERT_EXCLUDE)), wrt=nnx.Param)
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(after["LayerNorm"]["scale"], before["LayerNorm"]["scale"])
  np.testing.assert_array_equal(after["dense"]["bias"], before["dense"]["bias"])
  np.testing.assert_allclose(after["dense"]["kernel"], before["dense"]["kernel"] * (1 - 0.05),
                             rtol=1e-6)


# --- refusing to fail silently ---------------------------------------------------------------


def test_typo_pattern_is_an_error_naming_pattern_and_closest_paths():
  params = bert_linen_params()
  with pytest.raises(ValueError) as info:
    od.exclude_names("LayerNrom", "bias")(params)
  msg = str(info.value)
  assert "'LayerNrom'" in msg and "matches no parameter" in msg
  assert "LayerNorm" in msg.split("Closest paths:")[1]
  assert "allow_unmatched=True" in msg


def test_closest_paths_of_alternative_spellings_are_each_named_once():
  """A tuple of spellings that all miss: each suggested path appears once."""
  params = {"norm": {"weight": jnp.ones(3), "bias": jnp.ones(3)}, "lin": {"weight": jnp.ones(3)}}
  with pytest.raises(ValueError, match="matches no parameter") as info:
    od.exclude_names(("LayerNorm", "layer_norm"))(params)
  close = re.search(r"Closest paths: \[([^\]]*)\]", str(info.value)).group(1).split(", ")
  assert close and len(close) == len(set(close)), close


def test_typo_is_raised_at_init_of_a_transform():
  params = bert_linen_params()
  tx = od.adamw(1e-3, mask=od.exclude_names("layernorm"))  # wrong case: matches nothing
  with pytest.raises(ValueError, match="'layernorm'"):
    tx.init(params)


def test_alternative_spellings_count_as_one_rule():
  params = bert_linen_params()  # uses "LayerNorm", never "layer_norm"
  od.exclude_names(("LayerNorm", "layer_norm"), "bias")(params)  # no error
  with pytest.raises(ValueError, match="'layer_norm'"):
    od.exclude_names("LayerNorm", "layer_norm", "bias")(params)  # flat: strict per pattern
  # allow_unmatched silences the check.
  od.exclude_names("LayerNorm", "layer_norm", "bias", allow_unmatched=True)(params)


def test_mask_that_decays_nothing_warns():
  params = {"bias": jnp.ones(2), "scale": jnp.ones(2)}
  with pytest.warns(UserWarning, match="decays no parameter"):
    od.resolve_mask(params, od.exclude_names("bias", "scale"))


def test_mask_that_decays_every_leaf_including_1d_warns():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  with pytest.warns(UserWarning, match="including 1-D"):
    od.resolve_mask(params, {"kernel": True, "bias": True})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    od.resolve_mask(params, None)  # None is the explicit "decay everything"
    od.resolve_mask({"kernel": jnp.ones((2, 2))}, od.min_ndim(2))  # nothing 1-D to worry about


def test_mask_structure_mismatch_is_an_error():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  with pytest.raises(ValueError, match="structure of the parameters"):
    od.resolve_mask(params, {"kernel": True})


def test_traced_mask_leaf_is_an_error():
  params = {"kernel": jnp.ones((2, 2))}

  @jax.jit
  def f(flag):
    return od.resolve_mask(params, {"kernel": flag})

  with pytest.raises(TypeError, match="resolved at trace"):
    f(jnp.bool_(True))


def test_invalid_regex_is_an_error_at_construction():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    od.exclude_names("LayerNorm[")


# --- predicates: small frozen, printable, combinable types ----------------------------------


def test_predicates_are_hashable_printable_and_not_pytrees():
  p = od.exclude_names(*od.BERT_EXCLUDE) & ~od.include_names("embedding") | od.min_ndim(3)
  assert repr(p) == (
      "((exclude_names(('LayerNorm', 'layer_norm'), 'bias') & ~include_names('embedding'))"
      " | min_ndim(3))"
  )
  assert hash(p) == hash(od.exclude_names(*od.BERT_EXCLUDE) & ~od.include_names("embedding")
                         | od.min_ndim(3))
  assert jax.tree.leaves(p) == [p]  # a leaf, never a container of arrays
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.left = None  # type: ignore[misc]


def test_combinators_follow_boolean_algebra():
  params = bert_linen_params()
  a, b = od.exclude_names(*od.BERT_EXCLUDE), od.min_ndim(2)
  da, db = decisions(params, a), decisions(params, b)
  assert decisions(params, a & b) == {k: da[k] and db[k] for k in da}
  assert decisions(params, a | b) == {k: da[k] or db[k] for k in da}
  assert decisions(params, ~a) == {k: not da[k] for k in da}
  # min_ndim: the embedding (2-D) decays, biases and scales (1-D) do not.
  assert db["embeddings/word_embeddings/embedding"] and not db["pooler/bias"]


def test_combining_with_a_non_predicate_is_a_type_error():
  with pytest.raises(TypeError, match="only with other predicates"):
    od.exclude_names("bias") & (lambda path: True)


# --- describe_mask ---------------------------------------------------------------------------


def test_describe_mask_table_content():
  params = {
      "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
      "LayerNorm_0": {"scale": jnp.ones(3, jnp.bfloat16)},
  }
  report = od.describe_mask(params, od.exclude_names(("LayerNorm", "layer_norm"), "bias"))
  lines = str(report).splitlines()
  assert lines[0] == "mask: exclude_names(('LayerNorm', 'layer_norm'), 'bias')"
  assert lines[1].split() == ["path", "shape", "dtype", "decay", "rule"]
  body = {line.split()[0]: line for line in lines[3:6]}
  assert body["Dense_0/kernel"].split()[1:5] == ["(4,", "3)", "float32", "yes"]
  assert body["Dense_0/kernel"].endswith("no exclude pattern matched")
  assert body["Dense_0/bias"].endswith("excluded by 'bias'")
  assert "bfloat16" in body["LayerNorm_0/scale"]
  assert body["LayerNorm_0/scale"].endswith("excluded by ('LayerNorm', 'layer_norm')")
  # Totals: 1 of 3 leaves, 12 of 18 parameters decayed.
  assert lines[-1] == ("decayed: 1 of 3 leaves, 12 of 18 parameters; "
                       "not decayed: 2 leaves, 6 parameters")
  assert [r.path for r in report.decayed] == ["Dense_0/kernel"]


def test_describe_mask_raises_the_mask_errors():
  with pytest.raises(ValueError, match="matches no parameter"):
    od.describe_mask({"w": jnp.ones(2)}, od.exclude_names("bias"))


# --------------------------------------------------------------------- one rule layer


def _named_tree():
  return {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
          "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}


def _decayed(tree, mask):
  return {r.path for r in od.describe_mask(tree, mask).rows if r.decay}


def _timm(patterns):
  odf = pytest.importorskip("optax_decoupled.flax")
  return odf.timm_mask(patterns, allow_unmatched=False)


# Every entry point that takes a list of name patterns, given a bare string, then (the
# oracle) the one-element list.
_BARE_STRING = {
    "exclude_names": (lambda s: od.exclude_names(s), lambda s: od.exclude_names(*[s])),
    "exclude_names-alternatives": (lambda s: od.exclude_names(("bias", s)),
                                   lambda s: od.exclude_names(("bias", *[s]))),
    "include_names": (lambda s: od.include_names(s), lambda s: od.include_names(*[s])),
    "timm_mask": (lambda s: _timm("*." + s), lambda s: _timm(["*." + s])),
}


@pytest.mark.parametrize("entry", sorted(_BARE_STRING))
def test_a_bare_string_is_one_pattern(entry):
  tree = _named_tree()
  as_string, as_list = _BARE_STRING[entry]
  got = _decayed(tree, as_string("bias"))
  assert got == _decayed(tree, as_list("bias"))
  # Read as the letters b, i, a, s it would select (or exclude) nearly everything.
  assert ("dense/bias" in got) == (entry == "include_names")
  assert ("dense/kernel" in got) != (entry == "include_names")


def test_pattern_list_arguments_refuse_what_is_not_a_pattern_naming_the_fix():
  with pytest.raises(TypeError, match=r"write od\.include_names\('bias'\)"):
    od.labels({"muon": "bias"}, default="adam")
  with pytest.raises(TypeError, match=r"the one pair \('head', 2\.0\).*write \[\('head', 2\.0\)\]"):
    od.decay_multipliers(("head", 2.0), default=0.0)
  with pytest.raises(TypeError, match=r"scale_by_lr_multipliers: rules must be a list.*one pair"):
    od.scale_by_lr_multipliers(("head/.*", 0.1))
  with pytest.raises(TypeError, match="rules must be a list"):
    od.decay_multipliers("head", default=0.0)
  with pytest.raises(TypeError, match="regular expressions"):
    od.exclude_names(b"bias")
  with pytest.raises(TypeError, match="exclude takes a pattern"):
    od.bert_adamw(1e-3, exclude=3)


def test_decision_is_one_type_through_every_rule_set():
  """Predicates, multipliers and boolean trees all report od.Decision, with path and leaf."""
  tree = _named_tree()
  paths = ["dense/bias", "dense/kernel", "head/bias", "head/kernel"]
  bools = {"dense": {"kernel": True, "bias": False}, "head": {"kernel": True, "bias": False}}
  for mask in (od.exclude_names("bias"), od.decay_multipliers([("head/.*", 2.0)], default=1.0),
               bools, None):
    assert [r.path for r in od.describe_mask(tree, mask).rows] == paths
  decisions = od.exclude_names("bias").decisions(tree)
  assert all(type(d) is od.Decision for d in decisions)
  assert [(d.path, d.decay) for d in decisions] == list(zip(paths, [False, True] * 2))
  assert decisions[1].leaf is tree["dense"]["kernel"]
  weighted = od.decay_multipliers([("head/.*", 2.0)], default=0.0).decisions(tree)
  assert all(type(d) is od.Decision and d.weighted for d in weighted)
  assert [d.multiplier for d in weighted] == [0.0, 0.0, 2.0, 2.0]
  assert od.Decision(True, "r") == od.Decision(True, "r")  # what a predicate's decide() returns
  with pytest.raises(ValueError, match="disagrees"):
    od.Decision(True, "r", weight=0.0)


def test_multipliers_inside_optax_masked_see_the_other_group_paths():
  """Inside optax.masked the inner transform sees MaskedNode for the other group; a rule that
  matches a leaf of that group is not unmatched (as for predicates), and the leaves it sees
  decay as optax.masked(optax.add_decayed_weights) does. A rule that matches nothing at all
  still fails, with the group hint."""
  tree = _named_tree()
  outer = {"dense": {"kernel": True, "bias": True}, "head": {"kernel": False, "bias": False}}
  mults = od.decay_multipliers([("head/.*", 2.0), ("dense/kernel", 1.0)], default=0.0)
  ours = optax.masked(od.add_decoupled_decay(0.5, mask=mults), outer)
  ref = optax.masked(optax.add_decayed_weights(
      0.5, mask={"dense": {"kernel": True, "bias": False}, "head": {"kernel": True,
                                                                  "bias": True}}), outer)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  u1, _ = ours.update(zeros, ours.init(tree), tree)
  u2, _ = ref.update(zeros, ref.init(tree), tree)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)
  typo = od.decay_multipliers([("heads/.*", 2.0)], default=1.0)
  with pytest.raises(ValueError, match="fully matches no parameter.*sees only its own group"):
    optax.masked(od.add_decoupled_decay(0.5, mask=typo), outer).init(tree)


def test_step_count_guard_names_the_static_argument():
  """optax.inject_hyperparams calls callables with the step count: the error names the
  static_args entry of the argument that was mistaken for a schedule."""
  tree = _named_tree()
  lab = od.labels({"head": od.include_names("head")}, default="body")
  tx = optax.inject_hyperparams(optax.multi_transform)(
      {"head": optax.sgd(0.1), "body": optax.sgd(0.1)}, param_labels=lab)
  with pytest.raises(TypeError, match=r"static_args=\('param_labels',\)"):
    tx.init(tree)
  tx = optax.inject_hyperparams(optax.adamw)(1e-3, mask=od.exclude_names("bias"))
  with pytest.raises(TypeError, match=r"static_args=\('mask',\)"):
    tx.init(tree)


@pytest.mark.parametrize("fn", [od.resolve_mask, od.describe_mask], ids=lambda f: f.__name__)
@pytest.mark.parametrize("mask", [od.min_ndim(2), od.exclude_names("bias"), od.min_ndim,
                                  od.decay_multipliers([("a", 1.0)], default=0.0)],
                         ids=["predicate", "names", "factory", "multipliers"])
def test_swapped_params_and_mask_say_the_argument_order(fn, mask):
  """fn(mask, params) read the mask as a one-leaf parameter tree and the params as its mask
  ("the mask leaf at '' is {...}"); the error now names the order."""
  params = {"a": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"the arguments are \(params, mask\)"):
    fn(mask, params)


@pytest.mark.parametrize("pattern", ["", "bias|", ".*", "(?i)", ("LayerNorm", "")])
@pytest.mark.parametrize("factory", [od.exclude_names, od.include_names],
                         ids=lambda f: f.__name__)
def test_a_pattern_that_matches_every_path_is_refused(factory, pattern):
  """re.search of a pattern that matches the empty string succeeds on every path, so the
  rule would decide every leaf alike (exclude_names('') silently decayed nothing)."""
  with pytest.raises(ValueError, match="matches every path"):
    factory(pattern)
  # The anchored empty path (a bare-array parameter tree) is a real pattern.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # a one-leaf mask decays all or nothing.
    assert factory("^$")(jnp.ones(3)) is (factory is od.include_names)


@pytest.mark.parametrize("value", ["False", 1, None])
@pytest.mark.parametrize("factory", [od.exclude_names, od.include_names],
                         ids=lambda f: f.__name__)
def test_allow_unmatched_is_a_bool(factory, value):
  """A truthy non-bool (the string "False") silently turned the unmatched-pattern check
  off, and the repr then claimed allow_unmatched=True."""
  with pytest.raises(TypeError, match="allow_unmatched must be True or False"):
    factory("bias", allow_unmatched=value)
