"""Layer-wise learning-rate decay: ``od.layer_decay`` and ``od.scale_by_layer_decay``.

Oracles:

* timm itself: ``timm.optim.param_groups_layer_decay`` on timm's ``VisionTransformer`` gives
  each parameter an ``lr_scale`` and a ``weight_decay``; torch's ``AdamW`` on those groups,
  with each group's ``lr = lr * lr_scale`` as timm's scheduler sets it, is the reference
  trajectory (``references.run_torch_param_groups``) for ``od.adamw`` chained with
  ``od.scale_by_layer_decay``;
* the named (unrolled) model: a stacked tree must give, slice by slice, exactly the
  trajectory of the same model with one leaf per layer;
* the formula :math:`\\gamma^{L+1-l}` written out here with the layer ids counted from the
  names (timm's and BEiT's convention), never read back from the code under test.

Tolerance of the torch comparison: float32 round-off, as in ``tests/test_aliases.py``: at
most ``T·eps·max|θ|`` after ``T`` steps (1.6e-5 on the 4-block ViT; the measured gap is
5.4e-6). Dropping the layer decay moves the trajectory by 0.67; the test asserts > 100× the
tolerance. timm is not a test extra (it pulls torchvision); the timm tests skip without it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests import references as R

T = 100
EPS32 = float(np.finfo(np.float32).eps)
LR, WD, GAMMA = 1e-2, 0.05, 0.75
BETAS, EPS = (0.9, 0.999), 1e-8

# timm's ViT as od rules (timm/models/vision_transformer.py ``group_matcher``: the stem
# ``^cls_token|reg_token|pos_embed|patch_embed`` is group 0, ``^blocks\.(\d+)`` the blocks,
# ``^norm`` joins the last block, anything else (the head) comes last).
VIT_EMBEDDINGS = r"(cls_token|reg_token|pos_embed|patch_embed/.*)"
VIT_BLOCKS = r"blocks/(\d+)/.*"
VIT_HEAD = r"head/.*"
# timm's no-decay rule (timm/optim/_param_groups.py): ndim <= 1, or a name in the model's
# ``no_weight_decay()`` (pos_embed, cls_token, ...).
VIT_MASK = od.min_ndim(2) & od.exclude_names(r"^(cls_token|pos_embed)$")


def vit_rules(depth: int) -> od.LayerDecay:
  return od.layer_decay(GAMMA, depth, embeddings=VIT_EMBEDDINGS, layers=VIT_BLOCKS,
                        at_layer={r"norm/.*": depth}, head=VIT_HEAD)


def expected_scale(name: str, depth: int, gamma: float) -> float:
  """γ**(L + 1 − l), the layer id l counted from the ViT's parameter name."""
  if re.match(r"(cls_token|pos_embed|patch_embed)", name):
    layer = 0
  elif m := re.match(r"blocks/(\d+)/", name):
    layer = int(m.group(1)) + 1
  elif name.startswith("norm/"):
    layer = depth
  else:
    layer = depth + 1
  return gamma ** (depth + 1 - layer)


def tolerance(reference: np.ndarray) -> float:
  return (reference.shape[0] - 1) * EPS32 * max(1.0, float(np.abs(reference).max()))


# --- against timm ------------------------------------------------------------------------------


def timm_groups_by_name(model, **kwargs) -> dict[str, tuple[float, float]]:
  timm = R.import_timm()
  groups = timm.optim.param_groups_layer_decay(
      model, no_weight_decay_list=model.no_weight_decay(), **kwargs)
  names = {id(p): n.replace(".", "/") for n, p in model.named_parameters()}
  return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.slow  # builds the 5.7M-parameter vit_tiny_patch16_224 (~10 s)
def test_scales_and_decay_mask_match_timm_vit_tiny():
  timm = R.import_timm()
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
  depth = len(model.blocks)
  timm_says = timm_groups_by_name(model, weight_decay=WD, layer_decay=GAMMA)
  tree = R.torch_named_parameters_tree(model)
  names = R.leaf_names(tree)
  assert sorted(names) == sorted(timm_says)
  mults = jax.tree.leaves(vit_rules(depth).multipliers(tree))
  decays = jax.tree.leaves(od.resolve_mask(tree, VIT_MASK))
  for name, mult, decay in zip(names, mults, decays):
    scale, wd = timm_says[name]
    assert mult == scale, name  # the same power of the same float
    assert (WD if decay else 0.0) == wd, name
  # The names spell the same scales (an oracle independent of timm and of od).
  assert [timm_says[n][0] for n in names] == [expected_scale(n, depth, GAMMA) for n in names]
  assert len({s for s, _ in timm_says.values()}) == depth + 2


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_torch_adamw_on_timm_groups_matches_od_100_steps():
  timm = R.import_timm()
  import torch

  torch.manual_seed(0)
  depth = 4
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=8, patch_size=4, embed_dim=8, depth=depth, num_heads=2, num_classes=5)
  with torch.no_grad():  # timm zero-initialises biases and the head: spread every leaf.
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  tree = R.torch_named_parameters_tree(model)
  names = R.leaf_names(tree)
  grad_fn = R.quadratic_grad_fn(tree, seed=3)
  groups = timm.optim.param_groups_layer_decay(
      model, weight_decay=WD, layer_decay=GAMMA, no_weight_decay_list=model.no_weight_decay())
  assert {g["lr_scale"] for g in groups} == {GAMMA ** k for k in range(depth + 2)}
  ref = R.run_torch_param_groups("AdamW", model, groups, names, grad_fn, T, LR,
                                 betas=BETAS, eps=EPS)
  adamw = od.adamw(LR, *BETAS, EPS, weight_decay=WD, mask=VIT_MASK)
  ours = R.run_optax(optax.chain(adamw, od.scale_by_layer_decay(vit_rules(depth))),
                     tree, grad_fn, T)
  tol = tolerance(ref)
  assert np.all(np.isfinite(ref))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
  plain = R.run_optax(adamw, tree, grad_fn, T)
  assert np.abs(plain - ref).max() > 100 * tol


# --- stacked == named ------------------------------------------------------------------------


L = 3


def named_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return {"embed": {"embedding": f(11, 4)},
          "layers": {str(i): {"dense": {"kernel": f(4, 4), "bias": f(4)},
                              "norm": {"scale": 1 + 0.1 * f(4)}} for i in range(L)},
          "head": {"kernel": f(4, 2), "bias": f(2)}}


def stack(named: dict, axis: int = 0) -> dict:
  layers = [named["layers"][str(i)] for i in range(L)]
  return {"embed": named["embed"], "head": named["head"],
          "layers": jax.tree.map(lambda *xs: np.stack(xs, axis), *layers)}


def unstack(stacked: dict, axis: int = 0) -> dict:
  return {"embed": stacked["embed"], "head": stacked["head"],
          "layers": {str(i): jax.tree.map(lambda x, i=i: np.take(np.asarray(x), i, axis),
                                          stacked["layers"]) for i in range(L)}}


def run(tx, params, grads_of, steps):
  """Final params of ``steps`` jitted updates; ``grads_of(t, params)`` gives the gradient."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, grads_of(t, params))
  return jax.tree.map(np.asarray, params)


def named_grads(t: int, params: dict) -> dict:
  """A gradient that depends on the parameters and the step (a quadratic plus noise)."""
  rng = np.random.default_rng(t)
  return jax.tree.map(lambda x: (np.asarray(x) - 0.5 + rng.normal(size=np.shape(x)))
                      .astype(np.float32), params)


@pytest.mark.parametrize("axis", [0, 1])
def test_stacked_equals_named_per_layer(axis):
  named = named_params()
  mask = od.exclude_names("bias", "norm")
  common = dict(embeddings="embed/.*", head="head/.*")
  by_name = od.layer_decay(GAMMA, L, layers=r"layers/(\d+)/.*", **common)
  by_axis = od.layer_decay(GAMMA, L, stacked="layers/.*", stack_axis=axis, **common)
  tx = lambda rules: optax.chain(od.adamw(LR, weight_decay=WD, mask=mask),  # noqa: E731
                                 od.scale_by_layer_decay(rules))
  want = run(tx(by_name), named, named_grads, T)
  got = run(tx(by_axis), stack(named, axis),
            lambda t, p: stack(named_grads(t, unstack(p, axis)), axis), T)
  got = unstack(got, axis)
  # The same float32 multiplier per slice as per named leaf: equal to round-off over T steps
  # (bitwise on some XLA releases; a stacked array is another program, and jax 0.11 fuses it
  # otherwise, an ulp apart).
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_max_ulp(g, w, maxulp=4)
  # The layers moved differently: the multipliers reached the slices.
  no_decay = run(tx(od.layer_decay(1.0, L, layers=r"layers/(\d+)/.*", **common)), named,
                 named_grads, T)
  assert not np.allclose(no_decay["layers"]["0"]["dense"]["kernel"],
                         want["layers"]["0"]["dense"]["kernel"])


def test_stacked_multipliers_broadcast_along_the_stacked_axis():
  params = stack(named_params(), axis=1)
  rules = od.layer_decay(0.5, L, embeddings="embed/.*", stacked="layers/.*", stack_axis=1,
                         head="head/.*")
  mults = rules.multipliers(params)
  kernel = mults["layers"]["dense"]["kernel"]
  assert params["layers"]["dense"]["kernel"].shape == (4, L, 4)
  assert kernel.shape == (1, L, 1)  # broadcasts along the stacked axis
  assert kernel.ravel().tolist() == [0.5 ** (L + 1 - l) for l in range(1, L + 1)]
  assert mults["embed"]["embedding"] == 0.5 ** (L + 1) and mults["head"]["bias"] == 1.0


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_linen_scan_tree():
  nn = pytest.importorskip("flax.linen")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(nn.Dense(4)(x)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="embed")(x)
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
      x, _ = scan(name="blocks")(x, None)
      return nn.Dense(2, name="head")(x)

  params = Model().init(jax.random.key(0), jnp.ones((2, 3)))
  rules = od.layer_decay(GAMMA, L, embeddings="params/embed/.*", stacked="params/blocks/.*",
                         head="params/head/.*")
  tx = optax.chain(optax.sgd(1.0), od.scale_by_layer_decay(rules))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  kernel = updates["params"]["blocks"]["Dense_0"]["kernel"]
  assert kernel.shape == (L, 4, 4)
  for i in range(L):
    np.testing.assert_array_equal(kernel[i], -np.float32(GAMMA ** (L - i)))
  np.testing.assert_array_equal(updates["params"]["embed"]["kernel"],
                                -np.float32(GAMMA ** (L + 1)))
  np.testing.assert_array_equal(updates["params"]["head"]["bias"], -1.0)


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_nnx_vmap_stack_with_nnx_optimizer_equals_named():
  nnx = pytest.importorskip("flax.nnx")

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.dense(x))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Linear(3, 4, rngs=rngs)

      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def blocks(rngs):
        return Block(rngs)

      self.blocks = blocks(rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def body(block, x):
        return block(x)

      return self.head(body(self.blocks, self.embed(x)))

  model = Model(nnx.Rngs(0))
  start = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  common = dict(embeddings="embed/.*", head="head/.*")
  mask = od.exclude_names("bias")
  stacked_rules = od.layer_decay(GAMMA, L, stacked="blocks/.*", **common)
  opt = nnx.Optimizer(model, optax.chain(od.adamw(LR, weight_decay=WD, mask=mask),
                                         od.scale_by_layer_decay(stacked_rules)), wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 6).reshape(2, 3)
  grads_seen = []
  for _ in range(3):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    grads_seen.append(jax.tree.map(np.asarray, nnx.to_pure_dict(grads)))
    opt.update(model, grads)
  got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def unroll(tree):  # blocks/dense/kernel (L, 4, 4) -> blocks/<i>/dense/kernel (4, 4)
    return {**tree, "blocks": {str(i): jax.tree.map(lambda a, i=i: a[i], tree["blocks"])
                               for i in range(L)}}

  named_rules = od.layer_decay(GAMMA, L, layers=r"blocks/(\d+)/.*", **common)
  want = run(optax.chain(od.adamw(LR, weight_decay=WD, mask=mask),
                         od.scale_by_layer_decay(named_rules)),
             unroll(start), lambda t, p: unroll(grads_seen[t]), 3)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(unroll(got))):
    # nnx.Optimizer's step and the oracle's are compiled apart: XLA may round an op
    # differently (an ulp; flax 0.12.12 with jax 0.12).
    np.testing.assert_allclose(g, w, rtol=4e-7, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# --- composition ------------------------------------------------------------------------------


def test_composes_with_lr_multipliers_and_labels():
  named = named_params()
  rules = od.layer_decay(0.5, L, embeddings="embed/.*", layers=r"layers/(\d+)/.*",
                         head="head/.*")
  grads = jax.tree.map(np.ones_like, named)
  tx = optax.chain(optax.sgd(1.0), od.scale_by_layer_decay(rules),
                   od.scale_by_lr_multipliers([("head/.*", 10.0)]))
  u, _ = tx.update(grads, tx.init(named))
  assert float(u["head"]["kernel"][0, 0]) == -10.0
  assert float(u["layers"]["1"]["dense"]["kernel"][0, 0]) == -(0.5 ** 2)
  assert float(u["embed"]["embedding"][0, 0]) == -(0.5 ** 4)
  # Inside optax.multi_transform the transform sees only its group (the other leaves are
  # MaskedNode): its rules may match them, and they pass untouched.
  labels = od.labels({"frozen": od.include_names("^embed/")}, default="train")
  tx = optax.multi_transform({"frozen": optax.set_to_zero(),
                              "train": optax.chain(optax.sgd(1.0),
                                                   od.scale_by_layer_decay(rules))}, labels)
  u, _ = tx.update(grads, tx.init(named), named)
  assert float(u["embed"]["embedding"][0, 0]) == 0.0
  assert float(u["layers"]["0"]["norm"]["scale"][0]) == -(0.5 ** 3)


def test_layer_decay_scales_the_decay_term_after_an_alias():
  """After od.adamw the multiplier scales λθ too: a leaf with zero gradient decays as
  Π(1 − s·η·λ) (torch AdamW with group lr s·η); before the decay, as Π(1 − η·λ)."""
  rules = od.layer_decay(0.5, 1, embeddings="embed", layers=r"layers/(\d+)", head="head")
  params = {"embed": jnp.ones(2), "layers": [jnp.ones(2)], "head": jnp.ones(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  after = optax.chain(od.adamw(0.1, weight_decay=0.5), od.scale_by_layer_decay(rules))
  before = optax.chain(od.scale_by_adam(), od.scale_by_layer_decay(rules),
                       od.add_decoupled_decay(0.5), optax.scale_by_learning_rate(0.1))
  for tx, scales in ((after, {"embed": 0.25, "layers": 0.5, "head": 1.0}),
                     (before, {"embed": 1.0, "layers": 1.0, "head": 1.0})):
    p, state = params, tx.init(params)
    for _ in range(5):
      u, state = tx.update(zeros, state, p)
      p = optax.apply_updates(p, u)
    for key, s in scales.items():
      leaf = p[key][0] if key == "layers" else p[key]
      np.testing.assert_allclose(leaf, np.float32(1 - s * 0.1 * 0.5) ** 5, rtol=1e-6)


def test_jit_and_dtype():
  rules = od.layer_decay(0.5, 2, embeddings="e", stacked="s", head="h")
  g = {"e": jnp.ones(3, jnp.bfloat16), "s": jnp.ones((2, 3), jnp.bfloat16),
       "h": jnp.ones(3, jnp.bfloat16)}
  tx = od.scale_by_layer_decay(rules)
  u, _ = jax.jit(tx.update)(g, tx.init(g))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert u["s"][:, 0].tolist() == [0.25, 0.5] and u["e"][0] == 0.125
  assert u["h"] is g["h"] or bool(jnp.all(u["h"] == 1))


def test_fused_step_equals_the_plain_step():
  """od.fused_step of a chain with layer decay (no kernel: the plain step): the same numbers."""
  from tests.fixtures import assert_fused_equals_plain

  params = {"embed": jnp.ones((64, 8)), "head": jnp.ones((8, 2)),
            "blocks": {"w": jnp.linspace(0, 1, L * 64 * 64).reshape(L, 64, 64),
                       "b": jnp.ones((L, 8))}}
  rules = od.layer_decay(0.5, L, embeddings="embed", stacked="blocks/.*", head="head")
  tx = optax.chain(od.adamw(1e-2, weight_decay=0.1, mask=od.exclude_names("b$")),
                   od.scale_by_layer_decay(rules))
  fused = od.fused_step(tx)
  assert_fused_equals_plain(tx, fused, params, tx.init(params))


# --- the rule object ----------------------------------------------------------------------------


def test_frozen_hashable_printable():
  a = vit_rules(12)
  b = vit_rules(12)
  assert a == b and hash(a) == hash(b) and a != vit_rules(11)
  assert eval(repr(a), {"layer_decay": od.layer_decay}) == a
  with pytest.raises(AttributeError):
    a.decay = 0.5  # type: ignore[misc]
  with pytest.raises(TypeError, match="not a boolean mask"):
    bool(a)


def test_describe_shows_layers_and_multipliers():
  params = stack(named_params())
  rules = od.layer_decay(0.5, L, embeddings="embed/.*", stacked="layers/.*", head="head/.*")
  text = rules.describe(params, mask=od.exclude_names("bias", "norm"))
  rows = {line.split()[0]: line.split() for line in text.splitlines()[4:]}
  assert set(rows) == ({"embed/embedding", "head/bias", "head/kernel"}
                       | {f"layers/{k}[{i}]" for k in ("dense/bias", "dense/kernel",
                                                       "norm/scale") for i in range(L)})
  for i in range(L):
    row = rows[f"layers/dense/kernel[{i}]"]
    assert row[1:3] == ["(4,", "4)"] and row[3] == str(i + 1)
    assert float(row[4]) == 0.5 ** (L - i) and row[5] == "yes"
    assert rows[f"layers/dense/bias[{i}]"][4] == "no"
  assert rows["embed/embedding"][3:5] == ["0", f"{0.5 ** (L + 1):g}"]
  assert rows["head/kernel"][3:5] == [str(L + 1), "1"]


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("decay, error", [
    (0.0, ValueError), (-0.5, ValueError), (1.5, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError), (True, TypeError), ("0.5", TypeError), (None, TypeError),
])
def test_bad_decay(decay, error):
  with pytest.raises(error, match="decay"):
    od.layer_decay(decay, 2, layers=r"b/(\d+)")


@pytest.mark.parametrize("n, error", [
    (2.0, TypeError), (2.5, TypeError), (True, TypeError), ("3", TypeError), (0, ValueError),
    (-1, ValueError),
])
def test_bad_num_layers(n, error):
  with pytest.raises(error, match="num_layers"):
    od.layer_decay(0.5, n, layers=r"b/(\d+)")


def test_bad_rules_at_construction():
  with pytest.raises(ValueError, match="one capturing group"):
    od.layer_decay(0.5, 2, layers=r"blocks/\d+/.*")
  with pytest.raises(ValueError, match="one capturing group"):
    od.layer_decay(0.5, 2, layers=r"(blocks)/(\d+)/.*")
  with pytest.raises(ValueError, match="not a valid regular expression"):
    od.layer_decay(0.5, 2, layers=r"blocks/(\d+", head="head")
  with pytest.raises(ValueError, match=r"at_layer\['norm'\] must be in 0 .. 3"):
    od.layer_decay(0.5, 2, layers=r"b/(\d+)", at_layer={"norm": 4})
  with pytest.raises(TypeError, match="at_layer takes a dict"):
    od.layer_decay(0.5, 2, layers=r"b/(\d+)", at_layer=[("norm", 2)])
  with pytest.raises(TypeError, match="regular expression"):
    od.layer_decay(0.5, 2, layers=[r"b/(\d+)", 3])
  with pytest.raises(ValueError, match="no rule gives a block its layer"):
    od.layer_decay(0.5, 2, embeddings="e", head="h")
  with pytest.raises(TypeError, match="stack_axis"):
    od.layer_decay(0.5, 2, stacked="s", stack_axis=None)
  with pytest.raises(TypeError, match="keys are regular expressions"):
    od.layer_decay(0.5, 2, layers=r"b/(\d+)", at_layer={("norm", "ln"): 2})
  with pytest.raises(TypeError, match="od.layer_decay"):
    od.scale_by_layer_decay({"b": 0.5})
  with pytest.raises(TypeError, match="floating point"):
    tx = od.scale_by_layer_decay(od.layer_decay(0.5, 1, layers=r"b/(\d+)"))
    tx.update({"b": [jnp.ones(2, jnp.int32)]}, optax.EmptyState())


def test_a_string_is_one_pattern():
  rules = od.layer_decay(0.5, 1, embeddings="embed", layers=r"b/(\d+)", head="head")
  assert rules.multipliers({"embed": 1.0, "b": [1.0], "head": 1.0}) == \
      {"embed": 0.25, "b": [0.5], "head": 1.0}


def test_bad_trees_are_refused_at_init_and_at_update():
  rules = od.layer_decay(0.5, 2, embeddings="embed", layers=r"blocks/(\d+)/w", head="head")
  tx = od.scale_by_layer_decay(rules)
  good = {"embed": jnp.ones(2), "blocks": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}],
          "head": jnp.ones(2)}
  tx.init(good)
  cases = {
      "block index 2, outside 0 .. 1": {**good, "blocks": good["blocks"] * 3},
      "no rule takes 1 of 5 parameters: 'pos'": {**good, "pos": jnp.ones(2)},
      "'head' matches no parameter path": {k: v for k, v in good.items() if k != "head"},
  }
  for message, tree in cases.items():
    with pytest.raises(ValueError, match=re.escape(message)):
      tx.init(tree)
    with pytest.raises(ValueError, match=re.escape(message)):
      jax.jit(tx.update)(tree, optax.EmptyState())
  loose = od.layer_decay(0.5, 2, embeddings="embed", layers=r"blocks/(\d+)/w", head="head",
                         allow_unmatched=True)
  od.scale_by_layer_decay(loose).init({"blocks": good["blocks"]})


def test_earlier_rule_shadowing_and_stacked_length_are_errors():
  rules = od.layer_decay(0.5, 2, embeddings=".*", layers=r"b/(\d+)")
  with pytest.raises(ValueError, match="only matches paths an earlier rule takes"):
    rules.decisions({"b": [1.0, 1.0]})
  stacked = od.layer_decay(0.5, 3, stacked="s/.*", head="h")
  with pytest.raises(ValueError, match=r"'s/w' has shape \(2, 4\); its axis 0 must have "
                                       "length num_layers=3"):
    stacked.multipliers({"s": {"w": np.ones((2, 4))}, "h": 1.0})
  with pytest.raises(ValueError, match="axis 0 must have length"):
    stacked.multipliers({"s": {"w": np.float32(1.0)}, "h": 1.0})


def test_not_a_mask():
  rules = vit_rules(2)
  params = {"head": {"w": jnp.ones((2, 2))}}
  with pytest.raises((TypeError, ValueError), match="mask"):
    tx = od.adamw(1e-3, mask=rules)
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match="not a boolean mask"):
    optax.masked(optax.sgd(1.0), rules).init(params)
