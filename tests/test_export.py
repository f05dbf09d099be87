"""Policy export: round trip, header contents, and refusal of bad files."""

import json
import os
import types

import numpy as np
import pytest

import jexit
from jexit import cli, cli_export, export
from jexit.runtime import FORMAT_VERSION, ExitTable, load_policy_file


def _traces(rng, n=300, k=4, signal=False):
  conf = rng.uniform(size=(n, k))
  pred = rng.integers(0, 5, (n, k))
  sig = rng.normal(size=(n, k)) if signal else None
  return jexit.Traces(conf, pred, rng.integers(0, 5, n), rng.uniform(0.5, 2.0, k), sig)


@pytest.fixture(scope="module")
def solved():
  rng = np.random.default_rng(0)
  traces = _traces(rng)
  model, binning = jexit.fit(traces)
  policy = jexit.solve(model, np.array([0.0, 0.02, 0.2, 2.0]))
  return traces, model, binning, policy


def _write(tmp_path, arrays, name="bad.npz"):
  path = os.fspath(tmp_path / name)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def _arrays(path):
  with np.load(path, allow_pickle=False) as data:
    arrays = {key: data[key] for key in data.files}
  return arrays, json.loads(str(arrays["header"]))


def test_round_trip(tmp_path, solved):
  traces, model, binning, policy = solved
  path = tmp_path / "p.npz"
  header = export.export_policy(path, policy, binning, model, 2, traces=traces)
  table = load_policy_file(path)
  assert isinstance(table, ExitTable)
  np.testing.assert_array_equal(table.edges, binning.edges)
  np.testing.assert_array_equal(table.loss, np.asarray(policy.loss))
  np.testing.assert_array_equal(table.threshold, np.asarray(policy.threshold)[2])
  assert table.threshold.dtype == np.asarray(policy.threshold).dtype
  np.testing.assert_array_equal(table.cost, model.cost)
  assert table.lam == float(np.asarray(policy.lam)[2])
  assert table.recall is True and table.signal == "1-conf"
  assert header == table.header
  assert header["format"] == "jexit-policy" and header["format_version"] == FORMAT_VERSION
  assert header["jexit_version"] == jexit.__version__
  assert header["num_ramps"] == 4 and header["num_bins"] == binning.num_bins
  assert header["trace_sha256"] == export.trace_sha256(traces)
  assert header["value"] == pytest.approx(float(np.asarray(policy.value)[2]))
  # Readable without jexit: a plain npz with a JSON string.
  arrays, raw = _arrays(path)
  assert raw["lam"] == table.lam and sorted(arrays) == sorted(
      ["header", "edges", "loss", "threshold", "cost"])


def test_no_recall_custom_signal_and_batched_models(tmp_path):
  rng = np.random.default_rng(1)
  traces = _traces(rng, signal=True)
  model, binning = jexit.fit(traces, bins="quantile", num_bins=6)
  assert binning.signal == "signal"
  stacked = jexit.ExitModel(*(np.stack([a, a]) for a in model))
  policy = jexit.solve(stacked, np.array([0.01, 0.1]), recall=False)
  with pytest.raises(ValueError, match="model_index"):
    export.export_policy(tmp_path / "p.npz", policy, binning, stacked, 0)
  export.export_policy(tmp_path / "p.npz", policy, binning, stacked, -1, model_index=1,
                       trace_hash="ab" * 32)
  table = load_policy_file(tmp_path / "p.npz")
  assert table.recall is False and table.signal == "signal"
  assert table.header["trace_sha256"] == "ab" * 32 and table.header["lam_index"] == 1
  np.testing.assert_array_equal(table.threshold, np.asarray(policy.threshold)[1, 1])


def test_trace_hash_is_stable_under_save_and_load(tmp_path):
  rng = np.random.default_rng(2)
  traces = _traces(rng)
  jexit.save_traces(tmp_path / "t.npz", traces)
  loaded = jexit.load_traces(tmp_path / "t.npz")
  assert export.trace_sha256(loaded) == export.trace_sha256(traces)
  other = traces._replace(pred=traces.pred.copy())
  other.pred[0, 0] += 1
  assert export.trace_sha256(other) != export.trace_sha256(traces)
  with pytest.raises(ValueError, match="traces.conf: expected real numbers"):
    export.trace_sha256(traces._replace(conf=traces.conf.astype(str)))


def test_export_refuses_mismatches(tmp_path, solved):
  traces, model, binning, policy = solved
  path = tmp_path / "p.npz"
  with pytest.raises(ValueError, match="lam_index"):
    export.export_policy(path, policy, binning, model, 4)
  short = jexit.Binning(binning.edges[:, :-1], binning.signal)
  with pytest.raises(ValueError, match=r"binning.edges: expected shape"):
    export.export_policy(path, policy, short, model, 0)
  with pytest.raises(ValueError, match="model.loss"):
    export.export_policy(path, policy, binning, model._replace(loss=model.loss + 0.1), 0)
  with pytest.raises(ValueError, match="not both"):
    export.export_policy(path, policy, binning, model, 0, traces=traces, trace_hash="0" * 64)
  with pytest.raises(ValueError, match="trace_sha256"):
    export.export_policy(path, policy, binning, model, 0, trace_hash="xyz")
  bad = policy._replace(threshold=np.asarray(policy.threshold) + 1e-3)
  with pytest.raises(ValueError, match="threshold"):
    export.export_policy(path, bad, binning, model, 1)
  # Text arrays and a non-bool recall: named, not a cast error or bool("no").
  for field in ("threshold", "lam", "value", "loss", "cost"):
    text = policy._replace(**{field: np.asarray(getattr(policy, field)).astype(str)})
    with pytest.raises(ValueError, match=f"policy.{field}: expected real numbers"):
      export.export_policy(path, text, binning, None, 1)
  with pytest.raises(ValueError, match="binning.edges: expected real numbers"):
    export.export_policy(path, policy, binning._replace(edges=binning.edges.astype(str)),
                         model, 1)
  with pytest.raises(ValueError, match="model.cost: expected real numbers"):
    export.export_policy(path, policy, binning, model._replace(cost=model.cost.astype(str)), 1)
  with pytest.raises(ValueError, match="policy.recall: expected a bool"):
    export.export_policy(path, policy._replace(recall="no"), binning, model, 1)
  assert not path.exists()  # nothing half-written


def _mutate(tmp_path, solved, change):
  """Writes a valid file, applies `change(arrays, header)`, returns the new path."""
  traces, model, binning, policy = solved
  good = tmp_path / "good.npz"
  export.export_policy(good, policy, binning, model, 1, traces=traces)
  arrays, header = _arrays(good)
  change(arrays, header)
  arrays["header"] = np.array(json.dumps(header))
  return _write(tmp_path, arrays)


@pytest.mark.parametrize("change, match", [
    (lambda a, h: h.update(format_version=3), r"format versions \[1, 2\], the file has version 3"),
    (lambda a, h: h.update(format_version="1"), "format_version: expected an integer"),
    (lambda a, h: h.update(format="other"), "header.format"),
    (lambda a, h: h.pop("lam"), r"header.lam: missing"),
    (lambda a, h: h.update(extra=1), "unknown field"),
    (lambda a, h: h.update(recall=1), "header.recall: expected bool"),
    (lambda a, h: h.update(lam=-1.0), "header.lam"),
    (lambda a, h: h.update(signal="entropy"), "header.signal"),
    (lambda a, h: h.update(num_bins=h["num_bins"] + 1), r"edges: expected shape"),
    (lambda a, h: a.update(loss=a["loss"][:, :-1]), r"loss: expected shape"),
    (lambda a, h: a.update(threshold=a["threshold"].astype(np.float64)), "dtype float32"),
    (lambda a, h: a["edges"].__setitem__((0, 3), a["edges"][0, 2]), "strictly increasing"),
    (lambda a, h: a["threshold"].__setitem__((0, 0), 0.123456), "not in `loss`"),
    (lambda a, h: a["threshold"].__setitem__((-1, 0), a["loss"][0, 0]), "last ramp"),
    (lambda a, h: a["loss"].__setitem__((0, 0), np.nan), "loss: expected finite"),
    (lambda a, h: a["cost"].__setitem__(0, 9.0), "differs from header.cost"),
    (lambda a, h: a.pop("threshold"), r"missing key\(s\) \['threshold'\]"),
    (lambda a, h: a.update(more=np.zeros(2)), r"unknown key\(s\) \['more'\]"),
    (lambda a, h: h.update(lam=10 ** 400), "header.lam: expected a finite"),  # no OverflowError
])
def test_load_refuses_bad_files(tmp_path, solved, change, match):
  path = _mutate(tmp_path, solved, change)
  with pytest.raises(ValueError, match=match):
    load_policy_file(path)


def test_deeply_nested_header_is_invalid_json(tmp_path, solved):
  path = _mutate(tmp_path, solved, lambda a, h: None)
  arrays = _arrays(path)[0]
  arrays["header"] = np.array("[" * 100_000 + "]" * 100_000)  # RecursionError in json
  with pytest.raises(ValueError, match="header: not valid JSON"):
    load_policy_file(_write(tmp_path, arrays, "deep.npz"))


def test_unknown_version_is_reported_before_contents(tmp_path, solved):
  # A future layout with other keys still gets the version message.
  path = _mutate(tmp_path, solved, lambda a, h: (h.update(format_version=7),
                                                 a.pop("loss"), a.update(new=np.ones(1))))
  with pytest.raises(ValueError, match="version 7; upgrade jexit"):
    load_policy_file(path)


def test_load_refuses_corrupt_and_foreign_files(tmp_path, solved):
  traces, model, binning, policy = solved
  good = tmp_path / "good.npz"
  export.export_policy(good, policy, binning, model, 1)
  blob = good.read_bytes()
  (tmp_path / "trunc.npz").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match="could not read"):
    load_policy_file(tmp_path / "trunc.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match="policy file"):
    load_policy_file(tmp_path / "junk.npz")
  # A flipped byte inside the compressed data: CRC or zlib error, not garbage.
  flipped = bytearray(blob)
  flipped[len(blob) // 3] ^= 0xFF
  (tmp_path / "flip.npz").write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match="policy file"):
    load_policy_file(tmp_path / "flip.npz")
  with pytest.raises(ValueError, match="missing key 'header'"):
    load_policy_file(_write(tmp_path, {"conf": np.zeros((2, 2))}))
  # Object arrays would need pickle: refused, never unpickled.
  arrays, _ = _arrays(good)
  arrays["header"] = np.array([{"format": "jexit-policy"}], dtype=object)
  with pytest.raises(ValueError, match="header"):
    load_policy_file(_write(tmp_path, arrays, "pickled.npz"))
  arrays["header"] = np.array("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    load_policy_file(_write(tmp_path, arrays, "json.npz"))
  with pytest.raises(ValueError, match="could not read"):
    load_policy_file(tmp_path / "missing.npz")


def _args(**kw):
  base = dict(lam=None, max_loss=None, no_recall=False, paper=False, seed=0, block=1,
              grid=40, signal=None, metric="agreement", method="solver", signal_range=None,
              delta="none", calibration_share=None)  # uncertified: tests/test_select_certified.py
  base.update(kw)
  return types.SimpleNamespace(**base)


def test_cli_export(tmp_path, capsys, solved):
  from jexit import select, traces as jt
  traces = solved[0]
  jexit.save_traces(tmp_path / "t.npz", traces)
  parser = cli.build_parser()
  args = parser.parse_args(["export", str(tmp_path / "t.npz"), "--lam", "0.05",
                            "--out", str(tmp_path / "p.npz")])
  assert args.func is cli_export.run_export and args.func(args) == 0
  table = load_policy_file(tmp_path / "p.npz")
  assert table.lam == pytest.approx(0.05) and table.recall
  assert table.header["trace_sha256"] == export.trace_sha256(traces)
  assert "wrote" in capsys.readouterr().out
  with pytest.raises(SystemExit):  # --lam and --max-loss are exclusive
    parser.parse_args(["export", "t.npz", "--lam", "1", "--max-loss", "0.1", "--out", "x"])

  # --max-loss: the budget choice on the fit rows, as `jexit budget` makes it.
  out = str(tmp_path / "m.npz")
  cli_export.run_export(_args(trace=str(tmp_path / "t.npz"), max_loss=0.05, out=out))
  printed = capsys.readouterr().out
  assert "fit rows" in printed and "held-out" in printed
  table = load_policy_file(out)
  choice = select.choose(traces, 0.05, methods=("recall",), num_lambdas=40)
  fit_rows, _ = jt.split_rows(traces.num_inputs)
  fit_t = traces.take(fit_rows)
  _, output, _ = table.run(fit_t.conf, fit_t.pred)
  agreement = np.mean(fit_t.pred[np.arange(len(output)), output] == fit_t.pred[:, -1])
  assert agreement == pytest.approx(float(choice.choices["recall"].fit.agreement[0]))
  assert table.lam == pytest.approx(choice.choices["recall"].param["lam"])
  assert table.signal == choice.fit_options.get("signal", "1-conf")  # the same signal choice
  with pytest.raises(ValueError, match="agreement-loss budget"):
    cli_export.run_export(_args(trace=str(tmp_path / "t.npz"), max_loss=-1.0, out=out))


def test_a_file_that_is_not_a_zip_is_named_as_such(tmp_path):
  path = tmp_path / "text.npz"
  path.write_text("threshold = 0.5\n")
  with pytest.raises(ValueError, match="not a zip archive"):
    load_policy_file(path)


def test_cli_export_by_accuracy_matches_budget(tmp_path, capsys):
  from jexit import select, traces as jt
  rng = np.random.default_rng(3)
  n, k = 1200, 4
  z = np.array([0.8, 2.0, 2.0, 1.6]) - 1.5 * rng.normal(size=(n, 1)) + rng.normal(0, 1.2, (n, k))
  conf = 0.1 + 0.9 / (1 + np.exp(-z))
  label = rng.integers(0, 10, n)
  right = rng.uniform(size=(n, k)) < conf
  pred = np.where(right, label[:, None], (label[:, None] + rng.integers(1, 10, (n, k))) % 10)
  traces = jexit.Traces(conf, pred, label, np.ones(k))
  path = str(tmp_path / "t.npz")
  jexit.save_traces(path, traces)
  out = str(tmp_path / "acc.npz")
  cli_export.run_export(_args(trace=path, max_loss=0.0, out=out, metric="accuracy"))
  assert "accuracy" in capsys.readouterr().out
  table = load_policy_file(out)
  choice = select.choose(traces, 0.0, metric="accuracy", methods=("recall",), num_lambdas=40)
  assert table.lam == pytest.approx(choice.choices["recall"].param["lam"])
  fit_rows, _ = jt.split_rows(n)
  fit_t = traces.take(fit_rows)
  _, output, _ = table.run(fit_t.conf, fit_t.pred)
  accuracy = np.mean(fit_t.pred[np.arange(len(output)), output] == fit_t.label)
  assert accuracy == pytest.approx(float(choice.choices["recall"].fit.accuracy[0]))
  assert accuracy >= np.mean(fit_t.pred[:, -1] == fit_t.label)
  with pytest.raises(ValueError, match="needs --max-loss"):
    cli_export.run_export(_args(trace=path, lam=0.1, out=out, metric="accuracy"))
  jexit.save_traces(path, traces._replace(label=None))
  with pytest.raises(ValueError, match="no 'label' array"):
    cli_export.run_export(_args(trace=path, max_loss=0.0, out=out, metric="accuracy"))


def test_cli_export_best_ships_the_fit_rows_fastest_method(tmp_path, capsys):
  """`--method best` exports what `jexit budget` names best; a threshold rule
  becomes a 2-bin table whose decisions reproduce its fit-row metrics."""
  from jexit import select, traces as jt
  from jexit.datasets import demo_trace_path as default_trace_path
  traces = jexit.load_traces(default_trace_path())
  out = str(tmp_path / "best.npz")
  shipped = set()
  # method None is the command line's default with --max-loss: best.
  for max_loss, method, no_recall in ((0.01, "best", False), (0.05, None, False),
                                      (0.03, None, True), (0.05, None, True)):
    cli_export.run_export(_args(trace=default_trace_path(), max_loss=max_loss, out=out,
                            method=method, block=4, signal="1-conf", no_recall=no_recall))
    printed = capsys.readouterr().out
    pool = ("norecall", "apparate_greedy", "global_threshold")
    b = select.choose(traces, max_loss, block=4, num_lambdas=40, signal="1-conf",
                         methods=pool if no_recall else ("recall",) + pool)
    fit_speed = {m: float(c.fit.speedup[0]) for m, c in b.choices.items()}
    assert b.best == max(fit_speed, key=fit_speed.get)
    assert f"{b.best} (best on the fit rows)" in printed
    shipped.add(b.best)
    table = load_policy_file(out)
    assert table.recall == (b.best == "recall")
    assert (table.num_bins == 2) == (b.best not in ("recall", "norecall"))
    fit_rows, _ = jt.split_rows(traces.num_inputs, block=4)
    fit_t = traces.take(fit_rows)
    stop, output, _ = table.run(fit_t.conf, fit_t.pred)
    agreement = np.mean(fit_t.pred[np.arange(len(output)), output] == fit_t.pred[:, -1])
    assert agreement == pytest.approx(float(b.choices[b.best].fit.agreement[0]))
    mean_cost = np.mean(np.cumsum(traces.cost)[stop])
    assert traces.cost.sum() / mean_cost == pytest.approx(fit_speed[b.best])
  assert len(shipped) > 1, shipped  # the cases above ship more than one kind of rule
  with pytest.raises(ValueError, match="needs --max-loss"):
    cli_export.run_export(_args(trace=default_trace_path(), lam=0.1, out=out, method="best"))
  cli_export.run_export(_args(trace=default_trace_path(), lam=0.1, out=out, method=None))
  assert load_policy_file(out).num_bins > 2  # --lam ships the solved policy


def _reference(table_or_binning, traces, policy, binning, i):
  """Occupancy and stops of the fit rows under entry i of `policy`."""
  ev = jexit.evaluate(policy, traces, binning, return_per_input=True)
  stop = np.asarray(ev.stop_ramp[i])
  bins = binning.assign(jexit.traces.signal_values(traces, binning.signal))
  k, s = bins.shape[1], binning.num_bins
  occupancy = np.zeros((k, s), np.int64)
  for r in range(k):
    np.add.at(occupancy[r], bins[stop >= r, r], 1)
  return occupancy, np.bincount(stop, minlength=k), traces.num_inputs


def test_version_2_fields_round_trip(tmp_path, solved):
  traces, model, binning, policy = solved
  ref = _reference(None, traces, policy, binning, 2)
  cert = {"certified": True, "eps": 0.01, "delta": 0.1, "test": "binomial", "index": 2,
          "units": 500, "block": 1, "rows": 500, "rows_sha256": None, "loss": 0.002,
          "ucb": 0.0078, "pvalue": 0.04, "accepted": 3, "method": "recall",
          "quantity": "disagreement"}  # jexit.report.certificate_to_dict's fields
  path = tmp_path / "v2.npz"
  header = export.export_policy(path, policy, binning, model, 2, traces=traces,
                                budget={"max_loss": 0.01, "metric": "agreement"},
                                certificate=cert, active_ramps=[0, 2, 3, 5], reference=ref)
  table = load_policy_file(path)
  assert header["format_version"] == 2 and table.header == header
  assert table.budget == {"max_loss": 0.01, "metric": "agreement"}
  assert table.certificate == cert and table.active_ramps == [0, 2, 3, 5]
  np.testing.assert_array_equal(table.reference[0], ref[0])
  np.testing.assert_array_equal(table.reference[1], ref[1])
  assert table.reference[2] == traces.num_inputs
  plain = load_policy_file(export.export_policy(tmp_path / "plain.npz", policy, binning, model,
                                                2) and tmp_path / "plain.npz")
  assert plain.reference is None and plain.certificate is None and plain.active_ramps is None


def test_version_1_files_still_read_and_refuse_version_2_fields(tmp_path, solved):
  traces, model, binning, policy = solved
  path = tmp_path / "p.npz"
  export.export_policy(path, policy, binning, model, 1)
  arrays, header = _arrays(path)
  header["format_version"] = 1
  arrays["header"] = np.array(json.dumps(header))
  table = load_policy_file(_write(tmp_path, arrays, "v1.npz"))
  np.testing.assert_array_equal(table.threshold, np.asarray(policy.threshold)[1])
  header["active_ramps"] = [0, 1, 2, 3]
  arrays["header"] = np.array(json.dumps(header))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['active_ramps'\] for format "
                                       r"version 1"):
    load_policy_file(_write(tmp_path, arrays, "v1bad.npz"))


@pytest.mark.parametrize("change, match", [
    (dict(budget={"max_loss": 2.0, "metric": "agreement"}), "header.budget: expected"),
    (dict(budget={"max_loss": 0.01}), "header.budget: expected"),
    (dict(active_ramps=[0, 0, 1, 2]), "header.active_ramps: expected 4 increasing"),
    (dict(active_ramps=[0, 1]), "header.active_ramps: expected 4 increasing"),
    (dict(reference_inputs=0), "header.reference_inputs: expected an integer >= 1"),
    (dict(reference_inputs=5), "reference_occupancy: missing"),
    (dict(certificate={"eps": 0.01}), "header.certificate.certified: expected true or false"),
])
def test_bad_version_2_fields_name_the_field(tmp_path, solved, change, match):
  traces, model, binning, policy = solved
  path = tmp_path / "p.npz"
  export.export_policy(path, policy, binning, model, 1)
  arrays, header = _arrays(path)
  header.update(change)
  arrays["header"] = np.array(json.dumps(header))
  with pytest.raises(ValueError, match=match):
    load_policy_file(_write(tmp_path, arrays))


def test_reference_counts_must_add_up(tmp_path, solved):
  traces, model, binning, policy = solved
  occupancy, stops, n = _reference(None, traces, policy, binning, 2)
  bad = occupancy.copy()
  bad[1, 0] += 1
  with pytest.raises(ValueError, match="reference_occupancy: expected each ramp's row"):
    export.export_policy(tmp_path / "p.npz", policy, binning, model, 2, reference=(bad, stops, n))
  with pytest.raises(ValueError, match="expected 301 inputs"):
    export.export_policy(tmp_path / "p.npz", policy, binning, model, 2,
                         reference=(occupancy, stops, n + 1))
