"""``od.audit_decay`` tells the kind of decay, its shrink and its schedule relation from outside.

Oracles: the update rules as their sources define them, written out per case below:
optax/_src/alias.py (``adamw`` = chain(scale_by_adam, add_decayed_weights, scale_by_lr):
shrink η·λ on the masked leaves; ``adam``: none; ``lion``: decay after the sign, shrink η·λ;
``adafactor``: ``add_decayed_weights`` after the learning-rate scaling, shrink λ whatever η);
torch's ``Adam(weight_decay)`` / ``chain(add_decayed_weights, adam)`` (L2 through the moments);
SGD with L2 before it (Loshchilov & Hutter 2019, Prop. 1: decoupled with shrink η·λ without
momentum; through the buffer with momentum) or after it (the flax sst2 chain: +λθ after the
sign flip, the weights grow); L2-SP (Li et al. 2018) for ``with_decay_toward``; and the
couplings of ``od.coupled_weight_decay`` (c_t = η_t·λ, η_t/α·λ, λ, η_t²/α·λ).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_decoupled as od

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
          "LayerNorm": {"scale": jnp.ones(2)}}
ALL = ("LayerNorm/scale", "dense/bias", "dense/kernel")
BERT = od.exclude_names(*od.BERT_EXCLUDE)
LR = optax.cosine_decay_schedule(1e-2, 2000)


def _kinds(kind, only=ALL):
  return {p: (kind if p in only else "none") for p in ALL}


def _matrices(p):
  return jax.tree.map(lambda x: x.ndim > 1, p)


# name: (optimizer, expected kinds, expected shrink c on the decayed leaves, or None)
CASES = {
    "optax.adamw": (lambda: optax.adamw(1e-3, weight_decay=0.1), _kinds("decoupled"), 1e-4),
    "optax.adamw-mask": (lambda: optax.adamw(1e-3, weight_decay=0.1, mask=_matrices),
                         _kinds("decoupled", ("dense/kernel",)), 1e-4),
    "optax.adam": (lambda: optax.adam(1e-3), _kinds("none"), None),
    "l2-then-adam": (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3)),
                     _kinds("coupled_l2"), None),
    "optax.lion": (lambda: optax.lion(1e-3, weight_decay=0.1), _kinds("decoupled"), 1e-4),
    "optax.adafactor": (lambda: optax.adafactor(1e-2, weight_decay_rate=1e-3),
                        _kinds("decoupled"), 1e-3),
    "l2-then-sgd": (lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1)),
                    _kinds("decoupled"), 0.01),
    "l2-then-momentum-sgd": (lambda: optax.chain(optax.add_decayed_weights(0.1),
                                                 optax.sgd(0.1, 0.9)), _kinds("coupled_l2"), None),
    "sgd-then-l2-grows": (lambda: optax.chain(optax.sgd(0.1), optax.add_decayed_weights(0.1)),
                          _kinds("grows"), -0.1),
    "od.adamw-bert": (lambda: od.adamw(1e-3, weight_decay=0.1, mask=BERT),
                      _kinds("decoupled", ("dense/kernel",)), 1e-4),
    "od.adamw-schedule": (lambda: od.adamw(1e-3, weight_decay=1e-4, coupling="schedule"),
                          _kinds("decoupled"), 1e-4),
    "od.adamw-none": (lambda: od.adamw(1e-3, weight_decay=1e-4, coupling="none"),
                      _kinds("decoupled"), 1e-4),
    "od.adamw-corrected": (lambda: od.adamw(1e-3, weight_decay=0.1, coupling="corrected"),
                           _kinds("decoupled"), 1e-4),
    "od.adamw-nesterov": (lambda: od.adamw(1e-3, weight_decay=0.1, nesterov=True),
                          _kinds("decoupled"), 1e-4),
    "od.adam_l2": (lambda: od.adam_l2(1e-3, weight_decay=0.1), _kinds("coupled_l2"), None),
    "od.sgd_l2-plain": (lambda: od.sgd_l2(0.1, weight_decay=1e-3), _kinds("decoupled"), 1e-4),
    "od.sgd_l2-momentum": (lambda: od.sgd_l2(0.1, 0.9, weight_decay=1e-3),
                           _kinds("coupled_l2"), None),
    "od.sgdw": (lambda: od.sgdw(0.1, weight_decay=1e-4), _kinds("decoupled"), 1e-4),
    "od.sgdw-lr": (lambda: od.sgdw(0.1, weight_decay=1e-3, coupling="lr"),
                   _kinds("decoupled"), 1e-4),
    "od.bert_adamw": (lambda: od.bert_adamw(1e-3), _kinds("decoupled", ("dense/kernel",)), 1e-5),
    "od.with_decay_toward": (lambda: od.with_decay_toward(optax.adam(1e-3), 0.01),
                             _kinds("toward_reference"), 0.01),
    "inject_hyperparams": (lambda: optax.inject_hyperparams(od.adamw)(1e-3, weight_decay=0.1),
                           _kinds("decoupled"), 1e-4),
    "MultiSteps": (lambda: optax.MultiSteps(od.adamw(1e-3, weight_decay=0.1), 4),
                   _kinds("decoupled"), 1e-4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kinds_and_first_step_shrink(name):
  make, kinds, shrink = CASES[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    report = od.audit_decay(make(), PARAMS, probe_steps=())
  assert report.kinds() == kinds
  if shrink is None:
    assert report.shrink() == {}
  else:
    for path, c in report.shrink().items():
      assert c == pytest.approx(shrink, rel=1e-4), path


RELATIONS = {
    "od.adamw-lr": (lambda: od.adamw(LR, weight_decay=0.1), "lr (c_t ∝ η_t"),
    "od.adamw-schedule": (lambda: od.adamw(LR, weight_decay=1e-4, coupling="schedule",
                                           peak_learning_rate=1e-2), "lr (c_t ∝ η_t"),
    "od.adamw-none": (lambda: od.adamw(LR, weight_decay=1e-4, coupling="none"), "independent"),
    "od.adamw-corrected": (lambda: od.adamw(LR, weight_decay=0.1, coupling="corrected",
                                            peak_learning_rate=1e-2), "lr²"),
    "od.sgdw": (lambda: od.sgdw(LR, weight_decay=1e-4, peak_learning_rate=1e-2), "lr (c_t"),
    "optax.adamw": (lambda: optax.adamw(LR, weight_decay=0.1), "lr (c_t ∝ η_t"),
    "optax.adafactor": (lambda: optax.adafactor(LR, weight_decay_rate=1e-3), "independent"),
}


@pytest.mark.parametrize("name", list(RELATIONS))
def test_schedule_relation(name):
  make, relation = RELATIONS[name]
  report = od.audit_decay(make(), PARAMS, learning_rate=LR, probe_steps=(0, 100, 500))
  assert report.relation.startswith(relation), report.relation
  steps = dict(report.shrink_by_step)
  assert sorted(steps) == [0, 100, 500]


def test_relation_is_not_guessed():
  report = od.audit_decay(od.adamw(1e-3, weight_decay=0.1), PARAMS, learning_rate=1e-3)
  assert report.relation.startswith("not told: the learning rate is constant")
  assert od.audit_decay(od.adamw(1e-3), PARAMS).relation.startswith("not probed")


def test_the_audit_does_not_depend_on_parameter_values():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)  # zero biases/weights still get probed
  tx = od.adamw(1e-3, weight_decay=0.1, mask=BERT)
  assert od.audit_decay(tx, zero).kinds() == od.audit_decay(tx, PARAMS).kinds()


def test_printed_table_and_paths_as_describe_mask():
  report = od.audit_decay(od.adamw(1e-3, weight_decay=0.1, mask=BERT), PARAMS)
  text = str(report)
  assert "dense/kernel" in text and "decoupled" in text and "none: 2, decoupled: 1" in text
  assert list(report.kinds()) == [r.path for r in od.describe_mask(PARAMS, BERT).rows]


def test_nnx_state_of_variables():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  report = od.audit_decay(optax.adamw(1e-3, weight_decay=0.1, mask=_matrices), state)
  assert report.kinds() == {"bias": "none", "kernel": "decoupled"}
