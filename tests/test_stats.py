"""jexit.stats: the special functions and tests of monitoring and certification,
against scipy."""

import numpy as np
import pytest
from scipy import special
from scipy import stats as scipy_stats

from jexit import stats


# ----- special functions against scipy -----

def test_gammaincc_and_chi2_sf_against_scipy():
  for a in (0.5, 1.0, 2.5, 7.0, 30.0, 250.0, 5000.0):
    for x in np.concatenate([[1e-8, 0.1], np.array([0.5, 0.9, 1.0, 1.1, 2.0, 5.0, 20.0]) * a,
                             [a + 1 - 1e-9, a + 1]]):
      got, want = stats.gammaincc(a, x), special.gammaincc(a, x)
      assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (a, x)
  for df in (1, 2, 5, 15, 63, 1000):
    for g in (0.0, 0.01, 1.0, df * 0.5, df, df * 3.0, df + 100.0, 2000.0):
      assert stats.chi2_sf(g, df) == pytest.approx(scipy_stats.chi2.sf(g, df), rel=1e-9,
                                                   abs=1e-300), (g, df)
  assert stats.chi2_sf(3.0, 0) == 1.0
  assert stats.chi2_sf(1e6, 3) == 0.0


def test_betainc_beta_ppf_clopper_pearson_and_binomial_tail_against_scipy():
  for a, b in ((0.5, 0.5), (1, 1), (2, 30), (30, 2), (1, 10**5), (300, 700), (5000, 10**6)):
    for x in (1e-9, 1e-4, 0.01, 0.3, 0.5, 0.9, 0.999):
      assert stats.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-9,
                                                     abs=1e-300), (a, b, x)
    for q in (1e-6, 0.01, 0.5, 0.99):
      assert stats.beta_ppf(q, a, b) == pytest.approx(scipy_stats.beta.ppf(q, a, b),
                                                      rel=1e-9), (q, a, b)
  for d, n in ((0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (17, 2000), (1999, 2000),
               (500, 100000)):
    for alpha in (0.001, 0.01, 0.05):
      lower, upper = stats.clopper_pearson(d, n, alpha)
      want_lower = 0.0 if d == 0 else scipy_stats.beta.ppf(alpha, d, n - d + 1)
      want_upper = 1.0 if d == n else scipy_stats.beta.ppf(1 - alpha, d + 1, n - d)
      assert lower == pytest.approx(want_lower, rel=1e-9, abs=1e-300), (d, n, alpha)
      assert upper == pytest.approx(want_upper, rel=1e-9), (d, n, alpha)
    for eps in (0.001, 0.02, 0.3):
      assert stats.binom_sf_ge(d, n, eps) == pytest.approx(
          scipy_stats.binom.sf(d - 1, n, eps), rel=1e-9, abs=1e-300), (d, n, eps)
  assert stats.clopper_pearson(0, 0, 0.01) == (0.0, 1.0)


def test_binomial_cdf_against_scipy():
  # certify's binomial tail (tests/test_certify.py covers it through binomial_pvalue)
  k = np.arange(-2, 13)
  for n, p in ((1, 0.5), (10, 1e-4), (10, 0.3), (10, 0.999)):
    got = stats.binomial_cdf(k, n, p)
    np.testing.assert_allclose(got, scipy_stats.binom.cdf(k, n, p), rtol=1e-12, atol=1e-300)
    assert got.shape == k.shape and got[0] == 0.0 and got[-1] == 1.0
  np.testing.assert_allclose(stats.binomial_cdf([[3], [40]], 400, [0.01, 0.1]),
                             scipy_stats.binom.cdf([[3], [40]], 400, [0.01, 0.1]), rtol=1e-12)


def test_g_test_against_scipy():
  rng = np.random.default_rng(8)
  for trial in range(30):
    c = int(rng.integers(2, 12))
    ref = rng.poisson(rng.uniform(0, 30, c))
    live = rng.poisson(rng.uniform(0, 300, c))
    ref[rng.integers(0, c)] = 0  # empty categories, on one side or both
    live[rng.integers(0, c)] = 0
    if trial % 3 == 0:
      ref[0] = live[0] = 0
    g, df = stats.g_test(ref, live)
    hit = (ref + live) > 0
    table = np.stack([ref, live])[:, hit]
    if table.shape[1] < 2 or table.sum(1).min() == 0:
      assert (g, df) == (0.0, 0) or df == 0
      continue
    want_g, want_p, want_df, expected = scipy_stats.chi2_contingency(
        table, correction=False, lambda_="log-likelihood")
    assert g == pytest.approx(want_g, rel=1e-10, abs=1e-12)
    assert df == want_df
    assert stats.chi2_sf(g, df) == pytest.approx(want_p, rel=1e-8, abs=1e-300)
    # The same G as a goodness of fit to the table's expected counts.
    pd_g, pd_p = scipy_stats.power_divergence(table.ravel(), expected.ravel(),
                                        ddof=table.size - 1 - df, lambda_="log-likelihood")
    assert g == pytest.approx(pd_g, rel=1e-10, abs=1e-12)
    assert stats.chi2_sf(g, df) == pytest.approx(pd_p, rel=1e-8, abs=1e-300)
  assert stats.g_test([0, 0], [3, 4]) == (0.0, 0)
  assert stats.g_test([5, 0], [3, 0]) == (0.0, 0)


def test_total_variation_and_holm():
  assert stats.total_variation([10, 10, 0], [0, 5, 5]) == pytest.approx(0.5)
  assert stats.total_variation([1, 3], [2, 6]) == 0.0
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]),
                             [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])
  np.testing.assert_allclose(stats.holm([0.2, 0.01, 0.3]), [0.4, 0.03, 0.4])


def test_one_sample_test_against_the_fit_rows_would_false_alarm():
  # Why `g_test` is two-sample: taking the fit rows' proportions as exact
  # (smoothed, one-sample G) ignores their sampling noise, and a long live
  # stream from the very same law is flagged most of the time.
  rng = np.random.default_rng(11)
  s, alpha, reps = 8, 0.01, 100
  p = rng.dirichlet(np.ones(s))
  one = two = 0
  for _ in range(reps):
    ref, live = rng.multinomial(1000, p), rng.multinomial(200_000, p)
    smoothed = (ref + 0.5) / (ref.sum() + 0.5 * s)
    _, p_one = scipy_stats.power_divergence(live, smoothed * live.sum(), lambda_="log-likelihood")
    one += p_one <= alpha
    two += stats.chi2_sf(*stats.g_test(ref, live)) <= alpha
  assert one / reps > 0.5
  assert two / reps <= alpha + 3 * np.sqrt(alpha / reps)


def test_sparse_cells_use_the_exact_conditional_p_value():
  """Few counts: the simulated p-value equals the exact conditional one
  (all live rows enumerated, multivariate hypergeometric weights)."""
  import itertools
  ref, live = np.array([3, 1, 0, 4]), np.array([0, 2, 2, 1])
  g, df, p = stats.g_test_pvalue(ref, live)
  col, n_live = ref + live, live.sum()
  exact, total = 0.0, special.comb(col.sum(), n_live)
  for row in itertools.product(*(range(c + 1) for c in col)):
    if sum(row) != n_live:
      continue
    w = np.prod([special.comb(c, r) for c, r in zip(col, row)]) / total
    if stats.g_test(col - np.array(row), row)[0] >= g - 1e-9:
      exact += w
  assert df == 3 and abs(p - exact) < 0.015, (p, exact)
  assert stats.g_test_pvalue(ref, live) == (g, df, p)  # seeded by the counts
  # plenty of counts: the chi-square tail
  big_ref, big_live = ref * 100 + 50, live * 100 + 50
  g, df, p = stats.g_test_pvalue(big_ref, big_live)
  assert p == stats.chi2_sf(g, df)


def test_false_alarm_rate_with_a_sparsely_reached_ramp():
  """Same-law counts of ~45 inputs in 6 bins (a ramp few inputs reach): the
  chi-square tail alone rejected ~8% of the time at level 5%; the simulated
  exact p-value keeps the rate at most alpha."""
  rng = np.random.default_rng(1)
  probs = np.array([0.04, 0.35, 0.43, 0.03, 0.11, 0.04])
  rejected, trials = 0, 800
  for _ in range(trials):
    a, b = (np.bincount(rng.choice(6, rng.binomial(1500, 0.03), p=probs), minlength=6)
            for _ in range(2))
    rejected += stats.g_test_pvalue(a, b, simulations=1999)[2] <= 0.05
  # mean 40 and sd 6.2 at rate 0.05; the chi-square tail gave ~66
  assert rejected <= 0.05 * trials + 2.3 * np.sqrt(0.05 * 0.95 * trials), rejected
