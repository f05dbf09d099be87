"""Fits the discrete Markov exit model (PROBLEM.md) from traces."""

import collections
import hashlib
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from jexit import signals
from jexit.checks import FLOAT32_MAX, check_array
from jexit.signals import class_log_err, class_logit, class_signal
from jexit.traces import check_traces, fold_rows, own_signal, signal_values
from jexit.types import Binning, ExitModel, Traces, is_int_scalar, is_real_scalar

PAPER_STEP = 0.08
# More bins than this is a typo, not a model: trans alone is [K-1, S, S].
MAX_BINS = 10_000


def uniform_edges(num_ramps: int, step: float = PAPER_STEP,
                  lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  """`[K, S+1]` edges `lo, lo+step, ..., hi` (the paper's 0.08 grid on [0, 1])."""
  if not (is_real_scalar(step) and np.isfinite(step) and step > 0):
    raise ValueError(f"step: expected a finite positive bin width, got {step!r}")
  if (hi - lo) / step > MAX_BINS:
    raise ValueError(f"step: expected a bin width giving at most {MAX_BINS} bins on "
                     f"[{lo:g}, {hi:g}], got {step:g} ({(hi - lo) / step:.3g} bins)")
  inner = np.arange(lo + step, hi - 1e-9, step)
  edges = np.concatenate([[lo], inner, [hi]])
  return np.tile(edges, (num_ramps, 1))


def quantile_edges(values: np.ndarray, num_bins: int,
                   lo: Optional[float] = None,
                   hi: Optional[float] = None,
                   power: float = 1.0) -> np.ndarray:
  """`[K, S+1]` per-ramp edges at the quantiles of `values` `[N, K]`.

  Inner edge i sits at the quantile level `(i / S) ** power` of ramp k's
  values, i = 1..S-1: `power = 1` gives bins of equal counts; `power > 1`
  finer bins at the low end (the most confident inputs of `1 - conf`, where
  the stop thresholds of tight loss budgets sit), `power < 1` at the high end.
  Repeated quantiles (many equal values) are nudged apart so every ramp keeps
  exactly `num_bins` bins; such bins are empty and smoothing fills them.
  """
  if not is_int_scalar(num_bins) or not 1 <= num_bins <= MAX_BINS:
    raise ValueError(f"num_bins: expected an integer in [1, {MAX_BINS}], got {_show(num_bins)}")
  _check_power(power)
  values = np.asarray(values, np.float64)
  if values.ndim != 2 or values.shape[0] < 1:
    raise ValueError(f"values: expected an [N, K] array with N >= 1, got shape {values.shape}")
  k = values.shape[1]
  levels = np.linspace(0, 1, num_bins + 1)[1:-1]
  if power != 1:
    levels = levels ** float(power)
  edges = np.empty((k, num_bins + 1))
  for r in range(k):
    v = values[:, r]
    q = np.quantile(v, levels)
    lo_r = min(v.min(), q.min() if q.size else v.min()) if lo is None else lo
    hi_r = max(v.max(), q.max() if q.size else v.max()) if hi is None else hi
    e = np.concatenate([[lo_r], q, [hi_r]])
    # Strictly increasing inner edges: equal quantiles would make a bin that
    # can never be hit; spread them by a tiny amount instead.
    tiny = 1e-9 * max(1.0, abs(hi_r - lo_r))
    for i in range(1, len(e)):
      if e[i] <= e[i - 1]:
        e[i] = e[i - 1] + tiny
    edges[r] = e
  return edges


def _show(value) -> str:
  """A number as printed (`-1.0`, not `np.float64(-1.0)`), anything else as its repr."""
  return str(value) if isinstance(value, (int, float, np.number)) else repr(value)


def _check_nonnegative(name, value, what) -> None:
  if not is_real_scalar(value) or not np.isfinite(value) or value < 0:
    raise ValueError(f"{name}: expected a finite {what} >= 0, got {_show(value)}")


def _check_power(power) -> None:
  if not is_real_scalar(power) or not np.isfinite(power) or power <= 0:
    raise ValueError(f"quantile_power: expected a finite number > 0 (1: equal-count bins), "
                     f"got {power!r}")


def _isotonic_increasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Weighted least-squares nondecreasing fit (pool adjacent violators)."""
  blocks = []  # [mean, weight, length]
  for yi, wi in zip(y, w):
    blocks.append([yi, wi, 1])
    while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
      m2, w2, n2 = blocks.pop()
      m1, w1, n1 = blocks.pop()
      wt = w1 + w2
      mean = (m1 * w1 + m2 * w2) / wt if wt > 0 else (m1 + m2) / 2
      blocks.append([mean, wt, n1 + n2])
  return np.concatenate([[m] * n for m, _, n in blocks])


def _logistic_fit(feature: np.ndarray, wrong: np.ndarray, ridge: float = 1e-3,
                  steps: int = 50) -> np.ndarray:
  """Maximum-likelihood `(a, b)` of `Pr(wrong) = sigmoid(a + b * feature)` (Newton)."""
  x = np.column_stack([np.ones_like(feature), feature])
  w = np.zeros(2)
  for _ in range(steps):
    p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
    grad = x.T @ (p - wrong) + ridge * w
    hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(2)
    delta = np.linalg.solve(hess, grad)
    w -= delta
    if np.max(np.abs(delta)) < 1e-10:
      break
  return w


def _log_signal(v: np.ndarray) -> np.ndarray:
  # Confident inputs sit at v ~ 1e-4..1e-2: logs spread them out; the floor
  # keeps a conf of exactly 1 finite.
  return np.log(np.maximum(v, 1e-7))


SIGNAL_RANGES = {s.name: s.range for s in signals.REGISTRY.values() if s.range is not None}
# The "class" signal's logistic fits: ridge penalty on every weight but the
# intercept (in units of one row's log-loss), and the inner folds whose
# held-out scores the model is fitted on. Set before measuring, not tuned
# (experiments/reports/CLASS.md).
CLASS_RIDGE = 0.1
CLASS_FOLDS = 5
MAX_CLASSES = 100_000  # class ids index the weights: larger ids are a mistake, not classes


def _class_logistic(cls, log_err, same, y, num_classes: int, ridge: float) -> np.ndarray:
  """Weights `[2C+3]` of the "class" logistic regression, by damped Newton.

  The logit is `a[c] + b[c] * log_err + u * log_err + v * same + w0` for a row
  of class c (`jexit.runtime.class_logit`; `class_features`, in the same order). Penalty
  `ridge / 2 * |weights|^2` on all but w0 (barely penalised, so that a
  constant target stays finite). The Hessian is a 2x2 block per class plus 3
  shared weights: each step solves it through the shared weights' Schur
  complement, O(N + C), so models with many classes fit as fast as with few.
  """
  c, n_c = cls, num_classes
  shared = np.stack([log_err, same, np.ones_like(log_err)], axis=1)  # [N, 3]
  pen = np.concatenate([np.full(2 * n_c + 2, float(ridge)), [1e-6]])
  w = np.zeros(2 * n_c + 3)
  per = lambda v: np.bincount(c, weights=v, minlength=n_c)  # sums over each class's rows

  logits = lambda w: class_logit(w, c, log_err, same)

  def objective(w):
    z = logits(w)
    return np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * pen @ (w * w)

  current = objective(w)
  for _ in range(100):
    p = np.exp(-np.logaddexp(0.0, -logits(w)))  # sigmoid, stable
    r, d = p - y, p * (1 - p)
    grad = np.concatenate([per(r), per(r * log_err), shared.T @ r]) + pen * w
    # Per class: B_c [2, 2] (a_c, b_c) and E_c [2, 3] against the shared weights.
    b00, b01, b11 = per(d) + pen[0], per(d * log_err), per(d * log_err ** 2) + pen[0]
    e0 = np.stack([per(d * shared[:, j]) for j in range(3)], axis=1)              # [C, 3]
    e1 = np.stack([per(d * log_err * shared[:, j]) for j in range(3)], axis=1)    # [C, 3]
    det = b00 * b11 - b01 * b01
    inv = np.stack([np.stack([b11, -b01], -1), np.stack([-b01, b00], -1)], -2) / det[:, None, None]
    e = np.stack([e0, e1], axis=1)                                                # [C, 2, 3]
    g_c = np.stack([grad[:n_c], grad[n_c:2 * n_c]], axis=1)                       # [C, 2]
    inv_e = inv @ e                                                               # [C, 2, 3]
    schur = shared.T @ (shared * d[:, None]) + np.diag(pen[2 * n_c:]) - np.einsum(
        "cij,cik->jk", e, inv_e)
    rhs = grad[2 * n_c:] - np.einsum("cij,ci->j", inv_e, g_c)
    step_s = np.linalg.solve(schur, rhs)
    step_c = np.einsum("cij,cj->ci", inv, g_c - e @ step_s)                       # [C, 2]
    step = np.concatenate([step_c[:, 0], step_c[:, 1], step_s])
    t, trial = 1.0, objective(w - step)
    while trial > current and t > 1e-8:  # halve until the objective does not rise
      t *= 0.5
      trial = objective(w - t * step)
    if trial > current:  # no descent left at float precision: w is the optimum
      break
    w, done = w - t * step, current - trial < 1e-10 * (1 + abs(current))
    current = trial
    if done:
      break
  return w


def fit_class_calibration(traces: Traces, rows: Optional[Sequence[int]] = None, *,
                          ridge: float = CLASS_RIDGE) -> np.ndarray:
  """`[K-1, 2C+3]` weights of the "class" signal (`jexit.runtime.class_signal`).

  Per ramp k < K-1, a logistic regression of "ramp k's prediction equals the
  final ramp's" on `jexit.runtime.class_features` (predicted class, its
  interaction with `log(1 - conf)`, `log(1 - conf)`, agreement with the
  previous ramp), fitted on `rows` (default: all) with a ridge penalty.
  C = the largest class id predicted in those rows, plus 1.
  """
  traces = check_traces(traces)
  if rows is not None:
    traces = traces.take(np.asarray(rows))
  if not (is_real_scalar(ridge) and np.isfinite(ridge) and ridge > 0):
    raise ValueError(f"ridge: expected a finite penalty > 0, got {ridge!r}")
  pred = np.asarray(traces.pred)
  if pred.min() < 0:
    raise ValueError(f"traces.pred: expected class ids >= 0 for the 'class' signal, got "
                     f"{int(pred.min())}")
  num_classes = int(pred.max()) + 1
  if num_classes > MAX_CLASSES:
    raise ValueError(f"traces.pred: the 'class' signal keeps two weights per class id in "
                     f"[0, max id]; expected ids below {MAX_CLASSES}, got {int(pred.max())}")
  k_count = traces.num_ramps
  out = np.zeros((k_count - 1, 2 * num_classes + 3))
  for k in range(k_count - 1):
    log_err = class_log_err(traces.conf[:, k])
    same = (np.zeros(traces.num_inputs) if k == 0
            else (pred[:, k] == pred[:, k - 1]).astype(np.float64))
    out[k] = _class_logistic(pred[:, k].astype(np.int64), log_err, same,
                             (pred[:, k] == pred[:, -1]).astype(np.float64), num_classes, ridge)
  return out


def cross_fitted_class_signal(traces: Traces, *, folds: int = CLASS_FOLDS, block: int = 1,
                              ridge: float = CLASS_RIDGE) -> np.ndarray:
  """`[N, K]` "class" signal of every row, each scored by weights fitted
  without its block of rows (`folds`-fold, blocks of `block` rows kept whole).

  A model fitted on in-sample scores believes them too much: held out, its
  policies then miss their agreement target (experiments/reports/CLASS.md).
  """
  traces = check_traces(traces)
  n = traces.num_inputs
  num_blocks = -(-n // block)
  if num_blocks < 2:
    raise ValueError(f"traces: the 'class' signal cross-fits its weights and needs at least 2 "
                     f"blocks of {block} rows, got {n} rows")
  values = np.empty(traces.conf.shape)
  for fit_rows, held in fold_rows(n, min(folds, num_blocks), seed=0, block=block):
    w = fit_class_calibration(traces, fit_rows, ridge=ridge)
    values[held] = class_signal(traces.conf[held], traces.pred[held], w)
  return values


_CLASS_CACHE = collections.OrderedDict()  # key -> (calibration, cross-fitted values)


def class_scores(traces: Traces, block: int):
  """`(fit_class_calibration(traces), cross_fitted_class_signal(traces, block))`,
  memoised on the rows' contents: `frontier` fits one model per bin count on
  the same rows, and scores those rows again, so each split computes them once."""
  digest = hashlib.sha1()
  for a in (traces.conf, traces.pred):
    a = np.ascontiguousarray(a)
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(a.tobytes())
  key = (digest.hexdigest(), int(block), CLASS_FOLDS, float(CLASS_RIDGE))
  if key not in _CLASS_CACHE:
    _CLASS_CACHE[key] = (fit_class_calibration(traces),
                         cross_fitted_class_signal(traces, block=block))
    while len(_CLASS_CACHE) > 16:
      _CLASS_CACHE.popitem(last=False)
  calibration, values = _CLASS_CACHE[key]
  return calibration.copy(), values.copy()


def _signal_range(signal_range, signal_name, values, has_own_signal):
  """The outer edges `(lo, hi)` of the bins, or None for the fit rows' range."""
  if signal_range is not None:
    ok = (isinstance(signal_range, (tuple, list, np.ndarray)) and len(signal_range) == 2
          and all(is_real_scalar(v) and abs(v) <= FLOAT32_MAX for v in signal_range)
          and signal_range[0] < signal_range[1])
    if not ok:
      raise ValueError(f"signal_range: expected (lo, hi) with lo < hi within "
                       f"+-{FLOAT32_MAX:.3g} (float32's range), got {signal_range!r}")
    if not has_own_signal:
      raise ValueError(f"signal_range: sets the range of the traces' own 'signal', but the "
                       f"traces have none (the ranges of {sorted(SIGNAL_RANGES)} are "
                       f"fixed); got {signal_range!r}")
  if signal_name in SIGNAL_RANGES:  # known ranges; signal_range is the traces' signal's
    return SIGNAL_RANGES[signal_name]
  if signal_range is None:
    return None
  lo, hi = float(signal_range[0]), float(signal_range[1])
  if values.min() < lo or values.max() > hi:
    raise ValueError(f"signal_range: expected (lo, hi) containing every fit row's "
                     f"{signal_name!r} signal, got ({lo:g}, {hi:g}) with values in "
                     f"[{values.min():g}, {values.max():g}]")
  return lo, hi


def fit_rows(traces: Traces, rows: Optional[Sequence[int]] = None) -> Traces:
  """The checked traces of the fit rows `rows` (indices or a boolean mask; None: all)."""
  traces = check_traces(traces)
  n = traces.num_inputs
  if rows is None:
    return traces
  rows = np.asarray(rows)
  if rows.ndim != 1 or rows.size == 0:
    raise ValueError(f"rows: expected a non-empty 1-D index array, got shape {rows.shape}")
  if np.issubdtype(rows.dtype, np.bool_):
    if rows.shape != (n,):
      raise ValueError(f"rows: a boolean mask must have shape ({n},), got {rows.shape}")
    if not rows.any():
      raise ValueError(f"rows: expected a boolean mask selecting at least one of the "
                       f"{n} inputs, got none selected")
  elif not np.issubdtype(rows.dtype, np.integer) or rows.min() < -n or rows.max() >= n:
    raise ValueError(f"rows: expected integer indices in [0, {n}), got {rows.dtype} "
                     f"in [{rows.min()}, {rows.max()}]")
  return traces.take(rows)


def fit_signal(traces: Traces, signal: Optional[str] = None, class_block: int = 1):
  """`(name, values [N, K], calibration)`: the exit signal the model bins, its
  values on the (fit) rows of checked `traces` as the model sees them, and the
  class signal's weights (None for the others).

  The class signal's values are cross-fitted (`cross_fitted_class_signal`):
  each row is scored by weights fitted without it.
  """
  name = signal or own_signal(traces)
  if signals.get(name).needs_calibration:
    if not (is_int_scalar(class_block) and class_block >= 1):
      raise ValueError(f"class_block: expected an integer >= 1, got {class_block!r}")
    calibration, values = class_scores(traces, int(class_block))
    return name, values, calibration
  return name, signal_values(traces, name), None


def fit_edges(values: np.ndarray, span, *, bins: Union[str, np.ndarray] = "quantile",
              step: float = PAPER_STEP, num_bins: int = 32,
              quantile_power: float = 1.0) -> np.ndarray:
  """`[K, S+1]` bin edges of the fit rows' signal `values [N, K]`; `span`
  `(lo, hi)` are the outer edges, or None for the rows' range. See `fit`."""
  k = values.shape[1]
  _check_power(quantile_power)
  if quantile_power != 1 and not (isinstance(bins, str) and bins == "quantile"):
    raise ValueError(f"quantile_power: expected 1 with bins other than 'quantile' (it places "
                     f"quantile edges), got {quantile_power!r}")
  if isinstance(bins, str):
    if bins == "uniform":
      if span is None:
        edges = uniform_edges(k, step, values.min(), values.max() + step * 1e-6)
      else:
        edges = uniform_edges(k, step, *span)
    elif bins == "quantile":
      lo, hi = span if span is not None else (None, None)
      edges = quantile_edges(values, num_bins, lo, hi, power=quantile_power)
    else:
      raise ValueError(f"bins: expected 'uniform', 'quantile' or an array of edges, got {bins!r}")
  else:
    edges = np.asarray(bins)
    if edges.dtype.kind not in "iuf":
      raise ValueError(f"bins: expected real-valued edges, got dtype {edges.dtype}")
    edges = edges.astype(np.float64)
    if edges.ndim == 1:
      edges = np.tile(edges, (k, 1))
    if edges.ndim != 2 or edges.shape[0] != k or edges.shape[1] < 2:
      raise ValueError(f"bins: expected edges of shape [S+1] or [K={k}, S+1], got {edges.shape}")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges, axis=1) <= 0):
      raise ValueError("bins: expected finite, strictly increasing edges per ramp")
  return edges


def _check_transitions(k: int, s_count: int, bins, step, num_bins) -> None:
  """Refuses, before allocating, `[K-1, S, S]` transitions the host cannot hold
  (counts, smoothed counts and laws live at once), naming the option that set S."""
  if isinstance(bins, str) and bins == "uniform":
    option, value = "step", step
  elif isinstance(bins, str):
    option, value = "num_bins", num_bins
  else:
    option, value = "bins", None
  check_array(option, value, (max(k - 1, 1), s_count, s_count), np.float64, "transitions",
              copies=3, hint="use a larger step" if option == "step" else None)


def transition_counts(b: np.ndarray, num_bins: int) -> np.ndarray:
  """`[K-1, S, S]` counts of the fit rows' moves from bin a at ramp k to bin b
  at ramp k+1, from their bins `b [N, K]`."""
  k = b.shape[1]
  counts = np.zeros((max(k - 1, 0), num_bins, num_bins))
  for r in range(k - 1):
    np.add.at(counts[r], (b[:, r], b[:, r + 1]), 1.0)
  return counts


def row_laws(counts: np.ndarray) -> np.ndarray:
  """Counts `[..., S, S]` as row-stochastic laws; a row with no counts stays in
  its own bin (only possible without smoothing)."""
  counts = np.array(counts, np.float64)
  s_count = counts.shape[-1]
  empty = counts.sum(-1) == 0
  counts[empty] = np.broadcast_to(np.eye(s_count), counts.shape)[empty]
  return counts / counts.sum(-1, keepdims=True)


def loss_table(traces: Traces, values: np.ndarray, b: np.ndarray, edges: np.ndarray, *,
               loss: str = "logistic", target: str = "agreement",
               loss_smoothing: float = 1.0) -> np.ndarray:
  """`[K, S]` losses `l_k(s)` of the fit rows (checked `traces`, their signal
  `values [N, K]`, bins `b [N, K]` and `edges [K, S+1]`). See `fit`."""
  k, s_count = edges.shape[0], edges.shape[1] - 1
  if loss == "proxy":
    table = np.empty((k, s_count))
    for r in range(k):
      sums = np.bincount(b[:, r], weights=values[:, r], minlength=s_count)
      cnt = np.bincount(b[:, r], minlength=s_count)
      mid = (edges[r, :-1] + edges[r, 1:]) / 2
      table[r] = np.where(cnt > 0, sums / np.maximum(cnt, 1), mid)
  elif loss in ("calibrated", "logistic"):
    if target == "agreement":
      wrong = traces.pred != traces.pred[:, -1:]
    elif target == "label":
      if traces.label is None:
        raise ValueError("target: 'label' needs traces.label, which is None")
      wrong = traces.pred != traces.label[:, None]
    else:
      raise ValueError(f"target: expected 'agreement' or 'label', got {target!r}")
    table = np.empty((k, s_count))
    for r in range(k):
      cnt = np.bincount(b[:, r], minlength=s_count).astype(np.float64)
      if loss == "logistic":
        # A two-parameter fit per ramp: far less variance than per-bin rates
        # when a confident bin has seen one error or none.
        a, slope = _logistic_fit(_log_signal(values[:, r]), wrong[:, r].astype(np.float64))
        fitted = 1 / (1 + np.exp(-(a + slope * _log_signal(values[:, r]))))
        sums = np.bincount(b[:, r], weights=fitted, minlength=s_count)
        centre = np.sqrt(np.maximum(edges[r, :-1], 1e-7) * np.maximum(edges[r, 1:], 1e-7))
        at_centre = 1 / (1 + np.exp(-(a + slope * _log_signal(centre))))
        rate = np.where(cnt > 0, sums / np.maximum(cnt, 1), at_centre)
      else:
        err = np.bincount(b[:, r], weights=wrong[:, r].astype(np.float64), minlength=s_count)
        base = (wrong[:, r].sum() + 0.5) / (len(wrong) + 1.0)
        rate = (err + loss_smoothing * base) / np.maximum(cnt + loss_smoothing, 1e-12)
      table[r] = _isotonic_increasing(rate, cnt + loss_smoothing)
    if target == "agreement":
      # The final ramp agrees with itself: its loss is exactly 0, not a prior.
      table[-1] = 0.0
  else:
    raise ValueError(f"loss: expected 'proxy', 'calibrated' or 'logistic', got {loss!r}")
  return table


def fit(traces: Traces,
        *,
        rows: Optional[Sequence[int]] = None,
        bins: Union[str, np.ndarray] = "quantile",
        step: float = PAPER_STEP,
        num_bins: int = 32,
        loss: str = "logistic",
        target: str = "agreement",
        smoothing: float = 1.0,
        loss_smoothing: float = 1.0,
        signal: Optional[str] = None,
        signal_range: Optional[Tuple[float, float]] = None,
        class_block: int = 1) -> Tuple[ExitModel, Binning]:
  """Fits an `ExitModel` and its `Binning` on (a fit split of) `traces`.

  The defaults (32 per-ramp quantile bins, logistic-calibrated disagreement
  as the loss) won the held-out comparison of experiments/reports/QUALITY.md;
  the paper's setting is `bins="uniform", loss="proxy"`. Options that were
  measured not to help (state-conditioned transitions, parametric
  transitions, finer quantile bins at one end, transition priors and kernels)
  are `jexit.contrib.fit`'s.

  Args:
    traces: the traces; validated here.
    rows: indices of the fit rows (default: all).
    signal: the exit signal to bin (`jexit.signals.NAMES`): `"1-conf"`,
      `"stability"` (`1 - conf` plus 1 where the prediction changed since the
      previous ramp: what patience/PABEE uses, folded into one signal),
      `"class"` (1 minus a logistic estimate, fitted on these rows, that the
      ramp agrees with the final one given its confidence, its predicted class
      and whether it agrees with the previous ramp; `fit_class_calibration`;
      the model is fitted on cross-fitted scores, `cross_fitted_class_signal`,
      and the weights travel in `binning.calibration`) or `"signal"`
      (`traces.signal`). Default: `"signal"` if the traces have one, else
      `"1-conf"`.
    signal_range: `(lo, hi)`, the whole range of the traces' own signal
      (`signal="signal"`): the outer bin edges, outside which the runtimes
      refuse a value by default. Default: the fit rows' min and max; pass the
      signal's range (e.g. `(0, 1)` for a margin) so that held-out values
      beyond the fit rows' are served. The other signals' ranges are fixed
      (`jexit.signals.REGISTRY`); `signal_range` does not apply to them, and
      is an error on traces without a signal of their own.
    class_block: with `"class"`, the inner folds keep blocks of this many
      consecutive rows whole (related rows, e.g. augmented copies of one
      image, must not score each other).
    bins: `"quantile"` (per-ramp quantiles of the fit rows' signal, `num_bins`
      bins of equal counts), `"uniform"` (width `step` on [0, 1], the paper's
      0.08) or an array of edges `[S+1]` (all ramps) or `[K, S+1]`.
    step: bin width for `"uniform"`.
    num_bins: S for `"quantile"`.
    loss: `"proxy"`: `l_k(s)` = mean signal of the fit rows in bin s at ramp k
      (the bin's midpoint when empty), the paper's `1 - softmax`;
      `"calibrated"`: smoothed rate at which ramp k's prediction is wrong
      (against the final ramp or the label, see `target`) in bin s, made
      nondecreasing in s by isotonic regression; `"logistic"`: the same
      rate from a per-ramp logistic regression on `log(signal)`, averaged over
      the fit rows in each bin.
    target: `"agreement"` (wrong = differs from the final ramp) or `"label"`.
    smoothing: additive (Dirichlet) pseudo-count per cell of `init` and of
      each row of `trans` (S * smoothing per row in all), so no row is empty.
    loss_smoothing: pseudo-count pulling each calibrated bin towards the
      ramp's overall error rate.

  Returns:
    `(model, binning)`: `model.init [S]`, `trans [K-1, S, S]`, `loss [K, S]`,
    `cost [K]`; `binning.edges [K, S+1]`.

  Examples:
    >>> import numpy as np, jexit
    >>> rng = np.random.default_rng(0)
    >>> conf = rng.uniform(size=(100, 3))
    >>> t = jexit.Traces(conf, rng.integers(0, 3, (100, 3)), None, np.ones(3))
    >>> model, binning = jexit.fit(t)
    >>> model.trans.shape, binning.edges.shape
    ((2, 32, 32), (3, 33))
    >>> paper, _ = jexit.fit(t, bins="uniform", loss="proxy")  # 0.08 bins
    >>> paper.trans.shape
    (2, 13, 13)
  """
  traces = fit_rows(traces, rows)
  _check_nonnegative("smoothing", smoothing, "value")
  _check_nonnegative("loss_smoothing", loss_smoothing, "value")
  binning, values = fit_binning(traces, bins=bins, step=step, num_bins=num_bins,
                                signal=signal, signal_range=signal_range,
                                class_block=class_block)
  s_count = binning.num_bins
  _check_transitions(traces.num_ramps, s_count, bins, step, num_bins)
  b = binning.assign(values)  # [N, K]
  init_counts = np.bincount(b[:, 0], minlength=s_count) + smoothing
  if init_counts.sum() <= 0:
    raise ValueError("smoothing: 0 leaves the initial law undefined")
  init = init_counts / init_counts.sum()
  trans = row_laws(transition_counts(b, s_count) + smoothing)
  table = loss_table(traces, values, b, binning.edges, loss=loss, target=target,
                     loss_smoothing=loss_smoothing)
  return ExitModel(init=init, trans=trans, loss=table, cost=traces.cost.copy()), binning


def fit_binning(traces: Traces, *, bins="quantile", step: float = PAPER_STEP,
                num_bins: int = 32, signal: Optional[str] = None, signal_range=None,
                class_block: int = 1, quantile_power: float = 1.0):
  """`(Binning, values [N, K])`: the bins of the exit signal of the checked fit
  rows `traces`, and the values they bin (cross-fitted for "class")."""
  signal_name, values, calibration = fit_signal(traces, signal, class_block)
  span = _signal_range(signal_range, signal_name, values, traces.signal is not None)
  edges = fit_edges(values, span, bins=bins, step=step, num_bins=num_bins,
                    quantile_power=quantile_power)
  return Binning(edges=edges, signal=signal_name, calibration=calibration), values
