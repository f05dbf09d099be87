"""The research options of `jexit.contrib`: measured not to help, kept correct."""

import numpy as np
import pytest

import jexit
from jexit import contrib
from jexit.solver import working_dtype
from test_fit import _good


def test_marginal_prior_shrinks_rows_towards_next_bin_law():
  rng = np.random.default_rng(9)
  conf = np.column_stack([rng.uniform(size=500), rng.beta(8, 1, size=500)])
  traces = jexit.Traces(conf, np.zeros((500, 2), int), None, np.ones(2))
  heavy, binning = contrib.fit(traces, bins="uniform", prior="marginal", smoothing=1e4)
  np.testing.assert_allclose(heavy.trans.sum(-1), 1.0)
  marginal = np.bincount(binning.assign(traces.exit_signal())[:, 1], minlength=13) + 1 / 13
  np.testing.assert_allclose(heavy.trans[0], np.tile(marginal / marginal.sum(), (13, 1)),
                             atol=2e-3)
  uniform, _ = contrib.fit(traces, bins="uniform", prior="uniform", smoothing=1e4)
  np.testing.assert_allclose(uniform.trans[0], 1 / 13, atol=2e-3)
  with pytest.raises(ValueError, match="prior"):
    contrib.fit(traces, prior="nope")


def test_kernel_smoothing_keeps_rows_stochastic_and_spreads_mass():
  rng = np.random.default_rng(11)
  conf = rng.uniform(size=(300, 3))
  conf[:, 1] = conf[:, 0]  # ramp 2 repeats ramp 1: diagonal transitions
  traces = jexit.Traces(conf, np.zeros((300, 3), int), None, np.ones(3))
  sharp, _ = contrib.fit(traces, bins="uniform", smoothing=0.0)
  blurred, _ = contrib.fit(traces, bins="uniform", smoothing=0.0, kernel=1.0)
  np.testing.assert_allclose(blurred.trans.sum(-1), 1.0)
  assert np.allclose(np.diag(sharp.trans[0])[1:-1], 1.0)
  assert np.all(np.diag(blurred.trans[0]) < 0.8)
  with pytest.raises(ValueError, match="kernel"):
    contrib.fit(traces, kernel=-1.0)


def _history_traces(n=3000, k=4, seed=12):
  """Traces with a persistent per-input difficulty: the best loss so far says
  more about the next bin than the current bin alone (not Markov)."""
  rng = np.random.default_rng(seed)
  hard = rng.normal(size=n)
  z = 1.0 + np.linspace(0, 2, k) - 1.5 * hard[:, None] + rng.normal(0, 1.0, (n, k))
  conf = 1 / (1 + np.exp(-z))
  final = rng.integers(0, 5, n)
  pred = np.where(rng.uniform(size=(n, k)) < conf, final[:, None], (final[:, None] + 1) % 5)
  pred[:, -1] = final
  return jexit.Traces(conf, pred, None, np.array([1.0, 1.0, 2.0, 1.0][:k]))


def _recall_grid(loss):
  """The solver's grid of recall states: distinct losses in the working dtype."""
  cast = np.asarray(loss).astype(working_dtype())
  return np.unique(cast), np.searchsorted(np.unique(cast), cast)


def test_history_fits_a_state_conditioned_model_on_the_solver_grid():
  traces = _history_traces()
  markov, binning = contrib.fit(traces, num_bins=8)
  model, binning2 = contrib.fit(traces, num_bins=8, history=8.0)
  grid, _ = _recall_grid(model.loss)
  assert model.trans.shape == (3, len(grid), 8, 8)
  np.testing.assert_allclose(model.trans.sum(-1), 1.0)
  assert np.all(model.trans >= 0)
  # Only the transitions change: same bins, init, loss and cost.
  np.testing.assert_array_equal(binning.edges, binning2.edges)
  for f in ("init", "loss", "cost"):
    np.testing.assert_array_equal(getattr(model, f), getattr(markov, f))
  policy = jexit.solve(model, np.geomspace(1e-3, 1, 5))
  assert policy.threshold.shape == (5, 4, 8)
  with pytest.raises(ValueError, match="recall"):
    jexit.solve(model, np.array([0.1]), recall=False)


def test_history_grid_merges_losses_equal_in_float32():
  # Ramp 1's bins and ramp 2's bins have losses 1e-12 apart: distinct in
  # float64, one value in float32, where the solver's grid has one x for both.
  edges = np.array([0.0, 0.25, 0.5, 1.0])
  v = np.array([[0.1, 0.1 + 1e-12, 0.2], [0.3, 0.3 + 1e-12, 0.7], [0.7, 0.3, 0.1]] * 20)
  traces = jexit.Traces(1 - v, np.zeros(v.shape, int), None, np.ones(3))
  model, _ = contrib.fit(traces, bins=edges, loss="proxy", history=1.0)
  assert working_dtype() == np.float32
  x32 = len(np.unique(model.loss.astype(np.float32)))
  assert x32 < len(np.unique(model.loss))
  assert model.trans.shape[1] == x32
  policy = jexit.solve(model, np.array([0.01, 0.1]))
  np.testing.assert_allclose(jexit.expected_objective(policy, model), policy.value,
                             rtol=1e-5)


def test_history_to_infinity_is_the_markov_model():
  traces = _history_traces()
  markov, _ = contrib.fit(traces, num_bins=8)
  model, _ = contrib.fit(traces, num_bins=8, history=1e12)
  np.testing.assert_allclose(model.trans, np.broadcast_to(markov.trans[:, None], model.trans.shape),
                             atol=1e-9)
  lam = np.geomspace(1e-4, 1, 30)
  a, b = jexit.solve(markov, lam), jexit.solve(model, lam)
  np.testing.assert_allclose(b.value, a.value, rtol=1e-5)
  np.testing.assert_array_equal(b.threshold, a.threshold)


def test_history_zero_is_the_empirical_conditional_frequency():
  traces = _history_traces(n=4000, k=3)
  model, binning = contrib.fit(traces, num_bins=4, history=0.0)
  markov, _ = contrib.fit(traces, num_bins=4)
  grid, idx = _recall_grid(model.loss)
  b = binning.assign(traces.exit_signal())
  seen = 0
  for r in range(2):
    x = idx[np.arange(r + 1)[None, :], b[:, :r + 1]].min(axis=1)
    for xi in range(len(grid)):
      for a in range(4):
        here = (x == xi) & (b[:, r] == a)
        if here.sum() == 0:  # no data: the Markov row
          np.testing.assert_allclose(model.trans[r, xi, a], markov.trans[r, a])
          continue
        seen += 1
        freq = np.bincount(b[here, r + 1], minlength=4) / here.sum()
        np.testing.assert_allclose(model.trans[r, xi, a], freq)
  assert seen >= 8
  # The history matters in these traces: some rows differ from the Markov ones.
  assert np.abs(model.trans - markov.trans[:, None]).max() > 0.1


def test_history_value_agrees_with_expected_objective():
  traces = _history_traces()
  model, _ = contrib.fit(traces, num_bins=8, history=8.0)
  lam = np.geomspace(1e-4, 1, 40)
  policy = jexit.solve(model, lam, return_stop=True)
  objective = jexit.expected_objective(policy, model)
  # The threshold table keeps the stop prefix in x; it is the optimal table
  # wherever the stop sets are down-sets, and never better than optimal.
  stop = np.asarray(policy.stop)  # [L, K, X, S]
  down = ~np.any(stop[:, :, 1:] & ~stop[:, :, :-1], axis=(1, 2, 3))
  assert down.sum() >= 30
  np.testing.assert_allclose(objective[down], policy.value[down], rtol=1e-5, atol=1e-7)
  assert np.all(objective >= policy.value - 1e-6)


def test_history_model_is_the_path_law_when_the_state_keeps_the_past():
  # Ramp 1's losses are all below ramp 2's, so after ramp 2 the recall state x
  # is ramp 1's bin: (x, bin) is the whole past and the alpha = 0 model is the
  # fit rows' path law. Any threshold policy's expected objective under the
  # model is then its mean objective replayed on the rows; under the Markov
  # model it is not (ramp 3 depends on ramp 1 given ramp 2).
  rng = np.random.default_rng(13)
  n = 5000
  v1 = rng.uniform(0, 0.3, n)
  v2 = rng.uniform(0.5, 1.0, n)
  v3 = np.clip(v1 * 3 + rng.normal(0, 0.05, n), 0, 1)
  traces = jexit.Traces(1 - np.column_stack([v1, v2, v3]), np.zeros((n, 3), int), None,
                        np.array([1.0, 1.0, 1.0]))
  lam = np.geomspace(1e-3, 0.3, 12)
  got = {}
  for name, history in (("conditioned", 0.0), ("markov", None)):
    model, binning = contrib.fit(traces, num_bins=4, loss="proxy", smoothing=0.0,
                               history=history)
    grid, idx = _recall_grid(model.loss)
    b = binning.assign(traces.exit_signal())
    policy = jexit.solve(model, lam)
    thr = np.asarray(policy.threshold)
    # Replay the threshold tables on the rows' bins.
    replay = np.empty(len(lam))
    for li in range(len(lam)):
      x = np.full(n, len(grid))
      done = np.zeros(n, bool)
      total = np.zeros(n)
      for r in range(3):
        x = np.where(done, x, np.minimum(x, idx[r, b[:, r]]))
        total += np.where(done, 0.0, lam[li] * traces.cost[r])
        stop = ~done & (grid[np.minimum(x, len(grid) - 1)] <= thr[li, r, b[:, r]])
        total += np.where(stop, grid[np.minimum(x, len(grid) - 1)], 0.0)
        done |= stop
      assert done.all()
      replay[li] = total.mean()
    got[name] = (jexit.expected_objective(policy, model), replay)
  model_value, replay = got["conditioned"]
  np.testing.assert_allclose(model_value, replay, rtol=1e-5)
  model_value, replay = got["markov"]
  assert np.abs(model_value - replay).max() > 1e-3


@pytest.mark.parametrize("history", [-1.0, np.nan, np.inf, "8", True])
def test_history_argument_errors(history):
  with pytest.raises(ValueError, match="history: expected None or a finite"):
    contrib.fit(jexit.Traces(**_good()), history=history)


def _probit_family(z, beta, delta, cuts):
  """`[S, S]` rows of fit(trans_model="parametric")'s family, written with scipy."""
  from scipy.stats import norm  # pylint: disable=import-outside-toplevel
  c = np.concatenate([[-np.inf], cuts, [np.inf]])
  return np.diff(norm.cdf((c[None, :] - beta * z[:, None]) / np.exp(delta * z)[:, None]), axis=1)


def _probit_chain(rng, n, init, truth):
  """Bins `[N, K]` drawn from the family ramp by ramp, and the true `trans`.

  The source axis is the one fit() builds: Phi^{-1} of each bin's mid
  quantile among the rows at that ramp, half a pseudo-count per bin.
  """
  from scipy.stats import norm  # pylint: disable=import-outside-toplevel
  s = len(init)
  b = [rng.choice(s, size=n, p=init)]
  trans = []
  for beta, delta, cuts in truth:
    w = np.bincount(b[-1], minlength=s) + 0.5
    upper = np.cumsum(w) / w.sum()
    z = norm.ppf(upper - w / w.sum() / 2)
    trans.append(_probit_family(z, beta, delta, cuts))
    cum = np.cumsum(trans[-1][b[-1]], axis=1)
    b.append(np.minimum((rng.uniform(size=n)[:, None] > cum).sum(1), s - 1))
  return np.stack(b, axis=1), np.stack(trans)


_PROBIT_TRUTH = ((0.8, 0.25, np.linspace(-1.8, 1.5, 11)),
                 (1.3, -0.2, np.array([-2.2, -1.4, -1.0, -0.5, -0.3, 0.1, 0.4, 0.6, 1.1, 1.5, 2.4])))


def _probit_traces(n, seed=0):
  rng = np.random.default_rng(seed)
  init = rng.dirichlet(np.ones(12) * 3)
  b, trans = _probit_chain(rng, n, init, _PROBIT_TRUTH)
  edges = np.linspace(0, 1, 13)
  centres = (edges[:-1] + edges[1:]) / 2
  traces = jexit.Traces(1 - centres[b], np.zeros(b.shape, int), None, np.ones(3))
  return traces, edges, b, trans


def test_parametric_trans_rows_are_laws_and_only_trans_changes():
  traces = _history_traces()
  counts, binning = contrib.fit(traces, num_bins=8)
  for strength in (None, 16.0):
    model, binning2 = contrib.fit(traces, num_bins=8, trans_model="parametric",
                                trans_strength=strength)
    assert model.trans.shape == (3, 8, 8)
    np.testing.assert_allclose(model.trans.sum(-1), 1.0, atol=1e-12)
    assert np.all(model.trans > 0)
    np.testing.assert_array_equal(binning.edges, binning2.edges)
    for f in ("init", "loss", "cost"):
      np.testing.assert_array_equal(getattr(model, f), getattr(counts, f))
  # The parametric rows are the Markov rows that history= shrinks towards.
  conditioned, _ = contrib.fit(traces, num_bins=8, trans_model="parametric", history=1e12)
  pure, _ = contrib.fit(traces, num_bins=8, trans_model="parametric")
  np.testing.assert_allclose(conditioned.trans, np.broadcast_to(pure.trans[:, None],
                                                                conditioned.trans.shape),
                             atol=1e-9)


def test_parametric_trans_recovers_the_family_it_was_simulated_from():
  traces, edges, _, truth = _probit_traces(200_000)
  model, _ = contrib.fit(traces, bins=edges, loss="proxy", trans_model="parametric")
  np.testing.assert_allclose(model.trans, truth, atol=0.005)
  counts, _ = contrib.fit(traces, bins=edges, loss="proxy")
  assert np.abs(model.trans - truth).mean() < 0.5 * np.abs(counts.trans - truth).mean()


def test_parametric_trans_recovers_the_parameters():
  from jexit.contrib.variants import _parametric_trans  # pylint: disable=import-outside-toplevel
  from scipy.stats import norm  # pylint: disable=import-outside-toplevel
  _, _, b, truth = _probit_traces(200_000)
  trans, params = _parametric_trans(b, 12)
  np.testing.assert_allclose(trans, truth, atol=0.005)
  for r in range(2):  # the documented axis: Phi^{-1} of the mid quantiles, +0.5 per bin
    w = np.bincount(b[:, r], minlength=12) + 0.5
    np.testing.assert_allclose(params["z"][r], norm.ppf((np.cumsum(w) - w / 2) / w.sum()),
                               rtol=1e-9)
  np.testing.assert_allclose(params["beta"], [t[0] for t in _PROBIT_TRUTH], atol=0.03)
  np.testing.assert_allclose(params["delta"], [t[1] for t in _PROBIT_TRUTH], atol=0.03)
  np.testing.assert_allclose(params["cuts"], np.stack([t[2] for t in _PROBIT_TRUTH]), atol=0.03)


def test_parametric_trans_beats_counts_on_few_rows_from_the_family():
  traces, edges, _, truth = _probit_traces(2000, seed=1)
  model, _ = contrib.fit(traces, bins=edges, loss="proxy", trans_model="parametric")
  counts, _ = contrib.fit(traces, bins=edges, loss="proxy")
  assert np.abs(model.trans - truth).mean() < 0.5 * np.abs(counts.trans - truth).mean()


@pytest.mark.parametrize("prior", ["uniform", "marginal"])
def test_parametric_strength_mixes_pseudo_rows_into_the_counts(prior):
  traces = _history_traces(n=1500)
  kw = dict(num_bins=8, smoothing=0.5, prior=prior)
  counts, _ = contrib.fit(traces, **kw)
  pure, _ = contrib.fit(traces, trans_model="parametric", **kw)
  zero, _ = contrib.fit(traces, trans_model="parametric", trans_strength=0.0, **kw)
  huge, _ = contrib.fit(traces, trans_model="parametric", trans_strength=1e12, **kw)
  np.testing.assert_array_equal(zero.trans, counts.trans)
  np.testing.assert_allclose(huge.trans, pure.trans, atol=1e-9)
  inf, _ = contrib.fit(traces, trans_model="parametric", trans_strength=np.inf, **kw)
  np.testing.assert_array_equal(inf.trans, pure.trans)
  # In between: the smoothed counts c plus `strength` rows of the parametric law.
  _, binning = contrib.fit(traces, **kw)
  b = binning.assign(traces.exit_signal())
  strength = 20.0
  mixed, _ = contrib.fit(traces, trans_model="parametric", trans_strength=strength, **kw)
  for r in range(3):
    n = np.zeros((8, 8))
    np.add.at(n, (b[:, r], b[:, r + 1]), 1.0)
    rows = n.sum(1, keepdims=True) + 8 * 0.5  # either prior adds S * smoothing per row
    c = counts.trans[r] * rows
    np.testing.assert_allclose(mixed.trans[r], (c + strength * pure.trans[r]) / (rows + strength),
                               rtol=1e-10)
  assert np.abs(pure.trans - counts.trans).max() > 1e-3  # the mixture is not trivial


@pytest.mark.parametrize("kwargs, match", [
    (dict(trans_model="probit"), "trans_model: expected 'counts' or 'parametric'"),
    (dict(trans_strength=4.0), "trans_strength: expected None with trans_model='counts'"),
    (dict(trans_model="parametric", trans_strength=-1.0), "trans_strength: expected None or"),
    (dict(trans_model="parametric", trans_strength=np.nan), "trans_strength: expected None or"),
    (dict(trans_model="parametric", trans_strength="8"), "trans_strength: expected None or"),
    (dict(trans_model="parametric", trans_strength=True), "trans_strength: expected None or"),
])
def test_parametric_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    contrib.fit(jexit.Traces(**_good()), **kwargs)


def test_quantile_power_one_gives_the_equal_count_edges():
  rng = np.random.default_rng(11)
  traces = jexit.Traces(rng.beta(5, 1, size=(500, 3)), rng.integers(0, 3, (500, 3)), None,
                        np.ones(3))
  rows = np.arange(300)
  values = traces.take(rows).exit_signal()
  inner = [np.quantile(values[:, r], np.linspace(0, 1, 17)[1:-1]) for r in range(3)]
  expected = np.stack([np.concatenate([[0.0], q, [1.0]]) for q in inner])
  for power in (1.0, 1, np.float32(1.0)):
    model, binning = contrib.fit(traces, rows=rows, num_bins=16, quantile_power=power)
    np.testing.assert_array_equal(binning.edges, expected)
    default, _ = contrib.fit(traces, rows=rows, num_bins=16)
    np.testing.assert_array_equal(model.trans, default.trans)
    np.testing.assert_array_equal(jexit.quantile_edges(values, 16, 0.0, 1.0, power=power),
                                  jexit.quantile_edges(values, 16, 0.0, 1.0))


@pytest.mark.parametrize("power", [0.5, 2.0, 3.0])
def test_quantile_power_puts_the_expected_share_of_fit_rows_below_each_edge(power):
  rng = np.random.default_rng(12)
  n, s = 5000, 16
  traces = jexit.Traces(rng.beta(5, 1, size=(n, 3)), rng.integers(0, 3, (n, 3)), None,
                        np.ones(3))
  rows = np.arange(0, n, 2)
  _, binning = contrib.fit(traces, rows=rows, num_bins=s, quantile_power=power)
  values = traces.take(rows).exit_signal()
  below = (values[:, None, :] < binning.edges.T[None, 1:-1, :]).mean(0)  # [S-1, K]
  levels = (np.arange(1, s) / s) ** power
  np.testing.assert_allclose(below, np.tile(levels[:, None], (1, 3)), atol=1.5 / len(rows))
  # p > 1: the first bin holds (1/S)**p of the rows instead of 1/S (finer at the confident end).
  counts = np.bincount(binning.assign(values)[:, 0], minlength=s) / len(rows)
  assert abs(counts[0] - (1 / s) ** power) < 2 / len(rows)
  assert binning.num_bins == s and np.all(np.diff(binning.edges, axis=1) > 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantile_power=0.0), "quantile_power: expected a finite number > 0"),
    (dict(quantile_power=-2.0), "quantile_power: expected a finite number > 0"),
    (dict(quantile_power=np.nan), "quantile_power: expected a finite number > 0"),
    (dict(quantile_power=np.inf), "quantile_power: expected a finite number > 0"),
    (dict(quantile_power="2"), "quantile_power: expected a finite number > 0"),
    (dict(quantile_power=True), "quantile_power: expected a finite number > 0"),
    (dict(quantile_power=2.0, bins="uniform"), "quantile_power: expected 1 with bins other"),
    (dict(quantile_power=2.0, bins=np.linspace(0, 1, 5)),
     "quantile_power: expected 1 with bins other"),
])
def test_quantile_power_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    contrib.fit(jexit.Traces(**_good()), **kwargs)
  with pytest.raises(ValueError, match="quantile_power: expected a finite number > 0"):
    jexit.quantile_edges(np.zeros((4, 2)), 4, power=0.0)


def test_contrib_fit_with_nothing_set_is_the_core_fit():
  traces = jexit.Traces(**_good())
  for signal in ("1-conf", "stability"):
    core_model, core_binning = jexit.fit(traces, num_bins=4, signal=signal)
    model, binning = contrib.fit(traces, num_bins=4, signal=signal)
    for a, b in zip(core_model, model):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(core_binning.edges, binning.edges)


def test_research_options_are_not_core_arguments():
  traces = jexit.Traces(**_good())
  for option in ("history", "trans_model", "quantile_power", "prior", "kernel"):
    with pytest.raises(TypeError):
      jexit.fit(traces, **{option: None})
  with pytest.raises(ValueError, match="kernel"):
    contrib.fit(traces, kernel=None)
