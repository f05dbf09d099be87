"""Fits the discrete Markov exit model (PROBLEM.md) from traces."""

import collections
import functools
import hashlib
import math
from statistics import NormalDist
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from jexit import signals
from jexit.signals import class_log_err, class_logit, class_signal
from jexit.traces import check_traces, fold_rows, own_signal, signal_values
from jexit.types import Binning, ExitModel, Traces, is_int_scalar, is_real_scalar

PAPER_STEP = 0.08
PARAMETRIC_STEPS = 1000  # Adam steps of the parametric transition fit
# More bins than this is a typo, not a model: trans alone is [K-1, S, S].
MAX_BINS = 10_000


def uniform_edges(num_ramps: int, step: float = PAPER_STEP,
                  lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  """`[K, S+1]` edges `lo, lo+step, ..., hi` (the paper's 0.08 grid on [0, 1])."""
  if not step > 0:
    raise ValueError(f"step: expected a positive bin width, got {step}")
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


def _smooth_counts(counts: np.ndarray, width: float) -> np.ndarray:
  """Counts `[S, S]` blurred with a Gaussian kernel of `width` bins on both axes."""
  if width <= 0:
    return counts
  idx = np.arange(counts.shape[0])
  kernel = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / width) ** 2)
  kernel /= kernel.sum(axis=1, keepdims=True)
  return kernel @ counts @ kernel.T


SIGNAL_RANGES = {s.name: s.range for s in signals.REGISTRY.values() if s.range is not None}
# The "class" signal's logistic fits: ridge penalty on every weight but the
# intercept (in units of one row's log-loss), and the inner folds whose
# held-out scores the model is fitted on. Set before measuring, not tuned
# (experiments/CLASS.md).
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
  policies then miss their agreement target (experiments/CLASS.md).
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
          and all(is_real_scalar(v) and np.isfinite(v) for v in signal_range)
          and signal_range[0] < signal_range[1])
    if not ok:
      raise ValueError(f"signal_range: expected (lo, hi) with finite lo < hi, "
                       f"got {signal_range!r}")
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


def fit(traces: Traces,
        *,
        rows: Optional[Sequence[int]] = None,
        bins: Union[str, np.ndarray] = "quantile",
        step: float = PAPER_STEP,
        num_bins: int = 32,
        quantile_power: float = 1.0,
        loss: str = "logistic",
        target: str = "agreement",
        smoothing: float = 1.0,
        prior: str = "uniform",
        kernel: float = 0.0,
        loss_smoothing: float = 1.0,
        signal: Optional[str] = None,
        signal_range: Optional[Tuple[float, float]] = None,
        class_block: int = 1,
        history: Optional[float] = None,
        trans_model: str = "counts",
        trans_strength: Optional[float] = None) -> Tuple[ExitModel, Binning]:
  """Fits an `ExitModel` and its `Binning` on (a fit split of) `traces`.

  The defaults (32 per-ramp quantile bins, logistic-calibrated disagreement
  as the loss) won the held-out comparison of experiments/QUALITY.md; the
  paper's setting is `bins="uniform", loss="proxy"`.

  Args:
    traces: the traces; validated here.
    rows: indices of the fit rows (default: all).
    signal: the exit signal to bin: `"1-conf"`, `"stability"` (`1 - conf`
      plus 1 where the prediction changed since the previous ramp: what
      patience/PABEE uses, folded into one signal; the runtime computes it
      from conf and pred), `"class"` (1 minus a logistic estimate, fitted on
      these rows, that the ramp agrees with the final one given its
      confidence, its predicted class and whether it agrees with the previous
      ramp; `fit_class_calibration`, `jexit.runtime.class_signal`; the model
      is fitted on cross-fitted scores, `cross_fitted_class_signal`, and the
      weights travel in `binning.calibration`) or `"signal"`
      (`traces.signal`). Default: `"signal"` if the traces have one, else
      `"1-conf"`.
    signal_range: `(lo, hi)`, the whole range of the traces' own signal
      (`signal="signal"`): the outer bin edges, outside which the runtimes
      refuse a value by default. Default: the fit rows' min and max; pass the
      signal's range (e.g. `(0, 1)` for a margin) so that held-out values
      beyond the fit rows' are served. The ranges of `"1-conf"`, [0, 1], and
      `"stability"`, [0, 2], and `"class"`, [0, 1], are fixed; `signal_range`
      does not apply to them, and is an error on traces without a signal of
      their own.
    class_block: with `"class"`, the inner folds keep blocks of this many
      consecutive rows whole (related rows, e.g. augmented copies of one
      image, must not score each other).
    bins: `"quantile"` (per-ramp quantiles of the fit rows' signal, `num_bins`
      bins), `"uniform"` (width `step` on [0, 1], the paper's 0.08) or an
      array of edges `[S+1]` (all ramps) or `[K, S+1]`.
    step: bin width for `"uniform"`.
    num_bins: S for `"quantile"`.
    quantile_power: p for `"quantile"`: inner edge i at the quantile level
      `(i / S) ** p` of the ramp's fit rows (`quantile_edges`). 1 (the
      default): bins of equal counts; p > 1: finer bins among the most
      confident inputs, where the stop thresholds of tight loss budgets sit
      (about `(i / S) ** p` of the fit rows fall below edge i); p < 1: finer
      among the least confident. Measured in experiments/QUALITY.md (not a
      default).
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
    prior: where the transition pseudo-counts go: `"uniform"` (the same in
      every cell) or `"marginal"` (in proportion to the next ramp's bin law).
    kernel: width in bins of a Gaussian blur of the transition counts (0: none);
      neighbouring bins share their rows' evidence.
    loss_smoothing: pseudo-count pulling each calibrated bin towards the
      ramp's overall error rate.
    history: None (the default): the Markov `trans [K-1, S, S]`. A number
      alpha >= 0: the state-conditioned `trans [K-1, X, S, S]` (recall only),
      where x is the recall state after ramp k, the index in the solver's grid
      X (the sorted distinct values of `loss` in `solver.working_dtype()`) of
      `min_{j <= k} loss[j, bin_j]`. From the counts `n[k, x, a, b]` of the fit
      rows, each row is shrunk towards the Markov row (smoothed as above) with
      alpha pseudo-rows:

        trans[k, x, a, :] = (n[k, x, a, :] + alpha * markov[k, a, :])
                            / (sum_b n[k, x, a, b] + alpha)

      alpha -> inf gives the Markov model; alpha = 0 gives the empirical
      conditional frequencies (the Markov row where `(k, x, a)` has no data).
      Solve it in the same x64 mode it was fitted in (X depends on the dtype).
      The stop sets of a conditioned model need not be down-sets in x; the
      solver's threshold table then keeps the stop prefix (conservative).
      Measured in experiments/QUALITY.md (not a default).
    trans_model: `"counts"` (the default): each row of `trans` is the fit
      rows' transition counts, smoothed as above. `"parametric"`: a
      heteroscedastic ordered-probit model, 2 + (S - 1) parameters per ramp
      transition, fitted by maximum likelihood (Adam, `optax`) to the counts
      `n[k, a, b]`. Bin a of ramp k sits at `z_a = Phi^{-1}(q_a)`, `q_a` the
      mid quantile of bin a among the fit rows at ramp k (half a pseudo-count
      per bin keeps `q_a` in (0, 1)); ramp k+1's latent value is
      `N(beta_k * z_a, exp(delta_k * z_a)^2)` and bin b of ramp k+1 is the
      interval `(t_k[b-1], t_k[b]]` of the latent axis, with cut points
      `t_k [S-1]` fitted too and the outer bins open-ended:

        param[k, a, b] = Phi((t_k[b] - beta_k z_a) / exp(delta_k z_a))
                         - Phi((t_k[b-1] - beta_k z_a) / exp(delta_k z_a))

      (the location and scale of ramp k+1's axis are the cut points'). Rows
      with few counts borrow the shape of their neighbours' rows.
    trans_strength: with `"parametric"`, how many pseudo-rows of the
      parametric row are added to each row's smoothed counts `c[k, a, :]`
      (the counts model's numerator):

        trans[k, a, :] = (c[k, a, :] + strength * param[k, a, :])
                         / (sum_b c[k, a, b] + strength)

      None (or inf): the parametric rows alone; 0: the counts model exactly.
      Measured in experiments/QUALITY.md (not a default).

  Returns:
    `(model, binning)`: `model.init [S]`, `trans [K-1, S, S]` (or
    `[K-1, X, S, S]` with `history`), `loss [K, S]`, `cost [K]`;
    `binning.edges [K, S+1]`.

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
    >>> conditioned, _ = jexit.fit(t, history=32.0)  # trans [K-1, X, S, S]
    >>> conditioned.trans.shape[::2]
    (2, 32)
    >>> probit, _ = jexit.fit(t, trans_model="parametric", trans_strength=16.0)
    >>> bool(np.allclose(probit.trans.sum(-1), 1.0))
    True
  """
  traces = check_traces(traces)
  n, k = traces.conf.shape
  if rows is not None:
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
    traces = traces.take(rows)
  _check_nonnegative("smoothing", smoothing, "value")
  _check_nonnegative("kernel", kernel, "width")
  if prior not in ("uniform", "marginal"):
    raise ValueError(f"prior: expected 'uniform' or 'marginal', got {prior!r}")
  _check_nonnegative("loss_smoothing", loss_smoothing, "value")
  if history is not None and (not is_real_scalar(history) or not np.isfinite(history)
                              or history < 0):
    raise ValueError(f"history: expected None or a finite shrinkage strength alpha >= 0 "
                     f"(pseudo-rows), got {history!r}")
  if trans_model not in ("counts", "parametric"):
    raise ValueError(f"trans_model: expected 'counts' or 'parametric', got {trans_model!r}")
  if trans_strength is not None:
    if trans_model != "parametric":
      raise ValueError(f"trans_strength: expected None with trans_model={trans_model!r} "
                       f"(it weighs the parametric rows), got {trans_strength!r}")
    if not is_real_scalar(trans_strength) or np.isnan(trans_strength) or trans_strength < 0:
      raise ValueError(f"trans_strength: expected None or a number of pseudo-rows >= 0 "
                       f"(inf allowed), got {trans_strength!r}")
  _check_power(quantile_power)
  if quantile_power != 1 and not (isinstance(bins, str) and bins == "quantile"):
    raise ValueError(f"quantile_power: expected 1 with bins other than 'quantile' (it places "
                     f"quantile edges), got {quantile_power!r}")
  signal_name = signal or own_signal(traces)
  calibration = None
  if signals.get(signal_name).needs_calibration:
    if not (is_int_scalar(class_block) and class_block >= 1):
      raise ValueError(f"class_block: expected an integer >= 1, got {class_block!r}")
    calibration, values = class_scores(traces, int(class_block))
  else:
    values = signal_values(traces, signal_name)
  span = _signal_range(signal_range, signal_name, values, traces.signal is not None)

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
  binning = Binning(edges=edges, signal=signal_name, calibration=calibration)
  s_count = binning.num_bins
  b = binning.assign(values)  # [N, K]

  init_counts = np.bincount(b[:, 0], minlength=s_count) + smoothing
  if init_counts.sum() <= 0:
    raise ValueError("smoothing: 0 leaves the initial law undefined")
  init = init_counts / init_counts.sum()

  trans = np.empty((max(k - 1, 0), s_count, s_count))
  strength = math.inf if trans_strength is None else float(trans_strength)
  if trans_model == "parametric" and k > 1 and strength > 0:
    param, _ = _parametric_trans(b, s_count)
  for r in range(k - 1):
    counts = np.zeros((s_count, s_count))
    np.add.at(counts, (b[:, r], b[:, r + 1]), 1.0)
    counts = _smooth_counts(counts, kernel)
    if prior == "uniform":
      counts += smoothing
    else:
      # Shrink each row towards the next ramp's marginal law (itself smoothed so
      # that no cell is zero): sparse rows borrow the typical next bin, not a
      # uniform one that would put mass on bins the data never visits.
      marginal = np.bincount(b[:, r + 1], minlength=s_count) + 1.0 / s_count
      counts += smoothing * s_count * marginal / marginal.sum()
    if trans_model == "parametric" and strength > 0:
      if math.isinf(strength):
        trans[r] = param[r]
        continue
      counts = counts + strength * param[r]
    row = counts.sum(axis=1, keepdims=True)
    # A row with no data and no smoothing: stay in the same bin (documented).
    empty = row[:, 0] == 0
    counts[empty] = np.eye(s_count)[empty]
    trans[r] = counts / counts.sum(axis=1, keepdims=True)

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
  if history is not None:
    trans = _conditioned_trans(b, table, trans, float(history))
  model = ExitModel(init=init, trans=trans, loss=table, cost=traces.cost.copy())
  return model, binning


def _conditioned_trans(b: np.ndarray, loss: np.ndarray, markov: np.ndarray,
                       alpha: float) -> np.ndarray:
  """`[K-1, X, S, S]` transitions given the recall state, shrunk to `markov`.

  Args:
    b: `[N, K]` bins of the fit rows. loss: `[K, S]` the model's loss table.
    markov: `[K-1, S, S]` the Markov rows to shrink towards. alpha: pseudo-rows.
  """
  # Imported here: `import jexit` (and the numpy runtime) must not need JAX.
  from jexit.solver import working_dtype  # pylint: disable=import-outside-toplevel
  # The grid exactly as solver._prepare builds it: distinct losses in the
  # working dtype (float32 merges values that differ only in float64).
  cast = loss.astype(working_dtype())
  grid = np.unique(cast)
  idx = np.searchsorted(grid, cast)  # [K, S]
  n, k = b.shape
  s_count = loss.shape[1]
  # The grid is sorted, so the index of the best loss so far is the running
  # min of the indices.
  x = np.minimum.accumulate(idx[np.arange(k)[None, :], b], axis=1)  # [N, K]
  counts = np.zeros((k - 1, len(grid), s_count, s_count))
  ramp = np.broadcast_to(np.arange(k - 1)[None, :], (n, k - 1))
  np.add.at(counts, (ramp, x[:, :-1], b[:, :-1], b[:, 1:]), 1.0)
  prior = markov[:, None, :, :]
  rows = counts.sum(-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    shrunk = (counts + alpha * prior) / (rows + alpha)
  # alpha = 0 and no data in (k, x, a): nothing to condition on, keep Markov.
  return np.where(rows + alpha > 0, shrunk, np.broadcast_to(prior, shrunk.shape))


def _latent_axis(counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Bins of one ramp on a standard normal axis, from their counts `[S]`.

  Returns `(mid [S], cuts [S-1])`: `Phi^{-1}` of each bin's mid quantile and
  of the quantiles between bins. Half a pseudo-count per bin keeps every
  quantile inside (0, 1) and every bin a proper interval.
  """
  w = np.asarray(counts, np.float64) + 0.5
  upper = np.cumsum(w) / w.sum()
  lower = upper - w / w.sum()
  inv = np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])
  return inv((lower + upper) / 2), inv(np.clip(upper[:-1], 1e-12, 1 - 1e-12))


def _parametric_trans(b: np.ndarray, s_count: int,
                      steps: int = PARAMETRIC_STEPS) -> Tuple[np.ndarray, dict]:
  """`[K-1, S, S]` ordered-probit transitions fitted to the bins `b [N, K]`.

  See `fit(trans_model="parametric")`. Returns `(trans, params)`, `params`
  the fitted `beta [K-1]`, `delta [K-1]`, `cuts [K-1, S-1]` and the axes
  `z [K-1, S]` they were fitted on.
  """
  n, k = b.shape
  counts = np.zeros((k - 1, s_count, s_count))
  ramp = np.broadcast_to(np.arange(k - 1)[None, :], (n, k - 1))
  np.add.at(counts, (ramp, b[:, :-1], b[:, 1:]), 1.0)
  if s_count == 1:
    return np.ones((k - 1, 1, 1)), {}
  axes = [_latent_axis(np.bincount(b[:, r], minlength=s_count)) for r in range(k)]
  z = np.stack([axes[r][0] for r in range(k - 1)])  # [K-1, S] source ramps
  cuts = np.stack([axes[r + 1][1] for r in range(k - 1)])  # [K-1, S-1] start
  # Start at the independent model (beta = delta = 0: every row is the next
  # ramp's marginal), cut points parametrised by the first one and softplus gaps.
  gaps = np.maximum(np.diff(cuts, axis=1), 1e-6)
  start = {"beta": np.zeros(k - 1), "delta": np.zeros(k - 1), "first": cuts[:, 0],
           "gaps": np.log(np.expm1(gaps))}
  fitted, probs = _probit_fitter(steps)(start, counts, z)
  params = {name: np.asarray(v, np.float64) for name, v in fitted.items()}
  params["cuts"] = params.pop("first")[:, None] + np.concatenate(
      [np.zeros((k - 1, 1)), np.cumsum(np.logaddexp(0.0, params.pop("gaps")), axis=1)], axis=1)
  params["z"] = z
  trans = np.maximum(np.asarray(probs, np.float64), 0.0)
  return trans / trans.sum(-1, keepdims=True), params


@functools.lru_cache(maxsize=None)
def _probit_fitter(steps: int):
  """A jitted `(start, counts [T, S, S], z [T, S]) -> (params, probs [T, S, S])`."""
  # Imported here: `import jexit` (and the numpy runtime) must not need JAX.
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.scipy.special import ndtr  # pylint: disable=import-outside-toplevel

  def probs(p, z):  # one ramp transition: z [S] -> [S, S]
    cuts = p["first"] + jnp.concatenate([jnp.zeros(1), jnp.cumsum(jax.nn.softplus(p["gaps"]))])
    x = (cuts[None, :] - p["beta"] * z[:, None]) * jnp.exp(-p["delta"] * z)[:, None]
    ones, zeros = jnp.ones_like(x[:, :1]), jnp.zeros_like(x[:, :1])
    below = jnp.concatenate([zeros, ndtr(x), ones], axis=1)
    above = jnp.concatenate([ones, ndtr(-x), zeros], axis=1)
    # Difference of the smaller tail: 1 - Phi(x) for x > 0 cancels in float32.
    lower = jnp.concatenate([-ones, x], axis=1)
    return jnp.where(lower > 0, above[:, :-1] - above[:, 1:], below[:, 1:] - below[:, :-1])

  def nll(p, counts, z):  # mean negative log-likelihood per row of one transition
    logp = jnp.log(jnp.maximum(probs(p, z), 1e-30))
    return -jnp.sum(jnp.where(counts > 0, counts * logp, 0.0)) / jnp.maximum(counts.sum(), 1.0)

  total = lambda p, counts, z: jnp.sum(jax.vmap(nll)(p, counts, z))
  # The transitions are independent: one summed loss, one Adam state; each
  # parameter's gradient comes from its own transition only.
  opt = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.01))

  @jax.jit
  def run(start, counts, z):
    p = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), start)
    counts, z = jnp.asarray(counts, jnp.float32), jnp.asarray(z, jnp.float32)
    grad = jax.grad(total)

    def step(carry, _):
      p, state = carry
      updates, state = opt.update(grad(p, counts, z), state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p, jax.vmap(probs)(p, z)

  return run
