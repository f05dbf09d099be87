"""The paper's experiments script: the closed form, and the VGG part end to end."""

import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from experiments import paper  # pylint: disable=wrong-import-position


def test_synthetic_matches_closed_form(tmp_path):
  rows, paths = paper.synthetic(str(tmp_path), lambdas=(0.05, 0.5, 1.0), ramps=(3, 4),
                                num_bins=100, dpi=40)
  assert len(rows) == 6
  for r in rows:
    # Exactly the discrete grid's reservation value, at every ramp but the last
    # and every bin, and sqrt(2 lam c) to grid resolution.
    assert r["exact"], r
    assert abs(r["solver_min"] - np.sqrt(2 * r["lam"] * 0.1)) <= 1 / 100, r
    assert r["within_grid"], r
  assert [os.path.basename(p) for p in paths] == ["fig4_synthetic_if_stop.png"]
  assert os.path.getsize(paths[0]) > 0


def test_discrete_reservation_tends_to_closed_form():
  values = (np.arange(2000) + 0.5) / 2000
  for lam_cost in (0.001, 0.02, 0.1):
    assert abs(paper.discrete_reservation(values, lam_cost) - np.sqrt(2 * lam_cost)) < 1e-3


def test_vgg_end_to_end(tmp_path):
  traces = {"vgg11": paper.TRACES["vgg11"]}
  results, defaults, paths = paper.vgg(str(tmp_path), traces=traces, num_lambdas=40, dpi=40)
  assert list(results) == ["VGG-11"] and list(defaults) == ["VGG-11"]
  res = results["VGG-11"]
  assert set(res["test"]) == {"recall", "norecall", "global_threshold", "oracle"}
  assert res["test"]["recall"].num_inputs == 500 and res["fit"]["recall"].num_inputs == 1500
  assert res["policy"].threshold.shape == (40, 3, 13)  # 0.08 bins on [0, 1]
  for m in ("recall", "norecall", "global_threshold"):
    pts = paper.at_targets(res, m)
    for t in paper.TARGETS:
      opt = pts[t]["optimistic"]
      assert opt is not None and opt["accuracy_loss"] <= t + 1e-9 and opt["speedup"] >= 1
  text = paper.format_vgg("VGG-11", res) + paper.headline(results) \
      + paper.format_defaults(defaults, results)
  assert "VGG-11" in text and "honest" in text
  assert sorted(os.path.basename(p) for p in paths) == ["fig5_vgg_frontier.png",
                                                        "fig6_vgg_if_stop.png"]
  for p in paths:
    assert 0 < os.path.getsize(p) < 300_000
