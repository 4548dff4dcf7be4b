"""examples/muon_partition.py on its --quick setting.

What is checked: both runs (AdamW alone; Muon on the hidden matrices + AdamW on the rest)
train, with finite losses below the first step's; and the labels the example builds from
predicates equal the split rule written out here by path and shape: "muon" exactly for the
2-D matrices inside the blocks, "adamw" for the embeddings, the head, norms and biases.
"""

from __future__ import annotations

import pytest

import math

import numpy as np
from flax import nnx

from examples import muon_partition as mp

pytestmark = pytest.mark.slow  # trains the Muon example


def expected_label(path: str, shape: tuple[int, ...]) -> str:
  """The Moonlight/modded-nanoGPT split, transcribed: Muon for hidden 2-D weights only."""
  is_embedding = path in ("token_embedding/embedding", "position_embedding/embedding")
  is_head = path.startswith("head/")
  return "muon" if len(shape) == 2 and not is_embedding and not is_head else "adamw"


def test_quick_run_trains_both_and_splits_as_written():
  result = mp.main(["--quick"])
  for kind in ("adamw", "muon"):
    losses = result[kind]["losses"]
    assert len(losses) == result["steps"] and all(math.isfinite(x) for x in losses), kind
    assert np.mean(losses[-5:]) < losses[0] - 0.5, (kind, losses[0], losses[-5:])
    assert math.isfinite(result[kind]["held_out_loss"]), kind
  assert result["adamw"]["losses"][0] == result["muon"]["losses"][0]  # same init, same batch

  model = mp.CharModel(mp.QUICK, nnx.Rngs(0))
  leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
  shapes = {"/".join(map(str, p)): tuple(v.get_value().shape) for p, v in leaves}
  labels = result["labels"]
  assert sorted(labels) == sorted(shapes)
  for path, shape in shapes.items():
    assert labels[path] == expected_label(path, shape), path
  muon = {p for p, lab in labels.items() if lab == "muon"}
  assert muon == {f"blocks/{i}/{layer}/kernel" for i in range(mp.QUICK.layers)
                  for layer in ("attention/query", "attention/key", "attention/value",
                                "attention/out", "mlp_in", "mlp_out")}
  for path, lab in labels.items():
    if "embedding" in path or path.startswith("head/") or "layer_norm" in path or (
        path.endswith("/bias")):
      assert lab == "adamw", path
