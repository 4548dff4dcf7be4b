"""Reference optimizers for the parity tests: torch runners and numpy transcriptions.

Every runner takes the same inputs and returns the same thing, so one parity suite can put
any two of them side by side:

* ``leaves``: the initial parameters as a list of float32 numpy arrays (flattening order of
  the parameter tree), and for name rules ``names``, their "/"-joined paths;
* ``grad_fn(t, leaves) -> grads``: the gradient at 0-based step ``t`` *at the current
  parameters*, so the gradient depends on the trajectory (a quadratic loss plus noise, see
  :func:`quadratic_grad_fn`) and any divergence between two optimizers feeds back;
* ``steps``: the number of updates;

and returns the trajectory as a float32 array of shape ``(steps + 1, n_params)``: row ``t`` is
every parameter after ``t`` updates, leaves raveled and concatenated in flattening order.

The learning rate ``lr`` is a float or a function of the 0-based step ``t`` (an optax
schedule): step ``t`` uses ``lr(t)``, which is optax's convention (``scale_by_learning_rate``
evaluates the schedule at the count of updates already applied) and what
``torch.optim.lr_scheduler.LambdaLR`` gives when ``scheduler.step()`` follows ``opt.step()``.

Oracles here are written from the reference code, never from ``optax_decoupled``:
* torch.optim.AdamW / Adam / SGD, run in float32 on CPU with ``foreach=False`` (torch's
  single-tensor path, its default on CPU);
* optax transforms (``run_optax``, which also runs ``optax_decoupled``'s transforms);
* :func:`adam_update`: Kingma & Ba 2015, Algorithm 1 (and Dozat 2016 for Nesterov);
* :func:`bert_adamw_trajectory`: google-research/bert ``optimization.py``,
  ``AdamWeightDecayOptimizer.apply_gradients`` and ``_do_use_weight_decay``;
* :func:`keras_adamw_trajectory`: Keras 3 ``keras/src/optimizers/adam.py``
  (``Adam.update_step``) and ``keras/src/optimizers/base_optimizer.py``
  (``_apply_weight_decay``);
* timm itself (:func:`import_timm`) with :func:`run_torch_param_groups`: torch optimizers on
  timm's parameter groups (``timm.optim.param_groups_layer_decay``).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from tests.fixtures import multiscale_grads

Leaves = list[np.ndarray]
GradFn = Callable[[int, Leaves], Leaves]
LR = float | Callable[[int], Any]


# --- trees, names, trajectories ---------------------------------------------------------------


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_names(tree: Any) -> list[str]:
  """'/'-joined key paths, written here independently of ``optax_decoupled._paths``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["/".join(_key_str(k) for k in path) for path, _ in flat]


def to_leaves(tree: Any) -> Leaves:
  """The leaves of ``tree`` as float32 numpy copies."""
  return [np.array(x, dtype=np.float32) for x in jax.tree.leaves(tree)]


def flat(leaves: Sequence[Any]) -> np.ndarray:
  """One row of a trajectory: every leaf raveled and concatenated."""
  return np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves])


def leaf_slices(leaves: Sequence[Any]) -> list[slice]:
  """The columns of each leaf in a trajectory row."""
  out, start = [], 0
  for x in leaves:
    n = int(np.size(x))
    out.append(slice(start, start + n))
    start += n
  return out


@functools.lru_cache(maxsize=64)
def _schedule_table(schedule: Callable[[Any], Any], steps: int) -> np.ndarray:
  # One vectorised evaluation (optax schedules are elementwise jnp functions of the count).
  counts = jax.numpy.arange(steps, dtype=jax.numpy.int32)
  return np.asarray(jax.numpy.broadcast_to(schedule(counts), (steps,)), np.float32)


def lr_at(lr: LR, t: int) -> float:
  """The learning rate at 0-based step ``t`` as a Python float (float32-rounded)."""
  t = int(t)
  if callable(lr):
    return float(_schedule_table(lr, max(128, 2 ** (t + 1).bit_length()))[t])
  return float(np.float32(lr))


# --- gradients ------------------------------------------------------------------------------


class QuadraticGrads:
  """Gradient of a separable quadratic loss plus noise, with leaves on scales 1e-4 .. 1e2.

  For leaf ``i`` with scale ``c_i = 10**(i % 7 - 4)`` (the scale of
  ``tests.fixtures.multiscale_grads``): ``g_i = c_i (θ_i − θ*_i) + noise·ξ_i(t)`` where
  ``ξ(t) = multiscale_grads(params, t, seed)`` has standard deviation ``c_i``. The gradient
  depends on the current parameters (curvature ``c_i``), so trajectories feed back.
  Computed in float32 numpy, identically for every optimizer under test.
  """

  def __init__(self, params: Any, seed: int = 0, noise: float = 1.0):
    self.params = params
    self.seed = seed
    leaves = to_leaves(params)
    rng = np.random.default_rng(seed + 7)
    self.targets = [rng.normal(size=x.shape).astype(np.float32) for x in leaves]
    self.curv = [np.float32(10.0 ** (i % 7 - 4)) for i in range(len(leaves))]
    self.noise = np.float32(noise)
    self._cache: dict[int, Leaves] = {}

  def xi(self, t: int) -> Leaves:
    if t not in self._cache:
      self._cache[t] = [self.noise * z for z in
                        to_leaves(multiscale_grads(self.params, t, self.seed))]
    return self._cache[t]

  def __call__(self, t: int, current: Sequence[Any]) -> Leaves:
    return [(c * (np.asarray(p, np.float32) - s) + z).astype(np.float32)
            for c, p, s, z in zip(self.curv, current, self.targets, self.xi(t))]


def quadratic_grad_fn(params: Any, seed: int = 0, noise: float = 1.0) -> QuadraticGrads:
  """A :class:`QuadraticGrads` for ``params``."""
  return QuadraticGrads(params, seed, noise)


# --- JAX side: any optax GradientTransformation ------------------------------------------------


def run_optax(tx: optax.GradientTransformation, params: Any, grad_fn: GradFn, steps: int,
              wrap: Callable[[Callable], Callable] = jax.jit):
  """Trajectory of ``tx`` (``tx.update`` + ``optax.apply_updates``, wrapped by ``wrap``) from
  ``params``.

  ``wrap`` is ``jax.jit`` by default; a chex test passes ``self.variant`` so that the same
  trajectory runs with jit, without jit or under pmap. (A Python loop around a jitted step:
  on this tree it compiles several times faster than one ``lax.scan`` over all steps, and
  compilation dominates the run time.)
  """
  treedef = jax.tree.structure(params)
  params = jax.tree.map(lambda x: np.array(x, np.float32), params)
  state = wrap(tx.init)(params)

  @wrap
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  leaves = to_leaves(params)
  rows = [flat(leaves)]
  for t in range(steps):
    grads = jax.tree.unflatten(treedef, grad_fn(t, leaves))
    params, state = step(params, state, grads)
    leaves = to_leaves(params)
    rows.append(flat(leaves))
  return np.stack(rows)


# --- torch.optim --------------------------------------------------------------------------------


def run_torch(
    opt_name: str,
    leaves: Leaves,
    grad_fn: GradFn,
    steps: int,
    lr: LR,
    groups: Sequence[tuple[Sequence[int], dict]] | None = None,
    **options: Any,
) -> np.ndarray:
  """Trajectory of ``torch.optim.<opt_name>`` (float32, CPU, single-tensor path).

  Args:
    opt_name: "AdamW", "Adam" or "SGD".
    leaves, grad_fn, steps: see the module docstring.
    lr: a float, or a function of the 0-based step; ``param_group["lr"]`` is set to
      ``lr(t)`` before step ``t`` (what ``LambdaLR`` does).
    groups: optional param groups as ``(leaf indices, per-group options)``, e.g.
      ``[(decayed, {}), (excluded, {"weight_decay": 0.0})]``; every leaf must be in one.
    **options: the optimizer's keyword arguments (betas, eps, weight_decay, momentum, ...).
  """
  import torch  # a test extra, imported here only: callers importorskip it first.

  tensors = [torch.tensor(np.array(x, np.float32), requires_grad=True) for x in leaves]
  if groups is None:
    param_groups = [{"params": tensors}]
  else:
    seen = sorted(i for idx, _ in groups for i in idx)
    if seen != list(range(len(tensors))):
      raise ValueError("run_torch: groups must cover every leaf exactly once.")
    param_groups = [{"params": [tensors[i] for i in idx], **opts} for idx, opts in groups]
  opt_cls = getattr(torch.optim, opt_name)
  opt = opt_cls(param_groups, lr=lr_at(lr, 0), foreach=False, **options)
  rows = [flat(leaves)]
  current = [np.array(x, np.float32) for x in leaves]
  for t in range(steps):
    for group in opt.param_groups:
      group["lr"] = lr_at(lr, t)
    grads = grad_fn(t, current)
    for p, g in zip(tensors, grads):
      p.grad = torch.from_numpy(np.array(g, np.float32))
    opt.step()
    current = [p.detach().numpy().copy() for p in tensors]
    rows.append(flat(current))
  return np.stack(rows)


# --- numpy transcriptions -----------------------------------------------------------------------


def bert_do_use_weight_decay(
    param_name: str, weight_decay_rate: float, exclude: Sequence[str] | None
) -> bool:
  """google-research/bert optimization.py, ``AdamWeightDecayOptimizer._do_use_weight_decay``.

  ``if not self.weight_decay_rate: return False``; then ``False`` as soon as
  ``re.search(r, param_name) is not None`` for some ``r`` in ``exclude_from_weight_decay``.
  """
  if not weight_decay_rate:
    return False
  if exclude:
    for r in exclude:
      if re.search(r, param_name) is not None:
        return False
  return True


def bert_adam_update(
    grad: np.ndarray, m: np.ndarray, v: np.ndarray, beta_1: float = 0.9,
    beta_2: float = 0.999, epsilon: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(update, next_m, next_v)`` of BERT's ``apply_gradients`` before weight decay.

  google-research/bert optimization.py, ``AdamWeightDecayOptimizer.apply_gradients``::

    next_m = tf.multiply(self.beta_1, m) + tf.multiply(1.0 - self.beta_1, grad)
    next_v = tf.multiply(self.beta_2, v) + tf.multiply(1.0 - self.beta_2, tf.square(grad))
    update = next_m / (tf.sqrt(next_v) + self.epsilon)
  """
  f32 = np.float32
  grad = np.asarray(grad, f32)
  next_m = f32(beta_1) * m + f32(1.0 - beta_1) * grad
  next_v = f32(beta_2) * v + f32(1.0 - beta_2) * np.square(grad)
  update = next_m / (np.sqrt(next_v) + f32(epsilon))
  return update.astype(f32), next_m.astype(f32), next_v.astype(f32)


def adam_update(
    grad: np.ndarray, m: np.ndarray, v: np.ndarray, t: int, beta_1: float = 0.9,
    beta_2: float = 0.999, epsilon: float = 1e-8, nesterov: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(update, next_m, next_v)`` of Adam's direction at 1-based step ``t``, float32 numpy.

  Kingma & Ba 2015 (https://arxiv.org/abs/1412.6980), Algorithm 1, without the learning
  rate, ε outside the square root (torch/optim/adam.py ``_single_tensor_adam``)::

    m_t = β1 m + (1 − β1) g;  v_t = β2 v + (1 − β2) g²
    m̂ = m_t / (1 − β1^t);  v̂ = v_t / (1 − β2^t);  update = m̂ / (√v̂ + ε)

  ``nesterov``: Dozat 2016 (Incorporating Nesterov Momentum into Adam), with a constant β1,
  as optax/_src/transform.py ``scale_by_adam(nesterov=True)`` writes it::

    m̂ = β1 m_t / (1 − β1^(t+1)) + (1 − β1) g / (1 − β1^t)
  """
  f32 = np.float32
  b1, b2 = f32(beta_1), f32(beta_2)
  # 1 − β as the real number, rounded once to float32 (f32(1) − f32(β) is off by ~1e-5
  # relative for β = 0.999, the representation error of β).
  c1, c2 = f32(1.0 - beta_1), f32(1.0 - beta_2)
  grad = np.asarray(grad, f32)
  next_m = b1 * m + c1 * grad
  next_v = b2 * v + c2 * np.square(grad)
  if nesterov:
    m_hat = (b1 * next_m / (f32(1) - b1 ** f32(t + 1))
             + c1 * grad / (f32(1) - b1 ** f32(t)))
  else:
    m_hat = next_m / (f32(1) - b1 ** f32(t))
  v_hat = next_v / (f32(1) - b2 ** f32(t))
  update = m_hat / (np.sqrt(v_hat) + f32(epsilon))
  return update.astype(f32), next_m.astype(f32), next_v.astype(f32)


def bert_adamw_trajectory(
    leaves: Leaves,
    names: Sequence[str],
    grad_fn: GradFn,
    steps: int,
    lr: LR,
    weight_decay_rate: float = 0.01,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-6,
    exclude_from_weight_decay: Sequence[str] | None = ("LayerNorm", "layer_norm", "bias"),
) -> np.ndarray:
  """BERT's ``AdamWeightDecayOptimizer.apply_gradients`` in float32 numpy.

  Transcribed from google-research/bert ``optimization.py``, ``apply_gradients`` (per
  ``(grad, param)``; m and v are float32 zeros at creation)::

    next_m = beta_1 * m + (1.0 - beta_1) * grad
    next_v = beta_2 * v + (1.0 - beta_2) * square(grad)
    update = next_m / (sqrt(next_v) + epsilon)          # no bias correction
    if self._do_use_weight_decay(param_name):
      update += self.weight_decay_rate * param
    update_with_lr = self.learning_rate * update
    next_param = param - update_with_lr

  ``param_name`` is the variable's name; here the leaf's "/"-joined path plays that role
  (e.g. ``encoder/layer_0/LayerNorm_0/scale``). BERT's default exclude list is the
  ``exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`` of ``create_optimizer``.
  """
  f32 = np.float32
  params = [np.array(x, f32) for x in leaves]
  ms = [np.zeros_like(x) for x in params]
  vs = [np.zeros_like(x) for x in params]
  decays = [bert_do_use_weight_decay(n, weight_decay_rate, exclude_from_weight_decay)
            for n in names]
  rows = [flat(params)]
  for t in range(steps):
    learning_rate = f32(lr_at(lr, t))
    grads = grad_fn(t, params)
    new_params = []
    for i, (grad, param) in enumerate(zip(grads, params)):
      update, next_m, next_v = bert_adam_update(grad, ms[i], vs[i], beta_1, beta_2, epsilon)
      if decays[i]:
        update = update + f32(weight_decay_rate) * param
      update_with_lr = learning_rate * update
      new_params.append((param - update_with_lr).astype(f32))
      ms[i], vs[i] = next_m, next_v
    params = new_params
    rows.append(flat(params))
  return np.stack(rows)


def keras_adamw_step(
    variable: np.ndarray,
    gradient: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    iterations: int,
    learning_rate: float,
    weight_decay: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    decay: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One Keras 3 AdamW step for one variable, in float32 numpy.

  Transcribed from Keras 3: ``BaseOptimizer._apply_weight_decay`` runs first,
  ``variable.assign(variable - variable * wd * lr)`` (for variables not excluded); then
  ``Adam.update_step``::

    local_step = cast(self.iterations + 1, variable.dtype)
    beta_1_power = power(cast(beta_1), local_step); beta_2_power likewise
    alpha = lr * sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m.assign_add((gradient - m) * (1 - beta_1))
    v.assign_add((square(gradient) - v) * (1 - beta_2))
    variable.assign_sub((m * alpha) / (sqrt(v) + epsilon))

  ``iterations`` is the number of steps already taken (0 for the first).
  """
  f32 = np.float32
  lr = f32(learning_rate)
  gradient = np.asarray(gradient, f32)
  if decay and weight_decay:
    variable = variable - variable * f32(weight_decay) * lr
  local_step = f32(iterations + 1)
  beta_1_power = np.power(f32(beta_1), local_step)
  beta_2_power = np.power(f32(beta_2), local_step)
  alpha = lr * np.sqrt(f32(1) - beta_2_power) / (f32(1) - beta_1_power)
  m = m + (gradient - m) * f32(1 - beta_1)
  v = v + (np.square(gradient) - v) * f32(1 - beta_2)
  variable = variable - (m * alpha) / (np.sqrt(v) + f32(epsilon))
  return variable.astype(f32), m.astype(f32), v.astype(f32)


def keras_adamw_trajectory(
    leaves: Leaves,
    grad_fn: GradFn,
    steps: int,
    lr: LR,
    weight_decay: float = 0.004,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
) -> np.ndarray:
  """Keras 3 AdamW (epsilon-hat Adam, decay ``θ ← θ − θ·λ·η`` first), see keras_adamw_step."""
  params = [np.array(x, np.float32) for x in leaves]
  ms = [np.zeros_like(x) for x in params]
  vs = [np.zeros_like(x) for x in params]
  rows = [flat(params)]
  for t in range(steps):
    grads = grad_fn(t, params)  # Keras computes the gradient before applying decay.
    for i, g in enumerate(grads):
      params[i], ms[i], vs[i] = keras_adamw_step(
          params[i], g, ms[i], vs[i], t, lr_at(lr, t), weight_decay, beta_1, beta_2, epsilon)
    rows.append(flat(params))
  return np.stack(rows)


# --- schedules ----------------------------------------------------------------------------------


def bert_lr_schedule(init_lr: float, num_train_steps: int, num_warmup_steps: int):
  """BERT's learning rate, google-research/bert optimization.py ``create_optimizer``.

  ``tf.train.polynomial_decay(init_lr, global_step, num_train_steps, end_learning_rate=0.0,
  power=1.0, cycle=False)``, replaced by ``init_lr * global_step / num_warmup_steps`` while
  ``global_step < num_warmup_steps``. ``global_step`` is incremented *after*
  ``apply_gradients``, so the first update sees ``global_step = 0`` (optax's count).
  Written with ``jnp`` so the same function serves as an optax schedule.
  """
  import jax.numpy as jnp

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decayed = init_lr * (1.0 - jnp.minimum(step, num_train_steps) / num_train_steps)
    warmup = init_lr * step / num_warmup_steps
    return jnp.where(step < num_warmup_steps, warmup, decayed)

  return schedule


def independent_decay_sgd_trajectory(
    leaves: Leaves, grad_fn: GradFn, steps: int, lr: LR, weight_decay: LR
) -> np.ndarray:
  """SGDW with an lr-independent decay, as TF's ``DecoupledWeightDecayExtension``.

  tensorflow_addons/optimizers/weight_decay_optimizers.py: ``_decay_weights_op`` runs
  ``var.assign_sub(wd_t * var)`` (``wd_t`` the weight decay, a constant or its own schedule,
  *not* multiplied by the learning rate) before the base optimizer's update, which for plain
  SGD is ``var -= lr * grad`` with the gradient computed before the decay.
  """
  f32 = np.float32
  params = [np.array(x, f32) for x in leaves]
  rows = [flat(params)]
  for t in range(steps):
    grads = grad_fn(t, params)
    wd_t, lr_t = f32(lr_at(weight_decay, t)), f32(lr_at(lr, t))
    params = [(p - wd_t * p - lr_t * np.asarray(g, f32)).astype(f32)
              for p, g in zip(params, grads)]
    rows.append(flat(params))
  return np.stack(rows)


# --- timm ---------------------------------------------------------------------------------------


class _NoTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Empty stand-ins for ``torchvision`` and its submodules; any name in them is a stub
  that raises when called."""

  def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec: Any) -> types.ModuleType:
    module = types.ModuleType(spec.name)
    module.__path__ = []
    module.__file__ = None

    def stub(attr: str, where: str = spec.name) -> Any:
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _TorchvisionStub(f"{where}.{attr}")

    module.__getattr__ = stub  # type: ignore[method-assign]
    return module

  def exec_module(self, module: types.ModuleType) -> None:
    del module


class _TorchvisionStub:
  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str) -> Any:
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _TorchvisionStub(f"{self._name}.{attr}")

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(f"{self._name}: torchvision is not available in this test run.")

  def __mro_entries__(self, bases: tuple) -> tuple:
    import torch

    return (torch.nn.Module,)


def import_timm() -> types.ModuleType:
  """``timm``, or skips the test when it is not installed.

  timm imports torchvision at module level (``timm/layers/create_norm.py``, ``timm/data``),
  but its ``VisionTransformer`` and ``timm.optim.param_groups_layer_decay`` never use it.
  When torchvision is missing or cannot load beside the installed torch (a torchvision wheel
  built for another torch raises at import), timm is imported with empty stand-ins for
  torchvision's modules, removed from ``sys.modules`` again afterwards. Install timm without
  torchvision with ``pip install --no-deps timm huggingface_hub safetensors pyyaml``.
  """
  import pytest

  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed (pip install --no-deps timm huggingface_hub "
                "safetensors pyyaml)")
  if "timm" in sys.modules:
    return sys.modules["timm"]
  import torch  # noqa: F401 - torchvision's stand-ins subclass torch.nn.Module.

  try:
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001 - ImportError, or RuntimeError from a mismatched build.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    finder = _NoTorchvision()
    sys.meta_path.insert(0, finder)
    try:
      import timm
      import timm.optim  # noqa: F401
    finally:
      sys.meta_path.remove(finder)
      for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    return timm
  import timm
  import timm.optim  # noqa: F401

  return timm


def torch_named_parameters_tree(model: Any) -> dict:
  """The parameters of a torch module as a nested dict of float32 numpy arrays, split on
  the dots of their names: ``blocks.0.attn.qkv.weight`` becomes the path
  ``blocks/0/attn/qkv/weight``."""
  tree: dict = {}
  for name, p in model.named_parameters():
    *parents, last = name.split(".")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = p.detach().numpy().astype(np.float32).copy()
  return tree


def run_torch_param_groups(
    opt_name: str,
    model: Any,
    param_groups: Sequence[dict],
    names: Sequence[str],
    grad_fn: GradFn,
    steps: int,
    lr: float,
    **options: Any,
) -> np.ndarray:
  """Trajectory of ``torch.optim.<opt_name>`` on ``model``'s own parameters, in the given
  param groups (float32, CPU, single-tensor path).

  Each group's ``lr`` is ``lr * group["lr_scale"]`` (1 without one), what timm's scheduler
  sets (``timm/scheduler/scheduler.py``, ``update_groups``); its ``weight_decay`` is the
  group's. Rows list the parameters in the order of ``names`` (``"/"``-joined dotted names),
  so they line up with a JAX tree's flattening order.
  """
  import torch

  by_name = {n.replace(".", "/"): p for n, p in model.named_parameters()}
  tensors = [by_name[n] for n in names]
  groups = [{**{k: v for k, v in g.items() if k != "lr_scale"},
             "lr": lr * g.get("lr_scale", 1.0)} for g in param_groups]
  opt = getattr(torch.optim, opt_name)(groups, lr=lr, foreach=False, **options)
  current = [p.detach().numpy().copy() for p in tensors]
  rows = [flat(current)]
  for t in range(steps):
    for p, g in zip(tensors, grad_fn(t, current)):
      p.grad = torch.from_numpy(np.array(g, np.float32))
    opt.step()
    current = [p.detach().numpy().copy() for p in tensors]
    rows.append(flat(current))
  return np.stack(rows)
