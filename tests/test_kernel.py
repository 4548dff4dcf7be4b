"""The C++ CPU kernel behind ``od.fused_step(od.adamw(...))``: built, exact, in place, optional.

Oracles:
* a numpy float32 transcription of the chain ``od.adamw`` is (``optax.scale_by_adam`` ->
  ``od.add_decoupled_decay`` -> ``optax.scale_by_learning_rate`` -> ``optax.apply_updates``),
  written out from optax's source (``optax/tree_utils/_tree_math.py``: ``update_moment``,
  ``update_moment_per_elem_norm``, ``bias_correction``; ``optax/_src/transform.py``:
  ``scale_by_adam``'s ``m / (sqrt(v + eps_root) + eps)``) and torch's AdamW documentation;
* the plain step, ``tx.update`` + ``optax.apply_updates``, of the same transformation.

The kernel rounds every operation as written, like the numpy transcription: its moments are
bitwise those of numpy, and θ equals numpy's up to the ulp of the bias-correction power (XLA's
``pow`` vs numpy's). XLA's plain step contracts some multiply-adds into FMAs, so kernel and
plain step agree to a few ulp, not bitwise.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil

import chex
import jax
import jax.export  # noqa: F401 - a submodule that `import jax` does not load on every release
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import pytest

import optax_decoupled as od
from optax_decoupled import _kernel, _kernel_build
from tests.fixtures import assert_kernel_close, plain_step

CXX = os.environ.get("CXX", "c++").split()[0]
OPTED_OUT = bool(os.environ.get("OPTAX_DECOUPLED_NO_KERNEL"))
# Without a C++ compiler (or with the opt-out set) there is no kernel, by design; the tests
# that need it are skipped there, never on a machine with a compiler (where a missing kernel
# fails the first test below).
needs_kernel = pytest.mark.skipif(
    _kernel_build.unavailable() is not None and (OPTED_OUT or shutil.which(CXX) is None),
    reason="no kernel here (no C++ compiler, or OPTAX_DECOUPLED_NO_KERNEL): fallback only")


def _tree(seed=0):
  """~70K parameters (enough for the kernel to use all threads), names for a BERT mask, a
  scalar leaf and a zero-size leaf."""
  rng = np.random.default_rng(seed)

  def a(*shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

  return {"encoder": {"kernel": a(64, 1000), "bias": a(1000, scale=1e-2)},
          "LayerNorm": {"scale": a(1000), "bias": a(1000)},
          "temperature": a(scale=10.0), "unused": jnp.zeros((0, 3), jnp.float32)}


def _grads(params, t):
  return jax.tree.map(lambda x: jnp.sin(x * (t + 3.0)) * 10.0 ** (t % 4 - 2), params)


def _run(step, tx, params, steps):
  p, s = params, tx.init(params)
  fn = jax.jit(step)
  for t in range(steps):
    p, s = fn(p, _grads(params, t), s)
  return p, s


def test_kernel_is_built_on_first_use_when_a_compiler_is_present():
  # The first kernel step compiles csrc/adam_step.cc against the installed jaxlib; the only
  # accepted reasons for its absence are the opt-out and a machine without a C++ compiler.
  if OPTED_OUT:
    assert "OPTAX_DECOUPLED_NO_KERNEL" in _kernel_build.unavailable()
  elif shutil.which(CXX):
    assert _kernel_build.unavailable() is None, _kernel_build.unavailable()
    library, how = _kernel_build.build()
    assert library is not None and library.exists() and "cached" in how
    assert f"jaxlib{jaxlib.__version__}-" in library.name  # one build per jaxlib
  else:
    assert "no C++ compiler" in _kernel_build.unavailable()


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_kernel_matches_a_numpy_transcription_of_adamw():
  b1, b2, eps, eps_root, wd = 0.9, 0.999, 1e-8, 1e-12, 0.05
  lr = optax.cosine_decay_schedule(1e-2, 10)
  mask = od.exclude_names(*od.BERT_EXCLUDE)
  tx = od.adamw(lr, b1, b2, eps, eps_root, weight_decay=wd, mask=mask)
  params = _tree()
  assert od.fused_step(tx).explain(params, params, tx.init(params)).startswith("kernel")
  p, s = _run(od.fused_step(tx, kernel="require"), tx, params, steps=3)

  f32 = np.float32

  def by_path(tree):
    return {jax.tree_util.keystr(k): np.asarray(x)
            for k, x in jax.tree_util.tree_leaves_with_path(tree)}

  got, mu, nu = by_path(p), by_path(s[0].mu), by_path(s[0].nu)
  grads = [by_path(_grads(params, t)) for t in range(3)]
  for path, theta in by_path(params).items():
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    decays = "bias" not in path and "LayerNorm" not in path
    for t in range(3):
      g = grads[t][path]
      m = f32(1 - b1) * g + f32(b1) * m                      # update_moment
      v = f32(1 - b2) * (g * g) + f32(b2) * v                # update_moment_per_elem_norm
      bc1, bc2 = f32(1) - f32(b1) ** f32(t + 1), f32(1) - f32(b2) ** f32(t + 1)
      u = (m / bc1) / (np.sqrt(v / bc2 + f32(eps_root)) + f32(eps))  # scale_by_adam
      if decays:
        u = u + f32(wd) * theta                              # add_decoupled_decay
      u = np.asarray(-f32(lr(t)), f32) * u                   # scale_by_learning_rate
      theta = theta + u                                      # apply_updates
    np.testing.assert_array_equal(mu[path], m, err_msg=path)
    np.testing.assert_array_equal(nu[path], v, err_msg=path)
    np.testing.assert_allclose(got[path], theta, rtol=1e-6, atol=1e-7, err_msg=path)
  assert int(s[0].count) == 3 and int(s[1].decay_count) == 3 and int(s[2].count) == 3


CONFIGS = {
    "constant lr and λ, no mask": lambda: od.adamw(1e-3, weight_decay=1e-2),
    "schedules, BERT name mask": lambda: od.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=1e-1,
        mask=od.exclude_names(*od.BERT_EXCLUDE)),
    "λ schedule reaching 0, eps_root": lambda: od.adamw(
        1e-2, eps_root=1e-8, weight_decay=optax.linear_schedule(0.1, 0.0, 2)),
    "λ = 0 (no decay term at all)": lambda: od.adamw(1e-2, weight_decay=0.0),
    "ndim mask, float32 moments": lambda: od.adamw(
        1e-2, weight_decay=1e-1, mask=od.min_ndim(2), mu_dtype=jnp.float32),
}


@needs_kernel
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_equals_the_plain_step(name):
  tx = CONFIGS[name]()
  params = _tree(1)
  assert od.fused_step(tx).explain(params, params, tx.init(params)).startswith("kernel")
  p1, s1 = _run(plain_step(tx), tx, params, steps=5)
  p2, s2 = _run(od.fused_step(tx, kernel="require"), tx, params, steps=5)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  assert [int(c) for c in (s1[0].count, s1[1].decay_count)] == [
      int(c) for c in (s2[0].count, s2[1].decay_count)]
  # θ, m, v to round-off after 5 steps: XLA contracts m·b1 + (1-b1)·g into a fused
  # multiply-add, the kernel rounds each operation as written (and as numpy does, above).
  assert_kernel_close((p2, s2[0]), (p1, s1[0]))


@pytest.mark.filterwarnings("ignore::optax_decoupled.LowPrecisionDecayWarning")
@pytest.mark.parametrize("tx, params, reason", [
    (optax.adam(1e-3), _tree(), "od.adamw"),
    (od.sgd_l2(1e-3, 0.9, weight_decay=1e-4), _tree(), "od.adamw"),
    (optax.nadam(1e-3), _tree(), "od.adamw"),
    (od.sgdw(1e-3, 0.9, weight_decay=1e-4), _tree(), "od.adamw"),
    (od.adamw(1e-3), jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree()), "takes grads"),
    (od.adamw(1e-3, mu_dtype=jnp.bfloat16), _tree(), "takes mu"),
    (od.adamw(1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float16),
     jax.tree.map(lambda x: x.astype(jnp.float16), _tree()), "takes params"),
])
def test_the_kernel_says_what_it_does_not_cover(tx, params, reason):
  state = tx.init(params)
  plan = od.fused_step(tx).explain(params, params, state)
  assert plan.startswith("plain") and reason in plan
  with pytest.raises(ValueError, match=f"kernel='require'.*{reason}"):
    jax.jit(od.fused_step(tx, kernel="require"))(params, params, state)
  with pytest.raises(ValueError, match="kernel must be"):
    od.fused_step(tx, kernel=True)


@needs_kernel
@pytest.mark.filterwarnings("ignore::optax_decoupled.LowPrecisionDecayWarning")
@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_with_bfloat16_weights_and_float32_moments(grad_dtype):
  # Mixed precision as the README recommends it: bfloat16 θ (and g), float32 moments. Oracle:
  # a numpy transcription (ml_dtypes' bfloat16, round to nearest even) of the chain with
  # od.scale_by_adam's float32 moments: g widened, float32 arithmetic, θ' = bf16(θ + u)
  # (optax.apply_updates adds the float32 update to the widened θ, then casts).
  b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-2, 0.1
  tx = od.adamw(lr, b1, b2, eps, weight_decay=wd, mask=od.exclude_names("bias"),
                mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(6))
  grads = [jax.tree.map(lambda x: x.astype(grad_dtype), _grads(_tree(6), t)) for t in range(4)]
  state = tx.init(params)
  assert od.fused_step(tx).explain(params, grads[0], state).startswith("kernel")
  fused, plain = jax.jit(od.fused_step(tx, kernel="require")), jax.jit(plain_step(tx))
  p1, s1, p2, s2 = params, state, params, state
  for g in grads:
    p1, s1 = fused(p1, g, s1)
    p2, s2 = plain(p2, g, s2)
  f32, bf16 = np.float32, jnp.bfloat16

  def by_path(tree):
    return {jax.tree_util.keystr(k): np.asarray(x)
            for k, x in jax.tree_util.tree_leaves_with_path(tree)}

  got_all, xla_all, g_all = by_path(p1), by_path(p2), [by_path(g) for g in grads]
  for path, theta in by_path(params).items():
    if theta.size == 0:
      continue
    m = v = f32(0.0)
    for t, g in enumerate(g_all):
      gl = g[path].astype(f32)
      m = f32(1 - b1) * gl + f32(b1) * m
      v = f32(1 - b2) * (gl * gl) + f32(b2) * v
      bc1, bc2 = f32(1) - f32(b1) ** f32(t + 1), f32(1) - f32(b2) ** f32(t + 1)
      u = (m / bc1) / (np.sqrt(v / bc2) + f32(eps))
      if "bias" not in path:
        u = u + f32(wd) * theta.astype(f32)
      theta = (theta.astype(f32) + f32(-lr) * u).astype(bf16)
    assert got_all[path].dtype == bf16
    got, xla, want = (x.astype(f32) for x in (got_all[path], xla_all[path], theta))
    one_ulp = 2.0**-7 * np.abs(want)  # bfloat16 has 8 significant bits
    assert np.all(np.abs(got - want) <= one_ulp), path
    assert np.mean(got == want) >= 0.99, path  # an ulp flips only next to a tie
    assert np.all(np.abs(got - xla) <= one_ulp), path
  for a, b in zip(jax.tree.leaves(s2[0]), jax.tree.leaves(s1[0])):  # moments: to round-off
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=5 * np.finfo(f32).eps * np.abs(a).max(initial=0))


def test_bfloat16_gradients_need_od_scale_by_adams_float32_moments():
  # optax.scale_by_adam (mu_dtype alone) computes (1-b1)·g in bfloat16 before widening:
  # not what the kernel does, so that combination takes the plain step.
  params = _tree()
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tx = od.adamw(1e-3, mu_dtype=jnp.float32)
  plan = od.fused_step(tx).explain(params, grads, tx.init(params))
  assert plan.startswith("plain") and "takes grads in ['float32']" in plan


def test_without_the_kernel_fused_step_is_the_plain_step(monkeypatch):
  why = "the CPU kernel is not available: no C++ compiler (test)"
  monkeypatch.setattr(_kernel_build, "unavailable", lambda: why)
  tx = od.adamw(1e-2, weight_decay=1e-1, mask=od.min_ndim(2))
  params = _tree(2)
  step = od.fused_step(tx)
  assert step.explain(params, params, tx.init(params)) == (
      f"plain: tx.update + optax.apply_updates; no kernel: {why}")
  hlo = jax.jit(step).lower(params, params, tx.init(params)).as_text()
  assert "custom_call" not in hlo
  p1, s1 = _run(plain_step(tx), tx, params, steps=3)
  p2, s2 = _run(step, tx, params, steps=3)
  chex.assert_trees_all_equal((p1, s1), (p2, s2))
  with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
    jax.jit(od.fused_step(tx, kernel="require"))(params, params, tx.init(params))


@needs_kernel
def test_kernel_step_is_one_in_place_custom_call():
  n = 2**20 + 3
  params = {"kernel": jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32), "bias": jnp.ones(5)}
  tx = od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias"))
  step = jax.jit(od.fused_step(tx, kernel="require"), donate_argnums=(0, 2))
  compiled = step.lower(params, params, tx.init(params)).compile()
  hlo = compiled.as_text()
  assert len(re.findall(r"custom-call\(", hlo)) == 1
  assert 'custom_call_target="optax_decoupled_adam_step"' in hlo
  # No full-size fusion or copy: the kernel reads and writes every array once, in place.
  assert not re.search(rf"= f32\[{n}\]\{{0\}} (fusion|copy)\(", hlo)
  ma = compiled.memory_analysis()
  assert ma.alias_size_in_bytes >= 12 * n and ma.temp_size_in_bytes <= 4096


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_kernel_inside_a_loop_of_steps_and_under_vmap():
  tx = od.adamw(1e-2, weight_decay=1e-1)
  params = _tree(3)
  grads = _grads(params, 1)
  step = od.fused_step(tx, kernel="require")

  def ten_steps(p, s):
    return jax.lax.fori_loop(0, 10, lambda _, c: step(c[0], grads, c[1]), (p, s))

  p1, s1 = jax.jit(ten_steps)(params, tx.init(params))
  p2, s2 = params, tx.init(params)
  for _ in range(10):
    p2, s2 = jax.jit(plain_step(tx))(p2, grads, s2)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # vmap over two copies of the problem (e.g. seeds): each equals its own unbatched step.
  batch = jax.tree.map(lambda x, y: jnp.stack([x, y]), params, _tree(4))
  pb, _ = jax.jit(jax.vmap(step, in_axes=(0, None, 0)))(batch, grads, jax.vmap(tx.init)(batch))
  for k, single in enumerate([params, _tree(4)]):
    p, _ = jax.jit(step)(single, grads, tx.init(single))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(jax.tree.map(lambda x, k=k: x[k], pb))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # compiles the kernel
def test_build_compiles_a_loadable_kernel_into_the_cache_or_says_why_not(tmp_path,
                                                                         monkeypatch):
  monkeypatch.delenv("OPTAX_DECOUPLED_NO_KERNEL", raising=False)
  monkeypatch.setenv("CXX", "no-such-compiler-od")
  library, message = _kernel_build.build(tmp_path)
  assert library is None and "no C++ compiler" in message and "set CXX" in message
  monkeypatch.setenv("CXX", CXX)
  monkeypatch.setenv("OPTAX_DECOUPLED_NO_KERNEL", "1")
  assert _kernel_build.build(tmp_path) == (None, "OPTAX_DECOUPLED_NO_KERNEL is set")
  monkeypatch.delenv("OPTAX_DECOUPLED_NO_KERNEL")
  library, message = _kernel_build.build(tmp_path)
  if shutil.which(CXX):
    assert library is not None and library.parent == tmp_path, message
    assert ctypes.CDLL(str(library)).OdAdamStep
    assert _kernel_build.build(tmp_path) == (library, f"cached in {tmp_path}")  # built once
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no temporary left
  else:
    assert library is None and "no C++ compiler" in message


@needs_kernel
def test_kernel_is_correct_when_the_grads_are_the_params_buffer():
  # One buffer as θ (updated in place) and as g (read): XLA must copy before the call.
  tx = od.adamw(1e-2, weight_decay=1e-1)
  params = _tree(5)
  fused = jax.jit(lambda p, s: od.fused_step(tx, kernel="require")(p, p, s),
                  donate_argnums=(0, 1))
  p1, s1 = fused(jax.tree.map(jnp.copy, params), tx.init(params))
  p2, s2 = jax.jit(lambda p, s: plain_step(tx)(p, p, s))(params, tx.init(params))
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("flat", [False, True])
def test_accelerators_lower_to_the_plain_xla_step(flat):
  # The kernel is registered for CPU only; lowered for a GPU (no GPU needed to lower),
  # fused_step must contain no call to it, and for CPU exactly one.
  tx = od.adamw(1e-2, weight_decay=1e-1, mask=od.exclude_names("bias"))
  params = _tree()
  if flat:
    layout = od.FlatLayout.of(params)
    args = (layout.pack(params), layout.pack(params), layout.pack_state(tx.init(params)))
    step = jax.jit(od.fused_step(tx, kernel="require", layout=layout))
  else:
    args = (params, params, tx.init(params))
    step = jax.jit(od.fused_step(tx, kernel="require"))
  checks = [jax.export.DisabledSafetyCheck.custom_call("optax_decoupled_adam_step")]
  for platform, calls in [("cuda", 0), ("cpu", 1)]:
    module = jax.export.export(step, platforms=[platform], disabled_checks=checks)(*args)
    assert module.mlir_module().count("custom_call @optax_decoupled_adam_step") == calls


def test_a_schedule_of_shape_one_leaves_the_kernel_and_equals_the_plain_step():
  # A schedule returning shape (1,) broadcasts in the plain step; the kernel takes scalars,
  # so the step must not take it (and must not crash): explain says why.
  params = {"w": jnp.ones((64, 32))}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = od.adamw(lambda t: jnp.full((1,), 1e-3), weight_decay=0.1)
  state = tx.init(params)
  step = od.fused_step(tx)
  assert "scalar learning_rate" in step.explain(params, grads, state)
  new, _ = jax.jit(step)(params, grads, state)
  np.testing.assert_allclose(new["w"], plain_step(tx)(params, grads, state)[0]["w"], rtol=1e-6)


def test_multisteps_is_explained_without_calling_it_coupled_l2():
  ms = optax.MultiSteps(od.adamw(1e-3, weight_decay=0.1), 2).gradient_transformation()
  params = {"w": jnp.ones((8, 4))}
  why = od.fused_step(ms).explain(params, params, ms.init(params))
  assert "coupled L2" not in why and why.startswith("plain")


@needs_kernel
def test_many_leaves_are_stepped_in_groups_and_equal_the_plain_step():
  # One call per group of leaves keeps XLA's compile time linear in the leaves; the result
  # is the same step (oracle: tx.update + optax.apply_updates).
  from optax_decoupled import _kernel

  n = 3 * _kernel._GROUP + 5
  params = {f"leaf{i:03d}": jnp.full((16,), 1.0 + i / n) for i in range(n)}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  tx = od.adamw(1e-2, weight_decay=0.1)
  state = tx.init(params)
  step = jax.jit(od.fused_step(tx, kernel="require"))
  hlo = step.lower(params, grads, state).compile().as_text()
  assert len(re.findall(r"custom-call\(", hlo)) == 4
  got, _ = step(params, grads, state)
  want, _ = plain_step(tx)(params, grads, state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), got, want)


@needs_kernel
def test_grad_through_a_kernel_step_is_the_plain_steps_grad_and_export_says_what_to_do():
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
  tx = od.adamw(1e-2, weight_decay=0.1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  fused = od.fused_step(tx, kernel="require")

  def loss(p, step):
    return jnp.sum(step(p, grads, state)[0]["w"] ** 2)

  np.testing.assert_allclose(jax.grad(loss)(params, fused)["w"],
                             jax.grad(loss)(params, plain_step(tx))["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="custom calls"):
    jax.export.export(jax.jit(fused), platforms=["cpu"])(params, grads, state)
  exported = jax.export.export(jax.jit(od.fused_step(tx, kernel="off")),
                               platforms=["cpu"])(params, grads, state)
  np.testing.assert_allclose(exported.call(params, grads, state)[0]["w"],
                             plain_step(tx)(params, grads, state)[0]["w"], rtol=1e-6)


EXPORTED = {
    "od.adamw": lambda: od.adamw(1e-2, weight_decay=1e-1, mask=od.exclude_names("bias")),
    "od.adam_l2": lambda: od.adam_l2(1e-2, weight_decay=1e-3),
    "od.sgd_l2": lambda: od.sgd_l2(1e-2, 0.9, weight_decay=1e-3),
    "od.sgdw": lambda: od.sgdw(1e-2, 0.9, weight_decay=1e-3),
    "od.bert_adamw": lambda: od.bert_adamw(1e-2),
    "clip + od.adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), od.adamw(1e-2)),
    "inject_hyperparams(od.adamw)": lambda: optax.inject_hyperparams(od.adamw)(
        learning_rate=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(EXPORTED))
def test_every_alias_exports_for_accelerators_without_kernel_or_host_callback(name, platform):
  # Lowered for an accelerator (no accelerator needed to lower), the fused step of every
  # alias is the plain XLA step: no call to the CPU kernel, no host callback, only XLA ops.
  tx = EXPORTED[name]()
  params = _tree()
  module = jax.export.export(jax.jit(od.fused_step(tx)), platforms=[platform])(
      params, params, tx.init(params))
  text = module.mlir_module()
  targets = set(re.findall(r"custom_call @(\w+)", text))
  # Host callbacks and the kernel lower to custom calls; only sharding annotations may remain.
  assert targets <= {"Sharding"}, (name, platform, targets)
