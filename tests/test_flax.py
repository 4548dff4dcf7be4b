"""Tests of optax_decoupled.flax: nnx and linen train steps, presets, checkpoints.

Oracles: the zero-gradient decay is the paper's Proposition 4 as written in
Loshchilov & Hutter 2019, Sec. 2 (θ_T = Π(1 − η_t λ) θ_0 for lr-coupled decay) computed in
float64 numpy; BERT's ``_do_use_weight_decay`` (google-research/bert optimization.py),
HF's ``Trainer.get_decay_parameter_names`` (transformers trainer.py) and the stack-safe
ndim rule are written out below as explicit expected path sets. The presets' own tests,
against transcriptions of the cited sources, are in test_presets.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_decoupled as od
import optax_decoupled.flax as odf
from optax_decoupled import _paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, D, H, HEADS = 11, 8, 16, 2


class NnxNet(nnx.Module):
  """Embedding, self-attention, LayerNorm, MLP with biases (a one-layer BERT)."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(D, rngs=rngs)
    self.hidden = nnx.Linear(D, H, rngs=rngs)
    self.out = nnx.Linear(H, V, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = self.layer_norm(x + self.attention(x))
    return self.out(jax.nn.gelu(self.hidden(x)))


class LinenNet(nn.Module):
  """The same architecture in linen, submodules named as the nnx attributes."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embed")(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(x)
    x = nn.LayerNorm(name="layer_norm")(x)
    return nn.Dense(V, name="out")(jax.nn.gelu(nn.Dense(H, name="hidden")(x)))


def _batch(step: int, batch: int = 4, seq: int = 5):
  rng = np.random.default_rng([7, step])
  return (jnp.asarray(rng.integers(0, V, (batch, seq)), jnp.int32),
          jnp.asarray(rng.integers(0, V, (batch, seq)), jnp.int32))


def _nnx_loss(model, tokens, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()


def _flat(tree) -> dict[str, np.ndarray]:
  # np.array copies: a zero-copy numpy view would pin the buffer and block donation.
  return {p: np.array(_paths.leaf_value(x)) for p, x in _paths.leaves_with_paths(tree)}


def _params(model) -> dict[str, np.ndarray]:
  return _flat(nnx.state(model, nnx.Param))


def _mask_dict(tree, mask) -> dict[str, bool]:
  return dict(zip([p for p, _ in _paths.leaves_with_paths(tree)],
                  jax.tree.leaves(od.resolve_mask(tree, mask))))


def _tx():
  sched = optax.linear_schedule(1e-2, 2e-3, 10)
  return od.adamw(sched, weight_decay=0.1, mask=odf.bert_mask())


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_nnx_and_linen_train_to_the_same_parameters_with_the_same_mask_compiling_once():
  model = NnxNet(nnx.Rngs(0))
  # linen starts from the nnx initial values: same names, so the same tree. Copies:
  # the nnx step donates the model's buffers.
  params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  linen = LinenNet()
  ref = linen.init(jax.random.key(1), _batch(0)[0])["params"]
  assert jax.tree.structure(ref) == jax.tree.structure(params)
  initial = _flat(params)
  state = train_state.TrainState.create(apply_fn=linen.apply, params=params, tx=_tx())
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

  # Same names, same mask, leaf for leaf (BERT's rule on both trees).
  nnx_mask = _mask_dict(nnx.state(model, nnx.Param), odf.bert_mask())
  assert nnx_mask == _mask_dict(params, odf.bert_mask())
  assert {p for p, m in nnx_mask.items() if not m} == {
      "layer_norm/scale", "layer_norm/bias", "hidden/bias", "out/bias",
      "attention/query/bias", "attention/key/bias", "attention/value/bias", "attention/out/bias"}

  def linen_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(linen.apply({"params": p}, x), y).mean()

  # One compilation each for all the steps: a retrace would call the loss again and fail.
  nnx_step = odf.nnx_train_step(chex.assert_max_traces(_nnx_loss, n=1))
  linen_step = odf.linen_train_step(chex.assert_max_traces(linen_loss, n=1))
  for step in range(6):
    old_nnx, old_linen = model.hidden.kernel[...], state.params["hidden"]["kernel"]
    nnx_loss = nnx_step(model, optimizer, *_batch(step))
    state, linen_loss = linen_step(state, *_batch(step))
    np.testing.assert_allclose(nnx_loss, linen_loss, rtol=1e-6)
    assert old_nnx.is_deleted() and old_linen.is_deleted()  # buffers were donated
  got, want = _params(model), _flat(state.params)
  assert got.keys() == want.keys()
  for path in got:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7, err_msg=path)
  assert not np.array_equal(got["hidden/kernel"], initial["hidden/kernel"])  # it trained
  assert int(state.step) == int(optimizer.step[...]) == 6
  with pytest.raises(AssertionError, match="trace"):  # the counter does catch a retrace
    nnx_step(model, optimizer, *_batch(0, batch=3))


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_fused_train_steps_equal_the_plain_ones_and_compile_once():
  # Oracle: the same train step with optimizer.update / state.apply_gradients (optax's
  # tx.update + apply_updates). The fused step must leave the same parameters, the same
  # optimizer state (same structure: checkpoints do not change) and the same step count.
  def linen_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        LinenNet().apply({"params": p}, x), y).mean()

  runs = {}
  for fused in (False, True):
    model = NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=_tx())
    chex.clear_trace_counter()  # each run's step compiles once
    nnx_step = odf.nnx_train_step(chex.assert_max_traces(_nnx_loss, n=1), fused=fused)
    linen_step = odf.linen_train_step(chex.assert_max_traces(linen_loss, n=1), fused=fused)
    for step in range(5):
      nnx_step(model, optimizer, *_batch(step))
      state, _ = linen_step(state, *_batch(step))
    runs[fused] = (model, optimizer, state)
  (m0, o0, s0), (m1, o1, s1) = runs[False], runs[True]
  assert int(o1.step[...]) == int(o0.step[...]) == 5 and int(s1.step) == int(s0.step) == 5
  pure = getattr(nnx, "as_pure", None) or nnx.pure
  # The attention key bias has an exactly-zero gradient (q·(k + b) shifts every logit of a
  # query by the same q·b: softmax ignores it), so what it gets is round-off noise, which
  # Adam's m/√v turns into steps of size ~η: the two paths round differently (the kernel
  # does not fuse multiply-adds) and their key biases drift apart within that bound.
  noise = "attention/key/bias"
  for a, b in [(_params(m0), _params(m1)), (_flat(s0.params), _flat(s1.params))]:
    assert a.keys() == b.keys()
    for path in a:
      if path == noise:
        assert np.abs(b[path] - a[path]).max() <= 2 * 5 * 1e-2  # 2 runs · 5 steps · η ≤ 1e-2
        continue
      np.testing.assert_allclose(b[path], a[path], rtol=1e-6, atol=5e-8, err_msg=path)
  for a, b in [(pure(o0.opt_state), pure(o1.opt_state)), (s0.opt_state, s1.opt_state)]:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(_paths.leaves_with_paths(a), jax.tree.leaves(b)):
      if noise not in path:  # moments: the gradients of parameters a few ulp apart
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * np.abs(x).max(initial=0.0),
                                   err_msg=path)
  # and it did change the parameters (the comparison above is not between two no-ops)
  assert not np.allclose(_params(m1)["hidden/kernel"],
                         _params(NnxNet(nnx.Rngs(0)))["hidden/kernel"])


def _zero_loss(model, tokens, labels):
  del labels
  return 0.0 * model(tokens).sum()  # exact zero gradients through the real model


def _expected_shrink(lrs, wd):
  return np.prod([1.0 - float(lr) * wd for lr in lrs])


def test_zero_gradients_decay_exactly_and_excluded_parameters_are_bitwise_unchanged():
  model = NnxNet(nnx.Rngs(1))
  mask = odf.hf_trainer_mask(model) & odf.exclude_module_types(model, nnx.Embed)
  sched, wd, steps = optax.cosine_decay_schedule(5e-2, 8), 1.0, 8
  optimizer = nnx.Optimizer(model, od.adamw(sched, weight_decay=wd, mask=mask), wrt=nnx.Param)
  before = _params(model)
  step = odf.nnx_train_step(_zero_loss)
  for t in range(steps):
    step(model, optimizer, *_batch(t))
  after = _params(model)
  shrink = _expected_shrink([sched(t) for t in range(steps)], wd)
  excluded = {p for p in before if "bias" in p or p.startswith(("layer_norm/", "embed/"))}
  assert {p for p, m in _mask_dict(nnx.state(model, nnx.Param), mask).items() if not m} == excluded
  for path in before:
    if path in excluded:
      assert np.array_equal(after[path], before[path]), path
    else:
      np.testing.assert_allclose(after[path], shrink * before[path], rtol=2e-6, err_msg=path)
  assert shrink < 0.9  # the decay did act


class StackedBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.dense = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return x + self.dense(self.norm(x))


class StackedNet(nnx.Module):
  """Three blocks created with nnx.vmap and applied with nnx.scan: every leaf is stacked."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return StackedBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(self.embed(tokens), self.blocks)


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_stacked_nnx_layers_keep_norms_and_biases_out_of_the_presets():
  model = StackedNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  shapes = {p: x.shape for p, x in _params(model).items()}
  assert shapes["blocks/norm/scale"] == (3, D)  # the trap: a 2-D norm scale
  # Plain nanoGPT rule (ndim >= 2) decays the stacked norm scale and bias: the bug.
  assert _mask_dict(params, od.min_ndim(2))["blocks/norm/scale"] is True
  want = {"blocks/dense/kernel": True, "embed/embedding": True, "blocks/dense/bias": False,
          "blocks/norm/scale": False, "blocks/norm/bias": False}
  assert _mask_dict(params, odf.stacked_ndim_mask(model)) == want
  assert _mask_dict(params, odf.hf_trainer_mask(model)) == want
  # And in a real train step with zero gradients, the stacked norm stays put.
  sched, wd = 1e-1, 0.5
  optimizer = nnx.Optimizer(
      model, od.adamw(sched, weight_decay=wd, mask=odf.stacked_ndim_mask(model)), wrt=nnx.Param)
  before = _params(model)
  step = odf.nnx_train_step(_zero_loss)
  for t in range(3):
    step(model, optimizer, *_batch(t))
  after = _params(model)
  for path, decay in want.items():
    if decay:
      np.testing.assert_allclose(after[path], before[path] * (1 - sched * wd) ** 3, rtol=2e-6)
    else:
      assert np.array_equal(after[path], before[path]), path


def test_module_type_predicate_errors_on_types_that_own_no_parameter():
  model = NnxNet(nnx.Rngs(0))
  with pytest.raises(ValueError, match="RMSNorm"):
    odf.exclude_module_types(model, nnx.RMSNorm)
  with pytest.raises(ValueError, match="allow_unmatched"):
    odf.exclude_module_types(model, nnx.LayerNorm, nnx.Conv)
  # A group of alternatives counts as matched when any of its types owns a parameter.
  odf.exclude_module_types(model, (nnx.LayerNorm, nnx.RMSNorm))
  pred = odf.exclude_module_types(model, nnx.RMSNorm, allow_unmatched=True)
  assert all(_mask_dict(nnx.state(model, nnx.Param), pred & od.exclude_names("bias")).values()
             ) is False  # biases still excluded, nothing else
  # Built from one model, applied to another's tree: an error, not a silent no-op.
  other = StackedNet(nnx.Rngs(0))
  with pytest.raises(ValueError, match="build it from the model"):
    od.resolve_mask(nnx.state(other, nnx.Param), odf.exclude_module_types(model, nnx.LayerNorm))
  with pytest.raises(TypeError, match="module classes"):
    odf.exclude_module_types(model, "LayerNorm")
  with pytest.raises(TypeError, match="nnx model"):
    odf.exclude_module_types({"a": 1}, nnx.LayerNorm)
  # Frozen, hashable and printable like the core predicates.
  pred = odf.exclude_module_types(model, nnx.LayerNorm, nnx.Embed)
  assert repr(pred) == "exclude_module_types(LayerNorm, Embed)"
  assert hash(pred) == hash(odf.exclude_module_types(model, nnx.LayerNorm, nnx.Embed))


def _spy(record: list):
  """A transform that records the mask it resolves at init and at update."""

  def decisions(tree, mask):
    return [(p, bool(m)) for (p, _), m in zip(_paths.leaves_with_paths(tree),
                                              jax.tree.leaves(od.resolve_mask(tree, mask)))]

  def init_fn(params):
    record.append(("init", decisions(params, record[0])))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    record.append(("update", decisions(params, record[0])))
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_mask_is_identical_at_init_and_update_through_nnx_optimizer():
  model = NnxNet(nnx.Rngs(0))
  mask = odf.hf_trainer_mask(model) & odf.exclude_module_types(model, nnx.Embed)
  record: list = [mask]
  tx = optax.chain(_spy(record), od.adamw(1e-3, weight_decay=0.1, mask=mask))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  odf.nnx_train_step(_nnx_loss)(model, optimizer, *_batch(0))
  (kind0, at_init), (kind1, at_update) = record[1:]
  assert (kind0, kind1) == ("init", "update")
  assert at_init == at_update
  assert [p for p, m in at_init if not m] == sorted(
      p for p in _params(model) if "bias" in p or p.startswith(("layer_norm/", "embed/")))


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_linen_train_state_checkpoint_round_trip_is_bitwise(tmp_path):
  linen = LinenNet()
  params = linen.init(jax.random.key(0), _batch(0)[0])["params"]
  state = train_state.TrainState.create(apply_fn=linen.apply, params=params, tx=_tx())
  step = odf.linen_train_step(lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      linen.apply({"params": p}, x), y).mean())
  for t in range(3):
    state, _ = step(state, *_batch(t))
  odf.save_checkpoint(tmp_path, 3, {"not": jnp.zeros(2)})
  odf.save_checkpoint(tmp_path, 3, state)  # a re-run replaces its own step
  fresh = train_state.TrainState.create(apply_fn=linen.apply, params=params, tx=_tx())
  got_step, restored = odf.restore_checkpoint(tmp_path, fresh)
  assert got_step == 3
  assert isinstance(restored, train_state.TrainState)
  chex.assert_trees_all_equal(jax.tree.leaves(restored), jax.tree.leaves(state))
  chex.assert_trees_all_equal_dtypes(restored.opt_state, state.opt_state)
  with pytest.raises(FileNotFoundError, match="no checkpoint 9"):
    odf.restore_checkpoint(tmp_path, fresh, step=9)


def _load_example():
  path = os.path.join(ROOT, "examples", "nnx_transformer.py")
  spec = importlib.util.spec_from_file_location("nnx_transformer_example", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # runs in a fresh process
def test_example_resumes_in_a_fresh_process_bitwise_identical(tmp_path):
  example = _load_example()
  common = ["--quick", "--steps", "6", "--no-progress"]
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  example.main([*common, "--out", full])
  example.main([*common, "--out", split, "--stop-after", "3"])
  # Continue in a fresh Python process from the orbax checkpoint.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "examples", "nnx_transformer.py"), *common,
       "--out", split, "--resume"],
      check=False, capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 3" in proc.stdout
  a, b = np.load(os.path.join(full, "final_state.npz")), np.load(
      os.path.join(split, "final_state.npz"))
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 20
  for k in a.files:
    assert np.array_equal(a[k], b[k]), k
  assert os.path.getsize(os.path.join(full, "loss_curve.png")) > 1000


def test_linen_step_names_a_donated_input_before_the_call():
  # Two TrainStates built from the same params: the first donating step deletes them.
  import flax.linen as nn
  from flax.training import train_state

  net = nn.Dense(1)
  params = net.init(jax.random.key(0), jnp.ones((1, 2)))["params"]

  def make():
    return train_state.TrainState.create(apply_fn=net.apply, params=params,
                                         tx=od.adamw(1e-2, weight_decay=1e-2))

  first, second = make(), make()
  step = odf.linen_train_step(lambda p, x, y: ((net.apply({"params": p}, x) - y) ** 2).mean())
  batch = (jnp.ones((4, 2)), jnp.zeros((4, 1)))
  step(first, *batch)
  with pytest.raises(RuntimeError, match=r"donate=False.*|.*jnp\.copy"):
    step(second, *batch)
  safe = odf.linen_train_step(lambda p, x, y: ((net.apply({"params": p}, x) - y) ** 2).mean(),
                              donate=False)
  fresh = train_state.TrainState.create(apply_fn=net.apply,
                                        params=jax.tree.map(jnp.ones_like, first.params),
                                        tx=od.adamw(1e-2, weight_decay=1e-2))
  again, _ = safe(fresh, *batch)
  again, _ = safe(fresh, *batch)  # without donation the input stays usable
  assert not any(x.is_deleted() for x in jax.tree.leaves(fresh.params))


class _Small(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


def _small_loss(model, x):
  return jnp.mean(model(x) ** 2)


@pytest.mark.parametrize("fused", [False, True])
def test_train_steps_name_the_loss_fn_mistake_before_differentiating(fused):
  """Claim: a loss that is not a float scalar, or whose aux does not match has_aux, is a
  TypeError naming the fix (jax's own errors, e.g. "iteration over a 0-d array", do not).
  Oracle: the messages, for both steps."""
  x = jnp.ones((3, 4))
  bad = [
      (lambda m, x: m(x) ** 2, {}, r"float scalar \(shape \(\)\), got an array float32\[3, 1\]"
       r".*jnp.mean"),
      (lambda m, x: jnp.sum(m(x) > 0), {}, r"got an array int32\[\].*floating point"),
      (lambda m, x: (_small_loss(m, x), {"n": 1}), {}, r"a tuple of 2.*has_aux=True"),
      (_small_loss, {"has_aux": True}, r"has_aux=True.*must return a pair.*has_aux=False"),
      (lambda m, x: [_small_loss(m, x), 0.0], {"has_aux": True}, r"pair.*got a list of 2"),
  ]
  for loss_fn, kw, match in bad:
    model = _Small(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, od.adamw(1e-2), wrt=nnx.Param)
    with pytest.raises(TypeError, match="nnx_train_step.*" + match):
      odf.nnx_train_step(loss_fn, fused=fused, **kw)(model, optimizer, x)
    net = nn.Dense(1)
    params = net.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=od.adamw(1e-2))

    def linen_loss(p, x, loss_fn=loss_fn):  # the same loss, the model as a closure
      return loss_fn(lambda x: net.apply({"params": p}, x), x)

    with pytest.raises(TypeError, match="linen_train_step.*" + match):
      odf.linen_train_step(linen_loss, fused=fused, **kw)(state, x)


def test_train_steps_refuse_arguments_of_the_wrong_kind_before_tracing():
  """Claim: the nnx step's (model, optimizer) and the linen step's state are checked, with
  a message naming the fix; jax's were "... as an abstract array" and "'M' object has no
  attribute 'wrt'"."""
  model, x = _Small(nnx.Rngs(0)), jnp.ones((3, 4))
  optimizer = nnx.Optimizer(model, od.adamw(1e-2), wrt=nnx.Param)
  step = odf.nnx_train_step(_small_loss)
  with pytest.raises(TypeError, match="swapped"):
    step(optimizer, model, x)
  with pytest.raises(TypeError, match=r"must be an nnx.Optimizer.*nnx.Optimizer\(model, tx"):
    step(model, od.adamw(1e-2), x)
  with pytest.raises(TypeError, match="must be an nnx.Module.*linen_train_step"):
    step({"dense": 1}, optimizer, x)
  with pytest.raises(TypeError, match="must be a TrainState"):
    odf.linen_train_step(lambda p, x: jnp.sum(p["w"]))({"w": jnp.ones(2)}, x)
  with pytest.raises(TypeError, match="must be callable"):
    odf.nnx_train_step(None)


@pytest.mark.parametrize("fused", [False, True])
def test_nnx_step_takes_a_model_and_optimizer_as_it_takes_an_optimizer(fused):
  """Claim: nnx.ModelAndOptimizer works with both update paths (it failed with
  "update() takes 2 positional arguments" unfused). Oracle: the same parameters as
  nnx.Optimizer after three steps; a ModelAndOptimizer of another model is refused."""
  x = jnp.arange(12.0).reshape(3, 4)
  results = []
  for make in (nnx.Optimizer, nnx.ModelAndOptimizer):
    model = _Small(nnx.Rngs(0))
    optimizer = make(model, od.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)
    step = odf.nnx_train_step(_small_loss, fused=fused)
    for _ in range(3):
      step(model, optimizer, x)
    assert int(optimizer.step[...]) == 3
    results.append(_params(model))
  for path in results[0]:
    np.testing.assert_array_equal(results[0][path], results[1][path])
  other = nnx.ModelAndOptimizer(_Small(nnx.Rngs(1)), od.adamw(1e-2), wrt=nnx.Param)
  with pytest.raises(ValueError, match="holds another model"):
    odf.nnx_train_step(_small_loss, fused=fused)(_Small(nnx.Rngs(0)), other, x)
