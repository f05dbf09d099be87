"""Certified loss budgets: p-values, fixed-sequence testing and certificates.

A parameter chosen as "the fastest that meets the budget on the fit rows"
overshoots the budget on new rows about half of the time. Certification
(PROBLEM.md, "Certified budgets"; Learn-then-Test, Angelopoulos et al. 2021)
bounds that risk: with `n` calibration units that the fit never saw, order a
family's candidates from safest to fastest, compute for each the p-value of
the null "its true loss > eps" from its calibration loss, and walk the order
while the p-value is `<= delta`. The last accepted candidate then has

    Pr(true loss > eps) <= delta

over the draw of the calibration units, whatever the fit's quality.

Units and tests:
  - `"binomial"`: each unit's loss is 0/1 and units are independent (rows of a
    trace whose rows are unrelated inputs). `losses` are integer counts; the
    p-value is the exact tail `P(Bin(n, eps) <= losses)`.
  - `"hoeffding-bentkus"`: each unit's loss lies in [0, 1] (the mean loss of
    a block of B related rows, e.g. 4 augmented copies of one image, whose
    0/1 losses are dependent). `losses` are mean losses over the `n` units.
    The p-value is the smaller of Hoeffding's (in its KL form) and Bentkus's,
    as in Learn-then-Test and RCPS (Bates et al. 2021).
  With blocks, a 0/1 binomial over rows is not valid (rows of one block fail
  together: the count is over-dispersed). Two valid choices remain, both over
  the blocks: Hoeffding-Bentkus on the block means (`block_losses(..., "mean")`),
  which certifies the row loss itself, or the binomial on "any error in the
  block" (`"any"`), which certifies an upper bound of it.
  experiments/reports/CERTIFIED.md measured both, and `wsr_pvalue`, a
  betting test that reads each unit's loss (not only the mean) and so gains
  where block means are fractions.

Everything here is numpy and the standard library (no JAX, no scipy): the
binomial tail is `jexit.stats.binomial_cdf` (1e-13 relative up to n = 1e4,
1e-9 at n = 1e7).
"""

import hashlib
import math
from typing import NamedTuple, Optional

import numpy as np

from jexit.stats import binomial_cdf

TESTS = ("binomial", "hoeffding-bentkus")
BLOCK_RULES = ("mean", "any")


def _check_n(n, field="n"):
  arr = np.asarray(n)
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.any(
      ~np.isfinite(arr)) or np.any(arr < 1) or np.any(arr != np.round(arr)):
    raise ValueError(f"{field}: expected an integer number of units >= 1, got {n!r}")
  return arr.astype(np.float64)


def _check_rate(x, field, low=0.0, high=1.0, open_low=False):
  arr = np.asarray(x, dtype=np.float64) if np.issubdtype(np.asarray(x).dtype, np.number) \
      else None
  if arr is None or np.asarray(x).dtype == bool or np.any(~np.isfinite(arr)) or np.any(
      arr > high) or (np.any(arr <= low) if open_low else np.any(arr < low)):
    side = "(" if open_low else "["
    raise ValueError(f"{field}: expected values in {side}{low:g}, {high:g}], got {x!r}")
  return arr


def _check_counts(losses, n):
  arr = np.asarray(losses)
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"losses: expected integer loss counts, got {losses!r}")
  arr = arr.astype(np.float64)
  if np.any(~np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(arr < 0) \
      or np.any(arr > n):
    raise ValueError(f"losses: expected integer loss counts in [0, n={n!r}] (the binomial "
                     f"test counts 0/1 losses; pass mean losses to 'hoeffding-bentkus'), "
                     f"got {losses!r}")
  return arr


def binomial_pvalue(losses, n, eps) -> np.ndarray:
  """p-value of the null "true loss > eps" from 0/1 losses: `P(Bin(n, eps) <= losses)`.

  Args:
    losses: `[...]` integer counts of units with loss 1, in [0, n].
    n: number of (independent) calibration units, an integer >= 1.
    eps: loss budget(s) in (0, 1].

  Returns:
    `[...]` p-values in [0, 1] (broadcast shape of the arguments).

  Examples:
    >>> float(binomial_pvalue(0, 230, 0.01)) <= 0.1  # 0.99 ** 230 = 0.099
    True
  """
  n = _check_n(n)
  eps = _check_rate(eps, "eps", open_low=True)
  losses = _check_counts(losses, n)
  return binomial_cdf(losses, n, eps)


def _kl(a, b):
  """`h1(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))`, with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    t1 = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / b), 0.0)
    t2 = np.where(a < 1, (1 - a) * np.log(np.where(a < 1, 1 - a, 1.0) / (1 - b)), 0.0)
  return t1 + t2


def hoeffding_bentkus_pvalue(mean_loss, n, eps) -> np.ndarray:
  """p-value of "true mean loss > eps" from `n` units with losses in [0, 1].

  `min(exp(-n h1(min(mean, eps), eps)), e P(Bin(n, eps) <= ceil(n mean)))`:
  Hoeffding's bound in its KL form and Bentkus's (Learn-then-Test,
  Proposition 3 and 4). With zero observed loss both reduce to `(1 - eps)^n`
  and `e (1 - eps)^n`: the smaller equals the binomial p-value.

  Args:
    mean_loss: `[...]` mean loss over the n units, in [0, 1].
    n: number of independent units (e.g. blocks), an integer >= 1.
    eps: loss budget(s) in (0, 1].
  """
  n = _check_n(n)
  eps = _check_rate(eps, "eps", open_low=True)
  mean = _check_rate(mean_loss, "mean_loss")
  mean, n, eps = np.broadcast_arrays(mean, n, eps)
  hoeffding = np.exp(-n * _kl(np.minimum(mean, eps), eps))
  # n * mean is a count of rows / B: round away float dust (3.0000000000004) first.
  k = np.ceil(np.round(n * mean, 9))
  bentkus = np.e * binomial_cdf(k, n, eps)
  return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def pvalue(losses, n, eps, test: str = "binomial") -> np.ndarray:
  """`binomial_pvalue` (losses: counts) or `hoeffding_bentkus_pvalue` (losses: means)."""
  if test == "binomial":
    return binomial_pvalue(losses, n, eps)
  if test == "hoeffding-bentkus":
    return hoeffding_bentkus_pvalue(losses, n, eps)
  raise ValueError(f"test: expected one of {list(TESTS)}, got {test!r}")


def wsr_pvalue(unit_losses, eps, delta: float, c: float = 0.75) -> np.ndarray:
  """Betting p-value (Waudby-Smith and Ramdas 2023) of "true mean loss > eps".

  Reads every unit's loss in order, not only the mean: with units whose
  losses are fractions (block means) it can beat Hoeffding-Bentkus, which
  assumes the worst, 0/1, spread. The capital

      K_t = prod_{i <= t} (1 + l_i (eps - x_i))

  is a nonnegative supermartingale when the true mean is >= eps, so by
  Ville's inequality `min(1, 1 / max_t K_t)` is a valid p-value. The bet is
  the predictable plug-in `l_i = min(sqrt(2 log(1/delta) / (n s2_{i-1})),
  c / (1 - eps))`, with `s2` the running variance (prior 1/4 at weight 1).
  The order of the units must not depend on their losses (the draw's own
  order, or a seeded shuffle); `delta` only tunes the bet.

  Args:
    unit_losses: `[..., n]` per-unit losses in [0, 1], in their order.
    eps: loss budget(s) in (0, 1), broadcast against `[...]`.
    delta: the failure probability the p-value will be compared with.
    c: the largest bet as a share of the largest safe one, in (0, 1).

  Returns:
    `[...]` p-values.
  """
  _check_delta(delta)
  x = _check_rate(unit_losses, "unit_losses")
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"unit_losses: expected [..., n] with n >= 1, got shape {x.shape}")
  eps = _check_rate(eps, "eps", open_low=True)
  if np.any(eps >= 1):
    raise ValueError(f"eps: expected values in (0, 1) for the betting test, got {eps!r}")
  if not 0 < c < 1:
    raise ValueError(f"c: expected a share in (0, 1), got {c!r}")
  eps = np.asarray(eps)[..., None]
  n = x.shape[-1]
  t = np.arange(1, n + 1)
  mu = (0.5 + np.cumsum(x, axis=-1)) / (t + 1)
  s2 = (0.25 + np.cumsum((x - mu) ** 2, axis=-1)) / (t + 1)
  prev = np.concatenate([np.full(s2.shape[:-1] + (1,), 0.25), s2[..., :-1]], axis=-1)
  bet = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * prev)), c / (1 - eps))
  log_cap = np.cumsum(np.log1p(bet * (eps - x)), axis=-1)
  return np.minimum(1.0, np.exp(-np.maximum(np.max(log_cap, axis=-1), 0.0)))


def fixed_sequence(pvalues, delta: float) -> Optional[int]:
  """Fixed-sequence testing: the last position accepted walking `pvalues` in order.

  Candidates come ordered from safest to fastest; each is accepted while its
  p-value is `<= delta` and the walk stops at the first that is not, even if
  later ones are smaller (that is what keeps the family-wise error at delta
  without a multiplicity correction).

  Args:
    pvalues: `[P]` p-values in walking order.
    delta: the failure probability in (0, 1).

  Returns:
    The position (into `pvalues`) of the last accepted candidate, or None when
    the first is rejected (or there is none).

  Examples:
    >>> fixed_sequence([0.01, 0.05, 0.2, 0.01], 0.1)
    1
  """
  _check_delta(delta)
  p = np.asarray(pvalues, np.float64)
  if p.ndim != 1 or np.any(np.isnan(p)):
    raise ValueError(f"pvalues: expected a [P] array without NaN, got shape {p.shape}")
  bad = np.flatnonzero(p > delta)
  last = (bad[0] if bad.size else p.size) - 1
  return None if last < 0 else int(last)


def needed_rows(eps: float, delta: float) -> int:
  """Smallest number of units n whose zero observed losses certify `eps` at `delta`.

  `(1 - eps)^n <= delta`, i.e. `n = ceil(log(delta) / log(1 - eps))`. The
  same n for both tests: with zero loss Hoeffding-Bentkus is `(1 - eps)^n` too.
  (1% at delta = 0.1: 230 units; 0.5%: 460.)
  """
  eps = float(_check_rate(eps, "eps", open_low=True))
  _check_delta(delta)
  if eps >= 1:
    return 1
  n = max(int(math.ceil(math.log(delta) / math.log1p(-eps))), 1)
  # Float rounding of the ratio: settle on the exact smallest n.
  while n > 1 and (n - 1) * math.log1p(-eps) <= math.log(delta):
    n -= 1
  while n * math.log1p(-eps) > math.log(delta):
    n += 1
  return n


def _check_delta(delta):
  if isinstance(delta, bool) or not isinstance(
      delta, (int, float, np.floating, np.integer)) or not 0 < delta < 1:
    raise ValueError(f"delta: expected a failure probability in (0, 1), got {delta!r}")


def ucb(losses, n, delta: float, test: str = "binomial") -> np.ndarray:
  """Upper confidence bound of the true loss at level `1 - delta`, elementwise.

  The smallest `eps` whose p-value is `<= delta`: for `"binomial"` (losses:
  counts) the Clopper-Pearson upper limit, `Beta(k + 1, n - k)`'s `1 - delta`
  quantile (1 when k = n); for `"hoeffding-bentkus"` (losses: means) the
  matching Hoeffding-Bentkus bound (RCPS). The p-value falls with eps, and
  the bound is at least the zero-loss one, `1 - delta^(1/n)`: a log-spaced
  grid of 64 points between the two ends is refined 8 times (relative
  precision ~1e-13).

  Returns:
    `[...]` bounds in [0, 1]: `pvalue(losses, n, eps, test) <= delta` for
    every `eps` above the bound, and `> delta` below it.
  """
  _check_delta(delta)
  n = _check_n(n)
  if test == "binomial":
    losses = _check_counts(losses, n)
  elif test == "hoeffding-bentkus":
    losses = _check_rate(losses, "mean_loss")
  else:
    raise ValueError(f"test: expected one of {list(TESTS)}, got {test!r}")
  losses, n = np.broadcast_arrays(losses, n)
  shape = losses.shape
  losses, n = losses.ravel(), n.ravel()
  lo = np.log(-np.expm1(np.log(delta) / n) * (1 - 1e-12))  # below 1 - delta^(1/n)
  hi = np.zeros_like(lo)
  grid = np.linspace(0.0, 1.0, 65)[1:]
  for _ in range(8):
    pts = lo[:, None] + (hi - lo)[:, None] * grid[None, :]  # [.., 64] log eps
    ok = pvalue(losses[:, None], n[:, None], np.minimum(np.exp(pts), 1.0), test) <= delta
    first = np.where(ok.any(axis=1), np.argmax(ok, axis=1), 63)  # eps = 1 always passes
    rows = np.arange(len(lo))
    new_lo = np.where(first > 0, pts[rows, np.maximum(first - 1, 0)], lo)
    hi, lo = pts[rows, first], new_lo
  out = np.exp(hi)
  if test == "binomial":
    out = np.where(losses >= n, 1.0, out)
  return np.minimum(out, 1.0).reshape(shape)


def smallest_certifiable(n, delta: float, losses=0, test: str = "binomial") -> float:
  """The smallest budget `n` units with these observed `losses` can certify at `delta`.

  The `ucb` (with zero losses, `1 - delta^(1/n)`): what to tell a user whose
  calibration rows are too few for the budget they asked.
  """
  return float(ucb(losses, n, delta, test))


def critical_loss(n: int, eps: float, delta: float, test: str = "binomial",
                  block: int = 1) -> Optional[float]:
  """The largest observed mean loss with which `n` units still certify `eps` at `delta`.

  What a chooser can aim for on its fit rows before it sees the calibration
  units: a candidate certifies iff its calibration loss is at most this (the
  p-value rises with the loss). Losses are on the grid they can take: counts
  `k / n` for `"binomial"`, multiples of `1 / (block * n)` (rows over rows)
  for `"hoeffding-bentkus"` on block means.

  Returns:
    The mean loss, or None when even zero loss does not certify (`n <
    needed_rows(eps, delta)`).
  """
  _check_delta(delta)
  n_f = float(_check_n(n))
  if np.ndim(n_f):
    raise ValueError(f"n: expected one number of units, got {n!r}")
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block: expected an integer >= 1, got {block!r}")
  steps = int(n_f) * (1 if test == "binomial" else int(block))
  loss = lambda j: j if test == "binomial" else j / steps
  ok = lambda j: float(pvalue(loss(j), n_f, eps, test)) <= delta
  if not ok(0):
    return None
  lo, hi = 0, steps  # ok(lo); find the last ok j by bisection (the p-value rises with j)
  if ok(hi):
    return 1.0
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo / steps


def rows_sha256(rows) -> str:
  """sha256 (hex) of the sorted row indices as little-endian int64 bytes."""
  rows = np.asarray(rows)
  if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
    raise ValueError(f"rows: expected a [N] array of integer row indices, got "
                     f"shape {rows.shape} dtype {rows.dtype}")
  return hashlib.sha256(np.sort(rows).astype("<i8").tobytes()).hexdigest()


def block_losses(row_loss, block: int, rule: str = "mean") -> np.ndarray:
  """Per-unit losses `[..., N / B]` of rows that come in blocks of `B` related rows.

  Args:
    row_loss: `[..., N]` 0/1 (or [0, 1]) loss of each row; rows of a block
      are consecutive and N is a multiple of B.
    block: B, rows per block (1: every row is a unit).
    rule: `"mean"` (the block's mean loss: for Hoeffding-Bentkus; its
      expectation is the row loss) or `"any"` (1 if any row of the block has
      a loss: 0/1, for the binomial; its expectation bounds the row loss
      from above).
  """
  x = np.asarray(row_loss, np.float64)
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block: expected an integer >= 1, got {block!r}")
  if x.ndim < 1 or x.shape[-1] % block:
    raise ValueError(f"row_loss: expected [..., N] with N a multiple of block={block}, got "
                     f"shape {x.shape}")
  if rule not in BLOCK_RULES:
    raise ValueError(f"rule: expected one of {list(BLOCK_RULES)}, got {rule!r}")
  x = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))
  return x.mean(-1) if rule == "mean" else (x.max(-1) > 0).astype(np.float64)


class Certificate(NamedTuple):
  """A certified choice: `Pr(true loss of candidate `index` > eps) <= delta`.

  Attributes:
    eps: the loss budget certified.
    delta: the failure probability.
    test: `"binomial"`, `"hoeffding-bentkus"` or `"wsr"` (`UNIT_TESTS`).
    index: the accepted candidate (an index into the caller's `[P]` arrays).
    units: n, the independent calibration units (rows, or blocks).
    block: rows per unit (1: rows are the units).
    rows: number of calibration rows (`units * block` when every block is whole).
    rows_sha256: sha256 of the sorted calibration row indices (None if not given).
    loss: the accepted candidate's observed mean loss on the calibration units.
    ucb: its upper confidence bound at `1 - delta` (`jexit.certify.ucb`).
    pvalue: its p-value against `eps`.
    accepted: how many candidates the walk accepted (the last is `index`).
  """
  eps: float
  delta: float
  test: str
  index: int
  units: int
  block: int
  rows: int
  rows_sha256: Optional[str]
  loss: float
  ucb: float
  pvalue: float
  accepted: int

  def to_dict(self) -> dict:
    """JSON-ready: plain Python floats, ints and strings."""
    out = {}
    for k, v in self._asdict().items():
      if isinstance(v, (np.floating, float)):
        v = float(v)
      elif isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        v = int(v)
      out[k] = v
    return out


def certify_path(losses, n, order, eps: float, delta: float, *, test: str = "binomial",
                 rows=None, block: int = 1) -> Optional[Certificate]:
  """Certifies the fastest candidate of a path by fixed-sequence testing.

  Walks `order` (safest to fastest, fixed without looking at the calibration
  units: a lam path by increasing lam, or the fit rows' cost, decreasing),
  accepts while `pvalue(losses[i], n, eps, test) <= delta`, and certifies the
  last accepted candidate.

  Args:
    losses: `[P]` calibration loss of each candidate: integer counts of units
      with loss 1 for `"binomial"`, mean losses in [0, 1] for
      `"hoeffding-bentkus"`.
    n: the number of calibration units (independent rows, or blocks).
    order: `[Q]` candidate indices into `losses`, safest first (Q <= P; the
      others are never considered).
    eps: loss budget in (0, 1].
    delta: failure probability in (0, 1).
    test: one of `TESTS`.
    rows: `[R]` calibration row indices, hashed into the certificate.
    block: rows per unit, for the record.

  Returns:
    A `Certificate`, or None when the safest candidate already fails (too few
    units for `eps`: see `needed_rows`, `smallest_certifiable`); the caller
    then falls back to the backbone, never to an uncertified candidate.

  Examples:
    >>> c = certify_path([0, 1, 3, 9], 1000, [0, 1, 2, 3], 0.01, 0.1)
    >>> c.index, round(c.ucb, 4)
    (2, 0.0067)
  """
  _check_delta(delta)
  eps_v = float(_check_rate(eps, "eps", open_low=True))
  n_units = _check_n(n)
  if n_units.ndim:
    raise ValueError(f"n: expected one number of units, got {n!r}")
  losses = np.asarray(losses)
  if losses.ndim != 1:
    raise ValueError(f"losses: expected a [P] array, got shape {losses.shape}")
  order = np.asarray(order)
  if order.ndim != 1 or (order.size and (not np.issubdtype(order.dtype, np.integer)
                                          or order.min() < -len(losses)
                                          or order.max() >= len(losses))):
    raise ValueError(f"order: expected [Q] integer indices into losses [P={len(losses)}], "
                     f"got {order!r}")
  if len(np.unique(order)) != order.size:
    raise ValueError(f"order: expected distinct candidate indices, got {order!r}")
  p = pvalue(losses[order], n_units, eps_v, test) if order.size else np.zeros(0)
  last = fixed_sequence(p, delta)
  if last is None:
    return None
  index = int(order[last])
  loss = float(losses[index]) / (float(n_units) if test == "binomial" else 1.0)
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block: expected an integer >= 1, got {block!r}")
  num_rows = int(n_units) * int(block) if rows is None else int(np.asarray(rows).size)
  return Certificate(
      eps=eps_v, delta=float(delta), test=test, index=index, units=int(n_units),
      block=int(block), rows=num_rows, rows_sha256=None if rows is None else rows_sha256(rows),
      loss=loss, ucb=float(ucb(losses[index], n_units, delta, test)), pvalue=float(p[last]),
      accepted=last + 1)


# ---- certification from per-unit losses (what `jexit.select.choose` calls)

UNIT_TESTS = ("binomial", "hoeffding-bentkus", "wsr")


def _check_unit_test(test):
  if test not in UNIT_TESTS:
    raise ValueError(f"test: expected one of {list(UNIT_TESTS)}, got {test!r}")


def _unit_array(unit_losses, test):
  """`[Q, n]` float64 per-unit losses in [0, 1] (0/1 for the binomial)."""
  x = _check_rate(unit_losses, "unit_losses")
  if x.ndim not in (1, 2) or x.shape[-1] < 1:
    raise ValueError(f"unit_losses: expected [n] or [Q, n] losses with n >= 1, got shape "
                     f"{x.shape}")
  if test == "binomial" and np.any((x != 0) & (x != 1)):
    raise ValueError("unit_losses: the binomial test needs 0/1 unit losses (independent "
                     "rows); pass block means to 'wsr' or 'hoeffding-bentkus'")
  return np.atleast_2d(x)


def _unit_order(n, seed):
  """The seeded order the betting test reads units in (never their losses)."""
  return np.random.default_rng([seed, 230]).permutation(n)


def unit_pvalues(unit_losses, eps: float, delta: float, test: str = "binomial", *,
                 seed: int = 0) -> np.ndarray:
  """p-values of "true mean loss > eps" for each candidate, from per-unit losses.

  Args:
    unit_losses: `[Q, n]` (or `[n]`) loss of each candidate on each of `n`
      independent calibration units: 0/1 per row for `"binomial"`, a block's
      mean loss in [0, 1] for `"hoeffding-bentkus"` and `"wsr"`.
    eps: the loss budget in (0, 1).
    delta: the failure probability (tunes the betting test's bets).
    test: one of `UNIT_TESTS`.
    seed: seeds the order in which `"wsr"` reads the units (one order for
      every candidate, fixed before any loss is read).

  Returns:
    `[Q]` p-values (`[1]` for a `[n]` input).
  """
  _check_unit_test(test)
  _check_delta(delta)
  x = _unit_array(unit_losses, test)
  n = x.shape[-1]
  if test == "binomial":
    return binomial_pvalue(np.round(x.sum(-1)), n, eps)
  if test == "hoeffding-bentkus":
    return hoeffding_bentkus_pvalue(np.clip(x.mean(-1), 0.0, 1.0), n, eps)
  return wsr_pvalue(x[:, _unit_order(n, seed)], eps, delta)


def unit_ucb(unit_losses, delta: float, test: str = "binomial", *, seed: int = 0) -> np.ndarray:
  """Upper confidence bounds `[Q]` of the true mean loss, at level `1 - delta`.

  `"binomial"` and `"hoeffding-bentkus"`: `ucb`. `"wsr"`: the betting
  p-value is not always monotone in eps, so the bound is inverted
  conservatively: the smallest eps above which every eps tried (a 256-point
  log grid on [1e-6, 1 - 1e-6], then 30 bisection steps below the first
  point of the accepted tail) has a p-value `<= delta`; 1 when none has.
  """
  _check_unit_test(test)
  _check_delta(delta)
  x = _unit_array(unit_losses, test)
  n = x.shape[-1]
  if test == "binomial":
    return ucb(np.round(x.sum(-1)), n, delta, "binomial")
  if test == "hoeffding-bentkus":
    return ucb(np.clip(x.mean(-1), 0.0, 1.0), n, delta, "hoeffding-bentkus")
  x = x[:, _unit_order(n, seed)]
  grid = np.geomspace(1e-6, 1 - 1e-6, 256)
  step = max(1, int(2**21 // n))  # grid points per call: about 2^21 values at once
  out = np.ones(len(x))
  for j, row in enumerate(x):
    ok = np.concatenate([wsr_pvalue(row[None, :], grid[g:g + step], delta) <= delta
                         for g in range(0, len(grid), step)])
    tail = np.flip(np.cumprod(np.flip(ok))).astype(bool)  # ok from here on
    if not tail.any():
      continue
    first = int(np.argmax(tail))
    if first == 0:
      out[j] = grid[0]
      continue
    lo, hi = grid[first - 1], grid[first]
    for _ in range(30):
      mid = math.sqrt(lo * hi)
      lo, hi = (lo, mid) if float(wsr_pvalue(row, mid, delta)) <= delta else (mid, hi)
    out[j] = hi
  return out


def needed_units(eps: float, delta: float, test: str = "binomial") -> int:
  """Smallest number of units whose zero observed losses certify `eps` at `delta`.

  `needed_rows` for `"binomial"` and `"hoeffding-bentkus"`. For `"wsr"`, whose
  bets are capped at `0.75 / (1 - eps)`, more: searched from the lower bound
  `log(1/delta) / log(1 + 0.75 eps / (1 - eps))` up (1% at delta 0.1: 307).
  """
  _check_unit_test(test)
  if test != "wsr":
    return needed_rows(eps, delta)
  eps = float(_check_rate(eps, "eps", open_low=True))
  _check_delta(delta)
  if eps >= 1:
    raise ValueError(f"eps: expected a value in (0, 1) for the betting test, got {eps!r}")
  ok = lambda m: float(wsr_pvalue(np.zeros(m), eps, delta)) <= delta
  n = max(1, int(math.floor(math.log(1 / delta) / math.log1p(0.75 * eps / (1 - eps)))))
  while not ok(n):
    n = n + max(1, n // 64)
  lo = max(1, n - max(1, n // 64))
  while lo < n and not ok(lo):  # settle on the smallest n of the last step
    lo += 1
  return lo


def smallest_budget(n: int, delta: float, test: str = "binomial") -> float:
  """The smallest budget `n` units can certify at `delta` (all losses zero)."""
  n = int(_check_n(n))
  return float(unit_ucb(np.zeros(n), delta, test)[0])


class Fallback(NamedTuple):
  """Nothing certified: the safest candidate's p-value was above delta.

  The caller ships the backbone (a table that never exits early), never an
  uncertified candidate.

  Attributes:
    eps, delta, test, units, block, rows, rows_sha256: as in `Certificate`.
    needed_units: units that `eps` needs at `delta` even with zero loss
      (`needed_units`).
    smallest_certifiable: the smallest budget these units can certify
      (all losses zero; `smallest_budget`).
    loss: the safest candidate's observed mean loss (None: empty path).
    ucb: its upper confidence bound, the budget it alone would certify.
    pvalue: its p-value against `eps` (> delta).
  """
  eps: float
  delta: float
  test: str
  units: int
  block: int
  rows: int
  rows_sha256: Optional[str]
  needed_units: int
  smallest_certifiable: float
  loss: Optional[float]
  ucb: Optional[float]
  pvalue: Optional[float]

  def to_dict(self) -> dict:
    """JSON-ready: plain Python floats, ints, strings and None."""
    return Certificate.to_dict(self)


def certify_units(unit_losses, eps: float, delta: float, *, test: str = "binomial",
                  index=None, rows=None, block: int = 1, seed: int = 0):
  """Fixed-sequence certification of a path from per-unit losses.

  Args:
    unit_losses: `[Q, n]` per-unit losses of the path's candidates, in
      walking order (safest first; the order fixed without the calibration
      units), as for `unit_pvalues`.
    eps, delta, test, seed: as for `unit_pvalues`.
    index: `[Q]` the caller's ids of the candidates (default `arange(Q)`);
      the certificate's `index` is one of them.
    rows: the calibration row indices, hashed into the record.
    block: rows per unit, for the record.

  Returns:
    A `Certificate` of the last accepted candidate, or a `Fallback` when the
    first is rejected (or the path is empty).
  """
  _check_unit_test(test)
  _check_delta(delta)
  eps_v = float(_check_rate(eps, "eps", open_low=True))
  x = _check_rate(unit_losses, "unit_losses")
  if x.ndim != 2 or x.shape[1] < 1:
    raise ValueError(f"unit_losses: expected [Q, n] losses with n >= 1, got shape {x.shape}")
  q, n = x.shape
  index = np.arange(q) if index is None else np.asarray(index)
  if index.shape != (q,):
    raise ValueError(f"index: expected [Q={q}] candidate ids, got shape {index.shape}")
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block: expected an integer >= 1, got {block!r}")
  num_rows = n * int(block) if rows is None else int(np.asarray(rows).size)
  digest = None if rows is None else rows_sha256(rows)
  p = unit_pvalues(x, eps_v, delta, test, seed=seed) if q else np.zeros(0)
  last = fixed_sequence(p, delta)
  common = dict(eps=eps_v, delta=float(delta), test=test, units=int(n), block=int(block),
                rows=num_rows, rows_sha256=digest)
  if last is None:
    safe = {} if not q else dict(loss=float(x[0].mean()),
                                 ucb=float(unit_ucb(x[0], delta, test, seed=seed)[0]),
                                 pvalue=float(p[0]))
    return Fallback(**common, needed_units=needed_units(eps_v, delta, test),
                    smallest_certifiable=smallest_budget(n, delta, test),
                    **{"loss": None, "ucb": None, "pvalue": None, **safe})
  return Certificate(**common, index=int(index[last]), loss=float(x[last].mean()),
                     ucb=float(unit_ucb(x[last], delta, test, seed=seed)[0]),
                     pvalue=float(p[last]), accepted=last + 1)
