"""Serving-side runtime of an exported exit policy, in plain numpy.

This module reads the policy file that `jexit.export.export_policy` writes
(the format and its reader are `jexit.policy_file`) and applies its decision
rule. It imports numpy and jexit's numpy-only modules, never JAX. The signal
`v` of each ramp is `jexit.signals.REGISTRY[header.signal]`: computed from the
ramp's max softmax and prediction, or, for `"signal"`, the caller's own.

Decision rule at ramp k (0-based) once its signal `v` is known:

    s    = number of inner edges edges[k, 1:-1] that are <= v
    l    = loss[k, s]
    best = min(best, l)  and  best_ramp = k  if l <= best   (recall; ties: latest)
    best = l             and  best_ramp = k                  (no recall)
    stop iff best <= threshold[k, s]   (always at the last ramp)
    output: the prediction of ramp best_ramp

The comparison is done in the dtype of `loss` (float32 for the default solver),
in which every finite threshold is exactly a value of `loss`.

Input handling (never a silent wrong exit):
  - `nan="error"` (default): a NaN signal raises `ValueError`.
    `nan="continue"`: a NaN signal makes the input run on to the next ramp and
    that ramp can never be the output (its loss counts as +inf); at the last
    ramp the input stops and outputs the best earlier ramp (or the last one if
    all were NaN).
  - `out_of_range="error"` (default): a signal outside
    `[edges[k, 0], edges[k, -1]]` by more than `range_tol * (hi - lo)` raises
    `ValueError`. `out_of_range="clip"`: it falls into the end bin, exactly as
    `jexit.Binning.assign` and `jexit.evaluation` treat it.
"""

import bisect
import os
from typing import NamedTuple, Optional, Tuple

import numpy as np

from jexit import signals
from jexit.counters import Counters, policy_sha256
from jexit.policy_file import (FORMAT_NAME, FORMAT_VERSION, HEADER_FIELDS,  # noqa: F401
                               _describe, _real, budget_note, check_arrays, check_calibration,
                               check_header, check_reference, describe_budget,
                               read_policy_arrays)
from jexit.signals import (class_features, class_signal, margin_signal,  # noqa: F401
                           stability_signal)
from jexit.types import is_int_scalar, is_real_scalar

_NAN_MODES = ("error", "continue")
_RANGE_MODES = ("error", "clip")


class ExitState(NamedTuple):
  """Per-input state between ramps (any leading shape `[...]`, usually `[B]`).

  Attributes:
    best_loss: `[...]` best (recall) or current (no recall) loss so far, in the
      table's dtype; +inf before the first ramp.
    best_ramp: `[...]` int, the ramp whose prediction is output if it stops now.
    ramp: `[...]` int, the next ramp this input must run (checked by `step`).
  """
  best_loss: np.ndarray  # [...]
  best_ramp: np.ndarray  # [...]
  ramp: np.ndarray       # [...]

  def take(self, rows) -> "ExitState":
    """The state of a subset of inputs (boolean mask or indices), e.g. the
    ones still running after the others stopped."""
    return ExitState(*(np.asarray(a)[rows] for a in self))


class ExitTable:
  """A loaded exit policy: bin lookup, best-so-far update, threshold compare.

  Attributes:
    edges: `[K, S+1]` float64 bin edges per ramp.
    loss: `[K, S]` loss table (dtype of the solver, float32 by default).
    threshold: `[K, S]` stop thresholds, same dtype as `loss`.
    cost: `[K]` float64 segment costs.
    lam: the cost weight the policy was solved for.
    recall: whether the output is the best ramp so far (else the current).
    signal: the binned signal, a name of `jexit.signals.REGISTRY`.
    calibration: `[K-1, 2C+3]` weights of a "class" table, else None.
    header: the file's JSON header (dict).
    budget: `{"max_loss", "metric"}` the table was chosen for, or None.
    certificate: the budget's certificate (a dict, `jexit.certify`), or None.
    active_ramps: the candidate ramps the table's K ramps are, or None (all).
    reference: `(occupancy [K, S], stops [K], num_inputs)`, the fit rows'
      counts for deployment monitoring, or None.
    nan, out_of_range, range_tol: the input-handling modes (module docstring).
    counters: a `jexit.counters.Counters` that `step` and `run` update (built
      with `counters=True`), or None. `audit=p` (with `counters=True`): `run`
      audits a seeded random share p of its inputs (`seed`), recording their
      whole rows; `audit_draw(n)` draws the same kind of mask for a server
      that calls `step` itself (docs/monitor.md).

  Examples:
    >>> table = ExitTable.load("policy.npz")                  # doctest: +SKIP
    >>> stop_ramp, output_ramp, output_pred = table.run(conf, pred)  # doctest: +SKIP
  """

  def __init__(self, header: dict, edges, loss, threshold, cost, *,
               calibration=None, reference=None, nan: str = "error",
               out_of_range: str = "error", range_tol: float = 1e-6,
               counters: bool = False, audit: float = 0.0, seed=None,
               path: str = "<memory>"):
    if nan not in _NAN_MODES:
      raise ValueError(f"nan: expected one of {list(_NAN_MODES)}, got {nan!r}")
    if out_of_range not in _RANGE_MODES:
      raise ValueError(f"out_of_range: expected one of {list(_RANGE_MODES)}, "
                       f"got {out_of_range!r}")
    if (isinstance(range_tol, (bool, np.bool_))
        or not isinstance(range_tol, (int, float, np.integer, np.floating))
        or not (range_tol >= 0 and np.isfinite(range_tol))):
      raise ValueError(f"range_tol: expected a finite value >= 0, got {range_tol!r}")
    header = check_header(dict(header) if isinstance(header, dict) else header, path)
    self.edges, self.loss, self.threshold, self.cost = check_arrays(
        header, edges, loss, threshold, cost, path)
    self.calibration = check_calibration(header, calibration, path)
    self.reference = (None if reference is None and header.get("reference_inputs") is None
                      else check_reference(header, *(reference or (None, None))[:2], path))
    self.header = header
    self.budget = header.get("budget")
    self.certificate = header.get("certificate")
    self.active_ramps = header.get("active_ramps")
    self.path = path
    self.lam = float(header["lam"])
    self.recall = bool(header["recall"])
    self.signal = header["signal"]
    self._signal_entry = signals.REGISTRY[self.signal]
    self.nan, self.out_of_range, self.range_tol = nan, out_of_range, float(range_tol)
    self._inner = [np.ascontiguousarray(e[1:-1]) for e in self.edges]
    span = self.edges[:, -1] - self.edges[:, 0]
    self._lo = self.edges[:, 0] - self.range_tol * span
    self._hi = self.edges[:, -1] + self.range_tol * span
    # Python copies for `decide_one` (exact: float32 values are Python floats).
    self._inner_list = [e.tolist() for e in self._inner]
    self._lo_list, self._hi_list = self._lo.tolist(), self._hi.tolist()
    self._loss_list = self.loss.astype(np.float64).tolist()
    self._threshold_list = self.threshold.astype(np.float64).tolist()
    self._calibration_list = None if self.calibration is None else self.calibration.tolist()
    self.counters, self.audit, self._rng = _make_counters(self, counters, audit, seed)

  @classmethod
  def load(cls, path, **options) -> "ExitTable":
    """Reads and validates a policy file; `options` as in the constructor."""
    header, edges, loss, threshold, cost, calibration, reference = read_policy_arrays(path)
    return cls(header, edges, loss, threshold, cost, calibration=calibration,
               reference=reference, path=os.fspath(path), **options)

  @property
  def num_ramps(self) -> int:
    return int(self.loss.shape[0])

  @property
  def num_bins(self) -> int:
    return int(self.loss.shape[1])

  @property
  def dtype(self) -> np.dtype:
    return self.loss.dtype

  def __repr__(self):
    return self._repr(budget_note(self.header))

  def _repr(self, extra=""):
    return (f"ExitTable(K={self.num_ramps}, S={self.num_bins}, lam={self.lam:g}, "
            f"recall={self.recall}, signal={self.signal!r}, dtype={self.dtype}{extra})")

  def describe(self) -> str:
    """What the table is and what its budget guarantees, in words (a few lines)."""
    return "\n".join([self._repr()] + describe_budget(self.header))

  def _check_ramp(self, k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise ValueError(f"k: expected an int ramp index, got {k!r}")
    if not 0 <= k < self.num_ramps:
      raise ValueError(f"k: expected a ramp in [0, {self.num_ramps}) (the table has "
                       f"K={self.num_ramps} ramps), got {k}")
    return int(k)

  def bins(self, k: int, signal_k) -> Tuple[np.ndarray, np.ndarray]:
    """Bins of ramp k's signal values.

    Args:
      k: 0-based ramp.
      signal_k: `[...]` signal values (float; 1 - conf for "1-conf" tables).

    Returns:
      `(bins [...] int, nan [...] bool)`: NaN inputs get bin 0 and `nan` True
      (only possible with `nan="continue"`).

    Raises:
      ValueError: for a NaN (`nan="error"`) or an out-of-range value
        (`out_of_range="error"`), naming the ramp, the input and the value.
    """
    k = self._check_ramp(k)
    b, isnan = self._bins(k, _real("signal_k", signal_k))
    return b, np.zeros(b.shape, bool) if isnan is None else isnan

  def _bins(self, k: int, v: np.ndarray):
    """`bins` for a checked ramp; the NaN mask is None when there is no NaN."""
    # Fast path (the common case, per step on a server): every value is a
    # number within the tolerated range; NaN fails both comparisons.
    if np.all((v >= self._lo[k]) & (v <= self._hi[k])):
      return np.searchsorted(self._inner[k], v, side="right").astype(np.int64), None
    isnan = np.isnan(v)
    if np.any(isnan) and self.nan == "error":
      at = np.argwhere(isnan)[0]
      raise ValueError(f"signal at ramp {k}: expected finite values, got NaN at input "
                       f"{tuple(int(i) for i in at)} (pass nan='continue' to run such "
                       f"inputs on to the next ramp)")
    if self.out_of_range == "error":
      outside = ~isnan & ((v < self._lo[k]) | (v > self._hi[k]))
      if np.any(outside):
        at = np.argwhere(outside)[0]
        raise ValueError(
            f"signal at ramp {k}: expected values in the edges' range "
            f"[{self.edges[k, 0]:g}, {self.edges[k, -1]:g}], got {v[tuple(at)]!r} at "
            f"input {tuple(int(i) for i in at)} (pass out_of_range='clip' to use the "
            f"end bins, as jexit.evaluation does)")
    # side="right" on the inner edges: bins are [e_s, e_{s+1}), values beyond
    # the outer edges land in the end bins (Binning.assign's rule exactly).
    b = np.searchsorted(self._inner[k], np.where(isnan, self.edges[k, 0], v), side="right")
    return b.astype(np.int64), isnan

  def init_state(self, shape=()) -> ExitState:
    """The state before ramp 0 for inputs of shape `shape` (e.g. `(B,)`)."""
    return ExitState(best_loss=np.full(shape, np.inf, self.dtype),
                     best_ramp=np.full(shape, -1, np.int64),
                     ramp=np.zeros(shape, np.int64))

  def signal_of(self, k: int, conf_k, pred_k=None, prev_pred_k=None) -> np.ndarray:
    """`[...]` the signal `step(k, ...)` expects, from ramp k's max-softmax
    `conf_k [...]`, its predictions `pred_k` and ramp k-1's `prev_pred_k`
    (None at k = 0; "stability" and "class" tables need the predictions). A
    "signal" table's signal is the caller's own."""
    k = self._check_ramp(k)
    conf_k = _real("conf_k", conf_k)
    entry = self._signal_entry
    if not entry.from_outputs:
      raise ValueError("signal_of: this table bins a custom signal (header.signal = "
                       "'signal'); compute it as the traces recorded it")
    if entry.uses_previous and (pred_k is None or (k > 0 and prev_pred_k is None)):
      raise ValueError(f"pred_k, prev_pred_k: a {self.signal!r} table's signal needs ramp "
                       f"k's predictions and, for k > 0, ramp k-1's")
    prev = None if k == 0 or prev_pred_k is None else np.asarray(prev_pred_k)
    pred_k = None if pred_k is None else np.asarray(pred_k)
    return np.asarray(entry.ramp(k, conf_k, pred_k, prev, self.calibration), np.float64)

  def signal_one(self, k: int, conf: float, pred: int, prev_pred: Optional[int] = None) -> float:
    """`signal_of` for one input, in Python floats (the batch-size-1 path).

    The same operations in the same order as the array path
    (`jexit.signals`), with the same numpy functions for log and exp, so the
    value is bit-for-bit `signal_of`'s; a few microseconds instead of a dozen
    numpy array calls. `conf` is ramp k's max softmax, `pred` its class,
    `prev_pred` ramp k-1's (None at k = 0).
    """
    one = self._signal_entry.one
    if one is None:
      raise ValueError("signal_one: this table bins a custom signal (header.signal = "
                       "'signal'); compute it as the traces recorded it")
    if type(k) is not int or not 0 <= k < len(self._lo_list):
      k = self._check_ramp(k)
    if not is_real_scalar(conf):
      raise ValueError(f"conf: expected a real max-softmax value, got {conf!r}")
    for name, p in (("pred", pred), ("prev_pred", prev_pred)):
      if not (is_int_scalar(p) or (p is None and name == "prev_pred")):
        raise ValueError(f"{name}: expected an int class id, got {p!r}")
    return one(k, conf, pred, prev_pred, self._calibration_list)

  def step(self, k: int, signal_k, state: Optional[ExitState] = None
           ) -> Tuple[np.ndarray, ExitState]:
    """One decision after ramp k ran, for one input or a batch.

    Args:
      k: the 0-based ramp that just ran.
      signal_k: `[...]` its exit signal per input (1 - max softmax for a
        "1-conf" table; for a "stability" table plus 1 where ramp k's
        prediction differs from ramp k-1's); a scalar for one input.
      state: the state `step(k - 1, ...)` returned for these same inputs (use
        `state.take(rows)` after dropping stopped inputs); None at k = 0.

    Returns:
      `(stop [...] bool, state)`; once an input stops, its output is the
      prediction of ramp `state.best_ramp`.

    Raises:
      ValueError: for a ramp out of range, a state of another shape or from
        another ramp, or a bad signal (see `bins`).
    """
    k = self._check_ramp(k)
    v = _real("signal_k", signal_k)
    if state is None:
      if k != 0:
        raise ValueError(f"state: expected the state returned by step({k - 1}, ...), "
                         f"got None (only step(0, ...) starts without a state)")
      state = self.init_state(v.shape)
    if not isinstance(state, ExitState):
      raise ValueError(f"state: expected an ExitState, got {type(state).__name__}")
    if np.shape(state.ramp) != v.shape:
      raise ValueError(f"state: expected shape {v.shape} like signal_k, got "
                       f"{np.shape(state.ramp)}")
    if not np.all(np.asarray(state.ramp) == k):
      found = np.unique(state.ramp).tolist()
      raise ValueError(f"state: expected every input to be due at ramp {k}, found "
                       f"inputs due at ramps {found} (a stopped input kept running, or "
                       f"a ramp was skipped)")
    stop, best_loss, best_ramp, b, isnan = self._decide_binned(k, v, state.best_loss,
                                                               state.best_ramp)
    if self.counters is not None:
      self._count(k, b, isnan, stop, best_ramp)
    return stop, ExitState(best_loss=best_loss, best_ramp=best_ramp,
                           ramp=np.full(v.shape, k + 1, np.int64))

  def _decide(self, k: int, v: np.ndarray, best_loss: np.ndarray, best_ramp: np.ndarray):
    """The decision rule on arrays, without the state checks of `step`.

    Args: a checked ramp k, float64 signals `v [...]`, the best loss `[...]`
    (table dtype) and ramp `[...]` so far. Returns `(stop, best_loss,
    best_ramp)`, each `[...]`.
    """
    return self._decide_binned(k, v, best_loss, best_ramp)[:3]

  def _decide_binned(self, k: int, v: np.ndarray, best_loss: np.ndarray,
                     best_ramp: np.ndarray):
    """`_decide`, also returning the bins `[...]` and the NaN mask (or None)."""
    b, isnan = self._bins(k, v)
    current = self.loss[k, b]
    if isnan is not None:
      current = np.where(isnan, np.inf, current).astype(self.dtype)
    if self.recall:
      # `<=`: on ties the latest ramp becomes the output (PROBLEM.md).
      better = current <= best_loss
      best_loss = np.where(better, current, best_loss).astype(self.dtype)
      best_ramp = np.where(better, k, best_ramp).astype(np.int64)
    else:
      best_loss = current
      best_ramp = np.full(v.shape, k, np.int64)
    if k == self.num_ramps - 1:
      stop = np.ones(v.shape, bool)
    else:
      stop = best_loss <= self.threshold[k, b]
      if isnan is not None:
        stop &= ~isnan
    return stop, best_loss, best_ramp, b, isnan

  def _count(self, k, b, isnan, stop, best_ramp) -> None:
    """Counts one step: ramp k's bins, and the inputs that stopped there.

    The bins come from `_bins` (in [0, S)) and the ramps from `_decide`, so
    the counts are added without `Counters.update`'s checks (a few numpy
    calls per ramp)."""
    c = self.counters
    b, stop = b.reshape(-1), stop.reshape(-1)
    if isnan is not None:
      isnan = isnan.reshape(-1)
      c.nan[k] += np.count_nonzero(isnan)
      b = b[~isnan]
    c.occupancy[k] += np.bincount(b, minlength=self.num_bins)
    if k == self.num_ramps - 1:
      out = best_ramp.reshape(-1)
    else:
      out = best_ramp.reshape(-1)[stop]
    if out.shape[0]:
      c.stop_hist[k] += out.shape[0]
      c.output_hist += np.bincount(out, minlength=self.num_ramps)
      c.num_inputs += int(out.shape[0])

  def audit_draw(self, n: int) -> np.ndarray:
    """`[n]` bool, the inputs to audit (run to the final ramp whatever the
    policy says), each with probability `audit`, from the table's seeded
    generator; all False without audit. After serving them, record them with
    `counters.record_audit(pred, output_ramp, conf=conf)`."""
    if self._rng is None or self.audit == 0:
      return np.zeros(n, bool)
    return self._rng.random(n) < self.audit

  def policy_sha256(self) -> str:
    """The table's identity (`jexit.counters.policy_sha256` of its header and
    decision arrays), which its counters carry."""
    return policy_sha256(self.header, _policy_arrays(self))

  def decide_one(self, k: int, v: float, best_loss: float = float("inf"),
                 best_ramp: int = -1) -> Tuple[bool, float, int]:
    """The decision rule for one input in plain Python (no numpy calls).

    The fast path for batch size 1, where a dozen numpy calls per ramp would
    cost more than the rule itself. Same decisions as `step`: the loss and
    threshold values are exact float32/float64 numbers, which Python floats
    represent and order exactly. NaN and out-of-range values go through the
    array path (its errors and fallbacks).

    Args:
      k: the 0-based ramp that just ran, in `[0, num_ramps)`.
      v: its signal. best_loss, best_ramp: what the previous call returned
        (the defaults at k = 0).

    Returns:
      `(stop, best_loss, best_ramp)`.
    """
    # Cheap checks first (the batch-size-1 path): a wrong k would index from
    # the end, a string would fail deep inside.
    if type(k) is not int or not 0 <= k < len(self._lo_list):
      k = self._check_ramp(k)
    if type(v) is not float and not is_real_scalar(v):
      raise ValueError(f"v: expected a real signal value, got {v!r}")
    if type(best_loss) is not float and not is_real_scalar(best_loss):
      raise ValueError(f"best_loss: expected the best loss so far (a float), got {best_loss!r}")
    if type(best_ramp) is not int or not -1 <= best_ramp < k:
      if not (is_int_scalar(best_ramp) and -1 <= best_ramp < k):
        raise ValueError(f"best_ramp: expected -1 (none yet) or an earlier ramp in "
                         f"[0, {k}), got {best_ramp!r}")
      best_ramp = int(best_ramp)
    if not self._lo_list[k] <= v <= self._hi_list[k]:  # NaN fails too
      stop, loss, ramp = self._decide(k, np.asarray(float(v)),
                                      np.asarray(best_loss, self.dtype),
                                      np.asarray(best_ramp, np.int64))
      return bool(stop), float(loss), int(ramp)
    b = bisect.bisect_right(self._inner_list[k], v)
    current = self._loss_list[k][b]
    if not self.recall or current <= best_loss:
      best_loss, best_ramp = current, k
    stop = k == self.num_ramps - 1 or best_loss <= self._threshold_list[k][b]
    return stop, best_loss, best_ramp

  def run(self, conf, pred, *, signal=None
          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replays the policy on a whole trace, as a server would run it.

    Each ramp's decision reads only the inputs still running, so NaN or
    out-of-range values at ramps an input never reaches are not consulted.

    Args:
      conf: `[N, K]` max-softmax confidences (used for "1-conf",
        "stability" and "class" tables; may be None when `signal` is given).
      pred: `[N, K]` int predictions of every ramp.
      signal: `[N, K]` the custom signal, required for a "signal" table and
        refused for the others.

    A table with `active_ramps` (ramp placement) also serves the full
    candidate trace, `[N, C]` columns of every candidate ramp: it reads the
    active columns only, and reports ramps as candidate indices (given just
    its own K columns, it reports the table's ramps 0..K-1, as any table).

    Returns:
      `(stop_ramp [N], output_ramp [N], output_pred [N])`, 0-based ramps and
      `pred[n, output_ramp[n]]`.

    Raises:
      ValueError: for shapes that do not match the table's K ramps, non-integer
        predictions, conf outside [0, 1] (unless out_of_range="clip"), a
        missing/refused signal, or NaN/out-of-range values (see `bins`).
    """
    k_count = self.num_ramps
    pred = np.asarray(pred)
    cols = self._candidate_columns(pred)
    if cols is not None:  # the full candidate trace: serve the active ramps' columns
      pick = lambda a: None if a is None else np.asarray(a)[:, cols]
      stop_ramp, output_ramp, output_pred = self.run(pick(conf), pred[:, cols],
                                                     signal=pick(signal))
      return cols[stop_ramp], cols[output_ramp], output_pred
    if pred.ndim != 2 or pred.shape[1] != k_count:
      raise ValueError(f"pred: expected shape [N, K={k_count}] (the table has "
                       f"{k_count} ramps), got {_describe(pred)}")
    if pred.dtype.kind not in "biu" and not (
        pred.dtype.kind == "f" and np.all(np.isfinite(pred)) and np.all(pred == np.round(pred))):
      raise ValueError(f"pred: expected integer class ids, got {_describe(pred)}"
                       + (" with non-integer values" if pred.dtype.kind == "f" else ""))
    n = pred.shape[0]
    if self._signal_entry.from_outputs:
      if signal is not None:
        raise ValueError(f"signal: this table bins {self.signal!r}, computed from conf "
                         f"and pred; pass conf, not signal")
      if conf is None:
        raise ValueError(f"conf: expected [N, K] confidences for a {self.signal!r} table, "
                         f"got None")
      conf = _real("conf", conf)
      if conf.shape != (n, k_count):
        raise ValueError(f"conf: expected shape [N, K] = ({n}, {k_count}) (like pred, "
                         f"K from the table), got {_describe(conf)}")
      if self.out_of_range == "error":
        tol = self.range_tol  # as for the signal: float32 softmax rounding
        outside = (conf < -tol) | (conf > 1 + tol)  # NaN is the nan option's case
        if np.any(outside):
          at = tuple(int(i) for i in np.argwhere(outside)[0])
          raise ValueError(f"conf: expected max-softmax values in [0, 1], got "
                           f"{conf[at]!r} at input {at[0]}, ramp {at[1]} (pass "
                           f"out_of_range='clip' to use the end bins)")
      values = signals.values(self.signal, conf, pred, calibration=self.calibration)
    else:
      if signal is None:
        raise ValueError("signal: this table bins a custom signal (header.signal = "
                         "'signal'); pass signal=[N, K]")
      values = _real("signal", signal)
      if values.shape != (n, k_count):
        raise ValueError(f"signal: expected shape [N, K] = ({n}, {k_count}) (like pred, "
                         f"K from the table), got {_describe(values)}")
    audited = None
    if self.counters is not None and self.audit > 0:
      audited = self.audit_draw(n)
      if audited.any() and conf is None:
        raise ValueError("conf: audited rows are recorded whole; pass conf=[N, K] with "
                         "the signal (or audit=0)")
    stop_ramp = np.full(n, -1, np.int64)
    output_ramp = np.full(n, -1, np.int64)
    rows = np.arange(n)
    state = None
    for k in range(k_count):
      stop, state = self.step(k, values[rows, k], state)
      stop_ramp[rows[stop]] = k
      output_ramp[rows[stop]] = state.best_ramp[stop]
      rows, state = rows[~stop], state.take(~stop)
      if rows.size == 0:
        break
    if audited is not None and audited.any():
      # A replay has every ramp's outputs: the audit only records them.
      self.counters.record_audit(
          pred[audited], output_ramp[audited], conf=_real("conf", conf)[audited],
          signal=values[audited] if self.counters.keeps_signal else None)
    return stop_ramp, output_ramp, pred[np.arange(n), output_ramp]


  def _candidate_columns(self, pred) -> Optional[np.ndarray]:
    """`[K]` the active ramps (candidate indices) when the table lists them and
    `pred` holds more columns than the table's K ramps, else None."""
    if self.active_ramps is None or pred.ndim != 2 or pred.shape[1] == self.num_ramps:
      return None
    cols = np.asarray(self.active_ramps, np.int64)
    if pred.shape[1] <= cols[-1]:
      raise ValueError(f"pred: expected the table's K={self.num_ramps} ramps or the full "
                       f"candidate trace (more than {int(cols[-1])} columns: active_ramps "
                       f"{self.active_ramps}), got {_describe(pred)}")
    return cols


def load_policy_file(path, **options) -> ExitTable:
  """Reads and validates a policy file into an `ExitTable` (no pickle, no JAX).

  Args:
    path: the `.npz` written by `jexit.export.export_policy`.
    **options: `nan`, `out_of_range`, `range_tol`, `counters`, `audit`, `seed`
      (see `ExitTable`).

  Raises:
    ValueError: naming what is wrong (module docstring lists the checks).
  """
  return ExitTable.load(path, **options)


def _policy_arrays(table: ExitTable) -> dict:
  arrays = {"edges": table.edges, "loss": table.loss, "threshold": table.threshold,
            "cost": table.cost}
  if table.calibration is not None:
    arrays["calibration"] = table.calibration
  return arrays


def _make_counters(table: ExitTable, counters, audit, seed):
  """`(Counters or None, audit share, generator or None)` for a table's options."""
  if not isinstance(counters, (bool, np.bool_)):
    raise ValueError(f"counters: expected a bool, got {counters!r}")
  if (isinstance(audit, (bool, np.bool_)) or not isinstance(audit, (int, float, np.integer,
                                                                    np.floating))
      or not 0 <= audit <= 1):
    raise ValueError(f"audit: expected a share of inputs in [0, 1], got {audit!r}")
  if audit > 0 and not counters:
    raise ValueError(f"audit: audited rows are kept in the counters; pass counters=True "
                     f"with audit={audit!r}")
  if not counters:
    return None, 0.0, None
  c = Counters(table.num_ramps, table.num_bins, policy_sha256=table.policy_sha256(),
               audit_rows=True,
               audit_signal=not signals.REGISTRY[table.signal].from_outputs)
  return c, float(audit), np.random.default_rng(seed)
