"""Tests of jexit.certify: p-values against scipy, fixed-sequence testing on hand-made
paths, the closed forms, and Monte Carlo validity of the certified choice."""

import doctest
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats

from jexit import certify


# ---- the binomial tail

GRID_N = (1, 2, 7, 50, 460, 1000, 23_000, 10**5, 10**6)
GRID_EPS = (1e-7, 1e-4, 0.001, 0.005, 0.01, 0.02, 0.05, 0.3, 0.9, 0.999)


def _counts(n, eps):
  """Counts worth checking: small ones, around the mean, and the top."""
  around = (n * eps * np.array([0.0, 0.1, 0.5, 0.9, 1.0, 1.1, 2.0, 5.0])).astype(np.int64)
  return np.unique(np.clip(np.concatenate([np.arange(min(n, 30) + 1), around,
                                           [n - 2, n - 1, n]]), 0, n))


@pytest.mark.parametrize("n", GRID_N)
def test_binomial_pvalue_matches_scipy(n):
  for eps in GRID_EPS:
    k = _counts(n, eps)
    want = stats.binom.cdf(k, n, eps)
    got = certify.binomial_pvalue(k, n, eps)
    assert got.shape == k.shape
    # Relative, down to scipy's own underflow; 1e-9 covers n = 1e6 (1e-11 measured).
    keep = want > 1e-280
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-9, atol=0)
    assert np.all(got[~keep] < 1e-270)


def test_binomial_pvalue_broadcasts_and_checks_arguments():
  got = certify.binomial_pvalue(np.array([[0], [3]]), 400, np.array([0.01, 0.02]))
  np.testing.assert_allclose(got, stats.binom.cdf([[0], [3]], 400, [0.01, 0.02]), rtol=1e-12)
  with pytest.raises(ValueError, match=r"losses: expected integer loss counts in \[0, n"):
    certify.binomial_pvalue(0.5, 10, 0.1)
  with pytest.raises(ValueError, match="losses: expected integer"):
    certify.binomial_pvalue(11, 10, 0.1)
  with pytest.raises(ValueError, match=r"eps: expected values in \(0, 1\], got 0"):
    certify.binomial_pvalue(0, 10, 0)
  with pytest.raises(ValueError, match="n: expected an integer number of units >= 1, got 0"):
    certify.binomial_pvalue(0, 0, 0.1)
  with pytest.raises(ValueError, match="n: expected an integer"):
    certify.binomial_pvalue(0, 10.5, 0.1)


# ---- Hoeffding-Bentkus

def hb_reference(mean, n, eps):
  """Learn-then-Test's p^HB, straight from scipy."""
  a = min(mean, eps)
  kl = (0.0 if a == 0 else a * math.log(a / eps)) + (1 - a) * math.log((1 - a) / (1 - eps))
  return min(math.exp(-n * kl), math.e * stats.binom.cdf(math.ceil(n * mean - 1e-9), n, eps))


def test_hoeffding_bentkus_matches_scipy():
  for n in (5, 60, 300, 719, 5000, 10**5):
    for eps in (0.005, 0.01, 0.02, 0.05, 0.2):
      # Block means of 4 rows: multiples of 1/(4n), around eps and at 0.
      means = np.unique(np.concatenate([[0.0, 1.0 / (4 * n), 1.0 / n],
                                        np.round(eps * np.array([0.3, 0.7, 1, 1.5]) * 4 * n)
                                        / (4 * n)]))
      means = means[means <= 1]
      got = certify.hoeffding_bentkus_pvalue(means, n, eps)
      want = [hb_reference(m, n, eps) for m in means]
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
      # At zero loss it equals the binomial's (1 - eps)^n (Hoeffding's KL form).
      np.testing.assert_allclose(got[0], (1 - eps) ** n, rtol=1e-10)


def test_hoeffding_bentkus_is_never_below_the_binomial_on_0_1_units():
  """On 0/1 losses HB is valid but looser: never a smaller p-value than the exact tail."""
  n = 400
  k = np.arange(0, 40)
  for eps in (0.01, 0.05):
    assert np.all(certify.hoeffding_bentkus_pvalue(k / n, n, eps)
                  >= certify.binomial_pvalue(k, n, eps) * (1 - 1e-12))


# ---- upper confidence bounds and the closed forms

def test_ucb_binomial_is_clopper_pearson():
  for n in (10, 230, 1000, 10**5):
    k = np.unique(np.array([0, 1, 2, 5, n // 20, n // 2, n - 1, n]))
    for delta in (0.05, 0.1):
      got = certify.ucb(k, n, delta)
      want = np.where(k == n, 1.0, stats.beta.ppf(1 - delta, k + 1, np.maximum(n - k, 1)))
      np.testing.assert_allclose(got, want, rtol=1e-9)


def test_ucb_hoeffding_bentkus_inverts_its_pvalue():
  n, delta = 500, 0.1
  for mean in (0.0, 0.002, 0.01, 0.03):
    got = float(certify.ucb(mean, n, delta, "hoeffding-bentkus"))
    want = optimize.brentq(lambda e: hb_reference(mean, n, e) - delta, max(mean, 1e-9), 0.999,
                           xtol=1e-14)
    assert got == pytest.approx(want, rel=1e-7)
    # It bounds the binomial's from above (HB is looser on 0/1 units).
    assert got >= float(certify.ucb(round(mean * n), n, delta)) - 1e-12


def test_needed_rows_closed_form():
  for eps in (0.001, 0.005, 0.01, 0.02, 0.05, 0.3):
    for delta in (0.01, 0.05, 0.1, 0.2):
      n = certify.needed_rows(eps, delta)
      assert n == math.ceil(math.log(delta) / math.log(1 - eps))
      assert (1 - eps) ** n <= delta < (1 - eps) ** (n - 1)
      # Zero observed losses certify eps with n units and not with n - 1, by either test.
      for test in certify.TESTS:
        assert certify.pvalue(0, n, eps, test) <= delta
        if n > 1:
          assert certify.pvalue(0, n - 1, eps, test) > delta
  assert certify.needed_rows(0.01, 0.1) == 230
  assert certify.needed_rows(0.005, 0.1) == 460
  with pytest.raises(ValueError, match=r"delta: expected a failure probability in \(0, 1\), "
                                       r"got 1.5"):
    certify.needed_rows(0.01, 1.5)


def test_smallest_certifiable():
  for n in (100, 460, 2000):
    got = certify.smallest_certifiable(n, 0.1)
    assert got == pytest.approx(1 - 0.1 ** (1 / n), rel=1e-10)
    # It is the line between what these rows can and cannot certify.
    assert certify.certify_path([0], n, [0], got * (1 + 1e-9), 0.1) is not None
    assert certify.certify_path([0], n, [0], got * (1 - 1e-6), 0.1) is None
  assert certify.smallest_certifiable(1000, 0.1, losses=5) == pytest.approx(
      stats.beta.ppf(0.9, 6, 995), rel=1e-9)


# ---- fixed-sequence testing

@pytest.mark.parametrize("pvalues, want", [
    ([0.01, 0.05, 0.2, 0.001, 0.001], 1),  # the first p > delta stops the walk
    ([0.2, 0.001, 0.001], None),           # the safest fails: nothing
    ([], None),                            # nothing to test
    ([0.0, 0.1, 0.02], 2),                 # all accepted (p == delta accepts)
    ([0.05], 0),
    ([0.1000001], None),
])
def test_fixed_sequence_hand_made_paths(pvalues, want):
  assert certify.fixed_sequence(pvalues, 0.1) == want


def test_fixed_sequence_checks_arguments():
  with pytest.raises(ValueError, match=r"delta: expected a failure probability in \(0, 1\), "
                                       r"got 0"):
    certify.fixed_sequence([0.01], 0)
  with pytest.raises(ValueError, match=r"pvalues: expected a \[P\] array without NaN"):
    certify.fixed_sequence([0.01, np.nan], 0.1)


def test_certify_path_walks_the_given_order():
  # Candidates listed fastest first; the order walks them safest first.
  losses = np.array([40, 2, 9, 0, 30])
  order = np.array([3, 1, 2, 4, 0])
  c = certify.certify_path(losses, 1000, order, 0.02, 0.1, rows=np.arange(999, -1, -1))
  assert c.index == 2 and c.accepted == 3
  assert c.loss == pytest.approx(0.009)
  assert c.pvalue == pytest.approx(stats.binom.cdf(9, 1000, 0.02), rel=1e-12)
  assert c.ucb == pytest.approx(stats.beta.ppf(0.9, 10, 991), rel=1e-9)
  assert c.rows == 1000 and c.units == 1000 and c.block == 1
  assert c.rows_sha256 == certify.rows_sha256(np.arange(1000))  # sorted before hashing
  d = c.to_dict()
  assert json.loads(json.dumps(d)) == d
  assert d["test"] == "binomial" and d["index"] == 2 and d["eps"] == 0.02
  # A candidate left out of the order is never chosen, however good.
  assert certify.certify_path(losses, 1000, [1, 2], 0.02, 0.1).index == 2
  # Too few units: None (the caller falls back to the backbone).
  assert certify.certify_path([0, 0], 100, [0, 1], 0.01, 0.1) is None
  assert certify.certify_path(losses, 1000, [], 0.02, 0.1) is None


def test_certify_path_hoeffding_bentkus_on_block_means():
  row_loss = np.zeros((3, 2000))
  row_loss[1, :8] = 1    # two blocks of 4 wrong rows
  row_loss[2, ::50] = 1  # 40 scattered rows
  means = certify.block_losses(row_loss, 4).mean(axis=1)
  np.testing.assert_allclose(means, [0, 8 / 2000, 40 / 2000])
  c = certify.certify_path(means, 500, [0, 1, 2], 0.02, 0.1, test="hoeffding-bentkus",
                           block=4)
  assert c.index == 1 and c.units == 500 and c.rows == 2000 and c.rows_sha256 is None
  assert c.pvalue == pytest.approx(hb_reference(0.004, 500, 0.02), rel=1e-9)
  any_err = certify.block_losses(row_loss, 4, "any").sum(axis=1)
  np.testing.assert_array_equal(any_err, [0, 2, 40])


def test_certify_path_checks_arguments():
  with pytest.raises(ValueError, match=r"order: expected \[Q\] integer indices into losses "
                                       r"\[P=2\], got array\(\[0, 2\]\)"):
    certify.certify_path([0, 1], 100, [0, 2], 0.05, 0.1)
  with pytest.raises(ValueError, match="order: expected distinct"):
    certify.certify_path([0, 1], 100, [0, 0], 0.05, 0.1)
  with pytest.raises(ValueError, match="test: expected one of"):
    certify.certify_path([0, 1], 100, [0, 1], 0.05, 0.1, test="t")
  with pytest.raises(ValueError, match="mean_loss: expected values in"):
    certify.certify_path([0, 3], 100, [0, 1], 0.05, 0.1, test="hoeffding-bentkus")
  with pytest.raises(ValueError, match="row_loss: expected .* a multiple of block=4"):
    certify.block_losses(np.zeros(10), 4)
  with pytest.raises(ValueError, match="rule: expected one of"):
    certify.block_losses(np.zeros(8), 4, "max")


# ---- Monte Carlo validity

def _overshoot(true_loss, unit_losses, order, eps, delta, test, n):
  """Share of draws `[D, P]` whose certified candidate has a true loss above eps.

  The p-values of all draws are one call; a few draws also go through
  `certify_path`, which must choose the same candidate.
  """
  p = certify.pvalue(unit_losses[:, order], n, eps, test)
  chosen = [certify.fixed_sequence(row, delta) for row in p]
  for d in range(0, len(unit_losses), len(unit_losses) // 4):
    c = certify.certify_path(unit_losses[d], n, order, eps, delta, test=test)
    assert (c is None and chosen[d] is None) or c.index == order[chosen[d]]
  return np.mean([i is not None and true_loss[order[i]] > eps for i in chosen])


def test_monte_carlo_validity_on_a_lam_path():
  """A path whose true losses rise through eps; calibration rows shared by all
  candidates (nested errors, as a lam path's): overshoot share <= delta."""
  rng = np.random.default_rng(0)
  eps, delta, n, draws = 0.02, 0.1, 800, 2000
  true_loss = np.linspace(0.0, 0.05, 60)
  u = np.sort(rng.uniform(size=(draws, n)), axis=1)
  counts = np.stack([np.searchsorted(row, true_loss) for row in u])  # [draws, P]
  rate = _overshoot(true_loss, counts, np.arange(60), eps, delta, "binomial", n)
  slack = 3 * math.sqrt(delta * (1 - delta) / draws)
  assert rate <= delta + slack
  # Not vacuous: it does choose near the budget.
  assert rate > delta / 4


def test_monte_carlo_validity_stops_at_the_first_failure():
  """Past the safe candidates, 100 candidates with true loss 0.025 > eps and
  independent noise: a walk that skipped failures would find a lucky one."""
  rng = np.random.default_rng(1)
  eps, delta, n, draws = 0.02, 0.1, 1000, 1000
  true_loss = np.array([0.005] * 5 + [0.025] * 100)
  counts = rng.binomial(n, true_loss, size=(draws, len(true_loss)))
  rate = _overshoot(true_loss, counts, np.arange(len(true_loss)), eps, delta, "binomial", n)
  assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)


def test_monte_carlo_blocks_need_block_units():
  """Rows in blocks of 4 that fail together (one hard image): the binomial over
  rows is not valid; Hoeffding-Bentkus over block means is."""
  rng = np.random.default_rng(2)
  eps, delta, blocks, b, draws = 0.02, 0.1, 500, 4, 1000
  true_loss = np.linspace(0.0, 0.05, 40)
  u = rng.uniform(size=(draws, blocks))
  block_err = u[:, :, None] < true_loss[None, None, :]  # [draws, blocks, P]
  rows_err = np.repeat(block_err, b, axis=1)             # every row of a block alike
  means = rows_err.mean(axis=1)                          # [draws, P] = mean of block means
  slack = 3 * math.sqrt(delta * (1 - delta) / draws)
  order = np.arange(len(true_loss))
  hb = _overshoot(true_loss, means, order, eps, delta, "hoeffding-bentkus", blocks)
  assert hb <= delta + slack
  any_count = block_err.sum(axis=1)
  assert _overshoot(true_loss, any_count, order, eps, delta, "binomial", blocks) <= delta + slack
  naive = _overshoot(true_loss, rows_err.sum(axis=1), order, eps, delta, "binomial", blocks * b)
  assert naive > delta + slack


# ---- the module itself

def test_docstring_examples():
  result = doctest.testmod(certify, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 3 and result.failed == 0


def test_certify_imports_neither_jax_nor_scipy():
  """The runtime and the CLI may use it where only numpy is installed."""
  code = ("import sys, jexit.certify; bad = sorted(m for m in sys.modules "
          "if m.split('.')[0] in ('jax', 'scipy')); assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_critical_loss_is_the_last_certifying_loss():
  for n, eps, delta in ((1000, 0.02, 0.1), (300, 0.05, 0.05), (5000, 0.005, 0.1)):
    k = certify.critical_loss(n, eps, delta)
    p = stats.binom.cdf(np.arange(n + 1), n, eps)
    assert k * n == np.flatnonzero(p <= delta)[-1]
    j = certify.critical_loss(n, eps, delta, "hoeffding-bentkus", block=4)
    grid = np.arange(4 * n + 1) / (4 * n)
    ok = np.array([hb_reference(m, n, eps) <= delta for m in grid[:int(8 * n * eps)]])
    assert j == pytest.approx(grid[np.flatnonzero(ok)[-1]], abs=1e-12)
    assert j <= k  # HB is the looser test
  assert certify.critical_loss(229, 0.01, 0.1) is None
  assert certify.critical_loss(230, 0.01, 0.1) == 0.0


# ---- the betting test

def wsr_reference(x, eps, delta, c=0.75):
  """A plain loop over the units."""
  n = len(x)
  total, sq, cap, best = 0.0, 0.0, 1.0, 1.0
  s2_prev = 0.25
  for t, xi in enumerate(x, start=1):
    bet = min(math.sqrt(2 * math.log(1 / delta) / (n * s2_prev)), c / (1 - eps))
    cap *= 1 + bet * (eps - xi)
    best = max(best, cap)
    total += xi
    mu = (0.5 + total) / (t + 1)
    sq += (xi - mu) ** 2
    s2_prev = (0.25 + sq) / (t + 1)
  return min(1.0, 1.0 / best)


def test_wsr_pvalue_matches_a_loop_and_is_valid():
  rng = np.random.default_rng(3)
  x = rng.choice([0, 0.25, 0.5, 1.0], p=[0.97, 0.02, 0.005, 0.005], size=(5, 400))
  got = certify.wsr_pvalue(x, 0.02, 0.1)
  want = [wsr_reference(row, 0.02, 0.1) for row in x]
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert certify.wsr_pvalue(np.zeros(1000), 0.01, 0.1) < 0.1
  # Monte Carlo: block means whose true mean is exactly eps (the null's edge).
  eps, delta, draws = 0.02, 0.1, 2000
  vals = np.array([0.0, 0.25, 1.0])
  probs = np.array([1 - 0.04 - 0.01, 0.04, 0.01])  # mean 0.02
  x = rng.choice(vals, p=probs, size=(draws, 500))
  rate = np.mean(certify.wsr_pvalue(x, eps, delta) <= delta)
  assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
  with pytest.raises(ValueError, match="unit_losses: expected values in"):
    certify.wsr_pvalue([0.5, 2.0], 0.1, 0.1)


# ---- per-unit certification (what jexit.choose calls)

def test_unit_pvalues_match_the_aggregate_tests():
  rng = np.random.default_rng(0)
  rows = (rng.uniform(size=(4, 500)) < np.array([0.001, 0.004, 0.01, 0.03])[:, None]) * 1.0
  np.testing.assert_allclose(certify.unit_pvalues(rows, 0.01, 0.1),
                             stats.binom.cdf(rows.sum(1), 500, 0.01), rtol=1e-9)
  means = rows.reshape(4, 125, 4).mean(-1)
  np.testing.assert_allclose(certify.unit_pvalues(means, 0.01, 0.1, "hoeffding-bentkus"),
                             certify.hoeffding_bentkus_pvalue(means.mean(1), 125, 0.01))
  # The betting test reads the units in one seeded order, the same for every candidate.
  order = np.random.default_rng([3, 230]).permutation(125)
  np.testing.assert_allclose(certify.unit_pvalues(means, 0.01, 0.1, "wsr", seed=3),
                             certify.wsr_pvalue(means[:, order], 0.01, 0.1))
  with pytest.raises(ValueError, match="the binomial test needs 0/1 unit losses"):
    certify.unit_pvalues(means, 0.01, 0.1)
  with pytest.raises(ValueError, match="test: expected one of"):
    certify.unit_pvalues(rows, 0.01, 0.1, "z")


@pytest.mark.parametrize("test", certify.UNIT_TESTS)
def test_unit_ucb_is_where_the_pvalue_crosses_delta(test):
  rng = np.random.default_rng(1)
  x = (rng.uniform(size=(3, 400)) < np.array([0.0, 0.01, 0.05])[:, None]) * 1.0
  if test != "binomial":
    x = x.reshape(3, 100, 4).mean(-1)
  bound = certify.unit_ucb(x, 0.1, test, seed=2)
  for row, b in zip(x, bound):
    assert row.mean() <= b < 1
    p = lambda e: float(certify.unit_pvalues(row, e, 0.1, test, seed=2)[0])
    assert p(b * (1 + 1e-6)) <= 0.1 and p(b * (1 - 1e-3)) > 0.1
    if test == "wsr":  # conservative inversion: every larger eps tried certifies too
      assert all(p(e) <= 0.1 for e in np.geomspace(b, 0.99, 40))


def test_needed_units_of_the_betting_test_is_the_smallest_zero_loss_count():
  for eps, delta in ((0.01, 0.1), (0.05, 0.05), (0.002, 0.1)):
    n = certify.needed_units(eps, delta, "wsr")
    assert float(certify.wsr_pvalue(np.zeros(n), eps, delta)) <= delta
    assert float(certify.wsr_pvalue(np.zeros(n - 1), eps, delta)) > delta
    assert n > certify.needed_rows(eps, delta)  # capped bets need more than the binomial
  assert certify.needed_units(0.01, 0.1, "hoeffding-bentkus") == 230
  assert certify.smallest_budget(230, 0.1) == pytest.approx(1 - 0.1 ** (1 / 230), rel=1e-9)


def test_certify_units_walks_in_order_and_stops_at_the_first_rejection():
  n = 1000
  x = np.zeros((5, n))
  for i, k in enumerate((0, 2, 30, 1, 0)):  # a failing candidate amid passing ones
    x[i, :k] = 1
  c = certify.certify_units(x, 0.01, 0.1, index=[10, 11, 12, 13, 14], rows=np.arange(n))
  assert isinstance(c, certify.Certificate)
  assert c.index == 11 and c.accepted == 2 and c.loss == 0.002
  assert c.pvalue == pytest.approx(stats.binom.cdf(2, n, 0.01), rel=1e-9)
  assert c.ucb == pytest.approx(stats.beta.ppf(0.9, 3, n - 2), rel=1e-9)
  assert c.rows_sha256 == certify.rows_sha256(np.arange(n)) and c.rows == n
  # The first fails: nothing certified, and the record says what would.
  fb = certify.certify_units(x[[2, 0]], 0.01, 0.1, block=4, rows=np.arange(4 * n))
  assert isinstance(fb, certify.Fallback)
  assert fb.loss == 0.03 and fb.pvalue > 0.1 and fb.needed_units == 230
  assert fb.smallest_certifiable == pytest.approx(1 - 0.1 ** (1 / n), rel=1e-9)
  assert fb.units == n and fb.block == 4 and fb.rows == 4 * n
  assert json.loads(json.dumps(fb.to_dict())) == fb.to_dict()
  empty = certify.certify_units(np.zeros((0, 10)), 0.01, 0.1)
  assert isinstance(empty, certify.Fallback) and empty.loss is None
