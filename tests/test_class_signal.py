"""The "class" exit signal: a per-class logistic calibration of each ramp's
agreement with the final ramp, fitted on the fit rows, cross-fitted where the
model is fitted, shipped in the policy table and computed the same way by
jexit.evaluation, the numpy runtime and the torch runner."""

import os

import numpy as np
import pytest

import jexit
from jexit import protocol, select
from jexit import traces as jt
from jexit.fit import CLASS_RIDGE, cross_fitted_class_signal, fit_class_calibration
from jexit.runtime import ExitTable, class_features, class_signal

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(HERE, "experiments", "traces", "pool2", "digits_vgg11_3ramps.npz")


def toy_traces(n=600, k=3, classes=4, seed=0):
  """Class 0 is right early whatever its confidence; the others only when sure."""
  rng = np.random.default_rng(seed)
  final = rng.integers(0, classes, n)
  conf = rng.uniform(0.3, 1.0, (n, k))
  right = (final[:, None] == 0) | (rng.uniform(size=(n, k)) < conf ** 4)
  wrong = (final[:, None] + 1 + rng.integers(0, classes - 1, (n, k))) % classes
  pred = np.where(right, final[:, None], wrong)
  pred[:, -1] = final
  return jexit.Traces(conf, pred, None, np.ones(k))


def test_class_signal_by_hand():
  c = 3
  w = np.arange(2 * (2 * c + 3), dtype=np.float64).reshape(2, 2 * c + 3) / 10 - 0.5
  conf = np.array([[0.9, 0.6, 0.7], [0.5, 1.0, 0.2]])
  pred = np.array([[2, 2, 1], [7, 0, 0]])  # class 7 was never seen: no class terms
  got = class_signal(conf, pred, w)
  for i in range(2):
    for k in range(2):
      p, lg = pred[i, k], np.log(max(1 - conf[i, k], 1e-9))
      same = float(k > 0 and pred[i, k] == pred[i, k - 1])
      z = w[k, 2 * c] * lg + w[k, 2 * c + 1] * same + w[k, 2 * c + 2]
      if p < c:
        z += w[k, p] + w[k, c + p] * lg
      np.testing.assert_allclose(got[i, k], 1 - 1 / (1 + np.exp(-z)), rtol=1e-12)
  np.testing.assert_array_equal(got[:, 2], 1 - conf[:, 2])  # the last ramp: 1 - conf
  assert class_features(conf[:, 0], pred[:, 0], None, c).shape == (2, 2 * c + 3)


def test_calibration_equals_scikit_learn_logistic_regression():
  sklearn = pytest.importorskip("sklearn.linear_model")
  traces = jexit.load_traces(DIGITS)
  w = fit_class_calibration(traces)
  c = int(traces.pred.max()) + 1
  assert w.shape == (traces.num_ramps - 1, 2 * c + 3)
  for k in range(traces.num_ramps - 1):
    x = class_features(traces.conf[:, k], traces.pred[:, k],
                       None if k == 0 else traces.pred[:, k - 1], c)
    y = traces.pred[:, k] == traces.pred[:, -1]
    # The same objective: ridge 1/C on every weight, the intercept free.
    ref = sklearn.LogisticRegression(C=1 / CLASS_RIDGE, tol=1e-12, max_iter=10_000)
    ref.fit(x[:, :-1], y)
    np.testing.assert_allclose(1 / (1 + np.exp(-x @ w[k])), ref.predict_proba(x[:, :-1])[:, 1],
                               atol=1e-5)
  # A ramp that always agrees keeps finite weights and a score near 1.
  same = traces._replace(pred=np.repeat(traces.pred[:, -1:], traces.num_ramps, axis=1))
  w_same = fit_class_calibration(same)
  assert np.all(np.isfinite(w_same))
  assert class_signal(same.conf, same.pred, w_same)[:, :-1].max() < 1e-3


def test_calibration_with_many_and_missing_classes_equals_scikit_learn():
  # 60 classes, some never predicted at ramp 0 and some with one row: the
  # per-class Newton blocks and their Schur complement against a dense solver.
  sklearn = pytest.importorskip("sklearn.linear_model")
  rng = np.random.default_rng(3)
  n, c = 500, 60
  final = rng.integers(0, c, n)
  conf = rng.uniform(0.05, 1.0, (n, 2))
  early = np.where(rng.uniform(size=n) < conf[:, 0], final, rng.integers(0, c // 2, n))
  traces = jexit.Traces(conf, np.stack([early, final], axis=1), None, np.ones(2))
  w = fit_class_calibration(traces)
  assert w.shape == (1, 2 * c + 3)
  x = class_features(conf[:, 0], early, None, c)
  ref = sklearn.LogisticRegression(C=1 / CLASS_RIDGE, tol=1e-12, max_iter=10_000)
  ref.fit(x[:, :-1], early == final)
  np.testing.assert_allclose(1 / (1 + np.exp(-x @ w[0])), ref.predict_proba(x[:, :-1])[:, 1],
                             atol=1e-5)


def test_cross_fitted_scores_never_see_their_own_block():
  traces = toy_traces()
  block = 4
  base = cross_fitted_class_signal(traces, block=block)
  # Flip the final answer of one row (so its ramps' targets change): its own
  # score and its block-mates' do not move; other rows' do.
  pred = traces.pred.copy()
  row = 101
  pred[row, -1] = (pred[row, -1] + 1) % 4
  moved = cross_fitted_class_signal(traces._replace(pred=pred), block=block)
  mates = np.arange(row - row % block, row - row % block + block)
  np.testing.assert_array_equal(moved[mates, :-1], base[mates, :-1])
  assert np.abs(moved[:, :-1] - base[:, :-1]).max() > 0


def test_fit_bins_the_cross_fitted_scores_and_ships_the_calibration():
  traces = toy_traces()
  model, binning = jexit.fit(traces, signal="class", class_block=2)
  assert binning.signal == "class"
  np.testing.assert_array_equal(binning.calibration, fit_class_calibration(traces))
  # The same model as fitting the cross-fitted scores as a custom signal on [0, 1].
  values = cross_fitted_class_signal(traces, block=2)
  same, b2 = jexit.fit(traces._replace(signal=values), signal="signal", signal_range=(0, 1))
  np.testing.assert_array_equal(binning.edges, b2.edges)
  for a, b in zip(model, same):
    np.testing.assert_array_equal(a, b)
  # In-sample scores would give another model (the one that misses its target).
  in_sample = class_signal(traces.conf, traces.pred, binning.calibration)
  assert not np.allclose(in_sample, values)
  with pytest.raises(ValueError, match="class_block"):
    jexit.fit(traces, signal="class", class_block=0)
  huge = traces.pred.copy()
  huge[0, 0] = 10 ** 9  # an id, not a class index
  with pytest.raises(ValueError, match="traces.pred: the 'class' signal .* got 1000000000"):
    jexit.fit(traces._replace(pred=huge), signal="class")
  with pytest.raises(ValueError, match="'class' needs finite weights"):
    jexit.evaluate(jexit.solve(model, np.array([0.1])), traces,
                   binning._replace(calibration=None))


def test_frontier_scores_fit_rows_cross_fitted_and_test_rows_with_the_calibration():
  traces = toy_traces(n=800)
  fr = protocol.frontier(traces, methods=("recall",), num_lambdas=20, block=2,
                   fit_options={"signal": "class", "num_bins": 8})
  fit_rows, test_rows = jt.split_rows(traces.num_inputs, block=2)
  model, binning = fr.candidates[0][0]
  assert binning.signal == "class"
  np.testing.assert_array_equal(binning.calibration, fit_class_calibration(traces, fit_rows))
  policy = jexit.solve(model, fr.lambdas)
  fit_t = traces.take(fit_rows)
  want_fit = jexit.evaluate(policy, fit_t._replace(
      signal=cross_fitted_class_signal(fit_t, block=2)), binning._replace(
          signal="signal", calibration=None))
  want_test = jexit.evaluate(policy, traces.take(test_rows), binning)
  got_fit, got_test = fr.splits[0]["recall"]
  np.testing.assert_allclose(got_fit.agreement, want_fit.agreement)
  np.testing.assert_allclose(got_fit.mean_cost, want_fit.mean_cost)
  np.testing.assert_allclose(got_test.agreement, want_test.agreement)
  np.testing.assert_allclose(got_test.mean_cost, want_test.mean_cost)


def test_budget_auto_scores_the_class_signal():
  traces = jexit.load_traces(DIGITS)
  b = select.choose(traces, 0.01, block=4, num_lambdas=100, methods=("recall", "backbone"))
  assert set(b.signal_scores) == {"1-conf", "stability", "class"}
  assert all(v >= 1.0 for v in b.signal_scores.values())
  # Predictions that are not class indices leave the class signal out of the choice.
  ids = traces._replace(pred=traces.pred.astype(np.int64) + 10 ** 6)
  assert select.auto_signals(ids) == ("1-conf", "stability")


@pytest.mark.parametrize("recall", [True, False])
def test_exported_class_table_runs_as_evaluate(tmp_path, recall):
  traces = jexit.load_traces(DIGITS)
  fit_rows = np.arange(1600)
  held = traces.take(np.arange(1600, traces.num_inputs))
  model, binning = jexit.fit(traces, rows=fit_rows, signal="class", class_block=4)
  lams = protocol.default_lambdas(model, 40)
  policy = jexit.solve(model, lams, recall=recall)
  ev = jexit.evaluate(policy, held, binning, return_per_input=True)
  i = int(np.argmin(np.abs(ev.agreement - 0.99)))
  path = tmp_path / "class.npz"
  header = jexit.export_policy(path, policy, binning, model, i)
  assert header["signal"] == "class"
  table = ExitTable.load(path)
  np.testing.assert_array_equal(table.calibration, binning.calibration)
  stop, out, pred = table.run(held.conf, held.pred)
  np.testing.assert_array_equal(stop, np.asarray(ev.stop_ramp)[i])
  np.testing.assert_array_equal(out, np.asarray(ev.output_ramp)[i])
  assert 0 < np.mean(stop < traces.num_ramps - 1) < 1
  # Step by step, with the table computing its own signal.
  state, prev, done = None, None, np.zeros(held.num_inputs, bool)
  got = np.full(held.num_inputs, -1)
  for k in range(traces.num_ramps):
    v = table.signal_of(k, held.conf[:, k], held.pred[:, k], prev)
    v = np.where(done, 0.0, v)  # rows that stopped are fed a dummy value
    s, state = table.step(k, v, state)
    got[s & ~done] = k
    done |= s
    prev = held.pred[:, k]
  np.testing.assert_array_equal(got, stop)
  # The batch-size-1 path gives the same values bit for bit, unseen classes included.
  pred = held.pred.copy()
  pred[::7, 0] = 12  # a class the fit rows never predicted
  for i in range(0, held.num_inputs, 11):
    prev = None
    for k in range(traces.num_ramps):
      one = table.signal_one(k, float(held.conf[i, k]), int(pred[i, k]), prev)
      arr = table.signal_of(k, held.conf[i:i + 1, k], pred[i:i + 1, k],
                            None if prev is None else pred[i:i + 1, k - 1])
      assert one == float(arr[0]), (i, k)
      prev = int(pred[i, k])


def test_policy_file_calibration_is_checked(tmp_path):
  traces = toy_traces()
  model, binning = jexit.fit(traces, signal="class", num_bins=4)
  policy = jexit.solve(model, np.array([0.05]))
  path = tmp_path / "c.npz"
  jexit.export_policy(path, policy, binning, model, 0)
  data = dict(np.load(path))
  cases = {
      "missing": ({k: v for k, v in data.items() if k != "calibration"}, "missing key"),
      "nan": ({**data, "calibration": np.where(True, np.nan, data["calibration"])},
              "calibration: expected finite"),
      "shape": ({**data, "calibration": data["calibration"][:, :-1]},
                r"calibration: expected float weights of shape \[K-1=2, 2C\+3\]"),
  }
  for name, (arrays, match) in cases.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(ValueError, match=match):
      ExitTable.load(tmp_path / f"{name}.npz")
  plain_model, plain_binning = jexit.fit(traces, num_bins=4)
  jexit.export_policy(tmp_path / "p.npz", jexit.solve(plain_model, np.array([0.05])),
                      plain_binning, plain_model, 0)
  np.savez(tmp_path / "extra.npz", **dict(np.load(tmp_path / "p.npz")),
           calibration=data["calibration"])
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['calibration'\]"):
    ExitTable.load(tmp_path / "extra.npz")
  with pytest.raises(ValueError, match="binning.calibration"):
    jexit.export_policy(tmp_path / "bad.npz", policy, binning._replace(calibration=None),
                        model, 0)


def test_experiment_script_scores_every_method_held_out(load_script):
  script = load_script("experiments/class_signal.py")
  out = script.run(toy_traces(n=400), seed=0, folds=2, block=2, num_lambdas=20)
  assert set(out) == set(script.METHODS) | set(script.quality.EXTERNAL)
  for method, cells in out.items():
    for target, (speed, agreement) in cells.items():
      assert speed.shape == (2,) and np.all(speed >= 1.0) and 0.0 <= agreement <= 1.0
