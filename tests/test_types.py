"""The package type-checks: mypy (configured in pyproject.toml) finds no error.

The public signatures use the aliases of ``optax_decoupled._hyperparams`` (``Numeric``,
``Schedule``, ``ScalarOrSchedule``, ``DType``) and ``optax_decoupled._masks.MaskLike`` in
place of ``Any``, so a checker can tell a schedule from a mask from a dtype.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import optax_decoupled as od

pytestmark = pytest.mark.slow  # runs mypy over the package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_finds_no_error():
  pytest.importorskip("mypy")
  proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("fn", [od.adamw, od.adam_l2, od.sgd_l2, od.sgdw, od.bert_adamw,
                                od.add_l2_to_grad, od.add_decoupled_decay,
                                od.with_decoupled_decay, od.with_decay_toward])
def test_hyperparameters_are_typed_not_any(fn):
  for name in ("learning_rate", "weight_decay", "mask", "mu_dtype"):
    param = inspect.signature(fn).parameters.get(name)
    if param is not None:
      assert "Any" not in str(param.annotation), (fn.__name__, name, param.annotation)
