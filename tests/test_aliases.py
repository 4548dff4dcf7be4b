"""Parity of the aliases with the optimizers they claim to be, over 120-step trajectories.

One parametrized suite runs every alias against its reference (``tests/references.py``):

* ``od.adamw``      vs torch.optim.AdamW and optax.adamw (constant lr, warmup+cosine schedule,
  BERT exclude mask as torch param groups with ``weight_decay=0`` / as optax's ``mask=``);
* ``od.adam_l2``    vs torch.optim.Adam(weight_decay=λ) (constant; scheduled and masked);
* ``od.sgd_l2``     vs torch.optim.SGD (momentum 0 and 0.9, Nesterov on/off, weight decay);
* ``od.bert_adamw`` vs a numpy transcription of BERT's ``AdamWeightDecayOptimizer``
  (google-research/bert optimization.py ``apply_gradients``), including its exclude list and
  BERT's warmup + linear-decay learning rate.

The tree is BERT-shaped (one encoder layer, 21 leaves, ``tests.fixtures.bert_linen_params``); the gradient is
that of a separable quadratic plus noise, with leaves on scales 1e-4 .. 1e2
(``references.quadratic_grad_fn``), evaluated at the current parameters so that any
difference between two optimizers feeds back into later gradients.

Tolerance (``tolerance``): float32 round-off. Each step rounds every parameter at least once
(≤ eps·|θ|), and torch computes its scalar factors (bias corrections, step size) in float64
where optax uses float32 (for Adam, 1 − β2 in float32 is off by ~eps/1e-3 relative at step 1),
so the two trajectories drift apart by a few float32 ulps per step. After T steps that is at
most ≈ T·eps·max|θ| (120 · 1.2e-7 · 4 ≈ 6e-5 here; the measured gap with torch is 3e-6..7e-6,
the gap with optax.adamw is exactly 0). A wrong formula moves the trajectory by much more: every
case also asserts that switching the decay off moves the reference by > 100× the tolerance,
and masked cases that decaying the excluded leaves would move them by > 100× the tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_decoupled as od
from tests import references as R
from tests.fixtures import bert_linen_params, small_named_params

T = 120  # steps per trajectory
EPS32 = float(np.finfo(np.float32).eps)

ADAM_LR = 1e-2
ADAM_SCHEDULE = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=1e-2, warmup_steps=10, decay_steps=T, end_value=1e-4)
SGD_LR = 1e-2  # lr·curvature ≤ 1 on the stiffest leaf (curvature 1e2): stable with Nesterov.
SGD_SCHEDULE = optax.warmup_cosine_decay_schedule(
    init_value=1e-3, peak_value=1e-2, warmup_steps=10, decay_steps=T, end_value=1e-4)
BERT_SCHEDULE = R.bert_lr_schedule(1e-2, num_train_steps=T, num_warmup_steps=10)
WD = 0.1  # large enough that decay visibly shapes a 120-step trajectory at lr 1e-2.
BERT_NAMES = ("LayerNorm", "layer_norm", "bias")  # google-research/bert create_optimizer.


@dataclasses.dataclass(frozen=True)
class Setup:
  params: dict
  leaves: list
  names: list
  grad_fn: Callable

  def decayed(self, weight_decay=1.0) -> list[bool]:
    """BERT's own rule (references.bert_do_use_weight_decay), independent of od's masks."""
    return [R.bert_do_use_weight_decay(n, weight_decay, BERT_NAMES) for n in self.names]

  def torch_groups(self, mask_on: bool):
    """Param groups: BERT-excluded leaves get ``weight_decay=0`` (when the mask is on)."""
    if not mask_on:
      return None
    dec = self.decayed()
    return [([i for i, d in enumerate(dec) if d], {}),
            ([i for i, d in enumerate(dec) if not d], {"weight_decay": 0.0})]

  def optax_mask(self, mask_on: bool):
    if not mask_on:
      return None
    return jax.tree.unflatten(jax.tree.structure(self.params), self.decayed())


@functools.cache
def make_setup() -> Setup:
  params = bert_linen_params(seed=0, layers=1)
  return Setup(params, R.to_leaves(params), R.leaf_names(params), R.quadratic_grad_fn(params))


@pytest.fixture(scope="module")
def setup() -> Setup:
  return make_setup()


@dataclasses.dataclass(frozen=True)
class Case:
  """An alias, its reference, and the reference's weight decay.

  ``reference(setup, weight_decay, mask_on)`` returns the reference trajectory, with BERT's
  exclude rule applied when ``mask_on``; the suite calls it with the case's ``weight_decay``
  and ``mask_on=masked``, with 0 (decay off) and, for masked cases, with the mask off.
  """

  id: str
  alias: str  # key of ALIASES: the od optimizer under test.
  reference: Callable[[Setup, float, bool], np.ndarray]
  weight_decay: float
  masked: bool = False
  needs_torch: bool = True
  exact: bool = False  # the reference performs the very same float32 operations.


BERT_MASK = od.exclude_names(*od.BERT_EXCLUDE)

# The optimizers under test; several cases compare one of them with different references.
ALIASES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: od.adamw(ADAM_LR, weight_decay=WD),
    "adamw-schedule": lambda: od.adamw(ADAM_SCHEDULE, weight_decay=WD),
    "adamw-mask": lambda: od.adamw(ADAM_LR, weight_decay=WD, mask=BERT_MASK),
    "adamw-schedule-mask": lambda: od.adamw(ADAM_SCHEDULE, weight_decay=WD, mask=BERT_MASK),
    "adam_l2": lambda: od.adam_l2(ADAM_LR, weight_decay=WD),
    "adam_l2-schedule-mask": lambda: od.adam_l2(ADAM_SCHEDULE, weight_decay=WD, mask=BERT_MASK),
    "sgd_l2": lambda: od.sgd_l2(SGD_LR, weight_decay=WD),
    "sgd_l2-momentum": lambda: od.sgd_l2(SGD_LR, momentum=0.9, weight_decay=WD),
    "sgd_l2-nesterov": lambda: od.sgd_l2(SGD_LR, momentum=0.9, nesterov=True, weight_decay=WD),
    "sgd_l2-schedule-nesterov-mask": lambda: od.sgd_l2(
        SGD_SCHEDULE, momentum=0.9, nesterov=True, weight_decay=WD, mask=BERT_MASK),
    "bert_adamw": lambda: od.bert_adamw(ADAM_LR, weight_decay=WD),
    "bert_adamw-schedule": lambda: od.bert_adamw(BERT_SCHEDULE, weight_decay=WD),
    # Non-default hyperparameters, so that each one is seen to be wired through (ε = 1e-3 is
    # large next to the 1e-4-scale gradients, so it shapes those leaves' steps).
    "adamw-hparams": lambda: od.adamw(ADAM_LR, b1=0.8, b2=0.99, eps=1e-3, weight_decay=WD),
    "adam_l2-hparams": lambda: od.adam_l2(ADAM_LR, b1=0.8, b2=0.99, eps=1e-3, weight_decay=WD),
    "sgd_l2-hparams": lambda: od.sgd_l2(SGD_LR, momentum=0.5, nesterov=True, weight_decay=WD),
    "bert_adamw-hparams": lambda: od.bert_adamw(ADAM_LR, weight_decay=WD, b1=0.8, b2=0.99,
                                                eps=1e-3),
}
_TRAJECTORIES: dict[str, np.ndarray] = {}


def trajectory(alias: str, setup: Setup) -> np.ndarray:
  """The trajectory of ``ALIASES[alias]`` on ``setup`` (computed once per module)."""
  if alias not in _TRAJECTORIES:
    _TRAJECTORIES[alias] = R.run_optax(ALIASES[alias](), setup.params, setup.grad_fn, T)
  return _TRAJECTORIES[alias]


def _torch(name, lr, **opts):
  def reference(s: Setup, wd: float, mask_on: bool):
    return R.run_torch(name, s.leaves, s.grad_fn, T, lr, s.torch_groups(mask_on),
                       weight_decay=wd, **opts)
  return reference


def _optax_adamw(lr):
  def reference(s: Setup, wd: float, mask_on: bool):
    tx = optax.adamw(lr, weight_decay=wd, mask=s.optax_mask(mask_on))
    return R.run_optax(tx, s.params, s.grad_fn, T)
  return reference


def _bert(lr, **hparams):
  def reference(s: Setup, wd: float, mask_on: bool):
    return R.bert_adamw_trajectory(
        s.leaves, s.names, s.grad_fn, T, lr, weight_decay_rate=wd,
        exclude_from_weight_decay=BERT_NAMES if mask_on else None, **hparams)
  return reference


CASES = [
    # AdamW: torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=λ).
    Case("adamw/torch", "adamw", _torch("AdamW", ADAM_LR), WD),
    Case("adamw-schedule/torch", "adamw-schedule", _torch("AdamW", ADAM_SCHEDULE), WD),
    Case("adamw-bert-mask/torch-groups", "adamw-mask", _torch("AdamW", ADAM_LR), WD,
         masked=True),
    Case("adamw-schedule-bert-mask/torch-groups", "adamw-schedule-mask",
         _torch("AdamW", ADAM_SCHEDULE), WD, masked=True),
    # optax.adamw: the same float32 algebra, so the trajectories are bitwise equal.
    Case("adamw/optax", "adamw", _optax_adamw(ADAM_LR), WD, needs_torch=False, exact=True),
    Case("adamw-schedule/optax", "adamw-schedule", _optax_adamw(ADAM_SCHEDULE), WD,
         needs_torch=False, exact=True),
    Case("adamw-bert-mask/optax", "adamw-mask", _optax_adamw(ADAM_LR), WD, masked=True,
         needs_torch=False, exact=True),
    # Adam + coupled L2: torch.optim.Adam(weight_decay=λ).
    Case("adam_l2/torch", "adam_l2", _torch("Adam", ADAM_LR), WD),
    Case("adam_l2-schedule-bert-mask/torch-groups", "adam_l2-schedule-mask",
         _torch("Adam", ADAM_SCHEDULE), WD, masked=True),
    # SGD + coupled L2: torch.optim.SGD(lr, momentum, dampening=0, weight_decay, nesterov).
    Case("sgd_l2/torch-momentum0", "sgd_l2", _torch("SGD", SGD_LR, momentum=0.0), WD),
    Case("sgd_l2/torch-momentum0.9", "sgd_l2-momentum", _torch("SGD", SGD_LR, momentum=0.9),
         WD),
    Case("sgd_l2/torch-nesterov", "sgd_l2-nesterov",
         _torch("SGD", SGD_LR, momentum=0.9, nesterov=True), WD),
    Case("sgd_l2-schedule-bert-mask/torch-groups-nesterov", "sgd_l2-schedule-nesterov-mask",
         _torch("SGD", SGD_SCHEDULE, momentum=0.9, nesterov=True), WD, masked=True),
    # BERT: numpy transcription of AdamWeightDecayOptimizer (eps 1e-6, no bias correction).
    Case("bert_adamw/numpy-bert", "bert_adamw", _bert(ADAM_LR), WD, masked=True,
         needs_torch=False),
    Case("bert_adamw-bert-schedule/numpy-bert", "bert_adamw-schedule", _bert(BERT_SCHEDULE), WD,
         masked=True, needs_torch=False),
    # Non-default β1, β2, ε, momentum.
    Case("adamw-hparams/torch", "adamw-hparams",
         _torch("AdamW", ADAM_LR, betas=(0.8, 0.99), eps=1e-3), WD),
    Case("adam_l2-hparams/torch", "adam_l2-hparams",
         _torch("Adam", ADAM_LR, betas=(0.8, 0.99), eps=1e-3), WD),
    Case("sgd_l2-hparams/torch", "sgd_l2-hparams",
         _torch("SGD", SGD_LR, momentum=0.5, nesterov=True), WD),
    Case("bert_adamw-hparams/numpy-bert", "bert_adamw-hparams",
         _bert(ADAM_LR, beta_1=0.8, beta_2=0.99, epsilon=1e-3), WD, masked=True,
         needs_torch=False),
]


def tolerance(reference: np.ndarray) -> float:
  """float32 round-off accumulated over the trajectory (see the module docstring)."""
  steps = reference.shape[0] - 1
  return steps * EPS32 * max(1.0, float(np.abs(reference).max()))


def check_case(case: Case, setup: Setup, ours: np.ndarray) -> None:
  """``ours`` against the case's reference; the decay (and mask) visibly shape the reference."""
  if case.needs_torch:
    pytest.importorskip("torch")
  ref = case.reference(setup, case.weight_decay, case.masked)
  chex.assert_shape([ours, ref], (T + 1, sum(x.size for x in setup.leaves)))
  chex.assert_tree_all_finite((ours, ref))
  tol = tolerance(ref)
  if case.exact:
    # Bitwise. (That decay and mask are visible in this setup is shown by the torch cases
    # of the same alias, so the decay-off runs are not repeated here.)
    chex.assert_trees_all_equal(ours, ref)
    return
  chex.assert_trees_all_close(ours, ref, rtol=0, atol=tol)

  # The comparison can fail: decay shapes the reference trajectory far beyond the tolerance.
  no_decay = case.reference(setup, 0.0, case.masked)
  assert np.abs(ref - no_decay).max() > 100 * tol
  if case.masked:
    # ... and the mask matters: decaying the excluded leaves too would move them far.
    excluded = np.concatenate([
        np.full(x.size, not d) for x, d in zip(setup.leaves, setup.decayed())])
    assert excluded.any() and not excluded.all()
    unmasked = case.reference(setup, case.weight_decay, False)
    assert np.abs(ref - unmasked)[:, excluded].max() > 100 * tol
    # The excluded leaves follow the undecayed reference to round-off.
    chex.assert_trees_all_close(ours[:, excluded], no_decay[:, excluded], rtol=0, atol=tol)


# The core cases (one per alias, with the mask where the alias has one by default) run under
# every chex variant: with jit, without jit, and with pmap when more than one device is
# present. The other cases run jitted (the trajectories are shared across the module).
CORE = ("adamw/torch", "adamw-bert-mask/torch-groups", "adam_l2/torch",
        "sgd_l2/torch-momentum0.9", "bert_adamw/numpy-bert")
CASE_BY_ID = {c.id: c for c in CASES}
assert set(CORE) <= set(CASE_BY_ID)


class CoreAliasesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.named_parameters(
      *[(i.replace("/", "_").replace("-", "_").replace(".", ""), i) for i in CORE])
  def test_alias_matches_reference(self, case_id):
    case = CASE_BY_ID[case_id]
    if case.needs_torch:
      pytest.importorskip("torch")
    setup = make_setup()
    ours = R.run_optax(ALIASES[case.alias](), setup.params, setup.grad_fn, T, self.variant)
    check_case(case, setup, ours)


@pytest.mark.parametrize("case", [c for c in CASES if c.id not in CORE],
                         ids=[c.id for c in CASES if c.id not in CORE])
def test_alias_matches_reference(case: Case, setup: Setup):
  check_case(case, setup, trajectory(case.alias, setup))


def test_bert_mask_excludes_what_bert_excludes(setup: Setup):
  """The fixture exercises both sides of BERT's rule (so the masked cases test something)."""
  dec = dict(zip(setup.names, setup.decayed()))
  assert dec["encoder/layer_0/attention/query/kernel"] is True
  assert dec["embeddings/word_embeddings/embedding"] is True
  assert dec["encoder/layer_0/attention/query/bias"] is False
  assert dec["encoder/layer_0/LayerNorm_1/scale"] is False
  mask = od.resolve_mask(setup.params, BERT_MASK)
  assert jax.tree.leaves(mask) == setup.decayed()


def test_the_suite_tells_optimizers_apart(setup: Setup):
  """Cross-check of the suite: the two conventions, and the non-default hyperparameters,
  give trajectories far apart."""
  adamw, adam_l2 = trajectory("adamw", setup), trajectory("adam_l2", setup)
  assert np.abs(adamw - adam_l2).max() > 1000 * tolerance(adamw)
  for name in ("adamw", "adam_l2", "bert_adamw"):
    gap = np.abs(trajectory(name, setup) - trajectory(name + "-hparams", setup)).max()
    assert gap > 100 * tolerance(trajectory(name, setup)), name


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_default_weight_decays_are_the_documented_ones():
  """od.adamw defaults to optax.adamw's λ=1e-4; od.bert_adamw to BERT's 0.01 and eps 1e-6."""
  params = small_named_params()
  grads = R.quadratic_grad_fn(params)
  steps = 30
  np.testing.assert_array_equal(R.run_optax(od.adamw(ADAM_LR), params, grads, steps),
                                R.run_optax(optax.adamw(ADAM_LR), params, grads, steps))
  params = bert_linen_params(seed=1, hidden=4, layers=1)  # names for BERT's exclude list
  grads = R.quadratic_grad_fn(params)
  ours = R.run_optax(od.bert_adamw(ADAM_LR), params, grads, steps)
  ref = R.bert_adamw_trajectory(R.to_leaves(params), R.leaf_names(params), grads, steps, ADAM_LR)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))


@pytest.mark.parametrize("exclude", [(), None], ids=["empty", "None"])
def test_bert_adamw_without_exclude_list_decays_everything(exclude):
  """BERT's ``_do_use_weight_decay`` with ``exclude_from_weight_decay=None`` (or []): every
  parameter decays. (Regression: ``exclude=()`` used to raise from exclude_names().)"""
  params = small_named_params()
  grads = R.quadratic_grad_fn(params)
  steps = 30
  ours = R.run_optax(od.bert_adamw(ADAM_LR, weight_decay=WD, exclude=exclude), params, grads,
                     steps)
  ref = R.bert_adamw_trajectory(R.to_leaves(params), R.leaf_names(params), grads, steps,
                                ADAM_LR, weight_decay_rate=WD, exclude_from_weight_decay=exclude)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance(ref))


# --------------------------------------------------------------------- optax's exact face

_OPTAX_COUNTERPART = {  # ours -> the optax function whose positional order and type it takes.
    "adamw": optax.adamw, "adam_l2": optax.adam, "sgd_l2": optax.sgd, "sgdw": optax.sgd,
    "scale_by_adam": optax.scale_by_adam,
}


@pytest.mark.parametrize("name", sorted(_OPTAX_COUNTERPART))
def test_positional_order_and_return_type_are_optax(name):
  import inspect

  ours, theirs = getattr(od, name), _OPTAX_COUNTERPART[name]
  positional = [p.name for p in inspect.signature(theirs).parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD]
  mine = [p.name for p in inspect.signature(ours).parameters.values()
          if p.kind is p.POSITIONAL_OR_KEYWORD]
  assert mine[:len(positional)] == positional
  args = {"sgdw": dict(weight_decay=1e-4)}.get(name, {})
  lr = () if name == "scale_by_adam" else (1e-3,)
  assert type(ours(*lr, **args)) is type(theirs(*lr))


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_scale_by_adam_takes_optax_positional_arguments():
  """Five positional arguments (b1, b2, eps, eps_root, mu_dtype) and nesterov: optax's step."""
  params = small_named_params()
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  ours = od.scale_by_adam(0.8, 0.95, 1e-6, 1e-9, jnp.float32, nesterov=True)
  ref = optax.scale_by_adam(0.8, 0.95, 1e-6, 1e-9, jnp.float32, nesterov=True)
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1)
    u2, s2 = ref.update(grads, s2)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


_ADAM_BAD = [("b1", float("nan"), "b1 must be finite and in [0, 1)"),
             ("b1", 1.0, "b1 must be finite and in [0, 1)"),
             ("b1", -0.1, "b1 must be finite and in [0, 1)"),
             ("b2", 1.0, "b2 must be finite and in [0, 1)"),
             ("b2", float("inf"), "b2 must be finite and in [0, 1)"),
             ("eps", float("nan"), "eps must be finite and >= 0"),
             ("eps", -1.0, "eps must be finite and >= 0"),
             ("eps_root", float("nan"), "eps_root must be finite and >= 0"),
             ("eps_root", -1e-8, "eps_root must be finite and >= 0")]
_ADAM_MAKERS = {
    "adamw": lambda **kw: od.adamw(1e-3, **kw),
    "adam_l2": lambda **kw: od.adam_l2(1e-3, **kw),
    "bert_adamw": lambda **kw: od.bert_adamw(1e-3, exclude=(), **kw),
    "scale_by_adam": lambda **kw: od.scale_by_adam(**kw),
}


@pytest.mark.parametrize("maker", sorted(_ADAM_MAKERS))
@pytest.mark.parametrize("name,value,fragment", _ADAM_BAD,
                         ids=[f"{n}={v}" for n, v, _ in _ADAM_BAD])
def test_adam_hyperparameters_are_checked_at_construction(maker, name, value, fragment):
  """torch.optim.Adam's ranges (0 <= betas < 1, eps >= 0), finite; the error says the range."""
  if maker == "bert_adamw" and name == "eps_root":
    pytest.skip("BERT's Adam has no eps_root")
  with pytest.raises(ValueError, match=re.escape(fragment)):
    _ADAM_MAKERS[maker](**{name: value})


@pytest.mark.parametrize("maker", sorted(_ADAM_MAKERS))
def test_adam_hyperparameters_at_the_edges_of_the_range_are_accepted(maker):
  kw = dict(b1=0.0, b2=0.0, eps=0.0) if maker == "bert_adamw" else dict(
      b1=0.0, b2=0.0, eps=0.0, eps_root=0.0)
  _ADAM_MAKERS[maker](**kw)


def test_traced_adam_hyperparameters_pass_unchecked_under_vmap():
  """jax.vmap over b1 and eps (as over learning_rate): each slice is optax.adamw's step."""
  params = {"w": jnp.linspace(-1.0, 1.0, 4)}
  grads = {"w": jnp.asarray([0.3, -0.2, 0.1, 0.5])}

  def step(b1, eps):
    tx = od.adamw(1e-2, b1=b1, eps=eps, weight_decay=0.1)
    return tx.update(grads, tx.init(params), params)[0]["w"]

  b1s, epss = jnp.asarray([0.5, 0.9]), jnp.asarray([1e-3, 1e-8])
  got = jax.vmap(step)(b1s, epss)
  for k in range(2):
    ref = optax.adamw(1e-2, b1=float(b1s[k]), eps=float(epss[k]), weight_decay=0.1)
    expected = ref.update(grads, ref.init(params), params)[0]["w"]
    np.testing.assert_allclose(got[k], expected, rtol=1e-6)


def test_bert_adamw_takes_a_bare_string_as_one_pattern():
  """exclude="bias" excludes the paths containing "bias" (not b, i, a, s). Oracle: with zero
  gradients BERT's step is -η·λ·θ on decayed leaves and 0 on excluded ones."""
  params = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 3.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = od.bert_adamw(0.1, weight_decay=0.5, exclude="bias")
  u, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(u["dense"]["kernel"], -0.1 * 0.5 * 2.0 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(u["dense"]["bias"], np.zeros(2))
  with pytest.raises(TypeError, match="exclude takes a pattern"):
    od.bert_adamw(0.1, exclude=od.exclude_names("bias"))


def test_bert_adamw_on_a_model_without_biases_needs_allow_unmatched():
  """A bias-free model leaves BERT's "bias" rule unmatched: an error by default (a bias
  named otherwise would decay silently); with allow_unmatched=True, BERT's rule applies.
  Oracle: with zero gradients BERT's step is -η·λ·θ on decayed leaves, 0 on excluded ones
  (google-research/bert optimization.py, _do_use_weight_decay)."""
  params = {"LayerNorm": {"scale": jnp.full((2,), 3.0)}, "dense": {"kernel": jnp.full((2,), 2.0)}}
  with pytest.raises(ValueError, match="pattern 'bias' .* matches no parameter"):
    od.bert_adamw(0.1).init(params)
  tx = od.bert_adamw(0.1, 0.5, allow_unmatched=True)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(u["dense"]["kernel"], [-0.1, -0.1], rtol=1e-6)
  np.testing.assert_array_equal(u["LayerNorm"]["scale"], np.zeros(2))


def test_bert_adamw_case_insensitive_pattern_for_mindspore_names():
  """MindSpore's BERT spells the norm ``layernorm``: the default rule is unmatched (an
  error); ``(?i)`` makes a case-insensitive pattern that excludes it."""
  params = {"layernorm": {"gamma": jnp.ones(2)}, "dense": {"kernel": jnp.ones((2, 2)),
                                                          "bias": jnp.ones(2)}}
  with pytest.raises(ValueError, match="matches no parameter"):
    od.bert_adamw(1e-3).init(params)
  mask = od.exclude_names(r"(?i)layer_?norm", "bias")
  assert od.resolve_mask(params, mask) == {
      "layernorm": {"gamma": False}, "dense": {"kernel": True, "bias": False}}
  od.bert_adamw(1e-3, exclude=(r"(?i)layer_?norm", "bias")).init(params)


@pytest.mark.parametrize("alias,reference", [
    ("adam_l2", lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))),
    ("sgd_l2", lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.01, 0.9))),
])
def test_l2_aliases_take_python_float_leaves(alias, reference):
  """A Python-float parameter and gradient: torch's L2 (g + λθ) then the optimizer, as
  optax.add_decayed_weights before optax.adam / optax.sgd computes it."""
  make = {"adam_l2": lambda: od.adam_l2(0.01, weight_decay=0.1),
          "sgd_l2": lambda: od.sgd_l2(0.01, momentum=0.9, weight_decay=0.1)}[alias]
  params = {"w": jnp.ones(2), "scale": 2.0}
  grads = {"w": jnp.full((2,), 0.5), "scale": 0.25}
  ours, ref = make(), reference()
  s1, s2 = ours.init(params), ref.init(params)
  p1 = p2 = params
  for _ in range(3):
    u1, s1 = ours.update(grads, s1, p1)
    u2, s2 = ref.update(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p1, p2)


def _complex_tree(seed):
  rng = np.random.default_rng(seed)
  return {"z": jnp.asarray(rng.normal(size=(3,)) + 1j * rng.normal(size=(3,)), jnp.complex64)}


@pytest.mark.parametrize("alias,reference", [
    ("adam_l2", lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))),
    ("sgd_l2", lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.01, 0.9))),
    ("adamw", lambda: optax.adamw(0.01, weight_decay=0.1)),
    ("nu_dtype", lambda: optax.adamw(0.01, weight_decay=0.1)),
])
def test_complex_parameters_follow_optax(alias, reference):
  """Complex θ as optax has it: m complex, v of |g|² (optax.tree.update_moment_per_elem_norm),
  the decay λθ."""
  make = {"adam_l2": lambda: od.adam_l2(0.01, weight_decay=0.1),
          "sgd_l2": lambda: od.sgd_l2(0.01, momentum=0.9, weight_decay=0.1),
          "adamw": lambda: od.adamw(0.01, weight_decay=0.1),
          "nu_dtype": lambda: od.adamw(0.01, weight_decay=0.1, nu_dtype=jnp.float32)}[alias]
  params = _complex_tree(0)
  ours, ref = make(), reference()
  s1, s2 = ours.init(params), ref.init(params)
  p1 = p2 = params
  for t in range(3):
    g = _complex_tree(t + 1)
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert p1["z"].dtype == jnp.complex64
  np.testing.assert_allclose(p1["z"], p2["z"], rtol=1e-5)


def test_complex_bert_adamw_is_bert_with_abs_squared():
  """BERT's step (no bias correction) with v of |g|²: numpy transcription of
  google-research/bert optimization.py apply_gradients with g² read as |g|² (optax's rule)."""
  lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-6
  params = _complex_tree(0)
  tx = od.bert_adamw(lr, weight_decay=wd, exclude=())
  state = tx.init(params)
  th = np.asarray(params["z"], np.complex128)
  m, v = np.zeros(3, np.complex128), np.zeros(3)
  for t in range(3):
    g = _complex_tree(t + 1)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    gz = np.asarray(g["z"], np.complex128)
    m = b1 * m + (1 - b1) * gz
    v = b2 * v + (1 - b2) * np.abs(gz) ** 2
    th = th - lr * (m / (np.sqrt(v) + eps) + wd * th)
  np.testing.assert_allclose(np.asarray(params["z"]), th, rtol=2e-5)


def test_complex_parameters_refuse_what_has_no_complex_meaning():
  params = _complex_tree(0)
  with pytest.raises(TypeError, match="lose the imaginary part"):
    od.adamw(1e-3, mu_dtype=jnp.float32).init(params)
  od.adamw(1e-3, mu_dtype=jnp.complex64).init(params)  # a complex first moment is fine
  with pytest.raises(TypeError, match="complex numbers do not have"):
    od.with_decoupled_decay(optax.sgd(0.1), 0.1, cautious=True).init(params)


def test_recipe_collectors_are_per_thread():
  """Two threads build optimizers at once: each collecting() block sees only its own."""
  import threading

  from optax_decoupled import _recipes

  barrier = threading.Barrier(2)
  seen: dict[str, list[str]] = {}
  errors: list[BaseException] = []

  def worker(name, lr):
    try:
      with _recipes.collecting() as found:
        barrier.wait()
        for _ in range(20):
          od.adamw(lr)
          barrier.wait()  # the other thread builds between our builds
      seen[name] = [r.args["learning_rate"] for r in found]
    except BaseException as e:  # noqa: BLE001 - reported below
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=worker, args=("a", 0.1)),
             threading.Thread(target=worker, args=("b", 0.2))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert seen == {"a": [0.1] * 20, "b": [0.2] * 20}
