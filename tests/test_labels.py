"""Labels for optax.multi_transform from predicates, and per-group lr multipliers.

Oracles: optax itself. ``optax.multi_transform`` given ``labels(...)`` must follow the
same trajectory as ``optax.multi_transform`` given the label tree written out by hand
below; under ``nnx.Optimizer`` (init sees Variables, update arrays) it must follow the plain
optax loop with the hand-written labels dict. ``scale_by_lr_multipliers`` must equal
``optax.multi_transform`` of ``optax.scale(m)`` per group (big_vision's
``optax.masked(optax.scale(mult), mask)``), and be the identity, bitwise, for m = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_decoupled as od
import optax_decoupled.flax as odf
from optax_decoupled import Labels, labels, scale_by_lr_multipliers

STEPS = 4


def make_params(seed: int = 0) -> dict:
  k = iter(jax.random.split(jax.random.PRNGKey(seed), 9))
  n = lambda *shape: jax.random.normal(next(k), shape)  # noqa: E731
  return {
      "embed": {"embedding": n(10, 4)},
      "block": {"attn": {"kernel": n(4, 4), "bias": n(4)},
                "layer_norm": {"scale": n(4), "bias": n(4)},
                "mlp": {"kernel": n(4, 8), "bias": n(8)}},
      "head": {"kernel": n(4, 10), "bias": n(10)},
  }


HIDDEN = od.min_ndim(2) & od.exclude_names("embed", "^head/")
#: The split rule "ndim 2, not the embedding, not the head; the rest to adam", by hand.
HAND = {
    "embed": {"embedding": "adam"},
    "block": {"attn": {"kernel": "muon", "bias": "adam"},
              "layer_norm": {"scale": "adam", "bias": "adam"},
              "mlp": {"kernel": "muon", "bias": "adam"}},
    "head": {"kernel": "adam", "bias": "adam"},
}


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_labels_from_predicates_and_default():
  assert labels({"muon": HIDDEN}, default="adam")(make_params()) == HAND


def test_first_taking_rule_wins():
  params = make_params()
  lab = labels({"norm": od.include_names("layer_norm"), "vectors": ~od.min_ndim(2)},
               default="rest")
  out = lab(params)
  assert out["block"]["layer_norm"] == {"scale": "norm", "bias": "norm"}  # not "vectors"
  assert out["block"]["attn"]["bias"] == out["head"]["bias"] == "vectors"
  assert out["embed"]["embedding"] == out["head"]["kernel"] == "rest"
  reordered = labels({"vectors": ~od.min_ndim(2), "norm": od.include_names("layer_norm")},
                     default="rest", allow_unmatched=True)
  assert reordered(params)["block"]["layer_norm"] == {"scale": "vectors", "bias": "vectors"}


def test_rule_that_takes_nothing_is_an_error():
  params = make_params()
  with pytest.raises(ValueError, match=r"rule 'big' \(min_ndim\(3\)\) selects no parameter"):
    labels({"big": od.min_ndim(3), "muon": HIDDEN}, default="adam")(params)
  lab = labels({"big": od.min_ndim(3), "muon": HIDDEN}, default="adam", allow_unmatched=True)
  assert lab(params) == HAND


def test_shadowed_rule_is_an_error():
  params = make_params()
  lab = labels({"mats": od.min_ndim(2), "kernels": od.include_names("kernel$")}, default="x")
  with pytest.raises(ValueError, match=r"rule 'kernels' .* only selects parameters that "
                     r"earlier rules \['mats'\] already took \(the first rule wins\)"):
    lab(params)


def test_untaken_leaf_without_default_names_the_leaves():
  with pytest.raises(ValueError, match=r"no rule takes 5 of 9 parameters: 'block/attn/bias'"
                     r".*'head/bias'.*default="):
    labels({"muon": HIDDEN, "embed": od.include_names("embed"),
            "head": od.include_names("^head/kernel")})(make_params())
  full = labels({"mats": od.min_ndim(2), "vectors": ~od.min_ndim(2)})(make_params())
  assert full["head"] == {"kernel": "mats", "bias": "vectors"}


def test_name_typo_inside_a_predicate_is_reported_with_the_rule():
  lab = labels({"muon": od.min_ndim(2) & od.exclude_names("embd", "^head/")}, default="adam")
  with pytest.raises(ValueError, match=r"labels\(\): rule 'muon': pattern 'embd' of .* "
                     r"matches no parameter\. Closest paths: \['embed/embedding'"):
    lab(make_params())


def test_bad_rules_are_refused_at_construction():
  with pytest.raises(TypeError, match="predicate factory od.min_ndim"):
    labels({"a": od.min_ndim})
  with pytest.raises(TypeError, match="a rule is a predicate"):
    labels({"a": lambda params: params})
  with pytest.raises(TypeError, match="dict"):
    labels([("a", HIDDEN)])
  with pytest.raises(ValueError, match="at least one rule"):
    labels({})
  with pytest.raises(TypeError, match="default must be a str"):
    labels({"a": HIDDEN}, default=0)


def test_labels_is_frozen_hashable_printable_not_a_pytree_nor_a_bool():
  lab = labels({"muon": HIDDEN}, default="adam")
  assert lab == labels({"muon": HIDDEN}, default="adam")
  assert hash(lab) == hash(labels({"muon": HIDDEN}, default="adam"))
  assert repr(lab) == ("labels({'muon': (min_ndim(2) & exclude_names('embed', '^head/'))}, "
                       "default='adam')")
  assert isinstance(lab, Labels) and jax.tree_util.tree_leaves(lab) == [lab]
  with pytest.raises(AttributeError):
    lab.default = "x"
  with pytest.raises(TypeError, match="label function for optax.multi_transform"):
    bool(lab)
  with pytest.raises(TypeError, match="step count"):
    lab(jnp.asarray(3))


def _run(tx, params, steps=STEPS):
  state = tx.init(params)
  out = []
  for t in range(steps):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)) + 0.1 * p, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def _transforms():
  return {"muon": optax.contrib.muon(1e-2, weight_decay=0.1),
          "adam": od.adamw(1e-2, weight_decay=0.1, mask=odf.bert_mask())}


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_multi_transform_with_labels_equals_hand_written_labels():
  params = make_params()
  got = _run(optax.multi_transform(_transforms(), labels({"muon": HIDDEN}, default="adam")),
             params)
  want = _run(optax.multi_transform(_transforms(), HAND), params)
  for g, w in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  assert not np.array_equal(got[-1]["block"]["attn"]["kernel"], params["block"]["attn"]["kernel"])


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(4, rngs=rngs)
    self.mlp = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, tokens):
    return self.head(jax.nn.gelu(self.mlp(self.layer_norm(self.embed(tokens)))))


NET_HAND = {"embed": {"embedding": "adam"}, "layer_norm": {"scale": "adam", "bias": "adam"},
            "mlp": {"kernel": "muon", "bias": "adam"}, "head": {"kernel": "adam", "bias": "adam"}}


def _loss(model, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(model(tokens), tokens).mean()


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_nnx_optimizer_init_with_variables_update_with_arrays():
  model = Net(nnx.Rngs(0))
  hidden = (od.min_ndim(2) & odf.exclude_module_types(model, nnx.Embed)
            & od.exclude_names("^head/"))
  lab = labels({"muon": hidden}, default="adam")
  state = nnx.state(model, nnx.Param)
  assert nnx.to_pure_dict(lab(state)) == NET_HAND  # Variables, as tx.init sees them
  assert lab(nnx.to_pure_dict(state)) == NET_HAND  # arrays, as tx.update sees them

  # oracle: plain optax on the pure dict of arrays with the hand-written labels.
  tokens = jnp.arange(12) % 10
  params = nnx.to_pure_dict(state)
  tx = optax.multi_transform(_transforms(), NET_HAND)
  opt_state = tx.init(params)
  graphdef = nnx.graphdef(model)
  rest = nnx.state(model, nnx.Not(nnx.Param))

  def loss_of(p):
    st = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(st, p)
    return _loss(nnx.merge(graphdef, st, rest), tokens)

  @jax.jit
  def optax_step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss_of)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @nnx.jit
  def nnx_step(model, optimizer):
    optimizer.update(model, nnx.grad(_loss)(model, tokens))

  optimizer = nnx.Optimizer(model, optax.multi_transform(_transforms(), lab), wrt=nnx.Param)
  for _ in range(STEPS):
    params, opt_state = optax_step(params, opt_state)
    nnx_step(model, optimizer)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, params)


def test_describe_lists_every_leaf_with_totals_per_label():
  params = make_params()
  text = labels({"muon": HIDDEN}, default="adam").describe(params)
  lines = text.splitlines()
  assert lines[0].startswith("labels: labels({'muon'")
  assert lines[1].split() == ["path", "shape", "label", "rule"]
  rows = {line.split()[0]: line for line in lines[3:3 + 9]}
  paths = [p for p, _ in od._paths.leaves_with_paths(params)]
  assert sorted(rows) == sorted(paths)
  assert "(4, 8)" in rows["block/mlp/kernel"] and " muon " in rows["block/mlp/kernel"]
  assert "default (muon: excluded by '^head/')" in rows["head/kernel"]
  assert lines[-2:] == ["muon: 2 of 9 leaves, 48 of 158 parameters",
                        "adam: 7 of 9 leaves, 110 of 158 parameters"]


LR_RULES = [("head/.*", 0.1), (".*/bias", 0.5), ("embed/.*", 0.0)]
LR_HAND = {
    "embed": {"embedding": "zero"},
    "block": {"attn": {"kernel": "one", "bias": "half"},
              "layer_norm": {"scale": "one", "bias": "half"},
              "mlp": {"kernel": "one", "bias": "half"}},
    "head": {"kernel": "tenth", "bias": "tenth"},
}


def test_lr_multipliers_equal_optax_scale_per_group():
  params = make_params()
  got = _run(optax.chain(od.adamw(1e-2, weight_decay=0.1),
                         scale_by_lr_multipliers(LR_RULES)), params)
  groups = {"one": optax.scale(1.0), "half": optax.scale(0.5), "tenth": optax.scale(0.1),
            "zero": optax.scale(0.0)}
  want = _run(optax.chain(od.adamw(1e-2, weight_decay=0.1),
                          optax.multi_transform(groups, LR_HAND)), params)
  for g, w in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  np.testing.assert_array_equal(got[-1]["embed"]["embedding"], params["embed"]["embedding"])


def test_lr_multiplier_one_is_bitwise_identity_and_state_is_empty():
  tx = scale_by_lr_multipliers([("head/.*", 1.0)], default=1.0)
  updates = {"head": {"kernel": jnp.array([1e-30, -0.0, jnp.nan, 3.0], jnp.bfloat16)},
             "body": jnp.array([jnp.inf, 1e-45], jnp.float32)}
  state = tx.init(updates)
  assert state == optax.EmptyState()
  out, new_state = tx.update(updates, state)
  assert out["head"]["kernel"] is updates["head"]["kernel"] and out["body"] is updates["body"]
  jitted, _ = jax.jit(tx.update)(updates, state)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(updates)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  zero = scale_by_lr_multipliers([("head/.*", 0.0)])
  out, _ = zero.update({"head": {"k": jnp.ones(2)}, "b": jnp.ones(2)}, optax.EmptyState())
  assert out["head"]["k"].tolist() == [0.0, 0.0] and out["b"].tolist() == [1.0, 1.0]


def test_lr_multiplier_errors_name_the_transform():
  params = make_params()
  with pytest.raises(ValueError, match=r"scale_by_lr_multipliers\(\[\('heads/\.\*', 0\.1\)\], "
                     r"default=1\): rule 'heads/\.\*' fully matches no parameter path"):
    scale_by_lr_multipliers([("heads/.*", 0.1)]).init(params)
  with pytest.raises(ValueError, match=r"rule '\.\*/kernel' only matches paths an earlier"):
    scale_by_lr_multipliers([(".*kernel", 2.0), (".*/kernel", 0.5)]).init(params)
  tx = scale_by_lr_multipliers([("heads/.*", 0.1)], allow_unmatched=True)
  tx.init(params)
  with pytest.raises(ValueError, match=r"scale_by_lr_multipliers: multiplier of 'a': "
                     r"multiplier must be finite and >= 0"):
    scale_by_lr_multipliers([("a", -1.0)])
  with pytest.raises(TypeError, match=r"scale_by_lr_multipliers: rules must be a list"):
    scale_by_lr_multipliers("head/.*")


def test_inside_a_group_masked_leaves_count_for_the_checks():
  params = make_params()
  only_block = jax.tree.map(lambda _: False, params)
  only_block["block"] = jax.tree.map(lambda _: True, params["block"])
  # a multiplier rule for the head, which this group does not see, is not a typo:
  tx = optax.masked(scale_by_lr_multipliers([("head/.*", 0.1), ("block/mlp/.*", 0.5)]),
                    only_block)
  out, _ = tx.update(params, tx.init(params))
  assert out["head"]["kernel"] is params["head"]["kernel"]  # outside the group: untouched
  np.testing.assert_array_equal(out["block"]["mlp"]["kernel"],
                                0.5 * params["block"]["mlp"]["kernel"])
  # a label rule sees only its group; the error says so.
  inner = optax.multi_transform({"h": optax.sgd(1.0), "rest": optax.sgd(1.0)},
                                labels({"h": od.include_names("^head/")}, default="rest"))
  with pytest.raises(ValueError, match=r"rule 'h' .* selects no parameter.* sees only its own"):
    optax.masked(inner, only_block).init(params)
