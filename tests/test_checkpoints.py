"""Checkpoints: orbax save mid-run, restore in a fresh process, resume bit for bit.

Two separate Python processes (this file run as a script, bounded timeouts):
the first trains K < N steps and saves params + optimizer state with
``orbax.checkpoint.StandardCheckpointer``, then, from scratch, trains N steps
uninterrupted (the reference); the second, fresh process restores into the
abstract state ``jax.eval_shape(tx.init, params)`` and trains the remaining
N − K steps. The resumed parameters and state must be
bitwise those of the uninterrupted run, for every optimizer in ``OPTIMIZERS``
(including a learning-rate schedule, a name mask, stochastic rounding's PRNG
key and optax.apply_if_finite's counters).

``test_state_layout_is_stable`` pins the state fields that checkpoints contain
(documented in BUILD_NOTES.md, "Promises and the tests that hold them"): a change to
them breaks loading old checkpoints and must be deliberate.

The ``test_restore_*`` tests hold ``odf.restore_checkpoint`` (optax_decoupled/flax/_checkpoints.py)
to its bitwise promise: a template ``like`` whose dtype or shape differs from the saved leaf
(read from orbax's checkpoint metadata) is refused with a ValueError naming the leaf, instead
of orbax silently casting float32 to bfloat16; a template of another structure is refused
naming the leaves; a matching template restores bit for bit, for a plain pytree and for an
``nnx.State``; bad steps and directories are named without creating anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od

N_STEPS, K_STEPS = 12, 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
      "encoder": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), dtype),
                  "bias": jnp.asarray(rng.normal(size=(4,)), dtype),
                  "LayerNorm": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=(4,)), dtype)}},
      "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype)},
  }


def _optimizers():
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, N_STEPS)
  mask = od.exclude_names(*od.BERT_EXCLUDE)
  return {
      "adamw": (od.adamw(lr, weight_decay=0.05, mask=mask), jnp.float32),
      "adam_l2": (od.adam_l2(1e-2, weight_decay=1e-3, mask=mask), jnp.float32),
      "sgd_l2": (od.sgd_l2(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), jnp.float32),
      "bert_adamw": (od.bert_adamw(lr), jnp.float32),
      "adamw_if_finite": (optax.apply_if_finite(od.adamw(1e-2, weight_decay=0.05, mask=mask), 3),
                          jnp.float32),
      "adamw_bf16_sr": (od.stochastic_rounding(optax.chain(
          od.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32),
          od.add_decoupled_decay(0.05, mask), optax.scale_by_learning_rate(lr)), seed=3),
          jnp.bfloat16),
  }


def _grads(params, step):
  """Deterministic gradients per step (a NaN at step 7 exercises apply_if_finite)."""
  rng = np.random.default_rng(1000 + step)
  g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  g = jax.tree.map(lambda gi, p: gi + 0.1 * p, g, params)  # depends on θ, like a real loss
  if step == 7:
    g["head"]["kernel"] = g["head"]["kernel"].at[0, 0].set(jnp.nan)
  return g


def _train(tx, params, state, start, stop, finite_steps_only=False):
  @jax.jit
  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for t in range(start, stop):
    g = _grads(params, t)
    if finite_steps_only and t == 7:
      g = jax.tree.map(lambda x: jnp.nan_to_num(x), g)
    params, state = step(g, state, params)
  return params, state


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _main(phase: str, workdir: str) -> None:
  import orbax.checkpoint as ocp

  warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
  ckptr = ocp.StandardCheckpointer()
  for name, (tx, dtype) in _optimizers().items():
    finite_only = name != "adamw_if_finite"
    params = _params(dtype)
    path = os.path.join(workdir, name)
    if phase == "first":
      p_k, s_k = _train(tx, params, tx.init(params), 0, K_STEPS, finite_only)
      ckptr.save(os.path.join(path, "ckpt"), {"params": p_k, "opt_state": s_k})
      ckptr.wait_until_finished()
      params, state = _train(tx, params, tx.init(params), 0, N_STEPS, finite_only)
      phase_name = "full"
    else:  # resume in a process that never saw the first K steps
      abstract = jax.eval_shape(lambda p=params, tx=tx: {"params": p, "opt_state": tx.init(p)})
      restored = ckptr.restore(os.path.join(path, "ckpt"), abstract)
      params, state = _train(tx, restored["params"], restored["opt_state"], K_STEPS, N_STEPS,
                             finite_only)
      phase_name = "resume"
    out = {f"p{k}": v for k, v in _flat(params).items()}
    out.update({f"s{k}": v for k, v in _flat(state).items()})
    np.savez(os.path.join(path + f"_{phase_name}.npz"), **{
        k: (v.view(np.uint16) if v.dtype == jnp.bfloat16 else v) for k, v in out.items()})


def _run(phase, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), phase, str(workdir)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # runs in a fresh process
def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
  _run("first", tmp_path)
  _run("resume", tmp_path)
  for name in _optimizers():
    full = np.load(tmp_path / f"{name}_full.npz")
    resumed = np.load(tmp_path / f"{name}_resume.npz")
    assert sorted(full.files) == sorted(resumed.files), name
    for k in full.files:
      np.testing.assert_array_equal(resumed[k], full[k], err_msg=f"{name}: {k}")
  # The NaN step was really skipped (not silently fed to the moments).
  s = np.load(tmp_path / "adamw_if_finite_full.npz")
  assert int(s["s.total_notfinite"]) == 1


def _layout(state):
  """(type name, field names) of every NamedTuple in a state, in order."""
  out = []

  def visit(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      out.append((type(x).__name__, x._fields))
      for v in x:
        visit(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        visit(v)

  visit(state)
  return out


def test_state_layout_is_stable():
  """The checkpointed fields; BUILD_NOTES.md lists the same. Changing them is a break."""
  params = _params()
  adam = ("ScaleByAdamState", ("count", "mu", "nu"))
  wd = ("WeightDecayState", ("decay_count",))  # not "count": tree_get(state, "count") is unique
  empty = ("EmptyState", ())
  sched = ("ScaleByScheduleState", ("count",))  # optax: a schedule learning rate has a count
  expected = {
      "adamw": [adam, wd, sched],
      "adam_l2": [wd, adam, empty],
      "sgd_l2": [wd, ("TraceState", ("trace",)), empty],
      "bert_adamw": [adam, wd, sched],
      "adamw_if_finite": [("ApplyIfFiniteState",
                           ("notfinite_count", "last_finite", "total_notfinite", "inner_state")),
                          adam, wd, empty],
      "adamw_bf16_sr": [("StochasticRoundingState", ("inner_state", "key")), adam, wd, sched],
  }
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
    for name, (tx, dtype) in _optimizers().items():
      state = tx.init(_params(dtype))
      assert _layout(state) == expected[name], name
      counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32 and x.shape == ()]
      assert counts, name
  sr = _optimizers()["adamw_bf16_sr"][0].init(_params(jnp.bfloat16))
  assert sr.key.dtype == jnp.uint32 and sr.key.shape == (2,)
  adam_state = _optimizers()["adamw_bf16_sr"][0].init(_params(jnp.bfloat16)).inner_state[0]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam_state.mu, adam_state.nu)))
  del params


def _saved_tree(dtype=jnp.float32):
  params = _params(dtype)
  tx = od.adamw(1e-2, weight_decay=0.05, mu_dtype=jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)  # bfloat16: not the point here
    params, state = _train(tx, params, tx.init(params), 0, 3, finite_steps_only=True)
  return {"params": params, "opt_state": state}


def _bits(tree):
  return {k: (v.view(np.uint16) if v.dtype == jnp.bfloat16 else v) for k, v in _flat(tree).items()}


def test_restore_refuses_a_template_of_another_dtype(tmp_path):
  import optax_decoupled.flax as odf

  odf.save_checkpoint(tmp_path, 3, _saved_tree(jnp.float32))
  like = _saved_tree(jnp.float32)
  like["params"] = _params(jnp.bfloat16)  # e.g. a model built with param_dtype=bfloat16
  with pytest.raises(ValueError) as err:
    odf.restore_checkpoint(tmp_path, like)
  msg = str(err.value)
  assert "['params']['encoder']['LayerNorm']['scale']" in msg  # first leaf in tree order
  assert "saved as float32[4]" in msg and "has bfloat16[4]" in msg
  assert "; 4 of " in msg and "cast after restoring" in msg
  # The optimizer state alone in another dtype is refused too (mu saved float32).
  like = _saved_tree(jnp.float32)
  like["opt_state"] = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim else x,
                                   like["opt_state"])
  with pytest.raises(ValueError, match=r"\['opt_state'\]\[0\]\.mu\['encoder'\]"):
    odf.restore_checkpoint(tmp_path, like)


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_restore_with_a_matching_template_is_bitwise(tmp_path):
  import optax_decoupled.flax as odf

  for dtype in (jnp.float32, jnp.bfloat16):
    saved = _saved_tree(dtype)
    odf.save_checkpoint(tmp_path / str(np.dtype(dtype)), 3, saved)
    for like in (_saved_tree(dtype), jax.eval_shape(lambda d=dtype: _saved_tree(d))):
      step, got = odf.restore_checkpoint(tmp_path / str(np.dtype(dtype)), like)
      assert step == 3
      assert jax.tree.structure(got) == jax.tree.structure(saved)
      want, have = _bits(saved), _bits(got)
      assert sorted(want) == sorted(have)
      for k in want:
        assert have[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(have[k], want[k], err_msg=k)


def test_restore_refuses_a_template_of_another_shape(tmp_path):
  import optax_decoupled.flax as odf

  odf.save_checkpoint(tmp_path, 1, _saved_tree())
  like = _saved_tree()
  like["params"]["head"]["kernel"] = jnp.zeros((4, 5))
  with pytest.raises(ValueError, match=r"\['params'\]\['head'\]\['kernel'\] was saved as "
                     r"float32\[4,3\] but the template `like` has float32\[4,5\]"):
    odf.restore_checkpoint(tmp_path, like)


def test_restore_checks_an_nnx_state(tmp_path):
  from flax import nnx

  import optax_decoupled.flax as odf

  def build(param_dtype, seed):
    model = nnx.Linear(3, 2, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
      return model, nnx.Optimizer(model, od.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)

  model, optimizer = build(jnp.float32, 0)
  optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
  saved = nnx.state((model, optimizer))
  odf.save_checkpoint(tmp_path, 1, saved)

  with pytest.raises(ValueError, match=r"leaf \[0\]\['bias'\] was saved as float32\[2\] but "
                     r"the template `like` has bfloat16\[2\]"):
    odf.restore_checkpoint(tmp_path, nnx.state(build(jnp.bfloat16, 1)))

  like = nnx.state(build(jnp.float32, 1))
  before = _flat(nnx.to_pure_dict(like))
  step, got = odf.restore_checkpoint(tmp_path, like)
  assert step == 1 and isinstance(got, nnx.State)
  want, have = _flat(nnx.to_pure_dict(saved)), _flat(nnx.to_pure_dict(got))
  assert sorted(want) == sorted(have)
  for k in want:
    assert have[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(have[k], want[k], err_msg=k)
  for k, v in _flat(nnx.to_pure_dict(like)).items():  # the template is left untouched
    np.testing.assert_array_equal(v, before[k], err_msg=k)



def test_restore_refuses_a_template_of_another_structure_naming_the_leaves(tmp_path):
  """Claim: a template whose leaves are not the saved ones (params only for a params +
  optimizer checkpoint, or an extra leaf) is refused naming the leaves; orbax's own
  error printed its whole metadata tree. Oracle: the leaf names of the two trees."""
  import optax_decoupled.flax as odf

  odf.save_checkpoint(tmp_path, 1, _saved_tree())
  n = len(jax.tree.leaves(_saved_tree())) - len(jax.tree.leaves(_params()))
  with pytest.raises(ValueError, match=rf"structure .*; {n} saved leaves missing from it, 0 of "
                     r"its leaves not saved\): the checkpoint has 'opt_state/0/count'"):
    odf.restore_checkpoint(tmp_path, {"params": _params()})
  like = {**_saved_tree(), "extra": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"the template has 'extra', the checkpoint does not"):
    odf.restore_checkpoint(tmp_path, like)
  # A Python scalar in the template for a saved array is a shape mismatch, named.
  like = _saved_tree()
  like["params"]["head"]["kernel"] = 0.0
  with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\] was saved as float32\[4,3\] "
                     r"but the template `like` has a Python scalar"):
    odf.restore_checkpoint(tmp_path, like)


def test_restore_does_not_create_a_missing_directory_and_names_bad_steps(tmp_path):
  """Claim: restoring from a directory that does not exist says so and leaves no directory
  behind (orbax's CheckpointManager created it); a step that is not a non-negative integer
  is refused by both functions ("1" reported "no checkpoint 1" next to step 1, True looked
  for a directory "True"); numpy and JAX integers are steps. Relative paths resolve
  against the working directory."""
  import optax_decoupled.flax as odf

  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="no checkpoint directory .*nope"):
    odf.restore_checkpoint(missing, {"w": jnp.zeros(2)})
  assert not missing.exists()
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file"):
    odf.save_checkpoint(a_file, 1, {"w": jnp.ones(2)})
  with pytest.raises(FileNotFoundError, match="it is a file"):
    odf.restore_checkpoint(a_file, {"w": jnp.zeros(2)})

  odf.save_checkpoint(tmp_path / "ok", np.int64(2), {"w": jnp.ones(2)})
  odf.save_checkpoint(tmp_path / "ok", jnp.int32(4), {"w": 2 * jnp.ones(2)})
  for bad in ("1", True, -1, 1.0):
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
      odf.restore_checkpoint(tmp_path / "ok", {"w": jnp.zeros(2)}, step=bad)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
      odf.save_checkpoint(tmp_path / "ok", bad, {"w": jnp.ones(2)})
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 3 .*available steps: \[2, 4\]"):
    odf.restore_checkpoint(tmp_path / "ok", {"w": jnp.zeros(2)}, step=3)
  step, got = odf.restore_checkpoint(tmp_path / "ok", {"w": jnp.zeros(2)})
  assert step == 4 and np.array_equal(got["w"], [2.0, 2.0])

  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    odf.save_checkpoint("relative", 5, {"w": jnp.ones(2)})
    os.chdir(tmp_path / "ok")
    assert odf.restore_checkpoint("../relative", {"w": jnp.zeros(2)})[0] == 5
  finally:
    os.chdir(cwd)


def test_saving_a_state_a_donating_step_consumed_names_the_leaf_and_writes_nothing(tmp_path):
  """Claim: saving the state passed to a donating step (not the one it returned) is refused
  naming a deleted leaf, and no partial checkpoint directory is left; orbax raised "Array
  has been deleted" with no leaf and left "1.orbax-checkpoint-tmp" behind."""
  import flax.linen as nn
  from flax.training import train_state

  import optax_decoupled.flax as odf

  net = nn.Dense(2)
  params = net.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  old = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=od.adamw(1e-2))
  step = odf.linen_train_step(lambda p, x: jnp.mean(net.apply({"params": p}, x) ** 2))
  new, _ = step(old, jnp.ones((4, 3)))
  with pytest.raises(RuntimeError, match=r"leaf .*params.* is a deleted array.*returned"):
    odf.save_checkpoint(tmp_path, 1, old)
  assert not os.listdir(tmp_path)
  odf.save_checkpoint(tmp_path, 1, new)  # the returned state saves
  assert odf.restore_checkpoint(tmp_path, new)[0] == 1

if __name__ == "__main__":
  _main(sys.argv[1], sys.argv[2])
