"""Certified budgets for `jexit.select.choose(..., delta=)`: what is certified, and how.

The rules fixed before any calibration row is read: the per-row loss a budget
bounds (`CERTIFIED_LOSS`), the calibration share (`auto_calibration_share`)
and the test (`default_certify_test`), each method's candidates from safest to
fastest (`certify_path`); then each candidate's mean loss per calibration
unit (`unit_losses`), which `jexit.certify.certify_units` tests
(docs/certify.md, experiments/reports/CERTIFIED.md).
"""

from typing import Optional

import numpy as np

from jexit import baselines, certify
from jexit.protocol import Frontier, candidate_policy
from jexit.traces import signal_values
from jexit.types import Traces, is_int_scalar, is_real_scalar


# The per-row loss a certified budget bounds, per metric: "disagreement" (the
# output differs from the final ramp's) or "harm" (the output is wrong where
# the final ramp is right; bounds the accuracy loss against the backbone).
CERTIFIED_LOSS = {"agreement": "disagreement", "accuracy": "harm"}
# Apparate's budget grid under certification (experiments/certified.py's):
# its certified path needs steps near every budget.
CERTIFY_APPARATE_BUDGETS = (0.0,) + tuple(float(b) for b in np.geomspace(0.0005, 0.2, 23))
CALIBRATION_SHARES = (0.5, 0.7)  # auto_calibration_share's choice (CERTIFIED.md)
PATH_CHUNK = 64  # candidates scored at once on the calibration rows


def default_certify_test(block: int, units: int, max_loss: float, delta: float) -> str:
  """The test a certified budget uses, fixed by the unit kind and count only.

  Independent rows (`block == 1`): the exact binomial on their 0/1 losses.
  Blocks of related rows: the betting test (`"wsr"`) on block means, valid
  and the fastest measured (CERTIFIED.md); but its capped bets need more
  units with zero loss than Hoeffding-Bentkus (`certify.needed_units`: 310
  against 230 at 1%, delta 0.1), so with fewer units than it needs,
  `"hoeffding-bentkus"`. Neither choice reads a loss: the guarantee holds.
  """
  if block == 1:
    return "binomial"
  return "wsr" if units >= certify.needed_units(max_loss, delta, "wsr") else "hoeffding-bentkus"


def _units(num_inputs: int, block: int, share: float) -> int:
  """Calibration units (blocks) `split_rows` holds out at `share`."""
  blocks = -(-num_inputs // block)
  return min(max(int(round(share * blocks)), 1), blocks - 1)


def auto_calibration_share(num_inputs: int, block: int, max_loss: float,
                           delta: float) -> float:
  """0.5, or 0.7 when 0.5 leaves fewer than twice the units `max_loss` needs
  at `delta` with zero loss (`certify.needed_rows`):
  experiments/reports/CERTIFIED.md measured 0.7 faster there (digits at 0.5%
  and 1%) and no slower elsewhere."""
  if not is_int_scalar(block) or block < 1:  # before it divides anything
    raise ValueError(f"block: expected an integer >= 1, got {block!r}")
  need = certify.needed_rows(max_loss, delta)
  low, high = CALIBRATION_SHARES
  return low if _units(num_inputs, block, low) >= 2 * need else high


def _certified_split(traces, max_loss, delta, *, folds, test_fraction, block,
                     calibration_share, certify_test):
  """Checks `choose`'s certified arguments; `(test, calibration share)`."""
  if isinstance(delta, bool) or not is_real_scalar(delta) or not 0 < delta < 1:
    raise ValueError(f"delta: expected a failure probability in (0, 1) or None, got {delta!r}")
  if folds is not None:
    raise ValueError(f"folds: a certified budget (delta) needs one fit/calibration split "
                     f"and ships one table; cross-fitting ships none, got folds={folds!r}")
  if test_fraction is not None:
    raise ValueError(f"test_fraction: with delta the held-out rows are the calibration "
                     f"rows; set their share with calibration_share, got "
                     f"test_fraction={test_fraction!r}")
  if not 0 < max_loss < 1:
    raise ValueError(f"max_loss: a certified budget must lie in (0, 1) (zero needs infinitely "
                     f"many rows; a required gain cannot be certified), got {max_loss!r}")
  allowed = certify.UNIT_TESTS if block == 1 else ("wsr", "hoeffding-bentkus")
  if certify_test is not None and certify_test not in allowed:
    raise ValueError(f"certify_test: expected one of {list(allowed)} with block={block} "
                     f"(the binomial counts independent 0/1 rows), got {certify_test!r}")
  if calibration_share is None:
    calibration_share = auto_calibration_share(traces.num_inputs, block, max_loss, delta)
  elif isinstance(calibration_share, bool) or not is_real_scalar(calibration_share) \
      or not 0 < calibration_share < 1:
    raise ValueError(f"calibration_share: expected a share in (0, 1), got "
                     f"{calibration_share!r}")
  units = _units(traces.num_inputs, block, calibration_share)
  test = certify_test or default_certify_test(block, units, max_loss, delta)
  return test, float(calibration_share)


def certify_path(fr: Frontier, method: str, index: Optional[int] = None) -> np.ndarray:
  """A method's candidates from safest to fastest, fixed before any calibration row is read.

  recall and no recall: the lam path, lam increasing (thresholds rise with
  lam: the policy stops earlier), of the candidate model (bin count) of grid
  entry `index`, the choice on the fit rows (default: the first model);
  global threshold: its threshold grid, increasing; Apparate: its budget
  grid, increasing. Returns `[Q]` indices into the method's grid.
  """
  if method in ("recall", "norecall"):
    num_lam = len(fr.lambdas)
    first = 0 if index is None else (int(index) // num_lam) * num_lam
    return first + np.arange(num_lam)
  param = np.asarray(fr.splits[0][method][0].param, np.float64)
  if param.ndim != 1:
    raise ValueError(f"method: expected a method with one number per grid entry, got "
                     f"{method!r} with param shape {param.shape}")
  return np.argsort(param, kind="stable")


def _output_ramps(fr: Frontier, method: str, idx: np.ndarray, traces: Traces,
                  cache: Optional[dict] = None) -> np.ndarray:
  """`[Q, N]` the ramp whose prediction each candidate `idx` outputs on `traces`
  (`cache`: a dict keeping the solved lam grids between calls)."""
  k = traces.num_ramps
  if method == "global_threshold":
    values = np.asarray(fr.splits[0][method][0].param, np.float64)[idx]
    ev = baselines.threshold_rule(traces, np.repeat(values[:, None], k, axis=1),
                                  return_per_input=True)
    return np.asarray(ev.output_ramp)
  if method == "apparate_greedy":
    ev = baselines.threshold_rule(traces, np.asarray(fr.apparate_thresholds[0])[idx],
                                  return_per_input=True)
    return np.asarray(ev.output_ramp)
  num_lam = len(fr.lambdas)
  out = np.zeros((len(idx), traces.num_inputs), np.int64)
  for j in np.unique(idx // num_lam):
    pos = np.flatnonzero(idx // num_lam == j)
    # The whole lam grid, as the frontier solved it (no new compiled shape).
    cache = {} if cache is None else cache
    key = (method, int(j))
    if key not in cache:
      cache[key] = candidate_policy(fr, method, int(j) * num_lam)
    policy, _, _, binning = cache[key]
    out[pos] = _replay_outputs(policy, np.asarray(idx[pos]) % num_lam, traces, binning)
  return out


def _replay_outputs(policy, lam_idx, traces: Traces, binning) -> np.ndarray:
  """`[Q, N]` output ramps of entries `lam_idx` of a solved `Policy [L]`, in numpy.

  `jexit.evaluation.evaluate`'s decision rule (tests check the two agree):
  bin each ramp's signal, best loss so far (recall; latest ramp on ties) or
  the current loss, stop at the first ramp whose value is `<=` its threshold.
  """
  values = signal_values(traces, binning.signal, "binning.signal", binning.calibration)
  bins = binning.assign(values)  # [N, K]
  loss = np.asarray(policy.loss)
  k = loss.shape[0]
  loss_in = loss[np.arange(k)[None, :], bins]  # [N, K], in the policy's dtype
  if policy.recall:
    best = np.minimum.accumulate(loss_in, axis=1)
    best_ramp = np.zeros(bins.shape, np.int64)
    for r in range(1, k):
      best_ramp[:, r] = np.where(loss_in[:, r] <= best[:, r - 1], r, best_ramp[:, r - 1])
  else:
    best, best_ramp = loss_in, np.broadcast_to(np.arange(k), bins.shape)
  threshold = np.asarray(policy.threshold)
  rows = np.arange(bins.shape[0])
  out = np.empty((len(lam_idx), bins.shape[0]), np.int64)
  step = max(1, 2**22 // max(bins.size, 1))
  for start in range(0, len(lam_idx), step):
    thr = threshold[np.asarray(lam_idx[start:start + step])]  # [q, K, S]
    stop = best[None] <= thr[:, np.arange(k)[None, :], bins]  # [q, N, K]
    stop[..., -1] = True
    ramp = np.argmax(stop, axis=-1)
    out[start:start + step] = best_ramp[rows[None, :], ramp]
  return out


def unit_losses(fr: Frontier, method: str, idx, traces: Traces, rows, *,
                metric: str = "agreement", block: int = 1,
                cache: Optional[dict] = None) -> np.ndarray:
  """`[Q, U]` mean loss (`CERTIFIED_LOSS[metric]`) of candidates `idx` of a
  method on each calibration unit: the blocks (`row // block`) of `rows`."""
  rows = np.sort(np.asarray(rows))
  sub = traces.take(rows)
  out = _output_ramps(fr, method, np.asarray(idx), sub, cache)
  pred = np.asarray(sub.pred)
  final = pred[:, -1]
  chosen = np.take_along_axis(pred, out.T, axis=1).T  # [Q, N]
  if metric == "accuracy":
    label = np.asarray(sub.label)
    loss = (chosen != label) & (final == label)[None, :]
  else:
    loss = chosen != final[None, :]
  starts = np.concatenate([[0], np.flatnonzero(np.diff(rows // block)) + 1])
  sizes = np.diff(np.concatenate([starts, [len(rows)]]))
  return np.add.reduceat(loss.astype(np.float64), starts, axis=1) / sizes
