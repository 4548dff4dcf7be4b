"""The paper-grid experiment (examples/paper_grid.py) on a tiny grid.

What is checked:
- the vmapped program (every (α, λ, seed) of one optimizer in one jitted call) gives the
  same numbers, to float32 round-off, as training each configuration on its own without
  vmap: the per-run functions are the oracle of the batched program;
- ``run`` writes results.json and heatmaps.png with the documented structure;
- the λ*-per-row and slope analysis recovers the slope of synthetic grids whose valley is
  placed by construction (λ* = c/α gives slope -1, λ* = c gives 0), leaves boundary rows
  and untrained rows out, and the PASS/FAIL rules follow their definitions.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains small grids

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from examples import paper_grid as pg

CFG = pg.TrainConfig(hidden=(8, 8), epochs=2, batch_size=32, n_seeds=2, chunks=2)


def tiny_specs() -> list[pg.OptimizerSpec]:
  """Every optimizer of the default run, on 2 learning rates × (λ=0 + 2 decays)."""
  return [
      dataclasses.replace(s, lrs=s.lrs[-3:-1], wds=s.wds[3:5]) for s in pg.default_specs()
  ]


@pytest.fixture(scope="module")
def data() -> pg.Data:
  return pg.load_data("digits", n_train=128)


@pytest.fixture(scope="module")
def payload(data, tmp_path_factory):
  out = tmp_path_factory.mktemp("paper_grid")
  payload = pg.run(tiny_specs(), data, CFG, str(out), show_progress=False)
  return payload, out


def test_outputs_structure(payload):
  payload, out = payload
  assert (out / "heatmaps.png").stat().st_size > 10_000
  on_disk = json.loads((out / "results.json").read_text())
  assert set(on_disk["optimizers"]) == {"sgd_l2", "sgdw", "adam_l2", "adamw_lr",
                                        "adamw_schedule"}
  for spec in tiny_specs():
    r = on_disk["optimizers"][spec.key]
    assert r["lrs"] == list(spec.lrs)
    assert r["wds"] == [0.0, *spec.wds]
    errors = np.asarray(r["errors"])
    assert errors.shape == (len(spec.lrs), 1 + len(spec.wds), CFG.n_seeds)
    assert np.all((errors >= 0) & (errors <= 1))
    mean = errors.mean(-1)
    np.testing.assert_allclose(r["mean_error"], mean, rtol=1e-6)
    # The best cell is the argmin of the seed-mean error, its SE the seeds' std / sqrt(n).
    i, j = np.unravel_index(np.argmin(mean), mean.shape)
    assert r["best_error"] == pytest.approx(mean[i, j])
    assert r["best_error_se"] == pytest.approx(errors[i, j].std(ddof=1) / math.sqrt(2))
    assert (r["best_lr"], r["best_wd"]) == (spec.lrs[i], ([0.0, *spec.wds])[j])
    assert r["slope"] is None or isinstance(r["slope"], float)
    assert len(r["rows"]) == len(spec.lrs)
  claims = [c["claim"] for c in on_disk["criteria"]]
  assert len(claims) == 7  # 4 slopes, 2 AdamW-vs-Adam+L2, 1 Adam+L2 λ>0 vs λ=0
  assert all(isinstance(c["pass"], bool) for c in on_disk["criteria"])


@pytest.mark.parametrize("key", ["sgd_l2", "sgdw", "adam_l2", "adamw_lr", "adamw_schedule"])
def test_vmapped_grid_equals_separate_runs(payload, data, key):
  """Oracle: the same configuration trained alone (no vmap) through the same functions."""
  results = payload[0]["optimizers"][key]
  spec = next(s for s in tiny_specs() if s.key == key)
  cells = [(0, 2, 1), (1, 1, 0), (1, 0, 1)]  # (lr row, wd column incl. λ=0, seed)
  wds = (0.0, *spec.wds)
  single = pg.train_separately(spec, data, CFG,
                               [(spec.lrs[i], wds[j], s) for i, j, s in cells])
  for (i, j, s), one in zip(cells, single):
    assert one["error"] == pytest.approx(results["errors"][i][j][s], abs=1e-6)
    assert one["train_loss"] == pytest.approx(results["train_loss"][i][j][s], rel=1e-5)


def test_vmapped_params_equal_separate_runs(data):
  spec = next(s for s in tiny_specs() if s.key == "adamw_schedule")
  grid = pg.train_grid(spec, data, CFG, return_params=True)
  alphas, wds, seeds = pg.grid_configs(spec, CFG.n_seeds)
  picks = [1, len(alphas) - 1]
  single = pg.train_separately(spec, data, CFG,
                               [(alphas[k], wds[k], int(seeds[k])) for k in picks])
  for k, one in zip(picks, single):
    batched = jax.tree.map(lambda x, k=k: np.asarray(x[k]), grid["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 batched, jax.tree.map(np.asarray, one["params"]))
  # And training moved the parameters away from their initialisation.
  init = pg.init_mlp(int(seeds[picks[0]]), (64, 8, 8, 10))
  assert not np.allclose(init["dense_1"]["kernel"],
                         np.asarray(grid["params"]["dense_1"]["kernel"][picks[0]]))


# ----------------------------------------------------------------------------- analysis


def synthetic_grid(lrs, wds, wd_star, width=1.5):
  """Mean-error grid with a parabolic valley (in log2 λ) centred on ``wd_star(α)``."""
  logw = np.log2(wds)
  rows = [0.2 + 0.05 * ((logw - np.log2(wd_star(a))) / width) ** 2 for a in lrs]
  zero = np.full((len(lrs), 1), 0.6)  # λ=0 column, worse than the valley
  return np.concatenate([zero, np.asarray(rows)], axis=1)


LRS = pg.log2_grid(-8, -1)
WDS = pg.log2_grid(-16, 2, 2)


@pytest.mark.parametrize("true_slope", [-1.0, 0.0, -0.5])
def test_slope_recovers_constructed_valley(true_slope):
  # λ* = 2^-7 · (α / 2^-4)^true_slope: inside the λ grid for every row.
  mean = synthetic_grid(LRS, WDS, lambda a: 2.0**-7 * (a / 2.0**-4) ** true_slope)
  rows = pg.best_lambda_per_row(mean, WDS, max_row_error=0.5)
  assert all(r["used"] and r["interior"] and not r["zero_best"] for r in rows)
  slope, n = pg.fit_slope(LRS, rows)
  assert n == len(LRS)
  # A parabola in log2 λ is refined exactly when the centre is within half a grid step.
  assert slope == pytest.approx(true_slope, abs=1e-6)


def test_boundary_untrained_and_zero_rows():
  mean = synthetic_grid(LRS, WDS, lambda a: 2.0**-7)
  mean[0, 1:] = 0.2 + 0.01 * np.arange(len(WDS))  # argmin on the first column: boundary
  mean[1, 1:] = 0.85  # did not train
  mean[1, 2] = 0.84
  mean[2, 0] = 0.1  # λ=0 beats every λ>0
  rows = pg.best_lambda_per_row(mean, WDS, max_row_error=0.5)
  assert not rows[0]["interior"] and not rows[0]["used"]
  assert rows[1]["interior"] and not rows[1]["used"]
  assert rows[2]["zero_best"] and rows[2]["used"]
  assert pg.fit_slope(LRS, rows) == (pytest.approx(0.0, abs=1e-6), len(LRS) - 2)
  few = [dict(r, used=k < 2) for k, r in enumerate(rows)]
  slope, n = pg.fit_slope(LRS, few)
  assert math.isnan(slope) and n == 2


def _result(label, best, se, slope=math.nan, wd0=None, wd0_se=0.0, pos=None, pos_se=0.0):
  return {"label": label, "best_error": best, "best_error_se": se, "slope": slope,
          "slope_rows_used": 8, "best_error_wd0": wd0 if wd0 is not None else best,
          "best_error_wd0_se": wd0_se, "best_error_wd_pos": pos if pos is not None else best,
          "best_error_wd_pos_se": pos_se}


def test_criteria_follow_their_definitions():
  results = {
      "sgd_l2": _result("SGD+L2", 0.3, 0.01, slope=-1.4),
      "sgdw": _result("SGDW", 0.3, 0.01, slope=0.36),
      "adam_l2": _result("Adam+L2", 0.34, 0.01, wd0=0.36, wd0_se=0.01, pos=0.34, pos_se=0.01),
      "adamw_lr": _result("AdamW lr", 0.30, 0.01, slope=-0.4),  # diff 0.04 > 2·√2·0.01
      "adamw_schedule": _result("AdamW sched", 0.315, 0.01, slope=-0.2),  # 0.025 < 0.0283
  }
  got = [ok for _, ok, _ in pg.criteria(results)]
  # sgd slope in [-1.5, -0.5]; adamw_lr slope -0.4 not; sgdw 0.36 not < 0.35; sched yes;
  # adamw_lr beats Adam+L2 by > 2 SE; sched does not; Adam+L2 λ>0 vs λ=0: 0.02 < 0.0283.
  assert got == [True, False, False, True, True, False, True]
  results["adam_l2"]["best_error_wd0"] = 0.40
  assert pg.criteria(results)[-1][1] is False
  results["sgd_l2"]["slope"] = math.nan  # too few rows: a FAIL, never a PASS
  assert pg.criteria(results)[0][1] is False


# ----------------------------------------------------------------------------- figure


def test_one_color_scale_for_all_panels(payload, tmp_path):
  results = payload[0]["optimizers"]
  cells = np.concatenate([100 * np.ravel(r["mean_error"]) for r in results.values()])
  vmin, vmax = pg.color_range(results)
  assert vmin == pytest.approx(cells.min())  # the best cell of any panel
  assert vmax == pytest.approx(max(np.percentile(cells, pg.COLOR_CAP_PERCENTILE), vmin + 1))
  assert pg.plot_heatmaps(results, str(tmp_path / "h.png"), "t", ["n"]) == (vmin, vmax)
  assert (tmp_path / "h.png").stat().st_size > 10_000


def test_color_range_caps_diverged_cells():
  good = {"mean_error": [[0.30, 0.31], [0.32, 0.33]]}
  bad = {"mean_error": [[1.0, 1.0], [1.0, 0.9]]}
  vmin, vmax = pg.color_range({"a": good, "b": bad}, percentile=50)
  assert vmin == pytest.approx(30.0)
  assert vmax == pytest.approx(61.5)  # the median of the 8 cells, not 100
  flat = {"a": {"mean_error": [[0.5, 0.5]]}}
  assert pg.color_range(flat) == (pytest.approx(50.0), pytest.approx(51.0))


def test_cell_text_contrasts_with_its_colour():
  import matplotlib

  cmap = matplotlib.colormaps["viridis_r"]
  assert pg.text_color(cmap(0.0)) == "black"  # yellow: best cells
  assert pg.text_color(cmap(1.0)) == "white"  # dark purple: worst and clipped cells
  assert pg.text_color((1, 1, 1, 1)) == "black" and pg.text_color((0, 0, 0, 1)) == "white"


def test_figure_text_cites_no_missing_file(payload):
  """The title and notes drawn into heatmaps.png cite the paper, and no absent file."""
  import os
  import re

  checks = [(c["claim"], c["pass"], c["detail"]) for c in payload[0]["criteria"]]
  title, notes = pg.figure_text("digits", CFG, checks)
  text = "\n".join([title, *notes])
  assert "Loshchilov & Hutter 2019" in text and "Sec. 4.1 and Fig. 2" in text
  assert sum(line.startswith(("PASS ", "FAIL ")) for line in notes) == len(checks) == 7
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in re.findall(r"[\w./-]+\.(?:md|py|png|json|txt|pdf)\b", text):
    assert os.path.exists(os.path.join(root, name)), name
