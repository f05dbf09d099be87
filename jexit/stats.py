"""Statistics for monitoring and certification: special functions and tests.

The binomial and beta tails that Learn-then-Test (`jexit.certify`) and the
audited-loss bound (`jexit.monitor`) need, the chi-square tail and the G-test
of the drift checks, total variation and Holm's correction. numpy and the
standard library only (scipy is not a runtime dependency); every function is
tested against scipy (tests/test_stats.py).
"""

import math
import zlib
from typing import Tuple

import numpy as np

_TINY = 1e-300
_EPS = 1e-15
_MAX_ITER = 100_000

# ----- the binomial tail of certification (arrays) -----
#
# The incomplete beta by its continued fraction (modified Lentz) with Loader's
# saddle-point prefactor. Against exact sums: 1e-13 relative up to n = 1e4,
# 1e-11 at n = 1e6, 1e-9 at n = 1e7 (scipy's own error is of the same order
# there).

_STIRLING = (1 / 12, 1 / 360, 1 / 1260, 1 / 1680, 1 / 1188)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _stirlerr(n):
  """`log(n!) - log(sqrt(2 pi n) (n / e)^n)` for real n > 0, elementwise (Loader 2000)."""
  n = np.asarray(n, np.float64)
  out = np.empty_like(n)
  big = n > 15
  nn = n[big] ** 2
  s0, s1, s2, s3, s4 = _STIRLING
  out[big] = (s0 - (s1 - (s2 - (s3 - s4 / nn) / nn) / nn) / nn) / n[big]
  small = n[~big]
  lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
  out[~big] = lgamma(small + 1) - (small + 0.5) * np.log(small) + small - _LOG_SQRT_2PI
  return out


def _bd0(x, m, diff):
  """The deviance `x log(x / m) + m - x` without cancellation, elementwise (Loader 2000).

  `diff = x - m`, computed by the caller without cancellation.
  """
  near = np.abs(diff) < 0.1 * (x + m)
  with np.errstate(divide="ignore", invalid="ignore"):
    far = x * np.log(x / m) - diff
  # Near m: the series sum_j 2 x v^(2j+1) / (2j+1) with v = (x - m) / (x + m), |v| < 0.053.
  v = np.where(near, diff / (x + m), 0.0)
  s = diff * v
  term = 2 * x * v
  for j in range(1, 12):
    term = term * v * v
    s = s + term / (2 * j + 1)
  return np.where(near, s, far)


def _log_front(a, b, x, y):
  """`log(x^a (1-x)^b / (a B(a, b)))`, elementwise (a, b > 0, 0 < x < 1, y = 1 - x).

  That is `log((1 - x) dbinom(b - 1; a + b - 1, 1 - x))` for real arguments,
  by Loader's saddle-point form: no difference of large log-gammas, so it
  stays exact to ~1e-15 relative at n = 1e7 (lgamma differences lose 1e-8).
  """
  big_n, k, q = a + b - 1.0, b - 1.0, y
  log_x = np.where(x > 0.5, np.log1p(-np.minimum(y, 0.5)), np.log(np.maximum(x, _TINY)))
  out = np.empty_like(x)
  zero = k <= 0  # b == 1: dbinom(0; N, q) = x^N
  out[zero] = big_n[zero] * log_x[zero]
  kk, nn, qq, xx, aa = k[~zero], big_n[~zero], q[~zero], x[~zero], a[~zero]
  # K - N q = N x - a: take the form whose product carries less rounding.
  diff = np.where(qq < xx, kk - nn * qq, nn * xx - aa)
  lc = (_stirlerr(nn) - _stirlerr(kk) - _stirlerr(aa)
        - _bd0(kk, nn * qq, diff) - _bd0(aa, nn * xx, -diff))
  out[~zero] = lc - 0.5 * (math.log(2 * math.pi) + np.log(kk) + np.log(aa) - np.log(nn))
  return out + np.log(q)


def _beta_cf(a, b, x):
  """The continued fraction of the incomplete beta (modified Lentz), elementwise.

  Converges fast for `x < (a + 1) / (a + b + 2)`, in O(sqrt(max(a, b)))
  iterations at worst; all elements iterate together until each converged.
  """
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c = np.ones_like(x)
  d = 1.0 - qab * x / qap
  d = np.where(np.abs(d) < _TINY, _TINY, d)
  d = 1.0 / d
  h = d.copy()
  todo = np.ones(x.shape, bool)
  limit = int(50 + 10 * math.sqrt(float(np.max(np.maximum(a, b))) if a.size else 0.0))
  for m in range(1, limit + 1):
    m2 = 2.0 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 + aa * d
    d = np.where(np.abs(d) < _TINY, _TINY, d)
    c = 1.0 + aa / c
    c = np.where(np.abs(c) < _TINY, _TINY, c)
    d = 1.0 / d
    h = np.where(todo, h * d * c, h)
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 + aa * d
    d = np.where(np.abs(d) < _TINY, _TINY, d)
    c = 1.0 + aa / c
    c = np.where(np.abs(c) < _TINY, _TINY, c)
    d = 1.0 / d
    step = d * c
    h = np.where(todo, h * step, h)
    todo &= np.abs(step - 1.0) > _EPS
    if not todo.any():
      return h
  raise ArithmeticError(f"incomplete beta: the continued fraction did not converge in "
                        f"{limit} iterations (a up to {np.max(a)!r}, b up to {np.max(b)!r})")


def _betainc(a, b, x, y):
  """Regularized incomplete beta `I_x(a, b)` for a, b > 0 and x in [0, 1], elementwise.

  `y = 1 - x` is passed exactly (the caller's `p` when `x = 1 - p`), so tiny
  probabilities keep their digits.
  """
  a, b, x, y = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, x, y)))
  out = np.where(x >= 1.0, 1.0, 0.0)
  inner = (x > 0) & (y > 0)
  if inner.any():
    ai, bi, xi, yi = a[inner], b[inner], x[inner], y[inner]
    # The fraction converges fast on the near side of the mode; the far side
    # is the complement of the mirrored function: I_x(a, b) = 1 - I_{1-x}(b, a).
    flip = xi >= (ai + 1.0) / (ai + bi + 2.0)
    aa, bb = np.where(flip, bi, ai), np.where(flip, ai, bi)
    xx, yy = np.where(flip, yi, xi), np.where(flip, xi, yi)
    val = np.exp(_log_front(aa, bb, xx, yy)) * _beta_cf(aa, bb, xx)
    out[inner] = np.clip(np.where(flip, 1.0 - val, val), 0.0, 1.0)
  return out


def binomial_cdf(k, n, p) -> np.ndarray:
  """`P(Bin(n, p) <= k)`, elementwise over broadcast arrays.

  Uses `P(Bin(n, p) <= k) = I_{1-p}(n - k, k + 1)` (regularized incomplete
  beta). Relative error about 1e-13 up to n = 1e4 and 1e-9 at n = 1e7, tails
  included.

  Args:
    k: `[...]` integer counts (below 0 gives 0; n or more gives 1).
    n: `[...]` integer trials >= 1.
    p: `[...]` success probabilities in [0, 1].
  """
  k, n, p = np.broadcast_arrays(np.asarray(k, np.float64), np.asarray(n, np.float64),
                                np.asarray(p, np.float64))
  out = np.where(k >= n, 1.0, 0.0)
  mid = (k >= 0) & (k < n)
  if mid.any():
    out[mid] = _betainc(n[mid] - k[mid], k[mid] + 1.0, 1.0 - p[mid], p[mid])
  return out


# ----- the beta quantile and Clopper-Pearson bounds of monitoring (scalars) -----
#
# A second incomplete beta, one value at a time with a log-gamma prefactor:
# 1e-14 relative at n = 75, 1e-9 at n = 1e6, where `_betainc` keeps ~1e-15.
# `beta_ppf` bisects on it, one value per step: a bound of n = 2,000 audits
# takes 3 ms here and ~300 ms on `_betainc`, whose numpy form pays its
# overhead per call. Moving these onto `_betainc` would also move the bounds
# `jexit monitor` reports in their last digits.


def _betacf(a, b, x):
  """Continued fraction of the incomplete beta (Numerical Recipes, 6.4)."""
  qab, qap, qam = a + b, a + 1, a - 1
  c = 1.0
  d = 1 - qab * x / qap
  d = _TINY if abs(d) < _TINY else d
  d = 1 / d
  h = d
  for m in range(1, _MAX_ITER):
    m2 = 2 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1 + aa * d
    d = _TINY if abs(d) < _TINY else d
    c = 1 + aa / c
    c = _TINY if abs(c) < _TINY else c
    d = 1 / d
    h *= d * c
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1 + aa * d
    d = _TINY if abs(d) < _TINY else d
    c = 1 + aa / c
    c = _TINY if abs(c) < _TINY else c
    d = 1 / d
    delta = d * c
    h *= delta
    if abs(delta - 1) < _EPS:
      return h
  raise ArithmeticError(f"betainc({a}, {b}, {x}): continued fraction did not converge")


def betainc(a: float, b: float, x: float) -> float:
  """Regularized incomplete beta `I_x(a, b)`, for a, b > 0 and x in [0, 1]."""
  if not (a > 0 and b > 0):
    raise ValueError(f"a, b: expected a > 0 and b > 0, got {a!r}, {b!r}")
  if not 0 <= x <= 1:
    raise ValueError(f"x: expected a value in [0, 1], got {x!r}")
  if x == 0 or x == 1:
    return float(x)
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  # The fraction converges fast for x < (a + 1) / (a + b + 2); else use
  # I_x(a, b) = 1 - I_{1-x}(b, a).
  if x < (a + 1) / (a + b + 2):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
  """The q-quantile of Beta(a, b): x with `I_x(a, b) = q` (bisection).

  Bisection on a monotone function: slow next to Newton's method, but one
  call per report, and it cannot leave [0, 1] or diverge.
  """
  if not 0 <= q <= 1:
    raise ValueError(f"q: expected a probability in [0, 1], got {q!r}")
  if q == 0 or q == 1:
    return float(q)
  lo, hi = 0.0, 1.0
  for _ in range(2000):
    mid = 0.5 * (lo + hi)
    if mid <= lo or mid >= hi:
      break
    if betainc(a, b, mid) < q:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-15 * hi:
      break
  return 0.5 * (lo + hi)


def binom_sf_ge(d: int, n: int, p: float) -> float:
  """`Pr(Bin(n, p) >= d)` (= `I_p(d, n - d + 1)` for 1 <= d <= n)."""
  if d <= 0:
    return 1.0
  if d > n:
    return 0.0
  if p <= 0:
    return 0.0
  if p >= 1:
    return 1.0
  return betainc(d, n - d + 1, p)


def clopper_pearson(d: int, n: int, alpha: float) -> Tuple[float, float]:
  """One-sided Clopper-Pearson bounds on a binomial rate from d of n.

  Returns:
    `(lower, upper)`: `Pr(true rate < lower) <= alpha` and `Pr(true rate >
    upper) <= alpha` (so `[lower, upper]` is a 1 - 2 alpha interval).
    `lower = 0` for d = 0, `upper = 1` for d = n; (0, 1) for n = 0.
  """
  if n == 0:
    return 0.0, 1.0
  lower = 0.0 if d == 0 else beta_ppf(alpha, d, n - d + 1)
  upper = 1.0 if d == n else beta_ppf(1 - alpha, d + 1, n - d)
  return lower, upper



# ----- the chi-square tail -----

def gammaincc(a: float, x: float) -> float:
  """Regularized upper incomplete gamma `Q(a, x) = Gamma(a, x) / Gamma(a)`.

  The series for P(a, x) when x < a + 1 (Q = 1 - P there, where P is not
  close to 1), else the continued fraction for Q by the modified Lentz method
  (Numerical Recipes, 6.2), so small tails keep their relative precision.
  """
  if not a > 0:
    raise ValueError(f"a: expected a > 0, got {a!r}")
  if math.isnan(x):
    return math.nan
  if x <= 0:
    return 1.0
  if math.isinf(x):
    return 0.0
  log_front = -x + a * math.log(x) - math.lgamma(a)
  if x < a + 1:
    term = total = 1.0 / a
    ap = a
    for _ in range(_MAX_ITER):
      ap += 1
      term *= x / ap
      total += term
      if abs(term) < abs(total) * _EPS:
        return max(0.0, 1.0 - total * math.exp(log_front))
    raise ArithmeticError(f"gammaincc({a}, {x}): series did not converge")
  b = x + 1 - a
  c = 1 / _TINY
  d = 1 / b
  h = d
  for i in range(1, _MAX_ITER):
    an = -i * (i - a)
    b += 2
    d = an * d + b
    d = _TINY if abs(d) < _TINY else d
    c = b + an / c
    c = _TINY if abs(c) < _TINY else c
    d = 1 / d
    delta = d * c
    h *= delta
    if abs(delta - 1) < _EPS:
      return math.exp(log_front) * h
  raise ArithmeticError(f"gammaincc({a}, {x}): continued fraction did not converge")


def chi2_sf(x: float, df: int) -> float:
  """`Pr(chi2_df >= x)`, the chi-square survival function (1.0 for df = 0)."""
  if df == 0:
    return 1.0
  return gammaincc(df / 2.0, x / 2.0)


# ----- two-sample tests of count vectors -----

def g_test(reference_counts, live_counts) -> Tuple[float, int]:
  """Two-sample G-test of homogeneity of two count vectors over C categories.

  The 2 x C contingency table (reference row, live row), with the categories
  that neither sample hit dropped:

    G = 2 sum_{i, j} O_ij log(O_ij / E_ij),   E_ij = row_i col_j / total
    df = (number of categories hit) - 1

  Expected counts are positive wherever a category was hit, so no smoothing
  is needed and G is finite (cells with O = 0 add 0). The reference is a
  sample too: its noise is part of the null, which a one-sample test against
  the reference proportions would ignore (docs/monitor.md).

  Returns:
    `(G, df)`; `(0.0, 0)` when either sample is empty.
  """
  ref = np.asarray(reference_counts, np.float64)
  live = np.asarray(live_counts, np.float64)
  hit = (ref + live) > 0
  ref, live = ref[hit], live[hit]
  n_ref, n_live = ref.sum(), live.sum()
  if n_ref == 0 or n_live == 0:
    return 0.0, 0
  total = n_ref + n_live
  col = ref + live
  g = 0.0
  for row, n_row in ((ref, n_ref), (live, n_live)):
    o = row[row > 0]
    e = (n_row * col / total)[row > 0]
    g += float(np.sum(o * np.log(o / e)))
  return max(2.0 * g, 0.0), int(hit.sum()) - 1


def total_variation(reference_counts, live_counts) -> float:
  """Total variation distance `0.5 * sum |p_live - p_ref|` of two count
  vectors' proportions (0.0 when either is empty): the share of inputs that
  would have to move bins for the two laws to agree."""
  ref = np.asarray(reference_counts, np.float64)
  live = np.asarray(live_counts, np.float64)
  if ref.sum() == 0 or live.sum() == 0:
    return 0.0
  return float(0.5 * np.abs(live / live.sum() - ref / ref.sum()).sum())


def holm(p_values) -> np.ndarray:
  """Holm's step-down adjusted p-values (family-wise error under any dependence).

  `adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))` for the p-values
  sorted increasingly; reject where `adjusted <= alpha`.
  """
  p = np.asarray(p_values, np.float64)
  m = p.shape[0]
  order = np.argsort(p, kind="stable")
  scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
  adjusted = np.empty(m)
  adjusted[order] = np.maximum.accumulate(scaled)
  return adjusted


MIN_EXPECTED = 5.0  # below this expected count in a cell, the p-value is simulated
SIMULATIONS = 9999


def _g_rows(live, col, n_live, n_ref):
  """`[B]` G statistics of `[B, C]` live rows against reference rows `col - live`."""
  total = n_live + n_ref
  g = np.zeros(live.shape[0])
  for row, n_row in ((live, n_live), (col - live, n_ref)):
    e = n_row * col / total
    with np.errstate(divide="ignore", invalid="ignore"):
      g += np.where(row > 0, row * np.log(row / e), 0.0).sum(axis=1)
  return np.maximum(2.0 * g, 0.0)


def g_test_pvalue(reference_counts, live_counts, *, simulations: int = SIMULATIONS,
                  min_expected: float = MIN_EXPECTED) -> Tuple[float, int, float]:
  """`(G, df, p)`: the G-test with its chi-square p-value, or, when a cell's
  expected count is below `min_expected`, the exact conditional p-value
  simulated.

  With sparse cells (a ramp few inputs reach, rare bins) the chi-square law
  of G is anticonservative: on same-law streams a ramp reached by ~100
  inputs in 6 bins rejected 7% of the time at level 5%. Given the column
  totals, the live row of a 2 x C table is multivariate hypergeometric under
  the null, so `p = (1 + #{G* >= G}) / (1 + simulations)` over `simulations`
  such draws is a valid p-value at every sample size (seeded from the
  counts: the same counts give the same p).
  """
  ref = np.asarray(reference_counts, np.float64)
  live = np.asarray(live_counts, np.float64)
  g, df = g_test(ref, live)
  if df == 0:
    return g, df, 1.0
  hit = (ref + live) > 0
  ref, live = ref[hit], live[hit]
  col = ref + live
  n_ref, n_live = ref.sum(), live.sum()
  expected = np.minimum(n_ref, n_live) * col.min() / (n_ref + n_live)
  if expected >= min_expected:
    return g, df, chi2_sf(g, df)
  cols = col.astype(np.int64)
  seed = zlib.crc32(np.concatenate([cols, [int(n_live)]]).astype(np.int64).tobytes())
  rng = np.random.default_rng(seed)
  draws = rng.multivariate_hypergeometric(cols, int(n_live), size=simulations)
  sims = _g_rows(draws.astype(np.float64), col, n_live, n_ref)
  # ties: G values equal up to rounding count as "at least as extreme"
  p = (1 + int(np.sum(sims >= g * (1 - 1e-12) - 1e-12))) / (1 + simulations)
  return g, df, p
