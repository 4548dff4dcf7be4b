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
from collections.abc import Callable

import chex
import jax
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
