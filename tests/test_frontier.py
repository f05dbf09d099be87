"""Tests of the frontier, the budget choice, cross-fitting and the if-stop tables."""

import json

import numpy as np
import pytest

import jexit
from jexit import contrib, protocol, report, select
from jexit import traces as jt
from jexit.evaluation import evaluate


def make_traces(n=400, k=3, seed=0, labels=True):
  rng = np.random.default_rng(seed)
  hard = rng.uniform(size=n)
  conf = np.clip(1 - hard[:, None] * np.linspace(0.9, 0.5, k) + rng.normal(0, 0.05, (n, k)),
                 0, 1)
  final = rng.integers(0, 5, n)
  pred = np.where(rng.uniform(size=(n, k)) < conf ** 2, final[:, None], (final[:, None] + 1) % 5)
  pred[:, -1] = final
  label = np.where(rng.uniform(size=n) < 0.9, final, (final + 2) % 5) if labels else None
  return jexit.Traces(conf, pred, label, np.array([1.0, 1.5, 2.0, 1.0, 1.0][:k]))


@pytest.fixture(scope="module")
def traces():
  return make_traces()


@pytest.fixture(scope="module")
def fr(traces):
  return protocol.frontier(traces, num_lambdas=60, apparate_budgets=(0.0, 0.02, 0.1))


def test_splits_are_seeded_and_disjoint():
  fit, test = jt.split_rows(101, test_fraction=0.3, seed=3)
  assert len(test) == 30 and len(fit) == 71
  assert not set(fit) & set(test) and set(fit) | set(test) == set(range(101))
  np.testing.assert_array_equal(jt.split_rows(101, test_fraction=0.3, seed=3)[1], test)
  assert not np.array_equal(jt.split_rows(101, test_fraction=0.3, seed=4)[1], test)
  folds = jt.fold_rows(50, 4, seed=0)
  tests = np.concatenate([t for _, t in folds])
  assert sorted(tests) == list(range(50))
  for f, t in folds:
    assert not set(f) & set(t) and len(f) + len(t) == 50
  with pytest.raises(ValueError, match="test_fraction"):
    jt.split_rows(10, test_fraction=1.0)
  with pytest.raises(ValueError, match="folds"):
    jt.fold_rows(10, 1)
  with pytest.raises(ValueError, match="test_fraction"):
    jt.split_rows(10, test_fraction="0.5")
  with pytest.raises(ValueError, match="seed"):
    jt.split_rows(10, seed=-1)


def test_wrong_types_of_arguments_are_named():
  # Each was a TypeError from deep inside fit, numpy or a comparison.
  traces = jexit.Traces(np.full((20, 2), 0.5), np.zeros((20, 2), int), None, np.ones(2))
  with pytest.raises(ValueError, match=r"fit_options: unknown key\(s\) \['nbins'\]"):
    protocol.frontier(traces, fit_options={"nbins": 8}, num_lambdas=5)
  with pytest.raises(ValueError, match="num_lambdas"):
    protocol.frontier(traces, num_lambdas=5.5)
  with pytest.raises(ValueError, match="max_loss"):
    select.choose(traces, "0.01", num_lambdas=5)


def test_too_many_lam_values_are_refused_before_solving(traces, monkeypatch):
  # 1e7 lam values on the demo trace needed ~36 GiB and died in XLA.
  with pytest.raises(ValueError, match=r"num_lambdas: 10000000000 lam values need about .* GiB"):
    protocol.frontier(traces, num_lambdas=10**10)
  fitted = protocol.fit_candidates(traces, np.arange(traces.num_inputs), protocol.merged_fit_options(None))
  per_lam = protocol.frontier_bytes(fitted, 1, protocol.METHODS, 1)
  assert per_lam > 0 and protocol.frontier_bytes(fitted, 1000, protocol.METHODS, 1) == 1000 * per_lam
  assert protocol.frontier_bytes(fitted, 1000, protocol.METHODS, 5) > 1000 * per_lam
  assert protocol.frontier_bytes(fitted, 1000, ("apparate_greedy",), 1) == 0
  # An explicit grid is checked against the free memory too.
  monkeypatch.setattr(protocol, "available_host_bytes", lambda: 100 * per_lam)
  with pytest.raises(ValueError, match="lambdas: 101 lam values"):
    protocol.frontier(traces, lambdas=np.linspace(0.01, 1.0, 101))
  assert protocol.frontier(traces, lambdas=np.linspace(0.01, 1.0, 99), methods=("recall",))


def test_default_lambdas_and_pareto():
  model = jexit.ExitModel(np.full(2, 0.5), np.full((1, 2, 2), 0.5),
                          np.array([[0.2, 0.8], [0.1, 0.4]]), np.array([1.0, 3.0]))
  lams = protocol.default_lambdas(model, 100)
  assert lams.shape == (100,) and np.all(np.diff(lams) > 0)
  np.testing.assert_allclose([lams[0], lams[-1]], [1e-4 * 0.7 / 4, 2 * 0.7 / 1.0])
  # Policy at the top of the grid stops at ramp 1 (continuing never pays).
  assert np.all(np.asarray(jexit.solve(model, lams[-1:]).threshold)[0, 0] > -np.inf)
  agree = np.array([0.9, 0.95, 0.95, 0.8, 1.0, 0.97])
  cost = np.array([1.0, 2.0, 2.0, 1.5, 3.0, 3.0])
  np.testing.assert_array_equal(protocol.pareto_mask(agree, cost),
                                [True, True, False, False, True, False])


def test_frontier_runs_every_method_on_fit_and_test_rows(traces, fr):
  assert tuple(fr.test) == protocol.METHODS == tuple(fr.fit) == tuple(fr.pareto)
  assert fr.split["fit_rows"] == 200 and fr.split["test_rows"] == 200
  fit_rows, test_rows = jt.split_rows(400)
  # The recall curve is exactly: fit each candidate model on the fit rows,
  # solve, evaluate on test rows, and concatenate the candidates' grids.
  candidates = protocol.fit_candidates(traces, fit_rows, protocol.DEFAULT_FIT)
  assert [b.num_bins for _, b in candidates] == list(protocol.DEFAULT_FIT["num_bins"])
  lams = protocol.default_lambdas(candidates[0][0], 60)
  direct = [evaluate(jexit.solve(m, lams), traces.take(test_rows), b) for m, b in candidates]
  np.testing.assert_allclose(fr.test["recall"].agreement,
                             np.concatenate([d.agreement for d in direct]))
  np.testing.assert_allclose(fr.test["recall"].param, np.tile(lams, len(candidates)))
  # Entry i of the pooled grid is lam i % L of candidate i // L.
  i = len(lams) + 7
  policy, lam_index, _, binning = protocol.candidate_policy(fr, "recall", i)
  assert lam_index == 7 and binning.num_bins == protocol.DEFAULT_FIT["num_bins"][1]
  assert protocol.param_value(fr, "recall", 0, i) == {"lam": float(lams[7]),
                                                 "num_bins": binning.num_bins}
  assert fr.test["recall"].num_inputs == 200 and fr.fit["recall"].num_inputs == 200
  assert fr.apparate_thresholds[0].shape == (3, 3)
  np.testing.assert_allclose(fr.test["apparate_greedy"].param, [0.0, 0.02, 0.1])
  assert fr.test["backbone"].agreement[0] == 1.0
  assert fr.test["oracle"].agreement[0] == 1.0
  for m, ev in fr.test.items():
    np.testing.assert_allclose(ev.stop_hist.sum(-1), 1.0, err_msg=m)
    assert fr.pareto[m].dtype == bool and fr.pareto[m].any()
    full = ev.agreement == 1.0  # full agreement costs at least the oracle's
    assert np.all(ev.mean_cost[full] >= fr.test["oracle"].mean_cost[0] - 1e-12), m


def test_fit_options_pass_through_without_touching_defaults(traces):
  before = dict(protocol.DEFAULT_FIT)
  fr = protocol.frontier(traces, num_lambdas=20, methods=("recall",),
                   fit_options={"loss": "calibrated", "bins": "quantile", "num_bins": 6})
  assert protocol.DEFAULT_FIT == before
  assert fr.fit_options["loss"] == "calibrated" and fr.fit_options["num_bins"] == 6
  assert fr.model.loss.shape == (3, 6) and np.all(fr.model.loss[-1] == 0)
  with pytest.raises(ValueError, match="methods"):
    protocol.frontier(traces, methods=("recall", "magic"))
  with pytest.raises(ValueError, match="loss"):
    protocol.frontier(traces, methods=("recall",), fit_options={"loss": "nope"})


def test_cross_fitting_pools_held_out_folds(traces):
  fr = protocol.frontier(traces, num_lambdas=20, folds=3, methods=("recall", "fixed_ramp"))
  assert fr.split["folds"] == 3 and fr.test["recall"].num_inputs == 400
  folds = jt.fold_rows(400, 3)
  lams = fr.test["recall"].param
  evs = []
  for fit_rows, test_rows in folds:
    evs.append(protocol._concat([evaluate(jexit.solve(m, lams[:20]), traces.take(test_rows), b)
                           for m, b in protocol.fit_candidates(traces, fit_rows, protocol.DEFAULT_FIT)]))
  w = np.array([e.num_inputs for e in evs])
  pooled = sum(wi * e.agreement for wi, e in zip(w, evs)) / w.sum()
  np.testing.assert_allclose(fr.test["recall"].agreement, pooled)
  agree = traces.pred == traces.pred[:, -1:]
  np.testing.assert_allclose(fr.test["fixed_ramp"].agreement, agree.mean(0))


def test_budget_choice_is_best_feasible_on_fit_rows(traces, fr):
  for max_loss in (0.0, 0.01, 0.05):
    choices = select.per_method(fr, max_loss)
    for m, c in choices.items():
      fit_ev = fr.fit[m]
      ok = 1 - fit_ev.agreement <= max_loss + 1e-12
      if c.fit is None:
        assert not ok.any(), m
        continue
      assert 1 - c.fit.agreement[0] <= max_loss + 1e-12, m
      np.testing.assert_allclose(c.fit.speedup[0], fit_ev.speedup[ok].max(), err_msg=m)
  b = select.choose(traces, 0.05, num_lambdas=60)
  assert b.max_loss == 0.05 and set(b.choices) == set(protocol.METHODS)
  assert b.choices["backbone"].param == 2
  app = b.choices["apparate_greedy"]
  assert isinstance(app.param, list) and len(app.param) == 2  # thresholds of ramps 1, 2
  assert 1 - app.fit.agreement[0] <= 0.05 + 1e-12
  bf = select.choose(traces, 0.05, folds=3, num_lambdas=30, methods=("global_threshold", "oracle"))
  assert len(bf.choices["global_threshold"].param) == 3
  assert bf.choices["oracle"].test.num_inputs == 400


def test_json_dicts_have_the_documented_shape(traces, fr):
  d = report.frontier_to_dict(fr, "t.npz")
  assert set(d) >= {"trace", "split", "methods"} and d["trace"] == "t.npz"
  assert set(d["methods"]) == set(protocol.METHODS)
  for m, entries in d["methods"].items():
    assert len(entries) == fr.pareto[m].sum()
    for e in entries:
      assert set(e) == {"param", "agreement", "accuracy", "mean_cost", "speedup"}
      assert 0 <= e["agreement"] <= 1 and e["speedup"] >= 1 - 1e-9
  everything = report.frontier_to_dict(fr, all_points=True)
  assert len(everything["methods"]["recall"]) == 60 * len(protocol.DEFAULT_FIT["num_bins"])
  b = report.choice_to_dict(select.choose(traces, 0.02, num_lambdas=30), "t.npz")
  assert b["max_loss"] == 0.02
  assert b["certificate"] is None  # uncertified: delta=None
  for m, c in b["methods"].items():
    assert set(c) == {"param", "fit", "test", "certificate"}
    assert c["certificate"] is None
    if c["test"] is not None:
      assert set(c["test"]) == {"agreement", "accuracy", "mean_cost", "speedup"}
  json.dumps(d, allow_nan=False)
  json.dumps(b, allow_nan=False)
  no_labels = protocol.frontier(make_traces(labels=False), num_lambdas=10, methods=("backbone",))
  assert report.frontier_to_dict(no_labels)["methods"]["backbone"][0]["accuracy"] is None
  text = report.format_frontier(fr, trace="t.npz")
  assert "recall" in text and "loss <= 1%" in text
  # The "best (fit rows)" row repeats, per budget, the row of best_method's choice.
  rows = {line[:18].strip(): line[18:] for line in text.splitlines()}
  cells = lambda row: [row[i:i + 20] for i in range(0, len(row), 20)]
  for j, t in enumerate(report.TARGETS):
    best = select.best_method(select.per_method(fr, t))
    assert best in select.DEPLOYABLE and f"{best} at {t * 100:g}%" in text
    assert cells(rows["best (fit rows)"])[j] == cells(rows[best])[j]
  only = protocol.frontier(traces, num_lambdas=10, methods=("recall", "backbone"))
  assert "best (fit rows)" not in report.format_frontier(only)


def test_if_stop_tables_follow_the_thresholds(fr):
  from jexit.plots import if_stop_tables
  i = 30
  grid, table = if_stop_tables(fr.policy, i)
  thr = np.asarray(fr.policy.threshold)[i]
  loss = np.asarray(fr.policy.loss)
  k, x, s = table.shape
  assert (k, s) == loss.shape and x == len(grid)
  for r in range(k):
    for a in range(x):
      for b in range(s):
        if not np.isnan(table[r, a, b]):
          assert table[r, a, b] == float(grid[a] <= thr[r, b])
          assert grid[a] <= loss[r, b]
  assert np.all(table[-1][~np.isnan(table[-1])] == 1)  # the last ramp always stops


def test_block_splits_keep_related_rows_together():
  for block in (1, 4, 7):
    fit_rows, test_rows = jt.split_rows(103, seed=3, block=block)
    assert len(np.intersect1d(fit_rows, test_rows)) == 0
    assert len(fit_rows) + len(test_rows) == 103
    assert set(fit_rows // block).isdisjoint(test_rows // block)
    for fit_r, test_r in jt.fold_rows(103, 4, seed=1, block=block):
      assert set(fit_r // block).isdisjoint(test_r // block)
      assert len(fit_r) + len(test_r) == 103
  with pytest.raises(ValueError, match="block"):
    jt.split_rows(10, block=0)
  with pytest.raises(ValueError, match="folds"):
    jt.fold_rows(10, 4, block=5)


def test_paper_settings_give_a_single_candidate(traces):
  fr = protocol.frontier(traces, num_lambdas=20, methods=("recall",), fit_options=protocol.PAPER_FIT)
  assert len(fr.candidates[0]) == 1 and fr.binning.num_bins == 13
  assert fr.test["recall"].agreement.shape == (20,)


def test_explicit_edges_give_a_single_candidate(traces):
  edges = np.linspace(0, 1, 6)
  cands = protocol.fit_candidates(traces, np.arange(200), {**protocol.DEFAULT_FIT, "bins": edges})
  assert len(cands) == 1 and cands[0][1].num_bins == 5


def flip_traces(n=1600, k=3, seed=0):
  """Confidence says nothing; a prediction that changed says the ramp is wrong."""
  rng = np.random.default_rng(seed)
  final = rng.integers(0, 5, n)
  right = rng.uniform(size=(n, k)) < np.array([0.6, 0.8, 1.0])[:k]
  wrong = (final[:, None] + rng.integers(1, 5, (n, k))) % 5
  pred = np.where(right, final[:, None], wrong)
  return jexit.Traces(rng.uniform(0.2, 1.0, (n, k)), pred, None, np.ones(k))


def test_budget_chooses_the_signal_on_fit_rows_only():
  traces = flip_traces()
  b = select.choose(traces, 0.02, num_lambdas=60, methods=("recall", "global_threshold"))
  scores = b.signal_scores
  assert list(scores) == ["1-conf", "stability", "class"]
  # Both signals that read the changed prediction beat the confidence alone.
  assert min(scores["stability"], scores["class"]) > scores["1-conf"] + 0.1
  chosen = max(scores, key=lambda sig: (scores[sig], -list(scores).index(sig)))
  assert b.fit_options["signal"] == chosen
  assert b.choices["recall"].test.speedup[0] > b.choices["global_threshold"].test.speedup[0]
  # The test rows are never read by the choice: scramble them, same scores.
  _, test_rows = jt.split_rows(traces.num_inputs)
  pred = traces.pred.copy()
  pred[test_rows] = np.random.default_rng(1).integers(0, 5, pred[test_rows].shape)
  other = select.choose_signal(traces._replace(pred=pred), 0.02, num_lambdas=60)
  assert other == (chosen, b.signal_scores)
  # An explicit signal, or folds, make no selection.
  assert select.choose(traces, 0.02, num_lambdas=60, methods=("recall",),
                   signal="1-conf").signal_scores is None
  fold = select.choose(traces, 0.02, num_lambdas=60, methods=("recall",), folds=2)
  assert fold.signal_scores is None and "signal" not in fold.fit_options
  with pytest.raises(ValueError, match="signal: expected one of"):
    select.choose(traces, 0.02, signal="entropy")
  text = report.format_choice(b)
  assert f"exit signal of recall/norecall: {chosen}" in text
  assert report.choice_to_dict(b)["signal_scores"] == b.signal_scores


def overthink_traces(n=2000, seed=3):
  """Each ramp right with probability conf (independently given conf); the
  final ramp is less sure than the middle ones, so many inputs are right
  early and wrong at the end (experiments/recall_pays.py's workload)."""
  rng = np.random.default_rng(seed)
  k = 4
  z = np.array([0.8, 2.0, 2.0, 1.6]) - 1.5 * rng.normal(size=(n, 1)) + rng.normal(0, 1.2, (n, k))
  conf = 0.1 + 0.9 / (1 + np.exp(-z))
  label = rng.integers(0, 10, n)
  right = rng.uniform(size=(n, k)) < conf
  pred = np.where(right, label[:, None], (label[:, None] + rng.integers(1, 10, (n, k))) % 10)
  return jexit.Traces(conf, pred, label, np.ones(k))


def test_choose_index_by_accuracy():
  ev = jexit.Evaluation(param=np.arange(4.0), agreement=np.array([1.0, 0.9, 0.95, 0.8]),
                        accuracy=np.array([0.80, 0.84, 0.79, 0.70]),
                        mean_cost=np.array([4.0, 3.0, 2.0, 1.0]),
                        speedup=np.array([1.0, 4 / 3, 2.0, 4.0]), stop_hist=None,
                        output_hist=None, p50_cost=None, p95_cost=None, p99_cost=None,
                        objective=None, num_inputs=10)
  assert select.choose_index(ev, 0.0) == 0                    # agreement: only the backbone
  assert select.choose_index(ev, 0.01, metric="accuracy", reference=0.80) == 2
  assert select.choose_index(ev, -0.02, metric="accuracy", reference=0.80) == 1  # a gain
  assert select.choose_index(ev, -0.1, metric="accuracy", reference=0.80) is None
  with pytest.raises(ValueError, match="needs traces with labels"):
    select.choose_index(ev._replace(accuracy=None), 0.01, metric="accuracy", reference=0.8)
  with pytest.raises(ValueError, match="metric: expected one of"):
    select.choose_index(ev, 0.01, metric="f1")


def test_label_oracle_is_first_correct_ramp_and_bounds_every_policy():
  traces = overthink_traces(500)
  orc = jexit.baselines.oracle(traces, [0.0, 0.05, 0.3], target="label", return_per_input=True)
  correct = traces.pred == traces.label[:, None]
  first = np.where(correct.any(1), np.argmax(correct, 1), 0)
  np.testing.assert_array_equal(orc.stop_ramp[0], first)
  assert orc.accuracy[0] == pytest.approx(correct.any(1).mean())
  # No policy (here: every global threshold) has a lower error + lam * cost.
  grid = jexit.baselines.global_threshold(traces)
  for i, lam in enumerate([0.0, 0.05, 0.3]):
    bound = 1 - orc.accuracy[i] + lam * orc.mean_cost[i]
    assert np.all(1 - grid.accuracy + lam * grid.mean_cost >= bound - 1e-12)
  with pytest.raises(ValueError, match="needs traces.label"):
    jexit.baselines.oracle(traces._replace(label=None), target="label")


def test_budget_by_accuracy_chooses_the_loss_target_and_recall_pays():
  traces = overthink_traces()
  fit_rows, test_rows = jt.split_rows(traces.num_inputs)
  backbone_fit = np.mean(traces.pred[fit_rows, -1] == traces.label[fit_rows])
  # A gain of 5 points over the backbone on the fit rows.
  b = select.choose(traces, -0.05, metric="accuracy", num_lambdas=100, signal="1-conf",
                methods=("recall", "norecall", "backbone", "oracle"))
  assert b.metric == "accuracy"
  assert set(b.signal_scores) == {"1-conf, agreement loss", "1-conf, label loss"}
  # The label loss knows that the final ramp is often wrong; agreement cannot.
  assert b.fit_options["target"] == "label"
  assert b.signal_scores["1-conf, label loss"] > b.signal_scores["1-conf, agreement loss"] + 0.3
  recall = b.choices["recall"]
  assert recall.fit.accuracy[0] >= backbone_fit + 0.05 - 1e-12
  assert recall.test.accuracy[0] > np.mean(traces.pred[test_rows, -1] == traces.label[test_rows])
  # Answering with an earlier ramp is what buys the gain: recall is faster
  # than the best no-recall policy with the same gain, or the latter has none.
  norecall = b.choices["norecall"]
  assert norecall.fit is None or recall.fit.speedup[0] > norecall.fit.speedup[0]
  assert b.choices["backbone"].fit is None  # the backbone cannot gain on itself
  assert "accuracy budget: at least 5% above the backbone" in report.format_choice(b)
  d = report.choice_to_dict(b)
  assert d["metric"] == "accuracy" and d["fit_options"]["target"] == "label"


def test_budget_by_accuracy_validates():
  with pytest.raises(ValueError, match="needs traces with labels"):
    select.choose(make_traces(labels=False), 0.01, metric="accuracy", num_lambdas=20)
  with pytest.raises(ValueError, match=r"agreement-loss budget in \[0, 1\]"):
    select.choose(make_traces(), -0.01, num_lambdas=20)
  with pytest.raises(ValueError, match="metric: expected one of"):
    select.choose(make_traces(), 0.01, metric="top5", num_lambdas=20)
  # An explicit target is kept (nothing to choose with one signal).
  b = select.choose(make_traces(), 0.02, metric="accuracy", num_lambdas=20, signal="1-conf",
                fit_options={"target": "agreement"}, methods=("recall",))
  assert b.signal_scores is None and b.fit_options["target"] == "agreement"


def test_contrib_history_candidates_end_to_end(traces):
  kw = dict(num_lambdas=40, methods=("recall", "norecall"), folds=2)
  plain = protocol.frontier(traces, **kw)
  cond = protocol.frontier(traces, candidates=contrib.candidates(history=16.0), **kw)
  assert all(m.trans.ndim == 4 for split in cond.candidates for m, _ in split)
  assert all(m.trans.ndim == 3 for split in cond.markov_candidates for m, _ in split)
  # Without recall the state is the bin alone: norecall keeps the Markov fit.
  for f in ("agreement", "speedup"):
    np.testing.assert_array_equal(getattr(cond.test["norecall"], f),
                                  getattr(plain.test["norecall"], f))
  # The conditioned recall grid differs from the Markov one (history matters).
  assert not np.array_equal(cond.test["recall"].speedup, plain.test["recall"].speedup)
  _, _, model, _ = protocol.candidate_policy(cond, "norecall", 50, split=1)
  assert model.trans.ndim == 3
  policy, lam_index, model, binning = protocol.candidate_policy(cond, "recall", 50, split=1)
  assert model.trans.ndim == 4 and policy.threshold.shape[1:] == (3, binning.num_bins)
  ev = evaluate(policy, traces.take(jt.fold_rows(400, 2)[1][1]), binning)
  np.testing.assert_allclose(ev.agreement[lam_index], cond.splits[1]["recall"][1].agreement[50])


def test_contrib_cost_tilts_add_candidates(traces):
  kw = dict(num_lambdas=20, methods=("recall",))
  plain = protocol.frontier(traces, **kw)
  tilted = protocol.frontier(traces, candidates=contrib.tilted((0.5, 2.0)), **kw)
  k = traces.num_ramps
  assert len(tilted.candidates[0]) == len(plain.candidates[0]) * (1 + 2 * (k - 1))
  # Each candidate model comes before its tilts and decides as before.
  per = 1 + 2 * (k - 1)
  lam = len(plain.lambdas)
  for c in range(len(plain.candidates[0])):
    np.testing.assert_array_equal(
        tilted.test["recall"].speedup[c * per * lam:(c * per + 1) * lam],
        plain.test["recall"].speedup[c * lam:(c + 1) * lam])
