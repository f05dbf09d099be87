"""End-to-end tests of the `jexit` command line on small traces in a temporary folder."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import jexit
from jexit import cli
from jexit.protocol import METHODS

ENTRY_KEYS = {"param", "agreement", "accuracy", "mean_cost", "speedup"}


def small_traces(n=240, k=3, seed=0):
  rng = np.random.default_rng(seed)
  hard = rng.uniform(size=n)
  conf = np.clip(1 - hard[:, None] * np.linspace(0.9, 0.5, k) + rng.normal(0, 0.05, (n, k)),
                 0, 1)
  final = rng.integers(0, 4, n)
  pred = np.where(rng.uniform(size=(n, k)) < conf ** 2, final[:, None], (final[:, None] + 1) % 4)
  pred[:, -1] = final
  return jexit.Traces(conf, pred, final, np.array([1.0, 2.0, 3.0][:k]))


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("traces") / "small.npz"
  jexit.save_traces(path, small_traces())
  return str(path)


def run(capsys, *argv):
  rc = cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_sweep_writes_json_table_and_plot(trace_file, tmp_path, capsys):
  out_json, out_png = tmp_path / "f.json", tmp_path / "f.png"
  rc, out, err = run(capsys, "sweep", trace_file, "--json", str(out_json), "--plot",
                     str(out_png), "--num-lambdas", "50", "--seed", "1")
  assert rc == 0, err
  assert "loss <= 1%" in out and "recall" in out and "global_threshold" in out
  data = json.loads(out_json.read_text())
  assert data["trace"] == trace_file
  assert data["split"]["fit_rows"] == 120 and data["split"]["test_rows"] == 120
  assert data["split"]["seed"] == 1
  assert set(data["methods"]) == set(METHODS)
  for m, entries in data["methods"].items():
    assert entries, m
    for e in entries:
      assert set(e) == ENTRY_KEYS
      assert 0 <= e["agreement"] <= 1 and 0 <= e["accuracy"] <= 1
      assert e["speedup"] == pytest.approx(6.0 / e["mean_cost"])
    if m in ("global_threshold", "fixed_ramp"):  # monotone in the parameter
      costs = [e["mean_cost"] for e in entries]
      assert costs == sorted(costs), m
  assert out_png.stat().st_size > 10_000
  assert f"wrote {out_png}" in out


def test_sweep_options_reach_the_model(trace_file, tmp_path, capsys):
  out_json = tmp_path / "f.json"
  rc, _, err = run(capsys, "sweep", trace_file, "--json", str(out_json), "--num-lambdas",
                   "20", "--loss", "calibrated", "--bins", "quantile", "--num-bins", "5",
                   "--all-points")
  assert rc == 0, err
  data = json.loads(out_json.read_text())
  assert data["fit_options"]["loss"] == "calibrated" and data["fit_options"]["num_bins"] == 5
  assert len(data["methods"]["recall"]) == 20


def test_budget_writes_fit_and_test_metrics(trace_file, tmp_path, capsys):
  out_json = tmp_path / "b.json"
  rc, out, err = run(capsys, "budget", trace_file, "--max-loss", "0.05", "--folds", "2",
                     "--json", str(out_json), "--num-lambdas", "40")
  assert rc == 0, err
  assert "agreement-loss budget: 5%" in out and "2-fold" in out
  data = json.loads(out_json.read_text())
  assert data["max_loss"] == 0.05 and data["split"]["folds"] == 2
  assert set(data["methods"]) == set(METHODS)
  for m, c in data["methods"].items():
    assert set(c) == {"param", "fit", "test", "certificate"}
    assert c["certificate"] is None  # --folds: not certified
    if c["fit"] is None:
      assert c["test"] is None and c["param"] is None
      continue
    assert set(c["fit"]) == set(c["test"]) == ENTRY_KEYS - {"param"}
    assert 1 - c["fit"]["agreement"] <= 0.05 + 1e-9, m
    assert len(c["param"]) == 2  # one parameter per fold
  assert data["methods"]["backbone"]["test"]["agreement"] == 1.0


def test_bad_input_is_one_line_and_exit_2(trace_file, tmp_path, capsys):
  rc, _, err = run(capsys, "budget", str(tmp_path / "missing.npz"))
  assert rc == 2 and err.startswith("jexit: error: trace file") and err.count("\n") == 1
  rc, _, err = run(capsys, "budget", trace_file, "--max-loss", "2")
  assert rc == 2 and "--max-loss" in err and err.count("\n") == 1
  bad = tmp_path / "bad.npz"
  np.savez(bad, conf=np.full((3, 2), np.nan), pred=np.zeros((3, 2), int), cost=np.ones(2))
  rc, _, err = run(capsys, "sweep", str(bad))
  assert rc == 2 and "traces.conf" in err and err.count("\n") == 1
  rc, _, err = run(capsys, "sweep", trace_file, "--test-fraction", "1.5")
  assert rc == 2 and "--test-fraction" in err
  rc, _, err = run(capsys, "sweep", trace_file, "--json", str(tmp_path / "no" / "dir.json"),
                   "--num-lambdas", "5")
  assert rc == 2 and err.startswith("jexit: error:")
  with pytest.raises(SystemExit) as e:  # argparse's own usage errors also exit 2
    cli.main(["sweep"])
  assert e.value.code == 2


@pytest.mark.parametrize("argv, match", [
    # sweep's --max-loss only picks the plot's policy: it was not checked at all.
    (("sweep", "{trace}", "--max-loss", "2"), "--max-loss: expected an agreement-loss"),
    (("sweep", "{trace}", "--max-loss", "nan"), "--max-loss: expected an agreement-loss"),
    (("sweep", "{trace}", "--seed", "-1", "--num-lambdas", "5"), "seed: expected an integer"),
    (("budget", "{trace}", "--seed", "-1", "--folds", "2"), "seed: expected an integer"),
    (("sweep", "{trace}", "--bins", "uniform", "--step", "1e-12"), "step: expected a bin width"),
    (("export", "{trace}", "--lam", "0.1", "--out", "{tmp}"), "--out: expected a file to write, got the folder"),
    (("export", "{trace}", "--lam", "0.1", "--out", "{tmp}/no/p.npz"), "--out: the folder"),
    (("demo", "--out", "{trace}"), "--out: expected a folder"),
    # 1e12 lam values died in numpy or XLA with an out-of-memory error.
    (("sweep", "{trace}", "--num-lambdas", "1000000000000"), "--num-lambdas: 1000000000000 lam"),
    (("budget", "{trace}", "--num-lambdas", "1000000000000"), "GiB is free"),
])
def test_out_of_range_flags_and_paths_name_the_flag(trace_file, tmp_path, capsys, argv, match):
  argv = [a.format(trace=trace_file, tmp=tmp_path) for a in argv]
  rc, _, err = run(capsys, *argv)
  assert rc == 2 and err.startswith("jexit: error:") and err.count("\n") == 1, err
  assert match in err, err


def test_console_entry_point_prints_no_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cli.__file__)))
  res = subprocess.run([sys.executable, "-m", "jexit.cli", "budget", str(tmp_path / "x.npz")],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
  assert res.returncode == 2
  assert res.stderr.startswith("jexit: error:") and "Traceback" not in res.stderr


def test_import_apparate(tmp_path, capsys):
  src = tmp_path / "profile.pickle"
  with open(src, "wb") as f:
    pickle.dump({"conf": [[0.9, 0.2], [0.95, 0.6], [None, None]],
                 "acc": [[True, False], [True, True], [True, True]]}, f)
  out = tmp_path / "t.npz"
  rc, _, err = run(capsys, "import-apparate", str(src), "--out", str(out))
  assert rc == 2 and "--allow-pickle" in err and not out.exists()
  rc, stdout, err = run(capsys, "import-apparate", str(src), "--out", str(out),
                        "--allow-pickle", "--cost", "1,2,3")
  assert rc == 0, err
  traces = jexit.load_traces(out)
  np.testing.assert_array_equal(traces.pred, [[0, 0, 0], [1, 0, 0]])
  np.testing.assert_allclose(traces.cost, [1, 2, 3])


def test_demo_reads_the_embedded_trace(tmp_path, capsys):
  from jexit import datasets
  # The trace ships inside the package (package data): it must be there.
  assert os.path.exists(datasets.demo_trace_path())
  out_dir = tmp_path / "demo"
  rc, out, err = run(capsys, "demo", "--out", str(out_dir))
  assert rc == 0, err
  assert "digits_vgg11.npz" in out and "loss <= 1%" in out
  # The exit signal is chosen on the fit rows first, as `jexit budget` does.
  assert "exit signal of recall/norecall: class (chosen on the fit rows" in out
  assert (out_dir / "frontier.png").exists() and (out_dir / "frontier.json").exists()
  assert str(out_dir / "frontier.png") in out
  data = json.loads((out_dir / "frontier.json").read_text())
  assert set(data["methods"]) == set(METHODS)


def test_compilation_cache_location(monkeypatch, tmp_path):
  from jexit import cli
  monkeypatch.setenv("JEXIT_CACHE_DIR", str(tmp_path / "xla"))
  assert cli.compilation_cache_dir() == str(tmp_path / "xla")
  monkeypatch.setenv("JEXIT_CACHE_DIR", "")
  assert cli.compilation_cache_dir() == ""
  monkeypatch.delenv("JEXIT_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cli.compilation_cache_dir() == str(tmp_path / "jexit" / "xla")


def test_budget_by_accuracy(trace_file, tmp_path, capsys):
  out_json = tmp_path / "acc.json"
  rc, out, err = run(capsys, "budget", trace_file, "--metric", "accuracy", "--max-loss", "0.02",
                     "--num-lambdas", "40", "--json", str(out_json))
  assert rc == 0, err
  assert "accuracy budget: at most 2% below the backbone" in out and "fit acc" in out
  data = json.loads(out_json.read_text())
  assert data["metric"] == "accuracy" and data["fit_options"]["target"] in ("agreement", "label")
  assert any(name.endswith("label loss") for name in data["signal_scores"])
  rc, _, err = run(capsys, "budget", trace_file, "--max-loss", "-0.1")
  assert rc == 2 and "agreement-loss budget in [0, 1]" in err
