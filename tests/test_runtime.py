"""The numpy runtime: decisions equal a per-input reference and jexit.evaluation."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import jexit
from jexit import export
from jexit.runtime import FORMAT_NAME, FORMAT_VERSION, ExitState, ExitTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = jexit.demo_trace_path()


def reference(values, pred, edges, loss, threshold, recall):
  """Plain per-input loops over the decision rule (PROBLEM.md)."""
  n, k_count = values.shape
  stop_ramp, output_ramp = [], []
  for i in range(n):
    best, best_ramp = float("inf"), -1
    for k in range(k_count):
      s = sum(1 for e in edges[k][1:-1] if e <= values[i][k])
      cur = float(loss[k][s])
      if not recall or cur <= best:
        best, best_ramp = cur, k
      if k == k_count - 1 or best <= float(threshold[k][s]):
        break
    stop_ramp.append(k)
    output_ramp.append(best_ramp)
  stop_ramp, output_ramp = np.array(stop_ramp), np.array(output_ramp)
  return stop_ramp, output_ramp, pred[np.arange(n), output_ramp]


def make_table(edges, loss, threshold, cost, *, recall=True, signal="1-conf", **options):
  loss = np.asarray(loss)
  header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "jexit_version": "t",
            "signal": signal, "lam": 0.1, "recall": recall, "num_ramps": loss.shape[0],
            "num_bins": loss.shape[1], "cost": [float(c) for c in cost],
            "dtype": loss.dtype.name, "trace_sha256": None}
  return ExitTable(header, edges, loss, threshold, np.asarray(cost, np.float64), **options)


def random_case(rng, n, k, s, dtype=np.float32):
  """Random edges, a loss table with repeats (ties), random thresholds, and
  confidences that include values exactly on the edges."""
  edges = np.sort(rng.uniform(0, 1, (k, s + 1)), axis=1)
  edges[:, 0], edges[:, -1] = 0.0, 1.0
  loss = rng.choice(np.linspace(0, 1, 2 * s), size=(k, s)).astype(dtype)
  threshold = rng.choice(loss.ravel(), size=(k, s))
  special = rng.uniform(size=(k, s))
  threshold = np.where(special < 0.15, -np.inf, np.where(special > 0.9, np.inf, threshold))
  threshold[-1] = np.inf
  conf = rng.uniform(size=(n, k))
  on_edge = rng.uniform(size=(n, k)) < 0.2
  pick = edges[np.arange(k)[None, :], rng.integers(0, s + 1, (n, k))]
  conf = np.where(on_edge, 1.0 - pick, conf)
  pred = rng.integers(0, 7, (n, k))
  return edges, loss, threshold.astype(dtype), conf, pred


def _exported_run_equals_reference(tmp_path, traces, policy, binning, model, i, recall):
  """Exports policy i, replays the trace with ExitTable, checks it against `reference`."""
  export.export_policy(tmp_path / "p.npz", policy, binning, model, i, traces=traces)
  got = ExitTable.load(tmp_path / "p.npz").run(traces.conf, traces.pred)
  want = reference(traces.exit_signal(), traces.pred, binning.edges,
                   np.asarray(policy.loss), np.asarray(policy.threshold)[i], recall)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  return got


@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_run_equals_reference_on_random_tables(seed, recall):
  rng = np.random.default_rng(seed)
  k, s = int(rng.integers(1, 5)), int(rng.integers(1, 7))
  dtype = np.float32 if seed % 2 == 0 else np.float64
  edges, loss, threshold, conf, pred = random_case(rng, 200, k, s, dtype)
  table = make_table(edges, loss, threshold, np.ones(k), recall=recall)
  got = table.run(conf, pred)
  want = reference(1.0 - conf, pred, edges, loss, threshold, recall)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  assert np.all(got[1] <= got[0])
  if not recall:
    np.testing.assert_array_equal(got[0], got[1])
  # The scalar fast path (batch size 1) makes the same decisions.
  for i in range(0, 200, 7):
    best_loss, best_ramp = float("inf"), -1
    for r in range(k):
      stop, best_loss, best_ramp = table.decide_one(r, 1.0 - conf[i, r], best_loss, best_ramp)
      if stop:
        break
    assert (r, best_ramp) == (got[0][i], got[1][i])
  # The same table as a Policy, replayed by jexit.evaluation (ties on edges too).
  policy = jexit.Policy(threshold=threshold[None], value=np.zeros(1), lam=np.zeros(1),
                        loss=loss, cost=np.ones(k), recall=recall)
  traces = jexit.Traces(conf, pred, None, np.ones(k))
  stop, out = _evaluate_decisions(policy, traces, jexit.Binning(edges), 0)
  np.testing.assert_array_equal(got[0], stop)
  np.testing.assert_array_equal(got[1], out)


@pytest.mark.parametrize("recall", [True, False])
def test_solved_policy_round_trip_equals_reference(tmp_path, recall):
  rng = np.random.default_rng(3)
  n, k = 400, 4
  # Correlated ramps, as in real traces: confidence grows along the network.
  base = rng.uniform(size=(n, 1))
  conf = np.clip(base + np.cumsum(rng.uniform(0, 0.2, (n, k)), axis=1) - 0.3, 0, 1)
  traces = jexit.Traces(conf, rng.integers(0, 4, (n, k)), None, np.array([1.0, 2, 2, 3]))
  model, binning = jexit.fit(traces, loss="calibrated")
  policy = jexit.solve(model, np.geomspace(1e-3, 1.0, 5), recall=recall)
  for i in range(5):
    _exported_run_equals_reference(tmp_path, traces, policy, binning, model, i, recall)


def test_step_by_step_matches_run_with_batches_and_scalars():
  rng = np.random.default_rng(4)
  edges, loss, threshold, conf, pred = random_case(rng, 50, 3, 4)
  table = make_table(edges, loss, threshold, np.ones(3))
  stop_ramp, output_ramp, _ = table.run(conf, pred)
  for i in range(50):  # one input at a time, scalars
    state = None
    for k in range(3):
      stop, state = table.step(k, 1.0 - conf[i, k], state)
      assert np.shape(stop) == () and state.best_ramp.shape == ()
      if stop:
        break
    assert (k, int(state.best_ramp)) == (stop_ramp[i], output_ramp[i])
  # A server that keeps every input in the batch must stop using the state.
  stop, state = table.step(0, 1.0 - conf[:, 0])
  with pytest.raises(ValueError, match="due at ramp 2"):
    table.step(2, 1.0 - conf[:, 2], state)
  with pytest.raises(ValueError, match="state: expected shape"):
    table.step(1, 1.0 - conf[:3, 1], state)
  with pytest.raises(ValueError, match=r"step\(0, ...\)"):
    table.step(1, 1.0 - conf[:, 1])
  with pytest.raises(ValueError, match=r"k: expected a ramp in \[0, 3\)"):
    table.step(3, 1.0 - conf[:, 0])
  assert isinstance(state.take(~stop), ExitState)
  # The last ramp always stops.
  state = table.init_state((50,))._replace(ramp=np.full(50, 2))
  assert table.step(2, 1.0 - conf[:, 2], state)[0].all()


def test_shape_mismatch_errors():
  rng = np.random.default_rng(5)
  edges, loss, threshold, conf, pred = random_case(rng, 20, 3, 4)
  table = make_table(edges, loss, threshold, np.ones(3))
  with pytest.raises(ValueError, match=r"pred: expected shape \[N, K=3\]"):
    table.run(conf[:, :2], pred[:, :2])
  with pytest.raises(ValueError, match="conf: expected shape"):
    table.run(conf[:10], pred)
  with pytest.raises(ValueError, match="pass conf, not signal"):
    table.run(conf, pred, signal=conf)
  custom = make_table(edges, loss, threshold, np.ones(3), signal="signal")
  with pytest.raises(ValueError, match="pass signal="):
    custom.run(conf, pred)
  np.testing.assert_array_equal(custom.run(None, pred, signal=1 - conf)[0],
                                table.run(conf, pred)[0])
  with pytest.raises(ValueError, match="header.num_bins|edges: expected shape"):
    make_table(edges[:, :-1], loss, threshold, np.ones(3))


def test_conf_outside_unit_interval_and_fractional_pred_name_the_field():
  rng = np.random.default_rng(5)
  edges, loss, threshold, conf, pred = random_case(rng, 20, 3, 4)
  table = make_table(edges, loss, threshold, np.ones(3))
  bad = conf.copy()
  bad[4, 2] = 1.5  # a logit or a percentage, not a softmax
  with pytest.raises(ValueError, match=r"conf: expected max-softmax values in \[0, 1\], "
                                       r"got .*1\.5.* at input 4, ramp 2"):
    table.run(bad, pred)
  clip = make_table(edges, loss, threshold, np.ones(3), out_of_range="clip")
  np.testing.assert_array_equal(clip.run(bad, pred)[0], clip.run(np.minimum(bad, 1), pred)[0])
  table.run(np.minimum(conf + 1e-9, 1 + 1e-9), pred)  # float32 rounding is tolerated
  with pytest.raises(ValueError, match="pred: expected integer class ids.*non-integer"):
    table.run(conf, pred + 0.5)
  np.testing.assert_array_equal(table.run(conf, pred.astype(float))[2], table.run(conf, pred)[2])


def test_text_and_complex_inputs_name_the_field():
  # A complex signal would lose its imaginary part with only a warning.
  rng = np.random.default_rng(5)
  edges, loss, threshold, conf, pred = random_case(rng, 20, 3, 4)
  table = make_table(edges, loss, threshold, np.ones(3))
  with pytest.raises(ValueError, match="conf: expected real numbers"):
    table.run(conf + 0j, pred)
  with pytest.raises(ValueError, match="conf: expected real numbers"):
    table.run(conf.astype(str), pred)
  with pytest.raises(ValueError, match="signal: expected real numbers"):
    make_table(edges, loss, threshold, np.ones(3), signal="signal").run(
        None, pred, signal=(1 - conf).astype(str))
  with pytest.raises(ValueError, match="signal_k: expected real numbers"):
    table.step(0, 0.5 + 1j)
  with pytest.raises(ValueError, match="signal_k: expected real numbers"):
    table.bins(0, "0.5")
  with pytest.raises(ValueError, match="range_tol"):
    make_table(edges, loss, threshold, np.ones(3), range_tol="1e-6")
  with pytest.raises(ValueError, match="header: expected a JSON object"):
    ExitTable(None, edges, loss, threshold, np.ones(3))


def test_nan_is_an_error_or_runs_on():
  rng = np.random.default_rng(6)
  k = 3
  edges, loss, threshold, conf, pred = random_case(rng, 40, k, 4)
  threshold[:-1] = np.inf  # would stop everyone at ramp 0
  conf[5, 0] = np.nan
  conf[6, :] = np.nan
  table = make_table(edges, loss, threshold, np.ones(k))
  with pytest.raises(ValueError, match=r"NaN at input \(5,\)"):
    table.run(conf, pred)
  safe = make_table(edges, loss, threshold, np.ones(k), nan="continue")
  stop_ramp, output_ramp, _ = safe.run(conf, pred)
  for i in (5, 6):  # the scalar path falls back to the same handling
    best_loss, best_ramp = float("inf"), -1
    for r in range(k):
      stop, best_loss, best_ramp = safe.decide_one(r, 1.0 - conf[i, r], best_loss, best_ramp)
      if stop:
        break
    assert (r, best_ramp) == (stop_ramp[i], output_ramp[i])
  with pytest.raises(ValueError, match="NaN"):
    table.decide_one(0, float("nan"))
  assert stop_ramp[5] == 1 and output_ramp[5] == 1  # ran on; NaN ramp never output
  assert stop_ramp[6] == k - 1 and output_ramp[6] == k - 1  # all NaN: the last ramp
  ok = np.ones(40, bool)
  ok[[5, 6]] = False
  assert np.all(stop_ramp[ok] == 0)
  # A NaN at a ramp the input never reaches is not consulted.
  conf2 = conf.copy()
  conf2[[5, 6]] = 0.5
  conf2[7, 2] = np.nan
  assert table.run(conf2, pred)[0][7] == 0


def test_out_of_range_is_an_error_or_clipped():
  rng = np.random.default_rng(7)
  edges, loss, threshold, _, pred = random_case(rng, 30, 2, 5)
  edges = edges * 0.5 + 0.25  # signals can fall outside [0.25, 0.75]
  values = rng.uniform(0, 1, (30, 2))
  table = make_table(edges, loss, threshold, np.ones(2), signal="signal")
  with pytest.raises(ValueError, match="edges' range"):
    table.run(None, pred, signal=values)
  clip = make_table(edges, loss, threshold, np.ones(2), signal="signal",
                    out_of_range="clip")
  got = clip.run(None, pred, signal=values)
  with pytest.raises(ValueError, match="edges' range"):
    table.decide_one(0, 0.9)
  assert clip.decide_one(0, 0.9)[:2] == clip.decide_one(0, 0.75)[:2]
  # Clipping is the end-bin rule of Binning.assign, i.e. what evaluate does.
  want = reference(values, pred, edges, loss, threshold, True)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  # Tiny float excursions (1 - conf of a float32 softmax) are within tolerance.
  inside = np.clip(values, 0.25, 0.75)
  inside[0, 0] = 0.25 - 1e-9
  table.run(None, pred, signal=inside)


def _evaluate_decisions(policy, traces, binning, lam_index):
  """(stop_ramp [N], output_ramp [N]) of one lam from jexit.evaluation."""
  evaluate = pytest.importorskip("jexit.evaluation").evaluate
  ev = evaluate(policy, traces, binning, return_per_input=True)
  return np.asarray(ev.stop_ramp)[lam_index], np.asarray(ev.output_ramp)[lam_index]


@pytest.mark.parametrize("recall", [True, False])
def test_run_equals_evaluate_on_random_traces(tmp_path, recall):
  rng = np.random.default_rng(8)
  n, k = 300, 4
  traces = jexit.Traces(rng.uniform(size=(n, k)), rng.integers(0, 3, (n, k)), None,
                        rng.uniform(0.5, 1.5, k))
  model, binning = jexit.fit(traces, bins="quantile", num_bins=6)
  policy = jexit.solve(model, np.array([0.01, 0.1, 1.0]), recall=recall)
  for i in range(3):
    stop, out = _evaluate_decisions(policy, traces, binning, i)
    export.export_policy(tmp_path / "p.npz", policy, binning, model, i)
    got = ExitTable.load(tmp_path / "p.npz").run(traces.conf, traces.pred)
    np.testing.assert_array_equal(got[0], stop)
    np.testing.assert_array_equal(got[1], out)


@pytest.mark.skipif(not os.path.exists(DIGITS), reason="embedded digits trace not built yet")
@pytest.mark.parametrize("recall", [True, False])
def test_digits_trace(tmp_path, recall):
  traces = jexit.load_traces(DIGITS)
  model, binning = jexit.fit(traces)
  policy = jexit.solve(model, np.array([0.01, 0.1, 1.0]) / traces.cost.sum(), recall=recall)
  for i in range(3):
    got = _exported_run_equals_reference(tmp_path, traces, policy, binning, model, i, recall)
    stop, out = _evaluate_decisions(policy, traces, binning, i)
    np.testing.assert_array_equal(got[0], stop)
    np.testing.assert_array_equal(got[1], out)


def _python(code):
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_signal_registry_is_a_standalone_numpy_module():
  # The one module both runtimes compute signals with: numpy only, no jexit.
  path = os.path.join(ROOT, "jexit", "signals.py")
  code = (f"import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('sig', {path!r})\n"
          f"mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
          f"assert 'jax' not in sys.modules, 'jax imported'\n"
          f"assert not any(m.startswith('jexit') for m in sys.modules)\n")
  result = _python(code)
  assert result.returncode == 0, result.stderr


def test_package_import_of_runtime_avoids_jax():
  result = _python("import sys, jexit.runtime; print('jax' in sys.modules)")
  assert result.returncode == 0, result.stderr
  if result.stdout.strip() == "True":
    package = _python("import sys, jexit; print('jax' in sys.modules)")
    if package.stdout.strip() == "True":
      pytest.skip("jexit/__init__.py imports JAX eagerly (pending a lazy __init__)")
    pytest.fail("jexit.runtime pulled in JAX")


@pytest.mark.parametrize("recall", [True, False])
def test_stability_table_run_and_step_equal_evaluate(tmp_path, recall):
  """A 'stability' table: the runtime computes the signal from conf and pred."""
  from jexit.runtime import stability_signal
  rng = np.random.default_rng(9)
  n, k = 400, 4
  pred = rng.integers(0, 3, (n, k))
  traces = jexit.Traces(rng.uniform(size=(n, k)), pred, None, rng.uniform(0.5, 1.5, k))
  model, binning = jexit.fit(traces, bins="quantile", num_bins=8, signal="stability")
  assert binning.signal == "stability"
  values = stability_signal(traces.conf, traces.pred)
  np.testing.assert_array_equal(values[:, 0], 1 - traces.conf[:, 0])
  np.testing.assert_allclose(values[:, 1:] - (1 - traces.conf[:, 1:]),
                             pred[:, 1:] != pred[:, :-1], atol=1e-12)
  policy = jexit.solve(model, np.array([0.01, 0.1]), recall=recall)
  for i in range(2):
    stop, out = _evaluate_decisions(policy, traces, binning, i)
    export.export_policy(tmp_path / "p.npz", policy, binning, model, i)
    table = ExitTable.load(tmp_path / "p.npz")
    assert table.signal == "stability"
    got = table.run(traces.conf, traces.pred)
    np.testing.assert_array_equal(got[0], stop)
    np.testing.assert_array_equal(got[1], out)
    state, rows = None, np.arange(n)  # step by step with the signal computed by hand
    for r in range(k):
      stop_r, state = table.step(r, values[rows, r], state)
      np.testing.assert_array_equal(stop[rows[stop_r]], r)
      rows, state = rows[~stop_r], state.take(~stop_r)
    with pytest.raises(ValueError, match="pass conf, not signal"):
      table.run(traces.conf, traces.pred, signal=values)
