"""jexit.monitor: the reference, the drift and budget tests, the verdict."""

import doctest
import json

import numpy as np
import pytest

from jexit import monitor
from jexit.counters import Counters
from jexit.monitor import Reference, check, make_reference


# ----- helpers -----

def law(rng, k, s):
  """A made-up Markov law of bins and a stop rule: draws `(bins, stop)`."""
  init = rng.dirichlet(np.ones(s))
  trans = rng.dirichlet(np.ones(s), size=(k - 1, s))
  stop_prob = rng.uniform(0.1, 0.6, (k, s))

  def draw(rng, n):
    bins = np.empty((n, k), np.int64)
    bins[:, 0] = rng.choice(s, n, p=init)
    for r in range(1, k):
      u = rng.uniform(size=(n, 1))
      bins[:, r] = (u > np.cumsum(trans[r - 1][bins[:, r - 1]], axis=1)).sum(1).clip(0, s - 1)
    stops = rng.uniform(size=(n, k)) < stop_prob[np.arange(k)[None, :], bins]
    stops[:, -1] = True
    return bins, np.argmax(stops, axis=1)
  return draw


def live_counters(bins, stop, s, **kw):
  c = Counters(bins.shape[1], s, **kw)
  c.record_batch(bins, stop, stop)
  return c


# ----- the verdict -----

def hand_reference():
  occupancy = np.array([[40, 30, 20, 10], [10, 20, 20, 10], [5, 5, 10, 10]])
  stop_hist = np.array([40, 30, 30])
  return Reference(occupancy, stop_hist, 100, max_loss=0.05, certificate={"eps": 0.05})


def counters_from_counts(occupancy, stop_hist, output_hist=None, audited=0, agree=0):
  c = Counters(occupancy.shape[0], occupancy.shape[1], audit_rows=False)
  c.occupancy = np.asarray(occupancy, np.int64)
  c.stop_hist = np.asarray(stop_hist, np.int64)
  c.output_hist = np.asarray(stop_hist if output_hist is None else output_hist, np.int64)
  c.num_inputs = int(c.stop_hist.sum())
  c.audited, c.audit_agree = audited, agree
  return c.validate()


def test_verdict_ok_on_identical_proportions():
  ref = hand_reference()
  live = counters_from_counts(ref.occupancy * 50, ref.stop_hist * 50, audited=400, agree=390)
  report = check(ref, live)
  assert report.verdict == "ok" and report.exit_code == 0
  assert report.drifted == ()
  for t in report.ramps + (report.stops,):
    assert t.statistic == pytest.approx(0.0, abs=1e-9) and t.p_value == pytest.approx(1.0)
    assert t.effect == pytest.approx(0.0, abs=1e-12) and not t.drift
  assert report.budget.rate == pytest.approx(10 / 400)
  assert report.budget.lower < 0.05 and not report.budget.exceeded
  assert report.certificate == {"eps": 0.05}
  d = report.to_dict()
  assert json.loads(json.dumps(d, allow_nan=False)) == d
  assert d["ramps"][0]["live"] == 5000 and d["budget"]["audited"] == 400


def test_verdict_drift_names_the_shifted_ramp():
  ref = hand_reference()
  occupancy = ref.occupancy * 50
  occupancy[1] = np.array([25, 20, 10, 5]) * 50  # same inputs reach ramp 1, other bins
  report = check(ref, counters_from_counts(occupancy, ref.stop_hist * 50))
  assert report.verdict == "drift" and report.exit_code == 1
  assert report.drifted == (1,)
  assert [t.drift for t in report.ramps] == [False, True, False] and not report.stops.drift
  assert report.ramps[1].effect == pytest.approx(0.25) and report.ramps[1].df == 3
  assert report.ramps[1].p_adjusted <= 0.01
  assert report.budget is not None and report.budget.audited == 0  # from reference.max_loss
  assert not report.budget.exceeded and report.budget.upper == 1.0


def test_stop_histogram_drift():
  ref = hand_reference()
  stop_hist = np.array([40, 10, 50]) * 50
  occupancy = np.array([[40, 30, 20, 10], [10, 20, 20, 10], [10, 10, 15, 15]]) * 50
  report = check(ref, counters_from_counts(occupancy, stop_hist))
  assert report.stops.drift and report.verdict == "drift"
  assert report.stops.effect == pytest.approx(0.2)


def test_trivial_shift_on_a_long_stream_is_not_drift():
  ref = hand_reference()._replace(occupancy=hand_reference().occupancy * 10**4,
                                  stop_hist=hand_reference().stop_hist * 10**4,
                                  num_inputs=10**6)
  occupancy = ref.occupancy.copy()
  occupancy[0] += np.array([-10000, 10000, 0, 0])  # 1% of ramp 0's inputs moved
  live = counters_from_counts(occupancy, ref.stop_hist)
  report = check(ref, live)
  assert report.ramps[0].p_adjusted < 1e-6 and report.ramps[0].effect == pytest.approx(0.01)
  assert report.verdict == "ok"
  assert check(ref, live, min_effect=0.0).drifted == (0,)


def test_verdict_budget_exceeded_only_on_evidence():
  ref = hand_reference()
  occ, stops = ref.occupancy * 50, ref.stop_hist * 50
  report = check(ref, counters_from_counts(occ, stops, audited=500, agree=400))  # 20% > 5%
  assert report.verdict == "budget exceeded" and report.exit_code == 1
  assert report.budget.lower > 0.05 and report.budget.exceeded
  assert report.budget.p_value < 0.01
  # A few audits at 10%: the upper bound is above eps, but no evidence of excess.
  report = check(ref, counters_from_counts(occ, stops, audited=30, agree=27))
  assert report.verdict == "ok" and report.budget.upper > 0.05 > report.budget.lower
  # max_loss overrides the reference's; drift and excess together: excess wins.
  drifted = occ.copy()
  drifted[0] = np.array([10, 10, 10, 70]) * 50
  report = check(ref, counters_from_counts(drifted, stops, audited=500, agree=480),
                 max_loss=0.01)
  assert report.verdict == "budget exceeded" and report.drifted == (0,)
  assert check(ref, counters_from_counts(drifted, stops, audited=500, agree=480),
               max_loss=0.1).verdict == "drift"
  assert check(ref._replace(max_loss=None), counters_from_counts(occ, stops)).budget is None


def test_nan_signals_are_a_category():
  ref = hand_reference()
  c = counters_from_counts(ref.occupancy * 50, ref.stop_hist * 50)
  c.occupancy[0, 0] -= 1000
  c.nan[0] = 1000
  report = check(ref, c.validate())
  assert report.drifted == (0,) and report.ramps[0].df == 4
  assert report.ramps[0].effect == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), r"alpha: expected a value in \(0, 1\)"),
    (dict(alpha=True), "alpha"), (dict(min_effect=1.5), "min_effect"),
    (dict(max_loss=-0.1), "max_loss"), (dict(policy_sha256="f" * 64), "counted policy None"),
])
def test_check_argument_errors(kwargs, message):
  ref = hand_reference()
  with pytest.raises(ValueError, match=message):
    check(ref, counters_from_counts(ref.occupancy, ref.stop_hist), **kwargs)


def test_check_refuses_mismatched_inputs():
  ref = hand_reference()
  with pytest.raises(ValueError, match=r"expected shape \[K, S\] = \(3, 4\)"):
    check(ref, Counters(3, 5))
  with pytest.raises(ValueError, match="reference.stop_hist: expected counts summing"):
    check(ref._replace(num_inputs=99), Counters(3, 4))
  with pytest.raises(ValueError, match=r"reference.occupancy: expected row 2"):
    extra = np.zeros((3, 4), int)
    extra[2, 0] = 1
    check(ref._replace(occupancy=ref.occupancy + extra), Counters(3, 4))
  with pytest.raises(ValueError, match="reference.max_loss"):
    check(ref._replace(max_loss=2.0), Counters(3, 4))
  with pytest.raises(ValueError, match="reference.certificate: expected a JSON-ready"):
    check(ref._replace(certificate={"eps": np.float32(0.1)}), Counters(3, 4))
  with pytest.raises(ValueError, match="counters: expected jexit.counters.Counters"):
    check(ref, {"occupancy": ref.occupancy})


def test_reference_dict_round_trip_and_errors():
  ref = hand_reference()
  d = json.loads(json.dumps(ref.to_dict()))
  back = monitor.reference_from_dict(d)
  np.testing.assert_array_equal(back.occupancy, ref.occupancy)
  assert back._replace(occupancy=None, stop_hist=None) == ref._replace(occupancy=None,
                                                                        stop_hist=None)
  with pytest.raises(ValueError, match="reference: expected keys"):
    monitor.reference_from_dict({**d, "extra": 1})
  with pytest.raises(ValueError, match="reference.occupancy: expected a rectangular"):
    monitor.reference_from_dict({**d, "occupancy": [[1, 2], [3]]})
  with pytest.raises(ValueError, match="reference.occupancy: expected integers"):
    monitor.reference_from_dict({**d, "occupancy": [["a"] * 4] * 3})
  nan = Counters(3, 4)
  nan.update(0, [0, 1], nan=[False, True])
  nan.record_stops([0, 0], [0, 0])
  with pytest.raises(ValueError, match="counters.nan: a reference"):
    monitor.reference_from_counters(nan)


# ----- false alarms and power (Monte Carlo) -----

def test_false_alarm_rate_at_most_alpha():
  # Fit rows and live streams drawn from the same law: "drift" at most alpha
  # of the time (+ 3 Monte Carlo standard errors), even with min_effect = 0;
  # and the same for "budget exceeded" when the live loss is exactly eps.
  rng = np.random.default_rng(9)
  k, s, alpha, reps = 3, 8, 0.05, 300
  draw = law(rng, k, s)
  drift = budget = 0
  pvals = []
  for rep in range(reps):
    ref_bins, ref_stop = draw(rng, 2000)
    live_bins, live_stop = draw(rng, int(rng.choice([200, 2000, 20000])))
    live = live_counters(live_bins, live_stop, s, audit_rows=False)
    live.audited = min(int(rng.choice([50, 500, 5000])), live.num_inputs)
    live.audit_agree = live.audited - int(rng.binomial(live.audited, 0.05))
    report = check(make_reference(ref_bins, ref_stop, s), live, alpha=alpha, min_effect=0.0,
                   max_loss=0.05)
    drift += report.verdict == "drift" or bool(report.drifted) or report.stops.drift
    budget += report.budget.exceeded
    pvals.append(report.ramps[0].p_value)
  slack = 3 * np.sqrt(alpha * (1 - alpha) / reps)
  assert drift / reps <= alpha + slack
  assert budget / reps <= alpha + slack
  # The unadjusted p-values are close to uniform (the test is not just blunt).
  assert 0.5 * alpha <= np.mean(np.array(pvals) <= alpha) <= alpha + slack


def test_detects_a_shift():
  rng = np.random.default_rng(10)
  k, s = 3, 8
  draw = law(rng, k, s)
  ref_bins, ref_stop = draw(rng, 2000)
  reference = make_reference(ref_bins, ref_stop, s)
  found = 0
  for rep in range(20):
    bins, stop = draw(rng, 2000)
    bins[:, 0] = np.minimum(bins[:, 0] + (rng.uniform(size=2000) < 0.3), s - 1)  # 30% up a bin
    found += check(reference, live_counters(bins, stop, s)).ramps[0].drift
  assert found == 20


# ----- the module itself -----

def test_docstring_examples():
  result = doctest.testmod(monitor, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


# ----- repeated checks: alpha spent over looks -----

def test_spent_alpha_closed_forms_and_sum():
  assert monitor.spent_alpha(0.01) == 0.01
  assert monitor.spent_alpha(0.01, 5, 20) == pytest.approx(0.0005)
  assert monitor.spent_alpha(0.01, 1) == pytest.approx(0.01 * 6 / np.pi ** 2)
  assert monitor.spent_alpha(0.05, 3) == pytest.approx(0.05 * 6 / (9 * np.pi ** 2))
  # the unbounded schedule never spends more than alpha in total
  total = sum(monitor.spent_alpha(0.05, i) for i in range(1, 200_001))
  assert 0.05 * 0.9999 < total <= 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(look=0), "look: expected an integer >= 1"),
    (dict(look=1.5), "look: expected an integer >= 1"),
    (dict(look=True), "look: expected an integer >= 1"),
    (dict(looks=3), "looks: given"),
    (dict(look=4, looks=3), "look: expected at most looks = 3"),
    (dict(look=1, looks=0), "looks: expected an integer >= 1"),
])
def test_spent_alpha_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    monitor.spent_alpha(0.01, **kwargs)
  ref = hand_reference()
  with pytest.raises(ValueError, match=message):
    check(ref, counters_from_counts(ref.occupancy, ref.stop_hist), **kwargs)


def test_check_uses_the_spent_level():
  # A moderate shift at ramp 0: drift at alpha 0.05 in one check, not at
  # 0.05 / 20; the report says which level it used, for both families.
  h = hand_reference()
  ref = Reference(h.occupancy * 10, h.stop_hist * 10, 1000, max_loss=0.05)
  occ = h.occupancy * 30
  occ[0] = [1350, 900, 470, 280]  # reference shares 0.4, 0.3, 0.2, 0.1
  live = counters_from_counts(occ, h.stop_hist * 30, audited=300, agree=280)
  once = check(ref, live, alpha=0.05, min_effect=0.0)
  spent = check(ref, live, alpha=0.05, min_effect=0.0, look=2, looks=20)
  p = once.ramps[0].p_adjusted
  assert 0.05 / 20 < p <= 0.05  # the case this test is about
  assert once.verdict == "drift" and spent.verdict == "ok"
  assert spent.ramps[0].p_adjusted == pytest.approx(p)  # same p-value, stricter level
  assert (once.look, once.alpha_look) == (None, 0.05)
  assert (spent.look, spent.looks, spent.alpha_look) == (2, 20, 0.0025)
  assert spent.to_dict()["alpha_look"] == 0.0025
  # Clopper-Pearson bounds widen with the smaller level
  assert spent.budget.lower < once.budget.lower and spent.budget.upper > once.budget.upper


def test_repeated_checks_false_alarm_rate_spent():
  # Same-law streams checked after every batch: at level alpha per check some
  # stream alarms far more often than alpha; spending alpha over the looks
  # (planned and unbounded) keeps "any alarm over the stream" <= alpha.
  rng = np.random.default_rng(11)
  k, s, alpha, reps, looks, batch = 3, 6, 0.1, 120, 10, 400
  draw = law(rng, k, s)
  any_plain = any_planned = any_unbounded = 0
  for _ in range(reps):
    ref = make_reference(*draw(rng, 4000), s)
    live = Counters(k, s, audit_rows=False)
    plain = planned = unbounded = False
    for i in range(1, looks + 1):
      bins, stop = draw(rng, batch)
      live.record_batch(bins, stop, stop)
      flag = lambda r: r.verdict != "ok"
      plain |= flag(check(ref, live, alpha=alpha, min_effect=0.0))
      planned |= flag(check(ref, live, alpha=alpha, min_effect=0.0, look=i, looks=looks))
      unbounded |= flag(check(ref, live, alpha=alpha, min_effect=0.0, look=i))
    any_plain += plain
    any_planned += planned
    any_unbounded += unbounded
  slack = 3 * np.sqrt(alpha * (1 - alpha) / reps)
  assert any_planned / reps <= alpha + slack
  assert any_unbounded / reps <= alpha + slack
  assert any_plain / reps > alpha + slack  # what spending is for
