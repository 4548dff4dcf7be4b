"""``od.fused_step``'s contract: the kernel where it applies, else exactly the plain step.

Oracle: the plain step ``tx.update`` + ``optax.apply_updates`` of the same transformation
(``tests.fixtures.plain_step``): bit for bit where the step is the plain one, to the kernel
tests' tolerance where the kernel computes it (it rounds each operation as optax writes it,
XLA's plain step fuses some multiply-adds).

* Every optimizer of optax and ``optax.contrib`` (found by walking their public names), and
  transformations with any operation (row norms, random draws, dots, ``iota``, stochastic
  rounding, ``apply_if_finite``, ``MultiSteps``), run through ``fused_step`` without an
  error and with the plain step's result.
* Under the transformations users apply to a train step (``jit``, ``vmap`` over a
  closed-over learning rate, ``grad``/``jvp`` with respect to a closed-over learning rate or
  weight decay, ``scan`` over steps), the kernel step equals the plain step, derivatives
  included.
* A transformation recognised from optax's closures is verified before the kernel is used:
  a look-alike with the same names but other arithmetic takes the plain step.
* Bad input fails at the boundary: a non-transformation when the step is built, mismatched
  grads with the plain step's own error.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests.fixtures import assert_kernel_close, plain_step
from tests.test_kernel import needs_kernel


def _tree(seed=0):
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {"dense": {"kernel": a(16, 40), "bias": a(40)}, "LayerNorm": {"scale": a(40)},
          "head": a(3, 5, 7)}


def _grads(params, t):
  return jax.tree.map(lambda x: jnp.sin(x * (t + 2.0)), params)


def _optimizers(module) -> dict:
  """Every public optimizer factory of ``module`` that builds from a learning rate alone."""
  found = {}
  for name in sorted(dir(module)):
    fn = getattr(module, name)
    if name.startswith("_") or not inspect.isfunction(fn):
      continue
    try:
      params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
      continue
    required = [p for p in params.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if [p.name for p in required] not in ([], ["learning_rate"]):
      continue
    try:
      tx = fn(learning_rate=1e-2) if "learning_rate" in params else fn()
    except Exception:  # noqa: BLE001 - not a factory of this form.
      continue
    if isinstance(tx, optax.GradientTransformation):
      found[f"{module.__name__}.{name}"] = tx
  return found


OPTIMIZERS = {**_optimizers(optax), **_optimizers(optax.contrib)}


def test_the_walk_finds_the_optimizers():
  # The table below is only as good as the walk: it must find the usual suspects.
  for name in ("optax.adamw", "optax.lamb", "optax.sgd", "optax.lion", "optax.adafactor",
               "optax.contrib.muon", "optax.contrib.schedule_free_adamw",
               "optax.contrib.prodigy"):
    assert name in OPTIMIZERS, name
  assert len(OPTIMIZERS) >= 30


@pytest.mark.slow  # compiles two steps of every optimizer of optax
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optax_optimizer_is_the_plain_step_or_the_kernel(name):
  tx = OPTIMIZERS[name]
  params = _tree()
  state = tx.init(params)
  grads = _grads(params, 0)
  step = od.fused_step(tx)
  try:
    want = jax.jit(plain_step(tx))(params, grads, state)
  except (TypeError, ValueError) as e:  # needs extra arguments (a loss value, a function)
    with pytest.raises(type(e)):  # the plain step's own error, not another one
      jax.jit(step)(params, grads, state)
    return
  path = step.explain(params, grads, state).split(":")[0]
  got = jax.jit(step)(params, grads, state)
  if path == "plain":
    chex.assert_trees_all_equal(got, want)
  else:
    assert path == "kernel" and name == "optax.adamw", (name, path)
    assert_kernel_close(got, want, name)


def _row_normalized():
  def update(u, s, p=None):
    return jax.tree.map(lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1.0), u), s
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _noisy():
  def update(u, s, p=None):
    key = jax.random.key(0)  # a draw whose inputs are all scalars
    return jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(key, x.shape), u), s
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _iota():
  return optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None: (jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype)
                                         .reshape(x.shape), u), s))


ANY_OPERATION = {
    "row norms, then od.adamw": lambda: optax.chain(_row_normalized(), od.adamw(1e-2)),
    "random draws": lambda: optax.chain(_noisy(), optax.sgd(0.1)),
    "iota": _iota,
    "od.stochastic_rounding(od.adamw)": lambda: od.stochastic_rounding(
        od.adamw(1e-2, weight_decay=0.1), seed=0),
    "optax.apply_if_finite(od.adamw)": lambda: optax.apply_if_finite(
        od.adamw(1e-2, weight_decay=0.1), 3),
    "optax.MultiSteps(od.adamw)": lambda: optax.MultiSteps(od.adamw(1e-2, weight_decay=0.1), 2),
    "od.adamw, then a clip": lambda: optax.chain(od.adamw(1e-2), optax.clip_by_global_norm(1e-3)),
    "optax.masked(optax.adam)": lambda: optax.masked(optax.adam(1e-2), od.min_ndim(2)),
    "od.sgdw": lambda: od.sgdw(1e-2, 0.9, weight_decay=1e-3),
}


@pytest.mark.filterwarnings("ignore::optax_decoupled.LowPrecisionDecayWarning")
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(ANY_OPERATION))
def test_any_operation_is_the_plain_step_never_an_error(name, dtype):
  tx = ANY_OPERATION[name]()
  params = jax.tree.map(lambda x: x.astype(dtype), _tree())
  p1 = p2 = params
  s1 = s2 = tx.init(params)
  step = jax.jit(od.fused_step(tx))
  assert od.fused_step(tx).explain(params, params, s1).startswith("plain")
  for t in range(3):
    g = jax.tree.map(lambda x: x.astype(dtype), _grads(params, t))
    p1, s1 = jax.jit(plain_step(tx))(p1, g, s1)
    p2, s2 = step(p2, g, s2)
  chex.assert_trees_all_equal((p1, s1), (p2, s2))


# --- under JAX's transformations -----------------------------------------------------------

def _final(step_of, lr, wd, steps=2):
  """The weights after ``steps`` steps of ``step_of(od.adamw(lr, weight_decay=wd))``."""
  tx = od.adamw(lr, weight_decay=wd, mask=od.exclude_names("bias"))
  p, s = _tree(), tx.init(_tree())
  step = step_of(tx)
  for t in range(steps):
    p, s = step(p, _grads(_tree(), t), s)
  return p


def _recording(seen: list):
  """``tx -> fused step`` that appends the path each trace takes to ``seen``."""
  def fused_of(tx):
    step = od.fused_step(tx)

    def run(p, g, s):
      seen.append(step.explain(p, g, s).split(":")[0])
      return step(p, g, s)
    return run
  return fused_of


def _loss(step_of):
  return lambda lr, wd: sum(jnp.sum(x**2) for x in jax.tree.leaves(_final(step_of, lr, wd)))


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_grad_and_jvp_with_respect_to_a_closed_over_learning_rate_and_weight_decay():
  seen = []

  fused_of = _recording(seen)

  fused, plain = _loss(fused_of), _loss(plain_step)
  got = jax.grad(fused, argnums=(0, 1))(1e-2, 0.1)
  want = jax.grad(plain, argnums=(0, 1))(1e-2, 0.1)
  assert set(seen) == {"kernel"}, seen
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(want[0])) > 1e-3 and abs(float(want[1])) > 1e-6  # not trivially zero
  got = jax.jvp(lambda lr: fused(lr, 0.1), (1e-2,), (1.0,))
  want = jax.jvp(lambda lr: plain(lr, 0.1), (1e-2,), (1.0,))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got = jax.jit(jax.grad(fused, argnums=1))(1e-2, 0.1)
  np.testing.assert_allclose(got, jax.grad(plain, argnums=1)(1e-2, 0.1), rtol=1e-5)


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_vmap_over_a_closed_over_learning_rate_runs_the_kernel_per_element():
  lrs = jnp.array([1e-3, 1e-2, 3e-2])
  seen = []

  fused_of = _recording(seen)

  got = jax.jit(jax.vmap(lambda lr: _final(fused_of, lr, 0.1)))(lrs)
  want = jax.vmap(lambda lr: _final(plain_step, lr, 0.1))(lrs)
  assert set(seen) == {"kernel"}, seen
  assert_kernel_close(got, want, "vmap over lr")
  for k, lr in enumerate(lrs):  # each element is its own run
    assert_kernel_close(jax.tree.map(lambda x, k=k: x[k], got),
                        _final(plain_step, float(lr), 0.1), f"lr={lr}")


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_scan_over_steps_equals_the_plain_steps():
  tx = optax.chain(optax.clip_by_global_norm(1.0), od.adamw(1e-2, weight_decay=0.1))
  params = _tree()
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[_grads(params, t) for t in range(5)])

  def run(step):
    def body(carry, g):
      return step(*carry[:1], g, carry[1]), None
    return jax.jit(lambda p, s: jax.lax.scan(body, (p, s), grads)[0])(params, tx.init(params))

  assert_kernel_close(run(od.fused_step(tx)), run(plain_step(tx)), "scan")


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_second_derivatives_of_a_kernel_step_are_the_plain_steps():
  # A Hessian (jacfwd of grad) differentiates the derivative rule itself: its primal output
  # must not be the FFI call, which has no derivative.
  # eps = 0.5: Adam's first step g/(|g| + eps) is smooth in g, so the Hessian is well above
  # round-off (with eps = 1e-8 it is sign(g), and the Hessian is round-off alone).
  tx = od.adamw(1e-2, eps=0.5, weight_decay=0.1)
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.linspace(0.5, 1.5, 3)}
  state = tx.init(params)
  assert od.fused_step(tx).explain(params, params, state).startswith("kernel")

  def loss(step_of):
    return lambda g: sum(jnp.sum(x**3) for x in jax.tree.leaves(step_of(tx)(params, g, state)[0]))

  g = _grads(params, 0)
  got, want = jax.hessian(loss(od.fused_step))(g), jax.hessian(loss(plain_step))(g)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  assert scale > 1e-4, scale
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5 * scale)

  def outer(lr):
    tx = od.adamw(lr, weight_decay=0.1)
    # "b" > 0: d²/dη² Σ b'³ = 6 Σ b'·(∂b'/∂η)² is well above round-off (Σ over "w", which is
    # symmetric about 0, nearly cancels).
    return lambda step_of: jnp.sum(step_of(tx)(params, g, tx.init(params))[0]["b"] ** 3)
  got = jax.grad(jax.grad(lambda lr: outer(lr)(od.fused_step)))(1e-2)
  want = jax.grad(jax.grad(lambda lr: outer(lr)(plain_step)))(1e-2)
  assert abs(float(want)) > 1e-2, want
  np.testing.assert_allclose(got, want, rtol=1e-4)


_X64_MOMENTS = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax, optax_decoupled as od
params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)}
grads = {"w": jnp.linspace(0.5, -0.5, 6, dtype=jnp.float32)}
for tx in (od.adamw(1e-2, b1=jnp.float64(0.9), weight_decay=0.1),
           optax.adamw(1e-2, b1=jnp.float64(0.9), weight_decay=0.1)):
  state = tx.init(params)
  why = od.fused_step(tx).explain(params, grads, state)
  assert why.startswith("plain") and "moments" in why, why
  got = jax.jit(od.fused_step(tx))(params, grads, state)
  u, want_state = tx.update(grads, state, params)
  want = (optax.apply_updates(params, u), want_state)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b)
print("ok")
"""


@pytest.mark.slow  # a fresh process with jax_enable_x64
def test_a_float64_hyperparameter_that_promotes_the_moments_takes_the_plain_step():
  # With x64, β₁ = jnp.float64(0.9) makes the chain's moments float64; the kernel writes
  # float32 ones in place, so the two branches of the step would not even agree on types.
  out = subprocess.run([sys.executable, "-c", _X64_MOMENTS], capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --- recognition from optax's closures is verified -------------------------------------------
# Look-alikes of optax.adamw's pieces: functions with optax's names and closure variables
# (what the recognition reads), whose arithmetic is optax's (faithful=True) or not.

def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, nesterov=False,
                  faithful=True):
  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

  def update_fn(updates, state, params=None):
    del params
    assert mu_dtype is None and not nesterov
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, updates, state.nu)
    count = optax.safe_increment(state.count)
    bc1, bc2 = 1 - b1**count, 1 - b2**count
    if not faithful:  # the bias corrections swapped
      bc1, bc2 = bc2, bc1
    u = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps), mu, nu)
    return u, optax.ScaleByAdamState(count, mu, nu)
  return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay, faithful=True):
  def update_fn(updates, state, params):
    c = weight_decay if faithful else 2 * weight_decay  # weight_decay re-meant
    return jax.tree.map(lambda u, p: u + c * p, updates, params), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def scale(step_size):
  def update_fn(updates, state, params=None):
    return jax.tree.map(lambda u: step_size * u, updates), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def chain(*txs):
  update_fns = tuple(t.update for t in txs)

  def update_fn(updates, state, params=None):
    new = []
    for fn, s in zip(update_fns, state):
      updates, s = fn(updates, s, params)
      new.append(s)
    return updates, tuple(new)
  return optax.GradientTransformation(lambda p: tuple(t.init(p) for t in txs), update_fn)


def _look_alike(adam_faithful=True, decay_faithful=True):
  return chain(scale_by_adam(faithful=adam_faithful),
               add_decayed_weights(0.1, faithful=decay_faithful), scale(-1e-2))


@needs_kernel
@pytest.mark.parametrize("adam_faithful, decay_faithful", [(False, True), (True, False)])
def test_a_look_alike_with_other_arithmetic_takes_the_plain_step(adam_faithful, decay_faithful):
  tx = _look_alike(adam_faithful, decay_faithful)
  params = _tree()
  state = tx.init(params)
  why = od.fused_step(tx).explain(params, params, state)
  assert why.startswith("plain") and "does not compute what the kernel would" in why, why
  for t in range(2):  # the same transformation, the same numbers
    g = _grads(params, t)
    chex.assert_trees_all_equal(jax.jit(od.fused_step(tx))(params, g, state),
                                jax.jit(plain_step(tx))(params, g, state))
  with pytest.raises(ValueError, match="kernel='require'.*does not compute"):
    jax.jit(od.fused_step(tx, kernel="require"))(params, params, state)
  # explain says so, and does not raise.
  why = od.fused_step(tx, kernel="require").explain(params, params, state)
  assert why.startswith("error: ") and "does not compute" in why, why


@needs_kernel
def test_a_faithful_look_alike_is_verified_and_takes_the_kernel():
  # The positive control: the check passes what optax.adamw computes.
  tx = _look_alike()
  params = _tree()
  state = tx.init(params)
  assert od.fused_step(tx).explain(params, params, state).startswith("kernel")
  g = _grads(params, 0)
  assert_kernel_close(jax.jit(od.fused_step(tx))(params, g, state),
                      jax.jit(plain_step(tx))(params, g, state), "faithful look-alike")


@needs_kernel
def test_a_closed_over_traced_hyperparameter_of_optax_adamw_cannot_be_verified():
  # optax.adamw's λ traced by an outer jit: the check cannot evaluate it, so the plain step.
  params = _tree()

  def run(wd):
    tx = optax.adamw(1e-2, weight_decay=wd)
    state = tx.init(params)
    return od.fused_step(tx).explain(params, params, state), od.fused_step(tx)(
        params, params, state)

  seen = []
  got = jax.jit(lambda wd: (seen.append(run(wd)[0]), run(wd)[1])[1])(0.1)
  assert seen[0].startswith("plain") and "could not be checked" in seen[0], seen
  def plain(wd):
    tx = optax.adamw(1e-2, weight_decay=wd)
    return plain_step(tx)(params, params, tx.init(params))
  chex.assert_trees_all_equal(got, jax.jit(plain)(0.1))


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_a_clip_on_bfloat16_weights_is_verified_with_the_gradients_dtype():
  # The clip is read from optax's closures, so the kernel is checked on probes first; the
  # probes' gradients take the real gradients' dtype (float32 here), not the weights'.
  tx = optax.chain(optax.clip_by_global_norm(0.5),
                   od.adamw(1e-2, weight_decay=0.1, mu_dtype=jnp.float32, nu_dtype=jnp.float32))
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree())
  grads = _grads(_tree(), 0)
  state = tx.init(params)
  why = od.fused_step(tx).explain(params, grads, state)
  assert why.startswith("kernel"), why
  got = jax.jit(od.fused_step(tx))(params, grads, state)
  want = jax.jit(plain_step(tx))(params, grads, state)
  chex.assert_trees_all_equal_dtypes(got, want)
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):  # one bfloat16 rounding
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2**-7, atol=0)
  assert_kernel_close(got[1], want[1], "moments")


# --- the boundary ----------------------------------------------------------------------------

def test_a_non_transformation_fails_when_the_step_is_built():
  with pytest.raises(TypeError, match="call it"):
    od.fused_step(od.adamw)
  with pytest.raises(TypeError, match="GradientTransformation, got int"):
    od.fused_step(3)
  with pytest.raises(TypeError, match="layout"):
    od.fused_step(od.adamw(1e-3), layout="flat")


@pytest.mark.parametrize("kind", ["structure", "shape"])
def test_mismatched_grads_fail_with_the_plain_steps_error(kind):
  tx = od.adamw(1e-2, weight_decay=0.1)
  params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}
  grads = ({"w": jnp.ones((64, 64))} if kind == "structure"
           else {"w": jnp.ones((64, 63)), "b": jnp.ones(64)})
  state = tx.init(params)
  with pytest.raises(Exception) as plain_error:
    jax.jit(plain_step(tx))(params, grads, state)
  assert "no kernel" in od.fused_step(tx).explain(params, grads, state)
  with pytest.raises(type(plain_error.value)) as fused_error:
    jax.jit(od.fused_step(tx))(params, grads, state)
  assert str(fused_error.value).splitlines()[0] == str(plain_error.value).splitlines()[0]
