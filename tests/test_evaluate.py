"""Tests of jexit.evaluation: replay == a plain per-input loop, and model values."""

import itertools

import numpy as np
import pytest

import jexit
from jexit.evaluation import evaluate, expected_objective
from jexit.metrics import Evaluation, cost_quantiles, summarize


def random_traces(rng, n=300, k=3, classes=3, labels=True, signal=False):
  conf = rng.uniform(size=(n, k))
  pred = rng.integers(0, classes, (n, k))
  label = rng.integers(0, classes, n) if labels else None
  sig = rng.normal(size=(n, k)) if signal else None
  return jexit.Traces(conf, pred, label, rng.uniform(0.2, 2.0, k), sig)


def random_policy(rng, model, num_lam, recall):
  """A solved policy whose thresholds are then scrambled into arbitrary tables."""
  policy = jexit.solve(model, np.geomspace(1e-3, 1.0, num_lam), recall=recall)
  loss = np.asarray(policy.loss)
  choices = np.concatenate([np.unique(loss), [np.inf, -np.inf]]).astype(loss.dtype)
  thr = rng.choice(choices, size=np.asarray(policy.threshold).shape).astype(loss.dtype)
  return policy._replace(threshold=thr)


def loop_replay(policy, traces, edges, signal):
  """The deployed rule, one input and one step at a time (the reference)."""
  thr_all = np.asarray(policy.threshold)
  loss = np.asarray(policy.loss)
  n, k = traces.conf.shape
  values = 1.0 - traces.conf if signal == "1-conf" else traces.signal
  stop = np.zeros((len(thr_all), n), int)
  out = np.zeros((len(thr_all), n), int)
  paid = np.zeros((len(thr_all), n))
  for p, thr in enumerate(thr_all):
    for i in range(n):
      best, best_k = None, None
      for r in range(k):
        b = int(sum(e <= values[i, r] for e in edges[r, 1:-1]))
        cur = loss[r, b]
        if policy.recall:
          if best is None or cur <= best:
            best, best_k = cur, r
          x = best
        else:
          x, best_k = cur, r
        if r == k - 1 or x <= thr[r, b]:
          stop[p, i], out[p, i] = r, best_k
          paid[p, i] = best if policy.recall else cur
          break
  return stop, out, paid


@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("signal", [False, True])
def test_replay_equals_loop(recall, signal):
  rng = np.random.default_rng(1 if recall else 2)
  traces = random_traces(rng, n=150, k=4, signal=signal)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=5)
  policy = random_policy(rng, model, 6, recall)
  ev = evaluate(policy, traces, binning, return_per_input=True)
  stop, out, paid = loop_replay(policy, traces, binning.edges, binning.signal)
  np.testing.assert_array_equal(ev.stop_ramp, stop)
  np.testing.assert_array_equal(ev.output_ramp, out)
  if not recall:
    np.testing.assert_array_equal(stop, out)
  pred_out = np.take_along_axis(traces.pred, out.T, axis=1).T
  np.testing.assert_allclose(ev.agreement, (pred_out == traces.pred[:, -1]).mean(1))
  np.testing.assert_allclose(ev.accuracy, (pred_out == traces.label).mean(1))
  ramp_cost = np.cumsum(traces.cost)
  per_input = ramp_cost[stop]
  np.testing.assert_allclose(ev.mean_cost, per_input.mean(1))
  np.testing.assert_allclose(ev.speedup, traces.cost.sum() / per_input.mean(1))
  for q, field in zip((0.5, 0.95, 0.99), ("p50_cost", "p95_cost", "p99_cost")):
    np.testing.assert_allclose(getattr(ev, field),
                               np.quantile(per_input, q, axis=1, method="inverted_cdf"))
  for r in range(traces.num_ramps):
    np.testing.assert_allclose(ev.stop_hist[:, r], (stop == r).mean(1))
    np.testing.assert_allclose(ev.output_hist[:, r], (out == r).mean(1))
  lam = np.asarray(policy.lam, np.float64)
  np.testing.assert_allclose(ev.objective, paid.mean(1) + lam * per_input.mean(1),
                             rtol=1e-5)
  np.testing.assert_allclose(ev.param, lam)


def test_no_labels_gives_no_accuracy():
  rng = np.random.default_rng(3)
  traces = random_traces(rng, labels=False)
  model, binning = jexit.fit(traces)
  ev = evaluate(jexit.solve(model, [0.01, 0.1]), traces, binning)
  assert ev.accuracy is None
  assert np.all(np.isfinite(ev.agreement))


def test_chunking_and_model_batch_match_single_calls():
  rng = np.random.default_rng(4)
  traces = random_traces(rng, n=200, k=3)
  models, binnings = zip(*[jexit.fit(traces, rows=np.arange(i, 200, 2), bins="quantile",
                                      num_bins=6) for i in range(2)])
  batch = jexit.ExitModel(*[np.stack(f) for f in zip(*models)])
  lams = np.geomspace(1e-3, 1, 37)
  policy = jexit.solve(batch, lams)
  ev = evaluate(policy, traces, list(binnings), return_per_input=True)
  tiny = evaluate(policy, traces, list(binnings), return_per_input=True, max_bytes=1)
  assert ev.agreement.shape == (2, 37) and ev.stop_ramp.shape == (2, 37, 200)
  for f in ("agreement", "mean_cost", "stop_hist", "stop_ramp", "output_ramp"):
    np.testing.assert_array_equal(getattr(ev, f), getattr(tiny, f))
  np.testing.assert_allclose(ev.objective, tiny.objective, rtol=1e-6)  # float32 sums
  for m in range(2):
    single = evaluate(jexit.solve(models[m], lams), traces, binnings[m])
    np.testing.assert_allclose(ev.agreement[m], single.agreement)
    np.testing.assert_allclose(ev.objective[m], single.objective, rtol=1e-6)


@pytest.mark.parametrize("recall", [True, False])
def test_expected_objective_equals_solver_value(recall):
  rng = np.random.default_rng(5)
  traces = random_traces(rng, n=400, k=4)
  model, _ = jexit.fit(traces, bins="quantile", num_bins=7, loss="calibrated")
  policy = jexit.solve(model, np.geomspace(1e-4, 2.0, 25), recall=recall)
  np.testing.assert_allclose(expected_objective(policy, model), policy.value,
                             rtol=2e-5, atol=1e-6)
  obj, loss, cost, stop = expected_objective(policy, model, return_parts=True)
  np.testing.assert_allclose(obj, loss + np.asarray(policy.lam) * cost, rtol=1e-5)
  np.testing.assert_allclose(stop.sum(-1), 1.0, rtol=1e-5)


def test_expected_objective_batched_and_conditioned():
  rng = np.random.default_rng(6)
  s, k = 4, 3
  loss = np.sort(rng.uniform(size=(k, s)), axis=1)
  x = len(np.unique(loss.astype(np.float32)))
  # A state-conditioned trans that ignores x is the Markov model: same value.
  markov = rng.dirichlet(np.ones(s), size=(k - 1, s))
  model = jexit.ExitModel(np.full(s, 1 / s), np.repeat(markov[:, None], x, axis=1), loss,
                          np.ones(k))
  policy = jexit.solve(model, [0.01, 0.1, 0.5])
  np.testing.assert_allclose(expected_objective(policy, model), policy.value, rtol=2e-5)
  # With x-dependent transitions the stop sets need not be down-sets in x, so
  # the threshold table is a feasible policy that can only do worse.
  model = model._replace(trans=rng.dirichlet(np.ones(s), size=(k - 1, x, s)))
  policy = jexit.solve(model, [0.01, 0.1, 0.5])
  assert np.all(expected_objective(policy, model) >= np.asarray(policy.value) - 1e-6)
  models = [jexit.ExitModel(rng.dirichlet(np.ones(s)), rng.dirichlet(np.ones(s), (k - 1, s)),
                            np.sort(rng.uniform(size=(k, s)), axis=1), np.ones(k))
            for _ in range(3)]
  batch = jexit.ExitModel(*[np.stack(f) for f in zip(*models)])
  policy = jexit.solve(batch, [0.01, 0.1])
  np.testing.assert_allclose(expected_objective(policy, batch), policy.value, rtol=2e-5)


@pytest.mark.parametrize("recall", [True, False])
def test_expected_objective_of_any_table_by_enumeration(recall):
  """Any threshold table, against the sum over all S^K bin paths."""
  rng = np.random.default_rng(7)
  s, k = 3, 3
  model = jexit.ExitModel(rng.dirichlet(np.ones(s)), rng.dirichlet(np.ones(s), (k - 1, s)),
                          rng.uniform(size=(k, s)), rng.uniform(0.5, 1.5, k))
  policy = random_policy(rng, model, 5, recall)
  loss = np.asarray(policy.loss, np.float64)
  thr = np.asarray(policy.threshold)
  lam = np.asarray(policy.lam, np.float64)
  expect = np.zeros(len(lam))
  for path in itertools.product(range(s), repeat=k):
    prob = model.init[path[0]] * np.prod([model.trans[r, path[r], path[r + 1]]
                                          for r in range(k - 1)])
    for p in range(len(lam)):
      best = np.inf
      for r in range(k):
        cur = loss[r, path[r]]
        best = min(best, cur)
        x = best if recall else cur
        if r == k - 1 or x <= thr[p, r, path[r]]:
          expect[p] += prob * (x + lam[p] * model.cost[:r + 1].sum())
          break
  np.testing.assert_allclose(expected_objective(policy, model), expect, rtol=1e-5)


def test_monte_carlo_traces_from_the_model_approach_value():
  rng = np.random.default_rng(8)
  s, k, n = 5, 3, 40_000
  edges = jexit.uniform_edges(k, 1.0 / s)
  mid = (edges[0, :-1] + edges[0, 1:]) / 2
  model = jexit.ExitModel(rng.dirichlet(np.ones(s) * 2),
                          rng.dirichlet(np.ones(s), (k - 1, s)),
                          np.tile(mid, (k, 1)), np.array([1.0, 0.5, 0.5]))
  policy = jexit.solve(model, [0.02, 0.2])
  bins = np.empty((n, k), int)
  bins[:, 0] = rng.choice(s, n, p=model.init)
  for r in range(k - 1):
    u = rng.uniform(size=n)
    bins[:, r + 1] = (u[:, None] > np.cumsum(model.trans[r][bins[:, r]], axis=1)).sum(1)
  traces = jexit.Traces(1.0 - mid[bins], np.zeros((n, k), int), None, model.cost)
  ev = evaluate(policy, traces, jexit.Binning(edges))
  np.testing.assert_allclose(ev.objective, policy.value, atol=0.01)


def test_cost_quantiles_and_summarize():
  counts = np.array([[95, 4, 1], [0, 0, 100], [50, 0, 50]])
  q = cost_quantiles(counts, np.array([1.0, 1.0, 2.0]))
  np.testing.assert_allclose(q, [[1, 1, 2], [4, 4, 4], [1, 4, 4]])
  rng = np.random.default_rng(9)
  traces = random_traces(rng, n=20)
  stop = rng.integers(0, 3, (4, 20))
  ev = summarize(stop, stop, traces, param=np.arange(4))
  assert isinstance(ev, Evaluation) and ev.stop_hist.shape == (4, 3)
  with pytest.raises(ValueError, match="output_ramp <= stop_ramp"):
    summarize(stop, stop + 1, traces, param=np.arange(4))


def test_errors_name_the_field():
  rng = np.random.default_rng(10)
  traces = random_traces(rng, k=3)
  model, binning = jexit.fit(traces)
  policy = jexit.solve(model, [0.1])
  other = random_traces(rng, k=4)
  with pytest.raises(ValueError, match="policy.threshold: expected K=4"):
    evaluate(policy, other, binning)
  with pytest.raises(ValueError, match="binning.edges"):
    evaluate(policy, traces, jexit.Binning(binning.edges[:, :5]))
  with pytest.raises(ValueError, match="binning.signal"):
    evaluate(policy, traces, binning._replace(signal="signal"))
  with pytest.raises(ValueError, match="policy.loss"):
    expected_objective(policy, model._replace(loss=model.loss + 0.5))
  with pytest.raises(ValueError, match="policy: expected jexit.Policy"):
    evaluate("nope", traces, binning)
  # NaN or unsorted edges would bin inputs somewhere, silently.
  for edges in (binning.edges * np.nan, binning.edges[:, ::-1]):
    with pytest.raises(ValueError, match="binning.edges: expected finite, strictly increasing"):
      evaluate(policy, traces, binning._replace(edges=edges))
  with pytest.raises(ValueError, match="binning.edges: expected real numbers"):
    evaluate(policy, traces, binning._replace(edges=binning.edges.astype(str)))
  for field in ("threshold", "loss", "lam"):
    text = np.asarray(getattr(policy, field)).astype(str)
    with pytest.raises(ValueError, match=f"policy.{field}: expected real numbers"):
      evaluate(policy._replace(**{field: text}), traces, binning)
  for lam in (np.nan, -1.0):  # a NaN lam made every objective NaN, silently
    with pytest.raises(ValueError, match="policy.lam: expected finite values >= 0"):
      evaluate(policy._replace(lam=np.full_like(np.asarray(policy.lam), lam)), traces, binning)


def test_new_lam_grid_and_other_mode_reuse_the_compile():
  from jexit import evaluation as ev_mod
  rng = np.random.default_rng(11)
  traces = random_traces(rng, n=100)
  model, binning = jexit.fit(traces)
  evaluate(jexit.solve(model, np.geomspace(1e-3, 1, 16)), traces, binning)
  size = ev_mod._replay_batch._cache_size()
  evaluate(jexit.solve(model, np.geomspace(1e-2, 3, 16)), traces, binning)
  evaluate(jexit.solve(model, np.geomspace(1e-2, 3, 16), recall=False), traces, binning)
  assert ev_mod._replay_batch._cache_size() == size


def monotone_policy(rng, model, num_lam, recall):
  """A policy with random thresholds, nondecreasing in lam, and lam out of order."""
  policy = random_policy(rng, model, num_lam, recall)
  thr = np.sort(np.asarray(policy.threshold), axis=0)  # nondecreasing along L
  lam = np.sort(np.asarray(policy.lam))
  perm = rng.permutation(num_lam)
  return policy._replace(threshold=thr[perm], lam=lam[perm])


@pytest.mark.parametrize("recall", [True, False])
def test_sweep_equals_loop_and_replay(recall):
  """The interval sweep (monotone thresholds) gives the loop's decisions' counts."""
  rng = np.random.default_rng(21 if recall else 22)
  traces = random_traces(rng, n=160, k=4)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=5)
  policy = monotone_policy(rng, model, 9, recall)
  sweep = evaluate(policy, traces, binning, method="sweep")
  auto = evaluate(policy, traces, binning)
  replay = evaluate(policy, traces, binning, method="replay")
  stop, out, paid = loop_replay(policy, traces, binning.edges, binning.signal)
  pred_out = np.take_along_axis(traces.pred, out.T, axis=1).T
  np.testing.assert_array_equal(sweep.agreement * 160, (pred_out == traces.pred[:, -1]).sum(1))
  np.testing.assert_array_equal(sweep.accuracy * 160, (pred_out == traces.label).sum(1))
  for r in range(traces.num_ramps):
    np.testing.assert_array_equal(sweep.stop_hist[:, r] * 160, (stop == r).sum(1))
    np.testing.assert_array_equal(sweep.output_hist[:, r] * 160, (out == r).sum(1))
  lam = np.asarray(policy.lam, np.float64)
  per_input = np.cumsum(traces.cost)[stop]
  np.testing.assert_allclose(sweep.objective, paid.mean(1) + lam * per_input.mean(1),
                             rtol=1e-6)
  for f in ("param", "agreement", "accuracy", "mean_cost", "stop_hist", "output_hist",
            "p50_cost", "p95_cost", "p99_cost"):
    np.testing.assert_array_equal(getattr(sweep, f), getattr(replay, f))
    np.testing.assert_array_equal(getattr(auto, f), getattr(sweep, f))


def test_sweep_model_batch_and_solver_grids():
  """A model batch, and `solve`'s own lam grids (monotone), go through the sweep."""
  rng = np.random.default_rng(23)
  traces = random_traces(rng, n=300, k=3)
  models, binnings = zip(*[jexit.fit(traces, rows=np.arange(i, 300, 2), bins="quantile",
                                      num_bins=7) for i in range(2)])
  batch = jexit.ExitModel(*[np.stack(f) for f in zip(*models)])
  for recall in (True, False):
    policy = jexit.solve(batch, np.geomspace(1e-4, 3, 50)[::-1], recall=recall)
    sweep = evaluate(policy, traces, list(binnings), method="sweep")
    replay = evaluate(policy, traces, list(binnings), method="replay")
    assert sweep.agreement.shape == (2, 50)
    for f in ("agreement", "mean_cost", "stop_hist", "output_hist", "p99_cost"):
      np.testing.assert_array_equal(getattr(sweep, f), getattr(replay, f))
    np.testing.assert_allclose(sweep.objective, replay.objective, rtol=1e-6)


def test_sweep_needs_monotone_thresholds():
  rng = np.random.default_rng(24)
  traces = random_traces(rng, n=100, k=3)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=4)
  policy = random_policy(rng, model, 8, True)
  thr = np.asarray(policy.threshold).copy()
  thr[:, 0, :] = np.asarray(policy.loss)[0]   # a column that ...
  thr[3, 0, 0] = -np.inf                      # ... drops at one lam: not monotone
  policy = policy._replace(threshold=thr, lam=np.arange(1.0, 9.0))
  with pytest.raises(ValueError, match="method: 'sweep' needs thresholds nondecreasing"):
    evaluate(policy, traces, binning, method="sweep")
  auto = evaluate(policy, traces, binning)  # falls back to the replay
  replay = evaluate(policy, traces, binning, method="replay")
  np.testing.assert_array_equal(auto.stop_hist, replay.stop_hist)
  with pytest.raises(ValueError, match="method: expected 'auto', 'replay' or 'sweep'"):
    evaluate(policy, traces, binning, method="fast")


def test_auto_uses_the_sweep_for_solver_grids(monkeypatch):
  """`solve`'s lam grids are monotone, so `evaluate` never needs the replay for them."""
  from jexit import evaluation
  rng = np.random.default_rng(25)
  traces = random_traces(rng, n=400, k=4)
  def no_replay(*args, **kwargs):
    raise AssertionError("the replay ran")
  monkeypatch.setattr(evaluation, "_replay_chunks", no_replay)
  for num_bins in (4, 16):
    model, binning = jexit.fit(traces, num_bins=num_bins)
    for recall in (True, False):
      ev = evaluate(jexit.solve(model, np.geomspace(1e-5, 10, 300), recall=recall), traces,
                    binning)
      assert ev.agreement.shape == (300,)
