"""experiments/union.py keeps, per fold, the member with the most fit speedup
within the target and scores it on the held-out fold."""

import os
from types import SimpleNamespace

import numpy as np
import pytest


def _ev(speedup, agreement, n=10):
  return SimpleNamespace(speedup=np.array(speedup), agreement=np.array(agreement),
                         accuracy=None, num_inputs=n)


def test_scored_keeps_the_fit_fastest_member_and_falls_back_to_the_backbone(load_script):
  union = load_script("experiments/union.py")
  splits = [
      # fold 0: "a" is faster on the fit rows within 1% (its 3.0x misses the target)
      {"a": (_ev([3.0, 2.0], [0.95, 0.995]), _ev([2.5, 1.5], [0.9, 0.98])),
       "b": (_ev([1.8], [1.0]), _ev([1.9], [1.0]))},
      # fold 1: nothing meets the target on the fit rows: the backbone (1x, full agreement)
      {"a": (_ev([3.0], [0.9]), _ev([3.0], [0.9], n=30)),
       "b": (_ev([2.0], [0.98]), _ev([2.0], [0.98], n=30))},
  ]
  speed, picked, agree = union._scored(splits, None, 0.01)
  np.testing.assert_allclose(speed, [1.5, 1.0])
  assert picked == {"a": 1}
  assert agree == pytest.approx((0.98 * 10 + 1.0 * 30) / 40)
  # restricted to "b", fold 0 ships b's held-out 1.9x
  speed, picked, _ = union._scored(splits, ("b",), 0.01)
  np.testing.assert_allclose(speed, [1.9, 1.0])
  assert picked == {"b": 1}


def test_trace_dir_reaches_the_suite(load_script, monkeypatch, capsys):
  union = load_script("experiments/union.py")
  seen = []
  monkeypatch.setattr(union.workloads, "suite",
                      lambda trace_dir=None, as_conf=False: seen.append((trace_dir, as_conf)) or {})
  union.main(["--seeds", "0", "--trace-dir", "some/folder"])
  union.main(["--seeds", "0", "--trace-dir", "some/folder", "--signal-as-conf"])
  assert seen == [("some/folder", False), ("some/folder", True)]
  assert "seed 0: 0" in capsys.readouterr().out


def test_the_traces_own_signal_replaces_one_minus_conf(load_script):
  # experiments/reports/MARGIN.md: the margin suite records a signal; the suite does not.
  union = load_script("experiments/union.py")
  workloads = union.workloads
  folder = os.path.join(os.path.dirname(workloads.TRACE_DIR), "margin")
  margin = workloads.suite(folder)
  as_conf = workloads.suite(folder, signal_as_conf=True)
  plain = workloads.suite()
  name = "digits-vgg13-5r"
  assert union.signals_of(margin[name]) == ("signal", "stability", "class")
  assert union.signals_of(plain[name]) == ("1-conf", "stability", "class")
  assert as_conf[name].signal is None
  np.testing.assert_allclose(as_conf[name].conf, 1 - margin[name].signal)
  np.testing.assert_array_equal(as_conf[name].pred, plain[name].pred)
  with pytest.raises(ValueError, match="signal_as_conf needs traces with a signal"):
    workloads.suite(signal_as_conf=True)


def test_recall_pays_scores_every_family_budget_can_pick(load_script, monkeypatch):
  # Whatever `jexit budget --metric accuracy` picks per fold, the script has its
  # outer frontier (it raised KeyError when the class families were added).
  rp = load_script("experiments/recall_pays.py")
  traces = rp.label_overthink()
  families = list(rp.select.model_families(traces, {}, signal="auto", metric="accuracy"))
  assert len(families) == 6 and "class, label loss" in families
  monkeypatch.setattr(rp, "select_family", lambda traces, rows, *a: {
      t: [families[(i + j) % len(families)] for j in range(len(rows))]
      for i, t in enumerate(rp.TARGETS)})
  res = rp.run(2, 20, names=["synth-label-overthink"])["synth-label-overthink"]
  for t in rp.TARGETS:
    speed, _, _ = res["cells"][(rp.SELECTED, t)][:3]
    assert len(speed) == 2 and np.all(np.asarray(speed) >= 1.0)
