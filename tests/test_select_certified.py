"""Tests of certified budgets in the chooser: `jexit.choose(..., delta=)`, its report,
the policy file's certificate and the command line (docs/certify.md)."""

import json
import math
import os
import sys

import numpy as np
import pytest
from scipy import stats

import jexit
from jexit import baselines, certify, cli, report, select, select_certify
from jexit.evaluation import evaluate
from jexit.export import export_policy
from jexit.policy_file import check_certificate
from jexit.runtime import ExitTable
from jexit.traces import split_rows

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import workloads  # noqa: E402  pylint: disable=wrong-import-position

FAST = dict(num_lambdas=40, fit_options={"num_bins": 8})


def synth(n=1200, seed=0, kind="smooth"):
  return workloads.synthetic(kind, n=n, seed=seed)


def reference_walk(t, choice, method, eps, delta):
  """The certified index by hand: per-row losses from `jexit.evaluate` on the
  calibration rows, scipy's binomial tail, and the walk up the lam path."""
  fr = choice.frontier
  num_lam = len(fr.lambdas)
  fit_ev = fr.splits[0][method][0]
  ok = 1 - np.asarray(fit_ev.agreement) <= eps + 1e-12
  first = (int(np.argmax(np.where(ok, fit_ev.speedup, -np.inf))) // num_lam) * num_lam
  policy, _, _, binning = jexit.select.candidate_policy(fr, method, first)
  cal = split_rows(t.num_inputs, test_fraction=choice.split["calibration_share"],
                   seed=choice.split["seed"])[1]
  sub = t.take(cal)
  ev = evaluate(policy, sub, binning, return_per_input=True)
  out = np.asarray(ev.output_ramp)  # [L, N], lam increasing
  wrong = np.take_along_axis(np.asarray(sub.pred), out.T, axis=1).T != sub.pred[:, -1]
  p = stats.binom.cdf(wrong.sum(1), len(cal), eps)
  rejected = np.flatnonzero(p > delta)
  last = (rejected[0] if rejected.size else len(p)) - 1
  return None if last < 0 else first + last, p


# ---- the chooser

def test_fixed_sequence_picks_the_last_lam_before_the_first_rejection():
  t = synth(2000, seed=3)
  c = jexit.choose(t, 0.02, delta=0.1, methods=("recall", "norecall"), signal=None, **FAST)
  for m in ("recall", "norecall"):
    want, p = reference_walk(t, c, m, 0.02, 0.1)
    cert = c.choices[m].certificate
    assert isinstance(cert, certify.Certificate) and want is not None
    assert cert.index == want
    assert cert.pvalue == pytest.approx(p[cert.accepted - 1], rel=1e-9)
    assert cert.accepted < len(p)  # the walk stopped on a rejection, not at the end
    assert cert.test == "binomial" and cert.units == 1000 and cert.block == 1
  # The shipped table is the best method's certified candidate.
  assert c.table.method == c.best and c.table.index == c.choices[c.best].certificate.index
  assert c.certificate is c.choices[c.best].certificate
  # The uncertified choice is what the same split chooses without delta.
  plain = jexit.choose(t, 0.02, methods=("recall", "norecall"), signal=None, **FAST)
  assert c.uncertified["recall"].param == plain.choices["recall"].param


def test_per_input_replay_matches_evaluate_for_every_method():
  # The certification's numpy replay against the frontier's own held-out scores:
  # class signal (its calibration), blocks, thresholds and Apparate.
  t = synth(1600, seed=1, kind="overthink")
  for block, signal in ((1, "class"), (4, "stability")):
    c = jexit.choose(t, 0.03, delta=0.1, block=block, signal=signal, methods=select.DEPLOYABLE,
                     **FAST)
    fr = c.frontier
    cal = split_rows(t.num_inputs, test_fraction=c.split["calibration_share"], seed=0,
                     block=block)[1]
    for m in select.DEPLOYABLE:
      idx = select_certify.certify_path(fr, m)
      units = select_certify.unit_losses(fr, m, idx, t, cal, block=block)
      want = 1 - np.asarray(fr.splits[0][m][1].agreement)[idx]
      np.testing.assert_allclose(units.mean(1), want, atol=1e-12, err_msg=m)
      harm = select_certify.unit_losses(fr, m, idx, t, cal, metric="accuracy", block=block)
      assert np.all(harm <= units + 1e-12)  # harm needs a disagreement
      assert harm.shape == (len(idx), len(cal) // block)


def test_paths_run_from_safest_to_fastest():
  t = synth(1200, seed=2)
  c = jexit.choose(t, 0.02, delta=0.1, signal=None, methods=select.DEPLOYABLE, **FAST)
  fr = c.frontier
  for m in select.DEPLOYABLE:
    idx = select_certify.certify_path(fr, m)
    param = np.asarray(fr.splits[0][m][0].param, np.float64)[idx]
    assert np.all(np.diff(param) >= 0), m  # lam, threshold, Apparate's budget: increasing
  # Apparate's budget grid under certification has steps near every budget.
  assert len(fr.splits[0]["apparate_greedy"][0].param) == len(
      set(select_certify.CERTIFY_APPARATE_BUDGETS) | {0.02})


def test_calibration_rows_are_disjoint_kept_by_block_and_never_read_by_the_choices():
  t = synth(1600, seed=4)
  kw = dict(delta=0.1, block=4, signal="auto", methods=select.DEPLOYABLE, **FAST)
  c = jexit.choose(t, 0.02, **kw)
  share = c.split["calibration_share"]
  fit, cal = split_rows(t.num_inputs, test_fraction=share, seed=0, block=4)
  assert not set(fit) & set(cal) and len(fit) + len(cal) == t.num_inputs
  assert c.split["fit_rows"] == len(fit) and c.split["test_rows"] == len(cal)
  assert set(np.unique(cal // 4, return_counts=True)[1]) == {4}  # whole blocks
  cert = c.certificate
  assert cert.rows_sha256 == certify.rows_sha256(cal) and cert.units == len(cal) // 4
  assert cert.block == 4 and cert.test in ("wsr", "hoeffding-bentkus")
  # Scramble the calibration rows: no choice made before certification moves.
  rng = np.random.default_rng(0)
  conf, pred = np.array(t.conf), np.array(t.pred)
  conf[cal] = rng.permutation(conf[cal])
  pred[cal] = rng.integers(0, 10, pred[cal].shape)
  c2 = jexit.choose(t._replace(conf=conf, pred=pred), 0.02, **kw)
  assert c2.signal_scores == c.signal_scores and c2.fit_options == c.fit_options
  assert c2.best == c.best
  for m in c.uncertified:
    assert c2.uncertified[m].param == c.uncertified[m].param, m
    if c.uncertified[m].fit is not None:
      assert c2.uncertified[m].fit.agreement[0] == c.uncertified[m].fit.agreement[0]


def test_fallback_ships_the_backbone_and_names_what_would_certify():
  t = synth(300, seed=5)
  c = jexit.choose(t, 0.01, delta=0.1, signal=None, methods=select.DEPLOYABLE, **FAST)
  # 300 rows: 0.5 would leave 150 < 2 * 230 units, so 0.7 (210 rows) is held out.
  assert c.split["calibration_share"] == 0.7 and c.split["test_rows"] == 210
  fb = c.certificate
  assert isinstance(fb, certify.Fallback)
  assert fb.needed_units == certify.needed_rows(0.01, 0.1) == 230
  assert fb.smallest_certifiable == pytest.approx(1 - 0.1 ** (1 / 210), rel=1e-9)
  assert fb.pvalue > 0.1 and fb.units == 210
  assert c.table.method == "backbone" and c.table.model is None
  ev = evaluate(c.table.policy, t, c.table.binning)
  assert float(ev.speedup[0]) == 1.0 and float(ev.agreement[0]) == 1.0
  for m in select.DEPLOYABLE:  # every method falls back: no parameter reported
    assert c.choices[m].param is None and isinstance(c.choices[m].certificate, certify.Fallback)
  text = report.format_choice(c)
  assert "certificate: none" in text and "needs at least 230 rows" in text
  assert f"{fb.smallest_certifiable * 100:.2f}%" in text and "ships the backbone" in text


def test_certified_arguments_are_checked():
  t = synth(400, seed=0)
  with pytest.raises(ValueError, match=r"delta: expected a failure probability in \(0, 1\)"):
    jexit.choose(t, 0.02, delta=1.0)
  with pytest.raises(ValueError, match="folds: a certified budget"):
    jexit.choose(t, 0.02, delta=0.1, folds=3)
  with pytest.raises(ValueError, match="test_fraction: with delta"):
    jexit.choose(t, 0.02, delta=0.1, test_fraction=0.5)
  with pytest.raises(ValueError, match=r"max_loss: a certified budget must lie in \(0, 1\)"):
    jexit.choose(t, -0.01, delta=0.1, metric="accuracy")
  with pytest.raises(ValueError, match="certify_test: expected one of"):
    jexit.choose(t, 0.02, delta=0.1, block=4, certify_test="binomial")
  with pytest.raises(ValueError, match="calibration_share: expected a share"):
    jexit.choose(t, 0.02, delta=0.1, calibration_share=1.0)
  with pytest.raises(ValueError, match="calibration_share: only for a certified budget"):
    jexit.choose(t, 0.02, calibration_share=0.5)


def test_default_test_and_share_follow_the_units():
  assert select_certify.default_certify_test(1, 10, 0.01, 0.1) == "binomial"
  assert select_certify.default_certify_test(4, 360, 0.01, 0.1) == "wsr"  # 310 needed
  assert select_certify.default_certify_test(4, 300, 0.01, 0.1) == "hoeffding-bentkus"
  # 720 blocks: 0.5 leaves 360 >= 2 * 114 at 2%, but < 2 * 230 at 1%.
  assert select_certify.auto_calibration_share(2880, 4, 0.02, 0.1) == 0.5
  assert select_certify.auto_calibration_share(2880, 4, 0.01, 0.1) == 0.7


def test_accuracy_budgets_certify_the_harm_rate():
  t = synth(2000, seed=6)
  c = jexit.choose(t, 0.02, metric="accuracy", delta=0.1, signal=None,
                   methods=("recall",), **FAST)
  cert = c.certificate
  fr = c.frontier
  cal = split_rows(t.num_inputs, test_fraction=c.split["calibration_share"], seed=0)[1]
  out = select_certify._output_ramps(fr, "recall", np.array([cert.index]), t.take(cal))[0]
  sub = t.take(cal)
  harm = (sub.pred[np.arange(len(cal)), out] != sub.label) & (sub.pred[:, -1] == sub.label)
  assert cert.loss == pytest.approx(harm.mean())
  d = report.certificate_to_dict(cert, method="recall", metric="accuracy")
  assert d["quantity"] == "harm" and d["certified"] is True


# ---- validity, Monte Carlo

def test_certified_choose_meets_the_budget_on_fresh_rows_monte_carlo():
  """Over independent draws of a synthetic Markov workload, the certified table's
  true loss (on 20,000 fresh rows) exceeds eps in at most delta of the draws (plus
  binomial slack); the uncertified choice of the same split fails that bound."""
  eps, delta, draws = 0.02, 0.05, 60
  truth = synth(20_000, seed=10**6)
  kw = dict(methods=("recall",), ship=("recall",), signal=None, **FAST)

  def true_loss(table):  # the numpy replay; test_per_input_replay... checks it
    out = select_certify._replay_outputs(table.policy, [table.lam_index], truth, table.binning)[0]
    return float(np.mean(truth.pred[np.arange(truth.num_inputs), out] != truth.pred[:, -1]))

  over_cert = over_plain = 0
  for d in range(draws):
    c = jexit.choose(synth(1000, seed=d), eps, delta=delta, calibration_share=0.5, seed=d,
                     **kw)
    over_cert += true_loss(c.table) > eps
    plain = select._table(c.frontier, "recall", eps, "agreement")
    over_plain += plain is not None and true_loss(plain) > eps
  slack = int(stats.binom.ppf(0.999, draws, delta))  # false alarm 1e-3 at rate delta
  assert over_cert <= slack, (over_cert, over_plain)
  assert over_plain > slack, (over_cert, over_plain)  # the check has power


# ---- the policy file and the runtimes

@pytest.fixture(scope="module")
def certified_choice():
  t = synth(2000, seed=7)
  return t, jexit.choose(t, 0.02, delta=0.1, signal=None, **FAST)


def _export(tmp_path, t, c, certificate, name="p.npz", table=None):
  table = table or c.table
  return export_policy(tmp_path / name, table.policy, table.binning, table.model,
                       table.lam_index, traces=t, budget={"max_loss": 0.02,
                                                          "metric": "agreement"},
                       certificate=certificate)


def test_policy_file_round_trips_the_certificate(certified_choice, tmp_path):
  t, c = certified_choice
  d = report.certificate_to_dict(c.certificate, method=c.best)
  _export(tmp_path, t, c, d)
  table = ExitTable.load(tmp_path / "p.npz")
  assert table.certificate == d and table.budget == {"max_loss": 0.02, "metric": "agreement"}
  assert "certified: Pr(disagreement > 0.02) <= 0.1" in repr(table)
  text = table.describe()
  assert f"upper bound {d['ucb']:.4g}" in text and d["rows_sha256"][:12] in text
  torch = pytest.importorskip("torch")
  from jexit.runtime_torch import EarlyExitRunner  # pylint: disable=import-outside-toplevel
  layers = [torch.nn.Identity()] * 5
  runner = EarlyExitRunner(layers, [torch.nn.Linear(4, 10)] * 5, table)
  assert runner.certificate == d and runner.budget == table.budget
  # A fallback record travels with the backbone table, and only with it.
  fb = certify.certify_units(np.ones((2, 10)), 0.02, 0.1)
  fd = report.certificate_to_dict(fb, method="recall")
  backbone = select.backbone_table(t.cost)
  _export(tmp_path, t, c, fd, "b.npz", table=backbone)
  loaded = ExitTable.load(tmp_path / "b.npz")
  assert loaded.certificate == fd and "not certified: backbone" in repr(loaded)
  assert "never exits early" in loaded.describe()
  stop, _, _ = loaded.run(t.conf, t.pred)
  assert np.all(stop == t.num_ramps - 1)
  with pytest.raises(ValueError, match="must be the backbone"):
    _export(tmp_path, t, c, fd, "bad.npz")


def _bad(d, **change):
  d = dict(d)
  for k, v in change.items():
    if v is KeyError:
      d.pop(k)
    else:
      d[k] = v
  return d


def test_bad_certificates_are_refused(certified_choice, tmp_path):
  t, c = certified_choice
  d = report.certificate_to_dict(c.certificate, method=c.best)
  fd = report.certificate_to_dict(certify.certify_units(np.ones((1, 10)), 0.02, 0.1))
  check_certificate(d)
  check_certificate(fd)
  cases = [
      (_bad(d, pvalue=0.2), r"pvalue: expected its p-value against eps, in \[0, delta\]"),
      (_bad(d, ucb=1e-9), "ucb: expected its upper confidence bound"),
      (_bad(d, eps=0.0), r"eps: expected the loss budget certified, in \(0, 1\)"),
      (_bad(d, delta=float("nan")), "delta: expected a finite number"),
      (_bad(d, test="t"), "test: expected one of"),
      (_bad(d, quantity="loss"), "quantity: expected"),
      (_bad(d, rows_sha256="abc"), "rows_sha256"),
      (_bad(d, units=0), "units: expected"),
      (_bad(d, index=True), "index: expected"),
      (_bad(d, certified="yes"), "certified: expected true or false"),
      (_bad(d, ucb=KeyError), r"missing \['ucb'\]"),
      (_bad(d, extra=1), r"unknown \['extra'\]"),
      (_bad(fd, pvalue=0.05), "pvalue: expected its p-value, above delta"),
      (_bad(fd, needed_units=0), "needed_units"),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError, match=message):
      check_certificate(bad)
    with pytest.raises(ValueError, match=message):
      _export(tmp_path, t, c, bad)
  with pytest.raises(ValueError, match="expected an object or null"):
    check_certificate([1, 2])
  with pytest.raises(ValueError, match="differs from header.budget.max_loss"):
    _export(tmp_path, t, c, _bad(d, eps=0.03))


# ---- the command line

@pytest.fixture(scope="module")
def synth_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("certified") / "synth.npz"
  jexit.save_traces(path, synth(2000, seed=8))
  return str(path)


def run(capsys, *argv):
  rc = cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_budget_certifies_by_default_and_prints_the_certificate(synth_file, tmp_path, capsys):
  out_json = tmp_path / "b.json"
  rc, out, err = run(capsys, "budget", synth_file, "--max-loss", "0.02", "--num-lambdas",
                     "40", "--json", str(out_json))
  assert rc == 0, err
  assert "1000 calibration rows" in out and "certificate: " in out and "p-value" in out
  data = json.loads(out_json.read_text())
  assert data["delta"] == cli.DEFAULT_DELTA and data["certificate"]["certified"] is True
  check_certificate(data["certificate"])
  assert data["certificate"]["rows_sha256"] in out or data["certificate"]["rows_sha256"][
      :12] in out
  assert data["uncertified"]["recall"]["param"] is not None
  rc, out, err = run(capsys, "budget", synth_file, "--max-loss", "0.02", "--num-lambdas",
                     "40", "--delta", "none", "--signal", "1-conf")
  assert rc == 0, err
  assert "not certified (--delta none): the budget holds on the fit rows only" in out
  assert "certificate:" not in out and "1000 fit / 1000 test rows" in out
  rc, out, err = run(capsys, "budget", synth_file, "--max-loss", "0.02", "--num-lambdas",
                     "40", "--folds", "2", "--signal", "1-conf")
  assert rc == 0, err
  assert "not certified (--folds: cross-fitting ships no table)" in out


@pytest.mark.parametrize("argv, message", [
    (["--delta", "0.1", "--folds", "2"], "--delta: a certified budget needs one"),
    (["--test-fraction", "0.3"], "--test-fraction: with a certified budget"),
    (["--delta", "none", "--calibration-share", "0.5"], "--calibration-share: only for"),
    (["--calibration-share", "1.5"], "--calibration-share: expected a share"),
])
def test_budget_refuses_inconsistent_flags(synth_file, capsys, argv, message):
  rc, _, err = run(capsys, "budget", synth_file, "--num-lambdas", "40", *argv)
  assert rc == 2 and message in err


def test_delta_flag_parses_none_and_refuses_bad_values(synth_file, capsys):
  with pytest.raises(SystemExit):
    cli.main(["budget", synth_file, "--delta", "1.5"])
  assert "expected a failure probability in (0, 1) or none" in capsys.readouterr().err
  assert cli.delta_arg("None") == "none" and cli.delta_arg("0.05") == 0.05


def test_export_writes_the_certificate_or_the_backbone(synth_file, tmp_path, capsys):
  path = tmp_path / "p.npz"
  rc, out, err = run(capsys, "export", synth_file, "--max-loss", "0.02", "--grid", "40",
                     "--out", str(path))
  assert rc == 0, err
  table = ExitTable.load(path)
  assert table.certificate["certified"] is True and table.certificate["eps"] == 0.02
  assert "certificate: " in out and "certified on 1000 calibration rows" in out
  # 0.1% needs 2,302 rows with no loss at all; 1,400 are held out: the backbone ships.
  rc, out, err = run(capsys, "export", synth_file, "--max-loss", "0.001", "--grid", "40",
                     "--signal", "1-conf", "--out", str(path))
  assert rc == 0, err
  table = ExitTable.load(path)
  assert table.certificate["certified"] is False and table.num_bins == 1
  assert "the backbone (never exits early)" in out and "needs at least" in out
  rc, out, err = run(capsys, "export", synth_file, "--max-loss", "0.02", "--grid", "40",
                     "--delta", "none", "--signal", "1-conf", "--out", str(path))
  assert rc == 0, err
  table = ExitTable.load(path)
  assert table.certificate is None and table.budget["max_loss"] == 0.02
  assert "not certified (--delta none)" in out and "fit rows only" in table.describe()
  rc, _, err = run(capsys, "export", synth_file, "--lam", "0.01", "--delta", "0.1",
                   "--out", str(path))
  assert rc == 2 and "--delta: a certified budget is chosen on a fit/calibration" in err
  rc, out, err = run(capsys, "export", synth_file, "--lam", "0.01", "--out", str(path))
  assert rc == 0 and ExitTable.load(path).certificate is None


def test_needed_units_table_of_the_docs():
  """docs/certify.md's table of the units a budget needs."""
  text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "docs", "certify.md"), encoding="utf-8").read()
  for eps in (0.005, 0.01, 0.02, 0.05):
    cells = [str(certify.needed_rows(eps, d)) for d in (0.05, 0.1)] + [
        str(certify.needed_units(eps, d, "wsr")) for d in (0.05, 0.1)]
    assert f"| {eps * 100:g}% | " + " | ".join(cells) + " |" in text, eps
  assert math.isclose(certify.needed_rows(0.01, 0.1), 230)
