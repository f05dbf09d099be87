"""The bins' outer edges are the signal's whole range, so an exported table
serves held-out inputs whose signal lies beyond the fit rows' (default
runtime options), and the margin signal is one definition everywhere."""

import os

import numpy as np
import pytest

import jexit
from jexit import cli
from jexit.runtime import ExitTable, margin_signal, stability_signal

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN_TRACE = os.path.join(HERE, "experiments", "traces/margin", "digits_vgg11_3ramps.npz")


def _export_and_serve(tmp_path, traces, fit_rows, held, **fit_options):
  model, binning = jexit.fit(traces, rows=fit_rows, **fit_options)
  policy = jexit.solve(model, np.array([1e-9]))  # tiny lam: every ramp is consulted
  path = tmp_path / "p.npz"
  jexit.export_policy(path, policy, binning, model, 0)
  table = ExitTable.load(path)
  signal = held.signal if table.signal == "signal" else None
  conf = None if signal is not None else held.conf
  return binning, table.run(conf, held.pred, signal=signal)


def test_a_stability_table_serves_held_out_rows(tmp_path):
  traces = jexit.load_demo_traces()
  fit_rows, held = np.arange(400), traces.take(np.arange(400, traces.num_inputs))
  v = stability_signal(traces.conf, traces.pred)
  # The held-out rows reach beyond the fit rows' range: the old edges refused them.
  assert (v[400:] > v[:400].max(axis=0)).any() or (v[400:] < v[:400].min(axis=0)).any()
  binning, (stop, out, _) = _export_and_serve(tmp_path, traces, fit_rows, held,
                                              signal="stability")
  np.testing.assert_array_equal(binning.edges[:, [0, -1]], [[0.0, 2.0]] * traces.num_ramps)
  assert len(stop) == held.num_inputs and np.all(out <= stop)


def test_signal_range_lets_a_margin_table_serve_held_out_rows(tmp_path):
  traces = jexit.load_traces(MARGIN_TRACE)
  fit_rows, held = np.arange(1000), traces.take(np.arange(1000, traces.num_inputs))
  beyond = (held.signal > traces.signal[:1000].max(axis=0)).any(axis=1) | (
      held.signal < traces.signal[:1000].min(axis=0)).any(axis=1)
  assert beyond.any()
  with pytest.raises(ValueError, match="edges' range"):
    _export_and_serve(tmp_path, traces, fit_rows, held)  # the fit rows' range
  binning, (stop, out, pred) = _export_and_serve(tmp_path, traces, fit_rows, held,
                                                 signal_range=(0, 1))
  np.testing.assert_array_equal(binning.edges[:, [0, -1]], [[0.0, 1.0]] * 3)
  assert np.all(pred == held.pred[np.arange(held.num_inputs), out])
  # The inner edges are the fit rows' quantiles either way.
  plain = jexit.fit(traces, rows=fit_rows)[1]
  np.testing.assert_array_equal(plain.edges[:, 1:-1], binning.edges[:, 1:-1])


def test_signal_range_is_checked_and_applies_to_the_traces_signal_only():
  traces = jexit.load_traces(MARGIN_TRACE)
  for bad in [(1, 0), (0, np.nan), (0,), "0,1"]:
    with pytest.raises(ValueError, match="signal_range: expected"):
      jexit.fit(traces, signal_range=bad)
  with pytest.raises(ValueError, match="containing every fit row's 'signal' signal"):
    jexit.fit(traces, signal_range=(0.5, 1.0))
  # 1-conf and stability have fixed ranges (an auto choice passes one range for both).
  for signal, hi in (("1-conf", 1.0), ("stability", 2.0)):
    edges = jexit.fit(traces, signal=signal, signal_range=(0, 1))[1].edges
    assert edges[0, 0] == 0.0 and edges[0, -1] == hi
  uniform = jexit.fit(traces, bins="uniform", step=0.25, signal_range=(0, 1))[1].edges
  np.testing.assert_allclose(uniform[0], [0, 0.25, 0.5, 0.75, 1.0])
  # A bad range is an error with a fixed-range signal too, not ignored.
  with pytest.raises(ValueError, match="signal_range: expected"):
    jexit.fit(traces, signal="1-conf", signal_range=(1, 0))


def test_signal_range_on_traces_without_a_signal_is_an_error(capsys):
  traces = jexit.load_demo_traces()
  assert traces.signal is None
  with pytest.raises(ValueError, match="signal_range: .* the traces have none"):
    jexit.fit(traces, signal_range=(0, 1))
  assert cli.main(["budget", jexit.demo_trace_path(), "--signal-range", "0,1"]) == 2
  assert "the traces have none" in capsys.readouterr().err


def test_export_cli_takes_a_signal_range(tmp_path, capsys):
  out = tmp_path / "m.npz"
  cli.main(["export", MARGIN_TRACE, "--max-loss", "0.01", "--signal", "signal",
            "--signal-range", "0,1", "--block", "4", "--grid", "100", "--out", str(out)])
  table = ExitTable.load(out)
  assert table.signal == "signal"
  with pytest.raises(SystemExit):
    cli.main(["export", MARGIN_TRACE, "--max-loss", "0.01", "--signal-range", "1",
              "--out", str(out)])
  assert "expected LO,HI like 0,1, got '1'" in capsys.readouterr().err


def test_margin_signal_by_hand_and_in_torch():
  probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(margin_signal(probs), [0.5, 1.0, 0.0])
  assert margin_signal(probs.reshape(3, 1, 4)).shape == (3, 1)
  with pytest.raises(ValueError, match="probs: expected softmax outputs"):
    margin_signal(np.ones((3, 1)))
  torch = pytest.importorskip("torch")
  from jexit import runtime_torch  # pylint: disable=import-outside-toplevel
  logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
  np.testing.assert_allclose(runtime_torch.margin_signal(logits).numpy(),
                             margin_signal(logits.float().softmax(-1).numpy()), atol=1e-6)
