"""`jexit monitor` and `jexit refit`: exit codes, the report, the refit round trip,
and the false-alarm rate of the served-counters check on same-law streams."""

import json

import numpy as np
import pytest

import jexit
from jexit import cli, monitor, stats
from jexit.export import add_reference
from jexit.counters import Counters
from jexit.runtime import ExitTable
from test_runtime import make_table, random_case

DIGITS = jexit.demo_trace_path()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  path = tmp_path_factory.mktemp("mon") / "policy.npz"
  assert cli.main(["export", DIGITS, "--max-loss", "0.02", "--out", str(path)]) == 0
  return path


def serve(policy, out, *, seed, n=3000, shift=None, audit=0.05):
  """Serves n rows drawn from the digits trace (shifted: ramp 0 less confident)."""
  traces = jexit.load_traces(DIGITS)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, traces.num_inputs, n)
  conf = traces.conf[idx].copy()
  if shift is not None:
    conf[:, 0] = conf[:, 0] ** shift
  table = ExitTable.load(policy, counters=True, audit=audit, seed=seed, out_of_range="clip")
  served = table.run(conf, traces.pred[idx])
  table.counters.save(out)
  return table, served


def test_export_stores_the_reference(policy):
  table = ExitTable.load(policy)
  occupancy, stops, n = table.reference
  assert n == jexit.load_traces(DIGITS).num_inputs
  # the reference is the table replayed on TRACE with counters on
  counted = ExitTable.load(policy, counters=True, out_of_range="clip")
  counted.run(*jexit.load_traces(DIGITS)[:2])
  np.testing.assert_array_equal(occupancy, counted.counters.occupancy)
  np.testing.assert_array_equal(stops, counted.counters.stop_hist)
  assert table.budget == {"max_loss": 0.02, "metric": "agreement"}


def test_monitor_exit_codes(policy, tmp_path, capsys):
  serve(policy, tmp_path / "a.npz", seed=1)
  serve(policy, tmp_path / "b.npz", seed=2)
  serve(policy, tmp_path / "s.npz", seed=3, shift=3.0)
  capsys.readouterr()
  assert cli.main(["monitor", str(policy), str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                   "--json", str(tmp_path / "ok.json")]) == 0
  out = capsys.readouterr().out
  assert "verdict: ok" in out and "6000 live inputs" in out
  report = json.loads((tmp_path / "ok.json").read_text())
  assert report["verdict"] == "ok" and report["exit_code"] == 0
  assert report["budget"]["max_loss"] == 0.02 and report["certificate"]["certified"]
  assert cli.main(["monitor", str(policy), str(tmp_path / "s.npz"), "--json",
                   str(tmp_path / "drift.json")]) == 1
  out = capsys.readouterr().out
  assert "verdict: drift: ramp 0" in out
  report = json.loads((tmp_path / "drift.json").read_text())
  assert 0 in report["drifted"] and report["ramps"][0]["effect"] > 0.5
  # bad input: a corrupt counters file, a missing file, counters of another policy
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  assert cli.main(["monitor", str(policy), str(tmp_path / "bad.npz")]) == 2
  assert "jexit: error: counters file" in capsys.readouterr().err
  assert cli.main(["monitor", str(policy), str(tmp_path / "missing.npz")]) == 2
  other = tmp_path / "other.npz"
  assert cli.main(["export", DIGITS, "--lam", "0.001", "--out", str(other)]) == 0
  capsys.readouterr()
  assert cli.main(["monitor", str(other), str(tmp_path / "a.npz")]) == 2
  assert "monitor the policy that was served" in capsys.readouterr().err
  assert cli.main(["monitor", str(policy), str(tmp_path / "a.npz"), "--alpha", "1.5"]) == 2


def test_monitor_look_spends_alpha(policy, tmp_path, capsys):
  serve(policy, tmp_path / "a.npz", seed=4)
  capsys.readouterr()
  args = ["monitor", str(policy), str(tmp_path / "a.npz")]
  assert cli.main(args + ["--look", "3", "--looks", "12", "--json",
                          str(tmp_path / "r.json")]) == 0
  out = capsys.readouterr().out
  assert "check 3 of 12 at level 0.000833" in out and "one-sided 0.9992 bounds" in out
  report = json.loads((tmp_path / "r.json").read_text())
  assert (report["look"], report["looks"]) == (3, 12)
  assert report["alpha_look"] == pytest.approx(0.01 / 12)
  assert cli.main(args + ["--look", "2", "--json", str(tmp_path / "u.json")]) == 0
  assert json.loads((tmp_path / "u.json").read_text())["alpha_look"] == pytest.approx(
      monitor.spent_alpha(0.01, 2))
  capsys.readouterr()
  for bad, message in ((["--looks", "4"], "--looks: given (4) without --look"),
                       (["--look", "0"], "--look: expected an integer >= 1"),
                       (["--look", "5", "--looks", "4"], "--look: expected at most --looks = 4")):
    assert cli.main(args + bad) == 2
    assert message in capsys.readouterr().err


def test_monitor_budget_exceeded_on_hand_made_counts(policy, tmp_path, capsys):
  table = ExitTable.load(policy, counters=True, out_of_range="clip")
  occupancy, stops, n = table.reference
  c = table.counters
  # the reference's own counts (no drift) and 200 audited rows, 20 disagreeing
  c.occupancy[:], c.stop_hist[:], c.output_hist[:] = occupancy, stops, stops
  c.num_inputs = n
  k = table.num_ramps
  pred = np.zeros((200, k), np.int64)
  pred[:20, 0] = 1
  c.record_audit(pred, np.zeros(200, np.int64), conf=np.full((200, k), 0.5))
  c.save(tmp_path / "x.npz")
  capsys.readouterr()
  assert cli.main(["monitor", str(policy), str(tmp_path / "x.npz")]) == 1
  out = capsys.readouterr().out
  assert "verdict: budget exceeded" in out and "20 of 200 audited" in out
  lower = stats.clopper_pearson(20, 200, monitor.DEFAULT_ALPHA)[0]
  assert lower > 0.02 and f"{lower:.4f}" in out
  # within budget: 2 of 200 disagree
  c2 = ExitTable.load(policy, counters=True).counters
  c2.occupancy[:], c2.stop_hist[:], c2.output_hist[:], c2.num_inputs = (
      occupancy, stops, stops, n)
  pred[2:20, 0] = 0
  c2.record_audit(pred, np.zeros(200, np.int64), conf=np.full((200, k), 0.5))
  c2.save(tmp_path / "y.npz")
  assert cli.main(["monitor", str(policy), str(tmp_path / "y.npz")]) == 0


def test_monitor_plot(policy, tmp_path, capsys):
  pytest.importorskip("matplotlib")
  serve(policy, tmp_path / "s.npz", seed=5, shift=2.0)
  assert cli.main(["monitor", str(policy), str(tmp_path / "s.npz"), "--plot",
                   str(tmp_path / "occ.png")]) == 1
  assert (tmp_path / "occ.png").read_bytes()[:4] == b"\x89PNG"


def test_refit_round_trip(policy, tmp_path, capsys):
  serve(policy, tmp_path / "a.npz", seed=1, audit=0.2)
  serve(policy, tmp_path / "s.npz", seed=3, shift=3.0, audit=0.2)
  audited = sum(Counters.load(tmp_path / f).audited for f in ("a.npz", "s.npz"))
  new = tmp_path / "new.npz"
  assert cli.main(["refit", str(policy), str(tmp_path / "a.npz"), str(tmp_path / "s.npz"),
                   "--trace", DIGITS, "--out", str(new)]) == 0
  out = capsys.readouterr().out
  n = jexit.load_traces(DIGITS).num_inputs
  assert f"refit on {n + audited} rows ({audited} audited after {n}" in out
  table = ExitTable.load(new)
  assert table.reference[2] == n + audited
  assert table.budget == {"max_loss": 0.02, "metric": "agreement"}
  assert table.certificate is not None
  # the refit's reference is its own trace: the old and audited rows replayed
  old = ExitTable.load(policy)
  counters = Counters.load(tmp_path / "a.npz") + Counters.load(tmp_path / "s.npz")
  from jexit.cli_monitor import refit_traces
  rows = refit_traces(old, counters, jexit.load_traces(DIGITS))
  np.testing.assert_array_equal(rows.conf[n:], counters.audit_conf)
  # refit needs audited rows, and a budget
  serve(policy, tmp_path / "none.npz", seed=1, audit=0.0)
  assert cli.main(["refit", str(policy), str(tmp_path / "none.npz"), "--out",
                   str(tmp_path / "x.npz")]) == 2
  assert "no audited rows" in capsys.readouterr().err


def test_false_alarm_rate_of_served_counters_at_most_alpha():
  """Monte Carlo: reference and live streams drawn from one law, served by a
  random table; the verdict is drift at most alpha of the time (min_effect 0,
  so only the test's level speaks)."""
  rng = np.random.default_rng(0)
  edges, loss, threshold, _, _ = random_case(rng, 10, 3, 6)
  alpha, trials, alarms = 0.05, 400, 0
  for t in range(trials):
    tables = [make_table(edges, loss, threshold, np.ones(3), counters=True)
              for _ in range(2)]
    for table in tables:
      conf = rng.beta(2.0, 1.2, (1500, 3))
      table.run(conf, rng.integers(0, 5, (1500, 3)))
    ref = monitor.reference_from_counters(tables[0].counters)
    report = monitor.check(ref, tables[1].counters, alpha=alpha, min_effect=0.0)
    alarms += report.verdict != "ok"
  # binomial: P(alarms > 30 | rate 0.05, 400 trials) ~ 0.01 (mean 20, sd 4.4)
  assert alarms <= 30, alarms
  # and the same check sees a shifted law
  shifted = make_table(edges, loss, threshold, np.ones(3), counters=True)
  shifted.run(rng.beta(2.0, 2.0, (1500, 3)), rng.integers(0, 5, (1500, 3)))
  assert monitor.check(ref, shifted.counters, alpha=alpha).verdict == "drift"


def test_add_reference_is_idempotent(policy, tmp_path):
  traces = jexit.load_traces(DIGITS)
  header = add_reference(policy, traces)  # idempotent on the same rows
  assert header["reference_inputs"] == traces.num_inputs
