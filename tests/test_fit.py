"""Fitting the Markov model, and bad input."""

import numpy as np
import pytest

import jexit


def _chain_traces(rng, n, init, trans, edges, *, cost=None):
  """Traces whose binned signal follows a known chain (values at bin centres)."""
  k = len(trans) + 1
  s = len(init)
  bins = np.empty((n, k), int)
  bins[:, 0] = rng.choice(s, size=n, p=init)
  for r in range(k - 1):
    cum = np.cumsum(trans[r][bins[:, r]], axis=1)
    bins[:, r + 1] = np.minimum((rng.uniform(size=n)[:, None] > cum).sum(1), s - 1)
  centres = (edges[:-1] + edges[1:]) / 2
  conf = 1.0 - centres[bins]
  pred = rng.integers(0, 3, size=(n, k))
  return jexit.Traces(conf=conf, pred=pred, label=rng.integers(0, 3, n),
                      cost=np.ones(k) if cost is None else cost)


def test_fit_recovers_a_known_chain():
  rng = np.random.default_rng(0)
  s, k = 4, 3
  edges = np.linspace(0, 1, s + 1)
  init = np.array([0.4, 0.3, 0.2, 0.1])
  trans = rng.dirichlet(np.ones(s) * 2, size=(k - 1, s))
  traces = _chain_traces(rng, 40_000, init, trans, edges)
  model, binning = jexit.fit(traces, bins=edges, loss="proxy", smoothing=0.0)
  np.testing.assert_allclose(binning.edges, np.tile(edges, (k, 1)))
  np.testing.assert_allclose(model.init, init, atol=0.01)
  np.testing.assert_allclose(model.trans, trans, atol=0.03)
  # Proxy loss: the bin's mean signal, here its centre.
  np.testing.assert_allclose(model.loss, np.tile((edges[:-1] + edges[1:]) / 2, (k, 1)))


def test_paper_uniform_bins():
  rng = np.random.default_rng(1)
  traces = jexit.Traces(rng.uniform(size=(50, 3)), rng.integers(0, 2, (50, 3)), None,
                        np.array([1.0, 2.0, 3.0]))
  model, binning = jexit.fit(traces, bins="uniform", loss="proxy")
  assert binning.num_bins == 13 and binning.signal == "1-conf"
  np.testing.assert_allclose(binning.edges[0, :3], [0, 0.08, 0.16])
  assert binning.edges[0, -1] == 1.0
  assert model.trans.shape == (2, 13, 13)
  np.testing.assert_allclose(model.trans.sum(-1), 1.0)
  np.testing.assert_allclose(model.cost, [1, 2, 3])


def test_empty_bins_are_smoothed_and_solvable():
  rng = np.random.default_rng(2)
  # Confidences all near 1: most of the 13 uniform bins see no data.
  conf = rng.uniform(0.95, 1.0, size=(30, 3))
  traces = jexit.Traces(conf, np.zeros((30, 3), int), None, np.ones(3))
  model, _ = jexit.fit(traces, bins="uniform", loss="proxy")
  assert np.all(model.trans > 0)
  np.testing.assert_allclose(model.trans.sum(-1), 1.0)
  # An empty bin's proxy loss is its midpoint.
  assert model.loss[0, 5] == pytest.approx((0.4 + 0.48) / 2)
  policy = jexit.solve(model, np.geomspace(1e-3, 1, 5))
  assert np.all(np.isfinite(policy.value))


def test_quantile_bins_and_fit_rows():
  rng = np.random.default_rng(3)
  traces = jexit.Traces(rng.beta(5, 1, size=(400, 4)), rng.integers(0, 3, (400, 4)), None,
                        np.ones(4))
  rows = np.arange(200)
  model, binning = jexit.fit(traces, rows=rows, bins="quantile", num_bins=8)
  assert binning.edges.shape == (4, 9)
  counts = np.stack([np.bincount(b, minlength=8)
                     for b in binning.assign(traces.take(rows).exit_signal()).T])
  assert counts.min() >= 20 and counts.max() <= 30  # about 200 / 8 per bin
  # Fitting on rows equals fitting on the taken subset.
  other, _ = jexit.fit(traces.take(rows), bins="quantile", num_bins=8)
  np.testing.assert_allclose(model.trans, other.trans)


def test_calibrated_loss_is_monotone_rate_of_disagreement():
  rng = np.random.default_rng(4)
  n = 5000
  conf = rng.uniform(size=(n, 3))
  final = rng.integers(0, 5, n)
  pred = np.tile(final[:, None], (1, 3))
  # Ramp 0 disagrees with probability 1 - conf: the calibrated loss should be ~ 1 - conf.
  flip = rng.uniform(size=n) < 1 - conf[:, 0]
  pred[flip, 0] = (final[flip] + 1) % 5
  traces = jexit.Traces(conf, pred, final, np.ones(3))
  model, binning = jexit.fit(traces, bins="uniform", loss="calibrated")
  mid = (binning.edges[0, :-1] + binning.edges[0, 1:]) / 2
  np.testing.assert_allclose(model.loss[0], mid, atol=0.07)
  assert np.all(np.diff(model.loss, axis=1) >= -1e-12)
  assert np.all(model.loss[-1] == 0)  # the final ramp agrees with itself
  labelled, _ = jexit.fit(traces, bins="uniform", loss="calibrated", target="label")
  np.testing.assert_allclose(labelled.loss[0], mid, atol=0.07)


def test_one_and_two_ramp_traces():
  rng = np.random.default_rng(5)
  for k in (1, 2):
    traces = jexit.Traces(rng.uniform(size=(60, k)), rng.integers(0, 2, (60, k)), None,
                          np.ones(k))
    model, _ = jexit.fit(traces)
    assert model.trans.shape == (k - 1, 32, 32)
    policy = jexit.solve(model, np.array([0.1]))
    assert policy.threshold.shape == (1, k, 32)


def test_signal_field_is_binned_instead_of_conf():
  rng = np.random.default_rng(6)
  signal = rng.uniform(0, 3, size=(100, 3))  # e.g. entropy
  traces = jexit.Traces(rng.uniform(size=(100, 3)), rng.integers(0, 2, (100, 3)), None,
                        np.ones(3), signal=signal)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=5)
  assert binning.signal == "signal"
  assert binning.edges[0, 0] <= signal[:, 0].min() and binning.edges[0, -1] >= signal[:, 0].max()


# Bad input: each gives a ValueError naming the field.

def _good(n=10, k=3):
  rng = np.random.default_rng(7)
  return dict(conf=rng.uniform(size=(n, k)), pred=rng.integers(0, 3, (n, k)),
              label=rng.integers(0, 3, n), cost=np.ones(k))


@pytest.mark.parametrize("field,value,match", [
    ("conf", np.ones(10), "conf"),
    ("conf", np.full((10, 3), np.nan), "conf"),
    ("conf", np.full((10, 3), 1.5), "conf"),
    ("conf", -np.ones((10, 3)), "conf"),
    ("pred", np.zeros((10, 2), int), "pred"),
    ("pred", np.full((10, 3), 0.5), "pred"),
    ("label", np.zeros(9, int), "label"),
    ("cost", np.ones(2), "cost"),
    ("cost", np.array([1.0, -1.0, 1.0]), "cost"),
    ("cost", np.array([1.0, np.inf, 1.0]), "cost"),
    ("signal", np.ones((10, 2)), "signal"),
    ("signal", np.full((10, 3), np.nan), "signal"),
    # Complex values would be cast to real with only a warning.
    ("cost", np.ones(3) + 1j, "cost"),
    ("signal", np.ones((10, 3)) + 0j, "signal"),
    ("conf", [[0.5, 0.5, 0.5], [0.5]], "conf"),
])
def test_bad_traces_name_the_field(field, value, match):
  fields = _good()
  fields[field] = value
  with pytest.raises(ValueError, match=rf"traces\.{match}"):
    jexit.fit(jexit.Traces(**fields))


def _model(**over):
  s, k = 3, 3
  fields = dict(init=np.full(s, 1 / s), trans=np.full((k - 1, s, s), 1 / s),
                loss=np.zeros((k, s)), cost=np.ones(k))
  fields.update(over)
  return jexit.ExitModel(**fields)


@pytest.mark.parametrize("over,match", [
    (dict(init=np.full(4, 0.25)), "model.loss"),
    (dict(init=np.array([0.5, 0.5, 0.5])), "model.init"),
    (dict(trans=np.full((2, 3, 3), 0.5)), "model.trans"),
    (dict(trans=np.full((3, 3, 3), 1 / 3)), "model.trans"),
    (dict(loss=np.full((3, 3), np.nan)), "model.loss"),
    (dict(cost=np.array([1.0, -2.0, 1.0])), "model.cost"),
    (dict(cost=np.ones(4)), "model.cost"),
    # Text, complex and ragged fields: named, not a numpy cast error or a
    # silently dropped imaginary part.
    (dict(init=np.array(["a", "b", "c"])), "model.init"),
    (dict(cost=np.ones(3) + 1j), "model.cost"),
    (dict(loss=[[0.0, 0.0, 0.0], [0.0], [0.0]]), "model.loss"),
    (dict(init=np.full((0, 3), 1 / 3), trans=np.zeros((0, 2, 3, 3)), loss=np.zeros((0, 3, 3)),
          cost=np.ones((0, 3))), "model.init"),
])
def test_bad_models_name_the_field(over, match):
  with pytest.raises(ValueError, match=match):
    jexit.solve(_model(**over), np.array([0.1]))


@pytest.mark.parametrize("lam", [np.array([-0.1]), np.array([np.nan]), np.ones((2, 2)),
                                 np.array([]), np.array(["0.1"]), np.array([0.1 + 1j]),
                                 np.array([0.1, 1e300])])  # 1e300: inf in float32
def test_bad_lambdas(lam):
  with pytest.raises(ValueError, match="lambdas"):
    jexit.solve(_model(), lam)


def test_recall_must_be_a_bool():
  with pytest.raises(ValueError, match="recall: expected a bool"):
    jexit.solve(_model(), np.array([0.1]), recall="no")  # bool("no") is True
  assert jexit.solve(_model(), np.array([0.1]), recall=np.bool_(False)).recall is False


@pytest.mark.parametrize("rtol", [np.nan, -1.0, "1e-5"])
def test_bad_rtol(rtol):
  # A NaN tolerance would make every tie (and every stop) compare False.
  with pytest.raises(ValueError, match="rtol"):
    jexit.solve(_model(), np.array([0.1]), rtol=rtol)


def test_fit_argument_errors():
  traces = jexit.Traces(**_good())
  for kwargs, match in [(dict(bins="nope"), "bins"), (dict(loss="nope"), "loss"),
                        (dict(bins=np.array([0.0, 0.5, 0.4, 1.0])), "bins"),
                        (dict(rows=np.array([0, 99])), "rows"),
                        (dict(smoothing=-1.0), "smoothing"),
                        # Wrong types and sizes: a named error, not a TypeError or
                        # an allocation of 1e12 bins.
                        (dict(smoothing="1"), "smoothing"),
                        (dict(num_bins=2.5), "num_bins"), (dict(num_bins=10**9), "num_bins"),
                        (dict(bins="uniform", step=1e-12), "step"),
                        (dict(bins=np.array([0.0, 0.5, 1.0]) + 0j), "bins"),
                        (dict(rows=np.zeros(10, bool)), "rows")]:
    with pytest.raises(ValueError, match=match):
      jexit.fit(traces, **kwargs)
  with pytest.raises(ValueError, match="values"):
    jexit.quantile_edges(np.ones(5), 4)
  no_label = traces._replace(label=None)
  with pytest.raises(ValueError, match="label"):
    jexit.fit(no_label, loss="calibrated", target="label")


def test_logistic_loss_recovers_a_smooth_error_rate():
  rng = np.random.default_rng(10)
  n = 20_000
  conf = 1 - 10 ** rng.uniform(-4, 0, size=(n, 2))
  v = 1 - conf[:, 0]
  rate = 1 / (1 + np.exp(-(1.0 + 0.8 * np.log(v))))  # logistic in log(1 - conf)
  final = rng.integers(0, 4, n)
  pred = np.tile(final[:, None], (1, 2))
  flip = rng.uniform(size=n) < rate
  pred[flip, 0] = (final[flip] + 1) % 4
  traces = jexit.Traces(conf, pred, None, np.ones(2))
  model, binning = jexit.fit(traces, bins="quantile", num_bins=16, loss="logistic")
  b = binning.assign(traces.exit_signal())[:, 0]
  want = np.array([rate[b == s].mean() for s in range(16)])
  np.testing.assert_allclose(model.loss[0], want, atol=0.02)
  assert np.all(np.diff(model.loss[0]) >= 0) and np.all(model.loss[1] == 0)




